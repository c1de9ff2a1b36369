//! `status`: what the server says about the config's streams and consumers, the way an
//! operator asks for it.
//!
//! Per consumer: messages not yet delivered (`num_pending`), delivered but not yet acked
//! (`num_ack_pending`), redelivered, waiting pull requests (`num_waiting`) and dead
//! letters (messages stored on its `dead_letter_subject`, counted by the server with a
//! subject-filtered stream info). Per stream: messages and bytes. Every figure is the
//! server's own; nothing is estimated.
//!
//! A partitioned consumer (`partitions = { count = N, ... }`) is no consumer on the
//! server: it shows as its N partition consumers `<name>-0` .. `<name>-<N-1>`, one row
//! each, with the replica holding each one's lease (read from the lease bucket; empty
//! while the partition is free). Its partitions share its dead-letter subject, so each
//! one's dead-letter count is the whole group's, marked as shared.
//!
//! An ordered consumer without partitions (`ordered_by` alone) is one row, like any
//! consumer, but it is pulled by one replica at a time under a lease of its own (the key
//! `p0` of its lease bucket): its row names that replica too, or shows it free.
//!
//! ```no_run
//! # async fn demo(js: async_nats::jetstream::Context, config: jetworker::Config) -> Result<(), jetworker_cli::StatusError> {
//! let report = jetworker_cli::collect_status(&js, &config).await?;
//! print!("{}", report.table());
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;

use async_nats::jetstream;
use futures::TryStreamExt;
use serde::Serialize;

use crate::dlq::dead_letter_streams;
use crate::table::table;
use jetworker::{Config, ConsumerConfig, Error};

/// Why the status could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusErrorKind {
    /// A request to the server failed (not a missing stream or consumer, which the
    /// report shows as such); the client's error is the source.
    Request,
}

impl fmt::Display for StatusErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StatusErrorKind::Request => "a JetStream request failed",
        })
    }
}

/// Reading the status failed; the message says what was being read.
pub type StatusError = Error<StatusErrorKind>;

/// The whole report: `status --json` prints it as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    /// Streams, in config order.
    pub streams: Vec<StreamStatus>,
    /// Consumers, in config order.
    pub consumers: Vec<ConsumerStatus>,
}

/// One stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamStatus {
    /// Stream name.
    pub name: String,
    /// False when the server does not have it (not provisioned yet).
    pub exists: bool,
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Oldest sequence stored.
    pub first_sequence: u64,
    /// Newest sequence assigned.
    pub last_sequence: u64,
    /// Consumers on the server (any, not only the config's).
    pub consumer_count: u64,
    /// True when it holds some consumer's dead letters.
    pub dead_letters: bool,
}

/// One consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsumerStatus {
    /// The stream it reads.
    pub stream: String,
    /// Durable name.
    pub name: String,
    /// False when the server does not have it.
    pub exists: bool,
    /// Messages matching its filter not yet delivered (`num_pending`).
    pub pending: u64,
    /// Delivered, not yet acknowledged (`num_ack_pending`).
    pub ack_pending: u64,
    /// Delivered more than once and not yet acknowledged (`num_redelivered`).
    pub redelivered: u64,
    /// Pull requests waiting at the server (`num_waiting`): workers idle on it.
    pub waiting: u64,
    /// Where its dead letters go.
    pub dead_letter_subject: String,
    /// The stream that stores them (`None` when no stream of the config captures it).
    pub dead_letter_stream: Option<String>,
    /// Messages on `dead_letter_subject` (`None` when that stream does not exist).
    pub dead_letters: Option<u64>,
    /// Other consumers writing to the same dead-letter subject: then `dead_letters`
    /// counts theirs too.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dead_letter_subject_shared_with: Vec<String>,
    /// For a partition consumer: the config's partitioned consumer it is a partition of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_of: Option<String>,
    /// For a partition consumer: its partition's index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// For a consumer pulled by one replica at a time (a partition consumer, or an
    /// ordered consumer without partitions): the key-value bucket holding its lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_bucket: Option<String>,
    /// For a consumer with a `lease_bucket`: the replica holding its lease (the
    /// `replica` of the worker's "partition taken" or "lease taken" log line); `None`
    /// while it is free or unreadable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
}

