//! Dead letters: the copy of a message no handler could process, with why.
//!
//! The copy carries the original payload and headers plus the `Jetworker-*` headers
//! below; the original's `traceparent` and `tracestate` keep it in the message's trace
//! (one is added when the original had none and a delivery's trace is current). Original headers starting with `Nats-` are kept under
//! `Jetworker-Original-<name>` so they cannot steer the dead-letter publish (a
//! `Nats-Expected-*` header would make it fail; the original `Nats-Msg-Id` would clash),
//! the original's `Nats-Msg-Id` as [`ORIGINAL_MSG_ID`] (see there why not under the prefix).
//! The copy's `Nats-Msg-Id` is derived from (stream, sequence), so publishing it twice
//! (a retry, two replicas, the safety net and the normal path) stores it once within the
//! dead-letter stream's duplicate window.
//!
//! The copy always fits the server's max payload, so that a message near that size
//! (hostile or not) still ends settled: the original's headers that do not fit are left
//! out, largest first, and named in [`DROPPED_HEADERS`] (and logged). When the payload
//! alone leaves no room for the dead-letter headers, it is not lost: it is stored first
//! in the JetStream object store, in the dead-letter stream's [`payload_bucket`] (created
//! next to it when missing, by `provision` or on first use), under the copy's
//! [`message_id`]; the copy then carries no payload, [`PAYLOAD_DROPPED`] (its size) and
//! [`PAYLOAD_OBJECT`] (where it is). Only once both are stored is the original termed;
//! when the object cannot be stored the publish fails like any other, and the original
//! is kept. `dlq show` / `replay` read the payload from the object, `replay` and `purge`
//! delete the object after the letter (never before: the letter is the record).
//!
//! Whether the dead-letter stream keeps what it acknowledges is checked by `check` and
//! `provision` from the config and, while the worker runs, from the server's stream
//! info, by the same rules ([`guard`]): while the stream would drop copies, none is
//! published and no original termed.

mod guard;

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, Instant};

use async_nats::header::HeaderName;
use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;

use crate::error::Error;
use crate::outcome::Reason;

use guard::Proof;
pub use guard::{keeping_problems, DeadLetterGuards, HandOff, KeepingFacts, StreamGuard};

/// Subject the original was published to.
pub const ORIGINAL_SUBJECT: &str = "Jetworker-Original-Subject";
/// Stream the original is stored in.
pub const STREAM: &str = "Jetworker-Stream";
/// The original's stream sequence.
pub const SEQUENCE: &str = "Jetworker-Sequence";
/// The consumer that gave up on it.
pub const CONSUMER: &str = "Jetworker-Consumer";
/// Deliveries made (the server's count).
pub const ATTEMPTS: &str = "Jetworker-Attempts";
/// Why: exhausted, permanent, decode, too_large, panic, timeout, abandoned.
pub const REASON: &str = "Jetworker-Reason";
/// The last error text, bounded to [`MAX_ERROR_LEN`] bytes.
pub const ERROR: &str = "Jetworker-Error";
/// When it was dead-lettered (RFC 3339, UTC).
pub const TIME: &str = "Jetworker-Time";
/// Prefix under which the original's `Nats-*` headers are kept.
pub const ORIGINAL_PREFIX: &str = "Jetworker-Original-";
/// The original's own `Nats-Msg-Id`, when it had one. Not `Jetworker-Original-Nats-Msg-Id`:
/// nats-server 2.9 reads a message id only at the first place `Nats-Msg-Id` occurs in the
/// header block, and the client writes headers in no fixed order, so a copy carrying
/// that name would, about every other time, have no message id for the server and be
/// stored again when it is published again.
pub const ORIGINAL_MSG_ID: &str = "Jetworker-Original-Msg-Id";

/// Where a copy keeps a header whose name or value contains the text `Nats-Msg-Id`
/// (other than its own message id): one header `Jetworker-Escaped-Header-<n>` (`n` from
/// 1; distinct names, as async-nats reads back only one value per name from a stream
/// get) per such header, its value `<name>:<value>`, both escaped so that the text no
/// longer occurs (`%` as `%25`, the `-` before `Id` as `%2D`). nats-server 2.9 looks for
/// the message id only at the first place the text occurs in the header block, and the
/// client writes headers in no fixed order: a header such as `X-Nats-Msg-Id`, an error
/// or subject naming it, would otherwise hide the copy's id now and then, and a copy
/// published twice would be stored twice. [`restore_escaped`] gives the copy's headers
/// back as they were meant; `dlq` reads letters through it.
pub const ESCAPED_HEADER: &str = "Jetworker-Escaped-Header";

/// The text nats-server 2.9 looks for (see [`ESCAPED_HEADER`]).
const MSG_ID_TEXT: &str = "Nats-Msg-Id";

/// `text` with `%` written `%25` and every `Nats-Msg-Id` written `Nats-Msg%2DId`.
fn escape(text: &str) -> String {
    text.replace('%', "%25")
        .replace(MSG_ID_TEXT, "Nats-Msg%2DId")
}

/// The inverse of [`escape`]: `%25` and `%2D` decoded, anything else kept.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        match rest.get(at + 1..at + 3) {
            Some("25") => out.push('%'),
            Some("2D") => out.push('-'),
            _ => {
                out.push('%');
                rest = &rest[at + 1..];
                continue;
            }
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    out
}

