//! Helpers for end-to-end tests on a real local cluster (network namespaces,
//! cgroups, kernel programs, agents). Each test builds its own cluster and
//! tears it down when its guard drops, even when the test panics.
#![allow(dead_code)] // each test binary uses a different subset

pub mod control;
pub mod etcd;
pub mod nft;
pub mod traffic;

use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

#[allow(unused_imports)] // each test binary uses a different subset
pub use nft::NftTable;
use serde_json::Value;
#[allow(unused_imports)] // each test binary uses a different subset
pub use traffic::{HttpLoop, LongLived};
use xtask::cluster::{Cluster, ClusterSpec};

pub const TESTAPP: &str = env!("CARGO_BIN_EXE_mesh-testapp");
pub const ECHO_PORT: u16 = 7000;
pub const SINK_PORT: u16 = 7001;
pub const HTTP_PORT: u16 = 8080;
/// The `--http-echo` port of [`echo`] servers.
pub const ECHO: u16 = 8090;

/// Whether privileged end-to-end tests must run here. In CI (CI=true) or under
/// `cargo xtask test` (MESH_E2E_REQUIRED=1) a missing privilege or kernel
/// feature is a failure, never a silent pass.
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("MESH_E2E_REQUIRED").is_ok_and(|v| v == "1")
}

/// Checks root, cgroup v2 and bpffs. Returns false (after saying so loudly)
/// when the test should be skipped; panics instead when skipping is not allowed.
pub fn privileged_env_ready() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
    {
        missing.push("cgroup v2");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("end-to-end test needs {}", missing.join(", "));
    if required() {
        panic!("{msg} (required in CI / cargo xtask test)");
    }
    eprintln!("SKIPPED: {msg}; run `cargo xtask test` as root");
    false
}

pub fn spec(nodes: usize, pods_per_node: usize) -> ClusterSpec {
    let spec = ClusterSpec {
        nodes,
        pods_per_node,
        ..ClusterSpec::default()
    };
    let control = spec
        .control_bin
        .as_ref()
        .expect("default spec has a control plane");
    for (what, path) in [
        ("agent", &spec.agent_bin),
        ("eBPF object", &spec.bpf_object),
        ("control server", control),
        ("meshctl", &spec.meshctl_bin),
    ] {
        assert!(
            path.exists(),
            "{what} not built at {}: run `cargo xtask test` (it builds everything first)",
            path.display()
        );
    }
    spec
}

/// The 3-node, 2-pods-per-node cluster the acceptance tests run on.
pub fn cluster() -> Option<Cluster> {
    if !privileged_env_ready() {
        return None;
    }
    Some(Cluster::up(&spec(3, 2)).expect("cluster up"))
}

