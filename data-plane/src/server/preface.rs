//! An HTTP/2 client over TLS must send its connection preface within the header read
//! timeout. ALPN alone makes a TLS connection HTTP/2, and hyper then waits for the preface
//! with no deadline of its own (a graceful shutdown only takes effect after it), so a client
//! that negotiates `h2` and falls silent would hold a connection slot until it left. (On the
//! plain port the preface is read before the connection is HTTP/2 at all: `super::sniff`.)

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::H2_PREFACE;

/// A connection's bytes on the way to hyper, noting when the first [`H2_PREFACE`]'s length of
/// them has been read.
#[derive(Debug)]
pub struct PrefaceWatch<S> {
    inner: S,
    read: usize,
    arrived: Arc<AtomicBool>,
}

/// Whether a connection's preface has arrived, and how long it may take.
#[derive(Debug, Clone)]
pub struct PrefaceDeadline {
    arrived: Arc<AtomicBool>,
    within: Duration,
}

impl<S> PrefaceWatch<S> {
    pub fn new(inner: S, within: Duration) -> (Self, PrefaceDeadline) {
        let arrived = Arc::new(AtomicBool::new(false));
        let watch = PrefaceWatch {
            inner,
            read: 0,
            arrived: arrived.clone(),
        };
        (watch, PrefaceDeadline { arrived, within })
    }
}

impl PrefaceDeadline {
    /// Resolves if the preface has not arrived within its time; never otherwise.
    pub async fn missed(&self) {
        tokio::time::sleep(self.within).await;
        if self.arrived.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefaceWatch<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.read < H2_PREFACE.len() && matches!(polled, Poll::Ready(Ok(()))) {
            this.read += buf.filled().len() - before;
            if this.read >= H2_PREFACE.len() {
                this.arrived.store(true, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefaceWatch<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
