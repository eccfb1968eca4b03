//! What every benchmark program shares: timing, the result rows of DESIGN.md
//! (`{name, peer, metric, ours, theirs, ratio, command, load_avg}`), the table on stdout and
//! `target/bench/NAME.json`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub mod harness;
pub mod large;

use serde::Serialize;

/// One measured figure, beside its peer (another system measured in the same run, or the
/// issue's goal).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    pub peer: String,
    pub metric: String,
    pub ours: f64,
    pub theirs: Option<f64>,
    /// ours / theirs.
    pub ratio: Option<f64>,
    /// What reproduces it.
    pub command: String,
    /// The 1-minute load average when it was measured: a busy machine skews figures.
    pub load_avg: f64,
}

impl Row {
    pub fn new(
        name: &str,
        peer: &str,
        metric: &str,
        ours: f64,
        theirs: Option<f64>,
        command: &str,
    ) -> Self {
        Self {
            name: name.to_owned(),
            peer: peer.to_owned(),
            metric: metric.to_owned(),
            ours,
            theirs,
            ratio: theirs.filter(|t| *t != 0.0).map(|t| ours / t),
            command: command.to_owned(),
            load_avg: load_avg(),
        }
    }
}

/// The 1-minute load average (0 where /proc/loadavg is missing).
pub fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Runs `f` and returns its result and how long it took.
pub async fn timed<T>(f: impl Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

/// The `p`th percentile (nearest rank) of an ascending, non-empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Prints the rows as a table and writes `target/bench/<name>.json`.
pub fn report(name: &str, rows: &[Row]) -> anyhow::Result<PathBuf> {
    println!(
        "\n{:<44} {:<36} {:<10} {:>12} {:>12} {:>8} {:>6}",
        "benchmark", "peer", "metric", "ours", "theirs", "ratio", "load"
    );
    for row in rows {
        let theirs = row
            .theirs
            .map_or_else(|| "-".to_owned(), |t| format!("{t:.1}"));
        let ratio = row
            .ratio
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
        println!(
            "{:<44} {:<36} {:<10} {:>12.1} {:>12} {:>8} {:>6.2}",
            row.name, row.peer, row.metric, row.ours, theirs, ratio, row.load_avg
        );
    }
    if let Some(command) = rows.first().map(|r| &r.command) {
        println!("reproduce: {command}");
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(rows)?)?;
    println!("written: {}", path.display());
    Ok(path)
}

/// Builds the workspace binaries of `packages` with this program's profile (release under
/// `make bench`), so the programs a benchmark starts are as optimised as the benchmark. They
/// land next to this program's own binary.
pub async fn build_binaries(what: &str, packages: &[&str]) -> anyhow::Result<()> {
    let profile = if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut args = vec!["build", "--profile", profile];
    for package in packages {
        args.extend(["-p", package]);
    }
    args.push("--bins");
    eprintln!("{what}: building: cargo {}", args.join(" "));
    let status = tokio::process::Command::new(&cargo)
        .args(&args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| anyhow::anyhow!("cannot run cargo: {e}"))?;
    anyhow::ensure!(status.success(), "cargo build failed ({status})");
    Ok(())
}
