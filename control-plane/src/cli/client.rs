//! How `sluicectl` reaches the control plane: server and token from flags, environment or a
//! config file, and errors turned into sentences that say what to do.

use std::error::Error;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, StatusCode, redirect};
use serde::Deserialize;
use serde_json::Value;

/// Where the control plane is when nothing says otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7080";

/// Longest a single call may take. The control plane itself abandons a request after 120 s
/// and answers 503, so this only ends a call that something in between (a proxy) holds on to.
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

/// Reads the config file, with its path (to name it in errors about what it gave); a missing
/// default file is fine (`None`), a missing named one is not.
pub fn read_config(path: Option<&PathBuf>) -> Result<Option<(PathBuf, ConfigFile)>, CliError> {
    let (path, named) = match path {
        Some(path) => (path.clone(), true),
        None => match default_config_path() {
            Some(path) => (path, false),
            None => return Ok(None),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => match serde_yaml_ng::from_str(&text) {
            Ok(file) => Ok(Some((path, file))),
            Err(e) => Err(CliError::Usage(format!("{}: {e}", path.display()))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => Ok(None),
        Err(e) => Err(CliError::Usage(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Where the server or the token came from, named in errors about it.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A flag, e.g. `--token`. The default server is named as `--server` too: it is a valid
    /// URL, so it is only ever named in advice, where the flag is the way to change it.
    Flag(&'static str),
    /// An environment variable, e.g. `SLUICE_TOKEN`.
    Env(&'static str),
    /// A key of the config file at this path.
    File(PathBuf, &'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flag(name) | Self::Env(name) => f.write_str(name),
            Self::File(path, key) => write!(f, "`{key}` in {}", path.display()),
        }
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
    server_origin: Origin,
    token: Option<(String, Origin)>,
}

/// A 2xx reply, before its body is read as what the call expects.
struct Raw {
    status: StatusCode,
    content_type: Option<String>,
    /// `Sluice-Version`: the version an export is of.
    version: Option<String>,
    text: String,
}

impl Client {
    /// Refuses (as a usage error) a server that is not an http(s) URL, before anything is
    /// sent: `127.0.0.1:7080` would otherwise fail every call with a puzzling builder error.
    pub fn new(
        server: String,
        server_origin: Origin,
        token: Option<(String, Origin)>,
    ) -> Result<Self, CliError> {
        let is_http = url::Url::parse(&server)
            .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.has_host());
        if !is_http {
            let guess = if server.contains("://") {
                String::new()
            } else {
                format!("; did you mean http://{server}?")
            };
            return Err(CliError::Usage(format!(
                "{server_origin} is {server:?}, not an http:// or https:// URL{guess}"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            // The control plane never redirects. Following one (to an auth proxy's login
            // page, say) would turn a POST into a GET whose 200 reads as success.
            .redirect(redirect::Policy::none())
            .build()
            .map_err(|e| CliError::Usage(format!("cannot make an HTTP client: {e}")))?;
        Ok(Self {
            http,
            server: server.trim_end_matches('/').to_owned(),
            server_origin,
            token,
        })
    }

    /// Calls the API and reads its JSON reply (`null` for 204 No Content). A 2xx body that is
    /// not JSON is an error: it comes from something other than the control plane.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Body,
        headers: &[(&str, String)],
    ) -> Result<Value, CliError> {
        let reply = self.send(method, path, body, headers).await?;
        if reply.status == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        serde_json::from_str(&reply.text).map_err(|_| self.not_ours(&reply, "JSON"))
    }

    /// Reads a declarative document (YAML, or JSON when asked for) and the version it is of.
    pub async fn document(&self, path: &str) -> Result<(String, Option<String>), CliError> {
        let reply = self.send(Method::GET, path, Body::None, &[]).await?;
        // Almost any text is YAML (an HTML page is one long string), so a document is
        // recognised by being a mapping.
        let is_document = serde_json::from_str::<Value>(&reply.text)
            .ok()
            .or_else(|| serde_yaml_ng::from_str::<Value>(&reply.text).ok())
            .is_some_and(|value| value.is_object());
        if !is_document {
            return Err(self.not_ours(&reply, "a YAML or JSON document"));
        }
        Ok((reply.text, reply.version))
    }

    /// Sends a request; any answer but a 2xx is an error.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Body,
        headers: &[(&str, String)],
    ) -> Result<Raw, CliError> {
        let url = format!("{}{path}", self.server);
        let write = method != Method::GET;
        let mut request = self.http.request(method, &url);
        if let Some((token, _)) = &self.token {
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
        let response = request
            .send()
            .await
            .map_err(|e| self.transport(&e, write))?;
        let status = response.status();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if status.is_redirection() {
            let target =
                header("location").map_or_else(|| "elsewhere".to_owned(), |to| format!("to {to}"));
            return Err(CliError::Api(format!(
                "the server answered {}, redirecting {target}: point {} at the control plane's \
                 REST address itself",
                status_line(status),
                self.server_origin
            )));
        }
        let content_type = header("content-type");
        let version = header("sluice-version");
        let text = response
            .text()
            .await
            .map_err(|e| self.transport(&e, write))?;
        if !status.is_success() {
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            return Err(CliError::Api(self.explain(status, &body)));
        }
        Ok(Raw {
            status,
            content_type,
            version,
            text,
        })
    }

    /// A 2xx that the control plane would not send: a proxy or another server answered.
    fn not_ours(&self, reply: &Raw, expected: &str) -> CliError {
        CliError::Api(format!(
            "the server answered {} with {}, not {expected}: point {} at the control plane's \
             REST address itself",
            status_line(reply.status),
            reply
                .content_type
                .as_deref()
                .map_or_else(|| "a body".to_owned(), |t| format!("a {t} body")),
            self.server_origin
        ))
    }

    /// No answer at all. reqwest's own message only says that sending failed; the reason (a
    /// refused connection, an unknown certificate issuer) is in its causes.
    fn transport(&self, error: &reqwest::Error, write: bool) -> CliError {
        if error.is_connect() {
            let refused = causes(error).any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
            });
            let hint = if refused || error.is_timeout() {
                " Is sluice-cp running? Set --server or SLUICE_SERVER."
            } else {
                ""
            };
            CliError::Unreachable(format!(
                "cannot reach the control plane at {}: {}.{hint}",
                self.server,
                chain(error)
            ))
        } else if error.is_timeout() {
            // The request may have arrived: a write may have been committed after all.
            let retry = if write {
                "; the control plane may still have committed it: check `sluicectl versions \
                 list` before retrying"
            } else {
                ""
            };
            CliError::Unreachable(format!(
                "no answer from the control plane at {} within {} s{retry}",
                self.server,
                CALL_TIMEOUT.as_secs()
            ))
        } else {
            CliError::Unreachable(format!(
                "the request to {} failed: {}",
                self.server,
                chain(error)
            ))
        }
    }

    /// A problem document as sentences, with a hint for the statuses a person can fix.
    fn explain(&self, status: StatusCode, body: &Value) -> String {
        let detail = match body.get("detail").unwrap_or(body) {
            Value::String(text) => text.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        let mut out = status_line(status);
        if let Some(line) = detail.lines().next() {
            out.push_str(&format!(": {line}"));
        }
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
        let hint = match (status, &self.token) {
            (StatusCode::UNAUTHORIZED, Some((_, origin))) => Some(format!(
                "the token from {origin} was refused: it is mistyped, deleted, or another \
                 control plane's"
            )),
            (StatusCode::UNAUTHORIZED, None) => {
                Some("pass a token with --token, SLUICE_TOKEN or the config file".to_owned())
            }
            (StatusCode::FORBIDDEN, _) => {
                Some("ask an admin for a token with a stronger role".to_owned())
            }
            (StatusCode::PRECONDITION_FAILED, _) => {
                Some("someone changed it since you read it: get it again and retry".to_owned())
            }
            _ => None,
        };
        if let Some(hint) = hint {
            out.push_str(&format!("\nhint: {hint}"));
        }
        out
    }
}

/// A request body.
#[derive(Debug)]
pub enum Body {
    None,
    Json(Value),
    Text(String, &'static str),
}

/// `302 Found`.
fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default()
    )
}

/// An error and its causes, outermost first.
fn causes<'a>(error: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(error), |&e| e.source())
}

/// An error and each of its causes, joined with `: `.
fn chain(error: &(dyn Error + 'static)) -> String {
    let mut out = String::new();
    for cause in causes(error) {
        let text = cause.to_string();
        // Some layers repeat their cause in their own message.
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
