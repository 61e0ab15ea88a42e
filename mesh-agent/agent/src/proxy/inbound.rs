//! Inbound tunnel listener (:15008): mutual TLS from peer agents, HTTP/2
//! CONNECT streams to this node's workloads. The client certificate's
//! identity is the source of every stream on the connection.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use ::http::{Method, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_api::{
    identity::{self, SpiffeId},
    serve::{HANDSHAKE_TIMEOUT, accept_loop},
};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info_span, warn};

use crate::{
    proxy::{
        Locked,
        drain::Drain,
        http::{self, Body, upstream::Upstreams},
        tunnel::Credentials,
    },
    state::StateRx,
    telemetry::{InboundResult, Metrics, TcpLabels, TunnelSide},
};

/// Concurrent CONNECT streams one tunnel connection may carry.
pub const MAX_STREAMS: u32 = 16384;
/// Streams a peer may reset before we accept them (HTTP/2 rapid reset).
const MAX_PENDING_RESETS: usize = 256;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Inbound {
    pub creds: Credentials,
    pub metrics: Arc<Metrics>,
    /// CONNECT targets must be workloads of this node in the newest state.
    pub state: StateRx,
    pub connect_timeout: Duration,
    /// Tunnel connections served at once (each carries many streams).
    pub max_connections: usize,
    /// Connections to local workloads for tunnelled HTTP requests.
    pub upstreams: Arc<Upstreams>,
    /// Stops accepting when the agent stops; open tunnels get a GOAWAY.
    pub drain: Drain,
}

