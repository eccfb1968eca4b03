//! A real HTTP backend for proxy tests, in the test's process: it answers every request with
//! a JSON echo of what it received, so a test can see exactly what the gateway forwarded.
//!
//! Paths with a meaning: `/status/{code}` answers that status, `/sleep/{ms}` answers after
//! that long, `/healthz` answers 200 or 503 as [`EchoBackend::set_healthy`] says. A request asking for an upgrade (WebSocket) gets a 101, and the upgraded
//! connection echoes every byte back. Every answer carries `x-backend` (the backend's name) and `x-connection` (the
//! number of the TCP connection it came on, counted from 1), so tests can see balancing and
//! connection reuse.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An echo backend on a loopback port; stops when dropped.
#[derive(Debug)]
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub name: String,
    requests: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl EchoBackend {
    /// Starts a backend named `name` (HTTP/1.1 and h2c).
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_with(name, None).await
    }

    /// Starts a backend named `name` that speaks TLS (HTTP/1.1 and h2 by ALPN) with `tls`.
    pub async fn start_tls(name: &str, tls: Arc<rustls::ServerConfig>) -> anyhow::Result<Self> {
        Self::start_with(name, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(
        name: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let health = healthy.clone();
        let connections = Arc::new(AtomicU64::new(0));
        let backend_name: Arc<str> = name.into();
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let connection = connections.fetch_add(1, Ordering::Relaxed) + 1;
                let (name, counter) = (backend_name.clone(), counter.clone());
                let health = health.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        counter.fetch_add(1, Ordering::Relaxed);
                        echo(
                            request,
                            name.clone(),
                            connection,
                            health.load(Ordering::Relaxed),
                        )
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            name: name.to_owned(),
            requests,
            healthy,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What `/healthz` answers from now on: 200, or 503 when `false`.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Requests answered so far (health checks included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(
    mut request: Request<Incoming>,
    name: Arc<str>,
    connection: u64,
    healthy: bool,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(protocol) = request.headers().get("upgrade").cloned() {
        // Accept any upgrade, then echo the raw bytes of the upgraded connection.
        let on_upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            }
        });
        let response = Response::builder()
            .status(101)
            .header("upgrade", protocol)
            .header("connection", "upgrade")
            .header("x-backend", &*name)
            .body(Full::new(Bytes::new()))
            .expect("a valid response");
        return Ok(response);
    }
    let path = request.uri().path().to_owned();
    let mut status = 200;
    if path == "/healthz" && !healthy {
        status = 503;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        status = code.parse().unwrap_or(500);
    }
    if let Some(ms) = path.strip_prefix("/sleep/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    let method = request.method().to_string();
    let version = format!("{:?}", request.version());
    let query = request.uri().query().map(str::to_owned);
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let echo = serde_json::json!({
        "backend": &*name,
        "method": method,
        "path": path,
        "query": query,
        "version": version,
        "headers": headers,
        "body_len": body.len(),
    });
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-backend", &*name)
        .header("x-connection", connection)
        .body(Full::new(Bytes::from(echo.to_string())))
        .expect("a valid response");
    Ok(response)
}
