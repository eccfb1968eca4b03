//! Whether the callers of the node's open event streams may still read them. A stream (SSE,
//! WebSocket) outlives the request that access control admitted, so what that admission
//! rested on (the key or credential presented, its consumer, the subscription) is kept as the
//! stream's [`Grant`] and looked at again in every configuration the node applies: a key
//! revoked, a consumer disabled or a subscription suspended in the control plane ends the
//! caller's open streams as soon as the node has the change, as it refuses the caller's next
//! request. An expiry already known when the stream opened is a deadline of the stream's own
//! ([`super::Identity::ends`]).
//!
//! What is looked at again is the caller's standing, not the route: a route whose policies
//! change keeps the streams it has (as a proxied request in flight is not stopped either).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{Identity, has_passed};
use crate::config::holdings::Holdings;

/// What an admission rested on, besides the route's own rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub(super) presented: Presented,
    pub(super) consumer_id: [u8; 16],
    pub(super) api_id: [u8; 16],
    pub(super) subscription_id: [u8; 16],
}

/// The credential the caller proved itself with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    /// An API key, by its SHA-256: keys are held by their hash.
    Key([u8; 32]),
    /// A JWT or client-certificate credential, by id.
    Credential([u8; 16]),
}

impl Grant {
    /// Why `held` would refuse the caller now (the reason access control would give); `None`
    /// while it still admits them.
    pub fn refused_by(&self, held: &Holdings) -> Option<&'static str> {
        match self.presented {
            Presented::Key(sha256) => {
                let Some(key) = held.api_key(&sha256) else {
                    return Some("invalid_key");
                };
                if key.consumer_id != self.consumer_id {
                    return Some("invalid_key");
                }
                if key.revoked {
                    return Some("key_revoked");
                }
                if has_passed(key.expires_at()) {
                    return Some("key_expired");
                }
            }
            Presented::Credential(id) => {
                let Some(credential) = held.credential_by_id(&id) else {
                    return Some("unknown_credential");
                };
                if super::uuid_bytes(&credential.consumer_id) != self.consumer_id {
                    return Some("unknown_credential");
                }
                if credential.revoked {
                    return Some("credential_revoked");
                }
                if has_passed(credential.expires_at) {
                    return Some("credential_expired");
                }
            }
        }
        match held.consumer(&self.consumer_id) {
            None => return Some("unknown_consumer"),
            Some(consumer) if consumer.disabled => return Some("consumer_disabled"),
            Some(_) => {}
        }
        match held.subscription(&self.consumer_id, &self.api_id) {
            Some(subscription) if subscription.id == self.subscription_id => {
                if subscription.suspended {
                    Some("subscription_suspended")
                } else if has_passed(subscription.expires_at()) {
                    Some("subscription_expired")
                } else {
                    None
                }
            }
            // Removed, or replaced by another: the stream was admitted on the one gone.
            _ => Some("no_subscription"),
        }
    }
}

