//! OpenAPI 3.0 / 3.1 import: a spec becomes a declarative document with ONE API (a route per
//! path and method) and ONE upstream (the chosen `servers` entry).
//!
//! The import only describes routing; the caller applies the document, and the shared
//! validator (`sluice_proto::declarative::load_document`) has the final word. What the spec
//! says that Sluice cannot express is refused here, naming the place in the spec, rather than
//! turned into a document that the validator would then refuse in Sluice's vocabulary.
//!
//! A path item may be a `$ref` to a path item in the same document (`#/components/pathItems/…`);
//! YAML merge keys (`<<: *common`) are applied; a key given twice is refused.
//!
//! Deliberately ignored (they do not change which requests reach which backend):
//! - path- and operation-level `parameters`, request bodies, responses, security, tags;
//! - `webhooks` (3.1): those are calls the API makes, not requests it serves;
//! - `x-` extension keys of the paths object and of path items, and any other non-method key
//!   of a path item.
//!
//! Refused, naming the place: `$ref`s to other documents (bundle the spec first), and
//! `servers` on a path item or operation that differ from the spec's own (every route goes to
//! the one upstream).

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};
use sluice_proto::declarative::FORMAT_VERSION;
use sluice_proto::declarative::model::{
    Api, Document, PathMatchKind, ProxyAction, Route, Target, Upstream,
};
use sluice_proto::declarative::strict_value::StrictValue;
use sluice_proto::pb::path_match::Kind;
use sluice_proto::validate::{check_name, check_path};

/// Options of an import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Name of the API; default: derived from `info.title` (lowercased, non [a-z0-9._-] chars
    /// → '-', trimmed of '-', at most 63 chars; "api" if empty).
    pub api_name: Option<String>,
    /// Group of the API and upstream; default: none (the document's default group applies).
    pub group: Option<String>,
    /// Which `servers` entry gives the upstream; default 0.
    pub server_index: usize,
}

