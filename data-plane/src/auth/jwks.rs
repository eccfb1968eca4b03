//! JWKS documents: fetched, cached and refreshed per URL.
//!
//! A [`JwksCache`] lives as long as the node and hands out one [`JwksSource`] per JWKS URL.
//! Compiled configs hold their sources strongly and the cache holds them weakly, so a config
//! swap that keeps naming a URL reuses its source (and its keys) without a refetch, and a
//! source no config names any more is dropped together with its refresh task.
//!
//! A remote source fetches at most one document at a time (single flight): its first fetch,
//! its scheduled refreshes and refetches for an unknown `kid` all join the fetch in flight
//! rather than starting another. Refetches for an unknown `kid` are also rate-limited per
//! source, so tokens naming made-up key ids cannot turn into one fetch per request. A fetch
//! that fails (no answer in time, non-2xx, too large, not a JWKS) keeps the last good keys.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::{Request, Uri, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};

use crate::tls::client::{Alpn, Connector, connector};

/// How long one JWKS fetch may take, from connecting to the last byte of the body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWKS document accepted. Real ones are a few KiB.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How often a remote JWKS is refetched when its issuer does not say (`jwks_refresh_s: 0`).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5 * 60);
/// The least time between two refetches of one source caused by tokens naming an unknown
/// `kid`. Within it, such tokens are judged against the keys already held.
pub const UNKNOWN_KID_COOLDOWN: Duration = Duration::from_secs(10);
/// How long an idle connection to a JWKS server is kept for the next fetch.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP client every remote source of one cache fetches with.
type JwksClient = Client<Connector, Empty<Bytes>>;

/// The time bounds of fetching; tests shorten them.
#[derive(Debug, Clone, Copy)]
struct Timings {
    fetch_timeout: Duration,
    unknown_kid_cooldown: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            fetch_timeout: FETCH_TIMEOUT,
            unknown_kid_cooldown: UNKNOWN_KID_COOLDOWN,
        }
    }
}

/// Node-wide: one source per JWKS URL, shared by every config that names it, so a config
/// swap never refetches.
///
/// Cloning is cheap and every clone shares the same sources.
#[derive(Clone, Debug)]
pub struct JwksCache {
    shared: Arc<CacheShared>,
}

#[derive(Debug)]
struct CacheShared {
    /// Configs are compiled on a plain thread: background fetches are spawned here.
    runtime: Handle,
    timings: Timings,
    /// Built on the first remote source, since it reads the system's CA certificates.
    client: OnceLock<Result<JwksClient, String>>,
    /// Weak: a source lives as long as some config holds it, not as long as the cache.
    sources: Mutex<HashMap<Box<str>, Weak<JwksSource>>>,
}

impl JwksCache {
    /// An empty cache whose background fetches and refresh tasks run on `runtime`.
    pub fn new(runtime: Handle) -> Self {
        Self::build(runtime, Timings::default())
    }

    /// A cache whose fetches are bounded by shorter times, so tests need not wait seconds.
    #[cfg(test)]
    fn with_timings(runtime: Handle, timings: Timings) -> Self {
        Self::build(runtime, timings)
    }

