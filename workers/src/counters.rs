//! Exactly-once counting of batches, one compare-and-set per partition record.
//!
//! Messages arrive at least once: a batch can fail or its worker crash (kill -9) at any
//! point and its messages run again, on this replica or another, in other batches; the
//! same event can be stored twice under two message ids and run on two replicas at the
//! same time; the server can restart between any two requests. KV offers one atomic
//! operation that helps — compare-and-set of one key (`update(key, value, revision)`,
//! failing when the key changed) — and no transaction across keys.
//!
//! # Partition records
//! Events are split into *partitions* (one consumer's kind × a shard of the users, see
//! [`crate::keys`]). All the counts of a partition live in **one** KV record, a
//! [`Ledger`]: its counters ([`Tally`]) **and** `counted`, the ids of the events those
//! counters include, each with the stream sequence of the message that counted it. An
//! event's partition follows from the event alone (its kind and user), so every copy of
//! an event — a redelivery, a republish under a new message id — meets the same ledger.
//!
//! # The protocol, for the events of one batch in one partition ([`commit`])
//! 1. Read the ledger (value `v`, revision `r`; an absent key is empty at revision 0).
//! 2. Fold into `v` every event whose id is not in `v.counted` (nor earlier in the same
//!    batch), adding its id to `counted`; prune `counted` (below).
//! 3. Nothing new: done, nothing is written. Else `update(ledger, v', r)`; on a revision
//!    conflict (another batch, replica or retry wrote it) go back to 1.
//!
//! The batch's messages are acked only after their partition's commit returned. What
//! is derived from the ledger afterwards — active users per minute (a set union, which
//! is idempotent) and flags (created once) — is redone by every delivery, duplicates
//! included, so a crash between the commit and the ack repairs it on the redelivery.
//!
//! # Why nothing is counted twice
//! An event is added to the counters only in a write that also adds its id to
//! `counted`, and that write succeeds only at the revision it was computed from, where
//! the id was absent. After it, the id stays in `counted` as long as a copy of the
//! event can still be delivered (pruning, below), so every later run — a redelivery, the
//! other replica, the copy under a new message id — reads it there and skips the event.
//! Two runs racing on one ledger both compute from revision `r`; only one write can
//! succeed at `r`, the other conflicts, re-reads and finds the id.
//!
//! # Why nothing is lost
//! Counters only grow and a write replaces the ledger with one computed from the
//! current revision, so concurrent batches never overwrite each other's counts (a
//! conflict re-reads and retries). A message is acked only after its event is in the
//! ledger (this run wrote it, or it was there already). A crash, a timeout or a reply
//! lost with the server's restart leaves the message unacked: it is redelivered, and
//! the next read shows whether the write happened — if so the event is skipped, if not it
//! is counted now.
//!
//! # Pruning `counted`: the dedup window
//! `counted` cannot keep every id for ever (at 50,000 events a second that is millions
//! a minute, and the ledger is rewritten on every commit). An id is dropped once its
//! sequence `s` satisfies `s + window <= floor`, where `floor` is the consumer's **ack
//! floor** (every message of the consumer at or below it is acked, so never delivered
//! again) read from the server at most once a second, and `window` is
//! [`DEFAULT_DEDUP_WINDOW`] stream messages. Hence:
//! - a redelivery (sequence `s`, unacked, so `s > floor`) always finds its id: the id's
//!   entry, with sequence `s`, has `s + window > floor`;
//! - a copy under a new message id stored at sequence `t` with `|t - s| <= window` finds
//!   it too: while the copy is unacked, `floor < t <= s + window`. The publisher's
//!   duplicates are of its last 256 events; the stream itself drops same-id republishes
//!   within its `duplicate_window` (2 minutes). A copy stored more than `window` messages
//!   after the original counts again: the one case this design does not cover.
//!
//! A stale floor is lower than the real one, which only keeps more ids. The floor comes
//! from the consumer named in the batch's context; without one (tests outside the
//! runtime) nothing is pruned. Each kind's ledgers are written by that kind's consumer
//! alone (`streams.toml`): a second consumer counting the same events into them (a replay
//! under another name) would need its own floor to be no further ahead, or its own bucket.
//!
//! # Costs and limits
//! One read and one write per partition per batch (a batch of 4,000 clicks: 16 writes),
//! whatever the batch size, instead of five round trips per record per event. A ledger
//! holds the ids of at most about `window / shards` events plus what is in flight, and
//! its counters ([`Tally::compact`] bounds those). Reads must be linearizable: true on
//! R1 buckets; on replicated buckets whose gets are served by followers
//! (`allow_direct`), a stale read is caught by the compare-and-set (its revision is old)
//! and retried, so it costs a conflict, not a double count.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::keys;

