//! One durable consumer at work: the pull loop and the path of each delivery.
//!
//! # Pull loop
//! jetworker speaks the pull protocol itself (one inbox subscription, `MSG.NEXT`
//! requests) so that it asks for exactly as many messages as it has free handler slots:
//! a message never waits in a client buffer while its ack timer runs. Requests carry an
//! idle heartbeat; when heartbeats stop, the client reconnects, or the server says the
//! consumer is gone, the loop starts a new session (recreating the consumer from the
//! config when it was deleted).
//!
//! # One delivery
//! size check -> decode -> handler (timeout, panic caught, progress acks while it runs)
//! -> [`decide`] -> ack | nak(delay) | dead letter (publish, await PubAck, then term).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, StatusCode};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use std::future::Future;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ConsumerConfig;
use crate::dead_letter::{self, DeadLetter};
use crate::handler::{Context, ErasedHandler, HandlerErrorKind, HandlerFuture};
use crate::outcome::{decide, Attempted, Outcome, Reason, RetrySchedule};
use crate::provision::{self, ConsumerSpec, ServerVersion};
use crate::trace::TraceContext;
use tracing::Instrument;

/// How long one pull request waits on the server for messages. Short, so that a
/// request lost with a connection is replaced soon.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Idle heartbeat asked of the server while a pull request waits.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// Pull requests whose server we have not heard from for this long are presumed lost
/// (three heartbeats missed).
const HEARTBEAT_GRACE: Duration = Duration::from_secs(6);
/// At shutdown, open pull requests are listened to until they are fulfilled or nothing
/// has arrived for this long (see [`wait_out_open_requests`]).
const STOP_QUIET: Duration = Duration::from_millis(300);
/// How often the loop checks deadlines, heartbeats and the connection.
const TICK: Duration = Duration::from_millis(500);
/// Longest wait between attempts to restore a consumer or a dead-letter publish.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A delivery whose first poll (in the pull loop, see [`start`]) takes longer than this
/// counts as slow; [`INLINE_SLOW_STREAK`] slow ones in a row mean a CPU-heavy handler.
const INLINE_POLL_LIMIT: Duration = Duration::from_millis(2);
/// Consecutive slow first polls that turn inline polling off (one alone may be the
/// machine pausing the thread, not the handler).
const INLINE_SLOW_STREAK: u32 = 3;
/// Deliveries spawned without a first poll before inline polling is tried again.
const INLINE_OFF_FOR: u32 = 1000;

/// When [`start`] polls a delivery in the pull loop first: on, until a handler shows it
/// works long before its first await; then off for a while, then probed again.
#[derive(Debug, Default)]
struct InlinePolling {
    slow_streak: u32,
    off_for: u32,
}

impl InlinePolling {
    fn should_poll(&mut self) -> bool {
        if self.off_for > 0 {
            self.off_for -= 1;
            return false;
        }
        true
    }

    fn record(&mut self, first_poll: Duration) -> bool {
        if first_poll <= INLINE_POLL_LIMIT {
            self.slow_streak = 0;
            return false;
        }
        self.slow_streak += 1;
        if self.slow_streak >= INLINE_SLOW_STREAK {
            self.slow_streak = 0;
            self.off_for = INLINE_OFF_FOR;
            return true;
        }
        false
    }
}

/// Counters for one consumer, updated as deliveries settle.
#[derive(Debug)]
pub struct ConsumerStats {
    /// Deliveries received.
    pub received: AtomicU64,
    /// Acked after success.
    pub acked: AtomicU64,
    /// Nak'ed for a retry.
    pub retried: AtomicU64,
    /// Dead-lettered, by [`Reason`] in [`Reason::ALL`] order.
    pub dead_lettered: [AtomicU64; 7],
    /// Handler panics caught.
    pub panics: AtomicU64,
    /// Handler timeouts.
    pub timeouts: AtomicU64,
    /// Dead-letter publishes that failed (the original was kept).
    pub dead_letter_failures: AtomicU64,
    /// Deliveries that never started (shutdown) and were handed back at once.
    pub released: AtomicU64,
    /// Deliveries with attempt > 1.
    pub redelivered: AtomicU64,
    /// Handlers running now.
    pub in_flight: AtomicUsize,
    /// The most handlers ever running at once.
    pub peak_in_flight: AtomicUsize,
    /// Times the consumer was found missing and recreated.
    pub recreated: AtomicU64,
    /// Pull sessions started (1 + recoveries).
    pub sessions: AtomicU64,
    /// Sum of handler run times, in microseconds.
    pub handler_micros: AtomicU64,
    /// Handler run times (for `/metrics`).
    pub handler_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Server-side: messages not yet delivered (polled).
    pub server_pending: AtomicU64,
    /// Server-side: messages delivered and not acknowledged (polled).
    pub server_ack_pending: AtomicU64,
    /// True while a pull session is running.
    pulling: AtomicBool,
    /// When the loop last reported in, as milliseconds since `born`.
    last_tick_ms: AtomicU64,
    born: std::time::Instant,
}

