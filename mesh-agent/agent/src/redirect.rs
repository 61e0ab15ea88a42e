//! Kernel side of interception: loads the eBPF object, attaches it to the
//! node's pod cgroup root, and owns the maps the data path reads.
//!
//! Links are pinned under the agent's pin directory so that a stopped or
//! crashed agent keeps pods fail-closed (their connects still go to :15001, where nothing
//! answers) instead of silently bypassing the mesh. The state that must
//! outlive an agent (enrolment, STRICT set, Service addresses, in-flight
//! records) is in maps pinned there too. The next agent loads its programs
//! against those same maps and swaps them into the pinned links in place
//! (`link`): at no moment is nothing attached, and nothing is stacked.
pub mod enrolment;
mod link;
pub mod netns;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap, Map, MapData, MapError, MapType, PerCpuArray, PerCpuHashMap, SockHash},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{
    AgentConfig, Decision, MAX_POD_DEPTH, OrigDst, TcpStats, TupleKey, VipPort, names,
};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read eBPF object {path}: {source}")]
    ReadObject {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("program {name}: link: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pin directory {path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning link at {path}: {source}")]
    PinLink {
        path: PathBuf,
        source: aya::pin::PinError,
    },
}

/// What the kernel programs need to know about this agent.
#[derive(Clone, Debug)]
pub struct Settings {
    pub object: PathBuf,
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    /// Address pods reach the agent on, and the outbound listener port.
    pub outbound: SocketAddrV4,
    pub agent_cgroup_id: u64,
    pub excluded_ports: Vec<u16>,
    /// A port on the agent address where nothing listens (see `AgentConfig`).
    pub refusal_port: u16,
    /// The agent's own cgroup v2 directory: its connections into pods are
    /// recorded there, and only those pass into pods unjudged.
    pub agent_cgroup: PathBuf,
    /// Health-probe sources let into pods without the agent: (address,
    /// destination port or 0 for any).
    pub probe_sources: Vec<(Ipv4Addr, u16)>,
}

struct Maps {
    enrolled: HashMap<MapData, u64, u32>,
    tuples: HashMap<MapData, TupleKey, OrigDst>,
    vips: HashMap<MapData, u32, u32>,
    vip_ports: HashMap<MapData, VipPort, u32>,
    /// What the kernel holds now, so updates only write the difference.
    programmed: BTreeSet<SocketAddrV4>,
    /// This node's workloads and what the kernel does with connections
    /// into them that the agent did not open (`mesh_common::inbound`).
    inbound: HashMap<MapData, u32, u32>,
    inbound_programmed: BTreeMap<Ipv4Addr, u32>,
    listeners: SockHash<MapData, u32>,
}

pub struct Redirect {
    // Programs live as long as this (the per-pod inbound program is
    // attached to each pod's namespace as it is enrolled).
    ebpf: Mutex<Ebpf>,
    maps: Mutex<Maps>,
    decisions: PerCpuArray<MapData, u64>,
    tcp_stats: PerCpuHashMap<MapData, u32, TcpStats>,
    pins: Vec<PathBuf>,
    pin_dir: PathBuf,
    /// Where the programs are attached, for those who ask (`attachments`).
    cgroup_root: PathBuf,
    agent_cgroup: PathBuf,
}

/// One attachment of a kernel program, as this agent made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub program: &'static str,
    /// bpftool's name of the hook.
    pub attach_type: &'static str,
    pub target: Target,
    /// The link's pin; `None`: the link is held by this process.
    pub pin: Option<PathBuf>,
    pub attached: bool,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    PodCgroupRoot(PathBuf),
    AgentCgroup(PathBuf),
    /// The network namespace of the pod enrolled with this cgroup id.
    PodNetns(u64),
}

/// How full a pinned map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUsage {
    pub map_type: &'static str,
    pub entries: u64,
    pub max_entries: u32,
}

/// Original destination of a redirected connection, as the kernel recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub orig_dst: SocketAddrV4,
    pub cgroup_id: u64,
}

/// Prefix of the per-pod inbound links' pins: `inbound_<cgroup id>`.
const INBOUND_PIN: &str = "inbound_";

