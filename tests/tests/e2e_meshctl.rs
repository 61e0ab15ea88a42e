//! `meshctl` against a node agent's admin socket on a real local cluster
//! (3 nodes, 2 pods each): every `-o json` answer parses as its admin type
//! and matches what the cluster holds, tables line up, and a socket nobody
//! serves is named in the error.
mod support;

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt,
    path::Path,
    process::Output,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_api::admin::{AttachTarget, BpfView, ConfigView, Holder, IdentityStatus, Status};
use serde::de::DeserializeOwned;
use support::*;
use xtask::cluster::{Cluster, default_meshctl_bin};

const SETTLE: Duration = Duration::from_secs(15);

/// A Service on node1-pod1, a route and a policy of each kind on it.
const CONFIG: &str = "apiVersion: mesh.dev/v1alpha1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  vips: [198.18.100.1]
  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
  selector: {app: node1-pod1}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: default}
spec:
  parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]
  rules: [{backendRefs: [{name: echo, port: 80}]}]
---
apiVersion: mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: retry, namespace: default}
spec:
  targetRef: {kind: Service, name: echo}
  retries: {attempts: 2}
---
apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: from-default, namespace: default}
spec:
  selector: {matchLabels: {app: node1-pod1}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [default]}}]
";

fn meshctl(socket: &Path, args: &[&str]) -> Output {
    std::process::Command::new(default_meshctl_bin())
        .arg("--admin")
        .arg(socket)
        .args(args)
        .output()
        .expect("run meshctl")
}

