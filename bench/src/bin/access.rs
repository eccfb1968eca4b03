//! Access control end to end (the access-control issue's benchmark): `sluice-dp` checking an
//! API key, the consumer's subscription and its plan's rate limit on every request, side by side
//! with nginx as a bare reverse proxy, in front of the same backend, with the same load
//! generator settings as the `proxy` benchmark (oha, N connections, keep-alive).
//!
//! Targets, each alone in turn:
//! - `direct`: the backend itself, the baseline for added latency;
//! - `nginx`: nginx as a reverse proxy, no access control (it has none to compare);
//! - `sluice`: `sluice-dp` with the route open, as in the `proxy` benchmark: what access
//!   control adds to it;
//! - `key-local`: the route behind a `key_auth` policy, 1000 consumers with a key and a
//!   subscription each, under a plan whose rate limit (a million a second, counted in the
//!   node's memory) never refuses; oha sends one consumer's key;
//! - `key-redis`: the same with the plan's limit `mode: redis`, counted in the services'
//!   Redis (`--redis-url`, a key prefix of its own, removed afterwards); Redis's CPU during
//!   each run is read from `INFO cpu` and reported beside the proxy's.
//!
//! The goal: with access control, at least 0.9x nginx's requests per proxy CPU-second.
//!
//! Settings: those of the `proxy` benchmark (`SLUICE_BENCH_SECONDS`, `_WARMUP`, `_CONNECTIONS`,
//! `_RATE`, `_WORKERS`, `SLUICE_BENCH_NGINX` / `_OHA`), `SLUICE_BENCH_ONLY` (comma-separated
//! among `nginx`, `sluice`, `key-local`, `key-redis`) and `SLUICE_BENCH_REDIS_URL` (default:
//! `SLUICE_TEST_REDIS_URL` from `scripts/services.sh`, else `redis://127.0.0.1:6379`).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use sluice_bench::harness::{
    self, Bench, CpuMeter, Measurement, Settings, SluiceTarget, Target, Tools, clock_ticks,
    print_targets, warnings,
};
use sluice_bench::large::{KEY_AUTH_POLICY, api_key, unreached_rate_limit};
use sluice_bench::{Row, report};

const NAME: &str = "access";
const MAKE: &str = "make bench (cargo run --release -p sluice-bench --bin access)";
/// The goal: requests per proxy CPU-second with access control, against nginx's.
const GOAL_CPU_RATIO: f64 = 0.9;
/// Consumers in the configuration, each with one API key and a subscription.
const CONSUMERS: usize = 1_000;
/// The consumer whose key oha sends.
const CALLER: usize = CONSUMERS / 2;
const TARGETS: [&str; 4] = ["nginx", "sluice", "key-local", "key-redis"];

