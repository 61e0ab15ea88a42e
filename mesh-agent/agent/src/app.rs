//! Wiring of the node agent: settings, start-up order and shutdown.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use prometheus_client::registry::Registry;
use tokio::net::{TcpSocket, UnixListener};
use tracing::{error, info, warn};

use mesh_api::{
    client::AgentConnector,
    identity::read_token,
    names::{DEFAULT_TRUST_DOMAIN, ports},
    serve::raise_nofile_limit,
};

use crate::{
    admin,
    certs::{self, Manager, TlsMaterial},
    health::Health,
    kernel_stats::KernelStats,
    proxy::{
        drain::Drain,
        http::{
            proxy::{Forwarder, HttpProxy},
            upstream::Upstreams,
        },
        inbound::Inbound,
        outbound::Outbound,
        plaintext::Plaintext,
        tunnel::TunnelClient,
    },
    redirect::{
        self, Redirect,
        enrolment::{InboundListeners, Workloads},
    },
    state::{
        Context as StateContext, State,
        discovery::{self, Discovery},
    },
    telemetry::{ConnectionTable, Metrics},
};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    about = "Node agent of the mesh",
    version,
    after_help = "A stop signal (SIGTERM, SIGINT) drains and exits, leaving the kernel programs in place: pods' new connections are refused, never let past the mesh, until the next agent starts. To remove them for good: `mesh-agent uninstall --help`."
)]
pub struct Args {
    /// Name of this node.
    #[arg(long, env = "MESH_NODE")]
    pub node: String,
    /// cgroup v2 directory holding this node's pods; the kernel programs attach here.
    #[arg(long)]
    pub cgroup_root: PathBuf,
    /// Address pods reach the agent on (their gateway); redirected connects go here.
    #[arg(long)]
    pub agent_ip: Ipv4Addr,
    #[arg(long, default_value_t = ports::OUTBOUND)]
    pub outbound_port: u16,
    /// Unix socket of the admin API used by meshctl.
    #[arg(long, default_value = "/run/mesh/admin.sock")]
    pub admin_socket: PathBuf,
    /// bpffs directory where this agent pins its links.
    #[arg(long, default_value = "/sys/fs/bpf/mesh")]
    pub bpf_pin_dir: PathBuf,
    /// Compiled kernel programs (`cargo xtask build-ebpf`). Default: next to
    /// the binary, then target/bpf/ of the workspace it was built in.
    #[arg(long, env = "MESH_BPF_OBJECT")]
    pub bpf_object: Option<PathBuf>,
    /// Destination ports never redirected (repeatable).
    #[arg(long = "exclude-port")]
    pub exclude_ports: Vec<u16>,
    /// `/metrics` and `/healthz/ready`.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value_t = 5000)]
    pub connect_timeout_ms: u64,
    /// Control server (`https://host:15012`, with --ca-bundle), or several
    /// replicas of it separated by commas (`https://a:15012,https://b:15012`):
    /// the agent uses one at a time and goes on to the next when it fails.
    /// Without it the agent only carries connections to their original
    /// destinations.
    #[arg(long, env = "MESH_CONTROL_ADDR")]
    pub control_addr: Option<String>,
    /// This node's bootstrap token for the control server: it gets the node
    /// its first certificate, which authenticates the agent from then on.
    #[arg(long, requires = "control_addr")]
    pub token_file: Option<PathBuf>,
    /// The mesh CA's root (mesh-control's `<ca-dir>/ca.crt`): the control
    /// server must prove its identity against it.
    #[arg(long, requires = "control_addr")]
    pub ca_bundle: Option<PathBuf>,
    /// Trust domain of the mesh's SPIFFE IDs.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Where the last good configuration is kept, so a restart during a
    /// control-server outage still serves it.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Port on the agent address that nothing listens on: connects to a VIP
    /// port no Service owns are sent here and refused.
    #[arg(long, default_value_t = ports::REFUSAL)]
    pub refusal_port: u16,
    /// Connections from pods the agent carries at once; more are reset.
    #[arg(long, default_value_t = 16384)]
    pub max_connections: usize,
    /// Inbound tunnel listener: mutual TLS from other nodes' agents.
    #[arg(long, default_value = "0.0.0.0:15008")]
    pub tunnel_addr: SocketAddr,
    /// Port of the inbound plaintext listener the agent opens (on
    /// 127.0.0.1) inside each enrolled pod's network namespace.
    #[arg(long, default_value_t = ports::INBOUND_PLAINTEXT)]
    pub inbound_plaintext_port: u16,
    /// Let connections from this address into pods without the agent, as
    /// the kubelet's health probes need when pods are STRICT: `IP` (any
    /// port) or `IP:PORT` (repeatable). Any process that can send from that
    /// address passes too, so name the kubelet's own address and, where
    /// possible, the probe port.
    #[arg(long = "allow-probes-from", value_parser = parse_probe_source)]
    pub allow_probes_from: Vec<(Ipv4Addr, u16)>,
    /// Where JSON access log lines go (`-`: stdout), for the Services whose
    /// TrafficPolicy sets `accessLog`; without it nothing is logged.
    #[arg(long)]
    pub access_log: Option<PathBuf>,
    /// OTLP gRPC collector (`http://host:port`, e.g. an OpenTelemetry
    /// Collector on :4317) for a span per hop of every HTTP request; without
    /// it no spans are made and trace headers pass as they came.
    #[arg(long, value_parser = crate::trace::parse_endpoint)]
    pub otlp_endpoint: Option<String>,
    /// Share (0..=1) of new traces kept; a request whose caller already
    /// decided (the sampled flag of `traceparent` or B3) follows it.
    #[arg(long, default_value_t = 1.0, value_parser = crate::trace::parse_sampling, requires = "otlp_endpoint")]
    pub trace_sampling: f64,
    /// On a stop signal, how long connections already open may go on
    /// (`10s`, `500ms`); those still open then are closed. The listeners
    /// close at once: new connections are refused meanwhile.
    #[arg(long, default_value = "10s", value_parser = crate::proxy::drain::parse_timeout)]
    pub drain_timeout: Duration,
}

