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
use tracing::{debug, info};

use super::{
    Body, FLAGS_HEADER, Flag, Flags, H1_HEADER, INTERNAL_HEADERS, SERVICE_HEADER, SOURCE_HEADER,
    TARGET_HEADER, boxed, mirror,
    policy::{
        self, Abort, HashKey, Lb, RetryPolicy,
        budget::{self, Held},
        outlier, ratelimit,
        replay::Replay,
        retry::Try,
        ring, runtime,
    },
    respond::{self, H1Form, is_grpc, local_reply},
    routes::{Filters, Mirror, RequestView, Selection, ServicePort},
    upstream::{self, Upstreams, Wire},
};
use crate::{
    proxy::{
        Locked, copy_bidirectional,
        drain::Drain,
        route::{self, Route, Via},
        tunnel::{self, TunnelClient},
    },
    state::{Backend, PodId, State, StateRx},
    telemetry::{LatencyLabels, Metrics, RequestLabels},
};
use mesh_api::{gateway::HttpRouteRetry, kinds::AppProtocol};

pub struct HttpProxy {
    pub state: StateRx,
    pub forward: Forwarder,
    pub metrics: Arc<Metrics>,
    /// Client connections finish gracefully once the agent drains.
    pub drain: Drain,
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
    flags: Flags,
    /// The endpoint of the last try, if one was tried.
    upstream: Option<SocketAddrV4>,
    /// Whether the last try went through the mTLS tunnel.
    mtls: bool,
}

/// A routed request's destination and limits, for [`HttpProxy::dispatch`].
struct Plan<'a> {
    state: &'a State,
    client: &'a Client,
    backend: &'a Backend,
    grpc: bool,
    form: Option<H1Form>,
    request_timeout: Option<Duration>,
    backend_timeout: Option<Duration>,
    route_retry: Option<&'a HttpRouteRetry>,
}

/// How the tries ended.
enum Final {
    /// The last try: its result (`None`: its per-try timeout fired, which
    /// was this long), and its endpoint.
    Tried(
        Option<Result<Response<Body>, SendError>>,
        Option<Duration>,
        SocketAddrV4,
    ),
    /// The mesh answers for itself.
    Local(Flag, String),
    /// A finished answer, with its flags.
    Answer(Response<Body>, Flags),
}

/// What one try's result means for retries and outlier detection. Through
/// the tunnel, the peer agent's own failure answers (flagged) count as the
/// failure they stand for.
fn classify(result: &Option<Result<Response<Body>, SendError>>, tunnelled: bool) -> Try {
    match result {
        None => Try::Timeout,
        Some(Ok(resp)) => {
            if tunnelled && let Some(f) = resp.headers().get(FLAGS_HEADER) {
                match f.as_bytes() {
                    b"UF" | b"UH" => return Try::ConnectFailure,
                    b"UR" => return Try::Reset,
                    _ => {}
                }
            }
            Try::Answered {
                status: resp.status().as_u16(),
                grpc: resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok()?.parse().ok()),
            }
        }
        Some(Err(SendError::Response(e))) => {
            let refused = std::iter::successors(std::error::Error::source(e), |e| e.source())
                .filter_map(|e| e.downcast_ref::<h2::Error>())
                .any(|e| e.reason() == Some(h2::Reason::REFUSED_STREAM));
            if refused {
                Try::RefusedStream
            } else {
                Try::Reset
            }
        }
        Some(Err(SendError::Tunnel(e))) if matches!(e.cause(), tunnel::Error::Http2 { .. }) => {
            Try::Reset
        }
        Some(Err(_)) => Try::ConnectFailure,
    }
}

/// A copy of a request's head with `body`, for one try.
fn head_of(parts: &Parts, body: Body) -> Request<Body> {
    let mut r = Request::new(body);
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    *r.extensions_mut() = parts.extensions.clone();
    r
}

