//! Reaching mesh-control: over its local unix socket (`unix:///path`, the
//! operator API without credentials) or over the network (`https://host:port`,
//! TLS verified against the mesh's trust bundle, with a bearer token or a
//! client certificate; `http://` only reaches a server without a CA). Used by
//! `meshctl`; agents use an [`AgentConnector`], which presents the node's
//! certificate once it has one and its bootstrap token until then.
use std::{
    fmt, io,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio::{
    net::{TcpStream, UnixStream},
    sync::watch,
};
use tokio_rustls::TlsConnector;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint, Uri},
};

use crate::{
    identity::{self, CertStore, SpiffeId, control_identity, node_identity},
    pb::operator_client::OperatorClient,
};

/// Largest response a client reads (a `get` of a large mesh).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not a control server address (unix:///path/to/socket or http://host:port)")]
    Address(String),
    #[error("connecting to the control server at {target}")]
    Connect {
        target: Target,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the token can't be sent in a header")]
    Token,
    #[error("{0} is reached over TLS: a trust bundle is needed (--ca-bundle)")]
    NeedsTls(Target),
    #[error("trust bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    #[error("TLS settings: {0}")]
    Tls(String),
}

/// Where mesh-control is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Http(String),
}

impl FromStr for Target {
    type Err = Error;

    fn from_str(s: &str) -> Result<Target, Error> {
        if let Some(path) = s.strip_prefix("unix://")
            && path.starts_with('/')
        {
            Ok(Target::Unix(PathBuf::from(path)))
        } else if s.starts_with("http://") || s.starts_with("https://") {
            Ok(Target::Http(s.to_owned()))
        } else {
            Err(Error::Address(s.to_owned()))
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unix(path) => write!(f, "unix://{}", path.display()),
            Target::Http(uri) => f.write_str(uri),
        }
    }
}

impl Target {
    /// Whether the server is reached over TLS (`https://`).
    pub fn is_tls(&self) -> bool {
        matches!(self, Target::Http(uri) if uri.starts_with("https://"))
    }
}

/// How to reach mesh-control over TLS.
#[derive(Clone, Debug)]
pub struct Tls {
    /// PEM trust anchors: the mesh CA's root (`<ca-dir>/ca.crt` of mesh-control).
    pub trust_bundle_pem: String,
    /// The identity the server must prove.
    pub server: SpiffeId,
    /// A client certificate to present: the store that holds it, and its
    /// identity. Presented only while the store holds one.
    pub client: Option<(CertStore, SpiffeId)>,
}

impl Tls {
    /// Trusts the bundle in `path` and expects the control server of
    /// `trust_domain`; presents no client certificate.
    pub fn from_bundle_file(path: &Path, trust_domain: &str) -> Result<Tls, Error> {
        Ok(Tls {
            trust_bundle_pem: read_bundle(path)?,
            server: control_identity(trust_domain).map_err(|e| Error::Tls(e.to_string()))?,
            client: None,
        })
    }

    fn connector(&self) -> Result<TlsConnector, Error> {
        let (store, local) = match &self.client {
            Some((store, id)) => (store.clone(), id.clone()),
            // An empty store: nothing to present.
            None => (CertStore::new(), self.server.clone()),
        };
        let config =
            identity::client_config(&store, &local, &self.trust_bundle_pem, self.server.clone())
                .map_err(|e| Error::Tls(e.to_string()))?;
        Ok(TlsConnector::from(config))
    }
}

fn read_bundle(path: &Path) -> Result<String, Error> {
    let bad = |reason: String| Error::Bundle {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(pem)
}

/// Connects a channel to mesh-control (`unix://` or `http://`; `https://`
/// needs [`channel_with_tls`]).
pub async fn channel(target: &Target) -> Result<Channel, Error> {
    channel_with_tls(target, None).await
}

/// The network endpoint of `uri`, with the transport settings every client uses.
fn endpoint(target: &Target, uri: &str) -> Result<Endpoint, Error> {
    Endpoint::from_shared(uri.to_owned())
        .map_err(|source| Error::Connect {
            target: target.clone(),
            source,
        })
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })
}

