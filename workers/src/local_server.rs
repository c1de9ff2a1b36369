//! A local `nats-server` for `workers demo --local-server DIR` (what `scripts/demo` runs):
//! find out whether a server answers at the configured address, and when none does,
//! start one with JetStream and its data in a project folder, and stop it at the end.
//!
//! The server is jetworker's launcher ([`jetworker::testing::server`], the one the tests
//! use) with the demo's options: the configured loopback address, a data folder kept
//! across runs, the name `jetworker-demo`. The launcher runs it in its own process group
//! (a terminal's Ctrl-C goes to the demo, which stops the server only after the workers
//! drained) with a watchdog that stops the server if the demo dies without doing so
//! (`kill -9`, a second Ctrl-C). The launcher blocks while it waits; the functions here
//! wait on a blocking thread, so the demo keeps answering signals meanwhile.
//!
//! - [`probe`] reads the `INFO` line a NATS server sends on connect, so it learns whether
//!   anything answers, which version, and whether JetStream is on, without credentials.
//! - [`LocalServer::start`] starts the server and returns once it is ready.
//! - [`LocalServer::stop`] stops it gracefully (SIGTERM, then SIGKILL after 10 s).

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use jetworker::testing::server::{self, NatsServer, ServerOptions};

pub use jetworker::testing::server::{Address, Probe, TestServerError, DEBIAN_SERVER_PATH};

/// The demo server's `server_name`; its watchdog shows in `ps` as
/// `jetworker-demo-watchdog PID`.
pub const SERVER_NAME: &str = "jetworker-demo";

/// Connects to `address` and reads the server's `INFO` greeting, within `timeout`.
pub async fn probe(address: &Address, timeout: Duration) -> Probe {
    let address = address.clone();
    tokio::task::spawn_blocking(move || server::probe(&address, timeout))
        .await
        .unwrap_or(Probe::Nothing)
}

/// The `nats-server` binary: `NATS_SERVER_BIN`, then `nats-server` on `PATH`, then
/// `/usr/sbin/nats-server` (not on a normal user's `PATH` on Debian); `None` when there
/// is none (to install).
pub fn find_binary() -> Option<PathBuf> {
    server::server_binary().ok()
}

/// A `nats-server` with JetStream this process started; stopped by [`LocalServer::stop`],
/// or killed when dropped.
#[derive(Debug)]
pub struct LocalServer {
    /// Boxed: the demo keeps this next to small alternatives.
    server: Box<NatsServer>,
    /// Kept from the start: [`NatsServer::pid`] is `None` once it is stopped.
    pid: u32,
    /// The folder as given (the launcher works with its absolute form).
    dir: PathBuf,
}

impl LocalServer {
    /// Starts `binary` with JetStream listening on `address`, storing in `dir` (created if
    /// needed; what an earlier run stored is kept), logging to `dir/nats-server.log`.
    /// Returns once the server is ready, or fails within `ready_timeout` quoting the log.
    pub async fn start(
        binary: &Path,
        address: &Address,
        dir: &Path,
        ready_timeout: Duration,
    ) -> Result<LocalServer, TestServerError> {
        let options = ServerOptions {
            address: Some(address.clone()),
            dir: Some(dir.to_path_buf()),
            name: Some(SERVER_NAME.to_owned()),
            binary: Some(binary.to_path_buf()),
            ready_timeout,
            ..ServerOptions::default()
        };
        let server = tokio::task::spawn_blocking(move || NatsServer::start_with(options))
            .await
            .map_err(|e| {
                TestServerError::io(
                    format!("starting {}", binary.display()),
                    std::io::Error::other(e),
                )
            })??;
        Ok(LocalServer {
            pid: server.pid().unwrap_or_default(),
            server: Box::new(server),
            dir: dir.to_path_buf(),
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its version, from its greeting.
    pub fn version(&self) -> &str {
        self.server.version()
    }

    /// Where it listens.
    pub fn address(&self) -> &Address {
        self.server.address()
    }

    /// Its data folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        self.server.log_path()
    }

    /// Stops it: SIGTERM (it closes its store cleanly), SIGKILL if it is still running
    /// after 10 s. Returns how it exited.
    pub async fn stop(self) -> std::io::Result<ExitStatus> {
        let mut server = self.server;
        tokio::task::spawn_blocking(move || server.stop())
            .await
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::other("it was not running"))
    }
}
