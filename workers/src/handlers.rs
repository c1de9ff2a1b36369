//! The handlers (`track_click`, `track_purchase`, `track_login`) and the state they
//! share: the `analytics` key-value bucket, opened once per process.
//!
//! The consumers run them as batch handlers ([`count_clicks`], [`count_purchases`],
//! [`count_logins`], registered by [`app`] under the names `streams.toml` uses): a batch
//! is validated (an event that cannot be counted is a permanent error: dead-lettered at
//! once), split into partitions (kind × shard of the user), and each partition's events
//! are committed in one write (see [`crate::counters`]), the partitions concurrently. A
//! partition whose commit fails (a KV error, too much contention) fails its messages
//! alone: they are retried on the consumer's schedule and the retry skips what the
//! failed run stored. [`track_click`] and the other single-event functions count one
//! event the same way (for the handler harness, or a consumer without batches).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use jetworker::{
    App, Batch, BatchContext, BatchFailures, BatchResult, Context, Event, HandlerError, ResultExt,
};
use tokio::sync::OnceCell;

use crate::aggregates::{PartitionCounts, DEFAULT_FLAG_THRESHOLD};
use crate::counters::{
    self, CounterError, Entry, Faults, Ledger, Pruning, Step, DEFAULT_DEDUP_WINDOW,
};
use crate::events::{AnyEvent, Click, Kind, Login, Purchase};
use crate::keys;

/// The bucket's name in `streams.toml`.
pub const BUCKET: &str = "analytics";

/// How long an ack floor read from the server is used before it is read again.
const FLOOR_REFRESH: Duration = Duration::from_secs(1);

/// The handlers' shared state.
pub struct Analytics {
    bucket: String,
    store: OnceCell<kv::Store>,
    flag_threshold: u64,
    dedup_window: u64,
    faults: Option<Arc<dyn Faults>>,
    /// Per (stream, consumer): the last ack floor read and when.
    floors: Mutex<HashMap<(String, String), (Instant, u64)>>,
    /// Users whose flag this process saw created (saves a request per batch).
    flagged: Mutex<HashSet<String>>,
    /// Per ledger key: the ledger as this process last wrote or read it, behind a lock
    /// so that this process's batches commit to one ledger in turn (no conflicts among
    /// themselves, no read before each write; see [`counters::commit_known`]).
    ledgers: Mutex<HashMap<String, Arc<KnownLedger>>>,
    /// Per active-user record: members this process knows are stored (sets only grow,
    /// so a batch whose users are all known skips the read).
    active: Mutex<HashMap<String, HashSet<String>>>,
}

/// Active-user sets this process keeps in memory, at most (then it starts afresh).
const KNOWN_ACTIVE_SETS: usize = 4096;

/// A ledger as last written or read by this process, and its revision.
type KnownLedger = tokio::sync::Mutex<Option<(Ledger<PartitionCounts>, u64)>>;

impl Default for Analytics {
    fn default() -> Self {
        Analytics::new()
    }
}

impl std::fmt::Debug for Analytics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analytics")
            .field("bucket", &self.bucket)
            .field("opened", &self.store.initialized())
            .field("flag_threshold", &self.flag_threshold)
            .field("dedup_window", &self.dedup_window)
            .field("faults", &self.faults.is_some())
            .finish()
    }
}

impl Analytics {
    /// State for the [`BUCKET`] bucket, the default flag threshold and dedup window.
    pub fn new() -> Self {
        Analytics {
            bucket: BUCKET.to_string(),
            store: OnceCell::new(),
            flag_threshold: DEFAULT_FLAG_THRESHOLD,
            dedup_window: DEFAULT_DEDUP_WINDOW,
            faults: None,
            floors: Mutex::new(HashMap::new()),
            flagged: Mutex::new(HashSet::new()),
            ledgers: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
        }
    }

    /// Uses another bucket.
    pub fn with_bucket(mut self, bucket: &str) -> Self {
        self.bucket = bucket.to_string();
        self
    }

    /// Flags users once their failed logins reach `threshold`.
    pub fn with_flag_threshold(mut self, threshold: u64) -> Self {
        self.flag_threshold = threshold.max(1);
        self
    }

