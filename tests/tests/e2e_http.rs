//! L7 routing end to end, in the manner of the Gateway API's mesh
//! conformance tests: a client pod on node1 calls Services whose endpoints
//! run on node2 and node3 (two agents and the mTLS tunnel on the path) or on
//! node1 (same node: no tunnel, still routed). Each case asserts what the
//! backend saw: the echo server reports the method, path, host, headers and
//! its pod name. Clients are real ones: Python's http.client, curl, h2load
//! and Python grpcio.
mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::*;
use xtask::cluster::Cluster;

const GRPC_PORT: u16 = 50051;

/// A Service with one VIP and the given ports (`(port, appProtocol)`, all to
/// the echo port), selecting `selector`.
fn service(name: &str, vip: &str, ports: &[(u16, Option<&str>)], selector: (&str, &str)) -> String {
    let ports: String = ports
        .iter()
        .map(|(p, proto)| {
            let proto = proto
                .map(|a| format!("    appProtocol: {a}\n"))
                .unwrap_or_default();
            format!("  - name: p{p}\n    port: {p}\n    targetPort: {ECHO}\n{proto}")
        })
        .collect();
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  vips: [\"{vip}\"]\n  ports:\n{ports}  selector:\n    {}: {}\n",
        selector.0, selector.1
    )
}

fn http_route(name: &str, body: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{body}"
    )
}

/// HTTP/1.1 requests from `pod` on one connection (Python's http.client).
fn http(cluster: &Cluster, pod: &str, vip: &str, port: u16, requests: Value) -> Vec<Value> {
    let out = probe(
        python_in_pod(cluster, pod),
        &[
            "http",
            "--addr",
            vip,
            "--port",
            &port.to_string(),
            "--requests",
            &requests.to_string(),
        ],
    );
    out.as_array().expect("a list of answers").clone()
}

fn get(cluster: &Cluster, vip: &str, path: &str, headers: Value) -> Value {
    http(
        cluster,
        "node1-pod1",
        vip,
        80,
        json!([{"path": path, "headers": headers}]),
    )
    .remove(0)
}

/// Polls until `check` holds for the answer to GET `path` (configuration
/// takes a moment to reach the agents).
fn eventually(cluster: &Cluster, vip: &str, path: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = get(cluster, vip, path, json!({}));
        if check(&answer) {
            return answer;
        }
        assert!(Instant::now() < deadline, "GET {vip}{path}: {answer}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pod_of(answer: &Value) -> &str {
    answer["body"]["pod"].as_str().unwrap_or("?")
}

fn seen_header<'a>(answer: &'a Value, name: &str) -> Vec<&'a str> {
    answer["body"]["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .filter_map(|h| h[1].as_str())
        .collect()
}

const V1: [&str; 2] = ["node2-pod1", "node3-pod1"];
const V2: &str = "node2-pod2";

fn base_config(cluster: &Cluster) -> Vec<String> {
    let mut docs = vec![
        cluster.workload_yaml("node2-pod1", &[("echo", "yes"), ("version", "v1")]),
        cluster.workload_yaml("node3-pod1", &[("echo", "yes"), ("version", "v1")]),
        cluster.workload_yaml("node2-pod2", &[("echo", "yes"), ("version", "v2")]),
        cluster.workload_yaml("node1-pod2", &[("local", "yes")]),
    ];
    // Undeclared: the agents detect the protocol.
    docs.push(service(
        "echo",
        "198.18.200.1",
        &[(80, None), (8080, None)],
        ("echo", "yes"),
    ));
    docs.push(service(
        "echo-v1",
        "198.18.200.2",
        &[(80, Some("http"))],
        ("version", "v1"),
    ));
    docs.push(service(
        "echo-v2",
        "198.18.200.3",
        &[(80, Some("http"))],
        ("version", "v2"),
    ));
    docs.push(service(
        "echo-local",
        "198.18.200.4",
        &[(80, Some("http"))],
        ("local", "yes"),
    ));
    docs.push(service(
        "split",
        "198.18.200.5",
        &[(80, Some("http"))],
        ("echo", "yes"),
    ));
    docs.push(service(
        "empty",
        "198.18.200.6",
        &[(80, Some("http"))],
        ("nothing", "here"),
    ));
    docs
}

