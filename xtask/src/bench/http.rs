//! `cargo xtask bench http`: HTTP/1.1 and h2c to one upstream, the same
//! `mesh-testapp --http-echo` in every row, reached directly, through the mesh
//! (both node agents and the mTLS tunnel, by Services with `appProtocol:
//! http` and `http2`) and through nginx as a one-hop plaintext reverse proxy;
//! each at saturation and at a fixed 1,000 req/s.
//!
//! ```text
//! node1-pod1  enrolled: the mesh client, calls the Service VIPs
//! node1-pod2  not enrolled: the direct client, and nginx's client
//! node2-pod1  the upstream (PERMISSIVE, so plaintext from outside the mesh reaches it)
//! node1 netns nginx on the pod gateway: :9080 HTTP/1.1, :9081 h2c
//! ```
//!
//! A row that fails prints its error; the others still run.
use std::{
    fmt, fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::Serialize;

use super::{Aim, POLL, Server, cpu_ticks, parse_wrk, process_kb, ticks_per_s, write_file};
use crate::{
    cluster::{self, Cluster, ClusterSpec},
    deps,
};

const MESH_CLIENT: &str = "node1-pod1";
const DIRECT_CLIENT: &str = "node1-pod2";
const UPSTREAM: &str = "node2-pod1";
/// The mesh+authz rows' upstream, which the policies select.
const AUTHZ_UPSTREAM: &str = "node2-pod2";
/// AuthorizationPolicies selecting it.
const AUTHZ_POLICIES: usize = 100;
const CLIENT_NODE: &str = "node1";
const UPSTREAM_NODE: &str = "node2";

const ECHO_PORT: u16 = 8080;
const NGINX_H1_PORT: u16 = 9080;
const NGINX_H2C_PORT: u16 = 9081;
const SERVICE_PORT: u16 = 80;
const H1_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const H2C_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
const H1_POLICY_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 3);
const H2C_POLICY_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 4);
const H1_AUTHZ_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 5);
const H2C_AUTHZ_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 6);
const H1_LOG_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 7);
const H2C_LOG_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 8);
/// The mesh+policy rows' TrafficPolicy: what an operator would turn on.
const DEFAULT_POLICY: &str = "  loadBalancer: {simple: LEAST_LATENCY}\n  retries: {attempts: 2, retryOn: [connect-failure, refused-stream, gateway-error], budget: {percent: 20, minRetryConcurrency: 3}}\n  circuitBreaker: {maxConnections: 1024, maxPendingRequests: 1024, maxRequests: 1024, maxRetries: 3}\n  outlierDetection: {consecutive5xxErrors: 5, baseEjectionTime: 30s, maxEjectionPercent: 10}\n";
/// Not under `/_/`: the echo server's plain answer, a JSON description of the request.
const PATH: &str = "/bench";

/// Concurrency at saturation: wrk's connections, and h2load's connections x streams.
const WRK_CONNECTIONS: u32 = 32;
const H2LOAD_CONNECTIONS: u32 = 4;
const H2LOAD_STREAMS: u32 = 8;
const FIXED_RATE: u32 = 1_000;
/// oha's workers at the fixed rate: enough that a slow answer does not hold
/// the schedule back.
const FIXED_CONNECTIONS: u32 = 16;
/// How long a route may take to answer its first request (certificates,
/// configuration reaching the agents).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// A load run is bounded by its own duration; this kills a generator that hangs.
const LOAD_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Shorter runs, to check that the benchmark works.
    #[arg(long)]
    pub quick: bool,
    /// Only the saturation rows (the CPU per request of each route): no
    /// fixed-rate rows, so no oha to install.
    #[arg(long)]
    pub saturation_only: bool,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Sizes {
    saturation_secs: u32,
    fixed_secs: u32,
}

const FULL: Sizes = Sizes {
    saturation_secs: 5,
    fixed_secs: 5,
};

