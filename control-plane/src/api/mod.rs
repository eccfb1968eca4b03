//! The admin API on two transports with the same semantics: REST/JSON under `/v1/…`
//! ([`rest`]) and gRPC ([`grpc`]). Both authenticate with [`auth`], convert with [`convert`]
//! and report errors through [`error`].

pub mod auth;
pub mod convert;
pub mod error;
pub mod grpc;
pub mod keys;
pub mod rest;

use sluice_proto::declarative::normalize::derived_id;
use sluice_proto::pb::Resource;

use crate::registry::{Registry, RegistryError};

/// Whether a resource about to be created under the id derived from its name would take an id
/// another resource holds: one renamed since, which keeps its id (and its references). The new
/// resource then gets an id of its own, on every path that creates one (REST and gRPC
/// resources, credentials, API keys).
pub async fn derived_id_held_by_another(
    registry: &Registry,
    resource: &Resource,
) -> Result<bool, error::ApiError> {
    let Some(meta) = resource.meta() else {
        return Ok(false);
    };
    if meta.id != derived_id(resource.kind(), &meta.group, &meta.name) {
        return Ok(false);
    }
    match registry.get(resource.kind(), &meta.id).await {
        Ok(holder) => Ok(holder.meta().map(|m| &m.name) != Some(&meta.name)),
        Err(RegistryError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
