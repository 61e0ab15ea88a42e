//! CA rotation and revocation on a real local cluster (2 nodes, 2 pods
//! each, `--cert-ttl 2m`): rollbacks from BundleDistributed and Signing,
//! then a full root rotation while an HTTP request loop and one long-lived
//! TCP connection cross nodes; then revoking one workload identity closes
//! its tunnel connection and refuses its new ones while another identity's
//! traffic goes on.
mod support;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;
use xtask::cluster::{Cluster, ClusterSpec};

fn cluster() -> Option<Cluster> {
    if !privileged_env_ready() {
        return None;
    }
    let spec = ClusterSpec {
        cert_ttl: Some("2m".into()),
        ..spec(2, 2)
    };
    Some(Cluster::up(&spec).expect("cluster up"))
}

fn ca_status(cluster: &Cluster) -> Value {
    serde_json::from_str(&meshctl_ok(cluster, &["ca", "status", "-o", "json"]))
        .expect("ca status is JSON")
}

fn wait_phase(cluster: &Cluster, phase: &str, within: Duration) -> Value {
    wait_for(&format!("CA rotation phase {phase}"), within, |last| {
        let s = ca_status(cluster);
        *last = s.to_string();
        if s["phase"] != phase {
            // Bounded polling: a meshctl process per 200 ms.
            std::thread::sleep(Duration::from_millis(200));
            return None;
        }
        Some(s)
    })
}

/// One TCP connection from a pod to a tcp-echo server, kept open.
struct LongLived {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const LONG_LIVED_PY: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rwb")
print("ready " + f.readline().decode().strip(), flush=True)
for line in sys.stdin:
    try:
        f.write(line.encode()); f.flush()
        got = f.readline().decode().strip()
        print(("echo " + got) if got else "closed", flush=True)
    except OSError as e:
        print("closed " + str(e), flush=True)
"#;

impl LongLived {
    fn open(cluster: &Cluster, pod: &str, dst: &str) -> LongLived {
        let (ip, port) = dst.split_once(':').expect("ip:port");
        let mut child = python_in_pod(cluster, pod)
            .args(["-c", LONG_LIVED_PY, ip, port])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the long-lived client");
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("ready line");
        assert!(line.starts_with("ready "), "long-lived client: {line:?}");
        LongLived {
            child,
            stdin,
            stdout,
        }
    }

