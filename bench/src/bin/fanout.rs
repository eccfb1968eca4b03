//! SSE fan-out (issue 7's benchmark): many concurrent subscribers of one topic on one node,
//! one event per second, and how late each event reaches each subscriber.
//!
//! One `sluice-dp` (release) serves a topic: a publish route and a subscribe route. The topic
//! is on the memory broker by default; with `SLUICE_BENCH_BROKER=kafka` it is a fresh topic on
//! the Kafka broker at `SLUICE_TEST_KAFKA_BOOTSTRAP` (the services' tansu by default), read by
//! the node's shared feed, so that each latency also holds the durable publish and the feed's
//! fetch (the node's `fetch.wait.max.ms` is `SLUICE_BENCH_FETCH_WAIT_MS`, default 5: see
//! [`KAFKA_FETCH_WAIT_MS`]). This program opens `SLUICE_BENCH_CLIENTS` SSE streams (default
//! 10,000; plain TCP, HTTP/1.1, each stream read by its own task), then publishes one event per
//! second for
//! `SLUICE_BENCH_SECONDS` (default 20) through the publish route. Each event's body is the
//! wall-clock time it was sent, in nanoseconds; a subscriber's delivery latency is its receive
//! time minus that (same machine, same clock). Reported: p50/p99/max delivery latency over
//! every (event, subscriber) pair, events missing, and the node's memory per connection (RSS
//! with every stream open minus RSS before any, over the number of streams).
//!
//! The clients run on the same two cores as the node: the latency includes the time this
//! program takes to read 10k sockets after each event. So that this machine's own cost is in
//! the same run, the same clients then measure a **bare writer** ([`bare_writer`]): one
//! thread that writes each event to every stream with one `write(2)` from one loop, the least
//! any server can do per delivery. Its figures are the floor under the node's on this machine.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sluice_bench::harness::{Server, clock_ticks, env_num, fresh_dir, sluice_dp};
use sluice_bench::{Row, report};
use sluice_tests::kafka::TestTopic;
use sluice_tests::kafka_bootstrap;
use sluice_tests::ports::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NAME: &str = "fanout";
const MAKE: &str = "make bench (cargo run --release -p sluice-bench --bin fanout)";
/// Goals of issue 7.
const GOAL_P99_MS: f64 = 50.0;
const GOAL_KB_PER_CONNECTION: f64 = 16.0;
/// Streams opened at once while connecting.
const CONNECT_CONCURRENCY: usize = 256;
/// This program's argument that makes it the bare writer, serving at the address after it.
const BARE_WRITER: &str = "--bare-writer";

/// The node's `fetch.wait.max.ms` on Kafka unless `SLUICE_BENCH_FETCH_WAIT_MS` says. tansu
/// 0.6.0 answers a fetch only after sleeping (half of the wait left, or all of it under 250 ms)
/// even when it already has records, so librdkafka's default of 500 ms would add a quarter of a
/// second or more to every delivery; a broker that answers a long poll as soon as records
/// arrive (Apache Kafka) needs no such setting.
const KAFKA_FETCH_WAIT_MS: u32 = 5;

/// Where the benchmark's topic lives.
enum Broker {
    Memory,
    /// A topic of its own, deleted when the benchmark ends, and the node's `fetch.wait.max.ms`.
    Kafka(TestTopic, u32),
}

impl Broker {
    async fn from_env() -> anyhow::Result<Self> {
        match std::env::var("SLUICE_BENCH_BROKER").as_deref() {
            Err(_) | Ok("memory") => Ok(Broker::Memory),
            Ok("kafka") => Ok(Broker::Kafka(
                TestTopic::create(1).await?,
                env_num("SLUICE_BENCH_FETCH_WAIT_MS", KAFKA_FETCH_WAIT_MS)?,
            )),
            Ok(other) => anyhow::bail!("SLUICE_BENCH_BROKER is memory or kafka, not {other:?}"),
        }
    }

