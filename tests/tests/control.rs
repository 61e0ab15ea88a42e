//! The control server end to end: the real `mesh-control` binary on
//! loopback (TLS, with the CA it generated) and a unix socket, real gRPC
//! clients, a temporary store.
use std::{collections::HashMap, path::Path, process::Command, time::Duration};

use mesh_api::{
    client::{self, Bearer},
    pb::{
        AgentsRequest, ApplyRequest, DeltaRequest, DeltaResponse, GetRequest, Status as NackStatus,
        distribution_client::DistributionClient, resource::Body,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

mod support;

use support::control::{Server, TempDir, bin};

const WAIT: Duration = Duration::from_secs(10);

/// The server of these tests: also an admin token for the network listener.
fn start(dir: &Path) -> Server {
    std::fs::write(dir.join("admin-token"), "admin-secret\n").expect("admin token");
    let token = dir.join("admin-token");
    Server::start(
        dir,
        &["--admin-token-file", token.to_str().expect("utf-8 path")],
    )
}

impl Server {
    /// `meshctl` against this server's local socket: exit code, stdout,
    /// stderr.
    fn meshctl(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(bin("meshctl"))
            .args(["--control", &format!("unix://{}", self.socket.display())])
            .args(args)
            .output()
            .expect("meshctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Applies each bad document after `good` in one batch: every batch is
    /// refused whole, meshctl naming `{prefix}{expected}`, and `kinds` stay
    /// empty.
    fn assert_refused_whole<B: AsRef<str>>(
        &self,
        file: &Path,
        good: &str,
        cases: &[(&str, B, &str)],
        prefix: &str,
        kinds: &[&str],
    ) {
        let file_arg = file.to_str().expect("utf-8 path");
        for (what, bad, expected) in cases {
            std::fs::write(file, format!("{good}---\n{}", bad.as_ref())).expect("write");
            let (code, out, err) = self.meshctl(&["apply", "-f", file_arg]);
            assert_eq!(code, Some(1), "{what}: applied: {out}");
            assert_eq!(out, "", "{what}");
            assert!(
                err.starts_with(&format!("meshctl: {prefix}{expected}")),
                "{what}: {err}"
            );
            for kind in kinds {
                let (code, out, err) = self.meshctl(&["get", kind, "-A"]);
                assert_eq!(code, Some(0), "{what}: {err}");
                assert_eq!(
                    (out.as_str(), err.as_str()),
                    ("", "No resources found.\n"),
                    "{what}: something of the batch was stored"
                );
            }
        }
    }

    /// Waits until a sample of `/metrics` reads `value`.
    async fn wait_for_metric(&self, sample: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.metric(sample);
            if now == Some(value) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{sample} is {now:?}, not {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every stored document of both kinds, as JSON text.
    async fn everything(&self) -> Vec<String> {
        let mut op = self.operator().await;
        let mut all = Vec::new();
        for kind in ["Workload", "Service"] {
            all.extend(
                op.get(GetRequest {
                    kind: kind.into(),
                    ..GetRequest::default()
                })
                .await
                .expect("get")
                .into_inner()
                .documents_json,
            );
        }
        all
    }

    async fn subscribe(
        &self,
        node: &str,
        token: &str,
        have: HashMap<String, String>,
    ) -> Result<Agent, tonic::Status> {
        let channel = client::channel_with_tls(&self.target(), Some(&self.tls(None)))
            .await
            .expect("connect");
        let mut client =
            DistributionClient::with_interceptor(channel, Bearer::new(Some(token)).expect("token"));
        let (requests, rx) = mpsc::channel(4);
        requests
            .send(DeltaRequest {
                node: node.into(),
                initial_resource_versions: have,
                ..DeltaRequest::default()
            })
            .await
            .expect("first request");
        let responses = client
            .delta_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Agent {
            requests,
            responses,
        })
    }
}

/// A test agent: one Distribution stream.
struct Agent {
    requests: mpsc::Sender<DeltaRequest>,
    responses: Streaming<DeltaResponse>,
}

impl Agent {
    async fn recv(&mut self) -> DeltaResponse {
        tokio::time::timeout(WAIT, self.responses.message())
            .await
            .expect("a response in time")
            .expect("stream healthy")
            .expect("stream open")
    }

    async fn recv_and_ack(&mut self) -> DeltaResponse {
        let r = self.recv().await;
        self.ack(&r).await;
        r
    }

    async fn ack(&self, r: &DeltaResponse) {
        self.requests
            .send(DeltaRequest {
                response_nonce: r.nonce.clone(),
                ..DeltaRequest::default()
            })
            .await
            .expect("ack");
    }

    async fn nack(&self, r: &DeltaResponse, message: &str, resources: &[&str]) {
        self.requests
            .send(DeltaRequest {
                response_nonce: r.nonce.clone(),
                error_detail: Some(NackStatus {
                    message: message.into(),
                    resources: resources.iter().map(|k| (*k).to_owned()).collect(),
                }),
                ..DeltaRequest::default()
            })
            .await
            .expect("nack");
    }

    async fn expect_silence(&mut self) {
        if let Ok(r) =
            tokio::time::timeout(Duration::from_millis(500), self.responses.message()).await
        {
            panic!("expected no response, got {r:?}");
        }
    }
}

/// Keys of a response, sorted, without the trust bundle (every first
/// response carries it).
fn keys(r: &DeltaResponse) -> Vec<&str> {
    let mut keys: Vec<&str> = r
        .resources
        .iter()
        .map(|r| r.key.as_str())
        .filter(|k| *k != "TrustBundle//mesh")
        .collect();
    keys.sort_unstable();
    keys
}

fn versions(r: &DeltaResponse) -> HashMap<String, String> {
    r.resources
        .iter()
        .map(|r| (r.key.clone(), r.version.clone()))
        .collect()
}

fn endpoints(r: &DeltaResponse, key: &str) -> Vec<String> {
    let resource = r
        .resources
        .iter()
        .find(|r| r.key == key)
        .unwrap_or_else(|| panic!("{key} not in {:?}", keys(r)));
    let Some(Body::Service(s)) = &resource.body else {
        panic!("{key} is not a service")
    };
    s.endpoints.iter().map(|e| e.workload.clone()).collect()
}

fn workload(name: &str, node: &str, ip: &str, app: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec: {{node: {node}, ip: {ip}, ports: [{{port: 8080}}]}}\n"
    )
}

fn service(name: &str, vip: &str, app: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{vips: [{vip}], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: {app}}}}}\n"
    )
}

fn base() -> String {
    [
        workload("echo-1", "n1", "198.18.1.10", "echo"),
        workload("echo-2", "n2", "198.18.2.10", "echo"),
        service("echo", "198.19.0.10", "echo"),
        service("other", "198.19.0.11", "other"),
    ]
    .join("---\n")
}

