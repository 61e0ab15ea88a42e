//! Mutual TLS between node agents on a real local cluster (3 nodes, 2 pods
//! each): what crosses the wire, who is refused and why, and how many
//! handshakes pooled traffic costs.
mod support;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use mesh_api::identity::{Ca, SpiffeId, generate_key_and_csr};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;
use xtask::cluster::Cluster;

const TD: &str = "cluster.local";
const PROBE: &str = env!("CARGO_BIN_EXE_mesh-tls-probe");

fn pod_id(pod: &str) -> SpiffeId {
    SpiffeId::new(TD, "default", pod).expect("pods' service accounts are their names")
}

/// Kills a background process (and waits for it) however the test ends.
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// tcpdump on node1's port of the fabric bridge: every byte node1 exchanges
/// with other nodes. (On the bridge device itself only traffic addressed to
/// the bridge shows.)
fn capture(cluster: &Cluster, file: &Path) -> Bg {
    let mut child = cluster
        .fabric_command("tcpdump")
        .args(["-i", "n1", "--immediate-mode", "-U", "-n", "-s", "0", "-w"])
        .arg(file)
        .arg("tcp")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (installed by cargo xtask test)");
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("piped"))
        .read_line(&mut line)
        .expect("tcpdump banner");
    assert!(line.contains("listening"), "tcpdump did not start: {line}");
    Bg(child)
}

fn packets(cluster: &Cluster, file: &Path, filter: &str) -> usize {
    let out = cluster
        .fabric_command("tcpdump")
        .args(["-n", "-r"])
        .arg(file)
        .arg(filter)
        .output()
        .expect("tcpdump -r");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn handshakes(cluster: &Cluster, node: &str, direction: &str, result: &str) -> u64 {
    agent_metric(
        cluster,
        node,
        &format!(
            "mesh_agent_tunnel_handshakes_total{{direction=\"{direction}\",result=\"{result}\"}}"
        ),
    )
}

#[test]
fn only_tls_records_cross_the_link_between_nodes() {
    let Some(cluster) = cluster() else { return };
    let _server = serve(&cluster, "node2-pod1");
    let pcap = cluster.state_dir().join("link.pcap");
    let tcpdump = capture(&cluster, &pcap);
    const MARKER: &str = "MESH-CLEARTEXT-MARKER-5f1e";
    let url = format!(
        "http://{}/{MARKER}",
        addr(cluster.pod("node2-pod1").ip, HTTP_PORT)
    );
    let report = client_ok(
        &cluster,
        "node1-pod1",
        &["http", "--url", &url, "--count", "20"],
    );
    assert_eq!(report["ok"], 20, "{report}");
    let report = client_ok(
        &cluster,
        "node1-pod1",
        &["http", "--url", &url, "--post-bytes", "100000"],
    );
    assert_eq!(report["ok"], 1, "{report}");
    // SIGINT: tcpdump writes out what it holds and exits.
    // SAFETY: plain kill(2) on a child we started.
    unsafe { libc::kill(tcpdump.0.id() as i32, libc::SIGINT) };
    let mut tcpdump = tcpdump;
    let _ = tcpdump.0.wait();

    let raw = std::fs::read(&pcap).expect("capture file");
    let tunnel_packets = packets(&cluster, &pcap, "tcp port 15008");
    assert!(
        tunnel_packets > 10,
        "the capture must hold the tunnel's traffic: {tunnel_packets} packets on 15008, {} in all, {} bytes",
        packets(&cluster, &pcap, "tcp"),
        raw.len()
    );
    assert_eq!(
        packets(&cluster, &pcap, "tcp port 8080"),
        0,
        "the workload's plaintext port never appears between nodes"
    );
    assert!(
        !raw.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "the marker the client sent crossed the link in clear"
    );
}

#[test]
fn pooled_connections_cost_one_handshake_per_identity_pair() {
    let Some(cluster) = cluster() else { return };
    let _server = serve(&cluster, "node2-pod1");
    let dst = addr(cluster.pod("node2-pod1").ip, ECHO_PORT);
    let (before_out, before_in) = (
        handshakes(&cluster, "node1", "outbound", "ok"),
        handshakes(&cluster, "node2", "inbound", "ok"),
    );
    // 10,000 connections, each its own CONNECT stream, from two source pods.
    for round in 0..10 {
        for pod in ["node1-pod1", "node1-pod2"] {
            let report = client_ok(
                &cluster,
                pod,
                &[
                    "concurrent",
                    "--addr",
                    &dst,
                    "--conns",
                    "500",
                    "--bytes",
                    "100",
                ],
            );
            assert_eq!(report["ok"], 500, "round {round} from {pod}: {report}");
        }
    }
    assert_eq!(
        handshakes(&cluster, "node1", "outbound", "ok") - before_out,
        2,
        "one handshake per (source identity, destination node)"
    );
    assert_eq!(
        handshakes(&cluster, "node2", "inbound", "ok") - before_in,
        2
    );
    assert!(
        agent_metric(
            &cluster,
            "node2",
            "mesh_agent_inbound_streams_total{result=\"forwarded\"}"
        ) >= 10_000
    );
}

/// A key and certificate chain written as PEM files for the probe.
struct Pem {
    cert: PathBuf,
    key: PathBuf,
}

fn write_pem(dir: &Path, name: &str, chain: &str, key: &PrivateKeyDer<'_>) -> Pem {
    let (cert, key_path) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, chain).unwrap();
    let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", key.secret_der().to_vec()));
    std::fs::write(&key_path, key_pem).unwrap();
    Pem {
        cert,
        key: key_path,
    }
}

