//! Types shared by the kernel programs and user space.
//!
//! Everything here crosses the kernel boundary: `#[repr(C)]`, no padding,
//! no `bool` (a `u32` flag instead). Map names are constants so that the
//! kernel side and the agent can never disagree on them.
#![no_std]

/// Map and program names, shared so user space finds them by the same name.
pub mod names {
    pub const ENROLLED: &str = "ENROLLED";
    pub const CONFIG: &str = "CONFIG";
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    pub const DECISIONS: &str = "DECISIONS";
    pub const SERVICE_VIPS: &str = "SERVICE_VIPS";
    pub const SERVICE_PORTS: &str = "SERVICE_PORTS";
    pub const PROG_CONNECT4: &str = "mesh_connect4";
    pub const PROG_CONNECT6: &str = "mesh_connect6";
    pub const PROG_SOCK_OPS: &str = "mesh_sock_ops";
    pub const PROG_STRICT_INGRESS: &str = "mesh_strict";
    pub const PROG_INBOUND: &str = "mesh_inbound";
    pub const PROG_AGENT_SOCK_OPS: &str = "mesh_agent_sock_ops";
    pub const INBOUND_PODS: &str = "INBOUND_PODS";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const AGENT_TUPLES: &str = "AGENT_TUPLES";
    pub const PROBE_SOURCES: &str = "PROBE_SOURCES";
    pub const TCP_STATS: &str = "TCP_STATS";
    /// Maps pinned by name in the agent's pin directory, so that they
    /// outlive an agent (see `mesh-ebpf/src/maps.rs`).
    pub const PINNED_MAPS: [&str; 10] = [
        ENROLLED,
        INBOUND_PODS,
        INBOUND_LISTENERS,
        AGENT_TUPLES,
        SERVICE_VIPS,
        SERVICE_PORTS,
        ORIG_BY_COOKIE,
        ORIG_BY_TUPLE,
        PROBE_SOURCES,
        TCP_STATS,
    ];
}

/// Capacity of the per-connection maps. LRU, so a flood of connections that
/// never reach the agent cannot pin kernel memory.
pub const MAX_INFLIGHT: u32 = 65536;
pub const MAX_ENROLLED: u32 = 4096;
pub const MAX_EXCLUDED_PORTS: u32 = 256;
/// Service virtual IPs, and (VIP, port) pairs, the kernel knows about.
pub const MAX_SERVICE_VIPS: u32 = 65536;
pub const MAX_SERVICE_PORTS: u32 = 131072;
/// Health-probe sources (`--allow-probes-from`) the kernel lets into pods.
pub const MAX_PROBE_SOURCES: u32 = 64;

/// Remote addresses the kernel keeps TCP statistics of (`TCP_STATS`, LRU:
/// the least recently used destination makes room for a new one).
pub const MAX_TCP_DESTINATIONS: u32 = 4096;

/// `INBOUND_PODS` values: what the kernel does with a connection into a
/// local pod that did not come from its node agent.
pub mod inbound {
    /// Refused with a reset (the SYN is answered with RST).
    pub const STRICT: u32 = 1;
    /// Sent to the agent's inbound plaintext listener, which judges it.
    pub const JUDGE: u32 = 2;
}

