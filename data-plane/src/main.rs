//! `sluice-dp`: the Sluice data plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use sluice_data_plane::auth::AccessGuard;
use sluice_data_plane::auth::jwks::JwksCache;
use sluice_data_plane::config::{CompiledConfig, ConfigStore, watch};
use sluice_data_plane::ratelimit::RedisLimiter;
use sluice_data_plane::server::forwarding::TrustedProxies;
use sluice_data_plane::server::pipeline::{Gateway, Limits};
use sluice_data_plane::server::{self, Listener, ListenerSettings};
use sluice_data_plane::telemetry::Metrics;
use sluice_data_plane::tls;
use sluice_data_plane::{admin, discovery};
use sluice_proto::pb;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// mimalloc rather than the system allocator: a proxy allocates and frees many small,
/// short-lived buffers per request (headers, URIs, body frames), which mimalloc's per-thread
/// free lists serve with less work than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Sluice data plane: a reverse proxy serving either a declarative file (standalone mode,
/// reloaded when it changes) or its group's configuration streamed from control planes.
#[derive(Debug, Parser)]
// A flag given twice takes its last value, so a deployment's extra arguments can override
// what a chart sets (repeating a flag is otherwise an error, and the pod would not start).
#[command(name = "sluice-dp", version = env!("SLUICE_BUILD_VERSION"), args_override_self = true)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "control_plane"])))]
struct Args {
    /// Standalone mode: serve this declarative file (YAML, or JSON if it ends in .json).
    #[arg(long, value_name = "FILE", env = "SLUICE_DP_CONFIG")]
    config: Option<PathBuf>,
    /// Control-plane mode: the discovery address of a control plane (`http://host:7091`);
    /// repeat it (or separate with commas) for several replicas, tried in turn.
    #[arg(
        long,
        value_name = "URL",
        env = "SLUICE_DP_CONTROL_PLANE",
        value_delimiter = ','
    )]
    control_plane: Vec<String>,
    /// The group (environment) whose configuration this node serves, in control-plane mode.
    #[arg(
        long,
        value_name = "GROUP",
        env = "SLUICE_DP_GROUP",
        default_value = "default"
    )]
    group: String,
    /// Control-plane mode: keep each applied configuration in this file (atomically, with a
    /// checksum), and start from it when no control plane answers.
    #[arg(long, value_name = "FILE", env = "SLUICE_DP_CACHE_FILE")]
    cache_file: Option<PathBuf>,
    /// This node's id, stable across restarts; default: a new UUID at each start.
    #[arg(long, value_name = "ID", env = "SLUICE_DP_NODE_ID")]
    node_id: Option<String>,
    /// Client listener (HTTP/1.1 and h2c on one port).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:8080",
        env = "SLUICE_DP_LISTEN"
    )]
    listen: SocketAddr,
    /// TLS client listener (HTTP/1.1 and h2 by ALPN), off when unset. Certificates come from
    /// the config's `certificates`, chosen by SNI at each handshake.
    #[arg(long, value_name = "ADDR", env = "SLUICE_DP_TLS_LISTEN")]
    tls_listen: Option<SocketAddr>,
    /// Admin listener: /healthz, /readyz, /config, /metrics. Keep it private.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:9901",
        env = "SLUICE_DP_ADMIN_LISTEN"
    )]
    admin_listen: SocketAddr,
    /// Worker threads; 0 means one per CPU.
    #[arg(long, value_name = "N", default_value_t = 0, env = "SLUICE_DP_WORKERS")]
    workers: usize,
    /// How often the config file is checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    watch_interval: Duration,
    /// Largest request body, declared or streamed; 413 beyond.
    #[arg(long, value_name = "BYTES", default_value_t = 10 * 1024 * 1024)]
    max_body_bytes: u64,
    /// Largest request head (request line and headers); 431 beyond.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// Most request headers; 431 beyond.
    #[arg(long, value_name = "N", default_value_t = 100)]
    max_headers: usize,
    /// A client must send its request headers within this time.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// An upstream response body that sends nothing for this long is cut off (the client's
    /// response ends with an error, the upstream slot is freed). 0s: no limit.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    upstream_idle_timeout: Duration,
    /// An HTTP/2 client connection that starts no request for this long is sent GOAWAY (its
    /// open streams finish first). 0s: never.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// A client connection whose writes make no progress for this long (the client stopped
    /// reading) is closed; an HTTP/2 stream that has had bytes to send and sent none for this
    /// long (no flow-control window) is reset.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    send_timeout: Duration,
    /// Most open client connections, all listeners together; at the limit new connections
    /// wait in the kernel's backlog until one closes.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10_000,
        env = "SLUICE_DP_MAX_CONNECTIONS"
    )]
    max_connections: usize,
    /// How long a publish route remembers the answer to an `Idempotency-Key` (in Redis with
    /// --redis-url, shared by every node; else in this node's memory).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration, env = "SLUICE_DP_IDEMPOTENCY_TTL")]
    idempotency_ttl: Duration,
    /// On SIGTERM, how long requests in flight may take to finish.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Redis for rate limits with `mode: redis` and plans' monthly quotas, shared by every
    /// node (`redis://host:6379/0`). Without it those budgets follow their policy's
    /// `fail_open`.
    #[arg(long, value_name = "URL", env = "SLUICE_DP_REDIS_URL")]
    redis_url: Option<String>,
    /// Prefix of every Redis key the node writes; nodes sharing budgets share the prefix.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "sluice:",
        env = "SLUICE_DP_REDIS_PREFIX"
    )]
    redis_prefix: String,
    /// Longest a request waits on Redis for its rate limits (connecting included); past it,
    /// the policy's `fail_open` decides.
    #[arg(long, value_name = "DURATION", default_value = "25ms", value_parser = humantime::parse_duration, env = "SLUICE_DP_REDIS_TIMEOUT")]
    redis_timeout: Duration,
    /// Most rate-limit budgets counted in this node's memory at once (one per consumer,
    /// address or API and policy); idle ones make room first.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    local_rate_limit_budgets: usize,
    /// Failed authentications a client address may make per minute; past it, its attempts
    /// are refused (429) without being checked until the minute's budget allows another.
    /// 0 turns this off.
    #[arg(long, value_name = "N", default_value_t = 60)]
    auth_failures_per_minute: u64,
    /// The load balancers or proxies in front of the node (addresses or CIDR networks,
    /// comma-separated): a request from one of them is from the address its `X-Forwarded-For`
    /// names (read from the right past every trusted hop), over the scheme its
    /// `X-Forwarded-Proto` names. Default: none, and the client is the TCP peer.
    #[arg(
        long,
        value_name = "CIDR",
        value_delimiter = ',',
        env = "SLUICE_DP_TRUSTED_PROXIES"
    )]
    trusted_proxies: Vec<String>,
    /// Every client connection (plain and TLS) starts with a PROXY protocol header, version
    /// 1 or 2, as an L4 load balancer writes it: a connection without one is closed. The
    /// address it names is the client when the connection comes from one of
    /// `--trusted-proxies` (which must be set), whose `X-Forwarded-For` is then read as
    /// well. The admin listener does not take the header.
    #[arg(long, env = "SLUICE_DP_PROXY_PROTOCOL")]
    proxy_protocol: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (_log_guard, log_errors) = init_logging();
    // One worker: a current-thread runtime, which skips the work-stealing scheduler's
    // cross-thread bookkeeping (the process's one thread runs every task).
    let mut runtime = if args.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        if args.workers > 0 {
            runtime.worker_threads(args.workers);
        }
        runtime
    };
    runtime.enable_all().thread_name("sluice-dp");
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sluice-dp: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args, log_errors))
}

