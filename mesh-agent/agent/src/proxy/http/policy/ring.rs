//! Consistent hashing: a ring of virtual nodes (Envoy's ring hash, Karger's
//! scheme). Each endpoint owns `virtual_nodes` points placed by hashing its
//! address; a key goes to the owner of the first point at or after its
//! hash. When an endpoint joins, only the keys that now fall to its points
//! move (about 1/N of them); when one leaves, only its own keys move.
//!
//! The hash is FNV-1a with a splitmix64 finaliser, written here so that
//! every agent of every version places keys the same way (std's hasher
//! makes no such promise).

pub const DEFAULT_VIRTUAL_NODES: u32 = 160;

/// A stable 64-bit hash.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64: FNV's low bits are weak.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[derive(Debug, Default)]
pub struct Ring {
    /// (point, endpoint index), sorted by point.
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// A ring over endpoints named by `names` (their addresses), in order.
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>, virtual_nodes: u32) -> Ring {
        let mut points = Vec::new();
        for (i, name) in names.into_iter().enumerate() {
            for v in 0..virtual_nodes {
                let mut key = Vec::with_capacity(name.len() + 8);
                key.extend_from_slice(name.as_bytes());
                key.push(b'#');
                key.extend_from_slice(v.to_string().as_bytes());
                points.push((hash(&key), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Endpoints in the order the ring offers them for `key_hash`: the
    /// owner first, then the next distinct ones clockwise (where a retry, or
    /// an ejected owner, goes). `accept` says which may be taken.
    pub fn pick(&self, key_hash: u64, accept: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(p, _)| *p < key_hash);
        let n = self.points.len();
        (0..n)
            .map(|k| self.points[(start + k) % n].1 as usize)
            .find(|i| accept(*i))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("198.18.1.{i}:8080")).collect()
    }

    fn owners(ring: &Ring, keys: usize) -> Vec<usize> {
        (0..keys)
            .map(|k| {
                ring.pick(hash(format!("user-{k}").as_bytes()), |_| true)
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn one_key_one_endpoint_and_spread_evenly() {
        let n = names(4);
        let ring = Ring::new(n.iter().map(String::as_str), DEFAULT_VIRTUAL_NODES);
        let a = owners(&ring, 10_000);
        assert_eq!(a, owners(&ring, 10_000));
        for e in 0..4 {
            let share = a.iter().filter(|o| **o == e).count() as f64 / 10_000.0;
            assert!((0.15..0.35).contains(&share), "endpoint {e}: {share}");
        }
    }

    #[test]
    fn an_unacceptable_owner_passes_to_the_next_distinct_one() {
        let n = names(3);
        let ring = Ring::new(n.iter().map(String::as_str), 10);
        let h = hash(b"k");
        let first = ring.pick(h, |_| true).unwrap();
        let second = ring.pick(h, |i| i != first).unwrap();
        assert_ne!(first, second);
        assert_eq!(ring.pick(h, |_| false), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn adding_an_endpoint_moves_only_keys_to_it(n in 2usize..12) {
            let before = names(n);
            let after = names(n + 1);
            let r1 = Ring::new(before.iter().map(String::as_str), DEFAULT_VIRTUAL_NODES);
            let r2 = Ring::new(after.iter().map(String::as_str), DEFAULT_VIRTUAL_NODES);
            let (a, b) = (owners(&r1, 4000), owners(&r2, 4000));
            let moved = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            // Every key that moved went to the new endpoint...
            prop_assert!(a.iter().zip(&b).all(|(x, y)| x == y || *y == n));
            // ...and about 1/(n+1) of them did.
            let share = moved as f64 / 4000.0;
            prop_assert!(share < 1.6 / (n as f64 + 1.0), "{share} for n={n}");
        }
    }
}
