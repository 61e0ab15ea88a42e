//! Agents fail over between mesh-control replicas on etcd (issue #13), on a
//! real local cluster: 2 nodes, 2 replicas (198.18.0.2 and .3) on a real
//! 3-member etcd in the fabric netns, agents given both
//! (`--control-addr https://198.18.0.2:15012,https://198.18.0.3:15012`).
//! A cross-node HTTP loop between pods and a loop of applies (one Service
//! each, through alternating replicas) run throughout; in the middle one
//! etcd member and the replica the agents stream from are SIGKILLed.
mod support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;
use xtask::cluster::{Cluster, ClusterSpec};

const APPLIES: usize = 40;
const KILL_AT: usize = 20;

fn cluster() -> Option<Cluster> {
    if !privileged_env_ready() {
        return None;
    }
    if Command::new("etcd").arg("--version").output().is_err() {
        assert!(
            !required(),
            "etcd is not installed (cargo xtask deps installs etcd-server)"
        );
        eprintln!("SKIPPED: etcd is not installed (cargo xtask deps installs etcd-server)");
        return None;
    }
    let spec = ClusterSpec {
        control_replicas: 2,
        etcd_members: 3,
        ..spec(2, 2)
    };
    Some(Cluster::up(&spec).expect("cluster up"))
}

fn vip(i: usize) -> String {
    format!("198.18.100.{}", 10 + i)
}

