//! A rolling upgrade rehearsed without Kubernetes: two control planes on one registry and two
//! nodes streaming from them are replaced one at a time (SIGTERM, exit, a new process on the
//! same ports) while clients keep sending requests through a client-side stand-in for a
//! Kubernetes Service. Not one request may fail, and configuration must keep flowing through
//! the new control planes to the old nodes and the new ones.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use sluice_tests::backend::EchoBackend;
use sluice_tests::control_plane::ControlPlane;
use sluice_tests::data_plane::DataPlane;
use sluice_tests::postgres::TestDatabase;

/// Client tasks sending requests all through the test.
const CLIENTS: usize = 4;
/// Each client's pause between two requests: a steady load that leaves the 2-core machine
/// room for the processes being started.
const PACE: Duration = Duration::from_millis(10);
/// How long a node is out of rotation before it is stopped, as a preStop hook's sleep: long
/// enough for the clients to stop picking it and for what they sent it to finish.
const PRE_STOP: Duration = Duration::from_millis(750);
/// How long a request is still in flight on a node when it gets SIGTERM: the drain must let
/// it finish.
const IN_FLIGHT: Duration = Duration::from_millis(1000);
/// Load between two steps.
const SETTLE: Duration = Duration::from_millis(500);
/// Longest a process may take to exit after SIGTERM (the node drains within this).
const STOP_WITHIN: Duration = Duration::from_secs(15);
/// Longest a commit may take to reach a node, or a node to report its status.
const CONVERGE_WITHIN: Duration = Duration::from_secs(10);
/// Successes each step must see, so the load really overlapped it.
const MIN_PER_STEP: u64 = 20;

/// The phases of the test; requests are counted by the phase they started in.
const STEPS: [&str; 7] = [
    "steady",
    "replace control plane A",
    "replace control plane B",
    "commit through the new control planes",
    "replace node 1",
    "replace node 2",
    "commit to the new nodes",
];

fn document(app: &EchoBackend, slow: &EchoBackend, extra_routes: &str) -> String {
    format!(
        "format_version: 1\n\
         upstreams:\n  - name: app\n    targets: [{{ url: \"{}\" }}]\n\
         \x20 - name: slow\n    targets: [{{ url: \"{}\" }}]\n\
         apis:\n  - name: shop\n    routes:\n\
         \x20     - {{ name: app, path: /app, proxy: {{ upstream: app }} }}\n\
         \x20     - {{ name: slow, path: /slow, proxy: {{ upstream: slow, strip_prefix: true }} }}\n\
         {extra_routes}",
        app.url(),
        slow.url()
    )
}

/// A direct-response route at `/{name}`, the mark of a later version.
fn marker(name: &str) -> String {
    format!("      - {{ name: {name}, path: /{name}, direct_response: {{ status: 200 }} }}\n")
}

/// The client side of a Kubernetes Service: the nodes in rotation (its endpoints), picked in
/// turn. A node leaves before it is stopped (the preStop wait) and comes back only once its
/// replacement is ready.
struct Service {
    nodes: Vec<SocketAddr>,
    in_rotation: Vec<AtomicBool>,
    next: AtomicUsize,
}

impl Service {
    fn new(nodes: Vec<SocketAddr>) -> Self {
        let in_rotation = nodes.iter().map(|_| AtomicBool::new(true)).collect();
        Self {
            nodes,
            in_rotation,
            next: AtomicUsize::new(0),
        }
    }

    /// The next node in rotation, round-robin.
    fn pick(&self) -> Option<usize> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.nodes.len())
            .map(|i| (start + i) % self.nodes.len())
            .find(|&i| self.in_rotation[i].load(Ordering::SeqCst))
    }

    fn set_in_rotation(&self, node: usize, on: bool) {
        self.in_rotation[node].store(on, Ordering::SeqCst);
    }
}

/// What the clients saw, by step.
struct Load {
    step: AtomicUsize,
    stop: AtomicBool,
    succeeded: [AtomicU64; STEPS.len()],
    failed: AtomicU64,
    /// The first failures, for the message.
    failures: Mutex<Vec<String>>,
}

impl Load {
    fn new() -> Self {
        Self {
            step: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            succeeded: std::array::from_fn(|_| AtomicU64::new(0)),
            failed: AtomicU64::new(0),
            failures: Mutex::new(Vec::new()),
        }
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() < 20 {
            failures.push(what);
        }
    }

    fn enter(&self, step: usize) {
        eprintln!("step: {}", STEPS[step]);
        self.step.store(step, Ordering::SeqCst);
    }
}

