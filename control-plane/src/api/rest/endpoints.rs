//! Every REST endpoint, listed once. `/v1/openapi.json` is generated from this table and the
//! schemas of the declarative format (the same types that parse request bodies); a test
//! checks that the router answers every entry.

use serde_json::{Map, Value, json};
use sluice_proto::pb::ResourceKind;
use sluice_proto::validate::list_name;

use crate::api::auth::Role;

/// What a request or response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    /// One resource of the path's collection, in the declarative vocabulary.
    Resource,
    /// A page of resources: `{items, next}`.
    Page,
    /// A whole declarative document (YAML or JSON).
    Document,
    /// An OpenAPI 3 spec (YAML or JSON).
    OpenApiSpec,
    /// A JSON object described in the summary.
    Json,
    /// Plain text.
    Text,
}

#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    pub method: &'static str,
    /// `{collection}` stands for each resource collection.
    pub path: &'static str,
    pub summary: &'static str,
    /// `None`: no token needed.
    pub role: Option<Role>,
    pub request: Body,
    pub response: Body,
    pub success: u16,
    pub query: &'static [&'static str],
}

/// One row of [`ENDPOINTS`]: positional, so the table reads as a table.
#[allow(clippy::too_many_arguments)]
const fn ep(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    role: Option<Role>,
    request: Body,
    response: Body,
    success: u16,
    query: &'static [&'static str],
) -> Endpoint {
    Endpoint {
        method,
        path,
        summary,
        role,
        request,
        response,
        success,
        query,
    }
}

const VIEW: Option<Role> = Some(Role::Viewer);
const EDIT: Option<Role> = Some(Role::Editor);
const ADMIN: Option<Role> = Some(Role::Admin);

/// The collections `{collection}` expands to.
pub const COLLECTIONS: [ResourceKind; 8] = [
    ResourceKind::Api,
    ResourceKind::Upstream,
    ResourceKind::Consumer,
    ResourceKind::Plan,
    ResourceKind::Subscription,
    ResourceKind::Policy,
    ResourceKind::Broker,
    ResourceKind::Certificate,
];

