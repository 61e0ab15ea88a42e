//! The embedded durable store: a directory holding a snapshot of the whole
//! configuration and an append-only write-ahead log of the transactions
//! since.
//!
//! ```text
//! <dir>/LOCK           held (flock) while a mesh-control uses the directory
//! <dir>/snapshot.json  {"format":1,"revision":N,"resources":[{"version":V,"resource":{..}}]}
//! <dir>/wal.log        one line per transaction: "<crc32 hex> <json>\n"
//! ```
//!
//! A transaction is durable once its line is fsynced. On open the snapshot is
//! loaded and the log replayed; a torn or corrupt last line (a crash in the
//! middle of an append) is dropped, so a transaction is applied whole or not
//! at all. Compaction writes a new snapshot beside the old one, fsyncs it,
//! renames it over and then empties the log; log lines the snapshot already
//! holds are skipped by revision, so a crash between the steps loses nothing.
//!
//! [`etcd`] keeps the same state in etcd instead, shared by several
//! replicas; [`Backend`] is either.
pub mod etcd;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Write},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::resources::{self, Change, Kind, Resource, ResourceId, Service};

const SNAPSHOT: &str = "snapshot.json";
const SNAPSHOT_TMP: &str = "snapshot.json.tmp";
const LOG: &str = "wal.log";
const LOCK: &str = "LOCK";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("store {0} is in use by another mesh-control")]
    Locked(PathBuf),
    #[error("snapshot {path} is unreadable: {reason}")]
    CorruptSnapshot { path: PathBuf, reason: String },
    #[error(
        "write-ahead log {path} is corrupt at byte {offset}, with valid transactions after it; refusing to drop them"
    )]
    CorruptLog { path: PathBuf, offset: usize },
    #[error("write-ahead log {path}: transaction {found} follows revision {expected}")]
    RevisionGap {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("transaction not stored: {0}")]
    Append(io::Error),
    #[error("store is unusable after a failed write could not be undone; restart mesh-control")]
    Poisoned,
    #[error(transparent)]
    Etcd(#[from] etcd::Error),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// A resource and the store revision at which it last changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub version: u64,
    pub resource: Resource,
}

/// What an apply does to one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        })
    }
}

/// An apply, checked against the configuration it would change.
#[derive(Debug)]
pub struct Plan {
    pub outcomes: Vec<(ResourceId, Outcome)>,
    /// Only what actually changes.
    pub changes: Vec<Change>,
    /// The revision the changes commit as: the next one. Routes and policies
    /// created by the plan carry it as their creation revision, so the plan
    /// must be committed before anything else is.
    pub revision: u64,
}

/// The configuration in memory, with the index the cross-resource checks need.
#[derive(Debug, Default)]
pub struct State {
    revision: u64,
    resources: BTreeMap<ResourceId, Stored>,
    addresses: HashMap<Ipv4Addr, ResourceId>,
}

impl State {
    /// The state at `revision` holding `resources` (each at its own version).
    pub(crate) fn from_stored(revision: u64, resources: impl IntoIterator<Item = Stored>) -> State {
        let mut state = State {
            revision,
            ..State::default()
        };
        for stored in resources {
            let id = stored.resource.id();
            for address in stored.resource.addresses() {
                state.addresses.insert(address, id.clone());
            }
            state.resources.insert(id, stored);
        }
        state
    }

