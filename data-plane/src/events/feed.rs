//! Kafka feeds for subscribers: one consumer per topic per node, fanned out to every live
//! subscriber of that topic through a bounded broadcast buffer, and a consumer of its own for
//! each subscriber elsewhere in the topic.
//!
//! A subscriber that starts at `latest` joins the topic's shared feed (started on the first
//! such subscriber, stopped when the last one leaves). The shared feed waits for nobody: a
//! subscriber that falls its buffer behind is closed as slow. The buffer is the last
//! [`FEED_CAPACITY`] events and, besides the newest, at most [`FEED_BYTES`] of them, so that
//! large events do not make it large. A subscriber that resumes from a position the shared
//! feed still holds every event since (a client reconnecting after a short break, as browsers
//! do by themselves) joins it too, starting with those held events. One that resumes from
//! elsewhere or starts at `earliest` reads through a private consumer, since it is somewhere
//! else in the topic. A private reader serves one subscriber, so it reads at that subscriber's
//! pace: a client catching up on a long backlog gets all of it on one connection, however fast
//! the broker sends, with at most [`OWN_BUFFER`] events and [`OWN_BUFFER_BYTES`] between them,
//! and librdkafka's prefetch ([`OWN_PREFETCH_KB`], refetched [`OWN_FETCH_BACKOFF_MS`] after it
//! was full) behind that. Once it has caught up with what the shared feed holds, it hands its
//! subscriber over to the shared feed and stops, so a private reader is held only while its
//! client catches up (the shared feed is opened for that if nobody else reads the topic).
//! Private readers are limited per broker ([`PRIVATE_READERS`]); a client that finds them all
//! busy waits up to [`PRIVATE_WAIT`] for one, then gets a 503 and retries.
//!
//! A topic's shared feed opens once, whoever asks for it meanwhile waiting for that one open
//! (and its failure), under a lock of its own: a topic whose broker is slow to answer holds up
//! no other topic's subscribers. Consumers are closed off the async workers: closing one blocks
//! while librdkafka winds it down.
//!
//! Consumers are assigned partitions explicitly (no consumer-group rebalancing, nothing
//! committed): a subscriber's position lives in its client's `Last-Event-ID`, not in Kafka.
//! Every reader asks the broker every [`PARTITION_CHECK`] (or the broker's
//! `topic.metadata.refresh.interval.ms`) whether its topic has gained partitions, and reads
//! each one added from its first event: an event written to a new partition before the reader
//! saw it is late, never missed. A position that does not name a partition reads it from its
//! first event too, so a client that resumes across the change misses nothing either.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};

use super::Record;
use super::kafka::PRODUCER_ONLY;
use super::memory::{FEED_CAPACITY, StoredEvent};
use super::subscribe::{Live, Position, Source, Start, SubscribeError};

/// Private readers (resumes, `earliest`) open at once per broker on this node.
pub const PRIVATE_READERS: usize = 64;

/// The most a shared feed keeps of its last events, besides the newest, for subscribers behind
/// it, in record bytes ([`StoredEvent::size`]; the SSE frames made of them, about as large,
/// come on top). Besides the newest: one event this large does not close every subscriber that
/// has not read the one before.
pub const FEED_BYTES: usize = 16 << 20;

/// Events a private reader gets ahead of its subscriber before it waits for it...
const OWN_BUFFER: usize = 64;

/// ...or fewer, at most this many record bytes (one event is always let through).
const OWN_BUFFER_BYTES: usize = 1 << 20;

/// librdkafka's prefetch for a private reader (`queued.max.messages.kbytes`, unless the
/// broker's properties set it): what it fetches ahead while its subscriber is slow. librdkafka's
/// default, 64 MB, times [`PRIVATE_READERS`] would be 4 GB.
const OWN_PREFETCH_KB: &str = "2048";

/// How long librdkafka waits before fetching again once the prefetch is full
/// (`fetch.queue.backoff.ms`, unless the broker's properties set it). Its default, 1 s, would
/// hold a client catching up to about one prefetch (2 MB) a second.
const OWN_FETCH_BACKOFF_MS: &str = "10";

/// Limit on each blocking metadata / watermark request while a feed opens...
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// ...and on the whole open (one request per partition), for the subscriber waiting on it.
const OPEN_DEADLINE: Duration = Duration::from_secs(10);

/// How long a subscriber that needs a private reader waits for one when all are busy: a
/// reader is given back once its subscriber has caught up, so a wave of resumes (a node's
/// clients reconnecting to this one) mostly finds one within this.
const PRIVATE_WAIT: Duration = Duration::from_secs(5);

/// How often a private reader looks whether the shared feed holds every event since it...
const HANDOVER_CHECK: Duration = Duration::from_millis(100);

