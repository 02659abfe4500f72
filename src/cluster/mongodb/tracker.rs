//! The source's picture of the registry: the documents seen so far, when each
//! heartbeat was last seen changing, and turning that into a membership.
//!
//! No I/O here: the loop in [`super`] feeds documents and events in and calls
//! [`Tracker::publish`]; times are passed in so the rules are testable.

use super::document::{self, AmsNode, NodeAddr};
use super::freshness;
use super::resolve::{Lookup, Resolver};
use super::roles::RoleMap;
use crate::cluster::{Cluster, Node, NodeSpec};
use crate::config::ClusterConfig;
use mongodb::bson::Document;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// One registry document and the connected-clock time its heartbeat last changed.
#[derive(Debug)]
struct Entry {
    node: AmsNode,
    beat_at: i64,
}

/// Documents seen, plus what was last handed to the [`Cluster`].
#[derive(Debug)]
pub struct Tracker {
    roles: RoleMap,
    stale_after: Duration,
    load_threshold: f32,
    entries: HashMap<String, Entry>,
    /// Documents that could not become nodes, with the reason already logged:
    /// one log line per document and reason, not one per poll.
    warned: HashMap<String, String>,
    /// Specs of the last update, sorted by id; `None` before the first one, so
    /// the first read replaces the static seeds even when MongoDB has no node.
    published: Option<Vec<NodeSpec>>,
    /// Addresses of the host names nodes registered.
    resolver: Arc<Resolver>,
    /// Nodes whose document is gone but that are kept for their open sessions.
    lingering: std::collections::HashSet<String>,
}

impl Tracker {
    /// An empty picture for the `[cluster]` settings.
    pub fn new(cluster: &ClusterConfig) -> Self {
        Self {
            roles: RoleMap::new(cluster),
            stale_after: cluster.stale_after,
            load_threshold: cluster.load_threshold,
            entries: HashMap::new(),
            warned: HashMap::new(),
            published: None,
            resolver: Arc::new(Resolver::default()),
            lingering: std::collections::HashSet::new(),
        }
    }

    /// The host-name cache, to wait on its changes.
    pub fn resolver(&self) -> Arc<Resolver> {
        self.resolver.clone()
    }

    /// Takes a full read of the collection: documents not in `docs` are gone.
    pub fn replace_all(&mut self, docs: &[Document], now_ms: i64, wall_ms: i64) {
        let ids: std::collections::HashSet<String> = docs
            .iter()
            .map(|d| d.get("_id").map(document::id_text).unwrap_or_default())
            .collect();
        self.entries.retain(|id, _| ids.contains(id));
        self.warned.retain(|id, _| ids.contains(id));
        for doc in docs {
            self.upsert(doc, now_ms, wall_ms);
        }
    }

    /// Takes one inserted, updated or replaced document.
    pub fn upsert(&mut self, doc: &Document, now_ms: i64, wall_ms: i64) {
        let node = match document::parse(doc) {
            Ok(node) => node,
            Err(skip) => {
                let id = doc.get("_id").map(document::id_text).unwrap_or_default();
                self.entries.remove(&id);
                self.warn_once(&id, skip.to_string());
                return;
            }
        };
        let beat_at = match self.entries.get(&node.id) {
            // Unchanged heartbeat: keep its time. Changed: we just saw it beat (rule 1).
            Some(old) if old.node.last_update_ms == node.last_update_ms => old.beat_at,
            Some(_) => now_ms,
            None => freshness::first_seen_at(node.last_update_ms, wall_ms, now_ms),
        };
        self.entries
            .insert(node.id.clone(), Entry { node, beat_at });
    }

    /// Forgets a deleted document.
    pub fn remove(&mut self, id: &str) {
        self.entries.remove(id);
        self.warned.remove(id);
    }

    fn warn_once(&mut self, id: &str, reason: String) {
        if self.warned.get(id) != Some(&reason) {
            tracing::warn!(document = id, "ignoring cluster node document: {reason}");
            self.warned.insert(id.to_string(), reason);
        }
    }