const QUICK: Sizes = Sizes {
    saturation_secs: 2,
    fixed_secs: 2,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Proto {
    Http1,
    H2c,
}

impl Proto {
    const ALL: [Proto; 2] = [Proto::Http1, Proto::H2c];

    /// What the upstream reports as the version of a direct request.
    fn echo_version(self) -> &'static str {
        match self {
            Proto::Http1 => "HTTP/1.1",
            Proto::H2c => "HTTP/2.0",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Http1 => "HTTP/1.1",
            Proto::H2c => "h2c",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Route {
    Direct,
    Mesh,
    /// Through the mesh to a Service with a default TrafficPolicy: P2C,
    /// retries with a budget, breaker limits, an outlier detector.
    #[serde(rename = "mesh+policy")]
    MeshPolicy,
    /// Through the mesh to an upstream that 100 AuthorizationPolicies
    /// select (99 DENY that do not match, one ALLOW that does).
    #[serde(rename = "mesh+authz")]
    MeshAuthz,
    /// As `mesh`, with one live tap (`meshctl tap -o json`, unfiltered)
    /// reading every event of each agent.
    #[serde(rename = "mesh+tap")]
    MeshTap,
    /// As `mesh`, to a Service whose TrafficPolicy logs every request
    /// (`accessLog: {sampling: 100}`) to the agents' `--access-log` file.
    #[serde(rename = "mesh+log")]
    MeshLog,
    Nginx,
}

impl Route {
    const ALL: [Route; 7] = [
        Route::Direct,
        Route::Mesh,
        Route::MeshPolicy,
        Route::MeshAuthz,
        Route::MeshTap,
        Route::MeshLog,
        Route::Nginx,
    ];

    fn is_mesh(self) -> bool {
        matches!(
            self,
            Route::Mesh | Route::MeshPolicy | Route::MeshAuthz | Route::MeshTap | Route::MeshLog
        )
    }

    /// The pod that answers this route.
    fn upstream(self) -> &'static str {
        match self {
            Route::MeshAuthz => AUTHZ_UPSTREAM,
            _ => UPSTREAM,
        }
    }

    fn client(self) -> &'static str {
        match self {
            Route::Mesh
            | Route::MeshPolicy
            | Route::MeshAuthz
            | Route::MeshTap
            | Route::MeshLog => MESH_CLIENT,
            Route::Direct | Route::Nginx => DIRECT_CLIENT,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Route::Direct => "direct",
            Route::Mesh => "mesh",
            Route::MeshPolicy => "mesh+policy",
            Route::MeshAuthz => "mesh+authz",
            Route::MeshTap => "mesh+tap",
            Route::MeshLog => "mesh+log",
            Route::Nginx => "nginx",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Load {
    Saturation,
    Fixed,
}

impl Load {
    const ALL: [Load; 2] = [Load::Saturation, Load::Fixed];
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Load::Saturation => f.write_str("saturation"),
            Load::Fixed => write!(f, "{FIXED_RATE} req/s"),
        }
    }
}

/// What a load generator reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct LoadRun {
    requests_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// Requests answered, whatever their status.
    requests: u64,
    /// Transport errors, timeouts and responses that are not 2xx or 3xx.
    errors: u64,
    /// What the errors were, where the generator says (oha).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    error_kinds: Vec<String>,
}

/// A proxy on the path: its CPU time per request during the run, and its memory after it.
#[derive(Debug, Serialize)]
struct ProxyCost {
    name: String,
    pid: u32,
    cpu_us_per_request: f64,
    vm_rss_kb: u64,
}

#[derive(Debug, Serialize)]
struct Row {
    proto: Proto,
    route: Route,
    load: Load,
    /// The generator's command line, without the URL.
    generator: String,
    url: String,
    #[serde(flatten)]
    run: Option<LoadRun>,
    /// The agents of both nodes (mesh) or nginx; empty for the direct row.
    proxies: Vec<ProxyCost>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    quick: bool,
    sizes: Sizes,
    rows: Vec<Row>,
    aims: Vec<Aim>,
}

pub(super) fn run(args: &HttpArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark attaches eBPF programs and creates network namespaces: run it as root"
        );
    }
    deps::prepare_cluster()?;
    // Without oha only the fixed-rate rows fail.
    let oha = if args.saturation_only {
        Err("--saturation-only".to_owned())
    } else {
        deps::ensure_oha().map_err(|err| format!("{err:#}"))
    };
    let sizes = if args.quick { QUICK } else { FULL };
    // The agents' access log (only the mesh+log rows' Service writes to it),
    // removed however the run ends.
    let access_log = TempFile(
        std::env::temp_dir().join(format!("mesh-bench-http-access-{}.log", std::process::id())),
    );
    let cluster = bench_cluster(&access_log.0)?;
    let bench = Bench {
        cluster: &cluster,
        testapp: cluster::target_dir().join("release/mesh-testapp"),
        oha,
        sizes,
        loads: if args.saturation_only {
            &[Load::Saturation]
        } else {
            &Load::ALL
        },
    };
    let rows = bench.run()?;
    cluster.down()?;
    let logged = std::fs::read_to_string(&access_log.0)
        .map(|t| t.lines().count())
        .unwrap_or(0);
    eprintln!("xtask: the mesh+log rows wrote {logged} access log lines");
    let report = Report {
        quick: args.quick,
        sizes,
        aims: aims(&rows),
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// Two nodes of two pods with the control plane (so the agents tunnel over
/// mTLS); only the mesh client is enrolled.
fn bench_cluster(access_log: &std::path::Path) -> Result<Cluster> {
    let spec = ClusterSpec {
        nodes: 2,
        pods_per_node: 2,
        enroll_all: false,
        agent_args: vec!["--access-log".into(), access_log.display().to_string()],
        ..ClusterSpec::default()
    };
    let cluster = Cluster::up(&spec)?;
    cluster.enroll(MESH_CLIENT)?;
    let upstream = format!(
        "{}  mtlsMode: PERMISSIVE\n",
        cluster.workload_yaml(UPSTREAM, &[])
    );
    let authz_upstream = cluster.workload_yaml(AUTHZ_UPSTREAM, &[]);
    let client = format!("cluster.local/ns/default/sa/{MESH_CLIENT}");
    let authz: Vec<String> = (0..AUTHZ_POLICIES)
        .map(|i| {
            let rules = if i + 1 == AUTHZ_POLICIES {
                format!("  action: ALLOW\n  rules: [{{from: [{{source: {{principals: [\"{client}\"]}}}}]}}]\n")
            } else {
                format!("  action: DENY\n  rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/default/sa/nobody-{i}\"]}}}}], to: [{{operation: {{methods: [POST], paths: [\"/admin/{i}/*\"]}}}}]}}]\n")
            };
            format!(
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: bench-{i}, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: {AUTHZ_UPSTREAM}}}}}\n{rules}"
            )
        })
        .collect();
    let services = [
        ("bench-http", H1_VIP, "http"),
        ("bench-h2c", H2C_VIP, "http2"),
        ("bench-http-policy", H1_POLICY_VIP, "http"),
        ("bench-h2c-policy", H2C_POLICY_VIP, "http2"),
        ("bench-http-authz", H1_AUTHZ_VIP, "http"),
        ("bench-h2c-authz", H2C_AUTHZ_VIP, "http2"),
        ("bench-http-log", H1_LOG_VIP, "http"),
        ("bench-h2c-log", H2C_LOG_VIP, "http2"),
    ]
    .map(|(name, vip, app_protocol)| {
        let app = if name.ends_with("-authz") {
            AUTHZ_UPSTREAM
        } else {
            UPSTREAM
        };
        let policy = if name.ends_with("-policy") {
            format!(
                "---\napiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  targetRef: {{kind: Service, name: {name}}}\n{DEFAULT_POLICY}"
            )
        } else if name.ends_with("-log") {
            format!(
                "---\napiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  targetRef: {{kind: Service, name: {name}}}\n  accessLog: {{sampling: 100}}\n"
            )
        } else {
            String::new()
        };
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  vips: [{vip}]\n  ports: [{{name: http, port: {SERVICE_PORT}, targetPort: {ECHO_PORT}, appProtocol: {app_protocol}}}]\n  selector: {{app: {app}}}\n{policy}"
        )
    });
    cluster
        .apply(
            &[
                upstream,
                authz_upstream,
                services.join("---\n"),
                authz.join("---\n"),
            ]
            .join("---\n"),
        )
        .context("applying the upstream's Workload and the bench Services")?;
    eprintln!(
        "xtask: cluster {} is up (control plane, mTLS tunnel); measuring",
        cluster.prefix()
    );
    Ok(cluster)
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Bench<'a> {
    cluster: &'a Cluster,
    testapp: PathBuf,
    oha: Result<PathBuf, String>,
    sizes: Sizes,
    loads: &'static [Load],
}

