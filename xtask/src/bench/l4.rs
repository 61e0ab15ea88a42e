//! `cargo xtask bench l4`: one local cluster, the same workloads run directly
//! between pods, through the node agent, and (for HTTP) through haproxy.
//!
//! ```text
//! node1-pod1  enrolled: its connections go through node1's agent
//! node1-pod2  not enrolled: the direct client, and haproxy's client
//! node1-pod3  same-node server          node2-pod1  cross-node server
//! node2-pod2  nginx                     node1 netns haproxy on the gateway, :9000
//! ```
use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Stdio,
    thread,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{Aim, POLL, READY_TIMEOUT, Server, cpu_ticks, parse_wrk, status_kb, write_file};
use crate::{
    cluster::{self, Cluster, ClusterSpec},
    deps,
};

const AGENT_CLIENT: &str = "node1-pod1";
const DIRECT_CLIENT: &str = "node1-pod2";
const SAME_NODE_SERVER: &str = "node1-pod3";
const CROSS_NODE_SERVER: &str = "node2-pod1";
const NGINX_POD: &str = "node2-pod2";
const PROXY_NODE: &str = "node1";

const ECHO_PORT: u16 = 7000;
const SINK_PORT: u16 = 7001;
const NGINX_PORT: u16 = 80;
const HAPROXY_PORT: u16 = 9000;

/// Bulk runs per path; the best one counts (the machine is shared and noisy).
const BULK_RUNS: usize = 2;
/// How long a testapp client may run before it fails.
const CLIENT_TIMEOUT_SECS: &str = "120";

#[derive(Debug, Args)]
pub struct L4Args {
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Shorter runs, to check that the benchmark works.
    #[arg(long)]
    pub quick: bool,
}

/// How much each figure measures.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sizes {
    pingpong_count: u32,
    pingpong_warmup: u32,
    bulk_bytes: u64,
    wrk_secs: u32,
}

const FULL: Sizes = Sizes {
    pingpong_count: 20_000,
    pingpong_warmup: 2_000,
    bulk_bytes: 2_000_000_000,
    wrk_secs: 10,
};

const QUICK: Sizes = Sizes {
    pingpong_count: 3_000,
    pingpong_warmup: 300,
    bulk_bytes: 300_000_000,
    wrk_secs: 3,
};

/// How a client reaches its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Route {
    Direct,
    Agent,
    Haproxy,
}

impl Route {
    fn client(self) -> &'static str {
        match self {
            Route::Agent => AGENT_CLIENT,
            Route::Direct | Route::Haproxy => DIRECT_CLIENT,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Route::Direct => "direct",
            Route::Agent => "via agent",
            Route::Haproxy => "via haproxy",
        })
    }
}

/// Where the server runs relative to the client (always on node1).
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Placement {
    SameNode,
    CrossNode,
}

impl Placement {
    const ALL: [Placement; 2] = [Placement::SameNode, Placement::CrossNode];

    fn server(self) -> &'static str {
        match self {
            Placement::SameNode => SAME_NODE_SERVER,
            Placement::CrossNode => CROSS_NODE_SERVER,
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Placement::SameNode => "same-node",
            Placement::CrossNode => "cross-node",
        })
    }
}

/// Part of `mesh-testapp pingpong`'s report.
#[derive(Debug, Serialize, Deserialize)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
}

/// Part of `mesh-testapp bulk`'s report.
#[derive(Debug, Serialize, Deserialize)]
struct Throughput {
    gbit_per_s: f64,
}

/// One figure on one path, direct and through the agent.
#[derive(Debug, Serialize)]
struct Comparison<T> {
    path: Placement,
    direct: T,
    agent: T,
    /// p50 latency or throughput through the agent over the direct one.
    agent_over_direct: f64,
}

#[derive(Debug, Serialize)]
struct HttpRow {
    route: Route,
    requests_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    /// wrk's socket errors plus non-2xx/3xx responses.
    errors: u64,
    /// The agent's or haproxy's cost; none for the direct row.
    proxy: Option<ProxyCost>,
}

