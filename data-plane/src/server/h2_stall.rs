//! `--send-timeout` for each HTTP/2 stream: a stream whose response has moved no bytes for
//! that long while it had bytes to send is reset, as nginx's `send_timeout` does for HTTP/2.
//!
//! [`super::send_timeout::SendTimeout`] watches the socket, which covers HTTP/1 and an HTTP/2
//! client that stops reading altogether. An HTTP/2 client can also keep reading the
//! connection while it stops granting one stream flow-control window: the socket moves, the
//! stream does not, and it would hold its response (an upstream's body, an event stream)
//! forever.
//!
//! hyper serves each HTTP/2 stream on a task it asks the connection's executor to spawn. That
//! task polls the response body for a frame, hands it to h2 (which sends it as window allows),
//! and polls the body again only once h2 has room for more. So [`StreamExecutor`] runs each
//! stream's task inside [`Watched`], which shares a [`SendProgress`] with the stream's
//! [`ResponseBody`] (through a task-local that [`report_sends`] reads). The body marks each
//! frame it hands over, and clears the mark when it has no frame to give; the frame's bytes
//! note when h2 takes them to send. A stream task that sleeps with a frame still marked is
//! waiting to send; once nothing has moved for the send timeout, the task is dropped and h2
//! resets the stream (`RST_STREAM`, `CANCEL`), closing whatever the response held. A slow
//! client that still takes bytes is kept, and a stream waiting for its body's next frame (an
//! event stream between events) is not waiting to send and is never cut.
//!
//! Not covered: the last frame of a response (hyper's task ends once h2 holds it, so h2 keeps
//! that one frame until the client gives window or the connection ends); and while the client
//! is still uploading the request body, h2 sends the reset only when the upload ends (the
//! response is dropped at once).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::Response;
use http_body::{Body, Frame, SizeHint};
use tokio::task::futures::TaskLocalFuture;
use tokio::time::{Instant, Sleep};

use crate::upstream::{BoxError, ProxyBody};

tokio::task_local! {
    /// The send progress of the HTTP/2 stream whose task is running, if it is one.
    static STREAM: Arc<SendProgress>;
}

/// What a stream's response has handed to hyper and h2 has sent, shared by the stream's task
/// (its [`Watched`] and [`ResponseBody`]) and the connection's task (which sends the bytes).
#[derive(Debug, Default)]
struct SendProgress {
    /// The last poll of the body handed over a frame, and hyper has not asked for another.
    awaiting_send: AtomicBool,
    /// When bytes last moved: a frame handed over, or bytes taken to be sent; in nanoseconds
    /// since [`clock_base`].
    moved_at: AtomicU64,
}

impl SendProgress {
    fn moved(&self) {
        let since_base = clock_base().elapsed().as_nanos();
        self.moved_at.store(
            u64::try_from(since_base).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// When the stream is stalled if nothing moves before.
    fn deadline(&self, send_timeout: Duration) -> Instant {
        let moved_at = Duration::from_nanos(self.moved_at.load(Ordering::Relaxed));
        Instant::from_std(*clock_base() + moved_at) + send_timeout
    }
}

/// The instant [`SendProgress::moved_at`] counts from.
fn clock_base() -> &'static std::time::Instant {
    static BASE: OnceLock<std::time::Instant> = OnceLock::new();
    BASE.get_or_init(std::time::Instant::now)
}

/// The executor of HTTP/2 connections: each stream's task is spawned on tokio, watched for
/// send stalls of `send_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct StreamExecutor {
    pub send_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, task: F) {
        let progress = Arc::<SendProgress>::default();
        tokio::spawn(Watched {
            task: STREAM.scope(progress.clone(), task),
            progress,
            send_timeout: self.send_timeout,
            timer: None,
        });
    }
}

