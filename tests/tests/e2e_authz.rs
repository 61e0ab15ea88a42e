//! Authorization end to end: AuthorizationPolicies judged by the
//! destination's agent, with callers on other nodes (identity proven by the
//! tunnel's mTLS) and on the same node (identity from the kernel's cgroup
//! record). A table of cases, each applied in turn and asserted from real
//! clients (Python's http.client and raw sockets): allowed and denied by
//! principal, namespace, port, method, path, header and source IP block;
//! DENY over ALLOW; default deny (namespace and mesh); AUDIT; a change
//! applying to the next request; a denied TCP connection getting no byte.
mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use xtask::cluster::Cluster;

const WEB_VIP: &str = "198.18.220.1";
const LOCAL_VIP: &str = "198.18.220.2";
const TCP_VIP: &str = "198.18.220.3";

fn service(name: &str, vip: &str, port: u16, target: u16, proto: &str, app: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  vips: [\"{vip}\"]\n  ports: [{{name: p, port: {port}, targetPort: {target}, appProtocol: {proto}}}]\n  selector: {{app: {app}}}\n"
    )
}

fn authz(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
    )
}

fn principal(pod: &str) -> String {
    format!("cluster.local/ns/default/sa/{pod}")
}

/// The status of one request (0: no answer), and its flags.
fn status(
    cluster: &Cluster,
    from: &str,
    vip: &str,
    method: &str,
    path: &str,
    headers: Value,
) -> (u64, String) {
    let out = probe(
        python_in_pod(cluster, from),
        &[
            "http",
            "--addr",
            vip,
            "--requests",
            &json!([{"method": method, "path": path, "headers": headers}]).to_string(),
        ],
    );
    let a = &out[0];
    (
        a["status"].as_u64().unwrap_or(0),
        a["headers"]["x-mesh-flags"]
            .as_str()
            .unwrap_or("-")
            .to_owned(),
    )
}

/// A TCP echo exchange through `vip:7000`: the reply, or the error.
fn tcp(cluster: &Cluster, from: &str) -> Value {
    probe(
        python_in_pod(cluster, from),
        &[
            "connect",
            "--addr",
            TCP_VIP,
            "--port",
            "7000",
            "--payload",
            "ping",
        ],
    )
}

/// Applies `docs` and waits until `check` holds (the policy reached the
/// agents), returning how long that took.
fn apply_until(cluster: &Cluster, docs: &[String], check: impl Fn() -> bool) -> Duration {
    cluster.apply(&yaml_stream(docs)).expect("apply");
    until(check)
}

fn until(check: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the change never applied"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn remove(cluster: &Cluster, namespace: &str, name: &str) {
    meshctl_ok(
        cluster,
        &["delete", "authorizationpolicy", name, "-n", namespace],
    );
}

