//! Outbound listener (:15001): accepts only connections the kernel
//! redirected, recovers their original destination and source pod from the
//! kernel's record, has [`route::plan`] decide over one state snapshot, and
//! carries them there. Only I/O lives here.
use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use mesh_api::serve::accept_loop;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info_span};

use mesh_api::kinds::AppProtocol;

use crate::{
    proxy::{
        Locked, copy_bidirectional,
        drain::Drain,
        http::{
            detect::{self, Protocol},
            proxy::{Client, HttpProxy},
            upstream::Wire,
        },
        route::{self, Route, Via},
        tunnel::{self, TunnelClient},
    },
    redirect::{Recorded, Redirect, enrolment::Workloads},
    state::{Lookup, PodId, StateRx},
    telemetry::{
        ConnectionResult, ConnectionTable, DetectLabels, Direction, DirectionLabels, Metrics,
        TcpLabels, TunnelSide,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection from {peer} to {local} was not redirected by the kernel")]
    NotRedirected { peer: SocketAddr, local: SocketAddr },
    #[error("connecting to {dst}: {source}")]
    Connect {
        dst: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddrV4),
    #[error("destination {0} needs mutual TLS, but this agent has no certificates")]
    NoTunnel(SocketAddrV4),
    #[error(transparent)]
    Tunnel(#[from] tunnel::Error),
}

pub struct Outbound {
    pub redirect: Arc<Redirect>,
    pub workloads: Workloads,
    pub metrics: Arc<Metrics>,
    pub connections: Arc<ConnectionTable>,
    pub connect_timeout: Duration,
    /// Distributed configuration; each connection reads the newest.
    pub state: StateRx,
    /// The tunnel to other nodes' agents; `None` without certificates.
    pub tunnel: Option<Arc<TunnelClient>>,
    /// Pods' connections carried at once; more are reset.
    pub max_connections: usize,
    /// Serves connections to Service ports that speak HTTP.
    pub http: Arc<HttpProxy>,
    /// Stops accepting when the agent stops.
    pub drain: Drain,
}

impl Outbound {
    /// Accepts until the agent drains; open connections are counted there.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let max = self.max_connections;
        let drain = self.drain.clone();
        let accept = accept_loop("outbound", listener, max, move |socket, peer| {
            let this = self.clone();
            let open = this.drain.open();
            async move {
                let _open = open;
                this.serve(socket, peer).await
            }
            .instrument(info_span!("outbound", %peer))
        });
        drain.until_draining(accept).await
    }

    async fn serve(&self, socket: TcpStream, peer: SocketAddr) {
        let _ = socket.set_nodelay(true);
        let recorded = match self.recorded(&socket, peer) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.connection(ConnectionResult::NotRedirected);
                debug!(error = %e, "refused");
                refuse(socket);
                return;
            }
        };
        let src_pod = self.workloads.by_cgroup(recorded.cgroup_id);
        let mut tracked = self.connections.open(
            src_pod.as_ref().map(|p| p.name.clone()),
            recorded.cgroup_id,
            peer,
            SocketAddr::V4(recorded.orig_dst),
        );
        debug!(src_pod = ?src_pod.as_ref().map(ToString::to_string), dst = %recorded.orig_dst, "accepted");
        // The Service's connection limit (circuit breaker), held for the
        // connection's life.
        let _held = {
            let state = self.state.borrow();
            match state.services.lookup(recorded.orig_dst) {
                Lookup::Service(b) => {
                    tracked.log = self.metrics.access_log.sample(b.policy.access_log);
                    let limit = b.policy.limits.max_connections;
                    match b.attached.runtime.connections.try_hold(limit) {
                        Some(h) => Some(h),
                        None => {
                            self.metrics.decision(&b.service, "overflow_connections");
                            debug!(service = %b.service, limit, "refused: the Service's connection limit");
                            tracked.error = Some(format!(
                                "Service {}: {limit} connections, the most allowed",
                                b.service
                            ));
                            drop(state);
                            refuse(socket);
                            return;
                        }
                    }
                }
                _ => None,
            }
        };
        if let Some(client) = self.http_client(&socket, recorded.orig_dst, &src_pod).await {
            tracked.set_upstream(
                Some(client.service.clone()),
                SocketAddr::V4(recorded.orig_dst),
            );
            self.metrics.outbound_active.inc();
            self.http.clone().serve(socket, client).await;
            self.metrics.outbound_active.dec();
            self.metrics.connection(ConnectionResult::Forwarded);
            return;
        }
        let planned = {
            let state = self.state.borrow().clone();
            route::plan(
                &state,
                src_pod.as_ref(),
                recorded.orig_dst,
                self.tunnel.is_some(),
            )
        };
        let route = match planned {
            Ok(r) => r,
            Err(refusal) => {
                self.metrics.connection(refusal.result());
                debug!(error = %refusal, "refused by the route plan");
                tracked.error = Some(refusal.to_string());
                refuse(socket);
                return;
            }
        };
        tracked.set_upstream(route.service.clone(), SocketAddr::V4(route.dst));
        let source_ip = match peer {
            SocketAddr::V4(p) => Some(*p.ip()),
            SocketAddr::V6(_) => None,
        };
        // Same node: this agent is the destination's too, and judges the
        // connection before any byte reaches the workload, and again when
        // the configuration changes.
        let mut revoked: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> =
            None;
        if matches!(route.via, Via::Direct) {
            let state = self.state.borrow().clone();
            if state.is_local(*route.dst.ip()) {
                let caller = src_pod
                    .as_ref()
                    .and_then(|p| state.local_workload(p))
                    .and_then(|w| w.identity.as_ref());
                let d = crate::authz::judge(
                    &state,
                    &self.metrics,
                    route.dst,
                    caller,
                    source_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
                    None,
                );
                if !d.allowed {
                    self.metrics.connection(ConnectionResult::Denied);
                    tracked.error = Some("denied by authorization policy".into());
                    refuse(socket);
                    return;
                }
                revoked = Some(Box::pin(crate::authz::revoked(
                    self.state.clone(),
                    self.metrics.clone(),
                    route.dst,
                    caller.cloned(),
                    source_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
                )));
            }
        }
        let tcp_labels = TcpLabels {
            side: TunnelSide::Outbound,
            source_workload: src_pod
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), ToString::to_string),
            destination_service: route.service.clone().unwrap_or_default(),
            destination_workload: self.state.borrow().workload_name(*route.dst.ip()),
            mtls: false,
        };
        let upstream = match self.open(route, source_ip).await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.connection(ConnectionResult::ConnectFailed);
                debug!(error = %e, "upstream connect failed");
                tracked.error = Some(e.to_string());
                refuse(socket);
                return;
            }
        };
        let tcp = self.metrics.tcp_opened(TcpLabels {
            mtls: matches!(upstream, Upstream::Tunnel(_)),
            ..tcp_labels
        });
        self.metrics.outbound_active.inc();
        let (sent, received) = (&tracked.live.sent, &tracked.live.received);
        let mut client = socket;
        let outcome = match upstream {
            Upstream::Direct(mut s) => match revoked {
                None => copy_bidirectional(&mut client, &mut s, sent, received).await,
                Some(revoked) => tokio::select! {
                    copied = copy_bidirectional(&mut client, &mut s, sent, received) => copied,
                    () = revoked => Ok(()),
                },
            },
            Upstream::Tunnel(s) => {
                let mut s = Locked(s);
                copy_bidirectional(&mut client, &mut s, sent, received).await
            }
        };
        self.metrics.outbound_active.dec();
        let (sent, received) = (
            tracked.live.sent.load(Ordering::Relaxed),
            tracked.live.received.load(Ordering::Relaxed),
        );
        tcp.closed(sent, received);
        for (direction, n) in [(Direction::Sent, sent), (Direction::Received, received)] {
            self.metrics
                .outbound_bytes
                .get_or_create(&DirectionLabels { direction })
                .inc_by(n);
        }
        match outcome {
            Ok(()) => self.metrics.connection(ConnectionResult::Forwarded),
            Err(e) => {
                self.metrics.connection(ConnectionResult::Error);
                debug!(error = %e, sent, received, "connection ended with error");
                tracked.error = Some(e.to_string());
            }
        }
    }

    /// Whether a connection to a Service port is served as HTTP: its
    /// declared `appProtocol`, else what the client's first bytes say.
    /// Connections to a pod's own address, or outside the mesh, stay L4:
    /// routes apply to a Service's traffic.
    async fn http_client(
        &self,
        socket: &TcpStream,
        orig_dst: SocketAddrV4,
        src_pod: &Option<PodId>,
    ) -> Option<Client> {
        let (service, port, declared, timeout) = {
            let state = self.state.borrow();
            let Lookup::Service(b) = state.services.lookup(orig_dst) else {
                return None;
            };
            (
                b.service.clone(),
                b.port,
                b.app_protocol,
                b.detect_timeout.unwrap_or(detect::DEFAULT_TIMEOUT),
            )
        };
        let (wire, label) = match declared {
            Some(AppProtocol::Tcp) => (None, "tcp"),
            // Declared HTTP: the version is still the client's (h2c prior
            // knowledge or HTTP/1), and anything else is served as HTTP/1
            // (which answers 400 to what is not HTTP).
            Some(AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc) => {
                match detect::detect(socket, timeout).await {
                    Protocol::Http2 => (Some(Wire::Http2), "declared"),
                    _ => (Some(Wire::Http1), "declared"),
                }
            }
            None => match detect::detect(socket, timeout).await {
                Protocol::Http1 => (Some(Wire::Http1), "http1"),
                Protocol::Http2 => (Some(Wire::Http2), "http2"),
                Protocol::Opaque(why) => (None, why.as_str()),
            },
        };
        self.metrics
            .protocol_detections
            .get_or_create(&DetectLabels { protocol: label })
            .inc();
        Some(Client {
            src_pod: src_pod.clone(),
            service,
            port,
            wire: wire?,
        })
    }

    async fn open(
        &self,
        route: Route,
        source: Option<std::net::Ipv4Addr>,
    ) -> Result<Upstream, Error> {
        match route.via {
            Via::Direct => self.connect(route.dst).await.map(Upstream::Direct),
            Via::Tunnel(key) => {
                let tunnel = self.tunnel.as_ref().ok_or(Error::NoTunnel(route.dst))?;
                Ok(Upstream::Tunnel(
                    tunnel.connect_from(&key, route.dst, source).await?,
                ))
            }
        }
    }

    fn recorded(&self, socket: &TcpStream, peer: SocketAddr) -> Result<Recorded, Error> {
        let local = socket.local_addr().ok();
        match (peer, local) {
            (SocketAddr::V4(p), Some(SocketAddr::V4(l))) => self
                .redirect
                .take_recorded(p, l)
                .ok_or(Error::NotRedirected {
                    peer,
                    local: SocketAddr::V4(l),
                }),
            (_, l) => Err(Error::NotRedirected {
                peer,
                local: l.unwrap_or(peer),
            }),
        }
    }

    async fn connect(&self, dst: SocketAddrV4) -> Result<TcpStream, Error> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(dst))
            .await
            .map_err(|_| Error::ConnectTimeout(dst))?
            .map_err(|source| Error::Connect { dst, source })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

enum Upstream {
    Direct(TcpStream),
    Tunnel(tunnel::Stream),
}

/// Closes with a reset, so the client sees a refusal rather than an empty reply.
pub(crate) fn refuse(socket: TcpStream) {
    let _ = socket.set_zero_linger();
    drop(socket);
}
