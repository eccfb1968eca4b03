//! Every error a client can receive from the gateway itself, mapped to a status and an RFC 9457
//! problem document in one place. The `type` URIs are stable: clients may branch on them.
//! Details never carry upstream addresses or internal errors; those go to the log.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::auth::{Denial, rate_limit_headers};
use crate::events::PublishError;
use crate::events::idempotency::IdempotencyError;
use crate::events::subscribe::SubscribeError;
use crate::router::path::PathError;
use crate::upstream::{ProxyBody, UpstreamError};

/// Seconds a client is told to wait after a 503, unless the error knows better.
const RETRY_AFTER_SECONDS: u64 = 1;

/// Why the gateway answered instead of a backend.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no configuration has been applied yet")]
    NotReady,
    #[error("the request is malformed: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    BadPath(PathError),
    #[error("no route matches {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Access control refused the request (401, 403, 429, 503).
    #[error("{}", .0.detail)]
    Denied(Box<Denial>),
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    /// A publish route's request is not a valid event (a missing CloudEvents attribute, a
    /// body that is not JSON where JSON is needed, no value for the record key).
    #[error("{0}")]
    InvalidEvent(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The event breaks its route's JSON Schema; nothing was published.
    #[error("the event does not match the route's schema ({} errors)", .0.len())]
    SchemaViolation(Vec<SchemaError>),
    /// The broker did not take the event; the client was not told it did.
    #[error(transparent)]
    Publish(PublishError),
    #[error(transparent)]
    Subscribe(SubscribeError),
    #[error(transparent)]
    Idempotency(IdempotencyError),
}

/// One JSON Schema violation: where in the event, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SchemaError {
    /// RFC 6901 pointer into the event data ("" for the whole).
    pub pointer: String,
    pub detail: String,
}

impl GatewayError {
    /// `(status, problem type, reason code for logs and metrics)`.
    pub fn classify(&self) -> (StatusCode, &'static str) {
        match self {
            GatewayError::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not-ready"),
            GatewayError::Malformed(_) => (StatusCode::BAD_REQUEST, "malformed-request"),
            GatewayError::BadPath(_) => (StatusCode::BAD_REQUEST, "invalid-path"),
            GatewayError::NoRoute { .. } => (StatusCode::NOT_FOUND, "no-route"),
            GatewayError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large"),
            GatewayError::Denied(denial) => (denial.status, denial.reason),
            GatewayError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "body-timeout"),
            GatewayError::InvalidEvent(_) => (StatusCode::BAD_REQUEST, "invalid-event"),
            GatewayError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type")
            }
            GatewayError::SchemaViolation(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "schema-violation")
            }
            GatewayError::Publish(e) => match e {
                PublishError::QueueFull { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "broker-overloaded")
                }
                PublishError::Timeout { .. } => (StatusCode::SERVICE_UNAVAILABLE, "broker-timeout"),
                PublishError::Unavailable { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "broker-unavailable")
                }
                PublishError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "event-too-large"),
                PublishError::Refused { .. } => (StatusCode::BAD_GATEWAY, "broker-refused"),
            },
            GatewayError::Idempotency(e) => match e {
                IdempotencyError::BadKey => (StatusCode::BAD_REQUEST, "invalid-idempotency-key"),
                IdempotencyError::InProgress => (StatusCode::CONFLICT, "idempotency-in-progress"),
                IdempotencyError::Mismatch => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reused")
                }
                IdempotencyError::Unavailable(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "idempotency-unavailable")
                }
            },
            GatewayError::Subscribe(e) => match e {
                SubscribeError::Unavailable { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "broker-unavailable")
                }
                SubscribeError::Busy { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "subscribers-busy")
                }
                SubscribeError::Position { .. } => (StatusCode::BAD_REQUEST, "invalid-event"),
            },
            GatewayError::Upstream(e) => match e {
                UpstreamError::NoTarget(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "no-healthy-upstream")
                }
                UpstreamError::Overloaded(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "upstream-overloaded")
                }
                UpstreamError::CircuitOpen { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "circuit-open")
                }
                UpstreamError::Connect { .. } => (StatusCode::BAD_GATEWAY, "upstream-unreachable"),
                UpstreamError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "upstream-timeout"),
                UpstreamError::Failed { .. } => (StatusCode::BAD_GATEWAY, "upstream-failed"),
            },
        }
    }

    /// What the client is told: enough to act on, nothing internal.
    fn detail(&self) -> String {
        match self {
            GatewayError::Upstream(e) => match e {
                UpstreamError::NoTarget(name) => format!("upstream {name} has no healthy target"),
                UpstreamError::Overloaded(name) => {
                    format!("upstream {name} is at its limit of concurrent requests")
                }
                UpstreamError::Connect { upstream, .. } => {
                    format!("upstream {upstream} could not be reached")
                }
                UpstreamError::CircuitOpen { upstream, .. } => {
                    format!("upstream {upstream} is failing; its circuit breaker is open")
                }
                UpstreamError::Timeout(name) => format!("upstream {name} did not answer in time"),
                UpstreamError::Failed { upstream, .. } => {
                    format!("upstream {upstream} failed to answer")
                }
            },
            // The reason may name the broker's addresses: it goes to the log only.
            GatewayError::Subscribe(SubscribeError::Unavailable { broker, topic, .. }) => {
                format!("broker {broker} cannot serve topic {topic} now")
            }
            other => other.to_string(),
        }
    }

    /// Whether the connection must be closed after the answer (the request's framing cannot
    /// be trusted, so nothing after it on the connection can be either).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            GatewayError::Malformed(_)
                | GatewayError::BodyTooLarge { .. }
                | GatewayError::BodyTimeout
        )
    }

    /// The problem+json response, tagged with the request id.
    pub fn to_response(&self, request_id: &HeaderValue) -> Response<ProxyBody> {
        let (status, kind) = self.classify();
        let mut body = serde_json::json!({
            // Reason codes are snake_case in metrics and logs, kebab-case in problem types.
            "type": format!("https://sluice.dev/problems/{}", kind.replace('_', "-")),
            "title": status.canonical_reason().unwrap_or_default(),
            "status": status.as_u16(),
            "detail": self.detail(),
            "request_id": request_id.to_str().unwrap_or_default(),
        });
        if let GatewayError::SchemaViolation(errors) = self {
            body["errors"] = serde_json::json!(errors);
        }
        let mut response = Response::new(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        );
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let GatewayError::Denied(denial) = self {
            if let Some(challenge) = &denial.challenge {
                headers.insert(header::WWW_AUTHENTICATE, challenge.clone());
            }
            rate_limit_headers(headers, denial.rate.as_ref(), denial.retry_after);
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            let seconds = match self {
                // Whole seconds, rounded up: never tell a client to come back too early.
                GatewayError::Upstream(UpstreamError::CircuitOpen { retry_after, .. }) => {
                    u64::try_from(retry_after.as_millis().div_ceil(1000)).unwrap_or(u64::MAX)
                }
                _ => RETRY_AFTER_SECONDS,
            };
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        if self.closes_connection() {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
