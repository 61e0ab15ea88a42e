//! `mesh-control-bench`: the load generator of `cargo xtask bench control`.
//!
//! Against one running `mesh-control` it
//! 1. populates the store through the operator API (unix socket): Workloads
//!    spread evenly over the nodes of the tokens file, labelled `app: svc-<k>`
//!    round robin so that each Service selects about workloads/services of
//!    them, then Services (one VIP in 198.18.0.0/15, one port);
//! 2. opens one delta stream per node (one HTTP/2 connection per agent by
//!    default, as real agents do; over TLS verified against the mesh CA when
//!    the server has one, authenticated by the node's bootstrap token),
//!    decodes and ACKs every response, and times the first full sync of
//!    every agent;
//! 3. makes endpoint changes one at a time (a workload's label flips so that
//!    exactly one Service's endpoint set changes) and times each from the
//!    apply's return until every agent has ACKed the new revision.
//!
//! Agents keep no configuration, only counts, and mesh-control sends an
//! agent its next response only after the ACK of the previous one (each at
//! most 64 KiB), so the generator holds about one response per agent.
//!
//! stdout is JSON lines: `{"phase":"populate"}`, `{"phase":"sync"}`,
//! `{"phase":"changes"}`, `{"phase":"done"}` as each phase starts (so a
//! caller can sample the server between them), then `{"report":{...}}`.
//! Progress goes to stderr.
use std::{
    collections::HashSet,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use mesh_api::{
    client::{self, Bearer, Target, Tls},
    pb::{ApplyRequest, DeltaRequest, DeltaResponse, distribution_client::DistributionClient},
};
use prost::Message;
use serde::Serialize;
use tokio::{
    sync::mpsc,
    task::JoinSet,
    time::{Instant, timeout, timeout_at},
};
use tonic::transport::Channel;

/// Workload IPs: 10.0.0.1 onwards.
const WORKLOAD_BASE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// Service VIPs: 198.18.0.1 onwards, within 198.18.0.0/15.
const VIP_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const MAX_SERVICES: usize = (1 << 17) - 2;
const MAX_WORKLOADS: usize = (1 << 24) - 2;
const APPLY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Parser)]
#[command(
    name = "mesh-control-bench",
    about = "Load generator for mesh-control: populate, sync many agents, time endpoint changes"
)]
struct Args {
    /// mesh-control's gRPC address.
    #[arg(long)]
    grpc: SocketAddr,
    /// The mesh CA's certificate (mesh-control's `<ca-dir>/ca.crt`): agents
    /// connect over TLS and verify the server against it. Without it, plain
    /// HTTP/2 (a server without a CA).
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// Trust domain of the control server's identity.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// mesh-control's operator socket.
    #[arg(long)]
    operator_socket: PathBuf,
    /// The tokens file mesh-control reads (`node: token` per line); every
    /// node in it becomes one simulated agent.
    #[arg(long)]
    tokens: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 50_000)]
    workloads: usize,
    /// Endpoint changes to time, one after the other.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Documents per Apply while populating.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Agent streams sharing one HTTP/2 connection.
    #[arg(long, default_value_t = 1)]
    agents_per_connection: usize,
    /// Limit on the first full sync of all agents.
    #[arg(long, default_value_t = 900)]
    sync_timeout_secs: u64,
    /// Limit on one change reaching all agents.
    #[arg(long, default_value_t = 60)]
    change_timeout_secs: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    Populate,
    Sync,
    Changes,
    Done,
}

/// One line of stdout.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Phase(Phase),
    Report(Box<Report>),
}

#[derive(Debug, Serialize)]
struct Report {
    agents: usize,
    connections: usize,
    services: usize,
    workloads: usize,
    populate: Populate,
    first_sync: FirstSync,
    changes: Changes,
}

#[derive(Debug, Serialize)]
struct Populate {
    documents: usize,
    applies: usize,
    secs: f64,
    revision: u64,
}

/// Every agent's first full sync. Byte counts are encoded `DeltaResponse`
/// sizes (protobuf, without gRPC framing).
#[derive(Debug, Serialize)]
struct FirstSync {
    revision: u64,
    /// From the first subscribe until the last agent ACKed the revision.
    secs: f64,
    bytes_per_agent_avg: f64,
    bytes_per_agent_max: u64,
    responses_per_agent_avg: f64,
    resources_per_agent_avg: f64,
}

