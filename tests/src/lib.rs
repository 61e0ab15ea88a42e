//! Helpers for the end-to-end tests of the mesh.

pub mod testapp;
