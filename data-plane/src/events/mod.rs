//! The event bridge: brokers, and the routes that publish requests as events
//! ([`publish`]) or stream a topic to clients ([`subscribe`]).
//!
//! A [`Broker`] is the node's runtime for one broker resource: a Kafka producer
//! ([`kafka`]) or the in-process [`memory`] broker. Like upstreams, brokers are kept across
//! configuration swaps while their resource is unchanged, so a new config neither reconnects
//! the producer nor (for the memory broker) loses the events it holds.

pub mod cloudevents;
pub mod feed;
pub mod idempotency;
pub mod kafka;
pub mod memory;
pub mod pacing;
pub mod publish;
pub mod subscribe;
pub mod websocket;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use sluice_proto::pb;

use crate::auth::Identity;
use crate::server::forwarding;
use crate::telemetry::Metrics;

/// One event on its way to a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Arc<str>,
    pub key: Option<Bytes>,
    pub value: Bytes,
    /// Record headers, in order; names may repeat.
    pub headers: Vec<(String, Bytes)>,
    /// Milliseconds since the Unix epoch: the event's create time.
    pub timestamp_ms: i64,
}

/// Where the broker stored an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: i64,
}

/// How long a publish waits for its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Until the broker acknowledged the event (or the delivery timeout).
    Durable,
    /// Until the event is queued in the producer; the broker may still lose it.
    FireAndForget,
}

/// Which acknowledgement the broker sends before an event counts as delivered (Kafka's
/// `acks`, chosen per route). The memory broker has nothing to acknowledge and ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// The broker resource's own setting: `acks` in its properties, `all` by default.
    #[default]
    Broker,
    /// Every in-sync replica has the event.
    All,
    /// The partition leader has it.
    Leader,
    /// No acknowledgement at all (fire-and-forget routes only).
    None,
}

impl Acks {
    pub fn from_proto(acks: i32) -> Self {
        use pb::publish_action::Acks as A;
        match A::try_from(acks) {
            Ok(A::All) => Acks::All,
            Ok(A::Leader) => Acks::Leader,
            Ok(A::None) => Acks::None,
            Ok(A::Unspecified) | Err(_) => Acks::Broker,
        }
    }
}

/// Why an event was not published. Every variant means the client must not be told the
/// event was accepted.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The producer's bounded queue is full: the broker is slow or down.
    #[error("broker {broker} is not keeping up; its producer queue is full")]
    QueueFull { broker: Arc<str> },
    /// No acknowledgement within the delivery timeout (broker down or unreachable).
    #[error("broker {broker} did not acknowledge the event within {timeout:?}")]
    Timeout { broker: Arc<str>, timeout: Duration },
    /// The producer failed and is being replaced.
    #[error("broker {broker}'s producer failed and is being restarted: {reason}")]
    Unavailable { broker: Arc<str>, reason: String },
    /// The event is larger than the broker takes (`message.max.bytes`): the client's to fix.
    #[error("the event is larger than broker {broker} takes: {reason}")]
    TooLarge { broker: Arc<str>, reason: String },
    /// The broker refused the event for good (unknown topic, not authorised).
    #[error("broker {broker} refused the event: {reason}")]
    Refused { broker: Arc<str>, reason: String },
}

/// The node's runtime for one broker resource.
#[derive(Debug)]
pub struct Broker {
    pub id: Arc<str>,
    pub name: Arc<str>,
    /// The resource as compiled, minus what does not change the runtime (version, labels).
    fingerprint: Vec<u8>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// Boxed: a Kafka broker holds its producers' state, the memory broker a few pointers.
    Kafka(Box<kafka::KafkaBroker>),
    Memory(memory::MemoryBroker),
}

