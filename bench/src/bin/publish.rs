//! Durable publish (the event bridge issue's benchmark): `sluice-dp` turning each `POST` of a
//! 1 KB JSON body into an event on a Kafka topic, answering 202 only once the broker has
//! acknowledged it (`acks=all`), against its own bare-proxy figure and against the broker's
//! limit.
//!
//! One run measures, in front of the same backend and broker, with the same load generator
//! settings (oha, N connections, keep-alive, the same body file, `POST /events`):
//!
//! - `proxy`: `sluice-dp` as a bare reverse proxy (the `proxy` benchmark's configuration)
//!   forwarding the POSTs to the backend (the harness's nginx, which answers `200 ok`);
//! - `publish`: the same configuration plus a broker (Kafka at `SLUICE_TEST_KAFKA_BOOTSTRAP`,
//!   the services' tansu by default) and a route `POST /events` publishing to a fresh topic,
//!   `delivery: durable` (the default) with Sluice's producer defaults (idempotent, `acks=all`,
//!   `linger.ms=1`). Every answer must be 202; any other is reported, never counted;
//! - `producer`: the broker's limit: an rdkafka `FutureProducer` in this program, configured
//!   as Sluice configures its own, sending as many events as `publish` answered 202 in its
//!   max-rate run (the same body, headers like Sluice's) to another fresh topic, with as many
//!   sends in flight as oha has connections, each awaiting its delivery report.
//!
//! For `proxy` and `publish`: requests/s, p50/p99 at the maximum rate, then at a fixed rate,
//! and requests per CPU-second of `sluice-dp` (the broker's CPU is reported beside it, not in
//! it). For `producer`: events/s, the delivery latency's percentiles, the CPU of this process
//! (the producer) per event. The broker's CPU per event comes from /proc of its process, when
//! it runs on this machine (`~/.cache/sluice/tansu.pid`, or `SLUICE_BENCH_BROKER_PID`).
//!
//! The goals: `publish` at least 0.5x the bare proxy's requests per CPU-second, and its p99 at
//! most the proxy's p99 + 2 ms (at the fixed rate, where both keep up).
//!
//! Settings: those of the `proxy` benchmark (`SLUICE_BENCH_SECONDS`, `_WARMUP`,
//! `_CONNECTIONS`, `_WORKERS`, `SLUICE_BENCH_NGINX` / `_OHA`), `SLUICE_BENCH_RATE` (the fixed
//! rate, default 2000 here), `SLUICE_BENCH_PARTITIONS` (of each topic, default 1),
//! `SLUICE_BENCH_PRODUCER` (`key=value,...`: librdkafka settings for the node's producer and
//! the direct one instead of Sluice's defaults, such as `linger.ms=5`; an experiment, not the
//! benchmark) and `SLUICE_BENCH_ONLY` (comma-separated among `proxy`, `publish`, `producer`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use sluice_bench::harness::{
    self, Bench, CpuMeter, Measurement, Request, Settings, SluiceTarget, Target, Tools,
    clock_ticks, group_usage, print_targets, warnings,
};
use sluice_bench::{Row, load_avg, percentile, report};
use sluice_tests::kafka::TestTopic;
use sluice_tests::kafka_bootstrap;

