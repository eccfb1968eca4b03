//! The declarative format: one YAML or JSON document that describes a whole registry.
//!
//! Loading runs in two phases, each reporting every problem it finds with its path:
//! 1. **shape**: the document is checked against the JSON Schema generated from [`model`]
//!    (unknown fields, wrong types, missing fields, bad enum values);
//! 2. **meaning**: a well-shaped document is normalised into a [`pb::ConfigSet`] (names
//!    resolved, durations parsed, keys hashed) and checked by [`crate::validate`].
//!
//! The same function serves `sluicectl`, the control plane's apply endpoint and a data plane
//! in standalone mode, so they accept and refuse the same documents.

pub mod export;
pub mod model;
pub mod normalize;
pub mod strict_value;

use std::path::Path;
use std::sync::OnceLock;

use jsonschema::error::ValidationErrorKind;
use schemars::generate::SchemaSettings;

pub use export::export;
pub use model::{Document, FORMAT_VERSION};
pub use normalize::{DEFAULT_GROUP, ExternalNames, normalize, normalize_with};

use crate::error::{ConfigErrors, FieldError};
use crate::pb;
use strict_value::StrictValue;

/// Largest document accepted, in bytes. Documents come from outside; they are bounded too.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024 * 1024;

/// How a document is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// YAML 1.2; JSON documents also parse as YAML.
    Yaml,
    Json,
}

impl Format {
    /// `.json` files are JSON; anything else is read as YAML.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("json") => Self::Json,
            _ => Self::Yaml,
        }
    }
}

/// The JSON Schema (draft 2020-12) of documents, generated from [`model`]. Published as
/// `docs/declarative.schema.json`.
pub fn json_schema() -> serde_json::Value {
    let schema = SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<Document>();
    let mut schema = serde_json::to_value(schema).expect("a generated schema serialises");
    forbid_null(&mut schema);
    schema
}

/// Optional fields are simply left out; schemars lets them be `null` too, which would turn
/// every optional enum and object into an `anyOf` whose errors say nothing useful
/// ("... is not valid under any of the schemas"). Removes `null` from every type.
fn forbid_null(schema: &mut serde_json::Value) {
    use serde_json::Value;
    let Value::Object(object) = schema else {
        if let Value::Array(items) = schema {
            items.iter_mut().for_each(forbid_null);
        }
        return;
    };
    if let Some(Value::Array(types)) = object.get_mut("type") {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let only = types.remove(0);
            object.insert("type".into(), only);
        }
    }
    let is_null = |v: &Value| v.get("type").is_some_and(|t| t == "null");
    if let Some(Value::Array(any_of)) = object.get("anyOf")
        && any_of.len() == 2
        && any_of.iter().any(is_null)
    {
        let kept = any_of.iter().find(|v| !is_null(v)).cloned();
        object.remove("anyOf");
        if let Some(Value::Object(kept)) = kept {
            for (key, value) in kept {
                object.entry(key).or_insert(value);
            }
        }
    }
    object.values_mut().for_each(forbid_null);
}

fn schema_validator() -> &'static jsonschema::Validator {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        jsonschema::validator_for(&json_schema()).expect("the generated schema is a valid schema")
    })
}

/// Parses and checks the shape of a document.
pub fn parse(text: &str, format: Format) -> Result<Document, ConfigErrors> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(ConfigErrors::single(
            "",
            format!(
                "document is {} bytes; the limit is {MAX_DOCUMENT_BYTES}",
                text.len()
            ),
        ));
    }
    let value = match format {
        Format::Json => serde_json::from_str::<StrictValue>(text).map_err(|e| {
            ConfigErrors::single(
                "",
                format!(
                    "not valid JSON at line {} column {}: {e}",
                    e.line(),
                    e.column()
                ),
            )
        })?,
        Format::Yaml => serde_yaml_ng::from_str::<StrictValue>(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(" at line {} column {}", l.line(), l.column()))
                .unwrap_or_default();
            ConfigErrors::single("", format!("not valid YAML{at}: {e}"))
        })?,
    }
    .0;
    parse_value(value)
}

