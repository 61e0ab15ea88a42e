//! The control plane on a real local cluster (3 nodes, 2 pods each): Services by
//! virtual IP, endpoint changes, refusals, control-server restarts and outages,
//! validation of bad input, and rejections by an agent. Each test asserts on what
//! the agents, the test servers and `meshctl` observed.
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;
use xtask::cluster::Cluster;

const VIP: &str = "198.18.100.1";
const VIP_PORT: u16 = 80;
const CLIENT: &str = "node1-pod1";
/// How long a configuration change may take to reach the data path.
const CONVERGENCE: Duration = Duration::from_secs(1);
/// Generous deadline for one-off waits (agents connecting, first sync).
const SETTLE: Duration = Duration::from_secs(10);

fn vip_addr() -> String {
    format!("{VIP}:{VIP_PORT}")
}

/// One short echo call from `pod` to `addr`.
fn call(cluster: &Cluster, pod: &str, addr: &str) -> ClientRun {
    client(
        cluster,
        pod,
        &[
            "tcp",
            "--addr",
            addr,
            "--bytes",
            "64",
            "--timeout-secs",
            "2",
        ],
    )
}

/// The pod that answered a call to the echo VIP from [`CLIENT`], if it succeeded.
fn call_vip(cluster: &Cluster) -> Option<String> {
    let run = call(cluster, CLIENT, &vip_addr());
    run.ok
        .then(|| run.report["server"].as_str().map(str::to_owned))
        .flatten()
}

/// The pod's Workload with `role: echo` (an endpoint of `echo`).
fn endpoint_doc(cluster: &Cluster, pod: &str) -> String {
    cluster.workload_yaml(pod, &[("role", "echo")])
}

/// Service `echo` (VIP:80 -> 7000, selector `role: echo`).
fn echo_service() -> String {
    service_yaml(
        "echo",
        VIP,
        VIP_PORT.into(),
        ECHO_PORT.into(),
        &[("role", "echo")],
    )
}

/// Applies `echo` with `endpoints` labelled, in one apply.
fn apply_echo(cluster: &Cluster, endpoints: &[&str]) {
    let mut docs = vec![echo_service()];
    docs.extend(endpoints.iter().map(|p| endpoint_doc(cluster, p)));
    cluster.apply(&yaml_stream(&docs)).expect("apply echo");
}

/// Waits until consecutive calls to the VIP from [`CLIENT`] are answered by
/// exactly `endpoints` (round robin: any `n` calls in a row reach all `n`).
fn wait_serving(cluster: &Cluster, endpoints: &[&str], timeout: Duration) {
    let want: BTreeSet<String> = endpoints.iter().map(|s| (*s).to_owned()).collect();
    let mut window: Vec<Option<String>> = Vec::new();
    wait_for(
        &format!("{CLIENT} -> {VIP}:{VIP_PORT} to reach exactly {want:?}"),
        timeout,
        |last| {
            window.push(call_vip(cluster));
            if window.len() > want.len() {
                window.remove(0);
            }
            *last = format!("last calls answered by {window:?}");
            let seen: BTreeSet<String> = window.iter().flatten().cloned().collect();
            (window.len() == want.len() && window.iter().all(Option::is_some) && seen == want)
                .then_some(())
        },
    );
}

/// Starts test servers in `pods`, applies `echo` over them, waits until it serves.
fn echo_over(cluster: &Cluster, pods: &[&str]) -> Vec<Server> {
    let servers = pods.iter().map(|p| serve(cluster, p)).collect();
    apply_echo(cluster, pods);
    wait_serving(cluster, pods, SETTLE);
    servers
}

fn endpoint_addr(cluster: &Cluster, pod: &str) -> String {
    addr(cluster.pod(pod).ip, ECHO_PORT)
}

fn nodes(cluster: &Cluster) -> Vec<String> {
    cluster.nodes().into_iter().map(|n| n.name).collect()
}

/// Waits until every agent is connected and serves the store's revision; returns
/// each agent's sync state.
fn wait_agents_synced(cluster: &Cluster) -> BTreeMap<String, Value> {
    let revision = control_metric(cluster, "mesh_control_store_revision");
    nodes(cluster)
        .into_iter()
        .map(|n| {
            let s = wait_for(
                &format!("{n} to serve revision {revision}"),
                SETTLE,
                |last| {
                    let s = sync_state(cluster, &n);
                    *last = s.to_string();
                    (s["connected"] == true && version_number(&s["version"]) == revision)
                        .then_some(s)
                },
            );
            (n, s)
        })
        .collect()
}