impl Default for ConsumerStats {
    fn default() -> Self {
        ConsumerStats {
            received: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: Default::default(),
            panics: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            dead_letter_failures: AtomicU64::new(0),
            released: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            recreated: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            handler_micros: AtomicU64::new(0),
            handler_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.5, 14),
            ),
            server_pending: AtomicU64::new(0),
            server_ack_pending: AtomicU64::new(0),
            pulling: AtomicBool::new(false),
            last_tick_ms: AtomicU64::new(0),
            born: std::time::Instant::now(),
        }
    }
}

impl ConsumerStats {
    /// The loop reports in (for liveness).
    fn tick(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the loop last reported in.
    pub fn since_last_tick(&self) -> Duration {
        let last = Duration::from_millis(self.last_tick_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }

    /// True while a pull session runs (the consumer exists and is being pulled from).
    pub fn is_pulling(&self) -> bool {
        self.pulling.load(Ordering::Relaxed)
    }

    /// Dead letters recorded for `reason`.
    pub fn dead_letters(&self, reason: Reason) -> u64 {
        let i = Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.dead_lettered[i].load(Ordering::Relaxed)
    }

    fn count_dead_letter(&self, reason: Reason) {
        let i = Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.dead_lettered[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything one consumer's loop and its tasks share.
pub(crate) struct ConsumerRuntime<S> {
    pub config: ConsumerConfig,
    pub spec: ConsumerSpec,
    pub policy: RetrySchedule,
    pub handler: Arc<dyn ErasedHandler<S>>,
    pub state: Arc<S>,
    pub client: Client,
    /// Shared with every handler's [`Context`]: one reference count per delivery.
    pub js: Arc<jetstream::Context>,
    pub server_version: ServerVersion,
    pub request_timeout: Duration,
    pub stats: Arc<ConsumerStats>,
    /// Cancelled at the first shutdown signal: stop pulling; handlers see it in `Context`.
    pub stop: CancellationToken,
    /// Cancelled when the grace period is over: abandon what still runs.
    pub hard_stop: CancellationToken,
}

/// Why a pull session ended.
#[derive(Debug)]
enum SessionEnd {
    Stopped,
    ConsumerDeleted,
    NoResponders,
    HeartbeatsMissed,
    Reconnected,
    SubscriptionClosed,
}

struct OpenRequest {
    id: u64,
    remaining: usize,
    deadline: Instant,
}

/// Pull requests sent and not yet fulfilled or expired.
#[derive(Default)]
struct OpenRequests {
    open: VecDeque<OpenRequest>,
}

impl OpenRequests {
    fn requested(&self) -> usize {
        self.open.iter().map(|r| r.remaining).sum()
    }

    /// A message arrived: the server fills requests in order.
    fn delivered(&mut self) {
        if let Some(front) = self.open.front_mut() {
            front.remaining = front.remaining.saturating_sub(1);
            if front.remaining == 0 {
                self.open.pop_front();
            }
        }
    }

    fn close(&mut self, id: u64) {
        self.open.retain(|r| r.id != id);
    }

    fn expire(&mut self, now: Instant) {
        self.open.retain(|r| r.deadline > now);
    }
}

/// Runs the consumer until `stop`, then waits for its handlers (the caller bounds that
/// with the grace period through `hard_stop`).
pub(crate) async fn run<S: Send + Sync + 'static>(rt: Arc<ConsumerRuntime<S>>) {
    let concurrency = rt.config.concurrency_limit();
    let permits = Arc::new(Semaphore::new(concurrency));
    let done = Arc::new(Notify::new());
    let tasks = TaskTracker::new();
    let mut failures: u32 = 0;

    loop {
        rt.stats.tick();
        if rt.stop.is_cancelled() {
            break;
        }
        if let Err(e) = ensure_consumer(&rt).await {
            failures += 1;
            let wait = backoff(failures);
            tracing::warn!(
                stream = %rt.spec.stream, consumer = %rt.spec.name, error = %e,
                retry_in = %humantime::format_duration(wait), "consumer unavailable"
            );
            tokio::select! {
                _ = rt.stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => continue,
            }
        }
        rt.stats.sessions.fetch_add(1, Ordering::Relaxed);
        rt.stats.pulling.store(true, Ordering::Relaxed);
        let end = session(&rt, &permits, &done, &tasks).await;
        rt.stats.pulling.store(false, Ordering::Relaxed);
        match end {
            Ok(SessionEnd::Stopped) => break,
            Ok(end) => {
                tracing::info!(stream = %rt.spec.stream, consumer = %rt.spec.name, reason = ?end, "restarting pull");
                if matches!(end, SessionEnd::HeartbeatsMissed) {
                    revive_connection(&rt).await;
                }
                failures = match end {
                    SessionEnd::NoResponders | SessionEnd::SubscriptionClosed => failures + 1,
                    _ => 0,
                };
                if failures > 0 {
                    tokio::select! {
                        _ = rt.stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff(failures)) => {}
                    }
                }
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(stream = %rt.spec.stream, consumer = %rt.spec.name, error = %e, "pull session failed");
                tokio::select! {
                    _ = rt.stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff(failures)) => {}
                }
            }
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// After missed heartbeats: replaces a connection that no longer answers.
///
/// Heartbeats stop either because the server lost our pull request (a consumer leader
/// moved: the connection is fine) or because the connection died without the socket
/// noticing (a silent partition, a dropped NAT entry). The client's own pings notice the
/// latter only after three ping intervals (minutes by default), while every ack and pull
/// sent meanwhile is lost. So ask the server something it always answers (this
/// consumer's info, which every worker may request) and reconnect when nothing comes
/// back in time; any answer, even an error, means the connection works. A reconnect
/// while the probe was out (another consumer's probe, or the client's own) already
/// replaced the connection the probe was sent on.
async fn revive_connection<S>(rt: &ConsumerRuntime<S>) {
    let connects = || rt.client.statistics().connects.load(Ordering::Relaxed);
    let connects_before = connects();
    let subject = format!("$JS.API.CONSUMER.INFO.{}.{}", rt.spec.stream, rt.spec.name);
    let probe = rt.client.request(subject, Bytes::new());
    let answered = match tokio::time::timeout(rt.request_timeout, probe).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() != async_nats::RequestErrorKind::TimedOut,
        Err(_) => false,
    };
    if !answered
        && connects() == connects_before
        && rt.client.connection_state() == async_nats::connection::State::Connected
    {
        tracing::warn!(
            stream = %rt.spec.stream, consumer = %rt.spec.name,
            waited = %humantime::format_duration(rt.request_timeout),
            "the connection does not answer; reconnecting"
        );
        if let Err(e) = rt.client.force_reconnect().await {
            tracing::warn!(error = %e, "reconnect not requested");
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.min(5).saturating_sub(1);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

/// Makes sure the durable consumer exists; recreates it from the config when it was
/// deleted behind our back.
async fn ensure_consumer<S>(rt: &ConsumerRuntime<S>) -> Result<(), String> {
    let stream = provision::get_stream(&rt.js, &rt.spec.stream)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("stream {:?} does not exist", rt.spec.stream))?;
    let exists = provision::consumer_info(&stream, &rt.spec.name)
        .await
        .map_err(|e| e.to_string())?
        .is_some();
    if !exists {
        tracing::warn!(stream = %rt.spec.stream, consumer = %rt.spec.name, "consumer is missing; recreating it from the config");
        provision::recreate_consumer(&rt.js, &rt.spec)
            .await
            .map_err(|e| format!("recreating the consumer failed: {e}"))?;
        rt.stats.recreated.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// One pull session: a fresh inbox, requests sized to free capacity, until something
/// needs a restart or the worker stops.
async fn session<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    permits: &Arc<Semaphore>,
    done: &Arc<Notify>,
    tasks: &TaskTracker,
) -> Result<SessionEnd, String> {
    let inbox = rt.client.new_inbox();
    let mut sub = rt
        .client
        .subscribe(format!("{inbox}.*"))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let next_subject = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        rt.spec.stream, rt.spec.name
    );
    let concurrency = rt.config.concurrency_limit();
    let threshold = (concurrency / 4).max(1);
    let mut requests = OpenRequests::default();
    let mut next_id: u64 = 0;
    let mut last_heard = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_connected = true;
    let mut inline = InlinePolling::default();

    let end = loop {
        // Ask for as many messages as there are free handler slots not yet asked for.
        let connected = rt.client.connection_state() == async_nats::connection::State::Connected;
        let free = permits
            .available_permits()
            .saturating_sub(requests.requested());
        if connected && free > 0 && (free >= threshold || requests.open.is_empty()) {
            next_id += 1;
            let body = format!(
                "{{\"batch\":{free},\"expires\":{},\"idle_heartbeat\":{}}}",
                PULL_EXPIRES.as_nanos(),
                PULL_HEARTBEAT.as_nanos()
            );
            match rt
                .client
                .publish_with_reply(
                    next_subject.clone(),
                    format!("{inbox}.{next_id}"),
                    body.into(),
                )
                .await
            {
                Ok(()) => {
                    if requests.open.is_empty() {
                        last_heard = Instant::now();
                    }
                    requests.open.push_back(OpenRequest {
                        id: next_id,
                        remaining: free,
                        deadline: Instant::now() + PULL_EXPIRES + PULL_HEARTBEAT,
                    });
                }
                Err(e) => tracing::debug!(error = %e, "pull request not sent"),
            }
        }

        tokio::select! {
            biased;
            _ = rt.stop.cancelled() => break SessionEnd::Stopped,
            message = sub.next() => {
                let Some(message) = message else { break SessionEnd::SubscriptionClosed };
                last_heard = Instant::now();
                match message.status {
                    None | Some(StatusCode::OK) => {
                        requests.delivered();
                        let permit = match permits.clone().try_acquire_owned() {
                            Ok(p) => p,
                            // Only after a reset: a late delivery for a request we gave up on.
                            Err(_) => tokio::select! {
                                p = permits.clone().acquire_owned() => match p {
                                    Ok(p) => p,
                                    Err(_) => break SessionEnd::Stopped,
                                },
                                _ = rt.stop.cancelled() => {
                                    release(rt, message).await;
                                    break SessionEnd::Stopped;
                                }
                            },
                        };
                        start(rt, tasks, done, &mut inline, permit, message);
                    }
                    Some(StatusCode::IDLE_HEARTBEAT) => {}
                    Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => {
                        requests.close(request_id(&message.subject));
                    }
                    Some(StatusCode::NO_RESPONDERS) => {
                        requests.close(request_id(&message.subject));
                        break SessionEnd::NoResponders;
                    }
                    Some(status) => {
                        let description = message.description.clone().unwrap_or_default();
                        requests.close(request_id(&message.subject));
                        if description.to_ascii_lowercase().contains("consumer deleted") {
                            break SessionEnd::ConsumerDeleted;
                        }
                        tracing::debug!(status = %status, description, "pull request ended by the server");
                    }
                }
            }
            _ = done.notified() => {}
            _ = tick.tick() => {
                rt.stats.tick();
                let now = Instant::now();
                requests.expire(now);
                let connected_now = rt.client.connection_state() == async_nats::connection::State::Connected;
                if connected_now && !was_connected {
                    break SessionEnd::Reconnected;
                }
                was_connected = connected_now;
                if !requests.open.is_empty() && now.duration_since(last_heard) > HEARTBEAT_GRACE {
                    break SessionEnd::HeartbeatsMissed;
                }
            }
        }
    };

    // Deliveries that arrive from now on never start: they are handed back below.
    let mut unstarted = Vec::new();
    if matches!(end, SessionEnd::Stopped) {
        // What the server already sent to our open pull requests is still on its way:
        // collect it before removing our interest (see `wait_out_open_requests`).
        wait_out_open_requests(rt, &mut sub, &mut requests, &mut unstarted).await;
    }
    // `drain` removes the server's interest (it then drops our open pull requests and
    // sends them nothing more) and still delivers what arrives before it completes.
    let _ = sub.drain().await;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
        if matches!(message.status, None | Some(StatusCode::OK)) && message.reply.is_some() {
            unstarted.push(message);
        }
    }
    // Hand back whatever arrived and never started, so another worker gets it now.
    for message in unstarted {
        release(rt, message).await;
    }
    Ok(end)
}

/// At shutdown: receives until every open pull request is fulfilled, or nothing has
/// arrived for [`STOP_QUIET`], or the requests expire or the grace period ends,
/// collecting the deliveries in `unstarted`. They are held, not nak'ed yet: a nak now
/// would go straight back to one of our own open requests and burn an attempt.
/// Messages the server sends after our interest is gone would be lost to us and come
/// back only after the ack wait; waiting for the flow to stop first leaves only
/// deliveries that start in the instant of the unsubscribe exposed to that delay.
async fn wait_out_open_requests<S>(
    rt: &ConsumerRuntime<S>,
    sub: &mut async_nats::Subscriber,
    requests: &mut OpenRequests,
    unstarted: &mut Vec<async_nats::Message>,
) {
    let Some(expired) = requests.open.iter().map(|r| r.deadline).max() else {
        return;
    };
    let mut quiet_from = Instant::now() + STOP_QUIET;
    while !requests.open.is_empty() {
        tokio::select! {
            message = sub.next() => {
                let Some(message) = message else { return };
                match message.status {
                    None | Some(StatusCode::OK) => {
                        requests.delivered();
                        quiet_from = Instant::now() + STOP_QUIET;
                        if message.reply.is_some() {
                            unstarted.push(message);
                        }
                    }
                    Some(StatusCode::IDLE_HEARTBEAT) => {}
                    // Expired (408), nothing left (404), or the consumer is gone: that
                    // request brings nothing more.
                    Some(_) => requests.close(request_id(&message.subject)),
                }
            }
            _ = tokio::time::sleep_until(quiet_from.min(expired)) => return,
            _ = rt.hard_stop.cancelled() => return,
        }
    }
}

/// The request id from a status message's subject (`<inbox>.<id>`).
fn request_id(subject: &str) -> u64 {
    subject
        .rsplit('.')
        .next()
        .and_then(|id| id.parse().ok())
        .unwrap_or(0)
}

/// Naks a delivery that never started, without delay: another worker takes it at once.
async fn release<S>(rt: &ConsumerRuntime<S>, message: async_nats::Message) {
    let message = jetstream::Message {
        message,
        context: (*rt.js).clone(),
    };
    if message.ack_with(AckKind::Nak(None)).await.is_ok() {
        rt.stats.released.fetch_add(1, Ordering::Relaxed);
    }
}

/// Starts a delivery. Its first poll happens right here, in the pull loop's task: a
/// handler that finishes without waiting (decode, count, return) is settled with no task
/// spawned, as cheaply as a hand-written loop. A delivery that has to wait (I/O, timers)
/// continues as its own task, so slow handlers run concurrently up to `concurrency`.
/// Handlers whose first poll is itself long (CPU-heavy work before their first await)
/// are spawned straight away, so they run in parallel on the runtime's threads instead
/// of holding up the pull loop.
fn start<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    tasks: &TaskTracker,
    done: &Arc<Notify>,
    inline: &mut InlinePolling,
    permit: OwnedSemaphorePermit,
    message: async_nats::Message,
) {
    rt.stats.received.fetch_add(1, Ordering::Relaxed);
    let running = rt.stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    rt.stats
        .peak_in_flight
        .fetch_max(running, Ordering::Relaxed);
    let delivery_rt = rt.clone();
    let mut delivery = Box::pin(async move {
        deliver(&delivery_rt, message).await;
        delivery_rt.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        drop(permit);
    });
    if inline.should_poll() {
        // A no-op waker is enough: if the delivery is not finished, the spawned task
        // polls it again at once, and that poll registers the task's own waker.
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        let polled_at = std::time::Instant::now();
        let ready = delivery.as_mut().poll(&mut cx).is_ready();
        if inline.record(polled_at.elapsed()) {
            tracing::debug!(consumer = %rt.spec.name, "handlers work long before their first await: the next deliveries run as tasks at once");
        }
        if ready {
            return;
        }
    }
    let done = done.clone();
    tasks.spawn(async move {
        delivery.await;
        done.notify_one();
    });
}

/// How a handler run ended.
enum Ran {
    Finished(Attempted),
    /// The grace period ran out: hand the message back.
    Abandoned,
}

/// The path of one delivery, ending settled.
async fn deliver<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    message: async_nats::Message,
) {
    let message = jetstream::Message {
        message,
        context: (*rt.js).clone(),
    };
    let (stream, sequence, attempt) = match message.info() {
        Ok(info) => (
            info.stream.to_string(),
            info.stream_sequence,
            u64::try_from(info.delivered).unwrap_or(1).max(1),
        ),
        Err(e) => {
            // Not a JetStream delivery (no ack subject): nothing can settle it.
            tracing::error!(consumer = %rt.spec.name, subject = %message.subject, error = %e, "delivery without JetStream metadata ignored");
            return;
        }
    };
    if attempt > 1 {
        rt.stats.redelivered.fetch_add(1, Ordering::Relaxed);
    }
    // One span per message; a `traceparent` header continues the sender's trace.
    let trace = TraceContext::for_delivery(message.headers.as_ref());
    let span = tracing::info_span!(
        "message",
        stream = %stream,
        consumer = %rt.spec.name,
        seq = sequence,
        attempt,
        trace_id = %trace.trace_id,
        span_id = %trace.span_id,
        outcome = tracing::field::Empty,
    );
    settle_delivery(rt, message, stream, sequence, attempt, trace)
        .instrument(span)
        .await;
}

async fn settle_delivery<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    message: jetstream::Message,
    stream: String,
    sequence: u64,
    attempt: u64,
    trace: TraceContext,
) {
    let started = std::time::Instant::now();
    let ran = trace
        .scope(run_handler(rt, &message, &stream, sequence, attempt))
        .await;
    let took = started.elapsed();
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    rt.stats.handler_micros.fetch_add(micros, Ordering::Relaxed);
    rt.stats.handler_seconds.observe(took.as_secs_f64());
    let attempted = match ran {
        Ran::Finished(a) => a,
        Ran::Abandoned => {
            tracing::warn!(stream, consumer = %rt.spec.name, seq = sequence, attempt, "shutdown grace over: handing the message back");
            let _ = message.ack_with(AckKind::Nak(None)).await;
            return;
        }
    };
    match &attempted {
        Attempted::Panicked(_) => rt.stats.panics.fetch_add(1, Ordering::Relaxed),
        Attempted::TimedOut(_) => rt.stats.timeouts.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
    let outcome = decide(&attempted, attempt, &rt.policy);
    tracing::Span::current().record("outcome", outcome.word());
    settle(
        rt, &message, &stream, sequence, attempt, &attempted, outcome,
    )
    .await;
}

async fn run_handler<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    message: &jetstream::Message,
    stream: &str,
    sequence: u64,
    attempt: u64,
) -> Ran {
    let ctx = Context {
        state: rt.state.clone(),
        subject: message.subject.as_str().to_owned(),
        headers: message.headers.clone().unwrap_or_default(),
        stream: stream.to_owned(),
        consumer: rt.spec.name.clone(),
        stream_sequence: sequence,
        attempt,
        max_deliver: rt.policy.max_deliver,
        shutdown: rt.stop.clone(),
        jetstream: Some(rt.js.clone()),
    };
    let guarded = match prepare(rt.handler.as_ref(), &message.payload, &rt.config, ctx) {
        Ok(f) => f,
        Err(attempted) => return Ran::Finished(attempted),
    };
    tokio::pin!(guarded);
    // One timer serves both deadlines: the handler timeout, and the next progress ack
    // that keeps the message while the handler works past half the ack wait.
    let started = Instant::now();
    let timeout_at = started + rt.config.handler_timeout;
    let every = (rt.config.ack_wait / 2).max(Duration::from_millis(500));
    let mut progress_at = started + every;
    let timer = tokio::time::sleep_until(progress_at.min(timeout_at));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            // The handler first: one that is already done never arms the timer.
            biased;
            result = &mut guarded => return Ran::Finished(attempted_from(result)),
            _ = &mut timer => {
                let now = Instant::now();
                if now >= timeout_at {
                    return Ran::Finished(Attempted::TimedOut(rt.config.handler_timeout));
                }
                if now >= progress_at {
                    let _ = message.ack_with(AckKind::Progress).await;
                    progress_at = now + every;
                }
                timer.as_mut().reset(progress_at.min(timeout_at));
            }
            _ = rt.hard_stop.cancelled() => return Ran::Abandoned,
        }
    }
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
    let limit = usize::try_from(config.max_payload_bytes).unwrap_or(usize::MAX);
    // Headers count: they come from the sender too, and the handler gets them.
    let size = if ctx.headers.is_empty() {
        payload.len()
    } else {
        payload.len() + dead_letter::wire_len(&ctx.headers)
    };
    if size > limit {
        return Err(Attempted::TooLarge { size, limit });
    }
    match handler.prepare(payload, config.codec, ctx) {
        Ok(future) => Ok(AssertUnwindSafe(future).catch_unwind()),
        Err(e) => Err(Attempted::Undecodable(e.to_string())),
    }
}

