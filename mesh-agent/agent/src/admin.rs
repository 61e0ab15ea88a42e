//! Admin API for `meshctl` and the local cluster: HTTP/1.1 + JSON on a unix
//! socket (never on a routable address), plus `/metrics` and `/healthz/ready`
//! on the telemetry port.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Instant,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use mesh_api::{
    admin::{
        self, AttachTarget, BpfView, ConfigView, ConnectionState, EnrollRequest, EnrolledCgroup,
        ErrorBody, Holder, MapView, ProgramView, ResourceVersion, ServicePortView, ServiceView,
        Source, SpecView, SyncState, UnenrollRequest, WorkloadView, paths,
    },
    pb::resource,
    serve::{HANDSHAKE_TIMEOUT, accept_loop},
};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    task::AbortHandle,
};
use tracing::debug;

use crate::{
    certs, health,
    kernel_stats::{Destinations, KernelStats},
    redirect::{Redirect, Target, enrolment::Workloads},
    state::{StateRx, discovery::SharedSync},
    telemetry::{ConnectionTable, Metrics},
};

pub struct State {
    pub node: String,
    pub started: Instant,
    pub redirect: Arc<Redirect>,
    pub workloads: Workloads,
    pub metrics: Arc<Metrics>,
    /// Brought up to date at each scrape, as the kernel's counters are.
    pub kernel_stats: Arc<KernelStats>,
    pub health: Arc<health::Health>,
    pub registry: Registry,
    pub connections: Arc<ConnectionTable>,
    /// Distribution state, when the agent has a control server.
    pub sync: Option<SharedSync>,
    /// The configuration the data path serves.
    pub config: StateRx,
    /// Certificates, when the agent has a control server with a CA.
    pub identity: Option<certs::SharedStatus>,
    /// The agent's long-running tasks, by name: one that ended is reported.
    pub tasks: Mutex<Vec<(&'static str, AbortHandle)>>,
    /// Set when the agent stops: it reports not ready from then on.
    pub drain: crate::proxy::drain::Drain,
}

/// Ready means: the agent is not draining, the kernel programs are
/// attached, every task runs, a configuration is applied (with a control
/// server), and (with a CA) the trust bundle, the node certificate and an
/// unexpired certificate for each local workload identity are held.
/// Otherwise, the reasons.
pub fn readiness(state: &State) -> Result<(), Vec<String>> {
    let mut why = Vec::new();
    if state.drain.is_draining() {
        why.push("draining: the agent is stopping".to_owned());
    }
    if !state.redirect.attached() {
        why.push("kernel programs are not attached".to_owned());
    }
    for (name, task) in state.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        if task.is_finished() {
            why.push(format!("task {name} stopped"));
        }
    }
    if let Some(sync) = &state.sync
        && sync.lock().unwrap_or_else(|e| e.into_inner()).source == Source::None
    {
        why.push("no configuration applied yet".to_owned());
    }
    if let Some(identity) = &state.identity {
        let identity = identity.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if !identity.trust_bundle {
            why.push("no trust bundle".to_owned());
        }
        for cert in std::iter::once(&identity.node).chain(&identity.certificates) {
            if cert.not_after_unix.is_none_or(|t| t <= now) {
                why.push(format!("no valid certificate for {}", cert.identity));
            }
        }
    }
    if why.is_empty() { Ok(()) } else { Err(why) }
}

type Body = Full<Bytes>;

/// `GET /tap?<filter>`: the live stream of `meshctl tap`, one JSON
/// [`mesh_api::tap::TapEvent`] per line, until the client leaves.
pub const TAP_PATH: &str = "/tap";

fn tap(
    req: &Request<Incoming>,
    state: &State,
) -> Response<http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>> {
    match mesh_api::tap::TapFilter::from_query(req.uri().query().unwrap_or_default()) {
        Ok(filter) => Response::builder()
            .header("content-type", "application/x-ndjson")
            .body(
                state
                    .metrics
                    .tap
                    .subscribe(filter)
                    .into_body()
                    .boxed_unsync(),
            )
            .expect("static response"),
        Err(e) => Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .header("content-type", "application/json")
            .body(
                Full::new(Bytes::from(
                    serde_json::to_vec(&mesh_api::admin::ErrorBody { error: e })
                        .unwrap_or_default(),
                ))
                .boxed_unsync(),
            )
            .expect("static response"),
    }
}

/// Connections served at once: the admin socket (meshctl, the cluster
/// tooling) and the telemetry port (scrapers, probes).
const MAX_ADMIN_CONNECTIONS: usize = 64;
const MAX_TELEMETRY_CONNECTIONS: usize = 256;

