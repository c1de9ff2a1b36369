//! How many messages the pull loop may hold that no handler works on yet: what the
//! consumer finishes within a short horizon at the pace it is measured to run, on top of
//! its free handler slots, bounded by `max_ack_pending` and by bytes.
//!
//! A message the client holds has its ack timer running on the server. Holding only what
//! the handlers finish within [`horizon`] (a tenth of `ack_wait`, at most
//! [`HORIZON_MAX`]) keeps a buffered message far from its ack wait; the pull loop also
//! sends a progress ack for one that waits longer than a third of it anyway (the
//! handlers slowed down after the pull). Slots bound how many handlers run at once, not
//! how much is prefetched: fast handlers get a few large pulls instead of a pull per
//! few messages.

use std::time::Duration;

use tokio::time::Instant;

/// The longest horizon: what is held beyond the free slots is at most this much work,
/// which is also the most that is handed back at shutdown.
pub(super) const HORIZON_MAX: Duration = Duration::from_millis(200);
/// Bytes the loop may hold beyond its free handler slots (payloads, headers, subjects),
/// so large messages do not fill the memory the count allows.
pub(super) const PREFETCH_BYTES: usize = 8 * 1024 * 1024;
/// The shortest window a pace sample is taken over: shorter ones see bursts, not a pace.
const SAMPLE_WINDOW: Duration = Duration::from_millis(250);
/// Finished messages that close a window early (after [`SAMPLE_WINDOW_MIN`]): that many
/// are a pace, not a burst, and fast handlers get their prefetch within milliseconds.
const SAMPLE_MESSAGES: u64 = 256;
/// The shortest window [`SAMPLE_MESSAGES`] close.
const SAMPLE_WINDOW_MIN: Duration = Duration::from_millis(10);
/// The size assumed for messages before the first one arrives.
const INITIAL_MESSAGE_BYTES: f64 = 1024.0;

/// How far ahead the loop prefetches: a tenth of the ack wait, at most [`HORIZON_MAX`].
pub(super) fn horizon(ack_wait: Duration) -> Duration {
    (ack_wait / 10).min(HORIZON_MAX)
}

/// The pace at which the consumer finishes messages, measured in windows of at least
/// [`SAMPLE_WINDOW`] and smoothed; and the mean size of what it receives.
#[derive(Debug)]
pub(super) struct Pace {
    window_start: Instant,
    finished_at_start: u64,
    /// Finished messages per second (0 until the first window closes).
    per_second: f64,
    mean_bytes: f64,
}

impl Pace {
    /// A pace not yet measured, starting now with `finished` messages done so far.
    pub(super) fn new(now: Instant, finished: u64) -> Pace {
        Pace {
            window_start: now,
            finished_at_start: finished,
            per_second: 0.0,
            mean_bytes: INITIAL_MESSAGE_BYTES,
        }
    }

    /// Records that `finished` messages are done so far (a running total). Each window
    /// of at least [`SAMPLE_WINDOW`] (or of [`SAMPLE_MESSAGES`] finished) is averaged with the pace before it, except that a
    /// window in which nothing finished sets the pace to zero: handlers that are stuck
    /// (a slow dependency) or idle get no prefetch beyond their free slots until they
    /// are measured to finish work again, one window later.
    pub(super) fn observe(&mut self, now: Instant, finished: u64) {
        let elapsed = now.saturating_duration_since(self.window_start);
        let done = finished.saturating_sub(self.finished_at_start);
        let enough =
            elapsed >= SAMPLE_WINDOW || (done >= SAMPLE_MESSAGES && elapsed >= SAMPLE_WINDOW_MIN);
        if !enough {
            return;
        }
        let sample = done as f64 / elapsed.as_secs_f64();
        self.per_second = if done == 0 || self.per_second == 0.0 {
            sample
        } else {
            (self.per_second + sample) / 2.0
        };
        self.window_start = now;
        self.finished_at_start = finished;
    }

    /// A message of `bytes` arrived.
    pub(super) fn received(&mut self, bytes: usize) {
        self.mean_bytes += (bytes as f64 - self.mean_bytes) / 16.0;
    }

    /// Messages finished per second, as measured.
    pub(super) fn per_second(&self) -> f64 {
        self.per_second
    }

    /// The mean size of a message received, in bytes.
    pub(super) fn mean_bytes(&self) -> f64 {
        self.mean_bytes
    }
}

/// What the loop holds and may hold now.
#[derive(Debug, Clone, Copy)]
pub(super) struct Holding {
    /// Handler slots free right now.
    pub free_slots: usize,
    /// Handlers running.
    pub running: usize,
    /// Arrived and waiting for a slot.
    pub waiting: usize,
    /// Bytes of those waiting.
    pub waiting_bytes: usize,
    /// Asked for and not yet arrived.
    pub requested: usize,
}

/// The bound on what one consumer's loop holds unstarted (waiting plus asked for).
#[derive(Debug, Clone, Copy)]
pub(super) struct Bound {
    /// The consumer's ack wait: buffered work stays within a tenth of it.
    pub ack_wait: Duration,
    /// The server lets no more out unacknowledged.
    pub max_ack_pending: usize,
    /// Bytes held beyond the free slots.
    pub bytes: usize,
}

