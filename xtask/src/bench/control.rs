//! `cargo xtask bench control`: one `mesh-control` on loopback with a
//! temporary store, and `mesh-control-bench` (mesh-tests) as the load: it
//! populates the store through the operator socket, runs one delta stream
//! per simulated agent and times the first full sync and endpoint changes
//! (see its module docs). Here we sample the server's CPU time and memory
//! from /proc between the generator's phases, and judge the aims.
//!
//! ```text
//! xtask --spawn--> mesh-control  127.0.0.1:0 (gRPC, metrics), <tmp>/operator.sock, <tmp>/store
//!       --spawn--> mesh-control-bench --stdout JSON lines--> {"phase":...} ... {"report":{...}}
//!       every 50 ms: VmRSS of mesh-control; at each phase: its utime+stime
//! ```
use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::{Server, cpu_ticks, process_kb, ticks_per_s, write_file};
use crate::{cluster, deps};

/// How often mesh-control's VmRSS is sampled.
const RSS_SAMPLE: Duration = Duration::from_millis(50);
/// mesh-control's own grace period is 10 s.
const STOP_WITHIN: Duration = Duration::from_secs(15);
/// Aims of the control-plane issue.
const ACK_P99_AIM_MS: f64 = 500.0;
const BYTES_PER_CHANGE_AIM: f64 = 2_000.0;

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// A small run, to check that the benchmark works: 100 agents, 1,000
    /// Services, 5,000 Workloads, 5 changes (flags given override these).
    #[arg(long)]
    pub quick: bool,
    /// Simulated node agents, one delta stream and one HTTP/2 connection each [default: 1000].
    #[arg(long)]
    pub agents: Option<usize>,
    /// Services, one VIP and one port each [default: 10000].
    #[arg(long)]
    pub services: Option<usize>,
    /// Workloads, spread evenly over the agents' nodes [default: 50000].
    #[arg(long)]
    pub workloads: Option<usize>,
    /// Endpoint changes to time, one at a time [default: 20].
    #[arg(long)]
    pub changes: Option<usize>,
    /// `etcd`: the same load on the file store, then on `--store etcd://`
    /// (a local one-member etcd), the figures side by side.
    #[arg(long, value_enum, default_value_t = StoreKind::File)]
    pub store: StoreKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    File,
    Etcd,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Sizes {
    agents: usize,
    services: usize,
    workloads: usize,
    changes: usize,
}

const FULL: Sizes = Sizes {
    agents: 1_000,
    services: 10_000,
    workloads: 50_000,
    changes: 20,
};

const QUICK: Sizes = Sizes {
    agents: 100,
    services: 1_000,
    workloads: 5_000,
    changes: 5,
};

impl Sizes {
    fn new(args: &ControlArgs) -> Result<Sizes> {
        let base = if args.quick { QUICK } else { FULL };
        let sizes = Sizes {
            agents: args.agents.unwrap_or(base.agents),
            services: args.services.unwrap_or(base.services),
            workloads: args.workloads.unwrap_or(base.workloads),
            changes: args.changes.unwrap_or(base.changes),
        };
        ensure!(sizes.agents > 0, "--agents must be at least 1");
        ensure!(sizes.services > 0, "--services must be at least 1");
        ensure!(
            sizes.workloads >= sizes.services,
            "--workloads must be at least --services (each Service selects workloads)"
        );
        ensure!(sizes.changes > 0, "--changes must be at least 1");
        Ok(sizes)
    }
}

// ---- What mesh-control-bench prints (see tests/src/bin/mesh-control-bench.rs).

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    Populate,
    Sync,
    Changes,
    Done,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Phase(Phase),
    Report(Box<LoadReport>),
}

#[derive(Debug, Deserialize)]
struct LoadReport {
    connections: usize,
    populate: Populate,
    first_sync: FirstSync,
    changes: Changes,
}