#[derive(Debug, Serialize)]
struct Changes {
    count: usize,
    /// From the apply's return until every agent ACKed the new revision
    /// (0 when all ACKed before the apply's answer arrived).
    acked_by_all_ms: Percentiles,
    /// The same from the moment the apply was sent: includes the commit.
    acked_by_all_since_apply_sent_ms: Percentiles,
    /// The operator's apply itself (commit with fsync).
    apply_ms: Percentiles,
    /// Per agent per change, averaged over agents and changes.
    bytes_per_agent_avg: f64,
    /// Per agent per change, the largest.
    bytes_per_agent_max: u64,
    responses_per_agent_max: u32,
    each: Vec<ChangeRun>,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    /// Nearest rank.
    fn of(mut values: Vec<f64>) -> Percentiles {
        values.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let i = (p * values.len() as f64).ceil() as usize;
            values.get(i.saturating_sub(1)).copied().unwrap_or(0.0)
        };
        Percentiles {
            p50: rank(0.50),
            p99: rank(0.99),
            max: values.last().copied().unwrap_or(0.0),
        }
    }
}

#[derive(Debug, Serialize)]
struct ChangeRun {
    workload: String,
    service: String,
    revision: u64,
    apply_ms: f64,
    acked_by_all_ms: f64,
    acked_by_all_since_apply_sent_ms: f64,
    bytes_per_agent_avg: f64,
    bytes_per_agent_max: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&err.into()),
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}

fn fail(err: &anyhow::Error) -> ExitCode {
    eprintln!("mesh-control-bench: {err:#}");
    ExitCode::FAILURE
}

fn emit(line: &Line) -> Result<()> {
    println!("{}", serde_json::to_string(line)?);
    Ok(())
}

fn progress(message: &str) {
    eprintln!("mesh-control-bench: {message}");
}

async fn run(args: Args) -> Result<()> {
    let nodes = read_tokens(&args.tokens)?;
    let mesh = Mesh::new(nodes.len(), args.services, args.workloads)?;
    ensure!(args.batch > 0, "--batch must be at least 1");
    ensure!(
        args.agents_per_connection > 0,
        "--agents-per-connection must be at least 1"
    );
    let operator = Operator::connect(&args.operator_socket).await?;

    emit(&Line::Phase(Phase::Populate))?;
    let populate = populate(&operator, &mesh, &nodes, args.batch).await?;
    progress(&format!(
        "populated {} documents in {} applies, {:.1} s, revision {}",
        populate.documents, populate.applies, populate.secs, populate.revision
    ));

    emit(&Line::Phase(Phase::Sync))?;
    let tls = match &args.ca_bundle {
        Some(path) => Some(Tls::from_bundle_file(path, &args.trust_domain)?),
        None => None,
    };
    let mut fleet = Fleet::start(args.grpc, tls.as_ref(), &nodes, args.agents_per_connection)?;
    let deadline = Instant::now() + Duration::from_secs(args.sync_timeout_secs);
    let synced = fleet.wait_for(populate.revision, deadline).await?;
    let first_sync = first_sync(populate.revision, fleet.started, &synced);
    progress(&format!(
        "{} agents synced in {:.1} s ({:.2} MB each)",
        nodes.len(),
        first_sync.secs,
        first_sync.bytes_per_agent_avg / 1e6
    ));

    emit(&Line::Phase(Phase::Changes))?;
    let limit = Duration::from_secs(args.change_timeout_secs);
    let changes = changes(&operator, &mut fleet, &mesh, &nodes, args.changes, limit).await?;
    emit(&Line::Phase(Phase::Done))?;
    fleet.stop().await;

    let report = Report {
        agents: nodes.len(),
        connections: nodes.len().div_ceil(args.agents_per_connection),
        services: args.services,
        workloads: args.workloads,
        populate,
        first_sync,
        changes,
    };
    emit(&Line::Report(Box::new(report)))
}

/// A node and its bootstrap token.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    token: String,
}

