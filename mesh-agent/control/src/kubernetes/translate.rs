//! What the watchers hold, as our resources: every object becomes one of our
//! documents and goes through [`resources::parse_documents`], the parser
//! `meshctl apply` uses, so both refuse alike.
//!
//! | Kubernetes | ours |
//! | --- | --- |
//! | Pod with an IPv4 `status.podIP`, not terminating, not `hostNetwork` | Workload (node `spec.nodeName`, service account, labels, container ports, `ready` from the Ready condition) |
//! | Service with a ClusterIP (TCP ports; a named `targetPort` through its EndpointSlices, else the selected pods' ports) | Service (`vips`, ports, selector, appProtocol) |
//! | HTTPRoute, GRPCRoute, MtlsPolicy, TrafficPolicy, AuthorizationPolicy | the same kind, its spec as it is |
//!
//! Only objects of namespaces labelled [`ENROLLED_LABEL`]`=true` count.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::api::DynamicObject;
use serde_json::{Value, json};

use super::{ENROLLED_LABEL, ENROLLED_VALUE, Observed};
use crate::resources::{self, Kind, Resource};

/// The label EndpointSlices name their Service by.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A translation refused: the object, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// `Kind namespace/name` as Kubernetes names it.
    pub object: String,
    pub reason: String,
}

/// Everything the watchers hold, as our resources, ordered by id.
pub fn translate(observed: &Observed) -> Result<Vec<Resource>, Refused> {
    let input = Input {
        namespaces: observed.namespaces.state(),
        pods: observed.pods.state(),
        services: observed.services.state(),
        endpoint_slices: observed.endpoint_slices.state(),
        documents: observed
            .documents
            .iter()
            .map(|(kind, store)| (*kind, store.state()))
            .collect(),
    };
    translate_input(&input)
}

/// The watchers' contents at one moment.
pub struct Input {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub documents: Vec<(Kind, Vec<Arc<DynamicObject>>)>,
}

pub fn translate_input(input: &Input) -> Result<Vec<Resource>, Refused> {
    let enrolled: HashSet<&str> = input
        .namespaces
        .iter()
        .filter(|ns| {
            ns.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ENROLLED_LABEL))
                .is_some_and(|v| v == ENROLLED_VALUE)
        })
        .filter_map(|ns| ns.metadata.name.as_deref())
        .collect();
    let in_mesh =
        |namespace: Option<&String>| namespace.is_some_and(|ns| enrolled.contains(ns.as_str()));
    let pods: Vec<&Pod> = input
        .pods
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| in_mesh(p.metadata.namespace.as_ref()))
        .collect();
    let mut documents: Vec<(String, Value)> = Vec::new();
    for pod in &pods {
        if let Some(doc) = workload(pod) {
            documents.push((object("Pod", &pod.metadata), doc));
        }
    }
    for svc in input
        .services
        .iter()
        .filter(|s| in_mesh(s.metadata.namespace.as_ref()))
    {
        let namespace = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let slices: Vec<&EndpointSlice> = input
            .endpoint_slices
            .iter()
            .map(AsRef::as_ref)
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(namespace)
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        .is_some_and(|n| n == name)
            })
            .collect();
        if let Some(doc) = service(svc, &slices, &pods) {
            documents.push((object("Service", &svc.metadata), doc));
        }
    }
    for (kind, objects) in &input.documents {
        for obj in objects
            .iter()
            .filter(|o| in_mesh(o.metadata.namespace.as_ref()))
        {
            documents.push((
                object(kind.as_str(), &obj.metadata),
                passed_through(*kind, obj),
            ));
        }
    }
    let mut out: Vec<Resource> = Vec::with_capacity(documents.len());
    for (name, doc) in documents {
        let mut parsed = resources::parse_documents(&doc.to_string()).map_err(|e| Refused {
            object: name.clone(),
            reason: e.to_string(),
        })?;
        out.append(&mut parsed);
    }
    out.sort_by_key(Resource::id);
    if let Some(twice) = out.windows(2).find(|w| w[0].id() == w[1].id()) {
        return Err(Refused {
            object: twice[0].id().to_string(),
            reason: "two Kubernetes objects translate to this one resource".into(),
        });
    }
    Ok(out)
}

