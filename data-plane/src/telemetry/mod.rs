//! Prometheus metrics and the access log.
//!
//! Per-route and per-upstream series are resolved when a config is compiled
//! ([`Metrics::route`], [`Metrics::upstream`]): a request only bumps atomics it already holds,
//! it never hashes label sets.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets, seconds: 0.5 ms to 30 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

/// A route's request counters, one per class of status.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// What a shadow request can come to (`server::mirror`).
pub const MIRROR_RESULTS: [&str; 4] = ["answered", "failed", "skipped", "abandoned"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    api: String,
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatusLabels {
    api: String,
    route: String,
    status_class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    group: String,
    certificate: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    upstream: String,
    target: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MirrorLabels {
    upstream: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PublishLabels {
    topic: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BrokerLabels {
    broker: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApplyLabels {
    kind: &'static str,
}

/// Config apply buckets, seconds: 0.1 ms to 30 s.
const APPLY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 30.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccessLabels {
    decision: &'static str,
    reason: &'static str,
}

/// Every metric the node exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatusLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    upstream_duration: Family<UpstreamLabels, Histogram>,
    circuit_state: Family<UpstreamLabels, Gauge>,
    certificate_not_after: Family<CertificateLabels, Gauge>,
    target_healthy: Family<TargetLabels, Gauge>,
    ejections: Family<UpstreamLabels, Counter>,
    mirrored: Family<MirrorLabels, Counter>,
    unrouted: Family<ReasonLabels, Counter>,
    access: Family<AccessLabels, Counter>,
    pub in_flight: Gauge,
    pub client_connections: Gauge,
    /// Connections closed for a missing or malformed PROXY protocol header.
    pub proxy_protocol_refused: Counter,
    pub config_version: Gauge,
    /// Unix seconds when the running configuration was applied: its age is `time() - this`.
    pub config_loaded_at: Gauge,
    /// 1 while a discovery stream to a control plane is open.
    pub control_plane_connected: Gauge,
    pub config_swaps: Counter,
    pub config_rejections: Counter,
    config_apply: Family<ApplyLabels, Histogram>,
    pub access_log_dropped: Gauge<u64, AtomicU64>,
    publishes: Family<PublishLabels, Counter>,
    publish_duration: Family<TopicLabels, Histogram>,
    producer_queue: Family<BrokerLabels, Gauge>,
    subscribers: Family<TopicLabels, Gauge>,
    delivered: Family<TopicLabels, Counter>,
    closed_slow: Family<TopicLabels, Counter>,
}

/// A route's series, held by the compiled route and made on its first request: a config of
/// 20k routes would otherwise hold 20k sets of series (about a kilobyte each) for routes that
/// may never see a request. A route's series appear in `/metrics` once it has served one.
#[derive(Debug)]
pub struct RouteMetrics {
    requests: Family<RouteStatusLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    api: Arc<str>,
    route: Arc<str>,
    series: OnceLock<RouteSeries>,
}

#[derive(Debug)]
struct RouteSeries {
    /// By status class: 1xx to 5xx.
    by_class: [Counter; 5],
    duration: Histogram,
}

impl RouteMetrics {
    pub fn record(&self, status: u16, seconds: f64) {
        let series = self.series.get_or_init(|| {
            let class = |status_class| {
                self.requests
                    .get_or_create(&RouteStatusLabels {
                        api: label_value(&self.api),
                        route: label_value(&self.route),
                        status_class,
                    })
                    .clone()
            };
            RouteSeries {
                by_class: STATUS_CLASSES.map(class),
                duration: self
                    .request_duration
                    .get_or_create(&RouteLabels {
                        api: label_value(&self.api),
                        route: label_value(&self.route),
                    })
                    .clone(),
            }
        });
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        series.by_class[class].inc();
        series.duration.observe(seconds);
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let requests = Family::<RouteStatusLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered by a route, by status class",
            requests.clone(),
        );
        let request_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, per route",
            request_duration.clone(),
        );
        let upstream_duration = Family::<UpstreamLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> _,
        );
        registry.register(
            "upstream_duration_seconds",
            "Time an upstream took to answer with headers",
            upstream_duration.clone(),
        );
        let circuit_state = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_circuit_state",
            "Circuit breaker state per upstream: 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        let certificate_not_after = Family::<CertificateLabels, Gauge>::default();
        registry.register(
            "certificate_not_after_timestamp_seconds",
            "When each certificate the TLS listener serves expires (its leaf's notAfter), Unix \
             seconds",
            certificate_not_after.clone(),
        );
        let target_healthy = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "upstream_target_healthy",
            "1 while a target passes its active health checks (or has none), 0 while ejected",
            target_healthy.clone(),
        );
        let ejections = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_ejections",
            "Targets taken out of balancing by outlier detection (passive health)",
            ejections.clone(),
        );
        let mirrored = Family::<MirrorLabels, Counter>::default();
        registry.register(
            "mirror_requests",
            "Shadow copies of requests by result: answered, failed, abandoned (the mirror \
             fell behind the client's body), skipped (the mirror upstream was at its limit)",
            mirrored.clone(),
        );
        let unrouted = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "unrouted_requests",
            "Requests answered before any route: no route, bad path, malformed, not ready",
            unrouted.clone(),
        );
        let access = Family::<AccessLabels, Counter>::default();
        registry.register(
            "access_decisions",
            "Access-control decisions on routes with policies, by decision (allow, deny) and \
             reason code",
            access.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests being served",
            in_flight.clone(),
        );
        let client_connections = Gauge::default();
        registry.register(
            "client_connections",
            "Open client connections (all listeners), against --max-connections",
            client_connections.clone(),
        );
        let proxy_protocol_refused = Counter::default();
        registry.register(
            "proxy_protocol_refused",
            "Client connections closed for a missing or malformed PROXY protocol header (--proxy-protocol)",
            proxy_protocol_refused.clone(),
        );
        let config_version = Gauge::default();
        registry.register(
            "config_version",
            "Config version applied (0 for a file)",
            config_version.clone(),
        );
        let config_loaded_at = Gauge::default();
        registry.register(
            "config_loaded_timestamp_seconds",
            "When the running configuration was applied, Unix seconds (0 before any)",
            config_loaded_at.clone(),
        );
        let control_plane_connected = Gauge::default();
        registry.register(
            "control_plane_connected",
            "1 while a discovery stream to a control plane is open, else 0",
            control_plane_connected.clone(),
        );
        let config_swaps = Counter::default();
        registry.register(
            "config_swaps",
            "Configurations applied",
            config_swaps.clone(),
        );
        let config_rejections = Counter::default();
        registry.register(
            "config_rejections",
            "Configurations refused (the previous one kept serving)",
            config_rejections.clone(),
        );
        let config_apply = Family::<ApplyLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(APPLY_BUCKETS)) as fn() -> _,
        );
        registry.register(
            "config_apply_seconds",
            "Time to check, compile and swap in a configuration, by kind (file, snapshot, delta)",
            config_apply.clone(),
        );
        let access_log_dropped = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "access_log_dropped",
            "Log lines dropped because the log writer fell behind",
            access_log_dropped.clone(),
        );
        let publishes = Family::<PublishLabels, Counter>::default();
        registry.register(
            "event_publishes",
            "Publish requests by the topic the event went to and outcome: acknowledged (durable, \
             the broker has it), queued (fire-and-forget), replayed (a repeated Idempotency-Key), \
             rejected (bad request or schema), queue_full, timeout, unavailable, refused",
            publishes.clone(),
        );
        let publish_duration =
            Family::<TopicLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "event_publish_duration_seconds",
            "Time from a publish request to its answer (durable: the broker's acknowledgement)",
            publish_duration.clone(),
        );
        let producer_queue = Family::<BrokerLabels, Gauge>::default();
        registry.register(
            "event_producer_queue",
            "Events in a Kafka producer's queue, waiting for the broker (sampled per publish)",
            producer_queue.clone(),
        );
        let subscribers = Family::<TopicLabels, Gauge>::default();
        registry.register(
            "event_subscribers",
            "Clients streaming a topic (SSE)",
            subscribers.clone(),
        );
        let delivered = Family::<TopicLabels, Counter>::default();
        registry.register(
            "event_deliveries",
            "Events written to subscribers",
            delivered.clone(),
        );
        let closed_slow = Family::<TopicLabels, Counter>::default();
        registry.register(
            "event_subscribers_closed_slow",
            "Subscribers closed because they fell behind the stream (they resume by position)",
            closed_slow.clone(),
        );
        Metrics {
            registry,
            publishes,
            publish_duration,
            producer_queue,
            subscribers,
            delivered,
            closed_slow,
            requests,
            request_duration,
            upstream_duration,
            circuit_state,
            certificate_not_after,
            target_healthy,
            ejections,
            mirrored,
            unrouted,
            access,
            in_flight,
            client_connections,
            proxy_protocol_refused,
            config_version,
            config_loaded_at,
            control_plane_connected,
            config_swaps,
            config_rejections,
            config_apply,
            access_log_dropped,
        }
    }

    pub fn route(&self, api: &Arc<str>, route: &Arc<str>) -> RouteMetrics {
        RouteMetrics {
            requests: self.requests.clone(),
            request_duration: self.request_duration.clone(),
            api: api.clone(),
            route: route.clone(),
            series: OnceLock::new(),
        }
    }

    pub fn upstream(&self, upstream: &str) -> Histogram {
        self.upstream_duration
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .clone()
    }

    /// Shows when the served certificate `name` of `group` expires.
    pub fn certificate_expires(&self, group: &str, name: &str, not_after: i64) {
        self.certificate_not_after
            .get_or_create(&CertificateLabels {
                group: group.to_owned(),
                certificate: name.to_owned(),
            })
            .set(not_after);
    }

    /// Drops the expiry of a certificate no longer served.
    pub fn forget_certificate(&self, group: &str, name: &str) {
        self.certificate_not_after.remove(&CertificateLabels {
            group: group.to_owned(),
            certificate: name.to_owned(),
        });
    }

    pub fn circuit_state(&self, upstream: &str) -> Gauge {
        self.circuit_state
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .clone()
    }

    pub fn ejections(&self, upstream: &str) -> Counter {
        self.ejections
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .clone()
    }

    /// Counts one shadow request's result. Called off the request path (the mirror's own
    /// task), so resolving the series here costs the client nothing.
    pub fn mirrored(&self, upstream: &str, result: &'static str) {
        debug_assert!(
            MIRROR_RESULTS.contains(&result),
            "{result} is missing from MIRROR_RESULTS, so forgetting an upstream would keep it"
        );
        self.mirrored
            .get_or_create(&MirrorLabels {
                upstream: upstream.to_owned(),
                result,
            })
            .inc();
    }

    /// Drops the state series of an upstream no longer configured: a breaker left open, or
    /// a target left down, would otherwise be exported (and alerted on) until the node
    /// restarts.
    pub fn forget_upstream(&self, upstream: &str) {
        self.circuit_state.remove(&UpstreamLabels {
            upstream: upstream.to_owned(),
        });
    }

    /// Drops every series of an upstream no longer configured at all (its latency, ejections
    /// and shadow requests as well as its state), so that renaming and replacing upstreams
    /// does not grow the node's exposition without end.
    pub fn forget_upstream_series(&self, upstream: &str) {
        self.forget_upstream(upstream);
        let labels = UpstreamLabels {
            upstream: upstream.to_owned(),
        };
        self.upstream_duration.remove(&labels);
        self.ejections.remove(&labels);
        for result in MIRROR_RESULTS {
            self.mirrored.remove(&MirrorLabels {
                upstream: upstream.to_owned(),
                result,
            });
        }
    }

    /// Drops the series of a route no longer configured. A request still in flight on the
    /// configuration that had it counts into series no longer exported (or, if it is the
    /// route's very first, makes them again: rare enough to leave).
    pub fn forget_route(&self, api: &str, route: &str) {
        let (api, route) = (label_value(api), label_value(route));
        for status_class in STATUS_CLASSES {
            self.requests.remove(&RouteStatusLabels {
                api: api.clone(),
                route: route.clone(),
                status_class,
            });
        }
        self.request_duration.remove(&RouteLabels { api, route });
    }

    /// [`Metrics::forget_upstream`] for one target.
    pub fn forget_target(&self, upstream: &str, target: &str) {
        self.target_healthy.remove(&TargetLabels {
            upstream: upstream.to_owned(),
            target: target.to_owned(),
        });
    }

    pub fn target_healthy(&self, upstream: &str, target: &str) -> Gauge {
        self.target_healthy
            .get_or_create(&TargetLabels {
                upstream: upstream.to_owned(),
                target: target.to_owned(),
            })
            .clone()
    }

    /// Counts a request answered before routing.
    /// Records the time an applied configuration took: `kind` is `file`, `snapshot` or
    /// `delta`.
    pub fn config_applied(&self, kind: &'static str, seconds: f64) {
        self.config_apply
            .get_or_create(&ApplyLabels { kind })
            .observe(seconds);
    }

    /// Counts one access-control decision on a route with policies: `decision` is `allow`
    /// or `deny`, `reason` one of a fixed set of codes (see `docs/access.md`).
    pub fn access_decision(&self, decision: &'static str, reason: &'static str) {
        self.access
            .get_or_create(&AccessLabels { decision, reason })
            .inc();
    }

    /// Counts one publish request and its time to answer.
    pub fn event_published(&self, topic: &str, outcome: &'static str, seconds: f64) {
        self.publishes
            .get_or_create(&PublishLabels {
                topic: topic.to_owned(),
                outcome,
            })
            .inc();
        self.publish_duration
            .get_or_create(&TopicLabels {
                topic: topic.to_owned(),
            })
            .observe(seconds);
    }

    pub fn producer_queue(&self, broker: &str) -> Gauge {
        self.producer_queue
            .get_or_create(&BrokerLabels {
                broker: broker.to_owned(),
            })
            .clone()
    }

    pub fn subscribers(&self, topic: &str) -> Gauge {
        self.subscribers
            .get_or_create(&TopicLabels {
                topic: topic.to_owned(),
            })
            .clone()
    }

    pub fn delivered(&self, topic: &str) -> Counter {
        self.delivered
            .get_or_create(&TopicLabels {
                topic: topic.to_owned(),
            })
            .clone()
    }

    pub fn closed_slow(&self, topic: &str) -> Counter {
        self.closed_slow
            .get_or_create(&TopicLabels {
                topic: topic.to_owned(),
            })
            .clone()
    }

    pub fn unrouted(&self, reason: &'static str) {
        self.unrouted.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;

/// A gauge a runtime (a target's health, a circuit breaker) writes its state to, shown only
/// once attached to its series, when the configuration holding the runtime is applied: a
/// runtime built for a configuration that is then refused shows nothing, and one put back by
/// a rollback is attached again (its series may have been removed meanwhile).
#[derive(Debug, Default)]
pub struct StateGauge(std::sync::Mutex<Gauge>);

impl StateGauge {
    pub fn set(&self, value: i64) {
        self.lock().set(value);
    }

    /// Shows `value` on `series` from now on.
    pub fn attach(&self, series: Gauge, value: i64) {
        series.set(value);
        *self.lock() = series;
    }

    pub fn get(&self) -> i64 {
        self.lock().get()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gauge> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `text` escaped as a label value of the text exposition (`\\`, `\"`, `\n`), which
/// prometheus-client writes as it is given: a route's name may be any text (an OpenAPI
/// `operationId`), and one quote in it would make every scrape of the node fail.
fn label_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_route_name_keeps_the_exposition_parseable() {
        let metrics = Metrics::new();
        let api: Arc<str> = "shop".into();
        let route: Arc<str> = "get \"legacy\" order\\x\nnext".into();
        metrics.route(&api, &route).record(200, 0.01);
        let text = metrics.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("sluice_requests_total{"))
            .unwrap_or_else(|| panic!("no request series in {text}"));
        assert!(
            line.contains(r#"route="get \"legacy\" order\\x\nnext""#),
            "{line}"
        );
    }
}