/// Whether `name` is one of the [`ESCAPED_HEADER`] names.
fn is_escaped_name(name: &str) -> bool {
    name.len() >= ESCAPED_HEADER.len()
        && name.is_char_boundary(ESCAPED_HEADER.len())
        && name[..ESCAPED_HEADER.len()].eq_ignore_ascii_case(ESCAPED_HEADER)
}

/// Whether a copy stores the header `name: value` as an [`ESCAPED_HEADER`] entry: when
/// its name or value contains `Nats-Msg-Id`, or its name is one of the escaped names (a
/// header of those names from the original is wrapped too: restoring never reads what a
/// sender wrote as if the copy had escaped it).
fn needs_escape(name: &str, value: &str) -> bool {
    name.contains(MSG_ID_TEXT) || value.contains(MSG_ID_TEXT) || is_escaped_name(name)
}

/// The value of the [`ESCAPED_HEADER`] entry that keeps `name: value`.
fn escaped_value(name: &str, value: &str) -> String {
    format!("{}:{}", escape(name), escape(value))
}

/// A copy's header entry as stored: itself, or `(ESCAPED_HEADER, <name>:<value>)`
/// escaped when [`needs_escape`] says so (numbered when the copy is assembled).
fn stored_entry(name: &str, value: &str) -> (String, String) {
    if needs_escape(name, value) {
        (ESCAPED_HEADER.to_string(), escaped_value(name, value))
    } else {
        (name.to_string(), value.to_string())
    }
}

/// A stored dead letter's headers as they were meant: each [`ESCAPED_HEADER`] entry
/// back under its own name (after the others, in their order), everything else as
/// stored.
pub fn restore_escaped(stored: &HeaderMap) -> HeaderMap {
    if !stored
        .iter()
        .any(|(name, _)| is_escaped_name(name.as_ref()))
    {
        return stored.clone();
    }
    let mut out = HeaderMap::new();
    let mut escaped = Vec::new();
    for (name, values) in stored.iter() {
        let name: &str = name.as_ref();
        if is_escaped_name(name) {
            let n: u64 = name[ESCAPED_HEADER.len()..]
                .trim_start_matches('-')
                .parse()
                .unwrap_or(u64::MAX);
            escaped.extend(values.iter().map(|v| (n, v.as_str().to_string())));
            continue;
        }
        for value in values {
            out.append(name, value.as_str());
        }
    }
    escaped.sort();
    for (_, entry) in escaped {
        let Some((name, value)) = entry.split_once(':') else {
            continue;
        };
        let (name, value) = (unescape(name), unescape(value));
        if let Ok(name) = name.parse::<async_nats::header::HeaderName>() {
            out.append(name, value.as_str());
        }
    }
    out
}
/// Set by `dlq replay` on the republished message: how many times it was replayed.
pub const REPLAY_COUNT: &str = "Jetworker-Replay-Count";

/// The original's headers left out of the copy to fit the server's max payload.
pub const DROPPED_HEADERS: &str = "Jetworker-Dropped-Headers";
/// Set (to the payload's size in bytes) when the payload itself was left out.
pub const PAYLOAD_DROPPED: &str = "Jetworker-Payload-Dropped";

/// Set when the payload did not fit the copy and is kept in the JetStream object store
/// instead: `<bucket>/<object>`, the bucket being the dead-letter stream's
/// [`payload_bucket`] and the object named by the copy's [`message_id`]. `dlq show` and
/// `dlq replay` read the payload from there, `dlq replay` and `dlq purge` delete it after
/// the letter.
pub const PAYLOAD_OBJECT: &str = "Jetworker-Payload-Object";

/// Room kept for [`PAYLOAD_OBJECT`] when the payload goes to the object store.
const PAYLOAD_ROOM: usize = 1024;

/// Longest error text stored.
pub const MAX_ERROR_LEN: usize = 1024;

/// Size of a header block on the wire (`NATS/1.0`, one line per value, blank line), as
/// the server counts it against its max payload.
pub fn wire_len(headers: &HeaderMap) -> usize {
    let mut len = "NATS/1.0\r\n\r\n".len();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        for value in values {
            len += name.len() + ": \r\n".len() + value.as_str().len();
        }
    }
    len
}

/// The message id of the dead-letter copy that `consumer` made of message `sequence` of
/// `stream`: `jetworker-dl.<stream>.<sequence>.<consumer>`. Per consumer, so that two
/// consumers of one stream (a fan-out) that give up on the same message leave two dead
/// letters in a shared dead-letter stream, while a retried or doubled publish of one
/// consumer's copy (or the safety net's copy of the same delivery) is stored once. The
/// dots cannot occur in stream or consumer names, so no two triples share an id.
pub fn message_id(stream: &str, sequence: u64, consumer: &str) -> String {
    format!("jetworker-dl.{stream}.{sequence}.{consumer}")
}

/// Everything recorded about a dead letter besides the payload.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The original's subject.
    pub subject: String,
    /// The original's headers (may be empty).
    pub headers: HeaderMap,
    /// Stream of the original.
    pub stream: String,
    /// Stream sequence of the original.
    pub sequence: u64,
    /// Consumer that gave up.
    pub consumer: String,
    /// Deliveries made.
    pub attempts: u64,
    /// Why.
    pub reason: Reason,
    /// The last error.
    pub error: String,
}

