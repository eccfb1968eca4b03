//! `--send-timeout` for each HTTP/2 stream: a stream whose response cannot be sent for that
//! long is reset, as nginx's `send_timeout` does for HTTP/2.
//!
//! [`super::send_timeout::SendTimeout`] watches the socket, which covers HTTP/1 and an HTTP/2
//! client that stops reading altogether. An HTTP/2 client can also keep reading the
//! connection while it stops granting one stream flow-control window: the socket moves, the
//! stream does not, and it would hold its response (an upstream's body, an event stream)
//! forever.
//!
//! hyper serves each HTTP/2 stream on a task it asks the connection's executor to spawn. That
//! task polls the response body for a frame, then waits for window to send it, and polls the
//! body again only once the frame is on its way. So [`StreamExecutor`] runs each stream's task
//! inside [`Watched`], which shares a [`SendProgress`] with the stream's response body (through
//! a task-local that [`report_sends`] reads): the body marks each frame it hands over, and
//! clears the mark when it has no frame to give. A stream task that goes to sleep with a frame
//! still marked is waiting for window; if no further frame is handed over within the send
//! timeout, the task is dropped, and h2 resets the stream (`RST_STREAM`, `CANCEL`), closing
//! whatever the response held. A stream waiting for its body's next frame (an event stream
//! between events) is not stalled and is never cut.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};

use crate::upstream::{BoxError, ProxyBody};

tokio::task_local! {
    /// The send progress of the HTTP/2 stream whose task is running, if it is one.
    static STREAM: Arc<SendProgress>;
}

/// What a stream's response body has handed to hyper, shared with its task's [`Watched`].
/// Both are polled on the same task, one after the other; the atomics only make it `Sync`.
#[derive(Debug, Default)]
struct SendProgress {
    /// Frames handed over so far: a new one means the previous one was sent.
    handed: AtomicU64,
    /// The last poll of the body handed over a frame (hyper has not asked for another yet).
    awaiting_window: AtomicBool,
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
        tokio::spawn(Watched {
            task,
            progress: Arc::default(),
            send_timeout: self.send_timeout,
            deadline: None,
        });
    }
}

pin_project_lite::pin_project! {
    /// A stream's task, dropped once its body has had a frame waiting for window for the send
    /// timeout.
    struct Watched<F> {
        #[pin]
        task: F,
        progress: Arc<SendProgress>,
        send_timeout: Duration,
        // The frame count when the wait began, and when it runs out.
        deadline: Option<(u64, Pin<Box<Sleep>>)>,
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let progress = this.progress.clone();
        if STREAM
            .sync_scope(progress, || this.task.poll(cx))
            .is_ready()
        {
            return Poll::Ready(());
        }
        if !this.progress.awaiting_window.load(Ordering::Relaxed) {
            *this.deadline = None;
            return Poll::Pending;
        }
        let handed = this.progress.handed.load(Ordering::Relaxed);
        let send_timeout = *this.send_timeout;
        let (since, timer) = this
            .deadline
            .get_or_insert_with(|| (handed, Box::pin(tokio::time::sleep(send_timeout))));
        if *since != handed {
            // The frame the last wait was for went out; this wait is for a newer one.
            *since = handed;
            timer.as_mut().reset(Instant::now() + send_timeout);
        }
        if timer.as_mut().poll(cx).is_ready() {
            tracing::debug!(
                timeout = ?send_timeout,
                "an HTTP/2 stream could not send for the send timeout; resetting it"
            );
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// `response` with its body reporting to the watch of the HTTP/2 stream it is sent on; as it
/// was when it is not sent on one (HTTP/1).
pub fn report_sends(response: Response<ProxyBody>) -> Response<ProxyBody> {
    match STREAM.try_with(Arc::clone) {
        Ok(progress) => response.map(|body| Reporting { body, progress }.boxed()),
        Err(_) => response,
    }
}

/// A response body that tells its stream's [`Watched`] when it hands over a frame.
struct Reporting {
    body: ProxyBody,
    progress: Arc<SendProgress>,
}

impl Body for Reporting {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let handed = matches!(&polled, Poll::Ready(Some(Ok(frame))) if frame.is_data());
        if handed {
            this.progress.handed.fetch_add(1, Ordering::Relaxed);
        }
        this.progress
            .awaiting_window
            .store(handed, Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use tokio::sync::mpsc;

    /// A stream task as hyper's: polls the body, then waits until `window` lets each frame
    /// out. Returns how many frames went out.
    async fn stream_task(mut body: ProxyBody, mut window: mpsc::Receiver<()>) -> usize {
        let mut sent = 0;
        while let Some(frame) = body.frame().await {
            if frame.is_ok() {
                if window.recv().await.is_none() {
                    break;
                }
                sent += 1;
            }
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

    const SEND_TIMEOUT: Duration = Duration::from_secs(1);

    /// Spawns a watched stream task over `body`, reporting as the server's would.
    fn spawn_watched(
        body: ProxyBody,
        window: mpsc::Receiver<()>,
    ) -> tokio::sync::oneshot::Receiver<usize> {
        let (done, finished) = tokio::sync::oneshot::channel();
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
        window.send(()).await.unwrap();
        events.send(Bytes::from_static(b"two")).await.unwrap();
        let waiting = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(10), finished).await;
        // Dropped, not finished: the task never reported its count.
        assert!(matches!(ended, Ok(Err(_))), "{ended:?}");
        let after = waiting.elapsed();
        assert!(after >= SEND_TIMEOUT, "cut after {after:?}");
    }

    #[tokio::test]
    async fn a_stream_waiting_for_its_next_event_or_sending_slowly_is_kept() {
        let (events, body) = events();
        let (window, opened) = mpsc::channel(8);
        let mut finished = spawn_watched(body, opened);
        // Idle for longer than the send timeout: waiting for an event is not a stall.
        tokio::time::sleep(SEND_TIMEOUT * 3 / 2).await;
        // Then frames that each wait 0.3 s for window: each goes out within the timeout, so
        // the stream is kept although the waits add up past it.
        for _ in 0..4 {
            events.send(Bytes::from_static(b"tick")).await.unwrap();
            tokio::time::sleep(SEND_TIMEOUT * 3 / 10).await;
            window.send(()).await.unwrap();
        }
        drop(events);
        let sent = tokio::time::timeout(Duration::from_secs(10), &mut finished).await;
        assert!(matches!(sent, Ok(Ok(4))), "{sent:?}");
    }

    #[tokio::test]
    async fn outside_an_http2_stream_the_body_is_left_as_it_is() {
        let response = report_sends(Response::new(crate::upstream::empty_body()));
        assert!(response.body().is_end_stream());
        assert!(STREAM.try_with(|_| ()).is_err());
    }
}
