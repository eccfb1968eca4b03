//! `sluice-cp`: the Sluice control plane.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use clap::{Parser, Subcommand};
use sluice_control_plane::db;

/// The Sluice control plane: keeps the registry in Postgres, versions every change and
/// streams configuration to data planes.
///
/// With no subcommand it applies the registry migrations, then serves.
#[derive(Debug, Parser)]
#[command(name = "sluice-cp", version)]
struct Cli {
    /// Postgres URL of the registry.
    #[arg(long, env = "DATABASE_URL", global = true, value_name = "URL")]
    database_url: Option<String>,
    /// REST admin API listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7080")]
    http_addr: SocketAddr,
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
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-cp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    use anyhow::Context;
    let url = cli
        .database_url
        .context("no registry database: set --database-url or DATABASE_URL")?;
    let pool = db::connect(&url, Duration::from_secs(10))
        .await
        .context("cannot connect to the registry database")?;
    db::migrate(&pool)
        .await
        .context("cannot apply registry migrations")?;
    tracing::info!("registry migrations applied");
    if let Some(Command::Migrate) = cli.command {
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(cli.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (REST)", cli.http_addr))?;
    tracing::info!(addr = %cli.http_addr, "REST listener up");
    let health = Router::new().route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, health)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler can be installed");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await
        .context("REST listener failed")
}
