//! Names and addresses of a local cluster, derived from its prefix and size alone.
//!
//! Everything here is pure so that the address plan can be unit-tested and so that
//! a crashed run can be swept by name.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Nodes are 198.18.0.(10+i); pods of node i are 198.19.i.(10+j), so both stay below .255.
pub const MAX_NODES: usize = 244;
pub const MAX_PODS_PER_NODE: usize = 244;

/// Bridge joining the nodes, in the fabric netns.
pub const FABRIC_BRIDGE: &str = "br0";
/// Bridge joining a node's pods, in the node netns.
pub const NODE_BRIDGE: &str = "cni0";
/// The interface name of a node's or a pod's uplink inside its own netns.
pub const UPLINK: &str = "eth0";

/// Where the host keeps the things a cluster is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    /// `/run/mesh-cluster`: one state dir per cluster plus the `current` file.
    pub state: PathBuf,
    /// The cgroup2 mount point.
    pub cgroup2: PathBuf,
    /// The bpffs mount point.
    pub bpffs: PathBuf,
}

impl Roots {
    pub fn state_dir(&self, prefix: &str) -> PathBuf {
        self.state.join(prefix)
    }
    pub fn cgroup_root(&self, prefix: &str) -> PathBuf {
        self.cgroup2.join(prefix)
    }
    pub fn bpf_root(&self, prefix: &str) -> PathBuf {
        self.bpffs.join(prefix)
    }
    pub fn current_file(&self) -> PathBuf {
        self.state.join("current")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `node<i>`
    pub name: String,
    /// i, from 1
    pub index: usize,
    /// `<prefix>-node<i>`
    pub netns: String,
    /// 198.18.0.(10+i), on the fabric bridge.
    pub ip: Ipv4Addr,
    /// 198.19.i.1, on `cni0`; the pods' default gateway and the agent's address.
    pub gateway_ip: Ipv4Addr,
    /// 198.19.i.0/24
    pub pod_cidr: String,
    /// `<cg2>/<prefix>/node<i>`
    pub cgroup: PathBuf,
    /// `<cg2>/<prefix>/node<i>/agent`: where the agent runs.
    pub agent_cgroup: PathBuf,
    /// `<cg2>/<prefix>/node<i>/pods`: the cgroup root the agent attaches its programs to.
    pub pods_cgroup: PathBuf,
    /// `<state>/node<i>.sock`
    pub admin_socket: PathBuf,
    /// `<bpffs>/<prefix>/node<i>`
    pub bpf_pin_dir: PathBuf,
    /// `<state>/agent-node<i>.log`
    pub agent_log: PathBuf,
    /// `<state>/node<i>.token`: the node's bootstrap token for the control server.
    #[serde(default)]
    pub token_file: PathBuf,
    /// `<state>/node<i>-cache`: where the agent keeps its last good configuration.
    #[serde(default)]
    pub cache_dir: PathBuf,
}

/// The control plane: `mesh-control` in the fabric netns, on the nodes' bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlInfo {
    /// 198.18.0.2, on the fabric bridge.
    pub ip: Ipv4Addr,
    /// 198.18.0.2:15012: gRPC for agents.
    pub listen: SocketAddrV4,
    /// 198.18.0.2:15014: `/metrics`, `/healthz/ready`.
    pub metrics: SocketAddrV4,
    /// `<cg2>/<prefix>/control`
    pub cgroup: PathBuf,
    /// `<state>/control.sock`: the operator API `meshctl` talks to.
    pub socket: PathBuf,
    /// `<state>/control-store`: the durable store.
    pub store_dir: PathBuf,
    /// `<state>/tokens.yaml`: `node<i>: <token>` per node.
    pub tokens: PathBuf,
    /// `<state>/control.log`
    pub log: PathBuf,
}

impl ControlInfo {
    /// `https://198.18.0.2:15012`, what agents get as `--control-addr`.
    pub fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    /// `<state>/control-store/ca/ca.crt`: the root mesh-control generates at
    /// first start, which agents get as `--ca-bundle` (as an operator would
    /// hand it out with the bootstrap token).
    pub fn ca_bundle(&self) -> PathBuf {
        self.store_dir.join("ca").join("ca.crt")
    }

