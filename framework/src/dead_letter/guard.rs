//! Whether a dead-letter stream keeps the copies it acknowledges: the rules (shared by
//! `check`/`provision`, which read the config, and the running worker, which reads the
//! server), and the run-time guard that applies them to the live stream.
//!
//! A PubAck is the only proof a copy is stored before the original is termed, but some
//! streams acknowledge and then drop (interest retention nobody reads), refuse once full
//! (discard new with limits), or cannot hold a copy of the largest original (a
//! `max_msg_size`). `check` and `provision` refuse such a config ([`keeping_problems`]).
//! A stream can still be edited (or deleted, or lose the subject) behind a running
//! worker: each consumer's [`StreamGuard`] reads its dead-letter stream's info at start,
//! every [`RECHECK`], after a copy's PubAck and after a failed publish (one read covers
//! every copy that came before it began), and applies the same rules. While they
//! say the stream would drop copies:
//!
//! - the worker logs it (error: consumer, stream, key and reason; info once it is fit
//!   again), `/readyz` answers 503 `the dead-letter stream would drop copies` with the
//!   reason, and `jetworker_dead_letter_stream_unfit{consumer}` is 1;
//! - no copy is published (a dropped copy's `Nats-Msg-Id` would stay in the stream's
//!   duplicate window and make the next publish of that copy look stored), and no
//!   original is termed: the dead-letter path fails as when a publish fails (the
//!   original is retried, or held on its last delivery for one ack wait and then handed
//!   to the safety net, which applies the same guard);
//! - a PubAck is believed when a read of the stream's info begun after it finds the
//!   same stream (same creation time) still fit: one request (the stream's info by
//!   name), shared by every copy acknowledged before it began. When that read cannot
//!   tell (it failed, the stream was made again), and for a `duplicate` PubAck (the copy
//!   it deduplicated against may have been dropped), the letter is read back instead
//!   (a direct get when the stream allows them, else a stream get). A letter missing
//!   from a fit stream that removes acked messages (interest or work-queue retention,
//!   which the rules accept only with a consumer) may have been read and acked by that
//!   consumer already: such a PubAck is believed unless it says `duplicate`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::outcome::Reason;
use crate::safety_net::safety_net_consumer_name;

/// Room a dead-letter copy needs beyond the original message: the headers jetworker adds
/// (original subject up to 4 KiB, error up to 1 KiB, stream, sequence, consumer, attempts,
/// reason, time, message id).
pub const DEAD_LETTER_HEADROOM: i64 = 6 * 1024;

/// How often a running worker reads its dead-letter streams' info when no dead letter
/// made it do so sooner.
pub const RECHECK: Duration = Duration::from_secs(30);

/// What a dead-letter stream is like as far as keeping copies goes, read from the config
/// (`check`, `provision`) or from the server (a running worker).
#[derive(Debug, Clone)]
pub struct KeepingFacts<'a> {
    /// The dead-letter stream.
    pub stream: &'a str,
    /// `retention = "interest"`.
    pub interest_retention: bool,
    /// Some consumer reads the stream (the config's, or the server's count).
    pub read: bool,
    /// `discard = "new"`.
    pub discard_new: bool,
    /// A count or size limit (`max_msgs`, `max_bytes`).
    pub limited: bool,
    /// The stream's `max_msg_size`, when it has one.
    pub max_msg_size: Option<i64>,
    /// The stream the originals come from.
    pub source_stream: &'a str,
    /// Its `max_msg_size`, when it has one.
    pub source_max_msg_size: Option<i64>,
}

/// One way a dead-letter stream would not keep what it acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepingProblem {
    /// Interest retention and nobody reads it: every copy is acknowledged and dropped.
    InterestUnread,
    /// Discard new with a count or size limit: once full, every copy is refused.
    DiscardNewLimited,
    /// A `max_msg_size` below the largest original plus the dead-letter headers.
    TooSmallForSource {
        /// The dead-letter stream's `max_msg_size`.
        max_msg_size: i64,
        /// The source stream's.
        source_max_msg_size: i64,
    },
    /// A `max_msg_size`, while the source stream's messages are as large as the server
    /// allows.
    SmallerThanUnlimitedSource {
        /// The dead-letter stream's `max_msg_size`.
        max_msg_size: i64,
    },
}

