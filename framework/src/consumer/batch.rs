//! A batch consumer at work: the messages the pull loop starts are collected into
//! batches ([`Batches`]), and each batch runs its handler once and then settles every
//! message on its own, through the same decision and settle path as a single delivery.
//!
//! - Collecting: a batch runs when it holds `max_batch` messages, when the next message
//!   would take it past `max_batch_bytes`, when its first message has waited
//!   `max_batch_wait`, or at once when the worker stops. At most `concurrency` batches
//!   run at once; a batch waiting for its turn gets progress acks.
//! - Running ([`run_batch`]): size check and decode per message (what fails never reaches
//!   the batch and is settled first: dead-lettered as `too_large` / `decode`), then the
//!   handler with its timeout, panics caught and progress acks for every message while it
//!   runs; then each message is decided ([`decide`]) from what the handler said about it
//!   (its [`BatchFailures`](crate::BatchFailures) entry, or the batch's `Err`, panic or
//!   timeout) and settled. When the grace period ends first, every message is handed back.
//!
//! [`stage`] and [`batch_attempts`] are shared with the test harness.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::HeaderMap;
use futures::FutureExt;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::delivery::{
    attempted_from_error, check_size, panic_message, progress_interval, receive, send_or_note,
    settle, supervise, Delivery, Gather, Supervised,
};
use super::pull::release;
use super::runtime::ConsumerRuntime;
use crate::batch::{BatchContext, BatchFuture, BatchResult, ErasedBatchHandler, Incoming};
use crate::config::ConsumerConfig;
use crate::outcome::{decide, Attempted, Outcome};

/// A message the pull loop started, with the handler slot it holds until it is settled.
struct Collected {
    message: async_nats::Message,
    permit: OwnedSemaphorePermit,
}

/// Where the pull loop hands a batch consumer's messages (see [`Batches::add`]); the
/// collecting task ends, running what it holds, once this is dropped.
pub(super) struct Batches {
    sender: mpsc::UnboundedSender<Collected>,
}

impl Batches {
    /// For a consumer with a batch handler: starts the task that collects its batches
    /// (tracked by `tasks`, as are the batches it runs; each finished batch notifies
    /// `done`). `None` for a consumer whose handler takes one message.
    pub(super) fn start<S: Send + Sync + 'static>(
        rt: &Arc<ConsumerRuntime<S>>,
        done: &Arc<Notify>,
        tasks: &TaskTracker,
    ) -> Option<Batches> {
        let handler = rt.batch.clone()?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let collector = Collector {
            rt: rt.clone(),
            handler,
            done: done.clone(),
            tasks: tasks.clone(),
            turns: Arc::new(Semaphore::new(rt.config.concurrency_limit())),
        };
        tasks.spawn(collector.run(receiver));
        Some(Batches { sender })
    }

    /// Adds a started message (holding its slot) to the batch being collected. The
    /// channel is unbounded, but what is in it holds slots: the pull loop's bound applies.
    pub(super) fn add<S>(
        &self,
        rt: &ConsumerRuntime<S>,
        permit: OwnedSemaphorePermit,
        message: async_nats::Message,
    ) {
        if self.sender.send(Collected { message, permit }).is_err() {
            // Only when the collecting task is gone (it panicked): the message is not
            // settled here and comes back after its ack wait.
            rt.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            tracing::error!(consumer = %rt.spec.name, "batch collector gone; the message is redelivered after its ack wait");
        }
    }
}

/// The task that collects batches and starts them.
struct Collector<S> {
    rt: Arc<ConsumerRuntime<S>>,
    handler: Arc<dyn ErasedBatchHandler<S>>,
    done: Arc<Notify>,
    tasks: TaskTracker,
    /// One permit per batch that may run at once (`concurrency`).
    turns: Arc<Semaphore>,
}

/// The batch being collected.
#[derive(Default)]
struct Pending {
    messages: Vec<Collected>,
    bytes: usize,
    /// When its first message arrived.
    since: Option<Instant>,
}

impl Pending {
    fn push(&mut self, collected: Collected) {
        self.bytes += collected.message.length;
        self.since.get_or_insert_with(Instant::now);
        self.messages.push(collected);
    }

    fn take(&mut self) -> Vec<Collected> {
        self.bytes = 0;
        self.since = None;
        std::mem::take(&mut self.messages)
    }
}

