//! Where dead letters are: the streams of the config that capture consumers'
//! `dead_letter_subject`s, and which consumers (with their codecs) send them there.

use std::collections::BTreeMap;

use jetworker::{CodecKind, Config};

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
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