/// `mesh-agent uninstall`: what takes the mesh off a node for good.
#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent uninstall",
    bin_name = "mesh-agent uninstall",
    about = "Detach the mesh's kernel programs and remove their pinned links and maps (after the agent has stopped): pods then connect outside the mesh",
    version
)]
pub struct Uninstall {
    /// The agent's --bpf-pin-dir.
    #[arg(long, default_value = "/sys/fs/bpf/mesh")]
    pub bpf_pin_dir: PathBuf,
}

/// Unpins every link and map the node's agents left; see [`redirect::uninstall`].
pub fn uninstall(args: &Uninstall) -> anyhow::Result<()> {
    let removed = redirect::uninstall(&args.bpf_pin_dir)
        .with_context(|| format!("uninstalling from {}", args.bpf_pin_dir.display()))?;
    println!(
        "removed {} links and {} maps from {}",
        removed.links,
        removed.maps,
        args.bpf_pin_dir.display()
    );
    Ok(())
}

/// `IP` or `IP:PORT` (port 0 for any).
fn parse_probe_source(s: &str) -> Result<(Ipv4Addr, u16), String> {
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok((ip, 0));
    }
    s.parse::<SocketAddrV4>()
        .map(|a| (*a.ip(), a.port()))
        .map_err(|_| format!("{s:?} is not an IPv4 address or IPv4 address:port"))
}

