//! `mesh-control`: the control server of the mesh.
use std::{
    io::Write,
    net::SocketAddr,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use mesh_api::{
    identity::{Ca, read_token},
    names::DEFAULT_TRUST_DOMAIN,
    serve::raise_nofile_limit,
};
use mesh_control::{self as control, Access, ControlPlane, Listeners, auth, certs, store};
use tokio::{
    net::{TcpListener, UnixListener},
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

/// How long open connections get to finish after SIGTERM.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(name = "mesh-control", about = "Control server of the mesh", version)]
struct Args {
    /// gRPC address (TLS) for configuration distribution to agents,
    /// certificate signing, and the operator API (which needs
    /// --admin-token-file there).
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Unix socket serving the operator API alone, without a token: access
    /// is the socket file's permissions (0600).
    #[arg(long, default_value = "/run/mesh/control.sock")]
    operator_socket: PathBuf,
    /// Directory of the durable store; created if missing.
    #[arg(long, default_value = "/var/lib/mesh-control")]
    store_dir: PathBuf,
    /// Where the resources are kept: `file` (the durable store in
    /// --store-dir), or `etcd://host:port[,host:port...][/prefix]`, shared
    /// by several replicas (the root CA then lives there too, unless
    /// --ca-cert is given; --store-dir only receives its ca.crt).
    #[arg(long, default_value = "file", value_parser = store_location)]
    store: StoreLocation,
    /// Agents' bootstrap tokens: a YAML map `node: token`. An agent uses its
    /// token for its first node certificate, and that certificate afterwards.
    /// Optional in Kubernetes mode, where agents show their service-account
    /// tokens instead.
    #[arg(long, required_unless_present_any = ["kubernetes", "kube_api"])]
    tokens: Option<PathBuf>,
    /// Learn pods, Services, routes and policies from the Kubernetes API
    /// server (in-cluster: the pod's service account), in the namespaces
    /// labelled mesh.dev/enrolled=true, and verify agents' projected
    /// service-account tokens with a TokenReview.
    #[arg(long, conflicts_with = "kube_api")]
    kubernetes: bool,
    /// As --kubernetes, with the API server at this URL.
    #[arg(long)]
    kube_api: Option<String>,
    /// The bearer token for --kube-api (re-read as it rotates).
    #[arg(long, requires = "kube_api")]
    kube_token_file: Option<PathBuf>,
    /// The audience agents' projected tokens are for (the TokenReview asks
    /// for it).
    #[arg(long, default_value = control::kubernetes::review::DEFAULT_AUDIENCE)]
    token_audience: String,
    /// The agents' service account, `namespace/name`: a reviewed token is a
    /// node agent's only if it is this account's and names its node.
    #[arg(long, default_value = "mesh-system/mesh-agent", value_parser = service_account)]
    agent_service_account: (String, String),
    /// Trust domain of every SPIFFE ID the CA issues.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Directory of the generated root CA (ca.crt, ca.key 0600): loaded if
    /// present, else generated at first start. Agents trust its ca.crt
    /// (`mesh-agent --ca-bundle`). Default: <store-dir>/ca.
    #[arg(long, conflicts_with_all = ["ca_cert", "ca_key"])]
    ca_dir: Option<PathBuf>,
    /// The operator's own CA instead: the signing (intermediate) certificate,
    /// optionally followed by its parents up to the root (the trust bundle).
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Unencrypted PKCS#8 PEM key of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Lifetime of issued certificates (e.g. 24h, 5m, 90s); agents renew at
    /// half of it.
    #[arg(long, default_value = "24h", value_parser = cert_ttl)]
    cert_ttl: Duration,
    /// File holding the token that opens the operator API on --listen.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// `/metrics` and `/healthz/ready`.
    #[arg(long, default_value = "0.0.0.0:15014")]
    metrics_addr: SocketAddr,
    /// Compact the store's log into a new snapshot after this many transactions.
    #[arg(long, default_value_t = 1000)]
    compact_after: usize,
}

fn service_account(text: &str) -> Result<(String, String), String> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!("{text:?} is not namespace/name")),
    }
}

