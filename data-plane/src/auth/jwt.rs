//! JWT bearer tokens: verification against an issuer's keys.
//!
//! A [`JwtAuthenticator`] is compiled from one [`pb::JwtPolicy`] when the config is compiled;
//! [`JwtAuthenticator::verify`] then judges one compact JWS token per request, in this order:
//!
//! 1. **Shape**: three base64url parts, a JSON header with `alg`, a JSON object of claims.
//! 2. **Issuer**: chosen by the (not yet verified) `iss` claim, compared exactly. Everything
//!    after this uses that issuer's settings and keys only, so one issuer's keys never vouch
//!    for another issuer's tokens.
//! 3. **Algorithm**: the header's `alg` must be in the issuer's allow-list. `none` is never in
//!    it, and an allow-list never mixes HMAC with public-key algorithms.
//! 4. **Key**: by `kid`; a token without `kid` uses the issuer's one key that fits its `alg`.
//!    The key's kind must fit the algorithm (an RSA key never verifies an HS256 token, which
//!    is what stops an RSA public key being used as an HMAC secret), and a JWK that names an
//!    `alg` only verifies that one. An unknown `kid` may refetch the issuer's JWKS (single
//!    flight, rate-limited: see [`super::jwks`]).
//! 5. **Signature**, then **claims**: `exp` (required), `nbf` (when present), both with the
//!    issuer's leeway; `aud` when the issuer lists audiences; the consumer claim. Claims are
//!    judged only after the signature, so a forged token is always `bad_signature` and its
//!    claims never decide anything.
//!
//! Header fields that point at other keys (`jku`, `jwk`, `x5u`, `x5c`) are ignored: keys
//! come from the config only. A header with `crit` is refused, since no extension is
//! implemented.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value};
use sluice_proto::pb;

use super::jwks::{JwksCache, JwksSource, KeySet, VerificationKey};

/// The longest token accepted. Tokens of real issuers are a few KiB even with many claims;
/// the bound keeps decoding work per request small.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// How much of a value taken from a token a rejection's detail quotes.
const QUOTE_CHARS: usize = 64;

/// Why a token was refused: a small fixed set of snake_case codes, used as metric label
/// values and in access logs.
pub mod reason {
    /// Not a compact JWS with a JSON header and a JSON object of claims, or a claim of the
    /// wrong type.
    pub const MALFORMED_TOKEN: &str = "malformed_token";
    /// `iss` names no configured issuer.
    pub const UNKNOWN_ISSUER: &str = "unknown_issuer";
    /// The header's `alg` is not allowed for the issuer, or not the one its key is for.
    pub const ALGORITHM_NOT_ALLOWED: &str = "algorithm_not_allowed";
    /// No key of the issuer fits the token's `kid` and `alg`.
    pub const UNKNOWN_KEY: &str = "unknown_key";
    /// The signature does not verify with the chosen key.
    pub const BAD_SIGNATURE: &str = "bad_signature";
    /// `exp` has passed (beyond the leeway).
    pub const TOKEN_EXPIRED: &str = "token_expired";
    /// `nbf` is still ahead (beyond the leeway).
    pub const TOKEN_NOT_YET_VALID: &str = "token_not_yet_valid";
    /// `aud` names none of the issuer's audiences.
    pub const BAD_AUDIENCE: &str = "bad_audience";
    /// A required claim (`iss`, `exp`, `aud` when audiences are set, the consumer claim) is
    /// absent.
    pub const MISSING_CLAIM: &str = "missing_claim";
    /// The issuer's remote JWKS has never been fetched successfully.
    pub const KEYS_UNAVAILABLE: &str = "keys_unavailable";

    /// What a client is told for `reason`: the reason in words, nothing of the node's
    /// configuration (issuers, key ids, algorithms, the JWKS's address), which a
    /// [`JwtRejection`](super::JwtRejection)'s detail names for the log.
    pub fn told(reason: &str) -> &'static str {
        match reason {
            MALFORMED_TOKEN => "the bearer token is not a well-formed JWT",
            UNKNOWN_ISSUER => "the token's issuer is not trusted here",
            ALGORITHM_NOT_ALLOWED => "the token's signing algorithm is not accepted",
            UNKNOWN_KEY => "the token's signing key is not known",
            BAD_SIGNATURE => "the token's signature does not verify",
            TOKEN_EXPIRED => "the token has expired",
            TOKEN_NOT_YET_VALID => "the token is not valid yet",
            BAD_AUDIENCE => "the token is not meant for this API",
            MISSING_CLAIM => "the token lacks a required claim",
            KEYS_UNAVAILABLE => "the issuer's signing keys cannot be fetched; try again later",
            _ => "the bearer token is refused",
        }
    }

    /// Every reason, for pre-registering metric series.
    pub const ALL: [&str; 10] = [
        MALFORMED_TOKEN,
        UNKNOWN_ISSUER,
        ALGORITHM_NOT_ALLOWED,
        UNKNOWN_KEY,
        BAD_SIGNATURE,
        TOKEN_EXPIRED,
        TOKEN_NOT_YET_VALID,
        BAD_AUDIENCE,
        MISSING_CLAIM,
        KEYS_UNAVAILABLE,
    ];
}

/// A refused token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct JwtRejection {
    /// One of [`reason::ALL`].
    pub reason: &'static str,
    /// What exactly is wrong, for logs. It may quote (truncated) values from the token and
    /// names issuers and key ids: never send it to the client.
    pub detail: String,
}

impl JwtRejection {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        JwtRejection {
            reason,
            detail: detail.into(),
        }
    }
}

/// What a verified token says about its caller.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// The issuer whose keys verified the token (its `iss`).
    pub issuer: Arc<str>,
    /// The value of the issuer's consumer claim (`sub` unless configured otherwise); a
    /// numeric claim is given in its decimal form.
    pub subject: String,
    /// From `scope` (space-separated) or else `scp` (an array, or a space-separated string).
    pub scopes: Vec<String>,
    /// Every claim of the token.
    pub claims: Map<String, Value>,
    /// Unix seconds from which the token is refused (`exp` plus the issuer's leeway).
    pub refused_from: u64,
}

