//! `scripts/demo`, the one command that runs the platform on a machine, run the way a
//! user runs it: as a process in its own process group (a terminal's foreground job),
//! stopped with a terminal's Ctrl-C (SIGINT to the whole group) or a SIGTERM to its pid.
//!
//! - Fresh machine: nothing answers at the configured URL, so the demo starts its own
//!   `nats-server -js` with data in the given folder, prints live analytics (and the
//!   address of its live dashboard, which answers), and on
//!   Ctrl-C stops everything: exit 0, the server gone, no process left. A second run on
//!   the same folder continues from the stored data and stops on SIGTERM.
//! - Existing server: the demo uses it and leaves it running.
//! - A server without JetStream (what Debian's nats-server service runs): a clear error
//!   with the ways out, at once, nothing started.
//!
//! The script is given the test build of `workers` (`WORKERS_BIN`) so no cargo runs here.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jetworker::testing::server::{NatsServer, ServerOptions};

mod http;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `scripts/demo` running as its own process group, its output collected.
struct Demo {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Demo {
    /// `scripts/demo --every 1 --rate 200` with the test build of `workers`.
    fn start(nats_url: &str, data_dir: &Path) -> Demo {
        let mut command = Command::new("bash");
        command
            .arg(script())
            .args(["--every", "1", "--rate", "200"])
            .env("WORKERS_BIN", env!("CARGO_BIN_EXE_workers"))
            .env("DEMO_NATS_DIR", data_dir);
        Demo::spawn(command, nats_url)
    }

    fn spawn(mut command: Command, nats_url: &str) -> Demo {
        command
            .env("NATS_URL", nats_url)
            // Tests run in parallel: no fixed ops port.
            .env("JETWORKER__WORKER__OPS_LISTEN", "127.0.0.1:0")
            .env_remove("RUST_LOG")
            .env_remove("JETWORKER_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Like a shell's foreground job: a group of its own, which Ctrl-C signals whole.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().expect("the demo starts");
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (stream, prefix) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, ""),
            (Box::new(stderr), "[stderr] "),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut out = output.lock().expect("lock");
                    out.push_str(prefix);
                    out.push_str(&line);
                    out.push('\n');
                }
            });
        }
        Demo { child, output }
    }

    fn output(&self) -> String {
        self.output.lock().expect("lock").clone()
    }

    /// Waits until `done(output)` holds; panics with the output after `timeout`.
    fn wait_for(&mut self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.output()) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the demo exited ({status}) before {what}:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A terminal's Ctrl-C: SIGINT to every process of the foreground group.
    fn ctrl_c(&self) {
        kill("INT", &format!("-{}", self.child.id()));
    }

    /// `kill <pid>`: SIGTERM to the demo's process only.
    fn sigterm(&self) {
        kill("TERM", &self.child.id().to_string());
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(200));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the demo did not exit within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // A failed test: kill the group; the demo's watchdog then stops its server.
        if let Ok(None) = self.child.try_wait() {
            kill("KILL", &format!("-{}", self.child.id()));
            let _ = self.child.wait();
        }
    }
}

fn kill(signal: &str, target: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), "--", target])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {target}");
}

/// Totals of every analytics printout, in order.
fn totals(output: &str) -> Vec<u64> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("totals: ")?.split(' ').next()?.parse().ok())
        .collect()
}

/// Live printouts (not the final one) whose totals are above zero.
fn live_analytics(output: &str) -> usize {
    let live = output.split("── final analytics").next().unwrap_or("");
    live.split("── analytics at ")
        .skip(1)
        .filter(|block| totals(block).first().is_some_and(|n| *n > 0))
        .count()
}