/// A `mesh-testapp serve` running in a pod; killed on drop.
pub struct Server {
    child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Connections the server saw, one JSON object each.
    pub fn log_entries(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Peers (source IPs) of the connections the server saw.
    pub fn peers(&self) -> Vec<Ipv4Addr> {
        self.log_entries()
            .iter()
            .filter_map(|e| e["peer"].as_str()?.split(':').next()?.parse().ok())
            .collect()
    }

    /// Waits until the server has logged at least `n` finished connections.
    pub fn wait_for_entries(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let entries = self.log_entries();
            if entries.len() >= n || Instant::now() > deadline {
                return entries;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts the test server in `pod` (tcp-echo, sink and HTTP ports) and waits for it.
pub fn serve(cluster: &Cluster, pod: &str) -> Server {
    let log = cluster
        .state_dir()
        .join(format!("{pod}-server-{}.jsonl", std::process::id()));
    let mut child = cluster
        .command(pod, TESTAPP)
        .args(["serve", "--name", pod, "--log"])
        .arg(&log)
        .args(["--tcp-echo", &ECHO_PORT.to_string()])
        .args(["--sink", &SINK_PORT.to_string()])
        .args(["--http", &HTTP_PORT.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting test server in {pod}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("reading ready line");
    let ready: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("test server in {pod} did not report ready ({e}): {line:?}"));
    assert_eq!(ready["ready"], true, "test server in {pod}: {line}");
    Server {
        child,
        name: pod.to_owned(),
        log,
    }
}

/// Result of a client run inside a pod.
pub struct ClientRun {
    pub ok: bool,
    pub report: Value,
    pub stderr: String,
}

/// Runs `mesh-testapp <args>` inside `pod` and parses its JSON report.
pub fn client(cluster: &Cluster, pod: &str, args: &[&str]) -> ClientRun {
    let out = cluster
        .command(pod, TESTAPP)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running client in {pod}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    ClientRun {
        ok: out.status.success(),
        report: serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Like [`client`], but the run must succeed.
pub fn client_ok(cluster: &Cluster, pod: &str, args: &[&str]) -> Value {
    let run = client(cluster, pod, args);
    assert!(
        run.ok,
        "client {args:?} in {pod} failed: {}\nreport: {}",
        run.stderr, run.report
    );
    run.report
}

pub fn addr(ip: Ipv4Addr, port: u16) -> String {
    format!("{ip}:{port}")
}

/// The agent's record of connections, newest closed last seen first.
pub fn agent_connections(cluster: &Cluster, node: &str) -> Vec<Value> {
    cluster
        .admin_get(node, "/connections")
        .expect("agent /connections")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

pub fn decision(cluster: &Cluster, node: &str, reason: &str) -> u64 {
    let status = cluster.admin_get(node, "/status").expect("agent /status");
    status["decisions"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no decision counter {reason} in {status}"))
}

/// Programs attached directly to a cgroup, as the kernel reports them.
pub fn attached_programs(cgroup: &std::path::Path) -> Vec<Value> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .arg("--json")
        .output()
        .expect("bpftool (installed by cargo xtask test)");
    assert!(
        out.status.success(),
        "bpftool cgroup show {}: {}",
        cgroup.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str::<Value>(&text)
        .expect("bpftool JSON")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Polls `probe` until it gives a value; panics naming `what` (and the last
/// thing `probe` reported through `last`) after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut(&mut String) -> Option<T>,
) -> T {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        if let Some(v) = probe(&mut last) {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `Service` document: one VIP, one TCP port, a label selector.
pub fn service_yaml(
    name: &str,
    vip: &str,
    port: u32,
    target_port: u32,
    selector: &[(&str, &str)],
) -> String {
    let selector: String = selector
        .iter()
        .map(|(k, v)| format!("    {k}: {v}\n"))
        .collect();
    let selector = if selector.is_empty() {
        " {}\n".to_owned()
    } else {
        format!("\n{selector}")
    };
    format!(
        "apiVersion: mesh.dev/v1alpha1\n\
         kind: Service\n\
         metadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  vips: [\"{vip}\"]\n  ports:\n  - name: tcp\n    port: {port}\n    targetPort: {target_port}\n    appProtocol: tcp\n  \
         selector:{selector}"
    )
}

/// Documents joined into one multi-document YAML stream.
pub fn yaml_stream<S: AsRef<str>>(docs: &[S]) -> String {
    docs.iter()
        .map(|d| format!("---\n{}", d.as_ref()))
        .collect()
}

/// `meshctl <args>`; panics unless it succeeds, returns its stdout.
pub fn meshctl_ok(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.meshctl(args).expect("running meshctl");
    assert!(
        out.status.success(),
        "meshctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `meshctl get KIND -A -o json` shows, one JSON document per resource,
/// sorted by namespace and name.
pub fn stored(cluster: &Cluster, kind: &str) -> Vec<Value> {
    let text = meshctl_ok(cluster, &["get", kind, "-A", "-o", "json"]);
    let mut docs = json_documents(&text);
    docs.sort_by_key(|d| {
        (
            d["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
            d["metadata"]["name"].as_str().unwrap_or("").to_owned(),
        )
    });
    docs
}

/// Everything the control server stores, by kind.
pub fn stored_config(cluster: &Cluster) -> Value {
    serde_json::json!({
        "workloads": stored(cluster, "workloads"),
        "services": stored(cluster, "services"),
    })
}

/// A JSON list, a `{"items": [...]}` list, one document, or one document per line.
fn json_documents(text: &str) -> Vec<Value> {
    match serde_json::from_str::<Value>(text.trim()) {
        Ok(Value::Array(docs)) => docs,
        Ok(Value::Object(o)) if o.get("items").is_some_and(Value::is_array) => {
            o["items"].as_array().cloned().unwrap_or_default()
        }
        Ok(Value::Null) => Vec::new(),
        Ok(doc) => vec![doc],
        Err(_) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("meshctl get -o json printed {text:?}: {e}"))
            })
            .collect(),
    }
}

/// The agent's `sync` block of `GET /status`.
pub fn sync_state(cluster: &Cluster, node: &str) -> Value {
    let status = cluster.admin_get(node, "/status").expect("agent /status");
    status["sync"].clone()
}

/// The value of one sample of the agent's Prometheus page (0 if absent).
pub fn agent_metric(cluster: &Cluster, node: &str, sample: &str) -> u64 {
    let mut curl = cluster.node_command(node, "curl");
    curl.args(["-sf", "http://127.0.0.1:15020/metrics"]);
    metric(curl, sample).unwrap_or(0)
}

/// The value of one sample of the control server's Prometheus page; panics if absent.
pub fn control_metric(cluster: &Cluster, sample: &str) -> u64 {
    let addr = cluster.control_info().expect("a control plane").metrics;
    let mut curl = cluster.fabric_command("curl");
    curl.args(["-sf", &format!("http://{addr}/metrics")]);
    metric(curl, sample).unwrap_or_else(|| panic!("no sample {sample} on the control server"))
}

fn metric(mut curl: Command, sample: &str) -> Option<u64> {
    let out = curl.output().expect("fetch metrics");
    assert!(
        out.status.success(),
        "fetching metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let v = l.strip_prefix(sample)?.strip_prefix(' ')?;
        // Counters are integers; a histogram's sum is a float ("700.0").
        v.parse()
            .ok()
            .or_else(|| v.parse::<f64>().ok().map(|f| f as u64))
    })
}

/// Re-registers `pod`'s Workload with `spec.mtlsMode: mode`.
pub fn set_mtls_mode(cluster: &Cluster, pod: &str, mode: &str) {
    let doc = format!("{}  mtlsMode: {mode}\n", cluster.workload_yaml(pod, &[]));
    cluster
        .apply(&doc)
        .unwrap_or_else(|e| panic!("setting {pod} to {mode}: {e:#}"));
}

/// The Python probe (grpcio, raw sockets): `tests/py/probe.py`.
pub const PROBE_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/py/probe.py");

/// Runs the Python probe in `cmd` (already placed in a pod or node) and
/// parses its JSON line.
pub fn probe(mut cmd: Command, args: &[&str]) -> Value {
    let out = cmd
        .arg(PROBE_PY)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running probe.py {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| {
        panic!(
            "probe.py {args:?} printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A long-running probe (a server): started in `cmd`, waited for until it
/// prints `ready`; killed on drop.
pub struct Probe {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Probe {
    pub fn start(mut cmd: Command, args: &[&str]) -> Probe {
        let mut child = cmd
            .arg(PROBE_PY)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting probe.py {args:?}: {e}"));
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("probe output");
        assert_eq!(line.trim(), "ready", "probe.py {args:?} did not start");
        Probe { child, stdout }
    }

    /// The JSON line it prints when it ends by itself.
    pub fn finish(mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("probe output");
        let _ = self.child.wait();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("probe printed {line:?}: {e}"))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `python3` placed in `pod` (its netns and cgroup).
pub fn python_in_pod(cluster: &Cluster, pod: &str) -> Command {
    cluster.command(pod, "python3")
}

/// `python3` placed in `node`'s netns.
pub fn python_on_node(cluster: &Cluster, node: &str) -> Command {
    cluster.node_command(node, "python3")
}

/// `mesh-testapp serve --http-echo` in a pod; killed on drop.
pub struct Echo(Child);

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn echo(cluster: &Cluster, pod: &str) -> Echo {
    let mut child = cluster
        .command(pod, TESTAPP)
        .args(["serve", "--name", pod, "--http-echo", &ECHO.to_string()])
        .args(["--tcp-echo", &ECHO_PORT.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the echo server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("ready line");
    assert!(
        line.contains("\"ready\":true"),
        "echo server in {pod}: {line}"
    );
    Echo(child)
}
