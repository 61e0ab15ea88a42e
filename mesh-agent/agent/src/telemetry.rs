//! Metrics (Prometheus, prefix `mesh_`) and the live connection table that
//! `meshctl` reads through the admin API.
use std::{
    collections::{BTreeMap, VecDeque},
    fmt::{self, Write},
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use mesh_api::admin::{ConnectionState, ConnectionView};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// An enum of label values, each with its exported spelling.
macro_rules! label_values {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
                encoder.write_str(self.as_str())
            }
        }
    };
}

label_values! {
    /// Outcome of a connection accepted on the outbound listener.
    ConnectionResult {
        Forwarded => "forwarded",
        /// No kernel record: not redirected, so refused.
        NotRedirected => "refused_not_redirected",
        ConnectFailed => "upstream_connect_failed",
        NoReadyEndpoint => "no_ready_endpoint",
        UnknownServicePort => "unknown_service_port",
        NoRoute => "no_route",
        /// The node itself: unspecified, loopback, link-local or one of its
        /// own addresses.
        ForbiddenDestination => "forbidden_destination",
        /// The destination (on this node) is denied to the caller by an
        /// AuthorizationPolicy.
        Denied => "denied",
        Error => "error",
    }
}

label_values! {
    /// Bytes of a connection: sent is pod to destination.
    Direction {
        Sent => "sent",
        Received => "received",
    }
}

label_values! {
    /// Which side of a tunnel handshake this agent was.
    TunnelSide {
        Outbound => "outbound",
        Inbound => "inbound",
    }
}

label_values! {
    /// Outcome of a CONNECT stream received on the tunnel listener.
    InboundResult {
        Forwarded => "forwarded",
        NotLocalWorkload => "not_local_workload",
        ConnectFailed => "connect_failed",
        /// An AuthorizationPolicy denied it.
        Denied => "denied",
    }
}

label_values! {
    /// Outcome of a connection the kernel handed to the inbound plaintext
    /// listener (into a pod, not through its node agent).
    PlaintextResult {
        /// Allowed, and carried to the workload.
        Forwarded => "forwarded",
        /// Served as HTTP: each request judged on its own.
        Http => "http",
        /// An AuthorizationPolicy denied it.
        Denied => "denied",
        /// The workload is STRICT (it became so after the kernel's check).
        Strict => "strict_refused",
        NotLocalWorkload => "not_local_workload",
        ConnectFailed => "connect_failed",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlaintextLabels {
    pub result: PlaintextResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: ConnectionResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: TunnelSide,
    /// `ok`, or the refusal's reason ([`mesh_api::identity::Refusal::reason`]).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundLabels {
    pub result: InboundResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A kernel decision ([`mesh_common::Decision::name`]).
    pub reason: &'static str,
}

/// One HTTP request or gRPC call served by the outbound proxy. Every label
/// is bounded: workloads and Services of the mesh, routes by name, status
/// codes, flags; never a raw path.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `namespace/name` of the calling pod's Workload, or `unknown`.
    pub source_workload: String,
    /// The calling pod's namespace, or `unknown`.
    pub source_namespace: String,
    /// The calling pod's SPIFFE ID, or empty when it has none.
    pub source_identity: String,
    /// `namespace/name` of the Service the client dialled.
    pub destination_service: String,
    /// `namespace/name` of the Workload whose endpoint answered (the last
    /// try's); empty when no endpoint was tried or it is not a Workload.
    pub destination_workload: String,
    /// `true` when the request went to the endpoint through the mTLS
    /// tunnel; `false` when it went directly (same node, or outside the
    /// mesh) or no endpoint was tried.
    pub mtls: bool,
    /// `namespace/name` of the route that served it; empty when none
    /// applied.
    pub route: String,
    pub code: u16,
    /// For gRPC calls, the `grpc-status` the client saw when it came in the
    /// response headers (trailers-only answers); empty otherwise.
    pub grpc_status: String,
    /// The mesh's response flags (comma-separated, a fixed order), or `-`.
    pub flags: String,
}

/// One TCP connection carried as bytes (not served as HTTP: those are
/// counted by request), on the caller's agent (`outbound`) or the
/// destination's (`inbound`: from the tunnel, or from outside the mesh).
/// Same-node connections are counted once, as `outbound`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub side: TunnelSide,
    /// `namespace/name` of the caller's Workload, or `unknown`.
    pub source_workload: String,
    /// `namespace/name` of the Service dialled; empty when the caller
    /// dialled an endpoint, or on the inbound side.
    pub destination_service: String,
    /// `namespace/name` of the destination's Workload; empty when it is not
    /// one.
    pub destination_workload: String,
    /// Through the mTLS tunnel.
    pub mtls: bool,
}

