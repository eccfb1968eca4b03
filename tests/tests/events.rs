//! The event bridge end to end: a real `sluice-dp` publishing to and streaming from a real
//! Kafka-protocol broker (tansu), checked with an independent Kafka client.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::Message;
use rdkafka::message::Headers;
use serde_json::Value;
use sluice_tests::data_plane::DataPlane;
use sluice_tests::kafka::TestTopic;
use sluice_tests::kafka_bootstrap;
use sluice_tests::ports::free_addr;
use sluice_tests::tansu::TestBroker;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A node with a Kafka broker and a publish and a subscribe route on `topic`.
fn kafka_config(bootstrap: &str, topic: &str, publish_extra: &str) -> String {
    format!(
        r#"format_version: 1
brokers:
  - name: kafka
    kafka:
      bootstrap_servers: ["{bootstrap}"]
      properties: {{ message.timeout.ms: "3000" }}
apis:
  - name: shop
    routes:
      - name: publish
        methods: [POST]
        path: /orders/{{id}}/events
        publish:
          broker: kafka
          topic: {topic}
          key: {{ path_param: id }}
{publish_extra}
      - name: stream
        methods: [GET]
        path: /stream
        path_match: exact
        subscribe:
          broker: kafka
          topic: {topic}
          heartbeat: 1s
"#
    )
}

/// A node's config with a memory broker (`memory` settings as given), a publish route
/// `POST /events` and a subscribe route `GET /stream` on topic `demo` with `subscribe`
/// settings added.
fn memory_config(memory: &str, subscribe: &str) -> String {
    format!(
        r#"format_version: 1
brokers:
  - name: local
    memory: {{ {memory} }}
apis:
  - name: demo
    routes:
      - name: publish
        methods: [POST]
        path: /events
        path_match: exact
        publish: {{ broker: local, topic: demo }}
      - name: stream
        methods: [GET]
        path: /stream
        path_match: exact
        subscribe: {{ broker: local, topic: demo{subscribe} }}
"#
    )
}

/// Publishes events `{"n":0}` … `{"n":count-1}` through `POST /events` (as in
/// [`memory_config`]), each taken.
async fn publish_to_memory(node: &DataPlane, count: usize) -> anyhow::Result<()> {
    for n in 0..count {
        let response = client()
            .post(node.url("/events"))
            .body(format!("{{\"n\":{n}}}"))
            .send()
            .await?;
        anyhow::ensure!(response.status() == 202, "event {n}: {}", response.status());
    }
    Ok(())
}

