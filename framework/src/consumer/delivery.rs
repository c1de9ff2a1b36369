//! The path of one delivery, ending settled: size check -> decode -> handler (timeout,
//! panic caught, progress acks while it runs) -> [`decide`] -> ack | nak(delay) | dead
//! letter (publish, await PubAck, then term).
//!
//! A [`Delivery`] is read once from the message the pull brought and carried along that
//! path. [`prepare`] and [`attempted_from`] are shared with the test harness, so that a
//! handler unit-tested there meets the same checks as in production.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::Subject;
use bytes::Bytes;
use futures::FutureExt;
use tokio::time::Instant;
use tracing::Instrument;

use super::lanes::LaneTicket;
use super::replies::{self, QueuedReply};
use super::runtime::ConsumerRuntime;
use crate::backoff::Backoff;
use crate::config::ConsumerConfig;
use crate::dead_letter::{self, DeadLetter};
use crate::handler::{Context, ErasedHandler, HandlerErrorKind, HandlerFuture};
use crate::outcome::{decide, Attempted, Outcome, Reason};
use crate::safety_net;
use crate::trace::{self, DeliveryTrace};

/// The first wait before retrying a dead-letter publish held on a message's last
/// delivery (see [`dead_letter_then_term`]); the waits grow from it, jittered.
const DEAD_LETTER_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest of those waits. Both are bounded by the progress-ack interval too: the
/// held message gets a progress ack before each publish.
const DEAD_LETTER_RETRY_MAX: Duration = Duration::from_secs(30);
/// The shortest and longest a last delivery is held (with progress acks) while its
/// copy cannot be stored; within these, one ack wait (see [`dead_letter_hold_limit`]).
const DEAD_LETTER_HOLD_MIN: Duration = Duration::from_secs(5);
/// See [`DEAD_LETTER_HOLD_MIN`].
const DEAD_LETTER_HOLD_MAX: Duration = Duration::from_secs(60);

/// How long a last delivery whose dead-letter copy cannot be stored keeps its handler
/// slot before it is handed to the safety net: one ack wait, within 5 s to 60 s (and no
/// hold at all while half the consumer's slots already hold one). A copy
/// that fails that long is unlikely to succeed on the next try (a stream that changed
/// behind our back, a max_msg_size, a stream gone), and the safety net keeps retrying
/// it without holding any of the consumer's slots.
pub(super) fn dead_letter_hold_limit(config: &ConsumerConfig) -> Duration {
    config
        .ack_wait
        .clamp(DEAD_LETTER_HOLD_MIN, DEAD_LETTER_HOLD_MAX)
}

/// Counts an original held on its last delivery while its copy is retried
/// ([`ConsumerStats::dead_letters_held`](super::ConsumerStats::dead_letters_held)), for
/// as long as it lives.
struct Held<'s>(&'s super::ConsumerStats);

impl<'s> Held<'s> {
    fn new(stats: &'s super::ConsumerStats) -> Self {
        stats.dead_letters_held.fetch_add(1, Ordering::Relaxed);
        Held(stats)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.dead_letters_held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One message from the pull with what its reply subject says about it, read once when
/// it arrives (see [`receive`]) and carried to its settlement.
///
/// Its stream and consumer are the runtime's (`rt.spec.stream`, `rt.spec.name`): not
/// held here, so that a delivery borrows nothing and is made before its task's future
/// (which then holds one copy of the message, not the message and the delivery).
pub(super) struct Delivery {
    /// The message as the pull brought it, but for its reply subject (moved to `reply`).
    pub(super) message: async_nats::Message,
    /// Its `$JS.ACK` reply subject: where its ack, nak or term goes (see [`send`]).
    pub(super) reply: Subject,
    /// Its sequence in the consumer's stream.
    pub(super) sequence: u64,
    /// The server's delivery count (1 on the first delivery), never a local counter:
    /// redeliveries can land on another replica.
    pub(super) attempt: u64,
}

/// Whether the server delivers a settled message again: what an ordered consumer's key
/// lane waits for before the key's next message runs (see `lanes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settled {
    /// Acked, or dead-lettered and termed: the server does not deliver it again.
    Gone,
    /// Nak'ed (a retry, a hand-back) or its ack not sent: the server delivers it again
    /// `after` this (the nak's delay, or the ack wait).
    Returns {
        /// When the server delivers it again, at the earliest.
        after: Duration,
    },
}

/// How a handler run ended.
enum Ran {
    Finished(Attempted),
    /// The grace period ran out: hand the message back.
    Abandoned,
}

/// A handler slot (one of `concurrency`) held by a delivery. Dropped with the delivery,
/// or given back as soon as its handler is done when settling takes long (a dead letter:
/// copy, PubAck, proof, term), so that a burst of failures does not keep handlers from
/// running. Dead letters settling so are bounded by the consumer's max_ack_pending and
/// by [`SETTLING_BYTES`], each counted at its message's size plus
/// [`SETTLING_LETTER_COST`]: past that, a dead letter keeps its slot.
pub(super) struct Slot {
    permit: tokio::sync::OwnedSemaphorePermit,
    /// Wakes the pull loop to start what waits for a slot.
    freed: Arc<tokio::sync::Notify>,
}

impl Slot {
    /// The slot held by `permit`; `freed` is told when it is given back early.
    pub(super) fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        freed: Arc<tokio::sync::Notify>,
    ) -> Slot {
        Slot { permit, freed }
    }

