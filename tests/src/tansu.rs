//! A Kafka-protocol broker (tansu) of a test's own, with durable storage, that the test may
//! kill and restart: what the shared broker of `make services` cannot be, since other tests
//! use it and it keeps its records in memory.
//!
//! Storage is tansu's libsql (SQLite) engine on a file in a temporary folder. With tansu
//! 0.6.0 it is the only durable engine that works here without help:
//! - `sqlite://` creates its tables itself when it opens the file (tansu-storage's
//!   `lite.rs` runs its `ddl/*.sql` at start), and it commits a produce before it answers, so
//!   a record the broker acknowledged survives a SIGKILL of the broker (what
//!   `tests/events_durability.rs` checks). Its known gap: it cannot take the new epoch an
//!   idempotent producer gives itself after events timed out (see that test's config);
//! - `postgres://` expects its schema to exist already: tansu ships it in its repository's
//!   `etc/initdb.d`, not in the crates, so on a fresh database the broker panics at its first
//!   request with `relation "cluster" does not exist`. It also verifies the server's TLS
//!   certificate unless the URL says `sslmode=disable`, and the test Postgres presents one
//!   for `localhost` only;
//! - `s3://` needs an object store, which the test services do not include.
//!
//! The engine resolves `sqlite://NAME` against its working directory, so the broker runs in
//! its storage folder; that also keeps it from loading a stray `.env` (tansu reads `./.env`
//! at start).
//!
//! The binary is the one `make services` installs: `SLUICE_TANSU_BIN`, else
//! `$SLUICE_CACHE_DIR/tansu/bin/tansu`, else `~/.cache/sluice/tansu/bin/tansu`.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{KAFKA_TIMEOUT, client_config};
use crate::ports::free_addr;
use crate::unique_name;

/// How long a (re)started broker may take to answer metadata. It is ready in milliseconds
/// when the machine is idle; a loaded CI machine gets far more.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The storage URL: a SQLite file in the broker's working directory...
const STORAGE_ENGINE: &str = "sqlite://tansu.db";

/// ...this one.
const STORAGE_FILE: &str = "tansu.db";

/// A tansu broker on a port of its own, its records in a SQLite file that outlives the
/// process. Killed when dropped; the storage is deleted with it.
#[derive(Debug)]
pub struct TestBroker {
    pub addr: SocketAddr,
    binary: PathBuf,
    /// The broker's working directory: its storage and its log.
    dir: tempfile::TempDir,
    log: PathBuf,
    child: Option<Child>,
}

impl TestBroker {
    /// Starts a broker with empty storage and waits until it answers metadata.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("tansu.log");
        let mut broker = Self {
            addr: free_addr(),
            binary: tansu_binary()?,
            dir,
            log,
            child: None,
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// `host:port` for a Kafka client's `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Kills the broker with SIGKILL: no graceful shutdown, no chance to flush anything it
    /// had not already committed. Returns once the process is gone.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("the broker is not running")?;
        // std's Child::kill is SIGKILL on Unix.
        child.kill().context("cannot kill the broker")?;
        child.wait().context("cannot reap the broker")?;
        Ok(())
    }

