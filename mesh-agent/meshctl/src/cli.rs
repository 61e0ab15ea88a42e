//! `meshctl`: the operator's view of a node's live traffic (through the
//! node agent's admin socket) and of the mesh's configuration (through the
//! control server's operator API).
use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::{Code, Status};

use mesh_api::{
    admin::AdminClient,
    authz::ROOT_NAMESPACE,
    client::{self, Target},
    identity::{self, CertStore, SpiffeId, generate_key_and_csr, node_identity, read_token},
    kinds::Kind,
    names::{DEFAULT_NAMESPACE, DEFAULT_TRUST_DOMAIN, DOCUMENT_INDEX_METADATA},
    pb::{AgentsRequest, ApplyRequest, DeleteRequest, GetRequest},
};

use crate::node;

#[derive(Debug, Parser)]
#[command(name = "meshctl", about = "Operate the mesh", version)]
pub struct Args {
    /// Admin socket of the node agent to talk to.
    #[arg(
        long,
        global = true,
        env = "MESH_ADMIN_SOCKET",
        default_value = "/run/mesh/admin.sock"
    )]
    pub admin: PathBuf,
    /// JSON instead of tables: for agent commands the same as `-o json`.
    #[arg(long, global = true)]
    pub json: bool,
    /// Control server: `unix:///path/to/socket` (local, no token) or
    /// `https://host:15012` (with --token-file and --ca-bundle).
    #[arg(
        long,
        global = true,
        env = "MESH_CONTROL",
        default_value = "unix:///run/mesh/control.sock"
    )]
    pub control: String,
    /// Admin token for a control server reached over the network (for
    /// `sign`: a node's bootstrap token).
    #[arg(long, global = true, env = "MESH_CONTROL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The mesh CA's root (mesh-control's `<ca-dir>/ca.crt`), to verify a
    /// control server reached over https.
    #[arg(long, global = true, env = "MESH_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// Trust domain of the mesh (the control server proves
    /// spiffe://<trust domain>/ns/mesh-system/sa/mesh-control).
    #[arg(
        long,
        global = true,
        env = "MESH_TRUST_DOMAIN",
        default_value = DEFAULT_TRUST_DOMAIN
    )]
    pub trust_domain: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Yaml,
    Json,
}

/// How an agent command prints its answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Table,
    /// The admin API's answer, as it is.
    Json,
}

