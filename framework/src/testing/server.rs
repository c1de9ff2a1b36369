//! Real `nats-server` processes for integration tests.
//!
//! [`NatsServer::start`] runs one JetStream-enabled server on `127.0.0.1`, on a random
//! free port, with a fresh store directory in a temporary directory; [`NatsCluster::start`]
//! runs `n` of them clustered over loopback routes. Both return only when the server is
//! ready for JetStream (the monitoring endpoint's `/healthz` answers 200, the client port
//! answers with this server's `INFO`, and in a cluster a JetStream meta leader exists).
//! Tests can then [`kill`](NatsServer::kill) (`kill -9`), [`stop`](NatsServer::stop)
//! (SIGTERM) and [`restart`](NatsServer::restart) servers: a restart keeps the ports, the
//! routes and the store directory, so what was stored survives.
//!
//! Servers are killed when dropped, and a tiny watchdog process kills a server whose test
//! process died without dropping it (for example after `std::process::exit`), so no server
//! outlives its test binary.
//!
//! The binary is found by [`server_binary`]: `NATS_SERVER_BIN`, then `nats-server` on
//! `PATH`, then `/usr/sbin/nats-server`. Everything here is synchronous and can be called
//! from `#[tokio::test]` bodies: starting, stopping and restarting block the calling thread
//! for a moment (no runtime is created), and async-nats clients catch up afterwards.
//!
//! ```
//! use jetworker::testing::server::NatsServer;
//!
//! let server = NatsServer::start()?;
//! assert!(server.url().starts_with("nats://127.0.0.1:"));
//! // connect with `async_nats::connect(server.url())` ...
//! # Ok::<(), jetworker::testing::server::TestServerError>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Environment variable naming the `nats-server` binary to use.
pub const NATS_SERVER_BIN_ENV: &str = "NATS_SERVER_BIN";

/// Where Debian's `nats-server` package installs the binary.
pub const DEBIAN_SERVER_PATH: &str = "/usr/sbin/nats-server";

/// How long [`NatsServer::start`] waits for a server to become ready by default.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How many times a start is retried when a chosen port was taken in the meantime.
const START_ATTEMPTS: usize = 5;

/// How long [`NatsServer::stop`] waits after SIGTERM before it kills.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Lines of the server's log quoted in errors.
const LOG_TAIL_LINES: usize = 40;

const INSTALL_HINT: &str = "install it with `sudo apt-get install nats-server` (Debian/Ubuntu) \
     or run scripts/install-deps, or set NATS_SERVER_BIN to a nats-server binary \
     (scripts/install-nats-current puts an upstream v2.14.0 in .tools/)";

/// What can go wrong while finding, starting or restarting a test server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestServerError {
    /// No usable `nats-server` binary; the message says how to install one.
    #[error("{0}")]
    BinaryNotFound(String),
    /// `nats-server --version` could not be run or understood.
    #[error("cannot determine the nats-server version: {0}")]
    Version(String),
    /// An I/O operation of the helper itself failed (temp dir, config file, spawn).
    #[error("{context}: {source}")]
    Io {
        /// What the helper was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The server exited, or did not become ready in time; the message quotes its log.
    #[error("{0}")]
    Start(String),
}

impl TestServerError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Finding the binary and its version
// ---------------------------------------------------------------------------------------

/// The `nats-server` binary the tests use.
///
/// In order: the `NATS_SERVER_BIN` environment variable (a path, or a bare name looked up
/// on `PATH`; when set it must be valid, there is no fallback), then `nats-server` on
/// `PATH`, then `/usr/sbin/nats-server`. A relative `NATS_SERVER_BIN` path is looked up
/// from the current directory and then its parents, so a path relative to the workspace
/// root works for the tests of every crate. When none is found the error says how to install
/// one: `sudo apt-get install nats-server`, `scripts/install-deps`, or `NATS_SERVER_BIN`.
pub fn server_binary() -> Result<PathBuf, TestServerError> {
    resolve_server_binary(
        std::env::var_os(NATS_SERVER_BIN_ENV).as_deref(),
        std::env::var_os("PATH").as_deref(),
        Path::new(DEBIAN_SERVER_PATH),
    )
}

