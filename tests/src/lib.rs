//! End-to-end test harness: real Postgres, Redis and Kafka, real Sluice binaries.
//!
//! Every test gets its own resources so the suite runs in parallel:
//! - [`postgres::TestDatabase`]: a fresh database, dropped when the test ends;
//! - [`redis::TestRedis`]: a unique key prefix, its keys deleted when the test ends;
//! - [`kafka::TestTopic`]: a unique topic, deleted when the test ends;
//! - [`tansu::TestBroker`]: a Kafka-protocol broker of the test's own, on durable storage,
//!   that the test may kill and restart;
//! - [`ports::free_port`]: a loopback port no other test process holds and no outgoing
//!   connection will take;
//! - [`process::Process`]: a Sluice binary started with arguments, awaited until ready, killed
//!   when the test ends; [`data_plane::DataPlane`] is `sluice-dp` on a config file of its own;
//! - [`backend::EchoBackend`]: a real HTTP backend that echoes what the gateway forwarded,
//!   over TLS too, with a certificate from [`pki::TestCa`].
//!
//! The services are expected on loopback, as `make services` starts them; the URLs can be
//! overridden with `SLUICE_TEST_DATABASE_URL`, `SLUICE_TEST_REDIS_URL` and
//! `SLUICE_TEST_KAFKA_BOOTSTRAP`. A missing service is a failure that says how to start it,
//! never a skipped test.

pub mod backend;
pub mod data_plane;
pub mod http;
pub mod kafka;
pub mod pki;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod tansu;

use std::sync::atomic::{AtomicU64, Ordering};

/// What to run when a service cannot be reached.
pub const START_SERVICES_HINT: &str = "start the test services with `make services` (or set \
     SLUICE_TEST_DATABASE_URL / SLUICE_TEST_REDIS_URL / SLUICE_TEST_KAFKA_BOOTSTRAP)";

/// Postgres URL of a database the harness may create databases from.
pub fn database_url() -> String {
    std::env::var("SLUICE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Redis URL.
pub fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Kafka bootstrap servers.
pub fn kafka_bootstrap() -> String {
    std::env::var("SLUICE_TEST_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A name no other test (in this or a parallel process) uses: `prefix_<pid>_<n>_<random>`,
/// lowercase letters, digits and `_`, valid as a database, topic or key prefix.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}_{n}_{}", std::process::id(), &random[..8])
}

/// Runs a test resource's async clean-up from its `Drop`. Drop cannot be async and the test's
/// runtime may already be shutting down, so the clean-up gets a thread and a runtime of its
/// own. A failure is reported on stderr: it must not mask the test's own result.
pub(crate) fn clean_up<F>(what: String, make: impl FnOnce() -> F + Send + 'static)
where
    F: Future<Output = anyhow::Result<()>>,
{
    let done = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(make())
    })
    .join();
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("warning: could not clean up {what}: {e:#}"),
        Err(_) => eprintln!("warning: clean-up of {what} panicked"),
    }
}

pub mod control_plane;
