//! Route planning for a redirected connection: a pure function over one
//! [`State`] snapshot. Given the source pod and the original destination it
//! decides where the connection goes (a Service endpoint, or the destination
//! itself) and how (straight, or through the tunnel as which identities), or
//! why it is refused. No sockets, no kernel: the outbound listener does the
//! I/O around it.
use std::net::{Ipv4Addr, SocketAddrV4};

use mesh_api::kinds::MtlsMode;

use super::tunnel::PoolKey;
use crate::{
    state::{Lookup, PodId, State},
    telemetry::ConnectionResult,
};

/// Where a connection goes and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `namespace/name` of the Service whose VIP was dialled, if one was.
    pub service: Option<String>,
    /// The address the connection is finally made to.
    pub dst: SocketAddrV4,
    pub via: Via,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A plain connection from the agent: the destination is on this node,
    /// outside the mesh, or in DISABLE (or PERMISSIVE, without an identity
    /// to present).
    Direct,
    /// A CONNECT stream to the destination node's agent, as `key.src`,
    /// expecting `key.dst`.
    Tunnel(PoolKey),
}

/// Why a connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is a Service VIP, but no Service owns that port")]
    UnknownServicePort(SocketAddrV4),
    #[error("Service {service} has no ready endpoint")]
    NoReadyEndpoint { service: String },
    #[error("destination {dst} needs mutual TLS, but this agent has no certificates")]
    NoTunnel { dst: SocketAddrV4 },
    #[error(
        "source pod {pod:?} has no Workload with a valid identity on this node, so no identity to tunnel with"
    )]
    NoSourceIdentity { pod: Option<PodId> },
    #[error("destination {dst} is Workload {workload}, which has no valid identity")]
    NoDestinationIdentity { dst: SocketAddrV4, workload: String },
    #[error("destination {dst} is on node {node}, whose tunnel address is unknown")]
    UnknownNode { dst: SocketAddrV4, node: String },
    #[error("destination {0} is {1}: the agent never connects there for a pod")]
    ForbiddenDestination(SocketAddrV4, &'static str),
}

impl Refusal {
    /// The `result` label of `mesh_agent_outbound_connections_total`.
    pub fn result(&self) -> ConnectionResult {
        match self {
            Refusal::UnknownServicePort(_) => ConnectionResult::UnknownServicePort,
            Refusal::NoReadyEndpoint { .. } => ConnectionResult::NoReadyEndpoint,
            Refusal::NoTunnel { .. }
            | Refusal::NoSourceIdentity { .. }
            | Refusal::NoDestinationIdentity { .. }
            | Refusal::UnknownNode { .. } => ConnectionResult::NoRoute,
            Refusal::ForbiddenDestination(..) => ConnectionResult::ForbiddenDestination,
        }
    }
}

/// Plans the connection of `src_pod` (the enrolled pod the kernel named,
/// if any: its Workload of the same namespace and name on this node is the
/// identity presented) to `orig_dst`. `has_tunnel`: whether this agent holds
/// certificates, without which nothing can be tunnelled.
pub fn plan(
    state: &State,
    src_pod: Option<&PodId>,
    orig_dst: SocketAddrV4,
    has_tunnel: bool,
) -> Result<Route, Refusal> {
    let (service, dst) = match state.services.lookup(orig_dst) {
        Lookup::Passthrough => (None, orig_dst),
        Lookup::UnknownPort => return Err(Refusal::UnknownServicePort(orig_dst)),
        Lookup::Service(backend) => match backend.pick() {
            Some(ep) => (Some(backend.service.clone()), ep.addr),
            None => {
                return Err(Refusal::NoReadyEndpoint {
                    service: backend.service.clone(),
                });
            }
        },
    };
    to_endpoint(state, src_pod, service, dst, has_tunnel)
}

