//! Well-known names, keys and ports: one definition for every process.

pub const API_VERSION: &str = "mesh.dev/v1alpha1";
pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// Where node agents' own identities live: `node-<node>` service accounts
/// here are theirs alone, so no Workload may take one.
pub const SYSTEM_NAMESPACE: &str = "mesh-system";
/// Prefix of a node agent's service account in [`SYSTEM_NAMESPACE`].
pub const NODE_SERVICE_ACCOUNT_PREFIX: &str = "node-";
/// The control server's own service account in [`SYSTEM_NAMESPACE`].
pub const CONTROL_SERVICE_ACCOUNT: &str = "mesh-control";
/// The agent's mTLS tunnel port unless a Node says otherwise.
pub const DEFAULT_TUNNEL_PORT: u16 = 15008;
/// Key of the distributed trust bundle.
pub const TRUST_BUNDLE_KEY: &str = "TrustBundle//mesh";
/// gRPC metadata on a rejected apply: the 1-based index of the document at
/// fault in the YAML stream, so a client that concatenated files can say
/// which file it came from.
pub const DOCUMENT_INDEX_METADATA: &str = "mesh-document-index";
/// The trust domain of SPIFFE IDs unless configured otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The agent's ports (DESIGN.md).
pub mod ports {
    pub const OUTBOUND: u16 = 15001;
    /// Nothing listens here: connects to unknown VIP ports are sent here and refused.
    pub const REFUSAL: u16 = 15002;
    /// Inside each pod's network namespace: connections into the pod that
    /// did not come through its agent are handed here and judged.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    pub const INBOUND_TUNNEL: u16 = 15008;
    pub const AGENT_TELEMETRY: u16 = 15020;
    pub const CONTROL_GRPC: u16 = 15012;
    pub const CONTROL_TELEMETRY: u16 = 15014;
}
