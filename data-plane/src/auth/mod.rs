//! Who is calling and whether they may: authentication (API keys, JWT, client certificates),
//! authorization (subscriptions, scopes, IP lists) and rate limits, per route.
//!
//! A configuration's policies and plans are compiled once ([`AccessPolicies`]), and each
//! route gets the checks its API's and its own policies add up to ([`RouteAccess`]). A
//! request is then checked in this order, and the first refusal answers it:
//!
//! 1. IP lists of the API and route (403);
//! 2. authentication, any of the route's methods (401 with `WWW-Authenticate`); a client
//!    address that failed too often lately is refused before its credential is looked at
//!    (429);
//! 3. the consumer: not disabled, and its own IP lists (403);
//! 4. an active, unexpired subscription to the API, and the route's scopes among the
//!    token's and the plan's (403, or 404 when the API hides itself);
//! 5. rate limits: the plan's, the API's and route's policies, the consumer's, and the
//!    plan's monthly quota (429 with `RateLimit-*` and `Retry-After`; 503 when Redis is
//!    down and the policy fails closed).
//!
//! Node-wide state that must outlive a configuration lives in the [`AccessGuard`] (rate-limit
//! budgets, the failed-authentication throttle) and the config store (JWKS sources).

pub mod cors;
pub mod ip;
pub mod jwks;
pub mod jwt;
pub mod key;
pub mod mtls;
pub mod standing;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use compact_str::CompactString;
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use prost_types::Timestamp;
use sha2::{Digest, Sha256};
use sluice_proto::{ConfigErrors, FieldError, pb};
use smallvec::SmallVec;
use uuid::Uuid;

use crate::config::holdings::{CredentialIdentity, HeldConsumer, HeldSubscription, Holdings};
use crate::ratelimit::{
    Budget, BudgetKey, Decision, LocalLimiter, Quota, Rate, RedisLimiter, Subject,
};
use cors::Cors;
use ip::{IpRules, budget_address};
use jwks::JwksCache;
use jwt::JwtAuthenticator;
use key::{KeyAuth, KeyLocation};
use mtls::{ClientCertificate, MtlsAuth};
use standing::{Grant, Presented};

/// Node-wide access-control state, shared by every configuration the node runs.
#[derive(Debug)]
pub struct AccessGuard {
    pub local: LocalLimiter,
    /// `None` when the node was started without `--redis-url`: budgets counted in Redis
    /// then follow their policy's `fail_open`.
    pub redis: Option<Arc<RedisLimiter>>,
    throttle: FailureThrottle,
}

impl AccessGuard {
    /// `failures_per_minute`: failed authentications a client address may make before its
    /// next attempts are refused unread (0: never).
    pub fn new(
        redis: Option<Arc<RedisLimiter>>,
        local_budgets: usize,
        failures_per_minute: u64,
    ) -> Self {
        AccessGuard {
            local: LocalLimiter::new(local_budgets),
            redis,
            throttle: FailureThrottle::new(failures_per_minute),
        }
    }
}

/// Slows down guessing: each failed authentication spends from a per-address budget, and an
/// address that has spent it is refused (429) without its credential being looked at until
/// the budget allows one more.
#[derive(Debug)]
struct FailureThrottle {
    rate: Option<Rate>,
    /// Addresses refused, until when. Bounded by [`MAX_THROTTLED`].
    throttled: RwLock<HashMap<IpAddr, Instant>>,
    /// Whether `throttled` may hold anything: requests skip its lock while nobody is.
    any: AtomicBool,
}

/// Addresses held by the throttle at most; beyond, new ones are not throttled (their
/// failures still spend their budget, so they are caught once room frees up).
const MAX_THROTTLED: usize = 100_000;

/// Past this many throttled addresses, those whose wait is over are swept out first.
const SWEEP_THROTTLED: usize = 1024;

/// The budget scope of failed authentications.
const FAILURES_SCOPE: [u8; 16] = *b"sluice:authfails";

impl FailureThrottle {
    fn new(per_minute: u64) -> Self {
        FailureThrottle {
            // The whole minute's failures may come at once; then one per 60/n seconds.
            rate: (per_minute > 0).then(|| Rate {
                limit: per_minute,
                period: Duration::from_secs(60),
                burst: per_minute - 1,
            }),
            throttled: RwLock::default(),
            any: AtomicBool::new(false),
        }
    }

    /// How long `client` must still wait, if it is throttled.
    fn wait(&self, client: IpAddr) -> Option<Duration> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let until = *self.throttled.read().ok()?.get(&client)?;
        let wait = until.checked_duration_since(Instant::now());
        if wait.is_none()
            && let Ok(mut throttled) = self.throttled.write()
        {
            // Its wait is over: forget it, and let requests skip the lock once nobody waits.
            if throttled.get(&client).is_some_and(|u| *u <= Instant::now()) {
                throttled.remove(&client);
            }
            self.any.store(!throttled.is_empty(), Ordering::Relaxed);
        }
        wait
    }

    fn failed(&self, client: IpAddr, local: &LocalLimiter) {
        let Some(rate) = self.rate else { return };
        let key = BudgetKey {
            scope: FAILURES_SCOPE,
            subject: Subject::Ip(client),
        };
        let decision = local.check(&[Budget {
            key: &key,
            rates: std::slice::from_ref(&rate),
        }]);
        // This failure spent the budget (or found it spent): the next attempt waits until
        // the budget allows one more failure.
        let wait = match decision.retry_after {
            Some(wait) if !decision.allowed => wait,
            _ if decision.remaining == 0 => rate.emission_interval(),
            _ => return,
        };
        let now = Instant::now();
        let until = now + wait;
        let Ok(mut throttled) = self.throttled.write() else {
            return;
        };
        // Addresses whose wait is over are dropped as others are added, so requests stop
        // taking the lock soon after the last guesser is done.
        if throttled.len() >= SWEEP_THROTTLED {
            throttled.retain(|_, until| *until > now);
        }
        if throttled.len() < MAX_THROTTLED {
            throttled.insert(client, until);
        }
        self.any.store(!throttled.is_empty(), Ordering::Relaxed);
    }
}