impl KeepingProblem {
    /// The stream setting the problem is about (`retention`, `discard`, `max_msg_size`).
    pub fn field(self) -> &'static str {
        match self {
            KeepingProblem::InterestUnread => "retention",
            KeepingProblem::DiscardNewLimited => "discard",
            KeepingProblem::TooSmallForSource { .. }
            | KeepingProblem::SmallerThanUnlimitedSource { .. } => "max_msg_size",
        }
    }

    /// What is wrong and what to do, for dead letters to `subject` in `facts.stream`;
    /// `at` names where the stream is declared (`streams[1]`) when it comes from a
    /// config.
    pub fn describe(self, subject: &str, facts: &KeepingFacts<'_>, at: Option<&str>) -> String {
        let name = facts.stream;
        let source = facts.source_stream;
        let key = at
            .map(|at| format!(" ({at}.{})", self.field()))
            .unwrap_or_default();
        match self {
            KeepingProblem::InterestUnread => format!("{subject:?} goes to stream {name:?}, which has retention = \"interest\"{key} and no consumer reading it: the server would acknowledge every dead letter and keep none; use retention = \"limits\" for a dead-letter stream"),
            KeepingProblem::DiscardNewLimited => format!("{subject:?} goes to stream {name:?}, which has discard = \"new\" with max_msgs / max_bytes{key}: once full it refuses every dead letter and the failing messages are held and retried without end; use discard = \"old\", or no count/size limits, for a dead-letter stream"),
            KeepingProblem::TooSmallForSource { max_msg_size, source_max_msg_size } => format!("{subject:?} goes to stream {name:?}, whose max_msg_size {max_msg_size}{key} cannot hold a copy of the largest message of stream {source:?} (max_msg_size {source_max_msg_size}, plus {DEAD_LETTER_HEADROOM} bytes of dead-letter headers): raise it to at least {}, or remove it", source_max_msg_size + DEAD_LETTER_HEADROOM),
            KeepingProblem::SmallerThanUnlimitedSource { max_msg_size } => format!("{subject:?} goes to stream {name:?}, whose max_msg_size {max_msg_size}{key} may not hold a copy of a message of stream {source:?}, which has no max_msg_size (its messages are as large as the server allows): remove it, or give stream {source:?} a max_msg_size at least {DEAD_LETTER_HEADROOM} bytes below it"),
        }
    }
}

/// Every way the dead-letter stream `facts` describes would not keep the copies it
/// acknowledges (empty when it keeps them): the one rule set of `check`, `provision`
/// and the running worker.
pub fn keeping_problems(facts: &KeepingFacts<'_>) -> Vec<KeepingProblem> {
    let mut problems = Vec::new();
    if facts.interest_retention && !facts.read {
        problems.push(KeepingProblem::InterestUnread);
    }
    if facts.discard_new && facts.limited {
        problems.push(KeepingProblem::DiscardNewLimited);
    }
    if let Some(max_msg_size) = facts.max_msg_size {
        match facts.source_max_msg_size {
            Some(source) if max_msg_size >= source + DEAD_LETTER_HEADROOM => {}
            Some(source_max_msg_size) => problems.push(KeepingProblem::TooSmallForSource {
                max_msg_size,
                source_max_msg_size,
            }),
            None => problems.push(KeepingProblem::SmallerThanUnlimitedSource { max_msg_size }),
        }
    }
    problems
}

/// A server-side limit as an option: the server writes "none" as 0 or -1.
fn limit(value: i64) -> Option<i64> {
    (value > 0).then_some(value)
}

/// What the guard last found.
#[derive(Debug, Default)]
struct Verdict {
    /// When the read that found it began (`None`: never read yet).
    checked: Option<Instant>,
    /// What it found.
    found: Found,
}

/// What one read of the dead-letter stream found.
#[derive(Debug, Default)]
struct Found {
    /// Why the stream would drop copies, or `None` when it keeps them (or is not known
    /// yet).
    problem: Option<String>,
    /// The stream that captured the dead-letter subject at that read.
    stream: Option<String>,
    /// Whether that stream removes a message once its consumers have acked it
    /// (interest or work-queue retention): a letter read and acked by the app's own
    /// consumer of dead letters is gone without being dropped.
    removed_when_acked: bool,
    /// Whether that stream answers direct gets (`allow_direct`).
    direct: bool,
    /// When that stream was created: another time means it was deleted and made again.
    created: Option<time::OffsetDateTime>,
    /// The source stream's max_msg_size (at the last full read).
    source_max: Option<i64>,
}

