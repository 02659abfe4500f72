//! One AMS node as the balancer sees it: where it is, which group it serves, and
//! its live state (health, draining, open sessions), kept in atomics so the data
//! path reads it without locks.

use crate::http::pool::Pool;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// What a membership source says about a node: enough to build or match a [`Node`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Stable id (config `id`, or `_id` in MongoDB).
    pub id: String,
    /// Group the node serves.
    pub group: String,
    /// The node's address.
    pub addr: IpAddr,
    /// Port of the node's HTTP server (AMS 5080).
    pub http_port: u16,
    /// Port of the node's RTMP server (AMS 1935).
    pub rtmp_port: u16,
    /// Operator asked for no new sessions on this node.
    pub drain: bool,
}

/// A node with its live state. Shared (`Arc`) between membership snapshots, so
/// counters and health survive membership updates that keep the node.
#[derive(Debug)]
pub struct Node {
    spec: NodeSpec,
    /// Sessions (requests in flight, tunnels) this balancer has open on the node.
    active: AtomicUsize,
    /// Last verdict of the health checks; nodes start up so a fresh balancer serves at once.
    healthy: AtomicBool,
    /// No new sessions, existing ones continue.
    draining: AtomicBool,
    /// Idle keep-alive HTTP connections to the node.
    pool: Arc<Pool>,
}

impl Node {
    /// Creates a node in the up state.
    pub fn new(spec: NodeSpec) -> Self {
        let draining = AtomicBool::new(spec.drain);
        Self {
            spec,
            active: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            draining,
            pool: Arc::default(),
        }
    }

    /// Idle keep-alive HTTP connections to the node.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The description this node was built from.
    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// Node id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Group name.
    pub fn group(&self) -> &str {
        &self.spec.group
    }

    /// Address of the node's HTTP server.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.spec.addr, self.spec.http_port)
    }

    /// Address of the node's RTMP server.
    pub fn rtmp_addr(&self) -> SocketAddr {
        SocketAddr::new(self.spec.addr, self.spec.rtmp_port)
    }

    /// Whether the node may take a new session.
    pub fn is_usable(&self) -> bool {
        self.is_healthy() && !self.is_draining()
    }

    /// Last health verdict.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records a health verdict; returns the previous one.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed)
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts or stops draining; returns the previous state.
    pub fn set_draining(&self, draining: bool) -> bool {
        self.draining.swap(draining, Ordering::Relaxed)
    }

    /// Sessions open on the node through this balancer.
    pub fn active_sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a session on the node until the returned lease is dropped.
    pub fn lease(self: &Arc<Self>) -> NodeLease {
        self.active.fetch_add(1, Ordering::Relaxed);
        NodeLease(self.clone())
    }
}

/// An open session on a node; dropping it ends the session for least-conn.
#[derive(Debug)]
pub struct NodeLease(Arc<Node>);

impl NodeLease {
    /// The node this session is on.
    pub fn node(&self) -> &Arc<Node> {
        &self.0
    }
}

impl Drop for NodeLease {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(id: &str, group: &str, last_octet: u8) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            group: group.into(),
            addr: IpAddr::from([127, 0, 1, last_octet]),
            http_port: 5080,
            rtmp_port: 1935,
            drain: false,
        }
    }

    #[test]
    fn lease_counts_sessions() {
        let node = Arc::new(Node::new(spec("a", "origin", 1)));
        let first = node.lease();
        let second = node.lease();
        assert_eq!(node.active_sessions(), 2);
        drop(first);
        assert_eq!(node.active_sessions(), 1);
        drop(second);
        assert_eq!(node.active_sessions(), 0);
    }

    #[test]
    fn usable_needs_healthy_and_not_draining() {
        let node = Node::new(spec("a", "origin", 1));
        assert!(node.is_usable());
        node.set_draining(true);
        assert!(!node.is_usable());
        node.set_draining(false);
        node.set_healthy(false);
        assert!(!node.is_usable());
    }
}
