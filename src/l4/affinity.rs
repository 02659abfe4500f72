//! Stream-key affinity: rendezvous (highest random weight) hashing of a key
//! over a group's usable nodes. The same key lands on the same node for as
//! long as that node is usable; when it is not, only its keys move, each to
//! its next-highest node. Needs no shared state, so it survives restarts and
//! agrees between several amslb instances.

use crate::cluster::{GroupMembers, Node};
use std::sync::Arc;

/// The usable node of `members`, not in `tried`, that `key` weighs highest on.
pub fn pick(members: &GroupMembers, key: &str, tried: &[Arc<Node>]) -> Option<Arc<Node>> {
    members
        .nodes
        .iter()
        .filter(|n| n.is_usable() && !tried.iter().any(|t| Arc::ptr_eq(t, n)))
        .max_by_key(|n| (weight(n.id(), key), n.id().to_string()))
        .cloned()
}

/// A stable 64-bit weight of (node, key): FNV-1a over both, then a
/// splitmix64 finaliser so that similar ids and keys spread well. Stable
/// across processes and versions, unlike std's hasher.
fn weight(node: &str, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([0xff]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests::members;
    use std::collections::HashMap;

    #[test]
    fn same_key_same_node_and_keys_spread() {
        let g = members(4);
        let mut per_node: HashMap<String, usize> = HashMap::new();
        for i in 0..400 {
            let key = format!("live/stream{i}");
            let first = pick(&g, &key, &[]).unwrap();
            assert!(Arc::ptr_eq(&first, &pick(&g, &key, &[]).unwrap()));
            *per_node.entry(first.id().to_string()).or_default() += 1;
        }
        assert_eq!(per_node.len(), 4);
        assert!(per_node.values().all(|&c| c > 60), "{per_node:?}");
    }

    #[test]
    fn only_the_lost_nodes_keys_move() {
        let g = members(4);
        let keys: Vec<String> = (0..200).map(|i| format!("live/k{i}")).collect();
        let before: Vec<_> = keys.iter().map(|k| pick(&g, k, &[]).unwrap()).collect();
        g.nodes[2].set_healthy(false);
        for (key, was) in keys.iter().zip(&before) {
            let now = pick(&g, key, &[]).unwrap();
            if Arc::ptr_eq(was, &g.nodes[2]) {
                assert!(!Arc::ptr_eq(&now, &g.nodes[2]));
            } else {
                assert!(Arc::ptr_eq(&now, was), "{key} moved without reason");
            }
        }
        // Tried nodes are skipped the same way (retry after a failed connect).
        let k = &keys[0];
        let first = pick(&g, k, &[]).unwrap();
        let second = pick(&g, k, std::slice::from_ref(&first)).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
    }
}
