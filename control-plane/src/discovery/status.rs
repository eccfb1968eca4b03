//! Data-plane status in Postgres: what each node runs, when it was last heard from and what it
//! last refused. Written by the replica a node streams from; read by any replica.

use chrono::{DateTime, Utc};
use prost::Message;
use sluice_proto::pb;
use sluice_proto::time::timestamp;
use sqlx::{PgPool, Row};

/// A node silent for longer than this is stale.
pub const STALE_AFTER_SECONDS: i64 = 15;

/// A node opened a stream on `replica`. Returns the stream's `connected_since`, which names
/// this stream when it ends ([`disconnected`]).
pub async fn connected(
    pool: &PgPool,
    node: &pb::Node,
    replica: &str,
    hello: &pb::Hello,
) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query(
        "INSERT INTO dataplanes (id, grp, node, connected_replica, connected_since, last_seen, \
                                 applied_version, applied_hash, refused_reason) \
         VALUES ($1, $2, $3, $4, now(), now(), $5, $6, '') \
         ON CONFLICT (id) DO UPDATE SET grp = EXCLUDED.grp, node = EXCLUDED.node, \
             connected_replica = EXCLUDED.connected_replica, connected_since = now(), \
             last_seen = now(), applied_version = EXCLUDED.applied_version, \
             applied_hash = EXCLUDED.applied_hash, refused_reason = '' \
         RETURNING connected_since",
    )
    .bind(&node.id)
    .bind(&node.group)
    .bind(node.encode_to_vec())
    .bind(replica)
    .bind(i64::try_from(hello.current_version).unwrap_or(i64::MAX))
    .bind(&hello.current_hash)
    .fetch_one(pool)
    .await
    .map(|row| row.get("connected_since"))
}

/// The control plane refused to serve a node (an unsupported protocol version, say).
pub async fn refused(pool: &PgPool, node: &pb::Node, reason: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO dataplanes (id, grp, node, last_seen, refused_reason) \
         VALUES ($1, $2, $3, now(), $4) \
         ON CONFLICT (id) DO UPDATE SET grp = EXCLUDED.grp, node = EXCLUDED.node, \
             connected_replica = '', last_seen = now(), refused_reason = EXCLUDED.refused_reason",
    )
    .bind(&node.id)
    .bind(&node.group)
    .bind(node.encode_to_vec())
    .bind(reason)
    .execute(pool)
    .await
    .map(drop)
}

pub async fn acked(pool: &PgPool, id: &str, ack: &pb::Ack) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE dataplanes SET applied_version = $2, applied_hash = $3, last_ack_at = now(), \
         last_seen = now() WHERE id = $1",
    )
    .bind(id)
    .bind(i64::try_from(ack.version).unwrap_or(i64::MAX))
    .bind(&ack.content_hash)
    .execute(pool)
    .await
    .map(drop)
}

pub async fn nacked(pool: &PgPool, id: &str, nack: &pb::Nack) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE dataplanes SET last_nack = $2, last_nack_at = now(), last_seen = now() \
         WHERE id = $1",
    )
    .bind(id)
    .bind(nack.encode_to_vec())
    .execute(pool)
    .await
    .map(drop)
}

/// Seconds since `version` was committed, if its record is still kept.
pub async fn since_commit(pool: &PgPool, version: u64) -> sqlx::Result<Option<f64>> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM clock_timestamp() - created_at)::float8 FROM versions \
         WHERE number = $1",
    )
    .bind(i64::try_from(version).unwrap_or(i64::MAX))
    .fetch_optional(pool)
    .await
}

pub async fn seen(pool: &PgPool, id: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE dataplanes SET last_seen = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .map(drop)
}

/// The stream on `replica` that connected at `since` ended. The node may have a newer stream
/// already, on another replica or on this one: that one is left as it is.
pub async fn disconnected(
    pool: &PgPool,
    id: &str,
    replica: &str,
    since: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE dataplanes SET connected_replica = '' \
         WHERE id = $1 AND connected_replica = $2 AND connected_since = $3",
    )
    .bind(id)
    .bind(replica)
    .bind(since)
    .execute(pool)
    .await
    .map(drop)
}

/// Most nodes listed at once.
pub const MAX_PAGE: u32 = 1000;

