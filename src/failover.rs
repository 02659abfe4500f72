//! Finding a node that answers: pick with the one placement function
//! ([`crate::streaming::select::pick`]), try to connect, and on failure pick
//! again without the nodes already tried, up to `retries` extra attempts.
//!
//! One loop for every proxy: HTTP (where an attempt is a pooled or fresh
//! HTTP/1 connection) and the L4 listeners (a TCP connect to the node's RTMP
//! port), so failures feed passive health, `amslb_node_connect_failures_total`
//! and `amslb_retries_total` the same way whatever the protocol. What an
//! attempt is stays with the caller: [`Failover::connect`] is generic over it.

use crate::cluster::{Membership, Node, NodeLease};
use crate::config::Config;
use crate::health::Health;
use crate::metrics::{ListenerMetrics, Metrics};
use crate::streaming::select::{self, Wanted};
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;

/// Where failed attempts are reported.
#[derive(Debug, Clone, Copy)]
pub struct Reporting<'a> {
    /// Passive health checks: each failed connect counts against the node.
    pub health: &'a Health,
    /// Node counters (`amslb_node_connect_failures_total`).
    pub metrics: &'a Metrics,
    /// The listener's counters (`amslb_retries_total`).
    pub listener: &'a ListenerMetrics,
}

/// A node that accepted the connection.
#[derive(Debug)]
pub struct Connected<T> {
    /// What the attempt produced (a stream, an HTTP sender, ...).
    pub conn: T,
    /// Counts the session on the node until dropped; taken before connecting
    /// so concurrent picks already see it.
    pub lease: NodeLease,
}

/// Why no node could be connected.
#[derive(Debug, thiserror::Error)]
pub enum Failure<E> {
    /// The group and its backup have no usable node left to try.
    #[error("no usable node")]
    NoNode,
    /// Every allowed attempt failed; the last error is kept.
    #[error("{attempts} connect attempt(s) failed, last to node {node}: {source}")]
    AllFailed {
        /// Attempts made.
        attempts: usize,
        /// Id of the last node tried.
        node: String,
        /// Why the last attempt failed.
        source: E,
    },
}

/// One session's search for a node. Keeps what was tried across calls of
/// [`Failover::connect`], so a caller that must connect again (HTTP: the
/// pooled connection closed under the request) goes on where it was.
#[derive(Debug)]
pub struct Failover<'a> {
    config: &'a Config,
    snapshot: &'a Membership,
    wanted: &'a Wanted,
    report: Reporting<'a>,
    first: Option<Arc<Node>>,
    tried: Vec<Arc<Node>>,
    attempts_left: u32,
    first_failed: bool,
}

impl<'a> Failover<'a> {
    /// A search for `wanted` over `snapshot`, with `global.retries` extra attempts.
    pub fn new(
        config: &'a Config,
        snapshot: &'a Membership,
        wanted: &'a Wanted,
        report: Reporting<'a>,
    ) -> Self {
        Self {
            config,
            snapshot,
            wanted,
            report,
            first: None,
            tried: Vec::new(),
            attempts_left: config.global.retries.saturating_add(1),
            first_failed: false,
        }
    }

    /// Tries `node` before anything the placement picks (a sticky client's node).
    pub fn first(mut self, node: Option<Arc<Node>>) -> Self {
        self.first = node;
        self
    }

    /// Whether the node given to [`Failover::first`] was tried and failed.
    pub fn first_failed(&self) -> bool {
        self.first_failed
    }

