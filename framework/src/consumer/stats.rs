//! [`ConsumerStats`]: one consumer's counters, updated as deliveries settle and read by
//! `/metrics`, `/readyz` and the counts [`crate::Running::wait`] returns.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::outcome::Reason;

/// Upper bounds of the attempts histograms: every count up to 5 (the default
/// `max_deliver`) on its own, then coarser.
const ATTEMPT_BUCKETS: [f64; 9] = [1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 20.0, 50.0];

/// Counters for one consumer, updated as deliveries settle.
#[derive(Debug)]
pub struct ConsumerStats {
    /// Deliveries received.
    pub received: AtomicU64,
    /// Acked after success.
    pub acked: AtomicU64,
    /// Nak'ed for a retry.
    pub retried: AtomicU64,
    /// Dead-lettered, by [`Reason`] in [`Reason::ALL`] order.
    pub dead_lettered: [AtomicU64; Reason::ALL.len()],
    /// Handler panics caught.
    pub panics: AtomicU64,
    /// Handler timeouts.
    pub timeouts: AtomicU64,
    /// Dead-letter publishes that failed (the original was kept).
    pub dead_letter_failures: AtomicU64,
    /// Originals held now on their last delivery, with progress acks, while their
    /// dead-letter copy is retried (each holds a handler slot, for a bounded time).
    pub dead_letters_held: AtomicUsize,
    /// Last deliveries whose copy could not be stored within the hold limit, handed to
    /// the safety net with a nak (its max-deliveries advisory carries them on).
    pub dead_letters_handed_over: AtomicU64,
    /// The last dead-letter publish failure not yet followed by a stored copy: when, and
    /// the error (for `/readyz`).
    dead_letter_trouble: Mutex<Option<(std::time::Instant, String)>>,
    /// The run-time check of this consumer's dead-letter stream (set when it runs).
    pub(crate) dead_letter_guard: std::sync::OnceLock<Arc<crate::dead_letter::StreamGuard>>,
    /// Acks, naks, terms and progress acks that could not be sent (the connection was
    /// gone): the server redelivers the message after its ack wait. A failed ack is
    /// counted here, not in `acked`.
    pub settle_failures: AtomicU64,
    /// Deliveries that never started (shutdown) and were handed back at once.
    pub released: AtomicU64,
    /// Deliveries with attempt > 1.
    pub redelivered: AtomicU64,
    /// Deliveries received and not yet settled (a dead letter settling after its
    /// handler gave back its slot included).
    pub in_flight: AtomicUsize,
    /// Bytes of the dead letters settling after their handler gave back its slot
    /// (bounded, see `delivery::Slot`).
    pub(crate) settling_bytes: AtomicUsize,
    /// The most deliveries ever in flight at once.
    pub peak_in_flight: AtomicUsize,
    /// Times the consumer was found missing and recreated.
    pub recreated: AtomicU64,
    /// Pull sessions started (1 + recoveries).
    pub sessions: AtomicU64,
    /// Sum of handler run times, in microseconds.
    pub handler_micros: AtomicU64,
    /// Handler run times (for `/metrics`).
    pub handler_seconds: Histogram,
    /// Deliveries it took messages to be acked (the attempt that succeeded).
    pub attempts_acked: Histogram,
    /// Deliveries it took messages to be dead-lettered (the attempt that gave up).
    pub attempts_dead_lettered: Histogram,
    /// Server-side: messages not yet delivered (polled).
    pub server_pending: AtomicU64,
    /// Server-side: messages delivered and not acknowledged (polled).
    pub server_ack_pending: AtomicU64,
    /// Server-side: the consumer's ack floor, the stream sequence up to which every
    /// message it delivers is acknowledged (polled; it only grows). A consumer deleted
    /// behind the worker's back is recreated to resume after it.
    pub server_ack_floor: AtomicU64,
    /// When the ack floor was last read from the server, as milliseconds since `born`
    /// (`u64::MAX`: never).
    ack_floor_read_ms: AtomicU64,
    /// True while a pull session is running.
    pulling: AtomicBool,
    /// True while another replica pulls this partition consumer (see `partition`).
    standby: AtomicBool,
    /// When the loop last reported in, as milliseconds since `born`.
    last_tick_ms: AtomicU64,
    born: std::time::Instant,
}

impl Default for ConsumerStats {
    fn default() -> Self {
        ConsumerStats {
            received: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: Default::default(),
            panics: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            dead_letter_failures: AtomicU64::new(0),
            dead_letters_held: AtomicUsize::new(0),
            dead_letters_handed_over: AtomicU64::new(0),
            dead_letter_trouble: Mutex::new(None),
            dead_letter_guard: std::sync::OnceLock::new(),
            settle_failures: AtomicU64::new(0),
            released: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            settling_bytes: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            recreated: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            handler_micros: AtomicU64::new(0),
            handler_seconds: Histogram::new(exponential_buckets(0.0005, 2.5, 14)),
            attempts_acked: Histogram::new(ATTEMPT_BUCKETS),
            attempts_dead_lettered: Histogram::new(ATTEMPT_BUCKETS),
            server_pending: AtomicU64::new(0),
            server_ack_pending: AtomicU64::new(0),
            server_ack_floor: AtomicU64::new(0),
            ack_floor_read_ms: AtomicU64::new(u64::MAX),
            pulling: AtomicBool::new(false),
            standby: AtomicBool::new(false),
            last_tick_ms: AtomicU64::new(0),
            born: std::time::Instant::now(),
        }
    }
}