async fn run(args: Args, log_errors: ErrorCounter) -> ExitCode {
    let trusted_proxies = match TrustedProxies::parse(&args.trusted_proxies) {
        Ok(trusted) => trusted,
        Err(e) => {
            eprintln!("sluice-dp: --trusted-proxies: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.proxy_protocol && args.trusted_proxies.is_empty() {
        eprintln!(
            "sluice-dp: --proxy-protocol: set --trusted-proxies to the load balancers that send the header \
             (the address it names is believed only from them)"
        );
        return ExitCode::FAILURE;
    }
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(ConfigStore::new(
        JwksCache::new(tokio::runtime::Handle::current()),
        metrics.clone(),
    ));
    let redis = match &args.redis_url {
        Some(url) => match RedisLimiter::new(url, args.redis_prefix.clone(), args.redis_timeout) {
            Ok(redis) => Some(Arc::new(redis)),
            Err(e) => {
                eprintln!("sluice-dp: --redis-url: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let guard = Arc::new(AccessGuard::new(
        redis,
        args.local_rate_limit_budgets,
        args.auth_failures_per_minute,
    ));

    if let Some(path) = &args.config {
        let loaded = CompiledConfig::read_file(path).and_then(|text| {
            let compiled = CompiledConfig::from_text(path, &text, None, &metrics, &store.jwks)?;
            Ok((compiled, watch::digest(text.as_bytes())))
        });
        let applied = match loaded {
            Ok((config, applied)) => {
                tracing::info!(path = %path.display(), content_hash = %config.content_hash, routes = config.router.len(), "configuration applied");
                store.apply(config);
                metrics.config_swaps.inc();
                applied
            }
            Err(e) => {
                eprintln!("sluice-dp: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::spawn(watch::watch_file(
            path.clone(),
            args.watch_interval,
            applied,
            store.clone(),
            metrics.clone(),
        ));
    } else {
        if let Err(e) = sluice_proto::validate::check_name(&args.group) {
            eprintln!("sluice-dp: --group: {e}");
            return ExitCode::FAILURE;
        }
        // Not ready (503 on /readyz and to clients) until the first configuration arrives.
        let node = pb::Node {
            id: args
                .node_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            group: args.group.clone(),
            build_version: env!("SLUICE_BUILD_VERSION").to_owned(),
            protocol_version: pb::ProtocolVersion::Current as u32,
            labels: Default::default(),
            address: args.listen.to_string(),
        };
        let settings = discovery::ClientSettings {
            endpoints: args.control_plane.clone(),
            node,
            cache: args.cache_file.clone(),
        };
        discovery::start_from_cache(&settings, &store, &metrics).await;
        tokio::spawn(discovery::run(settings, store.clone(), metrics.clone()));
    }
    {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            loop {
                ticker.tick().await;
                metrics
                    .access_log_dropped
                    .set(u64::try_from(log_errors.dropped_lines()).unwrap_or(u64::MAX));
            }
        });
    }

    let mut listeners = Vec::new();
    for (addr, tls) in [(Some(args.listen), false), (args.tls_listen, true)] {
        let Some(addr) = addr else { continue };
        let tcp = match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("sluice-dp: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let tls = match tls.then(|| tls::server_config(store.clone())).transpose() {
            Ok(config) => config.map(tokio_rustls::TlsAcceptor::from),
            Err(e) => {
                eprintln!("sluice-dp: cannot set up TLS: {e}");
                return ExitCode::FAILURE;
            }
        };
        listeners.push(Listener { tcp, tls });
    }
    let admin_listener = match tokio::net::TcpListener::bind(args.admin_listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "sluice-dp: cannot listen on {} (admin): {e}",
                args.admin_listen
            );
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %args.listen, tls = ?args.tls_listen, admin = %args.admin_listen, "listening");

    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin = tokio::spawn(
        axum::serve(
            admin_listener,
            admin::router(store.clone(), metrics.clone(), draining.clone()),
        )
        .with_graceful_shutdown(async {
            let _ = admin_stopped.await;
        })
        .into_future(),
    );
    let gateway = Arc::new(Gateway::new(
        store,
        metrics,
        Limits {
            max_body_bytes: args.max_body_bytes,
            idempotency_ttl: args.idempotency_ttl,
            upstream_idle_timeout: args.upstream_idle_timeout,
        },
        guard,
        trusted_proxies,
    ));
    let settings = ListenerSettings {
        header_read_timeout: args.header_read_timeout,
        send_timeout: args.send_timeout,
        idle_timeout: args.idle_timeout,
        max_header_bytes: args.max_header_bytes,
        max_headers: args.max_headers,
        drain_timeout: args.drain_timeout,
        max_connections: args.max_connections,
        proxy_protocol: args.proxy_protocol,
    };
    let stopping = async move {
        shutdown_signal().await;
        // /readyz says so from here on, while connections drain.
        draining.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    server::serve(listeners, gateway, settings, stopping).await;
    let _ = stop_admin.send(());
    match admin.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("sluice-dp: admin listener failed: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sluice-dp: admin listener task failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Lines buffered for the log writer before new ones are dropped (and counted): a slow
/// terminal or pipe never stalls requests.
const LOG_BUFFER_LINES: usize = 64 * 1024;

/// JSON logs (the access log included) on stderr, written by a background thread;
/// `RUST_LOG` filters (default `info`).
fn init_logging() -> (WorkerGuard, ErrorCounter) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .finish(std::io::stderr());
    let errors = writer.error_counter();
    tracing_subscriber::fmt()
        .json()
        .with_writer(writer)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    (guard, errors)
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
