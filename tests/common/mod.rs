//! Shared helpers for the integration tests: configs, publishing, waiting, reading streams.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
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

/// A test's `streams.toml`, built from the parts that vary between tests, so that the
/// suite's tests do not each paste a near-equal TOML text.
///
/// [`ConfigText::new`] starts with the server and no ops endpoint (tests run in
/// parallel); [`ConfigText::with_jobs`] adds the suite's usual shape. Lines are TOML as
/// it stands in the section (`max_deliver = 1`; several separated by newlines), added
/// after what the builder writes there. A test that is *about* a config text (a bad
/// one, unknown keys, the deploy files) keeps its literal TOML.
///
/// ```ignore
/// let path = ConfigText::new(&url)
///     .with_jobs()
///     .worker(r#"shutdown_grace = "2s""#)
///     .in_consumer("jobs", "max_deliver = 1")
///     .write(dir);
/// ```
#[derive(Debug, Clone)]
pub struct ConfigText {
    servers: Vec<String>,
    connection: Vec<String>,
    worker: Vec<String>,
    streams: Vec<Table>,
    kv_buckets: Vec<Table>,
    consumers: Vec<Table>,
}

/// One `[[streams]]`, `[[kv_buckets]]` or `[[consumers]]` entry: its name and the lines
/// after it.
#[derive(Debug, Clone)]
struct Table {
    name: String,
    lines: Vec<String>,
}