/// Checks the shape of a document already read into JSON (a REST body, say).
pub fn parse_value(value: serde_json::Value) -> Result<Document, ConfigErrors> {
    check_shape(&value)?;
    let document: Document = serde_path_to_error::deserialize(value).map_err(|e| {
        // The schema is generated from the same types, so this is only reached if the two
        // disagree; the error still names its field.
        ConfigErrors::single(e.path().to_string(), e.inner().to_string())
    })?;
    if document.format_version != FORMAT_VERSION {
        return Err(ConfigErrors::single(
            "format_version",
            format!(
                "{} is not supported; this build reads version {FORMAT_VERSION}",
                document.format_version
            ),
        ));
    }
    Ok(document)
}

/// Parses, normalises and validates a document: what both planes call on a file.
pub fn load(text: &str, format: Format) -> Result<pb::ConfigSet, ConfigErrors> {
    load_document(&parse(text, format)?)
}

/// Normalises and validates a parsed document.
pub fn load_document(document: &Document) -> Result<pb::ConfigSet, ConfigErrors> {
    let (config, locator, mut errors) = normalize(document);
    if let Err(ConfigErrors(more)) = crate::validate::config_set_located(&config, &locator) {
        // A field the normaliser already faulted (an unknown name, say) would otherwise be
        // reported twice, the second time less clearly.
        let faulted: std::collections::HashSet<String> =
            errors.iter().map(|e| e.path.clone()).collect();
        errors.extend(more.into_iter().filter(|e| !faulted.contains(&e.path)));
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        errors.sort_by(|a, b| natural_path_order(&a.path, &b.path));
        Err(ConfigErrors(errors))
    }
}

/// A document as YAML, the way `export` endpoints write it.
pub fn to_yaml(document: &Document) -> String {
    serde_yaml_ng::to_string(document).expect("a document serialises to YAML")
}

/// Checks a parsed value against the schema, reporting every violation.
fn check_shape(value: &serde_json::Value) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    for error in schema_validator().iter_errors(value) {
        let at = dotted_path(error.instance_path().segments());
        let join = |field: &str| {
            if at.is_empty() {
                field.to_owned()
            } else {
                format!("{at}.{field}")
            }
        };
        match error.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                for field in unexpected {
                    errors.push(field_error(join(field), "unknown field".to_owned()));
                }
            }
            ValidationErrorKind::Required { property } => {
                let field = property
                    .as_str()
                    .map_or_else(|| property.to_string(), str::to_owned);
                errors.push(field_error(join(&field), "is required".to_owned()));
            }
            _ => errors.push(field_error(at, error.to_string())),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        errors.sort_by(|a, b| natural_path_order(&a.path, &b.path));
        Err(ConfigErrors(errors))
    }
}

fn field_error(path: String, reason: String) -> FieldError {
    FieldError {
        path,
        reason,
        resource: None,
    }
}

/// `/apis/2/routes/0/path` → `apis[2].routes[0].path`.
fn dotted_path<'a>(
    segments: impl Iterator<Item = jsonschema::paths::LocationSegment<'a>>,
) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            jsonschema::paths::LocationSegment::Index(i) => out.push_str(&format!("[{i}]")),
            jsonschema::paths::LocationSegment::Property(name) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&name);
            }
        }
    }
    out
}

/// Orders paths as a reader meets them: `apis[2]` before `apis[10]`.
fn natural_path_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn key(path: &str) -> Vec<(String, usize)> {
        path.split(['.', '['])
            .map(
                |part| match part.strip_suffix(']').and_then(|n| n.parse().ok()) {
                    Some(n) => (String::new(), n),
                    None => (part.to_owned(), 0),
                },
            )
            .collect()
    }
    key(a).cmp(&key(b))
}

#[cfg(test)]
mod tests;
