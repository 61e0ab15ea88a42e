//! `mesh-testapp`: the workload that pods of the local cluster run.
//!
//! `serve` runs the servers (TCP echo, sink, HTTP/1.1, h2c, gRPC, and an HTTP
//! echo server for L7 tests that describes each request in JSON); the client
//! modes exercise them through the mesh and print one JSON report on stdout.

pub mod client;
pub mod pattern;
pub mod server;

/// Code generated from `proto/testapp.proto`.
pub mod proto {
    tonic::include_proto!("mesh.testapp");
}