/// A configuration's policies and plans, compiled.
#[derive(Debug, Default)]
pub struct AccessPolicies {
    /// By policy id.
    policies: HashMap<String, Compiled>,
    /// By plan id.
    plans: HashMap<[u8; 16], Arc<PlanLimits>>,
    /// Whether any policy authenticates with client certificates.
    has_mtls: bool,
}

#[derive(Debug, Clone)]
enum Compiled {
    KeyAuth(Arc<KeyAuth>),
    Jwt(Arc<JwtAuth>),
    Mtls(Arc<MtlsAuth>),
    RateLimit(Arc<LimitPolicy>),
    Cors(Arc<Cors>),
    Ip(Arc<IpRules>),
    RequestSize(u64),
}

/// A `jwt` policy: the verifier, and the claims it passes upstream as headers.
#[derive(Debug)]
struct JwtAuth {
    verifier: JwtAuthenticator,
    /// By issuer (`iss`): the claims its tokens pass upstream, and as which headers. Another
    /// issuer's tokens do not pass them, whatever claims they carry.
    claim_headers: HashMap<String, Vec<(String, HeaderName)>>,
}

/// A `rate_limit` policy.
#[derive(Debug)]
struct LimitPolicy {
    id: [u8; 16],
    rates: Vec<Rate>,
    scope: pb::rate_limit_policy::Scope,
    redis: bool,
    fail_open: bool,
}

/// What a plan gives its subscribers.
#[derive(Debug)]
struct PlanLimits {
    rates: Vec<Rate>,
    monthly_quota: u64,
    scopes: Vec<String>,
    redis: bool,
    fail_open: bool,
}

fn rates(limits: &[pb::RateLimit], path: &str) -> Result<Vec<Rate>, (String, String)> {
    limits
        .iter()
        .enumerate()
        .map(|(j, r)| Rate::from_pb(r).map_err(|e| (format!("{path}[{j}]"), e)))
        .collect()
}

