//! TLS end to end: the node terminating TLS with certificates chosen by SNI from its config
//! (and swapped with it), and the node connecting to upstreams over TLS, verifying them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use sluice_tests::backend::EchoBackend;
use sluice_tests::data_plane::DataPlane;
use sluice_tests::pki::{Leaf, TestCa};
use sluice_tests::ports::free_addr;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

fn certificate(name: &str, leaf: &Leaf, snis: &[&str]) -> String {
    format!(
        "  - name: {name}\n    snis: [{}]\n    cert_pem: {}    key_pem: {}",
        snis.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", "),
        Leaf::yaml_block(&leaf.cert_pem, 6),
        Leaf::yaml_block(&leaf.key_pem, 6),
    )
}

fn config(backend: &EchoBackend, certificates: &str) -> String {
    format!(
        "format_version: 1\nupstreams:\n  - name: app\n    targets: [{{ url: \"{}\" }}]\n\
         apis:\n  - name: demo\n    routes:\n      - name: all\n        path: /\n        proxy: {{ upstream: app }}\n\
         certificates:\n{certificates}",
        backend.url()
    )
}

/// A TLS connection to the node with `sni`, offering `alpn`.
async fn connect(
    ca: &TestCa,
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> anyhow::Result<TlsStream<TcpStream>> {
    let connector = TlsConnector::from(ca.client_config(alpn)?);
    let tcp = TcpStream::connect(addr).await?;
    Ok(connector
        .connect(ServerName::try_from(sni.to_owned())?, tcp)
        .await?)
}

fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate")[0]
        .clone()
}

/// One GET over an established TLS connection, HTTP/1.1 or h2 as ALPN chose.
async fn get(
    stream: TlsStream<TcpStream>,
    host: &str,
) -> anyhow::Result<(http::Version, u16, Value)> {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let request = http::Request::get(format!("https://{host}/hello"))
        .header("host", host)
        .body(Empty::<Bytes>::new())?;
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        tokio::spawn(connection);
        sender.send_request(request).await?
    } else {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        sender.send_request(request).await?
    };
    let (version, status) = (response.version(), response.status().as_u16());
    let body = response.into_body().collect().await?.to_bytes();
    Ok((version, status, serde_json::from_slice(&body)?))
}

