//! The REST admin API (`127.0.0.1:7080` by default).
//!
//! Every endpoint is listed once in [`endpoints::ENDPOINTS`], which the router is checked
//! against and from which `/v1/openapi.json` is generated.

pub mod endpoints;
mod handlers;

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::routing::{get, post};

use super::auth::{Authenticator, Caller};
use super::error::ApiError;
use crate::registry::Registry;

/// Largest body of a single-resource request.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Longest a request may take before the client gets a 503 (large applies included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub registry: Registry,
    pub auth: Authenticator,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or_default());
        state.auth.authenticate(header).await
    }
}

/// The REST API.
pub fn router(state: AppState) -> Router {
    use handlers::*;
    let documents = Router::new()
        .route("/v1/apply", post(apply))
        .route("/v1/import/openapi", post(import_openapi))
        .layer(DefaultBodyLimit::max(
            sluice_proto::declarative::MAX_DOCUMENT_BYTES,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/export", get(export))
        .route("/v1/versions", get(list_versions))
        .route("/v1/dataplanes", get(list_dataplanes))
        .route("/v1/versions/{number}", get(get_version))
        .route("/v1/versions/{from}/diff/{to}", get(diff_versions))
        .route("/v1/versions/{number}/rollback", post(rollback))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{key}", axum::routing::delete(delete_token))
        .route(
            "/v1/consumers/{consumer}/credentials",
            get(list_credentials).post(create_credential),
        )
        .route(
            "/v1/consumers/{consumer}/credentials/{credential}",
            get(get_credential).delete(delete_credential),
        )
        .route(
            "/v1/consumers/{consumer}/keys",
            get(list_keys).post(create_key),
        )
        .route(
            "/v1/consumers/{consumer}/keys/{credential}/rotate",
            post(rotate_key),
        )
        .route(
            "/v1/consumers/{consumer}/keys/{credential}/revoke",
            post(revoke_key),
        )
        .route(
            "/v1/{collection}",
            get(list_resources).post(create_resource),
        )
        .route(
            "/v1/{collection}/{key}",
            get(get_resource)
                .put(update_resource)
                .delete(delete_resource),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .merge(documents)
        .fallback(not_found)
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        // Outside the timeout, so that its bare 503 gets a problem document too.
        .layer(axum::middleware::map_response(
            super::error::problem_for_bare_errors,
        ))
        .with_state(state)
}
