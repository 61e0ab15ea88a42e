//! `cargo xtask build-ebpf`: compiles the kernel programs with the nightly
//! toolchain and places the object where the agent looks for it.
use std::path::PathBuf;

use anyhow::Context;

use crate::deps;

pub use crate::cluster::workspace_root;

pub fn build() -> anyhow::Result<PathBuf> {
    let linker = deps::ensure_ebpf_toolchain()?;
    let root = workspace_root();
    // rustc finds `bpf-linker` on PATH: ours first.
    let path = linker.path_with_bin()?;
    deps::run(
        deps::nightly_command("cargo")
            .current_dir(&root)
            .env("PATH", path)
            .args([
                "build",
                "--package",
                "mesh-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
            ]),
    )?;
    let built = crate::cluster::target_dir().join("bpfel-unknown-none/release/mesh-ebpf");
    let dest = crate::cluster::default_bpf_object();
    std::fs::create_dir_all(dest.parent().expect("has a parent"))?;
    std::fs::copy(&built, &dest)
        .with_context(|| format!("copying {} to {}", built.display(), dest.display()))?;
    eprintln!("xtask: eBPF object at {}", dest.display());
    Ok(dest)
}