    /// Frees the slot now and tells the pull loop.
    fn give_back(self) {
        drop(self.permit);
        self.freed.notify_one();
    }
}

/// At most this many bytes (payload and headers) of dead letters settle after giving
/// back their handler slot, per consumer (as much as the prefetch may hold).
const SETTLING_BYTES: usize = super::prefetch::PREFETCH_BYTES;

/// What a dead letter settling without its slot is counted at besides its message: its
/// own state (the copy's headers, the publish, the proof it waits for). So small letters
/// settle at most about a thousand at a time per consumer, whatever `max_ack_pending`
/// allows: a burst with 5000 settling at once took 105 MiB and was no faster than one
/// with 1000 (36 MiB).
const SETTLING_LETTER_COST: usize = 8 * 1024;

/// The bytes of one dead letter settling without its slot, counted in
/// `ConsumerStats::settling_bytes` while it lives.
struct Settling<'s> {
    bytes: &'s AtomicUsize,
    size: usize,
}

impl<'s> Settling<'s> {
    /// Counts `size` more bytes when they fit within [`SETTLING_BYTES`].
    fn try_count(bytes: &'s AtomicUsize, size: usize) -> Option<Settling<'s>> {
        let before = bytes.fetch_add(size, Ordering::Relaxed);
        if before + size > SETTLING_BYTES && before > 0 {
            bytes.fetch_sub(size, Ordering::Relaxed);
            return None;
        }
        Some(Settling { bytes, size })
    }
}

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        self.bytes.fetch_sub(self.size, Ordering::Relaxed);
    }
}

/// The path of one delivery, ending settled (or handed back when the grace period ends),
/// then told to its key lane (`ticket`, an ordered consumer's) and uncounted from
/// `in_flight`. `slot` is the handler slot it runs in (freed early for a dead letter,
/// see [`Slot`]).
///
/// This is the whole future of a delivery's task (boxed once per message in
/// `pull::start`): its arguments are its only copy of the delivery, borrowed by
/// everything below, so what every message allocates stays small.
#[allow(clippy::manual_async_fn)] // on purpose: see the comment in the body
pub(super) fn deliver<S: Send + Sync + 'static>(
    rt: Arc<ConsumerRuntime<S>>,
    delivery: Delivery,
    slot: Slot,
    ticket: Option<LaneTicket>,
) -> impl Future<Output = ()> + Send {
    // An `async` block, not an `async fn`: that would keep a second copy of its
    // arguments (the delivery's 232 bytes among them) in the state machine.
    async move {
        // One span per message; a `traceparent` header continues the sender's trace.
        let span = tracing::info_span!(
            "message",
            stream = %rt.spec.stream,
            consumer = %rt.spec.name,
            seq = delivery.sequence,
            attempt = delivery.attempt,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let trace = trace::continue_delivery(delivery.message.headers.as_ref(), &span);
        let settled = settle_delivery(&rt, &delivery, trace, slot)
            .instrument(span)
            .await;
        if let Some(ticket) = ticket {
            ticket.finished(settled);
        }
        rt.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The delivery of `message`, or `None` (logged) when it carries no JetStream metadata:
/// without an ack subject nothing can settle it.
pub(super) fn receive<S>(
    rt: &ConsumerRuntime<S>,
    mut message: async_nats::Message,
) -> Option<Delivery> {
    // Moved out, not cloned: the clone of a subject the client parsed into its own
    // buffer allocates (a shared count), once per message. Nothing reads the message's
    // own `reply` after this: `Delivery::reply` is the one.
    let parsed = message
        .reply
        .take()
        .and_then(|reply| AckSubject::parse(reply.as_str()).map(|a| (reply, a)));
    let Some((reply, ack)) = parsed else {
        tracing::error!(consumer = %rt.spec.name, subject = %message.subject, "delivery without JetStream metadata ignored");
        return None;
    };
    let attempt = ack.delivered.max(1);
    if attempt > 1 {
        rt.stats.redelivered.fetch_add(1, Ordering::Relaxed);
    }
    Some(Delivery {
        message,
        reply,
        sequence: ack.stream_sequence,
        attempt,
    })
}

/// True when `message` is its last allowed delivery (the server's count has reached
/// `max_deliver`): a hand-back would use it up, and the server would deliver it no more.
pub(super) fn is_last_delivery<S>(rt: &ConsumerRuntime<S>, message: &async_nats::Message) -> bool {
    message
        .reply
        .as_ref()
        .and_then(|reply| AckSubject::parse(reply.as_str()))
        .is_some_and(|ack| ack.delivered.max(1) >= rt.policy.max_deliver)
}

/// What a delivery's `$JS.ACK` reply subject says about it, read without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AckSubject {
    /// The server's delivery count.
    pub(super) delivered: u64,
    /// The message's sequence in its stream.
    pub(super) stream_sequence: u64,
}

impl AckSubject {
    /// Reads both forms of ADR-15: `$JS.ACK.<stream>.<consumer>.<delivered>.<stream
    /// seq>.<consumer seq>.<timestamp>.<pending>`, and the form with a domain and an
    /// account hash before the stream (9 tokens or more after `$JS.ACK.`), as
    /// async-nats' `Message::info` does.
    ///
    /// Runs for every delivery: bytes split on `.` and digits read by hand (a `str`
    /// split on a `char` and `u64::from_str` cost more than the rest of the path to the
    /// handler together, the profile showed).
    pub(super) fn parse(reply: &str) -> Option<AckSubject> {
        let rest = reply.strip_prefix("$JS.ACK.")?.as_bytes();
        let mut tokens: [&[u8]; 9] = [&[]; 9];
        let mut count = 0;
        for token in rest.split(|b| *b == b'.') {
            if let Some(slot) = tokens.get_mut(count) {
                *slot = token;
            }
            count += 1;
        }
        let first = match count {
            9.. => 2,
            7 | 8 => 0,
            _ => return None,
        };
        Some(AckSubject {
            delivered: decimal(tokens[first + 2])?,
            stream_sequence: decimal(tokens[first + 3])?,
        })
    }
}

/// A non-empty run of ASCII digits as a `u64`; `None` for anything else or an overflow.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Sends an ack, nak, progress or term for a delivery: a plain publish to its reply
/// subject on the consumer's connection (what `jetstream::Message::ack_with` does,
/// without a JetStream context cloned per message).
pub(super) fn send<'r, S>(
    rt: &'r ConsumerRuntime<S>,
    reply: &'r Subject,
    kind: AckKind,
) -> impl Future<Output = Result<(), async_nats::PublishError>> + Send + 'r {
    publish(&rt.client, reply, kind.into())
}