#[derive(Debug, Serialize)]
struct ProxyCost {
    pid: u32,
    cpu_us_per_request: f64,
    vm_rss_kb: u64,
    vm_hwm_kb: u64,
}

/// Cross-node through the agents: the plaintext agent path (no control
/// plane, so no tunnel) against the mutual-TLS tunnel between agents.
#[derive(Debug, Serialize)]
struct Tunnel {
    plaintext: Latency,
    mtls: Latency,
    added_p50_us: f64,
    added_p99_us: f64,
    /// mTLS p50 over plaintext p50.
    mtls_over_plaintext: f64,
    plaintext_gbit_per_s: f64,
    mtls_gbit_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    quick: bool,
    sizes: Sizes,
    latency: Vec<Comparison<Latency>>,
    throughput: Vec<Comparison<Throughput>>,
    http: Vec<HttpRow>,
    tunnel: Tunnel,
    aims: Vec<Aim>,
}

pub(super) fn run(args: &L4Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark attaches eBPF programs and creates network namespaces: run it as root"
        );
    }
    deps::prepare_cluster()?;
    let sizes = if args.quick { QUICK } else { FULL };
    let testapp = cluster::target_dir().join("release/mesh-testapp");
    // Plaintext agents (no control plane, so no tunnel): the L4 figures.
    let cluster = bench_cluster(false)?;
    let bench = Bench {
        cluster: &cluster,
        testapp: testapp.clone(),
        sizes,
    };
    let (latency, throughput, http) = bench.run()?;
    cluster.down()?;
    // The same cross-node path with the control plane: agents tunnel over mTLS.
    let cluster = bench_cluster(true)?;
    let bench = Bench {
        cluster: &cluster,
        testapp,
        sizes,
    };
    let plaintext = latency
        .iter()
        .find(|row| matches!(row.path, Placement::CrossNode))
        .context("cross-node latency row")?;
    let plaintext_bulk = throughput
        .iter()
        .find(|row| matches!(row.path, Placement::CrossNode))
        .context("cross-node throughput row")?;
    let tunnel = bench.tunnel(&plaintext.agent, &plaintext_bulk.agent)?;
    cluster.down()?;
    let aims = aims(&latency, &throughput, &http, &tunnel);
    let report = Report {
        quick: args.quick,
        sizes,
        latency,
        throughput,
        http,
        tunnel,
        aims,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// Two nodes of three pods; only the agent client is enrolled.
fn bench_cluster(control_plane: bool) -> Result<Cluster> {
    let mut spec = ClusterSpec {
        nodes: 2,
        pods_per_node: 3,
        enroll_all: false,
        ..ClusterSpec::default()
    };
    if !control_plane {
        spec.control_bin = None;
    }
    let cluster = Cluster::up(&spec)?;
    cluster.enroll(AGENT_CLIENT)?;
    eprintln!(
        "xtask: cluster {} is up ({}); measuring",
        cluster.prefix(),
        if spec.control_bin.is_some() {
            "control plane, mTLS tunnel"
        } else {
            "plaintext agents"
        }
    );
    Ok(cluster)
}

struct Bench<'a> {
    cluster: &'a Cluster,
    testapp: PathBuf,
    sizes: Sizes,
}

