//! `workers`: the real-time analytics platform built on jetworker.
//!
//! Every jetworker subcommand (`check`, `provision`, ...) is available here; the
//! platform's own commands join them as they are built.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The analytics platform's command line.
#[derive(Debug, Parser)]
#[command(
    name = "workers",
    version,
    about = "Real-time analytics workers on NATS JetStream"
)]
struct Cli {
    #[command(flatten)]
    global: jetworker::cli::GlobalArgs,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    #[command(flatten)]
    Jetworker(jetworker::cli::Command),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    jetworker::cli::init_logging(cli.global.log_format);
    match cli.command {
        Cmd::Jetworker(command) => {
            jetworker::cli::execute(&cli.global, command, jetworker::App::new(())).await
        }
    }
}
