//! Choosing the node for a new session: group, then region, then the group's
//! balancing mode, with stream affinity where the request names a stream.
//!
//! This is the one place that decides, so every path agrees on where a
//! stream goes: the HTTP proxy, the WebSocket sniffer, the assignment API and
//! the L4 listeners (RTMP/RTMPS by stream key, SRT by stream id), all through
//! [`pick`] and the one hash in [`super::hash`].

use super::hash::{self, Candidate};
use crate::balance;
use crate::cluster::{GroupMembers, Membership, Node};
use crate::config::{BalanceMode, Config, ListenerConfig};
use crate::route::{Route, RouteKind, Target};
use http::HeaderMap;
use std::sync::Arc;

impl Candidate for Arc<Node> {
    fn id(&self) -> &str {
        Node::id(self)
    }
    fn load(&self) -> usize {
        self.cluster_load()
    }
}

/// What a new session asks the balancer for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The group the router chose (its backup is used when it has no usable node).
    pub group: String,
    /// `app/stream` when the session concerns one stream.
    pub key: Option<String>,
    /// A publish session: hashed on its stream whatever the group's mode, and
    /// with no load bound, so a reconnecting publisher (and a WHIP session's
    /// follow-ups) finds its origin.
    pub publish: bool,
    /// Region the client asked for through `[global] region_header`.
    pub region: Option<String>,
}

impl Wanted {
    /// The request for a routed HTTP request.
    pub fn for_route(
        config: &Config,
        listener: &ListenerConfig,
        route: &Route,
        headers: &HeaderMap,
    ) -> Self {
        let publish = route.target == Target::Origin && route.kind == RouteKind::Whip;
        Self::for_target(
            config,
            listener,
            route.target,
            route.affinity.clone(),
            publish,
            headers,
        )
    }

    /// The request for an L4 session (RTMP, RTMPS, SRT): the listener's
    /// group, and no region hint (no headers), so the home region and the
    /// preference list order the nodes as for HTTP.
    pub fn for_session(
        config: &Config,
        listener: &ListenerConfig,
        key: Option<String>,
        publish: bool,
    ) -> Self {
        Self::for_target(
            config,
            listener,
            Target::ListenerDefault,
            key,
            publish,
            &HeaderMap::new(),
        )
    }

    /// The request for a session whose target and stream are already known.
    pub fn for_target(
        config: &Config,
        listener: &ListenerConfig,
        target: Target,
        key: Option<String>,
        publish: bool,
        headers: &HeaderMap,
    ) -> Self {
        Self {
            group: group_for(config, listener, target).to_string(),
            key,
            publish,
            region: client_region(config, headers),
        }
    }
}

/// The group a target names. `origin` and `edge` are the group names the
/// router targets; a config without such a group sends that traffic to the
/// listener's default group instead, so a single-group setup still works.
pub fn group_for<'a>(config: &'a Config, listener: &'a ListenerConfig, target: Target) -> &'a str {
    let wanted = match target {
        Target::Origin => "origin",
        Target::Edge => "edge",
        Target::ListenerDefault => return &listener.default_group,
    };
    config
        .group(wanted)
        .map_or(&listener.default_group, |g| &g.name)
}

/// The region named by the client hint header, if one is configured and sent.
fn client_region(config: &Config, headers: &HeaderMap) -> Option<String> {
    let name = config.global.region_header.as_deref()?;
    let value = headers.get(name)?.to_str().ok()?.trim();
    // A region name is short; anything else is not a hint worth keeping.
    (!value.is_empty() && value.len() <= 64).then(|| value.to_string())
}

/// Regions to try in order: the client's hint, the home region, the
/// preference list; `None` at the end means "any node".
fn region_order<'a>(config: &'a Config, hint: Option<&'a str>) -> Vec<Option<&'a str>> {
    let global = &config.global;
    let mut order: Vec<Option<&str>> = Vec::new();
    let named = hint
        .into_iter()
        .chain(global.region.as_deref())
        .chain(global.region_preference.iter().map(String::as_str));
    for region in named {
        if !order.contains(&Some(region)) {
            order.push(Some(region));
        }
    }
    order.push(None);
    order
}