#[test]
fn http_routes_match_filter_split_and_redirect_as_the_gateway_api_says() {
    let Some(cluster) = cluster() else { return };
    let _servers: Vec<Echo> = ["node2-pod1", "node3-pod1", "node2-pod2", "node1-pod2"]
        .iter()
        .map(|p| echo(&cluster, p))
        .collect();
    cluster
        .apply(&yaml_stream(&base_config(&cluster)))
        .expect("apply");

    // MeshBasic: no route, the Service itself; per-request balancing. P2C
    // picks the lower-cost of two random endpoints, so one fast endpoint
    // can win a few requests in a row: 24 on one connection all landing on
    // one of three endpoints has a chance of about (2/3)^24 < 1e-4.
    let answer = eventually(&cluster, "198.18.200.1", "/", |a| a["status"] == 200);
    assert!(answer["headers"].get("x-mesh-flags").is_none(), "{answer}");
    let mut paths = vec![json!({"path": "/a"})];
    paths.extend((1..24).map(|i| json!({ "path": format!("/n{i}") })));
    let answers = http(&cluster, "node1-pod1", "198.18.200.1", 80, json!(paths));
    let pods: Vec<&str> = answers.iter().map(pod_of).collect();
    assert!(pods.iter().all(|p| V1.contains(p) || *p == V2), "{pods:?}");
    assert!(
        pods.windows(2).any(|w| w[0] != w[1]),
        "requests of one connection are balanced one by one: {pods:?}"
    );
    assert_eq!(answers[0]["body"]["path"], "/a");
    assert_eq!(answers[0]["body"]["host"], "198.18.200.1");
    // Same node: routed, not tunnelled.
    let local = eventually(&cluster, "198.18.200.4", "/x", |a| a["status"] == 200);
    assert_eq!(pod_of(&local), "node1-pod2");

    let routes = [
        http_route(
            "matching",
            "  parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /exact}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{headers: [{name: version, value: two}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /add-header}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
        add: [{name: X-Header-Add, value: add-appends-values}]
        remove: [X-Header-Remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Response-Set, value: yes}]}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /backend-mod}}]
    backendRefs:
    - name: echo-v2
      port: 80
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: X-Backend, value: v2}]}
  - matches: [{path: {type: PathPrefix, value: /prefix}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /strip-prefix}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /redirect-host}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
  - matches: [{path: {type: PathPrefix, value: /redirect-https}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}]
  - matches: [{path: {type: PathPrefix, value: /redirect-port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083, statusCode: 307}}]
  - matches: [{path: {type: PathPrefix, value: /redirect-prefix}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement}, statusCode: 308}}]
