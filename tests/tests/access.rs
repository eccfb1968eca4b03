//! Access control end to end: real `sluice-dp` processes on config files, real backends.
//! API keys, subscriptions, scopes, IP lists, identity headers, CORS, body limits, local rate
//! limits and the failed-authentication throttle.

use std::time::Duration;

use serde_json::Value;
use sluice_tests::backend::EchoBackend;
use sluice_tests::data_plane::DataPlane;
use sluice_tests::http::problem_kind as problem;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

const POLICIES: &str = r#"
policies:
  - name: keys
    key_auth: { headers: [x-api-key], query_params: [apikey], hide_credentials: true }
  - name: per-consumer
    rate_limit: { limits: [{ limit: 3, per: minute, burst: 2 }] }
  - name: browser
    cors: { allow_origins: ["https://app.example.com"], allow_methods: [GET, POST], max_age: 10m }
  - name: small
    request_size: { max_body_bytes: 16 }
  - name: not-from-here
    ip_restriction: { deny: ["127.0.0.0/8", "::1"] }
apis:
  - name: orders
    policies: [keys, browser]
    routes:
      - { name: list, path: /orders, proxy: { upstream: app } }
      - { name: admin, path: /admin, scopes: ["orders:admin"], proxy: { upstream: app } }
      # Listed twice, counted once.
      - { name: limited, path: /limited, policies: [per-consumer, per-consumer], proxy: { upstream: app } }
      - { name: upload, path: /upload, policies: [small], proxy: { upstream: app } }
  - name: hidden
    base_path: /hidden
    hide_when_forbidden: true
    policies: [keys]
    routes:
      - { name: all, path: /, proxy: { upstream: app } }
  - name: open
    base_path: /open
    routes:
      - { name: all, path: /, proxy: { upstream: app } }
  - name: strict
    base_path: /strict
    routes:
      - { name: removal, path: /items, methods: [DELETE], proxy: { upstream: app } }
plans:
  - name: basic
    scopes: ["orders:read"]
consumers:
  - name: acme
    custom_id: CUST-1
    credentials:
      - api_key: { key: acme-key-0123456789 }
      - api_key: { key: acme-revoked-0123456789 }
        revoked: true
      - api_key: { key: acme-expired-0123456789 }
        expires_at: "2020-01-01T00:00:00Z"
  - name: globex
    credentials:
      - api_key: { key: globex-key-0123456789 }
  - name: initech
    credentials:
      - api_key: { key: initech-key-0123456789 }
  - name: banned
    policies: [not-from-here]
    credentials:
      - api_key: { key: banned-key-0123456789 }
subscriptions:
  - { consumer: acme, api: orders, plan: basic }
  - { consumer: initech, api: orders, plan: basic, status: suspended }
  - { consumer: banned, api: orders, plan: basic }
"#;

fn config(backend: &EchoBackend) -> String {
    format!(
        "format_version: 1\nupstreams:\n  - name: app\n    targets: [{{ url: \"{}\" }}]\n{POLICIES}",
        backend.url()
    )
}

