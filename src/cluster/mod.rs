//! Cluster membership: which nodes exist, in which group, and their live state.
//!
//! The data path reads an immutable [`Membership`] snapshot through
//! [`Cluster::snapshot`]; a membership source (static config, MongoDB) builds a
//! new snapshot and swaps it in with [`Cluster::update`]. Nodes that stay keep
//! their `Arc<Node>`, so health state and session counts survive updates, and
//! requests already on a node keep it.

pub mod mongodb;
mod node;
pub mod source;
pub mod static_source;

pub use node::{FULL_WEIGHT, Node, NodeLease, NodeSpec, ReportedLoad};
pub use source::{MembershipSource, SourceState};

use arc_swap::ArcSwap;
use foldhash::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

/// The nodes of one group in one snapshot, plus the group's balancing state.
#[derive(Debug, Default)]
pub struct GroupMembers {
    /// Nodes of the group, in a stable order (by id).
    pub nodes: Vec<Arc<Node>>,
    /// Round-robin cursor; restarting it on a membership change is harmless.
    pub cursor: AtomicUsize,
}

/// An immutable view of the cluster at one moment.
#[derive(Debug, Default)]
pub struct Membership {
    groups: HashMap<String, GroupMembers>,
}

impl Membership {
    /// The members of `group`, if it has any node.
    pub fn group(&self, group: &str) -> Option<&GroupMembers> {
        self.groups.get(group)
    }

    /// Every node of every group.
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.groups.values().flat_map(|g| g.nodes.iter())
    }

    /// Finds a node by id.
    pub fn node(&self, id: &str) -> Option<&Arc<Node>> {
        self.nodes().find(|n| n.id() == id)
    }
}

/// The live, swappable membership.
#[derive(Debug, Default)]
pub struct Cluster {
    current: ArcSwap<Membership>,
}

impl Cluster {
    /// A cluster with no node yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current snapshot; cheap, lock-free, and stable for as long as it is held.
    pub fn snapshot(&self) -> Arc<Membership> {
        self.current.load_full()
    }

    /// Replaces the membership with `specs`. A node whose spec is unchanged keeps
    /// its identity (and so its health and counters); a node whose address,
    /// ports, group or region changed is a new node. The drain flag of a kept node
    /// follows the new spec only when the spec changed it, so a drain set at run
    /// time is not undone by an unrelated update.
    pub fn update(&self, specs: Vec<NodeSpec>) {
        let old = self.current.load();
        let mut groups: HashMap<String, GroupMembers> = HashMap::default();
        for spec in specs {
            let node = match old.node(&spec.id) {
                Some(existing) if same_endpoint(existing.spec(), &spec) => {
                    if existing.spec().drain != spec.drain {
                        existing.set_draining(spec.drain);
                    }
                    existing.clone()
                }
                _ => Arc::new(Node::new(spec)),
            };
            groups
                .entry(node.group().to_string())
                .or_default()
                .nodes
                .push(node);
        }
        for members in groups.values_mut() {
            members.nodes.sort_by(|a, b| a.id().cmp(b.id()));
        }
        self.current.store(Arc::new(Membership { groups }));
    }
}

fn same_endpoint(a: &NodeSpec, b: &NodeSpec) -> bool {
    a.group == b.group
        && a.addr == b.addr
        && a.http_port == b.http_port
        && a.rtmp_port == b.rtmp_port
        && a.srt_port == b.srt_port
        && a.region == b.region
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn spec(id: &str, group: &str, octet: u8) -> NodeSpec {
        NodeSpec::on_default_ports(id, group, IpAddr::from([127, 0, 1, octet]))
    }

    #[test]
    fn update_groups_and_sorts_nodes() {
        let cluster = Cluster::new();
        cluster.update(vec![
            spec("b", "edge", 2),
            spec("a", "edge", 1),
            spec("o", "origin", 3),
        ]);
        let snap = cluster.snapshot();
        let edge: Vec<_> = snap
            .group("edge")
            .unwrap()
            .nodes
            .iter()
            .map(|n| n.id().to_string())
            .collect();
        assert_eq!(edge, ["a", "b"]);
        assert_eq!(snap.group("origin").unwrap().nodes.len(), 1);
        assert!(snap.group("nope").is_none());
    }

    #[test]
    fn kept_node_keeps_its_state_changed_node_is_new() {
        let cluster = Cluster::new();
        cluster.update(vec![spec("a", "edge", 1), spec("b", "edge", 2)]);
        let before = cluster.snapshot();
        before.node("a").unwrap().set_healthy(false);
        cluster.update(vec![spec("a", "edge", 1), spec("b", "edge", 9)]);
        let after = cluster.snapshot();
        assert!(Arc::ptr_eq(
            before.node("a").unwrap(),
            after.node("a").unwrap()
        ));
        assert!(!after.node("a").unwrap().is_healthy());
        assert!(!Arc::ptr_eq(
            before.node("b").unwrap(),
            after.node("b").unwrap()
        ));
        // The old snapshot is untouched: in-flight work keeps what it had.
        assert_eq!(
            before.node("b").unwrap().spec().addr,
            IpAddr::from([127, 0, 1, 2])
        );
    }

    #[test]
    fn removed_node_disappears() {
        let cluster = Cluster::new();
        cluster.update(vec![spec("a", "edge", 1), spec("b", "edge", 2)]);
        cluster.update(vec![spec("a", "edge", 1)]);
        assert!(cluster.snapshot().node("b").is_none());
    }
}