const NAME: &str = "publish";
const MAKE: &str = "make bench (cargo run --release -p sluice-bench --bin publish)";
/// Goals of the event bridge issue: requests per sluice-dp CPU-second against its bare-proxy
/// figure, and p99 over the bare proxy's.
const GOAL_CPU_RATIO: f64 = 0.5;
const GOAL_ADDED_P99_US: f64 = 2000.0;
/// The fixed rate unless `SLUICE_BENCH_RATE` says otherwise: one the broker keeps up with on a
/// small machine, so that latency at it is publishing, not queueing.
const DEFAULT_RATE: u32 = 2000;
const TARGETS: [&str; 3] = ["proxy", "publish", "producer"];
/// What oha sends, to the bare proxy and to the publish route alike.
const PATH: &str = "/events";
const CONTENT_TYPE: &str = "application/json";
const BODY_BYTES: usize = 1024;
/// A JSON object of exactly [`BODY_BYTES`] bytes: an order event, padded by its `note`.
fn event_body() -> anyhow::Result<Vec<u8>> {
    let items: Vec<serde_json::Value> = (1..=6)
        .map(|i| {
            serde_json::json!({
                "sku": format!("SKU-{:06}", 1000 + i),
                "name": format!("Item number {i}"),
                "quantity": i,
                "unit_price_cents": 499 * i,
            })
        })
        .collect();
    let mut event = serde_json::json!({
        "type": "order.paid",
        "order_id": "ord-7f3c2a9e-0042",
        "customer_id": "cus-51b8d1c4",
        "currency": "EUR",
        "total_cents": 104_790,
        "paid_at": "2026-11-27T03:04:05.678Z",
        "items": items,
        "note": "",
    });
    let bare = serde_json::to_vec(&event)?.len();
    if bare > BODY_BYTES {
        bail!("the event is {bare} bytes before padding, more than {BODY_BYTES}");
    }
    event["note"] = "x".repeat(BODY_BYTES - bare).into();
    let body = serde_json::to_vec(&event)?;
    anyhow::ensure!(body.len() == BODY_BYTES, "the body is {} bytes", body.len());
    Ok(body)
}

/// The bare proxy's configuration plus a broker and a durable publish route on [`PATH`];
/// `overrides` are the broker's `properties` (librdkafka settings in place of Sluice's).
fn publish_conf(
    backend: u16,
    bootstrap: &str,
    topic: &str,
    overrides: &[(String, String)],
) -> String {
    let servers: Vec<String> = bootstrap
        .split(',')
        .map(|s| format!("\"{}\"", s.trim()))
        .collect();
    let properties = if overrides.is_empty() {
        String::new()
    } else {
        let pairs: Vec<String> = overrides
            .iter()
            .map(|(key, value)| format!("{key}: \"{value}\""))
            .collect();
        format!("\n      properties: {{ {} }}", pairs.join(", "))
    };
    // The bare proxy's document ends inside its routes: the publish route continues that
    // list, and the broker follows as a top-level key.
    format!(
        "{bare}      - name: events
        methods: [POST]
        path: {PATH}
        path_match: exact
        publish: {{ broker: kafka, topic: {topic} }}
brokers:
  - name: kafka
    kafka:
      bootstrap_servers: [{servers}]{properties}
",
        bare = harness::bare_proxy_conf(backend),
        servers = servers.join(", ")
    )
}

// ----------------------------------------------------------------- broker ---

/// The broker's process on this machine (tansu from `scripts/services.sh`), whose CPU is
/// reported beside the node's and the producer's.
#[derive(Debug)]
struct BrokerProcess {
    pid: u32,
    name: String,
    ticks: f64,
}

impl BrokerProcess {
    /// `SLUICE_BENCH_BROKER_PID`, else the pid file `scripts/services.sh` writes; `None` (with
    /// a note) when neither names a live process leading its process group.
    fn find() -> Option<Self> {
        let pid = match std::env::var("SLUICE_BENCH_BROKER_PID") {
            Ok(pid) if !pid.is_empty() => pid,
            _ => {
                let cache = std::env::var_os("SLUICE_CACHE_DIR")
                    .map(std::path::PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/sluice"))
                    })?;
                std::fs::read_to_string(cache.join("tansu.pid")).ok()?
            }
        };
        let pid: u32 = pid.trim().parse().ok()?;
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_owned();
        if group_usage(pid).processes == 0 {
            eprintln!(
                "{NAME}: the broker's pid {pid} ({name}) leads no process group: its CPU is \
                 not measured"
            );
            return None;
        }
        Some(Self {
            pid,
            name,
            ticks: clock_ticks(),
        })
    }
}

impl CpuMeter for BrokerProcess {
    fn name(&self) -> &str {
        &self.name
    }

