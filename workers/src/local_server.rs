//! A local `nats-server` for `workers demo --local-server DIR` (what `scripts/demo` runs):
//! find out whether a server answers at the configured address, and when none does,
//! start one with JetStream and its data in a project folder, and stop it at the end.
//!
//! - [`probe`] reads the `INFO` line a NATS server sends on connect, so it learns whether
//!   anything answers, which version, and whether JetStream is on, without credentials.
//! - [`LocalServer::start`] runs `nats-server -js` on the configured loopback address,
//!   in its own process group (a terminal's Ctrl-C goes to the demo, which stops the
//!   server only after the workers drained), with a watchdog that stops the server if
//!   the demo dies without doing so (`kill -9`, a second Ctrl-C).
//! - [`LocalServer::stop`] stops it gracefully (SIGTERM, then SIGKILL after 10 s).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Environment variable naming the `nats-server` binary (the tests' convention too).
pub const NATS_SERVER_BIN_ENV: &str = "NATS_SERVER_BIN";

/// Where Debian's and Ubuntu's `nats-server` package installs the binary.
pub const DEBIAN_SERVER_PATH: &str = "/usr/sbin/nats-server";

/// How long [`LocalServer::stop`] waits after SIGTERM before it kills.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The server's pid file in its data folder, while it runs.
const PID_FILE: &str = "nats-server.pid";

/// Log lines quoted when the server does not come up.
const LOG_TAIL_LINES: usize = 15;

/// A `host:port` a NATS URL points at, and whether a local server may be started there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Host name or IP as written (`[...]` removed from IPv6).
    pub host: String,
    /// Port (4222 when the URL has none).
    pub port: u16,
    /// The scheme is plain NATS (`nats://` or none), not TLS or websocket.
    pub plain: bool,
}

impl Address {
    /// Parses `nats://user:pass@host:port`, `host:port`, `tls://[::1]:4222`, ... The
    /// userinfo is dropped (never kept, never printed).
    pub fn parse(url: &str) -> Option<Address> {
        let (scheme, rest) = match url.find("://") {
            Some(i) => (&url[..i], &url[i + 3..]),
            None => ("nats", url),
        };
        let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let rest = rest.split(['/', '?']).next().unwrap_or(rest);
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if after.is_empty() => 4222,
                None => return None,
            };
            (host.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host.to_string(), port.parse().ok()?),
                None => (rest.to_string(), 4222),
            }
        };
        if host.is_empty() {
            return None;
        }
        Some(Address {
            host,
            port,
            plain: scheme.eq_ignore_ascii_case("nats"),
        })
    }

    /// Whether the host is this machine (`localhost`, `127.0.0.0/8`, `::1`).
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// `host:port` for connecting and for `nats-server -a`.
    fn socket(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// `nats://host:port`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.socket())
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.socket())
    }
}

/// What answered at an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Nothing listens there (refused, or no answer in time).
    Nothing,
    /// A NATS server.
    Nats {
        /// Its version.
        version: String,
        /// Whether JetStream is enabled on it.
        jetstream: bool,
    },
    /// Something listens but did not greet like a NATS server.
    NotNats(String),
}

/// Connects to `address` and reads the server's `INFO` greeting, within `timeout`.
pub async fn probe(address: &Address, timeout: Duration) -> Probe {
    let read = async {
        let mut stream = TcpStream::connect(address.socket()).await.ok()?;
        let mut greeting = Vec::new();
        let mut chunk = [0u8; 4096];
        // The greeting is one line; a server sends it at once, and it is small.
        while !greeting.contains(&b'\n') && greeting.len() < 64 * 1024 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => greeting.extend_from_slice(&chunk[..n]),
            }
        }
        Some(greeting)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(None) => Probe::Nothing,
        Ok(Some(greeting)) => parse_greeting(&greeting),
        // Connected but silent, or a black hole: either way no usable server.
        Err(_) => Probe::Nothing,
    }
}

