//! Inbound plaintext (`:15006`, one listener inside each enrolled pod's
//! network namespace): connections into a pod that did not come through its
//! node agent, which the kernel handed here (`mesh-ebpf/src/inbound.rs`)
//! because the pod is not STRICT. The accepted socket's local address is the
//! connection's original destination.
//!
//! The caller has no identity: it is judged by its source address alone
//! (principals and namespaces match nothing; see [`crate::authz`]), as a
//! connection, or request by request when a policy of the workload has HTTP
//! rules and the client speaks HTTP. Allowed, it is carried to the workload
//! from the agent, whose connections the pod's kernel program lets in; the
//! workload sees the agent's address as its peer.
use std::{
    collections::HashMap,
    convert::Infallible,
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_api::{kinds::MtlsMode, serve::accept_loop};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc::UnboundedReceiver,
    task::JoinHandle,
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    proxy::outbound::refuse,
    proxy::{
        copy_bidirectional,
        drain::Drain,
        http::{
            self,
            detect::{self, Protocol},
            upstream::{Upstreams, Wire},
        },
    },
    redirect::enrolment::PodEvent,
    state::StateRx,
    telemetry::{Metrics, PlaintextResult, TcpLabels, TunnelSide},
};

pub struct Plaintext {
    pub state: StateRx,
    pub metrics: Arc<Metrics>,
    pub upstreams: Arc<Upstreams>,
    pub connect_timeout: Duration,
    /// Connections served at once per pod; more are reset.
    pub max_connections: usize,
    /// Stops accepting when the agent stops.
    pub drain: Drain,
}

