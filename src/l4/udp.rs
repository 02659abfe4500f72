//! `udp` listeners (SRT): one session per client address, bound to one node for
//! its life, relayed both ways through a connected socket of its own, ended
//! after `session_idle` without a datagram either way.
//!
//! Datagrams are relayed as they are, never parsed, so garbage cannot hurt the
//! balancer; the node judges it. A datagram from an address without a session
//! (new, or expired) opens one, unless `max_sessions` are open: then it is
//! dropped, which bounds sockets and memory under a spoofed-source flood.

use super::meter::SessionMeter;
use super::stats::{ActiveGuard, L4Stats};
use super::upstream::GroupRoute;
use crate::cluster::{Cluster, Node, NodeLease, NodeSpec};
use crate::config::{Config, ListenerConfig};
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
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

/// Settings of one `udp` listener, resolved from the config at start.
#[derive(Debug, Clone)]
pub struct UdpSettings {
    /// Listener name, for logs.
    pub name: String,
    /// Where sessions go.
    pub route: GroupRoute,
    /// A session ends after this long without a datagram either way.
    pub idle: Duration,
    /// Most sessions open at once.
    pub max_sessions: usize,
}

/// One client's session: its socket towards the node, and what it holds open.
#[derive(Debug)]
struct Session {
    to_node: UdpSocket,
    meter: SessionMeter,
    lease: NodeLease,
    /// Cancelled when the session is handed to a new process (upgrade).
    moved: CancellationToken,
    _active: ActiveGuard,
}

/// A session handed over to the process that replaces this one: the client,
/// its node and a copy of the connected socket towards the node. The node
/// keeps seeing the same source address, so SRT never notices the change.
#[derive(Debug)]
pub struct MovedSession {
    /// The client's address.
    pub client: SocketAddr,
    /// The node the session is on.
    pub node: NodeSpec,
    /// The session's connected socket towards the node.
    pub socket: OwnedFd,
}

/// A running `udp` listener's shared state.
#[derive(Debug)]
pub struct UdpProxy {
    settings: UdpSettings,
    cluster: Arc<Cluster>,
    stats: Arc<L4Stats>,
    /// Open sessions by client address. The lock is held for map operations
    /// only, never across I/O.
    sessions: Mutex<HashMap<SocketAddr, Arc<Session>>>,
}