/// Where enrolment is kept in `--cache-dir`.
const ENROLMENT_FILE: &str = "enrolled.json";

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut stop = StopSignals::register().context("registering signal handlers")?;
    let drain = Drain::default();
    raise_nofile_limit();
    let object = bpf_object(args.bpf_object.as_deref())?;
    let outbound_addr = SocketAddrV4::new(args.agent_ip, args.outbound_port);
    // Listen before attaching, so no redirected connect finds the port closed.
    let outbound = listen(SocketAddr::V4(outbound_addr))
        .with_context(|| format!("binding outbound listener {outbound_addr}"))?;
    let telemetry = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding metrics listener {}", args.metrics_addr))?;
    if let Some(dir) = args.admin_socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&args.admin_socket);
    let admin_listener = UnixListener::bind(&args.admin_socket)
        .with_context(|| format!("binding admin socket {}", args.admin_socket.display()))?;
    // Everything else that can fail on bad settings fails here, before the
    // kernel programs change: the node stays as the last agent left it.
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    let tunnel_listener = match &args.control_addr {
        Some(_) => Some(
            tokio::net::TcpListener::bind(args.tunnel_addr)
                .await
                .with_context(|| format!("binding tunnel listener {}", args.tunnel_addr))?,
        ),
        None => None,
    };
    let node_addresses = node_addresses().context("reading this node's addresses")?;

    let agent_cgroup = redirect::own_cgroup().context("finding the agent's own cgroup")?;
    check_agent_cgroup(&agent_cgroup, &args.cgroup_root)?;
    let settings = redirect::Settings {
        object,
        cgroup_root: args.cgroup_root.clone(),
        pin_dir: args.bpf_pin_dir.clone(),
        outbound: outbound_addr,
        agent_cgroup_id: redirect::cgroup_id(&agent_cgroup)
            .with_context(|| format!("reading the agent's cgroup {}", agent_cgroup.display()))?,
        excluded_ports: args.exclude_ports.clone(),
        refusal_port: args.refusal_port,
        agent_cgroup,
        probe_sources: args.allow_probes_from.clone(),
    };
    let redirect = Arc::new(Redirect::attach(&settings).context("attaching kernel programs")?);
    let (pod_events, pod_events_rx) = tokio::sync::mpsc::unbounded_channel();
    let workloads = Workloads::new(
        args.cgroup_root.clone(),
        redirect.clone(),
        args.cache_dir.as_ref().map(|d| d.join(ENROLMENT_FILE)),
        InboundListeners {
            port: args.inbound_plaintext_port,
            events: pod_events,
        },
    );
    // From here on a failure leaves the programs attached with the pinned
    // state they found: pods' connects go to a port nothing serves (fail
    // closed) until an agent starts.
    workloads
        .restore()
        .context("restoring enrolment (the node stays fail-closed)")?;
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let kernel_stats = Arc::new(KernelStats::default());
    kernel_stats.register(&mut registry);
    let health = Arc::new(Health::default());
    health.register(&mut registry);
    if let Some(path) = &args.access_log {
        metrics
            .access_log
            .start(path.clone())
            .with_context(|| format!("opening the access log {}", path.display()))?;
    }
    if let Some(endpoint) = &args.otlp_endpoint {
        metrics.trace.start(&crate::trace::Settings {
            endpoint: endpoint.clone(),
            sampling: args.trace_sampling,
            node: args.node.clone(),
        })?;
    }
    let connections = Arc::new(ConnectionTable::new(1024, &metrics));

    let ctx = StateContext {
        node: args.node.clone(),
        agent_ip: args.agent_ip,
        trust_domain: args.trust_domain.clone(),
        node_addresses,
        registry: Default::default(),
    };
    let (config, sync, discovery, identity) = match &args.control_addr {
        Some(addr) => {
            let connector = Arc::new(AgentConnector::new(
                addr,
                &args.node,
                &args.trust_domain,
                token,
                args.ca_bundle.clone(),
            )?);
            let kernel = redirect.clone();
            let install: discovery::Install = Box::new(move |state: &State| {
                kernel
                    .sync_services(&state.services.addresses())
                    .and_then(|()| kernel.sync_inbound(&state.inbound_modes()))
                    .map_err(|e| e.to_string())
            });
            let (d, rx, sync) = Discovery::new(
                discovery::Settings {
                    ctx: ctx.clone(),
                    connector: connector.clone(),
                    cache_dir: args.cache_dir.clone(),
                },
                install,
            )?;
            // Certificates come from a control server with a CA (over TLS).
            let identity = connector.is_tls().then(|| {
                let settings = certs::Settings {
                    node: args.node.clone(),
                    cache_dir: args.cache_dir.clone(),
                };
                Manager::new(settings, connector, rx.clone())
            });
            (rx, Some(sync), Some(d), identity)
        }
        None => {
            // No control server: an empty table, so everything passes through.
            // (A receiver keeps its last value after the sender is gone.)
            let empty = State::build(String::new(), Default::default(), &ctx)
                .expect("an empty state is valid");
            let (_, rx) = tokio::sync::watch::channel(Arc::new(empty));
            (rx, None, None, None)
        }
    };
    let (identity, tls_material, identity_status): (Option<Manager>, Option<TlsMaterial>, _) =
        match identity {
            Some((m, material, status)) => {
                m.metrics().register(&mut registry);
                (Some(m), Some(material), Some(status))
            }
            None => (None, None, None),
        };
    let connect_timeout = Duration::from_millis(args.connect_timeout_ms);
    let tunnel = tls_material
        .clone()
        .map(|m| Arc::new(TunnelClient::new(m, metrics.clone(), connect_timeout)));
    let upstreams = Arc::new(Upstreams::new(connect_timeout));
    let plaintext = Arc::new(Plaintext {
        state: config.clone(),
        metrics: metrics.clone(),
        upstreams: upstreams.clone(),
        connect_timeout,
        max_connections: args.max_connections,
        drain: drain.clone(),
    });
    let inbound = match tls_material {
        Some(creds) => {
            let listener =
                tunnel_listener.context("a tunnel listener comes with a control server")?;
            Some((
                Arc::new(Inbound {
                    creds,
                    metrics: metrics.clone(),
                    state: config.clone(),
                    connect_timeout,
                    max_connections: args.max_connections,
                    upstreams: upstreams.clone(),
                    drain: drain.clone(),
                }),
                listener,
            ))
        }
        None => None,
    };

    let proxy = Arc::new(Outbound {
        redirect: redirect.clone(),
        workloads: workloads.clone(),
        metrics: metrics.clone(),
        connections: connections.clone(),
        connect_timeout,
        state: config.clone(),
        tunnel: tunnel.clone(),
        max_connections: args.max_connections,
        http: Arc::new(HttpProxy {
            state: config.clone(),
            forward: Forwarder { tunnel, upstreams },
            metrics: metrics.clone(),
            drain: drain.clone(),
        }),
        drain: drain.clone(),
    });
    let state = Arc::new(admin::State {
        node: args.node.clone(),
        started: Instant::now(),
        redirect: redirect.clone(),
        workloads,
        metrics,
        kernel_stats,
        health,
        registry,
        connections,
        sync,
        config,
        identity: identity_status,
        tasks: Default::default(),
        drain: drain.clone(),
    });
    let mut tasks = vec![
        ("outbound", tokio::spawn(proxy.run(outbound))),
        (
            "inbound plaintext",
            tokio::spawn(plaintext.run(pod_events_rx)),
        ),
        (
            "admin",
            tokio::spawn(admin::serve_admin(admin_listener, state.clone())),
        ),
        (
            "telemetry",
            tokio::spawn(admin::serve_telemetry(telemetry, state.clone())),
        ),
    ];
    if let Some(d) = discovery {
        tasks.push(("discovery", tokio::spawn(d.run())));
    }
    if let Some(m) = identity {
        tasks.push(("certificates", tokio::spawn(m.run())));
    }
    if let Some((server, listener)) = inbound {
        tasks.push(("inbound tunnel", tokio::spawn(server.run(listener))));
    }
    *state.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks
        .iter()
        .map(|(name, t)| (*name, t.abort_handle()))
        .collect();
    let watch = tokio::spawn(report_stopped_tasks(state.clone()));
    info!(node = %args.node, outbound = %outbound_addr, admin = %args.admin_socket.display(), "agent ready");

    stop.recv().await;
    // The listeners' tasks end now (a stopped task is no fault any more).
    watch.abort();
    let open = drain.start();
    info!(
        open_connections = open,
        drain_timeout = ?args.drain_timeout,
        "draining: listeners closed (new connections are refused), reporting not ready"
    );
    let deadline = Instant::now() + args.drain_timeout;
    let left = tokio::select! {
        left = drain.wait_closed(deadline) => left,
        () = stop.recv() => {
            info!("second stop signal: not waiting for the drain");
            drain.open_connections()
        }
    };
    if left == 0 {
        info!(
            open_connections = open,
            "drained: every connection finished"
        );
    } else {
        warn!(
            open_connections = open,
            left, "drain deadline: closing the connections still open"
        );
    }
    for (_, t) in tasks {
        t.abort();
    }
    state.metrics.trace.flush(Duration::from_secs(2)).await;
    drop(state);
    let _ = std::fs::remove_file(&args.admin_socket);
    info!(
        pin_dir = %args.bpf_pin_dir.display(),
        "stopped; the kernel programs stay pinned (pods fail closed until the next agent); `mesh-agent uninstall` removes them"
    );
    Ok(())
}

