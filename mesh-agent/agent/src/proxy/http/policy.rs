//! Resilience: what a Service's `TrafficPolicy` asks of each request, and
//! the node-wide state that carries it out. The decisions are pure
//! functions, each in its module and unit-tested without sockets:
//!
//! - [`balance`]: the endpoint pick (power of two choices over peak-EWMA
//!   latency, round robin, random) and the latency estimate itself;
//! - [`ring`]: consistent hashing (a ring with virtual nodes);
//! - [`outlier`]: the ejection state machine of one endpoint;
//! - [`budget`]: retry-budget and circuit-breaker accounting;
//! - [`retry`]: which answers are retried, and the backoff;
//! - [`replay`]: a request body kept (up to a bound) so a retry can resend
//!   it;
//! - [`ratelimit`]: token buckets (governor's GCRA), shared by the agent's
//!   threads.
//!
//! [`runtime`] holds the state shared by every caller on the node (one
//! balancer per Service port, its endpoints' latency and ejection state, its
//! counters); it survives configuration changes. A compiled [`Policy`] is
//! part of each configuration [`crate::state::State`].
pub mod balance;
pub mod budget;
pub mod outlier;
pub mod ratelimit;
pub mod replay;
pub mod retry;
pub mod ring;
pub mod runtime;

use std::time::Duration;

use http::{HeaderMap, HeaderName};
use mesh_api::{
    gateway, pb,
    traffic::{self, SimpleLb, TrafficPolicySpec},
};

pub use retry::RetryPolicy;

use super::routes::{ValueMatch, header_matches};

/// How endpoints are chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Lb {
    LeastLatency,
    RoundRobin,
    Random,
    Hash { key: HashKey, virtual_nodes: u32 },
}

#[derive(Clone, Debug, PartialEq)]
pub enum HashKey {
    Header(HeaderName),
    /// Cookie name, and the TTL of a generated one (`None`: never set one).
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    SourceIdentity,
}

/// Circuit-breaker limits; `u32::MAX`: none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Limits {
    pub const NONE: Limits = Limits {
        max_connections: u32::MAX,
        max_pending_requests: u32::MAX,
        max_requests: u32::MAX,
        max_retries: u32::MAX,
    };
}

#[derive(Debug)]
pub struct Fault {
    pub headers: Vec<(HeaderName, ValueMatch)>,
    /// Delay and its share in millionths.
    pub delay: Option<(Duration, u32)>,
    pub abort: Option<(Abort, u32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    Grpc(u32),
}

impl Fault {
    pub fn applies(&self, headers: &HeaderMap) -> bool {
        self.headers.iter().all(|(name, m)| {
            headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
        })
    }
}

/// A share in millionths: whether draw `r` (uniform in `0..1_000_000`)
/// falls in it.
pub fn in_share(share: u32, r: u32) -> bool {
    r < share
}

fn millionths(percentage: f64) -> u32 {
    (percentage * 10_000.0).round().clamp(0.0, 1_000_000.0) as u32
}

/// One TrafficPolicy, compiled.
#[derive(Debug)]
pub struct Policy {
    /// `namespace/name`, for logs.
    pub id: String,
    pub created: u64,
    /// The port it targets; `None`: every port of the Service.
    pub port: Option<u16>,
    pub service: String,
    pub lb: Lb,
    pub prefer_same_node: bool,
    pub retry: Option<RetryPolicy>,
    pub budget: budget::Budget,
    pub limits: Limits,
    pub outlier: Option<outlier::Config>,
    pub fault: Option<Fault>,
    pub rate_inbound: Option<ratelimit::Config>,
    pub rate_outbound: Option<ratelimit::Config>,
    /// Share of requests and connections access-logged, 0..=1; 0: none.
    pub access_log: f64,
}

impl Policy {
    /// What applies to a Service no policy targets: P2C over peak EWMA,
    /// nothing else.
    pub fn default_for(service: &str) -> Policy {
        Policy {
            id: String::new(),
            created: 0,
            port: None,
            service: service.to_owned(),
            lb: Lb::LeastLatency,
            prefer_same_node: false,
            retry: None,
            budget: budget::Budget::default(),
            limits: Limits::NONE,
            outlier: None,
            fault: None,
            rate_inbound: None,
            rate_outbound: None,
            access_log: 0.0,
        }
    }

