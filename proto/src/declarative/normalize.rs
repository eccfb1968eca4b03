//! Document → [`ConfigSet`]: defaults filled in, names resolved to ids, durations and times
//! parsed, plaintext API keys hashed. Problems are collected, not returned at the first.

use std::collections::HashMap;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::model as doc;
use crate::error::FieldError;
use crate::pb::{self, ResourceKind};
use crate::validate::Locate;

/// Group of resources whose document names none.
pub const DEFAULT_GROUP: &str = "default";

/// Namespace of the ids derived from kind, group and name (UUID v5).
const ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6a1f_27c4_9b3e_4d8a_a5f0_3c2e_81d7_5b19);

/// Shortest plaintext API key accepted.
pub const MIN_API_KEY_LEN: usize = 16;

/// Characters of a key kept as its recognisable prefix.
pub const API_KEY_PREFIX_LEN: usize = 6;

/// The id a resource gets when its document gives none: stable for the same kind, group and
/// name, so applying a file twice names the same resources.
pub fn derived_id(kind: ResourceKind, group: &str, name: &str) -> String {
    let key = format!("{}/{group}/{name}", kind.as_str_name());
    uuid::Uuid::new_v5(&ID_NAMESPACE, key.as_bytes()).to_string()
}

/// The id of a route with no explicit id.
pub fn derived_route_id(api_id: &str, route_name: &str) -> String {
    let key = format!("route/{api_id}/{route_name}");
    uuid::Uuid::new_v5(&ID_NAMESPACE, key.as_bytes()).to_string()
}

/// Lowercase hex SHA-256 of an API key.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Document paths of the resources of a normalised document, for error messages.
#[derive(Debug, Clone, Default)]
pub struct DocumentLocator {
    /// Credentials are nested under consumers in documents: `consumers[1].credentials[0]`.
    credentials: Vec<String>,
}

impl Locate for DocumentLocator {
    fn locate(&self, kind: ResourceKind, index: usize) -> String {
        match (kind, self.credentials.get(index)) {
            (ResourceKind::Credential, Some(path)) => path.clone(),
            _ => crate::validate::ByPosition.locate(kind, index),
        }
    }
}

/// Normalises a document. Returns the config set (complete as far as it could be built), the
/// locator for its resources, and the errors found on the way.
pub fn normalize(document: &doc::Document) -> (pb::ConfigSet, DocumentLocator, Vec<FieldError>) {
    normalize_with(document, &ExternalNames::new())
}

/// Names of resources outside the document, as `(kind, group, name) → id`.
pub type ExternalNames = HashMap<(ResourceKind, String, String), String>;

/// Normalises a document whose references may also name resources it does not contain (an
/// API written alone through the admin API refers to upstreams already in the registry).
/// The document's own resources win over `external` ones of the same name.
pub fn normalize_with(
    document: &doc::Document,
    external: &ExternalNames,
) -> (pb::ConfigSet, DocumentLocator, Vec<FieldError>) {
    let mut n = Normalizer::new(document);
    for ((kind, group, name), id) in external {
        n.external
            .entry((*kind, group.clone(), name.clone()))
            .or_insert_with(|| id.clone());
    }
    let config = pb::ConfigSet {
        apis: enumerate(&document.apis, |i, api| n.api(i, api)),
        upstreams: enumerate(&document.upstreams, |i, u| n.upstream(i, u)),
        consumers: enumerate(&document.consumers, |i, c| n.consumer(i, c)),
        credentials: n.credentials(&document.consumers),
        plans: enumerate(&document.plans, |i, p| n.plan(i, p)),
        subscriptions: enumerate(&document.subscriptions, |i, s| n.subscription(i, s)),
        policies: enumerate(&document.policies, |i, p| n.policy(i, p)),
        brokers: enumerate(&document.brokers, |i, b| n.broker(i, b)),
        certificates: enumerate(&document.certificates, |i, c| n.certificate(i, c)),
    };
    (config, n.locator, n.errors)
}

fn enumerate<'x, T, U>(items: &'x [T], mut f: impl FnMut(usize, &'x T) -> U) -> Vec<U> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| f(i, item))
        .collect()
}

struct Normalizer<'a> {
    default_group: &'a str,
    /// (kind, group, name) → id, for resolving references.
    ids: HashMap<(ResourceKind, &'a str, &'a str), String>,
    /// Resources outside the document that references may name.
    external: ExternalNames,
    locator: DocumentLocator,
    errors: Vec<FieldError>,
}

