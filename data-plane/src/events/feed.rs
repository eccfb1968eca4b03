//! Kafka feeds for subscribers: one consumer per topic per node, fanned out to every live
//! subscriber of that topic through a bounded broadcast buffer.
//!
//! A subscriber that starts at `latest` joins the topic's shared feed (started on the first
//! such subscriber, stopped when the last one leaves). The shared feed waits for nobody: a
//! subscriber that falls its buffer behind is closed as slow. One that resumes from a position
//! or starts at `earliest` reads through a private consumer, since it is somewhere else in the
//! topic. A private reader serves one subscriber, so it reads at that subscriber's pace: a
//! client catching up on a long backlog gets all of it on one connection, however fast the
//! broker sends, with [`OWN_BUFFER`] events and librdkafka's prefetch ([`OWN_PREFETCH_KB`])
//! between them. Private readers are limited per broker ([`PRIVATE_READERS`]), beyond which the
//! client gets a 503 and retries.
//!
//! Consumers are assigned partitions explicitly (no consumer-group rebalancing, nothing
//! committed): a subscriber's position lives in its client's `Last-Event-ID`, not in Kafka.
//! Partitions added to a topic after its feed started are not read until the feed restarts.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::{Semaphore, broadcast, mpsc};

use super::Record;
use super::memory::{FEED_CAPACITY, StoredEvent};
use super::subscribe::{Live, Position, Source, Start, SubscribeError};

/// Private readers (resumes, `earliest`) open at once per broker on this node.
pub const PRIVATE_READERS: usize = 64;

/// Events a private reader gets ahead of its subscriber before it waits for it.
const OWN_BUFFER: usize = 64;

/// librdkafka's prefetch for a private reader (`queued.max.messages.kbytes`, unless the
/// broker's properties set it): what it fetches ahead while its subscriber is slow. librdkafka's
/// default, 64 MB, times [`PRIVATE_READERS`] would be 4 GB.
const OWN_PREFETCH_KB: &str = "2048";

/// Limit on each blocking metadata / watermark request while a feed opens.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an idle feed checks whether anyone still listens.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Producer settings a consumer has no use for (librdkafka would warn about each).
const PRODUCER_ONLY: &[&str] = &[
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "linger.ms",
    "compression.type",
    "compression.codec",
    "batch.num.messages",
    "batch.size",
    "retries",
    "message.send.max.retries",
];

/// One running consumer and the subscribers it feeds.
#[derive(Debug)]
pub struct Feed {
    state: Mutex<FeedState>,
}

#[derive(Debug)]
struct FeedState {
    /// After the last event sent: what a subscriber joining now starts from.
    position: Position,
    live: broadcast::Sender<Arc<StoredEvent>>,
    /// Set (under the lock) when the feed stops, so nobody joins a feed with no reader.
    closed: bool,
}

impl Feed {
    /// A subscriber's start on this feed, unless it has stopped.
    fn join(&self) -> Option<Source> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (!state.closed).then(|| Source {
            position: state.position.clone(),
            backlog: Vec::new(),
            live: Live::Shared(state.live.subscribe()),
        })
    }
}

/// A Kafka broker's feeds on this node.
#[derive(Debug)]
pub struct Feeds {
    shared: tokio::sync::Mutex<HashMap<Arc<str>, Weak<Feed>>>,
    private: Arc<Semaphore>,
}

impl Default for Feeds {
    fn default() -> Self {
        Feeds {
            shared: tokio::sync::Mutex::new(HashMap::new()),
            private: Arc::new(Semaphore::new(PRIVATE_READERS)),
        }
    }
}

impl Feeds {
    pub async fn subscribe(
        &self,
        settings: &BTreeMap<String, String>,
        broker: &Arc<str>,
        topic: &Arc<str>,
        start: Start,
    ) -> Result<Source, SubscribeError> {
        let unavailable = |reason: String| SubscribeError::Unavailable {
            broker: broker.clone(),
            topic: topic.clone(),
            reason,
        };
        if start != Start::Latest {
            let permit =
                self.private
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| SubscribeError::Busy {
                        broker: broker.clone(),
                    })?;
            let (position, consumer) = open(settings, topic, start).await.map_err(unavailable)?;
            let (events, live) = mpsc::channel(OWN_BUFFER);
            tokio::spawn(async move {
                read_for_one(consumer, events).await;
                drop(permit);
            });
            return Ok(Source {
                position,
                backlog: Vec::new(),
                live: Live::Own(live),
            });
        }
        // Held while a feed opens, so concurrent first subscribers share one consumer.
        let mut shared = self.shared.lock().await;
        if let Some(source) = shared
            .get(topic)
            .and_then(Weak::upgrade)
            .and_then(|feed| feed.join())
        {
            return Ok(source);
        }
        let (position, consumer) = open(settings, topic, Start::Latest)
            .await
            .map_err(unavailable)?;
        let feed = Arc::new(Feed {
            state: Mutex::new(FeedState {
                position,
                live: broadcast::channel(FEED_CAPACITY).0,
                closed: false,
            }),
        });
        shared.insert(topic.clone(), Arc::downgrade(&feed));
        let source = feed.join().expect("a new feed is open");
        tokio::spawn(async move { run(&feed, consumer).await });
        Ok(source)
    }
}

