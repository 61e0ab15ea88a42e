//! The control server (`mesh-control`): it owns the configuration, keeps it
//! in a durable store, turns it into what each node agent needs and streams
//! it to them, and serves the operator API that `meshctl` uses.
//!
//! ```text
//! meshctl --Operator.Apply--> resources::parse_documents   (no lock held)
//!                             store::State::plan_apply      (cross-resource checks)
//!                             store::Backend::commit        (WAL append + fsync, or one etcd txn)
//!                             distribution::View::apply     (endpoints, change log)
//!                             watch<revision> ----------------> one task per agent stream:
//!                                                               Subscription::next (diff),
//!                                                               send, wait for ACK/NACK
//! ```
//!
//! With a certificate authority ([`certs::Authority`]) the gRPC listener
//! speaks TLS ([`tls`]), serves `Certificates` too, and distributes the CA's
//! trust bundle; agents authenticate with their node certificates.
//!
//! Ports: gRPC (all services) on `--listen` (15012), the operator API alone
//! on a unix socket, `/metrics` and `/healthz/ready` on 15014.
pub mod auth;
pub mod ca_api;
pub mod certs;
pub mod distribution;
pub mod kubernetes;
pub mod operator;
pub mod resources;
pub mod rotation;
pub mod server;
pub mod store;
pub mod tls;

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use mesh_api::serve::{HANDSHAKE_TIMEOUT, accept_loop};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::watch,
    task::JoinSet,
};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Server, server::TcpIncoming};
use tracing::{info, warn};

use certs::Authority;
use distribution::View;
use mesh_api::pb::{certificates_server::CertificatesServer, operator_server::OperatorServer};
use resources::{Change, Kind, ResourceId};
use server::Agents;
use store::{
    Backend, Outcome, State, Store,
    etcd::{self, EtcdStore, Flow, Replicated},
};

