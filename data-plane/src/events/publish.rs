//! The `publish` route action: the request becomes one event on a topic.
//!
//! In order: read the body (bounded in size and time), read the event in the route's
//! CloudEvents mode, check the route's JSON Schema (a violation is a 422 listing each error
//! with its JSON pointer, and nothing reaches the topic), pick the record key, add the
//! caller's identity, the request id and `traceparent` as record headers, and publish.
//! A durable route answers 202 only with the broker's acknowledgement in hand: the body says
//! where the event is (topic, partition, offset). A fire-and-forget route answers 202 once
//! the event is queued, and says so.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use serde_json::Value;
use sluice_proto::pb;
use tokio_util::task::TaskTracker;

use super::cloudevents::{self, EventError, Mode};
use super::idempotency::{Claim, Idempotency, IdempotencyError, KeyOwner, StoredAnswer, claim_ttl};
use super::{Acks, Broker, Delivered, Delivery, Record, caller_headers, now_ms};
use crate::auth::Identity;
use crate::server::error::{GatewayError, SchemaError};
use crate::telemetry::Metrics;
use crate::upstream::ProxyBody;

/// A client must send the whole event body within this time (408 beyond).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// At most this many schema violations are listed in a 422.
const MAX_SCHEMA_ERRORS: usize = 20;

/// A route's JSON Schema (`field`, as JSON text) compiled; `None` when it has none.
pub(super) fn compile_schema(
    field: &str,
    text: &str,
) -> Result<Option<jsonschema::Validator>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let schema: Value =
        serde_json::from_str(text).map_err(|e| format!("{field} is not JSON: {e}"))?;
    jsonschema::validator_for(&schema)
        .map(Some)
        .map_err(|e| format!("{field} is not a valid JSON Schema: {e}"))
}

/// How `value` breaks `schema` (the first [`MAX_SCHEMA_ERRORS`] ways), each at its JSON
/// pointer; empty when it satisfies it.
pub(super) fn violations(schema: &jsonschema::Validator, value: &Value) -> Vec<SchemaError> {
    schema
        .iter_errors(value)
        .take(MAX_SCHEMA_ERRORS)
        .map(|error| SchemaError {
            pointer: error.instance_path().to_string(),
            detail: error.to_string(),
        })
        .collect()
}

/// A compiled publish action.
#[derive(Debug)]
pub struct PublishRoute {
    pub broker: Arc<Broker>,
    /// The topic when no rule picks another.
    pub topic: Arc<str>,
    key: Option<KeySource>,
    topic_rules: Vec<TopicRule>,
    delivery: Delivery,
    acks: Acks,
    mode: Mode,
    schema: Option<jsonschema::Validator>,
}

/// Where a record's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeySource {
    PathParam(String),
    Header(http::HeaderName),
    JsonPointer(String),
    ConsumerId,
}

/// What one publish needs from the request around it and from the node.
#[derive(Debug)]
pub struct PublishContext<'a> {
    /// The route's id: idempotency keys are scoped to it.
    pub route_id: &'a str,
    pub params: &'a [(&'a str, String)],
    pub identity: Option<&'a Identity>,
    /// The client's address, whose idempotency keys an anonymous publish uses.
    pub client: std::net::IpAddr,
    pub request_id: &'a HeaderValue,
    pub max_body_bytes: u64,
    pub metrics: &'a Arc<Metrics>,
    pub idempotency: &'a Arc<Idempotency>,
    /// Where work that must outlive the request runs: the node's drain waits for it.
    pub tasks: &'a TaskTracker,
}

static IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");
static IDEMPOTENCY_REPLAYED: http::HeaderName =
    http::HeaderName::from_static("idempotency-replayed");