    pub fn compile(p: &pb::Policy) -> Result<Policy, String> {
        let spec: TrafficPolicySpec =
            serde_json::from_str(&p.spec_json).map_err(|e| format!("spec: {e}"))?;
        spec.validate().map_err(|e| e.to_string())?;
        let dur = |t: &Option<String>, default: Duration| -> Result<Duration, String> {
            Ok(t.as_deref()
                .map(gateway::parse_duration)
                .transpose()?
                .unwrap_or(default))
        };
        let lb = spec.load_balancer.clone().unwrap_or_default();
        let lb_kind = match (&lb.consistent_hash, lb.simple.unwrap_or_default()) {
            (Some(h), _) => Lb::Hash {
                key: if let Some(name) = &h.http_header_name {
                    HashKey::Header(HeaderName::try_from(name.as_str()).map_err(|e| e.to_string())?)
                } else if let Some(c) = &h.http_cookie {
                    HashKey::Cookie {
                        name: c.name.clone(),
                        path: c.path.clone(),
                        ttl: c.ttl.as_deref().map(gateway::parse_duration).transpose()?,
                    }
                } else {
                    HashKey::SourceIdentity
                },
                virtual_nodes: h.virtual_nodes.unwrap_or(ring::DEFAULT_VIRTUAL_NODES),
            },
            (None, SimpleLb::LeastLatency) => Lb::LeastLatency,
            (None, SimpleLb::RoundRobin) => Lb::RoundRobin,
            (None, SimpleLb::Random) => Lb::Random,
        };
        let retry = spec
            .retries
            .as_ref()
            .map(RetryPolicy::from_spec)
            .transpose()?;
        let budget = spec
            .retries
            .as_ref()
            .and_then(|r| r.budget.as_ref())
            .map(|b| budget::Budget {
                percent: b.percent,
                min_concurrency: b.min_retry_concurrency,
            })
            .unwrap_or_default();
        let limits = match &spec.circuit_breaker {
            None => Limits::NONE,
            Some(cb) => Limits {
                max_connections: cb.max_connections.unwrap_or(1024),
                max_pending_requests: cb.max_pending_requests.unwrap_or(1024),
                max_requests: cb.max_requests.unwrap_or(1024),
                max_retries: cb.max_retries.unwrap_or(u32::MAX),
            },
        };
        let outlier = match &spec.outlier_detection {
            None => None,
            Some(o) => Some(outlier::Config {
                consecutive_5xx: o.consecutive_5xx_errors.unwrap_or(5),
                consecutive_gateway: o.consecutive_gateway_errors.unwrap_or(0),
                base_ejection: dur(&o.base_ejection_time, Duration::from_secs(30))?,
                max_ejection: dur(&o.max_ejection_time, Duration::from_secs(300))?,
                max_ejection_percent: o.max_ejection_percent.unwrap_or(10),
                interval: dur(&o.interval, Duration::from_secs(10))?,
            }),
        };
        let fault = match &spec.fault {
            None => None,
            Some(f) => Some(Fault {
                headers: header_matches(&f.headers)?,
                delay: f
                    .delay
                    .as_ref()
                    .map(|d| -> Result<_, String> {
                        Ok((
                            gateway::parse_duration(&d.fixed_delay)?,
                            millionths(d.percentage),
                        ))
                    })
                    .transpose()?,
                abort: f.abort.as_ref().map(|a| {
                    let kind = match (a.http_status, &a.grpc_status) {
                        (Some(s), _) => Abort::Http(s),
                        (None, Some(g)) => Abort::Grpc(traffic::grpc_code(g).unwrap_or(14)),
                        (None, None) => Abort::Http(503),
                    };
                    (kind, millionths(a.percentage))
                }),
            }),
        };
        let rate = |l: &Option<traffic::RateLimit>| -> Result<Option<ratelimit::Config>, String> {
            l.as_ref()
                .map(|l| {
                    Ok(ratelimit::Config {
                        requests: l.requests,
                        interval: dur(&l.interval, Duration::from_secs(1))?,
                        burst: l.burst.unwrap_or(l.requests),
                        per_source: l.per_source_identity,
                    })
                })
                .transpose()
        };
        let rl = spec.rate_limit.clone().unwrap_or_default();
        Ok(Policy {
            id: format!("{}/{}", p.namespace, p.name),
            created: p.created_revision,
            port: spec.target_ref.port,
            service: format!("{}/{}", p.namespace, spec.target_ref.name),
            lb: lb_kind,
            prefer_same_node: lb.prefer_same_node,
            retry,
            budget,
            limits,
            outlier,
            fault,
            rate_inbound: rate(&rl.inbound)?,
            rate_outbound: rate(&rl.outbound)?,
            access_log: spec
                .access_log
                .as_ref()
                .map_or(0.0, |l| l.sampling.unwrap_or(100.0) / 100.0),
        })
    }
}

/// The policy for each Service port: one for the port wins over one for
/// the whole Service; among equals the oldest (then by name) wins.
pub fn choose<'a>(
    candidates: impl IntoIterator<Item = &'a std::sync::Arc<Policy>>,
    port: u16,
) -> Option<&'a std::sync::Arc<Policy>> {
    candidates
        .into_iter()
        .filter(|p| p.port.is_none_or(|q| q == port))
        .min_by(|a, b| {
            (a.port.is_none(), a.created, &a.id).cmp(&(b.port.is_none(), b.created, &b.id))
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn policy(yaml: &str, name: &str, created: u64) -> Policy {
        let spec: TrafficPolicySpec = serde_yaml_ng::from_str(yaml).unwrap();
        Policy::compile(&pb::Policy {
            kind: "TrafficPolicy".into(),
            namespace: "default".into(),
            name: name.into(),
            created_revision: created,
            spec_json: serde_json::to_string(&spec).unwrap(),
        })
        .unwrap()
    }

    #[test]
    fn compiles_with_envoy_defaults() {
        let p = policy(
            "{targetRef: {name: echo}, circuitBreaker: {maxRequests: 5}, outlierDetection: {}, retries: {attempts: 2}}",
            "a",
            1,
        );
        assert_eq!(p.service, "default/echo");
        assert_eq!(p.lb, Lb::LeastLatency);
        assert_eq!(p.limits.max_requests, 5);
        assert_eq!(p.limits.max_pending_requests, 1024);
        assert_eq!(p.limits.max_retries, u32::MAX);
        let o = p.outlier.unwrap();
        assert_eq!(
            (o.consecutive_5xx, o.base_ejection, o.max_ejection_percent),
            (5, Duration::from_secs(30), 10)
        );
        assert_eq!(p.budget.percent, 20.0);
        assert_eq!(p.budget.min_concurrency, 3);
    }

    #[test]
    fn the_port_policy_wins_then_the_oldest() {
        let all = Arc::new(policy("{targetRef: {name: echo}}", "all", 1));
        let port = Arc::new(policy("{targetRef: {name: echo, port: 80}}", "port", 5));
        let older = Arc::new(policy("{targetRef: {name: echo, port: 80}}", "z-older", 3));
        let list = [all.clone(), port.clone(), older.clone()];
        assert_eq!(choose(&list, 80).unwrap().id, "default/z-older");
        assert_eq!(choose(&list, 81).unwrap().id, "default/all");
        assert!(choose(&list[1..], 81).is_none());
    }

    #[test]
    fn faults_match_headers_and_shares() {
        let p = policy(
            "{targetRef: {name: e}, fault: {headers: [{name: x-chaos, value: on}], abort: {grpcStatus: UNAVAILABLE, percentage: 12.5}}}",
            "f",
            1,
        );
        let f = p.fault.unwrap();
        let mut h = HeaderMap::new();
        assert!(!f.applies(&h));
        h.insert("x-chaos", "on".parse().unwrap());
        assert!(f.applies(&h));
        assert_eq!(f.abort, Some((Abort::Grpc(14), 125_000)));
        assert!(in_share(125_000, 124_999) && !in_share(125_000, 125_000));
    }
}
