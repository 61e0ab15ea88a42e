//! The Kubernetes source (`--kubernetes`, or `--kube-api URL`): the mesh
//! learnt from the API server instead of `meshctl apply`.
//!
//! ```text
//! watcher (list, then watch from the resourceVersion; resumes after a
//!          break, relists on 410 Gone) -> reflector store, one per kind
//!     namespaces, pods, services, endpointslices, httproutes, grpcroutes,
//!     trafficpolicies, authorizationpolicies, mtlspolicies
//!         -> changed (Notify) -> sync: translate::translate (the whole
//!            observed set, through resources::parse_documents)
//!         -> ControlPlane::replace_kinds (one all-or-nothing transaction)
//! ```
//!
//! Only namespaces labelled [`ENROLLED_LABEL`]`=true` take part. A
//! translation the checks refuse (a bad object, two pods with one IP) is
//! logged with the object named, and the last good set keeps serving.
//!
//! [`review`] verifies agents' projected service-account tokens with a
//! TokenReview.
pub mod review;
pub mod translate;

use std::{
    fmt::Debug,
    hash::Hash,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use kube::{
    Api, Client, Config,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{
    ControlPlane,
    resources::{self, Change, Kind, Resource, ResourceId},
    store::State,
};

/// The label that enrols a namespace: its pods, Services, routes and
/// policies become the mesh's.
pub const ENROLLED_LABEL: &str = "mesh.dev/enrolled";
pub const ENROLLED_VALUE: &str = "true";

/// The kinds that come from Kubernetes in this mode: the source owns every
/// stored resource of these kinds (the operator API refuses them). Nodes
/// stay with `meshctl apply`.
pub const KINDS: [Kind; 7] = [
    Kind::Workload,
    Kind::Service,
    Kind::MtlsPolicy,
    Kind::HttpRoute,
    Kind::GrpcRoute,
    Kind::TrafficPolicy,
    Kind::AuthorizationPolicy,
];

/// Changes that come close together are translated once.
const SETTLE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("in-cluster configuration: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("--kube-api {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("--kube-token-file {path}: {reason}")]
    TokenFile { path: String, reason: String },
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Where the API server is.
#[derive(Clone, Debug)]
pub enum Connection {
    /// The pod's service account and the cluster's Service.
    InCluster,
    /// A URL, with a bearer token read from a file (re-read as it rotates
    /// when it is written without a trailing newline, as kubelet does).
    Url {
        url: String,
        token_file: Option<PathBuf>,
    },
}

/// A client for `connection`.
pub fn client(connection: &Connection) -> Result<Client, Error> {
    let config = match connection {
        Connection::InCluster => Config::incluster()?,
        Connection::Url { url, token_file } => {
            let uri = url.parse().map_err(|e: http::uri::InvalidUri| Error::Url {
                url: url.clone(),
                reason: e.to_string(),
            })?;
            let mut config = Config::new(uri);
            if let Some(path) = token_file {
                let bad = |reason: String| Error::TokenFile {
                    path: path.display().to_string(),
                    reason,
                };
                let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(bad("empty".into()));
                }
                if token == text {
                    // As a projected token is written: kube re-reads it as
                    // it rotates.
                    config.auth_info.token_file = Some(path.display().to_string());
                } else {
                    // An operator's file, with a newline: read once.
                    let value = http::HeaderValue::try_from(format!("Bearer {token}"))
                        .map_err(|e| bad(e.to_string()))?;
                    config.headers.push((http::header::AUTHORIZATION, value));
                }
            }
            config
        }
    };
    Ok(Client::try_from(config)?)
}

/// A Gateway API or mesh.dev kind, read as a generic object and handed to
/// our own parser.
fn api_resource(kind: Kind, plural: &str) -> ApiResource {
    let (group, version) = kind
        .api_version()
        .split_once('/')
        .unwrap_or(("", kind.api_version()));
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind.as_str()),
        plural,
    )
}

/// What the watchers have seen, one reflector store per kind.
#[derive(Clone)]
pub struct Observed {
    pub namespaces: Store<k8s_openapi::api::core::v1::Namespace>,
    pub pods: Store<k8s_openapi::api::core::v1::Pod>,
    pub services: Store<k8s_openapi::api::core::v1::Service>,
    pub endpoint_slices: Store<k8s_openapi::api::discovery::v1::EndpointSlice>,
    /// Our kinds and the Gateway API's routes, as documents.
    pub documents: Vec<(Kind, Store<DynamicObject>)>,
}

/// Watches the API server and keeps the control plane's Kubernetes kinds
/// equal to what it holds, until the task is dropped.
pub async fn run(plane: Arc<ControlPlane>, client: Client) {
    let changed = Arc::new(Notify::new());
    let mut synced: Vec<Arc<AtomicBool>> = Vec::new();
    let mut watch = |name: &'static str| {
        let flag = Arc::new(AtomicBool::new(false));
        synced.push(flag.clone());
        (name, flag, changed.clone())
    };
    let namespaces = typed(client.clone(), watch("namespaces"));
    let pods = typed(client.clone(), watch("pods"));
    let services = typed(client.clone(), watch("services"));
    let endpoint_slices = typed(client.clone(), watch("endpointslices"));
    let documents = [
        (Kind::HttpRoute, "httproutes"),
        (Kind::GrpcRoute, "grpcroutes"),
        (Kind::MtlsPolicy, "mtlspolicies"),
        (Kind::TrafficPolicy, "trafficpolicies"),
        (Kind::AuthorizationPolicy, "authorizationpolicies"),
    ]
    .into_iter()
    .map(|(kind, plural)| {
        let resource = api_resource(kind, plural);
        let writer = Writer::new(resource.clone());
        let reader = writer.as_reader();
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        tokio::spawn(reflect(api, writer, watch(plural)));
        (kind, reader)
    })
    .collect();
    let observed = Observed {
        namespaces,
        pods,
        services,
        endpoint_slices,
        documents,
    };
    sync(plane, observed, changed, synced).await;
}