    /// Recognises a copy of an event under a new message id within `messages` stream
    /// messages of the original (see [`crate::counters`], "Pruning"). Every replica must
    /// use the same window or a larger one.
    pub fn with_dedup_window(mut self, messages: u64) -> Self {
        self.dedup_window = messages;
        self
    }

    /// Injects faults into the counting protocol (tests, chaos drills).
    pub fn with_faults(mut self, faults: Arc<dyn Faults>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// The flag threshold.
    pub fn flag_threshold(&self) -> u64 {
        self.flag_threshold
    }

    /// The bucket, opened on first use (a failure is not cached: the next call retries).
    pub async fn store(&self, js: Option<&jetstream::Context>) -> Result<&kv::Store, HandlerError> {
        self.store
            .get_or_try_init(|| async {
                let js = js.ok_or_else(|| {
                    HandlerError::permanent("no JetStream context: run the handlers in a jetworker App")
                })?;
                js.get_key_value(self.bucket.as_str()).await.map_err(|e| {
                    HandlerError::transient(format!(
                        "cannot open kv bucket {:?} (is it declared under [[kv_buckets]] in streams.toml and provisioned?): {e}",
                        self.bucket
                    ))
                })
            })
            .await
    }

    /// The lock and last known value of the ledger at `key`.
    fn known_ledger(&self, key: &str) -> Arc<KnownLedger> {
        match self.ledgers.lock() {
            Ok(mut ledgers) => ledgers.entry(key.to_string()).or_default().clone(),
            // A poisoned map: go without the cache (a read before each write).
            Err(_) => Arc::default(),
        }
    }

    /// The consumer's ack floor (stream sequence), read from the server at most once per
    /// [`FLOOR_REFRESH`]. When it cannot be read, the last one read (or 0, which prunes
    /// nothing): a stale floor is lower than the real one, which is safe.
    async fn ack_floor(&self, js: Option<&jetstream::Context>, origin: Origin<'_>) -> u64 {
        let (Some(js), false) = (js, origin.stream.is_empty() || origin.consumer.is_empty()) else {
            return 0;
        };
        let key = (origin.stream.to_string(), origin.consumer.to_string());
        let cached = self.floors.lock().ok().and_then(|f| f.get(&key).copied());
        if let Some((read_at, floor)) = cached {
            if read_at.elapsed() < FLOOR_REFRESH {
                return floor;
            }
        }
        let known = cached.map_or(0, |(_, floor)| floor);
        let read = async {
            let stream = js.get_stream_no_info(origin.stream).await.ok()?;
            let info = stream.consumer_info(origin.consumer).await.ok()?;
            Some(info.ack_floor.stream_sequence)
        };
        match read.await {
            Some(floor) => {
                let floor = floor.max(known);
                if let Ok(mut floors) = self.floors.lock() {
                    floors.insert(key, (Instant::now(), floor));
                }
                floor
            }
            None => known,
        }
    }
}

/// The app with every handler registered under the names `streams.toml` uses.
pub fn app(state: Analytics) -> App<Analytics> {
    App::new(state)
        .batch_handler("track_click", count_clicks)
        .batch_handler("track_purchase", count_purchases)
        .batch_handler("track_login", count_logins)
}

/// Counts a batch of clicks (per minute, active users).
pub async fn count_clicks(batch: Batch<Click>, ctx: BatchContext<Analytics>) -> BatchResult {
    count_batch(batch, &ctx).await
}

/// Counts a batch of purchases: revenue per minute and in total, purchases per product.
pub async fn count_purchases(batch: Batch<Purchase>, ctx: BatchContext<Analytics>) -> BatchResult {
    count_batch(batch, &ctx).await
}

/// Counts a batch of login attempts; flags users who fail too often.
pub async fn count_logins(batch: Batch<Login>, ctx: BatchContext<Analytics>) -> BatchResult {
    count_batch(batch, &ctx).await
}

/// Counts every message of `batch`; the failures are the messages not counted.
pub async fn count_batch<T>(batch: Batch<T>, ctx: &BatchContext<Analytics>) -> BatchResult
where
    T: Clone + Into<AnyEvent>,
{
    let incoming: Vec<Incoming> = batch
        .iter()
        .map(|m| Incoming {
            event: m.payload.clone().into(),
            sequence: m.stream_sequence(),
        })
        .collect();
    let origin = Origin {
        stream: ctx.stream(),
        consumer: ctx.consumer(),
    };
    let outcomes = count_events(ctx.state(), ctx.jetstream(), origin, &incoming).await?;
    let mut failures = BatchFailures::new();
    for (message, outcome) in batch.iter().zip(outcomes) {
        if let Some(error) = outcome {
            failures.fail(message, error);
        }
    }
    Ok(failures)
}

/// Counts a click.
pub async fn track_click(event: Event<Click>, ctx: Context<Analytics>) -> Result<(), HandlerError> {
    count_one(event.into_inner().into(), &ctx).await
}

/// Counts a purchase: revenue per minute and in total, purchases per product.
pub async fn track_purchase(
    event: Event<Purchase>,
    ctx: Context<Analytics>,
) -> Result<(), HandlerError> {
    count_one(event.into_inner().into(), &ctx).await
}

/// Counts a login attempt; flags users who fail too often.
pub async fn track_login(event: Event<Login>, ctx: Context<Analytics>) -> Result<(), HandlerError> {
    count_one(event.into_inner().into(), &ctx).await
}

/// Counts one event (a batch of one), exactly once.
pub async fn count_one(event: AnyEvent, ctx: &Context<Analytics>) -> Result<(), HandlerError> {
    let incoming = [Incoming {
        event,
        sequence: ctx.stream_sequence(),
    }];
    let origin = Origin {
        stream: ctx.stream(),
        consumer: ctx.consumer(),
    };
    let outcomes = count_events(ctx.state(), ctx.jetstream(), origin, &incoming).await?;
    match outcomes.into_iter().next().flatten() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// One message to count: its event and its stream sequence.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The decoded event.
    pub event: AnyEvent,
    /// The stream sequence of the message (what the dedup window is measured in).
    pub sequence: u64,
}

/// Where the messages come from: whose ack floor prunes the ledgers.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The stream.
    pub stream: &'a str,
    /// The durable consumer.
    pub consumer: &'a str,
}

