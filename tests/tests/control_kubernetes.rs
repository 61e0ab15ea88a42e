//! `mesh-control --kube-api`: the mesh learnt from Kubernetes, and agents
//! authenticated by TokenReview.
//!
//! There is no Kubernetes API server on our test machines, so the API
//! server here is a STAND-IN: `mesh-kube-standin` (tests/src/bin), which
//! speaks the list and watch protocol over HTTP as the real one does
//! (resourceVersions, newline-delimited watch events, bookmarks, 410 Gone
//! after compaction) and answers TokenReviews as the test tells it to.
//! Everything else is real: the `mesh-control` binary with its kube-rs
//! watchers, its TLS listener and CA, and gRPC agent streams.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use mesh_api::{
    client::{self, Bearer},
    identity::generate_key_and_csr,
    pb::{
        ApplyRequest, DeleteRequest, DeltaRequest, DeltaResponse, SignNodeRequest,
        certificates_client::CertificatesClient, distribution_client::DistributionClient,
        resource::Body,
    },
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

mod support;

use support::control::{Server, TempDir, bin};

const WAIT: Duration = Duration::from_secs(15);
const API_TOKEN: &str = "control-plane-token";
const AGENT_USER: &str = "system:serviceaccount:mesh-system:mesh-agent";

/// The stand-in API server; killed on drop.
struct StandIn {
    child: Child,
    addr: SocketAddr,
}

impl StandIn {
    fn start() -> StandIn {
        let mut child = Command::new(bin("mesh-kube-standin"))
            .args(["--require-token", API_TOKEN])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start mesh-kube-standin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        let addr = line
            .trim()
            .rsplit("addr=")
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        StandIn { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One request to the stand-in's test-control API.
    fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        let body = body.to_string();
        let mut stream = TcpStream::connect(self.addr).expect("stand-in");
        write!(
            stream,
            "{method} /standin/{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "{method} {path}: {response}"
        );
        serde_json::from_str(body).expect("JSON")
    }

    fn put(&self, object: &Value) {
        self.call("PUT", "objects", object);
    }

    fn delete(&self, object: &Value) {
        self.call("DELETE", "objects", object);
    }

    fn stats(&self) -> Value {
        self.call("GET", "stats", &Value::Null)
    }

    fn token(&self, token: &str, status: Value) {
        self.call(
            "PUT",
            "tokens",
            &json!({ "token": token, "status": status }),
        );
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn namespace(name: &str, enrolled: bool) -> Value {
    let labels = if enrolled {
        json!({ "mesh.dev/enrolled": "true" })
    } else {
        json!({})
    };
    json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name, "labels": labels } })
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, app: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": { "app": app } },
        "spec": {
            "nodeName": node,
            "serviceAccountName": app,
            "containers": [{ "name": "app", "image": "app", "ports": [{ "name": "http", "containerPort": 8080 }] }],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
        },
    })
}

fn k8s_service(ns: &str, name: &str, ip: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "clusterIP": ip,
            "clusterIPs": [ip],
            "selector": { "app": app },
            "ports": [{ "name": "web", "port": 80, "targetPort": "http", "protocol": "TCP" }],
        },
    })
}

/// The same mesh as our own documents, for the file store.
fn file_store_documents() -> String {
    [
        "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: web-1, namespace: shop, labels: {app: web}}\nspec: {serviceAccount: web, node: n1, ip: 198.18.1.10, ports: [{name: http, port: 8080, protocol: TCP}], ready: true}\n",
        "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: web-2, namespace: shop, labels: {app: web}}\nspec: {serviceAccount: web, node: n2, ip: 198.18.2.10, ports: [{name: http, port: 8080, protocol: TCP}], ready: false}\n",
        "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {vips: [198.19.0.10], ports: [{name: web, port: 80, targetPort: 8080}], selector: {app: web}}\n",
    ]
    .join("---\n")
}

