//! Several `mesh-control` replicas on one etcd store ([`ClusterSpec::control_replicas`],
//! [`ClusterSpec::etcd_members`](super::ClusterSpec)): the etcd members and replicas
//! 1.. run in the fabric netns, each in a cgroup of its own under the cluster's, so
//! that teardown and `sweep` kill them as they kill the rest.
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::state::ControlState;
use super::sys::{self, Placement};
use super::{Cluster, KILL_TIMEOUT, LOG_TAIL_LINES, POLL, plan};

const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);
const REPLICA_READY_TIMEOUT: Duration = Duration::from_secs(20);

impl Cluster {
    /// How many control replicas the cluster runs (0 without a control plane).
    pub fn control_replicas(&self) -> usize {
        self.state.control.iter().count() + self.state.replicas.len()
    }

    /// Every replica's URL, comma-separated: the agents' `--control-addr`.
    pub(super) fn control_urls(&self) -> String {
        let urls: Vec<String> = self
            .state
            .control
            .iter()
            .chain(&self.state.replicas)
            .map(|c| c.info.url())
            .collect();
        urls.join(",")
    }

    fn replica(&self, r: usize) -> Result<&ControlState> {
        let found = match r {
            0 => self.state.control.as_ref(),
            _ => self.state.replicas.get(r - 1),
        };
        found.ok_or_else(|| {
            anyhow!(
                "cluster {} has no control replica {r} (it runs {})",
                self.prefix(),
                self.control_replicas()
            )
        })
    }

    fn replica_mut(&mut self, r: usize) -> Option<&mut ControlState> {
        match r {
            0 => self.state.control.as_mut(),
            _ => self.state.replicas.get_mut(r - 1),
        }
    }

    /// `<state>/control.sock` for replica 0, `<state>/control<r>.sock` for the others.
    pub fn control_replica_socket(&self, r: usize) -> Result<PathBuf> {
        Ok(self.replica(r)?.info.socket.clone())
    }

    /// Replica `r`'s `https://` address, as agents reach it.
    pub fn control_replica_url(&self, r: usize) -> Result<String> {
        Ok(self.replica(r)?.info.url())
    }

    pub fn control_replica_log(&self, r: usize) -> Result<PathBuf> {
        Ok(self.replica(r)?.info.log.clone())
    }

    /// The replica's pid while it is alive in its cgroup.
    pub fn control_replica_pid(&self, r: usize) -> Option<u32> {
        let ctl = self.replica(r).ok()?;
        let pid = ctl.pid?;
        sys::cgroup_pids(&ctl.info.cgroup)
            .contains(&pid)
            .then_some(pid)
    }

    /// `meshctl --control unix://<replica r's socket> <args>`, whatever its exit status.
    pub fn meshctl_on(&self, r: usize, args: &[&str]) -> Result<std::process::Output> {
        self.meshctl_of(self.replica(r)?, args, None)
    }

    /// `meshctl apply -f -` through replica `r`; its stdout, else an error with its stderr.
    pub fn apply_on(&self, r: usize, yaml: &str) -> Result<String> {
        super::applied(
            self.meshctl_of(self.replica(r)?, &["apply", "-f", "-"], Some(yaml))?,
            &format!(" through replica {r}"),
        )
    }

    /// SIGKILLs replica `r` (no drain) and whatever is left in its cgroup.
    pub fn kill_control_replica(&mut self, r: usize) -> Result<()> {
        let cgroup = self.replica(r)?.info.cgroup.clone();
        if let Some(pid) = self.control_replica_pid(r) {
            sys::signal(pid, libc::SIGKILL);
        }
        let killed = sys::cgroup_kill(&cgroup, KILL_TIMEOUT);
        self.reap_replica(r);
        if let Some(ctl) = self.replica_mut(r) {
            ctl.pid = None;
        }
        if self.state_dir.exists() {
            self.save()?;
        }
        killed
    }

    /// Starts replica `r` again (on the shared store) and waits until it answers.
    pub fn start_control_replica(&mut self, r: usize) -> Result<()> {
        if let Some(pid) = self.control_replica_pid(r) {
            bail!("control replica {r} is already running (pid {pid})");
        }
        let ctl = self.replica(r)?.clone();
        let child = self.spawn_replica_process(&ctl)?;
        if let Some(state) = self.replica_mut(r) {
            state.pid = Some(child.id());
        }
        match r {
            0 => self.control = Some(child),
            _ => {
                self.replica_children.insert(r, child);
            }
        }
        self.save()?;
        self.wait_replica_ready(r)
    }

    /// SIGKILLs etcd member `i` (its data stays).
    pub fn kill_etcd_member(&mut self, i: usize) -> Result<()> {
        let member = self
            .state
            .etcd
            .get(i)
            .ok_or_else(|| anyhow!("cluster {} has no etcd member {i}", self.prefix()))?;
        let cgroup = member.info.cgroup.clone();
        let killed = sys::cgroup_kill(&cgroup, KILL_TIMEOUT);
        if let Some(mut child) = self.etcd_children.remove(&i) {
            let _ = child.wait();
        }
        self.state.etcd[i].pid = None;
        self.save()?;
        killed
    }