fn service_value(service: &str, port: u16) -> HeaderValue {
    HeaderValue::from_str(&format!("{service}:{port}"))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// The consistent-hash key of a request, hashed; `None` when the request
/// has none (it is then balanced as without hashing).
fn hash_key(
    key: &HashKey,
    headers: &http::HeaderMap,
    source: impl FnOnce() -> Option<String>,
) -> Option<u64> {
    match key {
        HashKey::Header(name) => headers.get(name).map(|v| ring::hash(v.as_bytes())),
        HashKey::Cookie { name, .. } => cookie(headers, name).map(|v| ring::hash(v.as_bytes())),
        HashKey::SourceIdentity => source().map(|s| ring::hash(s.as_bytes())),
    }
}

/// The value of cookie `name` in the request's `cookie` headers.
fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// 429 (gRPC RESOURCE_EXHAUSTED) with `retry-after`.
pub(super) fn rate_limited(grpc: bool, service: &str, wait: Duration) -> Response<Body> {
    let mut r = local_reply(
        Flag::RateLimited,
        grpc,
        &format!("Service {service}: local rate limit reached"),
    );
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(ratelimit::retry_after(wait)),
    );
    r
}

/// A fault-injection abort.
fn fault_reply(abort: Abort, grpc: bool) -> Response<Body> {
    let mut r = local_reply(Flag::FaultInjected, grpc, "fault injected");
    match abort {
        Abort::Http(status) => {
            if grpc {
                // An HTTP status for a gRPC call: the status as it is, and
                // gRPC's mapping of it for the client library.
                r.headers_mut().remove("grpc-status");
            }
            *r.status_mut() =
                http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
        }
        Abort::Grpc(code) => {
            if grpc {
                r.headers_mut()
                    .insert("grpc-status", HeaderValue::from(code));
            } else {
                *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
        }
    }
    r
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
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .preserve_header_case(true)
                    .title_case_headers(true)
                    .header_read_timeout(Duration::from_secs(60))
                    .serve_connection(io, svc)
                    .with_upgrades();
                crate::serve_draining!(self.drain, conn)
            }
            Wire::Http2 => {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(1 << 20)
                    .initial_connection_window_size(8 << 20)
                    .max_concurrent_streams(1024)
                    .max_pending_accept_reset_streams(256)
                    .keep_alive_interval(Duration::from_secs(20))
                    .serve_connection(io, svc);
                crate::serve_draining!(self.drain, conn)
            }
        };
        if let Err(e) = served {
            debug!(error = %e, "HTTP client connection ended");
        }
    }

    async fn handle(&self, mut req: Request<Incoming>, c: &Client) -> Response<Body> {
        let start = Instant::now();
        let grpc = is_grpc(req.headers());
        let log = self.metrics.access_log.enabled() && {
            let state = self.state.borrow();
            state
                .services
                .by_name(&c.service, c.port)
                .is_some_and(|b| self.metrics.access_log.sample(b.policy.access_log))
        };
        // The span's context goes on in the request's headers (and a new
        // trace's id into the tap event).
        let span =
            (self.metrics.trace).outbound(&mut req, &self.state, c.src_pod.as_ref(), &c.service);
        let mut tapped = (log || self.metrics.tap.active()).then(|| self.tap_request(&req, c));
        let (mut resp, outcome) = self.route(req, c, grpc).await;
        if let Some(span) = span {
            let flags = outcome.flags.label();
            span.end_outbound(&self.state, &outcome.route, outcome.upstream, &flags, &resp);
        }
        if let Some(ev) = tapped.as_mut()
            && !outcome.route.is_empty()
        {
            ev.route = Some(outcome.route.clone());
        }
        let flags = outcome.flags.label();
        if !outcome.flags.is_empty()
            && let Ok(v) = HeaderValue::from_str(&flags)
        {
            resp.headers_mut().insert(FLAGS_HEADER, v);
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
        let (source_workload, source_namespace, source_identity, destination_workload) = {
            let state = self.state.borrow();
            let source = c.src_pod.as_ref();
            let identity = source
                .and_then(|p| state.local_workload(p)?.identity.as_ref())
                .map(ToString::to_string);
            (
                source.map_or_else(|| "unknown".to_owned(), ToString::to_string),
                source.map_or_else(|| "unknown".to_owned(), |p| p.namespace.clone()),
                identity.unwrap_or_default(),
                outcome
                    .upstream
                    .map(|up| state.workload_name(*up.ip()))
                    .unwrap_or_default(),
            )
        };
        self.metrics
            .http_requests
            .get_or_create(&RequestLabels {
                source_workload,
                source_namespace,
                source_identity,
                destination_service: c.service.clone(),
                destination_workload,
                route: outcome.route.clone(),
                code: resp.status().as_u16(),
                grpc_status,
                mtls: outcome.mtls,
                flags,
            })
            .inc();
        let labels = LatencyLabels {
            destination_service: c.service.clone(),
            route: outcome.route,
        };
        self.metrics
            .http_request_duration
            .0
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        let response_sizes = self
            .metrics
            .http_response_size
            .0
            .get_or_create(&labels)
            .clone();
        let resp =
            resp.map(|body| super::boxed(super::counted::Counted::new(body, response_sizes)));
        if let Some(mut ev) = tapped {
            ev.duration_ms = start.elapsed().as_secs_f64() * 1000.0;
            ev.code = resp.status().as_u16();
            ev.grpc_status = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            ev.flags = outcome.flags.label();
            if outcome.flags.is_empty() {
                ev.flags.clear();
            }
            ev.response_bytes = crate::tap::content_length(resp.headers());
            ev.upstream = outcome.upstream.map(std::net::SocketAddr::V4);
            if let Some(up) = outcome.upstream {
                let state = self.state.borrow();
                if let Some(w) = state.workload_by_ip(*up.ip()) {
                    ev.destination_workload = Some(format!("{}/{}", w.namespace, w.name));
                    ev.destination_identity = w.identity.as_ref().map(ToString::to_string);
                }
            }
            let event = mesh_api::tap::TapEvent::Request(ev);
            if log {
                self.metrics.access_log.write(&event);
            }
            self.metrics.tap.publish(|| event);
        }
        resp
    }

    /// What a tapper sees of a request from a pod of this node, before its
    /// answer.
    fn tap_request(&self, req: &Request<Incoming>, c: &Client) -> mesh_api::tap::RequestEvent {
        let source_identity = c.src_pod.as_ref().and_then(|p| {
            let state = self.state.borrow();
            state
                .local_workload(p)
                .and_then(|w| w.identity.as_ref().map(ToString::to_string))
        });
        crate::tap::request_event(
            req,
            mesh_api::tap::Direction::Outbound,
            c.src_pod.as_ref().map(ToString::to_string),
            source_identity,
            Some(c.service.clone()),
        )
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
            flags: Flags::default(),
            upstream: None,
            mtls: false,
        };
        let reply = |flag: Flag, detail: String, mut outcome: Outcome| {
            outcome.flags.insert(flag);
            (local_reply(flag, grpc, &detail), outcome)
        };
        let mut response_filters: Vec<&Filters> = Vec::new();
        let mut mirrors: Vec<MirrorCopy> = Vec::new();
        let mut timeouts: (Option<Duration>, Option<Duration>) = (None, None);
        let mut route_retry = None;
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
                    outcome.flags.insert(Flag::Redirect);
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
                route_retry = s.rule.retry.as_ref();
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
        let request_sizes = self
            .metrics
            .http_request_size
            .0
            .get_or_create(&LatencyLabels {
                destination_service: c.service.clone(),
                route: outcome.route.clone(),
            })
            .clone();
        let mut body = boxed(super::counted::Counted::new(boxed(body), request_sizes));
        for m in mirrors {
            let (primary, copy) = mirror::tee(body);
            body = primary;
            m.fire(self.forward.clone(), copy);
        }
        let plan = Plan {
            state: &state,
            client: c,
            backend: be,
            grpc,
            form,
            request_timeout: timeouts.0,
            backend_timeout: timeouts.1,
            route_retry,
        };
        let (mut resp, flags, upstream, mtls) = self.dispatch(&plan, parts, body, upgrade).await;
        outcome.flags = flags;
        outcome.upstream = upstream;
        outcome.mtls = mtls;
        for f in response_filters {
            if let Some(edit) = &f.response_headers {
                edit.apply(resp.headers_mut());
            }
        }
        (resp, outcome)
    }

    /// Sends a routed request to its backend Service under the Service's
    /// policy: rate limit, fault injection, circuit breaker, then tries
    /// (endpoint pick, per-try timeout, retries within the budget), all
    /// within the request's deadline.
    async fn dispatch(
        &self,
        plan: &Plan<'_>,
        parts: Parts,
        body: Body,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> (Response<Body>, Flags, Option<SocketAddrV4>, bool) {
        let be = plan.backend;
        let policy = &*be.policy;
        let at = &be.attached;
        let mut flags = Flags::default();
        let count = |reason: &'static str| self.metrics.decision(&be.service, reason);
        // The caller's Workload (its pod, recorded by the kernel), and its
        // identity as text, made only when a limit or hash needs it.
        let source_workload = plan
            .client
            .src_pod
            .as_ref()
            .and_then(|p| plan.state.local_workload(p));
        let source = || {
            source_workload
                .and_then(|w| w.identity.as_ref())
                .map(ToString::to_string)
        };
        if let Some(limit) = &at.outbound_limit
            && let Err(wait) = limit.check(source().as_deref().unwrap_or_default())
        {
            count("rate_limited_outbound");
            return (
                rate_limited(plan.grpc, &be.service, wait),
                Flag::RateLimited.into(),
                None,
                false,
            );
        }
        if let Some(f) = &policy.fault
            && f.applies(&parts.headers)
        {
            if let Some((delay, share)) = f.delay
                && policy::in_share(share, rand::random_range(0..1_000_000))
            {
                count("fault_delay");
                flags.insert(Flag::DelayInjected);
                tokio::time::sleep(delay).await;
            }
            if let Some((abort, share)) = f.abort
                && policy::in_share(share, rand::random_range(0..1_000_000))
            {
                count("fault_abort");
                flags.insert(Flag::FaultInjected);
                return (fault_reply(abort, plan.grpc), flags, None, false);
            }
        }
        let Some(_active) = at
            .runtime
            .active_requests
            .try_hold(policy.limits.max_requests)
        else {
            count("overflow_requests");
            flags.insert(Flag::Overflow);
            let detail = format!(
                "Service {}: {} requests in flight, the most allowed",
                be.service, policy.limits.max_requests
            );
            return (
                local_reply(Flag::Overflow, plan.grpc, &detail),
                flags,
                None,
                false,
            );
        };
        let retry = match (plan.route_retry, &policy.retry) {
            (Some(r), base) => Some(RetryPolicy::with_route(base.as_ref(), r)),
            (None, Some(p)) => Some(p.clone()),
            (None, None) => None,
        }
        .filter(|r| r.attempts > 0 && upgrade.is_none());
        let mut hash = match &policy.lb {
            Lb::Hash { key, .. } => hash_key(key, &parts.headers, source),
            _ => None,
        };
        // Istio's httpCookie with a ttl: a request without the cookie gets
        // one, so its next requests go to the same endpoint.
        let mut set_cookie = None;
        if hash.is_none()
            && let Lb::Hash {
                key:
                    HashKey::Cookie {
                        name,
                        path,
                        ttl: Some(ttl),
                    },
                ..
            } = &policy.lb
        {
            let value = format!("{:016x}", rand::random::<u64>());
            hash = Some(ring::hash(value.as_bytes()));
            set_cookie = HeaderValue::from_str(&format!(
                "{name}={value}; Path={}; Max-Age={}; HttpOnly",
                path.as_deref().unwrap_or("/"),
                ttl.as_secs().max(1)
            ))
            .ok();
        }
        let overall = [
            plan.request_timeout,
            plan.grpc
                .then(|| respond::grpc_timeout(&parts.headers))
                .flatten(),
        ]
        .into_iter()
        .flatten()
        .min();
        let per_try = [
            plan.backend_timeout,
            retry.as_ref().and_then(|r| r.per_try_timeout),
        ]
        .into_iter()
        .flatten()
        .min();
        // With retries, each try reads the body through the replay; without,
        // the one try takes it.
        let (replay, mut once) = match &retry {
            Some(r) => (Some(Replay::new(body, r.max_replay)), None),
            None => (None, Some(body)),
        };
        let has_tunnel = self.forward.tunnel.is_some();
        let mut tunnelled = false;
        let source_ip = source_workload.map(|w| w.ip);
        let wire = wire_to(be.app_protocol, plan.client.wire);
        let mut upgrade = upgrade;
        let mut parts = Some(parts);
        let tries = async {
            // Attempts are at most MAX_RETRY_ATTEMPTS + 1: no allocation.
            let mut tried = [usize::MAX; mesh_api::traffic::MAX_RETRY_ATTEMPTS as usize + 1];
            let mut n_tried = 0;
            let mut retries = 0u32;
            let mut _retry_held = None;
            loop {
                let Some(index) = be.pick_for_request(hash, &tried[..n_tried]) else {
                    let detail = format!("Service {} has no ready endpoint", be.service);
                    return Final::Local(Flag::NoHealthyUpstream, detail);
                };
                if let Some(slot) = tried.get_mut(n_tried) {
                    *slot = index;
                    n_tried += 1;
                }
                let ep = &be.endpoints[index];
                let planned = match route::to_endpoint(
                    plan.state,
                    plan.client.src_pod.as_ref(),
                    Some(be.service.clone()),
                    ep.addr,
                    has_tunnel,
                ) {
                    Ok(r) => r,
                    Err(e) => return Final::Local(Flag::UpstreamConnectFailure, e.to_string()),
                };
                // The destination's own limit, when the destination is here.
                if ep.local
                    && let Some(limit) = &at.inbound_limit
                    && let Err(wait) = limit.check(source().as_deref().unwrap_or_default())
                {
                    count("rate_limited_inbound");
                    return Final::Answer(
                        rate_limited(plan.grpc, &be.service, wait),
                        Flag::RateLimited.into(),
                    );
                }
                let Some(pending) = at
                    .runtime
                    .pending_requests
                    .try_hold(policy.limits.max_pending_requests)
                else {
                    count("overflow_pending");
                    let detail = format!(
                        "Service {}: {} requests waiting for a connection, the most allowed",
                        be.service, policy.limits.max_pending_requests
                    );
                    return Final::Local(Flag::Overflow, detail);
                };
                let req_body = match &replay {
                    Some(r) => boxed(r.body()),
                    None => once.take().unwrap_or_else(super::empty),
                };
                let mut req = match &replay {
                    // A retry may follow: keep the head for it.
                    Some(_) => head_of(parts.as_ref().expect("kept while retrying"), req_body),
                    None => Request::from_parts(parts.take().expect("one try"), req_body),
                };
                if matches!(planned.via, Via::Tunnel(_)) {
                    req.headers_mut()
                        .insert(SERVICE_HEADER, service_value(&be.service, be.port));
                    if let Some(ip) = source_ip
                        && let Ok(v) = HeaderValue::from_str(&ip.to_string())
                    {
                        req.headers_mut().insert(SOURCE_HEADER, v);
                    }
                } else if ep.local {
                    // Same node: this agent is the destination's, and judges
                    // the request with the caller's kernel-recorded identity.
                    let caller = source_workload.and_then(|w| w.identity.as_ref());
                    let host = req
                        .headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let d = crate::authz::judge(
                        plan.state,
                        &self.metrics,
                        ep.addr,
                        caller,
                        source_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
                        Some(crate::authz::HttpAttributes {
                            method: req.method().as_str(),
                            path: req.uri().path(),
                            host: &host,
                            headers: req.headers(),
                        }),
                    );
                    if !d.allowed {
                        return Final::Local(
                            Flag::Denied,
                            "denied by authorization policy".to_owned(),
                        );
                    }
                }
                let stats = &at.stats[index];
                let _outstanding = stats.outstanding.hold();
                let start = Instant::now();
                let sent = async {
                    match upgrade.take() {
                        Some(on) => self.forward.send_upgrade(&planned, req, on).await,
                        None => {
                            self.forward
                                .send(&planned, wire, req, plan.form, Some(pending))
                                .await
                        }
                    }
                };
                let result = match per_try {
                    Some(d) => tokio::time::timeout(d, sent).await.ok(),
                    None => Some(sent.await),
                };
                tunnelled = matches!(planned.via, Via::Tunnel(_));
                let t = classify(&result, tunnelled);
                if let Some(outlier::Event::Ejected(time)) =
                    runtime::record(policy, at, index, t, start.elapsed())
                {
                    count("ejected");
                    info!(service = %be.service, endpoint = %ep.addr, ?time, "endpoint ejected by outlier detection");
                }
                let Some(r) = retry.as_ref().filter(|r| r.on.retriable(t)) else {
                    return Final::Tried(result, per_try, ep.addr);
                };
                if retries >= r.attempts {
                    count("retry_limit_exceeded");
                    flags.insert(Flag::RetryLimitExceeded);
                    return Final::Tried(result, per_try, ep.addr);
                }
                if !replay.as_ref().is_some_and(Replay::replayable) {
                    count("retry_body_too_large");
                    return Final::Tried(result, per_try, ep.addr);
                }
                // This request's previous retry is over: the budget is
                // asked for one more.
                _retry_held = None;
                if !budget::retry_allowed(
                    &policy.budget,
                    at.runtime.active_requests.get(),
                    at.runtime.active_retries.get(),
                    policy.limits.max_retries,
                ) {
                    count("retry_budget_exhausted");
                    flags.insert(Flag::RetryBudgetExhausted);
                    return Final::Tried(result, per_try, ep.addr);
                }
                _retry_held = Some(at.runtime.active_retries.hold());
                retries += 1;
                count("retried");
                flags.insert(Flag::Retried);
                drop(result);
                tokio::time::sleep(r.backoff(retries, rand::random())).await;
            }
        };
        let done = match overall {
            Some(d) => match tokio::time::timeout(d, tries).await {
                Ok(f) => f,
                Err(_) => Final::Local(
                    Flag::UpstreamTimeout,
                    format!("no answer from {} within {d:?}", be.service),
                ),
            },
            None => tries.await,
        };
        let (upstream, mtls) = match &done {
            Final::Tried(_, _, addr) => (Some(*addr), tunnelled),
            _ => (None, false),
        };
        let mut resp = match done {
            Final::Answer(resp, more) => {
                flags = flags.union(more);
                resp
            }
            Final::Local(flag, detail) => {
                flags.insert(flag);
                local_reply(flag, plan.grpc, &detail)
            }
            Final::Tried(None, d, addr) => {
                flags.insert(Flag::UpstreamTimeout);
                let d = d.unwrap_or_default();
                local_reply(
                    Flag::UpstreamTimeout,
                    plan.grpc,
                    &format!("{}: no answer from {addr} within {d:?}", be.service),
                )
            }
            Final::Tried(Some(Ok(resp)), ..) => {
                // The destination agent's own answer (its inbound rate
                // limit, a failed connect): its flags count here too.
                if let Some(v) = resp.headers().get(FLAGS_HEADER) {
                    flags = flags.union(Flags::parse(v.as_bytes()));
                }
                resp
            }
            Final::Tried(Some(Err(e)), _, addr) => {
                debug!(error = %e, endpoint = %addr, "request failed");
                let flag = e.flag();
                flags.insert(flag);
                local_reply(flag, plan.grpc, &format!("{}: {e}", be.service))
            }
        };
        if let Some(c) = set_cookie {
            resp.headers_mut().append(header::SET_COOKIE, c);
        }
        (resp, flags, upstream, mtls)
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
        let ep = &be.endpoints[be.pick_for_request(None, &[])?];
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
                forward.send(&self.planned, self.wire, req, self.form, None),
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
        pending: Option<Held>,
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
                self.upstreams
                    .send(planned.dst, wire, req, pending)
                    .await??
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
                tunnel.send_http(key, req, pending).await??
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