/// The client's publish future, boxed.
type BoxedPublish<'a> =
    Pin<Box<dyn Future<Output = Result<(), async_nats::PublishError>> + Send + 'a>>;

/// A core publish of `payload` to `subject` whose state is not part of the caller's
/// future while it need not wait. The client's publish future (about 600 bytes: the
/// command, and the send into the connection's channel holding it again) is made and
/// polled on the stack, where the channel has room nearly always, and made again, boxed,
/// only when the channel is full. Every delivery's future holds a reply's send: with
/// the client's whole future in it, each delivery's allocation was past the 1 KiB from
/// which glibc's allocator takes its slow path.
///
/// Dropping the first future while it waits sends nothing (its command has not reached
/// the channel) and takes its waker out of the channel's queue; the boxed one sends it.
pub(super) fn publish<'a>(
    client: &'a async_nats::Client,
    subject: &'a Subject,
    payload: Bytes,
) -> impl Future<Output = Result<(), async_nats::PublishError>> + Send + 'a {
    let mut payload = Some(payload);
    let mut waiting: Option<BoxedPublish<'a>> = None;
    std::future::poll_fn(move |cx| {
        if let Some(waiting) = waiting.as_mut() {
            return waiting.as_mut().poll(cx);
        }
        // Polled once at most: `waiting` is set below when this one is not ready.
        let Some(payload) = payload.take() else {
            return Poll::Ready(Ok(()));
        };
        let at_once = std::pin::pin!(client.publish(subject.clone(), payload.clone()));
        if let Poll::Ready(sent) = at_once.poll(cx) {
            return Poll::Ready(sent);
        }
        let mut boxed: BoxedPublish<'a> = Box::pin(client.publish(subject.clone(), payload));
        let polled = boxed.as_mut().poll(cx);
        waiting = Some(boxed);
        polled
    })
}

/// [`send`], and when it fails: counted in `settle_failures` and logged with what it
/// means for the message. True when sent.
pub(super) fn send_or_note<'r, S>(
    rt: &'r ConsumerRuntime<S>,
    reply: &'r Subject,
    kind: AckKind,
    seq: Option<u64>,
) -> impl Future<Output = bool> + 'r {
    // Not an `async fn`: that would hold its arguments twice in every caller's future.
    send(rt, reply, kind).map(move |sent| match sent {
        Ok(()) => true,
        Err(e) => {
            note_not_sent(rt, kind, seq, &e);
            false
        }
    })
}