/// Reads an `INFO {json}` line.
fn parse_greeting(greeting: &[u8]) -> Probe {
    let line = String::from_utf8_lossy(greeting);
    let line = line.lines().next().unwrap_or("").trim();
    let Some(json) = line.strip_prefix("INFO ") else {
        let shown: String = line.chars().take(60).collect();
        return Probe::NotNats(format!("it greeted with {shown:?}"));
    };
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(info) => Probe::Nats {
            version: info["version"].as_str().unwrap_or("unknown").to_string(),
            jetstream: info["jetstream"].as_bool().unwrap_or(false),
        },
        Err(e) => Probe::NotNats(format!("its INFO is not JSON: {e}")),
    }
}

/// The `nats-server` binary: `NATS_SERVER_BIN`, then `nats-server` on `PATH`, then
/// `/usr/sbin/nats-server` (not on a normal user's `PATH` on Debian).
pub fn find_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os(NATS_SERVER_BIN_ENV).filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        if bin.components().count() > 1 {
            return is_executable(&bin).then_some(bin);
        }
        return on_path(bin.as_os_str());
    }
    on_path("nats-server".as_ref())
        .or_else(|| Some(PathBuf::from(DEBIAN_SERVER_PATH)).filter(|p| is_executable(p)))
}

fn on_path(name: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Why a local server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalServerError {
    /// Creating the data folder or the log, or spawning, failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The server exited or did not answer in time; the message quotes its log.
    #[error("{0}")]
    NotReady(String),
}

/// A `nats-server -js` this process started; stopped by [`LocalServer::stop`], or killed
/// when dropped.
#[derive(Debug)]
pub struct LocalServer {
    child: Child,
    watchdog: Option<Child>,
    address: Address,
    dir: PathBuf,
    log: PathBuf,
    version: String,
}

impl LocalServer {
    /// Starts `binary -js` listening on `address`, storing in `dir` (created if needed;
    /// what an earlier run stored is kept), logging to `dir/nats-server.log`. Returns once
    /// the server greets with JetStream on, or fails within `ready_timeout` quoting the log.
    pub async fn start(
        binary: &Path,
        address: &Address,
        dir: &Path,
        ready_timeout: Duration,
    ) -> Result<LocalServer, LocalServerError> {
        let io = |context: String| move |source| LocalServerError::Io { context, source };
        fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let log = dir.join("nats-server.log");
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("opening {}", log.display())))?;
        let log_start = log_file.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log_file
            .try_clone()
            .map_err(io(format!("opening {}", log.display())))?;
        let mut command = Command::new(binary);
        command
            .arg("-js")
            .args(["-a", &address.host, "-p", &address.port.to_string()])
            .arg("-sd")
            .arg(dir)
            .arg("-P")
            .arg(dir.join(PID_FILE))
            .args(["-n", "jetworker-demo"])
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        // Its own process group: a terminal's Ctrl-C reaches the demo, which stops the
        // server after the workers drained (not before, from under them).
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .map_err(io(format!("starting {}", binary.display())))?;
        let watchdog = spawn_watchdog(child.id());
        let mut server = LocalServer {
            child,
            watchdog,
            address: address.clone(),
            dir: dir.to_path_buf(),
            log: log.clone(),
            version: String::new(),
        };

        let deadline = Instant::now() + ready_timeout;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(LocalServerError::NotReady(format!(
                    "{} exited at start ({status}); its log ({}):\n{}",
                    binary.display(),
                    log.display(),
                    tail(&log, log_start)
                )));
            }
            if let Probe::Nats {
                version,
                jetstream: true,
            } = probe(address, Duration::from_secs(1)).await
            {
                server.version = version;
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(LocalServerError::NotReady(format!(
                    "{} did not answer on {address} within {}; its log ({}):\n{}",
                    binary.display(),
                    humantime::format_duration(ready_timeout),
                    log.display(),
                    tail(&log, log_start)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its version, from its greeting.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Where it listens.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Its data folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Stops it: SIGTERM (it closes its store cleanly), SIGKILL if it is still running
    /// after 10 s. Returns how it exited.
    pub async fn stop(mut self) -> std::io::Result<ExitStatus> {
        self.stop_watchdog();
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + STOP_GRACE;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                tracing::warn!(
                    pid = self.child.id(),
                    "nats-server ignored SIGTERM; killing it"
                );
                self.child.kill()?;
                break self.child.wait()?;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // The server leaves its pid file behind; a stale one would only mislead.
        let _ = fs::remove_file(self.dir.join(PID_FILE));
        Ok(status)
    }

    fn stop_watchdog(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        // Only reached on an early return or a panic; `stop` leaves nothing to do here.
        if let Ok(None) = self.child.try_wait() {
            self.stop_watchdog();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `SIG<name>` to `pid` with kill(1) (the crate forbids `unsafe`, so no libc).
fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A process that stops `pid` when our end of its stdin closes, which happens however we
/// exit (a second Ctrl-C's immediate exit, a panic, `kill -9`): the server never outlives
/// the demo. In its own process group, so a terminal's Ctrl-C does not end it early.
fn spawn_watchdog(pid: u32) -> Option<Child> {
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            // TERM, then KILL if it is still there after 10 s.
            r#"read _ignored; kill -TERM "$1" 2>/dev/null || exit 0
               i=0; while [ $i -lt 100 ] && kill -0 "$1" 2>/dev/null; do sleep 0.1; i=$((i+1)); done
               kill -KILL "$1" 2>/dev/null; exit 0"#,
            "jetworker-demo-watchdog",
            &pid.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command.spawn().ok()
}

/// The last lines of `path` from byte `from` on.
fn tail(path: &Path, from: u64) -> String {
    let mut text = String::new();
    let read = File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        f.read_to_string(&mut text)
    });
    if read.is_err() {
        return "(log unreadable)".to_string();
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_from_urls() {
        let a = Address::parse("nats://127.0.0.1:4222").expect("parses");
        assert_eq!(
            (a.host.as_str(), a.port, a.plain),
            ("127.0.0.1", 4222, true)
        );
        assert!(a.is_loopback());
        let a = Address::parse("nats://ann:secret@localhost").expect("parses");
        assert_eq!((a.host.as_str(), a.port), ("localhost", 4222));
        assert!(a.is_loopback());
        assert!(!a.to_string().contains("secret") && !a.url().contains("ann"));
        let a = Address::parse("tls://[::1]:4333").expect("parses");
        assert_eq!((a.host.as_str(), a.port, a.plain), ("::1", 4333, false));
        assert!(a.is_loopback());
        assert_eq!(a.url(), "nats://[::1]:4333");
        let a = Address::parse("nats.example.com:4222").expect("parses");
        assert!(!a.is_loopback() && a.plain);
        let a = Address::parse("10.0.0.7").expect("parses");
        assert_eq!(a.port, 4222);
        assert!(!a.is_loopback());
        assert_eq!(Address::parse("nats://:4222"), None);
        assert_eq!(Address::parse("nats://host:port"), None);
    }

    #[test]
    fn greetings() {
        assert_eq!(
            parse_greeting(b"INFO {\"version\":\"2.9.10\",\"jetstream\":true}\r\n"),
            Probe::Nats {
                version: "2.9.10".into(),
                jetstream: true
            }
        );
        assert_eq!(
            parse_greeting(b"INFO {\"version\":\"2.9.10\"}\r\n"),
            Probe::Nats {
                version: "2.9.10".into(),
                jetstream: false
            }
        );
        assert!(matches!(
            parse_greeting(b"SSH-2.0-OpenSSH_9.2\r\n"),
            Probe::NotNats(_)
        ));
        assert!(matches!(
            parse_greeting(b"INFO {oops\r\n"),
            Probe::NotNats(_)
        ));
    }

    #[tokio::test]
    async fn nothing_listening() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let address = Address::parse(&format!("127.0.0.1:{port}")).expect("parses");
        assert_eq!(
            probe(&address, Duration::from_secs(2)).await,
            Probe::Nothing
        );
    }
}
