//! Configuration from the control plane: a real `sluice-cp` on its own database streams its
//! groups' configuration to real `sluice-dp` nodes over the discovery protocol.

use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::backend::EchoBackend;
use sluice_tests::control_plane::{ADMIN_TOKEN, ControlPlane};
use sluice_tests::data_plane::DataPlane;
use sluice_tests::pki::{Leaf, TestCa};

/// Applies a whole declarative document to the registry; returns the new version's number.
async fn apply(cp: &ControlPlane, document: &str) -> anyhow::Result<u64> {
    let response = reqwest::Client::new()
        .post(cp.url("/v1/apply"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/yaml")
        .body(document.to_owned())
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    anyhow::ensure!(status == 200, "apply answered {status}: {body}");
    body["version"]["number"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no version in {body}"))
}

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
    let v1 = apply(&cp, &document(&backend, "", "")).await?;

    let node = DataPlane::start_from_control_plane(&cp.discovery_url(), "default", &[])?;
    assert_eq!(status(&node, "/app/orders").await?, 200);
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
    let v2 = apply(&cp, &document(&backend, ping, "")).await?;
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
    apply(&cp, &document(&backend, ping, &mismatched)).await?;
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
    Ok(())
}