    fn round_trip(&mut self, word: &str) -> String {
        writeln!(self.stdin, "{word}").expect("write to the long-lived client");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("long-lived client reply");
        line.trim().to_owned()
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HTTP GETs on fresh connections, one every 50 ms, until stdin closes;
/// then one line: `<ok> <failed> <first error>`.
const HTTP_LOOP_PY: &str = r#"
import sys, threading, time, urllib.request
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
ok = failed = 0
first = ""
while not stop.is_set():
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
            r.read()
            ok += 1
    except Exception as e:
        failed += 1
        first = first or repr(e)
    time.sleep(0.05)
print(ok, failed, first, flush=True)
"#;

struct HttpLoop(Child);

impl HttpLoop {
    fn start(cluster: &Cluster, pod: &str, url: &str) -> HttpLoop {
        let child = python_in_pod(cluster, pod)
            .args(["-c", HTTP_LOOP_PY, url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the HTTP loop");
        HttpLoop(child)
    }

    /// (succeeded, failed, first error).
    fn finish(mut self) -> (u64, u64, String) {
        drop(self.0.stdin.take());
        let mut line = String::new();
        BufReader::new(self.0.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the loop's report");
        let mut parts = line.trim().splitn(3, ' ');
        let n = |p: Option<&str>| p.and_then(|v| v.parse().ok()).expect("a count");
        (
            n(parts.next()),
            n(parts.next()),
            parts.next().unwrap_or("").to_owned(),
        )
    }
}

impl Drop for HttpLoop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn root_ids(status: &Value) -> Vec<String> {
    status["roots"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["id"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn a_root_rotation_under_traffic_drops_nothing_and_rollbacks_restore_the_old_root() {
    let Some(cluster) = cluster() else { return };
    let _server = serve(&cluster, "node2-pod1");
    let url = format!("http://{}/", addr(cluster.pod("node2-pod1").ip, HTTP_PORT));
    let dst = addr(cluster.pod("node2-pod1").ip, ECHO_PORT);
    let before = wait_phase(&cluster, "Idle", Duration::from_secs(10));
    let old_root = root_ids(&before);
    assert_eq!(old_root.len(), 1, "{before}");

    // Rollback from BundleDistributed (paused there) and from Signing.
    meshctl_ok(&cluster, &["ca", "rotate"]);
    meshctl_ok(&cluster, &["ca", "pause"]);
    let s = ca_status(&cluster);
    assert_eq!(s["phase"], "BundleDistributed", "{s}");
    assert_eq!(root_ids(&s).len(), 2, "{s}");
    let running = cluster.meshctl(&["ca", "rotate"]).expect("meshctl");
    assert!(!running.status.success());
    assert!(
        String::from_utf8_lossy(&running.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&running.stderr)
    );
    meshctl_ok(&cluster, &["ca", "rollback"]);
    let s = wait_phase(&cluster, "Idle", Duration::from_secs(5));
    assert_eq!(root_ids(&s), old_root);
    meshctl_ok(&cluster, &["ca", "rotate"]);
    wait_phase(&cluster, "Signing", Duration::from_secs(20));
    meshctl_ok(&cluster, &["ca", "pause"]);
    let refused = cluster.meshctl(&["ca", "retire"]).expect("meshctl");
    assert!(
        !refused.status.success(),
        "the old root still signs live certificates"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("live certificate"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    meshctl_ok(&cluster, &["ca", "rollback"]);
    let s = wait_phase(&cluster, "Idle", Duration::from_secs(60));
    assert_eq!(root_ids(&s), old_root, "the rollback kept the old root");

    // The full rotation under traffic.
    let mut open = LongLived::open(&cluster, "node1-pod1", &dst);
    assert_eq!(open.round_trip("before"), "echo before");
    let http = HttpLoop::start(&cluster, "node1-pod2", &url);
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    meshctl_ok(&cluster, &["ca", "rotate", "--force-renew"]);
    let during = wait_phase(&cluster, "Signing", Duration::from_secs(20));
    let new_root: Vec<String> = root_ids(&during)
        .into_iter()
        .filter(|r| !old_root.contains(r))
        .collect();
    assert_eq!(new_root.len(), 1, "{during}");
    assert_eq!(open.round_trip("signing"), "echo signing");
    let done = wait_phase(&cluster, "Idle", Duration::from_secs(90));
    assert_eq!(
        root_ids(&done),
        new_root,
        "only the new root is left: {done}"
    );
    eprintln!("rotation took {:?}", started.elapsed());
    // New connections and handshakes under the new root.
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failed, first) = http.finish();
    assert_eq!(
        failed, 0,
        "no failed request during the rotation ({ok} ok): {first}"
    );
    assert!(ok > 20, "the loop ran: {ok}");
    assert_eq!(
        open.round_trip("after"),
        "echo after",
        "the long-lived connection survived"
    );

    // Revoke one identity: its connection closes, its new ones fail;
    // another identity's traffic is untouched.
    let revoked = "spiffe://cluster.local/ns/default/sa/node1-pod1";
    let other = HttpLoop::start(&cluster, "node1-pod2", &url);
    std::thread::sleep(Duration::from_secs(1));
    meshctl_ok(&cluster, &["revoke", "identity", revoked]);
    let at = Instant::now();
    let reply = open.round_trip("revoked");
    assert!(
        reply.starts_with("closed"),
        "the revoked identity's connection: {reply}"
    );
    assert!(
        at.elapsed() < Duration::from_secs(2),
        "closed within {:?}",
        at.elapsed()
    );
    let fresh = client(
        &cluster,
        "node1-pod1",
        &["http", "--url", &url, "--timeout-secs", "5"],
    );
    assert!(
        !fresh.ok,
        "a new connection of the revoked identity fails: {}",
        fresh.report
    );
    std::thread::sleep(Duration::from_secs(1));
    let (ok, failed, first) = other.finish();
    assert_eq!(
        failed, 0,
        "the other identity's requests ({ok} ok): {first}"
    );
    let s = ca_status(&cluster);
    assert_eq!(s["revoked_identities"][0], revoked, "{s}");
}
