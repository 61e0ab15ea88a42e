//! Metrics (Prometheus, prefix `mesh_`) and the live connection table that
//! `meshctl` reads through the admin API.
use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Outcome of an accepted outbound connection.
pub mod result {
    pub const FORWARDED: &str = "forwarded";
    pub const NOT_REDIRECTED: &str = "refused_not_redirected";
    pub const CONNECT_FAILED: &str = "upstream_connect_failed";
    pub const NO_READY_ENDPOINT: &str = "no_ready_endpoint";
    pub const UNKNOWN_SERVICE_PORT: &str = "unknown_service_port";
    pub const NO_ROUTE: &str = "no_route";
    pub const ERROR: &str = "error";
}

#[derive(Default)]
pub struct Metrics {
    pub outbound_connections: Family<ResultLabels, Counter>,
    pub outbound_active: Gauge,
    pub outbound_bytes: Family<DirectionLabels, Counter>,
    pub redirect_decisions: Family<ReasonLabels, Counter>,
    pub tunnel_handshakes: Family<HandshakeLabels, Counter>,
    pub inbound_streams: Family<ResultLabels, Counter>,
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
            "redirect_decisions",
            "Decisions of the kernel programs, by reason",
            self.redirect_decisions.clone(),
        );
    }

    pub fn connection(&self, result: &'static str) {
        self.outbound_connections
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn tunnel_handshake(&self, direction: &'static str, result: &'static str) {
        self.tunnel_handshakes
            .get_or_create(&HandshakeLabels { direction, result })
            .inc();
    }

    pub fn inbound_stream(&self, result: &'static str) {
        self.inbound_streams
            .get_or_create(&ResultLabels { result })
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

#[derive(Clone, Debug, Serialize)]
pub struct ConnectionView {
    pub id: u64,
    pub src_pod: Option<String>,
    pub src_cgroup_id: u64,
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Where the agent connected (a Service endpoint, or the original destination).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<SocketAddr>,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
    fn view(&self, state: &'static str, error: Option<String>) -> ConnectionView {
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
}

#[derive(Default)]
struct TableInner {
    open: BTreeMap<u64, Arc<Live>>,
    closed: VecDeque<ConnectionView>,
}

impl ConnectionTable {
    pub fn new(capacity: usize) -> Self {
        Self {
            next_id: AtomicU64::new(1),
            inner: Mutex::default(),
            capacity,
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
        }
    }

    /// Open connections first (oldest first), then closed ones, newest first.
    pub fn snapshot(&self) -> Vec<ConnectionView> {
        let inner = self.lock();
        inner
            .open
            .values()
            .map(|l| l.view("open", None))
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
}

impl Tracked {
    pub fn set_upstream(&self, service: Option<String>, addr: SocketAddr) {
        let _ = self.live.upstream.set((service, addr));
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let state = if self.error.is_some() {
            "failed"
        } else {
            "closed"
        };
        let view = self.live.view(state, self.error.take());
        let mut inner = self.table.lock();
        inner.open.remove(&self.live.id);
        if inner.closed.len() == self.table.capacity {
            inner.closed.pop_front();
        }
        inner.closed.push_back(view);
    }
}

/// Logs to stderr for the binaries (`RUST_LOG`, default info); colours only
/// on a terminal, so log files stay plain.
pub fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}
