//! Logging setup for a worker binary: `tracing` output on stderr, human or JSON, with
//! syslog priorities when stderr is the systemd journal.

use std::fmt;

use clap::ValueEnum;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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

/// The variable systemd sets for a service whose stdout or stderr is connected to the
/// journal: `DEVICE:INODE` of that stream (systemd.exec(5)).
const JOURNAL_STREAM: &str = "JOURNAL_STREAM";

/// Sets up `tracing` output on stderr. The level comes from `RUST_LOG` (default
/// [`DEFAULT_LOG_FILTER`]). Human lines are colored only on a terminal (and not with
/// `NO_COLOR` set): the journal, `kubectl logs` and log shippers get plain text. Calling
/// it twice is harmless.
///
/// When stderr is the journal ([`stderr_is_journal`]), every line starts with its
/// syslog priority, `<3>` error, `<4>` warning, `<6>` info, `<7>` debug and trace
/// (sd-daemon(3)): journald stores the line at that priority without the prefix, so
/// `journalctl -u workers -p warning` shows warnings and errors. Continuation lines of a
/// multi-line message keep the journal's default priority (info).
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
    let journal = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && !no_color && !journal)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => {
            let human = tracing_subscriber::fmt::format();
            builder
                .event_format(SyslogPriority::new(human, journal))
                .try_init()
        }
        LogFormat::Json => {
            let json = tracing_subscriber::fmt::format().json().flatten_event(true);
            builder
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(SyslogPriority::new(json, journal))
                .try_init()
        }
    };
}

/// True when `JOURNAL_STREAM` names this process's stderr: systemd connected it to the
/// journal (a child that inherited the variable but writes elsewhere gets `false`).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os(JOURNAL_STREAM) else {
        return false;
    };
    stderr_identity().is_some_and(|own| value.to_str().and_then(parse_journal_stream) == Some(own))
}

/// `DEVICE:INODE` as systemd writes it (decimal numbers).
fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (device, inode) = value.trim().split_once(':')?;
    Some((device.parse().ok()?, inode.parse().ok()?))
}

/// The device and inode of stderr (`fstat(2)`), where the platform has them.
fn stderr_identity() -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
        let meta = std::fs::File::from(fd).metadata().ok()?;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    None
}

/// The sd-daemon(3) priority prefix of a level: `SD_ERR`, `SD_WARNING`, `SD_INFO`,
/// `SD_DEBUG`.
fn syslog_prefix(level: Level) -> &'static str {
    match level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        Level::DEBUG | Level::TRACE => "<7>",
    }
}

/// An event format that starts each event's line with its [`syslog_prefix`] when
/// `enabled`, and is `inner` otherwise.
struct SyslogPriority<F> {
    inner: F,
    enabled: bool,
}

impl<F> SyslogPriority<F> {
    fn new(inner: F, enabled: bool) -> Self {
        SyslogPriority { inner, enabled }
    }
}

impl<S, N, F> FormatEvent<S, N> for SyslogPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.enabled {
            writer.write_str(syslog_prefix(*event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_values_parse_as_device_and_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:12345\n"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
        assert_eq!(parse_journal_stream(""), None);
    }

    #[test]
    fn levels_map_to_sd_daemon_priorities() {
        assert_eq!(syslog_prefix(Level::ERROR), "<3>");
        assert_eq!(syslog_prefix(Level::WARN), "<4>");
        assert_eq!(syslog_prefix(Level::INFO), "<6>");
        assert_eq!(syslog_prefix(Level::DEBUG), "<7>");
        assert_eq!(syslog_prefix(Level::TRACE), "<7>");
    }
}
