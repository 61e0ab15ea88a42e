//! The outbound L7 proxy: serves one client connection with hyper and routes
//! each request on its own. The decisions are the pure functions of
//! [`routes`] and [`respond`] over one state snapshot; this module does the
//! I/O around them.
use std::{
    convert::Infallible,
    net::SocketAddrV4,
    sync::Arc,
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response, Version, header, request::Parts};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    Body, FLAGS_HEADER, Flag, H1_HEADER, INTERNAL_HEADERS, TARGET_HEADER, boxed, mirror,
    respond::{self, H1Form, is_grpc, local_reply},
    routes::{Filters, Mirror, RequestView, Selection, ServicePort},
    upstream::{self, Upstreams, Wire},
};
use crate::{
    proxy::{
        Locked, copy_bidirectional,
        route::{self, Route, Via},
        tunnel::{self, TunnelClient},
    },
    state::{PodId, State, StateRx},
    telemetry::{LatencyLabels, Metrics, RequestLabels},
};
use mesh_api::kinds::AppProtocol;

pub struct HttpProxy {
    pub state: StateRx,
    pub forward: Forwarder,
    pub metrics: Arc<Metrics>,
}

/// Sends requests to endpoints: directly, or through the tunnel.
#[derive(Clone)]
pub struct Forwarder {
    pub tunnel: Option<Arc<TunnelClient>>,
    pub upstreams: Arc<Upstreams>,
}