/// Pinned links, in the order `attach` makes them.
const PINS: [&str; 4] = [
    "connect4_link",
    "connect6_link",
    "sock_ops_link",
    "strict_ingress_link",
];

/// The program in each of `PINS`, and its hook as bpftool names it.
const PINNED_PROGRAMS: [(&str, &str); 4] = [
    (names::PROG_CONNECT4, "cgroup/connect4"),
    (names::PROG_CONNECT6, "cgroup/connect6"),
    (names::PROG_SOCK_OPS, "sockops"),
    (names::PROG_STRICT_INGRESS, "cgroup_skb/ingress"),
];

impl Redirect {
    pub fn attach(settings: &Settings) -> Result<Self, Error> {
        let bytes = fs::read(&settings.object).map_err(|source| Error::ReadObject {
            path: settings.object.clone(),
            source,
        })?;
        fs::create_dir_all(&settings.pin_dir).map_err(|source| Error::Pin {
            path: settings.pin_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&settings.pin_dir)
            .load(&bytes)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_reader(logger),
            Err(e) => warn!(error = %e, "kernel log channel unavailable"),
        }

        let mut config: Array<MapData, AgentConfig> = take_map(&mut ebpf, names::CONFIG)?;
        let cfg = AgentConfig {
            agent_ip4: u32::from_ne_bytes(settings.outbound.ip().octets()),
            outbound_port: u32::from(settings.outbound.port().to_be()),
            agent_cgroup_id: settings.agent_cgroup_id,
            configured: 1,
            refusal_port: u32::from(settings.refusal_port.to_be()),
            pod_root_level: cgroup_level(&settings.cgroup_root).map_err(|source| {
                Error::Cgroup {
                    path: settings.cgroup_root.clone(),
                    source,
                }
            })?,
            max_pod_depth: MAX_POD_DEPTH,
        };
        config.set(0, cfg, 0).map_err(|source| Error::Map {
            name: names::CONFIG,
            source,
        })?;
        let mut excluded: HashMap<MapData, u32, u32> = take_map(&mut ebpf, names::EXCLUDED_PORTS)?;
        for port in &settings.excluded_ports {
            excluded
                .insert(u32::from(*port), 1, 0)
                .map_err(|source| Error::Map {
                    name: names::EXCLUDED_PORTS,
                    source,
                })?;
        }
        let enrolled = take_map(&mut ebpf, names::ENROLLED)?;
        let tuples = take_map(&mut ebpf, names::ORIG_BY_TUPLE)?;
        let decisions = take_map(&mut ebpf, names::DECISIONS)?;
        let tcp_stats = take_map(&mut ebpf, names::TCP_STATS)?;
        let vips = take_map(&mut ebpf, names::SERVICE_VIPS)?;
        let vip_ports: HashMap<MapData, VipPort, u32> = take_map(&mut ebpf, names::SERVICE_PORTS)?;
        let inbound: HashMap<MapData, u32, u32> = take_map(&mut ebpf, names::INBOUND_PODS)?;
        let listeners: SockHash<MapData, u32> = take_map(&mut ebpf, names::INBOUND_LISTENERS)?;
        let mut probes: HashMap<MapData, VipPort, u32> = take_map(&mut ebpf, names::PROBE_SOURCES)?;
        let wanted: std::collections::HashSet<VipPort> = settings
            .probe_sources
            .iter()
            .map(|(ip, port)| VipPort {
                ip4: u32::from_ne_bytes(ip.octets()),
                port: u32::from(*port),
            })
            .collect();
        let held: Vec<VipPort> = probes.keys().filter_map(Result::ok).collect();
        let probe_err = |source| Error::Map {
            name: names::PROBE_SOURCES,
            source,
        };
        for stale in held.iter().filter(|k| !wanted.contains(k)) {
            probes.remove(stale).map_err(probe_err)?;
        }
        for k in &wanted {
            probes.insert(k, 1, 0).map_err(probe_err)?;
        }

        let cgroup = fs::File::open(&settings.cgroup_root).map_err(|source| Error::Cgroup {
            path: settings.cgroup_root.clone(),
            source,
        })?;
        let pins: Vec<PathBuf> = PINS.iter().map(|p| settings.pin_dir.join(p)).collect();

        /// Loads program `$name` of type `$ty` and puts it in the link
        /// pinned at `$pin`; without one, attaches it with `$attach` (given
        /// the program) and pins the new link there.
        macro_rules! attach_pinned {
            ($ty:ty, $name:expr, $pin:expr, |$prog:ident| $attach:expr) => {{
                let $prog: &mut $ty = program(&mut ebpf, $name)?;
                $prog.load().map_err(prog_err($name))?;
                let fd = $prog.fd().map_err(prog_err($name))?.as_fd();
                if !replace_pinned($pin, fd) {
                    let id = $attach.map_err(prog_err($name))?;
                    let link: FdLink = $prog
                        .take_link(id)
                        .map_err(prog_err($name))?
                        .try_into()
                        .map_err(|source| Error::Link {
                            name: $name,
                            source,
                        })?;
                    pin_link(link, $pin)?;
                }
            }};
        }
        attach_pinned!(CgroupSockAddr, names::PROG_CONNECT4, &pins[0], |p| p
            .attach(&cgroup, CgroupAttachMode::Single));
        attach_pinned!(CgroupSockAddr, names::PROG_CONNECT6, &pins[1], |p| p
            .attach(&cgroup, CgroupAttachMode::Single));
        attach_pinned!(SockOps, names::PROG_SOCK_OPS, &pins[2], |p| p
            .attach(&cgroup, CgroupAttachMode::Single));
        attach_pinned!(CgroupSkb, names::PROG_STRICT_INGRESS, &pins[3], |p| p
            .attach(
                &cgroup,
                CgroupSkbAttachType::Ingress,
                CgroupAttachMode::Single
            ));
        // Loaded now, attached to each pod's namespace at enrolment.
        program::<SkLookup>(&mut ebpf, names::PROG_INBOUND)?
            .load()
            .map_err(prog_err(names::PROG_INBOUND))?;
        // The agent's own connections into pods. Not pinned: it must live
        // exactly as long as this agent, whose cgroup it names.
        let agent_cgroup =
            fs::File::open(&settings.agent_cgroup).map_err(|source| Error::Cgroup {
                path: settings.agent_cgroup.clone(),
                source,
            })?;
        let agent_ops: &mut SockOps = program(&mut ebpf, names::PROG_AGENT_SOCK_OPS)?;
        agent_ops
            .load()
            .map_err(prog_err(names::PROG_AGENT_SOCK_OPS))?;
        agent_ops
            .attach(&agent_cgroup, CgroupAttachMode::Single)
            .map_err(prog_err(names::PROG_AGENT_SOCK_OPS))?;
        info!(cgroup = %settings.cgroup_root.display(), agent_cgroup = %settings.agent_cgroup.display(), "redirect attached");

        // What the pinned maps already hold, so that syncs write differences.
        let programmed = vip_ports
            .keys()
            .filter_map(Result::ok)
            .map(|k: VipPort| SocketAddrV4::new(Ipv4Addr::from(k.ip4.to_ne_bytes()), k.port as u16))
            .collect();
        let inbound_programmed = inbound
            .iter()
            .filter_map(Result::ok)
            .map(|(ip, mode): (u32, u32)| (Ipv4Addr::from(ip.to_ne_bytes()), mode))
            .collect();
        Ok(Self {
            ebpf: Mutex::new(ebpf),
            maps: Mutex::new(Maps {
                enrolled,
                tuples,
                vips,
                vip_ports,
                programmed,
                inbound,
                inbound_programmed,
                listeners,
            }),
            pin_dir: settings.pin_dir.clone(),
            decisions,
            tcp_stats,
            pins,
            cgroup_root: settings.cgroup_root.clone(),
            agent_cgroup: settings.agent_cgroup.clone(),
        })
    }

