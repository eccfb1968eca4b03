//! Proves the harness end to end: each service written and read through, isolation between
//! tests, and real binaries started and awaited.

use std::path::Path;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use redis::AsyncCommands;
use sluice_tests::kafka::{KAFKA_TIMEOUT, TestTopic};
use sluice_tests::ports::free_addr;
use sluice_tests::postgres::TestDatabase;
use sluice_tests::process::Process;
use sluice_tests::redis::TestRedis;
use sqlx::Row;

fn example_config() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/sluice.yaml")
        .display()
        .to_string()
}

#[tokio::test]
async fn each_test_gets_its_own_postgres_database() -> anyhow::Result<()> {
    let (a, b) = (TestDatabase::create().await?, TestDatabase::create().await?);
    assert_ne!(a.name, b.name);
    let mut conn_a = a.connect().await?;
    sqlx::query("CREATE TABLE t (v text)")
        .execute(&mut conn_a)
        .await?;
    sqlx::query("INSERT INTO t VALUES ('written')")
        .execute(&mut conn_a)
        .await?;
    let row = sqlx::query("SELECT v FROM t")
        .fetch_one(&mut conn_a)
        .await?;
    assert_eq!(row.get::<String, _>("v"), "written");
    let mut conn_b = b.connect().await?;
    let seen = sqlx::query("SELECT to_regclass('t') IS NOT NULL AS present")
        .fetch_one(&mut conn_b)
        .await?;
    assert!(!seen.get::<bool, _>("present"), "b must not see a's table");

    // Dropping the harness value drops the database, even with a connection still open.
    let name = a.name.clone();
    drop(a);
    let exists = sqlx::query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_one(&mut conn_b)
        .await?;
    assert_eq!(
        exists.get::<i64, _>("n"),
        0,
        "database {name} should be gone"
    );
    Ok(())
}

#[tokio::test]
async fn each_test_gets_its_own_redis_prefix() -> anyhow::Result<()> {
    let (a, b) = (TestRedis::create().await?, TestRedis::create().await?);
    let mut conn = a.connection().await?;
    conn.set::<_, _, ()>(a.key("counter"), 41).await?;
    let n: i64 = conn.incr(a.key("counter"), 1).await?;
    assert_eq!(n, 42);
    assert_eq!(a.keys().await?, [a.key("counter")]);
    assert!(b.keys().await?.is_empty(), "b must not see a's keys");

    let key = a.key("counter");
    drop(a);
    let left: Option<i64> = conn.get(&key).await?;
    assert_eq!(left, None, "{key} should have been deleted with its prefix");
    Ok(())
}

#[tokio::test]
async fn kafka_records_are_produced_and_consumed() -> anyhow::Result<()> {
    let topic = TestTopic::create(2).await?;
    let producer = topic.producer()?;
    let mut sent = Vec::new();
    for i in 0..10 {
        let key = format!("key-{i}");
        let payload = format!("{{\"n\":{i}}}");
        let headers = OwnedHeaders::new().insert(Header {
            key: "request-id",
            value: Some(&format!("req-{i}")),
        });
        let record = FutureRecord::to(&topic.name)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        let rdkafka::producer::future_producer::Delivery {
            partition, offset, ..
        } = producer
            .send(record, KAFKA_TIMEOUT)
            .await
            .map_err(|(e, _)| anyhow::anyhow!("delivery of record {i} failed: {e}"))?;
        assert!(partition == 0 || partition == 1, "partition {partition}");
        assert!(offset >= 0);
        sent.push((key, payload, format!("req-{i}")));
    }

    let consumer = topic.consumer_from_beginning()?;
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let message = tokio::time::timeout(KAFKA_TIMEOUT, consumer.recv())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "only {} of {} records came back",
                    received.len(),
                    sent.len()
                )
            })??;
        let header = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "request-id"));
        received.push((
            String::from_utf8(message.key().unwrap_or_default().to_vec())?,
            String::from_utf8(message.payload().unwrap_or_default().to_vec())?,
            header
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default(),
        ));
    }
    received.sort();
    sent.sort();
    assert_eq!(received, sent);
    Ok(())
}