    /// `unix://<state>/control.sock`, what `meshctl --control` takes.
    pub fn meshctl_target(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// `node<i>-pod<j>`
    pub name: String,
    /// `node<i>`
    pub node: String,
    /// j, from 1
    pub index: usize,
    /// 198.19.i.(10+j)
    pub ip: Ipv4Addr,
    /// 198.19.i.1
    pub gateway_ip: Ipv4Addr,
    /// `<prefix>-node<i>-pod<j>`
    pub netns: String,
    /// `<cg2>/<prefix>/node<i>/pods/pod<j>`
    pub cgroup: PathBuf,
    /// `<state>/node<i>-pod<j>.log`: for callers that want a place for the pod's output.
    pub log: PathBuf,
}

pub fn node_name(i: usize) -> String {
    format!("node{i}")
}

pub fn pod_name(i: usize, j: usize) -> String {
    format!("node{i}-pod{j}")
}

/// The control server's address on the fabric bridge.
pub const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CONTROL_PORT: u16 = 15012;
pub const CONTROL_METRICS_PORT: u16 = 15014;

pub fn control(prefix: &str, roots: &Roots) -> ControlInfo {
    let state = roots.state_dir(prefix);
    ControlInfo {
        ip: CONTROL_IP,
        listen: SocketAddrV4::new(CONTROL_IP, CONTROL_PORT),
        metrics: SocketAddrV4::new(CONTROL_IP, CONTROL_METRICS_PORT),
        cgroup: roots.cgroup_root(prefix).join("control"),
        socket: state.join("control.sock"),
        store_dir: state.join("control-store"),
        tokens: state.join("tokens.yaml"),
        log: state.join("control.log"),
    }
}

/// Most `mesh-control` replicas: replica r (from 0) is on 198.18.0.(2+r), below the nodes.
pub const MAX_CONTROL_REPLICAS: usize = 8;
/// Most etcd members the cluster starts for its replicas.
pub const MAX_ETCD_MEMBERS: usize = 5;
/// etcd member i listens for clients on 198.18.0.2:(2379+10i), for peers on (2380+10i).
pub const ETCD_CLIENT_PORT: u16 = 2379;

pub fn validate_replicas(replicas: usize, etcd_members: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_CONTROL_REPLICAS).contains(&replicas),
        "control replicas must be in 1..={MAX_CONTROL_REPLICAS}, got {replicas}"
    );
    anyhow::ensure!(
        etcd_members <= MAX_ETCD_MEMBERS,
        "etcd members must be in 0..={MAX_ETCD_MEMBERS}, got {etcd_members}"
    );
    anyhow::ensure!(
        replicas == 1 || etcd_members > 0,
        "{replicas} control replicas need a shared store: give etcd members (1..={MAX_ETCD_MEMBERS})"
    );
    Ok(())
}

/// Replica `r` (from 0) of the control plane: replica 0 is [`control`]; the others
/// are on 198.18.0.(2+r) with their own socket, store dir, log and cgroup.
pub fn replica(prefix: &str, roots: &Roots, r: usize) -> ControlInfo {
    if r == 0 {
        return control(prefix, roots);
    }
    let state = roots.state_dir(prefix);
    let ip = Ipv4Addr::new(198, 18, 0, octet(2 + r));
    ControlInfo {
        ip,
        listen: SocketAddrV4::new(ip, CONTROL_PORT),
        metrics: SocketAddrV4::new(ip, CONTROL_METRICS_PORT),
        cgroup: roots.cgroup_root(prefix).join(format!("control{r}")),
        socket: state.join(format!("control{r}.sock")),
        store_dir: state.join(format!("control{r}-store")),
        tokens: state.join("tokens.yaml"),
        log: state.join(format!("control{r}.log")),
    }
}

/// One etcd member of the replicas' store, in the fabric netns on br0's first address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdInfo {
    /// `m<i>`
    pub name: String,
    pub client: SocketAddrV4,
    pub peer: SocketAddrV4,
    /// `<state>/etcd-m<i>`
    pub data_dir: PathBuf,
    /// `<state>/etcd-m<i>.log`
    pub log: PathBuf,
    /// `<cg2>/<prefix>/etcd-m<i>`
    pub cgroup: PathBuf,
}

