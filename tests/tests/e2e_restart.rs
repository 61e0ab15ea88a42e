//! The agent's graceful restart: on SIGTERM it drains (open connections go
//! on, new ones are refused, readiness turns false), exits 0 and leaves its
//! kernel programs pinned, so pods never connect around the mesh while no
//! agent runs. `mesh-agent uninstall` is the explicit way out of the mesh.
mod support;

use std::{
    io::{BufRead, BufReader, Write},
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;
use xtask::cluster::Cluster;

const DRAIN: Duration = Duration::from_secs(3);

fn cluster() -> Option<Cluster> {
    if !privileged_env_ready() {
        return None;
    }
    let mut spec = spec(2, 2);
    spec.agent_args = vec!["--drain-timeout".into(), "3s".into()];
    Some(Cluster::up(&spec).expect("cluster up"))
}

/// A fresh connect from `pod` to `dst` with a payload: the probe's report.
fn connect(cluster: &Cluster, pod: &str, dst: &str) -> Value {
    let (ip, port) = dst.split_once(':').expect("ip:port");
    probe(
        python_in_pod(cluster, pod),
        &[
            "connect",
            "--addr",
            ip,
            "--port",
            port,
            "--payload",
            "hello\n",
            "--timeout",
            "3",
        ],
    )
}

/// The HTTP status of the node agent's `/healthz/ready`.
fn readiness(cluster: &Cluster, node: &str) -> String {
    let out = cluster
        .node_command(node, "curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "1",
            "http://127.0.0.1:15020/healthz/ready",
        ])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sigterm(cluster: &Cluster, node: &str) {
    let pid = cluster.agent_pid(node).expect("agent running");
    // SAFETY: plain kill(2) on a pid this test's cluster started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
}

fn assert_refused(report: &Value, when: &str) {
    assert_eq!(
        report["errno"], "ECONNREFUSED",
        "a new connection {when} must be refused: {report}"
    );
}

#[test]
fn sigterm_drains_open_connections_refuses_new_ones_and_a_restart_carries_again() {
    let Some(mut cluster) = cluster() else { return };
    let server = serve(&cluster, "node2-pod1");
    let client_ip = cluster.pod("node1-pod1").ip;
    let dst = addr(cluster.pod("node2-pod1").ip, ECHO_PORT);
    let pods_cgroup = cluster.node("node1").pods_cgroup.clone();
    let attached = attached_programs(&pods_cgroup).len();
    assert_eq!(attached, 4, "the agent's programs on the pod cgroup root");
    assert_eq!(readiness(&cluster, "node1"), "200");

    let mut open = LongLived::open(&cluster, "node1-pod1", &dst);
    assert_eq!(open.round_trip("before"), "echo before");
    let carried = agent_connections(&cluster, "node1");
    assert!(
        carried.iter().any(|c| c["state"] == "open"),
        "the agent carries the long-lived connection: {carried:?}"
    );

    let stopped = Instant::now();
    sigterm(&cluster, "node1");
    let not_ready = wait_for("node1 to report not ready", DRAIN, |last| {
        *last = readiness(&cluster, "node1");
        (last.as_str() == "503").then_some(stopped.elapsed())
    });
    // During the drain: the open connection works, a new one is refused.
    assert_eq!(open.round_trip("draining"), "echo draining");
    let during = connect(&cluster, "node1-pod1", &dst);
    assert!(stopped.elapsed() < DRAIN, "the checks ran during the drain");
    assert_refused(&during, "during the drain");

    let status = cluster
        .wait_agent_exit("node1", DRAIN + Duration::from_secs(3))
        .expect("the agent exits after its drain period");
    let took = stopped.elapsed();
    assert!(status.success(), "the agent exited with {status}");
    assert!(
        took >= DRAIN - Duration::from_millis(200),
        "the agent waited for the open connection ({took:?}, not ready after {not_ready:?})"
    );
    assert!(
        open.round_trip("after").starts_with("closed"),
        "a connection still open at the deadline is closed"
    );
    let log = std::fs::read_to_string(&cluster.node("node1").agent_log).expect("agent log");
    assert!(
        log.contains("open_connections=1") && log.contains("left=1"),
        "the drain logs its counts:\n{log}"
    );

    // No agent: the programs stay, new connections are refused.
    assert_eq!(attached_programs(&pods_cgroup).len(), attached);
    assert_refused(
        &connect(&cluster, "node1-pod1", &dst),
        "while no agent runs",
    );
    assert!(
        !server.peers().contains(&client_ip),
        "the pod reached the server around the mesh: {:?}",
        server.peers()
    );

    // The next agent takes over: new connections go through the mesh again.
    cluster.start_agent("node1").expect("start the agent again");
    assert_eq!(attached_programs(&pods_cgroup).len(), attached);
    let report = client_ok(&cluster, "node1-pod1", &["tcp", "--addr", &dst]);
    assert_eq!(report["server"], "node2-pod1");
    let carried = agent_connections(&cluster, "node1");
    assert!(
        carried
            .iter()
            .any(|c| c["src_pod"] == "node1-pod1" && c["orig_dst"] == dst.as_str()),
        "the restarted agent carried the new connection: {carried:?}"
    );
    assert_eq!(decision(&cluster, "node1", "redirected"), 1);
    server.wait_for_entries(2);
    assert!(
        !server.peers().contains(&client_ip),
        "around the mesh: {:?}",
        server.peers()
    );
}

#[test]
fn uninstall_detaches_everything_and_pods_connect_directly() {
    let Some(mut cluster) = cluster() else { return };
    // Both pods on node1: once node1 is out of the mesh nothing judges them.
    let server = serve(&cluster, "node1-pod2");
    let client_ip = cluster.pod("node1-pod1").ip;
    let dst = addr(cluster.pod("node1-pod2").ip, ECHO_PORT);
    let pods_cgroup = cluster.node("node1").pods_cgroup.clone();
    let pin_dir = cluster.node("node1").bpf_pin_dir.clone();

    cluster.stop_agent("node1").expect("stop the agent");
    assert_eq!(
        attached_programs(&pods_cgroup).len(),
        4,
        "a stop keeps them"
    );
    assert_refused(&connect(&cluster, "node1-pod1", &dst), "after a stop");

    cluster
        .uninstall_agent("node1")
        .expect("mesh-agent uninstall");
    assert!(
        attached_programs(&pods_cgroup).is_empty(),
        "uninstall leaves no program on the pod cgroup: {:?}",
        attached_programs(&pods_cgroup)
    );
    assert!(!pin_dir.exists(), "{} is removed", pin_dir.display());
    let report = connect(&cluster, "node1-pod1", &dst);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        server.wait_for_entries(1).len(),
        1,
        "the server saw the direct connection"
    );
    assert_eq!(server.peers(), [client_ip], "straight from the pod");
    // Uninstalling what is gone already is no error.
    cluster.uninstall_agent("node1").expect("uninstall again");
}