impl Broker {
    /// The runtime for `config`: `previous` itself when the resource did not change.
    pub fn reuse(
        config: &pb::Broker,
        previous: Option<&Arc<Broker>>,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, String> {
        let fingerprint = fingerprint(config);
        if let Some(previous) = previous
            && previous.fingerprint == fingerprint
        {
            return Ok(previous.clone());
        }
        let meta = config.meta.clone().unwrap_or_default();
        let name: Arc<str> = meta.name.into();
        let kind = match &config.kind {
            Some(pb::broker::Kind::Kafka(kafka)) => {
                Kind::Kafka(Box::new(kafka::KafkaBroker::new(&name, kafka, metrics)?))
            }
            Some(pb::broker::Kind::Memory(memory)) => {
                Kind::Memory(memory::MemoryBroker::new(memory))
            }
            None => return Err("needs exactly one of kafka, memory".into()),
        };
        Ok(Arc::new(Broker {
            id: meta.id.into(),
            name,
            fingerprint,
            kind,
        }))
    }

    /// Publishes one event. `Durable` returns where the broker stored it; `FireAndForget`
    /// returns `None` once the event is queued.
    pub async fn publish(
        &self,
        record: Record,
        delivery: Delivery,
        acks: Acks,
    ) -> Result<Option<Delivered>, PublishError> {
        match &self.kind {
            Kind::Kafka(kafka) => kafka.publish(&self.name, record, delivery, acks).await,
            Kind::Memory(memory) => {
                let delivered = memory.publish(record);
                // The same answer as on Kafka: fire-and-forget says nothing of where it went.
                Ok((delivery == Delivery::Durable).then_some(delivered))
            }
        }
    }

    /// Opens a subscriber's stream of `topic` from `start`.
    pub async fn subscribe(
        &self,
        topic: &Arc<str>,
        start: subscribe::Start,
    ) -> Result<subscribe::Source, subscribe::SubscribeError> {
        use subscribe::{Live, Position, Source, Start};
        match &self.kind {
            Kind::Kafka(kafka) => {
                kafka
                    .feeds
                    .subscribe(&kafka.settings, &self.name, topic, start)
                    .await
            }
            Kind::Memory(memory) => {
                if let Start::After(position) = &start {
                    let (_, next) = memory.bounds(topic);
                    position
                        .check_within(&[(0, next)].into())
                        .map_err(|reason| subscribe::SubscribeError::Position {
                            topic: topic.clone(),
                            reason,
                        })?;
                }
                // One partition, 0.
                let from = match &start {
                    Start::Latest => None,
                    Start::Earliest => Some(0),
                    Start::Time(ms) => Some(memory.offset_at(topic, *ms)),
                    Start::After(position) => Some(position.0.get(&0).copied().unwrap_or(0)),
                };
                let opened = memory.subscribe(topic, from);
                let position = match start {
                    Start::Latest => Position([(0, opened.next_offset)].into()),
                    Start::Earliest | Start::Time(_) => Position([(0, from.unwrap_or(0))].into()),
                    Start::After(position) => position,
                };
                Ok(Source {
                    position,
                    backlog: opened.backlog.iter().map(Arc::downgrade).collect(),
                    live: Live::Shared(opened.live),
                })
            }
        }
    }

    /// The longest a durable publish to this broker waits for its answer.
    pub fn publish_limit(&self) -> Duration {
        match &self.kind {
            Kind::Kafka(kafka) => kafka.publish_limit(),
            Kind::Memory(_) => Duration::ZERO,
        }
    }

    /// Whether events survive the node (documented: the memory broker's do not).
    pub fn is_durable(&self) -> bool {
        matches!(self.kind, Kind::Kafka(_))
    }
}

fn fingerprint(config: &pb::Broker) -> Vec<u8> {
    crate::config::runtime_fingerprint(config, |c| c.meta.as_mut())
}

/// The record headers that say who sent an event and in which request: `sluice-request-id`,
/// `traceparent` (the client's trace continued), and for an authenticated caller
/// `sluice-consumer-id`, `sluice-consumer-name` and `sluice-subscription-id`.
pub fn caller_headers(
    identity: Option<&Identity>,
    request_id: &HeaderValue,
    request_headers: &HeaderMap,
) -> Vec<(String, Bytes)> {
    let mut headers = vec![
        (
            "sluice-request-id".to_owned(),
            Bytes::copy_from_slice(request_id.as_bytes()),
        ),
        (
            "traceparent".to_owned(),
            Bytes::copy_from_slice(forwarding::traceparent(request_headers).as_bytes()),
        ),
    ];
    if let Some(identity) = identity {
        headers.push((
            "sluice-consumer-id".to_owned(),
            Bytes::from(identity.consumer_id.to_string()),
        ));
        headers.push((
            "sluice-consumer-name".to_owned(),
            Bytes::copy_from_slice(identity.consumer_name.as_bytes()),
        ));
        headers.push((
            "sluice-subscription-id".to_owned(),
            Bytes::from(identity.subscription_id.to_string()),
        ));
    }
    headers
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::subscribe::{Position, Start, SubscribeError};
    use super::*;

    fn memory_broker() -> Arc<Broker> {
        let config = pb::Broker {
            meta: None,
            kind: Some(pb::broker::Kind::Memory(pb::MemoryBroker::default())),
        };
        Broker::reuse(&config, None, &Metrics::default()).unwrap()
    }

    #[tokio::test]
    async fn a_memory_topic_refuses_a_resume_position_it_never_gave() {
        let broker = memory_broker();
        let topic: Arc<str> = "t".into();
        let after = |text: &str| Start::After(Position::parse(text).unwrap());
        for (text, reason) in [
            ("0:1", "partition 0 ends at offset 0, not 1"),
            ("0:0,3:0", "the topic has no partition 3"),
        ] {
            match broker.subscribe(&topic, after(text)).await {
                Err(SubscribeError::Position { reason: got, .. }) => assert_eq!(got, reason),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(broker.subscribe(&topic, after("0:0")).await.is_ok());
    }

    #[tokio::test]
    async fn a_memory_topic_answers_fire_and_forget_as_kafka_does() {
        let broker = memory_broker();
        let record = || Record {
            topic: "t".into(),
            key: None,
            value: Bytes::from_static(b"x"),
            headers: Vec::new(),
            timestamp_ms: 0,
        };
        let durable = broker.publish(record(), Delivery::Durable, Acks::All).await;
        assert_eq!(durable.unwrap().map(|d| d.offset), Some(0));
        let queued = broker
            .publish(record(), Delivery::FireAndForget, Acks::All)
            .await;
        assert!(queued.unwrap().is_none());
        let topic: Arc<str> = "t".into();
        let stored = broker.subscribe(&topic, Start::Earliest).await.unwrap();
        assert_eq!(stored.backlog.len(), 2, "both were published");
    }
}