#[test]
fn the_data_plane_starts_and_reports_its_config() -> anyhow::Result<()> {
    let admin = free_addr();
    let config = example_config();
    let (admin_arg, listen_arg) = (admin.to_string(), free_addr().to_string());
    let mut dp = Process::start(
        "sluice-dp",
        &[
            "--config",
            &config,
            "--admin-listen",
            &admin_arg,
            "--listen",
            &listen_arg,
        ],
        &[],
    )?;
    dp.wait_ready(admin, "/readyz", Duration::from_secs(20))?;
    let (status, body) = sluice_tests::http::get(admin, "/config", Duration::from_secs(5))?;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body)?;
    let expected = sluice_proto::declarative::load(
        &std::fs::read_to_string(&config)?,
        sluice_proto::declarative::Format::Yaml,
    )?;
    assert_eq!(
        body["content_hash"],
        sluice_proto::snapshot::content_hash(&sluice_proto::snapshot::from_config(expected))
    );
    Ok(())
}

#[test]
fn the_data_plane_refuses_a_bad_file_with_every_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "format_version: 1\napis:\n  - name: a\n    routes:\n      - path: nope\n        proxy: { upstream: ghost }\n",
    )?;
    let (admin, listen) = (free_addr().to_string(), free_addr().to_string());
    let file_arg = file.display().to_string();
    let mut dp = Process::start(
        "sluice-dp",
        &[
            "--config",
            &file_arg,
            "--admin-listen",
            &admin,
            "--listen",
            &listen,
        ],
        &[],
    )?;
    let status = dp.wait_exit(Duration::from_secs(20))?;
    assert!(!status.success());
    let log = dp.log_text();
    assert!(log.contains("apis[0].routes[0].path"), "{log}");
    assert!(log.contains("apis[0].routes[0].proxy.upstream"), "{log}");
    Ok(())
}

#[tokio::test]
async fn the_control_plane_migrates_its_own_database_and_serves() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let http = free_addr();
    let http_arg = http.to_string();
    let mut cp = Process::start(
        "sluice-cp",
        &["--http-addr", &http_arg],
        &[("DATABASE_URL", &database.url)],
    )?;
    cp.wait_ready(http, "/healthz", Duration::from_secs(30))?;
    let mut conn = database.connect().await?;
    let migrated = sqlx::query("SELECT to_regclass('_sqlx_migrations') IS NOT NULL AS present")
        .fetch_one(&mut conn)
        .await?;
    assert!(
        migrated.get::<bool, _>("present"),
        "sluice-cp should have applied migrations"
    );
    Ok(())
}

#[test]
fn the_control_plane_fails_clearly_without_a_database() -> anyhow::Result<()> {
    let http = free_addr().to_string();
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/none",
        sluice_tests::ports::free_port()
    );
    let mut cp = Process::start(
        "sluice-cp",
        &["--http-addr", &http],
        &[("DATABASE_URL", &url)],
    )?;
    let status = cp.wait_exit(Duration::from_secs(30))?;
    assert!(!status.success());
    assert!(
        cp.log_text()
            .contains("cannot connect to the registry database"),
        "{}",
        cp.log_text()
    );
    Ok(())
}

#[test]
fn sluicectl_validate_lists_every_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "format_version: 1\napis:\n  - name: a\n    colour: red\n    routes:\n      - priority: x\n",
    )?;
    let output = std::process::Command::new(sluice_tests::process::binary("sluicectl")?)
        .args(["validate", "-f"])
        .arg(&file)
        .output()?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr)?;
    for path in [
        "apis[0].colour",
        "apis[0].routes[0].path",
        "apis[0].routes[0].priority",
    ] {
        assert!(stderr.contains(path), "missing {path} in:\n{stderr}");
    }
    let output = std::process::Command::new(sluice_tests::process::binary("sluicectl")?)
        .args(["validate", "-f", &example_config()])
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
