//! The declarative document, as users write it.
//!
//! Field names here are the user-facing vocabulary: error paths, the published JSON Schema
//! (generated from these types, so it cannot drift) and `docs/declarative.md` all use them.
//! Resources refer to each other by name within their group; ids are optional and, when
//! absent, derived from kind, group and name so that applying the same file twice yields the
//! same ids. Every struct rejects unknown fields.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The only document format version this build reads.
pub const FORMAT_VERSION: u32 = 1;

/// A whole registry: every resource of every group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Sluice declarative configuration")]
pub struct Document {
    /// Version of this document format. Must be 1.
    pub format_version: u32,
    /// Group of every resource that does not name its own. Default: "default".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apis: Vec<Api>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<Upstream>,
    /// Consumers, each with its credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<Consumer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plans: Vec<Plan>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<Subscription>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Policy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub brokers: Vec<Broker>,
    /// TLS certificates the data plane's TLS listener presents, chosen by SNI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<Certificate>,
}

/// An API: routes served under some hosts, with policies applied to all of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Api {
    /// Unique among APIs of the group: lowercase letters, digits, '-', '_', '.'.
    pub name: String,
    /// Stable id (UUID). Derived from group and name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Group of this API; default: the document's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Hosts served: exact ("api.example.com") or leading wildcard ("*.example.com").
    /// Empty: any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Prefix of every route path, e.g. "/v1". Default: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base_path: String,
    /// Policy names applied to every route, before the route's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Answer 404 instead of 403 to callers that are not allowed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub hide_when_forbidden: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

/// A route: what requests it matches and the one action it takes (exactly one of `proxy`,
/// `publish`, `subscribe`, `direct_response`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique within the API. Default: the methods and path, e.g. "GET /users/{id}".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Stable id (UUID). Derived from the API's id and the route's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Path after the API's base_path. `{name}` captures a segment, a final `{*name}` the rest.
    pub path: String,
    /// How `path` matches: `exact` (the whole path), `prefix` (ending at a segment boundary:
    /// "/users" matches "/users/1", not "/usersx") or `template` (`{name}` segments capture
    /// parameters). Default: `template` when the path has `{`, else `prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_match: Option<PathMatchKind>,
    /// Methods matched (upper case). Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Header conditions; all must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NameMatch>,
    /// Query parameter conditions; all must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<NameMatch>,
    /// Higher wins when several routes match. Default 0.
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub priority: i32,
    /// Scopes the caller must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Policy names applied to this route after the API's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponseAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PathMatchKind {
    Exact,
    Prefix,
    Template,
}

/// A condition on a header or query parameter: exactly one of `exact`, `prefix`, `regex`,
/// `present`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NameMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Regular expression (Rust `regex` syntax), anchored at both ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// `true`: matches when present with any value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    /// Match when the condition does NOT hold.
    #[serde(default, skip_serializing_if = "is_false")]
    pub invert: bool,
}

/// Proxy to an upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxyAction {
    /// Upstream name.
    pub upstream: String,
    /// Remove the matched prefix before forwarding.
    #[serde(default, skip_serializing_if = "is_false")]
    pub strip_prefix: bool,
    /// Replace the forwarded path; may use `{param}` captured by the route's template.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path_rewrite: String,
    /// Overall time including retries, e.g. "30s". Default: the upstream's total timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Canary releases: shares of requests sent to other upstreams instead of `upstream`,
    /// which takes the rest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canaries: Vec<Canary>,
    /// A request header that forces a version by name (a canary's `version`, or
    /// `primary_version`), e.g. "x-version". Default: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version_header: String,
    /// The version name of `upstream` for `version_header`. Default: "primary".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub primary_version: String,
    /// Shadow traffic: a share of requests also sent to another upstream, its response
    /// discarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

/// A share of a route's requests sent to another upstream (a new version).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// Upstream name.
    pub upstream: String,
    /// Share of requests, more than 0 and at most 100 (e.g. 5 or 0.5). The canaries of a
    /// route add up to at most 100.
    pub percent: f64,
    /// The name `version_header` forces this canary with. Default: the upstream's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
}

/// A share of a route's requests copied to another upstream in the background.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// Upstream name.
    pub upstream: String,
    /// Share of requests mirrored, more than 0 and at most 100. Default: 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

/// Publish the request as an event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishAction {
    /// Broker name.
    pub broker: String,
    pub topic: String,
    /// Where the record key comes from. Default: no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<ValueSource>,
    /// `durable` (default): 202 only once the broker acknowledged the event.
    /// `fire_and_forget`: 202 once queued in the producer; the event may still be lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// CloudEvents mode. Default: `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_events: Option<CloudEventsMode>,
    /// A JSON Schema the request body must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<serde_json::Value>,
    /// Tried in order: the first rule that matches picks the topic; none matching, `topic`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topic_rules: Vec<TopicRule>,
    /// The broker's acknowledgement: `all` (every in-sync replica), `leader` (the partition
    /// leader only) or `none` (no acknowledgement; needs `delivery: fire_and_forget`).
    /// Default: the broker's own setting, `all` unless its `properties` change it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acks: Option<Acks>,
}

