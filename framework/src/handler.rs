//! Handlers are plain async functions:
//!
//! ```
//! use jetworker::{Context, Event, HandlerError};
//! # #[derive(serde::Deserialize)] struct Click { page: String }
//! async fn track_click(click: Event<Click>, ctx: Context) -> Result<(), HandlerError> {
//!     if click.page.is_empty() {
//!         return Err(HandlerError::permanent("click without a page"));
//!     }
//!     let _ = ctx.attempt();
//!     Ok(())
//! }
//! ```
//!
//! Any function `async fn(Event<T>, Context<S>) -> Result<(), E>` is a [`Handler`], where
//! `T` is the payload type (decoded with the consumer's codec), `S` the shared state given
//! to [`crate::App::new`] and `E` anything that converts into [`HandlerError`]: with `?`,
//! every error is transient (retried on the consumer's schedule).

use std::future::Future;
use std::marker::PhantomData;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, CodecKind, DecodeError};
use crate::consumer::ConsumerRuntime;

/// A decoded payload. Derefs to `T`.
#[derive(Debug, Clone)]
pub struct Event<T> {
    /// The decoded payload.
    pub payload: T,
}

impl<T> Event<T> {
    /// Wraps a payload (handy in tests).
    pub fn new(payload: T) -> Self {
        Event { payload }
    }

    /// The payload, by value.
    pub fn into_inner(self) -> T {
        self.payload
    }
}

impl<T> Deref for Event<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.payload
    }
}

/// Everything about a delivery besides its payload, plus the shared state.
///
/// Made for every delivery, so it copies nothing per message: what is the same for all
/// of a consumer's deliveries (state, stream, consumer, shutdown signal, JetStream
/// context) is reached through the consumer's runtime, one reference count; the subject
/// shares the message's bytes.
pub struct Context<S = ()> {
    origin: Origin<S>,
    pub(crate) subject: async_nats::Subject,
    pub(crate) headers: HeaderMap,
    pub(crate) stream_sequence: u64,
    pub(crate) attempt: u64,
}

/// Where a [`Context`]'s per-consumer parts live.
enum Origin<S> {
    /// A delivery by the runtime: its consumer's runtime holds them.
    Runtime(Arc<ConsumerRuntime<S>>),
    /// A context built by hand ([`Context::new`]: tests, the harness).
    Detached(Arc<Detached<S>>),
}

impl<S> Clone for Origin<S> {
    fn clone(&self) -> Self {
        match self {
            Origin::Runtime(rt) => Origin::Runtime(rt.clone()),
            Origin::Detached(d) => Origin::Detached(d.clone()),
        }
    }
}

/// The per-consumer parts of a context built outside the runtime.
struct Detached<S> {
    state: Arc<S>,
    stream: String,
    consumer: String,
    max_deliver: u64,
    shutdown: CancellationToken,
    jetstream: Option<Arc<async_nats::jetstream::Context>>,
}

impl<S> Clone for Detached<S> {
    fn clone(&self) -> Self {
        Detached {
            state: self.state.clone(),
            stream: self.stream.clone(),
            consumer: self.consumer.clone(),
            max_deliver: self.max_deliver,
            shutdown: self.shutdown.clone(),
            jetstream: self.jetstream.clone(),
        }
    }
}

impl<S> Clone for Context<S> {
    fn clone(&self) -> Self {
        Context {
            origin: self.origin.clone(),
            subject: self.subject.clone(),
            headers: self.headers.clone(),
            stream_sequence: self.stream_sequence,
            attempt: self.attempt,
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Context<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("state", self.state())
            .field("subject", &self.subject())
            .field("headers", &self.headers)
            .field("stream", &self.stream())
            .field("consumer", &self.consumer())
            .field("stream_sequence", &self.stream_sequence)
            .field("attempt", &self.attempt)
            .field("max_deliver", &self.max_deliver())
            .finish_non_exhaustive()
    }
}

impl<S> Context<S> {
    /// The context of a delivery by the runtime `rt`.
    pub(crate) fn for_delivery(
        rt: &Arc<ConsumerRuntime<S>>,
        subject: async_nats::Subject,
        headers: HeaderMap,
        stream_sequence: u64,
        attempt: u64,
    ) -> Self {
        Context {
            origin: Origin::Runtime(rt.clone()),
            subject,
            headers,
            stream_sequence,
            attempt,
        }
    }