/// Why the kernel did (or did not) redirect a connection. Index into the
/// `DECISIONS` per-CPU array, so an operator can ask the kernel why.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Enrolled pod, TCP, not excluded: sent to the agent.
    Redirected = 0,
    /// The connecting socket's cgroup is not enrolled.
    NotEnrolled = 1,
    /// The destination port is on the exclusion list.
    ExcludedPort = 2,
    /// Destination is loopback: traffic inside the pod itself.
    Loopback = 3,
    /// Destination is the agent itself (its listeners); never loop.
    AgentDestination = 4,
    /// Not a TCP socket.
    NotTcp = 5,
    /// The socket belongs to the agent's own cgroup.
    AgentSocket = 6,
    /// The agent has not configured the program yet.
    NotConfigured = 7,
    /// sock_ops: the redirected connection's 4-tuple was recorded.
    TupleRecorded = 8,
    /// sock_ops: a connect to the agent with no record of its original destination.
    TupleMissingOrig = 9,
    /// connect4: the original-destination map was full or refused the update.
    MapUpdateFailed = 10,
    /// connect4: a Service VIP on a port no Service owns; sent to the refusal
    /// port so the client gets "connection refused".
    NoServicePort = 11,
    /// sk_lookup: a plaintext connection into a STRICT pod that did not come
    /// from its node agent; refused (the client gets a reset).
    StrictRefused = 12,
    /// Native IPv6 (not IPv4-mapped): the mesh carries IPv4 only, so an
    /// enrolled pod's connect fails (EPERM) and an inbound SYN into a pod
    /// is dropped, rather than passing unmediated.
    Ipv6Refused = 13,
    /// sk_lookup: a connection into a pod that did not come from its node
    /// agent, sent to the agent's inbound plaintext listener to be judged.
    InboundRedirected = 14,
    /// sk_lookup: as above, but the agent has no listener for the pod (it
    /// is down or restarting): refused, never let through.
    InboundNoListener = 15,
    /// sk_lookup: a connection into an enrolled pod's namespace for an
    /// address the agent has no workload for: refused.
    InboundUnknownPod = 16,
    /// sk_lookup: a connection the node agent opened into a pod; passed.
    InboundFromAgent = 17,
    /// sk_lookup: a health probe from a source the operator allowed
    /// (`--allow-probes-from`); passed.
    ProbeAllowed = 18,
    /// sock_ops on the agent's cgroup: the agent's connect into a pod was
    /// recorded, so that the pod's sk_lookup lets it in.
    AgentTupleRecorded = 19,
}

impl Decision {
    pub const COUNT: u32 = 20;
    pub const ALL: [Decision; Decision::COUNT as usize] = [
        Decision::Redirected,
        Decision::NotEnrolled,
        Decision::ExcludedPort,
        Decision::Loopback,
        Decision::AgentDestination,
        Decision::NotTcp,
        Decision::AgentSocket,
        Decision::NotConfigured,
        Decision::TupleRecorded,
        Decision::TupleMissingOrig,
        Decision::MapUpdateFailed,
        Decision::NoServicePort,
        Decision::StrictRefused,
        Decision::Ipv6Refused,
        Decision::InboundRedirected,
        Decision::InboundNoListener,
        Decision::InboundUnknownPod,
        Decision::InboundFromAgent,
        Decision::ProbeAllowed,
        Decision::AgentTupleRecorded,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Decision::Redirected => "redirected",
            Decision::NotEnrolled => "not_enrolled",
            Decision::ExcludedPort => "excluded_port",
            Decision::Loopback => "loopback",
            Decision::AgentDestination => "agent_destination",
            Decision::NotTcp => "not_tcp",
            Decision::AgentSocket => "agent_socket",
            Decision::NotConfigured => "not_configured",
            Decision::TupleRecorded => "tuple_recorded",
            Decision::TupleMissingOrig => "tuple_missing_orig",
            Decision::MapUpdateFailed => "map_update_failed",
            Decision::NoServicePort => "no_service_port",
            Decision::StrictRefused => "strict_refused",
            Decision::Ipv6Refused => "ipv6_refused",
            Decision::InboundRedirected => "inbound_redirected",
            Decision::InboundNoListener => "inbound_no_listener",
            Decision::InboundUnknownPod => "inbound_unknown_pod",
            Decision::InboundFromAgent => "inbound_from_agent",
            Decision::ProbeAllowed => "probe_allowed",
            Decision::AgentTupleRecorded => "agent_tuple_recorded",
        }
    }
}

