//! Publishing events to JetStream: typed through the codec, deduplicated by message id,
//! confirmed by the server's PubAck, retried on transient failures up to a deadline.
//!
//! This is the supported replacement for hand-written retry loops around `publish`:
//!
//! ```no_run
//! # async fn demo(js: async_nats::jetstream::Context) -> Result<(), jetworker::PublishError> {
//! use jetworker::Publisher;
//! #[derive(serde::Serialize)]
//! struct Click { id: String, page: String }
//!
//! let publisher = Publisher::new(js);
//! let click = Click { id: "e-1".into(), page: "/".into() };
//! // The event id is the message id: a retried or repeated publish is stored once.
//! let ack = publisher.publish("events.click", &click.id, &click).await?;
//! assert!(ack.sequence > 0);
//! # Ok(()) }
//! ```
//!
//! A transient failure (no PubAck in time, no responders while JetStream restarts or
//! elects a leader, a dropped connection) is retried with the same message id, so a
//! publish that was stored but whose PubAck was lost is deduplicated by the server, not
//! stored twice. Permanent failures (a wrong expected sequence, a payload over the
//! server's limit, a stream limit refusing it) are returned at once.

use std::collections::VecDeque;
use std::fmt;
use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind as NatsPublishErrorKind};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, publish::PublishAck};
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Serialize;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::codec::{self, CodecKind};
use crate::error::Error;
use crate::trace;

/// Less than this left of a publish's deadline: no attempt is worth starting.
const LAST_ATTEMPT_MIN: Duration = Duration::from_millis(20);

/// How a publish is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up after this long (from the first attempt).
    pub deadline: Duration,
    /// The longest first pause between attempts. Each pause is drawn at random between
    /// half of this and a ceiling that starts here and doubles after every pause (up to
    /// `max_backoff`), so that publishers failing together do not retry together.
    pub initial_backoff: Duration,
    /// The longest pause between attempts.
    pub max_backoff: Duration,
    /// How long one attempt may take, from sending to its PubAck. In a [`Pipeline`] it
    /// counts from the send too, so a server that went away costs one timeout for the
    /// whole window, not one per message.
    pub ack_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            ack_timeout: Duration::from_secs(5),
        }
    }
}

/// What kind of publish failure this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishErrorKind {
    /// The value could not be encoded.
    Encode,
    /// The server refused it for good (expected sequence, size, limits).
    Rejected,
    /// Transient failures went on past the deadline.
    DeadlineExceeded,
}

impl fmt::Display for PublishErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PublishErrorKind::Encode => "the value cannot be encoded",
            PublishErrorKind::Rejected => "the server rejected the message",
            PublishErrorKind::DeadlineExceeded => "no stored message within the deadline",
        })
    }
}

/// A publish that did not end with a stored message. The message names the subject and
/// the attempts; the last attempt's error is the source.
pub type PublishError = Error<PublishErrorKind>;

/// Where a failed publish went, and how often it was tried.
#[derive(Debug)]
struct PublishAttempts {
    subject: String,
    attempts: u32,
}

impl PublishError {
    fn after(
        kind: PublishErrorKind,
        subject: &str,
        attempts: u32,
        failure: AttemptFailure,
        note: &str,
    ) -> PublishError {
        let error = match failure {
            AttemptFailure::Client(e) => PublishError::with_source(kind, e),
            AttemptFailure::NoAck(timeout) => PublishError::with_source(kind, NoPubAck(timeout)),
        };
        error
            .with_message(format!(
                "publish to {subject} failed ({kind:?}) after {attempts} attempt(s){note}"
            ))
            .with_detail(PublishAttempts {
                subject: subject.to_string(),
                attempts,
            })
    }

    /// The subject published to.
    pub fn subject(&self) -> Option<&str> {
        self.detail::<PublishAttempts>().map(|a| a.subject.as_str())
    }

    /// Attempts made (0 when the value could not be encoded).
    pub fn attempts(&self) -> u32 {
        self.detail::<PublishAttempts>().map_or(0, |a| a.attempts)
    }
}

