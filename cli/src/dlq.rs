//! Dead letters as an operator handles them: `dlq list`, `show`, `replay` and `purge`.
//!
//! # Where dead letters are
//! In the streams of the config that capture some consumer's `dead_letter_subject`
//! ([`dead_letter_streams`]), on those subjects only: anything else such a stream holds is
//! never listed, replayed or purged.
//!
//! # Reading
//! One ephemeral ordered consumer per dead-letter subject, filtered by that subject and,
//! with `--since`, started at that time on the server. It streams messages in batches (a
//! few thousand dead letters take a moment, not one request each), skips deleted
//! messages server-side, and works on nats-server 2.9 as on current servers. Reading
//! stops at the stream's last sequence as it was when the read began.
//!
//! # Replaying
//! [`Dlq::replay_one`] republishes the dead letter to its original subject with the
//! dead-letter headers removed ([`replay_headers`]), waits for the PubAck, and only then
//! deletes it from the dead-letter stream. Publish-then-delete loses nothing if
//! interrupted; a crash between the two leaves a copy in both places, and the replay's
//! message id ([`replay_message_id`]) is the same when the replay is run again, so the
//! original stream's duplicate window stores it once. That protection lasts as long as
//! the window (`duplicate_window`, 2 minutes by default): a replay finished later than
//! that stores a second copy, which handlers absorb like any redelivery (they must be
//! idempotent anyway). Replays run one at a time, so at most one dead letter is ever
//! in both places.
//!
//! A replay is a new message on the original subject: every consumer whose filter
//! matches it receives it, not only the one that gave up on it.
//! [`Dlq::other_readers`] names them, and `dlq replay` says so before it starts.
//!
//! ```no_run
//! # async fn demo(js: async_nats::jetstream::Context, config: jetworker::Config) -> Result<(), jetworker_cli::DlqError> {
//! use jetworker_cli::{Dlq, Filter};
//! use jetworker::Reason;
//!
//! let dlq = Dlq::new(js, &config)?;
//! let filter = Filter { reasons: vec![Reason::Permanent], ..Filter::default() };
//! for letter in dlq.list(&filter).await? {
//!     let replayed = dlq.replay_one(&letter).await?;
//!     println!("{} #{} -> {}", letter.stream, letter.sequence, replayed.subject);
//! }
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use async_nats::header::HeaderName;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use jetworker::headers as dead_letter;
use jetworker::{CodecKind, Config, Error, Publisher, Reason, RetryPolicy};

/// What kind of `dlq` failure this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqErrorKind {
    /// No stream of the config captures a dead-letter subject, or not the one named.
    NoDeadLetterStream,
    /// The selection cannot be used (an ambiguous sequence, an unknown reason or time).
    InvalidSelection,
    /// No message with that sequence is stored on a dead-letter subject.
    NotFound,
    /// The message lacks the dead-letter headers (no original subject to replay to).
    NotADeadLetter,
    /// A JetStream request failed (unreachable, timed out, refused).
    Request,
    /// Republishing a dead letter failed; it was kept in the dead-letter stream.
    Publish,
}

impl fmt::Display for DlqErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DlqErrorKind::NoDeadLetterStream => "no dead-letter stream",
            DlqErrorKind::InvalidSelection => "the selection cannot be used",
            DlqErrorKind::NotFound => "no such dead letter",
            DlqErrorKind::NotADeadLetter => "not a dead letter",
            DlqErrorKind::Request => "a JetStream request failed",
            DlqErrorKind::Publish => "republishing the dead letter failed",
        })
    }
}

/// A `dlq` operation that failed. The message names streams, sequences and subjects,
/// never a credential; the client's error, if any, is the source.
pub type DlqError = Error<DlqErrorKind>;

/// An error of `kind` saying `message`, with no other cause.
fn dlq_error(kind: DlqErrorKind, message: impl Into<String>) -> DlqError {
    DlqError::new(kind).with_message(message)
}

/// A request for `what` failed with the client's error `err`.
fn request(
    what: impl fmt::Display,
    err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> DlqError {
    DlqError::with_source(DlqErrorKind::Request, err).with_message(what.to_string())
}

/// The message id of the `n`th replay of dead letter `sequence` of `stream`:
/// deterministic, so a replay run again after an interruption is deduplicated by the
/// original stream, and distinct per replay attempt.
pub fn replay_message_id(stream: &str, sequence: u64, n: u64) -> String {
    format!("replay:{stream}:{sequence}:{n}")
}

/// The headers a replayed message is published with, from the dead letter's headers.
///
/// - every `Jetworker-*` header and the dead letter's own `Nats-*` headers are removed;
/// - `Jetworker-Original-Nats-<name>` is restored as `Nats-<name>`, except `Nats-Msg-Id`
///   and `Nats-Expected-*`: a replay gets its own message id and must not be refused by
///   an expectation that held when the original was published;
/// - [`dead_letter::REPLAY_COUNT`] is set to `replay_count`;
/// - any other header (tracing, application headers) is kept as is.
pub fn replay_headers(dead: &HeaderMap, replay_count: u64) -> HeaderMap {
    let original_nats = format!("{}nats-", dead_letter::ORIGINAL_PREFIX).to_ascii_lowercase();
    let mut out = HeaderMap::new();
    for (name, values) in dead.iter() {
        let name: &str = name.as_ref();
        let lower = name.to_ascii_lowercase();
        let target = if lower.starts_with(&original_nats) {
            let restored = &name[dead_letter::ORIGINAL_PREFIX.len()..];
            let restored_lower = &lower[dead_letter::ORIGINAL_PREFIX.len()..];
            if restored_lower == "nats-msg-id" || restored_lower.starts_with("nats-expected-") {
                continue;
            }
            restored
        } else if lower.starts_with("jetworker-") || lower.starts_with("nats-") {
            continue;
        } else {
            name
        };
        let Ok(target) = target.parse::<HeaderName>() else {
            continue;
        };
        for value in values {
            out.append(target.clone(), value.clone());
        }
    }
    out.insert(dead_letter::REPLAY_COUNT, replay_count.to_string().as_str());
    out
}

/// Parses a `--since` / `--until` value: an RFC 3339 time (`2024-05-01T12:00:00Z`) or a
/// duration before `now` (`90m`, `1h`, `2d`, `1h ago`). Anything else is an error of
/// kind [`DlqErrorKind::InvalidSelection`] that says what the value is not.
pub fn parse_time(text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, DlqError> {
    let text = text.trim();
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(at);
    }
    let ago = text.strip_suffix("ago").map(str::trim_end).unwrap_or(text);
    let invalid = |message: String| dlq_error(DlqErrorKind::InvalidSelection, message);
    match humantime::parse_duration(ago) {
        Ok(d) => time::Duration::try_from(d)
            .ok()
            .and_then(|d| now.checked_sub(d))
            .ok_or_else(|| invalid(format!("{text:?} reaches too far into the past"))),
        Err(_) => Err(invalid(format!(
            "{text:?} is neither an RFC 3339 time (2024-05-01T12:00:00Z) nor a duration ago (90m, 1h, 2d)"
        ))),
    }
}

/// Parses a `--reason` value (the wire form stored in `Jetworker-Reason`). An unknown
/// one is an error of kind [`DlqErrorKind::InvalidSelection`] that lists the known ones.
pub fn parse_reason(text: &str) -> Result<Reason, DlqError> {
    Reason::parse(text.trim()).ok_or_else(|| {
        let all: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        dlq_error(
            DlqErrorKind::InvalidSelection,
            format!("unknown reason {text:?}: one of {}", all.join(", ")),
        )
    })
}

/// Which dead letters an operation applies to. Every set field narrows the selection;
/// the default selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this dead-letter stream.
    pub stream: Option<String>,
    /// Only dead letters of these consumers (`Jetworker-Consumer`).
    pub consumers: Vec<String>,
    /// Only these reasons (`Jetworker-Reason`).
    pub reasons: Vec<Reason>,
    /// Only dead letters stored at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Only dead letters stored at or before this time.
    pub until: Option<OffsetDateTime>,
}

