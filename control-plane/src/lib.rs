//! The Sluice control plane (`sluice-cp`) and CLI (`sluicectl`).
//!
//! The control plane keeps the registry in Postgres and serves it to operators and data
//! planes. Its folders follow the flow: `registry` (the store), `versions`, `snapshot`
//! (registry → proto), `discovery` (the stream to data planes) and `api` (REST and gRPC).

pub mod api;
pub mod cli;
pub mod db;
pub mod discovery;
pub mod import;
pub mod metrics;
pub mod registry;
pub mod snapshot;
pub mod versions;
