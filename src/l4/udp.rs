//! `udp` listeners (SRT): one session per client address, bound to one node for
//! its life, relayed both ways through a connected socket of its own, ended
//! after `session_idle` without a datagram either way.
//!
//! An SRT caller is placed by its stream id: amslb answers the caller's
//! induction handshake itself (a stateless cookie, so unanswered inductions
//! cost nothing), reads the stream id from the conclusion, places the session
//! with the one placement function (key `app/stream`, a publish unless the id
//! says play), and then does the induction with the node and swaps the cookie
//! in the caller's conclusions (see [`super::srt`]). Everything after the
//! handshake, and any datagram that is not an SRT handshake, is relayed as it
//! is, never parsed, so garbage cannot hurt the balancer; the node judges it.
//!
//! A datagram from an address without a session (new, or expired) opens one,
//! unless `max_sessions` are open: then it is dropped, which bounds sockets
//! and memory under a spoofed-source flood.
//!
//! A session owns no datagram buffer: datagrams from nodes are received into
//! one buffer per thread and sent on at once, so an open session costs its
//! socket and a few hundred bytes. Every dropped datagram is counted by reason
//! (`amslb_udp_dropped_datagrams_total`).

use super::meter::SessionMeter;
use super::srt;
use crate::cluster::{Node, NodeLease, NodeSpec};
use crate::config::ListenerConfig;
use crate::config::rules::RouteName;
use crate::metrics::{L4Metrics, OpenGuard, UdpDrops};
use crate::runtime::{ListenerView, Runtime};
use crate::streaming::select::{self, Wanted};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
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

/// Buffer of a session's SRT handshake with its node (handshake packets are
/// well under one MTU).
const HANDSHAKE_DATAGRAM: usize = 1500;

thread_local! {
    /// The receive buffer every session of this thread shares for datagrams
    /// from its node, so a session owns no buffer: it is used only between a
    /// readiness wake-up and the send that follows, with no await between.
    static RECEIVE: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_DATAGRAM]);
}

/// One client's session: its socket towards the node, and what it holds open.
#[derive(Debug)]
struct Session {
    to_node: UdpSocket,
    meter: SessionMeter,
    lease: NodeLease,
    /// `session_idle` as configured when the session opened.
    idle: Duration,
    /// An SRT caller whose induction amslb answered: its conclusions carry
    /// amslb's cookie, replaced by the node's once the node gave one; until
    /// then its datagrams are dropped (the caller repeats its conclusion).
    srt: bool,
    /// The node's SYN cookie, once its induction answer arrived.
    node_cookie: OnceLock<u32>,
    /// Cancelled when a new caller on the same address replaces the session.
    replaced: CancellationToken,
    /// Cancelled when the session is handed to a new process (upgrade).
    moved: CancellationToken,
    _open: OpenGuard,
    _connection: OpenGuard,
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
    /// The node's SYN cookie, for a caller placed by its SRT handshake
    /// (its repeated conclusions still carry amslb's cookie).
    pub node_cookie: Option<u32>,
    /// `session_idle` of the session.
    pub idle: Duration,
    /// The session's connected socket towards the node.
    pub socket: OwnedFd,
}

/// A running `udp` listener's shared state. Group, balancing, backup,
/// `session_idle` and `max_sessions` are read from the live config when a
/// session opens, so a reload applies to new sessions.
#[derive(Debug)]
pub struct UdpProxy {
    runtime: Arc<Runtime>,
    name: Arc<str>,
    metrics: Arc<L4Metrics>,
    /// Dropped datagrams by reason (`amslb_udp_dropped_datagrams_total`).
    drops: UdpDrops,
    /// Keys the SYN cookies amslb hands SRT callers.
    secret: RandomState,
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
            drops: runtime.metrics.udp_drops(&listener.name),
            secret: RandomState::new(),
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