/// Nodes (of `group`, when given) by id, `limit` (at most [`MAX_PAGE`]) after the id `after`,
/// each with how many versions that changed its group it has not applied and whether it is
/// stale; and the id to list after for the next page, when there is one.
pub async fn list(
    pool: &PgPool,
    group: Option<&str>,
    after: Option<&str>,
    limit: u32,
) -> sqlx::Result<(Vec<pb::DataPlaneStatus>, Option<String>)> {
    let limit = limit.clamp(1, MAX_PAGE);
    let mut rows = sqlx::query(
        "SELECT d.*, \
             (SELECT count(DISTINCT c.version) FROM changes c \
               WHERE c.grp = d.grp AND c.version > d.applied_version) AS behind, \
             d.last_seen < now() - make_interval(secs => $2) AS stale \
         FROM dataplanes d \
         WHERE ($1::text IS NULL OR d.grp = $1) AND ($3::text IS NULL OR d.id > $3) \
         ORDER BY d.id LIMIT $4",
    )
    .bind(group)
    .bind(STALE_AFTER_SECONDS as f64)
    .bind(after)
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await?;
    let next = (rows.len() > limit as usize).then(|| {
        rows.truncate(limit as usize);
        rows.last().map(|row| row.get::<String, _>("id"))
    });
    let next = next.flatten();
    let time = |row: &sqlx::postgres::PgRow, column: &str| {
        row.get::<Option<DateTime<Utc>>, _>(column)
            .map(|t| timestamp(&t))
    };
    let nodes = rows
        .iter()
        .map(|row| pb::DataPlaneStatus {
            node: pb::Node::decode(row.get::<Vec<u8>, _>("node").as_slice()).ok(),
            connected_replica: row.get("connected_replica"),
            applied_version: u64::try_from(row.get::<i64, _>("applied_version")).unwrap_or(0),
            applied_hash: row.get("applied_hash"),
            last_ack_at: time(row, "last_ack_at"),
            last_nack_at: time(row, "last_nack_at"),
            last_nack: row
                .get::<Option<Vec<u8>>, _>("last_nack")
                .and_then(|bytes| pb::Nack::decode(bytes.as_slice()).ok()),
            connected_since: time(row, "connected_since"),
            last_seen: time(row, "last_seen"),
            versions_behind: u64::try_from(row.get::<i64, _>("behind")).unwrap_or(0),
            stale: row.get("stale"),
            refused_reason: row.get("refused_reason"),
        })
        .collect();
    Ok((nodes, next))
}

/// Forgets nodes not heard from for `retention`: a node that was scaled away, or restarted
/// under a new id, would otherwise be listed (stale) for ever. A node recorded as connected
/// (which a replica that crashed may leave behind) is kept for an hour of silence at least,
/// so that a short retention never drops a node between two of its heartbeats. Returns how
/// many went.
pub async fn forget_silent(pool: &PgPool, retention: std::time::Duration) -> sqlx::Result<u64> {
    sqlx::query(
        "DELETE FROM dataplanes WHERE last_seen < now() - make_interval(secs => $1) \
         AND (connected_replica = '' \
              OR last_seen < now() - make_interval(secs => greatest($1, 3600)))",
    )
    .bind(retention.as_secs_f64())
    .execute(pool)
    .await
    .map(|done| done.rows_affected())
}

/// A status as the REST API shows it.
pub fn to_json(status: &pb::DataPlaneStatus) -> serde_json::Value {
    use sluice_proto::time::format_rfc3339;
    let time = |t: &Option<prost_types::Timestamp>| t.as_ref().and_then(format_rfc3339);
    let node = status.node.clone().unwrap_or_default();
    serde_json::json!({
        "id": node.id,
        "group": node.group,
        "build_version": node.build_version,
        "protocol_version": node.protocol_version,
        "labels": node.labels,
        "address": node.address,
        "connected_replica": status.connected_replica,
        "connected_since": time(&status.connected_since),
        "last_seen": time(&status.last_seen),
        "stale": status.stale,
        "applied_version": status.applied_version,
        "applied_hash": status.applied_hash,
        "versions_behind": status.versions_behind,
        "last_ack_at": time(&status.last_ack_at),
        "last_nack_at": time(&status.last_nack_at),
        "last_nack": status.last_nack.as_ref().map(|n| serde_json::json!({
            "version": n.version,
            "message": n.message,
            "errors": n.errors.iter().map(|e| serde_json::json!({
                "resource": e.resource.as_ref().map(|r| serde_json::json!({
                    "kind": sluice_proto::validate::kind_name(r.kind()),
                    "id": r.id,
                })),
                "path": e.path,
                "reason": e.reason,
            })).collect::<Vec<_>>(),
        })),
        "refused_reason": status.refused_reason,
    })
}
