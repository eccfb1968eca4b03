//! REST handlers. Each checks the caller's role first, then does one registry operation.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_proto::declarative::{self, Format};
use sluice_proto::pb::{self, Resource, ResourceKind};
use sluice_proto::resource::kind_from_collection;
use sluice_proto::validate::kind_name;

use super::AppState;
use crate::api::auth::{self, Caller, Role};
use crate::api::convert::{from_json, to_json};
use crate::api::error::ApiError;
use crate::api::{derived_id_held_by_another, keys};
use crate::registry::{ListFilter, Plan, Registry, RegistryError, VersionInfo, Write};
use crate::versions::diff_changes;

type Params = Query<Vec<(String, String)>>;

/// Query parameters, checked: unknown ones are refused rather than silently ignored.
struct QueryArgs(HashMap<String, String>);

impl QueryArgs {
    fn new(Query(pairs): Params, allowed: &[&str]) -> Result<Self, ApiError> {
        let mut map = HashMap::new();
        for (name, value) in pairs {
            if !allowed.contains(&name.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {name:?}; this endpoint takes {}",
                    if allowed.is_empty() {
                        "none".to_owned()
                    } else {
                        allowed.join(", ")
                    }
                )));
            }
            if map.insert(name.clone(), value).is_some() {
                return Err(ApiError::BadRequest(format!(
                    "query parameter {name:?} is given twice"
                )));
            }
        }
        Ok(Self(map))
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.text(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::BadRequest(format!(
                        "query parameter {name}={v:?} is not a whole number"
                    ))
                })
            })
            .transpose()
    }

    fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.0.get(name).map(String::as_str) {
            None | Some("false") | Some("0") => Ok(false),
            // A bare `?dry_run` asks for one: read as absent, it would commit.
            Some("" | "true" | "1") => Ok(true),
            Some(other) => Err(ApiError::BadRequest(format!(
                "query parameter {name}={other:?} must be true or false"
            ))),
        }
    }
}

fn json_body(bytes: &Bytes) -> Result<Value, ApiError> {
    if bytes.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::BadRequest(format!(
            "the body is not JSON (line {}, column {}): {e}",
            e.line(),
            e.column()
        ))
    })
}

/// `If-Match: "5"` (or `W/"5"`, or `5`) → 5.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    if text == "*" {
        return Ok(None);
    }
    text.trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .map(Some)
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "If-Match {text:?} is not an ETag this API gave (\"<resource_version>\")"
            ))
        })
}

fn with_etag(status: StatusCode, resource: &Resource) -> Response {
    let version = resource.meta().map_or(0, |m| m.resource_version);
    let mut response = (status, axum::Json(to_json(resource))).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

fn collection(name: &str) -> Result<ResourceKind, ApiError> {
    match kind_from_collection(name) {
        Some(ResourceKind::Credential) => Err(ApiError::NotFound(
            "credentials live under /v1/consumers/{consumer}/credentials".into(),
        )),
        Some(kind) => Ok(kind),
        None => Err(ApiError::NotFound(format!("no collection /v1/{name}"))),
    }
}

/// A resource by id, or by name in `group` (default "default").
async fn resolve(
    registry: &Registry,
    kind: ResourceKind,
    key: &str,
    group: Option<&str>,
) -> Result<Resource, ApiError> {
    let found = if uuid::Uuid::parse_str(key).is_ok() {
        registry.get(kind, key).await
    } else {
        registry
            .find(kind, group.unwrap_or(declarative::DEFAULT_GROUP), key)
            .await
    };
    Ok(found?)
}

async fn resolve_id(
    registry: &Registry,
    kind: ResourceKind,
    key: Option<&str>,
    group: Option<&str>,
) -> Result<Option<uuid::Uuid>, ApiError> {
    let Some(key) = key else { return Ok(None) };
    let resource = resolve(registry, kind, key, group).await?;
    Ok(uuid::Uuid::parse_str(resource.id()).ok())
}

fn message(args: &QueryArgs, default: String) -> String {
    args.text("message").map_or(default, str::to_owned)
}

fn describe(resource: &Resource) -> String {
    let name = resource.meta().map(|m| m.name.as_str()).unwrap_or_default();
    format!("{} {name}", kind_name(resource.kind()))
}

fn version_json(version: Option<&VersionInfo>) -> Value {
    version.map_or(Value::Null, |v| serde_json::to_value(v).unwrap_or_default())
}

/// Commits one write and returns the stored resource; a create that finds the resource
/// already there is a conflict, not a precondition failure.
async fn write_one(
    registry: &Registry,
    caller: &Caller,
    message: String,
    write: Write,
    creating: bool,
) -> Result<Option<Resource>, ApiError> {
    let kind = match &write {
        Write::Put { resource, .. } => resource.kind(),
        Write::Delete { kind, .. } => *kind,
    };
    match registry.commit(&caller.name, &message, vec![write]).await {
        Ok(mut committed) => Ok(committed.resources.pop().flatten()),
        // The registry judged the resource first in its list; the client sent it alone.
        Err(RegistryError::Invalid(errors)) => Err(ApiError::invalid_in_body(
            errors,
            &format!("{}[0]", sluice_proto::validate::list_name(kind)),
        )),
        Err(RegistryError::PreconditionFailed { kind, id, .. }) if creating => Err(
            ApiError::Conflict(format!("{kind} {id} already exists; update it with PUT")),
        ),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

/// The longest a readiness check waits for the registry database.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Ready while the registry database answers: a replica that cannot reach it can neither
/// commit nor serve data planes, so load balancers should send work elsewhere.
pub(super) async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    let ping = sqlx::query("SELECT 1").execute(state.registry.pool());
    match tokio::time::timeout(READY_TIMEOUT, ping).await {
        Ok(Ok(_)) => Ok("ready\n"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "not ready: the registry database fails");
            Err(ApiError::Unavailable(
                "the registry database does not answer".into(),
            ))
        }
        Err(_) => Err(ApiError::Unavailable(format!(
            "the registry database did not answer within {READY_TIMEOUT:?}"
        ))),
    }
}

pub(super) async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint; see /v1/openapi.json".into())
}