impl Filter {
    /// True when a consumer, reason or time narrows the selection (a stream alone does not).
    pub fn narrows(&self) -> bool {
        !self.consumers.is_empty()
            || !self.reasons.is_empty()
            || self.since.is_some()
            || self.until.is_some()
    }

    /// Whether `letter` is selected.
    pub fn matches(&self, letter: &Letter) -> bool {
        if self.stream.as_ref().is_some_and(|s| *s != letter.stream) {
            return false;
        }
        if !self.consumers.is_empty()
            && !letter
                .consumer()
                .is_some_and(|c| self.consumers.iter().any(|want| want == c))
        {
            return false;
        }
        if !self.reasons.is_empty()
            && !letter
                .reason()
                .and_then(Reason::parse)
                .is_some_and(|r| self.reasons.contains(&r))
        {
            return false;
        }
        if self.since.is_some_and(|t| letter.time < t) {
            return false;
        }
        if self.until.is_some_and(|t| letter.time > t) {
            return false;
        }
        true
    }
}

/// A consumer whose dead letters go to a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterSource {
    /// The consumer's stream.
    pub stream: String,
    /// The consumer's name.
    pub consumer: String,
    /// Its payload codec, to decode its dead letters.
    pub codec: CodecKind,
}

/// A stream holding dead letters, and which consumers send them there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterStream {
    /// Stream name.
    pub name: String,
    /// Dead-letter subject -> the consumers using it, in config order.
    pub subjects: BTreeMap<String, Vec<DeadLetterSource>>,
}

/// The streams of `config` that capture consumers' dead-letter subjects, in config order.
pub fn dead_letter_streams(config: &Config) -> Vec<DeadLetterStream> {
    let mut out: Vec<DeadLetterStream> = Vec::new();
    for c in &config.consumers {
        let subject = &c.dead_letter_subject;
        let Some(s) = config.streams.iter().find(|s| {
            s.subjects
                .iter()
                .any(|ss| jetworker::subjects_overlap(ss, subject))
        }) else {
            continue;
        };
        let index = match out.iter().position(|d| d.name == s.name) {
            Some(i) => i,
            None => {
                out.push(DeadLetterStream {
                    name: s.name.clone(),
                    subjects: BTreeMap::new(),
                });
                out.len() - 1
            }
        };
        out[index]
            .subjects
            .entry(subject.clone())
            .or_default()
            .push(DeadLetterSource {
                stream: c.stream.clone(),
                consumer: c.name.clone(),
                codec: c.codec,
            });
    }
    out
}

/// One stored dead letter.
#[derive(Debug, Clone)]
pub struct Letter {
    /// The dead-letter stream.
    pub stream: String,
    /// Its sequence in the dead-letter stream.
    pub sequence: u64,
    /// The dead-letter subject it is stored on.
    pub subject: String,
    /// When the dead-letter stream stored it.
    pub time: OffsetDateTime,
    /// Every header, dead-letter headers included.
    pub headers: HeaderMap,
    /// The original payload.
    pub payload: Bytes,
}

impl Letter {
    /// A header's first value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    /// The consumer that gave up on it.
    pub fn consumer(&self) -> Option<&str> {
        self.header(dead_letter::CONSUMER)
    }

    /// Why it was dead-lettered (wire form).
    pub fn reason(&self) -> Option<&str> {
        self.header(dead_letter::REASON)
    }

    /// Deliveries made before it was dead-lettered.
    pub fn attempts(&self) -> Option<u64> {
        self.header(dead_letter::ATTEMPTS)?.trim().parse().ok()
    }

    /// The subject it was first published to: where a replay goes.
    pub fn original_subject(&self) -> Option<&str> {
        self.header(dead_letter::ORIGINAL_SUBJECT)
    }

    /// The stream of the original.
    pub fn original_stream(&self) -> Option<&str> {
        self.header(dead_letter::STREAM)
    }

    /// The original's stream sequence.
    pub fn original_sequence(&self) -> Option<u64> {
        self.header(dead_letter::SEQUENCE)?.trim().parse().ok()
    }

    /// The last error text.
    pub fn error(&self) -> Option<&str> {
        self.header(dead_letter::ERROR)
    }

