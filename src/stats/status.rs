//! The JSON document behind the status page (`GET /api/v1/status`).
//!
//! Fields whose data comes from parts not every deployment has (reported
//! cpu/memory, membership source health, certificates) are always present:
//! `null` or an empty list when nothing reports them, so the page and any
//! script reading the API never have to guess whether a key exists.

use super::Control;
use crate::cluster::{Cluster, Node};
use crate::metrics::{CODE_CLASSES, Metrics, node_state};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

fn by_class(counts: [u64; 5]) -> Value {
    let map: Map<String, Value> = CODE_CLASSES
        .iter()
        .zip(counts)
        .map(|(class, n)| (class.to_string(), json!(n)))
        .collect();
    Value::Object(map)
}

/// The L4 protocols whose open sessions the page shows per node.
const L4_PROTOCOLS: [&str; 3] = ["rtmp", "rtmps", "srt"];

fn node_json(
    node: &Arc<Node>,
    metrics: &Metrics,
    control: &dyn Control,
    l4: &BTreeMap<String, BTreeMap<String, i64>>,
) -> Value {
    let counters = metrics.known_node(node.id());
    let open = l4.get(node.id());
    let streaming: Map<String, Value> = L4_PROTOCOLS
        .iter()
        .map(|p| {
            let n = open.and_then(|o| o.get(*p)).copied().unwrap_or(0);
            (p.to_string(), json!(n))
        })
        .collect();
    let load = node.reported_load();
    let ratio = |percent: Option<f32>| percent.map(|p| f64::from(p) / 100.0);
    json!({
        "id": node.id(),
        "address": node.http_addr().to_string(),
        "state": node_state(node),
        "healthy": node.is_healthy(),
        "draining": node.is_draining(),
        // Who drained it, when, until when (null: not drained through the API).
        "drain": control.shared().and_then(|d| d.get(node.id())).map(|d| d.to_json()),
        "out": node.is_out(),
        "active_sessions": node.active_sessions(),
        // Sessions on the node over every live amslb instance (`[state]`).
        "cluster_sessions": node.cluster_load(),
        // Open RTMP, RTMPS and SRT sessions relayed to the node (all listeners).
        "l4_sessions": streaming,
        "requests": by_class(counters.as_ref().map(|c| c.requests_by_class()).unwrap_or_default()),
        "connect_failures": counters.as_ref().map(|c| c.connect_failures()).unwrap_or(0),
        // Oldest first; empty until the health checker has run.
        "health_history": control.health_history(node.id()),
        // Reported by the membership source (MongoDB `cpu`/`memory`), 0..1; null when not.
        "cpu": ratio(load.cpu),
        "memory": ratio(load.memory),
    })
}

/// Builds the status document. The configured group names come from
/// `control`, so groups without any node still show (they are the ones an
/// operator worries about).
pub fn status(metrics: &Metrics, cluster: &Cluster, control: &dyn Control) -> Value {
    let groups = control.groups();
    let snapshot = cluster.snapshot();
    let l4 = metrics.l4_open_sessions();
    let mut by_group: BTreeMap<&str, Vec<Value>> =
        groups.iter().map(|g| (g.as_str(), Vec::new())).collect();
    let mut nodes: Vec<&Arc<Node>> = snapshot.nodes().collect();
    nodes.sort_by(|a, b| a.id().cmp(b.id()));
    for node in nodes {
        by_group
            .entry(node.group())
            .or_default()
            .push(node_json(node, metrics, control, &l4));
    }
    let groups: Vec<Value> = by_group
        .into_iter()
        .map(|(name, nodes)| {
            let usable = nodes.iter().filter(|n| n["state"] == "up").count();
            json!({ "name": name, "usable_nodes": usable, "nodes": nodes })
        })
        .collect();
    let listeners: Vec<Value> = metrics
        .listeners()
        .iter()
        .map(|l| {
            json!({
                "name": l.name().as_ref(),
                "requests": by_class(l.requests_by_class()),
                "open_connections": l.open_connections(),
                "open_tunnels": l.open_tunnels(),
            })
        })
        .collect();
    let o = metrics.overview();
    let membership: Vec<Value> = o
        .membership_up
        .iter()
        .map(|(source, up)| {
            let last = o
                .membership_last_update
                .iter()
                .find(|(s, _)| s == source)
                .map(|(_, t)| *t);
            json!({ "source": source, "up": *up == 1.0, "last_update": last })
        })
        .collect();
    let certificates: Vec<Value> = o
        .certificates
        .iter()
        .map(|(name, expires)| json!({ "name": name, "expires": expires }))
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "start_time": o.start_time,
        "config": {
            "last_reload_ok": o.last_reload_ok,
            "loaded_at": o.last_reload_success,
            "reloads_ok": o.reloads_ok,
            "reloads_failed": o.reloads_failed,
            // Settings the file changes that only a restart applies.
            "pending_restart": o.pending_restart,
        },
        "listeners": listeners,
        "groups": groups,
        "membership": membership,
        "certificates": certificates,
        "access_log_dropped": o.access_log_dropped,
        // The other live amslb instances sharing `[state]` (empty without it).
        "instances": control.shared().map_or_else(|| json!([]), |s| s.peers_json()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::fixtures::spec;
    use std::time::Duration;

    #[test]
    fn lists_groups_nodes_states_and_counts() {
        let cluster = Arc::new(Cluster::new());
        cluster.update(vec![spec("e1", "edge", 1)]);
        let metrics = Metrics::new(cluster.clone()).unwrap();
        let snap = cluster.snapshot();
        let node = snap.node("e1").unwrap();
        node.set_draining(true);
        let counters = metrics.node(node);
        let _rtmp = metrics.l4("rtmp", "rtmp").session_opened("e1");
        metrics
            .listener("play")
            .request_done("hls", Some(&counters), 200, Duration::ZERO, 1, 2);
        node.set_reported_load(
            crate::cluster::ReportedLoad {
                cpu: Some(50.0),
                memory: None,
            },
            75.0,
        );
        let doc = status(&metrics, &cluster, &super::super::tests::Fixed);
        let groups = doc["groups"].as_array().unwrap();
        assert_eq!(groups.len(), 2);
        let edge = groups.iter().find(|g| g["name"] == "edge").unwrap();
        let e1 = &edge["nodes"][0];
        assert_eq!(e1["id"], "e1");
        assert_eq!(e1["address"], "127.0.1.1:5080");
        assert_eq!(e1["state"], "draining");
        assert_eq!(e1["requests"]["2xx"], 1);
        assert_eq!(e1["health_history"], json!([true, false]));
        assert_eq!(e1["cpu"], 0.5);
        assert_eq!(e1["l4_sessions"], json!({"rtmp": 1, "rtmps": 0, "srt": 0}));
        assert!(e1["memory"].is_null());
        assert_eq!(edge["usable_nodes"], 0);
        let origin = groups.iter().find(|g| g["name"] == "origin").unwrap();
        assert_eq!(origin["nodes"], json!([]));
        assert_eq!(doc["listeners"][0]["name"], "play");
        assert_eq!(doc["listeners"][0]["requests"]["2xx"], 1);
        assert_eq!(doc["config"]["last_reload_ok"], true);
        assert_eq!(doc["config"]["pending_restart"], json!([]));
        metrics.set_pending_restart(&["global.workers".to_string()]);
        let doc = status(&metrics, &cluster, &super::super::tests::Fixed);
        assert_eq!(doc["config"]["pending_restart"], json!(["global.workers"]));
    }
}