/// ...and no more than this many: see [`Feed::hand_over`].
const HANDOVER_BEHIND: usize = 64;

/// How often an idle feed checks whether anyone still listens.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// How often a reader asks whether its topic has gained partitions, unless the broker's
/// `topic.metadata.refresh.interval.ms` says (a value of 0 or less: never). A Kafka
/// consumer in a group learns of new partitions more seldom (`metadata.max.age.ms`, 5
/// minutes); one metadata request per reader (a topic's shared feed, and each private reader
/// while it catches up) every 30 s costs the broker nothing that matters...
const PARTITION_CHECK: Duration = Duration::from_secs(30);

/// ...and never more often than this, whatever the setting says.
const PARTITION_CHECK_MIN: Duration = Duration::from_millis(100);

/// The broker setting that changes [`PARTITION_CHECK`]: librdkafka's own name for how often
/// a client refreshes what it knows of its topics.
const PARTITION_CHECK_SETTING: &str = "topic.metadata.refresh.interval.ms";

/// One running consumer and the subscribers it feeds.
#[derive(Debug)]
pub struct Feed {
    state: Mutex<FeedState>,
}

#[derive(Debug)]
struct FeedState {
    /// After the last event sent: what a subscriber joining now starts from. A partition added
    /// to the topic since the feed opened is in it from the partition's first event on, as it
    /// is in the position of every subscriber who saw that event: every live subscriber is at
    /// this position, so that an event's frame is made once for all of them.
    position: Position,
    /// Each partition added to the topic since the feed opened, and where the feed began to
    /// read it (its first offset then).
    added: BTreeMap<i32, i64>,
    /// Each event by weak reference: what `held` let go of is gone for a subscriber behind it.
    live: broadcast::Sender<Weak<StoredEvent>>,
    /// The last events, as many as subscribers behind may still be given.
    held: VecDeque<Arc<StoredEvent>>,
    /// Their [`StoredEvent::size`]s added up.
    held_bytes: usize,
    /// Set (under the lock) when the feed stops, so nobody joins a feed with no reader.
    closed: bool,
}

impl FeedState {
    fn new(position: Position) -> Self {
        FeedState {
            position,
            added: BTreeMap::new(),
            live: broadcast::channel(FEED_CAPACITY).0,
            held: VecDeque::new(),
            held_bytes: 0,
            closed: false,
        }
    }

    /// Takes in the next event: keeps it, lets go of the oldest beyond [`FEED_CAPACITY`]
    /// events or, besides it, [`FEED_BYTES`], and sends it to the subscribers. False when none
    /// is left.
    fn send(&mut self, event: Arc<StoredEvent>) -> bool {
        self.position.0.insert(event.partition, event.offset + 1);
        let live = Arc::downgrade(&event);
        let newest = event.size();
        self.held_bytes += newest;
        self.held.push_back(event);
        while self.held.len() > FEED_CAPACITY
            || (self.held.len() > 1 && self.held_bytes - newest > FEED_BYTES)
        {
            if let Some(oldest) = self.held.pop_front() {
                self.held_bytes -= oldest.size();
            }
        }
        self.live.send(live).is_ok()
    }
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

    /// A receiver that keeps the feed running (it stops once it has none), unless it has
    /// stopped.
    fn keep_running(&self) -> Option<broadcast::Receiver<Weak<StoredEvent>>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (!state.closed).then(|| state.live.subscribe())
    }

    /// A resumed subscriber's start on this feed, when the feed still holds every event since
    /// `after` (a client reconnecting after a short break, as browsers do by themselves): the
    /// held events after it, then the live ones, taken under the feed's lock so that nothing
    /// falls between. `None` when the feed has stopped, or `after` is elsewhere in the topic.
    fn resume(&self, after: &Position) -> Option<Source> {
        self.resume_within(after, None)
    }

    /// [`Feed::resume`], for a private reader's subscriber: only when the feed holds at most
    /// [`HANDOVER_BEHIND`] events since `after`, and a quarter of [`FEED_BYTES`]. A
    /// subscriber handed over at the tail of the feed's window would lose the held events it
    /// was given to the newer ones before it read them, and be closed as slow.
    fn hand_over(&self, after: &Position) -> Option<Source> {
        self.resume_within(after, Some((HANDOVER_BEHIND, FEED_BYTES / 4)))
    }

    /// `most`: how many events, and record bytes, the feed may hold since `after`.
    fn resume_within(&self, after: &Position, most: Option<(usize, usize)>) -> Option<Source> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.closed || !state.holds_since(after) {
            return None;
        }
        let mut backlog = Vec::new();
        let mut bytes = 0;
        for event in state.held.iter().filter(|event| after.is_new(event)) {
            bytes += event.size();
            if most
                .is_some_and(|(events, most_bytes)| backlog.len() == events || bytes > most_bytes)
            {
                return None;
            }
            backlog.push(Arc::downgrade(event));
        }
        Some(Source {
            position: after.clone(),
            backlog,
            live: Live::Shared(state.live.subscribe()),
        })
    }
}

