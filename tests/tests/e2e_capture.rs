//! Every connection of an enrolled pod is captured, nothing reaches the
//! node behind the mesh's back, and one misbehaving peer or client stalls no
//! one else. Each case uses the client that found the hole: Python grpcio
//! (gRPC's C core, AF_INET6 sockets to IPv4-mapped addresses), raw sockets,
//! a process in a child cgroup, a stopped peer agent, a flood of idle
//! connections. Servers are STRICT (the default), so a connection that
//! bypassed the agents would be refused, not answered.
mod support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use support::*;

const GRPC_PORT: u16 = 50051;

/// Connections node1's agent recorded from `pod` to `dst`.
fn recorded(cluster: &xtask::cluster::Cluster, pod: &str, dst: &str) -> usize {
    agent_connections(cluster, "node1")
        .iter()
        .filter(|c| c["src_pod"] == pod && c["orig_dst"] == dst)
        .count()
}

#[test]
fn grpcio_calls_across_nodes_and_on_one_node_go_through_the_agents() {
    let Some(cluster) = cluster() else { return };
    let port = GRPC_PORT.to_string();
    let _remote = Probe::start(
        python_in_pod(&cluster, "node2-pod2"),
        &["grpc-serve", "--port", &port, "--name", "node2-pod2"],
    );
    let _local = Probe::start(
        python_in_pod(&cluster, "node1-pod2"),
        &["grpc-serve", "--port", &port, "--name", "node1-pod2"],
    );
    let redirected = decision(&cluster, "node1", "redirected");
    let forwarded = r#"mesh_agent_inbound_streams_total{result="forwarded"}"#;
    let inbound_before = agent_metric(&cluster, "node2", forwarded);
    for server in ["node2-pod2", "node1-pod2"] {
        let dst = addr(cluster.pod(server).ip, GRPC_PORT);
        let out = probe(
            python_in_pod(&cluster, "node1-pod1"),
            &["grpc-call", "--addr", &dst, "--messages", "3"],
        );
        assert_eq!(out["ok"], true, "grpcio call to {server}: {out}");
        assert_eq!(out["unary"], format!("{server}:hello"), "{out}");
        assert_eq!(
            out["stream"],
            serde_json::json!([
                format!("{server}:m0"),
                format!("{server}:m1"),
                format!("{server}:m2")
            ]),
            "bidirectional stream through the agents: {out}"
        );
        assert!(
            recorded(&cluster, "node1-pod1", &dst) >= 1,
            "node1's agent carried the call from node1-pod1 to {dst}: {:?}",
            agent_connections(&cluster, "node1")
        );
    }
    assert!(decision(&cluster, "node1", "redirected") >= redirected + 2);
    assert!(
        agent_metric(&cluster, "node2", forwarded) > inbound_before,
        "the cross-node call arrived through node2's tunnel listener"
    );
}

#[test]
fn dual_stack_sockets_are_captured_and_native_ipv6_is_refused_by_name() {
    let Some(cluster) = cluster() else { return };
    let _server = serve(&cluster, "node2-pod1");
    let target = cluster.pod("node2-pod1").ip;
    let mapped = format!("::ffff:{target}");
    let redirected = decision(&cluster, "node1", "redirected");
    let out = probe(
        python_in_pod(&cluster, "node1-pod1"),
        &[
            "connect",
            "--family",
            "6",
            "--addr",
            &mapped,
            "--port",
            &ECHO_PORT.to_string(),
            "--payload",
            "mapped",
        ],
    );
    assert_eq!(out["ok"], true, "AF_INET6 to {mapped}: {out}");
    assert_eq!(
        out["reply"], "node2-pod1\nmapped",
        "the echo server's greeting and our bytes, through the agents: {out}"
    );
    assert_eq!(decision(&cluster, "node1", "redirected"), redirected + 1);
    assert!(recorded(&cluster, "node1-pod1", &addr(target, ECHO_PORT)) >= 1);

    let refused = decision(&cluster, "node1", "ipv6_refused");
    let out = probe(
        python_in_pod(&cluster, "node1-pod1"),
        &[
            "connect", "--family", "6", "--addr", "fd00::1", "--port", "80",
        ],
    );
    assert_eq!(out["ok"], false, "{out}");
    assert_eq!(out["errno"], "EPERM", "native IPv6 fails at connect: {out}");
    assert_eq!(decision(&cluster, "node1", "ipv6_refused"), refused + 1);
}

