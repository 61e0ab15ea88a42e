//! What node agents receive, and how each agent's stream works out what to
//! send it. Pure: no I/O, no locks; the server holds the [`View`] under a
//! lock and drives one [`Subscription`] per stream.
//!
//! Every agent gets every Workload (the tunnel needs the identity and node of
//! any destination), every Service with its endpoints resolved from the
//! selector, every Node (where its tunnel listens), every HTTPRoute,
//! GRPCRoute and TrafficPolicy (each applies wherever its Service's callers
//! run), every AuthorizationPolicy (its selector may match workloads on any
//! node) and the CA's trust bundle.
//! MtlsPolicies are not distributed themselves: each Workload carries its
//! effective mTLS mode (its own, else its namespace's policy, else STRICT),
//! so a policy change re-sends the workloads whose mode it changes.
//! Each distributed resource is built
//! and encoded once per change, and every agent's response shares those
//! bytes. Its version is a hash of its content, so it is the same after a
//! restart of mesh-control (an agent resubscribing with what it holds gets
//! only what really differs) and it changes whenever the content does,
//! including a Service's endpoint set.
//!
//! To keep one change cheap with a thousand agents, the view keeps a log of
//! which keys changed at which revision: an agent that is up to date at
//! revision R only looks at the keys changed after R.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    hash::{Hash, Hasher},
    ops::Bound,
    sync::Arc,
};

use bytes::Bytes;
use prost::Message;

use super::resources::{
    Change, Kind, MtlsMode, Node, Policy, PolicySpec, Resource, ResourceId, Route, RouteSpec,
    Service, Workload,
};
use mesh_api::{names::TRUST_BUNDLE_KEY, pb};

/// Responses are cut at about this size: a full sync of a large mesh stays
/// far below clients' default 4 MiB message limit and moves in steps that
/// flow control and memory like.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// How many changed keys the change log keeps by default. An agent whose
/// last response predates the oldest kept entry must resubscribe.
pub const DEFAULT_CHANGE_LOG_KEYS: usize = 1 << 20;

type Key = Arc<str>;

/// A resource as agents receive it, encoded once.
#[derive(Debug)]
struct Distributed {
    version: String,
    /// The resource as an entry of `DeltaResponse.resources` (field tag,
    /// length, message): protobuf appends repeated fields of concatenated
    /// messages, so a response is its other fields followed by these.
    framed: Bytes,
}

impl Distributed {
    fn new(resource: pb::Resource) -> Distributed {
        let version = resource.version.clone();
        let framed = pb::DeltaResponse {
            resources: vec![resource],
            ..pb::DeltaResponse::default()
        }
        .encode_to_vec()
        .into();
        Distributed { version, framed }
    }

    fn version(&self) -> &str {
        &self.version
    }
}

#[derive(Debug)]
struct WorkloadEntry {
    spec: Workload,
    /// Effective mTLS mode, as distributed.
    mode: MtlsMode,
    distributed: Distributed,
}

#[derive(Debug)]
struct ServiceEntry {
    spec: Service,
    distributed: Distributed,
}

/// A key whose distributed content changed (or that is gone).
type Changed = Key;

/// The agent's last response is older than the change log: it has to
/// resubscribe with the versions it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("agent is too far behind the change log; resubscribe")]
pub struct Lagged;

#[derive(Debug)]
struct ChangeLog {
    entries: VecDeque<(u64, Vec<Changed>)>,
    keys: usize,
    max_keys: usize,
    /// Changes up to this revision are no longer known.
    pruned_through: u64,
}

impl ChangeLog {
    fn push(&mut self, revision: u64, changed: Vec<Changed>) {
        if changed.is_empty() {
            return;
        }
        self.keys += changed.len();
        self.entries.push_back((revision, changed));
        while self.keys > self.max_keys && self.entries.len() > 1 {
            let (revision, dropped) = self.entries.pop_front().expect("not empty");
            self.keys -= dropped.len();
            self.pruned_through = revision;
        }
    }

    /// Keys changed after `since`, each once.
    fn since(&self, since: u64) -> Result<Vec<Key>, Lagged> {
        if since < self.pruned_through {
            return Err(Lagged);
        }
        let start = self.entries.partition_point(|(r, _)| *r <= since);
        let mut seen = HashSet::new();
        Ok(self
            .entries
            .range(start..)
            .flat_map(|(_, changed)| changed)
            .filter(|key| seen.insert((*key).clone()))
            .cloned()
            .collect())
    }
}

/// The configuration as agents see it, kept up to date change by change.
#[derive(Debug)]
pub struct View {
    revision: u64,
    /// Ordered, so a long initial sync can resume after the last key sent.
    services: BTreeMap<Key, ServiceEntry>,
    workloads: BTreeMap<Key, WorkloadEntry>,
    /// Nodes, the trust bundle and AuthorizationPolicies; sent first in a
    /// first sync, so an agent whose first sync comes in several responses
    /// has a workload's policies before the workload itself.
    others: BTreeMap<Key, Distributed>,
    /// What attaches to Services: HTTPRoutes, GRPCRoutes and
    /// TrafficPolicies; sent last in a first sync, after the Services they
    /// name.
    attached: BTreeMap<Key, Distributed>,
    /// Which node runs which workloads: what a node may get certificates for.
    node_workloads: HashMap<String, BTreeSet<Key>>,
    /// `(namespace, label, value)` -> workloads carrying it.
    workloads_by_label: HashMap<String, HashSet<Key>>,
    /// `(namespace, label, value)` of a service's first selector term ->
    /// services; a candidate set for "which services select this workload".
    services_by_label: HashMap<String, HashSet<Key>>,
    /// namespace -> MtlsPolicy name -> mode. The store allows one policy per
    /// namespace; should there be more, the first by name counts.
    mtls_policies: HashMap<String, BTreeMap<String, MtlsMode>>,
    log: ChangeLog,
}