/// The counters of one open TCP connection: it was counted as opened, and
/// [`TcpCounters::closed`] counts it closed with its bytes.
pub struct TcpCounters {
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl TcpCounters {
    /// `sent`: source to destination; `received`: the other way.
    pub fn closed(self, sent: u64, received: u64) {
        self.closed.inc();
        self.sent.inc_by(sent);
        self.received.inc_by(received);
    }
}

/// An authorization decision at the destination.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `namespace/name` of the deciding policy; `-` for "no ALLOW matched".
    pub policy: String,
    /// `allow`, `deny`, `audit`.
    pub result: &'static str,
}

/// A resilience decision taken for a request to a Service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub destination_service: String,
    /// `retried`, `retry_budget_exhausted`, `retry_limit_exceeded`,
    /// `retry_body_too_large`, `overflow_requests`, `overflow_pending`,
    /// `overflow_connections`, `ejected`, `fault_delay`, `fault_abort`,
    /// `rate_limited_outbound`, `rate_limited_inbound`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub destination_service: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    /// `http1`, `http2`, `declared`, or why it is opaque (`tls`, `unknown`,
    /// `timeout`, `closed`, `tcp`).
    pub protocol: &'static str,
}

/// A histogram family of body sizes (bytes, 64 B to 64 MiB).
pub struct SizeFamily(pub Family<LatencyLabels, Histogram, fn() -> Histogram>);

impl Default for SizeFamily {
    fn default() -> Self {
        fn buckets() -> Histogram {
            Histogram::new(exponential_buckets(64.0, 4.0, 11))
        }
        SizeFamily(Family::new_with_constructor(buckets))
    }
}

/// A histogram family of request latencies (seconds, 0.1 ms to ~13 s).
pub struct LatencyFamily(pub Family<LatencyLabels, Histogram, fn() -> Histogram>);

impl Default for LatencyFamily {
    fn default() -> Self {
        fn buckets() -> Histogram {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        }
        LatencyFamily(Family::new_with_constructor(buckets))
    }
}

