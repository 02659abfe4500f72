//! Per-session accounting of an L4 session: bytes each way (added live to the
//! listener's and the node's byte counters, so long RTMP sessions show up in
//! metrics while they run) and the time of the last activity, which drives
//! idle timeouts.
//!
//! [`Metered`] wraps the client side of a buffered relay
//! ([`crate::tunnel::relay`]) so every byte read from or written to the client
//! is counted, and lets the RTMP inspector see the client's bytes on the way.

use crate::metrics::{ListenerMetrics, NodeMetrics};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Byte counts and last activity of one session.
#[derive(Debug)]
pub struct SessionMeter {
    listener: Arc<ListenerMetrics>,
    node: Arc<NodeMetrics>,
    start: Instant,
    /// Milliseconds since `start` of the last byte moved either way.
    last_ms: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl SessionMeter {
    /// A meter for a session starting now between a client of `listener`
    /// and `node`, adding to both's byte counters.
    pub fn new(listener: Arc<ListenerMetrics>, node: Arc<NodeMetrics>) -> Self {
        Self {
            listener,
            node,
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }

    /// Records `n` bytes moved from client to node.
    pub fn add_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.listener.tunnel_bytes(Some(&self.node), n as u64, 0);
        self.touch();
    }

    /// Records `n` bytes moved from node to client.
    pub fn add_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.listener.tunnel_bytes(Some(&self.node), 0, n as u64);
        self.touch();
    }

    /// Bytes moved client→node and node→client so far.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }

    /// Time since the session started.
    pub fn age(&self) -> Duration {
        self.start.elapsed()
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`. Sleeps until the deadline
    /// computed from the last activity, then re-checks, so traffic costs one
    /// atomic update per copy instead of a timer reset.
    pub async fn idle(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.start + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// The client side of a session, counting what is read from it (client→node)
/// and written to it (node→client), and showing read bytes to `tap`.
#[derive(Debug)]
pub struct Metered<'a, S, T> {
    inner: S,
    meter: &'a SessionMeter,
    tap: T,
}

impl<'a, S, T: FnMut(&[u8])> Metered<'a, S, T> {
    /// Wraps `inner`; `tap` sees every chunk read from the client.
    pub fn new(inner: S, meter: &'a SessionMeter, tap: T) -> Self {
        Self { inner, meter, tap }
    }
}

impl<S: AsyncRead + Unpin, T: FnMut(&[u8]) + Unpin> AsyncRead for Metered<'_, S, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let fresh = &buf.filled()[before..];
            if !fresh.is_empty() {
                (this.tap)(fresh);
                this.meter.add_in(fresh.len());
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin, T: Unpin> AsyncWrite for Metered<'_, S, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            this.meter.add_out(n);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tunnel::{TunnelEnd, relay};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// A meter on fresh counters of listener `l4` and node `o1`.
    pub(crate) fn meter() -> (
        SessionMeter,
        crate::metrics::Metrics,
        Arc<crate::cluster::Cluster>,
    ) {
        let cluster = Arc::new(crate::cluster::Cluster::new());
        cluster.update(vec![crate::metrics::fixtures::spec("o1", "origin", 1)]);
        let metrics = crate::metrics::Metrics::new(cluster.clone()).unwrap();
        let node = metrics.node(cluster.snapshot().node("o1").unwrap());
        (
            SessionMeter::new(metrics.listener("l4"), node),
            metrics,
            cluster,
        )
    }

    #[tokio::test]
    async fn counts_live_and_taps_client_bytes_through_a_tunnel() {
        let (meter, metrics, cluster) = meter();
        let (mut client, client_side) = duplex(1024);
        let (node_side, mut node) = duplex(1024);
        let mut seen = Vec::new();
        let wrapped = Metered::new(client_side, &meter, |d: &[u8]| seen.extend_from_slice(d));
        let tunnel = relay(
            wrapped,
            node_side,
            Duration::from_secs(5),
            std::future::pending(),
        );
        let peers = async {
            client.write_all(b"hello").await.unwrap();
            let mut got = [0u8; 5];
            node.read_exact(&mut got).await.unwrap();
            // Counted while the tunnel is still open.
            let text = metrics.render(&cluster);
            assert!(
                text.contains("amslb_received_bytes_total{listener=\"l4\"} 5"),
                "{text}"
            );
            assert!(
                text.contains("amslb_node_sent_bytes_total{group=\"origin\",node=\"o1\"} 5"),
                "{text}"
            );
            node.write_all(b"world!").await.unwrap();
            let mut back = [0u8; 6];
            client.read_exact(&mut back).await.unwrap();
            client.shutdown().await.unwrap();
            node.shutdown().await.unwrap();
        };
        let (relayed, ()) = tokio::join!(tunnel, peers);
        assert_eq!(relayed.end, TunnelEnd::Closed);
        assert_eq!(meter.totals(), (5, 6));
        assert_eq!(seen, b"hello");
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_pushes_the_idle_deadline() {
        let (meter, _, _) = meter();
        let started = Instant::now();
        let idle = meter.idle(Duration::from_secs(10));
        let traffic = async {
            tokio::time::sleep(Duration::from_secs(6)).await;
            meter.add_in(1);
        };
        tokio::join!(idle, traffic);
        assert!(started.elapsed() >= Duration::from_secs(16));
    }
}
