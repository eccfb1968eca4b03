//! Shadow traffic: a copy of a request sent to a mirror upstream in the background, its
//! response read and discarded. The client never waits for the mirror: the request body is
//! teed through a small bounded channel, and a mirror that falls behind is abandoned (its
//! request aborted) rather than allowed to slow the client or hold its body in memory.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::pipeline::aim;
use crate::telemetry::Metrics;
use crate::upstream::{BoxError, ProxyBody, Upstream};

/// Frames of the request body a mirror may lag behind the upstream it copies.
const MIRROR_BACKLOG_FRAMES: usize = 16;
/// How long a mirror's response body is read (each frame dropped as it comes) before the
/// connection is let go.
const MIRROR_RESPONSE_READ_LIMIT: Duration = Duration::from_secs(10);

/// Sends a copy of a request (its head as forwarded, and `body` as the client streams it)
/// to `upstream`. Returns the body to send to the real upstream in place of `body`.
pub fn spawn(
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    method: Method,
    headers: HeaderMap,
    path_and_query: PathAndQuery,
    body: ProxyBody,
) -> ProxyBody {
    let abandoned = Arc::new(AtomicBool::new(false));
    let (tx, rx) = if body.is_end_stream() {
        (None, None)
    } else {
        let (tx, rx) = mpsc::channel(MIRROR_BACKLOG_FRAMES);
        (Some(tx), Some(rx))
    };
    let copy = MirrorBody {
        rx,
        abandoned: abandoned.clone(),
        size_hint: body.size_hint(),
    };
    let gave_up = abandoned.clone();
    tokio::spawn(async move {
        let abandoned = gave_up;
        let result = send(&upstream, method, headers, &path_and_query, copy).await;
        let result = match result {
            Err(_) if abandoned.load(Ordering::Relaxed) => "abandoned",
            Err(result) | Ok(result) => result,
        };
        metrics.mirrored(&upstream.name, result);
    });
    Tee {
        inner: body,
        tx,
        abandoned,
    }
    .boxed()
}

async fn send(
    upstream: &Arc<Upstream>,
    method: Method,
    headers: HeaderMap,
    path_and_query: &PathAndQuery,
    body: MirrorBody,
) -> Result<&'static str, &'static str> {
    let lease = upstream.lease(&headers).map_err(|_| "skipped")?;
    let mut request = Request::new(body.boxed());
    *request.method_mut() = method;
    *request.headers_mut() = headers;
    aim(&mut request, lease.target(), path_and_query, upstream.http2).map_err(|_| "failed")?;
    let response = upstream
        .send(request, upstream.total_timeout)
        .await
        .map_err(|_| "failed")?;
    // Read to the end so the connection can be reused, dropping each frame: nothing of the
    // answer is kept, however large.
    let mut body = response.into_body();
    let _ = tokio::time::timeout(MIRROR_RESPONSE_READ_LIMIT, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
    drop(lease);
    Ok("answered")
}

/// The client's body on its way to the real upstream, copying each frame to the mirror.
struct Tee {
    inner: ProxyBody,
    /// `None` once the mirror has everything, or was abandoned.
    tx: Option<mpsc::Sender<Frame<Bytes>>>,
    abandoned: Arc<AtomicBool>,
}

impl Tee {
    fn abandon(&mut self) {
        self.abandoned.store(true, Ordering::Relaxed);
        self.tx = None;
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // Dropped before the end (the real upstream stopped reading, or failed): the mirror
        // must not take what it got for the whole body.
        if self.tx.is_some() {
            self.abandon();
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(tx) = &this.tx {
                    let copy = if let Some(data) = frame.data_ref() {
                        Frame::data(data.clone())
                    } else if let Some(trailers) = frame.trailers_ref() {
                        Frame::trailers(trailers.clone())
                    } else {
                        return polled;
                    };
                    if tx.try_send(copy).is_err() {
                        // Full (the mirror is slow) or closed (it gave up): either way the
                        // client does not wait for it.
                        this.abandon();
                    } else if this.inner.is_end_stream() {
                        // The last frame: hyper may not poll again for the end.
                        this.tx = None;
                    }
                }
            }
            // The end: dropping the sender ends the mirror's body too.
            Poll::Ready(None) => this.tx = None,
            Poll::Ready(Some(Err(_))) => this.abandon(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The mirror's copy of the body. Ends when the client's body ends; fails when the copy was
/// abandoned, so the mirror request is aborted rather than sent short.
struct MirrorBody {
    rx: Option<mpsc::Receiver<Frame<Bytes>>>,
    abandoned: Arc<AtomicBool>,
    size_hint: SizeHint,
}

#[derive(Debug, thiserror::Error)]
#[error("the mirror fell behind the request body and was abandoned")]
struct Abandoned;

impl Body for MirrorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(rx) = &mut this.rx else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) if this.abandoned.load(Ordering::Relaxed) => {
                Poll::Ready(Some(Err(Box::new(Abandoned))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rx.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint
    }
}
