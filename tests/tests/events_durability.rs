//! The event bridge's durability end to end: a broker on durable storage is killed mid-load
//! (SIGKILL) and restarted. Every event that got a 202 must be in the topic, at the partition
//! and offset the 202 named; every other request must have got a 503 within the delivery
//! timeout. The topic is read back by an independent Kafka client.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;
use sluice_tests::data_plane::DataPlane;
use sluice_tests::kafka::KAFKA_TIMEOUT;
use sluice_tests::tansu::TestBroker;

/// The node's `message.timeout.ms`: how long it waits for the broker's acknowledgement.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(3);
/// How much later than the delivery timeout a 503 may come: the node's own grace for the
/// delivery report (1 s) plus scheduling delays on a busy two-core machine. A 503 that took
/// longer means a client was kept waiting past what the gateway promises.
const ANSWER_MARGIN: Duration = Duration::from_secs(2);
/// Concurrent clients, each posting its own numbered events one after the other.
const CLIENTS: usize = 8;
const PARTITIONS: i32 = 3;
/// Load on a healthy broker before it is killed.
const LOAD_BEFORE_KILL: Duration = Duration::from_millis(1500);
/// How long the broker stays dead: longer than the delivery timeout, so that the requests in
/// flight at the kill can only time out.
const OUTAGE: Duration = Duration::from_secs(5);
/// After the restart the load goes on until this many requests made after it were accepted,
/// or until the deadline. librdkafka's reconnect backoff grows while the broker is away
/// (up to `reconnect.backoff.max.ms`, 10 s by default), so the first 202s may take a while.
const ACCEPTED_AFTER_RESTART_WANTED: usize = 40;
const RECOVERY_DEADLINE: Duration = Duration::from_secs(25);
/// A client gives up on the gateway after this long: any answer that slow is a failure.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

const BROKER_TIMEOUT_PROBLEM: &str = "https://sluice.dev/problems/broker-timeout";
const BROKER_OVERLOADED_PROBLEM: &str = "https://sluice.dev/problems/broker-overloaded";

/// One node publishing to `topic`, its delivery timeout [`DELIVERY_TIMEOUT`].
///
/// Idempotence is off, although Sluice's default has it on, because tansu 0.6.0 cannot follow
/// an idempotent producer through an outage. Once events time out, librdkafka bumps the
/// producer's epoch by itself (`rdkafka_idempotence.c`: "The idempotent producer can bump its
/// own epoch"); a Kafka broker accepts the new epoch, tansu does not. Its SQLite engine panics
/// on the first batch of the new epoch (`idempotent_message_check`, `lite.rs:503`, "more or
/// less than one row"), after which it answers every produce with UNKNOWN_SERVER_ERROR, which
/// the node reports as 502s. `acks=all` stays: a 202 still means the broker stored the event.
/// Drop the property once tansu accepts a bumped epoch.
fn config(bootstrap: &str, topic: &str) -> String {
    let timeout_ms = DELIVERY_TIMEOUT.as_millis();
    format!(
        r#"format_version: 1
brokers:
  - name: kafka
    kafka:
      bootstrap_servers: ["{bootstrap}"]
      properties: {{ message.timeout.ms: "{timeout_ms}", enable.idempotence: "false" }}
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
"#
    )
}

/// What the gateway answered one request.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// 202: the broker acknowledged the event at this position.
    Accepted { partition: i32, offset: i64 },
    /// 503, with its problem type.
    Unavailable { problem: String },
}

/// One request as its client saw it.
#[derive(Debug)]
struct Attempt {
    key: String,
    body: String,
    started: Instant,
    took: Duration,
    answer: Answer,
}

/// When the broker went down and came back, and whether to stop, shared with the clients.
#[derive(Debug, Default)]
struct Timeline {
    killed_at: OnceLock<Instant>,
    restarted_at: OnceLock<Instant>,
    accepted_after_restart: AtomicUsize,
    stop: AtomicBool,
}

impl Timeline {
    /// Where `moment` falls relative to the kill and the restart, for failure messages.
    fn describe(&self, moment: Instant) -> String {
        match (self.killed_at.get(), self.restarted_at.get()) {
            (_, Some(restarted)) if moment >= *restarted => {
                format!("{:?} after the restart", moment - *restarted)
            }
            (Some(killed), _) if moment >= *killed => {
                format!("{:?} after the kill", moment - *killed)
            }
            _ => "before the kill".into(),
        }
    }
}