#[tokio::test]
async fn agents_get_every_workload_and_service_and_the_trust_bundle_then_only_changes() {
    let dir = TempDir::new("changes");
    let server = start(&dir.0);
    server.apply(&base()).await.expect("apply");

    let mut n1 = server
        .subscribe("n1", "token-1", HashMap::new())
        .await
        .expect("subscribe");
    let first = n1.recv_and_ack().await;
    assert_eq!(
        keys(&first),
        [
            "Service/default/echo",
            "Service/default/other",
            "Workload/default/echo-1",
            "Workload/default/echo-2",
        ]
    );
    let bundle = first
        .resources
        .iter()
        .find(|r| r.key == "TrustBundle//mesh")
        .expect("the trust bundle is distributed");
    let Some(Body::TrustBundle(bundle)) = &bundle.body else {
        panic!("not a trust bundle: {bundle:?}")
    };
    assert_eq!(
        bundle.pem,
        std::fs::read_to_string(&server.ca).expect("ca.crt"),
        "the bundle is the CA's root"
    );
    assert_eq!(
        endpoints(&first, "Service/default/echo"),
        ["echo-1", "echo-2"]
    );
    assert_eq!(first.system_version_info, "1");

    // A new endpoint on another node: exactly one response, with the Service
    // and the Workload (the tunnel needs every workload's identity).
    server
        .apply(&workload("echo-3", "n2", "198.18.2.11", "echo"))
        .await
        .expect("apply");
    let change = n1.recv().await;
    // The generated root's expiry, for alerts: ten years from now.
    let ca_expiry = server
        .metric("mesh_control_ca_expiry_timestamp_seconds")
        .expect("the CA's expiry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let year = 365.0 * 86400.0;
    assert!(
        ca_expiry > now + 9.0 * year && ca_expiry < now + 11.0 * year,
        "{ca_expiry}"
    );
    assert_eq!(
        server.metric("mesh_control_push_latency_seconds_count"),
        Some(0.0),
        "the first sync brings what was committed before the agent came: not a push"
    );
    n1.ack(&change).await;
    server
        .wait_for_metric("mesh_control_push_latency_seconds_count", 1.0)
        .await;
    // The agent acknowledged the bundle with its first sync; the gauge
    // follows without anyone asking for `ca status`.
    server
        .wait_for_metric("mesh_control_ca_agents_on_bundle", 1.0)
        .await;
    let pushed = server
        .metric("mesh_control_push_latency_seconds_sum")
        .expect("_sum");
    assert!(pushed > 0.0 && pushed < WAIT.as_secs_f64(), "{pushed}");
    assert_eq!(
        keys(&change),
        ["Service/default/echo", "Workload/default/echo-3"]
    );
    assert_eq!(
        endpoints(&change, "Service/default/echo"),
        ["echo-1", "echo-2", "echo-3"]
    );
    assert_ne!(
        versions(&change)["Service/default/echo"],
        versions(&first)["Service/default/echo"]
    );
    assert_eq!(change.system_version_info, "2");
    assert_ne!(change.nonce, first.nonce);
    n1.expect_silence().await;

    // A delete is an explicit removal.
    let mut op = server.operator().await;
    op.delete(mesh_api::pb::DeleteRequest {
        kind: "svc".into(),
        namespace: String::new(),
        name: "other".into(),
    })
    .await
    .expect("delete");
    let removal = n1.recv_and_ack().await;
    assert_eq!(removal.removed_resources, ["Service/default/other"]);
    assert!(removal.resources.is_empty());
    server
        .wait_for_metric("mesh_control_push_latency_seconds_count", 2.0)
        .await;

    let agents = op
        .agents(AgentsRequest {})
        .await
        .expect("agents")
        .into_inner()
        .agents;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut agents = agents;
    while agents[0].acked_version != "3" && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        agents = op
            .agents(AgentsRequest {})
            .await
            .expect("agents")
            .into_inner()
            .agents;
    }
    assert_eq!(agents.len(), 2, "every node with a token is listed");
    assert_eq!(agents[1].node, "n2");
    assert!(!agents[1].connected);
    assert_eq!(agents[1].acked_version, "");
    assert_eq!(agents[0].node, "n1");
    assert!(agents[0].connected);
    assert_eq!(agents[0].acked_version, "3");
    assert!(agents[0].last_ack_unix_ms > 0);
    assert_eq!(agents[0].last_error, None);
}

#[tokio::test]
async fn a_resubscribing_agent_gets_only_what_changed() {
    let dir = TempDir::new("resubscribe");
    let server = start(&dir.0);
    server.apply(&base()).await.expect("apply");
    let mut n2 = server
        .subscribe("n2", "token-2", HashMap::new())
        .await
        .expect("subscribe");
    let have = versions(&n2.recv_and_ack().await);
    drop(n2);

    let mut again = server
        .subscribe("n2", "token-2", have.clone())
        .await
        .expect("resubscribe");
    let first = again.recv_and_ack().await;
    assert!(first.resources.is_empty(), "{:?}", keys(&first));
    assert!(first.removed_resources.is_empty());
    drop(again);

    server
        .apply(&service("other", "198.19.0.11", "echo"))
        .await
        .expect("apply");
    let mut later = server
        .subscribe("n2", "token-2", have)
        .await
        .expect("resubscribe");
    let first = later.recv_and_ack().await;
    assert_eq!(keys(&first), ["Service/default/other"]);
}

#[tokio::test]
async fn a_response_rejected_whole_is_resent_with_the_next_change() {
    let dir = TempDir::new("nack-whole");
    let server = start(&dir.0);
    server.apply(&base()).await.expect("apply");
    let mut n1 = server
        .subscribe("n1", "token-1", HashMap::new())
        .await
        .expect("subscribe");
    n1.recv_and_ack().await;

    server
        .apply(&service("first", "198.19.0.21", "echo"))
        .await
        .expect("apply");
    let change = n1.recv().await;
    assert_eq!(keys(&change), ["Service/default/first"]);
    n1.nack(&change, "kernel map full", &[]).await;
    n1.expect_silence().await;

    server
        .apply(&service("second", "198.19.0.22", "echo"))
        .await
        .expect("apply");
    let next = n1.recv().await;
    let mut got = keys(&next);
    got.sort();
    assert_eq!(
        got,
        ["Service/default/first", "Service/default/second"],
        "the agent still lacks what it rejected, so it comes again"
    );
}