    /// Times it was replayed before (0 for a first failure).
    pub fn replay_count(&self) -> u64 {
        self.header(dead_letter::REPLAY_COUNT)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The fields a listing shows.
    pub fn summary(&self) -> Summary {
        Summary {
            stream: self.stream.clone(),
            sequence: self.sequence,
            subject: self.subject.clone(),
            time: format_time(self.time),
            consumer: self.consumer().map(str::to_string),
            reason: self.reason().map(str::to_string),
            attempts: self.attempts(),
            original_subject: self.original_subject().map(str::to_string),
            original_stream: self.original_stream().map(str::to_string),
            original_sequence: self.original_sequence(),
            error: self.error().map(str::to_string),
            replay_count: self.replay_count(),
            size: self.payload.len(),
        }
    }

    /// Everything `dlq show` prints: the summary, every header (sorted by name) and the
    /// payload decoded with `codec` when it allows.
    pub fn detail(&self, codec: Option<CodecKind>) -> Detail {
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, values) in self.headers.iter() {
            let name: &str = name.as_ref();
            headers
                .entry(name.to_string())
                .or_default()
                .extend(values.iter().map(|v| v.as_str().to_string()));
        }
        Detail {
            summary: self.summary(),
            headers,
            payload: decode_payload(codec, &self.payload),
        }
    }
}

/// RFC 3339 in UTC, to the second.
fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

/// A dead letter as `dlq list --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// The dead-letter stream.
    pub stream: String,
    /// Sequence in the dead-letter stream (what `show`, `replay` and `purge` take).
    pub sequence: u64,
    /// The dead-letter subject.
    pub subject: String,
    /// When it was stored (RFC 3339, UTC).
    pub time: String,
    /// The consumer that gave up.
    pub consumer: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// Deliveries made.
    pub attempts: Option<u64>,
    /// Where a replay publishes it.
    pub original_subject: Option<String>,
    /// The original's stream.
    pub original_stream: Option<String>,
    /// The original's sequence in its stream.
    pub original_sequence: Option<u64>,
    /// The last error.
    pub error: Option<String>,
    /// Replays before this dead letter.
    pub replay_count: u64,
    /// Payload size in bytes.
    pub size: usize,
}

/// A dead letter as `dlq show --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detail {
    /// The listing fields.
    #[serde(flatten)]
    pub summary: Summary,
    /// Every header, by name.
    pub headers: BTreeMap<String, Vec<String>>,
    /// The payload, decoded when possible.
    pub payload: Payload,
}

/// How a payload could be shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadEncoding {
    /// MessagePack, decoded into JSON values.
    Msgpack,
    /// JSON.
    Json,
    /// UTF-8 text that is not in the codec's format.
    Text,
    /// Bytes, as hex.
    Hex,
}

/// A payload made readable.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Payload {
    /// What the value is.
    pub encoding: PayloadEncoding,
    /// The decoded value (JSON), the text, or the hex string.
    pub value: serde_json::Value,
    /// Why it was not decoded with the consumer's codec, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Decodes a payload for display: with `codec` when it allows (MessagePack and JSON both
/// become JSON values), else as UTF-8 text, else as hex. Without a codec (the consumer is
/// no longer in the config) JSON is tried.
pub fn decode_payload(codec: Option<CodecKind>, bytes: &[u8]) -> Payload {
    let tried = codec.unwrap_or(CodecKind::Json);
    let decoded = match tried {
        CodecKind::Msgpack => decode_msgpack(bytes),
        CodecKind::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
    };
    let note = match decoded {
        Ok(value) => {
            return Payload {
                encoding: match tried {
                    CodecKind::Msgpack => PayloadEncoding::Msgpack,
                    CodecKind::Json => PayloadEncoding::Json,
                },
                value,
                note: None,
            }
        }
        Err(e) if codec.is_some() => Some(format!("cannot decode {tried} payload: {e}")),
        Err(_) => Some("the consumer is not in the config: its codec is unknown".to_string()),
    };
    match std::str::from_utf8(bytes) {
        Ok(text) => Payload {
            encoding: PayloadEncoding::Text,
            value: serde_json::Value::String(text.to_string()),
            note,
        },
        Err(_) => Payload {
            encoding: PayloadEncoding::Hex,
            value: serde_json::Value::String(bytes.iter().map(|b| format!("{b:02x}")).collect()),
            note,
        },
    }
}

/// One whole MessagePack value as JSON (depth-limited like the runtime's decoding;
/// trailing bytes are an error, so text that starts with a small integer is not taken
/// for MessagePack).
fn decode_msgpack(bytes: &[u8]) -> Result<serde_json::Value, String> {
    use serde::Deserialize;
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(bytes));
    de.set_max_depth(jetworker::MAX_MSGPACK_DEPTH);
    let value = serde_json::Value::deserialize(&mut de).map_err(|e| e.to_string())?;
    let used = de.position();
    if used != bytes.len() as u64 {
        return Err(format!(
            "{} bytes after the first value",
            bytes.len() as u64 - used
        ));
    }
    Ok(value)
}

/// A printable form of text: control characters other than newline and tab escaped.
fn escape_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A hex dump: offset, 16 bytes in hex, and the printable ASCII.
pub fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!(
            "{:08x}  {:<47}  |{ascii}|\n",
            i * 16,
            hex.join(" ")
        ));
    }
    out
}

impl Detail {
    /// The human form of `dlq show`.
    pub fn text(&self, payload: &[u8]) -> String {
        let s = &self.summary;
        let mut out = format!(
            "dead letter {} #{} on {} at {} ({} byte{})\n",
            s.stream,
            s.sequence,
            s.subject,
            s.time,
            s.size,
            if s.size == 1 { "" } else { "s" }
        );
        out.push_str("headers:\n");
        for (name, values) in &self.headers {
            for value in values {
                out.push_str(&format!("  {name}: {}\n", escape_text(value)));
            }
        }
        let word = match self.payload.encoding {
            PayloadEncoding::Msgpack => "msgpack",
            PayloadEncoding::Json => "json",
            PayloadEncoding::Text => "text",
            PayloadEncoding::Hex => "hex",
        };
        match &self.payload.note {
            Some(note) => out.push_str(&format!("payload ({word}; {note}):\n")),
            None => out.push_str(&format!("payload ({word}):\n")),
        }
        let body = match (&self.payload.encoding, &self.payload.value) {
            (PayloadEncoding::Hex, _) => hex_dump(payload),
            (PayloadEncoding::Text, serde_json::Value::String(text)) => escape_text(text),
            (_, value) => serde_json::to_string_pretty(value).unwrap_or_default(),
        };
        out.push_str(&body);
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out
    }
}