    /// Brings `cluster` in line with the documents at connected time `now_ms`:
    /// swaps the membership when the set of nodes changed, and sets each node's
    /// stale flag and reported load. A node we have never had in the membership
    /// is not added while stale: it has no state worth keeping, and adding it
    /// would expose it, for a moment, before its stale flag is set. A stale node
    /// already there stays (flagged), so its health state survives a short gap.
    pub fn publish(&mut self, cluster: &Cluster, now_ms: i64) {
        // A restarted AMS may register under a new id while its old document
        // lingers: per address, the freshest heartbeat wins (ties by id).
        // Host names first become addresses (from the cache; new names are
        // looked up in the background and published when they answer).
        let mut by_addr: HashMap<IpAddr, (&Entry, Option<&str>)> = HashMap::new();
        let mut unresolved = Vec::new();
        let mut hosts = std::collections::HashSet::new();
        for e in self.entries.values() {
            let (ip, host) = match &e.node.addr {
                NodeAddr::Ip(ip) => (*ip, None),
                NodeAddr::Host(host) => {
                    hosts.insert(host.as_str());
                    match self.resolver.lookup(host) {
                        Lookup::Addr(ip) => (ip, Some(host.as_str())),
                        Lookup::Pending => continue,
                        Lookup::Failed => {
                            unresolved.push((e.node.id.clone(), host.clone()));
                            continue;
                        }
                    }
                }
            };
            let slot = by_addr.entry(ip).or_insert((e, host));
            if (e.beat_at, &slot.0.node.id) > (slot.0.beat_at, &e.node.id) {
                *slot = (e, host);
            }
        }
        self.resolver.retain(&hosts);
        let mut chosen: Vec<(IpAddr, &Entry, Option<&str>)> = by_addr
            .into_iter()
            .map(|(ip, (e, host))| (ip, e, host))
            .collect();
        chosen.sort_by(|a, b| a.1.node.id.cmp(&b.1.node.id));

        let snapshot = cluster.snapshot();
        let current: HashMap<&str, &Arc<Node>> = snapshot.nodes().map(|n| (n.id(), n)).collect();
        let mut specs: Vec<NodeSpec> = Vec::new();
        let mut states = Vec::new();
        let mut unmapped = Vec::new();
        for (ip, e, host) in chosen {
            let Some(spec) = self.roles.spec_for(&e.node.id, host, ip) else {
                let shown = host.map_or(ip.to_string(), |h| format!("{h} ({ip})"));
                unmapped.push((e.node.id.clone(), shown));
                continue;
            };
            // Usable again: a later problem with this document gets logged anew.
            self.warned.remove(&e.node.id);
            let stale = freshness::is_stale(e.beat_at, now_ms, self.stale_after);
            let known = current
                .get(spec.id.as_str())
                .is_some_and(|n| n.spec() == &spec);
            if (stale && !known) || specs.iter().any(|s| s.id == spec.id) {
                continue;
            }
            states.push((spec.id.clone(), stale, e.node.load));
            specs.push(spec);
        }
        for (id, ip) in unmapped {
            self.warn_once(
                &id,
                format!("address {ip} matches no [[cluster.role]] and there is no default_group"),
            );
        }
        for (id, host) in unresolved {
            self.warn_once(&id, format!("host name {host:?} does not resolve"));
        }
        // Scale-in without cuts: a node whose document went away (an
        // auto-scaler removed it) keeps, like a stale node, its open sessions
        // and sticky clients while it has sessions here and passes health
        // checks; it takes no new session and leaves once empty or down.
        let mut lingering = std::collections::HashSet::new();
        for node in snapshot.nodes() {
            let kept = specs.iter().any(|s| s.id == node.id())
                || self.published.is_none()
                || node.active_sessions() == 0
                || !node.is_healthy();
            if kept {
                continue;
            }
            if !self.lingering.contains(node.id()) {
                tracing::info!(
                    node = node.id(),
                    sessions = node.active_sessions(),
                    "node's document is gone: kept for its open sessions, no new ones"
                );
            }
            lingering.insert(node.id().to_string());
            specs.push(node.spec().clone());
            states.push((node.id().to_string(), true, node.reported_load()));
        }
        self.lingering = lingering;
        specs.sort_by(|a, b| a.id.cmp(&b.id));
        if self.published.as_ref() != Some(&specs) {
            log_changes(self.published.as_deref().unwrap_or_default(), &specs);
            cluster.update(specs.clone());
            self.published = Some(specs);
        }

        let snapshot = cluster.snapshot();
        let current: HashMap<&str, &Arc<Node>> = snapshot.nodes().map(|n| (n.id(), n)).collect();
        for (id, stale, load) in states {
            let Some(node) = current.get(id.as_str()) else {
                continue;
            };
            if node.set_stale(stale) != stale && !self.lingering.contains(&id) {
                if stale {
                    tracing::warn!(
                        node = id,
                        "node stopped refreshing its heartbeat: no new sessions"
                    );
                } else {
                    tracing::info!(node = id, "node refreshes its heartbeat again");
                }
            }
            node.set_reported_load(load, self.load_threshold);
        }
    }
}

