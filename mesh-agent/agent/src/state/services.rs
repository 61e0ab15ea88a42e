//! Service virtual IPs and the choice of an endpoint behind them. Pure: built
//! from the distributed Services, read by the data path, no I/O.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_api::{kinds::AppProtocol, pb as api};

use crate::proxy::http::policy::{
    self, Policy,
    runtime::{self as rt, Attached, Candidate, Registry},
};

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("Service {service}: field vips: {value:?} is not an IPv4 address")]
    BadVip { service: String, value: String },
    #[error("Service {service}: vip {vip} is this agent's own address")]
    AgentAddress { service: String, vip: Ipv4Addr },
    #[error("Service {service}: field ports: {value} is not a port")]
    BadPort { service: String, value: u32 },
    #[error("Service {service}: endpoint {workload}: ip {value:?} is not an IPv4 address")]
    BadEndpoint {
        service: String,
        workload: String,
        value: String,
    },
    #[error("Services {first} and {second} both claim {addr}")]
    Conflict {
        first: String,
        second: String,
        addr: SocketAddrV4,
    },
}

/// One Service port: where connections to VIP:port may go.
#[derive(Debug)]
pub struct Backend {
    /// `namespace/name`
    pub service: String,
    /// The Service port (on the VIP).
    pub port: u16,
    /// Declared application protocol; `None`: detect per connection.
    pub app_protocol: Option<AppProtocol>,
    /// Protocol detection's wait for the client's first bytes, if the
    /// Service port sets one.
    pub detect_timeout: Option<Duration>,
    pub endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    /// Its TrafficPolicy, or the defaults.
    pub policy: Arc<Policy>,
    /// The node-wide balancer and breaker state of this Service port.
    pub attached: Attached,
    /// For the picks: readiness and locality, index-aligned with endpoints.
    candidates: Vec<Candidate>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub workload: String,
    pub addr: SocketAddrV4,
    pub ready: bool,
    /// On this node.
    pub local: bool,
}

impl Backend {
    /// The endpoint for one try of a request, by the policy's balancer:
    /// `hash` is the request's consistent-hash key, `tried` the endpoints
    /// earlier tries went to.
    pub fn pick_for_request(&self, hash: Option<u64>, tried: &[usize]) -> Option<usize> {
        rt::pick(&self.policy, &self.attached, &self.candidates, hash, tried)
    }

    fn attach(&mut self, policy: Arc<Policy>, registry: &Registry) {
        let addrs: Vec<SocketAddrV4> = self.endpoints.iter().map(|e| e.addr).collect();
        self.attached = registry.attach(&self.service, self.port, &addrs, &policy);
        self.policy = policy;
        self.candidates = self
            .endpoints
            .iter()
            .map(|e| Candidate {
                ready: e.ready,
                local: e.local,
            })
            .collect();
    }

    /// For TCP connections: round robin over ready endpoints, skipping those
    /// outlier detection ejected (unless all are); `None` when none is
    /// ready.
    pub fn pick(&self) -> Option<&Endpoint> {
        let now = rt::now_ns();
        let usable = |i: &usize| {
            self.endpoints[*i].ready
                && self
                    .attached
                    .stats
                    .get(*i)
                    .is_none_or(|s| !s.is_ejected(now))
        };
        let mut ready: Vec<usize> = (0..self.endpoints.len()).filter(usable).collect();
        if ready.is_empty() {
            ready = (0..self.endpoints.len())
                .filter(|i| self.endpoints[*i].ready)
                .collect();
        }
        if ready.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) % ready.len();
        self.endpoints.get(ready[n])
    }
}

/// What a redirected connection's original destination is.
#[derive(Debug)]
pub enum Lookup<'a> {
    Service(&'a Backend),
    /// A VIP, but no Service owns this port.
    UnknownPort,
    /// Not a Service address: carried to the destination as it is.
    Passthrough,
}

#[derive(Debug, Default)]
pub struct ServiceTable {
    by_addr: HashMap<SocketAddrV4, Backend>,
    /// (`namespace/name`, port) -> its first VIP's address: how routes name
    /// backends.
    by_name: HashMap<(String, u16), SocketAddrV4>,
    vips: BTreeSet<Ipv4Addr>,
}