#[tokio::test]
async fn terminates_tls_with_the_certificate_its_sni_names_and_swaps_certificates()
-> anyhow::Result<()> {
    let ca = TestCa::new("Sluice test CA")?;
    let (a, fallback) = (
        ca.leaf(&["a.example.test"])?,
        ca.leaf(&["*.example.test", "fallback.test"])?,
    );
    let backend = EchoBackend::start("app").await?;
    let tls_addr = free_addr();
    let certificates = format!(
        "{}{}",
        certificate("a", &a, &["a.example.test"]),
        certificate("fallback", &fallback, &["*"])
    );
    let node = DataPlane::start(
        &config(&backend, &certificates),
        &["--tls-listen", &tls_addr.to_string()],
    )?;

    // The exact name gets its certificate, over HTTP/1.1 and over h2.
    let stream = connect(&ca, tls_addr, "a.example.test", &[b"http/1.1"]).await?;
    assert_eq!(presented(&stream), a.der()?);
    let (version, status, echo) = get(stream, "a.example.test").await?;
    assert_eq!((version, status), (http::Version::HTTP_11, 200), "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https", "{echo}");
    assert_eq!(
        echo["headers"]["x-forwarded-host"], "a.example.test",
        "{echo}"
    );
    let stream = connect(&ca, tls_addr, "a.example.test", &[b"h2", b"http/1.1"]).await?;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (version, status, _) = get(stream, "a.example.test").await?;
    assert_eq!((version, status), (http::Version::HTTP_2, 200));

    // Another name gets the default certificate.
    let stream = connect(&ca, tls_addr, "b.example.test", &[b"http/1.1"]).await?;
    assert_eq!(presented(&stream), fallback.der()?);

    // Each certificate's expiry is shown.
    let expiry = |name: &'static str| {
        let node = &node;
        async move {
            node.metric(
                "sluice_certificate_not_after_timestamp_seconds",
                &format!("certificate=\"{name}\""),
            )
            .await
        }
    };
    // rcgen's default notAfter, 4096-01-01.
    assert_eq!(expiry("a").await?, 67_090_118_400.0);
    assert_eq!(expiry("fallback").await?, 67_090_118_400.0);

    // A new certificate for a.example.test is presented once the file changes, on the same
    // listener.
    let renewed = ca.leaf_until(&["a.example.test"], Some((2099, 6, 30)))?;
    let certificates = format!(
        "{}{}",
        certificate("a", &renewed, &["a.example.test"]),
        certificate("fallback", &fallback, &["*"])
    );
    node.write_config(&config(&backend, &certificates))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stream = connect(&ca, tls_addr, "a.example.test", &[b"http/1.1"]).await?;
        if presented(&stream) == renewed.der()? {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never presented"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A key that does not belong to its certificate is refused; the node keeps the old one.
    let mismatched = Leaf {
        cert_pem: renewed.cert_pem.clone(),
        key_pem: a.key_pem.clone(),
    };
    let rejections = node.metric("sluice_config_rejections_total", "").await?;
    let certificates = format!(
        "{}{}",
        certificate("a", &mismatched, &["a.example.test"]),
        certificate("fallback", &fallback, &["*"])
    );
    node.write_config(&config(&backend, &certificates))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.metric("sluice_config_rejections_total", "").await? <= rejections {
        assert!(
            Instant::now() < deadline,
            "the mismatched key was never refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stream = connect(&ca, tls_addr, "a.example.test", &[b"http/1.1"]).await?;
    assert_eq!(presented(&stream), renewed.der()?);
    let (_, status, _) = get(stream, "a.example.test").await?;
    assert_eq!(status, 200);
    // 2099-06-30T00:00:00Z: the renewed certificate's.
    assert_eq!(expiry("a").await?, 4_086_460_800.0);

    // A certificate no longer served has no expiry shown.
    node.write_config(&config(&backend, &certificate("a", &renewed, &["*"])))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while expiry("fallback").await? != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the removed certificate's expiry is still shown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(expiry("a").await?, 4_086_460_800.0);
    Ok(())
}

#[tokio::test]
async fn a_name_without_a_certificate_and_no_default_fails_the_handshake() -> anyhow::Result<()> {
    let ca = TestCa::new("Sluice test CA")?;
    let a = ca.leaf(&["a.example.test"])?;
    let backend = EchoBackend::start("app").await?;
    let tls_addr = free_addr();
    let node = DataPlane::start(
        &config(&backend, &certificate("a", &a, &["a.example.test"])),
        &["--tls-listen", &tls_addr.to_string()],
    )?;
    assert!(
        connect(&ca, tls_addr, "other.test", &[b"http/1.1"])
            .await
            .is_err()
    );
    // The node is unharmed, on both listeners.
    let stream = connect(&ca, tls_addr, "a.example.test", &[b"http/1.1"]).await?;
    assert_eq!(get(stream, "a.example.test").await?.1, 200);
    assert_eq!(reqwest::get(node.url("/plain")).await?.status(), 200);
    Ok(())
}

#[tokio::test]
async fn proxies_to_tls_upstreams_and_verifies_them() -> anyhow::Result<()> {
    let ca = TestCa::new("Sluice upstream CA")?;
    let leaf = ca.leaf(&["backend.test"])?;
    let backend = EchoBackend::start_tls("secure", leaf.server_config()?).await?;
    let url = format!("https://{}", backend.addr);
    let ca_block = Leaf::yaml_block(&ca.cert_pem(), 10);
    let config = format!(
        "format_version: 1\nupstreams:\n\
         \x20 - name: trusted\n    targets: [{{ url: \"{url}\" }}]\n    tls:\n      server_name: backend.test\n      ca_pem: {ca_block}\
         \x20 - name: http1\n    targets: [{{ url: \"{url}\" }}]\n    protocol: http1\n    tls:\n      server_name: backend.test\n      ca_pem: {ca_block}\
         \x20 - name: wrong-name\n    targets: [{{ url: \"{url}\" }}]\n    tls:\n      server_name: other.test\n      ca_pem: {ca_block}\
         \x20 - name: system-roots\n    targets: [{{ url: \"{url}\" }}]\n\
         \x20 - name: unverified\n    targets: [{{ url: \"{url}\" }}]\n    tls: {{ insecure_skip_verify: true }}\n\
         apis:\n  - name: demo\n    routes:\n\
         \x20     - {{ name: trusted, path: /trusted, proxy: {{ upstream: trusted }} }}\n\
         \x20     - {{ name: http1, path: /http1, proxy: {{ upstream: http1 }} }}\n\
         \x20     - {{ name: wrong-name, path: /wrong-name, proxy: {{ upstream: wrong-name }} }}\n\
         \x20     - {{ name: system-roots, path: /system-roots, proxy: {{ upstream: system-roots }} }}\n\
         \x20     - {{ name: unverified, path: /unverified, proxy: {{ upstream: unverified }} }}\n"
    );
    let node = DataPlane::start(&config, &[])?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let answer = |path: &'static str| {
        let (client, url) = (client.clone(), node.url(path));
        async move {
            let response = client.get(url).send().await?;
            let status = response.status().as_u16();
            let body: Value = response.json().await?;
            anyhow::Ok((status, body))
        }
    };
    // Verified against the configured CA and name; ALPN picks h2 unless the upstream is
    // pinned to HTTP/1.1.
    let (status, echo) = answer("/trusted").await?;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["backend"], "secure");
    assert_eq!(echo["version"], "HTTP/2.0", "{echo}");
    let (status, echo) = answer("/http1").await?;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["version"], "HTTP/1.1", "{echo}");
    // A certificate for another name, or from a CA the node does not trust: 502.
    for path in ["/wrong-name", "/system-roots"] {
        let (status, problem) = answer(path).await?;
        assert_eq!(status, 502, "{path}: {problem}");
        assert_eq!(
            problem["type"], "https://sluice.dev/problems/upstream-unreachable",
            "{problem}"
        );
    }
    let (status, echo) = answer("/unverified").await?;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(backend.requests(), 3);
    Ok(())
}