/// A topic chosen by the request's content: one of `path_param`, `header`, `json_pointer`,
/// and one of `equals`, `one_of`, `regex`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TopicRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_param: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// RFC 6901 pointer into a JSON body (in structured CloudEvents mode, into the event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_pointer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<String>>,
    /// Regular expression (Rust `regex` syntax), anchored at both ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    pub topic: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    Durable,
    FireAndForget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Acks {
    All,
    Leader,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CloudEventsMode {
    None,
    Structured,
    Binary,
}

/// Where a value comes from: exactly one of the fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValueSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_param: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// RFC 6901 pointer into a JSON body, e.g. "/order/id".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_pointer: Option<String>,
    /// `true`: the authenticated consumer's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_id: Option<bool>,
}

/// Stream a topic over SSE or WebSocket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscribeAction {
    /// Broker name.
    pub broker: String,
    pub topic: String,
    /// Where a new subscriber starts. Default: `latest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<StartPosition>,
    /// Heartbeat interval, e.g. "15s". Default: the data plane's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<String>,
    /// `true`: WebSocket subscribers may publish to the topic, each message acknowledged.
    #[serde(default, skip_serializing_if = "is_false")]
    pub websocket_publish: bool,
    /// Conditions bound to each subscriber's identity: only events whose value equals the
    /// caller's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity_filters: Vec<IdentityFilter>,
    /// Message rate limits per subscription (per connection when anonymous), for the events
    /// sent and the WebSocket messages published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub message_rate_limits: Vec<RateLimit>,
    /// A JSON Schema every message a WebSocket subscriber publishes must satisfy (with
    /// `websocket_publish`); one that does not is refused and reaches no topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket_json_schema: Option<serde_json::Value>,
}

/// Only events whose value (one of `json_pointer`, `record_header`, `key`) equals the
/// caller's (one of `consumer`, `claim_header`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityFilter {
    /// RFC 6901 pointer into the event's JSON value, e.g. "/customerId".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_pointer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_header: Option<String>,
    /// `true`: the record key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<bool>,
    /// An attribute of the authenticated consumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<ConsumerAttribute>,
    /// The identity header a JWT claim is mapped to (the issuer's `claim_headers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_header: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConsumerAttribute {
    Id,
    CustomId,
    Name,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    Latest,
    Earliest,
}

/// Answer with a fixed response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseAction {
    pub status: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
}

/// A set of backend targets and how traffic reaches them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// At least one.
    pub targets: Vec<Target>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<LoadBalancing>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Passive health: targets failing live requests are ejected for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Cap on requests in flight to this upstream. Default: unlimited.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub max_concurrent_requests: u32,
    /// `auto` (default), `http1` or `http2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<UpstreamProtocol>,
    /// TLS settings for `https` targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// "http://host:port" or "https://host:port".
    pub url: String,
    /// Relative share of traffic, 1 to 10000. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancing {
    /// `round_robin` (weighted, the default), `least_request` or `consistent_hash`.
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// For `consistent_hash`: hash on this header...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    /// ...or on this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_cookie: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LbAlgorithm {
    #[default]
    RoundRobin,
    LeastRequest,
    ConsistentHash,
}

/// Durations are written like "250ms", "5s", "1m".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Retries after the first try, 0 to 10.
    pub attempts: u32,
    /// Statuses retried for idempotent methods (connect errors always are).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_statuses: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_base: Option<String>,
    /// Retries allowed as a share of requests, 1 to 100 per cent. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_percent: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Path probed with GET on every target.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// Default: 200-399.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Failures in a row (connect errors, timeouts, 502, 503, 504) that eject a target.
    pub consecutive_failures: u32,
    /// First ejection length, e.g. "30s" (the default); each further ejection of the same
    /// target lasts one more base, up to ten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection: Option<String>,
    /// The most targets ejected at once, in per cent. Default 50; one target always stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long it stays open before trying again, e.g. "30s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_open_requests: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub server_name: String,
    /// PEM bundle of trusted CAs. Default: the system roots.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca_pem: String,
    /// Never verify the server: for tests only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure_skip_verify: bool,
}

/// A client of the APIs, with its credentials.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Your own identifier for this consumer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub custom_id: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    /// Policy names that follow this consumer on every API: `ip_restriction` and
    /// `rate_limit` (scope `consumer`) only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<Credential>,
}

/// One way a consumer proves who it is: exactly one of `api_key`, `jwt`, `mtls`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// Unique among credentials of the group. Default: derived from the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSubject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSubject>,
    /// RFC 3339 time after which the credential is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub revoked: bool,
}