#[derive(Default)]
pub struct Metrics {
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_request_duration: LatencyFamily,
    pub http_request_size: SizeFamily,
    pub http_response_size: SizeFamily,
    pub protocol_detections: Family<DetectLabels, Counter>,
    pub outbound_connections: Family<ResultLabels, Counter>,
    pub outbound_active: Gauge,
    pub outbound_bytes: Family<DirectionLabels, Counter>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub tcp_received: Family<TcpLabels, Counter>,
    pub redirect_decisions: Family<ReasonLabels, Counter>,
    pub tunnel_handshakes: Family<HandshakeLabels, Counter>,
    pub inbound_streams: Family<InboundLabels, Counter>,
    pub inbound_plaintext: Family<PlaintextLabels, Counter>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub authz: Family<AuthzLabels, Counter>,
    /// The live stream of `meshctl tap`; its drops are counted here.
    pub tap: Arc<crate::tap::Tap>,
    /// `--access-log`, for the Services whose TrafficPolicy asks.
    pub access_log: Arc<crate::access_log::AccessLog>,
    /// Spans per hop (`--otlp-endpoint`); off until started.
    pub trace: Arc<crate::trace::Tracing>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("mesh_agent");
        r.register(
            "outbound_connections",
            "Connections accepted on the outbound listener, by result",
            self.outbound_connections.clone(),
        );
        r.register(
            "outbound_active_connections",
            "Outbound connections open now",
            self.outbound_active.clone(),
        );
        r.register(
            "outbound_bytes",
            "Bytes carried by outbound connections (sent: pod to destination)",
            self.outbound_bytes.clone(),
        );
        r.register(
            "tcp_connections_opened",
            "TCP connections carried as bytes (not served as HTTP), opened, by side (outbound: the caller's agent; inbound: the destination's), source workload, destination Service and workload, and mTLS",
            self.tcp_opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "TCP connections carried as bytes, closed, with the labels of tcp_connections_opened",
            self.tcp_closed.clone(),
        );
        r.register(
            "tcp_sent_bytes",
            "Bytes from source to destination of TCP connections carried as bytes, counted when they close, with the labels of tcp_connections_opened",
            self.tcp_sent.clone(),
        );
        r.register(
            "tcp_received_bytes",
            "Bytes from destination to source of TCP connections carried as bytes, counted when they close, with the labels of tcp_connections_opened",
            self.tcp_received.clone(),
        );
        r.register(
            "tunnel_handshakes",
            "mTLS handshakes of the tunnel between agents, by direction and result (ok, or the refusal reason)",
            self.tunnel_handshakes.clone(),
        );
        r.register(
            "inbound_streams",
            "CONNECT streams received on the tunnel listener, by result",
            self.inbound_streams.clone(),
        );
        r.register(
            "inbound_plaintext_connections",
            "Connections into this node's pods that did not come through the agent, which the kernel handed to the inbound plaintext listener, by result",
            self.inbound_plaintext.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests and gRPC calls through the outbound proxy, by source workload, namespace and identity, destination Service and workload, route, status code, gRPC status, mTLS and mesh response flag",
            self.http_requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time from a request's arrival to its response's headers, by destination Service and route",
            self.http_request_duration.0.clone(),
        );
        r.register(
            "http_request_size_bytes",
            "Body bytes of requests through the outbound proxy as the client sent them, by destination Service and route",
            self.http_request_size.0.clone(),
        );
        r.register(
            "http_response_size_bytes",
            "Body bytes of responses through the outbound proxy as the client received them, by destination Service and route",
            self.http_response_size.0.clone(),
        );
        r.register(
            "protocol_detections",
            "Connections to Service ports by the protocol detected (or declared) on them",
            self.protocol_detections.clone(),
        );
        r.register(
            "authz_decisions",
            "Authorization decisions at the destination, by deciding policy and result (connections and requests no policy selects are not counted)",
            self.authz.clone(),
        );
        r.register(
            "resilience_decisions",
            "Decisions of the Services' traffic policies (retries, budgets, circuit breakers, outlier ejections, faults, rate limits), by destination Service and reason",
            self.decisions.clone(),
        );
        r.register(
            "access_log_lines",
            "Access log lines written (queued for the writer)",
            self.access_log.written.clone(),
        );
        r.register(
            "access_log_dropped_lines",
            "Access log lines dropped because the writer fell behind",
            self.access_log.dropped.clone(),
        );
        r.register(
            "tap_tappers",
            "Live taps (meshctl tap) connected now",
            self.tap.tappers.clone(),
        );
        r.register(
            "tap_dropped_events",
            "Events of the live tap (meshctl tap) that a tapper fell too far behind to receive",
            self.tap.dropped.clone(),
        );
        r.register(
            "trace_spans_exported",
            "Spans of the requests this agent carried that the trace collector accepted (--otlp-endpoint)",
            self.trace.exported.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Spans lost, by reason: queue_full (the exporter fell behind) or export_failed (the collector did not accept them)",
            self.trace.dropped.clone(),
        );
        r.register(
            "redirect_decisions",
            "Decisions of the kernel programs, by reason",
            self.redirect_decisions.clone(),
        );
    }

    /// Counts a TCP connection opened; its counters count it closed.
    pub fn tcp_opened(&self, labels: TcpLabels) -> TcpCounters {
        self.tcp_opened.get_or_create(&labels).inc();
        TcpCounters {
            closed: self.tcp_closed.get_or_create(&labels).clone(),
            sent: self.tcp_sent.get_or_create(&labels).clone(),
            received: self.tcp_received.get_or_create(&labels).clone(),
        }
    }

    pub fn connection(&self, result: ConnectionResult) {
        self.outbound_connections
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn authz(&self, policy: &str, result: &'static str) {
        self.authz
            .get_or_create(&AuthzLabels {
                policy: policy.to_owned(),
                result,
            })
            .inc();
    }

    pub fn decision(&self, service: &str, reason: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                destination_service: service.to_owned(),
                reason,
            })
            .inc();
    }

    pub fn tunnel_handshake(&self, direction: TunnelSide, result: &'static str) {
        self.tunnel_handshakes
            .get_or_create(&HandshakeLabels { direction, result })
            .inc();
    }

    pub fn inbound_stream(&self, result: InboundResult) {
        self.inbound_streams
            .get_or_create(&InboundLabels { result })
            .inc();
    }

    pub fn plaintext(&self, result: PlaintextResult) {
        self.inbound_plaintext
            .get_or_create(&PlaintextLabels { result })
            .inc();
    }

    /// Brings the kernel's counters into the registry (they only grow).
    pub fn sync_decisions(&self, decisions: &[(mesh_common::Decision, u64)]) {
        for (d, total) in decisions {
            let c = self
                .redirect_decisions
                .get_or_create(&ReasonLabels { reason: d.name() });
            let now = c.get();
            if *total > now {
                c.inc_by(total - now);
            }
        }
    }
}

