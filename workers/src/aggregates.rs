//! The real-time aggregates: what each event adds ([`applications`], pure), what a set
//! of events implies ([`Aggregates::from_events`], pure, the reference the tests compare
//! against), and reading them back from the bucket ([`read`]).
//!
//! # What is counted
//! - per minute: events per kind, failed logins, revenue (cents), distinct active users;
//! - in total: events per kind, failed logins, revenue;
//! - per product: purchases and revenue;
//! - per user: failed logins, and a flag once they reach the threshold (default 5).
//!
//! Each event is one [`Application`] (its minute record, its totals record and, for a
//! failed login, its user record; marker `seen.<kind>.<id>`), and each (minute, user)
//! pair is one more (the minute's active record; marker `active.<minute>.<user>`), so a
//! user active many times in a minute counts once. Both are applied exactly once by
//! [`crate::counters::apply_once`].

use std::collections::{BTreeMap, BTreeSet};

use async_nats::jetstream::kv;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::counters::{self, Application, CounterError, CounterErrorKind, Delta, Record};
use crate::events::{AnyEvent, Kind};
use crate::keys::{self, SHARDS};

/// Failed logins after which a user is flagged.
pub const DEFAULT_FLAG_THRESHOLD: u64 = 5;

/// Counter names inside records.
pub mod counter {
    /// Events (of the record's kind) or active users.
    pub const EVENTS: &str = "n";
    /// Revenue in cents.
    pub const CENTS: &str = "cents";
    /// Failed logins.
    pub const FAILED: &str = "failed";
    /// Purchases of a product: `product/n/<name>`.
    pub fn product_purchases(product: &str) -> String {
        format!("{PRODUCT_PURCHASES}{product}")
    }
    /// Revenue of a product: `product/cents/<name>`.
    pub fn product_cents(product: &str) -> String {
        format!("{PRODUCT_CENTS}{product}")
    }
    /// Prefix of [`product_purchases`].
    pub const PRODUCT_PURCHASES: &str = "product/n/";
    /// Prefix of [`product_cents`].
    pub const PRODUCT_CENTS: &str = "product/cents/";
}