/// One row of the consumers' status: a configured consumer, or one partition of a
/// partitioned one.
struct ConsumerRow<'a> {
    config: &'a ConsumerConfig,
    /// The durable name on the server.
    name: String,
    /// The partition's index, for a partition consumer.
    partition: Option<u32>,
    /// The index of the lease it is pulled under in its consumer's lease bucket: its
    /// partition's, or 0 for an ordered consumer without partitions (`None` for a
    /// consumer every replica pulls).
    lease: Option<u32>,
}

/// How many leases `consumer` is pulled under: one per partition, one for an ordered
/// consumer without partitions, none for a consumer every replica pulls.
fn lease_count(consumer: &ConsumerConfig) -> u32 {
    match (
        jetworker::partition_lease_bucket(consumer),
        &consumer.partitions,
    ) {
        (None, _) => 0,
        (Some(_), Some(partitions)) => partitions.count,
        (Some(_), None) => 1,
    }
}

/// The rows `config`'s consumers stand for on the server, in config order (a partitioned
/// consumer's partitions in partition order).
fn consumer_rows(config: &Config) -> Vec<ConsumerRow<'_>> {
    let mut rows = Vec::new();
    for c in &config.consumers {
        let partitions = jetworker::partition_consumer_names(c);
        if partitions.is_empty() {
            rows.push(ConsumerRow {
                config: c,
                name: c.name.clone(),
                partition: None,
                lease: (lease_count(c) > 0).then_some(0),
            });
        }
        rows.extend((0u32..).zip(partitions).map(|(index, name)| ConsumerRow {
            config: c,
            name,
            partition: Some(index),
            lease: Some(index),
        }));
    }
    rows
}

/// Who holds each lease of `consumer` (by index, see [`lease_count`]), as far as the
/// lease bucket can be read: a missing bucket or a failed read shows no holder.
async fn lease_holders(js: &jetstream::Context, consumer: &ConsumerConfig) -> Vec<Option<String>> {
    let count = lease_count(consumer);
    let Some(bucket) = jetworker::partition_lease_bucket(consumer) else {
        return Vec::new();
    };
    let Ok(store) = js.get_key_value(bucket).await else {
        return vec![None; count as usize];
    };
    let mut holders = Vec::new();
    for index in 0..count {
        let holder = store
            .get(jetworker::partition_lease_key(index))
            .await
            .ok()
            .flatten()
            .map(|value| String::from_utf8_lossy(&value).into_owned());
        holders.push(holder);
    }
    holders
}

