//! What the dashboard page shows, as JSON (`GET /api/summary`): a pure function of a
//! [`Snapshot`] read by [`crate::aggregates::read`], the same read `workers stats` does.
//!
//! Money and clock texts come from [`crate::report`], so the page and `stats` print the
//! same `$1,234.56` and `HH:MM`; the page only places them.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use serde::Serialize;

use crate::aggregates::{Counts, Minute, Snapshot};
use crate::report;

/// Most flagged users listed by name (the count is always complete).
pub const FLAGGED_LISTED: usize = 50;

/// The dashboard's data at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// When it was read, unix milliseconds.
    pub read_at_ms: u64,
    /// How often the page asks again, in milliseconds.
    pub refresh_ms: u64,
    /// All time: events per kind, failed logins, revenue.
    pub totals: Totals,
    /// Every minute of the window, oldest first, minutes without events included (as
    /// zeros), so the chart's x axis is time.
    pub minutes: Vec<MinuteRow>,
    /// Revenue of the window's minutes, in cents.
    pub window_revenue_cents: u64,
    /// The same as `stats` prints money.
    pub window_revenue: String,
    /// Distinct users active in the window's last (current) minute.
    pub active_users: u64,
    /// Products by revenue, highest first.
    pub top_products: Vec<ProductRow>,
    /// Users by failed logins, most first.
    pub failing_users: Vec<UserRow>,
    /// How many users are flagged.
    pub flagged_count: u64,
    /// Flagged users, by name, at most [`FLAGGED_LISTED`].
    pub flagged: Vec<String>,
    /// Failed logins after which a user is flagged.
    pub flag_threshold: u64,
    /// Events being counted while this was read (0 at rest).
    pub pending: u64,
}

/// All-time counts and the revenue as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Events per kind, failed logins, revenue in cents.
    #[serde(flatten)]
    pub counts: Counts,
    /// Events of every kind.
    pub events: u64,
    /// The revenue as `stats` prints it.
    pub revenue: String,
}

/// One minute of the chart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MinuteRow {
    /// Unix minute.
    pub minute: u64,
    /// `HH:MM` UTC.
    pub label: String,
    /// Its counts and active users.
    #[serde(flatten)]
    pub counts: Minute,
}

/// One product of the top list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProductRow {
    /// The product's name, as the events carry it (shown as text, never as markup).
    pub name: String,
    /// Purchases.
    pub purchases: u64,
    /// Revenue in cents.
    pub revenue_cents: u64,
    /// The revenue as `stats` prints it.
    pub revenue: String,
}

/// One user of the failed-logins list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserRow {
    /// The user, as the events carry it (shown as text, never as markup).
    pub user: String,
    /// Failed logins.
    pub failed_logins: u64,
    /// Whether the user is flagged.
    pub flagged: bool,
}

/// How much of the aggregates the page shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SummaryOptions {
    /// Products and users listed.
    pub top: usize,
    /// Failed logins after which a user is flagged (for the heading).
    pub flag_threshold: u64,
    /// How often the page asks again, in milliseconds.
    pub refresh_ms: u64,
}

impl Summary {
    /// The page's data from `snapshot`, for the minutes of `window` (oldest first).
    pub fn new(
        snapshot: &Snapshot,
        window: RangeInclusive<u64>,
        read_at_ms: u64,
        options: &SummaryOptions,
    ) -> Summary {
        let a = &snapshot.aggregates;
        let minutes: Vec<MinuteRow> = window
            .clone()
            .map(|minute| MinuteRow {
                minute,
                label: report::clock(minute),
                counts: a.minutes.get(&minute).copied().unwrap_or_default(),
            })
            .collect();
        let active_users = a
            .minutes
            .get(window.end())
            .map(|m| m.active_users)
            .unwrap_or(0);
        let window_revenue_cents = minutes.iter().map(|m| m.counts.counts.revenue_cents).sum();
        Summary {
            read_at_ms,
            refresh_ms: options.refresh_ms,
            totals: Totals {
                counts: a.totals,
                events: a.totals.events(),
                revenue: report::money(a.totals.revenue_cents),
            },
            minutes,
            window_revenue_cents,
            window_revenue: report::money(window_revenue_cents),
            active_users,
            top_products: a
                .top_products(options.top)
                .into_iter()
                .map(|(name, p)| ProductRow {
                    name: name.to_string(),
                    purchases: p.purchases,
                    revenue_cents: p.revenue_cents,
                    revenue: report::money(p.revenue_cents),
                })
                .collect(),
            failing_users: a
                .top_failing_users(options.top)
                .into_iter()
                .map(|(user, failed_logins)| UserRow {
                    user: user.to_string(),
                    failed_logins,
                    flagged: a.flagged.contains(user),
                })
                .collect(),
            flagged_count: a.flagged.len() as u64,
            flagged: a.flagged.iter().take(FLAGGED_LISTED).cloned().collect(),
            flag_threshold: options.flag_threshold,
            pending: snapshot.pending,
        }
    }
}