fn log_changes(old: &[NodeSpec], new: &[NodeSpec]) {
    for spec in new.iter().filter(|s| !old.contains(s)) {
        tracing::info!(node = spec.id, addr = %spec.addr, group = spec.group, "node joined");
    }
    for spec in old.iter().filter(|s| !new.contains(s)) {
        tracing::info!(node = spec.id, addr = %spec.addr, group = spec.group, "node left");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    const WALL: i64 = 1_700_000_000_000;

    fn tracker() -> Tracker {
        Tracker::new(&crate::config::mongo::fixtures::cluster("", ""))
    }

    fn ams(id: &str, ip: &str, beat: i64, cpu: &str) -> Document {
        doc! { "_id": id, "ip": ip, "lastUpdateTime": beat, "memory": "10", "cpu": cpu }
    }

    fn ids(cluster: &Cluster, group: &str) -> Vec<String> {
        cluster
            .snapshot()
            .group(group)
            .map(|g| g.nodes.iter().map(|n| n.id().to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn full_read_maps_roles_and_replaces_seeds() {
        let seeded = crate::config::mongo::fixtures::cluster(
            "",
            "[[cluster.node]]\nid = \"seed\"\naddress = \"127.0.9.9\"\ngroup = \"origin\"",
        );
        let cluster = Cluster::new();
        cluster.update(crate::cluster::static_source::specs(&seeded));
        assert_eq!(ids(&cluster, "origin"), ["seed"]);
        let mut t = Tracker::new(&seeded);
        t.replace_all(
            &[
                ams("o1", "127.0.5.1", WALL, "5"),
                ams("e1", "127.0.6.1", WALL, "5"),
                ams("x", "10.0.0.1", WALL, "5"),
                doc! { "_id": "bad", "ip": "not an ip" },
            ],
            0,
            WALL,
        );
        t.publish(&cluster, 0);
        assert_eq!(ids(&cluster, "origin"), ["o1"]);
        assert_eq!(ids(&cluster, "edge"), ["e1"]);
        assert_eq!(t.warned.len(), 2, "{:?}", t.warned);

        // An empty collection empties the membership too (no seed comes back).
        t.replace_all(&[], 1, WALL);
        t.publish(&cluster, 1);
        assert_eq!(cluster.snapshot().nodes().count(), 0);
        assert!(t.warned.is_empty());
    }

    #[test]
    fn node_whose_document_goes_keeps_its_sessions_until_empty_or_down() {
        let cluster = Cluster::new();
        let mut t = tracker();
        t.replace_all(
            &[
                ams("o1", "127.0.5.1", WALL, "5"),
                ams("o2", "127.0.5.2", WALL, "5"),
            ],
            0,
            WALL,
        );
        t.publish(&cluster, 0);
        let o1 = cluster.snapshot().node("o1").unwrap().clone();
        let session = o1.lease();
        // The auto-scaler removes o1: its document is deleted.
        t.remove("o1");
        t.publish(&cluster, 1);
        let kept = cluster
            .snapshot()
            .node("o1")
            .cloned()
            .expect("kept while in use");
        assert!(Arc::ptr_eq(&kept, &o1), "same node, same state");
        assert!(kept.is_stale() && !kept.is_usable(), "no new sessions");
        // Empty: it leaves.
        drop(session);
        t.publish(&cluster, 2);
        assert!(cluster.snapshot().node("o1").is_none());
        assert_eq!(ids(&cluster, "origin"), ["o2"]);

        // Failing health checks end the grace at once, sessions or not.
        let o2 = cluster.snapshot().node("o2").unwrap().clone();
        let _session = o2.lease();
        t.remove("o2");
        o2.set_healthy(false);
        t.publish(&cluster, 3);
        assert!(cluster.snapshot().node("o2").is_none());
    }

    #[test]
    fn node_goes_stale_without_changes_and_returns_on_a_beat() {
        let cluster = Cluster::new();
        let mut t = tracker();
        t.upsert(&ams("e1", "127.0.6.1", WALL, "5"), 0, WALL);
        t.publish(&cluster, 0);
        let node = cluster.snapshot().node("e1").unwrap().clone();
        // Same heartbeat re-read by a poll: the clock keeps running.
        t.upsert(&ams("e1", "127.0.6.1", WALL, "5"), 10_000, WALL + 10_000);
        t.publish(&cluster, 25_000);
        assert!(node.is_usable());
        t.publish(&cluster, 25_001);
        assert!(node.is_stale() && !node.is_usable());
        // It stays a member, keeping its state, and a new beat brings it back.
        assert!(Arc::ptr_eq(cluster.snapshot().node("e1").unwrap(), &node));
        t.upsert(
            &ams("e1", "127.0.6.1", WALL + 1, "5"),
            30_000,
            WALL + 30_000,
        );
        t.publish(&cluster, 30_000);
        assert!(node.is_usable());
    }

    #[test]
    fn stale_newcomer_is_not_added_and_deletion_removes() {
        let cluster = Cluster::new();
        let mut t = tracker();
        t.upsert(&ams("old", "127.0.6.2", WALL - 60_000, "5"), 0, WALL);
        t.upsert(&ams("e1", "127.0.6.1", WALL, "5"), 0, WALL);
        t.publish(&cluster, 0);
        assert_eq!(ids(&cluster, "edge"), ["e1"]);
        t.remove("e1");
        t.publish(&cluster, 1);
        assert!(ids(&cluster, "edge").is_empty());
    }

    #[test]
    fn same_address_keeps_the_freshest_document() {
        let cluster = Cluster::new();
        let mut t = tracker();
        t.upsert(
            &ams("before-restart", "127.0.6.1", WALL - 15_000, "5"),
            0,
            WALL,
        );
        t.upsert(&ams("after-restart", "127.0.6.1", WALL, "5"), 0, WALL);
        t.publish(&cluster, 0);
        assert_eq!(ids(&cluster, "edge"), ["after-restart"]);
    }

    #[test]
    fn reported_load_reaches_the_node() {
        let cluster = Cluster::new();
        let mut t = tracker();
        t.upsert(&ams("e1", "127.0.6.1", WALL, "80"), 0, WALL);
        t.publish(&cluster, 0);
        let node = cluster.snapshot().node("e1").unwrap().clone();
        assert!(node.is_overloaded());
        assert_eq!(node.reported_load().cpu, Some(80.0));
        t.upsert(&ams("e1", "127.0.6.1", WALL + 1, "20"), 1, WALL);
        t.publish(&cluster, 1);
        assert!(!node.is_overloaded());
    }

    #[test]
    fn skipped_document_is_logged_once_per_reason() {
        let mut t = tracker();
        let bad = doc! { "_id": "b", "ip": 1 };
        t.upsert(&bad, 0, WALL);
        t.upsert(&bad, 1, WALL);
        assert_eq!(t.warned.get("b").map(String::as_str), Some("no `ip` field"));
        t.upsert(&doc! { "_id": "b", "ip": "x y" }, 2, WALL);
        assert!(t.warned["b"].contains("neither an IP address nor a host name"));
        t.upsert(&ams("b", "127.0.6.1", WALL, "1"), 3, WALL);
        t.publish(&Cluster::new(), 3);
        assert_eq!(t.entries.len(), 1);
        assert!(t.warned.is_empty());
    }
}
