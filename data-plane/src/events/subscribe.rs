//! The `subscribe` route action: a topic streamed to the client as Server-Sent Events.
//!
//! Every event's SSE `id` is the subscriber's **position** after it: for each partition of
//! the topic, the offset of the next event to read (`0:17,1:4`). A client that reconnects, to
//! this node or any other, sends it back as `Last-Event-ID` and continues exactly after the
//! last event it saw: no gap, no repeat. A new subscriber starts at the route's default
//! (`latest` unless configured), or where `?start=earliest|latest` says.
//!
//! Live subscribers of a topic share one reader per node (a Kafka consumer, [`super::feed`],
//! or the memory broker's live channel). A client that falls more than the feed's buffer
//! behind is closed with a final `sluice-closed` event carrying its position, rather than
//! being let grow memory; it resumes with that position. A Kafka subscriber that resumes
//! where the shared reader still holds every event since joins it, starting with those events
//! (by weak reference: one the reader lets go first closes it as slow too); one that resumes
//! from further back (or starts at `earliest`) reads through a consumer of its own, which
//! waits for it instead.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sluice_proto::pb;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::feed::OwnItem;
use super::memory::StoredEvent;
use super::pacing::Pacer;
use super::{Broker, Record};
use crate::auth::standing::{AccessEnded, StreamAccess};
use crate::auth::{AccessGuard, Denial, Identity};
use crate::ratelimit::Rate;
use crate::server::error::GatewayError;
use crate::telemetry::Metrics;
use crate::upstream::ProxyBody;

/// Heartbeat interval when the route does not set one.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);

/// Where a subscriber is: per partition, the offset of the next event to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position(pub BTreeMap<i32, i64>);

impl Position {
    /// `0:17,1:4`, partitions in order.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (i, (partition, offset)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{partition}:{offset}");
        }
        out
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut position = BTreeMap::new();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (partition, offset) = part
                .split_once(':')
                .ok_or_else(|| format!("{part:?} is not partition:offset"))?;
            let partition: i32 = partition
                .parse()
                .ok()
                .filter(|p| *p >= 0)
                .ok_or_else(|| format!("{partition:?} is not a partition number"))?;
            let offset: i64 = offset
                .parse()
                .ok()
                .filter(|o| *o >= 0)
                .ok_or_else(|| format!("{offset:?} is not an offset"))?;
            if position.insert(partition, offset).is_some() {
                return Err(format!("partition {partition} appears twice"));
            }
        }
        if position.is_empty() {
            return Err("names no partition".into());
        }
        Ok(Position(position))
    }

    /// Whether `event` comes after this position (not yet seen).
    pub(super) fn is_new(&self, event: &StoredEvent) -> bool {
        self.0
            .get(&event.partition)
            .is_none_or(|next| event.offset >= *next)
    }

    pub(super) fn advance(&mut self, event: &StoredEvent) {
        self.0.insert(event.partition, event.offset + 1);
    }
}

/// Where a new subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    Latest,
    Earliest,
    /// The first events at or after this time (milliseconds since the Unix epoch).
    Time(i64),
    /// Resume after a `Last-Event-ID`.
    After(Position),
}

/// What a subscriber reads: events already known (memory backlog), then the live feed.
#[derive(Debug)]
pub struct Source {
    pub position: Position,
    /// By weak reference: the feed or the memory broker's log holds them, and an event let go
    /// before the subscriber took it means it fell behind (closed as slow with its position,
    /// which is just before that event), so a slow subscriber pins nothing.
    pub backlog: Vec<Weak<StoredEvent>>,
    pub live: Live,
}

/// Where a subscriber's events come from after its backlog.
#[derive(Debug)]
pub enum Live {
    /// A feed shared with the topic's other live subscribers, which waits for none of them:
    /// one that falls its buffer behind gets [`RecvError::Lagged`](broadcast::error::RecvError)
    /// and is closed as slow. Events come by weak reference: the feed holds what it keeps
    /// (by count, and on Kafka by bytes), and an event it has let go is a lag too.
    Shared(broadcast::Receiver<Weak<StoredEvent>>),
    /// A reader of the subscriber's own (a resume, or `earliest`), which reads the topic at the
    /// subscriber's pace: it never lags. Once it has caught up with the topic's shared feed it
    /// hands the subscriber over: the shared feed's events it has not read, then `Shared`.
    Own(super::feed::OwnFeed),
    /// Handed over from `Own`: these events (the shared feed's held ones the reader had not
    /// read), then the shared feed's live ones.
    Joining(
        std::vec::IntoIter<Weak<StoredEvent>>,
        broadcast::Receiver<Weak<StoredEvent>>,
    ),
}

impl Live {
    /// The next event; `Closed` once the feed has stopped.
    /// Cancel safe: a handover is taken in as it is received.
    pub async fn recv(&mut self) -> Result<Arc<StoredEvent>, broadcast::error::RecvError> {
        loop {
            match self {
                Live::Shared(shared) => {
                    return shared
                        .recv()
                        .await?
                        .upgrade()
                        .ok_or(broadcast::error::RecvError::Lagged(1));
                }
                Live::Own(own) => match own.recv().await {
                    Some(OwnItem::Event(event, _share)) => return Ok(event),
                    Some(OwnItem::Join(source)) => {
                        let Live::Shared(shared) = source.live else {
                            return Err(broadcast::error::RecvError::Closed);
                        };
                        *self = Live::Joining(source.backlog.into_iter(), shared);
                    }
                    None => return Err(broadcast::error::RecvError::Closed),
                },
                Live::Joining(backlog, shared) => {
                    // An event the feed let go before it was read: behind, as on the feed.
                    let event = match backlog.next() {
                        Some(held) => held,
                        None => shared.recv().await?,
                    };
                    return event
                        .upgrade()
                        .ok_or(broadcast::error::RecvError::Lagged(1));
                }
            }
        }
    }
}