impl UdpProxy {
    /// Builds the proxy of `listener`.
    pub fn new(config: &Config, listener: &ListenerConfig, cluster: Arc<Cluster>) -> Self {
        Self {
            settings: UdpSettings {
                name: listener.name.clone(),
                route: GroupRoute::new(config, &listener.default_group),
                idle: listener.l4.session_idle,
                max_sessions: listener.l4.max_sessions,
            },
            cluster,
            stats: Arc::new(L4Stats::default()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The listener's counters.
    pub fn stats(&self) -> &Arc<L4Stats> {
        &self.stats
    }

    /// Sessions open now.
    pub fn session_count(&self) -> usize {
        self.sessions().len()
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Session>>> {
        // A panic elsewhere while holding the lock leaves a usable map.
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Receives client datagrams on `socket` until `stop` is cancelled;
    /// sessions opened here end when `shutdown` is (a stop alone, before an
    /// upgrade hands them over, leaves them running).
    pub async fn serve(
        self: Arc<Self>,
        socket: Arc<UdpSocket>,
        stop: CancellationToken,
        shutdown: CancellationToken,
    ) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => return,
                r = socket.recv_from(&mut buf) => r,
            };
            let (n, peer) = match received {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!(listener = %self.settings.name, error = %e, "udp receive failed");
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
                    tracing::debug!(listener = %self.settings.name, %peer, error = %e, "datagram to node dropped")
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
        let s = &self.settings;
        if self.session_count() >= s.max_sessions {
            self.stats.count_rejected();
            tracing::debug!(listener = %s.name, %peer, "udp session cap reached, datagram dropped");
            return None;
        }
        let snapshot = self.cluster.snapshot();
        let Some(node) = s.route.pick(&snapshot, &[], None) else {
            self.stats.count_no_node();
            tracing::warn!(listener = %s.name, %peer, "no usable node for udp session");
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
                    tracing::warn!(listener = %s.name, node = node.id(), %target, error = %e, "udp connect failed");
                    return None;
                }
            },
            Err(e) => {
                tracing::warn!(listener = %s.name, error = %e, "udp socket for session failed");
                return None;
            }
        };
        tracing::info!(listener = %s.name, %peer, node = node.id(), "udp session opened");
        Some(self.start_session(peer, to_node, &node, listener, shutdown))
    }

    /// Registers a session and starts relaying the node's datagrams back.
    fn start_session(
        self: &Arc<Self>,
        peer: SocketAddr,
        to_node: UdpSocket,
        node: &Arc<Node>,
        listener: &Arc<UdpSocket>,
        shutdown: &CancellationToken,
    ) -> Arc<Session> {
        let session = Arc::new(Session {
            to_node,
            meter: SessionMeter::new(self.stats.clone()),
            lease: node.lease(),
            moved: CancellationToken::new(),
            _active: self.stats.open(),
        });
        self.sessions().insert(peer, session.clone());
        let this = self.clone();
        let (listener, shutdown, run) = (listener.clone(), shutdown.clone(), session.clone());
        tokio::spawn(async move {
            let why = tokio::select! {
                () = shutdown.cancelled() => "shutdown".to_string(),
                () = run.meter.idle(this.settings.idle) => "idle".to_string(),
                e = this.node_to_client(&run, &listener, peer) => match e {
                    Some(e) => format!("error: {e}"),
                    None => "handed over to the new process".to_string(),
                },
            };
            this.close(peer, &run, &why);
        });
        session
    }

    /// Stops every session here and hands them over (an upgrade): the new
    /// process relays them on the same node sockets. Call it only once the
    /// receive loop ([`UdpProxy::serve`]) has stopped, so no datagram is
    /// read here and no session opened after.
    pub fn hand_off(&self) -> Vec<MovedSession> {
        let sessions: Vec<_> = self.sessions().drain().collect();
        let mut moved = Vec::with_capacity(sessions.len());
        for (client, session) in sessions {
            session.moved.cancel();
            match session.to_node.as_fd().try_clone_to_owned() {
                Ok(socket) => moved.push(MovedSession {
                    client,
                    node: session.lease.node().spec().clone(),
                    socket,
                }),
                Err(e) => {
                    tracing::warn!(listener = %self.settings.name, %client, error = %e, "udp session cannot be handed over")
                }
            }
        }
        moved
    }

    /// Takes over a session handed over by the previous process; `listener`
    /// is the listening socket it arrived on. The node is this process's own
    /// when membership knows it, else one built from the handed-over spec.
    pub fn adopt(
        self: &Arc<Self>,
        session: MovedSession,
        listener: &Arc<UdpSocket>,
        shutdown: &CancellationToken,
    ) -> io::Result<()> {
        let socket = std::net::UdpSocket::from(session.socket);
        socket.set_nonblocking(true)?;
        let to_node = UdpSocket::from_std(socket)?;
        let node = match self.cluster.snapshot().node(&session.node.id) {
            Some(node) if node.spec().addr == session.node.addr => node.clone(),
            _ => Arc::new(Node::new(session.node)),
        };
        tracing::info!(listener = %self.settings.name, peer = %session.client, node = node.id(), "udp session taken over from the previous process");
        self.start_session(session.client, to_node, &node, listener, shutdown);
        Ok(())
    }

    /// Relays the node's datagrams back to the client until an error
    /// (`Some`) or until the session is handed over (`None`).
    async fn node_to_client(
        &self,
        session: &Session,
        listener: &UdpSocket,
        peer: SocketAddr,
    ) -> Option<io::Error> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            // ECONNREFUSED here means the node's port is closed (ICMP): end the
            // session so the client's next datagram picks a node anew. A
            // hand-over stops here only, never between receive and send, so
            // no datagram read is dropped.
            let received = tokio::select! {
                () = session.moved.cancelled() => return None,
                r = session.to_node.recv(&mut buf) => r,
            };
            let n = match received {
                Ok(n) => n,
                Err(e) => return Some(e),
            };
            match listener.send_to(&buf[..n], peer).await {
                Ok(sent) => session.meter.add_out(sent),
                Err(e) => return Some(e),
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
            listener = %self.settings.name, %peer, node = session.lease.node().id(),
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