/// Verifies bearer tokens against the issuers of one JWT policy.
#[derive(Debug)]
pub struct JwtAuthenticator {
    issuers: HashMap<Box<str>, Issuer>,
}

/// One configured issuer, compiled.
#[derive(Debug)]
struct Issuer {
    name: Arc<str>,
    /// Empty: `aud` is not checked.
    audiences: Box<[Box<str>]>,
    algorithms: Box<[Algorithm]>,
    keys: Arc<JwksSource>,
    leeway_s: u64,
    consumer_claim: Box<str>,
}

impl JwtAuthenticator {
    /// Compiles a policy. Remote JWKS come from `jwks`, so a URL a running config already
    /// uses keeps its keys; the first fetch of a new URL starts in the background.
    ///
    /// Errors name the field that is wrong, e.g. `issuers[1].algorithms[0]: ...`.
    pub fn compile(policy: &pb::JwtPolicy, jwks: &JwksCache) -> Result<Self, String> {
        if policy.issuers.is_empty() {
            return Err("issuers: must list at least one issuer".into());
        }
        let mut issuers = HashMap::with_capacity(policy.issuers.len());
        for (i, config) in policy.issuers.iter().enumerate() {
            if issuers.contains_key(config.issuer.as_str()) {
                return Err(format!(
                    "issuers[{i}].issuer: {:?} is listed twice",
                    config.issuer
                ));
            }
            let issuer = Issuer::compile(config, jwks).map_err(|e| format!("issuers[{i}].{e}"))?;
            issuers.insert(Box::from(config.issuer.as_str()), issuer);
        }
        Ok(JwtAuthenticator { issuers })
    }

    /// Verifies a compact JWS token (without the `Bearer ` prefix).
    ///
    /// CPU work only, except when the issuer's keys must be fetched: before a remote JWKS's
    /// first fetch has ended, or for a `kid` the keys do not have. A request waits for one
    /// of these at most, bounded by the JWKS fetch timeout, and tokens naming unknown `kid`s
    /// refetch at most once per cooldown per JWKS.
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, JwtRejection> {
        let parts = TokenParts::split(token)?;
        let header_json = decode_base64url(parts.header)
            .ok_or_else(|| malformed("the header is not base64url"))?;
        let header: JoseHeader<'_> = serde_json::from_slice(&header_json)
            .map_err(|e| malformed(format!("the header is not a JOSE header: {e}")))?;
        if header.crit.is_some() {
            return Err(malformed(
                "the header's crit names extensions that are not implemented",
            ));
        }
        let payload_json = decode_base64url(parts.payload)
            .ok_or_else(|| malformed("the payload is not base64url"))?;
        let claims: Map<String, Value> = serde_json::from_slice(&payload_json)
            .map_err(|e| malformed(format!("the payload is not a JSON object: {e}")))?;

        let issuer = self.issuer_of(&claims)?;
        let alg = issuer.allowed_algorithm(&header.alg)?;
        let kid = header.kid.as_deref();
        let loaded = issuer.keys.wait_until_loaded().await;
        let held = loaded.keys;
        let refetched;
        let key = match choose_key(&held, kid, alg) {
            Ok(key) => key,
            // A request that has just waited for a fetch (the first, which may have failed)
            // does not wait for another: one request waits for at most one fetch.
            Err(KeyMiss::Absent) if !loaded.waited => {
                refetched = issuer.keys.refetch_for_unknown_kid().await;
                choose_key(&refetched, kid, alg)
                    .map_err(|miss| issuer.key_rejection(miss, kid, &refetched))?
            }
            Err(miss) => return Err(issuer.key_rejection(miss, kid, &held)),
        };
        check_signature(&parts, key, alg)?;

        let refused_from = issuer.check_times(&claims, unix_now())?;
        issuer.check_audience(&claims)?;
        let subject = issuer.subject(&claims)?;
        let scopes = scopes(&claims);
        Ok(VerifiedToken {
            issuer: Arc::clone(&issuer.name),
            subject,
            scopes,
            claims,
            refused_from,
        })
    }

    fn issuer_of(&self, claims: &Map<String, Value>) -> Result<&Issuer, JwtRejection> {
        match claims.get("iss") {
            Some(Value::String(iss)) => self.issuers.get(iss.as_str()).ok_or_else(|| {
                JwtRejection::new(
                    reason::UNKNOWN_ISSUER,
                    format!("iss {} is not a configured issuer", quoted(iss)),
                )
            }),
            Some(_) => Err(malformed("iss is not a string")),
            None => Err(JwtRejection::new(
                reason::MISSING_CLAIM,
                "the token has no iss claim",
            )),
        }
    }
}

impl Issuer {
    /// Errors start with the field's name relative to the issuer, e.g. `algorithms[0]: ...`.
    fn compile(config: &pb::JwtIssuer, jwks: &JwksCache) -> Result<Self, String> {
        use pb::jwt_issuer::Keys;
        if config.issuer.is_empty() {
            return Err("issuer: must not be empty".into());
        }
        if config.algorithms.is_empty() {
            return Err("algorithms: must list the allowed algorithms".into());
        }
        let algorithms = config
            .algorithms
            .iter()
            .enumerate()
            .map(|(j, name)| {
                name.parse::<Algorithm>()
                    .map_err(|_| format!("algorithms[{j}]: {name:?} is not a supported algorithm"))
            })
            .collect::<Result<Box<[_]>, _>>()?;
        // Validated where the config is written too; checked again because mixing them is
        // exactly the key confusion this module must never allow.
        let hmac = algorithms
            .iter()
            .filter(|alg| alg.family() == AlgorithmFamily::Hmac)
            .count();
        if hmac > 0 && hmac < algorithms.len() {
            return Err(
                "algorithms: mixes HMAC (HS*) with public-key algorithms, which allows key \
                 confusion; use separate issuers"
                    .into(),
            );
        }
        let keys = match &config.keys {
            Some(Keys::JwksUrl(_)) if hmac > 0 => {
                return Err(
                    "jwks_url: HMAC (HS*) secrets are not taken from a URL; give them in an \
                     inline jwks"
                        .into(),
                );
            }
            Some(Keys::JwksUrl(url)) => jwks
                .remote(url, Duration::from_secs(config.jwks_refresh_s))
                .map_err(|e| format!("jwks_url: {e}"))?,
            Some(Keys::JwksJson(json)) => {
                JwksCache::inline(json).map_err(|e| format!("jwks_json: {e}"))?
            }
            None => return Err("keys: needs one of jwks_url, jwks_json".into()),
        };
        let consumer_claim = match config.consumer_claim.as_str() {
            "" => "sub",
            claim => claim,
        };
        Ok(Issuer {
            name: config.issuer.as_str().into(),
            audiences: config
                .audiences
                .iter()
                .map(|aud| aud.as_str().into())
                .collect(),
            algorithms,
            keys,
            leeway_s: config.leeway_s,
            consumer_claim: consumer_claim.into(),
        })
    }

