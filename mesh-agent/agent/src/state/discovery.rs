//! The agent's side of configuration distribution: subscribes to the control
//! server, validates every response before it takes effect, acknowledges or
//! rejects it, keeps the last good configuration on disk, and publishes it to
//! the data path through a `watch` channel.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prost::Message;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use mesh_api::{
    admin::{Source, SyncState},
    client::{self, AgentConnector},
    pb::{
        self, DeltaRequest, DeltaResponse, distribution_client::DistributionClient, resource::Body,
    },
};

use super::{Context, ServiceTable, State};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] client::Error),
    #[error("control server refused the subscription: {0}")]
    Refused(#[source] tonic::Status),
    #[error("subscription stream broke: {0}")]
    Stream(#[source] tonic::Status),
    #[error("control server closed the subscription")]
    Closed,
    #[error("cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Distribution state shared with the admin API.
pub type SharedSync = Arc<Mutex<SyncState>>;

/// Puts a state into the kernel (Service addresses, the STRICT set) before
/// the data path sees it; a failure turns into a rejection.
pub type Install = Box<dyn Fn(&State) -> Result<(), String> + Send + Sync>;

pub struct Discovery {
    ctx: Context,
    connector: Arc<AgentConnector>,
    cache: Option<PathBuf>,
    install: Install,
    tx: watch::Sender<Arc<State>>,
    state: Arc<Mutex<SyncState>>,
}

pub struct Settings {
    /// Whom the states are built for.
    pub ctx: Context,
    /// How to reach and authenticate to the control server.
    pub connector: Arc<AgentConnector>,
    pub cache_dir: Option<PathBuf>,
}

const CACHE_FILE: &str = "config.pb";
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// At first start the stream waits this long for the node certificate (the
/// identity manager asks for it with the bootstrap token), so that it is
/// authenticated by certificate from the start; then it goes with the token.
const NODE_CERT_WAIT: Duration = Duration::from_secs(5);

impl Discovery {
    /// Loads the disk cache (so the agent serves its last configuration even
    /// if the control server is down) and returns the data path's handle.
    pub fn new(
        settings: Settings,
        install: Install,
    ) -> Result<(Self, super::StateRx, SharedSync), Error> {
        let cache = settings.cache_dir.map(|d| d.join(CACHE_FILE));
        let mut state = SyncState {
            source: Source::None,
            ..SyncState::default()
        };
        let initial = match cache.as_deref().map(load_cache) {
            Some(Ok(Some(cfg))) => match State::build(cfg.0, cfg.1, &settings.ctx) {
                Ok(cfg) => match install(&cfg) {
                    Ok(()) => {
                        info!(version = %cfg.version, resources = cfg.resources.len(), "serving cached configuration");
                        state.source = Source::Cache;
                        state.version = cfg.version.clone();
                        state.resources = cfg.resources.len();
                        cfg
                    }
                    Err(e) => {
                        warn!(error = %e, "cached configuration cannot be installed; ignoring it");
                        State::default()
                    }
                },
                Err(e) => {
                    warn!(error = %e, "cached configuration is invalid; ignoring it");
                    State::default()
                }
            },
            Some(Err(e)) => {
                warn!(error = %e, "cannot read configuration cache; starting empty");
                State::default()
            }
            _ => State::default(),
        };
        let (tx, rx) = watch::channel(Arc::new(initial));
        let state = Arc::new(Mutex::new(state));
        Ok((
            Discovery {
                ctx: settings.ctx,
                connector: settings.connector,
                cache,
                install,
                tx,
                state: state.clone(),
            },
            rx,
            state,
        ))
    }

    /// Runs forever: subscribe, and on any failure reconnect with
    /// exponential backoff and jitter.
    pub async fn run(self) {
        if self.connector.is_tls() {
            self.connector.node_cert().wait_valid(NODE_CERT_WAIT).await;
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            let got_response = match self.session().await {
                Ok(got) => got,
                Err((got, e)) => {
                    warn!(error = %e, "configuration subscription ended");
                    self.update_state(|s| s.last_error = Some(e.to_string()));
                    got
                }
            };
            self.update_state(|s| s.connected = false);
            if got_response {
                backoff = BACKOFF_MIN;
            }
            let jitter = rand::rng().random_range(0.5..1.5);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One subscription; returns whether any response arrived. When it
    /// fails after connecting, the connector is told, so that the next one
    /// goes to the next control server endpoint (a failed connection moves
    /// on by itself).
    async fn session(&self) -> Result<bool, (bool, Error)> {
        let (channel, credentials, endpoint) = self
            .connector
            .connect_endpoint()
            .await
            .map_err(|e| (false, Error::Connect(e)))?;
        let result = self.subscribe(channel, credentials).await;
        if result.is_err() {
            self.connector.failed(endpoint);
        }
        result
    }

    async fn subscribe(
        &self,
        channel: tonic::transport::Channel,
        credentials: client::Bearer,
    ) -> Result<bool, (bool, Error)> {
        let mut client = DistributionClient::with_interceptor(channel, credentials)
            .max_decoding_message_size(256 * 1024 * 1024);

        let (req_tx, req_rx) = mpsc::channel(4);
        let have = self
            .tx
            .borrow()
            .resources
            .iter()
            .map(|(k, r)| (k.clone(), r.version.clone()))
            .collect();
        let first = DeltaRequest {
            node: self.ctx.node.clone(),
            initial_resource_versions: have,
            ..DeltaRequest::default()
        };
        req_tx
            .send(first)
            .await
            .map_err(|_| (false, Error::Closed))?;
        let mut stream = client
            .delta_resources(ReceiverStream::new(req_rx))
            .await
            .map_err(|e| (false, Error::Refused(e)))?
            .into_inner();
        self.update_state(|s| {
            s.connected = true;
            s.last_error = None;
        });
        info!(addr = %self.connector.target(), "subscribed to the control server");
        let mut got = false;
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err((got, Error::Closed)),
                Err(e) => return Err((got, Error::Stream(e))),
            };
            got = true;
            let reply = self.handle(&resp);
            if req_tx.send(reply).await.is_err() {
                return Err((got, Error::Closed));
            }
        }
    }

    /// Validates and installs a response; the answer is its ACK or NACK.
    /// Resources this agent cannot serve are rejected one by one: the rest of
    /// the response still takes effect, and the rejected ones keep their last
    /// good version, so one bad Service never freezes the node.
    fn handle(&self, resp: &DeltaResponse) -> DeltaRequest {
        let current = self.tx.borrow().clone();
        let version = resp.system_version_info.clone();
        let mut resources = current.resources.clone();
        for key in &resp.removed_resources {
            resources.remove(key);
        }
        for r in &resp.resources {
            resources.insert(r.key.clone(), r.clone());
        }
        let mut rejected = Vec::new();
        let mut reason = None;
        let mut outcome = State::build(version.clone(), resources.clone(), &self.ctx);
        if let Err(first) = &outcome {
            reason = Some(first.to_string());
            rejected = rejected_keys(resp, self.ctx.agent_ip);
            for key in &rejected {
                match current.resources.get(key) {
                    Some(old) => resources.insert(key.clone(), old.clone()),
                    None => resources.remove(key),
                };
            }
            let first = first.clone();
            outcome = State::build(version, resources, &self.ctx).map_err(|_| first);
        }
        let installed = outcome
            .map_err(|e| e.to_string())
            .and_then(|cfg| (self.install)(&cfg).map(|()| cfg));
        match (installed, reason) {
            (Ok(cfg), reason) => {
                if let Some(path) = &self.cache
                    && let Err(e) = store_cache(path, &cfg)
                {
                    warn!(error = %e, "cannot write configuration cache");
                }
                info!(
                    version = %cfg.version,
                    changed = resp.resources.len(),
                    removed = resp.removed_resources.len(),
                    rejected = rejected.len(),
                    "configuration applied"
                );
                let (version, count) = (cfg.version.clone(), cfg.resources.len());
                self.tx.send_replace(Arc::new(cfg));
                let error_detail = reason.map(|message| {
                    warn!(error = %message, resources = ?rejected, "resources rejected; the rest applied");
                    pb::Status {
                        message,
                        resources: rejected,
                    }
                });
                self.update_state(|s| {
                    s.version = version;
                    s.source = Source::Control;
                    s.resources = count;
                    s.last_update_unix_ms = now_ms();
                    match &error_detail {
                        Some(e) => {
                            s.last_error = Some(e.message.clone());
                            s.nacks += 1;
                        }
                        None => {
                            s.last_error = None;
                            s.acks += 1;
                        }
                    }
                });
                DeltaRequest {
                    response_nonce: resp.nonce.clone(),
                    error_detail,
                    ..DeltaRequest::default()
                }
            }
            (Err(message), _) => {
                warn!(error = %message, nonce = %resp.nonce, "configuration rejected; keeping the last good one");
                self.update_state(|s| {
                    s.last_error = Some(message.clone());
                    s.nacks += 1;
                });
                // No resources named: the whole response was rejected.
                DeltaRequest {
                    response_nonce: resp.nonce.clone(),
                    error_detail: Some(pb::Status {
                        message,
                        resources: Vec::new(),
                    }),
                    ..DeltaRequest::default()
                }
            }
        }
    }

    fn update_state(&self, f: impl FnOnce(&mut SyncState)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Keys of the response's Services that fail on their own; if the failure
/// only shows in combination (a conflict), every Service in the response.
fn rejected_keys(resp: &DeltaResponse, agent_ip: Ipv4Addr) -> Vec<String> {
    let services = || {
        resp.resources.iter().filter_map(|r| match &r.body {
            Some(Body::Service(s)) => Some((r.key.clone(), s)),
            _ => None,
        })
    };
    let alone: Vec<String> = services()
        .filter(|(_, s)| ServiceTable::build([*s], agent_ip).is_err())
        .map(|(k, _)| k)
        .collect();
    if alone.is_empty() {
        services().map(|(k, _)| k).collect()
    } else {
        alone
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Cached = (String, BTreeMap<String, pb::Resource>);

fn load_cache(path: &Path) -> Result<Option<Cached>, Error> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Cache {
                path: path.to_owned(),
                source,
            });
        }
    };
    let snap = DeltaResponse::decode(bytes.as_slice()).map_err(|e| Error::Cache {
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })?;
    let resources = snap
        .resources
        .into_iter()
        .map(|r| (r.key.clone(), r))
        .collect();
    Ok(Some((snap.system_version_info, resources)))
}

/// Atomic: a crash leaves either the old cache or the new one.
fn store_cache(path: &Path, cfg: &State) -> std::io::Result<()> {
    use std::io::Write;
    let snap = DeltaResponse {
        system_version_info: cfg.version.clone(),
        resources: cfg.resources.values().cloned().collect(),
        ..DeltaResponse::default()
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&snap.encode_to_vec())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trip_is_atomic_and_complete() {
        let dir = std::env::temp_dir().join(format!("mesh-cache-test-{}", std::process::id()));
        let path = dir.join(CACHE_FILE);
        let mut resources = BTreeMap::new();
        let svc = pb::Resource {
            key: "Service/default/echo".into(),
            version: "7".into(),
            body: Some(Body::Service(pb::Service {
                name: "echo".into(),
                namespace: "default".into(),
                vips: vec!["198.18.100.1".into()],
                ports: vec![pb::ServicePort {
                    name: "tcp".into(),
                    port: 80,
                    target_port: 7000,
                    app_protocol: "tcp".into(),
                    detect_timeout_ms: 0,
                }],
                ..pb::Service::default()
            })),
        };
        resources.insert(svc.key.clone(), svc);
        let cfg =
            State::build("7".into(), resources, &crate::state::testing::ctx("node1")).unwrap();
        store_cache(&path, &cfg).unwrap();
        let (version, loaded) = load_cache(&path).unwrap().unwrap();
        assert_eq!(version, "7");
        assert_eq!(loaded, cfg.resources);
        assert!(!path.with_extension("tmp").exists());
        assert!(load_cache(&dir.join("missing.pb")).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
