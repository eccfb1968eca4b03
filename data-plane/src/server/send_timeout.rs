//! [`SendTimeout`]: a client connection whose writes make no progress for `--send-timeout` is
//! closed, as nginx's `send_timeout` does.
//!
//! hyper has no write timeout: a client that stops reading (its receive window full) leaves the
//! connection's writes pending for as long as it stays connected, holding a connection slot,
//! the response's upstream connection and its buffers. The guard wraps the client's socket,
//! under TLS and hyper, so it sees every write of every response, event stream and upgraded
//! tunnel. The clock runs only while a write or flush is pending and starts over whenever one
//! completes, so a slow client that keeps taking bytes is never cut off.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A byte stream whose writes fail with [`io::ErrorKind::TimedOut`] after `timeout` without
/// progress.
#[derive(Debug)]
pub struct SendTimeout<S> {
    inner: S,
    timeout: Duration,
    /// The deadline of the current stall, made at the first stall and reused after.
    stall: Option<Pin<Box<Sleep>>>,
    /// Whether a write is pending now (`stall` then holds its deadline).
    stalled: bool,
}

impl<S> SendTimeout<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        SendTimeout {
            inner,
            timeout,
            stall: None,
            stalled: false,
        }
    }

    /// Passes a write's outcome on, minding the clock: a pending write starts it (or keeps it
    /// running), anything else stops it.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = false;
            return polled;
        }
        let stall = match &mut self.stall {
            Some(stall) if self.stalled => stall,
            Some(stall) => {
                stall.as_mut().reset(Instant::now() + self.timeout);
                stall
            }
            None => self
                .stall
                .insert(Box::pin(tokio::time::sleep(self.timeout))),
        };
        self.stalled = true;
        ready!(stall.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took no bytes for {:?}", self.timeout),
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_reader_that_takes_nothing_is_cut_off_and_a_slow_one_is_not() {
        const TIMEOUT: Duration = Duration::from_millis(900);
        // A pipe with room for 64 bytes: writes past that wait for the reader.
        let (client, server) = tokio::io::duplex(64);
        let mut guarded = SendTimeout::new(server, TIMEOUT);
        let (mut reader, _writer) = tokio::io::split(client);

        // A slow reader: 16 bytes every 300 ms, well within the timeout each time, while the
        // writer waits 1.2 s in all (longer than the timeout) to write the last 64 bytes.
        let slow = tokio::spawn(async move {
            let mut chunk = [0u8; 16];
            let mut taken = 0;
            while taken < 128 {
                if taken >= 64 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                taken += reader.read(&mut chunk).await.unwrap();
            }
            reader
        });
        guarded.write_all(&[7; 128]).await.unwrap();
        let _reader = slow.await.unwrap();

        // Now nobody reads: the pipe fills, and the write fails once the timeout has passed.
        let started = Instant::now();
        let error = guarded.write_all(&[7; 128]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        let waited = started.elapsed();
        assert!(waited >= TIMEOUT && waited < TIMEOUT * 3, "{waited:?}");
    }
}
