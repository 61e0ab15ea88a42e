//! The control server's certificate authority end to end: the real
//! `mesh-control` binary on loopback with TLS, real gRPC clients presenting
//! bootstrap tokens or node certificates, a temporary store.
use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    time::{Duration, SystemTime},
};

use mesh_api::{
    client::{self, Bearer, Target, Tls},
    identity::{CertStore, SpiffeId, generate_key_and_csr, validity},
    pb::{
        DeltaRequest, SignNodeRequest, SignRequest, SignResponse,
        certificates_client::CertificatesClient, distribution_client::DistributionClient,
    },
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};
use x509_parser::extensions::GeneralName;

mod support;

use mesh_api::admin::Source;

use support::control::{Server, TempDir, bin, command};

const TD: &str = "cluster.local";

impl Server {
    /// A sample of the Prometheus page, 0 when absent.
    fn metric0(&self, sample: &str) -> f64 {
        self.metric(sample).unwrap_or(0.0)
    }

    /// Applies `yaml`, which must be accepted.
    async fn apply_ok(&self, yaml: &str) {
        self.apply(yaml).await.expect("apply");
    }

    async fn channel(&self, client: Option<(CertStore, SpiffeId)>) -> Channel {
        client::channel_with_tls(&self.target(), Some(&self.tls(client)))
            .await
            .expect("TLS connection")
    }

    /// A Certificates client with a token, a node certificate, both or neither.
    async fn certs(
        &self,
        token: Option<&str>,
        client: Option<(CertStore, SpiffeId)>,
    ) -> CertificatesClient<InterceptedService<Channel, Bearer>> {
        CertificatesClient::with_interceptor(
            self.channel(client).await,
            Bearer::new(token).expect("token"),
        )
    }

    /// A node certificate obtained with the node's token.
    async fn node_cert(&self, node: &str, token: &str) -> (CertStore, SpiffeId) {
        let id = node_id(node);
        let (key, csr_pem) = generate_key_and_csr(&id).expect("csr");
        let issued = self
            .certs(Some(token), None)
            .await
            .sign_node(SignNodeRequest {
                node: node.into(),
                csr_pem,
            })
            .await
            .expect("node certificate")
            .into_inner();
        let store = CertStore::new();
        assert_eq!(
            store.insert(&issued.cert_chain_pem, key).expect("valid"),
            id
        );
        (store, id)
    }

    /// Subscribes as `node`; the first response or the refusal.
    async fn subscribe(
        &self,
        node: &str,
        token: Option<&str>,
        client: Option<(CertStore, SpiffeId)>,
    ) -> Result<(), tonic::Status> {
        let mut dist = DistributionClient::with_interceptor(
            self.channel(client).await,
            Bearer::new(token).expect("token"),
        );
        let (tx, rx) = mpsc::channel(2);
        tx.send(DeltaRequest {
            node: node.into(),
            initial_resource_versions: HashMap::new(),
            ..DeltaRequest::default()
        })
        .await
        .expect("first request");
        let mut stream = dist
            .delta_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a response in time")?;
        assert!(first.is_some(), "stream open");
        Ok(())
    }
}

fn node_id(node: &str) -> SpiffeId {
    format!("spiffe://{TD}/ns/mesh-system/sa/node-{node}")
        .parse()
        .expect("node identity")
}

fn workload(name: &str, namespace: &str, sa: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{node: {node}, ip: {ip}, serviceAccount: {sa}}}\n"
    )
}

/// echo (default/default) on n1, cart (shop/cart) on n2.
fn base() -> String {
    [
        workload("echo", "default", "default", "n1", "198.18.1.10"),
        workload("cart", "shop", "cart", "n2", "198.18.2.10"),
    ]
    .join("---\n")
}