#[tokio::test]
async fn a_rejection_is_recorded_with_its_reason_and_not_resent() {
    let dir = TempDir::new("nack");
    let server = start(&dir.0);
    server.apply(&base()).await.expect("apply");
    let mut n1 = server
        .subscribe("n1", "token-1", HashMap::new())
        .await
        .expect("subscribe");
    n1.recv_and_ack().await;

    server
        .apply(&service("echo", "198.19.0.20", "echo"))
        .await
        .expect("apply");
    let change = n1.recv().await;
    n1.nack(
        &change,
        "VIP 198.19.0.20 collides with a host route",
        &["Service/default/echo"],
    )
    .await;
    n1.expect_silence().await;

    let mut op = server.operator().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let sync = loop {
        let agents = op
            .agents(AgentsRequest {})
            .await
            .expect("agents")
            .into_inner()
            .agents;
        if agents[0].last_error.is_some() || tokio::time::Instant::now() > deadline {
            break agents[0].clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let error = sync.last_error.expect("rejection recorded");
    assert_eq!(error.message, "VIP 198.19.0.20 collides with a host route");
    assert_eq!(error.resources, ["Service/default/echo"]);
    assert_eq!(
        sync.acked_version, "2",
        "a rejection naming resources leaves the rest of the response in effect"
    );
    assert_eq!(
        server
            .metric("mesh_control_nacks_total")
            .expect("mesh_control_nacks_total"),
        1.0
    );

    let out = Command::new(bin("meshctl"))
        .args([
            "--control",
            &format!("unix://{}", server.socket.display()),
            "agents",
        ])
        .output()
        .expect("meshctl agents");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.contains("VIP 198.19.0.20 collides with a host route [Service/default/echo]"),
        "{table}"
    );

    // Fixed by a newer version that the agent accepts: the rejection clears.
    server
        .apply(&service("echo", "198.19.0.21", "echo"))
        .await
        .expect("apply");
    let fixed = n1.recv_and_ack().await;
    assert_eq!(keys(&fixed), ["Service/default/echo"]);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let agents = op
            .agents(AgentsRequest {})
            .await
            .expect("agents")
            .into_inner()
            .agents;
        if agents[0].last_error.is_none() {
            assert_eq!(agents[0].acked_version, "3");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rejection never cleared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn streams_without_the_nodes_token_are_refused() {
    let dir = TempDir::new("auth");
    let server = start(&dir.0);
    for (node, token) in [("n1", "token-2"), ("n1", "nonsense"), ("n3", "token-1")] {
        let refused = server
            .subscribe(node, token, HashMap::new())
            .await
            .err()
            .unwrap_or_else(|| panic!("{node} with {token} was let in"));
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    }
    assert_eq!(
        server
            .metric("mesh_control_unauthenticated_streams_total")
            .expect("mesh_control_unauthenticated_streams_total"),
        3.0
    );
    assert_eq!(
        server
            .metric("mesh_control_connected_agents")
            .expect("mesh_control_connected_agents"),
        0.0
    );

    // The operator API on the network wants the admin token.
    let (target, tls) = (server.target(), server.tls(None));
    let mut anonymous = client::operator_with_tls(&target, None, Some(&tls))
        .await
        .expect("connect");
    let e = anonymous
        .agents(AgentsRequest {})
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut admin = client::operator_with_tls(&target, Some("admin-secret"), Some(&tls))
        .await
        .expect("connect");
    admin.agents(AgentsRequest {}).await.expect("admin allowed");
}

#[tokio::test]
async fn bad_input_is_refused_by_field_and_value_and_changes_nothing() {
    let dir = TempDir::new("bad-input");
    let server = start(&dir.0);
    server.apply(&base()).await.expect("apply");
    let before = server.everything().await;

    let valid = workload("fine", "n1", "198.18.1.99", "echo");
    let cases = [
        ("kind: [Service\n".to_owned(), "document 2: malformed YAML"),
        (
            service("x", "198.19.0.99", "x").replace("kind: Service", "kind: Gateway"),
            "document 2: kind: unknown kind \"Gateway\"",
        ),
        (
            workload("w", "n1", "198.18.1.98", "x").replace("node: n1, ", ""),
            "document 2 (Workload/default/w): spec.node: required field is missing",
        ),
        (
            service("dup", "198.19.0.10", "x"),
            "Service/default/dup: spec.vips[0]: 198.19.0.10 is already owned by Service/default/echo",
        ),
        (
            service("big", "198.19.0.98", "x").replace("port: 80,", "port: 70000,"),
            "document 2 (Service/default/big): spec.ports[0].port: port 70000 is out of range (1-65535)",
        ),
    ];
    for (bad, expected) in cases {
        // A valid document first: the batch is all or nothing.
        let e = server
            .apply(&format!("{valid}---\n{bad}"))
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(expected),
            "{:?} lacks {expected:?}",
            e.message()
        );
        assert_eq!(server.everything().await, before, "after {expected}");
    }
    let rejected = |reason: &str| {
        server.metric(&format!(
            "mesh_control_apply_rejected_total{{reason=\"{reason}\"}}"
        ))
    };
    for (reason, count) in [
        ("parse", Some(1.0)),
        ("unknown_kind", Some(1.0)),
        ("invalid", Some(2.0)),
        ("conflict", Some(1.0)),
        ("store", None),
    ] {
        assert_eq!(rejected(reason), count, "{reason}");
    }

    // meshctl says the same, names the file, and exits 1.
    std::fs::write(dir.0.join("a.yaml"), &valid).expect("write");
    std::fs::write(
        dir.0.join("b.yaml"),
        service("big", "198.19.0.98", "x").replace("port: 80,", "port: 70000,"),
    )
    .expect("write");
    let out = Command::new(bin("meshctl"))
        .args(["--control", &format!("unix://{}", server.socket.display())])
        .arg("apply")
        .arg("-f")
        .arg(&dir.0)
        .output()
        .expect("meshctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("spec.ports[0].port: port 70000 is out of range (1-65535)"),
        "{stderr}"
    );
    assert!(stderr.contains("b.yaml, document 1"), "{stderr}");
    assert_eq!(server.everything().await, before);
    assert_eq!(rejected("invalid"), Some(3.0));
}

#[tokio::test]
async fn a_restart_loses_nothing_and_agents_resync_without_a_full_reload() {
    let dir = TempDir::new("restart");
    let server = start(&dir.0);
    server.apply(&base()).await.expect("apply");
    server
        .apply(&workload("echo-3", "n1", "198.18.1.11", "echo"))
        .await
        .expect("apply");
    let before = server.everything().await;
    let mut n1 = server
        .subscribe("n1", "token-1", HashMap::new())
        .await
        .expect("subscribe");
    let have = versions(&n1.recv_and_ack().await);

    let stopping = tokio::task::spawn_blocking(move || server.stop());
    let ended = tokio::time::timeout(WAIT, n1.responses.message())
        .await
        .expect("stream ends on shutdown");
    assert!(
        matches!(&ended, Err(s) if s.code() == Code::Unavailable) || matches!(ended, Ok(None)),
        "{ended:?}"
    );
    stopping.await.expect("clean exit");

    let server = start(&dir.0);
    assert_eq!(server.everything().await, before);
    let unchanged = server
        .operator()
        .await
        .apply(ApplyRequest {
            yaml: base(),
            dry_run: false,
        })
        .await
        .expect("apply")
        .into_inner();
    assert_eq!(unchanged.revision, 2, "revision preserved");
    assert!(unchanged.results.iter().all(|r| r.ends_with(" unchanged")));

    let mut again = server
        .subscribe("n1", "token-1", have)
        .await
        .expect("resubscribe");
    let first = again.recv_and_ack().await;
    assert!(first.resources.is_empty(), "resent {:?}", keys(&first));
    assert_eq!(first.system_version_info, "2");
}

#[tokio::test]
async fn meshctl_applies_a_directory_gets_and_deletes() {
    let dir = TempDir::new("meshctl");
    let server = start(&dir.0);
    let manifests = dir.0.join("manifests");
    std::fs::create_dir_all(&manifests).expect("dir");
    std::fs::write(
        manifests.join("1-workloads.yaml"),
        [
            workload("echo-1", "n1", "198.18.1.10", "echo"),
            workload("echo-2", "n2", "198.18.2.10", "echo"),
        ]
        .join("---\n"),
    )
    .expect("write");
    std::fs::write(
        manifests.join("2-service.yml"),
        service("echo", "198.19.0.10", "echo"),
    )
    .expect("write");
    std::fs::write(manifests.join("notes.txt"), "not yaml: [").expect("write");
    let meshctl = |args: &[&str]| server.meshctl(args);
    let dir_arg = manifests.to_str().expect("utf-8 path");

    let (code, out, err) = meshctl(&["apply", "-f", dir_arg, "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("Service/default/echo created (dry run)"),
        "{out}"
    );
    assert!(server.everything().await.is_empty());

    let (code, out, err) = meshctl(&["apply", "-f", dir_arg]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "Workload/default/echo-1 created\nWorkload/default/echo-2 created\nService/default/echo created\n"
    );

    let (code, out, _) = meshctl(&["get", "svc"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("echo   198.19.0.10   80:8080/auto   app=echo"),
        "{out}"
    );

    // What get -o yaml prints applies again, unchanged.
    let (code, yaml, _) = meshctl(&["get", "workloads", "-A", "-o", "yaml"]);
    assert_eq!(code, Some(0));
    let exported = dir.0.join("exported.yaml");
    std::fs::write(&exported, &yaml).expect("write");
    let (code, out, err) = meshctl(&["apply", "-f", exported.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "Workload/default/echo-1 unchanged\nWorkload/default/echo-2 unchanged\n"
    );

    let (code, out, _) = meshctl(&["get", "wl", "echo-1", "-o", "json"]);
    assert_eq!(code, Some(0));
    let doc: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(doc["spec"]["node"], "n1");

    let (code, out, _) = meshctl(&["delete", "service", "echo"]);
    assert_eq!(code, Some(0));
    assert_eq!(out, "Service/default/echo deleted\n");
    let (code, _, err) = meshctl(&["delete", "service", "echo"]);
    assert_eq!(code, Some(1));
    assert_eq!(err, "meshctl: Service/default/echo not found\n");
    let (code, _, err) = meshctl(&["get", "gateway"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown kind \"gateway\""), "{err}");
}

#[tokio::test]
async fn nodes_are_cluster_scoped_and_reach_every_agent() {
    let dir = TempDir::new("nodes");
    let server = start(&dir.0);
    let node = |name: &str, address: &str| {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{address: {address}}}\n"
        )
    };
    server
        .apply(&[node("n1", "198.18.0.11"), node("n2", "198.18.0.12")].join("---\n"))
        .await
        .expect("apply nodes");
    let mut n2 = server
        .subscribe("n2", "token-2", HashMap::new())
        .await
        .expect("subscribe");
    let first = n2.recv_and_ack().await;
    assert_eq!(keys(&first), ["Node//n1", "Node//n2"]);
    let n1 = first
        .resources
        .iter()
        .find(|r| r.key == "Node//n1")
        .expect("n1");
    assert_eq!(
        n1.body,
        Some(Body::Node(mesh_api::pb::Node {
            name: "n1".into(),
            tunnel_address: "198.18.0.11:15008".into(),
        }))
    );

    // A bad address is refused naming the field and the value.
    let e = server
        .apply(&node("n3", "198.18.0.300"))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "document 1 (Node//n3): spec.address: \"198.18.0.300\" is not an IPv4 address"
    );
    // Two nodes can't have one address.
    let e = server
        .apply(&node("n3", "198.18.0.11"))
        .await
        .expect_err("refused");
    assert!(
        e.message()
            .contains("spec.address: 198.18.0.11 is already owned by Node//n1"),
        "{e:?}"
    );

    let meshctl = |args: &[&str]| {
        let (code, out, err) = server.meshctl(args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        out
    };
    let table = meshctl(&["get", "nodes"]);
    assert!(table.contains("n2     198.18.0.12   15008"), "{table}");
    let yaml = meshctl(&["get", "node", "n1", "-o", "yaml"]);
    assert!(!yaml.contains("namespace"), "{yaml}");
    meshctl(&["delete", "node", "n1"]);
    let removal = n2.recv_and_ack().await;
    assert_eq!(removal.removed_resources, ["Node//n1"]);
}

#[tokio::test]
async fn mtls_modes_reach_agents_as_each_workloads_effective_mode() {
    let dir = TempDir::new("mtls-modes");
    let server = start(&dir.0);
    let in_shop = |w: String| w.replace("metadata: {", "metadata: {namespace: shop, ");
    let policy = |name: &str, mode: &str| {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: MtlsPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{mode: {mode}}}\n"
        )
    };
    server
        .apply(
            &[
                workload("echo-1", "n1", "198.18.1.10", "echo"),
                in_shop(workload("cart", "n1", "198.18.1.20", "cart")),
                in_shop(workload("legacy", "n2", "198.18.2.20", "legacy"))
                    .replace("node: n2,", "node: n2, mtlsMode: disable,"),
            ]
            .join("---\n"),
        )
        .await
        .expect("apply");
    let mut n1 = server
        .subscribe("n1", "token-1", HashMap::new())
        .await
        .expect("subscribe");
    let modes = |r: &DeltaResponse| -> Vec<(String, String)> {
        let mut modes: Vec<(String, String)> = r
            .resources
            .iter()
            .filter_map(|r| match &r.body {
                Some(Body::Workload(w)) => Some((r.key.clone(), w.mtls_mode.clone())),
                _ => None,
            })
            .collect();
        modes.sort_unstable();
        modes
    };
    let pair = |k: &str, m: &str| (k.to_owned(), m.to_owned());
    let first = n1.recv_and_ack().await;
    assert_eq!(
        modes(&first),
        [
            pair("Workload/default/echo-1", "STRICT"),
            pair("Workload/shop/cart", "STRICT"),
            pair("Workload/shop/legacy", "DISABLE"),
        ]
    );

    // A namespace policy re-sends just the workloads it changes.
    server
        .apply(&policy("default", "Permissive"))
        .await
        .expect("apply policy");
    let change = n1.recv_and_ack().await;
    assert_eq!(modes(&change), [pair("Workload/shop/cart", "PERMISSIVE")]);
    assert!(change.removed_resources.is_empty());
    n1.expect_silence().await;

    // One policy per namespace; the refusal names both.
    let e = server
        .apply(&policy("second", "STRICT"))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "MtlsPolicy/shop/second: the namespace already has MtlsPolicy/shop/default; at most one MtlsPolicy per namespace"
    );
    let e = server
        .apply(&policy("default", "optional"))
        .await
        .expect_err("refused");
    assert_eq!(
        e.message(),
        "document 1 (MtlsPolicy/shop/default): spec.mode: \"optional\" is not an mTLS mode (\"STRICT\", \"PERMISSIVE\" or \"DISABLE\")"
    );

    let meshctl = |args: &[&str]| {
        let (code, out, err) = server.meshctl(args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        out
    };
    let table = meshctl(&["get", "mtlspolicies", "-n", "shop"]);
    assert!(table.contains("default   PERMISSIVE"), "{table}");
    let yaml = meshctl(&["get", "mtlspolicy", "default", "-n", "shop", "-o", "yaml"]);
    assert!(yaml.contains("mode: PERMISSIVE"), "{yaml}");
    let yaml = meshctl(&["get", "wl", "legacy", "-n", "shop", "-o", "yaml"]);
    assert!(yaml.contains("mtlsMode: DISABLE"), "{yaml}");

    // Deleting it reverts to the mesh's default.
    meshctl(&["delete", "mtlspolicy", "default", "-n", "shop"]);
    let change = n1.recv_and_ack().await;
    assert_eq!(modes(&change), [pair("Workload/shop/cart", "STRICT")]);
    assert_eq!(
        versions(&change)["Workload/shop/cart"],
        versions(&first)["Workload/shop/cart"],
        "the same content has the same version"
    );
}

#[tokio::test]
async fn routes_are_checked_stored_and_reach_every_agent() {
    let dir = TempDir::new("routes");
    let server = start(&dir.0);
    server.apply(&base()).await.expect("apply");
    let route = |weight: u32| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web}}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo, port: 80}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]
    backendRefs: [{{name: other, port: 80, weight: {weight}}}, {{name: echo, port: 80}}]
