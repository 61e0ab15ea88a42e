//! The agent's certificate manager: a certificate for every identity that a
//! Workload of this node runs as, and the node's own certificate, with which
//! the agent authenticates to the control server.
//!
//! ```text
//! state::State --(Workloads of this node)--> wanted identities
//!   new:     key + CSR -> Certificates.Sign -> CertStore      (at once, before traffic)
//!   held:    renewed at half of its lifetime
//!   failing: retried with exponential backoff and jitter; the certificate
//!            held keeps serving until it expires, then it is dropped
//!   gone:    dropped from the store
//! the node:  Certificates.SignNode (bootstrap token the first time) -> NodeCert
//! TrustBundle resource --> TlsMaterial::bundle
//! ```
//!
//! With a cache directory, every certificate and key is kept in
//! `<cache>/identity/` (files 0600), so an agent restarted while the control
//! server is down still holds its unexpired certificates.
//!
//! When the trust bundle changes (a new CA), certificates that no longer
//! chain to it are renewed at once, and so are those that do not chain to
//! its signing root when it asks for a forced renewal (a CA rotation or its
//! rollback); a node certificate that chains neither to the `--ca-bundle`
//! file nor to the distributed bundle is dropped by the connector, so the
//! agent falls back to its bootstrap token. The distributed bundle is also
//! what the connector trusts the control server with, besides the file, and
//! its revocation list goes to the tunnel ([`crate::revocation`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use rand::Rng;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::sync::watch;
use tonic::{service::interceptor::InterceptedService, transport::Channel};
use tracing::{info, warn};

use mesh_api::{
    admin::{CertStatus, IdentityStatus, Source},
    client::{AgentConnector, Bearer},
    identity::{CertStore, SpiffeId, chains_to, generate_key_and_csr, spiffe_id_of, validity},
    pb::{SignNodeRequest, SignRequest, certificates_client::CertificatesClient},
};

use crate::{
    revocation::{Revoked, RevokedRx},
    state::{State, StateRx},
};

/// How long one signing call may take.
const SIGN_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Signing calls in flight at once.
const CONCURRENT_SIGNS: usize = 16;
/// Certificates are issued backdated by this much (the CA's clock-skew
/// allowance); a certificate loaded from disk counts its lifetime from here.
const BACKDATED: Duration = Duration::from_secs(60);
const IDENTITY_DIR: &str = "identity";

/// What the data path needs for mutual TLS. Clones share everything.
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    /// A certificate per identity of this node's Workloads, kept current.
    pub store: CertStore,
    /// The trust bundle (PEM) peers are verified against: the distributed
    /// `TrustBundle`, or until it arrives the `--ca-bundle` file.
    pub bundle: watch::Receiver<Option<Arc<str>>>,
    pub trust_domain: String,
    /// Identities and nodes the tunnel refuses.
    pub revoked: RevokedRx,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Metrics of the manager, prefix `mesh_agent_`.
#[derive(Debug, Default)]
pub struct Metrics {
    renewals: Family<ResultLabels, Counter>,
    certificates: Gauge,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("mesh_agent");
        r.register(
            "cert_renewals",
            "Certificate requests to the control server (first issue and renewals, node and workloads), by result (success, failure)",
            self.renewals.clone(),
        );
        r.register(
            "certificates",
            "Unexpired workload certificates held",
            self.certificates.clone(),
        );
    }
}

/// The `identity` block of the admin API's `/status`, kept current.
pub type SharedStatus = Arc<Mutex<IdentityStatus>>;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[derive(Debug)]
struct Entry {
    validity: Option<(SystemTime, SystemTime)>,
    /// The chain held (PEM), to check against a new trust bundle.
    chain: Option<String>,
    /// Next attempt to obtain a certificate.
    due: SystemTime,
    last_renewal: Option<SystemTime>,
    renewals: u64,
    failures: u32,
    last_error: Option<String>,
    source: Source,
    /// The `not_after` of the certificate already warned about as expiring.
    warned: Option<SystemTime>,
}

/// A certificate held with less than this share of its lifetime left has
/// missed every renewal since half-life: warned about, once.
const WARN_SHARE: u32 = 4;

/// When a certificate valid over `validity` is due a warning: a quarter of
/// its lifetime before it ends (renewal is at half-life, so by then several
/// attempts have failed).
fn warn_at((not_before, not_after): (SystemTime, SystemTime)) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_after - life / WARN_SHARE
}

