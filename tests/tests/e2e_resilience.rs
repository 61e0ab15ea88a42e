//! Resilience end to end: TrafficPolicies on Services whose echo servers
//! fail or slow down on request (`x-echo-fail`, `x-echo-delay`, naming the
//! servers that should), called from pods on node1 through the agents (and
//! the mTLS tunnel to node2 and node3). Each case asserts what a user relies
//! on: success rates, where requests went, what the agent answered itself
//! and how fast, and the decision counters. Clients: Python's http.client
//! (many threads, one connection each) and h2load.
mod support;

use std::{
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::*;
use xtask::cluster::Cluster;

/// Echo servers: two on node2, two on node3. Clients: node1's pods.
const SERVERS: [&str; 4] = ["node2-pod1", "node2-pod2", "node3-pod1", "node3-pod2"];

fn service(name: &str, vip: &str, label: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  vips: [\"{vip}\"]\n  ports:\n  - name: http\n    port: 80\n    targetPort: {ECHO}\n    appProtocol: http\n  \
         selector:\n    {label}: \"yes\"\n"
    )
}

fn policy(name: &str, service: &str, spec: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  targetRef: {{kind: Service, name: {service}}}\n{spec}"
    )
}

/// Workloads for the echo pods with the given labels each, and the clients.
fn workloads(cluster: &Cluster, labels: &[(&str, &[&str])]) -> Vec<String> {
    let mut docs: Vec<String> = SERVERS
        .iter()
        .map(|pod| {
            let mine: Vec<(&str, &str)> = labels
                .iter()
                .filter(|(_, pods)| pods.contains(pod))
                .map(|(l, _)| (*l, "yes"))
                .collect();
            cluster.workload_yaml(pod, &mine)
        })
        .collect();
    docs.push(cluster.workload_yaml("node1-pod1", &[]));
    docs.push(cluster.workload_yaml("node1-pod2", &[]));
    docs
}

/// `http-load` from `pod`: counts by pod, status and flags, latencies.
fn load(cluster: &Cluster, pod: &str, vip: &str, args: &[&str]) -> Value {
    let mut all = vec!["http-load", "--addr", vip];
    all.extend_from_slice(args);
    probe(python_in_pod(cluster, pod), &all)
}

fn count(v: &Value, what: &str, key: &str) -> u64 {
    v[what][key].as_u64().unwrap_or(0)
}

/// Answers of an `http-load` run whose flags include `flag`.
fn flagged(v: &Value, flag: &str) -> u64 {
    v["flags"]
        .as_object()
        .expect("flag counts")
        .iter()
        .filter(|(flags, _)| flags.split(',').any(|f| f == flag))
        .map(|(_, n)| n.as_u64().expect("a count"))
        .sum()
}

fn decisions(cluster: &Cluster, node: &str, service: &str, reason: &str) -> u64 {
    agent_metric(
        cluster,
        node,
        &format!(
            "mesh_agent_resilience_decisions_total{{destination_service=\"default/{service}\",reason=\"{reason}\"}}"
        ),
    )
}

/// Waits until a request to `vip` with `headers` gets an answer for which
/// `check` holds (the policy reached the agent).
fn until(cluster: &Cluster, vip: &str, headers: Value, check: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = headers.to_string();
        let v = load(
            cluster,
            "node1-pod1",
            vip,
            &["--count", "1", "--headers", &h],
        );
        if check(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "{vip} with {headers}: {v}");
        thread::sleep(Duration::from_millis(300));
    }
}

fn servers(cluster: &Cluster) -> Vec<Echo> {
    SERVERS.iter().map(|p| echo(cluster, p)).collect()
}

