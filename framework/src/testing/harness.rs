//! Unit-testing a handler without a server: call it with a payload, headers and an
//! attempt number, get the outcome the runtime would settle the delivery with.
//!
//! It runs the same path as the runtime (size check, decode with the consumer's codec,
//! handler with timeout and panic capture, then [`decide`]), so what passes here is what
//! happens in production.
//!
//! - [`HandlerHarness::call`] / [`call_at`](HandlerHarness::call_at): a value, encoded
//!   with the consumer's codec, as delivery number 1 / `attempt`.
//! - [`HandlerHarness::deliver`]: raw bytes with headers, attempt, subject
//!   ([`Delivery`]): malformed payloads, headers the handler reads, the last attempt.
//! - [`HandlerHarness::with_consumer`]: the consumer's settings from your config (codec,
//!   `max_deliver`, the `backoff` schedule, handler timeout, size limit), so the retry
//!   delays and the last attempt are production's.
//! - [`HandlerHarness::with_jetstream`]: for handlers that use key-value buckets or
//!   publish, a JetStream context on a real test server ([`crate::testing::server`]).
//!
//! - [`BatchHarness`]: the same for a batch handler ([`crate::Batch`]): a list of
//!   deliveries in, the outcome of each message out.
//!
//! `examples/testing_a_handler.rs` shows it in a user's tests.
//!
//! ```
//! use jetworker::testing::harness::HandlerHarness;
//! use jetworker::{Outcome, Reason};
//! use jetworker::{Context, Event, HandlerError};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Order { amount: i64 }
//!
//! async fn charge(order: Event<Order>, _ctx: Context) -> Result<(), HandlerError> {
//!     if order.amount < 0 {
//!         return Err(HandlerError::permanent("negative amount"));
//!     }
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let harness = HandlerHarness::new((), charge);
//! assert_eq!(harness.call(&Order { amount: 5 }).await, Outcome::Ack);
//! let outcome = harness.call(&Order { amount: -1 }).await;
//! assert!(matches!(outcome, Outcome::DeadLetter { reason: Reason::Permanent, .. }));
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::batch::{BatchContext, BatchHandler, ErasedBatchHandler, Incoming, TypedBatchHandler};
use crate::codec::{self, CodecKind};
use crate::config::ConsumerConfig;
use crate::consumer::{attempted_from, batch_attempts, prepare, stage, BatchRan};
use crate::handler::{Context, ErasedHandler, Handler, TypedHandler};
use crate::outcome::{decide, Attempted, Outcome};

/// One call: what the runtime would have received.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The raw payload.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: HeaderMap,
    /// The server's delivery count (1-based).
    pub attempt: u64,
    /// The subject.
    pub subject: String,
    /// Stream sequence.
    pub sequence: u64,
}

impl Delivery {
    /// A first delivery of `payload` on subject `test`.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Delivery {
            payload: payload.into(),
            headers: HeaderMap::new(),
            attempt: 1,
            subject: "test".to_string(),
            sequence: 1,
        }
    }

    /// Sets the attempt number.
    pub fn attempt(mut self, attempt: u64) -> Self {
        self.attempt = attempt;
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Sets the subject.
    pub fn subject(mut self, subject: &str) -> Self {
        self.subject = subject.to_string();
        self
    }

    /// Sets the stream sequence ([`Context::stream_sequence`]).
    pub fn sequence(mut self, sequence: u64) -> Self {
        self.sequence = sequence;
        self
    }
}

/// A handler with the consumer settings that shape its outcomes.
pub struct HandlerHarness<S> {
    state: Arc<S>,
    handler: Arc<dyn ErasedHandler<S>>,
    consumer: ConsumerConfig,
    jetstream: Option<async_nats::jetstream::Context>,
}