/// Logs, once each, a long-running task that ended: the agent then reports
/// not ready, and says which part stopped.
async fn report_stopped_tasks(state: Arc<admin::State>) {
    let mut reported = BTreeSet::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (name, task) in state.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if task.is_finished() && reported.insert(*name) {
                error!(
                    task = name,
                    "an agent task stopped; the agent reports not ready"
                );
            }
        }
    }
}

/// The agent's connections into pods are recognised by its cgroup, so the
/// cgroup must hold the agent alone: not the root (every process of the
/// host), and not an ancestor of the pods (they would pass as the agent).
fn check_agent_cgroup(agent: &std::path::Path, pods: &std::path::Path) -> anyhow::Result<()> {
    if redirect::cgroup_level(agent)? == 0 {
        anyhow::bail!(
            "the agent runs in the root cgroup; start it in a cgroup of its own (its connections into pods are known by it)"
        );
    }
    let pods =
        std::fs::canonicalize(pods).with_context(|| format!("--cgroup-root {}", pods.display()))?;
    let agent = std::fs::canonicalize(agent)?;
    if pods.starts_with(&agent) || agent.starts_with(&pods) {
        anyhow::bail!(
            "the agent's cgroup {} and the pods' --cgroup-root {} must be apart (neither inside the other)",
            agent.display(),
            pods.display()
        );
    }
    Ok(())
}

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Registered before anything can report the agent ready, so a stop signal
/// that follows readiness always gets a drain and a clean exit.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn register() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn bpf_object(explicit: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("binary has no directory")?;
    let candidates = [
        dir.join("mesh-ebpf.o"),
        dir.join("../bpf/mesh-ebpf.o"),
        PathBuf::from("/usr/lib/mesh/mesh-ebpf.o"),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| {
            format!(
                "no eBPF object found (looked at {candidates:?}); run `cargo xtask build-ebpf` or pass --bpf-object"
            )
        })
}

