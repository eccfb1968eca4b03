//! Access control across nodes: rate limits shared through Redis, what happens when Redis
//! stops, and revocations from the control plane reaching nodes.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_tests::backend::EchoBackend;
use sluice_tests::control_plane::ControlPlane;
use sluice_tests::data_plane::DataPlane;
use sluice_tests::ports::free_port;
use sluice_tests::redis::TestRedis;
use sluice_tests::{START_SERVICES_HINT, redis_url};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(16)
        .build()
        .unwrap()
}

const KEY: &str = "acme-key-0123456789";

/// One API behind a key, and one consumer subscribed under `plan` (YAML of a plan named
/// `plan`), plus `extra` policies and routes.
fn config(backend: &EchoBackend, plan: &str, policies: &str, routes: &str) -> String {
    format!(
        r#"format_version: 1
upstreams:
  - name: app
    targets: [{{ url: "{backend}" }}]
policies:
  - name: keys
    key_auth: {{}}
{policies}
apis:
  - name: orders
    policies: [keys]
    routes:
      - {{ name: list, path: /orders, proxy: {{ upstream: app }} }}
{routes}
plans:
{plan}
consumers:
  - name: acme
    credentials:
      - api_key: {{ key: {KEY} }}
subscriptions:
  - {{ consumer: acme, api: orders, plan: plan }}
"#,
        backend = backend.url()
    )
}

