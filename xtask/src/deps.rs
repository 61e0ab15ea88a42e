//! Installs what building and testing need, saying what it installs, so a
//! fresh machine needs nothing by hand. Every fact about the machine's set-up
//! lives here: the packages, the bpf-linker version and how it is matched to
//! the nightly toolchain that compiles the kernel programs.
//!
//! The machine image's nightly changes under us (LLVM 22 became LLVM 23), and
//! bpf-linker must read the bitcode that nightly writes. So bpf-linker is not
//! built against a distribution LLVM: it is built against the `libLLVM` the
//! nightly ships in its own `lib/`, into a root of ours, stamped with the
//! nightly it was built for, and checked with a trial link before each use.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, bail};

/// Debian packages the cluster, tests and benchmarks use (`nghttp2-client`:
/// h2load, the h2c load of `bench http`; `postgresql`: a server and pgbench,
/// a binary protocol no one here wrote; `protobuf-compiler`: protoc, which
/// the etcd-client crate's build runs; `etcd-server`: the store of
/// `mesh-control --store etcd://`, its tests and `bench control --store etcd`).
pub const RUN_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "curl",
    "tcpdump",
    "nftables",
    "nginx",
    "haproxy",
    "wrk",
    "nghttp2-client",
    "postgresql",
    "protobuf-compiler",
    "etcd-server",
];

/// oha, the fixed-rate HTTP load generator of `bench http` (open loop, with
/// latency correction; HTTP/1.1 and h2c): from crates.io, in a root of ours.
const OHA_VERSION: &str = "~1.16";
const OHA_VERSION_PREFIX: &str = "oha 1.16.";

/// PyPI packages the tests use (clients no one here wrote): (package,
/// module to import).
pub const PIP_PACKAGES: &[(&str, &str)] = &[("grpcio", "grpc")];

/// Installs the PyPI packages of `pkgs` that `python3` cannot import.
pub fn ensure_pip(pkgs: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .filter(|(_, module)| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing PyPI packages: {}", missing.join(" "));
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(&missing))
}

/// The bpf-linker release line we build, and the LLVM majors it supports
/// (each one a cargo feature `llvm-<major>`).
const BPF_LINKER_VERSION: &str = "^0.13";
const BPF_LINKER_LLVM_MAJORS: &[u32] = &[21, 22, 23];

/// The nightly toolchain that compiles `mesh-ebpf`, as the machine has it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nightly {
    /// `rustc +nightly -vV`, whole: the stamp a bpf-linker build is tied to.
    pub version: String,
    pub llvm_major: u32,
    /// The toolchain's shared LLVM (`lib/libLLVM.so.<major>.<minor>-rust-...`).
    pub libllvm: PathBuf,
}

impl Nightly {
    pub fn detect() -> anyhow::Result<Nightly> {
        let out = nightly_command("rustc")
            .arg("-vV")
            .output()
            .context("running `rustc +nightly -vV` (is rustup installed?)")?;
        if !out.status.success() {
            bail!(
                "the nightly toolchain is needed to compile the kernel programs, and `rustc +nightly -vV` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let version = String::from_utf8_lossy(&out.stdout).into_owned();
        let llvm_major = parse_llvm_major(&version)?;
        let out = nightly_command("rustc")
            .args(["--print", "sysroot"])
            .output()
            .context("running `rustc +nightly --print sysroot`")?;
        let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let libllvm = find_libllvm(&sysroot.join("lib"), llvm_major)?;
        Ok(Nightly {
            version,
            llvm_major,
            libllvm,
        })
    }

    /// The `release:` line, for messages.
    pub fn release(&self) -> &str {
        self.version
            .lines()
            .find_map(|l| l.strip_prefix("release: "))
            .unwrap_or("unknown")
    }
}

/// The LLVM major version from `rustc -vV` output (`LLVM version: 23.1.0`).
pub fn parse_llvm_major(rustc_vv: &str) -> anyhow::Result<u32> {
    let line = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no `LLVM version:` line")?;
    line.split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("cannot read an LLVM major version from {line:?}"))
}

/// The soname file of the toolchain's LLVM in `lib`: `libLLVM.so.<major>.*`,
/// else `libLLVM-<major>*.so`.
pub fn find_libllvm(lib: &Path, major: u32) -> anyhow::Result<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let soname = format!("libLLVM.so.{major}.");
    let plain = format!("libLLVM-{major}");
    names
        .iter()
        .find(|n| n.starts_with(&soname))
        .or_else(|| names.iter().find(|n| n.starts_with(&plain) && n.ends_with(".so")))
        .map(|n| lib.join(n))
        .with_context(|| {
            format!(
                "the nightly toolchain ships no LLVM {major} shared library in {} (looked for {soname}* and {plain}*.so)",
                lib.display()
            )
        })
}