impl<S: Send + Sync + 'static> Collector<S> {
    async fn run(self, mut receiver: mpsc::UnboundedReceiver<Collected>) {
        let (max_messages, max_bytes) = (
            self.rt.config.batch_size_limit(),
            self.rt.config.batch_bytes_limit(),
        );
        let wait = self.rt.config.batch_wait();
        let mut pending = Pending::default();
        loop {
            let due = pending
                .since
                .map_or_else(Instant::now, |since| since + wait);
            tokio::select! {
                biased;
                received = receiver.recv() => {
                    let Some(first) = received else {
                        if !pending.messages.is_empty() {
                            self.dispatch(pending.take());
                        }
                        return;
                    };
                    // This one and what is already queued, up to a full batch.
                    let mut next = Some(first);
                    while let Some(collected) = next.take() {
                        let len = collected.message.length;
                        if !pending.messages.is_empty() && pending.bytes + len > max_bytes {
                            self.dispatch(pending.take());
                        }
                        pending.push(collected);
                        if pending.messages.len() >= max_messages || pending.bytes >= max_bytes {
                            self.dispatch(pending.take());
                            break;
                        }
                        next = receiver.try_recv().ok();
                    }
                }
                _ = tokio::time::sleep_until(due), if !pending.messages.is_empty() => {
                    self.dispatch(pending.take());
                }
                // At shutdown nothing more comes to fill it: run it now.
                _ = self.rt.stop.cancelled(), if !pending.messages.is_empty() => {
                    self.dispatch(pending.take());
                }
            }
        }
    }

    /// Starts a batch as its own task, which runs once one of the `concurrency` turns is
    /// free (in the order batches were collected), keeping its messages with progress
    /// acks meanwhile, and hands them back if the grace period ends first. The collector
    /// goes on collecting: no message waits anywhere without its ack timer looked after.
    fn dispatch(&self, messages: Vec<Collected>) {
        let (rt, handler, done) = (self.rt.clone(), self.handler.clone(), self.done.clone());
        let turns = self.turns.clone();
        self.tasks.spawn(async move {
            let Some(turn) = wait_for_turn(&rt, turns, &messages).await else {
                return hand_back(&rt, messages.into_iter().map(|c| c.message)).await;
            };
            let size = messages.len();
            let span = tracing::info_span!("batch", stream = %rt.spec.stream, consumer = %rt.spec.name, size);
            let (messages, permits): (Vec<_>, Vec<_>) =
                messages.into_iter().map(|c| (c.message, c.permit)).unzip();
            run_batch(&rt, handler.as_ref(), messages)
                .instrument(span)
                .await;
            rt.stats.in_flight.fetch_sub(size, Ordering::Relaxed);
            drop(permits);
            drop(turn);
            done.notify_one();
        });
    }
}

/// Waits for a turn to run a batch, sending its messages progress acks twice per ack
/// wait meanwhile; `None` when the grace period ends first.
async fn wait_for_turn<S>(
    rt: &ConsumerRuntime<S>,
    turns: Arc<Semaphore>,
    messages: &[Collected],
) -> Option<OwnedSemaphorePermit> {
    let every = progress_interval(&rt.config);
    let acquired = turns.acquire_owned();
    tokio::pin!(acquired);
    loop {
        tokio::select! {
            biased;
            // Never closed: an error would mean nothing can run the batch.
            turn = &mut acquired => return turn.ok(),
            _ = tokio::time::sleep(every) => {
                for collected in messages {
                    if let Some(reply) = &collected.message.reply {
                        send_or_note(rt, reply, AckKind::Progress, None).await;
                    }
                }
            }
            _ = rt.hard_stop.cancelled() => return None,
        }
    }
}

/// Hands back messages that never ran (see `pull::release`).
async fn hand_back<S>(
    rt: &ConsumerRuntime<S>,
    messages: impl Iterator<Item = async_nats::Message>,
) {
    let mut count = 0;
    for message in messages {
        count += 1;
        release(rt, message).await;
    }
    rt.stats.in_flight.fetch_sub(count, Ordering::Relaxed);
}

/// A batch handler's future with panics caught.
pub(crate) type GuardedBatch = futures::future::CatchUnwind<AssertUnwindSafe<BatchFuture>>;

/// How a batch handler run ended.
pub(crate) enum BatchRan {
    /// It returned (or panicked).
    Finished(Result<BatchResult, Box<dyn std::any::Any + Send>>),
    /// It ran past the handler timeout and was cancelled.
    TimedOut(Duration),
}

