//! `sd_notify` as systemd sees it: a unix datagram socket (a path, or an abstract name
//! starting with `@`) named by `NOTIFY_SOCKET` receives `READY=1`, `STOPPING=1`,
//! `STATUS=...` and `WATCHDOG=1`.
//!
//! In-process tests call `jetworker::systemd` directly. Environment variables are
//! process-global, so every test that sets one holds [`ENV`]. The process-level test
//! runs the real `test_worker` binary under a fake service manager (our socket) and a
//! real nats-server, and checks the order: no READY while the server is down (a STATUS
//! line says why), READY after connecting and provisioning, watchdog pings while
//! running, STATUS lines following readiness, STOPPING after SIGTERM, exit 0. The
//! worker process is killed if the test fails, and by a sentinel process if the test
//! binary itself is killed.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use jetworker::systemd::{self, Notification, Notifier, Watchdog};
use jetworker::testing::server::NatsServer;
use tokio_util::sync::CancellationToken;

/// Held by every test that reads or writes `NOTIFY_SOCKET` / `WATCHDOG_*`.
static ENV: Mutex<()> = Mutex::new(());

fn env_lock() -> std::sync::MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn clear_env() {
    for var in [
        systemd::NOTIFY_SOCKET,
        systemd::WATCHDOG_USEC,
        systemd::WATCHDOG_PID,
    ] {
        std::env::remove_var(var);
    }
}

/// A fake service manager: the socket, and every datagram it received, in order, with
/// when it arrived.
struct Manager {
    messages: mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
}

impl Manager {
    fn listen(socket: UnixDatagram) -> Manager {
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        if tx.send((Instant::now(), text)).is_err() {
                            return;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        // Idle: stop once the test dropped the receiver.
                        if tx.send((Instant::now(), String::new())).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Manager {
            messages: rx,
            seen: Vec::new(),
        }
    }

    fn bind(path: &Path) -> Manager {
        Manager::listen(UnixDatagram::bind(path).expect("bind notify socket"))
    }

    /// Collects what arrives for `within`.
    fn collect(&mut self, within: Duration) -> &[(Instant, String)] {
        let start = self.seen.len();
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.messages.recv_timeout(left) {
                Ok((_, text)) if text.is_empty() => {}
                Ok(message) => self.seen.push(message),
                Err(_) => break,
            }
        }
        &self.seen[start..]
    }

    /// Waits until a datagram holding the line `line` arrives; returns it.
    fn wait_for(&mut self, line: &str, within: Duration) -> (Instant, String) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no {line} within {within:?}; got {:?} (for a worker process: is jetworker::systemd wired into App::start / Running::wait?)", self.texts()));
            match self.messages.recv_timeout(left) {
                Ok((_, text)) if text.is_empty() => {}
                Ok(message) => {
                    self.seen.push(message.clone());
                    if message.1.lines().any(|l| l == line) {
                        return message;
                    }
                }
                Err(_) => panic!("no {line} within {within:?}; got {:?} (for a worker process: is jetworker::systemd wired into App::start / Running::wait?)", self.texts()),
            }
        }
    }

    /// Waits until a datagram with a line for which `matches` holds arrives; returns
    /// that line.
    fn wait_for_line(
        &mut self,
        what: &str,
        within: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no {what} within {within:?}; got {:?}", self.texts()));
            match self.messages.recv_timeout(left) {
                Ok((_, text)) if text.is_empty() => {}
                Ok(message) => {
                    self.seen.push(message.clone());
                    if let Some(line) = message.1.lines().find(|l| matches(l)) {
                        return line.to_string();
                    }
                }
                Err(_) => panic!("no {what} within {within:?}; got {:?}", self.texts()),
            }
        }
    }

    fn texts(&self) -> Vec<&str> {
        self.seen.iter().map(|(_, t)| t.as_str()).collect()
    }

    fn count(&self, line: &str) -> usize {
        self.seen
            .iter()
            .filter(|(_, t)| t.lines().any(|l| l == line))
            .count()
    }
}