impl View {
    /// The view of a whole configuration at `revision`.
    pub fn new<'a>(
        revision: u64,
        resources: impl IntoIterator<Item = &'a Resource>,
        max_log_keys: usize,
    ) -> View {
        let mut view = View {
            revision: 0,
            services: BTreeMap::new(),
            workloads: BTreeMap::new(),
            others: BTreeMap::new(),
            attached: BTreeMap::new(),
            node_workloads: HashMap::new(),
            workloads_by_label: HashMap::new(),
            services_by_label: HashMap::new(),
            mtls_policies: HashMap::new(),
            log: ChangeLog {
                entries: VecDeque::new(),
                keys: 0,
                max_keys: max_log_keys,
                pruned_through: 0,
            },
        };
        let changes: Vec<Change> = resources.into_iter().cloned().map(Change::Put).collect();
        view.apply(revision, &changes);
        // Nobody can be behind a view that was just built.
        view.log.entries.clear();
        view.log.keys = 0;
        view.log.pruned_through = revision;
        view
    }

    /// The view with the CA's trust bundle distributed as [`TRUST_BUNDLE_KEY`].
    pub fn with_trust_bundle(mut self, pem: &str) -> View {
        self.set_trust_bundle(pb::TrustBundle {
            pem: pem.to_owned(),
            ..pb::TrustBundle::default()
        });
        self
    }

    /// Replaces the distributed trust bundle (roots, signing root, forced
    /// renewal, revocations); returns its version. It is not a stored
    /// resource, so no revision counts the change: streams are told to
    /// send the key again ([`Subscription::resend`]).
    pub fn set_trust_bundle(&mut self, bundle: pb::TrustBundle) -> String {
        let version = version_of(&(
            &bundle.pem,
            &bundle.signing_pem,
            bundle.force_renew,
            &bundle.revoked_identities,
            &bundle.revoked_nodes,
        ));
        let resource = pb::Resource {
            key: TRUST_BUNDLE_KEY.to_owned(),
            version: version.clone(),
            body: Some(pb::resource::Body::TrustBundle(bundle)),
        };
        self.others
            .insert(TRUST_BUNDLE_KEY.into(), Distributed::new(resource));
        version
    }

    /// The version of the trust bundle distributed now.
    pub fn trust_bundle_version(&self) -> Option<&str> {
        self.others.get(TRUST_BUNDLE_KEY).map(Distributed::version)
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Whether a Workload on `node` runs as `service_account` in `namespace`:
    /// only then may that node's agent hold this identity.
    pub fn runs_on(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.node_workloads.get(node).is_some_and(|keys| {
            keys.iter()
                .filter_map(|k| self.workloads.get(k))
                .any(|e| e.spec.namespace == namespace && e.spec.service_account == service_account)
        })
    }

    /// Applies a committed transaction.
    pub fn apply(&mut self, revision: u64, changes: &[Change]) {
        let mut changed = Vec::new();
        // Services to resolve again, with their new spec if the batch sets one.
        let mut touched: HashMap<Key, Option<Service>> = HashMap::new();
        // Namespaces whose MtlsPolicy changed: their workloads' modes may too.
        let mut policy_namespaces: BTreeSet<String> = BTreeSet::new();
        for change in changes {
            match change {
                Change::Put(Resource::Workload(w)) => {
                    self.put_workload(w, &mut changed, &mut touched);
                }
                Change::Put(Resource::Service(s)) => {
                    let key = key_of(&ResourceId {
                        kind: Kind::Service,
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                    });
                    if let Some(old) = self.services.get(&key) {
                        let old = old.spec.clone();
                        self.unindex_service(&key, &old);
                    }
                    self.index_service(&key, s);
                    touched.insert(key, Some(s.clone()));
                }
                Change::Put(Resource::Node(n)) => {
                    let key = key_of(&Resource::Node(n.clone()).id());
                    let distributed = Distributed::new(node_resource(&key, n));
                    put(&mut self.others, key, distributed, &mut changed);
                }
                Change::Put(Resource::HttpRoute(r)) => self.put_route(r, &mut changed),
                Change::Put(Resource::GrpcRoute(r)) => self.put_route(r, &mut changed),
                Change::Put(Resource::TrafficPolicy(p)) => {
                    let key = policy_key(&**p);
                    self.put_attached(key, policy_resource, &**p, &mut changed);
                }
                Change::Put(Resource::AuthorizationPolicy(p)) => {
                    let key = policy_key(p);
                    let distributed = Distributed::new(policy_resource(&key, p));
                    put(&mut self.others, key, distributed, &mut changed);
                }
                Change::Put(Resource::MtlsPolicy(p)) => {
                    self.mtls_policies
                        .entry(p.namespace.clone())
                        .or_default()
                        .insert(p.name.clone(), p.mode);
                    policy_namespaces.insert(p.namespace.clone());
                }
                Change::Delete(id) => {
                    let key = key_of(id);
                    match id.kind {
                        Kind::Workload => self.delete_workload(&key, &mut changed, &mut touched),
                        Kind::Service => {
                            touched.remove(&key);
                            if let Some(old) = self.services.remove(&key) {
                                self.unindex_service(&key, &old.spec);
                                changed.push(key);
                            }
                        }
                        Kind::Node | Kind::AuthorizationPolicy => {
                            if self.others.remove(&key).is_some() {
                                changed.push(key);
                            }
                        }
                        Kind::HttpRoute | Kind::GrpcRoute | Kind::TrafficPolicy => {
                            if self.attached.remove(&key).is_some() {
                                changed.push(key);
                            }
                        }
                        Kind::MtlsPolicy => {
                            if let Some(policies) = self.mtls_policies.get_mut(&id.namespace) {
                                policies.remove(&id.name);
                                if policies.is_empty() {
                                    self.mtls_policies.remove(&id.namespace);
                                }
                            }
                            policy_namespaces.insert(id.namespace.clone());
                        }
                    }
                }
            }
        }
        for namespace in policy_namespaces {
            self.refresh_mtls_modes(&namespace, &mut changed);
        }
        for (key, spec) in touched {
            self.resolve(key, spec, &mut changed);
        }
        self.revision = revision;
        self.log.push(revision, changed);
    }

    fn put_route<S: RouteSpec>(&mut self, r: &Route<S>, changed: &mut Vec<Changed>) {
        let key = key_of(&ResourceId {
            kind: S::KIND,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        });
        self.put_attached(key, route_resource, r, changed);
    }

    /// Encodes a route or policy and records it if what agents see changed.
    fn put_attached<T>(
        &mut self,
        key: Key,
        encode: fn(&str, &T) -> pb::Resource,
        resource: &T,
        changed: &mut Vec<Changed>,
    ) {
        let distributed = Distributed::new(encode(&key, resource));
        put(&mut self.attached, key, distributed, changed);
    }

    fn put_workload(
        &mut self,
        w: &Workload,
        changed: &mut Vec<Changed>,
        touched: &mut HashMap<Key, Option<Service>>,
    ) {
        let key = key_of(&ResourceId {
            kind: Kind::Workload,
            namespace: w.namespace.clone(),
            name: w.name.clone(),
        });
        let old = self.remove_workload(&key);
        let as_endpoint_changed = old.as_ref().is_none_or(|o| {
            (&o.spec.labels, o.spec.ip, &o.spec.node, o.spec.ready)
                != (&w.labels, w.ip, &w.node, w.ready)
        });
        if as_endpoint_changed {
            if let Some(o) = &old {
                self.touch_selecting(&o.spec, touched);
            }
            self.touch_selecting(w, touched);
        }
        let mode = MtlsMode::effective(w.mtls_mode, self.namespace_mtls_mode(&w.namespace));
        let distributed = Distributed::new(workload_resource(&key, w, mode));
        if old
            .as_ref()
            .is_none_or(|o| o.distributed.version() != distributed.version())
        {
            changed.push(key.clone());
        }
        self.node_workloads
            .entry(w.node.clone())
            .or_default()
            .insert(key.clone());
        for (k, v) in &w.labels {
            self.workloads_by_label
                .entry(label_key(&w.namespace, k, v))
                .or_default()
                .insert(key.clone());
        }
        self.workloads.insert(
            key,
            WorkloadEntry {
                spec: w.clone(),
                mode,
                distributed,
            },
        );
    }

    /// The mode of `namespace`'s MtlsPolicy, if it has one.
    fn namespace_mtls_mode(&self, namespace: &str) -> Option<MtlsMode> {
        self.mtls_policies
            .get(namespace)
            .and_then(|p| p.values().next().copied())
    }

    /// Re-encodes the workloads of `namespace` whose effective mode differs
    /// from what was distributed, after its MtlsPolicy changed.
    fn refresh_mtls_modes(&mut self, namespace: &str, changed: &mut Vec<Changed>) {
        let policy = self.namespace_mtls_mode(namespace);
        // Keys are `Workload/<namespace>/<name>` and names have no '/'.
        let prefix = format!("{}/{namespace}/", Kind::Workload);
        let from = (Bound::Included(prefix.as_str()), Bound::Unbounded);
        for (key, entry) in self
            .workloads
            .range_mut::<str, _>(from)
            .take_while(|(k, _)| k.starts_with(&prefix))
        {
            let mode = MtlsMode::effective(entry.spec.mtls_mode, policy);
            if mode != entry.mode {
                entry.mode = mode;
                entry.distributed = Distributed::new(workload_resource(key, &entry.spec, mode));
                changed.push(key.clone());
            }
        }
    }

    fn delete_workload(
        &mut self,
        key: &Key,
        changed: &mut Vec<Changed>,
        touched: &mut HashMap<Key, Option<Service>>,
    ) {
        if let Some(old) = self.remove_workload(key) {
            self.touch_selecting(&old.spec, touched);
            changed.push(key.clone());
        }
    }

    fn remove_workload(&mut self, key: &Key) -> Option<WorkloadEntry> {
        let old = self.workloads.remove(key)?;
        if let Some(keys) = self.node_workloads.get_mut(&old.spec.node) {
            keys.remove(key);
            if keys.is_empty() {
                self.node_workloads.remove(&old.spec.node);
            }
        }
        for (k, v) in &old.spec.labels {
            let index = label_key(&old.spec.namespace, k, v);
            if let Some(keys) = self.workloads_by_label.get_mut(&index) {
                keys.remove(key);
                if keys.is_empty() {
                    self.workloads_by_label.remove(&index);
                }
            }
        }
        Some(old)
    }

    /// Marks the services whose selector picks `w` for resolving again.
    fn touch_selecting(&self, w: &Workload, touched: &mut HashMap<Key, Option<Service>>) {
        for (k, v) in &w.labels {
            let Some(candidates) = self.services_by_label.get(&label_key(&w.namespace, k, v))
            else {
                continue;
            };
            for key in candidates {
                let selects = match touched.get(key) {
                    Some(Some(new)) => new.selects(&w.labels),
                    _ => self
                        .services
                        .get(key)
                        .is_some_and(|e| e.spec.selects(&w.labels)),
                };
                if selects {
                    touched.entry(key.clone()).or_insert(None);
                }
            }
        }
    }

    fn index_service(&mut self, key: &Key, s: &Service) {
        if let Some((k, v)) = s.selector.iter().next() {
            self.services_by_label
                .entry(label_key(&s.namespace, k, v))
                .or_default()
                .insert(key.clone());
        }
    }

    fn unindex_service(&mut self, key: &Key, s: &Service) {
        if let Some((k, v)) = s.selector.iter().next() {
            let index = label_key(&s.namespace, k, v);
            if let Some(keys) = self.services_by_label.get_mut(&index) {
                keys.remove(key);
                if keys.is_empty() {
                    self.services_by_label.remove(&index);
                }
            }
        }
    }

    /// Resolves a service's endpoints and records it if what agents see changed.
    fn resolve(&mut self, key: Key, spec: Option<Service>, changed: &mut Vec<Changed>) {
        let old = self.services.remove(&key);
        let Some(spec) = spec.or_else(|| old.as_ref().map(|o| o.spec.clone())) else {
            return;
        };
        let endpoints = self.endpoints(&spec);
        let distributed = Distributed::new(service_resource(&key, &spec, &endpoints));
        if old
            .as_ref()
            .is_none_or(|o| o.distributed.version() != distributed.version())
        {
            changed.push(key.clone());
        }
        self.services
            .insert(key, ServiceEntry { spec, distributed });
    }

    /// Workloads a service selects, by name.
    fn endpoints(&self, s: &Service) -> Vec<&Workload> {
        let Some((k, v)) = s.selector.iter().next() else {
            return Vec::new();
        };
        let Some(candidates) = self.workloads_by_label.get(&label_key(&s.namespace, k, v)) else {
            return Vec::new();
        };
        let mut selected: Vec<&Workload> = candidates
            .iter()
            .filter_map(|key| self.workloads.get(key))
            .map(|e| &e.spec)
            .filter(|w| s.selects(&w.labels))
            .collect();
        selected.sort_by(|a, b| a.name.cmp(&b.name));
        selected
    }

    /// What every agent should hold under `key`.
    fn desired(&self, key: &str) -> Option<&Distributed> {
        if key.starts_with("Service/") {
            self.services.get(key).map(|e| &e.distributed)
        } else if key.starts_with("Workload/") {
            self.workloads.get(key).map(|e| &e.distributed)
        } else if key.starts_with("HTTPRoute/")
            || key.starts_with("GRPCRoute/")
            || key.starts_with("TrafficPolicy/")
        {
            self.attached.get(key)
        } else {
            self.others.get(key)
        }
    }
}