async fn sign(
    client: &mut CertificatesClient<InterceptedService<Channel, Bearer>>,
    identity: &str,
) -> Result<SignResponse, tonic::Status> {
    let id: SpiffeId = identity.parse().expect("a SPIFFE ID");
    let (_, csr_pem) = generate_key_and_csr(&id).expect("csr");
    client
        .sign(SignRequest {
            csr_pem,
            identity: identity.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The URI SANs and issuer of the leaf.
fn leaf(chain_pem: &str) -> (Vec<String>, String) {
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("X.509");
    let uris = cert
        .subject_alternative_name()
        .expect("SAN extension")
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (uris, cert.issuer().to_string())
}

fn subject(pem: &str) -> String {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("X.509");
    cert.subject().to_string()
}

fn secs_from_now(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

#[tokio::test]
async fn an_own_node_workload_gets_a_certificate_with_its_spiffe_id_and_the_ttl() {
    let dir = TempDir::new("own");
    let server = Server::start(&dir.0, &["--cert-ttl", "5m"]);
    server.apply_ok(&base()).await;

    let mut n1 = server.certs(Some("token-1"), None).await;
    let issued = sign(&mut n1, "spiffe://cluster.local/ns/default/sa/default")
        .await
        .expect("n1 runs default/default");
    let (uris, issuer) = leaf(&issued.cert_chain_pem);
    assert_eq!(uris, ["spiffe://cluster.local/ns/default/sa/default"]);
    let ca_pem = std::fs::read_to_string(&server.ca).expect("ca.crt");
    assert_eq!(issuer, subject(&ca_pem), "issued by the CA agents trust");
    let (not_before, not_after) = validity(&issued.cert_chain_pem).expect("validity");
    assert_eq!(
        not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs(),
        issued.not_after_unix
    );
    let left = secs_from_now(not_after);
    assert!((290..=300).contains(&left), "5 minutes, not {left} s");
    assert!(not_before < SystemTime::now());
    assert_eq!(
        server.metric0("mesh_control_certificates_issued_total{kind=\"workload\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_workload_on_another_node_is_refused_named_and_counted() {
    let dir = TempDir::new("other");
    let server = Server::start(&dir.0, &[]);
    server.apply_ok(&base()).await;
    let mut n1 = server.certs(Some("token-1"), None).await;

    let refused = sign(&mut n1, "spiffe://cluster.local/ns/shop/sa/cart")
        .await
        .expect_err("cart runs on n2 only");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert_eq!(
        refused.message(),
        "node n1 may not obtain spiffe://cluster.local/ns/shop/sa/cart: no Workload on node n1 runs as it"
    );
    let nobody = sign(&mut n1, "spiffe://cluster.local/ns/default/sa/ghost")
        .await
        .expect_err("nobody runs as ghost");
    assert_eq!(nobody.code(), Code::PermissionDenied);
    assert_eq!(
        server.metric0("mesh_control_sign_refused_total{reason=\"not_on_node\"}"),
        2.0
    );

    // Nor another node's identity, nor the control server's, nor another trust domain.
    for identity in [
        "spiffe://cluster.local/ns/mesh-system/sa/node-n2",
        "spiffe://cluster.local/ns/mesh-system/sa/mesh-control",
        "spiffe://evil.example/ns/default/sa/default",
    ] {
        let e = sign(&mut n1, identity).await.expect_err(identity);
        assert_eq!(e.code(), Code::PermissionDenied, "{identity}: {e:?}");
        assert!(e.message().contains(identity), "{e:?}");
    }
    assert_eq!(
        server.metric0("mesh_control_sign_refused_total{reason=\"reserved_identity\"}"),
        2.0
    );
    assert_eq!(
        server.metric0("mesh_control_sign_refused_total{reason=\"foreign_trust_domain\"}"),
        1.0
    );

    // A CSR that names another identity than the request.
    let (_, csr_pem) = generate_key_and_csr(
        &"spiffe://cluster.local/ns/shop/sa/cart"
            .parse()
            .expect("id"),
    )
    .expect("csr");
    let e = n1
        .sign(SignRequest {
            csr_pem,
            identity: "spiffe://cluster.local/ns/default/sa/default".into(),
        })
        .await
        .expect_err("the CSR asks for cart");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        server.metric0("mesh_control_sign_refused_total{reason=\"csr_mismatch\"}"),
        1.0
    );

    // The refusal is logged with the identity and the node.
    let log = std::fs::read_to_string(&server.log).expect("log");
    assert!(
        log.lines().any(|l| l.contains("refused a signing request")
            && l.contains("node=n1")
            && l.contains("spiffe://cluster.local/ns/shop/sa/cart")),
        "{log}"
    );
    // And the workload's own node gets it.
    let mut n2 = server.certs(Some("token-2"), None).await;
    sign(&mut n2, "spiffe://cluster.local/ns/shop/sa/cart")
        .await
        .expect("n2 runs cart");
}

#[tokio::test]
async fn sign_node_is_only_for_the_callers_own_node() {
    let dir = TempDir::new("node");
    let server = Server::start(&dir.0, &[]);
    let mut n1 = server.certs(Some("token-1"), None).await;
    let (_, csr_pem) = generate_key_and_csr(&node_id("n2")).expect("csr");
    let e = n1
        .sign_node(SignNodeRequest {
            node: "n2".into(),
            csr_pem,
        })
        .await
        .expect_err("n1 asks for n2");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("node n1 may not obtain spiffe://cluster.local/ns/mesh-system/sa/node-n2"),
        "{e:?}"
    );
    assert_eq!(
        server.metric0("mesh_control_sign_refused_total{reason=\"other_node\"}"),
        1.0
    );

    let (store, id) = server.node_cert("n1", "token-1").await;
    assert_eq!(id, node_id("n1"));
    drop(store);
    assert_eq!(
        server.metric0("mesh_control_certificates_issued_total{kind=\"node\"}"),
        1.0
    );

    // Without credentials, or with a stranger's token: unauthenticated.
    for token in [None, Some("nonsense")] {
        let mut anonymous = server.certs(token, None).await;
        let e = sign(
            &mut anonymous,
            "spiffe://cluster.local/ns/default/sa/default",
        )
        .await
        .expect_err("no credentials");
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    assert_eq!(
        server.metric0("mesh_control_sign_refused_total{reason=\"unauthenticated\"}"),
        2.0
    );
}

#[tokio::test]
async fn a_node_certificate_authenticates_in_place_of_the_token() {
    let dir = TempDir::new("cert-auth");
    let server = Server::start(&dir.0, &[]);
    server.apply_ok(&base()).await;
    let n1_cert = server.node_cert("n1", "token-1").await;

    // No token at all: the certificate says n1.
    let mut n1 = server.certs(None, Some(n1_cert.clone())).await;
    sign(&mut n1, "spiffe://cluster.local/ns/default/sa/default")
        .await
        .expect("n1's workload with n1's certificate");
    let e = sign(&mut n1, "spiffe://cluster.local/ns/shop/sa/cart")
        .await
        .expect_err("n2's workload");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The certificate decides, whatever token travels with it.
    let mut confused = server.certs(Some("token-2"), Some(n1_cert.clone())).await;
    let e = sign(&mut confused, "spiffe://cluster.local/ns/shop/sa/cart")
        .await
        .expect_err("the certificate is n1's");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    server
        .subscribe("n1", None, Some(n1_cert.clone()))
        .await
        .expect("n1 subscribes with its certificate");
    let e = server
        .subscribe("n2", None, Some(n1_cert.clone()))
        .await
        .expect_err("n1's certificate may not subscribe as n2");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("\"n2\""), "{e:?}");
    let e = server
        .subscribe("n2", Some("token-2"), Some(n1_cert))
        .await
        .expect_err("not even with n2's token beside it");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Bootstrap: the token alone still works.
    server
        .subscribe("n2", Some("token-2"), None)
        .await
        .expect("n2 with its token");
    let e = server
        .subscribe("n2", None, None)
        .await
        .expect_err("no credentials");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(
        server.metric0("mesh_control_unauthenticated_streams_total"),
        3.0
    );

    // A workload certificate is not a node's.
    let mut n1_again = server.certs(Some("token-1"), None).await;
    let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/default"
        .parse()
        .expect("id");
    let (key, csr_pem) = generate_key_and_csr(&id).expect("csr");
    let issued = n1_again
        .sign(SignRequest {
            csr_pem,
            identity: id.to_string(),
        })
        .await
        .expect("issued")
        .into_inner();
    let store = CertStore::new();
    store.insert(&issued.cert_chain_pem, key).expect("valid");
    let e = server
        .subscribe("n1", None, Some((store, id)))
        .await
        .expect_err("a workload certificate");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("not a node agent"), "{e:?}");
}

#[tokio::test]
async fn strangers_fail_the_handshake_and_plaintext_is_refused() {
    let dir = TempDir::new("strangers");
    let server = Server::start(&dir.0, &[]);
    // A client certificate from another CA: the server refuses the handshake.
    let other = mesh_api::identity::Ca::generate(TD).expect("another CA");
    let id = node_id("n1");
    let (key, csr) = generate_key_and_csr(&id).expect("csr");
    let forged = other
        .sign_csr(csr.as_bytes(), &id, Duration::from_secs(300))
        .expect("issued by the other CA");
    let store = CertStore::new();
    store.insert(&forged.cert_chain_pem, key).expect("valid");
    let mut client = server.certs(None, Some((store, id))).await;
    let e = sign(&mut client, "spiffe://cluster.local/ns/default/sa/default")
        .await
        .expect_err("a certificate of another CA");
    // TLS 1.3: the client learns of the refusal at its first request, as a
    // fatal alert or a closed connection.
    assert_ne!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(server.metric0("mesh_control_tls_handshakes_total{result=\"failed\"}") >= 1.0);

    // A client that trusts another CA refuses the server.
    let mut tls = server.tls(None);
    tls.trust_bundle_pem = other.trust_bundle_pem();
    assert!(
        client::channel_with_tls(&server.target(), Some(&tls))
            .await
            .is_err(),
        "the server's certificate is not from the other CA"
    );

    // Plaintext HTTP/2 to the TLS listener goes nowhere.
    let plain = Target::Http(format!("http://{}", server.grpc));
    let refused = match client::channel(&plain).await {
        Err(_) => true,
        Ok(channel) => {
            let mut c = CertificatesClient::with_interceptor(
                channel,
                Bearer::new(Some("token-1")).expect("token"),
            );
            sign(&mut c, "spiffe://cluster.local/ns/default/sa/default")
                .await
                .is_err()
        }
    };
    assert!(refused, "plaintext was served");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("exists")
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn the_generated_root_is_kept_owner_only_and_reused_after_a_restart() {
    let dir = TempDir::new("root");
    let server = Server::start(&dir.0, &[]);
    let ca_dir = dir.0.join("store").join("ca");
    assert_eq!(server.ca, ca_dir.join("ca.crt"));
    assert_eq!(mode(&ca_dir), 0o700);
    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
    let root = std::fs::read_to_string(&server.ca).expect("ca.crt");
    drop(server);
    let server = Server::start(&dir.0, &[]);
    assert_eq!(
        std::fs::read_to_string(&server.ca).expect("ca.crt"),
        root,
        "the same root after a restart"
    );
    drop(server);

    // A key others can read is refused, not used.
    std::fs::set_permissions(
        ca_dir.join("ca.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let out = command(&dir.0, &[]).output().expect("run mesh-control");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("it must be 0600"), "{stderr}");
}

#[tokio::test]
async fn an_operator_intermediate_signs_and_agents_trust_only_the_root() {
    let dir = TempDir::new("intermediate");
    let root_key = KeyPair::generate().expect("root key");
    let mut root = CertificateParams::default();
    root.distinguished_name = DistinguishedName::new();
    root.distinguished_name
        .push(rcgen::DnType::CommonName, "operator root");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_pem = root.self_signed(&root_key).expect("root").pem();
    let key = KeyPair::generate().expect("intermediate key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mesh intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let intermediate_pem = params
        .signed_by(&key, &Issuer::from_params(&root, &root_key))
        .expect("intermediate")
        .pem();
    let (cert, key_file) = (dir.0.join("ca-chain.pem"), dir.0.join("ca.key"));
    std::fs::write(&cert, format!("{intermediate_pem}{root_pem}")).expect("chain");
    std::fs::write(&key_file, key.serialize_pem()).expect("key");
    let root_file = dir.0.join("root.pem");
    std::fs::write(&root_file, &root_pem).expect("root");

    let server = Server::start(
        &dir.0,
        &[
            "--ca-cert",
            cert.to_str().expect("utf-8"),
            "--ca-key",
            key_file.to_str().expect("utf-8"),
            "--trust-domain",
            "mesh.example",
        ],
    );
    server
        .apply_ok(&workload("echo", "default", "default", "n1", "198.18.1.10"))
        .await;
    // The client trusts the root alone; the server's chain goes through the intermediate.
    let tls = Tls::from_bundle_file(&root_file, "mesh.example").expect("bundle");
    let channel = client::channel_with_tls(&server.target(), Some(&tls))
        .await
        .expect("TLS through the intermediate");
    let mut n1 =
        CertificatesClient::with_interceptor(channel, Bearer::new(Some("token-1")).expect("token"));
    let issued = sign(&mut n1, "spiffe://mesh.example/ns/default/sa/default")
        .await
        .expect("issued");
    let chain: Vec<_> = CertificateDer::pem_slice_iter(issued.cert_chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM");
    assert_eq!(chain.len(), 2, "the leaf travels with the intermediate");
    assert_eq!(leaf(&issued.cert_chain_pem).1, subject(&intermediate_pem));
    // The wrong trust domain expects another server identity.
    let wrong = Tls::from_bundle_file(&root_file, "cluster.local").expect("bundle");
    assert!(
        client::channel_with_tls(&server.target(), Some(&wrong))
            .await
            .is_err(),
        "the server is mesh.example's control server"
    );
}

#[test]
fn bad_flags_are_refused_with_the_reason() {
    let dir = TempDir::new("flags");
    for (args, expected) in [
        (&["--cert-ttl", "30s"][..], "too short"),
        (&["--cert-ttl", "5x"][..], "is not a duration"),
        (&["--trust-domain", "Bad Domain"][..], "trust domain"),
        (&["--ca-cert", "/nonexistent"][..], "--ca-key"),
    ] {
        let out = command(&dir.0, args).output().expect("run mesh-control");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn meshctl_sign_speaks_for_a_node() {
    let dir = TempDir::new("meshctl");
    let server = Server::start(&dir.0, &[]);
    server.apply_ok(&base()).await;
    std::fs::write(dir.0.join("n1.token"), "token-1\n").expect("token");
    let run = |args: &[&str]| {
        Command::new(bin("meshctl"))
            .arg("--control")
            .arg(format!("https://{}", server.grpc))
            .arg("--ca-bundle")
            .arg(&server.ca)
            .arg("--token-file")
            .arg(dir.0.join("n1.token"))
            .arg("sign")
            .args(args)
            .output()
            .expect("meshctl")
    };
    let ok = run(&["--identity", "spiffe://cluster.local/ns/default/sa/default"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("JSON");
    assert_eq!(
        v["identity"],
        "spiffe://cluster.local/ns/default/sa/default"
    );
    let refused = run(&["--identity", "spiffe://cluster.local/ns/shop/sa/cart"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(
            "PermissionDenied: node n1 may not obtain spiffe://cluster.local/ns/shop/sa/cart"
        ),
        "{stderr}"
    );
}

/// The agent's side without the kernel: discovery and the certificate
/// manager of node n1 against the real server.
#[tokio::test]
async fn an_agent_holds_certificates_for_its_workloads_and_follows_changes() {
    use mesh_agent::{
        certs::{self as manager, Manager},
        state::{
            Context,
            discovery::{self, Discovery},
        },
    };
    use std::sync::Arc;

    let dir = TempDir::new("agent");
    let server = Server::start(&dir.0, &[]);
    server.apply_ok(&base()).await;
    let cache = dir.0.join("n1-cache");
    let start = |addr: String, ca: &Path| {
        let connector = Arc::new(
            client::AgentConnector::new(
                &addr,
                "n1",
                TD,
                Some("token-1".into()),
                Some(ca.to_owned()),
            )
            .expect("connector"),
        );
        let (discovery, config, _) = Discovery::new(
            discovery::Settings {
                ctx: Context {
                    node: "n1".into(),
                    agent_ip: "198.19.1.1".parse().expect("ip"),
                    trust_domain: TD.into(),
                    node_addresses: Default::default(),
                    registry: Default::default(),
                },
                connector: connector.clone(),
                cache_dir: Some(cache.clone()),
            },
            Box::new(|_| Ok(())),
        )
        .expect("discovery");
        let settings = manager::Settings {
            node: "n1".into(),
            cache_dir: Some(cache.clone()),
        };
        let (manager, material, status) = Manager::new(settings, connector, config);
        let tasks = [tokio::spawn(discovery.run()), tokio::spawn(manager.run())];
        (material, status, tasks)
    };
    let status_of = |status: &manager::SharedStatus| status.lock().expect("status").clone();
    let wait = |status: manager::SharedStatus, want: Vec<&'static str>| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = status.lock().expect("status").clone();
            let held: Vec<&str> = s
                .certificates
                .iter()
                .filter(|c| c.not_after_unix.is_some())
                .map(|c| c.identity.as_str())
                .collect();
            if held == want && s.certificates.len() == want.len() && s.node.not_after_unix.is_some()
            {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waiting for {want:?}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    let (material, status, tasks) = start(format!("https://{}", server.grpc), &server.ca);
    let s = wait(
        status.clone(),
        vec!["spiffe://cluster.local/ns/default/sa/default"],
    )
    .await;
    assert_eq!(s.node.identity, node_id("n1").to_string());
    assert_eq!(s.node.source, Source::Control);
    assert_eq!(material.trust_domain, TD);
    let mut bundle = material.bundle.clone();
    let ca_pem = std::fs::read_to_string(&server.ca).expect("ca.crt");
    tokio::time::timeout(
        Duration::from_secs(10),
        bundle.wait_for(|b| b.as_deref() == Some(ca_pem.as_str())),
    )
    .await
    .expect("the distributed trust bundle")
    .expect("bundle channel open");
    let kept = cache.join("identity");
    assert_eq!(mode(&kept), 0o700);
    assert_eq!(mode(&kept.join("mesh-system.node-n1.key")), 0o600);
    assert_eq!(mode(&kept.join("default.default.key")), 0o600);
    // The stream authenticated with the node certificate.
    let log = std::fs::read_to_string(&server.log).expect("log");
    assert!(
        log.lines()
            .any(|l| l.contains("agent subscribed") && l.contains("via=node certificate")),
        "{log}"
    );

    // A new identity on n1 is fetched at once; one that goes away is dropped.
    server
        .apply_ok(&workload("cart-2", "shop", "cart", "n1", "198.18.1.11"))
        .await;
    wait(
        status.clone(),
        vec![
            "spiffe://cluster.local/ns/default/sa/default",
            "spiffe://cluster.local/ns/shop/sa/cart",
        ],
    )
    .await;
    client::operator(&Target::Unix(server.socket.clone()), None)
        .await
        .expect("operator")
        .delete(mesh_api::pb::DeleteRequest {
            kind: "workload".into(),
            namespace: "default".into(),
            name: "echo".into(),
        })
        .await
        .expect("delete");
    wait(
        status.clone(),
        vec!["spiffe://cluster.local/ns/shop/sa/cart"],
    )
    .await;
    assert!(!kept.join("default.default.key").exists());
    let before = status_of(&status);
    for t in tasks {
        t.abort();
    }

    // Restarted while the control server is unreachable: what was kept serves.
    let old_ca = server.ca.clone();
    drop(server);
    let (_, status, tasks) = start("https://127.0.0.1:1".into(), &old_ca);
    let s = status_of(&status);
    assert_eq!(s.node.source, Source::Cache, "{s:?}");
    assert_eq!(s.node.not_after_unix, before.node.not_after_unix);
    assert_eq!(s.certificates.len(), 1, "{s:?}");
    assert_eq!(s.certificates[0].source, Source::Cache);
    assert_eq!(
        s.certificates[0].not_after_unix,
        before.certificates[0].not_after_unix
    );
    for t in tasks {
        t.abort();
    }

    // A control server with a new CA (its store was lost): the node
    // certificate of the old CA gives way to the token, and every certificate
    // is replaced by one of the new CA.
    let other = TempDir::new("agent-new-ca");
    let server = Server::start(&other.0, &[]);
    server
        .apply_ok(&workload("cart-2", "shop", "cart", "n1", "198.18.1.11"))
        .await;
    let (material, status, tasks) = start(format!("https://{}", server.grpc), &server.ca);
    let new_ca = std::fs::read_to_string(&server.ca).expect("ca.crt");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let s = status_of(&status);
        let renewed = s.node.source == Source::Control
            && s.certificates.len() == 1
            && s.certificates[0].source == Source::Control;
        if renewed && material.bundle.borrow().as_deref() == Some(new_ca.as_str()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificates of the new CA: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kept = std::fs::read_to_string(cache.join("identity").join("shop.cart.crt")).expect("kept");
    assert!(mesh_api::identity::chains_to(&kept, &new_ca));
    for t in tasks {
        t.abort();
    }
}