/// Counts and logs a reply that was not sent (its client is closed).
fn note_not_sent<S>(
    rt: &ConsumerRuntime<S>,
    kind: AckKind,
    seq: Option<u64>,
    error: &async_nats::PublishError,
) {
    let what = match kind {
        AckKind::Ack => "ack",
        AckKind::Nak(_) => "nak",
        AckKind::Progress => "progress ack",
        AckKind::Term => "term",
        _ => "reply",
    };
    rt.stats.settle_failures.fetch_add(1, Ordering::Relaxed);
    let (stream, consumer) = (&rt.spec.stream, &rt.spec.name);
    match seq {
        Some(seq) => tracing::warn!(
            stream, consumer, seq, error = %error,
            "{what} not sent; the server redelivers the message after its ack wait"
        ),
        None => tracing::warn!(
            stream, consumer, error = %error,
            "{what} not sent; the server redelivers the message after its ack wait"
        ),
    }
}

async fn settle_delivery<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    delivery: &Delivery,
    trace: DeliveryTrace,
    slot: Slot,
) -> Settled {
    let started = std::time::Instant::now();
    let ran = trace.scope(run_handler(rt, delivery, started)).await;
    let took = started.elapsed();
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    rt.stats.handler_micros.fetch_add(micros, Ordering::Relaxed);
    rt.stats.handler_seconds.observe(took.as_secs_f64());
    let attempted = match ran {
        Ran::Finished(a) => a,
        Ran::Abandoned => {
            tracing::warn!(
                stream = %rt.spec.stream, consumer = %rt.spec.name,
                seq = delivery.sequence, attempt = delivery.attempt,
                "shutdown grace over: handing the message back"
            );
            // Boxed: once per delivery at most, at shutdown.
            Box::pin(send_or_note(
                rt,
                &delivery.reply,
                AckKind::Nak(None),
                Some(delivery.sequence),
            ))
            .await;
            return Settled::Returns {
                after: Duration::ZERO,
            };
        }
    };
    match &attempted {
        Attempted::Panicked(_) => rt.stats.panics.fetch_add(1, Ordering::Relaxed),
        Attempted::TimedOut(_) => rt.stats.timeouts.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
    let outcome = decide(&attempted, delivery.attempt, &rt.policy);
    tracing::Span::current().record("outcome", outcome.word());
    // A dead letter settles without its slot while the bytes doing so are bounded.
    let settling = match outcome {
        Outcome::DeadLetter { .. } => {
            let message = &delivery.message;
            let size = SETTLING_LETTER_COST
                + message.payload.len()
                + message.headers.as_ref().map_or(0, dead_letter::wire_len);
            Settling::try_count(&rt.stats.settling_bytes, size)
        }
        _ => None,
    };
    let _slot = match &settling {
        Some(_) => {
            slot.give_back();
            None
        }
        None => Some(slot),
    };
    settle(rt, delivery, &attempted, outcome, Gather::Tasks).await
}

/// How often a message whose handler (or dead-letter publish) is still at work gets a
/// progress ack: twice per ack wait, so the server never redelivers it meanwhile.
pub(super) fn progress_interval(config: &ConsumerConfig) -> Duration {
    (config.ack_wait / 2).max(Duration::from_millis(500))
}

/// Runs the handler from `started` (when the delivery began: the handler timeout counts
/// from there).
async fn run_handler<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    delivery: &Delivery,
    started: std::time::Instant,
) -> Ran {
    let message = &delivery.message;
    let ctx = Context::for_delivery(
        rt,
        message.subject.clone(),
        message.headers.clone().unwrap_or_default(),
        delivery.sequence,
        delivery.attempt,
    );
    let guarded = match prepare(rt.handler.as_ref(), &message.payload, &rt.config, ctx) {
        Ok(f) => f,
        Err(attempted) => return Ran::Finished(attempted),
    };
    match supervise(rt, guarded, std::slice::from_ref(&delivery), started).await {
        Supervised::Finished(result) => Ran::Finished(attempted_from(result)),
        Supervised::TimedOut => Ran::Finished(Attempted::TimedOut(rt.config.handler_timeout)),
        Supervised::Abandoned => Ran::Abandoned,
    }
}

/// How a [`supervise`]d handler future ended.
pub(super) enum Supervised<T> {
    /// It returned (or panicked, caught) with this.
    Finished(T),
    /// The consumer's `handler_timeout` passed first (it is dropped).
    TimedOut,
    /// The grace period ended first (it is dropped).
    Abandoned,
}

/// Runs a handler's future (one message's, or a batch's) from `started`, when the work
/// began: the handler timeout counts from there, and every delivery in `keep` gets a
/// progress ack twice per ack wait while it runs.
pub(super) async fn supervise<S, F: Future>(
    rt: &ConsumerRuntime<S>,
    future: F,
    keep: &[&Delivery],
    started: std::time::Instant,
) -> Supervised<F::Output> {
    tokio::pin!(future);
    // A handler done at its first poll needs no clock, timer or stop signal: most
    // deliveries of a fast consumer end here.
    let first = std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Ready(result) => Poll::Ready(Some(result)),
        Poll::Pending => Poll::Ready(None),
    })
    .await;
    if let Some(result) = first {
        return Supervised::Finished(result);
    }
    // Boxed: the timer and the stop signal are for handlers that wait, and their state
    // would otherwise be part of every delivery's future, fast ones' too.
    Box::pin(supervise_waiting(rt, future, keep, started)).await
}

