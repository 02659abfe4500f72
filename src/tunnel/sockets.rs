//! The tunnel between two plain TCP sockets, driven by readiness.
//!
//! Most tunnels are idle WebSocket signalling: thousands may be open with
//! nothing moving. [`super::relay`] keeps a read buffer per direction and a
//! task per direction's future for each of them; here one poll asks each
//! socket for readiness, reads through one scratch buffer per thread and
//! writes straight on. Only bytes the other side cannot take at once are
//! copied out and kept until it can (backpressure: that direction reads
//! nothing more meanwhile). An idle tunnel holds its two sockets, a timer
//! and nothing else.
//!
//! The waits are the sockets' own `poll_read_ready`/`poll_write_ready`, which
//! keep one waker per socket and direction: polling them makes this task the
//! one woken and drops the waker the sockets' earlier owner left there
//! (hyper's connection task, ended by the upgrade). A task's allocation (its
//! whole future, ~10 KiB for a client connection) stays until its last waker
//! is dropped, and on an idle socket nothing else would drop it: with
//! `readable()` waits, which queue apart from those wakers, that was most of
//! an idle tunnel's memory.

use super::{Failed, Relayed, Side, TunnelEnd};
use bytes::Bytes;
use std::cell::RefCell;
use std::future::Future;
use std::io::ErrorKind;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Largest read of one step, as [`super::BUFFER`] for the buffered relay.
const SCRATCH: usize = super::BUFFER;