"
        )
    };
    let mut agents = Vec::new();
    for (node, token) in [("n1", "token-1"), ("n2", "token-2")] {
        let mut agent = server
            .subscribe(node, token, HashMap::new())
            .await
            .expect("subscribe");
        agent.recv_and_ack().await;
        agents.push(agent);
    }
    let meshctl = |args: &[&str]| server.meshctl(args);
    let file = dir.0.join("route.yaml");
    let file_arg = file.to_str().expect("utf-8 path");
    let apply_file = |yaml: &str| {
        std::fs::write(&file, yaml).expect("write");
        meshctl(&["apply", "-f", file_arg])
    };

    let (code, out, err) = apply_file(&route(90));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "HTTPRoute/default/web created\n");
    let route_of = |r: &DeltaResponse| {
        let resource = r
            .resources
            .iter()
            .find(|r| r.key == "HTTPRoute/default/web")
            .unwrap_or_else(|| panic!("no route in {:?}", keys(r)));
        let Some(Body::Route(route)) = &resource.body else {
            panic!("not a route: {resource:?}")
        };
        (resource.version.clone(), route.clone())
    };
    let mut first = Vec::new();
    for agent in &mut agents {
        let change = agent.recv_and_ack().await;
        assert_eq!(keys(&change), ["HTTPRoute/default/web"]);
        let (version, route) = route_of(&change);
        assert_eq!(
            (
                route.kind.as_str(),
                route.namespace.as_str(),
                route.name.as_str()
            ),
            ("HTTPRoute", "default", "web")
        );
        assert_eq!(route.created_revision, 2);
        let spec: serde_json::Value = serde_json::from_str(&route.spec_json).expect("JSON");
        assert_eq!(spec["rules"][0]["backendRefs"][0]["weight"], 90);
        first.push(version);
    }

    // Refusals name the document, the field and the value; nothing changes.
    let bad_regex = route(90).replace(
        "type: PathPrefix, value: /v2",
        "type: RegularExpression, value: '(['",
    );
    let (code, _, err) = apply_file(&format!(
        "{}---\n{bad_regex}",
        service("third", "198.19.0.12", "third")
    ));
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("meshctl: document 2 (HTTPRoute/default/web): spec.rules[0].matches[0].path.value: \"([\" is not a valid regular expression"),
        "{err}"
    );
    let (_, _, err) = apply_file(&route(90).replace("- matches:", "- matchez:"));
    assert!(
        err.starts_with("meshctl: document 1 (HTTPRoute/default/web): spec.rules[0].matchez: unknown field `matchez`"),
        "{err}"
    );
    let (_, _, err) =
        apply_file(&route(90).replace("name: echo, port: 80}]\n", "name: echo, port: 81}]\n"));
    assert_eq!(
        err,
        "meshctl: HTTPRoute/default/web: spec.parentRefs[0].port: Service default/echo has no port 81 (it has 80)\n"
    );
    let (_, _, err) =
        apply_file(&route(90).replace("{name: other, port: 80", "{name: gone, port: 80"));
    assert_eq!(
        err,
        "meshctl: HTTPRoute/default/web: spec.rules[0].backendRefs[0]: Service default/gone does not exist\n"
    );
    for agent in &mut agents {
        agent.expect_silence().await;
    }

    let (code, out, _) = meshctl(&["get", "httproutes"]);
    assert_eq!(code, Some(0));
    assert_eq!(out, "NAME   PARENTS   RULES\nweb    echo:80   1\n");
    // What get -o yaml prints applies again, unchanged.
    let (code, yaml, _) = meshctl(&["get", "httproute", "web", "-o", "yaml"]);
    assert_eq!(code, Some(0));
    assert!(
        yaml.starts_with("apiVersion: gateway.networking.k8s.io/v1\n"),
        "{yaml}"
    );
    let (code, out, err) = apply_file(&yaml);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "HTTPRoute/default/web unchanged\n");

    // An update keeps the creation revision; a delete is a removal.
    let (code, out, _) = apply_file(&route(50));
    assert_eq!(code, Some(0));
    assert_eq!(out, "HTTPRoute/default/web configured\n");
    for (agent, before) in agents.iter_mut().zip(&first) {
        let change = agent.recv_and_ack().await;
        let (version, route) = route_of(&change);
        assert_ne!(&version, before);
        assert_eq!(route.created_revision, 2);
        assert!(
            route.spec_json.contains(r#""weight":50"#),
            "{}",
            route.spec_json
        );
    }
    let (code, out, _) = meshctl(&["delete", "httproute", "web"]);
    assert_eq!(code, Some(0));
    assert_eq!(out, "HTTPRoute/default/web deleted\n");
    for agent in &mut agents {
        let removal = agent.recv_and_ack().await;
        assert_eq!(removal.removed_resources, ["HTTPRoute/default/web"]);
    }
    let (code, out, err) = meshctl(&["get", "grpcroutes"]);
    assert_eq!((code, out.as_str()), (Some(0), ""));
    assert_eq!(err, "No resources found in default namespace.\n");
}

