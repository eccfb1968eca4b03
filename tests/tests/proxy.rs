//! The data plane as a reverse proxy, end to end: a real `sluice-dp` on a config file, real
//! backends on real sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::backend::EchoBackend;
use sluice_tests::data_plane::DataPlane;

fn config(upstreams: &str, routes: &str) -> String {
    format!(
        "format_version: 1\nupstreams:\n{upstreams}\napis:\n  - name: demo\n    routes:\n{routes}"
    )
}

fn upstream(name: &str, urls: &[String], extra: &str) -> String {
    let targets: Vec<String> = urls.iter().map(|u| format!("{{ url: \"{u}\" }}")).collect();
    format!(
        "  - name: {name}\n    targets: [{}]\n{extra}",
        targets.join(", ")
    )
}

/// One route taking every path to `backend`.
fn proxy_everything_to(backend: &EchoBackend) -> String {
    config(
        &upstream("backend", &[backend.url()], ""),
        "      - name: all\n        path: /\n        proxy: { upstream: backend }\n",
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn get_json(url: &str) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Value)> {
    let response = client().get(url).send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await?;
    Ok((status, headers, body))
}

/// Sends raw bytes and returns what came back until the server closed the connection (or
/// `timeout`), plus whether it closed. Blocking I/O, on a blocking thread: the test's backend
/// runs on the test's runtime and must keep answering meanwhile.
async fn raw(addr: SocketAddr, request: &[u8], timeout: Duration) -> (String, bool) {
    let request = request.to_vec();
    tokio::task::spawn_blocking(move || raw_blocking(addr, &request, timeout))
        .await
        .unwrap()
}

fn raw_blocking(addr: SocketAddr, request: &[u8], timeout: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// The backend's request count once it has stopped changing: a request cut off by the node
/// (a body refused mid-stream) may still reach the backend after the client has its answer.
async fn settled(backend: &EchoBackend) -> u64 {
    let mut last = backend.requests();
    loop {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now = backend.requests();
        if now == last {
            return now;
        }
        last = now;
    }
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn forwards_with_forwarding_headers_and_strips_hop_by_hop() -> anyhow::Result<()> {
    let backend = EchoBackend::start("b1").await?;
    let node = DataPlane::start(&proxy_everything_to(&backend), &[])?;
    let response = client()
        .get(node.url("/hello/world?x=1"))
        .header("host", "shop.example.com")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "hop")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-request-id", "req-123")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-123");
    let echo: Value = response.json().await?;
    let headers = &echo["headers"];
    assert_eq!(echo["path"], "/hello/world");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(headers["host"], backend.addr.to_string());
    assert_eq!(headers["x-forwarded-host"], "shop.example.com");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(headers["x-request-id"], "req-123");
    assert!(headers.get("x-secret").is_none(), "{headers}");
    let traceparent = headers["traceparent"].as_str().unwrap();
    assert!(
        traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
            && !traceparent.contains("00f067aa0ba902b7"),
        "{traceparent}"
    );

    // An absolute URI names the host; a Host header that says otherwise is replaced, so the
    // upstream is told the host the request was routed by.
    let (response, _) = raw(
        node.addr,
        b"GET http://shop.example.com/abs HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&response), 200, "{response}");
    let body = &response[response.find('{').unwrap()..=response.rfind('}').unwrap()];
    let echo: Value = serde_json::from_str(body)?;
    assert_eq!(echo["headers"]["x-forwarded-host"], "shop.example.com");

    // Without ids, the gateway makes them.
    let (_, response_headers, echo) = get_json(&node.url("/")).await?;
    let made = response_headers["x-request-id"].to_str()?;
    assert_eq!(made.len(), 36);
    assert_eq!(echo["headers"]["x-request-id"], made);
    assert_eq!(echo["headers"]["traceparent"].as_str().unwrap().len(), 55);
    Ok(())
}

#[tokio::test]
async fn routes_rewrite_and_strip_paths_and_answer_directly() -> anyhow::Result<()> {
    let backend = EchoBackend::start("b1").await?;
    let routes = r#"      - name: user
        path: "/users/{id}"
        proxy: { upstream: backend, path_rewrite: "/internal/u/{id}" }
      - name: assets
        path: /assets
        proxy: { upstream: backend, strip_prefix: true }
      - name: ping
        path: /ping
        path_match: exact
        direct_response: { status: 200, headers: { content-type: text/plain }, body: "pong\n" }
"#;
    let node = DataPlane::start(
        &config(&upstream("backend", &[backend.url()], ""), routes),
        &[],
    )?;
    let (_, _, echo) = get_json(&node.url("/users/42")).await?;
    assert_eq!(echo["path"], "/internal/u/42");
    let (_, _, echo) = get_json(&node.url("/assets/css/site.css")).await?;
    assert_eq!(echo["path"], "/css/site.css");
    let (_, _, echo) = get_json(&node.url("/assets")).await?;
    assert_eq!(echo["path"], "/");
    // Dot segments are resolved before routing and forwarding, never above the root.
    let (response, _) = raw(
        node.addr,
        b"GET /assets/a/../../users/7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert!(
        response.contains("\"path\":\"/internal/u/7\""),
        "{response}"
    );

    let response = client().get(node.url("/ping")).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/plain");
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(response.text().await?, "pong\n");

    let response = client().get(node.url("/nowhere")).send().await?;
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let request_id = response.headers()["x-request-id"].to_str()?.to_owned();
    let problem: Value = response.json().await?;
    assert_eq!(problem["type"], "https://sluice.dev/problems/no-route");
    assert_eq!(problem["request_id"], request_id);
    assert_eq!(backend.requests(), 4);
    Ok(())
}

#[tokio::test]
async fn upstream_failures_map_to_502_503_and_504() -> anyhow::Result<()> {
    let backend = EchoBackend::start("slow").await?;
    let closed = sluice_tests::ports::free_addr();
    let upstreams = format!(
        "{}{}",
        upstream("gone", &[format!("http://{closed}")], ""),
        upstream("slow", &[backend.url()], "    max_concurrent_requests: 1\n")
    );
    let routes = r#"      - name: gone
        path: /gone
        proxy: { upstream: gone }
      - name: quick
        path: /quick
        proxy: { upstream: slow, timeout: 200ms, path_rewrite: /sleep/2000 }
      - name: slow
        path: /sleep
        proxy: { upstream: slow }
"#;
    let node = DataPlane::start(&config(&upstreams, routes), &[])?;

    let response = client().get(node.url("/gone")).send().await?;
    assert_eq!(response.status(), 502);
    let problem: Value = response.json().await?;
    assert_eq!(
        problem["type"],
        "https://sluice.dev/problems/upstream-unreachable"
    );
    assert!(
        !problem["detail"]
            .as_str()
            .unwrap()
            .contains(&closed.to_string()),
        "no upstream address leaks: {problem}"
    );

    let started = Instant::now();
    let response = client().get(node.url("/quick")).send().await?;
    assert_eq!(response.status(), 504);
    assert!(started.elapsed() < Duration::from_millis(1500));

    // One slow request holds the only slot: the next is refused at once with Retry-After.
    let slow = tokio::spawn(client().get(node.url("/sleep/800")).send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = client().get(node.url("/sleep/0")).send().await?;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let problem: Value = response.json().await?;
    assert_eq!(
        problem["type"],
        "https://sluice.dev/problems/upstream-overloaded"
    );
    assert_eq!(slow.await??.status(), 200);
    // The slot is free again once the slow response finished.
    assert_eq!(
        client().get(node.url("/sleep/0")).send().await?.status(),
        200
    );
    Ok(())
}

#[tokio::test]
async fn malformed_and_oversized_requests_are_refused_and_the_node_stays_healthy()
-> anyhow::Result<()> {
    let backend = EchoBackend::start("b1").await?;
    let node = DataPlane::start(
        &proxy_everything_to(&backend),
        &["--max-body-bytes", "1024", "--max-header-bytes", "16384"],
    )?;
    let t = Duration::from_secs(5);
    let cases: Vec<(&str, Vec<u8>, u16, bool)> = vec![
        (
            "differing Content-Lengths",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nAA".to_vec(),
            400,
            true,
        ),
        (
            "obfuscated Transfer-Encoding",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
            true,
        ),
        (
            "Transfer-Encoding with a space before the colon",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
            true,
        ),
        (
            "bad chunk size",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
            400,
            true,
        ),
        (
            "bad request line",
            b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
            true,
        ),
        (
            "encoded slash",
            b"GET /a%2F..%2Fetc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            400,
            true,
        ),
        (
            "encoded NUL",
            b"GET /a%00b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            400,
            true,
        ),
        (
            "malformed escape",
            b"GET /a%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            400,
            true,
        ),
        (
            "oversized header",
            format!(
                "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(20_000)
            )
            .into_bytes(),
            431,
            true,
        ),
        (
            "too many headers",
            format!(
                "GET / HTTP/1.1\r\nHost: x\r\n{}\r\n",
                (0..150).map(|i| format!("X-H{i}: 1\r\n")).collect::<String>()
            )
            .into_bytes(),
            431,
            true,
        ),
        (
            "declared body too large",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{}",
                "a".repeat(5000)
            )
            .into_bytes(),
            413,
            true,
        ),
        (
            "streamed body too large",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\n\r\n",
                "400\r\n".to_owned() + &"a".repeat(1024) + "\r\n400\r\n" + &"a".repeat(1024) + "\r\n"
            )
            .into_bytes(),
            413,
            true,
        ),
    ];
    for (name, request, status, must_close) in cases {
        let (response, closed) = raw(node.addr, &request, t).await;
        assert_eq!(status_of(&response), status, "{name}: {response}");
        if must_close {
            assert!(closed, "{name}: the connection must be closed");
        }
    }
    // (Bodies are streamed: a request whose body turns out malformed or too large has
    // already reached the backend, and is cut off there; its client gets the 400 or 413.)

    // Smuggling attempts with an ambiguous length: refused with 400 before anything reaches
    // the backend, and the connection closed, so the smuggled tail never becomes a request.
    let smuggling: [(&str, &[u8]); 3] = [
        (
            "CL.TE",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "TE.CL",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "identical duplicate Content-Lengths",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nAGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
    ];
    for (name, request) in smuggling {
        let before = settled(&backend).await;
        let (response, closed) = raw(node.addr, request, t).await;
        assert_eq!(status_of(&response), 400, "{name}: {response}");
        assert!(response.contains("ambiguous length"), "{name}: {response}");
        assert!(!response.contains("/smuggled"), "{name}: {response}");
        assert!(closed, "{name}: the connection must be closed");
        assert_eq!(settled(&backend).await, before, "{name}: nothing forwarded");
    }
    // The same, after a good keep-alive request and a chunked one on the same connection:
    // the node follows the framing to each request's head.
    let before = settled(&backend).await;
    let (response, closed) = raw(
        node.addr,
        b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nA\
          POST /two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          POST /three HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        t,
    )
    .await;
    assert!(response.contains(r#""path":"/one""#), "{response}");
    assert!(response.contains(r#""path":"/two""#), "{response}");
    assert!(response.contains("HTTP/1.1 400"), "{response}");
    assert!(closed);
    assert_eq!(settled(&backend).await, before + 2);

    let (status, _, _) = get_json(&node.url("/fine")).await?;
    assert_eq!(status, 200);
    let (status, _) = sluice_tests::http::get(node.admin, "/healthz", t)?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test]
async fn balances_by_weight_and_hashes_consistently() -> anyhow::Result<()> {
    let (a, b) = (
        EchoBackend::start("a").await?,
        EchoBackend::start("b").await?,
    );
    let upstreams = format!(
        "  - name: weighted\n    targets: [{{ url: \"{}\", weight: 100 }}, {{ url: \"{}\", weight: 300 }}]\n{}",
        a.url(),
        b.url(),
        upstream(
            "sticky",
            &[a.url(), b.url()],
            "    load_balancing: { algorithm: consistent_hash, hash_header: x-user }\n"
        )
    );
    let routes = "      - name: w\n        path: /w\n        proxy: { upstream: weighted }\n      - name: s\n        path: /s\n        proxy: { upstream: sticky }\n";
    let node = DataPlane::start(&config(&upstreams, routes), &[])?;
    let client = client();
    let mut to_b = 0;
    for _ in 0..400 {
        let response = client.get(node.url("/w")).send().await?;
        if response.headers()["x-backend"] == "b" {
            to_b += 1;
        }
    }
    assert_eq!(to_b, 300, "weights 100:300 over 400 requests");
    for user in 0..20 {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let response = client
                .get(node.url("/s"))
                .header("x-user", format!("user-{user}"))
                .send()
                .await?;
            seen.insert(response.headers()["x-backend"].to_str()?.to_owned());
        }
        assert_eq!(seen.len(), 1, "user-{user} went to {seen:?}");
    }
    Ok(())
}

#[tokio::test]
async fn reloads_the_file_keeps_the_old_config_on_errors_and_keeps_connections()
-> anyhow::Result<()> {
    let backend = EchoBackend::start("b1").await?;
    let up = upstream("backend", &[backend.url()], "");
    let v1 = config(
        &up,
        "      - name: one\n        path: /one\n        proxy: { upstream: backend }\n",
    );
    let node = DataPlane::start(&v1, &["--watch-interval", "50ms"])?;
    let client = client();
    let first = client.get(node.url("/one")).send().await?;
    let connection = first.headers()["x-connection"].to_str()?.to_owned();

    let v2 = config(
        &up,
        "      - name: two\n        path: /two\n        proxy: { upstream: backend }\n",
    );
    node.write_config(&v2)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.get(node.url("/two")).send().await?.status() != 200 {
        assert!(Instant::now() < deadline, "the new route never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(client.get(node.url("/one")).send().await?.status(), 404);
    // The upstream did not change, so its pooled connection survived the swap.
    let again = client.get(node.url("/two")).send().await?;
    assert_eq!(again.headers()["x-connection"], connection.as_str());

    node.write_config("format_version: 1\napis: [{ name: broken, routes: [{ path: /x }] }]\n")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.metric("sluice_config_rejections_total", "").await? < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the broken file was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(client.get(node.url("/two")).send().await?.status(), 200);
    // The log is written off the request path: it may follow the counter by a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node
        .process
        .log_text()
        .contains("the previous one keeps serving")
    {
        assert!(Instant::now() < deadline, "the rejection was never logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_swaps_under_load_fail_no_request() -> anyhow::Result<()> {
    let backend = EchoBackend::start("b1").await?;
    let up = upstream("backend", &[backend.url()], "");
    // Two configs that differ in a route both of them serve, so every request has a route
    // whichever config it lands on.
    let variant = |n: u32| {
        config(
            &up,
            &format!(
                "      - name: all\n        path: /\n        proxy: {{ upstream: backend }}\n      - name: extra-{n}\n        path: /extra-{n}\n        direct_response: {{ status: 200 }}\n"
            ),
        )
    };
    // One worker (a current-thread runtime, as the benchmark runs): reloads share the one
    // thread with the traffic.
    let node = DataPlane::start(&variant(0), &["--watch-interval", "2ms", "--workers", "1"])?;
    let base_swaps = node.metric("sluice_config_swaps_total", "").await?;
    let client = client();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (client, done, ok, failed) = (client.clone(), done.clone(), ok.clone(), failed.clone());
        let url = node.url("/load");
        workers.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let served = match client.get(&url).send().await {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                let counter = if served { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut swaps = 0.0;
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while swaps < 1000.0 || ok.load(Ordering::Relaxed) < 50_000 {
        assert!(
            Instant::now() < deadline,
            "{swaps} swaps and {} requests in 240 s",
            ok.load(Ordering::Relaxed)
        );
        n += 1;
        node.write_config(&variant(n))?;
        // Wait until the node picked this version up before writing the next one.
        let wanted = base_swaps + f64::from(n);
        let each = Instant::now();
        loop {
            swaps = node.metric("sluice_config_swaps_total", "").await? - base_swaps;
            if swaps + base_swaps >= wanted || each.elapsed() > Duration::from_secs(5) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    done.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await?;
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{swaps} swaps, {ok} requests ok, {failed} failed");
    assert!(swaps >= 1000.0);
    assert!(ok >= 50_000);
    assert_eq!(failed, 0);
    assert_eq!(
        node.metric("sluice_config_rejections_total", "").await?,
        0.0
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_requests_in_flight() -> anyhow::Result<()> {
    let backend = EchoBackend::start("b1").await?;
    let mut node = DataPlane::start(
        &proxy_everything_to(&backend),
        // One worker: the current-thread runtime drains as the multi-thread one does.
        &["--drain-timeout", "10s", "--workers", "1"],
    )?;
    let slow = tokio::spawn(client().get(node.url("/sleep/1000")).send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let readyz = format!("http://{}/readyz", node.admin);
    assert_eq!(client().get(&readyz).send().await?.status(), 200);
    node.process.terminate()?;
    // Draining: no longer ready, so that load balancers send new connections elsewhere.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = client().get(&readyz).send().await?;
    assert_eq!(during.status(), 503);
    assert!(during.text().await?.contains("draining"));
    let response = slow.await??;
    assert_eq!(response.status(), 200, "the request in flight finished");
    let status = node.process.wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "{status}");
    assert!(
        TcpStream::connect(node.addr).is_err(),
        "no longer accepting"
    );
    Ok(())
}

#[tokio::test]
async fn http2_clients_and_http2_upstreams() -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Empty};
    let backend = EchoBackend::start("h2").await?;
    let upstreams = format!(
        "{}{}",
        upstream("h1", &[backend.url()], ""),
        upstream("h2", &[backend.url()], "    protocol: http2\n")
    );
    let routes = "      - name: one\n        path: /h1\n        proxy: { upstream: h1 }\n      - name: two\n        path: /h2\n        proxy: { upstream: h2 }\n";
    let node = DataPlane::start(&config(&upstreams, routes), &[])?;
    // An h2c (prior knowledge) client.
    let client: hyper_util::client::legacy::Client<_, Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    for (path, upstream_version) in [("/h1", "HTTP/1.1"), ("/h2", "HTTP/2.0")] {
        let response = client.get(node.url(path).parse()?).await?;
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), http::Version::HTTP_2);
        let body = response.into_body().collect().await?.to_bytes();
        let echo: Value = serde_json::from_slice(&body)?;
        assert_eq!(echo["version"], upstream_version, "{echo}");
    }
    Ok(())
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_disconnected_after_the_header_read_timeout()
-> anyhow::Result<()> {
    let backend = EchoBackend::start("quiet").await?;
    let node = DataPlane::start(
        &proxy_everything_to(&backend),
        &["--header-read-timeout", "1s"],
    )?;
    let addr = node.addr;
    // Nothing at all, and the start of HTTP/2's preface without the rest: neither tells which
    // HTTP the client speaks.
    for sent in [&b""[..], &b"PRI * HT"[..]] {
        let took = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
            let mut stream = TcpStream::connect(addr)?;
            stream.write_all(sent)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            let started = Instant::now();
            let mut answer = Vec::new();
            match stream.read_to_end(&mut answer) {
                Ok(_) => anyhow::ensure!(answer.is_empty(), "the node answered {answer:?}"),
                // Closed with the client's bytes unread: the kernel resets the connection.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => anyhow::bail!("the node kept the connection: {e}"),
            }
            Ok(started.elapsed())
        })
        .await??;
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{sent:?}: closed after {took:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn an_idle_http2_connection_is_sent_goaway_after_the_idle_timeout() -> anyhow::Result<()> {
    let backend = EchoBackend::start("idle").await?;
    let node = DataPlane::start(&proxy_everything_to(&backend), &["--idle-timeout", "300ms"])?;
    let stream = tokio::net::TcpStream::connect(node.addr).await?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    // Driven on its own task, which answers the node's pings as live clients do, and ends
    // when the node closes the connection.
    let connection = tokio::spawn(connection);
    // A connection that keeps asking is kept, well past the idle timeout...
    for _ in 0..8 {
        let request =
            http::Request::get(node.url("/")).body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let response = sender.send_request(request).await?;
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!connection.is_finished(), "a busy connection was closed");
    // ...and once it stops asking, the node sends GOAWAY and closes it.
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .map_err(|_| anyhow::anyhow!("the idle HTTP/2 connection was kept open"))???;
    Ok(())
}

#[tokio::test]
async fn an_upstream_that_stops_sending_its_body_is_cut_off() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A backend that sends its headers and the start of its body, then hangs.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let backend = listener.local_addr()?;
    let hanging = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nthe start")
                .await;
            held.push(stream);
        }
    });
    let node = DataPlane::start(
        &config(
            &upstream("hangs", &[format!("http://{backend}")], ""),
            "      - name: all\n        path: /\n        proxy: { upstream: hangs }\n",
        ),
        &["--upstream-idle-timeout", "300ms"],
    )?;
    let started = Instant::now();
    let response = client().get(node.url("/")).send().await?;
    assert_eq!(response.status(), 200);
    assert!(
        response.bytes().await.is_err(),
        "a body cut short must end in an error, not look complete"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the body was cut off only after {:?}",
        started.elapsed()
    );
    hanging.abort();
    Ok(())
}

#[tokio::test]
async fn websocket_upgrades_are_tunnelled() -> anyhow::Result<()> {
    let backend = EchoBackend::start("ws").await?;
    let node = DataPlane::start(&proxy_everything_to(&backend), &[])?;
    let addr = node.addr;
    let (head, echoed) = tokio::task::spawn_blocking(move || {
        sluice_tests::http::websocket_echo(addr, b"frames pass through untouched")
    })
    .await??;
    assert_eq!(status_of(&head), 101, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert!(lower.contains("x-request-id:"), "{head}");
    assert_eq!(echoed, b"frames pass through untouched");

    // Another protocol (h2c, which would tunnel requests past the gateway) is not upgraded:
    // the request goes upstream without its Upgrade header and is answered as it is.
    let (response, _) = raw(
        addr,
        b"GET /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert!(
        !response.to_ascii_lowercase().contains("\"upgrade\""),
        "the upstream saw an Upgrade header: {response}"
    );
    Ok(())
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() -> anyhow::Result<()> {
    use std::io::ErrorKind;
    let backend = EchoBackend::start("ws").await?;
    let node = DataPlane::start(&proxy_everything_to(&backend), &["--send-timeout", "1s"])?;
    let addr = node.addr;
    // A WebSocket tunnel to the echo backend; the client writes and never reads, until every
    // buffer on the way (its socket, the node's, the backend's) is full and its own writes
    // have not moved for half a second.
    let started = Instant::now();
    let stalled = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<TcpStream>> {
        let (mut stream, head) = sluice_tests::http::websocket_upgrade(addr)?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
        stream.set_nonblocking(true)?;
        let chunk = [b'x'; 64 * 1024];
        let mut moved = Instant::now();
        while moved.elapsed() < Duration::from_millis(500) {
            match stream.write(&chunk) {
                Ok(0) => anyhow::bail!("the connection closed while the client wrote"),
                Ok(_) => moved = Instant::now(),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                // On a loaded machine the buffers behind the node can take longer to fill than
                // the send timeout: the node's writes to the client stalled first, and it cut
                // the connection while the client's writes still crept on. That is the cut
                // this test waits for; when it came is checked below.
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(stream))
    })
    .await??;
    let Some(mut client) = stalled else {
        let after = started.elapsed();
        assert!(
            after >= Duration::from_secs(1),
            "the node cut the client off after {after:?}, before its 1 s send timeout could pass"
        );
        return Ok(());
    };
    // The node's writes to the client have stalled: past the send timeout it closes the
    // connection. Reading only after that (reading earlier would let the writes move again),
    // the client gets what was already on its way, then the end.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let closed = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
        client.set_nonblocking(false)?;
        client.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            match client.read(&mut buffer) {
                Ok(0) => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(true),
                // Still open: nothing more came for the read timeout.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
    })
    .await??;
    assert!(closed, "the node kept a client that took nothing for 3 s");
    Ok(())
}

#[tokio::test]
async fn an_http2_stream_given_no_window_is_reset_after_the_send_timeout() -> anyhow::Result<()> {
    use anyhow::Context;
    use http_body_util::{BodyExt, Empty};
    let backend = EchoBackend::start("stalled-h2").await?;
    let node = DataPlane::start(&proxy_everything_to(&backend), &["--send-timeout", "1s"])?;
    // A client that grants its streams no window and never opens it: a response's headers can
    // come, its body cannot. The connection itself goes on reading, so the socket never
    // stalls and only the stream can be seen to.
    let mut sender = sluice_tests::http::h2_connection(node.addr, 0).await?;
    let sent = Instant::now();
    let request = http::Request::get(node.url("/stalled")).body(Empty::new())?;
    let response = sender.send_request(request).await?;
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .context("the stream that could not send was still open after 10 s")?;
    let after = sent.elapsed();
    let error = body
        .err()
        .context("a body with no window to come in arrived")?;
    let error = format!("{error:?}");
    assert!(
        error.contains("CANCEL") && error.contains("Remote"),
        "the stream ended otherwise than by the node's reset: {error}"
    );
    assert!(
        after >= Duration::from_millis(900),
        "reset after {after:?}, before the 1 s send timeout could pass"
    );
    // The stream was reset, not the connection: it still serves a response with no body.
    let request = http::Request::head(node.url("/after")).body(Empty::new())?;
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .context("the connection did not answer after the reset")??;
    assert_eq!(response.status(), 200);
    Ok(())
}

#[tokio::test]
async fn grpc_passes_through_with_its_trailers() -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    // A real gRPC server (the standard health service) as the upstream.
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("sluice.test", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let backend = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let node = DataPlane::start(
        &config(
            &upstream(
                "grpc",
                &[format!("http://{backend}")],
                "    protocol: http2\n",
            ),
            "      - name: health\n        path: /grpc.health.v1.Health\n        proxy: { upstream: grpc }\n",
        ),
        &[],
    )?;
    let channel = tonic::transport::Endpoint::from_shared(node.url(""))?
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    let serving = client
        .check(HealthCheckRequest {
            service: "sluice.test".into(),
        })
        .await?;
    assert_eq!(serving.into_inner().status, ServingStatus::Serving as i32);
    // A gRPC error travels in the trailers (grpc-status), which must arrive intact.
    let unknown = client
        .check(HealthCheckRequest {
            service: "no.such.service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    server.abort();
    Ok(())
}

#[tokio::test]
async fn safe_requests_are_retried_on_another_target() -> anyhow::Result<()> {
    let backend = EchoBackend::start("alive").await?;
    let dead = format!("http://{}", sluice_tests::ports::free_addr());
    let upstreams = format!(
        "{}{}",
        upstream(
            "retrying",
            &[dead.clone(), backend.url()],
            // Every request may retry (100%): the budget has its own test.
            "    retry: { attempts: 2, backoff_base: 1ms, budget_percent: 100 }\n"
        ),
        upstream("once", &[dead, backend.url()], "")
    );
    let routes = "      - name: r\n        path: /r\n        proxy: { upstream: retrying }\n      - name: o\n        path: /o\n        proxy: { upstream: once }\n";
    let node = DataPlane::start(&config(&upstreams, routes), &[])?;
    let client = client();
    for _ in 0..20 {
        let response = client.get(node.url("/r")).send().await?;
        let status = response.status();
        let body = response.text().await?;
        assert_eq!(status, 200, "a connect error is retried elsewhere: {body}");
    }
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(client.get(node.url("/o")).send().await?.status().as_u16());
    }
    assert!(
        statuses.contains(&502),
        "without retries half fail: {statuses:?}"
    );
    // A body cannot be sent twice: such requests are not retried.
    let mut with_body = Vec::new();
    for _ in 0..20 {
        let response = client.post(node.url("/r")).body("payload").send().await?;
        with_body.push(response.status().as_u16());
    }
    assert!(with_body.contains(&502), "{with_body:?}");
    assert!(with_body.contains(&200), "{with_body:?}");
    Ok(())
}

#[tokio::test]
async fn the_retry_budget_caps_retries_when_an_upstream_keeps_failing() -> anyhow::Result<()> {
    let backend = EchoBackend::start("failing").await?;
    let node = DataPlane::start(
        &config(
            &upstream(
                "failing",
                &[backend.url()],
                "    retry: { attempts: 3, on_statuses: [503], backoff_base: 1ms, budget_percent: 20 }\n",
            ),
            "      - name: all\n        path: /\n        proxy: { upstream: failing }\n",
        ),
        &[],
    )?;
    let client = client();
    for _ in 0..100 {
        let response = client.get(node.url("/status/503")).send().await?;
        assert_eq!(response.status(), 503, "the last try's answer goes back");
    }
    // 100 requests, a reserve of 10 retries and 20% of 100 earned: 30 retries, where
    // unbudgeted retries would have sent 400.
    assert_eq!(backend.requests(), 130);
    // Not idempotent: never retried on a status.
    let before = backend.requests();
    let response = client.post(node.url("/status/503")).send().await?;
    assert_eq!(response.status(), 503);
    assert_eq!(backend.requests(), before + 1);
    Ok(())
}

#[tokio::test]
async fn state_gauges_show_the_running_upstreams_and_no_others() -> anyhow::Result<()> {
    let backend = EchoBackend::start("flaky").await?;
    let routes = "      - name: all\n        path: /\n        proxy: { upstream: flaky }\n";
    let breaker = "    circuit_breaker: { failure_threshold: 1, open_for: 60s }\n";
    let node = DataPlane::start(
        &config(&upstream("flaky", &[backend.url()], breaker), routes),
        &["--watch-interval", "20ms"],
    )?;
    let gauge = "sluice_upstream_circuit_state";
    assert_eq!(
        client().get(node.url("/status/500")).send().await?.status(),
        500
    );
    assert_eq!(node.metric(gauge, "flaky").await?, 1.0, "open");
    let settled = |name: &'static str, at_least: f64| {
        let node = &node;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while node.metric(name, "").await? < at_least {
                anyhow::ensure!(Instant::now() < deadline, "{name} stayed below {at_least}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        }
    };
    // A change to the upstream in a configuration that is then refused (a broker librdkafka
    // cannot make): the running breaker is still open, and still shown so.
    // An upstream new in that configuration never shows.
    let refused = format!(
        "{}brokers:\n  - name: bad\n    kafka:\n      bootstrap_servers: [\"127.0.0.1:1\"]\n      properties: {{ no.such.property: x }}\n",
        config(
            &format!(
                "{}{}",
                upstream(
                    "flaky",
                    &[backend.url()],
                    &format!("{breaker}    timeouts: {{ connect: 2s }}\n")
                ),
                upstream("newcomer", &[backend.url()], breaker)
            ),
            routes
        )
    );
    node.write_config(&refused)?;
    settled("sluice_config_rejections_total", 1.0).await?;
    assert_eq!(node.metric(gauge, "flaky").await?, 1.0, "still open");
    let metrics = || async {
        let url = format!("http://{}/metrics", node.admin);
        anyhow::Ok(client().get(url).send().await?.text().await?)
    };
    // A state series of `upstream`, which alerts read (counters at 0 alert nobody).
    let shown = |text: &str, upstream: &str| {
        let upstream = format!("upstream=\"{upstream}\"");
        text.lines().any(|line| {
            (line.starts_with("sluice_upstream_circuit_state")
                || line.starts_with("sluice_upstream_target_healthy"))
                && line.contains(&upstream)
        })
    };
    let text = metrics().await?;
    assert!(!shown(&text, "newcomer"), "{text}");
    // Any series at all naming `label`.
    let named = |text: &str, label: &str| {
        text.lines()
            .any(|line| !line.starts_with('#') && line.contains(label))
    };
    assert!(named(&text, "upstream=\"flaky\""), "{text}");
    assert!(named(&text, "route=\"all\""), "{text}");
    // The upstream gone: its breaker's and target's series go with it, and so do its
    // latency's; the route renamed takes its counters.
    let swaps = node.metric("sluice_config_swaps_total", "").await?;
    let other = EchoBackend::start("steady").await?;
    node.write_config(&config(
        &upstream("steady", &[other.url()], breaker),
        "      - name: steadily\n        path: /\n        proxy: { upstream: steady }\n",
    ))?;
    settled("sluice_config_swaps_total", swaps + 1.0).await?;
    let text = metrics().await?;
    assert!(!shown(&text, "flaky"), "{text}");
    assert!(!named(&text, "upstream=\"flaky\""), "{text}");
    assert!(!named(&text, "route=\"all\""), "{text}");
    assert_eq!(
        node.metric(gauge, "steady").await?,
        0.0,
        "the new one, closed"
    );
    Ok(())
}

#[tokio::test]
async fn the_circuit_opens_on_failures_and_closes_after_a_good_probe() -> anyhow::Result<()> {
    let backend = EchoBackend::start("flaky").await?;
    let node = DataPlane::start(
        &config(
            &upstream(
                "flaky",
                &[backend.url()],
                "    circuit_breaker: { failure_threshold: 3, open_for: 400ms, half_open_requests: 1 }\n",
            ),
            "      - name: all\n        path: /\n        proxy: { upstream: flaky }\n",
        ),
        &[],
    )?;
    let client = client();
    for _ in 0..3 {
        let response = client.get(node.url("/status/500")).send().await?;
        assert_eq!(response.status(), 500);
    }
    // Open: refused at once, without reaching the backend.
    let response = client.get(node.url("/status/200")).send().await?;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let problem: Value = response.json().await?;
    assert_eq!(problem["type"], "https://sluice.dev/problems/circuit-open");
    assert_eq!(backend.requests(), 3);
    assert_eq!(
        node.metric("sluice_upstream_circuit_state", "flaky")
            .await?,
        1.0
    );

    // Half-open after open_for: a failed probe opens it again...
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        client.get(node.url("/status/502")).send().await?.status(),
        502
    );
    assert_eq!(
        client.get(node.url("/status/200")).send().await?.status(),
        503
    );
    // ...and a good one closes it.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        client.get(node.url("/status/200")).send().await?.status(),
        200
    );
    assert_eq!(
        node.metric("sluice_upstream_circuit_state", "flaky")
            .await?,
        0.0
    );
    for _ in 0..5 {
        assert_eq!(
            client.get(node.url("/status/200")).send().await?.status(),
            200
        );
    }
    assert_eq!(backend.requests(), 3 + 1 + 1 + 5);
    Ok(())
}

#[tokio::test]
async fn clients_that_fail_their_own_uploads_do_not_open_the_circuit() -> anyhow::Result<()> {
    let backend = EchoBackend::start("steady").await?;
    let node = DataPlane::start(
        &config(
            &upstream(
                "steady",
                &[backend.url()],
                "    circuit_breaker: { failure_threshold: 2, open_for: 60s }\n",
            ),
            "      - name: all\n        path: /\n        proxy: { upstream: steady, timeout: 500ms }\n",
        ),
        &["--max-body-bytes", "1024"],
    )?;
    let t = Duration::from_secs(5);
    let oversized = format!(
        "POST /anything HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n{}\r\n0\r\n\r\n",
        "a".repeat(4096)
    );
    // Announces 100 bytes, sends 10, then waits: the route's time runs out mid-upload.
    let stalled = b"POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789";
    for _ in 0..3 {
        let (response, _) = raw(node.addr, oversized.as_bytes(), t).await;
        assert_eq!(status_of(&response), 413, "{response}");
        let (response, _) = raw(node.addr, stalled, Duration::from_secs(3)).await;
        assert_eq!(
            status_of(&response),
            408,
            "a stalled upload is the client's timeout, not the upstream's: {response}"
        );
    }
    assert_eq!(
        client().get(node.url("/status/200")).send().await?.status(),
        200,
        "six client failures must not open the circuit for everyone"
    );
    assert_eq!(
        node.metric("sluice_upstream_circuit_state", "steady")
            .await?,
        0.0
    );
    Ok(())
}

#[tokio::test]
async fn health_checks_eject_a_failing_target_and_bring_it_back() -> anyhow::Result<()> {
    let (a, b) = (
        EchoBackend::start("a").await?,
        EchoBackend::start("b").await?,
    );
    // The checks come with a reload, compiled on the node's config thread (as every config
    // from a control plane is), not with the first file read on the runtime.
    let node = DataPlane::start(
        &config(
            &upstream("checked", &[a.url(), b.url()], ""),
            "      - name: before\n        path: /before\n        proxy: { upstream: checked }\n",
        ),
        &["--watch-interval", "50ms"],
    )?;
    node.write_config(&config(
        &upstream(
            "checked",
            &[a.url(), b.url()],
            "    health_check: { path: /healthz, interval: 50ms, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 2 }\n",
        ),
        "      - name: all\n        path: /\n        proxy: { upstream: checked }\n",
    ))?;
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.get(node.url("/work")).send().await?.status() != 200 {
        assert!(Instant::now() < deadline, "the reload never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let backends = |n: usize| {
        let client = client.clone();
        let url = node.url("/work");
        async move {
            let mut seen = Vec::new();
            for _ in 0..n {
                let response = client.get(&url).send().await?;
                anyhow::ensure!(response.status() == 200, "{}", response.status());
                seen.push(response.headers()["x-backend"].to_str()?.to_owned());
            }
            anyhow::Ok(seen)
        }
    };
    assert!(backends(10).await?.contains(&"b".to_owned()));

    b.set_healthy(false);
    let deadline = Instant::now() + Duration::from_secs(5);
    while node
        .metric("sluice_upstream_target_healthy", &b.addr.to_string())
        .await?
        != 0.0
    {
        assert!(Instant::now() < deadline, "b was never ejected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = backends(20).await?;
    assert!(seen.iter().all(|s| s == "a"), "{seen:?}");

    b.set_healthy(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while node
        .metric("sluice_upstream_target_healthy", &b.addr.to_string())
        .await?
        != 1.0
    {
        assert!(Instant::now() < deadline, "b never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(backends(10).await?.contains(&"b".to_owned()));
    Ok(())
}

#[tokio::test]
async fn canaries_take_their_share_and_a_header_forces_a_version() -> anyhow::Result<()> {
    let (stable, canary) = (
        EchoBackend::start("stable").await?,
        EchoBackend::start("canary").await?,
    );
    let upstreams = format!(
        "{}{}",
        upstream("stable", &[stable.url()], ""),
        upstream("canary", &[canary.url()], "")
    );
    let routes = "      - name: all\n        path: /\n        proxy:\n          upstream: stable\n          canaries: [{ upstream: canary, percent: 20, version: v2 }]\n          version_header: x-version\n";
    let node = DataPlane::start(&config(&upstreams, routes), &[])?;
    let client = client();
    let mut to_canary = 0;
    const N: usize = 1000;
    for _ in 0..N {
        let response = client.get(node.url("/split")).send().await?;
        assert_eq!(response.status(), 200);
        if response.headers()["x-backend"] == "canary" {
            to_canary += 1;
        }
    }
    // 20% of 1000: the binomial's standard deviation is about 13, so 140..260 is over 4.5 of
    // them either way.
    assert!(
        (140..=260).contains(&to_canary),
        "{to_canary} of {N} went to the canary"
    );
    for (version, backend) in [("v2", "canary"), ("primary", "stable")] {
        for _ in 0..20 {
            let response = client
                .get(node.url("/forced"))
                .header("x-version", version)
                .send()
                .await?;
            assert_eq!(
                response.headers()["x-backend"],
                backend,
                "x-version: {version}"
            );
        }
    }
    assert_eq!(
        node.metric("sluice_requests_total", "route=\"all\"")
            .await?,
        (N + 40) as f64
    );
    Ok(())
}

#[tokio::test]
async fn a_mirror_gets_a_copy_of_each_request_and_its_answer_is_discarded() -> anyhow::Result<()> {
    let (real, shadow) = (
        EchoBackend::start("real").await?,
        EchoBackend::start("shadow").await?,
    );
    let nowhere = format!("http://{}", sluice_tests::ports::free_addr());
    let upstreams = format!(
        "{}{}{}",
        upstream("real", &[real.url()], ""),
        upstream("shadow", &[shadow.url()], ""),
        upstream("nowhere", &[nowhere], "")
    );
    let routes = "      - name: all\n        path: /\n        proxy: { upstream: real, mirror: { upstream: shadow } }\n      - name: dead-mirror\n        path: /dead-mirror\n        proxy: { upstream: real, mirror: { upstream: nowhere, percent: 100 } }\n";
    let node = DataPlane::start(&config(&upstreams, routes), &[])?;
    let client = client();
    for i in 0..10 {
        let body = vec![b'x'; 1000 * (i + 1)];
        let response = client.post(node.url("/orders")).body(body).send().await?;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-backend"], "real");
        let echo: Value = response.json().await?;
        assert_eq!(echo["body_len"], 1000 * (i + 1));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while node
        .metric("sluice_mirror_requests_total", "result=\"answered\"")
        .await?
        < 10.0
    {
        assert!(
            Instant::now() < deadline,
            "the mirror did not get every copy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(shadow.requests(), 10);
    assert_eq!(real.requests(), 10);
    // A mirror that cannot be reached changes nothing for the client.
    let response = client.get(node.url("/dead-mirror")).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-backend"], "real");
    let deadline = Instant::now() + Duration::from_secs(5);
    while node
        .metric("sluice_mirror_requests_total", "result=\"failed\"")
        .await?
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the failed mirror was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn passive_ejection_takes_a_failing_target_out_and_tries_it_again_later() -> anyhow::Result<()>
{
    let good = EchoBackend::start("good").await?;
    // A target that refuses connections: a port nobody listens on.
    let dead = format!("http://{}", sluice_tests::ports::free_addr());
    let node = DataPlane::start(
        &config(
            &upstream(
                "flaky",
                &[good.url(), dead.clone()],
                "    outlier_detection: { consecutive_failures: 2, base_ejection: 1s }\n",
            ),
            "      - name: all\n        path: /\n        proxy: { upstream: flaky }\n",
        ),
        &[],
    )?;
    let client = client();
    let statuses = |n: usize| {
        let client = client.clone();
        let url = node.url("/work");
        async move {
            let mut statuses = Vec::new();
            for _ in 0..n {
                statuses.push(client.get(&url).send().await?.status().as_u16());
            }
            anyhow::Ok(statuses)
        }
    };
    // Round robin: every other request reaches the dead target until it is ejected after
    // two failures.
    let first = statuses(6).await?;
    assert_eq!(first.iter().filter(|s| **s == 502).count(), 2, "{first:?}");
    assert_eq!(
        node.metric("sluice_upstream_ejections_total", "").await?,
        1.0
    );
    let ejected = statuses(20).await?;
    assert!(ejected.iter().all(|s| *s == 200), "{ejected:?}");
    // After the ejection the target is tried again; still dead, it is ejected for longer.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let retried = statuses(6).await?;
    assert_eq!(
        retried.iter().filter(|s| **s == 502).count(),
        2,
        "{retried:?}"
    );
    assert_eq!(
        node.metric("sluice_upstream_ejections_total", "").await?,
        2.0
    );
    Ok(())
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() -> anyhow::Result<()> {
    let backend = EchoBackend::start("b").await?;
    let node = DataPlane::start(&proxy_everything_to(&backend), &["--max-connections", "2"])?;
    let addr = node.addr;
    let request = b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n";
    // Two keep-alive connections, each answered and left open.
    let held = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<TcpStream>> {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(addr)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(request)?;
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf)?;
            anyhow::ensure!(buf[..n].starts_with(b"HTTP/1.1 200"), "not answered");
            held.push(stream);
        }
        Ok(held)
    })
    .await??;
    assert_eq!(node.metric("sluice_client_connections", "").await?, 2.0);
    // A third waits: the kernel accepts it, the node does not serve it.
    let third = tokio::task::spawn_blocking(move || -> anyhow::Result<(bool, String)> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(request)?;
        let mut buf = [0u8; 4096];
        let waited = stream.read(&mut buf).is_err();
        // Once a held connection closes, it is served.
        drop(held);
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let n = stream.read(&mut buf)?;
        Ok((waited, String::from_utf8_lossy(&buf[..n]).into_owned()))
    })
    .await??;
    assert!(third.0, "the third connection was served past the limit");
    assert!(third.1.starts_with("HTTP/1.1 200"), "{}", third.1);
    Ok(())
}