/// Reading `what` failed with the client's error `err`.
fn fail(
    what: impl Into<String>,
    err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> StatusError {
    StatusError::with_source(StatusErrorKind::Request, err).with_message(what)
}

/// Reads the status of every stream and consumer of `config` from the server.
pub async fn collect(
    js: &jetstream::Context,
    config: &Config,
) -> Result<StatusReport, StatusError> {
    let dl_streams = dead_letter_streams(config);
    let mut streams = Vec::new();
    let mut handles = BTreeMap::new();
    for s in &config.streams {
        let found = jetworker::get_stream(js, &s.name)
            .await
            .map_err(|e| fail(format!("reading stream {:?}", s.name), e))?;
        let dead_letters = dl_streams.iter().any(|d| d.name == s.name);
        let status = match &found {
            Some(handle) => {
                let state = &handle.cached_info().state;
                StreamStatus {
                    name: s.name.clone(),
                    exists: true,
                    messages: state.messages,
                    bytes: state.bytes,
                    first_sequence: state.first_sequence,
                    last_sequence: state.last_sequence,
                    consumer_count: state.consumer_count as u64,
                    dead_letters,
                }
            }
            None => StreamStatus {
                name: s.name.clone(),
                exists: false,
                messages: 0,
                bytes: 0,
                first_sequence: 0,
                last_sequence: 0,
                consumer_count: 0,
                dead_letters,
            },
        };
        streams.push(status);
        if let Some(handle) = found {
            handles.insert(s.name.clone(), handle);
        }
    }

    // Dead letters per subject, one subject-filtered stream info each.
    let mut dead_counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for dl in &dl_streams {
        let Some(handle) = handles.get(&dl.name) else {
            continue;
        };
        for subject in dl.subjects.keys() {
            let what = || format!("counting {subject} in stream {:?}", dl.name);
            let mut counts = handle
                .info_with_subjects(subject)
                .await
                .map_err(|e| fail(what(), e))?;
            let mut total = 0u64;
            while let Some((stored, n)) = counts.try_next().await.map_err(|e| fail(what(), e))? {
                if stored == *subject {
                    total += n as u64;
                }
            }
            dead_counts.insert((dl.name.clone(), subject.clone()), total);
        }
    }

    let mut holders: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for c in config.consumers.iter().filter(|c| lease_count(c) > 0) {
        if handles.contains_key(&c.stream) {
            holders.insert(c.name.clone(), lease_holders(js, c).await);
        }
    }

    let mut consumers = Vec::new();
    for row in consumer_rows(config) {
        let c = row.config;
        let info = match handles.get(&c.stream) {
            Some(handle) => jetworker::consumer_info(handle, &row.name)
                .await
                .map_err(|e| fail(format!("reading consumer {:?}", row.name), e))?,
            None => None,
        };
        let dl_stream = dl_streams
            .iter()
            .find(|d| d.subjects.contains_key(&c.dead_letter_subject));
        let dead_letters = dl_stream.and_then(|d| {
            dead_counts
                .get(&(d.name.clone(), c.dead_letter_subject.clone()))
                .copied()
        });
        let mut shared_with: Vec<String> = dl_stream
            .and_then(|d| d.subjects.get(&c.dead_letter_subject))
            .map(|sources| {
                sources
                    .iter()
                    .filter(|s| !(s.consumer == c.name && s.stream == c.stream))
                    .map(|s| s.consumer.clone())
                    .collect()
            })
            .unwrap_or_default();
        if row.partition.is_some() {
            // The other partitions of the group write to the same subject.
            shared_with.extend(
                jetworker::partition_consumer_names(c)
                    .into_iter()
                    .filter(|name| *name != row.name),
            );
        }
        let lease_holder = row.lease.and_then(|index| {
            holders
                .get(&c.name)
                .and_then(|h| h.get(index as usize).cloned().flatten())
        });
        let (exists, pending, ack_pending, redelivered, waiting) = match &info {
            Some(i) => (
                true,
                i.num_pending,
                i.num_ack_pending as u64,
                i.num_redelivered as u64,
                i.num_waiting as u64,
            ),
            None => (false, 0, 0, 0, 0),
        };
        consumers.push(ConsumerStatus {
            stream: c.stream.clone(),
            name: row.name.clone(),
            exists,
            pending,
            ack_pending,
            redelivered,
            waiting,
            dead_letter_subject: c.dead_letter_subject.clone(),
            dead_letter_stream: dl_stream.map(|d| d.name.clone()),
            dead_letters,
            dead_letter_subject_shared_with: shared_with,
            partition_of: row.partition.map(|_| c.name.clone()),
            partition: row.partition,
            lease_bucket: row.lease.and_then(|_| jetworker::partition_lease_bucket(c)),
            lease_holder,
        });
    }
    Ok(StatusReport { streams, consumers })
}

/// Bytes for people: `812 B`, `8.2 KiB`, `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

impl StatusReport {
    /// The human form: a streams table, then a consumers table.
    pub fn table(&self) -> String {
        let missing = || "missing".to_string();
        let stream_rows: Vec<Vec<String>> = self
            .streams
            .iter()
            .map(|s| {
                let name = if s.dead_letters {
                    format!("{} (dead letters)", s.name)
                } else {
                    s.name.clone()
                };
                if s.exists {
                    vec![
                        name,
                        s.messages.to_string(),
                        human_bytes(s.bytes),
                        s.consumer_count.to_string(),
                    ]
                } else {
                    vec![name, missing(), String::new(), String::new()]
                }
            })
            .collect();
        let mut out = table(
            &["STREAM", "MESSAGES", "BYTES", "CONSUMERS"],
            &[false, true, true, true],
            &stream_rows,
        );
        out.push('\n');
        let mut shared_note = false;
        // The lease column only when some row is pulled under a lease: other reports
        // stay as they were.
        let leased = self.consumers.iter().any(|c| c.lease_bucket.is_some());
        let consumer_rows: Vec<Vec<String>> = self
            .consumers
            .iter()
            .map(|c| {
                let dead = match c.dead_letters {
                    Some(n) if c.dead_letter_subject_shared_with.is_empty() => n.to_string(),
                    Some(n) => {
                        shared_note = true;
                        format!("{n}*")
                    }
                    None => missing(),
                };
                let mut row = if c.exists {
                    vec![
                        c.name.clone(),
                        c.stream.clone(),
                        c.pending.to_string(),
                        c.ack_pending.to_string(),
                        c.redelivered.to_string(),
                        c.waiting.to_string(),
                        dead,
                    ]
                } else {
                    vec![
                        c.name.clone(),
                        c.stream.clone(),
                        missing(),
                        String::new(),
                        String::new(),
                        String::new(),
                        dead,
                    ]
                };
                if leased {
                    row.push(match (&c.lease_bucket, &c.lease_holder) {
                        (Some(_), Some(holder)) => holder.clone(),
                        (Some(_), None) => "free".to_string(),
                        (None, _) => String::new(),
                    });
                }
                row
            })
            .collect();
        let mut headers = vec![
            "CONSUMER",
            "STREAM",
            "PENDING",
            "ACK PENDING",
            "REDELIVERED",
            "WAITING",
            "DEAD LETTERS",
        ];
        let mut right = vec![false, false, true, true, true, true, true];
        if leased {
            headers.push("LEASE HELD BY");
            right.push(false);
        }
        out.push_str(&table(&headers, &right, &consumer_rows));
        if shared_note {
            out.push_str("* the dead-letter subject is shared: the count includes other consumers' dead letters\n");
        }
        if self.streams.iter().any(|s| !s.exists) || self.consumers.iter().any(|c| !c.exists) {
            out.push_str("missing: not on the server; `provision` creates it\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(8400), "8.2 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn table_pads_and_aligns() {
        let t = table(
            &["NAME", "N", "NOTE"],
            &[false, true, false],
            &[
                vec!["a".into(), "1234".into(), "".into()],
                vec!["longer".into(), "5".into(), "é ok".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME       N  NOTE\n\
             a       1234\n\
             longer     5  é ok\n"
        );
    }

    fn consumer(name: &str, dead: Option<u64>, shared: &[&str], exists: bool) -> ConsumerStatus {
        ConsumerStatus {
            stream: "EVENTS".into(),
            name: name.into(),
            exists,
            pending: 10,
            ack_pending: 2,
            redelivered: 1,
            waiting: 1,
            dead_letter_subject: "dlq.x".into(),
            dead_letter_stream: Some("DLQ".into()),
            dead_letters: dead,
            dead_letter_subject_shared_with: shared.iter().map(|s| s.to_string()).collect(),
            partition_of: None,
            partition: None,
            lease_bucket: None,
            lease_holder: None,
        }
    }

    #[test]
    fn report_table() {
        let report = StatusReport {
            streams: vec![
                StreamStatus {
                    name: "EVENTS".into(),
                    exists: true,
                    messages: 120,
                    bytes: 8400,
                    first_sequence: 1,
                    last_sequence: 120,
                    consumer_count: 1,
                    dead_letters: false,
                },
                StreamStatus {
                    name: "DLQ".into(),
                    exists: false,
                    messages: 0,
                    bytes: 0,
                    first_sequence: 0,
                    last_sequence: 0,
                    consumer_count: 0,
                    dead_letters: true,
                },
            ],
            consumers: vec![
                consumer("jobs", Some(5), &[], true),
                consumer("other", Some(5), &["jobs"], true),
                consumer("gone", None, &[], false),
            ],
        };
        let text = report.table();
        let want = "\
STREAM              MESSAGES    BYTES  CONSUMERS
EVENTS                   120  8.2 KiB          1
DLQ (dead letters)   missing

CONSUMER  STREAM  PENDING  ACK PENDING  REDELIVERED  WAITING  DEAD LETTERS
jobs      EVENTS       10            2            1        1             5
other     EVENTS       10            2            1        1            5*
gone      EVENTS  missing                                          missing
* the dead-letter subject is shared: the count includes other consumers' dead letters
missing: not on the server; `provision` creates it
";
        assert_eq!(text, want, "\n{text}");
        let json = serde_json::to_value(&report).unwrap_or_default();
        assert_eq!(json["consumers"][0]["dead_letters"], 5);
        assert!(json["consumers"][0]
            .get("dead_letter_subject_shared_with")
            .is_none());
        assert_eq!(
            json["consumers"][2]["dead_letters"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn a_partitioned_consumer_is_one_row_per_partition_and_each_row_knows_its_lease() {
        let config = Config::from_toml_with_env(
            r#"
[[streams]]
name = "EVENTS"
subjects = ["events.>"]
[[streams]]
name = "DLQ"
subjects = ["dlq.>"]
[[consumers]]
name = "orders"
stream = "EVENTS"
filter_subject = "events.*.>"
handler = "h"
dead_letter_subject = "dlq.orders"
ordered_by = { subject_token = 2 }
partitions = { count = 3, subject_token = 1 }
[[consumers]]
name = "plain"
stream = "EVENTS"
handler = "h"
dead_letter_subject = "dlq.plain"
[[consumers]]
name = "ledger"
stream = "EVENTS"
handler = "h"
dead_letter_subject = "dlq.ledger"
ordered_by = { subject_token = 1 }
"#,
            std::path::Path::new("t.toml"),
            std::iter::empty(),
        );
        let Ok(config) = config else {
            panic!("config: {config:?}");
        };
        let rows: Vec<(String, Option<u32>, Option<u32>, &str)> = consumer_rows(&config)
            .into_iter()
            .map(|r| (r.name, r.partition, r.lease, r.config.name.as_str()))
            .collect();
        assert_eq!(
            rows,
            [
                ("orders-0".to_string(), Some(0), Some(0), "orders"),
                ("orders-1".to_string(), Some(1), Some(1), "orders"),
                ("orders-2".to_string(), Some(2), Some(2), "orders"),
                ("plain".to_string(), None, None, "plain"),
                ("ledger".to_string(), None, Some(0), "ledger"),
            ]
        );
        let counts: Vec<u32> = config.consumers.iter().map(lease_count).collect();
        assert_eq!(counts, [3, 0, 1]);
    }

    #[test]
    fn partitions_and_ordered_consumers_show_who_holds_their_lease() {
        let partition = |index: u32, holder: Option<&str>| ConsumerStatus {
            partition_of: Some("orders".into()),
            partition: Some(index),
            lease_bucket: Some("jw_leases_EVENTS_orders".into()),
            lease_holder: holder.map(str::to_string),
            ..consumer(&format!("orders-{index}"), Some(3), &["orders-0"], true)
        };
        let ordered = |name: &str, holder: Option<&str>| ConsumerStatus {
            lease_bucket: Some(format!("jw_leases_EVENTS_{name}")),
            lease_holder: holder.map(str::to_string),
            ..consumer(name, Some(0), &[], true)
        };
        let report = StatusReport {
            streams: Vec::new(),
            consumers: vec![
                partition(1, Some("4242-0000beef")),
                partition(2, None),
                consumer("plain", Some(0), &[], true),
                ordered("ledger", Some("77-0badf00d")),
                ordered("audit", None),
            ],
        };
        let text = report.table();
        let want = "\
STREAM  MESSAGES  BYTES  CONSUMERS

CONSUMER  STREAM  PENDING  ACK PENDING  REDELIVERED  WAITING  DEAD LETTERS  LEASE HELD BY
orders-1  EVENTS       10            2            1        1            3*  4242-0000beef
orders-2  EVENTS       10            2            1        1            3*  free
plain     EVENTS       10            2            1        1             0
ledger    EVENTS       10            2            1        1             0  77-0badf00d
audit     EVENTS       10            2            1        1             0  free
* the dead-letter subject is shared: the count includes other consumers' dead letters
";
        assert_eq!(text, want, "\n{text}");
        let json = serde_json::to_value(&report).unwrap_or_default();
        assert_eq!(json["consumers"][0]["partition_of"], "orders");
        assert_eq!(json["consumers"][0]["partition"], 1);
        assert_eq!(json["consumers"][0]["lease_holder"], "4242-0000beef");
        assert!(json["consumers"][1].get("lease_holder").is_none());
        assert!(json["consumers"][2].get("partition_of").is_none());
        assert!(json["consumers"][2].get("lease_bucket").is_none());
        assert_eq!(
            json["consumers"][3]["lease_bucket"],
            "jw_leases_EVENTS_ledger"
        );
        assert_eq!(json["consumers"][3]["lease_holder"], "77-0badf00d");
        assert!(json["consumers"][3].get("partition").is_none());
        assert!(json["consumers"][4].get("lease_holder").is_none());
    }
}