impl Bench<'_> {
    fn run(&self) -> Result<Vec<Row>> {
        let _upstream = self.serve_upstream(UPSTREAM)?;
        let _authz_upstream = self.serve_upstream(AUTHZ_UPSTREAM)?;
        let nginx = self.start_nginx();
        let mut rows = Vec::new();
        for proto in Proto::ALL {
            for route in Route::ALL {
                let url = self.url(proto, route);
                let ready = match (&nginx, route) {
                    (Err(err), Route::Nginx) => Err(anyhow::anyhow!("{err:#}")),
                    _ => self.probe(proto, route, &url),
                };
                for &load in self.loads {
                    let generator = self.generator(proto, load);
                    let measured = match &ready {
                        Ok(()) => self.measure(proto, route, load, &url, &nginx),
                        Err(err) => Err(anyhow::anyhow!("{err:#}")),
                    };
                    let (run, proxies, error) = match measured {
                        Ok((run, proxies)) => (Some(run), proxies, None),
                        Err(err) => (None, Vec::new(), Some(format!("{err:#}"))),
                    };
                    if let Some(err) = &error {
                        eprintln!("xtask: {proto} {route} at {load} failed: {err}");
                    }
                    rows.push(Row {
                        proto,
                        route,
                        load,
                        generator: generator.join(" "),
                        url: url.clone(),
                        run,
                        proxies,
                        error,
                    });
                }
            }
        }
        Ok(rows)
    }

    fn url(&self, proto: Proto, route: Route) -> String {
        let upstream = self.cluster.pod(UPSTREAM).ip;
        let gateway = self.cluster.gateway_ip(CLIENT_NODE);
        match (route, proto) {
            (Route::Direct, _) => format!("http://{upstream}:{ECHO_PORT}{PATH}"),
            (Route::Mesh | Route::MeshTap, Proto::Http1) => {
                format!("http://{H1_VIP}:{SERVICE_PORT}{PATH}")
            }
            (Route::Mesh | Route::MeshTap, Proto::H2c) => {
                format!("http://{H2C_VIP}:{SERVICE_PORT}{PATH}")
            }
            (Route::MeshPolicy, Proto::Http1) => {
                format!("http://{H1_POLICY_VIP}:{SERVICE_PORT}{PATH}")
            }
            (Route::MeshPolicy, Proto::H2c) => {
                format!("http://{H2C_POLICY_VIP}:{SERVICE_PORT}{PATH}")
            }
            (Route::MeshAuthz, Proto::Http1) => {
                format!("http://{H1_AUTHZ_VIP}:{SERVICE_PORT}{PATH}")
            }
            (Route::MeshAuthz, Proto::H2c) => {
                format!("http://{H2C_AUTHZ_VIP}:{SERVICE_PORT}{PATH}")
            }
            (Route::MeshLog, Proto::Http1) => {
                format!("http://{H1_LOG_VIP}:{SERVICE_PORT}{PATH}")
            }
            (Route::MeshLog, Proto::H2c) => {
                format!("http://{H2C_LOG_VIP}:{SERVICE_PORT}{PATH}")
            }
            (Route::Nginx, Proto::Http1) => format!("http://{gateway}:{NGINX_H1_PORT}{PATH}"),
            (Route::Nginx, Proto::H2c) => format!("http://{gateway}:{NGINX_H2C_PORT}{PATH}"),
        }
    }

    /// Retries one request with curl until the upstream answers it.
    fn probe(&self, proto: Proto, route: Route, url: &str) -> Result<()> {
        let deadline = Instant::now() + PROBE_TIMEOUT;
        loop {
            let mut curl = self.cluster.command(route.client(), "curl");
            curl.args(["-sS", "--max-time", "2"]);
            if proto == Proto::H2c {
                curl.arg("--http2-prior-knowledge");
            }
            let out = curl
                .arg(url)
                .stdin(Stdio::null())
                .output()
                .context("running curl")?;
            let body = String::from_utf8_lossy(&out.stdout);
            let echo = serde_json::from_str::<serde_json::Value>(&body).ok();
            let why = match &echo {
                _ if !out.status.success() => String::from_utf8_lossy(&out.stderr).into_owned(),
                Some(echo) if echo["pod"] == route.upstream() => {
                    return self.check_version(proto, route, echo);
                }
                _ => format!("answered {body:?}"),
            };
            ensure!(
                Instant::now() < deadline,
                "{proto} {route}: {url} from {} did not reach {} within {} s: {}",
                route.client(),
                route.upstream(),
                PROBE_TIMEOUT.as_secs(),
                why.trim()
            );
            thread::sleep(POLL);
        }
    }

    /// The upstream sees the client's version directly; nginx speaks
    /// HTTP/1.1 upstream; the mesh may carry either, so it is only reported.
    fn check_version(&self, proto: Proto, route: Route, echo: &serde_json::Value) -> Result<()> {
        let expected = match route {
            Route::Direct => proto.echo_version(),
            Route::Nginx => "HTTP/1.1",
            Route::Mesh
            | Route::MeshPolicy
            | Route::MeshAuthz
            | Route::MeshTap
            | Route::MeshLog => {
                eprintln!(
                    "xtask: {proto} through the mesh reaches {UPSTREAM} as {}",
                    echo["version"]
                );
                return Ok(());
            }
        };
        ensure!(
            echo["version"] == expected,
            "{proto} {route}: the upstream saw {} instead of {expected}",
            echo["version"]
        );
        Ok(())
    }

    fn generator(&self, proto: Proto, load: Load) -> Vec<String> {
        let strings = |args: &[&str]| args.iter().map(ToString::to_string).collect::<Vec<_>>();
        match (proto, load) {
            (Proto::Http1, Load::Saturation) => strings(&[
                "wrk",
                "-t1",
                &format!("-c{WRK_CONNECTIONS}"),
                &format!("-d{}s", self.sizes.saturation_secs),
                "--latency",
            ]),
            (Proto::H2c, Load::Saturation) => strings(&[
                "h2load",
                "-t1",
                &format!("-c{H2LOAD_CONNECTIONS}"),
                &format!("-m{H2LOAD_STREAMS}"),
                &format!("-D{}", self.sizes.saturation_secs),
            ]),
            (proto, Load::Fixed) => {
                let mut args = strings(&[
                    "oha",
                    "--no-tui",
                    "--output-format",
                    "json",
                    "--latency-correction",
                    // Requests in flight at the end are answered, not aborted.
                    "--wait-ongoing-requests-after-deadline",
                    "-q",
                    &FIXED_RATE.to_string(),
                    "-c",
                    &FIXED_CONNECTIONS.to_string(),
                    "-z",
                    &format!("{}s", self.sizes.fixed_secs),
                ]);
                if proto == Proto::H2c {
                    args.push("--http2".into());
                }
                args
            }
        }
    }

    /// One load run on one route, with the cost of the proxies on it.
    fn measure(
        &self,
        proto: Proto,
        route: Route,
        load: Load,
        url: &str,
        nginx: &Result<Server>,
    ) -> Result<(LoadRun, Vec<ProxyCost>)> {
        let proxies: Vec<(String, u32)> = match route {
            Route::Direct => Vec::new(),
            Route::Mesh
            | Route::MeshPolicy
            | Route::MeshAuthz
            | Route::MeshTap
            | Route::MeshLog => [CLIENT_NODE, UPSTREAM_NODE]
                .into_iter()
                .map(|node| {
                    let pid = self
                        .cluster
                        .agent_pid(node)
                        .with_context(|| format!("the agent of {node} is not running"))?;
                    Ok((format!("{node} agent"), pid))
                })
                .collect::<Result<_>>()?,
            Route::Nginx => match nginx {
                Ok(nginx) => vec![("nginx".to_string(), nginx.pid())],
                Err(err) => bail!("{err:#}"),
            },
        };
        // One live tap per agent for the mesh+tap rows, for the whole run.
        let _tappers = if route == Route::MeshTap {
            [CLIENT_NODE, UPSTREAM_NODE]
                .into_iter()
                .map(|node| Tapper::start(self.cluster, node))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let before = proxies
            .iter()
            .map(|(_, pid)| cpu_ticks(*pid))
            .collect::<Result<Vec<_>>>()?;
        let redirected_before = self.redirected()?;
        let run = self.load(proto, route, load, url)?;
        let redirected = self.redirected()? > redirected_before;
        ensure!(
            redirected == route.is_mesh(),
            "{route} from {}: {CLIENT_NODE}'s agent {} connections",
            route.client(),
            if redirected {
                "redirected"
            } else {
                "did not redirect"
            }
        );
        let ticks_per_s = ticks_per_s()?;
        let costs = proxies
            .into_iter()
            .zip(before)
            .map(|((name, pid), before)| {
                let ticks = cpu_ticks(pid)?.saturating_sub(before);
                Ok(ProxyCost {
                    name,
                    pid,
                    cpu_us_per_request: ticks as f64 * 1e6
                        / ticks_per_s
                        / run.requests.max(1) as f64,
                    vm_rss_kb: process_kb(pid, "VmRSS")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((run, costs))
    }

    fn redirected(&self) -> Result<u64> {
        let status = self.cluster.admin_get(CLIENT_NODE, "/status")?;
        status["decisions"]["redirected"]
            .as_u64()
            .with_context(|| format!("no redirected decisions in {status}"))
    }

    /// Runs the generator of (proto, load) in the route's client.
    fn load(&self, proto: Proto, route: Route, load: Load, url: &str) -> Result<LoadRun> {
        let generator = self.generator(proto, load);
        let (name, args) = generator.split_first().context("a generator")?;
        let program = match load {
            Load::Fixed => self
                .oha
                .clone()
                .map_err(|err| anyhow::anyhow!("oha is not installed: {err}"))?,
            Load::Saturation => PathBuf::from(name),
        };
        let mut cmd = self.cluster.command(route.client(), program);
        cmd.args(args);
        let log = self.log_path(&format!("h2load-{route}"));
        match (proto, load) {
            (Proto::Http1, Load::Saturation) => {
                let script = self.cluster.state_dir().join("bench-http-wrk.lua");
                write_file(&script, WRK_PERCENTILES_LUA)?;
                cmd.arg("-s").arg(&script);
            }
            (Proto::H2c, Load::Saturation) => {
                cmd.arg("--log-file").arg(&log);
            }
            (_, Load::Fixed) => {}
        }
        cmd.arg(url);
        let secs = match load {
            Load::Saturation => self.sizes.saturation_secs,
            Load::Fixed => self.sizes.fixed_secs,
        };
        let stdout = run_bounded(cmd, Duration::from_secs(secs.into()) + LOAD_GRACE)
            .with_context(|| format!("{} {url} in {}", generator.join(" "), route.client()))?;
        let parsed = match (proto, load) {
            (Proto::Http1, Load::Saturation) => parse_wrk_percentiles(&stdout),
            (Proto::H2c, Load::Saturation) => {
                let latencies = fs::read_to_string(&log)
                    .with_context(|| format!("reading h2load's log {}", log.display()));
                let _ = fs::remove_file(&log);
                parse_h2load(&stdout, &latencies?)
            }
            (_, Load::Fixed) => parse_oha(&stdout),
        };
        parsed.with_context(|| format!("reading the output of {name}:\n{stdout}"))
    }

    fn serve_upstream(&self, pod: &str) -> Result<Server> {
        let mut cmd = self.cluster.command(pod, &self.testapp);
        cmd.args(["serve", "--name", pod])
            .args(["--http-echo", &ECHO_PORT.to_string()]);
        let mut server = Server::start(
            format!("mesh-testapp serve in {pod}"),
            cmd,
            self.log_path(&format!("testapp-{pod}")),
        )?;
        server.wait_ready_line()?;
        Ok(server)
    }

    /// nginx in node1's netns, both listeners proxying to the upstream.
    fn start_nginx(&self) -> Result<Server> {
        let dir = self.cluster.state_dir();
        let conf = dir.join("bench-http-nginx.conf");
        let upstream = format!("{}:{ECHO_PORT}", self.cluster.pod(UPSTREAM).ip);
        write_file(
            &conf,
            &nginx_conf(dir, self.cluster.gateway_ip(CLIENT_NODE), &upstream),
        )?;
        let mut cmd = self.cluster.node_command(CLIENT_NODE, "nginx");
        cmd.arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("bench-http-nginx-error.log"));
        let mut nginx = Server::start(
            format!("nginx in {CLIENT_NODE}"),
            cmd,
            self.log_path("nginx"),
        )?;
        // A bad configuration or a port it cannot bind stops nginx at once;
        // whether it answers is the probe's to say.
        thread::sleep(Duration::from_millis(300));
        nginx.ensure_running()?;
        Ok(nginx)
    }

    fn log_path(&self, what: &str) -> PathBuf {
        self.cluster
            .state_dir()
            .join(format!("bench-http-{what}.log"))
    }
}

/// Runs `cmd` to completion within `limit` (killing it past that) and returns
/// its stdout; a failed exit is an error carrying its stderr.
fn run_bounded(mut cmd: Command, limit: Duration) -> Result<String> {
    let dir = std::env::temp_dir();
    let id = format!(
        "mesh-bench-http-{}-{:?}",
        std::process::id(),
        Instant::now()
    );
    let (out_path, err_path) = (dir.join(format!("{id}.out")), dir.join(format!("{id}.err")));
    let result = (|| {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path)?)
            .stderr(fs::File::create(&err_path)?)
            .spawn()
            .context("starting it")?;
        let Some(status) = cluster::wait_or_kill(&mut child, limit, Duration::from_millis(50))?
        else {
            bail!("still running after {} s; killed", limit.as_secs());
        };
        let stdout = fs::read_to_string(&out_path)?;
        let stderr = fs::read_to_string(&err_path)?;
        ensure!(status.success(), "failed ({status}): {stderr}{stdout}");
        Ok(stdout)
    })();
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    result
}

/// Prints exact percentiles in microseconds after wrk's own report.
const WRK_PERCENTILES_LUA: &str = r#"done = function(summary, latency, requests)
  io.write(string.format("mesh-bench-latency-us %d %d %d\n",
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

fn parse_wrk_percentiles(out: &str) -> Result<LoadRun> {
    let wrk = parse_wrk(out)?;
    let line = out
        .lines()
        .find_map(|line| line.strip_prefix("mesh-bench-latency-us "))
        .context("no percentiles from the wrk script")?;
    let us: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("percentiles {line:?}"))?;
    let [p50_us, p99_us, p999_us] = us[..] else {
        bail!("percentiles {line:?}: expected three");
    };
    Ok(LoadRun {
        requests_per_s: wrk.requests_per_s,
        p50_us,
        p99_us,
        p999_us,
        requests: wrk.requests,
        errors: wrk.errors,
        error_kinds: Vec::new(),
    })
}

/// h2load's summary, and percentiles from its `--log-file` (tab-separated:
/// start time, status, microseconds to the end of the response).
fn parse_h2load(out: &str, log: &str) -> Result<LoadRun> {
    let mut requests_per_s = None;
    let mut counts = None;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 2.00s, 52788.00 req/s, 8.91MB/s"
            requests_per_s = rest
                .split(", ")
                .find_map(|part| part.strip_suffix(" req/s")?.parse::<f64>().ok());
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // "requests: 105576 total, 105584 started, 105576 done, 105576 succeeded, 0 failed, 0 errored, 0 timeout"
            let count = |what: &str| {
                rest.split(", ")
                    .find_map(|part| part.strip_suffix(what)?.trim().parse::<u64>().ok())
            };
            counts = Some((count(" done"), count(" succeeded"), count(" timeout")));
        }
    }
    let (done, succeeded, timeout) = counts.context("no request counts")?;
    let (done, succeeded) = (
        done.context("no done count")?,
        succeeded.context("no succeeded count")?,
    );
    let mut latencies: Vec<f64> = log
        .lines()
        .filter_map(|line| line.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    ensure!(!latencies.is_empty(), "h2load logged no requests");
    latencies.sort_by(f64::total_cmp);
    Ok(LoadRun {
        requests_per_s: requests_per_s.context("no req/s")?,
        p50_us: percentile(&latencies, 50.0),
        p99_us: percentile(&latencies, 99.0),
        p999_us: percentile(&latencies, 99.9),
        requests: done,
        // "succeeded" counts 2xx and 3xx; the rest of "done" failed.
        errors: done.saturating_sub(succeeded) + timeout.unwrap_or(0),
        error_kinds: Vec::new(),
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    // The epsilon keeps 99.9% of 1000 at rank 999 despite rounding.
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

const OHA_DEADLINE: &str = "aborted due to deadline";

/// `oha --output-format json`: seconds, which the rows give in microseconds.
fn parse_oha(out: &str) -> Result<LoadRun> {
    let report: serde_json::Value = serde_json::from_str(out.trim()).context("not JSON")?;
    let seconds = |value: &serde_json::Value, what: &str| {
        value
            .as_f64()
            .map(|s| s * 1e6)
            .with_context(|| format!("no {what}"))
    };
    let percentiles = &report["latencyPercentiles"];
    let statuses = report["statusCodeDistribution"]
        .as_object()
        .context("no statusCodeDistribution")?;
    let mut answered = 0;
    let mut bad_status = 0;
    for (status, count) in statuses {
        let count = count.as_u64().context("a status count")?;
        answered += count;
        if !status.starts_with('2') && !status.starts_with('3') {
            bad_status += count;
        }
    }
    let mut transport_errors = 0;
    let mut error_kinds = Vec::new();
    for (kind, count) in report["errorDistribution"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let count = count.as_u64().context("an error count")?;
        // Requests in flight when the run ends (HTTP/2 ones are not waited
        // for): oha's own stop, not the route's failure.
        if kind == OHA_DEADLINE {
            error_kinds.push(format!("{count}x {kind} (not counted)"));
        } else {
            transport_errors += count;
            error_kinds.push(format!("{count}x {kind}"));
        }
    }
    Ok(LoadRun {
        requests_per_s: report["summary"]["requestsPerSec"]
            .as_f64()
            .context("no requestsPerSec")?,
        p50_us: seconds(&percentiles["p50"], "p50")?,
        p99_us: seconds(&percentiles["p99"], "p99")?,
        p999_us: seconds(&percentiles["p99.9"], "p99.9")?,
        requests: answered,
        errors: bad_status + transport_errors,
        error_kinds,
    })
}

/// One process (no master, so its CPU and memory are the proxy's), both
/// listeners on the pod gateway, keepalive to the upstream over HTTP/1.1 (nginx
/// has no HTTP/2 upstreams). `listen ... http2` on a plaintext port is h2c with
/// prior knowledge.
fn nginx_conf(dir: &Path, listen: Ipv4Addr, upstream: &str) -> String {
    let dir = dir.display();
    format!(
        "daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 8192;
pid {dir}/bench-http-nginx.pid;
error_log {dir}/bench-http-nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/bench-http-nginx-client-body;
    proxy_temp_path {dir}/bench-http-nginx-proxy;
    fastcgi_temp_path {dir}/bench-http-nginx-fastcgi;
    uwsgi_temp_path {dir}/bench-http-nginx-uwsgi;
    scgi_temp_path {dir}/bench-http-nginx-scgi;
    upstream echo {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen}:{NGINX_H1_PORT};
        listen {listen}:{NGINX_H2C_PORT} http2;
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $host;
        }}
    }}
}}
"
    )
}