impl Entry {
    fn new() -> Entry {
        Entry {
            validity: None,
            chain: None,
            due: SystemTime::now(),
            last_renewal: None,
            renewals: 0,
            failures: 0,
            last_error: None,
            source: Source::None,
            warned: None,
        }
    }

    /// The time left, when this certificate is in its warning window and
    /// was not warned about yet (then it counts as warned).
    fn expiring(&mut self, now: SystemTime) -> Option<Duration> {
        let validity = self.validity?;
        if self.warned == Some(validity.1) || now < warn_at(validity) {
            return None;
        }
        self.warned = Some(validity.1);
        Some(validity.1.duration_since(now).unwrap_or_default())
    }

    /// The next instant this entry needs the loop: its renewal, its
    /// warning, its expiry.
    fn wake(&self) -> SystemTime {
        let mut next = self.due;
        if let Some(v) = self.validity {
            next = next.min(v.1);
            if self.warned != Some(v.1) {
                next = next.min(warn_at(v));
            }
        }
        next
    }

    /// Renewal at half of the lifetime that is left from `from`.
    fn held(&mut self, not_before: SystemTime, not_after: SystemTime, from: SystemTime) {
        self.validity = Some((not_before, not_after));
        let left = not_after.duration_since(from).unwrap_or_default();
        self.due = from + left / 2;
    }

    fn status(&self, id: &SpiffeId) -> CertStatus {
        CertStatus {
            identity: id.to_string(),
            not_before_unix: self.validity.map(|(nb, _)| unix(nb)),
            not_after_unix: self.validity.map(|(_, na)| unix(na)),
            last_renewal_unix: self.last_renewal.map(unix),
            next_renewal_unix: Some(unix(self.due)),
            renewals: self.renewals,
            failures: self.failures,
            last_error: self.last_error.clone(),
            source: self.source,
        }
    }
}

pub struct Settings {
    pub node: String,
    /// Where certificates are kept across restarts (`<cache>/identity`).
    pub cache_dir: Option<PathBuf>,
}

/// Keeps this node's certificates current; see the module documentation.
pub struct Manager {
    node: String,
    connector: Arc<AgentConnector>,
    config: StateRx,
    store: CertStore,
    bundle: watch::Sender<Option<Arc<str>>>,
    /// The bundle (roots, signing root, forced renewal) the held
    /// certificates were last checked against.
    checked_against: Option<String>,
    /// The root new certificates chain to, and whether the control server
    /// asks that every other certificate be renewed now.
    signing: Option<(String, bool)>,
    revoked: watch::Sender<Arc<Revoked>>,
    dir: Option<PathBuf>,
    node_entry: Entry,
    entries: BTreeMap<SpiffeId, Entry>,
    metrics: Arc<Metrics>,
    status: SharedStatus,
}

type Client = CertificatesClient<InterceptedService<Channel, Bearer>>;

