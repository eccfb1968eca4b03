//! Kafka through rdkafka: one idempotent producer per broker resource per node (and one more
//! for each other `acks` its routes ask for).
//!
//! The producer's queue is bounded (`queue.buffering.max.messages`, `…max.kbytes`), so a slow
//! or absent broker fills it and further publishes fail at once with a 503, instead of
//! growing memory. librdkafka gives every queued event a delivery report within
//! `message.timeout.ms` (acknowledged, or failed), so a durable publish never waits longer
//! than that.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use prometheus_client::metrics::gauge::Gauge;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use sluice_proto::pb;

use super::{Acks, Delivered, Delivery, PublishError, Record};
use crate::telemetry::Metrics;

/// Producer settings Sluice sets unless the broker's `properties` say otherwise (public for
/// the publish benchmark, whose direct producer is configured the same way).
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    // librdkafka's default is 5 minutes: far longer than an HTTP client waits.
    ("message.timeout.ms", "5000"),
    // The bound on events waiting for the broker; beyond it publishes get a 503.
    ("queue.buffering.max.messages", "10000"),
    ("queue.buffering.max.kbytes", "65536"),
    // Every durable publish waits out its batch's linger before its 202: 1 ms rather than
    // librdkafka's 5 keeps batches (a publish's CPU stays near a proxied request's) and lets
    // 50 waiting clients reach 2.4 times the requests/s (docs/benchmarks.md, publish).
    ("linger.ms", "1"),
    ("client.id", "sluice-dp"),
];

/// The broker's `properties` serve its producers and its subscribers' readers (consumers);
/// each is given only the settings of its own role, since librdkafka warns of every setting of
/// the other role that it ignores. These are librdkafka 2.12's producer-only settings (`P` in
/// its CONFIGURATION.md, less the callbacks, which cannot be set as strings)...
pub(super) const PRODUCER_ONLY: &[&str] = &[
    "transactional.id",
    "transaction.timeout.ms",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "queue.buffering.backpressure.threshold",
    "linger.ms",
    "message.send.max.retries",
    "retries",
    "compression.codec",
    "compression.type",
    "compression.level",
    "batch.num.messages",
    "batch.size",
    "delivery.report.only.error",
    "sticky.partitioning.linger.ms",
    "request.required.acks",
    "acks",
    "request.timeout.ms",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "queuing.strategy",
    "produce.offset.report",
    "partitioner",
];

/// ...and its consumer-only ones (`C`).
pub(super) const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "group.protocol.type",
    "group.protocol",
    "group.remote.assignor",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.enable",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "offset.store.method",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
    "auto.offset.reset",
    "consume.callback.max.messages",
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
    /// The producer configured as the broker resource says.
    producer: Producer,
    /// Producers for routes that ask for other `acks` than the broker's (librdkafka sets
    /// `acks` per producer), indexed by [`acks_slot`]; each is created on first use.
    producers_by_acks: [OnceLock<Result<Producer, String>>; 3],
    /// What clients of this broker (the producer, subscribe feeds) are configured with.
    pub(super) settings: BTreeMap<String, String>,
    delivery_timeout: Duration,
    queue_depth: Gauge,
    /// Subscribers' consumers.
    pub(super) feeds: super::feed::Feeds,
}

