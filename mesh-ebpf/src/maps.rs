//! Maps shared by the programs. User space finds them by these names
//! (`mesh_common::names`), so the statics keep SCREAMING_CASE names.
//!
//! The state that must survive an agent restart is pinned by name in the
//! agent's pin directory (`pinned`): enrolment, the STRICT set, the Service
//! addresses, in-flight original destinations and the TCP statistics. A restarted agent's
//! programs reuse those maps, so capture and STRICT hold while it starts.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, SockHash},
};
use mesh_common::{
    AgentConfig, Decision, MAX_ENROLLED, MAX_EXCLUDED_PORTS, MAX_INFLIGHT, MAX_PROBE_SOURCES,
    MAX_SERVICE_PORTS, MAX_SERVICE_VIPS, MAX_TCP_DESTINATIONS, OrigDst, TcpStats, TupleKey,
    VipPort,
};

/// Element 0: the agent's address and ports, written once at start-up.
#[map]
pub static CONFIG: Array<AgentConfig> = Array::with_max_entries(1, 0);

/// cgroup id -> 1 for every enrolled pod.
#[map]
pub static ENROLLED: HashMap<u64, u32> = HashMap::pinned(MAX_ENROLLED, 0);

/// Destination port (host order) -> 1: connects to these are never redirected.
#[map]
pub static EXCLUDED_PORTS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_EXCLUDED_PORTS, 0);

/// Socket cookie -> original destination, from connect4 until sock_ops.
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_INFLIGHT, 0);

/// Redirected connection's 4-tuple -> original destination, until the agent
/// accepts it and removes the entry.
#[map]
pub static ORIG_BY_TUPLE: LruHashMap<TupleKey, OrigDst> = LruHashMap::pinned(MAX_INFLIGHT, 0);

/// Service VIP (network order) -> 1.
#[map]
pub static SERVICE_VIPS: HashMap<u32, u32> = HashMap::pinned(MAX_SERVICE_VIPS, 0);

/// (VIP, port) pairs some Service owns -> 1.
#[map]
pub static SERVICE_PORTS: HashMap<VipPort, u32> = HashMap::pinned(MAX_SERVICE_PORTS, 0);

/// Pod IP (network order) -> `mesh_common::inbound` mode, for this node's
/// workloads: what becomes of a connection into them that their node agent
/// did not open.
#[map]
pub static INBOUND_PODS: HashMap<u32, u32> = HashMap::pinned(MAX_ENROLLED, 0);

/// Pod IP (network order) -> the agent's inbound plaintext listener inside
/// that pod's network namespace. A socket leaves the map when it closes, so
/// a dead agent's pods refuse rather than pass.
#[map]
pub static INBOUND_LISTENERS: SockHash<u32> = SockHash::pinned(MAX_ENROLLED, 0);

/// 4-tuples (agent address and port -> pod address and port) of the
/// connections the agent has open or opening into pods, from its connect
/// until the socket closes.
#[map]
pub static AGENT_TUPLES: LruHashMap<TupleKey, u32> = LruHashMap::pinned(MAX_INFLIGHT, 0);

/// (source address, destination port or 0 for any) -> 1: health-probe
/// sources the operator lets into pods without the agent.
#[map]
pub static PROBE_SOURCES: HashMap<VipPort, u32> = HashMap::pinned(MAX_PROBE_SOURCES, 0);

/// Remote IPv4 address (network order) -> TCP statistics of the agent's
/// connections to it (`agent_ops`). Per CPU, so the programs add without
/// atomics; pinned, so a restarted agent's counters carry on.
#[map]
pub static TCP_STATS: LruPerCpuHashMap<u32, TcpStats> =
    LruPerCpuHashMap::pinned(MAX_TCP_DESTINATIONS, 0);

/// One counter per `Decision`.
#[map]
pub static DECISIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Decision::COUNT, 0);

#[inline(always)]
pub fn count(decision: Decision) {
    if let Some(counter) = DECISIONS.get_ptr_mut(decision as u32) {
        // SAFETY: per-CPU slot, and programs do not migrate CPUs mid-run, so
        // nothing else writes it concurrently.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn config() -> Option<AgentConfig> {
    match CONFIG.get(0) {
        Some(cfg) if cfg.configured != 0 => Some(*cfg),
        _ => None,
    }
}
