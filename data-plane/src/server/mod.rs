//! The client-facing listeners: plain HTTP/1.1 and HTTP/2 (h2c, prior knowledge) on one port,
//! and optionally TLS (HTTP/1.1 and h2 by ALPN, the certificate chosen by SNI from the running
//! config); each request is handed to the [`pipeline`], and HTTP/1.1 upgrades (WebSocket) are
//! allowed through. On shutdown the listeners stop accepting and open connections are drained
//! (HTTP/1 finishes its request, HTTP/2 sends GOAWAY) until a deadline.
//!
//! A connection's HTTP version is known before hyper sees it: by ALPN over TLS (HTTP/1.1 when
//! the client offers none), and on the plain port by peeking at the client's first bytes for
//! HTTP/2's preface, which leaves them in the socket. (`hyper_util`'s `auto` server reads them
//! and hands them back; the short first read makes hyper double its HTTP/1 read buffer to 16
//! KB, kept for the connection's life: about 6 KB of RSS per idle connection or event stream.)

pub mod error;
pub mod forwarding;
pub mod framing;
pub mod h2_stall;
pub mod mirror;
pub mod pipeline;
pub mod preface;
pub mod proxy_protocol;
pub mod send_timeout;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::auth::mtls::ClientCertificate;
use forwarding::TrustedProxies;
use framing::{FramingGuard, Verdicts};
use h2_stall::{ResponseBody, StreamExecutor};
use pipeline::{ConnectionInfo, Gateway};
use preface::{PrefaceDeadline, PrefaceWatch};
use proxy_protocol::Behind;
use send_timeout::SendTimeout;

/// Listener settings.
#[derive(Debug, Clone, Copy)]
pub struct ListenerSettings {
    /// A client must send its request headers within this time (slow-loris defence).
    pub header_read_timeout: Duration,
    /// A client connection whose writes make no progress for this long is closed (a client
    /// that stopped reading); an HTTP/2 stream that has had bytes to send and sent none for
    /// this long is reset ([`h2_stall`]).
    pub send_timeout: Duration,
    /// Largest request head, HTTP/1 (request line and headers) or HTTP/2 (header list): 431
    /// beyond.
    pub max_header_bytes: usize,
    /// Most request headers, HTTP/1: 431 beyond.
    pub max_headers: usize,
    /// An HTTP/2 connection that starts no request for this long is sent GOAWAY (its open
    /// streams finish): an idle one holds a connection slot no longer than an idle HTTP/1
    /// keep-alive connection does (which the header read timeout ends). Zero: never.
    pub idle_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
    /// Open client connections, all listeners together. At the limit the node stops
    /// accepting until one closes; new connections wait in the kernel's backlog.
    pub max_connections: usize,
    /// Every client connection starts with a PROXY protocol header ([`proxy_protocol`]),
    /// read within the header read timeout; the trusted proxies' name the client.
    pub proxy_protocol: bool,
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

/// An HTTP/2 client is pinged after this long without a frame, and the connection is closed
/// when the ping goes unanswered for [`H2_PING_TIMEOUT`].
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The first bytes of every HTTP/2 connection: a client on the plain port that starts with
/// them speaks h2c with prior knowledge; one that does not speaks HTTP/1.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How soon a client that has sent part of HTTP/2's preface is looked at again (a peek
/// returns at once while bytes wait, so it cannot wait for more by itself), the first time;
/// each wait after is twice as long, up to [`PREFACE_RECHECK_MAX`], so that clients that stop
/// halfway cost a few wake-ups each until the header read timeout, not hundreds a second.
const PREFACE_RECHECK: Duration = Duration::from_millis(5);
const PREFACE_RECHECK_MAX: Duration = Duration::from_millis(250);

/// The HTTP version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Http {
    One,
    Two,
}

/// hyper's settings for each version.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<StreamExecutor>,
}