impl<S: Send + Sync + 'static> HandlerHarness<S> {
    /// Wraps `handler` with shared `state` and the default consumer settings
    /// (MessagePack, max_deliver 5, the default schedule, 60 s timeout, 1 MiB limit).
    pub fn new<T, H>(state: S, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: DeserializeOwned + Send + 'static,
    {
        HandlerHarness::with_erased(state, Arc::new(TypedHandler::new(handler)))
    }

    /// A harness of a handler whose payload type is erased, at the default settings.
    fn with_erased(state: S, handler: Arc<dyn ErasedHandler<S>>) -> Self {
        HandlerHarness {
            state: Arc::new(state),
            handler,
            consumer: ConsumerConfig {
                name: "test".to_string(),
                ..ConsumerConfig::default()
            },
            jetstream: None,
        }
    }

    /// Gives the handler a JetStream context ([`Context::jetstream`]), for handlers that
    /// use key-value buckets or publish: connect it to a real server from
    /// [`crate::testing::server`]. Without one, `ctx.jetstream()` is `None`.
    pub fn with_jetstream(mut self, js: async_nats::jetstream::Context) -> Self {
        self.jetstream = Some(js);
        self
    }

    /// Uses a consumer's settings from a config (codec, limits, schedule, max_deliver).
    pub fn with_consumer(mut self, consumer: ConsumerConfig) -> Self {
        self.consumer = consumer;
        self
    }

    /// Mutable access to the consumer settings.
    pub fn consumer_mut(&mut self) -> &mut ConsumerConfig {
        &mut self.consumer
    }

    /// Sets the codec.
    pub fn codec(mut self, codec: CodecKind) -> Self {
        self.consumer.codec = codec;
        self
    }

    /// Sets max deliver.
    pub fn max_deliver(mut self, max_deliver: i64) -> Self {
        self.consumer.max_deliver = max_deliver;
        self
    }

    /// Sets the retry schedule.
    pub fn backoff(mut self, schedule: Vec<Duration>) -> Self {
        self.consumer.backoff = Some(schedule);
        self
    }

    /// Sets the handler timeout.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.consumer.handler_timeout = timeout;
        self
    }

    /// Sets the payload size limit.
    pub fn max_payload_bytes(mut self, limit: i64) -> Self {
        self.consumer.max_payload_bytes = limit;
        self
    }

    /// The shared state, to inspect what the handler did.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// Encodes `value` with the codec and calls the handler as a first delivery.
    ///
    /// # Panics
    /// When `value` cannot be encoded with the consumer's codec: the test itself is wrong.
    pub async fn call<T: Serialize + ?Sized>(&self, value: &T) -> Outcome {
        self.call_at(value, 1).await
    }

    /// Encodes `value` and calls the handler as delivery number `attempt`.
    ///
    /// # Panics
    /// When `value` cannot be encoded with the consumer's codec: the test itself is wrong.
    pub async fn call_at<T: Serialize + ?Sized>(&self, value: &T, attempt: u64) -> Outcome {
        match codec::encode(self.consumer.codec, value) {
            Ok(payload) => self.deliver(Delivery::new(payload).attempt(attempt)).await,
            Err(e) => panic!("the test value does not encode: {e}"),
        }
    }

    /// Calls the handler with a raw delivery (payload bytes, headers, attempt).
    pub async fn deliver(&self, delivery: Delivery) -> Outcome {
        let policy = self.consumer.retry_schedule();
        let mut ctx = Context::new(self.state.clone(), delivery.subject, delivery.attempt)
            .with_headers(delivery.headers)
            .with_origin("TEST", &self.consumer.name, delivery.sequence)
            .with_max_deliver(policy.max_deliver);
        if let Some(js) = &self.jetstream {
            ctx = ctx.with_jetstream(js.clone());
        }
        let attempted = match prepare(
            self.handler.as_ref(),
            &delivery.payload,
            &self.consumer,
            ctx,
        ) {
            Err(attempted) => attempted,
            Ok(future) => match tokio::time::timeout(self.consumer.handler_timeout, future).await {
                Ok(result) => attempted_from(result),
                Err(_) => Attempted::TimedOut(self.consumer.handler_timeout),
            },
        };
        decide(&attempted, delivery.attempt, &policy)
    }
}