/// One rdkafka producer, replaced when librdkafka gives up on it (see [`Producer::recover`]).
struct Producer {
    current: ArcSwap<FutureProducer>,
    client: ClientConfig,
    /// Deliveries failed in a row, and when the producer was last replaced.
    failures: AtomicU32,
    rebuilt_at: Mutex<Option<Instant>>,
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
        // A user's alias of a setting Sluice has a default for replaces the default, rather
        // than going to librdkafka beside it (which would keep either).
        settings.extend(config.properties.iter().map(|(key, value)| {
            let name = match sluice_proto::kafka::alias_of(key) {
                Some(other) if PRODUCER_DEFAULTS.iter().any(|(name, _)| *name == other) => other,
                _ => key.as_str(),
            };
            (name.to_owned(), value.clone())
        }));
        settings.insert(
            "bootstrap.servers".into(),
            config.bootstrap_servers.join(","),
        );
        let delivery_timeout = settings["message.timeout.ms"]
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| format!("properties.message.timeout.ms: {e}"))?;
        Ok(KafkaBroker {
            producer: Producer::new(&settings)?,
            producers_by_acks: Default::default(),
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
        acks: Acks,
    ) -> Result<Option<Delivered>, PublishError> {
        let slot = self
            .producer_for(acks)
            .map_err(|reason| PublishError::Unavailable {
                broker: broker.clone(),
                reason,
            })?;
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
        let producer = slot.current.load_full();
        let sent = producer.send_result(message);
        self.record_queue_depth();
        let report = match sent {
            Ok(report) => report,
            Err((error, _)) => return Err(self.failed(broker, slot, &producer, error)),
        };
        if delivery == Delivery::FireAndForget {
            return Ok(None);
        }
        let timeout = self.publish_limit();
        let outcome = tokio::time::timeout(timeout, report).await;
        self.record_queue_depth();
        match outcome {
            // No offset: the producer did not wait for the broker (acks 0). Not a 202.
            Ok(Ok(Ok(stored))) if stored.offset < 0 => Err(PublishError::Unavailable {
                broker: broker.clone(),
                reason: "the broker did not acknowledge the event (is acks 0 set?)".into(),
            }),
            Ok(Ok(Ok(stored))) => {
                slot.failures.store(0, Ordering::Relaxed);
                Ok(Some(Delivered {
                    partition: stored.partition,
                    offset: stored.offset,
                    timestamp_ms: stored.timestamp.to_millis().unwrap_or(record.timestamp_ms),
                }))
            }
            Ok(Ok(Err((error, _)))) => Err(self.failed(broker, slot, &producer, error)),
            // The producer went away (the node is stopping): the event's fate is unknown.
            Ok(Err(_)) | Err(_) => Err(PublishError::Timeout {
                broker: broker.clone(),
                timeout: self.delivery_timeout,
            }),
        }
    }

    /// The producer that sends with `acks`: the broker's own when its settings already
    /// ask for that, otherwise one made for it on first use.
    fn producer_for(&self, acks: Acks) -> Result<&Producer, String> {
        match acks_slot(acks) {
            Some(slot) if !self.sends_with(acks) => self.producers_by_acks[slot]
                .get_or_init(|| Producer::new(&self.settings_for(acks)))
                .as_ref()
                .map_err(Clone::clone),
            _ => Ok(&self.producer),
        }
    }

    /// Whether the broker's own producer already sends with `acks`.
    fn sends_with(&self, acks: Acks) -> bool {
        let own = match self.settings["acks"].as_str() {
            "-1" => "all",
            other => other,
        };
        kafka_acks(acks).is_none_or(|wanted| wanted == own)
    }

    /// The broker's settings changed to send with `acks`. Idempotence needs `acks=all`, so
    /// it is turned off for the weaker acknowledgements.
    fn settings_for(&self, acks: Acks) -> BTreeMap<String, String> {
        let mut settings = self.settings.clone();
        if let Some(wanted) = kafka_acks(acks) {
            settings.insert("acks".into(), wanted.into());
            if wanted != "all" {
                settings.insert("enable.idempotence".into(), "false".into());
            }
        }
        settings
    }

    /// Events queued in this broker's producers and not yet acknowledged.
    fn record_queue_depth(&self) {
        let variants = self
            .producers_by_acks
            .iter()
            .filter_map(|slot| match slot.get() {
                Some(Ok(producer)) => Some(producer),
                _ => None,
            });
        let depth: i64 = std::iter::once(&self.producer)
            .chain(variants)
            .map(|producer| i64::from(producer.current.load().in_flight_count()))
            .sum();
        self.queue_depth.set(depth);
    }

    /// The longest a durable publish waits: the delivery timeout, and the report's grace.
    pub fn publish_limit(&self) -> Duration {
        self.delivery_timeout + REPORT_GRACE
    }

    /// Classifies a failed publish, and replaces the producer when it cannot recover.
    fn failed(
        &self,
        broker: &Arc<str>,
        slot: &Producer,
        producer: &Arc<FutureProducer>,
        error: KafkaError,
    ) -> PublishError {
        let error = classify(broker, error, self.delivery_timeout);
        // A full queue or an event too large says nothing of the producer's health.
        if !matches!(
            error,
            PublishError::QueueFull { .. } | PublishError::TooLarge { .. }
        ) {
            let failures = slot.failures.fetch_add(1, Ordering::Relaxed) + 1;
            slot.recover(broker, producer, failures, self.publish_limit());
        }
        error
    }
}