#[test]
fn pods_cannot_reach_the_node_through_the_agent() {
    let Some(cluster) = cluster() else { return };
    let node_ip = cluster.node("node1").ip.to_string();
    let loopback = Probe::start(
        python_on_node(&cluster, "node1"),
        &[
            "listen",
            "--addr",
            "127.0.0.1",
            "--port",
            "8099",
            "--seconds",
            "8",
        ],
    );
    let own = Probe::start(
        python_on_node(&cluster, "node1"),
        &[
            "listen",
            "--addr",
            &node_ip,
            "--port",
            "8098",
            "--seconds",
            "8",
        ],
    );
    let forbidden = r#"mesh_agent_outbound_connections_total{result="forbidden_destination"}"#;
    let (kept_local, refused) = (
        decision(&cluster, "node1", "loopback"),
        agent_metric(&cluster, "node1", forbidden),
    );
    for (ip, port) in [
        ("0.0.0.0", "8099"),
        ("127.0.0.1", "8099"),
        (node_ip.as_str(), "8098"),
    ] {
        let out = probe(
            python_in_pod(&cluster, "node1-pod1"),
            &[
                "connect",
                "--addr",
                ip,
                "--port",
                port,
                "--payload",
                "x",
                "--timeout",
                "3",
            ],
        );
        assert_ne!(
            out["reply"], "reached the node\n",
            "a pod's connect to {ip}:{port} reached the node: {out}"
        );
    }
    assert_eq!(
        decision(&cluster, "node1", "loopback"),
        kept_local + 2,
        "0.0.0.0 and 127.0.0.1 stay inside the pod"
    );
    assert_eq!(
        agent_metric(&cluster, "node1", forbidden),
        refused + 1,
        "the node's own address is refused by the agent"
    );
    assert_eq!(loopback.finish()["accepted"], 0);
    assert_eq!(own.finish()["accepted"], 0);
}

#[test]
fn a_process_in_a_child_cgroup_of_a_pod_is_captured_as_the_pod() {
    let Some(cluster) = cluster() else { return };
    let _server = serve(&cluster, "node2-pod1");
    let child = cluster.pod("node1-pod1").cgroup.join("sidecar");
    std::fs::create_dir(&child).expect("child cgroup");
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _cleanup = Remove(child.clone());
    let dst = addr(cluster.pod("node2-pod1").ip, ECHO_PORT);
    // The shell starts in the pod's cgroup, moves itself into the child,
    // then becomes the client.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {TESTAPP} tcp --addr {dst}",
        child.display()
    );
    let mut cmd = cluster.command("node1-pod1", "sh");
    cmd.args(["-c", &script]);
    let out = cmd.output().expect("client in the child cgroup");
    assert!(
        out.status.success(),
        "client in a child cgroup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("client report");
    assert_eq!(report["server"], "node2-pod1", "{report}");
    assert!(
        recorded(&cluster, "node1-pod1", &dst) >= 1,
        "captured and attributed to the pod: {:?}",
        agent_connections(&cluster, "node1")
    );
}

