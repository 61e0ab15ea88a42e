//! The `Distribution` service: one delta stream per node agent, and the
//! registry of agents' sync state that `meshctl agents` shows.
//!
//! A stream is authenticated by the node certificate the agent presented on
//! its TLS connection, or by the bearer token of a node; the node its first
//! request names must be that one. After each response the stream waits for the agent's
//! ACK or NACK (by nonce) before it sends the next; changes made meanwhile
//! are coalesced into that next response.
//!
//! Push latency (`mesh_control_push_latency_seconds`) is observed once per
//! ACK of a response that completes a newer revision than the agent held,
//! from the commit of the first revision after that one: the oldest change
//! the response carries. What the agent's first sync brings was committed
//! before it subscribed and is not timed.
use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::{BufMut, Bytes};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status, Streaming,
    codec::{BufferSettings, Codec, EncodeBuf, Encoder},
    server::NamedService,
};
use tonic_prost::ProstDecoder;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    ControlPlane, MAX_REQUEST_BYTES,
    auth::{self, Tokens, Via},
    distribution::{Delta, Subscription},
    lock,
};
use mesh_api::pb::{self, DeltaRequest};

const DELTA_RESOURCES: &str = "/mesh.control.v1.Distribution/DeltaResources";

/// How long a new stream may take to say which node it serves.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Nonces are unique across all streams of this process.
static NONCES: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Default)]
struct AgentRecord {
    streams: usize,
    acked_version: String,
    last_ack_unix_ms: u64,
    last_error: Option<pb::Status>,
    /// Keys the agent rejected and has not accepted a newer version of.
    rejected: BTreeSet<String>,
    /// Version of the last trust bundle it acknowledged (or held).
    bundle: String,
}

/// Sync state of every agent seen since this server started.
#[derive(Debug, Default)]
pub struct Agents(Mutex<BTreeMap<String, AgentRecord>>);