/// The resolution rules of [`server_binary`], with the environment passed in (testable).
fn resolve_server_binary(
    env_bin: Option<&OsStr>,
    path_var: Option<&OsStr>,
    fallback: &Path,
) -> Result<PathBuf, TestServerError> {
    if let Some(value) = env_bin.filter(|v| !v.is_empty()) {
        let given = Path::new(value);
        let candidate = if given.components().count() == 1 && !given.is_absolute() {
            // A bare name: look it up on PATH like a shell would.
            find_on_path(value, path_var)
        } else if given.is_relative() {
            // cargo runs each crate's tests in that crate's directory: a path relative to
            // the workspace root is found in an ancestor of the current directory.
            std::env::current_dir().ok().map(|cwd| {
                cwd.ancestors()
                    .map(|dir| dir.join(given))
                    .find(|candidate| is_executable_file(candidate))
                    .unwrap_or_else(|| cwd.join(given))
            })
        } else {
            Some(given.to_path_buf())
        };
        return match candidate {
            Some(path) if is_executable_file(&path) => Ok(path),
            Some(path) => Err(TestServerError::BinaryNotFound(format!(
                "{NATS_SERVER_BIN_ENV}={} points to {}, which {}; fix or unset \
                 {NATS_SERVER_BIN_ENV}, or {INSTALL_HINT}",
                given.display(),
                path.display(),
                if path.exists() {
                    "is not an executable file"
                } else {
                    "does not exist"
                }
            ))),
            None => Err(TestServerError::BinaryNotFound(format!(
                "{NATS_SERVER_BIN_ENV}={} was not found on PATH; fix or unset \
                 {NATS_SERVER_BIN_ENV}, or {INSTALL_HINT}",
                given.display()
            ))),
        };
    }
    if let Some(path) = find_on_path(OsStr::new("nats-server"), path_var) {
        return Ok(path);
    }
    if is_executable_file(fallback) {
        return Ok(fallback.to_path_buf());
    }
    Err(TestServerError::BinaryNotFound(format!(
        "nats-server not found ({NATS_SERVER_BIN_ENV} is not set, `nats-server` is not on \
         PATH, and {} does not exist): {INSTALL_HINT}",
        fallback.display()
    )))
}

fn find_on_path(name: &OsStr, path_var: Option<&OsStr>) -> Option<PathBuf> {
    let path_var = path_var?;
    std::env::split_paths(path_var)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The version of the [`server_binary`], without the `v`: `nats-server: v2.9.10` gives
/// `"2.9.10"`. Computed once per binary path and cached.
pub fn server_version() -> Result<String, TestServerError> {
    let bin = server_binary()?;
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(version) = lock(cache).get(&bin) {
        return Ok(version.clone());
    }
    let output = Command::new(&bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            TestServerError::Version(format!("running {} --version: {e}", bin.display()))
        })?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let version = parse_version_output(&text).ok_or_else(|| {
        TestServerError::Version(format!(
            "unexpected output of {} --version: {:?}",
            bin.display(),
            text.trim()
        ))
    })?;
    lock(cache).insert(bin, version.clone());
    Ok(version)
}

