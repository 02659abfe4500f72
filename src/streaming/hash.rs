//! Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
//! "Consistent Hashing with Bounded Loads", 2016), on rendezvous hashing.
//!
//! Every candidate gets a score from `hash(key, node id)`; the key goes to the
//! best-scoring candidate whose load is under the bound
//! `ceil(c · (total load + 1) / candidates)`. Rendezvous hashing gives the
//! property the balancer needs without a ring to maintain: when a node leaves
//! only its keys move (to their next-best node), and a new node takes about
//! 1/N of the keys, from every other node evenly. The bound keeps a popular
//! stream from overloading one node: its overflow spills to the stream's
//! second-best node, and so on, so even a spilled stream touches few nodes.
//!
//! Scores depend only on the key and node ids, through a hash defined here
//! (FNV-1a then the SplitMix64 finaliser, not `std`'s unspecified hasher), so
//! every amslb instance, of any build, agrees on the order.

/// A candidate for a keyed pick: its stable id and its current load.
pub trait Candidate {
    /// Stable identity (the node id): what the score is computed from.
    fn id(&self) -> &str;
    /// Current load (open sessions).
    fn load(&self) -> usize;
}

/// The rendezvous score of `id` for `key`; higher wins.
pub fn score(key: &str, id: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    // 0xff cannot occur in UTF-8, so ("ab","c") and ("a","bc") hash apart.
    for &b in key.as_bytes().iter().chain(&[0xff]).chain(id.as_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    // FNV's low bits are weak for short inputs; the finaliser spreads them.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Largest load a candidate may have and still take one more keyed session:
/// `ceil(c · (total + 1) / n)`, at least 1. Some candidate is always under it,
/// since `n · bound ≥ total + 1 > total`. An infinite `c` means no bound.
pub fn bound(load_factor: f64, total: usize, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let exact = load_factor * (total as f64 + 1.0) / n as f64;
    (exact.ceil() as usize).max(1)
}

/// Candidates in preference order for `key` (best first), ignoring load.
pub fn ranked<'a, T: Candidate>(key: &str, candidates: &'a [T]) -> Vec<&'a T> {
    let mut order: Vec<(u64, &T)> = candidates.iter().map(|c| (score(key, c.id()), c)).collect();
    // Ties (different ids, same 64-bit score) are broken by id so the order is total.
    order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id().cmp(b.1.id())));
    order.into_iter().map(|(_, c)| c).collect()
}

/// The candidate `key` goes to: the best-ranked one under the load bound.
/// `None` only when there is no candidate. One pass, no sort: O(candidates).
pub fn pick<'a, T: Candidate>(key: &str, candidates: &'a [T], load_factor: f64) -> Option<&'a T> {
    let total: usize = candidates.iter().map(Candidate::load).sum();
    let limit = bound(load_factor, total, candidates.len());
    best(key, candidates.iter().filter(|c| c.load() < limit))
        // Loads are live counters: sessions opened by other requests since
        // `total` was read can fill every candidate; the stream's own node
        // then beats refusing the request.
        .or_else(|| best(key, candidates.iter()))
}

