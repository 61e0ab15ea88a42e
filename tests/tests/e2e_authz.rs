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
