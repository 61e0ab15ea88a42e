//! The node-wide state behind the policies: one [`ServiceRuntime`] per
//! Service port (its in-flight gauges and rate limiters) and one
//! [`EndpointStats`] per endpoint (latency estimate, outstanding requests,
//! ejection state), shared by every caller on the node. The [`Registry`]
//! keeps them across configuration changes: each new state attaches to the
//! runtimes of its Services, and those of Services gone are dropped.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddrV4,
    sync::{
        Arc, LazyLock, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    Lb, Policy,
    balance::{self, PeakEwma},
    budget::Gauge,
    outlier,
    ratelimit::{self, Limiter},
    retry::Try,
    ring::Ring,
};

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds of the agent's monotonic clock.
pub fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
pub struct EndpointStats {
    pub addr: SocketAddrV4,
    latency: Mutex<PeakEwma>,
    /// Requests to it in flight, from every caller on the node.
    pub outstanding: Arc<Gauge>,
    outlier: Mutex<outlier::State>,
}

impl EndpointStats {
    fn new(addr: SocketAddrV4) -> EndpointStats {
        EndpointStats {
            addr,
            latency: Mutex::new(PeakEwma::new(now_ns())),
            outstanding: Arc::default(),
            outlier: Mutex::default(),
        }
    }

    pub fn cost(&self, now: u64) -> f64 {
        balance::cost(lock(&self.latency).estimate(now), self.outstanding.get())
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        lock(&self.outlier).is_ejected(now)
    }

    pub fn latency_estimate(&self) -> Duration {
        Duration::from_nanos(lock(&self.latency).estimate(now_ns()) as u64)
    }
}

/// A rate limiter with the configuration it was made for.
type Bucket = Mutex<Option<(ratelimit::Config, Arc<Limiter>)>>;

#[derive(Debug, Default)]
pub struct ServiceRuntime {
    pub active_requests: Arc<Gauge>,
    pub pending_requests: Arc<Gauge>,
    pub active_retries: Arc<Gauge>,
    pub connections: Arc<Gauge>,
    rr: AtomicUsize,
    endpoints: Mutex<HashMap<SocketAddrV4, Arc<EndpointStats>>>,
    inbound: Bucket,
    outbound: Bucket,
}

impl ServiceRuntime {
    fn limiter(bucket: &Bucket, cfg: Option<&ratelimit::Config>) -> Option<Arc<Limiter>> {
        let mut b = lock(bucket);
        match (cfg, &*b) {
            (None, _) => {
                *b = None;
                None
            }
            (Some(c), Some((old, l))) if old == c => Some(l.clone()),
            (Some(c), _) => {
                let l = Arc::new(Limiter::new(c));
                *b = Some((*c, l.clone()));
                Some(l)
            }
        }
    }
}

/// What a Backend of one state holds of the runtime.
#[derive(Debug, Default)]
pub struct Attached {
    pub runtime: Arc<ServiceRuntime>,
    /// Index-aligned with the Backend's endpoints.
    pub stats: Vec<Arc<EndpointStats>>,
    pub ring: Option<Ring>,
    pub inbound_limit: Option<Arc<Limiter>>,
    pub outbound_limit: Option<Arc<Limiter>>,
}

#[derive(Debug, Default)]
pub struct Registry {
    services: Mutex<HashMap<(String, u16), Arc<ServiceRuntime>>>,
}

