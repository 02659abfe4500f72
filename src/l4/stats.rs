//! Counters of one L4 listener, kept in atomics so relays update them without
//! locks; the metrics exporter reads them with [`L4Stats::snapshot`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one `tcp`, `tls` or `udp` listener.
#[derive(Debug, Default)]
pub struct L4Stats {
    /// Connections accepted (TCP) or sessions opened (UDP), ever.
    connections: AtomicU64,
    /// Sessions open right now.
    active: AtomicU64,
    /// Bytes from clients to nodes (payload, after TLS).
    bytes_in: AtomicU64,
    /// Bytes from nodes to clients.
    bytes_out: AtomicU64,
    /// Sessions that ended without reaching a node (no usable node, every connect failed).
    no_node: AtomicU64,
    /// Sessions closed because the client's start was malformed or too slow
    /// (bad TLS or RTMP handshake, handshake timeout) or over the session cap.
    rejected: AtomicU64,
    /// RTMP publish commands seen by the inspector.
    rtmp_publishes: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L4StatsSnapshot {
    /// See [`L4Stats`] field of the same name.
    pub connections: u64,
    /// Sessions open right now.
    pub active: u64,
    /// Bytes from clients to nodes.
    pub bytes_in: u64,
    /// Bytes from nodes to clients.
    pub bytes_out: u64,
    /// Sessions that found no node.
    pub no_node: u64,
    /// Sessions refused or closed for a malformed or slow start.
    pub rejected: u64,
    /// RTMP publish commands seen.
    pub rtmp_publishes: u64,
}

impl L4Stats {
    /// Counts a new session as accepted and open until the guard is dropped.
    pub fn open(self: &Arc<Self>) -> ActiveGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// Adds relayed client→node bytes.
    pub fn add_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Adds relayed node→client bytes.
    pub fn add_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a session that found no node to relay to.
    pub fn count_no_node(&self) {
        self.no_node.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a session refused for a malformed or slow start, or over the cap.
    pub fn count_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an RTMP publish seen by the inspector.
    pub fn count_publish(&self) {
        self.rtmp_publishes.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> L4StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        L4StatsSnapshot {
            connections: get(&self.connections),
            active: get(&self.active),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            no_node: get(&self.no_node),
            rejected: get(&self.rejected),
            rtmp_publishes: get(&self.rtmp_publishes),
        }
    }
}

/// Keeps a session counted as active; dropping it ends the session.
#[derive(Debug)]
pub struct ActiveGuard(Arc<L4Stats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_active_sessions() {
        let stats = Arc::new(L4Stats::default());
        let a = stats.open();
        let b = stats.open();
        stats.add_in(10);
        stats.add_out(3);
        assert_eq!(stats.snapshot().active, 2);
        drop(a);
        drop(b);
        let s = stats.snapshot();
        assert_eq!(
            (s.connections, s.active, s.bytes_in, s.bytes_out),
            (2, 0, 10, 3)
        );
    }
}