/// Stream messages within which a copy of an event under a new message id is still
/// recognised (see the module docs, "Pruning").
pub const DEFAULT_DEDUP_WINDOW: u64 = 20_000;

/// Revision conflicts tolerated on one ledger before giving up (the messages are
/// retried later, on the consumer's schedule).
pub const MAX_CONFLICTS: u32 = 400;

/// Longest pause between compare-and-set attempts after conflicts.
const MAX_PAUSE_MS: u64 = 20;

/// Compare-and-set conflicts in this process (a contention metric).
static CONFLICTS: AtomicU64 = AtomicU64::new(0);
/// Compare-and-set writes that succeeded in this process.
static WRITES: AtomicU64 = AtomicU64::new(0);

/// Compare-and-set (writes, conflicts) so far in this process: how contended the
/// records are (a conflict costs a read and a retry).
pub fn contention() -> (u64, u64) {
    (
        WRITES.load(Ordering::Relaxed),
        CONFLICTS.load(Ordering::Relaxed),
    )
}

/// Counters that events are folded into.
pub trait Tally: Default + Serialize + DeserializeOwned + Send + Sync {
    /// What one event adds.
    type Item: Send + Sync;
    /// Adds one event (called once per event id, see the module docs).
    fn add(&mut self, item: &Self::Item);
    /// Bounds the counters' size before a write (drops detail nobody reads any more);
    /// the default keeps everything.
    fn compact(&mut self) {}
}

/// A partition's record: its counters and the events they include.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger<T> {
    /// Event id -> stream sequence of the message that counted it, pruned as the module
    /// docs say.
    #[serde(default)]
    pub counted: BTreeMap<String, u64>,
    /// The counters (not flattened: serde's flatten cannot read maps with number keys).
    #[serde(default)]
    pub tally: T,
}

impl<T: Tally> Ledger<T> {
    /// Folds in every entry not counted yet; returns how many were new.
    pub fn fold(&mut self, entries: &[Entry<'_, T::Item>]) -> usize {
        let mut added = 0;
        for entry in entries {
            if self.counted.contains_key(entry.id) {
                continue;
            }
            self.counted.insert(entry.id.to_string(), entry.sequence);
            self.tally.add(entry.item);
            added += 1;
        }
        added
    }

    /// Drops the ids no copy can still be delivered for: sequence `s` with
    /// `s + window <= floor` (see the module docs).
    pub fn prune(&mut self, floor: u64, window: u64) {
        self.counted
            .retain(|_, sequence| sequence.saturating_add(window) > floor);
    }

    fn to_bytes(&self) -> Result<Bytes, CounterError> {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .map_err(|e| CounterError::new(CounterErrorKind::Corrupt, e.to_string()))
    }
}

/// One event to count: its id, the stream sequence of its message, what it adds.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a, I> {
    /// The event id (what `counted` holds).
    pub id: &'a str,
    /// The stream sequence of the message carrying it.
    pub sequence: u64,
    /// What it adds.
    pub item: &'a I,
}

/// How a [`commit`] prunes: the consumer's ack floor and the dedup window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruning {
    /// Every message of the consumer at or below this stream sequence is acked (0:
    /// unknown, nothing is pruned).
    pub floor: u64,
    /// Stream messages a copy of an event is recognised within.
    pub window: u64,
}

/// What [`commit`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed<T> {
    /// Entries this run counted (the others were counted before).
    pub added: usize,
    /// The ledger as stored after the commit (or as read, when nothing was new).
    pub ledger: Ledger<T>,
}

/// Where a fault can be injected (tests use it to simulate a crash at every step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The new ledger is computed, not written.
    Folded,
    /// The ledger is written; nothing after it happened (the ack is lost).
    Committed,
    /// The active-user records are merged; the flags are not checked yet.
    ActiveMerged,
}

/// A fault injection hook: returns true to fail the run at this point (as if the worker
/// crashed there; the messages are retried). For tests and chaos drills.
pub trait Faults: Send + Sync {
    /// Whether to fail at `step` of the commit to `ledger` whose first event is
    /// `first_id`.
    fn fail_at(&self, ledger: &str, first_id: &str, step: Step) -> bool;
}

