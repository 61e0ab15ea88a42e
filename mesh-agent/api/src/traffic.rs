//! `TrafficPolicy` (`mesh.dev/v1alpha1`): how the node agents treat requests
//! to one Service (or one port of it): load balancing, retries, circuit
//! breaking, outlier detection, fault injection and local rate limits.
//!
//! Each field takes its meaning from Istio's DestinationRule /
//! VirtualService or from Envoy, named on the field. The control server
//! parses a document's `spec` into [`TrafficPolicySpec`] (unknown fields
//! refused), runs [`TrafficPolicySpec::validate`], and distributes it as JSON
//! in a `Policy` resource; the agent reads it back into the same type and
//! compiles it once per configuration.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gateway::{
    HeaderMatch, Invalid, compile_regex, invalid, is_header_name, parse_duration,
};

pub const TRAFFIC_POLICY_KIND: &str = "TrafficPolicy";
/// Most retries one request may make (Istio has no cap; a mistyped `100`
/// would multiply an outage a hundredfold).
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// Largest request body kept for replay on a retry.
pub const MAX_RETRY_BUFFER: u64 = 16 << 20;
/// Longest delay a fault may inject.
pub const MAX_FAULT_DELAY: Duration = Duration::from_secs(300);
pub const MAX_HEADER_MATCHES: usize = 16;

#[cfg_attr(feature = "crd", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "crd",
    kube(
        group = "mesh.dev",
        version = "v1alpha1",
        kind = "TrafficPolicy",
        doc = "How the node agents treat requests to one Service: load balancing, retries, circuit breaking, outlier detection, faults, rate limits, access logs.",
        plural = "trafficpolicies",
        shortname = "tp",
        namespaced,
        category = "mesh"
    )
)]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    pub target_ref: TargetRef,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default)]
    pub retries: Option<Retries>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub fault: Option<Fault>,
    #[serde(default)]
    pub rate_limit: Option<RateLimits>,
    /// JSON access logs of the Service's requests and connections, written
    /// by the caller's agent to its `--access-log`; absent: none.
    #[serde(default)]
    pub access_log: Option<AccessLog>,
}

/// Istio Telemetry's access logging, per Service.
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLog {
    /// Share of requests and connections logged, 0..=100 (Istio's
    /// `randomSamplingPercentage`). Default 100.
    #[serde(default)]
    pub sampling: Option<f64>,
}

/// The Service a policy applies to, in the policy's own namespace (Gateway
/// API policy attachment's `targetRefs` shape).
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// `""` (core) only.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` only.
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    /// One port of the Service; unset: every port. A policy for a port wins
    /// over one for the whole Service (no merging).
    #[serde(default)]
    pub port: Option<u16>,
}

/// Istio DestinationRule `trafficPolicy.loadBalancer`.
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// Istio's `simple`; the default is ours: `LEAST_LATENCY`.
    #[serde(default)]
    pub simple: Option<SimpleLb>,
    /// Istio's `consistentHash` (ring hash), exclusive with `simple`.
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
    /// Send to endpoints on the caller's node while any of them is healthy
    /// (Istio's locality load balancing, at node granularity). Default false.
    #[serde(default)]
    pub prefer_same_node: bool,
}

#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    /// Power of two choices over peak-EWMA latency times outstanding
    /// requests (Linkerd's balancer), learned from every caller on the node.
    #[default]
    LeastLatency,
    RoundRobin,
    Random,
}

/// Exactly one key.
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    #[serde(default)]
    pub http_header_name: Option<String>,
    #[serde(default)]
    pub http_cookie: Option<HashCookie>,
    /// Ours (Istio has `useSourceIp`): the caller's SPIFFE identity.
    #[serde(default)]
    pub use_source_identity: bool,
    /// Virtual nodes per endpoint on the ring (Envoy's ring hash). Default 160.
    #[serde(default)]
    pub virtual_nodes: Option<u32>,
}

/// Istio `httpCookie`: hash on this cookie; with a `ttl`, a request without
/// it gets one generated and set on the response.
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashCookie {
    pub name: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub ttl: Option<String>,
}

