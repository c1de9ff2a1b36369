//! Exactly-once counters in a JetStream key-value bucket.
//!
//! KV offers two atomic operations on one key — `create` (fails when the key exists) and
//! `update(key, value, revision)` (compare-and-set, fails when the key changed) — and
//! no transaction across keys. Messages arrive at least once: a handler can crash at any
//! point and run again (on this replica or another), the same event can be published
//! twice under two message ids and run on two replicas at the same time. The protocol
//! below applies a set of increments ([`Application`]) to several counter records
//! exactly once per application id anyway.
//!
//! # Records and markers
//! A counter *record* is one key whose value holds counters **and** the set of
//! application ids currently being applied to it (`pending`). An application has an
//! *applied marker*, a key that exists once the application reached every one of its
//! records. The pending set is what makes a single record update atomic with "this id
//! was counted here"; the marker is what lets the set be emptied again.
//!
//! # The protocol, for application `id` with marker `M` over records `R1..Rn`
//! 1. (Folded into the first iteration of 2.) If `M` exists: the application is
//!    complete; go to 4 (cleanup) and stop.
//! 2. For each record `R`, loop:
//!    read `R` (value `v`, revision `r`);
//!    if `id ∈ v.pending`: already counted here, next record;
//!    if `M` exists (read **after** `R`): complete; go to 4 and stop;
//!    `update(R, v + increments, pending ∪ {id}, expected revision r)`;
//!    on a revision conflict read again (with a jittered pause), else next record.
//! 3. `create(M)` ("already exists" is fine).
//! 4. For each record `R`: remove `id` from `R.pending` with compare-and-set (no-op when
//!    absent). A first delivery that finds the application complete in 1 skips this:
//!    the run that completed it cleans up, and if that run crashed first, its own
//!    redelivery does ([`RunOptions::resuming`]).
//!
//! # Why nothing is counted twice
//! An increment of `R` for `id` happens only in step 2, in a compare-and-set from a
//! revision `r` at which `id ∉ pending`, after `M` was seen absent. `id` leaves `pending`
//! only in step 4, which starts after `M` was created. Suppose two runs both increment
//! `R`: the first one's write puts `id` in `pending`; the second one's expected revision
//! `r` is newer and has `id` out of `pending` again, so a step 4 ran in between, so `M`
//! existed before `r` was written — and the second run read `r`, *then* found `M`
//! absent. Impossible: markers are never deleted. Compare-and-set also means concurrent
//! increments from other applications are never lost (a conflict re-reads and retries).
//!
//! # Why nothing is lost
//! Counts only grow; once a run's increment is stored (with `id ∈ pending`) it stays.
//! `M` is created only after every record holds the increment (done by this run, seen in
//! `pending`, or implied by `M` existing). A crash anywhere leaves the message unacked,
//! so it is redelivered and the protocol resumes:
//! before an increment — nothing was done, it is done now; after some increments — those
//! records show `id ∈ pending` and are skipped, the rest are applied; after the marker —
//! step 1 sees it and only the cleanup runs. A lost or timed-out reply (`update` applied
//! but unconfirmed) is the same case: the next read shows the id.
//!
//! # Costs and limits
//! About five KV round trips per record, plus one marker per application (kept for the
//! bucket's `max_age`, which must exceed how late a duplicate can arrive — the events'
//! stream keeps them 7 days, the bucket 30). An application that never completes (its
//! message dead-lettered mid-way) leaves its id in `pending` for good: harmless for the
//! counts, visible in [`Record::pending`]. Reads must be linearizable: true on R1
//! buckets; on replicated buckets whose gets are served by followers (`allow_direct`),
//! a stale marker read could break the argument above.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::keys;

/// Revision conflicts tolerated on one record before giving up (the message is retried
/// later, on the consumer's schedule).
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

/// The value of a counter record (JSON, readable with `nats kv get`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Counter name -> value.
    #[serde(default)]
    pub counts: BTreeMap<String, u64>,
    /// Ids of applications that reached this record but are not finished (see the
    /// module docs). Empty at rest.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub pending: BTreeSet<String>,
}

impl Record {
    /// The value of counter `name` (0 when absent).
    pub fn count(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }

    fn add(&mut self, increments: &BTreeMap<String, u64>) {
        for (name, by) in increments {
            let c = self.counts.entry(name.clone()).or_insert(0);
            *c = c.saturating_add(*by);
        }
    }

    fn to_bytes(&self) -> Result<Bytes, CounterError> {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .map_err(|e| CounterError::new(CounterErrorKind::Corrupt, e.to_string()))
    }
}