/// The stand-in with `shop` enrolled and `other` not, two pods and a
/// Service in each.
fn populate(api: &StandIn) {
    api.put(&namespace("shop", true));
    api.put(&namespace("other", false));
    api.put(&pod("shop", "web-1", "n1", "198.18.1.10", "web", true));
    api.put(&pod("shop", "web-2", "n2", "198.18.2.10", "web", false));
    api.put(&k8s_service("shop", "web", "198.19.0.10", "web"));
    api.put(&pod("other", "x-1", "n1", "198.18.1.20", "x", true));
    api.put(&k8s_service("other", "x", "198.19.0.20", "x"));
}

/// mesh-control reading the stand-in, with its API token in a file.
fn control(dir: &Path, api: &StandIn) -> Server {
    let token = dir.join("kube-token");
    std::fs::write(&token, format!("{API_TOKEN}\n")).expect("token file");
    let url = api.url();
    Server::start(
        dir,
        &[
            "--kube-api",
            &url,
            "--kube-token-file",
            token.to_str().expect("utf-8 path"),
        ],
    )
}

/// A test agent: one Distribution stream that ACKs what it gets.
struct Agent {
    requests: mpsc::Sender<DeltaRequest>,
    responses: Streaming<DeltaResponse>,
}

async fn subscribe(server: &Server, node: &str, token: &str) -> Result<Agent, tonic::Status> {
    let channel = client::channel_with_tls(&server.target(), Some(&server.tls(None)))
        .await
        .expect("connect");
    let mut client =
        DistributionClient::with_interceptor(channel, Bearer::new(Some(token)).expect("token"));
    let (requests, rx) = mpsc::channel(4);
    requests
        .send(DeltaRequest {
            node: node.into(),
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

impl Agent {
    async fn recv(&mut self) -> DeltaResponse {
        let r = tokio::time::timeout(WAIT, self.responses.message())
            .await
            .expect("a response in time")
            .expect("stream healthy")
            .expect("stream open");
        self.requests
            .send(DeltaRequest {
                response_nonce: r.nonce.clone(),
                ..DeltaRequest::default()
            })
            .await
            .expect("ack");
        r
    }

    /// Responses until one carries or removes `key`.
    async fn until(&mut self, key: &str) -> DeltaResponse {
        loop {
            let r = self.recv().await;
            if r.resources.iter().any(|x| x.key == key)
                || r.removed_resources.iter().any(|k| k == key)
            {
                return r;
            }
        }
    }

    async fn expect_silence(&mut self) {
        if let Ok(r) =
            tokio::time::timeout(Duration::from_millis(1500), self.responses.message()).await
        {
            panic!("expected no response, got {r:?}");
        }
    }
}

/// The bodies of a response by key, without the trust bundle.
fn bodies(r: &DeltaResponse) -> HashMap<String, Body> {
    r.resources
        .iter()
        .filter(|x| x.key != "TrustBundle//mesh")
        .filter_map(|x| Some((x.key.clone(), x.body.clone()?)))
        .collect()
}

fn workload(r: &DeltaResponse, key: &str) -> mesh_api::pb::Workload {
    match r
        .resources
        .iter()
        .find(|x| x.key == key)
        .and_then(|x| x.body.clone())
    {
        Some(Body::Workload(w)) => w,
        other => panic!("{key}: {other:?}"),
    }
}

fn endpoints(r: &DeltaResponse, key: &str) -> Vec<(String, bool)> {
    match r
        .resources
        .iter()
        .find(|x| x.key == key)
        .and_then(|x| x.body.clone())
    {
        Some(Body::Service(s)) => s
            .endpoints
            .iter()
            .map(|e| (e.workload.clone(), e.ready))
            .collect(),
        other => panic!("{key}: {other:?}"),
    }
}

/// Waits until the control server's log has `needle`.
async fn wait_for_log(server: &Server, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let log = std::fs::read_to_string(&server.log).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {needle:?} in the log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn pods_and_services_of_enrolled_namespaces_reach_agents_as_the_file_stores_and_follow_changes()
 {
    let api = StandIn::start();
    populate(&api);
    let dir = TempDir::new("kube-sync");
    let server = control(&dir.0, &api);
    let mut agent = subscribe(&server, "n1", "token-1")
        .await
        .expect("subscribe");
    let first = agent.until("Service/shop/web").await;

    // What the file store gives for the same mesh, applied with meshctl's API.
    let file_dir = TempDir::new("kube-sync-file");
    let file_server = Server::start(&file_dir.0, &[]);
    file_server
        .apply(&file_store_documents())
        .await
        .expect("apply");
    let mut file_agent = subscribe(&file_server, "n1", "token-1")
        .await
        .expect("subscribe");
    let from_file = file_agent.recv().await;
    assert_eq!(
        bodies(&first),
        bodies(&from_file),
        "the Kubernetes source and the file store differ"
    );
    assert!(
        !bodies(&first).keys().any(|k| k.contains("/other/")),
        "a namespace without mesh.dev/enrolled=true is ignored: {:?}",
        bodies(&first).keys()
    );
    assert_eq!(
        endpoints(&first, "Service/shop/web"),
        [("web-1".to_owned(), true), ("web-2".to_owned(), false)]
    );

    // Readiness.
    api.put(&pod("shop", "web-2", "n2", "198.18.2.10", "web", true));
    let r = agent.until("Workload/shop/web-2").await;
    assert!(workload(&r, "Workload/shop/web-2").ready, "{r:?}");
    // Labels: web-1 leaves the Service.
    api.put(&pod("shop", "web-1", "n1", "198.18.1.10", "other", true));
    let r = agent.until("Service/shop/web").await;
    assert_eq!(
        endpoints(&r, "Service/shop/web"),
        [("web-2".to_owned(), true)]
    );
    // IP.
    api.put(&pod("shop", "web-2", "n2", "198.18.2.11", "web", true));
    let r = agent.until("Workload/shop/web-2").await;
    assert_eq!(workload(&r, "Workload/shop/web-2").ip, "198.18.2.11");
    // A pod that terminates is no endpoint any more, then it goes.
    let mut terminating = pod("shop", "web-1", "n1", "198.18.1.10", "other", true);
    terminating["metadata"]["deletionTimestamp"] = json!("2026-12-02T00:00:00Z");
    api.put(&terminating);
    let r = agent.until("Workload/shop/web-1").await;
    assert!(
        r.removed_resources
            .contains(&"Workload/shop/web-1".to_owned()),
        "{r:?}"
    );
    api.delete(&terminating);
    api.delete(&k8s_service("shop", "web", "198.19.0.10", "web"));
    let r = agent.until("Service/shop/web").await;
    assert!(
        r.removed_resources.contains(&"Service/shop/web".to_owned()),
        "{r:?}"
    );
    // Enrolling a namespace brings its pods.
    api.put(&namespace("other", true));
    let r = agent.until("Workload/other/x-1").await;
    assert_eq!(workload(&r, "Workload/other/x-1").ip, "198.18.1.20");

    // Kinds that come from Kubernetes are not applied or deleted with meshctl.
    let mut op = server.operator().await;
    let refused = op
        .apply(ApplyRequest {
            yaml: file_store_documents(),
            dry_run: false,
        })
        .await
        .expect_err("apply refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("kubectl"), "{refused:?}");
    let refused = op
        .delete(DeleteRequest {
            kind: "Workload".into(),
            namespace: "shop".into(),
            name: "web-2".into(),
        })
        .await
        .expect_err("delete refused");
    assert!(refused.message().contains("kubectl"), "{refused:?}");
    // Nodes stay with meshctl.
    op.apply(ApplyRequest {
        yaml: "apiVersion: mesh.dev/v1alpha1\nkind: Node\nmetadata: {name: n1}\nspec: {address: 198.18.0.1, tunnelPort: 15008}\n".into(),
        dry_run: false,
    })
    .await
    .expect("a Node is applied");
}

#[tokio::test]
async fn a_broken_watch_resumes_and_a_410_relists_without_losing_an_event() {
    let api = StandIn::start();
    populate(&api);
    let dir = TempDir::new("kube-watch");
    let server = control(&dir.0, &api);
    let mut agent = subscribe(&server, "n1", "token-1")
        .await
        .expect("subscribe");
    agent.until("Service/shop/web").await;
    let lists = |api: &StandIn| api.stats()["lists"]["pods"].as_u64().unwrap_or(0);
    let watches = |api: &StandIn| api.stats()["watches"]["pods"].as_u64().unwrap_or(0);
    assert_eq!(lists(&api), 1);

    // Every watch breaks and new ones are held; a pod appears meanwhile.
    let watched = watches(&api);
    api.call("POST", "pause", &Value::Null);
    api.put(&pod("shop", "web-3", "n1", "198.18.1.30", "web", true));
    agent.expect_silence().await;
    api.call("POST", "resume", &Value::Null);
    let r = agent.until("Workload/shop/web-3").await;
    assert_eq!(workload(&r, "Workload/shop/web-3").ip, "198.18.1.30");
    assert_eq!(
        lists(&api),
        1,
        "the watch resumed from its resourceVersion, without a relist"
    );
    assert!(watches(&api) > watched);

    // Again, and the history is compacted past the event while the watch is
    // down: resuming is 410 Gone, and the relist brings the event.
    api.call("POST", "pause", &Value::Null);
    api.put(&pod("shop", "web-3", "n1", "198.18.1.31", "web", true));
    api.call("POST", "compact", &Value::Null);
    api.call("POST", "resume", &Value::Null);
    let r = agent.until("Workload/shop/web-3").await;
    assert_eq!(workload(&r, "Workload/shop/web-3").ip, "198.18.1.31");
    assert_eq!(lists(&api), 2, "410 Gone made the watcher list again");

    // And the relisted watch carries on.
    api.delete(&pod("shop", "web-3", "n1", "198.18.1.31", "web", true));
    let r = agent.until("Workload/shop/web-3").await;
    assert!(
        r.removed_resources
            .contains(&"Workload/shop/web-3".to_owned())
    );
}

#[tokio::test]
async fn an_object_the_checks_refuse_is_logged_and_the_last_good_configuration_keeps_serving() {
    let api = StandIn::start();
    populate(&api);
    let dir = TempDir::new("kube-refuse");
    let server = control(&dir.0, &api);
    let mut agent = subscribe(&server, "n1", "token-1")
        .await
        .expect("subscribe");
    let good = bodies(&agent.until("Service/shop/web").await);

    // Two pods with one IP.
    api.put(&pod("shop", "copy", "n1", "198.18.1.10", "web", true));
    let log = wait_for_log(&server, "Workload/shop/copy").await;
    assert!(
        log.contains("refused the Kubernetes configuration"),
        "{log}"
    );
    agent.expect_silence().await;
    // A TrafficPolicy our parser refuses, named as Kubernetes names it.
    api.delete(&pod("shop", "copy", "n1", "198.18.1.10", "web", true));
    let bad_policy = json!({
        "apiVersion": "mesh.dev/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": { "name": "bad", "namespace": "shop" },
        "spec": { "targetRef": { "kind": "Service", "name": "web" }, "retries": { "attempts": 11 } },
    });
    api.put(&bad_policy);
    wait_for_log(&server, "TrafficPolicy shop/bad").await;
    agent.expect_silence().await;
    let mut late = subscribe(&server, "n1", "token-1")
        .await
        .expect("subscribe");
    assert_eq!(
        bodies(&late.recv().await),
        good,
        "the last good configuration serves"
    );

    // Once the bad object goes, changes flow again.
    api.delete(&bad_policy);
    api.put(&pod("shop", "web-2", "n2", "198.18.2.10", "web", true));
    let r = agent.until("Workload/shop/web-2").await;
    assert!(workload(&r, "Workload/shop/web-2").ready);
}

/// A node certificate for `node`, asked for with `token`.
async fn sign_node(
    server: &Server,
    token: &str,
    node: &str,
) -> Result<mesh_api::pb::SignResponse, tonic::Status> {
    let channel = client::channel_with_tls(&server.target(), Some(&server.tls(None)))
        .await
        .expect("connect");
    let mut certs =
        CertificatesClient::with_interceptor(channel, Bearer::new(Some(token)).expect("token"));
    let id = mesh_api::identity::node_identity("cluster.local", node).expect("id");
    let (_, csr_pem) = generate_key_and_csr(&id).expect("csr");
    certs
        .sign_node(SignNodeRequest {
            node: node.into(),
            csr_pem,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn tokenreview_gives_an_agent_its_node_certificate_and_refuses_other_tokens_with_the_reason()
{
    let api = StandIn::start();
    populate(&api);
    let user = |name: &str, node: Option<&str>| {
        let mut user = json!({ "username": name, "uid": "u" });
        if let Some(node) = node {
            user["extra"] = json!({ "authentication.kubernetes.io/node-name": [node] });
        }
        user
    };
    let ok = |u: Value| json!({ "authenticated": true, "audiences": ["mesh-control"], "user": u });
    api.token("agent-n1", ok(user(AGENT_USER, Some("n1"))));
    api.token(
        "web-n1",
        ok(user("system:serviceaccount:shop:web", Some("n1"))),
    );
    api.token("agent-no-node", ok(user(AGENT_USER, None)));
    api.token(
        "agent-apiserver-audience",
        json!({ "authenticated": true, "audiences": ["https://kubernetes.default.svc"], "user": user(AGENT_USER, Some("n1")) }),
    );
    let dir = TempDir::new("kube-review");
    let server = control(&dir.0, &api);

    let sign = |token, node| sign_node(&server, token, node);

    // The agents' account, bound to n1: n1's node certificate.
    let issued = sign("agent-n1", "n1").await.expect("n1's certificate");
    let pem = pem::parse(issued.cert_chain_pem.as_bytes()).expect("PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(pem.contents()).expect("X.509");
    let san = cert
        .subject_alternative_name()
        .expect("SAN")
        .expect("a SAN")
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        });
    assert_eq!(
        san.as_deref(),
        Some("spiffe://cluster.local/ns/mesh-system/sa/node-n1")
    );
    // The same token streams as n1, and not as n2.
    subscribe(&server, "n1", "agent-n1")
        .await
        .expect("n1 streams")
        .recv()
        .await;
    let e = sign("agent-n1", "n2").await.expect_err("n2's certificate");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    for (token, reason) in [
        (
            "web-n1",
            "\"system:serviceaccount:shop:web\"'s, not the agents' service account",
        ),
        (
            "agent-no-node",
            "names no node (authentication.kubernetes.io/node-name)",
        ),
        (
            "agent-apiserver-audience",
            "did not authenticate the token: token audiences",
        ),
        (
            "garbage",
            "did not authenticate the token: [invalid bearer token",
        ),
    ] {
        let e = sign(token, "n1").await.expect_err(token);
        assert_eq!(e.code(), Code::Unauthenticated, "{token}: {e:?}");
        assert!(e.message().contains(reason), "{token}: {e:?}");
        let e = subscribe(&server, "n1", token).await.err().expect(token);
        assert_eq!(e.code(), Code::Unauthenticated, "{token}: {e:?}");
    }
    let log = wait_for_log(&server, "TokenReview refused a token").await;
    assert!(log.contains("names no node"), "{log}");
    // Every review asked for our audience; the static tokens are never reviewed.
    let reviews = api.stats()["reviews"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!reviews.is_empty());
    assert!(
        reviews
            .iter()
            .all(|r| r["audiences"] == json!(["mesh-control"])),
        "{reviews:?}"
    );
    let before = reviews.len();
    subscribe(&server, "n1", "token-1")
        .await
        .expect("static token")
        .recv()
        .await;
    assert_eq!(
        api.stats()["reviews"].as_array().map(Vec::len),
        Some(before)
    );
}
