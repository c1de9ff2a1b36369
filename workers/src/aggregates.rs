//! The real-time aggregates: what each event adds to its partition's counters
//! ([`PartitionCounts`], pure), what a set of events implies
//! ([`Aggregates::from_events`], pure, the reference the tests compare against), and
//! reading them back from the bucket ([`read`]).
//!
//! # What is counted
//! - per minute: events per kind, failed logins, revenue (cents), distinct active users;
//! - in total: events per kind, failed logins, revenue;
//! - per product: purchases and revenue;
//! - per user: failed logins, and a flag once they reach the threshold (default 5).
//!
//! Each event is counted once into its partition's ledger (its kind × the shard of its
//! user; [`crate::counters::commit`]): that minute's and the total counters, its
//! product, its user's failed logins. Its user is added to the set of the minute's
//! active users of that shard (`m.<minute>.active.<shard>`), a set union, so a user
//! active many times in a minute, in any kind, counts once.

use std::collections::{BTreeMap, BTreeSet};

use async_nats::jetstream::kv;
use futures::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::counters::{self, CounterError, CounterErrorKind, MemberSet, Tally};
use crate::events::{AnyEvent, Kind};
use crate::keys::{self, SHARDS};

/// Failed logins after which a user is flagged.
pub const DEFAULT_FLAG_THRESHOLD: u64 = 5;

/// Minutes of per-minute counters a ledger keeps: the newest ones by event time (a day).
/// Totals, products and per-user failures are kept for ever.
pub const KEPT_MINUTES: usize = 1440;

/// The counters of one partition in one minute, or in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tallies {
    /// Events.
    #[serde(default)]
    pub n: u64,
    /// Revenue in cents (purchases).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cents: u64,
    /// Failed logins (logins).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Tallies {
    fn add(&mut self, event: &AnyEvent) {
        self.n += 1;
        match event {
            AnyEvent::Click(_) => {}
            AnyEvent::Purchase(p) => self.cents = self.cents.saturating_add(p.amount),
            AnyEvent::Login(l) => self.failed += u64::from(!l.success),
        }
    }
}

/// The counters of one partition (one kind, one shard of the users): what its ledger
/// holds besides the ids counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionCounts {
    /// Per unix minute (the newest [`KEPT_MINUTES`]).
    #[serde(default)]
    pub minutes: BTreeMap<u64, Tallies>,
    /// All time.
    #[serde(default)]
    pub totals: Tallies,
    /// Per product name (purchases).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub products: BTreeMap<String, Product>,
    /// Failed logins per user (logins).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed_logins: BTreeMap<String, u64>,
}

impl Tally for PartitionCounts {
    type Item = AnyEvent;

    fn add(&mut self, event: &AnyEvent) {
        self.minutes.entry(event.minute()).or_default().add(event);
        self.totals.add(event);
        match event {
            AnyEvent::Click(_) => {}
            AnyEvent::Purchase(p) => {
                let product = self.products.entry(p.product.clone()).or_default();
                product.purchases += 1;
                product.revenue_cents = product.revenue_cents.saturating_add(p.amount);
            }
            AnyEvent::Login(l) => {
                if !l.success {
                    *self.failed_logins.entry(l.user.clone()).or_default() += 1;
                }
            }
        }
    }

    fn compact(&mut self) {
        while self.minutes.len() > KEPT_MINUTES {
            self.minutes.pop_first();
        }
    }
}

/// Counts of one minute, or of all time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Clicks.
    pub clicks: u64,
    /// Purchases.
    pub purchases: u64,
    /// Login attempts.
    pub logins: u64,
    /// Failed login attempts.
    pub failed_logins: u64,
    /// Revenue, in cents.
    pub revenue_cents: u64,
}

impl Counts {
    fn is_zero(&self) -> bool {
        *self == Counts::default()
    }

    fn add_tallies(&mut self, kind: Kind, t: &Tallies) {
        match kind {
            Kind::Click => self.clicks += t.n,
            Kind::Purchase => {
                self.purchases += t.n;
                self.revenue_cents += t.cents;
            }
            Kind::Login => {
                self.logins += t.n;
                self.failed_logins += t.failed;
            }
        }
    }

