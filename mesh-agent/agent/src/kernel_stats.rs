//! The kernel's TCP statistics of the agent's own connections (the
//! `TCP_STATS` map `mesh-ebpf/src/agent_ops.rs` fills, per remote address)
//! as Prometheus metrics per destination, prefix `mesh_agent_kernel_tcp_`.
//!
//! A destination is named, never by its raw address: the Workload's
//! `namespace/name` when the address is a Workload's, the peer node's name
//! when it is a node agent's tunnel address, else `other`. The kernel's
//! totals are brought in at each scrape as differences from the last ones
//! seen for the address, added to the destination its address has now: so
//! the counters only grow, even when an address changes hands or its
//! kernel entry is evicted and starts again. A destination that is no
//! longer a Workload or a Node loses its series.
//!
//! The smoothed RTT at close is exported as a Prometheus histogram
//! (`_bucket{le}`, `_sum`, `_count`), so `histogram_quantile` works per
//! destination: the kernel counts connections in power-of-two buckets
//! (`mesh_common::srtt_bucket`), which become the `le` bounds 64 us to
//! about 2.1 s.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Mutex,
};

use mesh_api::pb::resource::Body;
use mesh_common::{SRTT_BUCKET_MIN_US, SRTT_BUCKETS, TcpStats};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric, counter::Counter, family::Family},
    registry::Registry,
};

use crate::{state::State, telemetry::Direction};

/// The label of an address that is neither a Workload nor a node agent.
pub const OTHER: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    destination: String,
    direction: Direction,
}

/// Names of the addresses the agent connects to, from a configuration.
#[derive(Debug, Default)]
pub struct Destinations {
    by_ip: HashMap<Ipv4Addr, String>,
}

impl Destinations {
    /// Workloads by address (`namespace/name`) and node agents by their
    /// Node's tunnel address (the node's name); a Workload wins a tie.
    pub fn of(state: &State) -> Destinations {
        let mut by_ip: HashMap<Ipv4Addr, String> = state
            .resources
            .values()
            .filter_map(|r| match &r.body {
                Some(Body::Node(n)) => {
                    let addr: SocketAddrV4 = n.tunnel_address.parse().ok()?;
                    Some((*addr.ip(), n.name.clone()))
                }
                _ => None,
            })
            .collect();
        for w in state.workloads() {
            by_ip.insert(w.ip, format!("{}/{}", w.namespace, w.name));
        }
        Destinations { by_ip }
    }

    pub fn label(&self, ip: Ipv4Addr) -> &str {
        self.by_ip.get(&ip).map_or(OTHER, String::as_str)
    }

    /// Every label an address can have now.
    fn labels(&self) -> BTreeSet<&str> {
        self.by_ip
            .values()
            .map(String::as_str)
            .chain([OTHER])
            .collect()
    }
}

/// What the kernel counted for an address since `prev` (its totals when
/// last seen). Totals below `prev` mean the entry was evicted and made
/// anew: then all of `now` is new.
pub fn since(prev: Option<&TcpStats>, now: &TcpStats) -> TcpStats {
    let Some(prev) = prev else { return *now };
    let fields = |s: &TcpStats| {
        let mut v = vec![
            s.established,
            s.closed,
            s.failed,
            s.retransmits,
            s.bytes_acked,
            s.bytes_received,
            s.srtt_sum_us,
        ];
        v.extend(s.srtt_buckets);
        v
    };
    let (p, n) = (fields(prev), fields(now));
    if n.iter().zip(&p).any(|(n, p)| n < p) {
        return *now;
    }
    let d: Vec<u64> = n.iter().zip(&p).map(|(n, p)| n - p).collect();
    let mut out = TcpStats {
        established: d[0],
        closed: d[1],
        failed: d[2],
        retransmits: d[3],
        bytes_acked: d[4],
        bytes_received: d[5],
        srtt_sum_us: d[6],
        srtt_buckets: [0; SRTT_BUCKETS + 1],
    };
    out.srtt_buckets.copy_from_slice(&d[7..]);
    out
}

/// The growth of each destination since the `seen` totals, from a kernel
/// snapshot; `seen` becomes the snapshot (addresses gone from the kernel
/// are forgotten).
pub fn aggregate(
    seen: &mut HashMap<Ipv4Addr, TcpStats>,
    snapshot: &[(Ipv4Addr, TcpStats)],
    destinations: &Destinations,
) -> BTreeMap<String, TcpStats> {
    let mut out: BTreeMap<String, TcpStats> = BTreeMap::new();
    for (ip, now) in snapshot {
        let grown = since(seen.get(ip), now);
        if grown != TcpStats::default() {
            out.entry(destinations.label(*ip).to_owned())
                .or_default()
                .add(&grown);
        }
    }
    *seen = snapshot.iter().copied().collect();
    out
}

