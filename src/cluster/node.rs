//! One AMS node as the balancer sees it: where it is, which group it serves, and
//! its live state (health, draining, open sessions), kept in atomics so the data
//! path reads it without locks.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

/// What a membership source says about a node: enough to build or match a
/// [`Node`]. Serialisable so an upgrade can hand the membership on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// UDP port of the node's SRT server (AMS 4200).
    pub srt_port: u16,
    /// Operator asked for no new sessions on this node.
    pub drain: bool,
    /// Region the node is in, if the source knows it.
    pub region: Option<String>,
}

impl NodeSpec {
    /// A node on the AMS default ports (HTTP 5080, RTMP 1935, SRT 4200), for tests.
    #[cfg(test)]
    pub(crate) fn on_default_ports(id: &str, group: &str, addr: IpAddr) -> Self {
        Self {
            id: id.into(),
            group: group.into(),
            addr,
            http_port: 5080,
            rtmp_port: 1935,
            srt_port: 4200,
            drain: false,
            region: None,
        }
    }
}

/// A node with its live state. Shared (`Arc`) between membership snapshots, so
/// counters and health survive membership updates that keep the node.
#[derive(Debug)]
pub struct Node {
    spec: NodeSpec,
    /// Sessions (requests in flight, tunnels) this balancer has open on the node.
    active: AtomicUsize,
    /// Sessions the other amslb instances reported open on the node (`[state]` heartbeats).
    remote: AtomicUsize,
    /// Last verdict of the health checks; nodes start up so a fresh balancer serves at once.
    healthy: AtomicBool,
    /// No new sessions, existing ones continue.
    draining: AtomicBool,
    /// A drain is complete (its deadline passed or no session is left):
    /// sticky clients leave too; open tunnels still run to their end.
    out: AtomicBool,
    /// The membership source has not heard from the node for too long.
    stale: AtomicBool,
    /// Reported cpu use in percent, as `f32` bits; NaN means unknown.
    cpu: AtomicU32,
    /// Reported memory use in percent, as `f32` bits; NaN means unknown.
    memory: AtomicU32,
    /// Reported load is at or over the source's threshold.
    overloaded: AtomicBool,
    /// Share of new sessions offered, in thousandths: below [`FULL_WEIGHT`]
    /// while the node slow-starts after coming back (see `health`).
    weight: AtomicU32,
}

/// Load figures a node reports about itself (AMS writes them to MongoDB).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReportedLoad {
    /// Cpu use in percent, if known.
    pub cpu: Option<f32>,
    /// Memory use in percent, if known.
    pub memory: Option<f32>,
}

impl ReportedLoad {
    /// Whether either figure is at or over `threshold` percent; unknown counts as room.
    pub fn is_over(&self, threshold: f32) -> bool {
        [self.cpu, self.memory]
            .into_iter()
            .flatten()
            .any(|v| v >= threshold)
    }
}

fn store_percent(cell: &AtomicU32, value: Option<f32>) {
    cell.store(value.unwrap_or(f32::NAN).to_bits(), Ordering::Relaxed);
}

fn load_percent(cell: &AtomicU32) -> Option<f32> {
    Some(f32::from_bits(cell.load(Ordering::Relaxed))).filter(|v| !v.is_nan())
}
/// Weight of a node that takes its full share of new sessions.
pub const FULL_WEIGHT: u32 = 1000;

impl Node {
    /// Creates a node in the up state.
    pub fn new(spec: NodeSpec) -> Self {
        let draining = AtomicBool::new(spec.drain);
        Self {
            spec,
            active: AtomicUsize::new(0),
            remote: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            draining,
            out: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            cpu: AtomicU32::new(f32::NAN.to_bits()),
            memory: AtomicU32::new(f32::NAN.to_bits()),
            overloaded: AtomicBool::new(false),
            weight: AtomicU32::new(FULL_WEIGHT),
        }
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

    /// Region, if known.
    pub fn region(&self) -> Option<&str> {
        self.spec.region.as_deref()
    }

    /// Address of the node's HTTP server.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.spec.addr, self.spec.http_port)
    }

