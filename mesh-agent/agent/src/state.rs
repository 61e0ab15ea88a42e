//! The data path's view of the mesh: each configuration the agent accepts is
//! converted once into a typed, indexed [`State`] (workloads by IP and by
//! namespace/name, Services by VIP:port, nodes), and published as an
//! `Arc<State>` through a `watch` channel ([`StateRx`]). A connection reads
//! one snapshot, and nothing is parsed per connection.
//!
//! [`discovery`] subscribes to the control server and builds states;
//! [`services`] holds the VIP table and the endpoint choice.
pub mod discovery;
pub mod services;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use mesh_api::{
    identity::SpiffeId,
    kinds::MtlsMode,
    names::TRUST_BUNDLE_KEY,
    pb::{self, resource::Body},
};
use tokio::sync::watch;
use tracing::warn;

pub use services::{Backend, Endpoint, Lookup, ServiceTable};

use crate::{
    authz,
    proxy::http::{
        policy::{Policy, runtime::Registry},
        routes::RouteTable,
    },
};

/// The data path's handle on the newest state.
pub type StateRx = watch::Receiver<Arc<State>>;

/// What a state is built for: this agent.
#[derive(Clone, Debug)]
pub struct Context {
    /// This node's name: its workloads are local, the rest are reached
    /// through the tunnel.
    pub node: String,
    /// The agent's own address, which no Service may claim.
    pub agent_ip: Ipv4Addr,
    pub trust_domain: String,
    /// Every address of this node (its interfaces): the agent never opens a
    /// connection to one of them on a pod's behalf.
    pub node_addresses: BTreeSet<Ipv4Addr>,
    /// The node-wide balancer, breaker and outlier state every state
    /// attaches to.
    pub registry: Arc<Registry>,
}

/// A pod by namespace and name: how an enrolled pod is bound to its
/// Workload (and so to its identity).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodId {
    pub namespace: String,
    pub name: String,
}

impl PodId {
    pub fn of(pod: &mesh_api::admin::EnrolledPod) -> PodId {
        PodId {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        }
    }
}

impl std::fmt::Display for PodId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A workload of the mesh, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub service_account: String,
    /// Effective mode, as the control server resolved it.
    pub mtls_mode: MtlsMode,
    /// Its SPIFFE ID; `None` when namespace and service account do not make
    /// a valid one (it then cannot be tunnelled to or from).
    pub identity: Option<SpiffeId>,
    /// What AuthorizationPolicy selectors match.
    pub labels: BTreeMap<String, String>,
}

/// One accepted configuration.
#[derive(Debug, Default)]
pub struct State {
    pub version: String,
    /// The resources as distributed: what the disk cache and `/config` hold,
    /// and what a resubscription reports.
    pub resources: BTreeMap<String, pb::Resource>,
    pub services: ServiceTable,
    /// HTTPRoutes and GRPCRoutes, compiled, by the Service they attach to.
    pub routes: RouteTable,
    /// The AuthorizationPolicies that apply to each workload of this node,
    /// by its IP.
    authz: HashMap<Ipv4Addr, Vec<Arc<authz::Policy>>>,
    node: String,
    workloads: Vec<Workload>,
    by_ip: HashMap<Ipv4Addr, usize>,
    by_name: HashMap<(String, String), usize>,
    /// Node name -> its agent's tunnel address.
    nodes: HashMap<String, SocketAddrV4>,
    trust_bundle: Option<String>,
    /// This node's own addresses: its interfaces', its agent's, and its
    /// Node resource's tunnel address.
    own_addresses: BTreeSet<Ipv4Addr>,
}

