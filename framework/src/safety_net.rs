//! The safety net: dead letters for messages whose last delivery never settled.
//!
//! When a worker is killed (or a handler hangs past the ack wait) during a message's
//! last allowed delivery, the server stops delivering it and publishes a
//! `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>` advisory. Advisories
//! are core NATS messages, gone if nobody listens, so jetworker provisions a stream
//! ([`ADVISORY_STREAM`]) capturing them: none are lost while workers are down.
//!
//! The stream captures the advisories of *every* consumer of the account
//! ([`ADVISORY_SUBJECTS`]), never a list of this config's: two apps sharing an account,
//! or a rolling deploy onto a config with one more consumer, each provision the same
//! stream and none narrows what another relies on. For each configured consumer, every
//! worker that runs it runs an internal durable on that stream, filtered to that
//! consumer's advisories ([`safety_net_consumer_name`]): it only ever receives what it
//! owns, so it never acks away another app's advisory, and the replicas of one app share
//! it. It fetches the original by sequence and dead-letters it to that consumer's
//! dead-letter subject with reason `abandoned`, under the same message id as the normal path
//! (`jetworker-dl.<stream>.<seq>.<consumer>`), so a message copied by both is stored once. When the
//! original is already gone (age or size limits), a dead letter without payload records
//! that, with `Jetworker-Original-Missing: true`.
//!
//! It is also where a last delivery goes whose dead-letter copy the worker could not
//! store within its hold limit (see `/readyz` in the ops module): the worker publishes
//! a hand-off record ([`HAND_OFF_TYPE`]: stream, consumer, sequence, reason and error) to
//! that consumer's advisory subject and waits for the advisory stream's PubAck, then naks
//! it; the safety net retries the copy with its own slots while the original stays in
//! its stream. The record, not the server's advisory, is what the hand-over rests on:
//! an advisory emitted while the advisory stream has no leader (its leader's server
//! killed, as in a cluster fault) is gone. When the record cannot be stored either, the
//! worker keeps holding the original (progress acks) and retries both. Letters filed
//! from a record carry the worker's reason and error instead of `abandoned`, whichever
//! replica files them; the handing process also keeps that note in memory (in the
//! consumer's [`StreamGuard`](crate::dead_letter::StreamGuard)) for when it takes the
//! server's advisory first. When another replica takes the server's advisory before the
//! record, its letter says `abandoned` (the letter id is the same, so the record then
//! finds it stored): a missing note costs only the precise reason, never the letter.
//! `abandoned` otherwise means what it says: the last delivery never settled.
//!
//! The safety net publishes through the same guard as its consumer: while the
//! dead-letter stream would drop copies it files nothing and retries the advisory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use serde::Deserialize;

use crate::config::{Config, ConsumerConfig, StreamConfig};
use crate::dead_letter::{self, DeadLetter, DeadLetterGuards};
use crate::handler::HandlerError;
use crate::outcome::Reason;

/// The stream capturing max-deliveries advisories.
pub const ADVISORY_STREAM: &str = "JETWORKER_ADVISORIES";
/// What the advisory stream captures: the max-deliveries advisories of every consumer.
pub const ADVISORY_SUBJECTS: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>";
/// The prefix of the internal durables reading it (see [`safety_net_consumer_name`]).
pub const SAFETY_NET_CONSUMER: &str = "jetworker_safety_net";
/// The internal handler's name.
pub const HANDLER: &str = "jetworker.safety_net";
/// Header set on the record of an original that was gone.
pub const ORIGINAL_MISSING: &str = "Jetworker-Original-Missing";

/// The advisory subject for one consumer.
pub fn advisory_subject(stream: &str, consumer: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}")
}

/// The name of the safety net's durable for `consumer` of `stream`:
/// `jetworker_safety_net_<len>_<stream>_<consumer>`, where `<len>` is the stream name's
/// length, so that no two (stream, consumer) pairs share a durable.
pub fn safety_net_consumer_name(stream: &str, consumer: &str) -> String {
    format!("{SAFETY_NET_CONSUMER}_{}_{stream}_{consumer}", stream.len())
}