pub(super) async fn openapi() -> axum::Json<Value> {
    axum::Json(super::endpoints::openapi_document())
}

// ---- resources ------------------------------------------------------------------------------

pub(super) async fn list_resources(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let kind = collection(&name)?;
    let args = QueryArgs::new(
        params,
        &["group", "limit", "after", "consumer", "api", "plan"],
    )?;
    let group = args.text("group");
    // Before any name is resolved: a filter the collection does not have is a 422 whether or
    // not the name exists.
    for filter in ["consumer", "api", "plan"] {
        if args.text(filter).is_some()
            && !crate::registry::can_filter(kind, &format!("{filter}_id"))
        {
            return Err(ApiError::Invalid(sluice_proto::ConfigErrors::single(
                filter,
                format!("{name} cannot be filtered by {filter}"),
            )));
        }
    }
    let filter = ListFilter {
        group: group.map(str::to_owned),
        consumer_id: resolve_id(
            &s.registry,
            ResourceKind::Consumer,
            args.text("consumer"),
            group,
        )
        .await?,
        api_id: resolve_id(&s.registry, ResourceKind::Api, args.text("api"), group).await?,
        plan_id: resolve_id(&s.registry, ResourceKind::Plan, args.text("plan"), group).await?,
    };
    list(&s.registry, kind, &filter, &args).await
}

async fn list(
    registry: &Registry,
    kind: ResourceKind,
    filter: &ListFilter,
    args: &QueryArgs,
) -> Result<Response, ApiError> {
    let after = args
        .text("after")
        .map(|a| {
            uuid::Uuid::parse_str(a).map_err(|_| {
                ApiError::BadRequest(format!("after={a:?} is not a cursor this API gave"))
            })
        })
        .transpose()?;
    let limit = u32::try_from(args.number("limit")?.unwrap_or(100)).unwrap_or(u32::MAX);
    let page = registry.list(kind, filter, after, limit).await?;
    Ok(axum::Json(json!({
        "items": page.items.iter().map(to_json).collect::<Vec<_>>(),
        "next": page.next.map(|n| n.to_string()),
    }))
    .into_response())
}