    fn build(runtime: Handle, timings: Timings) -> Self {
        JwksCache {
            shared: Arc::new(CacheShared {
                runtime,
                timings,
                client: OnceLock::new(),
                sources: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The source for the JWKS at `url`: the one already held by a live config if there is
    /// one, else a new source whose first fetch starts at once in the background.
    ///
    /// `refresh` is how often the document is refetched (`Duration::ZERO`: every
    /// [`DEFAULT_REFRESH`]); for a source that already exists it replaces the interval once
    /// the current wait ends, so the config compiled last decides.
    pub fn remote(&self, url: &str, refresh: Duration) -> Result<Arc<JwksSource>, String> {
        let refresh = if refresh.is_zero() {
            DEFAULT_REFRESH
        } else {
            refresh
        };
        let mut sources = lock(&self.shared.sources);
        sources.retain(|_, source| source.strong_count() > 0);
        if let Some(source) = sources.get(url).and_then(Weak::upgrade) {
            if let Some(remote) = &source.state.remote {
                remote.set_refresh(refresh);
            }
            return Ok(source);
        }
        let uri = jwks_uri(url)?;
        let client = self.client()?;
        let source = JwksSource::start_remote(url, uri, client, refresh, &self.shared);
        sources.insert(url.into(), Arc::downgrade(&source));
        Ok(source)
    }

    /// A source for a JWKS given as JSON in the config. It never fetches.
    ///
    /// Fails when `json` is not a JWKS or none of its keys can verify a signature; keys that
    /// cannot be used are skipped with a warning.
    pub fn inline(json: &str) -> Result<Arc<JwksSource>, String> {
        let keys = parse_jwks(json.as_bytes(), "inline JWKS", Origin::Inline)?;
        Ok(Arc::new(JwksSource {
            state: Arc::new(SourceState {
                origin: "inline JWKS".into(),
                keys: ArcSwap::from_pointee(keys),
                remote: None,
            }),
            _stop_refresh: None,
        }))
    }

    fn client(&self) -> Result<JwksClient, String> {
        self.shared
            .client
            .get_or_init(|| {
                let mut tcp = HttpConnector::new();
                tcp.set_connect_timeout(Some(self.shared.timings.fetch_timeout));
                tcp.set_nodelay(true);
                // The TLS connector wrapping it takes https URIs.
                tcp.enforce_http(false);
                let connector = connector(tcp, None, Alpn::Any)
                    .map_err(|e| format!("TLS client for JWKS fetches: {e}"))?;
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                    .pool_max_idle_per_host(1)
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new());
                Ok(builder.build(connector))
            })
            .clone()
    }
}

/// The keys of one JWKS document, as configured inline or as last fetched from a URL.
///
/// A remote source starts without keys ([`KeySet::is_loaded`] is false) and keeps its last
/// good key set when a later fetch fails.
pub struct JwksSource {
    state: Arc<SourceState>,
    /// Dropped with the source, which ends its refresh task at once.
    _stop_refresh: Option<oneshot::Sender<()>>,
}

struct SourceState {
    /// The URL, or "inline JWKS": what logs name.
    origin: Box<str>,
    keys: ArcSwap<KeySet>,
    /// `None` for an inline JWKS.
    remote: Option<Remote>,
}

/// What a source fetched from a URL needs to fetch again.
struct Remote {
    uri: Uri,
    client: JwksClient,
    runtime: Handle,
    timings: Timings,
    refresh_ms: AtomicU64,
    fetches: AtomicU64,
    gate: Mutex<FetchGate>,
}

/// Decides whether a fetch may start; held only briefly, never across an await.
#[derive(Debug, Default)]
struct FetchGate {
    /// Turns `true` when the fetch in flight has ended (kept or not).
    in_flight: Option<watch::Receiver<bool>>,
    /// When the last refetch for an unknown `kid` started: the cooldown counts from here.
    last_unknown_kid_fetch: Option<Instant>,
}

/// Why a fetch is wanted; only refetches for an unknown `kid` are rate-limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FetchCause {
    First,
    Scheduled,
    UnknownKid,
}

impl JwksSource {
    fn start_remote(
        url: &str,
        uri: Uri,
        client: JwksClient,
        refresh: Duration,
        cache: &CacheShared,
    ) -> Arc<Self> {
        let state = Arc::new(SourceState {
            origin: url.into(),
            keys: ArcSwap::from_pointee(KeySet::not_loaded()),
            remote: Some(Remote {
                uri,
                client,
                runtime: cache.runtime.clone(),
                timings: cache.timings,
                refresh_ms: AtomicU64::new(duration_ms(refresh)),
                fetches: AtomicU64::new(0),
                gate: Mutex::new(FetchGate::default()),
            }),
        });
        state.join_or_start_fetch(FetchCause::First);
        let (stop_refresh, stopped) = oneshot::channel();
        cache
            .runtime
            .spawn(refresh_periodically(Arc::downgrade(&state), stopped));
        Arc::new(JwksSource {
            state,
            _stop_refresh: Some(stop_refresh),
        })
    }

    /// The keys held now, without waiting for anything.
    pub fn keys(&self) -> Arc<KeySet> {
        self.state.keys.load_full()
    }

    /// The keys held now; before a remote source's first fetch has ended, waits for it
    /// (at most the fetch timeout). Never starts a fetch.
    pub async fn loaded_keys(&self) -> Arc<KeySet> {
        self.wait_until_loaded().await.keys
    }

    /// [`JwksSource::loaded_keys`], and whether this call waited for a fetch to get them.
    pub async fn wait_until_loaded(&self) -> Loaded {
        let keys = self.keys();
        let held = Loaded {
            keys,
            waited: false,
        };
        if held.keys.is_loaded() {
            return held;
        }
        let Some(remote) = &self.state.remote else {
            return held;
        };
        let in_flight = lock(&remote.gate).in_flight.clone();
        match in_flight {
            Some(done) => {
                remote.wait_for_fetch(done).await;
                Loaded {
                    keys: self.keys(),
                    waited: true,
                }
            }
            None => held,
        }
    }

    /// For a token naming a `kid` these keys do not have: refetches the document and returns
    /// the keys then held.
    ///
    /// Concurrent callers share one fetch, and at most one such refetch starts per cooldown
    /// ([`UNKNOWN_KID_COOLDOWN`]); within it callers get the current keys at once. Waits at
    /// most the fetch timeout. An inline source returns its keys at once.
    pub async fn refetch_for_unknown_kid(&self) -> Arc<KeySet> {
        if let Some(remote) = &self.state.remote
            && let Some(done) = self.state.join_or_start_fetch(FetchCause::UnknownKid)
        {
            remote.wait_for_fetch(done).await;
        }
        self.keys()
    }

    /// How many fetches this source has started (0 for an inline source).
    pub fn fetches(&self) -> u64 {
        self.state
            .remote
            .as_ref()
            .map_or(0, |remote| remote.fetches.load(Ordering::Relaxed))
    }

    /// The URL fetched, or "inline JWKS".
    pub fn origin(&self) -> &str {
        &self.state.origin
    }
}

/// What [`JwksSource::wait_until_loaded`] found.
#[derive(Debug)]
pub struct Loaded {
    pub keys: Arc<KeySet>,
    /// The call waited for a fetch in flight (which may have failed).
    pub waited: bool,
}

impl fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwksSource")
            .field("origin", &self.state.origin)
            .field("keys", &self.state.keys.load().len())
            .field("fetches", &self.fetches())
            .finish()
    }
}

impl SourceState {
    /// Joins the fetch in flight, or starts one if `cause` allows. Returns what turns `true`
    /// when that fetch ends; `None` when no fetch is in flight and none may start.
    fn join_or_start_fetch(self: &Arc<Self>, cause: FetchCause) -> Option<watch::Receiver<bool>> {
        let remote = self.remote.as_ref()?;
        let mut gate = lock(&remote.gate);
        if let Some(done) = &gate.in_flight {
            return Some(done.clone());
        }
        if cause == FetchCause::UnknownKid {
            let cooling = gate
                .last_unknown_kid_fetch
                .is_some_and(|at| at.elapsed() < remote.timings.unknown_kid_cooldown);
            if cooling {
                return None;
            }
            gate.last_unknown_kid_fetch = Some(Instant::now());
        }
        let (done_sender, done) = watch::channel(false);
        gate.in_flight = Some(done.clone());
        drop(gate);
        // Built before spawning: if the task never runs, dropping it still clears the gate.
        let flight = Flight {
            state: Arc::clone(self),
            done: done_sender,
        };
        remote
            .runtime
            .spawn(async move { flight.fetch_and_keep().await });
        Some(done)
    }
}

/// One fetch in flight. Dropping it (done, failed, panicked or cancelled) lets the next
/// fetch start and wakes everyone waiting for this one.
struct Flight {
    state: Arc<SourceState>,
    done: watch::Sender<bool>,
}

impl Flight {
    async fn fetch_and_keep(&self) {
        let Some(remote) = &self.state.remote else {
            return;
        };
        remote.fetches.fetch_add(1, Ordering::Relaxed);
        let origin = &*self.state.origin;
        match remote.fetch(origin).await {
            Ok(keys) => {
                tracing::debug!(url = origin, keys = keys.len(), "JWKS fetched");
                self.state.keys.store(Arc::new(keys));
            }
            Err(problem) => {
                tracing::warn!(
                    url = origin,
                    problem = %problem,
                    "JWKS fetch failed; keeping the last good keys"
                );
            }
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if let Some(remote) = &self.state.remote {
            lock(&remote.gate).in_flight = None;
        }
        self.done.send_replace(true);
    }
}

impl Remote {
    fn set_refresh(&self, refresh: Duration) {
        self.refresh_ms
            .store(duration_ms(refresh), Ordering::Relaxed);
    }

    fn refresh(&self) -> Duration {
        Duration::from_millis(self.refresh_ms.load(Ordering::Relaxed))
    }