fn meshctl_ok(socket: &Path, args: &[&str]) -> String {
    let out = meshctl(socket, args);
    assert!(
        out.status.success(),
        "meshctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `meshctl <command> -o json`, parsed as the admin type it must be.
fn json<T: DeserializeOwned>(socket: &Path, command: &str) -> T {
    let out = meshctl_ok(socket, &[command, "-o", "json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("meshctl {command} -o json: {e}: {out}"))
}

/// Every table in `out` (a block with an all-caps header line): each row's
/// cells start where the header's do. Returns how many tables it saw.
fn assert_aligned(out: &str) -> usize {
    let mut tables = 0;
    for block in out.split("\n\n") {
        let lines: Vec<&str> = block.lines().collect();
        let Some(start) = lines.iter().position(|l| {
            !l.is_empty() && !l.chars().any(|c| c.is_lowercase()) && l.contains("   ")
        }) else {
            continue;
        };
        tables += 1;
        let header = lines[start];
        let offsets: Vec<usize> = (0..header.len())
            .filter(|&i| i == 0 || (header.as_bytes()[i] != b' ' && header[..i].ends_with("  ")))
            .collect();
        for row in &lines[start + 1..] {
            for &k in &offsets[1..] {
                assert!(
                    row.len() > k && &row[k - 3..k] == "   " && row.as_bytes()[k] != b' ',
                    "a cell does not start at offset {k}:\n{header}\n{row}\nin\n{out}"
                );
            }
        }
    }
    tables
}

fn enrolled_ids(cluster: &Cluster, node: &str) -> BTreeSet<u64> {
    cluster
        .pods()
        .iter()
        .filter(|p| p.node == node)
        .map(|p| {
            std::fs::metadata(&p.cgroup)
                .unwrap_or_else(|e| panic!("{}: {e}", p.cgroup.display()))
                .ino()
        })
        .collect()
}

#[test]
fn meshctl_shows_a_nodes_config_bpf_certs_and_status_as_json_and_tables() {
    let Some(cluster) = cluster() else { return };
    let node = cluster.node("node1").clone();
    let socket = node.admin_socket.as_path();
    let ids = enrolled_ids(&cluster, "node1");
    assert_eq!(ids.len(), 2, "node1 has two pods");

    cluster
        .apply(CONFIG)
        .expect("apply a Service, a route and two policies");

    // config: every Workload the cluster registered and what was applied,
    // with versions, and the sync state.
    let all_pods: BTreeSet<String> = cluster.pods().into_iter().map(|p| p.name).collect();
    let config: ConfigView = wait_for("node1 to hold every Workload", SETTLE, |last| {
        let config: ConfigView = json(socket, "config");
        let names: BTreeSet<String> = config.workloads.iter().map(|w| w.name.clone()).collect();
        *last = format!("{config:?}");
        (names == all_pods && config.policies.len() == 2 && config.routes.len() == 1)
            .then_some(config)
    });
    let echo = &config.services[..];
    assert_eq!(echo.len(), 1, "{echo:?}");
    assert_eq!(
        (
            echo[0].name.as_str(),
            &echo[0].vips[..],
            &echo[0].endpoints[..]
        ),
        (
            "echo",
            &["198.18.100.1".to_owned()][..],
            &["node1-pod1".to_owned()][..]
        )
    );
    assert_eq!(
        (echo[0].ports[0].port, echo[0].ports[0].target_port),
        (80, 8080)
    );
    assert_eq!(config.routes[0].name, "split");
    assert_eq!(config.routes[0].spec["parentRefs"][0]["name"], "echo");
    let kinds: BTreeSet<&str> = config.policies.iter().map(|p| p.kind.as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["AuthorizationPolicy", "TrafficPolicy"])
    );
    assert!(!config.version.is_empty(), "{config:?}");
    let sync = config
        .sync
        .as_ref()
        .expect("sync state with a control server");
    assert!(sync.connected, "{sync:?}");
    for w in &config.workloads {
        assert!(!w.version.is_empty(), "{w:?}");
        let pod = cluster.pod(&w.name);
        assert_eq!(
            (w.node.as_str(), w.ip.clone()),
            (pod.node.as_str(), pod.ip.to_string())
        );
    }
    assert!(
        config
            .resources
            .iter()
            .any(|r| r.key == "Workload/default/node1-pod1"),
        "{config:?}"
    );

    // bpf: the programs and their targets, the enrolled cgroups, the maps.
    let bpf: BpfView = json(socket, "bpf");
    let on_root: Vec<&str> = bpf
        .programs
        .iter()
        .filter(|p| {
            p.target
                == AttachTarget::PodCgroupRoot {
                    path: node.pods_cgroup.clone(),
                }
        })
        .map(|p| p.program.as_str())
        .collect();
    assert_eq!(
        on_root,
        [
            "mesh_connect4",
            "mesh_connect6",
            "mesh_sock_ops",
            "mesh_strict"
        ],
        "{bpf:#?}"
    );
    let agent_ops: Vec<_> = bpf
        .programs
        .iter()
        .filter(|p| p.program == "mesh_agent_sock_ops")
        .collect();
    assert_eq!(agent_ops.len(), 1, "{bpf:#?}");
    assert_eq!(agent_ops[0].held, Holder::Agent);
    assert_eq!(
        agent_ops[0].target,
        AttachTarget::AgentCgroup {
            path: node.agent_cgroup.clone()
        }
    );
    let inbound: BTreeSet<u64> = bpf
        .programs
        .iter()
        .filter(|p| p.program == "mesh_inbound")
        .map(|p| match &p.target {
            AttachTarget::PodNetns { cgroup_id, pod, .. } => {
                assert!(pod.is_some(), "{p:?}");
                *cgroup_id
            }
            other => panic!("mesh_inbound on {other:?}"),
        })
        .collect();
    assert_eq!(inbound, ids, "mesh_inbound once per enrolled pod: {bpf:#?}");
    assert_eq!(
        bpf.programs
            .iter()
            .filter(|p| p.program == "mesh_inbound")
            .count(),
        ids.len()
    );
    for p in &bpf.programs {
        assert!(p.attached, "{p:?}");
        assert!(p.program_id.is_some(), "{p:?}");
        if p.held == Holder::Pinned {
            assert!(
                p.pin
                    .as_ref()
                    .is_some_and(|pin| pin.starts_with(&bpf.pin_dir)),
                "{p:?}"
            );
            assert!(p.link_id.is_some(), "{p:?}");
        }
    }
    let enrolled: BTreeSet<u64> = bpf.enrolled.iter().map(|e| e.cgroup_id).collect();
    assert_eq!(enrolled, ids, "{:?}", bpf.enrolled);
    assert!(
        bpf.enrolled.iter().all(|e| e.in_kernel && e.pod.is_some()),
        "{:?}",
        bpf.enrolled
    );
    let map = |name: &str| {
        bpf.maps
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no map {name}: {:?}", bpf.maps))
    };
    for m in &bpf.maps {
        assert!(m.error.is_none() && m.max_entries > 0, "{m:?}");
        assert!(m.entries <= u64::from(m.max_entries), "{m:?}");
    }
    assert_eq!(bpf.maps.len(), 10, "{:?}", bpf.maps);
    assert_eq!(map("TCP_STATS").map_type, "lru_percpu_hash");
    assert_eq!(map("TCP_STATS").max_entries, 4096);
    assert_eq!(map("ENROLLED").entries, ids.len() as u64);
    assert_eq!(map("ENROLLED").max_entries, 4096);
    // Both of node1's pods are workloads of node1, with their listeners.
    assert_eq!(map("INBOUND_PODS").entries, 2);
    assert_eq!(map("INBOUND_LISTENERS").entries, 2);
    assert!(
        bpf.decisions.contains_key("redirected"),
        "{:?}",
        bpf.decisions
    );

    // certs: the node's and each local workload identity's certificate.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let identity: IdentityStatus = wait_for("node1's certificates", SETTLE, |last| {
        let identity: Option<IdentityStatus> = json(socket, "certs");
        *last = format!("{identity:?}");
        identity.filter(|i| {
            std::iter::once(&i.node)
                .chain(&i.certificates)
                .all(|c| c.not_after_unix.is_some_and(|t| t > now))
        })
    });
    assert!(
        identity.node.identity.ends_with("/sa/node-node1"),
        "{identity:?}"
    );
    assert!(identity.trust_bundle);
    assert!(!identity.certificates.is_empty(), "{identity:?}");

    // status: the same node and pods.
    let status: Status = json(socket, "status");
    assert_eq!(status.node, "node1");
    let status_ids: BTreeSet<u64> = status.enrolled.iter().map(|p| p.cgroup_id).collect();
    assert_eq!(status_ids, ids);
    // --json stays an alias of -o json.
    let alias: Status =
        serde_json::from_str(&meshctl_ok(socket, &["--json", "status"])).expect("status --json");
    assert_eq!(alias.node, "node1");

    // Tables line up, and name what the JSON named.
    for (command, tables) in [("config", 4), ("bpf", 4), ("certs", 1), ("status", 3)] {
        let out = meshctl_ok(socket, &[command]);
        assert!(assert_aligned(&out) >= tables, "meshctl {command}:\n{out}");
        if command == "bpf" {
            for id in &ids {
                assert!(out.contains(&id.to_string()), "{out}");
            }
        }
    }
    let connections = meshctl_ok(socket, &["connections"]);
    assert!(connections.starts_with("ID "), "{connections}");

    // No agent on a socket: the error names it, for every agent command.
    let missing = cluster.state_dir().join("no-such-agent.sock");
    for command in ["status", "config", "bpf", "certs", "connections"] {
        let out = meshctl(&missing, &[command, "-o", "json"]);
        assert!(!out.status.success(), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("no agent answers on {}: ", missing.display()))
                && stderr.contains("pass --admin"),
            "{command}: {stderr}"
        );
    }
}