impl FeedState {
    /// Whether the events this feed holds are all of the topic's since `after`: it names no
    /// partition the feed does not read, none past where the feed is, and in each partition it
    /// is behind, the feed holds the events from there on. A partition `after` does not name is
    /// read from its start, which the feed holds only for a partition added since it opened
    /// (it read that one from its first event). Held events leave oldest first, so a
    /// partition's held events are all it read since its first held one.
    fn holds_since(&self, after: &Position) -> bool {
        let reads = |partition: &i32| {
            self.position.0.contains_key(partition) || self.added.contains_key(partition)
        };
        if !after.0.keys().all(reads) {
            return false;
        }
        let mut partitions = self.position.0.keys().chain(self.added.keys());
        partitions.all(|partition| {
            let Some(&at) = self
                .position
                .0
                .get(partition)
                .or_else(|| self.added.get(partition))
            else {
                return false;
            };
            let Some(&offset) = after.0.get(partition).or_else(|| self.added.get(partition)) else {
                return false;
            };
            offset == at
                || (offset < at
                    && self
                        .held
                        .iter()
                        .find(|event| event.partition == *partition)
                        .is_some_and(|first| first.offset <= offset))
        })
    }
}

/// A Kafka broker's feeds on this node.
#[derive(Debug)]
pub struct Feeds {
    shared: Arc<SharedFeeds>,
    private: Arc<Semaphore>,
}

impl Default for Feeds {
    fn default() -> Self {
        Feeds {
            shared: Arc::default(),
            private: Arc::new(Semaphore::new(PRIVATE_READERS)),
        }
    }
}

/// Each topic's shared feed, by weak reference (a feed stops when its last subscriber goes).
#[derive(Debug, Default)]
struct SharedFeeds {
    topics: Mutex<HashMap<Arc<str>, Arc<TopicSlot>>>,
}

#[derive(Debug, Default)]
struct TopicSlot {
    feed: Mutex<Weak<Feed>>,
    /// Held while the topic's feed opens, so that concurrent first subscribers share one
    /// consumer; it keeps the last open's failure and when it happened, which everyone who
    /// waited for that open is given rather than trying again one after another.
    opening: tokio::sync::Mutex<Option<(tokio::time::Instant, String)>>,
}

impl TopicSlot {
    /// The feed, unless it has stopped.
    fn running(&self) -> Option<Arc<Feed>> {
        let feed = self
            .feed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()?;
        let open = !feed.state.lock().unwrap_or_else(|e| e.into_inner()).closed;
        open.then_some(feed)
    }
}

impl SharedFeeds {
    fn slot(&self, topic: &Arc<str>) -> Arc<TopicSlot> {
        self.topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(topic.clone())
            .or_default()
            .clone()
    }

