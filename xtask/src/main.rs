//! `cargo xtask <command>`: project automation.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xtask::{bench::BenchCmd, cluster::cli::ClusterCmd};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Project automation", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A local multi-node cluster: nodes and pods as network namespaces and cgroups.
    Cluster(ClusterCmd),
    /// Build the kernel programs into target/bpf/mesh-ebpf.o (installs nightly rust-src and bpf-linker if missing).
    BuildEbpf,
    /// The whole test suite: fmt, clippy, unit and end-to-end tests (root).
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Bring up a 2-node cluster, send traffic through the agents, show what they carried.
    Demo,
    /// Write deploy/crds from the Rust types of our kinds (--check: only compare).
    Crds {
        #[arg(long)]
        check: bool,
    },
    /// Benchmarks: the node agents on a local cluster (l4, http), the control server under many agents (control).
    Bench {
        #[command(subcommand)]
        bench: BenchCmd,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Cluster(cmd) => cmd.run(),
        Command::BuildEbpf => xtask::ebpf::build().map(|_| ExitCode::SUCCESS),
        Command::Test { filter } => xtask::test::run(filter.as_deref()).map(|()| ExitCode::SUCCESS),
        Command::Demo => xtask::demo::run().map(|()| ExitCode::SUCCESS),
        Command::Crds { check } => xtask::crds::run(check).map(|()| ExitCode::SUCCESS),
        Command::Bench { bench } => bench.run().map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}
