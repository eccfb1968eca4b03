//! The admin API on two transports with the same semantics: REST/JSON under `/v1/…`
//! ([`rest`]) and gRPC ([`grpc`]). Both authenticate with [`auth`], convert with [`convert`]
//! and report errors through [`error`].

pub mod auth;
pub mod convert;
pub mod error;
pub mod grpc;
pub mod keys;
pub mod rest;
