//! Several `mesh-control` replicas on one etcd store (`--store etcd://`):
//! a real 3-member etcd cluster on loopback, the real binaries, real TLS
//! with the root CA the replicas share through etcd, agents as real
//! Distribution streams.
use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use mesh_api::{
    client::{self, Bearer},
    pb::{
        ApplyRequest, DeltaRequest, DeltaResponse, GetRequest,
        distribution_client::DistributionClient,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

mod support;

use support::{
    control::{Server, TempDir},
    etcd::EtcdCluster,
};

const WAIT: Duration = Duration::from_secs(10);

/// A replica on `store`, in its own directory (store dir, socket, log).
fn replica(dir: &Path, store: &str) -> Server {
    Server::start(dir, &["--store", store])
}

fn workload(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, labels: {{app: echo}}}}\nspec: {{node: n1, ip: {ip}, ports: [{{port: 8080}}]}}\n"
    )
}

fn service(name: &str, vip: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{vips: [{vip}], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: echo}}}}\n"
    )
}

/// Applies and returns the revision it committed as.
async fn apply(server: &Server, yaml: &str) -> Result<u64, tonic::Status> {
    server
        .operator()
        .await
        .apply(ApplyRequest {
            yaml: yaml.to_owned(),
            dry_run: false,
        })
        .await
        .map(|r| r.into_inner().revision)
}