/// Reads the `node: token` lines mesh-control's tokens file is made of here.
fn read_tokens(path: &Path) -> Result<Vec<Node>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut nodes = text
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.trim_start().starts_with('#'))
        .map(|line| {
            let (name, token) = line.split_once(':').with_context(|| {
                format!("{}: expected `node: token`, got {line:?}", path.display())
            })?;
            Ok(Node {
                name: name.trim().to_owned(),
                token: token.trim().trim_matches('"').to_owned(),
            })
        })
        .collect::<Result<Vec<Node>>>()?;
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    ensure!(!nodes.is_empty(), "{} names no node", path.display());
    Ok(nodes)
}

/// The shape of the benchmark's configuration: which workload is where and
/// which service selects it.
#[derive(Debug)]
struct Mesh {
    nodes: usize,
    services: usize,
    workloads: usize,
}

impl Mesh {
    fn new(nodes: usize, services: usize, workloads: usize) -> Result<Mesh> {
        ensure!(
            (1..=MAX_SERVICES).contains(&services),
            "services must be 1..={MAX_SERVICES} (one VIP each in 198.18.0.0/15)"
        );
        ensure!(
            (services..=MAX_WORKLOADS).contains(&workloads),
            "workloads must be {services}..={MAX_WORKLOADS} (at least one per service)"
        );
        Ok(Mesh {
            nodes,
            services,
            workloads,
        })
    }

    fn node_of(&self, workload: usize) -> usize {
        workload * self.nodes / self.workloads
    }

    fn service_of(&self, workload: usize) -> usize {
        workload % self.services
    }

    fn workload_doc(&self, w: usize, nodes: &[Node], app: &str) -> String {
        let ip = offset(WORKLOAD_BASE, w);
        let node = &nodes[self.node_of(w)].name;
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: wl-{w}, labels: {{app: {app}}}}}\nspec: {{node: {node}, ip: {ip}, ports: [{{port: 8080}}]}}\n"
        )
    }

    fn service_doc(s: usize) -> String {
        let vip = offset(VIP_BASE, s);
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc-{s}}}\nspec: {{vips: [{vip}], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: svc-{s}}}}}\n"
        )
    }

    /// Every document: workloads first, so services resolve their endpoints once.
    fn documents<'a>(&'a self, nodes: &'a [Node]) -> impl Iterator<Item = String> + 'a {
        let workloads = (0..self.workloads)
            .map(|w| self.workload_doc(w, nodes, &service_name(self.service_of(w))));
        workloads.chain((0..self.services).map(Mesh::service_doc))
    }
}

fn service_name(s: usize) -> String {
    format!("svc-{s}")
}

fn offset(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    let n = u32::try_from(n).expect("bounded by MAX_SERVICES and MAX_WORKLOADS");
    Ipv4Addr::from(u32::from(base) + n)
}

type OperatorClient = mesh_api::pb::operator_client::OperatorClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

/// The operator API over mesh-control's unix socket.
struct Operator(OperatorClient);

impl Operator {
    async fn connect(socket: &Path) -> Result<Operator> {
        let target = Target::Unix(socket.to_path_buf());
        Ok(Operator(client::operator(&target, None).await?))
    }

    /// Applies documents; returns the store revision after them.
    async fn apply(&self, yaml: String) -> Result<u64> {
        let mut client = self.0.clone();
        let request = ApplyRequest {
            yaml,
            dry_run: false,
        };
        let response = timeout(APPLY_TIMEOUT, client.apply(request))
            .await
            .context("apply timed out")?
            .context("apply")?;
        Ok(response.into_inner().revision)
    }
}

async fn populate(
    operator: &Operator,
    mesh: &Mesh,
    nodes: &[Node],
    batch: usize,
) -> Result<Populate> {
    let start = Instant::now();
    let (mut documents, mut applies, mut revision) = (0, 0, 0);
    let mut yaml = String::new();
    let mut in_batch = 0;
    for doc in mesh.documents(nodes) {
        if in_batch > 0 {
            yaml.push_str("---\n");
        }
        yaml.push_str(&doc);
        in_batch += 1;
        documents += 1;
        if in_batch == batch {
            revision = operator.apply(std::mem::take(&mut yaml)).await?;
            (in_batch, applies) = (0, applies + 1);
        }
    }
    if in_batch > 0 {
        revision = operator.apply(yaml).await?;
        applies += 1;
    }
    Ok(Populate {
        documents,
        applies,
        secs: start.elapsed().as_secs_f64(),
        revision,
    })
}