    /// utime + stime of every process in its group (tansu is one process, setsid).
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let usage = group_usage(self.pid);
        if usage.processes == 0 {
            bail!("the broker ({}, pid {}) is gone", self.name, self.pid);
        }
        Ok(usage.cpu_ticks as f64 / self.ticks)
    }
}

/// Events in `topic`: the sum of its partitions' high watermarks (each topic starts empty).
fn events_in(topic: &TestTopic) -> anyhow::Result<i64> {
    let consumer = topic.consumer_from_beginning()?;
    let mut total = 0;
    for partition in 0..topic.partitions {
        let (_, high) = consumer
            .fetch_watermarks(&topic.name, partition, Duration::from_secs(10))
            .with_context(|| format!("watermarks of {}/{partition}", topic.name))?;
        total += high;
    }
    Ok(total)
}

// --------------------------------------------------------------- producer ---

/// The direct producer's run: the broker's limit with Sluice's producer settings.
#[derive(Debug, Clone, Serialize)]
struct ProducerRun {
    /// What it did, as one line.
    command: String,
    topic: String,
    in_flight: u32,
    /// Acknowledged events.
    events: u64,
    /// Events that failed, by error.
    failures: BTreeMap<String, u64>,
    seconds: f64,
    events_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// CPU of this process (the producer: librdkafka's threads and the tasks awaiting reports).
    producer_cpu_s: f64,
    events_per_producer_cpu_s: f64,
    broker: Option<String>,
    broker_cpu_s: Option<f64>,
    other_cpu_s: f64,
    load_avg: f64,
}

/// Sluice's producer settings (the node's own defaults) with `overrides` in their place or
/// added, under this program's client id.
fn producer_settings(overrides: &[(String, String)]) -> Vec<(String, String)> {
    let mut settings: Vec<(String, String)> = sluice_data_plane::events::kafka::PRODUCER_DEFAULTS
        .iter()
        .map(|(k, v)| match *k {
            "client.id" => ((*k).to_owned(), "sluice-bench".to_owned()),
            _ => ((*k).to_owned(), (*v).to_owned()),
        })
        .collect();
    for (key, value) in overrides {
        match settings.iter_mut().find(|(k, _)| k == key) {
            Some(setting) => setting.1.clone_from(value),
            None => settings.push((key.clone(), value.clone())),
        }
    }
    settings
}

/// `SLUICE_BENCH_PRODUCER`: `key=value` pairs separated by commas.
fn producer_overrides(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok((key.trim().to_owned(), value.trim().to_owned()))
            }
            _ => bail!("SLUICE_BENCH_PRODUCER: {pair:?} is not key=value"),
        })
        .collect()
}

fn producer(bootstrap: &str, overrides: &[(String, String)]) -> anyhow::Result<FutureProducer> {
    let mut config = ClientConfig::new();
    for (key, value) in producer_settings(overrides) {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("cannot create the direct producer")
}

/// Record headers as Sluice adds them to an event without CloudEvents or a consumer.
fn record_headers() -> OwnedHeaders {
    let id = uuid::Uuid::new_v4().to_string();
    let request = uuid::Uuid::new_v4().to_string();
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let traceparent = format!("00-{trace}-{}-01", &trace[..16]);
    [
        ("content-type", CONTENT_TYPE),
        ("sluice-event-id", id.as_str()),
        ("sluice-request-id", request.as_str()),
        ("traceparent", traceparent.as_str()),
    ]
    .into_iter()
    .fold(
        OwnedHeaders::new_with_capacity(4),
        |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value),
            })
        },
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Sends `count` events of `body` to `topic` with `in_flight` sends at a time, each awaiting
/// its delivery report: the latencies of the acknowledged ones (µs) and the failures.
async fn produce(
    producer: &Arc<FutureProducer>,
    topic: &str,
    body: &Arc<[u8]>,
    count: u64,
    in_flight: u32,
) -> (Vec<f64>, BTreeMap<String, u64>) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (producer, topic, body, next) = (
            producer.clone(),
            topic.to_owned(),
            body.clone(),
            next.clone(),
        );
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = BTreeMap::<String, u64>::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let started = Instant::now();
                let record = FutureRecord::<[u8], [u8]>::to(&topic)
                    .payload(&body[..])
                    .headers(record_headers())
                    .timestamp(now_ms());
                let outcome = match producer.send_result(record) {
                    Ok(report) => match report.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((error, _))) => Err(error.to_string()),
                        Err(_) => Err("delivery report dropped".to_owned()),
                    },
                    Err((error, _)) => Err(format!("not queued: {error}")),
                };
                match outcome {
                    Ok(()) => latencies.push(started.elapsed().as_secs_f64() * 1e6),
                    Err(error) => *failures.entry(error).or_default() += 1,
                }
            }
            (latencies, failures)
        });
    }
    let mut latencies = Vec::new();
    let mut failures = BTreeMap::<String, u64>::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((l, f)) => {
                latencies.extend(l);
                for (error, n) in f {
                    *failures.entry(error).or_default() += n;
                }
            }
            Err(e) => *failures.entry(format!("task failed: {e}")).or_default() += 1,
        }
    }
    (latencies, failures)
}

