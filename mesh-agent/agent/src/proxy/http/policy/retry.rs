//! Which tries are retried, how many times, and how long to wait between
//! them. Pure.
use std::time::Duration;

use mesh_api::{
    gateway::{self, HttpRouteRetry},
    traffic::{self, RetryOn},
};

use super::outlier;

pub const DEFAULT_MAX_REPLAY: u64 = 64 * 1024;
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: Conditions,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_replay: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    pub status_5xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub status_codes: Vec<u16>,
    /// Bit n: gRPC status n.
    pub grpc: u32,
}

/// How one try ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Try {
    /// Response headers arrived: the status, and the gRPC status if the
    /// headers carry one (a trailers-only answer).
    Answered {
        status: u16,
        grpc: Option<u32>,
    },
    ConnectFailure,
    /// The stream or connection broke before an answer.
    Reset,
    /// HTTP/2 REFUSED_STREAM: the server did not process it.
    RefusedStream,
    /// The per-try timeout fired.
    Timeout,
}

impl Try {
    /// What the outlier detectors make of it.
    pub fn outlier(self) -> outlier::Outcome {
        match self {
            Try::Answered {
                status: 502..=504, ..
            } => outlier::Outcome::Gateway,
            Try::Answered {
                status: 500..=599, ..
            } => outlier::Outcome::Error5xx,
            Try::Answered { .. } => outlier::Outcome::Success,
            Try::ConnectFailure | Try::Reset | Try::RefusedStream | Try::Timeout => {
                outlier::Outcome::Gateway
            }
        }
    }
}

impl Conditions {
    fn from_names<'a>(names: impl IntoIterator<Item = &'a str>, codes: &[u16]) -> Conditions {
        let mut c = Conditions {
            status_codes: codes.to_vec(),
            ..Conditions::default()
        };
        for n in names {
            match RetryOn::parse(n) {
                Some(RetryOn::Status5xx) => c.status_5xx = true,
                Some(RetryOn::GatewayError) => c.gateway_error = true,
                Some(RetryOn::Reset) => c.reset = true,
                Some(RetryOn::ConnectFailure) => c.connect_failure = true,
                Some(RetryOn::RefusedStream) => c.refused_stream = true,
                Some(RetryOn::RetriableStatusCodes) | None => {}
                Some(RetryOn::Grpc(code)) => c.grpc |= 1 << code,
            }
        }
        c
    }

    /// Envoy's `retry_on` semantics: `5xx` includes resets, connect failures
    /// and timeouts; `gateway-error` is 502/503/504 and the same.
    pub fn retriable(&self, t: Try) -> bool {
        let broken = self.status_5xx || self.gateway_error;
        match t {
            Try::Answered { status, grpc } => {
                (self.status_5xx && (500..=599).contains(&status))
                    || (self.gateway_error && (502..=504).contains(&status))
                    || self.status_codes.contains(&status)
                    || grpc.is_some_and(|g| g < 32 && self.grpc & (1 << g) != 0)
            }
            Try::ConnectFailure => self.connect_failure || broken,
            Try::Reset => self.reset || broken,
            Try::RefusedStream => self.refused_stream || broken || self.reset,
            Try::Timeout => broken || self.reset,
        }
    }
}

impl RetryPolicy {
    /// From a TrafficPolicy's `retries` (checked already).
    pub fn from_spec(r: &traffic::Retries) -> Result<RetryPolicy, String> {
        let on = match &r.retry_on {
            Some(list) => {
                Conditions::from_names(list.iter().map(String::as_str), &r.retriable_status_codes)
            }
            None => Conditions::from_names(RetryOn::DEFAULT, &r.retriable_status_codes),
        };
        let backoff = r.backoff.clone().unwrap_or_default();
        let base = backoff
            .base_interval
            .as_deref()
            .map(gateway::parse_duration)
            .transpose()?
            .unwrap_or(DEFAULT_BACKOFF);
        let max = backoff
            .max_interval
            .as_deref()
            .map(gateway::parse_duration)
            .transpose()?
            .unwrap_or(base * 10);
        Ok(RetryPolicy {
            attempts: r.attempts,
            per_try_timeout: r
                .per_try_timeout
                .as_deref()
                .map(gateway::parse_duration)
                .transpose()?,
            on,
            backoff_base: base,
            backoff_max: max,
            max_replay: r.max_replay_bytes.unwrap_or(DEFAULT_MAX_REPLAY),
        })
    }