/// Counts `events` exactly once. Returns, per event in order, `None` when it is
/// counted (now or before) or the error its message fails with: permanent for an event
/// that cannot be counted, transient when its partition's commit failed. `Err` (the
/// bucket cannot be opened) fails them all.
pub async fn count_events(
    state: &Analytics,
    js: Option<&jetstream::Context>,
    origin: Origin<'_>,
    events: &[Incoming],
) -> Result<Vec<Option<HandlerError>>, HandlerError> {
    let mut outcomes: Vec<Option<HandlerError>> = Vec::with_capacity(events.len());
    // Partition -> indexes of its events.
    let mut partitions: BTreeMap<(Kind, u64), Vec<usize>> = BTreeMap::new();
    for (i, incoming) in events.iter().enumerate() {
        match incoming.event.validate().permanent() {
            Ok(()) => {
                let e = &incoming.event;
                partitions
                    .entry((e.kind(), keys::shard(e.user())))
                    .or_default()
                    .push(i);
                outcomes.push(None);
            }
            Err(error) => outcomes.push(Some(error)),
        }
    }
    if partitions.is_empty() {
        return Ok(outcomes);
    }
    let kv = state.store(js).await?;
    let pruning = Pruning {
        floor: state.ack_floor(js, origin).await,
        window: state.dedup_window,
    };
    let runs = partitions
        .iter()
        .map(|((kind, shard), indexes)| async move {
            let entries: Vec<Entry<'_, AnyEvent>> = indexes
                .iter()
                .map(|i| {
                    let incoming = &events[*i];
                    Entry {
                        id: incoming.event.id(),
                        sequence: incoming.sequence,
                        item: &incoming.event,
                    }
                })
                .collect();
            count_partition(state, kv, *kind, *shard, &entries, pruning).await
        });
    let results = futures::future::join_all(runs).await;
    for (indexes, result) in partitions.values().zip(results) {
        if let Err(e) = result {
            tracing::debug!(error = %e, events = indexes.len(), "partition not counted; its messages are retried");
            for i in indexes {
                outcomes[*i] = Some(HandlerError::transient(e.clone()));
            }
        }
    }
    Ok(outcomes)
}