    /// Waits until the fetch behind `done` has ended, at most the fetch timeout.
    async fn wait_for_fetch(&self, mut done: watch::Receiver<bool>) {
        let ended = done.wait_for(|ended| *ended);
        // An error only means the fetch is gone: the keys held are the answer either way.
        let _ = tokio::time::timeout(self.timings.fetch_timeout, ended).await;
    }

    /// Fetches and parses the document once, bounded by the fetch timeout and size limit.
    async fn fetch(&self, origin: &str) -> Result<KeySet, String> {
        let request = Request::get(self.uri.clone())
            .header(header::ACCEPT, "application/jwk-set+json, application/json")
            .header(header::USER_AGENT, "sluice-data-plane")
            .body(Empty::new())
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("answered HTTP {status}"));
            }
            let declared = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
            if declared.is_some_and(|length| length > MAX_JWKS_BYTES as u64) {
                return Err(format!(
                    "body of {} bytes exceeds the limit of {MAX_JWKS_BYTES} bytes",
                    declared.unwrap_or_default()
                ));
            }
            let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<LengthLimitError>() {
                        format!("body exceeds the limit of {MAX_JWKS_BYTES} bytes")
                    } else {
                        format!("reading the body failed: {}", error_chain(&*e))
                    }
                })?;
            Ok(body.to_bytes())
        };
        let body = tokio::time::timeout(self.timings.fetch_timeout, exchange)
            .await
            .map_err(|_| {
                format!(
                    "no complete answer within {} ms",
                    self.timings.fetch_timeout.as_millis()
                )
            })??;
        parse_jwks(&body, origin, Origin::Url)
    }
}

/// Refetches every refresh interval until the source is dropped. Holds the source weakly,
/// so it never keeps it alive; the dropped `stop` sender ends it without waiting out a
/// sleep.
async fn refresh_periodically(state: Weak<SourceState>, mut stop: oneshot::Receiver<()>) {
    loop {
        let Some(refresh) = state
            .upgrade()
            .and_then(|state| Some(state.remote.as_ref()?.refresh()))
        else {
            return;
        };
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep(refresh) => {}
        }
        let Some(state) = state.upgrade() else {
            return;
        };
        if let (Some(remote), Some(done)) = (
            &state.remote,
            state.join_or_start_fetch(FetchCause::Scheduled),
        ) {
            remote.wait_for_fetch(done).await;
        }
    }
}

/// The usable keys of one JWKS document.
#[derive(Debug)]
pub struct KeySet {
    keys: Vec<VerificationKey>,
    loaded: bool,
}

impl KeySet {
    /// What a remote source holds before its first successful fetch.
    fn not_loaded() -> Self {
        KeySet {
            keys: Vec::new(),
            loaded: false,
        }
    }

    /// False only before a remote source's first successful fetch.
    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    /// How many usable keys the set has.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set has no usable key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every key, in document order.
    pub fn iter(&self) -> impl Iterator<Item = &VerificationKey> {
        self.keys.iter()
    }

    /// The keys whose `kid` is `kid` (usually one; a JWKS may reuse a kid across key types).
    pub fn with_kid<'s>(&'s self, kid: &str) -> impl Iterator<Item = &'s VerificationKey> {
        self.keys.iter().filter(move |key| key.kid() == Some(kid))
    }
}

/// One JWK that can verify signatures, parsed once when its document is read.
#[derive(Debug)]
pub struct VerificationKey {
    kid: Option<Box<str>>,
    family: KeyFamily,
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl VerificationKey {
    /// The JWK's `kid`, if it has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The kind of key, which decides the algorithms it can verify.
    pub fn family(&self) -> KeyFamily {
        self.family
    }

    /// The JWK's own `alg`, if it names one: then tokens must use exactly that.
    pub fn alg(&self) -> Option<Algorithm> {
        self.alg
    }

    /// The key as `jsonwebtoken` verifies with it.
    pub fn decoding_key(&self) -> &DecodingKey {
        &self.key
    }

    /// Whether this key may verify a token signed with `alg`: its family fits `alg` and its
    /// own `alg`, if any, is `alg`.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        self.family.fits(alg) && self.alg.is_none_or(|own| own == alg)
    }
}

/// The kind of a verification key (JWK `kty` and curve). An algorithm only ever runs with
/// keys of its own kind, so an RSA public key can never be used as an HMAC secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFamily {
    /// `kty: "oct"`: HS256, HS384, HS512.
    Hmac,
    /// `kty: "RSA"`: RS256/384/512, PS256/384/512.
    Rsa,
    /// `kty: "EC"`, `crv: "P-256"`: ES256.
    EcP256,
    /// `kty: "EC"`, `crv: "P-384"`: ES384.
    EcP384,
    /// `kty: "OKP"`, `crv: "Ed25519"`: EdDSA.
    Ed25519,
}

impl KeyFamily {
    /// Whether keys of this kind verify `alg`.
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyFamily::Hmac => matches!(alg, HS256 | HS384 | HS512),
            KeyFamily::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyFamily::EcP256 => alg == ES256,
            KeyFamily::EcP384 => alg == ES384,
            KeyFamily::Ed25519 => alg == EdDSA,
        }
    }

    /// How logs name the kind.
    pub fn name(self) -> &'static str {
        match self {
            KeyFamily::Hmac => "oct",
            KeyFamily::Rsa => "RSA",
            KeyFamily::EcP256 => "EC P-256",
            KeyFamily::EcP384 => "EC P-384",
            KeyFamily::Ed25519 => "OKP Ed25519",
        }
    }
}

impl fmt::Display for KeyFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A JWKS document's outer shape; each key is parsed on its own so one bad key does not
/// cost the others.
#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<serde_json::Value>,
}

/// Where a JWKS document came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The configuration itself.
    Inline,
    /// A `jwks_url`: it may hold only public keys. A shared secret (`oct`) served at a URL is
    /// no secret, and one served by whoever sits on the path of a plain-http fetch would let
    /// them sign tokens.
    Url,
}

