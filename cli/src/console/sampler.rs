//! What the console shows over time: a [`Sampler`] reads the server the way `status`
//! does ([`crate::status::collect`]) every few seconds and keeps the last minutes of
//! reports ([`History`]); [`charts`] turns them into the rates and levels the page draws,
//! and [`reason_counts`] counts the dead letters per consumer and reason.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use jetworker::Config;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::dlq::{Dlq, Filter, Letter};
use crate::status::{self, StatusReport};

/// One reading of the server.
#[derive(Debug, Clone)]
pub(super) struct Sample {
    /// When it was taken, in milliseconds since the Unix epoch.
    pub(super) at_ms: i64,
    /// What `status` would have printed then.
    pub(super) report: StatusReport,
}

/// Dead letters of one consumer for one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(super) struct ReasonCount {
    /// The dead-letter stream.
    pub(super) stream: String,
    /// The consumer that gave up (`Jetworker-Consumer`), `-` when the header is missing.
    pub(super) consumer: String,
    /// Why (`Jetworker-Reason`), `-` when the header is missing.
    pub(super) reason: String,
    /// How many.
    pub(super) count: u64,
}

/// A chart: series of `[time_ms, value]` points.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Chart {
    /// What it shows.
    pub(super) title: &'static str,
    /// The unit of its values.
    pub(super) unit: &'static str,
    /// One line per stream or consumer.
    pub(super) series: Vec<Series>,
}

/// One line of a chart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Series {
    /// The stream, or `stream/consumer`.
    pub(super) name: String,
    /// `[time_ms, value]`, oldest first.
    pub(super) points: Vec<[f64; 2]>,
}

/// The last minutes of samples, and what the last attempt to sample said.
#[derive(Debug, Default)]
pub(super) struct History {
    samples: VecDeque<Sample>,
    capacity: usize,
    /// Why the last sample failed, when it did (the previous samples stay).
    pub(super) error: Option<String>,
    /// Dead letters per consumer and reason, as of the last time the counts changed.
    pub(super) reasons: Vec<ReasonCount>,
    /// The per-consumer dead-letter counts `reasons` was computed for: the letters are
    /// listed again only when `status` shows these counts changed.
    reasons_basis: Option<Vec<Option<u64>>>,
}

impl History {
    /// Keeps at most `capacity` samples.
    pub(super) fn new(capacity: usize) -> History {
        History {
            capacity: capacity.max(2),
            ..History::default()
        }
    }

    fn push(&mut self, sample: Sample) {
        while self.samples.len() >= self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        self.error = None;
    }

    /// The newest sample.
    pub(super) fn latest(&self) -> Option<&Sample> {
        self.samples.back()
    }

    /// Every sample kept, oldest first.
    pub(super) fn samples(&self) -> Vec<Sample> {
        self.samples.iter().cloned().collect()
    }
}

/// Per consumer, its dead-letter count in `report`: what decides whether the letters
/// are counted by reason again.
fn dead_letter_counts(report: &StatusReport) -> Vec<Option<u64>> {
    report.consumers.iter().map(|c| c.dead_letters).collect()
}

/// Dead letters counted per (stream, consumer, reason), sorted.
pub(super) fn reason_counts(letters: &[Letter]) -> Vec<ReasonCount> {
    let mut per: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
    for letter in letters {
        let key = (
            letter.stream.as_str(),
            letter.consumer().unwrap_or("-"),
            letter.reason().unwrap_or("-"),
        );
        *per.entry(key).or_default() += 1;
    }
    per.into_iter()
        .map(|((stream, consumer, reason), count)| ReasonCount {
            stream: stream.to_string(),
            consumer: consumer.to_string(),
            reason: reason.to_string(),
            count,
        })
        .collect()
}

/// A series from consecutive pairs of samples: `value(previous, current, seconds)` gives
/// the point at the current sample's time, or nothing.
fn series_of<K, F>(samples: &[Sample], keys: &[(String, K)], value: F) -> Vec<Series>
where
    F: Fn(&K, &Sample, &Sample, f64) -> Option<f64>,
{
    keys.iter()
        .map(|(name, key)| Series {
            name: name.clone(),
            points: samples
                .windows(2)
                .filter_map(|pair| {
                    let seconds = (pair[1].at_ms - pair[0].at_ms) as f64 / 1000.0;
                    if seconds <= 0.0 {
                        return None;
                    }
                    value(key, &pair[0], &pair[1], seconds).map(|v| [pair[1].at_ms as f64, v])
                })
                .collect(),
        })
        .collect()
}