/// Whether retrying can help: no PubAck in time, the connection broken, no responders
/// (JetStream restarting, a leader election, the stream not created yet), too many
/// PubAcks outstanding, or JetStream saying it has no quorum or no leader right now.
/// Everything else (a wrong expected sequence or message id, a payload over a limit, a
/// stream refusing more messages, JetStream off) fails the same way again. The HTTP-like
/// `code` does not tell them apart: a full stream answers 503 too.
fn is_transient(e: &async_nats::jetstream::context::PublishError) -> bool {
    match e.kind() {
        NatsPublishErrorKind::TimedOut
        | NatsPublishErrorKind::BrokenPipe
        | NatsPublishErrorKind::StreamNotFound
        | NatsPublishErrorKind::MaxAckPending => true,
        NatsPublishErrorKind::Other => std::error::Error::source(e)
            .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
            .is_some_and(|api| {
                [
                    ErrorCode::CLUSTER_NOT_AVAILABLE,
                    ErrorCode::CLUSTER_NOT_LEADER,
                ]
                .contains(&api.error_code())
            }),
        _ => false,
    }
}

/// Publishes typed events with retries. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    codec: CodecKind,
    retry: RetryPolicy,
}

impl Publisher {
    /// A MessagePack publisher with the default retry policy.
    pub fn new(js: jetstream::Context) -> Self {
        Publisher {
            js,
            codec: CodecKind::Msgpack,
            retry: RetryPolicy::default(),
        }
    }

    /// Uses `codec` for payloads.
    pub fn with_codec(mut self, codec: CodecKind) -> Self {
        self.codec = codec;
        self
    }

