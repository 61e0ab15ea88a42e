//! Configuration resources: Kubernetes-style YAML documents (`Workload`,
//! `Service`, `Node`, `MtlsPolicy`, `TrafficPolicy`, `AuthorizationPolicy`
//! of `mesh.dev/v1alpha1`; `HTTPRoute`, `GRPCRoute` of
//! `gateway.networking.k8s.io/v1`) turned into validated internal types
//! before anything is locked or stored, and rendered back into the same
//! shape for `meshctl get`.
//!
//! A bad document rejects the whole batch with an error that names the
//! document (its 1-based index, and `Kind/namespace/name` once known), the
//! field path and the offending value.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::Ipv4Addr,
};

use mesh_api::authz::AuthorizationPolicySpec;
use mesh_api::gateway::{self, BackendObjectRef, GrpcRouteSpec, HttpRouteSpec, ParentRef};
use mesh_api::names::{
    CONTROL_SERVICE_ACCOUNT, DEFAULT_NAMESPACE, DEFAULT_SERVICE_ACCOUNT, DEFAULT_TUNNEL_PORT,
    NODE_SERVICE_ACCOUNT_PREFIX, SYSTEM_NAMESPACE,
};
use mesh_api::traffic::TrafficPolicySpec;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::json;
use serde_yaml_ng::{Mapping, Value};

pub use mesh_api::kinds::{AppProtocol, Kind, MtlsMode, Protocol};

