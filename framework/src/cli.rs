//! The subcommands every jetworker binary gets, so a user's worker binary and the
//! `workers` platform share one command line.
//!
//! A binary with no commands of its own calls [`main`]. One that adds commands embeds
//! [`GlobalArgs`] and [`Command`] in its own clap parser:
//!
//! ```no_run
//! use clap::{Parser, Subcommand};
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     global: jetworker::cli::GlobalArgs,
//!     #[command(subcommand)]
//!     command: Cmd,
//! }
//!
//! #[derive(Subcommand)]
//! enum Cmd {
//!     #[command(flatten)]
//!     Jetworker(jetworker::cli::Command),
//!     /// Something of this binary's own.
//!     Hello,
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     let cli = Cli::parse();
//!     jetworker::cli::init_logging(cli.global.log_format);
//!     let app = jetworker::App::new(());
//!     match cli.command {
//!         Cmd::Jetworker(command) => jetworker::cli::execute(&cli.global, command, app).await,
//!         Cmd::Hello => std::process::ExitCode::SUCCESS,
//!     }
//! }
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::app::{App, RunError};
use crate::config::{Config, ConfigError};
use crate::{connect, provision};

/// Exit code for an invalid config (or a consumer naming an unregistered handler).
pub const EXIT_INVALID_CONFIG: u8 = 2;
/// Exit code for a provisioning plan with conflicts.
pub const EXIT_CONFLICT: u8 = 3;
/// Exit code for a runtime failure (server unreachable, request failed).
pub const EXIT_FAILURE: u8 = 1;

/// Options shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Path of the config file.
    #[arg(long, short = 'c', global = true, env = "JETWORKER_CONFIG", default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Log format: human-readable lines or one JSON object per line.
    #[arg(long, global = true, env = "JETWORKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// How logs are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The built-in subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Connect, provision, and run every consumer until SIGTERM or SIGINT.
    Run,
    /// Validate the config without a server; exit 2 when it has problems.
    Check,
    /// Create or update the streams and consumers of the config (never deletes).
    Provision {
        /// Print the plan without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The command line of a binary with only the built-in subcommands.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Shared options.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Parses the command line, sets up logging and runs the command with `app`: a whole `main`.
pub async fn main<S: Send + Sync + 'static>(app: App<S>) -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.log_format);
    execute(&cli.global, cli.command, app).await
}

/// Sets up `tracing` output on stderr. The level comes from `RUST_LOG` (default `info`,
/// with the client library's own connection chatter at `warn`).
/// Calling it twice is harmless.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Loads the config, printing its problems to stderr on failure.
pub fn load_config(global: &GlobalArgs) -> Result<Config, ExitCode> {
    Config::load(&global.config).map_err(|e| {
        eprintln!("{e}");
        match e {
            ConfigError::Invalid { .. } => ExitCode::from(EXIT_INVALID_CONFIG),
            ConfigError::Load { .. } => ExitCode::from(EXIT_INVALID_CONFIG),
        }
    })
}

/// Runs one built-in command for `app` and returns the process exit code.
pub async fn execute<S: Send + Sync + 'static>(
    global: &GlobalArgs,
    command: Command,
    app: App<S>,
) -> ExitCode {
    let config = match load_config(global) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match command {
        Command::Run => match app.run(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ RunError::MissingHandlers(_)) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_INVALID_CONFIG)
            }
            Err(RunError::Provision(provision::ProvisionError::Conflicts(plan))) => {
                eprintln!("provisioning has conflicts; nothing was changed and no worker started:\n{plan}");
                ExitCode::from(EXIT_CONFLICT)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::Check => {
            if let Err(e) = app.check(&config) {
                eprintln!("{e}");
                return ExitCode::from(EXIT_INVALID_CONFIG);
            }
            println!(
                "{}: OK ({} stream{}, {} consumer{})",
                global.config.display(),
                config.streams.len(),
                plural(config.streams.len()),
                config.consumers.len(),
                plural(config.consumers.len()),
            );
            ExitCode::SUCCESS
        }
        Command::Provision { dry_run } => run_provision(&config, dry_run).await,
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

async fn run_provision(config: &Config, dry_run: bool) -> ExitCode {
    let client = match connect::connect(&config.connection).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let js = async_nats::jetstream::new(client.clone());
    let result = provision::provision(&client, &js, config, dry_run).await;
    let code = match result {
        Ok(plan) => {
            if dry_run {
                println!("plan (dry run: nothing was changed)");
            } else if plan.has_changes() {
                println!("applied");
            } else {
                println!("nothing to do: everything is unchanged");
            }
            print!("{plan}");
            ExitCode::SUCCESS
        }
        Err(provision::ProvisionError::Conflicts(plan)) => {
            eprintln!("plan has conflicts: nothing was changed");
            print!("{plan}");
            ExitCode::from(EXIT_CONFLICT)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    };
    let _ = client.drain().await;
    code
}