impl State {
    /// Converts `resources` for `ctx`. A Service this agent cannot serve
    /// fails the whole build (discovery then rejects it by name); a Workload
    /// or Node whose address does not parse is left out, with a warning.
    pub fn build(
        version: String,
        resources: BTreeMap<String, pb::Resource>,
        ctx: &Context,
    ) -> Result<State, services::Error> {
        let services = ServiceTable::build(
            resources.values().filter_map(|r| match &r.body {
                Some(Body::Service(s)) => Some(s),
                _ => None,
            }),
            ctx.agent_ip,
        )?;
        let (routes, bad_routes) =
            RouteTable::build(resources.values().filter_map(|r| match &r.body {
                Some(Body::Route(route)) => Some(route),
                _ => None,
            }));
        for e in bad_routes {
            // The control server checked it: only one of another version
            // could send this.
            warn!(error = %e, "ignoring a route that does not compile");
        }
        let mut policies: HashMap<String, Vec<Arc<Policy>>> = HashMap::new();
        let mut authz_policies: Vec<Arc<authz::Policy>> = Vec::new();
        for r in resources.values() {
            if let Some(Body::Policy(p)) = &r.body
                && p.kind == mesh_api::traffic::TRAFFIC_POLICY_KIND
            {
                match Policy::compile(p) {
                    Ok(p) => policies
                        .entry(p.service.clone())
                        .or_default()
                        .push(Arc::new(p)),
                    Err(e) => {
                        warn!(key = %r.key, error = %e, "ignoring a TrafficPolicy that does not compile")
                    }
                }
            }
            if let Some(Body::Policy(p)) = &r.body
                && p.kind == mesh_api::authz::AUTHORIZATION_POLICY_KIND
            {
                match authz::Policy::compile(p) {
                    Ok(p) => authz_policies.push(Arc::new(p)),
                    // Only a control server of another version could send
                    // one that does not compile here: fail closed.
                    Err(e) => {
                        warn!(key = %r.key, error = %e, "an AuthorizationPolicy that does not compile here: denying what it selects");
                        authz_policies.push(Arc::new(authz::Policy::unreadable(p)));
                    }
                }
            }
        }
        let mut state = State {
            version,
            services,
            routes,
            node: ctx.node.clone(),
            own_addresses: ctx.node_addresses.clone(),
            ..State::default()
        };
        state.own_addresses.insert(ctx.agent_ip);
        // This node's own tunnel address counts as its own before any
        // Workload is read.
        for r in resources.values() {
            if let Some(Body::Node(n)) = &r.body
                && n.name == ctx.node
                && let Ok(addr) = n.tunnel_address.parse::<SocketAddrV4>()
            {
                state.own_addresses.insert(*addr.ip());
            }
        }
        for r in resources.values() {
            match &r.body {
                Some(Body::Node(n)) => match n.tunnel_address.parse() {
                    Ok(addr) => {
                        state.nodes.insert(n.name.clone(), addr);
                    }
                    Err(_) => {
                        warn!(key = %r.key, address = %n.tunnel_address, "ignoring a Node whose tunnel address is not ip:port")
                    }
                },
                Some(Body::Workload(w)) => match Workload::from_pb(w, &ctx.trust_domain) {
                    // The control server cannot know a node's own addresses
                    // (its pod gateway, its interfaces): a Workload claiming
                    // one would make the agent connect to itself.
                    Ok(w) if w.node == ctx.node && state.own_addresses.contains(&w.ip) => {
                        warn!(key = %r.key, ip = %w.ip, "ignoring a Workload whose IP is an address of this node")
                    }
                    Ok(w) => state.insert(w),
                    Err(why) => warn!(key = %r.key, "ignoring a Workload: {why}"),
                },
                Some(Body::TrustBundle(b)) if r.key == TRUST_BUNDLE_KEY => {
                    state.trust_bundle = Some(b.pem.clone());
                }
                _ => {}
            }
        }
        for w in state.workloads.iter().filter(|w| w.node == ctx.node) {
            let applying: Vec<Arc<authz::Policy>> = authz_policies
                .iter()
                .filter(|p| authz::applies_to(p, &w.namespace, &w.labels))
                .cloned()
                .collect();
            if !applying.is_empty() {
                state.authz.insert(w.ip, applying);
            }
        }
        let State {
            services,
            by_ip,
            workloads,
            ..
        } = &mut state;
        services.attach(&policies, &ctx.registry, |ip| {
            by_ip
                .get(&ip)
                .is_some_and(|i| workloads[*i].node == ctx.node)
        });
        state.resources = resources;
        Ok(state)
    }

    fn insert(&mut self, w: Workload) {
        let i = self.workloads.len();
        self.by_ip.insert(w.ip, i);
        self.by_name
            .insert((w.namespace.clone(), w.name.clone()), i);
        self.workloads.push(w);
    }