#[tokio::test]
async fn bad_routes_are_refused_at_apply_with_the_field_named_and_nothing_applied() {
    let dir = TempDir::new("bad-routes");
    let server = start(&dir.0);
    let echo = "apiVersion: mesh.dev/v1alpha1
kind: Service
metadata: {name: echo}
spec:
  vips: [198.19.0.10]
  ports: [{name: http, port: 80, targetPort: 8080}, {name: alt, port: 8080}]
  selector: {app: echo}
";
    server
        .apply(&[workload("echo-1", "n1", "198.18.1.10", "echo"), echo.into()].join("---\n"))
        .await
        .expect("apply the Service");
    let http_route = |name: &str, parent_port: u16, rule: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}}}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo, port: {parent_port}}}]
  rules: [{rule}]
"
        )
    };
    let good = http_route(
        "web",
        80,
        "{matches: [{path: {type: PathPrefix, value: /}}], backendRefs: [{name: echo, port: 8080}]}",
    );
    let meshctl = |args: &[&str]| server.meshctl(args);
    let file = dir.0.join("routes.yaml");
    let file_arg = file.to_str().expect("utf-8 path");

    // Each bad route comes after a valid one in its batch: the batch is
    // refused whole. Checks of a spec on its own name the document by its
    // place in the file; checks against other resources name the route.
    let grpc_rewrite = "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: bad}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 8080}]
  rules:
  - filters: [{type: URLRewrite, urlRewrite: {hostname: elsewhere}}]
    backendRefs: [{name: echo, port: 8080}]
