//! [`ConfigSet`] → document: the inverse of normalisation, for exports. Ids are written out
//! so that applying an export names the same resources; values equal to their defaults are
//! left out.

use std::collections::HashMap;

use super::model as doc;
use super::normalize::{DEFAULT_GROUP, format_ms};
use crate::pb::{self, ConfigSet};

/// The document that normalises back to `config` (up to resource versions).
pub fn export(config: &ConfigSet) -> doc::Document {
    let names: HashMap<&str, &str> = {
        let mut names = HashMap::new();
        crate::validate::for_each_meta(config, |_, _, meta| {
            names.insert(meta.id.as_str(), meta.name.as_str());
        });
        names
    };
    let name_of = |id: &str| names.get(id).copied().unwrap_or(id).to_owned();
    let names_of = |ids: &[String]| ids.iter().map(|id| name_of(id)).collect::<Vec<_>>();

    let mut credentials: HashMap<&str, Vec<doc::Credential>> = HashMap::new();
    for credential in &config.credentials {
        credentials
            .entry(credential.consumer_id.as_str())
            .or_default()
            .push(export_credential(credential));
    }

    doc::Document {
        format_version: doc::FORMAT_VERSION,
        group: None,
        apis: config
            .apis
            .iter()
            .map(|api| {
                let meta = api.meta.clone().unwrap_or_default();
                doc::Api {
                    routes: api
                        .routes
                        .iter()
                        .map(|r| export_route(r, &name_of, &names_of))
                        .collect(),
                    hosts: api.hosts.clone(),
                    base_path: api.base_path.clone(),
                    policies: names_of(&api.policy_ids),
                    hide_when_forbidden: api.hide_when_forbidden,
                    name: meta.name,
                    id: Some(meta.id),
                    group: group_of(&meta.group),
                    description: meta.description,
                    labels: meta.labels,
                }
            })
            .collect(),
        upstreams: config.upstreams.iter().map(export_upstream).collect(),
        consumers: config
            .consumers
            .iter()
            .map(|c| {
                let meta = c.meta.clone().unwrap_or_default();
                doc::Consumer {
                    credentials: credentials.remove(meta.id.as_str()).unwrap_or_default(),
                    custom_id: c.custom_id.clone(),
                    disabled: c.disabled,
                    policies: names_of(&c.policy_ids),
                    name: meta.name,
                    id: Some(meta.id),
                    group: group_of(&meta.group),
                    description: meta.description,
                    labels: meta.labels,
                }
            })
            .collect(),
        plans: config
            .plans
            .iter()
            .map(|p| {
                let meta = p.meta.clone().unwrap_or_default();
                doc::Plan {
                    rate_limits: p.rate_limits.iter().map(export_rate_limit).collect(),
                    monthly_quota: p.monthly_quota,
                    scopes: p.scopes.clone(),
                    mode: export_mode(p.mode),
                    fail_open: p.fail_open,
                    name: meta.name,
                    id: Some(meta.id),
                    group: group_of(&meta.group),
                    description: meta.description,
                    labels: meta.labels,
                }
            })
            .collect(),
        subscriptions: config
            .subscriptions
            .iter()
            .map(|s| {
                use pb::subscription::Status;
                let meta = s.meta.clone().unwrap_or_default();
                doc::Subscription {
                    consumer: name_of(&s.consumer_id),
                    api: name_of(&s.api_id),
                    plan: name_of(&s.plan_id),
                    status: match Status::try_from(s.status) {
                        Ok(Status::Active) => Some(doc::SubscriptionStatus::Active),
                        Ok(Status::Suspended) => Some(doc::SubscriptionStatus::Suspended),
                        _ => None,
                    },
                    expires_at: s.expires_at.as_ref().and_then(format_time),
                    name: Some(meta.name),
                    id: Some(meta.id),
                    group: group_of(&meta.group),
                    labels: meta.labels,
                }
            })
            .collect(),
        policies: config.policies.iter().map(export_policy).collect(),
        brokers: config
            .brokers
            .iter()
            .map(|b| {
                use pb::broker::Kind;
                let meta = b.meta.clone().unwrap_or_default();
                doc::Broker {
                    kafka: match &b.kind {
                        Some(Kind::Kafka(k)) => Some(doc::KafkaBroker {
                            bootstrap_servers: k.bootstrap_servers.clone(),
                            properties: k.properties.clone(),
                        }),
                        _ => None,
                    },
                    memory: match &b.kind {
                        Some(Kind::Memory(m)) => Some(doc::MemoryBroker {
                            retained_events: nonzero(m.retained_events),
                        }),
                        _ => None,
                    },
                    name: meta.name,
                    id: Some(meta.id),
                    group: group_of(&meta.group),
                    description: meta.description,
                    labels: meta.labels,
                }
            })
            .collect(),
        certificates: config
            .certificates
            .iter()
            .map(|c| {
                let meta = c.meta.clone().unwrap_or_default();
                doc::Certificate {
                    name: meta.name,
                    id: Some(meta.id),
                    group: group_of(&meta.group),
                    description: meta.description,
                    labels: meta.labels,
                    cert_pem: c.cert_pem.clone(),
                    key_pem: c.key_pem.clone(),
                    snis: c.snis.clone(),
                }
            })
            .collect(),
    }
}