pub const ENDPOINTS: &[Endpoint] = &[
    ep(
        "get",
        "/healthz",
        "Liveness of the control plane.",
        None,
        Body::None,
        Body::Text,
        200,
        &[],
    ),
    ep(
        "get",
        "/readyz",
        "Readiness: 200 while the registry database answers, else 503.",
        None,
        Body::None,
        Body::Text,
        200,
        &[],
    ),
    ep(
        "get",
        "/metrics",
        "Prometheus metrics (OpenMetrics text): commit-to-ACK time, connected data planes.",
        None,
        Body::None,
        Body::Text,
        200,
        &[],
    ),
    ep(
        "get",
        "/v1/openapi.json",
        "This document.",
        None,
        Body::None,
        Body::Json,
        200,
        &[],
    ),
    ep(
        "get",
        "/v1/{collection}",
        "List resources, by id, a page at a time. `consumer`, `api`, `plan` filter subscriptions (and `consumer` credentials) by id or name.",
        VIEW,
        Body::None,
        Body::Page,
        200,
        &["group", "limit", "after", "consumer", "api", "plan"],
    ),
    ep(
        "post",
        "/v1/{collection}",
        "Create a resource. References are names (in its group) or ids. 409 if it exists.",
        EDIT,
        Body::Resource,
        Body::Resource,
        201,
        &["group", "message"],
    ),
    ep(
        "get",
        "/v1/{collection}/{key}",
        "Get a resource by id, or by name in `group`. The ETag is its resource_version.",
        VIEW,
        Body::None,
        Body::Resource,
        200,
        &["group"],
    ),
    ep(
        "put",
        "/v1/{collection}/{key}",
        "Replace a resource. With If-Match, 412 unless it is still at that resource_version.",
        EDIT,
        Body::Resource,
        Body::Resource,
        200,
        &["group", "message"],
    ),
    ep(
        "delete",
        "/v1/{collection}/{key}",
        "Delete a resource; 409 while others refer to it. Honours If-Match.",
        EDIT,
        Body::None,
        Body::None,
        204,
        &["group", "message"],
    ),
    ep(
        "get",
        "/v1/consumers/{consumer}/credentials",
        "List a consumer's credentials.",
        VIEW,
        Body::None,
        Body::Page,
        200,
        &["group", "limit", "after"],
    ),
    ep(
        "post",
        "/v1/consumers/{consumer}/credentials",
        "Add a credential (api_key with key or key_sha256, jwt, mtls).",
        EDIT,
        Body::Resource,
        Body::Resource,
        201,
        &["group", "message"],
    ),
    ep(
        "get",
        "/v1/consumers/{consumer}/credentials/{credential}",
        "Get one of a consumer's credentials.",
        VIEW,
        Body::None,
        Body::Resource,
        200,
        &["group"],
    ),
    ep(
        "delete",
        "/v1/consumers/{consumer}/credentials/{credential}",
        "Delete a credential. Honours If-Match.",
        EDIT,
        Body::None,
        Body::None,
        204,
        &["group", "message"],
    ),
    ep(
        "get",
        "/v1/consumers/{consumer}/keys",
        "List a consumer's API keys: hashes and prefixes, never the keys.",
        VIEW,
        Body::None,
        Body::Json,
        200,
        &["group"],
    ),
    ep(
        "post",
        "/v1/consumers/{consumer}/keys",
        "Generate an API key. Body {name?, expires_at?}. The key is in the response, once; only its hash is stored.",
        EDIT,
        Body::Json,
        Body::Json,
        201,
        &["group", "message"],
    ),
    ep(
        "post",
        "/v1/consumers/{consumer}/keys/{credential}/rotate",
        "Replace a key with a new one. Body {grace_period?}: how long the old key keeps working (default: revoked at once).",
        EDIT,
        Body::Json,
        Body::Json,
        201,
        &["group", "message"],
    ),
    ep(
        "post",
        "/v1/consumers/{consumer}/keys/{credential}/revoke",
        "Revoke a key.",
        EDIT,
        Body::None,
        Body::Resource,
        200,
        &["group", "message"],
    ),
    ep(
        "get",
        "/v1/dataplanes",
        "Data-plane status (every node, or one group's): what each runs, when it was last heard from, what it last refused.",
        VIEW,
        Body::None,
        Body::Json,
        200,
        &["group"],
    ),
    ep(
        "get",
        "/v1/versions",
        "List versions, newest first.",
        VIEW,
        Body::None,
        Body::Json,
        200,
        &["limit", "before"],
    ),
    ep(
        "get",
        "/v1/versions/{number}",
        "One version: its metadata (null once pruned) and the whole registry (or one group) as it was, as a document.",
        VIEW,
        Body::None,
        Body::Json,
        200,
        &["group"],
    ),
    ep(
        "get",
        "/v1/versions/{from}/diff/{to}",
        "Resources added, changed (with each field) and removed between two versions.",
        VIEW,
        Body::None,
        Body::Json,
        200,
        &[],
    ),
    ep(
        "post",
        "/v1/versions/{number}/rollback",
        "Restore the state of a version, committed as a new version. 410 past retention.",
        EDIT,
        Body::None,
        Body::Json,
        200,
        &["message", "dry_run"],
    ),
    ep(
        "post",
        "/v1/apply",
        "Make the registry equal a whole declarative document, as one version; with dry_run=true, return the diff and commit nothing.",
        EDIT,
        Body::Document,
        Body::Json,
        200,
        &["dry_run", "message"],
    ),
    ep(
        "get",
        "/v1/export",
        "The registry (or one group, or a past version) as a declarative document; YAML, or JSON with format=json or Accept: application/json.",
        VIEW,
        Body::None,
        Body::Document,
        200,
        &["group", "version", "format"],
    ),
    ep(
        "post",
        "/v1/import/openapi",
        "Turn an OpenAPI 3 spec into an API (a route per path and method) and an upstream (from servers), added to the registry.",
        EDIT,
        Body::OpenApiSpec,
        Body::Json,
        200,
        &["dry_run", "message", "name", "group", "server"],
    ),
    ep(
        "get",
        "/v1/tokens",
        "List admin tokens (never the tokens themselves).",
        ADMIN,
        Body::None,
        Body::Json,
        200,
        &[],
    ),
    ep(
        "post",
        "/v1/tokens",
        "Create an admin token. Body {name, role: viewer|editor|admin}. The token is in the response, once.",
        ADMIN,
        Body::Json,
        Body::Json,
        201,
        &[],
    ),
    ep(
        "delete",
        "/v1/tokens/{key}",
        "Delete an admin token by id or name.",
        ADMIN,
        Body::None,
        Body::None,
        204,
        &[],
    ),
];

/// The schema name of a collection's resource in the declarative schema.
fn schema_name(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Api => "Api",
        ResourceKind::Upstream => "Upstream",
        ResourceKind::Consumer => "Consumer",
        ResourceKind::Credential => "Credential",
        ResourceKind::Plan => "Plan",
        ResourceKind::Subscription => "Subscription",
        ResourceKind::Policy => "Policy",
        ResourceKind::Broker => "Broker",
        ResourceKind::Certificate => "Certificate",
        ResourceKind::Unspecified => "Document",
    }
}