impl PublishRoute {
    pub fn compile(
        action: &pb::PublishAction,
        broker: &dyn Fn(&str) -> Option<Arc<Broker>>,
    ) -> Result<Self, String> {
        use pb::publish_action::{CloudEvents, Delivery as D};
        let broker = broker(&action.broker_id)
            .ok_or_else(|| format!("no broker has the id {}", action.broker_id))?;
        let key = key_source(action.key.as_ref())?;
        let topic_rules = action
            .topic_rules
            .iter()
            .map(topic_rule)
            .collect::<Result<_, _>>()?;
        let delivery = match D::try_from(action.delivery) {
            Ok(D::FireAndForget) => Delivery::FireAndForget,
            _ => Delivery::Durable,
        };
        let acks = Acks::from_proto(action.acks);
        if acks == Acks::None && delivery == Delivery::Durable {
            return Err("acks none needs delivery fire_and_forget".into());
        }
        let mode = match CloudEvents::try_from(action.cloud_events) {
            Ok(CloudEvents::Structured) => Mode::Structured,
            Ok(CloudEvents::Binary) => Mode::Binary,
            _ => Mode::None,
        };
        let schema = compile_schema("json_schema", &action.json_schema)?;
        Ok(PublishRoute {
            broker,
            topic: action.topic.as_str().into(),
            key,
            topic_rules,
            delivery,
            acks,
            mode,
            schema,
        })
    }

