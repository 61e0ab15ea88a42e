//! L7 in the hop that captured the connection. A connection to a Service
//! port that speaks HTTP ([`detect`], or the port's `appProtocol`) is served
//! by hyper; each request is routed on its own ([`routes`]: logical route ->
//! weighted backend Service -> endpoint picked per request), and sent to the
//! endpoint directly ([`upstream`]) or, on another node, as a stream of the
//! pooled HTTP/2 tunnel connection to that node's agent, which restores the
//! client's HTTP/1 and delivers it ([`inbound`]).
//!
//! Answers the mesh produces itself carry [`FLAGS_HEADER`] with a short
//! flag naming the condition, as Envoy's response flags do.
mod counted;
pub mod detect;
pub mod inbound;
pub mod mirror;
pub mod policy;
pub mod proxy;
pub mod respond;
pub mod routes;
pub mod upstream;

use bytes::Bytes;
use http_body_util::{BodyExt, combinators::UnsyncBoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every request and response the agent forwards: streamed,
/// never buffered whole.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pub fn empty() -> Body {
    boxed(http_body_util::Empty::<Bytes>::new())
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    boxed(http_body_util::Full::new(bytes.into()))
}

/// Response header naming the mesh condition that produced an answer.
pub const FLAGS_HEADER: &str = "x-mesh-flags";
/// Between agents: the endpoint (`ip:port`) a tunnelled request is for.
pub const TARGET_HEADER: &str = "x-mesh-target";
/// Between agents: the client spoke HTTP/1 — its version (`1.0`, `1.1`), and
/// `;absolute` when its request target was in absolute form.
pub const H1_HEADER: &str = "x-mesh-h1";
/// Headers only agents may set: removed from every request a pod sends.
pub const INTERNAL_HEADERS: [&str; 4] = [TARGET_HEADER, H1_HEADER, SERVICE_HEADER, SOURCE_HEADER];
/// Between agents: the caller's pod IP, for the destination's
/// authorization (`source.ip`, `ipBlocks`); believed only when that IP is a
/// workload with the tunnel's identity.
pub const SOURCE_HEADER: &str = "x-mesh-source";
/// Between agents: the Service (`namespace/name:port`) a tunnelled request
/// was sent to, for the destination's inbound rate limit.
pub const SERVICE_HEADER: &str = "x-mesh-service";

/// Conditions the mesh answers for itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flag {
    /// No route rule matches (404; gRPC UNIMPLEMENTED).
    NoRoute,
    /// The route's backend Service does not exist, or it has no backend
    /// with weight (500).
    NoBackend,
    /// The backend has no ready endpoint (503; gRPC UNAVAILABLE).
    NoHealthyUpstream,
    /// Connecting to the endpoint (or its node's agent) failed (503).
    UpstreamConnectFailure,
    /// The request or attempt timed out (504; gRPC DEADLINE_EXCEEDED).
    UpstreamTimeout,
    /// The endpoint reset the stream or answered something unparseable
    /// (502; gRPC UNAVAILABLE).
    UpstreamReset,
    /// A RequestRedirect filter answered.
    Redirect,
    /// A circuit-breaker limit of the Service was reached (503; Envoy's
    /// `UO`).
    Overflow,
    /// Tries ran out and the last failure is the answer (Envoy's `URX`).
    RetryLimitExceeded,
    /// The answer came after one or more retries.
    Retried,
    /// A retry was wanted but the retry budget (or `maxRetries`) refused
    /// it; the last failure is the answer.
    RetryBudgetExhausted,
    /// Fault injection delayed the request (Envoy's `DI`).
    DelayInjected,
    /// Fault injection answered for the backend (Envoy's `FI`).
    FaultInjected,
    /// A local rate limit refused the request (429; gRPC
    /// RESOURCE_EXHAUSTED; Envoy's `RL`).
    RateLimited,
    /// An AuthorizationPolicy denied the request (403; gRPC
    /// PERMISSION_DENIED).
    Denied,
}