impl AccessPolicies {
    /// Compiles the policies and plans of `held`. JWKS URLs are registered with `jwks`,
    /// which fetches them in the background.
    pub fn compile(held: &Holdings, jwks: &JwksCache) -> Result<Self, ConfigErrors> {
        use pb::policy::Kind;
        use pb::rate_limit_policy::Mode;
        let mut errors = Vec::new();
        let mut out = AccessPolicies::default();
        for (i, policy) in held.policies().enumerate() {
            let id = policy
                .meta
                .as_ref()
                .map_or("", |m| m.id.as_str())
                .to_owned();
            let base = format!("policies[{i}]");
            let compiled: Result<Compiled, (String, String)> = match &policy.kind {
                Some(Kind::KeyAuth(k)) => KeyAuth::compile(k)
                    .map(|k| Compiled::KeyAuth(Arc::new(k)))
                    .map_err(|e| (format!("{base}.key_auth"), e)),
                Some(Kind::Jwt(j)) => compile_jwt(j, jwks)
                    .map(|j| Compiled::Jwt(Arc::new(j)))
                    .map_err(|e| (format!("{base}.jwt"), e)),
                Some(Kind::Mtls(m)) => {
                    out.has_mtls = true;
                    MtlsAuth::compile(m)
                        .map(|m| Compiled::Mtls(Arc::new(m)))
                        .map_err(|e| (format!("{base}.mtls"), e))
                }
                Some(Kind::RateLimit(r)) => rates(&r.limits, &format!("{base}.rate_limit.limits"))
                    .map(|rates| {
                        Compiled::RateLimit(Arc::new(LimitPolicy {
                            id: uuid_bytes(&id),
                            rates,
                            scope: pb::rate_limit_policy::Scope::try_from(r.scope)
                                .unwrap_or_default(),
                            redis: r.mode == Mode::Redis as i32,
                            fail_open: r.fail_open,
                        }))
                    }),
                Some(Kind::Cors(c)) => Cors::compile(c)
                    .map(|c| Compiled::Cors(Arc::new(c)))
                    .map_err(|e| (format!("{base}.cors"), e)),
                Some(Kind::IpRestriction(ip)) => IpRules::compile(ip)
                    .map(|r| Compiled::Ip(Arc::new(r)))
                    .map_err(|e| (format!("{base}.ip_restriction"), e)),
                Some(Kind::RequestSize(size)) => Ok(Compiled::RequestSize(size.max_body_bytes)),
                None => Err((base.clone(), "has no kind".to_owned())),
            };
            match compiled {
                Ok(compiled) => {
                    out.policies.insert(id, compiled);
                }
                Err((path, reason)) => errors.push(FieldError {
                    path,
                    reason,
                    resource: Some(pb::ResourceRef {
                        kind: pb::ResourceKind::Policy as i32,
                        id,
                    }),
                }),
            }
        }
        for (i, plan) in held.plans().enumerate() {
            let id = plan.meta.as_ref().map_or("", |m| m.id.as_str()).to_owned();
            match rates(&plan.rate_limits, &format!("plans[{i}].rate_limits")) {
                Ok(rates) => {
                    out.plans.insert(
                        uuid_bytes(&id),
                        Arc::new(PlanLimits {
                            rates,
                            monthly_quota: plan.monthly_quota,
                            scopes: plan.scopes.clone(),
                            redis: plan.mode == Mode::Redis as i32,
                            fail_open: plan.fail_open,
                        }),
                    );
                }
                Err((path, reason)) => errors.push(FieldError {
                    path,
                    reason,
                    resource: Some(pb::ResourceRef {
                        kind: pb::ResourceKind::Plan as i32,
                        id,
                    }),
                }),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Whether the TLS listener should ask clients for a certificate.
    pub fn asks_for_certificates(&self) -> bool {
        self.has_mtls
    }
}

fn compile_jwt(policy: &pb::JwtPolicy, jwks: &JwksCache) -> Result<JwtAuth, String> {
    let mut claim_headers = HashMap::new();
    for issuer in &policy.issuers {
        let mut headers = Vec::new();
        for (claim, header) in &issuer.claim_headers {
            let name = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| format!("claim_headers.{claim}: {header:?} is not a header name"))?;
            headers.push((claim.clone(), name));
        }
        claim_headers.insert(issuer.issuer.clone(), headers);
    }
    Ok(JwtAuth {
        verifier: JwtAuthenticator::compile(policy, jwks)?,
        claim_headers,
    })
}

/// A UUID's bytes; zero for a malformed one (the validator named it).
fn uuid_bytes(id: &str) -> [u8; 16] {
    Uuid::parse_str(id).map_or([0; 16], Uuid::into_bytes)
}

/// What one route checks, from its API's policies and then its own.
#[derive(Debug, Default)]
pub struct RouteAccess {
    api_id: [u8; 16],
    /// Any of them admits the caller; none means the route is open to anyone.
    authenticators: Vec<Authenticator>,
    ip_rules: Vec<Arc<IpRules>>,
    /// Each with the budget scope of its attachment: a policy attached to two routes counts
    /// each route apart.
    limits: Vec<(Arc<LimitPolicy>, [u8; 16])>,
    /// The route's, else its API's.
    pub cors: Option<Arc<Cors>>,
    /// The smallest of the `request_size` policies.
    pub max_body_bytes: Option<u64>,
    scopes: Vec<String>,
    hide_when_forbidden: bool,
    /// Request headers the gateway sets from JWT claims; copies the client sent are removed.
    claim_headers: Vec<HeaderName>,
}

/// A budget a request is counted against: its key, its rates, whether it is counted in Redis,
/// and whether it lets requests through when Redis cannot be asked.
type Counted<'r> = (BudgetKey, &'r [Rate], bool, bool);

#[derive(Debug, Clone)]
enum Authenticator {
    Key(Arc<KeyAuth>),
    Jwt(Arc<JwtAuth>),
    Mtls(Arc<MtlsAuth>),
}

impl RouteAccess {
    pub fn compile(
        api: &pb::Api,
        route: &pb::Route,
        policies: &AccessPolicies,
    ) -> Result<Self, String> {
        let api_id = api.meta.as_ref().map_or("", |m| m.id.as_str());
        let mut access = RouteAccess {
            api_id: uuid_bytes(api_id),
            scopes: route.scopes.clone(),
            hide_when_forbidden: api.hide_when_forbidden,
            ..Default::default()
        };
        let attached = api
            .policy_ids
            .iter()
            .map(|id| (id, api_id))
            .chain(route.policy_ids.iter().map(|id| (id, route.id.as_str())));
        for (policy_id, attached_to) in attached {
            let policy = policies
                .policies
                .get(policy_id)
                .ok_or_else(|| format!("no policy has the id {policy_id}"))?;
            match policy {
                Compiled::KeyAuth(k) => access.authenticators.push(Authenticator::Key(k.clone())),
                Compiled::Jwt(j) => {
                    access
                        .claim_headers
                        .extend(j.claim_headers.values().flatten().map(|(_, h)| h.clone()));
                    access.authenticators.push(Authenticator::Jwt(j.clone()));
                }
                Compiled::Mtls(m) => access.authenticators.push(Authenticator::Mtls(m.clone())),
                Compiled::RateLimit(limit) => {
                    let scope: [u8; 32] = Sha256::new()
                        .chain_update(limit.id)
                        .chain_update(attached_to.as_bytes())
                        .finalize()
                        .into();
                    let mut scope_id = [0; 16];
                    scope_id.copy_from_slice(&scope[..16]);
                    // A policy listed twice is one budget, counted once.
                    if !access.limits.iter().any(|(_, id)| *id == scope_id) {
                        access.limits.push((limit.clone(), scope_id));
                    }
                }
                Compiled::Cors(c) => access.cors = Some(c.clone()),
                Compiled::Ip(rules) => access.ip_rules.push(rules.clone()),
                Compiled::RequestSize(max) => {
                    access.max_body_bytes =
                        Some(access.max_body_bytes.map_or(*max, |m| m.min(*max)));
                }
            }
        }
        Ok(access)
    }

