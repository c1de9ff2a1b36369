//! jetworker-cli: the operator's tools every jetworker worker binary gets.
//!
//! A worker's `main` is one line; the binary then has `run`, `check`, `provision`,
//! `status`, `dlq list | show | replay | purge`, `permissions` and `console` (a web
//! page over the same reads and dead-letter operations, see [`Console`]):
//!
//! ```no_run
//! # async fn count_click(_: jetworker::Event<u64>, _: jetworker::Context) -> Result<(), jetworker::HandlerError> { Ok(()) }
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     jetworker_cli::main(jetworker::App::new(()).handler("count_click", count_click)).await
//! }
//! ```
//!
//! A binary that wants its own name, `--version` and about text, or commands of its own,
//! builds a [`Cli`]; its commands are a `clap::Subcommand` enum and one async function:
//!
//! ```no_run
//! use std::process::ExitCode;
//!
//! #[derive(clap::Subcommand)]
//! enum Extra {
//!     /// Say hello (a command of this binary's own).
//!     Hello,
//! }
//!
//! #[tokio::main]
//! async fn main() -> ExitCode {
//!     jetworker_cli::Cli::new(jetworker::App::new(()))
//!         .name("orders")
//!         .version(env!("CARGO_PKG_VERSION"))
//!         .about("Order workers")
//!         .commands(|command: Extra, invocation: jetworker_cli::Invocation<()>| async move {
//!             match command {
//!                 Extra::Hello => println!("hello from {}", invocation.global.config.display()),
//!             }
//!             ExitCode::SUCCESS
//!         })
//!         .main()
//!         .await
//! }
//! ```
//!
//! # Web console
//!
//! `console` serves a page on `127.0.0.1:8222` (`--listen`; any non-loopback address
//! needs a token from `JETWORKER_CONSOLE_TOKEN` or `--token-file`) showing what
//! `status` reports, charts of the last minutes, and the dead letters with the `dlq`
//! filters, replay and purge (refused with `--read-only`). Programs embed it with
//! [`Console`], whose docs say what keeps it safe.
//!
//! # Layout
//! - `cli`: [`Cli`], the command line a binary builds: built-in and own commands.
//! - `command`: the built-in subcommands and what each does ([`execute`]), exit codes.
//! - `dlq/`: the dead letters: `streams` (which streams hold them) -> `letter` (one
//!   [`Letter`] and its views) -> `filter` ([`Filter`]) -> `replay` (replay headers,
//!   reports) -> `service` ([`Dlq`]: list / show / replay / purge over a server); `error`.
//! - `console/`: the web console ([`Console`]): `access` (token, sessions, CSRF and
//!   same-origin checks) -> `sampler` (status over time, charts) -> `routes` (the page
//!   and its JSON API; assets built in); `error`.
//! - `status`: per consumer its backlog and dead letters, per stream its size.
//! - `permissions`: the least publish/subscribe permissions a worker's config needs.
//! - `table`: plain text tables for the commands' output.
//! - `logging`: `tracing` on stderr, human or JSON ([`init_logging`]), with syslog
//!   priorities when stderr is the journal ([`stderr_is_journal`]).
//!
//! Errors have jetworker's one shape, [`jetworker::Error`]: [`DlqError`] is
//! `Error<DlqErrorKind>`, [`StatusError`] is `Error<StatusErrorKind>`, [`ConsoleError`]
//! is `Error<ConsoleErrorKind>`; match on `kind()`.

mod cli;
mod command;
mod console;
mod dlq;
mod logging;
mod permissions;
mod status;
mod table;

pub use cli::{main, Cli, Invocation, NoCommands};
pub use command::{
    execute, load_config, Command, DlqCommand, FilterArgs, GlobalArgs, EXIT_CONFLICT, EXIT_FAILURE,
    EXIT_INVALID_CONFIG, EXIT_USAGE,
};
pub use console::{
    check_listen as check_console_listen, Console, ConsoleArgs, ConsoleError, ConsoleErrorKind,
    ConsoleSettings, ConsoleToken, CONSOLE_TOKEN_ENV, DEFAULT_CONSOLE_LISTEN,
};
pub use dlq::{
    dead_letter_streams, decode_payload, list_table, parse_reason, parse_time, replay_headers,
    replay_message_id, DeadLetterSource, DeadLetterStream, Detail, Dlq, DlqError, DlqErrorKind,
    Filter, Letter, Payload, PayloadEncoding, PurgeReport, ReplayReport, Replayed, Summary,
};
pub use logging::{
    init_logging, init_logging_with, stderr_is_journal, LogFormat, DEFAULT_LOG_FILTER,
};
pub use permissions::{Permissions, Scope};
pub use status::{
    collect as collect_status, ConsumerStatus, StatusError, StatusErrorKind, StatusReport,
    StreamStatus,
};
