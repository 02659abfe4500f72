//! The transport layer: connections from amslb to nodes, kept per node
//! outside [`Node`] so cluster data stays plain data.
//!
//! [`Pools`] holds one [`Pool`] of idle keep-alive HTTP connections per node
//! address; the HTTP proxy takes a connection from it and gives it back.
//! Bodiless requests use amslb's own client connection ([`direct`]), the
//! rest hyper's ([`pool::connect`]); [`NodeIncoming`] is either's response body.

pub mod direct;
pub mod pool;

pub use direct::{DirectBody, DirectConn, DirectError, SendError};
pub use pool::{ConnectError, Lent, Pool, Sender, connect};

use crate::cluster::{Cluster, Node};
use arc_swap::ArcSwap;
use bytes::Bytes;
use foldhash::HashMap;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

/// Connection pools by node address.
///
/// Keyed by the node's HTTP address rather than its identity: a connection
/// is only good for the address it was opened to, and two entries with one
/// address are one server. Pools of addresses no longer in the membership
/// are dropped when a new address first gets a pool (rare: membership
/// changes), so their idle connections close. The map is read on every
/// request without a lock (a snapshot, like the membership) and rebuilt only
/// when a node address is new.
#[derive(Debug)]
pub struct Pools {
    cluster: Arc<Cluster>,
    by_addr: ArcSwap<HashMap<SocketAddr, Arc<Pool>>>,
    /// Serialises the rare rebuilds, so two threads adding a pool at once
    /// cannot lose one.
    rebuild: Mutex<()>,
}

impl Pools {
    /// No pool yet, for the nodes of `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self {
            cluster,
            by_addr: ArcSwap::default(),
            rebuild: Mutex::default(),
        }
    }

    /// The pool of `node`, created on first use.
    pub fn of(&self, node: &Node) -> Arc<Pool> {
        let addr = node.http_addr();
        if let Some(pool) = self.by_addr.load().get(&addr) {
            return pool.clone();
        }
        let _rebuilding = self.rebuild.lock().unwrap_or_else(PoisonError::into_inner);
        let snapshot = self.cluster.snapshot();
        let mut by_addr = HashMap::clone(&self.by_addr.load());
        by_addr.retain(|a, _| *a == addr || snapshot.nodes().any(|n| n.http_addr() == *a));
        let pool = by_addr.entry(addr).or_default().clone();
        self.by_addr.store(Arc::new(by_addr));
        pool
    }
}

/// Boxed error of a body sent to a node.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body amslb sends to a node: the client's, streamed (boxed, so the
/// HTTP layer can wrap it with its own fault tracking without this layer
/// knowing the wrapper), or none at all: a request without a body, or a
/// bodiless request sent again after a reused connection died.
#[derive(Debug)]
pub enum UpstreamBody {
    /// The client's request body, passed through as it arrives.
    Client(UnsyncBoxBody<Bytes, BoxError>),
    /// No body.
    Empty,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Client(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Client(body) => body.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Client(body) => body.size_hint(),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A node's response body, from hyper's client or from a [`DirectConn`].
#[derive(Debug)]
pub enum NodeIncoming {
    /// Read by hyper's client connection.
    Hyper(Incoming),
    /// Read straight from the socket as it is polled.
    Direct(DirectBody),
}

impl Body for NodeIncoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            NodeIncoming::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            NodeIncoming::Direct(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            NodeIncoming::Hyper(body) => body.is_end_stream(),
            NodeIncoming::Direct(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            NodeIncoming::Hyper(body) => body.size_hint(),
            NodeIncoming::Direct(body) => body.size_hint(),
        }
    }
}