/// Parses a JWKS document. Keys that cannot verify signatures (encryption keys, unsupported
/// types or curves, malformed values, shared secrets from a URL) are skipped with a warning
/// naming `source`; a document left with no usable key is an error, so a broken document
/// never replaces good keys.
fn parse_jwks(document: &[u8], source: &str, origin: Origin) -> Result<KeySet, String> {
    let document: JwksDocument = serde_json::from_slice(document)
        .map_err(|e| format!("not a JWKS (an object with a \"keys\" array): {e}"))?;
    let total = document.keys.len();
    let mut keys = Vec::with_capacity(total);
    for (index, value) in document.keys.into_iter().enumerate() {
        let kid = value
            .get("kid")
            .and_then(|kid| kid.as_str())
            .map(str::to_owned);
        let parsed = serde_json::from_value::<Jwk>(value)
            .map_err(|e| format!("not a JWK: {e}"))
            .and_then(|jwk| verification_key(&jwk))
            .and_then(|key| match key {
                Some(key) if key.family == KeyFamily::Hmac && origin == Origin::Url => Err(
                    "an oct key (a shared secret) is taken only from an inline jwks, never a URL"
                        .into(),
                ),
                key => Ok(key),
            });
        match parsed {
            Ok(Some(key)) => keys.push(key),
            Ok(None) => {
                tracing::debug!(source, index, kid, "JWKS key is not for signatures");
            }
            Err(problem) => {
                tracing::warn!(source, index, kid, problem = %problem, "JWKS key skipped");
            }
        }
    }
    if keys.is_empty() {
        return Err(format!("none of its {total} keys can verify signatures"));
    }
    Ok(KeySet { keys, loaded: true })
}

/// The verification key of one JWK; `None` for a key meant for something else than
/// verifying signatures.
fn verification_key(jwk: &Jwk) -> Result<Option<VerificationKey>, String> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Ok(None);
    }
    if let Some(operations) = &jwk.common.key_operations
        && !operations.contains(&KeyOperations::Verify)
    {
        return Ok(None);
    }
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(alg) => match Algorithm::try_from(alg) {
            Ok(alg) => Some(alg),
            // An encryption algorithm (RSA-OAEP, ...): not a signing key.
            Err(_) => return Ok(None),
        },
    };
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
        AlgorithmParameters::OctetKey(_) => KeyFamily::Hmac,
        AlgorithmParameters::EllipticCurve(params) => match params.curve {
            EllipticCurve::P256 => KeyFamily::EcP256,
            EllipticCurve::P384 => KeyFamily::EcP384,
            ref curve => return Err(format!("EC curve {curve:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(params) => match params.curve {
            EllipticCurve::Ed25519 => KeyFamily::Ed25519,
            ref curve => return Err(format!("OKP curve {curve:?} is not supported")),
        },
        AlgorithmParameters::Other(params) => {
            let kty = params.fields.get("kty").map(ToString::to_string);
            return Err(format!(
                "kty {} is not one of RSA, EC, OKP, oct, or the key lacks members its kty needs",
                kty.as_deref().unwrap_or("(absent)")
            ));
        }
        _ => return Err("the key's kind is not supported".into()),
    };
    if let Some(alg) = alg
        && !family.fits(alg)
    {
        return Err(format!("alg {alg:?} does not fit a {family} key"));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key material: {e}"))?;
    // Lengths that would only fail at verification time, token after token.
    let expected_length = match family {
        KeyFamily::EcP256 => Some(65),
        KeyFamily::EcP384 => Some(97),
        KeyFamily::Ed25519 => Some(32),
        KeyFamily::Hmac | KeyFamily::Rsa => None,
    };
    let bytes = key.try_get_as_bytes().map(<[u8]>::len).unwrap_or_default();
    if expected_length.is_some_and(|expected| bytes != expected) {
        return Err(format!(
            "{family} key has {bytes} bytes of key material, which is wrong"
        ));
    }
    if family == KeyFamily::Hmac && bytes == 0 {
        return Err("oct key has an empty k".into());
    }
    Ok(Some(VerificationKey {
        kid: jwk.common.key_id.as_deref().map(Box::from),
        family,
        alg,
        key,
    }))
}

/// The request URI for a JWKS URL, which must be absolute http(s).
fn jwks_uri(url: &str) -> Result<Uri, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{url:?} is not an http(s) URL"));
    }
    parsed
        .as_str()
        .parse::<Uri>()
        .map_err(|e| format!("{url:?} is not a usable URI: {e}"))
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// An error and its sources, since the HTTP client's own message says little
/// ("client error (Connect)").
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section is a plain assignment).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Test keys, a JWKS server and short timings, shared with the JWT tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, AtomicU16};

    use http_body_util::combinators::BoxBody;
    use http_body_util::{Full, StreamBody};
    use hyper::Response;
    use hyper::body::{Frame, Incoming};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::{Value, json};
    use tokio::net::TcpListener;

    use super::*;

    // Generated once with `openssl genrsa -traditional 2048`, `openssl rsa -pubout`,
    // `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` and
    // `openssl genpkey -algorithm ed25519`. Test keys only.
    pub const RSA_PRIVATE_PEM: &str = "\
-----BEGIN RSA PRIVATE KEY-----\n\
MIIEowIBAAKCAQEAwKJFdMr+I27ZZhQkYg0TGtl0uhUNj1orclqqe+I0bLu/1aVv\n\
rkimfbMuHD1QlpiILKblthwMymRMSeP/QeFLseOJ87w8EckOe9SQ5Do00lOrCytu\n\
FOE/N3ngti98CsAvYx0bQ7z0QyYymTY7L94R1uSB6704YhaQI3QNU8zlux2uoEnV\n\
8i/fXG3uWyACy9OYva+XTE0HI+rX44MlWiAcmKC9THs92mZRLNND1WAsvBp+ayqS\n\
npVfKlM9grGNObqgeW/cfStMSeiy0gNU+WTcMvw0oxVoTg3slSTQZ8SySi2PcOLu\n\
6GJ7s47VRRlUbp0UUYLGydv7A3C3rPWvYSaA0wIDAQABAoIBAD3mhyIyLrstHi/m\n\
rhBR+j8o/JDlPf/ALnDnQJxhgo4kQM9DA6HCF7oRz3HkpBZYen26vdsopVWOKFOg\n\
L8C4SG4n24cWiEkAziYtlse4CoxBtZd3w75y6TEG+ZYhqR79Rdz4F/BK8kT3q8++\n\
9QL7PclLkZIyskEW1geGfdfdYj8fimJ7YvuQ/h1EA6lyMZNa2TWJ2g/t948I42ID\n\
x3NWqH1fQUPwjbanmrlGwhMywYr1dQX232cZAZVnkFcLZxQ3KTjgmRZRuoF+RyhW\n\
b0O74Ivo+/BgB5yKHRmiwzMi6/598pEgZzfOMtK0AsjeOvHlOQyrEJpjtwYgu1u5\n\
NHpBb+0CgYEA4u7Cx43yMvWYwBtQLV98LQ4Tg0k4X3as6rYcwSpaJdKBV7kTBpKJ\n\
dWI/a4QLNO0cKIIuiNkheLWIelNHGNhRHa6czYDiPmMLlIPek4RFLlMH25WpU0kc\n\
m17UIYNzSVUJbMKr1pE738OyzenrqWuvam6zl/FiP6IEu5hrfRLr440CgYEA2U7V\n\
43aN5R5c7AFkcm+f4coPevInLlEi4umqIZtJOIgX7/hKzwKCOYJ8g2b6T7sFaR4a\n\
ASDzyqmbtBYLEh8yAEpsJV8waPprWrN7Mi2pq8x5XGvebyAEeTPWRh7H7gMzR/r8\n\
rNFZsXwWYkjm0BFNBCbk1F/4CMFwcKasPjy5rd8CgYAMFMv31b28KskMCSg2kivJ\n\
NkOhrKc8pdPE1xcmzXtpIhDSu76gjfKVdjqMHcZ+9dSW739Mt8qJY5i1cnOJhhKj\n\
cuVUJ3Vj/t/h8zdJQTRxp+f2L7yI+45zUxQWCKp9j/JlgOOnE6pNWlzNi5OJPHtl\n\
Pil/gFFLs/NujUnDqds3DQKBgCvr0TM+PQO4FVPmHCU9BnWeX26cDus/nut6Ctbs\n\
CeqRJzVrW8NnYGa7RutQHvuKc1eBrAPaYyvtB/loEyjAgVyprh4HlUNCifw1FotX\n\
y1lb5JOXgce4Eu9kWMSnaAVlRDIiOnu7fINw7x1CWtRnCsfyDIIYO4uZfV5ncZzK\n\
rUTFAoGBAIaXUiURVYmJG9d0wma4XAfaOtjyPpLZMKds18DST//UTL7ONx5brWiW\n\
RZD/3RkNIX8kOi7V9MYLJwb0PqZXwj001t9bWxfljgHG+eGCf/IpkUphUC5XRyz1\n\
AOkGOTcvSXuigRbs1VyHSHtMmz9THzR4IUnHo0XP7v2Z6NR3/kBL\n\
-----END RSA PRIVATE KEY-----\n\
";

    pub const RSA_PUBLIC_PEM: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAwKJFdMr+I27ZZhQkYg0T\n\