impl Bench<'_> {
    #[allow(clippy::type_complexity)]
    fn run(
        &self,
    ) -> Result<(
        Vec<Comparison<Latency>>,
        Vec<Comparison<Throughput>>,
        Vec<HttpRow>,
    )> {
        let _servers = [SAME_NODE_SERVER, CROSS_NODE_SERVER]
            .map(|pod| self.serve_testapp(pod))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let latency = Placement::ALL
            .map(|placement| self.latency(placement))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let throughput = Placement::ALL
            .map(|placement| self.throughput(placement))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let http = self.http()?;
        Ok((latency, throughput, http))
    }

    /// Cross-node latency and throughput through the mTLS tunnel, against
    /// the plaintext agent path measured on the other cluster.
    fn tunnel(&self, plaintext: &Latency, plaintext_bulk: &Throughput) -> Result<Tunnel> {
        let _server = self.serve_testapp(CROSS_NODE_SERVER)?;
        let server = self.cluster.pod(CROSS_NODE_SERVER).ip;
        let (echo, sink) = (
            format!("{server}:{ECHO_PORT}"),
            format!("{server}:{SINK_PORT}"),
        );
        let count = self.sizes.pingpong_count.to_string();
        let warmup = self.sizes.pingpong_warmup.to_string();
        let bytes = self.sizes.bulk_bytes.to_string();
        // The first connection waits for certificates and the handshake.
        self.testapp_client::<serde_json::Value>(
            Route::Agent,
            &["tcp", "--addr", &echo, "--bytes", "16"],
        )?;
        let mtls: Latency = self.testapp_client(
            Route::Agent,
            &[
                "pingpong", "--addr", &echo, "--count", &count, "--warmup", &warmup,
            ],
        )?;
        let bulk = (0..BULK_RUNS)
            .map(|_| {
                self.testapp_client::<Throughput>(
                    Route::Agent,
                    &["bulk", "--addr", &sink, "--bytes", &bytes],
                )
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .map(|t| t.gbit_per_s)
            .fold(0.0, f64::max);
        Ok(Tunnel {
            added_p50_us: mtls.p50_us - plaintext.p50_us,
            added_p99_us: mtls.p99_us - plaintext.p99_us,
            mtls_over_plaintext: mtls.p50_us / plaintext.p50_us,
            plaintext: Latency {
                p50_us: plaintext.p50_us,
                p99_us: plaintext.p99_us,
            },
            mtls,
            plaintext_gbit_per_s: plaintext_bulk.gbit_per_s,
            mtls_gbit_per_s: bulk,
        })
    }

    fn latency(&self, placement: Placement) -> Result<Comparison<Latency>> {
        let addr = format!("{}:{ECHO_PORT}", self.cluster.pod(placement.server()).ip);
        let count = self.sizes.pingpong_count.to_string();
        let warmup = self.sizes.pingpong_warmup.to_string();
        let args = [
            "pingpong", "--addr", &addr, "--count", &count, "--warmup", &warmup,
        ];
        let measure = |route| self.testapp_client::<Latency>(route, &args);
        let (direct, agent) = (measure(Route::Direct)?, measure(Route::Agent)?);
        Ok(Comparison {
            path: placement,
            agent_over_direct: agent.p50_us / direct.p50_us,
            direct,
            agent,
        })
    }

    fn throughput(&self, placement: Placement) -> Result<Comparison<Throughput>> {
        let addr = format!("{}:{SINK_PORT}", self.cluster.pod(placement.server()).ip);
        let bytes = self.sizes.bulk_bytes.to_string();
        let args = ["bulk", "--addr", &addr, "--bytes", &bytes];
        let best = |route| -> Result<Throughput> {
            let runs = (0..BULK_RUNS)
                .map(|_| self.testapp_client::<Throughput>(route, &args))
                .collect::<Result<Vec<_>>>()?;
            runs.into_iter()
                .max_by(|a, b| a.gbit_per_s.total_cmp(&b.gbit_per_s))
                .context("no bulk run")
        };
        let (direct, agent) = (best(Route::Direct)?, best(Route::Agent)?);
        Ok(Comparison {
            path: placement,
            agent_over_direct: agent.gbit_per_s / direct.gbit_per_s,
            direct,
            agent,
        })
    }

    fn http(&self) -> Result<Vec<HttpRow>> {
        let nginx_url = format!("http://{}:{NGINX_PORT}/", self.cluster.pod(NGINX_POD).ip);
        let _nginx = self.start_nginx(&nginx_url)?;
        let direct = self.wrk(Route::Direct, &nginx_url, None)?;
        let agent_pid = self
            .cluster
            .agent_pid(PROXY_NODE)
            .with_context(|| format!("the agent of {PROXY_NODE} is not running"))?;
        let agent = self.wrk(Route::Agent, &nginx_url, Some(agent_pid))?;
        let haproxy_url = format!(
            "http://{}:{HAPROXY_PORT}/",
            self.cluster.gateway_ip(PROXY_NODE)
        );
        let haproxy = self.start_haproxy(&haproxy_url)?;
        let via_haproxy = self.wrk(Route::Haproxy, &haproxy_url, Some(haproxy.child.id()))?;
        Ok(vec![direct, agent, via_haproxy])
    }

    /// Runs wrk from the route's client; with a proxy pid, also measures its cost.
    fn wrk(&self, route: Route, url: &str, proxy: Option<u32>) -> Result<HttpRow> {
        let cpu_before = match proxy {
            Some(pid) => Some((pid, cpu_ticks(pid)?)),
            None => None,
        };
        let run = self.on_route(route, || {
            let out = self
                .cluster
                .command(route.client(), "wrk")
                .args(["-t1", "-c64", &format!("-d{}s", self.sizes.wrk_secs)])
                .args(["--latency", url])
                .stdin(Stdio::null())
                .output()
                .context("running wrk")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success(),
                "wrk {url} in {} failed ({}): {}{stdout}",
                route.client(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            parse_wrk(&stdout).with_context(|| format!("reading wrk's output:\n{stdout}"))
        })?;
        let proxy = cpu_before
            .map(|(pid, before)| proxy_cost(pid, before, run.requests))
            .transpose()?;
        Ok(HttpRow {
            route,
            requests_per_s: run.requests_per_s,
            p50_us: run.p50_us,
            p99_us: run.p99_us,
            requests: run.requests,
            errors: run.errors,
            proxy,
        })
    }

    /// Runs `mesh-testapp <args>` in the route's client and reads its JSON report.
    fn testapp_client<T: DeserializeOwned>(&self, route: Route, args: &[&str]) -> Result<T> {
        self.on_route(route, || {
            let out = self
                .cluster
                .command(route.client(), &self.testapp)
                .args(args)
                .args(["--timeout-secs", CLIENT_TIMEOUT_SECS])
                .stdin(Stdio::null())
                .output()
                .context("running mesh-testapp")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success(),
                "mesh-testapp {args:?} in {} failed ({}): {}{stdout}",
                route.client(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_str(stdout.trim())
                .with_context(|| format!("mesh-testapp {args:?} reported {stdout:?}"))
        })
    }

    /// Runs a measurement and checks that node1's agent redirected connections
    /// during it exactly when the route goes through the agent.
    fn on_route<T>(&self, route: Route, measure: impl FnOnce() -> Result<T>) -> Result<T> {
        let before = self.redirected()?;
        let figures = measure()?;
        let redirected = self.redirected()? > before;
        ensure!(
            redirected == (route == Route::Agent),
            "{route} from {}: node1's agent {} connections",
            route.client(),
            if redirected {
                "redirected"
            } else {
                "did not redirect"
            }
        );
        Ok(figures)
    }

    fn redirected(&self) -> Result<u64> {
        let status = self.cluster.admin_get(PROXY_NODE, "/status")?;
        status["decisions"]["redirected"]
            .as_u64()
            .with_context(|| format!("no redirected decisions in {status}"))
    }

    fn serve_testapp(&self, pod: &str) -> Result<Server> {
        let name = format!("mesh-testapp serve in {pod}");
        let mut cmd = self.cluster.command(pod, &self.testapp);
        cmd.args(["serve", "--name", pod])
            .args(["--tcp-echo", &ECHO_PORT.to_string()])
            .args(["--sink", &SINK_PORT.to_string()]);
        let mut server = Server::start(name, cmd, self.log_path(&format!("testapp-{pod}")))?;
        server.wait_ready_line()?;
        Ok(server)
    }

    fn start_nginx(&self, url: &str) -> Result<Server> {
        let dir = self.cluster.state_dir();
        let conf = dir.join("bench-nginx.conf");
        write_file(&conf, &nginx_conf(dir))?;
        let mut cmd = self.cluster.command(NGINX_POD, "nginx");
        cmd.arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("bench-nginx-error.log"));
        let mut nginx =
            Server::start(format!("nginx in {NGINX_POD}"), cmd, self.log_path("nginx"))?;
        self.wait_http(&mut nginx, url)?;
        Ok(nginx)
    }

    fn start_haproxy(&self, url: &str) -> Result<Server> {
        let conf = self.cluster.state_dir().join("bench-haproxy.cfg");
        let frontend = format!("{}:{HAPROXY_PORT}", self.cluster.gateway_ip(PROXY_NODE));
        let backend = format!("{}:{NGINX_PORT}", self.cluster.pod(NGINX_POD).ip);
        write_file(&conf, &haproxy_conf(&frontend, &backend))?;
        let mut cmd = self.cluster.node_command(PROXY_NODE, "haproxy");
        cmd.arg("-f").arg(&conf).arg("-db");
        let mut haproxy = Server::start(
            format!("haproxy in {PROXY_NODE}"),
            cmd,
            self.log_path("haproxy"),
        )?;
        self.wait_http(&mut haproxy, url)?;
        Ok(haproxy)
    }

    /// Waits until the direct client gets a 2xx from `url`.
    fn wait_http(&self, server: &mut Server, url: &str) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            server.ensure_running()?;
            let answered = self
                .cluster
                .command(DIRECT_CLIENT, "curl")
                .args(["-sf", "-o", "/dev/null", "--max-time", "1", url])
                .stdin(Stdio::null())
                .status()
                .context("running curl")?
                .success();
            if answered {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not answer {url} within {} s; its log:\n{}",
                server.name,
                READY_TIMEOUT.as_secs(),
                server.log_tail()
            );
            thread::sleep(POLL);
        }
    }

    fn log_path(&self, what: &str) -> PathBuf {
        self.cluster.state_dir().join(format!("bench-{what}.log"))
    }
}

