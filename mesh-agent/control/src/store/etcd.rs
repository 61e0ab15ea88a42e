//! The configuration in etcd, shared by several `mesh-control` replicas
//! (`--store etcd://host:port[,host:port...][/prefix]`).
//!
//! ```text
//! <prefix>/revision                          the mesh revision, decimal
//! <prefix>/resources/<kind>/<ns>/<name>      {"version":V,"resource":{..}} (as the file store's snapshot)
//! <prefix>/ca                                {"cert":PEM,"key":PEM}: the replicas' shared root CA
//! <prefix>/leader/<lease>                    etcd election keys (see `lead`)
//! ```
//!
//! Each replica holds the whole [`State`] in memory, as with the file store.
//! A commit is one etcd transaction guarded by a compare on
//! `<prefix>/revision`: it writes the next revision and every changed key,
//! or, if another replica committed first, nothing
//! ([`Error::Conflict`]; the caller catches up and plans again). Every
//! replica watches the prefix and applies the transactions of the others
//! ([`replicate`]); one that was away past an etcd compaction reloads.
//! The only single-writer job is compacting etcd's history, which the
//! elected leader does ([`lead`]).
use std::{collections::BTreeMap, fmt, future::Future, time::Duration};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use mesh_api::identity::Ca;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tracing::{info, warn};

use super::{State, Stored};
use crate::resources::{Change, Kind, Resource, ResourceId};

/// Prefix of the keys when the `--store` URL names none.
pub const DEFAULT_PREFIX: &str = "/mesh";
/// Attempts at one etcd request that failed in transport (a member went
/// away mid-request); a guarded commit is safe to resend.
const REQUEST_ATTEMPTS: u32 = 6;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the leader's lease outlives a leader that stopped renewing it.
const LEASE_TTL_SECONDS: i64 = 10;
/// How often the leader compacts etcd's history, to the revision of the
/// tick before: a replica whose watch broke for less than this resumes
/// from its revision, one away longer reloads.
pub const COMPACT_INTERVAL: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--store {value:?}: {reason} (expected etcd://host:port[,host:port...][/prefix], or file)"
    )]
    BadLocation { value: String, reason: String },
    #[error("etcd {endpoints}: {source}")]
    Connect {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("etcd: {0}")]
    Request(#[from] etcd_client::Error),
    #[error("etcd key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// Another replica committed `stored` first; this transaction (which
    /// would have been `planned`) changed nothing.
    #[error("revision {planned} was committed by another replica first (etcd holds {stored})")]
    Conflict { planned: u64, stored: u64 },
    #[error("the shared CA in etcd ({key}): {reason}")]
    Ca { key: String, reason: String },
}

/// Where the etcd store is: its members and the prefix of every key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub endpoints: Vec<String>,
    pub prefix: String,
}

impl Config {
    /// Parses `etcd://host:port[,host:port...][/prefix]`.
    pub fn parse(value: &str) -> Result<Config, Error> {
        let bad = |reason: &str| Error::BadLocation {
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = value
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("not an etcd:// URL"))?;
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, DEFAULT_PREFIX),
        };
        if prefix.is_empty() {
            return Err(bad("the prefix is empty"));
        }
        if prefix.contains("//") || prefix.chars().any(char::is_whitespace) {
            return Err(bad("the prefix has an empty segment or a space"));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| bad(&format!("member {host:?} has no :port")))?;
            if name.is_empty() || name.contains('@') {
                return Err(bad(&format!("member {host:?} has no host")));
            }
            port.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(&format!("member {host:?}: port {port:?} is not 1-65535")))?;
            endpoints.push(format!("http://{host}"));
        }
        Ok(Config {
            endpoints,
            prefix: prefix.to_owned(),
        })
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://"))
            .collect();
        write!(f, "etcd://{}{}", hosts.join(","), self.prefix)
    }
}

/// The keys under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    fn revision(&self) -> String {
        format!("{}/revision", self.prefix)
    }

    fn resources(&self) -> String {
        format!("{}/resources/", self.prefix)
    }

    fn resource(&self, id: &ResourceId) -> String {
        format!(
            "{}/resources/{}/{}/{}",
            self.prefix,
            id.kind.as_str(),
            id.namespace,
            id.name
        )
    }

    fn ca(&self) -> String {
        format!("{}/ca", self.prefix)
    }

    fn election(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// The resource a key names, if it is a resource key.
    fn parse_resource(&self, key: &str) -> Option<Result<ResourceId, Error>> {
        let rest = key.strip_prefix(&self.resources())?;
        let corrupt = || Error::Corrupt {
            key: key.to_owned(),
            reason: "not <kind>/<namespace>/<name>".to_owned(),
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(kind), Some(namespace), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Some(Err(corrupt()));
        };
        let Some(kind) = Kind::ALL.into_iter().find(|k| k.as_str() == kind) else {
            return Some(Err(corrupt()));
        };
        Some(Ok(ResourceId {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }))
    }
}