/// Shortens `text` to `max` characters (with "..." when cut), on one line.
fn clip(text: &str, max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(3)).collect();
    out.push_str("...");
    out
}

/// The human form of `dlq list`: one row per dead letter, then a count.
pub fn list_table(letters: &[Summary]) -> String {
    if letters.is_empty() {
        return "no dead letters\n".to_string();
    }
    let headers = [
        "STREAM", "SEQ", "TIME", "CONSUMER", "REASON", "ATTEMPTS", "REPLAYS", "ORIGINAL", "ERROR",
    ];
    let right = [false, true, false, false, false, true, true, false, false];
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            vec![
                l.stream.clone(),
                l.sequence.to_string(),
                l.time.clone(),
                l.consumer.clone().unwrap_or_else(dash),
                l.reason.clone().unwrap_or_else(dash),
                l.attempts.map(|a| a.to_string()).unwrap_or_else(dash),
                l.replay_count.to_string(),
                l.original_subject.clone().unwrap_or_else(dash),
                l.error.as_deref().map(|e| clip(e, 60)).unwrap_or_else(dash),
            ]
        })
        .collect();
    let mut out = crate::table::table(&headers, &right, &rows);
    out.push_str(&format!(
        "{} dead letter{}\n",
        letters.len(),
        if letters.len() == 1 { "" } else { "s" }
    ));
    out
}

/// What one replay did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Replayed {
    /// The dead-letter stream.
    pub stream: String,
    /// The dead letter's sequence (now deleted).
    pub sequence: u64,
    /// Where it was republished.
    pub subject: String,
    /// The republished message's id.
    pub message_id: String,
    /// Its `Jetworker-Replay-Count`.
    pub replay_count: u64,
    /// The stream that stored it.
    pub target_stream: String,
    /// Its sequence there.
    pub target_sequence: u64,
    /// True when the target stream already had this replay (an interrupted replay run
    /// again): it was not stored twice.
    pub duplicate: bool,
}

/// What a replay of many dead letters did.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    /// Replayed and deleted, in order.
    pub replayed: Vec<Replayed>,
    /// Left in place because they cannot be replayed (no original subject), with why.
    pub skipped: Vec<(String, u64, String)>,
    /// The error that stopped the replay, if one did; later dead letters were not touched.
    pub failed: Option<DlqError>,
}

/// What a purge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    /// Dead letters deleted.
    pub deleted: u64,
    /// Selected dead letters that were already gone (deleted by someone else meanwhile).
    pub already_gone: u64,
}

/// A consumer of the config as a replay sees it: the stream it reads and its filter.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reader {
    stream: String,
    consumer: String,
    filter: Option<String>,
}

