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

use crate::codec::{self, CodecKind};
use crate::config::ConsumerConfig;
use crate::consumer::{attempted_from, prepare};
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
        HandlerHarness {
            state: Arc::new(state),
            handler: Arc::new(TypedHandler::new(handler)),
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
}