impl Plaintext {
    /// Serves each enrolled pod's listener until the pod is unenrolled or
    /// the agent drains.
    pub async fn run(self: Arc<Self>, mut events: UnboundedReceiver<PodEvent>) {
        let mut serving: HashMap<u64, (JoinHandle<()>, std::net::TcpListener)> = HashMap::new();
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                () = self.drain.started() => None,
            };
            let Some(event) = event else { break };
            match event {
                PodEvent::Open {
                    cgroup_id,
                    listener,
                } => {
                    let Ok(own) = listener.try_clone() else {
                        warn!(cgroup_id, "cannot keep a pod's inbound listener");
                        continue;
                    };
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            warn!(cgroup_id, error = %e, "cannot serve a pod's inbound listener");
                            continue;
                        }
                    };
                    let this = self.clone();
                    let max = self.max_connections;
                    let task = tokio::spawn(accept_loop(
                        "inbound plaintext",
                        listener,
                        max,
                        move |socket, peer| {
                            let this = this.clone();
                            let open = this.drain.open();
                            async move {
                                let _open = open;
                                this.serve(socket, peer).await
                            }
                            .instrument(info_span!("plaintext", %peer))
                        },
                    ));
                    if let Some((old, _)) = serving.insert(cgroup_id, (task, own)) {
                        old.abort();
                    }
                }
                PodEvent::Close { cgroup_id } => {
                    if let Some((task, _)) = serving.remove(&cgroup_id) {
                        task.abort();
                    }
                }
            }
        }
        // The enrolment holds a copy of each listener: shutting the socket
        // down (not just closing ours) takes it out of the kernel's listener
        // map, so connects into the pod are refused until an agent serves it.
        for (cgroup_id, (task, listener)) in serving {
            task.abort();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
            if let Err(e) = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Read) {
                warn!(cgroup_id, error = %e, "cannot close a pod's inbound listener");
            }
        }
    }

    async fn serve(&self, socket: TcpStream, peer: SocketAddr) {
        let (Ok(SocketAddr::V4(target)), SocketAddr::V4(peer)) = (socket.local_addr(), peer) else {
            refuse(socket);
            return;
        };
        let source_ip = *peer.ip();
        let (mode, l7) = {
            let state = self.state.borrow();
            match state.workload_by_ip(*target.ip()) {
                Some(w) if state.is_local(w.ip) => {
                    (w.mtls_mode, state.authz_for(w.ip).iter().any(|p| p.http))
                }
                _ => {
                    self.metrics.plaintext(PlaintextResult::NotLocalWorkload);
                    debug!(%target, "not a workload of this node");
                    refuse(socket);
                    return;
                }
            }
        };
        if mode == MtlsMode::Strict {
            // The kernel refuses these; this one arrived as the mode changed.
            self.metrics.plaintext(PlaintextResult::Strict);
            refuse(socket);
            return;
        }
        if l7 {
            match detect::detect(&socket, detect::DEFAULT_TIMEOUT).await {
                Protocol::Http1 => return self.serve_http(socket, target, peer, Wire::Http1).await,
                Protocol::Http2 => return self.serve_http(socket, target, peer, Wire::Http2).await,
                // Judged as a connection: HTTP rules cannot match it.
                Protocol::Opaque(_) => {}
            }
        }
        let state = self.state.borrow().clone();
        if !crate::authz::judge(&state, &self.metrics, target, None, source_ip, None).allowed {
            self.metrics.plaintext(PlaintextResult::Denied);
            refuse(socket);
            return;
        }
        let revoked = crate::authz::revoked(
            self.state.clone(),
            self.metrics.clone(),
            target,
            None,
            source_ip,
        );
        let mut upstream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.metrics.plaintext(PlaintextResult::ConnectFailed);
                    debug!(%target, error = %e, "workload connect failed");
                    refuse(socket);
                    return;
                }
                Err(_) => {
                    self.metrics.plaintext(PlaintextResult::ConnectFailed);
                    refuse(socket);
                    return;
                }
            };
        let _ = upstream.set_nodelay(true);
        let _ = socket.set_nodelay(true);
        self.metrics.plaintext(PlaintextResult::Forwarded);
        let tapped = self.metrics.tap.active().then(|| {
            let state = self.state.borrow();
            crate::tap::InboundConnection {
                source_identity: None,
                source_workload: Some(state.workload_name(source_ip)).filter(|w| !w.is_empty()),
                destination_workload: Some(state.workload_name(*target.ip()))
                    .filter(|w| !w.is_empty()),
                peer: SocketAddr::V4(peer),
                target,
                started: std::time::SystemTime::now(),
                start: std::time::Instant::now(),
            }
        });
        let tcp = {
            let state = self.state.borrow();
            let source = state.workload_name(source_ip);
            self.metrics.tcp_opened(TcpLabels {
                side: TunnelSide::Inbound,
                source_workload: if source.is_empty() {
                    "unknown".to_owned()
                } else {
                    source
                },
                destination_service: String::new(),
                destination_workload: state.workload_name(*target.ip()),
                mtls: false,
            })
        };
        let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
        let mut client = socket;
        let mut error = None;
        tokio::select! {
            copied = copy_bidirectional(&mut client, &mut upstream, &sent, &received) => {
                if let Err(e) = copied {
                    debug!(%target, error = %e, "plaintext connection ended with error");
                    error = Some(e.to_string());
                }
            }
            () = revoked => {
                info!(%target, %peer, "closed: a new policy denies it");
                refuse(client);
                error = Some("closed: a new policy denies it".into());
            }
        }
        let (sent, received) = (sent.into_inner(), received.into_inner());
        tcp.closed(sent, received);
        if let Some(t) = tapped {
            self.metrics.tap.publish(|| t.event(sent, received, error));
        }
    }

    async fn serve_http(
        &self,
        socket: TcpStream,
        target: SocketAddrV4,
        peer: SocketAddrV4,
        wire: Wire,
    ) {
        self.metrics.plaintext(PlaintextResult::Http);
        let (state, upstreams, metrics) = (
            self.state.clone(),
            self.upstreams.clone(),
            self.metrics.clone(),
        );
        let svc = service_fn(move |req| {
            let (state, upstreams, metrics) = (state.clone(), upstreams.clone(), metrics.clone());
            async move {
                let snapshot = state.borrow().clone();
                Ok::<_, Infallible>(
                    http::inbound::plaintext(
                        req,
                        &snapshot,
                        &upstreams,
                        &metrics,
                        target,
                        *peer.ip(),
                        wire,
                    )
                    .await,
                )
            }
        });
        let io = TokioIo::new(socket);
        let served = match wire {
            Wire::Http1 => {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .preserve_header_case(true)
                    .header_read_timeout(Duration::from_secs(60))
                    .serve_connection(io, svc);
                crate::serve_draining!(self.drain, conn)
            }
            Wire::Http2 => {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(1024)
                    .max_pending_accept_reset_streams(256)
                    .keep_alive_interval(Duration::from_secs(20))
                    .serve_connection(io, svc);
                crate::serve_draining!(self.drain, conn)
            }
        };
        if let Err(e) = served {
            debug!(error = %e, "plaintext HTTP connection ended");
        }
    }
}