impl<'a> Normalizer<'a> {
    fn new(document: &'a doc::Document) -> Self {
        let default_group = document.group.as_deref().unwrap_or(DEFAULT_GROUP);
        let mut n = Self {
            default_group,
            ids: HashMap::new(),
            external: ExternalNames::new(),
            locator: DocumentLocator::default(),
            errors: Vec::new(),
        };
        macro_rules! index {
            ($list:ident, $kind:expr) => {
                for r in &document.$list {
                    n.index($kind, r.group.as_deref(), &r.name, r.id.as_deref());
                }
            };
        }
        index!(apis, ResourceKind::Api);
        index!(upstreams, ResourceKind::Upstream);
        index!(consumers, ResourceKind::Consumer);
        index!(plans, ResourceKind::Plan);
        index!(policies, ResourceKind::Policy);
        index!(brokers, ResourceKind::Broker);
        index!(certificates, ResourceKind::Certificate);
        n
    }

    fn index(
        &mut self,
        kind: ResourceKind,
        group: Option<&'a str>,
        name: &'a str,
        id: Option<&str>,
    ) {
        let group = group.unwrap_or(self.default_group);
        let id = id.map_or_else(|| derived_id(kind, group, name), str::to_owned);
        // The first of two same-named resources wins here; the validator reports the clash.
        self.ids.entry((kind, group, name)).or_insert(id);
    }

    fn error(&mut self, path: String, reason: impl Into<String>) {
        self.errors.push(FieldError {
            path,
            reason: reason.into(),
            resource: None,
        });
    }