/// An agent finished a sync: it ACKed a response completing `revision`.
#[derive(Debug)]
struct Synced {
    agent: usize,
    revision: u64,
    /// Just after the ACK was handed to the stream.
    at: Instant,
    /// Since its previous sync: encoded response bytes, responses, resources.
    bytes: u64,
    responses: u32,
    resources: u64,
}

#[derive(Debug)]
enum Event {
    Synced(Synced),
    Failed { agent: usize, error: String },
}

/// The simulated agents: one task and one stream each.
struct Fleet {
    nodes: Vec<String>,
    started: Instant,
    events: mpsc::UnboundedReceiver<Event>,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Agents connect on their first request; `per_connection` of them
    /// share each HTTP/2 connection.
    fn start(
        grpc: SocketAddr,
        tls: Option<&Tls>,
        nodes: &[Node],
        per_connection: usize,
    ) -> Result<Fleet> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let target = Target::Http(format!("{scheme}://{grpc}"));
        let (tx, events) = mpsc::unbounded_channel();
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        let mut channel = None;
        for (agent, node) in nodes.iter().enumerate() {
            if agent % per_connection == 0 {
                channel = Some(client::lazy_channel(&target, tls)?);
            }
            let channel = channel.clone().expect("set for the first agent");
            let (node, events) = (node.clone(), tx.clone());
            tasks.spawn(async move {
                if let Err(e) = run_agent(agent, channel, &node, &events).await {
                    let error = format!("{e:#}");
                    let _ = events.send(Event::Failed { agent, error });
                }
            });
        }
        Ok(Fleet {
            nodes: nodes.iter().map(|n| n.name.clone()).collect(),
            started,
            events,
            tasks,
        })
    }

    /// Waits until every agent has ACKed `revision` (or a later one); one
    /// `Synced` per agent.
    async fn wait_for(&mut self, revision: u64, deadline: Instant) -> Result<Vec<Synced>> {
        let mut done = vec![false; self.nodes.len()];
        let mut synced = Vec::with_capacity(self.nodes.len());
        while synced.len() < self.nodes.len() {
            let Ok(event) = timeout_at(deadline, self.events.recv()).await else {
                bail!(
                    "only {} of {} agents ACKed revision {revision} in time",
                    synced.len(),
                    self.nodes.len()
                );
            };
            match event.context("every agent task ended")? {
                Event::Synced(s) if s.revision >= revision && !done[s.agent] => {
                    done[s.agent] = true;
                    synced.push(s);
                }
                Event::Synced(_) => {}
                Event::Failed { agent, error } => {
                    bail!("agent {}: {error}", self.nodes[agent])
                }
            }
        }
        Ok(synced)
    }

    async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// What an agent received since its last sync.
#[derive(Debug, Default)]
struct Tally {
    bytes: u64,
    responses: u32,
    resources: u64,
}

/// Subscribes as `node`, then decodes and ACKs every response, reporting
/// each completed revision. Returns only on error.
async fn run_agent(
    agent: usize,
    channel: Channel,
    node: &Node,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<()> {
    let mut client = DistributionClient::with_interceptor(channel, Bearer::new(Some(&node.token))?);
    let (requests, rx) = mpsc::unbounded_channel();
    requests.send(DeltaRequest {
        node: node.name.clone(),
        ..DeltaRequest::default()
    })?;
    let outbound = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|request| (request, rx))
    });
    let mut responses = client
        .delta_resources(outbound)
        .await
        .context("subscribing")?
        .into_inner();
    let (mut tally, mut synced) = (Tally::default(), 0);
    loop {
        let response: DeltaResponse = responses
            .message()
            .await
            .context("receiving")?
            .context("mesh-control ended the stream")?;
        tally.bytes += response.encoded_len() as u64;
        tally.responses += 1;
        tally.resources += (response.resources.len() + response.removed_resources.len()) as u64;
        requests.send(DeltaRequest {
            response_nonce: response.nonce,
            ..DeltaRequest::default()
        })?;
        // A response that is only part of a larger delta carries the
        // revision the agent had; the last part carries the new one.
        let revision: u64 = response.system_version_info.parse().unwrap_or(0);
        if revision > synced {
            synced = revision;
            let tally = std::mem::take(&mut tally);
            events.send(Event::Synced(Synced {
                agent,
                revision,
                at: Instant::now(),
                bytes: tally.bytes,
                responses: tally.responses,
                resources: tally.resources,
            }))?;
        }
    }
}