/// What the agent knows of a client connection before its first request.
#[derive(Clone, Debug)]
pub struct Client {
    pub src_pod: Option<PodId>,
    /// `namespace/name` of the Service the client dialled.
    pub service: String,
    /// The Service port it dialled.
    pub port: u16,
    pub wire: Wire,
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    #[error(transparent)]
    Tunnel(#[from] tunnel::Error),
    #[error("{0}")]
    Refused(#[from] route::Refusal),
    #[error("the endpoint answered with an error: {0}")]
    Response(#[from] hyper::Error),
}

impl SendError {
    fn flag(&self) -> Flag {
        match self {
            SendError::Response(_) => Flag::UpstreamReset,
            SendError::Tunnel(e) if matches!(e.cause(), tunnel::Error::Http2 { .. }) => {
                Flag::UpstreamReset
            }
            _ => Flag::UpstreamConnectFailure,
        }
    }
}

/// What the request's handling decided, for its metrics.
struct Outcome {
    route: String,
    flag: Option<Flag>,
}

impl HttpProxy {
    /// Serves a client connection until it closes.
    pub async fn serve(self: Arc<Self>, socket: TcpStream, client: Client) {
        let client = Arc::new(client);
        let this = self.clone();
        let c = client.clone();
        let svc = service_fn(move |req| {
            let this = this.clone();
            let c = c.clone();
            async move { Ok::<_, Infallible>(this.handle(req, &c).await) }
        });
        let io = TokioIo::new(socket);
        let served = match client.wire {
            Wire::Http1 => {
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .preserve_header_case(true)
                    .title_case_headers(true)
                    .header_read_timeout(Duration::from_secs(60))
                    .serve_connection(io, svc)
                    .with_upgrades()
                    .await
            }
            Wire::Http2 => {
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(1 << 20)
                    .initial_connection_window_size(8 << 20)
                    .max_concurrent_streams(1024)
                    .max_pending_accept_reset_streams(256)
                    .keep_alive_interval(Duration::from_secs(20))
                    .serve_connection(io, svc)
                    .await
            }
        };
        if let Err(e) = served {
            debug!(error = %e, "HTTP client connection ended");
        }
    }

    async fn handle(&self, req: Request<Incoming>, c: &Client) -> Response<Body> {
        let start = Instant::now();
        let grpc = is_grpc(req.headers());
        let (mut resp, outcome) = self.route(req, c, grpc).await;
        if let Some(flag) = outcome.flag {
            resp.headers_mut()
                .insert(FLAGS_HEADER, HeaderValue::from_static(flag.as_str()));
        }
        let grpc_status = if grpc {
            resp.headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        } else {
            String::new()
        };
        let source_workload = c
            .src_pod
            .as_ref()
            .map_or_else(|| "unknown".to_owned(), ToString::to_string);
        self.metrics
            .http_requests
            .get_or_create(&RequestLabels {
                source_workload,
                destination_service: c.service.clone(),
                route: outcome.route.clone(),
                code: resp.status().as_u16(),
                grpc_status,
                flags: outcome.flag.map_or("-", Flag::as_str),
            })
            .inc();
        self.metrics
            .http_request_duration
            .0
            .get_or_create(&LatencyLabels {
                destination_service: c.service.clone(),
                route: outcome.route,
            })
            .observe(start.elapsed().as_secs_f64());
        resp
    }

    async fn route(
        &self,
        mut req: Request<Incoming>,
        c: &Client,
        grpc: bool,
    ) -> (Response<Body>, Outcome) {
        let state = self.state.borrow().clone();
        let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        for h in INTERNAL_HEADERS {
            parts.headers.remove(h);
        }
        let form = (c.wire == Wire::Http1).then(|| H1Form {
            version: parts.version,
            absolute: parts.uri.authority().is_some(),
        });
        let caller_ns = c.src_pod.as_ref().map(|p| p.namespace.as_str());
        let view = RequestView::new(&parts);
        let selection = state.routes.select(&c.service, c.port, caller_ns, &view);
        drop(view);
        let mut outcome = Outcome {
            route: String::new(),
            flag: None,
        };
        let reply = |flag: Flag, detail: String, mut outcome: Outcome| {
            outcome.flag = Some(flag);
            (local_reply(flag, grpc, &detail), outcome)
        };
        let mut response_filters: Vec<&Filters> = Vec::new();
        let mut mirrors: Vec<MirrorCopy> = Vec::new();
        let mut timeouts: (Option<Duration>, Option<Duration>) = (None, None);
        let backend = match selection {
            Selection::Unrouted => ServicePort {
                service: c.service.clone(),
                port: c.port,
            },
            Selection::NoMatch => {
                return reply(
                    Flag::NoRoute,
                    format!(
                        "no route rule of Service {} matches {} {}",
                        c.service,
                        parts.method,
                        parts.uri.path()
                    ),
                    outcome,
                );
            }
            Selection::Rule(s) => {
                outcome.route = s.route.id.clone();
                if let Some(r) = &s.rule.filters.redirect {
                    outcome.flag = Some(Flag::Redirect);
                    let mut resp = respond::redirect(r, &parts, s.prefix, c.port);
                    if let Some(edit) = &s.rule.filters.response_headers {
                        edit.apply(resp.headers_mut());
                    }
                    return (resp, outcome);
                }
                if let Some(edit) = &s.rule.filters.request_headers {
                    edit.apply(&mut parts.headers);
                }
                if let Some(rw) = &s.rule.filters.rewrite {
                    rewrite(&mut parts, rw, s.prefix);
                }
                let Some(chosen) = s.rule.pick_backend(rand::random()) else {
                    return reply(
                        Flag::NoBackend,
                        format!("route {} has no backend for this request", s.route.id),
                        outcome,
                    );
                };
                if let Some(edit) = &chosen.filters.request_headers {
                    edit.apply(&mut parts.headers);
                }
                response_filters.push(&s.rule.filters);
                response_filters.push(&chosen.filters);
                for m in s.rule.filters.mirrors.iter().chain(&chosen.filters.mirrors) {
                    if let Some(copy) = self.mirror_target(&state, c, m, &parts, form) {
                        mirrors.push(copy);
                    }
                }
                timeouts = (s.rule.request_timeout, s.rule.backend_timeout);
                chosen.backend.clone()
            }
        };
        let Some(be) = state.services.by_name(&backend.service, backend.port) else {
            return reply(
                Flag::NoBackend,
                format!(
                    "backend Service {} has no port {}",
                    backend.service, backend.port
                ),
                outcome,
            );
        };
        let Some(ep) = be.pick() else {
            return reply(
                Flag::NoHealthyUpstream,
                format!("Service {} has no ready endpoint", be.service),
                outcome,
            );
        };
        let wire = wire_to(be.app_protocol, c.wire);
        let planned = match route::to_endpoint(
            &state,
            c.src_pod.as_ref(),
            Some(be.service.clone()),
            ep.addr,
            self.forward.tunnel.is_some(),
        ) {
            Ok(r) => r,
            Err(e) => return reply(Flag::UpstreamConnectFailure, e.to_string(), outcome),
        };
        let deadline = [
            timeouts.0,
            timeouts.1,
            grpc.then(|| respond::grpc_timeout(&parts.headers))
                .flatten(),
        ]
        .into_iter()
        .flatten()
        .min();
        let mut body = boxed(body);
        for m in mirrors {
            let (primary, copy) = mirror::tee(body);
            body = primary;
            m.fire(self.forward.clone(), copy);
        }
        let req = Request::from_parts(parts, body);
        let sent = async {
            match upgrade {
                Some(on) => self.forward.send_upgrade(&planned, req, on).await,
                None => self.forward.send(&planned, wire, req, form).await,
            }
        };
        let answer = match deadline {
            Some(d) => match tokio::time::timeout(d, sent).await {
                Ok(r) => r,
                Err(_) => {
                    return reply(
                        Flag::UpstreamTimeout,
                        format!("no answer from {} within {d:?}", be.service),
                        outcome,
                    );
                }
            },
            None => sent.await,
        };
        match answer {
            Ok(mut resp) => {
                for f in response_filters {
                    if let Some(edit) = &f.response_headers {
                        edit.apply(resp.headers_mut());
                    }
                }
                (resp, outcome)
            }
            Err(e) => {
                debug!(error = %e, endpoint = %ep.addr, "request failed");
                let flag = e.flag();
                reply(flag, format!("{}: {e}", be.service), outcome)
            }
        }
    }

    /// Where a mirror's copy of the request goes, if it is mirrored this
    /// time (its share) and its backend can be reached.
    fn mirror_target(
        &self,
        state: &State,
        c: &Client,
        m: &Mirror,
        parts: &Parts,
        form: Option<H1Form>,
    ) -> Option<MirrorCopy> {
        if m.denominator == 0 || rand::random_range(0..m.denominator) >= m.numerator {
            return None;
        }
        let be = state.services.by_name(&m.backend.service, m.backend.port)?;
        let ep = be.pick()?;
        let planned = route::to_endpoint(
            state,
            c.src_pod.as_ref(),
            Some(be.service.clone()),
            ep.addr,
            self.forward.tunnel.is_some(),
        )
        .ok()?;
        let mut head = Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.clone())
            .version(parts.version)
            .body(())
            .ok()?;
        *head.headers_mut() = parts.headers.clone();
        Some(MirrorCopy {
            planned,
            wire: wire_to(be.app_protocol, c.wire),
            head,
            form,
        })
    }
}

/// A mirror's copy of a request, ready to go.
struct MirrorCopy {
    planned: Route,
    wire: Wire,
    head: Request<()>,
    form: Option<H1Form>,
}

impl MirrorCopy {
    /// Fire and forget: its answer is dropped, its failures only logged.
    fn fire(self, forward: Forwarder, body: Body) {
        let req = self.head.map(|()| body);
        tokio::spawn(async move {
            let sent = tokio::time::timeout(
                MIRROR_TIMEOUT,
                forward.send(&self.planned, self.wire, req, self.form),
            )
            .await;
            match sent {
                Ok(Ok(resp)) => {
                    // Read the body so the connection goes back to its pool.
                    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                }
                Ok(Err(e)) => debug!(error = %e, "mirrored request failed"),
                Err(_) => debug!("mirrored request timed out"),
            }
        });
    }
}

/// A mirrored request's answer is awaited at most this long.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

impl Forwarder {
    /// Sends a request to its endpoint: directly, or through the tunnel to
    /// the endpoint's node agent as an HTTP/2 stream.
    async fn send(
        &self,
        planned: &Route,
        wire: Wire,
        mut req: Request<Body>,
        form: Option<H1Form>,
    ) -> Result<Response<Body>, SendError> {
        respond::strip_hop_by_hop(req.headers_mut());
        let form = form.unwrap_or(H1Form {
            version: Version::HTTP_11,
            absolute: false,
        });
        let resp = match &planned.via {
            Via::Direct => {
                match wire {
                    Wire::Http1 => respond::to_h1(&mut req, form),
                    Wire::Http2 => respond::to_h2(&mut req),
                }
                self.upstreams.send(planned.dst, wire, req).await??
            }
            Via::Tunnel(key) => {
                let tunnel = self
                    .tunnel
                    .as_ref()
                    .ok_or(route::Refusal::NoTunnel { dst: planned.dst })?;
                respond::to_h2(&mut req);
                req.headers_mut()
                    .insert(TARGET_HEADER, target_value(planned.dst));
                if wire == Wire::Http1 {
                    req.headers_mut().insert(H1_HEADER, form.encode());
                }
                tunnel.send_http(key, req).await??
            }
        };
        Ok(resp.map(boxed))
    }

    /// An upgrade (WebSocket) or CONNECT: the request goes over a byte
    /// stream of its own (a connection to the endpoint, or a CONNECT stream
    /// of the tunnel), and once the endpoint agrees, both sides are joined.
    async fn send_upgrade(
        &self,
        planned: &Route,
        req: Request<Body>,
        client_side: hyper::upgrade::OnUpgrade,
    ) -> Result<Response<Body>, SendError> {
        let mut sender = match &planned.via {
            Via::Direct => {
                let s = TcpStream::connect(planned.dst).await.map_err(|source| {
                    upstream::Error::Connect {
                        addr: planned.dst,
                        source,
                    }
                })?;
                upstream::http1(s, planned.dst).await?
            }
            Via::Tunnel(key) => {
                let tunnel = self
                    .tunnel
                    .as_ref()
                    .ok_or(route::Refusal::NoTunnel { dst: planned.dst })?;
                let stream = tunnel.connect(key, planned.dst).await?;
                upstream::http1(stream, planned.dst).await?
            }
        };
        let mut resp = sender.send_request(req).await?;
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            let server_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (Ok(client), Ok(server)) = (client_side.await, server_side.await) else {
                    return;
                };
                let (a, b) = (Default::default(), Default::default());
                let mut client = Locked(TokioIo::new(client));
                let mut server = Locked(TokioIo::new(server));
                if let Err(e) = copy_bidirectional(&mut client, &mut server, &a, &b).await {
                    debug!(error = %e, "upgraded connection ended");
                }
            });
        }
        Ok(resp.map(boxed))
    }
}

