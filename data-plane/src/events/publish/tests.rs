//! The publish action on the memory broker: what is answered, and what reaches the topic.

use http_body_util::BodyExt;
use serde_json::json;

use super::*;
use crate::events::Kind;

fn memory_broker(metrics: &Metrics) -> Arc<Broker> {
    Broker::reuse(
        &pb::Broker {
            meta: Some(pb::Meta {
                id: "b1".into(),
                name: "events".into(),
                ..Default::default()
            }),
            kind: Some(pb::broker::Kind::Memory(pb::MemoryBroker::default())),
        },
        None,
        metrics,
    )
    .unwrap()
}

fn source(kind: pb::value_source::Kind) -> Option<pb::ValueSource> {
    Some(pb::ValueSource { kind: Some(kind) })
}

/// A publish route on topic `orders` of a fresh memory broker.
fn memory_route(action: pb::PublishAction) -> PublishRoute {
    route(&memory_broker(&Metrics::new()), action)
}

fn route(broker: &Arc<Broker>, action: pb::PublishAction) -> PublishRoute {
    let action = pb::PublishAction {
        broker_id: "b1".into(),
        topic: "orders".into(),
        ..action
    };
    PublishRoute::compile(&action, &|_| Some(broker.clone())).unwrap()
}

/// The events on the route's topic so far.
fn topic_events(route: &PublishRoute) -> Vec<Arc<crate::events::memory::StoredEvent>> {
    events_on(route, &route.topic.clone())
}

fn events_on(route: &PublishRoute, topic: &str) -> Vec<Arc<crate::events::memory::StoredEvent>> {
    match &route.broker.kind {
        Kind::Memory(memory) => memory.subscribe(&topic.into(), Some(0)).backlog,
        Kind::Kafka(_) => unreachable!("these tests use the memory broker"),
    }
}

async fn publish(
    route: &PublishRoute,
    request: Request<Full<Bytes>>,
    params: &[(&str, String)],
) -> (StatusCode, HeaderMap, Value) {
    let node = node();
    publish_on(&node, route, request, params).await
}

/// A node's metrics and idempotency store, to publish on.
fn node() -> (Arc<Metrics>, Arc<Idempotency>) {
    (
        Arc::new(Metrics::new()),
        Arc::new(Idempotency::new(Duration::from_secs(60), None)),
    )
}

/// Publishes on a node whose metrics and idempotency store outlive one request.
async fn publish_on(
    (metrics, idempotency): &(Arc<Metrics>, Arc<Idempotency>),
    route: &PublishRoute,
    request: Request<Full<Bytes>>,
    params: &[(&str, String)],
) -> (StatusCode, HeaderMap, Value) {
    let request_id = HeaderValue::from_static("req-1");
    let context = PublishContext {
        route_id: "r1",
        params,
        identity: None,
        client: std::net::Ipv4Addr::LOCALHOST.into(),
        request_id: &request_id,
        max_body_bytes: 1024,
        metrics,
        idempotency,
        tasks: &TaskTracker::new(),
    };
    let response = match route.serve(request, context).await {
        Ok(response) => response,
        Err(error) => error.to_response(&request_id),
    };
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, serde_json::from_slice(&body).unwrap())
}

fn post(body: &'static str, headers: &[(&'static str, &'static str)]) -> Request<Full<Bytes>> {
    let mut request = Request::post("/orders")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, HeaderValue::from_static(value));
    }
    request
}