/// Picks a usable node for `wanted` that is not in `tried`: in the wanted
/// group, then its backup; within a group, in the preferred regions first.
pub fn pick(
    config: &Config,
    snapshot: &Membership,
    wanted: &Wanted,
    tried: &[Arc<Node>],
) -> Option<Arc<Node>> {
    let backup = config
        .group(&wanted.group)
        .and_then(|g| g.backup.as_deref());
    let regions = region_order(config, wanted.region.as_deref());
    [Some(wanted.group.as_str()), backup]
        .into_iter()
        .flatten()
        .find_map(|name| {
            let members = snapshot.group(name)?;
            let group = config.group(name);
            let mode = group.map(|g| g.balance).unwrap_or_default();
            // A publisher must find the origin that holds its stream, and a
            // bound computed over a handful of publishers would move it as soon
            // as its origin had one session more than the mean allows; so
            // publish is hashed without a bound (spread comes from the hash).
            let load_factor = match group {
                _ if wanted.publish => f64::INFINITY,
                Some(g) => g.load_factor,
                None => crate::config::streaming::default_load_factor(),
            };
            let key = wanted
                .key
                .as_deref()
                .filter(|_| wanted.publish || mode == BalanceMode::StreamHash);
            let regional = members.nodes.iter().any(|n| n.region().is_some());
            regions
                .iter()
                .filter(|r| regional || r.is_none())
                .find_map(|&region| pick_in_region(members, tried, region, mode, key, load_factor))
        })
}

