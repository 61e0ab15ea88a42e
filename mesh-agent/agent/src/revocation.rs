//! Revoked identities and nodes, as the control server distributes them
//! (in the `TrustBundle` resource): the tunnel refuses a handshake with one
//! and closes the connections open with one as soon as the list reaches it.
//!
//! A connection "uses" an identity when it presents it or asks for it, and
//! a node when its peer is that node's agent (its tunnel address).
use std::{
    collections::{BTreeSet, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use tokio::sync::watch;

use mesh_api::{identity::SpiffeId, pb};

use crate::state::State;

/// What is revoked now; compared whole, so a change wakes the watchers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revoked {
    identities: BTreeSet<String>,
    nodes: BTreeSet<String>,
    /// Tunnel addresses of the revoked nodes, from their Node resources.
    node_ips: HashSet<Ipv4Addr>,
}

/// The data path's handle: the current list, and a wake-up when it changes.
pub type RevokedRx = watch::Receiver<Arc<Revoked>>;

impl Revoked {
    /// The list in `bundle`, with the revoked nodes' tunnel addresses from
    /// `state`.
    pub fn from_bundle(bundle: &pb::TrustBundle, state: &State) -> Revoked {
        let nodes: BTreeSet<String> = bundle.revoked_nodes.iter().cloned().collect();
        let node_ips = nodes
            .iter()
            .filter_map(|n| state.node_tunnel(n))
            .map(|a| *a.ip())
            .collect();
        Revoked {
            identities: bundle.revoked_identities.iter().cloned().collect(),
            nodes,
            node_ips,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty() && self.nodes.is_empty()
    }

    /// Why a connection between `ids` with the agent at `peer` may not be
    /// (or stay) open; `None` when it may.
    pub fn refuses<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a SpiffeId>,
        peer: Option<Ipv4Addr>,
    ) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        for id in ids {
            let text = id.to_string();
            if self.identities.contains(&text) {
                return Some(format!("identity {text} is revoked"));
            }
        }
        match peer {
            Some(ip) if self.node_ips.contains(&ip) => Some(format!("the node at {ip} is revoked")),
            _ => None,
        }
    }

    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(String::as_str)
    }
}

/// A handle that never sees a revocation, for tests and tools.
pub fn none() -> RevokedRx {
    watch::channel(Arc::new(Revoked::default())).1
}

/// Resolves once `refuses` finds a reason in a later list: the connection
/// is to be closed. Pends forever if the sender is gone.
pub async fn until_revoked(
    mut rx: RevokedRx,
    refuses: impl Fn(&Revoked) -> Option<String>,
) -> String {
    loop {
        if let Some(why) = refuses(&rx.borrow_and_update()) {
            return why;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).expect("valid")
    }

    #[test]
    fn a_revoked_identity_on_either_end_or_a_revoked_node_refuses_the_connection() {
        let mut r = Revoked::default();
        assert_eq!(r.refuses([&id("a"), &id("b")], None), None);
        r.identities.insert(id("b").to_string());
        assert!(
            r.refuses([&id("a"), &id("b")], None)
                .is_some_and(|why| why.contains("sa/b"))
        );
        assert_eq!(r.refuses([&id("a"), &id("c")], None), None);
        let ip = Ipv4Addr::new(198, 18, 0, 2);
        r.nodes.insert("n2".into());
        r.node_ips.insert(ip);
        assert!(r.refuses([&id("a")], Some(ip)).is_some());
        assert_eq!(
            r.refuses([&id("a")], Some(Ipv4Addr::new(198, 18, 0, 3))),
            None
        );
    }

    #[tokio::test]
    async fn a_watcher_wakes_when_a_later_list_revokes_its_identity() {
        let (tx, rx) = watch::channel(Arc::new(Revoked::default()));
        let waiter = tokio::spawn(until_revoked(rx, |r| r.refuses([&id("a")], None)));
        tokio::task::yield_now().await;
        let mut other = Revoked::default();
        other.identities.insert(id("x").to_string());
        tx.send_replace(Arc::new(other.clone()));
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "another identity's revocation leaves it open"
        );
        other.identities.insert(id("a").to_string());
        tx.send_replace(Arc::new(other));
        let why = tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken within a second")
            .expect("task");
        assert!(why.contains("sa/a"), "{why}");
    }
}