pub(super) async fn create_resource(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    params: Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Role::Editor)?;
    let kind = collection(&name)?;
    let args = QueryArgs::new(params, &["group", "message"])?;
    let body = json_body(&body)?;
    let mut resource = from_json(&s.registry, kind, body.clone(), args.text("group"), None).await?;
    // Converted again with an id of its own, so that its routes' ids follow it.
    if body.get("id").is_none() && derived_id_held_by_another(&s.registry, &resource).await? {
        let mut body = body;
        body["id"] = uuid::Uuid::new_v4().to_string().into();
        resource = from_json(&s.registry, kind, body, args.text("group"), None).await?;
    }
    let message = message(&args, format!("create {}", describe(&resource)));
    let stored = write_one(
        &s.registry,
        &caller,
        message,
        Write::Put {
            resource,
            if_match: Some(0),
        },
        true,
    )
    .await?;
    let stored = stored.ok_or_else(|| ApiError::Internal("a create stored nothing".into()))?;
    let mut response = with_etag(StatusCode::CREATED, &stored);
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/{name}/{}", stored.id())) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

pub(super) async fn get_resource(
    State(s): State<AppState>,
    caller: Caller,
    Path((name, key)): Path<(String, String)>,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let kind = collection(&name)?;
    let args = QueryArgs::new(params, &["group"])?;
    Ok(with_etag(
        StatusCode::OK,
        &resolve(&s.registry, kind, &key, args.text("group")).await?,
    ))
}

pub(super) async fn update_resource(
    State(s): State<AppState>,
    caller: Caller,
    Path((name, key)): Path<(String, String)>,
    params: Params,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Role::Editor)?;
    let kind = collection(&name)?;
    let args = QueryArgs::new(params, &["group", "message"])?;
    let current = resolve(&s.registry, kind, &key, args.text("group")).await?;
    let expected = match if_match(&headers)? {
        // Updating never creates, even when a delete commits first.
        None => Write::EXISTING,
        // No ETag this API gives is "0" (a resource's version is the registry version that
        // wrote it), and to the registry 0 means "only if absent": a PUT racing a delete would
        // bring the resource back with it. Nor u64::MAX, the registry's "any version".
        Some(version @ (0 | Write::EXISTING)) => {
            return Err(ApiError::PreconditionFailed(format!(
                "If-Match \"{version}\" matches no resource: {} {key} is at version {}",
                kind_name(kind),
                current.meta().map_or(0, |m| m.resource_version)
            )));
        }
        Some(version) => version,
    };
    let mut body = json_body(&body)?;
    if !body.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    match body.get("id").and_then(Value::as_str) {
        Some(id) if id != current.id() => {
            return Err(ApiError::BadRequest(format!(
                "the body's id {id} is not the id of {key}"
            )));
        }
        _ => body["id"] = current.id().into(),
    }
    let group = current.meta().map(|m| m.group.clone()).unwrap_or_default();
    if let Some(asked) = body.get("group").and_then(Value::as_str)
        && asked != group
    {
        return Err(ApiError::Invalid(sluice_proto::ConfigErrors::single(
            "group",
            format!(
                "cannot change from {group:?} to {asked:?}; delete the resource and create it in the new group"
            ),
        )));
    }
    let resource = from_json(&s.registry, kind, body, Some(&group), None).await?;
    let message = message(&args, format!("update {}", describe(&resource)));
    let stored = write_one(
        &s.registry,
        &caller,
        message,
        Write::Put {
            resource,
            if_match: Some(expected),
        },
        false,
    )
    .await?;
    Ok(with_etag(
        StatusCode::OK,
        &stored.ok_or_else(|| ApiError::Internal("an update stored nothing".into()))?,
    ))
}

pub(super) async fn delete_resource(
    State(s): State<AppState>,
    caller: Caller,
    Path((name, key)): Path<(String, String)>,
    params: Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Role::Editor)?;
    let kind = collection(&name)?;
    let args = QueryArgs::new(params, &["group", "message"])?;
    let current = resolve(&s.registry, kind, &key, args.text("group")).await?;
    let message = message(&args, format!("delete {}", describe(&current)));
    let write = Write::Delete {
        kind,
        id: current.id().to_owned(),
        if_match: if_match(&headers)?,
    };
    write_one(&s.registry, &caller, message, write, false).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- credentials and keys -------------------------------------------------------------------

async fn owner(registry: &Registry, key: &str, args: &QueryArgs) -> Result<Resource, ApiError> {
    resolve(registry, ResourceKind::Consumer, key, args.text("group")).await
}

async fn owned_credential(
    registry: &Registry,
    owner: &Resource,
    key: &str,
) -> Result<Resource, ApiError> {
    let group = owner.meta().map(|m| m.group.as_str());
    let credential = resolve(registry, ResourceKind::Credential, key, group).await?;
    match &credential.kind {
        Some(pb::resource::Kind::Credential(c)) if c.consumer_id == owner.id() => Ok(credential),
        _ => Err(ApiError::NotFound(format!(
            "consumer {} has no credential {key}",
            owner.id()
        ))),
    }
}