fn aims(rows: &[Row]) -> Vec<Aim> {
    let find = |proto, route, load| {
        rows.iter()
            .find(|row| row.proto == proto && row.route == route && row.load == load)
    };
    let run = |proto, route, load| find(proto, route, load).and_then(|row| row.run.as_ref());
    let mut aims = Vec::new();
    for proto in Proto::ALL {
        let ratio = run(proto, Route::Mesh, Load::Saturation)
            .zip(run(proto, Route::Nginx, Load::Saturation))
            .map_or(f64::NAN, |(mesh, nginx)| {
                mesh.requests_per_s / nginx.requests_per_s
            });
        aims.push(Aim::at_least(
            format!("{proto} req/s at saturation, mesh >= 0.8x nginx"),
            ratio,
            0.8,
        ));
    }
    let agents_cpu = find(Proto::Http1, Route::Mesh, Load::Saturation)
        .filter(|row| row.run.is_some())
        .map_or(f64::NAN, |row| {
            row.proxies.iter().map(|p| p.cpu_us_per_request).sum()
        });
    aims.push(
        Aim::at_most(
            "both agents together <= 20 us CPU per HTTP/1.1 request (saturation)".into(),
            agents_cpu,
            20.0,
        )
        .in_unit("us"),
    );
    let cpu = |route| {
        find(Proto::Http1, route, Load::Saturation)
            .filter(|row| row.run.is_some())
            .map_or(f64::NAN, |row| {
                row.proxies
                    .iter()
                    .map(|p| p.cpu_us_per_request)
                    .sum::<f64>()
            })
    };
    aims.push(
        Aim::at_most(
            format!("{AUTHZ_POLICIES} AuthorizationPolicies selecting the upstream add <= 1 us agent CPU per HTTP/1.1 request (mesh+authz - mesh, saturation)"),
            cpu(Route::MeshAuthz) - cpu(Route::Mesh),
            1.0,
        )
        .in_unit("us"),
    );
    aims.push(
        Aim::at_most(
            "one live tap per agent adds <= 5% agent CPU per HTTP/1.1 request (mesh+tap / mesh - 1, saturation)".into(),
            (cpu(Route::MeshTap) / cpu(Route::Mesh) - 1.0) * 100.0,
            5.0,
        )
        .in_unit("%"),
    );
    aims.push(
        Aim::at_most(
            "access logs of every request add <= 10% agent CPU per HTTP/1.1 request (mesh+log / mesh - 1, saturation)".into(),
            (cpu(Route::MeshLog) / cpu(Route::Mesh) - 1.0) * 100.0,
            10.0,
        )
        .in_unit("%"),
    );
    aims.push(
        Aim::at_most(
            "a default TrafficPolicy adds <= 2 us agent CPU per HTTP/1.1 request (mesh+policy - mesh, saturation)".into(),
            cpu(Route::MeshPolicy) - cpu(Route::Mesh),
            2.0,
        )
        .in_unit("us"),
    );
    for proto in Proto::ALL {
        let added = run(proto, Route::Mesh, Load::Fixed)
            .zip(run(proto, Route::Direct, Load::Fixed))
            .map_or(f64::NAN, |(mesh, direct)| mesh.p99_us - direct.p99_us);
        aims.push(
            Aim::at_most(
                format!("{proto} at {FIXED_RATE} req/s, mesh p99 <= direct p99 + 1 ms"),
                added,
                1000.0,
            )
            .in_unit("us added"),
        );
    }
    let rss_mb = Proto::ALL
        .into_iter()
        .filter_map(|proto| find(proto, Route::Mesh, Load::Fixed))
        .filter(|row| row.run.is_some())
        .flat_map(|row| row.proxies.iter().map(|p| p.vm_rss_kb as f64 / 1024.0))
        .reduce(f64::max)
        .unwrap_or(f64::NAN);
    aims.push(
        Aim::at_most(
            format!("agent RSS < 30 MB at {FIXED_RATE} req/s (largest of both agents)"),
            rss_mb,
            30.0,
        )
        .in_unit("MB"),
    );
    aims
}