pub fn etcd_members(prefix: &str, roots: &Roots, count: usize) -> Vec<EtcdInfo> {
    let state = roots.state_dir(prefix);
    (0..count)
        .map(|i| {
            let port = ETCD_CLIENT_PORT + 10 * i as u16;
            EtcdInfo {
                name: format!("m{i}"),
                client: SocketAddrV4::new(CONTROL_IP, port),
                peer: SocketAddrV4::new(CONTROL_IP, port + 1),
                data_dir: state.join(format!("etcd-m{i}")),
                log: state.join(format!("etcd-m{i}.log")),
                cgroup: roots.cgroup_root(prefix).join(format!("etcd-m{i}")),
            }
        })
        .collect()
}

/// `etcd://<every member>/mesh`, what every replica gets as `--store`.
pub fn etcd_store_url(members: &[EtcdInfo]) -> String {
    let hosts: Vec<String> = members.iter().map(|m| m.client.to_string()).collect();
    format!("etcd://{}/mesh", hosts.join(","))
}

/// `--initial-cluster` of the members.
pub fn etcd_initial_cluster(members: &[EtcdInfo]) -> String {
    let peers: Vec<String> = members
        .iter()
        .map(|m| format!("{}=http://{}", m.name, m.peer))
        .collect();
    peers.join(",")
}

pub fn fabric_netns(prefix: &str) -> String {
    format!("{prefix}-fabric")
}

pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, octet(10 + i))
}

pub fn gateway_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, octet(i), 1)
}

pub fn pod_ip(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, octet(i), octet(10 + j))
}

pub fn pod_cidr(i: usize) -> String {
    format!("198.19.{i}.0/24")
}

/// The fabric-side end of node i's uplink.
pub fn fabric_port(i: usize) -> String {
    format!("n{i}")
}

/// The node-side end of pod j's uplink.
pub fn node_port(j: usize) -> String {
    format!("p{j}")
}

fn octet(n: usize) -> u8 {
    u8::try_from(n).expect("cluster size is validated before addresses are made")
}

pub fn validate_size(nodes: usize, pods_per_node: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_NODES).contains(&nodes),
        "nodes must be in 1..={MAX_NODES}, got {nodes}"
    );
    anyhow::ensure!(
        (1..=MAX_PODS_PER_NODE).contains(&pods_per_node),
        "pods per node must be in 1..={MAX_PODS_PER_NODE}, got {pods_per_node}"
    );
    Ok(())
}

pub fn nodes(prefix: &str, count: usize, roots: &Roots) -> Vec<NodeInfo> {
    let state = roots.state_dir(prefix);
    let cgroup_root = roots.cgroup_root(prefix);
    (1..=count)
        .map(|i| {
            let name = node_name(i);
            let cgroup = cgroup_root.join(&name);
            NodeInfo {
                netns: format!("{prefix}-{name}"),
                ip: node_ip(i),
                gateway_ip: gateway_ip(i),
                pod_cidr: pod_cidr(i),
                agent_cgroup: cgroup.join("agent"),
                pods_cgroup: cgroup.join("pods"),
                cgroup,
                admin_socket: state.join(format!("{name}.sock")),
                bpf_pin_dir: roots.bpf_root(prefix).join(&name),
                agent_log: state.join(format!("agent-{name}.log")),
                token_file: state.join(format!("{name}.token")),
                cache_dir: state.join(format!("{name}-cache")),
                index: i,
                name,
            }
        })
        .collect()
}

pub fn pods(prefix: &str, nodes: &[NodeInfo], per_node: usize, roots: &Roots) -> Vec<PodInfo> {
    let state = roots.state_dir(prefix);
    nodes
        .iter()
        .flat_map(|node| {
            let state = &state;
            (1..=per_node).map(move |j| {
                let name = pod_name(node.index, j);
                PodInfo {
                    node: node.name.clone(),
                    index: j,
                    ip: pod_ip(node.index, j),
                    gateway_ip: node.gateway_ip,
                    netns: format!("{prefix}-{name}"),
                    cgroup: node.pods_cgroup.join(format!("pod{j}")),
                    log: state.join(format!("{name}.log")),
                    name,
                }
            })
        })
        .collect()
}

