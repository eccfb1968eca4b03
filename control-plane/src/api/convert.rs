//! Resources in and out of the admin API: a REST body is one resource in the declarative
//! format's vocabulary, checked and normalised by the same code as whole documents, with
//! references given as names (in the resource's group) or ids.

use serde_json::{Value, json};
use sluice_proto::declarative::{self, ExternalNames};
use sluice_proto::pb::{Resource, ResourceKind};
use sluice_proto::validate::list_name;

use super::error::ApiError;
use crate::registry::{Registry, RegistryError};

/// One resource as the API shows it: its document form plus `resource_version`.
pub fn to_json(resource: &Resource) -> Value {
    let mut value = declarative::export::export_resource(resource);
    if let Value::Object(map) = &mut value {
        let meta = resource.meta().cloned().unwrap_or_default();
        map.insert("group".into(), meta.group.into());
        map.insert("resource_version".into(), meta.resource_version.into());
    }
    value
}

/// The group a body asks for: its own `group`, else the query's, else "default".
fn group_of(body: &Value, query_group: Option<&str>) -> Result<String, ApiError> {
    let own = body.get("group").and_then(Value::as_str);
    match (own, query_group) {
        (Some(a), Some(b)) if a != b => Err(ApiError::BadRequest(format!(
            "the body's group {a:?} differs from the query's {b:?}"
        ))),
        (Some(g), _) | (None, Some(g)) => Ok(g.to_owned()),
        (None, None) => Ok(declarative::DEFAULT_GROUP.to_owned()),
    }
}

/// The references a body holds, by kind, as written (names or ids).
fn references(kind: ResourceKind, body: &Value) -> Vec<(ResourceKind, String)> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let list = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut refs = Vec::new();
    match kind {
        ResourceKind::Api => {
            refs.extend(
                list(body.get("policies"))
                    .into_iter()
                    .map(|n| (ResourceKind::Policy, n)),
            );
            for route in body
                .get("routes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                refs.extend(
                    list(route.get("policies"))
                        .into_iter()
                        .map(|n| (ResourceKind::Policy, n)),
                );
                refs.extend(
                    text(route.pointer("/proxy/upstream")).map(|n| (ResourceKind::Upstream, n)),
                );
                for canary in route
                    .pointer("/proxy/canaries")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    refs.extend(text(canary.get("upstream")).map(|n| (ResourceKind::Upstream, n)));
                }
                refs.extend(
                    text(route.pointer("/proxy/mirror/upstream"))
                        .map(|n| (ResourceKind::Upstream, n)),
                );
                refs.extend(
                    text(route.pointer("/publish/broker")).map(|n| (ResourceKind::Broker, n)),
                );
                refs.extend(
                    text(route.pointer("/subscribe/broker")).map(|n| (ResourceKind::Broker, n)),
                );
            }
        }
        ResourceKind::Consumer => {
            refs.extend(
                list(body.get("policies"))
                    .into_iter()
                    .map(|n| (ResourceKind::Policy, n)),
            );
        }
        ResourceKind::Subscription => {
            refs.extend(text(body.get("consumer")).map(|n| (ResourceKind::Consumer, n)));
            refs.extend(text(body.get("api")).map(|n| (ResourceKind::Api, n)));
            refs.extend(text(body.get("plan")).map(|n| (ResourceKind::Plan, n)));
        }
        _ => {}
    }
    refs
}

/// Looks up what the body's references name, so the normaliser can resolve them.
async fn external_names(
    registry: &Registry,
    group: &str,
    refs: Vec<(ResourceKind, String)>,
) -> Result<ExternalNames, ApiError> {
    let mut names = ExternalNames::new();
    for (kind, reference) in refs {
        let found = if uuid::Uuid::parse_str(&reference).is_ok() {
            registry.get(kind, &reference).await
        } else {
            registry.find(kind, group, &reference).await
        };
        match found {
            Ok(resource) => {
                names.insert(
                    (kind, group.to_owned(), reference),
                    resource.id().to_owned(),
                );
            }
            // Left unresolved: the normaliser reports it with its path.
            Err(RegistryError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(names)
}

/// A REST body → the resource it describes. `consumer` is the owner of a credential (for
/// credential bodies, which the document format nests under consumers).
pub async fn from_json(
    registry: &Registry,
    kind: ResourceKind,
    mut body: Value,
    query_group: Option<&str>,
    consumer: Option<&Resource>,
) -> Result<Resource, ApiError> {
    if !body.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    // Read-only fields of a representation sent back as it was read.
    if let Value::Object(map) = &mut body {
        map.remove("resource_version");
        if kind == ResourceKind::Credential {
            map.remove("consumer");
            map.remove("group");
        }
    }
    let group = match consumer {
        Some(owner) => owner.meta().map(|m| m.group.clone()).unwrap_or_default(),
        None => group_of(&body, query_group)?,
    };
    if kind != ResourceKind::Credential
        && let Value::Object(map) = &mut body
    {
        map.insert("group".into(), group.clone().into());
    }
    // A consumer's body is the consumer alone: credentials nested in it would be dropped.
    if kind == ResourceKind::Consumer
        && body
            .get("credentials")
            .is_some_and(|c| c.as_array().is_none_or(|list| !list.is_empty()))
    {
        return Err(ApiError::Invalid(sluice_proto::ConfigErrors(vec![
            sluice_proto::FieldError {
                path: "credentials".into(),
                reason: "credentials are added under /v1/consumers/{consumer}/credentials (or \
                         /keys), not in the consumer's body"
                    .into(),
                resource: None,
            },
        ])));
    }
    let refs = references(kind, &body);
    let (document_value, prefix) = match consumer {
        Some(owner) => {
            let meta = owner.meta().cloned().unwrap_or_default();
            (
                json!({ "format_version": 1, "consumers": [{ "name": meta.name, "id": meta.id, "group": meta.group, "credentials": [body] }] }),
                "consumers[0].credentials[0]".to_owned(),
            )
        }
        None => (
            json!({ "format_version": 1, list_name(kind): [body] }),
            format!("{}[0]", list_name(kind)),
        ),
    };
    let document = declarative::parse_value(document_value)
        .map_err(|e| ApiError::invalid_in_body(e, &prefix))?;
    let external = external_names(registry, &group, refs).await?;
    let (config, _, errors) = declarative::normalize_with(&document, &external);
    if !errors.is_empty() {
        return Err(ApiError::invalid_in_body(
            sluice_proto::ConfigErrors(errors),
            &prefix,
        ));
    }
    config
        .into_resources()
        .into_iter()
        .find(|r| r.kind() == kind)
        .ok_or_else(|| ApiError::Internal("the normalised body holds no resource".into()))
}
