//! The client-facing listener: HTTP/1.1 and HTTP/2 (h2c, prior knowledge) on one port, each
//! request handed to the [`pipeline`]; HTTP/1.1 upgrades (WebSocket) are allowed through. On shutdown the listener stops accepting and open
//! connections are drained (HTTP/1 finishes its request, HTTP/2 sends GOAWAY) until a deadline.

pub mod error;
pub mod forwarding;
pub mod pipeline;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use pipeline::{ConnectionInfo, Gateway};

/// Listener settings.
#[derive(Debug, Clone, Copy)]
pub struct ListenerSettings {
    /// A client must send its request headers within this time (slow-loris defence).
    pub header_read_timeout: Duration,
    /// Largest request head, HTTP/1 (request line and headers) or HTTP/2 (header list): 431
    /// beyond.
    pub max_header_bytes: usize,
    /// Most request headers, HTTP/1: 431 beyond.
    pub max_headers: usize,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
}

/// Serves `listener` until `shutdown` resolves, then drains. Returns once every connection is
/// closed or the drain deadline passed.
pub async fn serve(
    listener: TcpListener,
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
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let info = ConnectionInfo {
            client,
            scheme: "http",
        };
        let gateway = gateway.clone();
        let service = service_fn(move |request| {
            let gateway = gateway.clone();
            async move { Ok::<_, Infallible>(gateway.handle(info, request).await) }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, client = %client, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(deadline = ?settings.drain_timeout, "draining connections");
    match tokio::time::timeout(settings.drain_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!("drain deadline passed; closing remaining connections"),
    }
}
