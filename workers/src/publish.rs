//! Publishing synthetic traffic at a steady rate through jetworker's pipelined
//! publisher (each event's id is its message id, every PubAck is checked).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use bytes::Bytes;
use jetworker::{Pipeline, PublishError, Publisher};
use serde::Serialize;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::generator::{Outgoing, Payload, Traffic};

/// How much to publish, how fast.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishPlan {
    /// Messages per second; 0 publishes as fast as the server acknowledges.
    pub rate: f64,
    /// Messages to publish; `None` until stopped.
    pub count: Option<u64>,
    /// PubAcks outstanding at once.
    pub window: usize,
}

/// What was published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PublishSummary {
    /// Messages sent.
    pub sent: u64,
    /// Messages the stream stored.
    pub stored: u64,
    /// Messages the stream dropped as duplicates of their message id.
    pub duplicates: u64,
    /// Events republished under their original message id.
    pub duplicates_sent_same_id: u64,
    /// Events republished under a new message id (stored; the handlers count them once).
    pub duplicates_sent_new_id: u64,
    /// Malformed payloads sent (they end in the dead-letter stream, reason `decode`).
    pub malformed_sent: u64,
    /// Publishes retried after a failed PubAck.
    pub retried: u64,
    /// Seconds spent.
    pub seconds: f64,
}

impl std::fmt::Display for PublishSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = if self.seconds > 0.0 {
            self.sent as f64 / self.seconds
        } else {
            0.0
        };
        write!(
            f,
            "sent {} messages in {:.1}s ({:.0}/s): stored {}, duplicates {} (dropped by the server), \
             malformed sent {}, events resent under a new message id {}, retried {}",
            self.sent,
            self.seconds,
            rate,
            self.stored,
            self.duplicates,
            self.malformed_sent,
            self.duplicates_sent_new_id,
            self.retried
        )
    }
}

/// Now, in unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Publishes `traffic` following `plan` until the count is reached or `stop` is
/// cancelled; then waits for the outstanding PubAcks. Events are timed "now".
pub async fn publish(
    publisher: &Publisher,
    traffic: &mut Traffic,
    plan: &PublishPlan,
    stop: &CancellationToken,
) -> Result<PublishSummary, PublishError> {
    let started = Instant::now();
    let mut summary = PublishSummary::default();
    let mut pipeline = publisher.pipeline(plan.window);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let limit = plan.count.unwrap_or(u64::MAX);
    'outer: while summary.sent < limit {
        // How many are due by now at the rate (everything left when unlimited).
        let due = if plan.rate > 0.0 {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let target = (started.elapsed().as_secs_f64() * plan.rate) as u64 + 1;
            target.min(limit).saturating_sub(summary.sent)
        } else {
            if stop.is_cancelled() {
                break;
            }
            (limit - summary.sent).min(1000)
        };
        for _ in 0..due {
            if stop.is_cancelled() {
                break 'outer;
            }
            let out = traffic.next_message(now_ms());
            count_sent(&mut summary, &out);
            send(&mut pipeline, out).await?;
        }
    }
    let report = pipeline.finish().await?;
    summary.stored = report.stored;
    summary.duplicates = report.duplicates;
    summary.retried = report.retried;
    summary.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        sent = summary.sent,
        stored = summary.stored,
        duplicates = summary.duplicates,
        malformed = summary.malformed_sent,
        seconds = summary.seconds,
        "published"
    );
    Ok(summary)
}

/// Publishes `out` through `pipeline` under its message id (its PubAck is checked by
/// the pipeline).
pub async fn send(pipeline: &mut Pipeline, out: Outgoing) -> Result<(), PublishError> {
    pipeline
        .publish_bytes(
            &out.subject,
            &out.msg_id,
            HeaderMap::new(),
            Bytes::from(out.bytes),
        )
        .await
}

/// Counts `out` in `summary` (sent, duplicates, malformed).
pub fn count_sent(summary: &mut PublishSummary, out: &Outgoing) {
    summary.sent += 1;
    match out.payload {
        Payload::Event(_) => {}
        Payload::Duplicate {
            same_msg_id: true, ..
        } => summary.duplicates_sent_same_id += 1,
        Payload::Duplicate {
            same_msg_id: false, ..
        } => summary.duplicates_sent_new_id += 1,
        Payload::Malformed(_) => summary.malformed_sent += 1,
    }
}
