//! The pull protocol, spoken directly: one inbox subscription per session, `MSG.NEXT`
//! requests sized by the prefetch bound, idle heartbeats, and at the end of a session
//! the hand-back of what arrived and never started (but last deliveries, which run:
//! see [`run_last_deliveries`]).
//!
//! The loop holds its free handler slots' worth of messages plus what the handlers
//! finish within a short horizon at their measured pace (see `prefetch`), so a fast
//! consumer makes a few large pulls and a slow one never holds a message long enough
//! for its ack wait to matter. Each arriving message takes a free slot and starts (see
//! [`start`]) on its way through [`deliver`], or waits, in order, for the next slot.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::StatusCode;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::batch::Batches;
use super::delivery::{deliver, is_last_delivery, receive, send_or_note, Settled, Slot};
use super::error::{ConsumerError, ConsumerErrorKind};
use super::inline::InlinePolling;
use super::lanes::{LaneTicket, Lanes};
use super::prefetch::{Bound, Holding, Pace, PREFETCH_BYTES};
use super::replies;
use super::runtime::ConsumerRuntime;

/// How long one pull request waits on the server for messages. Short, so that a
/// request lost with a connection is replaced soon.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// While the handlers are measured to finish work (a pace, so the pull may ask for more
/// than the free slots), pull requests expire this soon and carry no heartbeat: a pull
/// sized to a pace that has since dropped (handlers slowed down, the backlog ran out)
/// stops bringing messages after this instead of lingering for [`PULL_EXPIRES`].
const PACED_PULL_EXPIRES: Duration = Duration::from_millis(250);
/// Idle heartbeat asked of the server while a pull request waits.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// Pull requests whose server we have not heard from for this long are presumed lost
/// (three heartbeats missed).
const HEARTBEAT_GRACE: Duration = Duration::from_secs(6);
/// At shutdown, open pull requests are listened to until they are fulfilled or nothing
/// has arrived for this long (see [`wait_out_open_requests`]).
const STOP_QUIET: Duration = Duration::from_millis(300);
/// Messages already received that the loop takes in one turn, before it looks at its
/// pulls, the stop and its timers again.
const RECEIVE_BATCH: usize = 128;
/// How often the loop checks deadlines, heartbeats and the connection.
const TICK: Duration = Duration::from_millis(500);

/// Why a pull session ended.
#[derive(Debug)]
pub(super) enum SessionEnd {
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
pub(super) async fn revive_connection<S>(rt: &ConsumerRuntime<S>) {
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

/// Deliveries that arrived and wait for a handler slot, oldest first, with their bytes.
#[derive(Default)]
struct Waiting {
    queue: VecDeque<Arrived>,
    bytes: usize,
}

/// A delivery waiting for a slot, and since when its ack timer runs on the server (its
/// arrival, or the last progress ack sent for it).
struct Arrived {
    message: async_nats::Message,
    since: Instant,
}

impl Waiting {
    fn push(&mut self, message: async_nats::Message) {
        self.bytes += message.length;
        self.queue.push_back(Arrived {
            message,
            since: Instant::now(),
        });
    }

    fn pop(&mut self) -> Option<async_nats::Message> {
        let arrived = self.queue.pop_front()?;
        self.bytes = self.bytes.saturating_sub(arrived.message.length);
        Some(arrived.message)
    }

    /// Sends a progress ack for every delivery that has waited a third of the ack wait
    /// (the handlers slowed down after it was pulled), so none is redelivered while it
    /// waits here.
    async fn keep_alive<S>(&mut self, rt: &ConsumerRuntime<S>, now: Instant) {
        let limit = rt.config.ack_wait / 3;
        for arrived in self.queue.iter_mut() {
            if now.saturating_duration_since(arrived.since) < limit {
                // Oldest first: the rest waited less.
                break;
            }
            if let Some(reply) = &arrived.message.reply {
                send_or_note(rt, reply, AckKind::Progress, None).await;
            }
            arrived.since = now;
        }
    }
}

/// Messages this consumer has finished so far (received and no longer in flight).
fn finished<S>(rt: &ConsumerRuntime<S>) -> u64 {
    let received = rt.stats.received.load(Ordering::Relaxed);
    let in_flight = rt.stats.in_flight.load(Ordering::Relaxed) as u64;
    received.saturating_sub(in_flight)
}

/// One pull session: a fresh inbox, requests sized by [`Bound::pull_size`] (free slots
/// plus the measured pace's worth of prefetch), until something needs a restart or the
/// worker stops.
pub(super) async fn session<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    permits: &Arc<Semaphore>,
    done: &Arc<Notify>,
    tasks: &TaskTracker,
    batches: Option<&Batches>,
    lanes: &mut Option<Lanes>,
) -> Result<SessionEnd, ConsumerError> {
    let inbox = rt.client.new_inbox();
    let mut sub = rt
        .client
        .subscribe(format!("{inbox}.*"))
        .await
        .map_err(|e| ConsumerError::with_source(ConsumerErrorKind::Subscribe, e))?;
    let next_subject = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        rt.spec.stream, rt.spec.name
    );
    let concurrency = rt.slots();
    let bound = Bound {
        ack_wait: rt.config.ack_wait,
        max_ack_pending: usize::try_from(rt.config.max_ack_pending)
            .unwrap_or(1)
            .max(1),
        bytes: PREFETCH_BYTES,
    };
    let mut pace = Pace::new(Instant::now(), finished(rt));
    let mut waiting = Waiting::default();
    let mut requests = OpenRequests::default();
    let mut next_id: u64 = 0;
    let mut last_heard = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_connected = true;
    let mut inline = InlinePolling::default();
    // Made once, not per turn of the loop: each would register (and unregister) a waiter.
    let stopped = rt.stop.cancelled();
    tokio::pin!(stopped);
    let finished_one = done.notified();
    tokio::pin!(finished_one);

