//! The `Certificates` service: the mesh CA signs agents' requests, each for
//! an identity the calling node is entitled to.
//!
//! The caller's node comes from its credentials (its node certificate, or the
//! bootstrap token before it has one), never from the request. `Sign` issues
//! a workload identity only if a Workload on that node runs as it; `SignNode`
//! only the caller's own node identity. Every refusal is logged with the
//! identity and node and counted by reason.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    ControlPlane, ReasonLabels,
    auth::{self, Caller, Tokens},
    rotation::{Effect, Observed, Phase, Refused, Rotation, Slot},
    tls::PeerInfo,
};
use mesh_api::{
    identity::{Ca, CaError, Issued, SpiffeId},
    pb::{self, SignNodeRequest, SignRequest, SignResponse, certificates_server::Certificates},
};

/// Shortest certificate lifetime the server accepts: renewal at half-life
/// needs some room, and certificates are backdated a minute for clock skew.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(60);

/// Parses a lifetime such as `24h`, `5m`, `90s`, `1h30m` or `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (e.g. 24h, 5m, 90s, 1h30m)");
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        digits.clear();
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// The mesh's CAs with the policy the server applies to them: the one in
/// service, and during a rotation ([`rotation`]) the one it brings in;
/// which roots agents trust and which CA signs follow the phase. Also the
/// ledger of issued certificates (which root each identity's newest one is
/// under) and the revocation list. With a directory, all of it is kept
/// there (keys 0600) and a restart resumes the rotation where it was.
#[derive(Debug)]
pub struct Authority {
    trust_domain: String,
    ttl: Duration,
    dir: Option<PathBuf>,
    inner: RwLock<Inner>,
    /// Bumped whenever the trust bundle, the signer or the revocations change.
    changes: watch::Sender<u64>,
    /// Held from the ledger snapshot to its rename into place, so that
    /// certificates issued at once never write an older ledger over a newer.
    ledger_write: std::sync::Mutex<()>,
}

#[derive(Debug)]
struct Inner {
    current: Arc<Ca>,
    next: Option<Arc<Ca>>,
    rotation: Rotation,
    /// The current CA was promoted by a rotation and lives in the directory
    /// (it overrides `--ca-cert` at the next start).
    current_in_dir: bool,
    /// (identity, node) -> root id and expiry of the newest certificate
    /// issued for it.
    issued: BTreeMap<(String, String), (String, u64)>,
    revoked: Revocations,
    /// Version of each distributed bundle -> the root ids in it.
    bundles: HashMap<String, Vec<String>>,
}

const ROTATION_FILE: &str = "rotation.json";
const ISSUED_FILE: &str = "issued.json";
const REVOKED_FILE: &str = "revocations.json";
const NEXT_DIR: &str = "next";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    rotation: Rotation,
    current_in_dir: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct IssuedRecord {
    identity: String,
    node: String,
    root: String,
    not_after_unix: u64,
}

/// Revoked SPIFFE IDs and node names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    pub identities: BTreeSet<String>,
    pub nodes: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("the new CA is refused: {0}")]
    BadCa(#[from] CaError),
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("the new CA's root is the root in service already: a rotation brings in another root")]
    SameRoot,
    #[error("this control server keeps no CA directory, so it cannot rotate its CA")]
    NoDirectory,
    #[error("keeping the CA state in {path}: {reason}")]
    Store { path: PathBuf, reason: String },
    #[error("{0}")]
    BadRequest(String),
}

fn unix_now() -> u64 {
    unix(SystemTime::now())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Written to a temporary name created 0600, then renamed into place. The
/// temporary name is unique to the write: two writes at once (certificates
/// issued on two streams) must not rename each other's file.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}.{n}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(contents)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path))
}

fn read_json<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

impl Authority {
    /// Issues certificates from `ca`, each valid for `ttl` (cut to the CA's
    /// own expiry); nothing is kept on disk, so it cannot rotate.
    pub fn new(ca: Ca, ttl: Duration) -> Authority {
        Authority {
            trust_domain: ca.trust_domain().to_owned(),
            ttl,
            dir: None,
            inner: RwLock::new(Inner {
                current: Arc::new(ca),
                next: None,
                rotation: Rotation::default(),
                current_in_dir: false,
                issued: BTreeMap::new(),
                revoked: Revocations::default(),
                bundles: HashMap::new(),
            }),
            changes: watch::Sender::new(0),
            ledger_write: std::sync::Mutex::new(()),
        }
    }

