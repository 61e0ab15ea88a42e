//! TLS on the control server's gRPC listener.
//!
//! The server proves `spiffe://<trust domain>/ns/mesh-system/sa/mesh-control`
//! with a certificate from its own CA, renewed at half its lifetime. A client
//! certificate is optional (an agent's first call carries only its bootstrap
//! token), but one that is presented must chain to the CA; its SPIFFE ID
//! travels with every request of the connection as [`PeerInfo`], where
//! [`auth::caller`](super::auth::caller) finds it.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, pem::PemObject},
    server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, info, warn};

use super::{ResultLabels, certs::Authority};
use mesh_api::{
    identity::{self, SpiffeId},
    serve::{HANDSHAKE_TIMEOUT, accept_loop},
};

/// TLS handshakes in progress at once on the gRPC listener; more
/// connections are closed at once.
const MAX_HANDSHAKES: usize = 1024;
/// Retry delay when issuing the server's own certificate fails.
const REISSUE_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("issuing the control server's certificate: {0}")]
    Issue(String),
    #[error("the trust bundle is unusable: {0}")]
    Bundle(String),
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Who is at the other end of a connection: its address and, when it
/// presented a verified client certificate, the SPIFFE ID in it.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub identity: Option<SpiffeId>,
}

/// The control server's certificate, replaced as it is renewed; every
/// handshake presents the current one.
#[derive(Debug)]
pub struct ServerCert {
    current: RwLock<Arc<CertifiedKey>>,
    not_after: RwLock<SystemTime>,
    /// The root it is under: a CA rotation that retires it re-issues it.
    root: RwLock<String>,
}

impl ServerCert {
    /// Issues a first certificate from `authority`.
    pub fn issue(authority: &Authority) -> Result<Arc<ServerCert>, Error> {
        let (key, not_after) = issue(authority)?;
        Ok(Arc::new(ServerCert {
            current: RwLock::new(key),
            not_after: RwLock::new(not_after),
            root: RwLock::new(authority.current_root_id()),
        }))
    }

    /// Re-issues the certificate at half of each lifetime, and when the CA
    /// in service changes, forever.
    pub async fn renew(self: Arc<Self>, authority: Arc<Authority>) {
        let mut changes = authority.changes();
        loop {
            let not_after = *self
                .not_after
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let left = not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::select! {
                () = tokio::time::sleep(left / 2) => {}
                _ = changes.changed() => {
                    let root = authority.current_root_id();
                    if *self.root.read().unwrap_or_else(PoisonError::into_inner) == root {
                        continue;
                    }
                    *self.root.write().unwrap_or_else(PoisonError::into_inner) = root;
                }
            }
            match issue(&authority) {
                Ok((key, not_after)) => {
                    *self.current.write().unwrap_or_else(PoisonError::into_inner) = key;
                    *self
                        .not_after
                        .write()
                        .unwrap_or_else(PoisonError::into_inner) = not_after;
                    info!(?not_after, "renewed the control server's certificate");
                }
                Err(e) => {
                    warn!(error = %e, "renewing the control server's certificate failed; retrying");
                    tokio::time::sleep(REISSUE_RETRY).await;
                }
            }
        }
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn issue(authority: &Authority) -> Result<(Arc<CertifiedKey>, SystemTime), Error> {
    let id = authority.control_identity();
    let (key, csr) =
        identity::generate_key_and_csr(&id).map_err(|e| Error::Issue(e.to_string()))?;
    let issued = authority
        .sign(csr.as_bytes(), &id)
        .map_err(|e| Error::Issue(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(issued.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Issue(e.to_string()))?;
    let key = CertifiedKey::from_der(chain, key, &provider())?;
    Ok((Arc::new(key), issued.not_after))
}

/// [`server_config`] with the authority's trust bundle, rebuilt whenever it
/// changes (a CA rotation adds or removes a root): each handshake uses the
/// newest, connections already open stay as they are.
pub fn live_server_config(
    cert: Arc<ServerCert>,
    authority: Arc<Authority>,
) -> Result<watch::Receiver<Arc<ServerConfig>>, Error> {
    let mut bundle = authority.trust_bundle_pem();
    let (tx, rx) = watch::channel(server_config(cert.clone(), &bundle)?);
    let mut changes = authority.changes();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let now = authority.trust_bundle_pem();
            if now == bundle {
                continue;
            }
            match server_config(cert.clone(), &now) {
                Ok(config) => {
                    tx.send_replace(config);
                    bundle = now;
                    info!("the gRPC listener trusts the new trust bundle");
                }
                Err(e) => {
                    warn!(error = %e, "the new trust bundle is unusable for the gRPC listener")
                }
            }
        }
    });
    Ok(rx)
}

/// TLS 1.3 with ALPN `h2`; client certificates optional but verified against
/// `trust_bundle_pem` when presented.
pub fn server_config(
    cert: Arc<ServerCert>,
    trust_bundle_pem: &str,
) -> Result<Arc<ServerConfig>, Error> {
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(trust_bundle_pem.as_bytes()) {
        let der = der.map_err(|e| Error::Bundle(e.to_string()))?;
        roots.add(der).map_err(|e| Error::Bundle(e.to_string()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::Bundle(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    // A resumed session skips verifying the client's certificate again.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// An accepted connection whose handshake completed.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts on `listener` and hands over connections once their handshake is
/// done; handshakes run concurrently, so a slow client holds up no one.
/// Failed handshakes are logged and counted by `handshakes{result}`.
pub fn incoming(
    listener: TcpListener,
    config: watch::Receiver<Arc<ServerConfig>>,
    handshakes: Family<ResultLabels, Counter>,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let closed = tx.clone();
    let accept = accept_loop(
        "gRPC listener",
        listener,
        MAX_HANDSHAKES,
        move |tcp: tokio::net::TcpStream, remote| {
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.borrow().clone());
            let (tx, handshakes) = (tx.clone(), handshakes.clone());
            async move {
                let result =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let identity = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .is_some()
                                .then(|| identity::peer_identity(stream.get_ref().1));
                            match identity {
                                Some(Err(refusal)) => Err(refusal.to_string()),
                                Some(Ok(id)) => Ok((stream, Some(id))),
                                None => Ok((stream, None)),
                            }
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("handshake timed out".to_owned()),
                    };
                match result {
                    Ok((inner, identity)) => {
                        handshakes
                            .get_or_create(&ResultLabels { result: "ok" })
                            .inc();
                        debug!(%remote, identity = ?identity.as_ref().map(ToString::to_string), "TLS connection");
                        let info = PeerInfo {
                            remote: Some(remote),
                            identity,
                        };
                        let _ = tx.send(Ok(TlsConn { inner, info })).await;
                    }
                    Err(reason) => {
                        handshakes
                            .get_or_create(&ResultLabels { result: "failed" })
                            .inc();
                        info!(%remote, %reason, "TLS handshake with a client failed");
                    }
                }
            }
        },
    );
    tokio::spawn(async move {
        tokio::select! {
            () = closed.closed() => {}
            () = accept => {}
        }
    });
    ReceiverStream::new(rx)
}
