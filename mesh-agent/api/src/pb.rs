//! Generated control-plane API (`proto/mesh/control/v1/control.proto`).
#![allow(clippy::all, clippy::pedantic)]

tonic::include_proto!("mesh.control.v1");