impl Registry {
    /// The runtime of Service port (`service`, `port`) for a new state,
    /// with stats for `endpoints` (kept from earlier states for addresses
    /// seen before).
    pub fn attach(
        &self,
        service: &str,
        port: u16,
        endpoints: &[SocketAddrV4],
        policy: &Policy,
    ) -> Attached {
        let runtime = lock(&self.services)
            .entry((service.to_owned(), port))
            .or_default()
            .clone();
        let stats = {
            let mut map = lock(&runtime.endpoints);
            map.retain(|addr, _| endpoints.contains(addr));
            endpoints
                .iter()
                .map(|a| {
                    map.entry(*a)
                        .or_insert_with(|| Arc::new(EndpointStats::new(*a)))
                        .clone()
                })
                .collect()
        };
        let ring = match &policy.lb {
            Lb::Hash { virtual_nodes, .. } => {
                let names: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
                Some(Ring::new(names.iter().map(String::as_str), *virtual_nodes))
            }
            _ => None,
        };
        Attached {
            inbound_limit: ServiceRuntime::limiter(&runtime.inbound, policy.rate_inbound.as_ref()),
            outbound_limit: ServiceRuntime::limiter(
                &runtime.outbound,
                policy.rate_outbound.as_ref(),
            ),
            runtime,
            stats,
            ring,
        }
    }

    /// Drops the runtimes of Service ports not in `live`.
    pub fn retain(&self, live: &HashSet<(String, u16)>) {
        lock(&self.services).retain(|k, _| live.contains(k));
    }
}

/// What an endpoint pick needs to know about one candidate.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub ready: bool,
    pub local: bool,
}

/// Picks an endpoint among `candidates` (index-aligned with `attached.stats`)
/// by `policy`: ready ones, not ejected, not `tried` already, on this node if
/// the policy prefers it and one is there. When every ready endpoint was
/// tried or is ejected, those are allowed again (a retry may go back; all
/// ejected is treated as none ejected, as Envoy's panic threshold does).
pub fn pick(
    policy: &Policy,
    attached: &Attached,
    candidates: &[Candidate],
    hash: Option<u64>,
    tried: &[usize],
) -> Option<usize> {
    let now = now_ns();
    let stats = &attached.stats;
    // One pass per fallback, into one buffer: ready, healthy and untried;
    // else ready and untried (all ejected); else ready and healthy (all
    // tried); else ready.
    let mut set: Vec<usize> = Vec::with_capacity(candidates.len());
    for (healthy_only, untried_only) in [(true, true), (false, true), (true, false), (false, false)]
    {
        set.extend((0..candidates.len()).filter(|i| {
            candidates[*i].ready
                && (!untried_only || !tried.contains(i))
                && (!healthy_only || !stats[*i].is_ejected(now))
        }));
        if !set.is_empty() {
            break;
        }
    }
    if set.is_empty() {
        return None;
    }
    if policy.prefer_same_node && set.iter().any(|i| candidates[*i].local) {
        set.retain(|i| candidates[*i].local);
    }
    match (&policy.lb, &attached.ring, hash) {
        (Lb::Hash { .. }, Some(ring), Some(h)) => ring.pick(h, |i| set.contains(&i)),
        (Lb::RoundRobin, ..) => {
            let n = attached.runtime.rr.fetch_add(1, Ordering::Relaxed);
            Some(set[n % set.len()])
        }
        (Lb::Random, ..) => Some(set[rand::random_range(0..set.len())]),
        _ => balance::p2c(
            set.len(),
            rand::random::<u32>() as usize,
            rand::random::<u32>() as usize,
            |k| stats[set[k]].cost(now),
        )
        .map(|k| set[k]),
    }
}