    /// The report's name, so that the two brokers' results do not overwrite each other.
    fn report_name(&self) -> &'static str {
        match self {
            Broker::Memory => NAME,
            Broker::Kafka(..) => "fanout-kafka",
        }
    }

    /// The environment that chose it, for the report's command line.
    fn env(&self) -> String {
        match self {
            Broker::Memory => "SLUICE_BENCH_BROKER=memory".to_owned(),
            Broker::Kafka(_, wait) => format!(
                "SLUICE_BENCH_BROKER=kafka SLUICE_BENCH_FETCH_WAIT_MS={wait} \
                 SLUICE_TEST_KAFKA_BOOTSTRAP={}",
                kafka_bootstrap()
            ),
        }
    }

    /// How the broker was set, for the report.
    fn described(&self) -> String {
        match self {
            Broker::Memory => "memory broker".to_owned(),
            Broker::Kafka(_, wait) => format!("kafka, fetch.wait.max.ms {wait}"),
        }
    }

    fn config(&self) -> String {
        let (broker, topic) = match self {
            Broker::Memory => (
                "  - name: local\n    memory: { retained_events: 100 }".to_owned(),
                "ticks",
            ),
            Broker::Kafka(topic, wait) => (
                format!(
                    "  - name: local\n    kafka: {{ bootstrap_servers: [\"{}\"], \
                     properties: {{ fetch.wait.max.ms: \"{wait}\" }} }}",
                    kafka_bootstrap()
                ),
                topic.name.as_str(),
            ),
        };
        format!(
            "format_version: 1
brokers:
{broker}
apis:
  - name: bench
    routes:
      - name: publish
        methods: [POST]
        path: /events
        path_match: exact
        publish: {{ broker: local, topic: {topic} }}
      - name: stream
        methods: [GET]
        path: /stream
        path_match: exact
        subscribe: {{ broker: local, topic: {topic}, start: latest, heartbeat: 60s }}
"
        )
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Opens one stream and returns once its headers and first frame arrived; the task it
/// spawns then records each event's latency (ns) until `events` arrived or the stream ends.
async fn subscribe(
    addr: SocketAddr,
    events: usize,
    opened: Arc<AtomicUsize>,
) -> anyhow::Result<tokio::task::JoinHandle<Vec<u64>>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /stream HTTP/1.1\r\nhost: bench\r\naccept: text/event-stream\r\n\r\n")
        .await?;
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // The head and the first frame (": ok").
    while !buffer.windows(6).any(|w| w == b": ok\n\n") {
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the stream closed before it opened");
        buffer.extend_from_slice(&chunk[..n]);
        anyhow::ensure!(
            buffer.len() < 64 * 1024,
            "no SSE stream: {}",
            String::from_utf8_lossy(&buffer)
        );
    }
    anyhow::ensure!(
        buffer.starts_with(b"HTTP/1.1 200"),
        "the stream answered {}",
        String::from_utf8_lossy(&buffer[..buffer.len().min(200)])
    );
    opened.fetch_add(1, Ordering::Relaxed);
    buffer.clear();
    Ok(tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(events);
        let mut chunk = [0u8; 4096];
        while latencies.len() < events {
            let n = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let received = now_ns();
            buffer.extend_from_slice(&chunk[..n]);
            // Chunked encoding wraps the frames; the `data: ` lines are found as they are.
            while let Some(start) = buffer.windows(6).position(|w| w == b"data: ") {
                let Some(end) = buffer[start..].iter().position(|b| *b == b'\n') else {
                    break;
                };
                let line = &buffer[start + 6..start + end];
                if let Some(sent) = std::str::from_utf8(line)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                {
                    latencies.push(received.saturating_sub(sent));
                }
                buffer.drain(..start + end + 1);
            }
        }
        latencies
    }))
}

async fn publish(addr: SocketAddr) -> anyhow::Result<()> {
    let body = now_ns().to_string();
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "POST /events HTTP/1.1\r\nhost: bench\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    anyhow::ensure!(
        answer.starts_with(b"HTTP/1.1 202"),
        "publish answered {}",
        String::from_utf8_lossy(&answer)
    );
    Ok(())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1e6
}

/// What one server's run measured.
struct Measured {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    expected: usize,
    missing: usize,
    kb_per_connection: f64,
    cpu_us_per_delivery: f64,
    peak_rss_mb: f64,
}

