//! How `sluicectl` reaches the control plane: server and token from flags, environment or a
//! config file, and errors turned into sentences that say what to do.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;

/// Where the control plane is when nothing says otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7080";

/// Longest a single call may take (large applies included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// `~/.config/sluice/sluicectl.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub server: Option<String>,
    pub token: Option<String>,
}

/// The default config file path.
pub fn default_config_path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|dir| dir.join("sluice").join("sluicectl.yaml"))
}

/// Reads the config file; a missing default file is fine, a missing named one is not.
pub fn read_config(path: Option<&PathBuf>) -> Result<ConfigFile, CliError> {
    let (path, named) = match path {
        Some(path) => (path.clone(), true),
        None => match default_config_path() {
            Some(path) => (path, false),
            None => return Ok(ConfigFile::default()),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_yaml_ng::from_str(&text)
            .map_err(|e| CliError::Usage(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => Ok(ConfigFile::default()),
        Err(e) => Err(CliError::Usage(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// What went wrong, in words a person can act on. `Usage` exits 2, the others 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unreachable(String),
    /// The API said no: its problem detail and each field error.
    #[error("{0}")]
    Api(String),
}

/// A REST client of the admin API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
}

/// A successful reply.
#[derive(Debug)]
pub struct Reply {
    pub body: Value,
    pub etag: Option<String>,
}

impl Client {
    pub fn new(server: String, token: Option<String>) -> Result<Self, CliError> {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| CliError::Usage(format!("cannot make an HTTP client: {e}")))?;
        Ok(Self {
            http,
            server: server.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// Calls the API; `body` is JSON, or raw text with its content type.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Body,
        headers: &[(&str, String)],
    ) -> Result<Reply, CliError> {
        let url = format!("{}{path}", self.server);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        request = match body {
            Body::None => request,
            Body::Json(value) => request.json(&value),
            Body::Text(text, content_type) => {
                request.header("content-type", content_type).body(text)
            }
        };
        let response = request.send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() {
                CliError::Unreachable(format!(
                    "cannot reach the control plane at {}: {e}. Is sluice-cp running? Set --server or SLUICE_SERVER.",
                    self.server
                ))
            } else {
                CliError::Unreachable(format!("request to {url} failed: {e}"))
            }
        })?;
        let status = response.status();
        let etag = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_matches('"').to_owned());
        let text = response
            .text()
            .await
            .map_err(|e| CliError::Unreachable(format!("reading the reply failed: {e}")))?;
        let body: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_success() {
            return Ok(Reply { body, etag });
        }
        Err(CliError::Api(explain(status, &body)))
    }
}

/// A request body.
#[derive(Debug)]
pub enum Body {
    None,
    Json(Value),
    Text(String, &'static str),
}

/// A problem document as sentences, with a hint for the statuses a person can fix.
fn explain(status: StatusCode, body: &Value) -> String {
    let detail = body
        .get("detail")
        .and_then(Value::as_str)
        .map_or_else(|| body.to_string(), str::to_owned);
    let mut out = format!(
        "{} {}: {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default(),
        detail.lines().next().unwrap_or_default()
    );
    if let Some(errors) = body.get("errors").and_then(Value::as_array) {
        for error in errors {
            let path = error
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let reason = error
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if path.is_empty() {
                out.push_str(&format!("\n  {reason}"));
            } else {
                out.push_str(&format!("\n  {path}: {reason}"));
            }
        }
    }
    let hint = match status {
        StatusCode::UNAUTHORIZED => {
            Some("pass a token with --token, SLUICE_TOKEN or the config file")
        }
        StatusCode::FORBIDDEN => Some("ask an admin for a token with a stronger role"),
        StatusCode::PRECONDITION_FAILED => {
            Some("someone changed it since you read it: get it again and retry")
        }
        _ => None,
    };
    if let Some(hint) = hint {
        out.push_str(&format!("\nhint: {hint}"));
    }
    out
}