/// Istio VirtualService `retries`, with Envoy's backoff and retry budget.
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first try (Istio's `attempts`), 0..=10.
    pub attempts: u32,
    /// Each try's deadline (Istio's `perTryTimeout`); unset: only the
    /// route's timeouts.
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    /// Envoy `retry_on` conditions: `5xx`, `gateway-error`, `reset`,
    /// `connect-failure`, `refused-stream`, `retriable-status-codes`, and the
    /// gRPC ones `cancelled`, `deadline-exceeded`, `internal`,
    /// `resource-exhausted`, `unavailable`. Default: `connect-failure`,
    /// `refused-stream`, `unavailable`, `cancelled` (Istio's).
    #[serde(default)]
    pub retry_on: Option<Vec<String>>,
    /// With `retriable-status-codes` (implied when set).
    #[serde(default)]
    pub retriable_status_codes: Vec<u16>,
    #[serde(default)]
    pub backoff: Option<Backoff>,
    #[serde(default)]
    pub budget: Option<RetryBudget>,
    /// A request body longer than this is not retried (Envoy's
    /// per-request buffer limit). Default 64 KiB.
    #[serde(default)]
    pub max_replay_bytes: Option<u64>,
}

/// Envoy `retry_back_off`: full jitter between 0 and
/// `min(maxInterval, baseInterval * 2^(retry-1))`.
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    /// Default 25ms.
    #[serde(default)]
    pub base_interval: Option<String>,
    /// Default 10 times the base.
    #[serde(default)]
    pub max_interval: Option<String>,
}

/// Envoy `retry_budget`: retries in flight may be at most `percent` of the
/// requests in flight to the Service, but `minRetryConcurrency` are always
/// allowed.
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Default 20.
    #[serde(default = "default_budget_percent")]
    pub percent: f64,
    /// Default 3.
    #[serde(default = "default_min_retry_concurrency")]
    pub min_retry_concurrency: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: default_budget_percent(),
            min_retry_concurrency: default_min_retry_concurrency(),
        }
    }
}

impl Eq for RetryBudget {}

fn default_budget_percent() -> f64 {
    20.0
}
fn default_min_retry_concurrency() -> u32 {
    3
}

/// Envoy `circuit_breakers.thresholds` (Istio `connectionPool`), per Service
/// and agent. Beyond a limit the agent answers 503 `UO` at once.
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Connections the agent carries to the Service at once (TCP
    /// connections, and HTTP client connections). Default 1024.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection to an endpoint. Default 1024.
    #[serde(default)]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight. Default 1024.
    #[serde(default)]
    pub max_requests: Option<u32>,
    /// Retries in flight, on top of the budget. Default: the budget only.
    #[serde(default)]
    pub max_retries: Option<u32>,
}

/// Envoy `outlier_detection` (Istio `outlierDetection`), consecutive errors.
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// 5xx answers (and gateway failures) in a row. Default 5; 0 disables.
    #[serde(default)]
    pub consecutive_5xx_errors: Option<u32>,
    /// 502, 503, 504, connect failures and resets in a row. Default unset.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// An ejection lasts this times the endpoint's number of ejections.
    /// Default 30s.
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    /// Cap on one ejection. Default 300s.
    #[serde(default)]
    pub max_ejection_time: Option<String>,
    /// Most of the Service's endpoints ejected at once; at least one may
    /// always be (Envoy's rule). Default 10.
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    /// How long without an ejection takes one off an endpoint's count.
    /// Default 10s (Envoy's `interval`).
    #[serde(default)]
    pub interval: Option<String>,
}

/// Istio `HTTPFaultInjection`, optionally only for matching requests.
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    /// All must match (Gateway API header matches); empty: every request.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    pub fixed_delay: String,
    /// Share of requests, 0..=100.
    pub percentage: f64,
}

#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// Exactly one of `httpStatus` and `grpcStatus` (a code name such as
    /// `UNAVAILABLE`, or its number).
    #[serde(default)]
    pub http_status: Option<u16>,
    #[serde(default)]
    pub grpc_status: Option<String>,
    pub percentage: f64,
}

