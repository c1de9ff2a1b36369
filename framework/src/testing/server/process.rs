//! A server process: spawning it, its watchdog, signals, stopping it, reading its log.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::TestServerError;

/// A small process that ends another one should this process die without doing so: a
/// killed test binary (`kill -9`, a timeout, `std::process::exit`), a demo stopped by a
/// second Ctrl-C. It is `sh` blocked reading a pipe whose only writer is this process
/// (close-on-exec, so no other child inherits it); when the pipe closes, however this
/// process ended, it sends SIGTERM to the guarded process and SIGKILL after a grace
/// period (at once when the grace is zero).
///
/// It runs in a process group of its own, so a terminal's Ctrl-C does not end it before
/// it has done its job, and shows in `ps` as `LABEL PID` (for example
/// `jetworker-demo-watchdog 4711`). Dropping the `Watchdog` ends it without touching the
/// guarded process: drop it before reaping that process, whose pid may be reused after.
///
/// ```no_run
/// use std::process::Command;
/// use std::time::Duration;
/// use jetworker::testing::server::Watchdog;
///
/// let mut worker = Command::new("my-worker").spawn()?;
/// let watchdog = Watchdog::guard(worker.id(), "my-worker-watchdog", Duration::ZERO);
/// // ... the test ...
/// drop(watchdog);
/// worker.kill()?;
/// worker.wait()?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Watchdog {
    process: Option<Child>,
}

impl Watchdog {
    /// Guards `pid`, with `grace` between SIGTERM and SIGKILL (rounded to tenths of a
    /// second). Best effort: when `sh` cannot be started the process is unguarded.
    pub fn guard(pid: u32, label: &str, grace: Duration) -> Watchdog {
        let tenths = grace.as_millis().div_ceil(100).to_string();
        let mut command = Command::new("sh");
        command
            .args([
                "-c",
                r#"read _ignored
                   if [ "$2" -gt 0 ]; then
                       kill -TERM "$1" 2>/dev/null || exit 0
                       i=0
                       while [ "$i" -lt "$2" ] && kill -0 "$1" 2>/dev/null; do sleep 0.1; i=$((i+1)); done
                   fi
                   kill -KILL "$1" 2>/dev/null; exit 0"#,
                label,
                &pid.to_string(),
                &tenths,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        Watchdog {
            process: command.spawn().ok(),
        }
    }

    /// Ends the watchdog without touching the guarded process (also done on drop).
    pub fn disarm(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// Sends `SIG<name>` to `pid` with the shell's `kill` (the crate forbids `unsafe`, so no
/// libc); whether it was delivered.
pub(super) fn signal(pid: u32, name: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            "kill -\"$1\" \"$2\"",
            "jetworker-signal",
            name,
            &pid.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One running `nats-server` process and its watchdog.
#[derive(Debug)]
pub(super) struct ServerProcess {
    child: Child,
    watchdog: Watchdog,
    /// Length of the log when this run started: error messages quote only this run.
    pub(super) log_offset: u64,
    /// Length of the stdout/stderr file when this run started.
    pub(super) out_offset: u64,
}

/// Where one server's files are, to start it.
pub(super) struct Launch<'a> {
    pub(super) bin: &'a Path,
    pub(super) config: &'a Path,
    pub(super) dir: &'a Path,
    pub(super) log_file: &'a Path,
    /// Its stdout and stderr (config errors land here, not in the log).
    pub(super) out_path: &'a Path,
    /// How the watchdog shows in `ps`.
    pub(super) watchdog_label: &'a str,
    /// SIGTERM to SIGKILL, for the watchdog.
    pub(super) stop_grace: Duration,
}

impl ServerProcess {
    /// Starts `bin -c config` in `dir` and its watchdog; does not wait for readiness. The
    /// server runs in a process group of its own: a terminal's Ctrl-C reaches the program
    /// that started it, which stops the server when it is done with it (not before, from
    /// under its clients).
    pub(super) fn spawn(launch: &Launch<'_>) -> Result<Self, TestServerError> {
        let log_offset = file_len(launch.log_file);
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(launch.out_path)
            .map_err(|e| {
                TestServerError::io(format!("opening {}", launch.out_path.display()), e)
            })?;
        let out_offset = out.metadata().map(|m| m.len()).unwrap_or(0);
        let err = out
            .try_clone()
            .map_err(|e| TestServerError::io("duplicating a file handle", e))?;
        let child = Command::new(launch.bin)
            .arg("-c")
            .arg(launch.config)
            .current_dir(launch.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .map_err(|e| TestServerError::io(format!("starting {}", launch.bin.display()), e))?;
        let watchdog = Watchdog::guard(child.id(), launch.watchdog_label, launch.stop_grace);
        Ok(Self {
            child,
            watchdog,
            log_offset,
            out_offset,
        })
    }

    /// The process id.
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it exited, if it did (reaping it); `None` while it runs.
    pub(super) fn exited(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// SIGKILL (the watchdog ended first) and reap: how it exited.
    pub(super) fn kill(mut self) -> Option<ExitStatus> {
        self.watchdog.disarm();
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// SIGTERM, up to `grace` for it to exit, then SIGKILL: how it exited.
    pub(super) fn stop(mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.watchdog.disarm();
            return Some(status);
        }
        if signal(self.pid(), "TERM") {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = self.child.try_wait() {
                    self.watchdog.disarm();
                    return Some(status);
                }
                thread::sleep(Duration::from_millis(20));
            }
            tracing::warn!(pid = self.pid(), "nats-server ignored SIGTERM; killing it");
        }
        self.kill()
    }
}

pub(super) fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The last `lines` lines of `path` from byte `offset` on (empty when unreadable).
pub(super) fn tail_lines(path: &Path, offset: u64, lines: usize) -> String {
    let mut bytes = Vec::new();
    let read = File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        f.read_to_end(&mut bytes)
    });
    if read.is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    // Our own readiness polling makes the server log a warning per failed /healthz: noise.
    let all: Vec<&str> = text
        .lines()
        .filter(|line| !line.contains("Healthcheck failed"))
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        // A reaped process has no /proc entry; a zombie shows "Z".
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    }

    #[test]
    fn a_disarmed_watchdog_leaves_its_process_alone() -> io::Result<()> {
        let mut sleeper = Command::new("sleep").arg("30").spawn()?;
        let mut watchdog = Watchdog::guard(sleeper.id(), "test-watchdog", Duration::ZERO);
        watchdog.disarm();
        thread::sleep(Duration::from_millis(100));
        assert!(alive(sleeper.id()));
        sleeper.kill()?;
        sleeper.wait()?;
        Ok(())
    }

    #[test]
    fn signals_reach_the_process() -> io::Result<()> {
        let mut sleeper = Command::new("sleep").arg("30").spawn()?;
        assert!(signal(sleeper.id(), "TERM"));
        let status = sleeper.wait()?;
        assert!(!status.success());
        Ok(())
    }
}