/// What happened to one try, for the balancer and the outlier detector.
/// Returns an ejection if this try caused one.
pub fn record(
    policy: &Policy,
    attached: &Attached,
    index: usize,
    outcome: Try,
    elapsed: Duration,
) -> Option<outlier::Event> {
    let now = now_ns();
    let stats = &attached.stats[index];
    lock(&stats.latency).observe(now, elapsed.as_nanos() as f64);
    let cfg = policy.outlier.as_ref()?;
    let o = outcome.outlier();
    let may_eject = o != outlier::Outcome::Success && {
        let ejected = attached
            .stats
            .iter()
            .filter(|s| !Arc::ptr_eq(s, stats) && s.is_ejected(now))
            .count();
        outlier::may_eject(ejected, attached.stats.len(), cfg.max_ejection_percent)
    };
    lock(&stats.outlier).record(cfg, o, now, may_eject)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddrV4 {
        SocketAddrV4::new([198, 18, 0, i].into(), 80)
    }

    fn ready(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                ready: true,
                local: i == 0,
            })
            .collect()
    }

    #[test]
    fn stats_survive_a_new_state_and_go_with_their_endpoint() {
        let reg = Registry::default();
        let p = Policy::default_for("d/e");
        let a = reg.attach("d/e", 80, &[addr(1), addr(2)], &p);
        let b = reg.attach("d/e", 80, &[addr(2), addr(3)], &p);
        assert!(Arc::ptr_eq(&a.runtime, &b.runtime));
        assert!(Arc::ptr_eq(&a.stats[1], &b.stats[0]));
        assert_eq!(lock(&b.runtime.endpoints).len(), 2);
        reg.retain(&HashSet::new());
        let c = reg.attach("d/e", 80, &[addr(2)], &p);
        assert!(!Arc::ptr_eq(&a.runtime, &c.runtime));
    }

    #[test]
    fn the_balancer_learns_the_slow_endpoint_from_any_caller() {
        let reg = Registry::default();
        let p = Policy::default_for("d/e");
        let at = reg.attach("d/e", 80, &[addr(1), addr(2), addr(3)], &p);
        let ok = Try::Answered {
            status: 200,
            grpc: None,
        };
        record(&p, &at, 0, ok, Duration::from_millis(100));
        record(&p, &at, 1, ok, Duration::from_millis(10));
        record(&p, &at, 2, ok, Duration::from_millis(10));
        // Another caller's pick (same runtime) avoids it.
        let again = reg.attach("d/e", 80, &[addr(1), addr(2), addr(3)], &p);
        let c = ready(3);
        let slow = (0..300)
            .filter(|_| pick(&p, &again, &c, None, &[]) == Some(0))
            .count();
        assert_eq!(slow, 0);
    }

    #[test]
    fn retries_go_elsewhere_and_ejected_endpoints_are_skipped() {
        let reg = Registry::default();
        let mut p = Policy::default_for("d/e");
        p.outlier = Some(outlier::Config {
            consecutive_5xx: 2,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(60),
            max_ejection_percent: 50,
            interval: Duration::from_secs(10),
        });
        let at = reg.attach("d/e", 80, &[addr(1), addr(2)], &p);
        let c = ready(2);
        for _ in 0..50 {
            let first = pick(&p, &at, &c, None, &[]).unwrap();
            assert_ne!(pick(&p, &at, &c, None, &[first]), Some(first));
        }
        let bad = Try::Answered {
            status: 500,
            grpc: None,
        };
        assert_eq!(record(&p, &at, 1, bad, Duration::ZERO), None);
        assert!(record(&p, &at, 1, bad, Duration::ZERO).is_some());
        assert!((0..100).all(|_| pick(&p, &at, &c, None, &[]) == Some(0)));
        // The cap (50% of 2 = 1) keeps the other one in.
        record(&p, &at, 0, bad, Duration::ZERO);
        assert!(record(&p, &at, 0, bad, Duration::ZERO).is_none());
    }

    #[test]
    fn round_robin_and_locality() {
        let reg = Registry::default();
        let mut p = Policy::default_for("d/e");
        p.lb = Lb::RoundRobin;
        let at = reg.attach("d/e", 80, &[addr(1), addr(2), addr(3)], &p);
        let c = ready(3);
        let picks: Vec<_> = (0..6)
            .map(|_| pick(&p, &at, &c, None, &[]).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|i| **i == 2).count(), 2);
        p.prefer_same_node = true;
        assert!((0..10).all(|_| pick(&p, &at, &c, None, &[]) == Some(0)));
        // The local one tried: go elsewhere.
        assert_ne!(pick(&p, &at, &c, None, &[0]), Some(0));
    }
}
