//! systemd integration for `Type=notify` services: `READY=1` once the consumers run,
//! `STOPPING=1` when shutdown starts, `STATUS=` lines for `systemctl status`, and
//! `WATCHDOG=1` pings while the worker loops are alive.
//!
//! Everything here is a no-op outside systemd (no `$NOTIFY_SOCKET`), never panics, and
//! never fails the caller: a message that cannot be sent is logged and dropped. The
//! protocol is `sd_notify(3)`: newline-separated `KEY=VALUE` assignments in one datagram
//! to the unix socket named by `$NOTIFY_SOCKET` (a path, or an abstract name when it
//! starts with `@`). The watchdog follows `sd_watchdog_enabled(3)`: `$WATCHDOG_USEC` is
//! the interval, `$WATCHDOG_PID` (when set) must be this process, and pings go out at
//! half the interval.
//!
//! [`App::start`](crate::App::start) and [`Running::wait`](crate::app::Running::wait)
//! already do all of this for every jetworker binary: `STATUS=` lines while connecting
//! and provisioning, `READY=1` once the consumers are started, a `STATUS=` line whenever
//! readiness changes (as `/readyz` sees it), `WATCHDOG=1` pings while the consumer loops
//! are alive (and through the graceful shutdown), `STOPPING=1` when the stop signal
//! arrives. The functions below are for a run loop of your own:
//!
//! ```no_run
//! use jetworker::systemd;
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run() {
//! let stop = CancellationToken::new();
//! // ... connect, provision, start the consumers ...
//! systemd::ready("running 3 consumers");
//! let watchdog = systemd::spawn_watchdog(stop.clone(), || true);
//! stop.cancelled().await;
//! systemd::stopping();
//! // ... wait for in-flight handlers ...
//! if let Some(task) = watchdog {
//!     let _ = task.await;
//! }
//! # }
//! ```

use std::ffi::OsStr;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The variable systemd sets to the notification socket of a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The variable systemd sets to the watchdog interval in microseconds (`WatchdogSec=`).
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The variable naming the process the watchdog applies to; when set and not ours, the
/// watchdog is someone else's (we were started by the main process, not by systemd).
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// How long a send may block when systemd's receive queue is full. Notifications are
/// sent from async code: better a lost ping than a runtime thread stuck for long.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The shortest ping period, so a tiny `WatchdogSec` cannot turn into a busy loop.
const MIN_PING_PERIOD: Duration = Duration::from_millis(10);

/// Where notifications go: the service manager's socket, from `$NOTIFY_SOCKET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    address: NotifyAddress,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NotifyAddress {
    /// A socket file, e.g. `/run/systemd/notify`.
    Path(PathBuf),
    /// A Linux abstract socket name (the part after `@`).
    Abstract(Vec<u8>),
}

impl Notifier {
    /// The notifier of this process, when it runs under a service manager that asked
    /// for notifications (`$NOTIFY_SOCKET` is set to a path or an `@` abstract name).
    pub fn from_env() -> Option<Notifier> {
        Notifier::from_socket(&std::env::var_os(NOTIFY_SOCKET)?)
    }

    /// A notifier for a `$NOTIFY_SOCKET` value: an absolute path, or `@name` for an
    /// abstract socket. Anything else (empty, relative, `vsock:`) is `None`: unsupported
    /// addresses are skipped rather than guessed at.
    pub fn from_socket(value: &OsStr) -> Option<Notifier> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = value.as_bytes();
        let address = match bytes.first()? {
            b'/' => NotifyAddress::Path(PathBuf::from(value)),
            b'@' if bytes.len() > 1 => NotifyAddress::Abstract(bytes[1..].to_vec()),
            _ => return None,
        };
        Some(Notifier { address })
    }

    /// Sends one notification: `assignments` are `KEY=VALUE` lines (see
    /// [`Notification`]). Each call opens a fresh unbound datagram socket, so a
    /// restarted service manager or a changed socket never leaves a stale connection.
    pub fn send(&self, assignments: &[Notification<'_>]) -> io::Result<()> {
        let message = render(assignments);
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        let sent = match &self.address {
            NotifyAddress::Path(path) => socket.send_to(message.as_bytes(), path)?,
            NotifyAddress::Abstract(name) => send_abstract(&socket, message.as_bytes(), name)?,
        };
        if sent == message.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", message.len()),
            ))
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(
    socket: &std::os::unix::net::UnixDatagram,
    message: &[u8],
    name: &[u8],
) -> io::Result<usize> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(message, &address)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(
    _socket: &std::os::unix::net::UnixDatagram,
    _message: &[u8],
    _name: &[u8],
) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets exist on Linux only",
    ))
}

