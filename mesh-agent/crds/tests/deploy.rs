//! Every manifest in deploy/ read into the Kubernetes API types
//! (k8s-openapi), and the fields an install relies on checked against the
//! binaries and DESIGN.md: the agent runs the local cluster's binary and
//! flags, with the privileges, mounts, probes and ports they need; the
//! control server runs several replicas behind a Service and a disruption
//! budget; RBAC names every verb. There is no API server on these machines,
//! so this is what checks the manifests; a field a type does not know (a
//! typo the API server would drop or refuse) fails here too.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::{
    Resource,
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{
            ConfigMap, Container, Namespace, PodSpec, PodTemplateSpec, Service, ServiceAccount,
            Volume, VolumeMount,
        },
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use mesh_api::names::{CONTROL_SERVICE_ACCOUNT, SYSTEM_NAMESPACE, ports};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .canonicalize()
        .expect("deploy/")
}

/// `deploy/kustomization.yaml`, with only the fields we use (any other
/// field is refused, so a misspelt one is noticed).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Kustomization {
    api_version: String,
    kind: String,
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<Image>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Image {
    name: String,
    #[serde(default)]
    new_name: Option<String>,
    #[serde(default)]
    new_tag: Option<String>,
}

fn kustomization() -> Kustomization {
    let path = deploy_dir().join("kustomization.yaml");
    let text = std::fs::read_to_string(&path).expect("reading deploy/kustomization.yaml");
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every manifest under `dir`, relative to deploy/.
fn yaml_files(dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("reading deploy/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let relative = path.strip_prefix(deploy_dir()).expect("under deploy/");
            out.insert(relative.to_string_lossy().into_owned());
        }
    }
}

/// The objects of the install, by type.
#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    crds: Vec<CustomResourceDefinition>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    disruption_budgets: Vec<PodDisruptionBudget>,
}

/// The first place where two JSON values differ, as a path.
fn first_difference(path: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(v), Some(w)) => first_difference(&format!("{path}.{k}"), v, w),
                (Some(_), None) => Some(format!("{path}.{k}: not a field of the type")),
                (None, _) => Some(format!("{path}.{k}: added by the type")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(&format!("{path}[{i}]"), v, w)),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} reads back as {b}")),
    }
}

/// A document as its type, which must keep every field it was given.
fn typed<T: Resource + DeserializeOwned + Serialize>(at: &str, document: &Value) -> T {
    let object: T = serde_json::from_value(document.clone())
        .unwrap_or_else(|e| panic!("{at}: not a {}: {e}", T::KIND));
    let back = serde_json::to_value(&object).expect("a Kubernetes object serializes");
    if let Some(difference) = first_difference("", document, &back) {
        panic!("{at} ({}): {difference}", T::KIND);
    }
    object
}

fn manifests() -> Manifests {
    let mut m = Manifests::default();
    for file in kustomization().resources {
        let path = deploy_dir().join(&file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {file}: {e}"));
        for (i, document) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{file}: document {}: {e}", i + 1));
            if value.is_null() {
                continue;
            }
            let at = format!("{file}: document {}", i + 1);
            let api_version = value["apiVersion"].as_str().unwrap_or_default();
            let kind = value["kind"].as_str().unwrap_or_default();
            macro_rules! into {
                ($field:ident, $ty:ty) => {
                    if (api_version, kind) == (<$ty>::API_VERSION, <$ty>::KIND) {
                        m.$field.push(typed::<$ty>(&at, &value));
                        continue;
                    }
                };
            }
            into!(namespaces, Namespace);
            into!(crds, CustomResourceDefinition);
            into!(service_accounts, ServiceAccount);
            into!(cluster_roles, ClusterRole);
            into!(cluster_role_bindings, ClusterRoleBinding);
            into!(roles, Role);
            into!(role_bindings, RoleBinding);
            into!(config_maps, ConfigMap);
            into!(daemon_sets, DaemonSet);
            into!(deployments, Deployment);
            into!(services, Service);
            into!(disruption_budgets, PodDisruptionBudget);
            panic!("{at}: {api_version} {kind} is not a kind this test knows");
        }
    }
    m
}

