//! Batch handlers: plain async functions that take many messages at once.
//!
//! ```
//! use jetworker::{Batch, BatchContext, BatchFailures, BatchResult, HandlerError};
//! # #[derive(serde::Deserialize)] struct Click { page: String }
//! async fn store_clicks(clicks: Batch<Click>, _ctx: BatchContext) -> BatchResult {
//!     let mut failures = BatchFailures::new();
//!     let mut rows = Vec::new();
//!     for click in &clicks {
//!         if click.page.is_empty() {
//!             // This one is dead-lettered; the others are acked.
//!             failures.fail(click, HandlerError::permanent("click without a page"));
//!         } else {
//!             rows.push(click.page.clone());
//!         }
//!     }
//!     // `?` fails the whole batch: every message is retried on the schedule.
//!     insert_rows(rows).await?;
//!     Ok(failures)
//! }
//! # async fn insert_rows(_rows: Vec<String>) -> Result<(), std::io::Error> { Ok(()) }
//! ```
//!
//! Any function `async fn(Batch<T>, BatchContext<S>) -> Result<BatchFailures, E>` (or
//! `Result<(), E>` when no single message fails) is a [`BatchHandler`], registered with
//! [`App::batch_handler`](crate::App::batch_handler). Each message of the batch is
//! decided on its own with the same table as a single handler's message (see
//! [`decide`](crate::decide)): what the handler marks failed in [`BatchFailures`] is
//! retried or dead-lettered by its error's kind, the rest is acked; an `Err` (or a panic,
//! or the handler timeout) applies to every message of the batch. Messages that are too
//! large or do not decode never reach the batch: they are dead-lettered as for a single
//! handler.

use std::future::Future;
use std::marker::PhantomData;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use async_nats::{HeaderMap, Subject};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, CodecKind, DecodeError};
use crate::consumer::panic_message;
use crate::handler::{Context, ErasedHandler, HandlerError, HandlerFuture};
use crate::outcome::Attempted;

/// The messages of one batch, decoded, in stream order. Iterate it (by reference to mark
/// failures, by value to take the payloads); each [`BatchMessage`] derefs to its payload.
#[derive(Debug)]
pub struct Batch<T> {
    messages: Vec<BatchMessage<T>>,
}

impl<T> Batch<T> {
    /// A batch of these messages (for calling a batch handler in tests; see
    /// [`BatchMessage::new`]). They are numbered in this order.
    pub fn new(messages: impl IntoIterator<Item = BatchMessage<T>>) -> Self {
        let messages = messages
            .into_iter()
            .enumerate()
            .map(|(index, mut message)| {
                message.index = index;
                message
            })
            .collect();
        Batch { messages }
    }

    /// How many messages it holds (at least one when the runtime calls a handler).
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True when it holds no message.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The messages, in stream order.
    pub fn iter(&self) -> std::slice::Iter<'_, BatchMessage<T>> {
        self.messages.iter()
    }

    /// The messages as a slice.
    pub fn messages(&self) -> &[BatchMessage<T>] {
        &self.messages
    }

    /// The payloads alone, in stream order (no message can be marked failed afterwards).
    pub fn into_payloads(self) -> Vec<T> {
        self.messages.into_iter().map(|m| m.payload).collect()
    }
}

impl<'a, T> IntoIterator for &'a Batch<T> {
    type Item = &'a BatchMessage<T>;
    type IntoIter = std::slice::Iter<'a, BatchMessage<T>>;
    fn into_iter(self) -> Self::IntoIter {
        self.messages.iter()
    }
}

impl<T> IntoIterator for Batch<T> {
    type Item = BatchMessage<T>;
    type IntoIter = std::vec::IntoIter<BatchMessage<T>>;
    fn into_iter(self) -> Self::IntoIter {
        self.messages.into_iter()
    }
}

/// One message of a batch: its decoded payload (it derefs to it) and what a single
/// handler's [`Context`](crate::Context) tells about its delivery.
#[derive(Debug, Clone)]
pub struct BatchMessage<T> {
    /// The decoded payload.
    pub payload: T,
    /// Its place in the batch: what [`BatchFailures`] records.
    index: usize,
    subject: Subject,
    headers: HeaderMap,
    stream_sequence: u64,
    attempt: u64,
    max_deliver: u64,
}

impl<T> BatchMessage<T> {
    /// A message outside the runtime (tests): `payload` on `subject`, delivery number
    /// `attempt`, no headers, no attempt limit.
    pub fn new(payload: T, subject: &str, attempt: u64) -> Self {
        BatchMessage {
            payload,
            index: 0,
            subject: Subject::from(subject),
            headers: HeaderMap::new(),
            stream_sequence: 0,
            attempt,
            max_deliver: u64::MAX,
        }
    }

