//! The one place errors become responses: RFC 9457 problem documents on REST, statuses on
//! gRPC. Nothing internal (SQL, stack traces) reaches a client; database failures are logged
//! and answered with a generic 500/INTERNAL.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sluice_proto::ConfigErrors;

use crate::registry::RegistryError;

/// An admin API error.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed but invalid: every problem with its field.
    #[error("{0}")]
    Invalid(ConfigErrors),
    #[error("{0}")]
    Conflict(String),
    /// Refused because other resources still refer to it: 409 on REST, FAILED_PRECONDITION on
    /// gRPC (retrying cannot help until the references go).
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    PreconditionFailed(String),
    /// The version asked for is gone (past retention).
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("this endpoint does not take that method; see /v1/openapi.json")]
    MethodNotAllowed,
    #[error(
        "the request took too long and was abandoned; nothing was committed unless a version was reported"
    )]
    Timeout,
    /// The control plane cannot serve now (its database does not answer): try another replica.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// (status, stable problem type, title).
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            Self::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::InUse(_) => (StatusCode::CONFLICT, "in-use"),
            Self::PreconditionFailed(_) => (StatusCode::PRECONDITION_FAILED, "precondition-failed"),
            Self::Gone(_) => (StatusCode::GONE, "version-not-retained"),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed"),
            Self::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// Errors of a single-resource body: paths relative to the body.
    pub fn invalid_in_body(errors: ConfigErrors, prefix: &str) -> Self {
        let errors = errors
            .0
            .into_iter()
            .map(|mut e| {
                if let Some(rest) = e.path.strip_prefix(prefix) {
                    e.path = rest.trim_start_matches('.').to_owned();
                }
                e
            })
            .collect();
        Self::Invalid(ConfigErrors(errors))
    }

    pub fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self {
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::Forbidden(_) => Code::PermissionDenied,
            Self::NotFound(_) => Code::NotFound,
            Self::BadRequest(_) | Self::Invalid(_) | Self::PayloadTooLarge(_) => {
                Code::InvalidArgument
            }
            Self::Conflict(_) => Code::AlreadyExists,
            Self::InUse(_) => Code::FailedPrecondition,
            Self::PreconditionFailed(_) => Code::Aborted,
            Self::Gone(_) => Code::OutOfRange,
            Self::MethodNotAllowed => Code::Unimplemented,
            Self::Timeout => Code::DeadlineExceeded,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(cause) => {
                tracing::error!(error = %cause, "admin request failed");
                return tonic::Status::internal(INTERNAL_DETAIL);
            }
        };
        tonic::Status::new(code, self.to_string())
    }
}

/// What a caller is told of an internal failure; the cause goes to the log, not to callers.
const INTERNAL_DETAIL: &str = "the control plane could not complete the request; see its logs";

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound { .. } | RegistryError::VersionNotFound(_) => {
                Self::NotFound(e.to_string())
            }
            RegistryError::PreconditionFailed { .. } => Self::PreconditionFailed(e.to_string()),
            RegistryError::Invalid(errors) => Self::Invalid(errors),
            RegistryError::Conflict(message) => Self::Conflict(message),
            RegistryError::StillReferenced(message) => Self::InUse(message),
            RegistryError::VersionNotRetained { .. } => Self::Gone(e.to_string()),
            RegistryError::Unavailable(message) => {
                tracing::warn!(error = %message, "registry database unavailable");
                Self::Unavailable(message)
            }
            // Logged where it is answered (REST and gRPC alike).
            RegistryError::Database(_) | RegistryError::Corrupt(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        e.to_status()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.parts();
        let detail = match &self {
            Self::Internal(cause) => {
                tracing::error!(error = %cause, "admin request failed");
                INTERNAL_DETAIL.to_owned()
            }
            other => other.to_string(),
        };
        let mut body = json!({
            "type": format!("https://sluice.dev/problems/{kind}"),
            "title": status.canonical_reason().unwrap_or_default(),
            "status": status.as_u16(),
            "detail": detail,
        });
        if let Self::Invalid(errors) = &self {
            body["errors"] = errors
                .iter()
                .map(|e| json!({ "path": e.path, "reason": e.reason }))
                .collect();
        }
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sluice-admin\""),
            );
        }
        response
    }
}

/// Turns the bare error replies produced outside the handlers (a body over the size limit, a
/// method an endpoint does not take, a request past the timeout) into problem documents, so
/// every error a client sees has the same shape.
pub async fn problem_for_bare_errors(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if is_problem || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge("the body is larger than this endpoint accepts".into())
        }
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        StatusCode::SERVICE_UNAVAILABLE => ApiError::Timeout,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ApiError::BadRequest("unsupported content type".into())
        }
        StatusCode::BAD_REQUEST => {
            ApiError::BadRequest("the request's path or query is malformed".into())
        }
        _ => return response,
    };
    let mut replaced = error.into_response();
    if let Some(allow) = response.headers().get(header::ALLOW) {
        replaced.headers_mut().insert(header::ALLOW, allow.clone());
    }
    replaced
}