/// Commits one partition's events, then what is derived from them: the minutes' active
/// users and the flags (both redone by every delivery, see [`crate::counters`]).
async fn count_partition(
    state: &Analytics,
    kv: &kv::Store,
    kind: Kind,
    shard: u64,
    entries: &[Entry<'_, AnyEvent>],
    pruning: Pruning,
) -> Result<(), CounterError> {
    let key = keys::ledger(kind, shard);
    let faults = state.faults.as_deref();
    let first_id = entries.first().map_or("", |e| e.id);
    let failing: BTreeSet<&str> = entries
        .iter()
        .filter_map(|e| match e.item {
            AnyEvent::Login(l) if !l.success => Some(l.user.as_str()),
            _ => None,
        })
        .collect();
    // The lock is held for the commit alone; the failed logins of the batch's failing
    // users are taken from the ledger as committed.
    let (added, failed_logins) = {
        let known = state.known_ledger(&key);
        let mut known = known.lock().await;
        let added = counters::commit_known(kv, &key, entries, pruning, faults, &mut known).await?;
        let failed_logins: Vec<(&str, u64)> = failing
            .iter()
            .map(|user| {
                let failed = known
                    .as_ref()
                    .and_then(|(ledger, _)| ledger.tally.failed_logins.get(*user).copied())
                    .unwrap_or(0);
                (*user, failed)
            })
            .collect();
        (added, failed_logins)
    };

    let mut active: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    for entry in entries {
        active
            .entry(entry.item.minute())
            .or_default()
            .insert(entry.item.user());
    }
    for (minute, users) in active {
        let key = keys::active_record(minute, shard);
        let unknown: Vec<&str> = match state.active.lock() {
            Ok(known) => match known.get(&key) {
                Some(known) => users.into_iter().filter(|u| !known.contains(*u)).collect(),
                None => users.into_iter().collect(),
            },
            Err(_) => users.into_iter().collect(),
        };
        if unknown.is_empty() {
            continue;
        }
        let stored = counters::merge_set(kv, &key, &unknown).await?;
        if let Ok(mut known) = state.active.lock() {
            if known.len() >= KNOWN_ACTIVE_SETS {
                known.clear();
            }
            known.entry(key).or_default().extend(stored.members);
        }
    }
    counters::inject(faults, &key, first_id, Step::ActiveMerged)?;

    for (user, failed) in failed_logins {
        flag_if_needed(state, kv, user, failed).await?;
    }
    tracing::debug!(
        ledger = key,
        events = entries.len(),
        counted = added,
        "committed"
    );
    Ok(())
}

/// Creates `flag.<user>` when the user's failed logins reached the threshold. Runs on
/// every delivery of a failed login (duplicates included), so a crash between the commit
/// and the flag is repaired by the redelivery.
async fn flag_if_needed(
    state: &Analytics,
    kv: &kv::Store,
    user: &str,
    failed: u64,
) -> Result<(), CounterError> {
    let threshold = state.flag_threshold;
    if failed < threshold {
        return Ok(());
    }
    if state.flagged.lock().is_ok_and(|f| f.contains(user)) {
        return Ok(());
    }
    let value = serde_json::json!({ "user": user, "failed_at_flagging": failed });
    if counters::create_once(kv, &keys::flag(user), Bytes::from(value.to_string())).await? {
        tracing::warn!(
            user,
            failed_logins = failed,
            threshold,
            "user flagged: too many failed logins"
        );
    }
    if let Ok(mut flagged) = state.flagged.lock() {
        flagged.insert(user.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetworker::HandlerErrorKind;

    #[tokio::test]
    async fn invalid_events_are_permanent_failures() {
        let ctx = Context::new(Arc::new(Analytics::new()), "events.click", 1);
        let click = Click {
            id: String::new(),
            user: "ann".into(),
            time: 0,
            page: "/".into(),
        };
        let e = track_click(Event::new(click), ctx)
            .await
            .expect_err("no id");
        assert_eq!(e.kind(), HandlerErrorKind::Permanent);
    }

    #[tokio::test]
    async fn no_jetstream_is_a_permanent_failure() {
        let ctx = Context::new(Arc::new(Analytics::new()), "events.click", 1);
        let click = Click {
            id: "c1".into(),
            user: "ann".into(),
            time: 0,
            page: "/".into(),
        };
        let e = track_click(Event::new(click), ctx)
            .await
            .expect_err("no js");
        assert_eq!(e.kind(), HandlerErrorKind::Permanent);
    }
}