/// A header value safe to send: no CR/LF or other control characters, bounded length.
pub fn header_value(text: &str, max: usize) -> String {
    // Printable ASCII within bounds (the usual subject or error) is kept as it is.
    if text.len() <= max && text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return text.to_owned();
    }
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > max {
        let mut cut = max.saturating_sub(3);
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

/// One of the original's headers as the copy carries it: under its name in the copy
/// (`Nats-*` moved, see [`DeadLetter::original_entries`]), not yet escaped.
struct Original<'a> {
    name: Cow<'a, str>,
    value: &'a str,
}

impl Original<'_> {
    fn escaped(&self) -> bool {
        needs_escape(&self.name, self.value)
    }

    /// Its name as stored ([`ESCAPED_HEADER`] when escaped).
    fn stored_name(&self) -> &str {
        if self.escaped() {
            ESCAPED_HEADER
        } else {
            &self.name
        }
    }

    /// Its size on the wire as stored; an escaped entry's name gets a number (`-<n>`,
    /// counted as 8 bytes).
    fn stored_len(&self) -> usize {
        if self.escaped() {
            ESCAPED_HEADER.len() + 8 + escape(&self.name).len() + 1 + escape(self.value).len() + 4
        } else {
            self.name.len() + self.value.len() + 4
        }
    }
}

/// A copy's header map as it is filled: escaped entries numbered in the order they come.
struct CopyHeaders {
    map: HeaderMap,
    escaped: usize,
}

impl CopyHeaders {
    fn new() -> Self {
        CopyHeaders {
            map: HeaderMap::new(),
            escaped: 0,
        }
    }

    fn put_escaped(&mut self, name: &str, value: &str) {
        self.escaped += 1;
        let numbered = format!("{ESCAPED_HEADER}-{}", self.escaped);
        self.map
            .insert(numbered.as_str(), escaped_value(name, value));
    }

    /// An original's header.
    fn put_original(&mut self, original: &Original<'_>) {
        if original.escaped() {
            self.put_escaped(&original.name, original.value);
        } else {
            self.map.append(original.name.as_ref(), original.value);
        }
    }

    /// One of the copy's own headers (a constant name needs no copy of it).
    fn put_own(&mut self, name: Cow<'static, str>, value: String) {
        if needs_escape(&name, &value) {
            self.put_escaped(&name, &value);
            return;
        }
        match name {
            Cow::Borrowed(name) => self.map.append(HeaderName::from_static(name), value),
            Cow::Owned(name) => self.map.append(name.as_str(), value),
        }
    }
}

impl DeadLetter {
    /// The headers of the copy.
    pub fn headers(&self) -> HeaderMap {
        self.assemble(&self.original_entries(), &[])
    }

    /// The copy's headers and payload, within `max_size` bytes on the wire (see the
    /// module docs for what is left out when everything does not fit).
    pub fn copy_within(&self, payload: Bytes, max_size: usize) -> (HeaderMap, Bytes) {
        let originals = self.original_entries();
        let full = self.assemble(&originals, &[]);
        if wire_len(&full) + payload.len() <= max_size {
            return (full, payload);
        }
        // Room for our own headers and the (bounded) list of dropped names.
        let own = wire_len(&self.assemble(&[], &[])) + DROPPED_HEADERS.len() + 1024 + 4;
        let mut kept_len: usize = originals.iter().map(Original::stored_len).sum();
        let mut by_size: Vec<usize> = (0..originals.len()).collect();
        by_size.sort_by_key(|i| std::cmp::Reverse(originals[*i].stored_len()));
        let mut keep = vec![true; originals.len()];
        let mut dropped = Vec::new();
        for i in by_size {
            if own + kept_len + payload.len() <= max_size {
                break;
            }
            keep[i] = false;
            kept_len -= originals[i].stored_len();
            dropped.push(originals[i].stored_name());
        }
        if own + kept_len + payload.len() <= max_size {
            let headers = self.assemble(
                &kept(&originals, &keep),
                &[(DROPPED_HEADERS, name_list(dropped))],
            );
            return (headers, payload);
        }
        // The payload goes elsewhere (see `publish`): keep the original headers that fit
        // without it, largest left out first again.
        let mut room = max_size.saturating_sub(own + PAYLOAD_ROOM);
        let mut by_size: Vec<usize> = (0..originals.len()).collect();
        by_size.sort_by_key(|i| originals[*i].stored_len());
        let mut keep = vec![false; originals.len()];
        let mut left_out = Vec::new();
        for i in by_size {
            let len = originals[i].stored_len();
            if len <= room {
                room -= len;
                keep[i] = true;
            } else {
                left_out.push(originals[i].stored_name());
            }
        }
        let size = payload.len().to_string();
        let headers = self.assemble(
            &kept(&originals, &keep),
            &[
                (DROPPED_HEADERS, name_list(left_out)),
                (PAYLOAD_DROPPED, size),
            ],
        );
        (headers, Bytes::new())
    }