#[test]
fn during_the_drain_streams_into_pods_go_on_and_new_inbound_connections_are_refused() {
    let Some(mut cluster) = cluster() else { return };
    let server = serve(&cluster, "node1-pod2");
    let dst = addr(cluster.pod("node1-pod2").ip, ECHO_PORT);
    // node2-pod2 outside the mesh, in plaintext at a PERMISSIVE pod: judged
    // and carried by node1's agent at the pod's :15006 listener.
    set_mtls_mode(&cluster, "node1-pod2", "PERMISSIVE");
    cluster
        .unenroll("node2-pod2")
        .expect("unenroll the outsider");
    wait_for("plaintext to be let in", Duration::from_secs(10), |last| {
        let report = connect(&cluster, "node2-pod2", &dst);
        *last = report.to_string();
        (report["ok"] == true).then_some(())
    });
    // A stream through node1's tunnel listener, kept open over the drain.
    let mut open = LongLived::open(&cluster, "node2-pod1", &dst);
    assert_eq!(open.round_trip("before"), "echo before");
    let seen = server.wait_for_entries(1).len();
    assert_eq!(seen, 1, "the plaintext connection reached the pod");

    let stopped = Instant::now();
    sigterm(&cluster, "node1");
    wait_for("node1 to report not ready", DRAIN, |last| {
        *last = readiness(&cluster, "node1");
        (last.as_str() == "503").then_some(())
    });
    assert_eq!(
        open.round_trip("draining"),
        "echo draining",
        "the tunnelled stream goes on during the drain"
    );
    assert_refused(
        &connect(&cluster, "node2-pod2", &dst),
        "into the pod's :15006 during the drain",
    );
    let mesh = client(
        &cluster,
        "node2-pod1",
        &["tcp", "--addr", &dst, "--timeout-secs", "2"],
    );
    assert!(stopped.elapsed() < DRAIN, "the checks ran during the drain");
    assert!(
        !mesh.ok,
        "a new tunnelled connection into a draining node must fail: {}",
        mesh.report
    );

    let status = cluster
        .wait_agent_exit("node1", DRAIN + Duration::from_secs(3))
        .expect("the agent exits after its drain period");
    assert!(status.success(), "the agent exited with {status}");
    assert!(open.round_trip("after").starts_with("closed"));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        server.log_entries().len(),
        seen + 1,
        "only the long-lived stream reached the pod after the first plaintext connection: {:?}",
        server.log_entries()
    );
}

