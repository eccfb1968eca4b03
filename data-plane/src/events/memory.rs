//! The in-process `memory` broker, for standalone mode, demos and tests. **Not durable**:
//! its events live in this node's memory, are lost when the node stops and are not shared
//! with other nodes.
//!
//! Each topic has one partition (0), offsets from 0, and keeps its last `retained_events`
//! events for subscribers that start at `earliest` or resume from an earlier position.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;

use sluice_proto::pb;
use tokio::sync::broadcast;

use super::subscribe::Position;
use super::{Delivered, Record};

/// Events kept per topic when the resource does not say.
pub const DEFAULT_RETAINED_EVENTS: usize = 1000;

/// Events a live subscriber may fall behind before it is closed as slow (fewer when the
/// topic retains fewer, or on Kafka when they are large: see [`super::feed`]).
pub const FEED_CAPACITY: usize = 1024;

/// An event as the memory broker stored it.
#[derive(Debug)]
pub struct StoredEvent {
    pub partition: i32,
    pub offset: i64,
    pub record: Record,
    /// The event as an SSE frame, made by the first subscriber that sends it and shared by
    /// every other at the same position (all live subscribers of a feed are).
    pub sse_frame: OnceLock<(Position, Bytes)>,
}

impl StoredEvent {
    pub fn new(partition: i32, offset: i64, record: Record) -> Self {
        StoredEvent {
            partition,
            offset,
            record,
            sse_frame: OnceLock::new(),
        }
    }

    /// The record's bytes: key, value and headers.
    pub fn size(&self) -> usize {
        let record = &self.record;
        let headers: usize = record.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        record.key.as_ref().map_or(0, Bytes::len) + record.value.len() + headers
    }
}

/// How far behind a live subscriber of a topic retaining `retained` events may fall: fewer
/// than the topic retains (the largest power of two below it, since the ring's length is
/// one), so that the subscriber is closed while the events it missed are still there to
/// resume from. A ring as long as the log would close it only once the next event it needs
/// was gone, and its resume would start with a gap.
fn live_capacity(retained: usize) -> usize {
    match retained {
        0 | 1 => 1,
        n => {
            let below = n - 1;
            (1 << (usize::BITS - 1 - below.leading_zeros())).min(FEED_CAPACITY)
        }
    }
}

#[derive(Debug)]
pub struct MemoryBroker {
    retained: usize,
    topics: Mutex<HashMap<Arc<str>, Arc<Topic>>>,
}

#[derive(Debug)]
struct Topic {
    log: Mutex<Log>,
    /// Live events, by weak reference: the log holds them, and a subscriber given an event
    /// the log no longer holds has fallen further behind than the topic retains.
    live: broadcast::Sender<Weak<StoredEvent>>,
}

#[derive(Debug, Default)]
struct Log {
    next_offset: i64,
    events: VecDeque<Arc<StoredEvent>>,
}

/// A subscriber's start on a memory topic: the retained events from its position, then the
/// live feed. Taken under the topic's lock, so nothing falls between the two.
#[derive(Debug)]
pub struct Subscription {
    pub backlog: Vec<Arc<StoredEvent>>,
    pub live: broadcast::Receiver<Weak<StoredEvent>>,
    /// The offset the next event will have.
    pub next_offset: i64,
}

impl MemoryBroker {
    pub fn new(config: &pb::MemoryBroker) -> Self {
        let retained = match config.retained_events {
            0 => DEFAULT_RETAINED_EVENTS,
            n => n as usize,
        };
        MemoryBroker {
            retained,
            topics: Mutex::new(HashMap::new()),
        }
    }