    /// Whether the route checks nothing per request (no authentication, IP list or limit).
    pub fn is_open(&self) -> bool {
        self.authenticators.is_empty()
            && self.ip_rules.is_empty()
            && self.limits.is_empty()
            && self.scopes.is_empty()
    }

    /// Headers a client may not send upstream on this route: the identity headers, and the
    /// headers its JWT policies fill from claims.
    pub fn reserved_headers(&self) -> impl Iterator<Item = &HeaderName> {
        IDENTITY_HEADERS.iter().chain(self.claim_headers.iter())
    }

    /// Checks one request.
    pub async fn check(
        &self,
        caller: &Caller<'_>,
        held: &Holdings,
        policies: &AccessPolicies,
        guard: &AccessGuard,
    ) -> Result<Admission, Box<Denial>> {
        for rules in &self.ip_rules {
            if !rules.admits(caller.ip) {
                return Err(self.forbidden(
                    "ip_denied",
                    format!("the address {} may not call this API", caller.ip),
                ));
            }
        }
        if self.authenticators.is_empty() {
            if !self.scopes.is_empty() {
                return Err(self.forbidden(
                    "insufficient_scope",
                    "the route needs scopes but authenticates nobody".to_owned(),
                ));
            }
            let rate = self.limit(caller.ip, None, guard).await?;
            return Ok(Admission {
                identity: None,
                rate,
                reason: if rate.is_some_and(|r| r.fail_open) {
                    "fail_open"
                } else {
                    "anonymous"
                },
            });
        }
        if let Some(wait) = guard.throttle.wait(budget_address(caller.ip)) {
            return Err(Box::new(Denial {
                status: StatusCode::TOO_MANY_REQUESTS,
                reason: "too_many_failures",
                detail: "too many failed authentications from this address; try again later"
                    .to_owned(),
                challenge: None,
                rate: None,
                retry_after: Some(wait),
            }));
        }
        let authenticated = match self.authenticate(caller, held).await {
            Ok(authenticated) => authenticated,
            Err(denial) => {
                // A node that cannot fetch its issuer's keys is no guess of the caller's.
                if denial.reason != "missing_credential"
                    && denial.reason != jwt::reason::KEYS_UNAVAILABLE
                {
                    guard
                        .throttle
                        .failed(budget_address(caller.ip), &guard.local);
                }
                return Err(denial);
            }
        };
        let consumer_id = authenticated.consumer_id;
        // Looked up before the consumer is, though checked after: the two lookups miss the
        // cache on a large config, and issued together their misses overlap.
        let subscription = held.subscription(&consumer_id, &self.api_id);
        let Some(consumer) = held.consumer(&consumer_id) else {
            return Err(self.unauthorized(
                "unknown_consumer",
                "the credential's consumer does not exist".to_owned(),
                None,
            ));
        };
        if consumer.disabled {
            return Err(self.forbidden("consumer_disabled", "the consumer is disabled".to_owned()));
        }
        let consumer_limits = self.consumer_policies(consumer, policies, Some(caller.ip))?;
        let subscription = self.admit_subscription(subscription)?;
        let plan = policies.plans.get(&subscription.plan_id);
        for scope in &self.scopes {
            let held_scope = authenticated.scopes.contains(scope)
                || plan.is_some_and(|p| p.scopes.contains(scope));
            if !held_scope {
                return Err(self.forbidden(
                    "insufficient_scope",
                    format!("the route needs the scope {scope:?}"),
                ));
            }
        }
        let consumer_name = CompactString::from(consumer.name());
        let subscriber = Subscriber {
            consumer_id,
            subscription_id: subscription.id,
            plan: plan.map(|plan| &**plan),
            consumer_limits,
        };
        let rate = self.limit(caller.ip, Some(&subscriber), guard).await?;
        Ok(Admission {
            identity: Some(Identity {
                consumer_id: Uuid::from_bytes(consumer_id),
                consumer_name,
                custom_id: CompactString::from(consumer.custom_id()),
                subscription_id: Uuid::from_bytes(subscription.id),
                credential_id: Uuid::from_bytes(authenticated.credential_id),
                ends: earliest(authenticated.ends, subscription.expires_at()),
                grant: Grant {
                    presented: authenticated.presented,
                    consumer_id,
                    api_id: self.api_id,
                    subscription_id: subscription.id,
                    token_ends: authenticated.token_ends,
                },
                claim_headers: authenticated.claim_headers,
                hidden_key: authenticated.hidden_key,
            }),
            rate,
            reason: if rate.is_some_and(|r| r.fail_open) {
                "fail_open"
            } else {
                "authenticated"
            },
        })
    }

