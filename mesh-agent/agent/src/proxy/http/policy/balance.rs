//! The endpoint pick. Pure: the caller passes the candidates' costs and the
//! random draws.
//!
//! The default is Linkerd's balancer: power of two choices (P2C) over a
//! peak-EWMA latency estimate times the requests outstanding. It is written
//! here rather than taken from tower's `balance::p2c` + `load::PeakEwma`
//! because those own their endpoints behind `&mut self` (one balancer per
//! caller, reached through a `Buffer` task): the agent's balancer is shared
//! lock-free by every caller on the node and picks addresses, not services,
//! so that all local pods teach it and no task hop is added per request.
//! The estimate follows tower's `PeakEwma` (same decay law and peak rule).
use std::time::Duration;

/// Decay time of the latency estimate (Linkerd's and tower's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint never measured.
pub const DEFAULT_RTT: Duration = Duration::from_millis(5);

/// A peak-sensitive exponentially weighted moving average of response
/// latency: a sample above the estimate replaces it at once; lower samples
/// pull it down with weight `1 - e^(-elapsed/decay)`; and between samples it
/// decays toward zero, so an endpoint that was slow is tried again later.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeakEwma {
    /// Nanoseconds.
    estimate: f64,
    /// When the estimate was last updated, in nanoseconds of some clock.
    stamp: u64,
}

impl PeakEwma {
    pub fn new(now: u64) -> PeakEwma {
        PeakEwma {
            estimate: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
        }
    }

    fn decayed(&self, now: u64) -> f64 {
        let elapsed = now.saturating_sub(self.stamp) as f64;
        self.estimate * (-elapsed / DECAY.as_nanos() as f64).exp()
    }

    /// The estimate at `now`, in nanoseconds.
    pub fn estimate(&self, now: u64) -> f64 {
        self.decayed(now)
    }

    /// Takes a latency sample (nanoseconds) observed at `now`.
    pub fn observe(&mut self, now: u64, sample: f64) {
        let prior = self.decayed(now);
        self.estimate = if sample > prior {
            sample
        } else {
            let elapsed = now.saturating_sub(self.stamp) as f64;
            let keep = (-elapsed / DECAY.as_nanos() as f64).exp();
            prior * keep + sample * (1.0 - keep)
        };
        self.stamp = now;
    }
}

/// Linkerd's load: the latency estimate times (outstanding + 1).
pub fn cost(estimate_ns: f64, outstanding: u32) -> f64 {
    estimate_ns * f64::from(outstanding + 1)
}

/// Power of two choices among `n` candidates: two distinct ones from the
/// draws `r1`, `r2`, the cheaper wins (the first on a tie). `None` when
/// `n == 0`.
pub fn p2c(n: usize, r1: usize, r2: usize, cost: impl Fn(usize) -> f64) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = r1 % n;
            // The second is any other candidate, uniformly.
            let b = (a + 1 + r2 % (n - 1)) % n;
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: f64 = 1_000_000.0;

    #[test]
    fn a_peak_replaces_the_estimate_and_low_samples_decay_it() {
        let mut e = PeakEwma::new(0);
        e.observe(1, 100.0 * MS);
        assert!((e.estimate(1) - 100.0 * MS).abs() < 1.0);
        // One second later a 10 ms sample moves it a tenth of the way
        // (1 - e^-0.1 = 9.5%) after the prior decayed by e^-0.1.
        let at = 1_000_000_001;
        e.observe(at, 10.0 * MS);
        let prior = 100.0 * MS * (-0.1f64).exp();
        let want = prior * (-0.1f64).exp() + 10.0 * MS * (1.0 - (-0.1f64).exp());
        assert!((e.estimate(at) - want).abs() < 1e3, "{}", e.estimate(at));
        // Unused, it decays toward zero: after 30 s it is at e^-3 of itself.
        let later = at + 30_000_000_000;
        assert!((e.estimate(later) - e.estimate(at) * (-3.0f64).exp()).abs() < 1e3);
    }

    #[test]
    fn p2c_prefers_the_cheaper_of_two_and_never_picks_one_twice() {
        let costs = [10.0, 1.0, 5.0];
        for r1 in 0..3 {
            for r2 in 0..2 {
                let i = p2c(3, r1, r2, |i| costs[i]).unwrap();
                // The most expensive can never win a duel.
                assert_ne!(i, 0);
            }
        }
        assert_eq!(p2c(0, 1, 2, |_| 0.0), None);
        assert_eq!(p2c(1, 7, 9, |_| 0.0), Some(0));
    }

    #[test]
    fn outstanding_requests_raise_the_cost() {
        assert!(cost(10.0 * MS, 9) > cost(50.0 * MS, 0));
        assert!(cost(10.0 * MS, 3) < cost(50.0 * MS, 0));
    }

    proptest! {
        #[test]
        fn p2c_picks_a_candidate_no_worse_than_a_random_one(
            costs in proptest::collection::vec(0.0f64..1e9, 1..20),
            r1 in any::<usize>(),
            r2 in any::<usize>(),
        ) {
            let n = costs.len();
            let i = p2c(n, r1, r2, |i| costs[i]).unwrap();
            prop_assert!(i < n);
            prop_assert!(costs[i] <= costs[r1 % n]);
        }

        #[test]
        fn the_estimate_stays_between_zero_and_the_peak(
            samples in proptest::collection::vec((0u64..5_000_000_000, 0.0f64..1e9), 1..50),
        ) {
            let mut e = PeakEwma::new(0);
            let mut now = 0;
            let mut peak = DEFAULT_RTT.as_nanos() as f64;
            for (dt, s) in samples {
                now += dt;
                e.observe(now, s);
                peak = peak.max(s);
                let est = e.estimate(now);
                prop_assert!(est >= 0.0 && est <= peak + 1.0, "{est} > {peak}");
            }
        }
    }
}