/// How `src_pod` reaches `dst`, an address already chosen (a Service's
/// endpoint, or a pod's own address): straight, or through the tunnel as
/// which identities. HTTP requests, each with its own endpoint, come here
/// one by one.
pub fn to_endpoint(
    state: &State,
    src_pod: Option<&PodId>,
    service: Option<String>,
    dst: SocketAddrV4,
    has_tunnel: bool,
) -> Result<Route, Refusal> {
    if let Some(what) = forbidden(state, *dst.ip()) {
        return Err(Refusal::ForbiddenDestination(dst, what));
    }
    let route = |via| Route {
        service: service.clone(),
        dst,
        via,
    };
    let Some(dst_wl) = state.workload_by_ip(*dst.ip()) else {
        return Ok(route(Via::Direct));
    };
    if state.is_local(dst_wl.ip) || dst_wl.mtls_mode == MtlsMode::Disable {
        return Ok(route(Via::Direct));
    }
    let src_id = src_pod
        .and_then(|pod| state.local_workload(pod))
        .and_then(|w| w.identity.clone());
    let (true, Some(src_id)) = (has_tunnel, src_id) else {
        // Without an identity to present, only a PERMISSIVE destination may
        // be reached, in plaintext.
        return match (dst_wl.mtls_mode, has_tunnel) {
            (MtlsMode::Permissive, _) => Ok(route(Via::Direct)),
            (_, false) => Err(Refusal::NoTunnel { dst }),
            _ => Err(Refusal::NoSourceIdentity {
                pod: src_pod.cloned(),
            }),
        };
    };
    let dst_id = dst_wl
        .identity
        .clone()
        .ok_or_else(|| Refusal::NoDestinationIdentity {
            dst,
            workload: format!("{}/{}", dst_wl.namespace, dst_wl.name),
        })?;
    let peer = state
        .node_tunnel(&dst_wl.node)
        .ok_or_else(|| Refusal::UnknownNode {
            dst,
            node: dst_wl.node.clone(),
        })?;
    Ok(route(Via::Tunnel(PoolKey {
        src: src_id,
        peer,
        dst: dst_id,
    })))
}

