//! Upstreams at run time: targets, the balancer, a keep-alive connection pool and the
//! concurrency cap, keyed by the upstream's id so they survive a config swap that leaves the
//! upstream unchanged (see [`Upstream::reuse`]).

pub mod balancer;
pub mod circuit;
pub mod health;
pub mod outlier;
pub mod retry;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sluice_proto::pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use balancer::Balancer;
use circuit::CircuitBreaker;
use health::{HealthSettings, TargetHealth};
use outlier::{Ejection, OutlierSettings};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use retry::RetryPolicy;

use crate::telemetry::Metrics;
use crate::tls::client::{Alpn, Connector};

/// The body type of every request the node sends and every response it returns.
pub type ProxyBody = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Defaults for timeouts the upstream leaves at 0.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle keep-alive connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per target.
const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// An upstream, ready to take requests.
#[derive(Debug)]
pub struct Upstream {
    pub id: Arc<str>,
    pub name: Arc<str>,
    /// The encoded resource without its resource version: equal fingerprints mean nothing
    /// that matters to runtime state changed.
    fingerprint: Vec<u8>,
    pub targets: Vec<Target>,
    balancer: Balancer,
    client: Client<Connector, ProxyBody>,
    /// For upgrade requests (WebSocket) when `client` may negotiate h2 over TLS: upgrades
    /// exist only in HTTP/1.1, so they go out on connections that offer nothing else.
    upgrade_client: Option<Client<Connector, ProxyBody>>,
    pub connect_timeout: Duration,
    /// Per try; `None` means only the total deadline applies.
    pub per_try_timeout: Option<Duration>,
    pub total_timeout: Duration,
    /// Requests go out as HTTP/2 (prior knowledge) rather than HTTP/1.1.
    pub http2: bool,
    concurrency: Option<Arc<Semaphore>>,
    /// Time to response headers.
    pub duration: Histogram,
    pub retry: RetryPolicy,
    /// `None` when the upstream has none.
    pub circuit: Option<CircuitBreaker>,
    /// Passive ejection; `None` when off.
    outlier: Option<OutlierSettings>,
    /// Targets ejected by outlier detection.
    ejections: Counter,
    /// Held while an ejection is decided.
    ejecting: std::sync::Mutex<()>,
}

/// One address of an upstream.
#[derive(Debug)]
pub struct Target {
    pub scheme: Scheme,
    pub authority: Authority,
    /// As configured: its metric series' label.
    pub url: Arc<str>,
    in_flight: AtomicUsize,
    /// Active health checks' verdict.
    pub health: TargetHealth,
    /// Passive ejection's.
    pub ejection: Ejection,
}

impl Target {
    /// Whether balancing may pick this target.
    pub fn is_usable(&self) -> bool {
        self.health.is_healthy() && !self.ejection.is_ejected()
    }
}

/// Why an upstream could not take a request.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {0} has no usable target")]
    NoTarget(Arc<str>),
    #[error("upstream {0} is at its limit of concurrent requests")]
    Overloaded(Arc<str>),
    #[error("cannot connect to upstream {upstream}: {source}")]
    Connect {
        upstream: Arc<str>,
        #[source]
        source: BoxError,
    },
    #[error("upstream {upstream}'s circuit breaker is open")]
    CircuitOpen {
        upstream: Arc<str>,
        retry_after: Duration,
    },
    #[error("upstream {0} did not answer in time")]
    Timeout(Arc<str>),
    #[error("upstream {upstream} failed: {source}")]
    Failed {
        upstream: Arc<str>,
        #[source]
        source: BoxError,
    },
}

