//! The data plane as a keep-alive reverse proxy, side by side with nginx (issue 4's benchmark).
//!
//! One run measures three targets in front of the same backend (an nginx of its own that
//! answers `200 ok`), with the same load generator settings (oha, N connections, keep-alive):
//!
//! - `direct`: the backend itself, the baseline for "added latency";
//! - `nginx`: nginx as a reverse proxy, `worker_processes` = the worker count;
//! - `sluice`: `sluice-dp --workers` = the same worker count, one route `/` to the backend.
//!
//! For each: requests/s, p50/p99 at the maximum rate the machine gives, then the same at a
//! fixed rate (10k req/s, coordinated omission corrected); the proxy's CPU seconds (utime +
//! stime from /proc of every process in its process group) and requests per CPU-second; its
//! RSS when idle and at peak. The CPU that processes outside the benchmark used during each
//! run is measured too, so a busy machine is reported instead of silently skewing figures.
//!
//! Settings (environment): `SLUICE_BENCH_SECONDS` (per run, default 10), `SLUICE_BENCH_WARMUP`
//! (default 2), `SLUICE_BENCH_CONNECTIONS` (default 50), `SLUICE_BENCH_RATE` (default 10000),
//! `SLUICE_BENCH_WORKERS` (default 1, for both proxies; 0 is one per CPU), `SLUICE_BENCH_ONLY` (`nginx` or `sluice`: measure one
//! proxy only), `SLUICE_BENCH_NGINX` / `SLUICE_BENCH_OHA` (tools; otherwise
//! `scripts/bench-tools.sh` finds or installs them).

use sluice_bench::harness::{
    self, Bench, Measurement, Settings, SluiceTarget, Target, Tools, clock_ticks, print_targets,
    warnings,
};
use sluice_bench::{Row, report};

const NAME: &str = "proxy";
const MAKE: &str = "make bench (cargo run --release -p sluice-bench --bin proxy)";
/// Goals of issue 4.
const GOAL_CPU_RATIO: f64 = 1.1;
const GOAL_IDLE_RSS_MB: f64 = 20.0;

// ----------------------------------------------------------------- report ---

fn rows(
    settings: &Settings,
    tools: &Tools,
    direct: &Target,
    sluice: &Target,
    nginx: &Target,
) -> Vec<Row> {
    let peer = format!(
        "nginx {}, worker_processes {}",
        tools.nginx_version.trim_start_matches("nginx/"),
        settings.nginx_workers()
    );
    let both =
        |a: &Measurement, b: &Measurement| format!("sluice: {} | nginx: {}", a.command, b.command);
    let max_cmd = both(&sluice.max, &nginx.max);
    let fixed_cmd = both(&sluice.fixed, &nginx.fixed);
    let rate = settings.rate;
    let started = format!(
        "{MAKE}; RSS: VmRSS/VmHWM of /proc/PID/status over the proxy's processes; sluice: {} | \
         nginx: {}",
        sluice.started_as.as_deref().unwrap_or("-"),
        nginx.started_as.as_deref().unwrap_or("-"),
    );
    let added = |t: &Target, p: fn(&Measurement) -> f64| p(&t.fixed) - p(&direct.fixed);
    let p50 = |m: &Measurement| m.p50_us;
    let p99 = |m: &Measurement| m.p99_us;
    vec![
        Row::new(
            &format!("requests/s, max rate, {} connections", settings.connections),
            &peer,
            "req/s",
            sluice.max.requests_per_s,
            Some(nginx.max.requests_per_s),
            &max_cmd,
        ),
        Row::new(
            "p50 latency, max rate",
            &peer,
            "us",
            sluice.max.p50_us,
            Some(nginx.max.p50_us),
            &max_cmd,
        ),
        Row::new(
            "p99 latency, max rate",
            &peer,
            "us",
            sluice.max.p99_us,
            Some(nginx.max.p99_us),
            &max_cmd,
        ),
        Row::new(
            "proxy CPU seconds, max rate",
            &peer,
            "cpu-s",
            sluice.max.proxy_cpu_s.unwrap_or(f64::NAN),
            nginx.max.proxy_cpu_s,
            &max_cmd,
        ),
        Row::new(
            &format!("requests per proxy CPU-s (goal ratio>={GOAL_CPU_RATIO})"),
            &peer,
            "req/cpu-s",
            sluice.max.requests_per_proxy_cpu_s.unwrap_or(f64::NAN),
            nginx.max.requests_per_proxy_cpu_s,
            &max_cmd,
        ),
        Row::new(
            &format!("p50 latency at {rate} req/s"),
            &peer,
            "us",
            sluice.fixed.p50_us,
            Some(nginx.fixed.p50_us),
            &fixed_cmd,
        ),
        Row::new(
            &format!("p99 latency at {rate} req/s"),
            &peer,
            "us",
            sluice.fixed.p99_us,
            Some(nginx.fixed.p99_us),
            &fixed_cmd,
        ),
        Row::new(
            &format!("requests per proxy CPU-s at {rate} req/s"),
            &peer,
            "req/cpu-s",
            sluice.fixed.requests_per_proxy_cpu_s.unwrap_or(f64::NAN),
            nginx.fixed.requests_per_proxy_cpu_s,
            &fixed_cmd,
        ),
        Row::new(
            &format!("added p50 at {rate} req/s over direct"),
            &peer,
            "us",
            added(sluice, p50),
            Some(added(nginx, p50)),
            &fixed_cmd,
        ),
        Row::new(
            &format!("added p99 at {rate} req/s (goal: <= nginx)"),
            &peer,
            "us",
            added(sluice, p99),
            Some(added(nginx, p99)),
            &fixed_cmd,
        ),
        Row::new(
            "idle RSS",
            &peer,
            "MB",
            sluice.idle_rss_mb.unwrap_or(f64::NAN),
            nginx.idle_rss_mb,
            &started,
        ),
        Row::new(
            &format!("idle RSS (goal <= {GOAL_IDLE_RSS_MB} MB)"),
            "goal",
            "MB",
            sluice.idle_rss_mb.unwrap_or(f64::NAN),
            Some(GOAL_IDLE_RSS_MB),
            &started,
        ),
        Row::new(
            "peak RSS (VmHWM)",
            &peer,
            "MB",
            sluice.peak_rss_mb.unwrap_or(f64::NAN),
            nginx.peak_rss_mb,
            &started,
        ),
    ]
}

