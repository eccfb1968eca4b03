//! The history: versions, the state at any retained version, diffs between versions,
//! and what a rollback or an apply must write.
//!
//! The change log keeps, for every change, the resource before and after it. The state at
//! version N is the current state with every resource touched after N put back as it was
//! before its first change after N; so reading or restoring N costs the changes since N, not
//! the size of the registry.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use serde_json::Value;
use sluice_proto::declarative::export::export_resource;
use sluice_proto::declarative::normalize::{derived_id, derived_route_id};
use sluice_proto::pb::{ConfigSet, Resource, ResourceKind};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::registry::rows::{self, KINDS, kind_from_name, kind_name, table};
use crate::registry::{Change, Registry, RegistryError, VersionInfo, Write};

/// One resource's difference between two versions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResourceDiff {
    pub op: Op,
    pub kind: &'static str,
    pub id: String,
    pub group: String,
    pub name: String,
    /// For `changed`: each field that differs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldDiff>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Added,
    Changed,
    Removed,
}

/// A field that differs, with its path in the document's vocabulary (`targets[0].url`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldDiff {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

/// The differences between two states of the same resources, in kind and id order.
pub fn diff_resources(pairs: Vec<(Option<Resource>, Option<Resource>)>) -> Vec<ResourceDiff> {
    let mut out = Vec::new();
    for (before, after) in pairs {
        let (op, fields) = match (&before, &after) {
            (None, Some(_)) => (Op::Added, Vec::new()),
            (Some(_), None) => (Op::Removed, Vec::new()),
            (Some(b), Some(a)) => {
                let mut fields = Vec::new();
                field_diffs(
                    &content_json(b),
                    &content_json(a),
                    String::new(),
                    &mut fields,
                );
                if fields.is_empty() {
                    continue;
                }
                (Op::Changed, fields)
            }
            (None, None) => continue,
        };
        let resource = after
            .as_ref()
            .or(before.as_ref())
            .expect("one side is present");
        let meta = resource.meta().cloned().unwrap_or_default();
        out.push(ResourceDiff {
            op,
            kind: kind_name(resource.kind()),
            id: meta.id,
            group: meta.group,
            name: meta.name,
            fields,
        });
    }
    out.sort_by(|a, b| (a.kind, &a.id).cmp(&(b.kind, &b.id)));
    out
}

/// What a resource holds, as JSON, without its bookkeeping. Secrets (a certificate's private
/// key, an inline JWKS's shared secrets, a broker's passwords and client secrets) are replaced
/// by fingerprints: diffs are read by more people than keys should be, and a changed secret
/// still shows as a changed field.
fn content_json(resource: &Resource) -> Value {
    use sluice_proto::pb::{broker, jwt_issuer::Keys, policy, resource::Kind};
    let mut content = resource.clone();
    if let Some(meta) = content.meta_mut() {
        meta.resource_version = 0;
    }
    match &mut content.kind {
        Some(Kind::Certificate(certificate)) => {
            certificate.key_pem = redacted_key(&certificate.key_pem);
        }
        Some(Kind::Policy(sluice_proto::pb::Policy {
            kind: Some(policy::Kind::Jwt(jwt)),
            ..
        })) => {
            for issuer in &mut jwt.issuers {
                if let Some(Keys::JwksJson(json)) = &mut issuer.keys {
                    *json = redacted_shared_secrets(json);
                }
            }
        }
        Some(Kind::Broker(sluice_proto::pb::Broker {
            kind: Some(broker::Kind::Kafka(kafka)),
            ..
        })) => {
            for (name, value) in &mut kafka.properties {
                if name.contains("password") || name.contains("secret") {
                    *value = redacted_key(value);
                }
            }
        }
        _ => {}
    }
    export_resource(&content)
}