/// What kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterErrorKind {
    /// A KV request failed (timeout, no responders, ...): retry later.
    Kv,
    /// Too many compare-and-set conflicts in a row: retry later.
    Contention,
    /// A record does not hold what its key says.
    Corrupt,
    /// A fault injected by a [`Faults`] hook.
    Injected,
}

/// A counter operation that did not complete. Every kind is safe to retry.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CounterError {
    kind: CounterErrorKind,
    message: String,
}

impl CounterError {
    pub(crate) fn new(kind: CounterErrorKind, message: impl Into<String>) -> Self {
        CounterError {
            kind,
            message: message.into(),
        }
    }

    /// The kind, to match on.
    pub fn kind(&self) -> CounterErrorKind {
        self.kind
    }
}

fn kv_error(what: &str, key: &str, e: impl std::fmt::Display) -> CounterError {
    CounterError::new(CounterErrorKind::Kv, format!("{what} {key}: {e}"))
}

/// Fails with [`CounterErrorKind::Injected`] when `faults` asks to.
pub fn inject(
    faults: Option<&dyn Faults>,
    ledger: &str,
    first_id: &str,
    step: Step,
) -> Result<(), CounterError> {
    match faults {
        Some(f) if f.fail_at(ledger, first_id, step) => Err(CounterError::new(
            CounterErrorKind::Injected,
            format!("injected fault at {step:?} of {ledger}"),
        )),
        _ => Ok(()),
    }
}

/// Reads a JSON record: its value and revision (`None` when the key does not exist; a
/// deleted key reads as the default value at its revision).
pub async fn read_json<T: DeserializeOwned + Default>(
    kv: &kv::Store,
    key: &str,
) -> Result<Option<(T, u64)>, CounterError> {
    let entry = kv
        .entry(key)
        .await
        .map_err(|e| kv_error("reading", key, e))?;
    match entry {
        None => Ok(None),
        Some(entry) if entry.operation != Operation::Put => {
            Ok(Some((T::default(), entry.revision)))
        }
        Some(entry) => {
            let value: T = serde_json::from_slice(&entry.value).map_err(|e| {
                CounterError::new(
                    CounterErrorKind::Corrupt,
                    format!("{key} does not hold what its key says: {e}"),
                )
            })?;
            Ok(Some((value, entry.revision)))
        }
    }
}

/// Creates `key` unless it exists; true when this call created it.
pub async fn create_once(kv: &kv::Store, key: &str, value: Bytes) -> Result<bool, CounterError> {
    match kv.create(key, value).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(kv_error("creating", key, e)),
    }
}

/// Compare-and-set; `Ok(None)` on a revision conflict. Revision 0 means "must not exist".
pub async fn compare_and_set(
    kv: &kv::Store,
    key: &str,
    value: Bytes,
    revision: u64,
) -> Result<Option<u64>, CounterError> {
    match kv.update(key, value, revision).await {
        Ok(revision) => {
            WRITES.fetch_add(1, Ordering::Relaxed);
            Ok(Some(revision))
        }
        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
            CONFLICTS.fetch_add(1, Ordering::Relaxed);
            Ok(None)
        }
        Err(e) => Err(kv_error("updating", key, e)),
    }
}

