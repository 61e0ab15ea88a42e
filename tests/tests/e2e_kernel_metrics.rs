//! The kernel's counters and TCP statistics, and the agent's health gauges,
//! on a real local cluster (3 nodes, 2 pods each): pods connect a known
//! number of times on one node and across nodes, and the decision counters,
//! the per-destination connection counts and RTT histogram of the agents'
//! own connections move by as much; with a fifth of the segments into a
//! pod dropped (nftables in that pod's namespace), the agent's
//! retransmits to it grow. The health gauges match what the admin API
//! (`/status`, `meshctl bpf -o json`) says.
mod support;

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_api::admin::{BpfView, IdentityStatus};
use support::*;
use xtask::cluster::{Cluster, default_meshctl_bin};

const SETTLE: Duration = Duration::from_secs(15);
/// Connections each case makes.
const N: u64 = 5;

/// node's `/metrics` page.
fn scrape(cluster: &Cluster, node: &str) -> String {
    let out = cluster
        .node_command(node, "curl")
        .args(["-sf", "http://127.0.0.1:15020/metrics"])
        .output()
        .expect("curl");
    assert!(out.status.success(), "scraping {node}'s agent");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sample's value, by its exact name and labels as exported.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn kernel(metric: &str, destination: &str) -> String {
    format!("mesh_agent_kernel_tcp_{metric}{{destination=\"{destination}\"}}")
}

/// Connections closed, and the RTT histogram's count and sum, of the
/// agent's connections to `destination`.
#[derive(Clone, Copy, Debug)]
struct Tcp {
    closed: f64,
    srtt_count: f64,
    srtt_sum: f64,
    retransmits: f64,
}

fn tcp(cluster: &Cluster, node: &str, destination: &str) -> Tcp {
    let text = scrape(cluster, node);
    let get = |m: &str| sample(&text, &kernel(m, destination)).unwrap_or(0.0);
    Tcp {
        closed: get("connections_closed_total"),
        srtt_count: get("srtt_seconds_count"),
        srtt_sum: get("srtt_seconds_sum"),
        retransmits: get("retransmits_total"),
    }
}

/// Waits until node's agent reports at least `n` more closed connections to
/// `destination` than `before`, with as many RTT observations.
fn wait_closed(cluster: &Cluster, node: &str, destination: &str, before: Tcp, n: u64) -> Tcp {
    wait_for(
        &format!("{node}'s agent to count {n} closed connections to {destination}"),
        SETTLE,
        |last| {
            let now = tcp(cluster, node, destination);
            *last = format!("before {before:?}, now {now:?}");
            (now.closed >= before.closed + n as f64
                && now.srtt_count >= before.srtt_count + n as f64)
                .then_some(now)
        },
    )
}

fn assert_plausible_rtt(before: Tcp, after: Tcp, what: &str) {
    let mean = (after.srtt_sum - before.srtt_sum) / (after.srtt_count - before.srtt_count);
    assert!(
        mean > 0.0 && mean < 1.0,
        "{what}: mean smoothed RTT {mean} s (before {before:?}, after {after:?})"
    );
}

fn echo_n(cluster: &Cluster, from: &str, to: &str, n: u64, bytes: &str) {
    let dst = addr(cluster.pod(to).ip, ECHO_PORT);
    for _ in 0..n {
        let report = client_ok(cluster, from, &["tcp", "--addr", &dst, "--bytes", bytes]);
        assert_eq!(report["server"], to, "{report}");
    }
}

/// Drops `percent` of the TCP segments arriving on the echo port in `pod`'s
/// namespace (and only there) while the table is loaded.
fn loss<'a>(cluster: &'a Cluster, pod: &'a str, percent: u32) -> NftTable<'a> {
    NftTable::load(
        move || cluster.command(pod, "nft"),
        "meshloss",
        &format!(
            "  chain input {{\n    type filter hook input priority 0; policy accept;\n    tcp dport {ECHO_PORT} numgen random mod 100 < {percent} drop\n  }}"
        ),
        pod,
    )
}