/// An inline JWKS with each `oct` key's `k` (a shared secret) replaced by its fingerprint.
fn redacted_shared_secrets(jwks: &str) -> String {
    let Ok(mut document) = serde_json::from_str::<Value>(jwks) else {
        return jwks.to_owned();
    };
    let keys = document.get_mut("keys").and_then(Value::as_array_mut);
    for key in keys.into_iter().flatten() {
        if key.get("kty").and_then(Value::as_str) == Some("oct")
            && let Some(secret) = key.get("k").and_then(Value::as_str)
        {
            key["k"] = Value::String(redacted_key(secret));
        }
    }
    document.to_string()
}

/// `(redacted; sha256 <first 16 hex digits>)`.
fn redacted_key(key_pem: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(key_pem.as_bytes()));
    format!("(redacted; sha256 {})", &digest[..16])
}

fn field_diffs(before: &Value, after: &Value, path: String, out: &mut Vec<FieldDiff>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let keys: std::collections::BTreeSet<&String> = b.keys().chain(a.keys()).collect();
            for key in keys {
                let sub = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (b.get(key), a.get(key)) {
                    (Some(bv), Some(av)) => field_diffs(bv, av, sub, out),
                    (bv, av) => out.push(FieldDiff {
                        path: sub,
                        before: bv.cloned(),
                        after: av.cloned(),
                    }),
                }
            }
        }
        (Value::Array(b), Value::Array(a)) if b.len() == a.len() => {
            for (i, (bv, av)) in b.iter().zip(a).enumerate() {
                field_diffs(bv, av, format!("{path}[{i}]"), out);
            }
        }
        _ if before != after => out.push(FieldDiff {
            path,
            before: Some(before.clone()),
            after: Some(after.clone()),
        }),
        _ => {}
    }
}

fn db(e: sqlx::Error) -> RegistryError {
    RegistryError::from_db(e)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn version_from_row(row: &sqlx::postgres::PgRow) -> VersionInfo {
    VersionInfo {
        number: to_u64(row.get("number")),
        content_hash: row.get("content_hash"),
        actor: row.get("actor"),
        message: row.get("message"),
        created_at: row.get("created_at"),
        change_count: u32::try_from(row.get::<i32, _>("change_count")).unwrap_or(0),
    }
}

/// Fails unless the state of `number` can be rebuilt: it must not be ahead of the head, and
/// every version after it must still be retained.
pub(crate) async fn check_restorable(
    conn: &mut PgConnection,
    number: u64,
    head: u64,
) -> Result<(), RegistryError> {
    if number > head {
        return Err(RegistryError::VersionNotFound(number));
    }
    if number == head {
        return Ok(());
    }
    let oldest: Option<i64> = sqlx::query_scalar("SELECT min(number) FROM versions")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    let oldest_restorable = oldest.map_or(head, |o| to_u64(o).saturating_sub(1));
    if number < oldest_restorable {
        return Err(RegistryError::VersionNotRetained {
            requested: number,
            oldest: oldest_restorable,
        });
    }
    Ok(())
}

/// For every resource changed after `number` (up to `until`), its state at `number`:
/// `(kind, id, before)`, `before` being `None` if it did not exist then.
async fn states_at(
    conn: &mut PgConnection,
    number: u64,
    until: u64,
) -> Result<Vec<(ResourceKind, String, Option<Resource>)>, RegistryError> {
    let rows = sqlx::query(
        "SELECT DISTINCT ON (resource_id) kind, resource_id, before FROM changes \
         WHERE version > $1 AND version <= $2 ORDER BY resource_id, version, seq",
    )
    .bind(to_i64(number))
    .bind(to_i64(until))
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    decode_change_rows(&rows, "before")
}

/// For every resource changed after `from` up to `number`, its state at `number`.
async fn states_after(
    conn: &mut PgConnection,
    from: u64,
    number: u64,
) -> Result<Vec<(ResourceKind, String, Option<Resource>)>, RegistryError> {
    let rows = sqlx::query(
        "SELECT DISTINCT ON (resource_id) kind, resource_id, after FROM changes \
         WHERE version > $1 AND version <= $2 ORDER BY resource_id, version DESC, seq DESC",
    )
    .bind(to_i64(from))
    .bind(to_i64(number))
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    decode_change_rows(&rows, "after")
}

fn decode_change_rows(
    rows: &[sqlx::postgres::PgRow],
    column: &str,
) -> Result<Vec<(ResourceKind, String, Option<Resource>)>, RegistryError> {
    rows.iter()
        .map(|row| {
            let kind_text: String = row.get("kind");
            let kind = kind_from_name(&kind_text).ok_or_else(|| {
                RegistryError::Corrupt(format!("change log has an unknown kind {kind_text:?}"))
            })?;
            let id = row.get::<Uuid, _>("resource_id").to_string();
            let body: Option<Vec<u8>> = row.get(column);
            let resource = body.map(|b| rows::decode(kind, &b)).transpose()?;
            Ok((kind, id, resource))
        })
        .collect()
}

/// The writes that restore the state of `number`.
pub(crate) async fn rollback_writes(
    conn: &mut PgConnection,
    number: u64,
    head: u64,
) -> Result<Vec<Write>, RegistryError> {
    check_restorable(conn, number, head).await?;
    let mut writes = Vec::new();
    let mut deletes = Vec::new();
    for (kind, id, before) in states_at(conn, number, head).await? {
        match before {
            Some(resource) => writes.push(Write::Put {
                resource,
                if_match: None,
            }),
            None => deletes.push((kind, id)),
        }
    }
    keep_credentials_ended(conn, &mut writes).await?;
    // A resource created after N and deleted since needs no delete.
    for (kind, id) in deletes {
        let exists: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE id = $1)",
            table(kind)
        ))
        .bind(Uuid::parse_str(&id).map_err(|_| RegistryError::Corrupt(format!("bad id {id}")))?)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        if exists {
            writes.push(Write::Delete {
                kind,
                id,
                if_match: None,
            });
        }
    }
    Ok(writes)
}

