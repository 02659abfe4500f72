//! The portable relay: copies bytes both ways between a client and a node with
//! plain buffers, over any async stream (plain TCP, TLS). Half-close is passed
//! on (EOF from one side shuts down writing on the other), the tunnel ends when
//! both directions finished, on the first error, or after the idle timeout.

use super::stats::L4Stats;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Buffer per direction: large enough for line-rate copies on loopback, small
/// enough that ten thousand RTMP publishers stay well under a gigabyte.
const BUF_SIZE: usize = 32 * 1024;

/// How a relay ended without an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed their sending half.
    Closed,
    /// Nothing moved either way for the tunnel idle timeout.
    IdleTimeout,
}

impl RelayEnd {
    /// Stable lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::IdleTimeout => "idle-timeout",
        }
    }
}

/// Per-session accounting shared by both directions of a relay: byte counts
/// (also added to the listener's counters) and the time of the last activity,
/// which drives the idle timeout.
#[derive(Debug)]
pub struct SessionMeter {
    stats: Arc<L4Stats>,
    start: Instant,
    /// Milliseconds since `start` of the last byte moved either way.
    last_ms: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl SessionMeter {
    /// A meter for a session starting now.
    pub fn new(stats: Arc<L4Stats>) -> Self {
        Self {
            stats,
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }

    /// Records `n` bytes moved from client to node.
    pub fn add_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.add_in(n);
        self.touch();
    }

    /// Records `n` bytes moved from node to client.
    pub fn add_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.add_out(n);
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
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`. Sleeps until the deadline
    /// computed from the last activity, then re-checks, so traffic costs one
    /// atomic store per copy instead of a timer reset.
    pub async fn idle(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Relays between `client` and `node` until both sides closed, an error, or
/// `idle` without traffic. `tap` sees every client→node chunk before it is
/// forwarded (the RTMP inspector); pass `|_| {}` for none.
pub async fn relay<C, N>(
    client: C,
    node: N,
    meter: &SessionMeter,
    idle: Duration,
    tap: impl FnMut(&[u8]) + Send,
) -> io::Result<RelayEnd>
where
    C: AsyncRead + AsyncWrite + Unpin,
    N: AsyncRead + AsyncWrite + Unpin,
{
    let (client_r, client_w) = tokio::io::split(client);
    let (node_r, node_w) = tokio::io::split(node);
    let up = pump(client_r, node_w, tap, |n| meter.add_in(n));
    let down = pump(node_r, client_w, |_| {}, |n| meter.add_out(n));
    tokio::select! {
        done = async { tokio::try_join!(up, down) } => done.map(|_| RelayEnd::Closed),
        () = meter.idle(idle) => Ok(RelayEnd::IdleTimeout),
    }
}

/// Copies one direction until EOF, then shuts down the writer so the other
/// side sees the half-close.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    mut tap: impl FnMut(&[u8]),
    count: impl Fn(usize),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        tap(&buf[..n]);
        to.write_all(&buf[..n]).await?;
        count(n);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn copies_both_ways_and_passes_half_close() {
        let stats = Arc::new(L4Stats::default());
        let (mut client, client_side) = duplex(1024);
        let (node_side, mut node) = duplex(1024);
        let meter = SessionMeter::new(stats.clone());
        let mut seen = Vec::new();
        let relay = relay(
            client_side,
            node_side,
            &meter,
            Duration::from_secs(5),
            |d| seen.extend_from_slice(d),
        );
        let peers = async {
            client.write_all(b"hello").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            node.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello", "node sees the data then EOF");
            // The node can still answer after the client's half-close.
            node.write_all(b"world!").await.unwrap();
            node.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"world!");
        };
        let (end, ()) = tokio::join!(relay, peers);
        assert_eq!(end.unwrap(), RelayEnd::Closed);
        assert_eq!(meter.totals(), (5, 6));
        assert_eq!(seen, b"hello");
        let s = stats.snapshot();
        assert_eq!((s.bytes_in, s.bytes_out), (5, 6));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tunnel_times_out() {
        let stats = Arc::new(L4Stats::default());
        let (_client, client_side) = duplex(64);
        let (node_side, _node) = duplex(64);
        let meter = SessionMeter::new(stats.clone());
        let started = Instant::now();
        let end = relay(
            client_side,
            node_side,
            &meter,
            Duration::from_secs(7),
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(end, RelayEnd::IdleTimeout);
        assert!(started.elapsed() >= Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_pushes_the_idle_deadline() {
        let stats = Arc::new(L4Stats::default());
        let meter = SessionMeter::new(stats.clone());
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