fn issue(
    ca: &Ca,
    id: &SpiffeId,
    validity: Option<(std::time::SystemTime, std::time::SystemTime)>,
) -> (String, PrivateKeyDer<'static>) {
    let (key, csr) = generate_key_and_csr(id).expect("csr");
    let issued = match validity {
        Some((nb, na)) => ca.sign_csr_with_validity(csr.as_bytes(), id, nb, na),
        None => ca.sign_csr(csr.as_bytes(), id, Duration::from_secs(3600)),
    }
    .expect("sign");
    (issued.cert_chain_pem, key)
}

fn self_signed(id: &SpiffeId) -> (String, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(id.to_string()).expect("uri"),
    )];
    let cert = params.self_signed(&key).expect("self-signed");
    let der = PrivatePkcs8KeyDer::from(key.serialize_der());
    (cert.pem(), PrivateKeyDer::Pkcs8(der))
}

/// The mesh's real CA, as mesh-control keeps it, to mint certificates the
/// agents' policies must still refuse.
fn mesh_ca(cluster: &Cluster) -> Ca {
    let bundle = cluster.ca_bundle().expect("a control plane with a CA");
    Ca::load(bundle.parent().expect("ca dir"), TD).expect("load the mesh CA")
}

#[test]
fn peers_with_bad_certificates_are_refused_and_counted_by_reason() {
    let Some(cluster) = cluster() else { return };
    let dir = cluster.state_dir().join("bad-certs");
    std::fs::create_dir_all(&dir).unwrap();
    let bundle = cluster.ca_bundle().expect("bundle");
    let ca = mesh_ca(&cluster);
    let client_id = pod_id("node1-pod1");
    let past = std::time::SystemTime::now() - Duration::from_secs(7200);
    let cases: Vec<(&str, (String, PrivateKeyDer<'static>))> = vec![
        ("self-signed", self_signed(&client_id)),
        (
            "other-ca",
            issue(&Ca::generate(TD).unwrap(), &client_id, None),
        ),
        (
            "expired",
            issue(
                &ca,
                &client_id,
                Some((past, past + Duration::from_secs(600))),
            ),
        ),
    ];
    let node2_tunnel = format!("{}:15008", cluster.node_ip("node2"));
    let before = (
        handshakes(&cluster, "node2", "inbound", "unknown_ca"),
        handshakes(&cluster, "node2", "inbound", "expired"),
    );
    for (name, (chain, key)) in &cases {
        let pem = write_pem(&dir, name, chain, key);
        let out = cluster
            .node_command("node1", PROBE)
            .args(["connect", "--addr", &node2_tunnel])
            .args(["--expect", &pod_id("node2-pod1").to_string()])
            .arg("--cert")
            .arg(&pem.cert)
            .arg("--key")
            .arg(&pem.key)
            .arg("--bundle")
            .arg(&bundle)
            .output()
            .expect("probe");
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        assert_eq!(
            report["ok"], false,
            "{name}: node2 must refuse it: {report}"
        );
    }
    assert_eq!(
        handshakes(&cluster, "node2", "inbound", "unknown_ca") - before.0,
        2,
        "self-signed and foreign-CA certificates"
    );
    assert_eq!(
        handshakes(&cluster, "node2", "inbound", "expired") - before.1,
        1
    );

    // A server with a valid certificate for the wrong identity: node1's agent
    // expects the destination workload's identity and refuses it.
    let impostor = {
        let (chain, key) = issue(&ca, &pod_id("impostor"), None);
        write_pem(&dir, "impostor", &chain, &key)
    };
    let fake = cluster
        .fabric_command(PROBE)
        .args(["serve", "--listen", "198.18.0.2:15008"])
        .arg("--cert")
        .arg(&impostor.cert)
        .arg("--key")
        .arg(&impostor.key)
        .arg("--bundle")
        .arg(&bundle)
        .stdout(Stdio::piped())
        .spawn()
        .expect("fake peer");
    let mut fake = Bg(fake);
    let mut line = String::new();
    BufReader::new(fake.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("ready"), "{line}");
    cluster
        .apply(&yaml_stream(&[
            "apiVersion: mesh.dev/v1alpha1\nkind: Node\nmetadata: {name: node9}\nspec: {address: 198.18.0.2}\n",
            "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: ghost, namespace: default}\nspec: {node: node9, ip: 198.19.9.9, serviceAccount: ghost}\n",
        ]))
        .expect("register the fake node");
    let before = handshakes(&cluster, "node1", "outbound", "wrong_identity");
    wait_for(
        "node1 to refuse the impostor",
        Duration::from_secs(10),
        |last| {
            let run = client(
                &cluster,
                "node1-pod1",
                &["tcp", "--addr", "198.19.9.9:7000", "--timeout-secs", "3"],
            );
            assert!(!run.ok, "a connection through an impostor must fail");
            let n = handshakes(&cluster, "node1", "outbound", "wrong_identity");
            *last = format!("wrong_identity {n}");
            (n > before).then_some(())
        },
    );
}

/// node1-pod1's certificate expiry as node1's agent reports it.
fn not_after(cluster: &Cluster, node: &str, pod: &str) -> Option<u64> {
    let status = cluster.admin_get(node, "/status").expect("agent /status");
    let id = pod_id(pod).to_string();
    status["identity"]["certificates"]
        .as_array()?
        .iter()
        .find(|c| c["identity"] == id.as_str())?["not_after_unix"]
        .as_u64()
}

#[test]
fn certificates_rotate_under_continuous_traffic_without_a_failure() {
    if !privileged_env_ready() {
        return;
    }
    let mut spec = spec(3, 2);
    spec.cert_ttl = Some("1m".into());
    let cluster = Cluster::up(&spec).expect("cluster up");
    let _server = serve(&cluster, "node2-pod1");
    let dst = addr(cluster.pod("node2-pod1").ip, ECHO_PORT);
    let first = wait_for("node1-pod1's certificate", Duration::from_secs(10), |_| {
        not_after(&cluster, "node1", "node1-pod1")
    });
    // One connection that stays open across the rotation...
    let long = cluster
        .command("node1-pod1", TESTAPP)
        .args([
            "pingpong", "--addr", &dst, "--count", "600000", "--warmup", "0",
        ])
        // Bounded by rounds, not time: it ends when they are done (2 minutes
        // or so), and the deadline only stops a hung run.
        .args(["--timeout-secs", "400"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("long-lived client");
    // ...and new connections all along, until the certificate has been renewed
    // and a few seconds more.
    let start = std::time::Instant::now();
    let mut renewed_at = None;
    let mut calls = 0;
    while renewed_at.is_none_or(|t: std::time::Instant| t.elapsed() < Duration::from_secs(3)) {
        assert!(
            start.elapsed() < Duration::from_secs(75),
            "no renewal within 75 s"
        );
        let report = client_ok(
            &cluster,
            "node1-pod1",
            &["tcp", "--addr", &dst, "--bytes", "2048"],
        );
        assert_eq!(report["ok"], true, "call {calls} during rotation: {report}");
        calls += 1;
        if renewed_at.is_none()
            && not_after(&cluster, "node1", "node1-pod1").is_some_and(|n| n > first)
        {
            renewed_at = Some(std::time::Instant::now());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = long.wait_with_output().expect("long-lived client");
    assert!(
        out.status.success(),
        "the connection open across the rotation must survive: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(calls > 20, "{calls} calls");
}

#[test]
fn strict_permissive_and_disable_decide_who_may_connect_in_plaintext() {
    let Some(cluster) = cluster() else { return };
    let server = serve(&cluster, "node2-pod1");
    let dst = addr(cluster.pod("node2-pod1").ip, ECHO_PORT);
    // node1-pod1 outside the mesh (plaintext, straight to the pod);
    // node1-pod2 inside it.
    cluster.unenroll("node1-pod1").expect("unenroll");
    let plaintext = |timeout: &str| {
        client(
            &cluster,
            "node1-pod1",
            &["tcp", "--addr", &dst, "--timeout-secs", timeout],
        )
    };

    // STRICT (the default): only node2's agent may open connections into it.
    let refused_before = decision(&cluster, "node2", "strict_refused");
    assert!(
        !plaintext("2").ok,
        "a STRICT workload must refuse plaintext"
    );
    assert!(decision(&cluster, "node2", "strict_refused") > refused_before);
    let report = client_ok(&cluster, "node1-pod2", &["tcp", "--addr", &dst]);
    assert_eq!(
        report["server"], "node2-pod1",
        "mTLS through the agents still works"
    );

    // PERMISSIVE: plaintext too, handed to node2's agent (which judges it
    // at :15006 and carries it: the pod sees its agent as the peer).
    set_mtls_mode(&cluster, "node2-pod1", "PERMISSIVE");
    let plaintext_carried = || {
        agent_metric(
            &cluster,
            "node2",
            r#"mesh_agent_inbound_plaintext_connections_total{result="forwarded"}"#,
        )
    };
    let carried = plaintext_carried();
    wait_for("plaintext to be let in", Duration::from_secs(10), |last| {
        let run = plaintext("1");
        *last = run.stderr.clone();
        run.ok.then_some(())
    });
    assert!(
        plaintext_carried() > carried,
        "judged and carried at :15006"
    );
    assert_eq!(
        server.peers().last(),
        Some(&cluster.gateway_ip("node2")),
        "the plaintext client reached the pod through its agent"
    );

    // DISABLE: mesh clients connect without the tunnel (node1's agent dials
    // the pod in plaintext, and node2's agent judges and carries that too).
    set_mtls_mode(&cluster, "node2-pod1", "DISABLE");
    wait_for(
        "node1's agent to stop tunnelling",
        Duration::from_secs(10),
        |last| {
            let carried = plaintext_carried();
            client_ok(&cluster, "node1-pod2", &["tcp", "--addr", &dst]);
            *last = format!("{:?}", server.peers());
            (plaintext_carried() > carried).then_some(())
        },
    );
}