/// A rollback never gives a credential back a life it lost: one revoked now stays revoked,
/// and one that expires now keeps its expiry (or an earlier one) when the restored version
/// had none or a later one. A revocation or a rotation answers a leak; restoring routes or
/// plans must not undo it. A credential deleted since is restored as it was when it was
/// deleted: a key rotated out and then removed (or revoked with its consumer gone) comes back
/// expired or revoked, not as the live key it was at the restored version.
async fn keep_credentials_ended(
    conn: &mut PgConnection,
    writes: &mut [Write],
) -> Result<(), RegistryError> {
    use sluice_proto::pb::resource::Kind;
    let ids: Vec<Uuid> = writes
        .iter()
        .filter_map(|write| match write {
            Write::Put { resource, .. } if resource.kind() == ResourceKind::Credential => {
                Uuid::parse_str(resource.id()).ok()
            }
            _ => None,
        })
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let credential = |resource: Resource| match resource.kind {
        Some(Kind::Credential(c)) => Some((c.meta.as_ref()?.id.clone(), c)),
        _ => None,
    };
    let mut current: HashMap<String, sluice_proto::pb::Credential> =
        rows::fetch_by_ids(conn, ResourceKind::Credential, &ids, false)
            .await?
            .into_iter()
            .filter_map(credential)
            .collect();
    // Those deleted since: their last state, the one their deletion recorded.
    let deleted: Vec<Uuid> = ids
        .into_iter()
        .filter(|id| !current.contains_key(&id.to_string()))
        .collect();
    if !deleted.is_empty() {
        let rows = sqlx::query(
            "SELECT DISTINCT ON (resource_id) kind, resource_id, before FROM changes \
             WHERE kind = $1 AND resource_id = ANY($2) AND after IS NULL \
             ORDER BY resource_id, version DESC, seq DESC",
        )
        .bind(kind_name(ResourceKind::Credential))
        .bind(&deleted)
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        current.extend(
            decode_change_rows(&rows, "before")?
                .into_iter()
                .filter_map(|(_, _, before)| credential(before?)),
        );
    }
    for write in writes {
        let Write::Put { resource, .. } = write else {
            continue;
        };
        let Some(Kind::Credential(restored)) = &mut resource.kind else {
            continue;
        };
        let Some(now) = restored
            .meta
            .as_ref()
            .and_then(|meta| current.get(&meta.id))
        else {
            continue;
        };
        restored.revoked |= now.revoked;
        if let Some(ends) = &now.expires_at {
            let later =
                |t: &prost_types::Timestamp| (t.seconds, t.nanos) > (ends.seconds, ends.nanos);
            if restored.expires_at.as_ref().is_none_or(later) {
                restored.expires_at = Some(*ends);
            }
        }
    }
    Ok(())
}

