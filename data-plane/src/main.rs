//! `sluice-dp`: the Sluice data plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use sluice_data_plane::admin;
use sluice_data_plane::config::{CompiledConfig, ConfigStore};

/// The Sluice data plane: loads a declarative file (standalone mode), validates it with the
/// same rules as the control plane, and reports what it runs on its admin listener.
#[derive(Debug, Parser)]
#[command(name = "sluice-dp", version)]
struct Args {
    /// Standalone mode: serve this declarative file (YAML, or JSON if it ends in .json).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Admin listener: /healthz, /readyz, /config. Keep it private.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9901")]
    admin_listen: SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logging();
    let args = Args::parse();
    let store = Arc::new(ConfigStore::default());

    let path = &args.config;
    match CompiledConfig::from_file(path) {
        Ok(config) => {
            tracing::info!(path = %path.display(), content_hash = %config.content_hash, "configuration applied");
            store.apply(config);
        }
        Err(e) => {
            eprintln!("sluice-dp: {e}");
            return ExitCode::FAILURE;
        }
    }

    let listener = match tokio::net::TcpListener::bind(args.admin_listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "sluice-dp: cannot listen on {} (admin): {e}",
                args.admin_listen
            );
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %args.admin_listen, "admin listener up");
    let served = axum::serve(listener, admin::router(store))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-dp: admin listener failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// JSON logs on stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