    /// Its place in the batch, from 0 (see [`BatchFailures::error_of`]).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The subject the message was published to.
    pub fn subject(&self) -> &str {
        self.subject.as_str()
    }

    /// The message headers (empty when it had none).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The message's sequence in its stream: a stable id for idempotency.
    pub fn stream_sequence(&self) -> u64 {
        self.stream_sequence
    }

    /// Which delivery of this message this is, 1-based (the server's count). Messages of
    /// one batch may be on different attempts.
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    /// True when this is the last delivery the consumer allows for this message.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_deliver
    }

    /// The payload, by value.
    pub fn into_inner(self) -> T {
        self.payload
    }
}

impl<T> Deref for BatchMessage<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.payload
    }
}

/// Everything about a batch besides its messages: the shared state, where it comes
/// from, the shutdown signal and the JetStream context.
#[derive(Debug)]
pub struct BatchContext<S = ()> {
    state: Arc<S>,
    stream: String,
    consumer: String,
    shutdown: CancellationToken,
    jetstream: Option<Arc<async_nats::jetstream::Context>>,
}

impl<S> Clone for BatchContext<S> {
    fn clone(&self) -> Self {
        BatchContext {
            state: self.state.clone(),
            stream: self.stream.clone(),
            consumer: self.consumer.clone(),
            shutdown: self.shutdown.clone(),
            jetstream: self.jetstream.clone(),
        }
    }
}

impl<S> BatchContext<S> {
    /// A context for calling a batch handler outside the runtime (tests, the harness).
    pub fn new(state: Arc<S>) -> Self {
        BatchContext {
            state,
            stream: String::new(),
            consumer: String::new(),
            shutdown: CancellationToken::new(),
            jetstream: None,
        }
    }

    /// Sets stream and consumer (builder style).
    pub fn with_origin(mut self, stream: &str, consumer: &str) -> Self {
        self.stream = stream.to_string();
        self.consumer = consumer.to_string();
        self
    }

    /// Sets the JetStream context handlers reach through [`BatchContext::jetstream`].
    pub fn with_jetstream(mut self, js: async_nats::jetstream::Context) -> Self {
        self.jetstream = Some(Arc::new(js));
        self
    }

    /// The runtime's context: shares its JetStream context and shutdown signal.
    pub(crate) fn for_runtime(
        state: Arc<S>,
        stream: &str,
        consumer: &str,
        shutdown: CancellationToken,
        jetstream: Arc<async_nats::jetstream::Context>,
    ) -> Self {
        BatchContext {
            state,
            stream: stream.to_string(),
            consumer: consumer.to_string(),
            shutdown,
            jetstream: Some(jetstream),
        }
    }

    /// The shared state given to [`crate::App::new`].
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The shared state, as its `Arc`.
    pub fn state_arc(&self) -> Arc<S> {
        self.state.clone()
    }

    /// The stream the messages are stored in.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The durable consumer delivering them.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The worker's JetStream context; `None` only for contexts built outside the
    /// runtime without one.
    pub fn jetstream(&self) -> Option<&async_nats::jetstream::Context> {
        self.jetstream.as_deref()
    }

    /// Cancelled when the worker starts shutting down: a long batch can stop early and
    /// return an error (its messages are then redelivered).
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }
}

/// The messages of a batch that failed, each with its error; every other message of the
/// batch is acked. Each failure is decided by its error's kind, as a single handler's
/// error is: transient (retried on the schedule), retry after a delay, or permanent
/// (dead-lettered now).
#[derive(Debug, Default)]
pub struct BatchFailures {
    failed: Vec<(usize, HandlerError)>,
}

impl BatchFailures {
    /// No failure yet.
    pub fn new() -> Self {
        BatchFailures::default()
    }

    /// Marks `message` failed with `error` (a later mark of the same message replaces
    /// this one). Any error converts into a transient [`HandlerError`]; use
    /// [`HandlerError::permanent`] or [`HandlerError::retry_after`] for the others.
    pub fn fail<T>(&mut self, message: &BatchMessage<T>, error: impl Into<HandlerError>) {
        self.failed.retain(|(index, _)| *index != message.index);
        self.failed.push((message.index, error.into()));
    }

    /// How many messages are marked failed.
    pub fn len(&self) -> usize {
        self.failed.len()
    }

    /// True when no message is marked failed.
    pub fn is_empty(&self) -> bool {
        self.failed.is_empty()
    }