/// Kafka's `acks` value for `acks`; `None` for the broker's own setting.
fn kafka_acks(acks: Acks) -> Option<&'static str> {
    match acks {
        Acks::Broker => None,
        Acks::All => Some("all"),
        Acks::Leader => Some("1"),
        Acks::None => Some("0"),
    }
}

/// Where the producer for `acks` is kept in [`KafkaBroker::producers_by_acks`].
fn acks_slot(acks: Acks) -> Option<usize> {
    match acks {
        Acks::Broker => None,
        Acks::All => Some(0),
        Acks::Leader => Some(1),
        Acks::None => Some(2),
    }
}

impl Producer {
    fn new(settings: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut client = ClientConfig::new();
        for (key, value) in settings {
            if !CONSUMER_ONLY.contains(&key.as_str()) {
                client.set(key, value);
            }
        }
        let producer: FutureProducer = client
            .create()
            .map_err(|e| format!("cannot create a Kafka producer: {e}"))?;
        Ok(Producer {
            current: ArcSwap::from_pointee(producer),
            client,
            failures: AtomicU32::new(0),
            rebuilt_at: Mutex::new(None),
        })
    }

    /// Replaces `producer` with a new one when librdkafka declared it failed for good (an
    /// idempotent producer fenced or out of sequence), or when it has failed
    /// [`FAILURES_BEFORE_REBUILD`] deliveries in a row: a broker that lost the producer's
    /// state (some Kafka-compatible brokers refuse an idempotent producer's new epoch after
    /// an outage) only accepts a new producer id. At most once per [`REBUILD_INTERVAL`]; the
    /// old producer's events in flight fail, and their clients get 503s.
    /// `publish_limit`: how long the old producer's publishes may still hold it.
    fn recover(
        &self,
        broker: &Arc<str>,
        producer: &Arc<FutureProducer>,
        failures: u32,
        publish_limit: Duration,
    ) {
        let fatal = producer.client().fatal_error();
        if fatal.is_none() && failures < FAILURES_BEFORE_REBUILD {
            return;
        }
        let mut rebuilt_at = self.rebuilt_at.lock().unwrap_or_else(|e| e.into_inner());
        if rebuilt_at.is_some_and(|at| at.elapsed() < REBUILD_INTERVAL)
            || !Arc::ptr_eq(&self.current.load(), producer)
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
                let old = self.current.swap(Arc::new(fresh));
                self.failures.store(0, Ordering::Relaxed);
                close_off_the_workers(old, publish_limit);
                *rebuilt_at = Some(Instant::now());
            }
            Err(error) => {
                tracing::warn!(%broker, %error, "cannot replace the Kafka producer");
            }
        }
    }
}

/// Drops a replaced producer where blocking is allowed, once the publishes still using it
/// (each within `publish_limit`) are done: rdkafka's drop joins its polling thread and
/// flushes for up to half a second, which would stall every request on the worker.
fn close_off_the_workers(producer: Arc<FutureProducer>, publish_limit: Duration) {
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + publish_limit + Duration::from_secs(1);
        while Arc::strong_count(&producer) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(producer);
    });
}

