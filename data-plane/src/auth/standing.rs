//! Whether the callers of the node's open event streams may still read them. A stream (SSE,
//! WebSocket) outlives the request that access control admitted, so the caller's standing
//! (the key or credential presented, its consumer, its subscription to the API) is kept as
//! the stream's [`Grant`] and looked at again in every configuration the node applies that
//! changes consumers, credentials or subscriptions: a key revoked, a consumer disabled or a
//! subscription suspended in the control plane ends the caller's open streams as soon as the
//! node has the change, as it refuses the caller's next request. Expiries move with the
//! configuration too: a key given an `expires_at` (a rotation's grace period) ends its streams
//! then, and a subscription renewed keeps them open past its old end.
//!
//! What is looked at again is the caller's standing, not the route, its plan's scopes or the
//! consumer's own IP lists: those apply to the next request (as a proxied request in flight
//! is not stopped either).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost_types::Timestamp;
use tokio::sync::Notify;

use super::{Identity, has_passed};
use crate::config::holdings::Holdings;

/// What an admission rested on, besides the route's own rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub(super) presented: Presented,
    pub(super) consumer_id: [u8; 16],
    pub(super) api_id: [u8; 16],
    pub(super) subscription_id: [u8; 16],
    /// A JWT's own end (`exp` plus leeway), which no configuration moves: (seconds, nanos).
    pub(super) token_ends: Option<(i64, i32)>,
}

/// The credential the caller proved itself with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    /// An API key, by its SHA-256: keys are held by their hash.
    Key([u8; 32]),
    /// A JWT or client-certificate credential, by what it was found under (its issuer and
    /// subject, its certificate's fingerprint or subject): as access control finds it, so a
    /// credential replaced by an equal one under another id still admits the caller.
    Credential([u8; 32]),
}

/// A caller's access to a stream, in one configuration: when it ends (seconds and nanos
/// since the epoch), or why it is refused.
type Standing = Result<Option<(i64, i32)>, &'static str>;

fn instant(at: Option<Timestamp>) -> Option<(i64, i32)> {
    at.map(|at| (at.seconds, at.nanos))
}

/// The sooner of two ends; `None` is never.
fn sooner(a: Option<(i64, i32)>, b: Option<(i64, i32)>) -> Option<(i64, i32)> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Grant {
    /// The caller's standing in `held`: when its access ends (the earliest of its key's or
    /// credential's `expires_at`, its subscription's and its token's), or the reason access
    /// control would refuse it now.
    pub fn standing_in(&self, held: &Holdings) -> Standing {
        let credential_ends = match self.presented {
            Presented::Key(sha256) => {
                let key = held.api_key(&sha256).ok_or("invalid_key")?;
                if key.consumer_id != self.consumer_id {
                    return Err("invalid_key");
                }
                if key.revoked {
                    return Err("key_revoked");
                }
                if has_passed(key.expires_at()) {
                    return Err("key_expired");
                }
                instant(key.expires_at())
            }
            Presented::Credential(digest) => {
                let credential = held
                    .credential_by_digest(&digest)
                    .ok_or("unknown_credential")?;
                if super::uuid_bytes(&credential.consumer_id) != self.consumer_id {
                    return Err("unknown_credential");
                }
                if credential.revoked {
                    return Err("credential_revoked");
                }
                if has_passed(credential.expires_at) {
                    return Err("credential_expired");
                }
                instant(credential.expires_at)
            }
        };
        match held.consumer(&self.consumer_id) {
            None => return Err("unknown_consumer"),
            Some(consumer) if consumer.disabled => return Err("consumer_disabled"),
            Some(_) => {}
        }
        let subscription = held
            .subscription(&self.consumer_id, &self.api_id)
            // Removed, or replaced by another: the stream was admitted on the one gone.
            .filter(|subscription| subscription.id == self.subscription_id)
            .ok_or("no_subscription")?;
        if subscription.suspended {
            return Err("subscription_suspended");
        }
        if has_passed(subscription.expires_at()) {
            return Err("subscription_expired");
        }
        Ok(sooner(
            sooner(credential_ends, instant(subscription.expires_at())),
            self.token_ends,
        ))
    }

    /// Why `held` would refuse the caller now; `None` while it admits them.
    pub fn refused_by(&self, held: &Holdings) -> Option<&'static str> {
        self.standing_in(held).err()
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
    watched: Arc<Watched>,
}

/// What one stream's watch and the registry share: the caller's standing as last looked at,
/// and a signal that it changed.
#[derive(Debug)]
struct Watched {
    standing: Mutex<Standing>,
    changed: Notify,
}