impl Found {
    /// The stream is gone, or no stream captures the subject: `problem` says which.
    fn missing(problem: String) -> Found {
        Found {
            problem: Some(problem),
            ..Found::default()
        }
    }
}

/// What a read of the stream after a PubAck says of the copy it acknowledged.
pub(crate) enum Proof {
    /// The stream that acknowledged it keeps copies (as the server has it now, and it
    /// is the same stream as before).
    Kept,
    /// The stream would drop copies: why.
    WouldDrop(String),
    /// Not known (the read failed, or the stream was made again): read the letter back.
    Unknown,
}

/// Why a last delivery was handed to the safety net, noted for the safety net's letter.
#[derive(Debug, Clone)]
pub struct HandOff {
    /// Why the consumer gave up on it.
    pub reason: Reason,
    /// The handler's last error, and why the copy could not be stored.
    pub error: String,
}

/// Hand-off notes kept at most this long (the safety net normally files the letter
/// within seconds; it retries for about a day).
const HAND_OFF_KEPT: Duration = Duration::from_secs(26 * 3600);
/// At most this many hand-off notes per consumer; the oldest go first (their letters
/// then say `abandoned`, with the generic error).
const HAND_OFF_MAX: usize = 10_000;

/// The run-time check of one consumer's dead-letter stream (see the module docs),
/// shared by the consumer, its safety-net durable and the ops endpoint.
#[derive(Debug)]
pub struct StreamGuard {
    /// The consumer whose dead letters it guards.
    consumer: String,
    /// Where its config says they go (`consumers[i].dead_letter_subject`).
    key: String,
    /// The dead-letter subject.
    subject: String,
    /// The stream the originals come from.
    source_stream: String,
    verdict: Mutex<Verdict>,
    /// One read at a time; those waiting use its result when it began after their need.
    reading: tokio::sync::Mutex<()>,
    /// Why last deliveries were handed to the safety net, by stream sequence.
    hand_offs: Mutex<HashMap<u64, (Instant, HandOff)>>,
    /// When a copy was last stored (by the consumer or its safety net).
    stored_at: Mutex<Option<Instant>>,
}

impl StreamGuard {
    /// The guard of the dead letters `consumer` (configured at `key`) sends to
    /// `subject`, its originals coming from `source_stream`.
    pub fn new(consumer: &str, key: &str, subject: &str, source_stream: &str) -> Self {
        StreamGuard {
            consumer: consumer.to_string(),
            key: key.to_string(),
            subject: subject.to_string(),
            source_stream: source_stream.to_string(),
            verdict: Mutex::new(Verdict::default()),
            reading: tokio::sync::Mutex::new(()),
            hand_offs: Mutex::new(HashMap::new()),
            stored_at: Mutex::new(None),
        }
    }

    /// A copy was stored (its PubAck relied on).
    pub(crate) fn stored(&self) {
        if let Ok(mut at) = self.stored_at.lock() {
            *at = Some(Instant::now());
        }
    }

    /// Whether a copy was stored after `at`: a failed copy before it no longer says
    /// the dead letters cannot be stored.
    pub(crate) fn stored_since(&self, at: Instant) -> bool {
        self.stored_at
            .lock()
            .ok()
            .and_then(|s| *s)
            .is_some_and(|stored| stored > at)
    }

    /// The configured consumer whose dead letters it guards.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Why the dead-letter stream would drop copies, as last read; `None` while it keeps
    /// them (or before the first read).
    pub fn problem(&self) -> Option<String> {
        self.verdict
            .lock()
            .ok()
            .and_then(|v| v.found.problem.clone())
    }