    fn meta(
        &self,
        kind: ResourceKind,
        id: Option<&str>,
        group: Option<&str>,
        name: &str,
        description: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> pb::Meta {
        let group = group.unwrap_or(self.default_group);
        pb::Meta {
            id: id.map_or_else(|| derived_id(kind, group, name), str::to_owned),
            group: group.to_owned(),
            name: name.to_owned(),
            resource_version: 0,
            labels: labels.clone(),
            description: description.to_owned(),
        }
    }

    /// Resolves the name of a `kind` in `group` to its id; reports an unknown name.
    fn resolve(&mut self, path: String, kind: ResourceKind, group: &str, name: &str) -> String {
        let found = self.ids.get(&(kind, group, name)).or_else(|| {
            self.external
                .get(&(kind, group.to_owned(), name.to_owned()))
        });
        match found {
            Some(id) => id.clone(),
            None => {
                let what = crate::validate::kind_name(kind);
                self.error(path, format!("no {what} named {name:?} in group {group:?}"));
                String::new()
            }
        }
    }

    fn resolve_all(
        &mut self,
        path: &str,
        kind: ResourceKind,
        group: &str,
        names: &[String],
    ) -> Vec<String> {
        enumerate(names, |j, name| {
            self.resolve(format!("{path}[{j}]"), kind, group, name)
        })
    }

    fn duration_ms(&mut self, path: String, value: Option<&String>) -> u64 {
        let Some(text) = value else { return 0 };
        match humantime::parse_duration(text) {
            Ok(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            Err(e) => {
                self.error(
                    path,
                    format!(
                        "{text:?} is not a duration ({e}); write e.g. \"250ms\", \"5s\", \"1m\""
                    ),
                );
                0
            }
        }
    }

    fn duration_s(&mut self, path: String, value: Option<&String>) -> u64 {
        self.duration_ms(path, value).div_ceil(1000)
    }

    fn timestamp(
        &mut self,
        path: String,
        value: Option<&String>,
    ) -> Option<prost_types::Timestamp> {
        let text = value?;
        match crate::time::parse_rfc3339(text) {
            Ok(time) => Some(time),
            Err(reason) => {
                self.error(path, reason);
                None
            }
        }
    }

    /// Reports when more than one of a set of mutually exclusive fields is set.
    fn at_most_one(&mut self, path: &str, fields: &[(&str, bool)]) {
        let set: Vec<&str> = fields
            .iter()
            .filter(|(_, on)| *on)
            .map(|(name, _)| *name)
            .collect();
        if set.len() > 1 {
            let all: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
            self.error(
                path.to_owned(),
                format!(
                    "sets {}; exactly one of {} is allowed",
                    set.join(" and "),
                    all.join(", ")
                ),
            );
        }
    }

    fn api(&mut self, i: usize, api: &'a doc::Api) -> pb::Api {
        let base = format!("apis[{i}]");
        let meta = self.meta(
            ResourceKind::Api,
            api.id.as_deref(),
            api.group.as_deref(),
            &api.name,
            &api.description,
            &api.labels,
        );
        let group = meta.group.clone();
        let routes = enumerate(&api.routes, |j, route| {
            self.route(&format!("{base}.routes[{j}]"), &meta.id, &group, route)
        });
        pb::Api {
            hosts: api.hosts.clone(),
            base_path: api.base_path.clone(),
            routes,
            policy_ids: self.resolve_all(
                &format!("{base}.policies"),
                ResourceKind::Policy,
                &group,
                &api.policies,
            ),
            hide_when_forbidden: api.hide_when_forbidden,
            meta: Some(meta),
        }
    }

    fn route(&mut self, at: &str, api_id: &str, group: &str, route: &doc::Route) -> pb::Route {
        use pb::route::Action;
        let name = route
            .name
            .clone()
            .unwrap_or_else(|| default_route_name(route));
        let kind = match route.path_match {
            Some(doc::PathMatchKind::Exact) => pb::path_match::Kind::Exact,
            Some(doc::PathMatchKind::Prefix) => pb::path_match::Kind::Prefix,
            Some(doc::PathMatchKind::Template) => pb::path_match::Kind::Template,
            None if route.path.contains('{') => pb::path_match::Kind::Template,
            None => pb::path_match::Kind::Prefix,
        };
        self.at_most_one(
            at,
            &[
                ("proxy", route.proxy.is_some()),
                ("publish", route.publish.is_some()),
                ("subscribe", route.subscribe.is_some()),
                ("direct_response", route.direct_response.is_some()),
            ],
        );
        let action = if let Some(proxy) = &route.proxy {
            Some(Action::Proxy(pb::ProxyAction {
                upstream_id: self.resolve(
                    format!("{at}.proxy.upstream"),
                    ResourceKind::Upstream,
                    group,
                    &proxy.upstream,
                ),
                strip_prefix: proxy.strip_prefix,
                path_rewrite: proxy.path_rewrite.clone(),
                timeout_ms: self.duration_ms(format!("{at}.proxy.timeout"), proxy.timeout.as_ref()),
                canaries: proxy
                    .canaries
                    .iter()
                    .enumerate()
                    .map(|(j, canary)| pb::Canary {
                        upstream_id: self.resolve(
                            format!("{at}.proxy.canaries[{j}].upstream"),
                            ResourceKind::Upstream,
                            group,
                            &canary.upstream,
                        ),
                        percent: canary.percent,
                        version: canary.version.clone(),
                    })
                    .collect(),
                version_header: proxy.version_header.to_ascii_lowercase(),
                primary_version: proxy.primary_version.clone(),
                mirror: proxy.mirror.as_ref().map(|mirror| pb::Mirror {
                    upstream_id: self.resolve(
                        format!("{at}.proxy.mirror.upstream"),
                        ResourceKind::Upstream,
                        group,
                        &mirror.upstream,
                    ),
                    percent: mirror.percent.unwrap_or(100.0),
                }),
            }))
        } else if let Some(publish) = &route.publish {
            Some(Action::Publish(self.publish(
                &format!("{at}.publish"),
                group,
                publish,
            )))
        } else if let Some(subscribe) = &route.subscribe {
            Some(Action::Subscribe(pb::SubscribeAction {
                broker_id: self.resolve(
                    format!("{at}.subscribe.broker"),
                    ResourceKind::Broker,
                    group,
                    &subscribe.broker,
                ),
                topic: subscribe.topic.clone(),
                default_start: match subscribe.start {
                    None => pb::subscribe_action::Start::Unspecified,
                    Some(doc::StartPosition::Latest) => pb::subscribe_action::Start::Latest,
                    Some(doc::StartPosition::Earliest) => pb::subscribe_action::Start::Earliest,
                } as i32,
                heartbeat_ms: self.duration_ms(
                    format!("{at}.subscribe.heartbeat"),
                    subscribe.heartbeat.as_ref(),
                ),
                websocket_publish: subscribe.websocket_publish,
                identity_filters: enumerate(&subscribe.identity_filters, |j, filter| {
                    self.identity_filter(&format!("{at}.subscribe.identity_filters[{j}]"), filter)
                }),
                message_rate_limits: self.rate_limits(&subscribe.message_rate_limits),
                websocket_json_schema: subscribe
                    .websocket_json_schema
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            }))
        } else {
            route.direct_response.as_ref().map(|direct| {
                Action::DirectResponse(pb::DirectResponseAction {
                    status: direct.status,
                    headers: direct.headers.clone(),
                    body: direct.body.clone(),
                })
            })
        };
        pb::Route {
            id: route
                .id
                .clone()
                .unwrap_or_else(|| derived_route_id(api_id, &name)),
            name,
            r#match: Some(pb::RouteMatch {
                path: Some(pb::PathMatch {
                    kind: kind as i32,
                    value: route.path.clone(),
                }),
                methods: route.methods.clone(),
                headers: enumerate(&route.headers, |j, h| {
                    let (value, invert) = self.name_match(&format!("{at}.headers[{j}]"), h);
                    pb::HeaderMatch {
                        name: h.name.clone(),
                        value,
                        invert,
                    }
                }),
                query: enumerate(&route.query, |j, q| {
                    let (value, invert) = self.name_match(&format!("{at}.query[{j}]"), q);
                    pb::QueryMatch {
                        name: q.name.clone(),
                        value,
                        invert,
                    }
                }),
            }),
            policy_ids: self.resolve_all(
                &format!("{at}.policies"),
                ResourceKind::Policy,
                group,
                &route.policies,
            ),
            scopes: route.scopes.clone(),
            priority: route.priority,
            action,
        }
    }