/// This network namespace's local IPv4 addresses, from the kernel's routing
/// table (`/proc/net/fib_trie`, whose `/32 host LOCAL` leaves are them).
fn node_addresses() -> std::io::Result<BTreeSet<Ipv4Addr>> {
    Ok(local_addresses(&std::fs::read_to_string(
        "/proc/net/fib_trie",
    )?))
}

pub fn local_addresses(fib_trie: &str) -> BTreeSet<Ipv4Addr> {
    let mut found = BTreeSet::new();
    let mut last = None;
    for line in fib_trie.lines() {
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|-- ") {
            last = ip.parse().ok();
        } else if line.contains("/32 host LOCAL")
            && let Some(ip) = last
        {
            found.insert(ip);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_sources_are_an_address_with_or_without_a_port() {
        let ip = Ipv4Addr::new(198, 19, 2, 1);
        assert_eq!(parse_probe_source("198.19.2.1"), Ok((ip, 0)));
        assert_eq!(parse_probe_source("198.19.2.1:9100"), Ok((ip, 9100)));
        for bad in [
            "198.19.2",
            "198.19.2.1:",
            "198.19.2.1:99999",
            "[::1]:80",
            "kubelet",
        ] {
            let err = parse_probe_source(bad).expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn tracing_flags_are_checked_by_name() {
        let base = [
            "mesh-agent",
            "--node",
            "node1",
            "--cgroup-root",
            "/sys/fs/cgroup",
            "--agent-ip",
            "198.19.1.1",
        ];
        let parse = |extra: &[&str]| Args::try_parse_from(base.iter().chain(extra));
        let a = parse(&[]).unwrap();
        assert_eq!((a.otlp_endpoint, a.trace_sampling), (None, 1.0));
        let a = parse(&[
            "--otlp-endpoint",
            "http://198.18.0.2:4317",
            "--trace-sampling",
            "0.1",
        ])
        .unwrap();
        assert_eq!(a.otlp_endpoint.as_deref(), Some("http://198.18.0.2:4317"));
        assert_eq!(a.trace_sampling, 0.1);
        for (bad, named) in [
            (&["--trace-sampling", "0.5"][..], "--otlp-endpoint"),
            (
                &["--otlp-endpoint", "http://c:4317", "--trace-sampling", "2"],
                "--trace-sampling",
            ),
            (&["--otlp-endpoint", "198.18.0.2:4317"], "--otlp-endpoint"),
        ] {
            let e = parse(bad).expect_err(&format!("{bad:?}")).to_string();
            assert!(e.contains(named), "{bad:?}: {e}");
        }
    }

    #[test]
    fn drain_timeout_defaults_to_ten_seconds_and_bad_values_name_the_flag() {
        let base = [
            "mesh-agent",
            "--node",
            "node1",
            "--cgroup-root",
            "/sys/fs/cgroup",
            "--agent-ip",
            "198.19.1.1",
        ];
        let parse = |extra: &[&str]| Args::try_parse_from(base.iter().chain(extra));
        assert_eq!(parse(&[]).unwrap().drain_timeout, Duration::from_secs(10));
        let a = parse(&["--drain-timeout", "2s"]).unwrap();
        assert_eq!(a.drain_timeout, Duration::from_secs(2));
        let e = parse(&["--drain-timeout", "soon"]).unwrap_err().to_string();
        assert!(e.contains("--drain-timeout") && e.contains("soon"), "{e}");
        let u = Uninstall::try_parse_from(["mesh-agent uninstall", "--bpf-pin-dir", "/x"]).unwrap();
        assert_eq!(u.bpf_pin_dir, PathBuf::from("/x"));
        assert!(Uninstall::try_parse_from(["mesh-agent uninstall", "--node", "n"]).is_err());
    }

    #[test]
    fn local_addresses_are_the_host_local_leaves_of_the_fib() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     +-- 198.18.0.0/24 2 0 2\n        |-- 198.18.0.0\n           /24 link UNICAST\n        |-- 198.18.0.11\n           /32 host LOCAL\n        |-- 198.18.0.255\n           /32 link BROADCAST\n  +-- 127.0.0.0/8 2 0 2\n     |-- 127.0.0.1\n        /32 host LOCAL\nLocal:\n     |-- 198.19.1.1\n        /32 host LOCAL\n";
        assert_eq!(
            local_addresses(trie).into_iter().collect::<Vec<_>>(),
            [
                Ipv4Addr::new(127, 0, 0, 1),
                Ipv4Addr::new(198, 18, 0, 11),
                Ipv4Addr::new(198, 19, 1, 1)
            ]
        );
    }
}