    /// The changes that turn `self` into `other`'s resources.
    pub(crate) fn diff(&self, other: &State) -> Vec<Change> {
        let mut changes: Vec<Change> = self
            .resources
            .keys()
            .filter(|id| !other.resources.contains_key(id))
            .map(|id| Change::Delete(id.clone()))
            .collect();
        changes.extend(
            other
                .resources
                .iter()
                .filter(|(id, s)| self.resources.get(id) != Some(s))
                .map(|(_, s)| Change::Put(s.resource.clone())),
        );
        changes
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn get(&self, id: &ResourceId) -> Option<&Stored> {
        self.resources.get(id)
    }

    /// Every resource, ordered by kind, namespace and name.
    pub fn iter(&self) -> impl Iterator<Item = &Stored> {
        self.resources.values()
    }

    /// Resources of one kind, optionally of one namespace, in order.
    pub fn of_kind<'a>(
        &'a self,
        kind: Kind,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Stored> {
        self.resources
            .iter()
            .filter(move |(id, _)| id.kind == kind && namespace.is_none_or(|ns| ns == id.namespace))
            .map(|(_, s)| s)
    }

    /// What applying `batch` would do, or why the result would be invalid.
    /// A route or policy keeps the creation revision of the one it replaces;
    /// a new one gets the revision the plan commits as.
    pub fn plan_apply(&self, batch: Vec<Resource>) -> Result<Plan, resources::Error> {
        resources::check_addresses(&batch, |ip| self.addresses.get(&ip))?;
        resources::check_mtls_policies(&batch, |namespace| self.mtls_policy(namespace))?;
        resources::check_references(&batch, |namespace, name| self.service(namespace, name))?;
        let revision = self.revision + 1;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut changes = Vec::new();
        for mut resource in batch {
            let id = resource.id();
            let stored = self.resources.get(&id);
            resource.set_created_revision(
                stored
                    .and_then(|s| s.resource.created_revision())
                    .unwrap_or(revision),
            );
            let outcome = match stored {
                None => Outcome::Created,
                Some(s) if s.resource == resource => Outcome::Unchanged,
                Some(_) => Outcome::Configured,
            };
            if outcome != Outcome::Unchanged {
                changes.push(Change::Put(resource));
            }
            outcomes.push((id, outcome));
        }
        Ok(Plan {
            outcomes,
            changes,
            revision,
        })
    }

    /// A stored Service.
    fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        let id = ResourceId {
            kind: Kind::Service,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        match self.resources.get(&id).map(|s| &s.resource) {
            Some(Resource::Service(s)) => Some(s),
            _ => None,
        }
    }

    /// The MtlsPolicy of `namespace`, if it has one.
    fn mtls_policy(&self, namespace: &str) -> Option<ResourceId> {
        let first = ResourceId {
            kind: Kind::MtlsPolicy,
            namespace: namespace.to_owned(),
            name: String::new(),
        };
        self.resources
            .range(first..)
            .next()
            .map(|(id, _)| id)
            .filter(|id| id.kind == Kind::MtlsPolicy && id.namespace == namespace)
            .cloned()
    }

    pub(crate) fn apply(&mut self, revision: u64, changes: &[Change]) {
        for change in changes {
            match change {
                Change::Put(resource) => {
                    let id = resource.id();
                    self.unindex(&id);
                    for address in resource.addresses() {
                        self.addresses.insert(address, id.clone());
                    }
                    self.resources.insert(
                        id,
                        Stored {
                            version: revision,
                            resource: resource.clone(),
                        },
                    );
                }
                Change::Delete(id) => {
                    self.unindex(id);
                    self.resources.remove(id);
                }
            }
        }
        self.revision = revision;
    }

    fn unindex(&mut self, id: &ResourceId) {
        if let Some(old) = self.resources.get(id) {
            for address in old.resource.addresses() {
                if self.addresses.get(&address) == Some(id) {
                    self.addresses.remove(&address);
                }
            }
        }
    }
}

#[derive(Serialize)]
struct SnapshotRef<'a> {
    format: u32,
    revision: u64,
    resources: Vec<&'a Stored>,
}

#[derive(Deserialize)]
struct Snapshot {
    format: u32,
    revision: u64,
    resources: Vec<Stored>,
}

#[derive(Serialize)]
struct TransactionRef<'a> {
    revision: u64,
    changes: &'a [Change],
}

#[derive(Deserialize)]
struct Transaction {
    revision: u64,
    changes: Vec<Change>,
}

/// The durable store; one per directory (enforced with a lock file).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    state: State,
    log: File,
    log_len: u64,
    log_records: usize,
    compact_after: usize,
    poisoned: bool,
    _lock: File,
}