fn cert_ttl(text: &str) -> Result<Duration, String> {
    let ttl = certs::parse_duration(text)?;
    if ttl < certs::MIN_CERT_TTL {
        return Err(format!(
            "{text} is too short: at least {} s",
            certs::MIN_CERT_TTL.as_secs()
        ));
    }
    Ok(ttl)
}

/// The CA: the operator's, or the generated root in `ca_dir`.
fn load_ca(args: &Args) -> anyhow::Result<(Ca, PathBuf)> {
    if let (Some(cert), Some(key)) = (&args.ca_cert, &args.ca_key) {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let ca = Ca::from_pem(&args.trust_domain, &read(cert)?, &read(key)?)
            .with_context(|| format!("loading the CA {}", cert.display()))?;
        return Ok((ca, cert.clone()));
    }
    let dir = args
        .ca_dir
        .clone()
        .unwrap_or_else(|| args.store_dir.join("ca"));
    let bundle = dir.join("ca.crt");
    let present = ["ca.crt", "ca.key"].map(|f| dir.join(f).exists());
    if present == [false, false] {
        let ca = Ca::generate(&args.trust_domain).context("generating the root CA")?;
        ca.save(&dir)
            .with_context(|| format!("saving the root CA in {}", dir.display()))?;
        info!(dir = %dir.display(), "generated a root CA");
        return Ok((ca, bundle));
    }
    let ca = Ca::load(&dir, &args.trust_domain)
        .with_context(|| format!("loading the root CA from {}", dir.display()))?;
    Ok((ca, bundle))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("mesh-control: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    mesh_api::logging::init();
    raise_nofile_limit();
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let kubernetes = if args.kubernetes {
        Some(control::kubernetes::Connection::InCluster)
    } else {
        args.kube_api
            .clone()
            .map(|url| control::kubernetes::Connection::Url {
                url,
                token_file: args.kube_token_file.clone(),
            })
    };
    let kube = kubernetes
        .as_ref()
        .map(control::kubernetes::client)
        .transpose()
        .context("connecting to the Kubernetes API server")?;
    let mut tokens = match &args.tokens {
        Some(path) => auth::Tokens::load(path)?,
        None => auth::Tokens::default(),
    };
    if let Some(client) = &kube {
        let (namespace, account) = &args.agent_service_account;
        tokens = tokens.with_review(Arc::new(control::kubernetes::review::Reviewer::new(
            client.clone(),
            &args.token_audience,
            namespace,
            account,
        )));
    }
    let access = Access {
        tokens,
        admin_token: args
            .admin_token_file
            .as_deref()
            .map(read_token)
            .transpose()?,
        from_kubernetes: if kube.is_some() {
            control::kubernetes::KINDS.to_vec()
        } else {
            Vec::new()
        },
    };
    // The CA is loaded (or generated) under the store's lock, so two servers
    // started on one directory can't both generate a root.
    let mut bundle = PathBuf::new();
    let plane = if let StoreLocation::Etcd(config) = &args.store {
        open_etcd(&args, config, &mut bundle).await?
    } else {
        Arc::new(
            ControlPlane::open_with_authority(&args.store_dir, args.compact_after, || {
                let (ca, path) = load_ca(&args).map_err(|e| format!("{e:#}"))?;
                bundle = path;
                // The rotation state, the next CA, the ledger and revocations.
                let ca_state = args
                    .ca_dir
                    .clone()
                    .unwrap_or_else(|| args.store_dir.join("ca"));
                certs::Authority::open(ca, args.cert_ttl, &ca_state).map(Some)
            })
            .with_context(|| format!("opening the store in {}", args.store_dir.display()))?,
        )
    };
    let grpc = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let metrics = TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding {}", args.metrics_addr))?;
    let operator_socket = bind_socket(&args.operator_socket)?;
    let kubernetes_mode = match &kubernetes {
        None => "off".to_owned(),
        Some(control::kubernetes::Connection::InCluster) => "in-cluster".to_owned(),
        Some(control::kubernetes::Connection::Url { url, .. }) => url.clone(),
    };
    let _source = kube.map(|client| {
        AbortOnDrop(tokio::spawn(control::kubernetes::run(
            plane.clone(),
            client,
        )))
    });
    let ready = format!(
        "mesh-control ready: grpc={} metrics={} operator-socket={} revision={} trust-domain={} ca={} cert-ttl={}s kubernetes={}",
        grpc.local_addr()?,
        metrics.local_addr()?,
        args.operator_socket.display(),
        plane.revision(),
        args.trust_domain,
        bundle.display(),
        args.cert_ttl.as_secs(),
        kubernetes_mode,
    );
    // Handlers before the ready line: whoever reads it may signal at once.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    info!("{ready}");
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{ready}")?;
    stdout.flush()?;

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = control::serve(
        plane,
        access,
        Listeners {
            grpc: Some(grpc),
            operator_socket: Some(operator_socket),
            metrics: Some(metrics),
        },
        async {
            let _ = stopped.await;
        },
    );
    tokio::pin!(serving);
    let result = tokio::select! {
        result = &mut serving => result.map_err(Into::into),
        signal = async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        } => {
            info!(signal, "stopping");
            let _ = stop.send(());
            match tokio::time::timeout(GRACE, &mut serving).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => {
                    warn!(grace = ?GRACE, "connections still open; exiting anyway");
                    Ok(())
                }
            }
        }
    };
    let _ = std::fs::remove_file(&args.operator_socket);
    result
}

