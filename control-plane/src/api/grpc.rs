//! The registry admin API over gRPC (`127.0.0.1:7090` by default), with the same semantics as
//! REST: the same registry calls, roles, validation and errors (mapped to gRPC codes by
//! [`ApiError::to_status`]). Resources travel as protobuf messages, references as ids. The
//! server also offers gRPC reflection and the standard health service.

use std::future::Future;
use std::time::Duration;

use sluice_proto::declarative::{self, Format};
use sluice_proto::pb::{self, Resource, ResourceKind, registry_server};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use super::auth::{Authenticator, Caller, Role};
use super::error::ApiError;
use super::keys;
use crate::registry::{ListFilter, Plan, Registry, RegistryError, VersionInfo, Write};
use crate::versions::{Op, ResourceDiff, diff_changes};

/// Serves the registry service, reflection and health on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    auth: Authenticator,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<registry_server::RegistryServer<RegistryService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled descriptor set is valid");
    tonic::transport::Server::builder()
        .timeout(super::rest::REQUEST_TIMEOUT)
        .add_service(health)
        .add_service(reflection)
        .add_service(service(registry, auth))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
}

/// The registry service, for serving or for in-memory tests.
pub fn service(
    registry: Registry,
    auth: Authenticator,
) -> registry_server::RegistryServer<RegistryService> {
    registry_server::RegistryServer::new(RegistryService { registry, auth })
        .max_decoding_message_size(declarative::MAX_DOCUMENT_BYTES)
}

#[derive(Debug, Clone)]
pub struct RegistryService {
    registry: Registry,
    auth: Authenticator,
}

impl RegistryService {
    async fn caller<T>(&self, request: &Request<T>, role: Role) -> Result<Caller, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let caller = self.auth.authenticate(header).await?;
        caller.require(role)?;
        Ok(caller)
    }
}

fn kind_of(value: i32) -> Result<ResourceKind, Status> {
    match ResourceKind::try_from(value) {
        Ok(ResourceKind::Unspecified) | Err(_) => {
            Err(Status::invalid_argument("kind must name a resource kind"))
        }
        Ok(kind) => Ok(kind),
    }
}

fn uuid_filter(
    filters: &std::collections::BTreeMap<String, String>,
    key: &str,
) -> Result<Option<uuid::Uuid>, Status> {
    filters
        .get(key)
        .map(|v| {
            uuid::Uuid::parse_str(v)
                .map_err(|_| Status::invalid_argument(format!("filter {key}={v:?} is not an id")))
        })
        .transpose()
}

fn version_pb(info: &VersionInfo) -> pb::VersionInfo {
    pb::VersionInfo {
        number: info.number,
        content_hash: info.content_hash.clone(),
        actor: info.actor.clone(),
        message: info.message.clone(),
        created_at: Some(sluice_proto::time::timestamp(&info.created_at)),
    }
}

