//! Outbound listener (:15001): accepts only connections the kernel
//! redirected, recovers their original destination and source pod from the
//! kernel's record, and carries them there.
use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info_span, warn};

use crate::{
    discovery::{Config, MtlsMode},
    identity::SpiffeId,
    lb::Lookup,
    proxy::{
        Locked,
        tunnel::{self, PoolKey, TunnelClient},
    },
    redirect::{Recorded, Redirect},
    telemetry::{ConnectionTable, Metrics, result},
    workload::Workloads,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection from {peer} to {local} was not redirected by the kernel")]
    NotRedirected { peer: SocketAddr, local: SocketAddr },
    #[error("connecting to original destination {dst}: {source}")]
    Connect {
        dst: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("connecting to original destination {0}: timed out")]
    ConnectTimeout(SocketAddrV4),
    #[error("Service {service} has no ready endpoint")]
    NoReadyEndpoint { service: String },
    #[error("{0} is a Service VIP, but no Service owns that port")]
    UnknownServicePort(SocketAddrV4),
    #[error("source pod {0:?} has no Workload on this node, so no identity to tunnel with")]
    NoSourceIdentity(Option<String>),
    #[error("destination {dst} is on node {node}, whose tunnel address is unknown")]
    UnknownNode { dst: SocketAddrV4, node: String },
    #[error("destination {0} needs mutual TLS, but this agent has no certificates")]
    NoTunnel(SocketAddrV4),
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::SpiffeIdError),
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
    pub config: tokio::sync::watch::Receiver<Arc<Config>>,
    /// This node's name: destinations on other nodes go through the tunnel.
    pub node: String,
    /// The tunnel to other nodes' agents; `None` without certificates.
    pub tunnel: Option<Arc<TunnelClient>>,
}