/// Why a subscription could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("broker {broker} cannot serve topic {topic}: {reason}")]
    Unavailable {
        broker: Arc<str>,
        topic: Arc<str>,
        reason: String,
    },
    #[error("broker {broker} is serving as many resumed subscribers as it may; try again")]
    Busy { broker: Arc<str> },
    /// A `Last-Event-ID` the topic cannot have given: a partition it does not have, or an
    /// offset past its end (a made-up id, or one from before the topic was recreated).
    #[error("Last-Event-ID is not a position of topic {topic}: {reason}")]
    Position { topic: Arc<str>, reason: String },
}

impl Position {
    /// Checks a resume position against the topic's partitions and where each ends (`ends`:
    /// partition, next offset): every partition it names must be the topic's, and no offset
    /// past its end. An offset before a partition's oldest event is fine: the events since
    /// are what is left.
    pub(super) fn check_within(&self, ends: &BTreeMap<i32, i64>) -> Result<(), String> {
        for (partition, offset) in &self.0 {
            match ends.get(partition) {
                None => return Err(format!("the topic has no partition {partition}")),
                Some(end) if offset > end => {
                    return Err(format!(
                        "partition {partition} ends at offset {end}, not {offset}"
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// A compiled subscribe action.
#[derive(Debug)]
pub struct SubscribeRoute {
    pub broker: Arc<Broker>,
    pub topic: Arc<str>,
    default_start: Start,
    pub(super) heartbeat: Duration,
    /// WebSocket subscribers may publish to the topic.
    pub websocket_publish: bool,
    /// What the messages they publish must satisfy (`websocket_json_schema`).
    pub(super) websocket_schema: Option<Arc<jsonschema::Validator>>,
    /// Filters every subscriber gets, bound to its identity.
    identity_filters: Vec<IdentityFilter>,
    /// The route's id: message budgets are scoped to it.
    route_id: Arc<str>,
    /// `message_rate_limits`; empty: none.
    message_rates: Arc<[Rate]>,
}

/// What a subscription needs from the request and the node.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeContext<'a> {
    pub identity: Option<&'a Identity>,
    pub metrics: &'a Arc<Metrics>,
    pub guard: &'a Arc<AccessGuard>,
    /// Cancelled when the node stops: the stream then ends with its position.
    pub stopping: &'a CancellationToken,
}

/// A filter whose value is the caller's: see [`pb::IdentityFilter`].
#[derive(Debug)]
struct IdentityFilter {
    event: EventValue,
    identity: IdentityValue,
}

#[derive(Debug)]
enum EventValue {
    JsonPointer(String),
    RecordHeader(String),
    Key,
}

#[derive(Debug)]
enum IdentityValue {
    ConsumerId,
    CustomId,
    ConsumerName,
    ClaimHeader(http::HeaderName),
}

impl IdentityFilter {
    fn compile(filter: &pb::IdentityFilter) -> Result<Self, String> {
        use pb::identity_filter::{Attribute, EventValue as E, Identity as I};
        let event = match &filter.event_value {
            Some(E::JsonPointer(pointer)) => EventValue::JsonPointer(pointer.clone()),
            Some(E::RecordHeader(name)) => EventValue::RecordHeader(name.to_ascii_lowercase()),
            Some(E::Key(true)) => EventValue::Key,
            _ => return Err("an identity filter needs json_pointer, record_header or key".into()),
        };
        let identity = match &filter.identity {
            Some(I::Consumer(attribute)) => match Attribute::try_from(*attribute) {
                Ok(Attribute::ConsumerId) => IdentityValue::ConsumerId,
                Ok(Attribute::CustomId) => IdentityValue::CustomId,
                Ok(Attribute::ConsumerName) => IdentityValue::ConsumerName,
                _ => return Err("unknown consumer attribute".into()),
            },
            Some(I::ClaimHeader(name)) => IdentityValue::ClaimHeader(
                http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?,
            ),
            None => return Err("an identity filter needs consumer or claim_header".into()),
        };
        Ok(IdentityFilter { event, identity })
    }

    /// The filter for this caller, or why the caller cannot subscribe.
    fn bind(&self, identity: Option<&Identity>) -> Result<Filter, String> {
        let identity = identity.ok_or("this stream is filtered by identity; authenticate")?;
        let value = match &self.identity {
            IdentityValue::ConsumerId => identity.consumer_id.to_string(),
            IdentityValue::CustomId if !identity.custom_id.is_empty() => {
                identity.custom_id.to_string()
            }
            IdentityValue::CustomId => return Err("the consumer has no custom_id".into()),
            IdentityValue::ConsumerName => identity.consumer_name.to_string(),
            IdentityValue::ClaimHeader(name) => identity
                .claim_header(name)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| format!("the caller's token has no claim for {name}"))?
                .to_owned(),
        };
        Ok(match &self.event {
            EventValue::JsonPointer(pointer) => Filter::Json(pointer.clone(), value),
            EventValue::RecordHeader(name) => Filter::Header(name.clone(), value),
            EventValue::Key => Filter::Key(value),
        })
    }
}

impl SubscribeRoute {
    pub fn compile(
        route_id: &str,
        action: &pb::SubscribeAction,
        broker: &dyn Fn(&str) -> Option<Arc<Broker>>,
    ) -> Result<Self, String> {
        let broker = broker(&action.broker_id)
            .ok_or_else(|| format!("no broker has the id {}", action.broker_id))?;
        let default_start = match pb::subscribe_action::Start::try_from(action.default_start) {
            Ok(pb::subscribe_action::Start::Earliest) => Start::Earliest,
            _ => Start::Latest,
        };
        Ok(SubscribeRoute {
            broker,
            topic: action.topic.as_str().into(),
            default_start,
            heartbeat: match action.heartbeat_ms {
                0 => DEFAULT_HEARTBEAT,
                ms => Duration::from_millis(ms),
            },
            websocket_publish: action.websocket_publish,
            websocket_schema: super::publish::compile_schema(
                "websocket_json_schema",
                &action.websocket_json_schema,
            )?
            .map(Arc::new),
            identity_filters: action
                .identity_filters
                .iter()
                .map(IdentityFilter::compile)
                .collect::<Result<_, _>>()?,
            route_id: route_id.into(),
            message_rates: action
                .message_rate_limits
                .iter()
                .map(Rate::from_pb)
                .collect::<Result<Vec<_>, _>>()?
                .into(),
        })
    }

    /// The subscriber's message budgets, when the route has limits: its subscription's, or
    /// its connection's when anonymous.
    pub fn pacer(&self, context: SubscribeContext<'_>) -> Option<Pacer> {
        if self.message_rates.is_empty() {
            return None;
        }
        let subject = context.identity.map_or_else(rand::random, |identity| {
            *identity.subscription_id.as_bytes()
        });
        Some(Pacer::new(
            context.guard.clone(),
            self.message_rates.clone(),
            &self.route_id,
            subject,
        ))
    }

    /// Opens the stream. The response's headers go out at once; events follow as they come,
    /// made by the response body as the connection asks for them ([`Subscriber`]).
    pub async fn serve<B>(
        &self,
        request: &Request<B>,
        context: SubscribeContext<'_>,
        identity_filters: Vec<Filter>,
        access: Option<Box<StreamAccess>>,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        let metrics = context.metrics;
        let stopping = context.stopping.clone();
        let (start, filters) = self.options(request, identity_filters)?;
        let pacer = self.pacer(context);
        let source = self
            .broker
            .subscribe(&self.topic, start)
            .await
            .map_err(GatewayError::Subscribe)?;
        let mut subscriber = Subscriber::new(
            source,
            filters,
            pacer,
            self.heartbeat,
            SubscriberCounts::new(metrics, &self.topic),
            stopping,
        );
        subscriber.access = access;
        let mut response = Response::new(subscriber.into_body());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // Tell buffering proxies in front (nginx) to pass events through as they come.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        *response.status_mut() = StatusCode::OK;
        Ok(response)
    }

    /// Whether the route's streams are filtered by the caller's identity; a route with no
    /// policies then still goes through access control, which refuses every caller.
    pub fn filters_by_identity(&self) -> bool {
        !self.identity_filters.is_empty()
    }

    /// The route's identity filters with the caller's values, or a 403 `identity_filter`
    /// naming the value the caller lacks: the last step of access control on a subscribe
    /// route, so that a refusal is counted as one. The filters go to [`Self::serve`] or
    /// [`Self::serve_websocket`].
    pub fn bind_identity(&self, identity: Option<&Identity>) -> Result<Vec<Filter>, Box<Denial>> {
        self.identity_filters
            .iter()
            .map(|filter| filter.bind(identity))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|detail| {
                Box::new(Denial {
                    status: StatusCode::FORBIDDEN,
                    reason: "identity_filter",
                    detail,
                    challenge: None,
                    rate: None,
                    retry_after: None,
                })
            })
    }

    /// Where the stream starts (`Last-Event-ID`, else `?start=`, else the route's default)
    /// and the client's filters (`?key=`, `?header.NAME=`, `?json/POINTER=`).
    /// The caller's identity filters (bound by [`Self::bind_identity`]) come first, and are
    /// not counted in [`MAX_FILTERS`].
    pub(super) fn options<B>(
        &self,
        request: &Request<B>,
        identity_filters: Vec<Filter>,
    ) -> Result<(Start, Vec<Filter>), GatewayError> {
        let invalid = |detail: String| GatewayError::InvalidEvent(detail);
        let mut start = None;
        let mut filters = Vec::new();
        // Browsers cannot set headers on a WebSocket: the position may come in the query.
        let mut last_event_id = request
            .headers()
            .get("last-event-id")
            .map(|v| {
                v.to_str()
                    .map(str::to_owned)
                    .map_err(|_| invalid("Last-Event-ID is not ASCII".into()))
            })
            .transpose()?;
        let query = request.uri().query().unwrap_or_default();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if name == "start" {
                start = Some(match &*value {
                    "earliest" => Start::Earliest,
                    "latest" => Start::Latest,
                    other => match humantime::parse_rfc3339_weak(other) {
                        Ok(time) => Start::Time(
                            time.duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                        ),
                        Err(_) => {
                            return Err(invalid(format!(
                                "start={other:?}: use earliest, latest or an RFC 3339 time \
                                 (2026-11-27T09:00:00Z); Last-Event-ID resumes"
                            )));
                        }
                    },
                });
            } else if name == "last_event_id" {
                last_event_id.get_or_insert_with(|| value.into_owned());
            } else if let Some(filter) = Filter::from_query(&name, &value).map_err(invalid)? {
                filters.push(filter);
            }
        }
        if filters.len() > MAX_FILTERS {
            return Err(invalid(format!("at most {MAX_FILTERS} filters")));
        }
        filters.splice(0..0, identity_filters);
        if let Some(text) = last_event_id.as_deref().filter(|t| !t.is_empty()) {
            let position = Position::parse(text).map_err(|reason| {
                invalid(format!(
                    "Last-Event-ID {text:?} is not a position this gateway gave: {reason}"
                ))
            })?;
            return Ok((Start::After(position), filters));
        }
        Ok((start.unwrap_or_else(|| self.default_start.clone()), filters))
    }
}

/// Most filters one subscriber may set.
const MAX_FILTERS: usize = 16;

/// A subscriber's condition on the events it gets; all of a subscriber's filters must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `?key=V`: the record key is V.
    Key(String),
    /// `?header.NAME=V`: a record header NAME is V (`header.ce_type=order.paid`).
    Header(String, String),
    /// `?json/POINTER=V`: the value at the JSON pointer of the event's value is V (a string
    /// as it is, any other value compared as JSON: `?json/n=42`, `?json/ok=true`).
    Json(String, String),
}

impl Filter {
    /// The filter a query parameter sets; `None` for a parameter that is no filter (an API
    /// key in the query, a client's cache buster, `jsonp`), an error for one that means to be
    /// a filter but names nothing (`header.`, `json`): it would match nothing.
    fn from_query(name: &str, value: &str) -> Result<Option<Self>, String> {
        if name == "key" {
            Ok(Some(Filter::Key(value.to_owned())))
        } else if let Some(header) = name.strip_prefix("header.") {
            if header.is_empty() {
                return Err("?header.NAME=V names a record header: the name is empty".into());
            }
            Ok(Some(Filter::Header(
                header.to_ascii_lowercase(),
                value.to_owned(),
            )))
        } else if name == "json" {
            Err("?json=: a JSON filter is ?json/POINTER=V (?json/customer/id=42)".into())
        } else if let Some(pointer) = name.strip_prefix("json")
            && pointer.starts_with('/')
        {
            Ok(Some(Filter::Json(pointer.to_owned(), value.to_owned())))
        } else {
            Ok(None)
        }
    }

    fn matches(&self, record: &Record, json: &mut Option<Option<serde_json::Value>>) -> bool {
        match self {
            Filter::Key(key) => record.key.as_deref() == Some(key.as_bytes()),
            Filter::Header(name, value) => record
                .headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case(name) && v[..] == *value.as_bytes()),
            Filter::Json(pointer, value) => {
                // Parsed once per event, whatever the number of JSON filters.
                let parsed = json.get_or_insert_with(|| serde_json::from_slice(&record.value).ok());
                match parsed.as_ref().and_then(|v| v.pointer(pointer)) {
                    Some(serde_json::Value::String(text)) => text == value,
                    Some(other) => {
                        serde_json::from_str::<serde_json::Value>(value).is_ok_and(|v| v == *other)
                    }
                    None => false,
                }
            }
        }
    }
}

/// Whether `record` passes every filter.
pub(super) fn wanted(filters: &[Filter], record: &Record) -> bool {
    let mut json = None;
    filters
        .iter()
        .all(|filter| filter.matches(record, &mut json))
}

/// Takes `event` in for a subscriber at `position` (after the last event taken in, sent or
/// passed over): whether to send it (once the subscriber's message budget allows). The
/// position moves past every new event, sent or not (an event filtered out is passed over: a
/// resume does not read it again).
pub(super) fn take_in(position: &mut Position, filters: &[Filter], event: &StoredEvent) -> bool {
    if !position.is_new(event) {
        return false;
    }
    position.advance(event);
    wanted(filters, &event.record)
}

/// One SSE subscriber: its place in the topic, and the frames it is sent, made one at a time
/// as its connection takes them.
///
/// It has no task or queue of its own (a resumed Kafka subscriber's reader has, see
/// [`super::feed`]): it is the response body, polled by the connection's
/// task, so an event wakes one task per subscriber and is written as soon as it is made. A
/// client that stops reading stops being polled; on a shared feed it keeps its place in the
/// feed's buffer, and is closed with its position once it falls a buffer behind; on a reader of
/// its own the reader waits for it. Either way it is cut off by the listener's send timeout if
/// its connection's writes make no progress.
struct Subscriber {
    /// After the last event taken in (sent or passed over).
    position: Position,
    filters: Vec<Filter>,
    pacer: Option<Pacer>,
    backlog: std::vec::IntoIter<Weak<StoredEvent>>,
    live: Live,
    /// An event taken in and waiting for the message budget (heartbeats go out meanwhile).
    paced: Option<Arc<StoredEvent>>,
    beat: tokio::time::Interval,
    stage: Stage,
    counts: SubscriberCounts,
    /// Resolves when the node stops. Made once and kept: the token's waiter is registered
    /// once, not again for every event. On a token of the subscriber's own (a child of the
    /// node's).
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The same stop, looked at between backlog events.
    stopping_token: CancellationToken,
    /// The caller's access to the stream, when it has a caller in particular: the stream
    /// ends with it. Boxed: most streams of a busy topic may be anonymous.
    access: Option<Box<StreamAccess>>,
}

/// Where a [`Subscriber`]'s stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Nothing sent yet: a first frame goes at once, so the client (and any proxy) sees the
    /// stream open.
    Opening,
    Streaming,
    /// The last frame was sent (the client fell behind, the feed stopped, or the node is
    /// stopping).
    Ended,
}

