//! Real `nats-server` processes: the one launcher behind the integration tests, the
//! benchmarks and `workers demo`.
//!
//! [`NatsServer::start`] runs one JetStream-enabled server on `127.0.0.1`, on a random
//! free port, with a fresh store directory in a temporary directory; [`NatsCluster::start`]
//! runs `n` of them clustered over loopback routes. [`ServerOptions`] sets what varies:
//! configuration to add (auth, TLS, accounts, limits), JetStream off, a fixed loopback
//! address, a directory kept across runs (the demo's `.local/nats`), the server's name,
//! the binary. Both return only when the server is ready for JetStream (the monitoring
//! endpoint's `/healthz` answers 200, the client port answers with this server's `INFO`
//! and JetStream on, and in a cluster a JetStream meta leader exists). Tests can then
//! [`kill`](NatsServer::kill) (`kill -9`), [`stop`](NatsServer::stop) (SIGTERM) and
//! [`restart`](NatsServer::restart) servers: a restart keeps the ports, the routes and the
//! store directory, so what was stored survives.
//!
//! Servers are killed when dropped, and a [`Watchdog`] process stops a server whose owner
//! died without dropping it (for example after `std::process::exit`, or a `kill -9`), so
//! no server outlives the process that started it. Each server runs in a process group of
//! its own: a terminal's Ctrl-C reaches the program, which stops its servers when it is
//! done with them.
//!
//! [`probe`] tells what answers at an address (nothing, a NATS server with or without
//! JetStream, something else) without credentials; the demo asks it before it starts a
//! server of its own. The binary is found by [`server_binary`]: `NATS_SERVER_BIN`, then
//! `nats-server` on `PATH`, then `/usr/sbin/nats-server`.
//!
//! Everything here is synchronous and can be called from `#[tokio::test]` bodies:
//! starting, stopping and restarting block the calling thread for a moment (no runtime
//! is created), and async-nats clients catch up afterwards. (Async code that must keep
//! answering meanwhile, like the demo, calls it through `tokio::task::spawn_blocking`.)
//!
//! ```
//! use jetworker::testing::server::NatsServer;
//!
//! let server = NatsServer::start()?;
//! assert!(server.url().starts_with("nats://127.0.0.1:"));
//! // connect with `async_nats::connect(server.url())` ...
//! # Ok::<(), jetworker::testing::server::TestServerError>(())
//! ```
//!
//! # Layout
//! - `binary`: [`server_binary`] and [`server_version`].
//! - `config`: free ports, unique names, the configuration file.
//! - `process`: spawning a server, its [`Watchdog`], signals, its log.
//! - `probe`: `INFO` greetings and the monitoring endpoint: [`probe`] and the readiness
//!   checks.
//! - this file: [`NatsServer`], [`ServerOptions`] and the readiness wait; `cluster`:
//!   [`NatsCluster`]; `error`: [`TestServerError`].

mod binary;
mod cluster;
mod config;
mod error;
mod probe;
mod process;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub use binary::{server_binary, server_version, DEBIAN_SERVER_PATH, NATS_SERVER_BIN_ENV};
pub use cluster::NatsCluster;
pub use error::{TestServerError, TestServerErrorKind};
pub use probe::{probe, Address, Probe};
pub use process::Watchdog;

use binary::binary_version;
use config::{free_ports, render_config, unique_suffix, ClusterSpec, ConfigSpec};
use probe::{greet, http_get, meta_leader, Greeting};
use process::{tail_lines, Launch, ServerProcess};

/// How long [`NatsServer::start`] waits for a server to become ready by default.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How many times a start is retried when a chosen port was taken in the meantime.
const START_ATTEMPTS: usize = 5;

/// How long [`NatsServer::stop`] (and a watchdog) waits after SIGTERM before it kills.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long one readiness check waits for the monitoring endpoint.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one readiness check waits for the client port's greeting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(1);