impl Bound {
    /// How many messages the loop may hold unstarted now: its free slots, plus what the
    /// handlers finish within the [`horizon`] at `per_second` (capped by `bytes` at
    /// `mean_bytes` a message); all of it within `max_ack_pending` with the running
    /// handlers counted.
    pub(super) fn limit(&self, holding: &Holding, per_second: f64, mean_bytes: f64) -> usize {
        let ahead = (per_second * horizon(self.ack_wait).as_secs_f64()).floor();
        let bytes_left = self.bytes.saturating_sub(holding.waiting_bytes) as f64;
        let ahead_by_bytes = (bytes_left / mean_bytes.max(1.0)).floor();
        // Both are finite and non-negative: the float-to-int cast saturates.
        let ahead = ahead.min(ahead_by_bytes).max(0.0) as usize;
        let by_server = self.max_ack_pending.saturating_sub(holding.running);
        (holding.free_slots + ahead).min(by_server)
    }

    /// How many messages to ask the server for now (0: none). A pull asks for at least a
    /// quarter of the limit unless nothing is asked for yet, so a fast consumer makes
    /// few large pulls rather than many small ones.
    pub(super) fn pull_size(
        &self,
        holding: &Holding,
        per_second: f64,
        mean_bytes: f64,
        nothing_open: bool,
    ) -> usize {
        let limit = self.limit(holding, per_second, mean_bytes);
        let want = limit.saturating_sub(holding.waiting + holding.requested);
        let threshold = (limit / 4).max(1);
        if want > 0 && (want >= threshold || nothing_open) {
            want
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Bound = Bound {
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 1000,
        bytes: PREFETCH_BYTES,
    };

    fn idle(free_slots: usize) -> Holding {
        Holding {
            free_slots,
            running: 0,
            waiting: 0,
            waiting_bytes: 0,
            requested: 0,
        }
    }

    #[test]
    fn the_horizon_is_a_tenth_of_the_ack_wait_at_most_200ms() {
        assert_eq!(horizon(Duration::from_secs(1)), Duration::from_millis(100));
        assert_eq!(horizon(Duration::from_secs(2)), Duration::from_millis(200));
        assert_eq!(horizon(Duration::from_secs(30)), HORIZON_MAX);
    }

    #[test]
    fn limits_as_a_table() {
        let slow = Holding {
            free_slots: 0,
            running: 2,
            ..idle(0)
        };
        // (what is held, pace, mean bytes, limit)
        let table = [
            // Not measured yet: the free slots, as before prefetch.
            (idle(32), 0.0, 100.0, 32),
            // Fast handlers: 200 ms of work, capped by max_ack_pending.
            (idle(32), 3000.0, 100.0, 32 + 600),
            (idle(32), 200_000.0, 100.0, 1000),
            // Slow handlers (2 slots of 300 ms: ~6.7/s): one ahead at most.
            (slow, 6.7, 100.0, 1),
            // Stuck handlers: nothing ahead.
            (slow, 0.0, 100.0, 0),
            // Large messages: the bytes bound (8 MiB / 1 MiB = 8 ahead).
            (idle(4), 3000.0, 1024.0 * 1024.0, 4 + 8),
            // Running handlers count toward max_ack_pending.
            (
                Holding {
                    running: 990,
                    ..idle(10)
                },
                200_000.0,
                100.0,
                10,
            ),
        ];
        for (i, (holding, pace, bytes, limit)) in table.into_iter().enumerate() {
            assert_eq!(BOUND.limit(&holding, pace, bytes), limit, "row {i}");
        }
    }

    #[test]
    fn pulls_are_large_unless_nothing_is_asked_for() {
        let held = Holding {
            waiting: 0,
            requested: 900,
            ..idle(32)
        };
        // 1000 allowed, 900 asked for: 100 more is below a quarter, wait.
        assert_eq!(BOUND.pull_size(&held, 200_000.0, 100.0, false), 0);
        assert_eq!(BOUND.pull_size(&held, 200_000.0, 100.0, true), 100);
        let held = Holding {
            requested: 500,
            ..held
        };
        assert_eq!(BOUND.pull_size(&held, 200_000.0, 100.0, false), 500);
        // One slot free and nothing open: ask for one.
        assert_eq!(BOUND.pull_size(&idle(1), 0.0, 100.0, true), 1);
    }

    #[test]
    fn the_pace_follows_finished_messages_in_windows() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0, 0);
        pace.observe(t0 + Duration::from_millis(5), 300);
        assert_eq!(pace.per_second(), 0.0, "window too short to sample");
        pace.observe(t0 + Duration::from_millis(500), 5000);
        assert!((pace.per_second() - 10_000.0).abs() < 1.0);
        pace.observe(t0 + Duration::from_millis(1000), 7000);
        assert!((pace.per_second() - 7_000.0).abs() < 1.0, "averaged");
        // Nothing finished for a window: no pace, no prefetch beyond the free slots.
        pace.observe(t0 + Duration::from_millis(1500), 7000);
        assert_eq!(pace.per_second(), 0.0);
        // Many finished close a window early: a pace within milliseconds.
        let mut quick = Pace::new(t0, 0);
        quick.observe(t0 + Duration::from_millis(100), 100);
        assert_eq!(quick.per_second(), 0.0, "too few and too short: a burst");
        quick.observe(t0 + Duration::from_millis(200), 400);
        assert!((quick.per_second() - 2_000.0).abs() < 1.0);
        pace.received(100);
        assert!(pace.mean_bytes() < INITIAL_MESSAGE_BYTES);
    }
}