fn print_goals(settings: &Settings, direct: &Target, sluice: &Target, nginx: &Target) {
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("goals (issue 4):");
    if let (Some(s), Some(n)) = (
        sluice.max.requests_per_proxy_cpu_s,
        nginx.max.requests_per_proxy_cpu_s,
    ) {
        let ratio = s / n;
        println!(
            "  requests per proxy CPU-second >= {GOAL_CPU_RATIO}x nginx: {ratio:.2}x ({s:.0} vs \
             {n:.0})  {}",
            verdict(ratio >= GOAL_CPU_RATIO)
        );
    }
    let s = sluice.fixed.p99_us - direct.fixed.p99_us;
    let n = nginx.fixed.p99_us - direct.fixed.p99_us;
    let rate = f64::from(settings.rate);
    let short = harness::short_of_rate(&[sluice, nginx], rate);
    println!(
        "  added p99 at {} req/s <= nginx's: {s:.0} us vs {n:.0} us  {}{short}",
        settings.rate,
        verdict(s <= n)
    );
    if let Some(idle) = sluice.idle_rss_mb {
        println!(
            "  idle RSS <= {GOAL_IDLE_RSS_MB} MB: {idle:.1} MB  {}",
            verdict(idle <= GOAL_IDLE_RSS_MB)
        );
    }
}

// ------------------------------------------------------------------- main ---

async fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env(&["nginx", "sluice"])?;
    if cfg!(debug_assertions) {
        eprintln!(
            "proxy: WARNING: a debug build; run with --release for figures that mean anything"
        );
    }
    let start = harness::check_start_load(NAME);
    let tools = harness::tools(NAME)?;
    let sluice_dp = if settings.measures("sluice") {
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

    let sluice = if let Some(dp) = &sluice_dp {
        let target = SluiceTarget {
            name: "sluice",
            config: harness::bare_proxy_conf(backend_port),
            args: Vec::new(),
            headers: &[],
            service: None,
            unauthenticated: None,
        };
        Some(harness::measure_sluice(&bench, dp, &dir, &target).await?)
    } else {
        None
    };

    let targets: Vec<&Target> = [Some(&direct), nginx.as_ref(), sluice.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    print_targets(&settings, &tools, &targets);
    let warned = warnings(&settings, &targets);

    if let (Some(sluice), Some(nginx)) = (&sluice, &nginx) {
        report(NAME, &rows(&settings, &tools, &direct, sluice, nginx))?;
        print_goals(&settings, &direct, sluice, nginx);
    } else {
        println!("(one proxy measured: no side-by-side rows; see target/bench/{NAME}-runs.json)");
    }
    if warned > 0 {
        println!("{warned} warning(s) above: read the figures with them in mind");
    }
    harness::write_runs(NAME, &settings, &tools, start, &targets)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // Ctrl-C drops `run`, and with it every server it started (their Drop stops them).
    tokio::select! {
        result = run() => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    }
}