#[test]
fn authorization_policies_allow_and_deny_as_istio_does() {
    let Some(cluster) = cluster() else { return };
    let _servers = [echo(&cluster, "node2-pod1"), echo(&cluster, "node1-pod2")];
    let mut docs: Vec<String> = ["node1-pod1", "node1-pod2", "node2-pod1", "node3-pod1"]
        .iter()
        .map(|p| cluster.workload_yaml(p, &[]))
        .collect();
    docs.push(service("web", WEB_VIP, 80, ECHO, "http", "node2-pod1"));
    docs.push(service("local", LOCAL_VIP, 80, ECHO, "http", "node1-pod2"));
    docs.push(service(
        "tcp",
        TCP_VIP,
        7000,
        ECHO_PORT,
        "tcp",
        "node2-pod1",
    ));
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    let get = |from: &str, path: &str| status(&cluster, from, WEB_VIP, "GET", path, json!({}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while get("node1-pod1", "/").0 != 200 {
        assert!(Instant::now() < deadline, "web never answered");
        std::thread::sleep(Duration::from_millis(200));
    }
    // No policy: everyone may call.
    assert_eq!(get("node3-pod1", "/").0, 200);
    // The echo server greets first (its banner), then echoes.
    assert_eq!(tcp(&cluster, "node1-pod1")["reply"], "node2-pod1\nping");

    // ALLOW by principal: once one ALLOW selects the workload, others are
    // denied (403 AD), from both nodes.
    let allow = authz(
        "default",
        "web-allow",
        &format!(
            "  selector: {{matchLabels: {{app: node2-pod1}}}}\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n",
            principal("node1-pod1")
        ),
    );
    let took = apply_until(&cluster, std::slice::from_ref(&allow), || {
        get("node3-pod1", "/").0 == 403
    });
    assert!(
        took < Duration::from_secs(2),
        "the change applied in {took:?}"
    );
    assert_eq!(get("node1-pod1", "/").0, 200);
    assert_eq!(get("node3-pod1", "/"), (403, "AD".into()));
    // At L4 the same: node3's TCP connection gets no byte back, not even
    // the server's banner.
    let denied = tcp(&cluster, "node3-pod1");
    assert!(
        denied["reply"].as_str().unwrap_or_default().is_empty(),
        "{denied}"
    );
    assert_eq!(tcp(&cluster, "node1-pod1")["reply"], "node2-pod1\nping");

    // An open connection a new DENY covers is closed, within a second of
    // the change.
    let open = Probe::start(
        python_in_pod(&cluster, "node1-pod1"),
        &[
            "linger",
            "--addr",
            TCP_VIP,
            "--port",
            "7000",
            "--seconds",
            "15",
        ],
    );
    let shut = authz(
        "default",
        "tcp-deny",
        &format!(
            "  selector: {{matchLabels: {{app: node2-pod1}}}}\n  action: DENY\n  rules:\n  - to: [{{operation: {{ports: [\"{ECHO_PORT}\"]}}}}]\n"
        ),
    );
    let applied = Instant::now();
    cluster.apply(&shut).expect("apply");
    let out = open.finish();
    assert_eq!(out["greeting"], "node2-pod1\n", "{out}");
    let closed = out["closed_after"]
        .as_f64()
        .expect("the connection was closed");
    assert!(
        applied.elapsed() < Duration::from_secs(5) && closed < 3.0,
        "closed {closed} s after it opened: {out}"
    );
    remove(&cluster, "default", "tcp-deny");
    until(|| tcp(&cluster, "node1-pod1")["reply"] == "node2-pod1\nping");

    // DENY overrides ALLOW: by path, by method, by header.
    let deny = authz(
        "default",
        "web-deny",
        "  selector: {matchLabels: {app: node2-pod1}}\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/admin/*\"]}}]\n  - to: [{operation: {methods: [DELETE]}}]\n  - when: [{key: \"request.headers[x-block]\", values: [\"yes\"]}]\n",
    );
    apply_until(&cluster, std::slice::from_ref(&deny), || {
        get("node1-pod1", "/admin/x").0 == 403
    });
    assert_eq!(get("node1-pod1", "/admin/x"), (403, "AD".into()));
    assert_eq!(get("node1-pod1", "/public").0, 200);
    assert_eq!(
        status(&cluster, "node1-pod1", WEB_VIP, "DELETE", "/x", json!({})).0,
        403
    );
    assert_eq!(
        status(
            &cluster,
            "node1-pod1",
            WEB_VIP,
            "GET",
            "/x",
            json!({"x-block": "yes"})
        )
        .0,
        403
    );
    assert_eq!(
        status(
            &cluster,
            "node1-pod1",
            WEB_VIP,
            "GET",
            "/x",
            json!({"x-block": "no"})
        )
        .0,
        200
    );
    // The DENY's HTTP conditions do not apply to TCP: it denies the
    // connection (Istio's rule: more restrictive).
    let denied = tcp(&cluster, "node1-pod1");
    assert!(
        denied["reply"].as_str().unwrap_or_default().is_empty(),
        "{denied}"
    );
    remove(&cluster, "default", "web-deny");

    // By port: allowed to the HTTP port only.
    let by_port = authz(
        "default",
        "web-allow",
        &format!(
            "  selector: {{matchLabels: {{app: node2-pod1}}}}\n  rules:\n  - to: [{{operation: {{ports: [\"{ECHO}\"]}}}}]\n"
        ),
    );
    apply_until(&cluster, std::slice::from_ref(&by_port), || {
        get("node3-pod1", "/").0 == 200
    });
    let denied = tcp(&cluster, "node1-pod1");
    assert!(
        denied["reply"].as_str().unwrap_or_default().is_empty(),
        "{denied}"
    );

    // By namespace and by source IP block (the caller's pod IP, carried by
    // its agent and checked against the tunnel's identity).
    let node3_ip = cluster.pod("node3-pod1").ip;
    let by_source = authz(
        "default",
        "web-allow",
        &format!(
            "  selector: {{matchLabels: {{app: node2-pod1}}}}\n  rules:\n  - from: [{{source: {{namespaces: [default], notIpBlocks: [\"{node3_ip}/32\"]}}}}]\n"
        ),
    );
    apply_until(&cluster, std::slice::from_ref(&by_source), || {
        get("node3-pod1", "/").0 == 403
    });
    assert_eq!(get("node1-pod1", "/").0, 200);

    // AUDIT allows and is counted.
    remove(&cluster, "default", "web-allow");
    let audit = authz("default", "web-audit", "  action: AUDIT\n  rules: [{}]\n");
    let sample = "mesh_agent_authz_decisions_total{policy=\"default/web-audit\",result=\"audit\"}";
    apply_until(&cluster, std::slice::from_ref(&audit), || {
        get("node3-pod1", "/").0 == 200 && agent_metric(&cluster, "node2", sample) > 0
    });
    let before = agent_metric(&cluster, "node2", sample);
    assert_eq!(get("node3-pod1", "/").0, 200);
    assert_eq!(agent_metric(&cluster, "node2", sample), before + 1);
    remove(&cluster, "default", "web-audit");

    // Same node: node1's agent judges node1-pod1 -> node1-pod2 itself.
    let local_deny = authz(
        "default",
        "local-deny",
        &format!(
            "  selector: {{matchLabels: {{app: node1-pod2}}}}\n  action: DENY\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n",
            principal("node1-pod1")
        ),
    );
    apply_until(&cluster, std::slice::from_ref(&local_deny), || {
        status(&cluster, "node1-pod1", LOCAL_VIP, "GET", "/", json!({})).0 == 403
    });
    remove(&cluster, "default", "local-deny");

    // gRPC (grpcio): a denied call is PERMISSION_DENIED, by method path.
    let _grpc = Probe::start(
        python_in_pod(&cluster, "node2-pod1"),
        &["grpc-serve", "--port", "50051", "--name", "g"],
    );
    let grpc_deny = authz(
        "default",
        "grpc-deny",
        "  selector: {matchLabels: {app: node2-pod1}}\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/mesh.test.Echo/Unary\"]}}]\n",
    );
    let mut docs = vec![grpc_deny];
    docs.push(
        "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {name: grpc, namespace: default}\nspec:\n  vips: [\"198.18.220.4\"]\n  ports: [{name: grpc, port: 50051, appProtocol: grpc}]\n  selector: {app: node2-pod1}\n".to_owned(),
    );
    let calls = || {
        probe(
            python_in_pod(&cluster, "node1-pod1"),
            &["grpc-many", "--addr", "198.18.220.4:50051", "--count", "5"],
        )
    };
    apply_until(&cluster, &docs, || {
        calls()["codes"]["PERMISSION_DENIED"].as_u64() == Some(5)
    });
    remove(&cluster, "default", "grpc-deny");
    until(|| calls()["names"]["g"].as_u64() == Some(5));

    // Default deny: an ALLOW without rules in the namespace; then the
    // mesh-wide one in the root namespace.
    let none = authz("default", "deny-all", "  {}\n");
    apply_until(&cluster, std::slice::from_ref(&none), || {
        get("node1-pod1", "/").0 == 403
    });
    assert_eq!(get("node3-pod1", "/").0, 403);
    remove(&cluster, "default", "deny-all");
    until(|| get("node1-pod1", "/").0 == 200);
    let mesh = authz("mesh-system", "deny-all", "  {}\n");
    apply_until(&cluster, std::slice::from_ref(&mesh), || {
        get("node1-pod1", "/").0 == 403
    });
    assert_eq!(
        status(&cluster, "node1-pod1", LOCAL_VIP, "GET", "/", json!({})).0,
        403
    );
}

/// Where `--allow-probes-from` lets the "kubelet" in: node2's own processes
/// reach its pods from the pods' gateway address.
const PROBE_PORT: u16 = 9100;

/// A raw TCP exchange (send `ping`, read to the end) with `ip:port` from
/// `cmd`, a pod or a node: the reply or the error, and how long it took.
fn raw(cmd: std::process::Command, ip: std::net::Ipv4Addr, port: u16) -> Value {
    probe(
        cmd,
        &[
            "connect",
            "--addr",
            &ip.to_string(),
            "--port",
            &port.to_string(),
            "--payload",
            "ping",
            "--timeout",
            "3",
        ],
    )
}

#[test]
fn connections_that_bypass_the_agent_are_refused_if_strict_and_judged_at_15006_if_not() {
    if !privileged_env_ready() {
        return;
    }
    let mut spec = spec(2, 2);
    spec.agent_args = vec![
        "--allow-probes-from".into(),
        format!("198.19.2.1:{PROBE_PORT}"),
    ];
    let cluster = Cluster::up(&spec).expect("cluster up");
    assert_eq!(cluster.gateway_ip("node2").to_string(), "198.19.2.1");
    let _echo = echo(&cluster, "node2-pod1");
    let _health = Probe::start(
        python_in_pod(&cluster, "node2-pod1"),
        &[
            "listen",
            "--addr",
            "0.0.0.0",
            "--port",
            &PROBE_PORT.to_string(),
            "--seconds",
            "300",
        ],
    );
    let target = cluster.pod("node2-pod1").ip;
    cluster
        .unenroll("node1-pod2")
        .expect("a pod outside the mesh");
    // Callers that do not come through node2's agent: a pod outside the
    // mesh, a process in node2's namespace, one in node1's namespace.
    let outsiders = || {
        [
            (
                "a pod outside the mesh",
                python_in_pod(&cluster, "node1-pod2"),
            ),
            ("node2's namespace", python_on_node(&cluster, "node2")),
            ("node1's namespace", python_on_node(&cluster, "node1")),
        ]
    };
    let banner = "node2-pod1\nping";
    // Through the agents: across nodes (tunnel) and on the same node.
    for from in ["node1-pod1", "node2-pod2"] {
        let r = raw(python_in_pod(&cluster, from), target, ECHO_PORT);
        assert_eq!(r["reply"], banner, "{from}: {r}");
    }

    // STRICT (the default): refused in the kernel with a reset, at once,
    // whoever the caller; and not one byte of the server's banner.
    let refused = decision(&cluster, "node2", "strict_refused");
    for (who, cmd) in outsiders() {
        let r = raw(cmd, target, ECHO_PORT);
        assert_eq!(r["errno"], "ECONNREFUSED", "{who}: {r}");
        assert!(r.get("reply").is_none(), "{who}: {r}");
        let ms = r["ms"].as_f64().expect("ms");
        assert!(ms < 100.0, "{who}: refused after {ms} ms");
    }
    assert_eq!(decision(&cluster, "node2", "strict_refused") - refused, 3);
    // The documented exception: health probes from the kubelet's address
    // (node2's own namespace) to the probe port, and nothing else.
    let allowed = decision(&cluster, "node2", "probe_allowed");
    // (Connected and accepted: the probe server answers without reading,
    // so a payload would be reset by the server itself.)
    let r = probe(
        python_on_node(&cluster, "node2"),
        &[
            "connect",
            "--addr",
            &target.to_string(),
            "--port",
            &PROBE_PORT.to_string(),
        ],
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(decision(&cluster, "node2", "probe_allowed") - allowed, 1);
    let r = raw(python_on_node(&cluster, "node1"), target, PROBE_PORT);
    assert_eq!(r["errno"], "ECONNREFUSED", "another address: {r}");

    // PERMISSIVE: handed to node2's agent at :15006 and judged there as a
    // caller without identity. No policy: let in, through the agent.
    set_mtls_mode(&cluster, "node2-pod1", "PERMISSIVE");
    until(|| raw(python_in_pod(&cluster, "node1-pod2"), target, ECHO_PORT)["reply"] == banner);
    let redirected = decision(&cluster, "node2", "inbound_redirected");
    let forwarded = r#"mesh_agent_inbound_plaintext_connections_total{result="forwarded"}"#;
    let denied = r#"mesh_agent_inbound_plaintext_connections_total{result="denied"}"#;
    let (forwarded0, denied0) = (
        agent_metric(&cluster, "node2", forwarded),
        agent_metric(&cluster, "node2", denied),
    );
    // ALLOW node1's address only: its processes get in, the pod outside
    // the mesh on node1 (its own address) and node2's processes are reset
    // before any byte of the banner.
    let node1 = cluster.node_ip("node1");
    let only_node1 = authz(
        "default",
        "only-node1",
        &format!(
            "  selector: {{matchLabels: {{app: node2-pod1}}}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {{ipBlocks: [\"{node1}/32\"]}}\n"
        ),
    );
    apply_until(&cluster, &[only_node1], || {
        raw(python_on_node(&cluster, "node2"), target, ECHO_PORT)["errno"] == "ECONNRESET"
    });
    let r = raw(python_on_node(&cluster, "node1"), target, ECHO_PORT);
    assert_eq!(r["reply"], banner, "node1's namespace, allowed: {r}");
    for (who, cmd) in [
        (
            "a pod outside the mesh",
            python_in_pod(&cluster, "node1-pod2"),
        ),
        ("node2's namespace", python_on_node(&cluster, "node2")),
    ] {
        let r = raw(cmd, target, ECHO_PORT);
        assert_eq!(r["errno"], "ECONNRESET", "{who}: {r}");
        assert!(r.get("reply").is_none(), "{who} saw bytes: {r}");
    }
    assert!(decision(&cluster, "node2", "inbound_redirected") - redirected >= 4);
    assert!(agent_metric(&cluster, "node2", forwarded) > forwarded0);
    assert!(agent_metric(&cluster, "node2", denied) >= denied0 + 2);

    // A policy with HTTP rules: each request of a plaintext HTTP client is
    // judged (403 with the mesh's flag), in HTTP/1.1 as in HTTP/2.
    let paths = authz(
        "default",
        "only-node1",
        &format!(
            "  selector: {{matchLabels: {{app: node2-pod1}}}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {{ipBlocks: [\"{node1}/32\"]}}\n    to:\n    - operation: {{paths: [\"/ok*\"]}}\n"
        ),
    );
    let curl = |path: &str, h2: bool| -> String {
        let mut cmd = cluster.node_command("node1", "curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %header{x-mesh-flags}",
        ])
        .args(["--max-time", "3"]);
        if h2 {
            cmd.arg("--http2-prior-knowledge");
        }
        let out = cmd
            .arg(format!("http://{target}:{ECHO}{path}"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    apply_until(&cluster, &[paths], || curl("/no", false) == "403 AD");
    for h2 in [false, true] {
        assert_eq!(curl("/ok/1", h2), "200", "h2={h2}");
        assert_eq!(curl("/no", h2), "403 AD", "h2={h2}");
    }
    // Back to STRICT: refused in the kernel again.
    remove(&cluster, "default", "only-node1");
    set_mtls_mode(&cluster, "node2-pod1", "STRICT");
    until(|| raw(python_on_node(&cluster, "node1"), target, ECHO_PORT)["errno"] == "ECONNREFUSED");
}
