//! The local cluster: each node a network namespace running its own agent, each pod a
//! network namespace plus a cgroup v2 under its node, all named after one run-unique
//! prefix so that a crashed run can be swept.
//!
//! ```text
//! <prefix>-fabric   br0 ── n1 ═ eth0 198.18.0.11  <prefix>-node1   cni0 198.19.1.1 ── p1 ═ eth0 198.19.1.11  <prefix>-node1-pod1
//!   198.18.0.2          └─ n2 ═ eth0 198.18.0.12  <prefix>-node2   cni0 198.19.2.1 ── ...
//!   mesh-control :15012
//! ```
//!
//! The control plane (`mesh-control`) runs in the fabric netns on br0's address, over
//! TLS with the root CA it generates in its store; every agent trusts that root
//! (`--ca-bundle`), gets its node certificate with its node's bootstrap token and
//! authenticates with the certificate from then on. `up` registers every node as a
//! `Node` and every pod as a `Workload` through `meshctl apply`.

pub mod cli;
pub mod plan;
mod replicas;
mod state;
mod sys;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::admin;
use plan::Roots;
pub use plan::{ControlInfo, NodeInfo, PodInfo};
use state::{ControlState, EtcdState, NodeState, Owner, State};
use sys::Placement;

/// One state dir per cluster, plus `current`.
pub const STATE_ROOT: &str = "/run/mesh-cluster";

const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent's default `--drain-timeout` (10 s), its trace flush (2 s), and a margin.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(15);
const CONTROL_READY_TIMEOUT: Duration = Duration::from_secs(10);
const CONTROL_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// One `meshctl` call; the operator API answers in milliseconds.
const MESHCTL_TIMEOUT: Duration = Duration::from_secs(10);
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);
/// A state dir without a readable state.json younger than this may be a cluster
/// being created right now.
const STATE_GRACE: Duration = Duration::from_secs(60);
const LOG_TAIL_LINES: usize = 30;

/// What [`Cluster::up`] builds.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub pods_per_node: usize,
    pub agent_bin: PathBuf,
    pub bpf_object: PathBuf,
    /// Appended to every agent's command line.
    pub agent_args: Vec<String>,
    /// Enroll every pod with its node's agent once the agents are ready.
    pub enroll_all: bool,
    /// `mesh-control`; `None`: no control plane, agents run without `--control-addr`.
    pub control_bin: Option<PathBuf>,
    /// `meshctl`, used to wait for the control plane and to apply configuration.
    pub meshctl_bin: PathBuf,
    /// Lifetime of the certificates the control server issues (`mesh-control
    /// --cert-ttl`, e.g. "2m"); `None`: its default, 24h.
    pub cert_ttl: Option<String>,
    /// `mesh-control` replicas (1: one, on its file store). More than one share an
    /// etcd store of `etcd_members` members the cluster starts in the fabric netns;
    /// replica r listens on 198.18.0.(2+r) with its own operator socket, and agents
    /// get every replica in `--control-addr`.
    pub control_replicas: usize,
    /// etcd members for the replicas' store (`--store etcd://...`); 0: the file store.
    pub etcd_members: usize,
}

impl Default for ClusterSpec {
    /// Two nodes of two pods, the workspace's release agent, eBPF object and control
    /// server, all pods enrolled.
    fn default() -> Self {
        ClusterSpec {
            nodes: 2,
            pods_per_node: 2,
            agent_bin: default_agent_bin(),
            bpf_object: default_bpf_object(),
            agent_args: Vec::new(),
            enroll_all: true,
            control_bin: Some(default_control_bin()),
            meshctl_bin: default_meshctl_bin(),
            cert_ttl: None,
            control_replicas: 1,
            etcd_members: 0,
        }
    }
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// `$CARGO_TARGET_DIR` if set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// `<target>/release/mesh-agent`
pub fn default_agent_bin() -> PathBuf {
    target_dir().join("release").join("mesh-agent")
}

/// `<target>/release/mesh-control`
pub fn default_control_bin() -> PathBuf {
    target_dir().join("release").join("mesh-control")
}

/// `<target>/release/meshctl`
pub fn default_meshctl_bin() -> PathBuf {
    target_dir().join("release").join("meshctl")
}

/// `<target>/bpf/mesh-ebpf.o`, where `cargo xtask build-ebpf` puts it.
pub fn default_bpf_object() -> PathBuf {
    target_dir().join("bpf").join("mesh-ebpf.o")
}

/// A running local cluster. Dropping it tears it down unless it was [`kept`](Cluster::keep)
/// or [`loaded`](Cluster::load).
pub struct Cluster {
    /// `state.enrolled` is not kept current here: `enrolled` is, so that `&self`
    /// methods can change it.
    state: State,
    state_dir: PathBuf,
    enrolled: Mutex<BTreeSet<String>>,
    /// Agents this process started, so they can be reaped.
    agents: BTreeMap<String, Child>,
    /// The control server, if this process started it.
    control: Option<Child>,
    /// Control replicas 1.. and etcd members this process started, by index.
    replica_children: BTreeMap<usize, Child>,
    etcd_children: BTreeMap<usize, Child>,
    keep: bool,
    torn_down: bool,
}

/// The flags every agent of the local cluster starts with (the DaemonSet in
/// deploy/ passes the same ones; mesh-crds' deploy test compares them).
pub fn agent_args(
    info: &NodeInfo,
    bpf_object: &Path,
    control: Option<&ControlInfo>,
) -> Vec<OsString> {
    let control = control.map(|c| (c.url(), c.ca_bundle()));
    agent_args_to(
        info,
        bpf_object,
        control.as_ref().map(|(u, c)| (u.as_str(), c.as_path())),
    )
}

/// [`agent_args`] with the control plane given as its `--control-addr` (one URL or
/// a comma-separated list of replicas) and `--ca-bundle`.
pub fn agent_args_to(
    info: &NodeInfo,
    bpf_object: &Path,
    control: Option<(&str, &Path)>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--node".into(),
        info.name.clone().into(),
        "--cgroup-root".into(),
        info.pods_cgroup.clone().into(),
        "--agent-ip".into(),
        info.gateway_ip.to_string().into(),
        "--admin-socket".into(),
        info.admin_socket.clone().into(),
        "--bpf-pin-dir".into(),
        info.bpf_pin_dir.clone().into(),
        "--bpf-object".into(),
        bpf_object.into(),
    ];
    if let Some((urls, ca_bundle)) = control {
        args.extend([
            "--control-addr".into(),
            urls.into(),
            "--ca-bundle".into(),
            ca_bundle.into(),
            "--token-file".into(),
            info.token_file.clone().into(),
            "--cache-dir".into(),
            info.cache_dir.clone().into(),
        ]);
    }
    args
}