    /// The original's headers as the copy carries them: `Nats-*` moved under
    /// [`ORIGINAL_PREFIX`], `Nats-Msg-Id` to [`ORIGINAL_MSG_ID`].
    fn original_entries(&self) -> Vec<Original<'_>> {
        let mut out = Vec::new();
        for (name, values) in self.headers.iter() {
            let name: &str = name.as_ref();
            let target = if name.eq_ignore_ascii_case("nats-msg-id") {
                Cow::Borrowed(ORIGINAL_MSG_ID)
            } else if name.len() >= 5 && name.as_bytes()[..5].eq_ignore_ascii_case(b"nats-") {
                Cow::Owned(format!("{ORIGINAL_PREFIX}{name}"))
            } else {
                Cow::Borrowed(name)
            };
            for value in values {
                out.push(Original {
                    name: target.clone(),
                    value: value.as_str(),
                });
            }
        }
        out
    }

    /// `originals`, then the dead-letter headers (which win over same-named originals),
    /// then `extra` (skipping empty values), each escaped as [`needs_escape`] says, and
    /// the copy's message id.
    fn assemble(&self, originals: &[Original<'_>], extra: &[(&'static str, String)]) -> HeaderMap {
        let own = self.own_entries(originals, extra);
        let mut out = CopyHeaders::new();
        for original in originals {
            let name = original.stored_name();
            if !own.iter().any(|(ours, _)| ours.eq_ignore_ascii_case(name)) {
                out.put_original(original);
            }
        }
        for (name, value) in own {
            out.put_own(name, value);
        }
        out.map.insert(
            HeaderName::from_static("Nats-Msg-Id"),
            message_id(&self.stream, self.sequence, &self.consumer),
        );
        out.map
    }

    /// The dead-letter headers of the copy but its message id, then `extra` (skipping
    /// empty values), as meant (not yet escaped).
    fn own_entries(
        &self,
        originals: &[Original<'_>],
        extra: &[(&'static str, String)],
    ) -> Vec<(Cow<'static, str>, String)> {
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut own: Vec<(Cow<'static, str>, String)> = Vec::with_capacity(12);
        own.extend([
            (ORIGINAL_SUBJECT.into(), header_value(&self.subject, 4096)),
            (STREAM.into(), self.stream.clone()),
            (SEQUENCE.into(), self.sequence.to_string()),
            (CONSUMER.into(), self.consumer.clone()),
            (ATTEMPTS.into(), self.attempts.to_string()),
            (REASON.into(), self.reason.as_str().into()),
            (ERROR.into(), header_value(&self.error, MAX_ERROR_LEN)),
            (TIME.into(), now),
        ]);
        // The copy is in the message's trace: it keeps the original's traceparent and
        // tracestate (a replay continues the sender's trace); a message that came
        // without one (or whose header did not fit) gets the trace of the delivery that
        // gave up on it, when there is one (the exported span, feature `otel`).
        let traced = originals.iter().any(|original| {
            original
                .stored_name()
                .eq_ignore_ascii_case(crate::trace::TRACEPARENT)
        });
        if !traced {
            if let Some(trace) = crate::trace::continuing(&self.headers) {
                let mut context = HeaderMap::new();
                trace.insert_into(&mut context);
                for (name, values) in context.iter() {
                    let name: &str = name.as_ref();
                    for value in values {
                        own.push((Cow::Owned(name.to_string()), value.as_str().to_string()));
                    }
                }
            }
        }
        for (name, value) in extra {
            if !value.is_empty() {
                own.push((Cow::Borrowed(name), value.clone()));
            }
        }
        own
    }
}

/// The originals whose `keep` is set.
fn kept<'a>(originals: &[Original<'a>], keep: &[bool]) -> Vec<Original<'a>> {
    originals
        .iter()
        .zip(keep)
        .filter(|(_, keep)| **keep)
        .map(|(original, _)| Original {
            name: original.name.clone(),
            value: original.value,
        })
        .collect()
}

/// The [`DROPPED_HEADERS`] value naming `names`: sorted, each once, bounded.
fn name_list(mut names: Vec<&str>) -> String {
    names.sort_unstable();
    names.dedup();
    header_value(&names.join(", "), 1024)
}

/// Why a dead-letter publish failed. Either way the copy is not known to be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterErrorKind {
    /// The publish or its PubAck failed (the client's error is the source).
    Publish,
    /// No PubAck came within the timeout.
    Timeout,
    /// The payload, too large for the copy, could not be stored in the dead-letter
    /// stream's payload bucket (the copy was not published).
    PayloadStore,
    /// The dead-letter stream, as the server has it now, would drop copies (the
    /// consumer's run-time check of that stream says so): none is published, or one
    /// acknowledged is not relied on.
    StreamWouldDrop,
}

impl fmt::Display for DeadLetterErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeadLetterErrorKind::Publish => "the dead-letter publish failed",
            DeadLetterErrorKind::Timeout => "no PubAck for the dead-letter copy in time",
            DeadLetterErrorKind::PayloadStore => {
                "the payload too large for the dead-letter copy could not be stored in the object store"
            }
            DeadLetterErrorKind::StreamWouldDrop => "the dead-letter stream would drop copies",
        })
    }
}

/// A dead-letter publish that failed; the message names the dead-letter subject.
pub type DeadLetterError = Error<DeadLetterErrorKind>;

/// The dead-letter subject a publish was for.
#[derive(Debug)]
struct DeadLetterSubject(String);

impl DeadLetterError {
    /// The dead-letter subject the copy was published to.
    pub fn subject(&self) -> Option<&str> {
        self.detail::<DeadLetterSubject>().map(|s| s.0.as_str())
    }
}