Gtl0uhUNj1orclqqe+I0bLu/1aVvrkimfbMuHD1QlpiILKblthwMymRMSeP/QeFL\n\
seOJ87w8EckOe9SQ5Do00lOrCytuFOE/N3ngti98CsAvYx0bQ7z0QyYymTY7L94R\n\
1uSB6704YhaQI3QNU8zlux2uoEnV8i/fXG3uWyACy9OYva+XTE0HI+rX44MlWiAc\n\
mKC9THs92mZRLNND1WAsvBp+ayqSnpVfKlM9grGNObqgeW/cfStMSeiy0gNU+WTc\n\
Mvw0oxVoTg3slSTQZ8SySi2PcOLu6GJ7s47VRRlUbp0UUYLGydv7A3C3rPWvYSaA\n\
0wIDAQAB\n\
-----END PUBLIC KEY-----\n\
";

    pub const RSA2_PRIVATE_PEM: &str = "\
-----BEGIN RSA PRIVATE KEY-----\n\
MIIEpAIBAAKCAQEAtvMqYQUraFC2RPlU6Y8Hm5Zj0g6erFRg1tP89HuWGXWGWPCF\n\
fX/E5G1Xl8gKBISgCtWNH8NY5YSdC7YshZ7jBIeTYuPi8An5xGAuBeh3kLeNPWxG\n\
wYdsS+XMDs5lu69HA+MLdcfrz1LytlDPzDyix+5mKtH2hRD6KFU3FuOxsRHYhQn5\n\
UWkp2mcAWCnrEuX4cWH/rAwV4Zrn/xf9ErNp8SHKDdc9/FOvs2PJDlvwq9emDQ0u\n\
ZoqYpDepZQqGqX+Y5HKNOFNQlp+bbwpzGoyjpVy+9QYRABiqApcsVxFRYZtbN79J\n\
uIv5Yq9AbFQTDTYrRlg3D0VeNoDCWhvjUDYwlQIDAQABAoIBABF6KeSCVqr8uOje\n\
a8zzH74ukAMnZ+OdHPIw5rOhYc21UzwIYCxEyjWrN2i10LUtSU+3pmdwJTwp3snZ\n\
YafzLYtHe15BWHLndQ+cQ5FHa7KswkapoxnGWuNmRMfuUjwriqx1omjiTCXubeba\n\
UfuYGFHitapmC/eaz1cOivh6EIXSfYCVIkBVe5YoRLIGYiIc+KVTc5p0+FdEyLua\n\
cUBQ3rY7N4l6FDIgC5usnmvG3YoX30sfJDIjUmr/NJKTX0crD31lZG72VuJWXazm\n\
t1CcniBtV1aF1gyp1YK/fRotY3bUleqqNTg3nCCeKkRUBH9Fm1lFr1YVA0+O2FWY\n\
RdnFRbECgYEA/VaNdRBNCKv1V6MSQiexN3HSo0v62ZOdYre+rpBgj+xR/evJV5+K\n\
nbq1h/jJJUgwy8+wHuy/NzFVgwydQl9UtlmMQb886LaaDvNiGUYgOW8XSZQ8He88\n\
YoAeC4C+wXGeNZB7BkWZJhaCmRFgothEdwMqrss9R7P2rPDcAlnFu8UCgYEAuN9H\n\
DMlIif8RqpOKCs8MnC937xdU8mhBvrZ9cukn/OddJFrTKj29hQFpXIklhjx+SMuf\n\
EFftRqHuoOaU/z7wj0CJTFkMrig+OKiUUPv00sPaZgT0KkRVyT0vhdPw6XTY+vRO\n\
0/THu+jaB9hOmUdkMLcOzJy0/okTSxdsxyD63pECgYEAvRGuivJ6e4FSnnAuvT7A\n\
TP/e005uTZmUeUtmvQM1fdRCMP6bCpEgM61Xs73h6Lgi6sj6yWmpH7jq994fM5zQ\n\
LTNRsPPXslotSgEscm5auGKHf7toznJwn5a8VZtlQhvYlmNY3YptzPY5y6EjfQVo\n\
u2Waok8+UdgmvlUX7Y0wPH0CgYAjcQqZ9OynJ/MnFGnecJsmRiNj/sEWR85y1WFv\n\
ait0XJaKpa7d5kAzA3ZDezdqaKZ9Jiw0YebnJ5wr1Iiz9kj/7Ytky52WtbhX/FmS\n\
vPrOfSWdcU2t3LPlhIlbyqng17nRQozqLX8tExLZdip7UChw/mcj6tb4BSdhuffs\n\
pPHzQQKBgQCWVCDLwvH5n2R9U4oNTTWbv+Un6aZcuwRqhl2BbAi8ulxG/XbD9wOm\n\
CnLXHGGyBn5pyRrQFDYEcrNzeTeOnkE3LPmt3rdcu7mRYGRa6wqXUoTVd7V9ODpQ\n\
7Iw1qpOUUJov3I3fEZQXLW9voDvcadbphaCC3QAAzseXnCj156sCAg==\n\
-----END RSA PRIVATE KEY-----\n\
";

    pub const EC_PRIVATE_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgqQvWLPbx0H3fMn3z\n\