    fn allowed_algorithm(&self, alg: &str) -> Result<Algorithm, JwtRejection> {
        alg.parse::<Algorithm>()
            .ok()
            .filter(|alg| self.algorithms.contains(alg))
            .ok_or_else(|| {
                JwtRejection::new(
                    reason::ALGORITHM_NOT_ALLOWED,
                    format!(
                        "alg {} is not allowed for issuer {}",
                        quoted(alg),
                        self.name
                    ),
                )
            })
    }

    /// The rejection for a key that could not be chosen, even after any refetch.
    fn key_rejection(&self, miss: KeyMiss, kid: Option<&str>, keys: &KeySet) -> JwtRejection {
        match miss {
            KeyMiss::Refused(rejection) => rejection,
            KeyMiss::Absent if !keys.is_loaded() => JwtRejection::new(
                reason::KEYS_UNAVAILABLE,
                format!(
                    "the JWKS at {} of issuer {} has not been fetched successfully",
                    self.keys.origin(),
                    self.name
                ),
            ),
            KeyMiss::Absent => JwtRejection::new(
                reason::UNKNOWN_KEY,
                format!(
                    "no key {} in the JWKS of issuer {}",
                    quoted(kid.unwrap_or_default()),
                    self.name
                ),
            ),
        }
    }

    /// Checks `exp` and `nbf` against `now`; answers when the token stops being accepted.
    fn check_times(&self, claims: &Map<String, Value>, now: u64) -> Result<u64, JwtRejection> {
        let exp = numeric_date(claims, "exp")?.ok_or_else(|| {
            JwtRejection::new(reason::MISSING_CLAIM, "the token has no exp claim")
        })?;
        if now >= exp.saturating_add(self.leeway_s) {
            return Err(JwtRejection::new(
                reason::TOKEN_EXPIRED,
                format!(
                    "expired {} s ago (exp {exp}, leeway {} s)",
                    now - exp,
                    self.leeway_s
                ),
            ));
        }
        if let Some(nbf) = numeric_date(claims, "nbf")?
            && now.saturating_add(self.leeway_s) < nbf
        {
            return Err(JwtRejection::new(
                reason::TOKEN_NOT_YET_VALID,
                format!(
                    "valid only in {} s (nbf {nbf}, leeway {} s)",
                    nbf - now,
                    self.leeway_s
                ),
            ));
        }
        Ok(exp.saturating_add(self.leeway_s))
    }

    fn check_audience(&self, claims: &Map<String, Value>) -> Result<(), JwtRejection> {
        if self.audiences.is_empty() {
            return Ok(());
        }
        let accepted = |aud: &str| self.audiences.iter().any(|ours| **ours == *aud);
        let aud = match claims.get("aud") {
            None => {
                return Err(JwtRejection::new(
                    reason::MISSING_CLAIM,
                    format!(
                        "the token has no aud claim, and issuer {} requires one",
                        self.name
                    ),
                ));
            }
            Some(Value::String(aud)) if accepted(aud) => return Ok(()),
            Some(Value::Array(auds)) if auds.iter().filter_map(Value::as_str).any(accepted) => {
                return Ok(());
            }
            Some(aud @ (Value::String(_) | Value::Array(_))) => aud,
            Some(_) => return Err(malformed("aud is not a string or an array of strings")),
        };
        Err(JwtRejection::new(
            reason::BAD_AUDIENCE,
            format!(
                "aud {} names none of the audiences of issuer {}",
                quoted(&aud.to_string()),
                self.name
            ),
        ))
    }

    fn subject(&self, claims: &Map<String, Value>) -> Result<String, JwtRejection> {
        match claims.get(&*self.consumer_claim) {
            Some(Value::String(subject)) if !subject.is_empty() => Ok(subject.clone()),
            Some(Value::Number(subject)) => Ok(subject.to_string()),
            _ => Err(JwtRejection::new(
                reason::MISSING_CLAIM,
                format!(
                    "the token has no {:?} claim (a non-empty string or number) naming the \
                     consumer",
                    self.consumer_claim
                ),
            )),
        }
    }
}

/// Why no key was chosen.
#[derive(Debug)]
enum KeyMiss {
    /// The `kid` is not in the set, or the set has never been loaded: a refetch may help.
    Absent,
    /// Keys are there but none may verify this token: a refetch would not help.
    Refused(JwtRejection),
}

/// The key that verifies a token with `kid` (if any) signed with `alg`.
fn choose_key<'k>(
    keys: &'k KeySet,
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<&'k VerificationKey, KeyMiss> {
    if !keys.is_loaded() {
        return Err(KeyMiss::Absent);
    }
    let Some(kid) = kid else {
        let mut fitting = keys.iter().filter(|key| key.accepts(alg));
        return match (fitting.next(), fitting.next()) {
            (Some(key), None) => Ok(key),
            (None, _) => Err(KeyMiss::Refused(JwtRejection::new(
                reason::UNKNOWN_KEY,
                format!("the token names no kid and no key fits {alg:?}"),
            ))),
            (Some(_), Some(_)) => Err(KeyMiss::Refused(JwtRejection::new(
                reason::UNKNOWN_KEY,
                format!("the token names no kid and several keys fit {alg:?}"),
            ))),
        };
    };
    let mut named = false;
    let mut wrong_alg = None;
    for key in keys.with_kid(kid) {
        named = true;
        if key.accepts(alg) {
            return Ok(key);
        }
        if key.family().fits(alg) {
            wrong_alg = key.alg();
        }
    }
    match (named, wrong_alg) {
        (false, _) => Err(KeyMiss::Absent),
        (true, Some(key_alg)) => Err(KeyMiss::Refused(JwtRejection::new(
            reason::ALGORITHM_NOT_ALLOWED,
            format!(
                "key {} is for {key_alg:?}, the token says {alg:?}",
                quoted(kid)
            ),
        ))),
        (true, None) => Err(KeyMiss::Refused(JwtRejection::new(
            reason::UNKNOWN_KEY,
            format!(
                "key {} cannot verify {alg:?}: it is another kind of key",
                quoted(kid)
            ),
        ))),
    }
}

