//! The registry at scale (issue 3's benchmark): 100k consumers, 100k subscriptions and 20k
//! routes applied as one version; diff of two versions; rollback of one change; snapshot
//! compile time and size with 1M API keys and 20k routes. Runs against the Postgres of
//! `make services`, on a database of its own.

use prost::Message;
use sluice_bench::{Row, ms, report, timed};
use sluice_control_plane::registry::{Plan, Registry, Write};
use sluice_proto::declarative::normalize::{derived_id, derived_route_id, hash_api_key};
use sluice_proto::pb::{self, ConfigSet, ResourceKind};
use sluice_tests::postgres::TestDatabase;

const COMMAND: &str = "make bench (cargo run --release -p sluice-bench --bin registry)";
const GROUP: &str = "default";
const CONSUMERS: usize = 100_000;
const APIS: usize = 1_000;
const ROUTES_PER_API: usize = 20;
const UPSTREAMS: usize = 50;
const PLANS: usize = 10;
const KEYS_PER_CONSUMER: usize = 10;

fn meta(kind: ResourceKind, name: String) -> Option<pb::Meta> {
    Some(pb::Meta {
        id: derived_id(kind, GROUP, &name),
        group: GROUP.into(),
        name,
        ..Default::default()
    })
}

fn id(kind: ResourceKind, name: &str) -> String {
    derived_id(kind, GROUP, name)
}

/// The registry of the benchmark, built directly as protobuf (what an apply commits).
fn registry_config() -> ConfigSet {
    let mut set = ConfigSet::default();
    for u in 0..UPSTREAMS {
        set.upstreams.push(pb::Upstream {
            meta: meta(ResourceKind::Upstream, format!("svc-{u}")),
            targets: vec![pb::Target {
                url: format!("http://10.0.{}.{}:8080", u / 250, u % 250 + 1),
                weight: 0,
            }],
            ..Default::default()
        });
    }
    for p in 0..PLANS {
        set.plans.push(pb::Plan {
            meta: meta(ResourceKind::Plan, format!("plan-{p}")),
            rate_limits: vec![pb::RateLimit {
                limit: 100 * (p as u64 + 1),
                period: pb::rate_limit::Period::Second as i32,
                burst: 0,
            }],
            ..Default::default()
        });
    }
    for a in 0..APIS {
        let api_name = format!("api-{a}");
        let api_id = id(ResourceKind::Api, &api_name);
        let routes = (0..ROUTES_PER_API)
            .map(|r| {
                let name = format!("route-{r}");
                pb::Route {
                    id: derived_route_id(&api_id, &name),
                    name,
                    r#match: Some(pb::RouteMatch {
                        path: Some(pb::PathMatch {
                            kind: pb::path_match::Kind::Template as i32,
                            value: format!("/r{r}/{{id}}"),
                        }),
                        methods: vec!["GET".into()],
                        ..Default::default()
                    }),
                    action: Some(pb::route::Action::Proxy(pb::ProxyAction {
                        upstream_id: id(
                            ResourceKind::Upstream,
                            &format!("svc-{}", (a + r) % UPSTREAMS),
                        ),
                        ..Default::default()
                    })),
                    ..Default::default()
                }
            })
            .collect();
        set.apis.push(pb::Api {
            meta: meta(ResourceKind::Api, api_name.clone()),
            base_path: format!("/{api_name}"),
            routes,
            ..Default::default()
        });
    }
    for c in 0..CONSUMERS {
        let name = format!("c-{c}");
        set.consumers.push(pb::Consumer {
            meta: meta(ResourceKind::Consumer, name.clone()),
            custom_id: format!("CUST-{c}"),
            disabled: false,
        });
        set.subscriptions.push(pb::Subscription {
            meta: meta(
                ResourceKind::Subscription,
                format!("{name}.api-{}", c % APIS),
            ),
            consumer_id: id(ResourceKind::Consumer, &name),
            api_id: id(ResourceKind::Api, &format!("api-{}", c % APIS)),
            plan_id: id(ResourceKind::Plan, &format!("plan-{}", c % PLANS)),
            status: pb::subscription::Status::Active as i32,
            expires_at: None,
        });
    }
    set
}

fn api_keys() -> Vec<pb::Credential> {
    let mut keys = Vec::with_capacity(CONSUMERS * KEYS_PER_CONSUMER);
    for c in 0..CONSUMERS {
        let consumer_id = id(ResourceKind::Consumer, &format!("c-{c}"));
        for k in 0..KEYS_PER_CONSUMER {
            let plaintext = format!("bench-key-{c}-{k}-0123456789");
            keys.push(pb::Credential {
                meta: meta(ResourceKind::Credential, format!("c-{c}-key-{k}")),
                consumer_id: consumer_id.clone(),
                kind: Some(pb::credential::Kind::ApiKey(pb::ApiKeyCredential {
                    key_sha256: hash_api_key(&plaintext),
                    prefix: plaintext[..6].into(),
                })),
                expires_at: None,
                revoked: false,
            });
        }
    }
    keys
}

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
    let pool = sluice_control_plane::db::connect(&database.url, std::time::Duration::from_secs(10))
        .await?;
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