pin_project_lite::pin_project! {
    /// A stream's task, dropped once it has waited to send for the send timeout with nothing
    /// moving.
    struct Watched<F> {
        #[pin]
        task: TaskLocalFuture<Arc<SendProgress>, F>,
        progress: Arc<SendProgress>,
        send_timeout: Duration,
        // Kept across waits, reset for each.
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.task.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if !this.progress.awaiting_send.load(Ordering::Relaxed) {
            // Waiting for the body: a timer left from a wait may wake the task once, no more.
            return Poll::Pending;
        }
        loop {
            // Bytes taken by the connection's task since the timer was set moved it on.
            let deadline = this.progress.deadline(*this.send_timeout);
            if Instant::now() >= deadline {
                tracing::debug!(
                    timeout = ?this.send_timeout,
                    "an HTTP/2 stream could not send for the send timeout; resetting it"
                );
                return Poll::Ready(());
            }
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// A response as the client's connection sends it: on an HTTP/2 stream its body reports to
/// the stream's watch; elsewhere (HTTP/1) it is the body as it was.
pub fn report_sends(response: Response<ProxyBody>) -> Response<ResponseBody> {
    let progress = STREAM.try_with(Arc::clone).ok();
    response.map(|body| ResponseBody { body, progress })
}

/// A response body that tells its HTTP/2 stream's [`Watched`] when it hands over a frame, and
/// gives it bytes that tell when they are sent.
#[derive(Debug)]
pub struct ResponseBody {
    body: ProxyBody,
    progress: Option<Arc<SendProgress>>,
}

impl Body for ResponseBody {
    type Data = ResponseData;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<ResponseData>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let Some(progress) = &this.progress else {
            return polled.map_ok(|frame| frame.map_data(ResponseData::from));
        };
        let handed = matches!(&polled, Poll::Ready(Some(Ok(frame))) if frame.is_data());
        if handed {
            progress.moved();
        }
        progress.awaiting_send.store(handed, Ordering::Relaxed);
        polled.map_ok(|frame| {
            frame.map_data(|bytes| ResponseData {
                bytes,
                progress: Some(progress.clone()),
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A chunk of a response body; on an HTTP/2 stream, taking its bytes to send counts as the
/// stream moving.
#[derive(Debug)]
pub struct ResponseData {
    bytes: Bytes,
    progress: Option<Arc<SendProgress>>,
}

impl From<Bytes> for ResponseData {
    fn from(bytes: Bytes) -> Self {
        ResponseData {
            bytes,
            progress: None,
        }
    }
}

impl Buf for ResponseData {
    fn remaining(&self) -> usize {
        self.bytes.remaining()
    }

    fn chunk(&self) -> &[u8] {
        self.bytes.chunk()
    }

    fn advance(&mut self, count: usize) {
        self.bytes.advance(count);
        if let Some(progress) = &self.progress {
            progress.moved();
        }
    }

    // `Bytes` hands out its bytes without copying; so does this.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        let taken = self.bytes.copy_to_bytes(len);
        if let Some(progress) = &self.progress {
            progress.moved();
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::{mpsc, oneshot};

    const SEND_TIMEOUT: Duration = Duration::from_secs(1);

    /// A stream task as hyper's and h2's: polls the body for a frame, then sends its bytes as
    /// `window` lets them out (each message: how many the client takes). Returns how many
    /// frames went out whole.
    async fn stream_task(mut body: ResponseBody, mut window: mpsc::Receiver<usize>) -> usize {
        let mut sent = 0;
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            while data.has_remaining() {
                let Some(taken) = window.recv().await else {
                    return sent;
                };
                data.advance(taken.min(data.remaining()));
            }
            sent += 1;
        }
        sent
    }

    fn events() -> (mpsc::Sender<Bytes>, ProxyBody) {
        let (events, feed) = mpsc::channel::<Bytes>(8);
        let stream = futures_util::stream::unfold(feed, |mut feed| async move {
            let event = feed.recv().await?;
            Some((Ok::<_, BoxError>(Frame::data(event)), feed))
        });
        (events, StreamBody::new(stream).boxed())
    }

    /// Spawns a watched stream task over `body`, reporting as the server's would.
    fn spawn_watched(body: ProxyBody, window: mpsc::Receiver<usize>) -> oneshot::Receiver<usize> {
        let (done, finished) = oneshot::channel();
        let executor = StreamExecutor {
            send_timeout: SEND_TIMEOUT,
        };
        hyper::rt::Executor::execute(&executor, async move {
            let body = report_sends(Response::new(body)).into_body();
            let _ = done.send(stream_task(body, window).await);
        });
        finished
    }

    #[tokio::test]
    async fn a_frame_that_waits_for_window_past_the_send_timeout_ends_the_stream() {
        let (events, body) = events();
        let (window, opened) = mpsc::channel(8);
        let finished = spawn_watched(body, opened);
        // One frame goes out; the next waits for window that never comes.
        events.send(Bytes::from_static(b"one")).await.unwrap();
        window.send(3).await.unwrap();
        events.send(Bytes::from_static(b"two")).await.unwrap();
        let waiting = std::time::Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(10), finished).await;
        // Dropped, not finished: the task never reported its count.
        assert!(matches!(ended, Ok(Err(_))), "{ended:?}");
        let after = waiting.elapsed();
        assert!(after >= SEND_TIMEOUT, "cut after {after:?}");
    }

    #[tokio::test]
    async fn a_stream_waiting_for_its_next_event_or_sending_slowly_is_kept() {
        let (events, body) = events();
        let (window, opened) = mpsc::channel(64);
        let mut finished = spawn_watched(body, opened);
        // Idle for longer than the send timeout: waiting for an event is not a stall.
        tokio::time::sleep(SEND_TIMEOUT * 3 / 2).await;
        // Then four frames at once, whose bytes the client takes one every 0.3 s: 4.8 s of
        // waiting to send in all, never 1 s without a byte moving.
        for _ in 0..4 {
            events.send(Bytes::from_static(b"tick")).await.unwrap();
        }
        drop(events);
        for _ in 0..16 {
            tokio::time::sleep(SEND_TIMEOUT * 3 / 10).await;
            window.send(1).await.unwrap();
        }
        let sent = tokio::time::timeout(Duration::from_secs(10), &mut finished).await;
        assert!(matches!(sent, Ok(Ok(4))), "{sent:?}");
    }

    #[tokio::test]
    async fn outside_an_http2_stream_the_body_only_changes_type() {
        let (events, body) = events();
        let mut body = report_sends(Response::new(body)).into_body();
        assert!(body.progress.is_none());
        events.send(Bytes::from_static(b"event")).await.unwrap();
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data.chunk(), b"event");
        assert!(data.progress.is_none());
    }
}