/// The advisory stream jetworker provisions for `config` (none without consumers).
pub fn advisory_stream(config: &Config) -> Option<StreamConfig> {
    if config.consumers.is_empty() {
        return None;
    }
    let replicas = config.streams.iter().map(|s| s.replicas).max().unwrap_or(1);
    Some(StreamConfig {
        name: ADVISORY_STREAM.to_string(),
        subjects: vec![ADVISORY_SUBJECTS.to_string()],
        replicas,
        max_age: Some(Duration::from_secs(7 * 24 * 3600)),
        description: Some(
            "jetworker safety net: max-deliveries advisories of the account's consumers".into(),
        ),
        ..StreamConfig::default()
    })
}

/// How long the safety net's own delivery of an advisory may go unacknowledged before
/// the server hands it to another worker: the advisory's handling is lost with a worker
/// killed while holding it, so this bounds how late a stranded message is dead-lettered
/// after such a crash. Handling takes two quick requests, and progress acks keep a slow
/// one (up to the handler timeout) from being redelivered.
pub const SAFETY_NET_ACK_WAIT: Duration = Duration::from_secs(10);

/// Attempts the safety net makes at one advisory: with waits up to 30 s between them,
/// about a day of retries (the advisory stream keeps a week) before it gives up and
/// files the advisory itself as the dead letter, so the original's stream and sequence
/// are still on record.
pub const SAFETY_NET_MAX_DELIVER: i64 = 3000;

/// The internal consumers reading the advisory stream, one per configured consumer,
/// each filtered to that consumer's advisories. Their own failures (after
/// [`SAFETY_NET_MAX_DELIVER`] attempts) go to that consumer's dead-letter subject, where
/// an operator sees them.
pub fn safety_net_consumers(config: &Config) -> Vec<ConsumerConfig> {
    config.consumers.iter().map(safety_net_consumer).collect()
}

/// The safety net's durable for `watched`.
fn safety_net_consumer(watched: &ConsumerConfig) -> ConsumerConfig {
    ConsumerConfig {
        name: safety_net_consumer_name(&watched.stream, &watched.name),
        stream: ADVISORY_STREAM.to_string(),
        filter_subject: Some(advisory_subject(&watched.stream, &watched.name)),
        handler: HANDLER.to_string(),
        codec: crate::config::CodecKind::Json,
        max_deliver: SAFETY_NET_MAX_DELIVER,
        backoff: Some(vec![
            Duration::from_secs(1),
            Duration::from_secs(5),
            Duration::from_secs(15),
            Duration::from_secs(30),
        ]),
        concurrency: 4,
        max_ack_pending: 100,
        ack_wait: SAFETY_NET_ACK_WAIT,
        handler_timeout: Duration::from_secs(30),
        dead_letter_subject: watched.dead_letter_subject.clone(),
        description: Some(format!(
            "jetworker safety net of {}/{}",
            watched.stream, watched.name
        )),
        ..ConsumerConfig::default()
    }
}

/// The fields of a max-deliveries advisory jetworker uses; a worker's [hand-off
/// record](HAND_OFF_TYPE) has them too, and says why.
#[derive(Debug, Clone, Deserialize)]
pub struct MaxDeliveriesAdvisory {
    /// Stream of the stranded message.
    pub stream: String,
    /// Consumer that gave up delivering it.
    pub consumer: String,
    /// Its stream sequence.
    pub stream_seq: u64,
    /// Deliveries made.
    pub deliveries: u64,
    /// The server's `io.nats.jetstream.advisory.v1.max_deliver`, or [`HAND_OFF_TYPE`].
    #[serde(default, rename = "type")]
    pub kind: String,
    /// A hand-off record's reason (the wire form of [`Reason`]).
    #[serde(default)]
    pub reason: Option<String>,
    /// A hand-off record's error: the handler's, and why the copy was not stored.
    #[serde(default)]
    pub error: Option<String>,
}

/// The `type` of a worker's hand-off record: published, and PubAcked by the advisory
/// stream, before a last delivery whose copy could not be stored is handed to the
/// safety net with a nak. The server's own max-deliveries advisory for that nak is a
/// core message the server stores only while the advisory stream has a leader: the
/// record does not depend on it (the safety net files the letter from whichever comes
/// first, under the same message id), and it carries the worker's reason and error to
/// whichever replica's safety net takes it. It goes to the advisory's own subject
/// ([`advisory_subject`]), so the same filtered durable receives both on every server
/// version; listeners to advisories see a message of this type there.
pub const HAND_OFF_TYPE: &str = "io.jetworker.safety_net.hand_off.v1";