/// Stops the Kubernetes source when the server stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Clone, Debug)]
enum StoreLocation {
    File,
    Etcd(store::etcd::Config),
}

fn store_location(text: &str) -> Result<StoreLocation, String> {
    if text == "file" {
        return Ok(StoreLocation::File);
    }
    // clap names the flag and the value; the reason is ours.
    store::etcd::Config::parse(text)
        .map(StoreLocation::Etcd)
        .map_err(|e| match e {
            store::etcd::Error::BadLocation { reason, .. } => {
                format!("{reason} (expected file, or etcd://host:port[,host:port...][/prefix])")
            }
            e => e.to_string(),
        })
}

/// The control plane on etcd, with the operator's CA or the replicas'
/// shared root (generated by the first replica); the root's certificate is
/// written to `<store-dir>/ca.crt` for agents on this machine.
async fn open_etcd(
    args: &Args,
    config: &store::etcd::Config,
    bundle: &mut PathBuf,
) -> anyhow::Result<Arc<ControlPlane>> {
    if args.ca_dir.is_some() {
        anyhow::bail!(
            "--ca-dir is for the file store: with --store {config} the root CA lives in etcd (or give --ca-cert and --ca-key)"
        );
    }
    let etcd = store::etcd::EtcdStore::open(config)
        .await
        .with_context(|| format!("opening the store {config}"))?;
    let ca = if args.ca_cert.is_some() {
        let (ca, path) = load_ca(args)?;
        *bundle = path;
        ca
    } else {
        let ca = store::etcd::shared_ca(&etcd.client(), etcd.keys(), &args.trust_domain)
            .await
            .with_context(|| format!("the shared root CA in {config}"))?;
        std::fs::create_dir_all(&args.store_dir)
            .with_context(|| format!("creating {}", args.store_dir.display()))?;
        *bundle = args.store_dir.join("ca.crt");
        std::fs::write(&*bundle, ca.trust_bundle_pem())
            .with_context(|| format!("writing {}", bundle.display()))?;
        ca
    };
    let authority = certs::Authority::open(ca, args.cert_ttl, &args.store_dir.join("ca"))
        .map_err(|e| anyhow::anyhow!(e))?;
    ControlPlane::open_etcd(etcd, Some(authority))
        .with_context(|| format!("opening the store {config}"))
}

/// Binds the operator socket, replacing a stale one from a previous run.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}
