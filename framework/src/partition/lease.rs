//! Who pulls a partition: leases in a key-value bucket whose `max_age` is the lease
//! (see the parent module for the rules). One [`run_partition`] task per partition
//! consumer and process takes the partition when it is free and within this replica's
//! share, runs the consumer for as long as it holds the lease, and gives it back at
//! shutdown or when its share shrinks; one [`LeaseGroup::keep_membership`] task per
//! bucket keeps this replica's member key and counts the live replicas.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use tokio::time::Instant;

use super::PartitionOf;
use crate::backoff::Backoff;
use crate::consumer::{self, ConsumerRuntime};

/// The prefix of member keys (`member-<replica id>`).
const MEMBER_PREFIX: &str = "member-";
/// How often a partition task looks whether the replicas were counted yet.
const COUNTED_POLL: Duration = Duration::from_millis(20);

/// This replica's view of one lease bucket: its id, how many of the bucket's partitions
/// it holds, and how many replicas are alive.
pub(crate) struct LeaseGroup {
    js: jetstream::Context,
    bucket: String,
    /// The partitions the bucket's consumer has.
    count: u32,
    /// The lease (the bucket's `max_age`).
    lease: Duration,
    /// This process, as the value of its leases and the name of its member key.
    replica: String,
    /// Partitions held (or being taken) by this replica.
    held: AtomicUsize,
    /// Live replicas, at least 1 (this one).
    members: AtomicUsize,
    /// Whether the live replicas were counted at least once.
    counted: AtomicBool,
}

impl LeaseGroup {
    /// The group of `of`'s bucket for this process (`replica` names it).
    pub(crate) fn new(js: jetstream::Context, of: &PartitionOf, replica: &str) -> LeaseGroup {
        LeaseGroup {
            js,
            bucket: of.bucket.clone(),
            count: of.count,
            lease: of.lease,
            replica: replica.to_owned(),
            held: AtomicUsize::new(0),
            members: AtomicUsize::new(1),
            counted: AtomicBool::new(false),
        }
    }

    /// Waits until the live replicas were counted once (a lease at most, or `stop`), so a
    /// replica that starts next to others does not take every partition and then give
    /// most of them back.
    async fn wait_counted(&self, stop: &tokio_util::sync::CancellationToken) {
        let deadline = Instant::now() + self.lease;
        while !self.counted.load(Ordering::Relaxed) && Instant::now() < deadline {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(COUNTED_POLL) => {}
            }
        }
    }

    /// A name for this process as a replica: its pid and a random part.
    pub(crate) fn replica_id() -> String {
        format!("{}-{:08x}", std::process::id(), rand::random::<u32>())
    }

    /// How often leases and the member key are renewed: a third of the lease.
    fn every(&self) -> Duration {
        self.lease / 3
    }

    /// This replica's share: the partitions divided by the live replicas, rounded up.
    fn share(&self) -> usize {
        let members = self.members.load(Ordering::Relaxed).max(1);
        (self.count as usize).div_ceil(members)
    }

    /// Counts one more partition held, if that stays within the share.
    fn reserve(&self) -> bool {
        let share = self.share();
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                (h < share).then_some(h + 1)
            })
            .is_ok()
    }

    /// Counts one partition less, if this replica holds more than its share: true when
    /// the caller is to give its partition back.
    fn shed(&self) -> bool {
        let share = self.share();
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                (h > share).then_some(h - 1)
            })
            .is_ok()
    }

    fn release_count(&self) {
        let _ = self
            .held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| h.checked_sub(1));
    }

    async fn store(&self) -> Option<kv::Store> {
        match tokio::time::timeout(self.every(), self.js.get_key_value(self.bucket.as_str())).await
        {
            Ok(Ok(store)) => Some(store),
            Ok(Err(e)) => {
                tracing::warn!(bucket = %self.bucket, error = %e, "lease bucket unavailable");
                None
            }
            Err(_) => None,
        }
    }

    /// Until `stop`: keeps this replica's member key alive and counts the live
    /// replicas; deletes the key at the end.
    pub(crate) async fn keep_membership(
        self: Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let key = format!("{MEMBER_PREFIX}{}", self.replica);
        let mut ticks = tokio::time::interval(self.every());
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut store = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            if store.is_none() {
                store = self.store().await;
            }
            let Some(kv) = &store else { continue };
            let renewed =
                tokio::time::timeout(self.every(), kv.put(&key, self.replica.clone().into())).await;
            if !matches!(renewed, Ok(Ok(_))) {
                tracing::debug!(bucket = %self.bucket, "member key not renewed");
                continue;
            }
            if let Ok(Ok(members)) = tokio::time::timeout(self.every(), count_members(kv)).await {
                let before = self.members.swap(members.max(1), Ordering::Relaxed);
                self.counted.store(true, Ordering::Relaxed);
                if before != members.max(1) {
                    tracing::info!(bucket = %self.bucket, replicas = members, share = self.share(), "replicas of a partitioned consumer changed");
                }
            }
        }
        if let Some(kv) = &store {
            let _ = tokio::time::timeout(self.every(), kv.delete(&key)).await;
        }
    }
}

