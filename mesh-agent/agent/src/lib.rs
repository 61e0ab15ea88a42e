//! The node agent. Its modules follow a connection:
//!
//! - [`redirect`]: the kernel programs that send an enrolled pod's connects
//!   to the agent, their maps, and the enrolment of pods;
//! - [`state`]: the typed configuration snapshot the data path reads, and
//!   the discovery client that keeps it current;
//! - [`proxy`]: the outbound listener, route planning, the mTLS tunnel to
//!   other agents, the inbound tunnel listener and the byte copy;
//! - [`authz`]: the AuthorizationPolicies, compiled, and the verdict on a
//!   connection or request;
//! - [`certs`]: the workload and node certificates the tunnel presents;
//!   [`revocation`]: the identities and nodes it refuses;
//! - [`telemetry`]: metrics and the connection table; [`tap`]: the live
//!   stream of requests and connections for `meshctl tap`; [`access_log`]:
//!   JSON lines of the Services that ask for them; [`trace`]: a span per
//!   hop, exported over OTLP;
//! - [`kernel_stats`]: the kernel's TCP statistics of the agent's
//!   connections, per destination; [`health`]: configuration, certificate
//!   and kernel program gauges;
//! - [`admin`]: the admin API for `meshctl`, `/metrics` and readiness;
//! - [`app`]: the wiring of `mesh-agent`.
pub mod access_log;
pub mod admin;
pub mod app;
pub mod authz;
pub mod certs;
pub mod health;
pub mod kernel_stats;
pub mod proxy;
pub mod redirect;
pub mod revocation;
pub mod state;
pub mod tap;
pub mod telemetry;
pub mod trace;