    /// Publishes `request` as one event and answers with the outcome.
    pub async fn serve<B>(
        &self,
        request: Request<B>,
        context: PublishContext<'_>,
    ) -> Result<Response<ProxyBody>, GatewayError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let mut counted = Counted {
            topic: self.topic.clone(),
            replayed: false,
            started: Instant::now(),
            by_publish: false,
        };
        let result = self.publish_once(request, &context, &mut counted).await;
        if counted.by_publish {
            return result;
        }
        let outcome = match &result {
            Ok(_) if counted.replayed => "replayed",
            Ok(_) => outcome(self.delivery, &Ok(())),
            Err(GatewayError::Publish(e)) => e.outcome(),
            // Redis could not say whether the key was used: nothing was published (503).
            Err(GatewayError::Idempotency(IdempotencyError::Unavailable(_))) => "unavailable",
            Err(_) => "rejected",
        };
        counted.record(context.metrics, outcome);
        result
    }

    /// Reads the body, then publishes, unless the request repeats an earlier one's
    /// `Idempotency-Key` (see [`super::idempotency`]).
    async fn publish_once<B>(
        &self,
        request: Request<B>,
        context: &PublishContext<'_>,
        counted: &mut Counted,
    ) -> Result<Response<ProxyBody>, GatewayError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let (parts, body) = request.into_parts();
        // The record's time is the request's arrival: a slow upload (up to the body's
        // timeout) does not make its event look later than events sent after it.
        let arrived_ms = now_ms();
        let body = read_body(body, context.max_body_bytes).await?;
        let Some(key) = parts.headers.get(&IDEMPOTENCY_KEY) else {
            let event = self.event(&parts, body, arrived_ms, context, counted)?;
            let delivered = self
                .broker
                .publish(event.record, self.delivery, self.acks)
                .await
                .map_err(GatewayError::Publish)?;
            let answer = answer(&event.id, &event.topic, delivered);
            return Ok(accepted(answer.to_string(), false));
        };
        let owner = context
            .identity
            .map_or(KeyOwner::Address(context.client), |i| {
                KeyOwner::Consumer(i.consumer_id)
            });
        let scope = Idempotency::scope(context.route_id, owner, key.as_bytes())
            .map_err(GatewayError::Idempotency)?;
        let fingerprint =
            Idempotency::fingerprint(parts.uri.path(), &self.event_headers(&parts.headers), &body);
        let earlier = Idempotency::earlier_fingerprint(parts.uri.path(), &body);
        let store = context.idempotency;
        match store
            .claim(
                &scope,
                &[&fingerprint, &earlier],
                claim_ttl(self.broker.publish_limit()),
            )
            .await
            .map_err(GatewayError::Idempotency)?
        {
            Claim::Replay(answer) => {
                counted.replayed = true;
                // The earlier request's topic, which a topic rule may have chosen (one of the
                // route's topics: a stored answer does not add series of its own).
                let body = serde_json::from_str::<Value>(&answer.body).ok();
                let stored = body.as_ref().and_then(|body| body["topic"].as_str());
                if let Some(topic) = self
                    .topic_rules
                    .iter()
                    .map(|rule| &rule.topic)
                    .find(|t| Some(&***t) == stored)
                {
                    counted.topic = topic.clone();
                }
                return Ok(accepted(answer.body, true));
            }
            Claim::Won => {}
        }
        let event = self.event(&parts, body, arrived_ms, context, counted);
        // The client may leave while the broker works, and its request's future is then
        // dropped. What follows the claim runs on a task of its own, so that the answer is
        // stored (or the claim released) and the publish counted whatever the client does: its
        // retry is answered from the first publish instead of waiting out the claim and
        // publishing a second copy.
        let settle = context.tasks.spawn({
            let (broker, store) = (self.broker.clone(), Arc::clone(store));
            let metrics = Arc::clone(context.metrics);
            let (delivery, acks) = (self.delivery, self.acks);
            let counted = Counted {
                topic: counted.topic.clone(),
                by_publish: true,
                ..*counted
            };
            async move {
                let event = match event {
                    Ok(event) => event,
                    Err(refused) => {
                        store.release(&scope).await;
                        counted.record(&metrics, "rejected");
                        return Err(refused);
                    }
                };
                let published = broker.publish(event.record, delivery, acks).await;
                counted.record(&metrics, outcome(delivery, &published));
                match published {
                    Ok(delivered) => {
                        let answer = StoredAnswer {
                            status: StatusCode::ACCEPTED.as_u16(),
                            body: answer(&event.id, &event.topic, delivered).to_string(),
                        };
                        store.complete(&scope, &fingerprint, &answer).await;
                        Ok(answer.body)
                    }
                    Err(error) => {
                        store.release(&scope).await;
                        Err(GatewayError::Publish(error))
                    }
                }
            }
        });
        counted.by_publish = true;
        match settle.await {
            Ok(settled) => Ok(accepted(settled?, false)),
            Err(ended) if ended.is_panic() => std::panic::resume_unwind(ended.into_panic()),
            // Cancelled: only as the node's runtime shuts down.
            Err(_) => Err(GatewayError::Publish(super::PublishError::Unavailable {
                broker: self.broker.name.clone(),
                reason: "the node is shutting down".into(),
            })),
        }
    }

    /// The request's headers that make its event, by name: CloudEvents attributes, the
    /// content type, and those the key or a topic rule reads.
    fn event_headers<'h>(&self, headers: &'h HeaderMap) -> Vec<(&'h str, &'h [u8])> {
        let read = |name: &http::HeaderName| {
            self.key
                .iter()
                .chain(self.topic_rules.iter().map(|rule| &rule.source))
                .any(|source| matches!(source, KeySource::Header(header) if header == name))
        };
        let mut chosen: Vec<(&str, &[u8])> = headers
            .iter()
            .filter(|(name, _)| {
                name.as_str().starts_with("ce-") || *name == header::CONTENT_TYPE || read(name)
            })
            .map(|(name, value)| (name.as_str(), value.as_bytes()))
            .collect();
        // Clients may send headers in any order; one header's values keep theirs (the key and
        // topic rules read the first).
        chosen.sort_by_key(|(name, _)| *name);
        chosen
    }

    /// The request as one event, checked and ready to publish.
    fn event(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        arrived_ms: i64,
        context: &PublishContext<'_>,
        counted: &mut Counted,
    ) -> Result<Event, GatewayError> {
        let event = cloudevents::read(self.mode, &parts.headers, &body).map_err(|e| match e {
            EventError::MediaType(detail) => GatewayError::UnsupportedMediaType(detail),
            EventError::Invalid(detail) => GatewayError::InvalidEvent(detail),
        })?;
        // The body as JSON, parsed at most once, for the schema, a JSON-pointer key or topic
        // rule.
        let mut json: Option<Value> = None;
        let needs_json = self.schema.is_some()
            || matches!(self.key, Some(KeySource::JsonPointer(_)))
            || self
                .topic_rules
                .iter()
                .any(|rule| matches!(rule.source, KeySource::JsonPointer(_)));
        if needs_json {
            json =
                Some(serde_json::from_slice(&body).map_err(|e| {
                    GatewayError::InvalidEvent(format!("the body is not JSON: {e}"))
                })?);
        }
        if self.schema.is_some() && event.binary_data {
            return Err(GatewayError::SchemaViolation(vec![SchemaError {
                pointer: "/data_base64".into(),
                detail: "this route checks each event's data against a JSON Schema: send the \
                         data as JSON in data, not data_base64"
                    .into(),
            }]));
        }
        if let Some(schema) = &self.schema {
            // In structured mode the schema is for the event's data, not its envelope.
            let data = event
                .data
                .as_ref()
                .or(json.as_ref())
                .unwrap_or(&Value::Null);
            let errors = violations(schema, data);
            if !errors.is_empty() {
                return Err(GatewayError::SchemaViolation(errors));
            }
        }
        let key = self.key(&parts.headers, json.as_ref(), context)?;
        // In structured mode pointers are into the whole event, as for the key.
        let topic = self.topic(&parts.headers, json.as_ref(), context).clone();
        counted.topic = topic.clone();
        let mut headers = event.headers;
        headers.push(("sluice-event-id".into(), Bytes::from(event.id.clone())));
        headers.extend(caller_headers(
            context.identity,
            context.request_id,
            &parts.headers,
        ));
        let record = Record {
            topic: topic.clone(),
            key,
            value: body,
            headers,
            timestamp_ms: arrived_ms,
        };
        Ok(Event {
            id: event.id,
            topic,
            record,
        })
    }

    fn key(
        &self,
        headers: &HeaderMap,
        json: Option<&Value>,
        context: &PublishContext<'_>,
    ) -> Result<Option<Bytes>, GatewayError> {
        self.key
            .as_ref()
            .map(|source| {
                value_of(source, headers, json, context).map_err(|what| {
                    GatewayError::InvalidEvent(format!("{what}: it is the event's key"))
                })
            })
            .transpose()
    }

    /// The first topic rule's topic that matches the request, else the route's topic.
    fn topic(
        &self,
        headers: &HeaderMap,
        json: Option<&Value>,
        context: &PublishContext<'_>,
    ) -> &Arc<str> {
        self.topic_rules
            .iter()
            .find(|rule| {
                value_of(&rule.source, headers, json, context)
                    .is_ok_and(|value| rule.condition.matches(&value))
            })
            .map_or(&self.topic, |rule| &rule.topic)
    }
}