/// What a finished (or panicked) handler run means for the decision.
pub(crate) fn attempted_from(
    result: Result<Result<(), crate::HandlerError>, Box<dyn std::any::Any + Send>>,
) -> Attempted {
    match result {
        Ok(Ok(())) => Attempted::Succeeded,
        Ok(Err(e)) => match e.kind() {
            HandlerErrorKind::Transient => Attempted::Transient(e.message()),
            HandlerErrorKind::RetryAfter(d) => Attempted::RetryAfter(d, e.message()),
            HandlerErrorKind::Permanent => Attempted::Permanent(e.message()),
        },
        Err(panic) => Attempted::Panicked(panic_message(&panic)),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

async fn settle<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    message: &jetstream::Message,
    stream: &str,
    sequence: u64,
    attempt: u64,
    attempted: &Attempted,
    outcome: Outcome,
) {
    let consumer = &rt.spec.name;
    match outcome {
        Outcome::Ack => {
            if let Err(e) = message.ack().await {
                tracing::warn!(stream, consumer = %consumer, seq = sequence, error = %e, "ack not sent; the message will be redelivered");
            }
            rt.stats.acked.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(stream, consumer = %consumer, seq = sequence, attempt, outcome = "ack", "settled");
        }
        Outcome::Nak(delay) => {
            let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            rt.stats.retried.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                stream, consumer = %consumer, seq = sequence, attempt,
                outcome = "retry", retry_in = %humantime::format_duration(delay),
                error = %attempted_error(attempted), "settled"
            );
        }
        Outcome::DeadLetter { reason, error } => {
            // Boxed: the rare path's large future would otherwise be part of every
            // delivery's task, copied at each spawn.
            Box::pin(dead_letter_then_term(
                rt, message, stream, sequence, attempt, reason, error,
            ))
            .await;
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
    message: &jetstream::Message,
    stream: &str,
    sequence: u64,
    attempt: u64,
    reason: Reason,
    error: String,
) {
    let consumer = &rt.spec.name;
    let subject = &rt.config.dead_letter_subject;
    let letter = DeadLetter {
        subject: message.subject.as_str().to_owned(),
        headers: message.headers.clone().unwrap_or_default(),
        stream: stream.to_owned(),
        sequence,
        consumer: consumer.clone(),
        attempts: attempt,
        reason,
        error,
    };
    let payload: Bytes = message.payload.clone();
    let mut failures: u32 = 0;
    loop {
        match dead_letter::publish(
            &rt.js,
            subject,
            &letter,
            payload.clone(),
            rt.request_timeout,
        )
        .await
        {
            Ok(_) => {
                term(rt, message, reason).await;
                rt.stats.count_dead_letter(reason);
                tracing::warn!(
                    stream, consumer = %consumer, seq = sequence, attempt,
                    outcome = "dead_letter", reason = %reason, error = %letter.error,
                    dead_letter_subject = %subject, "settled"
                );
                return;
            }
            Err(e) => {
                rt.stats
                    .dead_letter_failures
                    .fetch_add(1, Ordering::Relaxed);
                failures += 1;
                if attempt < rt.policy.max_deliver {
                    // Never term a message whose copy is not stored: it comes back later.
                    let delay = rt.policy.delay_after(attempt);
                    let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                    rt.stats.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        stream, consumer = %consumer, seq = sequence, attempt, reason = %reason, error = %e,
                        retry_in = %humantime::format_duration(delay),
                        "dead-letter copy not stored; the original is kept and retried"
                    );
                    return;
                }
                // The last delivery: a nak would strand it (the server delivers it no
                // more), so keep it here with progress acks and retry the copy.
                let wait =
                    backoff(failures).min((rt.config.ack_wait / 2).max(Duration::from_millis(500)));
                tracing::error!(
                    stream, consumer = %consumer, seq = sequence, attempt, reason = %reason, error = %e,
                    retry_in = %humantime::format_duration(wait),
                    "dead-letter copy not stored on the last delivery; holding the original and retrying"
                );
                let _ = message.ack_with(AckKind::Progress).await;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = rt.hard_stop.cancelled() => {
                        let _ = message.ack_with(AckKind::Nak(None)).await;
                        return;
                    }
                }
            }
        }
    }
}

