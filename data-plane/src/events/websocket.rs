//! Subscribe routes over WebSocket: the same stream as SSE ([`super::subscribe`]), one text
//! message per event, and, where the route allows it (`websocket_publish`), messages from the
//! client published to the topic, each acknowledged by a message back.
//!
//! Server → client, per event: `{"id":"0:17,1:4","key":"o-1","data":…}`, where `id` is the
//! position after the event (reconnect with `?last_event_id=` or a `Last-Event-ID` header),
//! and `data` the event's value (JSON as it is, anything else as a string). Heartbeats are
//! WebSocket pings. A client that falls behind gets `{"event":"sluice-closed",…}` with its
//! position, then a close frame with code 4001; on a node that is stopping, the same message
//! (reason `node_stopping`) and a close frame with code 1001 (going away).
//!
//! Client → server (publish): each text or binary message is one event. The answer is
//! `{"ack":N,"id":…,"topic":…,"partition":…,"offset":…,"timestamp":…}` once the broker has it,
//! or `{"nack":N,"error":…}`, where N counts the client's messages from 1. Up to
//! [`MAX_PUBLISHING`] messages are published at once; answers come back in the messages' order.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::memory::StoredEvent;
use super::pacing::Pacer;
use super::subscribe::{
    Closing, Filter, Position, SLOW, STOPPING, Source, SubscribeRoute, SubscriberCounts,
    access_closing, access_ended, resume_before, take_in, wanted,
};
use super::{Acks, Broker, Delivery, Record, now_ms};
use crate::auth::standing::{Grant, StreamAccess};
use crate::auth::{AccessGuard, Denial};
use crate::config::ConfigStore;
use crate::router::Route;
use crate::server::error::{GatewayError, SchemaError};
use crate::telemetry::Metrics;
use crate::upstream::{ProxyBody, empty_body};

/// A client that takes longer than this to accept one message is closed as slow.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Close code for a subscriber that fell behind (private-use range 4000-4999).
pub const CLOSE_SLOW: u16 = 4001;
/// The close code of a session whose caller's access has ended (its credential, token or
/// subscription expired): resume with a valid one.
pub const CLOSE_EXPIRED: u16 = 4003;
/// The close code of a session whose caller a configuration applied no longer admits (its key
/// or credential revoked or removed, its consumer disabled, its subscription suspended or
/// removed): resume once admitted again.
pub const CLOSE_REVOKED: u16 = 4004;

/// A client's messages published at once, at most; the next are read as answers come back.
const MAX_PUBLISHING: usize = 64;

/// The bytes of a client's messages published at once, beyond which no more are read (one
/// message may be larger alone, up to the node's message limit).
const MAX_PUBLISHING_BYTES: usize = 1 << 20;

/// What a WebSocket subscription needs from the request and the node.
#[derive(Debug)]
pub struct WebSocketContext {
    /// The route's identity filters with the caller's values ([`SubscribeRoute::bind_identity`]).
    pub identity_filters: Vec<Filter>,
    /// The subscriber's message budgets ([`SubscribeRoute::pacer`]).
    pub pacer: Option<Pacer>,
    /// Record headers naming the caller and the request (for events the client publishes).
    pub headers: Vec<(String, Bytes)>,
    /// Largest message a client may send.
    pub max_message_bytes: usize,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the node stops: the session then ends with its position.
    pub stopping: CancellationToken,
    /// The caller's access, when the session has a caller in particular: the session ends
    /// with it, with its position.
    pub access: Option<Box<StreamAccess>>,
    /// Where the session runs once upgraded: the node's drain waits for it.
    pub tasks: TaskTracker,
    /// Each message published counted against the caller's request budgets, on a route
    /// with access control.
    pub charge: Option<MessageCharge>,
}

/// What counting a WebSocket client's messages against its caller's request budgets needs
/// ([`RouteAccess::charge_message`]).
#[derive(Debug)]
pub struct MessageCharge {
    pub route: Arc<Route>,
    pub store: Arc<ConfigStore>,
    pub guard: Arc<AccessGuard>,
    pub client: IpAddr,
    pub grant: Option<Grant>,
}