#[derive(Serialize)]
struct StoredRef<'a> {
    version: u64,
    resource: &'a Resource,
}

#[derive(Serialize, Deserialize)]
struct CaPem {
    cert: String,
    key: String,
}

/// One replica's view of the store: the client, and the state as of the
/// last transaction it committed or replicated.
pub struct EtcdStore {
    client: Client,
    keys: Keys,
    state: State,
    runtime: Handle,
    /// The etcd revision of the read that loaded the state: replication
    /// watches from the one after.
    loaded_at: i64,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.keys.prefix)
            .field("revision", &self.state.revision)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd and loads the whole state in one consistent read.
    pub async fn open(config: &Config) -> Result<EtcdStore, Error> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_require_leader(true);
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|source| Error::Connect {
                endpoints: config.to_string(),
                source,
            })?;
        let keys = Keys {
            prefix: config.prefix.clone(),
        };
        let (state, loaded_at) = load(&client, &keys).await.map_err(|e| match e {
            Error::Request(source) => Error::Connect {
                endpoints: config.to_string(),
                source,
            },
            e => e,
        })?;
        info!(
            store = %config,
            revision = state.revision,
            resources = state.resources.len(),
            etcd_revision = loaded_at,
            "store opened"
        );
        Ok(EtcdStore {
            client,
            keys,
            state,
            runtime: Handle::current(),
            loaded_at,
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(crate) fn loaded_at(&self) -> i64 {
        self.loaded_at
    }

    pub(crate) fn runtime(&self) -> &Handle {
        &self.runtime
    }

    /// Commits `changes` as the next revision in one guarded transaction.
    /// Blocks on etcd: call it off the async runtime.
    pub fn commit(&mut self, changes: &[Change]) -> Result<u64, Error> {
        let base = self.state.revision;
        let revision = base + 1;
        let revision_key = self.keys.revision();
        let guard = if base == 0 {
            Compare::create_revision(revision_key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(revision_key.clone(), CompareOp::Equal, base.to_string())
        };
        let mut ops = Vec::with_capacity(changes.len() + 1);
        ops.push(TxnOp::put(revision_key.clone(), revision.to_string(), None));
        for change in changes {
            ops.push(match change {
                Change::Put(resource) => TxnOp::put(
                    self.keys.resource(&resource.id()),
                    serde_json::to_vec(&StoredRef {
                        version: revision,
                        resource,
                    })
                    .expect("resources serialize"),
                    None,
                ),
                Change::Delete(id) => TxnOp::delete(self.keys.resource(id), None),
            });
        }
        let txn = Txn::new()
            .when([guard])
            .and_then(ops)
            .or_else([TxnOp::get(revision_key.clone(), None)]);
        let client = self.client.clone();
        let response = self.runtime.block_on(retrying("commit", || {
            let mut client = client.clone();
            let txn = txn.clone();
            async move { client.txn(txn).await }
        }))?;
        if !response.succeeded() {
            let stored = response
                .op_responses()
                .into_iter()
                .find_map(|op| match op {
                    TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                    _ => None,
                })
                .map(|kv| parse_revision(&kv))
                .transpose()?
                .unwrap_or(0);
            return Err(Error::Conflict {
                planned: revision,
                stored,
            });
        }
        self.state.apply(revision, changes);
        Ok(revision)
    }

    /// A transaction another replica committed.
    pub(crate) fn replicated(&mut self, revision: u64, changes: &[Change]) {
        self.state.apply(revision, changes);
    }

    /// The state reloaded after a gap in replication.
    pub(crate) fn reloaded(&mut self, state: State) {
        self.state = state;
    }
}

fn parse_revision(kv: &KeyValue) -> Result<u64, Error> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    std::str::from_utf8(kv.value())
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Corrupt {
            key,
            reason: format!(
                "revision {:?} is not a number",
                String::from_utf8_lossy(kv.value())
            ),
        })
}