/// `"nats-server: v2.9.10"` -> `"2.9.10"`.
fn parse_version_output(text: &str) -> Option<String> {
    text.split_whitespace()
        .filter_map(|word| word.strip_prefix('v'))
        .find(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_owned)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------
// Ports, names, configuration
// ---------------------------------------------------------------------------------------

/// Ports this process already handed out: never hand one out twice, so a stopped server's
/// port stays free for its restart as far as this process is concerned.
fn handed_out_ports() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// `count` distinct free loopback ports (bound to `127.0.0.1:0` together, then released).
fn free_ports(count: usize) -> Result<Vec<u16>, TestServerError> {
    let mut listeners = Vec::with_capacity(count);
    let mut ports = Vec::with_capacity(count);
    let mut handed_out = lock(handed_out_ports());
    let mut tries = 0;
    while ports.len() < count {
        tries += 1;
        if tries > count * 50 {
            return Err(TestServerError::Start(
                "could not find free loopback ports".to_owned(),
            ));
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| TestServerError::io("binding 127.0.0.1:0 to find a free port", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| TestServerError::io("reading a bound port", e))?
            .port();
        // Keep the listener open until all ports are chosen, so they are distinct.
        let fresh = handed_out.insert(port);
        listeners.push(listener);
        if fresh {
            ports.push(port);
        }
    }
    Ok(ports)
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The cluster part of one server's configuration.
#[derive(Debug, Clone)]
struct ClusterSpec {
    name: String,
    port: u16,
    /// Route ports of the other members.
    routes: Vec<u16>,
}

/// Everything that goes into one server's configuration file.
#[derive(Debug, Clone)]
struct ConfigSpec {
    server_name: String,
    port: u16,
    http_port: u16,
    log_file: PathBuf,
    store_dir: Option<PathBuf>,
    cluster: Option<ClusterSpec>,
    extra_config: Option<String>,
}

/// The comment line after which `extra_config` is appended.
const EXTRA_CONFIG_MARKER: &str = "# extra_config (from ServerOptions)";

/// A double-quoted string in NATS configuration syntax.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The configuration file for `spec`; the syntax is accepted by nats-server 2.9 to 2.14.
fn render_config(spec: &ConfigSpec) -> String {
    let mut out = String::new();
    // `write!` into a String cannot fail.
    let _ = writeln!(
        out,
        "# Generated by jetworker::testing::server; loopback only.\n\
         server_name: {name}\n\
         host: \"127.0.0.1\"\n\
         port: {port}\n\
         http: \"127.0.0.1:{http}\"\n\
         log_file: {log}\n\
         logtime: true",
        name = quote(&spec.server_name),
        port = spec.port,
        http = spec.http_port,
        log = quote(&spec.log_file.to_string_lossy()),
    );
    if let Some(store_dir) = &spec.store_dir {
        let _ = writeln!(
            out,
            "jetstream {{\n  store_dir: {}\n}}",
            quote(&store_dir.to_string_lossy())
        );
    }
    if let Some(cluster) = &spec.cluster {
        let _ = writeln!(
            out,
            "cluster {{\n  name: {}\n  listen: \"127.0.0.1:{}\"",
            quote(&cluster.name),
            cluster.port
        );
        if !cluster.routes.is_empty() {
            let _ = writeln!(out, "  routes: [");
            for route in &cluster.routes {
                let _ = writeln!(out, "    \"nats-route://127.0.0.1:{route}\"");
            }
            let _ = writeln!(out, "  ]");
        }
        let _ = writeln!(out, "}}");
    }
    if let Some(extra) = &spec.extra_config {
        let _ = writeln!(out, "\n{EXTRA_CONFIG_MARKER}\n{extra}");
    }
    out
}

// ---------------------------------------------------------------------------------------
// One server
// ---------------------------------------------------------------------------------------

/// How to start a [`NatsServer`]. `ServerOptions::default()` is what
/// [`NatsServer::start`] uses.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Appended verbatim to the generated configuration file (auth, TLS, accounts, limits,
    /// ...). It must not set the listen address, ports, `log_file` or `jetstream`.
    pub extra_config: Option<String>,
    /// Enable JetStream, with a fresh store directory (default `true`).
    pub jetstream: bool,
    /// How long to wait for the server to become ready (default 20 s).
    pub ready_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            extra_config: None,
            jetstream: true,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

/// A running process and its watchdog.
#[derive(Debug)]
struct Running {
    child: Child,
    /// `sh` reading its stdin (a pipe we hold): when this process dies the pipe closes
    /// and the watchdog kills the server. Killed first on a normal kill.
    watchdog: Option<Child>,
    /// Length of the log files when this run started: error messages quote only this run.
    log_offset: u64,
    out_offset: u64,
}

/// One real `nats-server` process on `127.0.0.1`, killed (and its temporary directory
/// removed) when dropped.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    spec: ConfigSpec,
    config_path: PathBuf,
    /// Where the server's stdout and stderr go (config errors land here, not in the log).
    out_path: PathBuf,
    store_dir: PathBuf,
    ready_timeout: Duration,
    /// The line of the config file where `extra_config` starts (to read parse errors).
    extra_config_line: Option<usize>,
    running: Option<Running>,
    /// Declared last: removed after the process is gone.
    dir: TempDir,
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

/// The result of one readiness probe.
enum Probe {
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
        let bin = server_binary()?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let ports = free_ports(2)?;
            let mut server = Self::prepare(
                &bin,
                format!("jw-{}", unique_suffix()),
                ports[0],
                ports[1],
                None,
                &opts,
            )?;
            let deadline = Instant::now() + server.ready_timeout;
            match server.spawn().and_then(|()| server.wait_ready(deadline)) {
                Ok(()) => return Ok(server),
                Err(StartFailure::PortInUse(e)) => last = Some(e),
                Err(StartFailure::Fatal(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| TestServerError::Start("no start attempt made".to_owned())))
    }

    /// Create the temp dir and write the config; does not start the process.
    fn prepare(
        bin: &Path,
        server_name: String,
        port: u16,
        http_port: u16,
        cluster: Option<ClusterSpec>,
        opts: &ServerOptions,
    ) -> Result<Self, TestServerError> {
        let dir = tempfile::Builder::new()
            .prefix("jetworker-nats-")
            .tempdir()
            .map_err(|e| TestServerError::io("creating a temporary directory", e))?;
        let store_dir = dir.path().join("store");
        if opts.jetstream {
            fs::create_dir_all(&store_dir)
                .map_err(|e| TestServerError::io(format!("creating {}", store_dir.display()), e))?;
        }
        let spec = ConfigSpec {
            server_name,
            port,
            http_port,
            log_file: dir.path().join("nats-server.log"),
            store_dir: opts.jetstream.then(|| store_dir.clone()),
            cluster,
            extra_config: opts.extra_config.clone(),
        };
        let config_path = dir.path().join("nats-server.conf");
        let config = render_config(&spec);
        let extra_config_line = spec.extra_config.as_ref().and_then(|_| {
            config
                .lines()
                .position(|line| line == EXTRA_CONFIG_MARKER)
                .map(|index| index + 2)
        });
        fs::write(&config_path, config)
            .map_err(|e| TestServerError::io(format!("writing {}", config_path.display()), e))?;
        Ok(Self {
            extra_config_line,
            bin: bin.to_path_buf(),
            spec,
            config_path,
            out_path: dir.path().join("nats-server.out"),
            store_dir,
            ready_timeout: opts.ready_timeout,
            running: None,
            dir,
        })
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.spec.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.spec.port
    }

    /// The monitoring endpoint's base URL, `http://127.0.0.1:PORT`.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.spec.http_port)
    }

    /// The server's `server_name` (unique per server).
    pub fn name(&self) -> &str {
        &self.spec.server_name
    }

    /// The JetStream store directory (kept across restarts).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The generated configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The server's log file (appended to across restarts).
    pub fn log_path(&self) -> &Path {
        &self.spec.log_file
    }

    /// The temporary directory holding config, log and store (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, while a process is running (or exited and not yet reaped).
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.child.id())
    }

    /// Whether the server process is still alive (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        let exited = match &mut self.running {
            None => return false,
            Some(running) => !matches!(running.child.try_wait(), Ok(None)),
        };
        if exited {
            self.kill();
        }
        !exited
    }

    /// Kill the server with SIGKILL (`kill -9`) and reap it. Nothing is flushed: what the
    /// server had not written is lost, like in a crash. No-op when not running.
    pub fn kill(&mut self) {
        if let Some(mut running) = self.running.take() {
            if let Some(mut watchdog) = running.watchdog.take() {
                let _ = watchdog.kill();
                let _ = watchdog.wait();
            }
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }

    /// Stop the server gracefully: SIGTERM, then wait up to 10 s for it to exit (killing
    /// it after that). No-op when not running.
    pub fn stop(&mut self) {
        let Some(running) = &mut self.running else {
            return;
        };
        if matches!(running.child.try_wait(), Ok(None)) {
            let pid = running.child.id().to_string();
            let signalled = Command::new("sh")
                .args(["-c", "kill -TERM \"$1\"", "jetworker-stop", &pid])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if signalled {
                let deadline = Instant::now() + STOP_GRACE;
                while Instant::now() < deadline && matches!(running.child.try_wait(), Ok(None)) {
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
        self.kill();
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
            let result = self.spawn().and_then(|()| self.wait_ready(deadline));
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
        let fatal = StartFailure::Fatal;
        let log_offset = file_len(&self.spec.log_file);
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.out_path)
            .map_err(|e| {
                fatal(TestServerError::io(
                    format!("opening {}", self.out_path.display()),
                    e,
                ))
            })?;
        let out_offset = out.metadata().map(|m| m.len()).unwrap_or(0);
        let err = out
            .try_clone()
            .map_err(|e| fatal(TestServerError::io("duplicating a file handle", e)))?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| {
                fatal(TestServerError::io(
                    format!("starting {}", self.bin.display()),
                    e,
                ))
            })?;
        let watchdog = spawn_watchdog(child.id());
        self.running = Some(Running {
            child,
            watchdog,
            log_offset,
            out_offset,
        });
        Ok(())
    }

    /// Poll until ready, the process exits, or `deadline`; on failure the process is killed.
    fn wait_ready(&mut self, deadline: Instant) -> Result<(), StartFailure> {
        let started = Instant::now();
        loop {
            match self.probe() {
                Probe::Ready => return Ok(()),
                Probe::Exited(status) => return Err(self.exited_failure(status)),
                Probe::NotYet(reason) => {
                    if Instant::now() >= deadline {
                        return Err(StartFailure::Fatal(self.timeout_error(&reason)));
                    }
                }
            }
            thread::sleep(poll_interval(started));
        }
    }

    /// One readiness check: process alive, `/healthz` 200, client port answers with our
    /// INFO, and in a cluster a meta leader is known.
    fn probe(&mut self) -> Probe {
        let Some(running) = &mut self.running else {
            return Probe::NotYet("not started".to_owned());
        };
        match running.child.try_wait() {
            Ok(Some(status)) => return Probe::Exited(status),
            Ok(None) => {}
            Err(e) => return Probe::NotYet(format!("cannot check the process: {e}")),
        }
        let probe_timeout = Duration::from_secs(2);
        match http_get(self.spec.http_port, "/healthz", probe_timeout) {
            Ok((200, _)) => {}
            Ok((status, body)) => {
                return Probe::NotYet(format!("/healthz answered {status}: {}", body.trim()))
            }
            Err(e) => return Probe::NotYet(format!("/healthz: {e}")),
        }
        if let Err(reason) = check_client_port(self.spec.port, &self.spec.server_name) {
            return Probe::NotYet(reason);
        }
        if self.spec.cluster.is_some() {
            match meta_leader(self.spec.http_port, probe_timeout) {
                Ok(Some(_)) => {}
                Ok(None) => return Probe::NotYet("no JetStream meta leader yet".to_owned()),
                Err(reason) => return Probe::NotYet(reason),
            }
        }
        Probe::Ready
    }

    fn exited_failure(&mut self, status: ExitStatus) -> StartFailure {
        let tail = self.log_tail();
        self.kill();
        let error = TestServerError::Start(format!(
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
        TestServerError::Start(format!(
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

/// Poll often while a start is young (most servers are ready within milliseconds), then
/// less often (each failed `/healthz` makes the server log a warning).
fn poll_interval(started: Instant) -> Duration {
    if started.elapsed() < Duration::from_secs(1) {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(100)
    }
}

/// A watchdog that SIGKILLs `pid` when our end of its stdin pipe closes (we died).
fn spawn_watchdog(pid: u32) -> Option<Child> {
    Command::new("sh")
        .args([
            "-c",
            "read _ignored; kill -9 \"$1\" 2>/dev/null",
            "jetworker-nats-watchdog",
            &pid.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The last `lines` lines of `path` from byte `offset` on (empty when unreadable).
fn tail_lines(path: &Path, offset: u64, lines: usize) -> String {
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

/// A minimal HTTP/1.0 GET against `127.0.0.1:port`: (status, body).
fn http_get(port: u16, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "not an HTTP response: {:?}",
                    head.lines().next().unwrap_or("")
                ),
            )
        })?;
    Ok((status, body.to_owned()))
}

/// The client port accepts connections and, if it greets with INFO, it is this server's.
fn check_client_port(port: u16, server_name: &str) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("client port {port}: {e}"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut greeting = Vec::new();
    let mut buf = [0u8; 4096];
    // Read the INFO line; a server that waits for a TLS handshake first sends nothing.
    while !greeting.contains(&b'\n') && greeting.len() < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => greeting.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&greeting);
    let Some(info) = text.lines().next().and_then(|l| l.strip_prefix("INFO ")) else {
        return Ok(());
    };
    match serde_json::from_str::<serde_json::Value>(info) {
        Ok(info) => {
            let name = info
                .get("server_name")
                .and_then(|n| n.as_str())
                .unwrap_or("");
            if name == server_name {
                Ok(())
            } else {
                Err(format!(
                    "client port {port} is answered by server {name:?}, not {server_name:?}"
                ))
            }
        }
        Err(_) => Ok(()),
    }
}

/// The JetStream meta leader's name as seen by the server at `http_port`.
fn meta_leader(http_port: u16, timeout: Duration) -> Result<Option<String>, String> {
    let (status, body) = http_get(http_port, "/jsz", timeout).map_err(|e| format!("/jsz: {e}"))?;
    if status != 200 {
        return Err(format!("/jsz answered {status}"));
    }
    let jsz: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("/jsz is not JSON: {e}"))?;
    Ok(jsz
        .pointer("/meta_cluster/leader")
        .and_then(|l| l.as_str())
        .filter(|l| !l.is_empty())
        .map(str::to_owned))
}

// ---------------------------------------------------------------------------------------
// A cluster
// ---------------------------------------------------------------------------------------

/// `n` JetStream servers clustered over loopback routes, each with its own store
/// directory. Dropping the cluster kills every member.
#[derive(Debug)]
pub struct NatsCluster {
    servers: Vec<NatsServer>,
    name: String,
}

impl NatsCluster {
    /// Start `n` clustered JetStream servers (3 for R3 streams); returns once every
    /// member is ready and a JetStream meta leader is elected.
    pub fn start(n: usize) -> Result<Self, TestServerError> {
        Self::start_with(n, ServerOptions::default())
    }

    /// Like [`NatsCluster::start`], with `opts` applied to every member (`jetstream`
    /// should stay on: clustered JetStream is the point).
    pub fn start_with(n: usize, opts: ServerOptions) -> Result<Self, TestServerError> {
        if n == 0 {
            return Err(TestServerError::Start(
                "a cluster needs at least one server".to_owned(),
            ));
        }
        let bin = server_binary()?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&bin, n, &opts) {
                Ok(cluster) => return Ok(cluster),
                Err(StartFailure::PortInUse(e)) => last = Some(e),
                Err(StartFailure::Fatal(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| TestServerError::Start("no start attempt made".to_owned())))
    }

    fn try_start(bin: &Path, n: usize, opts: &ServerOptions) -> Result<Self, StartFailure> {
        let ports = free_ports(3 * n).map_err(StartFailure::Fatal)?;
        let suffix = unique_suffix();
        let name = format!("jwc-{suffix}");
        let route_ports: Vec<u16> = (0..n).map(|i| ports[3 * i + 2]).collect();
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let cluster = ClusterSpec {
                name: name.clone(),
                port: route_ports[i],
                routes: route_ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| *p)
                    .collect(),
            };
            let server = NatsServer::prepare(
                bin,
                format!("jw-{suffix}-n{i}"),
                ports[3 * i],
                ports[3 * i + 1],
                Some(cluster),
                opts,
            )
            .map_err(StartFailure::Fatal)?;
            servers.push(server);
        }
        let mut cluster = Self { servers, name };
        cluster.spawn_all_and_wait(opts.ready_timeout)?;
        Ok(cluster)
    }

    /// Spawn every member that is not running, then wait until all are ready.
    fn spawn_all_and_wait(&mut self, timeout: Duration) -> Result<(), StartFailure> {
        for server in &mut self.servers {
            if !server.is_running() {
                server.spawn()?;
            }
        }
        let started = Instant::now();
        let deadline = started + timeout;
        let mut ready = vec![false; self.servers.len()];
        loop {
            for (i, server) in self.servers.iter_mut().enumerate() {
                if ready[i] {
                    continue;
                }
                match server.probe() {
                    Probe::Ready => ready[i] = true,
                    Probe::Exited(status) => {
                        let failure = server.exited_failure(status);
                        self.kill_all();
                        return Err(failure);
                    }
                    Probe::NotYet(reason) => {
                        if Instant::now() >= deadline {
                            let error = server.timeout_error(&reason);
                            self.kill_all();
                            return Err(StartFailure::Fatal(error));
                        }
                    }
                }
            }
            if ready.iter().all(|r| *r) {
                return Ok(());
            }
            thread::sleep(poll_interval(started));
        }
    }

    /// The client URLs of all members, in order.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// Member `i`, to kill, stop or restart it (a restart rejoins the cluster on the same
    /// ports and routes). Panics if `i >= len()`, like slice indexing.
    pub fn server(&mut self, i: usize) -> &mut NatsServer {
        &mut self.servers[i]
    }

    /// All members.
    pub fn servers(&self) -> &[NatsServer] {
        &self.servers
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the cluster has no members (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The cluster's name (`cluster.name` in every member's config).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current JetStream meta leader's server name, as seen by the first running
    /// member that knows one.
    pub fn meta_leader(&mut self) -> Option<String> {
        let timeout = Duration::from_secs(2);
        self.servers
            .iter_mut()
            .filter_map(|s| {
                if s.is_running() {
                    meta_leader(s.spec.http_port, timeout).ok().flatten()
                } else {
                    None
                }
            })
            .next()
    }

    /// Kill every member (`kill -9`).
    pub fn kill_all(&mut self) {
        for server in &mut self.servers {
            server.kill();
        }
    }

    /// Start every member that is not running (all at once, so a quorum can form again
    /// after a full outage) and wait until all are ready.
    pub fn restart_all(&mut self) -> Result<(), TestServerError> {
        let timeout = self
            .servers
            .first()
            .map(|s| s.ready_timeout)
            .unwrap_or(DEFAULT_READY_TIMEOUT);
        self.spawn_all_and_wait(timeout)
            .map_err(StartFailure::into_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_output() {
        assert_eq!(
            parse_version_output("nats-server: v2.9.10\n").as_deref(),
            Some("2.9.10")
        );
        assert_eq!(
            parse_version_output("nats-server: v2.14.0").as_deref(),
            Some("2.14.0")
        );
        assert_eq!(parse_version_output("nats-server: version unknown"), None);
    }

    #[test]
    fn env_bin_pointing_nowhere_is_a_clear_error() {
        let Err(error) = resolve_server_binary(
            Some(OsStr::new("/nonexistent/nats-server")),
            Some(OsStr::new("/usr/bin:/bin")),
            Path::new("/nonexistent/fallback"),
        ) else {
            panic!("a missing NATS_SERVER_BIN must be an error");
        };
        let text = error.to_string();
        assert!(
            text.contains("NATS_SERVER_BIN=/nonexistent/nats-server"),
            "{text}"
        );
        assert!(text.contains("does not exist"), "{text}");
        assert!(text.contains("apt-get install nats-server"), "{text}");
    }

    #[test]
    fn nothing_found_says_how_to_install() {
        let Err(error) = resolve_server_binary(
            None,
            Some(OsStr::new("/nonexistent-dir")),
            Path::new("/nonexistent/fallback"),
        ) else {
            panic!("no binary anywhere must be an error");
        };
        let text = error.to_string();
        assert!(text.contains("sudo apt-get install nats-server"), "{text}");
        assert!(text.contains("NATS_SERVER_BIN"), "{text}");
        assert!(text.contains("scripts/install-deps"), "{text}");
    }

    #[test]
    fn finds_on_path_then_fallback() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let bin = dir.path().join("nats-server");
        fs::write(&bin, "#!/bin/sh\n")?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
        let found = resolve_server_binary(
            None,
            Some(dir.path().as_os_str()),
            Path::new("/nonexistent"),
        )?;
        assert_eq!(found, bin);
        let found = resolve_server_binary(None, Some(OsStr::new("/nonexistent")), &bin)?;
        assert_eq!(found, bin);
        // Not executable: skipped.
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o644))?;
        assert!(resolve_server_binary(Some(bin.as_os_str()), None, Path::new("/x")).is_err());
        Ok(())
    }

    #[test]
    fn config_is_loopback_only() {
        let spec = ConfigSpec {
            server_name: "jw-1".to_owned(),
            port: 4222,
            http_port: 8222,
            log_file: PathBuf::from("/tmp/x/nats-server.log"),
            store_dir: Some(PathBuf::from("/tmp/x/store")),
            cluster: Some(ClusterSpec {
                name: "jwc".to_owned(),
                port: 6222,
                routes: vec![6223, 6224],
            }),
            extra_config: Some("max_payload: 2MB".to_owned()),
        };
        let config = render_config(&spec);
        assert!(config.contains("host: \"127.0.0.1\""), "{config}");
        assert!(config.contains("http: \"127.0.0.1:8222\""), "{config}");
        assert!(config.contains("listen: \"127.0.0.1:6222\""), "{config}");
        assert!(
            config.contains("\"nats-route://127.0.0.1:6224\""),
            "{config}"
        );
        assert!(config.contains("store_dir: \"/tmp/x/store\""), "{config}");
        assert!(config.trim_end().ends_with("max_payload: 2MB"), "{config}");
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn free_ports_are_distinct() -> Result<(), TestServerError> {
        let ports = free_ports(9)?;
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), 9);
        assert!(!ports.contains(&0));
        Ok(())
    }
}