    /// The verdict of a read that began at or after `since`, reading the stream now
    /// when there is none. `Err` names why copies might not be kept.
    pub(crate) async fn keeping_since(
        &self,
        js: &jetstream::Context,
        since: Instant,
    ) -> Result<(), String> {
        let _reading = self.reading.lock().await;
        let fresh = self
            .verdict
            .lock()
            .ok()
            .and_then(|v| v.checked)
            .is_some_and(|at| at >= since);
        if !fresh {
            self.read(js).await;
        }
        match self.problem() {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// Whether a PubAck from `stream` is from the stream the last read found capturing
    /// the subject.
    pub(crate) fn is_expected_stream(&self, stream: &str) -> bool {
        self.verdict
            .lock()
            .ok()
            .and_then(|v| v.found.stream.clone())
            .is_none_or(|known| known == stream)
    }

    /// Whether the stream, as last read, removes letters its consumers have acked, so
    /// that a letter missing right after its PubAck may have been read, not dropped.
    pub(crate) fn removes_acked(&self) -> bool {
        self.verdict
            .lock()
            .ok()
            .is_some_and(|v| v.found.removed_when_acked)
    }

    /// Whether the stream, as last read, answers direct gets: a letter is then read back
    /// by one without going through the JetStream API.
    pub(crate) fn direct_get(&self) -> bool {
        self.verdict.lock().ok().is_some_and(|v| v.found.direct)
    }

    /// Whether the copy `stream` acknowledged (its PubAck received at `acked`) is kept:
    /// the verdict of a read begun after `acked`, reading the stream's info now when
    /// there is none. That read is one request (the stream's info by name; the subject's
    /// capture is what the PubAck proved, the source stream's size limit is from the last
    /// full read), and one read answers every copy acknowledged before it began.
    pub(crate) async fn proves_kept(
        &self,
        js: &jetstream::Context,
        acked: Instant,
        stream: &str,
    ) -> Proof {
        let _reading = self.reading.lock().await;
        // When this stream was created, as last read (`None`: another stream, or none).
        let (fresh, created, source_max) = match self.verdict.lock() {
            Ok(v) => (
                v.checked.is_some_and(|at| at >= acked),
                v.found
                    .created
                    .filter(|_| v.found.stream.as_deref() == Some(stream)),
                v.found.source_max,
            ),
            Err(_) => return Proof::Unknown,
        };
        // Boxed: one read serves many copies, and its future would otherwise make every
        // dead letter's larger.
        match (fresh, created) {
            (true, _) => {}
            (false, None) => Box::pin(self.read(js)).await,
            (false, Some(created)) => {
                let began = Instant::now();
                let Ok(info) = Box::pin(js.get_stream(stream)).await else {
                    return Proof::Unknown;
                };
                let info = info.cached_info();
                if info.created != created {
                    // Made again since: the copy may be in the stream that was.
                    Box::pin(self.read(js)).await;
                    return Proof::Unknown;
                }
                let found = self.judge(stream.to_string(), info, source_max);
                self.record(began, Ok(found));
            }
        }
        let Ok(v) = self.verdict.lock() else {
            return Proof::Unknown;
        };
        match (&v.found.problem, v.checked) {
            (Some(problem), _) => Proof::WouldDrop(problem.clone()),
            (None, Some(at)) if at >= acked && v.found.stream.as_deref() == Some(stream) => {
                Proof::Kept
            }
            _ => Proof::Unknown,
        }
    }

    /// Reads the stream's info now and records (and logs a change of) the verdict. A
    /// read that fails for another reason than "no such stream" (a timeout, the
    /// connection down) keeps the previous verdict.
    async fn read(&self, js: &jetstream::Context) {
        let began = Instant::now();
        let found = self.find(js).await;
        self.record(began, found);
    }

    /// Records what a read begun at `began` found (and logs a change of the verdict).
    fn record(&self, began: Instant, found: Result<Found, String>) {
        let Ok(mut verdict) = self.verdict.lock() else {
            return;
        };
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(consumer = %self.consumer, dead_letter_subject = %self.subject, error = %e, "dead-letter stream not read; the last verdict stands");
                return;
            }
        };
        let (problem, stream) = (&found.problem, found.stream.as_deref().unwrap_or(""));
        match (&verdict.found.problem, problem) {
            (None, Some(reason)) => tracing::error!(
                consumer = %self.consumer, stream, key = %self.key, reason = %reason,
                "the dead-letter stream would drop copies: no original is termed until it keeps them"
            ),
            (Some(_), None) => tracing::info!(
                consumer = %self.consumer, stream, key = %self.key,
                "the dead-letter stream keeps copies again"
            ),
            (Some(old), Some(reason)) if old != reason => tracing::error!(
                consumer = %self.consumer, stream, key = %self.key, reason = %reason,
                "the dead-letter stream would drop copies: no original is termed until it keeps them"
            ),
            _ => {}
        }
        let source_max = found.source_max.or(verdict.found.source_max);
        *verdict = Verdict {
            checked: Some(began),
            found: Found {
                source_max,
                ..found
            },
        };
    }