/// A request's claim on a target: counts towards least-request balancing and the upstream's
/// concurrency cap until dropped (when the response body is finished or abandoned).
#[derive(Debug)]
pub struct Lease {
    upstream: Arc<Upstream>,
    target: usize,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Lease {
    pub fn target(&self) -> &Target {
        &self.upstream.targets[self.target]
    }

    /// The target's index in its upstream.
    pub fn index(&self) -> usize {
        self.target
    }

    /// Moves the claim to another usable target for a retry (back to the one that failed
    /// only when it is the only usable one), keeping the request's concurrency slot: a retry
    /// never waits for, nor loses to another request, a slot it already had. Unchanged when
    /// no target is usable.
    pub fn retarget(&mut self, headers: &HeaderMap) -> Result<(), UpstreamError> {
        let upstream = &self.upstream;
        let failed = self.target;
        let target = upstream.pick(headers, Some(failed))?;
        upstream.targets[target]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        upstream.targets[failed]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        self.target = target;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.upstream.targets[self.target]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstream {
    /// Builds the runtime of `config`, or returns `previous` when it is the same upstream
    /// unchanged, keeping its connections and counters.
    pub fn reuse(
        config: &pb::Upstream,
        previous: Option<&Arc<Upstream>>,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, String> {
        let fingerprint = fingerprint(config);
        if let Some(previous) = previous
            && previous.fingerprint == fingerprint
        {
            return Ok(previous.clone());
        }
        let upstream = Arc::new(Self::new(config, fingerprint, metrics)?);
        if let Some(settings) = HealthSettings::new(config.health_check.as_ref())? {
            // Checks need a runtime; compiling a config outside one (a unit test) only loses
            // the probing, never the config.
            if tokio::runtime::Handle::try_current().is_ok() {
                health::spawn_checker(&upstream, settings);
            }
        }
        Ok(upstream)
    }

    fn new(config: &pb::Upstream, fingerprint: Vec<u8>, metrics: &Metrics) -> Result<Self, String> {
        let meta = config.meta.clone().unwrap_or_default();
        let mut targets = Vec::new();
        let mut weights = Vec::new();
        for target in &config.targets {
            let uri: http::Uri = target
                .url
                .parse()
                .map_err(|e| format!("target {:?}: {e}", target.url))?;
            let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
            if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
                return Err(format!(
                    "target {:?}: scheme must be http or https",
                    target.url
                ));
            }
            let authority = uri
                .authority()
                .cloned()
                .ok_or_else(|| format!("target {:?} has no host", target.url))?;
            targets.push(Target {
                scheme,
                authority,
                url: target.url.as_str().into(),
                in_flight: AtomicUsize::new(0),
                health: TargetHealth::new(),
                ejection: Ejection::default(),
            });
            weights.push(if target.weight == 0 {
                100
            } else {
                target.weight
            });
        }
        if targets.is_empty() {
            return Err("has no targets".into());
        }
        let balancer = Balancer::new(config.load_balancing.as_ref(), &weights)?;
        let timeouts = config.timeouts.unwrap_or_default();
        let connect_timeout = non_zero_ms(timeouts.connect_ms).unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        // The TLS connector wrapping it takes https URIs.
        connector.enforce_http(false);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        let http2 = config.protocol == pb::UpstreamProtocol::Http2 as i32;
        builder.http2_only(http2);
        let alpn = match pb::UpstreamProtocol::try_from(config.protocol) {
            Ok(pb::UpstreamProtocol::Http1) => Alpn::Http1,
            Ok(pb::UpstreamProtocol::Http2) => Alpn::Http2,
            _ => Alpn::Any,
        };
        let upgrade_client = (alpn == Alpn::Any
            && targets.iter().any(|t| t.scheme == Scheme::HTTPS))
        .then(|| crate::tls::client::connector(connector.clone(), config.tls.as_ref(), Alpn::Http1))
        .transpose()?
        .map(|connector| builder.build(connector));
        let connector = crate::tls::client::connector(connector, config.tls.as_ref(), alpn)?;
        Ok(Upstream {
            id: meta.id.as_str().into(),
            name: meta.name.as_str().into(),
            fingerprint,
            targets,
            balancer,
            client: builder.build(connector),
            upgrade_client,
            connect_timeout,
            per_try_timeout: non_zero_ms(timeouts.per_try_ms),
            total_timeout: non_zero_ms(timeouts.total_ms).unwrap_or(DEFAULT_TOTAL_TIMEOUT),
            http2,
            concurrency: (config.max_concurrent_requests > 0)
                .then(|| Arc::new(Semaphore::new(config.max_concurrent_requests as usize))),
            duration: metrics.upstream(&meta.name),
            retry: RetryPolicy::new(config.retry.as_ref()),
            circuit: CircuitBreaker::new(config.circuit_breaker.as_ref()),
            outlier: OutlierSettings::new(config.outlier_detection.as_ref()),
            ejections: metrics.ejections(&meta.name),
            ejecting: std::sync::Mutex::new(()),
        })
    }

    /// Writes the targets' health and the breaker's state to their gauges: called when the
    /// configuration holding this upstream is applied, so that one built and then refused
    /// (or rolled back) never shows its fresh state in place of the running one's.
    pub fn publish_state(&self, metrics: &Metrics) {
        for target in &self.targets {
            target
                .health
                .publish(metrics.target_healthy(&self.name, &target.url));
        }
        if let Some(breaker) = &self.circuit {
            breaker.publish(metrics.circuit_state(&self.name));
        }
    }

    /// Picks a target for a request with these headers and claims it.
    pub fn lease(self: &Arc<Self>, headers: &HeaderMap) -> Result<Lease, UpstreamError> {
        let permit = match &self.concurrency {
            Some(semaphore) => Some(
                semaphore
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| UpstreamError::Overloaded(self.name.clone()))?,
            ),
            None => None,
        };
        let target = self.pick(headers, None)?;
        self.targets[target]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            upstream: self.clone(),
            target,
            _permit: permit,
        })
    }