    /// `topic`'s running feed, opened (at the topic's end) if it has none.
    async fn feed(
        &self,
        settings: &BTreeMap<String, String>,
        topic: &Arc<str>,
    ) -> Result<Arc<Feed>, OpenError> {
        let slot = self.slot(topic);
        if let Some(feed) = slot.running() {
            return Ok(feed);
        }
        let asked = tokio::time::Instant::now();
        let mut failed = slot.opening.lock().await;
        if let Some(feed) = slot.running() {
            return Ok(feed);
        }
        if let Some((at, reason)) = &*failed
            && *at >= asked
        {
            return Err(OpenError::Unavailable(reason.clone()));
        }
        let opened = open(settings, topic, Start::Latest).await;
        let (position, consumer) = opened.inspect_err(|error| {
            if let OpenError::Unavailable(reason) = error {
                *failed = Some((tokio::time::Instant::now(), reason.clone()));
            }
        })?;
        let mut watch = PartitionWatch::new(&consumer, topic, &position, partition_check(settings));
        let feed = Arc::new(Feed {
            state: Mutex::new(FeedState::new(position)),
        });
        *slot.feed.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(&feed);
        // The feed's first subscriber has until its first idle check to join.
        let running = feed.clone();
        tokio::spawn(async move {
            run(&running, &consumer, &mut watch).await;
            watch.settle().await;
            close_off_the_workers(consumer);
        });
        Ok(feed)
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
        let not_opened = |error: OpenError| match error {
            OpenError::Unavailable(reason) => SubscribeError::Unavailable {
                broker: broker.clone(),
                topic: topic.clone(),
                reason,
            },
            OpenError::Position(reason) => SubscribeError::Position {
                topic: topic.clone(),
                reason,
            },
        };
        // Every subscriber ends on the shared feed: at once, or once a private reader has
        // caught up with it. Joined under the feed's lock; a feed that stopped since it was
        // looked up is opened again.
        let mut feed = self
            .shared
            .feed(settings, topic)
            .await
            .map_err(not_opened)?;
        // `Ok`: joined; `Err`: a private reader, and a receiver that keeps the shared feed
        // running while it catches up (taken now: the feed may have been opened for this
        // subscriber alone, and would stop at its first idle check while the reader opens).
        let joined = loop {
            let joined = match &start {
                Start::Latest => feed.join().map(Ok),
                Start::After(after) => match feed.resume(after) {
                    Some(source) => return Ok(source),
                    None => feed.keep_running().map(Err),
                },
                Start::Earliest | Start::Time(_) => feed.keep_running().map(Err),
            };
            match joined {
                Some(joined) => break joined,
                None => {
                    feed = self
                        .shared
                        .feed(settings, topic)
                        .await
                        .map_err(not_opened)?
                }
            }
        };
        let keep_running = match joined {
            Ok(source) => return Ok(source),
            Err(keep_running) => keep_running,
        };
        let permit = tokio::time::timeout(PRIVATE_WAIT, self.private.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| SubscribeError::Busy {
                broker: broker.clone(),
            })?;
        let (position, consumer) = open(settings, topic, start).await.map_err(not_opened)?;
        let (events, live) = mpsc::channel(OWN_BUFFER);
        let reader = PrivateReader {
            events,
            bytes: Arc::new(Semaphore::new(OWN_BUFFER_BYTES)),
            position: position.clone(),
            feed,
            keep_running,
        };
        let mut watch = PartitionWatch::new(&consumer, topic, &position, partition_check(settings));
        tokio::spawn(async move {
            reader.read(&consumer, &mut watch).await;
            // The reader's permit goes back only once nothing uses its consumer.
            watch.settle().await;
            close_off_the_workers(consumer);
            drop(permit);
        });
        Ok(Source {
            position,
            backlog: Vec::new(),
            live: Live::Own(OwnFeed { events: live }),
        })
    }
}

/// Drops `consumer` where blocking is allowed: rdkafka's drop waits for its queue to close
/// and librdkafka to wind the client down, which would stall every stream on the worker.
/// Called once its reader's [`PartitionWatch`] has settled, so this is the last reference.
fn close_off_the_workers(consumer: Arc<StreamConsumer>) {
    tokio::task::spawn_blocking(move || drop(consumer));
}

/// How often readers of a broker look for partitions added to their topic; `None`: never.
fn partition_check(settings: &BTreeMap<String, String>) -> Option<Duration> {
    match settings.get(PARTITION_CHECK_SETTING) {
        None => Some(PARTITION_CHECK),
        // librdkafka refuses a value that is not a number when the reader is created, before
        // this is read.
        Some(ms) => match ms.trim().parse::<i64>() {
            Ok(ms) if ms <= 0 => None,
            Ok(ms) => Some(Duration::from_millis(ms.unsigned_abs()).max(PARTITION_CHECK_MIN)),
            Err(_) => Some(PARTITION_CHECK),
        },
    }
}

/// Partitions added to a topic, each with its first offset (low watermark).
type Added = Vec<(i32, i64)>;

/// A reader's watch for partitions added to its topic after it opened.
struct PartitionWatch {
    consumer: Arc<StreamConsumer>,
    topic: Arc<str>,
    /// The partitions the reader is assigned.
    known: BTreeSet<i32>,
    /// `None`: the broker's settings turned the check off.
    every: Option<tokio::time::Interval>,
    /// The metadata request in flight, off the async workers.
    checking: Option<tokio::task::JoinHandle<Result<Added, String>>>,
}

