//! The registry against real Postgres: concurrency, versions, rollback, diff, constraints.

use std::collections::HashSet;
use std::sync::Arc;

use sluice_control_plane::registry::{Plan, Registry, RegistryError, StateHash, Write};
use sluice_control_plane::versions::Op;
use sluice_proto::declarative::normalize::{derived_id, hash_api_key};
use sluice_proto::declarative::{self, Format};
use sluice_proto::pb::{self, Resource, ResourceKind};
use sluice_tests::postgres::TestDatabase;

const EXAMPLE: &str = include_str!("../../deploy/examples/sluice.yaml");

async fn registry(database: &TestDatabase, retention: u64) -> anyhow::Result<Registry> {
    let pool = sluice_control_plane::db::connect(&database.url, Default::default()).await?;
    sluice_control_plane::db::migrate(&pool).await?;
    Ok(Registry::new(pool, retention))
}

fn consumer(name: &str) -> Resource {
    pb::Consumer {
        meta: Some(pb::Meta {
            id: derived_id(ResourceKind::Consumer, "default", name),
            group: "default".into(),
            name: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .into()
}

fn example() -> pb::ConfigSet {
    declarative::load(EXAMPLE, Format::Yaml).unwrap()
}

/// The export of a state, without resource versions: what "equal states" means.
fn export_of(mut set: pb::ConfigSet) -> String {
    sluice_proto::hash::canonicalize(&mut set);
    declarative::to_yaml(&declarative::export(&set))
}

#[tokio::test]
async fn twenty_concurrent_writers_lose_nothing_and_versions_are_contiguous() -> anyhow::Result<()>
{
    let database = TestDatabase::create().await?;
    let registry = Arc::new(registry(&database, 10_000).await?);
    registry
        .commit(
            "setup",
            "shared",
            vec![Write::Put {
                resource: consumer("shared"),
                if_match: None,
            }],
        )
        .await?;

    const WRITERS: usize = 20;
    const ROUNDS: usize = 5;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let registry = registry.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                // Own resource: create then update.
                let mut own = consumer(&format!("writer-{w}"));
                if let Some(pb::resource::Kind::Consumer(c)) = &mut own.kind {
                    c.custom_id = format!("round-{round}");
                }
                registry
                    .commit(
                        &format!("w{w}"),
                        "own",
                        vec![Write::Put {
                            resource: own,
                            if_match: None,
                        }],
                    )
                    .await?;
                // Shared resource: read-modify-write with If-Match, retried on conflict.
                loop {
                    let current = registry
                        .get(ResourceKind::Consumer, consumer("shared").id())
                        .await?;
                    let version = current.meta().unwrap().resource_version;
                    let mut next = current.clone();
                    if let Some(pb::resource::Kind::Consumer(c)) = &mut next.kind {
                        let n: u64 = c.custom_id.parse().unwrap_or(0);
                        c.custom_id = (n + 1).to_string();
                    }
                    match registry
                        .commit(
                            &format!("w{w}"),
                            "increment",
                            vec![Write::Put {
                                resource: next,
                                if_match: Some(version),
                            }],
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(RegistryError::PreconditionFailed { .. }) => continue,
                        Err(e) => return Err(anyhow::Error::from(e)),
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }

    // No lost update: every increment is there.
    let shared = registry
        .get(ResourceKind::Consumer, consumer("shared").id())
        .await?;
    let Some(pb::resource::Kind::Consumer(c)) = &shared.kind else {
        unreachable!()
    };
    assert_eq!(c.custom_id, (WRITERS * ROUNDS).to_string());

    // Versions are contiguous: 1 + 2 commits per writer per round.
    let expected = 1 + 2 * WRITERS * ROUNDS;
    let (versions, next) = registry.list_versions(None, 1000).await?;
    assert!(next.is_none());
    let numbers: Vec<u64> = versions.iter().map(|v| v.number).collect();
    assert_eq!(numbers, (1..=expected as u64).rev().collect::<Vec<_>>());

    // Every version's hash matches a recomputation from its state.
    for version in &versions {
        let state = registry.state_at(version.number, None).await?;
        let resources = state.into_resources();
        assert_eq!(
            StateHash::of(&resources).hex(),
            version.content_hash,
            "version {}",
            version.number
        );
    }
    let (head, hash) = registry.head().await?;
    assert_eq!(head, expected as u64);
    assert_eq!(hash.hex(), versions[0].content_hash);
    Ok(())
}

#[tokio::test]
async fn rolling_back_to_each_version_restores_its_export() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 1000).await?;
    let mut exports = vec![export_of(pb::ConfigSet::default())];

    // A history of creates, updates and deletes.
    let mut config = example();
    registry
        .commit_plan("t", "apply example", Plan::Apply(config.clone()), false)
        .await?;
    exports.push(export_of(config.clone()));
    config.upstreams[0].targets[0].weight = 5;
    config.plans[0].monthly_quota = 7;
    registry
        .commit_plan("t", "tune", Plan::Apply(config.clone()), false)
        .await?;
    exports.push(export_of(config.clone()));
    config.subscriptions.clear();
    config.credentials.remove(1);
    registry
        .commit_plan(
            "t",
            "drop subscription and a credential",
            Plan::Apply(config.clone()),
            false,
        )
        .await?;
    exports.push(export_of(config.clone()));
    registry
        .commit(
            "t",
            "add",
            vec![Write::Put {
                resource: consumer("late"),
                if_match: None,
            }],
        )
        .await?;
    config.consumers.push(match consumer("late").kind {
        Some(pb::resource::Kind::Consumer(c)) => c,
        _ => unreachable!(),
    });
    exports.push(export_of(config.clone()));

    let head = registry.head().await?.0;
    assert_eq!(head, 4);
    for target in [2, 0, 3, 1, 4] {
        let before = registry.head().await?.0;
        let committed = registry
            .commit_plan(
                "t",
                &format!("rollback to {target}"),
                Plan::RollbackTo(target),
                false,
            )
            .await?;
        let (_, state) = registry.state(None).await?;
        assert_eq!(
            export_of(state),
            exports[target as usize],
            "after rollback to {target}"
        );
        let version = committed
            .version
            .expect("a rollback to another state makes a version");
        assert_eq!(version.number, before + 1, "a rollback is a new version");
        let hash_at_target = if target == 0 {
            StateHash::default().hex()
        } else {
            registry.version(target).await?.content_hash
        };
        assert_eq!(
            version.content_hash, hash_at_target,
            "same state, same hash"
        );
    }
    // Reading a past version's state needs no rollback.
    assert_eq!(export_of(registry.state_at(2, None).await?), exports[2]);
    Ok(())
}

#[tokio::test]
async fn diffs_name_fields_and_dry_runs_commit_nothing() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 1000).await?;
    let mut config = example();
    registry
        .commit_plan("t", "v1", Plan::Apply(config.clone()), false)
        .await?;
    config.upstreams[0].targets[1].url = "http://127.0.0.1:9999".into();
    config
        .brokers
        .retain(|b| b.meta.as_ref().unwrap().name != "local");
    config
        .apis
        .retain(|a| a.meta.as_ref().unwrap().name != "status");

    let dry = registry
        .commit_plan("t", "dry", Plan::Apply(config.clone()), true)
        .await?;
    assert!(dry.version.is_none());
    assert_eq!(registry.head().await?.0, 1, "a dry run commits nothing");
    assert_eq!(
        dry.changes.len(),
        3,
        "the upstream changed, an api and a broker removed"
    );

    registry
        .commit_plan("t", "v2", Plan::Apply(config), false)
        .await?;
    let diff = registry.diff(1, 2).await?;
    let upstream = diff.iter().find(|d| d.kind == "upstream").unwrap();
    assert_eq!(upstream.op, Op::Changed);
    assert_eq!(upstream.fields.len(), 1);
    assert_eq!(upstream.fields[0].path, "targets[1].url");
    assert_eq!(
        upstream.fields[0].after,
        Some("http://127.0.0.1:9999".into())
    );
    let removed: HashSet<&str> = diff
        .iter()
        .filter(|d| d.op == Op::Removed)
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(removed, HashSet::from(["local", "status"]));
    // The other direction is the inverse.
    let back = registry.diff(2, 1).await?;
    assert!(back.iter().any(|d| d.name == "local" && d.op == Op::Added));
    Ok(())
}