/// Bounds of a Service port's `detectTimeout`: long enough for a client's
/// first segment, short enough that a server-first protocol is not held up.
const MIN_DETECT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1);
const MAX_DETECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Identity of a resource; displayed as its distribution key `Kind/ns/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceId {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WorkloadPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// A pod, or a host outside Kubernetes, that takes part in the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub ports: Vec<WorkloadPort>,
    pub ready: bool,
    /// `spec.mtlsMode`; unset inherits the namespace's [`MtlsPolicy`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls_mode: Option<MtlsMode>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    /// `None`: not declared; agents detect HTTP/1 and HTTP/2 per connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<AppProtocol>,
    /// `spec.ports[].detectTimeout`, milliseconds: how long agents wait for
    /// a client's first bytes on this port. `None`: the agent's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_timeout_ms: Option<u32>,
}

/// Virtual IPs and ports in front of the Workloads its selector matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub vips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
}

impl Service {
    /// Whether the selector picks a workload with these labels. An empty
    /// selector picks nothing, as in Kubernetes.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.selector.is_empty()
            && self
                .selector
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }
}

/// A node of the mesh: where its agent's mTLS tunnel listens. Cluster-scoped.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub address: Ipv4Addr,
    pub tunnel_port: u16,
}

/// The mTLS mode of a namespace's workloads that set none themselves. At
/// most one per namespace; not distributed itself, but folded into each
/// Workload's effective mode.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MtlsPolicy {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub mode: MtlsMode,
}

/// A Gateway API route (GAMMA: attached to Services through its
/// `parentRefs`), with its spec as the typed values of [`mesh_api::gateway`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route<S> {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// The store revision at which this route's key was first created (the
    /// Gateway API's "oldest route wins" tie-break): set by the store when it
    /// plans an apply and kept by later updates; 0 in a freshly parsed route.
    #[serde(default)]
    pub created_revision: u64,
    pub spec: S,
}

pub type HttpRoute = Route<HttpRouteSpec>;
pub type GrpcRoute = Route<GrpcRouteSpec>;

/// A policy kind of ours, with its spec as the typed values of its
/// mesh_api module.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy<S> {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// As a route's: the store revision at which this policy's key was first
    /// created, kept by later updates (ties between TrafficPolicies for one
    /// target go to the oldest).
    #[serde(default)]
    pub created_revision: u64,
    pub spec: S,
}

/// A TrafficPolicy ([`mesh_api::traffic`]): resilience settings for one
/// Service of its namespace, or one port of it.
pub type TrafficPolicy = Policy<TrafficPolicySpec>;
/// An AuthorizationPolicy ([`mesh_api::authz`]): who may call the workloads
/// it selects. It names no other resource: a selector that matches no
/// workload is valid, as in Istio.
pub type AuthorizationPolicy = Policy<AuthorizationPolicySpec>;

/// What the server does with a policy spec, whatever its kind.
pub trait PolicySpec: Serialize + DeserializeOwned {
    const KIND: Kind;
    /// The checks the spec must pass on its own.
    fn validate(&self) -> Result<(), gateway::Invalid>;
}

impl PolicySpec for TrafficPolicySpec {
    const KIND: Kind = Kind::TrafficPolicy;

    fn validate(&self) -> Result<(), gateway::Invalid> {
        TrafficPolicySpec::validate(self)
    }
}

impl PolicySpec for AuthorizationPolicySpec {
    const KIND: Kind = Kind::AuthorizationPolicy;

    fn validate(&self) -> Result<(), gateway::Invalid> {
        AuthorizationPolicySpec::validate(self)
    }
}

/// What the server does with a route spec, whatever its kind.
pub trait RouteSpec: Serialize + DeserializeOwned {
    const KIND: Kind;
    fn parent_refs(&self) -> &[ParentRef];
    /// Every Service the rules send to, with the field that names it.
    fn backend_refs(&self) -> Vec<(String, BackendObjectRef)>;
    /// The checks the spec must pass on its own.
    fn validate(&self) -> Result<(), gateway::Invalid>;
}

impl RouteSpec for HttpRouteSpec {
    const KIND: Kind = Kind::HttpRoute;

    fn parent_refs(&self) -> &[ParentRef] {
        &self.parent_refs
    }

    fn backend_refs(&self) -> Vec<(String, BackendObjectRef)> {
        HttpRouteSpec::backend_refs(self)
    }

    fn validate(&self) -> Result<(), gateway::Invalid> {
        HttpRouteSpec::validate(self)
    }
}

impl RouteSpec for GrpcRouteSpec {
    const KIND: Kind = Kind::GrpcRoute;

    fn parent_refs(&self) -> &[ParentRef] {
        &self.parent_refs
    }

    fn backend_refs(&self) -> Vec<(String, BackendObjectRef)> {
        GrpcRouteSpec::backend_refs(self)
    }

    fn validate(&self) -> Result<(), gateway::Invalid> {
        GrpcRouteSpec::validate(self)
    }
}

/// Not `Eq`: a TrafficPolicy's percentages are `f64`. A TrafficPolicy is
/// boxed: its spec is many times the size of any other kind's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Resource {
    Workload(Workload),
    Service(Service),
    Node(Node),
    MtlsPolicy(MtlsPolicy),
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
    TrafficPolicy(Box<TrafficPolicy>),
    AuthorizationPolicy(AuthorizationPolicy),
}

/// One step of a transaction on the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Put(Resource),
    Delete(ResourceId),
}

/// An address a resource owns: a Service VIP or a Workload IP. No two
/// resources may own the same address.
struct Claim {
    address: Ipv4Addr,
    field: String,
}

impl Resource {
    pub fn id(&self) -> ResourceId {
        let (kind, namespace, name) = match self {
            Resource::Workload(w) => (Kind::Workload, w.namespace.as_str(), &w.name),
            Resource::Service(s) => (Kind::Service, s.namespace.as_str(), &s.name),
            Resource::Node(n) => (Kind::Node, "", &n.name),
            Resource::MtlsPolicy(p) => (Kind::MtlsPolicy, p.namespace.as_str(), &p.name),
            Resource::HttpRoute(r) => (Kind::HttpRoute, r.namespace.as_str(), &r.name),
            Resource::GrpcRoute(r) => (Kind::GrpcRoute, r.namespace.as_str(), &r.name),
            Resource::TrafficPolicy(p) => (Kind::TrafficPolicy, p.namespace.as_str(), &p.name),
            Resource::AuthorizationPolicy(p) => {
                (Kind::AuthorizationPolicy, p.namespace.as_str(), &p.name)
            }
        };
        ResourceId {
            kind,
            namespace: namespace.to_owned(),
            name: name.clone(),
        }
    }

    /// Addresses this resource owns.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        self.claims().into_iter().map(|c| c.address).collect()
    }

    fn claims(&self) -> Vec<Claim> {
        match self {
            Resource::Workload(w) => vec![Claim {
                address: w.ip,
                field: "spec.ip".into(),
            }],
            Resource::Service(s) => s
                .vips
                .iter()
                .enumerate()
                .map(|(i, &address)| Claim {
                    address,
                    field: format!("spec.vips[{i}]"),
                })
                .collect(),
            Resource::Node(n) => vec![Claim {
                address: n.address,
                field: "spec.address".into(),
            }],
            Resource::MtlsPolicy(_)
            | Resource::HttpRoute(_)
            | Resource::GrpcRoute(_)
            | Resource::TrafficPolicy(_)
            | Resource::AuthorizationPolicy(_) => Vec::new(),
        }
    }

    /// The Services a route attaches to and sends to, or a TrafficPolicy
    /// targets, each with the fields that name it; empty for other kinds.
    fn service_references(&self) -> Vec<ServiceReference> {
        fn of<S: RouteSpec>(r: &Route<S>) -> Vec<ServiceReference> {
            let parents = r.spec.parent_refs().iter().enumerate().map(|(i, p)| {
                ServiceReference::new(
                    format!("spec.parentRefs[{i}]"),
                    &r.namespace,
                    p.namespace.as_deref(),
                    &p.name,
                    p.port,
                )
            });
            let backends = r.spec.backend_refs().into_iter().map(|(field, b)| {
                ServiceReference::new(field, &r.namespace, b.namespace.as_deref(), &b.name, b.port)
            });
            parents.chain(backends).collect()
        }
        match self {
            Resource::HttpRoute(r) => of(r),
            Resource::GrpcRoute(r) => of(r),
            // The policy's own namespace only; the name field is what
            // names the Service.
            Resource::TrafficPolicy(p) => {
                let t = &p.spec.target_ref;
                vec![ServiceReference {
                    service_field: "spec.targetRef.name".into(),
                    port_field: "spec.targetRef.port".into(),
                    namespace: p.namespace.clone(),
                    name: t.name.clone(),
                    port: t.port,
                }]
            }
            _ => Vec::new(),
        }
    }

    /// The revision a route's or policy's key was first created at; `None`
    /// for other kinds.
    pub fn created_revision(&self) -> Option<u64> {
        match self {
            Resource::HttpRoute(r) => Some(r.created_revision),
            Resource::GrpcRoute(r) => Some(r.created_revision),
            Resource::TrafficPolicy(p) => Some(p.created_revision),
            Resource::AuthorizationPolicy(p) => Some(p.created_revision),
            _ => None,
        }
    }

    /// Sets a route's or policy's creation revision (other kinds have none).
    pub fn set_created_revision(&mut self, revision: u64) {
        match self {
            Resource::HttpRoute(r) => r.created_revision = revision,
            Resource::GrpcRoute(r) => r.created_revision = revision,
            Resource::TrafficPolicy(p) => p.created_revision = revision,
            Resource::AuthorizationPolicy(p) => p.created_revision = revision,
            _ => {}
        }
    }

    /// The Kubernetes-style document (as `meshctl get` shows it), with every
    /// default filled in; `version` is the store revision of its last change.
    pub fn to_document(&self, version: u64) -> serde_json::Value {
        let (kind, name, namespace, labels, spec) = match self {
            Resource::Workload(w) => (
                Kind::Workload,
                &w.name,
                &w.namespace,
                &w.labels,
                workload_spec(w),
            ),
            Resource::MtlsPolicy(p) => (
                Kind::MtlsPolicy,
                &p.name,
                &p.namespace,
                &p.labels,
                json!({ "mode": p.mode.as_str() }),
            ),
            Resource::Node(n) => (
                Kind::Node,
                &n.name,
                &String::new(),
                &n.labels,
                json!({
                    "address": n.address.to_string(),
                    "tunnelPort": n.tunnel_port,
                }),
            ),
            Resource::Service(s) => (
                Kind::Service,
                &s.name,
                &s.namespace,
                &s.labels,
                json!({
                    "vips": s.vips.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>(),
                    "ports": s.ports.iter().map(|p| {
                        let mut port = json!({
                            "port": p.port,
                            "targetPort": p.target_port,
                        });
                        if let Some(a) = p.app_protocol {
                            port["appProtocol"] = json!(a.as_str());
                        }
                        if let Some(ms) = p.detect_timeout_ms {
                            port["detectTimeout"] = json!(format!("{ms}ms"));
                        }
                        named(&p.name, port)
                    }).collect::<Vec<_>>(),
                    "selector": s.selector,
                }),
            ),
            Resource::HttpRoute(r) => (
                Kind::HttpRoute,
                &r.name,
                &r.namespace,
                &r.labels,
                spec_document(&r.spec),
            ),
            Resource::GrpcRoute(r) => (
                Kind::GrpcRoute,
                &r.name,
                &r.namespace,
                &r.labels,
                spec_document(&r.spec),
            ),
            Resource::TrafficPolicy(p) => (
                Kind::TrafficPolicy,
                &p.name,
                &p.namespace,
                &p.labels,
                spec_document(&p.spec),
            ),
            Resource::AuthorizationPolicy(p) => (
                Kind::AuthorizationPolicy,
                &p.name,
                &p.namespace,
                &p.labels,
                spec_document(&p.spec),
            ),
        };
        let mut metadata = json!({
            "name": name,
            "resourceVersion": version.to_string(),
        });
        if !kind.is_cluster_scoped() {
            metadata["namespace"] = json!(namespace);
        }
        if !labels.is_empty() {
            metadata["labels"] = json!(labels);
        }
        json!({
            "apiVersion": kind.api_version(),
            "kind": kind.as_str(),
            "metadata": metadata,
            "spec": spec,
        })
    }
}

/// A route's or policy's spec as its serde JSON, without the nulls and empty
/// lists that stand for unset fields (they parse back to the same spec).
fn spec_document(spec: &impl Serialize) -> serde_json::Value {
    fn prune(value: serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => map
                .into_iter()
                .filter(|(_, v)| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
                .map(|(k, v)| (k, prune(v)))
                .collect(),
            serde_json::Value::Array(items) => items.into_iter().map(prune).collect(),
            other => other,
        }
    }
    prune(serde_json::to_value(spec).expect("a spec serializes"))
}

/// A Workload's spec, with `mtlsMode` only when it sets one.
fn workload_spec(w: &Workload) -> serde_json::Value {
    let mut spec = json!({
        "serviceAccount": w.service_account,
        "node": w.node,
        "ip": w.ip.to_string(),
        "ports": w.ports.iter().map(|p| named(&p.name, json!({
            "port": p.port,
            "protocol": p.protocol.as_str(),
        }))).collect::<Vec<_>>(),
        "ready": w.ready,
    });
    if let Some(mode) = w.mtls_mode {
        spec["mtlsMode"] = json!(mode.as_str());
    }
    spec
}

/// A port entry, with a name only when it has one.
fn named(name: &str, mut port: serde_json::Value) -> serde_json::Value {
    if !name.is_empty() {
        port["name"] = json!(name);
    }
    port
}

/// Which document of a batch an error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentRef {
    /// 1-based position in the YAML stream.
    pub index: usize,
    pub id: Option<ResourceId>,
}

impl fmt::Display for DocumentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.id {
            Some(id) => write!(f, "document {} ({id})", self.index),
            None => write!(f, "document {}", self.index),
        }
    }
}

/// What is wrong with one field; each names the offending value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("required field is missing")]
    Missing,
    #[error("unknown field")]
    UnknownField,
    #[error("expected {expected}, found {found}")]
    WrongType {
        expected: &'static str,
        found: String,
    },
    #[error("unknown apiVersion {found:?} (expected {expected})")]
    UnknownApiVersion { found: String, expected: String },
    #[error("unknown kind {found:?} (expected {expected})")]
    UnknownKind { found: String, expected: String },
    #[error("{kind} is a kind of apiVersion {:?}, not {found:?}", kind.api_version())]
    WrongApiVersion { kind: Kind, found: String },
    #[error("{kind} is cluster-scoped: it has no namespace (found {found:?})")]
    ClusterScoped { kind: Kind, found: String },
    #[error(
        "service account {0:?} in namespace {SYSTEM_NAMESPACE} is reserved for node agents and the control server"
    )]
    ReservedServiceAccount(String),
    #[error(
        "{0:?} is not a valid name (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)"
    )]
    InvalidName(String),
    #[error(
        "{0:?} is not a valid node name (lowercase letters, digits, '-' and '.', at most 253 characters)"
    )]
    InvalidNodeName(String),
    #[error(
        "{0:?} is not a valid name (a DNS subdomain: lowercase letters, digits, '-' and '.', at most 253 characters)"
    )]
    InvalidSubdomainName(String),
    #[error("{0:?} is not a valid label key")]
    InvalidLabelKey(String),
    #[error(
        "{0:?} is not a valid label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
    )]
    InvalidLabelValue(String),
    #[error("{0:?} is not an IPv4 address")]
    InvalidIp(String),
    #[error("{0} is not a usable address ({1})")]
    UnusableIp(Ipv4Addr, &'static str),
    #[error("{0} is listed twice")]
    DuplicateIp(Ipv4Addr),
    #[error("port {0} is out of range (1-65535)")]
    PortOutOfRange(String),
    #[error("port {port} is already used by {first}")]
    DuplicatePort { port: u16, first: String },
    #[error("port name {name:?} is already used by {first}")]
    DuplicatePortName { name: String, first: String },
    #[error("{0:?} is not a protocol (\"TCP\" or \"UDP\")")]
    InvalidProtocol(String),
    #[error("{0:?} is not an application protocol (\"tcp\", \"http\", \"http2\" or \"grpc\")")]
    InvalidAppProtocol(String),
    #[error("{0:?} is not an mTLS mode (\"STRICT\", \"PERMISSIVE\" or \"DISABLE\")")]
    InvalidMtlsMode(String),
    #[error("at least one entry is required")]
    Empty,
    #[error("{0}")]
    InvalidDuration(String),
    /// A route or policy spec that does not parse: an unknown field, a wrong
    /// type, a missing field (serde's words).
    #[error("{0}")]
    Schema(String),
    /// A route or policy spec that parses but fails its own checks.
    #[error("{0}")]
    Check(String),
}

/// A document with a bad field.
#[derive(Debug, thiserror::Error)]
#[error("{document}: {field}: {problem}")]
pub struct InvalidDocument {
    pub document: DocumentRef,
    pub field: String,
    pub problem: Problem,
}

/// An address that would be owned by two resources.
#[derive(Debug, thiserror::Error)]
#[error("{claimant}: {field}: {address} is already owned by {owner}")]
pub struct AddressConflict {
    pub claimant: ResourceId,
    pub field: String,
    pub address: Ipv4Addr,
    pub owner: ResourceId,
}

/// A second MtlsPolicy in a namespace that has one.
#[derive(Debug, thiserror::Error)]
#[error("{claimant}: the namespace already has {owner}; at most one MtlsPolicy per namespace")]
pub struct MtlsPolicyConflict {
    pub claimant: ResourceId,
    pub owner: ResourceId,
}

/// What a route or TrafficPolicy names that the configuration does not have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    Service {
        namespace: String,
        name: String,
    },
    Port {
        namespace: String,
        name: String,
        port: u16,
        /// The ports it has.
        ports: Vec<u16>,
    },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Service { namespace, name } => {
                write!(f, "Service {namespace}/{name} does not exist")
            }
            Missing::Port {
                namespace,
                name,
                port,
                ports,
            } => {
                let has: Vec<String> = ports.iter().map(u16::to_string).collect();
                write!(
                    f,
                    "Service {namespace}/{name} has no port {port} (it has {})",
                    has.join(", ")
                )
            }
        }
    }
}

/// A route whose parent or backend, or a TrafficPolicy whose target, is not
/// in the configuration.
#[derive(Debug, thiserror::Error)]
#[error("{referrer}: {field}: {missing}")]
pub struct BrokenReference {
    pub referrer: ResourceId,
    /// E.g. `spec.parentRefs[0].port`, `spec.rules[1].backendRefs[0]`,
    /// `spec.targetRef.name`.
    pub field: String,
    pub missing: Missing,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("document {index}: malformed YAML: {reason}")]
    MalformedYaml { index: usize, reason: String },
    #[error("no documents to apply")]
    NoDocuments,
    #[error(transparent)]
    InvalidDocument(Box<InvalidDocument>),
    #[error("{document}: the same resource is already defined by document {first}")]
    DuplicateDocument { document: DocumentRef, first: usize },
    #[error(transparent)]
    AddressConflict(Box<AddressConflict>),
    #[error(transparent)]
    MtlsPolicyConflict(Box<MtlsPolicyConflict>),
    #[error(transparent)]
    BrokenReference(Box<BrokenReference>),
}

impl Error {
    /// The document of the batch this error is about, if it is about one.
    pub fn document_index(&self) -> Option<usize> {
        match self {
            Error::MalformedYaml { index, .. } => Some(*index),
            Error::InvalidDocument(invalid) => Some(invalid.document.index),
            Error::DuplicateDocument { document, .. } => Some(document.index),
            Error::NoDocuments
            | Error::AddressConflict(_)
            | Error::MtlsPolicyConflict(_)
            | Error::BrokenReference(_) => None,
        }
    }

    /// Why the batch was refused, as the `reason` label of
    /// `mesh_control_apply_rejected_total`: a small fixed set.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::MalformedYaml { .. } => "parse",
            Error::NoDocuments => "empty",
            Error::InvalidDocument(invalid) => match invalid.problem {
                Problem::UnknownKind { .. }
                | Problem::UnknownApiVersion { .. }
                | Problem::WrongApiVersion { .. } => "unknown_kind",
                _ => "invalid",
            },
            Error::DuplicateDocument { .. } => "duplicate",
            Error::AddressConflict(_) | Error::MtlsPolicyConflict(_) => "conflict",
            Error::BrokenReference(_) => "broken_reference",
        }
    }
}

/// Parses and validates a YAML stream of one or more documents. Empty
/// documents (a stray `---`) are skipped but still counted in indexes.
pub fn parse_documents(yaml: &str) -> Result<Vec<Resource>, Error> {
    let mut resources = Vec::new();
    let mut seen: HashMap<ResourceId, usize> = HashMap::new();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let index = i + 1;
        let value = Value::deserialize(document).map_err(|e| Error::MalformedYaml {
            index,
            reason: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let resource = parse_document(index, &value)?;
        let id = resource.id();
        if let Some(first) = seen.insert(id.clone(), index) {
            return Err(Error::DuplicateDocument {
                document: DocumentRef {
                    index,
                    id: Some(id),
                },
                first,
            });
        }
        resources.push(resource);
    }
    if resources.is_empty() {
        return Err(Error::NoDocuments);
    }
    Ok(resources)
}

/// Checks that no address in `batch` is owned twice, within the batch or by
/// a resource that stays (`owner_of` answers for the current configuration;
/// owners that the batch itself replaces don't count).
pub fn check_addresses<'a>(
    batch: &[Resource],
    owner_of: impl Fn(Ipv4Addr) -> Option<&'a ResourceId>,
) -> Result<(), Error> {
    let ids: Vec<ResourceId> = batch.iter().map(Resource::id).collect();
    let replaced: HashSet<&ResourceId> = ids.iter().collect();
    let mut claimed: HashMap<Ipv4Addr, &ResourceId> = HashMap::new();
    for (resource, id) in batch.iter().zip(&ids) {
        for claim in resource.claims() {
            let conflict = |owner: &ResourceId| {
                Error::AddressConflict(Box::new(AddressConflict {
                    claimant: id.clone(),
                    field: claim.field.clone(),
                    address: claim.address,
                    owner: owner.clone(),
                }))
            };
            if let Some(owner) = claimed.insert(claim.address, id)
                && owner != id
            {
                return Err(conflict(owner));
            }
            if let Some(owner) = owner_of(claim.address)
                && owner != id
                && !replaced.contains(owner)
            {
                return Err(conflict(owner));
            }
        }
    }
    Ok(())
}

/// Checks that no namespace would have two MtlsPolicies, within `batch` or
/// with one that stays (`policy_of` names the current configuration's policy
/// of a namespace; the batch may re-apply that same one).
pub fn check_mtls_policies(
    batch: &[Resource],
    policy_of: impl Fn(&str) -> Option<ResourceId>,
) -> Result<(), Error> {
    let mut claimed: HashMap<&str, ResourceId> = HashMap::new();
    for resource in batch {
        let Resource::MtlsPolicy(p) = resource else {
            continue;
        };
        let id = resource.id();
        let owner = claimed
            .get(p.namespace.as_str())
            .cloned()
            .or_else(|| policy_of(&p.namespace));
        if let Some(owner) = owner
            && owner != id
        {
            return Err(Error::MtlsPolicyConflict(Box::new(MtlsPolicyConflict {
                claimant: id,
                owner,
            })));
        }
        claimed.insert(&p.namespace, id);
    }
    Ok(())
}

/// A Service that a route or TrafficPolicy names, as [`check_references`]
/// reads it.
struct ServiceReference {
    /// The field reported when the Service does not exist.
    service_field: String,
    /// The field reported when it has no such port.
    port_field: String,
    namespace: String,
    name: String,
    port: Option<u16>,
}

impl ServiceReference {
    /// A Gateway API reference: without a namespace it is to the route's
    /// own; a missing port is reported at `<field>.port`.
    fn new(
        field: String,
        own_namespace: &str,
        namespace: Option<&str>,
        name: &str,
        port: Option<u16>,
    ) -> ServiceReference {
        ServiceReference {
            port_field: format!("{field}.port"),
            service_field: field,
            namespace: namespace.unwrap_or(own_namespace).to_owned(),
            name: name.to_owned(),
            port,
        }
    }
}

/// Checks that every route of `batch` attaches to Services, and sends to
/// Services and ports, that exist, and that every TrafficPolicy targets one
/// (and its port, if it names one): in the batch or among those that stay
/// (`stored` answers for the current configuration, by namespace and name).
/// Only the routes and policies of the batch are checked: deleting or
/// changing a Service that stored ones name is allowed, as in Kubernetes.
pub fn check_references<'a>(
    batch: &[Resource],
    stored: impl Fn(&str, &str) -> Option<&'a Service>,
) -> Result<(), Error> {
    let in_batch: HashMap<(&str, &str), &Service> = batch
        .iter()
        .filter_map(|r| match r {
            Resource::Service(s) => Some(((s.namespace.as_str(), s.name.as_str()), s)),
            _ => None,
        })
        .collect();
    for resource in batch {
        for r in resource.service_references() {
            let service = match in_batch.get(&(r.namespace.as_str(), r.name.as_str())) {
                Some(s) => Some(*s),
                None => stored(&r.namespace, &r.name),
            };
            let missing = match service {
                None => Some((
                    r.service_field,
                    Missing::Service {
                        namespace: r.namespace,
                        name: r.name,
                    },
                )),
                Some(s) => r
                    .port
                    .filter(|&port| !s.ports.iter().any(|p| p.port == port))
                    .map(|port| {
                        (
                            r.port_field,
                            Missing::Port {
                                namespace: r.namespace,
                                name: r.name,
                                port,
                                ports: s.ports.iter().map(|p| p.port).collect(),
                            },
                        )
                    }),
            };
            if let Some((field, missing)) = missing {
                return Err(Error::BrokenReference(Box::new(BrokenReference {
                    referrer: resource.id(),
                    field,
                    missing,
                })));
            }
        }
    }
    Ok(())
}

static NULL: Value = Value::Null;

/// A value in a document, with its path for error messages.
struct Field<'a> {
    document: &'a DocumentRef,
    path: String,
    value: &'a Value,
}

impl<'a> Field<'a> {
    fn reject<T>(&self, problem: Problem) -> Result<T, Error> {
        let field = if self.path.is_empty() {
            "(top level)".to_owned()
        } else {
            self.path.clone()
        };
        Err(Error::InvalidDocument(Box::new(InvalidDocument {
            document: self.document.clone(),
            field,
            problem,
        })))
    }

    fn wrong_type<T>(&self, expected: &'static str) -> Result<T, Error> {
        self.reject(Problem::WrongType {
            expected,
            found: describe(self.value),
        })
    }

    /// The same field, in a document whose name is now known.
    fn in_document<'b>(self, document: &'b DocumentRef) -> Field<'b>
    where
        'a: 'b,
    {
        Field {
            document,
            path: self.path,
            value: self.value,
        }
    }

    fn child(&self, path: String, value: &'a Value) -> Field<'a> {
        Field {
            document: self.document,
            path,
            value,
        }
    }

    fn object(&self, known: &[&str]) -> Result<Object<'a>, Error> {
        let Value::Mapping(map) = self.value else {
            return self.wrong_type("a mapping");
        };
        for key in map.keys() {
            let name = key.as_str().unwrap_or_default();
            if !known.contains(&name) {
                let path = match key.as_str() {
                    Some(k) => self.join(k),
                    None => self.join(&describe(key)),
                };
                return self.child(path, key).reject(Problem::UnknownField);
            }
        }
        Ok(Object {
            field: self.child(self.path.clone(), self.value),
            map,
        })
    }

    fn join(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn str(&self) -> Result<&'a str, Error> {
        match self.value {
            Value::String(s) => Ok(s),
            _ => self.wrong_type("a string"),
        }
    }

    fn bool(&self) -> Result<bool, Error> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            _ => self.wrong_type("true or false"),
        }
    }

    fn list(&self) -> Result<Vec<Field<'a>>, Error> {
        let Value::Sequence(items) = self.value else {
            return self.wrong_type("a list");
        };
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, v)| self.child(format!("{}[{i}]", self.path), v))
            .collect())
    }

    /// Numbers are read wide first, so 70000 is "out of range", not a
    /// deserializer overflow.
    fn port(&self) -> Result<u16, Error> {
        let Value::Number(n) = self.value else {
            return self.wrong_type("a port number");
        };
        if let Some(i) = n.as_i64() {
            return u16::try_from(i)
                .ok()
                .filter(|&p| p != 0)
                .map_or_else(|| self.reject(Problem::PortOutOfRange(i.to_string())), Ok);
        }
        if n.is_u64() {
            return self.reject(Problem::PortOutOfRange(n.to_string()));
        }
        self.wrong_type("a port number")
    }

    fn ipv4(&self) -> Result<Ipv4Addr, Error> {
        let text = self.str()?;
        let ip: Ipv4Addr = text
            .parse()
            .or_else(|_| self.reject(Problem::InvalidIp(text.to_owned())))?;
        let unusable = if ip.is_unspecified() {
            Some("unspecified")
        } else if ip.octets()[0] == 0 {
            Some("\"this network\", 0.0.0.0/8")
        } else if ip.is_link_local() {
            Some("link-local")
        } else if ip.is_loopback() {
            Some("loopback")
        } else if ip.is_multicast() {
            Some("multicast")
        } else if ip.is_broadcast() {
            Some("broadcast")
        } else {
            None
        };
        match unusable {
            Some(why) => self.reject(Problem::UnusableIp(ip, why)),
            None => Ok(ip),
        }
    }

    /// `STRICT`, `PERMISSIVE` or `DISABLE`, in any case.
    fn mtls_mode(&self) -> Result<MtlsMode, Error> {
        let text = self.str()?;
        MtlsMode::from_loose(text).map_or_else(
            || self.reject(Problem::InvalidMtlsMode(text.to_owned())),
            Ok,
        )
    }

    fn name(&self) -> Result<String, Error> {
        let s = self.str()?;
        if is_dns_label(s) {
            Ok(s.to_owned())
        } else {
            self.reject(Problem::InvalidName(s.to_owned()))
        }
    }

    fn labels(&self) -> Result<BTreeMap<String, String>, Error> {
        let Value::Mapping(map) = self.value else {
            return self.wrong_type("a mapping of strings");
        };
        let mut labels = BTreeMap::new();
        for (k, v) in map {
            let Some(key) = k.as_str() else {
                return self
                    .child(self.join(&describe(k)), k)
                    .wrong_type("a string key");
            };
            let field = self.child(self.join(key), v);
            if !is_label_key(key) {
                return field.reject(Problem::InvalidLabelKey(key.to_owned()));
            }
            let value = field.str()?;
            if !is_label_value(value) {
                return field.reject(Problem::InvalidLabelValue(value.to_owned()));
            }
            labels.insert(key.to_owned(), value.to_owned());
        }
        Ok(labels)
    }
}

/// A mapping whose keys were checked against the known fields.
struct Object<'a> {
    field: Field<'a>,
    map: &'a Mapping,
}

impl<'a> Object<'a> {
    fn get(&self, key: &str) -> Option<Field<'a>> {
        self.map
            .get(key)
            .filter(|v| !v.is_null())
            .map(|v| self.field.child(self.field.join(key), v))
    }

    fn required(&self, key: &str) -> Result<Field<'a>, Error> {
        match self.get(key) {
            Some(f) => Ok(f),
            None => self
                .field
                .child(self.field.join(key), &NULL)
                .reject(Problem::Missing),
        }
    }
}

fn parse_document(index: usize, value: &Value) -> Result<Resource, Error> {
    let anonymous = DocumentRef { index, id: None };
    let root = Field {
        document: &anonymous,
        path: String::new(),
        value,
    };
    let Value::Mapping(_) = value else {
        return root.wrong_type("a mapping with apiVersion, kind, metadata and spec");
    };
    // `status` is what a server would add; tolerate it so `get -o yaml`
    // output can be applied again.
    let top = root.object(&["apiVersion", "kind", "metadata", "spec", "status"])?;
    let api_version = top.required("apiVersion")?;
    let kind_field = top.required("kind")?;
    let kind_text = kind_field.str()?;
    let api_text = api_version.str()?;
    let kind = document_kind(&api_version, api_text, &kind_field, kind_text)?;
    let metadata =
        top.required("metadata")?
            .object(&["name", "namespace", "labels", "resourceVersion"])?;
    let name_field = metadata.required("name")?;
    let name = match kind {
        Kind::Node => node_name(&name_field)?,
        // Kubernetes names custom resources as DNS subdomains.
        Kind::HttpRoute | Kind::GrpcRoute | Kind::TrafficPolicy | Kind::AuthorizationPolicy => {
            let text = name_field.str()?;
            if !is_dns_subdomain(text) {
                return name_field.reject(Problem::InvalidSubdomainName(text.to_owned()));
            }
            text.to_owned()
        }
        _ => name_field.name()?,
    };
    let namespace = match (metadata.get("namespace"), kind.is_cluster_scoped()) {
        (None, true) => String::new(),
        (Some(f), true) => {
            let found = f.str()?.to_owned();
            return f.reject(Problem::ClusterScoped { kind, found });
        }
        (Some(f), false) => f.name()?,
        (None, false) => DEFAULT_NAMESPACE.to_owned(),
    };

    let named = DocumentRef {
        index,
        id: Some(ResourceId {
            kind,
            namespace: namespace.clone(),
            name: name.clone(),
        }),
    };
    let labels = match metadata.get("labels") {
        Some(f) => f.in_document(&named).labels()?,
        None => BTreeMap::new(),
    };
    let spec = top.required("spec")?.in_document(&named);
    Ok(match kind {
        Kind::Workload => Resource::Workload(parse_workload(&spec, name, namespace, labels)?),
        Kind::Service => Resource::Service(parse_service(&spec, name, namespace, labels)?),
        Kind::Node => Resource::Node(parse_node(&spec, name, labels)?),
        Kind::MtlsPolicy => {
            let spec = spec.object(&["mode"])?;
            Resource::MtlsPolicy(MtlsPolicy {
                name,
                namespace,
                labels,
                mode: spec.required("mode")?.mtls_mode()?,
            })
        }
        Kind::HttpRoute => Resource::HttpRoute(parse_route(&spec, name, namespace, labels)?),
        Kind::GrpcRoute => Resource::GrpcRoute(parse_route(&spec, name, namespace, labels)?),
        Kind::TrafficPolicy => {
            Resource::TrafficPolicy(Box::new(parse_policy(&spec, name, namespace, labels)?))
        }
        Kind::AuthorizationPolicy => {
            Resource::AuthorizationPolicy(parse_policy(&spec, name, namespace, labels)?)
        }
    })
}

/// The kind of a document, checked against its apiVersion: each kind
/// belongs to one API group, and the error says which.
fn document_kind(
    api_field: &Field<'_>,
    api_version: &str,
    kind_field: &Field<'_>,
    kind_text: &str,
) -> Result<Kind, Error> {
    let named = Kind::ALL.into_iter().find(|k| k.as_str() == kind_text);
    let of_api: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| k.api_version() == api_version)
        .collect();
    match named {
        Some(kind) if of_api.contains(&kind) => Ok(kind),
        Some(kind) if of_api.is_empty() => api_field.reject(Problem::UnknownApiVersion {
            found: api_version.to_owned(),
            expected: format!("{:?}", kind.api_version()),
        }),
        Some(kind) => api_field.reject(Problem::WrongApiVersion {
            kind,
            found: api_version.to_owned(),
        }),
        None => {
            let expected = if of_api.is_empty() {
                Kind::ALL.to_vec()
            } else {
                of_api
            };
            kind_field.reject(Problem::UnknownKind {
                found: kind_text.to_owned(),
                expected: one_of(expected.iter().map(|k| k.as_str())),
            })
        }
    }
}

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`.
fn one_of<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = items.into_iter().map(|s| format!("{s:?}")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// A route's spec, parsed and checked on its own.
fn parse_route<S: RouteSpec>(
    spec: &Field<'_>,
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
) -> Result<Route<S>, Error> {
    Ok(Route {
        name,
        namespace,
        labels,
        created_revision: 0,
        spec: parse_spec(spec, S::validate)?,
    })
}

/// A policy's spec, parsed and checked on its own.
fn parse_policy<S: PolicySpec>(
    spec: &Field<'_>,
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
) -> Result<Policy<S>, Error> {
    Ok(Policy {
        name,
        namespace,
        labels,
        created_revision: 0,
        spec: parse_spec(spec, S::validate)?,
    })
}

/// A spec of a mesh_api type, parsed into its typed form (an unknown field or
/// a wrong type is refused with its path) and checked on its own.
fn parse_spec<S: DeserializeOwned>(
    spec: &Field<'_>,
    validate: impl FnOnce(&S) -> Result<(), gateway::Invalid>,
) -> Result<S, Error> {
    let typed: S = serde_path_to_error::deserialize(spec.value).or_else(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            spec.path.clone()
        } else {
            spec.join(&path)
        };
        spec.child(field, &NULL)
            .reject(Problem::Schema(e.into_inner().to_string()))
    })?;
    validate(&typed).or_else(|e| spec.child(e.field, &NULL).reject(Problem::Check(e.problem)))?;
    Ok(typed)
}

