//! Who is calling and whether they may: authentication (API keys, JWT, client certificates),
//! authorization (subscriptions, scopes, IP lists) and the per-route access policy.

pub mod jwks;
pub mod jwt;
