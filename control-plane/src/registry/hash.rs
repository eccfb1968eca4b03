//! The registry's state hash: a hash of every resource, updated in O(changes) per commit.
//!
//! It is the sum, modulo 2^256, of the SHA-256 of each resource's encoding with its
//! `resource_version` cleared (a multiset hash). Adding a resource adds its hash, removing one
//! subtracts it, so a commit never rereads the registry, and the same set of resources always
//! gives the same hash, whatever history led to it: a rollback to version N yields N's hash.

use prost::Message;
use sha2::{Digest, Sha256};
use sluice_proto::pb::Resource;

/// A 256-bit state hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateHash(pub [u8; 32]);

impl StateHash {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut out = [0u8; 32];
        let n = bytes.len().min(32);
        out[..n].copy_from_slice(&bytes[..n]);
        Self(out)
    }

    pub fn add(&mut self, resource: &Resource) {
        add_mod(&mut self.0, &resource_digest(resource));
    }

    pub fn remove(&mut self, resource: &Resource) {
        // Subtracting d is adding its two's complement (-d mod 2^256).
        let mut negated = resource_digest(resource).map(|b| !b);
        add_mod(&mut negated, &one());
        add_mod(&mut self.0, &negated);
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The hash of a whole set of resources, computed from scratch.
    pub fn of<'a>(resources: impl IntoIterator<Item = &'a Resource>) -> Self {
        let mut hash = Self::default();
        for resource in resources {
            hash.add(resource);
        }
        hash
    }
}

fn one() -> [u8; 32] {
    let mut one = [0u8; 32];
    one[31] = 1;
    one
}

/// SHA-256 of the resource as content: its resource version is bookkeeping, not content.
fn resource_digest(resource: &Resource) -> [u8; 32] {
    let mut content = resource.clone();
    if let Some(meta) = content.meta_mut() {
        meta.resource_version = 0;
    }
    Sha256::digest(content.encode_to_vec()).into()
}

/// `acc = acc + x mod 2^256`, big-endian.
fn add_mod(acc: &mut [u8; 32], x: &[u8; 32]) {
    let mut carry = 0u16;
    for i in (0..32).rev() {
        let sum = u16::from(acc[i]) + u16::from(x[i]) + carry;
        acc[i] = (sum & 0xff) as u8;
        carry = sum >> 8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::pb;

    fn consumer(name: &str) -> Resource {
        pb::Consumer {
            meta: Some(pb::Meta {
                id: name.into(),
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
        .into()
    }

    #[test]
    fn order_free_and_reversible() {
        let (a, b, c) = (consumer("a"), consumer("b"), consumer("c"));
        assert_eq!(StateHash::of([&a, &b, &c]), StateHash::of([&c, &a, &b]));
        let mut h = StateHash::of([&a, &b]);
        h.add(&c);
        h.remove(&b);
        assert_eq!(h, StateHash::of([&a, &c]));
        h.remove(&a);
        h.remove(&c);
        assert_eq!(h, StateHash::default());
    }

    #[test]
    fn resource_version_is_not_content() {
        let a = consumer("a");
        let mut bumped = a.clone();
        bumped.meta_mut().unwrap().resource_version = 9;
        assert_eq!(StateHash::of([&a]), StateHash::of([&bumped]));
    }
}