/// One live connection's counters, shared by its copy loops and the table.
pub struct Live {
    pub id: u64,
    pub src_pod: Option<String>,
    pub src_cgroup_id: u64,
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    pub upstream: OnceLock<(Option<String>, SocketAddr)>,
    pub started: SystemTime,
    pub start: Instant,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

impl Live {
    fn view(&self, state: ConnectionState, error: Option<String>) -> ConnectionView {
        ConnectionView {
            id: self.id,
            src_pod: self.src_pod.clone(),
            src_cgroup_id: self.src_cgroup_id,
            peer: self.peer,
            orig_dst: self.orig_dst,
            service: self.upstream.get().and_then(|u| u.0.clone()),
            upstream: self.upstream.get().map(|u| u.1),
            started_unix_ms: self
                .started
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            duration_ms: self.start.elapsed().as_millis() as u64,
            bytes_sent: self.sent.load(Ordering::Relaxed),
            bytes_received: self.received.load(Ordering::Relaxed),
            state,
            error,
        }
    }
}

/// Open connections plus the most recent closed ones.
pub struct ConnectionTable {
    next_id: AtomicU64,
    inner: Mutex<TableInner>,
    capacity: usize,
    /// Closed connections are tapped, and logged when sampled.
    tap: Arc<crate::tap::Tap>,
    access_log: Arc<crate::access_log::AccessLog>,
}

#[derive(Default)]
struct TableInner {
    open: BTreeMap<u64, Arc<Live>>,
    closed: VecDeque<ConnectionView>,
}

impl ConnectionTable {
    pub fn new(capacity: usize, metrics: &Metrics) -> Self {
        Self {
            next_id: AtomicU64::new(1),
            inner: Mutex::default(),
            capacity,
            tap: metrics.tap.clone(),
            access_log: metrics.access_log.clone(),
        }
    }

    pub fn open(
        self: &Arc<Self>,
        src_pod: Option<String>,
        src_cgroup_id: u64,
        peer: SocketAddr,
        orig_dst: SocketAddr,
    ) -> Tracked {
        let live = Arc::new(Live {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            src_pod,
            src_cgroup_id,
            peer,
            orig_dst,
            upstream: OnceLock::new(),
            started: SystemTime::now(),
            start: Instant::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        });
        self.lock().open.insert(live.id, live.clone());
        Tracked {
            table: self.clone(),
            live,
            error: None,
            log: false,
        }
    }

    /// Open connections first (oldest first), then closed ones, newest first.
    pub fn snapshot(&self) -> Vec<ConnectionView> {
        let inner = self.lock();
        inner
            .open
            .values()
            .map(|l| l.view(ConnectionState::Open, None))
            .chain(inner.closed.iter().rev().cloned())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Drop guard: however a connection ends, it leaves the open set and is
/// recorded as closed.
pub struct Tracked {
    table: Arc<ConnectionTable>,
    pub live: Arc<Live>,
    pub error: Option<String>,
    /// Access-logged when it closes.
    pub log: bool,
}

impl Tracked {
    pub fn set_upstream(&self, service: Option<String>, addr: SocketAddr) {
        let _ = self.live.upstream.set((service, addr));
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let state = if self.error.is_some() {
            ConnectionState::Failed
        } else {
            ConnectionState::Closed
        };
        let view = self.live.view(state, self.error.take());
        let event = || {
            mesh_api::tap::TapEvent::Connection(mesh_api::tap::ConnectionEvent {
                direction: mesh_api::tap::Direction::Outbound,
                source_identity: None,
                source_workload: None,
                destination_workload: None,
                connection: view.clone(),
            })
        };
        self.table.tap.publish(event);
        if self.log {
            self.table.access_log.write(&event());
        }
        let mut inner = self.table.lock();
        inner.open.remove(&self.live.id);
        if inner.closed.len() == self.table.capacity {
            inner.closed.pop_front();
        }
        inner.closed.push_back(view);
    }
}