/// An API key: the plaintext `key` (hashed when loaded, never stored) or its `key_sha256`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The key itself, at least 16 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Lowercase hex SHA-256 of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// The key's first characters, for listings. Default: taken from `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtSubject {
    pub issuer: String,
    pub subject: String,
}

/// Exactly one of `subject` (the certificate's subject DN) or `fingerprint_sha256`; with
/// `subject`, optionally `ca_sha256`: the CA the certificate must be issued under.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MtlsSubject {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fingerprint_sha256: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca_sha256: String,
}

/// What a subscription allows: rate limits, a monthly quota, scopes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimit>,
    /// Requests per calendar month (UTC). Default: none.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub monthly_quota: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Where the rate limits are counted: `local` (default, per node) or `redis` (shared by
    /// all nodes). The monthly quota is always counted in Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RateLimitMode>,
    /// While Redis is unreachable: allow (true) or refuse (false, default) requests that
    /// Redis would count.
    #[serde(default, skip_serializing_if = "is_false")]
    pub fail_open: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per period, at least 1.
    pub limit: u64,
    pub per: Period,
    /// Extra requests allowed at once above the steady rate.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub burst: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    #[default]
    Second,
    Minute,
    Hour,
    Day,
}

/// A consumer's access to an API under a plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Default: "<consumer>.<api>".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Consumer name.
    pub consumer: String,
    /// API name.
    pub api: String,
    /// Plan name.
    pub plan: String,
    /// `active` (default) or `suspended`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SubscriptionStatus>,
    /// RFC 3339 time after which the subscription no longer grants access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Active,
    Suspended,
}

/// A reusable policy: exactly one of the policy kinds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_auth: Option<KeyAuthPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_restriction: Option<IpRestrictionPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_size: Option<RequestSizePolicy>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyAuthPolicy {
    /// Headers searched in order. Default: ["x-api-key"].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// Query parameters searched after the headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<String>,
    /// Remove the key from the request before proxying it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub hide_credentials: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtPolicy {
    pub issuers: Vec<JwtIssuer>,
}

/// A trusted token issuer: exactly one of `jwks_url` or `jwks`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuer {
    /// The `iss` claim accepted.
    pub issuer: String,
    /// Accepted `aud` values. Empty: `aud` is not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Allowed algorithms, e.g. ["RS256"]. Required; HMAC (HS*) and public-key algorithms
    /// cannot be mixed for one issuer.
    pub algorithms: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// An inline JWKS document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
    /// Clock skew allowed on `exp` and `nbf`, e.g. "30s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leeway: Option<String>,
    /// Claim naming the consumer's JWT credential subject. Default: "sub".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub consumer_claim: String,
    /// How often the JWKS is refetched, e.g. "5m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_refresh: Option<String>,
    /// Claims passed upstream as headers: claim name to header name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claim_headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MtlsPolicy {
    /// PEM bundle of the CAs that client certificates must chain to.
    pub ca_pem: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicy {
    pub limits: Vec<RateLimit>,
    /// Whose budget: `consumer` (default), `api` or `ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<RateLimitScope>,
    /// `local` (default, per node) or `redis` (shared by all nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RateLimitMode>,
    /// With `redis`: allow (true) or refuse (false, default) while Redis is unreachable.
    #[serde(default, skip_serializing_if = "is_false")]
    pub fail_open: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitScope {
    Consumer,
    Api,
    Ip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitMode {
    Local,
    Redis,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CorsPolicy {
    /// Exact origins ("https://app.example.com"), or "*".
    pub allow_origins: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_credentials: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
}

/// Callers in `deny` are refused; when `allow` is set, callers outside it are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IpRestrictionPolicy {
    /// CIDRs or addresses, IPv4 or IPv6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestSizePolicy {
    pub max_body_bytes: u64,
}

/// An event broker: exactly one of `kafka` or `memory`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaBroker>,
    /// In-process broker. NOT durable: events are lost when the data plane stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryBroker>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaBroker {
    /// "host:port" entries.
    pub bootstrap_servers: Vec<String>,
    /// librdkafka properties passed through (security.protocol, sasl.*, ssl.*, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryBroker {
    /// Events kept per topic for late subscribers. Default: 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_events: Option<u32>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero_u32(value: &u32) -> bool {
    *value == 0
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

fn is_zero_i32(value: &i32) -> bool {
    *value == 0
}

/// A TLS certificate with its key, presented to clients whose SNI it names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// PEM: the leaf certificate, then its intermediates.
    pub cert_pem: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
    /// Server names: exact, "*.example.com", or "*" for the default certificate (sent when
    /// the client's SNI names no other). Unique across a group's certificates.
    pub snis: Vec<String>,
}