    /// [`new`](Self::new), keeping the rotation, the next CA, the ledger and
    /// the revocations in `dir` and resuming what is there.
    pub fn open(ca: Ca, ttl: Duration, dir: &Path) -> Result<Authority, String> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut authority = Authority::new(ca, ttl);
        let td = authority.trust_domain.clone();
        let persisted: Persisted = read_json(&dir.join(ROTATION_FILE))?;
        let issued: Vec<IssuedRecord> = read_json(&dir.join(ISSUED_FILE))?;
        let revoked: Revocations = read_json(&dir.join(REVOKED_FILE))?;
        let inner = authority
            .inner
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if persisted.current_in_dir {
            inner.current = Arc::new(
                Ca::load(dir, &td).map_err(|e| format!("the CA a rotation promoted: {e}"))?,
            );
            inner.current_in_dir = true;
        }
        let trust = persisted.rotation.trust();
        if trust.next {
            let next = Ca::load(&dir.join(NEXT_DIR), &td)
                .map_err(|e| format!("the CA of the rotation in progress: {e}"))?;
            inner.next = Some(Arc::new(next));
        }
        if persisted.rotation.phase != Phase::Idle {
            info!(
                phase = persisted.rotation.phase.as_str(),
                paused = persisted.rotation.paused,
                "resuming a CA rotation"
            );
        }
        inner.rotation = persisted.rotation;
        let now = unix_now();
        inner.issued = issued
            .into_iter()
            .filter(|r| r.not_after_unix > now)
            .map(|r| ((r.identity, r.node), (r.root, r.not_after_unix)))
            .collect();
        inner.revoked = revoked;
        authority.dir = Some(dir.to_owned());
        Ok(authority)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes whoever follows the trust bundle, the signer or revocations.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// When the CA that signs new certificates expires.
    pub fn ca_not_after(&self) -> SystemTime {
        self.signer().not_after()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn signer(&self) -> Arc<Ca> {
        let inner = self.read();
        match (inner.rotation.trust().signer, &inner.next) {
            (Slot::Next, Some(next)) => next.clone(),
            _ => inner.current.clone(),
        }
    }

    /// The rotation's phase, for the gauge.
    pub fn phase(&self) -> Phase {
        self.read().rotation.phase
    }

    /// What every agent trusts now: one root, or two during a rotation.
    pub fn trust_bundle_pem(&self) -> String {
        self.trust_material().0.pem
    }

    /// The distributed `TrustBundle` and the ids of the roots in it.
    pub fn trust_material(&self) -> (pb::TrustBundle, Vec<String>) {
        let inner = self.read();
        let trust = inner.rotation.trust();
        let mut pem = String::new();
        let mut roots = Vec::new();
        let cas = [
            Some(&inner.current).filter(|_| trust.current),
            inner.next.as_ref().filter(|_| trust.next),
        ];
        for ca in cas.into_iter().flatten() {
            pem.push_str(&ca.trust_bundle_pem());
            roots.push(ca.root_id());
        }
        let signing = match (trust.signer, &inner.next) {
            (Slot::Next, Some(next)) => next,
            _ => &inner.current,
        };
        let bundle = pb::TrustBundle {
            pem,
            signing_pem: signing.trust_bundle_pem(),
            force_renew: inner.rotation.force_renew_now(),
            revoked_identities: inner.revoked.identities.iter().cloned().collect(),
            revoked_nodes: inner.revoked.nodes.iter().cloned().collect(),
        };
        (bundle, roots)
    }

    /// Remembers which roots the bundle of `version` holds, so agents'
    /// acknowledgements of it can be told apart.
    pub fn note_bundle(&self, version: String, roots: Vec<String>) {
        self.write().bundles.insert(version, roots);
    }

    /// The identity the control server proves to agents.
    pub fn control_identity(&self) -> SpiffeId {
        mesh_api::identity::control_identity(self.trust_domain())
            .expect("the CA checked its trust domain")
    }

    /// The control server's own certificate: from the CA in service, which
    /// every agent trusts until the old root is retired (also an agent that
    /// missed the new bundle), then from the new one.
    pub fn sign(&self, csr: &[u8], id: &SpiffeId) -> Result<Issued, CaError> {
        let current = self.read().current.clone();
        current.sign_csr(csr, id, self.ttl)
    }

    /// Id of the root the control server's own certificate is under.
    pub fn current_root_id(&self) -> String {
        self.read().current.root_id()
    }

    /// Why `id` (asked for by `node`) may not have a certificate, if it is
    /// revoked.
    pub fn revoked(&self, id: &SpiffeId, node: &str) -> Option<String> {
        let inner = self.read();
        if inner.revoked.identities.contains(&id.to_string()) {
            return Some(format!("{id} is revoked"));
        }
        inner
            .revoked
            .nodes
            .contains(node)
            .then(|| format!("node {node} is revoked"))
    }

    /// Signs `csr` for `id`, which `node` was found entitled to, with the
    /// CA the phase signs with, and records it in the ledger.
    pub fn issue(&self, csr: &[u8], id: &SpiffeId, node: &str) -> Result<Issued, CaError> {
        let signer = self.signer();
        let issued = signer.sign_csr(csr, id, self.ttl)?;
        let now = unix_now();
        let ledger = self
            .ledger_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut inner = self.write();
        inner.issued.retain(|_, (_, not_after)| *not_after > now);
        inner.issued.insert(
            (id.to_string(), node.to_owned()),
            (signer.root_id(), unix(issued.not_after)),
        );
        let records: Vec<IssuedRecord> = inner
            .issued
            .iter()
            .map(|((identity, node), (root, not_after))| IssuedRecord {
                identity: identity.clone(),
                node: node.clone(),
                root: root.clone(),
                not_after_unix: *not_after,
            })
            .collect();
        drop(inner);
        if let Some(dir) = &self.dir {
            // A lost ledger only delays retiring a root (until the TTL).
            let path = dir.join(ISSUED_FILE);
            let written = serde_json::to_vec(&records)
                .map_err(std::io::Error::other)
                .and_then(|bytes| write_private(&path, &bytes));
            if let Err(e) = written {
                warn!(path = %path.display(), error = %e, "cannot keep the ledger of issued certificates");
            }
        }
        drop(ledger);
        Ok(issued)
    }

    fn persist(&self, inner: &Inner) -> Result<(), RotateError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let store = |path: PathBuf, reason: String| RotateError::Store { path, reason };
        let persisted = Persisted {
            rotation: inner.rotation.clone(),
            current_in_dir: inner.current_in_dir,
        };
        for (name, bytes) in [
            (ROTATION_FILE, serde_json::to_vec_pretty(&persisted)),
            (REVOKED_FILE, serde_json::to_vec_pretty(&inner.revoked)),
        ] {
            let path = dir.join(name);
            let bytes = bytes.map_err(|e| store(path.clone(), e.to_string()))?;
            write_private(&path, &bytes).map_err(|e| store(path.clone(), e.to_string()))?;
        }
        Ok(())
    }