    /// An HTTPRoute rule's `retry` over the Service's policy (if any): the
    /// route's codes (plus connection failures and resets), attempts and
    /// backoff; the rest from the policy.
    pub fn with_route(base: Option<&RetryPolicy>, r: &HttpRouteRetry) -> RetryPolicy {
        let backoff = r
            .backoff
            .as_deref()
            .and_then(|b| gateway::parse_duration(b).ok())
            .or(base.map(|p| p.backoff_base))
            .unwrap_or(DEFAULT_BACKOFF);
        RetryPolicy {
            attempts: r.attempts.or(base.map(|p| p.attempts)).unwrap_or(1),
            per_try_timeout: base.and_then(|p| p.per_try_timeout),
            on: Conditions {
                connect_failure: true,
                reset: true,
                refused_stream: true,
                status_codes: r.codes.clone(),
                ..Conditions::default()
            },
            backoff_base: backoff,
            backoff_max: backoff * 10,
            max_replay: base.map_or(DEFAULT_MAX_REPLAY, |p| p.max_replay),
        }
    }

    /// The wait before retry `n` (1 for the first retry) for a draw `r` in
    /// `[0, 1)`: full jitter, uniform in `[0, min(max, base * 2^(n-1)))`.
    pub fn backoff(&self, n: u32, r: f64) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(20))
            .min(self.backoff_max);
        ceiling.mul_f64(r.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy(on: &[&str], codes: &[u16]) -> RetryPolicy {
        RetryPolicy::from_spec(&traffic::Retries {
            attempts: 3,
            retry_on: Some(on.iter().map(|s| s.to_string()).collect()),
            retriable_status_codes: codes.to_vec(),
            ..Default::default()
        })
        .unwrap()
    }

    fn answered(status: u16) -> Try {
        Try::Answered { status, grpc: None }
    }

    #[test]
    fn conditions_follow_envoy() {
        let p = policy(&["5xx"], &[]);
        assert!(p.on.retriable(answered(500)) && p.on.retriable(answered(503)));
        assert!(!p.on.retriable(answered(429)) && !p.on.retriable(answered(200)));
        assert!(p.on.retriable(Try::Reset) && p.on.retriable(Try::Timeout));
        let g = policy(&["gateway-error"], &[]);
        assert!(g.on.retriable(answered(502)) && !g.on.retriable(answered(500)));
        let c = policy(&["connect-failure"], &[409]);
        assert!(c.on.retriable(Try::ConnectFailure) && !c.on.retriable(Try::Reset));
        assert!(c.on.retriable(answered(409)) && !c.on.retriable(Try::Timeout));
        let grpc = policy(&["unavailable"], &[]);
        assert!(grpc.on.retriable(Try::Answered {
            status: 200,
            grpc: Some(14)
        }));
        assert!(!grpc.on.retriable(Try::Answered {
            status: 200,
            grpc: Some(13)
        }));
    }

    #[test]
    fn istio_defaults_without_retry_on() {
        let p = RetryPolicy::from_spec(&traffic::Retries {
            attempts: 2,
            ..Default::default()
        })
        .unwrap();
        assert!(p.on.retriable(Try::ConnectFailure) && p.on.retriable(Try::RefusedStream));
        assert!(!p.on.retriable(answered(503)));
        assert_eq!(
            (p.backoff_base, p.backoff_max),
            (DEFAULT_BACKOFF, DEFAULT_BACKOFF * 10)
        );
        assert_eq!(p.max_replay, DEFAULT_MAX_REPLAY);
    }

    #[test]
    fn a_route_retry_overrides_codes_and_attempts() {
        let base = policy(&["5xx"], &[]);
        let r = RetryPolicy::with_route(
            Some(&base),
            &HttpRouteRetry {
                codes: vec![503],
                attempts: Some(5),
                backoff: Some("10ms".into()),
            },
        );
        assert_eq!(r.attempts, 5);
        assert!(r.on.retriable(answered(503)) && !r.on.retriable(answered(500)));
        assert!(r.on.retriable(Try::ConnectFailure));
        assert_eq!(r.backoff_base, Duration::from_millis(10));
    }

    proptest! {
        #[test]
        fn backoff_is_full_jitter_under_the_capped_exponential(n in 1u32..40, r in 0.0f64..1.0) {
            let p = policy(&["5xx"], &[]);
            let d = p.backoff(n, r);
            let ceiling = (DEFAULT_BACKOFF * 2u32.pow((n - 1).min(20))).min(p.backoff_max);
            prop_assert!(d <= ceiling);
            prop_assert!((d.as_secs_f64() - ceiling.as_secs_f64() * r).abs() < 1e-6);
        }
    }
}