#[test]
fn retries_stay_in_the_budget_and_per_try_timeouts_move_on() {
    let Some(cluster) = cluster() else { return };
    let _servers = servers(&cluster);
    let three: &[&str] = &["node2-pod1", "node2-pod2", "node3-pod1"];
    // gRPC servers (Python grpcio) failing half of the calls UNAVAILABLE.
    let _rpc: Vec<Probe> = ["node2-pod2", "node3-pod2"]
        .iter()
        .map(|pod| {
            Probe::start(
                python_in_pod(&cluster, pod),
                &[
                    "grpc-serve",
                    "--port",
                    "50051",
                    "--name",
                    pod,
                    "--fail-percent",
                    "50",
                ],
            )
        })
        .collect();
    let rpc: &[&str] = &["node2-pod2", "node3-pod2"];
    let mut docs = workloads(&cluster, &[("flaky", three), ("rpc", rpc)]);
    let grpc_service = |name: &str, vip: &str| {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  vips: [\"{vip}\"]\n  ports:\n  - {{name: grpc, port: 50051, appProtocol: grpc}}\n  selector:\n    rpc: \"yes\"\n"
        )
    };
    docs.push(grpc_service("rpc", "198.18.210.4"));
    docs.push(grpc_service("rpc-plain", "198.18.210.5"));
    docs.push(policy(
        "rpc",
        "rpc",
        "  retries:\n    attempts: 8\n    retryOn: [unavailable]\n    backoff: {baseInterval: 1ms, maxInterval: 5ms}\n    budget: {percent: 100}\n",
    ));
    docs.push(service("flaky", "198.18.210.1", "flaky"));
    docs.push(service("down", "198.18.210.2", "flaky"));
    docs.push(service("slow", "198.18.210.3", "flaky"));
    docs.push(policy(
        "flaky",
        "flaky",
        "  retries:\n    attempts: 6\n    retryOn: [5xx]\n    backoff: {baseInterval: 1ms, maxInterval: 5ms}\n    budget: {percent: 100, minRetryConcurrency: 3}\n",
    ));
    docs.push(policy(
        "down",
        "down",
        "  retries:\n    attempts: 3\n    retryOn: [5xx]\n    backoff: {baseInterval: 1ms, maxInterval: 5ms}\n",
    ));
    docs.push(policy(
        "slow",
        "slow",
        "  loadBalancer: {simple: ROUND_ROBIN}\n  retries: {attempts: 2, perTryTimeout: 200ms, retryOn: [5xx]}\n",
    ));
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    // Policies applied: a failing answer is retried.
    until(
        &cluster,
        "198.18.210.1",
        json!({"x-echo-fail": "503@node2-pod1"}),
        |v| count(v, "statuses", "200") == 1,
    );

    // Half of all tries fail: retries make it >= 99% success, and the extra
    // load stays inside the budget.
    let before = decisions(&cluster, "node1", "flaky", "retried");
    let v = load(
        &cluster,
        "node1-pod1",
        "198.18.210.1",
        &[
            "--count",
            "1000",
            "--concurrency",
            "8",
            "--headers",
            r#"{"x-echo-fail": "503/50"}"#,
        ],
    );
    let ok = count(&v, "statuses", "200");
    assert!(ok >= 990, "50% failing with retries: {v}");
    let retried = decisions(&cluster, "node1", "flaky", "retried") - before;
    // Half of the tries failing wants about one retry per request; the
    // budget (100%: a retry in flight per request in flight at most) lets
    // them through, and a request's tries never overlap.
    assert!(
        (700..=1650).contains(&retried),
        "{retried} retries for 1000 requests: {v}"
    );
    assert!(flagged(&v, "RT") > 0, "retried answers carry RT: {v}");

    // Every try fails: retries stop at the budget (20% of requests in
    // flight, at least 3), not 3 per request.
    let before = decisions(&cluster, "node1", "down", "retried");
    let exhausted = decisions(&cluster, "node1", "down", "retry_budget_exhausted");
    let v = load(
        &cluster,
        "node1-pod1",
        "198.18.210.2",
        &[
            "--count",
            "600",
            "--concurrency",
            "30",
            "--headers",
            r#"{"x-echo-fail": "503"}"#,
        ],
    );
    assert_eq!(count(&v, "statuses", "503"), 600, "{v}");
    let retried = decisions(&cluster, "node1", "down", "retried") - before;
    assert!(
        retried <= 240,
        "{retried} retries for 600 requests to a Service that always fails (no budget: 1800): {v}"
    );
    assert!(decisions(&cluster, "node1", "down", "retry_budget_exhausted") > exhausted);
    assert!(
        flagged(&v, "RB") > 0,
        "answers the budget refused carry RB: {v}"
    );

    // gRPC: grpcio's calls (an AF_INET6 socket to an IPv4-mapped address)
    // to servers failing half of them UNAVAILABLE: retried on that status,
    // they succeed; without a policy, half fail.
    let calls = |vip: &str| {
        probe(
            python_in_pod(&cluster, "node1-pod1"),
            &[
                "grpc-many",
                "--addr",
                &format!("{vip}:50051"),
                "--count",
                "200",
            ],
        )
    };
    let plain = calls("198.18.210.5");
    let failed = plain["codes"]["UNAVAILABLE"].as_u64().unwrap_or(0);
    assert!((60..=140).contains(&failed), "no retries: {plain}");
    let retried = calls("198.18.210.4");
    let ok: u64 = retried["names"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(ok >= 198, "retried on UNAVAILABLE: {retried}");
    assert!(decisions(&cluster, "node1", "rpc", "retried") >= 60);

    // One endpoint answers after 2 s: its try times out at 200 ms and the
    // retry goes to another endpoint.
    let v = load(
        &cluster,
        "node1-pod1",
        "198.18.210.3",
        &[
            "--count",
            "30",
            "--headers",
            r#"{"x-echo-delay": "2000@node2-pod1"}"#,
        ],
    );
    assert_eq!(count(&v, "statuses", "200"), 30, "{v}");
    assert_eq!(count(&v, "pods", "node2-pod1"), 0, "{v}");
    assert!(
        count(&v, "flags", "RT") > 0,
        "some first tries went to the slow one: {v}"
    );
    assert!(
        v["latency_ms"]["200"]["max"].as_f64().unwrap() < 1000.0,
        "no request waited for the slow endpoint: {v}"
    );
}

#[test]
fn outliers_are_ejected_node_wide_and_balancing_follows_latency() {
    let Some(cluster) = cluster() else { return };
    let _servers = servers(&cluster);
    let three: &[&str] = &["node2-pod1", "node2-pod2", "node3-pod1"];
    let four: &[&str] = &SERVERS;
    let mut docs = workloads(&cluster, &[("trio", three), ("quad", four)]);
    docs.push(service("ej", "198.18.211.1", "trio"));
    docs.push(service("lat", "198.18.211.2", "trio"));
    docs.push(service("rr", "198.18.211.3", "trio"));
    docs.push(service("hash", "198.18.211.4", "trio"));
    docs.push(policy(
        "ej",
        "ej",
        "  loadBalancer: {simple: ROUND_ROBIN}\n  outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 4s, maxEjectionPercent: 50}\n",
    ));
    docs.push(policy(
        "rr",
        "rr",
        "  loadBalancer: {simple: ROUND_ROBIN}\n",
    ));
    docs.push(policy(
        "hash",
        "hash",
        "  loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n",
    ));
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    until(&cluster, "198.18.211.4", json!({"x-user": "a"}), |v| {
        count(v, "statuses", "200") == 1
    });

    // An endpoint failing every request is ejected after 3 in a row...
    let fail = r#"{"x-echo-fail": "503@node3-pod1"}"#;
    let before = decisions(&cluster, "node1", "ej", "ejected");
    until(&cluster, "198.18.211.1", json!({}), |v| {
        count(v, "statuses", "200") == 1
    });
    let v = load(
        &cluster,
        "node1-pod1",
        "198.18.211.1",
        &["--count", "60", "--headers", fail],
    );
    assert!(count(&v, "statuses", "503") <= 3, "{v}");
    assert_eq!(decisions(&cluster, "node1", "ej", "ejected"), before + 1);
    // ...and no pod of the node sends it anything while it is out.
    let v = load(
        &cluster,
        "node1-pod2",
        "198.18.211.1",
        &["--count", "60", "--headers", fail],
    );
    assert_eq!(count(&v, "pods", "node3-pod1"), 0, "{v}");
    assert_eq!(count(&v, "statuses", "200"), 60, "{v}");
    // After the ejection time it is readmitted and served again.
    thread::sleep(Duration::from_millis(4500));
    let v = load(&cluster, "node1-pod2", "198.18.211.1", &["--count", "60"]);
    assert!(count(&v, "pods", "node3-pod1") >= 5, "readmitted: {v}");

    // One endpoint 20 ms slower than two others (about ten times their
    // latency through two agents): within 1000 requests P2C over peak EWMA
    // sends at least 80% to the fast ones; round robin sends a third.
    let slow = r#"{"x-echo-delay": "20@node2-pod1"}"#;
    let args = ["--count", "1000", "--concurrency", "4", "--headers", slow];
    let v = load(&cluster, "node1-pod1", "198.18.211.2", &args);
    let to_slow = count(&v, "pods", "node2-pod1");
    assert!(
        to_slow <= 200,
        "P2C sent {to_slow} of 1000 to the slow endpoint: {v}"
    );
    let rr = load(&cluster, "node1-pod1", "198.18.211.3", &args);
    let rr_slow = count(&rr, "pods", "node2-pod1");
    assert!(
        (280..=390).contains(&rr_slow),
        "round robin sent {rr_slow} of 1000 to the slow endpoint: {rr}"
    );
    // The balancer is the node's: another pod's first requests avoid the
    // slow endpoint already.
    let v = load(
        &cluster,
        "node1-pod2",
        "198.18.211.2",
        &["--count", "100", "--concurrency", "2", "--headers", slow],
    );
    assert!(count(&v, "pods", "node2-pod1") <= 20, "another caller: {v}");

    // Consistent hashing: one header value, one endpoint; an endpoint added
    // takes about a quarter of the keys and no key moves elsewhere.
    let owners = |cluster: &Cluster| -> Vec<String> {
        let requests: Vec<Value> = (0..200)
            .map(|k| json!({"path": "/", "headers": {"x-user": format!("user-{k}")}}))
            .collect();
        let answers = probe(
            python_in_pod(cluster, "node1-pod1"),
            &[
                "http",
                "--addr",
                "198.18.211.4",
                "--requests",
                &Value::Array(requests).to_string(),
            ],
        );
        answers
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["body"]["pod"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    let first = owners(&cluster);
    assert_eq!(
        first,
        owners(&cluster),
        "the same key goes to the same endpoint"
    );
    let used: std::collections::BTreeSet<&String> = first.iter().collect();
    assert_eq!(
        used.len(),
        3,
        "keys spread over the three endpoints: {used:?}"
    );
    // node3-pod2 joins the Service.
    let mut docs = workloads(&cluster, &[("trio", four)]);
    docs.truncate(SERVERS.len());
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let now = owners(&cluster);
        if now.iter().any(|p| p == "node3-pod2") || Instant::now() > deadline {
            break now;
        }
        thread::sleep(Duration::from_millis(300));
    };
    let moved: Vec<(&String, &String)> = first.iter().zip(&after).filter(|(a, b)| a != b).collect();
    assert!(
        moved.iter().all(|(_, to)| *to == "node3-pod2"),
        "keys moved only to the new endpoint: {moved:?}"
    );
    assert!(
        (20..=80).contains(&moved.len()),
        "{} of 200 keys moved to the 4th endpoint (about 50 expected)",
        moved.len()
    );
}

/// h2load's counts: (2xx, 4xx, seconds).
fn h2load(cluster: &Cluster, pod: &str, url: &str, args: &[&str]) -> (u64, u64, f64) {
    let out = cluster
        .command(pod, "h2load")
        .args(args)
        .arg(url)
        .output()
        .expect("running h2load");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "h2load: {text}");
    let codes = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_else(|| panic!("h2load: {text}"));
    let n = |what: &str| -> u64 {
        codes
            .split(',')
            .find(|p| p.contains(what))
            .and_then(|p| p.split_whitespace().rev().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let seconds = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| {
            let t = l.split(',').next()?.trim();
            if let Some(ms) = t.strip_suffix("ms") {
                ms.parse::<f64>().ok().map(|m| m / 1000.0)
            } else {
                t.strip_suffix('s')?.parse().ok()
            }
        })
        .unwrap_or_else(|| panic!("h2load duration: {text}"));
    (n("2xx"), n("4xx"), seconds)
}

#[test]
fn breakers_rate_limits_and_faults_answer_for_the_backend() {
    let Some(cluster) = cluster() else { return };
    let _servers = servers(&cluster);
    let remote: &[&str] = &["node2-pod1", "node2-pod2"];
    let mut docs = workloads(&cluster, &[("pair", remote)]);
    docs.push(service("cb", "198.18.212.1", "pair"));
    docs.push(service("rl-out", "198.18.212.2", "pair"));
    docs.push(service("rl-in", "198.18.212.3", "pair"));
    docs.push(service("fault", "198.18.212.4", "pair"));
    docs.push(policy("cb", "cb", "  circuitBreaker: {maxRequests: 4}\n"));
    docs.push(policy(
        "rl-out",
        "rl-out",
        "  rateLimit: {outbound: {requests: 50, interval: 1s, burst: 10}}\n",
    ));
    docs.push(policy(
        "rl-in",
        "rl-in",
        "  rateLimit: {inbound: {requests: 40, interval: 1s, burst: 10}}\n",
    ));
    docs.push(policy(
        "fault",
        "fault",
        "  fault:\n    headers: [{name: x-chaos, value: \"on\"}]\n    delay: {fixedDelay: 150ms, percentage: 30}\n    abort: {httpStatus: 418, percentage: 25}\n",
    ));
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    until(&cluster, "198.18.212.4", json!({"x-chaos": "on"}), |v| {
        v["flags"].as_object().unwrap().keys().any(|f| f != "-")
    });

    // Circuit breaking: 4 requests in flight at most; the rest are answered
    // 503 UO at once, not queued.
    let v = load(
        &cluster,
        "node1-pod1",
        "198.18.212.1",
        &[
            "--count",
            "20",
            "--concurrency",
            "20",
            "--headers",
            r#"{"x-echo-delay": "1500"}"#,
        ],
    );
    let ok = count(&v, "statuses", "200");
    assert!((4..=8).contains(&ok), "{v}");
    assert_eq!(count(&v, "statuses", "503"), 20 - ok, "{v}");
    assert_eq!(count(&v, "flags", "UO"), 20 - ok, "{v}");
    assert!(
        v["latency_ms"]["503"]["p99"].as_f64().unwrap() < 300.0,
        "overflow is answered at once: {v}"
    );
    assert!(decisions(&cluster, "node1", "cb", "overflow_requests") >= 12);

    // Outbound rate limit at the caller's agent, with h2load at twice the
    // rate for 5 s: 50 per second pass, within 10%.
    let (ok, limited, secs) = h2load(
        &cluster,
        "node1-pod1",
        "http://198.18.212.2/",
        &["-n", "500", "-c", "2", "--rps", "50"],
    );
    // The bucket starts full (10 tokens), then refills at the rate.
    let rate = (ok as f64 - 10.0) / secs;
    assert!(
        (45.0..=55.0).contains(&rate),
        "outbound: {ok} passed, {limited} limited in {secs} s: {rate}/s"
    );
    assert_eq!(ok + limited, 500);
    let one = load(&cluster, "node1-pod1", "198.18.212.2", &["--count", "30"]);
    assert!(count(&one, "flags", "RL") > 0, "429s carry RL: {one}");
    assert!(decisions(&cluster, "node1", "rl-out", "rate_limited_outbound") >= limited);

    // Inbound rate limit at the destination's agent (node2), shared by
    // callers on two nodes: 40 per second in all, within 10%.
    let a = thread::scope(|s| {
        let other = s.spawn(|| {
            h2load(
                &cluster,
                "node3-pod1",
                "http://198.18.212.3/",
                &["-n", "400", "-c", "2", "--rps", "40"],
            )
        });
        let mine = h2load(
            &cluster,
            "node1-pod1",
            "http://198.18.212.3/",
            &["-n", "400", "-c", "2", "--rps", "40"],
        );
        (mine, other.join().expect("h2load on node3"))
    });
    let ((ok1, _, s1), (ok3, _, s3)) = a;
    let rate = ((ok1 + ok3) as f64 - 10.0) / s1.max(s3);
    assert!(
        (36.0..=44.0).contains(&rate),
        "inbound: {ok1} + {ok3} passed in {s1}/{s3} s: {rate}/s"
    );
    assert!(decisions(&cluster, "node2", "rl-in", "rate_limited_inbound") > 0);
    assert_eq!(
        decisions(&cluster, "node1", "rl-in", "rate_limited_outbound"),
        0
    );

    // Fault injection, only for requests with x-chaos: on. 25% aborted with
    // 418 FI, 30% delayed by 150 ms (DI), within 4 standard deviations.
    let v = load(
        &cluster,
        "node1-pod1",
        "198.18.212.4",
        &[
            "--count",
            "400",
            "--concurrency",
            "8",
            "--headers",
            r#"{"x-chaos": "on"}"#,
        ],
    );
    let aborted = count(&v, "statuses", "418");
    assert!((65..=135).contains(&aborted), "25% of 400 aborted: {v}");
    let delayed: u64 = v["latency_ms"]
        .as_object()
        .unwrap()
        .values()
        .map(|l| l["over_100"].as_u64().unwrap())
        .sum();
    assert!((84..=156).contains(&delayed), "30% of 400 delayed: {v}");
    assert_eq!(
        flagged(&v, "DI"),
        delayed,
        "every delayed answer carries DI: {v}"
    );
    assert_eq!(flagged(&v, "FI"), aborted, "{v}");
    let plain = load(
        &cluster,
        "node1-pod1",
        "198.18.212.4",
        &["--count", "100", "--concurrency", "4"],
    );
    assert_eq!(
        count(&plain, "statuses", "200"),
        100,
        "no fault without the header: {plain}"
    );
    assert!(decisions(&cluster, "node1", "fault", "fault_abort") >= aborted);
}