    let end = loop {
        // What waits starts first, in order, while slots are free.
        while !waiting.queue.is_empty() {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            if let Some(message) = waiting.pop() {
                start(
                    rt,
                    tasks,
                    done,
                    &mut inline,
                    Route::unordered(batches),
                    permit,
                    message,
                );
            }
        }
        // An ordered consumer's messages start as their lanes release them.
        if let Some(lanes) = lanes.as_mut() {
            start_released(rt, tasks, done, &mut inline, permits, lanes);
        }
        // Ask for what the bound allows and is not yet held or asked for; nothing more
        // once the stop is signalled.
        let now = Instant::now();
        pace.observe(now, finished(rt));
        let connected = rt.client.connection_state() == async_nats::connection::State::Connected;
        let free_slots = permits.available_permits();
        let (in_lanes, in_lanes_bytes) = lanes
            .as_ref()
            .map_or((0, 0), |l| (l.unstarted(), l.unstarted_bytes()));
        let holding = Holding {
            free_slots,
            running: concurrency.saturating_sub(free_slots),
            waiting: waiting.queue.len() + in_lanes,
            waiting_bytes: waiting.bytes + in_lanes_bytes,
            requested: requests.requested(),
        };
        let mut batch = bound.pull_size(
            &holding,
            pace.per_second(),
            pace.mean_bytes(),
            requests.open.is_empty(),
        );
        // Only a pull brings back what a key lane awaits, whatever the bound says.
        if batch == 0
            && requests.open.is_empty()
            && lanes.as_ref().is_some_and(Lanes::awaits_redelivery)
        {
            batch = 1;
        }
        if connected && batch > 0 && !rt.stop.is_cancelled() {
            next_id += 1;
            let (body, expires) = if pace.per_second() > 0.0 {
                let body = format!(
                    "{{\"batch\":{batch},\"expires\":{}}}",
                    PACED_PULL_EXPIRES.as_nanos()
                );
                (body, 2 * PACED_PULL_EXPIRES)
            } else {
                let body = format!(
                    "{{\"batch\":{batch},\"expires\":{},\"idle_heartbeat\":{}}}",
                    PULL_EXPIRES.as_nanos(),
                    PULL_HEARTBEAT.as_nanos()
                );
                (body, PULL_EXPIRES + PULL_HEARTBEAT)
            };
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
                        last_heard = now;
                    }
                    requests.open.push_back(OpenRequest {
                        id: next_id,
                        remaining: batch,
                        deadline: now + expires,
                    });
                }
                Err(e) => tracing::debug!(error = %e, "pull request not sent"),
            }
        }

        tokio::select! {
            biased;
            _ = &mut stopped => break SessionEnd::Stopped,
            message = sub.next() => {
                last_heard = Instant::now();
                // This message, and up to RECEIVE_BATCH more that are already here, are
                // taken in one go: the pull decision and the select run once per batch.
                let mut next = message;
                let mut taken = 0;
                let end = loop {
                    let Some(message) = next else { break Some(SessionEnd::SubscriptionClosed) };
                    match message.status {
                        None | Some(StatusCode::OK) => {
                            requests.delivered();
                            pace.received(message.length);
                            if let Some(lanes) = lanes.as_mut() {
                                // Started as they arrive, as unordered ones are: a turn
                                // that received a batch first would start it with the
                                // task's cooperative budget spent, and every delivery
                                // would wait for its ack's send in a task of its own.
                                lanes.admit(message, last_heard);
                                start_released(rt, tasks, done, &mut inline, permits, lanes);
                            } else {
                                let permit = if waiting.queue.is_empty() {
                                    permits.clone().try_acquire_owned().ok()
                                } else {
                                    None
                                };
                                match permit {
                                    Some(permit) => start(rt, tasks, done, &mut inline, Route::unordered(batches), permit, message),
                                    None => waiting.push(message),
                                }
                            }
                        }
                        Some(StatusCode::IDLE_HEARTBEAT) => {}
                        Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => {
                            requests.close(request_id(&message.subject));
                        }
                        Some(StatusCode::NO_RESPONDERS) => {
                            requests.close(request_id(&message.subject));
                            break Some(SessionEnd::NoResponders);
                        }
                        Some(status) => {
                            let description = message.description.clone().unwrap_or_default();
                            requests.close(request_id(&message.subject));
                            if description.to_ascii_lowercase().contains("consumer deleted") {
                                break Some(SessionEnd::ConsumerDeleted);
                            }
                            tracing::debug!(status = %status, description, "pull request ended by the server");
                        }
                    }
                    taken += 1;
                    if taken == RECEIVE_BATCH {
                        break None;
                    }
                    match sub.next().now_or_never() {
                        Some(message) => next = message,
                        None => break None,
                    }
                };
                if let Some(end) = end {
                    break end;
                }
            }
            _ = &mut finished_one => finished_one.set(done.notified()),
            _ = tick.tick() => {
                rt.stats.tick();
                // A backstop: the task that queued a reply first sends the queue.
                replies::send_queued(rt).await;
                let now = Instant::now();
                requests.expire(now);
                waiting.keep_alive(rt, now).await;
                if let Some(lanes) = lanes.as_mut() {
                    lanes.check_gate(rt, now).await;
                    lanes.give_up_overdue(&rt.spec.name, now);
                    lanes.keep_alive(rt, now).await;
                }
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

    // Deliveries that waited for a slot, and those that arrive from now on, never
    // start: they are handed back below.
    let mut unstarted = Vec::with_capacity(waiting.queue.len());
    while let Some(message) = waiting.pop() {
        unstarted.push(message);
    }
    if matches!(end, SessionEnd::Stopped) {
        // What the server already sent to our open pull requests is still on its way:
        // collect it before removing our interest (see `wait_out_open_requests`).
        wait_out_open_requests(rt, &mut sub, &mut requests, &mut unstarted).await;
        if let Some(lanes) = lanes.as_mut() {
            unstarted.extend(lanes.hand_back());
        }
    }
    // `drain` removes the server's interest (it then drops our open pull requests and
    // sends them nothing more) and still delivers what arrives before it completes.
    let _ = sub.drain().await;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
        if matches!(message.status, None | Some(StatusCode::OK)) && message.reply.is_some() {
            unstarted.push(message);
        }
    }
    // An ordered consumer that goes on keeps them in its lanes: handed back, they could
    // return after later messages of their key.
    if let (Some(lanes), false) = (lanes.as_mut(), matches!(end, SessionEnd::Stopped)) {
        let now = Instant::now();
        for message in unstarted {
            lanes.admit(message, now);
        }
        return Ok(end);
    }
    // Hand back whatever arrived and never started, so another worker gets it now;
    // except last deliveries (see `run_last_deliveries`). An ordered consumer's are
    // handed back too: run here, outside its lanes, one could start before the message
    // of its key still in flight is settled.
    let (last, handed_back): (Vec<_>, Vec<_>) = unstarted
        .into_iter()
        .partition(|message| lanes.is_none() && is_last_delivery(rt, message));
    for message in handed_back {
        release(rt, message).await;
    }
    run_last_deliveries(rt, permits, done, tasks, &mut inline, last).await;
    Ok(end)
}