/// The direct producer's warm-up (connection, producer id, metadata) and measured run.
async fn measure_producer(
    settings: &Settings,
    bootstrap: &str,
    topic: &TestTopic,
    body: &[u8],
    count: u64,
    broker: Option<&BrokerProcess>,
    overrides: &[(String, String)],
) -> anyhow::Result<ProducerRun> {
    let ticks = clock_ticks();
    let in_flight = settings.connections;
    let producer = Arc::new(producer(bootstrap, overrides)?);
    let body: Arc<[u8]> = body.into();
    let warm_up = u64::from(in_flight) * 20;
    let command = format!(
        "rdkafka FutureProducer in {NAME} ({}): {count} events of {} B to {} at {bootstrap}, \
         {in_flight} sends in flight each awaiting its delivery report, after {warm_up} \
         warm-up events",
        producer_settings(overrides)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        body.len(),
        topic.name,
    );
    eprintln!("{NAME}: producer, warm-up: {warm_up} events");
    let (_, failed) = produce(&producer, &topic.name, &body, warm_up, in_flight).await;
    if !failed.is_empty() {
        bail!("the direct producer's warm-up failed: {failed:?}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!("{NAME}: producer, measured: {command}");
    let broker_cpu = || broker.map(CpuMeter::cpu_seconds).transpose();
    let load = load_avg();
    let own_before = harness::own_ticks();
    let machine_before = harness::machine_busy_ticks();
    let broker_before = broker_cpu()?;
    let started = Instant::now();
    let (mut latencies, failures) = produce(&producer, &topic.name, &body, count, in_flight).await;
    let seconds = started.elapsed().as_secs_f64();
    let own = harness::own_ticks().saturating_sub(own_before);
    let machine = harness::machine_busy_ticks().saturating_sub(machine_before);
    let broker_cpu_s = broker_before
        .zip(broker_cpu()?)
        .map(|(b, a)| (a - b).max(0.0));
    if latencies.is_empty() {
        bail!("the direct producer had no event acknowledged: {failures:?}");
    }
    latencies.sort_by(f64::total_cmp);
    let events = latencies.len() as u64;
    let producer_cpu_s = own as f64 / ticks;
    let ours = own as f64 / ticks + broker_cpu_s.unwrap_or(0.0);
    Ok(ProducerRun {
        command,
        topic: topic.name.clone(),
        in_flight,
        events,
        failures,
        seconds,
        events_per_s: events as f64 / seconds,
        p50_us: percentile(&latencies, 50.0),
        p99_us: percentile(&latencies, 99.0),
        p999_us: percentile(&latencies, 99.9),
        producer_cpu_s,
        events_per_producer_cpu_s: events as f64 / producer_cpu_s.max(1.0 / ticks),
        broker: broker.map(|b| b.name.clone()),
        broker_cpu_s,
        other_cpu_s: (machine as f64 / ticks - ours).max(0.0),
        load_avg: load,
    })
}

// ----------------------------------------------------------------- report ---

fn print_producer(p: &ProducerRun) {
    println!(
        "{:<10} {:<12} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>9.2} {:>11.0} {:>9.2} {:>5.2}",
        "producer",
        "max rate",
        p.events_per_s,
        p.p50_us,
        p.p99_us,
        p.p999_us,
        p.producer_cpu_s,
        p.events_per_producer_cpu_s,
        p.other_cpu_s,
        p.load_avg
    );
    println!(
        "producer:  {} events acknowledged in {:.2} s, {} sends in flight; cpu-s is this \
         process's (librdkafka's threads and the tasks awaiting reports)",
        p.events, p.seconds, p.in_flight
    );
    println!("  producer   {}", p.command);
}

/// The broker's CPU per event, in µs, of a run that used `cpu_s` of it for `events`.
fn broker_us_per_event(cpu_s: Option<f64>, events: u64) -> Option<f64> {
    cpu_s
        .filter(|_| events > 0)
        .map(|s| s * 1e6 / events as f64)
}

/// Answers other than 202 in the publish runs, and events failed by the direct producer: each
/// printed as a warning; the number of warnings.
fn failure_warnings(publish: Option<&Target>, producer: Option<&ProducerRun>) -> usize {
    let mut warned = 0;
    for m in publish.iter().flat_map(|t| [&t.max, &t.fixed]) {
        if !m.failures.is_empty() {
            warned += 1;
            let total: u64 = m.failures.values().sum();
            println!(
                "WARNING: publish {}: {total} answer(s) were not 202 and are not counted: {:?}",
                m.load, m.failures
            );
        }
    }
    if let Some(p) = producer.filter(|p| !p.failures.is_empty()) {
        warned += 1;
        let total: u64 = p.failures.values().sum();
        println!(
            "WARNING: the direct producer had {total} event(s) fail, not counted: {:?}",
            p.failures
        );
    }
    warned
}

/// `make`: how the run was started (with `SLUICE_BENCH_PRODUCER` when it was set).
fn rows(
    settings: &Settings,
    make: &str,
    proxy: Option<&Target>,
    publish: &Target,
    producer: Option<&ProducerRun>,
) -> Vec<Row> {
    let rate = settings.rate;
    let connections = settings.connections;
    let mut rows = Vec::new();
    if let Some(proxy) = proxy {
        let peer = "sluice-dp bare proxy, same POSTs";
        let both = |a: &Measurement, b: &Measurement| {
            format!("{make}; publish: {} | proxy: {}", a.command, b.command)
        };
        let max_cmd = both(&publish.max, &proxy.max);
        let fixed_cmd = both(&publish.fixed, &proxy.fixed);
        let cpu_us = |m: &Measurement| m.requests_per_proxy_cpu_s.map(|r| 1e6 / r);
        rows.extend([
            Row::new(
                &format!("req per sluice-dp CPU-s (goal ratio>={GOAL_CPU_RATIO})"),
                peer,
                "req/cpu-s",
                publish.max.requests_per_proxy_cpu_s.unwrap_or(f64::NAN),
                proxy.max.requests_per_proxy_cpu_s,
                &max_cmd,
            ),
            Row::new(
                "sluice-dp CPU per request, max rate",
                peer,
                "us",
                cpu_us(&publish.max).unwrap_or(f64::NAN),
                cpu_us(&proxy.max),
                &max_cmd,
            ),
            Row::new(
                &format!("requests/s, max rate, {connections} connections"),
                peer,
                "req/s",
                publish.max.requests_per_s,
                Some(proxy.max.requests_per_s),
                &max_cmd,
            ),
            Row::new(
                "p50 latency, max rate",
                peer,
                "us",
                publish.max.p50_us,
                Some(proxy.max.p50_us),
                &max_cmd,
            ),
            Row::new(
                "p99 latency, max rate",
                peer,
                "us",
                publish.max.p99_us,
                Some(proxy.max.p99_us),
                &max_cmd,
            ),
            Row::new(
                &format!("req per sluice-dp CPU-s at {rate} req/s"),
                peer,
                "req/cpu-s",
                publish.fixed.requests_per_proxy_cpu_s.unwrap_or(f64::NAN),
                proxy.fixed.requests_per_proxy_cpu_s,
                &fixed_cmd,
            ),
            Row::new(
                &format!("p50 latency at {rate} req/s"),
                peer,
                "us",
                publish.fixed.p50_us,
                Some(proxy.fixed.p50_us),
                &fixed_cmd,
            ),
            Row::new(
                &format!("p99 latency at {rate} req/s"),
                peer,
                "us",
                publish.fixed.p99_us,
                Some(proxy.fixed.p99_us),
                &fixed_cmd,
            ),
            Row::new(
                &format!("p99 at {rate} req/s (goal <= proxy p99 + 2ms)"),
                "goal: bare proxy p99 + 2 ms",
                "us",
                publish.fixed.p99_us,
                Some(proxy.fixed.p99_us + GOAL_ADDED_P99_US),
                &fixed_cmd,
            ),
        ]);
    }
    if let Some(p) = producer {
        let peer = "rdkafka producer, same broker";
        let command = format!(
            "{make}; publish: {} | producer: {}",
            publish.max.command, p.command
        );
        rows.extend([
            Row::new(
                "requests/s vs producer events/s, max rate",
                peer,
                "req/s",
                publish.max.requests_per_s,
                Some(p.events_per_s),
                &command,
            ),
            Row::new(
                "p50 latency vs delivery p50, max rate",
                peer,
                "us",
                publish.max.p50_us,
                Some(p.p50_us),
                &command,
            ),
            Row::new(
                "p99 latency vs delivery p99, max rate",
                peer,
                "us",
                publish.max.p99_us,
                Some(p.p99_us),
                &command,
            ),
            Row::new(
                "events per CPU-s, sluice-dp vs producer",
                peer,
                "req/cpu-s",
                publish.max.requests_per_proxy_cpu_s.unwrap_or(f64::NAN),
                Some(p.events_per_producer_cpu_s),
                &command,
            ),
        ]);
        let ours = broker_us_per_event(publish.max.service_cpu_s, publish.max.requests);
        let theirs = broker_us_per_event(p.broker_cpu_s, p.events);
        if let (Some(ours), Some(broker)) = (ours, &p.broker) {
            rows.push(Row::new(
                &format!("{broker} CPU per event, max rate"),
                peer,
                "us",
                ours,
                theirs,
                &command,
            ));
        }
    }
    rows
}

fn print_goals(settings: &Settings, proxy: &Target, publish: &Target) {
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("goals (durable publish):");
    if let (Some(p), Some(b)) = (
        publish.max.requests_per_proxy_cpu_s,
        proxy.max.requests_per_proxy_cpu_s,
    ) {
        let ratio = p / b;
        println!(
            "  requests per sluice-dp CPU-second >= {GOAL_CPU_RATIO}x its bare proxy's: \
             {ratio:.2}x ({p:.0} vs {b:.0})  {}",
            verdict(ratio >= GOAL_CPU_RATIO)
        );
    }
    let limit = proxy.fixed.p99_us + GOAL_ADDED_P99_US;
    let rate = f64::from(settings.rate);
    let short = harness::short_of_rate(&[proxy, publish], rate);
    println!(
        "  p99 at {} req/s <= the proxy's p99 + 2 ms: {:.0} us vs {:.0} + 2000 us  {}{short}",
        settings.rate,
        publish.fixed.p99_us,
        proxy.fixed.p99_us,
        verdict(publish.fixed.p99_us <= limit)
    );
}

fn write_producer(run: &ProducerRun) -> anyhow::Result<()> {
    let out = harness::workspace_root().join(format!("target/bench/{NAME}-producer.json"));
    std::fs::create_dir_all(out.parent().context("no parent")?)?;
    std::fs::write(&out, serde_json::to_string_pretty(run)?)?;
    println!("written: {}", out.display());
    Ok(())
}

// ------------------------------------------------------------------- main ---

async fn run() -> anyhow::Result<()> {
    let mut settings = Settings::from_env(&TARGETS)?;
    if std::env::var("SLUICE_BENCH_RATE").map_or(true, |r| r.is_empty()) {
        settings.rate = DEFAULT_RATE;
    }
    let partitions: i32 = harness::env_num("SLUICE_BENCH_PARTITIONS", 1)?;
    anyhow::ensure!(
        partitions >= 1,
        "SLUICE_BENCH_PARTITIONS must be at least 1"
    );
    let overrides =
        producer_overrides(&std::env::var("SLUICE_BENCH_PRODUCER").unwrap_or_default())?;
    if cfg!(debug_assertions) {
        eprintln!(
            "{NAME}: WARNING: a debug build; run with --release for figures that mean anything"
        );
    }
    let start = harness::check_start_load(NAME);
    let tools: Tools = harness::tools(NAME)?;
    let sluice = ["proxy", "publish"].iter().any(|t| settings.measures(t));
    let dp = if sluice {
        Some(harness::sluice_dp(NAME).await?)
    } else {
        None
    };
    let bootstrap = kafka_bootstrap();
    let broker = BrokerProcess::find();
    match &broker {
        Some(b) => eprintln!(
            "{NAME}: broker at {bootstrap}; its process: {} (pid {})",
            b.name, b.pid
        ),
        None => eprintln!("{NAME}: broker at {bootstrap}; its process is not on this machine"),
    }

    let dir = harness::fresh_dir(NAME)?;
    let body = event_body()?;
    let body_file = dir.join("event.json");
    std::fs::write(&body_file, &body)?;
    let request = Request {
        method: "POST",
        path: PATH,
        body: Some((&body_file, CONTENT_TYPE)),
        status: 200,
    };
    let (backend, backend_port) = harness::start_backend(&tools, &dir).await?;
    let bench = Bench {
        program: NAME,
        settings: &settings,
        tools: &tools,
        ticks: clock_ticks(),
        backend: &backend,
    };

    let proxy = if settings.measures("proxy") {
        let dp = dp.as_ref().context("sluice-dp was not built")?;
        let target = SluiceTarget {
            name: "proxy",
            config: harness::bare_proxy_conf(backend_port),
            args: Vec::new(),
            headers: &[],
            service: None,
            unauthenticated: None,
        };
        Some(harness::measure_sluice_with(&bench, dp, &dir, &target, request).await?)
    } else {
        None
    };

    let mut topics = Vec::new();
    let publish = if settings.measures("publish") {
        let dp = dp.as_ref().context("sluice-dp was not built")?;
        let topic = TestTopic::create(partitions).await?;
        eprintln!(
            "{NAME}: publish: topic {} ({partitions} partition(s))",
            topic.name
        );
        let target = SluiceTarget {
            name: "publish",
            config: publish_conf(backend_port, &bootstrap, &topic.name, &overrides),
            args: Vec::new(),
            headers: &[],
            service: broker.as_ref().map(|b| b as &dyn CpuMeter),
            unauthenticated: None,
        };
        let accepted = Request {
            status: 202,
            ..request
        };
        let measured = harness::measure_sluice_with(&bench, dp, &dir, &target, accepted).await?;
        topics.push((topic, measured.max.requests + measured.fixed.requests));
        Some(measured)
    } else {
        None
    };

    let producer = if settings.measures("producer") {
        let count = publish.as_ref().map_or_else(
            || settings.seconds * u64::from(settings.rate),
            |p| p.max.requests,
        );
        let topic = TestTopic::create(partitions).await?;
        let run = measure_producer(
            &settings,
            &bootstrap,
            &topic,
            &body,
            count,
            broker.as_ref(),
            &overrides,
        )
        .await?;
        topics.push((topic, run.events));
        Some(run)
    } else {
        None
    };

    let targets: Vec<&Target> = [proxy.as_ref(), publish.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    print_targets(&settings, &tools, &targets);
    if let Some(p) = &producer {
        print_producer(p);
    }
    println!(
        "body: {} ({} bytes of JSON, Content-Type {CONTENT_TYPE}); broker: {bootstrap}, topics of \
         {partitions} partition(s), created for this run and deleted after it",
        body_file.display(),
        body.len()
    );
    let experiment = (!overrides.is_empty()).then(|| {
        let pairs: Vec<String> = overrides.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.join(",")
    });
    if let Some(pairs) = &experiment {
        println!(
            "NOTE: {pairs} (SLUICE_BENCH_PRODUCER) for the node's producer and the direct one, \
             in place of Sluice's defaults: an experiment, not the benchmark"
        );
    }
    // The broker must hold at least every event answered 202 (warm-up events come on top).
    for (topic, acknowledged) in &topics {
        match events_in(topic) {
            Ok(held) if held >= i64::try_from(*acknowledged).unwrap_or(i64::MAX) => println!(
                "topic {}: {held} events held, {acknowledged} acknowledged in measured runs",
                topic.name
            ),
            Ok(held) => bail!(
                "topic {} holds {held} events, fewer than the {acknowledged} acknowledged",
                topic.name
            ),
            Err(e) => println!("topic {}: cannot count its events: {e:#}", topic.name),
        }
    }
    let warned =
        warnings(&settings, &targets) + failure_warnings(publish.as_ref(), producer.as_ref());

    if let Some(publish) = &publish {
        let make = experiment.as_ref().map_or_else(
            || MAKE.to_owned(),
            |pairs| format!("SLUICE_BENCH_PRODUCER={pairs} {MAKE}"),
        );
        let rows = rows(&settings, &make, proxy.as_ref(), publish, producer.as_ref());
        if !rows.is_empty() {
            report(NAME, &rows)?;
        }
        if let Some(proxy) = &proxy {
            print_goals(&settings, proxy, publish);
        }
    } else {
        println!("(publish not measured: no side-by-side rows; see target/bench/{NAME}-runs.json)");
    }
    if warned > 0 {
        println!("{warned} warning(s) above: read the figures with them in mind");
    }
    if let Some(p) = &producer {
        write_producer(p)?;
    }
    harness::write_runs(NAME, &settings, &tools, start, &targets)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // Ctrl-C drops `run`, and with it every server it started (their Drop stops them) and
    // every topic it created (deleted).
    tokio::select! {
        result = run() => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    }
}

#[cfg(test)]
mod tests {
    use sluice_proto::declarative::{Format, load};

    #[test]
    fn the_publish_configuration_is_the_bare_proxy_plus_a_publish_route() {
        let overrides = super::producer_overrides("linger.ms=5, socket.nagle.disable=false")
            .expect("two pairs");
        let text = super::publish_conf(8081, "127.0.0.1:9092", "t1", &overrides);
        let config = load(&text, Format::Yaml).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.apis[0].routes.len(), 2, "{text}");
        assert_eq!(config.brokers.len(), 1, "{text}");
        assert!(
            text.contains(r#"properties: { linger.ms: "5", socket.nagle.disable: "false" }"#),
            "{text}"
        );
    }

    #[test]
    fn the_direct_producer_takes_the_same_overrides_as_the_node() {
        let overrides = super::producer_overrides("linger.ms=5,fetch.wait.max.ms=7").unwrap();
        let settings = super::producer_settings(&overrides);
        let get = |key: &str| {
            settings
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("linger.ms"), Some("5"), "replaced in place");
        assert_eq!(get("fetch.wait.max.ms"), Some("7"), "added");
        assert_eq!(get("acks"), Some("all"), "the node's defaults stay");
        assert_eq!(get("client.id"), Some("sluice-bench"));
        assert!(super::producer_overrides("linger.ms").is_err());
    }
}
