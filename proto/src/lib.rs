//! Sluice's contract crate, shared by the control plane and the data plane.
//!
//! - [`pb`]: the protobuf types and gRPC services generated from `sluice/v1/*.proto`
//!   (resources, the discovery stream, the registry admin API).
//! - [`declarative`]: the YAML/JSON document format that describes a whole registry; it is
//!   parsed, validated and normalised here into a [`pb::ConfigSet`], so both planes accept and
//!   reject exactly the same documents.
//! - [`validate`]: the checks every [`pb::ConfigSet`] must pass, whether it came from a
//!   document, the registry or a discovery snapshot.
//! - [`snapshot`]: a group's configuration as data planes receive it (API keys packed).

pub mod declarative;
pub mod error;
pub mod hash;
pub mod kafka;
pub mod resource;
pub mod snapshot;
pub mod time;
pub mod tls;
pub mod validate;

pub use error::{ConfigErrors, FieldError};

/// Generated protobuf types, `sluice.v1`.
#[allow(missing_docs, unused_qualifications, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("sluice.v1");

    /// The encoded `FileDescriptorSet` of every Sluice proto, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));
}