    /// Uses `retry` for failures.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Encodes `value`, publishes it with `msg_id` as `Nats-Msg-Id`, and returns the
    /// server's PubAck (whose `duplicate` says the id was seen within the stream's
    /// duplicate window).
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        subject: &str,
        msg_id: &str,
        value: &T,
    ) -> Result<PublishAck, PublishError> {
        self.publish_with_headers(subject, msg_id, HeaderMap::new(), value)
            .await
    }

    /// Like [`Publisher::publish`], with extra headers.
    pub async fn publish_with_headers<T: Serialize + ?Sized>(
        &self,
        subject: &str,
        msg_id: &str,
        headers: HeaderMap,
        value: &T,
    ) -> Result<PublishAck, PublishError> {
        let payload = self.encode(subject, value)?;
        self.publish_bytes(subject, msg_id, headers, payload).await
    }

    /// Publishes raw bytes with the retry policy.
    pub async fn publish_bytes(
        &self,
        subject: &str,
        msg_id: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PublishAck, PublishError> {
        let headers = with_msg_id(headers, msg_id);
        let started = Instant::now();
        let mut backoff = Backoff::new(self.retry.initial_backoff, self.retry.max_backoff);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = self.retry.deadline.saturating_sub(started.elapsed());
            let result = self
                .attempt(subject, headers.clone(), payload.clone(), left)
                .await;
            let failure = match result {
                Ok(ack) => return Ok(ack),
                Err(failure) if !failure.is_transient() => {
                    return Err(PublishError::after(
                        PublishErrorKind::Rejected,
                        subject,
                        attempts,
                        failure,
                        "",
                    ))
                }
                Err(failure) => failure,
            };
            // Retry until the deadline, not until the next wait would pass it: near the
            // end the waits shrink to half of what is left, and a last attempt comes
            // before the deadline rather than none at all.
            let left = self.retry.deadline.saturating_sub(started.elapsed());
            let wait = backoff.next().min(left / 2);
            if left < LAST_ATTEMPT_MIN {
                let note = format!(
                    ", retried for {}",
                    humantime::format_duration(round_ms(started.elapsed()))
                );
                return Err(PublishError::after(
                    PublishErrorKind::DeadlineExceeded,
                    subject,
                    attempts,
                    failure,
                    &note,
                ));
            }
            tracing::debug!(subject, attempts, error = %failure, "publish failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// One publish: sent and its PubAck awaited within `ack_timeout`, and never past
    /// what is left of the deadline.
    async fn attempt(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
        left: Duration,
    ) -> Result<PublishAck, AttemptFailure> {
        let limit = self.retry.ack_timeout.min(left);
        let attempt = async {
            let future = self
                .js
                .publish_with_headers(subject.to_string(), headers, payload)
                .await
                .map_err(AttemptFailure::Client)?;
            future.into_future().await.map_err(AttemptFailure::Client)
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(result) => result,
            Err(_) => Err(AttemptFailure::NoAck(limit)),
        }
    }

    fn encode<T: Serialize + ?Sized>(
        &self,
        subject: &str,
        value: &T,
    ) -> Result<Bytes, PublishError> {
        codec::encode(self.codec, value)
            .map(Bytes::from)
            .map_err(|e| {
                PublishError::with_source(PublishErrorKind::Encode, e)
                    .with_message(format!("publish to {subject} failed (Encode)"))
                    .with_detail(PublishAttempts {
                        subject: subject.to_string(),
                        attempts: 0,
                    })
            })
    }

    /// A pipelined publisher: up to `window` PubAcks outstanding at once, for throughput.
    /// Failed publishes are retried (with their message id) when their PubAck fails.
    ///
    /// ```no_run
    /// # async fn demo(publisher: jetworker::Publisher) -> Result<(), jetworker::PublishError> {
    /// let mut pipeline = publisher.pipeline(256);
    /// for i in 0..10_000u32 {
    ///     let id = format!("e-{i}");
    ///     pipeline.publish("events.click", &id, &i).await?;
    /// }
    /// // Every PubAck checked: stored, or recognised as a duplicate of its id.
    /// let report = pipeline.finish().await?;
    /// println!("stored {}, duplicates {}", report.stored, report.duplicates);
    /// # Ok(()) }
    /// ```
    pub fn pipeline(&self, window: usize) -> Pipeline {
        Pipeline {
            publisher: self.clone(),
            window: window.max(1),
            in_flight: VecDeque::new(),
            report: PipelineReport::default(),
        }
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why one attempt did not end with a PubAck.
enum AttemptFailure {
    /// The client's error: sending failed, or the PubAck said no.
    Client(async_nats::jetstream::context::PublishError),
    /// No PubAck within this long.
    NoAck(Duration),
}

impl AttemptFailure {
    /// Whether the next attempt could succeed (see [`is_transient`]).
    fn is_transient(&self) -> bool {
        match self {
            AttemptFailure::Client(e) => is_transient(e),
            AttemptFailure::NoAck(_) => true,
        }
    }
}

impl fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptFailure::Client(e) => write!(f, "{e}"),
            AttemptFailure::NoAck(timeout) => write!(f, "{}", NoPubAck(*timeout)),
        }
    }
}

/// No PubAck came in time: the source of a publish that ran out of time.
#[derive(Debug, thiserror::Error)]
#[error("no PubAck within {}", humantime::format_duration(round_ms(*.0)))]
struct NoPubAck(Duration);

/// Waits for a PubAck already on its way, up to `timeout`.
async fn await_ack(
    future: PublishAckFuture,
    timeout: Duration,
) -> Result<PublishAck, AttemptFailure> {
    match tokio::time::timeout(timeout, future.into_future()).await {
        Ok(Ok(ack)) => Ok(ack),
        Ok(Err(e)) => Err(AttemptFailure::Client(e)),
        Err(_) => Err(AttemptFailure::NoAck(timeout)),
    }
}

/// Adds the message id and, unless the caller set one, a `traceparent` and the trace's
/// `tracestate` (continuing the trace of the handler publishing, or starting one).
fn with_msg_id(mut headers: HeaderMap, msg_id: &str) -> HeaderMap {
    if !msg_id.is_empty() {
        headers.insert("Nats-Msg-Id", msg_id);
    }
    if headers.get(trace::TRACEPARENT).is_none() {
        trace::outgoing().insert_into(&mut headers);
    }
    headers
}

/// Counts from a pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineReport {
    /// Messages stored (first time).
    pub stored: u64,
    /// Messages the server recognised as duplicates of their message id: repeats of an
    /// id published before, and retries whose first attempt had been stored though its
    /// PubAck was lost.
    pub duplicates: u64,
    /// Publishes retried one by one after their pipelined PubAck failed.
    pub retried: u64,
}

struct Pending {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    future: PublishAckFuture,
    sent_at: Instant,
}

/// Pipelined publishing: many PubAcks outstanding, each checked; see [`Publisher::pipeline`].
///
/// A publish whose PubAck fails transiently (or does not come within `ack_timeout` of its
/// send) is retried on its own, with its message id, under the publisher's retry policy.
/// When a call returns an error, messages still in flight may or may not be stored:
/// publishing them again with the same message ids (within the stream's duplicate
/// window) stores each once. Dropping a pipeline without [`Pipeline::finish`] leaves
/// their outcome unchecked.
pub struct Pipeline {
    publisher: Publisher,
    window: usize,
    in_flight: VecDeque<Pending>,
    report: PipelineReport,
}

impl Pipeline {
    /// Queues one event; waits for the oldest PubAck when the window is full.
    pub async fn publish<T: Serialize + ?Sized>(
        &mut self,
        subject: &str,
        msg_id: &str,
        value: &T,
    ) -> Result<(), PublishError> {
        let payload = self.publisher.encode(subject, value)?;
        self.publish_bytes(subject, msg_id, HeaderMap::new(), payload)
            .await
    }

