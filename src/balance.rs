//! Choosing a node of a group for a new session.
//!
//! Pure functions over a [`GroupMembers`] snapshot: no I/O, no locks. Callers
//! pass the nodes they already tried so that a retry lands elsewhere.

use crate::cluster::{GroupMembers, Node};
use crate::config::BalanceMode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Picks a usable node of `members` that is not in `tried`, or `None`.
pub fn pick(mode: BalanceMode, members: &GroupMembers, tried: &[Arc<Node>]) -> Option<Arc<Node>> {
    let candidate = |n: &&Arc<Node>| n.is_usable() && !tried.iter().any(|t| Arc::ptr_eq(t, n));
    match mode {
        BalanceMode::RoundRobin => {
            let len = members.nodes.len();
            if len == 0 {
                return None;
            }
            let start = members.cursor.fetch_add(1, Ordering::Relaxed);
            (0..len)
                .map(|i| &members.nodes[(start + i) % len])
                .find(candidate)
                .cloned()
        }
        BalanceMode::LeastConn => {
            // Ties go to the node after the cursor, so equal nodes share work
            // instead of the first one taking every burst.
            let len = members.nodes.len();
            let start = members.cursor.fetch_add(1, Ordering::Relaxed);
            (0..len)
                .map(|i| &members.nodes[(start + i) % len])
                .filter(candidate)
                .min_by_key(|n| n.active_sessions())
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
                    Arc::new(Node::new(NodeSpec {
                        id: format!("n{i}"),
                        group: "edge".into(),
                        addr: IpAddr::from([127, 0, 2, i]),
                        http_port: 5080,
                        rtmp_port: 1935,
                        srt_port: 4200,
                        drain: false,
                    }))
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
}
