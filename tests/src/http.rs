//! A minimal HTTP/1.1 GET for readiness checks and admin endpoints, with timeouts, so the
//! harness needs no HTTP client of its own; a raw WebSocket upgrade with an echo check; and
//! reading a Prometheus exposition.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail};

/// Status and body of `GET path` on `addr`. Fails after `timeout` on any step.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.take(16 << 20).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("response has no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("chunked responses are not supported by this test client");
    }
    Ok((status, body.to_owned()))
}

/// Asks `addr` for a WebSocket upgrade of `/chat`, then writes `message` on the upgraded
/// connection and reads as many bytes back. Returns the response head and the bytes read.
/// Blocking: call it from `spawn_blocking` when the backend runs on the test's runtime.
pub fn websocket_echo(addr: SocketAddr, message: &[u8]) -> anyhow::Result<(String, Vec<u8>)> {
    let (mut stream, head) = websocket_upgrade(addr)?;
    stream.write_all(message)?;
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed)?;
    Ok((head, echoed))
}

/// Asks `addr` for a WebSocket upgrade of `/chat` and reads the response head, byte by byte so
/// that nothing after it is read. Returns the connection (reads time out after 5 s) and the
/// head. Blocking.
pub fn websocket_upgrade(addr: SocketAddr) -> anyhow::Result<(TcpStream, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(
        b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    Ok((stream, String::from_utf8_lossy(&head).into_owned()))
}

/// The sum of the series of metric `name` whose labels contain `labels` ("" for all) in a
/// Prometheus text exposition.
pub fn metric_sum(exposition: &str, name: &str, labels: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            metric == name && rest.contains(labels)
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

/// The kind of a problem+json body (`https://sluice.dev/problems/<kind>`), or "" when the body
/// is none.
pub fn problem_kind(body: &serde_json::Value) -> &str {
    body["type"]
        .as_str()
        .and_then(|t| t.strip_prefix("https://sluice.dev/problems/"))
        .unwrap_or_default()
}

/// An HTTP/2 (prior knowledge) connection to `addr` whose streams start with `window` bytes of
/// flow-control window; the client gives more only as a body is read.
pub async fn h2_connection(
    addr: SocketAddr,
    window: u32,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>> {
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(addr).await?);
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(window)
            .handshake(io)
            .await?;
    tokio::spawn(connection);
    Ok(sender)
}