    /// The SYN cookie for `peer` in the minute `minutes_ago` before now: a
    /// keyed hash, so a caller cannot forge one and amslb keeps no state.
    fn cookie(&self, peer: SocketAddr, minutes_ago: u64) -> u32 {
        let minute = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 60)
            .wrapping_sub(minutes_ago);
        self.secret.hash_one((peer, minute)) as u32
    }

    /// Whether `cookie` is one amslb gave `peer` (this minute or the last).
    fn cookie_ok(&self, peer: SocketAddr, cookie: u32) -> bool {
        (0..2).any(|ago| self.cookie(peer, ago) == cookie)
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
                    tracing::debug!(listener = %self.name, error = %e, "udp receive failed");
                    continue;
                }
            };
            let mut existing = self.sessions().get(&peer).cloned();
            if let Some(old) = existing.take_if(|s| s.srt && srt::is_induction(&buf[..n])) {
                // A new SRT caller on the address of an old one (a restarted
                // encoder, a reused port): the old session is over, at once,
                // so the new caller's next datagram cannot reach the old node.
                let mut sessions = self.sessions();
                if sessions.get(&peer).is_some_and(|s| Arc::ptr_eq(s, &old)) {
                    sessions.remove(&peer);
                }
                drop(sessions);
                old.replaced.cancel();
            }
            let session = match existing {
                Some(s) => s,
                None => {
                    let datagram = &buf[..n];
                    if let Some(answer) = srt::is_induction(datagram)
                        .then(|| srt::induction_answer(datagram, self.cookie(peer, 0)))
                        .flatten()
                    {
                        // UDP may drop: a caller repeats its induction.
                        let _ = socket.try_send_to(&answer, peer);
                        continue;
                    }
                    let conclusion =
                        srt::Conclusion::parse(datagram).filter(|c| self.cookie_ok(peer, c.cookie));
                    match self
                        .open(peer, &socket, &shutdown, conclusion, datagram)
                        .await
                    {
                        Some(s) => s,
                        None => continue,
                    }
                }
            };
            if session.srt {
                match session.node_cookie.get() {
                    // Conclusions carry amslb's cookie: give the node its own.
                    Some(&cookie) => {
                        srt::set_cookie(&mut buf[..n], cookie);
                    }
                    None => continue,
                }
            }
            match send_bounded(&session.to_node, &buf[..n]).await {
                Ok(sent) => session.meter.add_in(sent),
                Err(e) => {
                    self.drops.node_busy.inc();
                    tracing::debug!(listener = %self.name, %peer, error = %e, "datagram to node dropped")
                }
            }
        }
    }

    /// Opens a session for `peer` on a node, or `None` (over the cap, no
    /// node). `conclusion` is the caller's SRT conclusion (datagram `first`)
    /// when amslb answered its induction: the session is then placed by its
    /// stream id and starts with the node's induction.
    async fn open(
        self: &Arc<Self>,
        peer: SocketAddr,
        listener: &Arc<UdpSocket>,
        shutdown: &CancellationToken,
        conclusion: Option<srt::Conclusion>,
        first: &[u8],
    ) -> Option<Arc<Session>> {
        let name = &self.name;
        // A reload that removed the listener: no new sessions.
        let view = ListenerView::current(&self.runtime, name)?;
        let l4 = &view.listener().l4;
        if self.session_count() >= l4.max_sessions {
            self.metrics.rejected();
            self.drops.session_limit.inc();
            tracing::debug!(listener = %name, %peer, "udp session cap reached, datagram dropped");
            return None;
        }
        if !(self.runtime).admit_publish(name, RouteName::SrtPublish, peer.ip()) {
            self.metrics.rejected();
            return None;
        }
        let snapshot = self.runtime.cluster.snapshot();
        let placed = conclusion
            .as_ref()
            .and_then(|c| srt::placement_key(c.stream_id.as_deref()?));
        let (key, publish) = placed.map_or((None, false), |(k, p)| (Some(k), p));
        let wanted = Wanted::for_session(&view.config, view.listener(), key, publish);
        let Some(node) = select::pick(&view.config, &snapshot, &wanted, &[]) else {
            self.metrics.listener().no_node(&wanted.group);
            self.drops.no_node.inc();
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
                    self.drops.session_failed.inc();
                    tracing::warn!(listener = %name, node = node.id(), %target, error = %e, "udp connect failed");
                    self.runtime
                        .metrics
                        .with_node(&node, |m| m.connect_failed());
                    return None;
                }
            },
            Err(e) => {
                self.drops.session_failed.inc();
                tracing::warn!(listener = %name, error = %e, "udp socket for session failed");
                return None;
            }
        };
        let session = self.new_session(to_node, &node, l4.session_idle, conclusion.is_some());
        self.sessions().insert(peer, session.clone());
        let stream = wanted.key.as_deref().unwrap_or("-");
        tracing::info!(listener = %name, %peer, node = node.id(), stream, publish, "udp session opened");
        let handshake = session.srt.then(|| first.to_vec());
        let connect_timeout = view.config.timeouts.connect;
        self.relay(
            peer,
            &session,
            listener,
            shutdown,
            handshake,
            connect_timeout,
        );
        Some(session)
    }

    fn new_session(
        &self,
        to_node: UdpSocket,
        node: &Arc<Node>,
        idle: Duration,
        srt: bool,
    ) -> Arc<Session> {
        let listener_metrics = self.metrics.listener();
        Arc::new(Session {
            to_node,
            meter: SessionMeter::new(listener_metrics.clone(), self.runtime.metrics.node(node)),
            lease: node.lease(),
            idle,
            srt,
            node_cookie: OnceLock::new(),
            replaced: CancellationToken::new(),
            moved: CancellationToken::new(),
            _open: self.metrics.session_opened(node.id()),
            _connection: listener_metrics.connection_opened(),
        })
    }

    /// Relays the node's side of `session` (after the SRT `handshake` with
    /// the node, when amslb answered the caller's) until it ends.
    fn relay(
        self: &Arc<Self>,
        peer: SocketAddr,
        session: &Arc<Session>,
        listener: &Arc<UdpSocket>,
        shutdown: &CancellationToken,
        handshake: Option<Vec<u8>>,
        connect_timeout: Duration,
    ) {
        let this = self.clone();
        let (listener, shutdown, run) = (listener.clone(), shutdown.clone(), session.clone());
        tokio::spawn(async move {
            let relay = async {
                if let Some(conclusion) = handshake {
                    this.node_handshake(&run, conclusion, connect_timeout)
                        .await?;
                }
                Err::<(), _>(this.node_to_client(&run, &listener, peer).await)
            };
            // Biased: the relay is polled before `moved`, so a hand-over stops
            // it only while it waits to receive, never between a datagram's
            // receive and its send (none read here is dropped).
            let why = tokio::select! {
                biased;
                () = shutdown.cancelled() => "shutdown".to_string(),
                () = run.meter.idle(run.idle) => "idle".to_string(),
                () = run.replaced.cancelled() => "replaced by a new caller".to_string(),
                Err(e) = relay => format!("error: {e}"),
                () = run.moved.cancelled() => "handed over to the new process".to_string(),
            };
            this.close(peer, &run, &why);
        });
    }

    /// Stops every session here and hands them over (an upgrade): the new
    /// process relays them on the same node sockets. Call it only once the
    /// receive loop ([`UdpProxy::serve`]) has stopped, so no datagram is
    /// read here and no session opened after. A caller still in its SRT
    /// handshake with the node is not handed over: it repeats its handshake
    /// and the new process places it afresh.
    pub fn hand_off(&self) -> Vec<MovedSession> {
        let sessions: Vec<_> = self.sessions().drain().collect();
        let mut moved = Vec::with_capacity(sessions.len());
        for (client, session) in sessions {
            session.moved.cancel();
            let node_cookie = session.node_cookie.get().copied();
            if session.srt && node_cookie.is_none() {
                continue;
            }
            match session.to_node.as_fd().try_clone_to_owned() {
                Ok(socket) => moved.push(MovedSession {
                    client,
                    node: session.lease.node().spec().clone(),
                    node_cookie,
                    idle: session.idle,
                    socket,
                }),
                Err(e) => {
                    tracing::warn!(listener = %self.name, %client, error = %e, "udp session cannot be handed over")
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
        moved: MovedSession,
        listener: &Arc<UdpSocket>,
        shutdown: &CancellationToken,
    ) -> io::Result<()> {
        let socket = std::net::UdpSocket::from(moved.socket);
        socket.set_nonblocking(true)?;
        let to_node = UdpSocket::from_std(socket)?;
        let node = match self.runtime.cluster.snapshot().node(&moved.node.id) {
            Some(node) if node.spec().addr == moved.node.addr => node.clone(),
            _ => Arc::new(Node::new(moved.node)),
        };
        let session = self.new_session(to_node, &node, moved.idle, moved.node_cookie.is_some());
        if let Some(cookie) = moved.node_cookie {
            let _ = session.node_cookie.set(cookie);
        }
        self.sessions().insert(moved.client, session.clone());
        tracing::info!(listener = %self.name, peer = %moved.client, node = node.id(), "udp session taken over from the previous process");
        self.relay(
            moved.client,
            &session,
            listener,
            shutdown,
            None,
            Duration::ZERO,
        );
        Ok(())
    }

    /// The node's side of an SRT handshake amslb began with the caller: an
    /// induction from the session's socket for the node's cookie, then the
    /// caller's `conclusion` with that cookie. A node that does not answer in
    /// `timeout` counts as a failed connect (passive health, node metrics).
    async fn node_handshake(
        &self,
        session: &Session,
        mut conclusion: Vec<u8>,
        timeout: Duration,
    ) -> io::Result<()> {
        let node = session.lease.node();
        let exchange = async {
            let induction = srt::node_induction(&conclusion)
                .ok_or_else(|| io::Error::other("not an SRT conclusion"))?;
            session.to_node.send(&induction).await?;
            let mut buf = vec![0u8; HANDSHAKE_DATAGRAM];
            loop {
                let n = session.to_node.recv(&mut buf).await?;
                if let Some(cookie) = srt::node_cookie(&buf[..n]) {
                    return Ok::<u32, io::Error>(cookie);
                }
            }
        };
        let answered = tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
        let cookie = answered.inspect_err(|e| {
            self.runtime
                .health
                .report_failure(node, &format!("SRT handshake failed: {e}"));
            self.runtime.metrics.with_node(node, |m| m.connect_failed());
        })?;
        srt::set_cookie(&mut conclusion, cookie);
        let _ = session.node_cookie.set(cookie);
        let sent = session.to_node.send(&conclusion).await?;
        session.meter.add_in(sent);
        Ok(())
    }

    /// Relays the node's datagrams back to the client until an error.
    async fn node_to_client(
        &self,
        session: &Session,
        listener: &UdpSocket,
        peer: SocketAddr,
    ) -> io::Error {
        loop {
            if let Err(e) = session.to_node.readable().await {
                return e;
            }
            // Drain what is queued through the thread's shared buffer; only a
            // datagram the client socket cannot take at once is copied out
            // (sized to the datagram) to wait a little.
            let blocked = RECEIVE.with_borrow_mut(|buf| {
                loop {
                    // ECONNREFUSED here means the node's port is closed (ICMP):
                    // end the session so the client's next datagram picks a node anew.
                    let n = match session.to_node.try_recv(buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                        Err(e) => return Err(e),
                    };
                    match listener.try_send_to(&buf[..n], peer) {
                        Ok(sent) => session.meter.add_out(sent),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return Ok(Some(buf[..n].to_vec()));
                        }
                        Err(e) => return Err(e),
                    }
                }
            });
            match blocked {
                Ok(None) => {}
                Ok(Some(datagram)) => {
                    let waited = tokio::time::timeout(SEND_WAIT, listener.send_to(&datagram, peer));
                    match waited.await {
                        Ok(Ok(sent)) => session.meter.add_out(sent),
                        Ok(Err(e)) => return e,
                        Err(_) => self.drops.client_busy.inc(),
                    }
                }
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