type Watch = (&'static str, Arc<AtomicBool>, Arc<Notify>);

fn typed<K>(client: Client, watch: Watch) -> Store<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let writer = Writer::default();
    let reader = writer.as_reader();
    tokio::spawn(reflect(Api::<K>::all(client), writer, watch));
    reader
}

/// Runs one kind's watcher into its store. A kind whose API is not served
/// (its CRDs not installed: 404) counts as empty until it is.
async fn reflect<K>(api: Api<K>, writer: Writer<K>, (kind, synced, changed): Watch)
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                if !synced.swap(true, Ordering::SeqCst) {
                    info!(kind, "listed");
                }
                changed.notify_one();
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => changed.notify_one(),
            Err(e) => {
                let absent = matches!(
                    &e,
                    watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.code == 404
                );
                if absent {
                    if !synced.swap(true, Ordering::SeqCst) {
                        warn!(
                            kind,
                            "not served by the API server (CRDs not installed?); empty until it is"
                        );
                        changed.notify_one();
                    }
                } else {
                    warn!(kind, error = %e, "watch failed; resuming");
                }
            }
        }
    }
}

/// Translates and applies whenever something changed, once every kind has
/// been listed.
async fn sync(
    plane: Arc<ControlPlane>,
    observed: Observed,
    changed: Arc<Notify>,
    synced: Vec<Arc<AtomicBool>>,
) {
    let mut last: Option<Vec<Resource>> = None;
    let mut waiting_logged = false;
    loop {
        changed.notified().await;
        tokio::time::sleep(SETTLE).await;
        if !synced.iter().all(|s| s.load(Ordering::SeqCst)) {
            if !waiting_logged {
                info!("waiting for every kind to be listed before the first sync");
                waiting_logged = true;
            }
            continue;
        }
        let desired = match translate::translate(&observed) {
            Ok(desired) => desired,
            Err(refused) => {
                warn!(object = %refused.object, reason = %refused.reason, "refused the Kubernetes configuration; the last good one keeps serving");
                continue;
            }
        };
        if last.as_ref() == Some(&desired) {
            continue;
        }
        let count = desired.len();
        let plane = plane.clone();
        let applying = desired.clone();
        let applied =
            tokio::task::spawn_blocking(move || plane.replace_kinds(&KINDS, applying)).await;
        match applied {
            Ok(Ok(revision)) => {
                info!(revision, resources = count, "synced from Kubernetes");
                last = Some(desired);
            }
            Ok(Err(e)) => {
                warn!(reason = %e, "refused the Kubernetes configuration; the last good one keeps serving");
            }
            Err(e) => warn!(error = %e, "sync failed"),
        }
    }
}

/// The changes that make the stored resources of `kinds` exactly `desired`,
/// checked as an apply is, against the configuration without what they
/// delete (a pod's IP may pass to a new pod in one batch). Routes and
/// policies keep their creation revision.
pub fn plan_replace(
    state: &State,
    kinds: &[Kind],
    desired: &[Resource],
) -> Result<Vec<Change>, resources::Error> {
    let wanted: std::collections::HashSet<ResourceId> = desired.iter().map(Resource::id).collect();
    let gone: std::collections::HashSet<ResourceId> = state
        .iter()
        .map(|s| s.resource.id())
        .filter(|id| kinds.contains(&id.kind) && !wanted.contains(id))
        .collect();
    let staying = || state.iter().filter(|s| !gone.contains(&s.resource.id()));
    let owners: std::collections::HashMap<std::net::Ipv4Addr, ResourceId> = staying()
        .flat_map(|s| {
            let id = s.resource.id();
            s.resource
                .addresses()
                .into_iter()
                .map(move |a| (a, id.clone()))
        })
        .collect();
    resources::check_addresses(desired, |ip| owners.get(&ip))?;
    resources::check_mtls_policies(desired, |namespace| {
        staying()
            .map(|s| s.resource.id())
            .find(|id| id.kind == Kind::MtlsPolicy && id.namespace == namespace)
    })?;
    resources::check_references(desired, |namespace, name| {
        staying().find_map(|s| match &s.resource {
            Resource::Service(svc) if svc.namespace == namespace && svc.name == name => Some(svc),
            _ => None,
        })
    })?;
    let revision = state.revision() + 1;
    let mut changes: Vec<Change> = gone.into_iter().map(Change::Delete).collect();
    changes.sort_by(|a, b| match (a, b) {
        (Change::Delete(a), Change::Delete(b)) => a.cmp(b),
        _ => std::cmp::Ordering::Equal,
    });
    for resource in desired {
        let mut resource = resource.clone();
        let stored = state.get(&resource.id());
        resource.set_created_revision(
            stored
                .and_then(|s| s.resource.created_revision())
                .unwrap_or(revision),
        );
        if stored.is_none_or(|s| s.resource != resource) {
            changes.push(Change::Put(resource));
        }
    }
    Ok(changes)
}
