//! Kafka through rdkafka: one idempotent producer per broker resource per node.
//!
//! The producer's queue is bounded (`queue.buffering.max.messages`, `…max.kbytes`), so a slow
//! or absent broker fills it and further publishes fail at once with a 503, instead of
//! growing memory. librdkafka gives every queued event a delivery report within
//! `message.timeout.ms` (acknowledged, or failed), so a durable publish never waits longer
//! than that.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use prometheus_client::metrics::gauge::Gauge;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sluice_proto::pb;

use super::{Delivered, Delivery, PublishError, Record};
use crate::telemetry::Metrics;

/// Producer settings Sluice sets unless the broker's `properties` say otherwise.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    // librdkafka's default is 5 minutes: far longer than an HTTP client waits.
    ("message.timeout.ms", "5000"),
    // The bound on events waiting for the broker; beyond it publishes get a 503.
    ("queue.buffering.max.messages", "10000"),
    ("queue.buffering.max.kbytes", "65536"),
    ("linger.ms", "5"),
    ("client.id", "sluice-dp"),
];

/// Extra wait past `message.timeout.ms` for the delivery report itself, so that the report
/// (and not our own timer) decides the answer whenever librdkafka keeps its promise.
const REPORT_GRACE: Duration = Duration::from_secs(1);

/// Consecutive failed deliveries (no success between) after which the producer is replaced.
const FAILURES_BEFORE_REBUILD: u32 = 20;

/// The least time between two replacements of a broker's producer.
const REBUILD_INTERVAL: Duration = Duration::from_secs(5);

/// A Kafka broker's runtime on this node.
pub struct KafkaBroker {
    /// Replaced when librdkafka gives up on it (see [`KafkaBroker::recover`]).
    producer: ArcSwap<FutureProducer>,
    client: ClientConfig,
    /// Deliveries failed in a row, and when the producer was last replaced.
    failures: AtomicU32,
    rebuilt_at: Mutex<Option<Instant>>,
    /// What clients of this broker (the producer, subscribe feeds) are configured with.
    pub(super) settings: BTreeMap<String, String>,
    delivery_timeout: Duration,
    queue_depth: Gauge,
    /// Subscribers' consumers.
    pub(super) feeds: super::feed::Feeds,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("bootstrap", &self.settings.get("bootstrap.servers"))
            .field("delivery_timeout", &self.delivery_timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaBroker {
    pub fn new(name: &str, config: &pb::KafkaBroker, metrics: &Metrics) -> Result<Self, String> {
        let mut settings: BTreeMap<String, String> = PRODUCER_DEFAULTS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        settings.extend(config.properties.clone());
        settings.insert(
            "bootstrap.servers".into(),
            config.bootstrap_servers.join(","),
        );
        let delivery_timeout = settings["message.timeout.ms"]
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| format!("properties.message.timeout.ms: {e}"))?;
        let mut client = ClientConfig::new();
        for (key, value) in &settings {
            client.set(key, value);
        }
        let producer: FutureProducer = client
            .create()
            .map_err(|e| format!("cannot create a Kafka producer: {e}"))?;
        Ok(KafkaBroker {
            producer: ArcSwap::from_pointee(producer),
            client,
            failures: AtomicU32::new(0),
            rebuilt_at: Mutex::new(None),
            settings,
            delivery_timeout,
            queue_depth: metrics.producer_queue(name),
            feeds: super::feed::Feeds::default(),
        })
    }

    pub async fn publish(
        &self,
        broker: &Arc<str>,
        record: Record,
        delivery: Delivery,
    ) -> Result<Option<Delivered>, PublishError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_ref()),
            });
        }
        let mut message = FutureRecord::<[u8], [u8]>::to(&record.topic)
            .payload(&record.value)
            .headers(headers)
            .timestamp(record.timestamp_ms);
        if let Some(key) = &record.key {
            message = message.key(key);
        }
        let producer = self.producer.load_full();
        let sent = producer.send_result(message);
        self.queue_depth.set(i64::from(producer.in_flight_count()));
        let report = match sent {
            Ok(report) => report,
            Err((error, _)) => return Err(self.failed(broker, &producer, error)),
        };
        if delivery == Delivery::FireAndForget {
            return Ok(None);
        }
        let timeout = self.delivery_timeout + REPORT_GRACE;
        let outcome = tokio::time::timeout(timeout, report).await;
        self.queue_depth.set(i64::from(producer.in_flight_count()));
        match outcome {
            Ok(Ok(Ok(stored))) => {
                self.failures.store(0, Ordering::Relaxed);
                Ok(Some(Delivered {
                    partition: stored.partition,
                    offset: stored.offset,
                    timestamp_ms: stored.timestamp.to_millis().unwrap_or(record.timestamp_ms),
                }))
            }
            Ok(Ok(Err((error, _)))) => Err(self.failed(broker, &producer, error)),
            // The producer went away (the node is stopping): the event's fate is unknown.
            Ok(Err(_)) | Err(_) => Err(PublishError::Timeout {
                broker: broker.clone(),
                timeout: self.delivery_timeout,
            }),
        }
    }
}