/// Increments of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The record's key.
    pub record: String,
    /// Counter name -> amount to add.
    pub increments: BTreeMap<String, u64>,
}

impl Delta {
    /// A delta of `record` from `(counter, amount)` pairs (zero amounts are dropped).
    pub fn new<'a>(record: String, increments: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        Delta {
            record,
            increments: increments
                .into_iter()
                .filter(|(_, by)| *by > 0)
                .map(|(name, by)| (name.to_string(), by))
                .collect(),
        }
    }
}

/// Increments of several records, to be applied exactly once per `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Application {
    /// What makes it unique (an event id, a user): what `pending` holds.
    pub id: String,
    /// The key created once every record holds the increments.
    pub marker: String,
    /// The records and their increments, in the order they are applied.
    pub deltas: Vec<Delta>,
}

/// What [`apply_once`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// This run completed the application: it created the marker (some increments may
    /// come from an earlier, interrupted run).
    Now,
    /// The application was already complete: a duplicate.
    Already,
}

/// Where a fault can be injected (tests use it to simulate a crash at every step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// After the increments of the record at this index were stored.
    Incremented(usize),
    /// After the marker was created.
    Marked,
    /// After the cleanup of the record at this index.
    Cleaned(usize),
}

/// A fault injection hook: returns true to fail the run at this point (as if the worker
/// crashed there; the message is retried). For tests and chaos drills.
pub trait Faults: Send + Sync {
    /// Whether to fail at `step` of application `id` (the application's marker is `marker`).
    fn fail_at(&self, id: &str, marker: &str, step: Step) -> bool;
}

/// What kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterErrorKind {
    /// A KV request failed (timeout, no responders, ...): retry later.
    Kv,
    /// Too many compare-and-set conflicts in a row: retry later.
    Contention,
    /// A record does not hold a counter record.
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

/// Reads a record: its value and revision (`None` when the key does not exist).
pub async fn read_record(kv: &kv::Store, key: &str) -> Result<Option<(Record, u64)>, CounterError> {
    let entry = kv
        .entry(key)
        .await
        .map_err(|e| kv_error("reading", key, e))?;
    match entry {
        None => Ok(None),
        Some(entry) if entry.operation != Operation::Put => {
            Ok(Some((Record::default(), entry.revision)))
        }
        Some(entry) => {
            let record: Record = serde_json::from_slice(&entry.value).map_err(|e| {
                CounterError::new(
                    CounterErrorKind::Corrupt,
                    format!("{key} does not hold a counter record: {e}"),
                )
            })?;
            Ok(Some((record, entry.revision)))
        }
    }
}

/// Whether `key` exists (a marker or flag).
pub async fn exists(kv: &kv::Store, key: &str) -> Result<bool, CounterError> {
    let entry = kv
        .entry(key)
        .await
        .map_err(|e| kv_error("reading", key, e))?;
    Ok(matches!(entry, Some(e) if e.operation == Operation::Put))
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
async fn compare_and_set(
    kv: &kv::Store,
    key: &str,
    record: &Record,
    revision: u64,
) -> Result<Option<u64>, CounterError> {
    match kv.update(key, record.to_bytes()?, revision).await {
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

/// How one run of [`apply_once`] behaves.
#[derive(Clone, Copy, Default)]
pub struct RunOptions<'a> {
    /// This run may resume an interrupted one (the message is a redelivery): when the
    /// application turns out complete, still empty the pending sets, in case the
    /// interrupted run stopped before its cleanup. A first delivery skips that read:
    /// whoever completed the application cleans up, or its own redelivery does.
    pub resuming: bool,
    /// Fault injection (tests, chaos drills).
    pub faults: Option<&'a dyn Faults>,
}

impl std::fmt::Debug for RunOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("resuming", &self.resuming)
            .field("faults", &self.faults.is_some())
            .finish()
    }
}