fn one<'a, T>(items: &'a [T], what: &str) -> &'a T {
    match items {
        [item] => item,
        _ => panic!("expected one {what}, found {}", items.len()),
    }
}

fn pod_spec(template: &PodTemplateSpec) -> &PodSpec {
    template.spec.as_ref().expect("a pod template has a spec")
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// `args` as `--flag value` pairs, in order.
fn flag_pairs(c: &Container) -> Vec<(String, String)> {
    let args = c.args.as_deref().unwrap_or_default();
    assert!(
        args.len().is_multiple_of(2),
        "{}: args are not flag-value pairs",
        c.name
    );
    args.chunks(2)
        .map(|p| {
            assert!(
                p[0].starts_with("--"),
                "{}: {:?} is not a flag",
                c.name,
                p[0]
            );
            (p[0].clone(), p[1].clone())
        })
        .collect()
}

fn flag<'a>(pairs: &'a [(String, String)], name: &str) -> &'a str {
    pairs
        .iter()
        .find(|(f, _)| f == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name}"))
}

/// The mount that holds `path`, and its volume.
fn mount_of<'a>(spec: &'a PodSpec, c: &'a Container, path: &str) -> (&'a VolumeMount, &'a Volume) {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(path).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("{}: nothing is mounted at {path}", c.name));
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("no volume {}", mount.name));
    (mount, volume)
}

fn host_path(v: &Volume) -> &str {
    v.host_path
        .as_ref()
        .map(|h| h.path.as_str())
        .unwrap_or_else(|| panic!("volume {} is not a hostPath", v.name))
}

/// The value of `$(NAME)` in `c`'s environment, as its source says it.
fn env_source(c: &Container, arg: &str) -> String {
    let name = arg
        .strip_prefix("$(")
        .and_then(|a| a.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{arg:?} is not $(NAME)"));
    let var = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("{}: no env {name}", c.name));
    let from = var
        .value_from
        .as_ref()
        .expect("a value from the downward API");
    if let Some(f) = &from.field_ref {
        return format!("fieldRef:{}", f.field_path);
    }
    if let Some(k) = &from.config_map_key_ref {
        return format!("configMap:{}/{}", k.name, k.key);
    }
    panic!("{name}: an unexpected source {from:?}")
}

fn containerfile() -> String {
    std::fs::read_to_string(deploy_dir().join("Containerfile"))
        .expect("reading deploy/Containerfile")
}