/// The writes that make the registry equal `desired` (or, without `delete_missing`, hold
/// it). A resource of the document whose id
/// was derived from its name (the document gave none) takes the id of the registry's
/// resource of the same kind, group and name, so resources created through the API are
/// updated rather than clashing.
pub(crate) async fn apply_writes(
    conn: &mut PgConnection,
    desired: ConfigSet,
    delete_missing: bool,
) -> Result<Vec<Write>, RegistryError> {
    let mut existing: HashMap<(ResourceKind, String, String), String> = HashMap::new();
    let mut existing_ids: Vec<(ResourceKind, String)> = Vec::new();
    for kind in KINDS {
        let rows = sqlx::query(&format!("SELECT id, grp, name FROM {}", table(kind)))
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
        for row in rows {
            let id = row.get::<Uuid, _>("id").to_string();
            existing.insert((kind, row.get("grp"), row.get("name")), id.clone());
            existing_ids.push((kind, id));
        }
    }
    let mut resources = desired.into_resources();
    let holders: HashSet<String> = existing_ids.iter().map(|(_, id)| id.clone()).collect();
    let mut remap: HashMap<String, String> = HashMap::new();
    for resource in &resources {
        let kind = resource.kind();
        let Some(meta) = resource.meta() else {
            continue;
        };
        if meta.id != derived_id(kind, &meta.group, &meta.name) {
            continue;
        }
        match existing.get(&(kind, meta.group.clone(), meta.name.clone())) {
            // Adopt the id of the registry's resource of the same name.
            Some(id) if *id != meta.id => {
                remap.insert(meta.id.clone(), id.clone());
            }
            Some(_) => {}
            // A new resource whose derived id is held by a resource renamed since gets an id
            // of its own; the holder keeps its id.
            None if holders.contains(&meta.id) => {
                remap.insert(meta.id.clone(), Uuid::new_v4().to_string());
            }
            None => {}
        }
    }
    if !remap.is_empty() {
        for resource in &mut resources {
            remap_ids(resource, &remap);
        }
    }
    let keep: HashSet<String> = resources.iter().map(|r| r.id().to_owned()).collect();
    let mut writes: Vec<Write> = resources
        .into_iter()
        .map(|resource| Write::Put {
            resource,
            if_match: None,
        })
        .collect();
    if delete_missing {
        writes.extend(
            existing_ids
                .into_iter()
                .filter(|(_, id)| !keep.contains(id))
                .map(|(kind, id)| Write::Delete {
                    kind,
                    id,
                    if_match: None,
                }),
        );
    }
    Ok(writes)
}