impl DeadLetter {
    /// Publishes this letter with `payload` to `subject` and waits for the server's
    /// PubAck (bounded by `timeout`). Only an `Ok` means the copy is stored.
    pub async fn publish(
        &self,
        js: &jetstream::Context,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<jetstream::publish::PublishAck, DeadLetterError> {
        publish(js, subject, self, payload, timeout).await
    }
}

/// [`publish`], trusting the PubAck only as far as `guard` (the consumer's
/// [`StreamGuard`]) says the dead-letter stream keeps copies: nothing is published while
/// the last read of the stream found it would drop them (and that read is under a
/// second old); a PubAck from another stream than the one capturing the subject is
/// refused; a PubAck is believed when a read of the stream's info begun after it (one
/// request, shared with every copy acknowledged meanwhile) finds the same stream (not
/// made again) fit to keep copies. When that read cannot tell, and for a `duplicate`
/// PubAck (whose earlier copy may have been dropped), the letter it names is read back
/// (at its sequence, with the copy's `Nats-Msg-Id`); a letter missing from a fit stream
/// that removes acked messages (interest or work-queue retention, read by the app's own
/// consumer) is believed read, unless the PubAck said `duplicate`. A failed publish makes
/// the guard read the stream too, so that the reason it names is the stream's. Without a
/// guard, [`publish`].
pub(crate) async fn publish_kept(
    js: &jetstream::Context,
    guard: Option<&StreamGuard>,
    subject: &str,
    letter: &DeadLetter,
    payload: Bytes,
    timeout: Duration,
) -> Result<jetstream::publish::PublishAck, DeadLetterError> {
    let Some(guard) = guard else {
        return publish(js, subject, letter, payload, timeout).await;
    };
    let would_drop = |why: String| {
        DeadLetterError::new(DeadLetterErrorKind::StreamWouldDrop)
            .with_message(format!("dead letter for {subject} not relied on: {why}"))
            .with_detail(DeadLetterSubject(subject.to_string()))
    };
    if guard.problem().is_some() {
        let recent = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        Box::pin(guard.keeping_since(js, recent))
            .await
            .map_err(would_drop)?;
    }
    let ack = match publish(js, subject, letter, payload, timeout).await {
        Ok(ack) => ack,
        Err(e) => {
            // A failed publish is a reason to look: the stream may have changed.
            Box::pin(guard.keeping_since(js, Instant::now()))
                .await
                .map_err(would_drop)?;
            return Err(e);
        }
    };
    let acked = Instant::now();
    if !guard.is_expected_stream(&ack.stream) {
        return Err(would_drop(format!(
            "the PubAck came from stream {:?}, not the stream that captures the subject",
            ack.stream
        )));
    }
    if !ack.duplicate {
        match guard.proves_kept(js, acked, &ack.stream).await {
            Proof::Kept => {
                guard.stored();
                return Ok(ack);
            }
            Proof::WouldDrop(why) => return Err(would_drop(why)),
            Proof::Unknown => {}
        }
    }
    let id = message_id(&letter.stream, letter.sequence, &letter.consumer);
    // Boxed, like the reads of the stream's info above: rare, and their futures would
    // otherwise make every dead letter's larger.
    let read = Box::pin(read_back(js, &ack, &id, guard.direct_get(), timeout));
    if let Err(why) = read.await {
        // Say why in the stream's own terms when its info shows it.
        Box::pin(guard.keeping_since(js, Instant::now()))
            .await
            .map_err(would_drop)?;
        // A stream fit to keep copies that removes acked messages may have had this
        // letter read and acked already (the app's own consumer of dead letters); a
        // stream that keeps by limits has no such excuse.
        if ack.duplicate || !guard.removes_acked() {
            return Err(would_drop(why));
        }
    }
    guard.stored();
    Ok(ack)
}

/// Reads the message `ack` names back from its stream: `Ok` when it is there with
/// `Nats-Msg-Id` `id`, else why not (within `timeout`). With `direct`, a direct get is
/// tried first (answered by the stream without the JetStream API, and in a cluster by
/// any replica, which may not have it yet): what it does not confirm is read from the
/// stream's leader.
async fn read_back(
    js: &jetstream::Context,
    ack: &jetstream::publish::PublishAck,
    id: &str,
    direct: bool,
    timeout: Duration,
) -> Result<(), String> {
    let holds_id = |found: &jetstream::message::StreamMessage| {
        found.headers.get("Nats-Msg-Id").map(|v| v.as_str()) == Some(id)
    };
    if direct {
        let get = async {
            let stream = js.get_stream_no_info(&ack.stream).await.ok()?;
            stream.direct_get(ack.sequence).await.ok()
        };
        if let Ok(Some(found)) = tokio::time::timeout(timeout, get).await {
            if holds_id(&found) {
                return Ok(());
            }
        }
    }
    let at = format!("sequence {} of stream {:?}", ack.sequence, ack.stream);
    let what = if ack.duplicate {
        "the PubAck says it is a duplicate, and the copy it names"
    } else {
        "the PubAck says it is stored, and the copy"
    };
    let get = async {
        let stream = js
            .get_stream_no_info(&ack.stream)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .get_raw_message(ack.sequence)
            .await
            .map_err(|e| e.to_string())
    };
    let found = match tokio::time::timeout(timeout, get).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return Err(format!("{what} ({at}) could not be read back: {e}")),
        Err(_) => {
            return Err(format!(
                "{what} ({at}) could not be read back within {}",
                humantime::format_duration(timeout)
            ))
        }
    };
    if holds_id(&found) {
        return Ok(());
    }
    Err(format!(
        "{what} ({at}) is not there: that sequence holds {}; retried once the stream's duplicate window has passed",
        match found.headers.get("Nats-Msg-Id") {
            Some(other) => format!("the letter {:?}", other.as_str()),
            None => "a message without a Nats-Msg-Id".to_string(),
        }
    ))
}

