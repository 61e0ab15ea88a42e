//! The mesh's node agent, control server and operator CLI, as modules of one
//! library. The module list follows a connection: the kernel redirect, the
//! workloads it belongs to, the proxy that carries it, and what we tell the
//! operator about it.
pub mod admin;
pub mod agent;
pub mod api;
pub mod cli;
pub mod control;
pub mod discovery;
pub mod identity;
pub mod lb;
pub mod proxy;
pub mod redirect;
pub mod telemetry;
pub mod workload;