    fn name_match(&mut self, path: &str, m: &doc::NameMatch) -> (Option<pb::StringMatch>, bool) {
        use pb::string_match::Kind;
        self.at_most_one(
            path,
            &[
                ("exact", m.exact.is_some()),
                ("prefix", m.prefix.is_some()),
                ("regex", m.regex.is_some()),
                ("present", m.present.is_some()),
            ],
        );
        let kind = m
            .exact
            .clone()
            .map(Kind::Exact)
            .or_else(|| m.prefix.clone().map(Kind::Prefix))
            .or_else(|| m.regex.clone().map(Kind::Regex))
            .or_else(|| m.present.map(Kind::Present));
        (Some(pb::StringMatch { kind }), m.invert)
    }

    fn publish(
        &mut self,
        path: &str,
        group: &str,
        publish: &doc::PublishAction,
    ) -> pb::PublishAction {
        use pb::publish_action::{Acks, CloudEvents, Delivery};
        pb::PublishAction {
            broker_id: self.resolve(
                format!("{path}.broker"),
                ResourceKind::Broker,
                group,
                &publish.broker,
            ),
            topic: publish.topic.clone(),
            key: publish
                .key
                .as_ref()
                .map(|key| self.value_source(&format!("{path}.key"), key)),
            delivery: match publish.delivery {
                None => Delivery::Unspecified,
                Some(doc::Delivery::Durable) => Delivery::Durable,
                Some(doc::Delivery::FireAndForget) => Delivery::FireAndForget,
            } as i32,
            cloud_events: match publish.cloud_events {
                None => CloudEvents::Unspecified,
                Some(doc::CloudEventsMode::None) => CloudEvents::None,
                Some(doc::CloudEventsMode::Structured) => CloudEvents::Structured,
                Some(doc::CloudEventsMode::Binary) => CloudEvents::Binary,
            } as i32,
            json_schema: publish
                .json_schema
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            topic_rules: enumerate(&publish.topic_rules, |j, rule| {
                self.topic_rule(&format!("{path}.topic_rules[{j}]"), rule)
            }),
            acks: match publish.acks {
                None => Acks::Unspecified,
                Some(doc::Acks::All) => Acks::All,
                Some(doc::Acks::Leader) => Acks::Leader,
                Some(doc::Acks::None) => Acks::None,
            } as i32,
        }
    }

    fn identity_filter(&mut self, path: &str, filter: &doc::IdentityFilter) -> pb::IdentityFilter {
        use pb::identity_filter::{Attribute, EventValue, Identity};
        self.at_most_one(
            path,
            &[
                ("json_pointer", filter.json_pointer.is_some()),
                ("record_header", filter.record_header.is_some()),
                ("key", filter.key.is_some()),
            ],
        );
        self.at_most_one(
            path,
            &[
                ("consumer", filter.consumer.is_some()),
                ("claim_header", filter.claim_header.is_some()),
            ],
        );
        let event_value = filter
            .json_pointer
            .clone()
            .map(EventValue::JsonPointer)
            .or_else(|| filter.record_header.clone().map(EventValue::RecordHeader))
            .or_else(|| filter.key.map(EventValue::Key));
        let identity = filter
            .consumer
            .map(|attribute| {
                Identity::Consumer(match attribute {
                    doc::ConsumerAttribute::Id => Attribute::ConsumerId,
                    doc::ConsumerAttribute::CustomId => Attribute::CustomId,
                    doc::ConsumerAttribute::Name => Attribute::ConsumerName,
                } as i32)
            })
            .or_else(|| filter.claim_header.clone().map(Identity::ClaimHeader));
        pb::IdentityFilter {
            event_value,
            identity,
        }
    }

    fn topic_rule(&mut self, path: &str, rule: &doc::TopicRule) -> pb::TopicRule {
        use pb::topic_rule::Condition;
        let source = self.value_source(
            path,
            &doc::ValueSource {
                path_param: rule.path_param.clone(),
                header: rule.header.clone(),
                json_pointer: rule.json_pointer.clone(),
                consumer_id: None,
            },
        );
        self.at_most_one(
            path,
            &[
                ("equals", rule.equals.is_some()),
                ("one_of", rule.one_of.is_some()),
                ("regex", rule.regex.is_some()),
            ],
        );
        let condition = rule
            .equals
            .clone()
            .map(Condition::Equals)
            .or_else(|| {
                rule.one_of
                    .clone()
                    .map(|values| Condition::OneOf(pb::StringList { values }))
            })
            .or_else(|| rule.regex.clone().map(Condition::Regex));
        pb::TopicRule {
            source: Some(source),
            condition,
            topic: rule.topic.clone(),
        }
    }