/// Publishes the copy and waits for the server's PubAck (bounded by `timeout`). Only an
/// `Ok` means the copy is stored.
pub async fn publish(
    js: &jetstream::Context,
    subject: &str,
    letter: &DeadLetter,
    payload: Bytes,
    timeout: Duration,
) -> Result<jetstream::publish::PublishAck, DeadLetterError> {
    let what = || format!("dead-letter publish to {subject} failed");
    let failed = |error: DeadLetterError, message: String| {
        error
            .with_message(message)
            .with_detail(DeadLetterSubject(subject.to_string()))
    };
    let publish_failed = |e: Box<dyn std::error::Error + Send + Sync>| {
        failed(
            DeadLetterError::with_source(DeadLetterErrorKind::Publish, e),
            what(),
        )
    };
    let max_payload = match js.client().max_payload() {
        0 => usize::MAX,
        n => n,
    };
    let (mut headers, copied) = letter.copy_within(payload.clone(), max_payload);
    let dropped_headers = headers.get(DROPPED_HEADERS).map(|d| d.as_str().to_string());
    if headers.get(PAYLOAD_DROPPED).is_some() {
        // The payload goes to the object store first: the copy is published (and the
        // original termed) only once what carries the payload is stored.
        // Boxed: the rare path's future would otherwise make every publish's larger.
        let store = Box::pin(store_payload(js, subject, letter, &payload));
        let object = tokio::time::timeout(timeout, store)
            .await
            .unwrap_or_else(|_| {
                Err(
                    DeadLetterError::new(DeadLetterErrorKind::PayloadStore).with_message(format!(
                        "storing the payload of a dead letter for {subject} took longer than {}",
                        humantime::format_duration(timeout)
                    )),
                )
            })
            .map_err(|e| e.with_detail(DeadLetterSubject(subject.to_string())))?;
        tracing::warn!(
            stream = %letter.stream, seq = letter.sequence, consumer = %letter.consumer,
            max_payload, payload_bytes = payload.len(), payload_object = %object,
            dropped_headers = dropped_headers.as_deref().unwrap_or(""),
            "the dead-letter copy would exceed the server's max payload: its payload is kept in the object store"
        );
        match stored_entry(PAYLOAD_OBJECT, &object) {
            (name, value) if name == ESCAPED_HEADER => headers.insert(
                format!("{ESCAPED_HEADER}-{}", u16::MAX).as_str(),
                value.as_str(),
            ),
            (name, value) => headers.insert(name.as_str(), value.as_str()),
        }
    } else if let Some(dropped) = dropped_headers {
        tracing::warn!(
            stream = %letter.stream, seq = letter.sequence, max_payload,
            dropped_headers = %dropped,
            "the dead-letter copy would exceed the server's max payload: left out headers that do not fit"
        );
    }
    let publish = async {
        js.publish_with_headers(subject.to_string(), headers, copied)
            .await
            .map_err(|e| publish_failed(e.into()))?
            .await
            .map_err(|e| publish_failed(e.into()))
    };
    tokio::time::timeout(timeout, publish).await.map_err(|_| {
        failed(
            DeadLetterError::new(DeadLetterErrorKind::Timeout),
            format!(
                "{}: no PubAck within {}",
                what(),
                humantime::format_duration(timeout)
            ),
        )
    })?
}

/// The object-store bucket that keeps the payloads too large for the copies in the
/// dead-letter stream `dead_letter_stream`: `<stream>_payloads` (characters a bucket
/// name cannot have become `_`). Its stream is `OBJ_<bucket>`.
pub fn payload_bucket(dead_letter_stream: &str) -> String {
    let name: String = dead_letter_stream
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{name}_payloads")
}

/// The bucket and the object a [`PAYLOAD_OBJECT`] header names.
pub fn payload_object(header: &str) -> Option<(&str, &str)> {
    header
        .split_once('/')
        .filter(|(bucket, object)| !bucket.is_empty() && !object.is_empty())
}

/// The payload bucket of the dead-letter stream `stream` (see [`payload_bucket`]),
/// created when missing with the stream's storage, replicas and max age, so payloads
/// expire with their letters.
pub async fn payload_store(
    js: &jetstream::Context,
    stream: &jetstream::stream::Info,
) -> Result<jetstream::object_store::ObjectStore, DeadLetterError> {
    let bucket = payload_bucket(&stream.config.name);
    let store_failed = |e: Box<dyn std::error::Error + Send + Sync>, what: &str| {
        DeadLetterError::with_source(DeadLetterErrorKind::PayloadStore, e)
            .with_message(format!("{what} payload bucket {bucket:?}"))
    };
    match js.get_object_store(&bucket).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_object_store(jetstream::object_store::Config {
                bucket: bucket.clone(),
                description: Some(format!(
                    "Payloads too large for the dead letters of stream {}",
                    stream.config.name
                )),
                max_age: stream.config.max_age,
                storage: stream.config.storage,
                num_replicas: stream.config.num_replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| store_failed(e.into(), "creating")),
    }
}