fn parse_stored(keys: &Keys, kv: &KeyValue, id: &ResourceId) -> Result<Stored, Error> {
    let corrupt = |reason: String| Error::Corrupt {
        key: keys.resource(id),
        reason,
    };
    let stored: Stored =
        serde_json::from_slice(kv.value()).map_err(|e| corrupt(format!("unreadable: {e}")))?;
    if stored.resource.id() != *id {
        return Err(corrupt(format!("holds {}", stored.resource.id())));
    }
    Ok(stored)
}

/// Whether a failed request may be sent again: the member went away or
/// lost its leader, not a refusal.
fn transient(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        ),
        _ => false,
    }
}

/// `request`, sent again (a bounded number of times) while it fails in
/// transport: with several members, the next attempt may reach a live one.
async fn retrying<T, F, Fut>(what: &str, mut request: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut delay = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match request().await {
            Ok(t) => return Ok(t),
            Err(e) if attempt < REQUEST_ATTEMPTS && transient(&e) => {
                warn!(what, attempt, error = %e, "etcd request failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The whole state in one consistent (linearizable) read, and the etcd
/// revision it was read at.
async fn load(client: &Client, keys: &Keys) -> Result<(State, i64), Error> {
    let response = retrying("load", || {
        let mut client = client.clone();
        let prefix = keys.all();
        async move {
            client
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
        }
    })
    .await?;
    let at = response.header().map_or(0, |h| h.revision());
    let mut revision = None;
    let mut resources = Vec::new();
    for kv in response.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        if key == keys.revision() {
            revision = Some(parse_revision(kv)?);
        } else if let Some(id) = keys.parse_resource(&key) {
            resources.push(parse_stored(keys, kv, &id?)?);
        }
    }
    if revision.is_none() && !resources.is_empty() {
        return Err(Error::Corrupt {
            key: keys.revision(),
            reason: format!("missing, with {} resources stored", resources.len()),
        });
    }
    Ok((State::from_stored(revision.unwrap_or(0), resources), at))
}

/// What replication hands the control plane.
pub enum Replicated {
    /// A transaction another replica committed (or this one: the control
    /// plane skips revisions it already holds).
    Transaction { revision: u64, changes: Vec<Change> },
    /// The whole state, read again after a gap.
    Reload(State),
}

/// What the control plane made of a [`Replicated`].
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Applied,
    /// A revision is missing before this one: reload.
    Gap,
    /// The control plane is gone: stop replicating.
    Stop,
}

/// Events of one etcd revision, as a mesh transaction; `None` if they
/// touch no revision (the CA, election keys).
fn transaction(keys: &Keys, events: &[etcd_client::Event]) -> Result<Option<Replicated>, Error> {
    let mut revision = None;
    let mut changes = Vec::new();
    for event in events {
        let Some(kv) = event.kv() else { continue };
        let key = String::from_utf8_lossy(kv.key());
        if key == keys.revision() {
            if event.event_type() == EventType::Put {
                revision = Some(parse_revision(kv)?);
            }
        } else if let Some(id) = keys.parse_resource(&key) {
            let id = id?;
            changes.push(match event.event_type() {
                EventType::Put => Change::Put(parse_stored(keys, kv, &id)?.resource),
                EventType::Delete => Change::Delete(id),
            });
        }
    }
    match revision {
        Some(revision) => Ok(Some(Replicated::Transaction { revision, changes })),
        None if changes.is_empty() => Ok(None),
        None => Err(Error::Corrupt {
            key: keys.revision(),
            reason: "resources changed without a new revision".to_owned(),
        }),
    }
}

/// How a watch ended.
enum WatchEnd {
    Stop,
    /// Reload: the history to resume from was compacted, or a revision is
    /// missing.
    Reload(String),
    Broken(Error),
}

/// Follows the prefix from etcd revision `from` (the one after the state's
/// read) for as long as `apply` wants: each transaction goes to `apply` in
/// order. A broken watch resumes from the last revision seen; after a
/// compaction or a gap the state is read again whole. `apply` blocks (it
/// takes the store's lock), so it runs off the async threads.
pub async fn replicate<F>(client: Client, keys: Keys, from: i64, apply: F)
where
    F: Fn(Replicated) -> Flow + Clone + Send + 'static,
{
    let mut next = from;
    let mut delay = Duration::from_millis(50);
    loop {
        let end = watch(client.clone(), &keys, &mut next, &apply, &mut delay).await;
        let reason = match end {
            WatchEnd::Stop => return,
            WatchEnd::Broken(e) => {
                warn!(error = %e, resume_from = next, "etcd watch broke; resuming");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
            WatchEnd::Reload(reason) => reason,
        };
        warn!(%reason, "reloading the whole state from etcd");
        match load(&client, &keys).await {
            Ok((state, at)) => {
                let revision = state.revision;
                let apply = apply.clone();
                match tokio::task::spawn_blocking(move || apply(Replicated::Reload(state))).await {
                    Ok(Flow::Stop) | Err(_) => return,
                    Ok(_) => {}
                }
                info!(revision, etcd_revision = at, "state reloaded from etcd");
                next = at + 1;
            }
            Err(e) => {
                warn!(error = %e, "reloading from etcd failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn watch<F>(
    mut client: Client,
    keys: &Keys,
    next: &mut i64,
    apply: &F,
    delay: &mut Duration,
) -> WatchEnd
where
    F: Fn(Replicated) -> Flow + Clone + Send + 'static,
{
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*next)
        .with_progress_notify();
    let mut stream = match client.watch(keys.all(), Some(options)).await {
        Ok(stream) => stream,
        Err(e) => return WatchEnd::Broken(e.into()),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => {
                return WatchEnd::Broken(Error::Request(etcd_client::Error::WatchError(
                    "the watch stream ended".to_owned(),
                )));
            }
            Err(e) => return WatchEnd::Broken(e.into()),
        };
        if response.compact_revision() > 0 {
            return WatchEnd::Reload(format!(
                "etcd compacted its history to revision {}, past {}",
                response.compact_revision(),
                *next
            ));
        }
        if response.canceled() {
            return WatchEnd::Broken(Error::Request(etcd_client::Error::WatchError(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            ))));
        }
        *delay = Duration::from_millis(50);
        // etcd sends a revision's events together (we ask for no fragments).
        let mut by_revision: BTreeMap<i64, Vec<etcd_client::Event>> = BTreeMap::new();
        for event in response.events() {
            let at = event.kv().map_or(0, KeyValue::mod_revision);
            by_revision.entry(at).or_default().push(event.clone());
        }
        for (at, events) in by_revision {
            match transaction(keys, &events) {
                Ok(None) => {}
                Ok(Some(tx)) => {
                    let apply = apply.clone();
                    match tokio::task::spawn_blocking(move || apply(tx)).await {
                        Ok(Flow::Applied) => {}
                        Ok(Flow::Gap) => {
                            return WatchEnd::Reload(format!(
                                "a revision is missing before etcd revision {at}"
                            ));
                        }
                        Ok(Flow::Stop) | Err(_) => return WatchEnd::Stop,
                    }
                }
                Err(e) => return WatchEnd::Reload(e.to_string()),
            }
            *next = at + 1;
        }
        if response.events().is_empty()
            && let Some(header) = response.header()
        {
            // A progress notification: nothing before it is left to see.
            *next = (*next).max(header.revision() + 1);
        }
    }
}

/// Campaigns for leadership on a lease and, while leader, compacts etcd's
/// history every [`COMPACT_INTERVAL`] to the revision of the tick before.
/// `leader` reads 1 while this replica leads. Runs until `alive` says the
/// control plane is gone.
pub async fn lead(client: Client, keys: Keys, id: String, leader: Gauge, alive: impl Fn() -> bool) {
    while alive() {
        match lead_once(client.clone(), &keys, &id, &leader, &alive).await {
            Ok(()) => {}
            Err(e) => warn!(error = %e, "leader election: lost or failed; campaigning again"),
        }
        leader.set(0);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn lead_once(
    mut client: Client,
    keys: &Keys,
    id: &str,
    leader: &Gauge,
    alive: &impl Fn() -> bool,
) -> Result<(), Error> {
    let lease = client.lease_grant(LEASE_TTL_SECONDS, None).await?.id();
    let (mut keeper, mut acks) = client.lease_keep_alive(lease).await?;
    let keep_alive = async {
        let mut tick = tokio::time::interval(Duration::from_secs(
            u64::try_from(LEASE_TTL_SECONDS / 3).unwrap_or(1),
        ));
        loop {
            tick.tick().await;
            keeper.keep_alive().await?;
            match acks.message().await? {
                Some(ack) if ack.ttl() > 0 => {}
                _ => {
                    return Err::<(), Error>(Error::Request(
                        etcd_client::Error::LeaseKeepAliveError(format!("lease {lease:x} expired")),
                    ));
                }
            }
        }
    };
    let mut campaigner = client.clone();
    let election = keys.election();
    let serve = async {
        campaigner.campaign(election, id, lease).await?;
        leader.set(1);
        info!(replica = id, "elected leader: compacting etcd's history");
        let mut tick = tokio::time::interval(COMPACT_INTERVAL);
        tick.tick().await;
        let mut behind = None;
        while alive() {
            tick.tick().await;
            let now = campaigner
                .get(keys.revision(), None)
                .await?
                .header()
                .map_or(0, |h| h.revision());
            if let Some(to) = behind {
                match campaigner.compact(to, None).await {
                    Ok(_) => info!(etcd_revision = to, "compacted etcd's history"),
                    Err(e) => warn!(error = %e, etcd_revision = to, "compacting etcd failed"),
                }
            }
            behind = Some(now);
        }
        Ok::<(), Error>(())
    };
    let result = tokio::select! {
        r = keep_alive => r,
        r = serve => r,
    };
    let _ = client.lease_revoke(lease).await;
    result
}

/// The replicas' shared root CA, from `<prefix>/ca`: the first replica
/// generates it and stores it only if the key is still absent (one
/// transaction), so every replica ends with the same root.
pub async fn shared_ca(client: &Client, keys: &Keys, trust_domain: &str) -> Result<Ca, Error> {
    let key = keys.ca();
    let ca_error = |reason: String| Error::Ca {
        key: key.clone(),
        reason,
    };
    let from_value = |value: &[u8]| -> Result<Ca, Error> {
        let pem: CaPem =
            serde_json::from_slice(value).map_err(|e| ca_error(format!("unreadable: {e}")))?;
        Ca::from_pem(trust_domain, &pem.cert, &pem.key).map_err(|e| ca_error(e.to_string()))
    };
    let existing = retrying("read the CA", || {
        let mut client = client.clone();
        let key = key.clone();
        async move { client.get(key, None).await }
    })
    .await?;
    if let Some(kv) = existing.kvs().first() {
        return from_value(kv.value());
    }
    let ca = Ca::generate(trust_domain).map_err(|e| ca_error(e.to_string()))?;
    let (cert, private) = ca.to_pem();
    let value = serde_json::to_vec(&CaPem { cert, key: private }).expect("PEM serializes");
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), value, None)])
        .or_else([TxnOp::get(key.clone(), None)]);
    let response = retrying("store the CA", || {
        let mut client = client.clone();
        let txn = txn.clone();
        async move { client.txn(txn).await }
    })
    .await?;
    if response.succeeded() {
        info!(key, "generated the shared root CA");
        return Ok(ca);
    }
    let theirs = response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
        _ => None,
    });
    from_value(&theirs.ok_or_else(|| ca_error("vanished while being created".to_owned()))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_locations_parse_or_name_the_value() {
        assert_eq!(
            Config::parse("etcd://127.0.0.1:2379,etcd-2:2379/mesh/a/").expect("valid"),
            Config {
                endpoints: vec!["http://127.0.0.1:2379".into(), "http://etcd-2:2379".into()],
                prefix: "/mesh/a".into(),
            }
        );
        assert_eq!(
            Config::parse("etcd://localhost:2379")
                .expect("valid")
                .prefix,
            DEFAULT_PREFIX
        );
        for (value, reason) in [
            ("http://x:1", "not an etcd:// URL"),
            ("etcd://x", "member \"x\" has no :port"),
            ("etcd://x:0", "member \"x:0\": port \"0\" is not 1-65535"),
            ("etcd://x:2379,:2379", "member \":2379\" has no host"),
            ("etcd://x:2379/", "the prefix is empty"),
            (
                "etcd://x:2379/a//b",
                "the prefix has an empty segment or a space",
            ),
        ] {
            let e = Config::parse(value).expect_err(value);
            assert_eq!(
                e.to_string(),
                format!(
                    "--store {value:?}: {reason} (expected etcd://host:port[,host:port...][/prefix], or file)"
                )
            );
        }
    }

    #[test]
    fn resource_keys_name_kind_namespace_and_name() {
        let keys = Keys {
            prefix: "/p".into(),
        };
        for kind in Kind::ALL {
            let id = ResourceId {
                kind,
                namespace: if kind.is_cluster_scoped() { "" } else { "ns" }.into(),
                name: "a.b-c".into(),
            };
            let key = keys.resource(&id);
            assert!(key.starts_with("/p/resources/"), "{key}");
            assert_eq!(
                keys.parse_resource(&key)
                    .expect("a resource key")
                    .expect("valid"),
                id
            );
        }
        assert!(keys.parse_resource("/p/revision").is_none());
        assert!(
            keys.parse_resource("/p/resources/Nope/ns/a")
                .expect("resource key")
                .is_err()
        );
    }
}