/// Connects a channel to mesh-control; an `https://` target needs `tls`.
pub async fn channel_with_tls(target: &Target, tls: Option<&Tls>) -> Result<Channel, Error> {
    if target.is_tls() {
        let Target::Http(uri) = target else {
            unreachable!("TLS targets are network targets")
        };
        let tls = tls.ok_or_else(|| Error::NeedsTls(target.clone()))?;
        // tonic sees plain HTTP/2: the connector does TLS itself, so that the
        // server is verified by SPIFFE ID rather than by host name.
        let plain = uri.replacen("https://", "http://", 1);
        return endpoint(target, &plain)?
            .connect_with_connector(tls_connector(tls.connector()?))
            .await
            .map_err(|source| Error::Connect {
                target: target.clone(),
                source,
            });
    }
    let connect_error = |source| Error::Connect {
        target: target.clone(),
        source,
    };
    match target {
        Target::Unix(path) => {
            let path = path.clone();
            // The URI only satisfies the HTTP/2 layer; the connector dials the socket.
            Endpoint::from_static("http://mesh-control.local")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
                }))
                .await
                .map_err(connect_error)
        }
        Target::Http(uri) => endpoint(target, uri)?
            .connect()
            .await
            .map_err(connect_error),
    }
}

/// A channel that connects (over TLS, for `https://`) on first use and
/// reconnects after failures, for clients that share one among many calls.
pub fn lazy_channel(target: &Target, tls: Option<&Tls>) -> Result<Channel, Error> {
    match (target, tls) {
        (Target::Http(uri), Some(tls)) if target.is_tls() => {
            let plain = uri.replacen("https://", "http://", 1);
            Ok(endpoint(target, &plain)?
                .connect_with_connector_lazy(tls_connector(tls.connector()?)))
        }
        (Target::Http(_), None) if target.is_tls() => Err(Error::NeedsTls(target.clone())),
        (Target::Http(uri), _) => Ok(endpoint(target, uri)?.connect_lazy()),
        (Target::Unix(_), _) => Err(Error::Address(format!(
            "{target}: lazy channels are for network targets"
        ))),
    }
}

/// Dials TCP and completes a TLS handshake with the server's URI host.
fn tls_connector(
    tls: TlsConnector,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = io::Error,
    Future = impl Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>>
             + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::other(format!("{uri} names no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(15012);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host).map_err(io::Error::other)?;
            Ok(TokioIo::new(tls.connect(name, tcp).await?))
        }
    })
}

/// Sends `authorization: Bearer <token>` with every request, if there is a token.
#[derive(Clone, Debug)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, Error> {
        token
            .map(|t| format!("Bearer {t}").parse().map_err(|_| Error::Token))
            .transpose()
            .map(Bearer)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// An operator API client.
pub async fn operator(
    target: &Target,
    token: Option<&str>,
) -> Result<OperatorClient<InterceptedService<Channel, Bearer>>, Error> {
    operator_with_tls(target, token, None).await
}

/// An operator API client; an `https://` target needs `tls`.
pub async fn operator_with_tls(
    target: &Target,
    token: Option<&str>,
    tls: Option<&Tls>,
) -> Result<OperatorClient<InterceptedService<Channel, Bearer>>, Error> {
    let channel = channel_with_tls(target, tls).await?;
    Ok(
        OperatorClient::with_interceptor(channel, Bearer::new(token)?)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES),
    )
}

/// The node agent's own certificate, with which it authenticates to the
/// control server. Clones share it.
#[derive(Clone, Debug)]
pub struct NodeCert {
    store: CertStore,
    id: SpiffeId,
    not_after: Arc<watch::Sender<Option<SystemTime>>>,
    chain: Arc<std::sync::Mutex<Option<String>>>,
}

impl NodeCert {
    pub fn new(id: SpiffeId) -> NodeCert {
        NodeCert {
            store: CertStore::new(),
            id,
            not_after: Arc::new(watch::Sender::new(None)),
            chain: Arc::default(),
        }
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.id
    }