    /// A usable target for a request with these headers. `avoid` is a target that just
    /// failed this request: another is preferred when there is one.
    fn pick(&self, headers: &HeaderMap, avoid: Option<usize>) -> Result<usize, UpstreamError> {
        let in_flight = |i: usize| self.targets[i].in_flight.load(Ordering::Relaxed);
        let usable = |i: usize| self.targets[i].is_usable();
        self.balancer
            .pick(headers, &|i| Some(i) != avoid && usable(i), &in_flight)
            .or_else(|| self.balancer.pick(headers, &usable, &in_flight))
            .ok_or_else(|| UpstreamError::NoTarget(self.name.clone()))
    }

    /// Feeds one try's result to passive ejection. A failure is a connect error, a timeout,
    /// or a 502, 503 or 504 answer.
    pub fn report(&self, target: usize, failed: bool) {
        let Some(settings) = &self.outlier else {
            return;
        };
        let t = &self.targets[target];
        if !t.ejection.record(failed, settings) {
            return;
        }
        // Deciding under a lock: two targets failing at once must not both be taken out when
        // only one may be. Targets down by active checks count as out too.
        let _deciding = self
            .ejecting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if t.ejection.is_ejected() {
            return;
        }
        let out = self.targets.iter().filter(|t| !t.is_usable()).count();
        if out >= settings.max_ejected(self.targets.len()) {
            return;
        }
        let length = t.ejection.eject(settings);
        self.ejections.inc();
        tracing::warn!(
            upstream = %self.name,
            target = %t.authority,
            for_ms = length.as_millis() as u64,
            "target ejected after consecutive failures"
        );
    }

    /// Sends `request` (its URI already pointing at the leased target) and waits for the
    /// response headers, within `timeout`.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let timeout = self.per_try_timeout.map_or(timeout, |t| t.min(timeout));
        let client = match &self.upgrade_client {
            Some(http1) if request.headers().contains_key(http::header::UPGRADE) => http1,
            _ => &self.client,
        };
        match tokio::time::timeout(timeout, client.request(request)).await {
            Err(_) => Err(UpstreamError::Timeout(self.name.clone())),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Connect {
                upstream: self.name.clone(),
                source: Box::new(e),
            }),
            Ok(Err(e)) => Err(UpstreamError::Failed {
                upstream: self.name.clone(),
                source: Box::new(e),
            }),
        }
    }
}

/// An empty request or response body.
pub fn empty_body() -> ProxyBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

fn fingerprint(config: &pb::Upstream) -> Vec<u8> {
    crate::config::runtime_fingerprint(config, |c| c.meta.as_mut())
}

fn non_zero_ms(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(targets: &[&str]) -> Arc<Upstream> {
        let config = pb::Upstream {
            meta: Some(pb::Meta {
                id: "id-u".into(),
                name: "u".into(),
                ..Default::default()
            }),
            targets: targets
                .iter()
                .map(|url| pb::Target {
                    url: (*url).into(),
                    weight: 0,
                })
                .collect(),
            max_concurrent_requests: 1,
            ..Default::default()
        };
        Upstream::reuse(&config, None, &Metrics::new()).unwrap()
    }

    fn eject(upstream: &Upstream, target: usize) {
        let settings = OutlierSettings::new(Some(&pb::OutlierDetection {
            consecutive_failures: 1,
            ..Default::default()
        }))
        .unwrap();
        upstream.targets[target].ejection.eject(&settings);
    }

    fn in_flight(upstream: &Upstream) -> Vec<usize> {
        upstream
            .targets
            .iter()
            .map(|t| t.in_flight.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn a_retry_moves_its_claim_and_keeps_its_slot_or_stays_put() {
        let two = upstream(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        let headers = HeaderMap::new();
        let mut lease = two.lease(&headers).unwrap();
        let first = lease.index();
        lease.retarget(&headers).unwrap();
        assert_ne!(lease.index(), first, "another target is preferred");
        assert_eq!(in_flight(&two).iter().sum::<usize>(), 1);
        assert_eq!(in_flight(&two)[lease.index()], 1);
        assert!(
            matches!(two.lease(&headers), Err(UpstreamError::Overloaded(_))),
            "the request's one slot went with it"
        );

        // Nowhere left to go: the claim stays where it was, for the answer it got there.
        let one = upstream(&["http://127.0.0.1:1"]);
        let mut lease = one.lease(&headers).unwrap();
        eject(&one, 0);
        assert!(matches!(
            lease.retarget(&headers),
            Err(UpstreamError::NoTarget(_))
        ));
        assert_eq!(lease.index(), 0);
        assert_eq!(in_flight(&one), [1]);
        drop(lease);
        assert_eq!(in_flight(&one), [0]);
    }
}