/// Stores `payload` as the object [`message_id`] of `letter` in the payload bucket of
/// the stream that captures `subject`. Returns the [`PAYLOAD_OBJECT`] value. Storing it
/// again (a retried dead letter) replaces the object with the same bytes.
async fn store_payload(
    js: &jetstream::Context,
    subject: &str,
    letter: &DeadLetter,
    payload: &Bytes,
) -> Result<String, DeadLetterError> {
    let failed = |e: Box<dyn std::error::Error + Send + Sync>, what: String| {
        DeadLetterError::with_source(DeadLetterErrorKind::PayloadStore, e).with_message(what)
    };
    let stream = js
        .stream_by_subject(subject)
        .await
        .map_err(|e| failed(e.into(), format!("finding the stream of {subject}")))?;
    let info = js
        .get_stream(&stream)
        .await
        .map_err(|e| failed(e.into(), format!("reading stream {stream:?}")))?
        .cached_info()
        .clone();
    let store = payload_store(js, &info).await?;
    let name = message_id(&letter.stream, letter.sequence, &letter.consumer);
    let mut bytes: &[u8] = payload.as_ref();
    store.put(name.as_str(), &mut bytes).await.map_err(|e| {
        failed(
            e.into(),
            format!("storing {name} in {}", payload_bucket(&stream)),
        )
    })?;
    Ok(format!("{}/{name}", payload_bucket(&stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_everything_and_move_nats_headers() {
        let mut original = HeaderMap::new();
        original.insert("Nats-Msg-Id", "publisher-id-1");
        original.insert("Nats-Expected-Stream", "EVENTS");
        original.insert("traceparent", "00-abc-def-01");
        let letter = DeadLetter {
            subject: "events.click".into(),
            headers: original,
            stream: "EVENTS".into(),
            sequence: 42,
            consumer: "clicks".into(),
            attempts: 5,
            reason: Reason::Exhausted,
            error: "line one\r\nline two".into(),
        };
        let h = letter.headers();
        let get = |k: &str| h.get(k).map(|v| v.as_str().to_string());
        assert_eq!(
            get("Nats-Msg-Id").as_deref(),
            Some("jetworker-dl.EVENTS.42.clicks")
        );
        assert_eq!(get(ORIGINAL_MSG_ID).as_deref(), Some("publisher-id-1"));
        // The copy's own message id is the only place the server can find the text
        // `Nats-Msg-Id` (nats-server 2.9 looks no further than its first occurrence).
        let elsewhere = lines_naming_the_id(&h);
        assert!(elsewhere.is_empty(), "{elsewhere:?}");
        assert_eq!(
            get("Jetworker-Original-Nats-Expected-Stream").as_deref(),
            Some("EVENTS")
        );
        assert!(get("Nats-Expected-Stream").is_none());
        assert_eq!(get("traceparent").as_deref(), Some("00-abc-def-01"));
        assert_eq!(get(ORIGINAL_SUBJECT).as_deref(), Some("events.click"));
        assert_eq!(get(STREAM).as_deref(), Some("EVENTS"));
        assert_eq!(get(SEQUENCE).as_deref(), Some("42"));
        assert_eq!(get(CONSUMER).as_deref(), Some("clicks"));
        assert_eq!(get(ATTEMPTS).as_deref(), Some("5"));
        assert_eq!(get(REASON).as_deref(), Some("exhausted"));
        assert_eq!(get(ERROR).as_deref(), Some("line one  line two"));
        assert!(get(TIME).is_some_and(|t| t.ends_with('Z')));
    }

    #[test]
    fn the_copys_own_headers_win_and_originals_keep_every_value() {
        // A replayed letter failing again: its old dead-letter headers are replaced.
        let mut original = HeaderMap::new();
        original.insert(REASON, "decode");
        original.insert("jetworker-attempts", "9");
        original.append("X-Multi", "first");
        original.append("X-Multi", "second");
        original.insert("nats-expected-last-sequence", "3");
        let letter = DeadLetter {
            subject: "events.größe".into(),
            headers: original,
            stream: "EVENTS".into(),
            sequence: 5,
            consumer: "c".into(),
            attempts: 2,
            reason: Reason::Permanent,
            error: "tab\there\u{7f}".into(),
        };
        let h = letter.headers();
        let all = |k: &str| {
            h.get_all(k)
                .map(|v| v.as_str().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(all(REASON), ["permanent"]);
        assert_eq!(all(ATTEMPTS), ["2"]);
        assert!(all("jetworker-attempts").is_empty());
        assert_eq!(all("X-Multi"), ["first", "second"]);
        assert_eq!(all("Jetworker-Original-nats-expected-last-sequence"), ["3"]);
        assert_eq!(all(ORIGINAL_SUBJECT), ["events.größe"]);
        assert_eq!(all(ERROR), ["tab here "]);
    }

    /// Every `name: value` line of `h` but the copy's own message id that contains
    /// `Nats-Msg-Id`.
    fn lines_naming_the_id(h: &HeaderMap) -> Vec<String> {
        h.iter()
            .filter(|(name, _)| AsRef::<str>::as_ref(*name) != "Nats-Msg-Id")
            .flat_map(|(name, values)| {
                let name: &str = name.as_ref();
                values
                    .iter()
                    .map(move |v| format!("{name}: {}", v.as_str()))
            })
            .filter(|line| line.contains(MSG_ID_TEXT))
            .collect()
    }

    #[test]
    fn headers_naming_the_message_id_are_escaped_and_restored() {
        let mut original = HeaderMap::new();
        original.insert("X-Nats-Msg-Id", "abc");
        original.insert("Note", "see Nats-Msg-Id, 100% and %2D");
        original.insert("Nats-Msg-Id", "id-Nats-Msg-Id");
        original.insert(ESCAPED_HEADER, "Forged:one");
        original.insert("jetworker-escaped-header-1", "Forged:two");
        original.insert("Plain", "kept");
        let letter = DeadLetter {
            subject: "jobs.Nats-Msg-Id".into(),
            headers: original,
            stream: "EVENTS".into(),
            sequence: 9,
            consumer: "jobs".into(),
            attempts: 2,
            reason: Reason::Permanent,
            error: "missing Nats-Msg-Id".into(),
        };
        let stored = letter.headers();
        assert!(
            lines_naming_the_id(&stored).is_empty(),
            "{:?}",
            lines_naming_the_id(&stored)
        );
        assert_eq!(
            stored.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some("jetworker-dl.EVENTS.9.jobs")
        );
        assert_eq!(stored.get("Plain").map(|v| v.as_str()), Some("kept"));
        // One value per name: a stream get keeps them all.
        assert!(stored.iter().all(|(_, values)| values.len() == 1));
        let restored = restore_escaped(&stored);
        let get = |k: &str| restored.get(k).map(|v| v.as_str().to_string());
        assert_eq!(get("X-Nats-Msg-Id").as_deref(), Some("abc"));
        assert_eq!(
            get("Note").as_deref(),
            Some("see Nats-Msg-Id, 100% and %2D")
        );
        assert_eq!(get(ORIGINAL_MSG_ID).as_deref(), Some("id-Nats-Msg-Id"));
        assert_eq!(get(ESCAPED_HEADER).as_deref(), Some("Forged:one"));
        assert_eq!(
            get("jetworker-escaped-header-1").as_deref(),
            Some("Forged:two")
        );
        assert!(
            restored.get("Forged").is_none(),
            "a sender's header is not unwrapped"
        );
        assert_eq!(get(ORIGINAL_SUBJECT).as_deref(), Some("jobs.Nats-Msg-Id"));
        assert_eq!(get(ERROR).as_deref(), Some("missing Nats-Msg-Id"));
        assert_eq!(get(REASON).as_deref(), Some("permanent"));
        // Nothing to restore: as stored.
        let plain = DeadLetter {
            subject: "jobs.1".into(),
            headers: HeaderMap::new(),
            error: "boom".into(),
            ..letter
        };
        let stored = plain.headers();
        assert!(!stored.iter().any(|(n, _)| is_escaped_name(n.as_ref())));
        assert_eq!(restore_escaped(&stored), stored);
        for text in ["", "%", "%2", "%2D%25%41", "a%25b", "Nats-Msg-Id"] {
            assert_eq!(unescape(&escape(text)), text);
        }
    }

    #[test]
    fn the_copy_fits_the_max_payload() {
        let mut original = HeaderMap::new();
        original.insert("X-Big", "b".repeat(10_000).as_str());
        original.insert("X-Small", "s");
        original.insert("Nats-Msg-Id", "m".repeat(5_000).as_str());
        let letter = DeadLetter {
            subject: "events.x".into(),
            headers: original,
            stream: "EVENTS".into(),
            sequence: 7,
            consumer: "c".into(),
            attempts: 1,
            reason: Reason::TooLarge,
            error: "e".repeat(5000),
        };
        let payload = Bytes::from(vec![1u8; 4_000]);
        // Everything fits: unchanged.
        let (h, p) = letter.copy_within(payload.clone(), 1 << 20);
        assert_eq!(p, payload);
        assert!(h.get(DROPPED_HEADERS).is_none() && h.get("X-Big").is_some());
        // The largest original header goes first.
        let (h, p) = letter.copy_within(payload.clone(), 12_000);
        assert_eq!(p, payload);
        assert!(wire_len(&h) + p.len() <= 12_000);
        assert_eq!(h.get(DROPPED_HEADERS).map(|v| v.as_str()), Some("X-Big"));
        assert!(h.get("X-Small").is_some());
        assert!(h.get(ORIGINAL_MSG_ID).is_some());
        // Then the next largest; what is small enough stays.
        let (h, p) = letter.copy_within(payload.clone(), 7_000);
        assert_eq!(p, payload);
        assert!(wire_len(&h) + p.len() <= 7_000);
        assert!(h.get(ORIGINAL_MSG_ID).is_none());
        assert!(h.get("X-Small").is_some());
        assert_eq!(
            h.get(DROPPED_HEADERS).map(|v| v.as_str()),
            Some("Jetworker-Original-Msg-Id, X-Big")
        );
        // Then the payload, whose size is recorded.
        let (h, p) = letter.copy_within(payload.clone(), 4_500);
        assert!(p.is_empty());
        assert!(wire_len(&h) <= 4_500);
        assert_eq!(h.get(PAYLOAD_DROPPED).map(|v| v.as_str()), Some("4000"));
        assert_eq!(h.get(SEQUENCE).map(|v| v.as_str()), Some("7"));
        assert_eq!(wire_len(&h), {
            let mut n = 12;
            for (k, vs) in h.iter() {
                let k: &str = k.as_ref();
                n += vs
                    .iter()
                    .map(|v| k.len() + v.as_str().len() + 4)
                    .sum::<usize>();
            }
            n
        });
    }

    #[test]
    fn error_text_is_bounded() {
        let long = "é".repeat(5000);
        let v = header_value(&long, MAX_ERROR_LEN);
        assert!(v.len() <= MAX_ERROR_LEN);
        assert!(v.ends_with("..."));
    }
}