impl ConfigText {
    /// `[worker] ops_listen = ""` and nothing else: not even a server (for tests whose
    /// `[connection]` lines name it, see [`ConfigText::connection`]).
    pub fn empty() -> ConfigText {
        ConfigText {
            servers: Vec::new(),
            connection: Vec::new(),
            worker: vec![r#"ops_listen = """#.to_owned()],
            streams: Vec::new(),
            kv_buckets: Vec::new(),
            consumers: Vec::new(),
        }
    }

    /// [`ConfigText::empty`] connecting to `url`.
    pub fn new(url: &str) -> ConfigText {
        ConfigText::empty().servers(&[url])
    }

    /// `servers = [...]` in `[connection]`.
    pub fn servers<S: AsRef<str>>(mut self, urls: &[S]) -> ConfigText {
        self.servers = urls.iter().map(|url| url.as_ref().to_owned()).collect();
        self
    }

    /// The suite's usual shape: stream `EVENTS` on `jobs.>`, stream `DLQ` on `dlq.>`, and
    /// consumer `jobs` on EVENTS for handler `scripted` (the test worker's), its dead
    /// letters to `dlq.jobs`.
    pub fn with_jobs(self) -> ConfigText {
        self.stream("EVENTS", &["jobs.>"], "")
            .stream("DLQ", &["dlq.>"], "")
            .consumer("jobs", "EVENTS", "scripted", "")
    }

    /// Lines for `[connection]`.
    pub fn connection(mut self, lines: &str) -> ConfigText {
        push_lines(&mut self.connection, lines);
        self
    }

    /// Lines for `[worker]`.
    pub fn worker(mut self, lines: &str) -> ConfigText {
        push_lines(&mut self.worker, lines);
        self
    }

    /// A stream `name` on `subjects`, with `lines`.
    pub fn stream(mut self, name: &str, subjects: &[&str], lines: &str) -> ConfigText {
        let subjects: Vec<String> = subjects.iter().map(|s| quote(s)).collect();
        let mut table = Table::new(name, &[format!("subjects = [{}]", subjects.join(", "))]);
        push_lines(&mut table.lines, lines);
        self.streams.push(table);
        self
    }

    /// A key-value bucket `name`, with `lines`.
    pub fn kv_bucket(mut self, name: &str, lines: &str) -> ConfigText {
        let mut table = Table::new(name, &[]);
        push_lines(&mut table.lines, lines);
        self.kv_buckets.push(table);
        self
    }

    /// A consumer `name` on `stream` for `handler`, its dead letters to `dlq.<name>`
    /// (which the `DLQ` stream of [`ConfigText::with_jobs`] stores), with `lines`.
    pub fn consumer(mut self, name: &str, stream: &str, handler: &str, lines: &str) -> ConfigText {
        let mut table = Table::new(
            name,
            &[
                format!("stream = {}", quote(stream)),
                format!("handler = {}", quote(handler)),
                format!("dead_letter_subject = {}", quote(&format!("dlq.{name}"))),
            ],
        );
        push_lines(&mut table.lines, lines);
        self.consumers.push(table);
        self
    }

    /// More lines for the stream `name` (which must be there).
    pub fn in_stream(mut self, name: &str, lines: &str) -> ConfigText {
        push_lines(&mut Table::named(&mut self.streams, name).lines, lines);
        self
    }

    /// More lines for the consumer `name` (which must be there).
    pub fn in_consumer(mut self, name: &str, lines: &str) -> ConfigText {
        push_lines(&mut Table::named(&mut self.consumers, name).lines, lines);
        self
    }

    /// The TOML text.
    pub fn text(&self) -> String {
        let mut text = String::from("\n[connection]\n");
        if !self.servers.is_empty() {
            let servers: Vec<String> = self.servers.iter().map(|s| quote(s)).collect();
            text.push_str(&format!("servers = [{}]\n", servers.join(", ")));
        }
        for line in &self.connection {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("\n[worker]\n");
        for line in &self.worker {
            text.push_str(line);
            text.push('\n');
        }
        for (header, tables) in [
            ("[[streams]]", &self.streams),
            ("[[kv_buckets]]", &self.kv_buckets),
            ("[[consumers]]", &self.consumers),
        ] {
            for table in tables {
                text.push_str(&format!("\n{header}\nname = {}\n", quote(&table.name)));
                for line in &table.lines {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    }

    /// The text loaded and validated (as `test-streams.toml`, no environment).
    pub fn load(&self) -> Config {
        Config::from_toml_with_env(
            &self.text(),
            Path::new("test-streams.toml"),
            std::iter::empty(),
        )
        .expect("valid test config")
    }

    /// The text as the file `dir/streams.toml`, for tests that run a binary with
    /// `--config`. Returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("streams.toml");
        std::fs::write(&path, self.text()).expect("write config file");
        path
    }
}

impl Table {
    fn new(name: &str, lines: &[String]) -> Table {
        Table {
            name: name.to_owned(),
            lines: lines.to_vec(),
        }
    }

    fn named<'a>(tables: &'a mut [Table], name: &str) -> &'a mut Table {
        tables
            .iter_mut()
            .find(|table| table.name == name)
            .unwrap_or_else(|| panic!("no {name:?} in the test config"))
    }
}

/// Adds the non-blank lines of `lines`.
fn push_lines(to: &mut Vec<String>, lines: &str) {
    to.extend(
        lines
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(str::to_owned),
    );
}

/// A TOML basic string.
fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The suite's usual config on `url` ([`ConfigText::with_jobs`], a 2 s request timeout, a
/// 10 s shutdown grace), to add to.
pub fn suite_config(url: &str) -> ConfigText {
    ConfigText::new(url)
        .connection(r#"request_timeout = "2s""#)
        .worker(r#"shutdown_grace = "10s""#)
        .with_jobs()
}

/// The text of [`suite_config`]; `consumer_extra` lines are added to the consumer.
pub fn config_text(url: &str, consumer_extra: &str) -> String {
    suite_config(url).in_consumer("jobs", consumer_extra).text()
}

/// [`config_text`] loaded and validated.
pub fn config(url: &str, consumer_extra: &str) -> Config {
    suite_config(url).in_consumer("jobs", consumer_extra).load()
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

/// Publishes each job to `jobs.<partition>.k<id>` (`Publisher::publish_keyed`, key
/// `k<id>`, message id `job-<id>`) among `partitions`, waiting for each PubAck.
pub async fn publish_partitioned_jobs(js: &jetstream::Context, jobs: &[Job], partitions: u32) {
    let publisher = jetworker::Publisher::new(js.clone());
    for job in jobs {
        let (key, id) = (format!("k{}", job.id), format!("job-{}", job.id));
        publisher
            .publish_keyed("jobs", &key, partitions, &id, job)
            .await
            .expect("publish");
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
/// Sets `stream`'s max_msg_size behind any worker's back (-1: no limit).
pub async fn set_max_msg_size(js: &jetstream::Context, stream: &str, size: i32) {
    let mut config = js
        .get_stream(stream)
        .await
        .expect("stream")
        .cached_info()
        .config
        .clone();
    config.max_message_size = size;
    js.update_stream(config).await.expect("update stream");
}

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
pub fn write_config_file(dir: &Path, url: &str, consumer_extra: &str) -> PathBuf {
    suite_config(url)
        .in_consumer("jobs", consumer_extra)
        .write(dir)
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