/// The node's open streams of identified callers, each with its [`Grant`].
#[derive(Debug, Default)]
pub struct OpenStreams {
    streams: Mutex<HashMap<u64, Open>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct Open {
    grant: Grant,
    /// Cancelled when the grant no longer holds; `refused` then says why.
    revoked: CancellationToken,
    refused: Option<&'static str>,
}

impl OpenStreams {
    fn streams(&self) -> MutexGuard<'_, HashMap<u64, Open>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches a stream of `identity`'s caller from now until the returned watch is dropped.
    /// `now`: the configuration running, which the grant is looked at in at once: one applied
    /// after the caller was admitted and before this call would otherwise not be looked at
    /// for this stream. (Applying a configuration swaps it in before it looks at the open
    /// streams, under the same lock this takes.)
    pub fn watch(
        self: &Arc<Self>,
        identity: &Identity,
        now: impl FnOnce() -> Option<Arc<crate::config::CompiledConfig>>,
    ) -> StreamAccess {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let revoked = CancellationToken::new();
        let grant = identity.grant;
        let mut streams = self.streams();
        let refused = now().and_then(|config| grant.refused_by(&config.holdings));
        if refused.is_some() {
            revoked.cancel();
        }
        streams.insert(
            id,
            Open {
                grant,
                revoked: revoked.clone(),
                refused,
            },
        );
        drop(streams);
        StreamAccess {
            id,
            streams: self.clone(),
            revoked: Box::pin(revoked.clone().cancelled_owned()),
            revoked_token: revoked,
            expires: access_deadline(identity).map(|at| Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Looks at every open stream's grant in `held` (a configuration just applied), and ends
    /// those it no longer admits. Returns how many it ended.
    pub fn recheck(&self, held: &Holdings) -> usize {
        let mut ended = 0;
        for (id, open) in self.streams().iter_mut() {
            if open.refused.is_some() {
                continue;
            }
            if let Some(reason) = open.grant.refused_by(held) {
                tracing::info!(
                    stream = id,
                    consumer = %uuid::Uuid::from_bytes(open.grant.consumer_id),
                    reason,
                    "event stream ended: its caller is no longer admitted"
                );
                open.refused = Some(reason);
                open.revoked.cancel();
                ended += 1;
            }
        }
        ended
    }

    /// Streams watched now.
    pub fn len(&self) -> usize {
        self.streams().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One open stream's watch: resolves ([`StreamAccess::ended`]) when its caller's access ends.
/// Dropped with the stream, which stops being watched.
#[derive(Debug)]
pub struct StreamAccess {
    id: u64,
    streams: Arc<OpenStreams>,
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The same revocation, looked at without waiting (this stream's own lock, not the
    /// node's).
    revoked_token: CancellationToken,
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How a caller's access to an open stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessEnded {
    /// The credential, token or subscription expired, as the admission said it would.
    Expired,
    /// The configuration no longer admits the caller; the reason access control would give.
    Revoked(&'static str),
}

impl StreamAccess {
    /// Resolves when the caller's access ends.
    pub async fn ended(&mut self) -> AccessEnded {
        let StreamAccess {
            revoked, expires, ..
        } = self;
        let expired = async {
            match expires {
                Some(sleep) => sleep.as_mut().await,
                None => std::future::pending().await,
            }
        };
        let revoked = tokio::select! {
            () = revoked.as_mut() => true,
            () = expired => false,
        };
        if revoked {
            AccessEnded::Revoked(self.refused())
        } else {
            AccessEnded::Expired
        }
    }

    /// Why the stream's grant was refused, once it was.
    fn refused(&self) -> &'static str {
        let streams = self.streams.streams();
        streams
            .get(&self.id)
            .and_then(|open| open.refused)
            .unwrap_or("revoked")
    }

    /// Whether [`StreamAccess::ended`] would resolve now: for loops that do not wait.
    pub fn has_ended(&self) -> Option<AccessEnded> {
        if self.revoked_token.is_cancelled() {
            return Some(AccessEnded::Revoked(self.refused()));
        }
        self.expires
            .as_ref()
            .is_some_and(|sleep| sleep.is_elapsed())
            .then_some(AccessEnded::Expired)
    }
}

impl Drop for StreamAccess {
    fn drop(&mut self) {
        self.streams.streams().remove(&self.id);
    }
}

/// When a stream for `identity` ends by itself: its access's end ([`Identity::ends`]) on the
/// runtime's clock. `None`: it does not (or not within any time a clock can hold).
fn access_deadline(identity: &Identity) -> Option<tokio::time::Instant> {
    let ends = identity.ends?;
    let ends = std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(
        u64::try_from(ends.seconds).ok()?,
        u32::try_from(ends.nanos).unwrap_or(0),
    ))?;
    let left = ends
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::Instant::now().checked_add(left)
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};
    use sluice_proto::declarative::{self, Format};
    use sluice_proto::pb::ResourceKind;

    use super::*;
    use crate::config::holdings::CredentialIdentity;

    const KEY: &str = "acme-key-0123456789";
    const ISSUER: &str = "https://auth.example.com/";

    /// The registry with acme's key revoked, its JWT credential revoked, acme disabled, or
    /// its subscription `status`; `None` leaves the subscription out.
    fn holdings(
        key_revoked: bool,
        jwt_revoked: bool,
        disabled: bool,
        status: Option<&str>,
    ) -> Holdings {
        let subscription = status.map_or("[]".to_owned(), |status| {
            format!("\n  - {{ consumer: acme, api: orders, plan: basic, status: {status} }}")
        });
        let text = format!(
            r#"format_version: 1
policies:
  - name: keys
    key_auth: {{}}
plans:
  - name: basic
consumers:
  - name: acme
    disabled: {disabled}
    credentials:
      - api_key: {{ key: {KEY} }}
        revoked: {key_revoked}
      - jwt: {{ issuer: "{ISSUER}", subject: acme-service }}
        revoked: {jwt_revoked}
apis:
  - name: orders
    policies: [keys]
    routes:
      - {{ name: watch, path: /orders, direct_response: {{ status: 204 }} }}
subscriptions: {subscription}
"#
        );
        let resources = declarative::load(&text, Format::Yaml).expect("a valid file");
        Holdings::from_snapshot(&sluice_proto::snapshot::from_config(resources)).unwrap()
    }

    fn uuid(kind: ResourceKind, name: &str) -> [u8; 16] {
        let id = declarative::normalize::derived_id(kind, "default", name);
        *uuid::Uuid::parse_str(&id).unwrap().as_bytes()
    }

    /// acme's grants in `held`: by its key, and by its JWT credential.
    fn grants(held: &Holdings) -> (Grant, Grant) {
        let consumer_id = uuid(ResourceKind::Consumer, "acme");
        let api_id = uuid(ResourceKind::Api, "orders");
        let subscription_id = held.subscription(&consumer_id, &api_id).unwrap().id;
        let jwt = held
            .credential(&CredentialIdentity::Jwt {
                issuer: ISSUER,
                subject: "acme-service",
            })
            .unwrap();
        let grant = |presented| Grant {
            presented,
            consumer_id,
            api_id,
            subscription_id,
        };
        (
            grant(Presented::Key(Sha256::digest(KEY).into())),
            grant(Presented::Credential(super::super::uuid_bytes(
                &jwt.meta.unwrap().id,
            ))),
        )
    }

    #[test]
    fn a_grant_holds_until_what_it_rested_on_is_revoked_disabled_suspended_or_gone() {
        let admitted = holdings(false, false, false, Some("active"));
        let (by_key, by_jwt) = grants(&admitted);
        assert_eq!(by_key.refused_by(&admitted), None);
        assert_eq!(by_jwt.refused_by(&admitted), None);

        let key_revoked = holdings(true, false, false, Some("active"));
        assert_eq!(by_key.refused_by(&key_revoked), Some("key_revoked"));
        assert_eq!(
            by_jwt.refused_by(&key_revoked),
            None,
            "the other credential"
        );
        let jwt_revoked = holdings(false, true, false, Some("active"));
        assert_eq!(by_jwt.refused_by(&jwt_revoked), Some("credential_revoked"));
        assert_eq!(by_key.refused_by(&jwt_revoked), None);

        let disabled = holdings(false, false, true, Some("active"));
        assert_eq!(by_key.refused_by(&disabled), Some("consumer_disabled"));
        assert_eq!(by_jwt.refused_by(&disabled), Some("consumer_disabled"));
        let suspended = holdings(false, false, false, Some("suspended"));
        assert_eq!(
            by_key.refused_by(&suspended),
            Some("subscription_suspended")
        );
        let unsubscribed = holdings(false, false, false, None);
        assert_eq!(by_jwt.refused_by(&unsubscribed), Some("no_subscription"));

        let mut rekeyed = by_key;
        rekeyed.presented = Presented::Key([7; 32]);
        assert_eq!(rekeyed.refused_by(&admitted), Some("invalid_key"));
        let mut elsewhere = by_jwt;
        elsewhere.consumer_id = [9; 16];
        assert_eq!(elsewhere.refused_by(&admitted), Some("unknown_credential"));
    }

    fn identity(grant: Grant) -> Identity {
        Identity {
            consumer_id: uuid::Uuid::from_bytes(grant.consumer_id),
            consumer_name: "acme".into(),
            custom_id: "".into(),
            subscription_id: uuid::Uuid::from_bytes(grant.subscription_id),
            credential_id: uuid::Uuid::nil(),
            ends: None,
            grant,
            claim_headers: Vec::new(),
            hidden_key: None,
        }
    }

    #[tokio::test]
    async fn streams_end_when_a_configuration_refuses_their_caller_and_no_others() {
        let admitted = holdings(false, false, false, Some("active"));
        let (by_key, by_jwt) = grants(&admitted);
        let streams = Arc::new(OpenStreams::default());
        let mut keyed = streams.watch(&identity(by_key), || None);
        let mut tokened = streams.watch(&identity(by_jwt), || None);
        assert_eq!(streams.len(), 2);
        assert_eq!(streams.recheck(&admitted), 0);
        assert_eq!(keyed.has_ended(), None);

        assert_eq!(
            streams.recheck(&holdings(true, false, false, Some("active"))),
            1
        );
        assert_eq!(keyed.has_ended(), Some(AccessEnded::Revoked("key_revoked")));
        let ended = tokio::time::timeout(std::time::Duration::from_secs(1), keyed.ended());
        assert_eq!(ended.await, Ok(AccessEnded::Revoked("key_revoked")));
        assert_eq!(tokened.has_ended(), None);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), tokened.ended());
        assert!(waiting.await.is_err(), "the JWT's stream goes on");
        // Told once: a later configuration does not end it again.
        assert_eq!(
            streams.recheck(&holdings(true, false, false, Some("active"))),
            0
        );

        drop(keyed);
        assert_eq!(streams.len(), 1, "a stream closed is no longer watched");
        drop(tokened);
        assert!(streams.is_empty());
    }
}