/// The HTTP the agent speaks to a backend port: what it declares, else the
/// client's own.
fn wire_to(declared: Option<AppProtocol>, client: Wire) -> Wire {
    match declared {
        Some(AppProtocol::Http) => Wire::Http1,
        Some(AppProtocol::Http2 | AppProtocol::Grpc) => Wire::Http2,
        _ => client,
    }
}

fn target_value(dst: SocketAddrV4) -> HeaderValue {
    HeaderValue::from_str(&dst.to_string()).expect("an address is a valid header value")
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::CONNECT
        || (req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE))
}

/// URLRewrite: hostname (Host header and authority) and path.
fn rewrite(parts: &mut Parts, rw: &mesh_api::gateway::UrlRewrite, prefix: Option<&str>) {
    if let Some(host) = &rw.hostname
        && let Ok(v) = HeaderValue::from_str(host)
    {
        parts.headers.insert(header::HOST, v);
        if parts.uri.authority().is_some() {
            let mut u = parts.uri.clone().into_parts();
            u.authority = host.parse().ok();
            if let Ok(uri) = http::Uri::from_parts(u) {
                parts.uri = uri;
            }
        }
    }
    if let Some(m) = &rw.path {
        let path = super::routes::rewrite_path(m, parts.uri.path(), prefix);
        let pq = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut u = parts.uri.clone().into_parts();
        u.path_and_query = pq.parse().ok();
        if let Ok(uri) = http::Uri::from_parts(u) {
            parts.uri = uri;
        }
    }
}
