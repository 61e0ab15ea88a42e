//! `cargo xtask cluster ...`

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::{Cluster, ClusterSpec, sweep};

#[derive(Debug, Args)]
pub struct ClusterCmd {
    #[command(subcommand)]
    pub action: ClusterAction,
}

#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// Create a cluster, start the control server and one agent per node, register the
    /// pods as Workloads, and leave it running.
    Up(UpArgs),
    /// Run a command inside a pod (its netns and cgroup) or a node (its netns).
    Exec {
        #[command(flatten)]
        target: Target,
        /// A pod (`node1-pod1`) or a node (`node1`).
        name: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// Show nodes, agents, pods and the control server, each agent's `GET /status`
    /// and `meshctl agents`.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Ask a pod's agent to enroll it.
    Enroll {
        #[command(flatten)]
        target: Target,
        pod: String,
    },
    /// Ask a pod's agent to unenroll it.
    Unenroll {
        #[command(flatten)]
        target: Target,
        pod: String,
    },
    /// Tear a cluster down, then sweep clusters whose owner is gone.
    Down {
        #[command(flatten)]
        target: Target,
    },
    /// Remove clusters whose owner is gone, and leftovers of crashed runs.
    Sweep {
        /// Remove every cluster, running or not.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Args)]
pub struct Target {
    /// The cluster's prefix (default: the last one `cluster up` made).
    #[arg(long, value_name = "PREFIX")]
    pub cluster: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    #[arg(long, default_value_t = 2)]
    pub pods_per_node: usize,
    /// Do not enroll the pods with their agents.
    #[arg(long)]
    pub no_enroll: bool,
    /// Default: target/release/mesh-agent.
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// Default: target/bpf/mesh-ebpf.o.
    #[arg(long)]
    pub bpf_object: Option<PathBuf>,
    /// Default: target/release/mesh-control.
    #[arg(long, conflicts_with = "no_control")]
    pub control_bin: Option<PathBuf>,
    /// Default: target/release/meshctl.
    #[arg(long)]
    pub meshctl_bin: Option<PathBuf>,
    /// Run without a control server: agents only carry connections to their
    /// original destinations.
    #[arg(long)]
    pub no_control: bool,
    /// Lifetime of the certificates the control server issues (e.g. 2m, 24h).
    #[arg(long, conflicts_with = "no_control")]
    pub cert_ttl: Option<String>,
    /// mesh-control replicas; more than one share an etcd store (--etcd-members).
    #[arg(long, default_value_t = 1, conflicts_with = "no_control")]
    pub control_replicas: usize,
    /// etcd members the cluster starts for the replicas' store (0: the file store).
    #[arg(long, default_value_t = 0, conflicts_with = "no_control")]
    pub etcd_members: usize,
    /// Build the agent, control server and meshctl first (release).
    #[arg(long)]
    pub release: bool,
    /// Extra arguments for every agent, after `--`.
    #[arg(last = true, value_name = "AGENT_ARGS")]
    pub agent_args: Vec<String>,
}

impl ClusterCmd {
    pub fn run(self) -> Result<ExitCode> {
        match self.action {
            ClusterAction::Up(args) => up(args),
            ClusterAction::Exec {
                target,
                name,
                command,
            } => exec(&Cluster::load(target.cluster.as_deref())?, &name, &command),
            ClusterAction::Status { target } => {
                status(&Cluster::load(target.cluster.as_deref())?);
                Ok(ExitCode::SUCCESS)
            }
            ClusterAction::Enroll { target, pod } => {
                Cluster::load(target.cluster.as_deref())?.enroll(&pod)?;
                Ok(ExitCode::SUCCESS)
            }
            ClusterAction::Unenroll { target, pod } => {
                Cluster::load(target.cluster.as_deref())?.unenroll(&pod)?;
                Ok(ExitCode::SUCCESS)
            }
            ClusterAction::Down { target } => down(target.cluster.as_deref()),
            ClusterAction::Sweep { all } => {
                report_sweep(sweep(all)?);
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

fn up(args: UpArgs) -> Result<ExitCode> {
    if args.release {
        build_agent()?;
    }
    let spec = ClusterSpec {
        nodes: args.nodes,
        pods_per_node: args.pods_per_node,
        agent_bin: args.agent_bin.unwrap_or_else(super::default_agent_bin),
        bpf_object: args.bpf_object.unwrap_or_else(super::default_bpf_object),
        agent_args: args.agent_args,
        enroll_all: !args.no_enroll,
        control_bin: if args.no_control {
            None
        } else {
            Some(args.control_bin.unwrap_or_else(super::default_control_bin))
        },
        meshctl_bin: args.meshctl_bin.unwrap_or_else(super::default_meshctl_bin),
        cert_ttl: args.cert_ttl,
        control_replicas: args.control_replicas,
        etcd_members: args.etcd_members,
    };
    match sweep(false) {
        Ok(removed) => report_sweep(removed),
        Err(e) => eprintln!("warning: {e:#}"),
    }
    let mut cluster = Cluster::up(&spec)?;
    cluster.keep();
    cluster.set_current()?;
    println!(
        "cluster {} is up (state in {})",
        cluster.prefix(),
        cluster.state_dir().display()
    );
    print_tables(&cluster);
    println!(
        "\ntry: cargo xtask cluster exec node1-pod1 -- ping -c1 {}",
        cluster
            .pods()
            .last()
            .map_or_else(String::new, |p| p.ip.to_string())
    );
    if let Some(ctl) = cluster.control_info() {
        println!(
            "     {} --control {} get workloads -A",
            cluster.state.control.as_ref().map_or_else(
                || "meshctl".to_string(),
                |c| c.meshctl_bin.display().to_string()
            ),
            ctl.meshctl_target()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn build_agent() -> Result<()> {
    crate::deps::build_release_binaries()
}

fn exec(cluster: &Cluster, name: &str, command: &[OsString]) -> Result<ExitCode> {
    let (program, args) = command.split_first().context("no command given")?;
    let mut cmd = if cluster.try_pod(name).is_ok() {
        cluster.command(name, program)
    } else if cluster.try_node(name).is_ok() {
        cluster.node_command(name, program)
    } else {
        cluster.try_pod(name)?;
        unreachable!("try_pod failed just above")
    };
    let status = cmd
        .args(args)
        .status()
        .with_context(|| format!("running {} in {name}", program.to_string_lossy()))?;
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
}

fn status(cluster: &Cluster) {
    let owner = match cluster.state.owner {
        None => "none (kept)".to_string(),
        Some(o) if o.is_alive() => format!("pid {}", o.pid),
        Some(o) => format!(
            "pid {} (gone: `cargo xtask cluster sweep` removes it)",
            o.pid
        ),
    };
    println!(
        "cluster {}  state {}  owner {owner}",
        cluster.prefix(),
        cluster.state_dir().display()
    );
    print_tables(cluster);
    println!();
    for node in cluster.nodes() {
        match cluster.admin_get(&node.name, "/status") {
            Ok(v) => println!("{} GET /status: {v}", node.name),
            Err(e) => println!("{} GET /status: unreachable: {e:#}", node.name),
        }
    }
    if cluster.control_info().is_some() {
        println!("\nmeshctl agents:");
        match cluster.meshctl(&["agents"]) {
            Ok(out) => {
                print!("{}", String::from_utf8_lossy(&out.stdout));
                if !out.status.success() {
                    println!(
                        "(failed, {}: {})",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
            Err(e) => println!("(cannot run meshctl: {e:#})"),
        }
    }
}

fn print_tables(cluster: &Cluster) {
    let nodes: Vec<Vec<String>> = cluster
        .nodes()
        .into_iter()
        .map(|n| {
            let agent = match cluster.agent_pid(&n.name) {
                Some(pid) => format!("pid {pid}"),
                None => "not running".to_string(),
            };
            vec![
                n.name,
                n.ip.to_string(),
                n.pod_cidr,
                n.gateway_ip.to_string(),
                n.netns,
                agent,
            ]
        })
        .collect();
    print_table(
        &["NODE", "IP", "PODS", "GATEWAY/AGENT IP", "NETNS", "AGENT"],
        &nodes,
    );
    println!();
    let pods: Vec<Vec<String>> = cluster
        .pods()
        .into_iter()
        .map(|p| {
            let enrolled = if cluster.is_enrolled(&p.name) {
                "yes"
            } else {
                "no"
            };
            vec![
                p.name,
                p.node,
                p.ip.to_string(),
                p.netns,
                p.cgroup.display().to_string(),
                enrolled.to_string(),
            ]
        })
        .collect();
    print_table(&["POD", "NODE", "IP", "NETNS", "CGROUP", "ENROLLED"], &pods);
    println!();
    match cluster.control_info() {
        Some(ctl) => {
            let process = match cluster.control_pid() {
                Some(pid) => format!("pid {pid}"),
                None => "not running".to_string(),
            };
            print_table(
                &["CONTROL", "LISTEN", "METRICS", "OPERATOR SOCKET", "PROCESS"],
                &[vec![
                    "mesh-control".to_string(),
                    ctl.listen.to_string(),
                    ctl.metrics.to_string(),
                    ctl.socket.display().to_string(),
                    process,
                ]],
            );
        }
        None => {
            println!("no control plane (agents carry connections to their original destinations)")
        }
    }
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn down(prefix: Option<&str>) -> Result<ExitCode> {
    let target = match prefix {
        Some(p) => Some(p.to_string()),
        None => super::current_prefix()?.filter(|current| {
            let exists = std::path::Path::new(super::STATE_ROOT)
                .join(current)
                .exists();
            if !exists {
                println!("the current cluster, {current}, is already gone");
            }
            exists
        }),
    };
    let result = match target {
        Some(prefix) => {
            let result = Cluster::load(Some(&prefix)).and_then(Cluster::down);
            if result.is_ok() {
                println!("cluster {prefix} is down");
            }
            result
        }
        None => {
            println!("no current cluster");
            Ok(())
        }
    };
    let swept = sweep(false);
    if let Ok(removed) = &swept {
        report_sweep(removed.clone());
    }
    result?;
    swept?;
    Ok(ExitCode::SUCCESS)
}

fn report_sweep(removed: Vec<String>) {
    for line in removed {
        println!("swept {line}");
    }
}