fn signal_agent(cluster: &xtask::cluster::Cluster, node: &str, signal: i32) {
    let pid = cluster.agent_pid(node).expect("agent running");
    // SAFETY: kill(2) on the pid of an agent this test's cluster started.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

#[test]
fn a_stopped_peer_agent_fails_new_connections_in_time_and_recovers_by_itself() {
    let Some(cluster) = cluster() else { return };
    let _server = serve(&cluster, "node2-pod1");
    let dst = addr(cluster.pod("node2-pod1").ip, ECHO_PORT);
    let call = || client(&cluster, "node1-pod1", &["tcp", "--addr", &dst]);
    assert!(call().ok, "works before the peer stops");

    signal_agent(&cluster, "node2", libc::SIGSTOP);
    struct Resume<'a>(&'a xtask::cluster::Cluster);
    impl Drop for Resume<'_> {
        fn drop(&mut self) {
            signal_agent(self.0, "node2", libc::SIGCONT);
        }
    }
    let resume = Resume(&cluster);
    for attempt in 0..2 {
        let started = Instant::now();
        let run = call();
        let took = started.elapsed();
        assert!(!run.ok, "attempt {attempt}: a stopped peer cannot carry it");
        assert!(
            took < Duration::from_secs(9),
            "attempt {attempt}: failed after {took:?}, beyond the 5 s connect timeout"
        );
    }
    drop(resume);

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let run = call();
        if run.ok {
            assert_eq!(run.report["server"], "node2-pod1");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after SIGCONT: {}",
            run.stderr
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn five_thousand_idle_tunnel_connections_from_one_pod_stall_no_other_pod() {
    let Some(cluster) = cluster() else { return };
    let _server = serve(&cluster, "node2-pod1");
    let tunnel = format!("{}", cluster.node("node2").ip);
    // node1-pod1 floods node2's tunnel listener with connections that never
    // speak TLS, and holds them.
    let mut flood: Command = python_in_pod(&cluster, "node1-pod1");
    flood.args([
        PROBE_PY,
        "hold",
        "--addr",
        &tunnel,
        "--port",
        "15008",
        "--count",
        "5000",
        "--seconds",
        "20",
    ]);
    let mut flood = flood
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("flood");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(flood.stdout.take().expect("piped")),
        &mut line,
    )
    .expect("flood report");
    let held: serde_json::Value = serde_json::from_str(&line).expect("flood JSON");
    assert_eq!(held["failed"], 0, "{held}");
    assert_eq!(held["opened"], 5000, "{held}");

    let dst = addr(cluster.pod("node2-pod1").ip, ECHO_PORT);
    let started = Instant::now();
    for i in 0..20 {
        let run = client(&cluster, "node1-pod2", &["tcp", "--addr", &dst]);
        assert!(
            run.ok,
            "call {i} from node1-pod2 during the flood: {}",
            run.stderr
        );
        assert_eq!(run.report["server"], "node2-pod1");
    }
    let took = started.elapsed();
    let _ = flood.kill();
    let _ = flood.wait();
    assert!(
        took < Duration::from_secs(10),
        "20 calls during the flood took {took:?}"
    );
}

/// Starts `probe.py loop` in `cmd` in the background; its report comes when
/// it ends.
fn probe_loop(mut cmd: Command, dst_ip: &str, seconds: &str) -> std::process::Child {
    cmd.args([
        PROBE_PY,
        "loop",
        "--addr",
        dst_ip,
        "--port",
        &ECHO_PORT.to_string(),
        "--seconds",
        seconds,
    ])
    .stdout(std::process::Stdio::piped())
    .spawn()
    .expect("probe loop")
}

fn loop_report(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().expect("probe loop report");
    serde_json::from_slice(&out.stdout).expect("probe loop JSON")
}