    fn value_source(&mut self, path: &str, source: &doc::ValueSource) -> pb::ValueSource {
        use pb::value_source::Kind;
        self.at_most_one(
            path,
            &[
                ("path_param", source.path_param.is_some()),
                ("header", source.header.is_some()),
                ("json_pointer", source.json_pointer.is_some()),
                ("consumer_id", source.consumer_id.is_some()),
            ],
        );
        let kind = source
            .path_param
            .clone()
            .map(Kind::PathParam)
            .or_else(|| source.header.clone().map(Kind::Header))
            .or_else(|| source.json_pointer.clone().map(Kind::JsonPointer))
            .or_else(|| source.consumer_id.map(Kind::ConsumerId));
        pb::ValueSource { kind }
    }

    fn upstream(&mut self, i: usize, upstream: &doc::Upstream) -> pb::Upstream {
        use pb::load_balancing::{Algorithm, HashOn};
        let base = format!("upstreams[{i}]");
        let targets = enumerate(&upstream.targets, |j, target| {
            if target.weight == Some(0) {
                self.error(
                    format!("{base}.targets[{j}].weight"),
                    "must be 1 to 10000; remove the target to send it nothing",
                );
            }
            pb::Target {
                url: target.url.clone(),
                weight: target.weight.unwrap_or(0),
            }
        });
        let load_balancing = upstream.load_balancing.as_ref().map(|lb| {
            self.at_most_one(
                &format!("{base}.load_balancing"),
                &[
                    ("hash_header", lb.hash_header.is_some()),
                    ("hash_cookie", lb.hash_cookie.is_some()),
                ],
            );
            pb::LoadBalancing {
                algorithm: match lb.algorithm {
                    doc::LbAlgorithm::RoundRobin => Algorithm::RoundRobin,
                    doc::LbAlgorithm::LeastRequest => Algorithm::LeastRequest,
                    doc::LbAlgorithm::ConsistentHash => Algorithm::ConsistentHash,
                } as i32,
                hash_on: lb
                    .hash_header
                    .clone()
                    .map(HashOn::Header)
                    .or_else(|| lb.hash_cookie.clone().map(HashOn::Cookie)),
            }
        });
        let timeouts = upstream.timeouts.as_ref().map(|t| pb::Timeouts {
            connect_ms: self.duration_ms(format!("{base}.timeouts.connect"), t.connect.as_ref()),
            per_try_ms: self.duration_ms(format!("{base}.timeouts.per_try"), t.per_try.as_ref()),
            total_ms: self.duration_ms(format!("{base}.timeouts.total"), t.total.as_ref()),
        });
        let retry = upstream.retry.as_ref().map(|r| {
            if r.budget_percent == Some(0) {
                self.error(format!("{base}.retry.budget_percent"), "must be 1 to 100");
            }
            pb::RetryPolicy {
                attempts: r.attempts,
                on_statuses: r.on_statuses.clone(),
                backoff_base_ms: self.duration_ms(
                    format!("{base}.retry.backoff_base"),
                    r.backoff_base.as_ref(),
                ),
                budget_percent: r.budget_percent.unwrap_or(0),
            }
        });
        let health_check = upstream.health_check.as_ref().map(|h| pb::HealthCheck {
            path: h.path.clone(),
            interval_ms: self
                .duration_ms(format!("{base}.health_check.interval"), h.interval.as_ref()),
            timeout_ms: self
                .duration_ms(format!("{base}.health_check.timeout"), h.timeout.as_ref()),
            healthy_threshold: h.healthy_threshold.unwrap_or(0),
            unhealthy_threshold: h.unhealthy_threshold.unwrap_or(0),
            expected_statuses: h.expected_statuses.clone(),
        });
        let circuit_breaker = upstream
            .circuit_breaker
            .as_ref()
            .map(|c| pb::CircuitBreaker {
                failure_threshold: c.failure_threshold,
                open_ms: self.duration_ms(
                    format!("{base}.circuit_breaker.open_for"),
                    c.open_for.as_ref(),
                ),
                half_open_requests: c.half_open_requests.unwrap_or(0),
            });
        let outlier_detection = upstream
            .outlier_detection
            .as_ref()
            .map(|o| pb::OutlierDetection {
                consecutive_failures: o.consecutive_failures,
                base_ejection_ms: self.duration_ms(
                    format!("{base}.outlier_detection.base_ejection"),
                    o.base_ejection.as_ref(),
                ),
                max_ejection_percent: o.max_ejection_percent.unwrap_or(0),
            });
        pb::Upstream {
            meta: Some(self.meta(
                ResourceKind::Upstream,
                upstream.id.as_deref(),
                upstream.group.as_deref(),
                &upstream.name,
                &upstream.description,
                &upstream.labels,
            )),
            targets,
            load_balancing,
            timeouts,
            retry,
            health_check,
            circuit_breaker,
            outlier_detection,
            max_concurrent_requests: upstream.max_concurrent_requests,
            protocol: match upstream.protocol {
                None => pb::UpstreamProtocol::Unspecified,
                Some(doc::UpstreamProtocol::Auto) => pb::UpstreamProtocol::Auto,
                Some(doc::UpstreamProtocol::Http1) => pb::UpstreamProtocol::Http1,
                Some(doc::UpstreamProtocol::Http2) => pb::UpstreamProtocol::Http2,
            } as i32,
            tls: upstream.tls.as_ref().map(|t| pb::UpstreamTls {
                server_name: t.server_name.clone(),
                ca_pem: t.ca_pem.clone(),
                insecure_skip_verify: t.insecure_skip_verify,
            }),
        }
    }