/// The live member keys of a bucket.
async fn count_members(kv: &kv::Store) -> Result<usize, kv::HistoryError> {
    let mut keys = kv.keys().await?;
    let mut members = 0;
    while let Some(key) = keys.next().await {
        if key.is_ok_and(|k| k.starts_with(MEMBER_PREFIX)) {
            members += 1;
        }
    }
    Ok(members)
}

/// How a term of ownership ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TermEnd {
    /// The worker stops.
    Stopped,
    /// The lease could not be renewed in time: another replica may hold it now.
    Lost,
    /// This replica holds more than its share: it gives the partition back.
    GivenBack,
}

/// Runs the partition consumer `rt` whenever this replica holds the lease of `of`, until
/// the worker stops.
pub(crate) async fn run_partition<S: Send + Sync + 'static>(
    rt: Arc<ConsumerRuntime<S>>,
    of: PartitionOf,
    group: Arc<LeaseGroup>,
) {
    let key = of.key();
    let mut retry = Backoff::new(group.every(), group.every());
    let mut store = None;
    // Whether this stand-by (since the last term, or the start) was logged.
    let mut standby_logged = false;
    rt.stats.set_standby(true);
    group.wait_counted(&rt.stop).await;
    while !rt.stop.is_cancelled() {
        // Alive, and not pulling on purpose until the partition is taken.
        rt.stats.tick();
        rt.stats.set_standby(true);
        if store.is_none() {
            store = group.store().await;
        }
        let taken = match &store {
            Some(kv) if group.reserve() => {
                match tokio::time::timeout(
                    group.every(),
                    kv.create(&key, group.replica.clone().into()),
                )
                .await
                {
                    Ok(Ok(revision)) => Some(revision),
                    _ => {
                        group.release_count();
                        None
                    }
                }
            }
            _ => None,
        };
        let (Some(kv), Some(revision)) = (store.clone(), taken) else {
            if !standby_logged {
                if let Some(kv) = &store {
                    log_standby(&rt, kv, &key, &of, &group).await;
                    standby_logged = true;
                }
            }
            // Held elsewhere, or beyond our share: look again soon (jittered, so
            // replicas do not race in step).
            tokio::select! {
                _ = rt.stop.cancelled() => return,
                _ = tokio::time::sleep(retry.next()) => continue,
            }
        };
        if of.count == 1 {
            tracing::info!(
                stream = %rt.spec.stream, consumer = %rt.spec.name, replica = %group.replica,
                "lease taken: this replica pulls the ordered consumer; the others stand by"
            );
        } else {
            tracing::info!(
                stream = %rt.spec.stream, consumer = %rt.spec.name, partition = of.index,
                replica = %group.replica, "partition taken"
            );
        }
        rt.stats.set_standby(false);
        standby_logged = false;
        let end = own(&rt, &kv, &key, revision, &group).await;
        tracing::info!(
            stream = %rt.spec.stream, consumer = %rt.spec.name, partition = of.index,
            replica = %group.replica, end = ?end, "partition no longer pulled here"
        );
        if end == TermEnd::GivenBack {
            // Leave it to the replica whose share it is now, for a lease at least.
            tokio::select! {
                _ = rt.stop.cancelled() => return,
                _ = tokio::time::sleep(group.lease) => {}
            }
        }
    }
}

