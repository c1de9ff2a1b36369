//! One durable consumer at work: the pull loop and the path of each delivery.
//!
//! - [`run`] (here): the consumer's life. It makes sure the durable consumer exists
//!   (recreating it from the config when it was deleted), runs pull sessions, and starts
//!   a new one when heartbeats stop, the client reconnects or the server says the
//!   consumer is gone; failures wait a jittered [`Backoff`] before the next try.
//! - `pull`: one pull session: `MSG.NEXT` requests sized by the prefetch bound, idle
//!   heartbeats, the hand-back at shutdown of what never started; each message takes a
//!   free slot and goes to `delivery`, or waits in order for one.
//! - `prefetch`: the bound on what the loop holds unstarted (below), and the pace it is
//!   measured from.
//! - `delivery`: the path of one [`Delivery`](delivery::Delivery): size check -> decode
//!   -> handler (timeout, panic caught, progress acks while it runs) -> [`decide`](crate::decide)
//!   -> ack | nak(delay) | dead letter (publish, await PubAck, then term).
//! - `batch`: a batch handler's consumer: the started deliveries collected into batches,
//!   each run once and settled message by message through `delivery`.
//! - `inline`: whether the pull loop polls a delivery once itself before spawning it.
//! - `lanes`: an ordered consumer's key lanes: one message of a key at a time, in
//!   stream order, a retried one holding its key back.
//! - `runtime`: [`ConsumerRuntime`], what the loop and its deliveries share.
//! - `stats`: [`ConsumerStats`], the counters behind `/metrics` and `/readyz`.
//! - `error`: why a consumer cannot pull right now (logged, then retried).
//!
//! # What the pull loop holds
//! Handler slots (`concurrency`) bound how many handlers run at once, not how many
//! messages the client holds. Besides the messages its free slots take at once, the
//! loop holds (waiting for a slot, or asked for and on their way) at most what its
//! handlers finish within a tenth of `ack_wait`, capped at 200 ms, at the pace they were
//! measured to finish work over the last quarter second or more; and never more than
//! 8 MiB of them, nor more than `max_ack_pending` counting the running handlers. Handlers
//! that finish nothing (idle, or stuck on a slow dependency) get no prefetch beyond their
//! free slots, and pulls sized to a pace expire after 250 ms, so none lingers once the
//! pace is gone. A message that waits in the client longer than a third of `ack_wait`
//! anyway gets a progress ack, so no buffered message is redelivered meanwhile. At
//! shutdown no pull is sent once the stop is signalled, and what was held but never
//! started (at most that 200 ms of work, beyond the free slots) is handed back.
//!
//! # Hand-backs and `max_deliver`
//! A hand-back is a nak: the server counts the delivery against `max_deliver` although
//! no handler ran. So the last delivery of a message is never handed back at the end of
//! a session (see `pull::run_last_deliveries`): it runs as slots free up, within the
//! grace period at shutdown, since a nak would use it up and strand the message to the
//! safety net as `abandoned` though its last attempt never ran.
//!
//! Submodules import their siblings and the crate's leaf modules, never this one.

mod batch;
mod delivery;
mod error;
mod inline;
mod lanes;
mod prefetch;
mod pull;
mod replies;
mod runtime;
mod stats;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::provision;
use error::{ConsumerError, ConsumerErrorKind};
use pull::SessionEnd;

/// For the test harness, which runs a handler the way a delivery does.
#[cfg(feature = "testing")]
pub(crate) use batch::{batch_attempts, stage, BatchRan};
pub(crate) use delivery::panic_message;
#[cfg(feature = "testing")]
pub(crate) use delivery::{attempted_from, prepare};
pub(crate) use lanes::{KeyFn, KeyOf};
pub(crate) use runtime::ConsumerRuntime;
pub use stats::ConsumerStats;