/// Upper bounds of the histogram's finite buckets, seconds.
fn bucket_bounds() -> [f64; SRTT_BUCKETS] {
    std::array::from_fn(|i| f64::from(SRTT_BUCKET_MIN_US << i) / 1e6)
}

/// A histogram whose buckets the kernel filled: bucket counts and the sum
/// are added, never observed one by one.
#[derive(Debug, Default)]
pub struct KernelHistogram(Mutex<(u64, [u64; SRTT_BUCKETS + 1])>);

impl KernelHistogram {
    fn add(&self, sum_us: u64, buckets: &[u64; SRTT_BUCKETS + 1]) {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        h.0 += sum_us;
        for (t, n) in h.1.iter_mut().zip(buckets) {
            *t += n;
        }
    }
}

impl TypedMetric for KernelHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for KernelHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum_us, counts) = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Per bucket, not cumulative: the encoder adds them up.
        let buckets: Vec<(f64, u64)> = bucket_bounds()
            .into_iter()
            .chain([f64::INFINITY])
            .zip(counts)
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            sum_us as f64 / 1e6,
            counts.iter().sum(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The metrics, and the kernel totals last seen per address.
#[derive(Debug, Default)]
pub struct KernelStats {
    established: Family<DestinationLabels, Counter>,
    closed: Family<DestinationLabels, Counter>,
    failed: Family<DestinationLabels, Counter>,
    retransmits: Family<DestinationLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    srtt: Family<DestinationLabels, KernelHistogram>,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    totals: HashMap<Ipv4Addr, TcpStats>,
    /// Destinations that have series.
    labels: BTreeSet<String>,
}

impl KernelStats {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("mesh_agent");
        r.register(
            "kernel_tcp_connections_established",
            "The agent's connects that reached ESTABLISHED, by destination (Workload namespace/name, peer node, or other), as the kernel saw them",
            self.established.clone(),
        );
        r.register(
            "kernel_tcp_connections_closed",
            "The agent's connections that closed, from any state, by destination",
            self.closed.clone(),
        );
        r.register(
            "kernel_tcp_connect_failures",
            "The agent's connections that closed before they were established (refused, reset, timed out), by destination",
            self.failed.clone(),
        );
        r.register(
            "kernel_tcp_retransmits",
            "Segments the kernel retransmitted on the agent's connections, counted at close, by destination",
            self.retransmits.clone(),
        );
        r.register(
            "kernel_tcp_bytes",
            "Bytes of the agent's connections at close, by destination: sent (acknowledged by the remote) and received",
            self.bytes.clone(),
        );
        r.register(
            "kernel_tcp_srtt_seconds",
            "Smoothed round-trip time of the agent's established connections at close, by destination",
            self.srtt.clone(),
        );
    }

    /// Adds what the kernel counted since the last call (`snapshot`: its
    /// totals per address) to the destinations `destinations` names.
    pub fn sync(&self, snapshot: &[(Ipv4Addr, TcpStats)], destinations: &Destinations) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let grown = aggregate(&mut seen.totals, snapshot, destinations);
        for (destination, g) in grown {
            let labels = DestinationLabels {
                destination: destination.clone(),
            };
            self.established
                .get_or_create(&labels)
                .inc_by(g.established);
            self.closed.get_or_create(&labels).inc_by(g.closed);
            self.failed.get_or_create(&labels).inc_by(g.failed);
            self.retransmits
                .get_or_create(&labels)
                .inc_by(g.retransmits);
            for (direction, n) in [
                (Direction::Sent, g.bytes_acked),
                (Direction::Received, g.bytes_received),
            ] {
                self.bytes
                    .get_or_create(&BytesLabels {
                        destination: destination.clone(),
                        direction,
                    })
                    .inc_by(n);
            }
            self.srtt
                .get_or_create(&labels)
                .add(g.srtt_sum_us, &g.srtt_buckets);
            seen.labels.insert(destination);
        }
        let current = destinations.labels();
        let gone: Vec<String> = seen
            .labels
            .iter()
            .filter(|l| !current.contains(l.as_str()))
            .cloned()
            .collect();
        for destination in gone {
            let labels = DestinationLabels { destination };
            for family in [
                &self.established,
                &self.closed,
                &self.failed,
                &self.retransmits,
            ] {
                family.remove(&labels);
            }
            self.srtt.remove(&labels);
            for direction in [Direction::Sent, Direction::Received] {
                self.bytes.remove(&BytesLabels {
                    destination: labels.destination.clone(),
                    direction,
                });
            }
            seen.labels.remove(&labels.destination);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{State, testing};
    use mesh_api::kinds::MtlsMode;

    fn state() -> State {
        testing::state(
            "node1",
            vec![
                testing::workload("web", "node1", "198.19.1.10", MtlsMode::Strict),
                testing::workload("db", "node2", "198.19.2.10", MtlsMode::Strict),
                testing::node("node2", "198.18.0.12:15008"),
            ],
        )
    }

    fn closed(n: u64, srtt_us: u32) -> TcpStats {
        let mut s = TcpStats {
            established: n,
            closed: n,
            retransmits: 2 * n,
            bytes_acked: 100 * n,
            bytes_received: 10 * n,
            srtt_sum_us: u64::from(srtt_us) * n,
            ..TcpStats::default()
        };
        s.srtt_buckets[mesh_common::srtt_bucket(srtt_us)] = n;
        s
    }

    #[test]
    fn addresses_are_named_by_workload_or_node_and_never_by_ip() {
        let d = Destinations::of(&state());
        assert_eq!(d.label("198.19.1.10".parse().unwrap()), "default/web");
        assert_eq!(d.label("198.19.2.10".parse().unwrap()), "default/db");
        assert_eq!(d.label("198.18.0.12".parse().unwrap()), "node2");
        assert_eq!(d.label("198.18.0.99".parse().unwrap()), OTHER);
        assert_eq!(
            d.labels(),
            ["default/db", "default/web", "node2", "other"].into()
        );
    }

    #[test]
    fn growth_is_per_destination_and_survives_eviction() {
        let d = Destinations::of(&state());
        let web: Ipv4Addr = "198.19.1.10".parse().unwrap();
        let node2: Ipv4Addr = "198.18.0.12".parse().unwrap();
        let (x, y): (Ipv4Addr, Ipv4Addr) =
            ("198.18.7.1".parse().unwrap(), "198.18.7.2".parse().unwrap());
        let mut seen = HashMap::new();
        let first = aggregate(
            &mut seen,
            &[
                (web, closed(3, 50)),
                (node2, closed(1, 300)),
                (x, closed(1, 10)),
                (y, closed(2, 10)),
            ],
            &d,
        );
        assert_eq!(first["default/web"], closed(3, 50));
        assert_eq!(first["node2"], closed(1, 300));
        // Two unnamed addresses add up under one label.
        assert_eq!(first[OTHER], closed(3, 10));

        // web grows by 2; node2 is evicted and comes back smaller; x and
        // y unchanged, so nothing to report for them.
        let second = aggregate(
            &mut seen,
            &[
                (web, closed(5, 50)),
                (node2, closed(1, 700)),
                (x, closed(1, 10)),
                (y, closed(2, 10)),
            ],
            &d,
        );
        assert_eq!(second["default/web"], closed(2, 50));
        assert_eq!(second["node2"], closed(1, 700));
        assert!(!second.contains_key(OTHER), "{second:?}");
        assert_eq!(seen.len(), 4);
        assert!(aggregate(&mut seen, &[], &d).is_empty());
        assert!(seen.is_empty(), "addresses the kernel forgot are forgotten");
    }

    fn scrape(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn exported_as_counters_and_a_histogram_and_gone_destinations_lose_their_series() {
        let stats = KernelStats::default();
        let mut registry = Registry::default();
        stats.register(&mut registry);
        let web: Ipv4Addr = "198.19.1.10".parse().unwrap();
        let mut one = closed(2, 100);
        one.failed = 1;
        one.closed += 1;
        stats.sync(&[(web, one)], &Destinations::of(&state()));
        let text = scrape(&registry);
        for line in [
            "mesh_agent_kernel_tcp_connections_established_total{destination=\"default/web\"} 2",
            "mesh_agent_kernel_tcp_connections_closed_total{destination=\"default/web\"} 3",
            "mesh_agent_kernel_tcp_connect_failures_total{destination=\"default/web\"} 1",
            "mesh_agent_kernel_tcp_retransmits_total{destination=\"default/web\"} 4",
            "mesh_agent_kernel_tcp_bytes_total{destination=\"default/web\",direction=\"sent\"} 200",
            "mesh_agent_kernel_tcp_bytes_total{destination=\"default/web\",direction=\"received\"} 20",
            "mesh_agent_kernel_tcp_srtt_seconds_count{destination=\"default/web\"} 2",
            "mesh_agent_kernel_tcp_srtt_seconds_sum{destination=\"default/web\"} 0.0002",
            "mesh_agent_kernel_tcp_srtt_seconds_bucket{le=\"0.000064\",destination=\"default/web\"} 0",
            "mesh_agent_kernel_tcp_srtt_seconds_bucket{le=\"0.000128\",destination=\"default/web\"} 2",
            "mesh_agent_kernel_tcp_srtt_seconds_bucket{le=\"+Inf\",destination=\"default/web\"} 2",
        ] {
            assert!(text.contains(line), "no {line} in\n{text}");
        }
        assert!(!text.contains("198.19"), "a raw address leaked:\n{text}");

        // The Workload leaves: its series go.
        let empty = testing::state("node1", vec![]);
        stats.sync(&[(web, one)], &Destinations::of(&empty));
        let text = scrape(&registry);
        assert!(!text.contains("default/web"), "{text}");
    }
}