fn first_sync(revision: u64, started: Instant, synced: &[Synced]) -> FirstSync {
    let last = synced.iter().map(|s| s.at).max().unwrap_or(started);
    FirstSync {
        revision,
        secs: last.duration_since(started).as_secs_f64(),
        bytes_per_agent_avg: mean(synced.iter().map(|s| s.bytes as f64)),
        bytes_per_agent_max: synced.iter().map(|s| s.bytes).max().unwrap_or(0),
        responses_per_agent_avg: mean(synced.iter().map(|s| f64::from(s.responses))),
        resources_per_agent_avg: mean(synced.iter().map(|s| s.resources as f64)),
    }
}

/// One endpoint change: workload `w` leaves its service (its label gets a
/// value no service selects), or comes back.
struct Flip {
    workload: usize,
    service: usize,
    drain: bool,
}

/// The changes: change i drains the (i mod replicas)-th workload of a
/// service picked evenly over all services, so that changes hit different
/// services and nodes; a workload picked again comes back to its service.
fn flips(mesh: &Mesh, count: usize) -> Vec<Flip> {
    let replicas = (mesh.workloads / mesh.services).max(1);
    let mut drained = HashSet::new();
    (0..count)
        .map(|i| {
            let service = (i * mesh.services / count) % mesh.services;
            let workload = service + mesh.services * (i % replicas);
            let drain = if drained.contains(&workload) {
                drained.remove(&workload);
                false
            } else {
                drained.insert(workload);
                true
            };
            Flip {
                workload,
                service,
                drain,
            }
        })
        .collect()
}

/// Times `count` changes, one at a time.
async fn changes(
    operator: &Operator,
    fleet: &mut Fleet,
    mesh: &Mesh,
    nodes: &[Node],
    count: usize,
    limit: Duration,
) -> Result<Changes> {
    let mut runs = Vec::with_capacity(count);
    let mut responses_max = 0;
    let mut previous = 0;
    for flip in flips(mesh, count) {
        let (run, synced) = change(operator, fleet, mesh, nodes, &flip, limit).await?;
        ensure!(
            run.revision > previous,
            "revisions went backwards: {} after {previous}",
            run.revision
        );
        previous = run.revision;
        responses_max = synced
            .iter()
            .map(|s| s.responses)
            .fold(responses_max, u32::max);
        progress(&format!(
            "change {}/{count} ({} of {}): acked by all in {:.1} ms, apply {:.1} ms, {:.0} B per agent",
            runs.len() + 1,
            run.workload,
            run.service,
            run.acked_by_all_ms,
            run.apply_ms,
            run.bytes_per_agent_avg
        ));
        runs.push(run);
    }
    Ok(summarize(runs, responses_max))
}