impl Cluster {
    /// Creates the namespaces, links, cgroups and pin dir, starts the control server (if
    /// `spec.control_bin`) and one agent per node and waits for them, registers every
    /// pod as a `Workload`, then enrolls every pod if `spec.enroll_all`. On any error,
    /// tears down what it made. The cluster belongs to this process: [`sweep`] removes
    /// it once this process is gone.
    pub fn up(spec: &ClusterSpec) -> Result<Cluster> {
        plan::validate_size(spec.nodes, spec.pods_per_node)?;
        plan::validate_replicas(spec.control_replicas, spec.etcd_members)?;
        let agent_bin = existing_file(
            &spec.agent_bin,
            "agent binary",
            "build it with `cargo build --release -p mesh-agent`",
        )?;
        let bpf_object = existing_file(
            &spec.bpf_object,
            "eBPF object",
            "build it with `cargo xtask build-ebpf`",
        )?;
        let control_bins = match &spec.control_bin {
            Some(bin) => Some((
                existing_file(
                    bin,
                    "control server binary",
                    "build it with `cargo build --release -p mesh-control`",
                )?,
                existing_file(
                    &spec.meshctl_bin,
                    "meshctl binary",
                    "build it with `cargo build --release -p meshctl`",
                )?,
            )),
            None => None,
        };
        let roots = Roots {
            state: PathBuf::from(STATE_ROOT),
            cgroup2: sys::cgroup2_mount()?,
            bpffs: sys::ensure_bpffs()?,
        };
        fs::create_dir_all(&roots.state).with_context(|| format!("creating {STATE_ROOT}"))?;
        let prefix = claim_prefix(&roots)?;
        let state_dir = roots.state_dir(&prefix);

        let nodes = plan::nodes(&prefix, spec.nodes, &roots);
        let pods = plan::pods(&prefix, &nodes, spec.pods_per_node, &roots);
        let etcd = plan::etcd_members(&prefix, &roots, spec.etcd_members);
        let store = (!etcd.is_empty()).then(|| plan::etcd_store_url(&etcd));
        let replica = |r: usize, (bin, meshctl_bin): &(PathBuf, PathBuf)| ControlState {
            info: plan::replica(&prefix, &roots, r),
            bin: bin.clone(),
            meshctl_bin: meshctl_bin.clone(),
            pid: None,
            cert_ttl: spec.cert_ttl.clone(),
            store: store.clone(),
        };
        let replicas = match &control_bins {
            Some(bins) => (1..spec.control_replicas)
                .map(|r| replica(r, bins))
                .collect(),
            None => Vec::new(),
        };
        let state = State {
            owner: Some(Owner::current()?),
            fabric_netns: plan::fabric_netns(&prefix),
            cgroup_root: roots.cgroup_root(&prefix),
            bpf_root: roots.bpf_root(&prefix),
            agent_bin,
            bpf_object,
            agent_args: spec.agent_args.clone(),
            nodes: nodes
                .into_iter()
                .map(|info| NodeState {
                    info,
                    agent_pid: None,
                })
                .collect(),
            pods,
            enrolled: BTreeSet::new(),
            control: control_bins.as_ref().map(|bins| replica(0, bins)),
            replicas,
            etcd: etcd
                .into_iter()
                .map(|info| EtcdState { info, pid: None })
                .collect(),
            prefix,
        };
        let mut cluster = Cluster::from_state(state, state_dir, false);
        if let Err(err) = cluster.save().and_then(|()| cluster.build(spec.enroll_all)) {
            cluster.torn_down = true;
            let (_, teardown_errors) = cluster.teardown();
            if teardown_errors.is_empty() {
                return Err(err);
            }
            return Err(err.context(format!(
                "(tearing down after this failure also failed: {})",
                teardown_errors.join("; ")
            )));
        }
        Ok(cluster)
    }

    /// A cluster from its state.json: `None` means the one `cargo xtask cluster up`
    /// made last. A loaded cluster is not torn down on drop; call [`down`](Cluster::down).
    pub fn load(prefix: Option<&str>) -> Result<Cluster> {
        let state_root = Path::new(STATE_ROOT);
        let prefix = match prefix {
            Some(p) => p.to_string(),
            None => current_prefix()?.context(
                "no current cluster: start one with `cargo xtask cluster up` or pass --cluster",
            )?,
        };
        anyhow::ensure!(
            plan::is_prefix(&prefix),
            "{prefix:?} is not a cluster prefix (mc + 6 hex digits)"
        );
        let state_dir = state_root.join(&prefix);
        let state = State::read(&state_dir).with_context(|| format!("loading cluster {prefix}"))?;
        Ok(Cluster::from_state(state, state_dir, true))
    }

    fn from_state(mut state: State, state_dir: PathBuf, keep: bool) -> Cluster {
        let enrolled = Mutex::new(std::mem::take(&mut state.enrolled));
        Cluster {
            state,
            state_dir,
            enrolled,
            agents: BTreeMap::new(),
            control: None,
            replica_children: BTreeMap::new(),
            etcd_children: BTreeMap::new(),
            keep,
            torn_down: false,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.state.prefix
    }

    /// `/run/mesh-cluster/<prefix>`: state.json, agent logs, admin sockets.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.state.nodes.iter().map(|n| n.info.clone()).collect()
    }