    /// Address of the node's RTMP server.
    pub fn rtmp_addr(&self) -> SocketAddr {
        SocketAddr::new(self.spec.addr, self.spec.rtmp_port)
    }

    /// Address of the node's SRT server (UDP).
    pub fn srt_addr(&self) -> SocketAddr {
        SocketAddr::new(self.spec.addr, self.spec.srt_port)
    }

    /// Whether the node may take a new session.
    pub fn is_usable(&self) -> bool {
        self.is_healthy() && !self.is_draining() && !self.is_stale()
    }

    /// Whether the membership source considers the node's heartbeat too old.
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    /// Marks the heartbeat too old (or fresh again); returns the previous state.
    pub fn set_stale(&self, stale: bool) -> bool {
        self.stale.swap(stale, Ordering::Relaxed)
    }

    /// The load the node last reported.
    pub fn reported_load(&self) -> ReportedLoad {
        ReportedLoad {
            cpu: load_percent(&self.cpu),
            memory: load_percent(&self.memory),
        }
    }

    /// Records reported load; the node counts as overloaded when either figure
    /// is at or over `threshold` percent.
    pub fn set_reported_load(&self, load: ReportedLoad, threshold: f32) {
        store_percent(&self.cpu, load.cpu);
        store_percent(&self.memory, load.memory);
        self.overloaded
            .store(load.is_over(threshold), Ordering::Relaxed);
    }

    /// Whether the node reported load at or over its threshold: it should get
    /// new sessions only when no other node of its group has room.
    pub fn is_overloaded(&self) -> bool {
        self.overloaded.load(Ordering::Relaxed)
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

    /// Whether the node's drain is complete: sticky clients leave it too.
    pub fn is_out(&self) -> bool {
        self.out.load(Ordering::Relaxed)
    }

    /// Marks the drain complete (or not); returns the previous state.
    pub fn set_out(&self, out: bool) -> bool {
        self.out.swap(out, Ordering::Relaxed)
    }

    /// Share of new sessions offered, 0..=[`FULL_WEIGHT`].
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Sets the share of new sessions (clamped to [`FULL_WEIGHT`]).
    pub fn set_weight(&self, weight: u32) {
        self.weight
            .store(weight.min(FULL_WEIGHT), Ordering::Relaxed);
    }

    /// Sessions open on the node through this balancer.
    pub fn active_sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Records the sessions the other instances reported open on the node.
    pub fn set_remote_sessions(&self, sessions: usize) {
        self.remote.store(sessions, Ordering::Relaxed);
    }

    /// The node's load over every amslb instance: its sessions here plus what
    /// the live peers last reported (just the sessions here without `[state]`).
    /// Least-conn and the stream-hash load bound place by this.
    pub fn cluster_load(&self) -> usize {
        self.active_sessions() + self.remote.load(Ordering::Relaxed)
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
        NodeSpec::on_default_ports(id, group, IpAddr::from([127, 0, 1, last_octet]))
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

    #[test]
    fn stale_node_is_not_usable() {
        let node = Node::new(spec("a", "origin", 1));
        assert!(!node.set_stale(true));
        assert!(!node.is_usable());
        node.set_stale(false);
        assert!(node.is_usable());
    }

    #[test]
    fn reported_load_sets_overloaded_at_threshold() {
        let node = Node::new(spec("a", "origin", 1));
        assert_eq!(node.reported_load(), ReportedLoad::default());
        assert!(!node.is_overloaded());
        let busy = ReportedLoad {
            cpu: Some(75.0),
            memory: None,
        };
        node.set_reported_load(busy, 75.0);
        assert!(node.is_overloaded());
        assert_eq!(node.reported_load(), busy);
        let memory_bound = ReportedLoad {
            cpu: Some(10.0),
            memory: Some(90.0),
        };
        node.set_reported_load(memory_bound, 75.0);
        assert!(node.is_overloaded());
        node.set_reported_load(ReportedLoad::default(), 75.0);
        assert!(!node.is_overloaded(), "unknown load counts as room");
        // Overload steers, it does not forbid: the node stays usable.
        assert!(node.is_usable());
    }
}