/// See [`Dlq::other_readers`]: `streams` are the config's streams with their subjects.
fn other_readers(
    streams: &[(String, Vec<String>)],
    readers: &[Reader],
    letter: &Letter,
) -> Vec<String> {
    let Some(subject) = letter.original_subject() else {
        return Vec::new();
    };
    let stores = |stream: &str| {
        streams.iter().any(|(name, subjects)| {
            name == stream
                && subjects
                    .iter()
                    .any(|f| jetworker::subjects_overlap(f, subject))
        })
    };
    let mut out: Vec<String> = readers
        .iter()
        .filter(|r| Some(r.consumer.as_str()) != letter.consumer())
        .filter(|r| stores(&r.stream))
        .filter(|r| {
            r.filter
                .as_deref()
                .is_none_or(|f| jetworker::subjects_overlap(f, subject))
        })
        .map(|r| r.consumer.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Dead-letter operations on the streams of one config.
#[derive(Clone)]
pub struct Dlq {
    js: jetstream::Context,
    streams: Vec<DeadLetterStream>,
    /// Every stream of the config with its subjects, to find where a replay lands.
    stream_subjects: Vec<(String, Vec<String>)>,
    /// Every consumer of the config, to tell who receives a replay.
    readers: Vec<Reader>,
    publisher: Publisher,
    read_timeout: Duration,
}

impl fmt::Debug for Dlq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dlq")
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

impl Dlq {
    /// Dead-letter operations for `config`'s dead-letter streams. Fails when the config
    /// has none.
    pub fn new(js: jetstream::Context, config: &Config) -> Result<Dlq, DlqError> {
        let streams = dead_letter_streams(config);
        if streams.is_empty() {
            return Err(dlq_error(
                DlqErrorKind::NoDeadLetterStream,
                format!(
                    "{}: no stream captures a consumer's dead_letter_subject",
                    config.source.display()
                ),
            ));
        }
        let request_timeout = config.connection.request_timeout;
        let publisher = Publisher::new(js.clone()).with_retry(RetryPolicy {
            deadline: Duration::from_secs(15).max(request_timeout * 2),
            ack_timeout: request_timeout,
            ..RetryPolicy::default()
        });
        Ok(Dlq {
            js,
            streams,
            stream_subjects: config
                .streams
                .iter()
                .map(|s| (s.name.clone(), s.subjects.clone()))
                .collect(),
            readers: config
                .consumers
                .iter()
                .map(|c| Reader {
                    stream: c.stream.clone(),
                    consumer: c.name.clone(),
                    filter: c.filter_subject.clone(),
                })
                .collect(),
            publisher,
            read_timeout: request_timeout.max(Duration::from_secs(5)),
        })
    }

    /// The consumers of the config, other than the one that gave up on `letter`, that
    /// also receive its replay, sorted. A replay is a new message on the original
    /// subject: every consumer of the stream storing that subject whose filter matches
    /// it handles it again, not only the one that dead-lettered it. Empty when the
    /// letter has no original subject.
    pub fn other_readers(&self, letter: &Letter) -> Vec<String> {
        other_readers(&self.stream_subjects, &self.readers, letter)
    }

    /// The dead-letter streams, as [`dead_letter_streams`] found them.
    pub fn streams(&self) -> &[DeadLetterStream] {
        &self.streams
    }

    /// The codec of the consumer that produced `letter`, when it is in the config.
    pub fn codec_of(&self, letter: &Letter) -> Option<CodecKind> {
        let consumer = letter.consumer()?;
        let original_stream = letter.original_stream();
        let sources = self
            .streams
            .iter()
            .filter(|s| s.name == letter.stream)
            .flat_map(|s| s.subjects.get(&letter.subject))
            .flatten();
        let mut fallback = None;
        for source in sources {
            if source.consumer == consumer {
                if original_stream.is_none_or(|s| s == source.stream) {
                    return Some(source.codec);
                }
                fallback = Some(source.codec);
            }
        }
        fallback
    }

    fn stream_named(&self, name: &str) -> Result<&DeadLetterStream, DlqError> {
        self.streams.iter().find(|s| s.name == name).ok_or_else(|| {
            dlq_error(
                DlqErrorKind::NoDeadLetterStream,
                format!(
                    "{name:?} is not a dead-letter stream of this config (dead-letter streams: {})",
                    self.stream_names()
                ),
            )
        })
    }

    fn stream_names(&self) -> String {
        self.streams
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The dead-letter stream `name`, or the only one when `name` is `None`.
    pub fn resolve_stream(&self, name: Option<&str>) -> Result<&DeadLetterStream, DlqError> {
        match name {
            Some(name) => self.stream_named(name),
            None => match self.streams.as_slice() {
                [only] => Ok(only),
                _ => Err(dlq_error(
                    DlqErrorKind::InvalidSelection,
                    format!(
                        "the config has several dead-letter streams ({}): name one with --stream",
                        self.stream_names()
                    ),
                )),
            },
        }
    }

    async fn handle(&self, name: &str) -> Result<stream::Stream<()>, DlqError> {
        self.js
            .get_stream_no_info(name)
            .await
            .map_err(|e| request(format_args!("opening stream {name:?}"), e))
    }

    /// Every dead letter `filter` selects, per stream in config order, oldest first.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<Letter>, DlqError> {
        let streams: Vec<&DeadLetterStream> = match &filter.stream {
            Some(name) => vec![self.stream_named(name)?],
            None => self.streams.iter().collect(),
        };
        let mut out = Vec::new();
        for dl in streams {
            // With consumers named that the config knows, read only their subjects.
            let known: BTreeSet<&String> = dl
                .subjects
                .iter()
                .filter(|(_, sources)| {
                    sources
                        .iter()
                        .any(|s| filter.consumers.contains(&s.consumer))
                })
                .map(|(subject, _)| subject)
                .collect();
            let all_known = filter.consumers.iter().all(|c| {
                self.streams
                    .iter()
                    .any(|s| s.subjects.values().flatten().any(|src| src.consumer == *c))
            });
            let subjects: Vec<&String> = if filter.consumers.is_empty() || !all_known {
                dl.subjects.keys().collect()
            } else {
                known.into_iter().collect()
            };
            let mut letters = Vec::new();
            for subject in subjects {
                letters.extend(self.read_subject(&dl.name, subject, filter).await?);
            }
            letters.sort_by_key(|l| l.sequence);
            out.extend(letters);
        }
        Ok(out)
    }

    /// Reads the dead letters on one subject with an ordered consumer.
    async fn read_subject(
        &self,
        stream_name: &str,
        subject: &str,
        filter: &Filter,
    ) -> Result<Vec<Letter>, DlqError> {
        let what = || format!("reading {subject} in stream {stream_name:?}");
        let stream = self
            .js
            .get_stream(stream_name)
            .await
            .map_err(|e| request(what(), e))?;
        let last = stream.cached_info().state.last_sequence;
        let deliver_policy = match filter.since {
            Some(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
            None => consumer::DeliverPolicy::All,
        };
        let reader = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject.to_string(),
                deliver_policy,
                description: Some("jetworker dlq reader".to_string()),
                ..Default::default()
            })
            .await
            .map_err(|e| request(what(), e))?;
        let name = reader.cached_info().name.clone();
        let expected = reader.cached_info().num_pending;
        let mut out = Vec::new();
        let result = async {
            if expected == 0 {
                return Ok(());
            }
            let mut messages = reader.messages().await.map_err(|e| request(what(), e))?;
            loop {
                let next = tokio::time::timeout(self.read_timeout, messages.next())
                    .await
                    .map_err(|_| {
                        dlq_error(
                            DlqErrorKind::Request,
                            format!(
                                "{}: no message within {} ({} read, {expected} expected)",
                                what(),
                                humantime::format_duration(self.read_timeout),
                                out.len()
                            ),
                        )
                    })?;
                let message = match next {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(request(what(), e)),
                    Some(Ok(m)) => m,
                };
                let (sequence, time, pending) = match message.info() {
                    Ok(info) => (info.stream_sequence, info.published, info.pending),
                    Err(e) => return Err(request(what(), e)),
                };
                let letter = Letter {
                    stream: stream_name.to_string(),
                    sequence,
                    subject: message.subject.to_string(),
                    time,
                    headers: message.headers.clone().unwrap_or_default(),
                    payload: message.payload.clone(),
                };
                if filter.matches(&letter) {
                    out.push(letter);
                }
                if pending == 0 || sequence >= last {
                    return Ok(());
                }
            }
        }
        .await;
        // Ephemeral: it would go by itself after its inactivity threshold; tidy up now.
        let _ = stream.delete_consumer(&name).await;
        result.map(|()| out)
    }

    /// The dead letter at `sequence` of the dead-letter stream `stream` (or of the only
    /// one). It must be on a dead-letter subject.
    pub async fn get(&self, stream: Option<&str>, sequence: u64) -> Result<Letter, DlqError> {
        let dl = self.resolve_stream(stream)?;
        let handle = self.handle(&dl.name).await?;
        let message = match handle.get_raw_message(sequence).await {
            Ok(m) => m,
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                return Err(dlq_error(
                    DlqErrorKind::NotFound,
                    format!("no message #{sequence} in stream {:?}", dl.name),
                ))
            }
            Err(e) => {
                return Err(request(
                    format_args!("reading #{sequence} of stream {:?}", dl.name),
                    e,
                ))
            }
        };
        let subject = message.subject.to_string();
        if !dl.subjects.contains_key(&subject) {
            return Err(dlq_error(DlqErrorKind::NotFound,
                format!(
                    "message #{sequence} of stream {:?} is on {subject}, which is no consumer's dead_letter_subject",
                    dl.name
                ),
            ));
        }
        Ok(Letter {
            stream: dl.name.clone(),
            sequence,
            subject,
            time: message.time,
            headers: message.headers,
            payload: message.payload,
        })
    }

    /// The publish step of a replay alone: republishes `letter` to its original subject
    /// (see [`replay_headers`], [`replay_message_id`]) and returns the PubAck, leaving the
    /// dead letter in place. [`Dlq::replay_one`] is this, then the delete.
    pub async fn republish(&self, letter: &Letter) -> Result<Replayed, DlqError> {
        let target = letter.original_subject().ok_or_else(|| {
            dlq_error(
                DlqErrorKind::NotADeadLetter,
                format!(
                    "{} #{} has no {} header: nowhere to replay it to",
                    letter.stream,
                    letter.sequence,
                    dead_letter::ORIGINAL_SUBJECT
                ),
            )
        })?;
        if let Err(e) = jetworker::validate_literal(target) {
            return Err(dlq_error(
                DlqErrorKind::NotADeadLetter,
                format!(
                    "{} #{}: original subject {target:?} cannot be published to: {e}",
                    letter.stream, letter.sequence
                ),
            ));
        }
        let count = letter.replay_count() + 1;
        let message_id = replay_message_id(&letter.stream, letter.sequence, count);
        let headers = replay_headers(&letter.headers, count);
        let ack = self
            .publisher
            .publish_bytes(target, &message_id, headers, letter.payload.clone())
            .await
            .map_err(|e| {
                DlqError::with_source(DlqErrorKind::Publish, e).with_message(format!(
                    "replaying {} #{} (the dead letter was kept)",
                    letter.stream, letter.sequence
                ))
            })?;
        Ok(Replayed {
            stream: letter.stream.clone(),
            sequence: letter.sequence,
            subject: target.to_string(),
            message_id,
            replay_count: count,
            target_stream: ack.stream,
            target_sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Replays one dead letter: republish, await the PubAck, then delete it from the
    /// dead-letter stream. When the delete fails the message is in both places; running
    /// the replay again republishes with the same message id (deduplicated) and deletes.
    pub async fn replay_one(&self, letter: &Letter) -> Result<Replayed, DlqError> {
        let replayed = self.republish(letter).await?;
        self.delete(letter).await.map_err(|e| {
            DlqError::with_source(e.kind(), e).with_message(format!(
                "{} #{} was republished to {} ({} #{}) but not deleted (replay it again to finish: the copy is deduplicated)",
                letter.stream,
                letter.sequence,
                replayed.subject,
                replayed.target_stream,
                replayed.target_sequence
            ))
        })?;
        Ok(replayed)
    }

    /// Replays `letters` in order, stopping at the first failure. Dead letters with
    /// nowhere to go are skipped and left in place.
    pub async fn replay(&self, letters: &[Letter]) -> ReplayReport {
        let mut report = ReplayReport::default();
        for letter in letters {
            match self.replay_one(letter).await {
                Ok(r) => report.replayed.push(r),
                Err(e) if e.kind() == DlqErrorKind::NotADeadLetter => {
                    report
                        .skipped
                        .push((letter.stream.clone(), letter.sequence, e.to_string()))
                }
                Err(e) => {
                    report.failed = Some(e);
                    break;
                }
            }
        }
        report
    }

    /// Deletes one dead letter. `Ok(false)` when it was already gone.
    ///
    /// The message is removed, not overwritten on disk (`no_erase`): an erasing delete
    /// costs a disk write per message on current servers, too slow for thousands.
    async fn delete(&self, letter: &Letter) -> Result<bool, DlqError> {
        use jetstream::response::Response;
        let what = || format!("deleting {} #{}", letter.stream, letter.sequence);
        let response: Result<Response<stream::DeleteStatus>, _> = self
            .js
            .request(
                format!("STREAM.MSG.DELETE.{}", letter.stream),
                &serde_json::json!({ "seq": letter.sequence, "no_erase": true }),
            )
            .await;
        let failure = match response {
            Ok(Response::Ok(status)) if status.success => return Ok(true),
            Ok(Response::Ok(_)) => dlq_error(
                DlqErrorKind::Request,
                format!("{}: the server did not delete it", what()),
            ),
            Ok(Response::Err { error }) => request(what(), error),
            Err(e) => request(what(), e),
        };
        let handle = self.handle(&letter.stream).await?;
        match handle.get_raw_message(letter.sequence).await {
            // Gone already (another replay or purge got there first): done.
            Err(g) if g.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(false),
            _ => Err(failure),
        }
    }

    /// Deletes `letters` from their dead-letter streams for good.
    pub async fn purge(&self, letters: &[Letter]) -> Result<PurgeReport, DlqError> {
        let results: Vec<Result<bool, DlqError>> = futures::stream::iter(letters)
            .map(|l| self.delete(l))
            .buffer_unordered(32)
            .collect()
            .await;
        let mut report = PurgeReport::default();
        let mut first_error = None;
        for r in results {
            match r {
                Ok(true) => report.deleted += 1,
                Ok(false) => report.already_gone += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(DlqError::with_source(e.kind(), e).with_message(format!(
                "purging failed after {} other dead letters were deleted",
                report.deleted
            ))),
            None => Ok(report),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetworker::DeadLetter;
    use std::path::Path;

    fn at(text: &str) -> OffsetDateTime {
        OffsetDateTime::parse(text, &Rfc3339).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    fn letter(seq: u64, consumer: &str, reason: &str, time: &str) -> Letter {
        let mut headers = HeaderMap::new();
        headers.insert(dead_letter::CONSUMER, consumer);
        headers.insert(dead_letter::REASON, reason);
        headers.insert(dead_letter::ORIGINAL_SUBJECT, "jobs.1");
        headers.insert(dead_letter::ATTEMPTS, "3");
        Letter {
            stream: "DLQ".into(),
            sequence: seq,
            subject: "dlq.jobs".into(),
            time: at(time),
            headers,
            payload: Bytes::new(),
        }
    }

    #[test]
    fn filters_by_consumer_reason_time_and_stream() {
        let l = letter(1, "jobs", "permanent", "2024-05-01T12:00:00Z");
        let cases: Vec<(&str, Filter, bool)> = vec![
            ("everything", Filter::default(), true),
            (
                "same consumer",
                Filter {
                    consumers: vec!["other".into(), "jobs".into()],
                    ..Filter::default()
                },
                true,
            ),
            (
                "other consumer",
                Filter {
                    consumers: vec!["other".into()],
                    ..Filter::default()
                },
                false,
            ),
            (
                "same reason",
                Filter {
                    reasons: vec![Reason::Permanent],
                    ..Filter::default()
                },
                true,
            ),
            (
                "other reason",
                Filter {
                    reasons: vec![Reason::Exhausted, Reason::Decode],
                    ..Filter::default()
                },
                false,
            ),
            (
                "since before",
                Filter {
                    since: Some(at("2024-05-01T11:59:59Z")),
                    ..Filter::default()
                },
                true,
            ),
            (
                "since equal",
                Filter {
                    since: Some(at("2024-05-01T12:00:00Z")),
                    ..Filter::default()
                },
                true,
            ),
            (
                "since after",
                Filter {
                    since: Some(at("2024-05-01T12:00:01Z")),
                    ..Filter::default()
                },
                false,
            ),
            (
                "until after",
                Filter {
                    until: Some(at("2024-05-01T12:00:01Z")),
                    ..Filter::default()
                },
                true,
            ),
            (
                "until before",
                Filter {
                    until: Some(at("2024-05-01T11:00:00Z")),
                    ..Filter::default()
                },
                false,
            ),
            (
                "other stream",
                Filter {
                    stream: Some("DLQ2".into()),
                    ..Filter::default()
                },
                false,
            ),
        ];
        for (name, filter, want) in cases {
            assert_eq!(filter.matches(&l), want, "{name}");
        }
        // No consumer or reason header: selected only by filters that do not need them.
        let mut bare = l.clone();
        bare.headers = HeaderMap::new();
        assert!(Filter::default().matches(&bare));
        assert!(!Filter {
            reasons: vec![Reason::Permanent],
            ..Filter::default()
        }
        .matches(&bare));
    }

    #[test]
    fn narrows_only_with_consumer_reason_or_time() {
        assert!(!Filter::default().narrows());
        assert!(!Filter {
            stream: Some("DLQ".into()),
            ..Filter::default()
        }
        .narrows());
        assert!(Filter {
            consumers: vec!["x".into()],
            ..Filter::default()
        }
        .narrows());
        assert!(Filter {
            since: Some(OffsetDateTime::UNIX_EPOCH),
            ..Filter::default()
        }
        .narrows());
    }

    #[test]
    fn times_parse_as_rfc3339_or_duration_ago() {
        let now = at("2024-05-01T12:00:00Z");
        let time = |text| parse_time(text, now).map_err(|e| e.kind());
        assert_eq!(time("2024-04-30T10:00:00Z"), Ok(at("2024-04-30T10:00:00Z")));
        assert_eq!(
            time("2024-04-30T12:00:00+02:00"),
            Ok(at("2024-04-30T10:00:00Z"))
        );
        assert_eq!(time("1h"), Ok(at("2024-05-01T11:00:00Z")));
        assert_eq!(time("90m ago"), Ok(at("2024-05-01T10:30:00Z")));
        assert_eq!(time(" 2d "), Ok(at("2024-04-29T12:00:00Z")));
        for wrong in ["yesterday", "", "2024-13-01T00:00:00Z"] {
            assert_eq!(
                time(wrong),
                Err(DlqErrorKind::InvalidSelection),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn reasons_parse_with_a_helpful_error() {
        assert_eq!(
            parse_reason("too_large").map_err(|e| e.kind()),
            Ok(Reason::TooLarge)
        );
        let err = parse_reason("exausted")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("exhausted, permanent"), "{err}");
    }

    #[test]
    fn replay_headers_strip_dead_letter_headers_and_restore_nats_ones() {
        let mut original = HeaderMap::new();
        original.insert("Nats-Msg-Id", "publisher-id-1");
        original.insert("Nats-Expected-Stream", "EVENTS");
        original.insert("Nats-Expected-Last-Sequence", "41");
        original.insert("Nats-TTL", "1h");
        original.insert("traceparent", "00-abc-def-01");
        original.append("tag", "a");
        original.append("tag", "b");
        let letter = DeadLetter {
            subject: "events.click".into(),
            headers: original,
            stream: "EVENTS".into(),
            sequence: 42,
            consumer: "clicks".into(),
            attempts: 5,
            reason: Reason::Exhausted,
            error: "boom".into(),
        };
        let mut dead = letter.headers();
        dead.insert(dead_letter::REPLAY_COUNT, "2");
        // Headers a direct get would add must not leak into the replay either.
        dead.insert("Nats-Sequence", "7");
        let h = replay_headers(&dead, 3);
        let mut names: Vec<String> = h
            .iter()
            .map(|(n, _)| {
                let n: &str = n.as_ref();
                n.to_string()
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["Jetworker-Replay-Count", "Nats-TTL", "tag", "traceparent"]
        );
        let get = |k: &str| h.get(k).map(|v| v.as_str().to_string());
        assert_eq!(get("Nats-TTL").as_deref(), Some("1h"));
        assert_eq!(get("traceparent").as_deref(), Some("00-abc-def-01"));
        assert_eq!(
            get(dead_letter::REPLAY_COUNT).as_deref(),
            Some("3"),
            "the count is replaced, not appended"
        );
        let tags: Vec<&str> = h.get_all("tag").map(|v| v.as_str()).collect();
        assert_eq!(tags, ["a", "b"]);
    }

    #[test]
    fn replay_ids_are_deterministic_per_attempt() {
        assert_eq!(replay_message_id("DLQ", 5, 1), "replay:DLQ:5:1");
        assert_ne!(
            replay_message_id("DLQ", 5, 1),
            replay_message_id("DLQ", 5, 2)
        );
        let mut l = letter(5, "jobs", "permanent", "2024-05-01T12:00:00Z");
        assert_eq!(l.replay_count(), 0);
        l.headers.insert(dead_letter::REPLAY_COUNT, "4");
        assert_eq!(l.replay_count(), 4);
    }

    #[test]
    fn payloads_decode_with_the_codec_or_fall_back() {
        let value = serde_json::json!({"id": 7, "page": "/"});
        let packed = jetworker::encode(CodecKind::Msgpack, &value).unwrap_or_default();
        let p = decode_payload(Some(CodecKind::Msgpack), &packed);
        assert_eq!(p.encoding, PayloadEncoding::Msgpack);
        assert_eq!(p.value, value);
        assert!(p.note.is_none());

        let p = decode_payload(Some(CodecKind::Json), br#"{"id":7,"page":"/"}"#);
        assert_eq!((p.encoding, p.value), (PayloadEncoding::Json, value));

        let p = decode_payload(Some(CodecKind::Msgpack), b"not msgpack");
        assert_eq!(p.encoding, PayloadEncoding::Text);
        assert!(p.note.is_some_and(|n| n.contains("msgpack")));

        let p = decode_payload(Some(CodecKind::Json), b"\xff\x00\x01");
        assert_eq!(p.encoding, PayloadEncoding::Hex);
        assert_eq!(p.value, serde_json::json!("ff0001"));

        let p = decode_payload(None, b"plain words");
        assert_eq!(p.encoding, PayloadEncoding::Text);
        assert!(p.note.is_some_and(|n| n.contains("not in the config")));
    }

    #[test]
    fn hex_dump_and_show_text() {
        assert_eq!(
            hex_dump(b"AB\x00"),
            format!("00000000  {:<47}  |AB.|\n", "41 42 00")
        );
        assert_eq!(hex_dump(&[0x20; 17]).lines().count(), 2);
        let mut l = letter(3, "jobs", "decode", "2024-05-01T12:00:00Z");
        l.payload = Bytes::from_static(b"line\x07two");
        let d = l.detail(None);
        let text = d.text(&l.payload);
        assert!(
            text.starts_with("dead letter DLQ #3 on dlq.jobs at 2024-05-01T12:00:00Z (8 bytes)\n"),
            "{text}"
        );
        assert!(text.contains("  Jetworker-Reason: decode\n"), "{text}");
        assert!(text.contains("line\\u{7}two"), "{text}");
    }

    #[test]
    fn list_table_aligns_columns() {
        let mut a = letter(3, "jobs", "permanent", "2024-05-01T12:00:00Z");
        a.headers
            .insert(dead_letter::ERROR, "x".repeat(100).as_str());
        let b = letter(12, "clicks", "exhausted", "2024-05-01T12:00:05.5Z");
        let table = list_table(&[a.summary(), b.summary()]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("STREAM  SEQ  TIME                  CONSUMER"));
        assert!(lines[1].starts_with("DLQ       3  2024-05-01T12:00:00Z  jobs "));
        assert!(lines[2].starts_with("DLQ      12  2024-05-01T12:00:05Z  clicks "));
        assert!(lines[1].ends_with(&format!("{}...", "x".repeat(57))));
        assert_eq!(lines[3], "2 dead letters");
        assert_eq!(list_table(&[]), "no dead letters\n");
    }

    #[test]
    fn other_readers_are_the_consumers_whose_filter_matches_the_original_subject() {
        let streams = vec![
            ("EVENTS".to_string(), vec!["events.>".to_string()]),
            ("AUDIT".to_string(), vec!["audit.>".to_string()]),
        ];
        let reader = |stream: &str, consumer: &str, filter: Option<&str>| Reader {
            stream: stream.into(),
            consumer: consumer.into(),
            filter: filter.map(str::to_string),
        };
        let readers = vec![
            reader("EVENTS", "clicks", Some("events.click")),
            reader("EVENTS", "archive", None),
            reader("EVENTS", "all_kinds", Some("events.*")),
            reader("EVENTS", "purchases", Some("events.purchase")),
            reader("AUDIT", "auditor", None),
        ];
        let mut l = letter(1, "clicks", "permanent", "2024-05-01T12:00:00Z");
        l.headers
            .insert(dead_letter::ORIGINAL_SUBJECT, "events.click");
        assert_eq!(
            other_readers(&streams, &readers, &l),
            ["all_kinds", "archive"]
        );
        l.headers
            .insert(dead_letter::ORIGINAL_SUBJECT, "audit.login");
        assert_eq!(other_readers(&streams, &readers, &l), ["auditor"]);
        l.headers.insert(dead_letter::ORIGINAL_SUBJECT, "nowhere.x");
        assert!(other_readers(&streams, &readers, &l).is_empty());
        l.headers = HeaderMap::new();
        assert!(other_readers(&streams, &readers, &l).is_empty());
    }

    #[test]
    fn dead_letter_streams_group_consumers_by_stream_and_subject() {
        let text = r#"
[[streams]]
name = "EVENTS"
subjects = ["events.>"]
[[streams]]
name = "DLQ"
subjects = ["dlq.>"]
[[streams]]
name = "DLQ2"
subjects = ["other_dlq"]
[[consumers]]
name = "a"
stream = "EVENTS"
handler = "h"
dead_letter_subject = "dlq.a"
[[consumers]]
name = "b"
stream = "EVENTS"
handler = "h"
codec = "json"
dead_letter_subject = "dlq.a"
[[consumers]]
name = "c"
stream = "EVENTS"
handler = "h"
dead_letter_subject = "other_dlq"
"#;
        let config = Config::from_toml_with_env(text, Path::new("t.toml"), std::iter::empty());
        let Ok(config) = config else {
            panic!("config: {config:?}");
        };
        let streams = dead_letter_streams(&config);
        let names: Vec<&str> = streams.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["DLQ", "DLQ2"]);
        let shared = &streams[0].subjects["dlq.a"];
        let consumers: Vec<&str> = shared.iter().map(|s| s.consumer.as_str()).collect();
        assert_eq!(consumers, ["a", "b"]);
        assert_eq!(shared[1].codec, CodecKind::Json);
        assert_eq!(
            streams[1].subjects.keys().collect::<Vec<_>>(),
            ["other_dlq"]
        );
    }
}
