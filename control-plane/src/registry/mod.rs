//! The registry: every resource in Postgres, every change a version.
//!
//! All writes go through [`Registry::commit`], one transaction that locks the head of the
//! history (so commits are serialised: version numbers are contiguous and no update is lost),
//! checks `If-Match`, validates the written resources against the resources they refer to
//! with the same rules as the data planes (and against what refers to them, see
//! `dependents`), writes the rows, the change log and the new version,
//! and notifies the other control-plane replicas.

mod dependents;
pub mod hash;
pub mod rows;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sluice_proto::pb::{ConfigSet, Resource, ResourceKind};
use sluice_proto::{ConfigErrors, validate};
use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

pub use hash::StateHash;
use rows::{FetchError, KINDS, kind_name, table};

/// Versions kept when nothing else is configured.
pub const DEFAULT_RETENTION: u64 = 1000;

/// Postgres channel on which each commit announces its version number.
pub const NOTIFY_CHANNEL: &str = "sluice_versions";

/// The registry in Postgres.
#[derive(Debug, Clone)]
pub struct Registry {
    pool: PgPool,
    retention: u64,
}

/// What a commit is asked to do. Apply and rollback are worked out after the head of the
/// history is locked, so a concurrent commit cannot make them act on a stale state.
#[derive(Debug, Clone)]
pub enum Plan {
    /// These writes.
    Writes(Vec<Write>),
    /// Make the registry equal this whole configuration: create and update what it has,
    /// delete what it lacks.
    Apply(ConfigSet),
    /// Restore the state of this version.
    RollbackTo(u64),
    /// Create and update what this configuration has (matched by name as for `Apply`),
    /// leaving everything else as it is.
    Merge(ConfigSet),
}

/// One change requested of a commit.
// Nearly every write of a large commit is a `Put`, so boxing its resource would save no
// memory, only add an allocation per write.
impl Write {
    /// An `if_match` that asks only that the resource exist, at any version: an update
    /// without `If-Match` (checked under the commit's lock, so that an update racing a delete
    /// does not bring the resource back).
    pub const EXISTING: u64 = u64::MAX;
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Write {
    /// Create or replace a resource (by its meta id).
    Put {
        resource: Resource,
        if_match: Option<u64>,
    },
    Delete {
        kind: ResourceKind,
        id: String,
        if_match: Option<u64>,
    },
}

/// One resource's change in a version.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub kind: ResourceKind,
    pub id: String,
    pub group: String,
    pub name: String,
    pub before: Option<Resource>,
    pub after: Option<Resource>,
}

/// A committed version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VersionInfo {
    pub number: u64,
    pub content_hash: String,
    pub actor: String,
    pub message: String,
    pub created_at: DateTime<Utc>,
    pub change_count: u32,
}

/// What a commit did.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The new version; `None` when the writes changed nothing.
    pub version: Option<VersionInfo>,
    /// For each write, the resource as stored (`None` for a delete).
    pub resources: Vec<Option<Resource>>,
    pub changes: Vec<Change>,
}

/// Why a registry operation failed. Each maps to one status (see `api::error`).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no {kind} {key}")]
    NotFound { kind: &'static str, key: String },
    #[error("{kind} {id} is at resource version {actual}, not {expected}")]
    PreconditionFailed {
        kind: &'static str,
        id: String,
        expected: u64,
        actual: u64,
    },
    #[error("{0}")]
    Invalid(ConfigErrors),
    #[error("{0}")]
    Conflict(String),
    /// A delete of something other resources still refer to.
    #[error("{0}")]
    StillReferenced(String),
    #[error("no version {0}")]
    VersionNotFound(u64),
    #[error(
        "version {requested} is no longer retained; the oldest version that can be restored is {oldest}"
    )]
    VersionNotRetained { requested: u64, oldest: u64 },
    /// The database did not answer in time (no connection within the pool's timeout, or a
    /// statement or lock wait ended by the statement timeout): retrying may succeed.
    #[error("{0}")]
    Unavailable(String),
    #[error("registry database error: {0}")]
    Database(sqlx::Error),
    #[error("{0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for RegistryError {
    fn from(e: sqlx::Error) -> Self {
        Self::from_db(e)
    }
}