/// The minutes of `recent` (read just now) over those of `older` (read a while ago):
/// a minute read in both keeps its recent counts.
pub(crate) fn merge_minutes(
    recent: &BTreeMap<u64, Minute>,
    older: &BTreeMap<u64, Minute>,
) -> BTreeMap<u64, Minute> {
    let mut merged = older.clone();
    merged.extend(recent.iter().map(|(minute, m)| (*minute, *m)));
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregates::Aggregates;
    use crate::events::{AnyEvent, Click, Login, Purchase};

    fn events() -> Vec<AnyEvent> {
        let mut events = vec![
            AnyEvent::Click(Click {
                id: "c1".into(),
                user: "ann".into(),
                time: 10 * 60_000,
                page: "/".into(),
            }),
            AnyEvent::Purchase(Purchase {
                id: "p1".into(),
                user: "ann".into(),
                time: 12 * 60_000,
                product: "<img src=x onerror=alert(1)>".into(),
                amount: 123_456,
            }),
            AnyEvent::Purchase(Purchase {
                id: "p2".into(),
                user: "bob".into(),
                time: 12 * 60_000 + 5,
                product: "mug".into(),
                amount: 500,
            }),
        ];
        for i in 0..3 {
            events.push(AnyEvent::Login(Login {
                id: format!("l{i}"),
                user: "eve".into(),
                time: 12 * 60_000,
                success: false,
                method: None,
            }));
        }
        events.push(AnyEvent::Login(Login {
            id: "l9".into(),
            user: "zed".into(),
            time: 12 * 60_000,
            success: false,
            method: None,
        }));
        events
    }

    fn snapshot(pending: u64) -> Snapshot {
        Snapshot {
            aggregates: Aggregates::from_events(&events(), 3),
            pending,
        }
    }

    fn options() -> SummaryOptions {
        SummaryOptions {
            top: 5,
            flag_threshold: 3,
            refresh_ms: 2000,
        }
    }

    #[test]
    fn every_minute_of_the_window_is_a_row_and_the_texts_are_the_reports() {
        let snapshot = snapshot(1);
        let s = Summary::new(&snapshot, 9..=12, 42, &options());
        let minutes: Vec<(u64, &str, u64, u64)> = s
            .minutes
            .iter()
            .map(|m| {
                (
                    m.minute,
                    m.label.as_str(),
                    m.counts.counts.events(),
                    m.counts.active_users,
                )
            })
            .collect();
        assert_eq!(
            minutes,
            [
                (9, "00:09", 0, 0),
                (10, "00:10", 1, 1),
                (11, "00:11", 0, 0),
                (12, "00:12", 6, 4)
            ]
        );
        assert_eq!(s.active_users, 4, "users of the current minute");
        assert_eq!(s.totals.events, 7);
        assert_eq!(s.totals.counts.failed_logins, 4);
        assert_eq!(s.totals.revenue, "$1,239.56");
        let outside = Summary::new(&snapshot, 11..=11, 42, &options());
        assert_eq!(outside.window_revenue, "$0.00");
        assert_eq!(s.window_revenue, "$1,239.56");
        assert_eq!(s.top_products[0].name, "<img src=x onerror=alert(1)>");
        assert_eq!(s.top_products[0].revenue, "$1,234.56");
        assert_eq!(s.top_products[1].name, "mug");
        assert_eq!(
            s.failing_users,
            [
                UserRow {
                    user: "eve".into(),
                    failed_logins: 3,
                    flagged: true
                },
                UserRow {
                    user: "zed".into(),
                    failed_logins: 1,
                    flagged: false
                }
            ]
        );
        assert_eq!(
            (s.flagged_count, s.flagged.clone()),
            (1, vec!["eve".into()])
        );
        assert_eq!((s.pending, s.read_at_ms, s.refresh_ms), (1, 42, 2000));
    }

    #[test]
    fn the_json_has_flat_counts() {
        let s = Summary::new(&snapshot(0), 12..=12, 0, &options());
        let json = serde_json::to_value(&s).expect("serialize");
        assert_eq!(json["totals"]["clicks"], 1);
        assert_eq!(json["totals"]["revenue_cents"], 123_956);
        assert_eq!(json["minutes"][0]["logins"], 4);
        assert_eq!(json["minutes"][0]["active_users"], 4);
        assert_eq!(
            json["top_products"][0]["name"],
            "<img src=x onerror=alert(1)>"
        );
    }

    #[test]
    fn recent_minutes_win_over_older_reads() {
        let minute = |clicks| Minute {
            counts: Counts {
                clicks,
                ..Counts::default()
            },
            active_users: 1,
        };
        let older = BTreeMap::from([(1, minute(5)), (2, minute(1))]);
        let recent = BTreeMap::from([(2, minute(3)), (3, minute(4))]);
        let merged = merge_minutes(&recent, &older);
        let clicks: Vec<(u64, u64)> = merged.iter().map(|(k, m)| (*k, m.counts.clicks)).collect();
        assert_eq!(clicks, [(1, 5), (2, 3), (3, 4)]);
    }
}