    /// Picks a node and runs `attempt` on it, moving on to another node on
    /// failure until one connects, no node is left, or the attempts are used up.
    pub async fn connect<T, E, F, Fut>(
        &mut self,
        mut attempt: F,
    ) -> Result<Connected<T>, Failure<E>>
    where
        E: Display,
        F: FnMut(Arc<Node>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut last: Option<(String, E)> = None;
        loop {
            let first = self
                .first
                .clone()
                .filter(|n| !self.tried.iter().any(|t| Arc::ptr_eq(t, n)));
            let is_first = first.is_some();
            let node = first
                .or_else(|| select::pick(self.config, self.snapshot, self.wanted, &self.tried));
            let Some(node) = node else {
                return Err(match last {
                    Some((node, source)) => Failure::AllFailed {
                        attempts: self.tried.len(),
                        node,
                        source,
                    },
                    None => Failure::NoNode,
                });
            };
            let lease = node.lease();
            let error = match attempt(node.clone()).await {
                Ok(conn) => return Ok(Connected { conn, lease }),
                Err(e) => e,
            };
            self.report
                .health
                .report_failure(&node, &format!("connect failed: {error}"));
            self.report.metrics.with_node(&node, |m| m.connect_failed());
            self.first_failed |= is_first;
            self.tried.push(node.clone());
            self.attempts_left = self.attempts_left.saturating_sub(1);
            if self.attempts_left == 0 {
                tracing::warn!(node = node.id(), error = %error, "connect failed, no attempt left");
                return Err(Failure::AllFailed {
                    attempts: self.tried.len(),
                    node: node.id().to_string(),
                    source: error,
                });
            }
            tracing::warn!(node = node.id(), error = %error, "connect failed, trying another node");
            self.report.listener.retry();
            last = Some((node.id().to_string(), error));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Cluster, NodeSpec};
    use std::net::IpAddr;

    fn config(retries: u32) -> Config {
        let text = format!(
            "[global]\nretries = {retries}\n[health]\npassive_failures = 1\n\
             [[group]]\nname = \"origin\"\nbackup = \"spare\"\n[[group]]\nname = \"spare\"\n[cluster]\n"
        );
        crate::config::parse_str(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .config
    }

    fn cluster(nodes: &[(&str, &str)]) -> Arc<Cluster> {
        let cluster = Arc::new(Cluster::new());
        cluster.update(
            nodes
                .iter()
                .enumerate()
                .map(|(i, (id, group))| {
                    NodeSpec::on_default_ports(id, group, IpAddr::from([127, 0, 9, i as u8 + 1]))
                })
                .collect(),
        );
        cluster
    }

    /// Everything a failover needs, for `nodes` with `retries`.
    struct Fixture {
        config: Config,
        cluster: Arc<Cluster>,
        snapshot: Arc<Membership>,
        health: Arc<Health>,
        metrics: Metrics,
        listener: Arc<ListenerMetrics>,
        wanted: Wanted,
    }

    impl Fixture {
        fn new(retries: u32, nodes: &[(&str, &str)], listener: &str) -> Self {
            let config = config(retries);
            let cluster = cluster(nodes);
            let metrics = Metrics::new(cluster.clone()).unwrap();
            Self {
                health: Health::new(&config),
                snapshot: cluster.snapshot(),
                listener: metrics.listener(listener),
                wanted: wanted(),
                config,
                cluster,
                metrics,
            }
        }

        fn report(&self) -> Reporting<'_> {
            Reporting {
                health: &self.health,
                metrics: &self.metrics,
                listener: &self.listener,
            }
        }
    }

    fn wanted() -> Wanted {
        Wanted {
            group: "origin".into(),
            key: Some("LiveApp/s1".into()),
            publish: true,
            region: None,
        }
    }

    #[tokio::test]
    async fn failures_are_reported_counted_and_retried_elsewhere() {
        let f = Fixture::new(
            2,
            &[("o1", "origin"), ("o2", "origin"), ("s1", "spare")],
            "rtmp",
        );
        let (config, snapshot, wanted, report) = (&f.config, &f.snapshot, &f.wanted, f.report());
        let mut failover = Failover::new(config, snapshot, wanted, report);
        let mut seen = Vec::new();
        let got = failover
            .connect(|node| {
                seen.push(node.id().to_string());
                let ok = node.group() == "spare";
                async move {
                    if ok {
                        Ok(node.id().to_string())
                    } else {
                        Err("refused")
                    }
                }
            })
            .await
            .unwrap();
        // Both origins (in the stream's hash order), then the backup group.
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(got.conn, "s1");
        assert_eq!(got.lease.node().active_sessions(), 1);
        for id in ["o1", "o2"] {
            assert_eq!(f.metrics.known_node(id).unwrap().connect_failures(), 1);
            assert!(!snapshot.node(id).unwrap().is_healthy(), "{id} marked down");
        }
        let text = f.metrics.render(&f.cluster);
        assert!(
            text.contains("amslb_retries_total{listener=\"rtmp\"} 2"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn attempts_are_bounded_and_no_node_is_told_apart() {
        let f = Fixture::new(
            1,
            &[("o1", "origin"), ("o2", "origin"), ("o3", "origin")],
            "l",
        );
        let (config, snapshot, wanted, report) = (&f.config, &f.snapshot, &f.wanted, f.report());
        let mut failover = Failover::new(config, snapshot, wanted, report);
        let err = failover
            .connect(|_| async { Err::<(), _>("refused") })
            .await
            .unwrap_err();
        assert!(
            matches!(err, Failure::AllFailed { attempts: 2, .. }),
            "{err}"
        );
        assert!(
            snapshot.nodes().all(|n| n.active_sessions() == 0),
            "leases released"
        );
        let empty = Cluster::new().snapshot();
        let mut failover = Failover::new(config, &empty, wanted, report);
        let err = failover
            .connect(|_| async { Ok::<_, &str>(()) })
            .await
            .unwrap_err();
        assert!(matches!(err, Failure::NoNode));
    }

    #[tokio::test]
    async fn the_first_node_is_tried_first_and_its_failure_noted() {
        let f = Fixture::new(2, &[("o1", "origin"), ("o2", "origin")], "l");
        let (config, snapshot, wanted, report) = (&f.config, &f.snapshot, &f.wanted, f.report());
        let placed = select::pick(config, snapshot, wanted, &[]).unwrap();
        let other = snapshot
            .nodes()
            .find(|n| !Arc::ptr_eq(n, &placed))
            .unwrap()
            .clone();
        let mut failover =
            Failover::new(config, snapshot, wanted, report).first(Some(other.clone()));
        let target = other.clone();
        let got = failover
            .connect(|n| {
                let bad = Arc::ptr_eq(&n, &target);
                async move { if bad { Err("down") } else { Ok(()) } }
            })
            .await
            .unwrap();
        assert!(failover.first_failed());
        assert!(Arc::ptr_eq(got.lease.node(), &placed));
    }
}