/// The applications of one event: its own, then its user's activity in its minute.
pub fn applications(event: &AnyEvent) -> [Application; 2] {
    let kind = event.kind();
    let minute = event.minute();
    let shard = keys::shard(event.id());
    let (mut per_minute, mut totals, mut user) = (
        vec![(counter::EVENTS, 1)],
        vec![(counter::EVENTS.to_string(), 1)],
        None,
    );
    match event {
        AnyEvent::Click(_) => {}
        AnyEvent::Purchase(p) => {
            per_minute.push((counter::CENTS, p.amount));
            totals.push((counter::CENTS.to_string(), p.amount));
            totals.push((counter::product_purchases(&p.product), 1));
            totals.push((counter::product_cents(&p.product), p.amount));
        }
        AnyEvent::Login(l) => {
            if !l.success {
                per_minute.push((counter::FAILED, 1));
                totals.push((counter::FAILED.to_string(), 1));
                user = Some(Delta::new(
                    keys::user_record(&l.user),
                    [(counter::FAILED, 1)],
                ));
            }
        }
    }
    let mut deltas = vec![
        Delta::new(keys::minute_record(minute, kind, shard), per_minute),
        Delta::new(
            keys::total_record(kind, shard),
            totals.iter().map(|(name, by)| (name.as_str(), *by)),
        ),
    ];
    deltas.extend(user);
    let own = Application {
        id: event.id().to_string(),
        marker: keys::seen_marker(kind, event.id()),
        deltas,
    };
    let active = Application {
        id: event.user().to_string(),
        marker: keys::active_marker(minute, event.user()),
        deltas: vec![Delta::new(
            keys::active_record(minute, keys::shard(event.user())),
            [(counter::EVENTS, 1)],
        )],
    };
    [own, active]
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

    fn add_record(&mut self, kind: Kind, r: &Record) {
        match kind {
            Kind::Click => self.clicks += r.count(counter::EVENTS),
            Kind::Purchase => {
                self.purchases += r.count(counter::EVENTS);
                self.revenue_cents += r.count(counter::CENTS);
            }
            Kind::Login => {
                self.logins += r.count(counter::EVENTS);
                self.failed_logins += r.count(counter::FAILED);
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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

/// The stored aggregates, plus how many applications are still in flight.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// The aggregates.
    #[serde(flatten)]
    pub aggregates: Aggregates,
    /// Application ids found in `pending` sets of the records read: 0 at rest; more
    /// while events are being processed (or left by dead-lettered ones).
    pub pending: u64,
}

/// Concurrent KV reads while reading a snapshot.
const READ_CONCURRENCY: usize = 32;

/// Reads the aggregates from the bucket: totals, the given `minutes`, products, per-user
/// failures and flags. Reads are not one atomic snapshot: while events flow, counts
/// read later can include events newer than counts read earlier.
pub async fn read(
    kv: &kv::Store,
    minutes: impl IntoIterator<Item = u64>,
) -> Result<Snapshot, CounterError> {
    let mut snapshot = Snapshot::default();

    // Totals and products.
    let total_keys: Vec<(Kind, String)> = Kind::ALL
        .iter()
        .flat_map(|k| (0..SHARDS).map(move |s| (*k, keys::total_record(*k, s))))
        .collect();
    for (kind, record) in read_many(kv, total_keys).await? {
        snapshot.pending += record.pending.len() as u64;
        snapshot.aggregates.totals.add_record(kind, &record);
        if kind == Kind::Purchase {
            for (name, value) in &record.counts {
                if let Some(product) = name.strip_prefix(counter::PRODUCT_PURCHASES) {
                    let p = snapshot
                        .aggregates
                        .products
                        .entry(product.to_string())
                        .or_default();
                    p.purchases += value;
                } else if let Some(product) = name.strip_prefix(counter::PRODUCT_CENTS) {
                    let p = snapshot
                        .aggregates
                        .products
                        .entry(product.to_string())
                        .or_default();
                    p.revenue_cents += value;
                }
            }
        }
    }

    // Minutes.
    let mut minute_keys: Vec<((u64, Option<Kind>), String)> = Vec::new();
    for minute in minutes {
        for s in 0..SHARDS {
            for kind in Kind::ALL {
                minute_keys.push(((minute, Some(kind)), keys::minute_record(minute, kind, s)));
            }
            minute_keys.push(((minute, None), keys::active_record(minute, s)));
        }
    }
    for ((minute, kind), record) in read_many(kv, minute_keys).await? {
        snapshot.pending += record.pending.len() as u64;
        let m = snapshot.aggregates.minutes.entry(minute).or_default();
        match kind {
            Some(kind) => m.counts.add_record(kind, &record),
            None => m.active_users += record.count(counter::EVENTS),
        }
    }
    snapshot
        .aggregates
        .minutes
        .retain(|_, m| !m.counts.is_zero() || m.active_users > 0);

    // Users: failures and flags.
    let user_keys: Vec<(String, String)> = list_keys(kv, keys::USER_PREFIX)
        .await?
        .into_iter()
        .filter_map(|key| Some((keys::user_of(&key, keys::USER_PREFIX)?, key)))
        .collect();
    for (user, record) in read_many(kv, user_keys).await? {
        snapshot.pending += record.pending.len() as u64;
        let failed = record.count(counter::FAILED);
        if failed > 0 {
            snapshot.aggregates.failed_logins.insert(user, failed);
        }
    }
    snapshot.aggregates.flagged = list_keys(kv, keys::FLAG_PREFIX)
        .await?
        .iter()
        .filter_map(|key| keys::user_of(key, keys::FLAG_PREFIX))
        .collect();
    Ok(snapshot)
}

/// Reads records concurrently; absent ones are left out.
async fn read_many<T>(
    kv: &kv::Store,
    keys: Vec<(T, String)>,
) -> Result<Vec<(T, Record)>, CounterError> {
    let found: Vec<Option<(T, Record)>> = futures::stream::iter(keys)
        .map(|(tag, key)| async move {
            Ok::<_, CounterError>(
                counters::read_record(kv, &key)
                    .await?
                    .map(|(r, _)| (tag, r)),
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
    fn applications_of_a_failed_login() {
        let [own, active] = applications(&login("l.1", "bo b", false));
        assert_eq!(own.id, "l.1");
        assert_eq!(own.marker, "seen.login.l=2E1");
        let shard = keys::shard("l.1");
        let records: Vec<&str> = own.deltas.iter().map(|d| d.record.as_str()).collect();
        assert_eq!(
            records,
            [
                format!("m.2.login.{shard}").as_str(),
                format!("t.login.{shard}").as_str(),
                "u.bo=20b"
            ]
        );
        assert_eq!(own.deltas[0].increments.get("failed"), Some(&1));
        assert_eq!(active.id, "bo b");
        assert_eq!(active.marker, "active.2.bo=20b");
        assert_eq!(
            active.deltas[0].record,
            format!("m.2.active.{}", keys::shard("bo b"))
        );
    }

    #[test]
    fn applications_of_a_purchase_and_a_click() {
        let [own, _] = applications(&purchase("p1", "ann", "Blue Mug", 1250));
        assert_eq!(own.deltas.len(), 2);
        let totals = &own.deltas[1].increments;
        assert_eq!(totals.get("n"), Some(&1));
        assert_eq!(totals.get("cents"), Some(&1250));
        assert_eq!(totals.get("product/n/Blue Mug"), Some(&1));
        assert_eq!(totals.get("product/cents/Blue Mug"), Some(&1250));
        let [own, _] = applications(&click("c1", "ann", 0));
        assert_eq!(own.deltas.len(), 2);
        assert_eq!(own.deltas[0].increments.len(), 1);
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