fn group_of(group: &str) -> Option<String> {
    (group != DEFAULT_GROUP).then(|| group.to_owned())
}

fn nonzero<T: Default + PartialEq>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

fn duration(ms: u64) -> Option<String> {
    (ms > 0).then(|| format_ms(ms))
}

fn duration_s(s: u64) -> Option<String> {
    duration(s.saturating_mul(1000))
}

fn format_time(ts: &prost_types::Timestamp) -> Option<String> {
    crate::time::format_rfc3339(ts)
}

fn export_route(
    route: &pb::Route,
    name_of: &dyn Fn(&str) -> String,
    names_of: &dyn Fn(&[String]) -> Vec<String>,
) -> doc::Route {
    use pb::route::Action;
    let matcher = route.r#match.clone().unwrap_or_default();
    let path = matcher.path.unwrap_or_default();
    let kind = match pb::path_match::Kind::try_from(path.kind) {
        Ok(pb::path_match::Kind::Exact) => Some(doc::PathMatchKind::Exact),
        Ok(pb::path_match::Kind::Prefix) => Some(doc::PathMatchKind::Prefix),
        Ok(pb::path_match::Kind::Template) => Some(doc::PathMatchKind::Template),
        _ => None,
    };
    let inferred = if path.value.contains('{') {
        doc::PathMatchKind::Template
    } else {
        doc::PathMatchKind::Prefix
    };
    let name_match = |name: &str, value: Option<&pb::StringMatch>, invert: bool| {
        use pb::string_match::Kind;
        let kind = value.and_then(|v| v.kind.clone());
        doc::NameMatch {
            name: name.to_owned(),
            exact: match &kind {
                Some(Kind::Exact(v)) => Some(v.clone()),
                _ => None,
            },
            prefix: match &kind {
                Some(Kind::Prefix(v)) => Some(v.clone()),
                _ => None,
            },
            regex: match &kind {
                Some(Kind::Regex(v)) => Some(v.clone()),
                _ => None,
            },
            present: match &kind {
                Some(Kind::Present(v)) => Some(*v),
                _ => None,
            },
            invert,
        }
    };
    let mut out = doc::Route {
        name: Some(route.name.clone()),
        id: Some(route.id.clone()),
        path_match: kind.filter(|k| *k != inferred),
        path: path.value,
        methods: matcher.methods,
        headers: matcher
            .headers
            .iter()
            .map(|h| name_match(&h.name, h.value.as_ref(), h.invert))
            .collect(),
        query: matcher
            .query
            .iter()
            .map(|q| name_match(&q.name, q.value.as_ref(), q.invert))
            .collect(),
        priority: route.priority,
        scopes: route.scopes.clone(),
        policies: names_of(&route.policy_ids),
        ..Default::default()
    };
    match &route.action {
        Some(Action::Proxy(p)) => {
            out.proxy = Some(doc::ProxyAction {
                upstream: name_of(&p.upstream_id),
                strip_prefix: p.strip_prefix,
                path_rewrite: p.path_rewrite.clone(),
                timeout: duration(p.timeout_ms),
                canaries: p
                    .canaries
                    .iter()
                    .map(|c| doc::Canary {
                        upstream: name_of(&c.upstream_id),
                        percent: c.percent,
                        version: c.version.clone(),
                    })
                    .collect(),
                version_header: p.version_header.clone(),
                primary_version: p.primary_version.clone(),
                mirror: p.mirror.as_ref().map(|m| doc::Mirror {
                    upstream: name_of(&m.upstream_id),
                    percent: (m.percent != 100.0).then_some(m.percent),
                }),
            });
        }
        Some(Action::Publish(p)) => {
            use pb::publish_action::{Acks, CloudEvents, Delivery};
            out.publish = Some(doc::PublishAction {
                broker: name_of(&p.broker_id),
                topic: p.topic.clone(),
                key: p.key.as_ref().map(export_value_source),
                delivery: match Delivery::try_from(p.delivery) {
                    Ok(Delivery::Durable) => Some(doc::Delivery::Durable),
                    Ok(Delivery::FireAndForget) => Some(doc::Delivery::FireAndForget),
                    _ => None,
                },
                cloud_events: match CloudEvents::try_from(p.cloud_events) {
                    Ok(CloudEvents::None) => Some(doc::CloudEventsMode::None),
                    Ok(CloudEvents::Structured) => Some(doc::CloudEventsMode::Structured),
                    Ok(CloudEvents::Binary) => Some(doc::CloudEventsMode::Binary),
                    _ => None,
                },
                json_schema: (!p.json_schema.is_empty()).then(|| parse_json(&p.json_schema)),
                topic_rules: p.topic_rules.iter().map(export_topic_rule).collect(),
                acks: match Acks::try_from(p.acks) {
                    Ok(Acks::All) => Some(doc::Acks::All),
                    Ok(Acks::Leader) => Some(doc::Acks::Leader),
                    Ok(Acks::None) => Some(doc::Acks::None),
                    _ => None,
                },
            });
        }
        Some(Action::Subscribe(s)) => {
            use pb::subscribe_action::Start;
            out.subscribe = Some(doc::SubscribeAction {
                broker: name_of(&s.broker_id),
                topic: s.topic.clone(),
                start: match Start::try_from(s.default_start) {
                    Ok(Start::Latest) => Some(doc::StartPosition::Latest),
                    Ok(Start::Earliest) => Some(doc::StartPosition::Earliest),
                    _ => None,
                },
                heartbeat: duration(s.heartbeat_ms),
                websocket_publish: s.websocket_publish,
                identity_filters: s
                    .identity_filters
                    .iter()
                    .map(export_identity_filter)
                    .collect(),
                message_rate_limits: s
                    .message_rate_limits
                    .iter()
                    .map(export_rate_limit)
                    .collect(),
                websocket_json_schema: (!s.websocket_json_schema.is_empty())
                    .then(|| parse_json(&s.websocket_json_schema)),
            });
        }
        Some(Action::DirectResponse(d)) => {
            out.direct_response = Some(doc::DirectResponseAction {
                status: d.status,
                headers: d.headers.clone(),
                body: d.body.clone(),
            });
        }
        None => {}
    }
    out
}