/// A subscriber's series: live subscribers (counted while this is held), events delivered,
/// subscribers closed as slow.
pub(super) struct SubscriberCounts {
    subscribers: Gauge,
    delivered: Counter,
    pub(super) closed_slow: Counter,
}

impl SubscriberCounts {
    pub(super) fn new(metrics: &Metrics, topic: &str) -> Self {
        let subscribers = metrics.subscribers(topic);
        subscribers.inc();
        SubscriberCounts {
            subscribers,
            delivered: metrics.delivered(topic),
            closed_slow: metrics.closed_slow(topic),
        }
    }
}

impl Drop for SubscriberCounts {
    fn drop(&mut self) {
        self.subscribers.dec();
    }
}

impl Subscriber {
    fn new(
        source: Source,
        filters: Vec<Filter>,
        pacer: Option<Pacer>,
        heartbeat: Duration,
        counts: SubscriberCounts,
        stopping: CancellationToken,
    ) -> Self {
        // A token of its own, cancelled with the node's: polled with every frame, it locks
        // only this subscriber's waiter list, not one that all of the node's streams share.
        let stopping = stopping.child_token();
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        // After a stall (a client slow to read), one heartbeat, not one per interval missed.
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Subscriber {
            position: source.position,
            filters,
            pacer,
            backlog: source.backlog.into_iter(),
            live: source.live,
            paced: None,
            beat,
            stage: Stage::Opening,
            counts,
            stopping: Box::pin(stopping.clone().cancelled_owned()),
            stopping_token: stopping,
            access: None,
        }
    }