/// Terminates the original, with the reason where the server supports it (2.10.4+).
async fn term<S>(rt: &ConsumerRuntime<S>, message: &jetstream::Message, reason: Reason) {
    let sent = match (&message.reply, rt.server_version.at_least(2, 10, 4)) {
        (Some(reply), true) => rt
            .client
            .publish(reply.clone(), Bytes::from(format!("+TERM {reason}")))
            .await
            .map_err(|e| e.to_string()),
        _ => message
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| e.to_string()),
    };
    if let Err(e) = sent {
        tracing::warn!(consumer = %rt.spec.name, error = %e, "term not sent; the message will be redelivered and its copy deduplicated");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_requests_account_in_order() {
        let now = Instant::now();
        let mut r = OpenRequests::default();
        r.open.push_back(OpenRequest {
            id: 1,
            remaining: 2,
            deadline: now + Duration::from_secs(1),
        });
        r.open.push_back(OpenRequest {
            id: 2,
            remaining: 3,
            deadline: now + Duration::from_secs(9),
        });
        assert_eq!(r.requested(), 5);
        r.delivered();
        r.delivered();
        assert_eq!(r.open.len(), 1, "first request fulfilled");
        assert_eq!(r.requested(), 3);
        r.close(2);
        assert_eq!(r.requested(), 0);
        r.open.push_back(OpenRequest {
            id: 3,
            remaining: 1,
            deadline: now,
        });
        r.expire(now + Duration::from_millis(1));
        assert!(r.open.is_empty());
    }

    #[test]
    fn inline_polling_turns_off_after_a_streak_and_comes_back() {
        let fast = Duration::from_micros(10);
        let slow = INLINE_POLL_LIMIT + Duration::from_millis(1);
        let mut p = InlinePolling::default();
        assert!(p.should_poll());
        // One slow poll between fast ones is a hiccup, not a CPU-heavy handler.
        assert!(!p.record(slow));
        assert!(!p.record(fast));
        assert!(!p.record(slow));
        assert!(!p.record(slow));
        assert!(p.record(slow), "three in a row turn it off");
        for _ in 0..INLINE_OFF_FOR {
            assert!(!p.should_poll());
        }
        assert!(p.should_poll(), "probed again");
    }

    #[test]
    fn request_ids_parse() {
        assert_eq!(request_id("_INBOX.abc.17"), 17);
        assert_eq!(request_id("garbage"), 0);
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert!(backoff(50) <= MAX_BACKOFF);
    }
}