    /// The consumer's own rate-limit policies, each once; with `ip`, a 403 instead when the
    /// consumer's IP lists refuse that address.
    fn consumer_policies<'p>(
        &self,
        consumer: &HeldConsumer,
        policies: &'p AccessPolicies,
        ip: Option<IpAddr>,
    ) -> Result<Vec<&'p LimitPolicy>, Box<Denial>> {
        let mut limits: Vec<&LimitPolicy> = Vec::new();
        for policy_id in consumer.policy_ids() {
            match policies.policies.get(&**policy_id) {
                Some(Compiled::Ip(rules)) => {
                    if let Some(ip) = ip
                        && !rules.admits(ip)
                    {
                        return Err(self.forbidden(
                            "ip_denied",
                            format!("the address {ip} may not be used by this consumer"),
                        ));
                    }
                }
                Some(Compiled::RateLimit(limit))
                    if !limits.iter().any(|held| std::ptr::eq(*held, &**limit)) =>
                {
                    limits.push(&**limit);
                }
                _ => {}
            }
        }
        Ok(limits)
    }

    /// Counts one message a WebSocket client of this route publishes against the budgets a
    /// request of the same caller counts against (its plan's, the API's and route's
    /// policies, its consumer's, its plan's monthly quota): a socket is no way around a
    /// plan's limits. The route's policies are this route's (as the session was opened on
    /// it); the consumer's and its plan's are `held`'s and `policies'`, the configuration
    /// running now. The refusal is a request's (429 with when to retry; 503 when Redis is
    /// down and the policy fails closed). `grant`: the caller's, `None` for an anonymous
    /// one. Only budgets are looked at: the caller's standing is the stream's
    /// ([`standing`]), and IP lists were checked at the handshake.
    pub async fn charge_message(
        &self,
        ip: IpAddr,
        grant: Option<&Grant>,
        held: &Holdings,
        policies: &AccessPolicies,
        guard: &AccessGuard,
    ) -> Result<(), Box<Denial>> {
        let Some(grant) = grant else {
            return self.limit(ip, None, guard).await.map(drop);
        };
        let Some(consumer) = held.consumer(&grant.consumer_id) else {
            return Err(self.unauthorized(
                "unknown_consumer",
                "the credential's consumer does not exist".to_owned(),
                None,
            ));
        };
        let consumer_limits = self.consumer_policies(consumer, policies, None)?;
        let subscription = held
            .subscription(&grant.consumer_id, &grant.api_id)
            .ok_or_else(|| {
                self.forbidden(
                    "no_subscription",
                    "the consumer has no subscription to this API".into(),
                )
            })?;
        let plan = policies.plans.get(&subscription.plan_id);
        let subscriber = Subscriber {
            consumer_id: grant.consumer_id,
            subscription_id: grant.subscription_id,
            plan: plan.map(|plan| &**plan),
            consumer_limits,
        };
        self.limit(ip, Some(&subscriber), guard).await.map(drop)
    }

    /// Tries each method whose credential the request carries; the first that succeeds
    /// wins. With none, the first refusal answers (401).
    async fn authenticate(
        &self,
        caller: &Caller<'_>,
        held: &Holdings,
    ) -> Result<Authenticated, Box<Denial>> {
        let mut refusal = None;
        for method in &self.authenticators {
            let attempt = match method {
                Authenticator::Key(auth) => match auth.find(caller.headers, caller.query) {
                    Some(presented) => self.by_key(held, &presented.sha256).map(|mut a| {
                        if auth.hide_credentials {
                            a.hidden_key = Some(presented.location);
                        }
                        a
                    }),
                    None => continue,
                },
                Authenticator::Jwt(auth) => match bearer_token(caller.headers) {
                    Some(token) => self.by_token(held, auth, token).await,
                    None => continue,
                },
                Authenticator::Mtls(auth) => match caller.certificate {
                    Some(certificate) => self.by_certificate(held, auth, certificate),
                    None => continue,
                },
            };
            match attempt {
                Ok(authenticated) => return Ok(authenticated),
                Err(denial) => {
                    refusal.get_or_insert(denial);
                }
            }
        }
        Err(refusal.unwrap_or_else(|| {
            self.unauthorized(
                "missing_credential",
                "the request carries no credential this route accepts".to_owned(),
                None,
            )
        }))
    }

    fn by_key(&self, held: &Holdings, sha256: &[u8; 32]) -> Result<Authenticated, Box<Denial>> {
        let Some(key) = held.api_key(sha256) else {
            return Err(self.unauthorized("invalid_key", "the API key is not valid".into(), None));
        };
        if key.revoked {
            return Err(self.unauthorized("key_revoked", "the API key is revoked".into(), None));
        }
        if has_passed(key.expires_at()) {
            return Err(self.unauthorized("key_expired", "the API key has expired".into(), None));
        }
        Ok(Authenticated::new(
            key.consumer_id,
            key.id,
            key.expires_at(),
            Presented::Key(*sha256),
        ))
    }

    async fn by_token(
        &self,
        held: &Holdings,
        auth: &JwtAuth,
        token: &str,
    ) -> Result<Authenticated, Box<Denial>> {
        let bearer_error = |reason: &'static str, detail: String| {
            let challenge = format!(
                "Bearer realm=\"sluice\", error=\"invalid_token\", error_description=\"{}\"",
                reason.replace('_', " ")
            );
            self.unauthorized(reason, detail, HeaderValue::from_str(&challenge).ok())
        };
        let token = auth.verifier.verify(token).await.map_err(|r| {
            // The detail names issuers, key ids and the JWKS's address: for the log only.
            tracing::debug!(reason = r.reason, detail = %r.detail, "token refused");
            bearer_error(r.reason, jwt::reason::told(r.reason).to_owned())
        })?;
        let digest = CredentialIdentity::Jwt {
            issuer: &token.issuer,
            subject: &token.subject,
        }
        .digest();
        let credential = held.credential_by_digest(&digest).ok_or_else(|| {
            bearer_error(
                "unknown_subject",
                format!(
                    "no consumer has a JWT credential for issuer {:?} and subject {:?}",
                    token.issuer, token.subject
                ),
            )
        })?;
        let mut authenticated = self.by_credential(&credential, digest)?;
        let token_ends = Timestamp {
            seconds: i64::try_from(token.refused_from).unwrap_or(i64::MAX),
            nanos: 0,
        };
        authenticated.token_ends = Some((token_ends.seconds, token_ends.nanos));
        authenticated.ends = earliest(authenticated.ends, Some(token_ends));
        authenticated.scopes = token.scopes;
        let claim_headers = auth.claim_headers.get(&*token.issuer);
        for (claim, header) in claim_headers.into_iter().flatten() {
            let value = match token.claims.get(claim) {
                None => continue,
                Some(serde_json::Value::String(text)) => HeaderValue::from_str(text),
                Some(other) => HeaderValue::from_str(&other.to_string()),
            };
            // A claim that cannot be a header value (a newline in it) is not passed on.
            if let Ok(value) = value {
                authenticated.claim_headers.push((header.clone(), value));
            }
        }
        Ok(authenticated)
    }

    fn by_certificate(
        &self,
        held: &Holdings,
        auth: &MtlsAuth,
        certificate: &ClientCertificate,
    ) -> Result<Authenticated, Box<Denial>> {
        let anchors = auth
            .verify(certificate)
            .map_err(|(reason, detail)| self.unauthorized(reason, detail, None))?;
        // The certificate itself, then its subject under a CA it chains to, then its subject
        // under any CA.
        let by_subject = certificate
            .subject
            .as_deref()
            .into_iter()
            .flat_map(|subject| {
                let cas = anchors.iter().copied().chain([""]);
                cas.map(move |ca| CredentialIdentity::CertificateSubject { subject, ca })
            });
        let (credential, digest) = std::iter::once(CredentialIdentity::CertificateFingerprint(
            &certificate.fingerprint_sha256,
        ))
        .chain(by_subject)
        .find_map(|identity| {
            let digest = identity.digest();
            Some((held.credential_by_digest(&digest)?, digest))
        })
        .ok_or_else(|| {
            self.unauthorized(
                "unknown_certificate",
                "no consumer has a credential for this client certificate".into(),
                None,
            )
        })?;
        self.by_credential(&credential, digest)
    }

    /// `credential`, found under `digest` ([`CredentialIdentity::digest`]), if it is in force.
    fn by_credential(
        &self,
        credential: &pb::Credential,
        digest: [u8; 32],
    ) -> Result<Authenticated, Box<Denial>> {
        if credential.revoked {
            return Err(self.unauthorized(
                "credential_revoked",
                "the credential is revoked".into(),
                None,
            ));
        }
        if has_passed(credential.expires_at) {
            return Err(self.unauthorized(
                "credential_expired",
                "the credential has expired".into(),
                None,
            ));
        }
        let id = uuid_bytes(credential.meta.as_ref().map_or("", |m| m.id.as_str()));
        Ok(Authenticated::new(
            uuid_bytes(&credential.consumer_id),
            id,
            credential.expires_at,
            Presented::Credential(digest),
        ))
    }

    /// The consumer's subscription to this route's API, if it lets the request through.
    fn admit_subscription(
        &self,
        subscription: Option<HeldSubscription>,
    ) -> Result<HeldSubscription, Box<Denial>> {
        let subscription = subscription.ok_or_else(|| {
            self.forbidden(
                "no_subscription",
                "the consumer has no subscription to this API".into(),
            )
        })?;
        if subscription.suspended {
            return Err(self.forbidden(
                "subscription_suspended",
                "the consumer's subscription to this API is suspended".into(),
            ));
        }
        if has_passed(subscription.expires_at()) {
            return Err(self.forbidden(
                "subscription_expired",
                "the consumer's subscription to this API has expired".into(),
            ));
        }
        Ok(subscription)
    }

    /// Counts the request against every budget that applies: in the node's memory first,
    /// then in Redis (one round trip for all of them).
    async fn limit(
        &self,
        ip: IpAddr,
        subscriber: Option<&Subscriber<'_>>,
        guard: &AccessGuard,
    ) -> Result<Option<RateHeaders>, Box<Denial>> {
        use pb::rate_limit_policy::Scope;
        let consumer = subscriber.map(|s| s.consumer_id);
        let subject_of = |scope: Scope| match (scope, consumer) {
            (Scope::Api, _) => Subject::Whole,
            (Scope::Ip, _) | (_, None) => Subject::Ip(budget_address(ip)),
            (_, Some(consumer)) => Subject::Consumer(consumer),
        };
        // On the stack for the usual few: this runs on every request of a limited route.
        let mut counted: SmallVec<[Counted; 4]> = SmallVec::new();
        for (policy, scope_id) in &self.limits {
            counted.push((
                BudgetKey {
                    scope: *scope_id,
                    subject: subject_of(policy.scope),
                },
                &policy.rates,
                policy.redis,
                policy.fail_open,
            ));
        }
        let mut quota = None;
        if let Some(subscriber) = subscriber {
            for policy in &subscriber.consumer_limits {
                counted.push((
                    BudgetKey {
                        scope: policy.id,
                        subject: Subject::Consumer(subscriber.consumer_id),
                    },
                    &policy.rates,
                    policy.redis,
                    policy.fail_open,
                ));
            }
            if let Some(plan) = &subscriber.plan {
                let key = BudgetKey {
                    scope: subscriber.subscription_id,
                    subject: Subject::Whole,
                };
                if plan.monthly_quota > 0 {
                    quota = Some((key.clone(), plan.monthly_quota, plan.fail_open));
                }
                if !plan.rates.is_empty() {
                    counted.push((key, &plan.rates, plan.redis, plan.fail_open));
                }
            }
        }
        if counted.is_empty() && quota.is_none() {
            return Ok(None);
        }
        let local: SmallVec<[Budget; 4]> = counted
            .iter()
            .filter(|(_, _, redis, _)| !redis)
            .map(|(key, rates, _, _)| Budget { key, rates })
            .collect();
        let in_redis = counted.iter().any(|(_, _, redis, _)| *redis) || quota.is_some();
        let mut decision = Decision::unlimited();
        if !local.is_empty() {
            decision = guard.local.check(&local);
            if !decision.allowed {
                return Err(Denial::limited(decision));
            }
        }
        // A request refused in Redis (or because Redis cannot be asked) gives back what it
        // counted here: it spends no budget anywhere.
        let refused = |denial: Box<Denial>| {
            if !local.is_empty() {
                guard.local.refund(&local);
            }
            Err(denial)
        };
        let shared: Vec<Budget> = counted
            .iter()
            .filter(|(_, _, redis, _)| *redis)
            .map(|(key, rates, _, _)| Budget { key, rates })
            .collect();
        let quotas: Vec<Quota> = quota
            .iter()
            .map(|(key, per_month, _)| Quota {
                key,
                per_month: *per_month,
            })
            .collect();
        let mut fail_open = false;
        if in_redis {
            let answer = match &guard.redis {
                Some(redis) => redis
                    .check(&shared, &quotas)
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("the node has no Redis (--redis-url)".to_owned()),
            };
            match answer {
                Ok(shared) if !shared.allowed => return refused(Denial::limited(shared)),
                Ok(shared) => decision = decision.merge(shared),
                Err(why) => {
                    let opens = counted.iter().all(|(_, _, redis, open)| !redis || *open)
                        && quota.as_ref().is_none_or(|(_, _, open)| *open);
                    if !opens {
                        // Debug: the breaker logs an outage once, not per request refused.
                        tracing::debug!(error = %why, "rate limits counted in Redis cannot be checked: refusing");
                        return refused(Box::new(Denial {
                            status: StatusCode::SERVICE_UNAVAILABLE,
                            reason: "limits_unavailable",
                            detail: "rate limits cannot be checked right now".into(),
                            challenge: None,
                            rate: None,
                            retry_after: Some(Duration::from_secs(1)),
                        }));
                    }
                    tracing::debug!(error = %why, "rate limits counted in Redis cannot be checked: allowing (fail_open)");
                    fail_open = true;
                }
            }
        }
        Ok(Some(RateHeaders {
            decision,
            fail_open,
        }))
    }

    fn unauthorized(
        &self,
        reason: &'static str,
        detail: String,
        challenge: Option<HeaderValue>,
    ) -> Box<Denial> {
        let challenge = challenge.or_else(|| {
            let schemes: Vec<String> = self
                .authenticators
                .iter()
                .map(|a| match a {
                    Authenticator::Key(k) => k.challenge(),
                    Authenticator::Jwt(_) => "Bearer realm=\"sluice\"".to_owned(),
                    Authenticator::Mtls(_) => "Certificate realm=\"sluice\"".to_owned(),
                })
                .collect();
            HeaderValue::from_str(&schemes.join(", ")).ok()
        });
        Box::new(Denial {
            status: StatusCode::UNAUTHORIZED,
            reason,
            detail,
            challenge,
            rate: None,
            retry_after: None,
        })
    }

    fn forbidden(&self, reason: &'static str, detail: String) -> Box<Denial> {
        Box::new(Denial {
            status: if self.hide_when_forbidden {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::FORBIDDEN
            },
            reason,
            detail,
            challenge: None,
            rate: None,
            retry_after: None,
        })
    }
}