thread_local! {
    /// The read buffer every readiness-driven tunnel of this thread shares:
    /// it is only used within one poll, never held across one.
    static SCRATCH_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// One direction of the tunnel.
#[derive(Debug, Default)]
struct Flow {
    /// Bytes read but not yet written to the other side.
    pending: Vec<u8>,
    /// The source sent its EOF.
    eof: bool,
    /// The EOF was passed on (write shutdown of the destination).
    done: bool,
    /// Bytes read from the source.
    moved: u64,
}

impl Flow {
    /// A direction whose source already sent `prefix`.
    fn with_prefix(prefix: Bytes) -> Self {
        Self {
            moved: prefix.len() as u64,
            pending: prefix.to_vec(),
            ..Self::default()
        }
    }

    /// One step from `from` to `to`: writes what is held once `to` can take
    /// it, else reads once `from` has something. `Ready(moved)` when it
    /// acted (moved: bytes went through), `Pending` when it waits (the
    /// socket it waits for wakes the task) or is done.
    fn step(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
    ) -> Result<Poll<bool>, Failed> {
        self.pass_eof(to)?;
        let (ready, failed) = if !self.pending.is_empty() {
            (to.poll_write_ready(cx), Failed::Write)
        } else if !self.eof {
            (from.poll_read_ready(cx), Failed::Read)
        } else {
            return Ok(Poll::Pending);
        };
        match ready {
            Poll::Pending => Ok(Poll::Pending),
            Poll::Ready(Err(_)) => Err(failed),
            Poll::Ready(Ok(())) if failed == Failed::Write => self.flush(to).map(Poll::Ready),
            Poll::Ready(Ok(())) => self.read(from, to).map(Poll::Ready),
        }
    }

    /// Reads what `from` has and writes it to `to`, keeping what `to` cannot
    /// take now. `Ok(true)` when bytes moved.
    fn read(&mut self, from: &TcpStream, to: &TcpStream) -> Result<bool, Failed> {
        SCRATCH_BUFFER.with_borrow_mut(|buf| match from.try_read(buf) {
            Ok(0) => {
                self.eof = true;
                Ok(false)
            }
            Ok(n) => {
                let sent = match to.try_write(&buf[..n]) {
                    Ok(sent) => sent,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                    Err(_) => return Err(Failed::Write),
                };
                self.pending.extend_from_slice(&buf[sent..n]);
                self.moved += n as u64;
                Ok(true)
            }
            // Readiness was stale: wait again.
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(_) => Err(Failed::Read),
        })
    }

    /// Writes what is held to `to`; frees the copy once it is all out.
    fn flush(&mut self, to: &TcpStream) -> Result<bool, Failed> {
        match to.try_write(&self.pending) {
            Ok(sent) => {
                self.pending.drain(..sent);
                if self.pending.is_empty() {
                    self.pending = Vec::new();
                }
                Ok(sent > 0)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(_) => Err(Failed::Write),
        }
    }

    /// Passes the source's EOF on as a half-close once all is written.
    fn pass_eof(&mut self, to: &TcpStream) -> Result<(), Failed> {
        if self.eof && !self.done && self.pending.is_empty() {
            self.done = true;
            match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
                // The destination closed already: nothing left to tell it.
                Err(e) if e.kind() != ErrorKind::NotConnected => return Err(Failed::Write),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Relays between `client` and `node` like [`super::relay`] (half-close passed
/// on, the first error resets the other side, `idle` and `stop` end it),
/// first writing `client_prefix` to the node and `node_prefix` to the client:
/// bytes already read from each before the tunnel began.
///
/// The relay is one closure over its state, each part held once: an `async
/// fn` would keep its arguments beside the values made from them (the
/// prefixes, `stop`) for as long as the tunnel is open. Called within the
/// runtime (the idle timer starts here).
pub fn relay<S: Future<Output = ()>>(
    (client_prefix, client): (Bytes, TcpStream),
    (node_prefix, node): (Bytes, TcpStream),
    idle: Duration,
    stop: S,
) -> impl Future<Output = Relayed> {
    let mut tunnel = Tunnel {
        up: Flow::with_prefix(client_prefix),
        down: Flow::with_prefix(node_prefix),
        client,
        node,
        idle,
        timer: Box::pin(tokio::time::sleep(idle)),
    };
    let mut stop = Box::pin(stop);
    std::future::poll_fn(move |cx| {
        let end = std::task::ready!(tunnel.poll_end(cx, stop.as_mut()));
        Poll::Ready(Relayed {
            to_node: tunnel.up.moved,
            to_client: tunnel.down.moved,
            end: super::ended(end, &tunnel.client, &tunnel.node),
        })
    })
}

/// The state of one readiness-driven tunnel.
struct Tunnel {
    client: TcpStream,
    node: TcpStream,
    /// From the client to the node.
    up: Flow,
    /// From the node to the client.
    down: Flow,
    idle: Duration,
    /// Reset whenever bytes move.
    timer: Pin<Box<Sleep>>,
}

impl Tunnel {
    /// Moves what both sides allow; ready with how the tunnel ended, or the
    /// side that failed.
    fn poll_end<S: Future<Output = ()>>(
        &mut self,
        cx: &mut Context<'_>,
        mut stop: Pin<&mut S>,
    ) -> Poll<Result<TunnelEnd, Side>> {
        let mut moved = false;
        // One step of each direction in turn, so a busy one cannot starve
        // the other, until both wait (or are done).
        loop {
            let to_node = (self.up)
                .step(cx, &self.client, &self.node)
                .map_err(|f| f.side(Side::Client, Side::Node))?;
            let to_client = (self.down)
                .step(cx, &self.node, &self.client)
                .map_err(|f| f.side(Side::Node, Side::Client))?;
            match (to_node, to_client) {
                (Poll::Pending, Poll::Pending) => break,
                (to_node, to_client) => {
                    moved |= to_node == Poll::Ready(true) || to_client == Poll::Ready(true);
                }
            }
        }
        if self.up.done && self.down.done {
            return Poll::Ready(Ok(TunnelEnd::Closed));
        }
        if moved {
            self.timer.as_mut().reset(Instant::now() + self.idle);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(TunnelEnd::Idle));
        }
        if stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(TunnelEnd::Shutdown));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::Reset;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets: (ours, the tunnel's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap());
        let (ours, (theirs, _)) = tokio::join!(ours, async { listener.accept().await.unwrap() });
        (ours.unwrap(), theirs)
    }

    fn start(
        client: TcpStream,
        node: TcpStream,
        idle: Duration,
    ) -> tokio::task::JoinHandle<Relayed> {
        tokio::spawn(relay(
            (Bytes::from_static(b"pre:"), client),
            (Bytes::new(), node),
            idle,
            std::future::pending(),
        ))
    }

    #[tokio::test]
    async fn relays_both_ways_with_the_prefix_and_passes_half_close() {
        let (mut client, client_end) = pair().await;
        let (mut node, node_end) = pair().await;
        let tunnel = start(client_end, node_end, Duration::from_secs(10));
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        node.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"pre:hello");
        // The client's half-close left the other direction open.
        node.write_all(b"world").await.unwrap();
        node.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"world");
        let relayed = tunnel.await.unwrap();
        assert_eq!(
            relayed,
            Relayed {
                to_node: 9,
                to_client: 5,
                end: TunnelEnd::Closed
            }
        );
    }

    #[tokio::test]
    async fn bulk_data_arrives_intact_past_a_slow_reader() {
        let (mut client, client_end) = pair().await;
        let (mut node, node_end) = pair().await;
        let tunnel = start(client_end, node_end, Duration::from_secs(10));
        // Far more than the socket buffers hold: the tunnel has to keep what
        // the node cannot take and stop reading meanwhile.
        let data: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut got = Vec::new();
        node.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), data.len() + 4);
        assert!(got[4..] == data[..], "bytes changed on the way");
        drop(node);
        drop(writer.await.unwrap());
        assert_eq!(tunnel.await.unwrap().to_node, data.len() as u64 + 4);
    }

    /// A waker that only lets its copies be counted.
    struct Counted;

    impl std::task::Wake for Counted {
        fn wake(self: std::sync::Arc<Self>) {}
    }

    #[tokio::test]
    async fn the_tunnel_drops_the_wakers_the_sockets_earlier_owners_left() {
        let (_client, client_end) = pair().await;
        let (mut node, node_end) = pair().await;
        // An earlier owner (hyper's connection task) read the idle sockets
        // dry and waited for more, leaving its waker with each of them.
        let earlier = std::sync::Arc::new(Counted);
        let waker = std::task::Waker::from(earlier.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        for socket in [&client_end, &node_end] {
            let read = socket.try_read(&mut [0u8; 16]).map_err(|e| e.kind());
            assert_eq!(read, Err(ErrorKind::WouldBlock));
            assert!(socket.poll_read_ready(&mut cx).is_pending());
        }
        drop(waker);
        assert_eq!(std::sync::Arc::strong_count(&earlier), 3);
        let tunnel = start(client_end, node_end, Duration::from_secs(10));
        // The prefix arriving means the tunnel has run.
        let mut prefix = [0u8; 4];
        node.read_exact(&mut prefix).await.unwrap();
        assert_eq!(
            std::sync::Arc::strong_count(&earlier),
            1,
            "the idle tunnel's sockets still hold the earlier owner's waker"
        );
        tunnel.abort();
    }

    #[tokio::test]
    async fn an_idle_tunnel_ends_and_a_reset_is_passed_on() {
        let (_client, client_end) = pair().await;
        let (_node, node_end) = pair().await;
        let relayed = start(client_end, node_end, Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(relayed.end, TunnelEnd::Idle);

        let (client, client_end) = pair().await;
        let (mut node, node_end) = pair().await;
        let tunnel = start(client_end, node_end, Duration::from_secs(10));
        let mut prefix = [0u8; 4];
        node.read_exact(&mut prefix).await.unwrap();
        client.reset_on_close();
        drop(client);
        assert_eq!(tunnel.await.unwrap().end, TunnelEnd::Error);
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), node.read(&mut buf))
            .await
            .expect("the node learns at once");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(ErrorKind::ConnectionReset),
            "the client's reset reaches the node as a reset"
        );
    }
}