",
        ),
        // MeshPorts: a route for port 8080 only.
        http_route(
            "port-8080",
            "  parentRefs: [{group: \"\", kind: Service, name: echo, port: 8080}]
  rules: [{backendRefs: [{name: echo-v2, port: 80}]}]
",
        ),
        // MeshTrafficSplit / MeshHTTPRouteWeight.
        http_route(
            "split",
            "  parentRefs: [{group: \"\", kind: Service, name: split}]
  rules:
  - backendRefs: [{name: echo-v1, port: 80, weight: 90}, {name: echo-v2, port: 80, weight: 10}]
",
        ),
        http_route(
            "only-v2",
            "  parentRefs: [{group: \"\", kind: Service, name: echo-v2}]
  rules: [{matches: [{path: {type: PathPrefix, value: /v2}}], backendRefs: [{name: echo-v2, port: 80}]}]
",
        ),
        http_route(
            "to-nothing",
            "  parentRefs: [{group: \"\", kind: Service, name: empty}]
  rules: [{backendRefs: [{name: empty, port: 80}], timeouts: {request: 2s}}]
",
        ),
    ];
    cluster.apply(&yaml_stream(&routes)).expect("apply routes");
    eventually(&cluster, "198.18.200.1", "/v2", |a| pod_of(a) == V2);

    // MeshHTTPRouteMatching, MeshHTTPRouteQueryParamMatching.
    let cases: [(&str, Value, bool); 8] = [
        ("/", json!({}), false),
        ("/v2", json!({}), true),
        ("/v2/x", json!({}), true),
        ("/v2example", json!({}), false),
        ("/exact", json!({}), true),
        ("/exact/more", json!({}), false),
        ("/", json!({"version": "two"}), true),
        ("/?animal=whale", json!({}), true),
    ];
    for (path, headers, to_v2) in cases {
        let a = get(&cluster, "198.18.200.1", path, headers.clone());
        assert_eq!(a["status"], 200, "{path} {headers}: {a}");
        let pod = pod_of(&a);
        if to_v2 {
            assert_eq!(pod, V2, "{path} {headers} goes to v2: {a}");
        } else {
            assert!(V1.contains(&pod), "{path} {headers} goes to v1: {a}");
        }
        assert_eq!(a["headers"]["x-mesh-flags"], Value::Null, "{a}");
    }

    // MeshHTTPRouteRequestHeaderModifier (and the response side).
    let a = get(
        &cluster,
        "198.18.200.1",
        "/add-header",
        json!({"X-Header-Set": "old", "X-Header-Add": "first", "X-Header-Remove": "gone", "X-Keep": "kept"}),
    );
    assert_eq!(
        seen_header(&a, "x-header-set"),
        ["set-overwrites-values"],
        "{a}"
    );
    assert_eq!(
        seen_header(&a, "x-header-add"),
        ["first", "add-appends-values"],
        "{a}"
    );
    assert!(seen_header(&a, "x-header-remove").is_empty(), "{a}");
    assert_eq!(seen_header(&a, "x-keep"), ["kept"], "{a}");
    assert_eq!(a["headers"]["x-response-set"], "yes", "{a}");
    // MeshHTTPRouteBackendRequestHeaderModifier.
    let a = get(&cluster, "198.18.200.1", "/backend-mod", json!({}));
    assert_eq!(pod_of(&a), V2);
    assert_eq!(seen_header(&a, "x-backend"), ["v2"], "{a}");
    // MeshHTTPRouteRewritePath (and hostname).
    for (path, seen) in [
        ("/prefix/one/two", "/one/one/two"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/full/anything?q=1", "/replaced?q=1"),
    ] {
        let a = get(&cluster, "198.18.200.1", path, json!({}));
        assert_eq!(a["body"]["path"], seen, "{path}: {a}");
    }
    let a = get(&cluster, "198.18.200.1", "/full", json!({}));
    assert_eq!(a["body"]["host"], "rewritten.example", "{a}");
    // Redirects: the mesh answers, the backend never sees them.
    for (path, status, location) in [
        (
            "/redirect-host/a?x=1",
            302,
            "http://example.org/redirect-host/a?x=1",
        ),
        (
            "/redirect-https",
            301,
            "https://198.18.200.1/redirect-https",
        ),
        (
            "/redirect-port",
            307,
            "http://198.18.200.1:8083/redirect-port",
        ),
        (
            "/redirect-prefix/rest",
            308,
            "http://198.18.200.1/replacement/rest",
        ),
    ] {
        let a = get(&cluster, "198.18.200.1", path, json!({}));
        assert_eq!(a["status"], status, "{path}: {a}");
        assert_eq!(a["headers"]["location"], location, "{path}: {a}");
    }
    // MeshPorts: port 8080 has its own route; port 80 is unaffected.
    let a = http(
        &cluster,
        "node1-pod1",
        "198.18.200.1",
        8080,
        json!([{"path": "/"}]),
    )
    .remove(0);
    assert_eq!(pod_of(&a), V2, "{a}");
    // No matching rule: 404 from the mesh, flagged.
    let a = get(&cluster, "198.18.200.3", "/other", json!({}));
    assert_eq!(a["status"], 404, "{a}");
    assert_eq!(a["headers"]["x-mesh-flags"], "NR", "{a}");
    // No endpoint: 503, flagged.
    let a = get(&cluster, "198.18.200.6", "/", json!({}));
    assert_eq!(a["status"], 503, "{a}");
    assert_eq!(a["headers"]["x-mesh-flags"], "UH", "{a}");

    // MeshHTTPRouteWeight: 90/10 over 2,000 requests. Binomial(2000, 0.1):
    // mean 200, sd 13.4; +-5 sd.
    let out = probe(
        python_in_pod(&cluster, "node1-pod1"),
        &[
            "http",
            "--addr",
            "198.18.200.5",
            "--requests",
            "[{\"path\": \"/\"}]",
            "--repeat",
            "2000",
        ],
    );
    let v2 = out["pods"][V2].as_u64().unwrap_or(0);
    let v1: u64 = V1
        .iter()
        .map(|p| out["pods"][p].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(v1 + v2, 2000, "every request answered by v1 or v2: {out}");
    assert!(
        (133..=267).contains(&v2),
        "10% of 2,000 to v2, got {v2}: {out}"
    );

    // Request metrics, bounded labels: one series per endpoint's workload,
    // all through the tunnel (node1 has no endpoint of `split`).
    let routed: u64 = V1
        .iter()
        .chain([&V2])
        .map(|w| {
            agent_metric(
                &cluster,
                "node1",
                &format!(
                    "mesh_agent_http_requests_total{{source_workload=\"default/node1-pod1\",source_namespace=\"default\",\
                     source_identity=\"spiffe://cluster.local/ns/default/sa/node1-pod1\",destination_service=\"default/split\",\
                     destination_workload=\"default/{w}\",mtls=\"true\",route=\"default/split\",code=\"200\",grpc_status=\"\",flags=\"-\"}}"
                ),
            )
        })
        .sum();
    assert_eq!(routed, 2000, "each request counted once, with its route");
}

#[test]
fn real_http_clients_h2c_streams_websocket_and_http10() {
    let Some(cluster) = cluster() else { return };
    let _servers: Vec<Echo> = ["node2-pod1", "node3-pod1", "node2-pod2", "node1-pod2"]
        .iter()
        .map(|p| echo(&cluster, p))
        .collect();
    cluster
        .apply(&yaml_stream(&base_config(&cluster)))
        .expect("apply");
    eventually(&cluster, "198.18.200.1", "/", |a| a["status"] == 200);
    let curl = |args: &[&str]| {
        let out = cluster
            .command("node1-pod1", "curl")
            .args(["-sS", "--max-time", "20"])
            .args(args)
            .output()
            .expect("running curl");
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // curl, HTTP/1.0 and absolute form, across nodes: the backend sees the
    // request as curl wrote it.
    let body: Value = serde_json::from_str(&curl(&["-0", "http://198.18.200.2/ten"])).unwrap();
    assert_eq!(body["version"], "HTTP/1.0", "{body}");
    assert_eq!(body["path"], "/ten");
    let body: Value = serde_json::from_str(&curl(&[
        "--request-target",
        "http://198.18.200.2/absolute?x=1",
        "http://198.18.200.2/",
    ]))
    .unwrap();
    assert_eq!(
        body["path"], "http://198.18.200.2/absolute?x=1",
        "absolute form kept: {body}"
    );
    assert_eq!(body["version"], "HTTP/1.1");

    // h2c with prior knowledge (curl): detected, and HTTP/2 to the backend.
    let body: Value = serde_json::from_str(&curl(&[
        "--http2-prior-knowledge",
        "http://198.18.200.1/h2",
    ]))
    .unwrap();
    assert_eq!(body["version"], "HTTP/2.0", "{body}");
    assert_eq!(body["path"], "/h2");
    // Many concurrent streams of one HTTP/2 connection (nghttp) spread over
    // the endpoints.
    let urls: Vec<String> = (0..12)
        .map(|i| format!("http://198.18.200.1/s{i}"))
        .collect();
    let out = cluster
        .command("node1-pod1", "nghttp")
        .args(&urls)
        .output()
        .expect("running nghttp");
    let out = String::from_utf8_lossy(&out.stdout);
    let bodies: Vec<Value> = serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .map(|v| v.expect("JSON bodies"))
        .collect();
    assert_eq!(bodies.len(), 12, "{out}");
    assert!(bodies.iter().all(|b| b["version"] == "HTTP/2.0"), "{out}");
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    for b in &bodies {
        *by_pod
            .entry(b["pod"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    assert!(
        by_pod.len() >= 2,
        "streams of one connection reach several endpoints: {by_pod:?}"
    );

    // h2load: 2 connections x 10 concurrent streams.
    let out = cluster
        .command("node1-pod1", "h2load")
        .args(["-n", "400", "-c", "2", "-m", "10", "http://198.18.200.1/"])
        .output()
        .expect("running h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("400 succeeded, 0 failed") && text.contains("400 2xx"),
        "h2load through the mesh: {text}"
    );
    // wrk, HTTP/1.1 keep-alive, bounded in time.
    let out = cluster
        .command("node1-pod1", "wrk")
        .args(["-t1", "-c4", "-d2s", "http://198.18.200.1/"])
        .output()
        .expect("running wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "wrk through the mesh: {text}"
    );

    // curl's WebSocket handshake: 101 with the right accept key (RFC 6455's
    // example key), through both agents.
    let out = cluster
        .command("node1-pod1", "curl")
        .args([
            "-si",
            "--http1.1",
            "--max-time",
            "2",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "-H",
            "Sec-WebSocket-Version: 13",
            "http://198.18.200.2/_/ws",
        ])
        .output()
        .expect("running curl");
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "curl upgrade: {head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );

    // WebSocket upgrade across nodes: 101, then bytes both ways.
    let out = probe(
        python_in_pod(&cluster, "node1-pod1"),
        &[
            "ws",
            "--addr",
            "198.18.200.2",
            "--port",
            "80",
            "--payload",
            "ping-through-the-mesh",
        ],
    );
    assert_eq!(out["status"], 101, "{out}");
    assert_eq!(out["echo"], "ping-through-the-mesh", "{out}");
}

#[test]
fn grpc_routes_split_calls_and_failures_are_grpc_statuses() {
    let Some(cluster) = cluster() else { return };
    let port = GRPC_PORT.to_string();
    let _a = Probe::start(
        python_in_pod(&cluster, "node2-pod1"),
        &["grpc-serve", "--port", &port, "--name", "a"],
    );
    let _b = Probe::start(
        python_in_pod(&cluster, "node3-pod1"),
        &["grpc-serve", "--port", &port, "--name", "b"],
    );
    let grpc_service = |name: &str, vip: &str, sel: (&str, &str)| {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  vips: [\"{vip}\"]\n  ports:\n  - {{name: grpc, port: {GRPC_PORT}, appProtocol: grpc}}\n  selector:\n    {}: {}\n",
            sel.0, sel.1
        )
    };
    let docs = [
        cluster.workload_yaml("node2-pod1", &[("grpc", "yes")]),
        cluster.workload_yaml("node3-pod1", &[("grpc", "yes")]),
        grpc_service("grpc", "198.18.201.1", ("grpc", "yes")),
        grpc_service("grpc-a", "198.18.201.2", ("app", "node2-pod1")),
        grpc_service("grpc-b", "198.18.201.3", ("app", "node3-pod1")),
        grpc_service("grpc-none", "198.18.201.4", ("app", "nobody")),
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: weighted\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: grpc}}]\n  rules:\n  - matches: [{{method: {{service: mesh.test.Echo, method: Unary}}}}]\n    backendRefs: [{{name: grpc-a, port: {GRPC_PORT}, weight: 80}}, {{name: grpc-b, port: {GRPC_PORT}, weight: 20}}]\n  - matches: [{{method: {{service: mesh.test.Echo, method: Stream}}}}]\n    backendRefs: [{{name: grpc-b, port: {GRPC_PORT}}}]\n"
        ),
    ];
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    let addr = format!("198.18.201.1:{GRPC_PORT}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = probe(
            python_in_pod(&cluster, "node1-pod1"),
            &["grpc-many", "--addr", &addr, "--count", "500"],
        );
        if out["codes"].as_object().is_some_and(|c| c.is_empty()) && out["names"]["b"].is_number() {
            break out;
        }
        assert!(Instant::now() < deadline, "GRPCRoute never applied: {out}");
        std::thread::sleep(Duration::from_millis(300));
    };
    // MeshGRPCRouteWeight: 80/20 of 500; Binomial sd 8.9; +-5 sd.
    let b = out["names"]["b"].as_u64().unwrap_or(0);
    assert_eq!(out["names"]["a"].as_u64().unwrap_or(0) + b, 500, "{out}");
    assert!((55..=145).contains(&b), "20% of 500 to b, got {b}: {out}");
    // Bidirectional streaming through the route (grpcio's C core).
    let call = probe(
        python_in_pod(&cluster, "node1-pod1"),
        &["grpc-call", "--addr", &addr, "--messages", "3"],
    );
    assert_eq!(call["ok"], true, "{call}");
    assert_eq!(
        call["stream"],
        json!(["b:m0", "b:m1", "b:m2"]),
        "Stream goes to b: {call}"
    );
    // No rule for the method: UNIMPLEMENTED, from the mesh.
    let out = probe(
        python_in_pod(&cluster, "node1-pod1"),
        &[
            "grpc-many",
            "--addr",
            &addr,
            "--count",
            "3",
            "--method",
            "/mesh.test.Echo/Nope",
        ],
    );
    assert_eq!(out["codes"]["UNIMPLEMENTED"], 3, "{out}");
    // No endpoint: UNAVAILABLE.
    let out = probe(
        python_in_pod(&cluster, "node1-pod1"),
        &[
            "grpc-many",
            "--addr",
            &format!("198.18.201.4:{GRPC_PORT}"),
            "--count",
            "2",
        ],
    );
    assert_eq!(out["codes"]["UNAVAILABLE"], 2, "{out}");
}