/// `mc` + 6 lowercase hex digits.
pub fn is_prefix(s: &str) -> bool {
    s.len() == 8
        && s.starts_with("mc")
        && s[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The cluster prefix a netns, cgroup or pin dir name belongs to: `mc3fa2b1-node1` and
/// `mc3fa2b1` both give `mc3fa2b1`.
pub fn prefix_of(name: &str) -> Option<&str> {
    let prefix = name.get(..8)?;
    let rest = &name[8..];
    (is_prefix(prefix) && (rest.is_empty() || rest.starts_with('-'))).then_some(prefix)
}

pub fn prefix_from_bytes(bytes: [u8; 3]) -> String {
    format!("mc{:02x}{:02x}{:02x}", bytes[0], bytes[1], bytes[2])
}

pub fn random_prefix() -> io::Result<String> {
    let mut bytes = [0u8; 3];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(prefix_from_bytes(bytes))
}

/// A bootstrap token: 16 random bytes, hex.
pub fn random_token() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `tokens.yaml` for `mesh-control --tokens`: `node<i>: <token>` per node.
pub fn tokens_yaml<'a>(tokens: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    tokens
        .into_iter()
        .map(|(node, token)| format!("{node}: {}\n", quote(token)))
        .collect()
}

/// The pod's `Workload` document: name and service account are the pod's name,
/// namespace `default`, labels `app: <pod>`, `node: <node>` plus `extra_labels`
/// (which may override them).
pub fn workload_yaml(pod: &PodInfo, extra_labels: &[(&str, &str)]) -> String {
    let mut labels = std::collections::BTreeMap::new();
    labels.insert("app", pod.name.as_str());
    labels.insert("node", pod.node.as_str());
    for (k, v) in extra_labels {
        labels.insert(k, v);
    }
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {}: {}\n", quote(k), quote(v)))
        .collect();
    format!(
        "apiVersion: mesh.dev/v1alpha1\n\
         kind: Workload\n\
         metadata:\n  name: {name}\n  namespace: default\n  labels:\n{labels}\
         spec:\n  serviceAccount: {name}\n  node: {node}\n  ip: {ip}\n  ready: true\n",
        name = quote(&pod.name),
        node = quote(&pod.node),
        ip = quote(&pod.ip.to_string()),
    )
}

/// The node's `Node` document: its fabric address, where its agent's tunnel
/// listens (port 15008, the default).
pub fn node_yaml(node: &NodeInfo) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\n\
         kind: Node\n\
         metadata:\n  name: {name}\n\
         spec:\n  address: {ip}\n",
        name = quote(&node.name),
        ip = quote(&node.ip.to_string()),
    )
}

/// Documents joined into one multi-document YAML stream.
pub fn yaml_stream<S: AsRef<str>>(docs: &[S]) -> String {
    docs.iter()
        .map(|d| format!("---\n{}", d.as_ref()))
        .collect()
}

/// A YAML string scalar: plain when that cannot be read as anything but this
/// string, else double-quoted (JSON string syntax is valid YAML).
fn quote(s: &str) -> String {
    let plain = s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n"
        );
    if plain {
        s.to_string()
    } else {
        serde_json::Value::from(s).to_string()
    }
}

/// The cgroup2 mount point named in a `/proc/mounts` text.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mount_of_type(mounts, "cgroup2").next()
}

/// Whether `path` is a mount point of type `fstype` in a `/proc/mounts` text.
pub fn is_mounted(mounts: &str, fstype: &str, path: &Path) -> bool {
    mount_of_type(mounts, fstype).any(|p| p == path)
}