"
    .to_owned();
    let cases = [
        (
            "a backend Service that does not exist",
            http_route("bad", 80, "{backendRefs: [{name: gone, port: 80}]}"),
            "HTTPRoute/default/bad: spec.rules[0].backendRefs[0]: Service default/gone does not exist",
        ),
        (
            "a parent port the Service does not have",
            http_route("bad", 81, "{backendRefs: [{name: echo, port: 8080}]}"),
            "HTTPRoute/default/bad: spec.parentRefs[0].port: Service default/echo has no port 81 (it has 80, 8080)",
        ),
        (
            "a path regex that does not compile",
            http_route(
                "bad",
                80,
                "{matches: [{path: {type: RegularExpression, value: '(['}}], backendRefs: [{name: echo, port: 8080}]}",
            ),
            "document 2 (HTTPRoute/default/bad): spec.rules[0].matches[0].path.value: \"([\" is not a valid regular expression",
        ),
        (
            "every backend of weight 0",
            http_route(
                "bad",
                80,
                "{backendRefs: [{name: echo, port: 80, weight: 0}, {name: echo, port: 8080, weight: 0}]}",
            ),
            "document 2 (HTTPRoute/default/bad): spec.rules[0].backendRefs: every backend has weight 0",
        ),
        (
            "a backendRequest timeout above the request timeout",
            http_route(
                "bad",
                80,
                "{backendRefs: [{name: echo, port: 8080}], timeouts: {request: 1s, backendRequest: 5s}}",
            ),
            "document 2 (HTTPRoute/default/bad): spec.rules[0].timeouts.backendRequest: 5s is longer than the request timeout 1s",
        ),
        (
            "RequestRedirect with URLRewrite in one rule",
            http_route(
                "bad",
                80,
                "{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}, {type: URLRewrite, urlRewrite: {hostname: elsewhere}}]}",
            ),
            "document 2 (HTTPRoute/default/bad): spec.rules[0].filters: RequestRedirect and URLRewrite cannot be used together in one rule",
        ),
        (
            "URLRewrite in a GRPCRoute",
            grpc_rewrite,
            "document 2 (GRPCRoute/default/bad): spec.rules[0].filters[0].type: URLRewrite is not allowed here (allowed: RequestHeaderModifier, ResponseHeaderModifier, RequestMirror)",
        ),
        (
            "an unknown field",
            http_route(
                "bad",
                80,
                "{matchez: [{path: {type: PathPrefix, value: /}}], backendRefs: [{name: echo, port: 8080}]}",
            ),
            "document 2 (HTTPRoute/default/bad): spec.rules[0].matchez: unknown field `matchez`",
        ),
    ];
    server.assert_refused_whole(&file, &good, &cases, "", &["httproutes", "grpcroutes"]);

    std::fs::write(&file, &good).expect("write");
    let (code, out, err) = meshctl(&["apply", "-f", file_arg]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "HTTPRoute/default/web created\n");
    let (code, out, err) = meshctl(&["get", "httproutes"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "NAME   PARENTS   RULES\nweb    echo:80   1\n");
}