pub(super) async fn list_credentials(
    State(s): State<AppState>,
    caller: Caller,
    Path(consumer): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let args = QueryArgs::new(params, &["group", "limit", "after"])?;
    let owner = owner(&s.registry, &consumer, &args).await?;
    let filter = ListFilter {
        consumer_id: uuid::Uuid::parse_str(owner.id()).ok(),
        ..Default::default()
    };
    list(&s.registry, ResourceKind::Credential, &filter, &args).await
}

pub(super) async fn create_credential(
    State(s): State<AppState>,
    caller: Caller,
    Path(consumer): Path<String>,
    params: Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Role::Editor)?;
    let args = QueryArgs::new(params, &["group", "message"])?;
    let owner = owner(&s.registry, &consumer, &args).await?;
    let mut body = json_body(&body)?;
    let mut resource = from_json(
        &s.registry,
        ResourceKind::Credential,
        body.clone(),
        None,
        Some(&owner),
    )
    .await?;
    if body.get("id").is_none() && derived_id_held_by_another(&s.registry, &resource).await? {
        body["id"] = uuid::Uuid::new_v4().to_string().into();
        resource = from_json(
            &s.registry,
            ResourceKind::Credential,
            body,
            None,
            Some(&owner),
        )
        .await?;
    }
    let message = message(
        &args,
        format!("create {} of {}", describe(&resource), describe(&owner)),
    );
    let stored = write_one(
        &s.registry,
        &caller,
        message,
        Write::Put {
            resource,
            if_match: Some(0),
        },
        true,
    )
    .await?;
    Ok(with_etag(
        StatusCode::CREATED,
        &stored.ok_or_else(|| ApiError::Internal("a create stored nothing".into()))?,
    ))
}

pub(super) async fn get_credential(
    State(s): State<AppState>,
    caller: Caller,
    Path((consumer, key)): Path<(String, String)>,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let args = QueryArgs::new(params, &["group"])?;
    let owner = owner(&s.registry, &consumer, &args).await?;
    Ok(with_etag(
        StatusCode::OK,
        &owned_credential(&s.registry, &owner, &key).await?,
    ))
}

pub(super) async fn delete_credential(
    State(s): State<AppState>,
    caller: Caller,
    Path((consumer, key)): Path<(String, String)>,
    params: Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Role::Editor)?;
    let args = QueryArgs::new(params, &["group", "message"])?;
    let owner = owner(&s.registry, &consumer, &args).await?;
    let credential = owned_credential(&s.registry, &owner, &key).await?;
    let message = message(
        &args,
        format!("delete {} of {}", describe(&credential), describe(&owner)),
    );
    let write = Write::Delete {
        kind: ResourceKind::Credential,
        id: credential.id().to_owned(),
        if_match: if_match(&headers)?,
    };
    write_one(&s.registry, &caller, message, write, false).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn list_keys(
    State(s): State<AppState>,
    caller: Caller,
    Path(consumer): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let args = QueryArgs::new(params, &["group"])?;
    let owner = owner(&s.registry, &consumer, &args).await?;
    let filter = ListFilter {
        consumer_id: uuid::Uuid::parse_str(owner.id()).ok(),
        ..Default::default()
    };
    let mut found = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .registry
            .list(
                ResourceKind::Credential,
                &filter,
                after,
                crate::registry::MAX_PAGE,
            )
            .await?;
        found.extend(
            page.items
                .iter()
                .filter(|r| keys::is_api_key(r))
                .map(to_json),
        );
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(axum::Json(json!({ "items": found })).into_response())
}

fn timestamp_arg(body: &Value, field: &str) -> Result<Option<prost_types::Timestamp>, ApiError> {
    let Some(text) = string_field(body, field)? else {
        return Ok(None);
    };
    sluice_proto::time::parse_rfc3339(text)
        .map(Some)
        .map_err(|reason| ApiError::Invalid(sluice_proto::ConfigErrors::single(field, reason)))
}

/// A body's string field; absent or `null` is `None`, any other type a 422 naming it (a
/// number for `grace_period` must not read as no grace at all).
fn string_field<'a>(body: &'a Value, field: &str) -> Result<Option<&'a str>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(ApiError::Invalid(sluice_proto::ConfigErrors::single(
            field,
            "must be a string",
        ))),
    }
}

