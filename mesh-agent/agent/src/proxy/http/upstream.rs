//! Connections from the agent to workloads it reaches directly (on this node,
//! or in DISABLE / PERMISSIVE without a tunnel): a pool of idle HTTP/1.1
//! connections and one shared HTTP/2 connection per endpoint address.
//!
//! Written on hyper's connection API rather than hyper-util's pooled
//! `Client`, because the mesh picks the endpoint itself (the pool is keyed by
//! the resolved address, never by the request's URI) and must send the
//! request line exactly as the client wrote it (absolute form included),
//! which that client rewrites to origin form.
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use http::{Request, Response};
use hyper::{body::Incoming, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, time::Instant};
use tracing::debug;

use super::{Body, policy::budget::Held};
use crate::proxy::pool::{self, Pool};

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;
/// An idle connection older than this is closed rather than reused (servers
/// commonly close theirs after 60-120 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
const FAILED_RETRY_AFTER: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddrV4),
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddrV4,
        source: hyper::Error,
    },
    #[error(transparent)]
    Shared(Arc<Error>),
}

/// Which HTTP the agent speaks to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Wire {
    Http1,
    Http2,
}

#[derive(Clone)]
struct H2(conn::http2::SendRequest<Body>);

impl pool::Conn for H2 {
    fn is_open(&self) -> bool {
        !self.0.is_closed()
    }
}

type Idle = Vec<(conn::http1::SendRequest<Body>, Instant)>;

pub struct Upstreams {
    connect_timeout: Duration,
    h1: Arc<Mutex<HashMap<SocketAddrV4, Idle>>>,
    h2: Pool<SocketAddrV4, H2, Error>,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration) -> Upstreams {
        Upstreams {
            connect_timeout,
            h1: Arc::default(),
            h2: Pool::new(FAILED_RETRY_AFTER),
        }
    }

    /// Sends `req` to `addr` over `wire`, reusing a pooled connection.
    pub async fn send(
        &self,
        addr: SocketAddrV4,
        wire: Wire,
        req: Request<Body>,
        pending: Option<Held>,
    ) -> Result<Result<Response<Incoming>, hyper::Error>, Error> {
        match wire {
            Wire::Http2 => {
                let timeout = self.connect_timeout;
                let mut sender = self
                    .h2
                    .get(&addr, || async move {
                        let io = connect(addr, timeout).await?;
                        let (sender, conn) = conn::http2::Builder::new(TokioExecutor::new())
                            .timer(TokioTimer::new())
                            .initial_stream_window_size(1 << 20)
                            .initial_connection_window_size(8 << 20)
                            .keep_alive_interval(Duration::from_secs(20))
                            .handshake(TokioIo::new(io))
                            .await
                            .map_err(|source| Error::Handshake { addr, source })?;
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                debug!(%addr, error = %e, "HTTP/2 upstream connection ended");
                            }
                        });
                        // Never expires: it carries no certificate.
                        Ok((
                            H2(sender),
                            Instant::now() + Duration::from_secs(86400 * 365),
                        ))
                    })
                    .await
                    .map_err(Error::Shared)?;
                drop(pending);
                let sent = sender.0.send_request(req).await;
                if sent.is_err() {
                    self.h2.evict(&addr, |c| c.0.is_closed());
                }
                Ok(sent)
            }
            Wire::Http1 => {
                let mut sender = match self.idle(addr) {
                    Some(s) => s,
                    None => http1(connect(addr, self.connect_timeout).await?, addr).await?,
                };
                drop(pending);
                let sent = sender.send_request(req).await;
                if sent.is_ok() {
                    // Back to the pool once this response's body is read.
                    let idle = self.h1.clone();
                    tokio::spawn(async move {
                        if sender.ready().await.is_ok() {
                            let mut map = idle.lock().unwrap_or_else(PoisonError::into_inner);
                            let list = map.entry(addr).or_default();
                            if list.len() < MAX_IDLE_PER_ENDPOINT {
                                list.push((sender, Instant::now()));
                            }
                        }
                    });
                }
                Ok(sent)
            }
        }
    }

    fn idle(&self, addr: SocketAddrV4) -> Option<conn::http1::SendRequest<Body>> {
        let mut map = self.h1.lock().unwrap_or_else(PoisonError::into_inner);
        let list = map.get_mut(&addr)?;
        let now = Instant::now();
        while let Some((s, since)) = list.pop() {
            if !s.is_closed() && s.is_ready() && now.duration_since(since) < IDLE_TIMEOUT {
                return Some(s);
            }
        }
        None
    }
}

async fn connect(addr: SocketAddrV4, timeout: Duration) -> Result<TcpStream, Error> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::ConnectTimeout(addr))?
        .map_err(|source| Error::Connect { addr, source })?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// An HTTP/1.1 client connection on `io`, with upgrades (WebSocket) and the
/// request's header case kept as the client wrote it.
pub async fn http1<IO>(io: IO, addr: SocketAddrV4) -> Result<conn::http1::SendRequest<Body>, Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = conn::http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| Error::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(%addr, error = %e, "HTTP/1.1 upstream connection ended");
        }
    });
    Ok(sender)
}
