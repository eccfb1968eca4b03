//! The registry at scale (issue 3's benchmark): 100k consumers, 100k subscriptions and 20k
//! routes applied as one version; diff of two versions; rollback of one change; snapshot
//! compile time and size with 1M API keys and 20k routes. Runs against the Postgres of
//! `make services`, on a database of its own.

use prost::Message;
use sluice_bench::large::{
    APIS, CONSUMERS, GROUP, KEYS_PER_CONSUMER, ROUTES_PER_API, api_keys, id, registry_config,
};
use sluice_bench::{Row, ms, report, timed};
use sluice_control_plane::registry::{Plan, Registry, Write};
use sluice_proto::pb::{self, ConfigSet, ResourceKind};
use sluice_tests::postgres::TestDatabase;

const COMMAND: &str = "make bench (cargo run --release -p sluice-bench --bin registry)";
/// The floor: the same bodies written by one batched INSERT, with no versioning, validation
/// or change log.
async fn raw_insert(pool: &sqlx::PgPool, config: &ConfigSet) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("CREATE TABLE bench_raw (id uuid PRIMARY KEY, grp text NOT NULL, name text NOT NULL, body bytea NOT NULL)").execute(&mut *tx).await?;
    let resources = config.clone().into_resources();
    for batch in resources.chunks(5_000) {
        let ids: Vec<uuid::Uuid> = batch
            .iter()
            .map(|r| uuid::Uuid::parse_str(r.id()).unwrap_or_default())
            .collect();
        let groups: Vec<&str> = batch
            .iter()
            .map(|r| r.meta().map_or("", |m| m.group.as_str()))
            .collect();
        let names: Vec<&str> = batch
            .iter()
            .map(|r| r.meta().map_or("", |m| m.name.as_str()))
            .collect();
        let bodies: Vec<Vec<u8>> = batch.iter().map(Message::encode_to_vec).collect();
        sqlx::query("INSERT INTO bench_raw SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bytea[])")
            .bind(ids).bind(groups).bind(names).bind(bodies)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let pool = sluice_control_plane::db::connect(&database.url, Default::default()).await?;
    sluice_control_plane::db::migrate(&pool).await?;
    let registry = Registry::new(pool.clone(), 1000);
    let mut rows = Vec::new();

    let config = registry_config();
    let total = config.len();
    eprintln!(
        "applying {total} resources ({CONSUMERS} consumers, {CONSUMERS} subscriptions, {} routes)...",
        APIS * ROUTES_PER_API
    );
    let (v1, apply_time) =
        timed(registry.commit_plan("bench", "initial", Plan::Apply(config.clone()), false)).await;
    let v1 = v1?.version.expect("the first apply makes a version");
    let (raw, raw_time) = timed(raw_insert(&pool, &config)).await;
    raw?;
    rows.push(Row::new(
        &format!("apply {total} resources (1 version)"),
        "raw batched INSERT, same rows",
        "ms",
        ms(apply_time),
        Some(ms(raw_time)),
        COMMAND,
    ));

    // Version 2: re-apply the whole set with 1000 consumers changed.
    let mut changed = config.clone();
    for consumer in changed.consumers.iter_mut().take(1000) {
        consumer.custom_id.push_str("-v2");
    }
    let (v2, reapply_time) =
        timed(registry.commit_plan("bench", "1000 changed", Plan::Apply(changed), false)).await;
    let v2 = v2?
        .version
        .expect("a re-apply with changes makes a version");
    rows.push(Row::new(
        &format!("re-apply {total}, 1000 changed"),
        "-",
        "ms",
        ms(reapply_time),
        None,
        COMMAND,
    ));
    let (diff, diff_time) = timed(registry.diff(v1.number, v2.number)).await;
    assert_eq!(diff?.len(), 1000);
    rows.push(Row::new(
        "diff v1..v2 (1000 changed, field level)",
        "goal",
        "ms",
        ms(diff_time),
        Some(1000.0),
        COMMAND,
    ));
    let (full, full_time) = timed(registry.diff(0, v1.number)).await;
    assert_eq!(full?.len(), total);
    rows.push(Row::new(
        &format!("diff v0..v1 ({total} added)"),
        "goal",
        "ms",
        ms(full_time),
        Some(1000.0),
        COMMAND,
    ));

    // Version 3: one change; then roll it back.
    let mut one = registry
        .get(ResourceKind::Consumer, &id(ResourceKind::Consumer, "c-42"))
        .await?;
    if let Some(pb::resource::Kind::Consumer(c)) = &mut one.kind {
        c.disabled = true;
    }
    let (single, single_time) = timed(registry.commit(
        "bench",
        "disable c-42",
        vec![Write::Put {
            resource: one,
            if_match: None,
        }],
    ))
    .await;
    single?;
    rows.push(Row::new(
        "commit one change",
        "-",
        "ms",
        ms(single_time),
        None,
        COMMAND,
    ));
    let (rollback, rollback_time) =
        timed(registry.commit_plan("bench", "rollback", Plan::RollbackTo(v2.number), false)).await;
    assert_eq!(rollback?.changes.len(), 1);
    rows.push(Row::new(
        "rollback of one change (commit)",
        "goal",
        "ms",
        ms(rollback_time),
        Some(200.0),
        COMMAND,
    ));

    // 1M API keys, then the group's snapshot.
    let keys = api_keys();
    eprintln!("adding {} API keys...", keys.len());
    let writes = keys
        .into_iter()
        .map(|k| Write::Put {
            resource: k.into(),
            if_match: None,
        })
        .collect();
    let (added, keys_time) = timed(registry.commit("bench", "1M keys", writes)).await;
    added?;
    rows.push(Row::new(
        &format!(
            "commit {} API keys (1 version)",
            CONSUMERS * KEYS_PER_CONSUMER
        ),
        "-",
        "ms",
        ms(keys_time),
        None,
        COMMAND,
    ));
    let (snapshot, snapshot_time) = timed(registry.snapshot(GROUP)).await;
    let snapshot = snapshot?;
    let bytes = snapshot.snapshot.encoded_len() as f64 / 1_000_000.0;
    rows.push(Row::new(
        "snapshot compile, 1M keys + 20k routes",
        "-",
        "ms",
        ms(snapshot_time),
        None,
        COMMAND,
    ));
    rows.push(Row::new(
        "snapshot size, 1M keys + 20k routes",
        "goal",
        "MB",
        bytes,
        Some(150.0),
        COMMAND,
    ));
    report("registry", &rows)?;
    Ok(())
}