#[test]
fn server_first_and_opaque_protocols_pass_ports_without_app_protocol() {
    let Some(cluster) = cluster() else { return };
    let _banner = echo(&cluster, "node2-pod1");
    let tcp_service = |name: &str, vip: &str, port: u16, extra: &str| {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  vips: [\"{vip}\"]\n  ports:\n  - {{port: {port}{extra}}}\n  selector:\n    app: node2-pod1\n"
        )
    };
    cluster
        .apply(&yaml_stream(&[
            tcp_service("banner", "198.18.202.1", ECHO_PORT, ""),
            tcp_service(
                "banner-quick",
                "198.18.202.2",
                ECHO_PORT,
                ", detectTimeout: 20ms",
            ),
        ]))
        .expect("apply");
    // The server speaks first; the client says nothing until greeted. The
    // agent waits out detection, then carries the bytes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = probe(
            python_in_pod(&cluster, "node1-pod1"),
            &[
                "banner",
                "--addr",
                "198.18.202.1",
                "--port",
                &ECHO_PORT.to_string(),
            ],
        );
        if out["greeting"] == "node2-pod1\n" || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(out["greeting"], "node2-pod1\n", "{out}");
    assert_eq!(out["echo"], "hello\n", "{out}");
    let waited = out["ms"].as_f64().unwrap_or(f64::MAX);
    assert!(
        (150.0..1000.0).contains(&waited),
        "the greeting comes after the default 200 ms detection, not later: {waited} ms"
    );
    let out = probe(
        python_in_pod(&cluster, "node1-pod1"),
        &[
            "banner",
            "--addr",
            "198.18.202.2",
            "--port",
            &ECHO_PORT.to_string(),
        ],
    );
    assert_eq!(out["greeting"], "node2-pod1\n", "{out}");
    let quick = out["ms"].as_f64().unwrap_or(f64::MAX);
    assert!(
        quick < 150.0,
        "a port's detectTimeout of 20 ms shortens the wait: {quick} ms"
    );

    // PostgreSQL (client first, binary) with pgbench, through a port
    // without appProtocol: detected as opaque at once.
    let pg = Postgres::start(&cluster, "node2-pod2");
    let pg_service = "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata:\n  name: pg\nspec:\n  vips: [\"198.18.202.3\"]\n  ports:\n  - {port: 5432}\n  selector:\n    app: node2-pod2\n";
    cluster.apply(pg_service).expect("apply pg");
    let pgbench = |args: &[&str]| {
        let out = cluster
            .command("node1-pod1", "pgbench")
            .args(["-h", "198.18.202.3", "-p", "5432", "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .output()
            .expect("running pgbench");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pgbench {args:?}: {text}");
        text
    };
    pgbench(&["-i", "-s", "1", "-q"]);
    let start = Instant::now();
    let text = pgbench(&["-c", "2", "-t", "100", "-C"]);
    assert!(
        text.contains("number of transactions actually processed: 200/200"),
        "pgbench through the mesh: {text}"
    );
    eprintln!(
        "pgbench -c 2 -t 100 -C (a connection per transaction) took {:?}",
        start.elapsed()
    );
    drop(pg);
}

/// A PostgreSQL server in a pod, trusting every connection; stopped on drop.
struct Postgres {
    child: Child,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl Postgres {
    fn start(cluster: &Cluster, pod: &str) -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (Debian package postgresql)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("an initdb under /usr/lib/postgresql");
        let dir = std::env::temp_dir().join(format!("mesh-pg-{}-{pod}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let chown = std::process::Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(chown.success());
        let data = dir.join("data");
        let init = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        // Connections arrive from the node's agent, so from the node's
        // address: trust the pod network as a whole.
        let hba = data.join("pg_hba.conf");
        let mut conf = std::fs::read_to_string(&hba).unwrap();
        conf.push_str("host all all 0.0.0.0/0 trust\n");
        std::fs::write(&hba, conf).unwrap();
        let mut child = cluster
            .command(pod, "runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-h", "0.0.0.0", "-p", "5432", "-k"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut line = String::new();
        while Instant::now() < deadline {
            line.clear();
            if err.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if line.contains("ready to accept connections") {
                std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
                return Postgres { child, dir, bin };
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("PostgreSQL did not start in {pod}: {line}");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // runuser does not pass signals on: ask PostgreSQL itself to stop
        // (fast shutdown), then reap runuser.
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["stop", "-m", "fast", "-w", "-t", "20", "-D"])
            .arg(self.dir.join("data"))
            .output();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Moves `pod` into Kubernetes namespace `namespace`: its Workload, and its
/// enrolment with its agent (which binds a cgroup to namespace/name).
fn move_to_namespace(cluster: &Cluster, pod: &str, namespace: &str) {
    cluster.unenroll(pod).expect("unenroll");
    meshctl_ok(cluster, &["delete", "workload", pod, "-n", "default"]);
    let doc = cluster
        .workload_yaml(pod, &[])
        .replace("namespace: default", &format!("namespace: {namespace}"));
    cluster.apply(&doc).expect("apply the moved Workload");
    let info = cluster.pod(pod);
    cluster
        .admin_post(
            &info.node,
            "/enroll",
            &json!({
                "pod": pod,
                "namespace": namespace,
                "cgroup": info.cgroup,
                "netns": format!("/run/netns/{}", info.netns),
            }),
        )
        .expect("enroll in the new namespace");
}

#[test]
fn consumer_routes_apply_to_their_namespace_only_and_pod_ips_are_not_routed() {
    let Some(cluster) = cluster() else { return };
    let _servers: Vec<Echo> = ["node2-pod1", "node3-pod1", "node2-pod2"]
        .iter()
        .map(|p| echo(&cluster, p))
        .collect();
    let mut docs = base_config(&cluster);
    docs.push(http_route(
        "producer",
        "  parentRefs: [{group: \"\", kind: Service, name: echo-v2}]
  rules:
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Route, value: producer}]}
    backendRefs: [{name: echo-v2, port: 80}]
",
    ));
    docs.push(
        http_route(
            "consumer",
            "  parentRefs: [{group: \"\", kind: Service, name: echo-v2, namespace: default}]
  rules:
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Route, value: consumer}]}
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /from-consumer}}
    backendRefs: [{name: echo-v1, namespace: default, port: 80}]
",
        )
        .replace("namespace: default\nspec", "namespace: consumer\nspec"),
    );
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    move_to_namespace(&cluster, "node3-pod2", "consumer");

    // MeshConsumerRoute: the caller in the route's namespace gets the
    // consumer route; a caller elsewhere gets the producer route.
    let deadline = Instant::now() + Duration::from_secs(20);
    let consumer = loop {
        let a = http(
            &cluster,
            "node3-pod2",
            "198.18.200.3",
            80,
            json!([{"path": "/x"}]),
        )
        .remove(0);
        if seen_header(&a, "x-route") == ["consumer"] || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        seen_header(&consumer, "x-route"),
        ["consumer"],
        "{consumer}"
    );
    assert_eq!(consumer["body"]["path"], "/from-consumer");
    assert!(
        V1.contains(&pod_of(&consumer)),
        "the consumer route's backend: {consumer}"
    );
    let producer = eventually(&cluster, "198.18.200.3", "/x", |a| {
        seen_header(a, "x-route") == ["producer"]
    });
    assert_eq!(pod_of(&producer), V2);
    assert_eq!(producer["body"]["path"], "/x");

    // A request to a pod's own address is not the Service's traffic: no
    // route applies (it is carried at L4, still through the tunnel).
    let ip = cluster.pod("node2-pod2").ip.to_string();
    let direct = http(&cluster, "node1-pod1", &ip, ECHO, json!([{"path": "/x"}])).remove(0);
    assert_eq!(direct["status"], 200, "{direct}");
    assert!(seen_header(&direct, "x-route").is_empty(), "{direct}");
    assert_eq!(direct["body"]["path"], "/x");
}