/// Refuses a body that is not a JSON object, or that has a field not in `allowed`.
fn only_fields(body: &Value, allowed: &[&str]) -> Result<(), ApiError> {
    let Some(map) = body.as_object() else {
        return Err(ApiError::BadRequest(
            "the body is not a JSON object".to_owned(),
        ));
    };
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::Invalid(sluice_proto::ConfigErrors::single(
            unknown.clone(),
            "unknown field",
        )));
    }
    Ok(())
}

pub(super) async fn create_key(
    State(s): State<AppState>,
    caller: Caller,
    Path(consumer): Path<String>,
    params: Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Role::Editor)?;
    let args = QueryArgs::new(params, &["group", "message"])?;
    let owner = owner(&s.registry, &consumer, &args).await?;
    let body = json_body(&body)?;
    only_fields(&body, &["name", "expires_at"])?;
    let message = message(&args, format!("create API key for {}", describe(&owner)));
    let name = string_field(&body, "name")?;
    let issued = keys::create(
        &s.registry,
        &caller,
        &owner,
        name,
        timestamp_arg(&body, "expires_at")?,
        &message,
    )
    .await?;
    Ok(issued_response(&issued))
}

/// A key just issued: the plaintext (this once), the credential, and for a rotation the
/// retired key.
fn issued_response(issued: &keys::Issued) -> Response {
    let mut body = json!({
        "key": issued.plaintext,
        "credential": to_json(&issued.credential),
        "version": version_json(issued.committed.version.as_ref()),
    });
    if let Some(previous) = &issued.previous {
        body["previous"] = to_json(previous);
    }
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

pub(super) async fn rotate_key(
    State(s): State<AppState>,
    caller: Caller,
    Path((consumer, key)): Path<(String, String)>,
    params: Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Role::Editor)?;
    let args = QueryArgs::new(params, &["group", "message"])?;
    let owner = owner(&s.registry, &consumer, &args).await?;
    let old = owned_credential(&s.registry, &owner, &key).await?;
    let body = json_body(&body)?;
    only_fields(&body, &["grace_period"])?;
    let grace = match string_field(&body, "grace_period")? {
        None => std::time::Duration::ZERO,
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            ApiError::Invalid(sluice_proto::ConfigErrors::single(
                "grace_period",
                format!("{text:?} is not a duration: {e}"),
            ))
        })?,
    };
    let message = message(
        &args,
        format!("rotate API key {} of {}", describe(&old), describe(&owner)),
    );
    let issued = keys::rotate(&s.registry, &caller, &owner, &old, grace, &message).await?;
    Ok(issued_response(&issued))
}

pub(super) async fn revoke_key(
    State(s): State<AppState>,
    caller: Caller,
    Path((consumer, key)): Path<(String, String)>,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Editor)?;
    let args = QueryArgs::new(params, &["group", "message"])?;
    let owner = owner(&s.registry, &consumer, &args).await?;
    let credential = owned_credential(&s.registry, &owner, &key).await?;
    let message = message(
        &args,
        format!("revoke {} of {}", describe(&credential), describe(&owner)),
    );
    let committed = keys::revoke(&s.registry, &caller, &credential, &message).await?;
    let stored = committed.resources.into_iter().next().flatten();
    Ok(with_etag(
        StatusCode::OK,
        &stored.ok_or_else(|| ApiError::Internal("a revoke stored nothing".into()))?,
    ))
}

// ---- versions -------------------------------------------------------------------------------

pub(super) async fn list_versions(
    State(s): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let args = QueryArgs::new(params, &["limit", "before"])?;
    let limit = u32::try_from(args.number("limit")?.unwrap_or(100)).unwrap_or(u32::MAX);
    let (versions, next) = s
        .registry
        .list_versions(args.number("before")?, limit)
        .await?;
    Ok(axum::Json(json!({ "items": versions, "next": next })).into_response())
}

/// Prometheus metrics; no token needed, like `/healthz` (keep the listener private).
pub(super) async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

pub(super) async fn list_dataplanes(
    State(s): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let args = QueryArgs::new(params, &["group", "limit", "after"])?;
    let limit = u32::try_from(args.number("limit")?.unwrap_or(100)).unwrap_or(u32::MAX);
    let (nodes, next) = crate::discovery::status::list(
        s.registry.pool(),
        args.text("group"),
        args.text("after"),
        limit,
    )
    .await
    .map_err(RegistryError::from_db)?;
    let items: Vec<Value> = nodes
        .iter()
        .map(crate::discovery::status::to_json)
        .collect();
    Ok(axum::Json(json!({ "items": items, "next": next })).into_response())
}