    /// Live certificates by root id.
    fn live(inner: &Inner) -> HashMap<String, usize> {
        let now = unix_now();
        let mut live = HashMap::new();
        for (root, not_after) in inner.issued.values() {
            if *not_after > now {
                *live.entry(root.clone()).or_insert(0) += 1;
            }
        }
        live
    }

    /// Root ids the bundle of the current phase holds, sorted.
    fn wanted_roots(inner: &Inner) -> Vec<String> {
        let trust = inner.rotation.trust();
        let mut want: Vec<String> = [
            Some(&inner.current).filter(|_| trust.current),
            inner.next.as_ref().filter(|_| trust.next),
        ]
        .into_iter()
        .flatten()
        .map(|ca| ca.root_id())
        .collect();
        want.sort();
        want
    }

    /// The agents the phase waits on.
    ///
    /// BundleDistributed waits for every connected agent to acknowledge
    /// the two-root bundle, and also for every disconnected one whose node
    /// still holds a live certificate: such an agent still carries traffic
    /// and trusts the old root only, so signing with the new one would
    /// break its connections. It stops counting once its certificates
    /// expire or its node is revoked. Retiring waits for the connected
    /// agents only (a disconnected one trusts a superset). Signing and
    /// RollingBack wait for certificates, and name the nodes holding them.
    fn pending(inner: &Inner, acks: &[AgentBundle]) -> Vec<Pending> {
        let now = unix_now();
        let phase = inner.rotation.phase;
        let root_of = |ca: Option<&Arc<Ca>>| ca.map(|ca| ca.root_id());
        let awaited_root = match phase {
            Phase::Signing => root_of(Some(&inner.current)),
            Phase::RollingBack => root_of(inner.next.as_ref()),
            _ => None,
        };
        let mut live: BTreeMap<&str, usize> = BTreeMap::new();
        for ((_, node), (root, not_after)) in &inner.issued {
            if *not_after > now && awaited_root.as_ref().is_none_or(|r| r == root) {
                *live.entry(node.as_str()).or_insert(0) += 1;
            }
        }
        let connected: HashMap<&str, &AgentBundle> = acks
            .iter()
            .filter(|a| a.connected)
            .map(|a| (a.node.as_str(), a))
            .collect();
        let want = Self::wanted_roots(inner);
        let on_bundle = |a: &AgentBundle| {
            inner.bundles.get(&a.version).is_some_and(|roots| {
                let mut roots = roots.clone();
                roots.sort();
                roots == want
            })
        };
        let count = |node: &str| live.get(node).copied().unwrap_or(0);
        let entry = |a: &AgentBundle, reason: &str| Pending {
            node: a.node.clone(),
            connected: a.connected,
            version: a.version.clone(),
            live_certificates: count(&a.node),
            reason: reason.to_owned(),
        };
        match phase {
            Phase::Idle => Vec::new(),
            Phase::BundleDistributed | Phase::Retiring => acks
                .iter()
                .filter(|a| !on_bundle(a))
                .filter_map(|a| {
                    if a.connected {
                        Some(entry(a, "connected, not yet on the bundle of this phase"))
                    } else if phase == Phase::BundleDistributed
                        && !connected.contains_key(a.node.as_str())
                        && count(&a.node) > 0
                        && !inner.revoked.nodes.contains(&a.node)
                    {
                        Some(entry(
                            a,
                            "disconnected, still holds live certificates under the old root \
                             only it trusts (waits until it returns, its certificates expire \
                             or the node is revoked)",
                        ))
                    } else {
                        None
                    }
                })
                .collect(),
            Phase::Signing | Phase::RollingBack => {
                let reason = if phase == Phase::Signing {
                    "holds live certificates under the old root (renewal pending)"
                } else {
                    "holds live certificates under the new root (renewal pending)"
                };
                live.iter()
                    .map(|(node, n)| {
                        let agent = acks.iter().find(|a| a.node == *node);
                        Pending {
                            node: (*node).to_owned(),
                            connected: connected.contains_key(node),
                            version: agent.map(|a| a.version.clone()).unwrap_or_default(),
                            live_certificates: *n,
                            reason: reason.to_owned(),
                        }
                    })
                    .collect()
            }
        }
    }