fn mount_of_type<'a>(mounts: &'a str, fstype: &'a str) -> impl Iterator<Item = PathBuf> + 'a {
    mounts.lines().filter_map(move |line| {
        let mut fields = line.split_whitespace();
        let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// `/proc/mounts` writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots() -> Roots {
        Roots {
            state: "/run/mesh-cluster".into(),
            cgroup2: "/sys/fs/cgroup/unified".into(),
            bpffs: "/sys/fs/bpf".into(),
        }
    }

    #[test]
    fn addresses_follow_the_plan() {
        assert_eq!(node_ip(1), Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(node_ip(3), Ipv4Addr::new(198, 18, 0, 13));
        assert_eq!(gateway_ip(2), Ipv4Addr::new(198, 19, 2, 1));
        assert_eq!(pod_ip(2, 1), Ipv4Addr::new(198, 19, 2, 11));
        assert_eq!(
            pod_ip(MAX_NODES, MAX_PODS_PER_NODE),
            Ipv4Addr::new(198, 19, 244, 254)
        );
        assert_eq!(node_ip(MAX_NODES), Ipv4Addr::new(198, 18, 0, 254));
        assert_eq!(pod_cidr(3), "198.19.3.0/24");
    }

    #[test]
    fn size_limits() {
        assert!(validate_size(3, 2).is_ok());
        assert!(validate_size(0, 2).is_err());
        assert!(validate_size(2, 0).is_err());
        assert!(validate_size(MAX_NODES + 1, 1).is_err());
        assert!(validate_size(1, MAX_PODS_PER_NODE + 1).is_err());
    }

    #[test]
    fn names_and_paths_derive_from_the_prefix() {
        let roots = roots();
        let nodes = nodes("mc3fa2b1", 3, &roots);
        let pods = pods("mc3fa2b1", &nodes, 2, &roots);
        assert_eq!(nodes.len(), 3);
        assert_eq!(pods.len(), 6);

        let n2 = &nodes[1];
        assert_eq!(n2.name, "node2");
        assert_eq!(n2.netns, "mc3fa2b1-node2");
        assert_eq!(n2.ip, Ipv4Addr::new(198, 18, 0, 12));
        assert_eq!(n2.gateway_ip, Ipv4Addr::new(198, 19, 2, 1));
        assert_eq!(
            n2.agent_cgroup,
            Path::new("/sys/fs/cgroup/unified/mc3fa2b1/node2/agent")
        );
        assert_eq!(
            n2.pods_cgroup,
            Path::new("/sys/fs/cgroup/unified/mc3fa2b1/node2/pods")
        );
        assert_eq!(
            n2.admin_socket,
            Path::new("/run/mesh-cluster/mc3fa2b1/node2.sock")
        );
        assert_eq!(n2.bpf_pin_dir, Path::new("/sys/fs/bpf/mc3fa2b1/node2"));
        assert_eq!(
            n2.agent_log,
            Path::new("/run/mesh-cluster/mc3fa2b1/agent-node2.log")
        );

        let p = &pods[3];
        assert_eq!(p.name, "node2-pod2");
        assert_eq!(p.node, "node2");
        assert_eq!(p.netns, "mc3fa2b1-node2-pod2");
        assert_eq!(p.ip, Ipv4Addr::new(198, 19, 2, 12));
        assert_eq!(p.gateway_ip, Ipv4Addr::new(198, 19, 2, 1));
        assert_eq!(
            p.cgroup,
            Path::new("/sys/fs/cgroup/unified/mc3fa2b1/node2/pods/pod2")
        );
        assert_eq!(fabric_netns("mc3fa2b1"), "mc3fa2b1-fabric");
        assert_eq!(
            n2.token_file,
            Path::new("/run/mesh-cluster/mc3fa2b1/node2.token")
        );
        assert_eq!(
            n2.cache_dir,
            Path::new("/run/mesh-cluster/mc3fa2b1/node2-cache")
        );

        let c = control("mc3fa2b1", &roots);
        assert_eq!(c.url(), "https://198.18.0.2:15012");
        assert_eq!(
            c.ca_bundle(),
            Path::new("/run/mesh-cluster/mc3fa2b1/control-store/ca/ca.crt")
        );
        assert_eq!(c.metrics.to_string(), "198.18.0.2:15014");
        assert_eq!(
            c.cgroup,
            Path::new("/sys/fs/cgroup/unified/mc3fa2b1/control")
        );
        assert_eq!(
            c.meshctl_target(),
            "unix:///run/mesh-cluster/mc3fa2b1/control.sock"
        );
        assert_eq!(
            c.store_dir,
            Path::new("/run/mesh-cluster/mc3fa2b1/control-store")
        );
    }

    #[test]
    fn prefixes_are_recognised() {
        assert!(is_prefix("mc3fa2b1"));
        assert!(!is_prefix("mc3FA2b1"));
        assert!(!is_prefix("mc3fa2b"));
        assert!(!is_prefix("xx3fa2b1"));
        assert_eq!(prefix_of("mc3fa2b1-node1-pod2"), Some("mc3fa2b1"));
        assert_eq!(prefix_of("mc3fa2b1"), Some("mc3fa2b1"));
        assert_eq!(prefix_of("mc3fa2b1x"), None);
        assert_eq!(prefix_of("mc3fa2"), None);
        assert_eq!(prefix_of("cni0"), None);
        assert_eq!(prefix_from_bytes([0x3f, 0xa2, 0x0b]), "mc3fa20b");
        assert!(is_prefix(&random_prefix().unwrap()));
    }

    #[test]
    fn workload_documents_carry_the_pod() {
        let nodes = nodes("mc3fa2b1", 2, &roots());
        let pods = pods("mc3fa2b1", &nodes, 2, &roots());
        let doc = workload_yaml(&pods[2], &[("role", "echo")]);
        assert_eq!(
            doc,
            "apiVersion: mesh.dev/v1alpha1\n\
             kind: Workload\n\
             metadata:\n  name: node2-pod1\n  namespace: default\n  labels:\n\
             \x20   app: node2-pod1\n\
             \x20   node: node2\n\
             \x20   role: echo\n\
             spec:\n  serviceAccount: node2-pod1\n  node: node2\n  ip: \"198.19.2.11\"\n  ready: true\n"
        );
        let stream = yaml_stream(&["a: 1\n", "b: 2\n"]);
        assert_eq!(stream, "---\na: 1\n---\nb: 2\n");
        assert_eq!(
            tokens_yaml([("node1", "ab"), ("node2", "0d")]),
            "node1: ab\nnode2: \"0d\"\n"
        );
        assert_eq!(quote("true"), "\"true\"");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote(""), "\"\"");
        let token = random_token().unwrap();
        assert_eq!(token.len(), 32);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn mounts_are_parsed() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
                      bpf /sys/fs/bpf bpf rw 0 0\n\
                      none /mnt/with\\040space bpf rw 0 0\n";
        assert_eq!(
            cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert!(is_mounted(mounts, "bpf", Path::new("/sys/fs/bpf")));
        assert!(is_mounted(mounts, "bpf", Path::new("/mnt/with space")));
        assert!(!is_mounted(mounts, "bpf", Path::new("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn replicas_sit_below_the_nodes_each_with_its_own_socket_store_and_cgroup() {
        let roots = roots();
        assert_eq!(replica("mc3fa2b1", &roots, 0), control("mc3fa2b1", &roots));
        let r1 = replica("mc3fa2b1", &roots, 1);
        assert_eq!(r1.url(), "https://198.18.0.3:15012");
        assert_eq!(
            r1.socket,
            Path::new("/run/mesh-cluster/mc3fa2b1/control1.sock")
        );
        assert_eq!(
            r1.store_dir,
            Path::new("/run/mesh-cluster/mc3fa2b1/control1-store")
        );
        assert!(r1.cgroup.ends_with("mc3fa2b1/control1"));
        let last = replica("mc3fa2b1", &roots, MAX_CONTROL_REPLICAS - 1);
        assert!(last.ip < node_ip(1), "{} is not below the nodes", last.ip);
        validate_replicas(2, 3).expect("two replicas on three members");
        let err = validate_replicas(2, 0).expect_err("no shared store");
        assert!(err.to_string().contains("shared store"), "{err}");
        assert!(validate_replicas(MAX_CONTROL_REPLICAS + 1, 3).is_err());
    }

    #[test]
    fn etcd_members_are_on_the_control_address_and_make_one_store_url() {
        let members = etcd_members("mc3fa2b1", &roots(), 3);
        assert_eq!(
            etcd_store_url(&members),
            "etcd://198.18.0.2:2379,198.18.0.2:2389,198.18.0.2:2399/mesh"
        );
        assert_eq!(
            etcd_initial_cluster(&members),
            "m0=http://198.18.0.2:2380,m1=http://198.18.0.2:2390,m2=http://198.18.0.2:2400"
        );
        assert!(members[2].cgroup.ends_with("mc3fa2b1/etcd-m2"));
    }
}