fn print_report(report: &Report) {
    let sizes = &report.sizes;
    println!(
        "mesh HTTP benchmark{}: upstream mesh-testapp --http-echo in {UPSTREAM}, path {PATH}",
        if report.quick { " (quick)" } else { "" }
    );
    println!(
        "  direct: {DIRECT_CLIENT} -> {UPSTREAM}:{ECHO_PORT}; mesh: {MESH_CLIENT} -> Service VIP -> {CLIENT_NODE} agent -> mTLS -> {UPSTREAM_NODE} agent -> {UPSTREAM}; nginx: {DIRECT_CLIENT} -> nginx in {CLIENT_NODE}'s netns -> {UPSTREAM}"
    );
    println!(
        "  saturation: wrk -t1 -c{WRK_CONNECTIONS} (HTTP/1.1), h2load -c{H2LOAD_CONNECTIONS} -m{H2LOAD_STREAMS} (h2c), {} s; fixed: oha -q {FIXED_RATE} -c {FIXED_CONNECTIONS} --latency-correction, {} s",
        sizes.saturation_secs, sizes.fixed_secs
    );
    println!(
        "\n  {:<9} {:<11} {:<7} {:>9} {:>8} {:>8} {:>9} {:>7}  {:<15} RSS MB",
        "proto", "load", "route", "req/s", "p50 us", "p99 us", "p99.9 us", "errors", "CPU us/req",
    );
    for row in &report.rows {
        let head = format!(
            "  {:<9} {:<11} {:<7}",
            row.proto.to_string(),
            row.load.to_string(),
            row.route.to_string()
        );
        let Some(run) = &row.run else {
            let error = row.error.as_deref().unwrap_or("no figures");
            let first = error.lines().next().unwrap_or_default();
            println!("{head} FAILED: {first}");
            continue;
        };
        let joined = |figure: &dyn Fn(&ProxyCost) -> String| {
            if row.proxies.is_empty() {
                "-".to_string()
            } else {
                row.proxies.iter().map(figure).collect::<Vec<_>>().join("+")
            }
        };
        let cpu = joined(&|p| format!("{:.1}", p.cpu_us_per_request));
        let rss = joined(&|p| format!("{:.1}", p.vm_rss_kb as f64 / 1024.0));
        println!(
            "{head} {:>9.0} {:>8.0} {:>8.0} {:>9.0} {:>7}  {cpu:<15} {rss}",
            run.requests_per_s, run.p50_us, run.p99_us, run.p999_us, run.errors
        );
        if !run.error_kinds.is_empty() {
            println!("      errors: {}", run.error_kinds.join(", "));
        }
    }
    println!(
        "  (CPU and RSS: the agents of {CLIENT_NODE}+{UPSTREAM_NODE} on mesh rows, nginx on nginx rows)"
    );
    println!("\nAims");
    for aim in &report.aims {
        let (verdict, figure) = if aim.measured.is_nan() {
            ("MISSED", "no figure: a row it needs failed".to_string())
        } else {
            (
                if aim.met { "MET" } else { "MISSED" },
                format!("{:.2} {}", aim.measured, aim.unit),
            )
        };
        println!("  {verdict:<7} {}: {figure}", aim.aim);
    }
}