    fn consumer(&mut self, i: usize, consumer: &doc::Consumer) -> pb::Consumer {
        let group = consumer
            .group
            .as_deref()
            .unwrap_or(self.default_group)
            .to_owned();
        pb::Consumer {
            policy_ids: self.resolve_all(
                &format!("consumers[{i}].policies"),
                ResourceKind::Policy,
                &group,
                &consumer.policies,
            ),
            meta: Some(self.meta(
                ResourceKind::Consumer,
                consumer.id.as_deref(),
                consumer.group.as_deref(),
                &consumer.name,
                &consumer.description,
                &consumer.labels,
            )),
            custom_id: consumer.custom_id.clone(),
            disabled: consumer.disabled,
        }
    }

    fn credentials(&mut self, consumers: &'a [doc::Consumer]) -> Vec<pb::Credential> {
        let mut out = Vec::new();
        for (i, consumer) in consumers.iter().enumerate() {
            let group = consumer.group.as_deref().unwrap_or(self.default_group);
            let consumer_id = self
                .ids
                .get(&(ResourceKind::Consumer, group, consumer.name.as_str()))
                .cloned()
                .unwrap_or_default();
            for (j, credential) in consumer.credentials.iter().enumerate() {
                let base = format!("consumers[{i}].credentials[{j}]");
                out.push(self.credential(&base, group, &consumer_id, credential));
                self.locator.credentials.push(base);
            }
        }
        out
    }

    fn credential(
        &mut self,
        base: &str,
        group: &str,
        consumer_id: &str,
        credential: &doc::Credential,
    ) -> pb::Credential {
        use pb::credential::Kind;
        self.at_most_one(
            base,
            &[
                ("api_key", credential.api_key.is_some()),
                ("jwt", credential.jwt.is_some()),
                ("mtls", credential.mtls.is_some()),
            ],
        );
        let (kind, identity) = if let Some(key) = &credential.api_key {
            let api_key = self.api_key(&format!("{base}.api_key"), key);
            let identity = format!(
                "api-key-{}",
                &api_key.key_sha256.get(..12).unwrap_or_default()
            );
            (Some(Kind::ApiKey(api_key)), identity)
        } else if let Some(jwt) = &credential.jwt {
            let digest = hex::encode(Sha256::digest(format!(
                "{}\u{0}{}",
                jwt.issuer, jwt.subject
            )));
            (
                Some(Kind::Jwt(pb::JwtCredential {
                    issuer: jwt.issuer.clone(),
                    subject: jwt.subject.clone(),
                })),
                format!("jwt-{}", &digest[..12]),
            )
        } else if let Some(mtls) = &credential.mtls {
            // The CA joins the name only when set, so names derived before it existed stay.
            let mut identity = format!("{}\u{0}{}", mtls.subject, mtls.fingerprint_sha256);
            if !mtls.ca_sha256.is_empty() {
                identity = format!("{identity}\u{0}{}", mtls.ca_sha256);
            }
            let digest = hex::encode(Sha256::digest(identity));
            (
                Some(Kind::Mtls(pb::MtlsCredential {
                    subject: mtls.subject.clone(),
                    fingerprint_sha256: mtls.fingerprint_sha256.clone(),
                    ca_sha256: mtls.ca_sha256.clone(),
                })),
                format!("mtls-{}", &digest[..12]),
            )
        } else {
            (None, "credential".to_owned())
        };
        let name = credential.name.clone().unwrap_or(identity);
        pb::Credential {
            meta: Some(self.meta(
                ResourceKind::Credential,
                credential.id.as_deref(),
                Some(group),
                &name,
                "",
                &Default::default(),
            )),
            consumer_id: consumer_id.to_owned(),
            kind,
            expires_at: self
                .timestamp(format!("{base}.expires_at"), credential.expires_at.as_ref()),
            revoked: credential.revoked,
        }
    }

