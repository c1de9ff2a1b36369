//! Support for jetworker's integration tests, benchmarks and examples: a scripted handler
//! whose behaviour each message chooses, and a probe recording what happened.
//!
//! The tests themselves live in `tests/`, the runnable examples in `examples/`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jetworker::{Context, Event, HandlerError};

/// The README's code compiles (`cargo test --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
use serde::{Deserialize, Serialize};

/// What the scripted handler does with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Succeed.
    Ok,
    /// Fail transiently while `attempt <= until`, then succeed.
    Fail,
    /// Fail permanently.
    Permanent,
    /// Panic while `attempt <= until`, then succeed.
    Panic,
    /// Sleep `sleep_ms` while `attempt <= until`, then succeed at once.
    Sleep,
}

/// A test job: its id and what the handler should do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// Unique id.
    pub id: u64,
    /// Behaviour.
    pub mode: Mode,
    /// Attempts that misbehave (see [`Mode`]).
    pub until: u64,
    /// For [`Mode::Sleep`], and for every mode as work time before succeeding.
    pub sleep_ms: u64,
}

impl Job {
    /// A job that succeeds at once.
    pub fn ok(id: u64) -> Job {
        Job {
            id,
            mode: Mode::Ok,
            until: 0,
            sleep_ms: 0,
        }
    }

    /// A job whose handler fails for good at once.
    pub fn permanent(id: u64) -> Job {
        Job {
            id,
            mode: Mode::Permanent,
            until: 0,
            sleep_ms: 0,
        }
    }
}

/// What the handler saw: attempts per job id (with when), successes, concurrency.
#[derive(Debug, Default)]
pub struct Probe {
    attempts: Mutex<HashMap<u64, Vec<(u64, Instant)>>>,
    succeeded: Mutex<HashMap<u64, u64>>,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
}

impl Probe {
    /// (attempt number, when) for each call with this job id.
    pub fn attempts(&self, id: u64) -> Vec<(u64, Instant)> {
        self.attempts
            .lock()
            .map(|m| m.get(&id).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Number of distinct ids that succeeded at least once.
    pub fn succeeded_ids(&self) -> usize {
        self.succeeded.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Total successful calls (duplicates included).
    pub fn successes(&self) -> u64 {
        self.succeeded.lock().map(|m| m.values().sum()).unwrap_or(0)
    }

    /// Successful calls for one id.
    pub fn successes_of(&self, id: u64) -> u64 {
        self.succeeded
            .lock()
            .map(|m| m.get(&id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The most handler calls ever running at once.
    pub fn peak_in_flight(&self) -> usize {
        self.peak_in_flight.load(Ordering::SeqCst)
    }
}

struct InFlight<'a>(&'a Probe);

impl<'a> InFlight<'a> {
    fn enter(probe: &'a Probe) -> Self {
        let now = probe.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        probe.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(probe)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The scripted handler: does what the job says, recording it in the probe (the state).
pub async fn scripted(job: Event<Job>, ctx: Context<Arc<Probe>>) -> Result<(), HandlerError> {
    let probe = ctx.state().clone();
    let attempt = ctx.attempt();
    if let Ok(mut m) = probe.attempts.lock() {
        m.entry(job.id).or_default().push((attempt, Instant::now()));
    }
    let _running = InFlight::enter(&probe);
    let misbehave = attempt <= job.until;
    match job.mode {
        Mode::Ok => {}
        Mode::Fail if misbehave => {
            return Err(format!("job {} failed on attempt {attempt}", job.id).into())
        }
        Mode::Permanent => {
            return Err(HandlerError::permanent(format!(
                "job {} is invalid",
                job.id
            )))
        }
        Mode::Panic if misbehave => panic!("job {} panicked on attempt {attempt}", job.id),
        Mode::Sleep if misbehave => tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await,
        Mode::Fail | Mode::Panic | Mode::Sleep => {}
    }
    if job.mode != Mode::Sleep && job.sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
    }
    if let Ok(mut m) = probe.succeeded.lock() {
        *m.entry(job.id).or_default() += 1;
    }
    Ok(())
}

/// Where the [`recorded`] handler writes its log: `<RECORD_PREFIX>.<job id>`, one message
/// per event; a test declares a stream on `record.>` and reads it in stream order.
pub const RECORD_PREFIX: &str = "record";

/// The [`scripted`] handler, with every start and end written (PubAck awaited) to a
/// stream before it goes on, as `start <subject> <seq> <attempt> <pid>` and `end
/// <subject> <seq> <attempt> <ok|retry|final> <pid>` (`final`: the message is
/// dead-lettered; `pid`: the worker process). The stream orders the events of every
/// process that runs it: what order-per-key tests check.
pub async fn recorded(job: Event<Job>, ctx: Context<Arc<Probe>>) -> Result<(), HandlerError> {
    let (subject, seq, attempt) = (
        ctx.subject().to_owned(),
        ctx.stream_sequence(),
        ctx.attempt(),
    );
    let js = ctx.jetstream().ok_or("no JetStream context")?.clone();
    let subject_of_record = format!("{RECORD_PREFIX}.{}", job.id);
    let record = |text: String| {
        let (js, subject_of_record) = (js.clone(), subject_of_record.clone());
        async move {
            js.publish(subject_of_record, text.into())
                .await
                .map_err(HandlerError::transient)?
                .await
                .map_err(HandlerError::transient)?;
            Ok::<(), HandlerError>(())
        }
    };
    let pid = std::process::id();
    record(format!("start {subject} {seq} {attempt} {pid}")).await?;
    let last = ctx.is_last_attempt();
    let result = scripted(job, ctx).await;
    let end = match &result {
        Ok(()) => "ok",
        Err(e) if last || e.kind() == jetworker::HandlerErrorKind::Permanent => "final",
        Err(_) => "retry",
    };
    record(format!("end {subject} {seq} {attempt} {end} {pid}")).await?;
    result
}