/// Starts what the key lanes released, while slots are free. A delivery that settles
/// in its first poll reports back at once, so its key's next message starts in the
/// same turn.
fn start_released<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    tasks: &TaskTracker,
    done: &Arc<Notify>,
    inline: &mut InlinePolling,
    permits: &Arc<Semaphore>,
    lanes: &mut Lanes,
) {
    loop {
        lanes.take_finished(Instant::now());
        if !lanes.has_ready() {
            return;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            return;
        };
        if let Some((message, ticket)) = lanes.pop_ready() {
            start(
                rt,
                tasks,
                done,
                inline,
                Route::Alone(ticket),
                permit,
                message,
            );
        }
    }
}

/// At the end of a session, runs the last deliveries that arrived and never started, as
/// handler slots free up, within the grace period. A hand-back (a nak) would use up the
/// server's last delivery: it would deliver the message no more, and the safety net
/// would dead-letter it as `abandoned` though its last attempt never ran. Only one that
/// is still waiting for a slot when the grace period ends is handed back (and logged).
async fn run_last_deliveries<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    permits: &Arc<Semaphore>,
    done: &Arc<Notify>,
    tasks: &TaskTracker,
    inline: &mut InlinePolling,
    last: Vec<async_nats::Message>,
) {
    if !last.is_empty() {
        tracing::info!(
            stream = %rt.spec.stream, consumer = %rt.spec.name, count = last.len(),
            "running the last deliveries that arrived before the stop within the grace period"
        );
    }
    // Held until a slot frees: kept with progress acks, so the server does not redeliver
    // one elsewhere while it waits here (it would run twice).
    let mut last: VecDeque<async_nats::Message> = last.into();
    keep_alive(rt, last.iter()).await;
    let keep_every = keep_alive_interval(rt);
    let mut keep = tokio::time::interval_at(Instant::now() + keep_every, keep_every);
    while let Some(message) = last.pop_front() {
        tokio::select! {
            biased;
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => start(rt, tasks, done, inline, Route::Alone(None), permit, message),
                Err(_) => release(rt, message).await,
            },
            _ = rt.hard_stop.cancelled() => {
                tracing::warn!(
                    stream = %rt.spec.stream, consumer = %rt.spec.name,
                    "shutdown grace over before a last delivery could start: handed back (the safety net files it as abandoned)"
                );
                release(rt, message).await;
            }
            _ = keep.tick() => {
                last.push_front(message);
                keep_alive(rt, last.iter()).await;
            }
        }
    }
}

