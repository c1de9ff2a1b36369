//! The aggregates as text for people (`workers stats`, `workers demo`).

use std::fmt::Write as _;

use std::sync::atomic::Ordering;

use jetworker::Running;

use crate::aggregates::Snapshot;

/// Messages the consumers of `replicas` settled so far: acked or dead-lettered (what a
/// drain waits for).
pub fn settled(replicas: &[Running]) -> u64 {
    replicas
        .iter()
        .flat_map(|r| r.stats().values())
        .map(|s| {
            s.acked.load(Ordering::Relaxed)
                + s.dead_lettered
                    .iter()
                    .map(|d| d.load(Ordering::Relaxed))
                    .sum::<u64>()
        })
        .sum()
}

/// How much of the aggregates to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportOptions {
    /// Products listed.
    pub top_products: usize,
    /// Users with failed logins listed.
    pub top_users: usize,
    /// Flag threshold, for the heading.
    pub flag_threshold: u64,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            top_products: 5,
            top_users: 5,
            flag_threshold: crate::aggregates::DEFAULT_FLAG_THRESHOLD,
        }
    }
}

/// Cents as dollars: `123456` -> `$1,234.56`.
pub fn money(cents: u64) -> String {
    let dollars = (cents / 100).to_string();
    let mut grouped = String::new();
    for (i, c) in dollars.chars().enumerate() {
        if i > 0 && (dollars.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("${grouped}.{:02}", cents % 100)
}

/// A unix minute as `HH:MM` UTC.
pub fn clock(minute: u64) -> String {
    let of_day = minute % 1440;
    format!("{:02}:{:02}", of_day / 60, of_day % 60)
}

/// Renders `snapshot` as a few short tables.
pub fn render(snapshot: &Snapshot, options: &ReportOptions) -> String {
    let a = &snapshot.aggregates;
    let t = &a.totals;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "totals: {} events = {} clicks, {} purchases, {} logins ({} failed); revenue {}",
        t.events(),
        t.clicks,
        t.purchases,
        t.logins,
        t.failed_logins,
        money(t.revenue_cents)
    );
    if !a.minutes.is_empty() {
        let _ = writeln!(
            out,
            "  minute UTC  {:>7} {:>9} {:>6} {:>6} {:>12} {:>6}",
            "clicks", "purchases", "logins", "failed", "revenue", "active"
        );
        for (minute, m) in &a.minutes {
            let c = &m.counts;
            let _ = writeln!(
                out,
                "  {:<10}  {:>7} {:>9} {:>6} {:>6} {:>12} {:>6}",
                clock(*minute),
                c.clicks,
                c.purchases,
                c.logins,
                c.failed_logins,
                money(c.revenue_cents),
                m.active_users
            );
        }
    }
    let top = a.top_products(options.top_products);
    if !top.is_empty() {
        let _ = writeln!(out, "top products by revenue:");
        for (name, p) in top {
            let _ = writeln!(
                out,
                "  {name:<22} {:>5} purchases {:>12}",
                p.purchases,
                money(p.revenue_cents)
            );
        }
    }
    let failing = a.top_failing_users(options.top_users);
    if !failing.is_empty() {
        let _ = writeln!(out, "most failed logins:");
        for (user, n) in failing {
            let _ = writeln!(out, "  {user:<28} {n:>4}");
        }
    }
    let _ = write!(
        out,
        "flagged users (>= {} failed logins): {}",
        options.flag_threshold,
        a.flagged.len()
    );
    if !a.flagged.is_empty() {
        let names: Vec<&str> = a.flagged.iter().take(10).map(String::as_str).collect();
        let more = a.flagged.len().saturating_sub(names.len());
        let _ = write!(out, " — {}", names.join(", "));
        if more > 0 {
            let _ = write!(out, " and {more} more");
        }
    }
    out.push('\n');
    if snapshot.pending > 0 {
        let _ = writeln!(out, "in flight: {} events being counted", snapshot.pending);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregates::Aggregates;
    use crate::events::{AnyEvent, Login, Purchase};

    #[test]
    fn money_and_clock() {
        assert_eq!(money(0), "$0.00");
        assert_eq!(money(5), "$0.05");
        assert_eq!(money(123_456), "$1,234.56");
        assert_eq!(money(100_000_000), "$1,000,000.00");
        assert_eq!(clock(0), "00:00");
        assert_eq!(clock(1440 + 61), "01:01");
    }

    #[test]
    fn renders_every_section() {
        let mut events = vec![AnyEvent::Purchase(Purchase {
            id: "p".into(),
            user: "ann".into(),
            time: 60_000,
            product: "Blue Mug".into(),
            amount: 1999,
        })];
        for i in 0..5 {
            events.push(AnyEvent::Login(Login {
                id: format!("l{i}"),
                user: "eve".into(),
                time: 60_000,
                success: false,
                method: None,
            }));
        }
        let snapshot = Snapshot {
            aggregates: Aggregates::from_events(&events, 5),
            pending: 2,
        };
        let text = render(&snapshot, &ReportOptions::default());
        assert!(text.contains("revenue $19.99"), "{text}");
        assert!(text.contains("00:01"), "{text}");
        assert!(text.contains("Blue Mug"), "{text}");
        assert!(text.contains("eve"), "{text}");
        assert!(
            text.contains("flagged users (>= 5 failed logins): 1 — eve"),
            "{text}"
        );
        assert!(text.contains("in flight: 2"), "{text}");
    }
}