impl Manager {
    /// Loads the certificates kept in the cache (the node's goes to the
    /// connector at once, so the first connection presents it) and returns
    /// the data path's handle and the status for `/status`.
    pub fn new(
        settings: Settings,
        connector: Arc<AgentConnector>,
        config: StateRx,
    ) -> (Manager, TlsMaterial, SharedStatus) {
        let trust_domain = connector.trust_domain().to_owned();
        let initial_bundle = config.borrow().trust_bundle().map(Arc::from).or_else(|| {
            let path = connector.ca_bundle()?;
            fs::read_to_string(path).ok().map(Arc::from)
        });
        let (bundle, bundle_rx) = watch::channel(initial_bundle);
        let (revoked, revoked_rx) = watch::channel(Arc::new(Revoked::default()));
        let status = SharedStatus::default();
        let store = CertStore::new();
        let mut manager = Manager {
            node: settings.node,
            connector,
            config,
            store: store.clone(),
            bundle,
            checked_against: None,
            signing: None,
            revoked,
            dir: settings.cache_dir.map(|d| d.join(IDENTITY_DIR)),
            node_entry: Entry::new(),
            entries: BTreeMap::new(),
            metrics: Arc::default(),
            status: status.clone(),
        };
        manager.load();
        manager.publish();
        let material = TlsMaterial {
            store,
            bundle: bundle_rx,
            trust_domain,
            revoked: revoked_rx,
        };
        (manager, material, status)
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Runs forever.
    pub async fn run(mut self) {
        let mut config_open = true;
        loop {
            let config = self.config.borrow_and_update().clone();
            self.reconcile(&config);
            self.check_chains();
            self.warn_expiring();
            self.expire();
            self.renew_due().await;
            self.publish();
            let wake = self.next_due();
            let sleep = tokio::time::sleep(
                wake.duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(Duration::from_millis(10)),
            );
            tokio::select! {
                changed = self.config.changed(), if config_open => {
                    config_open = changed.is_ok();
                }
                () = sleep => {}
            }
        }
    }

    fn node_id(&self) -> SpiffeId {
        self.connector.node_cert().identity().clone()
    }

    /// Follows the configuration: identities to obtain, identities to drop,
    /// the trust bundle.
    fn reconcile(&mut self, config: &State) {
        // A Workload without a valid identity was reported when the state
        // was built.
        let wanted: BTreeSet<SpiffeId> = config
            .local_workloads()
            .filter_map(|w| w.identity.clone())
            .collect();
        for id in &wanted {
            if !self.entries.contains_key(id) {
                info!(identity = %id, "a workload of this node runs as a new identity");
                self.entries.insert(id.clone(), Entry::new());
            }
        }
        let gone: Vec<SpiffeId> = self
            .entries
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            info!(identity = %id, "no workload of this node runs as this identity any more; dropping its certificate");
            self.store.remove(&id);
            self.entries.remove(&id);
            self.forget(&id);
        }
        if let Some(material) = trust_material(config) {
            let revoked = Revoked::from_bundle(material, config);
            self.revoked.send_if_modified(|r| {
                let changed = **r != revoked;
                if changed {
                    info!(nodes = ?revoked.nodes().collect::<Vec<_>>(), "revocation list changed");
                    *r = Arc::new(revoked);
                }
                changed
            });
            self.signing = Some((material.signing_pem.clone(), material.force_renew))
                .filter(|(pem, _)| !pem.is_empty());
        }
        if let Some(pem) = config.trust_bundle() {
            self.connector.set_distributed_bundle(pem);
            self.bundle.send_if_modified(|b| {
                let changed = b.as_deref() != Some(pem);
                if changed {
                    info!("trust bundle received");
                    *b = Some(Arc::from(pem));
                }
                changed
            });
        }
    }

    /// After a change of CA: renews at once what no longer chains to the
    /// trust bundle, and notices a node certificate the connector dropped.
    fn check_chains(&mut self) {
        if self.node_entry.validity.is_some() && self.connector.node_cert().not_after().is_none() {
            let id = self.node_id();
            self.forget(&id);
            let e = &mut self.node_entry;
            e.validity = None;
            e.chain = None;
            e.source = Source::None;
            e.due = SystemTime::now();
        }
        let bundle = self.bundle.borrow().clone();
        let Some(bundle) = bundle else {
            return;
        };
        let forced = self
            .signing
            .as_ref()
            .filter(|(_, force)| *force)
            .map(|(pem, _)| pem.clone());
        let checked = format!("{bundle}\n{}", forced.as_deref().unwrap_or(""));
        if self.checked_against.as_ref() == Some(&checked) {
            return;
        }
        let node_id = self.node_id();
        let entries = self
            .entries
            .iter_mut()
            .chain(std::iter::once((&node_id, &mut self.node_entry)));
        for (id, e) in entries {
            let Some(chain) = &e.chain else {
                continue;
            };
            if !chains_to(chain, &bundle) {
                warn!(identity = %id, "certificate does not chain to the trust bundle (a new CA?); renewing it now");
                e.due = SystemTime::now();
            } else if let Some(signing) = &forced
                && !chains_to(chain, signing)
            {
                info!(identity = %id, "the control server asks for certificates of its signing root now (CA rotation); renewing");
                e.due = SystemTime::now();
            }
        }
        self.checked_against = Some(checked);
    }