/// One client: a request to the next node in rotation, a pause, and again until told to stop.
/// A connection error, a status other than 2xx or a body cut short is a failure.
async fn client(service: Arc<Service>, load: Arc<Load>, http: reqwest::Client) {
    while !load.stop.load(Ordering::SeqCst) {
        let step = load.step.load(Ordering::SeqCst);
        let Some(node) = service.pick() else {
            load.fail("no node in rotation".into());
            tokio::time::sleep(PACE).await;
            continue;
        };
        let url = format!("http://{}/app/orders", service.nodes[node]);
        let outcome = match http.get(&url).send().await {
            Ok(response) if response.status().is_success() => response
                .bytes()
                .await
                .map(drop)
                .map_err(|e| format!("body: {e:#}")),
            Ok(response) => Err(format!("status {}", response.status())),
            Err(e) => Err(format!("{e:#}")),
        };
        match outcome {
            Ok(()) => {
                load.succeeded[step].fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => load.fail(format!("node {} during {:?}: {e}", node + 1, STEPS[step])),
        }
        tokio::time::sleep(PACE).await;
    }
}

/// Runs blocking harness work (starting and stopping processes) off the runtime, so the
/// clients and the backends keep going meanwhile.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work).await?
}

/// `cp` stopped and replaced by a new replica named `name` on the same database and ports.
async fn replaced_control_plane(mut cp: ControlPlane, name: &str) -> anyhow::Result<ControlPlane> {
    let name = name.to_owned();
    blocking(move || {
        cp.replace(STOP_WITHIN, &["--replica-name", &name])?;
        Ok(cp)
    })
    .await
}

/// `node` stopped (drained) and replaced by a new one with the same ports and cache file.
async fn replaced_node(mut node: DataPlane) -> anyhow::Result<DataPlane> {
    blocking(move || {
        node.replace(STOP_WITHIN)?;
        Ok(node)
    })
    .await
}

async fn get_json(url: String) -> anyhow::Result<Value> {
    Ok(reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .json()
        .await?)
}

