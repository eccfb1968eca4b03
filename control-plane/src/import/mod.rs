//! Turning other API descriptions into Sluice declarative documents.

pub mod openapi;