/// One `sd_notify` assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notification<'a> {
    /// `READY=1`: startup is finished; systemd's `start` returns and dependents start.
    Ready,
    /// `STOPPING=1`: shutdown has begun.
    Stopping,
    /// `WATCHDOG=1`: the service is alive; resets the `WatchdogSec=` timer.
    Watchdog,
    /// `STATUS=...`: one line shown by `systemctl status`. Line breaks become spaces.
    Status(&'a str),
}

/// The datagram for `assignments`, one `KEY=VALUE` per line.
fn render(assignments: &[Notification<'_>]) -> String {
    let mut out = String::new();
    for a in assignments {
        match a {
            Notification::Ready => out.push_str("READY=1"),
            Notification::Stopping => out.push_str("STOPPING=1"),
            Notification::Watchdog => out.push_str("WATCHDOG=1"),
            Notification::Status(text) => {
                out.push_str("STATUS=");
                // A newline would start a new assignment: a status text must not be
                // able to say READY=1 or anything else.
                out.extend(
                    text.chars()
                        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c }),
                );
            }
        }
        out.push('\n');
    }
    out
}

/// Sends `assignments` when running under systemd; logs a failure at `warn`. Returns
/// whether the message was sent (`false` outside systemd too).
pub fn notify(assignments: &[Notification<'_>]) -> bool {
    let Some(notifier) = Notifier::from_env() else {
        return false;
    };
    match notifier.send(assignments) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, message = %render(assignments).trim_end().replace('\n', " "), "cannot notify systemd");
            false
        }
    }
}

/// `READY=1` with a `STATUS=` line: call once the consumers run (after provisioning),
/// so `systemctl start` returns only when the worker really works.
pub fn ready(status: &str) -> bool {
    notify(&[Notification::Ready, Notification::Status(status)])
}

/// `STOPPING=1` with a status line: call when the stop signal arrives, before waiting
/// for in-flight handlers.
pub fn stopping() -> bool {
    notify(&[
        Notification::Stopping,
        Notification::Status("shutting down: waiting for in-flight handlers"),
    ])
}

/// `WATCHDOG=1`: one ping. [`spawn_watchdog`] sends them on a schedule.
pub fn watchdog() -> bool {
    notify(&[Notification::Watchdog])
}

/// A `STATUS=` line for `systemctl status` (e.g. "connecting to NATS", "provisioning").
pub fn status(text: &str) -> bool {
    notify(&[Notification::Status(text)])
}

/// The watchdog interval systemd enforces on this process (`WatchdogSec=`), or `None`
/// when there is no watchdog for us. Ping at half of it (see [`ping_period`]).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var_os(WATCHDOG_USEC);
    let pid = std::env::var_os(WATCHDOG_PID);
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// `sd_watchdog_enabled(3)` as a pure function of the two variables and our pid: no
/// `usec`, an unparsable or zero `usec`, an unparsable `pid` or another process's `pid`
/// all mean no watchdog.
pub fn watchdog_interval_from(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    our_pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.to_str()?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        let pid: u32 = pid.to_str()?.trim().parse().ok()?;
        if pid != our_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// How often to ping for a watchdog `interval`: half of it, as `sd_watchdog_enabled(3)`
/// recommends, and never less than 10ms.
pub fn ping_period(interval: Duration) -> Duration {
    (interval / 2).max(MIN_PING_PERIOD)
}

/// The watchdog of one process: where to ping and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watchdog {
    notifier: Notifier,
    period: Duration,
}

