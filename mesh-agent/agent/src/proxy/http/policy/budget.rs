//! Retry budget and circuit-breaker accounting: gauges of what is in flight,
//! and the pure rules over them.
use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

/// Envoy's `retry_budget`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// Of active requests, 0 < p <= 100.
    pub percent: f64,
    pub min_concurrency: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            percent: 20.0,
            min_concurrency: 3,
        }
    }
}

/// Whether one more retry may start: retries in flight stay at most
/// `percent` of requests in flight, or `min_concurrency`, whichever is more,
/// and under the breaker's `max_retries`.
pub fn retry_allowed(
    b: &Budget,
    active_requests: u32,
    active_retries: u32,
    max_retries: u32,
) -> bool {
    let by_budget = (f64::from(active_requests) * b.percent / 100.0) as u32;
    active_retries < by_budget.max(b.min_concurrency) && active_retries < max_retries
}

/// A count of things in flight.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU32);

/// Holds one unit of a gauge until dropped.
#[derive(Debug)]
pub struct Held(Arc<Gauge>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gauge {
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// One more, if that stays within `limit`; `None` (nothing taken)
    /// otherwise.
    pub fn try_hold(self: &Arc<Self>, limit: u32) -> Option<Held> {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            if cur >= limit {
                return None;
            }
            match self
                .0
                .compare_exchange_weak(cur, cur + 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(Held(self.clone())),
                Err(now) => cur = now,
            }
        }
    }

    /// One more, whatever the count.
    pub fn hold(self: &Arc<Self>) -> Held {
        self.0.fetch_add(1, Ordering::Relaxed);
        Held(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn envoy_defaults_allow_three_then_a_fifth() {
        let b = Budget::default();
        assert!(retry_allowed(&b, 1, 2, u32::MAX));
        assert!(!retry_allowed(&b, 1, 3, u32::MAX));
        assert!(retry_allowed(&b, 100, 19, u32::MAX));
        assert!(!retry_allowed(&b, 100, 20, u32::MAX));
        assert!(!retry_allowed(&b, 100, 2, 2));
    }

    #[test]
    fn a_gauge_refuses_beyond_its_limit_and_frees_on_drop() {
        let g = Arc::new(Gauge::default());
        let a = g.try_hold(2).unwrap();
        let _b = g.try_hold(2).unwrap();
        assert!(g.try_hold(2).is_none());
        assert_eq!(g.get(), 2);
        drop(a);
        assert!(g.try_hold(2).is_some());
        assert_eq!(g.get(), 1);
    }

    proptest! {
        #[test]
        fn in_flight_retries_never_exceed_the_budget(
            percent in 1.0f64..=100.0,
            min in 0u32..10,
            active in 0u32..10_000,
        ) {
            let b = Budget { percent, min_concurrency: min };
            // Start retries one by one while allowed: the count reached is
            // the budget.
            let mut retries = 0;
            while retry_allowed(&b, active, retries, u32::MAX) {
                retries += 1;
                prop_assert!(retries <= 10_000 + min);
            }
            let cap = ((f64::from(active) * percent / 100.0) as u32).max(min);
            prop_assert_eq!(retries, cap);
        }
    }
}