#[derive(Debug, Serialize, Deserialize)]
struct Populate {
    documents: usize,
    applies: usize,
    secs: f64,
    revision: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct FirstSync {
    revision: u64,
    secs: f64,
    bytes_per_agent_avg: f64,
    bytes_per_agent_max: u64,
    responses_per_agent_avg: f64,
    resources_per_agent_avg: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Changes {
    count: usize,
    acked_by_all_ms: Percentiles,
    acked_by_all_since_apply_sent_ms: Percentiles,
    apply_ms: Percentiles,
    bytes_per_agent_avg: f64,
    bytes_per_agent_max: u64,
    responses_per_agent_max: u32,
    each: Vec<ChangeRun>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

#[derive(Debug, Serialize, Deserialize)]
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

// ---- What this benchmark prints.

#[derive(Debug, Serialize)]
struct Report {
    quick: bool,
    sizes: Sizes,
    /// HTTP/2 connections the agents' streams used.
    connections: usize,
    populate: Populate,
    first_sync: FirstSync,
    changes: Changes,
    server: ServerCost,
    /// CPU time of the load generator (decoding every response), which
    /// shares the machine with mesh-control.
    generator_cpu_secs: f64,
    aims: Vec<Aim>,
}

/// mesh-control's CPU time and memory.
#[derive(Debug, Serialize)]
struct ServerCost {
    cpu_secs: ByPhase<f64>,
    /// Largest VmRSS sampled in each phase.
    peak_rss_kb: ByPhase<u64>,
    /// The kernel's high-water mark of its RSS, at the end.
    vm_hwm_kb: u64,
    /// From its /metrics.
    responses_sent: u64,
    response_bytes_sent: u64,
}

#[derive(Debug, Default, Serialize)]
struct ByPhase<T> {
    populate: T,
    first_sync: T,
    changes: T,
    /// From its start through the last change.
    total: T,
}

#[derive(Debug, Serialize)]
struct Aim {
    aim: String,
    measured: f64,
    limit: f64,
    unit: &'static str,
    met: bool,
}

pub(super) fn run(args: &ControlArgs) -> Result<()> {
    let sizes = Sizes::new(args)?;
    deps::build_release_binaries()?;
    raise_open_files_limit(sizes.agents)?;
    let file = measure(args.quick, sizes, None)?;
    if args.store == StoreKind::File {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&file)?);
        } else {
            print!("{}", render(&file));
        }
        return Ok(());
    }
    deps::ensure_debian(deps::RUN_PACKAGES)?;
    let dir = TempDir::new()?;
    let etcd = Etcd::start(&dir.0)?;
    let on_etcd = measure(args.quick, sizes, Some(&etcd.url))?;
    drop(etcd);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"file": file, "etcd": on_etcd}))?
        );
    } else {
        print!("{}", render_side_by_side(&file, &on_etcd));
    }
    Ok(())
}

/// One run of the load against a fresh mesh-control on the file store, or
/// on `etcd` (an `etcd://` URL).
fn measure(quick: bool, sizes: Sizes, etcd: Option<&str>) -> Result<Report> {
    let dir = TempDir::new()?;
    let tokens = dir.0.join("tokens.yaml");
    write_file(&tokens, &tokens_file(sizes.agents))?;
    let control = Control::start(&dir.0, &tokens, etcd)?;
    let sampler = RssSampler::start(control.server.pid());
    let load = run_load(&sizes, &control, &tokens, &sampler)?;
    finish(quick, sizes, control, sampler, load)
}

/// A one-member etcd on loopback for the bench, stopped on drop. Its
/// transactions may hold a whole populate batch (1,000 documents).
struct Etcd {
    _server: Server,
    url: String,
}

