//! The one thread that configuration work runs on: reading, checking, compiling and hashing
//! snapshots and deltas, off the runtime's threads.
//!
//! Why one thread rather than the blocking pool: the allocator (mimalloc) keeps a heap per
//! thread, and what a thread frees is reused by that thread's next allocations. Reading a
//! large snapshot makes transient copies (its resources decoded to be checked, sort
//! buffers) that are freed at the end; when every apply runs on this one thread, the next
//! apply reuses that memory, where pool threads would each keep their own high-water mark.
//! Work runs in order, one item at a time, which configuration work needs anyway.

use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce() + Send>;

/// Work items waiting; a full queue makes the caller wait.
const QUEUED: usize = 4;

fn jobs() -> &'static mpsc::Sender<Job> {
    static JOBS: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    JOBS.get_or_init(|| {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUED);
        std::thread::Builder::new()
            .name("sluice-config".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    job();
                }
            })
            .expect("the configuration thread starts");
        tx
    })
}

/// Runs `work` on the configuration thread and waits for it. A panic in `work` comes back as
/// an error naming it; the thread carries on with the next item.
pub async fn run<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (done, result) = oneshot::channel();
    // Compiling a config starts tasks (an upstream's health checker): they go to the caller's
    // runtime, entered for the job's length.
    let runtime = tokio::runtime::Handle::try_current().ok();
    let job: Job = Box::new(move || {
        let _entered = runtime.as_ref().map(tokio::runtime::Handle::enter);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(work)).map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned())
        });
        // The caller may have stopped waiting; the work is done either way.
        let _ = done.send(outcome);
    });
    jobs()
        .send(job)
        .await
        .map_err(|_| "the configuration thread is gone".to_owned())?;
    result
        .await
        .map_err(|_| "the configuration thread is gone".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_one_thread_and_a_panic_is_an_error() {
        let first = run(|| std::thread::current().id()).await.unwrap();
        let second = run(|| std::thread::current().id()).await.unwrap();
        assert_eq!(first, second);
        assert_ne!(first, std::thread::current().id());
        let error = run(|| -> u8 { panic!("bad config") }).await.unwrap_err();
        assert_eq!(error, "bad config");
        assert_eq!(run(|| 7).await, Ok(7));
    }
}