impl Agents {
    /// Lists nodes expected to connect, so one that never did shows too.
    pub fn expect<'a>(&self, nodes: impl IntoIterator<Item = &'a str>) {
        let mut agents = lock(&self.0);
        for node in nodes {
            agents.entry(node.to_owned()).or_default();
        }
    }

    /// What `meshctl agents` shows, by node.
    pub fn snapshot(&self) -> Vec<pb::AgentSync> {
        lock(&self.0)
            .iter()
            .map(|(node, r)| pb::AgentSync {
                node: node.clone(),
                connected: r.streams > 0,
                acked_version: r.acked_version.clone(),
                last_ack_unix_ms: r.last_ack_unix_ms,
                last_error: r.last_error.clone(),
            })
            .collect()
    }

    /// Each agent's last acknowledged trust bundle, for the CA rotation.
    pub fn bundles(&self) -> Vec<super::certs::AgentBundle> {
        lock(&self.0)
            .iter()
            .map(|(node, r)| super::certs::AgentBundle {
                node: node.clone(),
                connected: r.streams > 0,
                version: r.bundle.clone(),
            })
            .collect()
    }

    fn bundle_held(&self, node: &str, version: &str) {
        lock(&self.0).entry(node.to_owned()).or_default().bundle = version.to_owned();
    }

    fn connect(&self, node: &str) {
        lock(&self.0).entry(node.to_owned()).or_default().streams += 1;
    }

    fn disconnect(&self, node: &str) {
        if let Some(r) = lock(&self.0).get_mut(node) {
            r.streams = r.streams.saturating_sub(1);
        }
    }

    /// A rejection stays visible until the agent accepts a newer version
    /// of every resource it named (or, naming none, any later response).
    fn acked(&self, node: &str, sent: &Sent) {
        let mut agents = lock(&self.0);
        let r = agents.entry(node.to_owned()).or_default();
        if !sent.version.is_empty() {
            r.acked_version.clone_from(&sent.version);
        }
        r.last_ack_unix_ms = now_unix_ms();
        if let Some(bundle) = &sent.bundle {
            r.bundle.clone_from(bundle);
        }
        for key in &sent.keys {
            r.rejected.remove(key);
        }
        if r.rejected.is_empty() {
            r.last_error = None;
        }
    }

    fn rejected(&self, node: &str, error: pb::Status) {
        let mut agents = lock(&self.0);
        let r = agents.entry(node.to_owned()).or_default();
        r.rejected.extend(error.resources.iter().cloned());
        r.last_error = Some(error);
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A response waiting for its ACK or NACK.
#[derive(Debug)]
struct Sent {
    nonce: String,
    version: String,
    /// `version` as a revision; `None` before the first complete response.
    revision: Option<u64>,
    keys: Vec<String>,
    /// The version of the trust bundle it carries, if it does.
    bundle: Option<String>,
}

/// A `DeltaResponse`, already encoded in pieces (see [`Delta::encode`]).
#[derive(Debug)]
pub struct EncodedResponse(Vec<Bytes>);

/// Decodes requests with prost; writes responses' pieces as they are.
#[derive(Debug, Default)]
struct DeltaCodec;

impl Codec for DeltaCodec {
    type Encode = EncodedResponse;
    type Decode = DeltaRequest;
    type Encoder = PiecesEncoder;
    type Decoder = ProstDecoder<DeltaRequest>;

    fn encoder(&mut self) -> PiecesEncoder {
        PiecesEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<DeltaRequest> {
        ProstDecoder::new(BufferSettings::default())
    }
}

#[derive(Debug)]
struct PiecesEncoder;

impl Encoder for PiecesEncoder {
    type Item = EncodedResponse;
    type Error = Status;

    fn encode(&mut self, item: EncodedResponse, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        for piece in item.0 {
            dst.put_slice(&piece);
        }
        Ok(())
    }
}

/// The `Distribution` gRPC service. Written out rather than generated so
/// responses can share the encoding of each resource across agents.
#[derive(Clone)]
pub struct DistributionServer(Arc<DistributionService>);

impl DistributionServer {
    pub fn new(service: DistributionService) -> DistributionServer {
        DistributionServer(Arc::new(service))
    }
}

impl NamedService for DistributionServer {
    const NAME: &'static str = pb::distribution_server::SERVICE_NAME;
}

impl<B> tower::Service<http::Request<B>> for DistributionServer
where
    B: hyper::body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move {
            if request.uri().path() != DELTA_RESOURCES {
                let missing = format!("no method {}", request.uri().path());
                return Ok(Status::unimplemented(missing).into_http());
            }
            let method = tower::service_fn(move |request: Request<Streaming<DeltaRequest>>| {
                let service = service.clone();
                async move { service.delta_resources(request).await }
            });
            let mut grpc = tonic::server::Grpc::new(DeltaCodec)
                .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
            Ok(grpc.streaming(method, request).await)
        })
    }
}

pub struct DistributionService {
    plane: Arc<ControlPlane>,
    tokens: Tokens,
    stop: watch::Receiver<bool>,
}

impl DistributionService {
    /// Streams end, telling agents to come back later, once `stop` is true.
    pub fn new(
        plane: Arc<ControlPlane>,
        tokens: Tokens,
        stop: watch::Receiver<bool>,
    ) -> DistributionService {
        plane.agents.expect(tokens.nodes());
        DistributionService {
            plane,
            tokens,
            stop,
        }
    }

    fn refuse(&self, peer: Option<SocketAddr>, node: &str, why: String) -> Status {
        self.plane.metrics.unauthenticated_streams.inc();
        warn!(?peer, node, reason = %why, "refused an unauthenticated agent stream");
        Status::unauthenticated(why)
    }