#[test]
fn notifications_reach_a_path_socket_and_an_abstract_socket() {
    let _env = env_lock();
    clear_env();

    // Outside systemd: nothing is sent, nothing fails.
    assert!(!systemd::ready("running"));
    assert!(!systemd::stopping());
    assert!(!systemd::watchdog());
    assert!(!systemd::status("hello"));
    assert_eq!(systemd::watchdog_interval(), None);

    // A socket file.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let mut manager = Manager::bind(&path);
    std::env::set_var(systemd::NOTIFY_SOCKET, &path);
    assert!(systemd::ready("running 3 consumers"));
    assert!(systemd::status("line one\nREADY=1"));
    assert!(systemd::watchdog());
    assert!(systemd::stopping());
    let got: Vec<String> = manager
        .collect(Duration::from_millis(500))
        .iter()
        .map(|(_, t)| t.clone())
        .collect();
    assert_eq!(
        got,
        [
            "READY=1\nSTATUS=running 3 consumers\n",
            "STATUS=line one READY=1\n",
            "WATCHDOG=1\n",
            "STOPPING=1\nSTATUS=shutting down: waiting for in-flight handlers\n",
        ]
    );

    // An abstract socket (`@name`), as containers and some managers use.
    let name = format!("jetworker-test-{}-{}", std::process::id(), line!());
    let socket = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        UnixDatagram::bind_addr(&addr).expect("bind abstract socket")
    };
    let mut manager = Manager::listen(socket);
    std::env::set_var(systemd::NOTIFY_SOCKET, format!("@{name}"));
    assert!(systemd::ready("abstract"));
    assert_eq!(
        manager.wait_for("READY=1", Duration::from_secs(2)).1,
        "READY=1\nSTATUS=abstract\n"
    );

    // Nobody listening: reported as not sent, never a panic.
    std::env::set_var(systemd::NOTIFY_SOCKET, dir.path().join("nobody.sock"));
    assert!(!systemd::ready("nobody"));
    std::env::set_var(systemd::NOTIFY_SOCKET, "relative.sock");
    assert!(!systemd::watchdog());

    // The watchdog applies to us when WATCHDOG_PID is ours or unset.
    std::env::set_var(systemd::WATCHDOG_USEC, "2000000");
    assert_eq!(systemd::watchdog_interval(), Some(Duration::from_secs(2)));
    std::env::set_var(systemd::WATCHDOG_PID, std::process::id().to_string());
    assert_eq!(systemd::watchdog_interval(), Some(Duration::from_secs(2)));
    std::env::set_var(systemd::WATCHDOG_PID, (std::process::id() + 1).to_string());
    assert_eq!(systemd::watchdog_interval(), None);
    std::env::set_var(systemd::WATCHDOG_PID, std::process::id().to_string());
    std::env::set_var(systemd::WATCHDOG_USEC, "0");
    assert_eq!(systemd::watchdog_interval(), None);

    clear_env();
}

#[tokio::test]
async fn spawn_watchdog_pings_at_half_the_interval_until_cancelled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let mut manager = Manager::bind(&path);
    let stop = CancellationToken::new();
    let handle = {
        let _env = env_lock();
        clear_env();
        // Not under systemd, or no WatchdogSec: no task.
        assert!(systemd::spawn_watchdog(stop.clone(), || true).is_none());
        std::env::set_var(systemd::NOTIFY_SOCKET, &path);
        assert!(systemd::spawn_watchdog(stop.clone(), || true).is_none());
        std::env::set_var(systemd::WATCHDOG_USEC, "400000");
        std::env::set_var(systemd::WATCHDOG_PID, std::process::id().to_string());
        let handle = systemd::spawn_watchdog(stop.clone(), || true);
        clear_env();
        handle.expect("a watchdog task under systemd with WATCHDOG_USEC")
    };
    // 400ms interval: a ping at once, then every 200ms.
    let pings = tokio::task::spawn_blocking(move || {
        manager.collect(Duration::from_millis(1100));
        manager
    })
    .await
    .expect("collect");
    let n = pings.count("WATCHDOG=1");
    assert!(
        (4..=7).contains(&n),
        "{n} pings in 1.1s: {:?}",
        pings.texts()
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(2), handle)
        .await
        .expect("the watchdog task ends on cancel")
        .expect("no panic");
}

