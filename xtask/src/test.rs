//! `cargo xtask test`: the whole suite, as CI runs it. Installs what is
//! missing, checks formatting and lints, builds the kernel programs and the
//! binaries, then runs every unit and end-to-end test.
use std::process::Command;

use anyhow::{Context, bail};

use crate::{cluster, deps, ebpf};

pub fn run(filter: Option<&str>) -> anyhow::Result<()> {
    require_root()?;
    deps::ensure_debian(deps::RUN_PACKAGES)?;
    deps::ensure_pip(deps::PIP_PACKAGES)?;
    let root = ebpf::workspace_root();
    let swept = cluster::sweep(false)?;
    if !swept.is_empty() {
        eprintln!("xtask: removed leftovers of earlier runs: {swept:?}");
    }
    step(
        "cargo fmt --check",
        cargo(&root).args(["fmt", "--all", "--check"]),
    )?;
    step(
        "cargo clippy",
        cargo(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    ebpf::build()?;
    eprintln!("xtask: == build binaries");
    deps::build_release_binaries()?;
    // mesh-crds on its own: beside the others, cargo would give their
    // mesh-api its `crd` feature and rebuild the agent and the control server.
    step(
        "cargo test -p mesh-crds",
        cargo(&root).args(["test", "--release", "-p", "mesh-crds"]),
    )?;
    let mut test = cargo(&root);
    test.args([
        "test",
        "--release",
        // Every test binary runs even after one fails, so one CI run
        // reports every failure.
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        "mesh-ebpf",
        "--exclude",
        "mesh-crds",
    ])
    .env("MESH_E2E_REQUIRED", "1");
    test.arg("--");
    if let Some(f) = filter {
        test.arg(f);
    }
    // Clusters are isolated from each other; two at a time fits two cores.
    test.arg("--test-threads=2");
    let result = step("cargo test", &mut test);
    let left = cluster::sweep(false).unwrap_or_default();
    if !left.is_empty() {
        eprintln!("xtask: tests left these behind (now removed): {left:?}");
    }
    result
}

fn cargo(root: &std::path::Path) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root);
    c
}

fn step(name: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: == {name}");
    let status = cmd.status().with_context(|| format!("running {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the suite attaches eBPF programs and creates network namespaces: run it as root");
    }
    Ok(())
}