impl MessageCharge {
    async fn charge(&self) -> Result<(), Box<Denial>> {
        let Some(config) = self.store.current() else {
            return Ok(());
        };
        self.route
            .access
            .charge_message(
                self.client,
                self.grant.as_ref(),
                &config.holdings,
                &config.access,
                &self.guard,
            )
            .await
    }
}

/// Whether `request` asks to become a WebSocket.
pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

impl SubscribeRoute {
    /// Accepts the WebSocket handshake and streams the topic on the upgraded connection. The
    /// subscription is opened first, so a bad position or an unavailable broker is an HTTP
    /// error, not a closed socket.
    pub async fn serve_websocket(
        &self,
        mut request: Request<Incoming>,
        mut context: WebSocketContext,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        let accept = accept_key(&request)?;
        let identity_filters = std::mem::take(&mut context.identity_filters);
        let bound = identity_filters.len();
        let (start, filters) = self.options(&request, identity_filters)?;
        let source = self
            .broker
            .subscribe(&self.topic, start)
            .await
            .map_err(GatewayError::Subscribe)?;
        let on_upgrade = hyper::upgrade::on(&mut request);
        let session = Session {
            broker: self.broker.clone(),
            topic: self.topic.clone(),
            heartbeat: self.heartbeat,
            publish: self.websocket_publish,
            schema: self.websocket_schema.clone(),
            filters,
            bound,
            context,
        };
        let tasks = session.context.tasks.clone();
        tasks.spawn(async move {
            let mut session = session;
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(error) => {
                    tracing::debug!(%error, "websocket subscriber left before the upgrade");
                    return;
                }
            };
            // A route that takes no messages takes no large ones either: the 1008 for a message
            // comes only once it is whole, and the library holds a frame's announced length.
            let limit = if session.publish {
                session.context.max_message_bytes
            } else {
                READ_ONLY_MESSAGE_BYTES
            };
            let config = WebSocketConfig::default()
                .max_message_size(Some(limit))
                .max_frame_size(Some(limit));
            let socket = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            // Counted live until dropped, however the session ends.
            let counts = SubscriberCounts::new(&session.context.metrics, &session.topic);
            let access = session.context.access.take();
            session.run(socket, source, counts, access).await;
        });
        let mut response = Response::new(empty_body());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
        );
        Ok(response)
    }
}