/// `COPY --from=build /src/<from> <to>` lines, as (from, to).
fn copies(containerfile: &str) -> Vec<(String, String)> {
    containerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY --from=build /src/"))
        .map(|l| {
            let (from, to) = l.split_once(' ').expect("COPY FROM TO");
            (from.to_owned(), to.trim().to_owned())
        })
        .collect()
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let k = kustomization();
    assert_eq!(k.api_version, "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k.kind, "Kustomization");
    let listed: BTreeSet<String> = k.resources.iter().cloned().collect();
    assert_eq!(listed.len(), k.resources.len(), "a resource listed twice");
    let mut found = BTreeSet::new();
    yaml_files(&deploy_dir(), &mut found);
    found.remove("kustomization.yaml");
    assert_eq!(
        listed, found,
        "deploy/kustomization.yaml must list every manifest in deploy/, and only those"
    );
    let crds: BTreeSet<String> = mesh_crds::crds()
        .iter()
        .map(|c| format!("crds/{}", mesh_crds::file_name(c)))
        .collect();
    assert!(crds.is_subset(&listed), "a CRD is not installed: {crds:?}");
    let image = one(&k.images, "image");
    assert!(image.new_tag.is_some() || image.new_name.is_some());
    let m = manifests();
    let templates = m
        .daemon_sets
        .iter()
        .filter_map(|d| d.spec.as_ref().map(|s| &s.template))
        .chain(
            m.deployments
                .iter()
                .filter_map(|d| d.spec.as_ref().map(|s| &s.template)),
        );
    for t in templates {
        for c in &pod_spec(t).containers {
            assert_eq!(c.image.as_deref(), Some(image.name.as_str()), "{}", c.name);
        }
    }
}

#[test]
fn every_object_is_in_the_mesh_namespace() {
    let m = manifests();
    let ns = one(&m.namespaces, "Namespace");
    assert_eq!(ns.metadata.name.as_deref(), Some(SYSTEM_NAMESPACE));
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged"),
        "the agent is privileged: its namespace must admit it"
    );
    let namespaced = m
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(m.roles.iter().map(|o| &o.metadata))
        .chain(m.role_bindings.iter().map(|o| &o.metadata))
        .chain(m.config_maps.iter().map(|o| &o.metadata))
        .chain(m.daemon_sets.iter().map(|o| &o.metadata))
        .chain(m.deployments.iter().map(|o| &o.metadata))
        .chain(m.services.iter().map(|o| &o.metadata))
        .chain(m.disruption_budgets.iter().map(|o| &o.metadata));
    for meta in namespaced {
        assert_eq!(
            meta.namespace.as_deref(),
            Some(SYSTEM_NAMESPACE),
            "{:?}",
            meta.name
        );
    }
    // The committed CRDs are installed as generated.
    assert_eq!(m.crds, mesh_crds::crds());
}

