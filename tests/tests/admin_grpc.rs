//! The gRPC admin API of a real `sluice-cp`: the same semantics as REST, with gRPC codes,
//! plus reflection and the standard health service.

use sluice_proto::pb::{self, ResourceKind, registry_client::RegistryClient};
use sluice_tests::control_plane::{ADMIN_TOKEN, ControlPlane};
use tonic::transport::Channel;
use tonic::{Code, Request};

const EXAMPLE: &str = include_str!("../../deploy/examples/sluice.yaml");

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn upstream(name: &str) -> pb::Resource {
    pb::Upstream {
        meta: Some(pb::Meta {
            name: name.into(),
            ..Default::default()
        }),
        targets: vec![pb::Target {
            url: "http://127.0.0.1:8081".into(),
            weight: 0,
        }],
        ..Default::default()
    }
    .into()
}

async fn client(cp: &ControlPlane) -> anyhow::Result<RegistryClient<Channel>> {
    Ok(RegistryClient::connect(cp.grpc_url()).await?)
}

#[tokio::test]
async fn roles_and_resource_crud_over_grpc() -> anyhow::Result<()> {
    let cp = ControlPlane::start(&[]).await?;
    let mut rpc = client(&cp).await?;

    let denied = rpc
        .list_resources(pb::ListResourcesRequest {
            kind: ResourceKind::Api as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);
    let viewer = rpc
        .create_token(authed(
            pb::CreateTokenRequest {
                name: "grpc-viewer".into(),
                role: pb::AdminRole::Viewer as i32,
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    assert_eq!(
        viewer.info.as_ref().unwrap().role,
        pb::AdminRole::Viewer as i32
    );
    let forbidden = rpc
        .create_resource(authed(
            pb::CreateResourceRequest {
                resource: Some(upstream("svc")),
                message: String::new(),
            },
            &viewer.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(forbidden.code(), Code::PermissionDenied);

    let created = rpc
        .create_resource(authed(
            pb::CreateResourceRequest {
                resource: Some(upstream("svc")),
                message: "first".into(),
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    let stored = created.resource.unwrap();
    assert_eq!(stored.meta().unwrap().resource_version, 1);
    assert_eq!(created.version.as_ref().unwrap().number, 1);
    assert_eq!(created.version.unwrap().message, "first");
    let again = rpc
        .create_resource(authed(
            pb::CreateResourceRequest {
                resource: Some(upstream("svc")),
                message: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);

    let by_name = rpc
        .get_resource(authed(
            pb::GetResourceRequest {
                kind: ResourceKind::Upstream as i32,
                group: "default".into(),
                name: "svc".into(),
                ..Default::default()
            },
            &viewer.token,
        ))
        .await?
        .into_inner();
    assert_eq!(by_name, stored);

    // Update with the current If-Match, then a stale one.
    let mut changed = stored.clone();
    if let Some(pb::resource::Kind::Upstream(u)) = &mut changed.kind {
        u.targets[0].weight = 7;
    }
    let updated = rpc
        .update_resource(authed(
            pb::UpdateResourceRequest {
                resource: Some(changed.clone()),
                if_match: 1,
                message: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    assert_eq!(
        updated.resource.unwrap().meta().unwrap().resource_version,
        2
    );
    let stale = rpc
        .update_resource(authed(
            pb::UpdateResourceRequest {
                resource: Some(changed),
                if_match: 1,
                message: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);

    // Invalid: the shared validator's path in the message.
    let mut bad = upstream("bad");
    if let Some(pb::resource::Kind::Upstream(u)) = &mut bad.kind {
        u.targets[0].url = "ftp://x".into();
    }
    let invalid = rpc
        .create_resource(authed(
            pb::CreateResourceRequest {
                resource: Some(bad),
                message: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid.message().contains("targets[0].url"),
        "{}",
        invalid.message()
    );

    // Paging.
    rpc.create_resource(authed(
        pb::CreateResourceRequest {
            resource: Some(upstream("svc2")),
            message: String::new(),
        },
        ADMIN_TOKEN,
    ))
    .await?;
    let page = rpc
        .list_resources(authed(
            pb::ListResourcesRequest {
                kind: ResourceKind::Upstream as i32,
                page_size: 1,
                ..Default::default()
            },
            &viewer.token,
        ))
        .await?
        .into_inner();
    assert_eq!(page.items.len(), 1);
    let rest = rpc
        .list_resources(authed(
            pb::ListResourcesRequest {
                kind: ResourceKind::Upstream as i32,
                page_size: 1,
                page_token: page.next_page_token,
                ..Default::default()
            },
            &viewer.token,
        ))
        .await?
        .into_inner();
    assert_eq!(rest.items.len(), 1);
    assert!(rest.next_page_token.is_empty());

    // An API that routes to svc2 keeps it from being deleted: FAILED_PRECONDITION.
    let svc2 =
        sluice_proto::declarative::normalize::derived_id(ResourceKind::Upstream, "default", "svc2");
    let api: pb::Resource = pb::Api {
        meta: Some(pb::Meta {
            name: "uses-svc2".into(),
            ..Default::default()
        }),
        routes: vec![pb::Route {
            id: uuid::Uuid::new_v4().to_string(),
            name: "r".into(),
            r#match: Some(pb::RouteMatch {
                path: Some(pb::PathMatch {
                    kind: pb::path_match::Kind::Prefix as i32,
                    value: "/".into(),
                }),
                ..Default::default()
            }),
            action: Some(pb::route::Action::Proxy(pb::ProxyAction {
                upstream_id: svc2.clone(),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
    .into();
    rpc.create_resource(authed(
        pb::CreateResourceRequest {
            resource: Some(api),
            message: String::new(),
        },
        ADMIN_TOKEN,
    ))
    .await?;
    let in_use = rpc
        .delete_resource(authed(
            pb::DeleteResourceRequest {
                kind: ResourceKind::Upstream as i32,
                id: svc2,
                if_match: 0,
                message: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        in_use.code(),
        Code::FailedPrecondition,
        "{}",
        in_use.message()
    );

    let deleted = rpc
        .delete_resource(authed(
            pb::DeleteResourceRequest {
                kind: ResourceKind::Upstream as i32,
                id: stored.id().into(),
                if_match: 0,
                message: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    assert!(deleted.version.is_some());
    let gone = rpc
        .get_resource(authed(
            pb::GetResourceRequest {
                kind: ResourceKind::Upstream as i32,
                id: stored.id().into(),
                ..Default::default()
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    let tokens = rpc
        .list_tokens(authed(pb::ListTokensRequest {}, ADMIN_TOKEN))
        .await?
        .into_inner();
    assert_eq!(tokens.tokens.len(), 1);
    assert_eq!(
        rpc.list_tokens(authed(pb::ListTokensRequest {}, &viewer.token))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    rpc.delete_token(authed(
        pb::DeleteTokenRequest {
            key: "grpc-viewer".into(),
        },
        ADMIN_TOKEN,
    ))
    .await?;
    let revoked = rpc
        .list_tokens(authed(pb::ListTokensRequest {}, &viewer.token))
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), Code::Unauthenticated);
    Ok(())
}

#[tokio::test]
async fn apply_versions_keys_health_and_reflection_over_grpc() -> anyhow::Result<()> {
    let cp = ControlPlane::start(&[]).await?;
    let mut rpc = client(&cp).await?;

    let dry = rpc
        .apply(authed(
            pb::ApplyRequest {
                document: EXAMPLE.into(),
                format: pb::apply_request::Format::Yaml as i32,
                dry_run: true,
                message: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    assert!(dry.version.is_none());
    assert_eq!(dry.diff.unwrap().changes.len(), 18);
    let v1 = rpc
        .apply(authed(
            pb::ApplyRequest {
                document: EXAMPLE.into(),
                format: pb::apply_request::Format::Yaml as i32,
                dry_run: false,
                message: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner()
        .version
        .unwrap();
    let bad = rpc
        .apply(authed(
            pb::ApplyRequest {
                document: "format_version: 1\nplans: [{name: p, colour: 1}]".into(),
                ..Default::default()
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("plans[0].colour"),
        "{}",
        bad.message()
    );

    // A key for the example's consumer, rotated and revoked.
    let consumer = rpc
        .get_resource(authed(
            pb::GetResourceRequest {
                kind: ResourceKind::Consumer as i32,
                name: "acme".into(),
                ..Default::default()
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    let issued = rpc
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                consumer_id: consumer.id().into(),
                name: "grpc-key".into(),
                expires_at: None,
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    let credential = issued.credential.unwrap();
    assert_eq!(
        credential.kind,
        Some(pb::credential::Kind::ApiKey(pb::ApiKeyCredential {
            key_sha256: sluice_proto::declarative::normalize::hash_api_key(&issued.plaintext_key),
            prefix: issued.plaintext_key.chars().take(9).collect(),
        }))
    );
    let credential_id = credential.meta.unwrap().id;
    let rotated = rpc
        .rotate_api_key(authed(
            pb::RotateApiKeyRequest {
                credential_id: credential_id.clone(),
                grace_period_s: 0,
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    assert_ne!(rotated.plaintext_key, issued.plaintext_key);
    let old = rpc
        .get_resource(authed(
            pb::GetResourceRequest {
                kind: ResourceKind::Credential as i32,
                id: credential_id,
                ..Default::default()
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    assert!(matches!(old.kind, Some(pb::resource::Kind::Credential(c)) if c.revoked));
    let fresh_id = rotated.credential.unwrap().meta.unwrap().id;
    rpc.revoke_api_key(authed(
        pb::RevokeApiKeyRequest {
            credential_id: fresh_id,
        },
        ADMIN_TOKEN,
    ))
    .await?;

    // Versions: list, get, diff, rollback, export.
    let versions = rpc
        .list_versions(authed(
            pb::ListVersionsRequest {
                page_size: 10,
                page_token: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    let numbers: Vec<u64> = versions.versions.iter().map(|v| v.number).collect();
    assert_eq!(numbers, [4, 3, 2, 1]);
    let detail = rpc
        .get_version(authed(
            pb::GetVersionRequest {
                number: 1,
                group: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    assert_eq!(detail.snapshot.unwrap().credentials.len(), 2);
    let diff = rpc
        .diff_versions(authed(
            pb::DiffVersionsRequest { from: 1, to: 4 },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    assert_eq!(diff.changes.len(), 2, "two keys added since version 1");
    assert!(
        diff.changes
            .iter()
            .all(|c| c.op == pb::resource_change::Op::Added as i32)
    );
    let rolled = rpc
        .rollback(authed(
            pb::RollbackRequest {
                to_version: 1,
                message: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    assert_eq!(
        rolled.version.as_ref().unwrap().content_hash,
        v1.content_hash
    );
    let export = rpc
        .export(authed(
            pb::ExportRequest {
                group: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await?
        .into_inner();
    assert_eq!(export.version.unwrap().number, 5);
    let exported =
        sluice_proto::declarative::load(&export.document, sluice_proto::declarative::Format::Yaml)?;
    assert_eq!(exported.credentials.len(), 2);
    let too_far = rpc
        .get_version(authed(
            pb::GetVersionRequest {
                number: 99,
                group: String::new(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(too_far.code(), Code::NotFound);

    // The standard health service and reflection.
    let channel = Channel::from_shared(cp.grpc_url())?.connect().await?;
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sluice.v1.Registry".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let reply = replies.message().await?.expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply")
    };
    assert!(
        list.service.iter().any(|s| s.name == "sluice.v1.Registry"),
        "{:?}",
        list.service
    );
    Ok(())
}
