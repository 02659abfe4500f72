//! Finding a node for a new L4 session: pick one of the listener's group (or its
//! backup group) with the group's balancing, connect with the connect timeout,
//! and on failure try another node, all before any byte is relayed.

use super::affinity;
use crate::balance;
use crate::cluster::{Cluster, Membership, Node, NodeLease};
use crate::config::{BalanceMode, Config};
use crate::health::Health;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Where a listener's sessions go: its group, that group's balancing, and the
/// group to fall back to when none of its nodes is usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRoute {
    /// The listener's `default_group`.
    pub group: String,
    /// Balancing of that group.
    pub balance: BalanceMode,
    /// The group's `backup`, with that group's own balancing.
    pub backup: Option<(String, BalanceMode)>,
}

impl GroupRoute {
    /// Resolves `group` against the config (an unknown group balances round-robin;
    /// validation refuses such configs anyway).
    pub fn new(config: &Config, group: &str) -> Self {
        let mode = |name: &str| config.group(name).map(|g| g.balance).unwrap_or_default();
        let backup = config.group(group).and_then(|g| g.backup.clone()).map(|b| {
            let m = mode(&b);
            (b, m)
        });
        Self {
            group: group.to_string(),
            balance: mode(group),
            backup,
        }
    }

    /// Picks a usable node not in `tried`, from the group or else its backup:
    /// by `key` affinity when there is a key, else with the group's balancing.
    pub fn pick(
        &self,
        snapshot: &Membership,
        tried: &[Arc<Node>],
        key: Option<&str>,
    ) -> Option<Arc<Node>> {
        let from = |name: &str, mode| {
            snapshot.group(name).and_then(|members| match key {
                Some(key) => affinity::pick(members, key, tried),
                None => balance::pick(mode, members, tried),
            })
        };
        from(&self.group, self.balance).or_else(|| {
            self.backup
                .as_ref()
                .and_then(|(name, mode)| from(name, *mode))
        })
    }
}

/// Why no node could be reached.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The group and its backup have no usable node.
    #[error("no usable node in group {group:?}")]
    NoNode {
        /// The group asked for.
        group: String,
    },
    /// Every attempt failed; the last failure is kept.
    #[error("{attempts} connect attempt(s) failed, last to {addr}: {source}")]
    ConnectFailed {
        /// How many nodes were tried.
        attempts: usize,
        /// Address of the last node tried.
        addr: SocketAddr,
        /// Why the last attempt failed.
        source: io::Error,
    },
}

/// How to reach nodes: the port to use and the connect limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectPolicy {
    /// The node's address for this kind of traffic (RTMP port, ...).
    pub addr_of: fn(&Node) -> SocketAddr,
    /// Time allowed per connect attempt.
    pub timeout: Duration,
    /// Extra nodes to try after the first failed connect.
    pub retries: u32,
}