/// Applies one flip and waits for every agent to ACK it.
async fn change(
    operator: &Operator,
    fleet: &mut Fleet,
    mesh: &Mesh,
    nodes: &[Node],
    flip: &Flip,
    limit: Duration,
) -> Result<(ChangeRun, Vec<Synced>)> {
    let service = service_name(flip.service);
    let app = if flip.drain {
        format!("{service}-drained")
    } else {
        service.clone()
    };
    let yaml = mesh.workload_doc(flip.workload, nodes, &app);
    let sent = Instant::now();
    let revision = operator.apply(yaml).await?;
    let returned = Instant::now();
    let synced = fleet.wait_for(revision, returned + limit).await?;
    if let Some(s) = synced.iter().find(|s| s.resources == 0) {
        bail!(
            "agent {} reached revision {revision} without receiving the change",
            fleet.nodes[s.agent]
        );
    }
    let last = synced.iter().map(|s| s.at).max().unwrap_or(returned);
    let run = ChangeRun {
        workload: format!("wl-{}", flip.workload),
        service,
        revision,
        apply_ms: millis(returned.duration_since(sent)),
        // An agent may ACK before the apply's answer reaches us: that is 0.
        acked_by_all_ms: millis(last.saturating_duration_since(returned)),
        acked_by_all_since_apply_sent_ms: millis(last.saturating_duration_since(sent)),
        bytes_per_agent_avg: mean(synced.iter().map(|s| s.bytes as f64)),
        bytes_per_agent_max: synced.iter().map(|s| s.bytes).max().unwrap_or(0),
    };
    Ok((run, synced))
}

fn summarize(runs: Vec<ChangeRun>, responses_per_agent_max: u32) -> Changes {
    Changes {
        count: runs.len(),
        acked_by_all_ms: Percentiles::of(runs.iter().map(|r| r.acked_by_all_ms).collect()),
        acked_by_all_since_apply_sent_ms: Percentiles::of(
            runs.iter()
                .map(|r| r.acked_by_all_since_apply_sent_ms)
                .collect(),
        ),
        apply_ms: Percentiles::of(runs.iter().map(|r| r.apply_ms).collect()),
        bytes_per_agent_avg: mean(runs.iter().map(|r| r.bytes_per_agent_avg)),
        bytes_per_agent_max: runs
            .iter()
            .map(|r| r.bytes_per_agent_max)
            .max()
            .unwrap_or(0),
        responses_per_agent_max,
        each: runs,
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0u32), |(sum, n), v| (sum + v, n + 1));
    if n == 0 { 0.0 } else { sum / f64::from(n) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::of((1..=20).map(f64::from).collect());
        assert_eq!((p.p50, p.p99, p.max), (10.0, 20.0, 20.0));
        let p = Percentiles::of(vec![]);
        assert_eq!((p.p50, p.p99, p.max), (0.0, 0.0, 0.0));
    }

    #[test]
    fn the_mesh_spreads_workloads_over_nodes_and_services() {
        let mesh = Mesh::new(1000, 10_000, 50_000).expect("valid");
        assert_eq!(mesh.node_of(0), 0);
        assert_eq!(mesh.node_of(49), 0);
        assert_eq!(mesh.node_of(50), 1);
        assert_eq!(mesh.node_of(49_999), 999);
        assert_eq!(mesh.service_of(10_003), 3);
        assert_eq!(offset(VIP_BASE, 9_999).to_string(), "198.18.39.16");
        assert_eq!(offset(WORKLOAD_BASE, 49_999).to_string(), "10.0.195.80");
        assert!(
            Mesh::new(10, 10, 5).is_err(),
            "fewer workloads than services"
        );
        assert!(Mesh::new(10, MAX_SERVICES + 1, MAX_SERVICES + 1).is_err());
    }

    #[test]
    fn changes_hit_different_services_and_a_workload_twice_comes_back() {
        let mesh = Mesh::new(1000, 10_000, 50_000).expect("valid");
        let flips = flips(&mesh, 20);
        let services: HashSet<usize> = flips.iter().map(|f| f.service).collect();
        assert_eq!(services.len(), 20);
        assert!(
            flips
                .iter()
                .all(|f| mesh.service_of(f.workload) == f.service && f.drain)
        );
        let nodes: HashSet<usize> = flips.iter().map(|f| mesh.node_of(f.workload)).collect();
        assert_eq!(nodes.len(), 20);

        let mesh = Mesh::new(2, 2, 4).expect("valid");
        let seen: Vec<(usize, bool)> = flips_of(&mesh, 6);
        assert_eq!(
            seen,
            [
                (0, true),
                (2, true),
                (0, false),
                (3, true),
                (1, true),
                (3, false)
            ]
        );
    }

    fn flips_of(mesh: &Mesh, count: usize) -> Vec<(usize, bool)> {
        flips(mesh, count)
            .iter()
            .map(|f| (f.workload, f.drain))
            .collect()
    }
}