/// The route behind an API key and a subscription under a plan whose rate limit, counted in
/// `mode` (`local` or `redis`), never refuses ([`unreached_rate_limit`]). `fail_open` is left
/// off: a request Redis did not count is answered 503, which stops the benchmark (more than
/// 0.1% of requests failing), so every 200 of `key-redis` was counted in Redis.
fn access_conf(backend: u16, mode: &str) -> String {
    let rate = unreached_rate_limit();
    let mut yaml = format!(
        "format_version: 1
upstreams:
  - name: backend
    targets: [{{ url: \"http://127.0.0.1:{backend}\" }}]
policies:
  - name: {KEY_AUTH_POLICY}
    key_auth: {{ headers: [x-api-key] }}
plans:
  - name: unreached
    rate_limits: [{{ limit: {limit}, per: second, burst: {burst} }}]
    mode: {mode}
apis:
  - name: bench
    policies: [{KEY_AUTH_POLICY}]
    routes:
      - name: all
        path: /
        proxy: {{ upstream: backend }}
consumers:
",
        limit = rate.limit,
        burst = rate.burst,
    );
    for c in 0..CONSUMERS {
        let _ = writeln!(
            yaml,
            "  - name: c-{c}\n    credentials:\n      - api_key: {{ key: {} }}",
            api_key(c, 0)
        );
    }
    yaml.push_str("subscriptions:\n");
    for c in 0..CONSUMERS {
        let _ = writeln!(
            yaml,
            "  - {{ consumer: c-{c}, api: bench, plan: unreached }}"
        );
    }
    yaml
}

// ------------------------------------------------------------------ redis ---

/// The services' Redis: its CPU (`INFO cpu`) and the keys under the benchmark's prefix.
#[derive(Debug)]
struct Redis {
    url: String,
    client: redis::Client,
    /// Unique to this run, so that its budgets start empty and are removed afterwards.
    prefix: String,
}

impl Redis {
    fn from_env() -> anyhow::Result<Self> {
        let url = ["SLUICE_BENCH_REDIS_URL", "SLUICE_TEST_REDIS_URL"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
        let client = redis::Client::open(url.as_str()).context("SLUICE_BENCH_REDIS_URL")?;
        let since_epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let prefix = format!(
            "sluice-bench-access-{}-{}:",
            std::process::id(),
            since_epoch.as_millis()
        );
        let redis = Redis {
            url,
            client,
            prefix,
        };
        redis.cpu_seconds().with_context(|| {
            format!(
                "Redis at {} does not answer (make services starts it; \
                 SLUICE_BENCH_ONLY=nginx,sluice,key-local measures without it)",
                redis.url
            )
        })?;
        Ok(redis)
    }

    fn connection(&self) -> anyhow::Result<redis::Connection> {
        Ok(self
            .client
            .get_connection_with_timeout(Duration::from_secs(2))?)
    }

    /// The keys under the prefix.
    fn keys(&self) -> anyhow::Result<Vec<String>> {
        let mut connection = self.connection()?;
        let mut keys = Vec::new();
        let mut cursor = 0_u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query(&mut connection)?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// Removes the keys under the prefix.
    fn clean(&self) -> anyhow::Result<usize> {
        let keys = self.keys()?;
        if !keys.is_empty() {
            let mut connection = self.connection()?;
            redis::cmd("UNLINK")
                .arg(&keys)
                .query::<u64>(&mut connection)?;
        }
        Ok(keys.len())
    }
}

impl CpuMeter for Redis {
    fn name(&self) -> &str {
        "redis"
    }

    /// `used_cpu_user` + `used_cpu_sys` of `INFO cpu`: the server's CPU, all its threads.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query(&mut self.connection()?)?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .with_context(|| format!("no {name} in INFO cpu"))
        };
        Ok(field("used_cpu_user")? + field("used_cpu_sys")?)
    }
}

// ----------------------------------------------------------------- report ---

/// The figures of one Sluice target against nginx's.
fn rows(
    settings: &Settings,
    tools: &Tools,
    direct: &Target,
    ours: &Target,
    nginx: &Target,
) -> Vec<Row> {
    let peer = format!(
        "nginx {}, worker_processes {}",
        tools.nginx_version.trim_start_matches("nginx/"),
        settings.nginx_workers()
    );
    let name = &ours.name;
    let both = |a: &Measurement, b: &Measurement| {
        format!("{MAKE}; {name}: {} | nginx: {}", a.command, b.command)
    };
    let max_cmd = both(&ours.max, &nginx.max);
    let fixed_cmd = both(&ours.fixed, &nginx.fixed);
    let rate = settings.rate;
    let added = |t: &Target| t.fixed.p99_us - direct.fixed.p99_us;
    let mut rows = vec![Row::new(
        &format!("{name}: req per proxy CPU-s (goal ratio>={GOAL_CPU_RATIO})"),
        &peer,
        "req/cpu-s",
        ours.max.requests_per_proxy_cpu_s.unwrap_or(f64::NAN),
        nginx.max.requests_per_proxy_cpu_s,
        &max_cmd,
    )];
    if let Some(with_service) = ours.max.requests_per_cpu_s_with_service {
        rows.push(Row::new(
            &format!(
                "{name}: req per CPU-s, proxy + {}",
                ours.max.service.as_deref().unwrap_or("service")
            ),
            &peer,
            "req/cpu-s",
            with_service,
            nginx.max.requests_per_proxy_cpu_s,
            &max_cmd,
        ));
    }
    rows.extend([
        Row::new(
            &format!("{name}: requests/s, max rate"),
            &peer,
            "req/s",
            ours.max.requests_per_s,
            Some(nginx.max.requests_per_s),
            &max_cmd,
        ),
        Row::new(
            &format!("{name}: p50 latency, max rate"),
            &peer,
            "us",
            ours.max.p50_us,
            Some(nginx.max.p50_us),
            &max_cmd,
        ),
        Row::new(
            &format!("{name}: p99 latency, max rate"),
            &peer,
            "us",
            ours.max.p99_us,
            Some(nginx.max.p99_us),
            &max_cmd,
        ),
        Row::new(
            &format!("{name}: p99.9 latency, max rate"),
            &peer,
            "us",
            ours.max.p999_us,
            Some(nginx.max.p999_us),
            &max_cmd,
        ),
        Row::new(
            &format!("{name}: p50 latency at {rate} req/s"),
            &peer,
            "us",
            ours.fixed.p50_us,
            Some(nginx.fixed.p50_us),
            &fixed_cmd,
        ),
        Row::new(
            &format!("{name}: p99 latency at {rate} req/s"),
            &peer,
            "us",
            ours.fixed.p99_us,
            Some(nginx.fixed.p99_us),
            &fixed_cmd,
        ),
        Row::new(
            &format!("{name}: added p99 at {rate} req/s"),
            &peer,
            "us",
            added(ours),
            Some(added(nginx)),
            &fixed_cmd,
        ),
    ]);
    rows
}

/// What access control costs Sluice: each access target against the open route.
fn cost_rows(open: &Target, checked: &[&Target]) -> Vec<Row> {
    let mut rows = Vec::new();
    let Some(open_rate) = open.max.requests_per_proxy_cpu_s else {
        return rows;
    };
    for t in checked {
        let Some(rate) = t.max.requests_per_proxy_cpu_s else {
            continue;
        };
        let command = format!(
            "{MAKE}; {}: {} | sluice: {}",
            t.name, t.max.command, open.max.command
        );
        rows.push(Row::new(
            &format!("{}: req per proxy CPU-s", t.name),
            "sluice-dp, route open",
            "req/cpu-s",
            rate,
            Some(open_rate),
            &command,
        ));
        rows.push(Row::new(
            &format!("{}: proxy CPU added per request", t.name),
            "sluice-dp, route open",
            "us",
            1e6 / rate - 1e6 / open_rate,
            None,
            &command,
        ));
    }
    rows
}

fn print_goals(checked: &[&Target], nginx: &Target) {
    let Some(n) = nginx.max.requests_per_proxy_cpu_s else {
        return;
    };
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("goals (access control):");
    for t in checked {
        let Some(s) = t.max.requests_per_proxy_cpu_s else {
            continue;
        };
        let ratio = s / n;
        println!(
            "  {}: requests per proxy CPU-second >= {GOAL_CPU_RATIO}x nginx: {ratio:.2}x ({s:.0} \
             vs {n:.0})  {}",
            t.name,
            verdict(ratio >= GOAL_CPU_RATIO)
        );
        if let (Some(service), Some(with)) = (&t.max.service, t.max.requests_per_cpu_s_with_service)
        {
            println!(
                "  {}: counting {service}'s CPU too: {:.2}x ({with:.0} vs {n:.0})",
                t.name,
                with / n
            );
        }
    }
}

// ------------------------------------------------------------------- main ---

async fn run(redis: Option<&Redis>) -> anyhow::Result<()> {
    let settings = Settings::from_env(&TARGETS)?;
    if cfg!(debug_assertions) {
        eprintln!(
            "{NAME}: WARNING: a debug build; run with --release for figures that mean anything"
        );
    }
    let start = harness::check_start_load(NAME);
    let tools = harness::tools(NAME)?;
    let sluice = TARGETS[1..].iter().any(|t| settings.measures(t));
    let dp = if sluice {
        Some(harness::sluice_dp(NAME).await?)
    } else {
        None
    };

    let dir = harness::fresh_dir(NAME)?;
    let (backend, backend_port) = harness::start_backend(&tools, &dir).await?;
    let bench = Bench {
        program: NAME,
        settings: &settings,
        tools: &tools,
        ticks: clock_ticks(),
        backend: &backend,
    };

    let direct = harness::measure_direct(&bench, backend_port).await?;
    let nginx = if settings.measures("nginx") {
        Some(harness::measure_nginx(&bench, &dir, backend_port).await?)
    } else {
        None
    };

    let key = [format!("x-api-key: {}", api_key(CALLER, 0))];
    let mut sluice_targets = Vec::new();
    if settings.measures("sluice") {
        sluice_targets.push(SluiceTarget {
            name: "sluice",
            config: harness::bare_proxy_conf(backend_port),
            args: Vec::new(),
            headers: &[],
            service: None,
            unauthenticated: None,
        });
    }
    if settings.measures("key-local") {
        sluice_targets.push(SluiceTarget {
            name: "key-local",
            config: access_conf(backend_port, "local"),
            args: Vec::new(),
            headers: &key,
            service: None,
            unauthenticated: Some(401),
        });
    }
    if let Some(redis) = redis.filter(|_| settings.measures("key-redis")) {
        sluice_targets.push(SluiceTarget {
            name: "key-redis",
            config: access_conf(backend_port, "redis"),
            args: vec![
                "--redis-url".to_owned(),
                redis.url.clone(),
                "--redis-prefix".to_owned(),
                redis.prefix.clone(),
            ],
            headers: &key,
            service: Some(redis),
            unauthenticated: Some(401),
        });
    }
    let mut measured = Vec::new();
    for target in &sluice_targets {
        let dp = dp.as_ref().context("sluice-dp was not built")?;
        measured.push(harness::measure_sluice(&bench, dp, &dir, target).await?);
    }

    let targets: Vec<&Target> = [Some(&direct), nginx.as_ref()]
        .into_iter()
        .flatten()
        .chain(&measured)
        .collect();
    print_targets(&settings, &tools, &targets);
    let warned = warnings(&settings, &targets);

    let checked: Vec<&Target> = measured.iter().filter(|t| t.name != "sluice").collect();
    let open = measured.iter().find(|t| t.name == "sluice");
    let mut rows = Vec::new();
    if let Some(nginx) = &nginx {
        for t in open.iter().chain(&checked) {
            rows.extend(self::rows(&settings, &tools, &direct, t, nginx));
        }
    }
    if let Some(open) = open {
        rows.extend(cost_rows(open, &checked));
    }
    if rows.is_empty() {
        println!("(nothing to compare: no side-by-side rows; see target/bench/{NAME}-runs.json)");
    } else {
        report(NAME, &rows)?;
    }
    if let Some(nginx) = &nginx {
        print_goals(&checked, nginx);
    }
    if warned > 0 {
        println!("{warned} warning(s) above: read the figures with them in mind");
    }
    harness::write_runs(NAME, &settings, &tools, start, &targets)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let only = std::env::var("SLUICE_BENCH_ONLY").unwrap_or_default();
    let redis = if only.is_empty() || only.split(',').any(|t| t.trim() == "key-redis") {
        Some(Redis::from_env()?)
    } else {
        None
    };
    // Ctrl-C drops `run`, and with it every server it started (their Drop stops them).
    let result = tokio::select! {
        result = run(redis.as_ref()) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Some(redis) = &redis {
        match redis.clean() {
            Ok(n) => eprintln!("{NAME}: removed {n} Redis key(s) under {}", redis.prefix),
            Err(e) => eprintln!(
                "{NAME}: cannot remove the Redis keys under {}: {e}",
                redis.prefix
            ),
        }
    }
    result
}
