//! Shared helpers for the integration tests: configs, publishing, waiting, reading streams.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream::Stream};
use jetworker::testing::server::Watchdog;
use jetworker::App;
use jetworker::Config;
use jetworker::RunError;
use jetworker_suite::Job;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The text of a config with one EVENTS stream, one DLQ stream and one consumer `jobs`
/// reading `jobs.>` into handler `scripted`; `consumer_extra` lines are added to the
/// consumer.
pub fn config_text(url: &str, consumer_extra: &str) -> String {
    format!(
        r#"
[connection]
servers = ["{url}"]
request_timeout = "2s"

[worker]
shutdown_grace = "10s"
ops_listen = ""

[[streams]]
name = "EVENTS"
subjects = ["jobs.>"]

[[streams]]
name = "DLQ"
subjects = ["dlq.>"]

[[consumers]]
name = "jobs"
stream = "EVENTS"
handler = "scripted"
dead_letter_subject = "dlq.jobs"
{consumer_extra}
"#
    )
}

/// [`config_text`] loaded and validated.
pub fn config(url: &str, consumer_extra: &str) -> Config {
    Config::from_toml_with_env(
        &config_text(url, consumer_extra),
        Path::new("test-streams.toml"),
        std::iter::empty(),
    )
    .expect("valid test config")
}

pub async fn connect(url: &str) -> (async_nats::Client, jetstream::Context) {
    let client = async_nats::connect(url).await.expect("connect");
    let js = jetstream::new(client.clone());
    (client, js)
}

/// Publishes jobs as MessagePack and waits for every PubAck.
pub async fn publish_jobs(js: &jetstream::Context, jobs: &[Job]) {
    let mut acks = Vec::with_capacity(jobs.len());
    for job in jobs {
        let payload = rmp_serde::to_vec_named(job).expect("encode");
        acks.push(
            js.publish(format!("jobs.{}", job.id), payload.into())
                .await
                .expect("publish"),
        );
    }
    for ack in acks {
        ack.await.expect("puback");
    }
}

/// Polls `check` every 50 ms until it returns true or `within` passes.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every message in a stream, in order (via a throwaway ordered read).
pub async fn messages(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<jetstream::message::StreamMessage> {
    let mut s: Stream = js.get_stream(stream).await.expect("stream");
    let info = s.info().await.expect("info").state.clone();
    let mut out = Vec::new();
    if info.messages == 0 {
        return out;
    }
    for seq in info.first_sequence..=info.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

/// Number of messages in a stream.
pub async fn count(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// The consumer's info.
pub async fn consumer_info(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
) -> jetstream::consumer::Info {
    js.get_stream(stream)
        .await
        .expect("stream")
        .consumer_info(name)
        .await
        .expect("consumer info")
}

/// A header value of a stored message.
pub fn header(m: &jetstream::message::StreamMessage, name: &str) -> Option<String> {
    m.headers.get(name).map(|v| v.as_str().to_string())
}

/// A plain HTTP/1.0 GET on loopback: (status, body); status 0 when nothing answers.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    };
    let Ok(Some(response)) = tokio::time::timeout(Duration::from_secs(5), exchange).await else {
        return (0, String::new());
    };
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// The value of a Prometheus sample line `name{labels} value` (labels as written).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// [`config_text`] as a file `dir/streams.toml`, for tests that run a binary with
/// `--config`. Returns its path.
pub fn write_config_file(dir: &Path, url: &str, consumer_extra: &str) -> std::path::PathBuf {
    let path = dir.join("streams.toml");
    std::fs::write(&path, config_text(url, consumer_extra)).expect("write config file");
    path
}

/// An [`App`] running in this process until [`InProcessWorker::stop`].
pub struct InProcessWorker {
    stop: CancellationToken,
    handle: JoinHandle<Result<(), RunError>>,
}

impl InProcessWorker {
    /// Runs `app` with `config` on a task of its own.
    pub fn start<S: Send + Sync + 'static>(config: Config, app: App<S>) -> InProcessWorker {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move { app.run_until(config, token).await.map(|_| ()) });
        InProcessWorker { stop, handle }
    }

    /// Stops it and waits until it has (graceful shutdown), failing the test if it ran
    /// into an error.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("worker stops in time")
            .expect("worker task")
            .expect("worker ran");
    }
}

/// A worker process that cannot outlive the test. Dropping it (a failed assertion
/// unwinds through it) kills the worker; and should the test binary die without
/// unwinding (killed by a timeout, `abort`), the launcher's [`Watchdog`] kills it.
pub struct WorkerProcess {
    /// The worker.
    pub child: Child,
    watchdog: Watchdog,
}

impl WorkerProcess {
    /// Spawns `command` and its watchdog (`kill -9` at once: a test has no use for a
    /// worker's graceful end once the test is gone).
    pub fn spawn(command: &mut Command) -> WorkerProcess {
        let child = command.spawn().expect("spawn the worker");
        let watchdog = Watchdog::guard(child.id(), "jetworker-test-sentinel", Duration::ZERO);
        WorkerProcess { child, watchdog }
    }

    /// The worker's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends signal `name` (`TERM`, `INT`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} {}", self.pid());
    }

    /// Waits for the worker to exit; fails the test (killing it) after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("worker did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // The watchdog first: once the worker is reaped its pid may be reused.
        self.watchdog.disarm();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
