//! Installs what building and testing need, saying what it installs, so a
//! fresh machine needs nothing by hand.
use std::process::Command;

use anyhow::{Context, bail};

/// Debian packages the eBPF build needs (bpf-linker links against LLVM 22).
pub const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Debian packages the cluster, tests and benchmarks use.
pub const RUN_PACKAGES: &[&str] = &[
    "iproute2", "bpftool", "curl", "tcpdump", "nginx", "haproxy", "wrk",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Everything `build-ebpf` needs: nightly rust-src and bpf-linker.
pub fn ensure_ebpf_toolchain() -> anyhow::Result<()> {
    ensure_rust_src()?;
    if bpf_linker_works() {
        return Ok(());
    }
    ensure_debian(BUILD_PACKAGES)?;
    eprintln!(
        "xtask: installing bpf-linker 0.13 (built against {LLVM_PREFIX}); this takes a few minutes"
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            "^0.13",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        // The build script looks for LLVM via LLVM_PREFIX; llvm-sys via its own variable.
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup (is it installed?)")?;
    let list = String::from_utf8_lossy(&installed.stdout);
    if installed.status.success() && list.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: installing the nightly toolchain's rust-src");
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

/// Installs the Debian packages of `pkgs` that are missing.
pub fn ensure_debian(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| !debian_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn debian_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The release binaries every cluster command runs: the agent, the control
/// server, meshctl and the test workloads.
pub fn build_release_binaries() -> anyhow::Result<()> {
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(crate::cluster::workspace_root())
            .args([
                "build",
                "--release",
                "-p",
                "mesh-agent",
                "-p",
                "mesh-tests",
                "--bins",
            ]),
    )
}

/// Everything a local cluster needs: packages, the eBPF object, the binaries.
pub fn prepare_cluster() -> anyhow::Result<()> {
    ensure_debian(RUN_PACKAGES)?;
    crate::ebpf::build()?;
    build_release_binaries()
}