/// One HTTP/1.1 connection answered by `handle`.
async fn serve_http1<I, F, Fut, B>(io: I, handle: F)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let svc = service_fn(move |req| {
        let answer = handle(req);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(io), svc)
        .await
    {
        debug!(error = %e, "admin/telemetry connection");
    }
}

pub async fn serve_admin(listener: UnixListener, state: Arc<State>) {
    accept_loop(
        "admin",
        listener,
        MAX_ADMIN_CONNECTIONS,
        move |stream, _| {
            let state = state.clone();
            serve_http1(stream, move |req| {
                let state = state.clone();
                async move {
                    // The live tap streams; every other answer is whole.
                    if req.method() == Method::GET && req.uri().path() == TAP_PATH {
                        return tap(&req, &state);
                    }
                    admin(req, &state).await.map(BodyExt::boxed_unsync)
                }
            })
        },
    )
    .await
}

pub async fn serve_telemetry(listener: TcpListener, state: Arc<State>) {
    accept_loop(
        "telemetry",
        listener,
        MAX_TELEMETRY_CONNECTIONS,
        move |stream, _| {
            let state = state.clone();
            serve_http1(stream, move |req| {
                let state = state.clone();
                async move { telemetry(req, &state) }
            })
        },
    )
    .await
}

fn telemetry(req: Request<Incoming>, state: &State) -> Response<Body> {
    match req.uri().path() {
        "/metrics" => {
            state.metrics.sync_decisions(&state.redirect.decisions());
            sync_kernel_stats_and_health(state);
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &state.registry) {
                Ok(()) => Response::builder()
                    .header(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(Full::from(out))
                    .expect("static response"),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        "/healthz/ready" => match readiness(state) {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", why.join("; ")),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// The kernel's TCP statistics and the health gauges, from the same views
/// `/status` and `/bpf` answer with.
fn sync_kernel_stats_and_health(state: &State) {
    let destinations = Destinations::of(&state.config.borrow());
    state
        .kernel_stats
        .sync(&state.redirect.tcp_stats(), &destinations);
    let identity = state
        .identity
        .as_ref()
        .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone());
    state.health.set(&health::Snapshot::of(
        sync_state(state).as_ref(),
        identity.as_ref(),
        &state.redirect.attachments(),
    ));
}

async fn admin(req: Request<Incoming>, state: &State) -> Response<Body> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    match (method, path.as_str()) {
        (Method::GET, paths::STATUS) => json_response(StatusCode::OK, &status(state)),
        (Method::GET, paths::CONFIG) => json_response(StatusCode::OK, &config(state)),
        (Method::GET, paths::BPF) => json_response(StatusCode::OK, &bpf(state)),
        (Method::GET, paths::CONNECTIONS) => {
            json_response(StatusCode::OK, &state.connections.snapshot())
        }
        (Method::POST, paths::ENROLL) => match body::<EnrollRequest>(req).await {
            Ok(b) => {
                match state
                    .workloads
                    .enroll(&b.namespace, &b.pod, &b.cgroup, b.netns.as_deref())
                {
                    Ok(pod) => json_response(StatusCode::OK, &pod),
                    Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
                }
            }
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        (Method::POST, paths::UNENROLL) => match body::<UnenrollRequest>(req).await {
            Ok(b) => match state.workloads.unenroll(&b.namespace, &b.pod) {
                Ok(pod) => json_response(StatusCode::OK, &pod),
                Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
            },
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        (_, path) => error(StatusCode::NOT_FOUND, format!("no such endpoint {path}")),
    }
}

fn decisions(state: &State) -> BTreeMap<String, u64> {
    state
        .redirect
        .decisions()
        .into_iter()
        .map(|(d, n)| (d.name().to_owned(), n))
        .collect()
}

fn sync_state(state: &State) -> Option<SyncState> {
    state
        .sync
        .as_ref()
        .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// `GET /status`.
fn status(state: &State) -> admin::Status {
    let open_connections = state
        .connections
        .snapshot()
        .iter()
        .filter(|c| c.state == ConnectionState::Open)
        .count();
    admin::Status {
        node: state.node.clone(),
        uptime_secs: state.started.elapsed().as_secs(),
        enrolled: state.workloads.list(),
        decisions: decisions(state),
        open_connections,
        sync: sync_state(state),
        identity: state
            .identity
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone()),
    }
}

/// `GET /config`: the snapshot the data path serves, by kind.
fn config(state: &State) -> ConfigView {
    let config = state.config.borrow().clone();
    let mut view = ConfigView {
        version: config.version.clone(),
        sync: sync_state(state),
        ..ConfigView::default()
    };
    let spec = |json: &str| {
        serde_json::from_str(json).unwrap_or_else(|_| serde_json::Value::String(json.to_owned()))
    };
    for r in config.resources.values() {
        view.resources.push(ResourceVersion {
            key: r.key.clone(),
            version: r.version.clone(),
        });
        let version = r.version.clone();
        match &r.body {
            Some(resource::Body::Workload(w)) => view.workloads.push(WorkloadView {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                version,
                node: w.node.clone(),
                ip: w.ip.clone(),
                service_account: w.service_account.clone(),
                mtls_mode: w.mtls_mode.clone(),
                ready: w.ready,
                labels: w.labels.clone().into_iter().collect(),
            }),
            Some(resource::Body::Service(s)) => view.services.push(ServiceView {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                version,
                vips: s.vips.clone(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| ServicePortView {
                        port: u16::try_from(p.port).unwrap_or(0),
                        target_port: u16::try_from(p.target_port).unwrap_or(0),
                        app_protocol: p.app_protocol.clone(),
                    })
                    .collect(),
                endpoints: s.endpoints.iter().map(|e| e.workload.clone()).collect(),
                ready_endpoints: s.endpoints.iter().filter(|e| e.ready).count(),
            }),
            Some(resource::Body::Route(route)) => view.routes.push(SpecView {
                kind: route.kind.clone(),
                namespace: route.namespace.clone(),
                name: route.name.clone(),
                version,
                spec: spec(&route.spec_json),
            }),
            Some(resource::Body::Policy(policy)) => view.policies.push(SpecView {
                kind: policy.kind.clone(),
                namespace: policy.namespace.clone(),
                name: policy.name.clone(),
                version,
                spec: spec(&policy.spec_json),
            }),
            Some(resource::Body::Node(_) | resource::Body::TrustBundle(_)) | None => {}
        }
    }
    view
}

/// `GET /bpf`: programs and where they are attached, enrolment in the agent
/// and in the kernel, map occupancy and the kernel's counters.
fn bpf(state: &State) -> BpfView {
    let pods = state.workloads.list();
    let pod_of = |id: u64| pods.iter().find(|p| p.cgroup_id == id);
    let programs = state
        .redirect
        .attachments()
        .into_iter()
        .map(|a| ProgramView {
            program: a.program.to_owned(),
            attach_type: a.attach_type.to_owned(),
            target: match a.target {
                Target::PodCgroupRoot(path) => AttachTarget::PodCgroupRoot { path },
                Target::AgentCgroup(path) => AttachTarget::AgentCgroup { path },
                Target::PodNetns(cgroup_id) => AttachTarget::PodNetns {
                    cgroup_id,
                    pod: pod_of(cgroup_id).map(|p| format!("{}/{}", p.namespace, p.name)),
                    netns: pod_of(cgroup_id).and_then(|p| p.netns.clone()),
                },
            },
            held: if a.pin.is_some() {
                Holder::Pinned
            } else {
                Holder::Agent
            },
            pin: a.pin,
            attached: a.attached,
            link_id: a.link_id,
            program_id: a.program_id,
        })
        .collect();
    let in_kernel = state.redirect.enrolled_cgroups().unwrap_or_default();
    let mut enrolled: Vec<EnrolledCgroup> = pods
        .iter()
        .map(|p| EnrolledCgroup {
            cgroup_id: p.cgroup_id,
            pod: Some(format!("{}/{}", p.namespace, p.name)),
            cgroup: Some(p.cgroup.clone()),
            in_kernel: in_kernel.contains(&p.cgroup_id),
        })
        .collect();
    enrolled.extend(
        in_kernel
            .iter()
            .filter(|id| pod_of(**id).is_none())
            .map(|&cgroup_id| EnrolledCgroup {
                cgroup_id,
                pod: None,
                cgroup: None,
                in_kernel: true,
            }),
    );
    let maps = state
        .redirect
        .occupancy()
        .into_iter()
        .map(|(name, usage)| match usage {
            Ok(u) => MapView {
                name: name.to_owned(),
                map_type: u.map_type.to_owned(),
                entries: u.entries,
                max_entries: u.max_entries,
                error: None,
            },
            Err(e) => MapView {
                name: name.to_owned(),
                map_type: String::new(),
                entries: 0,
                max_entries: 0,
                error: Some(e.to_string()),
            },
        })
        .collect();
    BpfView {
        pin_dir: state.redirect.pin_dir().to_owned(),
        programs,
        enrolled,
        maps,
        decisions: decisions(state),
    }
}

async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, String> {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading body: {e}"))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| format!("invalid request body: {e}"))
}

fn json_response(status: StatusCode, v: &impl Serialize) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::from(
            serde_json::to_vec(v).expect("admin answers serialize"),
        ))
        .expect("static response")
}

fn error(status: StatusCode, error: String) -> Response<Body> {
    json_response(status, &ErrorBody { error })
}

fn text(status: StatusCode, s: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Full::from(s))
        .expect("static response")
}