#[test]
fn the_agent_runs_the_local_clusters_binary_and_flags() {
    let m = manifests();
    let ds = one(&m.daemon_sets, "DaemonSet");
    let spec = pod_spec(&ds.spec.as_ref().expect("a spec").template);
    let agent = container(spec, "mesh-agent");
    assert_eq!(
        agent.command.as_deref(),
        Some(&["/usr/local/bin/mesh-agent".to_owned()][..])
    );

    // The flags, in order, of xtask's cluster::agent_args with a control
    // server (values of a made-up node: only the flags are compared).
    let roots = xtask::cluster::plan::Roots {
        state: "/run/mesh-cluster".into(),
        cgroup2: "/sys/fs/cgroup".into(),
        bpffs: "/sys/fs/bpf".into(),
    };
    let node = xtask::cluster::plan::nodes("deploy", 1, &roots).remove(0);
    let control = xtask::cluster::plan::control("deploy", &roots);
    let local: Vec<String> = xtask::cluster::agent_args(&node, Path::new("/x.o"), Some(&control))
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .filter(|a| a.starts_with("--"))
        .collect();
    let pairs = flag_pairs(agent);
    let flags: Vec<&str> = pairs.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        flags, local,
        "the DaemonSet's flags are not the local cluster's"
    );

    // Each value where the node gives it.
    assert_eq!(
        env_source(agent, flag(&pairs, "--node")),
        "fieldRef:spec.nodeName"
    );
    assert_eq!(
        env_source(agent, flag(&pairs, "--agent-ip")),
        "fieldRef:status.hostIP"
    );
    let cgroup = env_source(agent, flag(&pairs, "--cgroup-root"));
    let (map, key) = cgroup
        .strip_prefix("configMap:")
        .and_then(|s| s.split_once('/'))
        .expect("--cgroup-root from a ConfigMap");
    let root = m
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(map))
        .and_then(|c| c.data.as_ref()?.get(key))
        .unwrap_or_else(|| panic!("no ConfigMap {map} with {key}"));
    let (_, cgroup_volume) = mount_of(spec, agent, root);
    assert_eq!(
        host_path(cgroup_volume),
        "/sys/fs/cgroup",
        "--cgroup-root {root}"
    );

    let (bpf_mount, bpf) = mount_of(spec, agent, flag(&pairs, "--bpf-pin-dir"));
    assert_eq!(host_path(bpf), "/sys/fs/bpf");
    assert_eq!(
        bpf_mount.mount_propagation.as_deref(),
        Some("Bidirectional"),
        "pins must be the host's, to outlive the agent"
    );
    let (_, admin) = mount_of(spec, agent, flag(&pairs, "--admin-socket"));
    assert_eq!(
        Path::new(host_path(admin)),
        Path::new(flag(&pairs, "--admin-socket"))
            .parent()
            .expect("a directory"),
        "meshctl on the node finds the admin socket at the same path"
    );
    let (_, cache) = mount_of(spec, agent, flag(&pairs, "--cache-dir"));
    host_path(cache);
    let (_, trust) = mount_of(spec, agent, flag(&pairs, "--ca-bundle"));
    assert!(
        trust.config_map.is_some(),
        "--ca-bundle from a ConfigMap: the CA's Secret (with its key) never reaches the nodes"
    );
    let token_file = flag(&pairs, "--token-file");
    let (token_mount, token) = mount_of(spec, agent, token_file);
    let sources = token
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .expect("--token-file from a projected volume");
    let sa_token = one(sources, "projected source")
        .service_account_token
        .as_ref()
        .expect("a service-account token");
    // The audience mesh-control's TokenReview asks for.
    assert_eq!(
        sa_token.audience.as_deref(),
        Some(mesh_control::kubernetes::review::DEFAULT_AUDIENCE)
    );
    assert_eq!(
        Path::new(&token_mount.mount_path).join(&sa_token.path),
        Path::new(token_file)
    );

    let service = m
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("mesh-control"))
        .expect("the control server's Service");
    let grpc = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.iter().find(|p| p.name.as_deref() == Some("grpc")))
        .expect("a grpc port");
    assert_eq!(
        flag(&pairs, "--control-addr"),
        format!("https://mesh-control.{SYSTEM_NAMESPACE}.svc:{}", grpc.port)
    );

    // The binary and the kernel programs are where the flags say, in the
    // image the manifests name.
    let file = containerfile();
    let copies = copies(&file);
    let bpf_object = xtask::cluster::default_bpf_object();
    let bpf_object = bpf_object
        .strip_prefix(xtask::cluster::workspace_root())
        .expect("under the workspace");
    for (from, to) in [
        ("target/release/mesh-agent", "/usr/local/bin/mesh-agent"),
        ("target/release/mesh-control", "/usr/local/bin/mesh-control"),
        ("target/release/meshctl", "/usr/local/bin/meshctl"),
        (
            bpf_object.to_str().expect("UTF-8"),
            flag(&pairs, "--bpf-object"),
        ),
    ] {
        assert!(
            copies.contains(&(from.to_owned(), to.to_owned())),
            "the Containerfile does not put {from} at {to}: {copies:?}"
        );
    }
    assert!(file.contains("cargo xtask build-ebpf"));
    assert!(
        file.contains("cargo build --release --locked -p mesh-agent -p mesh-control -p meshctl")
    );
}