    /// Every Workload of the mesh (the control server sends them all).
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.iter()
    }

    /// The Workloads this node runs.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.iter().filter(|w| w.node == self.node)
    }

    /// The Workload that has `ip`.
    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|&i| &self.workloads[i])
    }

    /// `namespace/name` of the Workload that has `ip`, or empty: a bounded
    /// metric label, never the address.
    pub fn workload_name(&self, ip: Ipv4Addr) -> String {
        self.workload_by_ip(ip)
            .map(|w| format!("{}/{}", w.namespace, w.name))
            .unwrap_or_default()
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.by_name
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|&i| &self.workloads[i])
    }

    /// The Workload of this node that enrolled pod `pod` is.
    pub fn local_workload(&self, pod: &PodId) -> Option<&Workload> {
        self.workload(&pod.namespace, &pod.name)
            .filter(|w| w.node == self.node)
    }

    /// The AuthorizationPolicies that apply to the workload of this node at
    /// `ip` (none: every caller is allowed).
    pub fn authz_for(&self, ip: Ipv4Addr) -> &[Arc<authz::Policy>] {
        self.authz.get(&ip).map_or(&[], Vec::as_slice)
    }

    /// Whether `ip` is a Workload of this node.
    pub fn is_local(&self, ip: Ipv4Addr) -> bool {
        self.workload_by_ip(ip).is_some_and(|w| w.node == self.node)
    }

    /// This node's Workloads and what the kernel does with a connection
    /// into them that the agent did not open: a STRICT one is refused,
    /// any other is handed to the agent's inbound plaintext listener.
    pub fn inbound_modes(&self) -> BTreeMap<Ipv4Addr, u32> {
        self.local_workloads()
            .map(|w| {
                let mode = match w.mtls_mode {
                    MtlsMode::Strict => mesh_common::inbound::STRICT,
                    MtlsMode::Permissive | MtlsMode::Disable => mesh_common::inbound::JUDGE,
                };
                (w.ip, mode)
            })
            .collect()
    }

    /// Whether `ip` is one of this node's own addresses.
    pub fn is_own_address(&self, ip: Ipv4Addr) -> bool {
        self.own_addresses.contains(&ip)
    }

    /// Where `node`'s agent accepts tunnel connections (its Node resource).
    pub fn node_tunnel(&self, node: &str) -> Option<SocketAddrV4> {
        self.nodes.get(node).copied()
    }

    /// The mesh CA's trust bundle (PEM), once the control server sent it.
    pub fn trust_bundle(&self) -> Option<&str> {
        self.trust_bundle.as_deref()
    }
}

impl Workload {
    fn from_pb(w: &pb::Workload, trust_domain: &str) -> Result<Workload, String> {
        let ip =
            w.ip.parse()
                .map_err(|_| format!("its ip {:?} is not IPv4", w.ip))?;
        let identity = SpiffeId::new(trust_domain, &w.namespace, &w.service_account)
            .map_err(|e| warn!(workload = %w.name, namespace = %w.namespace, error = %e, "workload has no valid identity"))
            .ok();
        Ok(Workload {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            node: w.node.clone(),
            ip,
            service_account: w.service_account.clone(),
            mtls_mode: MtlsMode::from_wire(&w.mtls_mode),
            identity,
            labels: w.labels.clone().into_iter().collect(),
        })
    }
}

