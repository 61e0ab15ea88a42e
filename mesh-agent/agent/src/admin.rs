//! Admin API for `meshctl` and the local cluster: HTTP/1.1 + JSON on a unix
//! socket (never on a routable address), plus `/metrics` and `/healthz/ready`
//! on the telemetry port.
use std::{convert::Infallible, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use mesh_api::{
    admin::{
        self, ConfigView, ConnectionState, EnrollRequest, ErrorBody, ResourceVersion,
        UnenrollRequest, paths,
    },
    serve::{HANDSHAKE_TIMEOUT, accept_loop},
};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};
use tracing::debug;

use crate::{
    certs,
    redirect::{Redirect, enrolment::Workloads},
    state::{StateRx, discovery::SharedSync},
    telemetry::{ConnectionTable, Metrics},
};

pub struct State {
    pub node: String,
    pub started: Instant,
    pub redirect: Arc<Redirect>,
    pub workloads: Workloads,
    pub metrics: Arc<Metrics>,
    pub registry: Registry,
    pub connections: Arc<ConnectionTable>,
    /// Distribution state, when the agent has a control server.
    pub sync: Option<SharedSync>,
    /// The configuration the data path serves.
    pub config: StateRx,
    /// Certificates, when the agent has a control server with a CA.
    pub identity: Option<certs::SharedStatus>,
}

type Body = Full<Bytes>;

/// Connections served at once: the admin socket (meshctl, the cluster
/// tooling) and the telemetry port (scrapers, probes).
const MAX_ADMIN_CONNECTIONS: usize = 64;
const MAX_TELEMETRY_CONNECTIONS: usize = 256;

/// One HTTP/1.1 connection answered by `handle`.
async fn serve_http1<I, F, Fut>(io: I, handle: F)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
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
                async move { admin(req, &state).await }
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
        "/healthz/ready" => text(StatusCode::OK, "ready\n".into()),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

async fn admin(req: Request<Incoming>, state: &State) -> Response<Body> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    match (method, path.as_str()) {
        (Method::GET, paths::STATUS) => {
            let decisions = state
                .redirect
                .decisions()
                .into_iter()
                .map(|(d, n)| (d.name().to_owned(), n))
                .collect();
            let connections = state.connections.snapshot();
            let open_connections = connections
                .iter()
                .filter(|c| c.state == ConnectionState::Open)
                .count();
            json_response(
                StatusCode::OK,
                &admin::Status {
                    node: state.node.clone(),
                    uptime_secs: state.started.elapsed().as_secs(),
                    enrolled: state.workloads.list(),
                    decisions,
                    open_connections,
                    sync: state
                        .sync
                        .as_ref()
                        .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone()),
                    identity: state
                        .identity
                        .as_ref()
                        .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone()),
                },
            )
        }
        (Method::GET, paths::CONFIG) => {
            let config = state.config.borrow().clone();
            json_response(
                StatusCode::OK,
                &ConfigView {
                    version: config.version.clone(),
                    resources: config
                        .resources
                        .values()
                        .map(|r| ResourceVersion {
                            key: r.key.clone(),
                            version: r.version.clone(),
                        })
                        .collect(),
                },
            )
        }
        (Method::GET, paths::CONNECTIONS) => {
            json_response(StatusCode::OK, &state.connections.snapshot())
        }
        (Method::POST, paths::ENROLL) => match body::<EnrollRequest>(req).await {
            Ok(b) => match state.workloads.enroll(&b.pod, &b.cgroup) {
                Ok(pod) => json_response(StatusCode::OK, &pod),
                Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
            },
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        (Method::POST, paths::UNENROLL) => match body::<UnenrollRequest>(req).await {
            Ok(b) => match state.workloads.unenroll(&b.pod) {
                Ok(pod) => json_response(StatusCode::OK, &pod),
                Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
            },
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        (_, path) => error(StatusCode::NOT_FOUND, format!("no such endpoint {path}")),
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