#[test]
fn the_agent_has_the_node_privileges_mounts_probes_and_ports_it_needs() {
    let m = manifests();
    let ds = one(&m.daemon_sets, "DaemonSet");
    let ds_spec = ds.spec.as_ref().expect("a spec");
    let spec = pod_spec(&ds_spec.template);
    let agent = container(spec, "mesh-agent");

    assert_eq!(
        spec.host_network,
        Some(true),
        "the agent listens on the node's address"
    );
    assert_eq!(
        spec.host_pid,
        Some(true),
        "enrolment reads /proc/<pid>/ns/net"
    );
    assert_eq!(spec.host_ipc, None);
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    let security = agent.security_context.as_ref().expect("a securityContext");
    // Privileged for the host's cgroup namespace (agent.yaml says why);
    // a list of capabilities beside it would be ignored, and misleading.
    assert_eq!(security.privileged, Some(true));
    assert_eq!(security.capabilities, None);
    assert_eq!(security.read_only_root_filesystem, Some(true));

    let mounts: BTreeMap<&str, (&VolumeMount, &Volume)> =
        ["/sys/fs/bpf", "/sys/fs/cgroup", "/run/netns"]
            .into_iter()
            .map(|p| (p, mount_of(spec, agent, p)))
            .collect();
    for (path, (mount, volume)) in &mounts {
        assert_eq!(mount.mount_path, *path);
        assert_eq!(host_path(volume), *path);
    }
    assert_eq!(mounts["/sys/fs/cgroup"].0.read_only, Some(true));
    assert_eq!(
        mounts["/run/netns"].0.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "pods' namespaces made after the agent started must appear"
    );

    let probe = agent.readiness_probe.as_ref().expect("a readiness probe");
    let get = probe.http_get.as_ref().expect("an HTTP readiness probe");
    assert_eq!(get.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(get.port, IntOrString::Int(ports::AGENT_TELEMETRY.into()));
    let live = agent.liveness_probe.as_ref().expect("a liveness probe");
    let live = live.http_get.as_ref().expect("an HTTP liveness probe");
    assert_eq!(live.port, IntOrString::Int(ports::AGENT_TELEMETRY.into()));
    assert_ne!(
        live.path, get.path,
        "liveness is not readiness: a control-server outage must not restart agents"
    );

    let declared: BTreeSet<(String, i32, Option<i32>)> = agent
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.container_port,
                p.host_port,
            )
        })
        .collect();
    let expected: BTreeSet<(String, i32, Option<i32>)> = [
        ("outbound", ports::OUTBOUND),
        ("tunnel", ports::INBOUND_TUNNEL),
        ("telemetry", ports::AGENT_TELEMETRY),
    ]
    .into_iter()
    .map(|(n, p)| (n.to_owned(), i32::from(p), Some(i32::from(p))))
    .collect();
    assert_eq!(
        declared, expected,
        ":15006 is inside each pod's namespace, not the node's"
    );

    let resources = agent.resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    assert_eq!(
        resources.limits.as_ref(),
        Some(requests),
        "a Guaranteed pod: its cgroup stays outside the Burstable pods' --cgroup-root"
    );

    assert!(
        spec.termination_grace_period_seconds
            .is_some_and(|s| s >= 10)
    );
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let rolling = ds_spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .expect("a rolling update");
    assert_eq!(
        rolling.max_surge,
        Some(IntOrString::Int(0)),
        "two agents on a node would both bind its ports"
    );
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
}