const IDLE_KEEP_ALIVE_PY: &str = r#"
import http.client, select, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
c.request("GET", "/")
r = c.getresponse()
r.read()
print("status %d" % r.status, flush=True)
sys.stdin.readline()
ready, _, _ = select.select([c.sock], [], [], 5)
print("closed" if ready and c.sock.recv(1) == b"" else "open", flush=True)
"#;

#[test]
fn an_idle_http_keep_alive_client_does_not_hold_the_drain() {
    let Some(mut cluster) = cluster() else { return };
    let _server = serve(&cluster, "node2-pod1");
    let vip = "198.18.200.9";
    let docs = [
        cluster.workload_yaml("node2-pod1", &[("app", "web")]),
        service_yaml("web", vip, 80, HTTP_PORT.into(), &[("app", "web")])
            .replace("appProtocol: tcp", "appProtocol: http"),
    ];
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    wait_for("the Service on node1", Duration::from_secs(10), |last| {
        let report = client(
            &cluster,
            "node1-pod1",
            &["http", "--url", &format!("http://{vip}/")],
        );
        *last = report.report.to_string();
        report.ok.then_some(())
    });

    // One request, then the connection stays open and idle.
    let mut idle = python_in_pod(&cluster, "node1-pod1")
        .args(["-c", IDLE_KEEP_ALIVE_PY, vip, "80"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the keep-alive client");
    let mut stdin = idle.stdin.take().expect("piped");
    let mut stdout = BufReader::new(idle.stdout.take().expect("piped"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("status line");
    assert_eq!(line.trim(), "status 200", "through the mesh");
    assert!(
        agent_connections(&cluster, "node1")
            .iter()
            .any(|c| c["state"] == "open"),
        "the agent holds the idle connection"
    );

    let stopped = Instant::now();
    sigterm(&cluster, "node1");
    let status = cluster
        .wait_agent_exit("node1", DRAIN + Duration::from_secs(3))
        .expect("the agent exits");
    let took = stopped.elapsed();
    assert!(status.success(), "the agent exited with {status}");
    assert!(
        took < DRAIN - Duration::from_secs(1),
        "an idle keep-alive connection is closed at once, not held to the {DRAIN:?} deadline: {took:?}"
    );
    writeln!(stdin, "check").expect("to the client");
    stdin.flush().expect("flush");
    line.clear();
    stdout.read_line(&mut line).expect("closed line");
    assert_eq!(line.trim(), "closed", "the client saw the agent close it");
    let _ = idle.kill();
    let _ = idle.wait();
}