/// A store or agent version as a number, for "unchanged or newer".
fn version_number(v: &Value) -> u64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_u64())
        .unwrap_or_else(|| panic!("version {v} is not a number"))
}

#[test]
fn pods_call_a_service_by_vip_and_are_spread_over_endpoints_on_several_nodes() {
    let Some(cluster) = cluster() else { return };
    let endpoints = ["node1-pod2", "node2-pod1", "node3-pod1"];
    let servers = echo_over(&cluster, &endpoints);
    // Records of the calls below only, not of those that waited for the Service.
    let seen_before = agent_connections(&cluster, "node1")
        .iter()
        .filter_map(|c| c["id"].as_u64())
        .max()
        .unwrap_or(0);

    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..30 {
        let run = call(&cluster, CLIENT, &vip_addr());
        assert!(run.ok, "call {i} to the VIP failed: {}", run.stderr);
        let server = run.report["server"]
            .as_str()
            .expect("server name")
            .to_owned();
        *answered.entry(server).or_default() += 1;
    }
    let expect: BTreeMap<String, usize> = endpoints.iter().map(|p| ((*p).to_owned(), 10)).collect();
    assert_eq!(answered, expect, "round robin over the three endpoints");

    // What node1's agent recorded: the Service and the endpoint it chose.
    let addrs: BTreeSet<String> = endpoints
        .iter()
        .map(|p| endpoint_addr(&cluster, p))
        .collect();
    let records: Vec<Value> = agent_connections(&cluster, "node1")
        .into_iter()
        .filter(|c| c["id"].as_u64().is_some_and(|id| id > seen_before))
        .collect();
    assert_eq!(records.len(), 30, "one record per call: {records:?}");
    let mut upstreams = BTreeSet::new();
    for rec in &records {
        assert_eq!(rec["service"], "default/echo", "{rec}");
        assert_eq!(rec["src_pod"], CLIENT, "{rec}");
        assert_eq!(rec["orig_dst"], vip_addr().as_str(), "{rec}");
        let upstream = rec["upstream"]
            .as_str()
            .unwrap_or_else(|| panic!("no upstream: {rec}"));
        assert!(
            addrs.contains(upstream),
            "upstream {upstream} is not an endpoint of echo"
        );
        upstreams.insert(upstream.to_owned());
    }
    assert_eq!(upstreams, addrs, "every endpoint was chosen");

    // What the servers saw: an agent, never the client pod. On node1 it is
    // node1's agent; across nodes it is the destination node's agent, which
    // took the connection out of the mTLS tunnel.
    for server in &servers {
        let expect_peer = cluster.gateway_ip(&cluster.pod(&server.name).node);
        let entries = server.wait_for_entries(10);
        assert!(entries.len() >= 10, "{}: {entries:?}", server.name);
        assert!(
            server.peers().iter().all(|p| *p == expect_peer),
            "{}: peers {:?}, expected an agent at {expect_peer}",
            server.name,
            server.peers()
        );
    }
}