fn kill9(cluster: &xtask::cluster::Cluster, node: &str) {
    signal_agent(cluster, node, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster.agent_pid(node).is_some() {
        assert!(Instant::now() < deadline, "the agent of {node} did not die");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn killing_and_restarting_agents_lets_nothing_through_unmediated() {
    let Some(mut cluster) = cluster() else { return };
    let server = serve(&cluster, "node2-pod1");
    let target = cluster.pod("node2-pod1").ip.to_string();
    let client_ip = cluster.pod("node1-pod1").ip;
    // An enrolled client across nodes, and a plaintext prober outside the
    // mesh (an unenrolled pod) straight at the STRICT server, throughout.
    cluster.unenroll("node3-pod1").expect("unenroll the prober");
    let mesh = probe_loop(python_in_pod(&cluster, "node1-pod1"), &target, "14");
    let outside = probe_loop(python_in_pod(&cluster, "node3-pod1"), &target, "14");
    std::thread::sleep(Duration::from_secs(2));
    for node in ["node1", "node2"] {
        kill9(&cluster, node);
        std::thread::sleep(Duration::from_millis(500));
        cluster.start_agent_only(node).expect("restart the agent");
        std::thread::sleep(Duration::from_secs(2));
    }
    for node in ["node1", "node2"] {
        let log = std::fs::read_to_string(&cluster.node(node).agent_log).expect("agent log");
        // The four programs of the pod cgroup root, and the inbound program
        // of each enrolled pod's namespace (re-enrolled from the state file).
        let enrolled = cluster
            .pods()
            .iter()
            .filter(|p| p.node == node && cluster.is_enrolled(&p.name))
            .count();
        assert_eq!(
            log.matches("replaced the program of a pinned link in place")
                .count(),
            4 + enrolled,
            "the restarted agent of {node} swapped its programs into the pinned links; its log:\n{}",
            log.lines()
                .filter(|l| l.contains("pin") || l.contains("link"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let (mesh, outside) = (loop_report(mesh), loop_report(outside));
    assert_eq!(
        outside["ok"], 0,
        "plaintext reached the STRICT pod while its agent restarted: {outside}"
    );
    assert!(outside["failed"].as_u64().unwrap_or(0) > 0, "{outside}");
    assert!(
        decision(&cluster, "node2", "strict_refused") > 0,
        "the prober's SYNs reached node2 and were refused there"
    );
    assert!(
        mesh["ok"].as_u64().unwrap_or(0) > 0,
        "the mesh carried the client before and after: {mesh}"
    );
    assert!(
        !server.peers().contains(&client_ip),
        "the client reached the server directly, around the agents"
    );
    // The restarted agent restored its enrolment by itself (nothing
    // re-enrolled the pods) and carries the pod's traffic as that pod.
    let status = cluster.admin_get("node1", "/status").expect("status");
    let enrolled: Vec<&str> = status["enrolled"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(enrolled, ["node1-pod1", "node1-pod2"], "{status}");
    let dst = addr(cluster.pod("node2-pod1").ip, ECHO_PORT);
    let report = client_ok(&cluster, "node1-pod1", &["tcp", "--addr", &dst]);
    assert_eq!(report["server"], "node2-pod1");
    assert!(recorded(&cluster, "node1-pod1", &dst) >= 1);
    let ready = cluster
        .node_command("node1", "curl")
        .args(["-s", "http://127.0.0.1:15020/healthz/ready"])
        .output()
        .expect("readiness");
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "ready\n");
}

#[test]
fn a_pod_name_and_a_cgroup_are_bound_to_each_other() {
    let Some(cluster) = cluster() else { return };
    let (pod1, pod2) = (cluster.pod("node1-pod1"), cluster.pod("node1-pod2"));
    let enroll = |name: &str, cgroup: &std::path::Path| {
        cluster.admin_post(
            "node1",
            "/enroll",
            &serde_json::json!({"pod": name, "namespace": "default", "cgroup": cgroup}),
        )
    };
    // node1-pod2's cgroup cannot take node1-pod1's name (and identity)...
    let err = enroll("node1-pod1", &pod2.cgroup).expect_err("a taken name");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("default/node1-pod1 is already enrolled with cgroup")
            && msg.contains(&pod1.cgroup.display().to_string()),
        "{msg}"
    );
    // ...nor be enrolled a second time under another name.
    let err = enroll("impostor", &pod2.cgroup).expect_err("a taken cgroup");
    assert!(
        format!("{err:#}").contains("is already enrolled as pod default/node1-pod2"),
        "{err:#}"
    );
    // Enrolling the same pod with its own cgroup again changes nothing.
    enroll("node1-pod1", &pod1.cgroup).expect("idempotent");
    let status = cluster.admin_get("node1", "/status").expect("status");
    assert_eq!(
        status["enrolled"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
}