/// Node names follow Kubernetes: a DNS subdomain.
fn node_name(field: &Field<'_>) -> Result<String, Error> {
    let node = field.str()?;
    if is_dns_subdomain(node) {
        Ok(node.to_owned())
    } else {
        field.reject(Problem::InvalidNodeName(node.to_owned()))
    }
}

fn parse_node(
    spec: &Field<'_>,
    name: String,
    labels: BTreeMap<String, String>,
) -> Result<Node, Error> {
    let spec = spec.object(&["address", "tunnelPort"])?;
    let address = spec.required("address")?.ipv4()?;
    let tunnel_port = spec
        .get("tunnelPort")
        .map(|f| f.port())
        .transpose()?
        .unwrap_or(DEFAULT_TUNNEL_PORT);
    Ok(Node {
        name,
        labels,
        address,
        tunnel_port,
    })
}

fn parse_workload(
    spec: &Field<'_>,
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
) -> Result<Workload, Error> {
    let spec = spec.object(&["serviceAccount", "node", "ip", "ports", "ready", "mtlsMode"])?;
    let service_account = match spec.get("serviceAccount") {
        Some(f) => {
            let sa = f.name()?;
            if namespace == SYSTEM_NAMESPACE
                && (sa.starts_with(NODE_SERVICE_ACCOUNT_PREFIX) || sa == CONTROL_SERVICE_ACCOUNT)
            {
                return f.reject(Problem::ReservedServiceAccount(sa));
            }
            sa
        }
        None => DEFAULT_SERVICE_ACCOUNT.to_owned(),
    };
    let node = node_name(&spec.required("node")?)?;
    let ip = spec.required("ip")?.ipv4()?;
    let mut ports: Vec<WorkloadPort> = Vec::new();
    let mut seen: HashMap<(u16, Protocol), String> = HashMap::new();
    for item in spec
        .get("ports")
        .map(|f| f.list())
        .transpose()?
        .unwrap_or_default()
    {
        let entry = item.object(&["name", "port", "protocol"])?;
        let port_field = entry.required("port")?;
        let port = port_field.port()?;
        let protocol_field = entry.get("protocol");
        let protocol = match protocol_field.as_ref().map(Field::str).transpose()? {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some(other) => {
                return protocol_field
                    .expect("protocol is set")
                    .reject(Problem::InvalidProtocol(other.to_owned()));
            }
        };
        if let Some(first) = seen.insert((port, protocol), item.path.clone()) {
            return port_field.reject(Problem::DuplicatePort { port, first });
        }
        ports.push(WorkloadPort {
            name: optional_port_name(&entry)?,
            port,
            protocol,
        });
    }
    let ready = spec
        .get("ready")
        .map(|f| f.bool())
        .transpose()?
        .unwrap_or(true);
    let mtls_mode = spec.get("mtlsMode").map(|f| f.mtls_mode()).transpose()?;
    Ok(Workload {
        name,
        namespace,
        labels,
        service_account,
        node,
        ip,
        ports,
        ready,
        mtls_mode,
    })
}