impl KafkaBroker {
    /// Classifies a failed publish, and replaces the producer when it cannot recover.
    fn failed(
        &self,
        broker: &Arc<str>,
        producer: &Arc<FutureProducer>,
        error: KafkaError,
    ) -> PublishError {
        let error = classify(broker, error, self.delivery_timeout);
        if !matches!(error, PublishError::QueueFull { .. }) {
            let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            self.recover(broker, producer, failures);
        }
        error
    }

    /// Replaces `producer` with a new one when librdkafka declared it failed for good (an
    /// idempotent producer fenced or out of sequence), or when it has failed
    /// [`FAILURES_BEFORE_REBUILD`] deliveries in a row: a broker that lost the producer's
    /// state (some Kafka-compatible brokers refuse an idempotent producer's new epoch after
    /// an outage) only accepts a new producer id. At most once per [`REBUILD_INTERVAL`]; the
    /// old producer's events in flight fail, and their clients get 503s.
    fn recover(&self, broker: &Arc<str>, producer: &Arc<FutureProducer>, failures: u32) {
        let fatal = producer.client().fatal_error();
        if fatal.is_none() && failures < FAILURES_BEFORE_REBUILD {
            return;
        }
        let mut rebuilt_at = self.rebuilt_at.lock().unwrap_or_else(|e| e.into_inner());
        if rebuilt_at.is_some_and(|at| at.elapsed() < REBUILD_INTERVAL)
            || !Arc::ptr_eq(&self.producer.load(), producer)
        {
            return;
        }
        match self.client.create::<FutureProducer>() {
            Ok(fresh) => {
                tracing::warn!(
                    %broker,
                    fatal = ?fatal,
                    failures,
                    "Kafka producer replaced: it could not deliver"
                );
                self.producer.store(Arc::new(fresh));
                self.failures.store(0, Ordering::Relaxed);
                *rebuilt_at = Some(Instant::now());
            }
            Err(error) => {
                tracing::warn!(%broker, %error, "cannot replace the Kafka producer");
            }
        }
    }
}

/// Sorts a producer error into what the client is told: try again later (queue full, timed
/// out, broker unreachable) or the broker refused this event.
fn classify(broker: &Arc<str>, error: KafkaError, timeout: Duration) -> PublishError {
    use RDKafkaErrorCode as Code;
    let broker = broker.clone();
    match error.rdkafka_error_code() {
        Some(Code::QueueFull) => PublishError::QueueFull { broker },
        Some(
            Code::MessageTimedOut
            | Code::RequestTimedOut
            | Code::OperationTimedOut
            | Code::AllBrokersDown
            | Code::BrokerTransportFailure
            | Code::PurgeQueue
            | Code::PurgeInflight,
        ) => PublishError::Timeout { broker, timeout },
        // The producer itself failed, or the broker failed unexpectedly: try again (after
        // enough of these the producer is replaced: `recover`).
        Some(
            Code::Fatal
            | Code::ProducerFenced
            | Code::InvalidProducerEpoch
            | Code::Unknown
            | Code::OutOfOrderSequenceNumber
            | Code::UnknownProducerId,
        ) => PublishError::Unavailable {
            broker,
            reason: error.to_string(),
        },
        _ => PublishError::Refused {
            broker,
            reason: error.to_string(),
        },
    }
}