#[test]
fn adding_or_removing_an_endpoint_changes_where_new_connections_go_within_a_second() {
    let Some(cluster) = cluster() else { return };
    let servers = echo_over(&cluster, &["node1-pod2", "node2-pod1", "node3-pod1"]);
    let newcomer = serve(&cluster, "node2-pod2");

    // Removal: node3-pod1 loses its label.
    let start = Instant::now();
    cluster
        .apply(&cluster.workload_yaml("node3-pod1", &[]))
        .expect("unlabel node3-pod1");
    // Round robin over the three old endpoints reaches node3-pod1 in any three
    // calls in a row. So in a run of calls that avoid it, the third was surely
    // served by the new configuration: its end bounds the time the change took.
    let mut calls: Vec<(Duration, Duration, Option<String>)> = Vec::new();
    let converged = wait_for(
        "node3-pod1 to stop receiving",
        Duration::from_secs(5),
        |last| {
            let before = start.elapsed();
            let server = call_vip(&cluster);
            calls.push((before, start.elapsed(), server));
            *last = format!("calls since the apply (start, end, server): {calls:?}");
            let streak = calls
                .iter()
                .rev()
                .take_while(|(_, _, s)| s.as_deref().is_some_and(|s| s != "node3-pod1"))
                .count();
            (streak >= 6).then(|| calls[calls.len() - streak + 2].1)
        },
    );
    eprintln!("removing an endpoint took effect after {converged:?}");
    assert!(
        converged < CONVERGENCE,
        "removing an endpoint took {converged:?} to take effect; calls: {calls:?}"
    );
    let node3 = servers
        .iter()
        .find(|s| s.name == "node3-pod1")
        .expect("server");
    let seen_by_node3 = node3.log_entries().len();
    for _ in 0..6 {
        assert_ne!(call_vip(&cluster).as_deref(), Some("node3-pod1"));
    }
    assert_eq!(
        node3.log_entries().len(),
        seen_by_node3,
        "no new connection reached the removed endpoint"
    );

    // Addition: node2-pod2 gains the label.
    let start = Instant::now();
    cluster
        .apply(&endpoint_doc(&cluster, "node2-pod2"))
        .expect("label node2-pod2");
    let mut calls = Vec::new();
    let reached = wait_for(
        "node2-pod2 to start receiving",
        Duration::from_secs(5),
        |last| {
            let server = call_vip(&cluster);
            let end = start.elapsed();
            calls.push((end, server.clone()));
            *last = format!("calls since the apply (end, server): {calls:?}");
            (server.as_deref() == Some("node2-pod2")).then_some(end)
        },
    );
    eprintln!("adding an endpoint took effect after {reached:?}");
    assert!(
        reached < CONVERGENCE,
        "adding an endpoint took {reached:?} to take effect; calls: {calls:?}"
    );
    assert!(
        !newcomer.wait_for_entries(1).is_empty(),
        "the new endpoint's server saw it"
    );
    wait_serving(
        &cluster,
        &["node1-pod2", "node2-pod1", "node2-pod2"],
        CONVERGENCE,
    );
}

#[test]
fn unowned_vip_ports_are_refused_and_services_without_ready_endpoints_fail() {
    let Some(cluster) = cluster() else { return };
    let _servers = echo_over(&cluster, &["node2-pod1"]);

    // A port of the VIP that no Service owns: the kernel refuses the connect.
    let before = decision(&cluster, "node1", "no_service_port");
    let unowned = format!("{VIP}:81");
    let run = call(&cluster, CLIENT, &unowned);
    assert!(!run.ok, "a call to {unowned} must fail: {}", run.report);
    assert!(
        run.stderr.to_lowercase().contains("refused"),
        "the client must see a refusal: {}",
        run.stderr
    );
    assert_eq!(decision(&cluster, "node1", "no_service_port") - before, 1);
    assert!(
        agent_connections(&cluster, "node1")
            .iter()
            .all(|c| c["orig_dst"] != unowned.as_str()),
        "the kernel refused it: the agent never saw the connection"
    );

    // A Service whose only endpoint is not ready.
    let idle_vip = "198.18.100.2:80";
    let standby = cluster
        .workload_yaml("node2-pod2", &[("role", "standby")])
        .replace("ready: true", "ready: false");
    cluster
        .apply(&yaml_stream(&[
            service_yaml(
                "idle",
                "198.18.100.2",
                80,
                ECHO_PORT.into(),
                &[("role", "standby")],
            ),
            standby,
        ]))
        .expect("apply idle");
    let counted_before = agent_metric(
        &cluster,
        "node1",
        "mesh_agent_outbound_connections_total{result=\"no_ready_endpoint\"}",
    );
    let record = wait_for("a no-ready-endpoint failure at node1", SETTLE, |last| {
        let run = call(&cluster, CLIENT, idle_vip);
        assert!(!run.ok, "a call to {idle_vip} must fail: {}", run.report);
        let rec = agent_connections(&cluster, "node1")
            .into_iter()
            .find(|c| c["orig_dst"] == idle_vip)?;
        *last = rec.to_string();
        rec["error"]
            .as_str()
            .is_some_and(|e| e.contains("no ready endpoint"))
            .then_some(rec)
    });
    assert_eq!(record["src_pod"], CLIENT, "{record}");
    assert!(
        record["error"].as_str().unwrap().contains("default/idle"),
        "{record}"
    );
    let counted = agent_metric(
        &cluster,
        "node1",
        "mesh_agent_outbound_connections_total{result=\"no_ready_endpoint\"}",
    );
    assert!(
        counted > counted_before,
        "counted by reason: {counted_before} -> {counted}"
    );
}

