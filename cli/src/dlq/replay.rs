//! What a replay publishes ([`replay_headers`], [`replay_message_id`]), who else
//! receives it, and what a replay or a purge did ([`ReplayReport`], [`PurgeReport`]).

use async_nats::header::HeaderName;
use async_nats::HeaderMap;
use jetworker::headers as dead_letter;
use serde::Serialize;

use super::error::DlqError;
use super::letter::Letter;

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
pub(super) struct Reader {
    /// The stream it reads.
    pub(super) stream: String,
    /// Its name.
    pub(super) consumer: String,
    /// Its filter subject; `None` reads the whole stream.
    pub(super) filter: Option<String>,
}

/// See [`Dlq::other_readers`](super::service::Dlq::other_readers): `streams` are the
/// config's streams with their subjects.
pub(super) fn other_readers(
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

#[cfg(test)]
mod tests {
    use super::*;
    use jetworker::{DeadLetter, Reason};

    use super::super::letter::fixtures::letter;
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
}