/// Publishes the hand-off record of `sequence` of `stream`, given up by `consumer`
/// after `deliveries` (see [`HAND_OFF_TYPE`]), and waits for the advisory stream's
/// PubAck within `timeout`. `Err` says why it is not stored: then the original must not
/// be handed over (its advisory could be lost the same way).
pub(crate) async fn publish_hand_off(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
    sequence: u64,
    deliveries: u64,
    hand_off: &dead_letter::HandOff,
    timeout: Duration,
) -> Result<(), String> {
    let record = serde_json::json!({
        "type": HAND_OFF_TYPE,
        "stream": stream,
        "consumer": consumer,
        "stream_seq": sequence,
        "deliveries": deliveries,
        "reason": hand_off.reason.as_str(),
        "error": dead_letter::header_value(&hand_off.error, dead_letter::MAX_ERROR_LEN),
        "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    });
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Nats-Msg-Id",
        format!("jetworker-hand-off.{stream}.{sequence}.{consumer}").as_str(),
    );
    let subject = advisory_subject(stream, consumer);
    let publish = async {
        js.publish_with_headers(subject.clone(), headers, record.to_string().into())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    };
    let ack = tokio::time::timeout(timeout, publish)
        .await
        .map_err(|_| {
            format!(
                "no PubAck for the hand-off record on {subject} within {}",
                humantime::format_duration(timeout)
            )
        })?
        .map_err(|e| format!("the hand-off record on {subject} was not stored: {e}"))?;
    if ack.stream != ADVISORY_STREAM {
        return Err(format!(
            "the hand-off record on {subject} went to stream {:?}, not {ADVISORY_STREAM}: the safety net would not see it",
            ack.stream
        ));
    }
    Ok(())
}

/// Dead-letters stranded messages; see the module docs.
#[derive(Debug, Clone)]
pub struct SafetyNet {
    dead_letter_subjects: Arc<HashMap<(String, String), String>>,
    guards: DeadLetterGuards,
    timeout: Duration,
}

impl SafetyNet {
    /// For the consumers of `config`, whose dead-letter streams `guards` check.
    pub fn new(config: &Config, guards: &DeadLetterGuards) -> Self {
        SafetyNet {
            dead_letter_subjects: Arc::new(
                config
                    .consumers
                    .iter()
                    .map(|c| {
                        (
                            (c.stream.clone(), c.name.clone()),
                            c.dead_letter_subject.clone(),
                        )
                    })
                    .collect(),
            ),
            guards: guards.clone(),
            timeout: config.connection.request_timeout,
        }
    }

    /// Handles one advisory: copies the stranded original (or a record that it is gone)
    /// to its consumer's dead-letter subject. An error means "retry".
    pub async fn handle(
        &self,
        js: &jetstream::Context,
        advisory: MaxDeliveriesAdvisory,
    ) -> Result<(), HandlerError> {
        let key = (advisory.stream.clone(), advisory.consumer.clone());
        let Some(subject) = self.dead_letter_subjects.get(&key) else {
            // Unreachable through the filtered durables; never acked away if it happens:
            // retried, then filed as a dead letter an operator sees.
            return Err(HandlerError::transient(format!(
                "max-deliveries advisory for {}/{}, a consumer not in this config",
                advisory.stream, advisory.consumer
            )));
        };
        let stream = js
            .get_stream(&advisory.stream)
            .await
            .map_err(HandlerError::transient)?;
        let error = format!(
            "the last delivery ({} of {}) never settled: the worker was killed, the handler hung past the ack wait, or its dead-letter copy could not be stored in time and the worker handed it here",
            advisory.deliveries, advisory.deliveries
        );
        let guard = self.guards.get(&advisory.consumer);
        // Handed over knowing why (a note of this process, or the worker's hand-off
        // record): the letter says so.
        let recorded = advisory
            .reason
            .as_deref()
            .and_then(Reason::parse)
            .filter(|_| advisory.kind == HAND_OFF_TYPE)
            .map(|reason| dead_letter::HandOff {
                reason,
                error: advisory.error.clone().unwrap_or_default(),
            });
        let (reason, error) = match guard
            .as_ref()
            .and_then(|g| g.hand_off(advisory.stream_seq))
            .or(recorded)
        {
            Some(note) => (note.reason, note.error),
            None => (Reason::Abandoned, error),
        };
        let (letter, payload) = match stream.get_raw_message(advisory.stream_seq).await {
            Ok(original) => (
                DeadLetter {
                    subject: original.subject.to_string(),
                    headers: original.headers,
                    stream: advisory.stream.clone(),
                    sequence: advisory.stream_seq,
                    consumer: advisory.consumer.clone(),
                    attempts: advisory.deliveries,
                    reason,
                    error,
                },
                original.payload,
            ),
            Err(e) if is_missing(&e) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(ORIGINAL_MISSING, "true");
                (
                    DeadLetter {
                        subject: String::new(),
                        headers,
                        stream: advisory.stream.clone(),
                        sequence: advisory.stream_seq,
                        consumer: advisory.consumer.clone(),
                        attempts: advisory.deliveries,
                        reason,
                        error: format!(
                            "{error}; the original is gone from stream {} (removed by its age or size limits) and could not be copied",
                            advisory.stream
                        ),
                    },
                    Bytes::new(),
                )
            }
            Err(e) => return Err(HandlerError::transient(e)),
        };
        let ack = dead_letter::publish_kept(
            js,
            guard.as_deref(),
            subject,
            &letter,
            payload,
            self.timeout,
        )
        .await
        .map_err(HandlerError::transient)?;
        if let Some(guard) = &guard {
            guard.forget_hand_off(advisory.stream_seq);
        }
        tracing::warn!(
            stream = %advisory.stream, consumer = %advisory.consumer, seq = advisory.stream_seq,
            deliveries = advisory.deliveries, reason = %letter.reason, duplicate = ack.duplicate,
            hand_off_record = advisory.kind == HAND_OFF_TYPE,
            original_missing = letter.subject.is_empty(), dead_letter_subject = %subject,
            "stranded message dead-lettered by the safety net"
        );
        Ok(())
    }
}