/// Lines of the server's log quoted in errors.
const LOG_TAIL_LINES: usize = 40;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How to start a [`NatsServer`]. `ServerOptions::default()` is what
/// [`NatsServer::start`] uses: a test's server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Appended verbatim to the generated configuration file (auth, TLS, accounts, limits,
    /// ...). It must not set the listen address, ports, `log_file` or `jetstream`.
    pub extra_config: Option<String>,
    /// Enable JetStream, storing in the server's directory (default `true`).
    pub jetstream: bool,
    /// How long to wait for the server to become ready (default 20 s).
    pub ready_timeout: Duration,
    /// Listen for clients here instead of on a random free port of `127.0.0.1`; it must be
    /// a loopback address (the demo's `nats://127.0.0.1:4222`). The monitoring port stays
    /// a random one.
    pub address: Option<Address>,
    /// Keep the configuration, log, pid file and store in this directory (created if
    /// needed; what an earlier run stored is kept, and nothing is removed on drop) instead
    /// of a fresh temporary directory removed on drop.
    pub dir: Option<PathBuf>,
    /// The server's name (`server_name`, announced in its `INFO`; its watchdog shows as
    /// `NAME-watchdog PID`); default a unique `jw-PID-N`.
    pub name: Option<String>,
    /// The binary to run instead of the one [`server_binary`] finds.
    pub binary: Option<PathBuf>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            extra_config: None,
            jetstream: true,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            address: None,
            dir: None,
            name: None,
            binary: None,
        }
    }
}

impl ServerOptions {
    /// The binary to run: [`ServerOptions::binary`] or [`server_binary`].
    fn binary(&self) -> Result<PathBuf, TestServerError> {
        match &self.binary {
            Some(binary) => Ok(binary.clone()),
            None => server_binary(),
        }
    }
}

/// The directory holding a server's configuration, log, pid file and store.
#[derive(Debug)]
enum ServerDir {
    /// Fresh, removed on drop.
    Temporary(TempDir),
    /// The caller's ([`ServerOptions::dir`]), kept.
    Kept(PathBuf),
}

impl ServerDir {
    fn new(kept: Option<&Path>) -> Result<Self, TestServerError> {
        let Some(dir) = kept else {
            return tempfile::Builder::new()
                .prefix("jetworker-nats-")
                .tempdir()
                .map(Self::Temporary)
                .map_err(|e| TestServerError::io("creating a temporary directory", e));
        };
        // The server runs in its directory: a relative path would be taken from there.
        let dir = std::path::absolute(dir)
            .map_err(|e| TestServerError::io(format!("resolving {}", dir.display()), e))?;
        fs::create_dir_all(&dir)
            .map_err(|e| TestServerError::io(format!("creating {}", dir.display()), e))?;
        Ok(Self::Kept(dir))
    }

    fn path(&self) -> &Path {
        match self {
            Self::Temporary(dir) => dir.path(),
            Self::Kept(dir) => dir,
        }
    }
}

/// One real `nats-server` process on a loopback address, killed (and its temporary
/// directory removed) when dropped.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    spec: ConfigSpec,
    config_path: PathBuf,
    /// Where the server's stdout and stderr go (config errors land here, not in the log).
    out_path: PathBuf,
    ready_timeout: Duration,
    /// The line of the config file where `extra_config` starts (to read parse errors).
    extra_config_line: Option<usize>,
    running: Option<ServerProcess>,
    /// What the server announced when it last became ready.
    version: String,
    /// Declared last: removed after the process is gone.
    dir: ServerDir,
}

/// Why a start attempt failed.
enum StartFailure {
    /// A port was taken between choosing and binding it: retry with new ports.
    PortInUse(TestServerError),
    Fatal(TestServerError),
}

impl StartFailure {
    fn into_error(self) -> TestServerError {
        match self {
            Self::PortInUse(e) | Self::Fatal(e) => e,
        }
    }
}

/// The result of one readiness check.
enum Readiness {
    Ready,
    NotYet(String),
    Exited(ExitStatus),
}