/// Every stored Workload and Service, as JSON text.
async fn everything(server: &Server) -> Vec<String> {
    let mut op = server.operator().await;
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

/// A test agent for node n1: one Distribution stream.
struct Agent {
    requests: mpsc::Sender<DeltaRequest>,
    responses: Streaming<DeltaResponse>,
    /// Resource keys it holds now.
    holds: BTreeSet<String>,
    revision: u64,
}

impl Agent {
    async fn connect(server: &Server) -> Agent {
        let channel = client::channel_with_tls(&server.target(), Some(&server.tls(None)))
            .await
            .expect("connect");
        let mut client = DistributionClient::with_interceptor(
            channel,
            Bearer::new(Some("token-1")).expect("token"),
        );
        let (requests, rx) = mpsc::channel(4);
        requests
            .send(DeltaRequest {
                node: "n1".into(),
                ..DeltaRequest::default()
            })
            .await
            .expect("first request");
        let responses = client
            .delta_resources(ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        Agent {
            requests,
            responses,
            holds: BTreeSet::new(),
            revision: 0,
        }
    }

    /// Receives and acknowledges one response, within `within`.
    async fn next(&mut self, within: Duration) -> Option<DeltaResponse> {
        let r = tokio::time::timeout(within, self.responses.message())
            .await
            .ok()?
            .expect("stream healthy")
            .expect("stream open");
        for resource in &r.resources {
            self.holds.insert(resource.key.clone());
        }
        for removed in &r.removed_resources {
            self.holds.remove(removed);
        }
        self.revision = r.system_version_info.parse().expect("numeric revision");
        self.requests
            .send(DeltaRequest {
                response_nonce: r.nonce.clone(),
                ..DeltaRequest::default()
            })
            .await
            .expect("ack");
        Some(r)
    }

    /// Waits until the agent holds revision `revision` or later; panics
    /// after `within`.
    async fn reach(&mut self, revision: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.revision < revision {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                self.next(left).await.is_some(),
                "the agent is at revision {}, not {revision}, after {within:?}",
                self.revision
            );
        }
    }

    fn workloads(&self) -> BTreeSet<String> {
        self.holds
            .iter()
            .filter_map(|k| k.strip_prefix("Workload/default/"))
            .map(str::to_owned)
            .collect()
    }
}

/// Waits until `sample` reads `value` on every one of `servers` summed.
async fn wait_for_sum(servers: &[&Server], sample: &str, value: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let sum: f64 = servers.iter().filter_map(|s| s.metric(sample)).sum();
        if sum == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} sums to {sum}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_apply_through_one_replica_reaches_an_agent_of_another_within_a_second() {
    let Some(etcd) = EtcdCluster::start(3).await else {
        return;
    };
    let (dir_a, dir_b) = (TempDir::new("etcd-a"), TempDir::new("etcd-b"));
    let a = replica(&dir_a.0, &etcd.url("/mesh-reach"));
    let b = replica(&dir_b.0, &etcd.url("/mesh-reach"));
    // One root, generated by whichever replica came first: an agent that
    // trusts one replica's bundle trusts the other.
    assert_eq!(
        std::fs::read_to_string(&a.ca).expect("a's ca.crt"),
        std::fs::read_to_string(&b.ca).expect("b's ca.crt"),
        "the replicas share the root CA"
    );
    // Exactly one leader.
    wait_for_sum(&[&a, &b], "mesh_control_leader", 1.0).await;

    let mut agent = Agent::connect(&b).await;
    let first = agent.next(WAIT).await.expect("the initial response");
    assert_eq!(first.system_version_info, "0");

    let started = Instant::now();
    let revision = apply(
        &a,
        &[
            workload("echo-1", "198.18.1.10"),
            service("echo", "198.19.0.10"),
        ]
        .join("---\n"),
    )
    .await
    .expect("apply through A");
    assert_eq!(revision, 1);
    agent.reach(1, Duration::from_secs(1)).await;
    let took = started.elapsed();
    assert_eq!(agent.workloads(), BTreeSet::from(["echo-1".to_owned()]));
    assert!(agent.holds.contains("Service/default/echo"));
    eprintln!("apply through A to B's agent: {took:?}");

    // A change through B reaches A's state too, and a delete propagates.
    apply(&b, &workload("echo-2", "198.18.1.11"))
        .await
        .expect("apply through B");
    let mut op = a.operator().await;
    op.delete(mesh_api::pb::DeleteRequest {
        kind: "Workload".into(),
        namespace: "default".into(),
        name: "echo-1".into(),
    })
    .await
    .expect("delete through A");
    agent.reach(3, Duration::from_secs(1)).await;
    assert_eq!(agent.workloads(), BTreeSet::from(["echo-2".to_owned()]));
    let deadline = Instant::now() + WAIT;
    while everything(&a).await != everything(&b).await {
        assert!(Instant::now() < deadline, "the replicas' states differ");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.metric("mesh_control_store_revision"), Some(3.0));
}

#[tokio::test]
async fn concurrent_applies_through_two_replicas_commit_in_one_order_and_never_both_take_an_ip() {
    let Some(etcd) = EtcdCluster::start(3).await else {
        return;
    };
    let (dir_a, dir_b) = (TempDir::new("etcd-race-a"), TempDir::new("etcd-race-b"));
    let a = replica(&dir_a.0, &etcd.url("/mesh-race"));
    let b = replica(&dir_b.0, &etcd.url("/mesh-race"));
    const ROUNDS: usize = 40;
    // Round i: A applies a-i and B applies b-i, both claiming the same IP.
    // Only one can own it: the loser's replica must see the winner's
    // commit, plan again and refuse.
    let race = |server: &Server, side: &'static str| {
        let socket = server.socket.clone();
        async move {
            let mut op = client::operator(&client::Target::Unix(socket), None)
                .await
                .expect("operator socket");
            let mut results = Vec::new();
            for i in 0..ROUNDS {
                let yaml = workload(&format!("{side}-{i}"), &format!("198.18.3.{}", i + 1));
                let r = op
                    .apply(ApplyRequest {
                        yaml,
                        dry_run: false,
                    })
                    .await
                    .map(|r| r.into_inner().revision);
                results.push(r);
            }
            results
        }
    };
    let (from_a, from_b) = tokio::join!(race(&a, "a"), race(&b, "b"));

    let mut revisions = Vec::new();
    for (side, results) in [("a", &from_a), ("b", &from_b)] {
        let mut last = 0;
        for (i, r) in results.iter().enumerate() {
            match r {
                Ok(revision) => {
                    assert!(
                        *revision > last,
                        "{side}-{i}: revision {revision} after {last}"
                    );
                    last = *revision;
                    revisions.push(*revision);
                }
                Err(status) => {
                    // Refused cleanly: the IP is the other side's, or the
                    // race was lost too often (ABORTED, retryable).
                    assert!(
                        (status.code() == Code::InvalidArgument
                            && status
                                .message()
                                .contains("already owned by Workload/default/"))
                            || status.code() == Code::Aborted,
                        "{side}-{i}: {status:?}"
                    );
                }
            }
        }
    }
    for i in 0..ROUNDS {
        let won = [&from_a[i], &from_b[i]]
            .iter()
            .filter(|r| r.is_ok())
            .count();
        assert!(
            won <= 1,
            "round {i}: both replicas committed 198.18.3.{}",
            i + 1
        );
    }
    revisions.sort_unstable();
    let distinct: BTreeSet<u64> = revisions.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        revisions.len(),
        "two applies committed as one revision"
    );
    assert!(
        revisions.len() >= ROUNDS,
        "at least one apply of each round commits ({} did)",
        revisions.len()
    );
    assert_eq!(
        revisions,
        (1..=revisions.len() as u64).collect::<Vec<_>>(),
        "revisions are dense: no commit was lost or doubled"
    );

    // Both replicas end with the same state, holding every committed apply.
    let last = *revisions.last().expect("commits");
    let deadline = Instant::now() + WAIT;
    loop {
        let (ra, rb) = (
            a.metric("mesh_control_store_revision"),
            b.metric("mesh_control_store_revision"),
        );
        if ra == Some(last as f64) && rb == ra {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "revisions {ra:?} and {rb:?}, not {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let state = everything(&a).await;
    assert_eq!(state, everything(&b).await, "the replicas' states differ");
    assert_eq!(
        state.len(),
        revisions.len(),
        "one workload per committed apply"
    );
}

#[tokio::test]
async fn killing_an_etcd_member_and_a_replica_under_applies_loses_nothing_acknowledged() {
    let Some(mut etcd) = EtcdCluster::start(3).await else {
        return;
    };
    let url = etcd.url("/mesh-kill");
    let (dir_a, dir_b) = (TempDir::new("etcd-kill-a"), TempDir::new("etcd-kill-b"));
    let mut a = Some(replica(&dir_a.0, &url));
    let b = replica(&dir_b.0, &url);
    let mut agent = Agent::connect(&b).await;
    agent.next(WAIT).await.expect("the initial response");

    const APPLIES: usize = 90;
    let mut acknowledged = BTreeSet::new();
    let mut failed = Vec::new();
    let mut last_revision = 0;
    for i in 0..APPLIES {
        if i == 30 {
            etcd.kill(0);
        }
        if i == 60 {
            // SIGKILL: no drain, no goodbye.
            a = None;
        }
        let name = format!("w-{i}");
        let ip = format!("198.18.{}.{}", 4 + i / 200, 1 + i % 200);
        // Alternate replicas while both live.
        let through = match &a {
            Some(a) if i % 2 == 0 => a,
            _ => &b,
        };
        match apply(through, &workload(&name, &ip)).await {
            Ok(revision) => {
                assert!(
                    revision > last_revision,
                    "{name}: {revision} after {last_revision}"
                );
                last_revision = revision;
                acknowledged.insert(name);
            }
            Err(status) => failed.push(format!("{name}: {status:?}")),
        }
        // The agent on B keeps up while all this happens.
        while agent.next(Duration::from_millis(5)).await.is_some() {}
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        failed.is_empty(),
        "applies failed across the kills (etcd-client fails over, commits retry): {failed:?}"
    );
    assert_eq!(acknowledged.len(), APPLIES);
    agent.reach(last_revision, WAIT).await;
    assert_eq!(
        agent.workloads(),
        acknowledged,
        "the agent on B saw every apply"
    );

    // A restarted replica resumes from the stored revision, with the same state.
    let a = Server::start(&dir_a.0, &["--store", &url]);
    let ready = std::fs::read_to_string(&a.log).unwrap_or_default();
    assert!(
        ready.contains(&format!("revision={last_revision}")),
        "A did not restart at revision {last_revision}: {ready}"
    );
    assert_eq!(everything(&a).await, everything(&b).await);
    let mut agent_a = Agent::connect(&a).await;
    agent_a.reach(last_revision, WAIT).await;
    assert_eq!(agent_a.workloads(), acknowledged);
    // Applies go on through it, two members of three still up.
    let revision = apply(&a, &workload("after", "198.18.9.1"))
        .await
        .expect("apply after the restart");
    assert_eq!(revision, last_revision + 1);
    agent.reach(revision, Duration::from_secs(1)).await;
    assert!(agent.workloads().contains("after"));
}

#[tokio::test]
async fn a_replica_whose_history_was_compacted_away_reloads_and_its_agents_catch_up() {
    let Some(mut etcd) = EtcdCluster::start(3).await else {
        return;
    };
    let (dir_a, dir_b) = (
        TempDir::new("etcd-compact-a"),
        TempDir::new("etcd-compact-b"),
    );
    // B talks to member 2 only, so killing it breaks B's watch alone.
    let a = replica(&dir_a.0, &etcd.url_of(&[0, 1], "/mesh-compact"));
    let b = replica(&dir_b.0, &etcd.url_of(&[2], "/mesh-compact"));
    apply(
        &a,
        &[
            workload("keep", "198.18.5.1"),
            workload("gone", "198.18.5.2"),
        ]
        .join("---\n"),
    )
    .await
    .expect("apply");
    let mut agent = Agent::connect(&b).await;
    agent.reach(1, WAIT).await;
    assert_eq!(agent.workloads().len(), 2);

    etcd.kill(2);
    apply(&a, &workload("new", "198.18.5.3"))
        .await
        .expect("apply while B is cut off");
    let mut op = a.operator().await;
    op.delete(mesh_api::pb::DeleteRequest {
        kind: "Workload".into(),
        namespace: "default".into(),
        name: "gone".into(),
    })
    .await
    .expect("delete while B is cut off");
    // Compact past everything B missed.
    let mut client = etcd.client().await;
    let now = client
        .get("/mesh-compact/revision", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    client
        .compact(
            now,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .expect("compact");
    etcd.restart(2).await;

    agent.reach(3, WAIT).await;
    assert_eq!(
        agent.workloads(),
        BTreeSet::from(["keep".to_owned(), "new".to_owned()]),
        "B's agent got the difference"
    );
    assert_eq!(everything(&a).await, everything(&b).await);
    let log = std::fs::read_to_string(&b.log).unwrap_or_default();
    assert!(
        log.contains("reloading the whole state from etcd"),
        "B resumed without a reload: {log}"
    );
}

#[test]
fn bad_store_values_are_refused_naming_the_value() {
    let dir = TempDir::new("etcd-bad");
    for (value, expected) in [
        ("postgres://db:5432", "not an etcd:// URL"),
        ("etcd://x", "member \"x\" has no :port"),
        (
            "etcd://127.0.0.1:99999",
            "member \"127.0.0.1:99999\": port \"99999\" is not 1-65535",
        ),
        ("etcd://127.0.0.1:2379/", "the prefix is empty"),
    ] {
        let out = support::control::command(&dir.0, &["--store", value])
            .output()
            .expect("mesh-control");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {err}");
        assert!(
            err.contains(&format!(
                "invalid value '{value}' for '--store <STORE>': {expected} (expected file, or etcd://"
            )),
            "{value}: {err}"
        );
    }
    // Well-formed, but nothing listens: refused at start, naming the store.
    let unreachable = "etcd://127.0.0.1:9/mesh";
    let started = Instant::now();
    let out = support::control::command(&dir.0, &["--store", unreachable])
        .output()
        .expect("mesh-control");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("opening the store {unreachable}")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // --ca-dir belongs to the file store.
    let out = support::control::command(
        &dir.0,
        &["--store", unreachable, "--ca-dir", "/nonexistent"],
    )
    .output()
    .expect("mesh-control");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--ca-dir is for the file store"), "{err}");
}

/// The agent's own discovery (no kernel) given both replicas
/// (`--control-addr https://a,https://b`): when the replica it streams
/// from is SIGKILLed together with an etcd member, it goes on to the other
/// and acknowledges what is applied there; a restarted replica, on its
/// address, serves it again once the other goes.
#[tokio::test]
async fn an_agent_given_every_replica_fails_over_when_its_replica_is_killed() {
    use mesh_agent::state::{
        Context,
        discovery::{self, Discovery},
    };
    use std::sync::Arc;

    let Some(mut etcd) = EtcdCluster::start(3).await else {
        return;
    };
    let url = etcd.url("/mesh-failover");
    let (dir_a, dir_b) = (TempDir::new("etcd-fo-a"), TempDir::new("etcd-fo-b"));
    let cache = TempDir::new("etcd-fo-agent");
    let a = replica(&dir_a.0, &url);
    let b = replica(&dir_b.0, &url);
    let a_listen = a.grpc.to_string();
    let connector = Arc::new(
        client::AgentConnector::new(
            &format!("https://{},https://{}", a.grpc, b.grpc),
            "n1",
            "cluster.local",
            Some("token-1".into()),
            Some(a.ca.clone()),
        )
        .expect("connector"),
    );
    let (discovery, mut config, sync) = Discovery::new(
        discovery::Settings {
            ctx: Context {
                node: "n1".into(),
                agent_ip: "198.19.1.1".parse().expect("ip"),
                trust_domain: "cluster.local".into(),
                node_addresses: Default::default(),
                registry: Default::default(),
            },
            connector,
            cache_dir: Some(cache.0.clone()),
        },
        Box::new(|_| Ok(())),
    )
    .expect("discovery");
    let task = tokio::spawn(discovery.run());
    let reach = |config: &mut mesh_agent::state::StateRx, revision: u64, within: Duration| {
        let mut config = config.clone();
        async move {
            tokio::time::timeout(
                within,
                config.wait_for(|s| s.version.parse::<u64>().is_ok_and(|v| v >= revision)),
            )
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
        }
    };
    let subscribed = |server: &Server| {
        std::fs::read_to_string(&server.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("agent subscribed"))
            .count()
    };

    let first = apply(&a, &workload("w-0", "198.18.4.1"))
        .await
        .expect("apply through A");
    assert!(reach(&mut config, first, WAIT).await, "the agent on A");
    assert!(
        subscribed(&a) >= 1,
        "the agent starts on the first endpoint"
    );
    assert_eq!(subscribed(&b), 0, "and only there");

    // SIGKILL A and an etcd member; apply through B.
    etcd.kill(0);
    drop(a);
    let killed = Instant::now();
    let second = apply(&b, &workload("w-1", "198.18.4.2"))
        .await
        .expect("apply through B with A and one member gone");
    // The apply may wait out B's etcd client on the dead member.
    let applied = killed.elapsed();
    assert!(
        reach(&mut config, second, WAIT).await,
        "the agent did not reach revision {second} through B: {:?}",
        sync.lock().expect("sync")
    );
    let failover = killed.elapsed();
    eprintln!(
        "failover (A killed -> revision {second} acked through B): {failover:?}, of which the apply {applied:?}"
    );
    assert!(subscribed(&b) >= 1, "the agent subscribed to B");
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );

    // A restarts on its address at the stored revision; B goes: the agent
    // comes back to A and follows what is applied there.
    let a = Server::start_listening(&dir_a.0, &a_listen, &["--store", &url]);
    let log = std::fs::read_to_string(&a.log).unwrap_or_default();
    assert!(
        log.contains(&format!("revision={second}")),
        "A did not restart at revision {second}: {log}"
    );
    let before = subscribed(&a);
    drop(b);
    let third = apply(&a, &workload("w-2", "198.18.4.3"))
        .await
        .expect("apply through the restarted A");
    assert_eq!(third, second + 1);
    assert!(
        reach(&mut config, third, WAIT).await,
        "the agent did not come back to the restarted A: {:?}",
        sync.lock().expect("sync")
    );
    assert!(subscribed(&a) > before, "the agent subscribed to A again");
    let held: BTreeSet<String> = config
        .borrow()
        .resources
        .keys()
        .filter_map(|k| k.strip_prefix("Workload/default/"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        held,
        ["w-0", "w-1", "w-2"].map(String::from).into(),
        "the agent holds every apply"
    );
    task.abort();
}