fn is_missing(e: &jetstream::stream::RawMessageError) -> bool {
    use jetstream::stream::RawMessageErrorKind as K;
    match e.kind() {
        K::NoMessageFound => true,
        K::JetStream(js) => js.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn provisioned_for_every_consumer() {
        let config = Config::from_toml_with_env(
            r#"
[[streams]]
name = "EVENTS"
subjects = ["events.>"]
replicas = 3
[[streams]]
name = "DLQ"
subjects = ["dlq.>"]
[[consumers]]
name = "a"
stream = "EVENTS"
handler = "h"
dead_letter_subject = "dlq.a"
[[consumers]]
name = "b"
stream = "EVENTS"
handler = "h"
dead_letter_subject = "dlq.b"
"#,
            Path::new("t.toml"),
            std::iter::empty(),
        )
        .expect("valid");
        let stream = advisory_stream(&config).expect("stream");
        // Every consumer's advisories, not a list of this config's.
        assert_eq!(
            stream.subjects,
            ["$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>"]
        );
        assert_eq!(stream.replicas, 3);
        let consumers = safety_net_consumers(&config);
        let names: Vec<&str> = consumers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "jetworker_safety_net_6_EVENTS_a",
                "jetworker_safety_net_6_EVENTS_b"
            ]
        );
        let filters: Vec<Option<&str>> = consumers
            .iter()
            .map(|c| c.filter_subject.as_deref())
            .collect();
        assert_eq!(
            filters,
            [
                Some("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.EVENTS.a"),
                Some("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.EVENTS.b")
            ]
        );
        let dead_letters: Vec<&str> = consumers
            .iter()
            .map(|c| c.dead_letter_subject.as_str())
            .collect();
        assert_eq!(dead_letters, ["dlq.a", "dlq.b"], "each its consumer's");
        assert!(consumers
            .iter()
            .all(|c| c.codec == crate::config::CodecKind::Json));
        // No two (stream, consumer) pairs share a durable.
        assert_ne!(
            safety_net_consumer_name("A_B", "C"),
            safety_net_consumer_name("A", "B_C")
        );

        let advisory: MaxDeliveriesAdvisory = serde_json::from_str(
            r#"{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"x","timestamp":"2024-01-01T00:00:00Z","stream":"EVENTS","consumer":"a","stream_seq":42,"deliveries":5}"#,
        )
        .expect("parses");
        assert_eq!((advisory.stream_seq, advisory.deliveries), (42, 5));
    }
}