impl NatsServer {
    /// Start a JetStream-enabled server on `127.0.0.1`, a random free port, with a fresh
    /// store directory; returns once it is ready.
    pub fn start() -> Result<Self, TestServerError> {
        Self::start_with(ServerOptions::default())
    }

    /// Start a server with `opts`; returns once it is ready.
    pub fn start_with(opts: ServerOptions) -> Result<Self, TestServerError> {
        if let Some(address) = opts.address.as_ref().filter(|a| !a.is_loopback()) {
            return Err(TestServerError::start(format!(
                "the launcher starts servers on this machine's loopback only, not on {address}"
            )));
        }
        let bin = opts.binary()?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let (address, http_port) = match &opts.address {
                Some(address) => (address.clone(), free_ports(1)?[0]),
                None => {
                    let ports = free_ports(2)?;
                    (Address::loopback(ports[0]), ports[1])
                }
            };
            let name = opts
                .name
                .clone()
                .unwrap_or_else(|| format!("jw-{}", unique_suffix()));
            let mut server = Self::prepare(&bin, name, address, http_port, None, &opts)?;
            let deadline = Instant::now() + server.ready_timeout;
            let started = server
                .spawn()
                .and_then(|()| wait_ready(std::slice::from_mut(&mut server), deadline));
            match started {
                Ok(()) => return Ok(server),
                Err(StartFailure::PortInUse(e)) => last = Some(e),
                Err(StartFailure::Fatal(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| TestServerError::start("no start attempt made".to_owned())))
    }

    /// Create the directory and write the config; does not start the process.
    fn prepare(
        bin: &Path,
        server_name: String,
        address: Address,
        http_port: u16,
        cluster: Option<ClusterSpec>,
        opts: &ServerOptions,
    ) -> Result<Self, TestServerError> {
        let dir = ServerDir::new(opts.dir.as_deref())?;
        let path = dir.path();
        let spec = ConfigSpec {
            server_name,
            address,
            http_port,
            log_file: path.join("nats-server.log"),
            pid_file: path.join("nats-server.pid"),
            store_dir: opts.jetstream.then(|| path.to_path_buf()),
            cluster,
            extra_config: opts.extra_config.clone(),
        };
        let config_path = path.join("nats-server.conf");
        let config = render_config(&spec);
        let extra_config_line = spec.extra_config.as_ref().and_then(|_| {
            config
                .lines()
                .position(|line| line == config::EXTRA_CONFIG_MARKER)
                .map(|index| index + 2)
        });
        fs::write(&config_path, config)
            .map_err(|e| TestServerError::io(format!("writing {}", config_path.display()), e))?;
        Ok(Self {
            extra_config_line,
            bin: bin.to_path_buf(),
            spec,
            config_path,
            out_path: path.join("nats-server.out"),
            ready_timeout: opts.ready_timeout,
            running: None,
            version: String::new(),
            dir,
        })
    }

    /// The client URL, `nats://127.0.0.1:PORT` (or the [`ServerOptions::address`]).
    pub fn url(&self) -> String {
        self.spec.address.url()
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.spec.address.port
    }

    /// Where the server listens for clients.
    pub fn address(&self) -> &Address {
        &self.spec.address
    }

    /// The monitoring endpoint's base URL, `http://127.0.0.1:PORT`.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.spec.http_port)
    }

    /// The server's `server_name` (unique per server unless [`ServerOptions::name`] set
    /// one).
    pub fn name(&self) -> &str {
        &self.spec.server_name
    }

    /// The version the server announced when it last became ready (`2.9.10`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The JetStream store directory (kept across restarts): the server's
    /// [`dir`](Self::dir), in which JetStream keeps its data below `jetstream/`.
    pub fn store_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The generated configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The server's log file (appended to across restarts).
    pub fn log_path(&self) -> &Path {
        &self.spec.log_file
    }

