//! Configuration distribution at scale (issue 5's scale benchmark): the large registry (1M API
//! keys, 100k consumers and subscriptions, 20k routes) in the services' Postgres, a real
//! `sluice-cp` on it and a real `sluice-dp` streaming from it. Measured:
//! - the full snapshot's encoded bytes, as the control plane counted them when pushing it;
//! - the node's cold apply (check, compile, hash) of that snapshot, from its own histogram, and
//!   its time from start to ready;
//! - the node's RSS once it serves, against the snapshot's bytes;
//! - `SLUICE_BENCH_DELTAS` (default 20) one-consumer commits: each delta's bytes and the node's
//!   apply time (from its histogram), and commit → the node serving it.

use std::time::{Duration, Instant};

use sluice_bench::large::{GROUP, api_keys, id, registry_config};
use sluice_bench::{Row, percentile, report};
use sluice_control_plane::registry::{Plan, Registry, Write};
use sluice_proto::pb::{self, ResourceKind};
use sluice_tests::control_plane::ControlPlane;
use sluice_tests::data_plane::DataPlane;
use sluice_tests::postgres::TestDatabase;

const COMMAND: &str = "make bench (cargo run --release -p sluice-bench --bin scale)";

/// The node's resident set, in bytes, from /proc.
fn rss_bytes(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kib * 1024.0)
}

/// The version the node serves, from `/config`.
async fn node_version(node: &DataPlane) -> anyhow::Result<u64> {
    let admin = node.admin;
    let (status, body) = tokio::task::spawn_blocking(move || {
        sluice_tests::http::get(admin, "/config", Duration::from_secs(5))
    })
    .await??;
    anyhow::ensure!(status == 200, "/config answered {status}: {body}");
    let body: serde_json::Value = serde_json::from_str(&body)?;
    Ok(body["source"]["version"].as_u64().unwrap_or(0))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let deltas: usize = std::env::var("SLUICE_BENCH_DELTAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    sluice_bench::build_binaries("scale", &["sluice-control-plane", "sluice-data-plane"]).await?;
    let database = TestDatabase::create().await?;
    let pool = sluice_control_plane::db::connect(&database.url, Default::default()).await?;
    sluice_control_plane::db::migrate(&pool).await?;
    let registry = Registry::new(pool.clone(), 1000);
    eprintln!("scale: committing the large registry (1M API keys, 20k routes)...");
    registry
        .commit_plan("bench", "initial", Plan::Apply(registry_config()), false)
        .await?;
    let writes = api_keys()
        .into_iter()
        .map(|k| Write::Put {
            resource: k.into(),
            if_match: None,
        })
        .collect();
    registry.commit("bench", "1M keys", writes).await?;

    let cp = ControlPlane::on_database(&database.url, &[])?;
    eprintln!("scale: starting a data plane on it");
    let started = Instant::now();
    let node = DataPlane::start_from_control_plane(&cp.discovery_url(), GROUP, &[])?;
    let ready = started.elapsed();
    let snapshot_bytes = cp
        .metric("sluice_cp_push_bytes_sum", "kind=\"snapshot\"")
        .await?;
    let cold_apply = node
        .metric("sluice_config_apply_seconds_sum", "kind=\"snapshot\"")
        .await?;
    // Let the allocator settle after the snapshot's transient copies.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_bytes(node.process.id())?;

    eprintln!("scale: {deltas} one-consumer commits");
    let (mut bytes, mut applies, mut served) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..deltas {
        let consumer = id(ResourceKind::Consumer, &format!("c-{}", round * 7));
        let mut resource = registry.get(ResourceKind::Consumer, &consumer).await?;
        if let Some(pb::resource::Kind::Consumer(c)) = &mut resource.kind {
            c.custom_id = format!("CUST-changed-{round}");
        }
        let (sent_before, applied_before) = (
            cp.metric("sluice_cp_push_bytes_sum", "kind=\"delta\"")
                .await?,
            node.metric("sluice_config_apply_seconds_sum", "kind=\"delta\"")
                .await?,
        );
        let committed = registry
            .commit(
                "bench",
                "one consumer",
                vec![Write::Put {
                    resource,
                    if_match: None,
                }],
            )
            .await?;
        let version = committed
            .version
            .map(|v| v.number)
            .ok_or_else(|| anyhow::anyhow!("the change made no version"))?;
        let at = Instant::now();
        while node_version(&node).await? < version {
            anyhow::ensure!(
                at.elapsed() < Duration::from_secs(30),
                "version {version} never reached the node"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        served.push(at.elapsed().as_secs_f64() * 1000.0);
        bytes.push(
            cp.metric("sluice_cp_push_bytes_sum", "kind=\"delta\"")
                .await?
                - sent_before,
        );
        applies.push(
            (node
                .metric("sluice_config_apply_seconds_sum", "kind=\"delta\"")
                .await?
                - applied_before)
                * 1000.0,
        );
    }
    anyhow::ensure!(
        bytes.iter().all(|b| *b > 0.0),
        "a change did not travel as a delta: {bytes:?}"
    );
    for series in [&mut bytes, &mut applies, &mut served] {
        series.sort_by(f64::total_cmp);
    }
    let rss_after = rss_bytes(node.process.id())?;

    let peer = "goal (issue 5)";
    let rows = [
        Row::new(
            "full snapshot, 1M keys + 20k routes",
            peer,
            "MB",
            snapshot_bytes / 1e6,
            Some(150.0),
            COMMAND,
        ),
        Row::new(
            "cold apply on a node (check, compile, hash)",
            peer,
            "ms",
            cold_apply * 1000.0,
            Some(5000.0),
            COMMAND,
        ),
        Row::new(
            "node start -> ready (snapshot read, sent, applied)",
            "-",
            "ms",
            ready.as_secs_f64() * 1000.0,
            None,
            COMMAND,
        ),
        Row::new(
            "node RSS / snapshot bytes, after the snapshot",
            peer,
            "x",
            rss / snapshot_bytes,
            Some(2.5),
            COMMAND,
        ),
        Row::new(
            &format!("node RSS / snapshot bytes, after {deltas} deltas"),
            peer,
            "x",
            rss_after / snapshot_bytes,
            Some(2.5),
            COMMAND,
        ),
        Row::new(
            "one-consumer delta, max",
            peer,
            "KB",
            bytes[bytes.len() - 1] / 1000.0,
            Some(10.0),
            COMMAND,
        ),
        Row::new(
            "delta apply on the node, p50",
            peer,
            "ms",
            percentile(&applies, 50.0),
            Some(5.0),
            COMMAND,
        ),
        Row::new(
            "delta apply on the node, max",
            peer,
            "ms",
            applies[applies.len() - 1],
            Some(5.0),
            COMMAND,
        ),
        Row::new(
            "commit -> node serves the delta, p50",
            "-",
            "ms",
            percentile(&served, 50.0),
            None,
            COMMAND,
        ),
    ];
    report("scale", &rows)?;
    drop(node);
    drop(cp);
    drop(database);
    Ok(())
}
