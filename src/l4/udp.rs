//! `udp` listeners (SRT): one session per client address, bound to one node for
//! its life, relayed both ways through a connected socket of its own, ended
//! after `session_idle` without a datagram either way.
//!
//! Datagrams are relayed as they are, never parsed, so garbage cannot hurt the
//! balancer; the node judges it. A datagram from an address without a session
//! (new, or expired) opens one, unless `max_sessions` are open: then it is
//! dropped, which bounds sockets and memory under a spoofed-source flood.

use super::meter::SessionMeter;
use crate::cluster::NodeLease;
use crate::config::ListenerConfig;
use crate::metrics::{L4Metrics, OpenGuard};
use crate::runtime::{ListenerView, Runtime};
use crate::streaming::select::{self, Wanted};
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// Longest a datagram may wait for a node socket to accept it. A fresh
/// socket is not known writable until the reactor has polled it once, and a
/// full send buffer must not stall every client of the listener for long: past
/// this the datagram is dropped (UDP may drop; SRT retransmits).
const SEND_WAIT: Duration = Duration::from_millis(10);

/// Largest datagram relayed (the UDP maximum); SRT uses about 1500 bytes.
const MAX_DATAGRAM: usize = 65_535;

/// One client's session: its socket towards the node, and what it holds open.
#[derive(Debug)]
struct Session {
    to_node: UdpSocket,
    meter: SessionMeter,
    lease: NodeLease,
    /// `session_idle` as configured when the session opened.
    idle: Duration,
    _open: OpenGuard,
    _connection: OpenGuard,
}

/// A running `udp` listener's shared state. Group, balancing, backup,
/// `session_idle` and `max_sessions` are read from the live config when a
/// session opens, so a reload applies to new sessions.
#[derive(Debug)]
pub struct UdpProxy {
    runtime: Arc<Runtime>,
    name: Arc<str>,
    metrics: Arc<L4Metrics>,
    /// Open sessions by client address. The lock is held for map operations
    /// only, never across I/O.
    sessions: Mutex<HashMap<SocketAddr, Arc<Session>>>,
}

impl UdpProxy {
    /// Builds the proxy of `listener`.
    pub fn new(runtime: &Arc<Runtime>, listener: &ListenerConfig) -> Self {
        Self {
            runtime: runtime.clone(),
            name: listener.name.as_str().into(),
            metrics: runtime.metrics.l4(&listener.name, "srt"),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sessions open now.
    pub fn session_count(&self) -> usize {
        self.sessions().len()
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Session>>> {
        // A panic elsewhere while holding the lock leaves a usable map.
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Receives client datagrams on `socket` until `shutdown` is cancelled.
    pub async fn serve(self: Arc<Self>, socket: Arc<UdpSocket>, shutdown: CancellationToken) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                r = socket.recv_from(&mut buf) => r,
            };
            let (n, peer) = match received {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!(listener = %self.name, error = %e, "udp receive failed");
                    continue;
                }
            };
            let existing = self.sessions().get(&peer).cloned();
            let session = match existing {
                Some(s) => s,
                None => match self.open(peer, &socket, &shutdown).await {
                    Some(s) => s,
                    None => continue,
                },
            };
            match send_bounded(&session.to_node, &buf[..n]).await {
                Ok(sent) => session.meter.add_in(sent),
                Err(e) => {
                    tracing::debug!(listener = %self.name, %peer, error = %e, "datagram to node dropped")
                }
            }
        }
    }

    /// Opens a session for `peer` on a node, or `None` (over the cap, no node).
    async fn open(
        self: &Arc<Self>,
        peer: SocketAddr,
        listener: &Arc<UdpSocket>,
        shutdown: &CancellationToken,
    ) -> Option<Arc<Session>> {
        let name = &self.name;
        // A reload that removed the listener: no new sessions.
        let view = ListenerView::current(&self.runtime, name)?;
        let l4 = &view.listener().l4;
        if self.session_count() >= l4.max_sessions {
            self.metrics.rejected();
            tracing::debug!(listener = %name, %peer, "udp session cap reached, datagram dropped");
            return None;
        }
        let snapshot = self.runtime.cluster.snapshot();
        let wanted = Wanted::for_session(&view.config, view.listener(), None, false);
        let Some(node) = select::pick(&view.config, &snapshot, &wanted, &[]) else {
            self.metrics.listener().no_node(&wanted.group);
            tracing::warn!(listener = %name, %peer, group = wanted.group, "no usable node for udp session");
            return None;
        };
        let target = node.srt_addr();
        let local: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let to_node = match UdpSocket::bind(local).await {
            Ok(sock) => match sock.connect(target).await {
                Ok(()) => sock,
                Err(e) => {
                    tracing::warn!(listener = %name, node = node.id(), %target, error = %e, "udp connect failed");
                    self.runtime
                        .metrics
                        .with_node(&node, |m| m.connect_failed());
                    return None;
                }
            },
            Err(e) => {
                tracing::warn!(listener = %name, error = %e, "udp socket for session failed");
                return None;
            }
        };
        let listener_metrics = self.metrics.listener();
        let session = Arc::new(Session {
            to_node,
            meter: SessionMeter::new(listener_metrics.clone(), self.runtime.metrics.node(&node)),
            lease: node.lease(),
            idle: l4.session_idle,
            _open: self.metrics.session_opened(node.id()),
            _connection: listener_metrics.connection_opened(),
        });
        self.sessions().insert(peer, session.clone());
        tracing::info!(listener = %name, %peer, node = node.id(), "udp session opened");
        let this = self.clone();
        let (listener, shutdown, run) = (listener.clone(), shutdown.clone(), session.clone());
        tokio::spawn(async move {
            let why = tokio::select! {
                () = shutdown.cancelled() => "shutdown".to_string(),
                () = run.meter.idle(run.idle) => "idle".to_string(),
                e = this.node_to_client(&run, &listener, peer) => format!("error: {e}"),
            };
            this.close(peer, &run, &why);
        });
        Some(session)
    }

    /// Relays the node's datagrams back to the client until an error.
    async fn node_to_client(
        &self,
        session: &Session,
        listener: &UdpSocket,
        peer: SocketAddr,
    ) -> io::Error {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            // ECONNREFUSED here means the node's port is closed (ICMP): end the
            // session so the client's next datagram picks a node anew.
            let n = match session.to_node.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => return e,
            };
            match listener.send_to(&buf[..n], peer).await {
                Ok(sent) => session.meter.add_out(sent),
                Err(e) => return e,
            }
        }
    }

    fn close(&self, peer: SocketAddr, session: &Arc<Session>, why: &str) {
        let mut sessions = self.sessions();
        // Only remove the entry if it is still this session (not a newer one).
        if sessions.get(&peer).is_some_and(|s| Arc::ptr_eq(s, session)) {
            sessions.remove(&peer);
        }
        drop(sessions);
        let (bytes_in, bytes_out) = session.meter.totals();
        tracing::info!(
            listener = %self.name, %peer, node = session.lease.node().id(),
            bytes_in, bytes_out, secs = session.meter.age().as_secs_f64(), why, "udp session ended"
        );
    }
}

/// Sends one datagram, waiting at most [`SEND_WAIT`] for the socket.
async fn send_bounded(socket: &UdpSocket, data: &[u8]) -> io::Result<usize> {
    match socket.try_send(data) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            tokio::time::timeout(SEND_WAIT, socket.send(data))
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::WouldBlock.into()))
        }
        done => done,
    }
}