impl From<FetchError> for RegistryError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Database(e) => Self::from_db(e),
            FetchError::Corrupt(e) => Self::Corrupt(e),
        }
    }
}

impl RegistryError {
    fn invalid(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid(ConfigErrors::single(path, reason))
    }

    /// Turns constraint violations into conflicts a person can act on.
    pub fn from_db(e: sqlx::Error) -> Self {
        let Some(db) = e.as_database_error() else {
            return match e {
                sqlx::Error::PoolTimedOut => Self::Unavailable(
                    "the registry database gave no connection in time; try again".into(),
                ),
                e => Self::Database(e),
            };
        };
        let constraint = db.constraint().unwrap_or_default().to_owned();
        match db.code().as_deref() {
            Some("23505") => Self::Conflict(match constraint.as_str() {
                c if c.ends_with("_grp_name_key") => {
                    format!(
                        "{} with this name already exists in its group",
                        with_article(singular(c))
                    )
                }
                "credentials_grp_api_key_sha256_key" => {
                    "this API key is already used in the group".into()
                }
                "credentials_grp_jwt_issuer_jwt_subject_key" => {
                    "this JWT issuer and subject already name a consumer in the group".into()
                }
                "credentials_grp_mtls_identity_key" => "this client certificate (its \
                     fingerprint, or its subject under the same CA) already names a consumer \
                     in the group"
                    .into(),
                "subscriptions_consumer_id_api_id_key" => {
                    "the consumer is already subscribed to this API".into()
                }
                _ => format!("conflicts with an existing resource ({constraint})"),
            }),
            Some("23503") => Self::Conflict(format!(
                "refers to a resource that does not exist or is still referenced ({constraint})"
            )),
            Some("23514") => {
                Self::Conflict(format!("violates a registry constraint ({constraint})"))
            }
            // The statement timeout (57014) or the lock timeout (55P03) ended the statement:
            // the registry is busy or stuck, not the request wrong.
            // 25P03: the session sat idle in a transaction past its limit and was ended.
            Some("57014" | "55P03" | "25P03") => Self::Unavailable(format!(
                "the registry database did not finish in time ({}); nothing was committed; try again",
                db.message()
            )),
            // A text value Postgres cannot store (the NUL character): the client's to fix.
            Some("22021") => Self::Invalid(ConfigErrors(vec![sluice_proto::FieldError {
                path: String::new(),
                reason: "a text value holds the NUL character, which cannot be stored".into(),
                resource: None,
            }])),
            _ => Self::Database(e),
        }
    }
}

/// "api" → "an api", "upstream" → "an upstream", "plan" → "a plan".
fn with_article(noun: &str) -> String {
    let article = if noun.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {noun}")
}

/// "apis_grp_name_key" → "api".
fn singular(constraint: &str) -> &'static str {
    let table_name = constraint.split("_grp_").next().unwrap_or_default();
    KINDS
        .into_iter()
        .find(|k| table(*k) == table_name)
        .map_or("resource", kind_name)
}

/// Filters of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub group: Option<String>,
    /// Credentials and subscriptions of this consumer.
    pub consumer_id: Option<Uuid>,
    /// Subscriptions to this API.
    pub api_id: Option<Uuid>,
    /// Subscriptions under this plan.
    pub plan_id: Option<Uuid>,
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<Resource>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<Uuid>,
}

/// Largest page a listing returns.
pub const MAX_PAGE: u32 = 1000;

/// Whether resources of `kind` can be listed by `column` (`consumer_id`, `api_id`,
/// `plan_id`): credentials by consumer, subscriptions by any of the three.
pub fn can_filter(kind: ResourceKind, column: &str) -> bool {
    match kind {
        ResourceKind::Credential => column == "consumer_id",
        ResourceKind::Subscription => matches!(column, "consumer_id" | "api_id" | "plan_id"),
        _ => false,
    }
}

