//! `sluicectl`: the Sluice command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_proto::declarative::{self, Format};

/// Sluice's command line: check declarative files and inspect the config format.
#[derive(Debug, Parser)]
#[command(name = "sluicectl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a declarative file offline: prints every error with its path, or a summary of
    /// the resources it defines. Exit status 1 when the file is refused.
    Validate {
        /// The file (YAML, or JSON when it ends in .json); `-` reads standard input as YAML.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Print the JSON Schema of declarative files (the one published in docs/).
    Schema,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Validate { file } => validate(&file),
        Command::Schema => {
            let schema = serde_json::to_string_pretty(&declarative::json_schema())
                .expect("a generated schema serialises");
            println!("{schema}");
            ExitCode::SUCCESS
        }
    }
}

fn validate(file: &std::path::Path) -> ExitCode {
    let (text, format) = if file.as_os_str() == "-" {
        let mut text = String::new();
        if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
            eprintln!("sluicectl: cannot read standard input: {e}");
            return ExitCode::from(2);
        }
        (text, Format::Yaml)
    } else {
        match std::fs::read_to_string(file) {
            Ok(text) => (text, Format::from_path(file)),
            Err(e) => {
                eprintln!("sluicectl: cannot read {}: {e}", file.display());
                return ExitCode::from(2);
            }
        }
    };
    match declarative::load(&text, format) {
        Ok(config) => {
            println!(
                "{}: ok: {} apis ({} routes), {} upstreams, {} consumers ({} credentials), \
                 {} plans, {} subscriptions, {} policies, {} brokers; content hash {}",
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
                sluice_proto::hash::content_hash(&config),
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{}: {errors}", file.display());
            ExitCode::FAILURE
        }
    }
}