impl Etcd {
    fn start(dir: &Path) -> Result<Etcd> {
        let port = |()| -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (client, peer) = (port(())?, port(())?);
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "bench"])
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .args(["--max-txn-ops", "5000", "--max-request-bytes", "16777216"]);
        let mut server = Server::start("etcd".into(), cmd, dir.join("etcd.log"))
            .context("starting etcd (cargo xtask deps installs etcd-server)")?;
        server.wait_line(|line| {
            line.contains("ready to serve client requests")
                .then_some(())
        })?;
        Ok(Etcd {
            _server: server,
            url: format!("etcd://127.0.0.1:{client}/mesh-bench"),
        })
    }
}

/// A row of the side-by-side table: its label, the figure, and its decimals.
type Row = (&'static str, fn(&Report) -> f64, usize);

/// The figures of both stores, one row each.
fn render_side_by_side(file: &Report, etcd: &Report) -> String {
    let s = &file.sizes;
    let mut out = format!(
        "mesh-control benchmark{}, file store vs etcd (one local member): {} agents, {} Services, {} Workloads, loopback\n\n",
        if file.quick { " (quick)" } else { "" },
        s.agents,
        s.services,
        s.workloads
    );
    let _ = writeln!(out, "{:<54} {:>12} {:>12}", "", "file", "etcd");
    let rows: [Row; 12] = [
        ("populate, s", |r| r.populate.secs, 2),
        ("first full sync of all agents, s", |r| r.first_sync.secs, 2),
        (
            "  bytes per agent (avg)",
            |r| r.first_sync.bytes_per_agent_avg,
            0,
        ),
        (
            "change ACKed by all after the apply was sent, p50 ms",
            |r| r.changes.acked_by_all_since_apply_sent_ms.p50,
            1,
        ),
        (
            "change ACKed by all after the apply was sent, p99 ms",
            |r| r.changes.acked_by_all_since_apply_sent_ms.p99,
            1,
        ),
        ("  the apply alone, p50 ms", |r| r.changes.apply_ms.p50, 1),
        ("  the apply alone, p99 ms", |r| r.changes.apply_ms.p99, 1),
        (
            "bytes per agent per change (avg)",
            |r| r.changes.bytes_per_agent_avg,
            0,
        ),
        (
            "bytes per agent per change (max)",
            |r| r.changes.bytes_per_agent_max as f64,
            0,
        ),
        ("mesh-control CPU s (total)", |r| r.server.cpu_secs.total, 2),
        (
            "mesh-control VmHWM MB",
            |r| r.server.vm_hwm_kb as f64 / 1024.0,
            1,
        ),
        ("load generator CPU s", |r| r.generator_cpu_secs, 1),
    ];
    for (name, figure, decimals) in rows {
        let _ = writeln!(
            out,
            "{name:<54} {:>12.decimals$} {:>12.decimals$}",
            figure(file),
            figure(etcd)
        );
    }
    for (store, report) in [("file", file), ("etcd", etcd)] {
        let _ = writeln!(out, "\nAims ({store})");
        for aim in &report.aims {
            let verdict = if aim.met { "met" } else { "MISSED" };
            let _ = writeln!(
                out,
                "  {verdict:<7} {} (measured {:.1} {})",
                aim.aim, aim.measured, aim.unit
            );
        }
    }
    out
}

/// Each agent holds a connection, and mesh-control as many: lift the soft
/// open-files limit (the children inherit it) and check it suffices.
fn raise_open_files_limit(agents: usize) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the whole call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: `limit` is a valid rlimit for the whole call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        bail!("setrlimit: {}", std::io::Error::last_os_error());
    }
    let needed = agents as u64 + 256;
    ensure!(
        limit.rlim_cur >= needed,
        "{agents} agents need about {needed} open files per process; the limit is {}",
        limit.rlim_cur
    );
    Ok(())
}

/// A fresh directory under /tmp, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = PathBuf::from(format!(
            "/tmp/mesh-bench-control-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn node_name(i: usize, agents: usize) -> String {
    let width = agents.to_string().len().max(4);
    format!("node{i:0width$}")
}