/// Largest request the server reads: a big `apply`, or an agent's list of
/// what it holds. On the network listener the operator API checks the admin
/// token (an interceptor, on the headers) before any body is decoded.
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
const MAX_PENDING_RESETS: usize = 64;
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
const MAX_METRICS_CONNECTIONS: usize = 256;
/// How many recent commits the server remembers the time of, to time
/// pushes; an agent further behind is timed from the oldest one kept.
const COMMITS_KEPT: usize = 1024;
/// How often an apply through etcd may lose the race to another replica
/// before it is refused, and how long it waits each time for replication to
/// bring what won.
const COMMIT_ATTEMPTS: u32 = 16;
const CATCH_UP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Rejected(#[from] resources::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("{0} not found")]
    NotFound(String),
    #[error(
        "the apply lost the race to other replicas {attempts} times in a row; nothing was applied, try again"
    )]
    Contended { attempts: u32 },
    #[error(
        "another replica committed revision {stored}, which did not reach this replica in time; nothing was applied, try again"
    )]
    Behind { stored: u64 },
    #[error("{listener} stopped: {source}")]
    Serve {
        listener: &'static str,
        source: tonic::transport::Error,
    },
    #[error("{0} stopped unexpectedly")]
    Stopped(&'static str),
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error("certificate authority: {0}")]
    Authority(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotLabels {
    pub slot: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Metrics of the control server, prefix `mesh_control_`.
#[derive(Debug)]
pub struct Metrics {
    pub connected_agents: Gauge,
    /// Seconds from a commit to an agent's ACK of the response that brings
    /// it (see [`server`]).
    pub push_latency: Histogram,
    /// Applies refused, by [`resources::Error::reason`] (or `store`).
    pub apply_rejected: Family<ReasonLabels, Counter>,
    pub responses: Counter,
    pub response_bytes: Counter,
    pub acks: Counter,
    pub nacks: Counter,
    pub unauthenticated_streams: Counter,
    pub store_revision: Gauge,
    /// 1 while this replica is the etcd store's leader (always, with the
    /// file store: it is the only server).
    pub leader: Gauge,
    pub sign_refused: Family<ReasonLabels, Counter>,
    pub certificates_issued: Family<KindLabels, Counter>,
    pub tls_handshakes: Family<ResultLabels, Counter>,
    /// The signing CA's `not_after` (Unix seconds); 0 without a CA.
    pub ca_expiry: Gauge,
    /// CA rotation (see [`rotation`]): phase, live certificates by root
    /// slot, agents on the current bundle, revocations in force.
    pub ca_rotation_phase: Gauge,
    pub ca_live_certificates: Family<SlotLabels, Gauge>,
    pub ca_agents_on_bundle: Gauge,
    pub revocations: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connected_agents: Gauge::default(),
            // 1 ms doubling to about 33 s.
            push_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            apply_rejected: Family::default(),
            responses: Counter::default(),
            response_bytes: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            unauthenticated_streams: Counter::default(),
            store_revision: Gauge::default(),
            leader: Gauge::default(),
            sign_refused: Family::default(),
            certificates_issued: Family::default(),
            tls_handshakes: Family::default(),
            ca_expiry: Gauge::default(),
            ca_rotation_phase: Gauge::default(),
            ca_live_certificates: Family::default(),
            ca_agents_on_bundle: Gauge::default(),
            revocations: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("mesh_control");
        r.register(
            "connected_agents",
            "Agent streams open now",
            self.connected_agents.clone(),
        );
        r.register(
            "push_latency_seconds",
            "Time from a configuration change being committed to an agent acknowledging the response that brings it (timed from the oldest change a response carries)",
            self.push_latency.clone(),
        );
        r.register(
            "apply_rejected",
            "Applies refused by the operator API, by reason (parse, empty, unknown_kind, invalid, duplicate, conflict, broken_reference, store)",
            self.apply_rejected.clone(),
        );
        r.register(
            "responses",
            "Delta responses sent to agents",
            self.responses.clone(),
        );
        r.register(
            "response_bytes",
            "Encoded size of the resources and removals sent to agents",
            self.response_bytes.clone(),
        );
        r.register("acks", "Responses agents acknowledged", self.acks.clone());
        r.register(
            "nacks",
            "Responses agents rejected (see meshctl agents for why)",
            self.nacks.clone(),
        );
        r.register(
            "unauthenticated_streams",
            "Agent streams refused for missing or wrong credentials",
            self.unauthenticated_streams.clone(),
        );
        r.register(
            "store_revision",
            "Revision of the stored configuration",
            self.store_revision.clone(),
        );
        r.register(
            "leader",
            "1 while this replica leads (with --store etcd://: it compacts etcd's history; the file store's only server always leads)",
            self.leader.clone(),
        );
        r.register(
            "sign_refused",
            "Signing requests refused, by reason (not_on_node, other_node, reserved_identity, foreign_trust_domain, invalid_identity, csr_mismatch, bad_csr, unauthenticated)",
            self.sign_refused.clone(),
        );
        r.register(
            "certificates_issued",
            "Certificates issued, by kind (workload, node)",
            self.certificates_issued.clone(),
        );
        r.register(
            "ca_expiry_timestamp_seconds",
            "When the signing CA's certificate expires (Unix seconds; 0 when this server has no CA)",
            self.ca_expiry.clone(),
        );
        r.register(
            "ca_rotation_phase",
            "Phase of the CA rotation: 0 Idle, 1 BundleDistributed, 2 Signing, 3 Retiring, 4 RollingBack",
            self.ca_rotation_phase.clone(),
        );
        r.register(
            "ca_live_certificates",
            "Unexpired certificates issued under each root in service (slot current or next), newest per identity and node",
            self.ca_live_certificates.clone(),
        );
        r.register(
            "ca_agents_on_bundle",
            "Connected agents that acknowledged the trust bundle distributed now (updated every second)",
            self.ca_agents_on_bundle.clone(),
        );
        r.register(
            "revocations",
            "Revoked identities and nodes",
            self.revocations.clone(),
        );
        r.register(
            "tls_handshakes",
            "TLS handshakes on the gRPC listener, by result (ok, failed)",
            self.tls_handshakes.clone(),
        );
    }
}

/// Result of an apply.
#[derive(Debug)]
pub struct Applied {
    pub outcomes: Vec<(ResourceId, Outcome)>,
    pub revision: u64,
}

/// The shared state of the server: store, agents' view, agent registry.
#[derive(Debug)]
pub struct ControlPlane {
    store: Mutex<Backend>,
    view: RwLock<View>,
    revision: watch::Sender<u64>,
    agents: Agents,
    metrics: Metrics,
    commits: Mutex<Commits>,
    authority: Option<Arc<Authority>>,
    /// Bumped when the trust bundle changes outside the store's revisions.
    trust_pushes: watch::Sender<u64>,
}

/// When the most recent revisions were committed (at most [`COMMITS_KEPT`]),
/// oldest first.
#[derive(Debug, Default)]
struct Commits(VecDeque<(u64, Instant)>);

impl Commits {
    fn record(&mut self, revision: u64, at: Instant) {
        if self.0.len() == COMMITS_KEPT {
            self.0.pop_front();
        }
        self.0.push_back((revision, at));
    }

    /// When the oldest kept revision in `after+1..=through` was committed.
    fn first_after(&self, after: u64, through: u64) -> Option<Instant> {
        let i = self.0.partition_point(|(revision, _)| *revision <= after);
        self.0
            .get(i)
            .filter(|(revision, _)| *revision <= through)
            .map(|(_, at)| *at)
    }
}

/// A panic while a lock was held is a bug that was already reported; keep
/// serving rather than failing every later call.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ControlPlane {
    /// Opens the store in `store_dir`, compacting its log every
    /// `compact_after` transactions.
    pub fn open(store_dir: &Path, compact_after: usize) -> Result<ControlPlane, Error> {
        Self::open_with_authority(store_dir, compact_after, || Ok(None))
    }

    /// [`open`](Self::open), with a certificate authority: the server then
    /// signs certificates, distributes its trust bundle and serves TLS.
    /// `authority` runs once the store is open (and locked), so it may keep
    /// its files in the store's directory.
    pub fn open_with_authority(
        store_dir: &Path,
        compact_after: usize,
        authority: impl FnOnce() -> Result<Option<Authority>, String>,
    ) -> Result<ControlPlane, Error> {
        let store = Store::open(store_dir, compact_after)?;
        Self::with_backend(Backend::File(store), authority)
    }

    /// Serves the state in etcd, shared with other replicas: commits of the
    /// others reach this one's agents through [`replicate`](Self::replicate),
    /// and the replica takes part in the leader election (see
    /// [`etcd::lead`]). Runs its tasks on the current runtime for as long as
    /// the control plane lives.
    pub fn open_etcd(
        store: EtcdStore,
        authority: Option<Authority>,
    ) -> Result<Arc<ControlPlane>, Error> {
        let client = store.client();
        let keys = store.keys().clone();
        let from = store.loaded_at() + 1;
        let plane = Arc::new(Self::with_backend(Backend::Etcd(Box::new(store)), || {
            Ok(authority)
        })?);
        plane.metrics.leader.set(0);
        let weak = Arc::downgrade(&plane);
        tokio::spawn(etcd::replicate(
            client.clone(),
            keys.clone(),
            from,
            move |replicated| match weak.upgrade() {
                Some(plane) => plane.replicate(replicated),
                None => Flow::Stop,
            },
        ));
        let weak = Arc::downgrade(&plane);
        let id = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        tokio::spawn(etcd::lead(
            client,
            keys,
            id,
            plane.metrics.leader.clone(),
            move || weak.strong_count() > 0,
        ));
        Ok(plane)
    }

    /// A control plane over `store`; `authority` runs once the store is
    /// open.
    fn with_backend(
        store: Backend,
        authority: impl FnOnce() -> Result<Option<Authority>, String>,
    ) -> Result<ControlPlane, Error> {
        let authority = authority().map_err(Error::Authority)?;
        let state = store.state();
        let revision = state.revision();
        let mut view = View::new(
            revision,
            state.iter().map(|s| &s.resource),
            distribution::DEFAULT_CHANGE_LOG_KEYS,
        );
        if let Some(authority) = &authority {
            let (bundle, roots) = authority.trust_material();
            authority.note_bundle(view.set_trust_bundle(bundle), roots);
        }
        let metrics = Metrics::default();
        metrics.store_revision.set(revision_gauge(revision));
        metrics.leader.set(1);
        if let Some(authority) = &authority {
            let expiry = authority
                .ca_not_after()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            metrics
                .ca_expiry
                .set(i64::try_from(expiry).unwrap_or(i64::MAX));
        }
        Ok(ControlPlane {
            store: Mutex::new(store),
            view: RwLock::new(view),
            revision: watch::Sender::new(revision),
            agents: Agents::default(),
            metrics,
            commits: Mutex::default(),
            authority: authority.map(Arc::new),
            trust_pushes: watch::Sender::new(0),
        })
    }

    pub fn authority(&self) -> Option<&Authority> {
        self.authority.as_deref()
    }

    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    pub(crate) fn view(&self) -> RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// An agent that held revision `after` acknowledged a response that
    /// completes `through`: times it from the first change it brought, if
    /// that commit is still remembered (it was made since this server
    /// started).
    pub(crate) fn pushed(&self, after: u64, through: u64) {
        let committed = lock(&self.commits).first_after(after, through);
        if let Some(committed) = committed {
            self.metrics
                .push_latency
                .observe(committed.elapsed().as_secs_f64());
        }
    }

    /// Parses, validates and applies YAML documents as one transaction.
    /// Blocks on the disk: call it off the async runtime.
    pub fn apply(&self, yaml: &str, dry_run: bool) -> Result<Applied, Error> {
        let applied = self.try_apply(yaml, dry_run);
        if let Err(e) = &applied {
            let reason = match e {
                Error::Rejected(rejected) => rejected.reason(),
                // Past the checks, an apply fails only in the store.
                _ => "store",
            };
            self.metrics
                .apply_rejected
                .get_or_create(&ReasonLabels { reason })
                .inc();
        }
        applied
    }

    fn try_apply(&self, yaml: &str, dry_run: bool) -> Result<Applied, Error> {
        let batch = resources::parse_documents(yaml)?;
        let (revision, outcomes) = self.transact(dry_run, |state| {
            let plan = state.plan_apply(batch.clone())?;
            Ok((plan.changes, plan.outcomes))
        })?;
        Ok(Applied { outcomes, revision })
    }

    /// Deletes one resource. Blocks on the disk (or etcd).
    pub fn delete(&self, id: &ResourceId) -> Result<u64, Error> {
        let (revision, ()) = self.transact(false, |state| {
            if state.get(id).is_none() {
                return Err(Error::NotFound(id.to_string()));
            }
            Ok((vec![Change::Delete(id.clone())], ()))
        })?;
        Ok(revision)
    }

    /// Plans against the state and commits what the plan changes. In etcd,
    /// a commit that lost the race to another replica changed nothing: this
    /// replica waits until replication brings it what won, and plans again,
    /// up to [`COMMIT_ATTEMPTS`] times.
    fn transact<T>(
        &self,
        dry_run: bool,
        plan: impl Fn(&State) -> Result<(Vec<Change>, T), Error>,
    ) -> Result<(u64, T), Error> {
        for _ in 0..COMMIT_ATTEMPTS {
            let mut store = lock(&self.store);
            let (changes, planned) = plan(store.state())?;
            if dry_run || changes.is_empty() {
                return Ok((store.state().revision(), planned));
            }
            let stored = match self.commit(&mut store, &changes) {
                Ok(revision) => return Ok((revision, planned)),
                Err(Error::Store(store::Error::Etcd(etcd::Error::Conflict { stored, .. }))) => {
                    stored
                }
                Err(e) => return Err(e),
            };
            let Backend::Etcd(etcd) = &*store else {
                unreachable!("only etcd commits conflict")
            };
            let runtime = etcd.runtime().clone();
            drop(store);
            let mut revision = self.subscribe();
            let caught_up = runtime.block_on(async {
                tokio::time::timeout(CATCH_UP, revision.wait_for(|r| *r >= stored)).await
            });
            if !matches!(caught_up, Ok(Ok(_))) {
                return Err(Error::Behind { stored });
            }
        }
        Err(Error::Contended {
            attempts: COMMIT_ATTEMPTS,
        })
    }

    /// Stored resources as Kubernetes-style documents. `None` namespace: all
    /// namespaces; `None` name: all of the kind. Naming one that does not
    /// exist is an error.
    pub fn get(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, Error> {
        let store = lock(&self.store);
        let documents: Vec<serde_json::Value> = store
            .state()
            .of_kind(kind, namespace)
            .filter(|s| name.is_none_or(|n| s.resource.id().name == n))
            .map(|s| s.resource.to_document(s.version))
            .collect();
        if let Some(name) = name
            && documents.is_empty()
        {
            return Err(Error::NotFound(format!(
                "{kind}/{}/{name}",
                namespace.unwrap_or(if kind.is_cluster_scoped() { "" } else { "*" })
            )));
        }
        Ok(documents)
    }

    /// Commits under the store lock, then updates the view before the lock
    /// is released, so views change in revision order.
    fn commit(&self, store: &mut Backend, changes: &[Change]) -> Result<u64, Error> {
        let revision = store.commit(changes)?;
        self.publish(revision, changes);
        Ok(revision)
    }

    /// Applies what another replica committed, as a local commit would
    /// (without writing): the state, the view, the agents' revision watch.
    /// A revision this replica already holds (its own commit, seen again by
    /// its watch) is skipped.
    pub(crate) fn replicate(&self, replicated: Replicated) -> Flow {
        let mut store = lock(&self.store);
        let Backend::Etcd(etcd) = &mut *store else {
            return Flow::Stop;
        };
        let held = etcd.state().revision();
        match replicated {
            Replicated::Transaction { revision, .. } if revision <= held => Flow::Applied,
            Replicated::Transaction { revision, .. } if revision != held + 1 => Flow::Gap,
            Replicated::Transaction { revision, changes } => {
                etcd.replicated(revision, &changes);
                self.publish(revision, &changes);
                Flow::Applied
            }
            Replicated::Reload(state) => {
                let revision = state.revision();
                let changes = etcd.state().diff(&state);
                if revision > held {
                    etcd.reloaded(state);
                    self.publish(revision, &changes);
                } else if !changes.is_empty() {
                    // etcd was restored from an older backup, or wiped: the
                    // revisions agents hold mean something else now.
                    warn!(
                        held,
                        stored = revision,
                        "etcd holds other resources at an older or equal revision; restart every replica"
                    );
                }
                Flow::Applied
            }
        }
    }

    /// A committed (or replicated) transaction reaches the view and the
    /// agents' streams. Called under the store lock.
    fn publish(&self, revision: u64, changes: &[Change]) {
        lock(&self.commits).record(revision, Instant::now());
        self.view
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(revision, changes);
        self.metrics.store_revision.set(revision_gauge(revision));
        self.revision.send_replace(revision);
        info!(revision, changes = changes.len(), "configuration changed");
    }

    /// Makes the stored resources of `kinds` exactly `desired`, as one
    /// transaction checked as an apply is (the Kubernetes source's sync, see
    /// [`kubernetes::plan_replace`]). Blocks on the disk (or etcd).
    pub fn replace_kinds(
        &self,
        kinds: &[Kind],
        desired: Vec<resources::Resource>,
    ) -> Result<u64, Error> {
        let (revision, ()) = self.transact(false, |state| {
            Ok((kubernetes::plan_replace(state, kinds, &desired)?, ()))
        })?;
        Ok(revision)
    }
}

fn revision_gauge(revision: u64) -> i64 {
    i64::try_from(revision).unwrap_or(i64::MAX)
}

/// Where the server listens; each is optional.
#[derive(Debug, Default)]
pub struct Listeners {
    /// Both services; the operator API there needs the admin token.
    pub grpc: Option<TcpListener>,
    /// The operator API only, for local operators.
    pub operator_socket: Option<UnixListener>,
    /// `/metrics` and `/healthz/ready`.
    pub metrics: Option<TcpListener>,
}

/// Who may talk to the server.
#[derive(Debug, Default)]
pub struct Access {
    pub tokens: auth::Tokens,
    pub admin_token: Option<String>,
    /// Kinds the operator API refuses to apply or delete: in Kubernetes
    /// mode, those that come from the API server ([`kubernetes::KINDS`]).
    pub from_kubernetes: Vec<Kind>,
}

/// Serves until `shutdown` completes, then closes agent streams (they
/// resubscribe elsewhere or later) and drains connections.
pub async fn serve(
    plane: Arc<ControlPlane>,
    access: Access,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let (stop_tx, stop) = watch::channel(false);
    let stopped = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let mut tasks: JoinSet<Result<(), Error>> = JoinSet::new();
    if let Some(listener) = listeners.grpc {
        let distribution = server::DistributionServer::new(server::DistributionService::new(
            plane.clone(),
            access.tokens.clone(),
            stop.clone(),
        ));
        let operator = tonic::service::interceptor::InterceptedService::new(
            OperatorServer::new(
                operator::OperatorService::new(plane.clone())
                    .refusing(access.from_kubernetes.clone()),
            )
            .max_decoding_message_size(MAX_REQUEST_BYTES),
            auth::admin_only(access.admin_token),
        );
        let signal = stopped(stop.clone());
        let serve_error = |source| Error::Serve {
            listener: "gRPC listener",
            source,
        };
        let router = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // Bounds per connection: streams at once, streams reset before
            // the server saw them (HTTP/2 rapid reset), header size.
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
            .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
            .add_service(distribution)
            .add_service(operator);
        match plane.authority.clone() {
            Some(authority) => {
                let cert = tls::ServerCert::issue(&authority)?;
                let config = tls::live_server_config(cert.clone(), authority.clone())?;
                let renewal = tokio::spawn(cert.renew(authority));
                let rotation = tokio::spawn(ca_api::drive(plane.clone()));
                let certificates = CertificatesServer::new(certs::CertificatesService::new(
                    plane.clone(),
                    access.tokens,
                ));
                let incoming =
                    tls::incoming(listener, config, plane.metrics.tls_handshakes.clone());
                tasks.spawn(async move {
                    let served = router
                        .add_service(certificates)
                        .serve_with_incoming_shutdown(incoming, signal)
                        .await
                        .map_err(serve_error);
                    renewal.abort();
                    rotation.abort();
                    served
                });
            }
            None => {
                let incoming = TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(Duration::from_secs(60)));
                tasks.spawn(async move {
                    router
                        .serve_with_incoming_shutdown(incoming, signal)
                        .await
                        .map_err(serve_error)
                });
            }
        }
    }
    if let Some(listener) = listeners.operator_socket {
        let operator = OperatorServer::new(
            operator::OperatorService::new(plane.clone()).refusing(access.from_kubernetes.clone()),
        )
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let signal = stopped(stop.clone());
        tasks.spawn(async move {
            Server::builder()
                .add_service(operator)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal)
                .await
                .map_err(|source| Error::Serve {
                    listener: "operator socket",
                    source,
                })
        });
    }
    if let Some(listener) = listeners.metrics {
        let mut registry = Registry::default();
        plane.metrics.register(&mut registry);
        tasks.spawn(serve_metrics(
            listener,
            Arc::new(registry),
            stopped(stop.clone()),
        ));
    }

    let early = tokio::select! {
        () = shutdown => None,
        Some(ended) = tasks.join_next() => Some(ended),
    };
    info!("shutting down");
    stop_tx.send_replace(true);
    let mut result = match early {
        None => Ok(()),
        Some(Ok(Ok(()))) => Err(Error::Stopped("a listener")),
        Some(Ok(Err(e))) => Err(e),
        Some(Err(e)) => {
            warn!(error = %e, "listener task failed");
            Err(Error::Stopped("a listener"))
        }
    };
    while let Some(ended) = tasks.join_next().await {
        if let Ok(Err(e)) = ended {
            warn!(error = %e, "while shutting down");
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result
}

async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    stopped: impl Future<Output = ()>,
) -> Result<(), Error> {
    let serve = accept_loop(
        "metrics",
        listener,
        MAX_METRICS_CONNECTIONS,
        move |stream, _| {
            let registry = registry.clone();
            async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let registry = registry.clone();
                    async move { Ok::<_, Infallible>(telemetry(&req, &registry)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        },
    );
    tokio::select! {
        () = stopped => Ok(()),
        () = serve => Ok(()),
    }
}

fn telemetry(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/healthz/ready" => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::from(body))
        .expect("static response parts")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_is_timed_from_the_first_commit_it_brings_and_old_commits_are_forgotten() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut commits = Commits::default();
        for revision in 1..=3 {
            commits.record(revision, at(revision * 10));
        }
        assert_eq!(commits.first_after(1, 3), Some(at(20)));
        assert_eq!(commits.first_after(0, 1), Some(at(10)));
        assert_eq!(commits.first_after(3, 4), None, "not committed yet");
        assert_eq!(commits.first_after(2, 2), None, "nothing new");

        for revision in 4..=COMMITS_KEPT as u64 + 10 {
            commits.record(revision, at(revision * 10));
        }
        assert_eq!(commits.0.len(), COMMITS_KEPT);
        assert_eq!(
            commits.first_after(1, 20),
            Some(at(110)),
            "an agent further behind is timed from the oldest commit kept"
        );
    }
}