/// The pid in "started nats-server ... (pid N, ...".
fn local_server_pid(output: &str) -> u32 {
    let line = output
        .lines()
        .find(|l| l.starts_with("started nats-server"))
        .expect("the demo says it started a server");
    line.split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|pid| pid.parse().ok())
        .expect("a pid")
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent has not collected it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Processes (other than zombies) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && alive(pid) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// The address in "dashboard: http://ADDR/ ...".
fn dashboard_address(output: &str) -> std::net::SocketAddr {
    output
        .lines()
        .find_map(|l| {
            l.strip_prefix("dashboard: http://")?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("the demo prints the dashboard's address:\n{output}"))
}

fn answers(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .is_ok()
}

#[test]
fn on_a_fresh_machine_it_starts_its_own_server_and_ctrl_c_stops_everything() {
    let home = tempfile::tempdir().expect("temp dir");
    let data = home.path().join("nats");
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");

    let mut demo = Demo::start(&url, &data);
    demo.wait_for(
        "two live analytics printouts",
        Duration::from_secs(60),
        |out| live_analytics(out) >= 2,
    );
    let out = demo.output();
    assert!(
        out.contains(&format!("no nats-server answers at 127.0.0.1:{port}")),
        "{out}"
    );
    let server = local_server_pid(&out);
    assert!(alive(server), "the local server runs");
    assert!(data.join("jetstream").is_dir(), "data in the given folder");
    assert!(out.contains("provisioned:") && out.contains("kv bucket analytics: create"));
    let summary = http::get(dashboard_address(&out), "/api/summary");
    assert_eq!(summary.status, 200, "{summary:?}");
    let summary: serde_json::Value = serde_json::from_str(&summary.body).expect("JSON");
    assert!(
        summary["totals"]["events"].as_u64() > Some(0),
        "the demo's dashboard shows its numbers: {summary}"
    );

    demo.ctrl_c();
    let status = demo.wait_exit(Duration::from_secs(60));
    let out = demo.output();
    assert!(
        status.success(),
        "Ctrl-C ends the demo with 0, got {status}:\n{out}"
    );
    assert!(out.contains("── final analytics"), "{out}");
    assert!(out.contains("stopped the local nats-server"), "{out}");
    assert!(!alive(server), "the local server is stopped");
    assert!(!answers(port), "nothing listens on {port} any more");
    let strays = processes_mentioning(&data.display().to_string());
    assert!(strays.is_empty(), "stray processes: {strays:?}");
    let watchdogs = processes_mentioning(&format!("jetworker-demo-watchdog {server}"));
    assert!(watchdogs.is_empty(), "stray watchdog: {watchdogs:?}");
    assert!(!data.join("nats-server.pid").exists(), "no stale pid file");
    assert!(
        !out.contains("[stderr]"),
        "a clean run logs nothing on stderr:\n{out}"
    );
    let first_run_total = *totals(&out).last().expect("final totals");
    assert!(first_run_total > 0);

    // Again on the same folder: the stored analytics are still there, and a SIGTERM
    // (what `kill`, systemd or a container runtime send) stops it as cleanly.
    let mut demo = Demo::start(&url, &data);
    demo.wait_for(
        "a live analytics printout",
        Duration::from_secs(60),
        |out| live_analytics(out) >= 1,
    );
    let out = demo.output();
    assert!(out.contains("are up to date"), "provisioned before:\n{out}");
    let server = local_server_pid(&out);
    assert!(
        totals(&out)[0] > first_run_total,
        "the second run continues from the first one's data:\n{out}"
    );
    demo.sigterm();
    let status = demo.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "SIGTERM: {status}\n{}", demo.output());
    assert!(!alive(server));
    assert!(!answers(port));
    let strays = processes_mentioning(&data.display().to_string());
    assert!(strays.is_empty(), "stray processes: {strays:?}");
}

#[test]
fn it_uses_a_server_that_answers_and_leaves_it_running() {
    let mut server = NatsServer::start().expect("nats-server");
    let home = tempfile::tempdir().expect("temp dir");
    let data = home.path().join("nats");

    let mut demo = Demo::start(&server.url(), &data);
    demo.wait_for(
        "a live analytics printout",
        Duration::from_secs(60),
        |out| live_analytics(out) >= 1,
    );
    demo.ctrl_c();
    let status = demo.wait_exit(Duration::from_secs(60));
    let out = demo.output();
    assert!(status.success(), "{status}:\n{out}");
    assert!(out.contains("using the nats-server"), "{out}");
    assert!(!out.contains("started nats-server"), "{out}");
    assert!(!data.exists(), "no local server data when a server answers");
    assert!(
        server.is_running(),
        "a server the demo did not start keeps running"
    );

    // And it holds what the demo published and counted.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(server.url()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let mut events = js.get_stream("EVENTS").await.expect("EVENTS");
        assert!(events.info().await.expect("info").state.messages > 0);
        let kv = js
            .get_key_value(workers::handlers::BUCKET)
            .await
            .expect("bucket");
        let snapshot = workers::aggregates::read(&kv, std::iter::empty())
            .await
            .expect("aggregates");
        assert_eq!(
            Some(snapshot.aggregates.totals.events()),
            totals(&out).last().copied(),
            "the final printout is what the bucket holds"
        );
    });
}

