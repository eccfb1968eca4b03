//! The Sluice data plane (`sluice-dp`).
//!
//! A data plane holds one immutable compiled configuration in an `ArcSwap` ([`config`]),
//! accepts client connections ([`server`]), routes each request ([`router`]) and proxies it to
//! an upstream ([`upstream`]), and answers operators on its admin listener ([`admin`]) with
//! health, the running config and metrics ([`telemetry`]). The folders follow the request
//! path: `server` → `router` → (`auth` → `ratelimit`, with their issues) → `upstream` /
//! `events`.

pub mod admin;
pub mod auth;
pub mod config;
pub mod discovery;
pub mod events;
pub mod ratelimit;
pub mod router;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upstream;