/// [`supervise`] from the handler's second poll on.
async fn supervise_waiting<S, F: Future>(
    rt: &ConsumerRuntime<S>,
    mut future: Pin<&mut F>,
    keep: &[&Delivery],
    started: std::time::Instant,
) -> Supervised<F::Output> {
    // Polled inline by the pull loop, the delivery is spawned and polled again at once:
    // the timer and the stop signal are armed then, with the task's waker.
    defer_if_polled_inline().await;
    // One timer serves both deadlines: the handler timeout, and the next progress ack
    // that keeps the messages while the handler works past half the ack wait.
    let started = Instant::from_std(started);
    let timeout_at = started + rt.config.handler_timeout;
    let every = progress_interval(&rt.config);
    let mut progress_at = started + every;
    let timer = tokio::time::sleep_until(progress_at.min(timeout_at));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            // The handler first: one that is already done never arms the timer.
            biased;
            result = &mut future => return Supervised::Finished(result),
            _ = &mut timer => {
                let now = Instant::now();
                if now >= timeout_at {
                    return Supervised::TimedOut;
                }
                if now >= progress_at {
                    // Boxed: rare (a handler past half its ack wait), and the sends'
                    // state would otherwise be held all the while the handler waits.
                    Box::pin(send_progress(rt, keep)).await;
                    progress_at = now + every;
                }
                timer.as_mut().reset(progress_at.min(timeout_at));
            }
            _ = rt.hard_stop.cancelled() => return Supervised::Abandoned,
        }
    }
}

/// Sends a progress ack for each of `keep`: their handler is still at work.
async fn send_progress<S>(rt: &ConsumerRuntime<S>, keep: &[&Delivery]) {
    for delivery in keep {
        send_or_note(
            rt,
            &delivery.reply,
            AckKind::Progress,
            Some(delivery.sequence),
        )
        .await;
    }
}