fn check_signature(
    parts: &TokenParts<'_>,
    key: &VerificationKey,
    alg: Algorithm,
) -> Result<(), JwtRejection> {
    let key_name = || quoted(key.kid().unwrap_or("(no kid)"));
    match jsonwebtoken::crypto::verify(
        parts.signature,
        parts.signing_input.as_bytes(),
        key.decoding_key(),
        alg,
    ) {
        Ok(true) => Ok(()),
        Ok(false) => Err(JwtRejection::new(
            reason::BAD_SIGNATURE,
            format!(
                "the {alg:?} signature does not verify with key {}",
                key_name()
            ),
        )),
        Err(e) if matches!(e.kind(), ErrorKind::Base64(_)) => {
            Err(malformed("the signature is not base64url"))
        }
        Err(e) => Err(JwtRejection::new(
            reason::BAD_SIGNATURE,
            format!("key {} cannot verify {alg:?}: {e}", key_name()),
        )),
    }
}

/// The parts of a compact JWS, not yet decoded.
#[derive(Debug)]
struct TokenParts<'t> {
    header: &'t str,
    payload: &'t str,
    signature: &'t str,
    /// `header.payload`: what the signature covers.
    signing_input: &'t str,
}

impl<'t> TokenParts<'t> {
    fn split(token: &'t str) -> Result<Self, JwtRejection> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(malformed(format!(
                "the token has {} bytes, more than the {MAX_TOKEN_BYTES} accepted",
                token.len()
            )));
        }
        let not_three = || malformed("the token is not three dot-separated parts");
        let (signing_input, signature) = token.rsplit_once('.').ok_or_else(not_three)?;
        let (header, payload) = signing_input.split_once('.').ok_or_else(not_three)?;
        if payload.contains('.') {
            return Err(not_three());
        }
        Ok(TokenParts {
            header,
            payload,
            signature,
            signing_input,
        })
    }
}

/// The header fields verification reads; borrowed from the decoded header where possible.
#[derive(Deserialize)]
struct JoseHeader<'h> {
    #[serde(borrow)]
    alg: Cow<'h, str>,
    #[serde(borrow, default)]
    kid: Option<Cow<'h, str>>,
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

/// A NumericDate claim in whole seconds; `None` when absent.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, JwtRejection> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    value
        .as_u64()
        .or_else(|| {
            value
                .as_f64()
                .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
                .map(|seconds| seconds as u64)
        })
        .map(Some)
        .ok_or_else(|| malformed(format!("{name} is not a NumericDate (seconds since 1970)")))
}