fn pick_in_region(
    members: &GroupMembers,
    tried: &[Arc<Node>],
    region: Option<&str>,
    mode: BalanceMode,
    key: Option<&str>,
    load_factor: f64,
) -> Option<Arc<Node>> {
    let outside = |n: &Arc<Node>| region.is_some_and(|r| n.region() != Some(r));
    if let Some(key) = key {
        let candidates: Vec<Arc<Node>> = members
            .nodes
            .iter()
            .filter(|n| n.is_usable() && !outside(n) && !tried.iter().any(|t| Arc::ptr_eq(t, n)))
            .cloned()
            .collect();
        return hash::pick(key, &candidates, load_factor).cloned();
    }
    if region.is_none() {
        return balance::pick(mode, members, tried);
    }
    // Nodes of other regions are excluded the way tried nodes are.
    let mut excluded: Vec<Arc<Node>> = members
        .nodes
        .iter()
        .filter(|n| outside(n))
        .cloned()
        .collect();
    if excluded.len() == members.nodes.len() {
        return None;
    }
    excluded.extend(tried.iter().cloned());
    balance::pick(mode, members, &excluded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Cluster, NodeSpec};
    use crate::config::parse_str;
    use std::net::IpAddr;
    use std::path::Path;

    fn config(global: &str, edge_balance: &str) -> Config {
        let text = format!(
            r#"
[global]
{global}
[[listener]]
name = "web"
bind = ["127.0.0.1:18700"]
protocol = "http"
default_group = "edge"
[[group]]
name = "origin"
balance = "round-robin"
[[group]]
name = "edge"
balance = "{edge_balance}"
backup = "origin"
[cluster]
"#
        );
        parse_str(&text, Path::new("t.toml")).unwrap().config
    }

    fn cluster(nodes: &[(&str, &str, Option<&str>)]) -> Cluster {
        let cluster = Cluster::new();
        cluster.update(
            nodes
                .iter()
                .enumerate()
                .map(|(i, &(id, group, region))| NodeSpec {
                    region: region.map(str::to_string),
                    ..NodeSpec::on_default_ports(id, group, IpAddr::from([127, 0, 3, i as u8 + 1]))
                })
                .collect(),
        );
        cluster
    }

    /// Three nodes `e1..e3` (edge) or `o1..o3` (origin), no region.
    fn three(group: &'static str) -> Cluster {
        let ids: Vec<String> = (1..=3).map(|i| format!("{}{i}", &group[..1])).collect();
        cluster(&[
            (&ids[0], group, None),
            (&ids[1], group, None),
            (&ids[2], group, None),
        ])
    }

    fn wanted(group: &str, key: Option<&str>, publish: bool, region: Option<&str>) -> Wanted {
        Wanted {
            group: group.into(),
            key: key.map(str::to_string),
            publish,
            region: region.map(str::to_string),
        }
    }

    fn id(node: Option<Arc<Node>>) -> String {
        node.map(|n| n.id().to_string()).unwrap_or_default()
    }

    #[test]
    fn stream_hash_is_stable_per_stream_and_keyless_uses_least_conn() {
        let c = config("", "stream-hash");
        let cl = three("edge");
        let snap = cl.snapshot();
        let w = wanted("edge", Some("LiveApp/s1"), false, None);
        let first = id(pick(&c, &snap, &w, &[]));
        for _ in 0..20 {
            assert_eq!(id(pick(&c, &snap, &w, &[])), first);
        }
        // Without a stream, the least-loaded node.
        let leases: Vec<_> = snap.group("edge").unwrap().nodes[..2]
            .iter()
            .map(|n| n.lease())
            .collect();
        assert_eq!(
            id(pick(&c, &snap, &wanted("edge", None, false, None), &[])),
            "e3"
        );
        drop(leases);
    }

    #[test]
    fn a_retry_takes_the_streams_next_node() {
        let c = config("", "stream-hash");
        let cl = three("edge");
        let snap = cl.snapshot();
        let w = wanted("edge", Some("LiveApp/s9"), false, None);
        let order = hash::ranked("LiveApp/s9", &snap.group("edge").unwrap().nodes);
        let first = pick(&c, &snap, &w, &[]).unwrap();
        assert_eq!(first.id(), order[0].id());
        assert_eq!(id(pick(&c, &snap, &w, &[first])), order[1].id());
    }

    #[test]
    fn publish_is_hashed_even_in_a_round_robin_group() {
        let c = config("", "round-robin");
        let cl = three("origin");
        let snap = cl.snapshot();
        let w = wanted("origin", Some("LiveApp/cam"), true, None);
        let first = id(pick(&c, &snap, &w, &[]));
        for _ in 0..10 {
            assert_eq!(id(pick(&c, &snap, &w, &[])), first);
        }
        // Load does not move a publisher off its origin.
        let origin = snap.node(&first).unwrap();
        let _busy: Vec<_> = (0..5).map(|_| origin.lease()).collect();
        assert_eq!(id(pick(&c, &snap, &w, &[])), first);
        // Play in a round-robin group is not hashed.
        let p = wanted("origin", Some("LiveApp/cam"), false, None);
        let seen: std::collections::HashSet<_> =
            (0..6).map(|_| id(pick(&c, &snap, &p, &[]))).collect();
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn home_region_first_then_preference_then_any() {
        let c = config(
            "region = \"eu\"\nregion_preference = [\"eu\", \"us\", \"ap\"]\nregion_header = \"x-region\"",
            "stream-hash",
        );
        let cl = cluster(&[
            ("ap1", "edge", Some("ap")),
            ("eu1", "edge", Some("eu")),
            ("eu2", "edge", Some("eu")),
            ("us1", "edge", Some("us")),
            ("xx1", "edge", None),
        ]);
        let snap = cl.snapshot();
        let edge = &snap.group("edge").unwrap().nodes;
        let node = |id: &str| edge.iter().find(|n| n.id() == id).unwrap().clone();
        for s in 0..20 {
            let key = format!("LiveApp/s{s}");
            let chosen = id(pick(
                &c,
                &snap,
                &wanted("edge", Some(&key), false, None),
                &[],
            ));
            assert!(chosen.starts_with("eu"), "{chosen}");
            // The client's hint wins over the home region.
            let hinted = id(pick(
                &c,
                &snap,
                &wanted("edge", Some(&key), false, Some("ap")),
                &[],
            ));
            assert_eq!(hinted, "ap1");
        }
        node("eu1").set_healthy(false);
        node("eu2").set_draining(true);
        assert_eq!(
            id(pick(
                &c,
                &snap,
                &wanted("edge", Some("a/b"), false, None),
                &[]
            )),
            "us1"
        );
        node("us1").set_healthy(false);
        assert_eq!(
            id(pick(&c, &snap, &wanted("edge", None, false, None), &[])),
            "ap1"
        );
        node("ap1").set_healthy(false);
        // No preferred region left: any node of the group, before the backup group.
        assert_eq!(
            id(pick(&c, &snap, &wanted("edge", None, false, None), &[])),
            "xx1"
        );
    }

    #[test]
    fn backup_group_after_every_region_of_the_group() {
        let c = config("region = \"eu\"", "round-robin");
        let cl = cluster(&[("o1", "origin", Some("eu")), ("e1", "edge", Some("us"))]);
        let snap = cl.snapshot();
        // The edge in another region is still preferred over the home region's origin.
        assert_eq!(
            id(pick(&c, &snap, &wanted("edge", None, false, None), &[])),
            "e1"
        );
        snap.node("e1").unwrap().set_healthy(false);
        assert_eq!(
            id(pick(&c, &snap, &wanted("edge", None, false, None), &[])),
            "o1"
        );
    }

    #[test]
    fn region_header_is_read_when_configured() {
        let c = config("region_header = \"X-Region\"", "round-robin");
        let listener = &c.listeners[0];
        let mut headers = HeaderMap::new();
        headers.insert("x-region", "us".parse().unwrap());
        let route = crate::route::classify("/LiveApp/whip/s1", None);
        let w = Wanted::for_route(&c, listener, &route, &headers);
        assert_eq!(w, wanted("origin", Some("LiveApp/s1"), true, Some("us")));
        let none = config("", "round-robin");
        let w = Wanted::for_route(&none, &none.listeners[0], &route, &headers);
        assert_eq!(w.region, None);
    }
}