#[tokio::test]
async fn a_durable_publish_answers_where_the_event_is() {
    let route = memory_route(pb::PublishAction {
        key: source(pb::value_source::Kind::PathParam("order".into())),
        ..Default::default()
    });
    let params = [("order", "o-42".to_owned())];
    let (status, _, first) = publish(
        &route,
        post(r#"{"total":3}"#, &[("content-type", "application/json")]),
        &params,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    assert_eq!(first["topic"], "orders");
    assert_eq!(first["partition"], 0);
    assert_eq!(first["offset"], 0);
    assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
    let (_, _, second) = publish(&route, post("{}", &[]), &params).await;
    assert_eq!(second["offset"], 1);
    assert_ne!(first["id"], second["id"]);

    let events = topic_events(&route);
    assert_eq!(events.len(), 2);
    let record = &events[0].record;
    assert_eq!(record.key.as_deref(), Some(&b"o-42"[..]));
    assert_eq!(&record.value[..], br#"{"total":3}"#);
    let header = |name: &str| {
        record
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("sluice-event-id").as_deref(), first["id"].as_str());
    assert_eq!(header("sluice-request-id").as_deref(), Some("req-1"));
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    assert!(header("traceparent").unwrap().starts_with("00-"));
}

#[tokio::test]
async fn a_schema_violation_lists_each_error_and_publishes_nothing() {
    let metrics = Metrics::new();
    let broker = memory_broker(&metrics);
    let schema = json!({
        "type": "object",
        "required": ["total"],
        "properties": {"total": {"type": "number"}, "items": {"type": "array", "items": {"type": "string"}}}
    });
    let route = route(
        &broker,
        pb::PublishAction {
            json_schema: schema.to_string(),
            ..Default::default()
        },
    );
    let (status, headers, problem) = publish(&route, post(r#"{"items":["a",7]}"#, &[]), &[]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(
        problem["type"],
        "https://sluice.dev/problems/schema-violation"
    );
    let pointers: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert!(pointers.contains(&""), "the missing `total`: {pointers:?}");
    assert!(
        pointers.contains(&"/items/1"),
        "the number among strings: {pointers:?}"
    );
    let (status, _, problem) = publish(&route, post("not json", &[]), &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert!(
        topic_events(&route).is_empty(),
        "rejected events never reach the topic"
    );

    let (status, _, _) = publish(&route, post(r#"{"total":1}"#, &[]), &[]).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(topic_events(&route).len(), 1);
}

#[tokio::test]
async fn structured_cloudevents_keep_their_id_and_the_schema_checks_their_data() {
    let route = memory_route(pb::PublishAction {
        cloud_events: pb::publish_action::CloudEvents::Structured as i32,
        json_schema: json!({"type": "object", "required": ["total"]}).to_string(),
        key: source(pb::value_source::Kind::JsonPointer("/subject".into())),
        ..Default::default()
    });
    let ce = [("content-type", "application/cloudevents+json")];
    let (status, _, body) = publish(
        &route,
        post(
            r#"{"specversion":"1.0","id":"ev-9","source":"/shop","type":"order","subject":"o-1","data":{"total":5}}"#,
            &ce,
        ),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["id"], "ev-9");
    let (status, _, problem) = publish(
        &route,
        post(
            r#"{"specversion":"1.0","id":"ev-10","source":"/shop","type":"order","subject":"o-1","data":{}}"#,
            &ce,
        ),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    let (status, _, _) = publish(
        &route,
        post("{}", &[("content-type", "application/json")]),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let events = topic_events(&route);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].record.key.as_deref(), Some(&b"o-1"[..]));
}

#[tokio::test]
async fn oversized_bodies_and_missing_keys_are_refused() {
    let route = memory_route(pb::PublishAction {
        key: source(pb::value_source::Kind::Header("x-order".into())),
        ..Default::default()
    });
    let big: &'static str = Box::leak("x".repeat(2000).into_boxed_str());
    let (status, _, _) = publish(&route, post(big, &[("x-order", "1")]), &[]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _, problem) = publish(&route, post("{}", &[]), &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("header x-order is required"),
        "{problem}"
    );
    assert!(topic_events(&route).is_empty());
}

#[tokio::test]
async fn topic_rules_pick_the_topic_in_order_and_the_route_topic_is_the_default() {
    use pb::topic_rule::Condition;
    let metrics = Metrics::new();
    let broker = memory_broker(&metrics);
    let rule = |kind, condition, topic: &str| pb::TopicRule {
        source: Some(pb::ValueSource { kind: Some(kind) }),
        condition: Some(condition),
        topic: topic.into(),
    };
    let route = route(
        &broker,
        pb::PublishAction {
            topic_rules: vec![
                rule(
                    pb::value_source::Kind::Header("x-kind".into()),
                    Condition::Equals("refund".into()),
                    "refunds",
                ),
                rule(
                    pb::value_source::Kind::JsonPointer("/region".into()),
                    Condition::OneOf(pb::StringList {
                        values: vec!["eu".into(), "uk".into()],
                    }),
                    "europe",
                ),
                rule(
                    pb::value_source::Kind::PathParam("order".into()),
                    Condition::Regex("vip-[0-9]+".into()),
                    "vip",
                ),
            ],
            ..Default::default()
        },
    );
    let params = [("order", "vip-12".to_owned())];
    let plain = [("order", "o-12".to_owned())];
    let cases = [
        (
            post(r#"{"region":"eu"}"#, &[("x-kind", "refund")]),
            &params,
            "refunds",
        ),
        (post(r#"{"region":"uk"}"#, &[]), &params, "europe"),
        (post(r#"{"region":"us"}"#, &[]), &params, "vip"),
        (post(r#"{"region":"us"}"#, &[]), &plain, "orders"),
        // The regex is anchored: "vip-12x" does not match.
        (
            post("{}", &[]),
            &[("order", "vip-12x".to_owned())],
            "orders",
        ),
    ];
    for (request, params, topic) in cases {
        let (status, _, body) = publish(&route, request, params.as_slice()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["topic"], topic, "{body}");
    }
    assert_eq!(events_on(&route, "refunds").len(), 1);
    assert_eq!(events_on(&route, "europe").len(), 1);
    assert_eq!(events_on(&route, "vip").len(), 1);
    assert_eq!(events_on(&route, "orders").len(), 2);
}

#[tokio::test]
async fn publishes_are_counted_under_the_topic_their_event_went_to() {
    use pb::topic_rule::Condition;
    let node = node();
    let broker = memory_broker(&node.0);
    let route = route(
        &broker,
        pb::PublishAction {
            topic_rules: vec![pb::TopicRule {
                source: source(pb::value_source::Kind::JsonPointer("/kind".into())),
                condition: Some(Condition::Equals("refund".into())),
                topic: "refunds".into(),
            }],
            ..Default::default()
        },
    );
    let refund = r#"{"kind":"refund"}"#;
    for request in [
        post(refund, &[]),
        post(refund, &[("idempotency-key", "k1")]),
        // A repeat: answered from the first, and the rule's topic is still its topic.
        post(refund, &[("idempotency-key", "k1")]),
        post(r#"{"kind":"order"}"#, &[]),
        // Refused before a topic is chosen: counted under the route's topic.
        post("not json", &[]),
    ] {
        publish_on(&node, &route, request, &[]).await;
    }
    assert_eq!(events_on(&route, "refunds").len(), 2);
    assert_eq!(events_on(&route, "orders").len(), 1);
    let text = node.0.encode();
    let count = |labels: &str| {
        let line = format!("sluice_event_publishes_total{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .unwrap_or_else(|| panic!("no {line} in:\n{text}"))
            .to_owned()
    };
    assert_eq!(count(r#"topic="refunds",outcome="acknowledged""#), "2");
    assert_eq!(count(r#"topic="refunds",outcome="replayed""#), "1");
    assert_eq!(count(r#"topic="orders",outcome="acknowledged""#), "1");
    assert_eq!(count(r#"topic="orders",outcome="rejected""#), "1");
    assert!(
        text.contains(r#"sluice_event_publish_duration_seconds_count{topic="refunds"} 3"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_reused_idempotency_key_is_noticed_in_the_headers_that_make_the_event() {
    let node = node();
    let route = route(
        &memory_broker(&node.0),
        pb::PublishAction {
            cloud_events: pb::publish_action::CloudEvents::Binary as i32,
            ..Default::default()
        },
    );
    let event = |kind: &'static str, extra: &'static str| {
        post(
            "{}",
            &[
                ("idempotency-key", "k1"),
                ("ce-specversion", "1.0"),
                ("ce-id", "e-1"),
                ("ce-source", "/shop"),
                ("ce-type", kind),
                ("user-agent", extra),
            ],
        )
    };
    let (first, _, _) = publish_on(&node, &route, event("order.paid", "a"), &[]).await;
    assert_eq!(first, StatusCode::ACCEPTED);
    // Another client header changes nothing: a repeat.
    let (again, headers, _) = publish_on(&node, &route, event("order.paid", "b"), &[]).await;
    assert_eq!(again, StatusCode::ACCEPTED);
    assert_eq!(headers["idempotency-replayed"], "true");
    // Another event type under the same key and body is another request.
    let (other, _, body) = publish_on(&node, &route, event("order.refunded", "a"), &[]).await;
    assert_eq!(other, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(topic_events(&route).len(), 1);
}

#[tokio::test]
async fn an_events_time_is_its_requests_arrival_not_the_end_of_its_upload() {
    use futures_util::StreamExt;
    let route = memory_route(pb::PublishAction::default());
    let (metrics, idempotency) = node();
    // Half the body now, the rest 600 ms later. The record's time is read from the wall
    // clock, so the wait is real.
    let parts = futures_util::stream::iter([&b"{\"total\""[..], &b":3}"[..]])
        .enumerate()
        .then(|(index, part)| async move {
            if index == 1 {
                tokio::time::sleep(Duration::from_millis(600)).await;
            }
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(part)))
        });
    let request = Request::post("/orders")
        .body(http_body_util::StreamBody::new(parts))
        .unwrap();
    let request_id = HeaderValue::from_static("req-1");
    let context = PublishContext {
        route_id: "r1",
        params: &[],
        identity: None,
        client: std::net::Ipv4Addr::LOCALHOST.into(),
        request_id: &request_id,
        max_body_bytes: 1024,
        metrics: &metrics,
        idempotency: &idempotency,
        tasks: &TaskTracker::new(),
    };
    let arrived = now_ms();
    let response = route.serve(request, context).await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert!(now_ms() - arrived >= 600);
    let record = &topic_events(&route)[0].record;
    let late = record.timestamp_ms - arrived;
    assert!(
        (0..300).contains(&late),
        "the record is stamped {late} ms after the request arrived"
    );
}