fn body_schema(body: Body, kind: ResourceKind) -> Value {
    let resource = json!({ "$ref": format!("#/components/schemas/{}", schema_name(kind)) });
    match body {
        Body::Resource => resource,
        Body::Page => {
            json!({ "type": "object", "properties": { "items": { "type": "array", "items": resource }, "next": { "type": ["string", "null"] } } })
        }
        Body::Document => json!({ "$ref": "#/components/schemas/Document" }),
        Body::OpenApiSpec | Body::Text => json!({ "type": "string" }),
        Body::Json | Body::None => json!({ "type": "object" }),
    }
}

fn content(body: Body, kind: ResourceKind) -> Value {
    let schema = body_schema(body, kind);
    match body {
        Body::Document | Body::OpenApiSpec => {
            json!({ "application/yaml": { "schema": schema }, "application/json": { "schema": schema } })
        }
        Body::Text => json!({ "text/plain": { "schema": schema } }),
        _ => json!({ "application/json": { "schema": schema } }),
    }
}

fn operation(endpoint: &Endpoint, path: &str, kind: ResourceKind) -> Value {
    let mut parameters: Vec<Value> = path
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
        .collect();
    parameters.extend(endpoint.query.iter().map(|name| json!({ "name": name, "in": "query", "required": false, "schema": { "type": "string" } })));
    let mut responses = Map::new();
    let success = if endpoint.response == Body::None {
        json!({ "description": "Done." })
    } else {
        json!({ "description": "Success.", "content": content(endpoint.response, kind) })
    };
    responses.insert(endpoint.success.to_string(), success);
    for (status, description) in [
        ("400", "Malformed request."),
        ("401", "No valid bearer token."),
        ("403", "The token's role does not allow this."),
        ("404", "No such resource or version."),
        (
            "409",
            "Conflicts with the registry (a name in use, a resource still referenced).",
        ),
        ("412", "If-Match does not match the resource_version."),
        ("422", "Invalid: every error with its path."),
    ] {
        responses.insert(status.into(), json!({ "description": description, "content": { "application/problem+json": { "schema": { "$ref": "#/components/schemas/Problem" } } } }));
    }
    let mut op = json!({
        "summary": endpoint.summary,
        "operationId": format!("{}{}", endpoint.method, path.replace(['/', '{', '}', '.'], "_")),
        "parameters": parameters,
        "responses": responses,
    });
    match endpoint.role {
        Some(role) => {
            op["security"] = json!([{ "bearer": [] }]);
            op["x-sluice-role"] = role.as_str().into();
        }
        None => op["security"] = json!([]),
    }
    if endpoint.request != Body::None {
        op["requestBody"] = json!({ "required": true, "content": content(endpoint.request, kind) });
    }
    op
}

/// The OpenAPI 3.1 document of the REST API.
pub fn openapi_document() -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for endpoint in ENDPOINTS {
        let expansions: Vec<(String, ResourceKind)> = if endpoint.path.contains("{collection}") {
            COLLECTIONS
                .iter()
                .map(|k| (endpoint.path.replace("{collection}", list_name(*k)), *k))
                .collect()
        } else if endpoint.path.contains("/credentials") {
            vec![(endpoint.path.to_owned(), ResourceKind::Credential)]
        } else {
            vec![(endpoint.path.to_owned(), ResourceKind::Unspecified)]
        };
        for (path, kind) in expansions {
            let item = paths.entry(path.clone()).or_insert_with(|| json!({}));
            item[endpoint.method] = operation(endpoint, &path, kind);
        }
    }
    // Resource schemas are the declarative format's: the REST API takes the same shapes.
    let declarative = sluice_proto::declarative::json_schema();
    let text = serde_json::to_string(&declarative)
        .unwrap_or_default()
        .replace("#/$defs/", "#/components/schemas/");
    let declarative: Value = serde_json::from_str(&text).unwrap_or_default();
    let mut schemas = declarative
        .get("$defs")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let mut document = declarative.clone();
    if let Value::Object(map) = &mut document {
        map.remove("$defs");
        map.remove("$schema");
    }
    schemas["Document"] = document;
    schemas["Problem"] = json!({
        "type": "object",
        "description": "RFC 9457 problem details.",
        "properties": {
            "type": { "type": "string" },
            "title": { "type": "string" },
            "status": { "type": "integer" },
            "detail": { "type": "string" },
            "errors": { "type": "array", "items": { "type": "object", "properties": { "path": { "type": "string" }, "reason": { "type": "string" } } } }
        }
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Sluice control plane admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Registry of APIs, routes, upstreams, consumers, plans, subscriptions, policies and brokers, versioned: every change is a version that can be diffed and rolled back. Errors are application/problem+json.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        },
    })
}