/// Rewrites a resource's own id and its references through `remap`.
fn remap_ids(resource: &mut Resource, remap: &HashMap<String, String>) {
    use sluice_proto::pb::{resource::Kind, route::Action};
    let fix = |id: &mut String| {
        if let Some(new) = remap.get(id.as_str()) {
            id.clone_from(new);
        }
    };
    let old_id = resource.id().to_owned();
    if let Some(meta) = resource.meta_mut() {
        fix(&mut meta.id);
    }
    let new_id = resource.id().to_owned();
    match &mut resource.kind {
        Some(Kind::Api(api)) => {
            api.policy_ids.iter_mut().for_each(fix);
            for route in &mut api.routes {
                // Route ids derived from the API's id follow it to its new id.
                if new_id != old_id && route.id == derived_route_id(&old_id, &route.name) {
                    route.id = derived_route_id(&new_id, &route.name);
                }
                route.policy_ids.iter_mut().for_each(fix);
                match &mut route.action {
                    Some(Action::Proxy(p)) => {
                        fix(&mut p.upstream_id);
                        p.canaries.iter_mut().for_each(|c| fix(&mut c.upstream_id));
                        if let Some(mirror) = &mut p.mirror {
                            fix(&mut mirror.upstream_id);
                        }
                    }
                    Some(Action::Publish(p)) => fix(&mut p.broker_id),
                    Some(Action::Subscribe(s)) => fix(&mut s.broker_id),
                    _ => {}
                }
            }
        }
        Some(Kind::Consumer(c)) => c.policy_ids.iter_mut().for_each(fix),
        Some(Kind::Credential(c)) => fix(&mut c.consumer_id),
        Some(Kind::Subscription(s)) => {
            fix(&mut s.consumer_id);
            fix(&mut s.api_id);
            fix(&mut s.plan_id);
        }
        _ => {}
    }
}

impl Registry {
    /// Versions, newest first, `limit` at a time before `before`.
    pub async fn list_versions(
        &self,
        before: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<VersionInfo>, Option<u64>), RegistryError> {
        let limit = limit.clamp(1, crate::registry::MAX_PAGE);
        let rows = sqlx::query(
            "SELECT * FROM versions WHERE ($1::int8 IS NULL OR number < $1) ORDER BY number DESC LIMIT $2",
        )
        .bind(before.map(to_i64))
        .bind(i64::from(limit) + 1)
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        let more = rows.len() > limit as usize;
        let versions: Vec<VersionInfo> = rows
            .iter()
            .take(limit as usize)
            .map(version_from_row)
            .collect();
        let next = if more {
            versions.last().map(|v| v.number)
        } else {
            None
        };
        Ok((versions, next))
    }

    pub async fn version(&self, number: u64) -> Result<VersionInfo, RegistryError> {
        sqlx::query("SELECT * FROM versions WHERE number = $1")
            .bind(to_i64(number))
            .fetch_optional(self.pool())
            .await
            .map_err(db)?
            .as_ref()
            .map(version_from_row)
            .ok_or(RegistryError::VersionNotFound(number))
    }

    /// The whole state at `number` (of one group, or all), read in one consistent snapshot.
    pub async fn state_at(
        &self,
        number: u64,
        group: Option<&str>,
    ) -> Result<ConfigSet, RegistryError> {
        let (mut tx, head) = self.read_snapshot().await?;
        check_restorable(&mut tx, number, head).await?;
        let mut state: HashMap<String, Resource> = HashMap::new();
        for kind in KINDS {
            for resource in rows::fetch_all(&mut tx, kind, group).await? {
                state.insert(resource.id().to_owned(), resource);
            }
        }
        for (_, id, before) in states_at(&mut tx, number, head).await? {
            state.remove(&id);
            if let Some(resource) = before
                && group.is_none_or(|g| resource.meta().is_some_and(|m| m.group == g))
            {
                state.insert(id, resource);
            }
        }
        tx.commit().await.map_err(db)?;
        let mut resources: Vec<Resource> = state.into_values().collect();
        resources.sort_by(|a, b| (a.kind() as i32, a.id()).cmp(&(b.kind() as i32, b.id())));
        Ok(resources.into_iter().collect())
    }