#[test]
fn a_server_without_jetstream_gets_a_clear_error_at_once() {
    let server = NatsServer::start_with(ServerOptions {
        jetstream: false,
        ..ServerOptions::default()
    })
    .expect("nats-server without JetStream");
    let home = tempfile::tempdir().expect("temp dir");
    let data = home.path().join("nats");

    let started = Instant::now();
    let mut demo = Demo::start(&server.url(), &data);
    let status = demo.wait_exit(Duration::from_secs(30));
    let out = demo.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "no hanging: {:?}",
        started.elapsed()
    );
    assert!(out.contains("runs without JetStream"), "{out}");
    assert!(
        out.contains("sudo systemctl disable --now nats-server"),
        "{out}"
    );
    assert!(
        out.contains("NATS_URL=nats://127.0.0.1:4223 scripts/demo"),
        "{out}"
    );
    assert!(!data.exists(), "nothing started");
}

#[test]
fn killed_outright_it_still_leaves_no_server_behind() {
    let home = tempfile::tempdir().expect("temp dir");
    let data = home.path().join("nats");
    let port = free_port();
    let mut demo = Demo::start(&format!("nats://127.0.0.1:{port}"), &data);
    demo.wait_for(
        "a live analytics printout",
        Duration::from_secs(60),
        |out| live_analytics(out) >= 1,
    );
    let server = local_server_pid(&demo.output());
    // `kill -9`: no cleanup code runs; the watchdog notices and stops the server.
    kill("KILL", &demo.child.id().to_string());
    let status = demo.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(server) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(server), "the watchdog stopped the server");
    assert!(!answers(port));
    let strays = processes_mentioning(&data.display().to_string());
    assert!(strays.is_empty(), "stray processes: {strays:?}");
}

/// No nats-server binary: the demo runs the installer it was given (scripts/demo gives
/// scripts/install-deps, which uses apt-get; here a stand-in that links the real binary
/// where `NATS_SERVER_BIN` points), then starts the server.
#[test]
fn a_missing_nats_server_is_installed_first() {
    let home = tempfile::tempdir().expect("temp dir");
    let data = home.path().join("nats");
    let installed = home.path().join("bin/nats-server");
    let real = jetworker::testing::server::server_binary().expect("a nats-server to install");
    let installer = home.path().join("install-nats");
    std::fs::write(
        &installer,
        format!(
            "#!/bin/sh\necho installing >&2\nmkdir -p '{}' && ln -s '{}' '{}'\n",
            home.path().join("bin").display(),
            real.display(),
            installed.display()
        ),
    )
    .expect("installer");
    let chmod = Command::new("chmod")
        .arg("+x")
        .arg(&installer)
        .status()
        .expect("chmod");
    assert!(chmod.success());

    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_workers"));
    command
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args(["demo", "--every", "1", "--local-server"])
        .arg(&data)
        .arg("--install-server-with")
        .arg(&installer)
        .env("NATS_SERVER_BIN", &installed);
    let mut demo = Demo::spawn(command, &format!("nats://127.0.0.1:{port}"));
    demo.wait_for(
        "a live analytics printout",
        Duration::from_secs(60),
        |out| live_analytics(out) >= 1,
    );
    let out = demo.output();
    assert!(
        out.contains("nats-server is not installed: installing it with"),
        "{out}"
    );
    assert!(
        out.contains(&format!("starting {} -js", installed.display())),
        "{out}"
    );
    let server = local_server_pid(&out);
    demo.ctrl_c();
    assert!(demo.wait_exit(Duration::from_secs(60)).success());
    assert!(!alive(server));
}