/// Two nodes on `config` sharing budgets under the test's Redis prefix. What
/// these tests measure is how exactly budgets are shared: a loaded test machine may take
/// longer than the default 25 ms to answer, which would refuse requests (503).
fn two_nodes_sharing(config: &str, redis: &TestRedis) -> [DataPlane; 2] {
    let url = redis_url();
    let args = [
        "--redis-url",
        &url,
        "--redis-prefix",
        &redis.prefix,
        "--redis-timeout",
        "2s",
    ];
    [
        DataPlane::start(config, &args).unwrap(),
        DataPlane::start(config, &args).unwrap(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_a_redis_limit() {
    const LIMIT: u64 = 50;
    // A small burst absorbs the gaps a loaded test machine leaves between requests (with
    // none, a 20 ms slot nobody used is lost); it adds at most BURST + 1 to the total.
    const BURST: u64 = 10;
    const SECONDS: u64 = 10;
    let redis = TestRedis::create().await.unwrap();
    let backend = EchoBackend::start("app").await.unwrap();
    let plan = format!(
        "  - name: plan\n    mode: redis\n    rate_limits: [{{ limit: {LIMIT}, per: second, burst: {BURST} }}]\n"
    );
    let config = config(&backend, &plan, "", "");
    let nodes = two_nodes_sharing(&config, &redis);
    let urls: Vec<String> = nodes.iter().map(|n| n.url("/orders")).collect();
    let (accepted, refused, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(SECONDS);
    let mut tasks = Vec::new();
    // Four callers per node, as fast as they are answered: several times the limit.
    for caller in 0..8 {
        let url = urls[caller % 2].clone();
        let (accepted, refused, other) = (accepted.clone(), refused.clone(), other.clone());
        tasks.push(tokio::spawn(async move {
            let client = client();
            while Instant::now() < deadline {
                match client.get(&url).header("x-api-key", KEY).send().await {
                    Ok(r) if r.status() == 200 => accepted.fetch_add(1, Ordering::Relaxed),
                    Ok(r) if r.status() == 429 => refused.fetch_add(1, Ordering::Relaxed),
                    _ => other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let accepted = accepted.load(Ordering::Relaxed) as f64;
    let refused = refused.load(Ordering::Relaxed);
    let expected = LIMIT as f64 * elapsed + (BURST + 1) as f64;
    assert_eq!(other.load(Ordering::Relaxed), 0, "only 200s and 429s");
    assert!(
        refused as f64 > expected,
        "the callers must ask for well over the limit ({refused} refused)"
    );
    assert!(
        (accepted - expected).abs() <= expected * 0.05,
        "{accepted} accepted in {elapsed:.2} s by two nodes sharing {LIMIT}/s (burst {BURST}): expected {expected:.0} ±5%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_in_redis_spends_no_budget_held_by_the_node() {
    let redis = TestRedis::create().await.unwrap();
    let backend = EchoBackend::start("app").await.unwrap();
    // One budget of 4 for every caller of the route, held by the node; acme's plan allows one
    // request a month (in Redis), beta's is open.
    let config = format!(
        r#"format_version: 1
upstreams:
  - name: app
    targets: [{{ url: "{backend}" }}]
policies:
  - name: keys
    key_auth: {{}}
  - name: route-wide
    rate_limit: {{ limits: [{{ limit: 4, per: minute, burst: 3 }}], scope: api }}
apis:
  - name: orders
    policies: [keys]
    routes:
      - {{ name: limited, path: /limited, policies: [route-wide], proxy: {{ upstream: app }} }}
plans:
  - name: capped
    monthly_quota: 1
  - name: open
consumers:
  - name: acme
    credentials:
      - api_key: {{ key: {KEY} }}
  - name: beta
    credentials:
      - api_key: {{ key: beta-key-0123456789 }}
subscriptions:
  - {{ consumer: acme, api: orders, plan: capped }}
  - {{ consumer: beta, api: orders, plan: open }}
"#,
        backend = backend.url()
    );
    let [node, _] = two_nodes_sharing(&config, &redis);
    let client = client();
    let statuses = |key: &'static str, count: usize| {
        let (client, url) = (client.clone(), node.url("/limited"));
        async move {
            let mut statuses = Vec::new();
            for _ in 0..count {
                let response = client.get(&url).header("x-api-key", key).send().await;
                statuses.push(response.unwrap().status().as_u16());
            }
            statuses
        }
    };
    assert_eq!(statuses(KEY, 5).await, [200, 429, 429, 429, 429]);
    // acme's refused requests took nothing from the route's budget: 3 of its 4 are left.
    assert_eq!(
        statuses("beta-key-0123456789", 4).await,
        [200, 200, 200, 429]
    );
}

/// A `redis-server` of the test's own, on its own port: the test stops and resumes it.
struct PrivateRedis {
    child: Child,
    url: String,
}

impl PrivateRedis {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}; {START_SERVICES_HINT}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        PrivateRedis {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal}");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redis_fails_open_or_closed_as_configured_and_never_past_the_timeout() {
    let redis = PrivateRedis::start();
    let backend = EchoBackend::start("app").await.unwrap();
    let policies = "  - name: shared-open\n    rate_limit: { limits: [{ limit: 100000, per: second }], scope: api, mode: redis, fail_open: true }\n\
                    \x20 - name: shared-closed\n    rate_limit: { limits: [{ limit: 100000, per: second }], scope: api, mode: redis }\n";
    let routes = "      - { name: open, path: /open, policies: [shared-open], proxy: { upstream: app } }\n\
                  \x20     - { name: closed, path: /closed, policies: [shared-closed], proxy: { upstream: app } }\n";
    let config = config(&backend, "  - name: plan\n", policies, routes);
    let node = DataPlane::start(
        &config,
        &["--redis-url", &redis.url, "--redis-timeout", "50ms"],
    )
    .unwrap();
    let client = client();
    let get = |path: &str| {
        let request = client.get(node.url(path)).header("x-api-key", KEY);
        async move {
            let started = Instant::now();
            let response = request.send().await.unwrap();
            (response.status().as_u16(), started.elapsed())
        }
    };
    assert_eq!(get("/open").await.0, 200);
    assert_eq!(get("/closed").await.0, 200);

    // Stopped, not killed: its connections stay open and silent, the case only a timeout
    // ends. Four callers keep the node busy meanwhile.
    redis.signal("-STOP");
    let until = Instant::now() + Duration::from_secs(2);
    let caller = || async {
        let mut slowest = Duration::ZERO;
        let (mut open, mut closed) = (Vec::new(), Vec::new());
        while Instant::now() < until {
            let (status, took) = get("/open").await;
            open.push(status);
            slowest = slowest.max(took);
            let (status, took) = get("/closed").await;
            closed.push(status);
            slowest = slowest.max(took);
        }
        (slowest, open, closed)
    };
    let (a, b, c, d) = tokio::join!(caller(), caller(), caller(), caller());
    let mut slowest = Duration::ZERO;
    let (mut open, mut closed) = (Vec::new(), Vec::new());
    for (slow, o, c) in [a, b, c, d] {
        slowest = slowest.max(slow);
        open.extend(o);
        closed.extend(c);
    }
    assert!(open.iter().all(|s| *s == 200), "fail_open: {open:?}");
    assert!(closed.iter().all(|s| *s == 503), "fail closed: {closed:?}");
    assert!(
        slowest < Duration::from_millis(50 + 150),
        "a request waited {slowest:?}: past the 50 ms Redis timeout (plus 150 ms of slack)"
    );
    let unavailable = node
        .metric(
            "sluice_access_decisions_total",
            r#"decision="deny",reason="limits_unavailable""#,
        )
        .await
        .unwrap();
    assert_eq!(unavailable, closed.len() as f64);

    // Back: the limits are counted again once the breaker lets a probe through.
    redis.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(5);
    while get("/closed").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "Redis came back but requests are still refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monthly_quotas_are_counted_in_redis_across_nodes() {
    let redis = TestRedis::create().await.unwrap();
    let backend = EchoBackend::start("app").await.unwrap();
    let config = config(
        &backend,
        "  - name: plan
    monthly_quota: 3
",
        "",
        "",
    );
    let nodes = two_nodes_sharing(&config, &redis);
    let client = client();
    let mut statuses = Vec::new();
    for i in 0..5 {
        let response = client
            .get(nodes[i % 2].url("/orders"))
            .header("x-api-key", KEY)
            .send()
            .await
            .unwrap();
        statuses.push((
            response.status().as_u16(),
            response
                .headers()
                .get("ratelimit-remaining")
                .map(|v| v.to_str().unwrap().to_owned()),
        ));
    }
    let expected: Vec<(u16, Option<String>)> = vec![
        (200, Some("2".into())),
        (200, Some("1".into())),
        (200, Some("0".into())),
        (429, Some("0".into())),
        (429, Some("0".into())),
    ];
    assert_eq!(
        statuses, expected,
        "a quota of 3 a month, shared by two nodes"
    );
    let keys = redis.keys().await.unwrap();
    assert!(
        keys.iter().any(|k| k.contains("quota")),
        "the quota is counted under the node's prefix: {keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_and_suspensions_reach_nodes_within_a_second() {
    let backend = EchoBackend::start("app").await.unwrap();
    let cp = ControlPlane::start(&[]).await.unwrap();
    let document = |revoked: bool, suspended: bool| {
        format!(
            r#"format_version: 1
upstreams:
  - name: app
    targets: [{{ url: "{}" }}]
policies:
  - name: keys
    key_auth: {{}}
apis:
  - name: orders
    policies: [keys]
    routes:
      - {{ name: list, path: /orders, proxy: {{ upstream: app }} }}
plans:
  - name: basic
consumers:
  - name: acme
    credentials:
      - api_key: {{ key: {KEY} }}
        revoked: {revoked}
  - name: globex
    credentials:
      - api_key: {{ key: globex-key-0123456789 }}
subscriptions:
  - {{ consumer: acme, api: orders, plan: basic }}
  - {{ consumer: globex, api: orders, plan: basic, status: {} }}
"#,
            backend.url(),
            if suspended { "suspended" } else { "active" }
        )
    };
    cp.apply(&document(false, false)).await.unwrap();
    let node = DataPlane::start_from_control_plane(&cp.discovery_url(), "default", &[]).unwrap();
    let client = client();
    let status = |key: &'static str| {
        let request = client.get(node.url("/orders")).header("x-api-key", key);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(KEY).await, 200);
    assert_eq!(status("globex-key-0123456789").await, 200);

    for (what, revoked, suspended, key, refused) in [
        ("a revoked key", true, false, KEY, 401),
        (
            "a suspended subscription",
            true,
            true,
            "globex-key-0123456789",
            403,
        ),
    ] {
        let committed = Instant::now();
        cp.apply(&document(revoked, suspended)).await.unwrap();
        loop {
            if status(key).await == refused {
                break;
            }
            assert!(
                committed.elapsed() < Duration::from_secs(1),
                "{what} was still let through a second after the commit"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
