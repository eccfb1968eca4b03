//! The admin listener (`127.0.0.1:9901` by default): liveness, readiness and the running
//! configuration. Not for clients: bind it to a private address.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::config::{ConfigStore, Source};

/// The admin endpoints over a node's config store.
pub fn router(store: Arc<ConfigStore>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/config", get(config))
        .with_state(store)
}

/// Live while the process answers at all.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready once a configuration is applied: only then can the node serve traffic.
async fn readyz(State(store): State<Arc<ConfigStore>>) -> Response {
    match store.current() {
        Some(_) => (StatusCode::OK, "ready\n").into_response(),
        None => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "no configuration has been applied yet",
        ),
    }
}

/// What the node runs: source, content hash, load time and resource counts.
async fn config(State(store): State<Arc<ConfigStore>>) -> Response {
    let Some(config) = store.current() else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "no configuration has been applied yet",
        );
    };
    let source = match &config.source {
        Source::File(path) => json!({ "kind": "file", "path": path.display().to_string() }),
    };
    let r = &config.resources;
    Json(json!({
        "source": source,
        "content_hash": config.content_hash,
        "loaded_at": humantime::format_rfc3339_millis(config.loaded_at).to_string(),
        "resources": {
            "apis": r.apis.len(),
            "routes": r.apis.iter().map(|a| a.routes.len()).sum::<usize>(),
            "upstreams": r.upstreams.len(),
            "consumers": r.consumers.len(),
            "credentials": r.credentials.len(),
            "plans": r.plans.len(),
            "subscriptions": r.subscriptions.len(),
            "policies": r.policies.len(),
            "brokers": r.brokers.len(),
        },
    }))
    .into_response()
}

/// An RFC 9457 problem document.
fn problem(status: StatusCode, kind: &str, detail: &str) -> Response {
    let body = json!({
        "type": format!("https://sluice.dev/problems/{kind}"),
        "title": status.canonical_reason().unwrap_or_default(),
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::config::CompiledConfig;

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn not_ready_until_a_config_is_applied() {
        let store = Arc::new(ConfigStore::default());
        assert_eq!(
            get(router(store.clone()), "/healthz").await.0,
            StatusCode::OK
        );
        let (status, body) = get(router(store.clone()), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("not-ready"), "{body}");

        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/sluice.yaml");
        store.apply(CompiledConfig::from_file(&example).unwrap());
        assert_eq!(
            get(router(store.clone()), "/readyz").await.0,
            StatusCode::OK
        );
        let (status, body) = get(router(store), "/config").await;
        assert_eq!(status, StatusCode::OK);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["resources"]["routes"], 7);
        assert_eq!(body["content_hash"].as_str().unwrap().len(), 64);
    }
}