/// `meshctl tap -o json` on a node's admin socket, reading every event into
/// nothing; killed on drop.
struct Tapper(std::process::Child);

impl Tapper {
    fn start(cluster: &Cluster, node: &str) -> Result<Tapper> {
        let socket = &cluster.node(node).admin_socket;
        let child = Command::new(cluster::default_meshctl_bin())
            .arg("--admin")
            .arg(socket)
            .args(["tap", "-o", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting meshctl tap")?;
        // Subscribed once the agent counts it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = cluster
                .node_command(node, "curl")
                .args(["-sf", "http://127.0.0.1:15020/metrics"])
                .stdin(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if text.lines().any(|l| l.trim() == "mesh_agent_tap_tappers 1") {
                return Ok(Tapper(child));
            }
            ensure!(
                Instant::now() < deadline,
                "meshctl tap on {node} never subscribed"
            );
            thread::sleep(POLL);
        }
    }
}

impl Drop for Tapper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_with_the_percentile_script() {
        let out = "Running 2s test @ http://198.18.100.1:80/bench
  1 threads and 32 connections
  Latency Distribution
     50%  510.00us
     99%    1.20ms
  20000 requests in 2.00s, 6.00MB read
Requests/sec:  10000.00
mesh-bench-latency-us 512 1203 2250
";
        assert_eq!(
            parse_wrk_percentiles(out).unwrap(),
            LoadRun {
                requests_per_s: 10000.0,
                p50_us: 512.0,
                p99_us: 1203.0,
                p999_us: 2250.0,
                requests: 20000,
                errors: 0,
                error_kinds: Vec::new(),
            }
        );
        assert!(parse_wrk_percentiles(&out.replace("mesh-bench", "x")).is_err());
    }

    #[test]
    fn reads_h2load_summary_and_log() {
        let out = "finished in 2.00s, 1500.00 req/s, 8.91MB/s
requests: 3000 total, 3008 started, 3000 done, 2990 succeeded, 10 failed, 0 errored, 2 timeout
status codes: 2990 2xx, 0 3xx, 0 4xx, 10 5xx
";
        let log: String = (1..=1000)
            .map(|us| format!("1796173412371136\t200\t{us}\n"))
            .collect();
        let run = parse_h2load(out, &log).unwrap();
        assert_eq!(
            run,
            LoadRun {
                requests_per_s: 1500.0,
                p50_us: 500.0,
                p99_us: 990.0,
                p999_us: 999.0,
                requests: 3000,
                errors: 12,
                error_kinds: Vec::new(),
            }
        );
        assert!(parse_h2load(out, "").is_err());
        assert!(parse_h2load("connect failed", &log).is_err());
    }

    #[test]
    fn reads_oha_json() {
        let out = r#"{"summary": {"successRate": 1.0, "requestsPerSec": 999.5},
            "latencyPercentiles": {"p50": 0.0004, "p99": 0.0012, "p99.9": 0.003},
            "statusCodeDistribution": {"200": 1990, "503": 8},
            "errorDistribution": {"connection closed": 2, "aborted due to deadline": 3}}"#;
        let run = parse_oha(out).unwrap();
        assert_eq!(run.requests, 1998);
        assert_eq!(run.errors, 10);
        assert_eq!(
            run.error_kinds,
            [
                "3x aborted due to deadline (not counted)",
                "2x connection closed"
            ]
        );
        assert!((run.p50_us - 400.0).abs() < 1e-6, "{run:?}");
        assert!((run.p999_us - 3000.0).abs() < 1e-6, "{run:?}");
        assert!(parse_oha("{}").is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 5.0);
        assert_eq!(percentile(&values, 99.0), 10.0);
        assert_eq!(percentile(&[7.0], 99.9), 7.0);
    }
}