#[test]
fn the_control_server_runs_replicas_behind_a_service_and_a_budget() {
    let m = manifests();
    let deployment = one(&m.deployments, "Deployment");
    let d = deployment.spec.as_ref().expect("a spec");
    assert!(d.replicas.is_some_and(|r| r >= 2), "several replicas");
    let labels = d
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selects = |selector: &BTreeMap<String, String>| {
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(selects(
        &d.selector.match_labels.clone().unwrap_or_default()
    ));
    let spec = pod_spec(&d.template);
    let control = container(spec, "mesh-control");
    assert_eq!(
        control.command.as_deref(),
        Some(&["/usr/local/bin/mesh-control".to_owned()][..])
    );

    // xtask's spawn_control passes these; the operator's CA is added so
    // that every replica signs with the same one, and --kubernetes (no
    // value, last): the mesh from the API server, agents by TokenReview, so
    // no --tokens.
    let mut switched = control.clone();
    let args = switched.args.get_or_insert_default();
    assert_eq!(args.pop().as_deref(), Some("--kubernetes"));
    let pairs = flag_pairs(&switched);
    let flags: Vec<&str> = pairs.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        flags,
        [
            "--listen",
            "--metrics-addr",
            "--operator-socket",
            "--store-dir",
            "--ca-cert",
            "--ca-key"
        ]
    );
    assert_eq!(
        flag(&pairs, "--listen"),
        format!("0.0.0.0:{}", ports::CONTROL_GRPC)
    );
    assert_eq!(
        flag(&pairs, "--metrics-addr"),
        format!("0.0.0.0:{}", ports::CONTROL_TELEMETRY)
    );
    for f in ["--ca-cert", "--ca-key"] {
        let (_, v) = mount_of(spec, control, flag(&pairs, f));
        let secret = v.secret.as_ref().expect("the CA from a Secret");
        assert_eq!(secret.secret_name.as_deref(), Some("mesh-ca"));
    }
    for f in ["--store-dir", "--operator-socket"] {
        let (mount, _) = mount_of(spec, control, flag(&pairs, f));
        assert_ne!(mount.read_only, Some(true), "{f} is written");
    }

    let declared: BTreeMap<String, i32> = control
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    let expected: BTreeMap<String, i32> = [
        ("grpc".to_owned(), i32::from(ports::CONTROL_GRPC)),
        ("metrics".to_owned(), i32::from(ports::CONTROL_TELEMETRY)),
    ]
    .into();
    assert_eq!(declared, expected);
    let probe = control.readiness_probe.as_ref().expect("a readiness probe");
    let get = probe.http_get.as_ref().expect("an HTTP readiness probe");
    assert_eq!(get.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(get.port, IntOrString::Int(ports::CONTROL_TELEMETRY.into()));
    assert!(control.liveness_probe.is_some());

    let pod_security = spec
        .security_context
        .as_ref()
        .expect("a pod securityContext");
    assert_eq!(pod_security.run_as_non_root, Some(true));
    let security = control
        .security_context
        .as_ref()
        .expect("a securityContext");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let caps = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(caps.add, None);
    assert_eq!(spec.host_network, None);
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some(CONTROL_SERVICE_ACCOUNT)
    );

    // Replicas apart, and a drain before SIGTERM within the grace period
    // (mesh-control gives open streams 10 s after it).
    let anti = spec
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("pod anti-affinity");
    let term = &one(anti, "anti-affinity term").pod_affinity_term;
    assert_eq!(term.topology_key, "kubernetes.io/hostname");
    assert!(selects(
        &term
            .label_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default()
    ));
    let pause = control
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|p| p.sleep.as_ref())
        .expect("a preStop pause")
        .seconds;
    assert!(
        spec.termination_grace_period_seconds
            .is_some_and(|g| g >= pause + 10)
    );

    let service = one(&m.services, "Service");
    let s = service.spec.as_ref().expect("a spec");
    assert!(selects(&s.selector.clone().unwrap_or_default()));
    let service_ports: BTreeMap<String, (i32, Option<IntOrString>)> = s
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                (p.port, p.target_port.clone()),
            )
        })
        .collect();
    for (name, port) in &expected {
        assert_eq!(
            service_ports.get(name),
            Some(&(*port, Some(IntOrString::String(name.clone())))),
            "Service port {name}"
        );
    }

    let pdb = one(&m.disruption_budgets, "PodDisruptionBudget");
    let p = pdb.spec.as_ref().expect("a spec");
    assert!(selects(
        &p.selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default()
    ));
    let replicas = d.replicas.unwrap_or(1);
    match (&p.max_unavailable, &p.min_available) {
        (Some(IntOrString::Int(n)), None) => assert!(*n >= 1 && *n < replicas),
        (None, Some(IntOrString::Int(n))) => assert!(*n >= 1 && *n < replicas),
        other => panic!(
            "a budget of a number of pods, one of maxUnavailable and minAvailable: {other:?}"
        ),
    }
}