    async fn delta_resources(
        &self,
        request: Request<Streaming<DeltaRequest>>,
    ) -> Result<Response<ReceiverStream<Result<EncodedResponse, Status>>>, Status> {
        let peer = request
            .extensions()
            .get::<super::tls::PeerInfo>()
            .and_then(|p| p.remote)
            .or_else(|| request.remote_addr());
        let trust_domain = self.plane.authority().map(|a| a.trust_domain());
        let caller = match auth::caller(&request, &self.tokens, trust_domain).await {
            Ok(caller) => caller,
            Err(why) => return Err(self.refuse(peer, "", why)),
        };
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(first))) => first,
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) | Err(_) => {
                return Err(Status::invalid_argument(
                    "expected a first DeltaRequest naming the node",
                ));
            }
        };
        if first.node.is_empty() {
            return Err(Status::invalid_argument(
                "the first DeltaRequest must name the node",
            ));
        }
        if first.node != caller.node {
            return Err(match caller.via {
                Via::Token | Via::ServiceAccountToken => {
                    let why = format!("token is not valid for node {:?}", first.node);
                    self.refuse(peer, &first.node, why)
                }
                Via::Certificate => {
                    let why = format!(
                        "the node certificate is node {:?}'s; it may not subscribe as node {:?}",
                        caller.node, first.node
                    );
                    self.refuse(peer, &first.node, why.clone());
                    Status::permission_denied(why)
                }
            });
        }
        let held = first.initial_resource_versions.len();
        let held_bundle = first
            .initial_resource_versions
            .get(mesh_api::names::TRUST_BUNDLE_KEY)
            .cloned();
        let (subscription, synced_through) = {
            let view = self.plane.view();
            if let Some(v) = held_bundle.filter(|v| Some(v.as_str()) == view.trust_bundle_version())
            {
                self.plane.agents.bundle_held(&first.node, &v);
            }
            let subscription =
                Subscription::new(&first.node, first.initial_resource_versions, &view);
            (subscription, view.revision())
        };
        let (outbound, responses) = mpsc::channel(1);
        let span = info_span!("agent", node = %first.node, peer = ?peer, via = %caller.via);
        let stream = AgentStream {
            plane: self.plane.clone(),
            subscription,
            inbound,
            outbound,
            stop: self.stop.clone(),
            pending: None,
            synced_through,
        };
        tokio::spawn(
            async move {
                info!(held, "agent subscribed");
                stream.run().await;
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(responses)))
    }
}

/// Marks the agent connected while the stream lives, however it ends.
struct Connected {
    plane: Arc<ControlPlane>,
    node: String,
}

impl Connected {
    fn new(plane: Arc<ControlPlane>, node: &str) -> Connected {
        plane.agents.connect(node);
        plane.metrics.connected_agents.inc();
        Connected {
            plane,
            node: node.to_owned(),
        }
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.plane.agents.disconnect(&self.node);
        self.plane.metrics.connected_agents.dec();
    }
}

struct AgentStream {
    plane: Arc<ControlPlane>,
    subscription: Subscription,
    inbound: Streaming<DeltaRequest>,
    outbound: mpsc::Sender<Result<EncodedResponse, Status>>,
    stop: watch::Receiver<bool>,
    pending: Option<Sent>,
    /// The revision the agent holds, for push latency: at first the one
    /// its initial sync completes.
    synced_through: u64,
}