/// One SSE event as the client saw it.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Reads `count` events (heartbeats skipped) from an open SSE response, within `timeout`.
async fn read_events(
    response: &mut reqwest::Response,
    buffer: &mut String,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<SseEvent>> {
    let deadline = Instant::now() + timeout;
    let mut events = Vec::new();
    while events.len() < count {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut event = SseEvent {
                id: None,
                event: None,
                data: String::new(),
            };
            let mut has_data = false;
            for line in block.lines() {
                if let Some(id) = line.strip_prefix("id: ") {
                    event.id = Some(id.to_owned());
                } else if let Some(name) = line.strip_prefix("event: ") {
                    event.event = Some(name.to_owned());
                } else if let Some(data) = line.strip_prefix("data: ") {
                    if has_data {
                        event.data.push('\n');
                    }
                    event.data.push_str(data);
                    has_data = true;
                }
            }
            if has_data {
                events.push(event);
                if events.len() == count {
                    return Ok(events);
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, response.chunk())
            .await
            .with_context(|| {
                format!(
                    "only {} of {count} events arrived: {events:?}",
                    events.len()
                )
            })??
            .context("the stream ended")?;
        buffer.push_str(std::str::from_utf8(&chunk)?);
    }
    Ok(events)
}

async fn post_event(node: &DataPlane, order: &str, body: &str) -> anyhow::Result<(u16, Value)> {
    let response = client()
        .post(node.url(&format!("/orders/{order}/events")))
        .header("content-type", "application/json")
        .header("ce-specversion", "1.0")
        .header("ce-id", format!("ev-{order}-{body}"))
        .header("ce-source", "/shop")
        .header("ce-type", "order.updated")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(body.to_owned())
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_202_says_is_what_an_independent_consumer_reads() -> anyhow::Result<()> {
    let topic = TestTopic::create(3).await?;
    let extra =
        "          cloud_events: binary\n          json_schema: { type: object, required: [n] }";
    let node = DataPlane::start(&kafka_config(&kafka_bootstrap(), &topic.name, extra), &[])?;

    let mut accepted = Vec::new();
    for n in 0..12 {
        let order = format!("o{}", n % 4);
        let (status, body) = post_event(&node, &order, &format!("{{\"n\":{n}}}")).await?;
        assert_eq!(status, 202, "{body}");
        accepted.push((order, body));
    }
    // A schema violation is refused and never reaches the topic.
    let (status, problem) = post_event(&node, "o1", r#"{"m":1}"#).await?;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["pointer"], "");

    let consumer = topic.consumer_from_beginning()?;
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < accepted.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, consumer.recv())
            .await
            .context("not every accepted event reached the topic")??;
        let headers: BTreeMap<String, String> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        seen.insert(
            (message.partition(), message.offset()),
            (
                String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
                headers,
            ),
        );
    }
    for (order, body) in &accepted {
        let at = (
            i32::try_from(body["partition"].as_i64().unwrap())?,
            body["offset"].as_i64().unwrap(),
        );
        let (key, value, headers) = seen
            .get(&at)
            .with_context(|| format!("no record at {at:?} for {body}"))?;
        assert_eq!(key, order, "the key is the path parameter");
        let n: Value = serde_json::from_str(value)?;
        let id = body["id"].as_str().unwrap();
        assert_eq!(id, format!("ev-{order}-{value}"), "the CloudEvent's own id");
        assert_eq!(headers["ce_id"], id);
        assert_eq!(headers["ce_type"], "order.updated");
        assert_eq!(headers["ce_source"], "/shop");
        assert_eq!(headers["ce_specversion"], "1.0");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["sluice-event-id"], id);
        assert!(!headers["sluice-request-id"].is_empty());
        assert!(
            headers["traceparent"].starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "the client's trace continues into the event: {}",
            headers["traceparent"]
        );
        assert!(n["n"].is_number());
    }
    assert_eq!(
        seen.len(),
        accepted.len(),
        "exactly the accepted events, nothing else"
    );
    assert_eq!(
        node.metric("sluice_event_publishes_total", "outcome=\"acknowledged\"")
            .await?,
        12.0
    );
    assert_eq!(
        node.metric("sluice_event_publishes_total", "outcome=\"rejected\"")
            .await?,
        1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_choose_their_acks_and_their_events_arrive() -> anyhow::Result<()> {
    let topic = TestTopic::create(1).await?;
    let bootstrap = kafka_bootstrap();
    let leader = DataPlane::start(
        &kafka_config(&bootstrap, &topic.name, "          acks: leader"),
        &[],
    )?;
    let unacknowledged = DataPlane::start(
        &kafka_config(
            &bootstrap,
            &topic.name,
            "          acks: none\n          delivery: fire_and_forget",
        ),
        &[],
    )?;

    // acks=1: the leader's acknowledgement still says where the event is.
    let mut where_stored = BTreeMap::new();
    for n in 0..5 {
        let (status, body) = post_event(&leader, &format!("l{n}"), "{}").await?;
        assert_eq!(status, 202, "{body}");
        where_stored.insert(
            body["offset"].as_i64().context("an offset")?,
            format!("l{n}"),
        );
    }
    // acks=0: accepted once queued, with no position to report.
    for n in 0..5 {
        let (status, body) = post_event(&unacknowledged, &format!("n{n}"), "{}").await?;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["delivery"], "fire_and_forget", "{body}");
        assert!(body.get("offset").is_none(), "{body}");
    }

    let consumer = topic.consumer_from_beginning()?;
    let mut keys = BTreeMap::new();
    while keys.len() < 10 {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .with_context(|| format!("only {keys:?} reached the topic"))??;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        keys.insert(message.offset(), key);
    }
    for (offset, key) in &where_stored {
        assert_eq!(keys.get(offset), Some(key), "the 202 named offset {offset}");
    }
    let mut unacknowledged_keys: Vec<_> = keys.values().filter(|k| k.starts_with('n')).collect();
    unacknowledged_keys.sort();
    assert_eq!(unacknowledged_keys, ["n0", "n1", "n2", "n3", "n4"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_gets_a_prompt_503_never_a_202() -> anyhow::Result<()> {
    // Nothing listens there: the event can only time out.
    let nowhere = free_addr().to_string();
    let node = DataPlane::start(&kafka_config(&nowhere, "nowhere", ""), &[])?;
    let started = Instant::now();
    let response = client()
        .post(node.url("/orders/o1/events"))
        .body("{}")
        .send()
        .await?;
    let waited = started.elapsed();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let problem: Value = response.json().await?;
    assert_eq!(
        problem["type"],
        "https://sluice.dev/problems/broker-timeout"
    );
    // message.timeout.ms is 3 s; the answer comes with the delivery report.
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_secs(6),
        "answered after {waited:?}"
    );
    assert_eq!(
        node.metric("sluice_event_publishes_total", "outcome=\"timeout\"")
            .await?,
        1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_the_broker_takes_gets_a_prompt_413() -> anyhow::Result<()> {
    // librdkafka refuses a record over `message.max.bytes` (1,000,000) before it is sent, so
    // no broker needs to listen; the node takes bodies up to 10 MiB.
    let nowhere = free_addr().to_string();
    let node = DataPlane::start(&kafka_config(&nowhere, "nowhere", ""), &[])?;
    let body = format!("\"{}\"", "x".repeat(1_200_000));
    let started = Instant::now();
    let response = client()
        .post(node.url("/orders/o1/events"))
        .body(body)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 413);
    assert!(started.elapsed() < Duration::from_secs(2), "not prompt");
    let problem: Value = response.json().await?;
    assert_eq!(
        problem["type"],
        "https://sluice.dev/problems/event-too-large"
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or("")
            .contains("larger than broker kafka takes"),
        "{problem}"
    );
    assert_eq!(
        node.metric("sluice_event_publishes_total", "outcome=\"rejected\"")
            .await?,
        1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_on_another_node_with_no_gap_and_no_repeat() -> anyhow::Result<()> {
    let topic = TestTopic::create(2).await?;
    let config = kafka_config(&kafka_bootstrap(), &topic.name, "");
    let a = DataPlane::start(&config, &[])?;
    let b = DataPlane::start(&config, &[])?;

    for n in 0..6 {
        let (status, body) = post_event(&a, &format!("k{n}"), &format!("{{\"n\":{n}}}")).await?;
        assert_eq!(status, 202, "{body}");
    }
    // Read the first 4 events from node A, from the start of the topic.
    let mut first = client().get(a.url("/stream?start=earliest")).send().await?;
    assert_eq!(first.status().as_u16(), 200);
    assert_eq!(first.headers()["content-type"], "text/event-stream");
    let mut buffer = String::new();
    let seen = read_events(&mut first, &mut buffer, 4, Duration::from_secs(20)).await?;
    drop(first);
    let resume_at = seen.last().unwrap().id.clone().unwrap();

    // More events while the client is away.
    for n in 6..9 {
        let (status, _) = post_event(&b, &format!("k{n}"), &format!("{{\"n\":{n}}}")).await?;
        assert_eq!(status, 202);
    }
    let mut resumed = client()
        .get(b.url("/stream"))
        .header("last-event-id", &resume_at)
        .send()
        .await?;
    assert_eq!(resumed.status().as_u16(), 200);
    let mut buffer = String::new();
    let rest = read_events(&mut resumed, &mut buffer, 5, Duration::from_secs(20)).await?;

    let numbers = |events: &[SseEvent]| -> Vec<i64> {
        events
            .iter()
            .map(|e| {
                serde_json::from_str::<Value>(&e.data).unwrap()["n"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    };
    let mut all = numbers(&seen);
    all.extend(numbers(&rest));
    all.sort_unstable();
    assert_eq!(
        all,
        (0..9).collect::<Vec<_>>(),
        "every event once: {seen:?} {rest:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_subscribers_get_new_events_and_a_bad_position_is_named() -> anyhow::Result<()> {
    let topic = TestTopic::create(1).await?;
    let node = DataPlane::start(&kafka_config(&kafka_bootstrap(), &topic.name, ""), &[])?;
    let mut stream = client().get(node.url("/stream")).send().await?;
    assert_eq!(stream.status().as_u16(), 200);
    // The feed starts at the topic's end once the stream is open: wait for its first frame.
    let first = tokio::time::timeout(Duration::from_secs(10), stream.chunk()).await??;
    assert_eq!(first.as_deref(), Some(&b": ok\n\n"[..]));
    let (status, accepted) = post_event(&node, "k1", r#"{"n":1}"#).await?;
    assert_eq!(status, 202);
    let mut buffer = String::new();
    let events = read_events(&mut stream, &mut buffer, 1, Duration::from_secs(20)).await?;
    assert_eq!(events[0].data, r#"{"n":1}"#);
    assert_eq!(
        events[0].id.as_deref(),
        Some(format!("0:{}", accepted["offset"].as_i64().unwrap() + 1).as_str()),
        "the id is the position after the event"
    );
    assert_eq!(node.metric("sluice_event_subscribers", "").await?, 1.0);

    let bad = client()
        .get(node.url("/stream"))
        .header("last-event-id", "zero")
        .send()
        .await?;
    assert_eq!(bad.status().as_u16(), 400);
    let problem: Value = bad.json().await?;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Last-Event-ID"),
        "{problem}"
    );
    // Well formed, but not a position of this one-partition topic.
    for (id, reason) in [
        ("0:0,7:0", "the topic has no partition 7"),
        ("0:999999", "partition 0 ends at offset"),
    ] {
        let bad = client()
            .get(node.url("/stream"))
            .header("last-event-id", id)
            .send()
            .await?;
        assert_eq!(bad.status().as_u16(), 400, "{id}");
        let problem: Value = bad.json().await?;
        assert!(
            problem["detail"].as_str().unwrap_or("").contains(reason),
            "{id}: {problem}"
        );
    }
    Ok(())
}

/// Partitions added to a topic while its feed runs are read from their first event: by the
/// streams already open, and by a client resuming from a position that does not name them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_to_a_topic_reach_open_streams_from_their_first_event()
-> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let topic = broker.create_topic(1).await?;
    // The node looks for added partitions every 300 ms (30 s unless the broker's properties
    // say).
    let config = kafka_config(&broker.bootstrap(), &topic, "").replace(
        r#"message.timeout.ms: "3000""#,
        r#"message.timeout.ms: "3000", topic.metadata.refresh.interval.ms: "300""#,
    );
    let node = DataPlane::start(&config, &[])?;
    let mut stream = client().get(node.url("/stream")).send().await?;
    assert_eq!(stream.status().as_u16(), 200);
    let first = tokio::time::timeout(Duration::from_secs(10), stream.chunk()).await??;
    assert_eq!(first.as_deref(), Some(&b": ok\n\n"[..]));
    let (status, _) = post_event(&node, "k1", r#"{"n":1}"#).await?;
    assert_eq!(status, 202);
    let mut buffer = String::new();
    let before = read_events(&mut stream, &mut buffer, 1, Duration::from_secs(20)).await?;
    let before_id = before[0].id.clone().context("an id")?;
    assert!(!before_id.contains(','), "one partition: {before_id}");

    broker.add_partitions(&topic, 2).await?;
    // Written straight to the new partition by another client: the node's own producer may
    // not know of it yet, and a client of the topic need not publish through the gateway.
    let producer: rdkafka::producer::FutureProducer =
        sluice_tests::kafka::client_config(&broker.bootstrap()).create()?;
    let delivered = producer
        .send(
            rdkafka::producer::FutureRecord::<str, str>::to(&topic)
                .partition(1)
                .payload(r#"{"n":2}"#),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(error, _)| error)
        .with_context(|| {
            format!(
                "producing to the added partition; broker log:\n{}",
                broker.log_text()
            )
        })?;
    assert_eq!((delivered.partition, delivered.offset), (1, 0));

    let added = read_events(&mut stream, &mut buffer, 1, Duration::from_secs(10))
        .await
        .context("the open stream never read the added partition")?;
    assert_eq!(added[0].data, r#"{"n":2}"#);
    assert_eq!(
        added[0].id.as_deref(),
        Some(format!("{before_id},1:1").as_str()),
        "the id names the added partition too"
    );
    // A client that resumes from before the partition was added misses nothing in it.
    let mut resumed = client()
        .get(node.url("/stream"))
        .header("last-event-id", &before_id)
        .send()
        .await?;
    assert_eq!(resumed.status().as_u16(), 200);
    let mut resumed_buffer = String::new();
    let caught_up = read_events(
        &mut resumed,
        &mut resumed_buffer,
        1,
        Duration::from_secs(10),
    )
    .await?;
    assert_eq!(caught_up, added);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_the_shared_feed_still_holds_join_it_past_the_private_readers_limit()
-> anyhow::Result<()> {
    let topic = TestTopic::create(1).await?;
    let node = DataPlane::start(&kafka_config(&kafka_bootstrap(), &topic.name, ""), &[])?;
    let mut live = client().get(node.url("/stream")).send().await?;
    assert_eq!(live.status().as_u16(), 200);
    let first = tokio::time::timeout(Duration::from_secs(10), live.chunk()).await??;
    assert_eq!(first.as_deref(), Some(&b": ok\n\n"[..]));
    for n in 0..5 {
        let (status, body) = post_event(&node, &format!("k{n}"), &format!("{{\"n\":{n}}}")).await?;
        assert_eq!(status, 202, "{body}");
    }
    let mut buffer = String::new();
    let events = read_events(&mut live, &mut buffer, 5, Duration::from_secs(20)).await?;
    let after_second = events[1].id.clone().context("no id")?;
    // More clients reconnecting at once (as after a network blip) than a node runs private
    // readers (64): the feed still holds what they missed, so they all join it.
    let mut resuming = tokio::task::JoinSet::new();
    for _ in 0..70 {
        let (url, id) = (node.url("/stream"), after_second.clone());
        resuming.spawn(async move { client().get(url).header("last-event-id", id).send().await });
    }
    let mut resumed = Vec::new();
    while let Some(response) = resuming.join_next().await {
        let response = response??;
        assert_eq!(
            response.status().as_u16(),
            200,
            "{}",
            response.text().await.unwrap_or_default()
        );
        resumed.push(response);
    }
    for mut stream in resumed {
        let mut buffer = String::new();
        let got = read_events(&mut stream, &mut buffer, 3, Duration::from_secs(20)).await?;
        let data: Vec<&str> = got.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, [r#"{"n":2}"#, r#"{"n":3}"#, r#"{"n":4}"#]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caught_up_resumes_move_to_the_shared_feed_and_give_their_readers_back()
-> anyhow::Result<()> {
    let topic = TestTopic::create(1).await?;
    let node = DataPlane::start(&kafka_config(&kafka_bootstrap(), &topic.name, ""), &[])?;
    for n in 0..3 {
        let (status, body) = post_event(&node, &format!("k{n}"), &format!("{{\"n\":{n}}}")).await?;
        assert_eq!(status, 202, "{body}");
    }
    // Clients resuming from the topic's start on a node where nobody reads it (a wave after
    // another node stopped): each needs a reader of its own to catch up. As many as a node
    // runs (64), then more once those have caught up.
    let resume = |count: usize| {
        let mut resuming = tokio::task::JoinSet::new();
        for _ in 0..count {
            let url = node.url("/stream");
            resuming.spawn(async move {
                let mut stream = client()
                    .get(url)
                    .header("last-event-id", "0:0")
                    .send()
                    .await?;
                let status = stream.status().as_u16();
                anyhow::ensure!(status == 200, "{status}: {}", stream.text().await?);
                let mut buffer = String::new();
                let got = read_events(&mut stream, &mut buffer, 3, Duration::from_secs(30)).await?;
                let data: Vec<String> = got.into_iter().map(|e| e.data).collect();
                anyhow::ensure!(
                    data == [r#"{"n":0}"#, r#"{"n":1}"#, r#"{"n":2}"#],
                    "{data:?}"
                );
                Ok((stream, buffer))
            });
        }
        resuming.join_all()
    };
    let mut streams = Vec::new();
    for stream in resume(64).await {
        streams.push(stream?);
    }
    // Caught up, they are handed over to the shared feed and their readers are free: had the
    // first ones kept theirs, these would get 503 subscribers-busy after waiting for one.
    for stream in resume(6).await {
        streams.push(stream?);
    }
    // Every stream, handed over, goes on with the live events: no gap, no repeat.
    let (status, body) = post_event(&node, "k3", r#"{"n":3}"#).await?;
    assert_eq!(status, 202, "{body}");
    for (mut stream, mut buffer) in streams {
        let got = read_events(&mut stream, &mut buffer, 1, Duration::from_secs(20)).await?;
        assert_eq!(got[0].data, r#"{"n":3}"#);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_broker_publishes_and_streams_in_one_node() -> anyhow::Result<()> {
    let config = memory_config("retained_events: 100", ", start: earliest");
    let node = DataPlane::start(&config, &[])?;
    for n in 0..3 {
        let response = client()
            .post(node.url("/events"))
            .body(format!("event {n}"))
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 202);
        let body: Value = response.json().await?;
        assert_eq!(body["offset"], n);
    }
    let mut stream = client().get(node.url("/stream")).send().await?;
    let mut buffer = String::new();
    let events = read_events(&mut stream, &mut buffer, 3, Duration::from_secs(10)).await?;
    let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["event 0", "event 1", "event 2"]);
    assert_eq!(events[2].id.as_deref(), Some("0:3"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_ends_its_streams_at_once_with_where_to_resume() -> anyhow::Result<()> {
    let config = memory_config("retained_events: 100", ", start: earliest");
    let mut node = DataPlane::start(&config, &["--drain-timeout", "30s"])?;
    publish_to_memory(&node, 2).await?;
    let mut sse = client().get(node.url("/stream")).send().await?;
    let mut buffer = String::new();
    read_events(&mut sse, &mut buffer, 2, Duration::from_secs(10)).await?;
    let mut socket = websocket(&node, "/stream").await?;
    for _ in 0..2 {
        next_json(&mut socket).await?;
    }

    let stopped = Instant::now();
    node.process.terminate()?;
    let last = read_events(&mut sse, &mut buffer, 1, Duration::from_secs(10)).await?;
    assert_eq!(last[0].event.as_deref(), Some("sluice-closed"), "{last:?}");
    assert_eq!(last[0].id.as_deref(), Some("0:2"));
    let data: Value = serde_json::from_str(&last[0].data)?;
    assert_eq!(data["reason"], "node_stopping");
    assert_eq!(data["last_event_id"], "0:2");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), sse.chunk())
            .await??
            .is_none(),
        "the stream ends after its last event"
    );

    let message = next_json(&mut socket).await?;
    assert_eq!(message["event"], "sluice-closed");
    assert_eq!(message["reason"], "node_stopping");
    assert_eq!(message["last_event_id"], "0:2");
    assert_eq!(close_code(&mut socket).await?, 1001);
    drop(socket);

    // Nothing else held it: the node is gone long before its 30 s drain deadline.
    node.process.wait_exit(Duration::from_secs(10))?;
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "the node took {:?} to stop",
        stopped.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_when_the_callers_credential_expires() -> anyhow::Result<()> {
    // Whole seconds, as the configuration writes it.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let ends = std::time::UNIX_EPOCH + Duration::from_secs(now.as_secs() + 6);
    let config = format!(
        r#"format_version: 1
brokers:
  - name: local
    memory: {{}}
policies:
  - name: keys
    key_auth: {{ query_params: [api_key] }}
plans:
  - name: basic
consumers:
  - name: acme
    credentials:
      - api_key: {{ key: acme-key-0123456789 }}
        expires_at: "{}"
subscriptions:
  - {{ consumer: acme, api: orders, plan: basic }}
apis:
  - name: orders
    policies: [keys]
    routes:
      - name: watch
        methods: [GET]
        path: /orders
        path_match: exact
        subscribe: {{ broker: local, topic: orders, heartbeat: 30s }}
"#,
        humantime::format_rfc3339_seconds(ends)
    );
    let node = DataPlane::start(&config, &[])?;
    let url = "/orders?api_key=acme-key-0123456789";
    let mut sse = client().get(node.url(url)).send().await?;
    assert_eq!(sse.status().as_u16(), 200);
    let mut socket = websocket(&node, url).await?;
    // Streams outlive nothing of their caller's: at the key's expiry each ends, saying why
    // and where to resume.
    let mut buffer = String::new();
    let last = read_events(&mut sse, &mut buffer, 1, Duration::from_secs(10)).await?;
    assert!(
        std::time::SystemTime::now() >= ends,
        "not before the expiry"
    );
    assert_eq!(last[0].event.as_deref(), Some("sluice-closed"), "{last:?}");
    let data: Value = serde_json::from_str(&last[0].data)?;
    assert_eq!(data["reason"], "access_expired", "{data}");
    let message = next_json(&mut socket).await?;
    assert_eq!(message["reason"], "access_expired", "{message}");
    assert_eq!(close_code(&mut socket).await?, 4003);
    // And the key no longer opens one.
    let refused = client().get(node.url(url)).send().await?;
    assert_eq!(refused.status().as_u16(), 401);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_when_the_control_plane_revokes_their_caller() -> anyhow::Result<()> {
    use sluice_tests::control_plane::ControlPlane;
    let document = |revoked: bool, suspended: bool| {
        format!(
            r#"format_version: 1
brokers:
  - name: local
    memory: {{}}
policies:
  - name: keys
    key_auth: {{ query_params: [api_key] }}
plans:
  - name: basic
consumers:
  - name: acme
    credentials:
      - api_key: {{ key: acme-key-0123456789 }}
        revoked: {revoked}
  - name: globex
    credentials:
      - api_key: {{ key: globex-key-0123456789 }}
  - name: initech
    credentials:
      - api_key: {{ key: initech-key-0123456789 }}
subscriptions:
  - {{ consumer: acme, api: orders, plan: basic }}
  - {{ consumer: globex, api: orders, plan: basic, status: {} }}
  - {{ consumer: initech, api: orders, plan: basic }}
apis:
  - name: orders
    policies: [keys]
    routes:
      - name: watch
        methods: [GET]
        path: /orders
        path_match: exact
        subscribe: {{ broker: local, topic: orders, heartbeat: 30s }}
      - name: publish
        methods: [POST]
        path: /orders
        path_match: exact
        publish: {{ broker: local, topic: orders }}
"#,
            if suspended { "suspended" } else { "active" }
        )
    };
    let cp = ControlPlane::start(&[]).await?;
    cp.apply(&document(false, false)).await?;
    let node = DataPlane::start_from_control_plane(&cp.discovery_url(), "default", &[])?;
    let url = |consumer: &str| format!("/orders?api_key={consumer}-key-0123456789");
    let mut acme = client().get(node.url(&url("acme"))).send().await?;
    assert_eq!(acme.status().as_u16(), 200);
    let mut globex = websocket(&node, &url("globex")).await?;
    let mut initech = client().get(node.url(&url("initech"))).send().await?;
    assert_eq!(initech.status().as_u16(), 200);
    let (mut acme_read, mut initech_read) = (String::new(), String::new());

    // A key revoked in the control plane ends its open stream, as it refuses its next
    // request: at once, saying why and where to resume.
    let committed = Instant::now();
    cp.apply(&document(true, false)).await?;
    let last = read_events(&mut acme, &mut acme_read, 1, Duration::from_secs(10)).await?;
    let took = committed.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the stream ended {took:?} after the commit"
    );
    assert_eq!(last[0].event.as_deref(), Some("sluice-closed"), "{last:?}");
    let data: Value = serde_json::from_str(&last[0].data)?;
    assert_eq!(data["reason"], "access_revoked", "{data}");
    assert_eq!(data["cause"], "key_revoked", "{data}");
    assert!(data["last_event_id"].is_string(), "where to resume: {data}");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), acme.chunk())
            .await??
            .is_none(),
        "the stream ends after its last event"
    );

    // A subscription suspended ends its caller's WebSocket.
    let committed = Instant::now();
    cp.apply(&document(true, true)).await?;
    let message = next_json(&mut globex).await?;
    let took = committed.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the socket closed {took:?} after the commit"
    );
    assert_eq!(message["reason"], "access_revoked", "{message}");
    assert_eq!(message["cause"], "subscription_suspended", "{message}");
    assert_eq!(close_code(&mut globex).await?, 4004);

    // A caller the changes did not touch streams on.
    let published = client()
        .post(node.url(&url("initech")))
        .body(r#"{"n":1}"#)
        .send()
        .await?;
    assert_eq!(published.status().as_u16(), 202);
    let next = read_events(&mut initech, &mut initech_read, 1, Duration::from_secs(10)).await?;
    assert_eq!(next[0].event, None, "{next:?}");
    assert_eq!(next[0].data, r#"{"n":1}"#);
    // And the refused callers cannot open another.
    let refused = client().get(node.url(&url("acme"))).send().await?;
    assert_eq!(refused.status().as_u16(), 401);
    let refused = client().get(node.url(&url("globex"))).send().await?;
    assert_eq!(refused.status().as_u16(), 403);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_across_two_nodes_publishes_once() -> anyhow::Result<()> {
    let topic = TestTopic::create(1).await?;
    let redis = sluice_tests::redis::TestRedis::create().await?;
    let config = kafka_config(&kafka_bootstrap(), &topic.name, "");
    let redis_url = sluice_tests::redis_url();
    let args = [
        "--redis-url",
        redis_url.as_str(),
        "--redis-prefix",
        redis.prefix.as_str(),
        "--redis-timeout",
        "500ms",
    ];
    let a = DataPlane::start(&config, &args)?;
    let b = DataPlane::start(&config, &args)?;

    let send = |url: String| async move {
        let response = client()
            .post(url)
            .header("idempotency-key", "order-7-paid")
            .body(r#"{"paid":true}"#)
            .send()
            .await?;
        let status = response.status().as_u16();
        let body: Value = response.json().await?;
        anyhow::Ok((status, body))
    };
    let copies: Vec<_> = (0..100)
        .map(|i| {
            let node = if i % 2 == 0 { &a } else { &b };
            tokio::spawn(send(node.url("/orders/o7/events")))
        })
        .collect();
    let mut answers = Vec::new();
    for copy in copies {
        answers.push(copy.await??);
    }
    let first = &answers[0].1;
    for (status, body) in &answers {
        assert_eq!(*status, 202, "{body}");
        assert_eq!(body, first, "every copy gets the one answer");
    }
    // The same key with another body is refused.
    let response = client()
        .post(a.url("/orders/o7/events"))
        .header("idempotency-key", "order-7-paid")
        .body(r#"{"paid":false}"#)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 422);

    // Exactly one record: the topic's end offset is 1 once it arrived.
    let consumer = topic.consumer_from_beginning()?;
    let record = tokio::time::timeout(Duration::from_secs(20), consumer.recv()).await??;
    assert_eq!(record.offset(), first["offset"].as_i64().unwrap());
    assert!(
        tokio::time::timeout(Duration::from_secs(3), consumer.recv())
            .await
            .is_err(),
        "a second record reached the topic"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_publish_gets_the_first_answer_on_its_retry() -> anyhow::Result<()>
{
    let topic = TestTopic::create(1).await?;
    // The producer holds each record 4 s before sending it, so the first client can leave
    // while its publish waits for the broker (and not before its key is claimed: it waits 1 s).
    let config = kafka_config(&kafka_bootstrap(), &topic.name, "").replace(
        r#"properties: { message.timeout.ms: "3000" }"#,
        r#"properties: { message.timeout.ms: "10000", linger.ms: "4000" }"#,
    );
    let node = DataPlane::start(&config, &[])?;
    let send = |client: reqwest::Client| {
        client
            .post(node.url("/orders/o8/events"))
            .header("idempotency-key", "order-8-paid")
            .body(r#"{"paid":true}"#)
            .send()
    };
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    let left = send(impatient).await;
    assert!(
        left.as_ref().is_err_and(reqwest::Error::is_timeout),
        "the first client was to give up before the broker answered: {left:?}"
    );

    // The node finished that publish: the retry is its answer, not a second record (nor a
    // 409 while an abandoned claim waits to expire).
    let retry = send(client()).await?;
    assert_eq!(retry.status().as_u16(), 202);
    assert_eq!(
        retry
            .headers()
            .get("idempotency-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let answer: Value = retry.json().await?;
    let consumer = topic.consumer_from_beginning()?;
    let record = tokio::time::timeout(Duration::from_secs(20), consumer.recv()).await??;
    assert_eq!(Some(record.offset()), answer["offset"].as_i64(), "{answer}");
    assert!(
        tokio::time::timeout(Duration::from_secs(3), consumer.recv())
            .await
            .is_err(),
        "a second record reached the topic"
    );
    // The publish whose client left was counted, by the node that finished it.
    for (outcome, count) in [("acknowledged", 1.0), ("replayed", 1.0)] {
        let label = format!("outcome=\"{outcome}\"");
        let counted = node.metric("sluice_event_publishes_total", &label).await?;
        assert_eq!(counted, count, "{outcome}");
    }
    Ok(())
}

/// A WebSocket to `path` on `node`, handshake done.
async fn websocket(
    node: &DataPlane,
    path: &str,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    let stream = tokio::net::TcpStream::connect(node.addr).await?;
    let url = format!("ws://{}{path}", node.addr);
    let (socket, response) = tokio_tungstenite::client_async(url.as_str(), stream).await?;
    anyhow::ensure!(response.status() == 101, "handshake: {}", response.status());
    Ok(socket)
}

/// The code of the close frame that comes next (within 5 s).
async fn close_code(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> anyhow::Result<u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let close = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await?
        .context("the socket ended without a close frame")??;
    let Message::Close(Some(frame)) = close else {
        anyhow::bail!("expected a close frame, got {close:?}");
    };
    Ok(u16::from(frame.code))
}

/// The next text message, as JSON (pings skipped).
async fn next_json(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> anyhow::Result<Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .context("no message within 10 s")?
            .context("the socket closed")??;
        match message {
            Message::Text(text) => return Ok(serde_json::from_str(&text)?),
            Message::Ping(_) | Message::Pong(_) => {}
            other => anyhow::bail!("unexpected message {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscribers_read_resume_and_publish_with_acks() -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let config = r#"format_version: 1
brokers:
  - name: local
    memory: {}
apis:
  - name: demo
    routes:
      - name: publish
        methods: [POST]
        path: /events
        path_match: exact
        publish: { broker: local, topic: demo }
      - name: talk
        methods: [GET]
        path: /talk
        path_match: exact
        subscribe: { broker: local, topic: demo, start: earliest, websocket_publish: true }
      - name: listen
        methods: [GET]
        path: /listen
        path_match: exact
        subscribe: { broker: local, topic: demo, start: earliest }
"#;
    // Client messages up to 4 KiB (the node's body limit).
    let node = DataPlane::start(config, &["--max-body-bytes", "4096"])?;
    publish_to_memory(&node, 2).await?;
    let mut talk = websocket(&node, "/talk").await?;
    let first = next_json(&mut talk).await?;
    assert_eq!(first["id"], "0:1");
    assert_eq!(first["data"], serde_json::json!({"n": 0}));
    assert_eq!(next_json(&mut talk).await?["id"], "0:2");

    // A message from the client is published, acknowledged, and streamed like any event.
    talk.send(Message::text(r#"{"n":2}"#)).await?;
    let ack = next_json(&mut talk).await?;
    assert_eq!(ack["ack"], 1, "{ack}");
    assert_eq!(ack["offset"], 2, "{ack}");
    let echoed = next_json(&mut talk).await?;
    assert_eq!(
        (&echoed["id"], &echoed["data"]["n"]),
        (&"0:3".into(), &2.into())
    );

    // Resuming by position in the query (browsers cannot set headers on a WebSocket).
    let mut resumed = websocket(&node, "/listen?last_event_id=0:2").await?;
    assert_eq!(next_json(&mut resumed).await?["data"]["n"], 2);

    // A route without websocket_publish closes on a client message, with a policy code.
    resumed.send(Message::text("hello")).await?;
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), resumed.next()).await? {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => anyhow::bail!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(closed.unwrap().code), 1008);

    // A message over the limit is refused with the close code that says so; a client's own
    // close is answered.
    let closing = |mut socket: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>| async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), socket.next()).await? {
                Some(Ok(Message::Close(frame))) => break anyhow::Ok(frame),
                Some(Ok(_)) => {}
                other => anyhow::bail!("expected a close frame, got {other:?}"),
            }
        }
    };
    let mut large = websocket(&node, "/talk?start=latest").await?;
    large.send(Message::text("x".repeat(8192))).await?;
    let frame = closing(large).await?.context("a close frame with a code")?;
    assert_eq!(u16::from(frame.code), 1009, "{frame:?}");
    let mut leaving = websocket(&node, "/talk?start=latest").await?;
    leaving.send(Message::Close(None)).await?;
    closing(leaving).await?;

    // A plain GET without the upgrade still gets SSE on the same route.
    let sse = client().get(node.url("/listen")).send().await?;
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_that_break_the_routes_schema_reach_no_topic() -> anyhow::Result<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let config = r#"format_version: 1
brokers:
  - name: local
    memory: {}
apis:
  - name: demo
    routes:
      - name: talk
        methods: [GET]
        path: /talk
        path_match: exact
        subscribe:
          broker: local
          topic: demo
          start: earliest
          websocket_publish: true
          websocket_json_schema:
            type: object
            required: [amount]
            properties: { amount: { type: integer, minimum: 1 } }
"#;
    let node = DataPlane::start(config, &[])?;
    let mut talk = websocket(&node, "/talk").await?;
    talk.send(Message::text(r#"{"amount":0}"#)).await?;
    let nack = next_json(&mut talk).await?;
    assert_eq!(nack["nack"], 1, "{nack}");
    assert_eq!(nack["errors"][0]["pointer"], "/amount", "{nack}");
    talk.send(Message::binary(b"not json".to_vec())).await?;
    let nack = next_json(&mut talk).await?;
    assert_eq!(nack["nack"], 2, "{nack}");
    assert_eq!(nack["errors"][0]["pointer"], "", "{nack}");
    talk.send(Message::text(r#"{"amount":5}"#)).await?;
    let ack = next_json(&mut talk).await?;
    assert_eq!(ack["ack"], 3, "{ack}");
    // The first event on the topic is the one that passed: the refused ones reached none.
    assert_eq!(ack["offset"], 0, "{ack}");
    let event = next_json(&mut talk).await?;
    assert_eq!(event["data"], serde_json::json!({"amount": 5}), "{event}");
    let rejected = node
        .metric(
            "sluice_event_publishes_total",
            r#"topic="demo",outcome="rejected""#,
        )
        .await?;
    assert_eq!(rejected, 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_publishes_count_against_the_callers_plan() -> anyhow::Result<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let config = r#"format_version: 1
brokers:
  - name: local
    memory: {}
policies:
  - name: keys
    key_auth: { query_params: [api_key] }
plans:
  - name: basic
    rate_limits: [{ limit: 3, per: minute, burst: 2 }]
consumers:
  - name: acme
    credentials:
      - api_key: { key: acme-key-0123456789 }
subscriptions:
  - { consumer: acme, api: orders, plan: basic }
apis:
  - name: orders
    policies: [keys]
    routes:
      - name: talk
        methods: [GET]
        path: /orders
        path_match: exact
        subscribe: { broker: local, topic: orders, websocket_publish: true }
"#;
    let node = DataPlane::start(config, &[])?;
    let url = "/orders?api_key=acme-key-0123456789";
    // The handshake is one request of the plan's three; each message is one more.
    let mut talk = websocket(&node, url).await?;
    let mut answers = Vec::new();
    for n in 1..=3 {
        talk.send(Message::text(format!(r#"{{"n":{n}}}"#))).await?;
        let answer = loop {
            let message = next_json(&mut talk).await?;
            if message.get("ack").is_some() || message.get("nack").is_some() {
                break message;
            }
        };
        answers.push(answer);
    }
    assert_eq!(answers[0]["ack"], 1, "{answers:?}");
    assert_eq!(answers[1]["ack"], 2, "{answers:?}");
    assert_eq!(answers[2]["nack"], 3, "{answers:?}");
    let error = answers[2]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("rate_limited"), "{error}");
    assert!(
        answers[2]["retry_after_ms"].as_u64() > Some(0),
        "{answers:?}"
    );
    let limited = node
        .metric(
            "sluice_event_publishes_total",
            r#"topic="orders",outcome="rate_limited""#,
        )
        .await?;
    assert_eq!(limited, 1.0);
    // The budget is the one the caller's requests draw on.
    let refused = client().get(node.url(url)).send().await?;
    assert_eq!(refused.status().as_u16(), 429);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_control_guards_event_routes_and_identity_filters_bind_each_stream()
-> anyhow::Result<()> {
    let config = r#"format_version: 1
brokers:
  - name: local
    memory: {}
policies:
  - name: keys
    key_auth: { headers: [x-api-key] }
plans:
  - name: basic
consumers:
  - name: acme
    custom_id: ACME
    credentials: [{ api_key: { key: acme-key-0123456789 } }]
  - name: globex
    custom_id: GLOBEX
    credentials: [{ api_key: { key: globex-key-0123456789 } }]
  - name: initech
    credentials: [{ api_key: { key: initech-key-0123456789 } }]
subscriptions:
  - { consumer: acme, api: orders, plan: basic }
  - { consumer: globex, api: orders, plan: basic }
  - { consumer: initech, api: orders, plan: basic }
apis:
  - name: orders
    policies: [keys]
    routes:
      - name: publish
        methods: [POST]
        path: /orders
        path_match: exact
        publish: { broker: local, topic: orders, key: { consumer_id: true } }
      - name: mine
        methods: [GET]
        path: /orders/mine
        path_match: exact
        subscribe:
          broker: local
          topic: orders
          start: earliest
          identity_filters:
            - { json_pointer: /customer, consumer: custom_id }
  - name: public
    routes:
      - name: theirs
        methods: [GET]
        path: /public/mine
        path_match: exact
        subscribe:
          broker: local
          topic: orders
          identity_filters:
            - { json_pointer: /customer, consumer: custom_id }
"#;
    let node = DataPlane::start(config, &[])?;
    let post = |key: &'static str, body: &'static str| {
        let url = node.url("/orders");
        async move {
            let response = client()
                .post(url)
                .header("x-api-key", key)
                .body(body)
                .send()
                .await?;
            let status = response.status().as_u16();
            let body: Value = response.json().await?;
            anyhow::Ok((status, body))
        }
    };
    // No key: refused before anything is published.
    let anonymous = client().post(node.url("/orders")).body("{}").send().await?;
    assert_eq!(anonymous.status().as_u16(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    for (key, body) in [
        ("acme-key-0123456789", r#"{"customer":"ACME","n":1}"#),
        ("globex-key-0123456789", r#"{"customer":"GLOBEX","n":2}"#),
        ("acme-key-0123456789", r#"{"customer":"ACME","n":3}"#),
    ] {
        let (status, answer) = post(key, body).await?;
        assert_eq!(status, 202, "{answer}");
    }
    // Each consumer's stream holds its own events only, keyed by the publisher's id.
    let stream = client()
        .get(node.url("/orders/mine"))
        .header("x-api-key", "acme-key-0123456789")
        .send()
        .await?;
    assert_eq!(stream.status().as_u16(), 200);
    let mut stream = stream;
    let mut buffer = String::new();
    let events = read_events(&mut stream, &mut buffer, 2, Duration::from_secs(10)).await?;
    let numbers: Vec<i64> = events
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).unwrap()["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(numbers, [1, 3], "GLOBEX's event is not in ACME's stream");
    assert_eq!(
        events[1].id.as_deref(),
        Some("0:3"),
        "the position still moves past the event filtered out"
    );
    let anonymous = client().get(node.url("/orders/mine")).send().await?;
    assert_eq!(anonymous.status().as_u16(), 401);
    // A consumer without the value its stream is filtered by (no custom_id) is refused, and
    // the refusal is access control's: counted as a denial, not as an allowed request.
    let unbound = client()
        .get(node.url("/orders/mine"))
        .header("x-api-key", "initech-key-0123456789")
        .send()
        .await?;
    assert_eq!(unbound.status().as_u16(), 403);
    let problem: Value = unbound.json().await?;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("custom_id")),
        "{problem}"
    );
    // A route with no policies but identity filters knows no caller: it refuses everyone,
    // and says so in the same count.
    let nobody = client().get(node.url("/public/mine")).send().await?;
    assert_eq!(nobody.status().as_u16(), 403);
    let refused = r#"decision="deny",reason="identity_filter""#;
    assert_eq!(
        node.metric("sluice_access_decisions_total", refused)
            .await?,
        2.0
    );
    // Three publishes and ACME's stream were allowed; the refused stream was not.
    assert_eq!(
        node.metric("sluice_access_decisions_total", r#"decision="allow""#)
            .await?,
        4.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_publishers_are_held_to_their_identity_filters_and_silent_clients_let_go()
-> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let config = r#"format_version: 1
brokers:
  - name: local
    memory: {}
policies:
  - name: keys
    key_auth: { query_params: [api_key] }
plans:
  - name: basic
consumers:
  - name: acme
    custom_id: ACME
    credentials: [{ api_key: { key: acme-key-0123456789 } }]
subscriptions:
  - { consumer: acme, api: orders, plan: basic }
apis:
  - name: orders
    policies: [keys]
    routes:
      - name: mine
        methods: [GET]
        path: /orders/mine
        path_match: exact
        subscribe:
          broker: local
          topic: orders
          start: earliest
          heartbeat: 300ms
          websocket_publish: true
          identity_filters:
            - { json_pointer: /customer, consumer: custom_id }
      - name: watch
        methods: [GET]
        path: /orders/watch
        path_match: exact
        subscribe: { broker: local, topic: orders, heartbeat: 30s }
      - name: quiet
        methods: [GET]
        path: /orders/quiet
        path_match: exact
        subscribe: { broker: local, topic: orders, heartbeat: 300ms }
"#;
    let node = DataPlane::start(config, &[])?;
    let mut mine = websocket(&node, "/orders/mine?api_key=acme-key-0123456789").await?;
    // Its own customer's event is published; another customer's is refused, not written
    // into that customer's stream.
    mine.send(Message::text(r#"{"customer":"ACME","n":1}"#))
        .await?;
    mine.send(Message::text(r#"{"customer":"GLOBEX","n":2}"#))
        .await?;
    // The two answers, in order, and the first event streamed back, in any order with them.
    let mut answers = Vec::new();
    let mut streamed = Vec::new();
    while answers.len() < 2 || streamed.is_empty() {
        let message = next_json(&mut mine).await?;
        if message.get("data").is_some() {
            streamed.push(message["data"]["n"].clone());
        } else {
            answers.push(message);
        }
    }
    assert_eq!(answers[0]["ack"], 1, "{answers:?}");
    assert_eq!(answers[1]["nack"], 2, "{answers:?}");
    assert!(
        answers[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("identity filters")),
        "{answers:?}"
    );
    assert_eq!(streamed, [1]);
    let mut watching = websocket(
        &node,
        "/orders/watch?start=earliest&api_key=acme-key-0123456789",
    )
    .await?;
    assert_eq!(next_json(&mut watching).await?["data"]["n"], 1);
    assert_eq!(
        node.metric("sluice_event_publishes_total", r#"outcome="rejected""#)
            .await?,
        1.0
    );

    // A read-only route refuses a large message as it arrives.
    watching.send(Message::text("x".repeat(4096))).await?;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), watching.next()).await? {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => anyhow::bail!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1009));

    // A client that reads nothing answers no ping: two heartbeats on, it is closed.
    let mut silent = websocket(&node, "/orders/quiet?api_key=acme-key-0123456789").await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Its close frame (1008), or, when the pongs it finally queues reach a socket the node
    // has closed, a reset before the frame is read: either way, closed within 5 s.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(message)) = silent.next().await {
            if let Message::Close(frame) = message {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await;
    assert!(
        matches!(closed, Ok(None | Some(1008))),
        "closed within 5 s, with 1008: {closed:?}"
    );
    Ok(())
}

/// Publishes `count` events numbered from `first` through `node`'s publish route.
async fn publish_numbered(node: &DataPlane, first: i64, count: i64) -> anyhow::Result<()> {
    for n in first..first + count {
        let (status, body) = post_event(node, &format!("k{n}"), &format!("{{\"n\":{n}}}")).await?;
        anyhow::ensure!(status == 202, "{body}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_may_start_at_a_time() -> anyhow::Result<()> {
    let topic = TestTopic::create(2).await?;
    let node = DataPlane::start(&kafka_config(&kafka_bootstrap(), &topic.name, ""), &[])?;
    publish_numbered(&node, 0, 3).await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let since = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(100)).await;
    publish_numbered(&node, 3, 2).await?;
    let mut stream = client()
        .get(node.url(&format!("/stream?start={since}")))
        .send()
        .await?;
    assert_eq!(stream.status().as_u16(), 200);
    let mut buffer = String::new();
    let events = read_events(&mut stream, &mut buffer, 2, Duration::from_secs(20)).await?;
    let mut numbers: Vec<i64> = events
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).unwrap()["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, [3, 4], "only the events after {since}");
    let bad = client()
        .get(node.url("/stream?start=yesterday"))
        .send()
        .await?;
    assert_eq!(bad.status().as_u16(), 400);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_rate_limits_pace_streams_and_refuse_extra_publishes() -> anyhow::Result<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let config = memory_config(
        "",
        ", start: earliest, websocket_publish: true, \
         message_rate_limits: [{ limit: 5, per: second }]",
    );
    let node = DataPlane::start(&config, &[])?;
    publish_to_memory(&node, 8).await?;
    // 8 events at 5 per second with no burst: one at once, then one per 200 ms.
    let started = Instant::now();
    let mut stream = client().get(node.url("/stream")).send().await?;
    let mut buffer = String::new();
    let events = read_events(&mut stream, &mut buffer, 8, Duration::from_secs(20)).await?;
    let took = started.elapsed();
    assert_eq!(events.len(), 8);
    assert!(
        took >= Duration::from_millis(1300),
        "8 events at 5/s came in {took:?}"
    );

    // A WebSocket client's second message within the budget's interval is refused.
    let mut socket = websocket(&node, "/stream?start=latest").await?;
    socket.send(Message::text("a")).await?;
    socket.send(Message::text("b")).await?;
    let mut answers = Vec::new();
    while answers.len() < 2 {
        let message = next_json(&mut socket).await?;
        if message.get("ack").is_some() || message.get("nack").is_some() {
            answers.push(message);
        }
    }
    assert_eq!(answers[0]["ack"], 1, "{answers:?}");
    assert_eq!(answers[1]["nack"], 2, "{answers:?}");
    assert!(answers[1]["retry_after_ms"].as_u64().unwrap() <= 200);
    Ok(())
}

/// What a WebSocket client saw within `window`: its text messages as JSON, and how many pings.
async fn watch_websocket(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    window: Duration,
) -> anyhow::Result<(Vec<Value>, usize)> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let until = tokio::time::Instant::now() + window;
    let (mut texts, mut pings) = (Vec::new(), 0);
    while let Ok(message) = tokio::time::timeout_at(until, socket.next()).await {
        match message.context("the socket closed")?? {
            Message::Text(text) => texts.push(serde_json::from_str(&text)?),
            Message::Ping(_) => pings += 1,
            other => anyhow::bail!("unexpected message {other:?}"),
        }
    }
    Ok((texts, pings))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_pings_and_publishes_while_an_event_waits_for_its_budget()
-> anyhow::Result<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    // One event a minute: the second waits for its budget for the rest of the test.
    let config = memory_config(
        "",
        ", start: earliest, heartbeat: 300ms, websocket_publish: true, \
         message_rate_limits: [{ limit: 1, per: minute }]",
    );
    let node = DataPlane::start(&config, &[])?;
    publish_to_memory(&node, 2).await?;
    let mut socket = websocket(&node, "/stream").await?;
    assert_eq!(next_json(&mut socket).await?["data"]["n"], 0);
    socket
        .send(Message::text(r#"{"n":"from the client"}"#))
        .await?;
    let (texts, pings) = watch_websocket(&mut socket, Duration::from_secs(2)).await?;
    assert_eq!(texts.len(), 1, "only the answer: the events wait {texts:?}");
    assert_eq!(texts[0]["ack"], 1, "{texts:?}");
    assert_eq!(texts[0]["offset"], 2, "{texts:?}");
    assert!(pings >= 3, "{pings} pings in 2 s at a 300 ms heartbeat");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_need_not_wait_for_each_answer_before_publishing_the_next()
-> anyhow::Result<()> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let topic = TestTopic::create(1).await?;
    // The producer holds each batch 3 s: one message at a time, three would take 9 s.
    let config = kafka_config(&kafka_bootstrap(), &topic.name, "")
        .replace(
            r#"properties: { message.timeout.ms: "3000" }"#,
            r#"properties: { message.timeout.ms: "10000", linger.ms: "3000" }"#,
        )
        .replace(
            "heartbeat: 1s",
            "heartbeat: 500ms\n          websocket_publish: true",
        );
    let node = DataPlane::start(&config, &[])?;
    let mut socket = websocket(&node, "/stream").await?;
    let started = Instant::now();
    for n in 1..=3 {
        socket.send(Message::text(format!("{{\"n\":{n}}}"))).await?;
    }
    let (texts, pings) = watch_websocket(&mut socket, Duration::from_millis(7500)).await?;
    let acks: Vec<_> = texts.iter().filter(|t| t.get("ack").is_some()).collect();
    assert_eq!(
        acks.iter().map(|a| a["ack"].as_u64()).collect::<Vec<_>>(),
        [Some(1), Some(2), Some(3)],
        "answered in order within {:?}: {texts:?}",
        started.elapsed()
    );
    assert_eq!(
        acks.iter()
            .map(|a| a["offset"].as_i64())
            .collect::<Vec<_>>(),
        [Some(0), Some(1), Some(2)],
        "{texts:?}"
    );
    assert!(
        pings >= 3,
        "{pings} pings while the broker held the messages"
    );
    Ok(())
}

/// Opens an SSE stream on `path` over plain HTTP/1.1 with a small receive buffer, so that the
/// kernel does not hold much of what the client does not read; returns the socket once the
/// stream has opened, and what was read so far.
async fn open_unread_stream(
    node: &DataPlane,
    path: &str,
) -> anyhow::Result<(tokio::net::TcpStream, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let client_socket = tokio::net::TcpSocket::new_v4()?;
    client_socket.set_recv_buffer_size(8192)?;
    let mut socket = client_socket.connect(node.addr).await?;
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
        .await?;
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 65536];
    while !received.windows(6).any(|w| w == b": ok\n\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut chunk)).await??;
        anyhow::ensure!(n > 0, "the stream closed before it opened");
        received.extend_from_slice(&chunk[..n]);
    }
    Ok((socket, received))
}

/// Produces `count` events with `value` to `topic` straight to the broker, all in flight at
/// once.
async fn produce_copies(topic: &TestTopic, count: usize, value: &str) -> anyhow::Result<()> {
    use rdkafka::producer::FutureRecord;
    let producer = topic.producer()?;
    let sends = (0..count).map(|_| {
        producer.send(
            FutureRecord::<(), _>::to(&topic.name).payload(value),
            Duration::from_secs(20),
        )
    });
    for sent in futures_util::future::join_all(sends).await {
        sent.map_err(|(e, _)| anyhow::anyhow!("an event was not published: {e}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_with_its_position() -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let config = memory_config("retained_events: 16", "");
    let node = DataPlane::start(&config, &[])?;
    let (mut socket, mut received) = open_unread_stream(&node, "/stream").await?;
    let mut chunk = vec![0u8; 65536];
    // The client stops reading while more events than the feed holds (16, the topic's
    // retained events) are published: large ones, so that socket buffers cannot hold them all.
    let body = format!("\"{}\"", "x".repeat(64 * 1024));
    let publisher = client();
    for _ in 0..300 {
        let response = publisher
            .post(node.url("/events"))
            .body(body.clone())
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 202);
    }
    // Then reads everything it is sent, until the node closes the stream.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), socket.read(&mut chunk))
            .await
            .context("the slow client was not closed")??;
        if n == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&received);
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("id: "))
        .collect();
    let data_events = text.matches("data: \"x").count();
    assert!(
        data_events < 300,
        "the client got every event ({data_events}): it was not slow"
    );
    let closing = text
        .find("event: sluice-closed")
        .context("no sluice-closed event")?;
    assert!(
        text[closing..].contains("\"reason\":\"slow_consumer\""),
        "{}",
        &text[closing..]
    );
    // The last id is the closing event's, and it is the position after the last event the
    // client got: resuming there loses nothing the node still has.
    let last = *ids.last().context("no id at all")?;
    let expected = format!("0:{data_events}");
    assert_eq!(last, expected, "{} events before the close", data_events);
    assert_eq!(
        node.metric("sluice_event_subscribers_closed_slow_total", "")
            .await?,
        1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_subscriber_catches_up_on_a_long_backlog_at_its_own_pace() -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    // Twice the shared feed's buffer (1024 events), large enough that socket buffers cannot
    // hold the part the client has not read.
    const EVENTS: usize = 2048;
    let topic = TestTopic::create(1).await?;
    produce_copies(&topic, EVENTS, &format!("\"{}\"", "x".repeat(8 * 1024))).await?;
    let node = DataPlane::start(&kafka_config(&kafka_bootstrap(), &topic.name, ""), &[])?;

    // A client far behind (here: at the start) reads through a reader of its own. It opens the
    // stream, then reads nothing for a while, with a small receive buffer: the broker has the
    // whole backlog ready, and a reader that did not wait for its client would get the
    // client a shared buffer behind and close it as slow.
    let (mut socket, mut unread) = open_unread_stream(&node, "/stream?start=earliest").await?;
    let mut chunk = vec![0u8; 65536];
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Then it reads as fast as it can, frame by frame, until it has every event (heartbeats
    // keep a stalled stream talking: the whole read has a deadline).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut events, mut last_id, mut closed) = (0, String::new(), None);
    while events < EVENTS && closed.is_none() {
        while let Some(end) = unread.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = unread.drain(..end + 2).collect();
            let frame = String::from_utf8_lossy(&frame);
            if frame.contains("event: sluice-closed") {
                closed = Some(frame.into_owned());
                break;
            }
            if let Some(id) = frame.lines().find_map(|l| l.strip_prefix("id: ")) {
                last_id = id.to_owned();
                events += 1;
            }
        }
        if events == EVENTS || closed.is_some() {
            break;
        }
        let n = tokio::time::timeout_at(deadline, socket.read(&mut chunk))
            .await
            .with_context(|| format!("only {events} events within 60 s"))??;
        anyhow::ensure!(n > 0, "the node closed the stream after {events} events");
        unread.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(closed, None, "closed as slow after {events} events");
    assert_eq!(events, EVENTS);
    assert_eq!(last_id, format!("0:{EVENTS}"), "every event, in order");
    assert_eq!(
        node.metric("sluice_event_subscribers_closed_slow_total", "")
            .await?,
        0.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_subscriber_behind_more_bytes_than_the_feed_keeps_is_closed_as_slow()
-> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    // Far fewer events than the feed's 1024, twice the bytes it keeps (16 MB).
    const EVENTS: usize = 64;
    let topic = TestTopic::create(1).await?;
    let node = DataPlane::start(&kafka_config(&kafka_bootstrap(), &topic.name, ""), &[])?;
    let (mut socket, mut received) = open_unread_stream(&node, "/stream").await?;
    let mut chunk = vec![0u8; 65536];
    // The client reads nothing while the events arrive.
    produce_copies(&topic, EVENTS, &"x".repeat(512 * 1024)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Then it reads what it is sent, until the node closes the stream (a stream left open
    // sends heartbeats: the client gives up after 30 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n = tokio::time::timeout_at(deadline, socket.read(&mut chunk)).await;
        let Ok(n) = n else { break };
        let n = n?;
        if n == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&received);
    let data_events = text.matches("data: xxxx").count();
    assert!(
        data_events < EVENTS,
        "the client got every event ({data_events}): the feed kept them all"
    );
    let closing = text
        .find("event: sluice-closed")
        .context("no sluice-closed event")?;
    assert!(
        text[closing..].contains("\"last_event_id\":\"0:"),
        "{}",
        &text[closing..closing.saturating_add(300).min(text.len())]
    );
    assert_eq!(
        node.metric("sluice_event_subscribers_closed_slow_total", "")
            .await?,
        1.0
    );
    Ok(())
}

#[tokio::test]
async fn a_slow_http2_subscriber_that_still_reads_outlasts_the_send_timeout() -> anyhow::Result<()>
{
    use http_body_util::{BodyExt, Empty};
    const EVENT: usize = 12 * 1024;
    let node = DataPlane::start(
        &memory_config("", ", start: earliest"),
        &["--send-timeout", "1s"],
    )?;
    // Two large events in the topic: the stream hands the second to hyper while the first is
    // still going out, so it waits to send for as long as the first takes.
    let event = format!(r#"{{"pad":"{}"}}"#, "x".repeat(EVENT));
    for _ in 0..2 {
        let status = client()
            .post(node.url("/events"))
            .header("content-type", "application/json")
            .body(event.clone())
            .send()
            .await?
            .status();
        assert_eq!(status, 202);
    }
    // 1 KB of window at a time, each given back 0.1 s after it came: about 2.4 s to take both
    // events, more than twice the send timeout, with bytes moving all along.
    let mut sender = sluice_tests::http::h2_connection(node.addr, 1024).await?;
    let request = http::Request::get(node.url("/stream")).body(Empty::new())?;
    let response = sender.send_request(request).await?;
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    let mut body = response.into_body();
    let mut text = String::new();
    while text.matches("data: ").count() < 2 {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .context("the stream went quiet before both events came")?
            .context("the stream ended before both events came")?
            .context("the stream was reset while the client still read it")?;
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data)?);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "both events came in {took:?}: the client did not hold them back, so this proves nothing"
    );
    Ok(())
}