#[derive(Clone, Copy, Debug, clap::Args)]
pub struct AgentOutput {
    /// `table`, or `json`: the agent's answer as its admin API types it.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Agent status: enrolled pods, configuration sync, the kernel's
    /// redirect decisions and certificates.
    Status {
        #[command(flatten)]
        out: AgentOutput,
    },
    /// Open and recently closed connections carried by the agent.
    Connections {
        /// Only this many rows.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        out: AgentOutput,
    },
    /// The configuration the agent serves: workloads, services, routes and
    /// policies, with their versions and its sync state.
    Config {
        #[command(flatten)]
        out: AgentOutput,
    },
    /// The kernel side: programs and where they are attached, enrolled
    /// cgroups, map occupancy and the kernel's counters by reason.
    Bpf {
        #[command(flatten)]
        out: AgentOutput,
    },
    /// The certificates the agent holds: expiry, renewal, last error.
    Certs {
        #[command(flatten)]
        out: AgentOutput,
    },
    /// A live stream of the requests and connections the agent carries,
    /// with source and destination identity, route, status, latency, flags
    /// and policy verdict; filtered by the agent. Runs until interrupted.
    Tap {
        /// A pod (`name` or `namespace/name`): the source or the destination.
        #[arg(long)]
        pod: Option<String>,
        /// The namespace of the source or destination.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// A Service (`name` or `namespace/name`).
        #[arg(long)]
        service: Option<String>,
        /// A path prefix (requests only).
        #[arg(long)]
        path: Option<String>,
        /// A response code (requests only).
        #[arg(long)]
        status: Option<u16>,
        /// A SPIFFE ID: the source or the destination.
        #[arg(long)]
        identity: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        out: AgentOutput,
    },
    /// A live table of request rate, success rate and latency percentiles
    /// per route, Service or pod, refreshing in place in a terminal (plain
    /// text when piped), from the agent's tap stream.
    Top {
        /// What a row is.
        #[arg(long, value_enum, default_value_t = crate::top::By::Route)]
        by: crate::top::By,
        /// Count the requests this node's pods receive, not the ones they make.
        #[arg(long)]
        inbound: bool,
        /// A pod (`name` or `namespace/name`): the source or the destination.
        #[arg(long)]
        pod: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(long)]
        service: Option<String>,
        /// Refresh every this many milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stop after this many refreshes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Enroll a pod: its next connections go through the agent.
    Enroll {
        pod: String,
        #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        /// The pod's cgroup v2 directory.
        #[arg(long)]
        cgroup: PathBuf,
        /// The pod's network namespace file (`/run/netns/<name>`); default:
        /// that of a process in the cgroup.
        #[arg(long)]
        netns: Option<PathBuf>,
        #[command(flatten)]
        out: AgentOutput,
    },
    /// Stop redirecting a pod's connections.
    Unenroll {
        pod: String,
        #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        #[command(flatten)]
        out: AgentOutput,
    },
    /// Create or update resources from YAML; all documents are applied or none.
    Apply {
        /// A file, a directory (its *.yaml and *.yml, in name order) or `-`
        /// for stdin; repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Validate and say what would change, without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show resources, as a table or as documents.
    Get {
        /// workload (wl), service (svc), node (no), mtlspolicy, httproute,
        /// grpcroute, trafficpolicy (tp) or authorizationpolicy (ap).
        kind: String,
        /// One resource; all of the kind when omitted.
        name: Option<String>,
        #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Documents instead of a table.
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// Delete a resource.
    Delete {
        /// workload (wl), service (svc), node (no), mtlspolicy, httproute,
        /// grpcroute, trafficpolicy (tp) or authorizationpolicy (ap).
        kind: String,
        name: String,
        #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Configuration sync state of every node agent, with its last rejection.
    Agents,
    /// The mesh CA: rotation to a new root (phases, pause, rollback) and status.
    Ca {
        #[command(subcommand)]
        command: crate::ca::CaCommand,
    },
    /// Revoke an identity or a node: no certificates for it, and agents
    /// refuse and close its tunnel connections.
    Revoke {
        #[command(subcommand)]
        target: crate::ca::RevokeTarget,
    },
    /// Lift a revocation.
    Unrevoke {
        #[command(subcommand)]
        target: crate::ca::RevokeTarget,
    },
    /// Debugging: ask the control server for a certificate with a node's
    /// credentials (its bootstrap token, --token-file, or its node
    /// certificate, --cert/--key), as its agent would. Prints the identity
    /// and expiry; a refusal exits non-zero with the server's reason.
    Sign {
        /// A workload identity (spiffe://<td>/ns/<namespace>/sa/<account>).
        #[arg(long, required_unless_present = "node", conflicts_with = "node")]
        identity: Option<String>,
        /// Instead: the node certificate of this node (SignNode).
        #[arg(long)]
        node: Option<String>,
        /// A node certificate (PEM chain) to present, e.g. from the agent's
        /// cache: <cache>/identity/mesh-system.node-<node>.crt
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Its private key (PEM).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Command::Tap {
        pod,
        namespace,
        service,
        path,
        status,
        identity,
        count,
        out,
    } = &args.command
    {
        let filter = mesh_api::tap::TapFilter {
            pod: pod.clone(),
            namespace: namespace.clone(),
            service: service.clone(),
            path: path.clone(),
            status: *status,
            identity: identity.clone(),
        };
        let json = args.json || out.output == Format::Json;
        // Buffered (stdout alone writes at each newline): the tap flushes
        // when it has read what the agent sent.
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        return crate::tap::run(&args.admin, &filter, json, *count, &mut out);
    }
    if let Command::Top {
        by,
        inbound,
        pod,
        namespace,
        service,
        interval_ms,
        count,
    } = &args.command
    {
        let filter = mesh_api::tap::TapFilter {
            pod: pod.clone(),
            namespace: namespace.clone(),
            service: service.clone(),
            ..Default::default()
        };
        return crate::top::run(
            &args.admin,
            &filter,
            *by,
            *inbound,
            std::time::Duration::from_millis((*interval_ms).max(100)),
            *count,
        );
    }
    let out = match &args.command {
        Command::Apply { .. }
        | Command::Get { .. }
        | Command::Delete { .. }
        | Command::Agents
        | Command::Ca { .. }
        | Command::Revoke { .. }
        | Command::Unrevoke { .. }
        | Command::Sign { .. } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(control(&args))?,
        _ => agent(&args)?,
    };
    if !out.is_empty() {
        println!("{out}");
    }
    Ok(())
}

/// The answer as JSON, or as `render` puts it.
fn print<T: serde::Serialize>(
    args: &Args,
    out: &AgentOutput,
    answer: &T,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<String> {
    if args.json || out.output == Format::Json {
        Ok(serde_json::to_string_pretty(answer)?)
    } else {
        Ok(render(answer))
    }
}

/// Runs a node-agent command; the result is what to print.
fn agent(args: &Args) -> anyhow::Result<String> {
    let client = AdminClient::new(&args.admin);
    let now = now_unix_ms();
    match &args.command {
        Command::Status { out } => {
            let status = client.status().map_err(node::explain)?;
            print(args, out, &status, |s| node::status(s, now))
        }
        Command::Connections { limit, out } => {
            let mut rows = client.connections().map_err(node::explain)?;
            rows.truncate(*limit);
            print(args, out, &rows, |r| node::connections(r))
        }
        Command::Config { out } => {
            let config = client.config().map_err(node::explain)?;
            print(args, out, &config, |c| node::config(c, now))
        }
        Command::Bpf { out } => {
            let bpf = client.bpf().map_err(node::explain)?;
            print(args, out, &bpf, node::bpf)
        }
        Command::Certs { out } => {
            let identity = client.status().map_err(node::explain)?.identity;
            print(args, out, &identity, |i| {
                node::certs(i.as_ref(), now / 1000)
            })
        }
        Command::Enroll {
            pod,
            namespace,
            cgroup,
            netns,
            out,
        } => {
            let pod = client
                .enroll(namespace, pod, cgroup, netns.as_deref())
                .map_err(node::explain)?;
            print(args, out, &pod, |p| node::pod(p, "enrolled"))
        }
        Command::Unenroll {
            pod,
            namespace,
            out,
        } => {
            let pod = client.unenroll(namespace, pod).map_err(node::explain)?;
            print(args, out, &pod, |p| node::pod(p, "unenrolled"))
        }
        _ => unreachable!("control server commands don't use the agent"),
    }
}

/// `meshctl sign`: one signing request, with a fresh key that is thrown away.
async fn sign(
    target: &Target,
    tls: &client::Tls,
    token: Option<&str>,
    identity: Option<&str>,
    node: Option<&str>,
) -> anyhow::Result<String> {
    use mesh_api::pb::{SignNodeRequest, SignRequest, certificates_client::CertificatesClient};
    let channel = client::channel_with_tls(target, Some(tls)).await?;
    let mut certs = CertificatesClient::with_interceptor(channel, client::Bearer::new(token)?);
    let (id, response) = match (identity, node) {
        (Some(identity), _) => {
            let id: SpiffeId = identity.parse()?;
            let (_, csr_pem) = generate_key_and_csr(&id)?;
            let response = certs
                .sign(SignRequest {
                    csr_pem,
                    identity: identity.to_owned(),
                })
                .await;
            (id, response)
        }
        (None, Some(node)) => {
            let id = node_identity(tls.server.trust_domain(), node)?;
            let (_, csr_pem) = generate_key_and_csr(&id)?;
            let response = certs
                .sign_node(SignNodeRequest {
                    node: node.to_owned(),
                    csr_pem,
                })
                .await;
            (id, response)
        }
        (None, None) => bail!("sign needs --identity or --node"),
    };
    let response = response
        .map_err(|status| anyhow!("{:?}: {}", status.code(), status.message()))?
        .into_inner();
    let (_, not_after) = identity::validity(&response.cert_chain_pem)
        .map_err(|e| anyhow!("the control server sent an unreadable certificate: {e}"))?;
    Ok(json!({
        "identity": id.to_string(),
        "not_after_unix": response.not_after_unix,
        "chain_not_after_unix": not_after.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    })
    .to_string())
}

/// Runs an operator-API command; the result is what to print.
async fn control(args: &Args) -> anyhow::Result<String> {
    let target: Target = args.control.parse()?;
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    let tls = match &args.ca_bundle {
        Some(path) => Some(client::Tls::from_bundle_file(path, &args.trust_domain)?),
        None => None,
    };
    if let Command::Sign {
        identity,
        node,
        cert,
        key,
    } = &args.command
    {
        let mut tls =
            tls.context("sign talks to the control server over https: pass --ca-bundle")?;
        if let (Some(cert), Some(key)) = (cert, key) {
            let store = CertStore::new();
            let chain =
                fs::read_to_string(cert).with_context(|| format!("reading {}", cert.display()))?;
            use rustls::pki_types::pem::PemObject;
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading the key {}", key.display()))?;
            let id = store
                .insert(&chain, key)
                .context("the client certificate")?;
            tls.client = Some((store, id));
        }
        return sign(
            &target,
            &tls,
            token.as_deref(),
            identity.as_deref(),
            node.as_deref(),
        )
        .await;
    }
    let mut client = client::operator_with_tls(&target, token.as_deref(), tls.as_ref()).await?;
    match &args.command {
        Command::Ca { command } => return crate::ca::ca(&mut client, command, args.json).await,
        Command::Revoke { target } => {
            return crate::ca::revoke(&mut client, target, false, args.json).await;
        }
        Command::Unrevoke { target } => {
            return crate::ca::revoke(&mut client, target, true, args.json).await;
        }
        Command::Apply { files, dry_run } => {
            let input = Input::read(files)?;
            let response = client
                .apply(ApplyRequest {
                    yaml: input.yaml.clone(),
                    dry_run: *dry_run,
                })
                .await
                .map_err(|status| input.explain(&status))?
                .into_inner();
            let suffix = if *dry_run { " (dry run)" } else { "" };
            Ok(response
                .results
                .iter()
                .map(|r| format!("{r}{suffix}"))
                .collect::<Vec<_>>()
                .join("\n"))
        }
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
        } => {
            if *all_namespaces && name.is_some() {
                bail!("a resource can't be retrieved by name across all namespaces");
            }
            let kind = Kind::from_loose(kind).with_context(|| {
                format!(
                    "unknown kind {kind:?} (expected workload, wl, service, svc, node, no, mtlspolicy, httproute, grpcroute, trafficpolicy, tp, authorizationpolicy or ap)"
                )
            })?;
            let response = client
                .get(GetRequest {
                    kind: kind.as_str().to_owned(),
                    namespace: if *all_namespaces {
                        String::new()
                    } else {
                        namespace.clone()
                    },
                    name: name.clone().unwrap_or_default(),
                })
                .await
                .map_err(server_error)?
                .into_inner();
            let documents = response
                .documents_json
                .iter()
                .map(|d| serde_json::from_str(d))
                .collect::<Result<Vec<Value>, _>>()
                .context("the control server sent a document that is not JSON")?;
            if documents.is_empty() && output.is_none() {
                eprintln!(
                    "No resources found{}.",
                    if *all_namespaces || kind.is_cluster_scoped() {
                        String::new()
                    } else {
                        format!(" in {namespace} namespace")
                    }
                );
                return Ok(String::new());
            }
            render_documents(kind, documents, name.is_some(), *output, *all_namespaces)
        }
        Command::Delete {
            kind,
            name,
            namespace,
        } => {
            let kind = Kind::from_loose(kind).with_context(|| {
                format!(
                    "unknown kind {kind:?} (expected workload, wl, service, svc, node, no, mtlspolicy, httproute, grpcroute, trafficpolicy, tp, authorizationpolicy or ap)"
                )
            })?;
            client
                .delete(DeleteRequest {
                    kind: kind.as_str().to_owned(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                })
                .await
                .map_err(server_error)?;
            Ok(format!("{kind}/{namespace}/{name} deleted"))
        }
        Command::Agents => {
            let agents = client
                .agents(AgentsRequest {})
                .await
                .map_err(server_error)?
                .into_inner()
                .agents;
            if args.json {
                let rows: Vec<Value> = agents
                    .iter()
                    .map(|a| {
                        json!({
                            "node": a.node,
                            "connected": a.connected,
                            "acked_version": a.acked_version,
                            "last_ack_unix_ms": a.last_ack_unix_ms,
                            "last_error": a.last_error.as_ref().map(|e| json!({
                                "message": e.message,
                                "resources": e.resources,
                            })),
                        })
                    })
                    .collect();
                return Ok(Value::Array(rows).to_string());
            }
            let now = now_unix_ms();
            let rows = agents
                .iter()
                .map(|a| {
                    vec![
                        a.node.clone(),
                        if a.connected { "yes" } else { "no" }.to_owned(),
                        or_dash(&a.acked_version),
                        if a.last_ack_unix_ms == 0 {
                            "-".to_owned()
                        } else {
                            format!("{}s ago", now.saturating_sub(a.last_ack_unix_ms) / 1000)
                        },
                        a.last_error.as_ref().map_or_else(
                            || "-".to_owned(),
                            |e| {
                                if e.resources.is_empty() {
                                    e.message.clone()
                                } else {
                                    format!("{} [{}]", e.message, e.resources.join(", "))
                                }
                            },
                        ),
                    ]
                })
                .collect();
            Ok(table(
                &[
                    "NODE",
                    "CONNECTED",
                    "ACKED VERSION",
                    "LAST ACK",
                    "LAST REJECTION",
                ],
                rows,
            ))
        }
        Command::Sign { .. } => unreachable!("handled above"),
        _ => unreachable!("agent commands don't use the control server"),
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The server's own message: it names the document, field and value.
pub(crate) fn server_error(status: Status) -> anyhow::Error {
    match status.code() {
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition => {
            anyhow!("{}", status.message())
        }
        Code::Unauthenticated => anyhow!("not allowed: {}", status.message()),
        Code::Unavailable => anyhow!("control server unavailable: {}", status.message()),
        code => anyhow!("{} ({code:?})", status.message()),
    }
}

/// The YAML of an apply, and where each of its documents came from.
#[derive(Debug)]
struct Input {
    yaml: String,
    /// Per document sent: its file and its 1-based index there.
    origins: Vec<(String, usize)>,
    sources: usize,
}

impl Input {
    /// Reads files, directories and stdin. Each document is parsed here
    /// first, so malformed YAML is reported with its file, and re-encoded,
    /// so the server's document numbers map back to files exactly.
    fn read(paths: &[PathBuf]) -> anyhow::Result<Input> {
        let mut sources: Vec<(String, String)> = Vec::new();
        for path in paths {
            if path == Path::new("-") {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading stdin")?;
                sources.push(("<stdin>".to_owned(), text));
            } else if path.is_dir() {
                let mut files: Vec<PathBuf> = fs::read_dir(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml")
                    })
                    .collect();
                files.sort();
                if files.is_empty() {
                    bail!("{}: no *.yaml or *.yml files", path.display());
                }
                for file in files {
                    let text = fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    sources.push((file.display().to_string(), text));
                }
            } else {
                let text = fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                sources.push((path.display().to_string(), text));
            }
        }
        let mut documents = Vec::new();
        let mut origins = Vec::new();
        for (name, text) in &sources {
            for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
                let value = serde_yaml_ng::Value::deserialize(document)
                    .map_err(|e| anyhow!("{name}: document {}: malformed YAML: {e}", i + 1))?;
                if value.is_null() {
                    continue;
                }
                documents.push(serde_yaml_ng::to_string(&value)?);
                origins.push((name.clone(), i + 1));
            }
        }
        if documents.is_empty() {
            bail!("no documents to apply");
        }
        Ok(Input {
            yaml: documents.join("---\n"),
            origins,
            sources: sources.len(),
        })
    }

    /// The server's message, and which file the document at fault is in.
    fn explain(&self, status: &Status) -> anyhow::Error {
        let origin = status
            .metadata()
            .get(DOCUMENT_INDEX_METADATA)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .and_then(|i| Some((i, self.origins.get(i.checked_sub(1)?)?)));
        match origin {
            Some((index, (file, local))) if self.sources > 1 || index != *local => anyhow!(
                "{} (document {index} is {file}, document {local})",
                server_error(status.clone())
            ),
            _ => server_error(status.clone()),
        }
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn render_documents(
    kind: Kind,
    documents: Vec<Value>,
    named: bool,
    output: Option<Output>,
    all_namespaces: bool,
) -> anyhow::Result<String> {
    match output {
        Some(Output::Json) => {
            let value = if named && documents.len() == 1 {
                documents.into_iter().next().expect("one document")
            } else {
                json!({ "apiVersion": "v1", "kind": "List", "items": documents })
            };
            Ok(serde_json::to_string_pretty(&value)?)
        }
        Some(Output::Yaml) => Ok(documents
            .iter()
            .map(serde_yaml_ng::to_string)
            .collect::<Result<Vec<_>, _>>()?
            .join("---\n")
            .trim_end()
            .to_owned()),
        None => {
            let (headers, rows): (&[&str], Vec<Vec<String>>) = match kind {
                Kind::Workload => (
                    &["NAME", "NODE", "IP", "READY", "SERVICE ACCOUNT", "PORTS"],
                    documents.iter().map(workload_row).collect(),
                ),
                Kind::Service => (
                    &["NAME", "VIPS", "PORTS", "SELECTOR"],
                    documents.iter().map(service_row).collect(),
                ),
                Kind::Node => (
                    &["NAME", "ADDRESS", "TUNNEL PORT"],
                    documents
                        .iter()
                        .map(|d| {
                            vec![
                                text(&d["metadata"]["name"]),
                                text(&d["spec"]["address"]),
                                text(&d["spec"]["tunnelPort"]),
                            ]
                        })
                        .collect(),
                ),
                Kind::HttpRoute | Kind::GrpcRoute => (
                    &["NAME", "PARENTS", "RULES"],
                    documents
                        .iter()
                        .map(|d| {
                            vec![
                                text(&d["metadata"]["name"]),
                                route_parents(&d["spec"]),
                                d["spec"]["rules"]
                                    .as_array()
                                    .map_or(0, Vec::len)
                                    .to_string(),
                            ]
                        })
                        .collect(),
                ),
                Kind::TrafficPolicy => (
                    &["NAME", "TARGET", "SUMMARY"],
                    documents.iter().map(traffic_policy_row).collect(),
                ),
                Kind::AuthorizationPolicy => (
                    &["NAME", "ACTION", "SELECTOR", "RULES"],
                    documents.iter().map(authorization_policy_row).collect(),
                ),
                Kind::MtlsPolicy => (
                    &["NAME", "MODE"],
                    documents
                        .iter()
                        .map(|d| vec![text(&d["metadata"]["name"]), text(&d["spec"]["mode"])])
                        .collect(),
                ),
            };
            if !all_namespaces || kind.is_cluster_scoped() {
                return Ok(table(headers, rows));
            }
            let headers: Vec<&str> = std::iter::once("NAMESPACE")
                .chain(headers.iter().copied())
                .collect();
            let rows = documents
                .iter()
                .zip(rows)
                .map(|(d, row)| {
                    std::iter::once(text(&d["metadata"]["namespace"]))
                        .chain(row)
                        .collect()
                })
                .collect();
            Ok(table(&headers, rows))
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn joined(items: &Value, item: impl Fn(&Value) -> String) -> String {
    let parts: Vec<String> = items.as_array().into_iter().flatten().map(item).collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

/// A route's `parentRefs`: `echo`, `other/echo:80`.
pub(crate) fn route_parents(spec: &Value) -> String {
    joined(&spec["parentRefs"], |p| {
        let name = match &p["namespace"] {
            Value::Null => text(&p["name"]),
            ns => format!("{}/{}", text(ns), text(&p["name"])),
        };
        match &p["port"] {
            Value::Null => name,
            port => format!("{name}:{port}"),
        }
    })
}

fn workload_row(d: &Value) -> Vec<String> {
    let spec = &d["spec"];
    vec![
        text(&d["metadata"]["name"]),
        text(&spec["node"]),
        text(&spec["ip"]),
        text(&spec["ready"]),
        text(&spec["serviceAccount"]),
        joined(&spec["ports"], |p| {
            format!("{}/{}", p["port"], text(&p["protocol"]))
        }),
    ]
}

fn service_row(d: &Value) -> Vec<String> {
    let spec = &d["spec"];
    let selector: Vec<String> = spec["selector"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", text(v)))
        .collect();
    vec![
        text(&d["metadata"]["name"]),
        joined(&spec["vips"], text),
        joined(&spec["ports"], |p| {
            let target = if p["targetPort"] == p["port"] {
                String::new()
            } else {
                format!(":{}", p["targetPort"])
            };
            // Undeclared: agents detect the protocol.
            let proto = p["appProtocol"].as_str().unwrap_or("auto");
            format!("{}{target}/{proto}", p["port"])
        }),
        if selector.is_empty() {
            "-".into()
        } else {
            selector.join(",")
        },
    ]
}

pub(crate) fn traffic_policy_row(d: &Value) -> Vec<String> {
    let spec = &d["spec"];
    let target = &spec["targetRef"];
    let target = match &target["port"] {
        Value::Null => text(&target["name"]),
        port => format!("{}:{port}", text(&target["name"])),
    };
    vec![
        text(&d["metadata"]["name"]),
        target,
        traffic_policy_summary(spec),
    ]
}

/// What a TrafficPolicy sets, in a few words: `lb=ROUND_ROBIN retries=3
/// breaker outlier fault ratelimit`.
fn traffic_policy_summary(spec: &Value) -> String {
    let mut parts = Vec::new();
    let lb = &spec["loadBalancer"];
    if lb.is_object() {
        parts.push(match (&lb["simple"], &lb["consistentHash"]) {
            (_, Value::Object(_)) => "lb=CONSISTENT_HASH".to_owned(),
            (Value::String(simple), _) => format!("lb={simple}"),
            // The mesh's default.
            _ => "lb=LEAST_LATENCY".to_owned(),
        });
        if lb["preferSameNode"] == Value::Bool(true) {
            parts.push("same-node".to_owned());
        }
    }
    if spec["retries"].is_object() {
        parts.push(format!("retries={}", text(&spec["retries"]["attempts"])));
    }
    for (field, word) in [
        ("circuitBreaker", "breaker"),
        ("outlierDetection", "outlier"),
        ("fault", "fault"),
        ("rateLimit", "ratelimit"),
    ] {
        if spec[field].is_object() {
            parts.push(word.to_owned());
        }
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(" ")
    }
}

/// SELECTOR is `app=web,tier=x`; without one, `*` (every workload of the
/// namespace), or `(mesh)` in the root namespace (every workload of the
/// mesh).
pub(crate) fn authorization_policy_row(d: &Value) -> Vec<String> {
    let spec = &d["spec"];
    let labels: Vec<String> = spec["selector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", text(v)))
        .collect();
    let selector = if !labels.is_empty() {
        labels.join(",")
    } else if d["metadata"]["namespace"] == ROOT_NAMESPACE {
        "(mesh)".to_owned()
    } else {
        "*".to_owned()
    };
    vec![
        text(&d["metadata"]["name"]),
        text(&spec["action"]),
        selector,
        spec["rules"].as_array().map_or(0, Vec::len).to_string(),
    ]
}

/// Left-aligned columns, as wide as their widest cell.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_owned()
    };
    std::iter::once(line(headers.iter().map(|h| (*h).to_owned()).collect()))
        .chain(rows.into_iter().map(line))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_agent_command_takes_dash_o_json_and_json_stays_an_alias() {
        Args::command().debug_assert();
        for cmd in ["status", "connections", "config", "bpf", "certs"] {
            let args = Args::try_parse_from(["meshctl", cmd, "-o", "json"]).unwrap();
            let out = match args.command {
                Command::Status { out }
                | Command::Connections { out, .. }
                | Command::Config { out }
                | Command::Bpf { out }
                | Command::Certs { out } => out,
                other => panic!("{cmd}: {other:?}"),
            };
            assert_eq!(out.output, Format::Json, "{cmd}");
            let args = Args::try_parse_from(["meshctl", "--json", cmd]).unwrap();
            assert!(args.json, "{cmd}");
            let args = Args::try_parse_from(["meshctl", cmd, "--output", "table"]).unwrap();
            assert!(!args.json, "{cmd}");
        }
        // `get` keeps its own -o (yaml or json).
        let args = Args::try_parse_from(["meshctl", "get", "wl", "-o", "yaml"]).unwrap();
        assert!(matches!(
            args.command,
            Command::Get {
                output: Some(Output::Yaml),
                ..
            }
        ));
        assert!(Args::try_parse_from(["meshctl", "bpf", "-o", "yaml"]).is_err());
    }

    #[test]
    fn a_traffic_policy_row_names_its_target_and_what_it_sets() {
        let doc = json!({
            "metadata": {"name": "p"},
            "spec": {
                "targetRef": {"name": "echo", "port": 80},
                "loadBalancer": {"consistentHash": {"useSourceIdentity": true}, "preferSameNode": true},
                "retries": {"attempts": 3},
                "circuitBreaker": {"maxRequests": 10},
                "outlierDetection": {},
                "fault": {"abort": {"httpStatus": 503, "percentage": 1.0}},
                "rateLimit": {"inbound": {"requests": 5}},
            },
        });
        assert_eq!(
            traffic_policy_row(&doc),
            [
                "p",
                "echo:80",
                "lb=CONSISTENT_HASH same-node retries=3 breaker outlier fault ratelimit"
            ]
        );
        let whole = json!({"metadata": {"name": "q"}, "spec": {"targetRef": {"name": "echo"}}});
        assert_eq!(traffic_policy_row(&whole), ["q", "echo", "-"]);
        let lb = json!({"targetRef": {"name": "a"}, "loadBalancer": {"preferSameNode": false}});
        assert_eq!(traffic_policy_summary(&lb), "lb=LEAST_LATENCY");
    }

    #[test]
    fn an_authorization_policy_row_names_its_action_selector_and_rule_count() {
        let doc = json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": {"app": "web", "tier": "x"}},
                "action": "DENY",
                "rules": [{"from": [{"source": {"namespaces": ["a"]}}]}, {}],
            },
        });
        assert_eq!(
            authorization_policy_row(&doc),
            ["web", "DENY", "app=web,tier=x", "2"]
        );
        // Without a selector: the whole namespace, or the whole mesh in the
        // root namespace; without rules, none.
        let namespace =
            json!({"metadata": {"name": "all", "namespace": "shop"}, "spec": {"action": "ALLOW"}});
        assert_eq!(
            authorization_policy_row(&namespace),
            ["all", "ALLOW", "*", "0"]
        );
        let mesh = json!({
            "metadata": {"name": "all", "namespace": "mesh-system"},
            "spec": {"selector": {"matchLabels": {}}, "action": "AUDIT", "rules": [{}]},
        });
        assert_eq!(
            authorization_policy_row(&mesh),
            ["all", "AUDIT", "(mesh)", "1"]
        );
        let selected = json!({
            "metadata": {"name": "web", "namespace": "mesh-system"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW"},
        });
        assert_eq!(authorization_policy_row(&selected)[2], "app=web");
    }
}