/// The charts the page draws from `samples` (oldest first): messages stored per second
/// per stream, pending and ack pending per consumer, new dead letters per minute per
/// consumer. A rate needs two samples; a counter that went down (a stream recreated,
/// dead letters replayed or purged) gives no negative rate: the stream's point is left
/// out, the dead letters count as none new.
pub(super) fn charts(samples: &[Sample]) -> Vec<Chart> {
    let Some(latest) = samples.last() else {
        return Vec::new();
    };
    let streams: Vec<(String, usize)> = latest
        .report
        .streams
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let consumers: Vec<(String, usize)> = latest
        .report
        .consumers
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("{}/{}", c.stream, c.name), i))
        .collect();
    // The same config is sampled throughout, so index i is the same entry in every sample.
    let stream = |s: &Sample, i: usize| s.report.streams.get(i).filter(|s| s.exists).cloned();
    let consumer = |s: &Sample, i: usize| s.report.consumers.get(i).filter(|c| c.exists).cloned();
    vec![
        Chart {
            title: "Messages stored per second",
            unit: "msg/s",
            series: series_of(samples, &streams, |&i, before, now, seconds| {
                let (a, b) = (stream(before, i)?, stream(now, i)?);
                let added = b.last_sequence.checked_sub(a.last_sequence)?;
                Some(added as f64 / seconds)
            }),
        },
        Chart {
            title: "Pending (not yet delivered)",
            unit: "messages",
            series: series_of(samples, &consumers, |&i, _, now, _| {
                consumer(now, i).map(|c| c.pending as f64)
            }),
        },
        Chart {
            title: "Ack pending (delivered, not yet acknowledged)",
            unit: "messages",
            series: series_of(samples, &consumers, |&i, _, now, _| {
                consumer(now, i).map(|c| c.ack_pending as f64)
            }),
        },
        Chart {
            title: "New dead letters per minute",
            unit: "letters/min",
            series: series_of(samples, &consumers, |&i, before, now, seconds| {
                let a = consumer(before, i)?.dead_letters?;
                let b = consumer(now, i)?.dead_letters?;
                Some(b.saturating_sub(a) as f64 * 60.0 / seconds)
            }),
        },
    ]
}

/// Reads the server every `every` (or at once when woken) into a shared [`History`].
pub(super) struct Sampler {
    /// Where to read.
    pub(super) js: jetstream::Context,
    /// Whose streams and consumers.
    pub(super) config: Config,
    /// To count the dead letters by reason (none when the config has no dead-letter stream).
    pub(super) dlq: Option<Dlq>,
    /// Where the samples go.
    pub(super) history: Arc<RwLock<History>>,
    /// Notified to sample at once (after a replay or purge).
    pub(super) wake: Arc<Notify>,
    /// The time between samples.
    pub(super) every: Duration,
}

impl Sampler {
    /// Samples until `stop` is cancelled.
    pub(super) async fn run(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.sample() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.every) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// One sample, bounded in time; a failure is kept as the history's error.
    async fn sample(&self) {
        let limit = self.every.max(Duration::from_secs(10));
        let read = tokio::time::timeout(limit, status::collect(&self.js, &self.config)).await;
        let report = match read {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => return self.failed(e.to_string()),
            Err(_) => {
                return self.failed(format!(
                    "reading the status took longer than {}",
                    humantime::format_duration(limit)
                ))
            }
        };
        let counts = dead_letter_counts(&report);
        let stale = self.read_history(|h| h.reasons_basis.as_ref() != Some(&counts));
        if let (true, Some(dlq)) = (stale, &self.dlq) {
            match tokio::time::timeout(limit, dlq.list(&Filter::default())).await {
                Ok(Ok(letters)) => {
                    let reasons = reason_counts(&letters);
                    self.write_history(|h| {
                        h.reasons = reasons;
                        h.reasons_basis = Some(counts);
                    });
                }
                Ok(Err(e)) => return self.failed(format!("counting dead letters by reason: {e}")),
                Err(_) => {
                    return self.failed("counting dead letters by reason took too long".into())
                }
            }
        }
        let at_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        self.write_history(|h| h.push(Sample { at_ms, report }));
    }

    fn failed(&self, error: String) {
        tracing::warn!(error = %error, "console: sampling the server failed");
        self.write_history(|h| h.error = Some(error));
    }