/// A batch after the size check and decode, the same for the runtime and the test
/// harness.
pub(crate) struct Staged {
    /// For each incoming message, why it cannot run (`None`: it is in the batch).
    pub rejected: Vec<Option<Attempted>>,
    /// For each message of the batch, its index among the incoming messages.
    pub accepted: Vec<usize>,
    /// The handler's future over the batch (panics caught); `None` when no message is
    /// left to run.
    pub future: Option<GuardedBatch>,
}

/// Size check and decode of every incoming message (`(payload, headers)` with the rest
/// of what [`Incoming`] carries), then the handler's future over those that passed.
pub(crate) fn stage<S>(
    handler: &dyn ErasedBatchHandler<S>,
    incoming: Vec<Incoming<'_>>,
    config: &ConsumerConfig,
    ctx: BatchContext<S>,
) -> Staged {
    let mut rejected: Vec<Option<Attempted>> = Vec::with_capacity(incoming.len());
    let mut sized = Vec::with_capacity(incoming.len());
    let mut sized_at = Vec::with_capacity(incoming.len());
    for (at, message) in incoming.into_iter().enumerate() {
        match check_size(message.payload, &message.headers, config) {
            Ok(()) => {
                rejected.push(None);
                sized.push(message);
                sized_at.push(at);
            }
            Err(too_large) => rejected.push(Some(too_large)),
        }
    }
    if sized.is_empty() {
        return Staged {
            rejected,
            accepted: Vec::new(),
            future: None,
        };
    }
    // A handler that is not an `async fn` runs code before its future exists: a panic
    // there fails the batch as a panic, it does not unwind through the collector.
    let prepared = std::panic::catch_unwind(AssertUnwindSafe(|| {
        handler.prepare(sized, config.codec, ctx)
    }));
    match prepared {
        Ok(prepared) => {
            for (index, attempted) in prepared.rejected {
                if let Some(slot) = sized_at.get(index).and_then(|at| rejected.get_mut(*at)) {
                    *slot = Some(attempted);
                }
            }
            let accepted = prepared
                .accepted
                .iter()
                .filter_map(|index| sized_at.get(*index).copied())
                .collect();
            Staged {
                rejected,
                accepted,
                future: prepared
                    .future
                    .map(|future| AssertUnwindSafe(future).catch_unwind()),
            }
        }
        Err(panic) => {
            let text = panic_message(&panic);
            for at in sized_at {
                if let Some(slot) = rejected.get_mut(at) {
                    *slot = Some(Attempted::Panicked(text.clone()));
                }
            }
            Staged {
                rejected,
                accepted: Vec::new(),
                future: None,
            }
        }
    }
}

/// What a batch run means for each of its `size` messages, in batch order: the failure
/// the handler marked for it, or success; the batch's error, panic or timeout for all.
pub(crate) fn batch_attempts(ran: BatchRan, size: usize) -> Vec<Attempted> {
    let all = |attempted: Attempted| vec![attempted; size];
    match ran {
        Ran::Finished(Ok(Ok(failures))) => {
            let mut attempts = vec![Attempted::Succeeded; size];
            for (index, error) in failures.into_indexed() {
                if let Some(slot) = attempts.get_mut(index) {
                    *slot = attempted_from_error(&error);
                }
            }
            attempts
        }
        Ran::Finished(Ok(Err(error))) => all(attempted_from_error(&error)),
        Ran::Finished(Err(panic)) => all(Attempted::Panicked(panic_message(&panic))),
        Ran::TimedOut(after) => all(Attempted::TimedOut(after)),
    }
}

use BatchRan as Ran;

