//! Transparent interception on a real local cluster (3 nodes, 2 pods each):
//! kernel redirect, the node agent, and the bytes it carries.
mod support;

use std::{net::Ipv4Addr, time::Duration};

use support::*;

/// Where the client's connection came from, as the server saw it.
fn server_peer(server: &Server) -> Ipv4Addr {
    let entries = server.wait_for_entries(1);
    let last = entries.last().expect("server logged the connection");
    last["peer"]
        .as_str()
        .and_then(|p| p.split(':').next())
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("server log entry without peer: {last}"))
}

#[test]
fn cross_node_and_same_node_connections_go_through_the_agent() {
    let Some(cluster) = cluster() else { return };
    let remote = serve(&cluster, "node2-pod1");
    let local = serve(&cluster, "node1-pod2");

    for (server, expect_peer) in [
        // Cross-node: node1's agent tunnels to node2's, which dials the pod
        // from node2's pod gateway.
        (&remote, cluster.gateway_ip("node2")),
        // Same node: the agent dials from node1's pod gateway.
        (&local, cluster.gateway_ip("node1")),
    ] {
        let dst = addr(cluster.pod(&server.name).ip, ECHO_PORT);
        let report = client_ok(
            &cluster,
            "node1-pod1",
            &["tcp", "--addr", &dst, "--bytes", "4096"],
        );
        assert_eq!(
            report["server"],
            server.name.as_str(),
            "answered by the destination pod"
        );
        assert_eq!(report["received"], 4096);

        let peer = server_peer(server);
        assert_eq!(
            peer, expect_peer,
            "{}: the server must see the agent, not the client pod, as its peer",
            server.name
        );

        let conns = agent_connections(&cluster, "node1");
        let rec = conns
            .iter()
            .find(|c| c["orig_dst"] == dst.as_str())
            .unwrap_or_else(|| panic!("node1 agent has no record of {dst}: {conns:?}"));
        assert_eq!(
            rec["src_pod"], "node1-pod1",
            "source pod from the kernel record"
        );
        assert_eq!(
            rec["peer"].as_str().unwrap().split(':').next().unwrap(),
            cluster.pod("node1-pod1").ip.to_string()
        );
        assert_eq!(rec["bytes_sent"], 4096);
        // Greeting line plus the echo.
        assert_eq!(rec["bytes_received"], 4096 + server.name.len() as u64 + 1);
    }
    assert!(decision(&cluster, "node1", "redirected") >= 2);
    assert!(decision(&cluster, "node1", "tuple_recorded") >= 2);
    // The other nodes' agents carried nothing of this: each node has its own.
    assert!(agent_connections(&cluster, "node3").is_empty());
}

#[test]
fn hundred_megabytes_each_way_arrive_byte_exact_with_half_close() {
    let Some(cluster) = cluster() else { return };
    let server = serve(&cluster, "node3-pod1");
    let dst = addr(cluster.pod("node3-pod1").ip, ECHO_PORT);
    // The client writes 100 MB, shuts down its write side, then must still
    // read the whole echo (100 MB) before EOF.
    let report = client_ok(
        &cluster,
        "node1-pod1",
        &[
            "tcp",
            "--addr",
            &dst,
            "--bytes",
            "100000000",
            "--timeout-secs",
            "120",
        ],
    );
    assert_eq!(report["ok"], true);
    assert_eq!(report["sent"], 100_000_000u64);
    assert_eq!(report["received"], 100_000_000u64);
    let entries = server.wait_for_entries(1);
    let seen = entries.last().unwrap();
    assert_eq!(
        seen["bytes_in"], 100_000_000u64,
        "server received every byte"
    );
    let rec = agent_connections(&cluster, "node1")
        .into_iter()
        .find(|c| c["orig_dst"] == dst.as_str())
        .expect("agent record");
    assert_eq!(
        rec["state"], "closed",
        "ended cleanly, not with an error: {rec}"
    );
    assert_eq!(rec["bytes_sent"], 100_000_000u64);
}

#[test]
fn thousand_concurrent_connections_from_one_pod_complete() {
    let Some(cluster) = cluster() else { return };
    let _server = serve(&cluster, "node2-pod2");
    let before = decision(&cluster, "node1", "redirected");
    let dst = addr(cluster.pod("node2-pod2").ip, ECHO_PORT);
    let report = client_ok(
        &cluster,
        "node1-pod2",
        &[
            "concurrent",
            "--addr",
            &dst,
            "--conns",
            "1000",
            "--bytes",
            "1000",
            "--timeout-secs",
            "60",
        ],
    );
    assert_eq!(report["ok"], 1000, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["servers"]["node2-pod2"], 1000);
    assert_eq!(decision(&cluster, "node1", "redirected") - before, 1000);
}

