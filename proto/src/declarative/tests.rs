use prost::Message;

use super::*;
use crate::pb::ResourceKind;

const EXAMPLE: &str = include_str!("../../../deploy/examples/sluice.yaml");

/// The paths of the errors, in order.
fn paths(errors: &ConfigErrors) -> Vec<&str> {
    errors.iter().map(|e| e.path.as_str()).collect()
}

fn load_err(text: &str) -> ConfigErrors {
    load(text, Format::Yaml).expect_err("the document should be refused")
}

/// The reason given for `path`, failing the test if there is none.
fn reason<'a>(errors: &'a ConfigErrors, path: &str) -> &'a str {
    errors
        .iter()
        .find(|e| e.path == path)
        .map(|e| e.reason.as_str())
        .unwrap_or_else(|| panic!("no error at {path}; errors: {errors}"))
}

#[test]
fn the_annotated_example_loads() {
    let config = load(EXAMPLE, Format::Yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.apis.len(), 2);
    assert_eq!(config.apis[0].routes.len(), 4);
    assert_eq!(config.credentials.len(), 2);
    let key = match &config.credentials[0].kind {
        Some(pb::credential::Kind::ApiKey(key)) => key,
        other => panic!("expected an api key, got {other:?}"),
    };
    assert_eq!(
        key.key_sha256,
        normalize::hash_api_key("acme-demo-key-0123456789")
    );
    assert_eq!(key.prefix, "acme-d");
    // Names became ids: the subscription points at the consumer, API and plan.
    let sub = &config.subscriptions[0];
    assert_eq!(
        sub.consumer_id,
        config.consumers[0].meta.as_ref().unwrap().id
    );
    assert_eq!(sub.api_id, config.apis[0].meta.as_ref().unwrap().id);
    assert_eq!(sub.plan_id, config.plans[0].meta.as_ref().unwrap().id);
    // Times keep their instant whatever offset they were written with.
    assert_eq!(sub.expires_at.as_ref().unwrap().seconds, 1_893_456_000);
    // Durations are milliseconds in the contract.
    assert_eq!(
        config.upstreams[0].timeouts.as_ref().unwrap().total_ms,
        15_000
    );
}

#[test]
fn derived_ids_are_stable_and_group_scoped() {
    let a = load(EXAMPLE, Format::Yaml).unwrap();
    let b = load(EXAMPLE, Format::Yaml).unwrap();
    assert_eq!(a, b);
    assert_eq!(content_hash(&a), content_hash(&b));
    let staging = EXAMPLE.replace("group: default ", "group: staging ");
    let c = load(&staging, Format::Yaml).unwrap();
    assert_ne!(
        a.apis[0].meta.as_ref().unwrap().id,
        c.apis[0].meta.as_ref().unwrap().id
    );
    assert_eq!(c.apis[0].meta.as_ref().unwrap().group, "staging");
}