/// The first wait before trying again to restore the consumer (or a pull session).
const RESTORE_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between attempts to restore the consumer.
const RESTORE_MAX: Duration = Duration::from_secs(30);

/// Runs the consumer until `stop`, then waits for its handlers (the caller bounds that
/// with the grace period through `hard_stop`).
pub(crate) async fn run<S: Send + Sync + 'static>(rt: Arc<ConsumerRuntime<S>>) {
    let permits = Arc::new(Semaphore::new(rt.slots()));
    let done = Arc::new(Notify::new());
    let tasks = TaskTracker::new();
    let batches = batch::Batches::start(&rt, &done, &tasks);
    let mut retry = Backoff::new(RESTORE_FIRST, RESTORE_MAX);
    // An ordered consumer's lanes outlive its pull sessions (see `lanes`).
    let mut lanes = rt
        .ordered_by
        .clone()
        .map(|key_of| lanes::Lanes::new(key_of, rt.config.ack_wait));
    let mut first_session = true;

    loop {
        rt.stats.tick();
        if rt.stop.is_cancelled() {
            break;
        }
        let pending = match ensure_consumer(&rt).await {
            Ok(Some(pending)) => pending,
            Ok(None) => break,
            Err(e) => {
                let wait = retry.next();
                tracing::warn!(
                    stream = %rt.spec.stream, consumer = %rt.spec.name, error = %e,
                    retry_in = %humantime::format_duration(wait), "consumer unavailable"
                );
                tokio::select! {
                    _ = rt.stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        // Messages pending elsewhere when an ordered consumer starts: its lanes wait for
        // them (see `lanes`, "The gate").
        if let Some(lanes) = lanes.as_mut().filter(|_| first_session && pending > 0) {
            lanes.close_gate(Instant::now() + gate_deadline(&rt));
            tracing::info!(
                stream = %rt.spec.stream, consumer = %rt.spec.name, pending,
                "messages of this ordered consumer are pending elsewhere; holding its keys until they are in hand"
            );
        }
        first_session = false;
        rt.stats.sessions.fetch_add(1, Ordering::Relaxed);
        rt.stats.set_pulling(true);
        let end = pull::session(&rt, &permits, &done, &tasks, batches.as_ref(), &mut lanes).await;
        rt.stats.set_pulling(false);
        let wait = match end {
            Ok(SessionEnd::Stopped) => break,
            Ok(end) => {
                tracing::info!(stream = %rt.spec.stream, consumer = %rt.spec.name, reason = ?end, "restarting pull");
                if matches!(end, SessionEnd::HeartbeatsMissed) {
                    pull::revive_connection(&rt).await;
                }
                match end {
                    SessionEnd::NoResponders | SessionEnd::SubscriptionClosed => retry.next(),
                    _ => {
                        retry.reset();
                        continue;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(stream = %rt.spec.stream, consumer = %rt.spec.name, error = %e, "pull session failed");
                retry.next()
            }
        };
        tokio::select! {
            _ = rt.stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    // The batch collector runs what it still holds and ends.
    drop(batches);
    tasks.close();
    tasks.wait().await;
    // Each delivery's task sends the replies it queued before it ends; none is left
    // unless one was dropped midway.
    replies::send_queued(&rt).await;
}

/// When the lanes' gate opens at the latest: pending messages come back within the
/// longest of the ack wait and the retry delays; one ack wait and a margin more.
fn gate_deadline<S>(rt: &ConsumerRuntime<S>) -> Duration {
    let longest_delay = rt.policy.schedule.iter().max().copied().unwrap_or_default();
    rt.config.ack_wait.max(longest_delay) + rt.config.ack_wait + GATE_MARGIN
}

/// A failed look-up of the stream or the consumer, as the consumer's error.
fn lookup_failed(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ConsumerError {
    ConsumerError::wrap(ConsumerErrorKind::Lookup, e)
}

/// What [`gate_deadline`] adds to the longest wait for a pending message.
const GATE_MARGIN: Duration = Duration::from_secs(5);

/// Makes sure the durable consumer exists, noting its ack floor; recreates it from the
/// config when it was deleted behind our back, resuming after the last ack floor noted.
/// Returns how many of its messages are pending (delivered and not yet acked), or `None`
/// when the worker stopped while waiting to recreate it.
async fn ensure_consumer<S>(rt: &ConsumerRuntime<S>) -> Result<Option<usize>, ConsumerError> {
    let stream = provision::get_stream(&rt.js, &rt.spec.stream)
        .await
        .map_err(lookup_failed)?
        .ok_or_else(|| {
            ConsumerError::new(ConsumerErrorKind::StreamMissing)
                .with_message(format!("stream {:?} does not exist", rt.spec.stream))
        })?;
    let info = provision::consumer_info(&stream, &rt.spec.name)
        .await
        .map_err(lookup_failed)?;
    let info = match info {
        Some(info) => info,
        None => match recreate_after_freshest_floor(rt, &stream).await? {
            Some(info) => info,
            None => return Ok(None),
        },
    };
    rt.stats.note_ack_floor(info.ack_floor.stream_sequence);
    Ok(Some(info.num_ack_pending))
}

/// The longest a replica defers recreating a missing consumer to replicas that read its
/// ack floor more recently: two lag polls, after which every replica whose poll works
/// has read it.
const RECREATE_DEFER_MAX: Duration = Duration::from_secs(2 * crate::ops::LAG_POLL.as_secs());

/// Recreates the consumer, which is missing, to resume after the last ack floor noted.
///
/// Every replica of a worker notes the floor (at its session start and each lag poll),
/// and whichever replica recreates the consumer first sets where it resumes. The floor
/// only grows, so the most recent reading is the highest: each replica first waits as
/// long as its own reading is old (at most [`RECREATE_DEFER_MAX`]), then looks again.
/// The replica that read the floor last comes first; one that never read a floor above
/// 0 (just started) does not recreate the consumer from its first message while another
/// knows better. `None` when the worker stops meanwhile.
async fn recreate_after_freshest_floor<S>(
    rt: &ConsumerRuntime<S>,
    stream: &async_nats::jetstream::stream::Stream,
) -> Result<Option<async_nats::jetstream::consumer::Info>, ConsumerError> {
    let defer = rt
        .stats
        .ack_floor_age()
        .map_or(RECREATE_DEFER_MAX, |age| age.min(RECREATE_DEFER_MAX));
    if !defer.is_zero() {
        tracing::info!(
            stream = %rt.spec.stream, consumer = %rt.spec.name,
            known_ack_floor = rt.stats.server_ack_floor.load(Ordering::Relaxed),
            wait = %humantime::format_duration(Duration::from_millis(defer.as_millis() as u64)),
            "consumer is missing; leaving its recreation to a replica that read its ack floor more recently, for as long as this one's reading is old"
        );
        tokio::select! {
            _ = rt.stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(defer) => {}
        }
        if let Some(info) = provision::consumer_info(stream, &rt.spec.name)
            .await
            .map_err(lookup_failed)?
        {
            return Ok(Some(info));
        }
    }
    // Resume after the last ack floor seen: what was acknowledged since it was read, and
    // what was in flight, is delivered again; nothing before it is.
    let floor = rt.stats.server_ack_floor.load(Ordering::Relaxed);
    tracing::warn!(
        stream = %rt.spec.stream, consumer = %rt.spec.name, resume_after = floor,
        "consumer is missing; recreating it from the config, resuming after its last known ack floor"
    );
    let info = provision::recreate_consumer(&rt.js, &rt.spec, Some(floor))
        .await
        .map_err(|e| ConsumerError::with_source(ConsumerErrorKind::Recreate, e))?;
    rt.stats.recreated.fetch_add(1, Ordering::Relaxed);
    Ok(Some(info))
}