/// Serves `listeners` until `shutdown` resolves, then drains. Returns once every connection
/// is closed or the drain deadline passed.
pub async fn serve(
    listeners: Vec<Listener>,
    gateway: Arc<Gateway>,
    settings: ListenerSettings,
    shutdown: impl Future<Output = ()>,
) {
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .max_headers(settings.max_headers);
    // Each HTTP/2 stream's task is watched for flow-control stalls, which the socket's
    // `SendTimeout` cannot see.
    let mut http2 = http2::Builder::new(StreamExecutor {
        send_timeout: settings.send_timeout,
    });
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        // A peer gone without a word (its streams open, its socket silent) is found by pings.
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    // Set once the node stops. Every acceptor and connection holds a receiver: a connection
    // drains when it sees the stop, and the node has drained when no receiver is left.
    let (stop, stopped) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let shared = Arc::new(Shared {
        gateway: gateway.clone(),
        protocols: Arc::new(Protocols { http1, http2 }),
        slots,
        max_head: settings.max_header_bytes,
        max_headers: settings.max_headers,
        header_read_timeout: settings.header_read_timeout,
        send_timeout: settings.send_timeout,
        idle_timeout: settings.idle_timeout,
        proxy_protocol: settings
            .proxy_protocol
            .then(|| gateway.trusted_proxies().clone()),
    });
    let acceptor = tokio::spawn(accept(listeners, shared.clone(), stopped.clone()));
    drop(stopped);
    shutdown.await;
    let _ = stop.send(true);
    shared.gateway.stop_event_streams();
    // The acceptor drops the listeners as it returns: no new connections from here on.
    if let Err(e) = acceptor.await
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
    tracing::info!(deadline = ?settings.drain_timeout, "draining connections");
    let draining = tokio::time::Instant::now();
    match tokio::time::timeout(settings.drain_timeout, stop.closed()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!("drain deadline passed; closing remaining connections"),
    }
    // Publishes whose clients left still finish and store their answers, within what is left
    // of the deadline: cut short, each would leave its idempotency claim to expire.
    let left = settings.drain_timeout.saturating_sub(draining.elapsed());
    if !shared.gateway.finish_tasks(left).await {
        tracing::warn!("drain deadline passed; abandoning publishes whose clients left");
    }
}

/// What every listener's acceptor shares.
struct Shared {
    gateway: Arc<Gateway>,
    protocols: Arc<Protocols>,
    /// [`ListenerSettings::max_connections`].
    slots: Arc<Semaphore>,
    max_head: usize,
    max_headers: usize,
    header_read_timeout: Duration,
    send_timeout: Duration,
    idle_timeout: Duration,
    /// With [`ListenerSettings::proxy_protocol`]: whose PROXY headers name the client.
    proxy_protocol: Option<TrustedProxies>,
}