    /// Installs a (renewed) certificate; returns its expiry.
    pub fn install(
        &self,
        cert_chain_pem: &str,
        key: PrivateKeyDer<'static>,
    ) -> Result<SystemTime, String> {
        let (_, not_after) = identity::validity(cert_chain_pem)?;
        let id = self
            .store
            .insert(cert_chain_pem, key)
            .map_err(|e| e.to_string())?;
        if id != self.id {
            self.store.remove(&id);
            return Err(format!("the certificate names {id}, not {}", self.id));
        }
        *self.chain.lock().unwrap_or_else(|e| e.into_inner()) = Some(cert_chain_pem.to_owned());
        self.not_after.send_replace(Some(not_after));
        Ok(not_after)
    }

    /// Forgets an expired certificate (or one of a former CA): the bootstrap
    /// token takes over again.
    pub fn remove(&self) {
        self.store.remove(&self.id);
        *self.chain.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.not_after.send_replace(None);
    }

    fn chain(&self) -> Option<String> {
        self.chain.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn not_after(&self) -> Option<SystemTime> {
        *self.not_after.borrow()
    }

    /// Whether the certificate is there and unexpired.
    pub fn is_valid(&self) -> bool {
        self.not_after().is_some_and(|t| t > SystemTime::now())
    }

    /// Waits up to `timeout` for a valid certificate; returns whether there is one.
    pub async fn wait_valid(&self, timeout: Duration) -> bool {
        let mut rx = self.not_after.subscribe();
        let valid = |t: &Option<SystemTime>| t.is_some_and(|t| t > SystemTime::now());
        tokio::time::timeout(timeout, rx.wait_for(valid))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// How a node agent reaches mesh-control: over TLS (for `https://`),
/// verifying the server as the control server of its trust domain against
/// the CA bundle file, presenting its node certificate when it holds a valid
/// one and sending its bootstrap token otherwise.
///
/// It is given one or several endpoints (replicas of mesh-control sharing
/// one store) and uses one at a time, for its configuration stream and its
/// certificate requests alike; when a connection to it fails, or a caller
/// reports that its stream did, it goes on to the next ([`next_endpoint`]).
///
/// Why not tonic's `Channel::balance_list`: it takes plain `Endpoint`s and
/// dials them with tonic's own connector, while ours verifies the server by
/// SPIFFE ID and presents the node certificate; it spreads calls over every
/// replica, while a node's stream and its signing requests should meet one
/// replica's view; and a long-lived stream stays on the connection it
/// started on, so its failure has to be handled by the caller anyway.
#[derive(Debug)]
pub struct AgentConnector {
    targets: Vec<Target>,
    /// Index into `targets` of the endpoint in use.
    current: AtomicUsize,
    trust_domain: String,
    token: Option<String>,
    ca_bundle: Option<PathBuf>,
    /// The trust bundle the control server distributed last: trusted for
    /// it too, so that a server certificate of a root brought in by a CA
    /// rotation is accepted before the file has it.
    distributed: std::sync::RwLock<Option<String>>,
    node_cert: NodeCert,
}

impl AgentConnector {
    /// `addr` is `https://host:port` (or `http://` for a server without a
    /// CA), or several of them separated by commas; `ca_bundle` is read at
    /// every connection, so a replaced file takes effect on the next one.
    pub fn new(
        addr: &str,
        node: &str,
        trust_domain: &str,
        token: Option<String>,
        ca_bundle: Option<PathBuf>,
    ) -> Result<AgentConnector, Error> {
        let targets = agent_targets(addr)?;
        if targets[0].is_tls() && ca_bundle.is_none() {
            return Err(Error::NeedsTls(targets[0].clone()));
        }
        let id = node_identity(trust_domain, node).map_err(|e| Error::Tls(e.to_string()))?;
        Ok(AgentConnector {
            targets,
            current: AtomicUsize::new(0),
            trust_domain: trust_domain.to_owned(),
            token,
            ca_bundle,
            distributed: std::sync::RwLock::default(),
            node_cert: NodeCert::new(id),
        })
    }

    /// The endpoint in use.
    pub fn target(&self) -> &Target {
        &self.targets[self.current.load(Ordering::Acquire) % self.targets.len()]
    }

    /// Every endpoint, in the order they are tried.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Whether the control server is reached over TLS (all endpoints are
    /// alike).
    pub fn is_tls(&self) -> bool {
        self.targets[0].is_tls()
    }

    /// The endpoint at `index` failed (its connection, or a stream on it):
    /// the next connection goes to the one after it, unless another caller
    /// has moved on already.
    pub fn failed(&self, index: usize) {
        let len = self.targets.len();
        let _ = self
            .current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                Some(next_endpoint(current, index, len))
            });
        if len > 1 {
            tracing::info!(
                failed = %self.targets[index % len],
                next = %self.target(),
                "control server endpoint failed; going on to the next"
            );
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn node_cert(&self) -> &NodeCert {
        &self.node_cert
    }

    pub fn ca_bundle(&self) -> Option<&Path> {
        self.ca_bundle.as_deref()
    }

    /// Trusts `pem` (the distributed trust bundle) besides the file from
    /// the next connection on.
    pub fn set_distributed_bundle(&self, pem: &str) {
        let mut held = self
            .distributed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.as_deref() != Some(pem) {
            *held = Some(pem.to_owned());
        }
    }

    /// A fresh channel, and what to send with its requests: nothing when the
    /// handshake presented a valid node certificate, else the token.
    ///
    /// A node certificate that does not chain to the bundle (the control
    /// server has a new CA) would fail every handshake: it is dropped, and
    /// the token goes instead.
    pub async fn connect(&self) -> Result<(Channel, Bearer), Error> {
        self.connect_endpoint()
            .await
            .map(|(channel, bearer, _)| (channel, bearer))
    }

    /// [`connect`](Self::connect) to the endpoint in use; also returns its
    /// index, for [`failed`](Self::failed) when a stream on it breaks. A
    /// failed connection moves on to the next endpoint by itself.
    pub async fn connect_endpoint(&self) -> Result<(Channel, Bearer, usize), Error> {
        let index = self.current.load(Ordering::Acquire) % self.targets.len();
        let target = &self.targets[index];
        match self.connect_to(target).await {
            Ok((channel, bearer)) => Ok((channel, bearer, index)),
            Err(e) => {
                self.failed(index);
                Err(e)
            }
        }
    }

    async fn connect_to(&self, target: &Target) -> Result<(Channel, Bearer), Error> {
        let tls = match &self.ca_bundle {
            Some(path) if target.is_tls() => {
                let mut bundle = read_bundle(path)?;
                if let Some(distributed) = self
                    .distributed
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .as_deref()
                {
                    bundle.push('\n');
                    bundle.push_str(distributed);
                }
                if let Some(chain) = self.node_cert.chain()
                    && !identity::chains_to(&chain, &bundle)
                {
                    tracing::warn!(
                        bundle = %path.display(),
                        "the node certificate has expired or does not chain to the CA bundle (a new CA?); dropping it for the bootstrap token"
                    );
                    self.node_cert.remove();
                }
                Some(Tls {
                    trust_bundle_pem: bundle,
                    server: control_identity(&self.trust_domain)
                        .map_err(|e| Error::Tls(e.to_string()))?,
                    client: Some((self.node_cert.store.clone(), self.node_cert.id.clone())),
                })
            }
            _ => None,
        };
        let has_cert = self.node_cert.is_valid();
        let channel = channel_with_tls(target, tls.as_ref()).await?;
        let token = if tls.is_some() && has_cert {
            None
        } else {
            self.token.as_deref()
        };
        Ok((channel, Bearer::new(token)?))
    }
}

/// Parses an agent's `--control-addr`: one network endpoint or several,
/// separated by commas, all `https://` or all `http://`.
fn agent_targets(addr: &str) -> Result<Vec<Target>, Error> {
    let mut targets = Vec::new();
    for part in addr.split(',').map(str::trim) {
        let target: Target = part.parse()?;
        if matches!(target, Target::Unix(_)) {
            return Err(Error::Address(format!(
                "{part}: agents reach the control server over the network"
            )));
        }
        if let Some(first) = targets.first()
            && Target::is_tls(first) != target.is_tls()
        {
            return Err(Error::Address(format!(
                "{part}: every control server endpoint must use the scheme of {first}"
            )));
        }
        targets.push(target);
    }
    Ok(targets)
}

/// Which endpoint to use next, when the one at `failed` failed while
/// `current` is in use: the one after `failed`, wrapping round; if another
/// caller has already moved on from `failed`, `current` stays.
pub fn next_endpoint(current: usize, failed: usize, count: usize) -> usize {
    if count == 0 {
        return 0;
    }
    if current % count == failed % count {
        (failed % count + 1) % count
    } else {
        current % count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_endpoint_hands_over_to_the_next_wrapping_round() {
        assert_eq!(next_endpoint(0, 0, 3), 1);
        assert_eq!(next_endpoint(1, 1, 3), 2);
        assert_eq!(next_endpoint(2, 2, 3), 0);
        // One endpoint: it stays (the backoff paces the retries).
        assert_eq!(next_endpoint(0, 0, 1), 0);
    }

    #[test]
    fn a_failure_reported_late_does_not_skip_the_endpoint_already_chosen() {
        // The stream and a signing request both saw endpoint 0 fail; the
        // first report moved to 1, the second must not move on to 2.
        let after_first = next_endpoint(0, 0, 3);
        assert_eq!(next_endpoint(after_first, 0, 3), 1);
    }

    #[test]
    fn agent_endpoints_parse_as_a_list_and_name_the_bad_one() {
        let targets = agent_targets("https://198.18.0.2:15012, https://198.18.0.3:15012")
            .expect("two endpoints");
        assert_eq!(
            targets,
            vec![
                Target::Http("https://198.18.0.2:15012".into()),
                Target::Http("https://198.18.0.3:15012".into()),
            ]
        );
        let bad = agent_targets("https://a:15012,b:15012").expect_err("no scheme");
        assert!(bad.to_string().contains("\"b:15012\""), "{bad}");
        let unix = agent_targets("https://a:15012,unix:///run/c.sock").expect_err("unix");
        assert!(unix.to_string().contains("unix:///run/c.sock"), "{unix}");
        let mixed = agent_targets("https://a:15012,http://b:15012").expect_err("mixed");
        assert!(mixed.to_string().contains("http://b:15012"), "{mixed}");
        assert!(agent_targets("https://a:15012,").is_err());
    }

    #[tokio::test]
    async fn a_connector_goes_round_its_endpoints_as_connections_fail() {
        // Two ports nothing listens on (bound, then closed): each connection
        // is refused, so each moves to the next endpoint.
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        };
        let (a, b) = (free(), free());
        let addr = format!("http://127.0.0.1:{a},http://127.0.0.1:{b}");
        let connector =
            AgentConnector::new(&addr, "n1", "cluster.local", None, None).expect("connector");
        assert_eq!(
            connector.target().to_string(),
            format!("http://127.0.0.1:{a}")
        );
        assert!(connector.connect_endpoint().await.is_err());
        assert_eq!(
            connector.target().to_string(),
            format!("http://127.0.0.1:{b}")
        );
        assert!(connector.connect_endpoint().await.is_err());
        assert_eq!(
            connector.target().to_string(),
            format!("http://127.0.0.1:{a}")
        );
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            "unix:///run/mesh/control.sock"
                .parse::<Target>()
                .expect("unix"),
            Target::Unix("/run/mesh/control.sock".into())
        );
        assert_eq!(
            "http://10.0.0.1:15012".parse::<Target>().expect("http"),
            Target::Http("http://10.0.0.1:15012".into())
        );
        assert!("10.0.0.1:15012".parse::<Target>().is_err());
        assert!("unix://relative".parse::<Target>().is_err());
    }
}
