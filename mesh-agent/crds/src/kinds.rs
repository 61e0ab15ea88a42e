//! The documents of the kinds that mesh-control reads field by field
//! (`parse_workload`, `parse_service`, `parse_node` and the MtlsPolicy arm
//! of its `resources` module): the same fields, types, defaults and bounds,
//! as schemas for the API server. Checks that need more than one field
//! (duplicate ports, reserved service accounts) stay the control server's.
use std::{collections::BTreeMap, net::Ipv4Addr};

use kube::CustomResource;
use mesh_api::kinds::{AppProtocol, MtlsMode, Protocol};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pod, or a host outside Kubernetes, that takes part in the mesh.
#[expect(
    clippy::duplicated_attributes,
    reason = "the lint takes two printcolumns of one type for a repeated attribute"
)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "Workload",
    doc = "A pod, or a host outside Kubernetes, that takes part in the mesh.",
    plural = "workloads",
    shortname = "wl",
    namespaced,
    category = "mesh",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "IP", type_ = "string", json_path = ".spec.ip")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Its identity's service account, in the Workload's namespace. Default
    /// `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub service_account: Option<String>,
    /// The node whose agent carries its connections.
    #[schemars(length(min = 1, max = 253))]
    pub node: String,
    pub ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<WorkloadPort>,
    /// Whether it takes traffic. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// Unset: its namespace's MtlsPolicy, else STRICT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls_mode: Option<MtlsMode>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Default TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// Virtual IPs and ports in front of the Workloads its selector matches.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "Service",
    doc = "Virtual IPs and ports in front of the Workloads its selector matches.",
    plural = "services",
    shortname = "msvc",
    namespaced,
    category = "mesh"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[schemars(length(min = 1))]
    pub vips: Vec<Ipv4Addr>,
    #[schemars(length(min = 1))]
    pub ports: Vec<ServicePort>,
    /// Labels a Workload must all have; empty selects none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Default: `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_port: Option<u16>,
    /// Unset: agents detect HTTP/1 and HTTP/2 per connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<AppProtocol>,
    /// How long agents wait for a client's first bytes (`50ms`, `1s`;
    /// 1ms to 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_timeout: Option<String>,
}

/// A node of the mesh: where its agent's mTLS tunnel listens.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "Node",
    doc = "A node of the mesh: where its agent's mTLS tunnel listens.",
    plural = "nodes",
    category = "mesh",
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.address")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    pub address: Ipv4Addr,
    /// Default 15008.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tunnel_port: Option<u16>,
}

/// The mTLS mode of a namespace's workloads that set none themselves; at
/// most one per namespace.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "MtlsPolicy",
    doc = "The mTLS mode of a namespace's workloads that set none themselves.",
    plural = "mtlspolicies",
    namespaced,
    category = "mesh",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsPolicySpec {
    pub mode: MtlsMode,
}