impl Store {
    /// Opens (creating it if needed) the store in `dir`; the log is compacted
    /// into a new snapshot once it holds `compact_after` transactions.
    pub fn open(dir: &Path, compact_after: usize) -> Result<Store, Error> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let lock_path = dir.join(LOCK);
        let lock = File::create(&lock_path).map_err(io_error(&lock_path))?;
        lock.try_lock().map_err(|e| match e {
            fs::TryLockError::WouldBlock => Error::Locked(dir.to_owned()),
            fs::TryLockError::Error(source) => Error::Io {
                path: lock_path.clone(),
                source,
            },
        })?;

        let mut state = State::default();
        let snapshot_path = dir.join(SNAPSHOT);
        match fs::read(&snapshot_path) {
            Ok(bytes) => {
                let corrupt = |reason: String| Error::CorruptSnapshot {
                    path: snapshot_path.clone(),
                    reason,
                };
                let snapshot: Snapshot =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                if snapshot.format != FORMAT {
                    return Err(corrupt(format!("unknown format {}", snapshot.format)));
                }
                state = State::from_stored(snapshot.revision, snapshot.resources);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&snapshot_path)(e)),
        }

        let log_path = dir.join(LOG);
        let bytes = match fs::read(&log_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error(&log_path)(e)),
        };
        let (valid_len, log_records) = replay(&log_path, &bytes, &mut state)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_error(&log_path))?;
        if valid_len < bytes.len() {
            warn!(
                path = %log_path.display(),
                dropped_bytes = bytes.len() - valid_len,
                "dropping the torn tail of the write-ahead log"
            );
            log.set_len(valid_len as u64)
                .and_then(|()| log.sync_all())
                .map_err(io_error(&log_path))?;
        }
        sync_dir(dir)?;
        info!(
            dir = %dir.display(),
            revision = state.revision,
            resources = state.resources.len(),
            replayed = log_records,
            "store opened"
        );
        Ok(Store {
            dir: dir.to_owned(),
            state,
            log,
            log_len: valid_len as u64,
            log_records,
            compact_after: compact_after.max(1),
            poisoned: false,
            _lock: lock,
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Makes `changes` durable as one transaction and applies them; returns
    /// the new revision. Nothing changes, on disk or in memory, on error.
    pub fn commit(&mut self, changes: &[Change]) -> Result<u64, Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let revision = self.state.revision + 1;
        let line = encode_record(&TransactionRef { revision, changes });
        let written = self
            .log
            .write_all(&line)
            .and_then(|()| self.log.sync_data());
        if let Err(e) = written {
            // Cut the partial line, so later appends don't follow garbage.
            let undone = self
                .log
                .set_len(self.log_len)
                .and_then(|()| self.log.sync_data());
            if undone.is_err() {
                self.poisoned = true;
            }
            return Err(Error::Append(e));
        }
        self.log_len += line.len() as u64;
        self.log_records += 1;
        self.state.apply(revision, changes);
        if self.log_records >= self.compact_after
            && let Err(e) = self.compact()
        {
            warn!(error = %e, "store compaction failed; the log keeps growing");
        }
        Ok(revision)
    }

    fn compact(&mut self) -> Result<(), Error> {
        let tmp = self.dir.join(SNAPSHOT_TMP);
        let file = File::create(&tmp).map_err(io_error(&tmp))?;
        let mut out = BufWriter::new(file);
        serde_json::to_writer(
            &mut out,
            &SnapshotRef {
                format: FORMAT,
                revision: self.state.revision,
                resources: self.state.resources.values().collect(),
            },
        )
        .map_err(|e| io_error(&tmp)(e.into()))?;
        let file = out
            .into_inner()
            .map_err(|e| io_error(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io_error(&tmp))?;
        let snapshot = self.dir.join(SNAPSHOT);
        fs::rename(&tmp, &snapshot).map_err(io_error(&snapshot))?;
        sync_dir(&self.dir)?;
        let log_path = self.dir.join(LOG);
        self.log
            .set_len(0)
            .and_then(|()| self.log.sync_all())
            .map_err(io_error(&log_path))?;
        info!(
            revision = self.state.revision,
            transactions = self.log_records,
            "store compacted"
        );
        self.log_len = 0;
        self.log_records = 0;
        Ok(())
    }
}

/// Where the configuration is kept: a directory of this machine, or etcd,
/// shared with other replicas.
#[derive(Debug)]
pub enum Backend {
    File(Store),
    Etcd(Box<etcd::EtcdStore>),
}

impl Backend {
    pub fn state(&self) -> &State {
        match self {
            Backend::File(store) => store.state(),
            Backend::Etcd(store) => store.state(),
        }
    }

    /// Commits `changes`, planned against [`state`](Self::state), as the
    /// next revision. In etcd, a transaction another replica committed first
    /// makes this one fail with [`etcd::Error::Conflict`], changing nothing.
    pub fn commit(&mut self, changes: &[Change]) -> Result<u64, Error> {
        match self {
            Backend::File(store) => store.commit(changes),
            Backend::Etcd(store) => Ok(store.commit(changes)?),
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Replays the log onto `state`; returns the length of its valid prefix and
/// the number of records in it.
fn replay(path: &Path, bytes: &[u8], state: &mut State) -> Result<(usize, usize), Error> {
    let mut offset = 0;
    let mut records = 0;
    while let Some(len) = bytes[offset..].iter().position(|&b| b == b'\n') {
        let Some(tx) = decode_record(&bytes[offset..offset + len]) else {
            // A crash mid-append leaves a bad *last* record; a bad record
            // before good ones is damage we must not paper over.
            let rest = &bytes[offset + len + 1..];
            if rest
                .split(|&b| b == b'\n')
                .any(|line| decode_record(line).is_some())
            {
                return Err(Error::CorruptLog {
                    path: path.to_owned(),
                    offset,
                });
            }
            break;
        };
        if tx.revision > state.revision {
            if tx.revision != state.revision + 1 {
                return Err(Error::RevisionGap {
                    path: path.to_owned(),
                    expected: state.revision + 1,
                    found: tx.revision,
                });
            }
            state.apply(tx.revision, &tx.changes);
        }
        records += 1;
        offset += len + 1;
    }
    Ok((offset, records))
}

fn encode_record(tx: &TransactionRef<'_>) -> Vec<u8> {
    let json = serde_json::to_vec(tx).expect("transactions serialize");
    let mut line = format!("{:08x} ", crc32(&json)).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    line
}

fn decode_record(line: &[u8]) -> Option<Transaction> {
    let (crc, json) = (line.get(..8)?, line.get(9..)?);
    let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
    if line[8] != b' ' || crc32(json) != crc {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// CRC-32 (IEEE 802.3, as zlib), table-driven.
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::parse_documents;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos();
            let dir = std::env::temp_dir()
                .join(format!("mesh-store-{name}-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&dir).expect("temp dir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn workload(name: &str, ip: &str) -> Resource {
        parse_documents(&format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}}}\nspec: {{node: n1, ip: {ip}}}\n"
        ))
        .expect("valid")
        .remove(0)
    }

    fn put(store: &mut Store, resources: Vec<Resource>) -> u64 {
        let plan = store.state().plan_apply(resources).expect("valid plan");
        store.commit(&plan.changes).expect("commit")
    }

    fn contents(state: &State) -> Vec<Stored> {
        state.iter().cloned().collect()
    }

    fn mtls_policy(name: &str, namespace: &str) -> Resource {
        parse_documents(&format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: MtlsPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{mode: PERMISSIVE}}\n"
        ))
        .expect("valid")
        .remove(0)
    }

    #[test]
    fn a_second_mtls_policy_in_a_namespace_is_refused() {
        let dir = TempDir::new("mtls-policy");
        let mut store = Store::open(&dir.0, 100).expect("open");
        put(
            &mut store,
            vec![mtls_policy("a", "shop"), mtls_policy("z", "web")],
        );
        let e = store
            .state()
            .plan_apply(vec![workload("w", "198.18.0.1"), mtls_policy("b", "shop")])
            .expect_err("shop has one");
        assert_eq!(
            e.to_string(),
            "MtlsPolicy/shop/b: the namespace already has MtlsPolicy/shop/a; at most one MtlsPolicy per namespace"
        );
        // Changing the one it has is fine, and so is a new namespace.
        put(
            &mut store,
            vec![mtls_policy("a", "shop"), mtls_policy("a", "other")],
        );
        // Once deleted, another may take its place.
        let id = mtls_policy("a", "shop").id();
        store.commit(&[Change::Delete(id)]).expect("delete");
        put(&mut store, vec![mtls_policy("b", "shop")]);
    }

    fn service(name: &str, vip: &str) -> Resource {
        parse_documents(&format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{vips: [{vip}], ports: [{{port: 80}}, {{port: 8080}}], selector: {{app: {name}}}}}\n"
        ))
        .expect("valid")
        .remove(0)
    }

    fn route(name: &str, parent_port: u16, backend: &str) -> Resource {
        parse_documents(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: echo, port: {parent_port}}}]\n  rules: [{{backendRefs: [{{name: {backend}, port: 8080}}]}}]\n"
        ))
        .expect("valid")
        .remove(0)
    }

    fn created(state: &State, resource: &Resource) -> (u64, u64) {
        let stored = state.get(&resource.id()).expect("stored");
        (
            stored
                .resource
                .created_revision()
                .expect("a route or policy"),
            stored.version,
        )
    }

    #[test]
    fn a_route_must_name_services_and_ports_that_exist() {
        let dir = TempDir::new("route-refs");
        let mut store = Store::open(&dir.0, 100).expect("open");
        put(&mut store, vec![service("echo", "198.19.0.1")]);
        let e = store
            .state()
            .plan_apply(vec![workload("w", "198.18.0.1"), route("web", 81, "echo")])
            .expect_err("no port 81");
        assert_eq!(
            e.to_string(),
            "HTTPRoute/default/web: spec.parentRefs[0].port: Service default/echo has no port 81 (it has 80, 8080)"
        );
        let e = store
            .state()
            .plan_apply(vec![route("web", 80, "echo-v2")])
            .expect_err("no echo-v2");
        assert_eq!(
            e.to_string(),
            "HTTPRoute/default/web: spec.rules[0].backendRefs[0]: Service default/echo-v2 does not exist"
        );
        assert_eq!(store.state().revision(), 1, "nothing applied");
        // The backend may come with the route.
        put(
            &mut store,
            vec![
                route("web", 80, "echo-v2"),
                service("echo-v2", "198.19.0.2"),
            ],
        );
        // Deleting a Service a route names is allowed, as in Kubernetes.
        let id = service("echo-v2", "198.19.0.2").id();
        store.commit(&[Change::Delete(id)]).expect("delete");
        assert!(store.state().get(&route("web", 80, "echo").id()).is_some());
    }

    #[test]
    fn a_route_keeps_its_creation_revision_until_it_is_deleted() {
        let dir = TempDir::new("route-created");
        let mut store = Store::open(&dir.0, 100).expect("open");
        put(
            &mut store,
            vec![service("echo", "198.19.0.1"), service("v2", "198.19.0.2")],
        );
        let web = route("web", 80, "echo");
        assert_eq!(put(&mut store, vec![web.clone()]), 2);
        assert_eq!(created(store.state(), &web), (2, 2));
        put(&mut store, vec![workload("w", "198.18.0.1")]);
        // An update changes the version, not the creation revision.
        let changed = route("web", 80, "v2");
        let plan = store
            .state()
            .plan_apply(vec![changed.clone()])
            .expect("plan");
        assert_eq!(plan.outcomes[0].1, Outcome::Configured);
        assert_eq!(plan.revision, 4);
        assert_eq!(store.commit(&plan.changes).expect("commit"), 4);
        assert_eq!(created(store.state(), &changed), (2, 4));
        // The same again, or the document `get` shows, changes nothing.
        let stored = store.state().get(&web.id()).expect("stored");
        let doc =
            serde_yaml_ng::to_string(&stored.resource.to_document(stored.version)).expect("yaml");
        for again in [
            changed.clone(),
            parse_documents(&doc).expect("valid").remove(0),
        ] {
            let plan = store.state().plan_apply(vec![again]).expect("plan");
            assert_eq!(plan.outcomes[0].1, Outcome::Unchanged);
            assert!(plan.changes.is_empty());
        }
        // A route created in a later revision is younger.
        put(&mut store, vec![route("other", 80, "echo")]);
        assert_eq!(created(store.state(), &route("other", 80, "echo")), (5, 5));
        // Kept across a restart, from the log and from a snapshot.
        drop(store);
        let mut store = Store::open(&dir.0, 1).expect("reopen");
        assert_eq!(created(store.state(), &web), (2, 4));
        // Deleted and created again, it is a new route.
        store.commit(&[Change::Delete(web.id())]).expect("delete");
        assert_eq!(put(&mut store, vec![web.clone()]), 7);
        assert_eq!(created(store.state(), &web), (7, 7));
        assert!(dir.0.join(SNAPSHOT).exists(), "compacted");
        drop(store);
        let store = Store::open(&dir.0, 100).expect("reopen");
        assert_eq!(created(store.state(), &web), (7, 7));
    }

    fn traffic_policy(name: &str, target: &str, port: Option<u16>, attempts: u32) -> Resource {
        let port = port.map(|p| format!(", port: {p}")).unwrap_or_default();
        parse_documents(&format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {{name: {target}{port}}}\n  retries: {{attempts: {attempts}, budget: {{percent: 12.5}}}}\n"
        ))
        .expect("valid")
        .remove(0)
    }

    #[test]
    fn a_traffic_policy_targets_a_service_that_exists_and_keeps_its_creation_revision() {
        let dir = TempDir::new("traffic-policy");
        let mut store = Store::open(&dir.0, 100).expect("open");
        put(&mut store, vec![service("echo", "198.19.0.1")]);
        let e = store
            .state()
            .plan_apply(vec![
                workload("w", "198.18.0.1"),
                traffic_policy("p", "gone", None, 2),
            ])
            .expect_err("no Service gone");
        assert_eq!(
            e.to_string(),
            "TrafficPolicy/default/p: spec.targetRef.name: Service default/gone does not exist"
        );
        let e = store
            .state()
            .plan_apply(vec![traffic_policy("p", "echo", Some(81), 2)])
            .expect_err("no port 81");
        assert_eq!(
            e.to_string(),
            "TrafficPolicy/default/p: spec.targetRef.port: Service default/echo has no port 81 (it has 80, 8080)"
        );
        assert_eq!(store.state().revision(), 1, "nothing applied");

        let p = traffic_policy("p", "echo", Some(8080), 2);
        assert_eq!(put(&mut store, vec![p.clone()]), 2);
        assert_eq!(created(store.state(), &p), (2, 2));
        let changed = traffic_policy("p", "echo", None, 3);
        assert_eq!(put(&mut store, vec![changed.clone()]), 3);
        assert_eq!(created(store.state(), &changed), (2, 3));
        // What `get` shows applies back unchanged (f64s included).
        let stored = store.state().get(&p.id()).expect("stored");
        let doc =
            serde_yaml_ng::to_string(&stored.resource.to_document(stored.version)).expect("yaml");
        let plan = store
            .state()
            .plan_apply(parse_documents(&doc).expect("valid"))
            .expect("plan");
        assert_eq!(plan.outcomes[0].1, Outcome::Unchanged, "{doc}");
        // Deleting the Service it targets is allowed, as for routes.
        store
            .commit(&[Change::Delete(service("echo", "198.19.0.1").id())])
            .expect("delete");
        // Kept across a restart.
        drop(store);
        let store = Store::open(&dir.0, 100).expect("reopen");
        assert_eq!(created(store.state(), &changed), (2, 3));
        assert_eq!(store.state().get(&p.id()).expect("kept").resource, {
            let mut want = changed.clone();
            want.set_created_revision(2);
            want
        });
    }

    fn authorization_policy(name: &str, namespace: &str, action: &str) -> Resource {
        parse_documents(&format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  selector: {{matchLabels: {{app: nothing}}}}\n  action: {action}\n  rules: [{{from: [{{source: {{ipBlocks: [198.18.0.0/15]}}}}]}}]\n"
        ))
        .expect("valid")
        .remove(0)
    }

    #[test]
    fn an_authorization_policy_needs_no_other_resource_and_keeps_its_creation_revision() {
        let dir = TempDir::new("authorization-policy");
        let mut store = Store::open(&dir.0, 100).expect("open");
        // No workload has the label, and the root namespace holds nothing
        // else: both are fine.
        let p = authorization_policy("p", "mesh-system", "DENY");
        assert_eq!(put(&mut store, vec![p.clone()]), 1);
        assert_eq!(created(store.state(), &p), (1, 1));
        put(&mut store, vec![workload("w", "198.18.0.1")]);
        let changed = authorization_policy("p", "mesh-system", "AUDIT");
        assert_eq!(put(&mut store, vec![changed.clone()]), 3);
        assert_eq!(created(store.state(), &changed), (1, 3));
        // What `get` shows applies back unchanged.
        let stored = store.state().get(&p.id()).expect("stored");
        let doc =
            serde_yaml_ng::to_string(&stored.resource.to_document(stored.version)).expect("yaml");
        let plan = store
            .state()
            .plan_apply(parse_documents(&doc).expect("valid"))
            .expect("plan");
        assert_eq!(plan.outcomes[0].1, Outcome::Unchanged, "{doc}");
        // Kept across a restart.
        drop(store);
        let store = Store::open(&dir.0, 100).expect("reopen");
        assert_eq!(store.state().get(&p.id()).expect("kept").resource, {
            let mut want = changed.clone();
            want.set_created_revision(1);
            want
        });
        assert_eq!(
            store
                .state()
                .of_kind(Kind::AuthorizationPolicy, Some("mesh-system"))
                .count(),
            1
        );
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn reopening_after_writes_loses_nothing() {
        let dir = TempDir::new("reopen");
        let (before, revision) = {
            let mut store = Store::open(&dir.0, 100).expect("open");
            put(
                &mut store,
                vec![workload("a", "198.18.0.1"), workload("b", "198.18.0.2")],
            );
            put(&mut store, vec![workload("a", "198.18.0.3")]);
            let id = workload("b", "198.18.0.2").id();
            store.commit(&[Change::Delete(id)]).expect("delete");
            (contents(store.state()), store.state().revision())
        };
        assert_eq!(revision, 3);
        let store = Store::open(&dir.0, 100).expect("reopen");
        assert_eq!(store.state().revision(), 3);
        assert_eq!(contents(store.state()), before);
        assert_eq!(before.len(), 1);
        assert_eq!(before[0].version, 2);
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = TempDir::new("lock");
        let _first = Store::open(&dir.0, 100).expect("open");
        let second = Store::open(&dir.0, 100).expect_err("locked");
        assert!(matches!(second, Error::Locked(_)), "{second}");
    }

    #[test]
    fn a_torn_tail_is_ignored_and_cut() {
        let dir = TempDir::new("torn");
        let before = {
            let mut store = Store::open(&dir.0, 100).expect("open");
            put(&mut store, vec![workload("a", "198.18.0.1")]);
            contents(store.state())
        };
        let log = dir.0.join(LOG);
        let full = fs::read(&log).expect("log");
        // A crash in the middle of appending the next transaction.
        let mut torn = full.clone();
        torn.extend_from_slice(&full[..full.len() / 2]);
        fs::write(&log, &torn).expect("tear");
        {
            let mut store = Store::open(&dir.0, 100).expect("reopen");
            assert_eq!(contents(store.state()), before);
            assert_eq!(fs::read(&log).expect("log"), full, "torn tail cut");
            put(&mut store, vec![workload("b", "198.18.0.2")]);
        }
        // A complete line with a bad checksum, last: also a torn write.
        let mut flipped = fs::read(&log).expect("log");
        let at = flipped.len() - 5;
        flipped[at] ^= 1;
        fs::write(&log, &flipped).expect("flip");
        let store = Store::open(&dir.0, 100).expect("reopen");
        assert_eq!(contents(store.state()), before);
        assert_eq!(store.state().revision(), 1);
    }

    #[test]
    fn corruption_before_valid_transactions_is_an_error() {
        let dir = TempDir::new("corrupt");
        {
            let mut store = Store::open(&dir.0, 100).expect("open");
            put(&mut store, vec![workload("a", "198.18.0.1")]);
            put(&mut store, vec![workload("b", "198.18.0.2")]);
        }
        let log = dir.0.join(LOG);
        let mut bytes = fs::read(&log).expect("log");
        bytes[12] ^= 1;
        fs::write(&log, &bytes).expect("corrupt");
        let e = Store::open(&dir.0, 100).expect_err("corrupt");
        assert!(matches!(e, Error::CorruptLog { offset: 0, .. }), "{e}");
    }

    #[test]
    fn compaction_keeps_everything() {
        let dir = TempDir::new("compact");
        let before = {
            let mut store = Store::open(&dir.0, 3).expect("open");
            for i in 1..=7 {
                put(
                    &mut store,
                    vec![workload(&format!("w{i}"), &format!("198.18.0.{i}"))],
                );
            }
            assert!(dir.0.join(SNAPSHOT).exists());
            assert_eq!(store.log_records, 1, "compacted after 3 and 6");
            contents(store.state())
        };
        assert_eq!(before.len(), 7);
        let store = Store::open(&dir.0, 3).expect("reopen");
        assert_eq!(store.state().revision(), 7);
        assert_eq!(contents(store.state()), before);
        assert!(!dir.0.join(SNAPSHOT_TMP).exists());
    }

    #[test]
    fn log_lines_already_in_the_snapshot_are_skipped() {
        let dir = TempDir::new("overlap");
        let log = dir.0.join(LOG);
        let before = {
            let mut store = Store::open(&dir.0, 2).expect("open");
            put(&mut store, vec![workload("a", "198.18.0.1")]);
            let old_log = fs::read(&log).expect("log");
            put(&mut store, vec![workload("b", "198.18.0.2")]);
            // A crash after the snapshot rename but before the log was
            // emptied leaves revision 1 in both.
            fs::write(&log, old_log).expect("restore log");
            contents(store.state())
        };
        let store = Store::open(&dir.0, 2).expect("reopen");
        assert_eq!(store.state().revision(), 2);
        assert_eq!(contents(store.state()), before);
    }

    #[test]
    fn plans_say_what_changes() {
        let dir = TempDir::new("plan");
        let mut store = Store::open(&dir.0, 100).expect("open");
        put(&mut store, vec![workload("a", "198.18.0.1")]);
        let plan = store
            .state()
            .plan_apply(vec![
                workload("a", "198.18.0.1"),
                workload("b", "198.18.0.2"),
            ])
            .expect("plan");
        let outcomes: Vec<String> = plan
            .outcomes
            .iter()
            .map(|(id, o)| format!("{id} {o}"))
            .collect();
        assert_eq!(
            outcomes,
            ["Workload/default/a unchanged", "Workload/default/b created"]
        );
        assert_eq!(plan.changes.len(), 1);
        let e = store
            .state()
            .plan_apply(vec![workload("c", "198.18.0.1")])
            .expect_err("IP taken");
        assert!(
            e.to_string()
                .contains("already owned by Workload/default/a"),
            "{e}"
        );
        // Moving an IP from one workload to another in one batch is fine.
        store
            .state()
            .plan_apply(vec![
                workload("a", "198.18.0.9"),
                workload("c", "198.18.0.1"),
            ])
            .expect("swap");
    }
}