#[tokio::test]
async fn websockets_reach_tls_upstreams_that_also_speak_h2() -> anyhow::Result<()> {
    let ca = TestCa::new("Sluice upstream CA")?;
    let leaf = ca.leaf(&["backend.test"])?;
    // The backend offers h2 and http/1.1: an upgrade must still go out over HTTP/1.1.
    let backend = EchoBackend::start_tls("secure-ws", leaf.server_config()?).await?;
    let config = format!(
        "format_version: 1\nupstreams:\n\
         \x20 - name: secure\n    targets: [{{ url: \"https://{}\" }}]\n    tls:\n      server_name: backend.test\n      ca_pem: {}\
         apis:\n  - name: demo\n    routes:\n      - {{ name: all, path: /, proxy: {{ upstream: secure }} }}\n",
        backend.addr,
        Leaf::yaml_block(&ca.cert_pem(), 10),
    );
    let node = DataPlane::start(&config, &[])?;
    let addr = node.addr;
    let (head, echoed) = tokio::task::spawn_blocking(move || {
        sluice_tests::http::websocket_echo(addr, b"over TLS, untouched")
    })
    .await??;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(echoed, b"over TLS, untouched");
    Ok(())
}

#[tokio::test]
async fn an_h2_client_that_never_sends_its_preface_is_let_go() -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let ca = TestCa::new("Sluice test CA")?;
    let a = ca.leaf(&["a.example.test"])?;
    let backend = EchoBackend::start("app").await?;
    let tls_addr = free_addr();
    let node = DataPlane::start(
        &config(&backend, &certificate("a", &a, &["a.example.test"])),
        &[
            "--tls-listen",
            &tls_addr.to_string(),
            "--header-read-timeout",
            "500ms",
            "--max-connections",
            "1",
        ],
    )?;
    // h2 by ALPN, and then nothing: the connection is closed after the header read timeout,
    // and its slot (the only one) goes to the next client.
    let mut silent = connect(&ca, tls_addr, "a.example.test", &[b"h2"]).await?;
    assert_eq!(silent.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let started = Instant::now();
    // The node's own preface (its SETTINGS), then the end of the connection.
    let mut sent = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut sent)).await;
    assert!(read.is_ok(), "still open after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(400));
    let next = connect(&ca, tls_addr, "a.example.test", &[b"h2"]);
    let stream = tokio::time::timeout(Duration::from_secs(5), next).await??;
    assert_eq!(get(stream, "a.example.test").await?.1, 200);
    drop(node);
    Ok(())
}

#[tokio::test]
async fn a_proxy_protocol_header_comes_before_the_tls_handshake() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let ca = TestCa::new("Sluice test CA")?;
    let a = ca.leaf(&["a.example.test"])?;
    let backend = EchoBackend::start("app").await?;
    let tls_addr = free_addr();
    let _node = DataPlane::start(
        &config(&backend, &certificate("a", &a, &["a.example.test"])),
        &[
            "--tls-listen",
            &tls_addr.to_string(),
            "--proxy-protocol",
            "--trusted-proxies",
            "127.0.0.1",
        ],
    )?;
    let mut tcp = TcpStream::connect(tls_addr).await?;
    tcp.write_all(b"PROXY TCP4 198.51.100.4 10.0.0.1 51000 443\r\n")
        .await?;
    let connector = TlsConnector::from(ca.client_config(&[b"h2"])?);
    let stream = connector
        .connect(ServerName::try_from("a.example.test")?, tcp)
        .await?;
    let (_, status, echo) = get(stream, "a.example.test").await?;
    assert_eq!(status, 200);
    assert_eq!(echo["headers"]["x-forwarded-for"], "198.51.100.4", "{echo}");
    // Without the header, the handshake does not get going.
    assert!(
        connect(&ca, tls_addr, "a.example.test", &[b"h2"])
            .await
            .is_err()
    );
    Ok(())
}
