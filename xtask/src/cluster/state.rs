//! `state.json`: everything needed to address a cluster's pods and to tear it down,
//! from any process.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::plan::{ControlInfo, EtcdInfo, NodeInfo, PodInfo};

pub const STATE_FILE: &str = "state.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub prefix: String,
    /// The process whose exit makes the cluster garbage for `sweep`. `None` once the
    /// cluster is kept (CLI `up`): then only `down` or `sweep --all` remove it.
    pub owner: Option<Owner>,
    pub fabric_netns: String,
    /// `<cg2>/<prefix>`
    pub cgroup_root: PathBuf,
    /// `<bpffs>/<prefix>`
    pub bpf_root: PathBuf,
    pub agent_bin: PathBuf,
    pub bpf_object: PathBuf,
    pub agent_args: Vec<String>,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodInfo>,
    /// Pods the cluster asked their agent to enroll (and did not unenroll since).
    pub enrolled: BTreeSet<String>,
    /// The control plane, if the cluster runs one.
    #[serde(default)]
    pub control: Option<ControlState>,
    /// Replicas 1.. of the control plane (`control` is replica 0), on the etcd store.
    #[serde(default)]
    pub replicas: Vec<ControlState>,
    /// The etcd members the replicas share, in the fabric netns.
    #[serde(default)]
    pub etcd: Vec<EtcdState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdState {
    #[serde(flatten)]
    pub info: EtcdInfo,
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    #[serde(flatten)]
    pub info: ControlInfo,
    /// `mesh-control`
    pub bin: PathBuf,
    /// `meshctl`
    pub meshctl_bin: PathBuf,
    pub pid: Option<u32>,
    /// `mesh-control --cert-ttl`; `None`: its default (24h).
    #[serde(default)]
    pub cert_ttl: Option<String>,
    /// `mesh-control --store` (`etcd://...`); `None`: its file store.
    #[serde(default)]
    pub store: Option<String>,
}

impl ControlState {
    /// The root CA agents trust: `<store-dir>/ca.crt` with an etcd store (the root
    /// lives in etcd), `<store-dir>/ca/ca.crt` with the file store.
    pub fn ca_bundle(&self) -> PathBuf {
        match self.store {
            Some(_) => self.info.store_dir.join("ca.crt"),
            None => self.info.ca_bundle(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`, so that a reused pid is not mistaken for the owner.
    pub start_time: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    #[serde(flatten)]
    pub info: NodeInfo,
    pub agent_pid: Option<u32>,
}

impl State {
    pub fn read(state_dir: &Path) -> Result<State> {
        let path = state_dir.join(STATE_FILE);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Written to a temporary file and renamed, so a reader never sees half a state.
    pub fn write(&self, state_dir: &Path) -> Result<()> {
        let path = state_dir.join(STATE_FILE);
        let tmp = state_dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self)?;
        fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
    }
}

impl Owner {
    pub fn current() -> Result<Owner> {
        let pid = std::process::id();
        let start_time = process_start_time(pid).context("reading this process's start time")?;
        Ok(Owner { pid, start_time })
    }

    /// A zombie counts as gone: nothing may reap it soon (pid 1 here does not).
    pub fn is_alive(&self) -> bool {
        let Ok(stat) = fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        parse_stat(&stat)
            .is_some_and(|(state, start)| start == self.start_time && state != 'Z' && state != 'X')
    }
}

fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, start)| start)
}

/// (state, starttime) from `/proc/<pid>/stat`. The comm field may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    // state is field 3, starttime field 22.
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::super::plan::{self, Roots};
    use super::*;

    #[test]
    fn state_round_trips_through_a_file() {
        let dir = std::env::temp_dir().join(format!("xtask-state-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let roots = Roots {
            state: dir.clone(),
            cgroup2: "/sys/fs/cgroup/unified".into(),
            bpffs: "/sys/fs/bpf".into(),
        };
        let nodes = plan::nodes("mc0000aa", 2, &roots);
        let pods = plan::pods("mc0000aa", &nodes, 2, &roots);
        let state = State {
            prefix: "mc0000aa".into(),
            owner: Some(Owner::current().unwrap()),
            fabric_netns: plan::fabric_netns("mc0000aa"),
            cgroup_root: roots.cgroup_root("mc0000aa"),
            bpf_root: roots.bpf_root("mc0000aa"),
            agent_bin: "/bin/agent".into(),
            bpf_object: "/x/mesh-ebpf.o".into(),
            agent_args: vec!["--foo".into()],
            nodes: nodes
                .into_iter()
                .map(|info| NodeState {
                    info,
                    agent_pid: Some(42),
                })
                .collect(),
            pods,
            enrolled: ["node1-pod1".to_string()].into(),
            control: Some(ControlState {
                info: plan::control("mc0000aa", &roots),
                bin: "/bin/mesh-control".into(),
                meshctl_bin: "/bin/meshctl".into(),
                pid: Some(43),
                cert_ttl: Some("2m".into()),
                store: None,
            }),
            replicas: Vec::new(),
            etcd: Vec::new(),
        };
        state.write(&dir).unwrap();
        let back = State::read(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back, state);

        let json: serde_json::Value = serde_json::to_value(&state).unwrap();
        assert_eq!(json["nodes"][1]["ip"], "198.18.0.12");
        assert_eq!(json["nodes"][1]["agent_pid"], 42);
        assert_eq!(json["pods"][2]["name"], "node2-pod1");
        assert_eq!(json["control"]["pid"], 43);
        assert_eq!(json["control"]["listen"], "198.18.0.2:15012");
    }

    #[test]
    fn owner_liveness_uses_start_time() {
        let me = Owner::current().unwrap();
        assert!(me.is_alive());
        let reused = Owner {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.is_alive());
    }

    #[test]
    fn stat_parsing_survives_odd_process_names() {
        let stat =
            "123 (a) b (c) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat(stat), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
    }
}
