//! Relaying bytes both ways between two connections (WebSocket after the
//! upgrade, TCP passthrough), with an idle timeout like HAProxy's `timeout tunnel`.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Bytes moved by a finished tunnel, and why it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes from the client side to the node side.
    pub to_node: u64,
    /// Bytes from the node side to the client side.
    pub to_client: u64,
    /// How the tunnel ended.
    pub end: TunnelEnd,
}

/// Why a tunnel closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed (each EOF was passed on as a half-close).
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// One side failed (reset, broken pipe).
    Error,
    /// The balancer is shutting down.
    Shutdown,
}

/// Largest read buffer of one direction, reached by busy tunnels (RTMP, bulk data).
const BUFFER: usize = 16 * 1024;
/// Read buffer a direction starts with. Most tunnels are idle WebSocket
/// signalling with small messages, and thousands may be open: starting at
/// `BUFFER` cost ~27 KiB of RSS per idle tunnel in the compare bench
/// (scenario 4), against ~8 KiB with small buffers.
const FIRST_BUFFER: usize = 1024;

/// Relays until both directions are closed, nothing moves for `idle`, either
/// side errors, or `stop` resolves. An EOF on one side is passed on as a write
/// shutdown on the other (half-close), so request/response protocols that
/// close their sending side first still get their answer.
pub async fn relay<C, N>(
    client: C,
    node: N,
    idle: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    N: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let last_activity = Arc::new(AtomicU64::new(0));
    let to_node = Arc::new(AtomicU64::new(0));
    let to_client = Arc::new(AtomicU64::new(0));
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut node_read, mut node_write) = tokio::io::split(node);

    let up = pump(
        &mut client_read,
        &mut node_write,
        &to_node,
        &last_activity,
        started,
    );
    let down = pump(
        &mut node_read,
        &mut client_write,
        &to_client,
        &last_activity,
        started,
    );
    let watchdog = async {
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let deadline = started + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };

    let end = tokio::select! {
        (a, b) = async { tokio::join!(up, down) } => {
            if a.is_ok() && b.is_ok() { TunnelEnd::Closed } else { TunnelEnd::Error }
        }
        _ = watchdog => TunnelEnd::Idle,
        _ = stop => TunnelEnd::Shutdown,
    };
    Relayed {
        to_node: to_node.load(Ordering::Relaxed),
        to_client: to_client.load(Ordering::Relaxed),
        end,
    }
}

async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &AtomicU64,
    last_activity: &AtomicU64,
    started: Instant,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; FIRST_BUFFER];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return writer.shutdown().await;
        }
        // A read that filled the buffer means data is flowing: grow towards BUFFER.
        if n == buf.len() && buf.len() < BUFFER {
            buf.resize((buf.len() * 4).min(BUFFER), 0);
        }
        writer.write_all(&buf[..n]).await?;
        writer.flush().await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        let now = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_activity.store(now, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn relays_both_ways_and_passes_half_close() {
        let (client, mut client_peer) = duplex(1024);
        let (node, mut node_peer) = duplex(1024);
        let task = tokio::spawn(relay(
            client,
            node,
            Duration::from_secs(5),
            std::future::pending(),
        ));
        client_peer.write_all(b"hello").await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        node_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The node still answers after the client's half-close.
        node_peer.write_all(b"world!").await.unwrap();
        node_peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        let relayed = task.await.unwrap();
        assert_eq!(
            (relayed.to_node, relayed.to_client, relayed.end),
            (5, 6, TunnelEnd::Closed)
        );
    }

    #[tokio::test]
    async fn bulk_data_arrives_intact_while_the_buffer_grows() {
        // Larger than the duplex buffers and than BUFFER, so reads fill the
        // small first buffer and the pump grows it mid-stream.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (client, mut client_peer) = duplex(64 * 1024);
        let (node, mut node_peer) = duplex(64 * 1024);
        let task = tokio::spawn(relay(
            client,
            node,
            Duration::from_secs(5),
            std::future::pending(),
        ));
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client_peer.write_all(&sent).await.unwrap();
            client_peer.shutdown().await.unwrap();
            client_peer
        });
        let mut got = Vec::new();
        node_peer.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "relayed bytes differ from the bytes sent");
        node_peer.shutdown().await.unwrap();
        drop(writer.await.unwrap());
        assert_eq!(task.await.unwrap().to_node, data.len() as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tunnel_is_closed() {
        let (client, mut client_peer) = duplex(1024);
        let (node, _node_peer) = duplex(1024);
        let task = tokio::spawn(relay(
            client,
            node,
            Duration::from_secs(10),
            std::future::pending(),
        ));
        tokio::time::sleep(Duration::from_secs(6)).await;
        client_peer.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        // Activity at 6 s pushed the deadline to 16 s.
        assert!(!task.is_finished());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let relayed = task.await.unwrap();
        assert_eq!(relayed.end, TunnelEnd::Idle);
        assert_eq!(relayed.to_node, 1);
    }

    #[tokio::test]
    async fn stop_ends_the_tunnel() {
        let (client, _c) = duplex(64);
        let (node, _n) = duplex(64);
        let relayed = relay(client, node, Duration::from_secs(60), async {}).await;
        assert_eq!(relayed.end, TunnelEnd::Shutdown);
    }
}