impl Watchdog {
    /// The watchdog systemd asked of this process (`$NOTIFY_SOCKET` and `$WATCHDOG_USEC`
    /// set, `$WATCHDOG_PID` ours or unset), or `None`.
    pub fn from_env() -> Option<Watchdog> {
        Some(Watchdog::new(Notifier::from_env()?, watchdog_interval()?))
    }

    /// A watchdog pinging `notifier` at half of `interval`.
    pub fn new(notifier: Notifier, interval: Duration) -> Watchdog {
        Watchdog {
            notifier,
            period: ping_period(interval),
        }
    }

    /// Time between pings.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Pings every [`period`](Self::period) until `cancel`, the first at once, each only
    /// when `alive()` says the worker loops are alive. A stuck worker thus stops pinging
    /// and systemd restarts it (`WatchdogSec=` with `Restart=on-failure`); a running
    /// async task alone does not prove the consumers work.
    pub async fn run(self, cancel: CancellationToken, alive: impl Fn() -> bool) {
        let mut ticks = tokio::time::interval(self.period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut withheld = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if alive() {
                if withheld {
                    tracing::info!("worker loops alive again: watchdog pings resumed");
                    withheld = false;
                }
                if let Err(error) = self.notifier.send(&[Notification::Watchdog]) {
                    tracing::warn!(%error, "cannot send the systemd watchdog ping");
                }
            } else if !withheld {
                tracing::error!(
                    period = %humantime::format_duration(self.period),
                    "worker loops not alive: withholding watchdog pings (systemd will restart the service)"
                );
                withheld = true;
            }
        }
    }
}

/// Starts pinging systemd's watchdog at half its interval until `cancel`, each ping only
/// while `alive()` holds. Returns the task, or `None` when systemd asked for no watchdog
/// (no `WatchdogSec=`, or not under systemd). Needs a tokio runtime; the task ends soon
/// after `cancel`.
pub fn spawn_watchdog(
    cancel: CancellationToken,
    alive: impl Fn() -> bool + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    let watchdog = Watchdog::from_env()?;
    let handle = tokio::runtime::Handle::try_current().ok()?;
    tracing::debug!(period = %humantime::format_duration(watchdog.period()), "systemd watchdog enabled");
    Some(handle.spawn(watchdog.run(cancel, alive)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn watchdog_interval_follows_sd_watchdog_enabled() {
        let cases: &[(Option<&OsStr>, Option<&OsStr>, Option<Duration>)] = &[
            (None, None, None),
            (os("30000000"), None, Some(Duration::from_secs(30))),
            (os("30000000"), os("42"), Some(Duration::from_secs(30))),
            (os("30000000"), os("43"), None),
            (os("30000000"), os("x"), None),
            (os("0"), None, None),
            (os("-5"), None, None),
            (os("soon"), None, None),
            (os(""), None, None),
        ];
        for (usec, pid, want) in cases {
            assert_eq!(
                watchdog_interval_from(*usec, *pid, 42),
                *want,
                "usec={usec:?} pid={pid:?}"
            );
        }
    }

    #[test]
    fn pings_at_half_the_interval_with_a_floor() {
        assert_eq!(
            ping_period(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        assert_eq!(ping_period(Duration::from_micros(1)), MIN_PING_PERIOD);
    }

    #[test]
    fn socket_values() {
        assert_eq!(
            Notifier::from_socket(OsStr::new("/run/systemd/notify")),
            Some(Notifier {
                address: NotifyAddress::Path("/run/systemd/notify".into())
            })
        );
        assert_eq!(
            Notifier::from_socket(OsStr::new("@/org/test")),
            Some(Notifier {
                address: NotifyAddress::Abstract(b"/org/test".to_vec())
            })
        );
        for bad in ["", "@", "relative/path", "vsock:2:1234"] {
            assert_eq!(Notifier::from_socket(OsStr::new(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn status_cannot_inject_assignments() {
        assert_eq!(
            render(&[Notification::Ready, Notification::Status("a\nREADY=1\r\nb")]),
            "READY=1\nSTATUS=a READY=1  b\n"
        );
        assert_eq!(
            render(&[Notification::Stopping, Notification::Watchdog]),
            "STOPPING=1\nWATCHDOG=1\n"
        );
    }
}