#[test]
fn restarting_the_control_server_loses_nothing_and_agents_resync() {
    let Some(mut cluster) = cluster() else { return };
    let endpoints = ["node1-pod2", "node2-pod1", "node3-pod1"];
    let _servers = echo_over(&cluster, &endpoints);
    let before = stored_config(&cluster);
    assert_eq!(
        before["services"].as_array().map(Vec::len),
        Some(1),
        "{before}"
    );
    assert_eq!(
        before["workloads"].as_array().map(Vec::len),
        Some(6),
        "{before}"
    );
    let synced = wait_agents_synced(&cluster);

    cluster.stop_control().expect("stop control");
    assert!(cluster.control_pid().is_none());
    for node in synced.keys() {
        wait_for(&format!("{node} to notice the outage"), SETTLE, |last| {
            let s = sync_state(&cluster, node);
            *last = s.to_string();
            (s["connected"] == false).then_some(())
        });
    }
    cluster.start_control().expect("start control");

    assert_eq!(
        stored_config(&cluster),
        before,
        "the store survived the restart"
    );
    for (node, was) in &synced {
        let now = wait_for(&format!("{node} to resubscribe"), SETTLE, |last| {
            let s = sync_state(&cluster, node);
            *last = s.to_string();
            (s["connected"] == true).then_some(s)
        });
        assert!(
            version_number(&now["version"]) >= version_number(&was["version"]),
            "{node}: version went back from {} to {}",
            was["version"],
            now["version"]
        );
        assert_eq!(now["source"], "control", "{node}: {now}");
        assert_eq!(
            now["resources"], was["resources"],
            "{node}: nothing lost: {now}"
        );
        assert!(now["last_error"].is_null(), "{node}: {now}");
    }
    wait_serving(&cluster, &endpoints, SETTLE);

    // The resync sent nothing the agents already held.
    assert_eq!(control_metric(&cluster, "mesh_control_connected_agents"), 3);
    assert_eq!(
        control_metric(&cluster, "mesh_control_response_bytes_total"),
        0,
        "agents resubscribed without a reload of unchanged state"
    );
    let agents: Value =
        serde_json::from_str(&meshctl_ok(&cluster, &["agents", "--json"])).expect("agents JSON");
    for agent in agents.as_array().expect("a list of agents") {
        assert_eq!(agent["connected"], true, "{agent}");
        assert_eq!(
            agent["acked_version"],
            synced[agent["node"].as_str().unwrap()]["version"]
        );
    }
}

#[test]
fn with_the_control_server_stopped_traffic_flows_and_a_restarted_agent_serves_from_its_cache() {
    let Some(mut cluster) = cluster() else { return };
    let endpoints = ["node1-pod2", "node2-pod1", "node3-pod1"];
    let _servers = echo_over(&cluster, &endpoints);
    let served = wait_agents_synced(&cluster)["node1"].clone();
    assert_eq!(served["source"], "control", "{served}");

    cluster.stop_control().expect("stop control");
    wait_for("node1 to notice the outage", SETTLE, |last| {
        let s = sync_state(&cluster, "node1");
        *last = s.to_string();
        (s["connected"] == false).then_some(())
    });
    // Still served from the last configuration: every call, every endpoint.
    let answered: BTreeSet<String> = (0..6)
        .map(|i| call_vip(&cluster).unwrap_or_else(|| panic!("call {i} during the outage failed")))
        .collect();
    assert_eq!(answered.len(), endpoints.len(), "{answered:?}");

    // An agent restarted during the outage serves its cached configuration.
    cluster.stop_agent("node1").expect("stop agent");
    cluster.start_agent("node1").expect("start agent");
    let cached = sync_state(&cluster, "node1");
    assert_eq!(cached["source"], "cache", "{cached}");
    assert_eq!(cached["connected"], false, "{cached}");
    assert_eq!(cached["version"], served["version"], "{cached}");
    assert_eq!(cached["resources"], served["resources"], "{cached}");
    let answered: BTreeSet<String> = (0..3)
        .map(|i| {
            call_vip(&cluster)
                .unwrap_or_else(|| panic!("call {i} after the restart during the outage failed"))
        })
        .collect();
    assert_eq!(answered.len(), endpoints.len(), "{answered:?}");

    // And it subscribes again once the control server is back.
    cluster.start_control().expect("start control");
    let back = wait_for("node1 to resubscribe", SETTLE, |last| {
        let s = sync_state(&cluster, "node1");
        *last = s.to_string();
        (s["connected"] == true && s["source"] == "control").then_some(s)
    });
    assert!(version_number(&back["version"]) >= version_number(&served["version"]));
    wait_serving(&cluster, &endpoints, SETTLE);
}