/// The `Sec-WebSocket-Accept` for a valid version-13 handshake.
fn accept_key<B>(request: &Request<B>) -> Result<String, GatewayError> {
    let headers = request.headers();
    let invalid = |detail: &str| GatewayError::InvalidEvent(detail.to_owned());
    if request.method() != http::Method::GET {
        return Err(invalid("a WebSocket handshake is a GET"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(invalid("Sec-WebSocket-Version must be 13"));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| invalid("Sec-WebSocket-Key is required"))?;
    Ok(derive_accept_key(key.as_bytes()))
}

/// The largest message a client may send on a route without `websocket_publish` (which
/// closes the socket on any message): a control frame is at most 125 bytes.
const READ_ONLY_MESSAGE_BYTES: usize = 1024;

#[derive(Debug, PartialEq, Eq)]
enum Ending {
    Gone,
    Slow,
    FeedEnded,
    Stopping,
}

struct Session {
    broker: Arc<Broker>,
    topic: Arc<str>,
    heartbeat: Duration,
    publish: bool,
    /// What each message published must satisfy.
    schema: Option<Arc<jsonschema::Validator>>,
    /// The caller's identity filters first, then the client's own.
    filters: Vec<Filter>,
    /// How many of `filters` are the caller's identity filters.
    bound: usize,
    context: WebSocketContext,
}

impl Session {
    async fn run(
        &self,
        socket: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
        mut source: Source,
        counts: SubscriberCounts,
        mut access: Option<Box<StreamAccess>>,
    ) {
        let (mut sink, mut incoming) = socket.split();
        let mut position = source.position.clone();
        let pacer = self.context.pacer.as_ref();
        let delivered = self.context.metrics.delivered(&self.topic);
        // When the client must have answered the oldest ping not yet answered: two heartbeats
        // after it went out, plus every while the session spent sending rather than reading
        // (a pong waits unread behind a slow send; its client is not the one to blame).
        let mut pong_due: Option<tokio::time::Instant> = None;
        macro_rules! send {
            ($message:expr) => {
                let sending = tokio::time::Instant::now();
                match tokio::time::timeout(SEND_TIMEOUT, sink.send($message)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Ending::Gone,
                    Err(_) => return Ending::Slow,
                }
                if let Some(due) = &mut pong_due {
                    *due += sending.elapsed();
                }
            };
        }
        // The client's messages being published, answered in the order they came.
        let mut publishing = FuturesOrdered::new();
        // A token of its own (see the SSE subscriber's): polling it locks only this session's.
        let stopping = self.context.stopping.child_token().cancelled_owned();
        tokio::pin!(stopping);
        // Returns from this block end the session; its publishes are then finished.
        let ending = async {
            let mut backlog = std::mem::take(&mut source.backlog).into_iter();
            // The event taken in and next to send, once its message budget allows. Only one is
            // held: the feed's buffer keeps the rest (and closes a subscriber that falls a buffer
            // behind), so pacing bounds nothing here.
            let mut next: Option<Arc<StoredEvent>> = None;
            let mut publishing_bytes = 0;
            let mut beat =
                tokio::time::interval_at(tokio::time::Instant::now() + self.heartbeat, self.heartbeat);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sent_by_client = 0u64;
            // A client that answers no ping within two heartbeats (sends no whole frame: a
            // pong, a message) is gone, or is trickling a frame it never finishes: its
            // connection and the part of the frame held for it are let go (`pong_due`).
            loop {
                if next.is_none() {
                    for event in backlog.by_ref() {
                        let Some(event) = event.upgrade() else {
                            return close_with(&mut sink, &position, SLOW).await;
                        };
                        if take_in(&mut position, &self.filters, &event) {
                            next = Some(event);
                            break;
                        }
                    }
                }
                // Every branch but the sends is polled while an event waits for its budget or a
                // message for the broker: heartbeats go out, the client's pings and close are
                // answered, and its next messages are read (within MAX_PUBLISHING and
                // MAX_PUBLISHING_BYTES). Not biased: neither a busy topic nor a busy client starves
                // the other.
                let reading = publishing.len() < MAX_PUBLISHING && publishing_bytes < MAX_PUBLISHING_BYTES;
                tokio::select! {
                    Some((answer, bytes)) = publishing.next() => {
                        publishing_bytes -= bytes;
                        send!(Message::text(Value::to_string(&answer)));
                    }
                    message = incoming.next(), if reading => match message.inspect(|_| pong_due = None) {
                        None => return Ending::Gone,
                        // The library has queued its answer to the client's close: send it.
                        Some(Ok(Message::Close(_))) => {
                            let _ = tokio::time::timeout(Duration::from_secs(5), sink.close()).await;
                            return Ending::Gone;
                        }
                        Some(Err(error)) => {
                            if let Some(frame) = refusal(&error) {
                                let _ = tokio::time::timeout(Duration::from_secs(5), sink.send(frame)).await;
                            }
                            return Ending::Gone;
                        }
                        Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                            sent_by_client += 1;
                            if !self.publish {
                                let _ = sink.send(close(CloseCode::Policy, "this route does not take messages")).await;
                                return Ending::Gone;
                            }
                            // A caller whose access ended publishes nothing more, though the
                            // stream has not yet woken to its end.
                            if let Some(ended) = access.as_mut().and_then(|access| access.has_ended()) {
                                let resume = resume_before(&position, next.as_deref());
                                return close_with(&mut sink, &resume, access_closing(ended)).await;
                            }
                            let (text, value) = (message.is_text(), message.into_data());
                            let bytes = value.len();
                            publishing_bytes += bytes;
                            publishing.push_back(
                                self.publish(sent_by_client, value, text).map(move |answer| (answer, bytes)),
                            );
                        }
                        // Pings are answered by the library; pongs need nothing.
                        Some(Ok(_)) => {}
                    },
                    _ = beat.tick() => {
                        if !reading {
                            // Not listening while the broker has our reads' worth: no verdict.
                            pong_due = None;
                        } else if pong_due.is_some_and(|due| tokio::time::Instant::now() >= due) {
                            let frame = close(CloseCode::Policy, "no answer to a ping");
                            let _ = tokio::time::timeout(Duration::from_secs(5), sink.send(frame)).await;
                            return Ending::Gone;
                        }
                        send!(Message::Ping(Bytes::new()));
                        pong_due.get_or_insert(tokio::time::Instant::now() + self.heartbeat * 2);
                    }
                    () = budget(pacer), if next.is_some() => {
                        let event = next.take().expect("the branch runs only with an event");
                        send!(event_message(&event, &position));
                        delivered.inc();
                    }
                    received = source.live.recv(), if next.is_none() && backlog.len() == 0 => match received {
                        Ok(event) => {
                            if take_in(&mut position, &self.filters, &event) {
                                next = Some(event);
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            return close_with(&mut sink, &position, SLOW).await;
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            let _ = sink.send(close(CloseCode::Away, "the stream ended")).await;
                            return Ending::FeedEnded;
                        }
                    },
                    // The client's messages already read are still published (the session's
                    // end finishes them; their answers cannot follow the close); the event
                    // waiting for its budget is read again on resuming.
                    () = &mut stopping => {
                        let resume = resume_before(&position, next.as_deref());
                        return close_with(&mut sink, &resume, STOPPING).await;
                    }
                    ended = access_ended(&mut access) => {
                        let resume = resume_before(&position, next.as_deref());
                        return close_with(&mut sink, &resume, access_closing(ended)).await;
                    }
                }
            }
        }
        .await;
        if ending == Ending::Slow {
            counts.closed_slow.inc();
        }
        // The session is over for the client and the topic: its connection closes and it
        // stops counting as a subscriber now, not once its last messages are published.
        drop((sink, incoming, source, counts));
        finish_publishing(publishing).await;
    }

    /// Publishes one client message, durably; the acknowledgement (or refusal) to send back.
    async fn publish(&self, number: u64, value: Bytes, text: bool) -> Value {
        if let Some(Err(retry_after)) = self.context.pacer.as_ref().map(Pacer::take_publish) {
            self.context
                .metrics
                .event_published(&self.topic, "rate_limited", 0.0);
            return json!({
                "nack": number,
                "error": "rate limited: the route's message_rate_limits",
                "retry_after_ms": u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX),
            });
        }
        if let Some(charge) = &self.context.charge
            && let Err(denial) = charge.charge().await
        {
            let outcome = match denial.status {
                StatusCode::TOO_MANY_REQUESTS => "rate_limited",
                StatusCode::SERVICE_UNAVAILABLE => "unavailable",
                _ => "rejected",
            };
            self.context
                .metrics
                .event_published(&self.topic, outcome, 0.0);
            let mut nack = json!({
                "nack": number,
                "error": format!("{}: {}", denial.reason, denial.detail),
            });
            if let Some(wait) = denial
                .retry_after
                .or(denial.rate.and_then(|rate| rate.retry_after))
            {
                nack["retry_after_ms"] = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).into();
            }
            return nack;
        }
        if let Some(schema) = &self.schema {
            let errors = match serde_json::from_slice::<Value>(&value) {
                Ok(json) => super::publish::violations(schema, &json),
                Err(e) => vec![SchemaError {
                    pointer: String::new(),
                    detail: format!("the message is not JSON: {e}"),
                }],
            };
            if !errors.is_empty() {
                self.context
                    .metrics
                    .event_published(&self.topic, "rejected", 0.0);
                return json!({
                    "nack": number,
                    "error": "the message does not satisfy the route's websocket_json_schema",
                    "errors": errors,
                });
            }
        }
        let started = Instant::now();
        let id = uuid::Builder::from_random_bytes(rand::random())
            .into_uuid()
            .to_string();
        let mut headers = self.context.headers.clone();
        headers.push(("sluice-event-id".into(), Bytes::from(id.clone())));
        let content_type = if text {
            "text/plain; charset=utf-8"
        } else {
            "application/octet-stream"
        };
        headers.push((
            "content-type".into(),
            Bytes::from_static(content_type.as_bytes()),
        ));
        let record = Record {
            topic: self.topic.clone(),
            key: None,
            value,
            headers,
            timestamp_ms: now_ms(),
        };
        // On a stream filtered by identity, a client publishes only what it could read
        // itself: another tenant's stream is not written to through this one.
        if !wanted(&self.filters[..self.bound], &record) {
            self.context
                .metrics
                .event_published(&self.topic, "rejected", 0.0);
            return json!({
                "nack": number,
                "error": "the event does not match this stream's identity filters: a client \
                          publishes only events it could receive",
            });
        }
        let result = self
            .broker
            .publish(record, Delivery::Durable, Acks::Broker)
            .await;
        let outcome = match &result {
            Ok(_) => "acknowledged",
            Err(error) => error.outcome(),
        };
        self.context
            .metrics
            .event_published(&self.topic, outcome, started.elapsed().as_secs_f64());
        match result {
            Ok(Some(at)) => json!({
                "ack": number,
                "id": id,
                "topic": &*self.topic,
                "partition": at.partition,
                "offset": at.offset,
                "timestamp": super::publish::rfc3339_ms(at.timestamp_ms),
            }),
            Ok(None) => json!({"ack": number, "id": id, "topic": &*self.topic}),
            Err(error) => json!({"nack": number, "error": error.to_string()}),
        }
    }
}