/// The request headers the gateway sets from the caller's identity.
static IDENTITY_HEADERS: [HeaderName; 5] = [
    HeaderName::from_static("x-consumer-id"),
    HeaderName::from_static("x-consumer-name"),
    HeaderName::from_static("x-consumer-custom-id"),
    HeaderName::from_static("x-subscription-id"),
    HeaderName::from_static("x-credential-id"),
];

/// The earlier of two expiries, either of which may be none.
fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if (a.seconds, a.nanos) <= (b.seconds, b.nanos) {
            a
        } else {
            b
        }),
        (a, b) => a.or(b),
    }
}

/// Whether a credential's or subscription's expiry has passed.
fn has_passed(expires_at: Option<Timestamp>) -> bool {
    let Some(at) = expires_at else { return false };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let now = (now.as_secs() as i64, now.subsec_nanos() as i32);
    (at.seconds, at.nanos) <= now
}

/// The token of an `Authorization: Bearer` header.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// What the check reads of a request.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'r> {
    pub ip: IpAddr,
    pub headers: &'r HeaderMap,
    pub query: Option<&'r str>,
    pub certificate: Option<&'r ClientCertificate>,
}

/// Who a credential proved the caller to be.
#[derive(Debug)]
struct Authenticated {
    consumer_id: [u8; 16],
    credential_id: [u8; 16],
    /// When the credential (or token) stops being accepted, if it does.
    ends: Option<Timestamp>,
    scopes: Vec<String>,
    claim_headers: Vec<(HeaderName, HeaderValue)>,
    hidden_key: Option<KeyLocation>,
    presented: Presented,
    /// A token's own end (`exp` plus leeway).
    token_ends: Option<(i64, i32)>,
}