/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`),
/// as it lies in memory (network order).
pub const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4 address (network order) an IPv6 address (four network-order
/// words, as the kernel hands them) maps, if it is IPv4-mapped.
#[inline(always)]
pub const fn v4_mapped(ip6: [u32; 4]) -> Option<u32> {
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_PREFIX {
        Some(ip6[3])
    } else {
        None
    }
}

/// Whether an IPv6 address (as above) is `::1`.
#[inline(always)]
pub const fn is_v6_loopback(ip6: [u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == u32::from_ne_bytes([0, 0, 0, 1])
}

/// Agent settings the kernel programs need; element 0 of the `CONFIG` array.
/// Addresses and ports are in network byte order, as the kernel hands them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// Address pods reach the agent on (their gateway), network order.
    pub agent_ip4: u32,
    /// Outbound listener port (15001), network order in the low 16 bits.
    pub outbound_port: u32,
    /// cgroup id of the agent's own cgroup: its sockets are never redirected.
    pub agent_cgroup_id: u64,
    /// 1 once the agent has written this entry.
    pub configured: u32,
    /// Port on the agent address where nothing listens: connects to a VIP
    /// port no Service owns go here and are refused. Network order, low 16 bits.
    pub refusal_port: u32,
    /// cgroup v2 level of the node's pod cgroup root (the root cgroup is 0):
    /// pods are its descendants, so a process is enrolled when one of its
    /// ancestors below this level is.
    pub pod_root_level: u32,
    /// How many levels below the root an enrolled pod cgroup may be (a
    /// bound the verifier needs).
    pub max_pod_depth: u32,
}

/// Most cgroup levels below the pod root searched for an enrolled ancestor.
pub const MAX_POD_DEPTH: u32 = 8;

/// A Service (VIP, port) pair the agent serves. Address network order, port
/// host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipPort {
    pub ip4: u32,
    pub port: u32,
}

/// Original destination recorded by `connect4`, keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Original destination address, network order.
    pub ip4: u32,
    /// Original destination port, network order in the low 16 bits.
    pub port: u32,
    /// cgroup id of the connecting socket's process.
    pub cgroup_id: u64,
}

/// The 4-tuple of a redirected connection as the agent sees it on accept.
/// Addresses network order; ports host order, so user space can build it from
/// a `SocketAddrV4` directly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub src_ip4: u32,
    pub dst_ip4: u32,
    pub src_port: u32,
    pub dst_port: u32,
}

/// Finite buckets of [`TcpStats::srtt_buckets`]: bucket `i` holds the
/// connections whose smoothed RTT at close was at most `64 us << i` (64 us
/// to about 2.1 s); the last slot holds the longer ones.
pub const SRTT_BUCKETS: usize = 16;
/// The upper bound of bucket 0, in microseconds (`64 << i` for bucket `i`).
pub const SRTT_BUCKET_MIN_US: u32 = 64;

/// The bucket of [`TcpStats::srtt_buckets`] a smoothed RTT (microseconds)
/// falls in: the bit length of `(srtt - 1) / 64`, capped at the overflow
/// slot. Written as a fixed ladder, as the verifier wants no loops.
#[inline(always)]
pub const fn srtt_bucket(srtt_us: u32) -> usize {
    let mut x = srtt_us.saturating_sub(1) >> 6;
    let mut bits = 0;
    if x >= 1 << 16 {
        x >>= 16;
        bits += 16;
    }
    if x >= 1 << 8 {
        x >>= 8;
        bits += 8;
    }
    if x >= 1 << 4 {
        x >>= 4;
        bits += 4;
    }
    if x >= 1 << 2 {
        x >>= 2;
        bits += 2;
    }
    if x >= 1 << 1 {
        x >>= 1;
        bits += 1;
    }
    bits += x as usize;
    if bits > SRTT_BUCKETS {
        SRTT_BUCKETS
    } else {
        bits
    }
}

/// TCP statistics of the agent's own connections to one remote IPv4
/// address, summed by the kernel (`TCP_STATS`, per CPU: user space adds
/// the CPUs up). Everything only grows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Connects that reached ESTABLISHED.
    pub established: u64,
    /// Connections that closed, from any state.
    pub closed: u64,
    /// Of those, the ones that closed before they were established
    /// (refused, reset or timed out in SYN_SENT).
    pub failed: u64,
    /// Segments retransmitted (`tcp_sock.total_retrans` at close).
    pub retransmits: u64,
    /// Bytes the remote acknowledged (sent) and bytes received, at close.
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// Sum of the smoothed RTT at close of the connections in the buckets,
    /// microseconds.
    pub srtt_sum_us: u64,
    /// Connections by smoothed RTT at close (see [`srtt_bucket`]); an
    /// established connection is counted in exactly one.
    pub srtt_buckets: [u64; SRTT_BUCKETS + 1],
}

impl TcpStats {
    /// Adds `more` field by field (CPUs' shares into one total, or a growth
    /// into a running total).
    pub fn add(&mut self, more: &TcpStats) {
        self.established += more.established;
        self.closed += more.closed;
        self.failed += more.failed;
        self.retransmits += more.retransmits;
        self.bytes_acked += more.bytes_acked;
        self.bytes_received += more.bytes_received;
        self.srtt_sum_us += more.srtt_sum_us;
        for (t, m) in self.srtt_buckets.iter_mut().zip(more.srtt_buckets) {
            *t += m;
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, #[repr(C)], no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::AgentConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TupleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipPort {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TcpStats {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// An address as the kernel hands it: four words in network order.
    fn words(ip: Ipv6Addr) -> [u32; 4] {
        let o = ip.octets();
        core::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        })
    }

    #[test]
    fn v4_mapped_addresses_yield_their_ipv4_in_network_order() {
        for v4 in [
            Ipv4Addr::new(198, 19, 2, 12),
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::UNSPECIFIED,
        ] {
            let got = v4_mapped(words(v4.to_ipv6_mapped())).expect("mapped");
            assert_eq!(got, u32::from_ne_bytes(v4.octets()), "{v4}");
        }
        for not in [
            Ipv6Addr::LOCALHOST,
            "fd00::1".parse().unwrap(),
            "::198.19.2.12".parse().unwrap(),
            "64:ff9b::c613:20c".parse().unwrap(),
            "::fffe:c613:20c".parse().unwrap(),
        ] {
            assert_eq!(v4_mapped(words(not)), None, "{not}");
        }
        assert!(is_v6_loopback(words(Ipv6Addr::LOCALHOST)));
        assert!(!is_v6_loopback(words(Ipv6Addr::UNSPECIFIED)));
        assert!(!is_v6_loopback(words(Ipv4Addr::LOCALHOST.to_ipv6_mapped())));
    }

    #[test]
    fn srtt_buckets_hold_what_their_upper_bound_says() {
        let bound = |i: usize| u64::from(SRTT_BUCKET_MIN_US) << i;
        for srtt in (0..70_000).chain([2_097_151, 2_097_152, 2_097_153, u32::MAX]) {
            let b = srtt_bucket(srtt);
            assert!(b <= SRTT_BUCKETS, "{srtt}");
            if b < SRTT_BUCKETS {
                assert!(u64::from(srtt) <= bound(b), "{srtt} us in bucket {b}");
            }
            if b > 0 {
                assert!(u64::from(srtt) > bound(b - 1), "{srtt} us in bucket {b}");
            }
        }
        assert_eq!(srtt_bucket(64), 0);
        assert_eq!(srtt_bucket(65), 1);
        assert_eq!(srtt_bucket(128), 1);
        assert_eq!(srtt_bucket(129), 2);
        assert_eq!(srtt_bucket(u32::MAX), SRTT_BUCKETS);
    }
}