impl AgentStream {
    async fn run(mut self) {
        let _connected = Connected::new(self.plane.clone(), self.subscription.node());
        let mut revisions = self.plane.subscribe();
        let mut bundles = self.plane.trust_pushes.subscribe();
        loop {
            if *self.stop.borrow() {
                self.close(Status::unavailable("mesh-control is shutting down"))
                    .await;
                break;
            }
            if self.pending.is_none() {
                revisions.borrow_and_update();
                let (next, bundle) = {
                    let view = self.plane.view();
                    let next = self.subscription.next(&view);
                    let bundle = view.trust_bundle_version().map(str::to_owned);
                    (next, bundle)
                };
                match next {
                    Ok(Some(delta)) => {
                        if !self.send(delta, bundle).await {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(lagged) => {
                        warn!("agent fell behind the change log; closing its stream");
                        self.close(Status::aborted(lagged.to_string())).await;
                        break;
                    }
                }
            }
            tokio::select! {
                message = self.inbound.message() => match message {
                    Ok(Some(request)) => self.answered(request),
                    Ok(None) => {
                        info!("agent closed its stream");
                        break;
                    }
                    Err(status) => {
                        info!(%status, "agent stream ended");
                        break;
                    }
                },
                changed = revisions.changed(), if self.pending.is_none() => {
                    if changed.is_err() {
                        break;
                    }
                }
                changed = bundles.changed() => {
                    if changed.is_ok() {
                        self.subscription.resend(mesh_api::names::TRUST_BUNDLE_KEY);
                    }
                }
                stopping = self.stop.changed() => {
                    // The sender gone means the server is gone.
                    if stopping.is_err() {
                        self.close(Status::unavailable("mesh-control is shutting down")).await;
                        break;
                    }
                }
            }
        }
    }

    /// Sends a response; false when the agent is gone.
    async fn send(&mut self, delta: Delta, bundle: Option<String>) -> bool {
        let nonce = NONCES.fetch_add(1, Ordering::Relaxed).to_string();
        let keys: Vec<String> = delta
            .keys
            .iter()
            .map(ToString::to_string)
            .chain(delta.removed_resources.iter().cloned())
            .collect();
        let bundle = bundle.filter(|_| keys.iter().any(|k| k == mesh_api::names::TRUST_BUNDLE_KEY));
        debug!(
            %nonce,
            version = %delta.system_version_info,
            resources = delta.resources.len(),
            removed = delta.removed_resources.len(),
            bytes = delta.bytes,
            "sending configuration"
        );
        let metrics = &self.plane.metrics;
        metrics.responses.inc();
        metrics.response_bytes.inc_by(delta.bytes as u64);
        self.pending = Some(Sent {
            nonce: nonce.clone(),
            revision: delta.system_version_info.parse().ok(),
            version: delta.system_version_info.clone(),
            keys,
            bundle,
        });
        let response = EncodedResponse(delta.encode(nonce));
        self.outbound.send(Ok(response)).await.is_ok()
    }

    async fn close(&self, status: Status) {
        let _ = self.outbound.send(Err(status)).await;
    }

    /// An ACK or NACK. One that answers no pending response (stale, or
    /// from a confused agent) changes nothing.
    fn answered(&mut self, request: DeltaRequest) {
        let Some(sent) = self.pending.take_if(|s| s.nonce == request.response_nonce) else {
            debug!(nonce = %request.response_nonce, "ignoring an answer to no pending response");
            return;
        };
        let node = self.subscription.node().to_owned();
        let node = node.as_str();
        let (agents, metrics) = (&self.plane.agents, &self.plane.metrics);
        match request.error_detail {
            None => {
                metrics.acks.inc();
                debug!(version = %sent.version, "agent acknowledged");
                if let Some(revision) = sent.revision.filter(|r| *r > self.synced_through) {
                    self.plane.pushed(self.synced_through, revision);
                    self.synced_through = revision;
                }
                agents.acked(node, &sent);
            }
            Some(error) => {
                metrics.nacks.inc();
                warn!(
                    version = %sent.version,
                    reason = %error.message,
                    resources = ?error.resources,
                    "agent rejected configuration"
                );
                if error.resources.is_empty() {
                    // Rejected whole: the agent still holds what it had.
                    self.subscription
                        .retry_with_next_change(sent.keys.iter().cloned());
                } else {
                    // Rejected in part: everything else took effect.
                    if let Some(revision) = sent.revision {
                        self.synced_through = self.synced_through.max(revision);
                    }
                    let applied = Sent {
                        keys: sent
                            .keys
                            .iter()
                            .filter(|k| !error.resources.contains(k))
                            .cloned()
                            .collect(),
                        ..sent
                    };
                    agents.acked(node, &applied);
                }
                agents.rejected(node, error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(version: &str, keys: &[&str]) -> Sent {
        Sent {
            nonce: "1".into(),
            version: version.into(),
            revision: version.parse().ok(),
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            bundle: None,
        }
    }

    #[test]
    fn a_rejection_stays_until_the_rejected_resource_is_accepted() {
        let agents = Agents::default();
        agents.connect("n1");
        agents.acked("n1", &sent("3", &[]));
        agents.rejected(
            "n1",
            pb::Status {
                message: "bad port".into(),
                resources: vec!["Service/default/a".into()],
            },
        );
        agents.acked("n1", &sent("5", &["Service/default/b"]));
        let s = &agents.snapshot()[0];
        assert_eq!(s.acked_version, "5");
        assert_eq!(
            s.last_error.as_ref().map(|e| e.message.as_str()),
            Some("bad port")
        );
        agents.acked("n1", &sent("6", &["Service/default/a"]));
        assert_eq!(agents.snapshot()[0].last_error, None);
        agents.disconnect("n1");
        assert!(!agents.snapshot()[0].connected);
    }
}
