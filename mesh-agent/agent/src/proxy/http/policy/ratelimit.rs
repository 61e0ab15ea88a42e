//! Local rate limits: a token bucket per Service (or per Service and caller
//! identity), shared by all the agent's threads. Taken from governor (GCRA,
//! lock-free): `requests` per `interval` refill the bucket of `burst`
//! tokens, as Envoy's `tokens_per_fill`, `fill_interval` and `max_tokens`.
use std::{num::NonZeroU32, time::Duration};

use governor::{
    DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock as _,
    clock::DefaultClock,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub requests: u32,
    pub interval: Duration,
    pub burst: u32,
    pub per_source: bool,
}

impl Config {
    /// The bucket's quota: one token every `interval / requests`.
    pub fn quota(&self) -> Quota {
        let period = (self.interval / self.requests.max(1)).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(self.burst.max(1)).expect("at least 1");
        Quota::with_period(period)
            .expect("a period above zero")
            .allow_burst(burst)
    }
}

/// Keys kept by a per-identity limiter before idle ones are dropped.
const MAX_KEYS: usize = 10_000;

pub enum Limiter {
    One(DefaultDirectRateLimiter),
    PerSource(DefaultKeyedRateLimiter<String>),
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limiter::One(_) => "Limiter::One",
            Limiter::PerSource(_) => "Limiter::PerSource",
        })
    }
}

impl Limiter {
    pub fn new(cfg: &Config) -> Limiter {
        if cfg.per_source {
            Limiter::PerSource(RateLimiter::keyed(cfg.quota()))
        } else {
            Limiter::One(RateLimiter::direct(cfg.quota()))
        }
    }

    /// Takes a token for a request from `source`; `Err(wait)`: none is left,
    /// and one will be in `wait`.
    pub fn check(&self, source: &str) -> Result<(), Duration> {
        let clock = DefaultClock::default();
        let r = match self {
            Limiter::One(l) => l.check(),
            Limiter::PerSource(l) => {
                if l.len() > MAX_KEYS {
                    l.retain_recent();
                }
                l.check_key(&source.to_owned())
            }
        };
        r.map_err(|not_until| not_until.wait_time_from(clock.now()))
    }
}

/// The `retry-after` header value for a wait: whole seconds, at least 1.
pub fn retry_after(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(requests: u32, per: Duration, burst: u32, per_source: bool) -> Config {
        Config {
            requests,
            interval: per,
            burst,
            per_source,
        }
    }

    #[test]
    fn a_full_bucket_allows_its_burst_then_refuses() {
        let l = Limiter::new(&cfg(10, Duration::from_secs(1), 10, false));
        for _ in 0..10 {
            l.check("a").unwrap();
        }
        let wait = l.check("a").unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
    }

    #[test]
    fn the_wait_given_is_when_the_next_token_comes() {
        // 20 per second: one token every 50 ms.
        let l = Limiter::new(&cfg(20, Duration::from_secs(1), 2, false));
        l.check("a").unwrap();
        l.check("a").unwrap();
        let wait = l.check("a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(50),
            "{wait:?}"
        );
        std::thread::sleep(wait);
        l.check("a").unwrap();
    }

    #[test]
    fn the_quota_refills_one_token_per_interval_over_requests() {
        let q = cfg(50, Duration::from_secs(1), 10, false).quota();
        assert_eq!(q.replenish_interval(), Duration::from_millis(20));
        assert_eq!(q.burst_size().get(), 10);
    }

    #[test]
    fn per_source_buckets_are_separate() {
        let l = Limiter::new(&cfg(1, Duration::from_secs(60), 1, true));
        l.check("spiffe://a").unwrap();
        assert!(l.check("spiffe://a").is_err());
        l.check("spiffe://b").unwrap();
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after(Duration::ZERO), 1);
        assert_eq!(retry_after(Duration::from_millis(10)), 1);
        assert_eq!(retry_after(Duration::from_secs(2)), 2);
        assert_eq!(retry_after(Duration::from_millis(2500)), 3);
    }
}