/// JSON kept as text in the proto; a registry only holds text that parsed, so a failure here
/// keeps the text as a JSON string rather than losing it.
fn parse_json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
}

fn export_value_source(source: &pb::ValueSource) -> doc::ValueSource {
    use pb::value_source::Kind;
    let mut out = doc::ValueSource::default();
    match &source.kind {
        Some(Kind::PathParam(v)) => out.path_param = Some(v.clone()),
        Some(Kind::Header(v)) => out.header = Some(v.clone()),
        Some(Kind::JsonPointer(v)) => out.json_pointer = Some(v.clone()),
        Some(Kind::ConsumerId(v)) => out.consumer_id = Some(*v),
        None => {}
    }
    out
}

fn export_identity_filter(filter: &pb::IdentityFilter) -> doc::IdentityFilter {
    use pb::identity_filter::{Attribute, EventValue, Identity};
    let mut out = doc::IdentityFilter::default();
    match &filter.event_value {
        Some(EventValue::JsonPointer(v)) => out.json_pointer = Some(v.clone()),
        Some(EventValue::RecordHeader(v)) => out.record_header = Some(v.clone()),
        Some(EventValue::Key(v)) => out.key = Some(*v),
        None => {}
    }
    match &filter.identity {
        Some(Identity::Consumer(attribute)) => {
            out.consumer = match Attribute::try_from(*attribute) {
                Ok(Attribute::ConsumerId) => Some(doc::ConsumerAttribute::Id),
                Ok(Attribute::CustomId) => Some(doc::ConsumerAttribute::CustomId),
                Ok(Attribute::ConsumerName) => Some(doc::ConsumerAttribute::Name),
                _ => None,
            }
        }
        Some(Identity::ClaimHeader(v)) => out.claim_header = Some(v.clone()),
        None => {}
    }
    out
}

