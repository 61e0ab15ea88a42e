//! `cargo xtask crds`: renders the CRDs of our kinds from their Rust types
//! into deploy/crds (`--check`: only says whether the files there match).
//!
//! The generator is the `mesh-crds` binary, run as its own cargo build: as a
//! dependency of xtask it would bring mesh-api's `crd` feature into every
//! build that has xtask beside the agent (mesh-tests' dev-dependencies), and
//! cargo would rebuild the agent and the control server with it.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};

use crate::cluster::workspace_root;

/// Where the generated CRDs live.
pub fn dir() -> PathBuf {
    workspace_root().join("deploy").join("crds")
}

pub fn run(check: bool) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["run", "--quiet", "--release", "-p", "mesh-crds", "--"])
        .arg(if check { "check" } else { "write" })
        .arg(dir())
        .status()
        .context("running mesh-crds")?;
    if !status.success() {
        bail!("mesh-crds failed ({status})");
    }
    Ok(())
}
