//! Content hashes of configurations: the same resources always give the same hash, whatever
//! order they were listed or stored in.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::pb::ConfigSet;

/// Sorts every resource list by id. Routes keep their order inside an API: it breaks ties
/// between equally specific routes, so it is part of the content.
pub fn canonicalize(config: &mut ConfigSet) {
    fn id_of(meta: Option<&crate::pb::Meta>) -> &str {
        meta.map_or("", |m| m.id.as_str())
    }
    config
        .apis
        .sort_by(|a, b| id_of(a.meta.as_ref()).cmp(id_of(b.meta.as_ref())));
    config
        .upstreams
        .sort_by(|a, b| id_of(a.meta.as_ref()).cmp(id_of(b.meta.as_ref())));
    config
        .consumers
        .sort_by(|a, b| id_of(a.meta.as_ref()).cmp(id_of(b.meta.as_ref())));
    config
        .credentials
        .sort_by(|a, b| id_of(a.meta.as_ref()).cmp(id_of(b.meta.as_ref())));
    config
        .plans
        .sort_by(|a, b| id_of(a.meta.as_ref()).cmp(id_of(b.meta.as_ref())));
    config
        .subscriptions
        .sort_by(|a, b| id_of(a.meta.as_ref()).cmp(id_of(b.meta.as_ref())));
    config
        .policies
        .sort_by(|a, b| id_of(a.meta.as_ref()).cmp(id_of(b.meta.as_ref())));
    config
        .brokers
        .sort_by(|a, b| id_of(a.meta.as_ref()).cmp(id_of(b.meta.as_ref())));
}

/// Lowercase hex SHA-256 of the canonical encoding of `config`. Map fields are `BTreeMap`s
/// (see build.rs), so the encoding itself is deterministic.
pub fn content_hash(config: &ConfigSet) -> String {
    let mut canonical = config.clone();
    canonicalize(&mut canonical);
    hex::encode(Sha256::digest(canonical.encode_to_vec()))
}