/// `Kind namespace/name`, for logs.
fn object(kind: &str, meta: &kube::api::ObjectMeta) -> String {
    format!(
        "{kind} {}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

fn metadata(meta: &kube::api::ObjectMeta) -> Value {
    let mut out = json!({
        "name": meta.name,
        "namespace": meta.namespace,
    });
    if let Some(labels) = meta.labels.as_ref().filter(|l| !l.is_empty()) {
        out["labels"] = json!(labels);
    }
    out
}

/// A pod's Workload document, or `None` when it is no endpoint: no IPv4
/// address yet, terminating, finished, or in the node's network.
fn workload(pod: &Pod) -> Option<Value> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let ip: Ipv4Addr = status.pod_ip.as_deref()?.parse().ok()?;
    let node = spec.node_name.as_deref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let mut seen = BTreeSet::new();
    let ports: Vec<Value> = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let protocol = p.protocol.as_deref().unwrap_or("TCP");
            if !matches!(protocol, "TCP" | "UDP") || !seen.insert((p.container_port, protocol)) {
                return None;
            }
            let mut port = json!({ "port": p.container_port, "protocol": protocol });
            if let Some(name) = &p.name {
                port["name"] = json!(name);
            }
            Some(port)
        })
        .collect();
    Some(json!({
        "apiVersion": Kind::Workload.api_version(),
        "kind": "Workload",
        "metadata": metadata(&pod.metadata),
        "spec": {
            "serviceAccount": spec.service_account_name.as_deref().unwrap_or("default"),
            "node": node,
            "ip": ip.to_string(),
            "ports": ports,
            "ready": ready,
        },
    }))
}

/// A Service's document, or `None` without a ClusterIP (headless,
/// ExternalName) or without a TCP port we can resolve.
fn service(svc: &Service, slices: &[&EndpointSlice], pods: &[&Pod]) -> Option<Value> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    // clusterIPs repeats clusterIP; each address once, sorted.
    let vips: Vec<String> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse::<Ipv4Addr>().ok())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|ip| ip.to_string())
        .collect();
    if vips.is_empty() {
        return None;
    }
    let selector: BTreeMap<String, String> = spec.selector.clone().unwrap_or_default();
    let namespace = svc.metadata.namespace.as_deref();
    let selected: Vec<&Pod> = pods
        .iter()
        .copied()
        .filter(|p| {
            p.metadata.namespace.as_deref() == namespace
                && !selector.is_empty()
                && selector.iter().all(|(k, v)| {
                    p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(k))
                        .is_some_and(|l| l == v)
                })
        })
        .collect();
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let target = match &p.target_port {
                None => p.port,
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(name)) => {
                    named_target(name, p.name.as_deref(), slices, &selected)?
                }
            };
            let mut port = json!({ "port": p.port, "targetPort": target });
            if let Some(name) = &p.name {
                port["name"] = json!(name);
            }
            if let Some(app) = p.app_protocol.as_deref().and_then(app_protocol) {
                port["appProtocol"] = json!(app);
            }
            Some(port)
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    Some(json!({
        "apiVersion": Kind::Service.api_version(),
        "kind": "Service",
        "metadata": metadata(&svc.metadata),
        "spec": { "vips": vips, "ports": ports, "selector": selector },
    }))
}

/// A named `targetPort`: the number the Service's EndpointSlices give the
/// port, else the first selected pod's container port of that name.
fn named_target(
    target: &str,
    port_name: Option<&str>,
    slices: &[&EndpointSlice],
    pods: &[&Pod],
) -> Option<i32> {
    let from_slices = slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(port_name.unwrap_or_default()))
        .and_then(|p| p.port);
    from_slices.or_else(|| {
        pods.iter()
            .filter_map(|p| p.spec.as_ref())
            .flat_map(|s| s.containers.iter().flat_map(|c| c.ports.iter().flatten()))
            .find(|p| p.name.as_deref() == Some(target))
            .map(|p| p.container_port)
    })
}

/// Kubernetes' appProtocol values we know; others are left to detection.
fn app_protocol(value: &str) -> Option<&'static str> {
    match value {
        "tcp" => Some("tcp"),
        "http" => Some("http"),
        "http2" | "kubernetes.io/h2c" => Some("http2"),
        "grpc" => Some("grpc"),
        _ => None,
    }
}