    /// Panics if there is no such node.
    pub fn node(&self, name: &str) -> &NodeInfo {
        self.try_node(name).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn pods(&self) -> Vec<PodInfo> {
        self.state.pods.clone()
    }

    /// Panics if there is no such pod.
    pub fn pod(&self, name: &str) -> &PodInfo {
        self.try_pod(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// 198.18.0.(10+i), the node's address on the fabric. Panics if there is no such node.
    pub fn node_ip(&self, node: &str) -> Ipv4Addr {
        self.node(node).ip
    }

    /// 198.19.i.1, the pods' gateway and the agent's address. Panics if there is no such node.
    pub fn gateway_ip(&self, node: &str) -> Ipv4Addr {
        self.node(node).gateway_ip
    }

    /// A command that runs inside the pod: its netns and its cgroup. Panics if there is
    /// no such pod; if the pod's netns or cgroup is gone, spawning fails.
    pub fn command(&self, pod: &str, program: impl AsRef<OsStr>) -> Command {
        let pod = self.pod(pod);
        let mut cmd = Command::new(program);
        sys::place(
            &mut cmd,
            &Placement {
                netns: Some(&pod.netns),
                cgroup: Some(&pod.cgroup),
                new_session: false,
            },
        );
        cmd
    }

    /// A command that runs inside the node's netns, in the caller's cgroup. Panics if
    /// there is no such node.
    pub fn node_command(&self, node: &str, program: impl AsRef<OsStr>) -> Command {
        let node = self.node(node);
        let mut cmd = Command::new(program);
        sys::place(
            &mut cmd,
            &Placement {
                netns: Some(&node.netns),
                cgroup: None,
                new_session: false,
            },
        );
        cmd
    }

    /// A command that runs inside the fabric netns (where the control server listens),
    /// in the caller's cgroup.
    pub fn fabric_command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        sys::place(
            &mut cmd,
            &Placement {
                netns: Some(&self.state.fabric_netns),
                cgroup: None,
                new_session: false,
            },
        );
        cmd
    }

    /// The agent's pid while it is alive in its node's agent cgroup.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        let node = self.try_node_state(node).ok()?;
        let pid = node.agent_pid?;
        sys::cgroup_pids(&node.info.agent_cgroup)
            .contains(&pid)
            .then_some(pid)
    }

    /// SIGTERM, up to 15 s, then SIGKILL; anything left in the agent cgroup is killed too.
    /// The agent drains and exits; its kernel programs stay pinned (pods fail closed).
    pub fn stop_agent(&mut self, node: &str) -> Result<()> {
        self.try_node(node)?;
        self.stop_agents(&[node.to_string()])
    }

    /// Waits up to `timeout` for the node's agent (started by this process) to exit
    /// by itself, e.g. after a signal the caller sent, and returns its exit status.
    pub fn wait_agent_exit(
        &mut self,
        node: &str,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self
                .agents
                .get_mut(node)
                .with_context(|| format!("the agent of {node} was not started by this process"))?;
            if let Some(status) = child.try_wait()? {
                self.agents.remove(node);
                self.node_state_mut(node)?.agent_pid = None;
                self.save()?;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("the agent of {node} did not exit within {timeout:?}");
            }
            thread::sleep(POLL);
        }
    }