impl PartitionWatch {
    fn new(
        consumer: &Arc<StreamConsumer>,
        topic: &Arc<str>,
        position: &Position,
        every: Option<Duration>,
    ) -> Self {
        let every = every.map(|every| {
            let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        PartitionWatch {
            consumer: consumer.clone(),
            topic: topic.clone(),
            known: position.0.keys().copied().collect(),
            every,
            checking: None,
        }
    }

    /// Waits for the check in flight, if any, so that the reader's consumer is not used
    /// once this returns (the check holds a reference to it).
    async fn settle(self) {
        if let Some(checking) = self.checking {
            let _ = checking.await;
        }
    }

    /// The partitions added to the topic since the last call, each with its first offset,
    /// once the reader is assigned them from there; pending until there are some. Cancel-safe:
    /// a check in flight when the caller moves on is picked up by the next call.
    async fn added(&mut self) -> Added {
        loop {
            if self.checking.is_none() {
                let Some(every) = &mut self.every else {
                    return std::future::pending().await;
                };
                every.tick().await;
                let (consumer, topic, known) = (
                    self.consumer.clone(),
                    self.topic.clone(),
                    self.known.clone(),
                );
                self.checking = Some(tokio::task::spawn_blocking(move || {
                    assign_added(&consumer, &topic, &known)
                }));
            }
            let checked = self.checking.as_mut().expect("set above").await;
            self.checking = None;
            match checked {
                Ok(Ok(added)) if !added.is_empty() => {
                    self.known
                        .extend(added.iter().map(|(partition, _)| *partition));
                    tracing::info!(
                        topic = %self.topic,
                        partitions = ?added,
                        "subscribe feed: reading the partitions added to the topic from their first event"
                    );
                    return added;
                }
                Ok(Ok(_)) => {}
                Ok(Err(reason)) => tracing::warn!(
                    topic = %self.topic,
                    %reason,
                    "subscribe feed: cannot look for partitions added to the topic; trying again later"
                ),
                Err(error) => tracing::warn!(
                    topic = %self.topic,
                    %error,
                    "subscribe feed: the check for added partitions failed"
                ),
            }
        }
    }
}

/// Asks the broker for `topic`'s partitions and assigns `consumer` each one not in `known`
/// whose first offset (low watermark) it can read, from there, and returns those; one it
/// cannot read is left for the next check. Blocking, within [`OPEN_DEADLINE`] in all and each
/// request within [`OPEN_TIMEOUT`].
fn assign_added(
    consumer: &StreamConsumer,
    topic: &str,
    known: &BTreeSet<i32>,
) -> Result<Added, String> {
    let deadline = std::time::Instant::now() + OPEN_DEADLINE;
    let left = || {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        (!left.is_zero()).then(|| left.min(OPEN_TIMEOUT))
    };
    let metadata = consumer
        .fetch_metadata(Some(topic), OPEN_TIMEOUT)
        .map_err(|e| format!("cannot read the topic's metadata: {e}"))?;
    let Some(described) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err("the broker did not describe the topic".to_owned());
    };
    if let Some(error) = described.error() {
        return Err(format!("the topic is not available: {error:?}"));
    }
    let mut added = Vec::new();
    let mut assignment = TopicPartitionList::new();
    for partition in described.partitions() {
        let id = partition.id();
        if known.contains(&id) {
            continue;
        }
        let Some(timeout) = left() else {
            break;
        };
        match consumer.fetch_watermarks(topic, id, timeout) {
            Ok((low, _)) => {
                assignment
                    .add_partition_offset(topic, id, Offset::Offset(low))
                    .map_err(|e| e.to_string())?;
                added.push((id, low));
            }
            Err(error) => tracing::warn!(
                topic,
                partition = id,
                %error,
                "subscribe feed: cannot read the offsets of a partition added to the topic; \
                 trying again at the next check"
            ),
        }
    }
    if !added.is_empty() {
        consumer
            .incremental_assign(&assignment)
            .map_err(|e| format!("cannot assign the added partitions: {e}"))?;
    }
    Ok(added)
}

/// Why a reader could not open.
#[derive(Debug)]
enum OpenError {
    /// The broker could not be asked, or answered with an error.
    Unavailable(String),
    /// The subscriber's resume position is not one of the topic's.
    Position(String),
}

impl From<String> for OpenError {
    fn from(reason: String) -> Self {
        OpenError::Unavailable(reason)
    }
}

impl From<&str> for OpenError {
    fn from(reason: &str) -> Self {
        OpenError::Unavailable(reason.to_owned())
    }
}

/// Creates a consumer assigned every partition of `topic` at `start`, and the position it
/// starts from, within [`OPEN_DEADLINE`] in all (each request within [`OPEN_TIMEOUT`] and
/// what is left of it: a broker slow to answer a topic of many partitions does not hold a
/// blocking thread past the deadline).
async fn open(
    settings: &BTreeMap<String, String>,
    topic: &Arc<str>,
    start: Start,
) -> Result<(Position, Arc<StreamConsumer>), OpenError> {
    let config = consumer_config(settings, &start);
    let topic = topic.clone();
    let deadline = std::time::Instant::now() + OPEN_DEADLINE;
    let left = move || -> Result<Duration, OpenError> {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(OpenError::Unavailable(format!(
                "the broker did not describe the topic within {OPEN_DEADLINE:?}"
            )));
        }
        Ok(left.min(OPEN_TIMEOUT))
    };
    // Metadata and watermark requests block: off the async workers.
    tokio::task::spawn_blocking(move || -> Result<_, OpenError> {
        let consumer: StreamConsumer = config
            .create()
            .map_err(|e| format!("cannot create a Kafka consumer: {e}"))?;
        let metadata = consumer
            .fetch_metadata(Some(&topic), left()?)
            .map_err(|e| format!("cannot read the topic's metadata: {e}"))?;
        let described = metadata
            .topics()
            .iter()
            .find(|t| t.name() == &*topic)
            .ok_or("the broker did not describe the topic")?;
        if let Some(error) = described.error() {
            return Err(format!("the topic is not available: {error:?}").into());
        }
        if described.partitions().is_empty() {
            return Err("the topic has no partitions (does it exist?)".into());
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
                    .offsets_for_times(query, left()?)
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
        let mut ends = BTreeMap::new();
        let mut starts = BTreeMap::new();
        for partition in described.partitions() {
            let id = partition.id();
            let (low, high) = consumer
                .fetch_watermarks(&topic, id, left()?)
                .map_err(|e| format!("cannot read partition {id}'s offsets: {e}"))?;
            ends.insert(id, high);
            starts.insert(id, low);
        }
        if let Start::After(after) = &start {
            after.check_within(&ends).map_err(OpenError::Position)?;
        }
        for (&id, &high) in &ends {
            let low = starts[&id];
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
        Ok((Position(position), Arc::new(consumer)))
    })
    .await
    .map_err(|e| OpenError::Unavailable(format!("opening the feed failed: {e}")))?
}

/// Settings every reader sets itself, whatever the broker's `properties` say.
const READER_OWN: &[&str] = &[
    "group.id",
    "enable.auto.commit",
    "enable.partition.eof",
    "auto.offset.reset",
];

/// A reader's settings: the broker's, less those only a producer takes and those it sets
/// itself (under either of their names: librdkafka would keep either value), and its own.
fn consumer_config(settings: &BTreeMap<String, String>, start: &Start) -> ClientConfig {
    let mut config = ClientConfig::new();
    if *start != Start::Latest {
        config
            .set("queued.max.messages.kbytes", OWN_PREFETCH_KB)
            .set("fetch.queue.backoff.ms", OWN_FETCH_BACKOFF_MS);
    }
    let own = |key: &str| {
        READER_OWN.contains(&key)
            || sluice_proto::kafka::alias_of(key).is_some_and(|a| READER_OWN.contains(&a))
    };
    for (key, value) in settings {
        if !PRODUCER_ONLY.contains(&key.as_str()) && !own(key) {
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
    config
}

/// Reads the topic and broadcasts each event until no subscriber is left.
async fn run(feed: &Feed, consumer: &StreamConsumer, watch: &mut PartitionWatch) {
    // Not at once: the subscriber that opened the feed joins it after this starts.
    let mut idle = tokio::time::interval_at(tokio::time::Instant::now() + IDLE_CHECK, IDLE_CHECK);
    loop {
        tokio::select! {
            received = consumer.recv() => match received {
                Ok(message) => {
                    let event = Arc::new(stored(&message));
                    let mut state = feed.state.lock().unwrap_or_else(|e| e.into_inner());
                    if !state.send(event) {
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
            added = watch.added() => {
                let mut state = feed.state.lock().unwrap_or_else(|e| e.into_inner());
                state.added.extend(added);
            }
        }
    }
}

/// What a private reader hands its subscriber.
#[derive(Debug)]
pub enum OwnItem {
    /// The next event, with its share of [`OWN_BUFFER_BYTES`].
    Event(Arc<StoredEvent>, OwnedSemaphorePermit),
    /// The reader has caught up with the shared feed and stopped: the subscriber goes on
    /// there, from the reader's position (the feed's held events after it, then its live
    /// ones).
    Join(Source),
}

/// The subscriber's end of a private reader: events handed over, each with its share of
/// [`OWN_BUFFER_BYTES`], given back as the subscriber takes it.
#[derive(Debug)]
pub struct OwnFeed {
    events: mpsc::Receiver<OwnItem>,
}

impl OwnFeed {
    /// The next item; `None` once the reader has stopped. An event's share of the buffer goes
    /// back to the reader when the item is dropped: the subscriber holds the event, not the
    /// buffer.
    pub async fn recv(&mut self) -> Option<OwnItem> {
        self.events.recv().await
    }
}

/// Reads the topic for one subscriber, at its pace, until it can hand the subscriber over to
/// the topic's shared feed.
struct PrivateReader {
    events: mpsc::Sender<OwnItem>,
    /// [`OWN_BUFFER_BYTES`], shared out to the events not yet taken.
    bytes: Arc<Semaphore>,
    /// After the last event read.
    position: Position,
    /// The topic's shared feed...
    feed: Arc<Feed>,
    /// ...kept from stopping for want of subscribers while this one catches up, by a receiver
    /// never read (a receiver that lags holds nothing back).
    keep_running: broadcast::Receiver<Weak<StoredEvent>>,
}

impl PrivateReader {
    /// Waits while the subscriber has [`OWN_BUFFER`] events or [`OWN_BUFFER_BYTES`] not yet
    /// taken; stops when it has gone, or once it is handed over to the shared feed.
    async fn read(self, consumer: &StreamConsumer, watch: &mut PartitionWatch) {
        let PrivateReader {
            events,
            bytes,
            mut position,
            feed,
            keep_running: _keep_running,
        } = self;
        let mut handover = tokio::time::interval(HANDOVER_CHECK);
        handover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                _ = handover.tick() => {
                    // Once the subscriber has taken every event read (it is at `position`, and
                    // reads the feed's events at once) and this is near the feed's newest.
                    if events.capacity() == events.max_capacity()
                        && let Some(source) = feed.hand_over(&position)
                    {
                        let _ = events.try_send(OwnItem::Join(source));
                        return;
                    }
                    continue;
                }
                () = events.closed() => return,
                // Read from their first event; in the position from their first event on, as
                // on the shared feed.
                _ = watch.added() => continue,
            };
            position.advance(&event);
            // An event larger than the whole allowance waits for all of it.
            let share = u32::try_from(event.size().clamp(1, OWN_BUFFER_BYTES))
                .expect("OWN_BUFFER_BYTES fits in u32");
            let permit = tokio::select! {
                permit = bytes.clone().acquire_many_owned(share) => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                () = events.closed() => return,
            };
            if events.send(OwnItem::Event(event, permit)).await.is_err() {
                return;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::subscribe::Live;

    #[test]
    fn readers_take_no_producer_settings_and_private_ones_prefetch_less() {
        let settings: BTreeMap<String, String> = [
            ("acks", "all"),
            ("linger.ms", "1"),
            ("request.timeout.ms", "3000"),
            ("fetch.wait.max.ms", "5"),
            ("client.id", "sluice-dp"),
            ("auto.commit.enable", "true"),
            ("auto.offset.reset", "latest"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let shared = consumer_config(&settings, &Start::Latest);
        for producer_only in ["acks", "linger.ms", "request.timeout.ms"] {
            assert_eq!(shared.get(producer_only), None, "{producer_only}");
        }
        assert_eq!(shared.get("fetch.wait.max.ms"), Some("5"));
        assert_eq!(
            shared.get("auto.commit.enable"),
            None,
            "an alias of its own"
        );
        assert_eq!(shared.get("enable.auto.commit"), Some("false"));
        assert_eq!(shared.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(shared.get("client.id"), Some("sluice-dp"));
        assert_eq!(shared.get("queued.max.messages.kbytes"), None);
        let private = consumer_config(&settings, &Start::Earliest);
        assert_eq!(
            private.get("queued.max.messages.kbytes"),
            Some(OWN_PREFETCH_KB)
        );
    }

    fn event(offset: i64, bytes: usize) -> Arc<StoredEvent> {
        Arc::new(StoredEvent::new(
            0,
            offset,
            Record {
                topic: "t".into(),
                key: None,
                value: Bytes::from(vec![b'x'; bytes]),
                headers: Vec::new(),
                timestamp_ms: 0,
            },
        ))
    }

    fn at(pairs: &[(i32, i64)]) -> Position {
        Position(pairs.iter().copied().collect())
    }

    /// The partition and offset of each held event a resumed subscriber is given first.
    fn backlog(source: &Source) -> Vec<(i32, i64)> {
        source
            .backlog
            .iter()
            .filter_map(Weak::upgrade)
            .map(|e| (e.partition, e.offset))
            .collect()
    }

    #[tokio::test]
    async fn a_resume_joins_the_feed_while_it_holds_every_event_since() {
        let feed = Feed {
            state: Mutex::new(FeedState::new(at(&[(0, 10), (1, 5)]))),
        };
        {
            let mut state = feed.state.lock().unwrap();
            let _keep_open = state.live.subscribe();
            for (partition, offset) in [(0, 10), (1, 5), (0, 11), (0, 12), (1, 6)] {
                let record = event(0, 1).record.clone();
                state.send(Arc::new(StoredEvent::new(partition, offset, record)));
            }
            assert_eq!(state.position, at(&[(0, 13), (1, 7)]));
            for (after, holds) in [
                (at(&[(0, 13), (1, 7)]), true),
                (at(&[(0, 11), (1, 5)]), true),
                (at(&[(0, 10), (1, 7)]), true),
                (at(&[(0, 9), (1, 7)]), false),
                (at(&[(0, 13), (1, 4)]), false),
                (at(&[(0, 14), (1, 7)]), false),
                (at(&[(0, 13)]), false),
                (at(&[(0, 13), (2, 0)]), false),
            ] {
                assert_eq!(state.holds_since(&after), holds, "{after:?}");
            }
        }
        let source = feed.resume(&at(&[(0, 12), (1, 6)])).unwrap();
        assert_eq!(backlog(&source), [(0, 12), (1, 6)]);
        assert_eq!(source.position, at(&[(0, 12), (1, 6)]));
        assert!(feed.resume(&at(&[(0, 9), (1, 5)])).is_none());
    }

    #[tokio::test]
    async fn a_resume_that_names_no_added_partition_joins_the_feed_that_read_it_all() {
        let feed = Feed {
            state: Mutex::new(FeedState::new(at(&[(0, 10)]))),
        };
        let _keep_open = feed.keep_running().unwrap();
        {
            let mut state = feed.state.lock().unwrap();
            state.added.insert(1, 3);
            // Until the added partition's first event, a subscriber joins at a position that
            // does not name it, as those who joined before.
            assert_eq!(state.position, at(&[(0, 10)]));
            for (after, holds) in [
                (at(&[(0, 10)]), true),
                (at(&[(0, 10), (1, 3)]), true),
                (at(&[(0, 10), (1, 2)]), false),
                (at(&[(0, 10), (2, 0)]), false),
                (at(&[(1, 3)]), false),
            ] {
                assert_eq!(state.holds_since(&after), holds, "{after:?}");
            }
            let record = event(0, 1).record.clone();
            state.send(Arc::new(StoredEvent::new(1, 3, record)));
            assert_eq!(state.position, at(&[(0, 10), (1, 4)]));
            assert!(
                state.holds_since(&at(&[(0, 10)])),
                "read from its first event"
            );
        }
        let source = feed.resume(&at(&[(0, 10)])).unwrap();
        assert_eq!(backlog(&source), [(1, 3)]);
        // A partition the feed read from its start only if it was added.
        let opened_with_it = FeedState::new(at(&[(0, 10), (1, 4)]));
        assert!(!opened_with_it.holds_since(&at(&[(0, 10)])));
    }

    #[tokio::test]
    async fn a_private_reader_is_handed_over_only_near_the_feeds_newest() {
        let feed = Feed {
            state: Mutex::new(FeedState::new(at(&[(0, 0)]))),
        };
        let _keep_open = feed.keep_running().unwrap();
        for offset in 0..200 {
            feed.state.lock().unwrap().send(event(offset, 1));
        }
        // Held, but at the tail of the window: what it was given would be let go first.
        assert!(feed.resume(&at(&[(0, 10)])).is_some());
        assert!(feed.hand_over(&at(&[(0, 10)])).is_none());
        let behind = 200 - HANDOVER_BEHIND as i64;
        assert!(feed.hand_over(&at(&[(0, behind - 1)])).is_none());
        let source = feed.hand_over(&at(&[(0, behind)])).unwrap();
        assert_eq!(source.backlog.len(), HANDOVER_BEHIND);
        assert_eq!(source.position, at(&[(0, behind)]));
        assert!(feed.hand_over(&at(&[(0, 200)])).unwrap().backlog.is_empty());
    }

    #[tokio::test]
    async fn a_feed_keeps_at_most_its_bytes_and_a_subscriber_behind_them_lags() {
        let mut state = FeedState::new(Position::default());
        let mut behind = Live::Shared(state.live.subscribe());
        let mut current = Live::Shared(state.live.subscribe());
        // Far fewer events than the feed holds by count, more bytes than it keeps.
        let big = FEED_BYTES / 4;
        for offset in 0..8 {
            assert!(state.send(event(offset, big)));
            assert_eq!(current.recv().await.unwrap().offset, offset);
        }
        assert_eq!(
            state.held.len(),
            5,
            "the newest, and the ones before it that fit"
        );
        assert_eq!(state.held_bytes, 5 * big);
        assert_eq!(state.position, Position([(0, 8)].into()));
        assert!(
            matches!(
                behind.recv().await,
                Err(broadcast::error::RecvError::Lagged(_))
            ),
            "event 0 was let go: the subscriber still at it is behind what the feed keeps"
        );
        // One event larger than the budget is kept beside the budget's worth before it, so a
        // subscriber one event behind is not closed by it.
        assert!(state.send(event(8, FEED_BYTES * 2)));
        assert_eq!(state.held.len(), 5);
        assert_eq!(state.held.front().unwrap().offset, 4);
        assert_eq!(current.recv().await.unwrap().offset, 8);
    }
}