impl ConsumerStats {
    /// Now, as milliseconds since `born`: how the moments kept in atomics are stored.
    /// Never `u64::MAX`, which marks "never".
    fn ms_since_born(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Time since `ms` (a moment stored by [`Self::ms_since_born`]).
    fn since(&self, ms: u64) -> Duration {
        self.born
            .elapsed()
            .saturating_sub(Duration::from_millis(ms))
    }

    /// Notes an ack floor just read from the server (it only grows, so the highest
    /// reading is kept) and when it was read.
    pub(crate) fn note_ack_floor(&self, stream_sequence: u64) {
        self.server_ack_floor
            .fetch_max(stream_sequence, Ordering::Relaxed);
        self.ack_floor_read_ms
            .store(self.ms_since_born(), Ordering::Relaxed);
    }

    /// How long ago the ack floor was last read from the server; `None` if never.
    pub(crate) fn ack_floor_age(&self) -> Option<Duration> {
        match self.ack_floor_read_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(self.since(ms)),
        }
    }

    /// The loop reports in (for liveness).
    pub(crate) fn tick(&self) {
        self.last_tick_ms
            .store(self.ms_since_born(), Ordering::Relaxed);
    }

    /// Time since the loop last reported in.
    pub fn since_last_tick(&self) -> Duration {
        self.since(self.last_tick_ms.load(Ordering::Relaxed))
    }

    /// True while a pull session runs (the consumer exists and is being pulled from).
    pub fn is_pulling(&self) -> bool {
        self.pulling.load(Ordering::Relaxed)
    }

    /// A pull session started (`true`) or ended (`false`).
    pub(crate) fn set_pulling(&self, pulling: bool) {
        self.pulling.store(pulling, Ordering::Relaxed);
    }

    /// True while this is a partition consumer that another replica pulls: not pulling
    /// it here is then as it should be (readiness does not wait for it).
    pub fn is_standby(&self) -> bool {
        self.standby.load(Ordering::Relaxed)
    }

    /// This replica does not hold (`true`) or holds (`false`) the partition.
    pub(crate) fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::Relaxed);
    }

    /// A dead-letter publish failed with `error`.
    pub(crate) fn dead_letter_failed(&self, error: &dyn std::fmt::Display) {
        self.dead_letter_failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut trouble) = self.dead_letter_trouble.lock() {
            *trouble = Some((std::time::Instant::now(), error.to_string()));
        }
    }

    /// A dead-letter copy was stored: the trouble, if any, is over.
    pub(crate) fn dead_letter_stored(&self) {
        if let Ok(mut trouble) = self.dead_letter_trouble.lock() {
            *trouble = None;
        }
    }

    /// Why this consumer's dead letters are not being stored, when they are not: an
    /// original held waiting for its copy, or a failed copy within `recent` not followed
    /// by a stored one (by this consumer, or by the safety net for it). The text names
    /// the count and the last error.
    pub fn dead_letter_trouble(&self, recent: Duration) -> Option<String> {
        let held = self.dead_letters_held.load(Ordering::Relaxed);
        let stored_since = |at| {
            self.dead_letter_guard
                .get()
                .is_some_and(|g| g.stored_since(at))
        };
        let last = self
            .dead_letter_trouble
            .lock()
            .ok()
            .and_then(|t| t.clone())
            .filter(|(at, _)| held > 0 || !stored_since(*at));
        match last {
            Some((_, error)) if held > 0 => Some(format!(
                "{held} original(s) held waiting for a dead-letter copy that cannot be stored: {error}"
            )),
            Some((at, error)) if at.elapsed() < recent => Some(format!(
                "a dead-letter copy could not be stored {} ago: {error}",
                humantime::format_duration(Duration::from_secs(at.elapsed().as_secs()))
            )),
            _ => None,
        }
    }

    /// Dead letters recorded for `reason`.
    pub fn dead_letters(&self, reason: Reason) -> u64 {
        self.dead_lettered[reason_index(reason)].load(Ordering::Relaxed)
    }

    /// One more message acked, at delivery number `attempt` (counted and observed).
    pub(crate) fn count_ack(&self, attempt: u64) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        self.observe_attempts(true, attempt);
    }

    /// One more dead letter for `reason`.
    pub(crate) fn count_dead_letter(&self, reason: Reason) {
        self.dead_lettered[reason_index(reason)].fetch_add(1, Ordering::Relaxed);
    }

    /// A message reached its end (acked, or dead-lettered when `acked` is false) at
    /// delivery number `attempt`.
    pub(crate) fn observe_attempts(&self, acked: bool, attempt: u64) {
        let histogram = if acked {
            &self.attempts_acked
        } else {
            &self.attempts_dead_lettered
        };
        // Attempts are small counts: exact as f64.
        histogram.observe(attempt as f64);
    }
}

/// Where `reason` is counted in [`ConsumerStats::dead_lettered`].
fn reason_index(reason: Reason) -> usize {
    Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ack_floor_keeps_its_highest_reading_and_when_it_was_read() {
        let stats = ConsumerStats::default();
        assert_eq!(stats.ack_floor_age(), None, "never read");
        stats.note_ack_floor(40);
        stats.note_ack_floor(30);
        assert_eq!(stats.server_ack_floor.load(Ordering::Relaxed), 40);
        let age = stats.ack_floor_age().expect("read");
        assert!(age < Duration::from_secs(1), "{age:?}");
    }
}
