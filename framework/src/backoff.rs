//! [`Backoff`]: the waits of a retry loop, growing, capped and spread at random.
//!
//! Every retry loop of the runtime waits with one: connecting, provisioning, restoring a
//! consumer, a dead-letter publish held on its last delivery, the publisher. Fixed steps
//! (1, 2, 4 s) would keep replicas in lockstep after an outage: they all fail at the same
//! instant, wait the same time and hit the recovering server together, again and again.
//! With full jitter each wait is drawn at random below a ceiling that grows, so replicas
//! spread out from the first retry on (the scheme AWS measured as the best of the simple
//! ones: "Exponential Backoff And Jitter", Marc Brooker, 2015).

use std::time::Duration;

use rand::Rng;

/// The shortest wait a [`Backoff`] ever returns, even when configured with zero: a retry
/// loop never spins.
const SHORTEST: Duration = Duration::from_millis(1);

/// The waits between the attempts of one retry loop.
///
/// The n-th wait since the last [`reset`](Backoff::reset) is drawn uniformly between
/// half of `initial` and a ceiling that starts at `initial`, doubles with every wait and
/// stops at `max`. So a wait is never zero, never above `max`, never longer than the
/// plain doubling schedule `initial, 2 initial, 4 initial, ...` would wait, and two
/// replicas failing together retry at different times.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    /// The first wait's ceiling; half of it is the floor of every wait.
    initial: Duration,
    /// The highest ceiling.
    max: Duration,
    /// The next wait's ceiling.
    ceiling: Duration,
}

impl Backoff {
    /// Waits starting at about `initial` and growing up to `max` (`initial` is raised to
    /// 1 ms, and `max` to `initial`, when they are smaller).
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(SHORTEST);
        Backoff {
            initial,
            max: max.max(initial),
            ceiling: initial,
        }
    }

    /// The wait before the next attempt; each call raises the ceiling of the next.
    pub(crate) fn next(&mut self) -> Duration {
        self.next_with(&mut rand::thread_rng())
    }

    /// [`Backoff::next`] drawing from `rng` (seeded in tests).
    pub(crate) fn next_with(&mut self, rng: &mut impl Rng) -> Duration {
        let floor = nanos(self.initial / 2);
        let ceiling = nanos(self.ceiling);
        let wait = Duration::from_nanos(rng.gen_range(floor..=ceiling));
        self.ceiling = self.ceiling.saturating_mul(2).min(self.max);
        // Whole milliseconds (logs say "retry_in=932ms", not "932ms 488us 583ns"),
        // unless that would fall below the floor.
        let whole_ms = Duration::from_millis(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        if nanos(whole_ms) >= floor {
            whole_ms
        } else {
            wait
        }
    }

    /// After a success: the next wait is a short one again.
    pub(crate) fn reset(&mut self) {
        self.ceiling = self.initial;
    }
}

/// `d` in nanoseconds, saturating (a wait of 584 years is long enough).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const INITIAL: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    /// The first `n` waits of a fresh `Backoff::new(initial, max)`, drawn with `seed`.
    fn waits(initial: Duration, max: Duration, n: usize, seed: u64) -> Vec<Duration> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut backoff = Backoff::new(initial, max);
        (0..n).map(|_| backoff.next_with(&mut rng)).collect()
    }

    #[test]
    fn every_wait_lies_between_half_the_initial_and_the_doubling_ceiling() {
        for seed in 0..200 {
            for (i, wait) in waits(INITIAL, MAX, 12, seed).into_iter().enumerate() {
                let ceiling = INITIAL.saturating_mul(1 << i).min(MAX);
                assert!(wait >= INITIAL / 2, "wait {i} = {wait:?} below the floor");
                assert!(wait <= ceiling, "wait {i} = {wait:?} above {ceiling:?}");
            }
        }
    }

    #[test]
    fn waits_grow_with_failures() {
        // The average over many replicas roughly doubles per failure until the cap.
        let replicas: Vec<Vec<Duration>> = (0..2000).map(|s| waits(INITIAL, MAX, 7, s)).collect();
        let mean = |i: usize| {
            replicas.iter().map(|w| w[i].as_secs_f64()).sum::<f64>() / replicas.len() as f64
        };
        for i in 1..5 {
            assert!(
                mean(i) > 1.6 * mean(i - 1),
                "wait {i}: {} after {}",
                mean(i),
                mean(i - 1)
            );
        }
        // Capped: the ceiling stays at `max`, so the average stops growing.
        let capped = (INITIAL.as_secs_f64() / 2.0 + MAX.as_secs_f64()) / 2.0;
        assert!((mean(6) - capped).abs() < 1.0, "{} vs {capped}", mean(6));
    }

    #[test]
    fn replicas_failing_together_retry_apart() {
        // The first wait already differs: of a hundred replicas, few share a millisecond
        // (waits are whole milliseconds: 501 values in [500 ms, 1 s], so about 90 of 100
        // draws are distinct by chance alone), and together they cover most of the range.
        let first: Vec<Duration> = (0..100).map(|s| waits(INITIAL, MAX, 1, s)[0]).collect();
        let mut distinct = first.clone();
        distinct.sort();
        distinct.dedup();
        assert!(
            distinct.len() >= 80,
            "only {} distinct first waits",
            distinct.len()
        );
        let (low, high) = (distinct[0], distinct[distinct.len() - 1]);
        assert!(high - low > INITIAL / 3, "spread {low:?}..{high:?}");
        // And a later wait spreads over most of its wider range.
        let fifth: Vec<Duration> = (0..100).map(|s| waits(INITIAL, MAX, 5, s)[4]).collect();
        let low = fifth.iter().min().copied().unwrap_or_default();
        let high = fifth.iter().max().copied().unwrap_or_default();
        assert!(
            high - low > Duration::from_secs(12),
            "spread {low:?}..{high:?}"
        );
    }

    #[test]
    fn never_above_max_even_after_very_many_failures() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(INITIAL, MAX);
        for _ in 0..10_000 {
            assert!(backoff.next_with(&mut rng) <= MAX);
        }
        // A huge maximum does not overflow either.
        let mut huge = Backoff::new(INITIAL, Duration::MAX);
        for _ in 0..200 {
            assert!(huge.next_with(&mut rng) >= INITIAL / 2);
        }
    }

    #[test]
    fn never_zero_even_when_configured_so() {
        for wait in waits(Duration::ZERO, Duration::ZERO, 50, 1) {
            assert!(wait > Duration::ZERO);
            assert!(wait <= SHORTEST);
        }
        // A maximum below the initial wait is raised to it.
        for wait in waits(INITIAL, Duration::from_millis(10), 50, 2) {
            assert!((INITIAL / 2..=INITIAL).contains(&wait));
        }
    }

    #[test]
    fn reset_starts_again_from_the_initial_wait() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut backoff = Backoff::new(INITIAL, MAX);
        for _ in 0..8 {
            backoff.next_with(&mut rng);
        }
        backoff.reset();
        assert!(backoff.next_with(&mut rng) <= INITIAL);
        assert!(backoff.next_with(&mut rng) <= 2 * INITIAL);
    }

    #[test]
    fn thread_rng_waits_keep_the_bounds() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..100 {
            let wait = backoff.next();
            assert!((Duration::from_millis(50)..=Duration::from_secs(2)).contains(&wait));
        }
    }
}