/// Posts numbered events for key `c{client}` until told to stop. An answer other than a 202
/// or a 503 (or no answer at all) ends the client with an error that fails the test.
async fn run_client(
    client: usize,
    http: reqwest::Client,
    url: String,
    timeline: Arc<Timeline>,
) -> anyhow::Result<Vec<Attempt>> {
    let key = format!("c{client}");
    let mut attempts = Vec::new();
    for n in 0.. {
        if timeline.stop.load(Ordering::Relaxed) {
            break;
        }
        let body = format!(r#"{{"client":{client},"n":{n}}}"#);
        let started = Instant::now();
        let answer = post(&http, &url, &body).await.with_context(|| {
            format!(
                "event {body}, sent {}, answered after {:?}",
                timeline.describe(started),
                started.elapsed()
            )
        })?;
        let after_restart = timeline
            .restarted_at
            .get()
            .is_some_and(|restarted| started >= *restarted);
        if after_restart && matches!(answer, Answer::Accepted { .. }) {
            timeline
                .accepted_after_restart
                .fetch_add(1, Ordering::Relaxed);
        }
        attempts.push(Attempt {
            key: key.clone(),
            body,
            started,
            took: started.elapsed(),
            answer,
        });
    }
    Ok(attempts)
}

/// Posts one event: a 202 with its position or a 503 that says why; anything else is an
/// error.
async fn post(http: &reqwest::Client, url: &str, body: &str) -> anyhow::Result<Answer> {
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .context("no answer from the gateway")?;
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").cloned();
    let text = response
        .text()
        .await
        .with_context(|| format!("the {status} answer's body did not arrive"))?;
    match status {
        202 => {
            let receipt: Value = serde_json::from_str(&text)
                .with_context(|| format!("a 202 that is not JSON: {text}"))?;
            let position = receipt["partition"]
                .as_i64()
                .and_then(|p| i32::try_from(p).ok())
                .zip(receipt["offset"].as_i64());
            let Some((partition, offset)) = position else {
                bail!("a 202 without a partition and offset: {text}");
            };
            Ok(Answer::Accepted { partition, offset })
        }
        503 => {
            let problem: Value = serde_json::from_str(&text)
                .with_context(|| format!("a 503 that is not JSON: {text}"))?;
            ensure!(
                retry_after.as_ref().is_some_and(|v| v == "1"),
                "a 503 with Retry-After {retry_after:?}: {text}"
            );
            Ok(Answer::Unavailable {
                problem: problem["type"].as_str().unwrap_or_default().to_owned(),
            })
        }
        _ => bail!("the gateway answered {status}: {text}"),
    }
}

/// Every record of `topic`, by (partition, offset): its key and value. Reads each partition
/// up to the end it had when the reading began (the load is over by then).
fn read_whole_topic(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<BTreeMap<(i32, i64), (String, String)>> {
    let mut next = BTreeMap::new();
    let mut end = BTreeMap::new();
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
            .with_context(|| {
                format!(
                    "cannot read the offsets of partition {partition} of {topic} (did the \
                     broker forget the topic when it restarted?)"
                )
            })?;
        next.insert(partition, low);
        end.insert(partition, high);
    }
    let deadline = Instant::now() + KAFKA_TIMEOUT;
    let mut records = BTreeMap::new();
    while next.iter().any(|(partition, at)| *at < end[partition]) {
        ensure!(
            Instant::now() < deadline,
            "the topic was not read to its end {end:?} within {KAFKA_TIMEOUT:?}: at {next:?}"
        );
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message.context("reading the topic")?;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let value = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        records.insert((message.partition(), message.offset()), (key, value));
        next.insert(message.partition(), message.offset() + 1);
    }
    Ok(records)
}

/// The node's log less its access log (a line per request), for failure messages.
fn node_log_without_access(node: &DataPlane) -> String {
    let log = node.process.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| !line.contains(r#""target":"sluice::access""#))
        .collect();
    lines.join("\n")
}

fn is_accepted(attempt: &Attempt) -> bool {
    matches!(attempt.answer, Answer::Accepted { .. })
}

/// At most a few lines of a long list, for a failure message.
fn first_few(lines: &[String]) -> String {
    let shown: Vec<&str> = lines.iter().take(10).map(String::as_str).collect();
    format!("{} (of {})", shown.join("\n"), lines.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_load_loses_no_accepted_event_and_the_rest_get_prompt_503s()
-> anyhow::Result<()> {
    let test_started = Instant::now();
    let mut broker = TestBroker::start()?;
    let topic = broker.create_topic(PARTITIONS).await?;
    let node = DataPlane::start(&config(&broker.bootstrap(), &topic), &[])?;

    let http = reqwest::Client::builder().timeout(CLIENT_TIMEOUT).build()?;
    let timeline = Arc::new(Timeline::default());
    let load_started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let url = node.url(&format!("/orders/c{client}/events"));
            tokio::spawn(run_client(client, http.clone(), url, timeline.clone()))
        })
        .collect();

    tokio::time::sleep(LOAD_BEFORE_KILL).await;
    broker.kill()?;
    let killed_at = Instant::now();
    timeline.killed_at.set(killed_at).unwrap();
    tokio::time::sleep(OUTAGE).await;
    // The restart blocks until the broker answers metadata; the clients go on meanwhile.
    tokio::task::block_in_place(|| broker.restart())?;
    let restarted_at = Instant::now();
    timeline.restarted_at.set(restarted_at).unwrap();
    let recovery_deadline = restarted_at + RECOVERY_DEADLINE;
    while timeline.accepted_after_restart.load(Ordering::Relaxed) < ACCEPTED_AFTER_RESTART_WANTED
        && Instant::now() < recovery_deadline
        // A client that stopped has failed: no use waiting for the others.
        && !clients.iter().any(|client| client.is_finished())
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    timeline.stop.store(true, Ordering::Relaxed);
    let mut attempts = Vec::new();
    for client in clients {
        let done = client.await?.with_context(|| {
            format!(
                "node log:\n{}\nbroker log:\n{}",
                node_log_without_access(&node),
                broker.log_text()
            )
        })?;
        attempts.extend(done);
    }
    let load_ended = Instant::now();

    let reader = broker.consumer_from_beginning(&topic, PARTITIONS)?;
    let records = {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || read_whole_topic(&reader, &topic, PARTITIONS)).await??
    };

    // Every accepted event is where its 202 said, with the body and key it was sent with.
    let mut lost = Vec::new();
    for attempt in &attempts {
        if let Answer::Accepted { partition, offset } = attempt.answer {
            match records.get(&(partition, offset)) {
                Some((key, value)) if *key == attempt.key && *value == attempt.body => {}
                found => lost.push(format!(
                    "{} (key {}) got a 202 for {partition}:{offset}, which holds {found:?}",
                    attempt.body, attempt.key
                )),
            }
        }
    }

    // Every other request got a 503 that says why, within the delivery timeout.
    let slowest_allowed = DELIVERY_TIMEOUT + ANSWER_MARGIN;
    let mut late_or_unexplained = Vec::new();
    for attempt in &attempts {
        if let Answer::Unavailable { problem } = &attempt.answer {
            if attempt.took > slowest_allowed {
                late_or_unexplained.push(format!(
                    "{}: 503 after {:?}, more than {slowest_allowed:?}",
                    attempt.body, attempt.took
                ));
            }
            if problem != BROKER_TIMEOUT_PROBLEM && problem != BROKER_OVERLOADED_PROBLEM {
                late_or_unexplained.push(format!("{}: 503 of type {problem:?}", attempt.body));
            }
        }
    }

    // The phases each did what they were for: events accepted before the kill, none while
    // the broker was dead, 202s again after the restart. A request made during the outage may
    // still get a 202, when the restarted broker stores it within the delivery timeout.
    let ended = |attempt: &Attempt| attempt.started + attempt.took;
    let accepted_before_kill = attempts
        .iter()
        .filter(|a| ended(a) <= killed_at)
        .filter(|a| is_accepted(a))
        .count();
    let started_during_outage: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.started >= killed_at && a.started < restarted_at)
        .collect();
    let accepted_while_dead: Vec<String> = started_during_outage
        .iter()
        .filter(|a| ended(a) <= restarted_at && is_accepted(a))
        .map(|a| format!("{} {:?}", a.body, a.answer))
        .collect();
    let accepted_after_restart = attempts
        .iter()
        .filter(|a| a.started >= restarted_at)
        .filter(|a| is_accepted(a))
        .count();
    let first_202_after_restart = attempts
        .iter()
        .filter(|a| a.started >= restarted_at)
        .filter(|a| is_accepted(a))
        .map(|a| ended(a) - restarted_at)
        .min()
        .map_or_else(|| "never".to_owned(), |after| format!("{after:?}"));

    // Events that got a 503 may still have reached the topic (the broker may have stored one
    // whose acknowledgement the kill cut off): allowed, counted.
    let mut in_topic: BTreeMap<&str, Vec<(i32, i64)>> = BTreeMap::new();
    for (position, (_, value)) in &records {
        in_topic.entry(value.as_str()).or_default().push(*position);
    }
    let sent: BTreeSet<&str> = attempts.iter().map(|a| a.body.as_str()).collect();
    let unavailable: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| matches!(a.answer, Answer::Unavailable { .. }))
        .collect();
    let unavailable_yet_stored = unavailable
        .iter()
        .filter(|a| in_topic.contains_key(a.body.as_str()))
        .count();
    let duplicated: Vec<String> = in_topic
        .iter()
        .filter(|(_, positions)| positions.len() > 1)
        .map(|(value, positions)| format!("{value} at {positions:?}"))
        .collect();
    let never_sent: Vec<String> = records
        .iter()
        .filter(|(_, (_, value))| !sent.contains(value.as_str()))
        .map(|(position, record)| format!("{position:?}: {record:?}"))
        .collect();

    let slowest = |answers: &dyn Fn(&Answer) -> bool| {
        attempts
            .iter()
            .filter(|a| answers(&a.answer))
            .map(|a| a.took)
            .max()
            .unwrap_or_default()
    };
    let total_accepted = attempts.iter().filter(|a| is_accepted(a)).count();
    println!(
        "{} requests over {:?}: {total_accepted} accepted ({accepted_before_kill} before the \
         kill, {} of the {} made during the outage, {accepted_after_restart} made after the \
         restart; slowest {:?}), {} got 503 (slowest {:?}; {unavailable_yet_stored} of them \
         are in the topic anyway); {} records in the topic, {} events stored twice; the \
         broker was down {:?}, the first 202 for a request made after the restart came \
         {first_202_after_restart} after it; the test ran {:?}",
        attempts.len(),
        load_ended - load_started,
        started_during_outage
            .iter()
            .filter(|a| is_accepted(a))
            .count(),
        started_during_outage.len(),
        slowest(&|a| matches!(a, Answer::Accepted { .. })),
        unavailable.len(),
        slowest(&|a| matches!(a, Answer::Unavailable { .. })),
        records.len(),
        duplicated.len(),
        restarted_at - killed_at,
        test_started.elapsed(),
    );
    if !duplicated.is_empty() {
        println!("events stored twice:\n{}", first_few(&duplicated));
    }

    ensure!(
        lost.is_empty(),
        "accepted events missing from the topic:\n{}",
        first_few(&lost)
    );
    ensure!(
        late_or_unexplained.is_empty(),
        "503s later than the delivery timeout, or of an unexpected type:\n{}",
        first_few(&late_or_unexplained)
    );
    ensure!(
        never_sent.is_empty(),
        "records nobody sent:\n{}",
        first_few(&never_sent)
    );
    ensure!(
        accepted_before_kill > 0,
        "no event was accepted before the kill: the load never got going"
    );
    ensure!(
        !unavailable.is_empty(),
        "no request got a 503: the broker's death went unnoticed"
    );
    ensure!(
        accepted_while_dead.is_empty(),
        "accepted while the broker was dead:\n{}",
        first_few(&accepted_while_dead)
    );
    ensure!(
        accepted_after_restart > 0,
        "no request made after the restart was accepted within {RECOVERY_DEADLINE:?}; node \
         log:\n{}\nbroker log:\n{}",
        node_log_without_access(&node),
        broker.log_text()
    );
    Ok(())
}
