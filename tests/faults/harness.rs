//! The machinery of the fault-injection scenarios: worker processes (the real
//! `test_worker` binary) killed on drop, a tail of their `start`/`done` logs, a publisher
//! that tolerates faults and records which publishes the server acknowledged, the oracle
//! that checks every acknowledged message was handled or dead-lettered exactly once, and
//! the report table.
//!
//! Oracle: every job whose publish got a PubAck has a `done <id>` line in some worker's
//! log, or exactly one dead-letter copy (by `Jetworker-Stream` / `Jetworker-Sequence`).
//! Ids handled successfully more than once are counted as duplicates and reported (at
//! least once is the contract), never failed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::common::ConfigText;
use async_nats::jetstream;
use futures::StreamExt;
use jetworker::headers as dead_letter;
use jetworker::testing::server::Watchdog;
use jetworker::{Publisher, RetryPolicy};
use jetworker_suite::Job;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// `JETWORKER_FAULTS_FULL=1` runs the full-size scenarios.
pub fn full() -> bool {
    std::env::var("JETWORKER_FAULTS_FULL").is_ok_and(|v| v == "1")
}

/// Small size in CI, full size behind the flag.
pub fn size<T>(small: T, full_size: T) -> T {
    if full() {
        full_size
    } else {
        small
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs blocking server control (start, kill, restart) without stalling the runtime.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// ---------------------------------------------------------------------------------------
// Worker config and processes
// ---------------------------------------------------------------------------------------

/// The knobs of the worker config a scenario changes.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Server URLs the worker connects to.
    pub servers: Vec<String>,
    /// Stream replicas (3 in a cluster).
    pub replicas: u32,
    /// Handler slots per worker process.
    pub concurrency: u32,
    /// Consumer ack wait.
    pub ack_wait: &'static str,
    /// Consumer max deliver.
    pub max_deliver: u32,
    /// Consumer max ack pending.
    pub max_ack_pending: u32,
    /// Handler timeout.
    pub handler_timeout: &'static str,
    /// Retry delays.
    pub backoff: &'static str,
    /// More consumers of EVENTS besides `jobs`, with the same settings, each with its own
    /// dead-letter subject (`dlq.<name>`) in the one DLQ stream: a fan-out.
    pub extra_consumers: Vec<&'static str>,
    /// Every consumer's `max_payload_bytes`, when set (larger messages are `too_large`).
    pub max_payload_bytes: Option<u32>,
}

impl WorkerSpec {
    /// Defaults for the scenarios: 16 slots, 3 s ack wait, 5 deliveries.
    pub fn new(servers: Vec<String>) -> WorkerSpec {
        WorkerSpec {
            servers,
            replicas: 1,
            concurrency: 16,
            ack_wait: "3s",
            max_deliver: 5,
            max_ack_pending: 1000,
            handler_timeout: "60s",
            backoff: r#"["500ms", "1s"]"#,
            extra_consumers: Vec::new(),
            max_payload_bytes: None,
        }
    }
}

/// Writes `streams.toml` for `spec` into `dir`.
pub fn write_config(dir: &Path, spec: &WorkerSpec) -> PathBuf {
    let replicas = format!("replicas = {}", spec.replicas);
    let mut settings = format!(
        "concurrency = {}\nack_wait = \"{}\"\nmax_deliver = {}\nmax_ack_pending = {}\n\
         handler_timeout = \"{}\"\nbackoff = {}",
        spec.concurrency,
        spec.ack_wait,
        spec.max_deliver,
        spec.max_ack_pending,
        spec.handler_timeout,
        spec.backoff,
    );
    if let Some(limit) = spec.max_payload_bytes {
        settings.push_str(&format!("\nmax_payload_bytes = {limit}"));
    }
    let mut config = ConfigText::empty()
        .servers(&spec.servers)
        .worker(r#"shutdown_grace = "2s""#)
        .with_jobs()
        .in_stream("EVENTS", &replicas)
        .in_stream("DLQ", &replicas)
        .in_consumer("jobs", &settings);
    for name in &spec.extra_consumers {
        config = config.consumer(name, "EVENTS", "scripted", &settings);
    }
    config.write(dir)
}

/// One `test_worker` process; `kill -9`'d when dropped. A watchdog kills it too if the
/// test process dies without dropping it.
pub struct Worker {
    child: Child,
    watchdog: Watchdog,
    /// Its `JW_TEST_LOG` (`start`/`done` lines).
    pub log: PathBuf,
    /// Its stdout + stderr (the runtime's own log).
    pub output: PathBuf,
}

impl Worker {
    /// Starts `test_worker --config <config> run`.
    pub fn spawn(config: &Path, log: PathBuf, output: PathBuf) -> Worker {
        let out = File::create(&output).expect("worker output file");
        let err = out.try_clone().expect("clone output file");
        let child = Command::new(env!("CARGO_BIN_EXE_test_worker"))
            .args(["--config", &config.display().to_string(), "run"])
            .env("JW_TEST_LOG", &log)
            .env(
                "RUST_LOG",
                std::env::var("JETWORKER_FAULTS_RUST_LOG")
                    .unwrap_or_else(|_| "info,async_nats=warn".to_string()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn test_worker");
        let watchdog = Watchdog::guard(child.id(), "jetworker-faults-watchdog", Duration::ZERO);
        Worker {
            child,
            watchdog,
            log,
            output,
        }
    }

    /// `kill -9` and reap (the watchdog ended first: a reaped pid may be reused).
    pub fn kill9(&mut self) {
        self.watchdog.disarm();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `within` for the exit; its exit code (`None` when
    /// killed by a signal, or `kill -9`'d after `within`).
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        send_signal(self.child.id(), "TERM");
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.watchdog.disarm();
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Sends `signal` (a name as `kill` takes it: `TERM`, `STOP`, `CONT`) to process `pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .is_ok_and(|status| status.success());
    assert!(sent, "kill -{signal} {pid} failed");
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Worker replicas sharing one config, each incarnation with its own log files.
pub struct Replicas {
    dir: PathBuf,
    config: PathBuf,
    slots: Vec<Option<Worker>>,
    incarnations: u32,
    tracker: Arc<Tracker>,
    outputs: Vec<PathBuf>,
}

impl Replicas {
    /// `n` empty slots (nothing started yet).
    pub fn new(dir: &Path, config: PathBuf, n: usize, tracker: Arc<Tracker>) -> Replicas {
        Replicas {
            dir: dir.to_path_buf(),
            config,
            slots: (0..n).map(|_| None).collect(),
            incarnations: 0,
            tracker,
            outputs: Vec::new(),
        }
    }

    /// Starts replica `i` (a new incarnation with fresh log files).
    pub fn spawn(&mut self, i: usize) {
        self.incarnations += 1;
        let n = self.incarnations;
        let log = self.dir.join(format!("replica{i}-{n}.jobs.log"));
        let output = self.dir.join(format!("replica{i}-{n}.out.log"));
        self.tracker.register(&log);
        self.outputs.push(output.clone());
        self.slots[i] = Some(Worker::spawn(&self.config, log, output));
    }

    /// `kill -9` replica `i`; returns the ids it had started and not finished.
    pub fn kill(&mut self, i: usize) -> Vec<u64> {
        let Some(mut w) = self.slots[i].take() else {
            return Vec::new();
        };
        w.kill9();
        self.tracker.close(&w.log)
    }

    /// SIGTERM to replica `i` (a graceful stop, as in a rolling restart); its exit code
    /// (`None`: it did not exit within 20 s and was killed). The rest of its log is read.
    pub fn stop(&mut self, i: usize) -> Option<i32> {
        let mut w = self.slots[i].take()?;
        let code = blocking(|| w.terminate(Duration::from_secs(20)));
        self.tracker.close(&w.log);
        code
    }

    /// Sends `signal` to replica `i`'s process (`STOP` freezes it, `CONT` wakes it);
    /// panics when it is down. A frozen replica is still `kill -9`'d when dropped.
    pub fn signal(&self, i: usize, signal: &str) {
        let w = self.slots[i].as_ref().expect("replica is up");
        send_signal(w.child.id(), signal);
    }

    /// When replica `i`'s current incarnation first finished a job whose `start` line was
    /// written after `t` (see [`Tracker::first_done_started_after`]).
    pub fn first_done_started_after(&self, i: usize, t: Instant) -> Option<Instant> {
        let w = self.slots[i].as_ref()?;
        self.tracker.first_done_in_file_started_after(&w.log, t)
    }

    /// The ids replica `i` first started after `t` (in this incarnation) and has not
    /// finished: with jobs that take far less than `now - t`, those its handlers run now
    /// (a failed attempt has a `start` line and never a `done`, and stays in
    /// [`Replicas::in_flight`]).
    pub fn in_flight_since(&self, i: usize, t: Instant) -> Vec<u64> {
        let Some(w) = &self.slots[i] else {
            return Vec::new();
        };
        let st = lock(&self.tracker.state);
        let Some(file) = st.files.iter().find(|f| f.path == w.log) else {
            return Vec::new();
        };
        let mut ids: Vec<u64> = file
            .in_flight
            .iter()
            .filter(|(_, (_, seen))| seen.is_some_and(|seen| seen >= t))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The ids replica `i`'s current incarnation has done (empty when it is down).
    pub fn done_ids(&self, i: usize) -> HashSet<u64> {
        let Some(w) = &self.slots[i] else {
            return HashSet::new();
        };
        let st = lock(&self.tracker.state);
        st.files
            .iter()
            .find(|f| f.path == w.log)
            .map(|f| f.done.clone())
            .unwrap_or_default()
    }

    /// The ids replica `i` has started and not finished (empty when it is down).
    pub fn in_flight(&self, i: usize) -> Vec<u64> {
        match &self.slots[i] {
            Some(w) => self.tracker.in_flight(&w.log),
            None => Vec::new(),
        }
    }

    /// Whether replica `i` has a process (started and not killed by the test).
    pub fn is_up(&self, i: usize) -> bool {
        self.slots[i].is_some()
    }

    /// Replicas whose process exited on its own (a crash), with their output files.
    pub fn crashed(&mut self) -> Vec<PathBuf> {
        self.slots
            .iter_mut()
            .flatten()
            .filter_map(|w| (!w.is_running()).then(|| w.output.clone()))
            .collect()
    }

    /// Every incarnation's runtime log, oldest first.
    pub fn outputs(&self) -> &[PathBuf] {
        &self.outputs
    }
}

// ---------------------------------------------------------------------------------------
// Tailing the job logs
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct FileTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    closed: bool,
    /// When the file was last read: a line first seen by the next read was written
    /// after this.
    read_at: Option<Instant>,
    /// Started and not (yet) done in this incarnation: id -> (starts, a time the first
    /// of them was surely written after).
    in_flight: HashMap<u64, (u32, Option<Instant>)>,
    /// This file's share of [`TrackerState::finished`].
    finished: Vec<(Instant, Instant)>,
    /// Ids with a `done` line in this file.
    done: HashSet<u64>,
}

#[derive(Default)]
struct TrackerState {
    files: Vec<FileTail>,
    /// When each id's `done` lines were seen.
    done: HashMap<u64, Vec<Instant>>,
    /// `done` lines per (consumer, id), from lines that name the consumer.
    done_by: HashMap<(String, u64), u32>,
    /// (consumer, id, attempt) of every `start` line that names the consumer.
    started_by: HashSet<(String, u64, u64)>,
    done_lines: u64,
    /// (attempt) -> ids started with that attempt.
    started: HashMap<u64, HashSet<u64>>,
    /// `start` lines with an attempt above 1 (redeliveries the handler saw).
    redelivered_starts: u64,
    /// (a time the job's `start` was surely written after, when its `done` was seen), in
    /// the order seen: the second field never decreases.
    finished: Vec<(Instant, Instant)>,
    /// The most jobs started and not done at one poll, over all live workers.
    peak_in_flight: usize,
    /// Lines that are not `start|done <id> <attempt>` (a broken log would hide jobs).
    malformed: Vec<String>,
}

/// Follows every worker's `JW_TEST_LOG` and records when `start`/`done` lines appear.
/// Times are those of the poll that saw a line (every 50 ms), good enough for recovery
/// times measured in seconds.
pub struct Tracker {
    state: Mutex<TrackerState>,
    stop: CancellationToken,
}

/// How often the logs are read.
const TAIL_EVERY: Duration = Duration::from_millis(50);

impl Tracker {
    /// A tracker polling its files every 50 ms until dropped.
    pub fn start() -> Arc<Tracker> {
        let tracker = Arc::new(Tracker {
            state: Mutex::new(TrackerState::default()),
            stop: CancellationToken::new(),
        });
        let weak = Arc::downgrade(&tracker);
        let stop = tracker.stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TAIL_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(t) = weak.upgrade() else { return };
                t.poll();
            }
        });
        tracker
    }

    fn register(&self, path: &Path) {
        lock(&self.state).files.push(FileTail {
            path: path.to_path_buf(),
            read_at: Some(Instant::now()),
            ..FileTail::default()
        });
    }

    /// Reads the rest of `path` (its process is dead: a last line without newline counts)
    /// and stops following it; returns the ids it started and never finished.
    fn close(&self, path: &Path) -> Vec<u64> {
        let mut st = lock(&self.state);
        let now = Instant::now();
        let Some(i) = st.files.iter().position(|f| f.path == path) else {
            return Vec::new();
        };
        let mut lines = read_new(&mut st.files[i]);
        let rest = std::mem::take(&mut st.files[i].partial);
        lines.push(String::from_utf8_lossy(&rest).into_owned());
        apply(&mut st, i, lines, now);
        st.files[i].closed = true;
        let mut ids: Vec<u64> = st.files[i].in_flight.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    fn poll(&self) {
        let mut st = lock(&self.state);
        let now = Instant::now();
        for i in 0..st.files.len() {
            if st.files[i].closed {
                continue;
            }
            let lines = read_new(&mut st.files[i]);
            apply(&mut st, i, lines, now);
        }
        let in_flight: usize = st
            .files
            .iter()
            .filter(|f| !f.closed)
            .map(|f| {
                f.in_flight
                    .values()
                    .map(|(n, _)| *n as usize)
                    .sum::<usize>()
            })
            .sum();
        st.peak_in_flight = st.peak_in_flight.max(in_flight);
    }

    /// Distinct ids with a `done` line.
    pub fn done_ids(&self) -> usize {
        lock(&self.state).done.len()
    }

    /// `done` lines in all (ids handled successfully, duplicates included).
    pub fn done_lines(&self) -> u64 {
        lock(&self.state).done_lines
    }

    /// Whether `id` has a `done` line.
    pub fn is_done(&self, id: u64) -> bool {
        lock(&self.state).done.contains_key(&id)
    }

    /// Done counts per id.
    pub fn done_counts(&self) -> HashMap<u64, u32> {
        lock(&self.state)
            .done
            .iter()
            .map(|(id, seen)| (*id, seen.len() as u32))
            .collect()
    }

    /// `done` lines per (consumer, id).
    pub fn done_by_consumer(&self) -> HashMap<(String, u64), u32> {
        lock(&self.state).done_by.clone()
    }

    /// (consumer, id, attempt) of every `start` line.
    pub fn started_by_consumer(&self) -> HashSet<(String, u64, u64)> {
        lock(&self.state).started_by.clone()
    }

    /// Lines of the job logs that could not be read (must be none).
    pub fn malformed(&self) -> Vec<String> {
        lock(&self.state).malformed.clone()
    }

    /// `start` lines with an attempt above 1.
    pub fn redelivered_starts(&self) -> u64 {
        lock(&self.state).redelivered_starts
    }

    /// The most jobs in flight (started, not done) at once over all live workers.
    pub fn peak_in_flight(&self) -> usize {
        lock(&self.state).peak_in_flight
    }

    /// The ids started and not (yet) done in the worker writing `path`.
    pub fn in_flight(&self, path: &Path) -> Vec<u64> {
        let st = lock(&self.state);
        st.files
            .iter()
            .find(|f| f.path == path)
            .map(|f| f.in_flight.keys().copied().collect())
            .unwrap_or_default()
    }

    /// How long after `since` the last of `ids` was done (each counted at its first
    /// `done` after `since`); `None` while one of them is not done again.
    pub fn redone_within(&self, ids: &[u64], since: Instant) -> Option<Duration> {
        let st = lock(&self.state);
        let mut longest = Duration::ZERO;
        for id in ids {
            let seen = st.done.get(id)?;
            // Done before `since` only (a duplicate delivery finished elsewhere): counts as 0.
            if let Some(first) = seen.iter().find(|seen| **seen > since) {
                longest = longest.max(first.duration_since(since));
            }
        }
        Some(longest)
    }

    /// Whether `id` was started with attempt `attempt`.
    pub fn started(&self, id: u64, attempt: u64) -> bool {
        lock(&self.state)
            .started
            .get(&attempt)
            .is_some_and(|s| s.contains(&id))
    }

    /// When the first job whose `start` line was written after `t` was seen `done`: work
    /// that began after `t` finished. A handler already running at `t` does not count
    /// (nor one whose start line was merely read after `t`), so a fault cannot look
    /// recovered just because old work drained.
    pub fn first_done_started_after(&self, t: Instant) -> Option<Instant> {
        first_started_after(&lock(&self.state).finished, t)
    }

    /// Like [`Tracker::first_done_started_after`], for the worker writing `path` only.
    pub fn first_done_in_file_started_after(&self, path: &Path, t: Instant) -> Option<Instant> {
        let st = lock(&self.state);
        let file = st.files.iter().find(|f| f.path == path)?;
        first_started_after(&file.finished, t)
    }

    /// The longest time between `from` and `to` with no `done` line.
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let st = lock(&self.state);
        let mut last = from;
        let mut longest = Duration::ZERO;
        for (_, done) in &st.finished {
            if *done <= from || *done > to {
                continue;
            }
            longest = longest.max(done.duration_since(last));
            last = *done;
        }
        longest.max(to.saturating_duration_since(last))
    }
}

/// In `finished` ((a time the start was surely written after, when the done was seen),
/// in the order seen), when the first job that started after `t` was done.
fn first_started_after(finished: &[(Instant, Instant)], t: Instant) -> Option<Instant> {
    let from = finished.partition_point(|(_, done)| *done <= t);
    finished[from..]
        .iter()
        .find(|(written_after, _)| *written_after >= t)
        .map(|(_, done)| *done)
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Complete new lines of a file.
fn read_new(f: &mut FileTail) -> Vec<String> {
    let Ok(mut file) = File::open(&f.path) else {
        return Vec::new();
    };
    if file.seek(SeekFrom::Start(f.offset)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    f.offset += bytes.len() as u64;
    f.partial.extend_from_slice(&bytes);
    let Some(last_newline) = f.partial.iter().rposition(|b| *b == b'\n') else {
        return Vec::new();
    };
    let complete: Vec<u8> = f.partial.drain(..=last_newline).collect();
    String::from_utf8_lossy(&complete)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn apply(st: &mut TrackerState, file: usize, lines: Vec<String>, now: Instant) {
    // Lines read now were written after the previous read (or the registration).
    let written_after = st.files[file].read_at.replace(now).unwrap_or(now);
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split(' ').collect();
        let parsed = match parts[..] {
            [kind @ ("start" | "done"), id, attempt, ref consumer @ ..] if consumer.len() <= 1 => {
                match (id.parse::<u64>(), attempt.parse::<u64>()) {
                    (Ok(id), Ok(attempt)) => Some((kind, id, attempt, consumer.first().copied())),
                    _ => None,
                }
            }
            _ => None,
        };
        let Some((kind, id, attempt, consumer)) = parsed else {
            st.malformed.push(line);
            continue;
        };
        if let Some(consumer) = consumer {
            if kind == "done" {
                *st.done_by.entry((consumer.to_string(), id)).or_default() += 1;
            } else {
                st.started_by.insert((consumer.to_string(), id, attempt));
            }
        }
        match kind {
            "start" => {
                st.started.entry(attempt).or_default().insert(id);
                if attempt > 1 {
                    st.redelivered_starts += 1;
                }
                let entry = st.files[file].in_flight.entry(id).or_default();
                entry.0 += 1;
                entry.1.get_or_insert(written_after);
            }
            "done" => {
                st.done.entry(id).or_default().push(now);
                st.done_lines += 1;
                let in_flight = &mut st.files[file].in_flight;
                let mut start_seen = written_after;
                if let Some((n, seen)) = in_flight.get_mut(&id) {
                    start_seen = seen.unwrap_or(written_after);
                    *n -= 1;
                    if *n == 0 {
                        in_flight.remove(&id);
                    }
                }
                st.finished.push((start_seen, now));
                st.files[file].finished.push((start_seen, now));
                st.files[file].done.insert(id);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Publishing that tolerates faults
// ---------------------------------------------------------------------------------------

/// What the publisher got acknowledged.
#[derive(Debug, Default)]
pub struct Published {
    /// Job ids whose publish got a PubAck.
    pub acked: HashSet<u64>,
    /// Job ids given up on (never acknowledged before the deadline): not in the oracle.
    pub given_up: Vec<u64>,
    /// Publish attempts that failed and were retried.
    pub retries: u64,
    /// How long publishing took.
    pub took: Duration,
}

/// Publishes `jobs` to `jobs.<id>` (message id `job-<id>`), paced evenly over `over`,
/// with up to 64 PubAcks outstanding. Each publish is retried (same message id, so a
/// stored-but-unacknowledged one is deduplicated) until acknowledged or `give_up_after`
/// from the start.
pub fn spawn_publisher(
    js: jetstream::Context,
    jobs: Vec<Job>,
    over: Duration,
    give_up_after: Duration,
) -> JoinHandle<Published> {
    tokio::spawn(async move {
        let started = Instant::now();
        let give_up = started + give_up_after;
        let publisher = Publisher::new(js).with_retry(RetryPolicy {
            deadline: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(2),
        });
        let n = jobs.len().max(1) as u32;
        let results: Vec<(u64, bool, u64)> = futures::stream::iter(jobs.into_iter().enumerate())
            .map(|(i, job)| {
                let publisher = publisher.clone();
                let at = started + over * (i as u32) / n;
                async move {
                    tokio::time::sleep_until(at).await;
                    let subject = format!("jobs.{}", job.id);
                    let msg_id = format!("job-{}", job.id);
                    let mut retries = 0;
                    loop {
                        match publisher.publish(&subject, &msg_id, &job).await {
                            Ok(_) => return (job.id, true, retries),
                            Err(_) if Instant::now() > give_up => return (job.id, false, retries),
                            Err(_) => {
                                retries += 1;
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        let mut out = Published::default();
        for (id, acked, retries) in results {
            out.retries += retries;
            if acked {
                out.acked.insert(id);
            } else {
                out.given_up.push(id);
            }
        }
        out.took = started.elapsed();
        out
    })
}

/// A client that reconnects forever, to all `urls`.
pub async fn connect(urls: &[String]) -> (async_nats::Client, jetstream::Context) {
    let servers: Vec<async_nats::ServerAddr> = urls
        .iter()
        .map(|u| u.parse().expect("server URL"))
        .collect();
    let client = async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .connect(servers)
        .await
        .expect("connect");
    let js = jetstream::new(client.clone());
    (client, js)
}

/// Waits until the worker has provisioned the streams and the `jobs` consumer.
pub async fn wait_provisioned(js: &jetstream::Context, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let ready = async {
            js.get_stream("DLQ").await.ok()?;
            let s = js.get_stream("EVENTS").await.ok()?;
            s.consumer_info("jobs").await.ok()
        };
        if tokio::time::timeout(Duration::from_secs(5), ready)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "streams and consumer not provisioned within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------------------

/// One dead-letter copy, as the oracle reads it.
#[derive(Debug, Clone)]
pub struct Letter {
    /// Job id (from `Jetworker-Original-Subject` `jobs.<id>`), if it is a job.
    pub id: Option<u64>,
    /// `Jetworker-Original-Subject`.
    pub original_subject: String,
    /// `Jetworker-Stream`.
    pub stream: String,
    /// `Jetworker-Sequence`.
    pub sequence: u64,
    /// `Jetworker-Consumer`: the consumer that gave up on it.
    pub consumer: String,
    /// `Jetworker-Reason`.
    pub reason: String,
    /// `Jetworker-Attempts`.
    pub attempts: u64,
    /// `Nats-Msg-Id`.
    pub msg_id: String,
    /// `Jetworker-Payload-Object`: where a payload too large for the copy is kept.
    pub payload_object: String,
}

/// Messages in the DLQ stream (0 if it cannot be read now).
pub async fn dlq_count(js: &jetstream::Context) -> u64 {
    let read = async {
        let mut s = js.get_stream("DLQ").await.ok()?;
        Some(s.info().await.ok()?.state.messages)
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Every dead letter in the DLQ stream.
pub async fn dead_letters(js: &jetstream::Context) -> Vec<Letter> {
    let mut stream = js.get_stream("DLQ").await.expect("DLQ stream");
    let state = stream.info().await.expect("DLQ info").state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let mut tries = 0;
        let m = loop {
            match stream.get_raw_message(seq).await {
                Ok(m) => break Some(m),
                Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                    break None
                }
                Err(e) => {
                    tries += 1;
                    assert!(tries < 20, "reading DLQ message {seq}: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        let Some(m) = m else { continue };
        let h = |name: &str| {
            m.headers
                .get(name)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        let original_subject = h(dead_letter::ORIGINAL_SUBJECT);
        out.push(Letter {
            id: original_subject
                .strip_prefix("jobs.")
                .and_then(|id| id.parse().ok()),
            stream: h(dead_letter::STREAM),
            sequence: h(dead_letter::SEQUENCE).parse().unwrap_or(0),
            consumer: h(dead_letter::CONSUMER),
            reason: h(dead_letter::REASON),
            attempts: h(dead_letter::ATTEMPTS).parse().unwrap_or(0),
            msg_id: h("Nats-Msg-Id"),
            payload_object: h(dead_letter::PAYLOAD_OBJECT),
            original_subject,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------
// A scenario run: faults, recovery times, the oracle, the report
// ---------------------------------------------------------------------------------------

/// One scenario in progress.
pub struct Run {
    /// Scenario name (the table's first column).
    pub name: &'static str,
    /// Files of this run (kept when it fails).
    pub dir: Option<tempfile::TempDir>,
    /// The job-log tail.
    pub tracker: Arc<Tracker>,
    /// Faults injected so far.
    pub faults: u32,
    /// (fault, recovery time) for each measured recovery.
    pub recoveries: Vec<(String, Duration)>,
    /// Broken expectations found along the way (reported at the end).
    pub failures: Vec<String>,
    /// Free-text notes for the report.
    pub notes: Vec<String>,
    /// The stated bound on recovery times.
    pub bound: Duration,
    /// Work in flight in killed workers: (when killed, ids), checked at the end.
    stranded: Vec<(Instant, Vec<u64>)>,
    started: Instant,
}

impl Run {
    /// A new scenario with a fresh temp dir; recovery must take less than `bound`.
    pub fn new(name: &'static str, bound: Duration) -> Run {
        let dir = tempfile::Builder::new()
            .prefix(&format!("jw-faults-{name}-"))
            .tempdir()
            .expect("tempdir");
        Run {
            name,
            dir: Some(dir),
            tracker: Tracker::start(),
            faults: 0,
            recoveries: Vec::new(),
            failures: Vec::new(),
            notes: Vec::new(),
            bound,
            stranded: Vec::new(),
            started: Instant::now(),
        }
    }

    /// The run's directory.
    pub fn path(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default()
    }

    /// Seconds since the run started, for progress lines.
    pub fn t(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Prints a progress line (also kept in the run's `run.log`, with a UTC time to
    /// line up with the workers' logs).
    pub fn say(&self, what: &str) {
        let line = format!("[faults {} +{:>6.1}s] {what}", self.name, self.t());
        eprintln!("{line}");
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("run.log"))
        {
            use std::io::Write as _;
            let _ = f.write_all(format!("{now} {line}\n").as_bytes());
        }
    }

    /// Waits until a job that started after `since` (the fault's end) is done, and records
    /// that as the fault's recovery time; more than the bound is a failure.
    pub async fn recovered(&mut self, fault: &str, since: Instant) -> Duration {
        let tracker = self.tracker.clone();
        self.recovered_when(fault, since, |t| tracker.first_done_started_after(t))
            .await
    }

    /// Like [`Run::recovered`], for replica `i` alone: it finished a job that started
    /// after `since` (a frozen replica works again, not only the others).
    pub async fn replica_recovered(
        &mut self,
        replicas: &Replicas,
        i: usize,
        fault: &str,
        since: Instant,
    ) -> Duration {
        self.recovered_when(fault, since, |t| replicas.first_done_started_after(i, t))
            .await
    }

    /// Waits until `first_done_started_after(since)` names a time, records it as the
    /// fault's recovery time; more than the bound is a failure.
    async fn recovered_when(
        &mut self,
        fault: &str,
        since: Instant,
        first_done_started_after: impl Fn(Instant) -> Option<Instant>,
    ) -> Duration {
        let deadline = since + self.bound;
        loop {
            if let Some(seen) = first_done_started_after(since) {
                let took = seen.duration_since(since);
                self.say(&format!(
                    "{fault}: work resumed {:.2}s after it ended",
                    took.as_secs_f64()
                ));
                self.recoveries.push((fault.to_string(), took));
                return took;
            }
            if Instant::now() > deadline {
                let msg = format!(
                    "{fault}: no job finished within {:?} after the fault ended",
                    self.bound
                );
                self.say(&msg);
                self.failures.push(msg);
                self.recoveries.push((fault.to_string(), self.bound));
                return self.bound;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Remembers the jobs a killed worker had in flight: at the end each must have been
    /// done again (or dead-lettered), and how long that took is reported.
    pub fn stranded(&mut self, killed_at: Instant, ids: Vec<u64>) {
        if !ids.is_empty() {
            self.stranded.push((killed_at, ids));
        }
    }

    /// Records a broken expectation (the scenario fails at the end, after the report).
    pub fn fail(&mut self, msg: String) {
        self.say(&format!("FAIL: {msg}"));
        self.failures.push(msg);
    }

    /// The longest recovery.
    pub fn max_recovery(&self) -> Option<Duration> {
        self.recoveries.iter().map(|(_, d)| *d).max()
    }

    /// Waits until every acknowledged job is handled or dead-lettered (or `within`
    /// passes), then checks the oracle, prints the report row and table, and panics
    /// with the details when anything is wrong.
    pub async fn finish(
        mut self,
        js: &jetstream::Context,
        published: Published,
        replicas: &mut Replicas,
        within: Duration,
    ) -> Verdict {
        let acked: Vec<u64> = {
            let mut v: Vec<u64> = published.acked.iter().copied().collect();
            v.sort_unstable();
            v
        };
        self.say(&format!(
            "published {} (acknowledged), {} given up, {} publishes repeated after the publisher's own retries gave up, in {:.1}s; draining",
            acked.len(),
            published.given_up.len(),
            published.retries,
            published.took.as_secs_f64()
        ));
        let deadline = Instant::now() + within;
        let drain_started = Instant::now();
        let mut letters = Vec::new();
        loop {
            let missing: Vec<u64> = acked
                .iter()
                .copied()
                .filter(|id| !self.tracker.is_done(*id))
                .collect();
            if missing.is_empty() {
                break;
            }
            if (missing.len() as u64) <= dlq_count(js).await {
                letters = dead_letters(js).await;
                let dead: HashSet<u64> = letters.iter().filter_map(|l| l.id).collect();
                if missing.iter().all(|id| dead.contains(id)) {
                    break;
                }
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let drained_in = drain_started.elapsed();
        // Read the dead letters once more, now that the drain is over.
        let letters = if letters.is_empty() && dlq_count(js).await == 0 {
            letters
        } else {
            dead_letters(js).await
        };
        for crashed in replicas.crashed() {
            self.fail(format!(
                "a worker exited on its own; its log: {}",
                crashed.display()
            ));
        }
        let verdict = Verdict::compute(&acked, &self.tracker.done_counts(), &letters);
        // Jobs a kill left in flight: their redelivery is the recovery from that kill.
        let stranded = std::mem::take(&mut self.stranded);
        let mut stranded_jobs = 0;
        for (k, (killed_at, ids)) in stranded.iter().enumerate() {
            stranded_jobs += ids.len();
            let handled: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|id| self.tracker.is_done(*id))
                .collect();
            // Jobs neither done again nor dead-lettered are reported as lost below.
            let Some(took) = self.tracker.redone_within(&handled, *killed_at) else {
                continue;
            };
            let fault = format!("kill #{}: {} jobs in flight", k + 1, ids.len());
            if took > self.bound {
                self.fail(format!(
                    "{fault}: redone only {:.1}s after the kill (bound {:?})",
                    took.as_secs_f64(),
                    self.bound
                ));
            }
            self.recoveries.push((fault, took));
        }
        if !stranded.is_empty() {
            self.notes.push(format!(
                "{stranded_jobs} jobs in flight in killed workers, all redone within {:.1}s of their kill",
                self.recoveries
                    .iter()
                    .filter(|(f, _)| f.starts_with("kill #"))
                    .map(|(_, d)| d.as_secs_f64())
                    .fold(0.0, f64::max)
            ));
        }
        self.notes.insert(
            0,
            format!(
                "done {} / dead-lettered {} ({}) / drained in {:.1}s; {} handler runs seen with attempt > 1, {} successful runs in all",
                verdict.done,
                verdict.dead_lettered,
                verdict.reasons(),
                drained_in.as_secs_f64(),
                self.tracker.redelivered_starts(),
                self.tracker.done_lines(),
            ),
        );
        if verdict.done_and_dead_lettered > 0 {
            self.notes.push(format!(
                "{} jobs both handled and dead-lettered (the success's ack was lost on the last attempt)",
                verdict.done_and_dead_lettered
            ));
        }
        if !published.given_up.is_empty() {
            self.notes.push(format!(
                "{} publishes never acknowledged (not counted)",
                published.given_up.len()
            ));
        }
        report(Row {
            scenario: self.name.to_string(),
            messages: acked.len(),
            faults: self.faults,
            lost: verdict.lost.len(),
            duplicates: verdict.duplicate_ids,
            recovery_max: self.max_recovery(),
            bound: self.bound,
            notes: self.notes.join("; "),
        });
        let mut problems = std::mem::take(&mut self.failures);
        let malformed = self.tracker.malformed();
        if !malformed.is_empty() {
            problems.push(format!(
                "{} job-log lines could not be read (the oracle cannot trust the logs), e.g. {:?}",
                malformed.len(),
                &malformed[..malformed.len().min(5)]
            ));
        }
        if !verdict.lost.is_empty() {
            let sample: Vec<u64> = verdict.lost.iter().take(20).copied().collect();
            problems.push(format!(
                "{} acknowledged jobs neither handled nor dead-lettered, e.g. {sample:?}",
                verdict.lost.len()
            ));
        }
        if !verdict.dead_letter_doubles.is_empty() {
            problems.push(format!(
                "dead-lettered more than once: {:?}",
                verdict.dead_letter_doubles
            ));
        }
        if !verdict.bad_letters.is_empty() {
            problems.push(format!(
                "dead letters with a wrong message id: {:?}",
                verdict.bad_letters
            ));
        }
        if std::env::var("JETWORKER_FAULTS_KEEP").is_ok_and(|v| v == "1") {
            if let Some(dir) = self.dir.take() {
                eprintln!("files of {} kept in {}", self.name, dir.keep().display());
            }
        }
        self.fail_with(problems, replicas);
        verdict
    }

    /// With any `problems`: keeps the run's files and panics naming them, with the tail
    /// of the last two workers' logs.
    fn fail_with(&mut self, problems: Vec<String>, replicas: &Replicas) {
        if problems.is_empty() {
            return;
        }
        let dir = self
            .dir
            .take()
            .map(|d| d.keep())
            .unwrap_or_else(|| std::env::temp_dir().join("(kept above)"));
        let mut text = format!(
            "scenario {} failed:\n  - {}\nfiles kept in {} (replica*.jobs.log: start/done lines; replica*.out.log: runtime logs)",
            self.name,
            problems.join("\n  - "),
            dir.display()
        );
        for out in replicas.outputs().iter().rev().take(2) {
            let _ = write!(
                text,
                "\n--- tail of {} ---\n{}",
                out.display(),
                tail(out, 25)
            );
        }
        panic!("{text}");
    }
}

/// What each consumer of a fan-out must end up doing with a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Handled successfully (on some attempt), never dead-lettered.
    Done,
    /// Dead-lettered exactly once, with this reason, never handled successfully.
    DeadLetter(&'static str),
}

/// What [`Run::finish_fanout`] checks.
#[derive(Debug, Clone, Copy)]
pub struct FanoutCheck<'a> {
    /// The consumers of EVENTS that each must handle every job.
    pub consumers: &'a [&'a str],
    /// What each job must end as (no entry: done).
    pub expected: &'a HashMap<u64, Expect>,
    /// The most (consumer, job) pairs that may be handled more than once.
    pub duplicate_bound: usize,
    /// Whether a worker was `kill -9`'d: then a last delivery it had received and not
    /// started is filed `abandoned` by the safety net (the server counted it), which is
    /// allowed once per pair; without kills, an `abandoned` letter whose last attempt
    /// never started is a failure.
    pub killed: bool,
}

/// What [`Run::finish_fanout`] found.
#[derive(Debug, Default)]
pub struct FanoutVerdict {
    /// (consumer, job) pairs handled as expected.
    pub done: usize,
    /// (consumer, job) pairs dead-lettered as expected.
    pub dead_lettered: usize,
    /// (consumer, job) pairs handled successfully more than once.
    pub duplicates: usize,
}

/// The server's pending and ack pending of `consumer` (`None` if it cannot be read now).
async fn pending_of(js: &jetstream::Context, consumer: &str) -> Option<(u64, usize)> {
    let read = async {
        let stream = js.get_stream("EVENTS").await.ok()?;
        let info = stream.consumer_info(consumer).await.ok()?;
        Some((info.num_pending, info.num_ack_pending))
    };
    tokio::time::timeout(Duration::from_secs(3), read)
        .await
        .ok()
        .flatten()
}

impl Run {
    /// The oracle of a fan-out: for every acknowledged job and every one of `consumers`,
    /// what `expected` says (jobs it has no entry for must be done): done at least
    /// once and never dead-lettered, or dead-lettered exactly once by that consumer with
    /// the expected reason and never done. A message that succeeded and was then filed
    /// `abandoned` by the safety net (its success's ack lost to a kill on the last
    /// attempt) is noted, not failed. Duplicates (a pair done more than once) must stay
    /// within `duplicate_bound`; every consumer's pending and ack pending must reach 0.
    /// Reports the row, and panics with the problems.
    pub async fn finish_fanout(
        mut self,
        js: &jetstream::Context,
        published: Published,
        replicas: &mut Replicas,
        check: &FanoutCheck<'_>,
        within: Duration,
    ) -> FanoutVerdict {
        let FanoutCheck {
            consumers,
            expected,
            duplicate_bound,
            killed,
        } = *check;
        let acked: Vec<u64> = {
            let mut v: Vec<u64> = published.acked.iter().copied().collect();
            v.sort_unstable();
            v
        };
        let expect = |id: u64| expected.get(&id).copied().unwrap_or(Expect::Done);
        let wanted_letters = consumers.len()
            * acked
                .iter()
                .filter(|id| matches!(expect(**id), Expect::DeadLetter(_)))
                .count();
        self.say(&format!(
            "published {} to {} consumers, {} dead letters expected; draining",
            acked.len(),
            consumers.len(),
            wanted_letters
        ));
        let deadline = Instant::now() + within;
        let drain_started = Instant::now();
        loop {
            let done = self.tracker.done_by_consumer();
            let missing: Vec<(String, u64)> = acked
                .iter()
                .filter(|id| expect(**id) == Expect::Done)
                .flat_map(|id| consumers.iter().map(move |c| (c.to_string(), *id)))
                .filter(|pair| !done.contains_key(pair))
                .collect();
            let letters = dlq_count(js).await;
            if letters >= (wanted_letters + missing.len()) as u64 {
                // Every pair not done may have been given up (a kill took its last
                // delivery): settled once each has its letter.
                let lettered: HashSet<(String, u64)> = dead_letters(js)
                    .await
                    .into_iter()
                    .filter_map(|l| Some((l.consumer, l.id?)))
                    .collect();
                if missing.iter().all(|pair| lettered.contains(pair)) {
                    break;
                }
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let drained_in = drain_started.elapsed();
        // Late copies (a doubled dead letter) would show up within this.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut settled = Vec::new();
        let settle_deadline = Instant::now() + Duration::from_secs(15);
        for c in consumers {
            let mut last = None;
            while Instant::now() < settle_deadline {
                last = pending_of(js, c).await;
                if last == Some((0, 0)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            if last != Some((0, 0)) {
                settled.push(format!(
                    "consumer {c}: (pending, ack pending) = {last:?} at the end"
                ));
            }
        }
        let mut problems = std::mem::take(&mut self.failures);
        let letters = dead_letters(js).await;
        let done = self.tracker.done_by_consumer();
        let started = self.tracker.started_by_consumer();
        // `abandoned` means the last attempt ran and never settled: never a delivery
        // that was handed back unstarted (unless a kill -9 took it unstarted).
        let mut abandoned_unstarted = 0;
        for l in letters.iter().filter(|l| l.reason == "abandoned") {
            if let Some(id) = l.id {
                if !started.contains(&(l.consumer.clone(), id, l.attempts)) {
                    abandoned_unstarted += 1;
                    if !killed {
                        problems.push(format!(
                            "job {id} dead-lettered as abandoned by {} though its last attempt ({}) never started",
                            l.consumer, l.attempts
                        ));
                    }
                }
            }
        }
        problems.extend(settled);
        let mut by_pair: HashMap<(String, u64), Vec<&Letter>> = HashMap::new();
        for l in &letters {
            if l.msg_id != jetworker::dead_letter_message_id(&l.stream, l.sequence, &l.consumer) {
                problems.push(format!(
                    "{} seq {} has Nats-Msg-Id {:?}",
                    l.original_subject, l.sequence, l.msg_id
                ));
            }
            if let Some(id) = l.id {
                by_pair.entry((l.consumer.clone(), id)).or_default().push(l);
            }
        }
        let mut verdict = FanoutVerdict::default();
        let (mut lost, mut wrong, mut done_then_abandoned) = (Vec::new(), Vec::new(), 0);
        for id in &acked {
            for c in consumers {
                let key = (c.to_string(), *id);
                let runs = done.get(&key).copied().unwrap_or(0);
                let copies = by_pair.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                if copies.len() > 1 {
                    problems.push(format!(
                        "job {id} dead-lettered {} times by {c}: {copies:?}",
                        copies.len()
                    ));
                }
                if runs > 1 {
                    verdict.duplicates += 1;
                }
                match expect(*id) {
                    Expect::Done if runs > 0 && copies.is_empty() => verdict.done += 1,
                    Expect::Done if runs > 0 && copies.iter().all(|l| l.reason == "abandoned") => {
                        verdict.done += 1;
                        done_then_abandoned += 1;
                    }
                    Expect::Done if runs > 0 => wrong.push(format!(
                        "job {id} succeeded on {c} and was dead-lettered: {copies:?}"
                    )),
                    // Its last delivery was lost with a killed worker: given up, once.
                    Expect::Done
                        if killed && copies.len() == 1 && copies[0].reason == "abandoned" =>
                    {
                        verdict.dead_lettered += 1
                    }
                    Expect::Done => lost.push((c.to_string(), *id)),
                    Expect::DeadLetter(_) if runs > 0 => {
                        wrong.push(format!("job {id} cannot succeed, yet {c} handled it"))
                    }
                    Expect::DeadLetter(reason) => match copies.first() {
                        Some(l) if l.reason == reason || l.reason == "abandoned" => {
                            verdict.dead_lettered += 1
                        }
                        Some(l) => wrong.push(format!(
                            "job {id} on {c}: dead-lettered as {}, expected {reason}",
                            l.reason
                        )),
                        None => lost.push((c.to_string(), *id)),
                    },
                }
            }
        }
        if !lost.is_empty() {
            problems.push(format!(
                "{} (consumer, job) pairs neither handled nor dead-lettered, e.g. {:?}",
                lost.len(),
                &lost[..lost.len().min(20)]
            ));
        }
        problems.extend(wrong.into_iter().take(20));
        if verdict.duplicates > duplicate_bound {
            let mut twice: Vec<&(String, u64)> = done
                .iter()
                .filter(|(_, runs)| **runs > 1)
                .map(|(pair, _)| pair)
                .collect();
            twice.sort();
            problems.push(format!(
                "{} (consumer, job) pairs handled more than once, above the bound {duplicate_bound}: {:?}",
                verdict.duplicates,
                &twice[..twice.len().min(20)]
            ));
        }
        let malformed = self.tracker.malformed();
        if !malformed.is_empty() {
            problems.push(format!(
                "{} job-log lines could not be read, e.g. {:?}",
                malformed.len(),
                &malformed[..malformed.len().min(5)]
            ));
        }
        for crashed in replicas.crashed() {
            problems.push(format!(
                "a worker exited on its own; its log: {}",
                crashed.display()
            ));
        }
        self.notes.insert(
            0,
            format!(
                "{} consumers: done {} / dead-lettered {} (pairs) / drained in {:.1}s; duplicates {} (bound {duplicate_bound}); {done_then_abandoned} succeeded then filed abandoned; {abandoned_unstarted} abandoned whose last attempt never started",
                consumers.len(),
                verdict.done,
                verdict.dead_lettered,
                drained_in.as_secs_f64(),
                verdict.duplicates,
            ),
        );
        report(Row {
            scenario: self.name.to_string(),
            messages: acked.len() * consumers.len(),
            faults: self.faults,
            lost: lost.len(),
            duplicates: verdict.duplicates,
            recovery_max: self.max_recovery(),
            bound: self.bound,
            notes: self.notes.join("; "),
        });
        self.fail_with(problems, replicas);
        verdict
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What the oracle found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Acknowledged jobs with a `done` line.
    pub done: usize,
    /// Acknowledged jobs with a dead-letter copy.
    pub dead_lettered: usize,
    /// Acknowledged jobs neither done nor dead-lettered.
    pub lost: Vec<u64>,
    /// Ids handled successfully more than once.
    pub duplicate_ids: usize,
    /// (stream, sequence, consumer) with more than one dead-letter copy.
    pub dead_letter_doubles: Vec<(String, u64, String, usize)>,
    /// Dead letters whose `Nats-Msg-Id` is not `jetworker-dl.<stream>.<seq>.<consumer>`.
    pub bad_letters: Vec<String>,
    /// Dead letters by job id.
    pub letters: BTreeMap<u64, Letter>,
    /// Acknowledged jobs with a `done` line and a dead-letter copy (allowed: a success
    /// whose ack was lost on the last attempt is dead-lettered by the safety net).
    pub done_and_dead_lettered: usize,
}

impl Verdict {
    fn compute(acked: &[u64], done: &HashMap<u64, u32>, letters: &[Letter]) -> Verdict {
        let mut v = Verdict::default();
        let mut copies: BTreeMap<(String, u64, String), usize> = BTreeMap::new();
        for l in letters {
            *copies
                .entry((l.stream.clone(), l.sequence, l.consumer.clone()))
                .or_default() += 1;
            if l.msg_id != jetworker::dead_letter_message_id(&l.stream, l.sequence, &l.consumer) {
                v.bad_letters.push(format!(
                    "{} seq {} has Nats-Msg-Id {:?}",
                    l.original_subject, l.sequence, l.msg_id
                ));
            }
            if let Some(id) = l.id {
                v.letters.insert(id, l.clone());
            }
        }
        v.dead_letter_doubles = copies
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|((s, q, c), n)| (s, q, c, n))
            .collect();
        for id in acked {
            if done.contains_key(id) && v.letters.contains_key(id) {
                v.done_and_dead_lettered += 1;
            }
            if done.contains_key(id) {
                v.done += 1;
            } else if v.letters.contains_key(id) {
                v.dead_lettered += 1;
            } else {
                v.lost.push(*id);
            }
        }
        v.duplicate_ids = done.values().filter(|n| **n > 1).count();
        v
    }

    /// Dead letters per reason, e.g. `abandoned: 12`, or `none`.
    pub fn reasons(&self) -> String {
        let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
        for l in self.letters.values() {
            *by_reason.entry(l.reason.as_str()).or_default() += 1;
        }
        if by_reason.is_empty() {
            return "none".to_string();
        }
        by_reason
            .iter()
            .map(|(r, n)| format!("{r}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Row {
    scenario: String,
    messages: usize,
    faults: u32,
    lost: usize,
    duplicates: usize,
    recovery_max: Option<Duration>,
    bound: Duration,
    notes: String,
}

fn rows() -> &'static Mutex<Vec<Row>> {
    static ROWS: std::sync::OnceLock<Mutex<Vec<Row>>> = std::sync::OnceLock::new();
    ROWS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Adds `row` and prints the table of every scenario finished so far in this process
/// (the last scenario to finish prints the complete table).
pub fn report(row: Row) {
    let mut all = lock(rows());
    all.push(row);
    all.sort_by(|a, b| a.scenario.cmp(&b.scenario));
    let mut out = format!(
        "\n=== jetworker fault injection ({} size, nats-server {}): {} scenario(s) finished ===\n",
        if full() { "full" } else { "small" },
        jetworker::testing::server::server_version().unwrap_or_else(|e| e.to_string()),
        all.len()
    );
    let _ = writeln!(
        out,
        "{:<24} | {:>8} | {:>15} | {:>17} | {:>10} | {:>22}",
        "scenario",
        "messages",
        "faults injected",
        "lost (must be 0)",
        "duplicates",
        "recovery time (max)"
    );
    let _ = writeln!(out, "{}", "-".repeat(24 + 8 + 15 + 17 + 10 + 22 + 15));
    for r in all.iter() {
        let recovery = match r.recovery_max {
            Some(d) => format!("{:.2}s (< {}s)", d.as_secs_f64(), r.bound.as_secs()),
            None => "n/a".to_string(),
        };
        let _ = writeln!(
            out,
            "{:<24} | {:>8} | {:>15} | {:>17} | {:>10} | {:>22}",
            r.scenario, r.messages, r.faults, r.lost, r.duplicates, recovery
        );
    }
    let _ = writeln!(out, "notes:");
    for r in all.iter() {
        let _ = writeln!(out, "  {}: {}", r.scenario, r.notes);
    }
    eprintln!("{out}");
}

/// A job that succeeds after `work_ms` of work.
pub fn ok_job(id: u64, work_ms: u64) -> Job {
    Job {
        sleep_ms: work_ms,
        ..Job::ok(id)
    }
}
