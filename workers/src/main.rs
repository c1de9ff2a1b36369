//! `workers`: the real-time analytics platform's binary. Everything lives in the library
//! (`workers::commands`); see `workers --help`.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    workers::commands::run(workers::commands::Cli::parse()).await
}
