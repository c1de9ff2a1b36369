//! [`InlinePolling`]: whether the pull loop polls a new delivery once itself before
//! spawning it (see `pull::start`), decided from how long recent first polls took.

use std::time::Duration;

/// A delivery whose first poll (in the pull loop) takes longer than this counts as slow;
/// [`INLINE_SLOW_STREAK`] slow ones in a row mean a CPU-heavy handler.
const INLINE_POLL_LIMIT: Duration = Duration::from_millis(2);
/// Consecutive slow first polls that turn inline polling off (one alone may be the
/// machine pausing the thread, not the handler).
const INLINE_SLOW_STREAK: u32 = 3;
/// Deliveries spawned without a first poll before inline polling is tried again.
const INLINE_OFF_FOR: u32 = 1000;

/// When the pull loop polls a delivery first: on, until a handler shows it works long
/// before its first await; then off for a while, then probed again.
#[derive(Debug, Default)]
pub(super) struct InlinePolling {
    slow_streak: u32,
    off_for: u32,
}

impl InlinePolling {
    /// True when the next delivery should get its first poll in the pull loop.
    pub(super) fn should_poll(&mut self) -> bool {
        if self.off_for > 0 {
            self.off_for -= 1;
            return false;
        }
        true
    }

    /// Records how long a first poll took; true when this turned inline polling off.
    pub(super) fn record(&mut self, first_poll: Duration) -> bool {
        if first_poll <= INLINE_POLL_LIMIT {
            self.slow_streak = 0;
            return false;
        }
        self.slow_streak += 1;
        if self.slow_streak >= INLINE_SLOW_STREAK {
            self.slow_streak = 0;
            self.off_for = INLINE_OFF_FOR;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_polling_turns_off_after_a_streak_and_comes_back() {
        let fast = Duration::from_micros(10);
        let slow = INLINE_POLL_LIMIT + Duration::from_millis(1);
        let mut p = InlinePolling::default();
        assert!(p.should_poll());
        // One slow poll between fast ones is a hiccup, not a CPU-heavy handler.
        assert!(!p.record(slow));
        assert!(!p.record(fast));
        assert!(!p.record(slow));
        assert!(!p.record(slow));
        assert!(p.record(slow), "three in a row turn it off");
        for _ in 0..INLINE_OFF_FOR {
            assert!(!p.should_poll());
        }
        assert!(p.should_poll(), "probed again");
    }
}