/// A process's resident and peak resident memory, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn failures_timeouts_mirrors_trailers_and_one_gigabyte_each_way() {
    let Some(cluster) = cluster() else { return };
    let _servers: Vec<Echo> = ["node2-pod1", "node3-pod1", "node2-pod2", "node3-pod2"]
        .iter()
        .map(|p| echo(&cluster, p))
        .collect();
    let mut docs = base_config(&cluster);
    docs.push(cluster.workload_yaml("node3-pod2", &[("mirror", "yes")]));
    docs.push(service(
        "mirror-sink",
        "198.18.200.8",
        &[(80, Some("http"))],
        ("mirror", "yes"),
    ));
    // The tcp-echo port greets first: not an HTTP answer.
    docs.push(
        service(
            "garbled",
            "198.18.200.9",
            &[(80, Some("http"))],
            ("version", "v2"),
        )
        .replace(
            &format!("targetPort: {ECHO}"),
            &format!("targetPort: {ECHO_PORT}"),
        ),
    );
    // Nothing listens there.
    docs.push(
        service(
            "refused",
            "198.18.200.10",
            &[(80, Some("http"))],
            ("version", "v2"),
        )
        .replace(&format!("targetPort: {ECHO}"), "targetPort: 9"),
    );
    docs.push(http_route(
        "slow",
        "  parentRefs: [{group: \"\", kind: Service, name: echo-v2}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /_/delay}}]
    backendRefs: [{name: echo-v2, port: 80}]
    timeouts: {request: 500ms}
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: mirror-sink, port: 80}}
    backendRefs: [{name: echo-v2, port: 80}]