fn diff_pb(diffs: Vec<ResourceDiff>) -> pb::VersionDiff {
    use pb::resource_change::Op as PbOp;
    pb::VersionDiff {
        changes: diffs
            .into_iter()
            .map(|d| pb::ResourceChange {
                op: match d.op {
                    Op::Added => PbOp::Added,
                    Op::Changed => PbOp::Changed,
                    Op::Removed => PbOp::Removed,
                } as i32,
                resource: Some(pb::ResourceRef {
                    kind: crate::registry::rows::kind_from_name(d.kind).unwrap_or_default() as i32,
                    id: d.id,
                }),
                group: d.group,
                name: d.name,
                fields: d
                    .fields
                    .into_iter()
                    .map(|f| pb::FieldChange {
                        path: f.path,
                        before: f.before.map(|v| v.to_string()).unwrap_or_default(),
                        after: f.after.map(|v| v.to_string()).unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Gives a new resource its derived id when it has none, as REST and documents do (or an id
/// of its own when a resource renamed since holds that one).
async fn with_id(registry: &Registry, mut resource: Resource) -> Result<Resource, Status> {
    let kind = resource.kind();
    let meta = resource
        .meta_mut()
        .ok_or_else(|| Status::invalid_argument("resource has no meta"))?;
    if meta.group.is_empty() {
        meta.group = declarative::DEFAULT_GROUP.into();
    }
    if meta.id.is_empty() {
        meta.id = declarative::normalize::derived_id(kind, &meta.group, &meta.name);
        if super::derived_id_held_by_another(registry, &resource).await?
            && let Some(meta) = resource.meta_mut()
        {
            meta.id = uuid::Uuid::new_v4().to_string();
        }
    }
    Ok(resource)
}

/// A key just issued, as gRPC returns it.
fn issued_pb(issued: keys::Issued) -> pb::ApiKeyIssued {
    pb::ApiKeyIssued {
        credential: match issued.credential.kind {
            Some(pb::resource::Kind::Credential(c)) => Some(c),
            _ => None,
        },
        plaintext_key: issued.plaintext,
        version: issued.committed.version.as_ref().map(version_pb),
    }
}

fn write_result(resource: Option<Resource>, version: Option<&VersionInfo>) -> pb::WriteResult {
    pb::WriteResult {
        resource,
        version: version.map(version_pb),
    }
}

fn describe(resource: &Resource) -> String {
    let name = resource.meta().map(|m| m.name.as_str()).unwrap_or_default();
    format!(
        "{} {name}",
        sluice_proto::validate::kind_name(resource.kind())
    )
}

#[tonic::async_trait]
impl registry_server::Registry for RegistryService {
    async fn get_resource(
        &self,
        request: Request<pb::GetResourceRequest>,
    ) -> Result<Response<Resource>, Status> {
        self.caller(&request, Role::Viewer).await?;
        let r = request.into_inner();
        let kind = kind_of(r.kind)?;
        let resource = if r.id.is_empty() {
            let group = if r.group.is_empty() {
                declarative::DEFAULT_GROUP
            } else {
                r.group.as_str()
            };
            self.registry.find(kind, group, &r.name).await
        } else {
            self.registry.get(kind, &r.id).await
        };
        Ok(Response::new(resource.map_err(ApiError::from)?))
    }

    async fn list_resources(
        &self,
        request: Request<pb::ListResourcesRequest>,
    ) -> Result<Response<pb::ListResourcesResponse>, Status> {
        self.caller(&request, Role::Viewer).await?;
        let r = request.into_inner();
        let kind = kind_of(r.kind)?;
        if let Some(unknown) = r
            .filters
            .keys()
            .find(|k| !["consumer_id", "api_id", "plan_id"].contains(&k.as_str()))
        {
            return Err(Status::invalid_argument(format!(
                "unknown filter {unknown:?}; filters are consumer_id, api_id, plan_id"
            )));
        }
        let filter = ListFilter {
            group: (!r.group.is_empty()).then_some(r.group.clone()),
            consumer_id: uuid_filter(&r.filters, "consumer_id")?,
            api_id: uuid_filter(&r.filters, "api_id")?,
            plan_id: uuid_filter(&r.filters, "plan_id")?,
        };
        let after = (!r.page_token.is_empty())
            .then(|| {
                uuid::Uuid::parse_str(&r.page_token)
                    .map_err(|_| Status::invalid_argument("page_token is not one this API gave"))
            })
            .transpose()?;
        let size = if r.page_size == 0 { 100 } else { r.page_size };
        let page = self
            .registry
            .list(kind, &filter, after, size)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListResourcesResponse {
            items: page.items,
            next_page_token: page.next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn create_resource(
        &self,
        request: Request<pb::CreateResourceRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let caller = self.caller(&request, Role::Editor).await?;
        let r = request.into_inner();
        let resource = with_id(
            &self.registry,
            r.resource
                .ok_or_else(|| Status::invalid_argument("resource is required"))?,
        )
        .await?;
        let message = if r.message.is_empty() {
            format!("create {}", describe(&resource))
        } else {
            r.message
        };
        let committed = self
            .registry
            .commit(
                &caller.name,
                &message,
                vec![Write::Put {
                    resource,
                    if_match: Some(0),
                }],
            )
            .await
            .map_err(|e| match e {
                RegistryError::PreconditionFailed { kind, id, .. } => {
                    ApiError::Conflict(format!("{kind} {id} already exists; use UpdateResource"))
                }
                other => other.into(),
            })?;
        Ok(Response::new(write_result(
            committed.resources.into_iter().next().flatten(),
            committed.version.as_ref(),
        )))
    }

    async fn update_resource(
        &self,
        request: Request<pb::UpdateResourceRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let caller = self.caller(&request, Role::Editor).await?;
        let r = request.into_inner();
        let mut resource = r
            .resource
            .ok_or_else(|| Status::invalid_argument("resource is required"))?;
        if resource.id().is_empty() {
            return Err(Status::invalid_argument(
                "resource.meta.id is required to update",
            ));
        }
        // Updating never creates: the resource must exist.
        let stored = self
            .registry
            .get(resource.kind(), resource.id())
            .await
            .map_err(ApiError::from)?;
        // An unset group is the stored one, as a REST PUT without one (groups never change).
        if let Some(meta) = resource.meta_mut()
            && meta.group.is_empty()
        {
            meta.group = stored.meta().map(|m| m.group.clone()).unwrap_or_default();
        }
        let message = if r.message.is_empty() {
            format!("update {}", describe(&resource))
        } else {
            r.message
        };
        // Updating never creates, even when a delete commits first.
        let if_match = Some(if r.if_match > 0 {
            r.if_match
        } else {
            Write::EXISTING
        });
        let committed = self
            .registry
            .commit(
                &caller.name,
                &message,
                vec![Write::Put { resource, if_match }],
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(write_result(
            committed.resources.into_iter().next().flatten(),
            committed.version.as_ref(),
        )))
    }

    async fn delete_resource(
        &self,
        request: Request<pb::DeleteResourceRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let caller = self.caller(&request, Role::Editor).await?;
        let r = request.into_inner();
        let kind = kind_of(r.kind)?;
        let current = self
            .registry
            .get(kind, &r.id)
            .await
            .map_err(ApiError::from)?;
        let message = if r.message.is_empty() {
            format!("delete {}", describe(&current))
        } else {
            r.message
        };
        let if_match = (r.if_match > 0).then_some(r.if_match);
        let committed = self
            .registry
            .commit(
                &caller.name,
                &message,
                vec![Write::Delete {
                    kind,
                    id: r.id,
                    if_match,
                }],
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(write_result(
            None,
            committed.version.as_ref(),
        )))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::ApiKeyIssued>, Status> {
        let caller = self.caller(&request, Role::Editor).await?;
        let r = request.into_inner();
        let owner = self
            .registry
            .get(ResourceKind::Consumer, &r.consumer_id)
            .await
            .map_err(ApiError::from)?;
        let name = (!r.name.is_empty()).then_some(r.name.as_str());
        let issued = keys::create(
            &self.registry,
            &caller,
            &owner,
            name,
            r.expires_at,
            &format!("create API key for {}", describe(&owner)),
        )
        .await?;
        Ok(Response::new(issued_pb(issued)))
    }

    async fn rotate_api_key(
        &self,
        request: Request<pb::RotateApiKeyRequest>,
    ) -> Result<Response<pb::ApiKeyIssued>, Status> {
        let caller = self.caller(&request, Role::Editor).await?;
        let r = request.into_inner();
        let old = self
            .registry
            .get(ResourceKind::Credential, &r.credential_id)
            .await
            .map_err(ApiError::from)?;
        let consumer_id = match &old.kind {
            Some(pb::resource::Kind::Credential(c)) => c.consumer_id.clone(),
            _ => String::new(),
        };
        let owner = self
            .registry
            .get(ResourceKind::Consumer, &consumer_id)
            .await
            .map_err(ApiError::from)?;
        let message = format!("rotate API key {} of {}", describe(&old), describe(&owner));
        let issued = keys::rotate(
            &self.registry,
            &caller,
            &owner,
            &old,
            Duration::from_secs(r.grace_period_s),
            &message,
        )
        .await?;
        Ok(Response::new(issued_pb(issued)))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let caller = self.caller(&request, Role::Editor).await?;
        let r = request.into_inner();
        let credential = self
            .registry
            .get(ResourceKind::Credential, &r.credential_id)
            .await
            .map_err(ApiError::from)?;
        let committed = keys::revoke(
            &self.registry,
            &caller,
            &credential,
            &format!("revoke {}", describe(&credential)),
        )
        .await?;
        Ok(Response::new(write_result(
            committed.resources.into_iter().next().flatten(),
            committed.version.as_ref(),
        )))
    }

    async fn list_versions(
        &self,
        request: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        self.caller(&request, Role::Viewer).await?;
        let r = request.into_inner();
        let before = (!r.page_token.is_empty())
            .then(|| {
                r.page_token
                    .parse::<u64>()
                    .map_err(|_| Status::invalid_argument("page_token is not one this API gave"))
            })
            .transpose()?;
        let size = if r.page_size == 0 { 100 } else { r.page_size };
        let (versions, next) = self
            .registry
            .list_versions(before, size)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListVersionsResponse {
            versions: versions.iter().map(version_pb).collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn get_version(
        &self,
        request: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::VersionDetail>, Status> {
        self.caller(&request, Role::Viewer).await?;
        let r = request.into_inner();
        // As on REST: a state kept after its version row was pruned is shown without it.
        let info = match self.registry.version(r.number).await {
            Ok(info) => Some(version_pb(&info)),
            Err(RegistryError::VersionNotFound(_)) => None,
            Err(e) => return Err(ApiError::from(e).into()),
        };
        let group = (!r.group.is_empty()).then_some(r.group.as_str());
        let snapshot = self
            .registry
            .state_at(r.number, group)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::VersionDetail {
            info,
            snapshot: Some(snapshot),
        }))
    }

    async fn diff_versions(
        &self,
        request: Request<pb::DiffVersionsRequest>,
    ) -> Result<Response<pb::VersionDiff>, Status> {
        self.caller(&request, Role::Viewer).await?;
        let r = request.into_inner();
        let diffs = self
            .registry
            .diff(r.from, r.to)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(diff_pb(diffs)))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let caller = self.caller(&request, Role::Editor).await?;
        let r = request.into_inner();
        let message = if r.message.is_empty() {
            format!("rollback to {}", r.to_version)
        } else {
            r.message
        };
        let committed = self
            .registry
            .commit_plan(
                &caller.name,
                &message,
                Plan::RollbackTo(r.to_version),
                false,
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(write_result(
            None,
            committed.version.as_ref(),
        )))
    }

    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let caller = self.caller(&request, Role::Editor).await?;
        let r = request.into_inner();
        let format = match pb::apply_request::Format::try_from(r.format) {
            Ok(pb::apply_request::Format::Json) => Format::Json,
            _ => Format::Yaml,
        };
        let config = declarative::load(&r.document, format).map_err(ApiError::Invalid)?;
        let message = if r.message.is_empty() {
            "apply".to_owned()
        } else {
            r.message
        };
        let committed = self
            .registry
            .commit_plan(&caller.name, &message, Plan::Apply(config), r.dry_run)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ApplyResponse {
            diff: Some(diff_pb(diff_changes(&committed.changes))),
            version: committed.version.as_ref().map(version_pb),
        }))
    }

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ExportResponse>, Status> {
        self.caller(&request, Role::Viewer).await?;
        let r = request.into_inner();
        let group = (!r.group.is_empty()).then_some(r.group.as_str());
        let (number, mut state) = self.registry.state(group).await.map_err(ApiError::from)?;
        sluice_proto::hash::canonicalize(&mut state);
        let version = if number == 0 {
            None
        } else {
            // Its record may have been pruned since the state was read (a commit in between,
            // with short retention): the document stands without it.
            match self.registry.version(number).await {
                Ok(info) => Some(version_pb(&info)),
                Err(RegistryError::VersionNotFound(_)) => None,
                Err(e) => return Err(ApiError::from(e).into()),
            }
        };
        Ok(Response::new(pb::ExportResponse {
            document: declarative::to_yaml(&declarative::export(&state)),
            version,
        }))
    }

    async fn list_data_planes(
        &self,
        request: Request<pb::ListDataPlanesRequest>,
    ) -> Result<Response<pb::ListDataPlanesResponse>, Status> {
        self.caller(&request, Role::Viewer).await?;
        let r = request.into_inner();
        let size = if r.page_size == 0 { 100 } else { r.page_size };
        let (nodes, next) = crate::discovery::status::list(
            self.registry.pool(),
            (!r.group.is_empty()).then_some(r.group.as_str()),
            (!r.page_token.is_empty()).then_some(r.page_token.as_str()),
            size,
        )
        .await
        .map_err(|e| ApiError::from(RegistryError::from_db(e)))?;
        Ok(Response::new(pb::ListDataPlanesResponse {
            nodes,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.caller(&request, Role::Admin).await?;
        let tokens = super::auth::list_tokens(self.registry.pool()).await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(token_pb).collect(),
        }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::TokenIssued>, Status> {
        let caller = self.caller(&request, Role::Admin).await?;
        let r = request.into_inner();
        let role = match pb::AdminRole::try_from(r.role) {
            Ok(pb::AdminRole::Viewer) => Role::Viewer,
            Ok(pb::AdminRole::Editor) => Role::Editor,
            Ok(pb::AdminRole::Admin) => Role::Admin,
            _ => {
                return Err(Status::invalid_argument(
                    "role must be viewer, editor or admin",
                ));
            }
        };
        let (token, info) =
            super::auth::create_token(self.registry.pool(), &r.name, role, &caller.name).await?;
        Ok(Response::new(pb::TokenIssued {
            info: Some(token_pb(&info)),
            token,
        }))
    }

    async fn delete_token(
        &self,
        request: Request<pb::DeleteTokenRequest>,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        self.caller(&request, Role::Admin).await?;
        super::auth::delete_token(self.registry.pool(), &request.into_inner().key).await?;
        Ok(Response::new(pb::DeleteTokenResponse {}))
    }
}

fn token_pb(info: &super::auth::TokenInfo) -> pb::AdminToken {
    pb::AdminToken {
        id: info.id.to_string(),
        name: info.name.clone(),
        role: match info.role {
            Role::Viewer => pb::AdminRole::Viewer,
            Role::Editor => pb::AdminRole::Editor,
            Role::Admin => pb::AdminRole::Admin,
        } as i32,
        prefix: info.prefix.clone(),
        created_at: Some(sluice_proto::time::timestamp(&info.created_at)),
        created_by: info.created_by.clone(),
    }
}
