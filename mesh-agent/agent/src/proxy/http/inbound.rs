//! The destination side of a tunnelled HTTP request: a stream of a tunnel
//! connection that is not a CONNECT carries one request for a workload of
//! this node, named in [`TARGET_HEADER`]. The agent sends it on as the client
//! wrote it: HTTP/1 (its version, its request-target form, from
//! [`H1_HEADER`]) or HTTP/2.
//!
//! [`plaintext`] serves the requests of a connection the kernel handed to
//! the inbound plaintext listener: a caller without identity, judged the
//! same way.
use std::net::{Ipv4Addr, SocketAddrV4};

use http::{Request, Response};
use hyper::body::Incoming;
use mesh_api::identity::SpiffeId;
use tracing::{debug, warn};

use super::{
    Body, Flag, H1_HEADER, SERVICE_HEADER, SOURCE_HEADER, TARGET_HEADER, boxed,
    respond::{self, H1Form, is_grpc, local_reply},
    upstream::{Upstreams, Wire},
};
use crate::{
    state::State,
    telemetry::{InboundResult, Metrics},
};

pub async fn forward(
    mut req: Request<Incoming>,
    state: &State,
    upstreams: &Upstreams,
    metrics: &Metrics,
    source: &SpiffeId,
) -> Response<Body> {
    let tapped = metrics.tap.active().then(|| {
        let target = req
            .headers()
            .get(TARGET_HEADER)
            .and_then(|v| v.to_str().ok()?.parse::<SocketAddrV4>().ok());
        let source_ip = crate::authz::claimed_source(req.headers(), state, source);
        Tapped::start(&req, state, target, Some(source), source_ip)
    });
    let span = metrics.trace.tunnelled(&mut req, state, source);
    let mut verdict = None;
    let resp = forward_judged(req, state, upstreams, metrics, source, &mut verdict).await;
    if let Some(span) = span {
        span.end("", &resp);
    }
    Tapped::finish(tapped, metrics, resp, verdict)
}

async fn forward_judged(
    mut req: Request<Incoming>,
    state: &State,
    upstreams: &Upstreams,
    metrics: &Metrics,
    source: &SpiffeId,
    verdict: &mut Option<String>,
) -> Response<Body> {
    let grpc = is_grpc(req.headers());
    let target = req
        .headers_mut()
        .remove(TARGET_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<SocketAddrV4>().ok());
    let Some(target) = target else {
        return local_reply(
            Flag::NoRoute,
            grpc,
            &format!("a tunnelled request needs {TARGET_HEADER}: ip:port"),
        );
    };
    if !state.is_local(*target.ip()) {
        metrics.inbound_stream(InboundResult::NotLocalWorkload);
        warn!(%source, %target, "request for an address that is not a workload of this node");
        let mut r = local_reply(Flag::NoRoute, grpc, "not a workload of this node");
        *r.status_mut() = http::StatusCode::FORBIDDEN;
        return r;
    }
    let source_ip = crate::authz::claimed_source(req.headers(), state, source);
    req.headers_mut().remove(SOURCE_HEADER);
    if !authorized(
        &req,
        state,
        metrics,
        target,
        Some(source),
        source_ip,
        verdict,
    ) {
        metrics.inbound_stream(InboundResult::Denied);
        return local_reply(Flag::Denied, grpc, "denied by authorization policy");
    }
    // The destination's rate limit for the Service the caller's agent sent
    // this to.
    if let Some(service) = req.headers_mut().remove(SERVICE_HEADER)
        && let Some((name, port)) = service.to_str().ok().and_then(|s| s.rsplit_once(':'))
        && let Some(be) = port
            .parse()
            .ok()
            .and_then(|p| state.services.by_name(name, p))
        && let Some(limit) = &be.attached.inbound_limit
        && let Err(wait) = limit.check(&source.to_string())
    {
        metrics.decision(&be.service, "rate_limited_inbound");
        return super::proxy::rate_limited(grpc, &be.service, wait);
    }
    let h1 = req.headers_mut().remove(H1_HEADER);
    let wire = match h1.as_ref().and_then(H1Form::decode) {
        Some(form) => {
            respond::to_h1(&mut req, form);
            Wire::Http1
        }
        None => {
            respond::to_h2(&mut req);
            Wire::Http2
        }
    };
    send(upstreams, metrics, target, wire, req, grpc).await
}