/// How often deliveries held unstarted get a progress ack: a third of the ack wait.
fn keep_alive_interval<S>(rt: &ConsumerRuntime<S>) -> Duration {
    (rt.config.ack_wait / 3).max(Duration::from_millis(100))
}

/// Sends a progress ack for each of `messages` (held unstarted), resetting their ack
/// timers on the server.
async fn keep_alive<'m, S>(
    rt: &ConsumerRuntime<S>,
    messages: impl Iterator<Item = &'m async_nats::Message>,
) {
    for message in messages {
        if let Some(reply) = &message.reply {
            send_or_note(rt, reply, AckKind::Progress, None).await;
        }
    }
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
    // The last deliveries collected here will run (see `run_last_deliveries`): kept
    // with progress acks meanwhile, so none is redelivered elsewhere while held.
    let keep_every = keep_alive_interval(rt);
    let mut keep = tokio::time::interval_at(Instant::now() + keep_every, keep_every);
    while !requests.open.is_empty() {
        tokio::select! {
            _ = keep.tick() => {
                let last = unstarted.iter().filter(|m| is_last_delivery(rt, m));
                keep_alive(rt, last).await;
            }
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
pub(super) async fn release<S>(rt: &ConsumerRuntime<S>, message: async_nats::Message) {
    let Some(reply) = &message.reply else { return };
    if send_or_note(rt, reply, AckKind::Nak(None), None).await {
        rt.stats.released.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a delivery goes once it has a slot.
enum Route<'a> {
    /// Into the batch being collected (a batch consumer).
    Batch(&'a Batches),
    /// Run on its own; an ordered consumer's delivery carries its lane's ticket.
    Alone(Option<LaneTicket>),
}

impl<'a> Route<'a> {
    /// The route of an unordered delivery: into a batch when the consumer collects them.
    fn unordered(batches: Option<&'a Batches>) -> Route<'a> {
        batches.map_or(Route::Alone(None), Route::Batch)
    }
}

/// Starts a delivery. Its first poll happens right here, in the pull loop's task: a
/// handler that finishes without waiting (decode, count, return) is settled with no task
/// spawned, as cheaply as a hand-written loop. A delivery that has to wait (I/O, timers)
/// continues as its own task, so slow handlers run concurrently up to `concurrency`.
/// Handlers whose first poll is itself long (CPU-heavy work before their first await)
/// are spawned straight away, so they run in parallel on the runtime's threads instead
/// of holding up the pull loop. A batch consumer's delivery joins the batch being
/// collected instead (see `batch`).
fn start<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    tasks: &TaskTracker,
    done: &Arc<Notify>,
    inline: &mut InlinePolling,
    route: Route<'_>,
    permit: OwnedSemaphorePermit,
    message: async_nats::Message,
) {
    rt.stats.received.fetch_add(1, Ordering::Relaxed);
    let running = rt.stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    rt.stats
        .peak_in_flight
        .fetch_max(running, Ordering::Relaxed);
    let ticket = match route {
        Route::Batch(batches) => {
            batches.add(rt, permit, message);
            return;
        }
        Route::Alone(ticket) => ticket,
    };
    // Read before its future is made, which then holds the one copy of the message.
    let Some(delivery) = receive(rt, message) else {
        if let Some(ticket) = ticket {
            ticket.finished(Settled::Gone);
        }
        rt.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        return;
    };
    let slot = Slot::new(permit, done.clone());
    let mut delivery = Box::pin(deliver(rt.clone(), delivery, slot, ticket));
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
    fn request_ids_parse() {
        assert_eq!(request_id("_INBOX.abc.17"), 17);
        assert_eq!(request_id("garbage"), 0);
    }
}