/// A rule as `apiGroups resources [names]: verbs`, to compare as text.
fn rules(rules: &[PolicyRule]) -> Vec<String> {
    rules
        .iter()
        .map(|r| {
            let list = |v: &Option<Vec<String>>| v.as_deref().unwrap_or_default().join(",");
            let names = r
                .resource_names
                .as_ref()
                .map(|n| format!(" [{}]", n.join(",")))
                .unwrap_or_default();
            format!(
                "{} {}{names}: {}",
                list(&r.api_groups),
                list(&r.resources),
                r.verbs.join(",")
            )
        })
        .collect()
}

#[test]
fn rbac_names_every_verb_and_gives_the_agent_nothing() {
    let m = manifests();
    let allowed: BTreeSet<&str> = ["get", "list", "watch", "create", "update"].into();
    let all_rules = m
        .cluster_roles
        .iter()
        .flat_map(|r| r.rules.iter().flatten())
        .chain(m.roles.iter().flat_map(|r| r.rules.iter().flatten()));
    for r in all_rules {
        for v in &r.verbs {
            assert!(allowed.contains(v.as_str()), "verb {v} in {r:?}");
        }
        for word in r
            .api_groups
            .iter()
            .chain(&r.resources)
            .flatten()
            .chain(&r.verbs)
        {
            assert!(!word.contains('*'), "a wildcard in {r:?}");
        }
    }
    let cluster_role = one(&m.cluster_roles, "ClusterRole");
    assert_eq!(
        rules(cluster_role.rules.as_deref().unwrap_or_default()),
        [
            " pods,services,namespaces: get,list,watch",
            "discovery.k8s.io endpointslices: get,list,watch",
            "gateway.networking.k8s.io httproutes,grpcroutes: get,list,watch",
            "mesh.dev workloads,services,nodes,mtlspolicies,trafficpolicies,authorizationpolicies: get,list,watch",
            "authentication.k8s.io tokenreviews: create",
        ]
    );
    // Read-only on our kinds, and on every one of them.
    let ours: BTreeSet<String> = mesh_crds::crds()
        .iter()
        .map(|c| c.spec.names.plural.clone())
        .collect();
    let granted: BTreeSet<String> = cluster_role
        .rules
        .iter()
        .flatten()
        .filter(|r| r.api_groups.as_deref() == Some(&["mesh.dev".to_owned()][..]))
        .flat_map(|r| r.resources.clone().unwrap_or_default())
        .collect();
    assert_eq!(granted, ours);
    let role = one(&m.roles, "Role");
    assert_eq!(
        rules(role.rules.as_deref().unwrap_or_default()),
        [" secrets [mesh-ca]: get"],
        "no Lease: with --kubernetes no replica writes, so none leads"
    );

    // Bindings give the control server's account its roles, and nobody else
    // anything.
    let subjects = m
        .cluster_role_bindings
        .iter()
        .map(|b| (&b.role_ref, &b.subjects))
        .chain(m.role_bindings.iter().map(|b| (&b.role_ref, &b.subjects)));
    for (role_ref, subjects) in subjects {
        assert_eq!(role_ref.name, CONTROL_SERVICE_ACCOUNT);
        let s = one(subjects.as_deref().unwrap_or_default(), "subject");
        assert_eq!(
            (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
            (
                "ServiceAccount",
                CONTROL_SERVICE_ACCOUNT,
                Some(SYSTEM_NAMESPACE)
            )
        );
    }

    let ds = one(&m.daemon_sets, "DaemonSet");
    let spec = pod_spec(&ds.spec.as_ref().expect("a spec").template);
    let account = spec.service_account_name.as_deref().expect("an account");
    assert_ne!(account, CONTROL_SERVICE_ACCOUNT);
    assert_eq!(spec.automount_service_account_token, Some(false));
    let sa = m
        .service_accounts
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(account))
        .expect("the agent's ServiceAccount");
    assert_eq!(sa.automount_service_account_token, Some(false));
}