fn export_topic_rule(rule: &pb::TopicRule) -> doc::TopicRule {
    use pb::topic_rule::Condition;
    let source = rule
        .source
        .as_ref()
        .map(export_value_source)
        .unwrap_or_default();
    let mut out = doc::TopicRule {
        path_param: source.path_param,
        header: source.header,
        json_pointer: source.json_pointer,
        topic: rule.topic.clone(),
        ..Default::default()
    };
    match &rule.condition {
        Some(Condition::Equals(v)) => out.equals = Some(v.clone()),
        Some(Condition::OneOf(list)) => out.one_of = Some(list.values.clone()),
        Some(Condition::Regex(v)) => out.regex = Some(v.clone()),
        None => {}
    }
    out
}

fn export_upstream(u: &pb::Upstream) -> doc::Upstream {
    use pb::load_balancing::{Algorithm, HashOn};
    let meta = u.meta.clone().unwrap_or_default();
    doc::Upstream {
        targets: u
            .targets
            .iter()
            .map(|t| doc::Target {
                url: t.url.clone(),
                weight: nonzero(t.weight),
            })
            .collect(),
        load_balancing: u.load_balancing.as_ref().map(|lb| doc::LoadBalancing {
            algorithm: match Algorithm::try_from(lb.algorithm) {
                Ok(Algorithm::LeastRequest) => doc::LbAlgorithm::LeastRequest,
                Ok(Algorithm::ConsistentHash) => doc::LbAlgorithm::ConsistentHash,
                _ => doc::LbAlgorithm::RoundRobin,
            },
            hash_header: match &lb.hash_on {
                Some(HashOn::Header(h)) => Some(h.clone()),
                _ => None,
            },
            hash_cookie: match &lb.hash_on {
                Some(HashOn::Cookie(c)) => Some(c.clone()),
                _ => None,
            },
        }),
        timeouts: u.timeouts.as_ref().map(|t| doc::Timeouts {
            connect: duration(t.connect_ms),
            per_try: duration(t.per_try_ms),
            total: duration(t.total_ms),
        }),
        retry: u.retry.as_ref().map(|r| doc::Retry {
            attempts: r.attempts,
            on_statuses: r.on_statuses.clone(),
            backoff_base: duration(r.backoff_base_ms),
            budget_percent: nonzero(r.budget_percent),
        }),
        health_check: u.health_check.as_ref().map(|h| doc::HealthCheck {
            path: h.path.clone(),
            interval: duration(h.interval_ms),
            timeout: duration(h.timeout_ms),
            healthy_threshold: nonzero(h.healthy_threshold),
            unhealthy_threshold: nonzero(h.unhealthy_threshold),
            expected_statuses: h.expected_statuses.clone(),
        }),
        circuit_breaker: u.circuit_breaker.as_ref().map(|c| doc::CircuitBreaker {
            failure_threshold: c.failure_threshold,
            open_for: duration(c.open_ms),
            half_open_requests: nonzero(c.half_open_requests),
        }),
        outlier_detection: u.outlier_detection.as_ref().map(|o| doc::OutlierDetection {
            consecutive_failures: o.consecutive_failures,
            base_ejection: duration(o.base_ejection_ms),
            max_ejection_percent: nonzero(o.max_ejection_percent),
        }),
        max_concurrent_requests: u.max_concurrent_requests,
        protocol: match pb::UpstreamProtocol::try_from(u.protocol) {
            Ok(pb::UpstreamProtocol::Auto) => Some(doc::UpstreamProtocol::Auto),
            Ok(pb::UpstreamProtocol::Http1) => Some(doc::UpstreamProtocol::Http1),
            Ok(pb::UpstreamProtocol::Http2) => Some(doc::UpstreamProtocol::Http2),
            _ => None,
        },
        tls: u.tls.as_ref().map(|t| doc::UpstreamTls {
            server_name: t.server_name.clone(),
            ca_pem: t.ca_pem.clone(),
            insecure_skip_verify: t.insecure_skip_verify,
        }),
        name: meta.name,
        id: Some(meta.id),
        group: group_of(&meta.group),
        description: meta.description,
        labels: meta.labels,
    }
}