    /// `mesh-agent uninstall` for a node whose agent is stopped: its kernel programs
    /// are detached and its pins removed, so the node's pods connect outside the mesh.
    pub fn uninstall_agent(&mut self, node: &str) -> Result<()> {
        let info = self.try_node(node)?.clone();
        if let Some(pid) = self.agent_pid(node) {
            bail!("the agent of {node} is still running (pid {pid}); stop it first");
        }
        let out = Command::new(&self.state.agent_bin)
            .arg("uninstall")
            .arg("--bpf-pin-dir")
            .arg(&info.bpf_pin_dir)
            .output()
            .with_context(|| format!("running {} uninstall", self.state.agent_bin.display()))?;
        if !out.status.success() {
            bail!(
                "mesh-agent uninstall for {node} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Starts the node's agent again and waits until it answers `GET /status`,
    /// without enrolling anything: what it serves is what it restored itself.
    pub fn start_agent_only(&mut self, node: &str) -> Result<()> {
        self.try_node(node)?;
        if let Some(pid) = self.agent_pid(node) {
            bail!("the agent of {node} is already running (pid {pid})");
        }
        let nodes = [node.to_string()];
        self.spawn_agent(node)?;
        self.save()?;
        self.wait_ready(&nodes)
    }

    /// Starts the node's agent again, waits until it answers `GET /status`, and
    /// enrolls again the node's pods the cluster has marked enrolled (an agent
    /// restores its enrolment only when it has a cache directory).
    pub fn start_agent(&mut self, node: &str) -> Result<()> {
        self.start_agent_only(node)?;
        let pods: Vec<String> = self
            .state
            .pods
            .iter()
            .filter(|p| p.node == node && self.is_enrolled(&p.name))
            .map(|p| p.name.clone())
            .collect();
        for pod in pods {
            self.enroll(&pod).with_context(|| {
                format!("enrolling {pod} again after restarting {node}'s agent")
            })?;
        }
        Ok(())
    }

    /// The control plane's addresses and files; `None` if the cluster runs without one.
    pub fn control_info(&self) -> Option<&ControlInfo> {
        self.state.control.as_ref().map(|c| &c.info)
    }

    /// `<state>/control.sock`, the operator API. Panics if the cluster has no control plane.
    pub fn control_socket(&self) -> &Path {
        &self
            .try_control()
            .unwrap_or_else(|e| panic!("{e}"))
            .info
            .socket
    }

    /// The control server's pid while it is alive in its cgroup.
    pub fn control_pid(&self) -> Option<u32> {
        let ctl = self.state.control.as_ref()?;
        let pid = ctl.pid?;
        sys::cgroup_pids(&ctl.info.cgroup)
            .contains(&pid)
            .then_some(pid)
    }

    /// SIGTERM (a graceful exit), up to 5 s, then SIGKILL; anything left in the control
    /// cgroup is killed too. The store stays.
    pub fn stop_control(&mut self) -> Result<()> {
        self.try_control()?;
        if let Some(pid) = self.control_pid() {
            sys::signal(pid, libc::SIGTERM);
            let deadline = Instant::now() + CONTROL_STOP_TIMEOUT;
            while self.control_pid().is_some() && Instant::now() < deadline {
                self.reap_control();
                thread::sleep(POLL);
            }
            if let Some(pid) = self.control_pid() {
                eprintln!(
                    "warning: the control server (pid {pid}) ignored SIGTERM for {} s; killing it",
                    CONTROL_STOP_TIMEOUT.as_secs()
                );
                sys::signal(pid, libc::SIGKILL);
            }
        }
        let cgroup = self.try_control()?.info.cgroup.clone();
        let killed = sys::cgroup_kill(&cgroup, KILL_TIMEOUT);
        self.reap_control();
        if let Some(ctl) = self.state.control.as_mut() {
            ctl.pid = None;
        }
        if self.state_dir.exists() {
            self.save()?;
        }
        killed
    }

    /// Starts the control server again (on its existing store) and waits until it answers.
    pub fn start_control(&mut self) -> Result<()> {
        self.try_control()?;
        if let Some(pid) = self.control_pid() {
            bail!("the control server is already running (pid {pid})");
        }
        self.spawn_control()?;
        self.save()?;
        self.wait_control_ready()
    }

    /// Runs `meshctl --control unix://<socket> <args>` and returns what it did, whatever
    /// its exit status (for tests of bad input). Fails only if it cannot run it.
    pub fn meshctl(&self, args: &[&str]) -> Result<std::process::Output> {
        self.meshctl_with_input(args, None)
    }

    /// `meshctl apply -f -` with `yaml` on stdin; its stdout on success, else an error
    /// carrying its stderr.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        applied(
            self.meshctl_with_input(&["apply", "-f", "-"], Some(yaml))?,
            "",
        )
    }

    /// The pod's `Workload` document as `up` registers it (name, namespace `default`,
    /// labels `app: <pod>`, `node: <node>`, service account, node, IP), with
    /// `extra_labels` added. Panics if there is no such pod.
    pub fn workload_yaml(&self, pod: &str, extra_labels: &[(&str, &str)]) -> String {
        plan::workload_yaml(self.pod(pod), extra_labels)
    }

    /// Registers every node as a `Node` and every pod as a `Workload` (one apply,
    /// all or nothing).
    pub fn register_pods(&self) -> Result<String> {
        let docs: Vec<String> = self
            .state
            .nodes
            .iter()
            .map(|n| plan::node_yaml(&n.info))
            .chain(self.state.pods.iter().map(|p| plan::workload_yaml(p, &[])))
            .collect();
        self.apply(&plan::yaml_stream(&docs))
            .context("registering the nodes and pods")
    }

    /// The node's `Node` document as `up` registers it. Panics if there is no such node.
    pub fn node_yaml(&self, node: &str) -> String {
        plan::node_yaml(self.node(node))
    }

    /// The root CA agents trust (`mesh-agent --ca-bundle`), written by the control
    /// server at its first start. `None` without a control plane.
    pub fn ca_bundle(&self) -> Option<PathBuf> {
        self.state.control.as_ref().map(ControlState::ca_bundle)
    }

    /// The last `lines` lines of the control server's log.
    pub fn control_log_tail(&self, lines: usize) -> String {
        match &self.state.control {
            Some(ctl) => sys::tail(&ctl.info.log, lines),
            None => "(no control plane)".to_string(),
        }
    }

    pub fn admin_get(&self, node: &str, path: &str) -> Result<Value> {
        admin::AdminClient::new(&self.try_node(node)?.admin_socket)
            .get(path)
            .with_context(|| format!("admin API of {node}"))
    }

    pub fn admin_post(&self, node: &str, path: &str, body: &Value) -> Result<Value> {
        admin::AdminClient::new(&self.try_node(node)?.admin_socket)
            .post(path, body)
            .with_context(|| format!("admin API of {node}"))
    }

    /// Asks the pod's node agent to redirect the pod's connections.
    pub fn enroll(&self, pod: &str) -> Result<()> {
        let info = self.try_pod(pod)?;
        self.admin_post(
            &info.node,
            "/enroll",
            &json!({
                "pod": info.name,
                "cgroup": info.cgroup,
                "netns": sys::netns_path(&info.netns),
            }),
        )?;
        self.lock_enrolled().insert(info.name.clone());
        self.save()
    }

    pub fn unenroll(&self, pod: &str) -> Result<()> {
        let info = self.try_pod(pod)?;
        self.admin_post(&info.node, "/unenroll", &json!({"pod": info.name}))?;
        self.lock_enrolled().remove(&info.name);
        self.save()
    }

    /// Whether the cluster enrolled the pod (and did not unenroll it since).
    pub fn is_enrolled(&self, pod: &str) -> bool {
        self.lock_enrolled().contains(pod)
    }

    /// The last `lines` lines of the node's agent log.
    pub fn agent_log_tail(&self, node: &str, lines: usize) -> String {
        sys::tail(&self.node(node).agent_log, lines)
    }

    /// Leaves the cluster running when this value is dropped, and detaches it from this
    /// process: [`sweep`] no longer removes it when this process exits, only
    /// [`down`](Cluster::down) or `sweep(true)` do.
    pub fn keep(&mut self) {
        self.keep = true;
        self.state.owner = None;
        if let Err(e) = self.save() {
            eprintln!(
                "warning: cluster {} may be swept as orphaned: {e:#}",
                self.prefix()
            );
        }
    }

    /// Makes this cluster the one the CLI uses when not given `--cluster`.
    pub fn set_current(&self) -> Result<()> {
        let path = Path::new(STATE_ROOT).join("current");
        fs::write(&path, format!("{}\n", self.prefix()))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Stops the agents, kills every process left in the cluster's cgroups and netns,
    /// deletes the netns, the cgroups (deepest first), the pin dir and the state dir.
    /// Keeps going past errors and reports them all.
    pub fn down(mut self) -> Result<()> {
        self.torn_down = true;
        let (_, errors) = self.teardown();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!(
                "tearing down cluster {}:\n  {}",
                self.prefix(),
                errors.join("\n  ")
            )
        }
    }

    fn build(&mut self, enroll_all: bool) -> Result<()> {
        self.create_network()?;
        self.create_cgroups()?;
        fs::create_dir_all(&self.state.bpf_root)
            .with_context(|| format!("creating {}", self.state.bpf_root.display()))?;
        if self.state.control.is_some() {
            self.write_tokens()?;
            self.start_etcd()?;
            self.spawn_control()?;
            self.save()?;
            self.wait_control_ready()?;
            // After the first, so that it generates the root CA the others load.
            self.start_replicas()?;
        }
        let names: Vec<String> = self
            .state
            .nodes
            .iter()
            .map(|n| n.info.name.clone())
            .collect();
        for name in &names {
            self.spawn_agent(name)?;
        }
        self.save()?;
        self.wait_ready(&names)?;
        if self.state.control.is_some() {
            self.register_pods()?;
        }
        if enroll_all {
            for pod in self.pods() {
                self.enroll(&pod.name)?;
            }
        }
        Ok(())
    }

    fn create_network(&self) -> Result<()> {
        use plan::{FABRIC_BRIDGE, NODE_BRIDGE, UPLINK};
        let fabric = self.state.fabric_netns.as_str();
        sys::netns_add(fabric)?;
        sys::ip_in(fabric, &["link", "add", FABRIC_BRIDGE, "type", "bridge"])?;
        sys::ip_in(fabric, &["link", "set", FABRIC_BRIDGE, "up"])?;
        for ctl in self.state.control.iter().chain(&self.state.replicas) {
            let addr = format!("{}/24", ctl.info.ip);
            sys::ip_in(fabric, &["addr", "add", &addr, "dev", FABRIC_BRIDGE])?;
        }

        let nodes: Vec<&NodeInfo> = self.state.nodes.iter().map(|n| &n.info).collect();
        for node in &nodes {
            let ns = node.netns.as_str();
            let port = plan::fabric_port(node.index);
            let ip = format!("{}/24", node.ip);
            let gateway = format!("{}/24", node.gateway_ip);
            sys::netns_add(ns)?;
            sys::ip(&[
                "link", "add", UPLINK, "netns", ns, "type", "veth", "peer", "name", &port, "netns",
                fabric,
            ])?;
            sys::ip_in(
                fabric,
                &["link", "set", &port, "master", FABRIC_BRIDGE, "up"],
            )?;
            sys::ip_in(ns, &["addr", "add", &ip, "dev", UPLINK])?;
            sys::ip_in(ns, &["link", "set", UPLINK, "up"])?;
            sys::ip_in(ns, &["link", "add", NODE_BRIDGE, "type", "bridge"])?;
            sys::ip_in(ns, &["addr", "add", &gateway, "dev", NODE_BRIDGE])?;
            sys::ip_in(ns, &["link", "set", NODE_BRIDGE, "up"])?;
            sys::netns_exec(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            for other in nodes.iter().filter(|o| o.index != node.index) {
                let via = other.ip.to_string();
                sys::ip_in(ns, &["route", "add", &other.pod_cidr, "via", &via])?;
            }
        }

        for pod in &self.state.pods {
            let node = self.try_node(&pod.node)?;
            let ns = pod.netns.as_str();
            let port = plan::node_port(pod.index);
            let ip = format!("{}/24", pod.ip);
            let gateway = pod.gateway_ip.to_string();
            sys::netns_add(ns)?;
            sys::ip(&[
                "link",
                "add",
                UPLINK,
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &node.netns,
            ])?;
            sys::ip_in(
                &node.netns,
                &["link", "set", &port, "master", NODE_BRIDGE, "up"],
            )?;
            sys::ip_in(ns, &["addr", "add", &ip, "dev", UPLINK])?;
            sys::ip_in(ns, &["link", "set", UPLINK, "up"])?;
            sys::ip_in(ns, &["route", "add", "default", "via", &gateway])?;
        }
        Ok(())
    }

    fn create_cgroups(&self) -> Result<()> {
        let mut dirs = vec![&self.state.cgroup_root];
        for node in &self.state.nodes {
            dirs.extend([
                &node.info.cgroup,
                &node.info.agent_cgroup,
                &node.info.pods_cgroup,
            ]);
        }
        dirs.extend(self.state.pods.iter().map(|p| &p.cgroup));
        for ctl in self.state.control.iter().chain(&self.state.replicas) {
            dirs.push(&ctl.info.cgroup);
        }
        dirs.extend(self.state.etcd.iter().map(|m| &m.info.cgroup));
        for dir in dirs {
            fs::create_dir(dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        Ok(())
    }

    /// Starts the agent in the node netns and agent cgroup, in its own session so that
    /// it outlives this process, its output appended to the node's agent log.
    fn spawn_agent(&mut self, node: &str) -> Result<()> {
        let info = self.try_node(node)?.clone();
        match fs::remove_file(&info.admin_socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).context(format!("removing {}", info.admin_socket.display()));
            }
            _ => {}
        }
        let mut cmd = Command::new(&self.state.agent_bin);
        let control = self
            .state
            .control
            .as_ref()
            .map(|c| (self.control_urls(), c.ca_bundle()));
        cmd.args(agent_args_to(
            &info,
            &self.state.bpf_object,
            control.as_ref().map(|(u, c)| (u.as_str(), c.as_path())),
        ))
        .args(&self.state.agent_args)
        .env("RUST_LOG", "info");

        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&info.agent_log)
            .with_context(|| format!("opening {}", info.agent_log.display()))?;
        writeln!(log, "--- xtask: starting {cmd:?}")?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        sys::place(
            &mut cmd,
            &Placement {
                netns: Some(&info.netns),
                cgroup: Some(&info.agent_cgroup),
                new_session: true,
            },
        );
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting the agent of {node} ({})",
                self.state.agent_bin.display()
            )
        })?;
        self.node_state_mut(node)?.agent_pid = Some(child.id());
        self.agents.insert(node.to_string(), child);
        Ok(())
    }

    /// A random bootstrap token per node: `tokens.yaml` for the control server and
    /// `node<i>.token` for each agent, readable by root only.
    fn write_tokens(&self) -> Result<()> {
        let ctl = self.try_control()?;
        let mut tokens = Vec::new();
        for node in &self.state.nodes {
            let token = plan::random_token().context("reading /dev/urandom")?;
            write_private(&node.info.token_file, &format!("{token}\n"))?;
            tokens.push((node.info.name.clone(), token));
        }
        let yaml = plan::tokens_yaml(tokens.iter().map(|(n, t)| (n.as_str(), t.as_str())));
        write_private(&ctl.info.tokens, &yaml)
    }

    /// Starts `mesh-control` in the fabric netns and its own cgroup, in its own session
    /// so that it outlives this process, its output appended to `<state>/control.log`.
    fn spawn_control(&mut self) -> Result<()> {
        let ctl = self.try_control()?.clone();
        let child = self.spawn_replica_process(&ctl)?;
        if let Some(state) = self.state.control.as_mut() {
            state.pid = Some(child.id());
        }
        self.control = Some(child);
        Ok(())
    }

    /// Waits until `meshctl get workloads -A` succeeds.
    fn wait_control_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + CONTROL_READY_TIMEOUT;
        loop {
            if let Some(child) = self.control.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.control = None;
                if let Some(ctl) = self.state.control.as_mut() {
                    ctl.pid = None;
                }
                self.save()?;
                bail!(
                    "the control server exited ({status}) before it was ready; last lines of its log:\n{}",
                    self.control_log_tail(LOG_TAIL_LINES)
                );
            }
            let last = match self.meshctl(&["get", "workloads", "-A"]) {
                Ok(out) if out.status.success() => return Ok(()),
                Ok(out) => format!(
                    "`meshctl get workloads -A` failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "the control server was not ready within {} s (last: {last}); last lines of its log:\n{}",
                    CONTROL_READY_TIMEOUT.as_secs(),
                    self.control_log_tail(LOG_TAIL_LINES)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn meshctl_with_input(
        &self,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<std::process::Output> {
        self.meshctl_of(self.try_control()?, args, input)
    }

    /// `meshctl` through the operator socket of `ctl` (one replica).
    fn meshctl_of(
        &self,
        ctl: &ControlState,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<std::process::Output> {
        let mut cmd = Command::new(&ctl.meshctl_bin);
        cmd.arg("--control")
            .arg(ctl.info.meshctl_target())
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("meshctl {}", args.join(" "));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {what} ({})", ctl.meshctl_bin.display()))?;
        if let Some(input) = input {
            let mut stdin = child.stdin.take().expect("piped");
            let input = input.to_string();
            // A writer thread, so that a meshctl that stops reading cannot block us.
            thread::spawn(move || {
                let _ = stdin.write_all(input.as_bytes());
            });
        }
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let read = |mut r: Box<dyn io::Read + Send>| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                buf
            })
        };
        let (stdout, stderr) = (read(Box::new(stdout)), read(Box::new(stderr)));
        let Some(status) = wait_or_kill(&mut child, MESHCTL_TIMEOUT, Duration::from_millis(5))?
        else {
            bail!(
                "{what} did not finish within {} s",
                MESHCTL_TIMEOUT.as_secs()
            );
        };
        Ok(std::process::Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }

    /// Collects the control server's exit status, if this process started it and it exited.
    fn reap_control(&mut self) {
        if let Some(child) = self.control.as_mut()
            && !matches!(child.try_wait(), Ok(None))
        {
            self.control = None;
        }
    }

    fn try_control(&self) -> Result<&ControlState> {
        self.state.control.as_ref().ok_or_else(|| {
            anyhow!(
                "cluster {} runs without a control plane (ClusterSpec::control_bin was None)",
                self.prefix()
            )
        })
    }

    /// Waits until every named agent answers `GET /status` with 200.
    fn wait_ready(&mut self, nodes: &[String]) -> Result<()> {
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        let mut pending: BTreeMap<String, String> = nodes
            .iter()
            .map(|n| (n.clone(), "not tried yet".to_string()))
            .collect();
        loop {
            let mut still = BTreeMap::new();
            for (name, _) in pending {
                if let Some(child) = self.agents.get_mut(&name)
                    && let Some(status) = child.try_wait()?
                {
                    self.agents.remove(&name);
                    self.node_state_mut(&name)?.agent_pid = None;
                    self.save()?;
                    bail!(
                        "the agent of {name} exited ({status}) before it was ready; last lines of its log:\n{}",
                        self.agent_log_tail(&name, LOG_TAIL_LINES)
                    );
                }
                let socket = &self.try_node(&name)?.admin_socket;
                match admin::AdminClient::new(socket)
                    .with_timeout(Duration::from_secs(2))
                    .send("GET", "/status", None)
                {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => {
                        still.insert(name, format!("GET /status answered {}", r.status));
                    }
                    Err(e) => {
                        still.insert(name, format!("{e:#}"));
                    }
                }
            }
            if still.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let report: Vec<String> = still
                    .iter()
                    .map(|(name, last)| {
                        format!(
                            "the agent of {name} was not ready within {} s (last: {last}); last lines of its log:\n{}",
                            AGENT_READY_TIMEOUT.as_secs(),
                            self.agent_log_tail(name, LOG_TAIL_LINES)
                        )
                    })
                    .collect();
                bail!(report.join("\n"));
            }
            pending = still;
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_agents(&mut self, nodes: &[String]) -> Result<()> {
        let mut running = Vec::new();
        for name in nodes {
            if let Some(pid) = self.agent_pid(name) {
                sys::signal(pid, libc::SIGTERM);
                running.push(name.clone());
            }
        }
        let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
        while !running.is_empty() && Instant::now() < deadline {
            for name in &running {
                self.reap(name);
            }
            running.retain(|name| self.agent_pid(name).is_some());
            thread::sleep(POLL);
        }
        for name in &running {
            if let Some(pid) = self.agent_pid(name) {
                eprintln!(
                    "warning: the agent of {name} (pid {pid}) ignored SIGTERM for {} s; killing it",
                    AGENT_STOP_TIMEOUT.as_secs()
                );
                sys::signal(pid, libc::SIGKILL);
            }
        }
        let mut errors = Vec::new();
        for name in nodes {
            let cgroup = self.try_node(name)?.agent_cgroup.clone();
            if let Err(e) = sys::cgroup_kill(&cgroup, KILL_TIMEOUT) {
                errors.push(format!("{e:#}"));
            }
            self.reap(name);
            self.node_state_mut(name)?.agent_pid = None;
        }
        if self.state_dir.exists()
            && let Err(e) = self.save()
        {
            errors.push(format!("{e:#}"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!(errors.join("; "))
        }
    }

    /// Collects the exit status of an agent this process started, if it has exited.
    fn reap(&mut self, node: &str) {
        if let Some(child) = self.agents.get_mut(node)
            && !matches!(child.try_wait(), Ok(None))
        {
            self.agents.remove(node);
        }
    }

    /// Best effort: the things it removed and the errors it met.
    fn teardown(&mut self) -> (Vec<String>, Vec<String>) {
        let mut errors = Vec::new();
        let names: Vec<String> = self
            .state
            .nodes
            .iter()
            .map(|n| n.info.name.clone())
            .collect();
        if let Err(e) = self.stop_agents(&names) {
            errors.push(format!("{e:#}"));
        }
        if self.state.control.is_some()
            && let Err(e) = self.stop_control()
        {
            errors.push(format!("{e:#}"));
        }
        errors.extend(self.stop_replicas_and_etcd());
        let (removed, purge_errors) = purge(&Leftovers {
            prefix: self.state.prefix.clone(),
            cgroup_root: self.state.cgroup_root.clone(),
            bpf_root: self.state.bpf_root.clone(),
            state_dir: self.state_dir.clone(),
        });
        errors.extend(purge_errors);
        (removed, errors)
    }

    fn save(&self) -> Result<()> {
        let enrolled = self.lock_enrolled();
        let mut state = self.state.clone();
        state.enrolled = enrolled.clone();
        state.write(&self.state_dir)
    }

    fn lock_enrolled(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.enrolled.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn try_node_state(&self, name: &str) -> Result<&NodeState> {
        self.state
            .nodes
            .iter()
            .find(|n| n.info.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self
                    .state
                    .nodes
                    .iter()
                    .map(|n| n.info.name.as_str())
                    .collect();
                anyhow!(
                    "cluster {} has no node {name:?} (nodes: {})",
                    self.prefix(),
                    names.join(", ")
                )
            })
    }

    fn node_state_mut(&mut self, name: &str) -> Result<&mut NodeState> {
        self.try_node_state(name)?;
        Ok(self
            .state
            .nodes
            .iter_mut()
            .find(|n| n.info.name == name)
            .expect("just found"))
    }

    fn try_node(&self, name: &str) -> Result<&NodeInfo> {
        self.try_node_state(name).map(|n| &n.info)
    }

    fn try_pod(&self, name: &str) -> Result<&PodInfo> {
        self.state
            .pods
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.state.pods.iter().map(|p| p.name.as_str()).collect();
                anyhow!(
                    "cluster {} has no pod {name:?} (pods: {})",
                    self.prefix(),
                    names.join(", ")
                )
            })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep || self.torn_down {
            return;
        }
        if thread::panicking() {
            for node in &self.state.nodes {
                eprintln!(
                    "--- last lines of {} ---\n{}",
                    node.info.agent_log.display(),
                    sys::tail(&node.info.agent_log, LOG_TAIL_LINES)
                );
            }
            if let Some(ctl) = &self.state.control {
                eprintln!(
                    "--- last lines of {} ---\n{}",
                    ctl.info.log.display(),
                    sys::tail(&ctl.info.log, LOG_TAIL_LINES)
                );
            }
        }
        let (_, errors) = self.teardown();
        if !errors.is_empty() {
            eprintln!(
                "warning: tearing down cluster {}:\n  {}",
                self.prefix(),
                errors.join("\n  ")
            );
        }
    }
}

/// The prefix in `/run/mesh-cluster/current`, if any.
/// Waits for `child` to exit, polling every `poll`; after `limit` kills it
/// and yields `None`.
pub fn wait_or_kill(
    child: &mut std::process::Child,
    limit: Duration,
    poll: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(poll);
    }
}

pub fn current_prefix() -> Result<Option<String>> {
    let path = Path::new(STATE_ROOT).join("current");
    match fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim().to_string()).filter(|p| !p.is_empty())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context(format!("reading {}", path.display())),
    }
}