/// Polls the node's `/config` until it runs `version` and answers 200 on `path`.
async fn runs(node: &DataPlane, version: u64, path: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    loop {
        let running = get_json(format!("http://{}/config", node.admin)).await?;
        let serves = reqwest::Client::new()
            .get(node.url(path))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .status()
            == 200;
        if running["source"]["version"] == version && serves {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {} never ran version {version} with {path} within {CONVERGE_WITHIN:?}: \
             /config {running}; log:\n{}",
            node.addr,
            node.process.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the control plane's `/v1/dataplanes` until node `id` is recorded at `version`,
/// streaming from one of `replicas` on a stream opened after `connected_after`.
async fn recorded(
    cp: &ControlPlane,
    id: &str,
    version: u64,
    replicas: &[&str],
    connected_after: SystemTime,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    loop {
        let status = cp.dataplanes().await?.into_iter().find(|n| n["id"] == id);
        if let Some(s) = &status
            && s["applied_version"] == version
            && s["versions_behind"] == 0
            && s["stale"] == false
            && replicas.iter().any(|r| s["connected_replica"] == *r)
            && s["connected_since"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .is_some_and(|t| t > connected_after)
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {id} was never recorded at version {version} on one of {replicas:?}, \
             connected after {}, within {CONVERGE_WITHIN:?}: {status:?}",
            humantime::format_rfc3339_micros(connected_after)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_replaced_one_by_one_under_load_fails_no_request() -> anyhow::Result<()> {
    let started = Instant::now();
    let app = EchoBackend::start("app").await?;
    let slow = EchoBackend::start("slow").await?;
    let database = TestDatabase::create().await?;
    let url = database.url.clone();
    // Each replica has a name, as Kubernetes gives each pod one; a replacement a new one.
    let (cp_a, cp_b) = blocking(move || {
        Ok((
            ControlPlane::on_database(&url, &["--replica-name", "cp-a-1"])?,
            ControlPlane::on_database(&url, &["--replica-name", "cp-b-1"])?,
        ))
    })
    .await?;
    let v1 = cp_a.apply(&document(&app, &slow, "")).await?;

    // Node 1 lists A first and node 2 B first, so each replacement of a control plane takes
    // a node's stream away.
    let dir = tempfile::tempdir()?;
    let mut nodes = Vec::new();
    for (id, control_planes) in [
        (
            "edge-1",
            format!("{},{}", cp_a.discovery_url(), cp_b.discovery_url()),
        ),
        (
            "edge-2",
            format!("{},{}", cp_b.discovery_url(), cp_a.discovery_url()),
        ),
    ] {
        let cache = dir.path().join(format!("{id}.cache")).display().to_string();
        let node = blocking(move || {
            DataPlane::start_from_control_plane(
                &control_planes,
                "default",
                &["--node-id", id, "--cache-file", &cache],
            )
        })
        .await?;
        runs(&node, v1, "/app/ready").await?;
        nodes.push(node);
    }

    let service = Arc::new(Service::new(nodes.iter().map(|n| n.addr).collect()));
    let load = Arc::new(Load::new());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(client(service.clone(), load.clone(), http.clone())))
        .collect();
    load.enter(0);
    tokio::time::sleep(SETTLE).await;

    // The control planes first, one at a time: each node keeps serving what it has and
    // streams again from whichever replica answers.
    let upgrade_began = SystemTime::now();
    load.enter(1);
    let cp_a = replaced_control_plane(cp_a, "cp-a-2").await?;
    tokio::time::sleep(SETTLE).await;
    load.enter(2);
    let cp_b = replaced_control_plane(cp_b, "cp-b-2").await?;
    tokio::time::sleep(SETTLE).await;
    let new_replicas = ["cp-a-2", "cp-b-2"];

    // A commit on the new control planes reaches the old nodes: they found the new replicas.
    load.enter(3);
    let v2 = cp_b.apply(&document(&app, &slow, &marker("v2"))).await?;
    for (node, id) in nodes.iter().zip(["edge-1", "edge-2"]) {
        runs(node, v2, "/v2").await?;
        recorded(&cp_a, id, v2, &new_replicas, upgrade_began).await?;
    }
    tokio::time::sleep(SETTLE).await;

    // Then the nodes, one at a time, as a Deployment's rolling update with a preStop wait.
    let mut replaced_at = [upgrade_began; 2];
    for (i, id) in ["edge-1", "edge-2"].into_iter().enumerate() {
        load.enter(4 + i);
        service.set_in_rotation(i, false);
        tokio::time::sleep(PRE_STOP).await;
        // A request still in flight when SIGTERM comes, as one slower than the preStop wait
        // would be: the drain lets it finish.
        let before = slow.requests();
        let in_flight = tokio::spawn(
            http.get(nodes[i].url(&format!("/slow/sleep/{}", IN_FLIGHT.as_millis())))
                .send(),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while slow.requests() == before {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the slow request never reached its backend through node {}",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stopping = Instant::now();
        replaced_at[i] = SystemTime::now();
        let node = nodes.remove(i);
        nodes.insert(i, replaced_node(node).await?);
        let answer = in_flight.await?;
        let status = answer
            .map(|r| r.status().as_u16())
            .map_err(|e| anyhow::anyhow!("{e:#}"));
        assert!(
            matches!(status, Ok(200)),
            "the request in flight on node {} when it was stopped: {status:?}",
            i + 1
        );
        eprintln!(
            "node {} stopped (drained) and replaced in {:?}",
            i + 1,
            stopping.elapsed()
        );
        // Ready (from its cache, or a first snapshot) and at the current version before it
        // takes traffic again.
        runs(&nodes[i], v2, "/v2").await?;
        service.set_in_rotation(i, true);
        recorded(&cp_a, id, v2, &new_replicas, replaced_at[i]).await?;
        tokio::time::sleep(SETTLE).await;
    }

    // A commit reaches the new nodes through the new control planes.
    load.enter(6);
    let v3 = cp_a
        .apply(&document(&app, &slow, &(marker("v2") + &marker("v3"))))
        .await?;
    for (i, id) in ["edge-1", "edge-2"].into_iter().enumerate() {
        runs(&nodes[i], v3, "/v3").await?;
        recorded(&cp_b, id, v3, &new_replicas, replaced_at[i]).await?;
    }
    tokio::time::sleep(SETTLE).await;

    load.stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await?;
    }
    let succeeded: Vec<u64> = load
        .succeeded
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    let failed = load.failed.load(Ordering::Relaxed);
    for (step, n) in STEPS.iter().zip(&succeeded) {
        eprintln!("{step}: {n} requests succeeded");
    }
    eprintln!(
        "{} succeeded, {failed} failed, in {:?}",
        succeeded.iter().sum::<u64>(),
        started.elapsed()
    );
    assert_eq!(
        failed,
        0,
        "{failed} requests failed; the first: {:#?}",
        load.failures.lock().unwrap_or_else(|e| e.into_inner())
    );
    for (step, n) in STEPS.iter().zip(&succeeded) {
        assert!(
            *n >= MIN_PER_STEP,
            "only {n} requests during {step:?}: the load did not overlap it"
        );
    }
    drop((nodes, cp_a, cp_b));
    drop(database);
    Ok(())
}