/// A batch handler with the consumer settings that shape its outcomes: each call runs
/// one batch the way the runtime does (size check and decode per message, the handler
/// once with its timeout and panics caught, then the decision per message).
///
/// ```
/// use jetworker::testing::harness::BatchHarness;
/// use jetworker::{Batch, BatchContext, BatchFailures, BatchResult, HandlerError, Outcome, Reason};
///
/// async fn store(numbers: Batch<i64>, _ctx: BatchContext) -> BatchResult {
///     let mut failures = BatchFailures::new();
///     for n in &numbers {
///         if **n < 0 {
///             failures.fail(n, HandlerError::permanent("negative"));
///         }
///     }
///     Ok(failures)
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let outcomes = BatchHarness::new((), store).call(&[5, -1]).await;
/// assert_eq!(outcomes[0], Outcome::Ack);
/// assert!(matches!(outcomes[1], Outcome::DeadLetter { reason: Reason::Permanent, .. }));
/// # }
/// ```
pub struct BatchHarness<S> {
    /// The settings (and a harness of the handler for one message: a batch of one).
    settings: HandlerHarness<S>,
    handler: Arc<dyn ErasedBatchHandler<S>>,
}

impl<S: Send + Sync + 'static> BatchHarness<S> {
    /// Wraps `handler` with shared `state` and the default consumer settings (as
    /// [`HandlerHarness::new`]).
    pub fn new<T, H>(state: S, handler: H) -> Self
    where
        H: BatchHandler<T, S>,
        T: DeserializeOwned + Send + 'static,
    {
        let handler = Arc::new(TypedBatchHandler::new(handler));
        BatchHarness {
            settings: HandlerHarness::with_erased(state, handler.clone()),
            handler,
        }
    }

    /// Changes the settings with [`HandlerHarness`]'s builders (`with_consumer`,
    /// `max_deliver`, `backoff`, `handler_timeout`, `codec`, `with_jetstream`, ...):
    /// `BatchHarness::new((), store).configure(|h| h.max_deliver(3))`.
    pub fn configure(
        mut self,
        change: impl FnOnce(HandlerHarness<S>) -> HandlerHarness<S>,
    ) -> Self {
        self.settings = change(self.settings);
        self
    }

    /// The shared state, to inspect what the handler did.
    pub fn state(&self) -> &S {
        &self.settings.state
    }

    /// Encodes each value with the codec and runs them as one batch of first deliveries
    /// (sequences 1, 2, ...). The outcomes are in the values' order.
    ///
    /// # Panics
    /// When a value cannot be encoded with the consumer's codec: the test itself is wrong.
    pub async fn call<T: Serialize>(&self, values: &[T]) -> Vec<Outcome> {
        let codec = self.settings.consumer.codec;
        let deliveries = values
            .iter()
            .zip(1..)
            .map(|(value, sequence)| match codec::encode(codec, value) {
                Ok(payload) => Delivery::new(payload).sequence(sequence),
                Err(e) => panic!("the test value does not encode: {e}"),
            })
            .collect();
        self.deliver(deliveries).await
    }

    /// Runs raw deliveries (payload bytes, headers, attempt each) as one batch. The
    /// outcomes are in the deliveries' order.
    pub async fn deliver(&self, deliveries: Vec<Delivery>) -> Vec<Outcome> {
        let HandlerHarness {
            state,
            consumer,
            jetstream,
            ..
        } = &self.settings;
        let policy = consumer.retry_schedule();
        let mut ctx = BatchContext::new(state.clone()).with_origin("TEST", &consumer.name);
        if let Some(js) = jetstream {
            ctx = ctx.with_jetstream(js.clone());
        }
        let incoming = deliveries
            .iter()
            .map(|d| Incoming {
                payload: &d.payload,
                subject: d.subject.as_str().into(),
                headers: d.headers.clone(),
                stream_sequence: d.sequence,
                attempt: d.attempt,
                max_deliver: policy.max_deliver,
            })
            .collect();
        let staged = stage(self.handler.as_ref(), incoming, consumer, ctx);
        let mut attempts = staged.rejected;
        if let Some(future) = staged.future {
            let ran = match tokio::time::timeout(consumer.handler_timeout, future).await {
                Ok(result) => BatchRan::Finished(result),
                Err(_) => BatchRan::TimedOut(consumer.handler_timeout),
            };
            let ran = batch_attempts(ran, staged.accepted.len());
            for (at, attempted) in staged.accepted.into_iter().zip(ran) {
                if let Some(slot) = attempts.get_mut(at) {
                    *slot = Some(attempted);
                }
            }
        }
        deliveries
            .iter()
            .zip(attempts)
            .map(|(delivery, attempted)| {
                // Every message is either rejected or in the batch.
                let attempted = attempted.unwrap_or(Attempted::Succeeded);
                decide(&attempted, delivery.attempt, &policy)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{Event, HandlerError};
    use crate::outcome::Reason;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Serialize, serde::Deserialize)]
    struct Job {
        kind: String,
    }

    async fn job(job: Event<Job>, ctx: Context<AtomicU64>) -> Result<(), HandlerError> {
        ctx.state().fetch_add(1, Ordering::SeqCst);
        match job.kind.as_str() {
            "ok" => Ok(()),
            "flaky" => Err("downstream unavailable".into()),
            "later" => Err(HandlerError::retry_after(
                Duration::from_secs(9),
                "rate limited",
            )),
            "bad" => Err(HandlerError::permanent("invalid job")),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(())
            }
            _ => panic!("unknown kind"),
        }
    }

    fn harness() -> HandlerHarness<AtomicU64> {
        HandlerHarness::new(AtomicU64::new(0), job)
            .max_deliver(3)
            .backoff(vec![Duration::from_secs(1), Duration::from_secs(4)])
            .handler_timeout(Duration::from_millis(50))
    }

    fn j(kind: &str) -> Job {
        Job { kind: kind.into() }
    }

    #[tokio::test]
    async fn outcomes_match_the_runtime() {
        let h = harness();
        assert_eq!(h.call(&j("ok")).await, Outcome::Ack);
        assert_eq!(
            h.call_at(&j("flaky"), 2).await,
            Outcome::Nak(Duration::from_secs(4))
        );
        assert!(matches!(
            h.call_at(&j("flaky"), 3).await,
            Outcome::DeadLetter {
                reason: Reason::Exhausted,
                ..
            }
        ));
        assert_eq!(
            h.call(&j("later")).await,
            Outcome::Nak(Duration::from_secs(9))
        );
        assert!(matches!(
            h.call(&j("bad")).await,
            Outcome::DeadLetter {
                reason: Reason::Permanent,
                ..
            }
        ));
        assert_eq!(
            h.call(&j("panic")).await,
            Outcome::Nak(Duration::from_secs(1))
        );
        assert!(matches!(
            h.call_at(&j("panic"), 3).await,
            Outcome::DeadLetter {
                reason: Reason::Panic,
                ..
            }
        ));
        assert!(matches!(
            h.call_at(&j("slow"), 3).await,
            Outcome::DeadLetter {
                reason: Reason::Timeout,
                ..
            }
        ));
        assert_eq!(h.state().load(Ordering::SeqCst), 8);
    }

    #[tokio::test]
    async fn raw_payloads() {
        let h = harness().max_payload_bytes(10);
        assert!(matches!(
            h.deliver(Delivery::new(b"\xc1".to_vec())).await,
            Outcome::DeadLetter {
                reason: Reason::Decode,
                ..
            }
        ));
        assert!(matches!(
            h.deliver(Delivery::new(vec![0u8; 11])).await,
            Outcome::DeadLetter {
                reason: Reason::TooLarge,
                ..
            }
        ));
        let json = harness().codec(CodecKind::Json);
        assert_eq!(
            json.deliver(Delivery::new(br#"{"kind":"ok"}"#.to_vec()))
                .await,
            Outcome::Ack
        );
        assert_eq!(h.state().load(Ordering::SeqCst), 0, "never called");
    }

    /// Jobs as a batch: "ok" succeeds, "bad" fails permanently, "later" asks for a
    /// delay; "down" fails the whole batch, "panic" panics, "slow" outlasts the timeout.
    async fn jobs(
        batch: crate::batch::Batch<Job>,
        ctx: BatchContext<AtomicU64>,
    ) -> crate::batch::BatchResult {
        ctx.state().fetch_add(batch.len() as u64, Ordering::SeqCst);
        let mut failures = crate::batch::BatchFailures::new();
        for job in &batch {
            match job.kind.as_str() {
                "bad" => failures.fail(job, HandlerError::permanent("invalid job")),
                "later" => failures.fail(
                    job,
                    HandlerError::retry_after(Duration::from_secs(9), "rate limited"),
                ),
                "down" => return Err("database down".into()),
                "panic" => panic!("unknown kind"),
                "slow" => tokio::time::sleep(Duration::from_secs(60)).await,
                _ => {}
            }
        }
        Ok(failures)
    }

    fn batch_harness() -> BatchHarness<AtomicU64> {
        BatchHarness::new(AtomicU64::new(0), jobs).configure(|h| {
            h.max_deliver(3)
                .backoff(vec![Duration::from_secs(1), Duration::from_secs(4)])
                .handler_timeout(Duration::from_millis(50))
                .max_payload_bytes(40)
        })
    }

    fn is_dead(outcome: &Outcome, want: Reason) -> bool {
        matches!(outcome, Outcome::DeadLetter { reason, .. } if *reason == want)
    }

    #[tokio::test]
    async fn a_batch_settles_each_message_on_its_own() {
        let h = batch_harness();
        let outcomes = h.call(&[j("ok"), j("bad"), j("later"), j("ok")]).await;
        assert_eq!(outcomes[0], Outcome::Ack);
        assert!(is_dead(&outcomes[1], Reason::Permanent), "{outcomes:?}");
        assert_eq!(outcomes[2], Outcome::Nak(Duration::from_secs(9)));
        assert_eq!(outcomes[3], Outcome::Ack);
        // Undecodable and too large never reach the batch; the rest still runs.
        let too_large = codec::encode(CodecKind::Msgpack, &j(&"x".repeat(64))).expect("encodes");
        let outcomes = h
            .deliver(vec![
                Delivery::new(b"\xc1".to_vec()),
                Delivery::new(codec::encode(CodecKind::Msgpack, &j("ok")).expect("encodes")),
                Delivery::new(too_large),
            ])
            .await;
        assert!(is_dead(&outcomes[0], Reason::Decode), "{outcomes:?}");
        assert_eq!(outcomes[1], Outcome::Ack);
        assert!(is_dead(&outcomes[2], Reason::TooLarge), "{outcomes:?}");
        assert_eq!(
            h.state().load(Ordering::SeqCst),
            5,
            "only decoded messages reach the handler"
        );
    }

    #[tokio::test]
    async fn an_error_panic_or_timeout_applies_to_the_whole_batch() {
        let h = batch_harness();
        let down = h.call(&[j("ok"), j("down")]).await;
        assert_eq!(down, vec![Outcome::Nak(Duration::from_secs(1)); 2]);
        let panicked = h.call(&[j("panic"), j("ok")]).await;
        assert_eq!(panicked, vec![Outcome::Nak(Duration::from_secs(1)); 2]);
        // Each message is decided at its own attempt: the last one is dead-lettered.
        let enc = |kind: &str| codec::encode(CodecKind::Msgpack, &j(kind)).expect("encodes");
        let slow = h
            .deliver(vec![
                Delivery::new(enc("slow")).attempt(2),
                Delivery::new(enc("ok")).attempt(3),
            ])
            .await;
        assert_eq!(slow[0], Outcome::Nak(Duration::from_secs(4)));
        assert!(is_dead(&slow[1], Reason::Timeout), "{slow:?}");
        let last = h
            .deliver(vec![Delivery::new(enc("panic")).attempt(3)])
            .await;
        assert!(is_dead(&last[0], Reason::Panic), "{last:?}");
    }
}