impl Authenticated {
    fn new(
        consumer_id: [u8; 16],
        credential_id: [u8; 16],
        ends: Option<Timestamp>,
        presented: Presented,
    ) -> Self {
        Authenticated {
            consumer_id,
            credential_id,
            ends,
            presented,
            token_ends: None,
            scopes: Vec::new(),
            claim_headers: Vec::new(),
            hidden_key: None,
        }
    }
}

/// A consumer with a subscription in force, for its rate limits.
#[derive(Debug)]
struct Subscriber<'p> {
    consumer_id: [u8; 16],
    subscription_id: [u8; 16],
    plan: Option<&'p PlanLimits>,
    consumer_limits: Vec<&'p LimitPolicy>,
}

/// A request let through.
#[derive(Debug)]
pub struct Admission {
    /// `None` on a route that authenticates nobody.
    pub identity: Option<Identity>,
    /// The tightest budget the request was counted against, for the `RateLimit-*` headers.
    pub rate: Option<RateHeaders>,
    /// `authenticated`, `anonymous`, or `fail_open` (Redis was down and the policy allows).
    pub reason: &'static str,
}

/// The budget reported in `RateLimit-*` headers.
#[derive(Debug, Clone, Copy)]
pub struct RateHeaders {
    pub decision: Decision,
    /// Redis could not be asked and the policy let the request through.
    pub fail_open: bool,
}