fn export_credential(c: &pb::Credential) -> doc::Credential {
    use pb::credential::Kind;
    let meta = c.meta.clone().unwrap_or_default();
    let mut out = doc::Credential {
        name: Some(meta.name),
        id: Some(meta.id),
        expires_at: c.expires_at.as_ref().and_then(format_time),
        revoked: c.revoked,
        ..Default::default()
    };
    match &c.kind {
        Some(Kind::ApiKey(k)) => {
            out.api_key = Some(doc::ApiKey {
                key: None,
                key_sha256: Some(k.key_sha256.clone()),
                prefix: (!k.prefix.is_empty()).then(|| k.prefix.clone()),
            });
        }
        Some(Kind::Jwt(j)) => {
            out.jwt = Some(doc::JwtSubject {
                issuer: j.issuer.clone(),
                subject: j.subject.clone(),
            });
        }
        Some(Kind::Mtls(m)) => {
            out.mtls = Some(doc::MtlsSubject {
                subject: m.subject.clone(),
                fingerprint_sha256: m.fingerprint_sha256.clone(),
                ca_sha256: m.ca_sha256.clone(),
            });
        }
        None => {}
    }
    out
}

fn export_rate_limit(l: &pb::RateLimit) -> doc::RateLimit {
    use pb::rate_limit::Period;
    doc::RateLimit {
        limit: l.limit,
        per: match Period::try_from(l.period) {
            Ok(Period::Minute) => doc::Period::Minute,
            Ok(Period::Hour) => doc::Period::Hour,
            Ok(Period::Day) => doc::Period::Day,
            _ => doc::Period::Second,
        },
        burst: l.burst,
    }
}