    /// The stream capturing the subject and what is wrong with it, if anything.
    async fn find(&self, js: &jetstream::Context) -> Result<Found, String> {
        use jetstream::context::{GetStreamByNameErrorKind, GetStreamErrorKind};
        let subject = &self.subject;
        let name = match js.stream_by_subject(subject.as_str()).await {
            Ok(name) => name,
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                return Ok(Found::missing(format!("{subject:?} is captured by no stream (the dead-letter stream was deleted, or the subject removed from its subjects): copies would not be stored; restore the stream (`jetworker-cli provision`)")));
            }
            Err(e) => return Err(e.to_string()),
        };
        let info = match js.get_stream(&name).await {
            Ok(stream) => stream.cached_info().clone(),
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    return Ok(Found::missing(format!("{subject:?} goes to stream {name:?}, which is gone: copies would not be stored; restore it (`jetworker-cli provision`)")));
                }
                _ => return Err(e.to_string()),
            },
        };
        let source_max = js
            .get_stream(&self.source_stream)
            .await
            .map_err(|e| e.to_string())?
            .cached_info()
            .config
            .max_message_size;
        Ok(self.judge(name, &info, Some(i64::from(source_max))))
    }

    /// What the rules say of dead-letter stream `name` with `info`, its originals'
    /// stream allowing messages up to `source_max`.
    fn judge(
        &self,
        name: String,
        info: &jetstream::stream::Info,
        source_max: Option<i64>,
    ) -> Found {
        let config = &info.config;
        let facts = KeepingFacts {
            stream: &name,
            interest_retention: config.retention == jetstream::stream::RetentionPolicy::Interest,
            read: info.state.consumer_count > 0,
            discard_new: config.discard == jetstream::stream::DiscardPolicy::New,
            limited: limit(config.max_messages).is_some() || limit(config.max_bytes).is_some(),
            max_msg_size: limit(i64::from(config.max_message_size)),
            source_stream: &self.source_stream,
            source_max_msg_size: source_max.and_then(limit),
        };
        let problem = keeping_problems(&facts)
            .into_iter()
            .map(|p| p.describe(&self.subject, &facts, None))
            .collect::<Vec<_>>();
        let problem = (!problem.is_empty()).then(|| problem.join("; "));
        Found {
            problem,
            removed_when_acked: config.retention != jetstream::stream::RetentionPolicy::Limits,
            direct: config.allow_direct,
            created: Some(info.created),
            source_max,
            stream: Some(name),
        }
    }

    /// Notes why the last delivery of `sequence` is handed to the safety net, for the
    /// letter the safety net files (see [`StreamGuard::hand_off`]).
    pub(crate) fn note_hand_off(&self, sequence: u64, hand_off: HandOff) {
        let Ok(mut notes) = self.hand_offs.lock() else {
            return;
        };
        notes.retain(|_, (at, _)| at.elapsed() < HAND_OFF_KEPT);
        if notes.len() >= HAND_OFF_MAX {
            if let Some(oldest) = notes.iter().min_by_key(|(_, (at, _))| *at).map(|(s, _)| *s) {
                notes.remove(&oldest);
            }
        }
        notes.insert(sequence, (Instant::now(), hand_off));
    }

    /// Why the last delivery of `sequence` was handed to the safety net, when this
    /// process handed it over. Kept until [`StreamGuard::forget_hand_off`] (the letter is
    /// stored), so a retried letter says the same.
    pub(crate) fn hand_off(&self, sequence: u64) -> Option<HandOff> {
        let notes = self.hand_offs.lock().ok()?;
        notes.get(&sequence).map(|(_, h)| h.clone())
    }

    /// The letter of `sequence` is stored: its note is no longer needed.
    pub(crate) fn forget_hand_off(&self, sequence: u64) {
        if let Ok(mut notes) = self.hand_offs.lock() {
            notes.remove(&sequence);
        }
    }

    /// Reads the stream now and then every [`RECHECK`] until `stop`.
    async fn watch(self: Arc<Self>, js: jetstream::Context, stop: CancellationToken) {
        loop {
            let _ = self.keeping_since(&js, Instant::now()).await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}

/// Every consumer's [`StreamGuard`], by consumer name; a safety-net durable shares the
/// guard of the consumer it watches.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterGuards(Arc<HashMap<String, Arc<StreamGuard>>>);

impl DeadLetterGuards {
    /// The guards of `config`'s consumers (and their safety-net durables).
    pub fn for_config(config: &Config) -> Self {
        let mut guards = HashMap::new();
        for (i, c) in config.consumers.iter().enumerate() {
            let guard = Arc::new(StreamGuard::new(
                &c.name,
                &format!("consumers[{i}].dead_letter_subject"),
                &c.dead_letter_subject,
                &c.stream,
            ));
            guards.insert(safety_net_consumer_name(&c.stream, &c.name), guard.clone());
            guards.insert(c.name.clone(), guard);
        }
        DeadLetterGuards(Arc::new(guards))
    }

    /// The guard of consumer `name` (a configured consumer or a safety-net durable).
    pub fn get(&self, name: &str) -> Option<Arc<StreamGuard>> {
        self.0.get(name).cloned()
    }

    /// Reads every configured consumer's dead-letter stream now and every [`RECHECK`]
    /// until `stop` (one task per guard).
    pub fn watch(
        &self,
        js: &jetstream::Context,
        tasks: &tokio_util::task::TaskTracker,
        stop: &CancellationToken,
    ) {
        let mut seen: Vec<*const StreamGuard> = Vec::new();
        for guard in self.0.values() {
            if seen.contains(&Arc::as_ptr(guard)) {
                continue;
            }
            seen.push(Arc::as_ptr(guard));
            tasks.spawn(guard.clone().watch(js.clone(), stop.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> KeepingFacts<'static> {
        KeepingFacts {
            stream: "DLQ",
            interest_retention: false,
            read: false,
            discard_new: false,
            limited: false,
            max_msg_size: None,
            source_stream: "EVENTS",
            source_max_msg_size: None,
        }
    }

    #[test]
    fn the_rules_name_each_way_copies_would_be_dropped() {
        assert!(keeping_problems(&facts()).is_empty());
        let interest = KeepingFacts {
            interest_retention: true,
            ..facts()
        };
        assert_eq!(
            keeping_problems(&interest),
            [KeepingProblem::InterestUnread]
        );
        let read = KeepingFacts {
            read: true,
            ..interest.clone()
        };
        assert!(keeping_problems(&read).is_empty());
        let full = KeepingFacts {
            discard_new: true,
            limited: true,
            ..facts()
        };
        assert_eq!(keeping_problems(&full), [KeepingProblem::DiscardNewLimited]);
        let small = KeepingFacts {
            max_msg_size: Some(8192),
            source_max_msg_size: Some(4096),
            ..facts()
        };
        let problems = keeping_problems(&small);
        assert_eq!(
            problems,
            [KeepingProblem::TooSmallForSource {
                max_msg_size: 8192,
                source_max_msg_size: 4096
            }]
        );
        let text = problems[0].describe("dlq.x", &small, None);
        assert!(text.contains("max_msg_size 8192 cannot hold"), "{text}");
        let text = problems[0].describe("dlq.x", &small, Some("streams[1]"));
        assert!(text.contains("(streams[1].max_msg_size)"), "{text}");
        let roomy = KeepingFacts {
            max_msg_size: Some(4096 + DEAD_LETTER_HEADROOM),
            ..small
        };
        assert!(keeping_problems(&roomy).is_empty());
        let unlimited_source = KeepingFacts {
            max_msg_size: Some(1 << 20),
            ..facts()
        };
        assert_eq!(
            keeping_problems(&unlimited_source),
            [KeepingProblem::SmallerThanUnlimitedSource {
                max_msg_size: 1 << 20
            }]
        );
    }

    #[test]
    fn hand_off_notes_are_kept_until_the_letter_is_stored() {
        let guard = StreamGuard::new(
            "jobs",
            "consumers[0].dead_letter_subject",
            "dlq.jobs",
            "JOBS",
        );
        assert!(guard.hand_off(7).is_none());
        guard.note_hand_off(
            7,
            HandOff {
                reason: Reason::Permanent,
                error: "bad order".into(),
            },
        );
        let note = guard.hand_off(7).expect("noted");
        assert_eq!(note.reason, Reason::Permanent);
        assert!(guard.hand_off(7).is_some(), "read again on a retry");
        guard.forget_hand_off(7);
        assert!(guard.hand_off(7).is_none());
        for seq in 0..(HAND_OFF_MAX as u64 + 5) {
            guard.note_hand_off(
                seq,
                HandOff {
                    reason: Reason::Exhausted,
                    error: String::new(),
                },
            );
        }
        assert_eq!(guard.hand_offs.lock().expect("lock").len(), HAND_OFF_MAX);
    }
}