/// Why a spec cannot be imported. Every message names the place in the spec (or the option)
/// that is wrong, e.g. `paths./pets/{petId}: ...`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImportError {
    /// The text is neither YAML nor JSON.
    #[error("not valid YAML or JSON: {detail}")]
    Syntax {
        /// 1-based line of the problem, when the parser knows it.
        line: Option<usize>,
        /// 1-based column of the problem, when the parser knows it.
        column: Option<usize>,
        /// The parser's message, with its location.
        detail: String,
    },
    /// A Swagger 2.0 document: a different format, refused rather than misread.
    #[error(
        "swagger: Swagger {version} (OpenAPI 2) is not supported; convert the spec to OpenAPI 3 \
         first (for example with swagger2openapi or editor.swagger.io)"
    )]
    Swagger2 {
        /// The `swagger` field, e.g. "2.0".
        version: String,
    },
    /// Not an OpenAPI 3.0 or 3.1 document (no mapping, no `openapi` field, another version).
    #[error("openapi: not an OpenAPI 3.0 or 3.1 document: {reason}")]
    NotOpenApi {
        /// What is wrong.
        reason: String,
    },
    /// The spec has no `servers`, so there is no backend to route to.
    #[error(
        "servers: the spec has no `servers`, so there is no backend to route to; add one with the \
         backend's absolute URL, e.g. `servers: [{{url: \"https://backend.example.com/v1\"}}]`"
    )]
    NoServers,
    /// `server_index` is past the end of `servers`.
    #[error("servers: server_index {index} is out of range; the spec has {count} server(s)")]
    ServerIndex {
        /// The index asked for.
        index: usize,
        /// How many servers the spec lists.
        count: usize,
    },
    /// The chosen server URL is not an absolute http(s) URL once its variables are
    /// substituted.
    #[error("{at}: {url:?} {reason}")]
    ServerUrl {
        /// Where, e.g. "servers[0].url".
        at: String,
        /// The URL, after variable substitution when that succeeded.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A path template parameter whose name Sluice templates cannot capture.
    #[error(
        "paths.{path}: parameter {{{parameter}}} cannot be used by Sluice; path parameter names \
         must match [A-Za-z_][A-Za-z0-9_]*"
    )]
    PathParameter {
        /// The OpenAPI path, e.g. "/a/{bad-name}".
        path: String,
        /// The parameter name, e.g. "bad-name".
        parameter: String,
    },
    /// A path Sluice cannot route on for another reason (a parameter sharing its segment with
    /// text, an empty segment, a repeated parameter...).
    #[error("paths.{path}: {reason}")]
    UnsupportedPath {
        /// The OpenAPI path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A field the import reads has the wrong type.
    #[error("{at}: {reason}")]
    Invalid {
        /// Where, e.g. "paths./pets.get".
        at: String,
        /// What is wrong.
        reason: String,
    },
    /// No get/put/post/delete/options/head/patch/trace operation under `paths`.
    #[error(
        "paths: the spec has no operations (get, put, post, delete, options, head, patch or \
         trace under a path); there is nothing to route"
    )]
    NoOperations,
    /// An import option is not usable as a Sluice name.
    #[error("options.{option}: {reason}")]
    InvalidOption {
        /// The option: "api_name" or "group".
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl ImportError {
    /// `(where, what)`: the place in the spec (`paths./pets.get`, `servers[0].url`; "" for a
    /// syntax error, whose message has its line) and what is wrong there.
    pub fn located(&self) -> (String, String) {
        let message = self.to_string();
        match self {
            ImportError::Syntax { .. } => (String::new(), message),
            // Every other message starts with its place (which has no spaces) and ": ".
            _ => match message.split_once(": ") {
                Some((at, reason)) if !at.contains(' ') => (at.to_owned(), reason.to_owned()),
                _ => (String::new(), message),
            },
        }
    }
}

/// The path item keys that are operations, in the order routes are emitted for one path.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Longest API name derived from a title: short enough to read, and to leave room for the
/// "-upstream" suffix well within the validator's limit.
const MAX_DERIVED_NAME_LEN: usize = 63;

/// Turns an OpenAPI 3.0 or 3.1 spec (YAML or JSON text) into a declarative document: one API
/// with a route per path and method, proxied to one upstream built from `servers`.
///
/// The server URL's origin becomes the upstream target and its path the API's `base_path`;
/// routes do not strip it, so the backend sees the request path unchanged. See the module
/// documentation for what is ignored.
pub fn import_openapi(spec: &str, options: &ImportOptions) -> Result<Document, ImportError> {
    let root = parse(spec)?;
    let root = root.as_object().ok_or_else(|| ImportError::NotOpenApi {
        reason: format!("the top level is {}, not a mapping", kind_of(&root)),
    })?;
    check_version(root)?;

    let info = root.get("info");
    let info_text = |field: &str| info.and_then(|i| i.get(field)).and_then(Value::as_str);
    let title = info_text("title").unwrap_or_default();

    let api_name = match &options.api_name {
        Some(name) => {
            check_name(name).map_err(|reason| ImportError::InvalidOption {
                option: "api_name",
                reason,
            })?;
            name.clone()
        }
        None => derive_api_name(title),
    };
    let upstream_name = format!("{api_name}-upstream");
    // A name near the length limit can be fine on its own and too long with the suffix.
    check_name(&upstream_name).map_err(|reason| ImportError::InvalidOption {
        option: "api_name",
        reason: format!("the upstream would be named {upstream_name:?}, which {reason}"),
    })?;
    if let Some(group) = &options.group {
        check_name(group).map_err(|reason| ImportError::InvalidOption {
            option: "group",
            reason,
        })?;
    }

    let server = server(root, options.server_index)?;
    let routes = routes(root, &upstream_name, options.server_index)?;

    let description = info_text("description")
        .filter(|d| !d.trim().is_empty())
        .unwrap_or(title);
    Ok(Document {
        format_version: FORMAT_VERSION,
        apis: vec![Api {
            name: api_name,
            group: options.group.clone(),
            description: description.to_owned(),
            base_path: server.base_path,
            routes,
            ..Default::default()
        }],
        upstreams: vec![Upstream {
            name: upstream_name,
            group: options.group.clone(),
            targets: vec![Target {
                url: server.origin,
                weight: None,
            }],
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// Parses YAML or JSON (JSON is YAML) into a JSON value, refusing a key given twice (which
/// would silently drop the first) and applying YAML merge keys.
fn parse(spec: &str) -> Result<Value, ImportError> {
    let mut value = serde_yaml_ng::from_str::<StrictValue>(spec)
        .map(|StrictValue(value)| value)
        .map_err(|e| {
            let location = e.location();
            let mut detail = e.to_string();
            // Most parser messages already end with "at line L column C"; add it where not.
            if let Some(l) = &location
                && !detail.contains(" at line ")
            {
                detail.push_str(&format!(" at line {} column {}", l.line(), l.column()));
            }
            ImportError::Syntax {
                line: location.as_ref().map(|l| l.line()),
                column: location.as_ref().map(|l| l.column()),
                detail,
            }
        })?;
    apply_merge_keys(&mut value, "")?;
    Ok(value)
}

/// YAML 1.1 merge keys, which the parser leaves as `<<` entries: `<<: *a` (or `<<: [*a, *b]`)
/// adds the entries of `a` (then `b`) that the mapping does not have itself.
fn apply_merge_keys(value: &mut Value, at: &str) -> Result<(), ImportError> {
    match value {
        Value::Object(map) => {
            if let Some(merged) = map.remove("<<") {
                let sources = match merged {
                    Value::Array(sources) => sources,
                    single => vec![single],
                };
                for mut source in sources {
                    // A source may merge others itself: resolved before it is merged in.
                    apply_merge_keys(&mut source, &format!("{at}.<<"))?;
                    let Value::Object(source) = source else {
                        return Err(ImportError::Invalid {
                            at: format!("{at}.<<").trim_start_matches('.').to_owned(),
                            reason: "a merge key takes a mapping or a list of mappings".into(),
                        });
                    };
                    for (key, entry) in source {
                        map.entry(key).or_insert(entry);
                    }
                }
            }
            for (key, entry) in map.iter_mut() {
                apply_merge_keys(entry, &format!("{at}.{key}"))?;
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                apply_merge_keys(item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Accepts `openapi: 3.0.x` and `3.1.x`; refuses Swagger 2.0 and everything else.
fn check_version(root: &Map<String, Value>) -> Result<(), ImportError> {
    let version = match root.get("openapi") {
        Some(Value::String(version)) => version.clone(),
        // `openapi: 3.1` unquoted is a YAML number; the intent is plain, so accept it.
        Some(Value::Number(version)) => version.to_string(),
        Some(other) => {
            return Err(ImportError::NotOpenApi {
                reason: format!("`openapi` is {}, not a version string", kind_of(other)),
            });
        }
        None => {
            if let Some(swagger) = root.get("swagger") {
                let version = match swagger {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                return Err(ImportError::Swagger2 { version });
            }
            return Err(ImportError::NotOpenApi {
                reason: "the `openapi` field is missing; expected e.g. `openapi: 3.0.3`".into(),
            });
        }
    };
    let supported = ["3.0", "3.1"].iter().any(|minor| {
        version
            .strip_prefix(minor)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    });
    if supported {
        Ok(())
    } else {
        Err(ImportError::NotOpenApi {
            reason: format!("version {version:?} is not supported; expected 3.0.x or 3.1.x"),
        })
    }
}

/// `info.title` as a Sluice name: see [`ImportOptions::api_name`].
fn derive_api_name(title: &str) -> String {
    let mapped: String = title
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    // Names must start with a letter or a digit, so a leading '.' or '_' goes too, not just
    // '-'. Everything left is ASCII, so cutting at a byte count is cutting at a char.
    let trimmed = mapped.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let cut = &trimmed[..trimmed.len().min(MAX_DERIVED_NAME_LEN)];
    // Trimmed after the cut, which can expose a '-'.
    let name = cut.trim_end_matches('-');
    if name.is_empty() {
        "api".to_owned()
    } else {
        name.to_owned()
    }
}

/// The upstream target and the API's base path, from one server URL.
#[derive(Debug)]
struct Server {
    /// scheme://host[:port]
    origin: String,
    /// The URL's path without its trailing '/'; "" for "/".
    base_path: String,
}

/// Reads `servers[index]`, substitutes its variables and splits the URL.
fn server(root: &Map<String, Value>, index: usize) -> Result<Server, ImportError> {
    let servers = match root.get("servers") {
        None | Some(Value::Null) => return Err(ImportError::NoServers),
        Some(Value::Array(servers)) if servers.is_empty() => return Err(ImportError::NoServers),
        Some(Value::Array(servers)) => servers,
        Some(other) => {
            return Err(ImportError::Invalid {
                at: "servers".into(),
                reason: format!("is {}, not a list", kind_of(other)),
            });
        }
    };
    let server = servers.get(index).ok_or(ImportError::ServerIndex {
        index,
        count: servers.len(),
    })?;
    let at = format!("servers[{index}].url");
    let raw = server
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| ImportError::Invalid {
            at: at.clone(),
            reason: "is required and must be a string".into(),
        })?;
    let url_error = |url: &str, reason: String| ImportError::ServerUrl {
        at: at.clone(),
        url: url.to_owned(),
        reason,
    };

    let substituted =
        substitute(raw, server.get("variables"), index).map_err(|reason| url_error(raw, reason))?;
    let url = &substituted;
    let parsed = url::Url::parse(url).map_err(|e| {
        let reason = if e == url::ParseError::RelativeUrlWithoutBase {
            // OpenAPI resolves such URLs against wherever the spec was served from, which a
            // posted spec does not have.
            "is relative; Sluice needs the backend's scheme and host, e.g. \
             \"https://backend.example.com/v1\""
                .to_owned()
        } else {
            format!("is not an absolute http(s) URL: {e}")
        };
        url_error(url, reason)
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(url_error(
            url,
            format!("has scheme {:?}; it must be http or https", parsed.scheme()),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(url_error(url, "has no host".into()));
    }
    // Dropping these silently would leave the backend refusing every request.
    if !parsed.username().is_empty() || parsed.password().is_some() {
        // The message may be logged or shown: do not repeat the secret.
        let mut redacted = parsed.clone();
        if parsed.password().is_some() {
            let _ = redacted.set_password(Some("***"));
        }
        return Err(url_error(
            redacted.as_str(),
            "carries credentials, which an upstream target cannot".into(),
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(url_error(
            url,
            "has a query or fragment, which an upstream target cannot carry".into(),
        ));
    }

    let base_path = parsed.path().trim_end_matches('/').to_owned();
    if !base_path.is_empty() {
        check_path(Kind::Exact, &base_path).map_err(|reason| {
            url_error(
                url,
                format!("has a path Sluice cannot use as base_path: {reason}"),
            )
        })?;
    }
    Ok(Server {
        // scheme://host[:port], the default port left out: what a target is.
        origin: parsed.origin().ascii_serialization(),
        base_path,
    })
}

/// Replaces every `{name}` in a server URL with `variables.name.default`.
fn substitute(raw: &str, variables: Option<&Value>, index: usize) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| "has a '{' with no matching '}'".to_owned())?;
        let name = &after[..close];
        match variables
            .and_then(|v| v.get(name))
            .and_then(|v| v.get("default"))
        {
            Some(Value::String(default)) => out.push_str(default),
            // OpenAPI wants a string, but an unquoted `default: 8443` is an easy slip.
            Some(Value::Number(default)) => out.push_str(&default.to_string()),
            _ => {
                return Err(format!(
                    "uses {{{name}}} but servers[{index}].variables.{name}.default is missing \
                     or not a string"
                ));
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// One operation found under `paths`.
#[derive(Debug)]
struct Operation<'a> {
    path: &'a str,
    method: &'static str,
    operation_id: Option<&'a str>,
}

/// A route per path and method, in path order then [`METHODS`] order.
fn routes(
    root: &Map<String, Value>,
    upstream: &str,
    server_index: usize,
) -> Result<Vec<Route>, ImportError> {
    let chosen_server = root
        .get("servers")
        .and_then(|servers| servers.get(server_index));
    let paths = match root.get("paths") {
        // 3.1 makes `paths` optional (a webhooks-only spec); nothing to route either way.
        None | Some(Value::Null) => return Err(ImportError::NoOperations),
        Some(Value::Object(paths)) => paths,
        Some(other) => {
            return Err(ImportError::Invalid {
                at: "paths".into(),
                reason: format!("is {}, not a mapping", kind_of(other)),
            });
        }
    };

    // serde_json is built without `preserve_order`, so the map iterates its keys sorted, not
    // in document order. Sorted is as good for routing (Sluice ranks routes by specificity
    // and priority, not by position) and makes the output independent of key order.
    let mut items = Vec::new();
    for (path, item) in paths {
        // Extensions are allowed on the paths object (3.0 and 3.1).
        if path.starts_with("x-") {
            continue;
        }
        items.push(match item {
            Value::Object(item) if item.contains_key("$ref") => (
                path,
                std::borrow::Cow::Owned(referenced_path_item(root, path, item)?),
            ),
            Value::Object(item) => (path, std::borrow::Cow::Borrowed(item)),
            // `/x:` with nothing under it: no operations, not worth refusing the spec for.
            Value::Null => continue,
            other => {
                return Err(ImportError::Invalid {
                    at: format!("paths.{path}"),
                    reason: format!("is {}, not a path item mapping", kind_of(other)),
                });
            }
        });
    }
    let mut operations = Vec::new();
    for (path, item) in &items {
        let path = path.as_str();
        check_servers(item, &format!("paths.{path}"), chosen_server)?;
        let mut found = false;
        for method in METHODS {
            let Some(operation) = item.get(method) else {
                continue;
            };
            let at = || format!("paths.{path}.{method}");
            let operation = operation.as_object().ok_or_else(|| ImportError::Invalid {
                at: at(),
                reason: format!("is {}, not an operation mapping", kind_of(operation)),
            })?;
            check_servers(operation, &at(), chosen_server)?;
            let operation_id = match operation.get("operationId") {
                None | Some(Value::Null) => None,
                Some(Value::String(id)) if id.trim().is_empty() => None,
                Some(Value::String(id)) => Some(id.as_str()),
                Some(other) => {
                    return Err(ImportError::Invalid {
                        at: format!("{}.operationId", at()),
                        reason: format!("is {}, not a string", kind_of(other)),
                    });
                }
            };
            operations.push(Operation {
                path,
                method,
                operation_id,
            });
            found = true;
        }
        if found {
            check_route_path(path)?;
        }
    }
    if operations.is_empty() {
        return Err(ImportError::NoOperations);
    }

    // Route names must be unique within the API. An operationId is used only when no other
    // operation shares it and it cannot collide with a "METHOD path" fallback name.
    let fallback = |op: &Operation<'_>| format!("{} {}", op.method.to_ascii_uppercase(), op.path);
    let fallback_names: HashSet<String> = operations.iter().map(fallback).collect();
    let mut id_counts: HashMap<&str, usize> = HashMap::new();
    for id in operations.iter().filter_map(|op| op.operation_id) {
        *id_counts.entry(id).or_default() += 1;
    }

    Ok(operations
        .iter()
        .map(|op| {
            let name = match op.operation_id {
                Some(id) if id_counts[id] == 1 && !fallback_names.contains(id) => id.to_owned(),
                _ => fallback(op),
            };
            Route {
                name: Some(name),
                path: op.path.to_owned(),
                // An OpenAPI path names exactly one path; Sluice's default for a path without
                // parameters would be a prefix match. Paths with `{` keep the default,
                // template, whose syntax is OpenAPI's.
                path_match: (!op.path.contains('{')).then_some(PathMatchKind::Exact),
                methods: vec![op.method.to_ascii_uppercase()],
                proxy: Some(ProxyAction {
                    upstream: upstream.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect())
}

/// A path item given as a `$ref` (with any fields beside it, which win): the item it names in
/// this document. References to other documents, and chains of them, are refused.
fn referenced_path_item(
    root: &Map<String, Value>,
    path: &str,
    item: &Map<String, Value>,
) -> Result<Map<String, Value>, ImportError> {
    let at = format!("paths.{path}.$ref");
    let Some(Value::String(reference)) = item.get("$ref") else {
        return Err(ImportError::Invalid {
            at,
            reason: "is not a string".into(),
        });
    };
    let Some(pointer) = reference.strip_prefix('#') else {
        return Err(ImportError::Invalid {
            at,
            reason: format!(
                "{reference:?} is in another document; references are followed only within \
                 the spec: bundle it into one document first (for example with `redocly \
                 bundle`)"
            ),
        });
    };
    // Resolved against the borrowed spec: a pointer's first token names a top-level field.
    let target = pointer
        .strip_prefix('/')
        .map(|path| path.split_once('/').unwrap_or((path, "")))
        .and_then(|(first, rest)| {
            let first = first.replace("~1", "/").replace("~0", "~");
            let value = root.get(&first)?;
            if rest.is_empty() {
                Some(value)
            } else {
                value.pointer(&format!("/{rest}"))
            }
        });
    let Some(Value::Object(target)) = target else {
        return Err(ImportError::Invalid {
            at,
            reason: format!("{reference:?} names no mapping in the spec"),
        });
    };
    if target.contains_key("$ref") {
        return Err(ImportError::Invalid {
            at,
            reason: format!("{reference:?} is itself a reference; refer to the path item directly"),
        });
    }
    let mut resolved = target.clone();
    for (key, value) in item.iter().filter(|(key, _)| *key != "$ref") {
        resolved.insert(key.clone(), value.clone());
    }
    Ok(resolved)
}

/// Refuses `servers` on a path item or operation (at `at`) other than the spec's chosen one:
/// every route goes to the one upstream, and those requests would reach another backend.
fn check_servers(
    item: &Map<String, Value>,
    at: &str,
    chosen: Option<&Value>,
) -> Result<(), ImportError> {
    let servers = match item.get("servers") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(servers)) if servers.is_empty() => return Ok(()),
        Some(Value::Array(servers)) => servers,
        Some(other) => {
            return Err(ImportError::Invalid {
                at: format!("{at}.servers"),
                reason: format!("is {}, not a list", kind_of(other)),
            });
        }
    };
    let url = |server: &Value| server.get("url").cloned();
    if servers.len() == 1 && chosen.is_some_and(|chosen| url(chosen) == url(&servers[0])) {
        return Ok(());
    }
    Err(ImportError::Invalid {
        at: format!("{at}.servers"),
        reason: "servers of their own are not supported: every route goes to the one \
                 upstream made from the spec's `servers`; import these paths as a spec of \
                 their own"
            .into(),
    })
}

/// Refuses an OpenAPI path that Sluice cannot route on as it is.
fn check_route_path(path: &str) -> Result<(), ImportError> {
    // Whole-segment parameters first, so a bad name gets its own, precise error. A
    // leading '*' is refused too: in Sluice `{*rest}` would silently become a catch-all.
    for segment in path.split('/') {
        let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) else {
            continue;
        };
        let usable = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !usable {
            return Err(ImportError::PathParameter {
                path: path.to_owned(),
                parameter: name.to_owned(),
            });
        }
    }
    // Then everything else the validator would refuse ("{id}.json" segments, "//", ...).
    let kind = if path.contains('{') {
        Kind::Template
    } else {
        Kind::Exact
    };
    check_path(kind, path).map_err(|reason| ImportError::UnsupportedPath {
        path: path.to_owned(),
        reason,
    })
}

/// "a mapping", "a list"...: for messages about a value of the wrong type.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "empty",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::declarative::load_document;

    const PETSTORE: &str = include_str!("../../../tests/fixtures/openapi/petstore.yaml");

    /// (name, method, path, path_match) of every route, for compact assertions.
    fn route_summary(document: &Document) -> Vec<(String, String, String, Option<PathMatchKind>)> {
        document.apis[0]
            .routes
            .iter()
            .map(|r| {
                (
                    r.name.clone().unwrap_or_default(),
                    r.methods.join(","),
                    r.path.clone(),
                    r.path_match,
                )
            })
            .collect()
    }

    fn import(spec: &str) -> Result<Document, ImportError> {
        import_openapi(spec, &ImportOptions::default())
    }

    /// A minimal 3.0 spec with the given `servers` and `paths` YAML blocks.
    fn spec(servers: &str, paths: &str) -> String {
        format!("openapi: 3.0.3\ninfo:\n  title: T\n  version: '1'\n{servers}\n{paths}\n")
    }

    const ONE_SERVER: &str = "servers:\n  - url: https://api.example.com";
    const ONE_PATH: &str =
        "paths:\n  /a:\n    get:\n      responses:\n        '200':\n          description: ok";

    #[test]
    fn petstore_becomes_one_api_and_one_upstream() {
        let document = import(PETSTORE).unwrap();
        assert_eq!(document.format_version, FORMAT_VERSION);
        assert_eq!(document.group, None);

        assert_eq!(document.upstreams.len(), 1);
        let upstream = &document.upstreams[0];
        assert_eq!(upstream.name, "swagger-petstore-upstream");
        assert_eq!(upstream.group, None);
        let targets: Vec<&str> = upstream.targets.iter().map(|t| t.url.as_str()).collect();
        assert_eq!(targets, ["http://petstore.swagger.io"]);

        assert_eq!(document.apis.len(), 1);
        let api = &document.apis[0];
        assert_eq!(api.name, "swagger-petstore");
        // No info.description: the title stands in.
        assert_eq!(api.description, "Swagger Petstore");
        assert_eq!(api.base_path, "/v1");
        assert!(api.hosts.is_empty());
        assert_eq!(
            route_summary(&document),
            [
                (
                    "listPets".into(),
                    "GET".into(),
                    "/pets".into(),
                    Some(PathMatchKind::Exact)
                ),
                (
                    "createPets".into(),
                    "POST".into(),
                    "/pets".into(),
                    Some(PathMatchKind::Exact)
                ),
                (
                    "showPetById".into(),
                    "GET".into(),
                    "/pets/{petId}".into(),
                    None
                ),
            ]
        );
        for route in &api.routes {
            let proxy = route.proxy.as_ref().unwrap();
            assert_eq!(proxy.upstream, "swagger-petstore-upstream");
            // The base path stays on the forwarded request: the backend serves /v1/pets.
            assert!(!proxy.strip_prefix);
            assert!(proxy.path_rewrite.is_empty());
        }

        load_document(&document).unwrap();
    }

    #[test]
    fn options_name_and_group_the_resources() {
        let options = ImportOptions {
            api_name: Some("pets".into()),
            group: Some("team-a".into()),
            server_index: 0,
        };
        let document = import_openapi(PETSTORE, &options).unwrap();
        assert_eq!(document.apis[0].name, "pets");
        assert_eq!(document.apis[0].group.as_deref(), Some("team-a"));
        assert_eq!(document.upstreams[0].name, "pets-upstream");
        assert_eq!(document.upstreams[0].group.as_deref(), Some("team-a"));
        load_document(&document).unwrap();
    }

    #[test]
    fn invalid_options_are_refused() {
        let bad_name = ImportOptions {
            api_name: Some("Pets".into()),
            ..Default::default()
        };
        let error = import_openapi(PETSTORE, &bad_name).unwrap_err();
        assert!(matches!(
            error,
            ImportError::InvalidOption {
                option: "api_name",
                ..
            }
        ));
        assert!(
            error.to_string().starts_with("options.api_name: "),
            "{error}"
        );

        let bad_group = ImportOptions {
            group: Some("Team A".into()),
            ..Default::default()
        };
        let error = import_openapi(PETSTORE, &bad_group).unwrap_err();
        assert!(matches!(
            error,
            ImportError::InvalidOption {
                option: "group",
                ..
            }
        ));
    }

    #[test]
    fn openapi_31_json_with_server_variables_and_duplicate_operation_ids() {
        let spec = r##"{
          "openapi": "3.1.0",
          "info": {"title": "Orders API", "version": "2", "description": "Orders and items."},
          "servers": [
            {"url": "https://{env}.example.com:8443/api/",
             "variables": {"env": {"default": "staging", "enum": ["staging", "prod"]}}}
          ],
          "paths": {
            "/orders": {
              "x-internal": true,
              "parameters": [{"name": "trace", "in": "header", "schema": {"type": "string"}}],
              "get": {"operationId": "list"},
              "post": {"operationId": "create"}
            },
            "/orders/{orderId}": {
              "get": {"operationId": "list"},
              "delete": {"operationId": "remove", "servers": [{"url": "https://{env}.example.com:8443/api/"}]}
            },
            "/shared": {"$ref": "#/components/pathItems/Shared"},
            "x-generated-by": "hand"
          },
          "components": {"pathItems": {"Shared": {"get": {"operationId": "shared"}}}},
          "webhooks": {"newOrder": {"post": {"operationId": "onNewOrder"}}}
        }"##;
        let document = import(spec).unwrap();
        let api = &document.apis[0];
        assert_eq!(api.name, "orders-api");
        assert_eq!(api.description, "Orders and items.");
        assert_eq!(api.base_path, "/api");
        assert_eq!(
            document.upstreams[0].targets[0].url,
            "https://staging.example.com:8443"
        );
        assert_eq!(
            route_summary(&document),
            [
                // "list" is used twice: both fall back to "METHOD path".
                (
                    "GET /orders".into(),
                    "GET".into(),
                    "/orders".into(),
                    Some(PathMatchKind::Exact)
                ),
                (
                    "create".into(),
                    "POST".into(),
                    "/orders".into(),
                    Some(PathMatchKind::Exact)
                ),
                (
                    "GET /orders/{orderId}".into(),
                    "GET".into(),
                    "/orders/{orderId}".into(),
                    None
                ),
                (
                    "remove".into(),
                    "DELETE".into(),
                    "/orders/{orderId}".into(),
                    None
                ),
                (
                    "shared".into(),
                    "GET".into(),
                    "/shared".into(),
                    Some(PathMatchKind::Exact)
                ),
            ]
        );
        load_document(&document).unwrap();
    }

    #[test]
    fn merge_keys_are_applied_and_what_cannot_be_followed_is_refused() {
        let paths = "x-base: &base\n  get: {operationId: read}\nx-common: &common\n  <<: *base\n  put: {operationId: replace}\npaths:\n  /a:\n    <<: *common\n    post: {operationId: write}";
        let names: Vec<String> = route_summary(&import(&spec(ONE_SERVER, paths)).unwrap())
            .into_iter()
            .map(|(name, ..)| name)
            .collect();
        assert_eq!(
            names,
            ["read", "replace", "write"],
            "merges within merges too"
        );

        for (paths, at, says) in [
            (
                "paths:\n  /a:\n    $ref: './paths/a.yaml'",
                "paths./a.$ref: ",
                "bundle",
            ),
            (
                "paths:\n  /a:\n    $ref: '#/components/pathItems/Missing'",
                "paths./a.$ref: ",
                "names no mapping",
            ),
            (
                "paths:\n  /a:\n    servers: [{url: 'https://elsewhere.example'}]\n    get: {}",
                "paths./a.servers: ",
                "one upstream",
            ),
            (
                "paths:\n  /a:\n    get: {servers: [{url: 'https://elsewhere.example'}]}",
                "paths./a.get.servers: ",
                "one upstream",
            ),
        ] {
            let error = import(&spec(ONE_SERVER, paths)).unwrap_err().to_string();
            assert!(
                error.starts_with(at) && error.contains(says),
                "{paths}: {error}"
            );
        }
        let twice = "paths:\n  /a:\n    get: {}\n  /a:\n    post: {}";
        let error = import(&spec(ONE_SERVER, twice)).unwrap_err();
        assert!(
            matches!(&error, ImportError::Syntax { .. })
                && error.to_string().contains("duplicate key"),
            "{error}"
        );
    }

    #[test]
    fn server_index_picks_the_server_and_default_ports_are_dropped() {
        let spec = spec(
            "servers:\n  - url: https://prod.example.com/v2\n  - url: http://localhost:80/",
            ONE_PATH,
        );
        let second = ImportOptions {
            server_index: 1,
            ..Default::default()
        };
        let document = import_openapi(&spec, &second).unwrap();
        assert_eq!(document.upstreams[0].targets[0].url, "http://localhost");
        // A server at "/" gives no base path.
        assert_eq!(document.apis[0].base_path, "");
        load_document(&document).unwrap();

        let third = ImportOptions {
            server_index: 2,
            ..Default::default()
        };
        let error = import_openapi(&spec, &third).unwrap_err();
        assert_eq!(error, ImportError::ServerIndex { index: 2, count: 2 });
        assert!(error.to_string().starts_with("servers: "), "{error}");
    }

    #[test]
    fn derived_names_follow_the_naming_rule() {
        assert_eq!(derive_api_name("Swagger Petstore"), "swagger-petstore");
        assert_eq!(derive_api_name("  My API (v2.1)  "), "my-api--v2.1");
        assert_eq!(derive_api_name("_internal_"), "internal_");
        assert_eq!(derive_api_name("Ünïcode"), "n-code");
        assert_eq!(derive_api_name("!!!"), "api");
        assert_eq!(derive_api_name(""), "api");
        let long = derive_api_name(&format!("{} tail", "a".repeat(62)));
        // Cut at 63 ("a"*62 + "-"), then the exposed '-' is trimmed.
        assert_eq!(long, "a".repeat(62));
        assert!(check_name(&long).is_ok());
    }

    #[test]
    fn version_3_0_unquoted_is_accepted() {
        let spec = spec(ONE_SERVER, ONE_PATH).replace("openapi: 3.0.3", "openapi: 3.0");
        import(&spec).unwrap();
    }

    #[test]
    fn swagger_2_is_refused() {
        let spec = "swagger: '2.0'\ninfo:\n  title: Old\n  version: '1'\nhost: api.example.com\n\
                    basePath: /v1\npaths: {}\n";
        let error = import(spec).unwrap_err();
        assert_eq!(
            error,
            ImportError::Swagger2 {
                version: "2.0".into()
            }
        );
        let message = error.to_string();
        assert!(message.starts_with("swagger: Swagger 2.0"), "{message}");
        assert!(
            message.contains("convert the spec to OpenAPI 3"),
            "{message}"
        );
    }

    #[test]
    fn other_versions_and_non_documents_are_refused() {
        let spec = spec(ONE_SERVER, ONE_PATH).replace("3.0.3", "3.2.0");
        let error = import(&spec).unwrap_err();
        assert!(matches!(error, ImportError::NotOpenApi { .. }));
        assert!(error.to_string().contains("\"3.2.0\""), "{error}");

        let error = import("info:\n  title: T\n").unwrap_err();
        assert!(matches!(error, ImportError::NotOpenApi { .. }));
        assert!(
            error.to_string().contains("`openapi` field is missing"),
            "{error}"
        );

        // Plain text is valid YAML (a string), just not a spec.
        let error = import("hello world").unwrap_err();
        assert!(matches!(error, ImportError::NotOpenApi { .. }));
        assert!(
            error.to_string().contains("a string, not a mapping"),
            "{error}"
        );
    }

    #[test]
    fn missing_or_empty_servers_are_refused() {
        for servers in ["", "servers: []"] {
            let error = import(&spec(servers, ONE_PATH)).unwrap_err();
            assert_eq!(error, ImportError::NoServers);
            let message = error.to_string();
            assert!(message.starts_with("servers: "), "{message}");
            assert!(
                message.contains("add one with the backend's absolute URL"),
                "{message}"
            );
        }
    }

    #[test]
    fn relative_server_url_is_refused() {
        let error = import(&spec("servers:\n  - url: /v1", ONE_PATH)).unwrap_err();
        assert!(
            matches!(&error, ImportError::ServerUrl { at, url, .. } if at == "servers[0].url" && url == "/v1"),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.starts_with("servers[0].url: \"/v1\" is relative"),
            "{message}"
        );
    }

    #[test]
    fn unusable_server_urls_are_refused() {
        let cases = [
            ("ftp://files.example.com", "must be http or https"),
            (
                "https://user:secret@api.example.com",
                "user:***@api.example.com",
            ),
            ("https://api.example.com/v1?key=1", "query or fragment"),
            (
                "https://{region}.example.com",
                "servers[0].variables.region.default",
            ),
        ];
        for (url, expected) in cases {
            let servers = format!("servers:\n  - url: '{url}'");
            let error = import(&spec(&servers, ONE_PATH)).unwrap_err();
            assert!(
                matches!(error, ImportError::ServerUrl { .. }),
                "{url}: {error:?}"
            );
            let message = error.to_string();
            assert!(message.starts_with("servers[0].url: "), "{message}");
            assert!(message.contains(expected), "{message}");
        }
    }

    #[test]
    fn bad_path_parameter_name_is_refused() {
        let paths = "paths:\n  /a/{bad-name}:\n    get:\n      operationId: getA";
        let error = import(&spec(ONE_SERVER, paths)).unwrap_err();
        assert_eq!(
            error,
            ImportError::PathParameter {
                path: "/a/{bad-name}".into(),
                parameter: "bad-name".into()
            }
        );
        let message = error.to_string();
        assert!(
            message.starts_with("paths./a/{bad-name}: parameter {bad-name}"),
            "{message}"
        );
    }

    #[test]
    fn paths_sluice_cannot_route_are_refused() {
        for path in ["/files/{name}.json", "/a//b", "/a/{id}/b/{id}"] {
            let paths = format!("paths:\n  '{path}':\n    get: {{}}");
            let error = import(&spec(ONE_SERVER, &paths)).unwrap_err();
            assert!(
                matches!(&error, ImportError::UnsupportedPath { path: p, .. } if p == path),
                "{path}: {error:?}"
            );
            assert!(
                error.to_string().starts_with(&format!("paths.{path}: ")),
                "{error}"
            );
        }
    }

    #[test]
    fn wrongly_typed_operation_names_its_place() {
        let paths = "paths:\n  /pets/{petId}:\n    get: [1]";
        let error = import(&spec(ONE_SERVER, paths)).unwrap_err();
        assert!(matches!(error, ImportError::Invalid { .. }));
        assert!(
            error.to_string().starts_with("paths./pets/{petId}.get: "),
            "{error}"
        );
    }

    #[test]
    fn errors_name_their_place_apart_from_the_reason() {
        let error = import(&spec(ONE_SERVER, "paths:\n  /a:\n    get: [1]")).unwrap_err();
        assert_eq!(
            error.located(),
            (
                "paths./a.get".into(),
                "is a list, not an operation mapping".into()
            )
        );
        let error = import("openapi: 3.0.3\ninfo: {title: [unclosed\n").unwrap_err();
        assert_eq!(error.located().0, "");
    }

    #[test]
    fn no_operations_is_refused() {
        let cases = [
            "paths: {}",
            "",
            // Only extensions and parameters: nothing Sluice can route.
            "paths:\n  /a:\n    x-owner: team\n    parameters: []\n  x-tag: 1",
        ];
        for paths in cases {
            let error = import(&spec(ONE_SERVER, paths)).unwrap_err();
            assert_eq!(error, ImportError::NoOperations, "{paths}");
            assert!(error.to_string().starts_with("paths: "), "{error}");
        }
    }

    #[test]
    fn not_yaml_is_refused_with_its_line() {
        let error = import("openapi: 3.0.3\ninfo: {title: [unclosed\n").unwrap_err();
        let ImportError::Syntax { line, .. } = &error else {
            panic!("expected a syntax error, got {error:?}");
        };
        assert_eq!(*line, Some(3), "{error:?}");
        let message = error.to_string();
        assert!(message.starts_with("not valid YAML or JSON: "), "{message}");
        assert!(message.contains(" at line "), "{message}");
        // The unclosed '[' is found at the end of the text.
        assert!(message.contains("at line 3 column 1"), "{message}");
    }
}