/// An object that already is one of our kinds (or the Gateway API's), with
/// only the metadata our parser reads.
fn passed_through(kind: Kind, obj: &DynamicObject) -> Value {
    json!({
        "apiVersion": kind.api_version(),
        "kind": kind.as_str(),
        "metadata": metadata(&obj.metadata),
        "spec": obj.data.get("spec").cloned().unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(value: Value) -> Arc<Pod> {
        Arc::new(serde_json::from_value(value).expect("pod"))
    }

    fn namespace(name: &str, enrolled: bool) -> Arc<Namespace> {
        let labels = if enrolled {
            json!({ ENROLLED_LABEL: ENROLLED_VALUE })
        } else {
            json!({})
        };
        Arc::new(
            serde_json::from_value(json!({ "metadata": { "name": name, "labels": labels } }))
                .expect("namespace"),
        )
    }

    fn pod(ns: &str, name: &str, ip: Option<&str>, ready: &str) -> Value {
        json!({
            "metadata": { "name": name, "namespace": ns, "labels": { "app": "web" } },
            "spec": {
                "nodeName": "n1",
                "serviceAccountName": "web",
                "containers": [{ "name": "c", "ports": [{ "name": "http", "containerPort": 8080 }] }],
            },
            "status": {
                "phase": "Running",
                "podIP": ip,
                "conditions": [{ "type": "Ready", "status": ready }],
            },
        })
    }

    fn input(pods: Vec<Arc<Pod>>, services: Vec<Value>) -> Input {
        Input {
            namespaces: vec![namespace("shop", true), namespace("other", false)],
            pods,
            services: services
                .into_iter()
                .map(|s| Arc::new(serde_json::from_value(s).expect("service")))
                .collect(),
            endpoint_slices: Vec::new(),
            documents: Vec::new(),
        }
    }

    #[test]
    fn pods_become_workloads_only_in_enrolled_namespaces_and_only_with_an_ip() {
        let mut terminating = pod("shop", "going", Some("198.18.1.12"), "True");
        terminating["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let out = translate_input(&input(
            vec![
                from(pod("shop", "a", Some("198.18.1.10"), "True")),
                from(pod("shop", "b", Some("198.18.1.11"), "False")),
                from(pod("shop", "pending", None, "False")),
                from(terminating),
                from(pod("other", "c", Some("198.18.1.13"), "True")),
            ],
            Vec::new(),
        ))
        .expect("translates");
        let workloads: Vec<(String, bool, String)> = out
            .iter()
            .map(|r| match r {
                Resource::Workload(w) => (w.name.clone(), w.ready, w.service_account.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            workloads,
            [
                ("a".into(), true, "web".into()),
                ("b".into(), false, "web".into())
            ]
        );
    }

    #[test]
    fn services_resolve_named_target_ports_and_skip_headless() {
        let svc = |name: &str, ip: &str| {
            json!({
                "metadata": { "name": name, "namespace": "shop" },
                "spec": {
                    "clusterIP": ip,
                    "selector": { "app": "web" },
                    "ports": [{ "name": "web", "port": 80, "targetPort": "http", "appProtocol": "kubernetes.io/h2c" }],
                },
            })
        };
        let out = translate_input(&input(
            vec![from(pod("shop", "a", Some("198.18.1.10"), "True"))],
            vec![svc("web", "198.19.0.10"), svc("headless", "None")],
        ))
        .expect("translates");
        let Some(Resource::Service(s)) = out.iter().find(|r| r.id().kind == Kind::Service) else {
            panic!("no service in {out:?}")
        };
        assert_eq!(s.name, "web");
        assert_eq!(s.ports[0].target_port, 8080);
        assert_eq!(s.ports[0].app_protocol, Some(resources::AppProtocol::Http2));
        assert_eq!(out.len(), 2, "the headless Service is left out: {out:?}");
    }

    #[test]
    fn a_bad_object_refuses_the_translation_naming_it() {
        let mut bad = pod("shop", "a", Some("198.18.1.10"), "True");
        bad["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(0);
        let refused = translate_input(&input(vec![from(bad)], Vec::new())).expect_err("refused");
        assert_eq!(refused.object, "Pod shop/a");
        assert!(refused.reason.contains("port"), "{refused:?}");
    }
}