    /// Drops certificates that expired without a renewal: peers would refuse them.
    fn expire(&mut self) {
        let now = SystemTime::now();
        let expired = |e: &Entry| e.validity.is_some_and(|(_, na)| na <= now);
        if expired(&self.node_entry) {
            warn!(
                "the node certificate expired; the bootstrap token is used until a new one arrives"
            );
            self.connector.node_cert().remove();
            let id = self.node_id();
            self.forget(&id);
            let e = &mut self.node_entry;
            e.validity = None;
            e.chain = None;
            e.source = Source::None;
            e.due = now;
        }
        let ids: Vec<SpiffeId> = self
            .entries
            .iter()
            .filter(|(_, e)| expired(e))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            warn!(identity = %id, "certificate expired before it could be renewed; dropping it");
            self.store.remove(&id);
            self.forget(&id);
            if let Some(e) = self.entries.get_mut(&id) {
                e.validity = None;
                e.chain = None;
                e.source = Source::None;
                e.due = now;
            }
        }
    }

    fn next_due(&self) -> SystemTime {
        self.entries
            .values()
            .map(Entry::wake)
            .fold(self.node_entry.wake(), SystemTime::min)
    }

    /// Warns, once per certificate, about one that is close to expiring
    /// without a renewal: when it expires, its pods' mTLS stops.
    fn warn_expiring(&mut self) {
        let now = SystemTime::now();
        if let Some(left) = self.node_entry.expiring(now) {
            warn!(?left, failures = self.node_entry.failures, last_error = ?self.node_entry.last_error,
                "the node certificate expires soon and has not been renewed");
        }
        for (id, e) in &mut self.entries {
            if let Some(left) = e.expiring(now) {
                warn!(identity = %id, ?left, failures = e.failures, last_error = ?e.last_error,
                    "certificate expires soon and has not been renewed: its workloads lose mTLS when it does");
            }
        }
    }

    /// Asks for every certificate that is due: the node's first, so that
    /// the others go out authenticated by it when it is new.
    async fn renew_due(&mut self) {
        let now = SystemTime::now();
        let node_due = self.node_entry.due <= now;
        let due: Vec<SpiffeId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.due <= now)
            .map(|(id, _)| id.clone())
            .collect();
        if !node_due && due.is_empty() {
            return;
        }
        let client = match self.connector.connect().await {
            Ok((channel, credentials)) => {
                CertificatesClient::with_interceptor(channel, credentials)
            }
            Err(e) => {
                let why = format!("{e:#}");
                let why =
                    std::error::Error::source(&e).map_or(why.clone(), |s| format!("{why}: {s}"));
                if node_due {
                    let id = self.node_id();
                    self.failed(None, &id, why.clone());
                }
                for id in due {
                    self.failed(Some(id.clone()), &id, why.clone());
                }
                return;
            }
        };
        if node_due {
            let id = self.node_id();
            let result = sign(client.clone(), id.clone(), Some(self.node.clone())).await;
            self.finish(None, &id, result);
        }
        let results: Vec<(SpiffeId, SignResult)> = futures::stream::iter(due)
            .map(|id| {
                let client = client.clone();
                async move {
                    let result = sign(client, id.clone(), None).await;
                    (id, result)
                }
            })
            .buffer_unordered(CONCURRENT_SIGNS)
            .collect()
            .await;
        for (id, result) in results {
            // The workload may have gone while the request was out.
            if self.entries.contains_key(&id) {
                self.finish(Some(id.clone()), &id, result);
            }
        }
    }

    /// `key`: `None` for the node certificate.
    fn finish(&mut self, key: Option<SpiffeId>, id: &SpiffeId, result: SignResult) {
        let installed = result.and_then(|(chain, key_der)| {
            let (not_before, not_after) = validity(&chain)?;
            match &key {
                None => {
                    self.connector
                        .node_cert()
                        .install(&chain, key_der.clone_key())?;
                }
                Some(_) => {
                    let named = self
                        .store
                        .insert(&chain, key_der.clone_key())
                        .map_err(|e| e.to_string())?;
                    if &named != id {
                        return Err(format!("the control server sent a certificate for {named}"));
                    }
                }
            }
            self.keep(id, &chain, &key_der);
            Ok((not_before, not_after, chain))
        });
        match installed {
            Ok((not_before, not_after, chain)) => {
                self.metrics
                    .renewals
                    .get_or_create(&ResultLabels { result: "success" })
                    .inc();
                let now = SystemTime::now();
                let entry = self.entry(key.as_ref());
                entry.held(not_before, not_after, now);
                entry.chain = Some(chain);
                entry.last_renewal = Some(now);
                entry.renewals += 1;
                entry.failures = 0;
                entry.last_error = None;
                entry.source = Source::Control;
                let renew_at = unix(entry.due);
                info!(identity = %id, not_after = unix(not_after), renew_at, "certificate obtained");
            }
            Err(why) => self.failed(key, id, why),
        }
    }

    fn failed(&mut self, key: Option<SpiffeId>, id: &SpiffeId, why: String) {
        self.metrics
            .renewals
            .get_or_create(&ResultLabels { result: "failure" })
            .inc();
        let entry = self.entry(key.as_ref());
        entry.failures = entry.failures.saturating_add(1);
        let exp = entry.failures.saturating_sub(1).min(16);
        let backoff = BACKOFF_MIN
            .saturating_mul(1 << exp)
            .min(BACKOFF_MAX)
            .mul_f64(rand::rng().random_range(0.5..1.5));
        entry.due = SystemTime::now() + backoff;
        let held = entry.validity.map(|(_, na)| unix(na));
        warn!(identity = %id, error = %why, failures = entry.failures, retry_in = ?backoff, held_until = ?held, "obtaining a certificate failed");
        entry.last_error = Some(why);
    }

    fn entry(&mut self, key: Option<&SpiffeId>) -> &mut Entry {
        match key {
            None => &mut self.node_entry,
            Some(id) => self.entries.entry(id.clone()).or_insert_with(Entry::new),
        }
    }

    fn publish(&self) {
        let now = SystemTime::now();
        let valid = self
            .entries
            .values()
            .filter(|e| e.validity.is_some_and(|(_, na)| na > now))
            .count();
        self.metrics
            .certificates
            .set(i64::try_from(valid).unwrap_or(i64::MAX));
        let status = IdentityStatus {
            trust_domain: self.connector.trust_domain().to_owned(),
            trust_bundle: self.bundle.borrow().is_some(),
            node: self.node_entry.status(&self.node_id()),
            certificates: self.entries.iter().map(|(id, e)| e.status(id)).collect(),
        };
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
    }

    // ---- The cache: `<cache>/identity/<namespace>.<service account>.{crt,key}`.

    fn files(&self, id: &SpiffeId) -> Option<(PathBuf, PathBuf)> {
        let dir = self.dir.as_ref()?;
        // Namespaces and service accounts are DNS labels, so the name is unambiguous.
        let stem = format!("{}.{}", id.namespace(), id.service_account());
        Some((
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        ))
    }

    fn keep(&self, id: &SpiffeId, chain: &str, key: &PrivateKeyDer<'_>) {
        let Some((crt, key_path)) = self.files(id) else {
            return;
        };
        let key_pem = pem::encode_config(
            &pem::Pem::new("PRIVATE KEY", key.secret_der()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        let written = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(crt.parent().unwrap_or(Path::new(".")))
            .and_then(|()| write_private(&key_path, key_pem.as_bytes()))
            .and_then(|()| write_private(&crt, chain.as_bytes()));
        if let Err(e) = written {
            warn!(identity = %id, error = %e, "cannot keep the certificate in the cache");
        }
    }

    fn forget(&self, id: &SpiffeId) {
        if let Some((crt, key)) = self.files(id) {
            let _ = fs::remove_file(crt);
            let _ = fs::remove_file(key);
        }
    }

    /// Installs the unexpired certificates of the cache; expired or broken
    /// ones are deleted. Workload identities no Workload runs as any more are
    /// dropped at the first reconcile.
    fn load(&mut self) {
        let Some(dir) = self.dir.clone() else {
            return;
        };
        let Ok(read) = fs::read_dir(&dir) else {
            return;
        };
        let node_id = self.node_id();
        let now = SystemTime::now();
        for item in read.flatten() {
            let crt = item.path();
            if crt.extension().is_none_or(|e| e != "crt") {
                continue;
            }
            let key_path = crt.with_extension("key");
            let loaded = (|| -> Result<(SpiffeId, SystemTime, SystemTime, String), String> {
                let chain = fs::read_to_string(&crt).map_err(|e| e.to_string())?;
                let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| e.to_string())?;
                let (not_before, not_after) = validity(&chain)?;
                if not_after <= now {
                    return Err("expired".into());
                }
                let leaf = CertificateDer::pem_slice_iter(chain.as_bytes())
                    .next()
                    .ok_or("no certificate")?
                    .map_err(|e| e.to_string())?;
                let id = spiffe_id_of(&leaf).map_err(|e| e.to_string())?;
                if id.trust_domain() != self.connector.trust_domain() {
                    return Err(format!("{id} is of another trust domain"));
                }
                if id == node_id {
                    self.connector.node_cert().install(&chain, key)?;
                } else {
                    self.store.insert(&chain, key).map_err(|e| e.to_string())?;
                }
                Ok((id, not_before, not_after, chain))
            })();
            match loaded {
                Ok((id, not_before, not_after, chain)) => {
                    info!(identity = %id, not_after = unix(not_after), "certificate loaded from the cache");
                    let entry = if id == node_id {
                        &mut self.node_entry
                    } else {
                        self.entries.entry(id).or_insert_with(Entry::new)
                    };
                    // Count the lifetime from issue, as if it had just arrived then.
                    entry.held(not_before, not_after, (not_before + BACKDATED).min(now));
                    entry.chain = Some(chain);
                    entry.source = Source::Cache;
                }
                Err(why) => {
                    info!(file = %crt.display(), reason = %why, "discarding a cached certificate");
                    let _ = fs::remove_file(&crt);
                    let _ = fs::remove_file(&key_path);
                }
            }
        }
    }
}

