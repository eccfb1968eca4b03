//! The checks a write needs in the other direction: the validator sees each written resource
//! with the resources it refers to, and these find what a write would break in the resources
//! that refer to it, or in the rest of its group. Each error is reported on the written
//! resource, which is what the writer can change.

use std::collections::HashSet;

use sluice_proto::pb::{self, Resource, ResourceKind, resource::Kind};
use sluice_proto::{ConfigErrors, FieldError, validate};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::rows::{self, kind_name};
use super::{Change, RegistryError};

/// Referrers named in one error list: enough to act on, few enough to read.
const NAMED_REFERRERS: i64 = 5;

/// Refuses changes that would leave a resource that refers to a written one, or a resource
/// of its group, invalid on the data planes:
/// - a policy that consumers list turned into a kind a consumer may not hold;
/// - a broker's `acks` set to 0 under routes that wait for its acknowledgements;
/// - a certificate for a server name another certificate of the group already serves.
///
/// Runs before the rows are written: references are read as they were, and the resources
/// this commit writes or deletes are left out (the validator judges those in context).
pub(super) async fn check(
    conn: &mut PgConnection,
    changes: &[Change],
) -> Result<(), RegistryError> {
    let written: HashSet<&str> = changes.iter().map(|c| c.id.as_str()).collect();
    let mut errors = Vec::new();
    let mut position = PositionInKind::default();
    for change in changes {
        let Some(after) = &change.after else {
            continue;
        };
        // The path the validator gives the same resource: its place among the written
        // resources of its kind.
        let base = format!(
            "{}[{}]",
            validate::list_name(change.kind),
            position.next(change.kind)
        );
        let mut error = |path: String, reason: String| {
            errors.push(FieldError {
                path,
                reason,
                resource: Some(pb::ResourceRef {
                    kind: change.kind as i32,
                    id: change.id.clone(),
                }),
            })
        };
        let existed = change.before.is_some();
        match &after.kind {
            Some(Kind::Policy(policy)) if existed => {
                let Some(what) = validate::consumer_cannot_hold(policy) else {
                    continue;
                };
                let consumers = referrers(
                    conn,
                    &change.id,
                    ResourceKind::Consumer,
                    Some(NAMED_REFERRERS),
                    &written,
                )
                .await?;
                for consumer in consumers {
                    error(
                        base.clone(),
                        format!(
                            "{} lists this policy, which would make it {what}; \
                             {}; take the policy off the consumer first",
                            describe(&consumer),
                            validate::CONSUMER_POLICY_KINDS
                        ),
                    );
                }
            }
            Some(Kind::Broker(broker)) if existed && validate::broker_sends_no_acks(broker) => {
                let apis = referrers(conn, &change.id, ResourceKind::Api, None, &written).await?;
                for api in &apis {
                    let Some(Kind::Api(inner)) = &api.kind else {
                        continue;
                    };
                    for route in validate::routes_taking_broker_acks(inner, &change.id) {
                        error(
                            format!("{base}.kafka.properties"),
                            format!(
                                "route {route:?} of {} waits for this broker's \
                                 acknowledgements (a durable publish, or WebSocket clients that \
                                 publish), and acks 0 sends none; set acks on the route or \
                                 make its delivery fire_and_forget first",
                                describe(api)
                            ),
                        );
                    }
                }
            }
            Some(Kind::Certificate(certificate)) => {
                let others: Vec<Resource> =
                    rows::fetch_all(conn, ResourceKind::Certificate, Some(&change.group))
                        .await?
                        .into_iter()
                        .filter(|other| {
                            other
                                .meta()
                                .is_some_and(|m| !written.contains(m.id.as_str()))
                        })
                        .collect();
                for (j, sni) in certificate.snis.iter().enumerate() {
                    let serving = others.iter().find(|other| {
                        matches!(&other.kind, Some(Kind::Certificate(c)) if c.snis.contains(sni))
                    });
                    if let Some(other) = serving {
                        error(
                            format!("{base}.snis[{j}]"),
                            format!("{sni:?} is also served by {}", describe(other)),
                        );
                    }
                }
            }
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(RegistryError::Invalid(ConfigErrors(errors)))
    }
}

/// Resources of `kind` that refer to `to`, leaving out those in `skip`; at most `limit`.
async fn referrers(
    conn: &mut PgConnection,
    to: &str,
    kind: ResourceKind,
    limit: Option<i64>,
    skip: &HashSet<&str>,
) -> Result<Vec<Resource>, RegistryError> {
    let Ok(to) = Uuid::parse_str(to) else {
        return Ok(Vec::new());
    };
    let skip: Vec<Uuid> = skip
        .iter()
        .filter_map(|id| Uuid::parse_str(id).ok())
        .collect();
    let ids: Vec<Uuid> = sqlx::query(
        "SELECT r.from_id FROM resource_refs r JOIN resource_ids i ON i.id = r.from_id \
         WHERE r.to_id = $1 AND i.kind = $2 AND NOT r.from_id = ANY($3) \
         ORDER BY r.from_id LIMIT $4",
    )
    .bind(to)
    .bind(kind_name(kind))
    .bind(&skip)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|row| row.get("from_id"))
    .collect();
    let mut found = rows::fetch_by_ids(conn, kind, &ids, false).await?;
    found.sort_by(|a, b| a.meta().map(|m| &m.name).cmp(&b.meta().map(|m| &m.name)));
    Ok(found)
}

/// `consumer "alice" (0b1e…)`.
fn describe(resource: &Resource) -> String {
    let kind = resource.kind();
    match resource.meta() {
        Some(meta) => format!("{} {:?} ({})", kind_name(kind), meta.name, meta.id),
        None => kind_name(kind).to_owned(),
    }
}

/// Counts the written resources of each kind, in the order the validator lists them.
#[derive(Default)]
struct PositionInKind(std::collections::HashMap<ResourceKind, usize>);

impl PositionInKind {
    fn next(&mut self, kind: ResourceKind) -> usize {
        let count = self.0.entry(kind).or_default();
        *count += 1;
        *count - 1
    }
}
