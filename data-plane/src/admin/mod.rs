//! The admin listener (`127.0.0.1:9901` by default): liveness, readiness, the running
//! configuration (never its secrets) and Prometheus metrics. Not for clients: bind it to a
//! private address.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::config::{ConfigStore, Source};
use crate::telemetry::Metrics;

#[derive(Debug, Clone)]
struct AdminState {
    store: Arc<ConfigStore>,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
}

/// The admin endpoints over a node's config store and metrics. `draining` is set once the
/// node stops taking connections.
pub fn router(store: Arc<ConfigStore>, metrics: Arc<Metrics>, draining: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/config", get(config))
        .route("/metrics", get(prometheus))
        .with_state(AdminState {
            store,
            metrics,
            draining,
        })
}

/// Prometheus text exposition.
async fn prometheus(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Live while the process answers at all.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready once a configuration is applied (only then can the node serve traffic), and no
/// longer once it is draining (it takes no new connections: a load balancer should send them
/// elsewhere).
async fn readyz(State(state): State<AdminState>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the node is shutting down and takes no new connections",
        );
    }
    match state.store.current() {
        Some(_) => (StatusCode::OK, "ready\n").into_response(),
        None => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "no configuration has been applied yet",
        ),
    }
}

/// What the node runs: source, content hash, load time and resource counts.
async fn config(State(state): State<AdminState>) -> Response {
    let Some(config) = state.store.current() else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "no configuration has been applied yet",
        );
    };
    let source = match &config.source {
        Source::File(path) => json!({ "kind": "file", "path": path.display().to_string() }),
        Source::ControlPlane { version } => json!({ "kind": "control_plane", "version": version }),
    };
    let c = &config.counts;
    Json(json!({
        "source": source,
        "content_hash": config.content_hash,
        "loaded_at": humantime::format_rfc3339_millis(config.loaded_at).to_string(),
        "resources": {
            "apis": c.apis,
            "routes": c.routes,
            "upstreams": c.upstreams,
            "consumers": c.consumers,
            "credentials": c.credentials,
            "plans": c.plans,
            "subscriptions": c.subscriptions,
            "policies": c.policies,
            "brokers": c.brokers,
            "certificates": c.certificates,
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
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(ConfigStore::new(
            crate::auth::jwks::JwksCache::new(tokio::runtime::Handle::current()),
            metrics.clone(),
        ));
        let admin =
            |store: &Arc<ConfigStore>| router(store.clone(), metrics.clone(), Arc::default());
        assert_eq!(get(admin(&store), "/healthz").await.0, StatusCode::OK);
        let (status, body) = get(admin(&store), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("not-ready"), "{body}");

        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/sluice.yaml");
        store.apply(CompiledConfig::from_file(&example, None, &metrics, &store.jwks).unwrap());
        assert_eq!(get(admin(&store), "/readyz").await.0, StatusCode::OK);
        let (status, body) = get(admin(&store), "/config").await;
        assert_eq!(status, StatusCode::OK);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["resources"]["routes"], 7);
        assert_eq!(body["content_hash"].as_str().unwrap().len(), 64);
        let (status, body) = get(admin(&store), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("sluice_config_swaps_total"), "{body}");
        assert!(
            body.contains("sluice_upstream_duration_seconds_sum{"),
            "{body}"
        );
        // A route's series appear with its first request, not before.
        assert!(!body.contains("sluice_requests_total{"), "{body}");
    }
}