/// A command run with the nightly toolchain, whatever toolchain the outer
/// `cargo xtask` runs under.
pub fn nightly_command(program: &str) -> Command {
    let mut c = Command::new(program);
    c.arg("+nightly")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO");
    c
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// Our bpf-linker install: its own root, so a bpf-linker on PATH that
/// someone else installed is neither used nor replaced.
pub struct BpfLinker {
    root: PathBuf,
}

impl Default for BpfLinker {
    fn default() -> Self {
        BpfLinker {
            root: cargo_home().join("mesh-bpf-linker"),
        }
    }
}

impl BpfLinker {
    pub fn bin_dir(&self) -> PathBuf {
        self.root.join("bin")
    }

    /// `PATH` with our bin directory first.
    pub fn path_with_bin(&self) -> anyhow::Result<std::ffi::OsString> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        Ok(std::env::join_paths(
            std::iter::once(self.bin_dir()).chain(std::env::split_paths(&path)),
        )?)
    }

    fn binary(&self) -> PathBuf {
        self.bin_dir().join("bpf-linker")
    }

    fn stamp(&self) -> PathBuf {
        self.root.join("built-for-nightly.txt")
    }

    /// A prefix that looks like an LLVM install to bpf-linker's build
    /// script: `lib/libLLVM.so` and the soname, linked to the toolchain's
    /// library. The binary's rpath points here.
    fn llvm_prefix(&self) -> PathBuf {
        self.root.join("llvm")
    }

    /// Why the installed bpf-linker cannot link for `nightly`, or `None`
    /// when it can (checked with a trial link).
    pub fn unusable(&self, nightly: &Nightly) -> Option<String> {
        if !self.binary().exists() {
            return Some(format!("it is not installed in {}", self.root.display()));
        }
        match std::fs::read_to_string(self.stamp()) {
            Ok(s) if s == nightly.version => {}
            Ok(s) => {
                let was = s
                    .lines()
                    .find_map(|l| l.strip_prefix("release: "))
                    .map_or("another nightly".to_owned(), |r| format!("nightly {r}"));
                return Some(format!(
                    "it was built for {was}, and the machine's nightly is now {} (LLVM {})",
                    nightly.release(),
                    nightly.llvm_major
                ));
            }
            Err(_) => return Some("it carries no record of the nightly it was built for".into()),
        }
        match Command::new(self.binary()).arg("--version").output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Some(format!(
                    "it fails to start: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            Err(e) => return Some(format!("it fails to start: {e}")),
        }
        trial_link(&self.binary(), nightly)
            .err()
            .map(|e| format!("a trial link failed: {e:#}"))
    }

    /// Builds bpf-linker against `nightly`'s LLVM.
    pub fn install(&self, nightly: &Nightly) -> anyhow::Result<()> {
        if !BPF_LINKER_LLVM_MAJORS.contains(&nightly.llvm_major) {
            bail!(
                "the nightly toolchain ({}) uses LLVM {}, and bpf-linker {BPF_LINKER_VERSION} supports LLVM {BPF_LINKER_LLVM_MAJORS:?}",
                nightly.release(),
                nightly.llvm_major
            );
        }
        let lib = self.llvm_prefix().join("lib");
        let _ = std::fs::remove_dir_all(self.llvm_prefix());
        std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
        let soname = nightly.libllvm.file_name().context("libLLVM has a name")?;
        for link in [std::ffi::OsStr::new("libLLVM.so"), soname] {
            std::os::unix::fs::symlink(&nightly.libllvm, lib.join(link))
                .with_context(|| format!("linking {}", lib.join(link).display()))?;
        }
        let _ = std::fs::remove_file(self.stamp());
        let feature = format!("llvm-{}", nightly.llvm_major);
        let started = Instant::now();
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--force", "--version"])
            .arg(BPF_LINKER_VERSION)
            .args(["--no-default-features", "--features", &feature, "--root"])
            .arg(&self.root)
            .env("LLVM_PREFIX", self.llvm_prefix())
            // Only so that cargo does not advise adding our root to PATH:
            // the eBPF build puts it there itself.
            .env("PATH", self.path_with_bin()?)
            // The outer `cargo xtask` may have set these for its own build.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC"))?;
        std::fs::write(self.stamp(), &nightly.version)
            .with_context(|| format!("writing {}", self.stamp().display()))?;
        eprintln!(
            "xtask: bpf-linker built against {} in {:.0?}",
            nightly.libllvm.display(),
            started.elapsed()
        );
        Ok(())
    }
}

/// The oha binary, installed (`cargo install --locked`) if it is missing or
/// another version.
pub fn ensure_oha() -> anyhow::Result<PathBuf> {
    let root = cargo_home().join("mesh-oha");
    let bin = root.join("bin").join("oha");
    let installed = || {
        Command::new(&bin).arg("--version").output().is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with(OHA_VERSION_PREFIX)
        })
    };
    if installed() {
        return Ok(bin);
    }
    eprintln!(
        "xtask: installing oha {OHA_VERSION} (fixed-rate HTTP load) into {}; a few minutes, once",
        root.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "oha",
            "--locked",
            "--version",
            OHA_VERSION,
            "--root",
        ])
        .arg(&root)
        // The outer `cargo xtask` may have set these for its own build.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC"))?;
    if !installed() {
        bail!(
            "{} does not report {OHA_VERSION_PREFIX}* after installing it",
            bin.display()
        );
    }
    Ok(bin)
}