    fn read_history<T>(&self, f: impl FnOnce(&History) -> T) -> T {
        f(&self.history.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn write_history(&self, f: impl FnOnce(&mut History)) {
        f(&mut self.history.write().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ConsumerStatus, StreamStatus};

    fn sample(at_s: i64, last_sequence: u64, pending: u64, dead: Option<u64>) -> Sample {
        Sample {
            at_ms: at_s * 1000,
            report: StatusReport {
                streams: vec![StreamStatus {
                    name: "EVENTS".into(),
                    exists: true,
                    messages: last_sequence,
                    bytes: 0,
                    first_sequence: 1,
                    last_sequence,
                    consumer_count: 1,
                    dead_letters: false,
                }],
                consumers: vec![ConsumerStatus {
                    stream: "EVENTS".into(),
                    name: "jobs".into(),
                    exists: true,
                    pending,
                    ack_pending: 1,
                    redelivered: 0,
                    waiting: 0,
                    dead_letter_subject: "dlq.jobs".into(),
                    dead_letter_stream: Some("DLQ".into()),
                    dead_letters: dead,
                    dead_letter_subject_shared_with: Vec::new(),
                    partition_of: None,
                    partition: None,
                    lease_bucket: None,
                    lease_holder: None,
                }],
            },
        }
    }

    fn points(charts: &[Chart], title_starts: &str) -> Vec<[f64; 2]> {
        charts
            .iter()
            .find(|c| c.title.starts_with(title_starts))
            .map(|c| c.series[0].points.clone())
            .unwrap_or_default()
    }

    #[test]
    fn rates_and_levels_from_consecutive_samples() {
        let samples = [
            sample(0, 100, 50, Some(2)),
            sample(5, 150, 40, Some(4)),
            // Stream recreated (sequence went down): no rate; letters purged: none new.
            sample(10, 10, 30, Some(1)),
            sample(20, 30, 20, Some(6)),
        ];
        let charts = charts(&samples);
        assert_eq!(charts.len(), 4);
        assert_eq!(
            points(&charts, "Messages stored"),
            [[5000.0, 10.0], [20000.0, 2.0]]
        );
        assert_eq!(
            points(&charts, "Pending"),
            [[5000.0, 40.0], [10000.0, 30.0], [20000.0, 20.0]]
        );
        assert_eq!(
            points(&charts, "New dead letters"),
            [[5000.0, 24.0], [10000.0, 0.0], [20000.0, 30.0]]
        );
        assert_eq!(charts[1].series[0].name, "EVENTS/jobs");
        assert!(super::charts(&[]).is_empty());
        assert!(super::charts(&samples[..1])
            .iter()
            .all(|c| c.series.iter().all(|s| s.points.is_empty())));
    }

    #[test]
    fn dead_letters_count_per_stream_consumer_and_reason() {
        use jetworker::headers as dead_letter;
        let letter = |stream: &str, consumer: Option<&str>, reason: &str| {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(consumer) = consumer {
                headers.insert(dead_letter::CONSUMER, consumer);
            }
            headers.insert(dead_letter::REASON, reason);
            Letter {
                stream: stream.into(),
                sequence: 1,
                subject: "dlq.x".into(),
                time: time::OffsetDateTime::UNIX_EPOCH,
                headers,
                payload: bytes::Bytes::new(),
            }
        };
        let letters = [
            letter("DLQ", Some("jobs"), "permanent"),
            letter("DLQ", Some("jobs"), "decode"),
            letter("DLQ", Some("jobs"), "permanent"),
            letter("DLQ2", Some("jobs"), "permanent"),
            letter("DLQ", None, "abandoned"),
        ];
        let got = reason_counts(&letters);
        let got: Vec<(&str, &str, &str, u64)> = got
            .iter()
            .map(|r| {
                (
                    r.stream.as_str(),
                    r.consumer.as_str(),
                    r.reason.as_str(),
                    r.count,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("DLQ", "-", "abandoned", 1),
                ("DLQ", "jobs", "decode", 1),
                ("DLQ", "jobs", "permanent", 2),
                ("DLQ2", "jobs", "permanent", 1),
            ]
        );
    }

    #[test]
    fn history_keeps_the_newest_samples() {
        let mut history = History::new(2);
        history.error = Some("was down".into());
        for at in 0..3 {
            history.push(sample(at, 1, 1, None));
        }
        let kept: Vec<i64> = history.samples().iter().map(|s| s.at_ms).collect();
        assert_eq!(kept, [1000, 2000]);
        assert!(history.error.is_none());
        assert_eq!(history.latest().map(|s| s.at_ms), Some(2000));
    }
}
