//! Workload identity on a real local cluster (3 nodes, 2 pods each): the
//! control server's CA, node authorization of signing requests, agents'
//! certificates for their local workloads, renewal at half-life and a
//! control-server outage. Each test asserts on what the agents' `/status`,
//! the control server and `meshctl sign` (run inside a node's netns with that
//! node's credentials) observed.
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Output,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use support::*;
use xtask::cluster::{Cluster, ClusterSpec};

const TD: &str = "cluster.local";
/// Generous deadline for agents to obtain their certificates.
const SETTLE: Duration = Duration::from_secs(15);

fn cluster_with(cert_ttl: Option<&str>) -> Option<Cluster> {
    if !privileged_env_ready() {
        return None;
    }
    let spec = ClusterSpec {
        cert_ttl: cert_ttl.map(str::to_owned),
        ..spec(3, 2)
    };
    Some(Cluster::up(&spec).expect("cluster up"))
}

/// A pod's identity as the cluster registers it (service account = pod name).
fn pod_identity(pod: &str) -> String {
    format!("spiffe://{TD}/ns/default/sa/{pod}")
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// The agent's `identity` block of `GET /status`.
fn identity(cluster: &Cluster, node: &str) -> Value {
    cluster.admin_get(node, "/status").expect("agent /status")["identity"].clone()
}

/// identity -> its entry in the `certificates` list.
fn certificates(status: &Value) -> BTreeMap<String, Value> {
    status["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| (c["identity"].as_str().unwrap_or("").to_owned(), c.clone()))
        .collect()
}

fn local_identities(cluster: &Cluster, node: &str) -> BTreeSet<String> {
    cluster
        .pods()
        .into_iter()
        .filter(|p| p.node == node)
        .map(|p| pod_identity(&p.name))
        .collect()
}

/// Waits until the node holds an unexpired certificate for every local
/// workload identity, and nothing else; returns the identity block.
fn wait_certificates(cluster: &Cluster, node: &str) -> Value {
    let want = local_identities(cluster, node);
    wait_for(
        &format!("{node} to hold certificates for {want:?}"),
        SETTLE,
        |last| {
            let status = identity(cluster, node);
            *last = status.to_string();
            let certs = certificates(&status);
            let held: BTreeSet<String> = certs
                .iter()
                .filter(|(_, c)| c["not_after_unix"].as_u64().is_some_and(|t| t > now_unix()))
                .map(|(id, _)| id.clone())
                .collect();
            (held == want && certs.len() == want.len()).then_some(status)
        },
    )
}

/// `meshctl --control <control> --ca-bundle <root> sign <args>`, run in
/// `node`'s netns (where the agent runs), as that node's agent would call.
fn meshctl_sign(cluster: &Cluster, node: &str, args: &[&str]) -> Output {
    let control = cluster.control_info().expect("a control plane");
    let mut cmd = cluster.node_command(node, xtask::cluster::default_meshctl_bin());
    cmd.arg("--control")
        .arg(control.url())
        .arg("--ca-bundle")
        .arg(cluster.ca_bundle().expect("a CA bundle"))
        .arg("sign")
        .args(args);
    cmd.output().expect("running meshctl sign")
}

#[test]
fn an_agent_that_asks_for_a_workload_on_another_node_is_refused() {
    let Some(cluster) = cluster_with(None) else {
        return;
    };
    let node1 = cluster.node("node1").clone();
    let token = node1.token_file.to_str().expect("utf-8 path").to_owned();
    wait_certificates(&cluster, "node1");
    let node_cert = node1
        .cache_dir
        .join("identity")
        .join("mesh-system.node-node1.crt");
    let node_key = node_cert.with_extension("key");
    assert!(
        node_cert.exists(),
        "the agent keeps its node certificate in its cache dir"
    );
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("exists").permissions().mode() & 0o777
    };
    assert_eq!(mode(&node_key), 0o600, "the node key is owner-only");
    let (cert, key) = (
        node_cert.to_str().expect("utf-8 path").to_owned(),
        node_key.to_str().expect("utf-8 path").to_owned(),
    );

    // node1's credentials, asking for node2-pod1's identity: refused, by
    // bootstrap token and by node certificate alike.
    let foreign = pod_identity("node2-pod1");
    for credentials in [
        vec!["--token-file", token.as_str()],
        vec!["--cert", cert.as_str(), "--key", key.as_str()],
    ] {
        let mut args = credentials.clone();
        args.extend(["--identity", foreign.as_str()]);
        let out = meshctl_sign(&cluster, "node1", &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{credentials:?}: node1 got {foreign}"
        );
        assert!(
            stderr.contains(&format!(
                "PermissionDenied: node node1 may not obtain {foreign}: no Workload on node node1 runs as it"
            )),
            "{credentials:?}: {stderr}"
        );

        // The same credentials get node1's own workload's.
        let mut own = credentials.clone();
        let id = pod_identity("node1-pod1");
        own.extend(["--identity", id.as_str()]);
        let out = meshctl_sign(&cluster, "node1", &own);
        assert!(
            out.status.success(),
            "{credentials:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let issued: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(issued["identity"], id);
    }

    // Nor may node1 take node2's node identity.
    let out = meshctl_sign(
        &cluster,
        "node1",
        &["--token-file", &token, "--node", "node2"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "PermissionDenied: node node1 may not obtain spiffe://{TD}/ns/mesh-system/sa/node-node2"
        )),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Counted by reason, and logged with the identity and the node.
    assert_eq!(
        control_metric(
            &cluster,
            "mesh_control_sign_refused_total{reason=\"not_on_node\"}"
        ),
        2
    );
    assert_eq!(
        control_metric(
            &cluster,
            "mesh_control_sign_refused_total{reason=\"other_node\"}"
        ),
        1
    );
    let log = cluster.control_log_tail(200);
    assert!(
        log.lines().any(|l| l.contains("refused a signing request")
            && l.contains("node=node1")
            && l.contains(&foreign)),
        "{log}"
    );
}

#[test]
fn every_agent_holds_a_certificate_for_each_local_workload() {
    let Some(cluster) = cluster_with(None) else {
        return;
    };
    let nodes: Vec<String> = cluster.nodes().into_iter().map(|n| n.name).collect();
    for node in &nodes {
        let status = wait_certificates(&cluster, node);
        assert_eq!(status["trust_domain"], TD, "{node}: {status}");
        assert_eq!(status["trust_bundle"], true, "{node}: {status}");
        let node_cert = &status["node"];
        assert_eq!(
            node_cert["identity"],
            format!("spiffe://{TD}/ns/mesh-system/sa/node-{node}"),
            "{node}: {status}"
        );
        assert!(
            node_cert["not_after_unix"]
                .as_u64()
                .is_some_and(|t| t > now_unix()),
            "{node}: {status}"
        );
        for (id, cert) in certificates(&status) {
            assert_eq!(cert["source"], "control", "{node} {id}: {cert}");
            assert_eq!(cert["last_error"], Value::Null, "{node} {id}: {cert}");
            // 24 h by default, renewed at half of it.
            let (not_after, next) = (
                cert["not_after_unix"].as_u64().expect("expiry"),
                cert["next_renewal_unix"].as_u64().expect("renewal"),
            );
            let left = not_after.saturating_sub(now_unix());
            assert!((23 * 3600..=24 * 3600).contains(&left), "{id}: {cert}");
            let to_renewal = next.saturating_sub(now_unix());
            assert!(
                (11 * 3600..=12 * 3600).contains(&to_renewal),
                "{id} renews at half-life: {cert}"
            );
        }
        assert_eq!(
            agent_metric(&cluster, node, "mesh_agent_certificates"),
            2,
            "{node}"
        );
    }
    assert_eq!(
        control_metric(
            &cluster,
            "mesh_control_certificates_issued_total{kind=\"node\"}"
        ),
        3
    );
    assert_eq!(
        control_metric(
            &cluster,
            "mesh_control_certificates_issued_total{kind=\"workload\"}"
        ),
        6
    );

    // Each agent's stream is authenticated by its node certificate.
    let log = cluster.control_log_tail(400);
    for node in &nodes {
        assert!(
            log.lines().any(|l| l.contains("agent subscribed")
                && l.contains(&format!("node={node}"))
                && l.contains("via=node certificate")),
            "{node} did not subscribe with its certificate:\n{log}"
        );
    }

    // A pod that goes away takes its certificate with it; a new one gets its own.
    let pod = cluster.pod("node3-pod2").clone();
    meshctl_ok(&cluster, &["delete", "workload", &pod.name]);
    let gone = pod_identity(&pod.name);
    wait_for(&format!("node3 to drop {gone}"), SETTLE, |last| {
        let status = identity(&cluster, "node3");
        *last = status.to_string();
        (!certificates(&status).contains_key(&gone)).then_some(())
    });
    cluster
        .apply(&cluster.workload_yaml(&pod.name, &[]))
        .expect("register again");
    wait_certificates(&cluster, "node3");
}

#[test]
fn certificates_renew_at_half_life_and_outlive_a_control_server_outage() {
    let Some(mut cluster) = cluster_with(Some("2m")) else {
        return;
    };
    let node = "node1";
    let first = certificates(&wait_certificates(&cluster, node));
    let id = pod_identity("node1-pod1");
    let issued = &first[&id];
    let not_after = issued["not_after_unix"].as_u64().expect("expiry");
    let lifetime = not_after.saturating_sub(now_unix());
    assert!((100..=120).contains(&lifetime), "2 minutes: {issued}");

    // Renewed at half-life: a later expiry, without an error.
    let renewed = wait_for(
        &format!("{id} to be renewed"),
        Duration::from_secs(90),
        |last| {
            let certs = certificates(&identity(&cluster, node));
            let c = certs.get(&id)?.clone();
            *last = c.to_string();
            (c["not_after_unix"].as_u64()? > not_after).then_some(c)
        },
    );
    assert_eq!(renewed["last_error"], Value::Null, "{renewed}");
    assert!(renewed["renewals"].as_u64() >= Some(2), "{renewed}");
    assert!(
        agent_metric(
            &cluster,
            node,
            "mesh_agent_cert_renewals_total{result=\"success\"}"
        ) >= 4
    );

    // The control server goes away: renewal fails, is retried and reported,
    // and the unexpired certificate stays.
    cluster.stop_control().expect("stop control");
    let held_until = renewed["not_after_unix"].as_u64().expect("expiry");
    let failing = wait_for(
        &format!("{node} to report failed renewals of {id}"),
        Duration::from_secs(90),
        |last| {
            let certs = certificates(&identity(&cluster, node));
            let c = certs.get(&id)?.clone();
            *last = c.to_string();
            (c["failures"].as_u64()? >= 2).then_some(c)
        },
    );
    assert_eq!(
        failing["not_after_unix"].as_u64(),
        Some(held_until),
        "the certificate held keeps serving: {failing}"
    );
    assert!(held_until > now_unix(), "{failing}");
    assert!(failing["last_error"].is_string(), "{failing}");
    assert!(
        agent_metric(
            &cluster,
            node,
            "mesh_agent_cert_renewals_total{result=\"failure\"}"
        ) >= 2
    );
    assert_eq!(agent_metric(&cluster, node, "mesh_agent_certificates"), 2);

    // An agent restarted during the outage serves the certificates it kept.
    cluster.stop_agent(node).expect("stop agent");
    cluster.start_agent(node).expect("start agent");
    let reloaded = certificates(&identity(&cluster, node));
    let c = &reloaded[&id];
    assert_eq!(c["source"], "cache", "{c}");
    assert_eq!(c["not_after_unix"].as_u64(), Some(held_until), "{c}");

    // Back: renewed again.
    cluster.start_control().expect("start control");
    let back = wait_for(
        &format!("{id} to be renewed after the outage"),
        Duration::from_secs(60),
        |last| {
            let certs = certificates(&identity(&cluster, node));
            let c = certs.get(&id)?.clone();
            *last = c.to_string();
            (c["not_after_unix"].as_u64()? > held_until && c["source"] == "control").then_some(c)
        },
    );
    assert_eq!(back["failures"], 0, "{back}");
    assert_eq!(back["last_error"], Value::Null, "{back}");
}