    fn observe(inner: &Inner, acks: &[AgentBundle]) -> Observed {
        let live = Self::live(inner);
        let count = |ca: Option<&Arc<Ca>>| {
            ca.and_then(|ca| live.get(&ca.root_id()).copied())
                .unwrap_or(0)
        };
        let agents_acked = match inner.rotation.phase {
            Phase::BundleDistributed | Phase::Retiring => Self::pending(inner, acks).is_empty(),
            _ => true,
        };
        Observed {
            agents_acked,
            live_current: count(Some(&inner.current)),
            live_next: count(inner.next.as_ref()),
        }
    }

    /// Carries out what a transition asks for, under the lock.
    fn effect(&self, inner: &mut Inner, effect: Option<Effect>) -> Result<(), RotateError> {
        let store = |path: &Path, reason: String| RotateError::Store {
            path: path.to_owned(),
            reason,
        };
        match effect {
            None => {}
            Some(Effect::Promote) => {
                if let Some(next) = inner.next.take() {
                    if let Some(dir) = &self.dir {
                        next.save(dir).map_err(|e| store(dir, e.to_string()))?;
                    }
                    info!(root = %next.root_id(), "the new CA is in service; the old root is retired");
                    inner.current = next;
                    inner.current_in_dir = true;
                }
                self.remove_next();
            }
            Some(Effect::DropNext) => {
                inner.next = None;
                self.remove_next();
            }
        }
        self.persist(inner)
    }