impl Outbound {
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            let span = info_span!("outbound", %peer);
            tokio::spawn(async move { this.serve(socket, peer).await }.instrument(span));
        }
    }

    async fn serve(&self, socket: TcpStream, peer: SocketAddr) {
        let _ = socket.set_nodelay(true);
        let recorded = match self.recorded(&socket, peer) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.connection(result::NOT_REDIRECTED);
                debug!(error = %e, "refused");
                refuse(socket);
                return;
            }
        };
        let src_pod = self.workloads.by_cgroup(recorded.cgroup_id);
        let mut tracked = self.connections.open(
            src_pod.clone(),
            recorded.cgroup_id,
            peer,
            SocketAddr::V4(recorded.orig_dst),
        );
        debug!(src_pod = ?src_pod, dst = %recorded.orig_dst, "accepted");
        let target = match self.resolve(recorded.orig_dst) {
            Ok(t) => t,
            Err((e, result)) => {
                self.metrics.connection(result);
                debug!(error = %e, "no destination");
                tracked.error = Some(e.to_string());
                refuse(socket);
                return;
            }
        };
        tracked.set_upstream(target.service, SocketAddr::V4(target.addr));
        let route = match self.route(src_pod.as_deref(), target.addr) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.connection(result::NO_ROUTE);
                debug!(error = %e, "no route");
                tracked.error = Some(e.to_string());
                refuse(socket);
                return;
            }
        };
        let upstream = match self.open(route, target.addr).await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.connection(result::CONNECT_FAILED);
                debug!(error = %e, "upstream connect failed");
                tracked.error = Some(e.to_string());
                refuse(socket);
                return;
            }
        };
        self.metrics.outbound_active.inc();
        let (sent, received) = (&tracked.live.sent, &tracked.live.received);
        let mut client = socket;
        let outcome = match upstream {
            Upstream::Direct(mut s) => {
                crate::proxy::copy_bidirectional(&mut client, &mut s, sent, received).await
            }
            Upstream::Tunnel(s) => {
                let mut s = Locked(s);
                crate::proxy::copy_bidirectional(&mut client, &mut s, sent, received).await
            }
        };
        self.metrics.outbound_active.dec();
        let (sent, received) = (
            tracked.live.sent.load(std::sync::atomic::Ordering::Relaxed),
            tracked
                .live
                .received
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        self.metrics
            .outbound_bytes
            .get_or_create(&crate::telemetry::DirectionLabels { direction: "sent" })
            .inc_by(sent);
        self.metrics
            .outbound_bytes
            .get_or_create(&crate::telemetry::DirectionLabels {
                direction: "received",
            })
            .inc_by(received);
        match outcome {
            Ok(()) => self.metrics.connection(result::FORWARDED),
            Err(e) => {
                self.metrics.connection(result::ERROR);
                debug!(error = %e, sent, received, "connection ended with error");
                tracked.error = Some(e.to_string());
            }
        }
    }

    /// How to reach `dst`: straight, when it is on this node or outside the
    /// mesh; through the tunnel to its node's agent otherwise, as the source
    /// pod's identity and expecting the destination workload's.
    fn route(&self, src_pod: Option<&str>, dst: SocketAddrV4) -> Result<Route, Error> {
        let config = self.config.borrow().clone();
        let Some(dst_wl) = config.workload_by_ip(*dst.ip()) else {
            return Ok(Route::Direct);
        };
        let mode = MtlsMode::of(dst_wl);
        if dst_wl.node == self.node || mode == MtlsMode::Disable {
            return Ok(Route::Direct);
        }
        let src_wl =
            src_pod.and_then(|pod| config.workloads_on(&self.node).find(|w| w.name == pod));
        let (Some(tunnel), Some(src_wl)) = (self.tunnel.as_ref(), src_wl) else {
            // Without an identity to present, only a PERMISSIVE destination
            // may be reached, in plaintext.
            return match (mode, self.tunnel.is_some()) {
                (MtlsMode::Permissive, _) => Ok(Route::Direct),
                (_, false) => Err(Error::NoTunnel(dst)),
                _ => Err(Error::NoSourceIdentity(src_pod.map(str::to_owned))),
            };
        };
        let peer = config
            .node_tunnel(&dst_wl.node)
            .ok_or_else(|| Error::UnknownNode {
                dst,
                node: dst_wl.node.clone(),
            })?;
        let td = &tunnel.trust_domain();
        Ok(Route::Tunnel(PoolKey {
            src: SpiffeId::new(td, &src_wl.namespace, &src_wl.service_account)?,
            peer,
            dst: SpiffeId::new(td, &dst_wl.namespace, &dst_wl.service_account)?,
        }))
    }

    async fn open(&self, route: Route, dst: SocketAddrV4) -> Result<Upstream, Error> {
        match route {
            Route::Direct => self.connect(dst).await.map(Upstream::Direct),
            Route::Tunnel(key) => {
                let tunnel = self.tunnel.as_ref().ok_or(Error::NoTunnel(dst))?;
                Ok(Upstream::Tunnel(tunnel.connect(&key, dst).await?))
            }
        }
    }

    /// Where the connection goes: an endpoint of the Service owning the
    /// original destination, or the original destination itself.
    fn resolve(&self, orig: SocketAddrV4) -> Result<Target, (Error, &'static str)> {
        let config = self.config.borrow().clone();
        match config.services.lookup(orig) {
            Lookup::Passthrough => Ok(Target {
                service: None,
                addr: orig,
            }),
            Lookup::UnknownPort => Err((
                Error::UnknownServicePort(orig),
                result::UNKNOWN_SERVICE_PORT,
            )),
            Lookup::Service(backend) => match backend.pick() {
                Some(ep) => Ok(Target {
                    service: Some(backend.service.clone()),
                    addr: ep.addr,
                }),
                None => Err((
                    Error::NoReadyEndpoint {
                        service: backend.service.clone(),
                    },
                    result::NO_READY_ENDPOINT,
                )),
            },
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

enum Route {
    Direct,
    Tunnel(PoolKey),
}

enum Upstream {
    Direct(TcpStream),
    Tunnel(tunnel::Stream),
}

struct Target {
    service: Option<String>,
    addr: SocketAddrV4,
}

/// Closes with a reset, so the client sees a refusal rather than an empty reply.
fn refuse(socket: TcpStream) {
    let _ = socket.set_zero_linger();
    drop(socket);
}