    fn topic(&self, name: &Arc<str>) -> Arc<Topic> {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        topics
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(Topic {
                    log: Mutex::new(Log::default()),
                    live: broadcast::channel(live_capacity(self.retained)).0,
                })
            })
            .clone()
    }

    pub fn publish(&self, record: Record) -> Delivered {
        let topic = self.topic(&record.topic);
        let mut log = topic.log.lock().unwrap_or_else(|e| e.into_inner());
        let delivered = Delivered {
            partition: 0,
            offset: log.next_offset,
            timestamp_ms: record.timestamp_ms,
        };
        let event = Arc::new(StoredEvent::new(0, log.next_offset, record));
        log.next_offset += 1;
        if log.events.len() == self.retained {
            log.events.pop_front();
        }
        // Held before it is sent, so that every subscriber given it finds it.
        log.events.push_back(event.clone());
        // No live subscriber is not an error: the event is retained.
        let _ = topic.live.send(Arc::downgrade(&event));
        delivered
    }

    /// Subscribes to `topic` from offset `from` (`None`: only new events). Events before
    /// the oldest retained one are gone; the backlog starts at the oldest retained then.
    pub fn subscribe(&self, topic: &Arc<str>, from: Option<i64>) -> Subscription {
        let topic = self.topic(topic);
        let log = topic.log.lock().unwrap_or_else(|e| e.into_inner());
        let backlog = match from {
            Some(from) => log
                .events
                .iter()
                .filter(|event| event.offset >= from)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        Subscription {
            backlog,
            live: topic.live.subscribe(),
            next_offset: log.next_offset,
        }
    }

    /// The offset of the first retained event of `topic` created at or after `ms` (the next
    /// event's when there is none).
    pub fn offset_at(&self, topic: &Arc<str>, ms: i64) -> i64 {
        let topic = self.topic(topic);
        let log = topic.log.lock().unwrap_or_else(|e| e.into_inner());
        log.events
            .iter()
            .find(|event| event.record.timestamp_ms >= ms)
            .map_or(log.next_offset, |event| event.offset)
    }

    /// The offset of the oldest retained event of `topic`, and the next one's.
    pub fn bounds(&self, topic: &Arc<str>) -> (i64, i64) {
        let topic = self.topic(topic);
        let log = topic.log.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = log.events.front().map_or(log.next_offset, |e| e.offset);
        (oldest, log.next_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &Arc<str>, value: &str) -> Record {
        Record {
            topic: topic.clone(),
            key: None,
            value: value.to_owned().into(),
            headers: Vec::new(),
            timestamp_ms: 1,
        }
    }

    #[test]
    fn offsets_count_up_and_only_the_last_events_are_kept() {
        let broker = MemoryBroker::new(&pb::MemoryBroker { retained_events: 3 });
        let topic: Arc<str> = "orders".into();
        let offsets: Vec<i64> = (0..5)
            .map(|i| broker.publish(record(&topic, &i.to_string())).offset)
            .collect();
        assert_eq!(offsets, [0, 1, 2, 3, 4]);
        assert_eq!(broker.bounds(&topic), (2, 5));
        let from_start = broker.subscribe(&topic, Some(0));
        let kept: Vec<i64> = from_start.backlog.iter().map(|e| e.offset).collect();
        assert_eq!(kept, [2, 3, 4], "evicted events are not replayed");
        let other: Arc<str> = "other".into();
        assert_eq!(broker.bounds(&other), (0, 0), "topics are separate");
    }

    #[test]
    fn a_live_subscriber_falls_fewer_events_behind_than_the_topic_retains() {
        let capacities: Vec<usize> = [1, 2, 3, 16, 17, 1000, 1024, 1025, 100_000]
            .into_iter()
            .map(live_capacity)
            .collect();
        assert_eq!(capacities, [1, 1, 2, 8, 16, 512, 512, 1024, 1024]);
    }

    #[tokio::test]
    async fn a_subscriber_sees_the_backlog_then_live_events_without_gap_or_repeat() {
        let broker = MemoryBroker::new(&pb::MemoryBroker::default());
        let topic: Arc<str> = "t".into();
        for i in 0..3 {
            broker.publish(record(&topic, &i.to_string()));
        }
        let mut subscription = broker.subscribe(&topic, Some(1));
        broker.publish(record(&topic, "3"));
        let backlog: Vec<i64> = subscription.backlog.iter().map(|e| e.offset).collect();
        assert_eq!(backlog, [1, 2]);
        assert_eq!(subscription.next_offset, 3);
        let live = subscription.live.recv().await.unwrap().upgrade().unwrap();
        assert_eq!((live.offset, &live.record.value[..]), (3, &b"3"[..]));
    }
}