/// `scope` (space-separated) or else `scp` (an array, or a space-separated string).
fn scopes(claims: &Map<String, Value>) -> Vec<String> {
    match claims.get("scope").or_else(|| claims.get("scp")) {
        Some(Value::String(scopes)) => scopes.split_ascii_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(scopes)) => scopes
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn malformed(detail: impl Into<String>) -> JwtRejection {
    JwtRejection::new(reason::MALFORMED_TOKEN, detail)
}

/// `value` quoted for a rejection's detail, cut short: it comes from the token.
fn quoted(value: &str) -> String {
    match value.char_indices().nth(QUOTE_CHARS) {
        Some((cut, _)) => format!("{:?}...", &value[..cut]),
        None => format!("{value:?}"),
    }
}

/// Decodes unpadded base64url (RFC 7515 §2). Non-canonical input (padding, stray bits in the
/// last character) is refused so one token has one spelling.
fn decode_base64url(input: &str) -> Option<Vec<u8>> {
    let input = input.as_bytes();
    if input.len() % 4 == 1 {
        return None;
    }
    let mut output = Vec::with_capacity(input.len() / 4 * 3 + 2);
    let mut buffer: u32 = 0;
    let mut bits: u32 = 0;
    for &c in input {
        let sextet = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(sextet);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            output.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    (buffer == 0).then_some(output)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use jsonwebtoken::{EncodingKey, Header};
    use pb::jwt_issuer::Keys;
    use serde_json::json;
    use tokio::runtime::Handle;
    use tokio::task::JoinSet;

    use super::*;
    use crate::auth::jwks::test_support::*;

    const ISSUER: &str = "https://issuer.example";
    const LONG: Duration = Duration::from_secs(60);

    fn issuer(algorithms: &[&str], keys: Keys) -> pb::JwtIssuer {
        pb::JwtIssuer {
            issuer: ISSUER.into(),
            algorithms: algorithms.iter().map(ToString::to_string).collect(),
            keys: Some(keys),
            ..pb::JwtIssuer::default()
        }
    }

    fn inline(keys: &[Value]) -> Keys {
        Keys::JwksJson(jwks(keys))
    }

    fn compile(issuers: Vec<pb::JwtIssuer>) -> JwtAuthenticator {
        let cache = JwksCache::new(Handle::current());
        JwtAuthenticator::compile(&pb::JwtPolicy { issuers }, &cache).unwrap()
    }

    /// Claims of a token of `ISSUER` for "alice", valid for ten minutes; `changes` adds
    /// claims, and removes those it sets to null.
    fn claims(changes: Value) -> Value {
        let mut claims = json!({ "iss": ISSUER, "sub": "alice", "exp": unix_now() + 600 });
        for (name, value) in changes.as_object().unwrap() {
            match value {
                Value::Null => claims.as_object_mut().unwrap().remove(name),
                value => claims
                    .as_object_mut()
                    .unwrap()
                    .insert(name.clone(), value.clone()),
            };
        }
        claims
    }

    fn base64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut text = String::new();
        for chunk in bytes.chunks(3) {
            let group = chunk.iter().enumerate().fold(0u32, |group, (i, byte)| {
                group | u32::from(*byte) << (16 - 8 * i)
            });
            for i in 0..=chunk.len() {
                text.push(char::from(ALPHABET[(group >> (18 - 6 * i) & 63) as usize]));
            }
        }
        text
    }

    async fn reason(authenticator: &JwtAuthenticator, token: &str) -> &'static str {
        match authenticator.verify(token).await {
            Ok(verified) => panic!("accepted: {verified:?}"),
            Err(rejection) => rejection.reason,
        }
    }

    #[tokio::test]
    async fn good_tokens_of_each_algorithm_pass() {
        let secret = b"an HMAC secret of thirty-two bytes!!";
        let rsa = TestKey::rsa("rsa");
        let server = JwksServer::start(jwks(&[rsa.jwk()])).await;
        let cases = [
            (rsa, "RS256", Keys::JwksUrl(server.url.clone())),
            (
                TestKey::ec("ec"),
                "ES256",
                inline(&[TestKey::ec("ec").jwk()]),
            ),
            (
                TestKey::ed("ed"),
                "EdDSA",
                inline(&[TestKey::ed("ed").jwk()]),
            ),
            (
                TestKey::hmac("hs", secret),
                "HS256",
                inline(&[TestKey::hmac("hs", secret).jwk()]),
            ),
            (
                TestKey::rsa("ps").signing_with(Algorithm::PS256),
                "PS256",
                inline(&[TestKey::rsa("ps").jwk_without_alg()]),
            ),
        ];
        for (key, alg, keys) in cases {
            let authenticator = compile(vec![issuer(&[alg], keys)]);
            let verified = authenticator
                .verify(&key.sign(&claims(json!({}))))
                .await
                .unwrap_or_else(|rejection| panic!("{alg}: {rejection}"));
            assert_eq!(&*verified.issuer, ISSUER, "{alg}");
            assert_eq!(verified.subject, "alice", "{alg}");
            assert_eq!(verified.claims["sub"], "alice", "{alg}");
        }
    }

    #[tokio::test]
    async fn the_consumer_claim_names_the_subject() {
        let key = TestKey::ec("ec");
        let authenticator = compile(vec![pb::JwtIssuer {
            consumer_claim: "client_id".into(),
            ..issuer(&["ES256"], inline(&[key.jwk()]))
        }]);
        let verify = |changes| authenticator.verify_owned(key.sign(&claims(changes)));

        assert_eq!(
            verify(json!({ "client_id": "svc-1" }))
                .await
                .unwrap()
                .subject,
            "svc-1"
        );
        assert_eq!(
            verify(json!({ "client_id": 42 })).await.unwrap().subject,
            "42"
        );
        for unusable in [
            json!({}),
            json!({ "client_id": "" }),
            json!({ "client_id": ["a"] }),
        ] {
            let rejection = verify(unusable.clone()).await.unwrap_err();
            assert_eq!(rejection.reason, reason::MISSING_CLAIM, "{unusable}");
        }
    }

    impl JwtAuthenticator {
        /// `verify` for a token built in the call.
        async fn verify_owned(&self, token: String) -> Result<VerifiedToken, JwtRejection> {
            self.verify(&token).await
        }
    }

    #[tokio::test]
    async fn scopes_come_from_scope_or_scp() {
        let key = TestKey::ed("ed");
        let authenticator = compile(vec![issuer(&["EdDSA"], inline(&[key.jwk()]))]);
        let cases = [
            (json!({ "scope": "read  write" }), vec!["read", "write"]),
            (json!({ "scp": ["read", "admin"] }), vec!["read", "admin"]),
            (json!({ "scp": "orders:read" }), vec!["orders:read"]),
            (json!({ "scope": "a", "scp": ["b"] }), vec!["a"]),
            (json!({}), vec![]),
        ];
        for (changes, expected) in cases {
            let verified = authenticator
                .verify(&key.sign(&claims(changes.clone())))
                .await
                .unwrap();
            assert_eq!(verified.scopes, expected, "{changes}");
        }
    }

    #[tokio::test]
    async fn expiry_and_not_before_are_checked_with_the_leeway() {
        let key = TestKey::ec("ec");
        let strict = compile(vec![issuer(&["ES256"], inline(&[key.jwk()]))]);
        let lenient = compile(vec![pb::JwtIssuer {
            leeway_s: 30,
            ..issuer(&["ES256"], inline(&[key.jwk()]))
        }]);
        let now = unix_now();

        let just_expired = key.sign(&claims(json!({ "exp": now - 5 })));
        assert_eq!(reason(&strict, &just_expired).await, reason::TOKEN_EXPIRED);
        assert!(
            lenient.verify(&just_expired).await.is_ok(),
            "within the leeway"
        );
        let long_expired = key.sign(&claims(json!({ "exp": now - 60 })));
        assert_eq!(reason(&lenient, &long_expired).await, reason::TOKEN_EXPIRED);

        let soon = key.sign(&claims(json!({ "nbf": now + 10 })));
        assert_eq!(reason(&strict, &soon).await, reason::TOKEN_NOT_YET_VALID);
        assert!(lenient.verify(&soon).await.is_ok(), "within the leeway");
        let later = key.sign(&claims(json!({ "nbf": now + 60 })));
        assert_eq!(reason(&lenient, &later).await, reason::TOKEN_NOT_YET_VALID);
        let started = key.sign(&claims(json!({ "nbf": now - 60 })));
        assert!(strict.verify(&started).await.is_ok());

        let no_exp = key.sign(&claims(json!({ "exp": null })));
        assert_eq!(reason(&strict, &no_exp).await, reason::MISSING_CLAIM);
        let text_exp = key.sign(&claims(json!({ "exp": "tomorrow" })));
        assert_eq!(reason(&strict, &text_exp).await, reason::MALFORMED_TOKEN);
    }

    #[tokio::test]
    async fn audiences_are_checked_only_when_configured() {
        let key = TestKey::ec("ec");
        let with_audiences = compile(vec![pb::JwtIssuer {
            audiences: vec!["orders-api".into(), "billing-api".into()],
            ..issuer(&["ES256"], inline(&[key.jwk()]))
        }]);
        let without = compile(vec![issuer(&["ES256"], inline(&[key.jwk()]))]);
        let token = |aud: Value| key.sign(&claims(json!({ "aud": aud })));

        assert!(
            with_audiences
                .verify(&token(json!("orders-api")))
                .await
                .is_ok()
        );
        assert!(
            with_audiences
                .verify(&token(json!(["other", "billing-api"])))
                .await
                .is_ok()
        );
        for wrong in [json!("other-api"), json!(["other", "more"]), json!([])] {
            assert_eq!(
                reason(&with_audiences, &token(wrong.clone())).await,
                reason::BAD_AUDIENCE,
                "{wrong}"
            );
        }
        assert_eq!(
            reason(&with_audiences, &token(json!(7))).await,
            reason::MALFORMED_TOKEN
        );
        assert_eq!(
            reason(&with_audiences, &token(Value::Null)).await,
            reason::MISSING_CLAIM
        );
        assert!(without.verify(&token(json!("any-api"))).await.is_ok());
    }

    #[tokio::test]
    async fn the_issuer_must_match_exactly() {
        let key = TestKey::ec("ec");
        let authenticator = compile(vec![issuer(&["ES256"], inline(&[key.jwk()]))]);
        for iss in [
            "https://evil.example",
            "https://issuer.example/",
            "HTTPS://issuer.example",
        ] {
            let token = key.sign(&claims(json!({ "iss": iss })));
            assert_eq!(
                reason(&authenticator, &token).await,
                reason::UNKNOWN_ISSUER,
                "{iss}"
            );
        }
        let token = key.sign(&claims(json!({ "iss": null })));
        assert_eq!(reason(&authenticator, &token).await, reason::MISSING_CLAIM);
        let token = key.sign(&claims(json!({ "iss": [ISSUER] })));
        assert_eq!(
            reason(&authenticator, &token).await,
            reason::MALFORMED_TOKEN
        );
    }

    #[tokio::test]
    async fn each_issuer_verifies_with_its_own_keys_only() {
        let ours = TestKey::ec("shared-kid");
        let theirs = TestKey::ed("shared-kid");
        let authenticator = compile(vec![
            issuer(&["ES256"], inline(&[ours.jwk()])),
            pb::JwtIssuer {
                issuer: "https://other.example".into(),
                ..issuer(&["EdDSA"], inline(&[theirs.jwk()]))
            },
        ]);
        // Signed by the other issuer's key, claiming to come from ISSUER.
        let token = theirs.sign(&claims(json!({})));
        assert_eq!(
            reason(&authenticator, &token).await,
            reason::ALGORITHM_NOT_ALLOWED
        );
        let other = theirs.sign(&claims(json!({ "iss": "https://other.example" })));
        assert_eq!(
            &*authenticator.verify(&other).await.unwrap().issuer,
            "https://other.example"
        );
    }

    #[tokio::test]
    async fn alg_none_never_passes() {
        let key = TestKey::rsa("k1");
        let authenticator = compile(vec![issuer(&["RS256"], inline(&[key.jwk()]))]);
        let payload = base64url(claims(json!({})).to_string().as_bytes());
        for header in [
            json!({ "alg": "none", "typ": "JWT", "kid": "k1" }),
            json!({ "alg": "none" }),
            json!({ "alg": "None" }),
        ] {
            let header = base64url(header.to_string().as_bytes());
            for signature in ["", "c2lnbmF0dXJl"] {
                let token = format!("{header}.{payload}.{signature}");
                assert_eq!(
                    reason(&authenticator, &token).await,
                    reason::ALGORITHM_NOT_ALLOWED,
                    "{token}"
                );
            }
        }
    }

    #[tokio::test]
    async fn an_rsa_public_key_never_serves_as_an_hmac_secret() {
        let rsa = TestKey::rsa("k1");
        let forge = |kid: Option<&str>| {
            let header = Header {
                kid: kid.map(str::to_owned),
                ..Header::new(Algorithm::HS256)
            };
            let secret = EncodingKey::from_secret(RSA_PUBLIC_PEM.as_bytes());
            jsonwebtoken::encode(&header, &claims(json!({})), &secret).unwrap()
        };

        let rs256_issuer = compile(vec![issuer(&["RS256"], inline(&[rsa.jwk()]))]);
        assert_eq!(
            reason(&rs256_issuer, &forge(Some("k1"))).await,
            reason::ALGORITHM_NOT_ALLOWED
        );

        // Misconfigured: allows HS256 but holds an RSA key. The key's kind still refuses.
        let hs256_issuer_with_rsa_keys =
            compile(vec![issuer(&["HS256"], inline(&[rsa.jwk_without_alg()]))]);
        for token in [forge(Some("k1")), forge(None)] {
            assert_eq!(
                reason(&hs256_issuer_with_rsa_keys, &token).await,
                reason::UNKNOWN_KEY
            );
        }
        assert!(
            rs256_issuer
                .verify(&rsa.sign(&claims(json!({}))))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_tampered_token_has_a_bad_signature() {
        let key = TestKey::rsa("k1");
        let authenticator = compile(vec![issuer(&["RS256"], inline(&[key.jwk()]))]);
        let token = key.sign(&claims(json!({})));
        assert!(authenticator.verify(&token).await.is_ok());

        let mut parts = token.split('.');
        let (header, _, signature) = (parts.next().unwrap(), parts.next(), parts.next().unwrap());
        let forged_payload = base64url(claims(json!({ "sub": "mallory" })).to_string().as_bytes());
        let tampered = format!("{header}.{forged_payload}.{signature}");
        assert_eq!(
            reason(&authenticator, &tampered).await,
            reason::BAD_SIGNATURE
        );

        let mut flipped = signature.as_bytes().to_vec();
        flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
        let flipped = format!(
            "{}.{}",
            token.rsplit_once('.').unwrap().0,
            String::from_utf8(flipped).unwrap()
        );
        assert_eq!(
            reason(&authenticator, &flipped).await,
            reason::BAD_SIGNATURE
        );
    }

    #[tokio::test]
    async fn a_jwk_naming_an_alg_verifies_only_that_alg() {
        let jwk_for_rs384 = TestKey::rsa("k1").signing_with(Algorithm::RS384).jwk();
        let authenticator = compile(vec![issuer(&["RS256", "RS384"], inline(&[jwk_for_rs384]))]);
        let rs256 = TestKey::rsa("k1").sign(&claims(json!({})));
        assert_eq!(
            reason(&authenticator, &rs256).await,
            reason::ALGORITHM_NOT_ALLOWED
        );
        let rs384 = TestKey::rsa("k1").signing_with(Algorithm::RS384);
        assert!(
            authenticator
                .verify(&rs384.sign(&claims(json!({}))))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_token_without_kid_needs_exactly_one_fitting_key() {
        let ec = TestKey::ec("e1");
        let one = compile(vec![issuer(
            &["ES256"],
            inline(&[ec.jwk(), TestKey::ed("ed").jwk()]),
        )]);
        assert!(
            one.verify(&ec.sign_without_kid(&claims(json!({}))))
                .await
                .is_ok()
        );

        let two = compile(vec![issuer(
            &["ES256"],
            inline(&[ec.jwk(), TestKey::ec("e2").jwk()]),
        )]);
        let token = ec.sign_without_kid(&claims(json!({})));
        assert_eq!(reason(&two, &token).await, reason::UNKNOWN_KEY);
    }

    #[tokio::test]
    async fn malformed_tokens_are_refused() {
        let key = TestKey::ec("ec");
        let authenticator = compile(vec![issuer(&["ES256"], inline(&[key.jwk()]))]);
        let good = key.sign(&claims(json!({})));
        let (header, rest) = good.split_once('.').unwrap();
        let crit = base64url(br#"{"alg":"ES256","kid":"ec","crit":["exp"]}"#);
        let not_object = base64url(b"[1,2]");
        let oversized = format!("{good}{}", "A".repeat(MAX_TOKEN_BYTES));
        for token in [
            String::new(),
            "abc".into(),
            "a.b".into(),
            format!("{good}.extra"),
            format!("!!.{rest}"),
            format!("{header}=.{rest}"),
            format!("{}.{rest}", base64url(b"not json")),
            format!("{crit}.{rest}"),
            format!("{header}.{not_object}.{}", rest.rsplit_once('.').unwrap().1),
            format!("{}.!!", good.rsplit_once('.').unwrap().0),
            oversized,
        ] {
            let rejection = authenticator.verify(&token).await.unwrap_err();
            assert_eq!(
                rejection.reason,
                reason::MALFORMED_TOKEN,
                "{token:.80}: {rejection}"
            );
        }
    }

    #[tokio::test]
    async fn an_unknown_kid_refetches_once_and_then_waits_out_the_cooldown() {
        let server = JwksServer::start(jwks(&[TestKey::rsa("k1").jwk()])).await;
        let cache = test_cache(Duration::from_secs(2), LONG);
        let policy = pb::JwtPolicy {
            issuers: vec![issuer(&["RS256"], Keys::JwksUrl(server.url.clone()))],
        };
        let authenticator = Arc::new(JwtAuthenticator::compile(&policy, &cache).unwrap());
        let old = TestKey::rsa("k1").sign(&claims(json!({})));
        assert!(authenticator.verify(&old).await.is_ok());
        assert_eq!(server.requests(), 1);

        // The issuer rotates k2 in; the fetch is slow so that callers overlap.
        server.serve(jwks(&[TestKey::rsa("k1").jwk(), TestKey::rsa2("k2").jwk()]));
        server.delay(Duration::from_millis(200));
        let rotated = TestKey::rsa2("k2").sign(&claims(json!({})));
        let mut callers = JoinSet::new();
        for _ in 0..8 {
            let authenticator = Arc::clone(&authenticator);
            let rotated = rotated.clone();
            callers.spawn(async move { authenticator.verify(&rotated).await.map(|v| v.subject) });
        }
        while let Some(result) = callers.join_next().await {
            assert_eq!(result.unwrap().unwrap(), "alice");
        }
        assert_eq!(server.requests(), 2, "eight callers, one refetch");

        let made_up = TestKey::rsa("k3").sign(&claims(json!({})));
        let started = Instant::now();
        assert_eq!(reason(&authenticator, &made_up).await, reason::UNKNOWN_KEY);
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(server.requests(), 2, "no refetch within the cooldown");
    }

    #[tokio::test]
    async fn a_stalled_jwks_server_never_holds_a_request_past_the_fetch_timeout() {
        let server = JwksServer::start(jwks(&[TestKey::rsa("k1").jwk()])).await;
        let cache = test_cache(Duration::from_millis(300), LONG);
        let policy = pb::JwtPolicy {
            issuers: vec![issuer(&["RS256"], Keys::JwksUrl(server.url.clone()))],
        };
        let authenticator = JwtAuthenticator::compile(&policy, &cache).unwrap();
        let known = TestKey::rsa("k1").sign(&claims(json!({})));
        assert!(authenticator.verify(&known).await.is_ok());
        server.stall(true);

        let unknown = TestKey::rsa2("k2").sign(&claims(json!({})));
        let started = Instant::now();
        assert_eq!(
            bounded(reason(&authenticator, &unknown)).await,
            reason::UNKNOWN_KEY
        );
        let waited = started.elapsed();
        assert!(waited < Duration::from_millis(800), "waited {waited:?}");
        assert_eq!(server.requests(), 2);

        let started = Instant::now();
        assert!(
            authenticator.verify(&known).await.is_ok(),
            "old keys still verify"
        );
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn keys_never_fetched_are_keys_unavailable() {
        let server = JwksServer::start(jwks(&[TestKey::rsa("k1").jwk()])).await;
        server.answer_status(503);
        let cache = test_cache(Duration::from_millis(300), LONG);
        let policy = pb::JwtPolicy {
            issuers: vec![issuer(&["RS256"], Keys::JwksUrl(server.url.clone()))],
        };
        let authenticator = JwtAuthenticator::compile(&policy, &cache).unwrap();
        let token = TestKey::rsa("k1").sign(&claims(json!({})));
        let started = Instant::now();
        assert_eq!(
            bounded(reason(&authenticator, &token)).await,
            reason::KEYS_UNAVAILABLE
        );
        assert!(started.elapsed() < Duration::from_millis(800));
        // The first fetch, then one unknown-kid refetch (by the first token if the first
        // fetch had already failed when it came, else by the second); then the cooldown.
        assert_eq!(
            reason(&authenticator, &token).await,
            reason::KEYS_UNAVAILABLE
        );
        assert_eq!(
            reason(&authenticator, &token).await,
            reason::KEYS_UNAVAILABLE
        );
        assert_eq!(server.requests(), 2);
    }

    #[tokio::test]
    async fn a_request_waits_for_one_jwks_fetch_at_most() {
        let server = JwksServer::start(jwks(&[TestKey::rsa("k1").jwk()])).await;
        // Each fetch fails after 300 ms, well within the fetch timeout.
        server.delay(Duration::from_millis(300));
        server.answer_status(503);
        let cache = test_cache(Duration::from_secs(2), LONG);
        let policy = pb::JwtPolicy {
            issuers: vec![issuer(&["RS256"], Keys::JwksUrl(server.url.clone()))],
        };
        let authenticator = JwtAuthenticator::compile(&policy, &cache).unwrap();
        let token = TestKey::rsa("k1").sign(&claims(json!({})));
        let started = Instant::now();
        assert_eq!(
            bounded(reason(&authenticator, &token)).await,
            reason::KEYS_UNAVAILABLE
        );
        let waited = started.elapsed();
        // The first fetch, not that and an unknown-kid refetch after it.
        assert!(waited < Duration::from_millis(550), "waited {waited:?}");
        assert_eq!(
            server.requests(),
            1,
            "no refetch right after the failed fetch"
        );
    }

    #[tokio::test]
    async fn a_config_swap_keeps_the_fetched_keys() {
        let server = JwksServer::start(jwks(&[TestKey::rsa("k1").jwk()])).await;
        let cache = test_cache(Duration::from_secs(2), LONG);
        let policy = pb::JwtPolicy {
            issuers: vec![issuer(&["RS256"], Keys::JwksUrl(server.url.clone()))],
        };
        let token = TestKey::rsa("k1").sign(&claims(json!({})));
        let running = JwtAuthenticator::compile(&policy, &cache).unwrap();
        assert!(running.verify(&token).await.is_ok());
        let next = JwtAuthenticator::compile(&policy, &cache).unwrap();
        drop(running);
        assert!(next.verify(&token).await.is_ok());
        assert_eq!(server.requests(), 1);
    }

    #[tokio::test]
    async fn compile_names_the_field_that_is_wrong() {
        let cache = JwksCache::new(Handle::current());
        let ec = || inline(&[TestKey::ec("ec").jwk()]);
        let cases = [
            (vec![], "issuers:"),
            (
                vec![issuer(&["ES256", "XS1"], ec())],
                "issuers[0].algorithms[1]",
            ),
            (
                vec![issuer(&["ES256", "HS256"], ec())],
                "issuers[0].algorithms",
            ),
            (vec![issuer(&[], ec())], "issuers[0].algorithms"),
            (
                vec![pb::JwtIssuer {
                    keys: None,
                    ..issuer(&["ES256"], ec())
                }],
                "issuers[0].keys",
            ),
            (
                vec![issuer(&["ES256"], inline(&[json!({ "kty": "dunno" })]))],
                "issuers[0].jwks_json",
            ),
            (
                vec![issuer(&["ES256"], Keys::JwksUrl("ftp://x".into()))],
                "issuers[0].jwks_url",
            ),
            (
                vec![issuer(&["ES256"], ec()), issuer(&["ES256"], ec())],
                "issuers[1].issuer",
            ),
        ];
        for (issuers, field) in cases {
            let error = JwtAuthenticator::compile(&pb::JwtPolicy { issuers }, &cache).unwrap_err();
            assert!(error.starts_with(field), "{field}: {error}");
        }
    }

    #[test]
    fn base64url_decoding_is_strict() {
        assert_eq!(decode_base64url(""), Some(vec![]));
        assert_eq!(decode_base64url("Zg"), Some(b"f".to_vec()));
        assert_eq!(decode_base64url("Zm8"), Some(b"fo".to_vec()));
        assert_eq!(decode_base64url("Zm9v"), Some(b"foo".to_vec()));
        assert_eq!(decode_base64url("-_8"), Some(vec![0xfb, 0xff]));
        for refused in ["Z", "Zh", "Zm9=", "Zm9v=", "Zm+v", "Zm/v", "Zm9v\n"] {
            assert_eq!(decode_base64url(refused), None, "{refused:?}");
        }
        let bytes: Vec<u8> = (0..=255).collect();
        for len in 0..bytes.len() {
            assert_eq!(
                decode_base64url(&base64url(&bytes[..len])).as_deref(),
                Some(&bytes[..len])
            );
        }
    }

    #[tokio::test]
    async fn verify_cost_per_algorithm() {
        const ROUNDS: u32 = 200;
        let secret = b"an HMAC secret of thirty-two bytes!!";
        let keys = [
            TestKey::rsa("rs"),
            TestKey::ec("es"),
            TestKey::ed("ed"),
            TestKey::hmac("hs", secret),
        ];
        for key in keys {
            let alg = format!("{:?}", key.alg);
            let authenticator = compile(vec![issuer(&[&alg], inline(&[key.jwk()]))]);
            let token = key.sign(&claims(json!({ "scope": "read write", "aud": "api" })));
            let started = Instant::now();
            for _ in 0..ROUNDS {
                authenticator.verify(&token).await.unwrap();
            }
            let each = started.elapsed() / ROUNDS;
            eprintln!("verify {alg}: {each:?} per token");
            assert!(each < Duration::from_millis(20), "{alg}: {each:?}");
        }
    }

    #[test]
    fn verify_is_send() {
        fn send<T: Send>(_: &T) {}
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let authenticator = compile(vec![issuer(&["ES256"], inline(&[TestKey::ec("ec").jwk()]))]);
        send(&authenticator.verify("token"));
    }
}