/// Opens `clients` streams on the server at `addr`, publishes one event a second for
/// `seconds` through it, and measures how late each reached each stream and what it cost the
/// server.
async fn measure(
    name: &str,
    server: &Server,
    addr: SocketAddr,
    clients: usize,
    seconds: usize,
) -> anyhow::Result<Measured> {
    let rss_before_kb = server.usage().rss_kb;
    eprintln!("{name}: opening {clients} streams");
    let opened = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut readers = Vec::with_capacity(clients);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let permit = semaphore.clone().acquire_owned().await?;
        let opened = opened.clone();
        connecting.spawn(async move {
            let reader = subscribe(addr, seconds, opened).await;
            drop(permit);
            reader
        });
    }
    while let Some(reader) = connecting.join_next().await {
        readers.push(reader?.context("opening a stream")?);
    }
    let connect_time = started.elapsed();
    // Let allocations settle before reading the server's memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_open_kb = server.usage().rss_kb;
    eprintln!(
        "{name}: {} streams open in {connect_time:?}; RSS {rss_before_kb} KB -> {rss_open_kb} KB",
        opened.load(Ordering::Relaxed)
    );

    let cpu_before = server.usage().cpu_ticks;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for _ in 0..seconds {
        tick.tick().await;
        publish(addr).await?;
    }
    let mut latencies = Vec::with_capacity(clients * seconds);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for reader in readers {
        match tokio::time::timeout_at(deadline, reader).await {
            Ok(Ok(mut got)) => latencies.append(&mut got),
            Ok(Err(e)) => anyhow::bail!("a reader failed: {e}"),
            // Counted below as missing.
            Err(_) => {}
        }
    }
    // Once every reader has its events, so that the last event's deliveries are counted too.
    let cpu_ticks = server.usage().cpu_ticks - cpu_before;
    let expected = clients * seconds;
    latencies.sort_unstable();
    Ok(Measured {
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        max_ms: percentile(&latencies, 100.0),
        expected,
        missing: expected.saturating_sub(latencies.len()),
        kb_per_connection: (rss_open_kb.saturating_sub(rss_before_kb)) as f64
            / clients.max(1) as f64,
        cpu_us_per_delivery: cpu_ticks as f64 / clock_ticks() * 1e6 / latencies.len().max(1) as f64,
        peak_rss_mb: server.usage().hwm_kb as f64 / 1024.0,
    })
}

/// Starts this program again as the bare writer, in `dir`, and waits until it answers.
async fn start_bare_writer(dir: &Path) -> anyhow::Result<(Server, SocketAddr)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let program = std::env::current_exe().context("cannot find this program to run it again")?;
    let args = [BARE_WRITER.to_owned(), addr.to_string()];
    let mut server = Server::start("bare-writer", &program, &args, &[], dir)?;
    server.wait_ready(addr, "/ready", &[], "ok").await?;
    Ok((server, addr))
}

async fn run() -> anyhow::Result<()> {
    let clients: usize = env_num("SLUICE_BENCH_CLIENTS", 10_000)?;
    let seconds: usize = env_num("SLUICE_BENCH_SECONDS", 20)?;
    let workers: usize = env_num("SLUICE_BENCH_WORKERS", 1)?;
    let broker = Broker::from_env().await?;
    let name = broker.report_name();
    let (dp, _) = sluice_dp(NAME).await?;
    let dir = fresh_dir(name)?;
    let file = dir.join("fanout.yaml");
    std::fs::write(&file, broker.config())?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let args = vec![
        "--config".to_owned(),
        file.display().to_string(),
        "--listen".to_owned(),
        addr.to_string(),
        "--admin-listen".to_owned(),
        admin.to_string(),
        "--workers".to_owned(),
        workers.to_string(),
        "--max-connections".to_owned(),
        (clients + 100).to_string(),
    ];
    let mut server = Server::start("sluice", &dp, &args, &[("RUST_LOG", "warn")], &dir)?;
    server.wait_ready(admin, "/readyz", &[], "").await?;
    let ours = measure(name, &server, addr, clients, seconds).await?;
    drop(server);
    let (floor_server, floor_addr) = start_bare_writer(&dir).await?;
    let floor = measure("bare writer", &floor_server, floor_addr, clients, seconds).await?;
    drop(floor_server);

    let peer = format!(
        "{clients} SSE clients, 1 event/s for {seconds} s, --workers {workers}, {}",
        broker.described()
    );
    let goal = format!("goal, {}", broker.described());
    let bare = "bare writer: 1 thread, 1 write(2) per stream";
    let command = format!(
        "{MAKE}; {} SLUICE_BENCH_CLIENTS={clients} SLUICE_BENCH_SECONDS={seconds} \
         SLUICE_BENCH_WORKERS={workers}",
        broker.env()
    );
    let rows = vec![
        Row::new(
            "fanout delivery latency p99 (ms)",
            &goal,
            "ms",
            ours.p99_ms,
            Some(GOAL_P99_MS),
            &command,
        ),
        Row::new(
            "fanout delivery latency p99 vs the floor (ms)",
            bare,
            "ms",
            ours.p99_ms,
            Some(floor.p99_ms),
            &command,
        ),
        Row::new(
            "fanout delivery latency p50 vs the floor (ms)",
            bare,
            "ms",
            ours.p50_ms,
            Some(floor.p50_ms),
            &command,
        ),
        Row::new(
            "fanout delivery latency max (ms)",
            &peer,
            "ms",
            ours.max_ms,
            None,
            &command,
        ),
        Row::new(
            "fanout memory per connection (KB)",
            &goal,
            "KB",
            ours.kb_per_connection,
            Some(GOAL_KB_PER_CONNECTION),
            &command,
        ),
        Row::new(
            "fanout events missing",
            &format!("of {}", ours.expected),
            "count",
            ours.missing as f64,
            None,
            &command,
        ),
        Row::new(
            "fanout events missing, the floor",
            &format!("of {}", floor.expected),
            "count",
            floor.missing as f64,
            None,
            &command,
        ),
        Row::new(
            "fanout CPU per event delivered vs the floor (us)",
            bare,
            "us",
            ours.cpu_us_per_delivery,
            Some(floor.cpu_us_per_delivery),
            &command,
        ),
        Row::new(
            "fanout node peak RSS (MB)",
            &peer,
            "MB",
            ours.peak_rss_mb,
            None,
            &command,
        ),
    ];
    report(name, &rows)?;
    Ok(())
}