fn parse_service(
    spec: &Field<'_>,
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
) -> Result<Service, Error> {
    let spec = spec.object(&["vips", "ports", "selector"])?;
    let vips_field = spec.required("vips")?;
    let mut vips = Vec::new();
    for item in vips_field.list()? {
        let vip = item.ipv4()?;
        if vips.contains(&vip) {
            return item.reject(Problem::DuplicateIp(vip));
        }
        vips.push(vip);
    }
    if vips.is_empty() {
        return vips_field.reject(Problem::Empty);
    }

    let ports_field = spec.required("ports")?;
    let mut ports: Vec<ServicePort> = Vec::new();
    let mut seen_ports: HashMap<u16, String> = HashMap::new();
    let mut seen_names: HashMap<String, String> = HashMap::new();
    for item in ports_field.list()? {
        let entry = item.object(&["name", "port", "targetPort", "appProtocol", "detectTimeout"])?;
        let port_field = entry.required("port")?;
        let port = port_field.port()?;
        if let Some(first) = seen_ports.insert(port, item.path.clone()) {
            return port_field.reject(Problem::DuplicatePort { port, first });
        }
        let target_port = entry.get("targetPort").map(|f| f.port()).transpose()?;
        let app_field = entry.get("appProtocol");
        let app_protocol = match app_field.as_ref().map(Field::str).transpose()? {
            None => None,
            Some("tcp") => Some(AppProtocol::Tcp),
            Some("http") => Some(AppProtocol::Http),
            Some("http2") => Some(AppProtocol::Http2),
            Some("grpc") => Some(AppProtocol::Grpc),
            Some(other) => {
                return app_field
                    .expect("appProtocol is set")
                    .reject(Problem::InvalidAppProtocol(other.to_owned()));
            }
        };
        let detect_timeout_ms = match entry.get("detectTimeout") {
            None => None,
            Some(f) => {
                let text = f.str()?;
                let d = mesh_api::gateway::parse_duration(text)
                    .or_else(|e| f.reject(Problem::InvalidDuration(e)))?;
                if d < MIN_DETECT_TIMEOUT || d > MAX_DETECT_TIMEOUT {
                    return f.reject(Problem::InvalidDuration(format!(
                        "{text:?} is outside {MIN_DETECT_TIMEOUT:?}..={MAX_DETECT_TIMEOUT:?}"
                    )));
                }
                Some(u32::try_from(d.as_millis()).unwrap_or(u32::MAX))
            }
        };
        let port_name = optional_port_name(&entry)?;
        if !port_name.is_empty()
            && let Some(first) = seen_names.insert(port_name.clone(), item.path.clone())
        {
            return entry.required("name")?.reject(Problem::DuplicatePortName {
                name: port_name,
                first,
            });
        }
        ports.push(ServicePort {
            name: port_name,
            port,
            target_port: target_port.unwrap_or(port),
            app_protocol,
            detect_timeout_ms,
        });
    }
    if ports.is_empty() {
        return ports_field.reject(Problem::Empty);
    }
    let selector = spec
        .get("selector")
        .map(|f| f.labels())
        .transpose()?
        .unwrap_or_default();
    Ok(Service {
        name,
        namespace,
        labels,
        vips,
        ports,
        selector,
    })
}

fn optional_port_name(entry: &Object<'_>) -> Result<String, Error> {
    entry
        .get("name")
        .map(|f| f.name())
        .transpose()
        .map(Option::unwrap_or_default)
}

/// A short rendering of a value for error messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("tagged value {}", t.tag),
    }
}

/// RFC 1123 label: what Kubernetes requires of names and namespaces.
fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Label key: `[prefix/]name`, prefix a DNS subdomain, name as a label value
/// but not empty.
fn is_label_key(key: &str) -> bool {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if !is_dns_subdomain(prefix) {
                return false;
            }
            name
        }
        None => key,
    };
    !name.is_empty() && is_label_value(name)
}

fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    bytes.is_empty()
        || (bytes.len() <= 63
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKLOAD: &str = "
apiVersion: mesh.dev/v1alpha1
kind: Workload
metadata:
  name: echo-1
  labels: {app: echo}
spec:
  node: n1
  ip: 198.18.1.10
  ports: [{name: http, port: 8080}]
";

    const SERVICE: &str = "
apiVersion: mesh.dev/v1alpha1
kind: Service
metadata: {name: echo, namespace: shop}
spec:
  vips: [198.19.0.10]
  ports:
    - {name: http, port: 80, targetPort: 8080, appProtocol: http}
    - {port: 9000}
  selector: {app: echo}
";

    fn rejected(yaml: &str) -> String {
        match parse_documents(yaml) {
            Ok(r) => panic!("accepted {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn with(base: &str, from: &str, to: &str) -> String {
        assert!(base.contains(from), "{from:?} not in the document");
        base.replacen(from, to, 1)
    }

    #[test]
    fn parses_a_workload_with_defaults() {
        let r = parse_documents(WORKLOAD).expect("valid");
        let Resource::Workload(w) = &r[0] else {
            panic!("not a workload: {r:?}")
        };
        assert_eq!(w.namespace, "default");
        assert_eq!(w.service_account, "default");
        assert!(w.ready);
        assert_eq!(w.ip, Ipv4Addr::new(198, 18, 1, 10));
        assert_eq!(w.ports[0].protocol, Protocol::Tcp);
        assert_eq!(w.labels["app"], "echo");
        assert_eq!(r[0].id().to_string(), "Workload/default/echo-1");
    }

    #[test]
    fn a_service_port_declares_its_protocol_or_how_long_to_detect_it() {
        let doc = |port: &str| {
            format!(
                "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: db}}\nspec:\n  vips: [198.19.0.20]\n  ports: [{port}]\n"
            )
        };
        let r = parse_documents(&doc("{port: 5432, detectTimeout: 50ms}")).expect("valid");
        let Resource::Service(s) = &r[0] else {
            panic!()
        };
        assert_eq!(s.ports[0].detect_timeout_ms, Some(50));
        assert_eq!(s.ports[0].app_protocol, None);
        assert_eq!(
            r[0].to_document(1)["spec"]["ports"][0]["detectTimeout"],
            "50ms"
        );
        assert!(
            r[0].to_document(1)["spec"]["ports"][0]
                .get("appProtocol")
                .is_none()
        );
        for bad in [
            "{port: 5432, detectTimeout: 1h}",
            "{port: 5432, detectTimeout: soon}",
        ] {
            let e = parse_documents(&doc(bad)).unwrap_err().to_string();
            assert!(e.contains("spec.ports[0].detectTimeout"), "{e}");
        }
    }

    #[test]
    fn parses_a_service_with_defaults() {
        let r = parse_documents(SERVICE).expect("valid");
        let Resource::Service(s) = &r[0] else {
            panic!("not a service: {r:?}")
        };
        assert_eq!(s.ports[0].target_port, 8080);
        assert_eq!(s.ports[0].app_protocol, Some(AppProtocol::Http));
        assert_eq!(s.ports[1].target_port, 9000);
        assert_eq!(s.ports[1].app_protocol, None, "not declared: detected");
        assert_eq!(r[0].id().to_string(), "Service/shop/echo");
    }

    #[test]
    fn each_refusal_has_a_reason_of_a_fixed_set() {
        let reason = |yaml: &str| parse_documents(yaml).expect_err("refused").reason();
        assert_eq!(reason("kind: [Service\n"), "parse");
        assert_eq!(reason("---\n"), "empty");
        assert_eq!(
            reason(&SERVICE.replace("kind: Service", "kind: Gateway")),
            "unknown_kind"
        );
        assert_eq!(
            reason(&SERVICE.replace("mesh.dev/v1alpha1", "mesh.dev/v9")),
            "unknown_kind"
        );
        assert_eq!(
            reason(&SERVICE.replace("port: 9000", "port: 70000")),
            "invalid"
        );
        assert_eq!(reason(&format!("{SERVICE}---{SERVICE}")), "duplicate");
    }

    #[test]
    fn parses_several_documents_and_skips_empty_ones() {
        let yaml = format!("---\n{WORKLOAD}\n---\n---\n{SERVICE}\n---\n");
        let r = parse_documents(&yaml).expect("valid");
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn a_document_rendered_for_get_parses_back_to_itself() {
        for yaml in [WORKLOAD, SERVICE] {
            let r = parse_documents(yaml).expect("valid").remove(0);
            let doc = serde_yaml_ng::to_string(&r.to_document(7)).expect("yaml");
            assert_eq!(parse_documents(&doc).expect("round trip")[0], r);
        }
    }

    #[test]
    fn rejects_malformed_yaml_naming_the_document() {
        let e = rejected(&format!("{WORKLOAD}\n---\nkind: [unclosed\n"));
        assert!(e.starts_with("document 2: malformed YAML"), "{e}");
    }

    #[test]
    fn rejects_unknown_kind_and_api_version() {
        let e = rejected(&with(SERVICE, "kind: Service", "kind: Gateway"));
        assert_eq!(
            e,
            "document 1: kind: unknown kind \"Gateway\" (expected \"Workload\", \"Service\", \"Node\", \"MtlsPolicy\", \"TrafficPolicy\" or \"AuthorizationPolicy\")"
        );
        let e = rejected(&with(SERVICE, "mesh.dev/v1alpha1", "v1"));
        assert!(
            e.starts_with("document 1: apiVersion: unknown apiVersion \"v1\""),
            "{e}"
        );
    }

    #[test]
    fn rejects_missing_required_fields() {
        let e = rejected(&with(WORKLOAD, "  node: n1\n", ""));
        assert_eq!(
            e,
            "document 1 (Workload/default/echo-1): spec.node: required field is missing"
        );
        let e = rejected(&with(
            SERVICE,
            "metadata: {name: echo, namespace: shop}",
            "metadata: {namespace: shop}",
        ));
        assert_eq!(e, "document 1: metadata.name: required field is missing");
        let e = rejected(&with(SERVICE, "  vips: [198.19.0.10]\n", "  vips: []\n"));
        assert!(
            e.ends_with("spec.vips: at least one entry is required"),
            "{e}"
        );
    }

    #[test]
    fn rejects_bad_ips() {
        let e = rejected(&with(WORKLOAD, "198.18.1.10", "198.18.1.300"));
        assert_eq!(
            e,
            "document 1 (Workload/default/echo-1): spec.ip: \"198.18.1.300\" is not an IPv4 address"
        );
        let e = rejected(&with(SERVICE, "198.19.0.10", "127.0.0.1"));
        assert!(
            e.ends_with("spec.vips[0]: 127.0.0.1 is not a usable address (loopback)"),
            "{e}"
        );
        for (ip, why) in [
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "\"this network\", 0.0.0.0/8"),
            ("127.0.0.2", "loopback"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
        ] {
            let e = rejected(&with(WORKLOAD, "198.18.1.10", ip));
            assert_eq!(
                e,
                format!(
                    "document 1 (Workload/default/echo-1): spec.ip: {ip} is not a usable address ({why})"
                )
            );
        }
        let e = rejected(&with(
            SERVICE,
            "[198.19.0.10]",
            "[198.19.0.10, 198.19.0.10]",
        ));
        assert!(
            e.ends_with("spec.vips[1]: 198.19.0.10 is listed twice"),
            "{e}"
        );
    }

    #[test]
    fn rejects_ports_out_of_range_with_the_value() {
        let e = rejected(&with(SERVICE, "port: 9000", "port: 70000"));
        assert_eq!(
            e,
            "document 1 (Service/shop/echo): spec.ports[1].port: port 70000 is out of range (1-65535)"
        );
        let e = rejected(&with(SERVICE, "port: 9000", "port: 0"));
        assert!(
            e.ends_with("spec.ports[1].port: port 0 is out of range (1-65535)"),
            "{e}"
        );
        let e = rejected(&with(SERVICE, "targetPort: 8080", "targetPort: -1"));
        assert!(
            e.ends_with("spec.ports[0].targetPort: port -1 is out of range (1-65535)"),
            "{e}"
        );
        let e = rejected(&with(SERVICE, "port: 9000", "port: 99999999999999999999"));
        assert!(e.contains("spec.ports[1].port: "), "{e}");
        let e = rejected(&with(WORKLOAD, "port: 8080", "port: \"8080\""));
        assert!(
            e.ends_with("spec.ports[0].port: expected a port number, found string \"8080\""),
            "{e}"
        );
    }

    #[test]
    fn rejects_duplicate_ports() {
        let e = rejected(&with(SERVICE, "port: 9000", "port: 80"));
        assert!(
            e.ends_with("spec.ports[1].port: port 80 is already used by spec.ports[0]"),
            "{e}"
        );
        let e = rejected(&with(
            WORKLOAD,
            "[{name: http, port: 8080}]",
            "[{port: 53}, {port: 53}]",
        ));
        assert!(
            e.ends_with("spec.ports[1].port: port 53 is already used by spec.ports[0]"),
            "{e}"
        );
        // The same number on TCP and UDP is two ports.
        parse_documents(&with(
            WORKLOAD,
            "[{name: http, port: 8080}]",
            "[{port: 53}, {port: 53, protocol: UDP}]",
        ))
        .expect("valid");
    }

    #[test]
    fn rejects_invalid_names_and_labels() {
        let e = rejected(&with(WORKLOAD, "name: echo-1", "name: Echo_1"));
        assert!(
            e.starts_with("document 1: metadata.name: \"Echo_1\" is not a valid name"),
            "{e}"
        );
        let e = rejected(&with(
            WORKLOAD,
            "name: echo-1",
            &format!("name: {}", "a".repeat(64)),
        ));
        assert!(e.contains("is not a valid name"), "{e}");
        let e = rejected(&with(SERVICE, "namespace: shop", "namespace: -shop"));
        assert!(
            e.starts_with("document 1: metadata.namespace: \"-shop\""),
            "{e}"
        );
        let e = rejected(&with(WORKLOAD, "{app: echo}", "{app: -echo}"));
        assert!(e.ends_with("metadata.labels.app: \"-echo\" is not a valid label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"), "{e}");
        let e = rejected(&with(SERVICE, "{app: echo}", "{app: 1}"));
        assert!(
            e.ends_with("spec.selector.app: expected a string, found number 1"),
            "{e}"
        );
    }

    #[test]
    fn rejects_unknown_fields_and_wrong_types() {
        let e = rejected(&with(SERVICE, "targetPort: 8080", "targetport: 8080"));
        assert!(
            e.ends_with("spec.ports[0].targetport: unknown field"),
            "{e}"
        );
        let e = rejected(&with(
            WORKLOAD,
            "  ip: 198.18.1.10\n",
            "  ip: 198.18.1.10\n  ready: yes\n",
        ));
        assert!(
            e.ends_with("spec.ready: expected true or false, found string \"yes\""),
            "{e}"
        );
        let e = rejected("just a string");
        assert!(
            e.starts_with("document 1: (top level): expected a mapping"),
            "{e}"
        );
        let e = rejected(&with(SERVICE, "appProtocol: http", "appProtocol: HTTP"));
        assert!(e.ends_with("spec.ports[0].appProtocol: \"HTTP\" is not an application protocol (\"tcp\", \"http\", \"http2\" or \"grpc\")"), "{e}");
    }

    #[test]
    fn rejects_the_same_resource_twice_in_one_batch() {
        let e = rejected(&format!("{SERVICE}\n---\n{SERVICE}"));
        assert_eq!(
            e,
            "document 2 (Service/shop/echo): the same resource is already defined by document 1"
        );
    }

    #[test]
    fn rejects_an_empty_stream() {
        assert_eq!(rejected("---\n"), "no documents to apply");
    }

    #[test]
    fn a_vip_owned_by_two_services_names_both() {
        let a = parse_documents(SERVICE).expect("valid");
        let b = parse_documents(&with(SERVICE, "name: echo", "name: other")).expect("valid");
        let owner = a[0].id();
        let e = check_addresses(&b, |ip| {
            (ip == Ipv4Addr::new(198, 19, 0, 10)).then_some(&owner)
        })
        .expect_err("conflict");
        assert_eq!(
            e.to_string(),
            "Service/shop/other: spec.vips[0]: 198.19.0.10 is already owned by Service/shop/echo"
        );
        // Within one batch too.
        let both = [a[0].clone(), b[0].clone()];
        assert!(check_addresses(&both, |_| None).is_err());
        // A resource may keep its own addresses, and take over those of a
        // resource the batch changes.
        check_addresses(&a, |_| Some(&owner)).expect("own VIP");
        let moved = parse_documents(&with(SERVICE, "198.19.0.10", "198.19.0.11")).expect("valid");
        let swap = [moved[0].clone(), b[0].clone()];
        check_addresses(&swap, |_| Some(&owner)).expect("VIP moved away in the same batch");
    }

    #[test]
    fn two_workloads_with_the_same_ip_conflict() {
        let a = parse_documents(WORKLOAD).expect("valid");
        let b = parse_documents(&with(WORKLOAD, "name: echo-1", "name: echo-2")).expect("valid");
        let owner = a[0].id();
        let e = check_addresses(&b, |_| Some(&owner)).expect_err("conflict");
        assert_eq!(
            e.to_string(),
            "Workload/default/echo-2: spec.ip: 198.18.1.10 is already owned by Workload/default/echo-1"
        );
    }

    const NODE: &str = "
apiVersion: mesh.dev/v1alpha1
kind: Node
metadata: {name: node-1.zone-a}
spec:
  address: 198.18.0.11
";

    #[test]
    fn parses_a_cluster_scoped_node_with_the_default_tunnel_port() {
        let r = parse_documents(NODE).expect("valid");
        let Resource::Node(n) = &r[0] else {
            panic!("not a node: {r:?}")
        };
        assert_eq!(n.address, Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(n.tunnel_port, DEFAULT_TUNNEL_PORT);
        assert_eq!(r[0].id().to_string(), "Node//node-1.zone-a");
        let doc = r[0].to_document(3);
        assert!(doc["metadata"].get("namespace").is_none(), "{doc}");
        let again = serde_yaml_ng::to_string(&doc).expect("yaml");
        assert_eq!(parse_documents(&again).expect("round trip")[0], r[0]);
        let custom = with(
            NODE,
            "  address: 198.18.0.11\n",
            "  address: 198.18.0.11\n  tunnelPort: 16008\n",
        );
        let Resource::Node(n) = parse_documents(&custom).expect("valid").remove(0) else {
            unreachable!()
        };
        assert_eq!(n.tunnel_port, 16008);
    }

    #[test]
    fn rejects_bad_nodes_naming_the_field_and_value() {
        let e = rejected(&with(NODE, "198.18.0.11", "198.18.0.300"));
        assert_eq!(
            e,
            "document 1 (Node//node-1.zone-a): spec.address: \"198.18.0.300\" is not an IPv4 address"
        );
        let e = rejected(&with(
            NODE,
            "  address: 198.18.0.11\n",
            "  address: 198.18.0.11\n  tunnelPort: 0\n",
        ));
        assert!(
            e.ends_with("spec.tunnelPort: port 0 is out of range (1-65535)"),
            "{e}"
        );
        let e = rejected(&with(
            NODE,
            "  address: 198.18.0.11\n",
            "  tunnelPort: 15008\n",
        ));
        assert!(
            e.ends_with("spec.address: required field is missing"),
            "{e}"
        );
        let e = rejected(&with(
            NODE,
            "{name: node-1.zone-a}",
            "{name: n1, namespace: default}",
        ));
        assert_eq!(
            e,
            "document 1: metadata.namespace: Node is cluster-scoped: it has no namespace (found \"default\")"
        );
        let e = rejected(&with(NODE, "node-1.zone-a", "Node_1"));
        assert!(
            e.contains("metadata.name: \"Node_1\" is not a valid node name"),
            "{e}"
        );
    }

    #[test]
    fn workloads_may_not_take_a_node_agents_identity() {
        let reserved = with(
            WORKLOAD,
            "  node: n1\n",
            "  node: n1\n  serviceAccount: node-n2\n",
        )
        .replace("labels: {app: echo}", "namespace: mesh-system");
        let e = rejected(&reserved);
        assert!(
            e.ends_with("spec.serviceAccount: service account \"node-n2\" in namespace mesh-system is reserved for node agents and the control server"),
            "{e}"
        );
        // The same account elsewhere is an ordinary one.
        parse_documents(&with(
            WORKLOAD,
            "  node: n1\n",
            "  node: n1\n  serviceAccount: node-n2\n",
        ))
        .expect("valid outside mesh-system");
    }

    const POLICY: &str = "
apiVersion: mesh.dev/v1alpha1
kind: MtlsPolicy
metadata: {name: default, namespace: shop}
spec: {mode: permissive}
";

    #[test]
    fn workload_mtls_modes_are_optional_any_case_and_stored_upper_case() {
        let Resource::Workload(w) = &parse_documents(WORKLOAD).expect("valid")[0] else {
            unreachable!()
        };
        assert_eq!(w.mtls_mode, None, "unset inherits");
        for (text, mode) in [
            ("STRICT", MtlsMode::Strict),
            ("Permissive", MtlsMode::Permissive),
            ("disable", MtlsMode::Disable),
        ] {
            let yaml = with(
                WORKLOAD,
                "  node: n1\n",
                &format!("  node: n1\n  mtlsMode: {text}\n"),
            );
            let r = parse_documents(&yaml).expect("valid").remove(0);
            let Resource::Workload(w) = &r else {
                unreachable!()
            };
            assert_eq!(w.mtls_mode, Some(mode));
            let doc = r.to_document(1);
            assert_eq!(doc["spec"]["mtlsMode"], mode.as_str());
            let again = serde_yaml_ng::to_string(&doc).expect("yaml");
            assert_eq!(parse_documents(&again).expect("round trip")[0], r);
        }
        // Unset is not rendered, so `get -o yaml` applies back as unset.
        let doc = parse_documents(WORKLOAD).expect("valid")[0].to_document(1);
        assert!(doc["spec"].get("mtlsMode").is_none(), "{doc}");
    }

    #[test]
    fn rejects_an_unknown_mtls_mode_naming_document_field_and_value() {
        let e = rejected(&with(
            WORKLOAD,
            "  node: n1\n",
            "  node: n1\n  mtlsMode: OPTIONAL\n",
        ));
        assert_eq!(
            e,
            "document 1 (Workload/default/echo-1): spec.mtlsMode: \"OPTIONAL\" is not an mTLS mode (\"STRICT\", \"PERMISSIVE\" or \"DISABLE\")"
        );
        let e = rejected(&with(POLICY, "mode: permissive", "mode: mutual"));
        assert_eq!(
            e,
            "document 1 (MtlsPolicy/shop/default): spec.mode: \"mutual\" is not an mTLS mode (\"STRICT\", \"PERMISSIVE\" or \"DISABLE\")"
        );
        let e = rejected(&with(POLICY, "mode: permissive", "mode: true"));
        assert!(
            e.ends_with("spec.mode: expected a string, found boolean true"),
            "{e}"
        );
        let e = rejected(&with(POLICY, "{mode: permissive}", "{}"));
        assert!(e.ends_with("spec.mode: required field is missing"), "{e}");
        let e = rejected(&with(POLICY, "{mode: permissive}", "{mode: STRICT, x: 1}"));
        assert!(e.ends_with("spec.x: unknown field"), "{e}");
    }

    #[test]
    fn parses_a_namespaced_mtls_policy() {
        let r = parse_documents(POLICY).expect("valid").remove(0);
        assert_eq!(r.id().to_string(), "MtlsPolicy/shop/default");
        let Resource::MtlsPolicy(p) = &r else {
            panic!("not a policy: {r:?}")
        };
        assert_eq!(p.mode, MtlsMode::Permissive);
        assert!(r.addresses().is_empty());
        let doc = r.to_document(4);
        assert_eq!(doc["spec"]["mode"], "PERMISSIVE");
        assert_eq!(doc["metadata"]["namespace"], "shop");
        let again = serde_yaml_ng::to_string(&doc).expect("yaml");
        assert_eq!(parse_documents(&again).expect("round trip")[0], r);
        let r = parse_documents(&with(POLICY, "namespace: shop", "labels: {a: b}"))
            .expect("valid")
            .remove(0);
        assert_eq!(r.id().to_string(), "MtlsPolicy/default/default");
        assert_eq!(Kind::from_loose("MtlsPolicies"), Some(Kind::MtlsPolicy));
        assert_eq!(Kind::from_loose("mtlspolicy"), Some(Kind::MtlsPolicy));
    }

    #[test]
    fn a_namespace_has_at_most_one_mtls_policy() {
        let a = parse_documents(POLICY).expect("valid");
        let b = parse_documents(&with(POLICY, "name: default", "name: other")).expect("valid");
        let elsewhere =
            parse_documents(&with(POLICY, "namespace: shop", "namespace: web")).expect("valid");
        // In one batch.
        let both = [a[0].clone(), b[0].clone()];
        let e = check_mtls_policies(&both, |_| None).expect_err("two in shop");
        assert_eq!(
            e.to_string(),
            "MtlsPolicy/shop/other: the namespace already has MtlsPolicy/shop/default; at most one MtlsPolicy per namespace"
        );
        // Against the stored configuration.
        let owner = a[0].id();
        let stored = |ns: &str| (ns == "shop").then(|| owner.clone());
        let e = check_mtls_policies(&b, stored).expect_err("shop has one");
        assert!(matches!(e, Error::MtlsPolicyConflict(_)), "{e}");
        assert!(e.to_string().contains("MtlsPolicy/shop/default"), "{e}");
        // Re-applying the same one, or one in another namespace, is fine.
        check_mtls_policies(&a, stored).expect("same policy");
        check_mtls_policies(&[a[0].clone(), elsewhere[0].clone()], stored)
            .expect("one per namespace");
    }

    const ROUTE: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, labels: {team: a}}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: echo-v2, port: 8080, weight: 90}, {name: echo, port: 80, weight: 10}]
    timeouts: {request: 10s}
";

    const GRPC_ROUTE: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: rpc, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: grpc}]
  rules:
  - matches: [{method: {service: mesh.test.Echo, method: Unary}}]
    backendRefs: [{name: grpc-v2, port: 50051}]