fn export_policy(p: &pb::Policy) -> doc::Policy {
    use pb::policy::Kind;
    let meta = p.meta.clone().unwrap_or_default();
    let mut out = doc::Policy {
        name: meta.name,
        id: Some(meta.id),
        group: group_of(&meta.group),
        description: meta.description,
        labels: meta.labels,
        ..Default::default()
    };
    match &p.kind {
        Some(Kind::KeyAuth(k)) => {
            out.key_auth = Some(doc::KeyAuthPolicy {
                headers: k.headers.clone(),
                query_params: k.query_params.clone(),
                hide_credentials: k.hide_credentials,
            });
        }
        Some(Kind::Jwt(j)) => {
            out.jwt = Some(doc::JwtPolicy {
                issuers: j
                    .issuers
                    .iter()
                    .map(|i| {
                        use pb::jwt_issuer::Keys;
                        doc::JwtIssuer {
                            issuer: i.issuer.clone(),
                            audiences: i.audiences.clone(),
                            algorithms: i.algorithms.clone(),
                            jwks_url: match &i.keys {
                                Some(Keys::JwksUrl(u)) => Some(u.clone()),
                                _ => None,
                            },
                            jwks: match &i.keys {
                                Some(Keys::JwksJson(j)) => Some(parse_json(j)),
                                _ => None,
                            },
                            leeway: duration_s(i.leeway_s),
                            consumer_claim: i.consumer_claim.clone(),
                            jwks_refresh: duration_s(i.jwks_refresh_s),
                            claim_headers: i
                                .claim_headers
                                .iter()
                                .map(|(c, h)| (c.clone(), h.clone()))
                                .collect(),
                        }
                    })
                    .collect(),
            });
        }
        Some(Kind::Mtls(m)) => {
            out.mtls = Some(doc::MtlsPolicy {
                ca_pem: m.ca_pem.clone(),
            })
        }
        Some(Kind::RateLimit(r)) => {
            use pb::rate_limit_policy::Scope;
            out.rate_limit = Some(doc::RateLimitPolicy {
                limits: r.limits.iter().map(export_rate_limit).collect(),
                scope: match Scope::try_from(r.scope) {
                    Ok(Scope::Consumer) => Some(doc::RateLimitScope::Consumer),
                    Ok(Scope::Api) => Some(doc::RateLimitScope::Api),
                    Ok(Scope::Ip) => Some(doc::RateLimitScope::Ip),
                    _ => None,
                },
                mode: export_mode(r.mode),
                fail_open: r.fail_open,
            });
        }
        Some(Kind::Cors(c)) => {
            out.cors = Some(doc::CorsPolicy {
                allow_origins: c.allow_origins.clone(),
                allow_methods: c.allow_methods.clone(),
                allow_headers: c.allow_headers.clone(),
                expose_headers: c.expose_headers.clone(),
                allow_credentials: c.allow_credentials,
                max_age: duration_s(c.max_age_s),
            });
        }
        Some(Kind::IpRestriction(ip)) => {
            out.ip_restriction = Some(doc::IpRestrictionPolicy {
                allow: ip.allow.clone(),
                deny: ip.deny.clone(),
            });
        }
        Some(Kind::RequestSize(r)) => {
            out.request_size = Some(doc::RequestSizePolicy {
                max_body_bytes: r.max_body_bytes,
            });
        }
        None => {}
    }
    out
}

/// One resource in the document's vocabulary, as JSON: what diffs and the REST API show.
/// References appear as the ids they hold (no other resource is at hand to name them); a
/// credential carries its `consumer` id.
pub fn export_resource(resource: &pb::Resource) -> serde_json::Value {
    use pb::resource::Kind;
    let to_value = |v: Result<serde_json::Value, serde_json::Error>| v.unwrap_or_default();
    if let Some(Kind::Credential(credential)) = &resource.kind {
        let mut value = to_value(serde_json::to_value(export_credential(credential)));
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("consumer".into(), credential.consumer_id.clone().into());
            let group = credential
                .meta
                .as_ref()
                .map(|m| m.group.clone())
                .unwrap_or_default();
            if let Some(group) = group_of(&group) {
                map.insert("group".into(), group.into());
            }
        }
        return value;
    }
    let set: ConfigSet = std::iter::once(resource.clone()).collect();
    let list = crate::validate::list_name(resource.kind());
    let document = to_value(serde_json::to_value(export(&set)));
    document
        .get(list)
        .and_then(|items| items.get(0))
        .cloned()
        .unwrap_or_default()
}

fn export_mode(mode: i32) -> Option<doc::RateLimitMode> {
    use pb::rate_limit_policy::Mode;
    match Mode::try_from(mode) {
        Ok(Mode::Local) => Some(doc::RateLimitMode::Local),
        Ok(Mode::Redis) => Some(doc::RateLimitMode::Redis),
        _ => None,
    }
}