impl ServiceTable {
    /// Builds the table, rejecting anything this agent cannot serve.
    pub fn build<'a>(
        services: impl IntoIterator<Item = &'a api::Service>,
        agent_ip: Ipv4Addr,
    ) -> Result<Self, Error> {
        let mut table = ServiceTable::default();
        for svc in services {
            let id = format!("{}/{}", svc.namespace, svc.name);
            let mut endpoints = Vec::with_capacity(svc.endpoints.len());
            for ep in &svc.endpoints {
                let ip: Ipv4Addr = ep.ip.parse().map_err(|_| Error::BadEndpoint {
                    service: id.clone(),
                    workload: ep.workload.clone(),
                    value: ep.ip.clone(),
                })?;
                endpoints.push((ep.workload.clone(), ip, ep.ready));
            }
            for vip in &svc.vips {
                let vip: Ipv4Addr = vip.parse().map_err(|_| Error::BadVip {
                    service: id.clone(),
                    value: vip.clone(),
                })?;
                if vip == agent_ip {
                    return Err(Error::AgentAddress { service: id, vip });
                }
                table.vips.insert(vip);
                for port in &svc.ports {
                    let (Ok(p), Ok(target)) =
                        (u16::try_from(port.port), u16::try_from(port.target_port))
                    else {
                        return Err(Error::BadPort {
                            service: id,
                            value: port.port.max(port.target_port),
                        });
                    };
                    if p == 0 || target == 0 {
                        return Err(Error::BadPort {
                            service: id,
                            value: 0,
                        });
                    }
                    let addr = SocketAddrV4::new(vip, p);
                    if let Some(existing) = table.by_addr.get(&addr) {
                        return Err(Error::Conflict {
                            first: existing.service.clone(),
                            second: id,
                            addr,
                        });
                    }
                    let endpoints = endpoints
                        .iter()
                        .map(|(workload, ip, ready)| Endpoint {
                            workload: workload.clone(),
                            addr: SocketAddrV4::new(*ip, target),
                            ready: *ready,
                            local: false,
                        })
                        .collect();
                    table.by_name.entry((id.clone(), p)).or_insert(addr);
                    let mut backend = Backend {
                        service: id.clone(),
                        port: p,
                        app_protocol: match port.app_protocol.as_str() {
                            "" => None,
                            other => {
                                Some(AppProtocol::from_loose(other).unwrap_or(AppProtocol::Tcp))
                            }
                        },
                        detect_timeout: (port.detect_timeout_ms > 0)
                            .then(|| Duration::from_millis(u64::from(port.detect_timeout_ms))),
                        endpoints,
                        next: AtomicUsize::new(0),
                        policy: Arc::new(Policy::default_for(&id)),
                        // Filled by the attach below.
                        attached: Attached::default(),
                        candidates: Vec::new(),
                    };
                    backend.attach(backend.policy.clone(), &Registry::default());
                    table.by_addr.insert(addr, backend);
                }
            }
        }
        Ok(table)
    }

    /// Gives every Service port its policy (the most specific of
    /// `policies`, by Service) and its node-wide runtime from `registry`,
    /// marking endpoints on this node by `is_local`; drops the runtimes of
    /// Service ports gone.
    pub fn attach(
        &mut self,
        policies: &HashMap<String, Vec<Arc<Policy>>>,
        registry: &Registry,
        is_local: impl Fn(Ipv4Addr) -> bool,
    ) {
        let mut live = HashSet::new();
        for b in self.by_addr.values_mut() {
            for e in &mut b.endpoints {
                e.local = is_local(*e.addr.ip());
            }
            let chosen = policies
                .get(&b.service)
                .and_then(|list| policy::choose(list, b.port))
                .cloned()
                .unwrap_or_else(|| Arc::new(Policy::default_for(&b.service)));
            b.attach(chosen, registry);
            live.insert((b.service.clone(), b.port));
        }
        registry.retain(&live);
    }

    pub fn lookup(&self, dst: SocketAddrV4) -> Lookup<'_> {
        match self.by_addr.get(&dst) {
            Some(b) => Lookup::Service(b),
            None if self.vips.contains(dst.ip()) => Lookup::UnknownPort,
            None => Lookup::Passthrough,
        }
    }

    /// Port `port` of Service `service` (`namespace/name`), as a route's
    /// backend names it.
    pub fn by_name(&self, service: &str, port: u16) -> Option<&Backend> {
        self.by_name
            .get(&(service.to_owned(), port))
            .and_then(|a| self.by_addr.get(a))
    }

    /// Every (VIP, port) some Service owns: what the kernel must know.
    pub fn addresses(&self) -> BTreeSet<SocketAddrV4> {
        self.by_addr.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, vip: &str, port: u32, eps: &[(&str, &str, bool)]) -> api::Service {
        api::Service {
            name: name.into(),
            namespace: "default".into(),
            vips: vec![vip.into()],
            ports: vec![api::ServicePort {
                name: "tcp".into(),
                port,
                target_port: 7000,
                app_protocol: "tcp".into(),
                detect_timeout_ms: 0,
            }],
            selector: Default::default(),
            endpoints: eps
                .iter()
                .map(|(w, ip, ready)| api::Endpoint {
                    workload: (*w).into(),
                    ip: (*ip).into(),
                    node: "n1".into(),
                    ready: *ready,
                })
                .collect(),
        }
    }

    const AGENT: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);

    #[test]
    fn round_robin_over_ready_endpoints_only() {
        let s = svc(
            "echo",
            "198.18.100.1",
            80,
            &[
                ("a", "198.19.1.11", true),
                ("b", "198.19.2.11", false),
                ("c", "198.19.3.11", true),
            ],
        );
        let t = ServiceTable::build([&s], AGENT).unwrap();
        let Lookup::Service(b) = t.lookup("198.18.100.1:80".parse().unwrap()) else {
            panic!("VIP:port must resolve to the Service");
        };
        let picks: Vec<_> = (0..4).map(|_| b.pick().unwrap().workload.clone()).collect();
        assert_eq!(picks, ["a", "c", "a", "c"]);
        assert_eq!(b.pick().unwrap().addr.port(), 7000, "target port is used");
    }

    #[test]
    fn no_ready_endpoint_picks_nothing() {
        let s = svc("echo", "198.18.100.1", 80, &[("a", "198.19.1.11", false)]);
        let t = ServiceTable::build([&s], AGENT).unwrap();
        let Lookup::Service(b) = t.lookup("198.18.100.1:80".parse().unwrap()) else {
            panic!()
        };
        assert!(b.pick().is_none());
    }

    #[test]
    fn unknown_port_on_a_vip_and_passthrough() {
        let s = svc("echo", "198.18.100.1", 80, &[]);
        let t = ServiceTable::build([&s], AGENT).unwrap();
        assert!(matches!(
            t.lookup("198.18.100.1:81".parse().unwrap()),
            Lookup::UnknownPort
        ));
        assert!(matches!(
            t.lookup("198.19.2.11:80".parse().unwrap()),
            Lookup::Passthrough
        ));
        assert_eq!(
            t.addresses().into_iter().collect::<Vec<_>>(),
            ["198.18.100.1:80".parse().unwrap()]
        );
    }

    #[test]
    fn rejects_what_the_agent_cannot_serve() {
        let own = svc("own", "198.19.1.1", 80, &[]);
        assert_eq!(
            ServiceTable::build([&own], AGENT).unwrap_err(),
            Error::AgentAddress {
                service: "default/own".into(),
                vip: AGENT
            }
        );
        let a = svc("a", "198.18.100.1", 80, &[]);
        let b = svc("b", "198.18.100.1", 80, &[]);
        assert!(matches!(
            ServiceTable::build([&a, &b], AGENT),
            Err(Error::Conflict { .. })
        ));
        let bad = svc("bad", "not-an-ip", 80, &[]);
        assert!(matches!(
            ServiceTable::build([&bad], AGENT),
            Err(Error::BadVip { .. })
        ));
        let port = svc("port", "198.18.100.2", 70000, &[]);
        assert!(matches!(
            ServiceTable::build([&port], AGENT),
            Err(Error::BadPort { value: 70000, .. })
        ));
    }
}