/// `meshctl apply -f FILE` of `yaml` must exit non-zero with a message containing
/// every one of `expect`, and leave the stored configuration as it was.
fn assert_refused(cluster: &Cluster, yaml: &str, expect: &[&str]) {
    let before = stored_config(cluster);
    let file = cluster.state_dir().join(format!(
        "refused-{}-{}.yaml",
        std::process::id(),
        before.to_string().len()
    ));
    std::fs::write(&file, yaml).expect("writing the document");
    let out = cluster
        .meshctl(&["apply", "-f", file.to_str().expect("utf-8 path")])
        .expect("running meshctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "meshctl apply must refuse this document; it said: {}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    for want in expect {
        assert!(
            stderr.contains(want),
            "the refusal must name {want:?}: {stderr}"
        );
    }
    assert_eq!(
        stored_config(cluster),
        before,
        "a refused apply leaves the store unchanged"
    );
}

#[test]
fn malformed_yaml_is_refused() {
    let Some(cluster) = cluster() else { return };
    assert_refused(
        &cluster,
        "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {name: broken\nspec: [\n",
        &["malformed YAML", "line 4"],
    );
}

#[test]
fn an_unknown_kind_is_refused() {
    let Some(cluster) = cluster() else { return };
    assert_refused(
        &cluster,
        "apiVersion: mesh.dev/v1alpha1\nkind: Gateway\nmetadata:\n  name: edge\n  namespace: default\nspec: {}\n",
        &["kind", "\"Gateway\""],
    );
}

#[test]
fn a_missing_required_field_is_refused() {
    let Some(cluster) = cluster() else { return };
    let mut lines: Vec<&str> = Vec::new();
    let doc = cluster.workload_yaml("node2-pod1", &[]);
    lines.extend(doc.lines().filter(|l| !l.trim_start().starts_with("ip:")));
    let no_ip = lines.join("\n") + "\n";
    assert_refused(&cluster, &no_ip, &["node2-pod1", "spec.ip", "missing"]);
}

#[test]
fn a_vip_owned_by_two_services_is_refused() {
    let Some(cluster) = cluster() else { return };
    cluster.apply(&echo_service()).expect("apply echo");
    // All or nothing: the valid Service in the same apply is not stored either.
    let yaml = yaml_stream(&[
        service_yaml("fresh", "198.18.100.9", 80, 7000, &[("role", "fresh")]),
        service_yaml("twin", VIP, VIP_PORT.into(), 7000, &[("role", "twin")]),
    ]);
    assert_refused(&cluster, &yaml, &["twin", "spec.vips", VIP, "default/echo"]);
    let names: Vec<String> = stored(&cluster, "services")
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(names, ["echo"]);
}

#[test]
fn a_port_out_of_range_is_refused() {
    let Some(cluster) = cluster() else { return };
    let yaml = service_yaml("wide", "198.18.100.3", 70000, 7000, &[("role", "echo")]);
    assert_refused(&cluster, &yaml, &["wide", "spec.ports[0].port", "70000"]);
}

#[test]
fn an_agent_rejects_what_it_cannot_apply_and_keeps_its_last_good_configuration() {
    let Some(cluster) = cluster() else { return };
    let endpoints = ["node2-pod1", "node3-pod1"];
    let _servers = echo_over(&cluster, &endpoints);
    let synced = wait_agents_synced(&cluster);
    let (node1_before, node2_before) = (&synced["node1"], &synced["node2"]);

    // Valid for the control server, but node1's own address as a VIP.
    let own = cluster.gateway_ip("node1").to_string();
    cluster
        .apply(&service_yaml("own", &own, 80, 7000, &[("role", "echo")]))
        .expect("the control server accepts it");

    let rejected = wait_for("node1 to reject Service own", SETTLE, |last| {
        let s = sync_state(&cluster, "node1");
        *last = s.to_string();
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&own))
            .then_some(s)
    });
    assert!(
        rejected["last_error"]
            .as_str()
            .unwrap()
            .contains("default/own"),
        "{rejected}"
    );
    assert!(
        rejected["nacks"].as_u64() > node1_before["nacks"].as_u64(),
        "{node1_before} -> {rejected}"
    );
    // The rest of the response took effect; only Service own was left out.
    let held = cluster
        .admin_get("node1", "/config")
        .expect("node1 /config");
    let keys: Vec<&str> = held["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r["key"].as_str())
        .collect();
    assert!(keys.contains(&"Service/default/echo"), "{held}");
    assert!(
        !keys.contains(&"Service/default/own"),
        "node1 must not hold the Service it rejected: {held}"
    );

    // meshctl shows node1's rejection, its reason and the resource, in its table
    // and as JSON; node1's acknowledged version stays the last good one.
    let agents = wait_for("meshctl agents to show node1's rejection", SETTLE, |last| {
        let out = meshctl_ok(&cluster, &["agents"]);
        *last = out.clone();
        out.lines()
            .any(|l| l.starts_with("node1") && l.contains(&own) && l.contains("default/own"))
            .then_some(out)
    });
    assert!(
        !agents
            .lines()
            .any(|l| !l.starts_with("node1") && l.contains(&own)),
        "only node1 rejects it: {agents}"
    );
    let agents: Value =
        serde_json::from_str(&meshctl_ok(&cluster, &["agents", "--json"])).expect("agents JSON");
    let by_node = |node: &str| -> Value {
        agents
            .as_array()
            .and_then(|a| a.iter().find(|x| x["node"] == node))
            .cloned()
            .unwrap_or_else(|| panic!("{node} missing from meshctl agents: {agents}"))
    };
    let node1 = by_node("node1");
    assert!(
        node1["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&own)),
        "{node1}"
    );
    assert_eq!(
        node1["last_error"]["resources"],
        serde_json::json!(["Service/default/own"]),
        "{node1}"
    );
    assert!(
        version_number(&node1["acked_version"]) >= version_number(&node1_before["version"]),
        "{node1}"
    );
    assert!(by_node("node2")["last_error"].is_null(), "{agents}");

    // node2 took it (198.19.1.1 is not its address).
    let node2 = wait_for("node2 to accept Service own", SETTLE, |last| {
        let s = sync_state(&cluster, "node2");
        *last = s.to_string();
        (s["acks"].as_u64() > node2_before["acks"].as_u64()).then_some(s)
    });
    assert!(node2["last_error"].is_null(), "{node2}");

    // node1 keeps serving echo.
    wait_serving(&cluster, &endpoints, CONVERGENCE);
}

#[test]
fn a_rejected_resource_does_not_hold_back_other_changes_and_its_deletion_clears_the_error() {
    let Some(cluster) = cluster() else { return };
    let _servers = echo_over(&cluster, &["node2-pod1"]);
    let _newcomer = serve(&cluster, "node2-pod2");
    wait_agents_synced(&cluster);

    let own = cluster.gateway_ip("node1").to_string();
    cluster
        .apply(&service_yaml("own", &own, 80, 7000, &[("role", "echo")]))
        .expect("apply own");
    let rejected = wait_for("node1 to reject Service own", SETTLE, |last| {
        let s = sync_state(&cluster, "node1");
        *last = s.to_string();
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&own))
            .then_some(s)
    });

    // A valid change while Service own stays rejected still reaches node1:
    // one bad resource never freezes a node.
    cluster
        .apply(&endpoint_doc(&cluster, "node2-pod2"))
        .expect("label node2-pod2");
    wait_serving(&cluster, &["node2-pod1", "node2-pod2"], CONVERGENCE);
    assert!(
        sync_state(&cluster, "node1")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&own)),
        "the rejection of Service own stays visible"
    );

    // Deleting the offending Service lets node1 take everything it missed.
    meshctl_ok(&cluster, &["delete", "service", "own"]);
    let fixed = wait_for("node1 to accept again", SETTLE, |last| {
        let s = sync_state(&cluster, "node1");
        *last = s.to_string();
        (s["last_error"].is_null() && s["acks"].as_u64() > rejected["acks"].as_u64()).then_some(s)
    });
    let revision = control_metric(&cluster, "mesh_control_store_revision");
    assert_eq!(version_number(&fixed["version"]), revision, "{fixed}");
    wait_serving(&cluster, &["node2-pod1", "node2-pod2"], CONVERGENCE);
}