    /// Starts the broker again on the same port and storage, and waits until it answers
    /// metadata.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "the broker is still running");
        self.spawn()
    }

    /// Creates a topic with a unique name and returns the name.
    pub async fn create_topic(&self, partitions: i32) -> anyhow::Result<String> {
        let name = unique_name("sluice-durable").replace('_', "-");
        let admin: AdminClient<DefaultClientContext> = client_config(&self.bootstrap())
            .create()
            .context("cannot create a Kafka admin client")?;
        let topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new()
            .operation_timeout(Some(KAFKA_TIMEOUT))
            .request_timeout(Some(KAFKA_TIMEOUT));
        let results = tokio::time::timeout(KAFKA_TIMEOUT, admin.create_topics([&topic], &options))
            .await
            .with_context(|| format!("creating topic {name} timed out; log:\n{}", self.log_text()))?
            .with_context(|| format!("cannot create topic {name}; log:\n{}", self.log_text()))?;
        for result in results {
            if let Err((topic, code)) = result {
                bail!("cannot create topic {topic}: {code}");
            }
        }
        Ok(name)
    }

    /// Adds partitions to `topic` until it has `partitions`, while the broker runs. tansu
    /// 0.6.0 does not implement CreatePartitions, so this writes what its CreateTopics writes
    /// for each partition (tansu-storage's `topition_insert.sql` and `watermark_insert.sql`:
    /// a partition row and its empty watermarks) and the topic's partition count, in one
    /// transaction on the broker's storage (SQLite in WAL mode takes another process's
    /// writes). The broker reads both afresh for every metadata, produce and fetch request.
    pub async fn add_partitions(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        use sqlx::{Connection, SqliteConnection};
        let url = format!("sqlite://{}", self.dir.path().join(STORAGE_FILE).display());
        let mut db = SqliteConnection::connect(&url)
            .await
            .with_context(|| format!("cannot open the broker's storage {url}"))?;
        let mut tx = db.begin().await?;
        let (id, had): (i64, i32) =
            sqlx::query_as("select id, partitions from topic where name = ?")
                .bind(topic)
                .fetch_one(&mut *tx)
                .await
                .with_context(|| format!("the broker's storage has no topic {topic}"))?;
        for partition in had..partitions {
            let topition: i64 = sqlx::query_scalar(
                "insert into topition (topic, partition) values (?, ?) returning id",
            )
            .bind(id)
            .bind(partition)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query("insert into watermark (topition) values (?)")
                .bind(topition)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("update topic set partitions = ? where id = ?")
            .bind(partitions.max(had))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A consumer of every partition of `topic` from the beginning, with no consumer group
    /// coordination. Blocking: a test reads with it from `spawn_blocking`.
    pub fn consumer_from_beginning(
        &self,
        topic: &str,
        partitions: i32,
    ) -> anyhow::Result<BaseConsumer> {
        let consumer: BaseConsumer = client_config(&self.bootstrap())
            .set("group.id", unique_name("sluice-durable-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .context("cannot create a Kafka consumer")?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        Ok(consumer)
    }

    /// Everything the broker has written so far, over all its runs.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://{}", self.addr);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        // The log spans every run: a marker says where each begins.
        writeln!(log, "===== starting tansu on {url} =====")?;
        let child = Command::new(&self.binary)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", STORAGE_ENGINE])
            .current_dir(self.dir.path())
            // A panic in the broker (its storage service runs on a task of its own, so the
            // process lives on) is then located in the log.
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until the broker accepts connections and answers a metadata request, failing
    /// with its log when it exits first or takes too long.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no answer yet");
        let client: BaseConsumer = client_config(&self.bootstrap())
            .create()
            .context("cannot create a Kafka client")?;
        while Instant::now() < deadline {
            let child = self.child.as_mut().context("the broker is not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!(
                    "tansu exited with {status} before it was ready; log:\n{}",
                    self.log_text()
                );
            }
            // The cheap check first: the metadata request would wait out its whole timeout on
            // a port nobody listens on yet.
            match TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)) {
                Err(e) => last = format!("connect: {e}"),
                Ok(_) => match client.fetch_metadata(None, Duration::from_secs(2)) {
                    Ok(metadata) if !metadata.brokers().is_empty() => return Ok(()),
                    Ok(_) => last = "metadata names no broker".into(),
                    Err(e) => last = format!("metadata: {e}"),
                },
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "tansu was not ready at {} within {READY_TIMEOUT:?} (last: {last}); log:\n{}",
            self.addr,
            self.log_text()
        )
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The tansu binary `make services` installs. Missing, it is a failure that says how to
/// install it, never a skipped test.
fn tansu_binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("SLUICE_TANSU_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let cache = match std::env::var_os("SLUICE_CACHE_DIR") {
                Some(dir) => PathBuf::from(dir),
                None => PathBuf::from(
                    std::env::var_os("HOME").context("HOME is not set; set SLUICE_TANSU_BIN")?,
                )
                .join(".cache/sluice"),
            };
            cache.join("tansu/bin/tansu")
        }
    };
    if !path.is_file() {
        bail!(
            "the tansu broker is not installed at {}: run `make services`, which builds it \
             (or set SLUICE_TANSU_BIN to a tansu 0.6 binary built with the libsql feature)",
            path.display()
        );
    }
    Ok(path)
}