    fn remove_next(&self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir.join(NEXT_DIR));
        }
    }

    /// Moves the rotation on if what its phase waits for has happened;
    /// returns whether anything changed.
    pub fn tick(&self, acks: &[AgentBundle]) -> bool {
        let mut inner = self.write();
        let seen = Self::observe(&inner, acks);
        let before = inner.rotation.phase;
        let Some(effect) = inner.rotation.tick(seen, unix_now()) else {
            return false;
        };
        info!(
            from = before.as_str(),
            to = inner.rotation.phase.as_str(),
            "CA rotation moved on"
        );
        if let Err(e) = self.effect(&mut inner, effect) {
            warn!(error = %e, "keeping the CA rotation's state failed");
        }
        drop(inner);
        self.changed();
        true
    }

    /// Starts a rotation to a new CA: the operator's (`cert_pem` with its
    /// chain, `key_pem`), or a generated root when both are empty.
    pub fn rotate(
        &self,
        cert_pem: &str,
        key_pem: &str,
        force_renew: bool,
    ) -> Result<(), RotateError> {
        let dir = self.dir.clone().ok_or(RotateError::NoDirectory)?;
        {
            let inner = self.read();
            if inner.rotation.phase != Phase::Idle {
                return Err(Refused::Running(inner.rotation.phase.as_str()).into());
            }
        }
        let new = match (cert_pem.trim().is_empty(), key_pem.trim().is_empty()) {
            (true, true) => Ca::generate(&self.trust_domain)?,
            (false, false) => Ca::from_pem(&self.trust_domain, cert_pem, key_pem)?,
            _ => {
                return Err(RotateError::BadRequest(
                    "give both the new CA's certificate and its key, or neither (a generated root)"
                        .into(),
                ));
            }
        };
        new.check_usable()?;
        let mut inner = self.write();
        if new.root_id() == inner.current.root_id() {
            return Err(RotateError::SameRoot);
        }
        inner.rotation.start(force_renew, unix_now())?;
        let next_dir = dir.join(NEXT_DIR);
        if let Err(e) = new.save(&next_dir) {
            inner.rotation = Rotation::default();
            return Err(RotateError::Store {
                path: next_dir,
                reason: e.to_string(),
            });
        }
        info!(root = %new.root_id(), force_renew, "CA rotation started: the new root goes into the trust bundle");
        inner.next = Some(Arc::new(new));
        self.persist(&inner)?;
        drop(inner);
        self.changed();
        Ok(())
    }

    /// `pause`, `resume`, `rollback` or `retire`.
    pub fn act(&self, action: &str, acks: &[AgentBundle]) -> Result<(), RotateError> {
        let mut inner = self.write();
        let now = unix_now();
        let effect = match action {
            "pause" => inner.rotation.pause().map(|()| None),
            "resume" => inner.rotation.resume().map(|()| None),
            "rollback" => inner.rotation.rollback(now),
            "retire" => {
                let seen = Self::observe(&inner, acks);
                inner.rotation.retire(seen, now).map(Some)
            }
            other => Err(Refused::UnknownAction(other.to_owned())),
        }?;
        info!(action, phase = inner.rotation.phase.as_str(), "CA rotation");
        self.effect(&mut inner, effect)?;
        drop(inner);
        self.changed();
        Ok(())
    }

    /// Revokes (or lifts the revocation of) an identity or a node.
    pub fn revoke(
        &self,
        kind: &str,
        name: &str,
        unrevoke: bool,
    ) -> Result<Revocations, RotateError> {
        let name = name.trim();
        let mut inner = self.write();
        let set = match kind {
            "identity" => {
                let id: SpiffeId = name
                    .parse()
                    .map_err(|e| RotateError::BadRequest(format!("identity {name:?}: {e}")))?;
                if id.trust_domain() != self.trust_domain {
                    return Err(RotateError::BadRequest(format!(
                        "{id} is outside this mesh's trust domain {}",
                        self.trust_domain
                    )));
                }
                &mut inner.revoked.identities
            }
            "node" => {
                mesh_api::identity::node_identity(&self.trust_domain, name)
                    .map_err(|e| RotateError::BadRequest(format!("node {name:?}: {e}")))?;
                &mut inner.revoked.nodes
            }
            other => {
                return Err(RotateError::BadRequest(format!(
                    "unknown kind {other:?} (expected identity or node)"
                )));
            }
        };
        let changed = if unrevoke {
            set.remove(name)
        } else {
            set.insert(name.to_owned())
        };
        if changed {
            info!(kind, name, unrevoke, "revocation list changed");
            self.persist(&inner)?;
        }
        let list = inner.revoked.clone();
        drop(inner);
        if changed {
            self.changed();
        }
        Ok(list)
    }

    /// What `meshctl ca status` shows.
    pub fn status(&self, acks: &[AgentBundle], current_bundle: &str) -> pb::CaStatusResponse {
        let inner = self.read();
        let live = Self::live(&inner);
        let trust = inner.rotation.trust();
        let signer_root = match (trust.signer, &inner.next) {
            (Slot::Next, Some(next)) => next.root_id(),
            _ => inner.current.root_id(),
        };
        let mut roots = Vec::new();
        for (slot, ca) in [
            ("current", Some(&inner.current)),
            ("next", inner.next.as_ref()),
        ] {
            let Some(ca) = ca else { continue };
            let chain = ca.chain_summary();
            let id = ca.root_id();
            let (subject, not_after) = chain.last().cloned().unwrap_or((String::new(), UNIX_EPOCH));
            roots.push(pb::CaRoot {
                live_certificates: u32::try_from(live.get(&id).copied().unwrap_or(0))
                    .unwrap_or(u32::MAX),
                signing: id == signer_root,
                id,
                subject,
                not_after_unix: unix(not_after),
                intermediates: chain[..chain.len().saturating_sub(1)]
                    .iter()
                    .map(|(subject, not_after)| pb::CaCertificate {
                        subject: subject.clone(),
                        not_after_unix: unix(*not_after),
                    })
                    .collect(),
                slot: slot.to_owned(),
            });
        }
        let mut by_version: BTreeMap<&str, u32> = BTreeMap::new();
        let mut connected = 0;
        for a in acks.iter().filter(|a| a.connected) {
            connected += 1;
            *by_version.entry(a.version.as_str()).or_insert(0) += 1;
        }
        let bundles = by_version
            .into_iter()
            .map(|(version, agents)| pb::BundleAcks {
                bundle_version: version.to_owned(),
                roots: inner.bundles.get(version).cloned().unwrap_or_default(),
                agents,
                current: version == current_bundle,
            })
            .collect();
        let now = unix_now();
        let oldest = inner
            .issued
            .values()
            .map(|(_, not_after)| *not_after)
            .filter(|t| *t > now)
            .min()
            .unwrap_or(0);
        pb::CaStatusResponse {
            phase: inner.rotation.phase.as_str().to_owned(),
            paused: inner.rotation.paused,
            force_renew: inner.rotation.force_renew,
            phase_since_unix: inner.rotation.since_unix,
            waiting_for: inner.rotation.waiting_for().to_owned(),
            roots,
            bundles,
            connected_agents: connected,
            oldest_workload_not_after_unix: oldest,
            revoked_identities: inner.revoked.identities.iter().cloned().collect(),
            revoked_nodes: inner.revoked.nodes.iter().cloned().collect(),
            pending: Self::pending(&inner, acks)
                .into_iter()
                .map(|p| pb::PendingAgent {
                    node: p.node,
                    connected: p.connected,
                    bundle_version: p.version,
                    live_certificates: u32::try_from(p.live_certificates).unwrap_or(u32::MAX),
                    reason: p.reason,
                })
                .collect(),
        }
    }

    /// Live certificates under each root in service, for the gauges.
    pub fn live_by_slot(&self) -> (usize, usize) {
        let inner = self.read();
        let live = Self::live(&inner);
        let get = |ca: Option<&Arc<Ca>>| {
            ca.and_then(|ca| live.get(&ca.root_id()).copied())
                .unwrap_or(0)
        };
        (get(Some(&inner.current)), get(inner.next.as_ref()))
    }
}

/// One agent's last acknowledged trust bundle, as the rotation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentBundle {
    pub node: String,
    pub connected: bool,
    pub version: String,
}

/// An agent a rotation's phase waits on, for `meshctl ca status`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    node: String,
    connected: bool,
    version: String,
    live_certificates: usize,
    reason: String,
}

pub struct CertificatesService {
    plane: Arc<ControlPlane>,
    tokens: Tokens,
}

impl CertificatesService {
    pub fn new(plane: Arc<ControlPlane>, tokens: Tokens) -> CertificatesService {
        CertificatesService { plane, tokens }
    }