/// Envoy local rate limit (token bucket): at the caller's agent
/// (`outbound`) and at the destination's (`inbound`).
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimits {
    #[serde(default)]
    pub inbound: Option<RateLimit>,
    #[serde(default)]
    pub outbound: Option<RateLimit>,
}

#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Tokens added per `interval` (Envoy's `tokens_per_fill`), at least 1.
    pub requests: u32,
    /// Default 1s (Envoy's `fill_interval`).
    #[serde(default)]
    pub interval: Option<String>,
    /// Bucket size (Envoy's `max_tokens`). Default `requests`.
    #[serde(default)]
    pub burst: Option<u32>,
    /// One bucket per caller identity instead of one for all.
    #[serde(default)]
    pub per_source_identity: bool,
}

/// Retry conditions (Envoy `retry_on`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    Status5xx,
    GatewayError,
    Reset,
    ConnectFailure,
    RefusedStream,
    RetriableStatusCodes,
    /// A gRPC status, by number.
    Grpc(u32),
}

impl RetryOn {
    pub fn parse(s: &str) -> Option<RetryOn> {
        Some(match s {
            "5xx" => RetryOn::Status5xx,
            "gateway-error" => RetryOn::GatewayError,
            "reset" => RetryOn::Reset,
            "connect-failure" => RetryOn::ConnectFailure,
            "refused-stream" => RetryOn::RefusedStream,
            "retriable-status-codes" => RetryOn::RetriableStatusCodes,
            "cancelled" => RetryOn::Grpc(1),
            "deadline-exceeded" => RetryOn::Grpc(4),
            "resource-exhausted" => RetryOn::Grpc(8),
            "internal" => RetryOn::Grpc(13),
            "unavailable" => RetryOn::Grpc(14),
            _ => return None,
        })
    }

    /// Istio's default `retryOn`.
    pub const DEFAULT: [&'static str; 4] = [
        "connect-failure",
        "refused-stream",
        "unavailable",
        "cancelled",
    ];
}

/// gRPC status codes by name, as `grpcStatus` may give them.
pub fn grpc_code(s: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    if let Ok(n) = s.parse::<u32>() {
        return (n < 17).then_some(n);
    }
    NAMES.iter().position(|n| *n == s).map(|i| i as u32)
}

/// A positive duration field.
fn positive(field: &str, text: &str) -> Result<Duration, Invalid> {
    match parse_duration(text) {
        Err(e) => invalid(field, e),
        Ok(d) if d.is_zero() => invalid(field, format!("{text:?}: must be more than zero")),
        Ok(d) => Ok(d),
    }
}

fn percentage(field: &str, p: f64) -> Result<(), Invalid> {
    if !(0.0..=100.0).contains(&p) || p.is_nan() {
        return invalid(field, format!("{p} is not a percentage (0 to 100)"));
    }
    Ok(())
}