/// Pending once when polled with the no-op waker of the pull loop's inline first poll
/// (`pull::start`, which then spawns the delivery and polls it again at once), ready at
/// once under any other waker. So a handler still waiting after its first poll has its
/// timer and stop signal registered once, under the task's waker, instead of twice (and
/// is not polled again for nothing). Under a real waker it never returns `Pending`:
/// nothing would wake it.
fn defer_if_polled_inline() -> impl Future<Output = ()> {
    let mut first = true;
    std::future::poll_fn(move |cx| {
        if std::mem::take(&mut first) && is_inline_poll(cx) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
}

/// A handler's future with panics caught.
pub(crate) type GuardedFuture = futures::future::CatchUnwind<AssertUnwindSafe<HandlerFuture>>;

/// Size check and decode, the same for the runtime and the test harness: the handler's
/// future (panics caught), or why it cannot run.
pub(crate) fn prepare<S>(
    handler: &dyn ErasedHandler<S>,
    payload: &[u8],
    config: &ConsumerConfig,
    ctx: Context<S>,
) -> Result<GuardedFuture, Attempted> {
    check_size(payload, &ctx.headers, config)?;
    // Decoding runs the payload type's `Deserialize`, and a handler that is not an
    // `async fn` runs code before its future exists: a panic there is caught too, or it
    // would unwind through the pull loop that polls deliveries inline.
    let prepared = std::panic::catch_unwind(AssertUnwindSafe(|| {
        handler.prepare(payload, config.codec, ctx)
    }));
    match prepared {
        Ok(Ok(future)) => Ok(AssertUnwindSafe(future).catch_unwind()),
        Ok(Err(e)) => Err(Attempted::Undecodable(e.to_string())),
        Err(panic) => Err(Attempted::Panicked(panic_message(&panic))),
    }
}

/// The size check: a message larger than the consumer's `max_payload_bytes` (payload
/// plus headers) never reaches a handler.
pub(crate) fn check_size(
    payload: &[u8],
    headers: &async_nats::HeaderMap,
    config: &ConsumerConfig,
) -> Result<(), Attempted> {
    let limit = usize::try_from(config.max_payload_bytes).unwrap_or(usize::MAX);
    // Headers count: they come from the sender too, and the handler gets them.
    let size = if headers.is_empty() {
        payload.len()
    } else {
        payload.len() + dead_letter::wire_len(headers)
    };
    if size > limit {
        return Err(Attempted::TooLarge { size, limit });
    }
    Ok(())
}

/// What a finished (or panicked) handler run means for the decision.
pub(crate) fn attempted_from(
    result: Result<Result<(), crate::handler::HandlerError>, Box<dyn std::any::Any + Send>>,
) -> Attempted {
    match result {
        Ok(Ok(())) => Attempted::Succeeded,
        Ok(Err(e)) => attempted_from_error(&e),
        Err(panic) => Attempted::Panicked(panic_message(&panic)),
    }
}

/// What a handler's error means for the decision.
pub(crate) fn attempted_from_error(e: &crate::handler::HandlerError) -> Attempted {
    match e.kind() {
        HandlerErrorKind::Transient => Attempted::Transient(e.message()),
        HandlerErrorKind::RetryAfter(d) => Attempted::RetryAfter(d, e.message()),
        HandlerErrorKind::Permanent => Attempted::Permanent(e.message()),
    }
}

/// A panic's message, for logs and the dead-letter error text.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Whether a delivery's ack or nak may wait for those of other tasks (see `replies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gather {
    /// A delivery in a task of its own: gathered, unless it is settled in the pull
    /// loop's first poll.
    Tasks,
    /// Sent at once: the caller settles many deliveries in a row (a batch).
    No,
}

/// True when `cx` is the pull loop's inline first poll (its no-op waker, see
/// `pull::start`).
fn is_inline_poll(cx: &std::task::Context<'_>) -> bool {
    cx.waker().will_wake(futures::task::noop_waker_ref())
}

/// [`is_inline_poll`] for the poll that awaits it; never waits.
fn polled_inline() -> impl Future<Output = bool> {
    std::future::poll_fn(|cx| Poll::Ready(is_inline_poll(cx)))
}

/// Settles a delivery as `outcome` says (ack, nak with delay, or dead letter then term),
/// counted and logged; callable for each message of a batch. `gather` says whether its
/// ack or nak may be sent together with those of other tasks.
pub(super) async fn settle<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    delivery: &Delivery,
    attempted: &Attempted,
    outcome: Outcome,
    gather: Gather,
) -> Settled {
    let Delivery {
        reply,
        sequence: seq,
        attempt,
        ..
    } = delivery;
    let (stream, consumer) = (&rt.spec.stream, &rt.spec.name);
    // One send for either outcome that is a reply (an ack, or a nak with the retry's
    // delay): each await of it would be a place of its own in every delivery's future.
    let (kind, retry_in) = match outcome {
        Outcome::Ack => (AckKind::Ack, None),
        Outcome::Nak(delay) => (AckKind::Nak(Some(delay)), Some(delay)),
        Outcome::DeadLetter { reason, error } => {
            // Boxed: the rare path's large future would otherwise be part of every
            // delivery's task, copied at each spawn.
            return Box::pin(dead_letter_then_term(rt, delivery, reason, error)).await;
        }
    };
    // Sent at once in the pull loop's first poll and in a batch's task (replies that
    // already follow one another in one task); gathered with those of other tasks
    // otherwise (see `replies`), and then counted when sent.
    let sent = if gather == Gather::Tasks && !polled_inline().await {
        let queued = QueuedReply {
            reply: reply.clone(),
            kind,
            sequence: *seq,
            attempt: *attempt,
        };
        replies::queue_or_send(rt, queued).await;
        None
    } else {
        Some(send_or_note(rt, reply, kind, Some(*seq)).await)
    };
    match retry_in {
        None => {
            if sent == Some(true) {
                rt.stats.count_ack(*attempt);
            }
            tracing::debug!(stream, consumer = %consumer, seq, attempt, outcome = "ack", "settled");
            // A queued ack counts as sent: only a closed client fails to send it, and
            // then nothing of this consumer runs any more.
            if sent == Some(false) {
                Settled::Returns {
                    after: rt.config.ack_wait,
                }
            } else {
                Settled::Gone
            }
        }
        Some(delay) => {
            rt.stats.retried.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                stream, consumer = %consumer, seq, attempt,
                outcome = "retry", retry_in = %humantime::format_duration(delay),
                error = %attempted_error(attempted), "settled"
            );
            Settled::Returns { after: delay }
        }
    }
}

fn attempted_error(a: &Attempted) -> String {
    match a {
        Attempted::Succeeded => String::new(),
        Attempted::Transient(e)
        | Attempted::RetryAfter(_, e)
        | Attempted::Permanent(e)
        | Attempted::Undecodable(e)
        | Attempted::Panicked(e) => e.clone(),
        Attempted::TooLarge { size, limit } => format!("{size} bytes > {limit}"),
        Attempted::TimedOut(d) => format!("timed out after {}", humantime::format_duration(*d)),
    }
}

