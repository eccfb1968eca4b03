//! How resources map to rows: one table per kind, the columns each kind constrains, and the
//! batched statements that read and write them.

use prost::Message;
use sluice_proto::pb::{self, Resource, ResourceKind, resource::Kind};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// Every kind, in an order where referenced kinds come before the kinds that refer to them.
pub const KINDS: [ResourceKind; 9] = [
    ResourceKind::Upstream,
    ResourceKind::Certificate,
    ResourceKind::Policy,
    ResourceKind::Broker,
    ResourceKind::Plan,
    ResourceKind::Api,
    ResourceKind::Consumer,
    ResourceKind::Credential,
    ResourceKind::Subscription,
];

/// Rows written per statement: large applies are sent in batches of this many.
const BATCH: usize = 5_000;

pub fn table(kind: ResourceKind) -> &'static str {
    sluice_proto::validate::list_name(kind)
}

/// The short kind name stored in the change log ("api", "upstream", ...).
pub fn kind_name(kind: ResourceKind) -> &'static str {
    sluice_proto::validate::kind_name(kind)
}

pub fn kind_from_name(name: &str) -> Option<ResourceKind> {
    KINDS.into_iter().find(|k| kind_name(*k) == name)
}

/// A resource as a row: the common columns and its kind's own.
#[derive(Debug)]
pub struct RowValues {
    pub id: Uuid,
    pub group: String,
    pub name: String,
    pub resource_version: i64,
    pub body: Vec<u8>,
    pub extra: Extra,
}