/// Builders for tests of the pure parts (planner, state) without a control
/// server.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub const TD: &str = "cluster.local";

    pub fn ctx(node: &str) -> Context {
        Context {
            node: node.into(),
            agent_ip: Ipv4Addr::new(198, 19, 1, 1),
            trust_domain: TD.into(),
            node_addresses: [Ipv4Addr::new(198, 18, 0, 11), Ipv4Addr::LOCALHOST].into(),
            registry: Default::default(),
        }
    }

    pub fn workload(name: &str, node: &str, ip: &str, mode: MtlsMode) -> pb::Resource {
        pb::Resource {
            key: format!("Workload/default/{name}"),
            version: "1".into(),
            body: Some(Body::Workload(pb::Workload {
                name: name.into(),
                namespace: "default".into(),
                node: node.into(),
                ip: ip.into(),
                service_account: name.into(),
                mtls_mode: mode.as_str().into(),
                ..pb::Workload::default()
            })),
        }
    }

    pub fn node(name: &str, tunnel: &str) -> pb::Resource {
        pb::Resource {
            key: format!("Node//{name}"),
            version: "1".into(),
            body: Some(Body::Node(pb::Node {
                name: name.into(),
                tunnel_address: tunnel.into(),
            })),
        }
    }

    /// A Service `name` on `vip:80` -> target port 7000 of `endpoints`
    /// (workload, ip, ready).
    pub fn service(name: &str, vip: &str, endpoints: &[(&str, &str, bool)]) -> pb::Resource {
        pb::Resource {
            key: format!("Service/default/{name}"),
            version: "1".into(),
            body: Some(Body::Service(pb::Service {
                name: name.into(),
                namespace: "default".into(),
                vips: vec![vip.into()],
                ports: vec![pb::ServicePort {
                    name: "tcp".into(),
                    port: 80,
                    target_port: 7000,
                    app_protocol: "tcp".into(),
                    detect_timeout_ms: 0,
                }],
                selector: Default::default(),
                endpoints: endpoints
                    .iter()
                    .map(|(w, ip, ready)| pb::Endpoint {
                        workload: (*w).into(),
                        ip: (*ip).into(),
                        node: String::new(),
                        ready: *ready,
                    })
                    .collect(),
            })),
        }
    }

    pub fn state(node: &str, resources: Vec<pb::Resource>) -> State {
        let resources = resources.into_iter().map(|r| (r.key.clone(), r)).collect();
        State::build("v1".into(), resources, &ctx(node)).expect("a valid state")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn indexes_workloads_nodes_and_the_trust_bundle() {
        let bundle = pb::Resource {
            key: TRUST_BUNDLE_KEY.into(),
            version: "1".into(),
            body: Some(Body::TrustBundle(pb::TrustBundle {
                pem: "PEM".into(),
                ..pb::TrustBundle::default()
            })),
        };
        let s = state(
            "node1",
            vec![
                workload("a", "node1", "198.19.1.11", MtlsMode::Strict),
                workload("b", "node1", "198.19.1.12", MtlsMode::Permissive),
                workload("c", "node2", "198.19.2.11", MtlsMode::Strict),
                workload("bad", "node2", "not-an-ip", MtlsMode::Strict),
                node("node2", "198.18.0.12:15008"),
                node("broken", "nowhere"),
                bundle,
            ],
        );
        assert_eq!(
            s.workloads().count(),
            3,
            "the Workload without an IPv4 is left out"
        );
        assert_eq!(
            s.workload_by_ip("198.19.2.11".parse().unwrap())
                .unwrap()
                .name,
            "c"
        );
        assert_eq!(
            s.workload("default", "b").unwrap().ip.to_string(),
            "198.19.1.12"
        );
        assert!(s.workload("other", "b").is_none());
        let pod = |name: &str| PodId {
            namespace: "default".into(),
            name: name.into(),
        };
        assert_eq!(s.local_workload(&pod("a")).unwrap().node, "node1");
        assert!(s.local_workload(&pod("c")).is_none(), "c runs on node2");
        let elsewhere = PodId {
            namespace: "other".into(),
            name: "a".into(),
        };
        assert!(
            s.local_workload(&elsewhere).is_none(),
            "same name, other namespace"
        );
        assert!(s.is_local("198.19.1.11".parse().unwrap()));
        assert!(!s.is_local("198.19.2.11".parse().unwrap()));
        assert_eq!(
            s.inbound_modes().into_iter().collect::<Vec<_>>(),
            [
                (
                    "198.19.1.11".parse::<Ipv4Addr>().unwrap(),
                    mesh_common::inbound::STRICT
                ),
                (
                    "198.19.1.12".parse::<Ipv4Addr>().unwrap(),
                    mesh_common::inbound::JUDGE
                )
            ],
            "this node's workloads only, STRICT refused and the rest judged"
        );
        assert_eq!(
            s.node_tunnel("node2"),
            Some("198.18.0.12:15008".parse().unwrap())
        );
        assert_eq!(s.node_tunnel("broken"), None);
        assert_eq!(s.trust_bundle(), Some("PEM"));
        assert_eq!(
            s.workload("default", "a")
                .unwrap()
                .identity
                .as_ref()
                .unwrap()
                .to_string(),
            "spiffe://cluster.local/ns/default/sa/a"
        );
    }

    #[test]
    fn a_local_workload_on_an_address_of_the_node_is_left_out() {
        let s = state(
            "node1",
            vec![
                workload("gateway", "node1", "198.19.1.1", MtlsMode::Strict),
                workload("fabric", "node1", "198.18.0.11", MtlsMode::Strict),
                workload("fine", "node1", "198.19.1.10", MtlsMode::Strict),
            ],
        );
        let names: Vec<&str> = s.workloads().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["fine"]);
    }

    #[test]
    fn a_service_the_agent_cannot_serve_fails_the_build() {
        let own = service("own", "198.19.1.1", &[]);
        let resources = [(own.key.clone(), own)].into_iter().collect();
        assert!(matches!(
            State::build("v".into(), resources, &ctx("node1")),
            Err(services::Error::AgentAddress { .. })
        ));
    }
}