/// `meshctl agents --json` through replica `r`: (node, connected, acked revision).
fn agents_on(cluster: &Cluster, r: usize) -> Vec<(String, bool, u64)> {
    let out = cluster
        .meshctl_on(r, &["agents", "--json"])
        .expect("meshctl agents");
    if !out.status.success() {
        return Vec::new();
    }
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.iter()
        .map(|a| {
            (
                a["node"].as_str().unwrap_or("").to_owned(),
                a["connected"] == true,
                a["acked_version"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )
        })
        .collect()
}

/// The revision both agents acknowledge on replica `r`, if both are
/// connected there at the same one of at least `min`.
fn both_acked_on(cluster: &Cluster, r: usize, min: u64) -> Option<u64> {
    let agents = agents_on(cluster, r);
    let on: Vec<u64> = agents
        .iter()
        .filter(|(_, connected, _)| *connected)
        .map(|(_, _, acked)| *acked)
        .collect();
    match on[..] {
        [a, b] if a == b && a >= min => Some(a),
        _ => None,
    }
}

/// One new HTTP connection from `pod` to `url`: the status, or the error.
fn http_once(cluster: &Cluster, pod: &str, url: &str) -> String {
    let out = python_in_pod(cluster, pod)
        .args([
            "-c",
            "import sys, urllib.request\n\
             try:\n  print(urllib.request.urlopen(sys.argv[1], timeout=5).status)\n\
             except Exception as e:\n  print(repr(e))",
            url,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("python in the pod");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn agents_fail_over_between_replicas_on_etcd_under_applies_and_traffic() {
    let Some(mut cluster) = cluster() else { return };
    assert_eq!(cluster.control_replicas(), 2);
    let _server = serve(&cluster, "node2-pod1");
    let url = format!("http://{}/", addr(cluster.pod("node2-pod1").ip, HTTP_PORT));
    let start = wait_for(
        "both agents on replica 0",
        Duration::from_secs(20),
        |last| {
            *last = format!("{:?}", agents_on(&cluster, 0));
            let acked = both_acked_on(&cluster, 0, 1);
            if acked.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            acked
        },
    );
    let http = HttpLoop::start(&cluster, "node1-pod2", &url);
    std::thread::sleep(Duration::from_secs(1));

    let mut retried = Vec::new();
    let mut killed_at = None;
    let mut failover = None;
    for i in 0..APPLIES {
        if i == KILL_AT {
            cluster.kill_etcd_member(0).expect("kill etcd m0");
            cluster.kill_control_replica(0).expect("kill replica 0");
            killed_at = Some(Instant::now());
        }
        let alive0 = killed_at.is_none();
        let through = if alive0 && i % 2 == 0 { 0 } else { 1 };
        let yaml = service_yaml(
            &format!("svc-{i}"),
            &vip(i),
            80,
            u32::from(HTTP_PORT),
            &[("app", "node2-pod1")],
        );
        if let Err(first) = cluster.apply_on(through, &yaml) {
            // A refusal (an etcd member gone mid-commit) is retried once,
            // through the replica that is alive, and must then succeed.
            retried.push(format!("svc-{i} through {through}: {first:#}"));
            cluster
                .apply_on(1, &yaml)
                .unwrap_or_else(|e| panic!("svc-{i}: retried apply failed: {e:#}"));
        }
        if let (Some(at), None) = (killed_at, failover)
            && both_acked_on(&cluster, 1, start + 1).is_some()
        {
            failover = Some(at.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(killed_at) = killed_at else {
        unreachable!("the kill is inside the loop")
    };
    let last_revision = wait_for(
        "both agents acknowledging the last apply on replica 1",
        Duration::from_secs(20),
        |last| {
            let agents = agents_on(&cluster, 1);
            *last = format!("{agents:?}");
            let acked = both_acked_on(&cluster, 1, start + APPLIES as u64);
            if acked.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            acked
        },
    );
    let failover = failover.unwrap_or_else(|| killed_at.elapsed());
    eprintln!(
        "failover (replica 0 and etcd m0 SIGKILLed -> both agents acked on replica 1): {failover:?}; \
         {APPLIES} applies, revisions {start}..{last_revision}, retried: {retried:?}"
    );
    assert_eq!(
        last_revision,
        start + APPLIES as u64,
        "one revision per apply, none lost"
    );
    let (ok, failed, first) = http.finish();
    eprintln!("HTTP loop across the failover: {ok} ok, {failed} failed");
    assert!(ok > 20, "the HTTP loop ran: {ok}");
    assert_eq!(failed, 0, "no request failed; first error: {first}");
    assert!(
        retried.is_empty(),
        "no apply was refused across the kills: {retried:?}"
    );
    let out = cluster
        .meshctl_on(1, &["get", "services", "-A", "-o", "json"])
        .expect("meshctl get");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let docs: Vec<Value> = serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .filter_map(Result::ok)
        .flat_map(|v| match v {
            Value::Array(items) => items,
            // A `List` of them.
            Value::Object(mut list) if list.contains_key("items") => match list.remove("items") {
                Some(Value::Array(items)) => items,
                _ => Vec::new(),
            },
            one => vec![one],
        })
        .collect();
    let services = docs
        .iter()
        .filter(|d| {
            d["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("svc-"))
        })
        .count();
    assert_eq!(services, APPLIES, "every Service is stored: {text}");
    let last_vip = format!("http://{}:80/", vip(APPLIES - 1));
    assert_eq!(
        http_once(&cluster, "node1-pod1", &last_vip),
        "200",
        "a new connection through the last applied Service"
    );

    // Replica 0 restarts on the stored revision; replica 1 goes: the agents
    // come back to it and follow what is applied there.
    cluster.start_control_replica(0).expect("restart replica 0");
    let log =
        std::fs::read_to_string(cluster.control_replica_log(0).expect("log")).unwrap_or_default();
    let restarted = log.rsplit("--- xtask: starting").next().unwrap_or("");
    assert!(
        restarted.contains(&format!("revision={last_revision}")),
        "replica 0 did not resume at revision {last_revision}:\n{restarted}"
    );
    cluster.kill_control_replica(1).expect("kill replica 1");
    let back = Instant::now();
    cluster
        .apply_on(
            0,
            &service_yaml(
                "after",
                &vip(APPLIES),
                80,
                u32::from(HTTP_PORT),
                &[("app", "node2-pod1")],
            ),
        )
        .expect("apply through the restarted replica");
    wait_for(
        "both agents acknowledging on the restarted replica 0",
        Duration::from_secs(20),
        |last| {
            *last = format!("{:?}", agents_on(&cluster, 0));
            let acked = both_acked_on(&cluster, 0, last_revision + 1);
            if acked.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            acked
        },
    );
    eprintln!(
        "failback (replica 1 SIGKILLed -> both agents acked on the restarted replica 0): {:?}",
        back.elapsed()
    );
    assert_eq!(
        http_once(
            &cluster,
            "node1-pod1",
            &format!("http://{}:80/", vip(APPLIES))
        ),
        "200",
        "a Service applied through the restarted replica"
    );
}