    /// Events of every kind.
    pub fn events(&self) -> u64 {
        self.clicks + self.purchases + self.logins
    }
}

/// One minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Minute {
    /// Events per kind, failed logins, revenue.
    #[serde(flatten)]
    pub counts: Counts,
    /// Distinct users with at least one event.
    pub active_users: u64,
}

/// One product.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// Purchases.
    pub purchases: u64,
    /// Revenue, in cents.
    pub revenue_cents: u64,
}

/// Everything the platform computes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Aggregates {
    /// All time.
    pub totals: Counts,
    /// Per unix minute (minutes without events are left out).
    pub minutes: BTreeMap<u64, Minute>,
    /// Per product name.
    pub products: BTreeMap<String, Product>,
    /// Failed logins per user (users without failures are left out).
    pub failed_logins: BTreeMap<String, u64>,
    /// Users flagged for failing to log in too often.
    pub flagged: BTreeSet<String>,
}

impl Aggregates {
    /// What `events` imply, each event id (per kind) counted once: the reference the
    /// stored aggregates must equal.
    pub fn from_events<'a>(
        events: impl IntoIterator<Item = &'a AnyEvent>,
        flag_threshold: u64,
    ) -> Aggregates {
        let mut seen = BTreeSet::new();
        let mut active = BTreeSet::new();
        let mut a = Aggregates::default();
        for e in events {
            if !seen.insert((e.kind(), e.id().to_string())) {
                continue;
            }
            let minute = a.minutes.entry(e.minute()).or_default();
            if active.insert((e.minute(), e.user().to_string())) {
                minute.active_users += 1;
            }
            for counts in [&mut a.totals, &mut minute.counts] {
                match e {
                    AnyEvent::Click(_) => counts.clicks += 1,
                    AnyEvent::Purchase(p) => {
                        counts.purchases += 1;
                        counts.revenue_cents += p.amount;
                    }
                    AnyEvent::Login(l) => {
                        counts.logins += 1;
                        counts.failed_logins += u64::from(!l.success);
                    }
                }
            }
            match e {
                AnyEvent::Purchase(p) => {
                    let product = a.products.entry(p.product.clone()).or_default();
                    product.purchases += 1;
                    product.revenue_cents += p.amount;
                }
                AnyEvent::Login(l) if !l.success => {
                    *a.failed_logins.entry(l.user.clone()).or_default() += 1;
                }
                _ => {}
            }
        }
        a.flagged = a
            .failed_logins
            .iter()
            .filter(|(_, n)| **n >= flag_threshold)
            .map(|(user, _)| user.clone())
            .collect();
        a
    }

    /// Products by revenue, highest first (ties by name).
    pub fn top_products(&self, n: usize) -> Vec<(&str, Product)> {
        let mut v: Vec<(&str, Product)> = self
            .products
            .iter()
            .map(|(k, p)| (k.as_str(), *p))
            .collect();
        v.sort_by(|a, b| b.1.revenue_cents.cmp(&a.1.revenue_cents).then(a.0.cmp(b.0)));
        v.truncate(n);
        v
    }

    /// Users by failed logins, most first (ties by name).
    pub fn top_failing_users(&self, n: usize) -> Vec<(&str, u64)> {
        let mut v: Vec<(&str, u64)> = self
            .failed_logins
            .iter()
            .map(|(k, c)| (k.as_str(), *c))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.truncate(n);
        v
    }
}

/// The stored aggregates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// The aggregates.
    #[serde(flatten)]
    pub aggregates: Aggregates,
    /// Events half-counted: always 0 since a partition's events are committed in one
    /// write (kept for the readers that show it; see [`crate::counters`]).
    pub pending: u64,
}

/// Concurrent KV reads while reading a snapshot.
const READ_CONCURRENCY: usize = 64;

