//! The static membership source: the `[[cluster.node]]` entries of the config.

use super::NodeSpec;
use crate::config::ClusterConfig;

/// Turns the configured node list into specs, filling in cluster-wide port defaults.
pub fn specs(cluster: &ClusterConfig) -> Vec<NodeSpec> {
    cluster
        .nodes
        .iter()
        .map(|n| NodeSpec {
            id: n.id.clone(),
            group: n.group.clone(),
            addr: n.address,
            http_port: n.http_port.unwrap_or(cluster.http_port),
            rtmp_port: n.rtmp_port.unwrap_or(cluster.rtmp_port),
            srt_port: n.srt_port.unwrap_or(cluster.srt_port),
            drain: n.drain,
            region: n.region.clone(),
        })
        .collect()
}