/// The caller, as passed upstream.
#[derive(Debug)]
pub struct Identity {
    pub consumer_id: Uuid,
    /// Copied from the held consumer: in place, with no allocation, when short.
    pub consumer_name: CompactString,
    pub custom_id: CompactString,
    pub subscription_id: Uuid,
    pub credential_id: Uuid,
    /// When the caller's access ends by itself: its credential's or token's expiry, or its
    /// subscription's. Event streams end then (the caller reconnects with a fresh one).
    pub ends: Option<Timestamp>,
    /// What the admission rested on: looked at again, while the caller's event streams are
    /// open, in every configuration the node applies ([`standing`]).
    pub grant: Grant,
    claim_headers: Vec<(HeaderName, HeaderValue)>,
    hidden_key: Option<KeyLocation>,
}

impl Identity {
    /// The value of a JWT claim mapped to identity header `name` (the issuer's
    /// `claim_headers`), if the caller's token had it.
    pub fn claim_header(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.claim_headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value)
    }

    /// Sets the identity headers on the request going upstream (the client's copies were
    /// removed first: [`RouteAccess::reserved_headers`]) and removes a hidden API key header.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let mut set = |name: &HeaderName, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name.clone(), value);
            }
        };
        set(&IDENTITY_HEADERS[0], &self.consumer_id.to_string());
        set(&IDENTITY_HEADERS[1], &self.consumer_name);
        if !self.custom_id.is_empty() {
            set(&IDENTITY_HEADERS[2], &self.custom_id);
        }
        set(&IDENTITY_HEADERS[3], &self.subscription_id.to_string());
        set(&IDENTITY_HEADERS[4], &self.credential_id.to_string());
        for (name, value) in &self.claim_headers {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(KeyLocation::Header(name)) = &self.hidden_key {
            headers.remove(name);
        }
    }

    /// The query to forward: without the API key, when it came in the query and is hidden.
    pub fn forwarded_query<'q>(&self, query: Option<&'q str>) -> Option<std::borrow::Cow<'q, str>> {
        match (&self.hidden_key, query) {
            (Some(KeyLocation::Query(param)), Some(query)) => {
                key::query_without(query, param).map(std::borrow::Cow::Owned)
            }
            (_, query) => query.map(std::borrow::Cow::Borrowed),
        }
    }
}

/// A request refused.
#[derive(Debug)]
pub struct Denial {
    pub status: StatusCode,
    /// A fixed code, for metrics and the access log.
    pub reason: &'static str,
    /// What the client is told.
    pub detail: String,
    /// `WWW-Authenticate`, on a 401.
    pub challenge: Option<HeaderValue>,
    pub rate: Option<Decision>,
    pub retry_after: Option<Duration>,
}

impl Denial {
    fn limited(decision: Decision) -> Box<Self> {
        Box::new(Denial {
            status: StatusCode::TOO_MANY_REQUESTS,
            reason: "rate_limited",
            detail: "rate limit exceeded".into(),
            challenge: None,
            rate: Some(decision),
            retry_after: decision.retry_after.or(Some(Duration::from_secs(1))),
        })
    }
}

/// Adds `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (delta seconds) for
/// `decision`, and `Retry-After` when given.
pub fn rate_limit_headers(
    headers: &mut HeaderMap,
    decision: Option<&Decision>,
    retry_after: Option<Duration>,
) {
    if let Some(decision) = decision.filter(|d| d.limit != u64::MAX) {
        headers.insert("ratelimit-limit", HeaderValue::from(decision.limit));
        headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
        headers.insert(
            "ratelimit-reset",
            HeaderValue::from(whole_seconds(decision.reset)),
        );
    }
    if let Some(wait) = retry_after {
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(whole_seconds(wait).max(1)),
        );
    }
}

/// Seconds, rounded up to the nanosecond: a client told to wait 0.2 s waits 1, never 0, and
/// one told 2.0004 s waits 3, never too early.
fn whole_seconds(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_rounded_up_never_down() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_micros(500)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
        assert_eq!(whole_seconds(Duration::from_micros(2_000_400)), 3);
        assert_eq!(whole_seconds(Duration::from_nanos(2_000_000_001)), 3);
    }
}