    fn authority(&self) -> Result<&Authority, Status> {
        self.plane
            .authority()
            .ok_or_else(|| Status::unavailable("this control server has no certificate authority"))
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let td = self.plane.authority().map(Authority::trust_domain);
        let caller = auth::caller(request, &self.tokens, td).await;
        caller.map_err(|why| {
            self.refused("unauthenticated");
            warn!(peer = ?peer(request), reason = %why, "refused a signing request without valid credentials");
            Status::unauthenticated(why)
        })
    }

    fn refused(&self, reason: &'static str) {
        self.plane
            .metrics
            .sign_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Refuses, logs and counts.
    fn refuse(
        &self,
        caller: &Caller,
        identity: &str,
        reason: &'static str,
        status: Status,
    ) -> Status {
        self.refused(reason);
        warn!(
            node = %caller.node,
            via = %caller.via,
            identity,
            reason,
            message = status.message(),
            "refused a signing request"
        );
        status
    }

    fn issue(
        &self,
        caller: &Caller,
        id: &SpiffeId,
        csr_pem: &str,
        kind: &'static str,
    ) -> Result<Response<SignResponse>, Status> {
        let authority = self.authority()?;
        let identity = id.to_string();
        if let Some(why) = authority.revoked(id, &caller.node) {
            return Err(self.refuse(
                caller,
                &identity,
                "revoked",
                Status::permission_denied(format!("no certificate for {id}: {why}")),
            ));
        }
        let issued = authority
            .issue(csr_pem.as_bytes(), id, &caller.node)
            .map_err(|e| match e {
                CaError::CsrIdentityMismatch { .. } | CaError::CsrRequestsCa(_) => self.refuse(
                    caller,
                    &identity,
                    "csr_mismatch",
                    Status::permission_denied(e.to_string()),
                ),
                CaError::BadCsr(_) => self.refuse(
                    caller,
                    &identity,
                    "bad_csr",
                    Status::invalid_argument(e.to_string()),
                ),
                other => {
                    warn!(error = %other, identity, "signing failed");
                    Status::internal(other.to_string())
                }
            })?;
        self.plane
            .metrics
            .certificates_issued
            .get_or_create(&super::KindLabels { kind })
            .inc();
        let not_after_unix = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        info!(node = %caller.node, via = %caller.via, identity, not_after_unix, "issued a certificate");
        Ok(Response::new(SignResponse {
            cert_chain_pem: issued.cert_chain_pem,
            not_after_unix,
        }))
    }
}

fn peer<T>(request: &Request<T>) -> Option<std::net::SocketAddr> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.remote)
        .or_else(|| request.remote_addr())
}