/// Sorts a producer error into what the client is told: try again later (queue full, timed
/// out, broker unreachable) or the broker refused this event.
fn classify(broker: &Arc<str>, error: KafkaError, timeout: Duration) -> PublishError {
    use RDKafkaErrorCode as Code;
    let broker = broker.clone();
    match error.rdkafka_error_code() {
        Some(Code::QueueFull) => PublishError::QueueFull { broker },
        Some(Code::MessageSizeTooLarge) => PublishError::TooLarge {
            broker,
            reason: error.to_string(),
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(properties: &[(&str, &str)]) -> KafkaBroker {
        let config = pb::KafkaBroker {
            // Nothing listens there; creating a producer does not connect.
            bootstrap_servers: vec!["127.0.0.1:1".into()],
            properties: properties
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        KafkaBroker::new("b", &config, &Metrics::default()).unwrap()
    }

    fn acks_and_idempotence(settings: &BTreeMap<String, String>) -> (&str, &str) {
        (&settings["acks"], &settings["enable.idempotence"])
    }

    #[test]
    fn routes_asking_the_brokers_own_acks_share_its_producer() {
        let default = broker(&[]);
        assert!(default.sends_with(Acks::Broker));
        assert!(default.sends_with(Acks::All));
        assert!(!default.sends_with(Acks::Leader));
        let leader = default.settings_for(Acks::Leader);
        assert_eq!(acks_and_idempotence(&leader), ("1", "false"));
        let none = default.settings_for(Acks::None);
        assert_eq!(acks_and_idempotence(&none), ("0", "false"));
        assert_eq!(none["linger.ms"], "1", "the broker's other settings stay");

        let leader_broker = broker(&[("acks", "1"), ("enable.idempotence", "false")]);
        assert!(leader_broker.sends_with(Acks::Leader));
        assert!(!leader_broker.sends_with(Acks::All));
        let all = leader_broker.settings_for(Acks::All);
        assert_eq!(acks_and_idempotence(&all), ("all", "false"));
        assert!(broker(&[("acks", "-1")]).sends_with(Acks::All));
    }

    #[test]
    fn aliases_replace_sluices_defaults() {
        let broker = broker(&[
            ("delivery.timeout.ms", "30000"),
            ("request.required.acks", "1"),
            ("enable.idempotence", "false"),
            ("queue.buffering.max.ms", "7"),
        ]);
        assert_eq!(broker.delivery_timeout, Duration::from_secs(30));
        assert_eq!(broker.settings["message.timeout.ms"], "30000");
        assert_eq!(broker.settings["linger.ms"], "7");
        assert!(broker.sends_with(Acks::Leader));
        for alias in [
            "delivery.timeout.ms",
            "request.required.acks",
            "queue.buffering.max.ms",
        ] {
            assert!(!broker.settings.contains_key(alias), "{alias}");
        }
    }

    #[test]
    fn an_idempotency_claim_outlives_the_longest_publish() {
        use crate::events::idempotency::claim_ttl;
        // The default delivery timeout, 5 s, and its grace fit in the least claim, 30 s.
        assert_eq!(
            claim_ttl(broker(&[]).publish_limit()),
            Duration::from_secs(30)
        );
        let slow = broker(&[("message.timeout.ms", "60000")]);
        assert_eq!(slow.publish_limit(), Duration::from_secs(61));
        assert_eq!(claim_ttl(slow.publish_limit()), Duration::from_secs(66));
    }

    #[test]
    fn producers_take_no_consumer_settings() {
        let broker = broker(&[("fetch.wait.max.ms", "5"), ("compression.type", "lz4")]);
        let leader = broker.producer_for(Acks::Leader).unwrap();
        for producer in [&broker.producer, leader] {
            assert_eq!(producer.client.get("fetch.wait.max.ms"), None);
            assert_eq!(producer.client.get("compression.type"), Some("lz4"));
        }
        assert_eq!(
            broker.settings["fetch.wait.max.ms"], "5",
            "kept for the readers"
        );
    }

    #[test]
    fn a_producer_for_other_acks_is_made_once_and_kept() {
        let broker = broker(&[]);
        let main: *const Producer = &broker.producer;
        assert!(std::ptr::eq(broker.producer_for(Acks::All).unwrap(), main));
        let leader = broker.producer_for(Acks::Leader).unwrap() as *const Producer;
        assert!(!std::ptr::eq(leader, main));
        assert!(std::ptr::eq(
            broker.producer_for(Acks::Leader).unwrap(),
            leader
        ));
        let none = broker.producer_for(Acks::None).unwrap() as *const Producer;
        assert!(!std::ptr::eq(none, leader));
    }
}