U1RX3rAP3p45mF41UUGneTAWZ2ShRANCAATMNJURmxDLvoF2v7rMgmOszR9/Acly\n\
YZVG87dgtLUWwbNik8RcH3AYxzpZLIktMz6ARRscjTqMqsAC/goNr0DX\n\
-----END PRIVATE KEY-----\n\
";

    pub const ED_PRIVATE_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MC4CAQAwBQYDK2VwBCIEIAcGLtYRvtuKeOQB9qcaw8Z6s4hVhZas2ptIZA90VXSE\n\
-----END PRIVATE KEY-----\n\
";
    /// A private key with the `kid` and algorithm its tokens are signed with.
    pub struct TestKey {
        pub kid: String,
        pub alg: Algorithm,
        encoding: EncodingKey,
    }

    impl TestKey {
        /// RS256 with the first RSA key.
        pub fn rsa(kid: &str) -> Self {
            let encoding = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
            Self::new(kid, Algorithm::RS256, encoding)
        }

        /// RS256 with the second RSA key.
        pub fn rsa2(kid: &str) -> Self {
            let encoding = EncodingKey::from_rsa_pem(RSA2_PRIVATE_PEM.as_bytes()).unwrap();
            Self::new(kid, Algorithm::RS256, encoding)
        }

        /// ES256 with the P-256 key.
        pub fn ec(kid: &str) -> Self {
            let encoding = EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).unwrap();
            Self::new(kid, Algorithm::ES256, encoding)
        }

        /// EdDSA with the Ed25519 key.
        pub fn ed(kid: &str) -> Self {
            let encoding = EncodingKey::from_ed_pem(ED_PRIVATE_PEM.as_bytes()).unwrap();
            Self::new(kid, Algorithm::EdDSA, encoding)
        }

        /// HS256 with `secret`.
        pub fn hmac(kid: &str, secret: &[u8]) -> Self {
            Self::new(kid, Algorithm::HS256, EncodingKey::from_secret(secret))
        }

        fn new(kid: &str, alg: Algorithm, encoding: EncodingKey) -> Self {
            TestKey {
                kid: kid.into(),
                alg,
                encoding,
            }
        }

        /// The same key signing with another algorithm of its family (RS384, PS256, ...).
        pub fn signing_with(mut self, alg: Algorithm) -> Self {
            self.alg = alg;
            self
        }

        /// The public JWK, with `kid` and `alg`.
        pub fn jwk(&self) -> Value {
            let mut jwk =
                Jwk::from_encoding_key(&self.encoding, self.alg).expect("a JWK for the test key");
            jwk.common.key_id = Some(self.kid.clone());
            serde_json::to_value(jwk).unwrap()
        }

        /// The public JWK, with `kid` and without `alg`.
        pub fn jwk_without_alg(&self) -> Value {
            let mut jwk = self.jwk();
            jwk.as_object_mut().unwrap().remove("alg");
            jwk
        }

        /// A token with this key's `kid`.
        pub fn sign(&self, claims: &Value) -> String {
            let header = Header {
                kid: Some(self.kid.clone()),
                ..Header::new(self.alg)
            };
            jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
        }

        /// A token whose header names no `kid`.
        pub fn sign_without_kid(&self, claims: &Value) -> String {
            jsonwebtoken::encode(&Header::new(self.alg), claims, &self.encoding).unwrap()
        }
    }

    /// A JWKS document of `keys`.
    pub fn jwks(keys: &[Value]) -> String {
        json!({ "keys": keys }).to_string()
    }

    /// A cache whose fetches time out after `fetch_timeout` and whose unknown-kid refetches
    /// cool down for `cooldown`, running on the test's runtime.
    pub fn test_cache(fetch_timeout: Duration, cooldown: Duration) -> JwksCache {
        JwksCache::with_timings(
            Handle::current(),
            Timings {
                fetch_timeout,
                unknown_kid_cooldown: cooldown,
            },
        )
    }

    /// `future`'s output, failing the test (rather than hanging it) after 5 s.
    pub async fn bounded<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), future)
            .await
            .expect("still waiting after 5 s: the wait is not bounded")
    }

    /// Waits until `condition` holds, failing the test after `limit`.
    pub async fn eventually(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A JWKS server on 127.0.0.1 that counts requests and can change its answer, answer
    /// slowly or not at all.
    pub struct JwksServer {
        pub url: String,
        state: Arc<ServerState>,
    }

    #[derive(Default)]
    struct ServerState {
        document: Mutex<String>,
        status: AtomicU16,
        stall: AtomicBool,
        chunked: AtomicBool,
        delay_ms: AtomicU64,
        requests: AtomicU64,
    }

    impl JwksServer {
        /// Serves `document` with 200 on a port of its own.
        pub async fn start(document: String) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
            let state = Arc::new(ServerState {
                document: Mutex::new(document),
                status: AtomicU16::new(200),
                ..ServerState::default()
            });
            let serving = Arc::clone(&state);
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let state = Arc::clone(&serving);
                    tokio::spawn(async move {
                        let service =
                            service_fn(move |_: Request<Incoming>| answer(Arc::clone(&state)));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            JwksServer { url, state }
        }

        /// Requests received so far (counted on arrival, so stalled ones count).
        pub fn requests(&self) -> u64 {
            self.state.requests.load(Ordering::SeqCst)
        }

        /// Serves `document` from now on.
        pub fn serve(&self, document: String) {
            *lock(&self.state.document) = document;
        }

        /// Answers with `status` from now on.
        pub fn answer_status(&self, status: u16) {
            self.state.status.store(status, Ordering::SeqCst);
        }

        /// Never answers from now on (or answers again).
        pub fn stall(&self, stall: bool) {
            self.state.stall.store(stall, Ordering::SeqCst);
        }

        /// Sends the body in chunks without a Content-Length from now on.
        pub fn chunked(&self, chunked: bool) {
            self.state.chunked.store(chunked, Ordering::SeqCst);
        }

        /// Answers after `delay` from now on.
        pub fn delay(&self, delay: Duration) {
            self.state
                .delay_ms
                .store(duration_ms(delay), Ordering::SeqCst);
        }
    }

    async fn answer(
        state: Arc<ServerState>,
    ) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
        state.requests.fetch_add(1, Ordering::SeqCst);
        if state.stall.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let delay = state.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let document = Bytes::from(lock(&state.document).clone());
        let body = if state.chunked.load(Ordering::SeqCst) {
            let half = document.len() / 2;
            let frames: Vec<Result<_, Infallible>> = vec![
                Ok(Frame::data(document.slice(..half))),
                Ok(Frame::data(document.slice(half..))),
            ];
            BodyExt::boxed(StreamBody::new(tokio_stream::iter(frames)))
        } else {
            BodyExt::boxed(Full::new(document))
        };
        let response = Response::builder()
            .status(state.status.load(Ordering::SeqCst))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap();
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tokio::task::JoinSet;

    use super::test_support::*;
    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    fn kids(keys: &KeySet) -> Vec<&str> {
        keys.iter().filter_map(VerificationKey::kid).collect()
    }

    #[tokio::test]
    async fn first_fetch_starts_at_once_and_loaded_keys_waits_for_it() {
        let server = JwksServer::start(jwks(&[TestKey::rsa("k1").jwk()])).await;
        server.delay(Duration::from_millis(200));
        let cache = test_cache(Duration::from_secs(2), LONG);
        let source = cache.remote(&server.url, LONG).unwrap();
        assert!(!source.keys().is_loaded(), "no keys before the first fetch");

        let keys = source.loaded_keys().await;
        assert!(keys.is_loaded());
        assert_eq!(kids(&keys), ["k1"]);
        assert_eq!(keys.iter().next().unwrap().family(), KeyFamily::Rsa);
        assert_eq!(keys.iter().next().unwrap().alg(), Some(Algorithm::RS256));
        assert_eq!(server.requests(), 1);
        assert_eq!(source.fetches(), 1);
    }

    #[tokio::test]
    async fn loaded_keys_waits_no_longer_than_the_fetch_timeout() {
        let server = JwksServer::start(jwks(&[TestKey::rsa("k1").jwk()])).await;
        server.stall(true);
        let cache = test_cache(Duration::from_millis(300), LONG);
        let source = cache.remote(&server.url, LONG).unwrap();

        let started = Instant::now();
        let keys = bounded(source.loaded_keys()).await;
        let waited = started.elapsed();
        assert!(!keys.is_loaded());
        assert!(waited >= Duration::from_millis(200), "waited {waited:?}");
        assert!(waited < Duration::from_millis(800), "waited {waited:?}");
    }

    #[tokio::test]
    async fn one_source_per_url_while_a_config_holds_it() {
        let server = JwksServer::start(jwks(&[TestKey::rsa("k1").jwk()])).await;
        let cache = test_cache(Duration::from_secs(2), LONG);
        let first = cache.remote(&server.url, LONG).unwrap();
        first.loaded_keys().await;
        let second = cache.remote(&server.url, Duration::ZERO).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert!(
            second.keys().is_loaded(),
            "the shared source keeps its keys"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            server.requests(),
            1,
            "a second config naming the URL does not refetch"
        );

        drop((first, second));
        let third = cache.remote(&server.url, LONG).unwrap();
        third.loaded_keys().await;
        assert_eq!(
            server.requests(),
            2,
            "a source no config held is fetched anew"
        );
    }

    #[tokio::test]
    async fn scheduled_refresh_picks_up_a_rotated_key() {
        let server = JwksServer::start(jwks(&[TestKey::rsa("k1").jwk()])).await;
        let cache = test_cache(Duration::from_secs(2), LONG);
        let source = cache
            .remote(&server.url, Duration::from_millis(150))
            .unwrap();
        let keys = source.loaded_keys().await;
        assert_eq!(kids(&keys), ["k1"]);

        server.serve(jwks(&[TestKey::rsa("k1").jwk(), TestKey::rsa2("k2").jwk()]));
        eventually("the refresh brings k2", Duration::from_secs(3), || {
            source.keys().with_kid("k2").count() == 1
        })
        .await;
        assert!(source.fetches() >= 2);
    }

    #[tokio::test]
    async fn refresh_task_ends_when_no_config_holds_the_source() {
        let server = JwksServer::start(jwks(&[TestKey::rsa("k1").jwk()])).await;
        let cache = test_cache(Duration::from_secs(2), LONG);
        let source = cache
            .remote(&server.url, Duration::from_millis(50))
            .unwrap();
        eventually("refreshes run", Duration::from_secs(3), || {
            server.requests() >= 3
        })
        .await;

        drop(source);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let requests = server.requests();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            server.requests(),
            requests,
            "no refresh after the source is dropped"
        );
    }

    #[tokio::test]
    async fn failed_fetches_keep_the_last_good_keys() {
        let first = jwks(&[TestKey::rsa("k1").jwk()]);
        // Each failure serves a document that would bring k2 if it were taken.
        let rotated = jwks(&[TestKey::rsa("k1").jwk(), TestKey::rsa2("k2").jwk()]);
        let oversized = json!({
            "keys": [TestKey::rsa("k1").jwk(), TestKey::rsa2("k2").jwk()],
            "padding": "x".repeat(MAX_JWKS_BYTES),
        })
        .to_string();
        let server = JwksServer::start(first).await;
        let cache = test_cache(Duration::from_secs(2), LONG);
        let source = cache
            .remote(&server.url, Duration::from_millis(50))
            .unwrap();
        let keys = source.loaded_keys().await;
        assert_eq!(kids(&keys), ["k1"]);

        let failures: [(&str, &dyn Fn()); 4] = [
            ("HTTP 500", &|| {
                server.serve(rotated.clone());
                server.answer_status(500);
            }),
            ("not JSON", &|| {
                server.answer_status(200);
                server.serve("<html>maintenance</html>".into());
            }),
            ("too large, declared", &|| server.serve(oversized.clone())),
            ("too large, chunked", &|| server.chunked(true)),
        ];
        for (failure, apply) in failures {
            apply();
            let requests = server.requests();
            // Two more requests: the first of them has ended by the time the second starts.
            eventually(failure, Duration::from_secs(3), || {
                server.requests() >= requests + 2
            })
            .await;
            let keys = source.keys();
            assert!(keys.is_loaded(), "{failure}");
            assert_eq!(kids(&keys), ["k1"], "{failure}");
        }

        server.chunked(false);
        server.serve(rotated);
        eventually(
            "a good document is taken again",
            Duration::from_secs(3),
            || source.keys().len() == 2,
        )
        .await;
    }

    #[tokio::test]
    async fn unknown_kid_refetch_is_single_flight_and_cooled_down() {
        let server = JwksServer::start(jwks(&[TestKey::rsa("k1").jwk()])).await;
        let cache = test_cache(Duration::from_secs(2), Duration::from_millis(800));
        let source = cache.remote(&server.url, LONG).unwrap();
        source.loaded_keys().await;
        assert_eq!(server.requests(), 1);

        server.serve(jwks(&[TestKey::rsa("k1").jwk(), TestKey::rsa2("k2").jwk()]));
        server.delay(Duration::from_millis(200));
        let mut callers = JoinSet::new();
        for _ in 0..16 {
            let source = Arc::clone(&source);
            callers.spawn(async move { source.refetch_for_unknown_kid().await.len() });
        }
        while let Some(keys) = callers.join_next().await {
            assert_eq!(keys.unwrap(), 2, "every caller sees the refetched keys");
        }
        assert_eq!(server.requests(), 2, "16 concurrent callers, one fetch");

        server.serve(jwks(&[
            TestKey::rsa("k1").jwk(),
            TestKey::rsa2("k2").jwk(),
            TestKey::ec("k3").jwk(),
        ]));
        let started = Instant::now();
        let keys = source.refetch_for_unknown_kid().await;
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "within the cooldown: at once"
        );
        assert_eq!(keys.len(), 2);
        assert_eq!(server.requests(), 2, "no fetch within the cooldown");

        tokio::time::sleep(Duration::from_millis(800)).await;
        let keys = source.refetch_for_unknown_kid().await;
        assert_eq!(keys.len(), 3, "after the cooldown a refetch runs again");
        assert_eq!(server.requests(), 3);
    }

    #[tokio::test]
    async fn a_stalled_server_delays_a_refetch_no_longer_than_the_fetch_timeout() {
        let server = JwksServer::start(jwks(&[TestKey::rsa("k1").jwk()])).await;
        let cache = test_cache(Duration::from_millis(300), LONG);
        let source = cache.remote(&server.url, LONG).unwrap();
        source.loaded_keys().await;
        server.stall(true);

        let started = Instant::now();
        let keys = bounded(source.refetch_for_unknown_kid()).await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200),
            "it waited for the fetch: {waited:?}"
        );
        assert!(waited < Duration::from_millis(800), "bounded: {waited:?}");
        assert_eq!(kids(&keys), ["k1"]);
        assert_eq!(server.requests(), 2);
    }

    #[tokio::test]
    async fn inline_source_never_fetches() {
        let source = JwksCache::inline(&jwks(&[TestKey::ec("e1").jwk()])).unwrap();
        let keys = source.keys();
        assert!(keys.is_loaded());
        assert!(Arc::ptr_eq(&keys, &source.refetch_for_unknown_kid().await));
        assert!(Arc::ptr_eq(&keys, &source.loaded_keys().await));
        assert_eq!(source.fetches(), 0);
        assert_eq!(source.origin(), "inline JWKS");
    }

    #[test]
    fn unusable_keys_are_skipped_and_a_document_without_usable_ones_is_refused() {
        let rsa = TestKey::rsa("any").jwk_without_alg();
        let with = |changes: serde_json::Value| {
            let mut jwk = rsa.clone();
            for (name, value) in changes.as_object().unwrap() {
                jwk[name] = value.clone();
            }
            jwk
        };
        let document = json!({ "keys": [
            { "kty": "RSA", "kid": "no-modulus", "e": "AQAB" },
            { "kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA" },
            { "kty": "EC", "kid": "short-point", "crv": "P-256", "x": "AA", "y": "AA" },
            { "kty": "OKP", "kid": "short-ed", "crv": "Ed25519", "x": "AA" },
            { "kty": "oct", "kid": "empty-secret", "k": "" },
            { "kty": "dunno", "kid": "unknown-kty" },
            "not an object",
            with(json!({ "kid": "encryption", "use": "enc" })),
            with(json!({ "kid": "oaep", "alg": "RSA-OAEP" })),
            with(json!({ "kid": "wrapping", "key_ops": ["wrapKey"] })),
            with(json!({ "kid": "alg-of-another-family", "alg": "ES256" })),
            with(json!({ "kid": "good", "key_ops": ["verify"] })),
            TestKey::ed("ed").jwk(),
        ]});
        let source = JwksCache::inline(&document.to_string()).unwrap();
        assert_eq!(kids(&source.keys()), ["good", "ed"]);

        for refused in [
            r#"{"keys": [{"kty": "dunno"}]}"#,
            r#"{"keys": []}"#,
            r#"{"no-keys": []}"#,
            "[]",
            "not json",
        ] {
            let error = JwksCache::inline(refused).unwrap_err();
            assert!(!error.is_empty(), "{refused}");
        }
    }

    #[test]
    fn key_families_fit_only_their_algorithms() {
        use Algorithm::*;
        let all = [
            HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
        ];
        let fitting = |family: KeyFamily| {
            all.iter()
                .copied()
                .filter(|alg| family.fits(*alg))
                .collect::<Vec<_>>()
        };
        assert_eq!(fitting(KeyFamily::Hmac), [HS256, HS384, HS512]);
        assert_eq!(
            fitting(KeyFamily::Rsa),
            [RS256, RS384, RS512, PS256, PS384, PS512]
        );
        assert_eq!(fitting(KeyFamily::EcP256), [ES256]);
        assert_eq!(fitting(KeyFamily::EcP384), [ES384]);
        assert_eq!(fitting(KeyFamily::Ed25519), [EdDSA]);
    }

    #[test]
    fn shared_secrets_are_taken_inline_but_never_from_a_url() {
        let secret = json!({ "kty": "oct", "kid": "secret", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ" });
        let document = json!({ "keys": [secret, TestKey::ed("ed").jwk()] }).to_string();
        let inline = parse_jwks(document.as_bytes(), "inline", Origin::Inline).unwrap();
        assert_eq!(kids(&inline), ["secret", "ed"]);
        let fetched = parse_jwks(document.as_bytes(), "a URL", Origin::Url).unwrap();
        assert_eq!(kids(&fetched), ["ed"]);
        let only_secret = json!({ "keys": [secret] }).to_string();
        assert!(parse_jwks(only_secret.as_bytes(), "a URL", Origin::Url).is_err());
    }

    #[tokio::test]
    async fn remote_refuses_what_is_not_an_http_url() {
        let cache = JwksCache::new(Handle::current());
        for url in ["not a url", "ftp://keys.example/jwks.json", "/jwks.json"] {
            let error = cache.remote(url, LONG).unwrap_err();
            assert!(error.contains(url), "{error}");
        }
    }
}