/// GET `path` with `key` in `x-api-key`: status, headers, body as JSON (problem or echo).
async fn get(
    node: &DataPlane,
    path: &str,
    key: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = client().get(node.url(path));
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

#[tokio::test]
async fn keys_subscriptions_scopes_and_ip_lists_decide_who_gets_in() {
    let backend = EchoBackend::start("app").await.unwrap();
    let node = DataPlane::start(&config(&backend), &[]).unwrap();

    let (status, headers, body) = get(&node, "/orders", None).await;
    assert_eq!(
        (status, problem(&body)),
        (401, "missing-credential"),
        "{body}"
    );
    let challenge = headers["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("ApiKey"), "{challenge}");

    for (key, status, reason) in [
        ("not-a-key-0123456789", 401, "invalid-key"),
        ("acme-revoked-0123456789", 401, "key-revoked"),
        ("acme-expired-0123456789", 401, "key-expired"),
        ("globex-key-0123456789", 403, "no-subscription"),
        ("initech-key-0123456789", 403, "subscription-suspended"),
        ("banned-key-0123456789", 403, "ip-denied"),
    ] {
        let (got, _, body) = get(&node, "/orders", Some(key)).await;
        assert_eq!((got, problem(&body)), (status, reason), "{key}: {body}");
    }
    assert_eq!(backend.requests(), 0, "nothing refused reached the backend");

    let (status, _, body) = get(&node, "/admin", Some("acme-key-0123456789")).await;
    assert_eq!(
        (status, problem(&body)),
        (403, "insufficient-scope"),
        "{body}"
    );

    // A hidden API answers a caller without a subscription as if it did not exist.
    let (status, _, body) = get(&node, "/hidden/x", Some("acme-key-0123456789")).await;
    assert_eq!((status, problem(&body)), (404, "no-route"), "{body}");
    let (status, _, body) = get(&node, "/hidden/x", None).await;
    assert_eq!(status, 401, "missing identity is still 401: {body}");

    let (status, _, _) = get(&node, "/open/x", None).await;
    assert_eq!(status, 200, "a route without policies is open");

    let denied = node
        .metric(
            "sluice_access_decisions_total",
            r#"decision="deny",reason="invalid_key""#,
        )
        .await
        .unwrap();
    assert_eq!(denied, 1.0);
    // The log is written by a background thread: give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = node.process.log_text();
        if log.contains(r#""reason":"subscription_suspended""#)
            && log.contains(r#""decision":"deny""#)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the access log names no decision and reason: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_upstream_learns_who_called_and_never_sees_the_key_or_forged_identities() {
    let backend = EchoBackend::start("app").await.unwrap();
    let node = DataPlane::start(&config(&backend), &[]).unwrap();
    let response = client()
        .get(node.url("/orders?page=2"))
        .header("x-api-key", "acme-key-0123456789")
        .header("x-consumer-name", "someone-else")
        .header("x-subscription-id", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    let headers = &echo["headers"];
    assert_eq!(headers["x-consumer-name"], "acme");
    assert_eq!(headers["x-consumer-custom-id"], "CUST-1");
    let consumer_id = headers["x-consumer-id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(consumer_id).is_ok(), "{consumer_id}");
    let subscription = headers["x-subscription-id"].as_str().unwrap();
    assert!(
        uuid::Uuid::parse_str(subscription).is_ok(),
        "{subscription}"
    );
    assert!(
        headers.get("x-api-key").is_none(),
        "hide_credentials: {echo}"
    );
    assert_eq!(echo["query"], "page=2");

    let response = client()
        .get(node.url("/orders?apikey=acme-key-0123456789&page=3"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["query"], "page=3", "the key is taken out of the query");

    // Without a route's policies, forged identity headers are still removed, in any spelling
    // an upstream may read as theirs.
    let response = client()
        .get(node.url("/open/x"))
        .header("x-consumer-id", "forged")
        .header("x-consumer_id", "forged")
        .header("x_subscription_id", "forged")
        .header("x-other_header", "kept")
        .send()
        .await
        .unwrap();
    let echo: Value = response.json().await.unwrap();
    for forged in ["x-consumer-id", "x-consumer_id", "x_subscription_id"] {
        assert!(echo["headers"].get(forged).is_none(), "{forged}: {echo}");
    }
    assert_eq!(echo["headers"]["x-other_header"], "kept", "{echo}");
}

#[tokio::test]
async fn local_rate_limits_answer_429_with_ratelimit_headers() {
    let backend = EchoBackend::start("app").await.unwrap();
    let node = DataPlane::start(&config(&backend), &[]).unwrap();
    let key = Some("acme-key-0123456789");
    // 3 a minute with a burst of 2: three at once, then one every 20 s.
    let (status, headers, _) = get(&node, "/limited", key).await;
    assert_eq!(status, 200);
    assert_eq!(headers["ratelimit-limit"], "3");
    assert_eq!(headers["ratelimit-remaining"], "2");
    for remaining in ["1", "0"] {
        let (status, headers, _) = get(&node, "/limited", key).await;
        assert_eq!(status, 200);
        assert_eq!(headers["ratelimit-remaining"], remaining);
    }
    let (status, headers, body) = get(&node, "/limited", key).await;
    assert_eq!((status, problem(&body)), (429, "rate-limited"), "{body}");
    assert_eq!(headers["ratelimit-remaining"], "0");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    assert_eq!(backend.requests(), 3);
    // Other routes of the API are not limited by the route's policy.
    let (status, headers, _) = get(&node, "/orders", key).await;
    assert_eq!(status, 200);
    assert!(headers.get("ratelimit-limit").is_none());
}

#[tokio::test]
async fn cors_preflights_are_answered_and_bodies_are_capped_per_route() {
    let backend = EchoBackend::start("app").await.unwrap();
    let node = DataPlane::start(&config(&backend), &[]).unwrap();
    let preflight = |origin: &'static str| {
        client()
            .request(reqwest::Method::OPTIONS, node.url("/orders"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "x-api-key")
            .send()
    };
    let response = preflight("https://app.example.com").await.unwrap();
    assert_eq!(response.status(), 204, "a preflight needs no key");
    let headers = response.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(headers["access-control-allow-methods"], "GET, POST");
    assert_eq!(headers["access-control-allow-headers"], "x-api-key");
    assert_eq!(headers["access-control-max-age"], "600");
    let response = preflight("https://evil.example.com").await.unwrap();
    assert_eq!(response.status(), 403);
    // A preflight for a route with no CORS policy that does not take OPTIONS finds no route:
    // it is not sent to the upstream as an OPTIONS request the route never allowed.
    let response = client()
        .request(reqwest::Method::OPTIONS, node.url("/strict/items"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "DELETE")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(backend.requests(), 0, "preflights are the gateway's");

    let response = client()
        .get(node.url("/orders"))
        .header("origin", "https://app.example.com")
        .header("x-api-key", "acme-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    // A refusal is readable by the page too.
    let response = client()
        .get(node.url("/orders"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(
        response
            .headers()
            .contains_key("access-control-allow-origin")
    );

    let post = |body: &'static str| {
        client()
            .post(node.url("/upload"))
            .header("x-api-key", "acme-key-0123456789")
            .body(body)
            .send()
    };
    assert_eq!(post("sixteen bytes!!!").await.unwrap().status(), 200);
    assert_eq!(post("seventeen bytes!!").await.unwrap().status(), 413);
}

#[tokio::test]
async fn repeated_failed_authentications_are_refused_unread() {
    let backend = EchoBackend::start("app").await.unwrap();
    let node = DataPlane::start(&config(&backend), &["--auth-failures-per-minute", "5"]).unwrap();
    for _ in 0..5 {
        let (status, _, _) = get(&node, "/orders", Some("guess-0123456789")).await;
        assert_eq!(status, 401);
    }
    let (status, headers, body) = get(&node, "/orders", Some("guess-0123456789")).await;
    assert_eq!(
        (status, problem(&body)),
        (429, "too-many-failures"),
        "{body}"
    );
    assert!(headers.contains_key("retry-after"));
    // Even a good key waits: the address is throttled, not the key.
    let (status, _, _) = get(&node, "/orders", Some("acme-key-0123456789")).await;
    assert_eq!(status, 429);
    // Missing credentials are not guesses.
    let other = DataPlane::start(&config(&backend), &["--auth-failures-per-minute", "2"]).unwrap();
    for _ in 0..5 {
        assert_eq!(get(&other, "/orders", None).await.0, 401);
    }
    assert_eq!(
        get(&other, "/orders", Some("acme-key-0123456789")).await.0,
        200
    );
}

#[tokio::test]
async fn a_trusted_proxy_names_the_client_and_nobody_else_does() {
    let backend = EchoBackend::start("app").await.unwrap();
    let config = format!(
        r#"format_version: 1
upstreams:
  - name: app
    targets: [{{ url: "{}" }}]
policies:
  - name: no-documentation-net
    ip_restriction: {{ deny: ["203.0.113.0/24"] }}
  - name: one-per-address
    rate_limit: {{ scope: ip, limits: [{{ limit: 1, per: minute }}] }}
apis:
  - name: walled
    policies: [no-documentation-net]
    routes:
      - {{ name: all, path: /, proxy: {{ upstream: app }} }}
      - {{ name: limited, path: /limited, policies: [one-per-address], proxy: {{ upstream: app }} }}
"#,
        backend.url()
    );
    // The test's requests come from loopback: the proxy in front of `behind_proxy`.
    let behind_proxy =
        DataPlane::start(&config, &["--trusted-proxies", "127.0.0.0/8,::1"]).unwrap();
    let direct = DataPlane::start(&config, &[]).unwrap();
    let send = |node: &DataPlane, path: &str, forwarded_for: &str| {
        client()
            .get(node.url(path))
            .header("x-forwarded-for", forwarded_for)
            .header("x-forwarded-proto", "https")
            .send()
    };

    let response = send(&behind_proxy, "/", "203.0.113.7").await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!((status, problem(&body)), (403, "ip-denied"), "{body}");
    // The nearest untrusted hop is the client, whatever it claimed further left.
    let response = send(&behind_proxy, "/", "203.0.113.7, 198.51.100.1")
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(
        echo["headers"]["x-forwarded-for"],
        "203.0.113.7, 198.51.100.1, 127.0.0.1"
    );
    assert_eq!(
        echo["headers"]["x-forwarded-proto"], "https",
        "the scheme the client spoke to the proxy"
    );
    // Per-address budgets are the clients', not the proxy's one address.
    for client_address in ["198.51.100.1", "198.51.100.2"] {
        let response = send(&behind_proxy, "/limited", client_address)
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{client_address}'s first request");
    }
    let response = send(&behind_proxy, "/limited", "198.51.100.1")
        .await
        .unwrap();
    assert_eq!(response.status(), 429);

    // Without trusted proxies, forwarding headers are the client's own claims.
    let response = send(&direct, "/", "203.0.113.7").await.unwrap();
    assert_eq!(response.status(), 200, "a denied address claimed");
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http");
    let response = send(&direct, "/limited", "198.51.100.1").await.unwrap();
    assert_eq!(response.status(), 200);
    let response = send(&direct, "/limited", "198.51.100.2").await.unwrap();
    assert_eq!(
        response.status(),
        429,
        "one budget for the one real address"
    );
    assert!(
        DataPlane::start(&config, &["--trusted-proxies", "10.0.0.0/33"]).is_err(),
        "a bad network stops the node"
    );
}

/// Sends `GET path` on a new connection that starts with `preamble` (a PROXY protocol
/// header) and answers the status and JSON body, or `None` when the node closed the
/// connection without answering.
async fn get_after(node: &DataPlane, preamble: &[u8], path: &str) -> Option<(u16, Value)> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    stream.write_all(preamble).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header("host", "gateway")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, serde_json::from_slice(&body).unwrap()))
}

#[tokio::test]
async fn an_l4_load_balancers_proxy_protocol_header_names_the_client() {
    let backend = EchoBackend::start("app").await.unwrap();
    let config = format!(
        r#"format_version: 1
upstreams:
  - name: app
    targets: [{{ url: "{}" }}]
policies:
  - name: no-documentation-net
    ip_restriction: {{ deny: ["203.0.113.0/24"] }}
apis:
  - name: walled
    policies: [no-documentation-net]
    routes:
      - {{ name: all, path: /, proxy: {{ upstream: app }} }}
"#,
        backend.url()
    );
    // The test is the load balancer, on loopback.
    let node = DataPlane::start(
        &config,
        &["--proxy-protocol", "--trusted-proxies", "127.0.0.0/8"],
    )
    .unwrap();
    let (status, body) = get_after(&node, b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\n", "/")
        .await
        .unwrap();
    assert_eq!((status, problem(&body)), (403, "ip-denied"), "{body}");
    let (status, echo) = get_after(&node, b"PROXY TCP4 198.51.100.4 10.0.0.1 51000 80\r\n", "/")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(echo["headers"]["x-forwarded-for"], "198.51.100.4");
    // The load balancer's own health check names nobody: it is the client.
    let (status, echo) = get_after(&node, b"PROXY UNKNOWN\r\n", "/").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
    // A connection without the header is closed unanswered, and counted.
    assert!(get_after(&node, b"", "/").await.is_none());
    assert!(
        get_after(&node, b"PROXY TCP4 nonsense\r\n", "/")
            .await
            .is_none()
    );
    assert_eq!(
        node.metric("sluice_proxy_protocol_refused_total", "")
            .await
            .unwrap(),
        2.0
    );

    // A header from a peer that is not a trusted proxy is read, and not believed.
    let untrusting = DataPlane::start(
        &config,
        &["--proxy-protocol", "--trusted-proxies", "10.0.0.0/8"],
    )
    .unwrap();
    let (status, echo) = get_after(
        &untrusting,
        b"PROXY TCP4 198.51.100.4 10.0.0.1 51000 80\r\n",
        "/",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
    assert!(
        DataPlane::start(&config, &["--proxy-protocol"]).is_err(),
        "the header is only believed from trusted proxies, so they must be named"
    );
}