    fn api_key(&mut self, path: &str, key: &doc::ApiKey) -> pb::ApiKeyCredential {
        match (&key.key, &key.key_sha256) {
            (Some(plain), None) => {
                if plain.chars().count() < MIN_API_KEY_LEN {
                    self.error(
                        format!("{path}.key"),
                        format!("must be at least {MIN_API_KEY_LEN} characters"),
                    );
                }
                let prefix = key
                    .prefix
                    .clone()
                    .unwrap_or_else(|| plain.chars().take(API_KEY_PREFIX_LEN).collect());
                pb::ApiKeyCredential {
                    key_sha256: hash_api_key(plain),
                    prefix,
                }
            }
            (None, Some(hash)) => pb::ApiKeyCredential {
                key_sha256: hash.clone(),
                prefix: key.prefix.clone().unwrap_or_default(),
            },
            (Some(_), Some(_)) => {
                self.error(
                    path.to_owned(),
                    "sets key and key_sha256; exactly one is allowed",
                );
                pb::ApiKeyCredential::default()
            }
            (None, None) => {
                self.error(path.to_owned(), "needs key or key_sha256");
                pb::ApiKeyCredential::default()
            }
        }
    }

    fn rate_limits(&mut self, limits: &[doc::RateLimit]) -> Vec<pb::RateLimit> {
        use pb::rate_limit::Period;
        enumerate(limits, |_, l| pb::RateLimit {
            limit: l.limit,
            period: match l.per {
                doc::Period::Second => Period::Second,
                doc::Period::Minute => Period::Minute,
                doc::Period::Hour => Period::Hour,
                doc::Period::Day => Period::Day,
            } as i32,
            burst: l.burst,
        })
    }

    fn plan(&mut self, _i: usize, plan: &doc::Plan) -> pb::Plan {
        pb::Plan {
            meta: Some(self.meta(
                ResourceKind::Plan,
                plan.id.as_deref(),
                plan.group.as_deref(),
                &plan.name,
                &plan.description,
                &plan.labels,
            )),
            rate_limits: self.rate_limits(&plan.rate_limits),
            monthly_quota: plan.monthly_quota,
            scopes: plan.scopes.clone(),
            mode: rate_limit_mode(plan.mode) as i32,
            fail_open: plan.fail_open,
        }
    }

    fn subscription(&mut self, i: usize, s: &doc::Subscription) -> pb::Subscription {
        use pb::subscription::Status;
        let base = format!("subscriptions[{i}]");
        let group = s.group.as_deref().unwrap_or(self.default_group).to_owned();
        let name = s
            .name
            .clone()
            .unwrap_or_else(|| format!("{}.{}", s.consumer, s.api));
        pb::Subscription {
            meta: Some(self.meta(
                ResourceKind::Subscription,
                s.id.as_deref(),
                Some(&group),
                &name,
                "",
                &s.labels,
            )),
            consumer_id: self.resolve(
                format!("{base}.consumer"),
                ResourceKind::Consumer,
                &group,
                &s.consumer,
            ),
            api_id: self.resolve(format!("{base}.api"), ResourceKind::Api, &group, &s.api),
            plan_id: self.resolve(format!("{base}.plan"), ResourceKind::Plan, &group, &s.plan),
            status: match s.status {
                None => Status::Unspecified,
                Some(doc::SubscriptionStatus::Active) => Status::Active,
                Some(doc::SubscriptionStatus::Suspended) => Status::Suspended,
            } as i32,
            expires_at: self.timestamp(format!("{base}.expires_at"), s.expires_at.as_ref()),
        }
    }

    fn policy(&mut self, i: usize, p: &doc::Policy) -> pb::Policy {
        use pb::policy::Kind;
        let base = format!("policies[{i}]");
        self.at_most_one(
            &base,
            &[
                ("key_auth", p.key_auth.is_some()),
                ("jwt", p.jwt.is_some()),
                ("mtls", p.mtls.is_some()),
                ("rate_limit", p.rate_limit.is_some()),
                ("cors", p.cors.is_some()),
                ("ip_restriction", p.ip_restriction.is_some()),
                ("request_size", p.request_size.is_some()),
            ],
        );
        let kind = if let Some(k) = &p.key_auth {
            Some(Kind::KeyAuth(pb::KeyAuthPolicy {
                headers: k.headers.clone(),
                query_params: k.query_params.clone(),
                hide_credentials: k.hide_credentials,
            }))
        } else if let Some(jwt) = &p.jwt {
            Some(Kind::Jwt(pb::JwtPolicy {
                issuers: enumerate(&jwt.issuers, |j, issuer| {
                    self.jwt_issuer(&format!("{base}.jwt.issuers[{j}]"), issuer)
                }),
            }))
        } else if let Some(m) = &p.mtls {
            Some(Kind::Mtls(pb::MtlsPolicy {
                ca_pem: m.ca_pem.clone(),
            }))
        } else if let Some(r) = &p.rate_limit {
            use pb::rate_limit_policy::Scope;
            Some(Kind::RateLimit(pb::RateLimitPolicy {
                limits: self.rate_limits(&r.limits),
                scope: match r.scope {
                    None => Scope::Unspecified,
                    Some(doc::RateLimitScope::Consumer) => Scope::Consumer,
                    Some(doc::RateLimitScope::Api) => Scope::Api,
                    Some(doc::RateLimitScope::Ip) => Scope::Ip,
                } as i32,
                mode: rate_limit_mode(r.mode) as i32,
                fail_open: r.fail_open,
            }))
        } else if let Some(c) = &p.cors {
            Some(Kind::Cors(pb::CorsPolicy {
                allow_origins: c.allow_origins.clone(),
                allow_methods: c.allow_methods.clone(),
                allow_headers: c.allow_headers.clone(),
                expose_headers: c.expose_headers.clone(),
                allow_credentials: c.allow_credentials,
                max_age_s: self.duration_s(format!("{base}.cors.max_age"), c.max_age.as_ref()),
            }))
        } else if let Some(ip) = &p.ip_restriction {
            Some(Kind::IpRestriction(pb::IpRestrictionPolicy {
                allow: ip.allow.clone(),
                deny: ip.deny.clone(),
            }))
        } else {
            p.request_size.as_ref().map(|r| {
                Kind::RequestSize(pb::RequestSizePolicy {
                    max_body_bytes: r.max_body_bytes,
                })
            })
        };
        pb::Policy {
            meta: Some(self.meta(
                ResourceKind::Policy,
                p.id.as_deref(),
                p.group.as_deref(),
                &p.name,
                &p.description,
                &p.labels,
            )),
            kind,
        }
    }