impl Inbound {
    /// Accepts until the agent drains; open connections are counted there.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let max = self.max_connections;
        let drain = self.drain.clone();
        let accept = accept_loop("inbound tunnel", listener, max, move |socket, peer| {
            let this = self.clone();
            let open = this.drain.open();
            async move {
                let _open = open;
                this.serve(socket).await
            }
            .instrument(info_span!("inbound", %peer))
        });
        drain.until_draining(accept).await
    }

    async fn serve(self: Arc<Self>, socket: TcpStream) {
        let _ = socket.set_nodelay(true);
        let peer_ip = match socket.peer_addr() {
            Ok(SocketAddr::V4(a)) => Some(*a.ip()),
            _ => None,
        };
        let Some(bundle) = self.creds.bundle.borrow().clone() else {
            self.metrics
                .tunnel_handshake(TunnelSide::Inbound, "no_trust_bundle");
            return;
        };
        let config = match identity::server_config_by_sni(
            &self.creds.store,
            &self.creds.trust_domain,
            &bundle,
        ) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "tunnel TLS configuration");
                return;
            }
        };
        let accepted = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsAcceptor::from(config).accept(socket),
        )
        .await;
        let tls = match accepted {
            Ok(Ok(tls)) => tls,
            Err(_) => {
                // A peer that connects and never finishes its handshake (or
                // a flood of them) holds a slot for this long at most.
                self.metrics
                    .tunnel_handshake(TunnelSide::Inbound, "timeout");
                debug!("tunnel handshake timed out");
                return;
            }
            Ok(Err(e)) => {
                let reason = identity::tls_error(&e).map_or("other", identity::refusal_reason);
                self.metrics.tunnel_handshake(TunnelSide::Inbound, reason);
                warn!(reason, error = %e, "tunnel handshake refused");
                return;
            }
        };
        let source = match identity::peer_identity(tls.get_ref().1) {
            Ok(id) => id,
            Err(refusal) => {
                self.metrics
                    .tunnel_handshake(TunnelSide::Inbound, refusal.reason());
                return;
            }
        };
        if source.trust_domain() != self.creds.trust_domain {
            // Signed by our CA but named in another trust domain: not a
            // peer of this mesh.
            self.metrics
                .tunnel_handshake(TunnelSide::Inbound, "foreign_trust_domain");
            warn!(%source, "tunnel client of a foreign trust domain refused");
            return;
        }
        let revoked = self.creds.revoked.clone();
        if let Some(why) = revoked.borrow().refuses([&source], peer_ip) {
            self.metrics
                .tunnel_handshake(TunnelSide::Inbound, "revoked");
            warn!(%source, reason = %why, "tunnel client refused: revoked");
            return;
        }
        self.metrics.tunnel_handshake(TunnelSide::Inbound, "ok");
        debug!(%source, "tunnel connection accepted");
        let closing = crate::revocation::until_revoked(revoked, {
            let source = source.clone();
            move |r| r.refuses([&source], peer_ip)
        });
        let this = self.clone();
        let svc = service_fn(move |req| {
            let this = this.clone();
            let source = source.clone();
            async move { Ok::<_, Infallible>(this.connect(req, source).await) }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // A peer agent that stops answering pings loses its streams.
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(8 << 20)
            // Every pooled connection carries all of its pair's connections;
            // a low limit would queue (or deadlock) idle-but-open ones.
            .max_concurrent_streams(MAX_STREAMS)
            .serve_connection(TokioIo::new(tls), svc);
        let mut conn = std::pin::pin!(conn);
        // Draining: a GOAWAY, so the peer opens no new stream here and the
        // connection ends when its open streams do. (serve_draining! spelled
        // out: a revocation is a third way out.)
        let served = tokio::select! {
            served = conn.as_mut() => served,
            () = self.drain.started() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            why = closing => {
                // Dropping the connection resets its streams at once.
                warn!(reason = %why, "closing a tunnel connection: revoked");
                return;
            }
        };
        if let Err(e) = served {
            debug!(error = %e, "tunnel connection ended");
        }
    }

    /// One stream: a CONNECT (dial the local workload, then pump bytes), or
    /// an HTTP request for a local workload.
    async fn connect(&self, req: Request<Incoming>, source: SpiffeId) -> Response<Body> {
        if req.method() != Method::CONNECT {
            let state = self.state.borrow().clone();
            return http::inbound::forward(req, &state, &self.upstreams, &self.metrics, &source)
                .await;
        }
        let Some(target) = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
            .and_then(|a| match a {
                SocketAddr::V4(v4) => Some(v4),
                SocketAddr::V6(_) => None,
            })
        else {
            return status(StatusCode::BAD_REQUEST);
        };
        if !self.state.borrow().is_local(*target.ip()) {
            self.metrics.inbound_stream(InboundResult::NotLocalWorkload);
            warn!(%source, %target, "CONNECT to an address that is not a workload of this node");
            return status(StatusCode::FORBIDDEN);
        }
        // Judged before any byte reaches the workload.
        let source_ip = {
            let state = self.state.borrow().clone();
            let source_ip = crate::authz::claimed_source(req.headers(), &state, &source);
            let d = crate::authz::judge(
                &state,
                &self.metrics,
                target,
                Some(&source),
                source_ip,
                None,
            );
            if !d.allowed {
                self.metrics.inbound_stream(InboundResult::Denied);
                return status(StatusCode::FORBIDDEN);
            }
            source_ip
        };
        let revoked = crate::authz::revoked(
            self.state.clone(),
            self.metrics.clone(),
            target,
            Some(source.clone()),
            source_ip,
        );
        let upstream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.metrics.inbound_stream(InboundResult::ConnectFailed);
                    debug!(%target, error = %e, "workload connect failed");
                    return status(StatusCode::BAD_GATEWAY);
                }
                Err(_) => {
                    self.metrics.inbound_stream(InboundResult::ConnectFailed);
                    return status(StatusCode::GATEWAY_TIMEOUT);
                }
            };
        let _ = upstream.set_nodelay(true);
        let metrics = self.metrics.clone();
        let tcp_labels = {
            let state = self.state.borrow();
            TcpLabels {
                side: TunnelSide::Inbound,
                source_workload: state
                    .workload_by_ip(source_ip)
                    .filter(|w| w.identity.as_ref() == Some(&source))
                    .map_or_else(
                        || "unknown".to_owned(),
                        |w| format!("{}/{}", w.namespace, w.name),
                    ),
                destination_service: String::new(),
                destination_workload: state.workload_name(*target.ip()),
                mtls: true,
            }
        };
        let tapped = self
            .metrics
            .tap
            .active()
            .then(|| crate::tap::InboundConnection {
                source_identity: Some(source.to_string()),
                source_workload: Some(tcp_labels.source_workload.clone())
                    .filter(|w| w != "unknown"),
                destination_workload: Some(tcp_labels.destination_workload.clone())
                    .filter(|w| !w.is_empty()),
                peer: SocketAddr::new(source_ip.into(), 0),
                target,
                started: std::time::SystemTime::now(),
                start: std::time::Instant::now(),
            });
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => {
                    debug!(error = %e, "CONNECT upgrade failed");
                    return;
                }
            };
            metrics.inbound_stream(InboundResult::Forwarded);
            let tcp = metrics.tcp_opened(tcp_labels);
            let (a, b) = (
                std::sync::atomic::AtomicU64::new(0),
                std::sync::atomic::AtomicU64::new(0),
            );
            let mut upstream = upstream;
            let mut tunnel = Locked(TokioIo::new(upgraded));
            let mut error = None;
            tokio::select! {
                copied = crate::proxy::copy_bidirectional(&mut tunnel, &mut upstream, &a, &b) => {
                    if let Err(e) = copied {
                        debug!(%source, %target, error = %e, "tunnel stream ended with error");
                        error = Some(e.to_string());
                    }
                }
                // A new policy denies it: both sides are closed (dropped).
                () = revoked => error = Some("closed: a new policy denies it".into()),
            }
            let (sent, received) = (
                a.load(std::sync::atomic::Ordering::Relaxed),
                b.load(std::sync::atomic::Ordering::Relaxed),
            );
            tcp.closed(sent, received);
            if let Some(t) = tapped {
                metrics.tap.publish(|| t.event(sent, received, error));
            }
        });
        status(StatusCode::OK)
    }
}

fn status(code: StatusCode) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(http::empty())
        .expect("static response")
}