/// Waits for the client's messages still being published when its session ends (each within
/// the broker's publish limit), so that each is counted. They cannot be answered: a
/// WebSocket sends nothing after a close.
async fn finish_publishing<F: Future>(publishing: FuturesOrdered<F>) {
    publishing.for_each(|_| async {}).await;
}

/// Waits until `pacer` allows one more event to be sent (at once without one).
async fn budget(pacer: Option<&Pacer>) {
    if let Some(pacer) = pacer {
        pacer.wait_to_send().await;
    }
}

/// Tells a subscriber the gateway closes where to resume, and closes its socket: with
/// [`CLOSE_SLOW`] when it fell behind, with 1001 (going away) when the node is stopping.
async fn close_with<S>(sink: &mut S, position: &Position, closing: Closing) -> Ending
where
    S: futures_util::Sink<Message> + Unpin,
{
    let mut last = json!({
        "event": "sluice-closed",
        "reason": closing.reason,
        "detail": closing.detail,
        "last_event_id": position.encode(),
    });
    if let Some(cause) = closing.cause {
        last["cause"] = cause.into();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        sink.send(Message::text(last.to_string())).await?;
        sink.send(close(
            CloseCode::from(closing.close_code),
            closing.close_reason,
        ))
        .await
    })
    .await;
    if closing.close_code == CLOSE_SLOW {
        Ending::Slow
    } else {
        Ending::Stopping
    }
}

/// The close frame that tells a client why its message was refused, when it can still be
/// told (RFC 6455 7.4.1): too large (1009), text that is not UTF-8 (1007), a protocol error
/// (1002). `None` when the connection itself failed.
fn refusal(error: &tokio_tungstenite::tungstenite::Error) -> Option<Message> {
    use tokio_tungstenite::tungstenite::Error;
    match error {
        Error::Capacity(_) => Some(close(
            CloseCode::Size,
            "message larger than the route takes",
        )),
        Error::Utf8(_) => Some(close(CloseCode::Invalid, "text message is not UTF-8")),
        Error::Protocol(_) => Some(close(CloseCode::Protocol, "WebSocket protocol error")),
        _ => None,
    }
}

fn close(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// One event for the client: its position after it, its key and its value.
fn event_message(event: &StoredEvent, position: &Position) -> Message {
    let record = &event.record;
    let data = serde_json::from_slice::<Value>(&record.value)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&record.value).into_owned()));
    let key = record
        .key
        .as_ref()
        .map(|key| String::from_utf8_lossy(key).into_owned());
    Message::text(json!({"id": position.encode(), "key": key, "data": data}).to_string())
}