    pub fn enroll(&self, cgroup_id: u64) -> Result<(), Error> {
        self.lock()
            .enrolled
            .insert(cgroup_id, 1, 0)
            .map_err(|source| Error::Map {
                name: names::ENROLLED,
                source,
            })
    }

    pub fn unenroll(&self, cgroup_id: u64) -> Result<(), Error> {
        match self.lock().enrolled.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(Error::Map {
                name: names::ENROLLED,
                source,
            }),
        }
    }

    /// Takes the kernel's record of an accepted connection; `None` means the
    /// kernel never redirected it.
    pub fn take_recorded(&self, peer: SocketAddrV4, local: SocketAddrV4) -> Option<Recorded> {
        let key = TupleKey {
            src_ip4: u32::from_ne_bytes(peer.ip().octets()),
            dst_ip4: u32::from_ne_bytes(local.ip().octets()),
            src_port: u32::from(peer.port()),
            dst_port: u32::from(local.port()),
        };
        let mut maps = self.lock();
        let orig = maps.tuples.get(&key, 0).ok()?;
        let _ = maps.tuples.remove(&key);
        Some(Recorded {
            orig_dst: SocketAddrV4::new(
                Ipv4Addr::from(orig.ip4.to_ne_bytes()),
                u16::from_be(orig.port as u16),
            ),
            cgroup_id: orig.cgroup_id,
        })
    }

    /// Makes the kernel's Service (VIP, port) set equal to `wanted`: connects
    /// to a known VIP on any other port are then refused in the kernel.
    pub fn sync_services(&self, wanted: &BTreeSet<SocketAddrV4>) -> Result<(), Error> {
        let mut maps = self.lock();
        let map_err = |name| move |source| Error::Map { name, source };
        let ip_key = |a: &SocketAddrV4| u32::from_ne_bytes(a.ip().octets());
        let port_key = |a: &SocketAddrV4| VipPort {
            ip4: ip_key(a),
            port: u32::from(a.port()),
        };
        let wanted_vips: BTreeSet<u32> = wanted.iter().map(ip_key).collect();
        let stale: Vec<SocketAddrV4> = maps.programmed.difference(wanted).copied().collect();
        for a in &stale {
            match maps.vip_ports.remove(&port_key(a)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(names::SERVICE_PORTS)(e)),
            }
            maps.programmed.remove(a);
            if !wanted_vips.contains(&ip_key(a)) {
                let _ = maps.vips.remove(&ip_key(a));
            }
        }
        let new: Vec<SocketAddrV4> = wanted.difference(&maps.programmed).copied().collect();
        for a in new {
            maps.vips
                .insert(ip_key(&a), 1, 0)
                .map_err(map_err(names::SERVICE_VIPS))?;
            maps.vip_ports
                .insert(port_key(&a), 1, 0)
                .map_err(map_err(names::SERVICE_PORTS))?;
            maps.programmed.insert(a);
        }
        Ok(())
    }

    /// Makes the kernel's table of this node's workloads equal to `wanted`
    /// (address -> `mesh_common::inbound` mode).
    pub fn sync_inbound(&self, wanted: &BTreeMap<Ipv4Addr, u32>) -> Result<(), Error> {
        let mut maps = self.lock();
        let key = |ip: &Ipv4Addr| u32::from_ne_bytes(ip.octets());
        let stale: Vec<Ipv4Addr> = maps
            .inbound_programmed
            .keys()
            .filter(|ip| !wanted.contains_key(ip))
            .copied()
            .collect();
        for ip in stale {
            let _ = maps.inbound.remove(&key(&ip));
            maps.inbound_programmed.remove(&ip);
        }
        for (ip, mode) in wanted {
            if maps.inbound_programmed.get(ip) == Some(mode) {
                continue;
            }
            maps.inbound
                .insert(key(ip), *mode, 0)
                .map_err(|source| Error::Map {
                    name: names::INBOUND_PODS,
                    source,
                })?;
            maps.inbound_programmed.insert(*ip, *mode);
        }
        Ok(())
    }

    /// Attaches the inbound program to a pod's network namespace (or swaps
    /// it into the link a previous agent pinned for that pod).
    pub fn attach_inbound(&self, cgroup_id: u64, netns: &fs::File) -> Result<(), Error> {
        let pin = self.inbound_pin(cgroup_id);
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let prog: &mut SkLookup = program(&mut ebpf, names::PROG_INBOUND)?;
        let fd = prog.fd().map_err(prog_err(names::PROG_INBOUND))?.as_fd();
        if replace_pinned(&pin, fd) {
            return Ok(());
        }
        let id = prog.attach(netns).map_err(prog_err(names::PROG_INBOUND))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(prog_err(names::PROG_INBOUND))?
            .into();
        pin_link(link, &pin)
    }

    /// Detaches the inbound program from a pod's namespace.
    pub fn detach_inbound(&self, cgroup_id: u64) {
        release_stale(&self.inbound_pin(cgroup_id));
    }

    fn inbound_pin(&self, cgroup_id: u64) -> PathBuf {
        self.pin_dir.join(format!("{INBOUND_PIN}{cgroup_id}"))
    }

    /// Makes `listener` (in a pod's namespace) the one connections into
    /// `addresses` are handed to.
    pub fn set_listener(
        &self,
        addresses: &[Ipv4Addr],
        listener: &impl AsRawFd,
    ) -> Result<(), Error> {
        let mut maps = self.lock();
        for ip in addresses {
            maps.listeners
                .insert(u32::from_ne_bytes(ip.octets()), listener.as_raw_fd(), 0)
                .map_err(|source| Error::Map {
                    name: names::INBOUND_LISTENERS,
                    source,
                })?;
        }
        Ok(())
    }

    pub fn remove_listener(&self, addresses: &[Ipv4Addr]) {
        let mut maps = self.lock();
        for ip in addresses {
            let _ = maps.listeners.remove(&u32::from_ne_bytes(ip.octets()));
        }
    }

    /// Kernel decision counters, summed over CPUs.
    pub fn decisions(&self) -> Vec<(Decision, u64)> {
        Decision::ALL
            .iter()
            .map(|d| {
                let total = self
                    .decisions
                    .get(&(*d as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (*d, total)
            })
            .collect()
    }

    /// The kernel's TCP statistics of the agent's connections, per remote
    /// address, summed over CPUs (see `mesh-ebpf/src/agent_ops.rs`).
    pub fn tcp_stats(&self) -> Vec<(Ipv4Addr, TcpStats)> {
        self.tcp_stats
            .iter()
            .filter_map(Result::ok)
            .map(|(ip, per_cpu)| {
                let total = per_cpu.iter().fold(TcpStats::default(), |mut t, c| {
                    t.add(c);
                    t
                });
                (Ipv4Addr::from(ip.to_ne_bytes()), total)
            })
            .collect()
    }

    /// Whether every program is still in its pinned link.
    pub fn attached(&self) -> bool {
        self.pins.iter().all(|p| p.exists())
    }

    /// Every program attachment this agent made or took over: the pinned
    /// links on the pod cgroup root, the agent's own sock_ops, and one
    /// inbound link per pod namespace (each pinned `inbound_<cgroup id>`,
    /// and one per enrolled cgroup, pinned or not). `attached` and the ids
    /// come from the kernel.
    pub fn attachments(&self) -> Vec<Attachment> {
        let pinned = |program, attach_type, target, pin: PathBuf| {
            let info = PinnedLink::from_pin(&pin)
                .ok()
                .and_then(|link| FdLink::from(link).info().ok());
            Attachment {
                program,
                attach_type,
                target,
                attached: info.is_some(),
                link_id: info.as_ref().map(|i| i.id()),
                program_id: info.as_ref().map(|i| i.program_id()),
                pin: Some(pin),
            }
        };
        let mut out: Vec<Attachment> = PINNED_PROGRAMS
            .iter()
            .zip(&self.pins)
            .map(|((program, hook), pin)| {
                pinned(
                    *program,
                    *hook,
                    Target::PodCgroupRoot(self.cgroup_root.clone()),
                    pin.clone(),
                )
            })
            .collect();
        let agent_ops = self
            .ebpf
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .program(names::PROG_AGENT_SOCK_OPS)
            .and_then(|p| p.info().ok())
            .map(|i| i.id());
        out.push(Attachment {
            program: names::PROG_AGENT_SOCK_OPS,
            attach_type: "sockops",
            target: Target::AgentCgroup(self.agent_cgroup.clone()),
            pin: None,
            // Its link lives in the loaded object, as long as this agent.
            attached: agent_ops.is_some(),
            link_id: None,
            program_id: agent_ops,
        });
        let mut pods: BTreeSet<u64> = self.enrolled_cgroups().unwrap_or_default();
        if let Ok(dir) = fs::read_dir(&self.pin_dir) {
            pods.extend(dir.flatten().filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix(INBOUND_PIN)?
                    .parse::<u64>()
                    .ok()
            }));
        }
        out.extend(pods.into_iter().map(|id| {
            pinned(
                names::PROG_INBOUND,
                "sk_lookup",
                Target::PodNetns(id),
                self.inbound_pin(id),
            )
        }));
        out
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The cgroup ids in the kernel's ENROLLED map.
    pub fn enrolled_cgroups(&self) -> Result<BTreeSet<u64>, Error> {
        self.lock()
            .enrolled
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| Error::Map {
                name: names::ENROLLED,
                source,
            })
    }

    /// Entries against capacity of every map pinned in the pin directory
    /// (`names::PINNED_MAPS`), counted by walking its keys.
    pub fn occupancy(&self) -> Vec<(&'static str, Result<MapUsage, Error>)> {
        names::PINNED_MAPS
            .iter()
            .map(|&name| {
                let usage = map_usage(name, &self.pin_dir.join(name))
                    .map_err(|source| Error::Map { name, source });
                (name, usage)
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn map_usage(name: &'static str, pin: &Path) -> Result<MapUsage, MapError> {
    let data = MapData::from_pin(pin)?;
    let info = data.info()?;
    let max_entries = info.max_entries();
    let (map_type, map) = match info.map_type()? {
        MapType::Hash => ("hash", Map::HashMap(data)),
        MapType::LruHash => ("lru_hash", Map::LruHashMap(data)),
        MapType::SockHash => ("sockhash", Map::SockHash(data)),
        MapType::LruPerCpuHash => ("lru_percpu_hash", Map::PerCpuLruHashMap(data)),
        other => {
            return Err(MapError::InvalidMapType {
                map_type: other as u32,
            });
        }
    };
    // Walking a map that changes may visit a key twice: never count past
    // the capacity.
    fn count<K: Pod>(
        keys: impl Iterator<Item = Result<K, MapError>>,
        max: u32,
    ) -> Result<u64, MapError> {
        keys.take(max as usize).try_fold(0, |n, k| k.map(|_| n + 1))
    }
    fn hash<K: Pod, V: Pod>(map: Map, max: u32) -> Result<u64, MapError> {
        count(HashMap::<_, K, V>::try_from(map)?.keys(), max)
    }
    let entries = match name {
        names::ENROLLED => hash::<u64, u32>(map, max_entries)?,
        names::INBOUND_PODS | names::SERVICE_VIPS => hash::<u32, u32>(map, max_entries)?,
        names::INBOUND_LISTENERS => count(SockHash::<_, u32>::try_from(map)?.keys(), max_entries)?,
        names::AGENT_TUPLES => hash::<TupleKey, u32>(map, max_entries)?,
        names::SERVICE_PORTS | names::PROBE_SOURCES => hash::<VipPort, u32>(map, max_entries)?,
        names::ORIG_BY_COOKIE => hash::<u64, OrigDst>(map, max_entries)?,
        names::ORIG_BY_TUPLE => hash::<TupleKey, OrigDst>(map, max_entries)?,
        names::TCP_STATS => count(
            PerCpuHashMap::<_, u32, TcpStats>::try_from(map)?.keys(),
            max_entries,
        )?,
        _ => {
            return Err(MapError::InvalidName {
                name: name.to_owned(),
            });
        }
    };
    Ok(MapUsage {
        map_type,
        entries,
        max_entries,
    })
}

/// What was installed, and what [`uninstall`] removed of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

/// Removes for good what agents pinned in `pin_dir`: every link (the
/// programs detach from the pod cgroup root and the pods' namespaces) and
/// every map, then the directory if nothing else is in it. Pods then connect
/// outside the mesh. Run it with no agent running: an agent holds its own
/// links too. A stopping agent never does this (it keeps pods fail-closed).
pub fn uninstall(pin_dir: &Path) -> Result<Removed, Error> {
    let pin_err = |source| Error::Pin {
        path: pin_dir.to_owned(),
        source,
    };
    let mut links: Vec<PathBuf> = PINS.iter().map(|p| pin_dir.join(p)).collect();
    match fs::read_dir(pin_dir) {
        Ok(dir) => links.extend(
            dir.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(INBOUND_PIN))
                .map(|e| e.path()),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Removed::default()),
        Err(e) => return Err(pin_err(e)),
    }
    let mut removed = Removed::default();
    for pin in links.iter().filter(|p| p.exists()) {
        release_stale(pin);
        if pin.exists() {
            return Err(pin_err(std::io::Error::other(format!(
                "cannot remove {}",
                pin.display()
            ))));
        }
        removed.links += 1;
    }
    for map in names::PINNED_MAPS {
        match fs::remove_file(pin_dir.join(map)) {
            Ok(()) => removed.maps += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(pin_err(e)),
        }
    }
    // Left in place if it holds anything that is not ours.
    let _ = fs::remove_dir(pin_dir);
    info!(pin_dir = %pin_dir.display(), links = removed.links, maps = removed.maps, "redirect uninstalled");
    Ok(removed)
}

/// The cgroup id the kernel reports for a cgroup v2 directory is its inode.
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// The cgroup v2 level of a directory: 0 for the root of the hierarchy.
pub fn cgroup_level(path: &Path) -> std::io::Result<u32> {
    let root = cgroup2_mount()?;
    let path = fs::canonicalize(path)?;
    let rel = path.strip_prefix(&root).map_err(|_| {
        std::io::Error::other(format!(
            "{} is not under the cgroup v2 mount {}",
            path.display(),
            root.display()
        ))
    })?;
    Ok(rel.components().count() as u32)
}

/// This process's own cgroup v2 directory.
pub fn own_cgroup() -> std::io::Result<PathBuf> {
    let rel = fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .ok_or_else(|| std::io::Error::other("no cgroup v2 entry in /proc/self/cgroup"))?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// Where cgroup v2 is mounted, from /proc/mounts (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> std::io::Result<PathBuf> {
    fs::read_to_string("/proc/mounts")?
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or_else(|| std::io::Error::other("cgroup2 is not mounted"))
}

fn release_stale(pin: &Path) {
    if !pin.exists() {
        return;
    }
    match PinnedLink::from_pin(pin).map(PinnedLink::unpin) {
        Ok(Ok(link)) => {
            drop(link);
            info!(pin = %pin.display(), "released pinned link");
        }
        Ok(Err(e)) => warn!(pin = %pin.display(), error = %e, "cannot unpin link"),
        Err(e) => {
            warn!(pin = %pin.display(), error = %e, "not a link; removing");
            let _ = fs::remove_file(pin);
        }
    }
}

/// Puts `program` into the link pinned at `pin`, if there is one that takes
/// it; a pin that is not a usable link is removed (then attach anew).
fn replace_pinned(pin: &Path, program: BorrowedFd<'_>) -> bool {
    match link::open_pinned(pin) {
        Ok(fd) => match link::update(fd.as_fd(), program) {
            Ok(()) => {
                info!(pin = %pin.display(), "replaced the program of a pinned link in place");
                true
            }
            Err(e) => {
                warn!(pin = %pin.display(), error = %e, "pinned link cannot take the new program; attaching anew");
                release_stale(pin);
                false
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            warn!(pin = %pin.display(), error = %e, "unreadable pin; attaching anew");
            release_stale(pin);
            false
        }
    }
}

fn pin_link(link: FdLink, path: &Path) -> Result<(), Error> {
    // The pin keeps the link; our fd can close.
    link.pin(path).map(drop).map_err(|source| Error::PinLink {
        path: path.to_owned(),
        source,
    })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    prog.try_into()
        .map_err(|source| Error::Program { name, source })
}

fn prog_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> Error {
    move |source| Error::Program { name, source }
}

fn spawn_log_reader(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd for its whole life and
        // always reports that same fd; the AsyncFd owns the logger.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let Ok(mut fd) = registered else {
            return;
        };
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