/// Reads the aggregates from the bucket: totals, the given `minutes` (within the
/// newest [`KEPT_MINUTES`] of each partition), products, per-user failures and flags.
/// One read per ledger (`3 × SHARDS`) and per minute and shard of active users. Reads are
/// not one atomic snapshot: while events flow, counts read later can include events
/// newer than counts read earlier.
pub async fn read(
    kv: &kv::Store,
    minutes: impl IntoIterator<Item = u64>,
) -> Result<Snapshot, CounterError> {
    let wanted: BTreeSet<u64> = minutes.into_iter().collect();
    let mut snapshot = Snapshot::default();
    let a = &mut snapshot.aggregates;

    let ledger_keys: Vec<(Kind, String)> = Kind::ALL
        .iter()
        .flat_map(|k| (0..SHARDS).map(move |s| (*k, keys::ledger(*k, s))))
        .collect();
    for (kind, ledger) in read_many::<_, TallyOnly>(kv, ledger_keys).await? {
        let counts = ledger.tally;
        a.totals.add_tallies(kind, &counts.totals);
        for (name, p) in counts.products {
            let product = a.products.entry(name).or_default();
            product.purchases += p.purchases;
            product.revenue_cents += p.revenue_cents;
        }
        for (user, failed) in counts.failed_logins {
            *a.failed_logins.entry(user).or_default() += failed;
        }
        for (minute, tallies) in counts
            .minutes
            .range(&wanted.first().copied().unwrap_or(0)..)
        {
            if wanted.contains(minute) {
                a.minutes
                    .entry(*minute)
                    .or_default()
                    .counts
                    .add_tallies(kind, tallies);
            }
        }
    }

    let active_keys: Vec<(u64, String)> = wanted
        .iter()
        .flat_map(|m| (0..SHARDS).map(move |s| (*m, keys::active_record(*m, s))))
        .collect();
    for (minute, users) in read_many::<_, MemberSet>(kv, active_keys).await? {
        a.minutes.entry(minute).or_default().active_users += users.members.len() as u64;
    }
    a.minutes
        .retain(|_, m| !m.counts.is_zero() || m.active_users > 0);
    a.failed_logins.retain(|_, n| *n > 0);

    a.flagged = list_keys(kv, keys::FLAG_PREFIX)
        .await?
        .iter()
        .filter_map(|key| keys::user_of(key, keys::FLAG_PREFIX))
        .collect();
    Ok(snapshot)
}

/// A ledger read without its `counted` ids (skipped while parsing).
#[derive(Debug, Default, Deserialize)]
struct TallyOnly {
    #[serde(default)]
    tally: PartitionCounts,
}

