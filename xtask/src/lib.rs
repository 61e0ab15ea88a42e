//! `cargo xtask ...` as a library, so that end-to-end tests can drive the local
//! cluster the same way the CLI does.

pub mod admin;
pub mod bench;
pub mod cluster;
pub mod crds;
pub mod demo;
pub mod deps;
pub mod ebpf;
pub mod test;

/// The packages whose release binaries the cluster, tests and benchmarks run.
pub const RELEASE_PACKAGES: &[&str] = &["mesh-agent", "mesh-control", "meshctl", "mesh-tests"];