/// Tears down every cluster whose owner process is gone (every cluster with `all`),
/// then removes any netns, cgroup or pin dir named after a prefix that has no state
/// dir. Returns one line per prefix removed.
pub fn sweep(all: bool) -> Result<Vec<String>> {
    let roots = Roots {
        state: PathBuf::from(STATE_ROOT),
        cgroup2: sys::cgroup2_mount()?,
        bpffs: PathBuf::from(sys::BPFFS),
    };
    let mut removed = Vec::new();
    let mut errors = Vec::new();

    for prefix in prefixed_entries(&roots.state) {
        let state_dir = roots.state_dir(&prefix);
        let (reason, state) = match State::read(&state_dir) {
            Ok(state) => match state.owner {
                _ if all => ("--all".to_string(), Some(state)),
                Some(owner) if !owner.is_alive() => (
                    format!("its owner, pid {}, is gone", owner.pid),
                    Some(state),
                ),
                _ => continue,
            },
            Err(e) => {
                let age = fs::metadata(&state_dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .unwrap_or_default();
                if !all && age <= STATE_GRACE {
                    continue;
                }
                (format!("unreadable state: {e:#}"), None)
            }
        };
        let (items, errs) = match state {
            Some(state) => Cluster::from_state(state, state_dir, true).teardown(),
            None => purge(&Leftovers::of(&prefix, &roots)),
        };
        removed.push(format!("{prefix} ({reason}): {}", summarize(&items)));
        errors.extend(errs.into_iter().map(|e| format!("{prefix}: {e}")));
    }

    let mut orphans = BTreeSet::new();
    for name in sys::netns_list()? {
        if let Some(prefix) = plan::prefix_of(&name) {
            orphans.insert(prefix.to_string());
        }
    }
    orphans.extend(prefixed_entries(&roots.cgroup2));
    orphans.extend(prefixed_entries(&roots.bpffs));
    for prefix in orphans {
        if roots.state_dir(&prefix).exists() {
            continue;
        }
        let (items, errs) = purge(&Leftovers::of(&prefix, &roots));
        removed.push(format!("{prefix} (no state dir): {}", summarize(&items)));
        errors.extend(errs.into_iter().map(|e| format!("{prefix}: {e}")));
    }

    if let Some(current) = current_prefix()?
        && !roots.state_dir(&current).exists()
    {
        let path = roots.current_file();
        match fs::remove_file(&path) {
            Ok(()) => removed.push(format!("{} (pointed at {current})", path.display())),
            Err(e) => errors.push(format!("removing {}: {e}", path.display())),
        }
    }

    if errors.is_empty() {
        Ok(removed)
    } else {
        bail!(
            "sweep removed [{}] but failed:\n  {}",
            removed.join("; "),
            errors.join("\n  ")
        )
    }
}

/// Names in a directory that are cluster prefixes.
fn prefixed_entries(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|name| plan::is_prefix(name))
        .collect()
}

