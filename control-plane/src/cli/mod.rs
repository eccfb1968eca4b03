//! `sluicectl`, the command line of the admin API.

pub mod client;
pub mod output;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};
use sluice_proto::declarative::{self, Format};

use client::{Body, CliError, Client, DEFAULT_SERVER, Origin, read_config};
use output::{Output, Shape, render};

/// Sluice's command line: manage the registry of a control plane, and check declarative
/// files offline.
///
/// The server and token come from --server/--token, else SLUICE_SERVER/SLUICE_TOKEN, else the
/// config file (~/.config/sluice/sluicectl.yaml: `server:` and `token:`).
#[derive(Debug, Parser)]
#[command(name = "sluicectl", version)]
pub struct Cli {
    /// The control plane's REST address.
    #[arg(long, global = true, env = "SLUICE_SERVER", value_name = "URL")]
    server: Option<String>,
    /// An admin API token.
    #[arg(
        long,
        global = true,
        env = "SLUICE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// A config file other than ~/.config/sluice/sluicectl.yaml.
    // A String, not a PathBuf: clap refuses an empty path, and `SLUICECTL_CONFIG=` must count
    // as unset (as it does for the server and token) rather than break every command.
    #[arg(long, global = true, env = "SLUICECTL_CONFIG", value_name = "FILE")]
    config: Option<String>,
    /// How to show replies.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Output,
    /// The message of the version a write makes (default: a description of the write).
    #[arg(short, long, global = true)]
    message: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a declarative file offline: every error with its path, or a summary.
    Validate {
        /// YAML, or JSON when it ends in .json; `-` reads standard input as YAML.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Print the JSON Schema of declarative files.
    Schema,
    #[command(flatten)]
    Online(Online),
}

/// The commands that call a control plane.
#[derive(Debug, Subcommand)]
enum Online {
    /// APIs and their routes.
    Apis(ResourceArgs),
    /// Backends that routes proxy to.
    Upstreams(ResourceArgs),
    /// Clients of the APIs (their credentials: see `credentials` and `keys`).
    Consumers(ResourceArgs),
    /// Rate limits, quotas and scopes that subscriptions grant.
    Plans(ResourceArgs),
    /// A consumer's access to an API under a plan.
    Subscriptions(ResourceArgs),
    /// Reusable policies (auth, rate limits, CORS, IP rules, body size).
    Policies(ResourceArgs),
    /// Event brokers (Kafka, or the in-memory one).
    Brokers(ResourceArgs),
    /// TLS certificates the data planes present, chosen by SNI.
    Certificates(ResourceArgs),
    /// A consumer's credentials (API keys, JWT subjects, client certificates).
    Credentials {
        /// The consumer (name or id).
        #[arg(long)]
        consumer: String,
        /// The consumer's group, when it is named.
        #[arg(long)]
        group: Option<String>,
        #[command(subcommand)]
        action: CredentialAction,
    },
    /// A consumer's API keys: generated here, shown once.
    Keys {
        /// The consumer (name or id).
        #[arg(long)]
        consumer: String,
        /// The consumer's group, when it is named.
        #[arg(long)]
        group: Option<String>,
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Make the registry equal a declarative file, as one version.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Show what would change; commit nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the registry (or a group, or a past version) as a declarative document.
    Export {
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Import an API description.
    Import {
        #[command(subcommand)]
        what: ImportWhat,
    },
    /// Data-plane status: what each node runs, when it was last heard from, what it refused.
    Status {
        /// Only this group's nodes.
        #[arg(long)]
        group: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue after this node id (printed under a page that has more).
        #[arg(long)]
        after: Option<String>,
    },
    /// The history: list, show, diff and roll back versions.
    Versions {
        #[command(subcommand)]
        action: VersionAction,
    },
    /// Admin API tokens (admin role).
    Tokens {
        #[command(subcommand)]
        action: TokenAction,
    },
}

#[derive(Debug, Args)]
struct ResourceArgs {
    #[command(subcommand)]
    action: ResourceAction,
}

#[derive(Debug, Subcommand)]
enum ResourceAction {
    /// List them, a page at a time.
    List {
        #[arg(long)]
        group: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue after this cursor (printed under a page that has more).
        #[arg(long)]
        after: Option<String>,
        /// Subscriptions or credentials of this consumer.
        #[arg(long)]
        consumer: Option<String>,
        /// Subscriptions to this API.
        #[arg(long)]
        api: Option<String>,
        /// Subscriptions under this plan.
        #[arg(long)]
        plan: Option<String>,
    },
    /// Show one, by name or id.
    Get {
        key: String,
        #[arg(long)]
        group: Option<String>,
    },
    /// Create one from a file (YAML or JSON) holding the resource.
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long)]
        group: Option<String>,
    },
    /// Replace one with the file's content.
    Update {
        key: String,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long)]
        group: Option<String>,
        /// Fail unless it is still at this resource version.
        #[arg(long)]
        if_match: Option<u64>,
    },
    /// Delete one.
    Delete {
        key: String,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        if_match: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum CredentialAction {
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue after this cursor (printed under a page that has more).
        #[arg(long)]
        after: Option<String>,
    },
    Get {
        key: String,
    },
    /// Add one from a file, e.g. `jwt: {issuer: ..., subject: ...}`.
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    Delete {
        key: String,
        /// Fail unless it is still at this resource version.
        #[arg(long)]
        if_match: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum KeyAction {
    List,
    /// Generate a key; it is printed once.
    Create {
        #[arg(long)]
        name: Option<String>,
        /// RFC 3339 time after which the key is refused.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Replace a key with a new one.
    Rotate {
        key: String,
        /// How long the old key keeps working, e.g. 1h (default: revoked at once).
        #[arg(long)]
        grace_period: Option<String>,
    },
    Revoke {
        key: String,
    },
}

#[derive(Debug, Subcommand)]
enum ImportWhat {
    /// An OpenAPI 3 spec: an API with a route per path and method, an upstream from servers.
    Openapi {
        file: PathBuf,
        #[arg(long)]
        dry_run: bool,
        /// The API's name (default: from info.title).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        group: Option<String>,
        /// Which `servers` entry becomes the upstream (default 0).
        #[arg(long = "server-index")]
        server_index: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
enum VersionAction {
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        before: Option<u64>,
    },
    /// A version's metadata and the registry as it was.
    Show {
        number: u64,
        #[arg(long)]
        group: Option<String>,
    },
    /// What changed between two versions, field by field.
    Diff { from: u64, to: u64 },
    /// Restore a version's state, committed as a new version.
    Rollback {
        number: u64,
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenAction {
    List,
    /// Create a token; it is printed once.
    Create {
        name: String,
        #[arg(long, value_parser = ["viewer", "editor", "admin"])]
        role: String,
    },
    Delete {
        key: String,
    },
}

/// Runs `sluicectl`.
pub async fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    // Whether the flag or the environment gave the server and the token, for errors naming it.
    let given = |id: &str, flag: &'static str, env: &'static str| {
        if matches.value_source(id) == Some(ValueSource::EnvVariable) {
            Origin::Env(env)
        } else {
            Origin::Flag(flag)
        }
    };
    let origins = (
        given("server", "--server", "SLUICE_SERVER"),
        given("token", "--token", "SLUICE_TOKEN"),
    );
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(cli, origins).await {
        Ok(text) => {
            if !text.is_empty() {
                println!("{}", text.trim_end());
            }
            ExitCode::SUCCESS
        }
        Err(CliError::Usage(message)) => {
            eprintln!("sluicectl: {message}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("sluicectl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_file(path: &Path) -> Result<String, CliError> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| CliError::Usage(format!("cannot read standard input: {e}")))?;
        return Ok(text);
    }
    std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))
}

/// A resource file (YAML or JSON) as JSON.
fn resource_file(path: &Path) -> Result<Value, CliError> {
    mapping(path, &read_file(path)?, Format::Yaml)
}

/// A file's content as a JSON object, read as the server reads it (JSON is YAML too). Anything
/// else is a usage error here rather than a 422 after the upload; almost any text parses as
/// YAML (a README is one long string), hence the check for a mapping.
fn mapping(path: &Path, text: &str, format: Format) -> Result<Value, CliError> {
    let (parsed, expected) = match format {
        Format::Json => (
            serde_json::from_str::<Value>(text).map_err(|e| e.to_string()),
            "JSON",
        ),
        Format::Yaml => (
            serde_yaml_ng::from_str::<Value>(text).map_err(|e| e.to_string()),
            "YAML or JSON",
        ),
    };
    match parsed {
        Ok(value) if value.is_object() => Ok(value),
        Ok(_) => Err(CliError::Usage(format!(
            "{} is not a {expected} mapping (an object of fields)",
            path.display()
        ))),
        Err(e) => Err(CliError::Usage(format!(
            "{} is not {expected}: {e}",
            path.display()
        ))),
    }
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn if_match(version: Option<u64>) -> Vec<(&'static str, String)> {
    version
        .map(|v| vec![("if-match", format!("\"{v}\""))])
        .unwrap_or_default()
}

/// A spinner while a long request runs (on a terminal only).
async fn with_progress<T>(label: String, work: impl Future<Output = T>) -> T {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_message(label);
    bar.enable_steady_tick(Duration::from_millis(100));
    let result = work.await;
    bar.finish_and_clear();
    result
}

async fn run(cli: Cli, (server_from, token_from): (Origin, Origin)) -> Result<String, CliError> {
    let output = cli.output;
    let command = match cli.command {
        Command::Validate { file } => return validate(&file),
        Command::Schema => {
            return Ok(
                serde_json::to_string_pretty(&declarative::json_schema()).unwrap_or_default()
            );
        }
        Command::Online(command) => command,
    };
    // An empty flag or variable counts as unset, so the config file can still supply it; the
    // file is not read at all when flags and environment give both.
    let non_empty = |v: Option<String>| v.filter(|v| !v.is_empty());
    let server = non_empty(cli.server).map(|s| (s, server_from));
    let token = non_empty(cli.token).map(|t| (t, token_from));
    let (file_server, file_token) = if server.is_some() && token.is_some() {
        (None, None)
    } else {
        match read_config(non_empty(cli.config).map(PathBuf::from).as_ref())? {
            Some((path, file)) => (
                non_empty(file.server).map(|s| (s, Origin::File(path.clone(), "server"))),
                non_empty(file.token).map(|t| (t, Origin::File(path, "token"))),
            ),
            None => (None, None),
        }
    };
    let (server, server_origin) = server
        .or(file_server)
        .unwrap_or_else(|| (DEFAULT_SERVER.to_owned(), Origin::Flag("--server")));
    let client = Client::new(server, server_origin, token.or(file_token))?;
    let ctx = Ctx {
        client,
        output,
        message: cli.message,
    };
    match command {
        Online::Apis(args) => ctx.resource("apis", args.action).await,
        Online::Upstreams(args) => ctx.resource("upstreams", args.action).await,
        Online::Consumers(args) => ctx.resource("consumers", args.action).await,
        Online::Plans(args) => ctx.resource("plans", args.action).await,
        Online::Subscriptions(args) => ctx.resource("subscriptions", args.action).await,
        Online::Policies(args) => ctx.resource("policies", args.action).await,
        Online::Brokers(args) => ctx.resource("brokers", args.action).await,
        Online::Certificates(args) => ctx.resource("certificates", args.action).await,
        Online::Credentials {
            consumer,
            group,
            action,
        } => ctx.credentials(&consumer, group, action).await,
        Online::Keys {
            consumer,
            group,
            action,
        } => ctx.keys(&consumer, group, action).await,
        Online::Apply { file, dry_run } => {
            let text = read_file(&file)?;
            let format = Format::from_path(&file);
            mapping(&file, &text, format)?;
            let content_type = if format == Format::Json {
                "application/json"
            } else {
                "application/yaml"
            };
            let path = format!(
                "/v1/apply{}",
                ctx.write_query(&[("dry_run", dry_run.then(|| "true".into()))])
            );
            let label = format!("applying {} ({} bytes)", file.display(), text.len());
            let reply = with_progress(
                label,
                ctx.client
                    .call(Method::POST, &path, Body::Text(text, content_type), &[]),
            )
            .await?;
            Ok(ctx.show(&reply, Shape::Changes))
        }
        Online::Export { group, version } => {
            let format = (output == Output::Json).then(|| "json".to_owned());
            let path = format!(
                "/v1/export{}",
                query(&[
                    ("group", group),
                    ("version", version.map(|v| v.to_string())),
                    ("format", format)
                ])
            );
            let (document, version) = ctx.client.document(&path).await?;
            // On standard error, so that standard output stays a document to apply.
            if let Some(version) = version {
                eprintln!("exported version {version}");
            }
            Ok(document)
        }
        Online::Import {
            what:
                ImportWhat::Openapi {
                    file,
                    dry_run,
                    name,
                    group,
                    server_index,
                },
        } => {
            let text = read_file(&file)?;
            mapping(&file, &text, Format::Yaml)?;
            let path = format!(
                "/v1/import/openapi{}",
                ctx.write_query(&[
                    ("dry_run", dry_run.then(|| "true".into())),
                    ("name", name),
                    ("group", group),
                    ("server", server_index.map(|i| i.to_string())),
                ])
            );
            let label = format!("importing {}", file.display());
            let reply = with_progress(
                label,
                ctx.client.call(
                    Method::POST,
                    &path,
                    Body::Text(text, "application/yaml"),
                    &[],
                ),
            )
            .await?;
            Ok(ctx.show(&reply, Shape::Changes))
        }
        Online::Versions { action } => ctx.versions(action).await,
        Online::Status {
            group,
            limit,
            after,
        } => {
            let pairs = [
                ("group", group),
                ("limit", Some(limit.to_string())),
                ("after", after),
            ];
            ctx.get(
                &format!("/v1/dataplanes{}", query(&pairs)),
                Shape::DataPlanes,
            )
            .await
        }
        Online::Tokens { action } => ctx.tokens(action).await,
    }
}

/// What every online command needs.
struct Ctx {
    client: Client,
    output: Output,
    message: Option<String>,
}

impl Ctx {
    fn show(&self, value: &Value, shape: Shape) -> String {
        render(value, self.output, shape)
    }

    /// A query string for a write: `pairs` plus the version message, if one was given.
    fn write_query(&self, pairs: &[(&str, Option<String>)]) -> String {
        let mut all = pairs.to_vec();
        all.push(("message", self.message.clone()));
        query(&all)
    }

    async fn get(&self, path: &str, shape: Shape) -> Result<String, CliError> {
        Ok(self.show(
            &self.client.call(Method::GET, path, Body::None, &[]).await?,
            shape,
        ))
    }

    async fn resource(&self, collection: &str, action: ResourceAction) -> Result<String, CliError> {
        match action {
            ResourceAction::List {
                group,
                limit,
                after,
                consumer,
                api,
                plan,
            } => {
                let pairs = [
                    ("group", group),
                    ("limit", Some(limit.to_string())),
                    ("after", after),
                    ("consumer", consumer),
                    ("api", api),
                    ("plan", plan),
                ];
                self.get(
                    &format!("/v1/{collection}{}", query(&pairs)),
                    Shape::Resources,
                )
                .await
            }
            ResourceAction::Get { key, group } => {
                self.get(
                    &format!(
                        "/v1/{collection}/{}{}",
                        encode(&key),
                        query(&[("group", group)])
                    ),
                    Shape::Resource,
                )
                .await
            }
            ResourceAction::Create { file, group } => {
                let path = format!("/v1/{collection}{}", self.write_query(&[("group", group)]));
                let reply = self
                    .client
                    .call(Method::POST, &path, Body::Json(resource_file(&file)?), &[])
                    .await?;
                Ok(self.show(&reply, Shape::Resource))
            }
            ResourceAction::Update {
                key,
                file,
                group,
                if_match: version,
            } => {
                let path = format!(
                    "/v1/{collection}/{}{}",
                    encode(&key),
                    self.write_query(&[("group", group)])
                );
                let reply = self
                    .client
                    .call(
                        Method::PUT,
                        &path,
                        Body::Json(resource_file(&file)?),
                        &if_match(version),
                    )
                    .await?;
                Ok(self.show(&reply, Shape::Resource))
            }
            ResourceAction::Delete {
                key,
                group,
                if_match: version,
            } => {
                let path = format!(
                    "/v1/{collection}/{}{}",
                    encode(&key),
                    self.write_query(&[("group", group)])
                );
                self.client
                    .call(Method::DELETE, &path, Body::None, &if_match(version))
                    .await?;
                Ok(format!("deleted {collection} {key}"))
            }
        }
    }

    async fn credentials(
        &self,
        consumer: &str,
        group: Option<String>,
        action: CredentialAction,
    ) -> Result<String, CliError> {
        let base = format!("/v1/consumers/{}/credentials", encode(consumer));
        match action {
            CredentialAction::List { limit, after } => {
                let pairs = [
                    ("group", group),
                    ("limit", Some(limit.to_string())),
                    ("after", after),
                ];
                self.get(&format!("{base}{}", query(&pairs)), Shape::Resources)
                    .await
            }
            CredentialAction::Get { key } => {
                self.get(
                    &format!("{base}/{}{}", encode(&key), query(&[("group", group)])),
                    Shape::Resource,
                )
                .await
            }
            CredentialAction::Create { file } => {
                let path = format!("{base}{}", self.write_query(&[("group", group)]));
                let reply = self
                    .client
                    .call(Method::POST, &path, Body::Json(resource_file(&file)?), &[])
                    .await?;
                Ok(self.show(&reply, Shape::Resource))
            }
            CredentialAction::Delete {
                key,
                if_match: version,
            } => {
                let path = format!(
                    "{base}/{}{}",
                    encode(&key),
                    self.write_query(&[("group", group)])
                );
                self.client
                    .call(Method::DELETE, &path, Body::None, &if_match(version))
                    .await?;
                Ok(format!("deleted credential {key}"))
            }
        }
    }

    /// A key just issued: its plaintext, once.
    fn issued(&self, body: &Value) -> String {
        if self.output != Output::Table {
            return render(body, self.output, Shape::Other);
        }
        let name = body["credential"]["name"].as_str().unwrap_or_default();
        format!(
            "key {name}: {}\nstore it now: it is not shown again",
            body["key"].as_str().unwrap_or_default()
        )
    }

    async fn keys(
        &self,
        consumer: &str,
        group: Option<String>,
        action: KeyAction,
    ) -> Result<String, CliError> {
        let base = format!("/v1/consumers/{}/keys", encode(consumer));
        match action {
            KeyAction::List => {
                self.get(
                    &format!("{base}{}", query(&[("group", group)])),
                    Shape::Keys,
                )
                .await
            }
            KeyAction::Create { name, expires_at } => {
                let mut body = json!({});
                if let Some(name) = name {
                    body["name"] = name.into();
                }
                if let Some(at) = expires_at {
                    body["expires_at"] = at.into();
                }
                let path = format!("{base}{}", self.write_query(&[("group", group)]));
                Ok(self.issued(
                    &self
                        .client
                        .call(Method::POST, &path, Body::Json(body), &[])
                        .await?,
                ))
            }
            KeyAction::Rotate { key, grace_period } => {
                let body = grace_period.map_or_else(|| json!({}), |g| json!({ "grace_period": g }));
                let path = format!(
                    "{base}/{}/rotate{}",
                    encode(&key),
                    self.write_query(&[("group", group)])
                );
                Ok(self.issued(
                    &self
                        .client
                        .call(Method::POST, &path, Body::Json(body), &[])
                        .await?,
                ))
            }
            KeyAction::Revoke { key } => {
                let path = format!(
                    "{base}/{}/revoke{}",
                    encode(&key),
                    self.write_query(&[("group", group)])
                );
                self.client
                    .call(Method::POST, &path, Body::None, &[])
                    .await?;
                Ok(format!("revoked key {key}"))
            }
        }
    }

    async fn versions(&self, action: VersionAction) -> Result<String, CliError> {
        match action {
            VersionAction::List { limit, before } => {
                let pairs = [
                    ("limit", Some(limit.to_string())),
                    ("before", before.map(|b| b.to_string())),
                ];
                self.get(&format!("/v1/versions{}", query(&pairs)), Shape::Versions)
                    .await
            }
            VersionAction::Show { number, group } => {
                self.get(
                    &format!("/v1/versions/{number}{}", query(&[("group", group)])),
                    Shape::Other,
                )
                .await
            }
            VersionAction::Diff { from, to } => {
                self.get(&format!("/v1/versions/{from}/diff/{to}"), Shape::Changes)
                    .await
            }
            VersionAction::Rollback { number, dry_run } => {
                let path = format!(
                    "/v1/versions/{number}/rollback{}",
                    self.write_query(&[("dry_run", dry_run.then(|| "true".into()))])
                );
                let reply = with_progress(
                    format!("rolling back to {number}"),
                    self.client.call(Method::POST, &path, Body::None, &[]),
                )
                .await?;
                Ok(self.show(&reply, Shape::Changes))
            }
        }
    }

    async fn tokens(&self, action: TokenAction) -> Result<String, CliError> {
        match action {
            TokenAction::List => self.get("/v1/tokens", Shape::Tokens).await,
            TokenAction::Create { name, role } => {
                let reply = self
                    .client
                    .call(
                        Method::POST,
                        "/v1/tokens",
                        Body::Json(json!({ "name": name, "role": role })),
                        &[],
                    )
                    .await?;
                Ok(if self.output == Output::Table {
                    format!(
                        "token {name} ({role}): {}\nstore it now: it is not shown again",
                        reply["token"].as_str().unwrap_or_default()
                    )
                } else {
                    render(&reply, self.output, Shape::Other)
                })
            }
            TokenAction::Delete { key } => {
                self.client
                    .call(
                        Method::DELETE,
                        &format!("/v1/tokens/{}", encode(&key)),
                        Body::None,
                        &[],
                    )
                    .await?;
                Ok(format!("deleted token {key}"))
            }
        }
    }
}

fn validate(file: &Path) -> Result<String, CliError> {
    let text = read_file(file)?;
    let format = if file.as_os_str() == "-" {
        Format::Yaml
    } else {
        Format::from_path(file)
    };
    match declarative::load(&text, format) {
        Ok(config) => Ok(format!(
            "{}: ok: {} apis ({} routes), {} upstreams, {} consumers ({} credentials), {} plans, \
             {} subscriptions, {} policies, {} brokers, {} certificates; content hash {}",
            file.display(),
            config.apis.len(),
            config.apis.iter().map(|a| a.routes.len()).sum::<usize>(),
            config.upstreams.len(),
            config.consumers.len(),
            config.credentials.len(),
            config.plans.len(),
            config.subscriptions.len(),
            config.policies.len(),
            config.brokers.len(),
            config.certificates.len(),
            sluice_proto::snapshot::content_hash(&sluice_proto::snapshot::from_config(
                config.clone()
            )),
        )),
        Err(errors) => Err(CliError::Api(format!("{}: {errors}", file.display()))),
    }
}
