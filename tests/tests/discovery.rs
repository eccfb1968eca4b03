//! Configuration from the control plane: a real `sluice-cp` on its own database streams its
//! groups' configuration to real `sluice-dp` nodes over the discovery protocol.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;
use sluice_tests::backend::EchoBackend;
use sluice_tests::control_plane::{ADMIN_TOKEN, ControlPlane};
use sluice_tests::data_plane::DataPlane;
use sluice_tests::pki::{Leaf, TestCa};

fn document(backend: &EchoBackend, extra_routes: &str, certificates: &str) -> String {
    format!(
        "format_version: 1\n\
         upstreams:\n  - name: app\n    targets: [{{ url: \"{}\" }}]\n\
         apis:\n  - name: shop\n    routes:\n      - {{ name: app, path: /app, proxy: {{ upstream: app }} }}\n{extra_routes}\
         \x20 - name: staging-shop\n    group: staging\n    routes:\n      - {{ name: only-staging, path: /only-staging, direct_response: {{ status: 200 }} }}\n\
         {certificates}",
        backend.url()
    )
}

async fn status(node: &DataPlane, path: &str) -> anyhow::Result<u16> {
    Ok(reqwest::Client::new()
        .get(node.url(path))
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .status()
        .as_u16())
}

/// Polls `GET /v1/dataplanes` until `node`'s status satisfies `test`, for up to 2 s.
async fn status_of(
    cp: &ControlPlane,
    node: &str,
    test: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let found = cp.dataplanes().await?.into_iter().find(|n| n["id"] == node);
        if let Some(status) = &found
            && test(status)
        {
            return Ok(status.clone());
        }
        anyhow::ensure!(Instant::now() < deadline, "status never matched: {found:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn config(node: &DataPlane) -> anyhow::Result<Value> {
    Ok(reqwest::get(format!("http://{}/config", node.admin))
        .await?
        .json()
        .await?)
}

#[tokio::test]
async fn nodes_serve_their_groups_config_follow_commits_and_refuse_what_they_cannot_apply()
-> anyhow::Result<()> {
    let backend = EchoBackend::start("app").await?;
    let cp = ControlPlane::start(&[]).await?;
    let v1 = cp.apply(&document(&backend, "", "")).await?;

    let node = DataPlane::start_from_control_plane(
        &cp.discovery_url(),
        "default",
        &["--node-id", "edge-1"],
    )?;
    assert_eq!(status(&node, "/app/orders").await?, 200);
    let recorded = status_of(&cp, "edge-1", |s| s["applied_version"] == v1).await?;
    assert_eq!(recorded["group"], "default", "{recorded}");
    assert_eq!(recorded["stale"], false, "{recorded}");
    assert_eq!(recorded["versions_behind"], 0, "{recorded}");
    assert_eq!(recorded["connected_replica"], cp.discovery.to_string());
    assert!(recorded["last_ack_at"].is_string(), "{recorded}");
    assert_eq!(
        status(&node, "/only-staging").await?,
        404,
        "another group's route"
    );
    let running = config(&node).await?;
    assert_eq!(running["source"]["kind"], "control_plane", "{running}");
    assert_eq!(running["source"]["version"], v1, "{running}");
    let staging = DataPlane::start_from_control_plane(&cp.discovery_url(), "staging", &[])?;
    assert_eq!(status(&staging, "/only-staging").await?, 200);
    assert_eq!(status(&staging, "/app/orders").await?, 404);

    // A commit reaches the node.
    let ping =
        "      - { name: ping, path: /ping, direct_response: { status: 200, body: pong } }\n";
    let committed = Instant::now();
    let v2 = cp.apply(&document(&backend, ping, "")).await?;
    while status(&node, "/ping").await? != 200 {
        assert!(
            committed.elapsed() < Duration::from_secs(2),
            "the commit never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(config(&node).await?["source"]["version"], v2);

    // A configuration the node cannot apply (a key that is not its certificate's) is refused:
    // the node keeps serving the previous one.
    let ca = TestCa::new("Sluice test CA")?;
    let (one, two) = (ca.leaf(&["a.test"])?, ca.leaf(&["a.test"])?);
    let mismatched = format!(
        "certificates:\n  - name: edge\n    snis: [a.test]\n    cert_pem: {}    key_pem: {}",
        Leaf::yaml_block(&one.cert_pem, 6),
        Leaf::yaml_block(&two.key_pem, 6),
    );
    let rejections = node.metric("sluice_config_rejections_total", "").await?;
    cp.apply(&document(&backend, ping, &mismatched)).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.metric("sluice_config_rejections_total", "").await? <= rejections {
        assert!(
            Instant::now() < deadline,
            "the node never refused the config"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&node, "/ping").await?, 200);
    assert_eq!(config(&node).await?["source"]["version"], v2);
    // The control plane's metrics: the commit-to-ACK time of each ACK, and its nodes.
    assert!(
        cp.metric("sluice_cp_commit_to_ack_seconds_count", "")
            .await?
            >= 2.0
    );
    assert_eq!(cp.metric("sluice_cp_connected_data_planes", "").await?, 2.0);
    // The refusal and its detail show in the node's status, and the node counts as behind.
    let refused = status_of(&cp, "edge-1", |s| !s["last_nack"].is_null()).await?;
    let errors = refused["last_nack"]["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| e["path"] == "certificates[0]"
            && e["reason"].as_str().unwrap_or_default().contains("key_pem")),
        "{refused}"
    );
    assert_eq!(refused["applied_version"], v2, "{refused}");
    assert_eq!(refused["versions_behind"], 1, "{refused}");
    // And in `sluicectl status`.
    let output = std::process::Command::new(sluice_tests::process::binary("sluicectl")?)
        .args(["--server", &cp.url(""), "--token", ADMIN_TOKEN, "status"])
        .env("HOME", "/nonexistent")
        .env_remove("SLUICE_SERVER")
        .env_remove("SLUICE_TOKEN")
        .output()?;
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{table}");
    assert!(
        table.contains("edge-1") && table.contains("key_pem"),
        "{table}"
    );
    Ok(())
}

/// Two consumers with an API key each; `acme_key` is acme's key's SHA-256.
fn consumers(acme_key: &str) -> String {
    format!(
        "consumers:\n  - name: acme\n    credentials:\n      - name: acme-key\n        api_key: {{ key_sha256: \"{acme_key}\" }}\n\
         \x20 - name: globex\n    credentials:\n      - name: globex-key\n        api_key: {{ key_sha256: \"{}\" }}\n",
        "b".repeat(64)
    )
}

/// Polls `/config` until the node runs `version`, for up to 2 s.
async fn runs_version(node: &DataPlane, version: u64) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let running = config(node).await?;
        if running["source"]["version"] == version {
            return Ok(running);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "version {version} never arrived: {running}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn small_changes_travel_as_deltas_and_a_rollback_reaches_every_node() -> anyhow::Result<()> {
    let backend = EchoBackend::start("app").await?;
    let cp = ControlPlane::start(&[]).await?;
    let with_key = |key: &str| document(&backend, "", "") + &consumers(key);
    let v1 = cp.apply(&with_key(&"a".repeat(64))).await?;
    let nodes = [
        DataPlane::start_from_control_plane(&cp.discovery_url(), "default", &["--node-id", "a"])?,
        DataPlane::start_from_control_plane(&cp.discovery_url(), "default", &["--node-id", "b"])?,
    ];
    let mut v1_hash = Value::Null;
    for node in &nodes {
        v1_hash = runs_version(node, v1).await?["content_hash"].clone();
    }

    // One key changes: each node gets a delta, applies it in place and proves by the content
    // hash that it holds what the control plane holds.
    let v2 = cp.apply(&with_key(&"c".repeat(64))).await?;
    for (node, id) in nodes.iter().zip(["a", "b"]) {
        let running = runs_version(node, v2).await?;
        assert_eq!(running["resources"]["credentials"], 2, "{running}");
        assert_eq!(
            node.metric("sluice_config_apply_seconds_count", "kind=\"delta\"")
                .await?,
            1.0,
            "the change arrived as one delta"
        );
        let hash = running["content_hash"].clone();
        assert_ne!(hash, v1_hash);
        status_of(&cp, id, |s| {
            s["applied_version"] == v2 && s["applied_hash"] == hash
        })
        .await?;
    }
    let pushed = |kind: &'static str, what: &'static str| {
        let cp = &cp;
        async move {
            cp.metric(
                &format!("sluice_cp_push_bytes_{what}"),
                &format!("kind=\"{kind}\""),
            )
            .await
        }
    };
    assert_eq!(pushed("delta", "count").await?, 2.0);
    let delta_bytes = pushed("delta", "sum").await? / 2.0;
    let snapshot_bytes = pushed("snapshot", "sum").await? / pushed("snapshot", "count").await?;
    assert!(
        delta_bytes * 3.0 < snapshot_bytes,
        "a one-key delta of {delta_bytes} bytes against a snapshot of {snapshot_bytes}"
    );

    // A rollback to version 1 is a new version with version 1's content, on every node.
    let response = reqwest::Client::new()
        .post(cp.url(&format!("/v1/versions/{v1}/rollback")))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == 200,
        "rollback answered {}",
        response.status()
    );
    let v3 = v2 + 1;
    for node in &nodes {
        let running = runs_version(node, v3).await?;
        assert_eq!(running["content_hash"], v1_hash, "{running}");
    }
    Ok(())
}

#[tokio::test]
async fn a_delta_that_does_not_fit_what_the_node_holds_is_followed_by_the_snapshot()
-> anyhow::Result<()> {
    let backend = EchoBackend::start("app").await?;
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("config.cache");
    let cache_arg = cache.display().to_string();
    // A node caches version 1 of one registry, which has a consumer...
    let first = ControlPlane::start(&[]).await?;
    let v1 = first
        .apply(&(document(&backend, "", "") + &consumers(&"a".repeat(64))))
        .await?;
    let node = DataPlane::start_from_control_plane(
        &first.discovery_url(),
        "default",
        &["--node-id", "moved", "--cache-file", &cache_arg],
    )?;
    runs_version(&node, v1).await?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while !cache.exists() {
        anyhow::ensure!(Instant::now() < deadline, "the cache was never written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(node);
    drop(first);
    // ...and restarts against another registry, whose version 1 has none: the delta from
    // "version 1" cannot give the state the control plane means.
    let second = ControlPlane::start(&[]).await?;
    second.apply(&document(&backend, "", "")).await?;
    let ping = "      - { name: ping, path: /ping, direct_response: { status: 200 } }\n";
    let v2 = second.apply(&document(&backend, ping, "")).await?;
    let node = DataPlane::start_from_control_plane(
        &second.discovery_url(),
        "default",
        &["--node-id", "moved", "--cache-file", &cache_arg],
    )?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let running = loop {
        let running = config(&node).await?;
        if running["source"]["version"] == v2 && running["resources"]["consumers"] == 0 {
            break running;
        }
        anyhow::ensure!(Instant::now() < deadline, "never converged: {running}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status(&node, "/ping").await?, 200);
    // The node applied the delta, found the hash wrong, put its config back and refused it;
    // the control plane then sent the snapshot.
    assert_eq!(
        node.metric("sluice_config_apply_seconds_count", "kind=\"delta\"")
            .await?,
        1.0
    );
    assert!(node.metric("sluice_config_rejections_total", "").await? >= 1.0);
    assert_eq!(
        second
            .metric("sluice_cp_push_bytes_count", "kind=\"delta\"")
            .await?,
        1.0
    );
    assert_eq!(
        second
            .metric("sluice_cp_push_bytes_count", "kind=\"snapshot\"")
            .await?,
        1.0
    );
    let recorded = status_of(&second, "moved", |s| {
        s["applied_hash"] == running["content_hash"] && !s["last_nack"].is_null()
    })
    .await?;
    assert_eq!(
        recorded["last_nack"]["errors"][0]["path"], "content_hash",
        "{recorded}"
    );
    Ok(())
}

#[tokio::test]
async fn a_commit_on_one_replica_reaches_nodes_of_another() -> anyhow::Result<()> {
    let backend = EchoBackend::start("app").await?;
    let a = ControlPlane::start(&[]).await?;
    let b = a.replica(&[])?;
    a.apply(&document(&backend, "", "")).await?;
    let on_b =
        DataPlane::start_from_control_plane(&b.discovery_url(), "default", &["--node-id", "on-b"])?;
    assert_eq!(status(&on_b, "/app/x").await?, 200);
    let ping = "      - { name: ping, path: /ping, direct_response: { status: 200 } }\n";
    let committed = Instant::now();
    let version = a.apply(&document(&backend, ping, "")).await?;
    while status(&on_b, "/ping").await? != 200 {
        assert!(
            committed.elapsed() < Duration::from_secs(2),
            "a commit on replica A never reached a node of replica B"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(config(&on_b).await?["source"]["version"], version);
    // Both replicas report the same status: it lives in the shared registry.
    let via_a = status_of(&a, "on-b", |s| s["applied_version"] == version).await?;
    let via_b = status_of(&b, "on-b", |s| s["applied_version"] == version).await?;
    assert_eq!(via_a["connected_replica"], b.discovery.to_string());
    assert_eq!(via_a["applied_hash"], via_b["applied_hash"]);
    drop(on_b);
    drop(b);
    Ok(())
}

#[tokio::test]
async fn a_stopping_replica_ends_its_streams_and_its_nodes_move_to_another() -> anyhow::Result<()> {
    let backend = EchoBackend::start("app").await?;
    let a = ControlPlane::start(&[]).await?;
    let mut b = a.replica(&[])?;
    a.apply(&document(&backend, "", "")).await?;
    let both = format!("{},{}", b.discovery_url(), a.discovery_url());
    let node = DataPlane::start_from_control_plane(&both, "default", &["--node-id", "mover"])?;
    status_of(&a, "mover", |s| {
        s["connected_replica"] == b.discovery.to_string()
    })
    .await?;

    // SIGTERM with a node connected: the replica ends the stream instead of waiting for the
    // node to go, so it stops in moments (a rolling upgrade replaces it without a kill).
    let stopping = Instant::now();
    b.stop(Duration::from_secs(10))?;
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "the replica took {:?} to stop",
        stopping.elapsed()
    );
    // The node moved to the other replica, which pushes it the next commit.
    let moved = Instant::now();
    connected_to(
        &a,
        "mover",
        &a.discovery.to_string(),
        Duration::from_secs(10),
    )
    .await?;
    let ping = "      - { name: ping, path: /ping, direct_response: { status: 200 } }\n";
    let version = a.apply(&document(&backend, ping, "")).await?;
    while status(&node, "/ping").await? != 200 {
        assert!(
            moved.elapsed() < Duration::from_secs(15),
            "a commit never reached the node after it moved"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(config(&node).await?["source"]["version"], version);
    Ok(())
}

/// Waits up to `within` until `cp` records `node` as connected to `replica` (a discovery
/// address); returns how long that took.
async fn connected_to(
    cp: &ControlPlane,
    node: &str,
    replica: &str,
    within: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let found = cp.dataplanes().await?.into_iter().find(|n| n["id"] == node);
        if found
            .as_ref()
            .is_some_and(|s| s["connected_replica"] == replica)
        {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < within,
            "the node never connected to {replica}: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn reconnecting_to_a_replica_with_nothing_new_does_not_slow_the_next_reconnect()
-> anyhow::Result<()> {
    // A node follows a rolling restart of its two replicas: each time one stops, the node
    // moves to the other, which has nothing new for it (the same version). Each of those
    // streams was healthy, so the reconnect backoff must start over every time rather than
    // double with each round up to its 10 s cap.
    let backend = EchoBackend::start("app").await?;
    let mut a = ControlPlane::start(&[]).await?;
    let mut b = a.replica(&[])?;
    a.apply(&document(&backend, "", "")).await?;
    let (a_addr, b_addr) = (a.discovery.to_string(), b.discovery.to_string());
    let both = format!("{},{}", a.discovery_url(), b.discovery_url());
    let _node = DataPlane::start_from_control_plane(&both, "default", &["--node-id", "follower"])?;
    connected_to(&a, "follower", &a_addr, WITHIN).await?;
    const WITHIN: Duration = Duration::from_secs(10);
    let mut waits = Vec::new();
    for _ in 0..8 {
        // A stops: the node goes on to B, the next address, at once.
        a.replace(Duration::from_secs(10), &[])?;
        connected_to(&b, "follower", &b_addr, WITHIN).await?;
        // B stops: the node has tried every address, pauses (the backoff), starts over at A.
        b.stop(Duration::from_secs(10))?;
        waits.push(connected_to(&a, "follower", &a_addr, WITHIN).await?);
        b.restart(&[])?;
    }
    // With the backoff starting over, each pause is at most 400 ms (full jitter). Had it kept
    // doubling, the later rounds' pauses would be drawn from up to 3.2, 6.4, then 10 s (all
    // eight under 2 s by chance about once in 600 runs).
    let slowest = waits.iter().max().copied().unwrap_or_default();
    assert!(
        slowest < Duration::from_secs(2),
        "a reconnect took {slowest:?}; every round's: {waits:?}"
    );
    Ok(())
}

#[tokio::test]
async fn without_a_control_plane_nodes_keep_serving_and_restart_from_their_cache()
-> anyhow::Result<()> {
    let backend = EchoBackend::start("app").await?;
    let cp = ControlPlane::start(&[]).await?;
    cp.apply(&document(&backend, "", "")).await?;
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("config.cache").display().to_string();
    let node = DataPlane::start_from_control_plane(
        &cp.discovery_url(),
        "default",
        &["--cache-file", &cache],
    )?;
    let discovery = cp.discovery_url();
    // Steady traffic while the control plane goes away: not one request fails.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let url = node.url("/app/orders");
    let traffic = tokio::spawn(async move {
        let (mut sent, mut failed) = (0, 0);
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            sent += 1;
            match client.get(&url).send().await {
                Ok(response) if response.status() == 200 => {}
                _ => failed += 1,
            }
        }
        (sent, failed)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        node.metric("sluice_control_plane_connected", "").await?,
        1.0
    );
    let loaded = node
        .metric("sluice_config_loaded_timestamp_seconds", "")
        .await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert!(
        loaded > now - 120.0 && loaded <= now + 1.0,
        "loaded at {loaded}, now {now}"
    );
    drop(cp);
    let (sent, failed) = traffic.await?;
    assert!(sent > 50, "only {sent} requests");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    // Alone: said so, so that a fleet cut off from its control plane can be alerted on.
    assert_eq!(
        node.metric("sluice_control_plane_connected", "").await?,
        0.0
    );

    // A node started now, with no control plane to answer, serves from the cache.
    let started = Instant::now();
    let restarted =
        DataPlane::start_from_control_plane(&discovery, "default", &["--cache-file", &cache])?;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "ready after {:?}",
        started.elapsed()
    );
    assert_eq!(status(&restarted, "/app/orders").await?, 200);
    // A node with neither a control plane nor a cache is not ready.
    drop(node);
    let empty = dir.path().join("none.cache").display().to_string();
    let admin = sluice_tests::ports::free_addr();
    let _bare = sluice_tests::process::Process::start(
        "sluice-dp",
        &[
            "--control-plane",
            &discovery,
            "--cache-file",
            &empty,
            "--listen",
            &sluice_tests::ports::free_addr().to_string(),
            "--admin-listen",
            &admin.to_string(),
        ],
        &[],
    )?;
    let mut answered = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let probe = tokio::task::spawn_blocking(move || {
            sluice_tests::http::get(admin, "/readyz", Duration::from_secs(1))
        })
        .await?;
        if let Ok((code, _)) = probe {
            answered = true;
            assert_eq!(code, 503, "a node with no configuration must not be ready");
        }
    }
    assert!(answered, "the bare node's admin listener never answered");
    Ok(())
}

#[tokio::test]
async fn the_end_of_a_nodes_older_stream_leaves_its_newer_one_recorded() -> anyhow::Result<()> {
    use sluice_proto::pb;
    let cp = ControlPlane::start(&[]).await?;
    // A node's stream, kept open until the returned sender and response stream are dropped.
    let open = || async {
        let (requests, inbound) = tokio::sync::mpsc::channel(4);
        requests
            .send(pb::DiscoveryRequest {
                kind: Some(pb::discovery_request::Kind::Hello(pb::Hello {
                    node: Some(pb::Node {
                        id: "twice".into(),
                        group: "default".into(),
                        build_version: "0.1.0".into(),
                        protocol_version: pb::ProtocolVersion::Current as u32,
                        ..Default::default()
                    }),
                    current_version: 0,
                    current_hash: String::new(),
                })),
            })
            .await?;
        let mut client = pb::discovery_client::DiscoveryClient::connect(cp.discovery_url()).await?;
        let mut responses = client
            .stream_config(tokio_stream::wrappers::ReceiverStream::new(inbound))
            .await?
            .into_inner();
        responses.message().await?.context("a first push")?;
        anyhow::Ok((requests, responses))
    };
    let older = open().await?;
    let _newer = open().await?;
    // The node's first stream ends after its second began (a node that reconnected before
    // the control plane noticed the old connection was gone).
    drop(older);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cp.process.log_text().contains("data plane disconnected") {
        anyhow::ensure!(Instant::now() < deadline, "the older stream never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recorded = status_of(&cp, "twice", |_| true).await?;
    assert_eq!(
        recorded["connected_replica"],
        cp.discovery.to_string(),
        "the newer stream is still connected: {recorded}"
    );
    Ok(())
}

#[tokio::test]
async fn a_node_reports_the_build_it_runs() -> anyhow::Result<()> {
    let backend = EchoBackend::start("app").await?;
    let cp = ControlPlane::start(&[]).await?;
    cp.apply(&document(&backend, "", "")).await?;
    let _node = DataPlane::start_from_control_plane(
        &cp.discovery_url(),
        "default",
        &["--node-id", "built"],
    )?;
    let status = status_of(&cp, "built", |s| s["build_version"].is_string()).await?;
    // What the control plane shows is what the binary says it is.
    let printed = std::process::Command::new(sluice_tests::process::binary("sluice-dp")?)
        .arg("--version")
        .output()?;
    let printed = String::from_utf8(printed.stdout)?;
    let printed = printed
        .trim()
        .strip_prefix("sluice-dp ")
        .context("sluice-dp --version names the program")?;
    assert_eq!(status["build_version"], printed, "{status}");
    // The crate version, and the revision it was built from when the tree is a checkout.
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let expected = match revision {
        Some(revision) => format!("{}+{revision}", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_owned(),
    };
    assert_eq!(printed, expected);
    Ok(())
}

#[tokio::test]
async fn a_node_speaking_another_protocol_is_refused_and_the_reason_recorded() -> anyhow::Result<()>
{
    use sluice_proto::pb;
    let cp = ControlPlane::start(&[]).await?;
    let mut client = pb::discovery_client::DiscoveryClient::connect(cp.discovery_url()).await?;
    let hello = pb::DiscoveryRequest {
        kind: Some(pb::discovery_request::Kind::Hello(pb::Hello {
            node: Some(pb::Node {
                id: "from-the-future".into(),
                group: "default".into(),
                build_version: "9.0.0".into(),
                protocol_version: 99,
                ..Default::default()
            }),
            current_version: 0,
            current_hash: String::new(),
        })),
    };
    let refused = client
        .stream_config(tokio_stream::iter([hello]))
        .await
        .expect_err("a node with protocol 99 must be refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(refused.message().contains("protocol"), "{refused}");
    let status = status_of(&cp, "from-the-future", |s| s["refused_reason"] != "").await?;
    assert!(
        status["refused_reason"]
            .as_str()
            .unwrap()
            .contains(&format!(
                "speaks discovery protocol {}",
                pb::ProtocolVersion::Current as u32
            )),
        "{status}"
    );
    assert_eq!(status["build_version"], "9.0.0");
    Ok(())
}

#[tokio::test]
async fn data_plane_status_is_paged_and_silent_nodes_are_forgotten() -> anyhow::Result<()> {
    use sluice_proto::pb;
    let cp = ControlPlane::start(&["--dataplane-retention", "3s"]).await?;
    // Nodes that said Hello and were refused (another protocol): recorded, never connected.
    for id in ["node-a", "node-b", "node-c"] {
        let mut client = pb::discovery_client::DiscoveryClient::connect(cp.discovery_url()).await?;
        let hello = pb::DiscoveryRequest {
            kind: Some(pb::discovery_request::Kind::Hello(pb::Hello {
                node: Some(pb::Node {
                    id: id.into(),
                    group: "default".into(),
                    protocol_version: 99,
                    ..Default::default()
                }),
                current_version: 0,
                current_hash: String::new(),
            })),
        };
        let _ = client.stream_config(tokio_stream::iter([hello])).await;
    }
    let page = |query: &'static str| {
        let cp = &cp;
        async move {
            let body = cp.dataplanes_page(query).await?;
            let ids: Vec<String> = body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["id"].as_str().unwrap().to_owned())
                .collect();
            anyhow::Ok((ids, body["next"].clone()))
        }
    };
    let (ids, next) = page("limit=2").await?;
    assert_eq!(
        (ids, next),
        (
            vec!["node-a".into(), "node-b".into()],
            Value::from("node-b")
        )
    );
    let (ids, next) = page("limit=2&after=node-b").await?;
    assert_eq!((ids, next), (vec!["node-c".to_owned()], Value::Null));

    // A connected node stays however short the retention; the silent ones go.
    let backend = EchoBackend::start("b").await?;
    cp.apply(&document(&backend, "", "")).await?;
    let node_id = "edge-kept".to_owned();
    let _node = DataPlane::start_from_control_plane(
        &cp.discovery_url(),
        "default",
        &["--node-id", &node_id],
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ids, _) = page("").await?;
        if ids == [node_id.clone()] {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "still listed: {ids:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past several retentions, the connected node is still there.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(page("").await?.0, [node_id]);
    Ok(())
}