fn version_number(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::BadRequest(format!("{text:?} is not a version number")))
}

pub(super) async fn get_version(
    State(s): State<AppState>,
    caller: Caller,
    Path(number): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let args = QueryArgs::new(params, &["group"])?;
    let number = version_number(&number)?;
    // A state can outlive its version row (version 0, or one whose metadata was pruned while
    // every later change is still kept): show it with no metadata rather than refuse it.
    let info = match s.registry.version(number).await {
        Ok(info) => Some(info),
        Err(RegistryError::VersionNotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let state = s.registry.state_at(number, args.text("group")).await?;
    Ok(
        axum::Json(json!({ "version": info, "snapshot": declarative::export(&state) }))
            .into_response(),
    )
}

pub(super) async fn diff_versions(
    State(s): State<AppState>,
    caller: Caller,
    Path((from, to)): Path<(String, String)>,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    QueryArgs::new(params, &[])?;
    let (from, to) = (version_number(&from)?, version_number(&to)?);
    let changes = s.registry.diff(from, to).await?;
    Ok(axum::Json(json!({ "from": from, "to": to, "changes": changes })).into_response())
}

pub(super) async fn rollback(
    State(s): State<AppState>,
    caller: Caller,
    Path(number): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Editor)?;
    let args = QueryArgs::new(params, &["message", "dry_run"])?;
    let number = version_number(&number)?;
    let dry_run = args.flag("dry_run")?;
    let message = message(&args, format!("rollback to {number}"));
    let committed = s
        .registry
        .commit_plan(&caller.name, &message, Plan::RollbackTo(number), dry_run)
        .await?;
    Ok(axum::Json(json!({
        "dry_run": dry_run,
        "version": version_json(committed.version.as_ref()),
        "changes": diff_changes(&committed.changes),
    }))
    .into_response())
}

// ---- declarative ----------------------------------------------------------------------------

fn document_format(headers: &HeaderMap) -> Format {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type.contains("json") {
        Format::Json
    } else {
        Format::Yaml
    }
}

fn text_body(body: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not UTF-8: {e}")))
}

pub(super) async fn apply(
    State(s): State<AppState>,
    caller: Caller,
    params: Params,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Role::Editor)?;
    let args = QueryArgs::new(params, &["dry_run", "message"])?;
    let dry_run = args.flag("dry_run")?;
    let config = declarative::load(text_body(&body)?, document_format(&headers))
        .map_err(ApiError::Invalid)?;
    let message = message(&args, "apply".into());
    let committed = s
        .registry
        .commit_plan(&caller.name, &message, Plan::Apply(config), dry_run)
        .await?;
    Ok(axum::Json(json!({
        "dry_run": dry_run,
        "version": version_json(committed.version.as_ref()),
        "changes": diff_changes(&committed.changes),
    }))
    .into_response())
}

pub(super) async fn export(
    State(s): State<AppState>,
    caller: Caller,
    params: Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let args = QueryArgs::new(params, &["group", "version", "format"])?;
    let group = args.text("group");
    let (version, mut state) = match args.number("version")? {
        Some(n) => (n, s.registry.state_at(n, group).await?),
        None => s.registry.state(group).await?,
    };
    sluice_proto::hash::canonicalize(&mut state);
    let document = declarative::export(&state);
    let wants_json = match args.text("format") {
        Some("json") => true,
        Some("yaml") => false,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "format: {other:?} is not json or yaml"
            )));
        }
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("json")),
    };
    let (content_type, text) = if wants_json {
        (
            "application/json",
            serde_json::to_string_pretty(&document).unwrap_or_default(),
        )
    } else {
        ("application/yaml", declarative::to_yaml(&document))
    };
    let mut response =
        (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], text).into_response();
    if let Ok(value) = HeaderValue::from_str(&version.to_string()) {
        response.headers_mut().insert("sluice-version", value);
    }
    Ok(response)
}

