//! The Sluice data plane (`sluice-dp`).
//!
//! A data plane holds one immutable compiled configuration in an `ArcSwap` ([`config`]) and
//! answers operators on its admin listener ([`admin`]). The folders follow the request path as
//! it is built out: `config` → `server` → `router` → `auth` → `ratelimit` → `upstream` /
//! `events`, with `admin` and `telemetry` beside them.

pub mod admin;
pub mod config;