#[tonic::async_trait]
impl Certificates for CertificatesService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let caller = self.caller(&request).await?;
        let SignRequest { csr_pem, identity } = request.into_inner();
        let authority = self.authority()?;
        let id: SpiffeId = identity.parse().map_err(|e| {
            self.refuse(
                &caller,
                &identity,
                "invalid_identity",
                Status::invalid_argument(format!("identity: {e}")),
            )
        })?;
        if id.trust_domain() != authority.trust_domain() {
            return Err(self.refuse(
                &caller,
                &identity,
                "foreign_trust_domain",
                Status::permission_denied(format!(
                    "{id} is outside this mesh's trust domain {}",
                    authority.trust_domain()
                )),
            ));
        }
        if mesh_api::identity::is_reserved(&id) {
            return Err(self.refuse(
                &caller,
                &identity,
                "reserved_identity",
                Status::permission_denied(format!(
                    "{id} is reserved for node agents and the control server; node {} may not obtain it",
                    caller.node
                )),
            ));
        }
        let entitled =
            self.plane
                .view()
                .runs_on(&caller.node, id.namespace(), id.service_account());
        if !entitled {
            return Err(self.refuse(
                &caller,
                &identity,
                "not_on_node",
                Status::permission_denied(format!(
                    "node {node} may not obtain {id}: no Workload on node {node} runs as it",
                    node = caller.node
                )),
            ));
        }
        self.issue(&caller, &id, &csr_pem, "workload")
    }

    async fn sign_node(
        &self,
        request: Request<SignNodeRequest>,
    ) -> Result<Response<SignResponse>, Status> {
        let caller = self.caller(&request).await?;
        let SignNodeRequest { node, csr_pem } = request.into_inner();
        let authority = self.authority()?;
        let id =
            mesh_api::identity::node_identity(authority.trust_domain(), &node).map_err(|e| {
                self.refuse(
                    &caller,
                    &node,
                    "invalid_identity",
                    Status::invalid_argument(format!("node: {e}")),
                )
            })?;
        if node != caller.node {
            return Err(self.refuse(
                &caller,
                &id.to_string(),
                "other_node",
                Status::permission_denied(format!(
                    "node {} may not obtain {id}, the identity of node {node}",
                    caller.node
                )),
            ));
        }
        self.issue(&caller, &id, &csr_pem, "node")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory removed when the test ends, however it ends.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "mesh-control-{name}-{}-{:x}",
                std::process::id(),
                rand_suffix()
            ));
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rand_suffix() -> u128 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    }

    const TD: &str = "cluster.local";

    /// An authority keeping its state in `dir`, with a freshly generated
    /// root (a reopen after a restart keeps the rotation and the lists).
    fn fresh(dir: &TempDir, ttl_secs: u64) -> Authority {
        Authority::open(
            Ca::generate(TD).expect("root"),
            Duration::from_secs(ttl_secs),
            &dir.0,
        )
        .expect("open")
    }

    fn issue(a: &Authority, sa: &str, node: &str) -> Issued {
        let id = SpiffeId::new(TD, "default", sa).expect("valid");
        let (_, csr) = mesh_api::identity::generate_key_and_csr(&id).expect("csr");
        a.issue(csr.as_bytes(), &id, node).expect("issued")
    }

    fn agent(version: &str) -> AgentBundle {
        AgentBundle {
            node: "n1".into(),
            connected: true,
            version: version.into(),
        }
    }

    #[test]
    fn a_rotation_is_kept_in_the_ca_directory_and_resumed_after_a_restart() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("rotation");
        let ca = Ca::generate(TD).expect("root");
        ca.save(&dir.0).expect("saved as --ca-dir keeps it");
        let old_root = ca.trust_bundle_pem();
        let a = Authority::open(ca, Duration::from_secs(3600), &dir.0).expect("open");
        issue(&a, "web", "n1");
        issue(&a, "db", "n1");
        a.rotate("", "", false).expect("idle");
        let err = a.rotate("", "", false).expect_err("running");
        assert!(err.to_string().contains("already running"), "{err}");
        let (bundle, roots) = a.trust_material();
        assert_eq!(roots.len(), 2, "both roots trusted");
        assert_eq!(bundle.signing_pem, old_root, "the old CA still signs");
        let mode = std::fs::metadata(dir.0.join("next/ca.key"))
            .expect("next key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // An agent on an older bundle holds the phase; once it acks, signing switches.
        a.note_bundle("v1".into(), vec![roots[0].clone()]);
        a.note_bundle("v2".into(), roots.clone());
        assert!(!a.tick(&[agent("v2"), agent("v1")]));
        assert_eq!(a.phase(), Phase::BundleDistributed);
        assert!(a.tick(&[agent("v2")]));
        assert_eq!(a.phase(), Phase::Signing);
        let renewed = issue(&a, "web", "n1");
        assert!(mesh_api::identity::chains_to(
            &renewed.cert_chain_pem,
            &a.trust_bundle_pem()
        ));
        assert!(
            !mesh_api::identity::chains_to(&renewed.cert_chain_pem, &old_root),
            "signed by the new CA"
        );
        // db's certificate is still under the old root.
        let err = a.act("retire", &[agent("v2")]).expect_err("live");
        assert!(err.to_string().contains("1 live certificate"), "{err}");
        assert!(!a.tick(&[agent("v2")]));
        drop(a);

        // A restart resumes Signing with both CAs and the ledger.
        let ca = Ca::load(&dir.0, TD).expect("current");
        let a = Authority::open(ca, Duration::from_secs(3600), &dir.0).expect("reopen");
        assert_eq!(a.phase(), Phase::Signing);
        assert_eq!(a.live_by_slot(), (1, 1));
        issue(&a, "db", "n1");
        assert_eq!(a.live_by_slot(), (0, 2));
        let (_, roots) = a.trust_material();
        assert!(a.tick(&[]), "nothing live under the old root: retired");
        assert_eq!(a.phase(), Phase::Retiring);
        let (bundle, after) = a.trust_material();
        assert_eq!(after, vec![roots[1].clone()], "only the new root");
        assert!(!bundle.pem.contains(old_root.trim()));
        assert!(a.act("rollback", &[]).is_err(), "too late to roll back");
        a.note_bundle("v3".into(), after);
        assert!(a.tick(&[agent("v3")]));
        assert_eq!(a.phase(), Phase::Idle);
        drop(a);
        // The promoted CA is what a restart loads.
        let a = fresh(&dir, 60);
        assert_eq!(a.trust_material().1, vec![roots[1].clone()]);
    }

    #[test]
    fn rollback_from_signing_signs_with_the_old_ca_again_and_forces_renewal() {
        let dir = TempDir::new("rollback");
        let ca = Ca::generate(TD).expect("root");
        let old_root = ca.trust_bundle_pem();
        let a = Authority::open(ca, Duration::from_secs(3600), &dir.0).expect("open");
        a.rotate("", "", false).expect("idle");
        a.act("rollback", &[]).expect("from BundleDistributed");
        assert_eq!(a.phase(), Phase::Idle);
        assert!(!dir.0.join("next").exists(), "the new CA is thrown away");
        a.rotate("", "", false).expect("idle");
        let (_, roots) = a.trust_material();
        a.note_bundle("v".into(), roots);
        assert!(a.tick(&[agent("v")]));
        issue(&a, "web", "n1");
        a.act("rollback", &[]).expect("from Signing");
        assert_eq!(a.phase(), Phase::RollingBack);
        let (bundle, roots) = a.trust_material();
        assert_eq!(
            roots.len(),
            2,
            "the new root stays until nothing live is under it"
        );
        assert!(bundle.force_renew);
        assert_eq!(bundle.signing_pem, old_root);
        assert!(!a.tick(&[]));
        issue(&a, "web", "n1");
        assert!(a.tick(&[]));
        assert_eq!(a.phase(), Phase::Idle);
        assert_eq!(a.trust_bundle_pem(), old_root);
    }

    fn away(node: &str, version: &str) -> AgentBundle {
        AgentBundle {
            node: node.into(),
            connected: false,
            version: version.into(),
        }
    }

    #[test]
    fn certificates_issued_at_once_all_reach_the_ledger_on_disk() {
        // Agents renew every pod at once during a rotation; each issue
        // rewrites the ledger. Two writes at once once shared a temporary
        // file and one failed with ENOENT, or left an older ledger last.
        let dir = TempDir::new("ledger");
        let a = fresh(&dir, 3600);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let a = &a;
                scope.spawn(move || {
                    for i in 0..8 {
                        issue(a, &format!("sa{t}-{i}"), &format!("n{t}"));
                    }
                });
            }
        });
        let text = std::fs::read_to_string(dir.0.join(ISSUED_FILE)).expect("ledger");
        let records: Vec<IssuedRecord> = serde_json::from_str(&text).expect("json");
        assert_eq!(
            records.len(),
            32,
            "every issued certificate is in the ledger"
        );
        let left: Vec<_> = std::fs::read_dir(&dir.0)
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(left.is_empty(), "no temporary file left: {left:?}");
    }

    #[test]
    fn a_disconnected_agent_with_live_certificates_holds_signing_until_it_returns() {
        let dir = TempDir::new("away");
        let a = fresh(&dir, 3600);
        a.note_bundle("old".into(), a.trust_material().1);
        issue(&a, "web", "n1");
        issue(&a, "db", "n2");
        a.rotate("", "", true).expect("idle");
        let (_, roots) = a.trust_material();
        a.note_bundle("two".into(), roots);
        // n2 went away before it saw the two-root bundle, but its pods'
        // certificates (old root) are live: it still carries traffic and
        // would refuse peers renewed under the new root.
        let acks = [agent("two"), away("n2", "old")];
        assert!(!a.tick(&acks));
        assert_eq!(a.phase(), Phase::BundleDistributed);
        let status = a.status(&acks, "two");
        assert_eq!(status.pending.len(), 1, "{status:?}");
        assert_eq!(status.pending[0].node, "n2");
        assert!(!status.pending[0].connected);
        assert_eq!(status.pending[0].live_certificates, 1);
        assert!(
            status.pending[0].reason.contains("disconnected"),
            "{status:?}"
        );
        // A disconnected node with nothing live (n3) does not count; nor
        // does a revoked one.
        assert!(!a.tick(&[agent("two"), away("n2", "old"), away("n3", "old")]));
        a.revoke("node", "n2", false).expect("revoked");
        assert!(a.tick(&acks), "a revoked node no longer holds the rotation");
        assert_eq!(a.phase(), Phase::Signing);
        a.revoke("node", "n2", true).expect("unrevoked");
        // Signing names the nodes still on the old root.
        let status = a.status(&[agent("two"), away("n2", "old")], "two");
        let nodes: Vec<&str> = status.pending.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(nodes, ["n1", "n2"], "{status:?}");
    }

    #[test]
    fn a_returning_agent_releases_bundle_distributed() {
        let dir = TempDir::new("returns");
        let a = fresh(&dir, 3600);
        a.note_bundle("old".into(), a.trust_material().1);
        issue(&a, "db", "n2");
        a.rotate("", "", false).expect("idle");
        let (_, roots) = a.trust_material();
        a.note_bundle("two".into(), roots);
        assert!(!a.tick(&[agent("two"), away("n2", "old")]));
        let back = AgentBundle {
            connected: true,
            ..away("n2", "two")
        };
        assert!(a.tick(&[agent("two"), back]));
        assert_eq!(a.phase(), Phase::Signing);
    }

    #[test]
    fn a_revoked_identity_or_node_gets_no_certificate_and_the_list_is_kept() {
        let dir = TempDir::new("revoke");
        let a = fresh(&dir, 60);
        let web = SpiffeId::new(TD, "default", "web").expect("valid");
        assert_eq!(a.revoked(&web, "n1"), None);
        a.revoke("identity", &web.to_string(), false)
            .expect("revoked");
        assert!(
            a.revoked(&web, "n1")
                .is_some_and(|why| why.contains("sa/web"))
        );
        a.revoke("node", "n2", false).expect("revoked");
        let db = SpiffeId::new(TD, "default", "db").expect("valid");
        assert!(
            a.revoked(&db, "n2")
                .is_some_and(|why| why.contains("node n2"))
        );
        assert!(a.revoke("identity", "not-a-spiffe-id", false).is_err());
        assert!(a.revoke("pod", "x", false).is_err());
        drop(a);
        let a = fresh(&dir, 60);
        assert!(a.revoked(&web, "n1").is_some(), "persisted");
        a.revoke("identity", &web.to_string(), true)
            .expect("unrevoked");
        assert_eq!(a.revoked(&web, "n1"), None);
        let bundle = a.trust_material().0;
        assert_eq!(bundle.revoked_nodes, ["n2"]);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        for bad in ["", "5", "m", "5x", "-5m", "0s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