impl Watched {
    fn standing(&self) -> Standing {
        *self.standing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `now`, and wakes the stream if it differs from what it had.
    fn update(&self, now: Standing) -> bool {
        let mut standing = self.standing.lock().unwrap_or_else(PoisonError::into_inner);
        if *standing == now {
            return false;
        }
        *standing = now;
        drop(standing);
        // A permit is kept if the stream is not waiting: it looks when it next waits.
        self.changed.notify_one();
        true
    }
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
        let grant = identity.grant;
        let mut streams = self.streams();
        let config = now();
        let standing = match &config {
            Some(config) => grant.standing_in(&config.holdings),
            None => Ok(instant(identity.ends)),
        };
        let watched = Arc::new(Watched {
            standing: Mutex::new(standing),
            changed: Notify::new(),
        });
        streams.insert(
            id,
            Open {
                grant,
                watched: watched.clone(),
            },
        );
        drop(streams);
        // Dropped outside the lock: it may be the configuration's last holder.
        drop(config);
        StreamAccess {
            id,
            streams: self.clone(),
            expires: deadline(standing.ok().flatten()),
            seen: standing,
            watched,
        }
    }

    /// Looks at every open stream's grant in `held` (a configuration just applied): ends
    /// those it no longer admits, and moves the end of those whose expiry it moved. Returns
    /// how many it ended.
    pub fn recheck(&self, held: &Holdings) -> usize {
        let mut ended = Vec::new();
        for open in self.streams().values() {
            if open.watched.standing().is_err() {
                continue;
            }
            let now = open.grant.standing_in(held);
            if open.watched.update(now)
                && let Err(reason) = now
            {
                ended.push((open.grant.consumer_id, reason));
            }
        }
        // Logged once the streams can open and close again.
        for (consumer, reason) in &ended {
            tracing::info!(
                consumer = %uuid::Uuid::from_bytes(*consumer),
                reason,
                "event stream ended: its caller is no longer admitted"
            );
        }
        ended.len()
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
    watched: Arc<Watched>,
    /// The standing `expires` was set for.
    seen: Standing,
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How a caller's access to an open stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessEnded {
    /// The credential, token or subscription expired.
    Expired,
    /// The configuration no longer admits the caller; the reason access control would give.
    Revoked(&'static str),
}

impl AccessEnded {
    fn of(reason: &'static str) -> Self {
        // An expiry a configuration moved into the past is an expiry all the same.
        if reason.ends_with("_expired") {
            AccessEnded::Expired
        } else {
            AccessEnded::Revoked(reason)
        }
    }
}

impl StreamAccess {
    /// Resolves when the caller's access ends.
    pub async fn ended(&mut self) -> AccessEnded {
        loop {
            // First, as registering may have found the caller refused already.
            if let Some(ended) = self.looked_at() {
                return ended;
            }
            let StreamAccess {
                watched, expires, ..
            } = self;
            let expired = async {
                match expires {
                    Some(sleep) => sleep.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = watched.changed.notified() => {}
                () = expired => return AccessEnded::Expired,
            }
        }
    }

    /// Whether the caller's access has ended, for loops that do not wait: a configuration
    /// refused the caller, or the end of its access (as the last configuration has it)
    /// passed.
    pub fn has_ended(&mut self) -> Option<AccessEnded> {
        if let Some(ended) = self.looked_at() {
            return Some(ended);
        }
        // By the deadline, not `is_elapsed`: a timer never polled has not elapsed.
        self.expires
            .as_ref()
            .is_some_and(|sleep| sleep.deadline() <= tokio::time::Instant::now())
            .then_some(AccessEnded::Expired)
    }

    /// Takes in the standing the registry last found: how the access ended, if it did, else
    /// its end moved where the configuration has it.
    fn looked_at(&mut self) -> Option<AccessEnded> {
        let now = self.watched.standing();
        if now != self.seen {
            self.seen = now;
            if let Ok(ends) = now {
                self.expires = deadline(ends);
            }
        }
        // Once refused, for good: a configuration that admits the caller again does not
        // reopen a stream that has ended.
        self.seen.err().map(AccessEnded::of)
    }
}

impl Drop for StreamAccess {
    fn drop(&mut self) {
        let mut streams = self.streams.streams();
        streams.remove(&self.id);
        // After a storm of reconnections, the memory back.
        let open = streams.len();
        if streams.capacity() > 1024 && open < streams.capacity() / 4 {
            streams.shrink_to(open * 2);
        }
    }
}

/// `ends` on the runtime's clock, as a timer. `None`: it does not end (or not within any
/// time a clock can hold).
fn deadline(ends: Option<(i64, i32)>) -> Option<Pin<Box<tokio::time::Sleep>>> {
    let (seconds, nanos) = ends?;
    let ends = std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(
        u64::try_from(seconds).ok()?,
        u32::try_from(nanos).unwrap_or(0),
    ))?;
    let left = ends
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let at = tokio::time::Instant::now().checked_add(left)?;
    Some(Box::pin(tokio::time::sleep_until(at)))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use sha2::{Digest, Sha256};
    use sluice_proto::declarative::{self, Format};
    use sluice_proto::pb::ResourceKind;

    use super::*;
    use crate::config::holdings::CredentialIdentity;

    const KEY: &str = "acme-key-0123456789";
    const ISSUER: &str = "https://auth.example.com/";

    /// What acme's standing rests on, as the registry has it.
    struct Registry {
        key_revoked: bool,
        jwt_revoked: bool,
        /// The JWT credential's name, which its id is derived from.
        jwt_name: &'static str,
        disabled: bool,
        /// The subscription's status; `None` leaves it out.
        status: Option<&'static str>,
        key_expires: Option<SystemTime>,
        subscription_expires: Option<SystemTime>,
    }

    impl Default for Registry {
        fn default() -> Self {
            Registry {
                key_revoked: false,
                jwt_revoked: false,
                jwt_name: "service",
                disabled: false,
                status: Some("active"),
                key_expires: None,
                subscription_expires: None,
            }
        }
    }

    fn expires_at(at: Option<SystemTime>) -> String {
        at.map_or(String::new(), |at| {
            format!(", expires_at: \"{}\"", humantime::format_rfc3339_millis(at))
        })
    }

    fn holdings(registry: Registry) -> Holdings {
        let subscription = registry.status.map_or("[]".to_owned(), |status| {
            format!(
                "\n  - {{ consumer: acme, api: orders, plan: basic, status: {status}{} }}",
                expires_at(registry.subscription_expires)
            )
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
    disabled: {}
    credentials:
      - {{ api_key: {{ key: {KEY} }}, revoked: {}{} }}
      - jwt: {{ issuer: "{ISSUER}", subject: acme-service }}
        name: {}
        revoked: {}
apis:
  - name: orders
    policies: [keys]
    routes:
      - {{ name: watch, path: /orders, direct_response: {{ status: 204 }} }}
subscriptions: {subscription}
"#,
            registry.disabled,
            registry.key_revoked,
            expires_at(registry.key_expires),
            registry.jwt_name,
            registry.jwt_revoked,
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
        let jwt = CredentialIdentity::Jwt {
            issuer: ISSUER,
            subject: "acme-service",
        };
        assert!(held.credential(&jwt).is_some());
        let grant = |presented| Grant {
            presented,
            consumer_id,
            api_id,
            subscription_id,
            token_ends: None,
        };
        (
            grant(Presented::Key(Sha256::digest(KEY).into())),
            grant(Presented::Credential(jwt.digest())),
        )
    }

    #[test]
    fn a_grant_holds_until_what_it_rested_on_is_revoked_disabled_suspended_or_gone() {
        let admitted = holdings(Registry::default());
        let (by_key, by_jwt) = grants(&admitted);
        assert_eq!(by_key.standing_in(&admitted), Ok(None));
        assert_eq!(by_jwt.standing_in(&admitted), Ok(None));

        let key_revoked = holdings(Registry {
            key_revoked: true,
            ..Registry::default()
        });
        assert_eq!(by_key.refused_by(&key_revoked), Some("key_revoked"));
        assert_eq!(
            by_jwt.refused_by(&key_revoked),
            None,
            "the other credential"
        );
        let jwt_revoked = holdings(Registry {
            jwt_revoked: true,
            ..Registry::default()
        });
        assert_eq!(by_jwt.refused_by(&jwt_revoked), Some("credential_revoked"));
        assert_eq!(by_key.refused_by(&jwt_revoked), None);
        // Deleted and created again, under another id: the same token is admitted, and so is
        // its stream.
        let recreated = holdings(Registry {
            jwt_name: "service-again",
            ..Registry::default()
        });
        let ids = |held: &Holdings| {
            let jwt = CredentialIdentity::Jwt {
                issuer: ISSUER,
                subject: "acme-service",
            };
            held.credential(&jwt).unwrap().meta.unwrap().id
        };
        assert_ne!(ids(&recreated), ids(&admitted));
        assert_eq!(by_jwt.refused_by(&recreated), None);

        let disabled = holdings(Registry {
            disabled: true,
            ..Registry::default()
        });
        assert_eq!(by_key.refused_by(&disabled), Some("consumer_disabled"));
        assert_eq!(by_jwt.refused_by(&disabled), Some("consumer_disabled"));
        let suspended = holdings(Registry {
            status: Some("suspended"),
            ..Registry::default()
        });
        assert_eq!(
            by_key.refused_by(&suspended),
            Some("subscription_suspended")
        );
        let unsubscribed = holdings(Registry {
            status: None,
            ..Registry::default()
        });
        assert_eq!(by_jwt.refused_by(&unsubscribed), Some("no_subscription"));

        let mut rekeyed = by_key;
        rekeyed.presented = Presented::Key([7; 32]);
        assert_eq!(rekeyed.refused_by(&admitted), Some("invalid_key"));
        let mut elsewhere = by_jwt;
        elsewhere.consumer_id = [9; 16];
        assert_eq!(elsewhere.refused_by(&admitted), Some("unknown_credential"));
    }

    #[test]
    fn a_grant_ends_at_the_soonest_of_its_expiries() {
        let now = SystemTime::now();
        let (soon, later) = (
            now + Duration::from_secs(60),
            now + Duration::from_secs(600),
        );
        let instant = |at: SystemTime| {
            let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap();
            Some((
                since.as_secs() as i64,
                (since.subsec_millis() * 1_000_000) as i32,
            ))
        };
        let held = holdings(Registry {
            key_expires: Some(later),
            subscription_expires: Some(soon),
            ..Registry::default()
        });
        let (by_key, mut by_jwt) = grants(&held);
        assert_eq!(by_key.standing_in(&held), Ok(instant(soon)));
        assert_eq!(by_jwt.standing_in(&held), Ok(instant(soon)));
        by_jwt.token_ends = Some((1, 0));
        assert_eq!(
            by_jwt.standing_in(&held),
            Ok(Some((1, 0))),
            "the token's own"
        );
        let lapsed = holdings(Registry {
            key_expires: Some(now - Duration::from_secs(5)),
            ..Registry::default()
        });
        assert_eq!(by_key.refused_by(&lapsed), Some("key_expired"));
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
        let admitted = holdings(Registry::default());
        let (by_key, by_jwt) = grants(&admitted);
        let streams = Arc::new(OpenStreams::default());
        let mut keyed = streams.watch(&identity(by_key), || None);
        let mut tokened = streams.watch(&identity(by_jwt), || None);
        // A stream already waiting for its end, as an idle one is.
        let mut waiting = streams.watch(&identity(by_key), || None);
        let waiting = tokio::spawn(async move { waiting.ended().await });
        tokio::task::yield_now().await;
        assert_eq!(streams.len(), 3);
        assert_eq!(streams.recheck(&admitted), 0);
        assert_eq!(keyed.has_ended(), None);

        let revoked = holdings(Registry {
            key_revoked: true,
            ..Registry::default()
        });
        assert_eq!(streams.recheck(&revoked), 2);
        let woken = tokio::time::timeout(Duration::from_secs(1), waiting).await;
        assert_eq!(
            woken.expect("woken").unwrap(),
            AccessEnded::Revoked("key_revoked")
        );
        assert_eq!(keyed.has_ended(), Some(AccessEnded::Revoked("key_revoked")));
        let ended = tokio::time::timeout(Duration::from_secs(1), keyed.ended());
        assert_eq!(ended.await, Ok(AccessEnded::Revoked("key_revoked")));
        assert_eq!(tokened.has_ended(), None);
        let waiting = tokio::time::timeout(Duration::from_millis(50), tokened.ended());
        assert!(waiting.await.is_err(), "the JWT's stream goes on");
        // Told once: a later configuration does not end it again.
        assert_eq!(streams.recheck(&revoked), 0);

        drop(keyed);
        assert_eq!(streams.len(), 1, "streams closed are no longer watched");
        drop(tokened);
        assert!(streams.is_empty());
    }

    #[tokio::test]
    async fn an_expiry_a_configuration_moves_moves_the_streams_end() {
        let admitted = holdings(Registry::default());
        let (by_key, _) = grants(&admitted);
        let streams = Arc::new(OpenStreams::default());
        let mut stream = streams.watch(&identity(by_key), || None);
        // A rotation's grace period: the key now expires, shortly.
        let graced = SystemTime::now() + Duration::from_millis(800);
        assert_eq!(
            streams.recheck(&holdings(Registry {
                key_expires: Some(graced),
                ..Registry::default()
            })),
            0
        );
        let ended = tokio::time::timeout(Duration::from_secs(5), stream.ended());
        assert_eq!(ended.await, Ok(AccessEnded::Expired));
        // The registry holds it to the millisecond.
        assert!(
            SystemTime::now() + Duration::from_millis(1) >= graced,
            "not before the new end"
        );

        // A subscription renewed past its old end keeps the stream open past it.
        let mut renewed = streams.watch(&identity(by_key), || None);
        let ending = holdings(Registry {
            subscription_expires: Some(SystemTime::now() + Duration::from_secs(2)),
            ..Registry::default()
        });
        streams.recheck(&ending);
        assert_eq!(renewed.has_ended(), None);
        streams.recheck(&holdings(Registry {
            subscription_expires: Some(SystemTime::now() + Duration::from_secs(3600)),
            ..Registry::default()
        }));
        let waited = tokio::time::timeout(Duration::from_millis(2500), renewed.ended());
        assert!(waited.await.is_err(), "the stream outlives the old end");
    }
}