/// Connects to a node chosen by `route` from the current membership (by
/// `key` affinity when given), retrying on other nodes; failures are reported
/// to `health` as passive checks. The returned lease counts the session on
/// the node (least-conn) until dropped.
pub async fn connect(
    cluster: &Cluster,
    route: &GroupRoute,
    policy: ConnectPolicy,
    key: Option<&str>,
    health: Option<&Health>,
) -> Result<(TcpStream, NodeLease), UpstreamError> {
    let snapshot = cluster.snapshot();
    let mut tried: Vec<Arc<Node>> = Vec::new();
    let mut last: Option<(SocketAddr, io::Error)> = None;
    for _ in 0..=policy.retries {
        let Some(node) = route.pick(&snapshot, &tried, key) else {
            break;
        };
        let addr = (policy.addr_of)(&node);
        // Leased before connecting so that concurrent picks already see it.
        let lease = node.lease();
        tried.push(node);
        match tokio::time::timeout(policy.timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                // No Nagle delay for RTMP control messages; keepalive notices a
                // node that vanished without a FIN.
                crate::listener::tune_stream(&stream);
                return Ok((stream, lease));
            }
            Ok(Err(e)) => last = Some((addr, e)),
            Err(_) => last = Some((addr, io::ErrorKind::TimedOut.into())),
        }
        if let Some((_, e)) = &last {
            tracing::warn!(node = lease.node().id(), %addr, error = %e, "connect to node failed");
            if let Some(health) = health {
                health.report_failure(lease.node(), &format!("connect failed: {e}"));
            }
        }
    }
    Err(match last {
        Some((addr, source)) => UpstreamError::ConnectFailed {
            attempts: tried.len(),
            addr,
            source,
        },
        None => UpstreamError::NoNode {
            group: route.group.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::NodeSpec;
    use std::net::IpAddr;
    use tokio::net::TcpListener;

    fn spec(id: &str, group: &str, port: u16) -> NodeSpec {
        NodeSpec {
            rtmp_port: port,
            ..NodeSpec::on_default_ports(id, group, IpAddr::from([127, 0, 0, 1]))
        }
    }

    fn policy(retries: u32) -> ConnectPolicy {
        ConnectPolicy {
            addr_of: Node::rtmp_addr,
            timeout: Duration::from_secs(2),
            retries,
        }
    }

    fn route(backup: bool) -> GroupRoute {
        GroupRoute {
            group: "origin".into(),
            balance: BalanceMode::RoundRobin,
            backup: backup.then(|| ("spare".to_string(), BalanceMode::LeastConn)),
        }
    }

    /// A port with nothing listening: bind, read the port, close.
    async fn dead_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn failed_connect_moves_on_to_a_live_node() {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cluster = Cluster::new();
        cluster.update(vec![
            spec("a-dead", "origin", dead_port().await),
            spec("b-live", "origin", live.local_addr().unwrap().port()),
        ]);
        for _ in 0..4 {
            let (_s, lease) = connect(&cluster, &route(false), policy(1), None, None)
                .await
                .unwrap();
            assert_eq!(lease.node().id(), "b-live");
            assert_eq!(lease.node().active_sessions(), 1);
        }
    }

    #[tokio::test]
    async fn retries_are_bounded_and_error_names_the_address() {
        let cluster = Cluster::new();
        let ports = [dead_port().await, dead_port().await, dead_port().await];
        cluster.update(
            ports
                .iter()
                .enumerate()
                .map(|(i, p)| spec(&format!("n{i}"), "origin", *p))
                .collect(),
        );
        let err = connect(&cluster, &route(false), policy(1), None, None)
            .await
            .unwrap_err();
        match err {
            UpstreamError::ConnectFailed { attempts, .. } => assert_eq!(attempts, 2),
            other => panic!("unexpected {other}"),
        }
        assert!(
            cluster.snapshot().nodes().all(|n| n.active_sessions() == 0),
            "leases released"
        );
    }

    #[tokio::test]
    async fn empty_group_falls_back_to_backup_then_reports_no_node() {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cluster = Cluster::new();
        cluster.update(vec![spec("s1", "spare", live.local_addr().unwrap().port())]);
        let (_s, lease) = connect(&cluster, &route(true), policy(0), None, None)
            .await
            .unwrap();
        assert_eq!(lease.node().id(), "s1");
        let err = connect(&cluster, &route(false), policy(0), None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::NoNode { .. }), "{err}");
    }

    #[tokio::test]
    async fn failed_connects_are_reported_to_passive_health() {
        let text = "[health]\npassive_failures = 2\n[[group]]\nname = \"origin\"\n[cluster]\n";
        let config = crate::config::parse_str(text, std::path::Path::new("t.toml"))
            .unwrap()
            .config;
        let health = Health::new(&config);
        let cluster = Cluster::new();
        cluster.update(vec![spec("dead", "origin", dead_port().await)]);
        for _ in 0..2 {
            let _ = connect(&cluster, &route(false), policy(0), None, Some(&health)).await;
        }
        assert!(!cluster.snapshot().node("dead").unwrap().is_healthy());
        assert!(
            health
                .history("dead")
                .iter()
                .any(|c| c.outcome.to_string().contains("connect failed")),
            "{:?}",
            health.history("dead")
        );
    }
}