/// The columns a kind has beyond the common ones.
#[derive(Debug)]
pub enum Extra {
    None,
    Plan {
        monthly_quota: i64,
    },
    Kind(&'static str),
    Credential {
        consumer_id: Uuid,
        kind: &'static str,
        api_key_sha256: Option<String>,
        /// (issuer, subject) of a JWT credential.
        jwt: Option<(String, String)>,
        /// A client-certificate credential's identity ([`mtls_identity`]).
        mtls: Option<String>,
    },
    Subscription {
        consumer_id: Uuid,
        api_id: Uuid,
        plan_id: Uuid,
        status: &'static str,
    },
}

/// Why a resource cannot become a row (it was validated before, so this means a bug or a
/// snapshot from elsewhere).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RowError(pub String);

fn uuid(value: &str, what: &str) -> Result<Uuid, RowError> {
    Uuid::parse_str(value).map_err(|_| RowError(format!("{what} {value:?} is not a UUID")))
}

/// What names a client-certificate credential's consumer, unique per group: the certificate
/// (`sha256:FINGERPRINT`) or its subject under a CA (`subject:CA_SHA256:SUBJECT`, the CA empty
/// for any the route trusts).
fn mtls_identity(mtls: &pb::MtlsCredential) -> String {
    if mtls.fingerprint_sha256.is_empty() {
        format!("subject:{}:{}", mtls.ca_sha256, mtls.subject)
    } else {
        format!("sha256:{}", mtls.fingerprint_sha256)
    }
}

pub fn to_row(resource: &Resource) -> Result<RowValues, RowError> {
    let meta = resource
        .meta()
        .ok_or_else(|| RowError("resource has no meta".into()))?;
    let extra = match &resource.kind {
        Some(Kind::Plan(plan)) => Extra::Plan {
            monthly_quota: i64::try_from(plan.monthly_quota)
                .map_err(|_| RowError("monthly_quota is too large".into()))?,
        },
        Some(Kind::Policy(policy)) => Extra::Kind(match &policy.kind {
            Some(pb::policy::Kind::KeyAuth(_)) => "key_auth",
            Some(pb::policy::Kind::Jwt(_)) => "jwt",
            Some(pb::policy::Kind::Mtls(_)) => "mtls",
            Some(pb::policy::Kind::RateLimit(_)) => "rate_limit",
            Some(pb::policy::Kind::Cors(_)) => "cors",
            Some(pb::policy::Kind::IpRestriction(_)) => "ip_restriction",
            Some(pb::policy::Kind::RequestSize(_)) => "request_size",
            None => return Err(RowError("policy has no kind".into())),
        }),
        Some(Kind::Broker(broker)) => Extra::Kind(match &broker.kind {
            Some(pb::broker::Kind::Kafka(_)) => "kafka",
            Some(pb::broker::Kind::Memory(_)) => "memory",
            None => return Err(RowError("broker has no kind".into())),
        }),
        Some(Kind::Credential(c)) => {
            let (kind, api_key_sha256, jwt, mtls) = match &c.kind {
                Some(pb::credential::Kind::ApiKey(k)) => {
                    ("api_key", Some(k.key_sha256.clone()), None, None)
                }
                Some(pb::credential::Kind::Jwt(j)) => (
                    "jwt",
                    None,
                    Some((j.issuer.clone(), j.subject.clone())),
                    None,
                ),
                Some(pb::credential::Kind::Mtls(m)) => ("mtls", None, None, Some(mtls_identity(m))),
                None => return Err(RowError("credential has no kind".into())),
            };
            Extra::Credential {
                consumer_id: uuid(&c.consumer_id, "consumer")?,
                kind,
                api_key_sha256,
                jwt,
                mtls,
            }
        }
        Some(Kind::Subscription(s)) => Extra::Subscription {
            consumer_id: uuid(&s.consumer_id, "consumer")?,
            api_id: uuid(&s.api_id, "api")?,
            plan_id: uuid(&s.plan_id, "plan")?,
            status: match pb::subscription::Status::try_from(s.status) {
                Ok(pb::subscription::Status::Suspended) => "suspended",
                _ => "active",
            },
        },
        _ => Extra::None,
    };
    Ok(RowValues {
        id: uuid(&meta.id, "id")?,
        group: meta.group.clone(),
        name: meta.name.clone(),
        resource_version: i64::try_from(meta.resource_version).unwrap_or(i64::MAX),
        body: body(resource),
        extra,
    })
}

/// Decodes a row's body.
pub fn decode(kind: ResourceKind, body: &[u8]) -> Result<Resource, FetchError> {
    let corrupt = |e: prost::DecodeError| {
        FetchError::Corrupt(format!("a stored {} does not decode: {e}", kind_name(kind)))
    };
    Ok(Resource {
        kind: Some(match kind {
            ResourceKind::Api => Kind::Api(pb::Api::decode(body).map_err(corrupt)?),
            ResourceKind::Upstream => Kind::Upstream(pb::Upstream::decode(body).map_err(corrupt)?),
            ResourceKind::Consumer => Kind::Consumer(pb::Consumer::decode(body).map_err(corrupt)?),
            ResourceKind::Credential => {
                Kind::Credential(pb::Credential::decode(body).map_err(corrupt)?)
            }
            ResourceKind::Plan => Kind::Plan(pb::Plan::decode(body).map_err(corrupt)?),
            ResourceKind::Subscription => {
                Kind::Subscription(pb::Subscription::decode(body).map_err(corrupt)?)
            }
            ResourceKind::Policy => Kind::Policy(pb::Policy::decode(body).map_err(corrupt)?),
            ResourceKind::Broker => Kind::Broker(pb::Broker::decode(body).map_err(corrupt)?),
            ResourceKind::Certificate => {
                Kind::Certificate(pb::Certificate::decode(body).map_err(corrupt)?)
            }
            ResourceKind::Unspecified => {
                return Err(FetchError::Corrupt("a row of no resource kind".into()));
            }
        }),
    })
}

/// The body of a resource as its table stores it: the inner message, not the `Resource`
/// wrapper, so a row can be decoded knowing its table.
pub fn body(resource: &Resource) -> Vec<u8> {
    match &resource.kind {
        Some(Kind::Api(r)) => r.encode_to_vec(),
        Some(Kind::Upstream(r)) => r.encode_to_vec(),
        Some(Kind::Consumer(r)) => r.encode_to_vec(),
        Some(Kind::Credential(r)) => r.encode_to_vec(),
        Some(Kind::Plan(r)) => r.encode_to_vec(),
        Some(Kind::Subscription(r)) => r.encode_to_vec(),
        Some(Kind::Policy(r)) => r.encode_to_vec(),
        Some(Kind::Broker(r)) => r.encode_to_vec(),
        Some(Kind::Certificate(r)) => r.encode_to_vec(),
        None => Vec::new(),
    }
}

/// Inserts or replaces rows of one kind, in batches.
pub async fn upsert(
    conn: &mut PgConnection,
    kind: ResourceKind,
    rows: &[RowValues],
) -> sqlx::Result<()> {
    for batch in rows.chunks(BATCH) {
        let ids: Vec<Uuid> = batch.iter().map(|r| r.id).collect();
        let groups: Vec<&str> = batch.iter().map(|r| r.group.as_str()).collect();
        let names: Vec<&str> = batch.iter().map(|r| r.name.as_str()).collect();
        let versions: Vec<i64> = batch.iter().map(|r| r.resource_version).collect();
        let bodies: Vec<&[u8]> = batch.iter().map(|r| r.body.as_slice()).collect();
        let common = "id, grp, name, resource_version, body";
        let common_types = "$1::uuid[], $2::text[], $3::text[], $4::int8[], $5::bytea[]";
        let common_set = "grp = EXCLUDED.grp, name = EXCLUDED.name, \
                          resource_version = EXCLUDED.resource_version, body = EXCLUDED.body";
        let t = table(kind);
        match kind {
            ResourceKind::Plan => {
                let quotas: Vec<i64> = batch
                    .iter()
                    .map(|r| match r.extra {
                        Extra::Plan { monthly_quota } => monthly_quota,
                        _ => 0,
                    })
                    .collect();
                sqlx::query(&format!(
                    "INSERT INTO {t} ({common}, monthly_quota) SELECT * FROM UNNEST({common_types}, $6::int8[]) \
                     ON CONFLICT (id) DO UPDATE SET {common_set}, monthly_quota = EXCLUDED.monthly_quota"
                ))
                .bind(ids).bind(groups).bind(names).bind(versions).bind(bodies).bind(quotas)
                .execute(&mut *conn)
                .await?;
            }
            ResourceKind::Policy | ResourceKind::Broker => {
                let kinds: Vec<&str> = batch
                    .iter()
                    .map(|r| match r.extra {
                        Extra::Kind(k) => k,
                        _ => "",
                    })
                    .collect();
                sqlx::query(&format!(
                    "INSERT INTO {t} ({common}, kind) SELECT * FROM UNNEST({common_types}, $6::text[]) \
                     ON CONFLICT (id) DO UPDATE SET {common_set}, kind = EXCLUDED.kind"
                ))
                .bind(ids).bind(groups).bind(names).bind(versions).bind(bodies).bind(kinds)
                .execute(&mut *conn)
                .await?;
            }
            ResourceKind::Credential => {
                let mut consumers = Vec::with_capacity(batch.len());
                let mut kinds = Vec::with_capacity(batch.len());
                let mut keys = Vec::with_capacity(batch.len());
                let (mut issuers, mut subjects, mut certificates) =
                    (Vec::new(), Vec::new(), Vec::new());
                for r in batch {
                    if let Extra::Credential {
                        consumer_id,
                        kind,
                        api_key_sha256,
                        jwt,
                        mtls,
                    } = &r.extra
                    {
                        consumers.push(*consumer_id);
                        kinds.push(*kind);
                        keys.push(api_key_sha256.clone());
                        issuers.push(jwt.as_ref().map(|(issuer, _)| issuer.clone()));
                        subjects.push(jwt.as_ref().map(|(_, subject)| subject.clone()));
                        certificates.push(mtls.clone());
                    }
                }
                sqlx::query(&format!(
                    "INSERT INTO {t} ({common}, consumer_id, kind, api_key_sha256, jwt_issuer, jwt_subject, mtls_identity) \
                     SELECT * FROM UNNEST({common_types}, $6::uuid[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[]) \
                     ON CONFLICT (id) DO UPDATE SET {common_set}, consumer_id = EXCLUDED.consumer_id, \
                     kind = EXCLUDED.kind, api_key_sha256 = EXCLUDED.api_key_sha256, \
                     jwt_issuer = EXCLUDED.jwt_issuer, jwt_subject = EXCLUDED.jwt_subject, \
                     mtls_identity = EXCLUDED.mtls_identity"
                ))
                .bind(ids).bind(groups).bind(names).bind(versions).bind(bodies)
                .bind(consumers).bind(kinds).bind(keys).bind(issuers).bind(subjects)
                .bind(certificates)
                .execute(&mut *conn)
                .await?;
            }
            ResourceKind::Subscription => {
                let (mut consumers, mut apis, mut plans, mut statuses) =
                    (vec![], vec![], vec![], vec![]);
                for r in batch {
                    if let Extra::Subscription {
                        consumer_id,
                        api_id,
                        plan_id,
                        status,
                    } = &r.extra
                    {
                        consumers.push(*consumer_id);
                        apis.push(*api_id);
                        plans.push(*plan_id);
                        statuses.push(*status);
                    }
                }
                sqlx::query(&format!(
                    "INSERT INTO {t} ({common}, consumer_id, api_id, plan_id, status) \
                     SELECT * FROM UNNEST({common_types}, $6::uuid[], $7::uuid[], $8::uuid[], $9::text[]) \
                     ON CONFLICT (id) DO UPDATE SET {common_set}, consumer_id = EXCLUDED.consumer_id, \
                     api_id = EXCLUDED.api_id, plan_id = EXCLUDED.plan_id, status = EXCLUDED.status"
                ))
                .bind(ids).bind(groups).bind(names).bind(versions).bind(bodies)
                .bind(consumers).bind(apis).bind(plans).bind(statuses)
                .execute(&mut *conn)
                .await?;
            }
            _ => {
                sqlx::query(&format!(
                    "INSERT INTO {t} ({common}) SELECT * FROM UNNEST({common_types}) \
                     ON CONFLICT (id) DO UPDATE SET {common_set}"
                ))
                .bind(ids)
                .bind(groups)
                .bind(names)
                .bind(versions)
                .bind(bodies)
                .execute(&mut *conn)
                .await?;
            }
        };
    }
    Ok(())
}

/// Deletes rows of one kind by id.
pub async fn delete(conn: &mut PgConnection, kind: ResourceKind, ids: &[Uuid]) -> sqlx::Result<()> {
    for batch in ids.chunks(BATCH) {
        sqlx::query(&format!("DELETE FROM {} WHERE id = ANY($1)", table(kind)))
            .bind(batch)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Rows of one kind by id, locked for update when `lock` is set.
pub async fn fetch_by_ids(
    conn: &mut PgConnection,
    kind: ResourceKind,
    ids: &[Uuid],
    lock: bool,
) -> Result<Vec<Resource>, FetchError> {
    let mut out = Vec::with_capacity(ids.len());
    for batch in ids.chunks(BATCH) {
        let lock = if lock { " FOR UPDATE" } else { "" };
        let rows = sqlx::query(&format!(
            "SELECT body FROM {} WHERE id = ANY($1){lock}",
            table(kind)
        ))
        .bind(batch)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            out.push(decode(kind, row.get::<&[u8], _>("body"))?);
        }
    }
    Ok(out)
}

/// Every row of one kind, optionally of one group only.
pub async fn fetch_all(
    conn: &mut PgConnection,
    kind: ResourceKind,
    group: Option<&str>,
) -> Result<Vec<Resource>, FetchError> {
    let rows = sqlx::query(&format!(
        "SELECT body FROM {} WHERE $1::text IS NULL OR grp = $1 ORDER BY id",
        table(kind)
    ))
    .bind(group)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| decode(kind, row.get::<&[u8], _>("body")))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Corrupt(String),
}