    /// The response body: the subscriber's frames until its stream ends.
    fn into_body(self) -> ProxyBody {
        let frames = stream::unfold(self, |mut subscriber| async move {
            let frame = subscriber.next_frame().await?;
            Some((Ok(Frame::data(frame)), subscriber))
        });
        StreamBody::new(frames).boxed()
    }

    /// The next frame: the opening comment, then the backlog's events, then live events and
    /// heartbeats; `None` once the stream has ended.
    async fn next_frame(&mut self) -> Option<Bytes> {
        match self.stage {
            Stage::Opening => {
                self.stage = Stage::Streaming;
                return Some(Bytes::from_static(b": ok\n\n"));
            }
            Stage::Ended => return None,
            Stage::Streaming => {}
        }
        if let Some(event) = self.paced.take() {
            return Some(self.send(event).await);
        }
        while let Some(event) = self.backlog.next() {
            // A backlog is read without waiting (bar the budget): the stop is looked at here.
            if self.stopping_token.is_cancelled() {
                return Some(self.closed_for_stop(None));
            }
            if let Some(ended) = self.access.as_mut().and_then(|access| access.has_ended()) {
                return Some(self.closed_for_access(ended, None));
            }
            let Some(event) = event.upgrade() else {
                return Some(self.closed_as_slow());
            };
            if take_in(&mut self.position, &self.filters, &event) {
                return Some(self.send(event).await);
            }
        }
        loop {
            tokio::select! {
                received = self.live.recv() => match received {
                    Ok(event) => {
                        if take_in(&mut self.position, &self.filters, &event) {
                            return Some(self.send(event).await);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Some(self.closed_as_slow());
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        self.stage = Stage::Ended;
                        return None;
                    }
                },
                _ = self.beat.tick() => return Some(Bytes::from_static(b": heartbeat\n\n")),
                () = self.stopping.as_mut() => return Some(self.closed_for_stop(None)),
                ended = access_ended(&mut self.access) => return Some(self.closed_for_access(ended, None)),
            }
        }
    }
}

impl Subscriber {
    /// The last frame of a subscriber that fell behind: where to resume.
    fn closed_as_slow(&mut self) -> Bytes {
        self.stage = Stage::Ended;
        self.counts.closed_slow.inc();
        closing_event(&self.position, SLOW)
    }