pub(super) async fn import_openapi(
    State(s): State<AppState>,
    caller: Caller,
    params: Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    use crate::import::openapi::{ImportOptions, import_openapi};
    caller.require(Role::Editor)?;
    let args = QueryArgs::new(params, &["dry_run", "message", "name", "group", "server"])?;
    let dry_run = args.flag("dry_run")?;
    let options = ImportOptions {
        api_name: args.text("name").map(str::to_owned),
        group: args.text("group").map(str::to_owned),
        server_index: usize::try_from(args.number("server")?.unwrap_or(0)).unwrap_or(usize::MAX),
    };
    let document = import_openapi(text_body(&body)?, &options).map_err(|e| {
        let (at, reason) = e.located();
        ApiError::Invalid(sluice_proto::ConfigErrors::single(at, reason))
    })?;
    let mut config = declarative::load_document(&document).map_err(ApiError::Invalid)?;
    // An import adds its API and upstream, or updates those of their names (as apply matches
    // them) in what the spec describes only; it leaves the rest of the registry be.
    let group = options
        .group
        .as_deref()
        .unwrap_or(declarative::DEFAULT_GROUP);
    let registered = |kind, name: Option<String>| {
        let registry = &s.registry;
        async move {
            let Some(name) = name else { return Ok(None) };
            match registry.find(kind, group, &name).await {
                Ok(resource) => Ok(resource.kind),
                Err(RegistryError::NotFound { .. }) => Ok(None),
                Err(e) => Err(ApiError::from(e)),
            }
        }
    };
    let name = |meta: Option<&pb::Meta>| meta.map(|m| m.name.clone());
    let api_name = config.apis.first().and_then(|a| name(a.meta.as_ref()));
    let upstream_name = config.upstreams.first().and_then(|u| name(u.meta.as_ref()));
    use pb::resource::Kind;
    let api = match registered(ResourceKind::Api, api_name).await? {
        Some(Kind::Api(api)) => Some(api),
        _ => None,
    };
    let upstream = match registered(ResourceKind::Upstream, upstream_name).await? {
        Some(Kind::Upstream(upstream)) => Some(upstream),
        _ => None,
    };
    // No upstream of that name, but its name's id held by one renamed since: the import's is
    // a new upstream with an id of its own (left to the renamed one, the id would be remapped
    // on apply, and every route that still goes to the renamed upstream would follow).
    if upstream.is_none()
        && let Some(imported) = config.upstreams.first().cloned()
        && derived_id_held_by_another(&s.registry, &Resource::from(imported.clone())).await?
    {
        let held = imported.meta.map(|m| m.id).unwrap_or_default();
        let fresh = uuid::Uuid::new_v4().to_string();
        crate::import::give_upstream_id(&mut config, &held, &fresh);
    }
    crate::import::onto_registered(&mut config, api, upstream);
    let message = message(&args, "import openapi".into());
    let committed = s
        .registry
        .commit_plan(&caller.name, &message, Plan::Merge(config), dry_run)
        .await?;
    Ok(axum::Json(json!({
        "dry_run": dry_run,
        "version": version_json(committed.version.as_ref()),
        "changes": diff_changes(&committed.changes),
        "document": document,
    }))
    .into_response())
}

// ---- tokens ---------------------------------------------------------------------------------

pub(super) async fn list_tokens(
    State(s): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    QueryArgs::new(params, &[])?;
    Ok(axum::Json(json!({ "items": auth::list_tokens(s.registry.pool()).await? })).into_response())
}

pub(super) async fn create_token(
    State(s): State<AppState>,
    caller: Caller,
    params: Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    QueryArgs::new(params, &[])?;
    let body = json_body(&body)?;
    only_fields(&body, &["name", "role"])?;
    let name = string_field(&body, "name")?.ok_or_else(|| {
        ApiError::Invalid(sluice_proto::ConfigErrors::single("name", "is required"))
    })?;
    let role: Role = body
        .get("role")
        .map(|r| serde_json::from_value(r.clone()))
        .transpose()
        .map_err(|_| {
            ApiError::Invalid(sluice_proto::ConfigErrors::single(
                "role",
                "must be viewer, editor or admin",
            ))
        })?
        .ok_or_else(|| {
            ApiError::Invalid(sluice_proto::ConfigErrors::single("role", "is required"))
        })?;
    let (token, info) = auth::create_token(s.registry.pool(), name, role, &caller.name).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "token": token, "info": info })),
    )
        .into_response())
}

pub(super) async fn delete_token(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    QueryArgs::new(params, &[])?;
    auth::delete_token(s.registry.pool(), &key).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