    /// A context for calling a handler outside the runtime (tests, the harness).
    pub fn new(state: Arc<S>, subject: impl Into<String>, attempt: u64) -> Self {
        Context {
            origin: Origin::Detached(Arc::new(Detached {
                state,
                stream: String::new(),
                consumer: String::new(),
                max_deliver: u64::MAX,
                shutdown: CancellationToken::new(),
                jetstream: None,
            })),
            subject: async_nats::Subject::from(subject.into()),
            headers: HeaderMap::new(),
            stream_sequence: 0,
            attempt,
        }
    }

    /// The per-consumer parts, detached from the runtime to be changed (builders).
    fn detached_mut(&mut self) -> &mut Detached<S> {
        if let Origin::Runtime(rt) = &self.origin {
            self.origin = Origin::Detached(Arc::new(Detached {
                state: rt.state.clone(),
                stream: rt.spec.stream.clone(),
                consumer: rt.spec.name.clone(),
                max_deliver: rt.policy.max_deliver,
                shutdown: rt.stop.clone(),
                jetstream: Some(rt.js.clone()),
            }));
        }
        match &mut self.origin {
            Origin::Detached(d) => Arc::make_mut(d),
            Origin::Runtime(_) => unreachable!("detached just above"),
        }
    }

    /// Sets the JetStream context handlers reach through [`Context::jetstream`].
    pub fn with_jetstream(mut self, js: async_nats::jetstream::Context) -> Self {
        self.detached_mut().jetstream = Some(Arc::new(js));
        self
    }

    /// Sets the attempt limit ([`Context::is_last_attempt`]).
    pub fn with_max_deliver(mut self, max_deliver: u64) -> Self {
        self.detached_mut().max_deliver = max_deliver;
        self
    }

    /// Sets the headers (builder style, for tests).
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// Sets stream, consumer and stream sequence (builder style, for tests).
    pub fn with_origin(mut self, stream: &str, consumer: &str, sequence: u64) -> Self {
        let detached = self.detached_mut();
        detached.stream = stream.to_string();
        detached.consumer = consumer.to_string();
        self.stream_sequence = sequence;
        self
    }

    /// The attempt limit: the consumer's `max_deliver`.
    pub(crate) fn max_deliver(&self) -> u64 {
        match &self.origin {
            Origin::Runtime(rt) => rt.policy.max_deliver,
            Origin::Detached(d) => d.max_deliver,
        }
    }

    /// The JetStream context, shared (what a batch of one passes on).
    pub(crate) fn jetstream_arc(&self) -> Option<Arc<async_nats::jetstream::Context>> {
        match &self.origin {
            Origin::Runtime(rt) => Some(rt.js.clone()),
            Origin::Detached(d) => d.jetstream.clone(),
        }
    }

    /// The shared state given to [`crate::App::new`].
    pub fn state(&self) -> &S {
        match &self.origin {
            Origin::Runtime(rt) => &rt.state,
            Origin::Detached(d) => &d.state,
        }
    }

    /// The shared state, as its `Arc`.
    pub fn state_arc(&self) -> Arc<S> {
        match &self.origin {
            Origin::Runtime(rt) => rt.state.clone(),
            Origin::Detached(d) => d.state.clone(),
        }
    }

    /// The subject the message was published to.
    pub fn subject(&self) -> &str {
        self.subject.as_str()
    }