/// A request made into an event.
struct Event {
    /// The event's id (CloudEvents `id`, or one the node made).
    id: String,
    topic: Arc<str>,
    record: Record,
}

/// What the publish metric counts a request under: the topic its event went to (a topic rule's,
/// or the route's when none matched or the request was refused before one was chosen), and
/// whether it was answered from an earlier request with the same `Idempotency-Key`.
struct Counted {
    topic: Arc<str>,
    replayed: bool,
    started: Instant,
    /// Counted by the task that published (see [`PublishRoute::publish_once`]), not by the
    /// request.
    by_publish: bool,
}

impl Counted {
    fn record(&self, metrics: &Metrics, outcome: &'static str) {
        metrics.event_published(&self.topic, outcome, self.started.elapsed().as_secs_f64());
    }
}

/// The publish metric's `outcome` for what the broker said.
fn outcome<T>(delivery: Delivery, published: &Result<T, super::PublishError>) -> &'static str {
    match published {
        Ok(_) if delivery == Delivery::Durable => "acknowledged",
        Ok(_) => "queued",
        Err(error) => error.outcome(),
    }
}

/// The value `source` names in the request, or what is missing.
fn value_of(
    source: &KeySource,
    headers: &HeaderMap,
    json: Option<&Value>,
    context: &PublishContext<'_>,
) -> Result<Bytes, String> {
    match source {
        KeySource::PathParam(name) => context
            .params
            .iter()
            .find(|(param, _)| param == name)
            .map(|(_, value)| Bytes::from(value.clone()))
            .ok_or_else(|| format!("the path has no parameter {name}")),
        KeySource::Header(name) => headers
            .get(name)
            .map(|value| Bytes::copy_from_slice(value.as_bytes()))
            .ok_or_else(|| format!("header {name} is required")),
        KeySource::JsonPointer(pointer) => match json.and_then(|json| json.pointer(pointer)) {
            // A string is the value as it is; any other value, its JSON text.
            Some(Value::String(text)) => Ok(Bytes::from(text.clone())),
            Some(Value::Null) | None => Err(format!("the body has no value at {pointer}")),
            Some(other) => Ok(Bytes::from(other.to_string())),
        },
        KeySource::ConsumerId => context
            .identity
            .map(|identity| Bytes::from(identity.consumer_id.to_string()))
            .ok_or_else(|| "the request has no authenticated consumer".to_owned()),
    }
}