/// Logs once that this replica stands by for the lease `key` of `of`: held by another
/// replica (named), or free but beyond this replica's share.
async fn log_standby<S>(
    rt: &ConsumerRuntime<S>,
    kv: &kv::Store,
    key: &str,
    of: &PartitionOf,
    group: &LeaseGroup,
) {
    let holder = match tokio::time::timeout(group.every(), kv.get(key)).await {
        Ok(Ok(Some(value))) => String::from_utf8_lossy(&value).into_owned(),
        _ => "none (beyond this replica's share)".to_owned(),
    };
    if of.count == 1 {
        tracing::info!(
            stream = %rt.spec.stream, consumer = %rt.spec.name, held_by = %holder,
            replica = %group.replica,
            "standing by: another replica pulls this ordered consumer (one at a time keeps the order of its keys); taking over when it stops; use partitions to spread it over replicas"
        );
    } else {
        tracing::info!(
            stream = %rt.spec.stream, consumer = %rt.spec.name, partition = of.index,
            held_by = %holder, replica = %group.replica,
            "standing by for a partition another replica pulls"
        );
    }
}

/// One term of ownership: runs the consumer while renewing the lease (from `revision`),
/// until the worker stops, the lease is lost or the partition is given back; the
/// consumer's handlers have finished when it returns. Deletes the lease unless lost.
async fn own<S: Send + Sync + 'static>(
    rt: &Arc<ConsumerRuntime<S>>,
    kv: &kv::Store,
    key: &str,
    mut revision: u64,
    group: &LeaseGroup,
) -> TermEnd {
    let term = rt.stop.child_token();
    let consumer = consumer::run(Arc::new(rt.for_term(term.clone())));
    tokio::pin!(consumer);
    let every = group.every();
    let mut renewed_at = Instant::now();
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut end = TermEnd::Stopped;
    loop {
        tokio::select! {
            _ = &mut consumer => break,
            _ = ticks.tick() => {}
        }
        if end == TermEnd::Lost {
            continue;
        }
        // Renewed while the consumer winds down too: its handlers still run.
        match tokio::time::timeout(
            every,
            kv.update(key, group.replica.clone().into(), revision),
        )
        .await
        {
            Ok(Ok(next)) => {
                revision = next;
                renewed_at = Instant::now();
            }
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                tracing::error!(consumer = %rt.spec.name, key, "the partition's lease was taken by another replica; stopping at once");
                end = TermEnd::Lost;
                term.cancel();
                continue;
            }
            _ => tracing::warn!(consumer = %rt.spec.name, key, "partition lease not renewed"),
        }
        if renewed_at.elapsed() > group.lease * 2 / 3 {
            tracing::error!(consumer = %rt.spec.name, key, "the partition's lease could not be renewed in time; stopping");
            end = TermEnd::Lost;
            term.cancel();
        } else if end == TermEnd::Stopped && !term.is_cancelled() && group.shed() {
            end = TermEnd::GivenBack;
            term.cancel();
        }
    }
    if end != TermEnd::GivenBack {
        // `shed` already counted a given-back partition.
        group.release_count();
    }
    if end != TermEnd::Lost {
        let _ = tokio::time::timeout(every, kv.delete_expect_revision(key, Some(revision))).await;
    }
    end
}