#[tokio::test]
async fn the_watchdog_withholds_pings_while_the_loops_are_not_alive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let manager = Manager::bind(&path);
    let notifier = Notifier::from_socket(path.as_os_str()).expect("notifier");
    let watchdog = Watchdog::new(notifier.clone(), Duration::from_millis(200));
    assert_eq!(watchdog.period(), Duration::from_millis(100));

    let alive = Arc::new(AtomicBool::new(true));
    let stop = CancellationToken::new();
    let task = tokio::spawn(watchdog.run(stop.clone(), {
        let alive = alive.clone();
        move || alive.load(Ordering::SeqCst)
    }));
    let mut manager = tokio::task::spawn_blocking(move || {
        let mut manager = manager;
        manager.collect(Duration::from_millis(450));
        manager
    })
    .await
    .expect("collect");
    let while_alive = manager.count("WATCHDOG=1");
    assert!(while_alive >= 3, "pings while alive: {while_alive}");

    alive.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (manager, before, after) = tokio::task::spawn_blocking(move || {
        // Drain what was sent before the loops "stopped", then listen for 500ms.
        manager.collect(Duration::from_millis(100));
        let before = manager.count("WATCHDOG=1");
        manager.collect(Duration::from_millis(500));
        let after = manager.count("WATCHDOG=1");
        (manager, before, after)
    })
    .await
    .expect("collect");
    assert_eq!(after, before, "no pings while the loops are stuck");

    alive.store(true, Ordering::SeqCst);
    tokio::task::spawn_blocking(move || {
        let mut manager = manager;
        manager.wait_for("WATCHDOG=1", Duration::from_secs(1));
    })
    .await
    .expect("pings resume once the loops are alive again");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("ends on cancel")
        .expect("no panic");

    // Sending through the explicit notifier works without any environment.
    let other = dir.path().join("other.sock");
    let mut m = Manager::bind(&other);
    Notifier::from_socket(other.as_os_str())
        .expect("notifier")
        .send(&[Notification::Ready, Notification::Status("x")])
        .expect("send");
    assert_eq!(
        m.wait_for("READY=1", Duration::from_secs(1)).1,
        "READY=1\nSTATUS=x\n"
    );
}