/// The least a server can do to deliver each event to every stream: one thread (as the node
/// runs with `--workers 1`) that, when an event is published, formats its SSE chunk once and
/// writes it to every open stream with one `write(2)` each, in one loop. No HTTP library, no
/// task woken per stream, nothing held per stream but its socket. What the clients measure
/// of it is what this machine's kernel and the clients themselves cost: the floor under any
/// server's figures on the same machine.
mod bare_writer {
    use std::cell::{Cell, RefCell};
    use std::io::Write;
    use std::net::SocketAddr;
    use std::rc::Rc;

    use anyhow::Context;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Every open stream's socket (non-blocking), in the order they opened.
    #[derive(Default)]
    struct Streams {
        open: RefCell<Vec<std::net::TcpStream>>,
        events: Cell<u64>,
    }

    pub fn serve(addr: &str) -> anyhow::Result<()> {
        let addr: SocketAddr = addr.parse().context("the bare writer's address")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let listener = TcpListener::bind(addr).await?;
            let streams = Rc::new(Streams::default());
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let streams = streams.clone();
                tokio::task::spawn_local(async move {
                    if let Err(error) = connection(stream, &streams).await {
                        eprintln!("bare writer: {error:#}");
                    }
                });
            }
        })
    }

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    async fn connection(mut stream: TcpStream, streams: &Streams) -> anyhow::Result<()> {
        let mut buffer = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            if let Some(end) = find(&buffer, b"\r\n\r\n") {
                break end + 4;
            }
            let n = stream.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "the client closed before its request's head ended");
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
        if head.starts_with("get /stream ") {
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                      cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n\
                      6\r\n: ok\n\n\r\n",
                )
                .await?;
            streams.open.borrow_mut().push(stream.into_std()?);
            return Ok(());
        }
        if head.starts_with("post /events ") {
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .context("a publish without content-length")?
                .trim()
                .parse()?;
            while buffer.len() < head_end + length {
                let n = stream.read(&mut chunk).await?;
                anyhow::ensure!(n > 0, "the client closed before its body ended");
                buffer.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buffer[head_end..head_end + length]);
            let event = streams.events.get() + 1;
            streams.events.set(event);
            // The node's frame: the stream's position as `id`, the event as `data`.
            let frame = format!("id: 0:{event}\ndata: {body}\n\n");
            let chunk = format!("{:x}\r\n{frame}\r\n", frame.len());
            let mut short = 0;
            for open in streams.open.borrow().iter() {
                let mut socket = open;
                if !matches!(socket.write(chunk.as_bytes()), Ok(n) if n == chunk.len()) {
                    short += 1;
                }
            }
            if short > 0 {
                eprintln!("bare writer: event {event} did not fit {short} streams' sockets");
            }
            stream
                .write_all(
                    b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await?;
            return Ok(());
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .await?;
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, addr] = args.as_slice()
        && flag == BARE_WRITER
    {
        return bare_writer::serve(addr);
    }
    bench()
}

#[tokio::main]
async fn bench() -> anyhow::Result<()> {
    // Ctrl-C drops `run`, and with it the node it started (its Drop stops it).
    tokio::select! {
        result = run() => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    }
}