    /// The message headers (empty when it had none).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The stream the message is stored in.
    pub fn stream(&self) -> &str {
        match &self.origin {
            Origin::Runtime(rt) => &rt.spec.stream,
            Origin::Detached(d) => &d.stream,
        }
    }

    /// The durable consumer delivering it.
    pub fn consumer(&self) -> &str {
        match &self.origin {
            Origin::Runtime(rt) => &rt.spec.name,
            Origin::Detached(d) => &d.consumer,
        }
    }

    /// The message's sequence in its stream: a stable id for idempotency.
    pub fn stream_sequence(&self) -> u64 {
        self.stream_sequence
    }

    /// Which delivery this is, 1-based: the server's count, so it is right across replicas.
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    /// True when this is the last delivery the consumer allows.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_deliver()
    }

    /// The worker's JetStream context (for key-value buckets, follow-up publishes);
    /// `None` only for contexts built outside the runtime without one.
    pub fn jetstream(&self) -> Option<&async_nats::jetstream::Context> {
        match &self.origin {
            Origin::Runtime(rt) => Some(&rt.js),
            Origin::Detached(d) => d.jetstream.as_deref(),
        }
    }

    /// The trace this delivery belongs to (continued from its `traceparent` header, or
    /// new); `None` outside the runtime.
    pub fn trace(&self) -> Option<crate::trace::TraceContext> {
        crate::trace::TraceContext::current()
    }

    /// Cancelled when the worker starts shutting down: a long handler can stop early
    /// and return an error (its message is then redelivered).
    pub fn shutdown(&self) -> &CancellationToken {
        match &self.origin {
            Origin::Runtime(rt) => &rt.stop,
            Origin::Detached(d) => &d.shutdown,
        }
    }
}

/// How a handler failed: transient (retry on schedule), retry after a given delay, or
/// permanent (dead-letter now). Any error converts into a transient one, so `?` retries.
///
/// It deliberately does not implement `std::error::Error`, so that every error type can
/// convert into it.
pub struct HandlerError {
    kind: HandlerErrorKind,
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// The kinds of handler failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerErrorKind {
    /// Retry on the consumer's schedule.
    Transient,
    /// Retry after this delay.
    RetryAfter(Duration),
    /// Dead-letter now.
    Permanent,
}

impl HandlerError {
    /// A failure worth retrying on the consumer's schedule.
    pub fn transient(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError {
            kind: HandlerErrorKind::Transient,
            source: error.into(),
        }
    }

    /// A failure worth retrying after `delay` (e.g. a rate limit's Retry-After).
    pub fn retry_after(
        delay: Duration,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        HandlerError {
            kind: HandlerErrorKind::RetryAfter(delay),
            source: error.into(),
        }
    }

    /// A failure retrying cannot fix: the message goes to the dead-letter stream now.
    pub fn permanent(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError {
            kind: HandlerErrorKind::Permanent,
            source: error.into(),
        }
    }

    /// The kind, to match on.
    pub fn kind(&self) -> HandlerErrorKind {
        self.kind
    }

    /// The error text with its chain of causes.
    pub fn message(&self) -> String {
        let mut text = self.source.to_string();
        let mut cause = self.source.source();
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        text
    }
}

impl<E: Into<Box<dyn std::error::Error + Send + Sync>>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError::transient(error)
    }
}

impl std::fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("message", &self.message())
            .finish()
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

/// Marks a `Result`'s error as permanent or as "retry after", for use with `?`:
/// `charge(card).await.permanent()?`.
pub trait ResultExt<T> {
    /// On error: dead-letter now.
    fn permanent(self) -> Result<T, HandlerError>;
    /// On error: retry after `delay`.
    fn retry_after(self, delay: Duration) -> Result<T, HandlerError>;
}

impl<T, E: Into<Box<dyn std::error::Error + Send + Sync>>> ResultExt<T> for Result<T, E> {
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
    fn retry_after(self, delay: Duration) -> Result<T, HandlerError> {
        self.map_err(|e| HandlerError::retry_after(delay, e))
    }
}