fn write_config(dir: &Path, url: &str) -> std::path::PathBuf {
    ConfigText::new(url)
        .worker(r#"shutdown_grace = "10s""#)
        .with_jobs()
        .write(dir)
}

/// The real worker under a fake systemd, its server down at first: no READY=1 while it
/// cannot connect (a STATUS= line says why), READY=1 once connected and provisioned,
/// WATCHDOG=1 at half of WATCHDOG_USEC while running, a STATUS= line when it loses the
/// server and another when it is back, STOPPING=1 after SIGTERM, then exit 0.
#[tokio::test]
async fn a_worker_process_notifies_ready_watchdog_and_stopping() {
    let mut server = NatsServer::start().expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &server.url());
    let socket = dir.path().join("notify.sock");
    let manager = Manager::bind(&socket);
    server.kill();

    let worker = WorkerProcess::spawn(
        Command::new(env!("CARGO_BIN_EXE_test_worker"))
            .args(["--config", &config.display().to_string(), "run"])
            .env("RUST_LOG", "info")
            .env(systemd::NOTIFY_SOCKET, &socket)
            // 2s watchdog: a ping every second.
            .env(systemd::WATCHDOG_USEC, "2000000")
            .env_remove(systemd::WATCHDOG_PID)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );

    // While the server is down: a STATUS= line saying so, and no READY=1.
    let manager = tokio::task::spawn_blocking(move || {
        let mut manager = manager;
        let line =
            manager.wait_for_line("STATUS=cannot connect ...", Duration::from_secs(20), |l| {
                l.starts_with("STATUS=cannot connect")
            });
        assert!(line.contains("retrying in"), "{line}");
        assert_eq!(manager.count("READY=1"), 0, "{:?}", manager.texts());
        manager
    })
    .await
    .expect("STATUS=cannot connect");

    // READY=1 arrives once the server is up, and by then the consumer exists.
    server.restart().expect("restart");
    let (_client, js) = connect(&server.url()).await;
    let manager = tokio::task::spawn_blocking(move || {
        let mut manager = manager;
        let (_, ready) = manager.wait_for("READY=1", Duration::from_secs(30));
        let status = ready
            .lines()
            .find(|l| l.starts_with("STATUS="))
            .unwrap_or_else(|| panic!("READY=1 comes with a STATUS= line: {ready:?}"));
        assert!(
            status.starts_with("STATUS=running 1 consumer on NATS "),
            "{status}"
        );
        manager
    })
    .await
    .expect("READY=1");
    let stream = js
        .get_stream("EVENTS")
        .await
        .expect("EVENTS provisioned before READY=1");
    stream
        .consumer_info("jobs")
        .await
        .expect("consumer provisioned before READY=1");
    assert_eq!(
        manager.count("STOPPING=1"),
        0,
        "no STOPPING=1 before a signal"
    );

    // Watchdog pings while running: at least 2 in 2.5s at a 1s period.
    let manager = tokio::task::spawn_blocking(move || {
        let mut manager = manager;
        let before = manager.count("WATCHDOG=1");
        manager.collect(Duration::from_millis(2500));
        let pings = manager.count("WATCHDOG=1") - before;
        assert!(
            pings >= 2,
            "{pings} watchdog pings in 2.5s with WATCHDOG_USEC=2s: {:?}",
            manager.texts()
        );
        manager
    })
    .await
    .expect("watchdog pings");

    // The server goes away and comes back: systemctl status follows.
    server.kill();
    let manager = tokio::task::spawn_blocking(move || {
        let mut manager = manager;
        manager.wait_for_line("STATUS=not ready: ...", Duration::from_secs(20), |l| {
            l.starts_with("STATUS=not ready: ")
        });
        manager
    })
    .await
    .expect("STATUS=not ready");
    server.restart().expect("restart");
    let manager = tokio::task::spawn_blocking(move || {
        let mut manager = manager;
        manager.wait_for_line("STATUS=running ...", Duration::from_secs(30), |l| {
            l.starts_with("STATUS=running 1 consumer")
        });
        manager
    })
    .await
    .expect("STATUS=running again");

    // SIGTERM: STOPPING=1, then a clean exit.
    worker.signal("TERM");
    let mut manager = tokio::task::spawn_blocking(move || {
        let mut manager = manager;
        manager.wait_for("STOPPING=1", Duration::from_secs(10));
        manager
    })
    .await
    .expect("STOPPING=1");
    let mut worker = worker;
    let exit = worker.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "graceful exit");
    // Whatever the process sent on its way out.
    let manager = tokio::task::spawn_blocking(move || {
        manager.collect(Duration::from_millis(200));
        manager
    })
    .await
    .expect("collect");
    let texts = manager.texts();
    eprintln!("notifications: {texts:?}");
    let ready_at = texts.iter().position(|t| t.contains("READY=1"));
    let stopping_at = texts.iter().position(|t| t.contains("STOPPING=1"));
    assert!(
        ready_at < stopping_at,
        "READY=1 before STOPPING=1: {texts:?}"
    );
    assert_eq!(manager.count("READY=1"), 1, "READY=1 once: {texts:?}");
    let first_ping = texts.iter().position(|t| t.contains("WATCHDOG=1"));
    assert!(
        ready_at < first_ping,
        "no watchdog pings before READY=1: {texts:?}"
    );
}