/// The distributed `TrustBundle` resource: roots, signing root, forced
/// renewal and revocations.
fn trust_material(config: &State) -> Option<&mesh_api::pb::TrustBundle> {
    match &config
        .resources
        .get(mesh_api::names::TRUST_BUNDLE_KEY)?
        .body
    {
        Some(mesh_api::pb::resource::Body::TrustBundle(b)) => Some(b),
        _ => None,
    }
}

type SignResult = Result<(String, PrivateKeyDer<'static>), String>;

/// One signing call: a fresh key, a CSR for `id`, and the chain the server
/// issued. `node`: the node's own certificate (`SignNode`).
async fn sign(mut client: Client, id: SpiffeId, node: Option<String>) -> SignResult {
    let (key, csr_pem) = generate_key_and_csr(&id).map_err(|e| e.to_string())?;
    let call = async {
        match node {
            Some(node) => client
                .sign_node(SignNodeRequest { node, csr_pem })
                .await
                .map(tonic::Response::into_inner),
            None => client
                .sign(SignRequest {
                    csr_pem,
                    identity: id.to_string(),
                })
                .await
                .map(tonic::Response::into_inner),
        }
    };
    let response = tokio::time::timeout(SIGN_TIMEOUT, call)
        .await
        .map_err(|_| format!("no answer within {} s", SIGN_TIMEOUT.as_secs()))?
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
    Ok((response.cert_chain_pem, key))
}

/// Written to a fresh temporary name created 0600, synced, then renamed:
/// never readable by others, never half written.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{:08x}", rand::random::<u32>()));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(contents)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_half_the_lifetime_left() {
        let mut e = Entry::new();
        let now = SystemTime::now();
        e.held(
            now - Duration::from_secs(60),
            now + Duration::from_secs(120),
            now,
        );
        assert_eq!(e.due, now + Duration::from_secs(60));
    }

    #[test]
    fn an_unrenewed_certificate_is_warned_about_once_a_quarter_of_its_life_before_it_ends() {
        let mut e = Entry::new();
        let issued = SystemTime::now();
        let life = Duration::from_secs(400);
        e.held(issued, issued + life, issued);
        // Renewal at half-life comes first; the warning at three quarters.
        assert_eq!(e.wake(), issued + Duration::from_secs(200));
        e.due = issued + Duration::from_secs(1000); // renewals keep failing
        assert_eq!(e.wake(), issued + Duration::from_secs(300));
        assert_eq!(e.expiring(issued + Duration::from_secs(299)), None);
        assert_eq!(
            e.expiring(issued + Duration::from_secs(310)),
            Some(Duration::from_secs(90))
        );
        assert_eq!(e.expiring(issued + Duration::from_secs(320)), None, "once");
        assert_eq!(e.wake(), issued + life, "then only its expiry");
        // A renewed certificate is a new one: warned about again if it too
        // goes unrenewed.
        let renewed = issued + Duration::from_secs(350);
        e.held(renewed, renewed + life, renewed);
        assert_eq!(e.expiring(renewed + Duration::from_secs(10)), None);
        assert!(e.expiring(renewed + Duration::from_secs(300)).is_some());
    }
}
