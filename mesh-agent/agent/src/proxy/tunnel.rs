//! Client side of the tunnel between node agents: HTTP/2 CONNECT streams
//! multiplexed over one mutual-TLS connection per (source identity,
//! destination agent, destination identity), kept in [`Pool`].
use std::{
    future::Future,
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use ::http::{Method, Request, Response, StatusCode};
use hyper::{body::Incoming, client::conn::http2::SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, time::Instant};
use tracing::{debug, info, warn};

use mesh_api::identity::{self, SpiffeId};

use super::{
    http::{self, Body},
    pool::{self, Pool},
};
pub use crate::certs::TlsMaterial as Credentials;
use crate::telemetry::{Metrics, TunnelSide};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no trust bundle yet: the control server has not distributed one")]
    NoTrustBundle,
    #[error("TLS configuration: {0}")]
    Config(#[from] identity::TlsError),
    #[error("tunnel to peer agent {peer} refused: {why}")]
    Revoked { peer: SocketAddrV4, why: String },
    #[error("connecting to peer agent {peer}: {source}")]
    Connect {
        peer: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("connecting to peer agent {0}: timed out")]
    ConnectTimeout(SocketAddrV4),
    #[error("handshake with peer agent {0}: timed out")]
    HandshakeTimeout(SocketAddrV4),
    #[error("peer agent {peer} did not answer CONNECT {target} in time")]
    StreamTimeout {
        peer: SocketAddrV4,
        target: SocketAddrV4,
    },
    #[error(transparent)]
    Shared(Arc<Error>),
    #[error("TLS handshake with peer agent {peer} refused ({reason}): {source}")]
    Handshake {
        peer: SocketAddrV4,
        reason: &'static str,
        source: std::io::Error,
    },
    #[error("HTTP/2 with peer agent {peer}: {source}")]
    Http2 {
        peer: SocketAddrV4,
        source: hyper::Error,
    },
    #[error("peer agent {peer} answered CONNECT {target} with {status}")]
    Refused {
        peer: SocketAddrV4,
        target: SocketAddrV4,
        status: StatusCode,
    },
}

impl Error {
    /// The error itself, through the sharing of a pooled attempt's outcome.
    pub fn cause(&self) -> &Error {
        match self {
            Error::Shared(e) => e.cause(),
            e => e,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    pub src: SpiffeId,
    pub peer: SocketAddrV4,
    pub dst: SpiffeId,
}

/// How long a failed handshake with a peer is remembered: connections in
/// that window fail at once instead of each waiting out the timeout.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);
/// HTTP/2 pings on connections with open streams; a peer that stops
/// answering ends its streams after interval + timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled tunnel connection: a handle for opening streams on it.
#[derive(Clone)]
pub struct Sender {
    id: u64,
    inner: SendRequest<Body>,
}

impl pool::Conn for Sender {
    fn is_open(&self) -> bool {
        !self.inner.is_closed()
    }
}

pub struct TunnelClient {
    creds: Credentials,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    pool: Pool<PoolKey, Sender, Error>,
    next_id: AtomicU64,
}

/// An open CONNECT stream to the destination.
pub type Stream = TokioIo<hyper::upgrade::Upgraded>;

impl TunnelClient {
    pub fn new(creds: Credentials, metrics: Arc<Metrics>, connect_timeout: Duration) -> Self {
        Self {
            creds,
            metrics,
            connect_timeout,
            pool: Pool::new(RETRY_AFTER_FAILURE),
            next_id: AtomicU64::new(0),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.creds.trust_domain
    }

    /// Opens a stream to `target` through the peer agent named in `key`,
    /// reusing the pooled connection when there is one. Each step is bounded
    /// by the connect timeout: a peer whose kernel accepts but whose agent
    /// never answers fails this connection, not every later one.
    pub async fn connect(&self, key: &PoolKey, target: SocketAddrV4) -> Result<Stream, Error> {
        self.connect_from(key, target, None).await
    }

    /// A CONNECT stream naming the caller's pod IP, for the destination's
    /// authorization.
    pub async fn connect_from(
        &self,
        key: &PoolKey,
        target: SocketAddrV4,
        source: Option<std::net::Ipv4Addr>,
    ) -> Result<Stream, Error> {
        let sender = self.sender(key).await?;
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(http::empty())
            .expect("static request");
        if let Some(ip) = source
            && let Ok(v) = ::http::HeaderValue::from_str(&ip.to_string())
        {
            req.headers_mut().insert(http::SOURCE_HEADER, v);
        }
        let mut inner = sender.inner.clone();
        let answer = tokio::time::timeout(self.connect_timeout, async {
            let resp = inner
                .send_request(req)
                .await
                .map_err(|source| Error::Http2 {
                    peer: key.peer,
                    source,
                })?;
            if resp.status() != StatusCode::OK {
                return Err(Error::Refused {
                    peer: key.peer,
                    target,
                    status: resp.status(),
                });
            }
            hyper::upgrade::on(resp)
                .await
                .map_err(|source| Error::Http2 {
                    peer: key.peer,
                    source,
                })
        })
        .await;
        match answer {
            Ok(Ok(upgraded)) => Ok(TokioIo::new(upgraded)),
            Ok(Err(e @ Error::Refused { .. })) => Err(e),
            Ok(Err(e)) => {
                self.pool.evict(key, |c| c.id == sender.id);
                Err(e)
            }
            Err(_) => {
                // The connection no longer answers: the next caller opens
                // a new one rather than queueing behind this one.
                self.pool.evict(key, |c| c.id == sender.id);
                Err(Error::StreamTimeout {
                    peer: key.peer,
                    target,
                })
            }
        }
    }

    /// Sends an HTTP request (already in HTTP/2 form, naming its endpoint
    /// in [`http::TARGET_HEADER`]) as a stream of the pooled connection for
    /// `key`: requests are multiplexed, with no CONNECT per request. The
    /// outer error is the connection's; the inner one the request's.
    pub async fn send_http(
        &self,
        key: &PoolKey,
        req: Request<Body>,
        pending: Option<crate::proxy::http::policy::budget::Held>,
    ) -> Result<Result<Response<Incoming>, hyper::Error>, Error> {
        let sender = self.sender(key).await?;
        // Pending no more: it has a connection.
        drop(pending);
        let mut inner = sender.inner.clone();
        let sent = inner.send_request(req).await;
        if sent.is_err() && inner.is_closed() {
            self.pool.evict(key, |c| c.id == sender.id);
        }
        Ok(sent)
    }

    /// The pooled connection for `key`, opened if there is none.
    async fn sender(&self, key: &PoolKey) -> Result<Sender, Error> {
        self.pool
            .get(key, || self.open(key.clone()))
            .await
            .map_err(Error::Shared)
    }

    /// A new connection for `key`, as a future the pool runs on its own
    /// task: TCP, TLS and the HTTP/2 handshake within one connect timeout.
    /// Yields it with the instant until which it may carry new streams: the
    /// earlier expiry of our certificate and the peer's.
    fn open(
        &self,
        key: PoolKey,
    ) -> impl Future<Output = Result<(Sender, Instant), Error>> + Send + 'static {
        let creds = self.creds.clone();
        let metrics = self.metrics.clone();
        let timeout = self.connect_timeout;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        async move {
            let opened = tokio::time::timeout(timeout, handshake(&creds, &key))
                .await
                .unwrap_or(Err(Error::HandshakeTimeout(key.peer)));
            metrics.tunnel_handshake(
                TunnelSide::Outbound,
                match &opened {
                    Ok(_) => "ok",
                    Err(Error::Handshake { reason, .. }) => reason,
                    Err(Error::Revoked { .. }) => "revoked",
                    Err(Error::HandshakeTimeout(_) | Error::ConnectTimeout(_)) => "timeout",
                    Err(_) => "error",
                },
            );
            let (inner, until) = opened?;
            Ok((Sender { id, inner }, until))
        }
    }
}

async fn handshake(
    creds: &Credentials,
    key: &PoolKey,
) -> Result<(SendRequest<Body>, Instant), Error> {
    let bundle = creds.bundle.borrow().clone().ok_or(Error::NoTrustBundle)?;
    let uses = move |key: &PoolKey, r: &crate::revocation::Revoked| {
        r.refuses([&key.src, &key.dst], Some(*key.peer.ip()))
    };
    if let Some(why) = uses(key, &creds.revoked.borrow()) {
        return Err(Error::Revoked {
            peer: key.peer,
            why,
        });
    }
    let config = identity::client_config(&creds.store, &key.src, &bundle, key.dst.clone())?;
    let tcp = TcpStream::connect(key.peer)
        .await
        .map_err(|source| Error::Connect {
            peer: key.peer,
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(identity::sni_for(&key.dst), tcp)
        .await
        .map_err(|source| {
            let reason = identity::tls_error(&source).map_or("other", identity::refusal_reason);
            warn!(peer = %key.peer, src = %key.src, dst = %key.dst, reason, error = %source, "tunnel handshake failed");
            Error::Handshake {
                peer: key.peer,
                reason,
                source,
            }
        })?;
    let expiry = [
        identity::peer_not_after(tls.get_ref().1),
        creds.store.not_after(&key.src),
    ]
    .into_iter()
    .flatten()
    .min();
    let until = Instant::now()
        + expiry
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .unwrap_or_default();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(8 << 20)
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|source| Error::Http2 {
            peer: key.peer,
            source,
        })?;
    let peer = key.peer;
    let closing = crate::revocation::until_revoked(creds.revoked.clone(), {
        let key = key.clone();
        move |r| uses(&key, r)
    });
    tokio::spawn(async move {
        tokio::select! {
            ended = conn => if let Err(e) = ended {
                debug!(%peer, error = %e, "tunnel connection ended");
            },
            why = closing => {
                // Dropping the connection resets its streams at once.
                warn!(%peer, reason = %why, "closing a tunnel connection: revoked");
            }
        }
    });
    info!(peer = %key.peer, src = %key.src, dst = %key.dst, "tunnel connection established");
    Ok((sender, until))
}
