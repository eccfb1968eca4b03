//! The control plane's Prometheus metrics, served at `GET /metrics` on the REST listener.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Commit → ACK buckets, seconds: 5 ms to 60 s.
const PROPAGATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PushLabels {
    kind: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// From a version's commit to a node's ACK of it.
    pub commit_to_ack: Histogram,
    /// Data planes streaming from this replica.
    pub connected_nodes: Gauge,
    /// Encoded size of each config push, by kind (snapshot or delta).
    push_bytes: Family<PushLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice_cp");
        let commit_to_ack = Histogram::new(PROPAGATION_BUCKETS);
        registry.register(
            "commit_to_ack_seconds",
            "Time from a version's commit to a data plane's ACK of it",
            commit_to_ack.clone(),
        );
        let connected_nodes = Gauge::default();
        registry.register(
            "connected_data_planes",
            "Data planes streaming their configuration from this replica",
            connected_nodes.clone(),
        );
        let push_bytes = Family::<PushLabels, Histogram>::new_with_constructor(
            // 64 bytes to 4 GiB.
            (|| Histogram::new(exponential_buckets(64.0, 4.0, 14))) as fn() -> _,
        );
        registry.register(
            "push_bytes",
            "Encoded size of each configuration pushed to a data plane, by kind (snapshot, delta)",
            push_bytes.clone(),
        );
        Metrics {
            registry,
            commit_to_ack,
            connected_nodes,
            push_bytes,
        }
    }
}

impl Metrics {
    /// Records one push of `bytes` encoded bytes: `kind` is `snapshot` or `delta`.
    pub fn pushed(&self, kind: &'static str, bytes: usize) {
        self.push_bytes
            .get_or_create(&PushLabels { kind })
            .observe(bytes as f64);
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
