//! JWT bearer tokens: verification against an issuer's keys.