#[test]
fn kernel_counters_tcp_statistics_and_health_gauges_move_when_pods_connect() {
    let Some(cluster) = cluster() else { return };
    let _local = serve(&cluster, "node1-pod2");
    let _remote = serve(&cluster, "node2-pod1");
    let (local, remote) = ("default/node1-pod2", "default/node2-pod1");

    let redirected = decision(&cluster, "node1", "redirected");
    let recorded1 = decision(&cluster, "node1", "agent_tuple_recorded");
    let recorded2 = decision(&cluster, "node2", "agent_tuple_recorded");
    let local_before = tcp(&cluster, "node1", local);
    let remote_before = tcp(&cluster, "node2", remote);

    // Same node: node1's agent connects straight to node1-pod2. Across
    // nodes: node1's agent tunnels to node2's, which connects to node2-pod1.
    echo_n(&cluster, "node1-pod1", "node1-pod2", N, "4096");
    echo_n(&cluster, "node1-pod1", "node2-pod1", N, "4096");

    assert_eq!(
        decision(&cluster, "node1", "redirected"),
        redirected + 2 * N,
        "node1-pod1's connects, each redirected once"
    );
    assert!(
        decision(&cluster, "node1", "agent_tuple_recorded") >= recorded1 + N,
        "node1's agent's connects into node1-pod2 recorded"
    );
    assert!(
        decision(&cluster, "node2", "agent_tuple_recorded") >= recorded2 + N,
        "node2's agent's connects into node2-pod1 recorded"
    );
    let local_after = wait_closed(&cluster, "node1", local, local_before, N);
    assert_plausible_rtt(local_before, local_after, "node1's agent to node1-pod2");
    let remote_after = wait_closed(&cluster, "node2", remote, remote_before, N);
    assert_plausible_rtt(remote_before, remote_after, "node2's agent to node2-pod1");

    // The tunnel between the agents is pooled: established at least once,
    // named by the peer node, never by its address.
    let text = scrape(&cluster, "node1");
    let tunnel = sample(&text, &kernel("connections_established_total", "node2")).unwrap_or(0.0);
    assert!(tunnel >= 1.0, "node1's agent's tunnel to node2:\n{text}");
    for line in text
        .lines()
        .filter(|l| l.starts_with("mesh_agent_kernel_tcp_"))
    {
        assert!(!line.contains("198.1"), "a raw address as a label: {line}");
    }
    // The histogram is cumulative up to +Inf = count.
    let inf =
        format!("mesh_agent_kernel_tcp_srtt_seconds_bucket{{le=\"+Inf\",destination=\"{local}\"}}");
    assert_eq!(sample(&text, &inf), Some(local_after.srtt_count), "{text}");
    assert!(
        sample(
            &text,
            &format!(
                "mesh_agent_kernel_tcp_bytes_total{{destination=\"{local}\",direction=\"sent\"}}"
            )
        )
        .is_some_and(|b| b >= (N * 4096) as f64),
        "bytes the agent sent node1-pod2 (the echo payloads)"
    );

    // Retransmits: a fifth of the segments into node1-pod2 are dropped, so
    // node1's agent resends (SYNs, data).
    let before = tcp(&cluster, "node1", local);
    {
        let _loss = loss(&cluster, "node1-pod2", 20);
        echo_n(&cluster, "node1-pod1", "node1-pod2", N, "65536");
    }
    let after = wait_closed(&cluster, "node1", local, before, N);
    eprintln!(
        "same node {local_before:?} -> {local_after:?}; across {remote_before:?} -> {remote_after:?}; tunnel established {tunnel}; under loss {before:?} -> {after:?}"
    );
    assert!(
        after.retransmits > before.retransmits,
        "node1's agent retransmitted to node1-pod2 under loss: before {before:?}, after {after:?}"
    );

    // Health: the gauges say what the admin API says.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as f64;
    for node in ["node1", "node2", "node3"] {
        let text = scrape(&cluster, node);
        let sync = sync_state(&cluster, node);
        let version: f64 = sync["version"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{node}: sync version {sync}"));
        assert_eq!(
            sample(&text, "mesh_agent_config_version"),
            Some(version),
            "{node}"
        );
        assert_eq!(
            sample(&text, "mesh_agent_control_connected"),
            Some(1.0),
            "{node}"
        );
        let applied = sample(&text, "mesh_agent_config_last_applied_timestamp_seconds")
            .unwrap_or_else(|| panic!("{node}: no applied timestamp"));
        assert_eq!(
            applied,
            (sync["last_update_unix_ms"].as_u64().expect("ms") / 1000) as f64,
            "{node}: {sync}"
        );
        assert!(
            applied > now - 600.0 && applied <= now + 1.0,
            "{node}: {applied}"
        );

        let status = cluster.admin_get(node, "/status").expect("/status");
        let identity: IdentityStatus =
            serde_json::from_value(status["identity"].clone()).expect("identity status");
        let held: Vec<_> = std::iter::once(&identity.node)
            .chain(&identity.certificates)
            .filter_map(|c| Some((c.identity.clone(), c.not_after_unix?)))
            .collect();
        assert!(
            held.len() >= 2,
            "{node}: the node's and its pods' certificates: {held:?}"
        );
        for (id, not_after) in &held {
            let series =
                format!("mesh_agent_certificate_expiry_timestamp_seconds{{identity=\"{id}\"}}");
            assert_eq!(
                sample(&text, &series),
                Some(*not_after as f64),
                "{node}: {series}"
            );
            assert!(*not_after as f64 > now, "{node}: {id} expired");
        }
        let exported = text
            .lines()
            .filter(|l| l.starts_with("mesh_agent_certificate_expiry_timestamp_seconds{"))
            .count();
        assert_eq!(
            exported,
            held.len(),
            "{node}: one series per certificate held"
        );

        let socket = cluster.node(node).admin_socket.clone();
        let out = Command::new(default_meshctl_bin())
            .arg("--admin")
            .arg(&socket)
            .args(["bpf", "-o", "json"])
            .output()
            .expect("meshctl");
        assert!(
            out.status.success(),
            "meshctl bpf: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bpf: BpfView = serde_json::from_slice(&out.stdout).expect("meshctl bpf -o json");
        let mut attached: BTreeMap<&str, f64> = BTreeMap::new();
        for p in bpf.programs.iter().filter(|p| p.attached) {
            *attached.entry(p.program.as_str()).or_default() += 1.0;
        }
        assert_eq!(
            attached.get("mesh_inbound"),
            Some(&2.0),
            "{node}: two pods: {attached:?}"
        );
        assert_eq!(attached.len(), 6, "{node}: {attached:?}");
        for (program, n) in &attached {
            let series = format!("mesh_agent_bpf_programs_attached{{program=\"{program}\"}}");
            assert_eq!(sample(&text, &series), Some(*n), "{node}: {series}");
        }
    }
}

/// The identities whose certificate expiry node's agent exports.
fn exported_identities(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("mesh_agent_certificate_expiry_timestamp_seconds{identity=\"")?
                .split('"')
                .next()
                .map(str::to_owned)
        })
        .collect()
}

