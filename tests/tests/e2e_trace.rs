//! Distributed tracing end to end: both nodes' agents export OTLP to a
//! collector stand-in (`mesh-otlp-collector`, in the fabric namespace next
//! to the control server), and curl in a pod on node1 calls an HTTP Service
//! whose endpoint runs on node2. Each case checks what the collector
//! received (node1's CLIENT span, node2's SERVER span, joined by their
//! parent links into the caller's trace) and what the workload received
//! (the echo server reports the request's headers): W3C `traceparent`, B3
//! (multi and single), no context (a new trace), and an unsampled caller
//! (nothing exported, the decision passed on).
mod support;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;
use xtask::cluster::{Cluster, plan::CONTROL_IP};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_mesh-otlp-collector");
const OTLP_PORT: u16 = 4317;
const VIP: &str = "198.18.201.1";
const SERVICE: &str = "default/traced";

/// The collector stand-in; killed on drop.
struct Collector {
    child: Child,
    out: PathBuf,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Collector {
    fn start(cluster: &Cluster) -> Collector {
        let out = cluster
            .state_dir()
            .join(format!("otlp-spans-{}.jsonl", std::process::id()));
        let mut child = cluster
            .fabric_command(COLLECTOR)
            .args(["--listen", &format!("{CONTROL_IP}:{OTLP_PORT}"), "--out"])
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the collector stand-in");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the collector's ready line");
        assert!(line.contains("\"ready\":true"), "collector: {line:?}");
        Collector { child, out }
    }

    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("span line {l:?}: {e}")))
            .collect()
    }

    /// Waits for `n` spans of `trace`.
    fn wait(&self, trace: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans: Vec<Value> = self
                .spans()
                .into_iter()
                .filter(|s| s["trace_id"] == trace)
                .collect();
            if spans.len() >= n {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "{n} spans of trace {trace} did not arrive: {spans:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the spans of `trace` from both agents (an outbound and an
    /// inbound one).
    fn trace(&self, trace: &str) -> (Value, Value) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans: Vec<Value> = self
                .spans()
                .into_iter()
                .filter(|s| s["trace_id"] == trace)
                .collect();
            let of = |kind: &str| spans.iter().find(|s| s["kind"] == kind).cloned();
            if let (Some(client), Some(server)) = (of("CLIENT"), of("SERVER")) {
                assert_eq!(spans.len(), 2, "one span per hop: {spans:#?}");
                return (client, server);
            }
            assert!(
                Instant::now() < deadline,
                "spans of trace {trace} did not all arrive: {spans:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn traced_cluster() -> Option<Cluster> {
    if !privileged_env_ready() {
        return None;
    }
    let mut spec = spec(2, 1);
    spec.agent_args.extend([
        "--otlp-endpoint".to_owned(),
        format!("http://{CONTROL_IP}:{OTLP_PORT}"),
    ]);
    Some(Cluster::up(&spec).expect("cluster up"))
}

/// curl in node1-pod1: GET `path` of the Service with `headers`; the echo
/// server's report, or what went wrong.
fn try_get(cluster: &Cluster, path: &str, headers: &[&str]) -> Result<Value, String> {
    let mut cmd = cluster.command("node1-pod1", "curl");
    cmd.args(["-sS", "--max-time", "10"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("http://{VIP}{path}"))
        .output()
        .expect("running curl");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn get(cluster: &Cluster, path: &str, headers: &[&str]) -> Value {
    try_get(cluster, path, headers).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The one value of header `name` the workload received.
fn received(answer: &Value, name: &str) -> String {
    let values: Vec<&str> = answer["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .filter_map(|h| h[1].as_str())
        .collect();
    assert_eq!(values.len(), 1, "{name} at the workload: {answer}");
    values[0].to_owned()
}

/// `traceparent`'s trace id, parent span id and flags.
fn traceparent(v: &str) -> (String, String, String) {
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {v:?}");
    assert_eq!(parts[0], "00", "traceparent {v:?}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

/// What holds for every traced request: node1's CLIENT span is the child
/// of `parent` (`""`: a root), node2's SERVER span the child of node1's,
/// both with the attributes an operator filters on.
fn check_hops(client: &Value, server: &Value, parent: &str, path: &str) {
    assert_eq!(client["parent_span_id"], parent, "{client:#}");
    assert_eq!(client["name"], format!("outbound {SERVICE}"), "{client:#}");
    assert_eq!(client["resource"]["service.name"], "mesh-agent");
    assert_eq!(client["resource"]["k8s.node.name"], "node1");
    assert_eq!(server["parent_span_id"], client["span_id"], "{server:#}");
    assert_eq!(server["name"], format!("inbound {SERVICE}"), "{server:#}");
    assert_eq!(server["resource"]["service.name"], "mesh-agent");
    assert_eq!(server["resource"]["k8s.node.name"], "node2");
    for s in [client, server] {
        let a = &s["attributes"];
        assert_eq!(a["http.request.method"], "GET", "{s:#}");
        assert_eq!(a["url.path"], path, "{s:#}");
        assert_eq!(a["http.response.status_code"], 200, "{s:#}");
        assert_eq!(a["mesh.destination.service"], SERVICE, "{s:#}");
        assert_eq!(
            a["mesh.destination.workload"], "default/node2-pod1",
            "{s:#}"
        );
        assert_eq!(a["mesh.source.workload"], "default/node1-pod1", "{s:#}");
        assert!(
            a["mesh.destination.identity"]
                .as_str()
                .is_some_and(|i| i.starts_with("spiffe://")),
            "{s:#}"
        );
        assert_eq!(s["status"], "UNSET", "{s:#}");
    }
    assert!(client["attributes"]["network.peer.address"].is_string());
    assert!(
        server["attributes"]["mesh.source.identity"]
            .as_str()
            .is_some_and(|i| i.starts_with("spiffe://")),
        "{server:#}"
    );
}

#[test]
fn both_agents_spans_join_the_callers_trace_over_w3c_and_b3() {
    let Some(cluster) = traced_cluster() else {
        return;
    };
    let collector = Collector::start(&cluster);
    let _echo = echo(&cluster, "node2-pod1");
    let docs = [
        cluster.workload_yaml("node2-pod1", &[("app", "traced")]),
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata:\n  name: traced\n  namespace: default\n\
             spec:\n  vips: [\"{VIP}\"]\n  ports:\n  - name: http\n    port: 80\n    targetPort: {ECHO}\n    appProtocol: http\n  \
             selector:\n    app: traced\n"
        ),
    ];
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    // Until the Service reaches node1's agent; these requests decline
    // sampling, so they leave no spans.
    let unsampled = format!("traceparent: 00-{}-{}-00", "e".repeat(32), "e".repeat(16));
    wait_for(
        "the Service at node1",
        Duration::from_secs(20),
        |last| match try_get(&cluster, "/warmup", &[&unsampled]) {
            Ok(a) if a["pod"] == "node2-pod1" => Some(()),
            Ok(a) => {
                *last = a.to_string();
                None
            }
            Err(e) => {
                *last = e;
                None
            }
        },
    );

    // W3C: the caller's span is the parent of node1's, node1's of node2's,
    // node2's of what the workload gets; tracestate rides along.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let answer = get(
        &cluster,
        "/w3c",
        &[
            &format!("traceparent: 00-{trace}-{caller}-01"),
            "tracestate: vendor=abc",
        ],
    );
    let (client, server) = collector.trace(trace);
    check_hops(&client, &server, caller, "/w3c");
    let (t, parent, flags) = traceparent(&received(&answer, "traceparent"));
    assert_eq!((t.as_str(), flags.as_str()), (trace, "01"));
    assert_eq!(parent, server["span_id"].as_str().unwrap(), "{answer}");
    assert_eq!(received(&answer, "tracestate"), "vendor=abc");

    // B3, multi-header: the same joins, and the workload gets B3 naming
    // node2's span (its parent: node1's) as well as a traceparent.
    let trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let caller = "e457b5a2e4d86bd1";
    let answer = get(
        &cluster,
        "/b3",
        &[
            &format!("X-B3-TraceId: {trace}"),
            &format!("X-B3-SpanId: {caller}"),
            "X-B3-Sampled: 1",
        ],
    );
    let (client, server) = collector.trace(trace);
    check_hops(&client, &server, caller, "/b3");
    assert_eq!(received(&answer, "x-b3-traceid"), trace);
    assert_eq!(received(&answer, "x-b3-spanid"), server["span_id"]);
    assert_eq!(received(&answer, "x-b3-parentspanid"), client["span_id"]);
    assert_eq!(received(&answer, "x-b3-sampled"), "1");
    let (t, parent, _) = traceparent(&received(&answer, "traceparent"));
    assert_eq!(
        (t.as_str(), parent.as_str()),
        (trace, server["span_id"].as_str().unwrap())
    );

    // B3, single header.
    let trace = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
    let caller = "1234567890abcdef";
    let answer = get(
        &cluster,
        "/b3-single",
        &[&format!("b3: {trace}-{caller}-1")],
    );
    let (client, server) = collector.trace(trace);
    check_hops(&client, &server, caller, "/b3-single");
    assert_eq!(
        received(&answer, "b3"),
        format!(
            "{trace}-{}-1-{}",
            server["span_id"].as_str().unwrap(),
            client["span_id"].as_str().unwrap()
        )
    );

    // No context: node1's agent starts the trace, and both hops are in it.
    let answer = get(&cluster, "/fresh", &[]);
    let (t, parent, flags) = traceparent(&received(&answer, "traceparent"));
    assert_eq!(flags, "01");
    let (client, server) = collector.trace(&t);
    check_hops(&client, &server, "", "/fresh");
    assert_eq!(parent, server["span_id"].as_str().unwrap());

    // An unsampled caller: the decision goes on to the workload and no span
    // of its trace is exported. A sampled request after it is the marker:
    // each agent exports in order, so once the marker's spans are in, the
    // unsampled request's would have been.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let answer = get(
        &cluster,
        "/unsampled",
        &[&format!("traceparent: 00-{trace}-b7ad6b7169203331-00")],
    );
    let (t, parent, flags) = traceparent(&received(&answer, "traceparent"));
    assert_eq!((t.as_str(), flags.as_str()), (trace, "00"));
    assert_ne!(parent, "b7ad6b7169203331", "a span id of the mesh's own");
    let marker = "5f4e3d2c1b0a99887766554433221100";
    get(
        &cluster,
        "/marker",
        &[&format!("traceparent: 00-{marker}-{caller}-01")],
    );
    collector.trace(marker);
    let leaked: Vec<Value> = collector
        .spans()
        .into_iter()
        .filter(|s| s["trace_id"] == trace || s["attributes"]["url.path"] == "/warmup")
        .collect();
    assert!(leaked.is_empty(), "unsampled spans exported: {leaked:#?}");

    // :15006: a caller outside the mesh (node1's own namespace) calls the
    // pod directly; node2's agent serves it as HTTP (an HTTP rule selects
    // the pod, PERMISSIVE lets plaintext in) and its SERVER span is the
    // child of the caller's.
    let permissive = format!(
        "{}  mtlsMode: PERMISSIVE\n",
        cluster.workload_yaml("node2-pod1", &[("app", "traced")])
    );
    let policy = "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                  metadata: {name: traced-http, namespace: default}\nspec:\n  \
                  selector: {matchLabels: {app: traced}}\n  action: ALLOW\n  rules:\n  \
                  - to:\n    - operation: {paths: [\"/*\"]}\n";
    cluster
        .apply(&yaml_stream(&[permissive.as_str(), policy]))
        .expect("apply");
    let pod_ip = cluster.pod("node2-pod1").ip;
    let trace = "3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c";
    let caller = "4d4d4d4d4d4d4d4d";
    let answer = wait_for(
        "plaintext HTTP served by node2's agent",
        Duration::from_secs(20),
        |last| {
            let out = cluster
                .node_command("node1", "curl")
                .args(["-sS", "--max-time", "5", "-H"])
                .arg(format!("traceparent: 00-{trace}-{caller}-01"))
                .arg(format!("http://{pod_ip}:{ECHO}/plain"))
                .output()
                .expect("running curl");
            let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            *last = format!("{answer} {}", String::from_utf8_lossy(&out.stderr));
            // Until the policy arrives the connection is carried as bytes,
            // and the header as it was sent.
            let seen = answer["headers"]
                .as_array()?
                .iter()
                .find(|h| h[0] == "traceparent")?;
            (!seen[1].as_str()?.contains(caller)).then_some(answer)
        },
    );
    let spans = collector.wait(trace, 1);
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let server = &spans[0];
    assert_eq!(server["kind"], "SERVER", "{server:#}");
    assert_eq!(server["parent_span_id"], caller, "{server:#}");
    assert_eq!(
        server["name"],
        format!("inbound {pod_ip}:{ECHO}"),
        "{server:#}"
    );
    assert_eq!(server["resource"]["k8s.node.name"], "node2");
    assert_eq!(server["attributes"]["url.path"], "/plain");
    assert_eq!(server["attributes"]["http.response.status_code"], 200);
    assert_eq!(
        server["attributes"]["mesh.destination.workload"],
        "default/node2-pod1"
    );
    assert!(
        server["attributes"]["mesh.source.identity"].is_null(),
        "{server:#}"
    );
    let (t, parent, _) = traceparent(&received(&answer, "traceparent"));
    assert_eq!(
        (t.as_str(), parent.as_str()),
        (trace, server["span_id"].as_str().unwrap())
    );

    for node in ["node1", "node2"] {
        let exported = agent_metric(&cluster, node, "mesh_agent_trace_spans_exported_total");
        assert!(exported >= 5, "{node} exported {exported} spans");
        for reason in ["queue_full", "export_failed"] {
            let sample = format!("mesh_agent_trace_spans_dropped_total{{reason=\"{reason}\"}}");
            assert_eq!(agent_metric(&cluster, node, &sample), 0, "{node}: {sample}");
        }
    }

    // The collector gone: requests are served as before, and the spans
    // they make are counted as lost.
    drop(collector);
    let failed = "mesh_agent_trace_spans_dropped_total{reason=\"export_failed\"}";
    wait_for("spans counted as lost", Duration::from_secs(30), |last| {
        let answer = get(&cluster, "/collector-down", &[]);
        assert_eq!(answer["pod"], "node2-pod1", "{answer}");
        let lost = agent_metric(&cluster, "node1", failed);
        *last = format!("node1 lost {lost}");
        (lost >= 1).then_some(())
    });
}