";

    #[test]
    fn parses_routes_and_renders_them_back() {
        let r = parse_documents(ROUTE).expect("valid").remove(0);
        assert_eq!(r.id().to_string(), "HTTPRoute/default/web");
        let Resource::HttpRoute(route) = &r else {
            panic!("not an HTTPRoute: {r:?}")
        };
        assert_eq!(route.created_revision, 0, "the store sets it");
        assert_eq!(route.labels["team"], "a");
        assert_eq!(route.spec.rules[0].backend_refs[0].weight, 90);
        assert!(r.addresses().is_empty());
        let doc = r.to_document(4);
        assert_eq!(doc["apiVersion"], mesh_api::gateway::GATEWAY_API_VERSION);
        assert_eq!(doc["kind"], "HTTPRoute");
        assert_eq!(doc["metadata"]["namespace"], "default");
        assert_eq!(doc["spec"]["parentRefs"][0]["port"], 80);
        // Unset fields are left out, not rendered as null or [].
        assert!(doc["spec"].get("hostnames").is_none(), "{doc}");
        assert!(doc["spec"]["parentRefs"][0].get("namespace").is_none());
        let again = serde_yaml_ng::to_string(&doc).expect("yaml");
        assert_eq!(parse_documents(&again).expect("round trip")[0], r);

        let g = parse_documents(GRPC_ROUTE).expect("valid").remove(0);
        assert_eq!(g.id().to_string(), "GRPCRoute/shop/rpc");
        let doc = g.to_document(1);
        assert_eq!(doc["kind"], "GRPCRoute");
        let again = serde_yaml_ng::to_string(&doc).expect("yaml");
        assert_eq!(parse_documents(&again).expect("round trip")[0], g);

        // What a server adds is tolerated; dotted names are fine.
        let with_status =
            format!("{ROUTE}status: {{parents: []}}\n").replace("name: web", "name: web.v2");
        let r = parse_documents(&with_status)
            .expect("status ignored")
            .remove(0);
        assert_eq!(r.id().to_string(), "HTTPRoute/default/web.v2");
    }

    #[test]
    fn a_full_route_survives_get_and_apply_unchanged() {
        let yaml = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: full}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules:
  - matches:
    - path: {type: RegularExpression, value: '/v[0-9]+/.*'}
      headers: [{name: x-version, value: two}]
      queryParams: [{type: RegularExpression, name: a, value: 'b.*'}]
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-a, value: b}], remove: [x-c]}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}, fraction: {numerator: 1}}
    backendRefs:
    - name: echo
      port: 80
      filters:
      - type: ResponseHeaderModifier
        responseHeaderModifier: {add: [{name: x-b, value: c}]}
    timeouts: {request: 10s, backendRequest: 2s}
  - filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /new}}
