//! `Idempotency-Key` on publish routes: a repeat of a request within the TTL gets the first
//! request's answer, and the event is published once, however many copies arrive and on
//! whichever nodes.
//!
//! A key is scoped to its route and consumer. The first request **claims** the key (an atomic
//! `SET NX` in Redis when the node has `--redis-url`, shared by every node; else a table in
//! this node's memory), publishes, and stores its 202 under the key for the TTL. A repeat
//! that finds the answer gets it back with `Idempotency-Replayed: true`; one that finds the
//! claim still pending waits for it (the copies of a retry storm all get the one answer). A
//! publish that fails releases its claim, so the client's retry publishes afresh. The same key
//! with a different request (another body or path) is refused with 422.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::auth::ip::budget_address;
use crate::ratelimit::{RedisLimiter, RedisUnavailable};

/// How long a repeat waits for the first copy's answer before it is told 409.
pub const IN_PROGRESS_WAIT: Duration = Duration::from_secs(10);

/// How long a claim outlives a node that died while publishing, at the least: after this, a
/// retry may publish again. A claim also outlives the longest its publish may take
/// ([`claim_ttl`]), so that it cannot lapse while its request still waits for the broker.
const CLAIM_TTL: Duration = Duration::from_secs(30);

/// Beyond the longest publish, for the answer to be stored.
const CLAIM_MARGIN: Duration = Duration::from_secs(5);

/// How long a claim holds for a publish that takes at most `publish_limit`.
pub fn claim_ttl(publish_limit: Duration) -> Duration {
    CLAIM_TTL.max(publish_limit + CLAIM_MARGIN)
}

/// Pause between looks at a pending claim.
const POLL: Duration = Duration::from_millis(20);

/// Keys kept in a node's memory when it has no Redis; beyond, new keys are refused (503).
pub const MEMORY_KEYS: usize = 100_000;

/// The longest `Idempotency-Key` accepted.
pub const MAX_KEY_LEN: usize = 255;

/// The first request's answer, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub body: String,
}

/// What a request with an `Idempotency-Key` does.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// It is the first: publish, then [`Idempotency::complete`] or [`Idempotency::release`].
    Won,
    /// An earlier copy was answered: answer the same.
    Replay(StoredAnswer),
}

#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error("Idempotency-Key: at most {MAX_KEY_LEN} visible ASCII characters, not empty")]
    BadKey,
    #[error("a request with this Idempotency-Key is still being published; retry later")]
    InProgress,
    #[error("this Idempotency-Key was used for a different request")]
    Mismatch,
    #[error("idempotency keys cannot be checked now: {0}")]
    Unavailable(String),
}

/// Whose keys a request's `Idempotency-Key` is among.
#[derive(Debug, Clone, Copy)]
pub enum KeyOwner {
    /// The authenticated consumer's.
    Consumer(uuid::Uuid),
    /// On a route that authenticates nobody, the client address's (an IPv6 client's /64, as
    /// its rate-limit budgets): strangers never get each other's answers.
    Address(std::net::IpAddr),
}

/// The node's idempotency keys: in Redis when given one, else in memory.
#[derive(Debug)]
pub struct Idempotency {
    ttl: Duration,
    /// Where keys are shared between nodes, when the node has Redis.
    redis: Option<Arc<RedisLimiter>>,
    memory: Mutex<HashMap<String, (String, Instant)>>,
    /// The earliest a key of the memory table expires (as far as the last sweep and the
    /// inserts since know): a full table is swept of expired keys only once one has
    /// expired, not at every request while all are live.
    earliest_expiry: Mutex<Option<Instant>>,
}

impl Idempotency {
    pub fn new(ttl: Duration, redis: Option<Arc<RedisLimiter>>) -> Self {
        Idempotency {
            ttl,
            redis,
            memory: Mutex::new(HashMap::new()),
            earliest_expiry: Mutex::new(None),
        }
    }