#[test]
fn enrolment_changes_apply_to_the_next_connection() {
    let Some(cluster) = cluster() else { return };
    let server = serve(&cluster, "node2-pod1");
    let dst = addr(cluster.pod("node2-pod1").ip, ECHO_PORT);
    let client_ip = cluster.pod("node1-pod1").ip;
    // Through the agents (and the tunnel), the server sees node2's agent.
    let agent_ip = cluster.gateway_ip("node2");

    // Unenrolled, node1-pod1 reaches node2-pod1 in plaintext, which a
    // STRICT workload (the default) would refuse; PERMISSIVE, node2's agent
    // judges it at :15006 and carries it (so the server sees that agent
    // either way, and the kernel counters tell the two paths apart).
    set_mtls_mode(&cluster, "node2-pod1", "PERMISSIVE");
    wait_for(
        "node2-pod1 to accept plaintext",
        Duration::from_secs(10),
        |last| {
            cluster.unenroll("node1-pod1").ok();
            let run = client(
                &cluster,
                "node1-pod1",
                &["tcp", "--addr", &dst, "--timeout-secs", "1"],
            );
            *last = run.stderr.clone();
            run.ok.then_some(())
        },
    );
    server.wait_for_entries(1);
    cluster.enroll("node1-pod1").expect("enroll again");
    let mut expect = server.peers();
    for enrolled in [false, true, false] {
        if enrolled {
            cluster.enroll("node1-pod1").expect("enroll");
        } else {
            cluster.unenroll("node1-pod1").expect("unenroll");
        }
        let not_enrolled_before = decision(&cluster, "node1", "not_enrolled");
        let plaintext_before = decision(&cluster, "node2", "inbound_redirected");
        client_ok(&cluster, "node1-pod1", &["tcp", "--addr", &dst]);
        expect.push(agent_ip);
        let entries = server.wait_for_entries(expect.len());
        let peers: Vec<Ipv4Addr> = server.peers();
        assert_eq!(peers, expect, "enrolled={enrolled}; log: {entries:?}");
        assert!(!peers.contains(&client_ip), "around the agents: {peers:?}");
        let delta = decision(&cluster, "node1", "not_enrolled") - not_enrolled_before;
        assert_eq!(
            delta,
            u64::from(!enrolled),
            "not_enrolled counted only when unenrolled"
        );
        let delta = decision(&cluster, "node2", "inbound_redirected") - plaintext_before;
        assert_eq!(
            delta,
            u64::from(!enrolled),
            "handed to node2's agent at :15006 only when not through the tunnel"
        );
    }
}

#[test]
fn connections_to_the_outbound_port_without_a_redirect_are_refused() {
    let Some(cluster) = cluster() else { return };
    let listener = addr(cluster.gateway_ip("node1"), 15001);
    // From an enrolled pod (the kernel never redirects a connect to the agent
    // itself), and from a pod on another node.
    for pod in ["node1-pod1", "node2-pod1"] {
        let run = client(
            &cluster,
            pod,
            &["tcp", "--addr", &listener, "--timeout-secs", "5"],
        );
        assert!(
            !run.ok,
            "{pod}: a forged connection to :15001 must fail: {}",
            run.report
        );
    }
    let metrics = cluster.admin_get("node1", "/status").expect("status");
    assert!(metrics["decisions"]["agent_destination"].as_u64().unwrap() >= 1);
    let text = metrics_text(&cluster, "node1");
    let refused = text
        .lines()
        .find(|l| {
            l.starts_with(
                "mesh_agent_outbound_connections_total{result=\"refused_not_redirected\"}",
            )
        })
        .unwrap_or_else(|| panic!("no refusal counter in metrics:\n{text}"));
    let n: u64 = refused.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(n, 2, "each refusal is counted");
}

/// The agent's Prometheus page, fetched from inside its node.
fn metrics_text(cluster: &xtask::cluster::Cluster, node: &str) -> String {
    let out = cluster
        .node_command(node, "curl")
        .args(["-sf", "http://127.0.0.1:15020/metrics"])
        .output()
        .expect("fetch metrics");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What an agent attaches to its node's pod cgroup, sorted.
const PROGRAMS: [&str; 4] = [
    "mesh_connect4",
    "mesh_connect6",
    "mesh_sock_ops",
    "mesh_strict",
];

#[test]
fn uninstalled_agent_leaves_nothing_attached_and_restart_replaces_stale_links() {
    let Some(mut cluster) = cluster() else { return };
    let pods_cgroup = cluster.node("node1").pods_cgroup.clone();
    let names = |progs: &[serde_json::Value]| -> Vec<String> {
        let mut n: Vec<String> = progs
            .iter()
            .map(|p| p["name"].as_str().unwrap_or("?").to_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&attached_programs(&pods_cgroup)), PROGRAMS);

    // A stopped agent keeps its links pinned (pods fail closed); only an
    // explicit uninstall removes them.
    cluster.stop_agent("node1").expect("stop agent");
    assert_eq!(names(&attached_programs(&pods_cgroup)), PROGRAMS);
    cluster.uninstall_agent("node1").expect("uninstall");
    assert!(
        attached_programs(&pods_cgroup).is_empty(),
        "an uninstalled agent must leave no program attached"
    );

    // A crashed agent leaves its pinned links (pods stay fail-closed); the
    // next one replaces them instead of stacking a second set.
    cluster.start_agent("node1").expect("start agent");
    let pid = cluster.agent_pid("node1").expect("agent running");
    // SAFETY: plain kill(2) on a pid we started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cluster.agent_pid("node1").is_some() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        attached_programs(&pods_cgroup).len(),
        PROGRAMS.len(),
        "pinned links survive a crash"
    );
    cluster.start_agent("node1").expect("restart agent");
    assert_eq!(names(&attached_programs(&pods_cgroup)), PROGRAMS);

    // And the restarted agent carries traffic again once the pod is enrolled.
    cluster.enroll("node1-pod1").expect("re-enroll");
    let _server = serve(&cluster, "node2-pod1");
    let report = client_ok(
        &cluster,
        "node1-pod1",
        &[
            "tcp",
            "--addr",
            &addr(cluster.pod("node2-pod1").ip, ECHO_PORT),
        ],
    );
    assert_eq!(report["server"], "node2-pod1");
    assert_eq!(decision(&cluster, "node1", "redirected"), 1);

    cluster.stop_agent("node1").expect("stop agent");
    cluster.uninstall_agent("node1").expect("uninstall");
    assert!(attached_programs(&pods_cgroup).is_empty());
}