impl Flag {
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::NoRoute => "NR",
            Flag::NoBackend => "NC",
            Flag::NoHealthyUpstream => "UH",
            Flag::UpstreamConnectFailure => "UF",
            Flag::UpstreamTimeout => "UT",
            Flag::UpstreamReset => "UR",
            Flag::Redirect => "RD",
            Flag::Overflow => "UO",
            Flag::RetryLimitExceeded => "URX",
            Flag::Retried => "RT",
            Flag::RetryBudgetExhausted => "RB",
            Flag::DelayInjected => "DI",
            Flag::FaultInjected => "FI",
            Flag::RateLimited => "RL",
            Flag::Denied => "AD",
        }
    }

    /// The HTTP status of the mesh's own answer.
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Flag::NoRoute => S::NOT_FOUND,
            Flag::NoBackend => S::INTERNAL_SERVER_ERROR,
            Flag::NoHealthyUpstream
            | Flag::UpstreamConnectFailure
            | Flag::Overflow
            | Flag::RetryLimitExceeded
            | Flag::RetryBudgetExhausted
            | Flag::FaultInjected => S::SERVICE_UNAVAILABLE,
            Flag::UpstreamTimeout => S::GATEWAY_TIMEOUT,
            Flag::UpstreamReset => S::BAD_GATEWAY,
            Flag::Redirect => S::FOUND,
            Flag::RateLimited => S::TOO_MANY_REQUESTS,
            Flag::Denied => S::FORBIDDEN,
            Flag::Retried | Flag::DelayInjected => S::OK,
        }
    }

    /// The gRPC status of the mesh's own answer to a gRPC call.
    pub fn grpc_status(self) -> u16 {
        match self {
            Flag::NoRoute => 12,        // UNIMPLEMENTED
            Flag::UpstreamTimeout => 4, // DEADLINE_EXCEEDED
            Flag::NoBackend => 13,      // INTERNAL
            Flag::RateLimited => 8,     // RESOURCE_EXHAUSTED
            Flag::Denied => 7,          // PERMISSION_DENIED
            _ => 14,                    // UNAVAILABLE
        }
    }

    const ALL: [Flag; 15] = [
        Flag::NoRoute,
        Flag::NoBackend,
        Flag::NoHealthyUpstream,
        Flag::UpstreamConnectFailure,
        Flag::UpstreamTimeout,
        Flag::UpstreamReset,
        Flag::Redirect,
        Flag::Overflow,
        Flag::RetryLimitExceeded,
        Flag::Retried,
        Flag::RetryBudgetExhausted,
        Flag::DelayInjected,
        Flag::FaultInjected,
        Flag::RateLimited,
        Flag::Denied,
    ];
}

/// The flags one request collected, in a fixed order: what
/// [`FLAGS_HEADER`] carries, comma-separated as Envoy's
/// `%RESPONSE_FLAGS%`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u16);

impl Flags {
    pub fn insert(&mut self, f: Flag) {
        self.0 |= 1 << f as u16;
    }

    pub fn contains(self, f: Flag) -> bool {
        self.0 & (1 << f as u16) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    /// `-` when empty (the metric label and access-log spelling).
    pub fn label(self) -> String {
        if self.is_empty() {
            return "-".to_owned();
        }
        let mut out = String::new();
        for f in Flag::ALL.into_iter().filter(|f| self.contains(*f)) {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(f.as_str());
        }
        out
    }
}

impl Flags {
    /// The flags a header value names (another agent's answer); unknown
    /// ones are left out.
    pub fn parse(value: &[u8]) -> Flags {
        let mut out = Flags::default();
        for part in value.split(|b| *b == b',') {
            if let Some(f) = Flag::ALL
                .into_iter()
                .find(|f| f.as_str().as_bytes() == part)
            {
                out.insert(f);
            }
        }
        out
    }
}

impl From<Flag> for Flags {
    fn from(f: Flag) -> Flags {
        let mut s = Flags::default();
        s.insert(f);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_list_in_a_fixed_order_and_parse_back() {
        let mut f = Flags::from(Flag::Retried);
        f.insert(Flag::DelayInjected);
        f.insert(Flag::Overflow);
        assert_eq!(f.label(), "UO,RT,DI");
        assert_eq!(Flags::parse(f.label().as_bytes()), f);
        assert_eq!(Flags::default().label(), "-");
        assert_eq!(Flags::parse(b"XX,RL"), Flags::from(Flag::RateLimited));
    }
}