    /// The key a request is stored under: its route, who sent it, and the client's key.
    /// Checked first: see [`IdempotencyError::BadKey`].
    pub fn scope(route: &str, owner: KeyOwner, key: &[u8]) -> Result<String, IdempotencyError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN || !key.iter().all(u8::is_ascii_graphic) {
            return Err(IdempotencyError::BadKey);
        }
        let owner = match owner {
            KeyOwner::Consumer(consumer) => consumer.to_string(),
            KeyOwner::Address(address) => format!("ip-{}", budget_address(address)),
        };
        Ok(format!(
            "idem:{route}:{owner}:{}",
            String::from_utf8_lossy(key)
        ))
    }

    /// What the request is, so a reuse of its key for another request is noticed: its path,
    /// the headers that make its event (`headers`, by name), and its body.
    pub fn fingerprint(path: &str, headers: &[(&str, &[u8])], body: &[u8]) -> String {
        let mut hash = Sha256::new();
        // Each part after its length, so that no two requests hash the same parts alike.
        let mut part = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        part(path.as_bytes());
        for (name, value) in headers {
            part(name.as_bytes());
            part(value);
        }
        part(body);
        hex::encode(&hash.finalize()[..16])
    }

    /// The fingerprint earlier builds stored (path and body, without lengths): accepted from
    /// answers they stored, so that a retry across an upgrade, within the key's time to live,
    /// is still answered from the first request.
    pub fn earlier_fingerprint(path: &str, body: &[u8]) -> String {
        let mut hash = Sha256::new();
        hash.update(path.as_bytes());
        hash.update([0]);
        hash.update(body);
        hex::encode(&hash.finalize()[..16])
    }

    /// Claims `scope` for this request, for `ttl` ([`claim_ttl`]), or finds the answer to an
    /// earlier copy (waiting up to [`IN_PROGRESS_WAIT`] while that copy is being published).
    /// `fingerprints`: the request's ([`Self::fingerprint`], kept with the claim) and others it
    /// may have been stored under ([`Self::earlier_fingerprint`]).
    pub async fn claim(
        &self,
        scope: &str,
        fingerprints: &[&str],
        ttl: Duration,
    ) -> Result<Claim, IdempotencyError> {
        let deadline = Instant::now() + IN_PROGRESS_WAIT;
        let pending = format!("p|{}", fingerprints.first().copied().unwrap_or_default());
        let same = |other: &str| fingerprints.contains(&other);
        loop {
            let found = match &self.redis {
                Some(redis) => {
                    let key = redis.key(scope);
                    let claimed: Option<String> = redis
                        .query(
                            ::redis::cmd("SET")
                                .arg(&key)
                                .arg(&pending)
                                .arg("NX")
                                .arg("PX")
                                .arg(millis(ttl)),
                        )
                        .await
                        .map_err(unavailable)?;
                    if claimed.is_some() {
                        return Ok(Claim::Won);
                    }
                    redis
                        .query::<Option<String>>(::redis::cmd("GET").arg(&key))
                        .await
                        .map_err(unavailable)?
                }
                None => {
                    let mut memory = self.lock();
                    let now = Instant::now();
                    match memory.get(scope) {
                        Some((value, expires)) if *expires > now => Some(value.clone()),
                        _ => {
                            // An expired copy of this key is replaced in place.
                            let grows = !memory.contains_key(scope);
                            if grows && memory.len() >= MEMORY_KEYS && self.sweep_due(now) {
                                memory.retain(|_, (_, expires)| *expires > now);
                                *self.earliest() = memory.values().map(|(_, e)| *e).min();
                            }
                            if grows && memory.len() >= MEMORY_KEYS {
                                return Err(IdempotencyError::Unavailable(format!(
                                    "this node holds {MEMORY_KEYS} keys already"
                                )));
                            }
                            self.note_expiry(now + ttl);
                            memory.insert(scope.to_owned(), (pending.clone(), now + ttl));
                            return Ok(Claim::Won);
                        }
                    }
                }
            };
            match found.as_deref().map(parse) {
                // Expired or released between the two looks: claim again.
                None => continue,
                Some(Stored::Pending { fingerprint: other }) => {
                    if !same(&other) {
                        return Err(IdempotencyError::Mismatch);
                    }
                    if Instant::now() >= deadline {
                        return Err(IdempotencyError::InProgress);
                    }
                    tokio::time::sleep(POLL).await;
                }
                Some(Stored::Done {
                    fingerprint: other,
                    answer,
                }) => {
                    if !same(&other) {
                        return Err(IdempotencyError::Mismatch);
                    }
                    return Ok(Claim::Replay(answer));
                }
                Some(Stored::Unreadable) => {
                    return Err(IdempotencyError::Unavailable(
                        "the stored answer is unreadable".into(),
                    ));
                }
            }
        }
    }

    /// Stores the answer of a request that won its claim. A failure to store is logged: the
    /// event is published and the client gets its answer; a repeat may publish again.
    pub async fn complete(&self, scope: &str, fingerprint: &str, answer: &StoredAnswer) {
        let value = format!("d|{fingerprint}|{}|{}", answer.status, answer.body);
        match &self.redis {
            Some(redis) => {
                let stored = redis
                    .query::<()>(
                        ::redis::cmd("SET")
                            .arg(redis.key(scope))
                            .arg(value)
                            .arg("PX")
                            .arg(millis(self.ttl)),
                    )
                    .await;
                if let Err(error) = stored {
                    tracing::warn!(%error, "idempotency: cannot store an answer in Redis");
                }
            }
            None => {
                let expires = Instant::now() + self.ttl;
                self.note_expiry(expires);
                self.lock().insert(scope.to_owned(), (value, expires));
            }
        }
    }

    /// Gives up a claim whose publish failed, so that a retry publishes.
    pub async fn release(&self, scope: &str) {
        match &self.redis {
            Some(redis) => {
                if let Err(error) = redis
                    .query::<()>(::redis::cmd("DEL").arg(redis.key(scope)))
                    .await
                {
                    tracing::warn!(%error, "idempotency: cannot release a claim in Redis");
                }
            }
            None => {
                self.lock().remove(scope);
            }
        }
    }

    /// Whether a sweep of the full table would free anything: some key has expired.
    fn sweep_due(&self, now: Instant) -> bool {
        self.earliest().is_none_or(|at| now >= at)
    }

    fn note_expiry(&self, expires: Instant) {
        let mut earliest = self.earliest();
        if earliest.is_none_or(|at| expires < at) {
            *earliest = Some(expires);
        }
    }

    fn earliest(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.earliest_expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn unavailable(error: RedisUnavailable) -> IdempotencyError {
    IdempotencyError::Unavailable(error.to_string())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

enum Stored {
    Pending {
        fingerprint: String,
    },
    Done {
        fingerprint: String,
        answer: StoredAnswer,
    },
    Unreadable,
}

/// `p|FP` (claimed) or `d|FP|STATUS|BODY` (answered).
fn parse(value: &str) -> Stored {
    let mut parts = value.splitn(4, '|');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("p"), Some(fingerprint), None, None) => Stored::Pending {
            fingerprint: fingerprint.to_owned(),
        },
        (Some("d"), Some(fingerprint), Some(status), Some(body)) => match status.parse() {
            Ok(status) => Stored::Done {
                fingerprint: fingerprint.to_owned(),
                answer: StoredAnswer {
                    status,
                    body: body.to_owned(),
                },
            },
            Err(_) => Stored::Unreadable,
        },
        _ => Stored::Unreadable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anonymous() -> KeyOwner {
        KeyOwner::Address(std::net::Ipv4Addr::LOCALHOST.into())
    }

    #[tokio::test]
    async fn the_first_copy_wins_and_the_others_get_its_answer() {
        let store = Idempotency::new(Duration::from_secs(60), None);
        let scope = Idempotency::scope("r1", anonymous(), b"key-1").unwrap();
        let fp = Idempotency::fingerprint("/orders", &[], b"{}");
        assert_eq!(
            store.claim(&scope, &[&fp], CLAIM_TTL).await.unwrap(),
            Claim::Won
        );
        let answer = StoredAnswer {
            status: 202,
            body: r#"{"offset":7}"#.into(),
        };
        let waiting = async {
            // A concurrent copy waits for the first one's answer.
            store.claim(&scope, &[&fp], CLAIM_TTL).await
        };
        let completing = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            store.complete(&scope, &fp, &answer).await;
        };
        let (repeat, ()) = tokio::join!(waiting, completing);
        assert_eq!(repeat.unwrap(), Claim::Replay(answer.clone()));
        let other = Idempotency::fingerprint("/orders", &[], b"{\"x\":1}");
        assert!(matches!(
            store.claim(&scope, &[&other], CLAIM_TTL).await,
            Err(IdempotencyError::Mismatch)
        ));
    }

    #[tokio::test]
    async fn an_answer_stored_by_an_earlier_build_is_still_replayed() {
        let store = Idempotency::new(Duration::from_secs(60), None);
        let scope = Idempotency::scope("r1", anonymous(), b"key-1").unwrap();
        let earlier = Idempotency::earlier_fingerprint("/orders", b"{}");
        let answer = StoredAnswer {
            status: 202,
            body: r#"{"offset":7}"#.into(),
        };
        // As a build before the headers counted stored it.
        store.claim(&scope, &[&earlier], CLAIM_TTL).await.unwrap();
        store.complete(&scope, &earlier, &answer).await;
        let current = Idempotency::fingerprint("/orders", &[], b"{}");
        assert_ne!(current, earlier);
        assert_eq!(
            store
                .claim(&scope, &[&current, &earlier], CLAIM_TTL)
                .await
                .unwrap(),
            Claim::Replay(answer)
        );
    }

    #[tokio::test]
    async fn a_released_claim_lets_the_retry_publish() {
        let store = Idempotency::new(Duration::from_secs(60), None);
        let scope = Idempotency::scope("r1", KeyOwner::Consumer(uuid::Uuid::nil()), b"k").unwrap();
        assert_eq!(
            store.claim(&scope, &["fp"], CLAIM_TTL).await.unwrap(),
            Claim::Won
        );
        store.release(&scope).await;
        assert_eq!(
            store.claim(&scope, &["fp"], CLAIM_TTL).await.unwrap(),
            Claim::Won
        );
    }

    #[tokio::test]
    async fn a_full_table_takes_new_keys_once_some_have_expired() {
        let store = Idempotency::new(Duration::from_secs(3600), None);
        let later = Instant::now() + Duration::from_secs(3600);
        for i in 1..MEMORY_KEYS {
            store.note_expiry(later);
            store
                .lock()
                .insert(format!("k{i}"), ("p|fp".to_owned(), later));
        }
        // The last one in expires soon.
        let soon = Instant::now() + Duration::from_millis(300);
        store.note_expiry(soon);
        store
            .lock()
            .insert("k0".to_owned(), ("p|fp".to_owned(), soon));
        assert!(matches!(
            store.claim("new", &["fp"], CLAIM_TTL).await,
            Err(IdempotencyError::Unavailable(_))
        ));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(
            store.claim("new", &["fp"], CLAIM_TTL).await.unwrap(),
            Claim::Won
        );
        assert!(matches!(
            store.claim("newer", &["fp"], CLAIM_TTL).await,
            Err(IdempotencyError::Unavailable(_))
        ));
        // A key whose own entry expired is replaced in place, full table or not.
        store.lock().insert(
            "k1".to_owned(),
            ("p|fp".to_owned(), Instant::now() - Duration::from_secs(1)),
        );
        assert_eq!(
            store.claim("k1", &["fp"], CLAIM_TTL).await.unwrap(),
            Claim::Won
        );
    }

    #[test]
    fn keys_are_checked_and_scoped() {
        assert!(Idempotency::scope("r", anonymous(), b"").is_err());
        assert!(Idempotency::scope("r", anonymous(), b"has space").is_err());
        assert!(Idempotency::scope("r", anonymous(), &[b'a'; 256]).is_err());
        assert_ne!(
            Idempotency::scope("r", anonymous(), b"k").unwrap(),
            Idempotency::scope("r", KeyOwner::Consumer(uuid::Uuid::nil()), b"k").unwrap(),
            "each consumer has its own keys"
        );
        let from = |address: &str| {
            Idempotency::scope("r", KeyOwner::Address(address.parse().unwrap()), b"k").unwrap()
        };
        assert_ne!(
            from("203.0.113.7"),
            from("203.0.113.8"),
            "so does each anonymous client"
        );
        assert_eq!(from("::ffff:203.0.113.7"), from("203.0.113.7"));
        assert_eq!(
            from("2001:db8::1"),
            from("2001:db8::2"),
            "an IPv6 client by its /64"
        );
    }

    #[test]
    fn a_stored_body_may_hold_the_separator() {
        assert!(matches!(
            parse("d|ab|202|{\"a\":\"x|y\"}"),
            Stored::Done { answer, .. } if answer.body == "{\"a\":\"x|y\"}"
        ));
        assert!(matches!(parse("garbage"), Stored::Unreadable));
    }
}