/// What a handler's future returns: `Result<(), E>` with `E: Into<HandlerError>`.
pub trait HandlerOutput {
    /// Into the framework's form.
    fn into_result(self) -> Result<(), HandlerError>;
}

impl<E: Into<HandlerError>> HandlerOutput for Result<(), E> {
    fn into_result(self) -> Result<(), HandlerError> {
        self.map_err(Into::into)
    }
}

/// A boxed handler future.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

/// An async function usable as a handler for payload type `T` with state `S`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a jetworker handler",
    label = "not `async fn(Event<T>, Context<S>) -> Result<(), E>`",
    note = "a handler is `async fn name(event: Event<T>, ctx: Context<S>) -> Result<(), HandlerError>` where T: serde::de::DeserializeOwned + Send and S is the App's state type (`()` by default)",
    note = "the error type may be anything that converts into HandlerError (any std error, String, &str, anyhow::Error)"
)]
pub trait Handler<T, S>: Clone + Send + Sync + 'static {
    /// Runs the handler.
    fn call(&self, event: Event<T>, ctx: Context<S>) -> HandlerFuture;
}

impl<F, Fut, T, S> Handler<T, S> for F
where
    F: Fn(Event<T>, Context<S>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: HandlerOutput,
    T: Send + 'static,
    S: Send + Sync + 'static,
{
    fn call(&self, event: Event<T>, ctx: Context<S>) -> HandlerFuture {
        let fut = (self)(event, ctx);
        Box::pin(async move { fut.await.into_result() })
    }
}

/// A handler with its payload type erased: decodes, then calls.
pub(crate) trait ErasedHandler<S>: Send + Sync {
    /// Decodes `payload` with `codec` and returns the handler's future, or the decode error.
    fn prepare(
        &self,
        payload: &[u8],
        codec: CodecKind,
        ctx: Context<S>,
    ) -> Result<HandlerFuture, DecodeError>;
}

pub(crate) struct TypedHandler<H, T> {
    handler: H,
    _payload: PhantomData<fn() -> T>,
}

impl<H, T> TypedHandler<H, T> {
    pub(crate) fn new(handler: H) -> Self {
        TypedHandler {
            handler,
            _payload: PhantomData,
        }
    }
}

impl<H, T, S> ErasedHandler<S> for TypedHandler<H, T>
where
    H: Handler<T, S>,
    T: DeserializeOwned + Send + 'static,
    S: Send + Sync + 'static,
{
    fn prepare(
        &self,
        payload: &[u8],
        codec: CodecKind,
        ctx: Context<S>,
    ) -> Result<HandlerFuture, DecodeError> {
        let value: T = codec::decode(codec, payload)?;
        Ok(self.handler.call(Event::new(value), ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Boom;
    impl std::fmt::Display for Boom {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("boom")
        }
    }
    impl std::error::Error for Boom {}

    fn fails() -> Result<(), Boom> {
        Err(Boom)
    }

    fn question_mark() -> Result<(), HandlerError> {
        fails()?;
        Ok(())
    }

    #[test]
    fn question_mark_is_transient() {
        let e = question_mark().expect_err("fails");
        assert_eq!(e.kind(), HandlerErrorKind::Transient);
        assert_eq!(e.message(), "boom");
    }

    #[test]
    fn marks() {
        let e = fails().permanent().expect_err("fails");
        assert_eq!(e.kind(), HandlerErrorKind::Permanent);
        let e = fails()
            .retry_after(Duration::from_secs(3))
            .expect_err("fails");
        assert_eq!(
            e.kind(),
            HandlerErrorKind::RetryAfter(Duration::from_secs(3))
        );
        let e: HandlerError = "plain text".into();
        assert_eq!(e.message(), "plain text");
    }
}