    /// The error marked for the message at `index` of the batch, if any.
    pub fn error_of(&self, index: usize) -> Option<&HandlerError> {
        self.failed
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, error)| error)
    }

    /// The failures, by the index of their message in the batch.
    pub(crate) fn into_indexed(self) -> Vec<(usize, HandlerError)> {
        self.failed
    }
}

/// What a batch handler returns: single failures, or an error for the whole batch.
pub type BatchResult = Result<BatchFailures, HandlerError>;

/// What a batch handler's future returns: `Result<BatchFailures, E>` or `Result<(), E>`
/// with `E: Into<HandlerError>`.
pub trait BatchOutput {
    /// Into the framework's form.
    fn into_batch_result(self) -> BatchResult;
}

impl<E: Into<HandlerError>> BatchOutput for Result<BatchFailures, E> {
    fn into_batch_result(self) -> BatchResult {
        self.map_err(Into::into)
    }
}

impl<E: Into<HandlerError>> BatchOutput for Result<(), E> {
    fn into_batch_result(self) -> BatchResult {
        self.map(|()| BatchFailures::new()).map_err(Into::into)
    }
}

/// A boxed batch handler future.
pub type BatchFuture = Pin<Box<dyn Future<Output = BatchResult> + Send>>;

/// An async function usable as a batch handler for payload type `T` with state `S`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a jetworker batch handler",
    label = "not `async fn(Batch<T>, BatchContext<S>) -> BatchResult`",
    note = "a batch handler is `async fn name(batch: Batch<T>, ctx: BatchContext<S>) -> Result<BatchFailures, HandlerError>` (or `Result<(), E>`) where T: serde::de::DeserializeOwned + Send and S is the App's state type (`()` by default)"
)]
pub trait BatchHandler<T, S>: Clone + Send + Sync + 'static {
    /// Runs the handler.
    fn call(&self, batch: Batch<T>, ctx: BatchContext<S>) -> BatchFuture;
}

impl<F, Fut, T, S> BatchHandler<T, S> for F
where
    F: Fn(Batch<T>, BatchContext<S>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: BatchOutput,
    T: Send + 'static,
    S: Send + Sync + 'static,
{
    fn call(&self, batch: Batch<T>, ctx: BatchContext<S>) -> BatchFuture {
        let fut = (self)(batch, ctx);
        Box::pin(async move { fut.await.into_batch_result() })
    }
}

/// One message on its way into a batch: its raw payload and its delivery's details.
pub(crate) struct Incoming<'a> {
    pub payload: &'a [u8],
    pub subject: Subject,
    pub headers: HeaderMap,
    pub stream_sequence: u64,
    pub attempt: u64,
    pub max_deliver: u64,
}

/// A batch ready to run: the handler's future over the messages that decoded, which of
/// the incoming messages those are (in batch order), and why the others cannot run.
pub(crate) struct PreparedBatch {
    /// `None` when no message decoded: the handler is not called with an empty batch.
    pub future: Option<BatchFuture>,
    /// For each message of the batch, its index among the incoming messages.
    pub accepted: Vec<usize>,
    /// Incoming messages that did not decode (or panicked while decoding), by index.
    pub rejected: Vec<(usize, Attempted)>,
}

/// A batch handler with its payload type erased: decodes each message, then calls.
pub(crate) trait ErasedBatchHandler<S>: Send + Sync {
    /// Decodes every incoming message with `codec` and returns the handler's future over
    /// those that decoded.
    fn prepare(
        &self,
        incoming: Vec<Incoming<'_>>,
        codec: CodecKind,
        ctx: BatchContext<S>,
    ) -> PreparedBatch;
}

pub(crate) struct TypedBatchHandler<H, T> {
    handler: H,
    _payload: PhantomData<fn() -> T>,
}

impl<H, T> TypedBatchHandler<H, T> {
    pub(crate) fn new(handler: H) -> Self {
        TypedBatchHandler {
            handler,
            _payload: PhantomData,
        }
    }
}