fn summarize(items: &[String]) -> String {
    if items.is_empty() {
        "nothing left".to_string()
    } else {
        items.join(", ")
    }
}

/// Where one prefix's things live, found by name alone.
struct Leftovers {
    prefix: String,
    cgroup_root: PathBuf,
    bpf_root: PathBuf,
    state_dir: PathBuf,
}

impl Leftovers {
    fn of(prefix: &str, roots: &Roots) -> Leftovers {
        Leftovers {
            prefix: prefix.to_string(),
            cgroup_root: roots.cgroup_root(prefix),
            bpf_root: roots.bpf_root(prefix),
            state_dir: roots.state_dir(prefix),
        }
    }
}

/// Kills what runs in the prefix's cgroups and netns, then deletes the netns, the
/// cgroups, the pin dir and the state dir. Best effort: (removed, errors).
fn purge(left: &Leftovers) -> (Vec<String>, Vec<String>) {
    let mut removed = Vec::new();
    let mut errors = Vec::new();

    let netns: Vec<String> = match sys::netns_list() {
        Ok(names) => names
            .into_iter()
            .filter(|n| plan::prefix_of(n) == Some(left.prefix.as_str()))
            .collect(),
        Err(e) => {
            errors.push(format!("{e:#}"));
            Vec::new()
        }
    };
    for ns in &netns {
        match sys::netns_pids(ns) {
            Ok(pids) => pids
                .into_iter()
                .for_each(|pid| sys::signal(pid, libc::SIGKILL)),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if let Err(e) = sys::cgroup_kill(&left.cgroup_root, KILL_TIMEOUT) {
        errors.push(format!("{e:#}"));
    }
    let mut deleted = 0;
    for ns in &netns {
        match sys::netns_delete(ns) {
            Ok(()) => deleted += 1,
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if deleted > 0 {
        removed.push(format!("{deleted} netns"));
    }

    // The agents leave their links pinned (a stopped agent keeps pods fail closed):
    // unpinning detaches the programs, before their cgroups go.
    if sys::exists(&left.bpf_root) {
        match fs::remove_dir_all(&left.bpf_root) {
            Ok(()) => removed.push(format!("pins {}", left.bpf_root.display())),
            Err(e) => errors.push(format!("removing {}: {e}", left.bpf_root.display())),
        }
    }
    if left.cgroup_root.exists() {
        match sys::cgroup_remove_tree(&left.cgroup_root) {
            Ok(()) => removed.push(format!("cgroup {}", left.cgroup_root.display())),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if sys::exists(&left.state_dir) {
        match fs::remove_dir_all(&left.state_dir) {
            Ok(()) => removed.push(format!("state {}", left.state_dir.display())),
            Err(e) => errors.push(format!("removing {}: {e}", left.state_dir.display())),
        }
    }
    if current_prefix().ok().flatten().as_deref() == Some(left.prefix.as_str()) {
        let _ = fs::remove_file(Path::new(STATE_ROOT).join("current"));
    }
    (removed, errors)
}

/// Picks an unused prefix and claims it by creating its state dir.
fn claim_prefix(roots: &Roots) -> Result<String> {
    let netns = sys::netns_list()?;
    for _ in 0..32 {
        let prefix = plan::random_prefix().context("reading /dev/urandom")?;
        let taken = netns
            .iter()
            .any(|n| plan::prefix_of(n) == Some(prefix.as_str()))
            || roots.cgroup_root(&prefix).exists()
            || roots.bpf_root(&prefix).exists();
        if taken {
            continue;
        }
        match fs::create_dir(roots.state_dir(&prefix)) {
            Ok(()) => return Ok(prefix),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).context(format!("creating {}", roots.state_dir(&prefix).display()));
            }
        }
    }
    bail!("no free cluster prefix after 32 tries")
}

/// Writes a file only root can read (mode 0600 from its creation).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn existing_file(path: &Path, what: &str, hint: &str) -> Result<PathBuf> {
    let path = std::path::absolute(path)?;
    anyhow::ensure!(path.is_file(), "no {what} at {}: {hint}", path.display());
    Ok(path)
}

/// What `meshctl apply -f -` printed, or an error with its stderr;
/// `through` (` through replica 1`) says which control server it asked.
fn applied(out: std::process::Output, through: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`meshctl apply -f -`{through} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_can_be_shared_across_test_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Cluster>();
    }

    #[test]
    fn missing_binaries_say_how_to_build_them() {
        let spec = ClusterSpec {
            agent_bin: "/nonexistent/mesh-agent".into(),
            ..ClusterSpec::default()
        };
        let err = Cluster::up(&spec)
            .err()
            .expect("no agent binary")
            .to_string();
        assert!(err.contains("/nonexistent/mesh-agent"), "{err}");
        assert!(err.contains("cargo build --release -p mesh-agent"), "{err}");
    }

    #[test]
    fn default_paths_are_in_the_workspace_target_dir() {
        let spec = ClusterSpec::default();
        assert!(spec.agent_bin.ends_with("release/mesh-agent"));
        assert!(spec.bpf_object.ends_with("bpf/mesh-ebpf.o"));
        assert!(workspace_root().join("xtask").join("Cargo.toml").is_file());
        assert!(spec.enroll_all);
        assert!(
            spec.control_bin
                .as_deref()
                .is_some_and(|p| p.ends_with("release/mesh-control"))
        );
        assert!(spec.meshctl_bin.ends_with("release/meshctl"));
    }
}