fn key_of(id: &ResourceId) -> Key {
    id.to_string().into()
}

fn policy_key<S: PolicySpec>(p: &Policy<S>) -> Key {
    key_of(&ResourceId {
        kind: S::KIND,
        namespace: p.namespace.clone(),
        name: p.name.clone(),
    })
}

/// Records `distributed` under `key`, and the key as changed if what agents
/// see changed.
fn put(
    map: &mut BTreeMap<Key, Distributed>,
    key: Key,
    distributed: Distributed,
    changed: &mut Vec<Changed>,
) {
    let old = map.insert(key.clone(), distributed);
    if old.is_none_or(|o| o.version() != map[&key].version()) {
        changed.push(key);
    }
}

fn label_key(namespace: &str, label: &str, value: &str) -> String {
    format!("{namespace}\0{label}\0{value}")
}

/// FNV-1a, 64 bit: a hash with a fixed definition, so versions computed by
/// another process of the same build agree.
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv64 {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn version_of(content: &impl Hash) -> String {
    let mut h = Fnv64::default();
    content.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn workload_resource(key: &str, w: &Workload, mode: MtlsMode) -> pb::Resource {
    pb::Resource {
        key: key.to_owned(),
        // The effective mode is sent, so it is part of the version.
        version: version_of(&(w, mode)),
        body: Some(pb::resource::Body::Workload(pb::Workload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            node: w.node.clone(),
            ip: w.ip.to_string(),
            labels: w.labels.clone().into_iter().collect(),
            ports: w
                .ports
                .iter()
                .map(|p| pb::WorkloadPort {
                    name: p.name.clone(),
                    port: u32::from(p.port),
                    protocol: p.protocol.as_str().to_owned(),
                })
                .collect(),
            ready: w.ready,
            mtls_mode: mode.as_str().to_owned(),
        })),
    }
}

fn node_resource(key: &str, n: &Node) -> pb::Resource {
    // Labels are not distributed, so they are not in the version.
    let content = (&n.name, n.address, n.tunnel_port);
    pb::Resource {
        key: key.to_owned(),
        version: version_of(&content),
        body: Some(pb::resource::Body::Node(pb::Node {
            name: n.name.clone(),
            tunnel_address: format!("{}:{}", n.address, n.tunnel_port),
        })),
    }
}

fn route_resource<S: RouteSpec>(key: &str, r: &Route<S>) -> pb::Resource {
    let spec_json = serde_json::to_string(&r.spec).expect("a route spec serializes");
    // Labels are not distributed, so they are not in the version.
    let content = (
        S::KIND,
        &r.namespace,
        &r.name,
        r.created_revision,
        &spec_json,
    );
    pb::Resource {
        key: key.to_owned(),
        version: version_of(&content),
        body: Some(pb::resource::Body::Route(pb::Route {
            kind: S::KIND.as_str().to_owned(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            created_revision: r.created_revision,
            spec_json,
        })),
    }
}

fn policy_resource<S: PolicySpec>(key: &str, p: &Policy<S>) -> pb::Resource {
    let spec_json = serde_json::to_string(&p.spec).expect("a policy spec serializes");
    // Labels are not distributed, so they are not in the version.
    let content = (
        S::KIND,
        &p.namespace,
        &p.name,
        p.created_revision,
        &spec_json,
    );
    pb::Resource {
        key: key.to_owned(),
        version: version_of(&content),
        body: Some(pb::resource::Body::Policy(pb::Policy {
            kind: S::KIND.as_str().to_owned(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            created_revision: p.created_revision,
            spec_json,
        })),
    }
}

fn service_resource(key: &str, s: &Service, endpoints: &[&Workload]) -> pb::Resource {
    // Metadata labels are not distributed, so they are not in the version.
    let content = (
        (&s.name, &s.namespace, &s.vips, &s.ports, &s.selector),
        endpoints
            .iter()
            .map(|w| (&w.name, w.ip, &w.node, w.ready))
            .collect::<Vec<_>>(),
    );
    pb::Resource {
        key: key.to_owned(),
        version: version_of(&content),
        body: Some(pb::resource::Body::Service(pb::Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            vips: s.vips.iter().map(ToString::to_string).collect(),
            ports: s
                .ports
                .iter()
                .map(|p| pb::ServicePort {
                    name: p.name.clone(),
                    port: u32::from(p.port),
                    target_port: u32::from(p.target_port),
                    app_protocol: p
                        .app_protocol
                        .map(|a| a.as_str().to_owned())
                        .unwrap_or_default(),
                    detect_timeout_ms: p.detect_timeout_ms.unwrap_or(0),
                })
                .collect(),
            selector: s.selector.clone().into_iter().collect(),
            endpoints: endpoints
                .iter()
                .map(|w| pb::Endpoint {
                    workload: w.name.clone(),
                    ip: w.ip.to_string(),
                    node: w.node.clone(),
                    ready: w.ready,
                })
                .collect(),
        })),
    }
}

/// One response's content, without its nonce.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    /// The revision this response completes; a response that is only part of
    /// a larger delta carries the previous one (empty before the first).
    pub system_version_info: String,
    /// Keys of `resources`, in order.
    pub keys: Vec<Arc<str>>,
    /// Each an encoded `DeltaResponse` holding just that resource.
    pub resources: Vec<Bytes>,
    pub removed_resources: Vec<String>,
    /// Encoded size of `resources` and `removed_resources`.
    pub bytes: usize,
}

impl Delta {
    /// The response on the wire: prost encodes the small fields, and the
    /// shared resource encodings follow as they are.
    pub fn encode(self, nonce: String) -> Vec<Bytes> {
        let head = pb::DeltaResponse {
            system_version_info: self.system_version_info,
            resources: Vec::new(),
            removed_resources: self.removed_resources,
            nonce,
        };
        std::iter::once(Bytes::from(head.encode_to_vec()))
            .chain(self.resources)
            .collect()
    }

    /// Adds what fits; the first entry always fits.
    fn try_add(&mut self, key: &Key, d: &Distributed) -> bool {
        self.fits(d.framed.len()) && {
            self.bytes += d.framed.len();
            self.keys.push(key.clone());
            self.resources.push(d.framed.clone());
            true
        }
    }

    fn try_remove(&mut self, key: &str) -> bool {
        let len = key.len() + 3;
        self.fits(len) && {
            self.bytes += len;
            self.removed_resources.push(key.to_owned());
            true
        }
    }

    fn fits(&self, len: usize) -> bool {
        self.bytes == 0 || self.bytes + len <= MAX_RESPONSE_BYTES
    }
}

/// The first sync of a stream: what differs from what the agent holds.
#[derive(Debug)]
struct InitialSync {
    have: HashMap<String, String>,
    removed: Vec<String>,
    /// Which ordered map is being sent: 0 the trust bundle, Nodes and
    /// AuthorizationPolicies, 1 Workloads, 2 Services, 3 routes and
    /// TrafficPolicies; keys up to `after` in it are done.
    part: usize,
    after: Option<Key>,
}

impl InitialSync {
    /// Fills `delta`; returns whether the sync is complete.
    fn fill(&mut self, view: &View, delta: &mut Delta) -> bool {
        while let Some(key) = self.removed.last() {
            if !delta.try_remove(key) {
                return false;
            }
            self.removed.pop();
        }
        while self.part < 4 {
            let start = self
                .after
                .as_deref()
                .map_or(Bound::Unbounded, Bound::Excluded);
            let range = (start, Bound::<&str>::Unbounded);
            let entries: Box<dyn Iterator<Item = (&Key, &Distributed)>> = match self.part {
                0 => Box::new(view.others.range::<str, _>(range)),
                1 => Box::new(
                    view.workloads
                        .range::<str, _>(range)
                        .map(|(k, e)| (k, &e.distributed)),
                ),
                2 => Box::new(
                    view.services
                        .range::<str, _>(range)
                        .map(|(k, e)| (k, &e.distributed)),
                ),
                _ => Box::new(view.attached.range::<str, _>(range)),
            };
            for (key, d) in entries {
                if self.have.get(&**key).map(String::as_str) != Some(d.version())
                    && !delta.try_add(key, d)
                {
                    return false;
                }
                self.after = Some(key.clone());
            }
            self.part += 1;
            self.after = None;
        }
        true
    }
}

#[derive(Debug)]
enum Work {
    Idle,
    Initial(Box<InitialSync>),
    Changes(VecDeque<Key>),
}

/// One agent's stream: what it holds, as far as the server knows, and what
/// is left to send it.
///
/// The agent holds the view at `queued_through` once everything queued is
/// sent. Agents apply what they can and name the resources they reject;
/// those are sent again when they next change. A response rejected whole
/// (naming nothing) is queued again and resent with the next change, so valid
/// changes that travelled with it are not lost. A removal may name a key the
/// agent never had (created and deleted while it was behind); agents ignore
/// those.
#[derive(Debug)]
pub struct Subscription {
    node: String,
    queued_through: u64,
    delivered: String,
    work: Work,
    /// Keys of responses rejected whole, resent with the next change.
    retry: Vec<Key>,
    /// Keys that changed outside the store's revisions (the trust bundle),
    /// to send as soon as the stream is idle.
    resend: Vec<Key>,
}

impl Subscription {
    /// A new stream of an agent of `node` that holds `have` (key -> version).
    pub fn new(node: &str, have: HashMap<String, String>, view: &View) -> Subscription {
        let mut removed: Vec<String> = have
            .keys()
            .filter(|k| view.desired(k).is_none())
            .cloned()
            .collect();
        removed.sort_unstable_by(|a, b| b.cmp(a));
        Subscription {
            node: node.to_owned(),
            queued_through: view.revision,
            delivered: String::new(),
            retry: Vec::new(),
            resend: Vec::new(),
            work: Work::Initial(Box::new(InitialSync {
                have,
                removed,
                part: 0,
                after: None,
            })),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The agent rejected a whole response: it still holds what it had
    /// before, so these keys go out again with the next change.
    pub fn retry_with_next_change(&mut self, keys: impl IntoIterator<Item = String>) {
        self.retry.extend(keys.into_iter().map(Key::from));
    }

    /// Sends `key` again, as it is in the view then: it changed without a
    /// new revision.
    pub fn resend(&mut self, key: &str) {
        if !self.resend.iter().any(|k| &**k == key) {
            self.resend.push(Key::from(key));
        }
    }

    /// The next response for this agent, or `None` when it is up to date
    /// with `view`. The first call always answers, even with nothing.
    pub fn next(&mut self, view: &View) -> Result<Option<Delta>, Lagged> {
        let mut delta = Delta::default();
        let done = match &mut self.work {
            Work::Initial(sync) => sync.fill(view, &mut delta),
            Work::Idle => {
                if view.revision <= self.queued_through && self.resend.is_empty() {
                    return Ok(None);
                }
                let mut keys = if view.revision > self.queued_through {
                    view.log.since(self.queued_through)?
                } else {
                    Vec::new()
                };
                keys.append(&mut self.resend);
                let mut seen: HashSet<Key> = keys.iter().cloned().collect();
                keys.extend(self.retry.drain(..).filter(|k| seen.insert(k.clone())));
                self.queued_through = view.revision;
                if keys.is_empty() {
                    return Ok(None);
                }
                self.work = Work::Changes(keys.into());
                return self.next(view);
            }
            Work::Changes(keys) => {
                while let Some(key) = keys.front() {
                    let added = match view.desired(key) {
                        Some(d) => delta.try_add(key, d),
                        None => delta.try_remove(key),
                    };
                    if !added {
                        break;
                    }
                    keys.pop_front();
                }
                keys.is_empty()
            }
        };
        if done {
            self.work = Work::Idle;
            self.delivered = self.queued_through.to_string();
        }
        delta.system_version_info = self.delivered.clone();
        Ok(Some(delta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::parse_documents;

    fn workload(name: &str, node: &str, ip: &str, app: &str) -> Resource {
        parse_documents(&format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec: {{node: {node}, ip: {ip}}}\n"
        ))
        .expect("valid")
        .remove(0)
    }

    fn service(name: &str, vip: &str, app: &str) -> Resource {
        parse_documents(&format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{vips: [{vip}], ports: [{{port: 80}}], selector: {{app: {app}}}}}\n"
        ))
        .expect("valid")
        .remove(0)
    }

    fn base() -> Vec<Resource> {
        vec![
            workload("a1", "n1", "198.18.1.1", "a"),
            workload("a2", "n2", "198.18.2.1", "a"),
            workload("b1", "n2", "198.18.2.2", "b"),
            service("a", "198.19.0.1", "a"),
            service("b", "198.19.0.2", "b"),
        ]
    }

    /// What an agent decodes.
    fn decode(delta: &Delta) -> pb::DeltaResponse {
        let wire: Vec<u8> = Delta {
            keys: delta.keys.clone(),
            resources: delta.resources.clone(),
            removed_resources: delta.removed_resources.clone(),
            system_version_info: delta.system_version_info.clone(),
            bytes: delta.bytes,
        }
        .encode("7".into())
        .concat();
        let response = pb::DeltaResponse::decode(wire.as_slice()).expect("valid protobuf");
        assert_eq!(response.nonce, "7");
        assert_eq!(response.system_version_info, delta.system_version_info);
        assert_eq!(response.removed_resources, delta.removed_resources);
        response
    }

    fn keys(delta: &Delta) -> Vec<String> {
        let decoded: Vec<String> = decode(delta).resources.into_iter().map(|r| r.key).collect();
        let listed: Vec<String> = delta.keys.iter().map(|k| k.to_string()).collect();
        assert_eq!(decoded, listed);
        decoded
    }

    fn endpoints(delta: &Delta, key: &str) -> Vec<String> {
        let r = decode(delta)
            .resources
            .into_iter()
            .find(|r| r.key == key)
            .unwrap_or_else(|| panic!("{key} not in {:?}", keys(delta)));
        let Some(pb::resource::Body::Service(s)) = &r.body else {
            panic!("not a service: {r:?}")
        };
        s.endpoints.iter().map(|e| e.workload.clone()).collect()
    }

    fn versions(delta: &Delta) -> HashMap<String, String> {
        decode(delta)
            .resources
            .into_iter()
            .map(|r| (r.key, r.version))
            .collect()
    }

    fn node(name: &str, address: &str) -> Resource {
        parse_documents(&format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{address: {address}}}\n"
        ))
        .expect("valid")
        .remove(0)
    }

    #[test]
    fn a_changed_trust_bundle_is_resent_without_a_new_revision() {
        let resources = base();
        let mut view = View::new(5, &resources, 100).with_trust_bundle("OLD");
        let mut sub = Subscription::new("n1", HashMap::new(), &view);
        sub.next(&view).expect("in log").expect("first sync");
        assert_eq!(sub.next(&view).expect("in log"), None, "up to date");
        let version = view.set_trust_bundle(pb::TrustBundle {
            pem: "OLD\nNEW".into(),
            ..pb::TrustBundle::default()
        });
        assert_eq!(view.trust_bundle_version(), Some(version.as_str()));
        assert_eq!(view.revision(), 5, "not a stored change");
        sub.resend(TRUST_BUNDLE_KEY);
        sub.resend(TRUST_BUNDLE_KEY);
        let delta = sub.next(&view).expect("in log").expect("the bundle");
        assert_eq!(keys(&delta), [TRUST_BUNDLE_KEY], "once");
        assert_eq!(delta.system_version_info, "5");
        assert_eq!(sub.next(&view).expect("in log"), None);
    }

    #[test]
    fn an_agent_gets_every_workload_service_node_and_the_trust_bundle() {
        let mut resources = base();
        resources.push(node("n1", "198.18.0.11"));
        let view = View::new(5, &resources, 100).with_trust_bundle("PEM");
        let mut sub = Subscription::new("n1", HashMap::new(), &view);
        let first = sub.next(&view).expect("in log").expect("first response");
        let mut got = keys(&first);
        got.sort_unstable();
        assert_eq!(
            got,
            [
                "Node//n1",
                "Service/default/a",
                "Service/default/b",
                TRUST_BUNDLE_KEY,
                "Workload/default/a1",
                "Workload/default/a2",
                "Workload/default/b1",
            ]
        );
        assert_eq!(endpoints(&first, "Service/default/a"), ["a1", "a2"]);
        let decoded = decode(&first);
        let body = |key: &str| {
            decoded
                .resources
                .iter()
                .find(|r| r.key == key)
                .and_then(|r| r.body.clone())
        };
        assert_eq!(
            body("Node//n1"),
            Some(pb::resource::Body::Node(pb::Node {
                name: "n1".into(),
                tunnel_address: "198.18.0.11:15008".into(),
            }))
        );
        assert_eq!(
            body(TRUST_BUNDLE_KEY),
            Some(pb::resource::Body::TrustBundle(pb::TrustBundle {
                pem: "PEM".into(),
                ..pb::TrustBundle::default()
            }))
        );
        assert_eq!(first.system_version_info, "5");
        assert_eq!(sub.next(&view).expect("in log"), None);
    }

    #[test]
    fn a_node_runs_the_identities_of_its_workloads_only() {
        let view = View::new(5, &base(), 100);
        assert!(view.runs_on("n1", "default", "default"));
        assert!(!view.runs_on("n1", "other", "default"));
        assert!(!view.runs_on("n3", "default", "default"));
        let mut view = view;
        let a1 = workload("a1", "n1", "198.18.1.1", "a").id();
        view.apply(6, &[Change::Delete(a1)]);
        assert!(!view.runs_on("n1", "default", "default"));
        assert!(view.runs_on("n2", "default", "default"));
    }

    #[test]
    fn node_changes_reach_every_agent() {
        let mut view = View::new(5, &base(), 100);
        let mut n1 = Subscription::new("n1", HashMap::new(), &view);
        n1.next(&view).unwrap();
        view.apply(6, &[Change::Put(node("n2", "198.18.0.12"))]);
        assert_eq!(keys(&n1.next(&view).unwrap().unwrap()), ["Node//n2"]);
        // The same content again changes nothing.
        view.apply(7, &[Change::Put(node("n2", "198.18.0.12"))]);
        assert_eq!(n1.next(&view).unwrap(), None);
        view.apply(8, &[Change::Delete(node("n2", "198.18.0.12").id())]);
        assert_eq!(
            n1.next(&view).unwrap().unwrap().removed_resources,
            ["Node//n2"]
        );
    }

    #[test]
    fn resubscribing_with_current_versions_gets_an_empty_first_response() {
        let view = View::new(5, &base(), 100);
        let mut sub = Subscription::new("n2", HashMap::new(), &view);
        let have = versions(&sub.next(&view).unwrap().unwrap());
        // The same configuration, rebuilt as after a restart.
        let rebuilt = View::new(5, &base(), 100);
        let mut again = Subscription::new("n2", have, &rebuilt);
        let first = again
            .next(&rebuilt)
            .unwrap()
            .expect("always a first response");
        assert!(first.resources.is_empty() && first.removed_resources.is_empty());
        assert_eq!(first.system_version_info, "5");
    }

    #[test]
    fn resubscribing_removes_what_is_gone_and_sends_what_changed() {
        let view = View::new(5, &base(), 100);
        let mut have = versions(
            &Subscription::new("n1", HashMap::new(), &view)
                .next(&view)
                .unwrap()
                .unwrap(),
        );
        have.insert("Service/default/gone".into(), "x".into());
        have.insert("Service/default/a".into(), "stale".into());
        let mut sub = Subscription::new("n1", have, &view);
        let first = sub.next(&view).unwrap().unwrap();
        assert_eq!(keys(&first), ["Service/default/a"]);
        assert_eq!(first.removed_resources, ["Service/default/gone"]);
    }

    #[test]
    fn a_new_endpoint_sends_the_service_and_the_workload_to_all() {
        let mut view = View::new(5, &base(), 100);
        let mut n1 = Subscription::new("n1", HashMap::new(), &view);
        let mut n2 = Subscription::new("n2", HashMap::new(), &view);
        let before = versions(&n1.next(&view).unwrap().unwrap());
        n2.next(&view).unwrap();

        view.apply(6, &[Change::Put(workload("a3", "n2", "198.18.2.3", "a"))]);
        for sub in [&mut n1, &mut n2] {
            let d = sub.next(&view).unwrap().expect("service and workload");
            let mut got = keys(&d);
            got.sort_unstable();
            assert_eq!(got, ["Service/default/a", "Workload/default/a3"]);
            assert_eq!(endpoints(&d, "Service/default/a"), ["a1", "a2", "a3"]);
            assert_ne!(
                versions(&d)["Service/default/a"],
                before["Service/default/a"]
            );
            assert_eq!(d.system_version_info, "6");
            assert_eq!(sub.next(&view).unwrap(), None);
        }
    }

    #[test]
    fn changes_that_alter_nothing_distributed_send_nothing() {
        let mut view = View::new(5, &base(), 100);
        let mut n1 = Subscription::new("n1", HashMap::new(), &view);
        n1.next(&view).unwrap();
        // Ports are not part of an endpoint: only the workload changes.
        let mut b1 = workload("b1", "n2", "198.18.2.2", "b");
        if let Resource::Workload(w) = &mut b1 {
            w.ports.push(crate::resources::WorkloadPort {
                name: String::new(),
                port: 8080,
                protocol: crate::resources::Protocol::Tcp,
            });
        }
        view.apply(6, &[Change::Put(b1)]);
        assert_eq!(
            keys(&n1.next(&view).unwrap().unwrap()),
            ["Workload/default/b1"]
        );
        // A Service's metadata labels are not distributed.
        let mut b = service("b", "198.19.0.2", "b");
        if let Resource::Service(s) = &mut b {
            s.labels.insert("team".into(), "x".into());
        }
        view.apply(7, &[Change::Put(b)]);
        assert_eq!(n1.next(&view).unwrap(), None);
    }

    #[test]
    fn changes_made_while_waiting_are_coalesced() {
        let mut view = View::new(5, &base(), 100);
        let mut n1 = Subscription::new("n1", HashMap::new(), &view);
        n1.next(&view).unwrap();
        view.apply(6, &[Change::Put(workload("a3", "n2", "198.18.2.3", "a"))]);
        view.apply(7, &[Change::Put(workload("a4", "n2", "198.18.2.4", "a"))]);
        let d = n1.next(&view).unwrap().unwrap();
        assert_eq!(endpoints(&d, "Service/default/a"), ["a1", "a2", "a3", "a4"]);
        assert_eq!(d.system_version_info, "7");
    }

    #[test]
    fn deletes_and_moves_become_removals() {
        let mut view = View::new(5, &base(), 100);
        let mut n1 = Subscription::new("n1", HashMap::new(), &view);
        let mut n2 = Subscription::new("n2", HashMap::new(), &view);
        n1.next(&view).unwrap();
        n2.next(&view).unwrap();
        // a1 moves from n1 to n2: everyone gets its new version.
        view.apply(6, &[Change::Put(workload("a1", "n2", "198.18.2.7", "a"))]);
        let d1 = n1.next(&view).unwrap().unwrap();
        assert!(d1.removed_resources.is_empty());
        let mut got = keys(&d1);
        got.sort_unstable();
        assert_eq!(got, ["Service/default/a", "Workload/default/a1"]);
        let d2 = n2.next(&view).unwrap().unwrap();
        assert!(keys(&d2).contains(&"Workload/default/a1".to_owned()));

        let id = service("b", "198.19.0.2", "b").id();
        view.apply(7, &[Change::Delete(id)]);
        assert_eq!(
            n1.next(&view).unwrap().unwrap().removed_resources,
            ["Service/default/b"]
        );
        let a2 = workload("a2", "n2", "198.18.2.1", "a").id();
        view.apply(8, &[Change::Delete(a2)]);
        assert_eq!(
            n1.next(&view).unwrap().unwrap().removed_resources,
            ["Workload/default/a2"]
        );
        // n2 has not asked since revision 6: both removals come together.
        let d2 = n2.next(&view).unwrap().unwrap();
        assert_eq!(
            d2.removed_resources,
            ["Service/default/b", "Workload/default/a2"]
        );
        assert_eq!(endpoints(&d2, "Service/default/a"), ["a1"]);
    }

    #[test]
    fn a_service_change_resolves_its_new_selector() {
        let mut view = View::new(5, &base(), 100);
        let mut n1 = Subscription::new("n1", HashMap::new(), &view);
        n1.next(&view).unwrap();
        view.apply(6, &[Change::Put(service("a", "198.19.0.1", "b"))]);
        let d = n1.next(&view).unwrap().unwrap();
        assert_eq!(endpoints(&d, "Service/default/a"), ["b1"]);
        // And the index follows: a new "b" workload lands in both.
        view.apply(7, &[Change::Put(workload("b2", "n1", "198.18.1.2", "b"))]);
        let d = n1.next(&view).unwrap().unwrap();
        assert_eq!(endpoints(&d, "Service/default/a"), ["b1", "b2"]);
        assert_eq!(endpoints(&d, "Service/default/b"), ["b1", "b2"]);
    }

    #[test]
    fn a_large_sync_is_cut_into_responses() {
        let many: Vec<Resource> = (0..4000)
            .map(|i| {
                service(
                    &format!("s{i}"),
                    &format!("198.19.{}.{}", i / 250, i % 250 + 1),
                    "x",
                )
            })
            .collect();
        let view = View::new(9, &many, 100);
        let mut sub = Subscription::new("n1", HashMap::new(), &view);
        let mut total = 0;
        let mut responses = Vec::new();
        while let Some(d) = sub.next(&view).unwrap() {
            assert!(d.bytes <= MAX_RESPONSE_BYTES);
            total += d.resources.len();
            responses.push(d.system_version_info);
        }
        assert_eq!(total, 4000);
        assert!(responses.len() > 1);
        assert!(
            responses[..responses.len() - 1]
                .iter()
                .all(String::is_empty)
        );
        assert_eq!(responses.last().map(String::as_str), Some("9"));
    }

    fn in_namespace(resource: Resource, namespace: &str) -> Resource {
        match resource {
            Resource::Workload(mut w) => {
                w.namespace = namespace.to_owned();
                Resource::Workload(w)
            }
            other => panic!("not a workload: {other:?}"),
        }
    }

    fn with_mode(resource: Resource, mode: MtlsMode) -> Resource {
        match resource {
            Resource::Workload(mut w) => {
                w.mtls_mode = Some(mode);
                Resource::Workload(w)
            }
            other => panic!("not a workload: {other:?}"),
        }
    }

    fn policy(name: &str, namespace: &str, mode: &str) -> Resource {
        parse_documents(&format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: MtlsPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{mode: {mode}}}\n"
        ))
        .expect("valid")
        .remove(0)
    }

    /// Effective mode of every workload in a response.
    fn modes(delta: &Delta) -> BTreeMap<String, String> {
        decode(delta)
            .resources
            .into_iter()
            .filter_map(|r| match r.body {
                Some(pb::resource::Body::Workload(w)) => Some((r.key, w.mtls_mode)),
                _ => None,
            })
            .collect()
    }

    /// Workloads in "default" and "shop"; "shop/s2" sets its own mode.
    fn namespaced() -> Vec<Resource> {
        let mut resources = base();
        resources.push(in_namespace(
            workload("s1", "n1", "198.18.1.21", "s"),
            "shop",
        ));
        resources.push(with_mode(
            in_namespace(workload("s2", "n2", "198.18.2.21", "s"), "shop"),
            MtlsMode::Disable,
        ));
        resources
    }

    #[test]
    fn workloads_are_strict_by_default_and_carry_their_own_mode() {
        let view = View::new(5, &namespaced(), 100);
        let mut sub = Subscription::new("n1", HashMap::new(), &view);
        let got = modes(&sub.next(&view).unwrap().unwrap());
        let want: BTreeMap<String, String> = [
            ("Workload/default/a1", "STRICT"),
            ("Workload/default/a2", "STRICT"),
            ("Workload/default/b1", "STRICT"),
            ("Workload/shop/s1", "STRICT"),
            ("Workload/shop/s2", "DISABLE"),
        ]
        .into_iter()
        .map(|(k, m)| (k.to_owned(), m.to_owned()))
        .collect();
        assert_eq!(got, want);
        // A policy in the stored configuration applies from the start.
        let mut resources = namespaced();
        resources.push(policy("default", "shop", "PERMISSIVE"));
        let view = View::new(5, &resources, 100);
        let got = modes(
            &Subscription::new("n1", HashMap::new(), &view)
                .next(&view)
                .unwrap()
                .unwrap(),
        );
        assert_eq!(got["Workload/shop/s1"], "PERMISSIVE");
        assert_eq!(got["Workload/shop/s2"], "DISABLE");
        assert_eq!(got["Workload/default/a1"], "STRICT");
    }

    #[test]
    fn a_namespace_policy_resends_exactly_the_workloads_whose_mode_changes() {
        let mut view = View::new(5, &namespaced(), 100);
        let mut n1 = Subscription::new("n1", HashMap::new(), &view);
        let mut n2 = Subscription::new("n2", HashMap::new(), &view);
        let before = versions(&n1.next(&view).unwrap().unwrap());
        n2.next(&view).unwrap();

        view.apply(6, &[Change::Put(policy("default", "shop", "permissive"))]);
        for sub in [&mut n1, &mut n2] {
            let d = sub.next(&view).unwrap().expect("the shop workload");
            // s2 keeps its own mode; other namespaces are untouched.
            assert_eq!(keys(&d), ["Workload/shop/s1"]);
            assert_eq!(modes(&d)["Workload/shop/s1"], "PERMISSIVE");
            assert_ne!(versions(&d)["Workload/shop/s1"], before["Workload/shop/s1"]);
            assert_eq!(d.system_version_info, "6");
            assert_eq!(sub.next(&view).unwrap(), None);
        }

        // The same policy again changes nothing sent.
        view.apply(7, &[Change::Put(policy("default", "shop", "PERMISSIVE"))]);
        assert_eq!(n1.next(&view).unwrap(), None);

        // A workload put later inherits it; one's own mode wins over it.
        view.apply(
            8,
            &[
                Change::Put(in_namespace(
                    workload("s3", "n1", "198.18.1.23", "s"),
                    "shop",
                )),
                Change::Put(with_mode(
                    in_namespace(workload("s1", "n1", "198.18.1.21", "s"), "shop"),
                    MtlsMode::Strict,
                )),
            ],
        );
        let d = n1.next(&view).unwrap().unwrap();
        let got = modes(&d);
        assert_eq!(got["Workload/shop/s3"], "PERMISSIVE");
        assert_eq!(got["Workload/shop/s1"], "STRICT");

        // Deleting the policy reverts the inheriting workloads to STRICT.
        view.apply(
            9,
            &[Change::Delete(policy("default", "shop", "STRICT").id())],
        );
        let d = n2.next(&view).unwrap().unwrap();
        let mut got = keys(&d);
        got.sort_unstable();
        // n2 last synced at 6: s1 (own STRICT) and s3 changed since then.
        assert_eq!(got, ["Workload/shop/s1", "Workload/shop/s3"]);
        assert!(modes(&d).values().all(|m| m == "STRICT"), "{:?}", modes(&d));
        let d = n1.next(&view).unwrap().unwrap();
        assert_eq!(keys(&d), ["Workload/shop/s3"]);
        assert_eq!(modes(&d)["Workload/shop/s3"], "STRICT");
        assert_eq!(n1.next(&view).unwrap(), None);
    }

    #[test]
    fn a_policy_and_its_workloads_in_one_batch_agree() {
        let mut view = View::new(5, &base(), 100);
        let mut n1 = Subscription::new("n1", HashMap::new(), &view);
        n1.next(&view).unwrap();
        // The workload comes first in the batch, the policy after it.
        view.apply(
            6,
            &[
                Change::Put(in_namespace(
                    workload("s1", "n1", "198.18.1.21", "s"),
                    "shop",
                )),
                Change::Put(policy("p", "shop", "DISABLE")),
            ],
        );
        let d = n1.next(&view).unwrap().unwrap();
        assert_eq!(keys(&d), ["Workload/shop/s1"]);
        assert_eq!(modes(&d)["Workload/shop/s1"], "DISABLE");
        // A rebuilt view (after a restart) sends the same version.
        let mut resources = base();
        resources.push(in_namespace(
            workload("s1", "n1", "198.18.1.21", "s"),
            "shop",
        ));
        resources.push(policy("p", "shop", "DISABLE"));
        let rebuilt = View::new(6, &resources, 100);
        let mut again = Subscription::new("n1", versions(&d), &rebuilt);
        let first = again.next(&rebuilt).unwrap().unwrap();
        assert!(
            !keys(&first).contains(&"Workload/shop/s1".to_owned()),
            "{:?}",
            keys(&first)
        );
    }

    fn http_route(name: &str, backend: &str, created: u64) -> Resource {
        let mut r = parse_documents(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: a, port: 80}}]\n  rules: [{{backendRefs: [{{name: {backend}, port: 80}}]}}]\n"
        ))
        .expect("valid")
        .remove(0);
        r.set_created_revision(created);
        r
    }

    fn route_body(delta: &Delta, key: &str) -> pb::Route {
        let r = decode(delta)
            .resources
            .into_iter()
            .find(|r| r.key == key)
            .unwrap_or_else(|| panic!("{key} not in {:?}", keys(delta)));
        let Some(pb::resource::Body::Route(route)) = r.body else {
            panic!("not a route: {r:?}")
        };
        route
    }

    #[test]
    fn routes_reach_every_agent_after_the_services_they_name() {
        let mut resources = base();
        resources.push(http_route("web", "b", 3));
        let grpc = parse_documents(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: rpc}\nspec: {parentRefs: [{group: '', kind: Service, name: b}]}\n",
        )
        .expect("valid")
        .remove(0);
        resources.push(grpc);
        let view = View::new(5, &resources, 100);
        for node in ["n1", "n2", "n3"] {
            let mut sub = Subscription::new(node, HashMap::new(), &view);
            let first = sub.next(&view).unwrap().unwrap();
            let got = keys(&first);
            assert_eq!(
                got[got.len() - 2..],
                ["GRPCRoute/default/rpc", "HTTPRoute/default/web"]
            );
            let route = route_body(&first, "HTTPRoute/default/web");
            assert_eq!(
                (
                    route.kind.as_str(),
                    route.namespace.as_str(),
                    route.name.as_str()
                ),
                ("HTTPRoute", "default", "web")
            );
            assert_eq!(route.created_revision, 3);
            let Resource::HttpRoute(want) = http_route("web", "b", 3) else {
                unreachable!()
            };
            let spec: mesh_api::gateway::HttpRouteSpec =
                serde_json::from_str(&route.spec_json).expect("the spec as JSON");
            assert_eq!(spec, want.spec);
            assert_eq!(
                route_body(&first, "GRPCRoute/default/rpc").kind,
                "GRPCRoute"
            );
            // Rebuilt after a restart, the view sends the same versions.
            let rebuilt = View::new(5, &resources, 100);
            let mut again = Subscription::new(node, versions(&first), &rebuilt);
            let first = again.next(&rebuilt).unwrap().unwrap();
            assert!(first.resources.is_empty() && first.removed_resources.is_empty());
        }
    }

    #[test]
    fn route_changes_and_deletes_reach_every_agent() {
        let mut resources = base();
        resources.push(http_route("web", "b", 3));
        let mut view = View::new(5, &resources, 100);
        let mut n1 = Subscription::new("n1", HashMap::new(), &view);
        let mut n2 = Subscription::new("n2", HashMap::new(), &view);
        let before = versions(&n1.next(&view).unwrap().unwrap());
        n2.next(&view).unwrap();

        // An update keeps the creation revision the store gave it.
        view.apply(6, &[Change::Put(http_route("web", "a", 3))]);
        for sub in [&mut n1, &mut n2] {
            let d = sub.next(&view).unwrap().expect("the route");
            assert_eq!(keys(&d), ["HTTPRoute/default/web"]);
            assert_ne!(
                versions(&d)["HTTPRoute/default/web"],
                before["HTTPRoute/default/web"]
            );
            let route = route_body(&d, "HTTPRoute/default/web");
            assert_eq!(route.created_revision, 3);
            assert!(
                route.spec_json.contains(r#""name":"a""#),
                "{}",
                route.spec_json
            );
            assert_eq!(sub.next(&view).unwrap(), None);
        }
        // The same content, or other labels, send nothing.
        let mut relabelled = http_route("web", "a", 3);
        if let Resource::HttpRoute(r) = &mut relabelled {
            r.labels.insert("team".into(), "x".into());
        }
        view.apply(7, &[Change::Put(relabelled)]);
        assert_eq!(n1.next(&view).unwrap(), None);

        view.apply(8, &[Change::Delete(http_route("web", "a", 3).id())]);
        for sub in [&mut n1, &mut n2] {
            let d = sub.next(&view).unwrap().expect("the removal");
            assert_eq!(d.removed_resources, ["HTTPRoute/default/web"]);
            assert!(d.resources.is_empty());
        }
        // An agent that still holds it after a restart of mesh-control is
        // told to drop it.
        let rebuilt = View::new(8, &base(), 100);
        let mut again = Subscription::new("n1", before, &rebuilt);
        let first = again.next(&rebuilt).unwrap().unwrap();
        assert_eq!(first.removed_resources, ["HTTPRoute/default/web"]);
        assert!(first.resources.is_empty());
    }

    fn traffic_policy(name: &str, attempts: u32, created: u64) -> Resource {
        let mut p = parse_documents(&format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {{name: a, port: 80}}\n  retries: {{attempts: {attempts}, budget: {{percent: 12.5}}}}\n  outlierDetection: {{consecutive5xxErrors: 2}}\n"
        ))
        .expect("valid")
        .remove(0);
        p.set_created_revision(created);
        p
    }

    fn policy_body(delta: &Delta, key: &str) -> pb::Policy {
        let r = decode(delta)
            .resources
            .into_iter()
            .find(|r| r.key == key)
            .unwrap_or_else(|| panic!("{key} not in {:?}", keys(delta)));
        let Some(pb::resource::Body::Policy(policy)) = r.body else {
            panic!("not a policy: {r:?}")
        };
        policy
    }

    #[test]
    fn traffic_policies_reach_every_agent_after_the_services_they_target() {
        let mut resources = base();
        resources.push(traffic_policy("a-retries", 2, 4));
        resources.push(http_route("web", "b", 3));
        let mut view = View::new(5, &resources, 100);
        let mut subs = Vec::new();
        for node in ["n1", "n2", "n3"] {
            let mut sub = Subscription::new(node, HashMap::new(), &view);
            let first = sub.next(&view).unwrap().unwrap();
            let got = keys(&first);
            assert_eq!(
                got[got.len() - 2..],
                ["HTTPRoute/default/web", "TrafficPolicy/default/a-retries"]
            );
            let policy = policy_body(&first, "TrafficPolicy/default/a-retries");
            assert_eq!(
                (
                    policy.kind.as_str(),
                    policy.namespace.as_str(),
                    policy.name.as_str(),
                    policy.created_revision
                ),
                ("TrafficPolicy", "default", "a-retries", 4)
            );
            let Resource::TrafficPolicy(want) = traffic_policy("a-retries", 2, 4) else {
                unreachable!()
            };
            let spec: mesh_api::traffic::TrafficPolicySpec =
                serde_json::from_str(&policy.spec_json).expect("the spec as JSON");
            assert_eq!(spec, want.spec);
            // Rebuilt after a restart, the view sends the same versions.
            let rebuilt = View::new(5, &resources, 100);
            let mut again = Subscription::new(node, versions(&first), &rebuilt);
            let resync = again.next(&rebuilt).unwrap().unwrap();
            assert!(resync.resources.is_empty() && resync.removed_resources.is_empty());
            subs.push((sub, versions(&first)));
        }

        // An update keeps the creation revision; other labels send nothing;
        // a delete is a removal.
        view.apply(6, &[Change::Put(traffic_policy("a-retries", 5, 4))]);
        for (sub, before) in &mut subs {
            let d = sub.next(&view).unwrap().expect("the policy");
            assert_eq!(keys(&d), ["TrafficPolicy/default/a-retries"]);
            let key = "TrafficPolicy/default/a-retries";
            assert_ne!(versions(&d)[key], before[key]);
            let policy = policy_body(&d, key);
            assert_eq!(policy.created_revision, 4);
            assert!(
                policy.spec_json.contains(r#""attempts":5"#),
                "{}",
                policy.spec_json
            );
        }
        let mut relabelled = traffic_policy("a-retries", 5, 4);
        if let Resource::TrafficPolicy(p) = &mut relabelled {
            p.labels.insert("team".into(), "x".into());
        }
        view.apply(7, &[Change::Put(relabelled)]);
        view.apply(8, &[Change::Delete(traffic_policy("a-retries", 5, 4).id())]);
        for (sub, _) in &mut subs {
            let d = sub.next(&view).unwrap().expect("the removal");
            assert_eq!(d.removed_resources, ["TrafficPolicy/default/a-retries"]);
            assert!(d.resources.is_empty());
        }
    }

    fn authorization_policy(name: &str, namespace: &str, action: &str, created: u64) -> Resource {
        let mut p = parse_documents(&format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  selector: {{matchLabels: {{app: b}}}}\n  action: {action}\n  rules: [{{from: [{{source: {{namespaces: [default]}}}}], to: [{{operation: {{ports: ['80']}}}}]}}]\n"
        ))
        .expect("valid")
        .remove(0);
        p.set_created_revision(created);
        p
    }

    #[test]
    fn authorization_policies_reach_every_agent_before_the_workloads() {
        let mut resources = base();
        resources.push(traffic_policy("a-retries", 2, 4));
        resources.push(authorization_policy("b-allow", "default", "ALLOW", 3));
        // The root namespace's policies are distributed as any other.
        resources.push(authorization_policy("deny", "mesh-system", "DENY", 5));
        let mut view = View::new(5, &resources, 100);
        let allow = "AuthorizationPolicy/default/b-allow";
        let mut subs = Vec::new();
        for node in ["n1", "n2", "n3"] {
            let mut sub = Subscription::new(node, HashMap::new(), &view);
            let first = sub.next(&view).unwrap().unwrap();
            let got = keys(&first);
            // Before any Workload, so an agent never holds a workload
            // without its policies, however the first sync is cut.
            assert_eq!(
                got[..3],
                [
                    allow,
                    "AuthorizationPolicy/mesh-system/deny",
                    "Workload/default/a1"
                ]
            );
            assert_eq!(got.last().unwrap(), "TrafficPolicy/default/a-retries");
            let policy = policy_body(&first, allow);
            assert_eq!(
                (
                    policy.kind.as_str(),
                    policy.namespace.as_str(),
                    policy.name.as_str(),
                    policy.created_revision
                ),
                ("AuthorizationPolicy", "default", "b-allow", 3)
            );
            let Resource::AuthorizationPolicy(want) =
                authorization_policy("b-allow", "default", "ALLOW", 3)
            else {
                unreachable!()
            };
            let spec: mesh_api::authz::AuthorizationPolicySpec =
                serde_json::from_str(&policy.spec_json).expect("the spec as JSON");
            assert_eq!(spec, want.spec);
            let root = policy_body(&first, "AuthorizationPolicy/mesh-system/deny");
            assert_eq!(root.namespace, "mesh-system");
            // Rebuilt after a restart, the view sends the same versions.
            let rebuilt = View::new(5, &resources, 100);
            let mut again = Subscription::new(node, versions(&first), &rebuilt);
            let resync = again.next(&rebuilt).unwrap().unwrap();
            assert!(resync.resources.is_empty() && resync.removed_resources.is_empty());
            subs.push((sub, versions(&first)));
        }

        // An update keeps the creation revision; other labels send nothing;
        // a delete is a removal.
        view.apply(
            6,
            &[Change::Put(authorization_policy(
                "b-allow", "default", "AUDIT", 3,
            ))],
        );
        for (sub, before) in &mut subs {
            let d = sub.next(&view).unwrap().expect("the policy");
            assert_eq!(keys(&d), [allow]);
            assert_ne!(versions(&d)[allow], before[allow]);
            let policy = policy_body(&d, allow);
            assert_eq!(policy.created_revision, 3);
            assert!(
                policy.spec_json.contains(r#""action":"AUDIT""#),
                "{}",
                policy.spec_json
            );
        }
        let mut relabelled = authorization_policy("b-allow", "default", "AUDIT", 3);
        if let Resource::AuthorizationPolicy(p) = &mut relabelled {
            p.labels.insert("team".into(), "x".into());
        }
        view.apply(7, &[Change::Put(relabelled)]);
        view.apply(
            8,
            &[Change::Delete(
                authorization_policy("b-allow", "default", "AUDIT", 3).id(),
            )],
        );
        for (sub, _) in &mut subs {
            let d = sub.next(&view).unwrap().expect("the removal");
            assert_eq!(d.removed_resources, [allow]);
            assert!(d.resources.is_empty());
        }
    }

    #[test]
    fn an_agent_behind_the_change_log_must_resubscribe() {
        let mut view = View::new(5, &base(), 2);
        let mut n1 = Subscription::new("n1", HashMap::new(), &view);
        n1.next(&view).unwrap();
        for (rev, i) in (6..).zip(3..6) {
            view.apply(
                rev,
                &[Change::Put(workload(
                    &format!("a{i}"),
                    "n2",
                    &format!("198.18.2.{i}"),
                    "a",
                ))],
            );
        }
        assert_eq!(n1.next(&view), Err(Lagged));
    }
}