/// Why the agent must not open a connection to `ip` for a pod, if so:
/// opened from the node, these would reach the node itself, not a pod.
pub fn forbidden(state: &State, ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() || ip.octets()[0] == 0 {
        Some("unspecified (this host)")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_broadcast() || ip.is_multicast() {
        Some("not a unicast address")
    } else if state.is_own_address(ip) {
        Some("an address of this node")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use mesh_api::identity::SpiffeId;

    use super::*;
    use crate::state::testing::*;

    const NODE2_TUNNEL: &str = "198.18.0.12:15008";

    /// node1 (this agent) runs `client` and `local`; node2 runs `strict`,
    /// `permissive`, `plain` (DISABLE); node3 runs `lost`, whose node has no
    /// Node resource.
    fn mesh() -> State {
        state(
            "node1",
            vec![
                workload("client", "node1", "198.19.1.10", MtlsMode::Strict),
                workload("local", "node1", "198.19.1.11", MtlsMode::Strict),
                workload("strict", "node2", "198.19.2.11", MtlsMode::Strict),
                workload("permissive", "node2", "198.19.2.12", MtlsMode::Permissive),
                workload("plain", "node2", "198.19.2.13", MtlsMode::Disable),
                workload("lost", "node3", "198.19.3.11", MtlsMode::Strict),
                node("node2", NODE2_TUNNEL),
                service("remote", "198.18.100.1", &[("strict", "198.19.2.11", true)]),
                service("near", "198.18.100.2", &[("local", "198.19.1.11", true)]),
                service("down", "198.18.100.3", &[("strict", "198.19.2.11", false)]),
            ],
        )
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn pod(name: &str) -> PodId {
        PodId {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new(TD, "default", sa).unwrap()
    }

    fn tunnel(src: &str, dst: &str) -> Via {
        Via::Tunnel(PoolKey {
            src: id(src),
            peer: addr(NODE2_TUNNEL),
            dst: id(dst),
        })
    }

    #[test]
    fn service_vip_to_an_endpoint_on_another_node_goes_through_the_tunnel() {
        let route = plan(&mesh(), Some(&pod("client")), addr("198.18.100.1:80"), true).unwrap();
        assert_eq!(
            route,
            Route {
                service: Some("default/remote".into()),
                dst: addr("198.19.2.11:7000"),
                via: tunnel("client", "strict"),
            }
        );
    }

    #[test]
    fn service_vip_to_an_endpoint_on_this_node_is_direct() {
        let route = plan(&mesh(), Some(&pod("client")), addr("198.18.100.2:80"), true).unwrap();
        assert_eq!(route.service.as_deref(), Some("default/near"));
        assert_eq!(route.dst, addr("198.19.1.11:7000"));
        assert_eq!(route.via, Via::Direct);
    }

    #[test]
    fn unknown_service_port_is_refused() {
        let err = plan(&mesh(), Some(&pod("client")), addr("198.18.100.1:81"), true).unwrap_err();
        assert_eq!(err, Refusal::UnknownServicePort(addr("198.18.100.1:81")));
        assert_eq!(err.result(), ConnectionResult::UnknownServicePort);
    }

    #[test]
    fn no_ready_endpoint_is_refused() {
        let err = plan(&mesh(), Some(&pod("client")), addr("198.18.100.3:80"), true).unwrap_err();
        assert_eq!(
            err,
            Refusal::NoReadyEndpoint {
                service: "default/down".into()
            }
        );
        assert_eq!(err.result(), ConnectionResult::NoReadyEndpoint);
    }

    #[test]
    fn same_node_pod_is_direct() {
        let route = plan(
            &mesh(),
            Some(&pod("client")),
            addr("198.19.1.11:8080"),
            true,
        )
        .unwrap();
        assert_eq!(route.via, Via::Direct);
        assert_eq!(route.dst, addr("198.19.1.11:8080"));
        assert_eq!(route.service, None);
    }

    #[test]
    fn other_node_pod_is_tunnelled_with_both_identities() {
        let route = plan(
            &mesh(),
            Some(&pod("client")),
            addr("198.19.2.11:8080"),
            true,
        )
        .unwrap();
        assert_eq!(route.via, tunnel("client", "strict"));
        assert_eq!(route.dst, addr("198.19.2.11:8080"));
    }

    #[test]
    fn disable_destination_is_direct_even_across_nodes() {
        let route = plan(
            &mesh(),
            Some(&pod("client")),
            addr("198.19.2.13:8080"),
            true,
        )
        .unwrap();
        assert_eq!(route.via, Via::Direct);
        let route = plan(&mesh(), None, addr("198.19.2.13:8080"), false).unwrap();
        assert_eq!(route.via, Via::Direct, "no identity is needed for DISABLE");
    }

    #[test]
    fn outside_the_mesh_passes_through() {
        let route = plan(&mesh(), Some(&pod("client")), addr("198.18.50.1:443"), true).unwrap();
        assert_eq!(
            route,
            Route {
                service: None,
                dst: addr("198.18.50.1:443"),
                via: Via::Direct
            }
        );
        let route = plan(&mesh(), None, addr("198.18.50.1:443"), false).unwrap();
        assert_eq!(route.via, Via::Direct);
    }

    #[test]
    fn permissive_destination_tunnels_with_an_identity_and_is_plain_without() {
        let dst = addr("198.19.2.12:8080");
        assert_eq!(
            plan(&mesh(), Some(&pod("client")), dst, true).unwrap().via,
            tunnel("client", "permissive")
        );
        assert_eq!(
            plan(&mesh(), Some(&pod("stranger")), dst, true)
                .unwrap()
                .via,
            Via::Direct
        );
        assert_eq!(plan(&mesh(), None, dst, false).unwrap().via, Via::Direct);
    }

    #[test]
    fn strict_destination_without_certificates_is_refused() {
        let err = plan(
            &mesh(),
            Some(&pod("client")),
            addr("198.19.2.11:8080"),
            false,
        )
        .unwrap_err();
        assert_eq!(
            err,
            Refusal::NoTunnel {
                dst: addr("198.19.2.11:8080")
            }
        );
        assert_eq!(err.result(), ConnectionResult::NoRoute);
    }

    #[test]
    fn strict_destination_from_a_pod_without_a_workload_is_refused() {
        let other_namespace = PodId {
            namespace: "other".into(),
            name: "client".into(),
        };
        for src in [
            None,
            Some(pod("stranger")),
            Some(pod("strict")),
            Some(other_namespace),
        ] {
            let err = plan(&mesh(), src.as_ref(), addr("198.19.2.11:8080"), true).unwrap_err();
            assert_eq!(
                err,
                Refusal::NoSourceIdentity { pod: src.clone() },
                "{src:?} is not a Workload of node1"
            );
        }
    }

    #[test]
    fn destination_node_without_a_tunnel_address_is_refused() {
        let err = plan(
            &mesh(),
            Some(&pod("client")),
            addr("198.19.3.11:8080"),
            true,
        )
        .unwrap_err();
        assert_eq!(
            err,
            Refusal::UnknownNode {
                dst: addr("198.19.3.11:8080"),
                node: "node3".into()
            }
        );
    }

    #[test]
    fn the_node_itself_is_never_a_destination() {
        let s = mesh();
        for (dst, what) in [
            ("0.0.0.0:8099", "unspecified (this host)"),
            ("0.1.2.3:80", "unspecified (this host)"),
            ("127.0.0.1:8099", "loopback"),
            ("127.9.9.9:80", "loopback"),
            ("169.254.169.254:80", "link-local"),
            ("224.0.0.1:80", "not a unicast address"),
            ("255.255.255.255:80", "not a unicast address"),
            ("198.18.0.11:8098", "an address of this node"),
            ("198.19.1.1:15020", "an address of this node"),
        ] {
            let err = plan(&s, Some(&pod("client")), addr(dst), true).unwrap_err();
            assert_eq!(err, Refusal::ForbiddenDestination(addr(dst), what), "{dst}");
            assert_eq!(err.result(), ConnectionResult::ForbiddenDestination);
        }
        // Another node's address is an ordinary destination outside the mesh.
        assert_eq!(
            plan(&s, Some(&pod("client")), addr("198.18.0.12:8098"), true)
                .unwrap()
                .via,
            Via::Direct
        );
    }

    #[test]
    fn the_own_node_tunnel_address_counts_as_its_own() {
        let s = state(
            "node2",
            vec![
                node("node2", NODE2_TUNNEL),
                node("node1", "198.18.0.11:15008"),
            ],
        );
        assert!(s.is_own_address("198.18.0.12".parse().unwrap()));
        assert!(matches!(
            plan(&s, None, addr("198.18.0.12:15008"), false),
            Err(Refusal::ForbiddenDestination(..))
        ));
    }

    #[test]
    fn round_robin_endpoint_choice_is_shared_across_plans() {
        let s = state(
            "node1",
            vec![service(
                "two",
                "198.18.100.9",
                &[("a", "198.18.60.1", true), ("b", "198.18.60.2", true)],
            )],
        );
        let picks: Vec<_> = (0..4)
            .map(|_| plan(&s, None, addr("198.18.100.9:80"), false).unwrap().dst)
            .collect();
        assert_eq!(
            picks,
            [
                addr("198.18.60.1:7000"),
                addr("198.18.60.2:7000"),
                addr("198.18.60.1:7000"),
                addr("198.18.60.2:7000")
            ]
        );
    }
}