#[tokio::test]
async fn retention_bounds_rollback_with_a_clear_error() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 3).await?;
    for i in 0..6 {
        registry
            .commit(
                "t",
                "add",
                vec![Write::Put {
                    resource: consumer(&format!("c{i}")),
                    if_match: None,
                }],
            )
            .await?;
    }
    let (versions, _) = registry.list_versions(None, 100).await?;
    assert_eq!(
        versions.iter().map(|v| v.number).collect::<Vec<_>>(),
        [6, 5, 4]
    );
    match registry
        .commit_plan("t", "too far", Plan::RollbackTo(2), false)
        .await
    {
        Err(RegistryError::VersionNotRetained {
            requested: 2,
            oldest: 3,
        }) => {}
        other => panic!("expected VersionNotRetained, got {other:?}"),
    }
    registry
        .commit_plan("t", "ok", Plan::RollbackTo(3), false)
        .await?;
    assert_eq!(registry.state(None).await?.1.consumers.len(), 3);
    Ok(())
}

#[tokio::test]
async fn a_lowered_retention_is_reached_a_few_versions_a_commit() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let add = |registry: &Registry, i: usize| {
        let registry = registry.clone();
        async move {
            registry
                .commit(
                    "t",
                    "add",
                    vec![Write::Put {
                        resource: consumer(&format!("c{i}")),
                        if_match: None,
                    }],
                )
                .await
        }
    };
    let generous = registry(&database, 100).await?;
    for i in 0..30 {
        add(&generous, i).await?;
    }
    // The same database with a retention of 3: 16 of the 27 versions now past it go with the
    // next commit, the rest with the one after.
    let strict = registry(&database, 3).await?;
    add(&strict, 30).await?;
    let numbers = |versions: Vec<sluice_control_plane::registry::VersionInfo>| {
        versions.iter().map(|v| v.number).collect::<Vec<_>>()
    };
    let (versions, _) = strict.list_versions(None, 100).await?;
    assert_eq!(numbers(versions), (17..=31).rev().collect::<Vec<_>>());
    strict
        .commit_plan("t", "still there", Plan::RollbackTo(16), true)
        .await?;
    add(&strict, 31).await?;
    let (versions, _) = strict.list_versions(None, 100).await?;
    assert_eq!(numbers(versions), [32, 31, 30]);
    Ok(())
}