/// One worker answering `ok` on port 80; every file it writes under `dir`.
fn nginx_conf(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "worker_processes 1;
daemon off;
pid {dir}/bench-nginx.pid;
error_log {dir}/bench-nginx-error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {dir}/bench-nginx-client-body;
    proxy_temp_path {dir}/bench-nginx-proxy;
    fastcgi_temp_path {dir}/bench-nginx-fastcgi;
    uwsgi_temp_path {dir}/bench-nginx-uwsgi;
    scgi_temp_path {dir}/bench-nginx-scgi;
    server {{
        listen {NGINX_PORT};
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
"
    )
}

/// One thread of TCP proxying from `frontend` to `backend`. maxconn is far above
/// wrk's 64 connections; 10000 would need 20014 fds, more than the hard limit of
/// some CI containers (20000, without CAP_SYS_RESOURCE to raise it).
fn haproxy_conf(frontend: &str, backend: &str) -> String {
    format!(
        "global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend bench
    bind {frontend}
    default_backend nginx
backend nginx
    server nginx {backend}
"
    )
}

/// The proxy's CPU time per request since `ticks_before`, and its memory now.
fn proxy_cost(pid: u32, ticks_before: u64, requests: u64) -> Result<ProxyCost> {
    let ticks = cpu_ticks(pid)?.saturating_sub(ticks_before);
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(ticks_per_s > 0, "sysconf(_SC_CLK_TCK) failed");
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kb = |key| status_kb(&status, key).with_context(|| format!("no {key} in {path}"));
    Ok(ProxyCost {
        pid,
        cpu_us_per_request: ticks as f64 * 1e6 / ticks_per_s as f64 / requests.max(1) as f64,
        vm_rss_kb: kb("VmRSS")?,
        vm_hwm_kb: kb("VmHWM")?,
    })
}

fn aims(
    latency: &[Comparison<Latency>],
    throughput: &[Comparison<Throughput>],
    http: &[HttpRow],
    tunnel: &Tunnel,
) -> Vec<Aim> {
    let mut aims = Vec::new();
    for row in latency {
        aims.push(Aim::at_most(
            format!("{} p50 latency via agent <= 2x direct", row.path),
            row.agent_over_direct,
            2.0,
        ));
    }
    for row in throughput {
        aims.push(Aim::at_least(
            format!("{} throughput via agent >= 0.6x direct", row.path),
            row.agent_over_direct,
            0.6,
        ));
    }
    let rate = |route| {
        http.iter()
            .find(|row| row.route == route)
            .map_or(0.0, |row| row.requests_per_s)
    };
    aims.push(Aim::at_least(
        "HTTP req/s via agent >= 1.0x via haproxy".to_string(),
        rate(Route::Agent) / rate(Route::Haproxy),
        1.0,
    ));
    aims.push(Aim::at_most(
        "cross-node p50 latency, mTLS tunnel <= 1.25x plaintext agent path".to_string(),
        tunnel.mtls_over_plaintext,
        1.25,
    ));
    aims
}

fn print_report(report: &Report) {
    let sizes = &report.sizes;
    println!(
        "mesh L4 benchmark{}: clients in node1, direct from {DIRECT_CLIENT}, via node1's agent from {AGENT_CLIENT}",
        if report.quick { " (quick)" } else { "" }
    );
    println!(
        "\n1-byte ping-pong latency, us ({} round trips after {} warm-up)",
        sizes.pingpong_count, sizes.pingpong_warmup
    );
    println!(
        "  {:<11} {:>10} {:>10} {:>10} {:>10} {:>13}",
        "path", "direct p50", "p99", "agent p50", "p99", "agent/direct"
    );
    for row in &report.latency {
        println!(
            "  {:<11} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12.2}x",
            row.path.to_string(),
            row.direct.p50_us,
            row.direct.p99_us,
            row.agent.p50_us,
            row.agent.p99_us,
            row.agent_over_direct
        );
    }
    println!(
        "\nBulk throughput, Gbit/s ({} MB, best of {BULK_RUNS})",
        sizes.bulk_bytes / 1_000_000
    );
    println!(
        "  {:<11} {:>10} {:>10} {:>13}",
        "path", "direct", "agent", "agent/direct"
    );
    for row in &report.throughput {
        println!(
            "  {:<11} {:>10.2} {:>10.2} {:>12.2}x",
            row.path.to_string(),
            row.direct.gbit_per_s,
            row.agent.gbit_per_s,
            row.agent_over_direct
        );
    }
    println!(
        "\nHTTP/1.1 to nginx in {NGINX_POD}, cross-node (wrk -t1 -c64 -d{}s)",
        sizes.wrk_secs
    );
    println!(
        "  {:<12} {:>9} {:>9} {:>9} {:>7} {:>13} {:>9} {:>9}",
        "route", "req/s", "p50 us", "p99 us", "errors", "proxy us/req", "RSS kB", "HWM kB"
    );
    for row in &report.http {
        let (cpu, rss, hwm) = match &row.proxy {
            Some(p) => (
                format!("{:.1}", p.cpu_us_per_request),
                p.vm_rss_kb.to_string(),
                p.vm_hwm_kb.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "  {:<12} {:>9.0} {:>9.0} {:>9.0} {:>7} {cpu:>13} {rss:>9} {hwm:>9}",
            row.route.to_string(),
            row.requests_per_s,
            row.p50_us,
            row.p99_us,
            row.errors
        );
    }
    let t = &report.tunnel;
    println!("\nCross-node through the agents: plaintext vs mutual-TLS tunnel");
    println!(
        "  {:<11} {:>10} {:>10} {:>12}",
        "path", "p50 us", "p99 us", "Gbit/s"
    );
    for (name, lat, gbps) in [
        ("plaintext", &t.plaintext, t.plaintext_gbit_per_s),
        ("mTLS", &t.mtls, t.mtls_gbit_per_s),
    ] {
        println!(
            "  {name:<11} {:>10.1} {:>10.1} {gbps:>12.2}",
            lat.p50_us, lat.p99_us
        );
    }
    println!(
        "  mTLS adds {:.1} us at p50, {:.1} us at p99 ({:.2}x p50)",
        t.added_p50_us, t.added_p99_us, t.mtls_over_plaintext
    );
    println!("\nAims");
    for aim in &report.aims {
        let verdict = if aim.met { "met" } else { "MISSED" };
        println!("  {verdict:<7} {} (measured {:.2}x)", aim.aim, aim.measured);
    }
}