/// Compiles a tiny `no_std` program to bitcode with the nightly and links it
/// for BPF: the check that bpf-linker reads what this nightly writes.
fn trial_link(bpf_linker: &Path, nightly: &Nightly) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("mesh-bpf-trial-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let src = dir.join("trial.rs");
        std::fs::write(
            &src,
            "#![no_std]\n#[unsafe(no_mangle)]\npub extern \"C\" fn trial(x: u32) -> u32 { x.wrapping_add(1) }\n",
        )?;
        let bc = dir.join("trial.bc");
        let out = nightly_command("rustc")
            .args([
                "--crate-type=lib",
                "--emit=llvm-bc",
                "-C",
                "panic=abort",
                "-C",
                "opt-level=2",
                "-o",
            ])
            .arg(&bc)
            .arg(&src)
            .output()
            .context("running rustc +nightly")?;
        if !out.status.success() {
            bail!(
                "rustc +nightly ({}) could not compile the trial: {}",
                nightly.release(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let obj = dir.join("trial.o");
        let out = Command::new(bpf_linker)
            .args(["--target", "bpfel", "--export", "trial", "-o"])
            .arg(&obj)
            .arg(&bc)
            .output()
            .context("running bpf-linker")?;
        if !out.status.success() || !obj.exists() {
            bail!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Everything `build-ebpf` needs: nightly rust-src and a bpf-linker that
/// links this nightly's bitcode.
pub fn ensure_ebpf_toolchain() -> anyhow::Result<BpfLinker> {
    let nightly = Nightly::detect()?;
    ensure_rust_src()?;
    let linker = BpfLinker::default();
    if let Some(why) = linker.unusable(&nightly) {
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} for nightly {} (LLVM {}), because {why}; this takes a few minutes, once",
            nightly.release(),
            nightly.llvm_major
        );
        linker.install(&nightly)?;
        if let Some(why) = linker.unusable(&nightly) {
            bail!("bpf-linker was just built for this nightly and still cannot link: {why}");
        }
    }
    Ok(linker)
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
    run(Command::new("rustup").args(["component", "add", "--toolchain", "nightly", "rust-src"]))
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
            .args(["build", "--release"])
            .args(crate::RELEASE_PACKAGES.iter().flat_map(|p| ["-p", p]))
            .arg("--bins"),
    )
}

/// Everything a local cluster needs: packages, the eBPF object, the binaries.
pub fn prepare_cluster() -> anyhow::Result<()> {
    ensure_debian(RUN_PACKAGES)?;
    crate::ebpf::build()?;
    build_release_binaries()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_is_read_from_rustc_output() {
        let vv = "rustc 1.101.0-nightly (abc 2026-11-20)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.101.0-nightly\nLLVM version: 23.1.0\n";
        assert_eq!(parse_llvm_major(vv).unwrap(), 23);
        assert!(parse_llvm_major("rustc 1.0\n").is_err());
        assert!(parse_llvm_major("LLVM version: x.1\n").is_err());
    }

    #[test]
    fn libllvm_soname_is_preferred_and_major_must_match() {
        let dir = std::env::temp_dir().join(format!("xtask-libllvm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "libLLVM-23-rust-1.101.0-nightly.so",
            "libLLVM.so.23.1-rust-1.101.0-nightly",
            "librustc_driver-x.so",
        ] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        assert_eq!(
            find_libllvm(&dir, 23).unwrap(),
            dir.join("libLLVM.so.23.1-rust-1.101.0-nightly")
        );
        let err = find_libllvm(&dir, 22).unwrap_err().to_string();
        assert!(err.contains("LLVM 22"), "{err}");
        std::fs::remove_file(dir.join("libLLVM.so.23.1-rust-1.101.0-nightly")).unwrap();
        assert_eq!(
            find_libllvm(&dir, 23).unwrap(),
            dir.join("libLLVM-23-rust-1.101.0-nightly.so")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