/// Publishes the dead-letter copy and terms the original only once the copy is stored.
async fn dead_letter_then_term<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    delivery: &Delivery,
    reason: Reason,
    error: String,
) -> Settled {
    let message = &delivery.message;
    let (stream, consumer, seq, attempt) = (
        rt.spec.stream.as_str(),
        rt.spec.name.as_str(),
        delivery.sequence,
        delivery.attempt,
    );
    let subject = &rt.config.dead_letter_subject;
    let letter = DeadLetter {
        subject: message.subject.as_str().to_owned(),
        headers: message.headers.clone().unwrap_or_default(),
        stream: stream.to_owned(),
        sequence: seq,
        consumer: consumer.to_owned(),
        attempts: attempt,
        reason,
        error,
    };
    let payload: Bytes = message.payload.clone();
    // Held on the last delivery, the message needs a progress ack between two publishes.
    let hold = progress_interval(&rt.config);
    let mut retry = Backoff::new(
        DEAD_LETTER_RETRY_FIRST.min(hold),
        DEAD_LETTER_RETRY_MAX.min(hold),
    );
    let hold_until = Instant::now() + dead_letter_hold_limit(&rt.config);
    let mut held = None;
    loop {
        match dead_letter::publish_kept(
            &rt.js,
            rt.stats.dead_letter_guard.get().map(|g| g.as_ref()),
            subject,
            &letter,
            payload.clone(),
            rt.request_timeout,
        )
        .await
        {
            Ok(_) => {
                term(rt, &delivery.reply, reason).await;
                rt.stats.count_dead_letter(reason);
                rt.stats.observe_attempts(false, attempt);
                rt.stats.dead_letter_stored();
                tracing::warn!(
                    stream, consumer = %consumer, seq, attempt,
                    outcome = "dead_letter", reason = %reason, error = %letter.error,
                    dead_letter_subject = %subject, "settled"
                );
                return Settled::Gone;
            }
            Err(e) => {
                rt.stats.dead_letter_failed(&e);
                if attempt < rt.policy.max_deliver {
                    // Never term a message whose copy is not stored: it comes back later.
                    let delay = rt.policy.delay_after(attempt);
                    send_or_note(
                        rt,
                        &delivery.reply,
                        AckKind::Nak(Some(delay)),
                        Some(delivery.sequence),
                    )
                    .await;
                    rt.stats.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        stream, consumer = %consumer, seq, attempt, reason = %reason, error = %e,
                        retry_in = %humantime::format_duration(delay),
                        "dead-letter copy not stored; the original is kept and retried"
                    );
                    return Settled::Returns { after: delay };
                }
                // The last delivery: the server delivers it no more. Keep it here with
                // progress acks and retry the copy, for a bounded time: then hand it to
                // the safety net with a nak, whose max-deliveries advisory the safety
                // net captures and retries from (the original stays in its stream, and
                // no handler slot of this consumer is held meanwhile).
                // At most half as many originals as there are handler slots are held
                // (a held original keeps its slot when the settling bytes are used up):
                // when copies fail for many messages at once, the rest go to the safety
                // net without a hold, so other messages keep running.
                let hold_slots = (rt.config.concurrency_limit() / 2).max(1);
                let slots_taken = held.is_none()
                    && rt.stats.dead_letters_held.load(Ordering::Relaxed) >= hold_slots;
                held.get_or_insert_with(|| Held::new(&rt.stats));
                if slots_taken || Instant::now() >= hold_until {
                    // The safety net's letter says why, not `abandoned`; the record is
                    // stored before the nak, so the hand-over never rests on the
                    // server's advisory alone (a core message, lost while the advisory
                    // stream has no leader).
                    let error = format!("{}; handed to the safety net: {e}", letter.error);
                    match record_hand_off(rt, delivery, reason, error, rt.request_timeout).await {
                        Ok(hand_off) => {
                            tracing::error!(
                                stream, consumer = %consumer, seq, attempt, reason = %reason, error = %e,
                                held_for = %humantime::format_duration(dead_letter_hold_limit(&rt.config)),
                                "dead-letter copy still not stored; handed the original to the safety net (it stays in its stream)"
                            );
                            if let Some(guard) = rt.stats.dead_letter_guard.get() {
                                guard.note_hand_off(seq, hand_off);
                            }
                            if send_or_note(rt, &delivery.reply, AckKind::Nak(None), Some(seq))
                                .await
                            {
                                rt.stats
                                    .dead_letters_handed_over
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            // Its last delivery: the server sends it no more (the safety
                            // net takes it from here), so its key moves on as after a
                            // dead letter.
                            return Settled::Gone;
                        }
                        Err(why) => tracing::error!(
                            stream, consumer = %consumer, seq, attempt, reason = %reason, error = %e,
                            hand_off = %why,
                            "dead-letter copy not stored and the safety net cannot take the original either; holding it (progress acks) and retrying both"
                        ),
                    }
                }
                let wait = retry.next();
                tracing::error!(
                    stream, consumer = %consumer, seq, attempt, reason = %reason, error = %e,
                    retry_in = %humantime::format_duration(wait),
                    "dead-letter copy not stored on the last delivery; holding the original and retrying"
                );
                send_progress(rt, std::slice::from_ref(&delivery)).await;
                let stopped = tokio::select! {
                    _ = tokio::time::sleep(wait) => false,
                    _ = rt.hard_stop.cancelled() => true,
                };
                if stopped {
                    // Out of grace: the server's advisory for this nak takes it to the
                    // safety net; the record (tried briefly) makes that not rest on it.
                    let error = format!(
                        "{}; handed to the safety net at shutdown: {e}",
                        letter.error
                    );
                    let brief = rt.request_timeout.min(Duration::from_secs(1));
                    if let Err(why) = record_hand_off(rt, delivery, reason, error, brief).await {
                        tracing::warn!(
                            stream, consumer = %consumer, seq, hand_off = %why,
                            "hand-off record not stored at shutdown; the server's advisory alone hands the original to the safety net"
                        );
                    }
                    send_or_note(rt, &delivery.reply, AckKind::Nak(None), Some(seq)).await;
                    return Settled::Returns {
                        after: Duration::ZERO,
                    };
                }
            }
        }
    }
}

