//! `--output table|json|yaml`: how replies are shown.

use clap::ValueEnum;
use comfy_table::{ContentArrangement, Table, presets::UTF8_BORDERS_ONLY};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// What a reply holds, for the table view.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// `{items: [resource...]}`.
    Resources,
    /// One resource.
    Resource,
    /// `{items: [api-key credential...]}`.
    Keys,
    /// `{items: [version...]}`.
    Versions,
    /// `{changes: [...]}` (diffs, applies, rollbacks, imports).
    Changes,
    /// `{items: [token...]}`.
    Tokens,
    /// `{items: [data-plane status...]}`.
    DataPlanes,
    /// Anything else: shown as YAML.
    Other,
}

pub fn render(value: &Value, output: Output, shape: Shape) -> String {
    match output {
        Output::Json => serde_json::to_string_pretty(value).unwrap_or_default(),
        Output::Yaml => serde_yaml_ng::to_string(value).unwrap_or_default(),
        Output::Table => table(value, shape),
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    table
}

fn items(value: &Value) -> &[Value] {
    value
        .get("items")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// A node's last NACK: its message and time, then how many errors and the first of them (all
/// of them are in `-o json|yaml`).
fn nack(node: &Value) -> String {
    let nack = &node["last_nack"];
    if nack.is_null() {
        return String::new();
    }
    let message = text(&nack["message"]);
    let mut out = if message.is_empty() {
        format!("at {}", text(&node["last_nack_at"]))
    } else {
        format!("{message} at {}", text(&node["last_nack_at"]))
    };
    let errors = nack["errors"].as_array().map_or(&[][..], Vec::as_slice);
    if let Some(first) = errors.first() {
        let (path, reason) = (text(&first["path"]), text(&first["reason"]));
        let first = if path.is_empty() {
            reason
        } else {
            format!("{path}: {reason}")
        };
        out.push_str(&match errors.len() {
            1 => format!("\n1 error: {first}"),
            n => format!("\n{n} errors, the first: {first}"),
        });
    }
    out
}

fn table(value: &Value, shape: Shape) -> String {
    let mut out = match shape {
        Shape::Resources => {
            let mut table = new_table(&["NAME", "GROUP", "ID", "VERSION"]);
            for item in items(value) {
                table.add_row([
                    text(&item["name"]),
                    text(&item["group"]),
                    text(&item["id"]),
                    text(&item["resource_version"]),
                ]);
            }
            table.to_string()
        }
        Shape::Resource => serde_yaml_ng::to_string(value).unwrap_or_default(),
        Shape::Keys => {
            let mut table = new_table(&["NAME", "PREFIX", "EXPIRES", "REVOKED", "ID", "VERSION"]);
            for item in items(value) {
                // Both are left out of a credential unless set.
                let expires = if item["expires_at"].is_null() {
                    "never".to_owned()
                } else {
                    text(&item["expires_at"])
                };
                let revoked = if item["revoked"] == true { "yes" } else { "no" };
                table.add_row([
                    text(&item["name"]),
                    text(&item["api_key"]["prefix"]),
                    expires,
                    revoked.to_owned(),
                    text(&item["id"]),
                    text(&item["resource_version"]),
                ]);
            }
            table.to_string()
        }
        Shape::DataPlanes => {
            let mut table = new_table(&[
                "NODE",
                "GROUP",
                "REPLICA",
                "VERSION",
                "BEHIND",
                "LAST SEEN",
                "STALE",
                "REFUSED",
                "LAST NACK",
            ]);
            for item in items(value) {
                table.add_row([
                    text(&item["id"]),
                    text(&item["group"]),
                    text(&item["connected_replica"]),
                    text(&item["applied_version"]),
                    text(&item["versions_behind"]),
                    text(&item["last_seen"]),
                    text(&item["stale"]),
                    text(&item["refused_reason"]),
                    nack(item),
                ]);
            }
            table.to_string()
        }
        Shape::Versions => {
            let mut table = new_table(&["VERSION", "CREATED", "ACTOR", "CHANGES", "MESSAGE"]);
            for item in items(value) {
                table.add_row([
                    text(&item["number"]),
                    text(&item["created_at"]),
                    text(&item["actor"]),
                    text(&item["change_count"]),
                    text(&item["message"]),
                ]);
            }
            table.to_string()
        }
        Shape::Changes => {
            let mut table = new_table(&["OP", "KIND", "GROUP", "NAME", "FIELDS"]);
            for change in value
                .get("changes")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice)
            {
                let fields: Vec<String> = change
                    .get("fields")
                    .and_then(Value::as_array)
                    .map(|f| f.iter().map(|f| text(&f["path"])).collect())
                    .unwrap_or_default();
                table.add_row([
                    text(&change["op"]),
                    text(&change["kind"]),
                    text(&change["group"]),
                    text(&change["name"]),
                    fields.join(", "),
                ]);
            }
            let mut out = table.to_string();
            match value.get("version") {
                Some(Value::Object(version)) => out.push_str(&format!(
                    "\nversion {} ({})",
                    text(&version["number"]),
                    text(&version["message"])
                )),
                _ if value.get("dry_run") == Some(&Value::Bool(true)) => {
                    out.push_str("\ndry run: nothing committed")
                }
                _ if value.get("version").is_some() => {
                    out.push_str("\nno changes: nothing committed")
                }
                _ => {}
            }
            out
        }
        Shape::Tokens => {
            let mut table = new_table(&["NAME", "ROLE", "PREFIX", "CREATED", "BY"]);
            for item in items(value) {
                table.add_row([
                    text(&item["name"]),
                    text(&item["role"]),
                    text(&item["prefix"]),
                    text(&item["created_at"]),
                    text(&item["created_by"]),
                ]);
            }
            table.to_string()
        }
        Shape::Other => serde_yaml_ng::to_string(value).unwrap_or_default(),
    };
    if let Some(next) = value.get("next").filter(|n| !n.is_null()) {
        // Versions page backwards from the newest; resources forwards by id.
        let flag = if matches!(shape, Shape::Versions) {
            "--before"
        } else {
            "--after"
        };
        out.push_str(&format!("\nmore: {flag} {}", text(next)));
    }
    out
}