#[tokio::test]
async fn bad_traffic_policies_are_refused_at_apply_with_the_field_named_and_nothing_applied() {
    let dir = TempDir::new("bad-policies");
    let server = start(&dir.0);
    let echo = "apiVersion: mesh.dev/v1alpha1
kind: Service
metadata: {name: echo}
spec:
  vips: [198.19.0.10]
  ports: [{name: http, port: 80, targetPort: 8080}, {name: alt, port: 8080}]
  selector: {app: echo}
";
    server
        .apply(&[workload("echo-1", "n1", "198.18.1.10", "echo"), echo.into()].join("---\n"))
        .await
        .expect("apply the Service");
    let mut agent = server
        .subscribe("n1", "token-1", HashMap::new())
        .await
        .expect("subscribe");
    agent.recv_and_ack().await;
    let policy = |name: &str, target: &str, rest: &str| {
        format!(
            "apiVersion: mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: {name}}}
spec:
  targetRef: {target}
{rest}"
        )
    };
    let echo_80 = "{kind: Service, name: echo, port: 80}";
    let good = policy(
        "ok",
        echo_80,
        "  loadBalancer: {simple: ROUND_ROBIN}\n  retries: {attempts: 3, budget: {percent: 20}}\n",
    );
    let meshctl = |args: &[&str]| server.meshctl(args);
    let file = dir.0.join("policies.yaml");
    let file_arg = file.to_str().expect("utf-8 path");

    // Each bad policy comes after a valid one in its batch: the batch is
    // refused whole. Checks of a spec on its own name the document by its
    // place in the file; checks against the Services name the policy.
    let cases = [
        (
            "a retry budget of 150 percent",
            policy(
                "bad",
                echo_80,
                "  retries: {attempts: 2, budget: {percent: 150}}\n",
            ),
            "document 2 (TrafficPolicy/default/bad): spec.retries.budget.percent: 150: must be more than 0 and at most 100",
        ),
        (
            "a perTryTimeout of 0s",
            policy(
                "bad",
                echo_80,
                "  retries: {attempts: 2, perTryTimeout: 0s}\n",
            ),
            "document 2 (TrafficPolicy/default/bad): spec.retries.perTryTimeout: \"0s\": must be more than zero",
        ),
        (
            "11 retry attempts",
            policy("bad", echo_80, "  retries: {attempts: 11}\n"),
            "document 2 (TrafficPolicy/default/bad): spec.retries.attempts: 11 is more than the most, 10",
        ),
        (
            "a consistentHash without a key",
            policy(
                "bad",
                echo_80,
                "  loadBalancer: {consistentHash: {virtualNodes: 100}}\n",
            ),
            "document 2 (TrafficPolicy/default/bad): spec.loadBalancer.consistentHash: needs a key: httpHeaderName, httpCookie or useSourceIdentity",
        ),
        (
            "a maxEjectionPercent of 101",
            policy(
                "bad",
                echo_80,
                "  outlierDetection: {maxEjectionPercent: 101}\n",
            ),
            "document 2 (TrafficPolicy/default/bad): spec.outlierDetection.maxEjectionPercent: 101 is more than 100",
        ),
        (
            "a rate limit of 0 requests",
            policy("bad", echo_80, "  rateLimit: {outbound: {requests: 0}}\n"),
            "document 2 (TrafficPolicy/default/bad): spec.rateLimit.outbound.requests: a rate of zero: at least 1",
        ),
        (
            "an unknown field",
            policy("bad", echo_80, "  retries: {attempts: 2, tries: 3}\n"),
            "document 2 (TrafficPolicy/default/bad): spec.retries.tries: unknown field `tries`",
        ),
        (
            "a target Service that does not exist",
            policy("bad", "{name: gone}", "  retries: {attempts: 2}\n"),
            "TrafficPolicy/default/bad: spec.targetRef.name: Service default/gone does not exist",
        ),
        (
            "a target port the Service does not have",
            policy(
                "bad",
                "{name: echo, port: 81}",
                "  retries: {attempts: 2}\n",
            ),
            "TrafficPolicy/default/bad: spec.targetRef.port: Service default/echo has no port 81 (it has 80, 8080)",
        ),
    ];
    server.assert_refused_whole(&file, &good, &cases, "", &["trafficpolicies"]);
    agent.expect_silence().await;

    std::fs::write(&file, &good).expect("write");
    let (code, out, err) = meshctl(&["apply", "-f", file_arg]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "TrafficPolicy/default/ok created\n");
    let change = agent.recv_and_ack().await;
    assert_eq!(keys(&change), ["TrafficPolicy/default/ok"]);
    let Some(Body::Policy(p)) = &change.resources[0].body else {
        panic!("not a policy: {change:?}")
    };
    assert_eq!(
        (
            p.kind.as_str(),
            p.namespace.as_str(),
            p.name.as_str(),
            p.created_revision
        ),
        ("TrafficPolicy", "default", "ok", 2)
    );
    let spec: serde_json::Value = serde_json::from_str(&p.spec_json).expect("JSON");
    assert_eq!(spec["targetRef"]["port"], 80);
    assert_eq!(spec["retries"]["attempts"], 3);

    let (code, out, err) = meshctl(&["get", "tp", "-o", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let items = list["items"].as_array().expect("a List");
    assert_eq!(items.len(), 1, "{list}");
    let doc = &items[0];
    assert_eq!(doc["apiVersion"], "mesh.dev/v1alpha1");
    assert_eq!(doc["kind"], "TrafficPolicy");
    assert_eq!(doc["metadata"]["name"], "ok");
    assert_eq!(doc["metadata"]["namespace"], "default");
    assert_eq!(doc["spec"]["targetRef"]["name"], "echo");
    assert_eq!(doc["spec"]["targetRef"]["port"], 80);
    assert_eq!(doc["spec"]["loadBalancer"]["simple"], "ROUND_ROBIN");
    assert_eq!(doc["spec"]["retries"]["budget"]["percent"], 20.0);
    assert_eq!(
        doc["spec"]["retries"]["budget"]["minRetryConcurrency"], 3,
        "defaults are filled in"
    );
    let (code, out, err) = meshctl(&["get", "trafficpolicies"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "NAME   TARGET    SUMMARY\nok     echo:80   lb=ROUND_ROBIN retries=3\n"
    );
    let (code, out, err) = meshctl(&["get", "tp", "-A"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "NAMESPACE   NAME   TARGET    SUMMARY\ndefault     ok     echo:80   lb=ROUND_ROBIN retries=3\n"
    );
    // What get -o yaml prints applies again, unchanged.
    let (code, yaml, err) = meshctl(&["get", "trafficpolicy", "ok", "-o", "yaml"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        yaml.starts_with("apiVersion: mesh.dev/v1alpha1\n"),
        "{yaml}"
    );
    std::fs::write(&file, &yaml).expect("write");
    let (code, out, err) = meshctl(&["apply", "-f", file_arg]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "TrafficPolicy/default/ok unchanged\n");
    agent.expect_silence().await;
}

#[tokio::test]
async fn bad_authorization_policies_are_refused_at_apply_with_the_field_named_and_nothing_applied()
{
    let dir = TempDir::new("bad-authz");
    let server = start(&dir.0);
    server
        .apply(&workload("echo-1", "n1", "198.18.1.10", "echo"))
        .await
        .expect("apply the Workload");
    let mut agent = server
        .subscribe("n1", "token-1", HashMap::new())
        .await
        .expect("subscribe");
    agent.recv_and_ack().await;
    let policy = |name: &str, rules: &str| {
        format!(
            "apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  action: ALLOW
  rules:
{rules}"
        )
    };
    let good = policy(
        "ok",
        "  - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
    to: [{operation: {ports: ['8080'], methods: [GET]}}]
",
    );
    let meshctl = |args: &[&str]| server.meshctl(args);
    let file = dir.0.join("policies.yaml");
    let file_arg = file.to_str().expect("utf-8 path");

    // Each bad policy comes after a valid one in its batch: the batch is
    // refused whole, naming the document by its place in the file.
    let at = "document 2 (AuthorizationPolicy/default/bad): ";
    let cases = [
        (
            "an unknown field",
            policy("bad", "  - form: [{source: {namespaces: [a]}}]\n"),
            "spec.rules[0].form: unknown field `form`",
        ),
        (
            "the action REJECT",
            policy("bad", "  - {}\n").replace("action: ALLOW", "action: REJECT"),
            "spec.action: unknown variant `REJECT`, expected one of `ALLOW`, `DENY`, `AUDIT`",
        ),
        (
            "an empty source",
            policy("bad", "  - from: [{source: {}}]\n"),
            "spec.rules[0].from[0].source: an empty source would match every caller",
        ),
        (
            "a principal with spiffe://",
            policy(
                "bad",
                "  - from: [{source: {principals: ['spiffe://cluster.local/ns/a/sa/b']}}]\n",
            ),
            "spec.rules[0].from[0].source.principals[0]: \"spiffe://cluster.local/ns/a/sa/b\": principals leave out `spiffe://` (Istio never matches it): write \"cluster.local/ns/a/sa/b\"",
        ),
        (
            "a principal with a wildcard inside",
            policy("bad", "  - from: [{source: {principals: ['a*b']}}]\n"),
            "spec.rules[0].from[0].source.principals[0]: \"a*b\": `*` may only be the first or the last character, once",
        ),
        (
            "an ipBlock with host bits",
            policy("bad", "  - from: [{source: {ipBlocks: [198.18.0.1/15]}}]\n"),
            "spec.rules[0].from[0].source.ipBlocks[0]: \"198.18.0.1/15\" has host bits set (did you mean 198.18.0.0/15?)",
        ),
        (
            "a method in lower case",
            policy("bad", "  - to: [{operation: {methods: [get]}}]\n"),
            "spec.rules[0].to[0].operation.methods[0]: \"get\" is not an HTTP method in upper case",
        ),
        (
            "a when key the mesh does not know",
            policy(
                "bad",
                "  - when: [{key: 'request.auth.claims[iss]', values: [a]}]\n",
            ),
            "spec.rules[0].when[0].key: \"request.auth.claims[iss]\" is not a supported key",
        ),
    ];
    server.assert_refused_whole(&file, &good, &cases, at, &["authorizationpolicies"]);
    agent.expect_silence().await;

    std::fs::write(&file, &good).expect("write");
    let (code, out, err) = meshctl(&["apply", "-f", file_arg]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "AuthorizationPolicy/default/ok created\n");
    let change = agent.recv_and_ack().await;
    assert_eq!(keys(&change), ["AuthorizationPolicy/default/ok"]);
    let Some(Body::Policy(p)) = &change.resources[0].body else {
        panic!("not a policy: {change:?}")
    };
    assert_eq!(
        (
            p.kind.as_str(),
            p.namespace.as_str(),
            p.name.as_str(),
            p.created_revision
        ),
        ("AuthorizationPolicy", "default", "ok", 2)
    );
    let spec: serde_json::Value = serde_json::from_str(&p.spec_json).expect("JSON");
    assert_eq!(spec["selector"]["matchLabels"]["app"], "echo");
    assert_eq!(spec["action"], "ALLOW");
    assert_eq!(
        spec["rules"][0]["from"][0]["source"]["principals"][0],
        "cluster.local/ns/default/sa/client"
    );

    let (code, out, err) = meshctl(&["get", "ap", "-o", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let items = list["items"].as_array().expect("a List");
    assert_eq!(items.len(), 1, "{list}");
    let doc = &items[0];
    assert_eq!(doc["apiVersion"], "mesh.dev/v1alpha1");
    assert_eq!(doc["kind"], "AuthorizationPolicy");
    assert_eq!(doc["metadata"]["name"], "ok");
    assert_eq!(doc["metadata"]["namespace"], "default");
    assert_eq!(doc["spec"]["selector"]["matchLabels"]["app"], "echo");
    assert_eq!(doc["spec"]["action"], "ALLOW");
    assert_eq!(
        doc["spec"]["rules"][0]["to"][0]["operation"],
        serde_json::json!({"ports": ["8080"], "methods": ["GET"]}),
        "unset lists are left out"
    );
    let (code, out, err) = meshctl(&["get", "authorizationpolicies"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "NAME   ACTION   SELECTOR   RULES\nok     ALLOW    app=echo   1\n"
    );

    // One in the root namespace, without a selector: the whole mesh.
    std::fs::write(
        &file,
        "apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: mesh-system}
spec: {action: AUDIT, rules: [{}]}
",
    )
    .expect("write");
    let (code, out, err) = meshctl(&["apply", "-f", file_arg]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "AuthorizationPolicy/mesh-system/audit-all created\n");
    let change = agent.recv_and_ack().await;
    assert_eq!(keys(&change), ["AuthorizationPolicy/mesh-system/audit-all"]);
    let (code, out, err) = meshctl(&["get", "ap", "-A"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "NAMESPACE     NAME        ACTION   SELECTOR   RULES
default       ok          ALLOW    app=echo   1
mesh-system   audit-all   AUDIT    (mesh)     1
"
    );

    // What get -o yaml prints applies again, unchanged.
    let (code, yaml, err) = meshctl(&["get", "authorizationpolicy", "ok", "-o", "yaml"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        yaml.starts_with("apiVersion: mesh.dev/v1alpha1\n"),
        "{yaml}"
    );
    std::fs::write(&file, &yaml).expect("write");
    let (code, out, err) = meshctl(&["apply", "-f", file_arg]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "AuthorizationPolicy/default/ok unchanged\n");
    agent.expect_silence().await;

    let (code, out, err) = meshctl(&["delete", "ap", "ok"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "AuthorizationPolicy/default/ok deleted\n");
    let change = agent.recv_and_ack().await;
    assert_eq!(change.removed_resources, ["AuthorizationPolicy/default/ok"]);
    assert!(change.resources.is_empty(), "{change:?}");
}