/// Stores the hand-off record of `delivery`, its last, given up for `reason` with
/// `error` (see `safety_net::HAND_OFF_TYPE`), within `timeout`: the note the safety
/// net's letter carries, or why the record is not stored.
async fn record_hand_off<S>(
    rt: &ConsumerRuntime<S>,
    delivery: &Delivery,
    reason: Reason,
    error: String,
    timeout: Duration,
) -> Result<dead_letter::HandOff, String> {
    let hand_off = dead_letter::HandOff { reason, error };
    // Boxed: rare, and its future would otherwise make every dead letter's larger.
    Box::pin(safety_net::publish_hand_off(
        &rt.js,
        &rt.spec.stream,
        &rt.spec.name,
        delivery.sequence,
        delivery.attempt,
        &hand_off,
        timeout,
    ))
    .await?;
    Ok(hand_off)
}

/// Terminates the original, with the reason where the server supports it (2.10.4+).
async fn term<S>(rt: &ConsumerRuntime<S>, reply: &Subject, reason: Reason) {
    let sent = if rt.server_version.at_least(2, 10, 4) {
        publish(&rt.client, reply, Bytes::from(format!("+TERM {reason}"))).await
    } else {
        send(rt, reply, AckKind::Term).await
    };
    if let Err(e) = sent {
        tracing::warn!(consumer = %rt.spec.name, error = %e, "term not sent; the message will be redelivered and its copy deduplicated");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, from its signature alone.
    fn size_of_return<A, B, C, D, F>(_: impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every message allocates its delivery's future once (`pull::start`). glibc serves
    /// requests of up to 1000 bytes from its per-thread caches and small bins; from a
    /// chunk of 1 KiB on, every allocation first merges the freed small chunks
    /// (`malloc_consolidate`), which the profiles showed on every message while the
    /// future was 2.8 KB. Whatever grows it past this should be boxed where it is rare.
    #[test]
    fn a_delivery_future_stays_on_the_allocators_fast_path() {
        let size = size_of_return(deliver::<()>);
        assert!(
            size <= 1000,
            "a delivery's future is {size} bytes: box what made it grow"
        );
    }

    #[test]
    fn only_the_inline_poll_is_deferred() {
        let inline = futures::task::noop_waker_ref();
        let mut deferred = Box::pin(defer_if_polled_inline());
        let mut cx = std::task::Context::from_waker(inline);
        assert!(
            deferred.as_mut().poll(&mut cx).is_pending(),
            "inline: deferred"
        );
        assert!(
            deferred.as_mut().poll(&mut cx).is_ready(),
            "the next poll goes on"
        );

        // A task's waker (anything but the no-op one): never pending, nothing would
        // wake it.
        let task = futures::task::waker(Arc::new(TaskWaker));
        let mut cx = std::task::Context::from_waker(&task);
        let mut in_task = Box::pin(defer_if_polled_inline());
        assert!(in_task.as_mut().poll(&mut cx).is_ready());
    }

    struct TaskWaker;

    impl futures::task::ArcWake for TaskWaker {
        fn wake_by_ref(_: &Arc<Self>) {}
    }

    #[test]
    fn ack_subjects_parse_in_both_forms() {
        let table = [
            (
                "$JS.ACK.EVENTS.jobs.3.1042.7.1700000000000000000.12",
                Some((3, 1042)),
            ),
            (
                "$JS.ACK._.ACCHASH.EVENTS.jobs.1.7.7.1700000000000000000.0.TOKEN",
                Some((1, 7)),
            ),
            (
                "$JS.ACK.hub.ACCHASH.EVENTS.jobs.2.9.8.1700000000000000000.0",
                Some((2, 9)),
            ),
            ("$JS.ACK.EVENTS.jobs.x.1.7.1.0", None),
            ("$JS.ACK.EVENTS.jobs..1.7.1.0", None),
            ("$JS.ACK.EVENTS.jobs.+1.1.7.1.0", None),
            ("$JS.ACK.EVENTS.jobs.18446744073709551616.1.7.1.0", None),
            (
                "$JS.ACK.EVENTS.jobs.18446744073709551615.1.7.1.0",
                Some((u64::MAX, 1)),
            ),
            ("$JS.ACK.EVENTS.jobs.1", None),
            ("_INBOX.abc.1", None),
        ];
        for (reply, expected) in table {
            let parsed = AckSubject::parse(reply).map(|a| (a.delivered, a.stream_sequence));
            assert_eq!(parsed, expected, "{reply}");
        }
    }
}