/// One batch, from decode to every message settled (or handed back at the end of the
/// grace period).
async fn run_batch<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    handler: &dyn ErasedBatchHandler<S>,
    messages: Vec<async_nats::Message>,
) {
    let started = std::time::Instant::now();
    let deliveries: Vec<Delivery> = messages
        .into_iter()
        .filter_map(|message| receive(rt, message))
        .collect();
    let ctx = BatchContext::for_runtime(
        rt.state.clone(),
        &rt.spec.stream,
        &rt.spec.name,
        rt.stop.clone(),
        rt.js.clone(),
    );
    let incoming = deliveries
        .iter()
        .map(|d| Incoming {
            payload: &d.message.payload,
            subject: d.message.subject.clone(),
            headers: d.message.headers.clone().unwrap_or_else(HeaderMap::new),
            stream_sequence: d.sequence,
            attempt: d.attempt,
            max_deliver: rt.policy.max_deliver,
        })
        .collect();
    let staged = stage(handler, incoming, &rt.config, ctx);
    // What never reaches the batch is settled first: its ack wait runs meanwhile.
    let rejected = staged
        .rejected
        .iter()
        .zip(&deliveries)
        .filter_map(|(attempted, delivery)| Some((delivery, attempted.as_ref()?)));
    settle_each(rt, rejected).await;
    let Some(future) = staged.future else {
        return;
    };
    let accepted: Vec<&Delivery> = staged
        .accepted
        .iter()
        .filter_map(|at| deliveries.get(*at))
        .collect();
    let ran = run_guarded(rt, future, &accepted, started).await;
    let took = started.elapsed();
    rt.stats.handler_micros.fetch_add(
        u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    rt.stats.handler_seconds.observe(took.as_secs_f64());
    let Some(ran) = ran else {
        tracing::warn!(
            stream = %rt.spec.stream, consumer = %rt.spec.name, size = accepted.len(),
            "shutdown grace over: handing the batch back"
        );
        for delivery in &accepted {
            send_or_note(
                rt,
                &delivery.reply,
                AckKind::Nak(None),
                Some(delivery.sequence),
            )
            .await;
        }
        return;
    };
    match &ran {
        Ran::Finished(Err(_)) => rt.stats.panics.fetch_add(1, Ordering::Relaxed),
        Ran::TimedOut(_) => rt.stats.timeouts.fetch_add(1, Ordering::Relaxed),
        Ran::Finished(Ok(_)) => 0,
    };
    let attempts = batch_attempts(ran, accepted.len());
    settle_each(rt, accepted.iter().copied().zip(&attempts)).await;
}

/// Decides and settles each delivery: acks and naks one after the other (each is a
/// publish queued on the connection), dead letters concurrently, so those of one batch
/// wait for their PubAcks together.
async fn settle_each<'a, S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    deliveries: impl Iterator<Item = (&'a Delivery, &'a Attempted)>,
) {
    let mut dead_letters = Vec::new();
    for (delivery, attempted) in deliveries {
        match decide(attempted, delivery.attempt, &rt.policy) {
            outcome @ Outcome::DeadLetter { .. } => {
                dead_letters.push(settle(rt, delivery, attempted, outcome, Gather::No));
            }
            // Batch consumers are never ordered (refused by `App::check`): what comes
            // back from the server needs no lane.
            outcome => {
                settle(rt, delivery, attempted, outcome, Gather::No).await;
            }
        }
    }
    if !dead_letters.is_empty() {
        futures::future::join_all(dead_letters).await;
    }
}

/// Runs the batch's future from `started` (see [`supervise`]): every message of the
/// batch gets the progress acks. `None` when the grace period ended first.
async fn run_guarded<S>(
    rt: &ConsumerRuntime<S>,
    future: GuardedBatch,
    accepted: &[&Delivery],
    started: std::time::Instant,
) -> Option<BatchRan> {
    match supervise(rt, future, accepted, started).await {
        Supervised::Finished(result) => Some(Ran::Finished(result)),
        Supervised::TimedOut => Some(Ran::TimedOut(rt.config.handler_timeout)),
        Supervised::Abandoned => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchFailures;
    use crate::handler::HandlerError;

    #[test]
    fn batch_attempts_as_a_table() {
        let mut failures = BatchFailures::new();
        let batch = crate::batch::Batch::new([
            crate::batch::BatchMessage::new((), "s", 1),
            crate::batch::BatchMessage::new((), "s", 1),
            crate::batch::BatchMessage::new((), "s", 1),
        ]);
        failures.fail(&batch.messages()[1], HandlerError::permanent("bad"));
        failures.fail(
            &batch.messages()[2],
            HandlerError::retry_after(Duration::from_secs(4), "later"),
        );
        assert_eq!(
            batch_attempts(Ran::Finished(Ok(Ok(failures))), 3),
            vec![
                Attempted::Succeeded,
                Attempted::Permanent("bad".into()),
                Attempted::RetryAfter(Duration::from_secs(4), "later".into()),
            ]
        );
        assert_eq!(
            batch_attempts(Ran::Finished(Ok(Err("down".into()))), 2),
            vec![Attempted::Transient("down".into()); 2]
        );
        assert_eq!(
            batch_attempts(Ran::Finished(Err(Box::new("boom"))), 2),
            vec![Attempted::Panicked("boom".into()); 2]
        );
        assert_eq!(
            batch_attempts(Ran::TimedOut(Duration::from_secs(1)), 1),
            vec![Attempted::TimedOut(Duration::from_secs(1))]
        );
    }
}
