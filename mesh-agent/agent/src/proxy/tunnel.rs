//! Client side of the tunnel between node agents: HTTP/2 CONNECT streams
//! multiplexed over one mutual-TLS connection per (source identity,
//! destination agent, destination identity).
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use mesh_api::identity::{self, SpiffeId};

pub use crate::certs::TlsMaterial as Credentials;
use crate::telemetry::{Metrics, TunnelSide};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no trust bundle yet: the control server has not distributed one")]
    NoTrustBundle,
    #[error("TLS configuration: {0}")]
    Config(#[from] identity::TlsError),
    #[error("connecting to peer agent {peer}: {source}")]
    Connect {
        peer: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("connecting to peer agent {0}: timed out")]
    ConnectTimeout(SocketAddrV4),
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

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    pub src: SpiffeId,
    pub peer: SocketAddrV4,
    pub dst: SpiffeId,
}

type Slot = Arc<tokio::sync::Mutex<Option<SendRequest<Empty<Bytes>>>>>;

pub struct TunnelClient {
    creds: Credentials,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    pool: Mutex<HashMap<PoolKey, Slot>>,
}

/// An open CONNECT stream to the destination.
pub type Stream = TokioIo<hyper::upgrade::Upgraded>;

impl TunnelClient {
    pub fn new(creds: Credentials, metrics: Arc<Metrics>, connect_timeout: Duration) -> Self {
        Self {
            creds,
            metrics,
            connect_timeout,
            pool: Mutex::default(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.creds.trust_domain
    }

    /// Opens a stream to `target` through the peer agent named in `key`,
    /// reusing the pooled connection when there is one.
    pub async fn connect(&self, key: &PoolKey, target: SocketAddrV4) -> Result<Stream, Error> {
        let mut sender = self.sender(key).await?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(Empty::<Bytes>::new())
            .expect("static request");
        let resp = sender
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
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|source| Error::Http2 {
                peer: key.peer,
                source,
            })?;
        Ok(TokioIo::new(upgraded))
    }

    /// The pooled connection for `key`; one handshake at a time per key, so
    /// a burst of connections shares it.
    async fn sender(&self, key: &PoolKey) -> Result<SendRequest<Empty<Bytes>>, Error> {
        let slot = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.entry(key.clone()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(sender) = slot.as_ref()
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let sender = self.handshake(key).await;
        self.metrics.tunnel_handshake(
            TunnelSide::Outbound,
            match &sender {
                Ok(_) => "ok",
                Err(Error::Handshake { reason, .. }) => reason,
                Err(_) => "error",
            },
        );
        let sender = sender?;
        *slot = Some(sender.clone());
        Ok(sender)
    }

    async fn handshake(&self, key: &PoolKey) -> Result<SendRequest<Empty<Bytes>>, Error> {
        let bundle = self
            .creds
            .bundle
            .borrow()
            .clone()
            .ok_or(Error::NoTrustBundle)?;
        let config =
            identity::client_config(&self.creds.store, &key.src, &bundle, key.dst.clone())?;
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(key.peer))
            .await
            .map_err(|_| Error::ConnectTimeout(key.peer))?
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
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(8 << 20)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| Error::Http2 {
                peer: key.peer,
                source,
            })?;
        let peer = key.peer;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "tunnel connection ended");
            }
        });
        info!(peer = %key.peer, src = %key.src, dst = %key.dst, "tunnel connection established");
        Ok(sender)
    }
}