/// One request of a plaintext connection into the workload at `target`
/// from `source_ip`, which the kernel handed to the agent: judged without
/// an identity, then sent on in the client's own HTTP version.
pub async fn plaintext(
    mut req: Request<Incoming>,
    state: &State,
    upstreams: &Upstreams,
    metrics: &Metrics,
    target: SocketAddrV4,
    source_ip: Ipv4Addr,
    wire: Wire,
) -> Response<Body> {
    // The mesh's own headers mean something only between agents.
    for name in [TARGET_HEADER, SOURCE_HEADER, SERVICE_HEADER, H1_HEADER] {
        req.headers_mut().remove(name);
    }
    let tapped = metrics
        .tap
        .active()
        .then(|| Tapped::start(&req, state, Some(target), None, source_ip));
    let grpc = is_grpc(req.headers());
    let mut verdict = None;
    let span = (metrics.trace).inbound(&mut req, state, None, Some(target), source_ip);
    if !authorized(&req, state, metrics, target, None, source_ip, &mut verdict) {
        let resp = local_reply(Flag::Denied, grpc, "denied by authorization policy");
        if let Some(span) = span {
            span.end("", &resp);
        }
        return Tapped::finish(tapped, metrics, resp, verdict);
    }
    match wire {
        Wire::Http1 => {
            let form = H1Form {
                version: req.version(),
                absolute: req.uri().authority().is_some(),
            };
            respond::to_h1(&mut req, form);
        }
        Wire::Http2 => respond::to_h2(&mut req),
    }
    let resp = send(upstreams, metrics, target, wire, req, grpc).await;
    if let Some(span) = span {
        span.end("", &resp);
    }
    Tapped::finish(tapped, metrics, resp, verdict)
}

/// An inbound request as a tapper sees it, from its arrival.
struct Tapped {
    event: mesh_api::tap::RequestEvent,
    start: std::time::Instant,
}

impl Tapped {
    fn start(
        req: &Request<Incoming>,
        state: &State,
        target: Option<SocketAddrV4>,
        source: Option<&SpiffeId>,
        source_ip: Ipv4Addr,
    ) -> Tapped {
        let name = |w: &crate::state::Workload| format!("{}/{}", w.namespace, w.name);
        let mut event = crate::tap::request_event(
            req,
            mesh_api::tap::Direction::Inbound,
            state.workload_by_ip(source_ip).map(name),
            source.map(ToString::to_string),
            None,
        );
        event.source_ip = (!source_ip.is_unspecified()).then_some(source_ip);
        if let Some(t) = target {
            event.upstream = Some(std::net::SocketAddr::V4(t));
            if let Some(w) = state.workload_by_ip(*t.ip()) {
                event.destination_workload = Some(name(w));
                event.destination_identity = w.identity.as_ref().map(ToString::to_string);
            }
        }
        Tapped {
            event,
            start: std::time::Instant::now(),
        }
    }

    /// Publishes the event with the answer's fields; returns the answer.
    fn finish(
        tapped: Option<Tapped>,
        metrics: &Metrics,
        resp: Response<Body>,
        verdict: Option<String>,
    ) -> Response<Body> {
        if let Some(Tapped { mut event, start }) = tapped {
            event.duration_ms = start.elapsed().as_secs_f64() * 1000.0;
            event.code = resp.status().as_u16();
            event.grpc_status = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            event.flags = resp
                .headers()
                .get(super::FLAGS_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            event.response_bytes = crate::tap::content_length(resp.headers());
            event.verdict = verdict;
            metrics
                .tap
                .publish(|| mesh_api::tap::TapEvent::Request(event));
        }
        resp
    }
}

/// Judges one request by the policies of the workload at `target` (logged
/// and counted).
fn authorized(
    req: &Request<Incoming>,
    state: &State,
    metrics: &Metrics,
    target: SocketAddrV4,
    source: Option<&SpiffeId>,
    source_ip: Ipv4Addr,
    verdict: &mut Option<String>,
) -> bool {
    let host = respond::authority(req.uri(), req.headers()).unwrap_or_default();
    let d = crate::authz::judge(
        state,
        metrics,
        target,
        source,
        source_ip,
        Some(crate::authz::HttpAttributes {
            method: req.method().as_str(),
            path: req.uri().path(),
            host,
            headers: req.headers(),
        }),
    );
    if metrics.tap.active() {
        *verdict = Some(d.describe());
    }
    d.allowed
}

async fn send(
    upstreams: &Upstreams,
    metrics: &Metrics,
    target: SocketAddrV4,
    wire: Wire,
    req: Request<Incoming>,
    grpc: bool,
) -> Response<Body> {
    let req = req.map(boxed);
    match upstreams.send(target, wire, req, None).await {
        Ok(Ok(resp)) => {
            metrics.inbound_stream(InboundResult::Forwarded);
            resp.map(boxed)
        }
        Ok(Err(e)) => {
            debug!(%target, error = %e, "workload's answer failed");
            local_reply(Flag::UpstreamReset, grpc, &format!("{target}: {e}"))
        }
        Err(e) => {
            metrics.inbound_stream(InboundResult::ConnectFailed);
            debug!(%target, error = %e, "workload connect failed");
            local_reply(Flag::UpstreamConnectFailure, grpc, &e.to_string())
        }
    }
}