impl Registry {
    pub fn new(pool: PgPool, retention: u64) -> Self {
        Self {
            pool,
            retention: retention.max(1),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn retention(&self) -> u64 {
        self.retention
    }

    /// Applies `writes` as one version. Writes that change nothing are skipped; when none
    /// changes anything, no version is made.
    pub async fn commit(
        &self,
        actor: &str,
        message: &str,
        writes: Vec<Write>,
    ) -> Result<Committed, RegistryError> {
        self.commit_plan(actor, message, Plan::Writes(writes), false)
            .await
    }

    /// Commits a plan as one version; with `dry_run`, does everything (validation included)
    /// but the commit, and reports the changes it would make.
    pub async fn commit_plan(
        &self,
        actor: &str,
        message: &str,
        plan: Plan,
        dry_run: bool,
    ) -> Result<Committed, RegistryError> {
        let mut tx = self.pool.begin().await.map_err(RegistryError::from_db)?;
        let head = sqlx::query("SELECT version, state_hash FROM registry_head FOR UPDATE")
            .fetch_one(&mut *tx)
            .await
            .map_err(RegistryError::from_db)?;
        let head_version = u64::try_from(head.get::<i64, _>("version")).unwrap_or(0);
        let mut state_hash = StateHash::from_bytes(head.get::<&[u8], _>("state_hash"));

        let writes = match plan {
            Plan::Writes(writes) => writes,
            Plan::Apply(desired) => crate::versions::apply_writes(&mut tx, desired, true).await?,
            Plan::Merge(desired) => crate::versions::apply_writes(&mut tx, desired, false).await?,
            Plan::RollbackTo(number) => {
                crate::versions::rollback_writes(&mut tx, number, head_version).await?
            }
        };
        let writes = canonical_writes(writes)?;
        let current = lock_current(&mut tx, &writes).await?;
        let (changes, resources) = plan_changes(&current, writes, head_version + 1)?;
        if dry_run && !changes.is_empty() {
            // Validation and every constraint run as for real; then nothing is kept.
            validate_in_context(&mut tx, &changes).await?;
            dependents::check(&mut tx, &changes).await?;
            write_rows(&mut tx, &changes).await?;
            check_still_referenced(&mut tx, &changes).await?;
            sqlx::query("SET CONSTRAINTS ALL IMMEDIATE")
                .execute(&mut *tx)
                .await
                .map_err(RegistryError::from_db)?;
        }
        if changes.is_empty() || dry_run {
            tx.rollback().await.map_err(RegistryError::from_db)?;
            return Ok(Committed {
                version: None,
                resources,
                changes,
            });
        }
        validate_in_context(&mut tx, &changes).await?;
        dependents::check(&mut tx, &changes).await?;
        write_rows(&mut tx, &changes).await?;
        check_still_referenced(&mut tx, &changes).await?;

        for change in &changes {
            if let Some(before) = &change.before {
                state_hash.remove(before);
            }
            if let Some(after) = &change.after {
                state_hash.add(after);
            }
        }
        let number = head_version + 1;
        let info = VersionInfo {
            number,
            content_hash: state_hash.hex(),
            actor: actor.to_owned(),
            message: message.to_owned(),
            created_at: Utc::now(),
            change_count: u32::try_from(changes.len()).unwrap_or(u32::MAX),
        };
        record_version(&mut tx, &info, &changes, &state_hash, self.retention).await?;
        tx.commit().await.map_err(RegistryError::from_db)?;
        Ok(Committed {
            version: Some(info),
            resources,
            changes,
        })
    }

    /// A resource by id.
    pub async fn get(&self, kind: ResourceKind, id: &str) -> Result<Resource, RegistryError> {
        let not_found = || RegistryError::NotFound {
            kind: kind_name(kind),
            key: id.to_owned(),
        };
        let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
        let mut conn = self.pool.acquire().await.map_err(RegistryError::from_db)?;
        rows::fetch_by_ids(&mut conn, kind, &[uuid], false)
            .await?
            .pop()
            .ok_or_else(not_found)
    }

    /// A resource by group and name.
    pub async fn find(
        &self,
        kind: ResourceKind,
        group: &str,
        name: &str,
    ) -> Result<Resource, RegistryError> {
        let row = sqlx::query(&format!(
            "SELECT body FROM {} WHERE grp = $1 AND name = $2",
            table(kind)
        ))
        .bind(group)
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(RegistryError::from_db)?
        .ok_or_else(|| RegistryError::NotFound {
            kind: kind_name(kind),
            key: format!("named {name:?} in group {group:?}"),
        })?;
        rows::decode(kind, row.get::<&[u8], _>("body")).map_err(RegistryError::from)
    }

    /// Resources of one kind, in id order, `limit` at a time after `after`. A filter the kind
    /// does not have ([`can_filter`]) is refused.
    pub async fn list(
        &self,
        kind: ResourceKind,
        filter: &ListFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Page, RegistryError> {
        let has = |column: &str| can_filter(kind, column);
        // Every query binds the same six parameters; a filter a kind does not have is
        // refused above, so its condition only checks that it is unset.
        let mut conditions = vec![
            "($1::text IS NULL OR grp = $1)".to_owned(),
            "($2::uuid IS NULL OR id > $2)".to_owned(),
        ];
        for (n, (column, value)) in [
            ("consumer_id", filter.consumer_id),
            ("api_id", filter.api_id),
            ("plan_id", filter.plan_id),
        ]
        .into_iter()
        .enumerate()
        {
            let placeholder = n + 3;
            if has(column) {
                conditions.push(format!(
                    "(${placeholder}::uuid IS NULL OR {column} = ${placeholder})"
                ));
            } else if value.is_some() {
                let filter_name = column.trim_end_matches("_id");
                return Err(RegistryError::invalid(
                    filter_name,
                    format!("{} cannot be filtered by {filter_name}", table(kind)),
                ));
            } else {
                conditions.push(format!("${placeholder}::uuid IS NULL"));
            }
        }
        let limit = limit.clamp(1, MAX_PAGE);
        let sql = format!(
            "SELECT id, body FROM {} WHERE {} ORDER BY id LIMIT $6",
            table(kind),
            conditions.join(" AND ")
        );
        let rows = sqlx::query(&sql)
            .bind(filter.group.as_deref())
            .bind(after)
            .bind(filter.consumer_id)
            .bind(filter.api_id)
            .bind(filter.plan_id)
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(RegistryError::from_db)?;
        let more = rows.len() > limit as usize;
        let mut items = Vec::with_capacity(rows.len().min(limit as usize));
        let mut last = None;
        for row in rows.iter().take(limit as usize) {
            last = Some(row.get::<Uuid, _>("id"));
            items.push(
                rows::decode(kind, row.get::<&[u8], _>("body")).map_err(RegistryError::from)?,
            );
        }
        Ok(Page {
            items,
            next: if more { last } else { None },
        })
    }

    /// The whole current state (of one group, or of all), with the version it is at, read in
    /// one consistent snapshot.
    pub async fn state(&self, group: Option<&str>) -> Result<(u64, ConfigSet), RegistryError> {
        let (mut tx, version) = self.read_snapshot().await?;
        let mut set = ConfigSet::default();
        for kind in KINDS {
            for resource in rows::fetch_all(&mut tx, kind, group).await? {
                set.push(resource);
            }
        }
        tx.commit().await.map_err(RegistryError::from_db)?;
        Ok((version, set))
    }

    /// A read-only transaction that sees one consistent state, and the version of that state.
    pub(crate) async fn read_snapshot(
        &self,
    ) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, u64), RegistryError> {
        let mut tx = self.pool.begin().await.map_err(RegistryError::from_db)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(RegistryError::from_db)?;
        let version: i64 = sqlx::query_scalar("SELECT version FROM registry_head")
            .fetch_one(&mut *tx)
            .await
            .map_err(RegistryError::from_db)?;
        Ok((tx, u64::try_from(version).unwrap_or(0)))
    }

    /// The current version number and state hash.
    pub async fn head(&self) -> Result<(u64, StateHash), RegistryError> {
        let row = sqlx::query("SELECT version, state_hash FROM registry_head")
            .fetch_one(&self.pool)
            .await
            .map_err(RegistryError::from_db)?;
        Ok((
            u64::try_from(row.get::<i64, _>("version")).unwrap_or(0),
            StateHash::from_bytes(row.get::<&[u8], _>("state_hash")),
        ))
    }
}

pub(crate) fn parse_id(kind: ResourceKind, id: &str) -> Result<Uuid, RegistryError> {
    Uuid::parse_str(id).map_err(|_| {
        RegistryError::invalid("id", format!("{id:?} is not a UUID ({})", kind_name(kind)))
    })
}

/// Ids are compared as text from here on, so each must be in its one canonical spelling: a
/// resource written under another spelling is refused (it would otherwise not find, and so
/// overwrite, the resource it names); a delete may name it any way.
fn canonical_writes(writes: Vec<Write>) -> Result<Vec<Write>, RegistryError> {
    writes
        .into_iter()
        .map(|write| match write {
            Write::Put { resource, if_match } => {
                if resource.kind() == ResourceKind::Unspecified {
                    return Err(RegistryError::invalid("kind", "the resource has no kind"));
                }
                validate::check_id(resource.id())
                    .map_err(|reason| RegistryError::invalid("id", reason))?;
                Ok(Write::Put { resource, if_match })
            }
            Write::Delete { kind, id, if_match } => {
                let id = parse_id(kind, &id)?.hyphenated().to_string();
                Ok(Write::Delete { kind, id, if_match })
            }
        })
        .collect()
}

/// Locks and reads the current rows of every resource the writes touch.
async fn lock_current(
    conn: &mut PgConnection,
    writes: &[Write],
) -> Result<HashMap<String, Resource>, RegistryError> {
    let mut ids: HashMap<ResourceKind, Vec<Uuid>> = HashMap::new();
    for write in writes {
        let (kind, id) = match write {
            Write::Put { resource, .. } => (resource.kind(), resource.id()),
            Write::Delete { kind, id, .. } => (*kind, id.as_str()),
        };
        if kind == ResourceKind::Unspecified {
            return Err(RegistryError::invalid("kind", "the resource has no kind"));
        }
        ids.entry(kind).or_default().push(parse_id(kind, id)?);
    }
    let mut current = HashMap::new();
    for (kind, ids) in ids {
        for resource in rows::fetch_by_ids(conn, kind, &ids, true).await? {
            current.insert(resource.id().to_owned(), resource);
        }
    }
    Ok(current)
}

/// Turns writes into changes against the current rows: `If-Match`, immutable groups, new
/// resource versions; writes that change nothing are dropped.
fn plan_changes(
    current: &HashMap<String, Resource>,
    writes: Vec<Write>,
    version: u64,
) -> Result<(Vec<Change>, Vec<Option<Resource>>), RegistryError> {
    let mut changes = Vec::new();
    let mut resources = Vec::with_capacity(writes.len());
    let mut seen = HashSet::new();
    for write in writes {
        match write {
            Write::Put {
                mut resource,
                if_match,
            } => {
                let kind = resource.kind();
                let id = resource.id().to_owned();
                if !seen.insert(id.clone()) {
                    return Err(RegistryError::invalid(
                        "id",
                        format!("{id} is written twice in one commit"),
                    ));
                }
                let before = current.get(&id);
                check_if_match(kind, &id, if_match, before)?;
                if let Some(before) = before {
                    if before.kind() != kind {
                        return Err(RegistryError::Conflict(format!(
                            "id {id} belongs to another kind of resource"
                        )));
                    }
                    let old_group = before.meta().map(|m| m.group.as_str()).unwrap_or_default();
                    let new_group = resource
                        .meta()
                        .map(|m| m.group.as_str())
                        .unwrap_or_default();
                    if old_group != new_group {
                        return Err(RegistryError::invalid(
                            "group",
                            format!(
                                "cannot change from {old_group:?} to {new_group:?}; delete the resource and create it in the new group"
                            ),
                        ));
                    }
                }
                let before_version = before
                    .and_then(Resource::meta)
                    .map_or(0, |m| m.resource_version);
                if let Some(meta) = resource.meta_mut() {
                    meta.resource_version = before_version;
                }
                if before == Some(&resource) {
                    resources.push(Some(resource));
                    continue;
                }
                let meta = resource
                    .meta_mut()
                    .expect("a resource with an id has a meta");
                // The number of the version that writes it: it grows with every write, and a
                // resource deleted and created again never takes a number its earlier self
                // had, so an ETag read before the delete cannot match it.
                meta.resource_version = version;
                let (group, name) = (meta.group.clone(), meta.name.clone());
                resources.push(Some(resource.clone()));
                changes.push(Change {
                    kind,
                    id,
                    group,
                    name,
                    before: before.cloned(),
                    after: Some(resource),
                });
            }
            Write::Delete { kind, id, if_match } => {
                if !seen.insert(id.clone()) {
                    return Err(RegistryError::invalid(
                        "id",
                        format!("{id} is written twice in one commit"),
                    ));
                }
                let before = current.get(&id).ok_or_else(|| RegistryError::NotFound {
                    kind: kind_name(kind),
                    key: id.clone(),
                })?;
                check_if_match(kind, &id, if_match, Some(before))?;
                let meta = before.meta().cloned().unwrap_or_default();
                resources.push(None);
                changes.push(Change {
                    kind,
                    id,
                    group: meta.group,
                    name: meta.name,
                    before: Some(before.clone()),
                    after: None,
                });
            }
        }
    }
    Ok((changes, resources))
}

fn check_if_match(
    kind: ResourceKind,
    id: &str,
    if_match: Option<u64>,
    before: Option<&Resource>,
) -> Result<(), RegistryError> {
    let Some(expected) = if_match else {
        return Ok(());
    };
    if expected == Write::EXISTING {
        return match before {
            Some(_) => Ok(()),
            None => Err(RegistryError::NotFound {
                kind: kind_name(kind),
                key: id.to_owned(),
            }),
        };
    }
    let actual = before
        .and_then(Resource::meta)
        .map_or(0, |m| m.resource_version);
    if actual == expected {
        Ok(())
    } else {
        Err(RegistryError::PreconditionFailed {
            kind: kind_name(kind),
            id: id.to_owned(),
            expected,
            actual,
        })
    }
}

/// Validates the written resources with the shared rules, together with the resources they
/// refer to (as they will be after this commit).
async fn validate_in_context(
    conn: &mut PgConnection,
    changes: &[Change],
) -> Result<(), RegistryError> {
    let deleted: HashSet<&str> = changes
        .iter()
        .filter(|c| c.after.is_none())
        .map(|c| c.id.as_str())
        .collect();
    let written: HashSet<&str> = changes.iter().map(|c| c.id.as_str()).collect();
    let mut context: ConfigSet = changes.iter().filter_map(|c| c.after.clone()).collect();
    if context.is_empty() {
        return Ok(());
    }
    let mut wanted: HashMap<ResourceKind, Vec<Uuid>> = HashMap::new();
    for resource in changes.iter().filter_map(|c| c.after.as_ref()) {
        for (kind, id) in resource.references() {
            if !written.contains(id)
                && !deleted.contains(id)
                && let Ok(uuid) = Uuid::parse_str(id)
            {
                wanted.entry(kind).or_default().push(uuid);
            }
        }
    }
    for (kind, mut ids) in wanted {
        ids.sort_unstable();
        ids.dedup();
        for resource in rows::fetch_by_ids(conn, kind, &ids, false).await? {
            context.push(resource);
        }
    }
    // Only the written resources are judged: the others were valid when they were written,
    // and the paths of the written ones are their positions in the context lists.
    let upserted: HashSet<&str> = changes
        .iter()
        .filter(|c| c.after.is_some())
        .map(|c| c.id.as_str())
        .collect();
    validate::config_set_judging(&context, &validate::ByPosition, |r| {
        upserted.contains(r.id.as_str())
    })
    .map_err(RegistryError::Invalid)
}

/// Keeps `resource_ids`: every id in use, of any kind (route ids included), so that one id
/// never names two things. A new id already in use is refused, naming what holds it.
async fn claim_ids(conn: &mut PgConnection, changes: &[Change]) -> Result<(), RegistryError> {
    use sluice_proto::pb::resource::Kind;
    let mut released: Vec<Uuid> = Vec::new();
    let mut owners_replaced: Vec<Uuid> = Vec::new();
    let (mut ids, mut kinds, mut owners): (Vec<Uuid>, Vec<&str>, Vec<Option<Uuid>>) =
        (Vec::new(), Vec::new(), Vec::new());
    for change in changes {
        let id = parse_id(change.kind, &change.id)?;
        match (&change.before, &change.after) {
            (_, None) => {
                released.push(id);
                owners_replaced.push(id);
            }
            (before, Some(after)) => {
                if before.is_none() {
                    ids.push(id);
                    kinds.push(kind_name(change.kind));
                    owners.push(None);
                }
                if let Some(Kind::Api(api)) = &after.kind {
                    owners_replaced.push(id);
                    for route in &api.routes {
                        ids.push(parse_id(change.kind, &route.id)?);
                        kinds.push("route");
                        owners.push(Some(id));
                    }
                }
            }
        }
    }
    sqlx::query("DELETE FROM resource_ids WHERE id = ANY($1) OR owner = ANY($2)")
        .bind(&released)
        .bind(&owners_replaced)
        .execute(&mut *conn)
        .await
        .map_err(RegistryError::from_db)?;
    let mut unique = HashSet::new();
    if let Some(twice) = ids.iter().find(|id| !unique.insert(**id)) {
        return Err(RegistryError::invalid(
            "id",
            format!("{twice} is used twice in this write"),
        ));
    }
    let taken = sqlx::query("SELECT id, kind FROM resource_ids WHERE id = ANY($1) LIMIT 5")
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await
        .map_err(RegistryError::from_db)?;
    if !taken.is_empty() {
        let described: Vec<String> = taken
            .iter()
            .map(|row| {
                format!(
                    "{} is already the id of {}",
                    row.get::<Uuid, _>("id"),
                    with_article(&row.get::<String, _>("kind"))
                )
            })
            .collect();
        return Err(RegistryError::Conflict(format!(
            "{}; an id names one thing, of any kind",
            described.join("; ")
        )));
    }
    sqlx::query("INSERT INTO resource_ids (id, kind, owner) SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[])")
        .bind(&ids)
        .bind(&kinds)
        .bind(&owners)
        .execute(&mut *conn)
        .await
        .map_err(RegistryError::from_db)?;
    Ok(())
}

/// Writes the rows and the reference index.
async fn write_rows(conn: &mut PgConnection, changes: &[Change]) -> Result<(), RegistryError> {
    claim_ids(conn, changes).await?;
    let mut puts: HashMap<ResourceKind, Vec<rows::RowValues>> = HashMap::new();
    let mut deletes: HashMap<ResourceKind, Vec<Uuid>> = HashMap::new();
    let (mut ref_from, mut ref_to, mut ref_kind) = (Vec::new(), Vec::new(), Vec::new());
    let mut written = Vec::with_capacity(changes.len());
    for change in changes {
        let id = parse_id(change.kind, &change.id)?;
        written.push(id);
        match &change.after {
            Some(after) => {
                puts.entry(change.kind)
                    .or_default()
                    .push(rows::to_row(after).map_err(|e| RegistryError::invalid("", e.0))?);
                for (kind, to) in after.references() {
                    if let Ok(to) = Uuid::parse_str(to) {
                        ref_from.push(id);
                        ref_to.push(to);
                        ref_kind.push(kind_name(kind));
                    }
                }
            }
            None => deletes.entry(change.kind).or_default().push(id),
        }
    }
    for kind in KINDS {
        if let Some(ids) = deletes.get(&kind) {
            rows::delete(conn, kind, ids)
                .await
                .map_err(RegistryError::from_db)?;
        }
        if let Some(rows) = puts.get(&kind) {
            rows::upsert(conn, kind, rows)
                .await
                .map_err(RegistryError::from_db)?;
        }
    }
    sqlx::query("DELETE FROM resource_refs WHERE from_id = ANY($1)")
        .bind(&written)
        .execute(&mut *conn)
        .await
        .map_err(RegistryError::from_db)?;
    sqlx::query("INSERT INTO resource_refs (from_id, to_id, to_kind) SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[])")
        .bind(&ref_from)
        .bind(&ref_to)
        .bind(&ref_kind)
        .execute(&mut *conn)
        .await
        .map_err(RegistryError::from_db)?;
    Ok(())
}

/// Refuses to delete a resource that something still refers to, naming who.
async fn check_still_referenced(
    conn: &mut PgConnection,
    changes: &[Change],
) -> Result<(), RegistryError> {
    let deleted: Vec<Uuid> = changes
        .iter()
        .filter(|c| c.after.is_none())
        .filter_map(|c| Uuid::parse_str(&c.id).ok())
        .collect();
    if deleted.is_empty() {
        return Ok(());
    }
    let rows =
        sqlx::query("SELECT from_id, to_id FROM resource_refs WHERE to_id = ANY($1) LIMIT 5")
            .bind(&deleted)
            .fetch_all(&mut *conn)
            .await
            .map_err(RegistryError::from_db)?;
    if rows.is_empty() {
        return Ok(());
    }
    let names: HashMap<String, (&str, &str)> = changes
        .iter()
        .map(|c| (c.id.clone(), (kind_name(c.kind), c.name.as_str())))
        .collect();
    let described: Vec<String> = rows
        .iter()
        .map(|row| {
            let to = row.get::<Uuid, _>("to_id").to_string();
            let from = row.get::<Uuid, _>("from_id");
            let (kind, name) = names.get(&to).copied().unwrap_or(("resource", ""));
            format!("{kind} {name:?} ({to}) is still referenced by {from}")
        })
        .collect();
    Err(RegistryError::StillReferenced(format!(
        "cannot delete: {}; remove the references first",
        described.join("; ")
    )))
}

/// The most versions one commit prunes.
const PRUNED_PER_COMMIT: i64 = 16;

/// Appends the version, its change log and the new head; prunes versions past retention;
/// notifies listeners.
async fn record_version(
    conn: &mut PgConnection,
    info: &VersionInfo,
    changes: &[Change],
    state_hash: &StateHash,
    retention: u64,
) -> Result<(), RegistryError> {
    let number = i64::try_from(info.number).unwrap_or(i64::MAX);
    sqlx::query("INSERT INTO versions (number, content_hash, actor, message, created_at, change_count) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(number)
        .bind(&info.content_hash)
        .bind(&info.actor)
        .bind(&info.message)
        .bind(info.created_at)
        .bind(i32::try_from(info.change_count).unwrap_or(i32::MAX))
        .execute(&mut *conn)
        .await
        .map_err(RegistryError::from_db)?;
    for (batch_index, batch) in changes.chunks(5_000).enumerate() {
        let offset = i32::try_from(batch_index * 5_000).unwrap_or(i32::MAX);
        let seqs: Vec<i32> = (0..batch.len())
            .map(|i| offset + i32::try_from(i).unwrap_or(0))
            .collect();
        let kinds: Vec<&str> = batch.iter().map(|c| kind_name(c.kind)).collect();
        let ids: Vec<Uuid> = batch
            .iter()
            .filter_map(|c| Uuid::parse_str(&c.id).ok())
            .collect();
        let groups: Vec<&str> = batch.iter().map(|c| c.group.as_str()).collect();
        let names: Vec<&str> = batch.iter().map(|c| c.name.as_str()).collect();
        let befores: Vec<Option<Vec<u8>>> = batch
            .iter()
            .map(|c| c.before.as_ref().map(rows::body))
            .collect();
        let afters: Vec<Option<Vec<u8>>> = batch
            .iter()
            .map(|c| c.after.as_ref().map(rows::body))
            .collect();
        sqlx::query(
            "INSERT INTO changes (version, seq, kind, resource_id, grp, name, before, after) \
             SELECT $1, * FROM UNNEST($2::int4[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::bytea[], $8::bytea[])",
        )
        .bind(number)
        .bind(seqs)
        .bind(kinds)
        .bind(ids)
        .bind(groups)
        .bind(names)
        .bind(befores)
        .bind(afters)
        .execute(&mut *conn)
        .await
        .map_err(RegistryError::from_db)?;
    }
    sqlx::query("UPDATE registry_head SET version = $1, state_hash = $2")
        .bind(number)
        .bind(&state_hash.0[..])
        .execute(&mut *conn)
        .await
        .map_err(RegistryError::from_db)?;
    // A few of the oldest at a time: one a commit once retention is reached, and a backlog
    // (retention lowered, say) drains over the next commits instead of holding the head
    // lock through the whole of it in one. What is not pruned yet stays restorable.
    let oldest_kept = number - i64::try_from(retention).unwrap_or(i64::MAX) + 1;
    sqlx::query(
        "DELETE FROM versions WHERE number IN \
         (SELECT number FROM versions WHERE number < $1 ORDER BY number LIMIT $2)",
    )
    .bind(oldest_kept)
    .bind(PRUNED_PER_COMMIT)
    .execute(&mut *conn)
    .await
    .map_err(RegistryError::from_db)?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(info.number.to_string())
        .execute(&mut *conn)
        .await
        .map_err(RegistryError::from_db)?;
    Ok(())
}
