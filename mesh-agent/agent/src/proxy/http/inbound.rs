//! The destination side of a tunnelled HTTP request: a stream of a tunnel
//! connection that is not a CONNECT carries one request for a workload of
//! this node, named in [`TARGET_HEADER`]. The agent sends it on as the client
//! wrote it: HTTP/1 (its version, its request-target form, from
//! [`H1_HEADER`]) or HTTP/2.
use std::net::SocketAddrV4;

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
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let d = crate::authz::judge(
        state,
        metrics,
        target,
        Some(source),
        source_ip,
        Some(crate::authz::HttpAttributes {
            method: req.method().as_str(),
            path: req.uri().path(),
            host: &host,
            headers: req.headers(),
        }),
    );
    if !d.allowed {
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