    /// Queues raw bytes; see [`Pipeline::publish`].
    pub async fn publish_bytes(
        &mut self,
        subject: &str,
        msg_id: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), PublishError> {
        while self.in_flight.len() >= self.window {
            self.settle_oldest().await?;
        }
        let headers = with_msg_id(headers, msg_id);
        let sent = self
            .publisher
            .js
            .publish_with_headers(subject.to_string(), headers.clone(), payload.clone())
            .await;
        match sent {
            Ok(future) => {
                self.in_flight.push_back(Pending {
                    subject: subject.to_string(),
                    headers,
                    payload,
                    future,
                    sent_at: Instant::now(),
                });
                Ok(())
            }
            Err(_) => {
                // Could not even be sent: fall back to the retrying path.
                self.report.retried += 1;
                let ack = self
                    .publisher
                    .publish_bytes(subject, "", headers, payload)
                    .await?;
                self.count(&ack);
                Ok(())
            }
        }
    }

    async fn settle_oldest(&mut self) -> Result<(), PublishError> {
        let Some(p) = self.in_flight.pop_front() else {
            return Ok(());
        };
        // Its PubAck was due `ack_timeout` after it was sent; the futures queued behind
        // a lost one have been waiting all along, so they do not each get a full timeout.
        let left = self
            .publisher
            .retry
            .ack_timeout
            .saturating_sub(p.sent_at.elapsed());
        match await_ack(p.future, left).await {
            Ok(ack) => {
                self.count(&ack);
                Ok(())
            }
            Err(failure) if !failure.is_transient() => Err(PublishError::after(
                PublishErrorKind::Rejected,
                &p.subject,
                1,
                failure,
                "",
            )),
            Err(_) => {
                // Same message id: if the first attempt was stored, this is a duplicate.
                self.report.retried += 1;
                let ack = self
                    .publisher
                    .publish_bytes(&p.subject, "", p.headers, p.payload)
                    .await?;
                self.count(&ack);
                Ok(())
            }
        }
    }

    fn count(&mut self, ack: &PublishAck) {
        if ack.duplicate {
            self.report.duplicates += 1;
        } else {
            self.report.stored += 1;
        }
    }

    /// Waits for every outstanding PubAck and returns the counts.
    pub async fn finish(mut self) -> Result<PipelineReport, PublishError> {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(self.report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::PublishError as NatsPublishError;
    use async_nats::jetstream::context::PublishErrorKind;

    fn api_error(code: usize, err_code: u64) -> NatsPublishError {
        let api: async_nats::jetstream::Error = serde_json::from_str(&format!(
            r#"{{"code":{code},"err_code":{err_code},"description":"test"}}"#
        ))
        .unwrap_or_else(|e| panic!("a JetStream error: {e}"));
        NatsPublishError::with_source(PublishErrorKind::Other, api)
    }

    #[test]
    fn transient_and_permanent_failures() {
        for kind in [
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::StreamNotFound,
            PublishErrorKind::MaxAckPending,
        ] {
            assert!(is_transient(&NatsPublishError::new(kind)), "{kind:?}");
        }
        for kind in [
            PublishErrorKind::WrongLastMessageId,
            PublishErrorKind::WrongLastSequence,
            PublishErrorKind::MaxPayloadExceeded,
            PublishErrorKind::Other,
        ] {
            assert!(!is_transient(&NatsPublishError::new(kind)), "{kind:?}");
        }
        // No quorum / no leader right now: retry.
        assert!(is_transient(&api_error(503, 10008)));
        assert!(is_transient(&api_error(500, 10009)));
        // A full stream (discard new) answers 503 too, and stays full: do not retry.
        assert!(!is_transient(&api_error(503, 10077)));
        // A message over the stream's size limit.
        assert!(!is_transient(&api_error(400, 10054)));
    }

    #[test]
    fn message_ids_and_trace_headers() {
        let headers = with_msg_id(HeaderMap::new(), "e-1");
        assert_eq!(headers.get("Nats-Msg-Id").map(|v| v.as_str()), Some("e-1"));
        assert!(headers.get(trace::TRACEPARENT).is_some());
        // An empty id (a retry keeping the headers it has) adds none.
        assert!(with_msg_id(HeaderMap::new(), "")
            .get("Nats-Msg-Id")
            .is_none());
    }
}
