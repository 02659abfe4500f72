//! Keep-alive connections to one node, reused across client requests.
//!
//! [`super::Pools`] keeps one pool per node address. A connection is taken out
//! for one request as a [`Lent`] and comes back when that is dropped, once its
//! response body has been read to the end (hyper reports that through
//! `SendRequest::is_ready`/`ready`), so a pooled connection is always idle.
//! Each event loop thread has its own idle lists: the request path touches no
//! lock another thread takes. A pool keeps two kinds of connection: hyper's
//! client ones (requests with a body, upgrades) and amslb's own
//! [`DirectConn`]s (bodiless requests, `super::direct`).

use super::UpstreamBody;
use super::direct::DirectConn;
use crate::node_tls::{DialError, NodeTls, dial};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thread_local::ThreadLocal;
use tokio_util::either::Either;

/// A connection able to send one request to a node.
pub type Sender = SendRequest<UpstreamBody>;

/// Idle connections kept per node; more are closed when they come back.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is not reused: nodes close idle
/// keep-alive connections after a while (Tomcat/AMS: 20 s by default),
/// and a request sent on a connection the node is closing would fail.
const MAX_IDLE_AGE: Duration = Duration::from_secs(15);
/// Largest read buffer of a node connection, which bounds both a node's
/// response head and the body bytes read ahead of a client. hyper's default
/// (~400 KiB, grown on fast reads) cost that much per slow client reading a
/// large body; with this, a stalled client holds at most a few tens of KiB
/// and the rest waits in the node's socket (backpressure), like HAProxy's
/// 16 KiB `tune.bufsize`.
pub const NODE_READ_BUFFER: usize = 32 * 1024;

/// Idle keep-alive connections to one node.
///
/// Kept per thread: with one event loop per thread ([`crate::workers`]), a
/// connection is driven by the thread that opened it, and a request on
/// another thread would cost two cross-thread wakeups. So a request takes only
/// its own thread's connections, and gives them back there, without a lock
/// or a cache line shared with other threads.
#[derive(Debug, Default)]
pub struct Pool {
    idle: ThreadLocal<RefCell<Vec<Idle<Sender>>>>,
    direct: ThreadLocal<RefCell<Vec<Idle<DirectConn>>>>,
}

/// An idle connection and when it came back.
#[derive(Debug)]
struct Idle<C> {
    conn: C,
    since: Instant,
}

/// Why a new connection to a node could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect or the TLS handshake (`node_tls`) failed or timed out.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The HTTP/1 handshake failed.
    #[error("http handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
}

impl Pool {
    /// An idle hyper connection of this thread that still looks open, if there is one.
    pub fn take(&self) -> Option<Sender> {
        take_idle(&self.idle, SendRequest::is_ready)
    }

    /// An idle direct connection of this thread that still looks open, if
    /// there is one. Every one is looked at: a node that sent anything after
    /// the answer it owed (a second answer, say) must never have that read
    /// as the answer to the next request.
    pub fn take_direct(&self) -> Option<DirectConn> {
        take_idle(&self.direct, DirectConn::looks_open)
    }

    /// Lends `sender` out for one request; it comes back when the [`Lent`] is dropped.
    pub fn lend(self: &Arc<Self>, sender: Sender) -> Lent {
        Lent {
            pool: self.clone(),
            sender: Some(sender),
        }
    }

    /// Keeps an idle hyper connection on this thread's list, if there is room.
    fn put(&self, sender: Sender) {
        put_idle(&self.idle, sender);
    }

    /// Keeps an idle direct connection on this thread's list, if there is room.
    pub fn put_direct(&self, conn: DirectConn) {
        put_idle(&self.direct, conn);
    }
}

/// The newest connection of `list` that `usable` accepts; older than
/// [`MAX_IDLE_AGE`] and rejected ones are dropped.
fn take_idle<C: Send>(
    list: &ThreadLocal<RefCell<Vec<Idle<C>>>>,
    usable: impl Fn(&C) -> bool,
) -> Option<C> {
    let now = Instant::now();
    let mut idle = list.get_or_default().borrow_mut();
    // Entries are in the order they came back, oldest first: drop the
    // ones too old to trust without touching the rest.
    let expired = idle
        .iter()
        .take_while(|i| now.duration_since(i.since) >= MAX_IDLE_AGE)
        .count();
    idle.drain(..expired);
    while let Some(candidate) = idle.pop() {
        if usable(&candidate.conn) {
            return Some(candidate.conn);
        }
    }
    None
}

/// Keeps `conn` on this thread's `list`, if there is room.
fn put_idle<C: Send>(list: &ThreadLocal<RefCell<Vec<Idle<C>>>>, conn: C) {
    let mut idle = list.get_or_default().borrow_mut();
    if idle.len() < MAX_IDLE {
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }
}

/// A node connection lent out for one request. Dropped when the response
/// body has been read to the end (or abandoned): the connection goes back to
/// its pool at once when hyper already has it ready for another request,
/// else a small task waits for that (and drops it if the node closes it).
#[derive(Debug)]
pub struct Lent {
    pool: Arc<Pool>,
    sender: Option<Sender>,
}

impl Drop for Lent {
    fn drop(&mut self) {
        let Some(mut sender) = self.sender.take() else {
            return;
        };
        if sender.is_ready() {
            self.pool.put(sender);
            return;
        }
        // Spawned on this thread's event loop, which drives the connection
        // (none while a runtime is being torn down: the connection just closes).
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.pool.clone();
        runtime.spawn(async move {
            if sender.ready().await.is_ok() {
                pool.put(sender);
            }
        });
    }
}

/// Opens a new HTTP/1.1 connection to `addr` within `timeout`, over TLS
/// when `tls` is given (the TLS handshake is bounded by the same timeout).
pub async fn connect(
    addr: SocketAddr,
    tls: Option<&NodeTls>,
    timeout: Duration,
) -> Result<Sender, ConnectError> {
    // Each kind handed to hyper as itself, so a WebSocket tunnel can unwrap
    // the plain socket again (`crate::tunnel::upgraded`).
    match dial(addr, tls, timeout).await? {
        Either::Left(tcp) => handshake(addr, tcp).await,
        Either::Right(tls) => handshake(addr, tls).await,
    }
}

async fn handshake<I>(addr: SocketAddr, io: I) -> Result<Sender, ConnectError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .max_buf_size(NODE_READ_BUFFER)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ConnectError::Handshake(addr, e))?;
    tokio::spawn(async move {
        // Errors here are the node closing or resetting; the request that was
        // using the connection sees them and reports them.
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}
