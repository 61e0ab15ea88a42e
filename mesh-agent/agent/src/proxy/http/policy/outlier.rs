//! Outlier detection for one endpoint (Envoy's consecutive-5xx and
//! consecutive-gateway-failure detectors): after too many failures in a row
//! the endpoint is ejected for `base x ejections` (capped); when that time
//! is up it is readmitted and takes traffic again, and one more run of
//! failures ejects it for longer. An ejection count falls by one for each
//! `interval` the endpoint goes without being ejected. Pure: time is passed
//! in.
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// 0: this detector is off.
    pub consecutive_5xx: u32,
    /// 0: this detector is off.
    pub consecutive_gateway: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejection_percent: u32,
    pub interval: Duration,
}

/// What one try's outcome was, for the detectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx other than 502/503/504.
    Error5xx,
    /// 502, 503, 504, a connect failure, a reset, a timeout.
    Gateway,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Ejected(Duration),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    /// Nanoseconds of the caller's clock.
    ejected_until: Option<u64>,
    last_ejection: u64,
}

/// Whether one more endpoint may be ejected, `ejected` of `total` being
/// out: at most `percent` of them, but at least one (Envoy's rule).
pub fn may_eject(ejected: usize, total: usize, percent: u32) -> bool {
    let cap = (total * percent as usize / 100).max(1);
    ejected < cap && ejected < total
}

impl State {
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    /// Takes an outcome; `may_eject` says whether the Service's cap allows
    /// one more ejection now.
    pub fn record(
        &mut self,
        cfg: &Config,
        outcome: Outcome,
        now: u64,
        may_eject: bool,
    ) -> Option<Event> {
        if self.is_ejected(now) {
            // Answers still arriving from before the ejection.
            return None;
        }
        match outcome {
            Outcome::Success => {
                self.consecutive_5xx = 0;
                self.consecutive_gateway = 0;
                return None;
            }
            Outcome::Error5xx => {
                self.consecutive_5xx += 1;
                self.consecutive_gateway = 0;
            }
            Outcome::Gateway => {
                self.consecutive_5xx += 1;
                self.consecutive_gateway += 1;
            }
        }
        let tripped = (cfg.consecutive_5xx > 0 && self.consecutive_5xx >= cfg.consecutive_5xx)
            || (cfg.consecutive_gateway > 0 && self.consecutive_gateway >= cfg.consecutive_gateway);
        if !tripped || !may_eject {
            return None;
        }
        // Time without ejection since the last one ended forgives ejections.
        let quiet = now.saturating_sub(self.ejected_until.unwrap_or(self.last_ejection));
        let forgiven = (quiet / cfg.interval.as_nanos().max(1) as u64) as u32;
        self.ejections = self.ejections.saturating_sub(forgiven) + 1;
        let time = cfg
            .base_ejection
            .saturating_mul(self.ejections)
            .min(cfg.max_ejection);
        self.ejected_until = Some(now + time.as_nanos() as u64);
        self.last_ejection = now;
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        Some(Event::Ejected(time))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn cfg() -> Config {
        Config {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejection_percent: 50,
            interval: Duration::from_secs(10),
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_and_readmits_after_the_time() {
        let c = cfg();
        let mut s = State::default();
        assert_eq!(s.record(&c, Outcome::Gateway, 0, true), None);
        assert_eq!(s.record(&c, Outcome::Error5xx, 1, true), None);
        assert_eq!(
            s.record(&c, Outcome::Gateway, 2, true),
            Some(Event::Ejected(Duration::from_secs(10)))
        );
        assert!(s.is_ejected(2) && s.is_ejected(10 * S));
        assert!(!s.is_ejected(10 * S + 2));
        // Failing again at once: twice as long, then capped at 25 s.
        for t in 0..3 {
            s.record(&c, Outcome::Gateway, 11 * S + t, true);
        }
        assert!(s.is_ejected(30 * S) && !s.is_ejected(31 * S + 3));
        for t in 0..3 {
            s.record(&c, Outcome::Gateway, 32 * S + t, true);
        }
        assert!(s.is_ejected(56 * S) && !s.is_ejected(57 * S + 3));
    }

    #[test]
    fn a_success_resets_the_run_and_the_cap_holds() {
        let c = cfg();
        let mut s = State::default();
        s.record(&c, Outcome::Gateway, 0, true);
        s.record(&c, Outcome::Gateway, 1, true);
        s.record(&c, Outcome::Success, 2, true);
        assert_eq!(s.record(&c, Outcome::Gateway, 3, true), None);
        s.record(&c, Outcome::Gateway, 4, true);
        assert_eq!(s.record(&c, Outcome::Gateway, 5, false), None);
        assert!(!s.is_ejected(6));
    }

    #[test]
    fn quiet_intervals_forgive_ejections() {
        let c = cfg();
        let mut s = State::default();
        for t in 0..3 {
            s.record(&c, Outcome::Gateway, t, true);
        }
        // Ejected until 10 s; 40 s later (4 intervals) the count is back to 0.
        for t in 0..3 {
            s.record(&c, Outcome::Gateway, 50 * S + t, true);
        }
        assert!(s.is_ejected(59 * S) && !s.is_ejected(60 * S + 3));
    }

    #[test]
    fn the_gateway_detector_ignores_plain_5xx() {
        let c = Config {
            consecutive_5xx: 0,
            consecutive_gateway: 2,
            ..cfg()
        };
        let mut s = State::default();
        for t in 0..5 {
            assert_eq!(s.record(&c, Outcome::Error5xx, t, true), None);
        }
        s.record(&c, Outcome::Gateway, 6, true);
        assert!(s.record(&c, Outcome::Gateway, 7, true).is_some());
    }

    #[test]
    fn at_most_the_percentage_but_always_one() {
        assert!(may_eject(0, 3, 10));
        assert!(!may_eject(1, 3, 10));
        assert!(may_eject(1, 4, 50) && !may_eject(2, 4, 50));
        assert!(!may_eject(1, 1, 100));
        assert!(may_eject(2, 3, 100) && !may_eject(3, 3, 100));
    }
}