#[tokio::test]
async fn a_write_stuck_behind_a_lock_ends_with_the_statement_timeout() -> anyhow::Result<()> {
    use sqlx::Connection;
    use std::time::{Duration, Instant};
    let database = TestDatabase::create().await?;
    let timeouts = sluice_control_plane::db::Timeouts {
        statement: Duration::from_millis(500),
        ..Default::default()
    };
    let pool = sluice_control_plane::db::connect(&database.url, timeouts).await?;
    sluice_control_plane::db::migrate(&pool).await?;
    let registry = Registry::new(pool.clone(), 100);
    let put = || {
        vec![Write::Put {
            resource: consumer("patient"),
            if_match: None,
        }]
    };

    // Another session holds the registry head's row lock, as a hung commit would.
    let mut holder = sqlx::PgConnection::connect(&database.url).await?;
    sqlx::query("BEGIN").execute(&mut holder).await?;
    sqlx::query("SELECT version FROM registry_head FOR UPDATE")
        .execute(&mut holder)
        .await?;
    let started = Instant::now();
    let blocked = registry.commit("t", "blocked", put()).await;
    let waited = started.elapsed();
    assert!(
        matches!(&blocked, Err(RegistryError::Unavailable(m)) if m.contains("did not finish in time")),
        "a write behind a held lock must end as unavailable, got {blocked:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "the lock timeout (500 ms) should end the wait, it took {waited:?}"
    );

    // A statement that runs too long ends the same way.
    let slow = sqlx::query("SELECT pg_sleep(3)").execute(&pool).await;
    assert!(
        matches!(
            RegistryError::from_db(slow.unwrap_err()),
            RegistryError::Unavailable(_)
        ),
        "a statement past the timeout must be cancelled"
    );

    // Nothing was half-done: once the lock goes, the same write commits as the first version.
    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    let committed = registry.commit("t", "unblocked", put()).await?;
    assert_eq!(committed.version.map(|v| v.number), Some(1));
    Ok(())
}

