//! The node agent's admin API: HTTP/1.1 with JSON bodies on a unix socket.
//! These types are what the agent serves and what `meshctl` and xtask read;
//! [`client`] is the blocking client both use.
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

pub mod client;

pub use client::{AdminClient, AdminError};

/// The endpoints.
pub mod paths {
    pub const STATUS: &str = "/status";
    pub const CONFIG: &str = "/config";
    pub const CONNECTIONS: &str = "/connections";
    pub const ENROLL: &str = "/enroll";
    pub const UNENROLL: &str = "/unenroll";
    pub const BPF: &str = "/bpf";
}

fn default_namespace() -> String {
    crate::names::DEFAULT_NAMESPACE.to_owned()
}

/// `POST /enroll`: capture the connections of pod `namespace/pod`, whose
/// processes live in the cgroup `cgroup` (a path under the node's pod cgroup
/// root) and its subtree, and whose network namespace is `netns` (a
/// namespace file such as `/run/netns/<name>`, as a CNI plugin is given it;
/// when absent, that of a process of the cgroup). The pod is then the
/// Workload of that namespace and name on this node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub pod: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub cgroup: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

/// `POST /unenroll`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnenrollRequest {
    pub pod: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

/// An enrolled pod (the answer to enroll and unenroll, and in `/status`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrolledPod {
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub name: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// The network namespace file it was enrolled with, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The pod's addresses, whose inbound connections the agent judges.
    #[serde(default)]
    pub addresses: Vec<std::net::Ipv4Addr>,
}

/// `GET /status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub uptime_secs: u64,
    pub enrolled: Vec<EnrolledPod>,
    /// The kernel programs' decisions by reason, since they were loaded.
    pub decisions: BTreeMap<String, u64>,
    pub open_connections: usize,
    pub sync: Option<SyncState>,
    pub identity: Option<IdentityStatus>,
}

/// Where something the agent serves came from.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Received from the control server.
    Control,
    /// Read from the agent's disk cache.
    Cache,
    #[default]
    None,
}

/// Configuration distribution, as the agent sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SyncState {
    pub connected: bool,
    /// Revision of the configuration being served.
    pub version: String,
    pub source: Source,
    pub resources: usize,
    pub last_update_unix_ms: u64,
    pub last_error: Option<String>,
    pub acks: u64,
    pub nacks: u64,
}

/// One certificate the agent holds or wants.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CertStatus {
    pub identity: String,
    pub not_before_unix: Option<u64>,
    pub not_after_unix: Option<u64>,
    pub last_renewal_unix: Option<u64>,
    pub next_renewal_unix: Option<u64>,
    /// Certificates received since the agent started.
    pub renewals: u64,
    /// Failed attempts since the last success.
    pub failures: u32,
    pub last_error: Option<String>,
    pub source: Source,
}

/// The `identity` block of `/status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdentityStatus {
    pub trust_domain: String,
    pub trust_bundle: bool,
    pub node: CertStatus,
    /// One per identity of this node's Workloads, by identity.
    pub certificates: Vec<CertStatus>,
}

/// `GET /config`: the configuration being served: every resource's key and
/// version, and the ones an operator asks about, by kind.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConfigView {
    pub version: String,
    pub resources: Vec<ResourceVersion>,
    /// Distribution state; `None` for an agent without a control server.
    #[serde(default)]
    pub sync: Option<SyncState>,
    #[serde(default)]
    pub workloads: Vec<WorkloadView>,
    #[serde(default)]
    pub services: Vec<ServiceView>,
    /// HTTPRoutes and GRPCRoutes.
    #[serde(default)]
    pub routes: Vec<SpecView>,
    /// TrafficPolicies, AuthorizationPolicies and any other policy kind.
    #[serde(default)]
    pub policies: Vec<SpecView>,
}

/// A Workload as the agent holds it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkloadView {
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub node: String,
    pub ip: String,
    pub service_account: String,
    /// Effective mode: STRICT, PERMISSIVE or DISABLE.
    pub mtls_mode: String,
    pub ready: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A Service as the agent holds it, with its resolved endpoints.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub vips: Vec<String>,
    pub ports: Vec<ServicePortView>,
    /// Workload names, ready or not.
    pub endpoints: Vec<String>,
    pub ready_endpoints: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServicePortView {
    pub port: u16,
    pub target_port: u16,
    /// Empty: not declared (the agent detects HTTP).
    pub app_protocol: String,
}

/// A route or policy as the agent holds it: its spec as the control server
/// validated it (the kind's own field names).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SpecView {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub spec: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResourceVersion {
    pub key: String,
    pub version: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    Open,
    Closed,
    /// Closed with an error (see `error`).
    Failed,
}

/// One connection of `GET /connections`: open ones and the latest closed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectionView {
    pub id: u64,
    pub src_pod: Option<String>,
    pub src_cgroup_id: u64,
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Where the agent connected (a Service endpoint, or the original destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<SocketAddr>,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub state: ConnectionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /bpf`: the kernel side of this node's interception.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BpfView {
    /// Where the agent pins its links and maps (`--bpf-pin-dir`).
    pub pin_dir: PathBuf,
    pub programs: Vec<ProgramView>,
    /// The agent's enrolled pods and the kernel's ENROLLED map, side by side.
    pub enrolled: Vec<EnrolledCgroup>,
    pub maps: Vec<MapView>,
    /// The kernel programs' decisions by reason, since they were loaded.
    pub decisions: BTreeMap<String, u64>,
}

/// One attachment of a kernel program.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgramView {
    /// Its name in the object, e.g. `mesh_connect4`.
    pub program: String,
    /// The hook, as bpftool names it: `cgroup/connect4`, `sockops`,
    /// `cgroup_skb/ingress`, `sk_lookup`.
    pub attach_type: String,
    pub target: AttachTarget,
    pub held: Holder,
    /// The link's pin, for a pinned attachment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<PathBuf>,
    /// Whether the kernel runs it there now (for a pinned one: its pin
    /// holds a link).
    pub attached: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_id: Option<u32>,
}

/// Where a program is attached.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AttachTarget {
    /// The node's pod cgroup root (`--cgroup-root`): every pod below it.
    PodCgroupRoot { path: PathBuf },
    /// The agent's own cgroup.
    AgentCgroup { path: PathBuf },
    /// The network namespace of the pod enrolled with this cgroup id.
    PodNetns {
        cgroup_id: u64,
        /// `namespace/name`, when the agent has that pod enrolled.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<PathBuf>,
    },
}

/// What keeps an attachment alive.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Holder {
    /// A link pinned in the pin directory: it outlives the agent.
    Pinned,
    /// The agent's process: it ends with the agent.
    Agent,
}

/// An enrolled cgroup, as the agent and the kernel see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrolledCgroup {
    pub cgroup_id: u64,
    /// `namespace/name`; `None`: in the kernel's map, unknown to the agent.
    pub pod: Option<String>,
    pub cgroup: Option<PathBuf>,
    /// Whether the kernel's ENROLLED map holds it.
    pub in_kernel: bool,
}

/// How full a kernel map is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapView {
    pub name: String,
    /// `hash`, `lru_hash`, `sockhash`, ...
    pub map_type: String,
    pub entries: u64,
    pub max_entries: u32,
    /// Why the map could not be read (then `entries` is 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The body of every non-2xx answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
