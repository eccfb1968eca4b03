//! `sluice-cp`: the Sluice control plane.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_control_plane::api::auth::Authenticator;
use sluice_control_plane::api::{grpc, rest};
use sluice_control_plane::registry::{DEFAULT_RETENTION, Registry};
use sluice_control_plane::{db, discovery};
use sluice_proto::pb;

/// The Sluice control plane: keeps the registry in Postgres, versions every change and serves
/// the admin API over REST and gRPC.
///
/// With no subcommand it applies the registry migrations, then serves.
#[derive(Debug, Parser)]
// A flag given twice takes its last value, so a deployment's extra arguments can override
// what a chart sets.
#[command(name = "sluice-cp", version, args_override_self = true)]
struct Cli {
    /// Postgres URL of the registry.
    #[arg(long, env = "DATABASE_URL", global = true, value_name = "URL")]
    database_url: Option<String>,
    /// REST admin API listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7080")]
    http_addr: SocketAddr,
    /// gRPC listener (registry admin API, reflection, health).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7090")]
    grpc_addr: SocketAddr,
    /// Discovery listener: data planes stream their configuration from here (gRPC).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7091")]
    discovery_addr: SocketAddr,
    /// This replica's name in data-plane status; default: the discovery address.
    #[arg(long, value_name = "NAME", env = "SLUICE_CP_REPLICA")]
    replica_name: Option<String>,
    /// The least time between two pushes to a data plane: a commit after a quiet spell is
    /// pushed at once, later ones within the window wait for its end and go out together.
    #[arg(long, value_name = "DURATION", default_value = "50ms", value_parser = humantime::parse_duration)]
    push_coalesce: Duration,
    /// Bootstrap admin token: an admin credential that needs no database row. Use it to create
    /// the first stored tokens.
    #[arg(
        long,
        env = "SLUICE_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
    /// The longest one registry statement may run or wait for a lock, and a transaction may
    /// sit idle: Postgres ends it past this, and the request gets 503.
    #[arg(long, env = "SLUICE_DB_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    db_timeout: Duration,
    /// Versions kept for diffs and rollback; older ones are pruned at each commit.
    #[arg(long, env = "SLUICE_VERSION_RETENTION", value_name = "N", default_value_t = DEFAULT_RETENTION)]
    version_retention: u64,
    /// Data planes not heard from for this long are dropped from `/v1/dataplanes` (nodes
    /// scaled away, or restarted under new ids); `0s` keeps them for ever.
    #[arg(long, env = "SLUICE_DATAPLANE_RETENTION", value_name = "DURATION", default_value = "14d", value_parser = humantime::parse_duration)]
    dataplane_retention: Duration,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply registry migrations and exit.
    Migrate,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-cp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let url = cli
        .database_url
        .context("no registry database: set --database-url or DATABASE_URL")?;
    let timeouts = db::Timeouts {
        statement: cli.db_timeout,
        ..db::Timeouts::default()
    };
    let pool = db::connect(&url, timeouts)
        .await
        .context("cannot connect to the registry database")?;
    db::migrate(&pool)
        .await
        .context("cannot apply registry migrations")?;
    tracing::info!("registry migrations applied");
    if let Some(Command::Migrate) = cli.command {
        return Ok(());
    }
    if cli.admin_token.as_deref().is_none_or(str::is_empty) {
        tracing::warn!(
            "no --admin-token / SLUICE_ADMIN_TOKEN: only tokens already stored can call the admin API"
        );
    }
    if !cli.dataplane_retention.is_zero() {
        tokio::spawn(forget_silent_data_planes(
            pool.clone(),
            cli.dataplane_retention,
        ));
    }
    let registry = Registry::new(pool.clone(), cli.version_retention);
    let metrics = std::sync::Arc::new(sluice_control_plane::metrics::Metrics::default());
    let auth = Authenticator::new(pool, cli.admin_token.as_deref());

    let http = tokio::net::TcpListener::bind(cli.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (REST)", cli.http_addr))?;
    let grpc_listener = tokio::net::TcpListener::bind(cli.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on {} (gRPC)", cli.grpc_addr))?;
    let discovery_listener = tokio::net::TcpListener::bind(cli.discovery_addr)
        .await
        .with_context(|| format!("cannot listen on {} (discovery)", cli.discovery_addr))?;
    tracing::info!(rest = %cli.http_addr, grpc = %cli.grpc_addr, discovery = %cli.discovery_addr, "listening");

    let shutdown = shutdown_signal();
    let rest_server = axum::serve(
        http,
        rest::router(rest::AppState {
            registry: registry.clone(),
            auth: auth.clone(),
            metrics: metrics.clone(),
        }),
    )
    .with_graceful_shutdown(shutdown.clone().wait());
    let commits = discovery::watch_commits(&registry);
    let discovery_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(pb::discovery_server::DiscoveryServer::new(
            discovery::DiscoveryService::new(
                registry.clone(),
                commits,
                cli.push_coalesce,
                cli.replica_name
                    .clone()
                    .unwrap_or_else(|| cli.discovery_addr.to_string()),
                metrics.clone(),
            )
            .with_shutdown(shutdown.0.clone()),
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(discovery_listener),
            shutdown.clone().wait(),
        );
    let grpc_server = grpc::serve(grpc_listener, registry, auth, shutdown.wait());
    tokio::try_join!(
        async { rest_server.await.context("REST listener failed") },
        async { grpc_server.await.context("gRPC listener failed") },
        async { discovery_server.await.context("discovery listener failed") },
    )?;
    Ok(())
}

/// Drops the status of data planes silent for `retention`, checking as often as a tenth of it
/// (at least every second, at most every minute). Every replica does it; deleting is
/// idempotent.
async fn forget_silent_data_planes(pool: sqlx::PgPool, retention: Duration) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match discovery::status::forget_silent(&pool, retention).await {
            Ok(0) => {}
            Ok(forgotten) => {
                tracing::info!(forgotten, retention = ?retention, "data planes silent past the retention forgotten");
            }
            Err(e) => tracing::warn!(error = %e, "cannot forget silent data planes"),
        }
    }
}

/// A shutdown signal (SIGTERM or Ctrl-C) that several servers can wait on.
fn shutdown_signal() -> Shutdown {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler can be installed");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    Shutdown(rx)
}

#[derive(Debug, Clone)]
struct Shutdown(tokio::sync::watch::Receiver<bool>);

impl Shutdown {
    async fn wait(mut self) {
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }
}
