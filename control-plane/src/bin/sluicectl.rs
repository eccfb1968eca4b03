//! `sluicectl`: the Sluice command line (see [`sluice_control_plane::cli`]).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    sluice_control_plane::cli::main().await
}
