//! Logging setup for a worker binary: `tracing` output on stderr, human or JSON.

use clap::ValueEnum;

/// How logs are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The levels logged when `RUST_LOG` is not set: `info`, with the client library's own
/// connection chatter at `warn`.
pub const DEFAULT_LOG_FILTER: &str = "info,async_nats=warn";

/// Sets up `tracing` output on stderr. The level comes from `RUST_LOG` (default
/// [`DEFAULT_LOG_FILTER`]). Human lines are colored only on a terminal (and not with
/// `NO_COLOR` set): the journal, `kubectl logs` and log shippers get plain text. Calling
/// it twice is harmless.
pub fn init_logging(format: LogFormat) {
    init_logging_with(format, DEFAULT_LOG_FILTER);
}

/// [`init_logging`] with another default for when `RUST_LOG` is not set (a directive
/// string such as `"warn,jetworker::consumer=error"`), e.g. for a command that prints
/// its own story on stdout and wants only warnings on stderr.
pub fn init_logging_with(format: LogFormat, default_filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && !no_color)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