/// The best-ranked of `candidates`: same order as [`ranked`] (higher score, then lower id).
fn best<'a, T: Candidate>(key: &str, candidates: impl Iterator<Item = &'a T>) -> Option<&'a T> {
    candidates
        .map(|c| (score(key, c.id()), c))
        .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.id().cmp(a.1.id())))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    struct Sim {
        id: String,
        load: usize,
    }

    impl Candidate for Sim {
        fn id(&self) -> &str {
            &self.id
        }
        fn load(&self) -> usize {
            self.load
        }
    }

    fn nodes(n: usize) -> Vec<Sim> {
        (0..n)
            .map(|i| Sim {
                id: format!("edge-{i}"),
                load: 0,
            })
            .collect()
    }

    fn keys(m: usize) -> Vec<String> {
        (0..m).map(|i| format!("LiveApp/stream{i}")).collect()
    }

    fn assignment(keys: &[String], nodes: &[Sim]) -> HashMap<String, String> {
        keys.iter()
            .map(|k| (k.clone(), pick(k, nodes, 1.25).unwrap().id.clone()))
            .collect()
    }

    #[test]
    fn score_is_stable_across_builds() {
        // Pinned values: a change here would make instances of different
        // versions disagree on where a stream lives.
        assert_eq!(score("LiveApp/s1", "edge-1"), 0xe4f5_df81_caaf_7ec7);
        assert_ne!(score("ab", "c"), score("a", "bc"));
    }

    #[test]
    fn bound_follows_the_formula() {
        assert_eq!(bound(1.25, 0, 4), 1);
        assert_eq!(bound(1.25, 99, 4), 32); // 1.25 · 100 / 4 = 31.25
        assert_eq!(bound(2.0, 9, 5), 4);
        assert_eq!(bound(1.25, 5, 0), 0);
        assert_eq!(bound(f64::INFINITY, 5, 3), usize::MAX);
    }

    #[test]
    fn a_stream_stays_on_one_node_under_the_bound() {
        let mut group = nodes(4);
        // Background load from other streams keeps the mean, and so the bound, up.
        for n in &mut group {
            n.load = 40;
        }
        let first = pick("LiveApp/popular", &group, 1.25).unwrap().id.clone();
        let second = ranked("LiveApp/popular", &group)[1].id.clone();
        let mut chosen = Vec::new();
        for _ in 0..30 {
            let node = pick("LiveApp/popular", &group, 1.25).unwrap().id.clone();
            group.iter_mut().find(|n| n.id == node).unwrap().load += 1;
            chosen.push(node);
        }
        // 160 sessions: bound = ceil(1.25 · 161 / 4) = 51, so at least 10 more
        // viewers fit on the stream's node before it spills.
        assert!(chosen[..10].iter().all(|c| *c == first), "{chosen:?}");
        // Past the bound the stream spills to its second-ranked node, and only there.
        assert!(
            chosen.iter().all(|c| *c == first || *c == second),
            "{chosen:?}"
        );
        assert!(chosen.contains(&second), "{chosen:?}");
        let max = group.iter().map(|n| n.load).max().unwrap();
        let total: usize = group.iter().map(|n| n.load).sum();
        assert!(max <= bound(1.25, total - 1, 4), "max {max} over the bound");
    }

    #[test]
    fn no_node_goes_over_the_bound_under_skew() {
        let mut group = nodes(5);
        // Every session is for the same stream: the worst case for plain hashing.
        for _ in 0..1000 {
            let total: usize = group.iter().map(|n| n.load).sum();
            let limit = bound(1.25, total, group.len());
            let chosen = pick("LiveApp/hot", &group, 1.25).unwrap().id.clone();
            let node = group.iter_mut().find(|n| n.id == chosen).unwrap();
            assert!(node.load < limit);
            node.load += 1;
        }
        let max = group.iter().map(|n| n.load).max().unwrap();
        assert!(max as f64 <= 1.25 * 200.0 + 1.0, "max {max}");
    }

    #[test]
    fn removing_a_node_moves_only_its_streams() {
        let all = keys(2000);
        let before = assignment(&all, &nodes(8));
        let mut fewer = nodes(8);
        fewer.retain(|n| n.id != "edge-3");
        let after = assignment(&all, &fewer);
        let mut moved = 0;
        for k in &all {
            if before[k] == "edge-3" {
                moved += 1;
            } else {
                assert_eq!(before[k], after[k], "{k} moved though its node stayed");
            }
        }
        // edge-3 had about 1/8 of the streams.
        assert!((150..350).contains(&moved), "{moved}");
    }

    #[test]
    fn adding_a_node_moves_about_one_nth() {
        let all = keys(2000);
        let before = assignment(&all, &nodes(8));
        let after = assignment(&all, &nodes(9));
        let moved: Vec<_> = all.iter().filter(|k| before[*k] != after[*k]).collect();
        // Every moved stream went to the new node, and it got about 1/9 of them.
        assert!(moved.iter().all(|k| after[*k] == "edge-8"));
        assert!((150..300).contains(&moved.len()), "{}", moved.len());
    }

    #[test]
    fn keys_spread_evenly() {
        let all = keys(8000);
        let mut per_node: HashMap<String, usize> = HashMap::new();
        for node in assignment(&all, &nodes(8)).into_values() {
            *per_node.entry(node).or_default() += 1;
        }
        assert_eq!(per_node.len(), 8);
        assert!(
            per_node.values().all(|&c| (800..1200).contains(&c)),
            "{per_node:?}"
        );
    }

    /// A node whose load grows each time it is read, as if other requests
    /// opened sessions on it while a pick runs.
    struct Growing {
        id: String,
        reads: std::cell::Cell<usize>,
    }

    impl Candidate for Growing {
        fn id(&self) -> &str {
            &self.id
        }
        fn load(&self) -> usize {
            self.reads.set(self.reads.get() + 1);
            self.reads.get() * 100
        }
    }

    #[test]
    fn loads_rising_during_a_pick_still_give_the_streams_node() {
        let group: Vec<Growing> = ["a", "b"]
            .iter()
            .map(|id| Growing {
                id: id.to_string(),
                reads: Default::default(),
            })
            .collect();
        let expected = ranked("LiveApp/s", &group)[0].id.clone();
        for g in &group {
            g.reads.set(0);
        }
        assert_eq!(pick("LiveApp/s", &group, 1.25).unwrap().id, expected);
    }

    #[test]
    fn empty_group_gives_none() {
        assert!(pick::<Sim>("a/b", &[], 1.25).is_none());
    }
}