/// Reads JSON records concurrently; absent ones are left out.
async fn read_many<Tag, T: DeserializeOwned + Default>(
    kv: &kv::Store,
    keys: Vec<(Tag, String)>,
) -> Result<Vec<(Tag, T)>, CounterError> {
    let found: Vec<Option<(Tag, T)>> = futures::stream::iter(keys)
        .map(|(tag, key)| async move {
            Ok::<_, CounterError>(
                counters::read_json::<T>(kv, &key)
                    .await?
                    .map(|(value, _)| (tag, value)),
            )
        })
        .buffered(READ_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(found.into_iter().flatten().collect())
}

/// Keys starting with `prefix` (which ends with `.`), from the bucket stream's subject
/// list: one request, no consumer.
async fn list_keys(kv: &kv::Store, prefix: &str) -> Result<Vec<String>, CounterError> {
    let stream_prefix = format!("$KV.{}.", kv.name);
    let filter = format!("{stream_prefix}{prefix}>");
    let subjects: Vec<(String, usize)> = kv
        .stream
        .info_with_subjects(&filter)
        .await
        .map_err(|e| list_error(prefix, e))?
        .try_collect()
        .await
        .map_err(|e| list_error(prefix, e))?;
    let mut keys: Vec<String> = subjects
        .into_iter()
        .filter_map(|(subject, _)| subject.strip_prefix(&stream_prefix).map(str::to_string))
        .collect();
    keys.sort();
    Ok(keys)
}

fn list_error(prefix: &str, e: impl std::fmt::Display) -> CounterError {
    CounterError::new(CounterErrorKind::Kv, format!("listing keys {prefix}*: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Click, Login, Purchase};

    fn click(id: &str, user: &str, time: u64) -> AnyEvent {
        AnyEvent::Click(Click {
            id: id.into(),
            user: user.into(),
            time,
            page: "/".into(),
        })
    }

    fn purchase(id: &str, user: &str, product: &str, amount: u64) -> AnyEvent {
        AnyEvent::Purchase(Purchase {
            id: id.into(),
            user: user.into(),
            time: 60_000,
            product: product.into(),
            amount,
        })
    }

    fn login(id: &str, user: &str, success: bool) -> AnyEvent {
        AnyEvent::Login(Login {
            id: id.into(),
            user: user.into(),
            time: 125_000,
            success,
            method: None,
        })
    }

    #[test]
    fn partition_counts_of_each_kind() {
        let mut p = PartitionCounts::default();
        for e in [
            login("l.1", "bo b", false),
            login("l.2", "bo b", true),
            purchase("p1", "ann", "Blue Mug", 1250),
            click("c1", "ann", 0),
        ] {
            p.add(&e);
        }
        assert_eq!(
            p.totals,
            Tallies {
                n: 4,
                cents: 1250,
                failed: 1
            }
        );
        assert_eq!(
            p.minutes[&2],
            Tallies {
                n: 2,
                cents: 0,
                failed: 1
            }
        );
        assert_eq!(
            p.minutes[&1],
            Tallies {
                n: 1,
                cents: 1250,
                failed: 0
            }
        );
        assert_eq!(p.minutes[&0].n, 1);
        assert_eq!(
            p.products["Blue Mug"],
            Product {
                purchases: 1,
                revenue_cents: 1250
            }
        );
        assert_eq!(p.failed_logins, BTreeMap::from([("bo b".to_string(), 1)]));
        let text = serde_json::to_string(&p.minutes[&0]).expect("json");
        assert_eq!(text, r#"{"n":1}"#, "zero counters are left out");
    }

    #[test]
    fn compact_keeps_the_newest_minutes() {
        let mut p = PartitionCounts::default();
        for m in 0..(KEPT_MINUTES as u64 + 10) {
            p.add(&click(&format!("c{m}"), "ann", m * 60_000));
        }
        p.compact();
        assert_eq!(p.minutes.len(), KEPT_MINUTES);
        assert_eq!(p.minutes.keys().next(), Some(&10));
        assert_eq!(
            p.totals.n,
            KEPT_MINUTES as u64 + 10,
            "totals keep everything"
        );
    }

    #[test]
    fn expected_aggregates_count_each_event_once() {
        let mut events = vec![
            click("c1", "ann", 0),
            click("c2", "ann", 1_000),
            click("c3", "bob", 61_000),
            purchase("p1", "ann", "mug", 500),
            purchase("p2", "bob", "mug", 700),
            purchase("p3", "bob", "hat", 100),
        ];
        for i in 0..5 {
            events.push(login(&format!("l{i}"), "eve", false));
        }
        events.push(login("l9", "eve", true));
        events.push(login("l10", "ann", false));
        // Duplicates: the same ids again.
        let dups: Vec<AnyEvent> = events.clone();
        events.extend(dups);
        // Same id, different kind: a different event.
        events.push(login("c1", "zed", true));

        let a = Aggregates::from_events(&events, DEFAULT_FLAG_THRESHOLD);
        assert_eq!(
            a.totals,
            Counts {
                clicks: 3,
                purchases: 3,
                logins: 8,
                failed_logins: 6,
                revenue_cents: 1300
            }
        );
        assert_eq!(a.minutes[&0].counts.clicks, 2);
        assert_eq!(a.minutes[&0].active_users, 1);
        assert_eq!(a.minutes[&1].counts.clicks, 1);
        assert_eq!(a.minutes[&1].counts.purchases, 3);
        assert_eq!(a.minutes[&1].counts.revenue_cents, 1300);
        assert_eq!(a.minutes[&1].active_users, 2);
        assert_eq!(a.minutes[&2].counts.logins, 8);
        assert_eq!(a.minutes[&2].counts.failed_logins, 6);
        assert_eq!(a.minutes[&2].active_users, 3);
        assert_eq!(
            a.products["mug"],
            Product {
                purchases: 2,
                revenue_cents: 1200
            }
        );
        assert_eq!(a.failed_logins["eve"], 5);
        assert_eq!(a.failed_logins["ann"], 1);
        assert_eq!(a.flagged, BTreeSet::from(["eve".to_string()]));
        assert_eq!(a.top_products(1), vec![("mug", a.products["mug"])]);
        assert_eq!(a.top_failing_users(5), vec![("eve", 5), ("ann", 1)]);
        assert_eq!(a.totals.events(), 14);
    }
}