/// Applies `app` exactly once; see the module docs for the protocol and why it holds.
/// Returns [`Applied::Now`] when this run created the marker.
pub async fn apply_once(
    kv: &kv::Store,
    app: &Application,
    options: RunOptions<'_>,
) -> Result<Applied, CounterError> {
    let fault = |step: Step| -> Result<(), CounterError> {
        match options.faults {
            Some(f) if f.fail_at(&app.id, &app.marker, step) => Err(CounterError::new(
                CounterErrorKind::Injected,
                format!("injected fault at {step:?} of {}", app.marker),
            )),
            _ => Ok(()),
        }
    };

    // 2. Increment every record once, recording the id in its pending set. (Step 1, the
    // marker check, is the check below on the first record: it must follow the read.)
    let mut written: Vec<Option<(Record, u64)>> = Vec::with_capacity(app.deltas.len());
    for (i, delta) in app.deltas.iter().enumerate() {
        let mut conflicts = 0u32;
        let stored = loop {
            let (mut record, revision) = read_record(kv, &delta.record).await?.unwrap_or_default();
            if record.pending.contains(&app.id) {
                break None; // counted here by an earlier or concurrent run
            }
            // Read after the record: see the module docs for why the order matters.
            if exists(kv, &app.marker).await? {
                if options.resuming || written.iter().any(Option::is_some) {
                    cleanup(kv, app, &mut written, &fault).await?;
                }
                return Ok(Applied::Already);
            }
            record.add(&delta.increments);
            record.pending.insert(app.id.clone());
            match compare_and_set(kv, &delta.record, &record, revision).await? {
                Some(new_revision) => break Some((record, new_revision)),
                None => {
                    conflicts += 1;
                    pause_after_conflict(&app.id, conflicts).await?;
                }
            }
        };
        written.push(stored);
        fault(Step::Incremented(i))?;
    }

    // 3. Every record holds the increments: mark the application complete.
    let created = create_once(kv, &app.marker, Bytes::from_static(b"1")).await?;
    fault(Step::Marked)?;

    // 4. Empty the pending sets.
    cleanup(kv, app, &mut written, &fault).await?;
    Ok(if created {
        Applied::Now
    } else {
        Applied::Already
    })
}

/// Step 4: removes `app.id` from every record's pending set. `known` holds, per record,
/// the value and revision this run wrote (tried first, saving a read).
async fn cleanup(
    kv: &kv::Store,
    app: &Application,
    known: &mut Vec<Option<(Record, u64)>>,
    fault: &impl Fn(Step) -> Result<(), CounterError>,
) -> Result<(), CounterError> {
    known.resize(app.deltas.len(), None);
    for (i, (delta, known)) in app.deltas.iter().zip(known.iter_mut()).enumerate() {
        let mut conflicts = 0u32;
        let mut current = known.take();
        loop {
            let (mut record, revision) = match current.take() {
                Some(k) => k,
                None => match read_record(kv, &delta.record).await? {
                    Some(k) => k,
                    None => break,
                },
            };
            if !record.pending.remove(&app.id) {
                break;
            }
            if compare_and_set(kv, &delta.record, &record, revision)
                .await?
                .is_some()
            {
                break;
            }
            conflicts += 1;
            pause_after_conflict(&app.id, conflicts).await?;
        }
        fault(Step::Cleaned(i))?;
    }
    Ok(())
}

/// After a conflict: retry at once the first time, then after a random pause that grows
/// with the conflicts (so contenders spread out instead of colliding again).
async fn pause_after_conflict(id: &str, conflicts: u32) -> Result<(), CounterError> {
    if conflicts > MAX_CONFLICTS {
        return Err(CounterError::new(
            CounterErrorKind::Contention,
            format!("{conflicts} compare-and-set conflicts in a row"),
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
    let noise = crate::generator::SplitMix64::new(keys::stable_hash(id) ^ nanos).next_u64();
    let pause_us = noise % (ceiling * 1000);
    tokio::time::sleep(Duration::from_micros(pause_us)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_json_shape() {
        let mut r = Record::default();
        r.add(&BTreeMap::from([
            ("n".to_string(), 2),
            ("cents".to_string(), 150),
        ]));
        r.add(&BTreeMap::from([("n".to_string(), 1)]));
        assert_eq!(r.count("n"), 3);
        assert_eq!(r.count("missing"), 0);
        let text = String::from_utf8(r.to_bytes().expect("json").to_vec()).expect("utf8");
        assert_eq!(text, r#"{"counts":{"cents":150,"n":3}}"#);
        r.pending.insert("e-1".into());
        let back: Record = serde_json::from_slice(&r.to_bytes().expect("json")).expect("parse");
        assert_eq!(back, r);
        let empty: Record = serde_json::from_str("{}").expect("parse");
        assert_eq!(empty, Record::default());
    }

    #[test]
    fn delta_drops_zero_increments() {
        let d = Delta::new("k".into(), [("n", 1), ("cents", 0)]);
        assert_eq!(d.increments, BTreeMap::from([("n".to_string(), 1)]));
    }
}
