//! Consumer API keys, for both transports: a key is generated here, returned once, and only
//! its SHA-256 and a short prefix are stored.

use std::time::Duration;

use sluice_proto::declarative::normalize::{API_KEY_PREFIX_LEN, derived_id, hash_api_key};
use sluice_proto::pb::{self, Resource, ResourceKind};

use super::auth::{Caller, random_secret};
use super::error::ApiError;
use crate::registry::{Committed, Registry, RegistryError, Write};

/// Prefix of every generated key, so a leaked key is recognisable.
pub const KEY_PREFIX: &str = "sk_";

/// A key just issued: the plaintext (shown once) and the commit that stored it.
#[derive(Debug)]
pub struct Issued {
    pub plaintext: String,
    pub credential: Resource,
    /// For a rotation: the old key as stored (revoked, or expiring after the grace period).
    pub previous: Option<Resource>,
    pub committed: Committed,
}

pub fn is_api_key(resource: &Resource) -> bool {
    matches!(&resource.kind, Some(pb::resource::Kind::Credential(c)) if matches!(c.kind, Some(pb::credential::Kind::ApiKey(_))))
}

/// Rotation and revocation apply to API keys only.
fn require_api_key(credential: &Resource) -> Result<(), ApiError> {
    if is_api_key(credential) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "credential {} is not an API key",
            credential.id()
        )))
    }
}

fn new_key(
    owner: &Resource,
    name: Option<&str>,
    expires_at: Option<prost_types::Timestamp>,
) -> (String, Resource) {
    let plaintext = format!("{KEY_PREFIX}{}", random_secret());
    let hash = hash_api_key(&plaintext);
    let meta = owner.meta().cloned().unwrap_or_default();
    let name = name.map_or_else(|| format!("key-{}", &hash[..12]), str::to_owned);
    let credential = pb::Credential {
        meta: Some(pb::Meta {
            id: derived_id(ResourceKind::Credential, &meta.group, &name),
            group: meta.group,
            name,
            ..Default::default()
        }),
        consumer_id: meta.id,
        kind: Some(pb::credential::Kind::ApiKey(pb::ApiKeyCredential {
            prefix: plaintext
                .chars()
                .take(KEY_PREFIX.len() + API_KEY_PREFIX_LEN)
                .collect(),
            key_sha256: hash,
        })),
        expires_at,
        revoked: false,
    };
    (plaintext, credential.into())
}

/// Issues a new key for consumer `owner`.
pub async fn create(
    registry: &Registry,
    caller: &Caller,
    owner: &Resource,
    name: Option<&str>,
    expires_at: Option<prost_types::Timestamp>,
    message: &str,
) -> Result<Issued, ApiError> {
    if let Some(name) = name
        && let Err(reason) = sluice_proto::validate::check_name(name)
    {
        return Err(ApiError::Invalid(sluice_proto::ConfigErrors::single(
            "name", reason,
        )));
    }
    let (plaintext, mut credential) = new_key(owner, name, expires_at);
    if super::derived_id_held_by_another(registry, &credential).await?
        && let Some(meta) = credential.meta_mut()
    {
        meta.id = uuid::Uuid::new_v4().to_string();
    }
    let committed = registry
        .commit(
            &caller.name,
            message,
            vec![Write::Put {
                resource: credential,
                if_match: Some(0),
            }],
        )
        .await
        .map_err(|e| match e {
            RegistryError::PreconditionFailed { .. } => {
                ApiError::Conflict("a key with this name already exists".into())
            }
            other => other.into(),
        })?;
    let credential = committed
        .resources
        .first()
        .cloned()
        .flatten()
        .ok_or_else(|| ApiError::Internal("no key stored".into()))?;
    Ok(Issued {
        plaintext,
        credential,
        previous: None,
        committed,
    })
}

/// Replaces key `old` with a new one; the old one is revoked at once, or expires after
/// `grace`.
pub async fn rotate(
    registry: &Registry,
    caller: &Caller,
    owner: &Resource,
    old: &Resource,
    grace: Duration,
    message: &str,
) -> Result<Issued, ApiError> {
    require_api_key(old)?;
    let mut retired = old.clone();
    if let Some(pb::resource::Kind::Credential(c)) = &mut retired.kind {
        if grace.is_zero() {
            c.revoked = true;
        } else {
            // A grace period shortens a key's life, never lengthens it.
            let until = chrono::Duration::from_std(grace)
                .ok()
                .and_then(|grace| chrono::Utc::now().checked_add_signed(grace))
                .ok_or_else(|| {
                    ApiError::Invalid(sluice_proto::ConfigErrors::single(
                        "grace_period",
                        "is too long: the key would expire past the year 262143",
                    ))
                })?
                .timestamp();
            let until = c.expires_at.map_or(until, |at| at.seconds.min(until));
            c.expires_at = Some(prost_types::Timestamp {
                seconds: until,
                nanos: 0,
            });
        }
    }
    let (plaintext, fresh) = new_key(owner, None, None);
    let version = old.meta().map(|m| m.resource_version);
    let committed = registry
        .commit(
            &caller.name,
            message,
            vec![
                Write::Put {
                    resource: retired,
                    if_match: version,
                },
                Write::Put {
                    resource: fresh,
                    if_match: Some(0),
                },
            ],
        )
        .await?;
    let previous = committed.resources.first().cloned().flatten();
    let credential = committed
        .resources
        .get(1)
        .cloned()
        .flatten()
        .ok_or_else(|| ApiError::Internal("no key stored".into()))?;
    Ok(Issued {
        plaintext,
        credential,
        previous,
        committed,
    })
}

/// Revokes key `credential`.
pub async fn revoke(
    registry: &Registry,
    caller: &Caller,
    credential: &Resource,
    message: &str,
) -> Result<Committed, ApiError> {
    require_api_key(credential)?;
    let mut revoked = credential.clone();
    if let Some(pb::resource::Kind::Credential(c)) = &mut revoked.kind {
        c.revoked = true;
    }
    let version = credential.meta().map(|m| m.resource_version);
    Ok(registry
        .commit(
            &caller.name,
            message,
            vec![Write::Put {
                resource: revoked,
                if_match: version,
            }],
        )
        .await?)
}