    fn jwt_issuer(&mut self, path: &str, issuer: &doc::JwtIssuer) -> pb::JwtIssuer {
        use pb::jwt_issuer::Keys;
        self.at_most_one(
            path,
            &[
                ("jwks_url", issuer.jwks_url.is_some()),
                ("jwks", issuer.jwks.is_some()),
            ],
        );
        pb::JwtIssuer {
            issuer: issuer.issuer.clone(),
            audiences: issuer.audiences.clone(),
            algorithms: issuer.algorithms.clone(),
            keys: issuer
                .jwks_url
                .clone()
                .map(Keys::JwksUrl)
                .or_else(|| issuer.jwks.as_ref().map(|j| Keys::JwksJson(j.to_string()))),
            leeway_s: self.duration_s(format!("{path}.leeway"), issuer.leeway.as_ref()),
            consumer_claim: issuer.consumer_claim.clone(),
            jwks_refresh_s: self
                .duration_s(format!("{path}.jwks_refresh"), issuer.jwks_refresh.as_ref()),
            claim_headers: issuer
                .claim_headers
                .iter()
                .map(|(claim, header)| (claim.clone(), header.clone()))
                .collect(),
        }
    }

    fn broker(&mut self, i: usize, b: &doc::Broker) -> pb::Broker {
        use pb::broker::Kind;
        self.at_most_one(
            &format!("brokers[{i}]"),
            &[("kafka", b.kafka.is_some()), ("memory", b.memory.is_some())],
        );
        let kind = if let Some(k) = &b.kafka {
            Some(Kind::Kafka(pb::KafkaBroker {
                bootstrap_servers: k.bootstrap_servers.clone(),
                properties: k.properties.clone(),
            }))
        } else {
            b.memory.as_ref().map(|m| {
                Kind::Memory(pb::MemoryBroker {
                    retained_events: m.retained_events.unwrap_or(0),
                })
            })
        };
        pb::Broker {
            meta: Some(self.meta(
                ResourceKind::Broker,
                b.id.as_deref(),
                b.group.as_deref(),
                &b.name,
                &b.description,
                &b.labels,
            )),
            kind,
        }
    }
}

impl Normalizer<'_> {
    fn certificate(&mut self, _i: usize, c: &doc::Certificate) -> pb::Certificate {
        pb::Certificate {
            meta: Some(self.meta(
                ResourceKind::Certificate,
                c.id.as_deref(),
                c.group.as_deref(),
                &c.name,
                &c.description,
                &c.labels,
            )),
            cert_pem: c.cert_pem.clone(),
            key_pem: c.key_pem.clone(),
            snis: c.snis.iter().map(|s| s.to_ascii_lowercase()).collect(),
        }
    }
}

/// "GET,POST /users/{id}", or "* /users" for any method.
fn default_route_name(route: &doc::Route) -> String {
    let methods = if route.methods.is_empty() {
        "*".to_owned()
    } else {
        route.methods.join(",")
    };
    format!("{methods} {}", route.path)
}

/// Formats milliseconds the way documents write durations ("250ms", "5s", "1m 30s").
pub fn format_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

fn rate_limit_mode(mode: Option<doc::RateLimitMode>) -> pb::rate_limit_policy::Mode {
    use pb::rate_limit_policy::Mode;
    match mode {
        None => Mode::Unspecified,
        Some(doc::RateLimitMode::Local) => Mode::Local,
        Some(doc::RateLimitMode::Redis) => Mode::Redis,
    }
}
