//! Admin API for `meshctl` and the local cluster: HTTP/1.1 + JSON on a unix
//! socket (never on a routable address), plus `/metrics` and `/healthz/ready`
//! on the telemetry port.
use std::{convert::Infallible, path::PathBuf, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::json;
use tokio::net::{TcpListener, UnixListener};
use tracing::warn;

use crate::{
    discovery::{ConfigRx, SyncState},
    redirect::Redirect,
    telemetry::ConnectionTable,
    telemetry::Metrics,
    workload::Workloads,
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
    pub sync: Option<Arc<std::sync::Mutex<SyncState>>>,
    /// The configuration the data path serves.
    pub config: ConfigRx,
    /// Certificates, when the agent has a control server with a CA.
    pub identity: Option<crate::identity::manager::SharedStatus>,
}

type Body = Full<Bytes>;

#[derive(Deserialize)]
struct EnrollBody {
    pod: String,
    cgroup: PathBuf,
}

#[derive(Deserialize)]
struct UnenrollBody {
    pod: String,
}

pub async fn serve_admin(listener: UnixListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(admin(req, &state).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                warn!(error = %e, "admin connection");
            }
        });
    }
}

pub async fn serve_telemetry(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(telemetry(req, &state)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
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
        (Method::GET, "/status") => {
            let decisions: serde_json::Map<String, serde_json::Value> = state
                .redirect
                .decisions()
                .into_iter()
                .map(|(d, n)| (d.name().to_owned(), json!(n)))
                .collect();
            let connections = state.connections.snapshot();
            let open = connections.iter().filter(|c| c.state == "open").count();
            json_response(
                StatusCode::OK,
                json!({
                    "node": state.node,
                    "uptime_secs": state.started.elapsed().as_secs(),
                    "enrolled": state.workloads.list(),
                    "decisions": decisions,
                    "open_connections": open,
                    "sync": state.sync.as_ref().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone()),
                    "identity": state.identity.as_ref().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone()),
                }),
            )
        }
        (Method::GET, "/config") => {
            let config = state.config.borrow().clone();
            let resources: Vec<serde_json::Value> = config
                .resources
                .values()
                .map(|r| json!({ "key": r.key, "version": r.version }))
                .collect();
            json_response(
                StatusCode::OK,
                json!({ "version": config.version, "resources": resources }),
            )
        }
        (Method::GET, "/connections") => {
            json_response(StatusCode::OK, json!(state.connections.snapshot()))
        }
        (Method::POST, "/enroll") => match body::<EnrollBody>(req).await {
            Ok(b) => match state.workloads.enroll(&b.pod, &b.cgroup) {
                Ok(pod) => json_response(StatusCode::OK, json!(pod)),
                Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
            },
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        (Method::POST, "/unenroll") => match body::<UnenrollBody>(req).await {
            Ok(b) => match state.workloads.unenroll(&b.pod) {
                Ok(pod) => json_response(StatusCode::OK, json!(pod)),
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

fn json_response(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::from(v.to_string()))
        .expect("static response")
}

fn error(status: StatusCode, msg: String) -> Response<Body> {
    json_response(status, json!({ "error": msg }))
}

fn text(status: StatusCode, s: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Full::from(s))
        .expect("static response")
}