    /// The directory holding config, log, pid file and store: a temporary one, removed on
    /// drop, or the [`ServerOptions::dir`], kept.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, while a process is running (or exited and not yet reaped).
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(ServerProcess::pid)
    }

    /// Whether the server process is still alive (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        let exited = match &mut self.running {
            None => return false,
            Some(process) => !matches!(process.exited(), Ok(None)),
        };
        if exited {
            self.kill();
        }
        !exited
    }

    /// Kill the server with SIGKILL (`kill -9`) and reap it. Nothing is flushed: what the
    /// server had not written is lost, like in a crash. No-op when not running.
    pub fn kill(&mut self) {
        if let Some(process) = self.running.take() {
            process.kill();
            self.remove_pid_file();
        }
    }

    /// Stop the server gracefully: SIGTERM, then wait up to 10 s for it to exit (killing
    /// it after that). Returns how it exited; `None` when it was not running.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let process = self.running.take()?;
        let status = process.stop(STOP_GRACE);
        self.remove_pid_file();
        status
    }

    /// Kill the server if it runs, then start it again on the same ports (and routes) with
    /// the same store directory; returns once it is ready (for a cluster member: once it
    /// is back in touch with the meta leader, so a quorum of the other members must be
    /// running: after a full outage use [`NatsCluster::restart_all`]). Retried for a few
    /// seconds if a port is briefly taken by another process.
    pub fn restart(&mut self) -> Result<(), TestServerError> {
        self.kill();
        let deadline = Instant::now() + self.ready_timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self
                .spawn()
                .and_then(|()| wait_ready(std::slice::from_mut(self), deadline));
            match result {
                Ok(()) => return Ok(()),
                Err(StartFailure::PortInUse(e)) if attempt < START_ATTEMPTS => {
                    self.kill();
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    thread::sleep(Duration::from_millis(200 * attempt as u64));
                }
                Err(failure) => {
                    self.kill();
                    return Err(failure.into_error());
                }
            }
        }
    }

    /// Start the process (and its watchdog); does not wait for readiness.
    fn spawn(&mut self) -> Result<(), StartFailure> {
        self.kill();
        let watchdog_label = format!("{}-watchdog", self.spec.server_name);
        let process = ServerProcess::spawn(&Launch {
            bin: &self.bin,
            config: &self.config_path,
            dir: self.dir.path(),
            log_file: &self.spec.log_file,
            out_path: &self.out_path,
            watchdog_label: &watchdog_label,
            stop_grace: STOP_GRACE,
        })
        .map_err(StartFailure::Fatal)?;
        self.running = Some(process);
        Ok(())
    }

    /// The server leaves its pid file behind when killed; a stale one would only mislead.
    fn remove_pid_file(&self) {
        let _ = fs::remove_file(&self.spec.pid_file);
    }

    /// One readiness check: process alive, `/healthz` 200, client port answers with our
    /// INFO (JetStream on, when asked for), and in a cluster a meta leader is known.
    fn readiness(&mut self) -> Readiness {
        let Some(process) = &mut self.running else {
            return Readiness::NotYet("not started".to_owned());
        };
        match process.exited() {
            Ok(Some(status)) => return Readiness::Exited(status),
            Ok(None) => {}
            Err(e) => return Readiness::NotYet(format!("cannot check the process: {e}")),
        }
        match http_get(self.spec.http_port, "/healthz", CHECK_TIMEOUT) {
            Ok((200, _)) => {}
            Ok((status, body)) => {
                return Readiness::NotYet(format!("/healthz answered {status}: {}", body.trim()))
            }
            Err(e) => return Readiness::NotYet(format!("/healthz: {e}")),
        }
        let port = self.spec.address.port;
        let announced = match greet(&self.spec.address, GREETING_TIMEOUT) {
            Err(e) => return Readiness::NotYet(format!("client port {port}: {e}")),
            Ok(Greeting::Info(info)) if info.name != self.spec.server_name => {
                return Readiness::NotYet(format!(
                    "client port {port} is answered by server {:?}, not {:?}",
                    info.name, self.spec.server_name
                ))
            }
            Ok(Greeting::Info(info)) if self.spec.store_dir.is_some() && !info.jetstream => {
                return Readiness::NotYet(format!("client port {port} answers without JetStream"))
            }
            Ok(Greeting::Info(info)) => Some(info.version),
            // A server that waits for a TLS handshake first sends nothing to check.
            Ok(Greeting::Other(_) | Greeting::Silent) => None,
        };
        if self.spec.cluster.is_some() {
            match meta_leader(self.spec.http_port, CHECK_TIMEOUT) {
                Ok(Some(_)) => {}
                Ok(None) => return Readiness::NotYet("no JetStream meta leader yet".to_owned()),
                Err(e) => return Readiness::NotYet(format!("/jsz: {e}")),
            }
        }
        match announced {
            Some(version) => self.version = version,
            None if self.version.is_empty() => {
                self.version = binary_version(&self.bin).unwrap_or_default();
            }
            None => {}
        }
        Readiness::Ready
    }

    fn exited_failure(&mut self, status: ExitStatus) -> StartFailure {
        let tail = self.log_tail();
        self.kill();
        let error = TestServerError::start(format!(
            "nats-server {} ({}) exited during startup ({status}){}{tail}",
            self.spec.server_name,
            self.bin.display(),
            self.extra_config_note(),
        ));
        if tail.contains("address already in use") {
            StartFailure::PortInUse(error)
        } else {
            StartFailure::Fatal(error)
        }
    }

    fn timeout_error(&mut self, reason: &str) -> TestServerError {
        let tail = self.log_tail();
        self.kill();
        TestServerError::start(format!(
            "nats-server {} ({}) was not ready after {:?}: {reason}{}{tail}",
            self.spec.server_name,
            self.bin.display(),
            self.ready_timeout,
            self.extra_config_note(),
        ))
    }

    /// Where `extra_config` sits in the generated file, to map parse errors' line numbers.
    fn extra_config_note(&self) -> String {
        self.extra_config_line
            .map(|line| format!(" (extra_config starts at line {line} of the generated config)"))
            .unwrap_or_default()
    }

    /// The last lines of the current run's log and stdout/stderr, for error messages.
    fn log_tail(&self) -> String {
        let (log_offset, out_offset) = self
            .running
            .as_ref()
            .map(|r| (r.log_offset, r.out_offset))
            .unwrap_or((0, 0));
        let mut text = String::new();
        for (label, path, offset) in [
            ("log", &self.spec.log_file, log_offset),
            ("stdout/stderr", &self.out_path, out_offset),
        ] {
            let tail = tail_lines(path, offset, LOG_TAIL_LINES);
            if !tail.trim().is_empty() {
                let _ = write!(
                    text,
                    "\n--- {label} ({}) ---\n{}",
                    path.display(),
                    tail.trim_end()
                );
            }
        }
        if text.is_empty() {
            text.push_str("\n(the server wrote nothing to its log or stderr)");
        }
        text
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The one readiness wait: polls `servers` until every one is ready, one exits, or
/// `deadline` passes; on failure every one of them is killed.
fn wait_ready(servers: &mut [NatsServer], deadline: Instant) -> Result<(), StartFailure> {
    let started = Instant::now();
    let mut ready = vec![false; servers.len()];
    let failure = 'poll: loop {
        for (server, ready) in servers.iter_mut().zip(ready.iter_mut()) {
            if *ready {
                continue;
            }
            match server.readiness() {
                Readiness::Ready => *ready = true,
                Readiness::Exited(status) => break 'poll server.exited_failure(status),
                Readiness::NotYet(reason) if Instant::now() >= deadline => {
                    break 'poll StartFailure::Fatal(server.timeout_error(&reason))
                }
                Readiness::NotYet(_) => {}
            }
        }
        if ready.iter().all(|r| *r) {
            return Ok(());
        }
        thread::sleep(poll_interval(started));
    };
    for server in servers {
        server.kill();
    }
    Err(failure)
}

/// Poll often while a start is young (most servers are ready within milliseconds), then
/// less often (each failed `/healthz` makes the server log a warning).
fn poll_interval(started: Instant) -> Duration {
    if started.elapsed() < Duration::from_secs(1) {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(100)
    }
}