/// `nodeNNNN: token` for nodes 1..=agents; tokens differ per run and node.
fn tokens_file(agents: usize) -> String {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        ^ u128::from(std::process::id());
    (1..=agents).fold(String::new(), |mut out, i| {
        let _ = writeln!(out, "{}: bench-{seed:x}-{i}", node_name(i, agents));
        out
    })
}

/// The running mesh-control.
struct Control {
    server: Server,
    ready: Ready,
    socket: PathBuf,
}

impl Control {
    fn start(dir: &Path, tokens: &Path, etcd: Option<&str>) -> Result<Control> {
        let socket = dir.join("operator.sock");
        let mut cmd = Command::new(cluster::target_dir().join("release/mesh-control"));
        cmd.args(["--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .arg("--operator-socket")
            .arg(&socket)
            .arg("--store-dir")
            .arg(dir.join("store"))
            .arg("--tokens")
            .arg(tokens);
        if let Some(url) = etcd {
            cmd.args(["--store", url]);
        }
        let mut server = Server::start("mesh-control".into(), cmd, dir.join("mesh-control.log"))?;
        let ready = server.wait_line(Ready::parse)?;
        Ok(Control {
            server,
            ready,
            socket,
        })
    }

    /// A counter or gauge of its /metrics.
    fn metric(&self, name: &str) -> Result<u64> {
        let mut stream = TcpStream::connect_timeout(&self.ready.metrics, Duration::from_secs(5))
            .context("connecting to mesh-control's metrics")?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: mesh-control\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        stream.read_to_string(&mut body)?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .with_context(|| format!("no {name} in mesh-control's /metrics"))
    }
}

/// What `mesh-control ready: grpc=... metrics=... [trust-domain=... ca=...]` says.
#[derive(Debug, PartialEq)]
struct Ready {
    grpc: SocketAddr,
    metrics: SocketAddr,
    /// With a CA, its gRPC listener speaks TLS: agents trust this bundle.
    ca: Option<PathBuf>,
    trust_domain: Option<String>,
}

impl Ready {
    fn parse(line: &str) -> Option<Ready> {
        let rest = line.strip_prefix("mesh-control ready:")?;
        let field = |name: &str| rest.split_whitespace().find_map(|w| w.strip_prefix(name));
        Some(Ready {
            grpc: field("grpc=")?.parse().ok()?,
            metrics: field("metrics=")?.parse().ok()?,
            ca: field("ca=").map(PathBuf::from),
            trust_domain: field("trust-domain=").map(str::to_owned),
        })
    }
}

/// Samples a process's VmRSS in the background; the peak is read and reset
/// at each phase.
struct RssSampler {
    pid: u32,
    peak_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let peak_kb = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak_kb, stop) = (peak_kb.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(kb) = process_kb(pid, "VmRSS") {
                        peak_kb.fetch_max(kb, Ordering::Relaxed);
                    }
                    thread::sleep(RSS_SAMPLE);
                }
            })
        };
        RssSampler {
            pid,
            peak_kb,
            stop,
            thread: Some(thread),
        }
    }

    /// The peak since the last call, including now.
    fn take_peak(&self) -> u64 {
        if let Ok(kb) = process_kb(self.pid, "VmRSS") {
            self.peak_kb.fetch_max(kb, Ordering::Relaxed);
        }
        self.peak_kb.swap(0, Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// mesh-control's figures when a phase began.
#[derive(Debug, Clone, Copy)]
struct Mark {
    phase: Phase,
    cpu_ticks: u64,
    /// Peak RSS of the phase this mark ends.
    peak_before_kb: u64,
}

/// The generator's report, and mesh-control's figures at each phase.
struct Load {
    report: LoadReport,
    marks: Vec<Mark>,
    generator_cpu_ticks: u64,
}

/// The load generator; killed on drop if it is still running.
struct Generator(Child);

impl Drop for Generator {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn run_load(sizes: &Sizes, control: &Control, tokens: &Path, sampler: &RssSampler) -> Result<Load> {
    let mut cmd = Command::new(cluster::target_dir().join("release/mesh-control-bench"));
    cmd.arg("--grpc").arg(control.ready.grpc.to_string());
    if let Some(ca) = &control.ready.ca {
        cmd.arg("--ca-bundle").arg(ca);
    }
    if let Some(trust_domain) = &control.ready.trust_domain {
        cmd.args(["--trust-domain", trust_domain]);
    }
    let mut generator = Generator(
        cmd.arg("--operator-socket")
            .arg(&control.socket)
            .arg("--tokens")
            .arg(tokens)
            .args(["--services", &sizes.services.to_string()])
            .args(["--workloads", &sizes.workloads.to_string()])
            .args(["--changes", &sizes.changes.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting mesh-control-bench")?,
    );
    let stdout = generator.0.stdout.take().context("generator's stdout")?;
    let server_pid = control.server.pid();
    let (mut marks, mut report, mut generator_cpu_ticks) = (Vec::new(), None, 0);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading mesh-control-bench's output")?;
        match serde_json::from_str::<Line>(&line)
            .with_context(|| format!("mesh-control-bench printed {line:?}"))?
        {
            Line::Phase(phase) => {
                marks.push(Mark {
                    phase,
                    cpu_ticks: cpu_ticks(server_pid).context("mesh-control is gone")?,
                    peak_before_kb: sampler.take_peak(),
                });
                if phase == Phase::Done {
                    generator_cpu_ticks = cpu_ticks(generator.0.id())?;
                }
            }
            Line::Report(r) => report = Some(*r),
        }
    }
    let status = generator.0.wait()?;
    ensure!(status.success(), "mesh-control-bench failed ({status})");
    Ok(Load {
        report: report.context("mesh-control-bench printed no report")?,
        marks,
        generator_cpu_ticks,
    })
}

/// Takes mesh-control's final figures, stops it, and assembles the report.
fn finish(
    quick: bool,
    sizes: Sizes,
    mut control: Control,
    sampler: RssSampler,
    load: Load,
) -> Result<Report> {
    control.server.ensure_running()?;
    let vm_hwm_kb = process_kb(control.server.pid(), "VmHWM")?;
    let responses_sent = control.metric("mesh_control_responses_total")?;
    let response_bytes_sent = control.metric("mesh_control_response_bytes_total")?;
    drop(sampler);
    control.server.stop(STOP_WITHIN)?;
    let ticks = ticks_per_s()?;
    let (cpu_secs, peak_rss_kb) = by_phase(&load.marks, ticks)?;
    let LoadReport {
        connections,
        populate,
        first_sync,
        changes,
    } = load.report;
    let aims = aims(&sizes, &changes);
    Ok(Report {
        quick,
        sizes,
        connections,
        populate,
        first_sync,
        changes,
        server: ServerCost {
            cpu_secs,
            peak_rss_kb,
            vm_hwm_kb,
            responses_sent,
            response_bytes_sent,
        },
        generator_cpu_secs: load.generator_cpu_ticks as f64 / ticks,
        aims,
    })
}

/// CPU seconds and peak RSS per phase, from the marks at each phase's start.
fn by_phase(marks: &[Mark], ticks_per_s: f64) -> Result<(ByPhase<f64>, ByPhase<u64>)> {
    let at = |phase| {
        marks
            .iter()
            .find(|m| m.phase == phase)
            .copied()
            .with_context(|| format!("mesh-control-bench never reported phase {phase:?}"))
    };
    let [populate, sync, changes, done] = [
        at(Phase::Populate)?,
        at(Phase::Sync)?,
        at(Phase::Changes)?,
        at(Phase::Done)?,
    ];
    let secs =
        |from: Mark, to: Mark| to.cpu_ticks.saturating_sub(from.cpu_ticks) as f64 / ticks_per_s;
    let cpu = ByPhase {
        populate: secs(populate, sync),
        first_sync: secs(sync, changes),
        changes: secs(changes, done),
        total: done.cpu_ticks as f64 / ticks_per_s,
    };
    let rss = ByPhase {
        populate: sync.peak_before_kb,
        first_sync: changes.peak_before_kb,
        changes: done.peak_before_kb,
        total: marks.iter().map(|m| m.peak_before_kb).max().unwrap_or(0),
    };
    Ok((cpu, rss))
}

/// The latency aim is judged from the moment the apply was sent (commit
/// included): agents often ACK before the apply's answer is back, which
/// makes the figure from its return mostly 0.
fn aims(sizes: &Sizes, changes: &Changes) -> Vec<Aim> {
    let p99 = changes.acked_by_all_since_apply_sent_ms.p99;
    let bytes = changes.bytes_per_agent_max as f64;
    vec![
        Aim {
            aim: format!(
                "one change acknowledged by all {} agents, p99 < {ACK_P99_AIM_MS} ms (from the apply sent)",
                sizes.agents
            ),
            measured: p99,
            limit: ACK_P99_AIM_MS,
            unit: "ms",
            met: p99 < ACK_P99_AIM_MS,
        },
        Aim {
            aim: format!("at most {BYTES_PER_CHANGE_AIM} B per agent per change (largest)"),
            measured: bytes,
            limit: BYTES_PER_CHANGE_AIM,
            unit: "B",
            met: bytes <= BYTES_PER_CHANGE_AIM,
        },
    ]
}

fn render(r: &Report) -> String {
    let s = &r.sizes;
    let mut out = format!(
        "mesh-control benchmark{}: {} agents on {} HTTP/2 connections, {} Services, {} Workloads, loopback\n\n",
        if r.quick { " (quick)" } else { "" },
        s.agents,
        r.connections,
        s.services,
        s.workloads
    );
    render_load(&mut out, r);
    render_server(&mut out, r);
    let _ = writeln!(out, "\nAims");
    for aim in &r.aims {
        let verdict = if aim.met { "met" } else { "MISSED" };
        let _ = writeln!(
            out,
            "  {verdict:<7} {} (measured {:.1} {})",
            aim.aim, aim.measured, aim.unit
        );
    }
    out
}

fn mb(bytes: f64) -> f64 {
    bytes / 1e6
}

fn render_load(out: &mut String, r: &Report) {
    let (p, f, c) = (&r.populate, &r.first_sync, &r.changes);
    let _ = writeln!(
        out,
        "Populate (operator socket)     {} documents in {} applies: {:.1} s, revision {}",
        p.documents, p.applies, p.secs, p.revision
    );
    let _ = writeln!(
        out,
        "First full sync of all agents  {:.2} s (first subscribe to last ACK of revision {})",
        f.secs, f.revision
    );
    let _ = writeln!(
        out,
        "  per agent                    {:.2} MB (max {:.2}) in {:.0} responses, {:.0} resources",
        mb(f.bytes_per_agent_avg),
        mb(f.bytes_per_agent_max as f64),
        f.responses_per_agent_avg,
        f.resources_per_agent_avg
    );
    let (a, sent, apply) = (
        &c.acked_by_all_ms,
        &c.acked_by_all_since_apply_sent_ms,
        &c.apply_ms,
    );
    let _ = writeln!(
        out,
        "Endpoint change ACKed by all   p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms after the apply returned ({} changes)",
        a.p50, a.p99, a.max, c.count
    );
    let _ = writeln!(
        out,
        "  after the apply was sent     p50 {:.1} ms, p99 {:.1} ms (the apply alone: p50 {:.1} ms, p99 {:.1} ms)",
        sent.p50, sent.p99, apply.p50, apply.p99
    );
    let _ = writeln!(
        out,
        "  bytes per agent per change   avg {:.0} B, max {} B (at most {} response(s) per agent)",
        c.bytes_per_agent_avg, c.bytes_per_agent_max, c.responses_per_agent_max
    );
}

fn render_server(out: &mut String, r: &Report) {
    let srv = &r.server;
    let _ = writeln!(out, "\nmesh-control        CPU s   peak RSS MB");
    let rows = [
        ("populate", srv.cpu_secs.populate, srv.peak_rss_kb.populate),
        (
            "first sync",
            srv.cpu_secs.first_sync,
            srv.peak_rss_kb.first_sync,
        ),
        ("changes", srv.cpu_secs.changes, srv.peak_rss_kb.changes),
        ("total", srv.cpu_secs.total, srv.peak_rss_kb.total),
    ];
    for (name, cpu, rss_kb) in rows {
        let _ = writeln!(
            out,
            "  {name:<14} {cpu:>9.2} {:>13.1}",
            rss_kb as f64 / 1024.0
        );
    }
    let _ = writeln!(
        out,
        "  VmHWM {:.1} MB; sent {} responses, {:.1} MB; the load generator used {:.1} CPU s",
        srv.vm_hwm_kb as f64 / 1024.0,
        srv.responses_sent,
        mb(srv.response_bytes_sent as f64),
        r.generator_cpu_secs
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ready_line() {
        let line = "mesh-control ready: grpc=127.0.0.1:4242 metrics=127.0.0.1:4343 operator-socket=/tmp/x/operator.sock revision=0 trust-domain=cluster.local ca=/tmp/x/store/ca/ca.crt cert-ttl=86400s";
        assert_eq!(
            Ready::parse(line),
            Some(Ready {
                grpc: "127.0.0.1:4242".parse().expect("addr"),
                metrics: "127.0.0.1:4343".parse().expect("addr"),
                ca: Some("/tmp/x/store/ca/ca.crt".into()),
                trust_domain: Some("cluster.local".into()),
            })
        );
        let plain = "mesh-control ready: grpc=127.0.0.1:4242 metrics=127.0.0.1:4343";
        assert_eq!(Ready::parse(plain).and_then(|r| r.ca), None);
        assert_eq!(
            Ready::parse("2026-01-01T00:00:00Z INFO mesh-control ready: grpc=x"),
            None
        );
    }

    #[test]
    fn names_nodes_and_their_tokens() {
        assert_eq!(node_name(7, 1000), "node0007");
        assert_eq!(node_name(7, 20_000), "node00007");
        let tokens = tokens_file(3);
        let lines: Vec<&str> = tokens.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[2].starts_with("node0003: bench-"), "{tokens}");
    }

    #[test]
    fn splits_cpu_and_memory_by_phase() {
        let mark = |phase, cpu_ticks, peak_before_kb| Mark {
            phase,
            cpu_ticks,
            peak_before_kb,
        };
        let marks = [
            mark(Phase::Populate, 10, 1_000),
            mark(Phase::Sync, 110, 2_000),
            mark(Phase::Changes, 1_110, 9_000),
            mark(Phase::Done, 1_120, 8_000),
        ];
        let (cpu, rss) = by_phase(&marks, 100.0).expect("all phases");
        assert_eq!(
            (cpu.populate, cpu.first_sync, cpu.changes, cpu.total),
            (1.0, 10.0, 0.1, 11.2)
        );
        assert_eq!(
            (rss.populate, rss.first_sync, rss.changes, rss.total),
            (2_000, 9_000, 8_000, 9_000)
        );
        assert!(by_phase(&marks[..3], 100.0).is_err());
    }

    #[test]
    fn reads_the_generators_lines() {
        let phase: Line = serde_json::from_str(r#"{"phase":"sync"}"#).expect("phase");
        assert!(matches!(phase, Line::Phase(Phase::Sync)));
        assert!(serde_json::from_str::<Line>(r#"{"phase":"later"}"#).is_err());
    }
}
