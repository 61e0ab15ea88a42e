//! `meshctl tap` end to end: a tapper on a node sees the requests and
//! connections its agent carries, with the right fields, in a terminal (a
//! pseudo terminal from `script`) and as JSON, filtered by the agent; and a
//! known number of requests shows up as exactly that many events.
mod support;

use std::{
    io::Read,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::*;
use xtask::cluster::{Cluster, default_meshctl_bin};

const WEB_VIP: &str = "198.18.230.1";
const TCP_VIP: &str = "198.18.230.2";

/// `meshctl --admin <node's socket> tap <args>` in a pseudo terminal, its
/// output (the terminal's) collected until it exits.
fn tap_in_pty(cluster: &Cluster, node: &str, args: &[&str]) -> Child {
    let socket = cluster.node(node).admin_socket.clone();
    let mut line = format!(
        "{} --admin {} tap",
        default_meshctl_bin().display(),
        socket.display()
    );
    for a in args {
        line += &format!(" '{a}'");
    }
    Command::new("script")
        .args(["-qfec", &line, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("script(1) runs meshctl tap in a pty")
}

fn finish(mut child: Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "meshctl tap never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .expect("tap output");
    assert!(
        child.wait().expect("exit").success(),
        "meshctl tap failed:\n{out}"
    );
    out.replace('\r', "")
}

/// Waits until the agent of `node` has `n` tappers, so no event is missed
/// (one that left is noticed within the agent's 1 s heartbeat: wait for 0
/// before starting another).
fn wait_for_tappers(cluster: &Cluster, node: &str, n: u64) {
    wait_for("the tapper to subscribe", Duration::from_secs(10), |last| {
        let now = agent_metric(cluster, node, "mesh_agent_tap_tappers");
        *last = format!("{now} tappers");
        (now == n).then_some(())
    });
}

/// One connection from node1-pod1 to the `tcp` Service (node2-pod1's echo
/// server): `ping` out, its name and `ping` back.
fn ping_tcp(cluster: &Cluster) {
    let reply = probe(
        python_in_pod(cluster, "node1-pod1"),
        &[
            "connect",
            "--addr",
            TCP_VIP,
            "--port",
            "7000",
            "--payload",
            "ping",
        ],
    );
    assert_eq!(reply["reply"], "node2-pod1\nping", "{reply}");
}

fn requests(cluster: &Cluster, from: &str, paths: &[&str]) -> Value {
    let reqs: Vec<Value> = paths
        .iter()
        .map(|p| {
            json!({"method": "GET", "path": p, "headers": {
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            }})
        })
        .collect();
    probe(
        python_in_pod(cluster, from),
        &[
            "http",
            "--addr",
            WEB_VIP,
            "--requests",
            &Value::Array(reqs).to_string(),
        ],
    )
}

#[test]
fn meshctl_tap_shows_what_the_agent_carries_with_its_fields() {
    let Some(cluster) = cluster() else { return };
    let _servers = [echo(&cluster, "node2-pod1")];
    let docs = [
        cluster.workload_yaml("node1-pod1", &[]),
        cluster.workload_yaml("node2-pod1", &[]),
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec:\n  vips: [\"{WEB_VIP}\"]\n  ports: [{{name: http, port: 80, targetPort: {ECHO}, appProtocol: http}}]\n  selector: {{app: node2-pod1}}\n"
        ),
        service_yaml(
            "tcp",
            TCP_VIP,
            7000,
            u32::from(ECHO_PORT),
            &[("app", "node2-pod1")],
        ),
    ];
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    wait_for("web to answer", Duration::from_secs(20), |last| {
        let out = requests(&cluster, "node1-pod1", &["/"]);
        *last = out.to_string();
        (out[0]["status"] == 200).then_some(())
    });

    // In a terminal: the caller's node shows 3 outbound requests, the
    // destination's node 3 inbound ones, each with its fields.
    let outbound = tap_in_pty(&cluster, "node1", &["--count", "3", "--path", "/tapped"]);
    let inbound = tap_in_pty(&cluster, "node2", &["--count", "3", "--path", "/tapped"]);
    wait_for_tappers(&cluster, "node1", 1);
    wait_for_tappers(&cluster, "node2", 1);
    let answers = requests(
        &cluster,
        "node1-pod1",
        &["/tapped/1", "/tapped/2", "/tapped/3"],
    );
    assert!(
        answers
            .as_array()
            .expect("answers")
            .iter()
            .all(|a| a["status"] == 200),
        "{answers}"
    );
    let out = finish(outbound);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three requests:\n{out}");
    assert!(lines[0].starts_with("DIR"), "{out}");
    for (i, line) in lines[1..].iter().enumerate() {
        for field in [
            "out",
            "default/node1-pod1",
            "default/web",
            &format!("GET /tapped/{}", i + 1),
            "200",
        ] {
            assert!(line.contains(field), "{field:?} in {line:?}\n{out}");
        }
        // Columns line up under the header.
        assert_eq!(lines[0].find("STATUS"), line.find("200"), "aligned:\n{out}");
    }
    let out = finish(inbound);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    for line in &lines[1..] {
        for field in ["in", "default/node1-pod1", "200", "allow"] {
            assert!(line.contains(field), "{field:?} in {line:?}\n{out}");
        }
    }

    // As JSON, filtered by status at the agent: a denied request is the one
    // event, with its verdict, identities, trace id and flag.
    let deny = "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                metadata: {name: no-secret, namespace: default}\nspec:\n  \
                selector: {matchLabels: {app: node2-pod1}}\n  action: DENY\n  \
                rules: [{to: [{operation: {paths: [\"/secret\"]}}]}]\n";
    cluster.apply(deny).expect("apply the DENY");
    wait_for("the DENY to apply", Duration::from_secs(20), |last| {
        let out = requests(&cluster, "node1-pod1", &["/secret"]);
        *last = out.to_string();
        (out[0]["status"] == 403).then_some(())
    });
    wait_for_tappers(&cluster, "node2", 0);
    let json_tap = tap_in_pty(
        &cluster,
        "node2",
        &["-o", "json", "--count", "1", "--status", "403"],
    );
    wait_for_tappers(&cluster, "node2", 1);
    requests(&cluster, "node1-pod1", &["/fine", "/secret", "/fine"]);
    let out = finish(json_tap);
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(events.len(), 1, "{out}");
    let e = &events[0];
    assert_eq!(e["type"], "request", "{e}");
    assert_eq!(e["direction"], "inbound");
    assert_eq!(e["path"], "/secret");
    assert_eq!(e["code"], 403);
    assert_eq!(e["flags"], "AD");
    assert_eq!(e["verdict"], "deny (default/no-secret rule 0)");
    assert_eq!(
        e["source_identity"],
        "spiffe://cluster.local/ns/default/sa/node1-pod1"
    );
    assert_eq!(
        e["destination_identity"],
        "spiffe://cluster.local/ns/default/sa/node2-pod1"
    );
    assert_eq!(e["destination_workload"], "default/node2-pod1");
    assert_eq!(e["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");

    // A TCP connection shows when it closes, with its bytes. (Without the
    // DENY: on a connection its HTTP conditions are ignored, so it would
    // deny every connection, as Istio's would.)
    meshctl_ok(
        &cluster,
        &[
            "delete",
            "authorizationpolicy",
            "no-secret",
            "-n",
            "default",
        ],
    );
    wait_for("the DENY to go", Duration::from_secs(20), |last| {
        let out = requests(&cluster, "node1-pod1", &["/secret"]);
        *last = out.to_string();
        (out[0]["status"] == 200).then_some(())
    });
    wait_for_tappers(&cluster, "node1", 0);
    let conn_tap = tap_in_pty(
        &cluster,
        "node1",
        &["-o", "json", "--count", "1", "--service", "tcp"],
    );
    wait_for_tappers(&cluster, "node1", 1);
    ping_tcp(&cluster);
    let out = finish(conn_tap);
    let e: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out:?}: {e}"));
    assert_eq!(e["type"], "connection", "{e}");
    assert_eq!(e["service"], "default/tcp");
    assert_eq!(e["src_pod"], "node1-pod1");
    assert_eq!(e["bytes_sent"], 4);
    assert_eq!(e["bytes_received"], "node2-pod1\nping".len());

    // A bad filter is refused by the agent, naming it.
    let err = cluster
        .admin_get("node1", "/tap?statu=500")
        .expect_err("an unknown filter");
    assert!(
        format!("{err:#}").contains("unknown filter `statu`"),
        "{err:#}"
    );
    // And no agent: the error names the socket.
    let out = Command::new(default_meshctl_bin())
        .args(["--admin", "/run/mesh/no-such.sock", "tap"])
        .output()
        .expect("meshctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no agent answers on /run/mesh/no-such.sock"),
        "{err}"
    );
}

/// The access log lines (JSON) in `node`'s agent log, of `type`.
fn access_log(cluster: &Cluster, node: &str, kind: &str) -> Vec<Value> {
    std::fs::read_to_string(&cluster.node(node).agent_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == kind)
        .collect()
}

#[test]
fn access_logs_are_written_per_service_as_sampled() {
    if !privileged_env_ready() {
        return;
    }
    let mut spec = spec(2, 2);
    // To stdout: each agent's own log file.
    spec.agent_args = vec!["--access-log".into(), "-".into()];
    let cluster = Cluster::up(&spec).expect("cluster up");
    let _servers = [echo(&cluster, "node2-pod1")];
    let http = |name: &str, vip: &str| {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  vips: [\"{vip}\"]\n  ports: [{{name: http, port: 80, targetPort: {ECHO}, appProtocol: http}}]\n  selector: {{app: node2-pod1}}\n"
        )
    };
    let policy = |name: &str, sampling: u32| {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  targetRef: {{kind: Service, name: {name}}}\n  accessLog: {{sampling: {sampling}}}\n"
        )
    };
    let docs = [
        cluster.workload_yaml("node1-pod1", &[]),
        cluster.workload_yaml("node2-pod1", &[]),
        http("web", WEB_VIP),
        http("half", "198.18.230.3"),
        http("quiet", "198.18.230.4"),
        service_yaml(
            "tcp",
            TCP_VIP,
            7000,
            u32::from(ECHO_PORT),
            &[("app", "node2-pod1")],
        ),
        policy("web", 100),
        policy("half", 50),
        policy("tcp", 100),
    ];
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    let get = |vip: &str, n: usize| {
        let reqs: Vec<Value> = (0..n)
            .map(|i| json!({"method": "GET", "path": format!("/logged/{i}"), "headers": {}}))
            .collect();
        probe(
            python_in_pod(&cluster, "node1-pod1"),
            &[
                "http",
                "--addr",
                vip,
                "--requests",
                &Value::Array(reqs).to_string(),
            ],
        )
    };
    wait_for("web to answer", Duration::from_secs(20), |last| {
        let out = get(WEB_VIP, 1);
        *last = out.to_string();
        (out[0]["status"] == 200).then_some(())
    });
    // The writer batches (20 ms): the probes' lines are counted once they
    // are all out (the count holds still for 200 ms).
    let mut seen = (usize::MAX, Instant::now());
    let before = wait_for(
        "the probes' access log lines",
        Duration::from_secs(10),
        |last| {
            let n = access_log(&cluster, "node1", "request").len();
            *last = format!("{n} lines");
            if n != seen.0 {
                seen = (n, Instant::now());
            }
            (n > 0 && seen.1.elapsed() >= Duration::from_millis(200)).then_some(n)
        },
    );
    let ok = |out: &Value| {
        out.as_array()
            .is_some_and(|a| a.iter().all(|r| r["status"] == 200))
    };
    assert!(ok(&get(WEB_VIP, 20)));
    assert!(ok(&get("198.18.230.3", 200)));
    assert!(ok(&get("198.18.230.4", 20)));
    ping_tcp(&cluster);
    let by_service = |service: &str| -> Vec<Value> {
        access_log(&cluster, "node1", "request")
            .into_iter()
            .skip(before)
            .filter(|l| l["destination_service"] == service)
            .collect()
    };
    wait_for(
        "the access log to be written",
        Duration::from_secs(10),
        |last| {
            let n = by_service("default/web").len();
            *last = format!("{n} lines for web");
            (n == 20).then_some(())
        },
    );
    // Every request of web, with the fields Envoy users look for.
    let web = by_service("default/web");
    for (i, line) in web.iter().enumerate() {
        assert_eq!(line["path"], format!("/logged/{i}"), "{line}");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["code"], 200);
        assert_eq!(line["direction"], "outbound");
        assert_eq!(line["source_workload"], "default/node1-pod1");
        assert_eq!(
            line["destination_identity"],
            "spiffe://cluster.local/ns/default/sa/node2-pod1"
        );
        assert!(line["start_unix_ms"].as_u64().unwrap_or(0) > 0, "{line}");
        assert!(line["upstream"].is_string(), "{line}");
    }
    // Half of half's (binomial, 200 draws: well within 60..140), none of quiet's.
    let half = by_service("default/half").len();
    assert!((60..=140).contains(&half), "{half} of 200 at 50%");
    assert!(by_service("default/quiet").is_empty());
    // And the TCP Service's connection, when it closed.
    let conns: Vec<Value> = wait_for(
        "the connection's access log line",
        Duration::from_secs(10),
        |last| {
            let conns: Vec<Value> = access_log(&cluster, "node1", "connection")
                .into_iter()
                .filter(|l| l["service"] == "default/tcp")
                .collect();
            *last = format!("{conns:?}");
            (!conns.is_empty()).then_some(conns)
        },
    );
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0]["bytes_sent"], 4);
}

