//! Choosing a node of a group for a new session.
//!
//! Pure functions over a [`GroupMembers`] snapshot: no I/O, no locks. Callers
//! pass the nodes they already tried so that a retry lands elsewhere.

use crate::cluster::{FULL_WEIGHT, GroupMembers, Node};
use crate::config::BalanceMode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Picks a usable node of `members` that is not in `tried`, or `None`.
///
/// A node slow-starting after it came back (weight below [`FULL_WEIGHT`]) is
/// offered a new session only with probability weight/[`FULL_WEIGHT`], so it
/// ramps up instead of taking a stampede; if that leaves no candidate, any
/// usable node serves, so a group whose only node is ramping still works.
///
/// Nodes that report load at or over their threshold (MongoDB source) are
/// candidates only when no other node has room: AMS refuses work when
/// overloaded, but a busy node beats a 503.
pub fn pick(mode: BalanceMode, members: &GroupMembers, tried: &[Arc<Node>]) -> Option<Arc<Node>> {
    let usable = |n: &Arc<Node>| n.is_usable() && !tried.iter().any(|t| Arc::ptr_eq(t, n));
    let room = members
        .nodes
        .iter()
        .any(|n| usable(n) && !n.is_overloaded());
    let candidate = |n: &Arc<Node>| usable(n) && !(room && n.is_overloaded());
    choose(mode, members, |n| candidate(n) && admits(n))
        .or_else(|| choose(mode, members, candidate))
}

/// Slow start: whether a ramping node takes this session.
fn admits(node: &Node) -> bool {
    let weight = node.weight();
    weight >= FULL_WEIGHT || rand::random_range(0..FULL_WEIGHT) < weight
}

fn choose(
    mode: BalanceMode,
    members: &GroupMembers,
    candidate: impl Fn(&Arc<Node>) -> bool,
) -> Option<Arc<Node>> {
    match mode {
        BalanceMode::RoundRobin => {
            let len = members.nodes.len();
            if len == 0 {
                return None;
            }
            let start = members.cursor.fetch_add(1, Ordering::Relaxed);
            (0..len)
                .map(|i| &members.nodes[(start + i) % len])
                .find(|n| candidate(n))
                .cloned()
        }
        // Stream-hash picks keyed requests elsewhere (crate::streaming::select);
        // a request without a stream is balanced by load.
        BalanceMode::LeastConn | BalanceMode::StreamHash => {
            // Ties go to the node after the cursor, so equal nodes share work
            // instead of the first one taking every burst.
            let len = members.nodes.len();
            let start = members.cursor.fetch_add(1, Ordering::Relaxed);
            (0..len)
                .map(|i| &members.nodes[(start + i) % len])
                .filter(|n| candidate(n))
                .min_by_key(|n| n.cluster_load())
                .cloned()
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cluster::NodeSpec;
    use std::collections::HashMap;
    use std::net::IpAddr;

    /// A group of `n` up nodes, for balancing tests.
    pub(crate) fn members(n: u8) -> GroupMembers {
        GroupMembers {
            nodes: (1..=n)
                .map(|i| {
                    Arc::new(Node::new(NodeSpec::on_default_ports(
                        &format!("n{i}"),
                        "edge",
                        IpAddr::from([127, 0, 2, i]),
                    )))
                })
                .collect(),
            cursor: Default::default(),
        }
    }

    #[test]
    fn round_robin_visits_each_node_in_turn() {
        let g = members(3);
        let ids: Vec<_> = (0..6)
            .map(|_| {
                pick(BalanceMode::RoundRobin, &g, &[])
                    .unwrap()
                    .id()
                    .to_string()
            })
            .collect();
        assert_eq!(ids, ["n1", "n2", "n3", "n1", "n2", "n3"]);
    }

    #[test]
    fn round_robin_skips_unusable_and_tried() {
        let g = members(3);
        g.nodes[1].set_healthy(false);
        let tried = vec![g.nodes[0].clone()];
        for _ in 0..5 {
            assert_eq!(
                pick(BalanceMode::RoundRobin, &g, &tried).unwrap().id(),
                "n3"
            );
        }
    }

    #[test]
    fn nothing_usable_gives_none() {
        let g = members(2);
        g.nodes.iter().for_each(|n| {
            n.set_draining(true);
        });
        assert!(pick(BalanceMode::RoundRobin, &g, &[]).is_none());
        assert!(pick(BalanceMode::LeastConn, &g, &[]).is_none());
        assert!(pick(BalanceMode::RoundRobin, &members(0), &[]).is_none());
    }

    #[test]
    fn least_conn_prefers_idle_node() {
        let g = members(3);
        let _a = g.nodes[0].lease();
        let _b = g.nodes[0].lease();
        let _c = g.nodes[2].lease();
        for _ in 0..4 {
            assert_eq!(pick(BalanceMode::LeastConn, &g, &[]).unwrap().id(), "n2");
        }
    }

    #[test]
    fn overloaded_node_gets_work_only_when_no_other_has_room() {
        let busy = crate::cluster::ReportedLoad {
            cpu: Some(90.0),
            memory: Some(20.0),
        };
        for mode in [BalanceMode::RoundRobin, BalanceMode::LeastConn] {
            let g = members(3);
            g.nodes[0].set_reported_load(busy, 75.0);
            g.nodes[2].set_reported_load(busy, 75.0);
            for _ in 0..6 {
                assert_eq!(pick(mode, &g, &[]).unwrap().id(), "n2", "{mode:?}");
            }
            // With no node left with room, the busy ones share the work.
            g.nodes[1].set_stale(true);
            let picked: std::collections::HashSet<_> = (0..4)
                .map(|_| pick(mode, &g, &[]).unwrap().id().to_string())
                .collect();
            assert_eq!(picked.len(), 2, "{mode:?}: {picked:?}");
        }
    }

    #[test]
    fn least_conn_spreads_ties() {
        let g = members(3);
        let mut seen = HashMap::new();
        for _ in 0..30 {
            *seen
                .entry(
                    pick(BalanceMode::LeastConn, &g, &[])
                        .unwrap()
                        .id()
                        .to_string(),
                )
                .or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[test]
    fn slow_starting_node_gets_a_share_by_weight() {
        let g = members(2);
        g.nodes[1].set_weight(FULL_WEIGHT / 10);
        let picks = 2000;
        let ramping = (0..picks)
            .filter(|_| pick(BalanceMode::RoundRobin, &g, &[]).unwrap().id() == "n2")
            .count();
        // Round robin offers n2 half of the sessions, it accepts about 10 % of those.
        assert!((40..200).contains(&ramping), "{ramping} of {picks}");
        // Alone, a ramping node still serves every session.
        let tried = vec![g.nodes[0].clone()];
        g.nodes[1].set_weight(0);
        for _ in 0..20 {
            assert_eq!(pick(BalanceMode::LeastConn, &g, &tried).unwrap().id(), "n2");
        }
    }
}
