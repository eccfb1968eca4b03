//! Admin callers and their roles. A caller presents `Authorization: Bearer <token>` (REST)
//! or `authorization` metadata (gRPC). The bootstrap admin token comes from
//! `--admin-token`/`SLUICE_ADMIN_TOKEN`; the others are made by admins and stored as hashes.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::error::ApiError;

/// What a caller may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read everything.
    Viewer,
    /// Also change the registry.
    Editor,
    /// Also manage admin tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Editor => "editor",
            Self::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::Viewer, Self::Editor, Self::Admin]
            .into_iter()
            .find(|r| r.as_str() == text)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Recorded as the actor of the versions it commits.
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// Fails with 403 unless the caller holds `role` (or more).
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "token {:?} has role {}; this needs {role}",
                self.name, self.role
            )))
        }
    }
}

/// Checks bearer tokens.
#[derive(Debug, Clone)]
pub struct Authenticator {
    pool: PgPool,
    /// SHA-256 of the bootstrap admin token, if one is configured.
    bootstrap: Option<[u8; 32]>,
}

/// Prefix of every token this control plane makes, so leaked tokens are recognisable.
pub const TOKEN_PREFIX: &str = "sluice_";

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Authenticator {
    pub fn new(pool: PgPool, bootstrap_token: Option<&str>) -> Self {
        Self {
            pool,
            bootstrap: bootstrap_token.filter(|t| !t.is_empty()).map(digest),
        }
    }

    /// The caller behind an `Authorization` header value.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let Some(value) = authorization else {
            return Err(ApiError::Unauthenticated(
                "send Authorization: Bearer <token>".into(),
            ));
        };
        // The scheme is case-insensitive (RFC 9110, section 11.1).
        let token = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(ApiError::Unauthenticated(
                "the Authorization header must be \"Bearer <token>\"".into(),
            ));
        };
        let hash = digest(token);
        // Comparing digests, not tokens, keeps the comparison's timing independent of the secret.
        if self.bootstrap == Some(hash) {
            return Ok(Caller {
                name: BOOTSTRAP_NAME.into(),
                role: Role::Admin,
            });
        }
        let row = sqlx::query("SELECT name, role FROM admin_tokens WHERE token_sha256 = $1")
            .bind(hex::encode(hash))
            .fetch_optional(&self.pool)
            .await
            .map_err(database_error)?;
        match row {
            Some(row) => Ok(Caller {
                name: row.get("name"),
                role: Role::parse(row.get("role")).ok_or_else(|| {
                    ApiError::Internal("a stored token has an unknown role".into())
                })?,
            }),
            None => Err(ApiError::Unauthenticated("the token is not valid".into())),
        }
    }
}

/// A failed query on the token table, as the registry's own failures are answered: 503 when
/// the database is slow or out of connections, 500 (logged) otherwise.
fn database_error(e: sqlx::Error) -> ApiError {
    crate::registry::RegistryError::from_db(e).into()
}

/// The name the bootstrap token's calls are recorded under.
const BOOTSTRAP_NAME: &str = "bootstrap-admin";

/// An admin token as listed (never with the token itself).
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    pub prefix: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub created_by: String,
}

fn token_from_row(row: &sqlx::postgres::PgRow) -> Result<TokenInfo, ApiError> {
    Ok(TokenInfo {
        id: row.get("id"),
        name: row.get("name"),
        role: Role::parse(row.get("role"))
            .ok_or_else(|| ApiError::Internal("a stored token has an unknown role".into()))?,
        prefix: row.get("prefix"),
        created_at: row.get("created_at"),
        created_by: row.get("created_by"),
    })
}

/// 256 random bits as lowercase hex (from the OS generator, through UUID v4).
pub fn random_secret() -> String {
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // Each v4 UUID carries 122 random bits; three give more than 256.
    let mut bytes = Vec::with_capacity(48);
    bytes.extend_from_slice(a.as_bytes());
    bytes.extend_from_slice(b.as_bytes());
    bytes.extend_from_slice(c.as_bytes());
    hex::encode(Sha256::digest(&bytes))
}

/// Creates a token; returns it (shown once) and its listing.
pub async fn create_token(
    pool: &PgPool,
    name: &str,
    role: Role,
    created_by: &str,
) -> Result<(String, TokenInfo), ApiError> {
    if let Err(reason) = sluice_proto::validate::check_name(name) {
        return Err(ApiError::Invalid(sluice_proto::ConfigErrors::single(
            "name", reason,
        )));
    }
    // Versions record who made them by token name: no token may pass for the bootstrap one.
    if name == BOOTSTRAP_NAME {
        return Err(ApiError::Invalid(sluice_proto::ConfigErrors::single(
            "name",
            format!("{BOOTSTRAP_NAME:?} is the bootstrap token's and cannot be used"),
        )));
    }
    let token = format!("{TOKEN_PREFIX}{}", random_secret());
    let prefix: String = token.chars().take(TOKEN_PREFIX.len() + 6).collect();
    let row = sqlx::query(
        "INSERT INTO admin_tokens (id, name, role, token_sha256, prefix, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
    )
    .bind(Uuid::new_v4())
    .bind(name)
    .bind(role.as_str())
    .bind(hex::encode(digest(&token)))
    .bind(&prefix)
    .bind(created_by)
    .fetch_one(pool)
    .await
    .map_err(
        |e| match e.as_database_error().and_then(|d| d.constraint()) {
            Some("admin_tokens_name_key") => {
                ApiError::Conflict(format!("a token named {name:?} already exists"))
            }
            _ => database_error(e),
        },
    )?;
    Ok((token, token_from_row(&row)?))
}

pub async fn list_tokens(pool: &PgPool) -> Result<Vec<TokenInfo>, ApiError> {
    let rows = sqlx::query("SELECT * FROM admin_tokens ORDER BY name")
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
    rows.iter().map(token_from_row).collect()
}

/// Deletes a token by id or name.
pub async fn delete_token(pool: &PgPool, key: &str) -> Result<(), ApiError> {
    // A key that is some token's id names that token; otherwise it is a name. Never both.
    let by_id = match Uuid::parse_str(key) {
        Ok(id) => sqlx::query("DELETE FROM admin_tokens WHERE id = $1")
            .bind(id)
            .execute(pool)
            .await
            .map_err(database_error)?
            .rows_affected(),
        Err(_) => 0,
    };
    let deleted = if by_id > 0 {
        by_id
    } else {
        sqlx::query("DELETE FROM admin_tokens WHERE name = $1")
            .bind(key)
            .execute(pool)
            .await
            .map_err(database_error)?
            .rows_affected()
    };
    if deleted == 0 {
        return Err(ApiError::NotFound(format!("no token {key}")));
    }
    Ok(())
}
