//! Which dead letters an operation applies to: [`Filter`], and the `--reason`,
//! `--since` and `--until` values it is built from.

use jetworker::Reason;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::error::{dlq_error, DlqError, DlqErrorKind};
use super::letter::Letter;

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

/// Whether `consumer` is a partition consumer of the partitioned consumer `group`: its
/// name is `<group>-<index>`, as `partitions = { count = N, ... }` names them. The
/// filter has no config, so a separate consumer named that way (say `jobs-2` next to
/// `jobs`) counts as one of `group`'s partitions too.
pub(crate) fn is_partition_of(consumer: &str, group: &str) -> bool {
    consumer
        .strip_prefix(group)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|index| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
}

/// Which dead letters an operation applies to. Every set field narrows the selection;
/// the default selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this dead-letter stream.
    pub stream: Option<String>,
    /// Only dead letters of these consumers (`Jetworker-Consumer`). A partitioned
    /// consumer's letters name the partition consumer that gave up (`<name>-<index>`):
    /// its name selects the letters of all its partitions too.
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
            && !letter.consumer().is_some_and(|c| {
                self.consumers
                    .iter()
                    .any(|want| want == c || is_partition_of(c, want))
            })
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

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::HeaderMap;

    use super::super::letter::fixtures::{at, letter};
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
    fn a_partitioned_consumer_selects_the_letters_of_its_partitions() {
        let by = |consumers: &[&str]| Filter {
            consumers: consumers.iter().map(|c| c.to_string()).collect(),
            ..Filter::default()
        };
        let partition = letter(1, "orders-3", "permanent", "2024-05-01T12:00:00Z");
        assert!(by(&["orders"]).matches(&partition));
        assert!(by(&["orders-3"]).matches(&partition));
        assert!(!by(&["orders-1"]).matches(&partition));
        assert!(!by(&["order"]).matches(&partition));
        let other = letter(2, "orders-x", "permanent", "2024-05-01T12:00:00Z");
        assert!(!by(&["orders"]).matches(&other));
        assert!(is_partition_of("a-b-12", "a-b"));
        assert!(!is_partition_of("orders-", "orders"));
        assert!(!is_partition_of("orders", "orders"));
        assert!(!is_partition_of("orders-1", "orders-1"));
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
}