impl<H, T, S> ErasedBatchHandler<S> for TypedBatchHandler<H, T>
where
    H: BatchHandler<T, S>,
    T: DeserializeOwned + Send + 'static,
    S: Send + Sync + 'static,
{
    fn prepare(
        &self,
        incoming: Vec<Incoming<'_>>,
        codec: CodecKind,
        ctx: BatchContext<S>,
    ) -> PreparedBatch {
        let mut messages = Vec::with_capacity(incoming.len());
        let mut accepted = Vec::with_capacity(incoming.len());
        let mut rejected = Vec::new();
        for (at, message) in incoming.into_iter().enumerate() {
            // A payload type's `Deserialize` may panic: that message alone is affected.
            let decoded = std::panic::catch_unwind(AssertUnwindSafe(|| {
                codec::decode::<T>(codec, message.payload)
            }));
            match decoded {
                Ok(Ok(payload)) => {
                    messages.push(BatchMessage {
                        payload,
                        index: messages.len(),
                        subject: message.subject,
                        headers: message.headers,
                        stream_sequence: message.stream_sequence,
                        attempt: message.attempt,
                        max_deliver: message.max_deliver,
                    });
                    accepted.push(at);
                }
                Ok(Err(e)) => rejected.push((at, Attempted::Undecodable(e.to_string()))),
                Err(panic) => rejected.push((at, Attempted::Panicked(panic_message(&panic)))),
            }
        }
        let future = if messages.is_empty() {
            None
        } else {
            Some(self.handler.call(Batch { messages }, ctx))
        };
        PreparedBatch {
            future,
            accepted,
            rejected,
        }
    }
}

/// A batch handler is also a handler of one message: a batch of one. This is what runs
/// it on a path that has a single delivery at hand.
impl<H, T, S> ErasedHandler<S> for TypedBatchHandler<H, T>
where
    H: BatchHandler<T, S>,
    T: DeserializeOwned + Send + 'static,
    S: Send + Sync + 'static,
{
    fn prepare(
        &self,
        payload: &[u8],
        codec: CodecKind,
        ctx: Context<S>,
    ) -> Result<HandlerFuture, DecodeError> {
        let payload: T = codec::decode(codec, payload)?;
        let message = BatchMessage {
            payload,
            index: 0,
            subject: ctx.subject.clone(),
            headers: ctx.headers.clone(),
            stream_sequence: ctx.stream_sequence,
            attempt: ctx.attempt,
            max_deliver: ctx.max_deliver(),
        };
        let batch_ctx = BatchContext {
            state: ctx.state_arc(),
            stream: ctx.stream().to_owned(),
            consumer: ctx.consumer().to_owned(),
            shutdown: ctx.shutdown().clone(),
            jetstream: ctx.jetstream_arc(),
        };
        let future = self.handler.call(Batch::new([message]), batch_ctx);
        Ok(Box::pin(async move {
            let failures = future.await?;
            match failures.into_indexed().pop() {
                Some((_, error)) => Err(error),
                None => Ok(()),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::HandlerErrorKind;

    async fn keep_even(batch: Batch<u32>, _ctx: BatchContext) -> BatchResult {
        let mut failures = BatchFailures::new();
        for message in &batch {
            if message.payload % 2 == 1 {
                failures.fail(message, HandlerError::permanent("odd"));
            }
        }
        Ok(failures)
    }

    fn incoming(payload: &[u8]) -> Incoming<'_> {
        Incoming {
            payload,
            subject: Subject::from("numbers"),
            headers: HeaderMap::new(),
            stream_sequence: 1,
            attempt: 1,
            max_deliver: 5,
        }
    }

    #[tokio::test]
    async fn undecodable_messages_never_reach_the_batch() {
        let handler = TypedBatchHandler::new(keep_even);
        let one = codec::encode(CodecKind::Msgpack, &1u32).expect("encodes");
        let two = codec::encode(CodecKind::Msgpack, &2u32).expect("encodes");
        let prepared = ErasedBatchHandler::prepare(
            &handler,
            vec![incoming(&one), incoming(b"\xc1"), incoming(&two)],
            CodecKind::Msgpack,
            BatchContext::new(Arc::new(())),
        );
        assert_eq!(prepared.accepted, vec![0, 2]);
        assert_eq!(prepared.rejected.len(), 1);
        assert_eq!(prepared.rejected[0].0, 1);
        assert!(matches!(prepared.rejected[0].1, Attempted::Undecodable(_)));
        let failures = prepared
            .future
            .expect("two decoded")
            .await
            .expect("no batch error");
        // Indexes are the batch's: the odd one is the batch's first message.
        assert_eq!(failures.len(), 1);
        assert_eq!(
            failures.error_of(0).map(HandlerError::kind),
            Some(HandlerErrorKind::Permanent)
        );
    }

    #[test]
    fn a_later_mark_replaces_an_earlier_one() {
        let batch = Batch::new([BatchMessage::new(7u8, "s", 1), BatchMessage::new(8, "s", 1)]);
        let mut failures = BatchFailures::new();
        failures.fail(&batch.messages()[1], "first");
        failures.fail(&batch.messages()[1], HandlerError::permanent("second"));
        assert_eq!(failures.len(), 1);
        let error = failures.error_of(1).expect("marked");
        assert_eq!(error.kind(), HandlerErrorKind::Permanent);
        assert_eq!(error.message(), "second");
        assert!(failures.error_of(0).is_none());
    }
}