    /// The last frame of a stream on a node that is stopping: where to resume, on any node.
    /// `unsent`: an event taken in but not sent (waiting for its budget), which the client
    /// reads again on resuming.
    fn closed_for_stop(&mut self, unsent: Option<&StoredEvent>) -> Bytes {
        self.stage = Stage::Ended;
        closing_event(&resume_before(&self.position, unsent), STOPPING)
    }

    /// The last frame of a stream whose caller's access has ended: where to resume, once it
    /// is admitted again.
    fn closed_for_access(&mut self, ended: AccessEnded, unsent: Option<&StoredEvent>) -> Bytes {
        self.stage = Stage::Ended;
        closing_event(
            &resume_before(&self.position, unsent),
            access_closing(ended),
        )
    }

    /// `event`'s frame once the message budget allows it, or a heartbeat while it waits (the
    /// event is kept for the next frame): a stream paced slower than its heartbeat still
    /// shows proxies it is alive.
    async fn send(&mut self, event: Arc<StoredEvent>) -> Bytes {
        if let Some(pacer) = &self.pacer {
            tokio::select! {
                () = pacer.wait_to_send() => {}
                _ = self.beat.tick() => {
                    self.paced = Some(event);
                    return Bytes::from_static(b": heartbeat\n\n");
                }
                () = self.stopping.as_mut() => return self.closed_for_stop(Some(&event)),
                ended = access_ended(&mut self.access) => return self.closed_for_access(ended, Some(&event)),
            }
        }
        self.counts.delivered.inc();
        shared_frame(&event, &self.position)
    }
}

/// `event` as SSE for a subscriber at `position`: the frame the first subscriber at that
/// position made, or a new one. Every live subscriber of a feed is at the feed's position, so
/// an event is formatted once however many clients it goes to.
fn shared_frame(event: &StoredEvent, position: &Position) -> Bytes {
    if let Some((at, frame)) = event.sse_frame.get()
        && at == position
    {
        return frame.clone();
    }
    let frame = sse_event(event, position);
    let _ = event.sse_frame.set((position.clone(), frame.clone()));
    frame
}

/// One event as SSE: its position as `id`, its value as `data` (one line per line). A line
/// ends at CR LF, LF or a lone CR, as an SSE client reads it: a value split only at LF could
/// carry fields of its own (`\rid: …\revent: …`) into every subscriber's stream.
fn sse_event(event: &StoredEvent, position: &Position) -> Bytes {
    let mut out = String::with_capacity(event.record.value.len() + 64);
    let _ = writeln!(out, "id: {}", position.encode());
    let mut data = String::from_utf8_lossy(&event.record.value);
    if data.contains('\r') {
        data = data.replace("\r\n", "\n").replace('\r', "\n").into();
    }
    for line in data.split('\n') {
        let _ = writeln!(out, "data: {line}");
    }
    out.push('\n');
    Bytes::from(out)
}

/// Why the gateway closed a stream: the `reason`, `detail` and `cause` of its last event, and
/// over WebSocket the close frame's code and reason.
#[derive(Debug, Clone, Copy)]
pub(super) struct Closing {
    pub(super) reason: &'static str,
    pub(super) detail: &'static str,
    /// What access control would refuse the caller for now (`key_revoked`, ...), when that
    /// is why.
    pub(super) cause: Option<&'static str>,
    pub(super) close_code: u16,
    pub(super) close_reason: &'static str,
}

pub(super) const SLOW: Closing = Closing {
    reason: "slow_consumer",
    detail: "the client fell behind the stream; reconnect with Last-Event-ID to resume",
    cause: None,
    close_code: super::websocket::CLOSE_SLOW,
    close_reason: "slow consumer; resume with last_event_id",
};

const EXPIRED: Closing = Closing {
    reason: "access_expired",
    detail: "the caller's credential, token or subscription has expired; reconnect with a valid \
             one and Last-Event-ID to resume",
    cause: None,
    close_code: super::websocket::CLOSE_EXPIRED,
    close_reason: "access expired; resume with last_event_id",
};

const REVOKED: Closing = Closing {
    reason: "access_revoked",
    detail: "the caller is no longer admitted (its key or credential revoked or removed, its \
             consumer disabled, or its subscription suspended or removed; `cause` says which); \
             reconnect once admitted, with Last-Event-ID to resume",
    cause: None,
    close_code: super::websocket::CLOSE_REVOKED,
    close_reason: "access revoked; resume with last_event_id",
};

/// How a stream whose caller's access `ended` is closed.
pub(super) fn access_closing(ended: AccessEnded) -> Closing {
    match ended {
        AccessEnded::Expired => EXPIRED,
        AccessEnded::Revoked(cause) => Closing {
            cause: Some(cause),
            ..REVOKED
        },
    }
}

/// Resolves when the caller's access ends; never for a stream of nobody in particular.
pub(super) async fn access_ended(access: &mut Option<Box<StreamAccess>>) -> AccessEnded {
    match access {
        Some(access) => access.ended().await,
        None => std::future::pending().await,
    }
}

pub(super) const STOPPING: Closing = Closing {
    reason: "node_stopping",
    detail: "this node is shutting down; reconnect (to any node) with Last-Event-ID to resume",
    // Going away (RFC 6455 section 7.4.1).
    cause: None,
    close_code: 1001,
    close_reason: "node stopping; resume with last_event_id",
};

/// The position to resume from when `unsent`, the last event taken in, was not sent: just
/// before it, so the client reads it again.
pub(super) fn resume_before(position: &Position, unsent: Option<&StoredEvent>) -> Position {
    let mut resume = position.clone();
    if let Some(event) = unsent {
        resume.0.insert(event.partition, event.offset);
    }
    resume
}

/// The last event a client gets when the gateway closes its stream: why, and where to resume.
fn closing_event(position: &Position, closing: Closing) -> Bytes {
    let id = position.encode();
    let mut data = serde_json::json!({
        "reason": closing.reason,
        "detail": closing.detail,
        "last_event_id": id,
    });
    if let Some(cause) = closing.cause {
        data["cause"] = cause.into();
    }
    Bytes::from(format!("id: {id}\nevent: sluice-closed\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_cannot_add_fields_to_the_stream_with_any_line_end() {
        let event = StoredEvent::new(
            0,
            7,
            Record {
                topic: "t".into(),
                key: None,
                value: Bytes::from_static(b"a\r\nb\nc\rid: 0:999\revent: admin\r\rdata: forged"),
                headers: Vec::new(),
                timestamp_ms: 0,
            },
        );
        let frame = sse_event(&event, &Position([(0, 8)].into()));
        assert_eq!(
            std::str::from_utf8(&frame).unwrap(),
            "id: 0:8\ndata: a\ndata: b\ndata: c\ndata: id: 0:999\ndata: event: admin\n\
             data: \ndata: data: forged\n\n"
        );
    }

    #[test]
    fn filters_from_the_query_all_have_to_hold() {
        let event = StoredEvent::new(
            0,
            0,
            Record {
                topic: "t".into(),
                key: Some(Bytes::from_static(b"o-1")),
                value: Bytes::from_static(br#"{"customer":{"id":42},"kind":"paid"}"#),
                headers: vec![("ce_type".into(), Bytes::from_static(b"order.paid"))],
                timestamp_ms: 0,
            },
        );
        let filter = |name, value| Filter::from_query(name, value).unwrap().unwrap();
        assert!(wanted(&[], &event.record));
        assert!(wanted(&[filter("key", "o-1")], &event.record));
        assert!(!wanted(&[filter("key", "o-2")], &event.record));
        assert!(wanted(
            &[filter("header.CE_TYPE", "order.paid")],
            &event.record
        ));
        assert!(wanted(
            &[
                filter("json/customer/id", "42"),
                filter("json/kind", "paid")
            ],
            &event.record
        ));
        assert!(!wanted(
            &[filter("json/kind", "paid"), filter("key", "o-2")],
            &event.record
        ));
        assert!(!wanted(&[filter("json/missing", "x")], &event.record));
        assert_eq!(Filter::from_query("start", "latest"), Ok(None));
        assert_eq!(Filter::from_query("jsonp", "1"), Ok(None));
        for named_nothing in ["json", "header."] {
            assert!(
                Filter::from_query(named_nothing, "1").is_err(),
                "{named_nothing}"
            );
        }
    }

    #[test]
    fn an_event_is_formatted_once_for_every_subscriber_at_the_same_position() {
        let event = StoredEvent::new(0, 4, record("v"));
        let here = Position::parse("0:5").unwrap();
        let first = shared_frame(&event, &here);
        let second = shared_frame(&event, &here);
        assert_eq!(first.as_ptr(), second.as_ptr(), "the same frame, shared");
        let elsewhere = Position::parse("0:5,1:2").unwrap();
        assert_eq!(
            shared_frame(&event, &elsewhere),
            Bytes::from_static(b"id: 0:5,1:2\ndata: v\n\n"),
            "a subscriber elsewhere gets its own id"
        );
    }

    #[test]
    fn positions_round_trip_and_bad_ones_are_named() {
        let position = Position::parse("0:17,1:4").unwrap();
        assert_eq!(position.0, BTreeMap::from([(0, 17), (1, 4)]));
        assert_eq!(position.encode(), "0:17,1:4");
        for (bad, says) in [
            ("", "names no partition"),
            ("0", "not partition:offset"),
            ("x:1", "not a partition number"),
            ("0:-1", "not an offset"),
            ("0:1,0:2", "appears twice"),
        ] {
            let error = Position::parse(bad).unwrap_err();
            assert!(error.contains(says), "{bad:?}: {error}");
        }
    }

    fn record(value: &'static str) -> Record {
        Record {
            topic: "t".into(),
            key: None,
            value: Bytes::from_static(value.as_bytes()),
            headers: Vec::new(),
            timestamp_ms: 0,
        }
    }

    // Real time: the limiter reads the clock itself.
    #[tokio::test]
    async fn a_paced_stream_sends_heartbeats_while_an_event_waits_for_its_budget() {
        use super::super::memory::MemoryBroker;
        use crate::auth::AccessGuard;
        use crate::ratelimit::Rate;
        let broker = MemoryBroker::new(&pb::MemoryBroker::default());
        let topic: Arc<str> = "t".into();
        broker.publish(record("a"));
        broker.publish(record("b"));
        let opened = broker.subscribe(&topic, Some(0));
        let source = memory_source(opened, Some(0));
        // One event a minute; a heartbeat every 50 ms.
        let rates: Arc<[Rate]> = Arc::new([Rate::new(1, Duration::from_secs(60), 0).unwrap()]);
        let pacer = Pacer::new(
            Arc::new(AccessGuard::new(None, 1000, 0)),
            rates,
            "route",
            [7; 16],
        );
        let mut subscriber = Subscriber::new(
            source,
            Vec::new(),
            Some(pacer),
            Duration::from_millis(50),
            test_counts(),
            CancellationToken::new(),
        );
        let mut frames = Vec::new();
        for _ in 0..4 {
            let frame = tokio::time::timeout(Duration::from_secs(2), subscriber.next_frame())
                .await
                .expect("a frame within the heartbeat")
                .unwrap();
            frames.push(String::from_utf8(frame.to_vec()).unwrap());
        }
        assert_eq!(
            frames,
            [
                ": ok\n\n",
                "id: 0:1\ndata: a\n\n",
                ": heartbeat\n\n",
                ": heartbeat\n\n"
            ]
        );
    }

    #[tokio::test]
    async fn a_backlog_let_go_before_it_was_read_closes_the_subscriber_as_slow() {
        use super::super::memory::MemoryBroker;
        let broker = MemoryBroker::new(&pb::MemoryBroker { retained_events: 3 });
        let topic: Arc<str> = "t".into();
        for _ in 0..3 {
            broker.publish(record("old"));
        }
        let opened = broker.subscribe(&topic, Some(0));
        let source = memory_source(opened, Some(0));
        // The log lets the backlog go before the subscriber reads any of it.
        for _ in 0..3 {
            broker.publish(record("new"));
        }
        let counts = test_counts();
        let closed_slow = counts.closed_slow.clone();
        let mut subscriber = unfiltered(source, counts);
        assert_closed_at_start(&mut subscriber).await;
        assert_eq!(closed_slow.get(), 1);
    }

    #[tokio::test]
    async fn a_memory_subscriber_is_closed_while_what_it_missed_is_still_retained() {
        use super::super::memory::MemoryBroker;
        // The default: 1000 events retained.
        let broker = MemoryBroker::new(&pb::MemoryBroker::default());
        let topic: Arc<str> = "t".into();
        let opened = broker.subscribe(&topic, None);
        let source = memory_source(opened, None);
        // Fewer than the topic retains, more than a subscriber may fall behind.
        for _ in 0..600 {
            broker.publish(record("x"));
        }
        let mut subscriber = unfiltered(source, test_counts());
        assert_closed_at_start(&mut subscriber).await;
        let resumed = broker.subscribe(&topic, Some(0));
        assert_eq!(
            resumed.backlog.first().map(|e| e.offset),
            Some(0),
            "resuming at the close's position starts where the client stopped"
        );
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_closed_with_its_position() {
        use super::super::memory::MemoryBroker;
        let broker = MemoryBroker::new(&pb::MemoryBroker::default());
        let topic: Arc<str> = "t".into();
        broker.publish(record("before"));
        let opened = broker.subscribe(&topic, None);
        let source = memory_source(opened, None);
        // More than the feed holds, before the subscriber reads anything.
        for _ in 0..super::super::memory::FEED_CAPACITY + 10 {
            broker.publish(record("x"));
        }
        let counts = test_counts();
        let (delivered, closed_slow) = (counts.delivered.clone(), counts.closed_slow.clone());
        let mut subscriber = unfiltered(source, counts);
        assert_eq!(
            subscriber.next_frame().await.unwrap(),
            Bytes::from_static(b": ok\n\n")
        );
        let last = subscriber.next_frame().await.unwrap();
        let last = std::str::from_utf8(&last).unwrap();
        assert!(
            last.starts_with("id: 0:1\nevent: sluice-closed\n"),
            "the position to resume from, after the one event before: {last}"
        );
        assert!(
            subscriber.next_frame().await.is_none(),
            "then the stream ends"
        );
        assert_eq!(delivered.get(), 0);
        assert_eq!(closed_slow.get(), 1);
    }

    /// A subscriber's source on a memory topic, from `from` (`None`: its next offset): the
    /// backlog by weak reference, as the broker hands it over, then the live feed.
    fn memory_source(opened: super::super::memory::Subscription, from: Option<i64>) -> Source {
        Source {
            position: Position([(0, from.unwrap_or(opened.next_offset))].into()),
            backlog: opened.backlog.iter().map(Arc::downgrade).collect(),
            live: Live::Shared(opened.live),
        }
    }

    /// The subscriber's frame after its opening comment closes it as slow at offset 0.
    async fn assert_closed_at_start(subscriber: &mut Subscriber) {
        subscriber.next_frame().await.unwrap();
        let last = subscriber.next_frame().await.unwrap();
        let last = std::str::from_utf8(&last).unwrap();
        assert!(
            last.starts_with("id: 0:0\nevent: sluice-closed\n"),
            "{last}"
        );
    }

    /// A subscriber to all of `source`, unpaced, with a heartbeat too slow to show.
    fn unfiltered(source: Source, counts: SubscriberCounts) -> Subscriber {
        Subscriber::new(
            source,
            Vec::new(),
            None,
            Duration::from_secs(60),
            counts,
            CancellationToken::new(),
        )
    }

    /// A subscriber's series, counting it as live.
    fn test_counts() -> SubscriberCounts {
        let counts = SubscriberCounts {
            subscribers: Gauge::default(),
            delivered: Counter::default(),
            closed_slow: Counter::default(),
        };
        counts.subscribers.inc();
        counts
    }

    #[tokio::test]
    async fn the_backlog_then_live_events_then_heartbeats() {
        use super::super::memory::MemoryBroker;
        let broker = MemoryBroker::new(&pb::MemoryBroker::default());
        let topic: Arc<str> = "t".into();
        broker.publish(record("a"));
        let opened = broker.subscribe(&topic, Some(0));
        let source = memory_source(opened, Some(0));
        let counts = test_counts();
        let (live, delivered) = (counts.subscribers.clone(), counts.delivered.clone());
        let mut body = Subscriber::new(
            source,
            Vec::new(),
            None,
            Duration::from_millis(50),
            counts,
            CancellationToken::new(),
        )
        .into_body();
        broker.publish(record("b"));
        let mut texts = Vec::new();
        for _ in 0..4 {
            let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
            texts.push(String::from_utf8(frame.to_vec()).unwrap());
        }
        assert_eq!(
            texts,
            [
                ": ok\n\n",
                "id: 0:1\ndata: a\n\n",
                "id: 0:2\ndata: b\n\n",
                ": heartbeat\n\n"
            ]
        );
        assert_eq!(delivered.get(), 2);
        assert_eq!(live.get(), 1);
        drop(body);
        assert_eq!(
            live.get(),
            0,
            "a subscriber whose client left is no longer counted"
        );
    }

    #[tokio::test]
    async fn a_stream_on_a_stopping_node_ends_with_where_to_resume() {
        use super::super::memory::MemoryBroker;
        let broker = MemoryBroker::new(&pb::MemoryBroker::default());
        let topic: Arc<str> = "t".into();
        broker.publish(record("a"));
        let source = memory_source(broker.subscribe(&topic, Some(0)), Some(0));
        let stopping = CancellationToken::new();
        let mut subscriber = Subscriber::new(
            source,
            Vec::new(),
            None,
            Duration::from_secs(60),
            test_counts(),
            stopping.clone(),
        );
        assert_eq!(subscriber.next_frame().await.unwrap(), ": ok\n\n");
        assert_eq!(
            subscriber.next_frame().await.unwrap(),
            "id: 0:1\ndata: a\n\n"
        );
        stopping.cancel();
        let last = subscriber.next_frame().await.unwrap();
        let last = std::str::from_utf8(&last).unwrap();
        assert!(
            last.starts_with("id: 0:1\nevent: sluice-closed\n") && last.contains("node_stopping"),
            "{last}"
        );
        assert!(
            subscriber.next_frame().await.is_none(),
            "then the stream ends"
        );
    }

    #[test]
    fn resuming_before_an_unsent_event_reads_it_again() {
        let position = Position([(0, 5), (1, 3)].into());
        let event = StoredEvent::new(
            1,
            2,
            Record {
                topic: "t".into(),
                key: None,
                value: Bytes::new(),
                headers: Vec::new(),
                timestamp_ms: 0,
            },
        );
        assert_eq!(resume_before(&position, None), position);
        assert_eq!(resume_before(&position, Some(&event)).encode(), "0:5,1:2");
    }

    #[test]
    fn a_position_skips_what_was_seen_and_moves_past_each_event() {
        let event = |partition, offset| {
            StoredEvent::new(
                partition,
                offset,
                Record {
                    topic: "t".into(),
                    key: None,
                    value: Bytes::from_static(b"a\nb"),
                    headers: Vec::new(),
                    timestamp_ms: 0,
                },
            )
        };
        let mut position = Position::parse("0:5").unwrap();
        assert!(!position.is_new(&event(0, 4)));
        assert!(position.is_new(&event(0, 5)));
        assert!(position.is_new(&event(1, 0)), "a partition not yet seen");
        position.advance(&event(1, 0));
        assert_eq!(position.encode(), "0:5,1:1");
        assert_eq!(
            sse_event(&event(1, 1), &position),
            Bytes::from_static(b"id: 0:5,1:1\ndata: a\ndata: b\n\n")
        );
    }
}
