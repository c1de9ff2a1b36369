//! One stored dead letter ([`Letter`]) and the views the commands print: the
//! [`Summary`] of `dlq list`, the [`Detail`] of `dlq show`, the payload made readable.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use bytes::Bytes;
use jetworker::headers as dead_letter;
use jetworker::CodecKind;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

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

/// Dead letters for the unit tests of this module and its siblings.
#[cfg(test)]
pub(super) mod fixtures {
    use super::*;

    /// The time `text` (RFC 3339), or the Unix epoch when it is not one.
    pub(in crate::dlq) fn at(text: &str) -> OffsetDateTime {
        OffsetDateTime::parse(text, &Rfc3339).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// Dead letter `seq` of consumer `consumer` for `reason`, stored at `time`, with an
    /// original subject and attempts, an empty payload.
    pub(in crate::dlq) fn letter(seq: u64, consumer: &str, reason: &str, time: &str) -> Letter {
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
}

#[cfg(test)]
mod tests {
    use super::fixtures::letter;
    use super::*;
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
}