/// Accepts connections on every listener until told to stop, serving each on its own task.
/// One loop for all listeners: a connection slot is taken before accepting, and one acceptor
/// per listener would each hold a slot while waiting (with `--max-connections 1`, the plain
/// listener's acceptor would hold the only one, and TLS clients would never be served).
async fn accept(listeners: Vec<Listener>, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let Shared {
        gateway,
        protocols,
        slots,
        max_head,
        max_headers,
        header_read_timeout,
        send_timeout,
        idle_timeout,
        proxy_protocol,
    } = &*shared;
    let (max_head, max_headers, header_read_timeout, send_timeout, idle_timeout) = (
        *max_head,
        *max_headers,
        *header_read_timeout,
        *send_timeout,
        *idle_timeout,
    );
    let gauge = gateway.metrics().client_connections.clone();
    let refused = gateway.metrics().proxy_protocol_refused.clone();
    for turn in 0.. {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = stopping(&mut stopped) => return,
        };
        let ((mut stream, client), tls) = tokio::select! {
            (accepted, listener) = accept_any(&listeners, turn) => match accepted {
                Ok(accepted) => (accepted, listener.tls.clone()),
                Err(e) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopping(&mut stopped) => return,
        };
        gauge.inc();
        let slot = ConnectionSlot {
            _permit: permit,
            gauge: gauge.clone(),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        let verdicts = Arc::new(Verdicts::default());
        let framing = verdicts.clone();
        // Requests started on the connection, which an HTTP/2 connection's idle watch reads.
        let started = Arc::new(AtomicU64::new(0));
        let idle = Idle {
            timeout: idle_timeout,
            started: started.clone(),
            preface: None,
        };
        // The connection's service; over TLS, made once the handshake has told whether the
        // client presented a certificate.
        let make_service = move |info: ConnectionInfo| {
            service_fn(move |request| {
                let (gateway, info) = (gateway.clone(), info.clone());
                let ambiguous = framing.next_is_ambiguous();
                started.fetch_add(1, Ordering::Relaxed);
                // Boxed: hyper keeps a connection's in-flight future in an allocation of the
                // future's full size for as long as the connection lives, and `handle`'s is
                // about 6 KB (every action's state). Boxed per request instead, an idle
                // keep-alive connection or an open event stream holds a few bytes for it (26.9
                // -> 20.9 KB per SSE connection in the fan-out benchmark).
                let handling =
                    Box::pin(async move { gateway.handle(info, request, ambiguous).await });
                async move { Ok::<_, Infallible>(h2_stall::report_sends(handling.await)) }
            })
        };
        // Held by the connection's task from here on, so a drain also waits for connections
        // still in their TLS handshake or yet to send their first bytes.
        let (protocols, mut stopped) = (protocols.clone(), stopped.clone());
        let proxied = proxy_protocol
            .clone()
            .map(|trusted| (trusted, refused.clone()));
        tokio::spawn(async move {
            let _slot = slot;
            // One deadline for the PROXY header and the first bytes after it.
            let deadline = tokio::time::Instant::now() + header_read_timeout;
            // The PROXY header's read and the sniff below are boxed: a task's future is as
            // large as the largest thing it may hold, and these (buffers, timers, the stop's
            // waiter) would otherwise stay in every connection's task, event streams
            // included, for as long as it lives.
            let (client, forwarding) = match proxied {
                None => (client, true),
                Some((trusted, refused)) => {
                    let read = Box::pin(async {
                        tokio::select! {
                            read = client_behind(&mut stream, client, &trusted, deadline) => Some(read),
                            () = stopping(&mut stopped) => None,
                        }
                    });
                    match read.await {
                        Some(Some(behind)) => (behind.client, behind.forwarding),
                        Some(None) => {
                            refused.inc();
                            return;
                        }
                        None => return,
                    }
                }
            };
            match tls {
                None => {
                    let sniffed = Box::pin(async {
                        tokio::select! {
                            sniffed = tokio::time::timeout_at(deadline, sniff(&stream)) => Some(sniffed),
                            () = stopping(&mut stopped) => None,
                        }
                    });
                    let version = match sniffed.await {
                        Some(Ok(Ok(Some(version)))) => version,
                        None | Some(Ok(Ok(None))) => return,
                        Some(Ok(Err(e))) => {
                            tracing::debug!(error = %e, client = %client, "connection failed before its first request");
                            return;
                        }
                        Some(Err(_)) => {
                            tracing::debug!(client = %client, "client sent nothing within the header read timeout");
                            return;
                        }
                    };
                    let service = make_service(ConnectionInfo {
                        peer: client,
                        forwarding,
                        scheme,
                        certificate: None,
                    });
                    let stream = SendTimeout::new(stream, send_timeout);
                    let io =
                        TokioIo::new(FramingGuard::new(stream, max_head, max_headers, verdicts));
                    if let Err(e) = serve_in(version, io, service, &protocols, stopped, idle).await
                    {
                        tracing::debug!(error = %e, client = %client, "connection ended with an error");
                    }
                }
                // Boxed: a handshake in progress is large, and the task of every plain
                // connection (an idle keep-alive, an event stream) would otherwise be as large.
                Some(acceptor) => Box::pin(async move {
                    let stream = match tokio::time::timeout(
                        TLS_HANDSHAKE_TIMEOUT,
                        acceptor.accept(SendTimeout::new(stream, send_timeout)),
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
                    let session = stream.get_ref().1;
                    // As the listener offers (h2, then HTTP/1.1); a client that names none
                    // speaks HTTP/1.1.
                    let version = if session.alpn_protocol() == Some(b"h2") {
                        Http::Two
                    } else {
                        Http::One
                    };
                    let certificate = session
                        .peer_certificates()
                        .and_then(ClientCertificate::from_chain)
                        .map(Arc::new);
                    let service = make_service(ConnectionInfo {
                        peer: client,
                        forwarding,
                        scheme,
                        certificate,
                    });
                    let (stream, preface) = PrefaceWatch::new(stream, header_read_timeout);
                    let idle = Idle {
                        preface: Some(preface),
                        ..idle
                    };
                    let io =
                        TokioIo::new(FramingGuard::new(stream, max_head, max_headers, verdicts));
                    if let Err(e) = serve_in(version, io, service, &protocols, stopped, idle).await
                    {
                        tracing::debug!(error = %e, client = %client, "connection ended with an error");
                    }
                })
                .await,
            }
        });
    }
}

/// The next connection on any of `listeners`, and the listener it came to. Each call looks at
/// them from the next one on (`turn`), so that a flood on one does not starve the others.
async fn accept_any(
    listeners: &[Listener],
    turn: usize,
) -> (io::Result<(TcpStream, SocketAddr)>, &Listener) {
    std::future::poll_fn(|cx| {
        let (first, then) = listeners.split_at(turn % listeners.len().max(1));
        for listener in then.iter().chain(first) {
            if let std::task::Poll::Ready(accepted) = listener.tcp.poll_accept(cx) {
                return std::task::Poll::Ready((accepted, listener));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Who a connection that starts with a PROXY protocol header (read by `deadline`) is from.
/// `None`: the header is missing or malformed, and the connection is to be closed.
async fn client_behind(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: &TrustedProxies,
    deadline: tokio::time::Instant,
) -> Option<Behind> {
    match tokio::time::timeout_at(deadline, proxy_protocol::read_client(stream, peer, trusted))
        .await
    {
        Ok(Ok(client)) => Some(client),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, peer = %peer, "connection refused");
            None
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "no PROXY protocol header within the header read timeout");
            None
        }
    }
}

/// Resolves once the node stops (or is gone).
async fn stopping(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// The HTTP version a client on the plain port speaks, from its first bytes, which stay in
/// the socket for hyper to read. `None`: it closed without sending any.
async fn sniff(stream: &TcpStream) -> io::Result<Option<Http>> {
    let mut first = [0u8; H2_PREFACE.len()];
    let mut recheck = PREFACE_RECHECK;
    loop {
        let read = stream.peek(&mut first).await?;
        if read == 0 {
            return Ok(None);
        }
        if first[..read] != H2_PREFACE[..read] {
            return Ok(Some(Http::One));
        }
        if read == H2_PREFACE.len() {
            return Ok(Some(Http::Two));
        }
        tokio::time::sleep(recheck).await;
        recheck = (recheck * 2).min(PREFACE_RECHECK_MAX);
    }
}

/// One connection served in `version` until it closes or, once the node stops, until it has
/// drained (HTTP/1 closes after the request in flight, HTTP/2 sends GOAWAY and finishes its
/// streams). Boxed at its own version's size: a task's future is as large as the largest
/// thing it may hold, and an HTTP/2 connection is larger than an HTTP/1 one.
fn serve_in<I, S>(
    version: Http,
    io: I,
    service: S,
    protocols: &Protocols,
    stopped: watch::Receiver<bool>,
    idle: Idle,
) -> Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<
            hyper::body::Incoming,
            ResBody = ResponseBody,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    match version {
        Http::One => Box::pin(until_drained(
            protocols
                .http1
                .serve_connection(io, service)
                .with_upgrades(),
            http1::UpgradeableConnection::graceful_shutdown,
            stopped,
            None,
        )),
        Http::Two => Box::pin(until_drained(
            protocols.http2.serve_connection(io, service),
            http2::Connection::graceful_shutdown,
            stopped,
            Some(idle),
        )),
    }
}

/// An HTTP/2 connection's idle watch: [`ListenerSettings::idle_timeout`], and the count of
/// requests started on it.
struct Idle {
    timeout: Duration,
    started: Arc<AtomicU64>,
    /// Over TLS, where the connection is HTTP/2 before its preface is read.
    preface: Option<PrefaceDeadline>,
}

impl Idle {
    /// Resolves once a whole `timeout` passed with no request started (so between one and two
    /// timeouts after the last one). Streams still open do not count: GOAWAY lets them
    /// finish, and a client that wants more opens a new connection.
    async fn passed(&self) {
        if self.timeout.is_zero() {
            return std::future::pending().await;
        }
        let mut seen = self.started.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(self.timeout).await;
            let now = self.started.load(Ordering::Relaxed);
            if now == seen {
                return;
            }
            seen = now;
        }
    }
}

/// Drives `connection` to its end; once the node stops, or an HTTP/2 connection (`idle`) has
/// started no request for its idle timeout, asks it to wind down first. An HTTP/2 connection
/// whose preface is late is dropped: until it comes, hyper can neither serve nor wind it down.
async fn until_drained<C: Future<Output = Result<(), hyper::Error>>>(
    connection: C,
    graceful_shutdown: fn(Pin<&mut C>),
    mut stopped: watch::Receiver<bool>,
    idle: Option<Idle>,
) -> C::Output {
    let mut connection = pin!(connection);
    // Boxed, and only for the connections that have them: held inline, their timers would
    // sit in every connection's future (an HTTP/1 event stream's too) for its whole life.
    let mut idle_passed = idle.as_ref().map(|idle| Box::pin(idle.passed()));
    let mut missed_preface = idle
        .as_ref()
        .and_then(|idle| idle.preface.as_ref())
        .map(|preface| Box::pin(preface.missed()));
    let dropped = || {
        tracing::debug!("no HTTP/2 preface within the header read timeout; closing");
        Ok(())
    };
    tokio::select! {
        ended = connection.as_mut() => return ended,
        () = stopping(&mut stopped) => {}
        () = if_any(&mut idle_passed) => tracing::debug!("HTTP/2 connection idle; sending GOAWAY"),
        () = if_any(&mut missed_preface) => return dropped(),
    }
    graceful_shutdown(connection.as_mut());
    tokio::select! {
        ended = connection => ended,
        () = if_any(&mut missed_preface) => dropped(),
    }
}

/// Resolves when `watch` does; never without one.
async fn if_any<F: Future<Output = ()> + Unpin>(watch: &mut Option<F>) {
    match watch {
        Some(watch) => watch.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair: the client's end, and the server's.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn the_version_is_told_from_the_first_bytes_which_stay_in_the_socket() {
        let cases: [(&[u8], Option<Http>); 4] = [
            (b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", Some(Http::One)),
            (H2_PREFACE, Some(Http::Two)),
            // Diverges from the preface only after its first bytes.
            (b"PRI * HTTP/1.1\r\n\r\n", Some(Http::One)),
            (b"", None),
        ];
        for (sent, expected) in cases {
            let (mut client, mut server) = pair().await;
            client.write_all(sent).await.unwrap();
            if sent.is_empty() {
                client.shutdown().await.unwrap();
            }
            assert_eq!(sniff(&server).await.unwrap(), expected, "{sent:?}");
            let mut kept = vec![0u8; sent.len()];
            server.read_exact(&mut kept).await.unwrap();
            assert_eq!(kept, sent, "the bytes looked at are still there to read");
        }
    }

    #[tokio::test]
    async fn a_preface_sent_in_pieces_is_waited_for() {
        let (mut client, server) = pair().await;
        client.write_all(&H2_PREFACE[..5]).await.unwrap();
        let sniffing = tokio::spawn(async move { sniff(&server).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !sniffing.is_finished(),
            "five bytes of the preface decide nothing"
        );
        client.write_all(&H2_PREFACE[5..]).await.unwrap();
        assert_eq!(sniffing.await.unwrap(), Some(Http::Two));
    }
}
