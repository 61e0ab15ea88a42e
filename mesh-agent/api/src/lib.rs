//! The contract every mesh process shares. The node agent (`mesh-agent`), the
//! control server (`mesh-control`) and the operator CLI (`meshctl`) each
//! depend on this crate and never on each other, so the compiler keeps the
//! agent free of server code.
//!
//! - [`pb`]: the generated control-plane gRPC API;
//! - [`gateway`]: the Gateway API route kinds (HTTPRoute, GRPCRoute) and
//!   their own checks; [`traffic`]: our TrafficPolicy (resilience);
//! - [`kinds`], [`names`]: resource kinds and enums, well-known names, keys
//!   and ports;
//! - [`identity`]: SPIFFE IDs, the CA, CSRs, the certificate store and the
//!   rustls configurations of mutual TLS;
//! - [`client`]: how agents and `meshctl` reach the control server;
//! - [`authz`]: our AuthorizationPolicy (Istio's meaning) and its checks;
//! - [`admin`]: the node agent's admin API (types and a blocking client);
//!   [`tap`]: the live stream `meshctl tap` reads from it;
//! - [`serve`]: the accept loop every listener runs; [`logging`].
pub mod admin;
pub mod authz;
#[cfg(feature = "grpc")]
pub mod client;
pub mod gateway;
#[cfg(feature = "grpc")]
pub mod identity;
pub mod kinds;
#[cfg(feature = "grpc")]
pub mod logging;
pub mod names;
#[cfg(feature = "grpc")]
pub mod pb;
#[cfg(feature = "grpc")]
pub mod serve;
pub mod tap;
pub mod traffic;