/// A tmux session (a pseudo terminal of 160x40) running one command; killed
/// on drop.
struct Tmux(String);

impl Tmux {
    fn start(name: &str, command: &str) -> Tmux {
        let ok = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "160",
                "-y",
                "40",
                command,
            ])
            .status()
            .expect("tmux")
            .success();
        assert!(ok, "tmux new-session");
        Tmux(name.to_owned())
    }

    /// What the terminal shows now.
    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

#[test]
fn meshctl_top_renders_in_a_terminal_and_its_numbers_match_the_metrics() {
    let Some(cluster) = cluster() else { return };
    let _servers = [echo(&cluster, "node2-pod1")];
    let docs = [
        cluster.workload_yaml("node1-pod1", &[]),
        cluster.workload_yaml("node2-pod1", &[]),
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec:\n  vips: [\"{WEB_VIP}\"]\n  ports: [{{name: http, port: 80, targetPort: {ECHO}, appProtocol: http}}]\n  selector: {{app: node2-pod1}}\n"
        ),
    ];
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    wait_for("web to answer", Duration::from_secs(20), |last| {
        let out = requests(&cluster, "node1-pod1", &["/"]);
        *last = out.to_string();
        (out[0]["status"] == 200).then_some(())
    });
    let sample = r#"mesh_agent_http_requests_total{source_workload="default/node1-pod1",source_namespace="default",source_identity="spiffe://cluster.local/ns/default/sa/node1-pod1",destination_service="default/web",destination_workload="default/node2-pod1",mtls="true",route="",code="200",grpc_status="",flags="-"}"#;
    let counted = agent_metric(&cluster, "node1", sample);
    assert!(
        counted > 0,
        "the sample is the one the requests count under"
    );

    // In a terminal (tmux), refreshing in place.
    let socket = cluster.node("node1").admin_socket.clone();
    let session = format!("mesh-top-{}", std::process::id());
    let tmux = Tmux::start(
        &session,
        &format!(
            "{} --admin {} top --by service --interval-ms 200",
            default_meshctl_bin().display(),
            socket.display()
        ),
    );
    wait_for_tappers(&cluster, "node1", 1);
    let paths: Vec<String> = (0..25).map(|i| format!("/top/{i}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    requests(&cluster, "node1-pod1", &paths);
    let row = wait_for(
        "top to show the 25 requests",
        Duration::from_secs(10),
        |last| {
            let screen = tmux.screen();
            *last = screen.clone();
            screen
                .lines()
                .find(|l| l.contains("default/web"))
                .filter(|l| l.split_whitespace().any(|c| c == "25"))
                .map(str::to_owned)
        },
    );
    let screen = tmux.screen();
    assert!(screen.contains("meshctl top"), "{screen}");
    assert!(
        screen.contains("REQUESTS") && screen.contains("P99 MS"),
        "{screen}"
    );
    assert!(row.contains("100.0%"), "all succeeded: {row}");
    assert_eq!(
        agent_metric(&cluster, "node1", sample) - counted,
        25,
        "the metrics counted what top shows"
    );
    drop(tmux);

    // Piped: a plain table per refresh.
    wait_for_tappers(&cluster, "node1", 0);
    let piped = Command::new(default_meshctl_bin())
        .arg("--admin")
        .arg(&socket)
        .args([
            "top",
            "--by",
            "service",
            "--count",
            "1",
            "--interval-ms",
            "3000",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("meshctl top");
    wait_for_tappers(&cluster, "node1", 1);
    requests(&cluster, "node1-pod1", &["/a", "/b", "/c"]);
    let out = piped.wait_with_output().expect("meshctl top");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{text}");
    let web = lines
        .iter()
        .find(|l| l.starts_with("default/web"))
        .unwrap_or_else(|| panic!("{text}"));
    let cells: Vec<&str> = web.split_whitespace().collect();
    assert_eq!(cells[1], "3", "{text}");
    assert_eq!(
        lines[0].find("REQUESTS"),
        web.find(" 3 ").map(|i| i + 1),
        "{text}"
    );
}

/// `node`'s sample, once it reaches `want` (counters of connections close
/// a moment after the client has its answer).
fn metric_reaches(cluster: &Cluster, node: &str, sample: &str, want: u64) -> u64 {
    wait_for(sample, Duration::from_secs(10), |last| {
        let now = agent_metric(cluster, node, sample);
        *last = format!("{now}, want {want}");
        (now >= want).then_some(now)
    })
}

/// Like [`metric_reaches`], `None` when it does not within 10 s.
fn wait_for_metric(cluster: &Cluster, node: &str, sample: &str, want: u64) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = agent_metric(cluster, node, sample);
        if now >= want {
            return Some(now);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn request_and_tcp_metrics_count_exactly_what_was_sent_with_their_labels() {
    let Some(cluster) = cluster() else { return };
    let _servers = [echo(&cluster, "node2-pod1"), echo(&cluster, "node1-pod2")];
    let http = |name: &str, vip: &str, app: &str| {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  vips: [\"{vip}\"]\n  ports: [{{name: http, port: 80, targetPort: {ECHO}, appProtocol: http}}]\n  selector: {{app: {app}}}\n"
        )
    };
    let docs = [
        cluster.workload_yaml("node1-pod1", &[]),
        cluster.workload_yaml("node1-pod2", &[]),
        cluster.workload_yaml("node2-pod1", &[]),
        http("web", WEB_VIP, "node2-pod1"),
        http("near", "198.18.230.5", "node1-pod2"),
        service_yaml(
            "tcp",
            TCP_VIP,
            7000,
            u32::from(ECHO_PORT),
            &[("app", "node2-pod1")],
        ),
    ];
    cluster.apply(&yaml_stream(&docs)).expect("apply");
    let post = |vip: &str, n: usize| {
        let reqs: Vec<Value> = (0..n)
            .map(|i| json!({"method": "POST", "path": format!("/counted/{i}"), "headers": {}, "body": "x".repeat(100)}))
            .collect();
        let out = probe(
            python_in_pod(&cluster, "node1-pod1"),
            &[
                "http",
                "--addr",
                vip,
                "--requests",
                &Value::Array(reqs).to_string(),
            ],
        );
        let answers = out.as_array().expect("answers").clone();
        assert!(answers.iter().all(|a| a["status"] == 200), "{out}");
    };
    wait_for("web to answer", Duration::from_secs(20), |last| {
        let out = requests(&cluster, "node1-pod1", &["/"]);
        *last = out.to_string();
        (out[0]["status"] == 200).then_some(())
    });
    wait_for("near to answer", Duration::from_secs(20), |_| {
        let reqs = json!([{"method": "GET", "path": "/", "headers": {}}]).to_string();
        let out = probe(
            python_in_pod(&cluster, "node1-pod1"),
            &["http", "--addr", "198.18.230.5", "--requests", &reqs],
        );
        (out[0]["status"] == 200).then_some(())
    });

    let labels = |service: &str, workload: &str, mtls: bool| {
        format!(
            "source_workload=\"default/node1-pod1\",source_namespace=\"default\",\
             source_identity=\"spiffe://cluster.local/ns/default/sa/node1-pod1\",\
             destination_service=\"default/{service}\",destination_workload=\"default/{workload}\",\
             mtls=\"{mtls}\",route=\"\",code=\"200\",grpc_status=\"\",flags=\"-\""
        )
    };
    let far = format!(
        "mesh_agent_http_requests_total{{{}}}",
        labels("web", "node2-pod1", true)
    );
    let near = format!(
        "mesh_agent_http_requests_total{{{}}}",
        labels("near", "node1-pod2", false)
    );
    let sizes = |name: &str, service: &str, part: &str| {
        format!(
            "mesh_agent_http_{name}_size_bytes_{part}{{destination_service=\"default/{service}\",route=\"\"}}"
        )
    };
    let before = [
        agent_metric(&cluster, "node1", &far),
        agent_metric(&cluster, "node1", &near),
        agent_metric(&cluster, "node1", &sizes("request", "web", "count")),
        agent_metric(&cluster, "node1", &sizes("request", "web", "sum")),
        agent_metric(&cluster, "node1", &sizes("response", "web", "count")),
    ];
    post(WEB_VIP, 7);
    post("198.18.230.5", 5);
    // Cross node through the tunnel, same node directly; each counted once,
    // by the caller's agent, with the labels of who called whom.
    let page = |node: &str| {
        let out = cluster
            .node_command(node, "curl")
            .args(["-sf", "http://127.0.0.1:15020/metrics"])
            .output()
            .expect("curl the metrics");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let lines = |node: &str, prefix: &str| {
        page(node)
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        agent_metric(&cluster, "node1", &far) - before[0],
        7,
        "{far} in\n{}",
        lines("node1", "mesh_agent_http_requests_total")
    );
    assert_eq!(agent_metric(&cluster, "node1", &near) - before[1], 5);
    assert_eq!(
        metric_reaches(
            &cluster,
            "node1",
            &sizes("request", "web", "count"),
            before[2] + 7
        ) - before[2],
        7
    );
    assert_eq!(
        agent_metric(&cluster, "node1", &sizes("request", "web", "sum")) - before[3],
        700,
        "request bodies as sent"
    );
    assert_eq!(
        metric_reaches(
            &cluster,
            "node1",
            &sizes("response", "web", "count"),
            before[4] + 7
        ) - before[4],
        7
    );
    assert!(
        agent_metric(&cluster, "node1", &sizes("response", "web", "sum")) > 0,
        "responses have bodies"
    );
    let text = page("node1");
    assert!(text.contains("mesh_agent_http_requests_total"), "{text}");
    for forbidden in ["198.18.", "/counted/"] {
        assert!(
            !text
                .lines()
                .filter(|l| l.starts_with("mesh_agent_http") || l.starts_with("mesh_agent_tcp"))
                .any(|l| l.contains(forbidden)),
            "no addresses or raw paths in labels ({forbidden})"
        );
    }

    // Three TCP connections across nodes: opened, closed and bytes, on the
    // caller's agent and on the destination's, each exactly.
    let outbound = "side=\"outbound\",source_workload=\"default/node1-pod1\",\
                    destination_service=\"default/tcp\",destination_workload=\"default/node2-pod1\",mtls=\"true\"";
    let inbound = "side=\"inbound\",source_workload=\"default/node1-pod1\",\
                   destination_service=\"\",destination_workload=\"default/node2-pod1\",mtls=\"true\"";
    let tcp = |node: &str, labels: &str| {
        [
            "connections_opened",
            "connections_closed",
            "sent_bytes",
            "received_bytes",
        ]
        .map(|m| {
            agent_metric(
                &cluster,
                node,
                &format!("mesh_agent_tcp_{m}_total{{{labels}}}"),
            )
        })
    };
    let before = [tcp("node1", outbound), tcp("node2", inbound)];
    // The destination's tap shows them too, as inbound connections of the
    // caller's identity.
    wait_for_tappers(&cluster, "node2", 0);
    let inbound_tap = tap_in_pty(
        &cluster,
        "node2",
        &[
            "-o",
            "json",
            "--count",
            "3",
            "--identity",
            "spiffe://cluster.local/ns/default/sa/node1-pod1",
        ],
    );
    wait_for_tappers(&cluster, "node2", 1);
    for _ in 0..3 {
        ping_tcp(&cluster);
    }
    let reply_len = "node2-pod1\nping".len() as u64;
    for (i, (node, labels)) in [("node1", outbound), ("node2", inbound)]
        .into_iter()
        .enumerate()
    {
        let closed = format!("mesh_agent_tcp_connections_closed_total{{{labels}}}");
        if wait_for_metric(&cluster, node, &closed, before[i][1] + 3).is_none() {
            panic!("{closed} in\n{}", lines(node, "mesh_agent_tcp"));
        }
        let after = tcp(node, labels);
        let moved: Vec<u64> = after.iter().zip(&before[i]).map(|(a, b)| a - b).collect();
        assert_eq!(
            moved,
            vec![3, 3, 3 * 4, 3 * reply_len],
            "{node}: opened, closed, sent, received"
        );
    }
    let out = finish(inbound_tap);
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(events.len(), 3, "{out}");
    for e in &events {
        assert_eq!(e["type"], "connection", "{e}");
        assert_eq!(e["direction"], "inbound", "{e}");
        assert_eq!(e["source_workload"], "default/node1-pod1", "{e}");
        assert_eq!(e["destination_workload"], "default/node2-pod1", "{e}");
        assert_eq!(e["bytes_sent"], 4, "{e}");
        assert_eq!(e["bytes_received"], reply_len, "{e}");
        assert_eq!(e["state"], "closed", "{e}");
    }
}