/// Counts `entries` into the ledger at `key` exactly once per event id; see the module
/// docs for the protocol and why it holds. `entries` must not be empty.
pub async fn commit<T: Tally>(
    kv: &kv::Store,
    key: &str,
    entries: &[Entry<'_, T::Item>],
    pruning: Pruning,
    faults: Option<&dyn Faults>,
) -> Result<Committed<T>, CounterError> {
    let mut known = None;
    let added = commit_known(kv, key, entries, pruning, faults, &mut known).await?;
    let ledger = known.map(|(ledger, _)| ledger).unwrap_or_default();
    Ok(Committed { added, ledger })
}

/// [`commit`] starting from `known`, the ledger and revision this process last wrote or
/// read (`None`: read it), which saves a read while nobody else writes the ledger; a
/// stale one costs a conflict and a read. Leaves the ledger as stored (or as read, when
/// nothing was new) in `known`; returns how many entries this run counted. The caller
/// keeps one `known` per ledger and runs one commit at a time with it.
pub async fn commit_known<T: Tally>(
    kv: &kv::Store,
    key: &str,
    entries: &[Entry<'_, T::Item>],
    pruning: Pruning,
    faults: Option<&dyn Faults>,
    known: &mut Option<(Ledger<T>, u64)>,
) -> Result<usize, CounterError> {
    let first_id = entries.first().map_or("", |e| e.id);
    let mut conflicts = 0u32;
    loop {
        let (mut ledger, revision) = match known.take() {
            Some(known) => known,
            None => read_json::<Ledger<T>>(kv, key).await?.unwrap_or_default(),
        };
        let added = ledger.fold(entries);
        if added == 0 {
            *known = Some((ledger, revision));
            return Ok(added);
        }
        if pruning.floor > 0 {
            ledger.prune(pruning.floor, pruning.window);
        }
        ledger.tally.compact();
        inject(faults, key, first_id, Step::Folded)?;
        if let Some(revision) = compare_and_set(kv, key, ledger.to_bytes()?, revision).await? {
            *known = Some((ledger, revision));
            inject(faults, key, first_id, Step::Committed)?;
            return Ok(added);
        }
        conflicts += 1;
        pause_after_conflict(key, conflicts).await?;
    }
}

/// Merges `items` into the set at `key` (created when absent) with compare-and-set; a
/// set union, so running it twice changes nothing. No write when nothing is new.
/// Returns the set as stored.
pub async fn merge_set(
    kv: &kv::Store,
    key: &str,
    items: &[&str],
) -> Result<MemberSet, CounterError> {
    let mut conflicts = 0u32;
    loop {
        let (mut set, revision) = read_json::<MemberSet>(kv, key).await?.unwrap_or_default();
        let before = set.members.len();
        set.members.extend(items.iter().map(|s| s.to_string()));
        if set.members.len() == before {
            return Ok(set);
        }
        let bytes = serde_json::to_vec(&set)
            .map(Bytes::from)
            .map_err(|e| CounterError::new(CounterErrorKind::Corrupt, e.to_string()))?;
        if compare_and_set(kv, key, bytes, revision).await?.is_some() {
            return Ok(set);
        }
        conflicts += 1;
        pause_after_conflict(key, conflicts).await?;
    }
}

/// A set of names in one record (JSON `{"members": [...]}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSet {
    /// The names, sorted.
    #[serde(default)]
    pub members: std::collections::BTreeSet<String>,
}

/// After a conflict: retry at once the first time, then after a random pause that grows
/// with the conflicts (so contenders spread out instead of colliding again).
async fn pause_after_conflict(key: &str, conflicts: u32) -> Result<(), CounterError> {
    if conflicts > MAX_CONFLICTS {
        return Err(CounterError::new(
            CounterErrorKind::Contention,
            format!("{conflicts} compare-and-set conflicts in a row on {key}"),
        ));
    }
    if conflicts <= 1 {
        return Ok(());
    }
    let ceiling = (1u64 << conflicts.min(6)).min(MAX_PAUSE_MS);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    let noise = crate::generator::SplitMix64::new(keys::stable_hash(key) ^ nanos).next_u64();
    let pause_us = noise % (ceiling * 1000);
    tokio::time::sleep(Duration::from_micros(pause_us)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    struct Sum {
        total: u64,
    }

    impl Tally for Sum {
        type Item = u64;
        fn add(&mut self, item: &u64) {
            self.total += item;
        }
    }

    #[test]
    fn fold_counts_each_id_once_and_prune_keeps_the_window() {
        let mut ledger = Ledger::<Sum>::default();
        let (five, seven) = (5, 7);
        let entries = [
            Entry {
                id: "a",
                sequence: 10,
                item: &five,
            },
            Entry {
                id: "b",
                sequence: 11,
                item: &seven,
            },
            Entry {
                id: "a",
                sequence: 40,
                item: &five,
            },
        ];
        assert_eq!(ledger.fold(&entries), 2);
        assert_eq!(ledger.fold(&entries), 0);
        assert_eq!(ledger.tally.total, 12);
        // Floor 30, window 20: a (10) goes (10 + 20 <= 30), b (11) stays.
        ledger.prune(30, 20);
        assert_eq!(ledger.counted, BTreeMap::from([("b".to_string(), 11)]));
        let text = String::from_utf8(ledger.to_bytes().expect("json").to_vec()).expect("utf8");
        assert_eq!(text, r#"{"counted":{"b":11},"tally":{"total":12}}"#);
    }
}