";
        let r = parse_documents(yaml).expect("valid").remove(0);
        let doc = serde_yaml_ng::to_string(&r.to_document(9)).expect("yaml");
        assert_eq!(parse_documents(&doc).expect("round trip")[0], r, "{doc}");
    }

    #[test]
    fn bad_routes_are_refused_naming_document_and_field() {
        let cases = [
            (
                with(ROUTE, "- matches:", "- matchez:"),
                "document 1 (HTTPRoute/default/web): spec.rules[0].matchez: unknown field `matchez`, expected one of `name`, `matches`, `filters`, `backendRefs`, `timeouts`",
            ),
            (
                with(
                    ROUTE,
                    "type: PathPrefix, value: /v2",
                    "type: RegularExpression, value: '(['",
                ),
                "document 1 (HTTPRoute/default/web): spec.rules[0].matches[0].path.value: \"([\" is not a valid regular expression: ",
            ),
            (
                with(ROUTE, "port: 80}]\n", "port: '80'}]\n"),
                "document 1 (HTTPRoute/default/web): spec.parentRefs[0].port: invalid type: string \"80\"",
            ),
            (
                with(ROUTE, "port: 80}]\n", "port: 70000}]\n"),
                "document 1 (HTTPRoute/default/web): spec.parentRefs[0].port: invalid value: integer `70000`",
            ),
            (
                with(
                    ROUTE,
                    "weight: 90}, {name: echo, port: 80, weight: 10}",
                    "weight: 0}, {name: echo, port: 80, weight: 0}",
                ),
                "document 1 (HTTPRoute/default/web): spec.rules[0].backendRefs: every backend has weight 0",
            ),
            (
                with(ROUTE, "{request: 10s}", "{request: 1s, backendRequest: 2s}"),
                "document 1 (HTTPRoute/default/web): spec.rules[0].timeouts.backendRequest: 2s is longer than the request timeout 1s",
            ),
            (
                with(
                    ROUTE,
                    "    backendRefs: [{name: echo-v2, port: 8080, weight: 90}, {name: echo, port: 80, weight: 10}]\n",
                    "    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}, {type: URLRewrite, urlRewrite: {hostname: x}}]\n",
                ),
                "document 1 (HTTPRoute/default/web): spec.rules[0].filters: RequestRedirect and URLRewrite cannot be used together in one rule",
            ),
            (
                with(ROUTE, "name: echo-v2, port: 8080", "name: echo-v2"),
                "document 1 (HTTPRoute/default/web): spec.rules[0].backendRefs[0].port: required field is missing",
            ),
            (
                with(
                    ROUTE,
                    "  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]\n",
                    "",
                ),
                "document 1 (HTTPRoute/default/web): spec.parentRefs: at least one entry is required",
            ),
            (
                with(ROUTE, "name: web,", "name: Web,"),
                "document 1: metadata.name: \"Web\" is not a valid name (a DNS subdomain",
            ),
            (
                with(GRPC_ROUTE, "method: Unary", "method: 'Un ary'"),
                "document 1 (GRPCRoute/shop/rpc): spec.rules[0].matches[0].method.method: \"Un ary\" is not a gRPC method name",
            ),
            (
                with(
                    GRPC_ROUTE,
                    "name: grpc-v2, port: 50051",
                    "name: grpc-v2, port: 50051, weight: -1",
                ),
                "document 1 (GRPCRoute/shop/rpc): spec.rules[0].backendRefs[0].weight: invalid value: integer `-1`",
            ),
        ];
        for (yaml, expected) in cases {
            let e = rejected(&yaml);
            assert!(e.starts_with(expected), "{e}\nexpected: {expected}");
        }
        // A filter's own fields are read as a whole (serde buffers a
        // tagged enum), so the path stops at the filter.
        let e = rejected(&with(
            ROUTE,
            "    timeouts: {request: 10s}\n",
            "    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {sett: []}}]\n",
        ));
        assert!(e.contains(": spec.rules[0].filters[0]"), "{e}");
        assert!(e.contains("unknown field `sett`"), "{e}");
        // Later documents are named by their index.
        let e = rejected(&format!(
            "{SERVICE}---\n{}",
            with(ROUTE, "- matches:", "- matchez:")
        ));
        assert!(
            e.starts_with("document 2 (HTTPRoute/default/web): spec.rules[0].matchez: "),
            "{e}"
        );
    }

    #[test]
    fn each_kind_belongs_to_its_api_version() {
        let e = rejected(&with(
            ROUTE,
            "gateway.networking.k8s.io/v1",
            "mesh.dev/v1alpha1",
        ));
        assert_eq!(
            e,
            "document 1: apiVersion: HTTPRoute is a kind of apiVersion \"gateway.networking.k8s.io/v1\", not \"mesh.dev/v1alpha1\""
        );
        let e = rejected(&with(
            SERVICE,
            "mesh.dev/v1alpha1",
            "gateway.networking.k8s.io/v1",
        ));
        assert_eq!(
            e,
            "document 1: apiVersion: Service is a kind of apiVersion \"mesh.dev/v1alpha1\", not \"gateway.networking.k8s.io/v1\""
        );
        let e = rejected(&with(ROUTE, "kind: HTTPRoute", "kind: Gateway"));
        assert_eq!(
            e,
            "document 1: kind: unknown kind \"Gateway\" (expected \"HTTPRoute\" or \"GRPCRoute\")"
        );
        let e = rejected(&with(ROUTE, "kind: HTTPRoute", "kind: HttpRoute"));
        assert!(
            e.starts_with("document 1: kind: unknown kind \"HttpRoute\""),
            "{e}"
        );
        let e = rejected(&with(
            ROUTE,
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v1beta1",
        ));
        assert_eq!(
            e,
            "document 1: apiVersion: unknown apiVersion \"gateway.networking.k8s.io/v1beta1\" (expected \"gateway.networking.k8s.io/v1\")"
        );
    }

    fn reference_check(batch: &[Resource], stored: &[Resource]) -> Result<(), Error> {
        check_references(batch, |namespace, name| {
            stored.iter().find_map(|r| match r {
                Resource::Service(s) if s.namespace == namespace && s.name == name => Some(s),
                _ => None,
            })
        })
    }

    fn echo_services() -> Vec<Resource> {
        parse_documents(
            "
apiVersion: mesh.dev/v1alpha1
kind: Service
metadata: {name: echo}
spec: {vips: [198.19.0.1], ports: [{port: 80}, {port: 8080}], selector: {app: echo}}
---
apiVersion: mesh.dev/v1alpha1
kind: Service
metadata: {name: echo-v2}
spec: {vips: [198.19.0.2], ports: [{port: 8080}], selector: {app: echo-v2}}
",
        )
        .expect("valid")
    }

    #[test]
    fn routes_name_services_and_ports_that_exist() {
        let services = echo_services();
        let route = parse_documents(ROUTE).expect("valid");
        reference_check(&route, &services).expect("parents and backends exist");
        // The Services may come in the same batch.
        let mut batch = route.clone();
        batch.extend(services.iter().cloned());
        reference_check(&batch, &[]).expect("in the batch");

        let cases = [
            (
                ROUTE.replace("name: echo, port: 80}]", "name: echo, port: 81}]"),
                "HTTPRoute/default/web: spec.parentRefs[0].port: Service default/echo has no port 81 (it has 80, 8080)",
            ),
            (
                ROUTE.replace("name: echo, port: 80}]", "name: gone}]"),
                "HTTPRoute/default/web: spec.parentRefs[0]: Service default/gone does not exist",
            ),
            (
                ROUTE.replace("name: echo, port: 80}]", "name: echo, namespace: shop}]"),
                "HTTPRoute/default/web: spec.parentRefs[0]: Service shop/echo does not exist",
            ),
            (
                ROUTE.replace("{name: echo-v2, port: 8080, weight: 90}", "{name: echo-v3, port: 8080, weight: 90}"),
                "HTTPRoute/default/web: spec.rules[0].backendRefs[0]: Service default/echo-v3 does not exist",
            ),
            (
                ROUTE.replace("{name: echo-v2, port: 8080, weight: 90}", "{name: echo-v2, port: 80, weight: 90}"),
                "HTTPRoute/default/web: spec.rules[0].backendRefs[0].port: Service default/echo-v2 has no port 80 (it has 8080)",
            ),
            (
                ROUTE.replace(
                    "    timeouts: {request: 10s}\n",
                    "    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]\n",
                ),
                "HTTPRoute/default/web: spec.rules[0].filters[0].requestMirror.backendRef: Service default/shadow does not exist",
            ),
        ];
        for (yaml, expected) in cases {
            let batch = parse_documents(&yaml).expect("valid on its own");
            let e = reference_check(&batch, &services).expect_err("broken reference");
            assert_eq!(e.to_string(), expected);
            assert_eq!(e.document_index(), None);
        }
        let grpc = parse_documents(GRPC_ROUTE).expect("valid");
        let e = reference_check(&grpc, &services).expect_err("nothing in shop");
        assert_eq!(
            e.to_string(),
            "GRPCRoute/shop/rpc: spec.parentRefs[0]: Service shop/grpc does not exist"
        );
    }

    const TRAFFIC_POLICY: &str = "
apiVersion: mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: echo.resilience, labels: {team: a}}
spec:
  targetRef: {kind: Service, name: echo, port: 80}
  loadBalancer: {simple: ROUND_ROBIN}
  retries:
    attempts: 3
    perTryTimeout: 200ms
    retryOn: [5xx, reset]
    budget: {percent: 25}
  circuitBreaker: {maxRequests: 100}
  outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 5s, maxEjectionPercent: 50}
  fault: {headers: [{name: x-chaos, value: 'yes'}], abort: {httpStatus: 503, percentage: 1.5}}
  rateLimit: {inbound: {requests: 100, perSourceIdentity: true}}
";

    #[test]
    fn parses_traffic_policies_and_renders_them_back() {
        let r = parse_documents(TRAFFIC_POLICY).expect("valid").remove(0);
        assert_eq!(r.id().to_string(), "TrafficPolicy/default/echo.resilience");
        let Resource::TrafficPolicy(p) = &r else {
            panic!("not a TrafficPolicy: {r:?}")
        };
        assert_eq!(p.created_revision, 0, "the store sets it");
        assert_eq!(r.created_revision(), Some(0));
        assert_eq!(p.labels["team"], "a");
        assert_eq!(p.spec.target_ref.port, Some(80));
        let retries = p.spec.retries.as_ref().expect("retries");
        assert_eq!(retries.attempts, 3);
        assert_eq!(retries.budget.as_ref().expect("budget").percent, 25.0);
        assert_eq!(
            retries
                .budget
                .as_ref()
                .expect("budget")
                .min_retry_concurrency,
            3,
            "Envoy's default"
        );
        assert!(r.addresses().is_empty());
        let doc = r.to_document(4);
        assert_eq!(doc["apiVersion"], "mesh.dev/v1alpha1");
        assert_eq!(doc["kind"], "TrafficPolicy");
        assert_eq!(doc["metadata"]["namespace"], "default");
        assert_eq!(doc["spec"]["targetRef"]["name"], "echo");
        // Unset fields are left out, not rendered as null or [].
        assert!(doc["spec"]["targetRef"].get("group").is_none(), "{doc}");
        assert!(doc["spec"]["retries"].get("retriableStatusCodes").is_none());
        let again = serde_yaml_ng::to_string(&doc).expect("yaml");
        assert_eq!(parse_documents(&again).expect("round trip")[0], r);

        // The smallest one: a target and nothing else.
        let minimal = "apiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p, namespace: shop}\nspec: {targetRef: {name: cart}}\n";
        let r = parse_documents(minimal).expect("valid").remove(0);
        assert_eq!(r.id().to_string(), "TrafficPolicy/shop/p");
        let doc = r.to_document(1);
        assert_eq!(doc["spec"], json!({"targetRef": {"name": "cart"}}));
        let again = serde_yaml_ng::to_string(&doc).expect("yaml");
        assert_eq!(parse_documents(&again).expect("round trip")[0], r);
        for loose in ["TrafficPolicy", "trafficpolicies", "tp"] {
            assert_eq!(Kind::from_loose(loose), Some(Kind::TrafficPolicy));
        }
    }

    #[test]
    fn bad_traffic_policies_are_refused_naming_document_and_field() {
        let at = "document 1 (TrafficPolicy/default/echo.resilience): ";
        let cases = [
            (
                with(TRAFFIC_POLICY, "{percent: 25}", "{percent: 150}"),
                "spec.retries.budget.percent: 150: must be more than 0 and at most 100",
            ),
            (
                with(TRAFFIC_POLICY, "perTryTimeout: 200ms", "perTryTimeout: 0s"),
                "spec.retries.perTryTimeout: \"0s\": must be more than zero",
            ),
            (
                with(TRAFFIC_POLICY, "attempts: 3", "attempts: 11"),
                "spec.retries.attempts: 11 is more than the most, 10",
            ),
            (
                with(
                    TRAFFIC_POLICY,
                    "{simple: ROUND_ROBIN}",
                    "{consistentHash: {}}",
                ),
                "spec.loadBalancer.consistentHash: needs a key: httpHeaderName, httpCookie or useSourceIdentity",
            ),
            (
                with(
                    TRAFFIC_POLICY,
                    "maxEjectionPercent: 50",
                    "maxEjectionPercent: 101",
                ),
                "spec.outlierDetection.maxEjectionPercent: 101 is more than 100",
            ),
            (
                with(TRAFFIC_POLICY, "requests: 100", "requests: 0"),
                "spec.rateLimit.inbound.requests: a rate of zero: at least 1",
            ),
            (
                with(
                    TRAFFIC_POLICY,
                    "    attempts: 3\n",
                    "    attempts: 3\n    tries: 2\n",
                ),
                "spec.retries.tries: unknown field `tries`, expected one of `attempts`, ",
            ),
            (
                with(TRAFFIC_POLICY, "  circuitBreaker:", "  circuitBreakers:"),
                "spec.circuitBreakers: unknown field `circuitBreakers`",
            ),
            (
                with(TRAFFIC_POLICY, "attempts: 3", "attempts: three"),
                "spec.retries.attempts: invalid type: string \"three\"",
            ),
            (
                with(
                    TRAFFIC_POLICY,
                    "simple: ROUND_ROBIN",
                    "simple: LEAST_REQUEST",
                ),
                "spec.loadBalancer.simple: unknown variant `LEAST_REQUEST`",
            ),
            (
                with(
                    TRAFFIC_POLICY,
                    "name: echo, port: 80",
                    "name: echo, port: 70000",
                ),
                "spec.targetRef.port: invalid value: integer `70000`",
            ),
            (
                with(
                    TRAFFIC_POLICY,
                    "kind: Service, name: echo",
                    "kind: Pod, name: echo",
                ),
                "spec.targetRef.kind: only Service",
            ),
            (
                with(
                    TRAFFIC_POLICY,
                    "  targetRef: {kind: Service, name: echo, port: 80}\n",
                    "",
                ),
                "spec: missing field `targetRef`",
            ),
        ];
        for (yaml, expected) in cases {
            let e = rejected(&yaml);
            let expected = format!("{at}{expected}");
            assert!(e.starts_with(&expected), "{e}\nexpected: {expected}");
        }
        let e = rejected(&with(
            TRAFFIC_POLICY,
            "mesh.dev/v1alpha1",
            "gateway.networking.k8s.io/v1",
        ));
        assert_eq!(
            e,
            "document 1: apiVersion: TrafficPolicy is a kind of apiVersion \"mesh.dev/v1alpha1\", not \"gateway.networking.k8s.io/v1\""
        );
        let e = rejected(&with(TRAFFIC_POLICY, "name: echo.resilience", "name: Echo"));
        assert!(
            e.starts_with(
                "document 1: metadata.name: \"Echo\" is not a valid name (a DNS subdomain"
            ),
            "{e}"
        );
        // Later documents are named by their index.
        let e = rejected(&format!(
            "{SERVICE}---\n{}",
            with(TRAFFIC_POLICY, "attempts: 3", "attempts: 11")
        ));
        assert!(
            e.starts_with(
                "document 2 (TrafficPolicy/default/echo.resilience): spec.retries.attempts: "
            ),
            "{e}"
        );
    }

    #[test]
    fn traffic_policies_target_a_service_and_port_that_exist() {
        let services = echo_services();
        let policy = parse_documents(TRAFFIC_POLICY).expect("valid");
        reference_check(&policy, &services).expect("echo:80 exists");
        let whole = parse_documents(&with(TRAFFIC_POLICY, ", port: 80}", "}")).expect("valid");
        reference_check(&whole, &services).expect("every port of echo");
        // The Service may come in the same batch.
        let mut batch = policy.clone();
        batch.extend(services.iter().cloned());
        reference_check(&batch, &[]).expect("in the batch");

        let cases = [
            (
                with(
                    TRAFFIC_POLICY,
                    "name: echo, port: 80",
                    "name: gone, port: 80",
                ),
                "TrafficPolicy/default/echo.resilience: spec.targetRef.name: Service default/gone does not exist",
            ),
            (
                with(
                    TRAFFIC_POLICY,
                    "name: echo, port: 80",
                    "name: echo, port: 81",
                ),
                "TrafficPolicy/default/echo.resilience: spec.targetRef.port: Service default/echo has no port 81 (it has 80, 8080)",
            ),
            // Only Services of the policy's own namespace.
            (
                with(
                    TRAFFIC_POLICY,
                    "{name: echo.resilience,",
                    "{name: echo.resilience, namespace: shop,",
                ),
                "TrafficPolicy/shop/echo.resilience: spec.targetRef.name: Service shop/echo does not exist",
            ),
        ];
        for (yaml, expected) in cases {
            let batch = parse_documents(&yaml).expect("valid on its own");
            let e = reference_check(&batch, &services).expect_err("broken reference");
            assert_eq!(e.to_string(), expected);
            assert_eq!(e.document_index(), None);
        }
    }

    const AUTHORIZATION_POLICY: &str = "
apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web.allow, labels: {team: a}}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/shop/sa/client], notNamespaces: [test]}
    - source: {ipBlocks: [198.18.0.0/15]}
    to:
    - operation: {ports: ['8080'], methods: [GET, POST], paths: ['/api/*']}
    when:
    - key: request.headers[x-tenant]
      values: ['a*']
  - {}
";

    #[test]
    fn parses_authorization_policies_and_renders_them_back() {
        let r = parse_documents(AUTHORIZATION_POLICY)
            .expect("valid")
            .remove(0);
        assert_eq!(r.id().to_string(), "AuthorizationPolicy/default/web.allow");
        let Resource::AuthorizationPolicy(p) = &r else {
            panic!("not an AuthorizationPolicy: {r:?}")
        };
        assert_eq!(p.created_revision, 0, "the store sets it");
        assert_eq!(r.created_revision(), Some(0));
        assert_eq!(p.labels["team"], "a");
        assert_eq!(p.spec.action, mesh_api::authz::Action::Allow);
        assert_eq!(p.spec.rules.len(), 2);
        assert_eq!(
            p.spec.rules[0].from[0].source.principals,
            ["cluster.local/ns/shop/sa/client"]
        );
        assert_eq!(p.spec.rules[1], mesh_api::authz::Rule::default());
        assert!(r.addresses().is_empty());
        let doc = r.to_document(4);
        assert_eq!(doc["apiVersion"], "mesh.dev/v1alpha1");
        assert_eq!(doc["kind"], "AuthorizationPolicy");
        assert_eq!(doc["metadata"]["namespace"], "default");
        assert_eq!(
            doc["spec"]["selector"],
            json!({"matchLabels": {"app": "web"}})
        );
        // Unset fields are left out, not rendered as null or []; the rule
        // that matches everything stays `{}`.
        assert_eq!(
            doc["spec"]["rules"][0]["from"][1],
            json!({"source": {"ipBlocks": ["198.18.0.0/15"]}})
        );
        assert_eq!(doc["spec"]["rules"][1], json!({}));
        let again = serde_yaml_ng::to_string(&doc).expect("yaml");
        assert_eq!(parse_documents(&again).expect("round trip")[0], r);

        // Istio's allow-nothing: no selector, no rules; the action is filled
        // in. In the root namespace it is an ordinary namespaced resource.
        let nothing = "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: mesh-system}\nspec: {}\n";
        let r = parse_documents(nothing).expect("valid").remove(0);
        assert_eq!(
            r.id().to_string(),
            "AuthorizationPolicy/mesh-system/deny-all"
        );
        let doc = r.to_document(1);
        assert_eq!(doc["metadata"]["namespace"], "mesh-system");
        assert_eq!(doc["spec"], json!({"action": "ALLOW"}));
        let again = serde_yaml_ng::to_string(&doc).expect("yaml");
        assert_eq!(parse_documents(&again).expect("round trip")[0], r);
        for loose in ["AuthorizationPolicy", "authorizationpolicies", "ap"] {
            assert_eq!(Kind::from_loose(loose), Some(Kind::AuthorizationPolicy));
        }
    }

    #[test]
    fn bad_authorization_policies_are_refused_naming_document_and_field() {
        let at = "document 1 (AuthorizationPolicy/default/web.allow): ";
        let cases = [
            (
                with(AUTHORIZATION_POLICY, "  - from:", "  - form:"),
                "spec.rules[0].form: unknown field `form`, expected one of `from`, `to`, `when`",
            ),
            (
                with(AUTHORIZATION_POLICY, "action: ALLOW", "action: REJECT"),
                "spec.action: unknown variant `REJECT`, expected one of `ALLOW`, `DENY`, `AUDIT`",
            ),
            (
                with(
                    AUTHORIZATION_POLICY,
                    "source: {ipBlocks: [198.18.0.0/15]}",
                    "{}",
                ),
                "spec.rules[0].from[1]: missing field `source`",
            ),
            (
                with(
                    AUTHORIZATION_POLICY,
                    "  action: ALLOW\n",
                    "  action: ALLOW\n  provider: {name: opa}\n",
                ),
                "spec.provider: unknown field `provider`, expected one of `selector`, `action`, `rules`",
            ),
            (
                with(
                    AUTHORIZATION_POLICY,
                    "{principals: [cluster.local/ns/shop/sa/client], notNamespaces: [test]}",
                    "{}",
                ),
                "spec.rules[0].from[0].source: an empty source would match every caller",
            ),
            (
                with(
                    AUTHORIZATION_POLICY,
                    "ports: ['8080'], methods: [GET, POST], paths: ['/api/*']",
                    "",
                ),
                "spec.rules[0].to[0].operation: an empty operation would match every request",
            ),
            (
                with(
                    AUTHORIZATION_POLICY,
                    "[cluster.local/ns/shop/sa/client]",
                    "['spiffe://cluster.local/ns/shop/sa/client']",
                ),
                "spec.rules[0].from[0].source.principals[0]: \"spiffe://cluster.local/ns/shop/sa/client\": principals leave out `spiffe://`",
            ),
            (
                with(
                    AUTHORIZATION_POLICY,
                    "[cluster.local/ns/shop/sa/client]",
                    "['a*b']",
                ),
                "spec.rules[0].from[0].source.principals[0]: \"a*b\": `*` may only be the first or the last character, once",
            ),
            (
                with(AUTHORIZATION_POLICY, "198.18.0.0/15", "198.18.0.1/15"),
                "spec.rules[0].from[1].source.ipBlocks[0]: \"198.18.0.1/15\" has host bits set (did you mean 198.18.0.0/15?)",
            ),
            (
                with(
                    AUTHORIZATION_POLICY,
                    "methods: [GET, POST]",
                    "methods: [GET, post]",
                ),
                "spec.rules[0].to[0].operation.methods[1]: \"post\" is not an HTTP method in upper case",
            ),
            (
                with(AUTHORIZATION_POLICY, "ports: ['8080']", "ports: [http]"),
                "spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port (1-65535)",
            ),
            (
                with(
                    AUTHORIZATION_POLICY,
                    "key: request.headers[x-tenant]",
                    "key: 'request.auth.claims[iss]'",
                ),
                "spec.rules[0].when[0].key: \"request.auth.claims[iss]\" is not a supported key",
            ),
            (
                with(AUTHORIZATION_POLICY, "{app: web}", "{app: 'web*'}"),
                "spec.selector.matchLabels.app: label values are matched exactly",
            ),
            (
                with(AUTHORIZATION_POLICY, "ports: ['8080']", "ports: [8080]"),
                "spec.rules[0].to[0].operation.ports[0]: invalid type: integer `8080`, expected a string",
            ),
        ];
        for (yaml, expected) in cases {
            let e = rejected(&yaml);
            let expected = format!("{at}{expected}");
            assert!(e.starts_with(&expected), "{e}\nexpected: {expected}");
        }
        // An Istio manifest is told which apiVersion ours is.
        let e = rejected(&with(
            AUTHORIZATION_POLICY,
            "mesh.dev/v1alpha1",
            "security.istio.io/v1",
        ));
        assert_eq!(
            e,
            "document 1: apiVersion: unknown apiVersion \"security.istio.io/v1\" (expected \"mesh.dev/v1alpha1\")"
        );
        let e = rejected(&with(AUTHORIZATION_POLICY, "name: web.allow", "name: Web"));
        assert!(
            e.starts_with(
                "document 1: metadata.name: \"Web\" is not a valid name (a DNS subdomain"
            ),
            "{e}"
        );
        // Later documents are named by their index.
        let e = rejected(&format!(
            "{SERVICE}---\n{}",
            with(AUTHORIZATION_POLICY, "action: ALLOW", "action: deny")
        ));
        assert!(
            e.starts_with("document 2 (AuthorizationPolicy/default/web.allow): spec.action: "),
            "{e}"
        );
    }

    #[test]
    fn authorization_policies_name_no_other_resource() {
        // A selector that matches no workload, in a namespace with nothing
        // else in it, is valid (as in Istio).
        let batch = parse_documents(&with(
            AUTHORIZATION_POLICY,
            "{name: web.allow,",
            "{name: web.allow, namespace: empty,",
        ))
        .expect("valid");
        reference_check(&batch, &[]).expect("no references");
    }

    #[test]
    fn selectors_match_subsets_and_empty_selects_nothing() {
        let r = parse_documents(SERVICE).expect("valid");
        let Resource::Service(mut s) = r[0].clone() else {
            unreachable!()
        };
        let labels: BTreeMap<String, String> =
            [("app".into(), "echo".into()), ("v".into(), "1".into())].into();
        assert!(s.selects(&labels));
        s.selector.insert("v".into(), "2".into());
        assert!(!s.selects(&labels));
        s.selector.clear();
        assert!(!s.selects(&labels));
    }
}
