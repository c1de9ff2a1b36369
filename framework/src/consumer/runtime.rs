//! [`ConsumerRuntime`]: what one consumer's pull loop and its deliveries share.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{jetstream, Client};
use tokio_util::sync::CancellationToken;

use super::lanes::KeyOf;
use super::replies::ReplyQueue;
use super::stats::ConsumerStats;
use crate::batch::ErasedBatchHandler;
use crate::config::ConsumerConfig;
use crate::handler::ErasedHandler;
use crate::outcome::RetrySchedule;
use crate::provision::{ConsumerSpec, ServerVersion};

/// Everything one consumer's loop and its tasks share.
pub(crate) struct ConsumerRuntime<S> {
    pub config: ConsumerConfig,
    pub spec: ConsumerSpec,
    pub policy: RetrySchedule,
    pub handler: Arc<dyn ErasedHandler<S>>,
    /// The batch handler, for a consumer whose handler takes batches: then the pull
    /// loop hands its messages to `batch` instead of running `handler` on each.
    pub batch: Option<Arc<dyn ErasedBatchHandler<S>>>,
    pub state: Arc<S>,
    pub client: Client,
    /// Shared with every handler's [`Context`](crate::Context): one reference count per
    /// delivery.
    pub js: Arc<jetstream::Context>,
    pub server_version: ServerVersion,
    pub request_timeout: Duration,
    pub stats: Arc<ConsumerStats>,
    /// Cancelled at the first shutdown signal: stop pulling; handlers see it in `Context`.
    pub stop: CancellationToken,
    /// Cancelled when the grace period is over: abandon what still runs.
    pub hard_stop: CancellationToken,
    /// Where an ordered consumer (`ordered_by`) finds a message's key; `None` for the
    /// others.
    pub ordered_by: Option<KeyOf>,
    /// Acks and naks of deliveries in their own tasks, gathered to leave in one write.
    pub replies: ReplyQueue,
}

impl<S> ConsumerRuntime<S> {
    /// The same consumer for one term of a partition's ownership: `stop` ends the term
    /// (the worker stops, or the partition moves to another replica).
    pub(crate) fn for_term(&self, stop: CancellationToken) -> ConsumerRuntime<S> {
        ConsumerRuntime {
            config: self.config.clone(),
            spec: self.spec.clone(),
            policy: self.policy.clone(),
            handler: self.handler.clone(),
            batch: self.batch.clone(),
            state: self.state.clone(),
            client: self.client.clone(),
            js: self.js.clone(),
            server_version: self.server_version,
            request_timeout: self.request_timeout,
            stats: self.stats.clone(),
            stop,
            hard_stop: self.hard_stop.clone(),
            ordered_by: self.ordered_by.clone(),
            replies: ReplyQueue::default(),
        }
    }
}

impl<S> ConsumerRuntime<S> {
    /// Messages the consumer's handlers may hold at once: `concurrency` for a handler of
    /// one message, `concurrency` batches of `max_batch` for a batch handler.
    pub fn slots(&self) -> usize {
        let concurrency = self.config.concurrency_limit();
        match self.batch {
            Some(_) => concurrency.saturating_mul(self.config.batch_size_limit()),
            None => concurrency,
        }
    }
}