#[test]
fn health_gauges_follow_a_workload_leaving_and_a_control_server_restart() {
    let Some(mut cluster) = cluster() else { return };
    let held = |cluster: &Cluster| {
        let status = cluster.admin_get("node1", "/status").expect("/status");
        let identity: IdentityStatus =
            serde_json::from_value(status["identity"].clone()).expect("identity status");
        let mut ids: Vec<String> = std::iter::once(&identity.node)
            .chain(&identity.certificates)
            .filter(|c| c.not_after_unix.is_some())
            .map(|c| c.identity.clone())
            .collect();
        ids.sort();
        ids
    };
    // Right after `up` the pods' certificates may still be on their way:
    // wait until node1 holds its node's and both pods' certificates, then
    // one expiry series per certificate held.
    let before = wait_for(
        "node1's agent to hold the node's and both pods' certificates",
        SETTLE,
        |last| {
            let ids = held(&cluster);
            *last = format!("{ids:?}");
            (ids.len() == 3).then_some(ids)
        },
    );
    wait_for("one expiry series per certificate held", SETTLE, |last| {
        let mut exported = exported_identities(&scrape(&cluster, "node1"));
        exported.sort();
        *last = format!("{exported:?}, held {before:?}");
        (exported == before).then_some(())
    });
    let version = sample(&scrape(&cluster, "node1"), "mesh_agent_config_version").expect("version");

    // node1-pod2's Workload leaves: its identity's series goes, the
    // configuration version moves on.
    let out = cluster
        .meshctl(&["delete", "workload", "node1-pod2"])
        .expect("meshctl delete");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = wait_for(
        "node1's agent to drop node1-pod2's certificate",
        SETTLE,
        |last| {
            let ids = held(&cluster);
            *last = format!("{ids:?}");
            (ids.len() + 1 == before.len()).then_some(ids)
        },
    );
    let text = wait_for("the expiry series to follow", SETTLE, |last| {
        let text = scrape(&cluster, "node1");
        let mut exported = exported_identities(&text);
        exported.sort();
        *last = format!("{exported:?}, held {after:?}");
        (exported == after).then_some(text)
    });
    let now = sample(&text, "mesh_agent_config_version").expect("version");
    assert!(now > version, "version {version} -> {now}");
    let sync = sync_state(&cluster, "node1");
    assert_eq!(
        Some(now),
        sync["version"].as_str().and_then(|v| v.parse().ok()),
        "{sync}"
    );

    // The control server goes and comes back: connected follows.
    cluster.stop_control().expect("stop control");
    wait_for(
        "node1's agent to see the control server gone",
        SETTLE,
        |last| {
            let v = sample(&scrape(&cluster, "node1"), "mesh_agent_control_connected");
            *last = format!("{v:?}");
            (v == Some(0.0)).then_some(())
        },
    );
    cluster.start_control().expect("start control");
    wait_for("node1's agent to reconnect", SETTLE, |last| {
        let text = scrape(&cluster, "node1");
        let sync = sync_state(&cluster, "node1");
        let connected = sample(&text, "mesh_agent_control_connected");
        let version = sample(&text, "mesh_agent_config_version");
        *last = format!("connected {connected:?}, version {version:?}, sync {sync}");
        (connected == Some(1.0)
            && sync["connected"] == true
            && version == sync["version"].as_str().and_then(|v| v.parse().ok()))
        .then_some(())
    });
}
