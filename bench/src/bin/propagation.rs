//! Configuration propagation (issue 5's benchmark): a control plane on the services' Postgres,
//! `SLUICE_BENCH_NODES` data planes (default 50) streaming from it, and `SLUICE_BENCH_COMMITS`
//! commits (default 100), each changing what every node serves. For each commit: the time from
//! the commit (the apply call's answer) until every node has ACKed it, as the control plane's
//! `GET /v1/dataplanes` reports, polled every 2 ms. Goal: p99 ≤ 100 ms.

use std::time::{Duration, Instant};

use anyhow::bail;
use sluice_bench::{Row, percentile, report};
use sluice_tests::control_plane::ControlPlane;
use sluice_tests::data_plane::DataPlane;

const COMMAND: &str = "make bench (cargo run --release -p sluice-bench --bin propagation)";
const POLL: Duration = Duration::from_millis(2);

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn document(round: usize) -> String {
    format!(
        "format_version: 1\napis:\n  - name: bench\n    routes:\n      \
         - {{ name: round, path: /round, direct_response: {{ status: 200, body: \"{round}\" }} }}\n"
    )
}

/// Nodes that have applied `version` or a later one.
async fn acked(cp: &ControlPlane, version: u64) -> anyhow::Result<usize> {
    Ok(cp
        .dataplanes()
        .await?
        .iter()
        .filter(|n| n["applied_version"].as_u64().is_some_and(|v| v >= version))
        .count())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nodes = setting("SLUICE_BENCH_NODES", 50);
    let commits = setting("SLUICE_BENCH_COMMITS", 100);
    sluice_bench::build_binaries(
        "propagation",
        &["sluice-control-plane", "sluice-data-plane"],
    )
    .await?;
    let cp = ControlPlane::start(&[]).await?;
    cp.apply(&document(0)).await?;
    eprintln!("propagation: starting {nodes} data planes");
    let mut fleet = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let id = format!("bench-{i}");
        fleet.push(DataPlane::start_from_control_plane(
            &cp.discovery_url(),
            "default",
            &["--node-id", &id, "--workers", "1"],
        )?);
    }
    eprintln!(
        "propagation: {commits} commits, each timed until all {nodes} nodes ACK (polled every {POLL:?})"
    );
    let mut times = Vec::with_capacity(commits);
    for round in 1..=commits {
        let version = cp.apply(&document(round)).await?;
        let committed = Instant::now();
        let deadline = committed + Duration::from_secs(10);
        while acked(&cp, version).await? < nodes {
            if Instant::now() > deadline {
                bail!("version {version} was not ACKed by every node within 10 s");
            }
            tokio::time::sleep(POLL).await;
        }
        times.push(committed.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&times, 50.0),
        percentile(&times, 99.0),
        times[times.len() - 1],
    );
    println!(
        "propagation: {nodes} nodes, {commits} commits: commit -> all ACKed p50 {p50:.1} ms, \
         p99 {p99:.1} ms, max {max:.1} ms (coalescing window 50 ms included)"
    );
    let peer = format!("goal, {nodes} nodes");
    let rows = [
        Row::new(
            "commit -> all nodes ACKed, p50",
            &peer,
            "ms",
            p50,
            None,
            COMMAND,
        ),
        Row::new(
            "commit -> all nodes ACKed, p99 (goal <= 100 ms)",
            &peer,
            "ms",
            p99,
            Some(100.0),
            COMMAND,
        ),
        Row::new(
            "commit -> all nodes ACKed, max",
            &peer,
            "ms",
            max,
            None,
            COMMAND,
        ),
    ];
    report("propagation", &rows)?;
    println!(
        "goals (issue 5):\n  propagation p99 <= 100 ms: {p99:.1} ms  {}",
        if p99 <= 100.0 { "met" } else { "NOT met" }
    );
    drop(fleet);
    Ok(())
}
