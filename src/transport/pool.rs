//! Keep-alive connections to one node, reused across client requests.
//!
//! [`super::Pools`] keeps one pool per node address. A connection is taken out
//! for one request and comes back once its response body has been read to the
//! end (hyper reports that through `SendRequest::ready`), so a pooled
//! connection is always idle. The lock is held only to push or pop, never
//! across I/O.

use super::UpstreamBody;
use crate::node_tls::{DialError, NodeTls, dial};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::{Duration, Instant};
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
/// Each connection remembers the thread whose event loop drives it, and a
/// request takes one of its own thread's connections: with one event loop
/// per thread ([`crate::workers`]), a connection driven elsewhere would cost
/// two cross-thread wakeups per request.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
    thread: ThreadId,
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
    /// An idle connection that still looks open, if there is one.
    /// Connections of other threads are left for them.
    pub fn take(&self) -> Option<Sender> {
        let here = std::thread::current().id();
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Entries are in the order they came back, oldest first: drop the
        // ones too old to trust without touching the rest.
        let expired = idle
            .iter()
            .take_while(|i| now.duration_since(i.since) >= MAX_IDLE_AGE)
            .count();
        idle.drain(..expired);
        while let Some(position) = idle.iter().rposition(|i| i.thread == here) {
            let candidate = idle.remove(position);
            if candidate.sender.is_ready() {
                return Some(candidate.sender);
            }
        }
        None
    }

    /// Returns `sender` to the pool once its current response is finished.
    /// Runs as a small task because "finished" is when the client has read
    /// the whole response body, which may be much later.
    pub fn give_back_when_idle(self: &std::sync::Arc<Self>, mut sender: Sender) {
        let pool = self.clone();
        // The connection task was spawned on this thread's event loop.
        let thread = std::thread::current().id();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
                if idle.len() < MAX_IDLE {
                    idle.push(Idle {
                        sender,
                        since: Instant::now(),
                        thread,
                    });
                }
            }
        });
    }

    /// Number of idle connections (for tests and the status page).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
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