impl TrafficPolicySpec {
    /// The checks that need no other resource; `Service` existence and the
    /// port are the control server's.
    pub fn validate(&self) -> Result<(), Invalid> {
        let t = &self.target_ref;
        if t.group.as_deref().is_some_and(|g| !g.is_empty()) {
            return invalid("spec.targetRef.group", "only \"\" (core) Services");
        }
        if t.kind.as_deref().is_some_and(|k| k != "Service") {
            return invalid("spec.targetRef.kind", "only Service");
        }
        if t.name.is_empty() {
            return invalid("spec.targetRef.name", "must not be empty");
        }
        if t.port == Some(0) {
            return invalid("spec.targetRef.port", "0 is not a port");
        }
        if let Some(lb) = &self.load_balancer {
            if lb.simple.is_some() && lb.consistent_hash.is_some() {
                return invalid(
                    "spec.loadBalancer",
                    "simple and consistentHash are exclusive",
                );
            }
            if let Some(h) = &lb.consistent_hash {
                let keys = usize::from(h.http_header_name.is_some())
                    + usize::from(h.http_cookie.is_some())
                    + usize::from(h.use_source_identity);
                if keys == 0 {
                    return invalid(
                        "spec.loadBalancer.consistentHash",
                        "needs a key: httpHeaderName, httpCookie or useSourceIdentity",
                    );
                }
                if keys > 1 {
                    return invalid(
                        "spec.loadBalancer.consistentHash",
                        "takes one key: httpHeaderName, httpCookie or useSourceIdentity",
                    );
                }
                if let Some(name) = &h.http_header_name
                    && !is_header_name(name)
                {
                    return invalid(
                        "spec.loadBalancer.consistentHash.httpHeaderName",
                        format!("{name:?} is not a header name"),
                    );
                }
                if let Some(c) = &h.http_cookie {
                    if c.name.is_empty()
                        || !c
                            .name
                            .bytes()
                            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
                    {
                        return invalid(
                            "spec.loadBalancer.consistentHash.httpCookie.name",
                            format!("{:?} is not a cookie name", c.name),
                        );
                    }
                    if let Some(ttl) = &c.ttl {
                        positive("spec.loadBalancer.consistentHash.httpCookie.ttl", ttl)?;
                    }
                }
                if let Some(v) = h.virtual_nodes
                    && !(1..=4096).contains(&v)
                {
                    return invalid(
                        "spec.loadBalancer.consistentHash.virtualNodes",
                        format!("{v}: must be 1 to 4096"),
                    );
                }
            }
        }
        if let Some(r) = &self.retries {
            if r.attempts > MAX_RETRY_ATTEMPTS {
                return invalid(
                    "spec.retries.attempts",
                    format!("{} is more than the most, {MAX_RETRY_ATTEMPTS}", r.attempts),
                );
            }
            if let Some(t) = &r.per_try_timeout {
                positive("spec.retries.perTryTimeout", t)?;
            }
            if let Some(on) = &r.retry_on {
                for (i, c) in on.iter().enumerate() {
                    if RetryOn::parse(c).is_none() {
                        return invalid(
                            format!("spec.retries.retryOn[{i}]"),
                            format!("{c:?} is not a retry condition"),
                        );
                    }
                }
            }
            for (i, c) in r.retriable_status_codes.iter().enumerate() {
                if !(100..=599).contains(c) {
                    return invalid(
                        format!("spec.retries.retriableStatusCodes[{i}]"),
                        format!("{c} is not an HTTP status"),
                    );
                }
            }
            if let Some(b) = &r.backoff {
                let base = match &b.base_interval {
                    Some(t) => positive("spec.retries.backoff.baseInterval", t)?,
                    None => Duration::from_millis(25),
                };
                if let Some(t) = &b.max_interval {
                    let max = positive("spec.retries.backoff.maxInterval", t)?;
                    if max < base {
                        return invalid(
                            "spec.retries.backoff.maxInterval",
                            "must not be less than baseInterval",
                        );
                    }
                }
            }
            if let Some(b) = &r.budget {
                if !(b.percent > 0.0 && b.percent <= 100.0) {
                    return invalid(
                        "spec.retries.budget.percent",
                        format!("{}: must be more than 0 and at most 100", b.percent),
                    );
                }
                if b.min_retry_concurrency > 1_000_000 {
                    return invalid("spec.retries.budget.minRetryConcurrency", "too large");
                }
            }
            if let Some(n) = r.max_replay_bytes
                && n > MAX_RETRY_BUFFER
            {
                return invalid(
                    "spec.retries.maxReplayBytes",
                    format!("{n} is more than the most, {MAX_RETRY_BUFFER}"),
                );
            }
        }
        if let Some(cb) = &self.circuit_breaker {
            for (field, v) in [
                ("maxConnections", cb.max_connections),
                ("maxPendingRequests", cb.max_pending_requests),
                ("maxRequests", cb.max_requests),
            ] {
                if v == Some(0) {
                    return invalid(
                        format!("spec.circuitBreaker.{field}"),
                        "0 would refuse everything: at least 1",
                    );
                }
            }
        }
        if let Some(o) = &self.outlier_detection {
            let base = match &o.base_ejection_time {
                Some(t) => positive("spec.outlierDetection.baseEjectionTime", t)?,
                None => Duration::from_secs(30),
            };
            if let Some(t) = &o.max_ejection_time {
                let max = positive("spec.outlierDetection.maxEjectionTime", t)?;
                if max < base {
                    return invalid(
                        "spec.outlierDetection.maxEjectionTime",
                        "must not be less than baseEjectionTime",
                    );
                }
            }
            if let Some(t) = &o.interval {
                positive("spec.outlierDetection.interval", t)?;
            }
            if let Some(p) = o.max_ejection_percent
                && p > 100
            {
                return invalid(
                    "spec.outlierDetection.maxEjectionPercent",
                    format!("{p} is more than 100"),
                );
            }
        }
        if let Some(f) = &self.fault {
            if f.delay.is_none() && f.abort.is_none() {
                return invalid("spec.fault", "needs a delay or an abort");
            }
            if f.headers.len() > MAX_HEADER_MATCHES {
                return invalid(
                    "spec.fault.headers",
                    format!("at most {MAX_HEADER_MATCHES}"),
                );
            }
            for (i, h) in f.headers.iter().enumerate() {
                if !is_header_name(&h.name) {
                    return invalid(
                        format!("spec.fault.headers[{i}].name"),
                        format!("{:?} is not a header name", h.name),
                    );
                }
                if h.kind == crate::gateway::ValueMatchType::RegularExpression
                    && let Err(e) = compile_regex(&h.value)
                {
                    return invalid(format!("spec.fault.headers[{i}].value"), e);
                }
            }
            if let Some(d) = &f.delay {
                let t = positive("spec.fault.delay.fixedDelay", &d.fixed_delay)?;
                if t > MAX_FAULT_DELAY {
                    return invalid(
                        "spec.fault.delay.fixedDelay",
                        format!("more than the most, {MAX_FAULT_DELAY:?}"),
                    );
                }
                percentage("spec.fault.delay.percentage", d.percentage)?;
            }
            if let Some(a) = &f.abort {
                match (a.http_status, &a.grpc_status) {
                    (Some(_), Some(_)) | (None, None) => {
                        return invalid(
                            "spec.fault.abort",
                            "needs exactly one of httpStatus and grpcStatus",
                        );
                    }
                    (Some(s), None) if !(200..=599).contains(&s) => {
                        return invalid(
                            "spec.fault.abort.httpStatus",
                            format!("{s} is not an HTTP status to answer with (200 to 599)"),
                        );
                    }
                    (None, Some(g)) if grpc_code(g).is_none_or(|c| c == 0) => {
                        return invalid(
                            "spec.fault.abort.grpcStatus",
                            format!("{g:?} is not a gRPC error status"),
                        );
                    }
                    _ => {}
                }
                percentage("spec.fault.abort.percentage", a.percentage)?;
            }
        }
        if let Some(log) = &self.access_log
            && let Some(p) = log.sampling
        {
            percentage("spec.accessLog.sampling", p)?;
        }
        if let Some(rl) = &self.rate_limit {
            for (dir, l) in [("inbound", &rl.inbound), ("outbound", &rl.outbound)] {
                let Some(l) = l else { continue };
                let at = format!("spec.rateLimit.{dir}");
                if l.requests == 0 {
                    return invalid(format!("{at}.requests"), "a rate of zero: at least 1");
                }
                if let Some(t) = &l.interval {
                    positive(&format!("{at}.interval"), t)?;
                }
                if l.burst == Some(0) {
                    return invalid(format!("{at}.burst"), "0 would refuse everything");
                }
            }
            if rl.inbound.is_none() && rl.outbound.is_none() {
                return invalid("spec.rateLimit", "needs inbound or outbound");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> TrafficPolicySpec {
        serde_yaml_ng::from_str(yaml).expect(yaml)
    }

    #[test]
    fn a_full_policy_is_valid() {
        let s = spec(
            r#"
targetRef: {kind: Service, name: echo, port: 80}
loadBalancer: {consistentHash: {httpHeaderName: x-user}, preferSameNode: true}
retries:
  attempts: 3
  perTryTimeout: 200ms
  retryOn: [5xx, reset, unavailable]
  retriableStatusCodes: [409]
  backoff: {baseInterval: 10ms, maxInterval: 100ms}
  budget: {percent: 25, minRetryConcurrency: 5}
circuitBreaker: {maxConnections: 10, maxPendingRequests: 5, maxRequests: 5, maxRetries: 2}
outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 5s, maxEjectionPercent: 50}
fault: {headers: [{name: x-chaos, value: "yes"}], delay: {fixedDelay: 50ms, percentage: 10}, abort: {grpcStatus: UNAVAILABLE, percentage: 5.5}}
rateLimit: {inbound: {requests: 100, perSourceIdentity: true}, outbound: {requests: 10, interval: 100ms, burst: 20}}
"#,
        );
        s.validate().unwrap();
        assert_eq!(s.retries.unwrap().budget.unwrap().percent, 25.0);
    }

    #[test]
    fn bad_values_name_their_field() {
        for (yaml, field) in [
            (
                "{targetRef: {name: a}, retries: {attempts: 2, budget: {percent: 150}}}",
                "spec.retries.budget.percent",
            ),
            (
                "{targetRef: {name: a}, retries: {attempts: 2, perTryTimeout: 0s}}",
                "spec.retries.perTryTimeout",
            ),
            (
                "{targetRef: {name: a}, retries: {attempts: 2, perTryTimeout: -1s}}",
                "spec.retries.perTryTimeout",
            ),
            (
                "{targetRef: {name: a}, retries: {attempts: 11}}",
                "spec.retries.attempts",
            ),
            (
                "{targetRef: {name: a}, retries: {attempts: 1, retryOn: [5xx, teapot]}}",
                "spec.retries.retryOn[1]",
            ),
            (
                "{targetRef: {name: a}, loadBalancer: {consistentHash: {}}}",
                "spec.loadBalancer.consistentHash",
            ),
            (
                "{targetRef: {name: a}, loadBalancer: {consistentHash: {httpHeaderName: a, useSourceIdentity: true}}}",
                "spec.loadBalancer.consistentHash",
            ),
            (
                "{targetRef: {name: a}, outlierDetection: {maxEjectionPercent: 101}}",
                "spec.outlierDetection.maxEjectionPercent",
            ),
            (
                "{targetRef: {name: a}, rateLimit: {outbound: {requests: 0}}}",
                "spec.rateLimit.outbound.requests",
            ),
            (
                "{targetRef: {name: a}, rateLimit: {inbound: {requests: 5, interval: 0ms}}}",
                "spec.rateLimit.inbound.interval",
            ),
            (
                "{targetRef: {name: a}, fault: {abort: {httpStatus: 503, grpcStatus: INTERNAL, percentage: 1}}}",
                "spec.fault.abort",
            ),
            (
                "{targetRef: {name: a}, fault: {delay: {fixedDelay: 1s, percentage: 101}}}",
                "spec.fault.delay.percentage",
            ),
            (
                "{targetRef: {name: a}, circuitBreaker: {maxRequests: 0}}",
                "spec.circuitBreaker.maxRequests",
            ),
            ("{targetRef: {name: a, kind: Pod}}", "spec.targetRef.kind"),
        ] {
            let err = spec(yaml).validate().expect_err(yaml);
            assert_eq!(err.field, field, "{yaml}: {err}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(
            serde_yaml_ng::from_str::<TrafficPolicySpec>("{targetRef: {name: a}, retry: {}}")
                .is_err()
        );
        assert!(
            serde_yaml_ng::from_str::<TrafficPolicySpec>(
                "{targetRef: {name: a}, retries: {attempts: 1, tries: 2}}"
            )
            .is_err()
        );
    }

    #[test]
    fn grpc_codes_by_name_or_number() {
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_code("8"), Some(8));
        assert_eq!(grpc_code("17"), None);
        assert_eq!(grpc_code("unavailable"), None);
    }
}
