//! The client-facing listeners: plain HTTP/1.1 and HTTP/2 (h2c, prior knowledge) on one port,
//! and optionally TLS (HTTP/1.1 and h2 by ALPN, the certificate chosen by SNI from the running
//! config); each request is handed to the [`pipeline`], and HTTP/1.1 upgrades (WebSocket) are
//! allowed through. On shutdown the listeners stop accepting and open connections are drained
//! (HTTP/1 finishes its request, HTTP/2 sends GOAWAY) until a deadline.

pub mod error;
pub mod forwarding;
pub mod framing;
pub mod mirror;
pub mod pipeline;
pub mod send_timeout;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::auth::mtls::ClientCertificate;
use framing::{FramingGuard, Verdicts};
use pipeline::{ConnectionInfo, Gateway};
use send_timeout::SendTimeout;

/// Listener settings.
#[derive(Debug, Clone, Copy)]
pub struct ListenerSettings {
    /// A client must send its request headers within this time (slow-loris defence).
    pub header_read_timeout: Duration,
    /// A client connection whose writes make no progress for this long is closed (a client
    /// that stopped reading).
    pub send_timeout: Duration,
    /// Largest request head, HTTP/1 (request line and headers) or HTTP/2 (header list): 431
    /// beyond.
    pub max_header_bytes: usize,
    /// Most request headers, HTTP/1: 431 beyond.
    pub max_headers: usize,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
    /// Open client connections, all listeners together. At the limit the node stops
    /// accepting until one closes; new connections wait in the kernel's backlog.
    pub max_connections: usize,
}

/// A client connection's claim on one of [`ListenerSettings::max_connections`], counted in
/// `sluice_client_connections` while held.
struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A bound client listener: plain (HTTP/1.1 and h2c) or TLS (HTTP/1.1 and h2 by ALPN).
pub struct Listener {
    pub tcp: TcpListener,
    /// `None` for plain HTTP.
    pub tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("tcp", &self.tcp)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A TLS client must finish its handshake within this time.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listeners` until `shutdown` resolves, then drains. Returns once every connection
/// is closed or the drain deadline passed.
pub async fn serve(
    listeners: Vec<Listener>,
    gateway: Arc<Gateway>,
    settings: ListenerSettings,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .max_headers(settings.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    let graceful = Arc::new(GracefulShutdown::new());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let shared = Arc::new(Shared {
        gateway,
        builder: Arc::new(builder),
        graceful: graceful.clone(),
        slots,
        max_head: settings.max_header_bytes,
        max_headers: settings.max_headers,
        send_timeout: settings.send_timeout,
    });
    let mut acceptors = tokio::task::JoinSet::new();
    for listener in listeners {
        acceptors.spawn(accept(listener, shared.clone(), stopped.clone()));
    }
    shutdown.await;
    let _ = stop.send(true);
    // Each acceptor drops its listener as it returns: no new connections from here on.
    acceptors.join_all().await;
    drop(shared);
    // The acceptors held the only other references; connections hold watchers instead.
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        unreachable!("every acceptor has returned")
    };
    tracing::info!(deadline = ?settings.drain_timeout, "draining connections");
    match tokio::time::timeout(settings.drain_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!("drain deadline passed; closing remaining connections"),
    }
}

/// What every listener's acceptor shares.
struct Shared {
    gateway: Arc<Gateway>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    graceful: Arc<GracefulShutdown>,
    /// [`ListenerSettings::max_connections`].
    slots: Arc<Semaphore>,
    max_head: usize,
    max_headers: usize,
    send_timeout: Duration,
}

/// Accepts connections on one listener until told to stop, serving each on its own task.
async fn accept(
    listener: Listener,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let Shared {
        gateway,
        builder,
        graceful,
        slots,
        max_head,
        max_headers,
        send_timeout,
    } = &*shared;
    let (max_head, max_headers, send_timeout) = (*max_head, *max_headers, *send_timeout);
    let scheme = if listener.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let gauge = gateway.metrics().client_connections.clone();
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = async { stopped.wait_for(|stop| *stop).await.map(|_| ()) } => return,
        };
        gauge.inc();
        let slot = ConnectionSlot {
            _permit: permit,
            gauge: gauge.clone(),
        };
        let (stream, client) = tokio::select! {
            accepted = listener.tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { stopped.wait_for(|stop| *stop).await.map(|_| ()) } => return,
        };
        let _ = stream.set_nodelay(true);
        let stream = SendTimeout::new(stream, send_timeout);
        let gateway = gateway.clone();
        let verdicts = Arc::new(Verdicts::default());
        let framing = verdicts.clone();
        // The connection's service; over TLS, made once the handshake has told whether the
        // client presented a certificate.
        let make_service = move |info: ConnectionInfo| {
            service_fn(move |request| {
                let (gateway, info) = (gateway.clone(), info.clone());
                let ambiguous = framing.next_is_ambiguous();
                // Boxed: hyper keeps a connection's in-flight future in an allocation of the
                // future's full size for as long as the connection lives, and `handle`'s is
                // about 6 KB (every action's state). Boxed per request instead, an idle
                // keep-alive connection or an open event stream holds a few bytes for it (26.9
                // -> 20.9 KB per SSE connection in the fan-out benchmark).
                let handling =
                    Box::pin(async move { gateway.handle(info, request, ambiguous).await });
                async move { Ok::<_, Infallible>(handling.await) }
            })
        };
        let builder = builder.clone();
        match listener.tls.clone() {
            None => {
                let service = make_service(ConnectionInfo {
                    client,
                    scheme,
                    certificate: None,
                });
                let stream = FramingGuard::new(stream, max_head, max_headers, verdicts);
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, client = %client, "connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                // Registered now, so a drain waits for connections still in their handshake.
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _slot = slot;
                    let stream = match tokio::time::timeout(
                        TLS_HANDSHAKE_TIMEOUT,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, client = %client, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(client = %client, "TLS handshake timed out");
                            return;
                        }
                    };
                    let certificate = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(ClientCertificate::from_chain)
                        .map(Arc::new);
                    let service = make_service(ConnectionInfo {
                        client,
                        scheme,
                        certificate,
                    });
                    let stream = FramingGuard::new(stream, max_head, max_headers, verdicts);
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(e) = watcher.watch(connection).await {
                        tracing::debug!(error = %e, client = %client, "connection ended with an error");
                    }
                });
            }
        }
    }
}