    /// What changed from version `from` to version `to` (either order).
    pub async fn diff(&self, from: u64, to: u64) -> Result<Vec<ResourceDiff>, RegistryError> {
        let (mut tx, head) = self.read_snapshot().await?;
        let (low, high) = (from.min(to), from.max(to));
        check_restorable(&mut tx, low, head).await?;
        if high > head {
            return Err(RegistryError::VersionNotFound(high));
        }
        let at_low: HashMap<String, Option<Resource>> = states_at(&mut tx, low, high)
            .await?
            .into_iter()
            .map(|(_, id, r)| (id, r))
            .collect();
        let at_high = states_after(&mut tx, low, high).await?;
        tx.commit().await.map_err(db)?;
        let pairs = at_high
            .into_iter()
            .map(|(_, id, high_state)| {
                let low_state = at_low.get(&id).cloned().flatten();
                if from <= to {
                    (low_state, high_state)
                } else {
                    (high_state, low_state)
                }
            })
            .collect();
        Ok(diff_resources(pairs))
    }
}

/// The diff of a commit's own changes (what an apply did or, dry, would do).
pub fn diff_changes(changes: &[Change]) -> Vec<ResourceDiff> {
    diff_resources(
        changes
            .iter()
            .map(|c| (c.before.clone(), c.after.clone()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use sluice_proto::pb::{self, resource::Kind, route::Action};

    use super::*;

    #[test]
    fn diffs_show_shared_secrets_and_broker_passwords_only_as_fingerprints() {
        let broker = Resource {
            kind: Some(Kind::Broker(pb::Broker {
                kind: Some(pb::broker::Kind::Kafka(pb::KafkaBroker {
                    properties: [("sasl.password", "hunter2"), ("linger.ms", "5")]
                        .into_iter()
                        .map(|(name, value)| (name.to_owned(), value.to_owned()))
                        .collect(),
                    ..Default::default()
                })),
                ..Default::default()
            })),
        };
        let jwks = r#"{"keys":[{"kty":"oct","kid":"s","k":"c2VjcmV0LXNlY3JldA"}]}"#;
        let policy = Resource {
            kind: Some(Kind::Policy(pb::Policy {
                kind: Some(pb::policy::Kind::Jwt(pb::JwtPolicy {
                    issuers: vec![pb::JwtIssuer {
                        keys: Some(pb::jwt_issuer::Keys::JwksJson(jwks.into())),
                        ..Default::default()
                    }],
                })),
                ..Default::default()
            })),
        };
        let text = format!("{} {}", content_json(&broker), content_json(&policy));
        assert!(
            !text.contains("hunter2") && !text.contains("c2VjcmV0LXNlY3JldA"),
            "{text}"
        );
        assert!(text.contains("(redacted; sha256 "), "{text}");
        assert!(text.contains("linger.ms"), "{text}");
    }

    #[test]
    fn every_reference_follows_a_remapped_id() {
        let (old, new) = ("old-id".to_owned(), "new-id".to_owned());
        let remap = HashMap::from([(old.clone(), new.clone())]);
        let proxy = pb::ProxyAction {
            upstream_id: old.clone(),
            canaries: vec![pb::Canary {
                upstream_id: old.clone(),
                percent: 10.0,
                ..Default::default()
            }],
            mirror: Some(pb::Mirror {
                upstream_id: old.clone(),
                percent: 5.0,
            }),
            ..Default::default()
        };
        let mut api = Resource {
            kind: Some(Kind::Api(pb::Api {
                policy_ids: vec![old.clone()],
                routes: vec![pb::Route {
                    policy_ids: vec![old.clone()],
                    action: Some(Action::Proxy(proxy)),
                    ..Default::default()
                }],
                ..Default::default()
            })),
        };
        let mut consumer = Resource {
            kind: Some(Kind::Consumer(pb::Consumer {
                policy_ids: vec![old.clone()],
                ..Default::default()
            })),
        };
        for resource in [&mut api, &mut consumer] {
            remap_ids(resource, &remap);
            let references = resource.references();
            assert!(!references.is_empty());
            for (kind, id) in references {
                assert_eq!(id, new, "a {kind:?} reference kept the old id");
            }
        }
    }
}
