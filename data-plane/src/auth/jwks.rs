//! JWKS documents: fetched, cached and refreshed per URL.