#[test]
fn export_round_trips_through_yaml_and_json() {
    let config = load(EXAMPLE, Format::Yaml).unwrap();
    let yaml = to_yaml(&export(&config));
    let again = load(&yaml, Format::Yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(config, again, "YAML export:\n{yaml}");
    let json = serde_json::to_string_pretty(&export(&config)).unwrap();
    assert_eq!(config, load(&json, Format::Json).unwrap());
    // No plaintext key survives an export.
    assert!(!yaml.contains("acme-demo-key-0123456789"));
}

#[test]
fn proto_messages_round_trip() {
    let config = load(EXAMPLE, Format::Yaml).unwrap();
    let decoded = pb::ConfigSet::decode(config.encode_to_vec().as_slice()).unwrap();
    assert_eq!(config, decoded);

    let packed = crate::snapshot::from_config(config.clone());
    let snapshot = pb::DiscoveryResponse {
        version: 42,
        content_hash: crate::snapshot::content_hash(&packed),
        nonce: "n-1".into(),
        payload: Some(pb::discovery_response::Payload::Snapshot(packed)),
    };
    assert_eq!(
        snapshot,
        pb::DiscoveryResponse::decode(snapshot.encode_to_vec().as_slice()).unwrap()
    );

    let delta = pb::DiscoveryResponse {
        version: 43,
        content_hash: "ab".repeat(32),
        nonce: "n-2".into(),
        payload: Some(pb::discovery_response::Payload::Delta(pb::Delta {
            base_version: 42,
            upserted: Some(pb::ConfigSet {
                upstreams: config.upstreams.clone(),
                ..Default::default()
            }),
            removed: vec![pb::ResourceRef {
                kind: ResourceKind::Plan as i32,
                id: "p".into(),
            }],
            upserted_api_keys: Vec::new(),
        })),
    };
    assert_eq!(
        delta,
        pb::DiscoveryResponse::decode(delta.encode_to_vec().as_slice()).unwrap()
    );

    let nack = pb::DiscoveryRequest {
        kind: Some(pb::discovery_request::Kind::Nack(pb::Nack {
            nonce: "n-2".into(),
            version: 42,
            errors: vec![pb::ResourceError {
                resource: Some(pb::ResourceRef {
                    kind: ResourceKind::Upstream as i32,
                    id: "u".into(),
                }),
                path: "upstreams[0].targets[0].url".into(),
                reason: "no host".into(),
            }],
            message: String::new(),
        })),
    };
    assert_eq!(
        nack,
        pb::DiscoveryRequest::decode(nack.encode_to_vec().as_slice()).unwrap()
    );
}

#[test]
fn content_hash_ignores_list_order_but_not_content() {
    let config = load(EXAMPLE, Format::Yaml).unwrap();
    let mut shuffled = config.clone();
    shuffled.apis.reverse();
    shuffled.policies.reverse();
    shuffled.brokers.swap(0, 1);
    assert_eq!(content_hash(&config), content_hash(&shuffled));
    let mut changed = config.clone();
    changed.upstreams[0].targets[0].weight = 7;
    assert_ne!(content_hash(&config), content_hash(&changed));
    assert_eq!(content_hash(&config).len(), 64);
}

#[test]
fn every_shape_error_is_reported_with_its_path() {
    let text = r#"
format_version: 1
apis:
  - name: a
    colour: blue
    routes:
      - path: /x
        priority: high
        proxy: { upstream: u }
      - methods: [GET]
        path_match: fuzzy
        direct_response: { status: 200 }
upstreams:
  - name: u
    targets: [{ url: "http://127.0.0.1:1", weigth: 3 }]
brokers: {}
"#;
    let errors = load_err(text);
    assert_eq!(
        paths(&errors),
        [
            "apis[0].colour",
            "apis[0].routes[0].priority",
            "apis[0].routes[1].path",
            "apis[0].routes[1].path_match",
            "brokers",
            "upstreams[0].targets[0].weigth",
        ],
        "{errors}"
    );
    assert_eq!(reason(&errors, "apis[0].colour"), "unknown field");
    assert_eq!(reason(&errors, "apis[0].routes[1].path"), "is required");
    assert!(
        reason(&errors, "apis[0].routes[0].priority").contains("integer"),
        "{errors}"
    );
    assert!(
        reason(&errors, "apis[0].routes[1].path_match").contains("fuzzy"),
        "{errors}"
    );
    assert!(reason(&errors, "brokers").contains("array"), "{errors}");
}

#[test]
fn a_missing_or_unknown_format_version_is_refused() {
    let errors = load_err("apis: []\n");
    assert_eq!(paths(&errors), ["format_version"]);
    let errors = load_err("format_version: 2\n");
    assert_eq!(paths(&errors), ["format_version"]);
    assert!(errors.0[0].reason.contains("version 1"), "{errors}");
}

#[test]
fn every_meaning_error_is_reported_with_its_path() {
    let text = r#"
format_version: 1
apis:
  - name: shop
    hosts: ["Bad Host"]
    base_path: /v1/
    routes:
      - name: r
        path: /items/{id}/{id}
        proxy: { upstream: nowhere }
      - name: r
        path: /a/../b
        direct_response: { status: 700 }
      - name: two-actions
        path: /t
        direct_response: { status: 200 }
        proxy: { upstream: svc }
      - name: no-action
        path: /n
        headers: [{ name: x-v, regex: "(" }]
      - name: pub
        path: /p/{id}
        publish: { broker: bus, topic: "bad topic", key: { path_param: other } }
  - name: shop
    routes: []
upstreams:
  - name: svc
    targets:
      - url: http://127.0.0.1:8080/path
      - url: ftp://x
    timeouts: { connect: soon }
    load_balancing: { algorithm: consistent_hash }
brokers:
  - name: bus
    kafka: { bootstrap_servers: ["nohost"] }
policies:
  - name: jwt
    jwt:
      issuers:
        - issuer: https://i/
          algorithms: [RS256, HS256, none]
          jwks_url: https://i/jwks
  - name: ips
    ip_restriction: { allow: ["10.0.0.0/33"] }
  - name: empty
consumers:
  - name: c
    credentials:
      - api_key: { key: short }
plans:
  - name: p
    rate_limits: [{ limit: 0, per: second }]
subscriptions:
  - { consumer: c, api: shop, plan: missing }
"#;
    let errors = load_err(text);
    let expected = [
        "apis[0].base_path",
        "apis[0].hosts[0]",
        "apis[0].routes[0].path",
        "apis[0].routes[0].proxy.upstream",
        "apis[0].routes[1].direct_response.status",
        "apis[0].routes[1].name",
        "apis[0].routes[1].path",
        "apis[0].routes[2]",
        "apis[0].routes[3]",
        "apis[0].routes[3].headers[0].regex",
        "apis[0].routes[4].publish.key.path_param",
        "apis[0].routes[4].publish.topic",
        "apis[1].name",
        "brokers[0].kafka.bootstrap_servers[0]",
        "consumers[0].credentials[0].api_key.key",
        "plans[0].rate_limits[0].limit",
        "policies[0].jwt.issuers[0].algorithms",
        "policies[0].jwt.issuers[0].algorithms[2]",
        "policies[0].jwt.issuers[0].jwks_url",
        "policies[1].ip_restriction.allow[0]",
        "policies[2]",
        "subscriptions[0].plan",
        "upstreams[0].load_balancing",
        "upstreams[0].targets",
        "upstreams[0].targets[0].url",
        "upstreams[0].targets[1].url",
        "upstreams[0].timeouts.connect",
    ];
    assert_eq!(paths(&errors), expected, "{errors}");
    assert!(
        reason(&errors, "apis[0].routes[0].proxy.upstream")
            .contains("no upstream named \"nowhere\"")
    );
    assert!(reason(&errors, "apis[0].routes[2]").contains("sets proxy and direct_response"));
    assert!(reason(&errors, "apis[0].routes[3]").contains("exactly one action"));
    assert!(reason(&errors, "policies[0].jwt.issuers[0].algorithms").contains("key confusion"));
    assert!(
        reason(&errors, "policies[0].jwt.issuers[0].jwks_url").contains("inline jwks"),
        "HMAC secrets are not fetched"
    );
    assert!(reason(&errors, "apis[1].name").contains("also the name of apis[0]"));
    assert!(reason(&errors, "subscriptions[0].plan").contains("no plan named \"missing\""));
    // The display lists them all, one per line.
    assert_eq!(errors.to_string().lines().count(), expected.len() + 1);
}

#[test]
fn a_kafka_setting_named_twice_through_an_alias_is_refused() {
    let text = r#"
format_version: 1
brokers:
  - name: bus
    kafka:
      bootstrap_servers: ["127.0.0.1:9092"]
      properties:
        acks: "all"
        request.required.acks: "1"
        linger.ms: "5"
        metadata.broker.list: "127.0.0.1:9093"
        delivery.timeout.ms: "0"
  - name: fast
    kafka:
      bootstrap_servers: ["127.0.0.1:9092"]
      properties: { acks: "0", enable.idempotence: "false" }
apis:
  - name: shop
    routes:
      - name: durable
        path: /durable
        publish: { broker: fast, topic: orders }
      - name: queued
        path: /queued
        publish: { broker: fast, topic: orders, delivery: fire_and_forget }
      - name: leader
        path: /leader
        publish: { broker: fast, topic: orders, acks: leader }
      - name: talk
        path: /talk
        subscribe: { broker: fast, topic: orders, websocket_publish: true }
"#;
    let errors = load_err(text);
    let all = errors.to_string();
    assert!(
        all.contains("acks and request.required.acks are one librdkafka setting"),
        "{all}"
    );
    assert!(
        all.contains("set bootstrap.servers with bootstrap_servers"),
        "{all}"
    );
    assert!(
        !all.contains("linger.ms"),
        "one name of a setting is fine: {all}"
    );
    assert!(
        all.contains("delivery.timeout.ms is the delivery timeout"),
        "{all}"
    );
    assert_eq!(
        reason(&errors, "apis[0].routes[0].publish.acks"),
        "the broker's properties set acks 0, which sends no acknowledgement for a durable \
         publish to wait for; set acks to leader or all here, or delivery to fire_and_forget"
    );
    assert!(
        reason(&errors, "apis[0].routes[3].subscribe.websocket_publish").contains("acks 0"),
        "{all}"
    );
    assert_eq!(all.lines().count(), 6, "{all}");
}

#[test]
fn a_websocket_schema_must_be_a_schema_on_a_route_that_takes_messages() {
    let text = r#"
format_version: 1
brokers:
  - { name: local, memory: {} }
apis:
  - name: shop
    routes:
      - name: listen
        path: /listen
        subscribe: { broker: local, topic: orders, websocket_json_schema: { type: object } }
      - name: talk
        path: /talk
        subscribe:
          broker: local
          topic: orders
          websocket_publish: true
          websocket_json_schema: { type: 12 }
      - name: checked
        path: /checked
        subscribe:
          broker: local
          topic: orders
          websocket_publish: true
          websocket_json_schema: { type: object, required: [amount] }
"#;
    let errors = load_err(text);
    let all = errors.to_string();
    assert!(
        reason(&errors, "apis[0].routes[0].subscribe.websocket_json_schema")
            .contains("set websocket_publish: true"),
        "{all}"
    );
    assert!(
        reason(&errors, "apis[0].routes[1].subscribe.websocket_json_schema")
            .contains("not a valid JSON Schema"),
        "{all}"
    );
    assert_eq!(all.lines().count(), 3, "a heading and two errors: {all}");
}

#[test]
fn traffic_outlier_and_certificate_errors_name_their_fields() {
    let text = r#"
format_version: 1
upstreams:
  - name: v1
    targets: [{ url: "http://127.0.0.1:8081" }]
    outlier_detection: { consecutive_failures: 3, max_ejection_percent: 101 }
  - name: v2
    targets: [{ url: "https://127.0.0.1:8082" }]
    tls: { server_name: "Not A Host", ca_pem: "no pem here" }
apis:
  - name: shop
    routes:
      - name: split
        path: /
        proxy:
          upstream: v1
          canaries:
            - { upstream: v1, percent: 10 }
            - { upstream: v2, percent: 95, version: primary }
            - { upstream: gone, percent: 0 }
          version_header: "bad header"
          mirror: { upstream: v2, percent: 150 }
certificates:
  - name: one
    cert_pem: "not a certificate"
    key_pem: "not a key"
    snis: ["api.example.com", "*"]
  - name: two
    cert_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    key_pem: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    snis: ["API.example.com", "bad name!"]
  - name: three
    cert_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    key_pem: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    snis: []
"#;
    let errors = load_err(text);
    let expected = [
        "apis[0].routes[0].proxy.canaries",
        "apis[0].routes[0].proxy.canaries[0].upstream",
        "apis[0].routes[0].proxy.canaries[1].version",
        "apis[0].routes[0].proxy.canaries[2].percent",
        "apis[0].routes[0].proxy.canaries[2].upstream",
        "apis[0].routes[0].proxy.mirror.percent",
        "apis[0].routes[0].proxy.version_header",
        "certificates[0].cert_pem",
        "certificates[0].key_pem",
        "certificates[1].snis[0]",
        "certificates[1].snis[1]",
        "certificates[2].snis",
        "upstreams[0].outlier_detection.max_ejection_percent",
        "upstreams[1].tls.ca_pem",
        "upstreams[1].tls.server_name",
    ];
    assert_eq!(paths(&errors), expected, "{errors}");
    assert!(reason(&errors, "apis[0].routes[0].proxy.canaries").contains("105%"));
    assert!(
        reason(&errors, "apis[0].routes[0].proxy.canaries[0].upstream").contains("own upstream")
    );
    assert!(reason(&errors, "certificates[0].cert_pem").contains("no PEM certificate"));
    assert!(reason(&errors, "certificates[1].snis[0]").contains("also served by certificates[0]"));
}

#[test]
fn topic_rule_errors_name_their_fields() {
    let text = r#"
format_version: 1
brokers:
  - name: local
    memory: {}
apis:
  - name: shop
    routes:
      - name: publish
        path: /orders/{id}
        publish:
          broker: local
          topic: orders
          topic_rules:
            - { header: x-kind, equals: refund, topic: refunds }
            - { path_param: nope, one_of: [], topic: "bad topic" }
            - { json_pointer: /a, regex: "(", topic: ok }
            - { topic: none }
            - { header: x-kind, equals: a, one_of: [b], topic: both }
"#;
    let errors = load_err(text);
    let at = "apis[0].routes[0].publish.topic_rules";
    let expected = [
        format!("{at}[1].one_of"),
        format!("{at}[1].path_param"),
        format!("{at}[1].topic"),
        format!("{at}[2].regex"),
        format!("{at}[3]"),
        format!("{at}[3]"),
        format!("{at}[4]"),
    ];
    assert_eq!(paths(&errors), expected, "{errors}");
    assert!(reason(&errors, &format!("{at}[1].path_param")).contains("not captured"));
    assert!(reason(&errors, &format!("{at}[2].regex")).contains("not a valid regex"));

    let good = text
        .lines()
        .filter(|l| {
            !l.contains("nope")
                && !l.contains("\"(\"")
                && !l.contains("none")
                && !l.contains("both")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = load(&good, Format::Yaml).unwrap_or_else(|e| panic!("{e}"));
    let exported = export(&config);
    let yaml = to_yaml(&exported);
    assert!(yaml.contains("equals: refund"), "{yaml}");
    assert_eq!(
        load(&yaml, Format::Yaml).unwrap(),
        config,
        "rules survive an export"
    );
}

#[test]
fn acks_none_needs_fire_and_forget_and_acks_survive_an_export() {
    let text = r#"
format_version: 1
brokers:
  - name: local
    memory: {}
apis:
  - name: shop
    routes:
      - { name: durable-none, path: /a, publish: { broker: local, topic: a, acks: none } }
      - name: forget-none
        path: /b
        publish: { broker: local, topic: b, acks: none, delivery: fire_and_forget }
      - { name: leader, path: /c, publish: { broker: local, topic: c, acks: leader } }
"#;
    let errors = load_err(text);
    assert_eq!(
        paths(&errors),
        ["apis[0].routes[0].publish.acks"],
        "{errors}"
    );
    assert!(reason(&errors, "apis[0].routes[0].publish.acks").contains("fire_and_forget"));
    let err = load(&text.replace("acks: none }", "acks: most }"), Format::Yaml).unwrap_err();
    assert!(err.to_string().contains("most"), "{err}");

    let good = text.replace("acks: none }", "acks: all }");
    let config = load(&good, Format::Yaml).unwrap_or_else(|e| panic!("{e}"));
    let yaml = to_yaml(&export(&config));
    for acks in ["acks: all", "acks: none", "acks: leader"] {
        assert!(yaml.contains(acks), "{acks} missing from {yaml}");
    }
    assert_eq!(
        load(&yaml, Format::Yaml).unwrap(),
        config,
        "acks survive an export"
    );
}

#[test]
fn references_do_not_cross_groups() {
    let text = r#"
format_version: 1
upstreams:
  - { name: svc, group: prod, targets: [{ url: "http://127.0.0.1:1" }] }
apis:
  - name: a
    group: staging
    routes: [{ path: /, proxy: { upstream: svc } }]
"#;
    let errors = load_err(text);
    assert_eq!(paths(&errors), ["apis[0].routes[0].proxy.upstream"]);
    assert!(errors.0[0].reason.contains("group \"staging\""), "{errors}");
}

#[test]
fn syntax_errors_say_where() {
    let errors = load_err("format_version: 1\napis:\n  - name: [unclosed\n");
    assert_eq!(errors.len(), 1);
    assert!(errors.0[0].reason.contains("line"), "{errors}");
    let errors = load("{\"format_version\": 1,", Format::Json).unwrap_err();
    assert!(errors.0[0].reason.contains("line 1"), "{errors}");
    let errors = load_err("format_version: 1\nformat_version: 1\n");
    assert!(errors.0[0].reason.contains("duplicate"), "{errors}");
}

#[test]
fn an_empty_document_is_an_error_not_a_panic() {
    let errors = load_err("");
    assert_eq!(errors.len(), 1, "{errors}");
    let errors = load_err("[]");
    assert_eq!(errors.len(), 1, "{errors}");
}

#[test]
fn snapshots_are_checked_by_the_same_rules_with_resource_refs() {
    let mut config = load(EXAMPLE, Format::Yaml).unwrap();
    config.credentials[1].consumer_id = "6a1f27c4-0000-4000-8000-000000000000".into();
    config.upstreams[0].targets.clear();
    let errors = crate::validate::config_set(&config).unwrap_err();
    assert_eq!(
        paths(&errors),
        ["upstreams[0].targets", "credentials[1].consumer"],
        "{errors}"
    );
    let upstream_id = config.upstreams[0].meta.as_ref().unwrap().id.clone();
    assert_eq!(
        errors.0[0].resource,
        Some(pb::ResourceRef {
            kind: ResourceKind::Upstream as i32,
            id: upstream_id
        })
    );
}

#[test]
fn the_published_schema_is_current() {
    let published = include_str!("../../../docs/declarative.schema.json");
    let current = serde_json::to_string_pretty(&json_schema()).unwrap() + "\n";
    assert!(
        published == current,
        "docs/declarative.schema.json is stale; regenerate it with\n  \
         cargo run -q --bin sluicectl -- schema > docs/declarative.schema.json"
    );
}

#[test]
fn a_resource_without_meta_does_not_shift_the_paths_of_the_others() {
    let mut config = load(EXAMPLE, Format::Yaml).unwrap();
    config.brokers[0].meta = None;
    if let Some(meta) = config.brokers[1].meta.as_mut() {
        meta.name = "Not Valid".into();
    }
    let errors = crate::validate::config_set(&config).unwrap_err();
    assert!(paths(&errors).contains(&"brokers[0]"), "{errors}");
    assert!(paths(&errors).contains(&"brokers[1].name"), "{errors}");
}

/// The hash a node reports for `config`.
fn content_hash(config: &pb::ConfigSet) -> String {
    crate::snapshot::content_hash(&crate::snapshot::from_config(config.clone()))
}