",
    ));
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    eventually(&cluster, "198.18.200.3", "/", |a| a["status"] == 200);

    // request timeout: 504 from the mesh after 500 ms, not 2 s.
    let start = Instant::now();
    let a = get(&cluster, "198.18.200.3", "/_/delay/2000", json!({}));
    let took = start.elapsed();
    assert_eq!(a["status"], 504, "{a}");
    assert_eq!(a["headers"]["x-mesh-flags"], "UT", "{a}");
    assert!(
        took < Duration::from_millis(1800),
        "answered at the deadline: {took:?}"
    );
    let a = get(&cluster, "198.18.200.3", "/_/delay/50", json!({}));
    assert_eq!(a["status"], 200, "within the timeout: {a}");
    // An answer that is not HTTP: 502, flagged.
    let a = get(&cluster, "198.18.200.9", "/", json!({}));
    assert_eq!(a["status"], 502, "{a}");
    assert_eq!(a["headers"]["x-mesh-flags"], "UR", "{a}");
    // Nothing listening: 503 from the destination's agent, flagged.
    let a = get(&cluster, "198.18.200.10", "/", json!({}));
    assert_eq!(a["status"], 503, "{a}");
    assert_eq!(a["headers"]["x-mesh-flags"], "UF", "{a}");

    // Mirroring: each request also reaches the mirror (node3-pod2, which
    // nothing else calls), and the client sees only the primary's answer.
    let forwarded = r#"mesh_agent_inbound_streams_total{result="forwarded"}"#;
    let before = agent_metric(&cluster, "node3", forwarded);
    let answers = http(
        &cluster,
        "node1-pod1",
        "198.18.200.3",
        80,
        json!([{"path": "/m1"}, {"path": "/m2", "method": "POST", "body": "mirrored body"}, {"path": "/m3"}]),
    );
    assert!(answers.iter().all(|a| pod_of(a) == V2), "{answers:?}");
    wait_for(
        "the mirror to get 3 requests",
        Duration::from_secs(10),
        |last| {
            let n = agent_metric(&cluster, "node3", forwarded) - before;
            *last = format!("{n} so far");
            (n >= 3).then_some(())
        },
    );

    // Trailers pass through HTTP/2 across nodes (nghttp shows them; the
    // port is undeclared, so the backend is spoken to in HTTP/2 too).
    let out = cluster
        .command("node1-pod1", "nghttp")
        .args(["-v", "http://198.18.200.1/_/trailers"])
        .output()
        .expect("nghttp");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("x-trailer: yes"),
        "trailers through the mesh: {text}"
    );

    // 100-continue, then 1 GB up and 1 GB down across nodes, with the
    // agents' memory flat.
    let sh = |script: &str| {
        let out = cluster
            .command("node1-pod1", "sh")
            .args(["-c", script])
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (out, err) = sh(
        "head -c 1000000 /dev/zero > /tmp/mesh-e2e-1mb && curl -sv -H 'Expect: 100-continue' --data-binary @/tmp/mesh-e2e-1mb http://198.18.200.2/_/upload; rm -f /tmp/mesh-e2e-1mb",
    );
    assert!(err.contains("HTTP/1.1 100 Continue"), "{err}");
    assert!(out.contains("\"body_bytes\":1000000"), "{out}");
    let pids = [
        cluster.agent_pid("node1").expect("node1 agent"),
        cluster.agent_pid("node2").expect("node2 agent"),
        cluster.agent_pid("node3").expect("node3 agent"),
    ];
    let before: Vec<(f64, f64)> = pids.iter().map(|&p| rss_mib(p)).collect();
    const GB: u64 = 1 << 30;
    let start = Instant::now();
    let (out, _) = sh(&format!(
        "head -c {GB} /dev/zero | curl -sS -T - --max-time 300 http://198.18.200.2/_/upload"
    ));
    let up = start.elapsed();
    assert!(out.contains(&format!("\"body_bytes\":{GB}")), "{out}");
    let start = Instant::now();
    let (out, _) = sh(&format!(
        "curl -sS --max-time 300 -o /dev/null -w '%{{size_download}}' http://198.18.200.2/_/download/{GB}"
    ));
    let down = start.elapsed();
    assert_eq!(out.trim(), GB.to_string(), "downloaded bytes");
    let after: Vec<(f64, f64)> = pids.iter().map(|&p| rss_mib(p)).collect();
    for (i, ((rss0, hwm0), (rss1, hwm1))) in before.iter().zip(&after).enumerate() {
        eprintln!(
            "node{} agent: RSS {rss0:.1} -> {rss1:.1} MiB, peak {hwm0:.1} -> {hwm1:.1} MiB (1 GiB up in {up:?}, down in {down:?})",
            i + 1
        );
        assert!(
            hwm1 - hwm0 < 64.0,
            "node{} agent's peak memory grew by {:.1} MiB",
            i + 1,
            hwm1 - hwm0
        );
    }
}