    /// Starts every etcd member and waits until the cluster serves a read.
    pub(super) fn start_etcd(&mut self) -> Result<()> {
        if self.state.etcd.is_empty() {
            return Ok(());
        }
        let infos: Vec<plan::EtcdInfo> = self.state.etcd.iter().map(|m| m.info.clone()).collect();
        let initial = plan::etcd_initial_cluster(&infos);
        for (i, m) in infos.iter().enumerate() {
            let client = format!("http://{}", m.client);
            let peer = format!("http://{}", m.peer);
            let mut cmd = Command::new("etcd");
            cmd.arg("--name")
                .arg(&m.name)
                .arg("--data-dir")
                .arg(&m.data_dir)
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-token", &self.state.prefix])
                .args(["--initial-cluster-state", "new"])
                // Fast elections on one machine; large applies in one transaction.
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .args(["--max-txn-ops", "20000", "--max-request-bytes", "16777216"]);
            let child =
                self.spawn_in_fabric(cmd, &m.log, &m.cgroup)?
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::NotFound => {
                            anyhow!("etcd is not installed (cargo xtask deps installs etcd-server)")
                        }
                        _ => anyhow::Error::new(e).context("starting etcd"),
                    })?;
            self.state.etcd[i].pid = Some(child.id());
            self.etcd_children.insert(i, child);
        }
        self.save()?;
        let endpoints: Vec<String> = infos
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect();
        let deadline = Instant::now() + ETCD_READY_TIMEOUT;
        loop {
            let out = self
                .fabric_command("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg("--endpoints")
                .arg(endpoints.join(","))
                .args(["--dial-timeout", "1s", "--command-timeout", "2s"])
                .args(["get", "/ready"])
                .stdin(Stdio::null())
                .output()
                .context("running etcdctl")?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = infos
                    .iter()
                    .map(|m| format!("--- {} ---\n{}", m.name, sys::tail(&m.log, LOG_TAIL_LINES)))
                    .collect();
                bail!(
                    "etcd was not ready within {} s ({}); logs:\n{}",
                    ETCD_READY_TIMEOUT.as_secs(),
                    String::from_utf8_lossy(&out.stderr).trim(),
                    logs.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts replicas 1.. and waits for each.
    pub(super) fn start_replicas(&mut self) -> Result<()> {
        for r in 1..self.control_replicas() {
            self.start_control_replica(r)?;
        }
        Ok(())
    }

    /// `mesh-control` of `ctl` in the fabric netns and its cgroup, in its own session,
    /// its output appended to its log.
    pub(super) fn spawn_replica_process(&self, ctl: &ControlState) -> Result<Child> {
        match fs::remove_file(&ctl.info.socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).context(format!("removing {}", ctl.info.socket.display()));
            }
            _ => {}
        }
        let mut cmd = Command::new(&ctl.bin);
        cmd.arg("--listen")
            .arg(ctl.info.listen.to_string())
            .arg("--metrics-addr")
            .arg(ctl.info.metrics.to_string())
            .arg("--operator-socket")
            .arg(&ctl.info.socket)
            .arg("--store-dir")
            .arg(&ctl.info.store_dir)
            .arg("--tokens")
            .arg(&ctl.info.tokens)
            .env("RUST_LOG", "info");
        if let Some(ttl) = &ctl.cert_ttl {
            cmd.arg("--cert-ttl").arg(ttl);
        }
        if let Some(store) = &ctl.store {
            cmd.arg("--store").arg(store);
        }
        self.spawn_in_fabric(cmd, &ctl.info.log, &ctl.info.cgroup)?
            .with_context(|| format!("starting the control server ({})", ctl.bin.display()))
    }

    /// Spawns `cmd` in the fabric netns and `cgroup`, in its own session,
    /// its output appended to `log` after a line naming the command. The
    /// outer error is the log; the inner one the spawn (for the caller to
    /// explain).
    fn spawn_in_fabric(
        &self,
        mut cmd: Command,
        log: &Path,
        cgroup: &Path,
    ) -> Result<io::Result<Child>> {
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        writeln!(out, "--- xtask: starting {cmd:?}")?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        sys::place(
            &mut cmd,
            &Placement {
                netns: Some(&self.state.fabric_netns),
                cgroup: Some(cgroup),
                new_session: true,
            },
        );
        Ok(cmd.spawn())
    }

    fn wait_replica_ready(&mut self, r: usize) -> Result<()> {
        let deadline = Instant::now() + REPLICA_READY_TIMEOUT;
        loop {
            let last = match self.meshctl_on(r, &["get", "workloads", "-A"]) {
                Ok(out) if out.status.success() => return Ok(()),
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
                Err(e) => format!("{e:#}"),
            };
            if self.control_replica_pid(r).is_none() || Instant::now() >= deadline {
                bail!(
                    "control replica {r} did not become ready (last: {last}); last lines of its log:\n{}",
                    sys::tail(&self.replica(r)?.info.log, LOG_TAIL_LINES)
                );
            }
            thread::sleep(POLL);
        }
    }

    fn reap_replica(&mut self, r: usize) {
        let child = match r {
            0 => self.control.take(),
            _ => self.replica_children.remove(&r),
        };
        if let Some(mut child) = child {
            let _ = child.wait();
        }
    }

    /// Kills replicas 1.. and the etcd members (replica 0 is `stop_control`'s); the errors.
    pub(super) fn stop_replicas_and_etcd(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for r in 1..self.control_replicas() {
            if let Err(e) = self.kill_control_replica(r) {
                errors.push(format!("{e:#}"));
            }
        }
        for i in 0..self.state.etcd.len() {
            if let Err(e) = self.kill_etcd_member(i) {
                errors.push(format!("{e:#}"));
            }
        }
        errors
    }
}
