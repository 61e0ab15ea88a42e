//! The resource kinds and the enums every process reads the same way: one
//! `Kind`, one `MtlsMode`, one `AppProtocol`, each with its wire spelling.
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Workload,
    Service,
    Node,
    MtlsPolicy,
    /// `gateway.networking.k8s.io/v1` HTTPRoute.
    HttpRoute,
    /// `gateway.networking.k8s.io/v1` GRPCRoute.
    GrpcRoute,
    /// Ours: resilience settings for a Service ([`crate::traffic`]).
    TrafficPolicy,
    /// Ours: who may call which workloads ([`crate::authz`]).
    AuthorizationPolicy,
}

impl Kind {
    /// Every kind, in the order documents list them.
    pub const ALL: [Kind; 8] = [
        Kind::Workload,
        Kind::Service,
        Kind::Node,
        Kind::MtlsPolicy,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::TrafficPolicy,
        Kind::AuthorizationPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Workload => "Workload",
            Kind::Service => "Service",
            Kind::Node => "Node",
            Kind::MtlsPolicy => "MtlsPolicy",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// A kind as operators type it: any case, singular, plural or short name.
    pub fn from_loose(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "workload" | "workloads" | "wl" => Some(Kind::Workload),
            "service" | "services" | "svc" => Some(Kind::Service),
            "node" | "nodes" | "no" => Some(Kind::Node),
            "mtlspolicy" | "mtlspolicies" => Some(Kind::MtlsPolicy),
            "httproute" | "httproutes" => Some(Kind::HttpRoute),
            "grpcroute" | "grpcroutes" => Some(Kind::GrpcRoute),
            "trafficpolicy" | "trafficpolicies" | "tp" => Some(Kind::TrafficPolicy),
            "authorizationpolicy" | "authorizationpolicies" | "ap" => {
                Some(Kind::AuthorizationPolicy)
            }
            _ => None,
        }
    }

    /// The apiVersion of its documents.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::HttpRoute | Kind::GrpcRoute => crate::gateway::GATEWAY_API_VERSION,
            _ => crate::names::API_VERSION,
        }
    }

    /// Cluster-scoped kinds have no namespace (an empty one in their key).
    pub fn is_cluster_scoped(self) -> bool {
        matches!(self, Kind::Node)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    Tcp,
    Http,
    Http2,
    Grpc,
}

impl AppProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Tcp => "tcp",
            AppProtocol::Http => "http",
            AppProtocol::Http2 => "http2",
            AppProtocol::Grpc => "grpc",
        }
    }
}

/// Who may connect into a workload: STRICT (only mTLS through the tunnel),
/// PERMISSIVE (mTLS or plaintext), DISABLE (plaintext; no tunnel).
#[cfg_attr(feature = "crd", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// The mesh's default.
    #[default]
    Strict,
    Permissive,
    Disable,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        }
    }

    /// A mode as operators write it: any case.
    pub fn from_loose(s: &str) -> Option<MtlsMode> {
        match s.to_ascii_uppercase().as_str() {
            "STRICT" => Some(MtlsMode::Strict),
            "PERMISSIVE" => Some(MtlsMode::Permissive),
            "DISABLE" => Some(MtlsMode::Disable),
            _ => None,
        }
    }

    /// What a workload gets: its own mode, else its namespace's policy, else
    /// STRICT.
    pub fn effective(own: Option<MtlsMode>, namespace: Option<MtlsMode>) -> MtlsMode {
        own.or(namespace).unwrap_or_default()
    }
}

impl MtlsMode {
    /// The mode as distributed (`Workload.mtls_mode`). Unset, from an older
    /// control server, means the mesh's default, STRICT.
    pub fn from_wire(s: &str) -> MtlsMode {
        MtlsMode::from_loose(s).unwrap_or_default()
    }
}

impl AppProtocol {
    /// An application protocol as operators and the wire write it.
    pub fn from_loose(s: &str) -> Option<AppProtocol> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(AppProtocol::Tcp),
            "http" | "http1" | "http/1.1" => Some(AppProtocol::Http),
            "http2" | "h2" | "h2c" => Some(AppProtocol::Http2),
            "grpc" => Some(AppProtocol::Grpc),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_spellings_round_trip() {
        for m in [MtlsMode::Strict, MtlsMode::Permissive, MtlsMode::Disable] {
            assert_eq!(MtlsMode::from_wire(m.as_str()), m);
        }
        assert_eq!(MtlsMode::from_wire(""), MtlsMode::Strict);
        for p in [
            AppProtocol::Tcp,
            AppProtocol::Http,
            AppProtocol::Http2,
            AppProtocol::Grpc,
        ] {
            assert_eq!(AppProtocol::from_loose(p.as_str()), Some(p));
        }
        assert_eq!(AppProtocol::from_loose("smtp"), None);
        for k in Kind::ALL {
            assert_eq!(Kind::from_loose(k.as_str()), Some(k));
        }
    }
}