/// Creates a consumer assigned every partition of `topic` at `start`, and the position it
/// starts from.
async fn open(
    settings: &BTreeMap<String, String>,
    topic: &Arc<str>,
    start: Start,
) -> Result<(Position, StreamConsumer), String> {
    let mut config = ClientConfig::new();
    if start != Start::Latest {
        config.set("queued.max.messages.kbytes", OWN_PREFETCH_KB);
    }
    for (key, value) in settings {
        if !PRODUCER_ONLY.contains(&key.as_str()) {
            config.set(key, value);
        }
    }
    config
        .set(
            "group.id",
            format!("sluice-dp-feed-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // A position older than the topic's retention resumes at the oldest event kept.
        .set("auto.offset.reset", "earliest");
    let topic = topic.clone();
    // Metadata and watermark requests block: off the async workers.
    tokio::task::spawn_blocking(move || {
        let consumer: StreamConsumer = config
            .create()
            .map_err(|e| format!("cannot create a Kafka consumer: {e}"))?;
        let metadata = consumer
            .fetch_metadata(Some(&topic), OPEN_TIMEOUT)
            .map_err(|e| format!("cannot read the topic's metadata: {e}"))?;
        let described = metadata
            .topics()
            .iter()
            .find(|t| t.name() == &*topic)
            .ok_or("the broker did not describe the topic")?;
        if let Some(error) = described.error() {
            return Err(format!("the topic is not available: {error:?}"));
        }
        if described.partitions().is_empty() {
            return Err("the topic has no partitions (does it exist?)".to_owned());
        }
        // Offsets by time, for every partition at once.
        let by_time = match &start {
            Start::Time(ms) => {
                let mut query = TopicPartitionList::new();
                for partition in described.partitions() {
                    query
                        .add_partition_offset(&topic, partition.id(), Offset::Offset(*ms))
                        .map_err(|e| e.to_string())?;
                }
                let found = consumer
                    .offsets_for_times(query, OPEN_TIMEOUT)
                    .map_err(|e| format!("cannot find the offsets at that time: {e}"))?;
                found
                    .elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(offset) => Some((e.partition(), offset)),
                        _ => None,
                    })
                    .collect()
            }
            _ => BTreeMap::new(),
        };
        let mut position = BTreeMap::new();
        for partition in described.partitions() {
            let id = partition.id();
            let (low, high) = consumer
                .fetch_watermarks(&topic, id, OPEN_TIMEOUT)
                .map_err(|e| format!("cannot read partition {id}'s offsets: {e}"))?;
            let offset = match &start {
                Start::Latest => high,
                Start::Earliest => low,
                // No event at or after the time in this partition: from its end.
                Start::Time(_) => by_time.get(&id).copied().unwrap_or(high),
                // A partition the position does not name is read from its start: no gap.
                Start::After(after) => after.0.get(&id).copied().unwrap_or(low),
            };
            position.insert(id, offset);
        }
        let mut assignment = TopicPartitionList::new();
        for (partition, offset) in &position {
            assignment
                .add_partition_offset(&topic, *partition, Offset::Offset(*offset))
                .map_err(|e| e.to_string())?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| format!("cannot assign the topic's partitions: {e}"))?;
        Ok((Position(position), consumer))
    })
    .await
    .map_err(|e| format!("opening the feed failed: {e}"))?
}

/// Reads the topic and broadcasts each event until no subscriber is left.
async fn run(feed: &Feed, consumer: StreamConsumer) {
    let mut idle = tokio::time::interval(IDLE_CHECK);
    loop {
        tokio::select! {
            received = consumer.recv() => match received {
                Ok(message) => {
                    let event = Arc::new(stored(&message));
                    let mut state = feed.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.position.0.insert(event.partition, event.offset + 1);
                    if state.live.send(event).is_err() {
                        state.closed = true;
                        return;
                    }
                }
                Err(error) => {
                    // librdkafka retries by itself; this only says it is struggling.
                    tracing::warn!(%error, "subscribe feed: cannot read the topic");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
            _ = idle.tick() => {
                let mut state = feed.state.lock().unwrap_or_else(|e| e.into_inner());
                if state.live.receiver_count() == 0 {
                    state.closed = true;
                    return;
                }
            }
        }
    }
}

/// Reads the topic for one subscriber, at its pace: the reader waits while `events` is full,
/// and stops when the subscriber has gone.
async fn read_for_one(consumer: StreamConsumer, events: mpsc::Sender<Arc<StoredEvent>>) {
    loop {
        let event = tokio::select! {
            received = consumer.recv() => match received {
                Ok(message) => Arc::new(stored(&message)),
                Err(error) => {
                    tracing::warn!(%error, "subscribe reader: cannot read the topic");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
            () = events.closed() => return,
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

fn stored(message: &rdkafka::message::BorrowedMessage<'_>) -> StoredEvent {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        Bytes::copy_from_slice(h.value.unwrap_or_default()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    StoredEvent::new(
        message.partition(),
        message.offset(),
        Record {
            topic: message.topic().into(),
            key: message.key().map(Bytes::copy_from_slice),
            value: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
            headers,
            timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
        },
    )
}