/// A topic chosen by the request's content.
#[derive(Debug)]
struct TopicRule {
    source: KeySource,
    condition: Condition,
    topic: Arc<str>,
}

#[derive(Debug)]
enum Condition {
    Equals(String),
    OneOf(Vec<String>),
    /// Anchored at both ends.
    Regex(regex::Regex),
}

impl Condition {
    fn matches(&self, value: &[u8]) -> bool {
        let Ok(value) = std::str::from_utf8(value) else {
            return false;
        };
        match self {
            Condition::Equals(expected) => value == expected,
            Condition::OneOf(values) => values.iter().any(|v| v == value),
            Condition::Regex(regex) => regex.is_match(value),
        }
    }
}

fn key_source(source: Option<&pb::ValueSource>) -> Result<Option<KeySource>, String> {
    use pb::value_source::Kind;
    Ok(match source.and_then(|k| k.kind.as_ref()) {
        None | Some(Kind::ConsumerId(false)) => None,
        Some(Kind::PathParam(name)) => Some(KeySource::PathParam(name.clone())),
        Some(Kind::Header(name)) => Some(KeySource::Header(
            http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?,
        )),
        Some(Kind::JsonPointer(pointer)) => Some(KeySource::JsonPointer(pointer.clone())),
        Some(Kind::ConsumerId(true)) => Some(KeySource::ConsumerId),
    })
}

fn topic_rule(rule: &pb::TopicRule) -> Result<TopicRule, String> {
    use pb::topic_rule::Condition as C;
    let source = key_source(rule.source.as_ref())?
        .ok_or("a topic rule needs a path_param, header or json_pointer")?;
    let condition = match &rule.condition {
        Some(C::Equals(value)) => Condition::Equals(value.clone()),
        Some(C::OneOf(list)) => Condition::OneOf(list.values.clone()),
        Some(C::Regex(pattern)) => Condition::Regex(
            regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| e.to_string())?,
        ),
        None => return Err("a topic rule needs equals, one_of or regex".into()),
    };
    Ok(TopicRule {
        source,
        condition,
        topic: rule.topic.as_str().into(),
    })
}

impl super::PublishError {
    /// The `outcome` label of the publish metric.
    pub fn outcome(&self) -> &'static str {
        match self {
            super::PublishError::QueueFull { .. } => "queue_full",
            super::PublishError::Timeout { .. } => "timeout",
            super::PublishError::Unavailable { .. } => "unavailable",
            // The client's request, as a bad body is.
            super::PublishError::TooLarge { .. } => "rejected",
            super::PublishError::Refused { .. } => "refused",
        }
    }
}

/// Reads a whole body, at most `limit` bytes, within [`BODY_TIMEOUT`].
async fn read_body<B>(body: B, limit: u64) -> Result<Bytes, GatewayError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(GatewayError::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<LengthLimitError>() => {
            Err(GatewayError::BodyTooLarge { limit })
        }
        Ok(Err(_)) => Err(GatewayError::Malformed("the request body ended early")),
    }
}

/// The 202's body: where the event went (durable) or that it was queued (fire-and-forget).
fn answer(id: &str, topic: &str, delivered: Option<Delivered>) -> Value {
    match delivered {
        Some(at) => serde_json::json!({
            "id": id,
            "topic": topic,
            "partition": at.partition,
            "offset": at.offset,
            "timestamp": rfc3339_ms(at.timestamp_ms),
        }),
        None => serde_json::json!({
            "id": id,
            "topic": topic,
            "delivery": "fire_and_forget",
        }),
    }
}

/// The 202 itself; `replayed`: the answer to an earlier request with the same
/// `Idempotency-Key`.
fn accepted(body: String, replayed: bool) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::ACCEPTED;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if replayed {
        headers.insert(
            IDEMPOTENCY_REPLAYED.clone(),
            HeaderValue::from_static("true"),
        );
    }
    response
}

pub(super) fn rfc3339_ms(ms: i64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms.max(0).unsigned_abs()))
        .to_string()
}

#[cfg(test)]
mod tests;