#[tokio::test]
async fn constraints_become_clear_errors() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 1000).await?;
    let config = example();
    registry
        .commit_plan("t", "v1", Plan::Apply(config.clone()), false)
        .await?;

    // If-Match on a stale version.
    let upstream: Resource = config.upstreams[0].clone().into();
    match registry
        .commit(
            "t",
            "stale",
            vec![Write::Put {
                resource: upstream.clone(),
                if_match: Some(7),
            }],
        )
        .await
    {
        Err(RegistryError::PreconditionFailed {
            expected: 7,
            actual: 1,
            ..
        }) => {}
        other => panic!("expected PreconditionFailed, got {other:?}"),
    }
    // An update of a resource that is gone (deleted by a commit that came first) creates
    // nothing; of one that is there, it passes at any version (this one changes nothing, so
    // makes no version).
    let update = |resource: Resource| {
        vec![Write::Put {
            resource,
            if_match: Some(Write::EXISTING),
        }]
    };
    match registry
        .commit("t", "update", update(consumer("gone")))
        .await
    {
        Err(RegistryError::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    registry
        .commit("t", "update", update(upstream.clone()))
        .await?;
    // Deleting what a route still uses.
    match registry
        .commit(
            "t",
            "delete",
            vec![Write::Delete {
                kind: ResourceKind::Upstream,
                id: upstream.id().into(),
                if_match: None,
            }],
        )
        .await
    {
        Err(RegistryError::StillReferenced(message)) => {
            assert!(message.contains("still referenced"), "{message}")
        }
        other => panic!("expected StillReferenced, got {other:?}"),
    }
    // A second resource with a taken name.
    let mut twin = consumer("acme");
    twin.meta_mut().unwrap().id = uuid::Uuid::new_v4().to_string();
    match registry
        .commit(
            "t",
            "twin",
            vec![Write::Put {
                resource: twin,
                if_match: None,
            }],
        )
        .await
    {
        Err(RegistryError::Conflict(message)) => {
            assert!(message.contains("already exists"), "{message}")
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    // A reference to nothing, judged by the shared validator with its path.
    let mut subscription = config.subscriptions[0].clone();
    subscription.plan_id = uuid::Uuid::new_v4().to_string();
    match registry
        .commit(
            "t",
            "dangling",
            vec![Write::Put {
                resource: subscription.into(),
                if_match: None,
            }],
        )
        .await
    {
        Err(RegistryError::Invalid(errors)) => {
            assert_eq!(errors.0[0].path, "subscriptions[0].plan", "{errors}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    // Nothing above made a version.
    assert_eq!(registry.head().await?.0, 1);
    Ok(())
}

#[tokio::test]
async fn snapshots_are_deterministic_and_deltas_bridge_versions() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 1000).await?;
    let mut config = example();
    // The same resources in another group must not leak into the default group's snapshot.
    let staging_doc = EXAMPLE.replace("group: default ", "group: staging ");
    let staging = declarative::load(&staging_doc, Format::Yaml)?;
    let mut both = config.clone().into_resources();
    both.extend(staging.into_resources());
    registry
        .commit_plan(
            "t",
            "v1",
            Plan::Apply(both.iter().cloned().collect()),
            false,
        )
        .await?;

    let first = registry.snapshot("default").await?;
    let again = registry.snapshot("default").await?;
    assert_eq!(first, again);
    assert_eq!(
        prost::Message::encode_to_vec(&first.snapshot),
        prost::Message::encode_to_vec(&again.snapshot)
    );
    let resources = first.snapshot.resources.clone().unwrap_or_default();
    assert_eq!(
        resources.len() + first.snapshot.api_keys.len(),
        config.len(),
        "only the default group"
    );
    assert_eq!(
        first.snapshot.api_keys.len(),
        1,
        "the example's API key, packed"
    );
    assert!(
        resources
            .credentials
            .iter()
            .all(|c| !matches!(c.kind, Some(pb::credential::Kind::ApiKey(_)))),
        "no API key travels whole"
    );
    sluice_proto::snapshot::validate(&first.snapshot).unwrap();

    // v2 changes one upstream, revokes the API key, adds another, and deletes a broker (with
    // the API that used it) in default.
    config.upstreams[0].targets[0].weight = 3;
    let key = config
        .credentials
        .iter_mut()
        .find(|c| matches!(c.kind, Some(pb::credential::Kind::ApiKey(_))))
        .unwrap();
    key.revoked = true;
    let mut second_key = key.clone();
    let name = "second-key".to_owned();
    second_key.meta = Some(pb::Meta {
        id: derived_id(ResourceKind::Credential, "default", &name),
        group: "default".into(),
        name,
        ..Default::default()
    });
    second_key.revoked = false;
    second_key.kind = Some(pb::credential::Kind::ApiKey(pb::ApiKeyCredential {
        key_sha256: hash_api_key("a-second-key-0123456789"),
        prefix: "a-seco".into(),
    }));
    config.credentials.push(second_key);
    config
        .brokers
        .retain(|b| b.meta.as_ref().unwrap().name != "local");
    config
        .apis
        .retain(|a| a.meta.as_ref().unwrap().name != "status");
    let mut desired = config.clone().into_resources();
    desired.extend(
        both.into_iter()
            .filter(|r| r.meta().unwrap().group == "staging"),
    );
    registry
        .commit_plan("t", "v2", Plan::Apply(desired.into_iter().collect()), false)
        .await?;

    let second = registry.snapshot("default").await?;
    let delta = registry
        .delta("default", first.version, second.version)
        .await?;
    assert_eq!(delta.base_version, 1);
    assert_eq!(delta.removed.len(), 2);
    assert_eq!(
        delta.upserted_api_keys.len(),
        2,
        "the revoked key and the new one"
    );
    // Applying the delta to the first snapshot gives the second, byte for byte.
    let upserted = delta.upserted.clone().unwrap_or_default().into_resources();
    let replaced: HashSet<String> = delta
        .removed
        .iter()
        .map(|r| r.id.clone())
        .chain(upserted.iter().map(|r| r.id().to_owned()))
        .chain(
            delta
                .upserted_api_keys
                .iter()
                .map(|k| uuid::Uuid::from_slice(&k.id).unwrap().to_string()),
        )
        .collect();
    let rebuilt_resources: pb::ConfigSet = resources
        .into_resources()
        .into_iter()
        .filter(|r| !replaced.contains(r.id()))
        .chain(upserted)
        .collect();
    let rebuilt_keys = first
        .snapshot
        .api_keys
        .iter()
        .filter(|k| !replaced.contains(&uuid::Uuid::from_slice(&k.id).unwrap().to_string()))
        .chain(&delta.upserted_api_keys)
        .cloned()
        .collect();
    let mut rebuilt = pb::Snapshot {
        resources: Some(rebuilt_resources),
        api_keys: rebuilt_keys,
    };
    sluice_proto::snapshot::canonicalize(&mut rebuilt);
    assert_eq!(rebuilt, second.snapshot);
    assert_eq!(
        sluice_proto::snapshot::content_hash(&rebuilt),
        second.content_hash
    );
    Ok(())
}

#[tokio::test]
async fn a_resource_without_a_kind_is_refused_not_a_crash() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 10).await?;
    let nothing = Resource { kind: None };
    match registry
        .commit(
            "t",
            "empty",
            vec![Write::Put {
                resource: nothing,
                if_match: None,
            }],
        )
        .await
    {
        Err(RegistryError::Invalid(errors)) => assert_eq!(errors.0[0].path, "kind"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    let delete = Write::Delete {
        kind: ResourceKind::Unspecified,
        id: uuid::Uuid::new_v4().to_string(),
        if_match: None,
    };
    assert!(matches!(
        registry.commit("t", "x", vec![delete]).await,
        Err(RegistryError::Invalid(_))
    ));
    Ok(())
}

fn broker(name: &str, id: Option<String>) -> Resource {
    pb::Broker {
        meta: Some(pb::Meta {
            id: id.unwrap_or_else(|| derived_id(ResourceKind::Broker, "default", name)),
            group: "default".into(),
            name: name.into(),
            ..Default::default()
        }),
        kind: Some(pb::broker::Kind::Memory(pb::MemoryBroker::default())),
    }
    .into()
}

#[tokio::test]
async fn an_id_has_one_spelling_and_names_one_thing() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 100).await?;
    registry
        .commit_plan("t", "v1", Plan::Apply(example()), false)
        .await?;
    let upstream = example().upstreams[0].clone();
    let head = registry.head().await?;

    // Another spelling of an existing id cannot sneak past the existence check.
    let mut shouting: Resource = upstream.clone().into();
    let upper = shouting.id().to_uppercase();
    shouting.meta_mut().unwrap().id = upper.clone();
    shouting.meta_mut().unwrap().name = "renamed".into();
    match registry
        .commit(
            "t",
            "upper",
            vec![Write::Put {
                resource: shouting,
                if_match: None,
            }],
        )
        .await
    {
        Err(RegistryError::Invalid(errors)) => {
            assert!(errors.0[0].reason.contains("canonical"), "{errors}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(registry.head().await?, head, "nothing was written");
    assert_eq!(
        registry
            .get(
                ResourceKind::Upstream,
                upstream.meta.as_ref().unwrap().id.as_str()
            )
            .await?
            .meta()
            .unwrap()
            .name,
        "orders-svc"
    );

    // The id of an API cannot become a consumer's, nor a route's.
    let api_id = example().apis[0].meta.as_ref().unwrap().id.clone();
    let mut impostor = consumer("impostor");
    impostor.meta_mut().unwrap().id = api_id.clone();
    match registry
        .commit(
            "t",
            "impostor",
            vec![Write::Put {
                resource: impostor,
                if_match: None,
            }],
        )
        .await
    {
        Err(RegistryError::Conflict(message)) => {
            assert!(message.contains("already the id of an api"), "{message}")
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    let mut thief = example().apis[1].clone();
    thief.meta.as_mut().unwrap().id = uuid::Uuid::new_v4().to_string();
    thief.meta.as_mut().unwrap().name = "thief".into();
    thief.routes[0].id = example().consumers[0].meta.as_ref().unwrap().id.clone();
    match registry
        .commit(
            "t",
            "thief",
            vec![Write::Put {
                resource: thief.into(),
                if_match: None,
            }],
        )
        .await
    {
        Err(RegistryError::Conflict(message)) => assert!(
            message.contains("already the id of a consumer"),
            "{message}"
        ),
        other => panic!("expected Conflict, got {other:?}"),
    }
    // A delete may name the id any way.
    let delete = Write::Delete {
        kind: ResourceKind::Consumer,
        id: registry
            .find(ResourceKind::Consumer, "default", "acme")
            .await?
            .id()
            .to_uppercase(),
        if_match: None,
    };
    assert!(matches!(
        registry.commit("t", "delete", vec![delete]).await,
        Err(RegistryError::StillReferenced(_))
    ));
    Ok(())
}

#[tokio::test]
async fn group_wide_uniqueness_and_name_swaps() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 100).await?;
    registry
        .commit_plan("t", "v1", Plan::Apply(example()), false)
        .await?;

    // The same JWT issuer and subject cannot name two consumers.
    let other = consumer("other");
    let jwt = |name: &str, consumer_id: &str| -> Resource {
        pb::Credential {
            meta: Some(pb::Meta {
                id: uuid::Uuid::new_v4().to_string(),
                group: "default".into(),
                name: name.into(),
                ..Default::default()
            }),
            consumer_id: consumer_id.into(),
            kind: Some(pb::credential::Kind::Jwt(pb::JwtCredential {
                issuer: "https://auth.example.com/".into(),
                subject: "acme-service".into(),
            })),
            expires_at: None,
            revoked: false,
        }
        .into()
    };
    let other_id = other.id().to_owned();
    match registry
        .commit(
            "t",
            "twin jwt",
            vec![
                Write::Put {
                    resource: other,
                    if_match: None,
                },
                Write::Put {
                    resource: jwt("twin", &other_id),
                    if_match: None,
                },
            ],
        )
        .await
    {
        Err(RegistryError::Conflict(message)) => {
            assert!(message.contains("JWT issuer and subject"), "{message}")
        }
        other => panic!("expected Conflict, got {other:?}"),
    }

    // Swapping two names is one version, and so is rolling it back.
    registry
        .commit(
            "t",
            "brokers",
            vec![
                Write::Put {
                    resource: broker("ba", None),
                    if_match: None,
                },
                Write::Put {
                    resource: broker("bb", None),
                    if_match: None,
                },
            ],
        )
        .await?;
    let before_swap = registry.head().await?.0;
    let (mut ba, mut bb) = (
        registry.find(ResourceKind::Broker, "default", "ba").await?,
        registry.find(ResourceKind::Broker, "default", "bb").await?,
    );
    ba.meta_mut().unwrap().name = "bb".into();
    bb.meta_mut().unwrap().name = "ba".into();
    registry
        .commit(
            "t",
            "swap",
            vec![
                Write::Put {
                    resource: ba,
                    if_match: None,
                },
                Write::Put {
                    resource: bb,
                    if_match: None,
                },
            ],
        )
        .await?;
    registry
        .commit_plan("t", "undo", Plan::RollbackTo(before_swap), false)
        .await?;
    assert_eq!(
        registry
            .find(ResourceKind::Broker, "default", "ba")
            .await?
            .id(),
        derived_id(ResourceKind::Broker, "default", "ba")
    );

    // After a rename, the old name can be used again, by the API and by apply.
    let mut m = broker("m1", None);
    registry
        .commit(
            "t",
            "m1",
            vec![Write::Put {
                resource: m.clone(),
                if_match: None,
            }],
        )
        .await?;
    m.meta_mut().unwrap().name = "m2".into();
    registry
        .commit(
            "t",
            "rename",
            vec![Write::Put {
                resource: m,
                if_match: None,
            }],
        )
        .await?;
    let (_, mut state) = registry.state(None).await?;
    let derived_m1 = derived_id(ResourceKind::Broker, "default", "m1");
    // As a document with no ids gives them: m2's id derived from its name.
    for broker in &mut state.brokers {
        let meta = broker.meta.as_mut().unwrap();
        if meta.name == "m2" {
            meta.id = derived_id(ResourceKind::Broker, "default", "m2");
        }
    }
    if let Some(pb::resource::Kind::Broker(fresh)) = broker("m1", None).kind {
        state.brokers.push(fresh);
    }
    let applied = registry
        .commit_plan("t", "both", Plan::Apply(state), false)
        .await?;
    assert_eq!(applied.changes.len(), 1, "only the new m1 is created");
    let new_m1 = registry.find(ResourceKind::Broker, "default", "m1").await?;
    assert_ne!(
        new_m1.id(),
        derived_m1,
        "m2 keeps the id; the new m1 gets its own"
    );
    assert_eq!(
        registry
            .find(ResourceKind::Broker, "default", "m2")
            .await?
            .id(),
        derived_m1
    );

    // A quota beyond what Postgres can hold is a field error, not a crash.
    let mut plan = example().plans[0].clone();
    plan.monthly_quota = u64::MAX;
    match registry
        .commit(
            "t",
            "huge",
            vec![Write::Put {
                resource: plan.into(),
                if_match: None,
            }],
        )
        .await
    {
        Err(RegistryError::Invalid(errors)) => {
            assert_eq!(errors.0[0].path, "plans[0].monthly_quota")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_delta_past_retention_is_refused() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 2).await?;
    for i in 0..4 {
        registry
            .commit(
                "t",
                "add",
                vec![Write::Put {
                    resource: consumer(&format!("c{i}")),
                    if_match: None,
                }],
            )
            .await?;
    }
    assert!(matches!(
        registry.delta("default", 0, 4).await,
        Err(RegistryError::VersionNotRetained { .. })
    ));
    assert!(matches!(
        registry.delta("default", 3, 9).await,
        Err(RegistryError::VersionNotFound(9))
    ));
    assert_eq!(
        registry
            .delta("default", 2, 4)
            .await?
            .upserted
            .unwrap()
            .consumers
            .len(),
        2
    );
    Ok(())
}

/// Expects a refusal naming `path` with a reason that contains `needle`.
fn assert_refused(result: Result<impl std::fmt::Debug, RegistryError>, path: &str, needle: &str) {
    match result {
        Err(RegistryError::Invalid(errors)) => assert!(
            errors
                .0
                .iter()
                .any(|e| e.path == path && e.reason.contains(needle)),
            "expected {path}: …{needle}…, got {errors}"
        ),
        other => panic!("expected Invalid at {path}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_write_that_would_break_what_refers_to_it_is_refused() -> anyhow::Result<()> {
    use pb::resource::Kind;
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 100).await?;
    registry
        .commit_plan("t", "v1", Plan::Apply(example()), false)
        .await?;
    let put = |resource: Resource| {
        vec![Write::Put {
            resource,
            if_match: None,
        }]
    };

    // Consumer "acme" lists the IP policy "office-only": it cannot become a body limit.
    let mut policy = registry
        .find(ResourceKind::Policy, "default", "office-only")
        .await?;
    let Some(Kind::Policy(inner)) = &mut policy.kind else {
        unreachable!()
    };
    inner.kind = Some(pb::policy::Kind::RequestSize(pb::RequestSizePolicy {
        max_body_bytes: 1024,
    }));
    assert_refused(
        registry
            .commit("t", "policy kind", put(policy.clone()))
            .await,
        "policies[0]",
        "consumer \"acme\"",
    );
    // Changed in the same commit that takes it off the consumer, it is fine.
    let mut acme = registry
        .find(ResourceKind::Consumer, "default", "acme")
        .await?;
    let Some(Kind::Consumer(consumer)) = &mut acme.kind else {
        unreachable!()
    };
    consumer.policy_ids.clear();
    let mut both = put(policy);
    both.extend(put(acme));
    registry.commit("t", "both", both).await?;

    // Route "publish-order-event" publishes durably through broker "kafka" with its acks.
    let mut broker = registry
        .find(ResourceKind::Broker, "default", "kafka")
        .await?;
    let Some(Kind::Broker(pb::Broker {
        kind: Some(pb::broker::Kind::Kafka(kafka)),
        ..
    })) = &mut broker.kind
    else {
        unreachable!()
    };
    kafka.properties.insert("acks".into(), "0".into());
    assert_refused(
        registry.commit("t", "no acks", put(broker)).await,
        "brokers[0].kafka.properties",
        "route \"publish-order-event\" of api \"orders\"",
    );

    // One default certificate per group; its own update is not a conflict with itself.
    let ca = sluice_tests::pki::TestCa::new("registry test")?;
    let certificate = |name: &str, sni: &str| -> anyhow::Result<Resource> {
        let leaf = ca.leaf(&["edge.example.com"])?;
        Ok(pb::Certificate {
            meta: Some(pb::Meta {
                id: derived_id(ResourceKind::Certificate, "default", name),
                group: "default".into(),
                name: name.into(),
                ..Default::default()
            }),
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            snis: vec![sni.into()],
        }
        .into())
    };
    registry
        .commit("t", "first", put(certificate("first", "*")?))
        .await?;
    registry
        .commit("t", "first again", put(certificate("first", "*")?))
        .await?;
    assert_refused(
        registry
            .commit("t", "second", put(certificate("second", "*")?))
            .await,
        "certificates[0].snis[0]",
        "\"*\" is also served by certificate \"first\"",
    );
    registry
        .commit(
            "t",
            "second",
            put(certificate("second", "edge.example.com")?),
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_rollback_keeps_credentials_revoked_and_expiring() -> anyhow::Result<()> {
    use pb::resource::Kind;
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 100).await?;
    let first = registry
        .commit_plan("t", "v1", Plan::Apply(example()), false)
        .await?
        .version
        .expect("a first version")
        .number;
    let (_, state) = registry.state(Some("default")).await?;
    let key = state
        .credentials
        .iter()
        .find(|c| matches!(c.kind, Some(pb::credential::Kind::ApiKey(_))))
        .expect("the example has an API key")
        .clone();
    let key_id = key.meta.as_ref().unwrap().id.clone();
    let current_key = || async {
        match registry.get(ResourceKind::Credential, &key_id).await?.kind {
            Some(Kind::Credential(c)) => Ok::<_, anyhow::Error>(c),
            other => anyhow::bail!("not a credential: {other:?}"),
        }
    };
    let mut upstream = state.upstreams[0].clone();
    let weight = upstream.targets[0].weight;
    upstream.targets[0].weight = weight + 7;
    let ends = prost_types::Timestamp {
        seconds: 1_900_000_000,
        nanos: 0,
    };

    // A rotation's expiry, then a rollback past it: the other change goes, the expiry stays.
    let mut expiring = key.clone();
    expiring.expires_at = Some(ends);
    registry
        .commit(
            "t",
            "rotate",
            vec![
                Write::Put {
                    resource: expiring.clone().into(),
                    if_match: None,
                },
                Write::Put {
                    resource: upstream.clone().into(),
                    if_match: None,
                },
            ],
        )
        .await?;
    registry
        .commit_plan("t", "back", Plan::RollbackTo(first), false)
        .await?;
    let (_, rolled) = registry.state(Some("default")).await?;
    assert_eq!(rolled.upstreams[0].targets[0].weight, weight, "restored");
    assert_eq!(current_key().await?.expires_at, Some(ends), "kept");

    // A revocation, then a rollback past it: still revoked.
    let mut revoked = expiring;
    revoked.revoked = true;
    registry
        .commit(
            "t",
            "revoke",
            vec![Write::Put {
                resource: revoked.into(),
                if_match: None,
            }],
        )
        .await?;
    registry
        .commit_plan("t", "back again", Plan::RollbackTo(first), false)
        .await?;
    let after = current_key().await?;
    assert!(
        after.revoked,
        "a rollback must not bring a revoked key back"
    );
    assert_eq!(after.expires_at, Some(ends));

    // Revoked, then deleted (its grace over, its consumer offboarded), then a rollback past
    // both: it comes back as it was deleted, revoked and expiring, not live as at `first`.
    registry
        .commit(
            "t",
            "remove",
            vec![Write::Delete {
                kind: ResourceKind::Credential,
                id: key_id.clone(),
                if_match: None,
            }],
        )
        .await?;
    registry
        .commit_plan("t", "back once more", Plan::RollbackTo(first), false)
        .await?;
    let restored = current_key().await?;
    assert!(restored.revoked, "a deleted key comes back revoked");
    assert_eq!(restored.expires_at, Some(ends));
    Ok(())
}

#[tokio::test]
async fn a_resource_created_again_does_not_match_an_etag_of_its_earlier_self() -> anyhow::Result<()>
{
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 100).await?;
    let put = |if_match| {
        vec![Write::Put {
            resource: consumer("phoenix"),
            if_match,
        }]
    };
    let first = registry.commit("t", "create", put(None)).await?.resources[0]
        .clone()
        .expect("stored");
    let seen = first.meta().unwrap().resource_version;
    registry
        .commit(
            "t",
            "delete",
            vec![Write::Delete {
                kind: ResourceKind::Consumer,
                id: first.id().to_owned(),
                if_match: Some(seen),
            }],
        )
        .await?;
    let again = registry.commit("t", "create again", put(None)).await?;
    let version = again.version.expect("a version").number;
    assert_eq!(
        again.resources[0]
            .as_ref()
            .unwrap()
            .meta()
            .unwrap()
            .resource_version,
        version,
        "a resource's version is the number of the version that wrote it"
    );
    assert!(matches!(
        registry.commit("t", "stale", put(Some(seen))).await,
        Err(RegistryError::PreconditionFailed { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn one_client_certificate_identity_names_one_consumer() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let registry = registry(&database, 100).await?;
    let ca = "c".repeat(64);
    let credential = |name: &str, consumer: &Resource, ca: &str| -> Resource {
        pb::Credential {
            meta: Some(pb::Meta {
                id: derived_id(ResourceKind::Credential, "default", name),
                group: "default".into(),
                name: name.into(),
                ..Default::default()
            }),
            consumer_id: consumer.id().to_owned(),
            kind: Some(pb::credential::Kind::Mtls(pb::MtlsCredential {
                subject: "CN=svc".into(),
                fingerprint_sha256: String::new(),
                ca_sha256: ca.into(),
            })),
            expires_at: None,
            revoked: false,
        }
        .into()
    };
    let put = |resource: Resource| Write::Put {
        resource,
        if_match: None,
    };
    let (first, second) = (consumer("first"), consumer("second"));
    registry
        .commit(
            "t",
            "first",
            vec![
                put(first.clone()),
                put(second.clone()),
                put(credential("first-cert", &first, &ca)),
            ],
        )
        .await?;
    // The same subject under the same CA for another consumer: refused by the registry...
    match registry
        .commit("t", "twin", vec![put(credential("twin", &second, &ca))])
        .await
    {
        Err(RegistryError::Conflict(message)) => {
            assert!(message.contains("client certificate"), "{message}")
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    // ...but under another CA, or under any CA, it names another consumer.
    registry
        .commit(
            "t",
            "other CA",
            vec![
                put(credential("other-ca", &second, &"d".repeat(64))),
                put(credential("any-ca", &second, "")),
            ],
        )
        .await?;
    // A document holding both twins is refused by the validator, naming the first.
    let mut document = registry.state(Some("default")).await?.1;
    let Some(pb::resource::Kind::Credential(twin)) = credential("twin", &second, &ca).kind else {
        unreachable!()
    };
    document.credentials.push(twin);
    let errors = sluice_proto::validate::config_set(&document).unwrap_err();
    assert!(
        errors.0.iter().any(|e| e
            .reason
            .contains("the same certificate (or subject under the same CA)")),
        "{errors}"
    );
    Ok(())
}
