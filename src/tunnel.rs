//! Relaying bytes both ways between two connections (WebSocket after the
//! upgrade, TCP passthrough), with an idle timeout like HAProxy's `timeout tunnel`.
//!
//! A side that ends is passed on the way it ended, at once: an EOF as a
//! half-close (FIN) on the other side, a reset or any other error by closing
//! the other side too, as a reset (RST, via `SO_LINGER` 0) where the other side
//! is a socket amslb can reach ([`Reset`]). Without that, a publisher that
//! vanishes leaves a ghost publisher on the node, and a node that resets is
//! noticed by the client only at its next write.

mod sockets;

use bytes::{Buf, Bytes};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::either::Either;

/// A connection whose close can be turned into a reset: after
/// [`Reset::reset_on_close`], dropping it sends RST instead of FIN. Types that
/// hide their socket do nothing (their close stays a FIN).
pub trait Reset {
    /// Makes the next close of the underlying TCP socket a reset.
    fn reset_on_close(&self);
}

impl Reset for TcpStream {
    fn reset_on_close(&self) {
        // Best effort: on failure the close is a FIN, which still closes.
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }
}

impl Reset for tokio::net::tcp::OwnedWriteHalf {
    fn reset_on_close(&self) {
        let stream: &TcpStream = self.as_ref();
        stream.reset_on_close();
    }
}

impl<T: Reset> Reset for tokio_rustls::server::TlsStream<T> {
    fn reset_on_close(&self) {
        self.get_ref().0.reset_on_close();
    }
}

impl<T: Reset> Reset for tokio_rustls::client::TlsStream<T> {
    fn reset_on_close(&self) {
        self.get_ref().0.reset_on_close();
    }
}

impl<T: Reset + ?Sized> Reset for Box<T> {
    fn reset_on_close(&self) {
        (**self).reset_on_close();
    }
}

impl<L: Reset, R: Reset> Reset for Either<L, R> {
    fn reset_on_close(&self) {
        match self {
            Either::Left(l) => l.reset_on_close(),
            Either::Right(r) => r.reset_on_close(),
        }
    }
}

/// A stream joined from a read half and a write half: the write half holds the socket.
impl<R: AsyncRead, W: AsyncWrite + Reset> Reset for tokio::io::Join<R, W> {
    fn reset_on_close(&self) {
        self.writer().reset_on_close();
    }
}

/// In-memory pipes (tests) have no socket to reset.
impl Reset for tokio::io::DuplexStream {
    fn reset_on_close(&self) {}
}

/// A connection hyper has upgraded (WebSocket), unwrapped back to its socket
/// when hyper's type allows it, so a reset can be passed on as a reset.
pub type UpgradedIo = Prefixed<Either<TcpStream, Either<Box<ServerTls>, TokioUpgraded>>>;
type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;
type TokioUpgraded = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// Unwraps `upgraded` to the TCP or TLS-over-TCP stream hyper was given (the
/// plain and `https` listeners, and node connections), keeping the bytes hyper
/// had already read past the upgrade; other transports stay wrapped (and close
/// with FIN only).
pub fn upgraded(upgraded: hyper::upgrade::Upgraded) -> UpgradedIo {
    use hyper_util::rt::TokioIo;
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => return Prefixed::new(parts.read_buf, Either::Left(parts.io.into_inner())),
        Err(upgraded) => upgraded,
    };
    // Client connections come wrapped in their write timeout, behind the
    // bytes read before hyper took the connection (`http::h1`); the tunnel's
    // own idle timeout (`timeouts.tunnel`) takes over from here.
    let upgraded = match upgraded.downcast::<TokioIo<Prefixed<WriteTimeout<TcpStream>>>>() {
        Ok(parts) => {
            let (prefix, io) = parts.io.into_inner().after(parts.read_buf);
            return Prefixed::new(prefix, Either::Left(io.io));
        }
        Err(upgraded) => upgraded,
    };
    let upgraded = match upgraded.downcast::<TokioIo<Prefixed<WriteTimeout<ServerTls>>>>() {
        Ok(parts) => {
            let (prefix, io) = parts.io.into_inner().after(parts.read_buf);
            return Prefixed::new(prefix, Either::Right(Either::Left(Box::new(io.io))));
        }
        Err(upgraded) => upgraded,
    };
    match upgraded.downcast::<TokioIo<ServerTls>>() {
        Ok(parts) => Prefixed::new(
            parts.read_buf,
            Either::Right(Either::Left(Box::new(parts.io.into_inner()))),
        ),
        Err(upgraded) => Prefixed::new(
            Bytes::new(),
            Either::Right(Either::Right(TokioIo::new(upgraded))),
        ),
    }
}

impl UpgradedIo {
    /// The plain TCP socket and the bytes already read from it, or `self`
    /// when it is TLS or a transport hyper keeps wrapped.
    fn into_socket(self) -> Result<(Bytes, TcpStream), Self> {
        match self.inner {
            Either::Left(socket) => Ok((self.prefix, socket)),
            inner => Err(Prefixed::new(self.prefix, inner)),
        }
    }
}

/// Relays between two upgraded connections like [`relay`]; between two plain
/// TCP sockets (a WebSocket on a plain listener to a plain node) readiness
/// driven, so an idle tunnel holds no buffer (`tunnel/sockets.rs`).
///
/// A plain function returning the relay itself, not an `async fn`: that
/// would keep its own copy of both connections and of `stop` beside the
/// relay's for as long as the tunnel is open, in every idle tunnel's task.
pub fn relay_upgraded<S: std::future::Future<Output = ()>>(
    client: UpgradedIo,
    node: UpgradedIo,
    idle: Duration,
    stop: S,
) -> impl std::future::Future<Output = Relayed> {
    match (client.into_socket(), node.into_socket()) {
        (Ok(client), Ok(node)) => Either::Left(sockets::relay(client, node, idle, stop)),
        (client, node) => {
            tracing::debug!(
                client_plain = client.is_ok(),
                node_plain = node.is_ok(),
                "tunnel relayed through buffers"
            );
            let rewrap = |io: Result<(Bytes, TcpStream), UpgradedIo>| match io {
                Ok((prefix, socket)) => Prefixed::new(prefix, Either::Left(socket)),
                Err(io) => io,
            };
            // Boxed: the buffered relay's state is much larger than the
            // readiness one's, and the task is sized for the larger.
            Either::Right(Box::pin(relay(rewrap(client), rewrap(node), idle, stop)))
        }
    }
}

impl Reset for TokioUpgraded {
    fn reset_on_close(&self) {}
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    /// `inner`, whose reads first return `prefix`.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }

    /// `inner` after the bytes hyper read past an upgrade (`read_buf`), and
    /// before them what is left of the prefix (hyper read `read_buf` from
    /// this stream, so the rest of the prefix comes after it).
    fn after(self, read_buf: Bytes) -> (Bytes, T) {
        let prefix = match (read_buf.is_empty(), self.prefix.is_empty()) {
            (_, true) => read_buf,
            (true, false) => self.prefix,
            (false, false) => [read_buf, self.prefix].concat().into(),
        };
        (prefix, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// Implements [`AsyncWrite`] and [`Reset`] for a wrapper `$ty<S>` that only
/// changes reads, passing both straight to its field `$field`.
macro_rules! write_through {
    ($ty:ident, $field:ident) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<S> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                data: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_write(cx, data)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                parts: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_write_vectored(cx, parts)
            }

            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_shutdown(cx)
            }
        }

        impl<S: $crate::tunnel::Reset> $crate::tunnel::Reset for $ty<S> {
            fn reset_on_close(&self) {
                self.$field.reset_on_close();
            }
        }
    };
}
pub(crate) use write_through;

write_through!(Prefixed, inner);

/// Which side of a tunnel failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's connection.
    Client,
    /// The node's connection.
    Node,
}

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
/// close their sending side first still get their answer. An error on either
/// side ends the tunnel at once, the other side reset ([`Reset`]) before both
/// are closed.
pub async fn relay<C, N>(
    client: C,
    node: N,
    idle: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin + Reset,
    N: AsyncRead + AsyncWrite + Unpin + Reset,
{
    let started = Instant::now();
    let last_activity = Arc::new(AtomicU64::new(0));
    let to_node = Arc::new(AtomicU64::new(0));
    let to_client = Arc::new(AtomicU64::new(0));
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut node_read, mut node_write) = tokio::io::split(node);

    let end = {
        let up = pump(
            &mut client_read,
            &mut node_write,
            &to_node,
            &last_activity,
            started,
        );
        let up = async { up.await.map_err(|at| at.side(Side::Client, Side::Node)) };
        let down = pump(
            &mut node_read,
            &mut client_write,
            &to_client,
            &last_activity,
            started,
        );
        let down = async { down.await.map_err(|at| at.side(Side::Node, Side::Client)) };
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
        tokio::select! {
            // The first error wins; two EOFs end it normally.
            done = async { tokio::try_join!(up, down) } => done.map(|_| TunnelEnd::Closed),
            _ = watchdog => Ok(TunnelEnd::Idle),
            _ = stop => Ok(TunnelEnd::Shutdown),
        }
    };
    let client = client_read.unsplit(client_write);
    let node = node_read.unsplit(node_write);
    let end = ended(end, &client, &node);
    drop((client, node));
    Relayed {
        to_node: to_node.load(Ordering::Relaxed),
        to_client: to_client.load(Ordering::Relaxed),
        end,
    }
}

/// How a tunnel ended; when a side failed, the other is set to reset on
/// close (both relays pass an error on this way).
fn ended(end: Result<TunnelEnd, Side>, client: &impl Reset, node: &impl Reset) -> TunnelEnd {
    match end {
        Ok(end) => end,
        Err(failed) => {
            match failed {
                Side::Client => node.reset_on_close(),
                Side::Node => client.reset_on_close(),
            }
            TunnelEnd::Error
        }
    }
}

/// Where one direction of a tunnel failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Reading from its source.
    Read,
    /// Writing to (or shutting down) its destination.
    Write,
}

impl Failed {
    /// The side that failed, given the direction's source and destination.
    pub fn side(self, from: Side, to: Side) -> Side {
        match self {
            Failed::Read => from,
            Failed::Write => to,
        }
    }
}

async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &AtomicU64,
    last_activity: &AtomicU64,
    started: Instant,
) -> Result<(), Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; FIRST_BUFFER];
    loop {
        let n = reader.read(&mut buf).await.map_err(|_| Failed::Read)?;
        if n == 0 {
            return writer.shutdown().await.map_err(|_| Failed::Write);
        }
        // A read that filled the buffer means data is flowing: grow towards BUFFER.
        if n == buf.len() && buf.len() < BUFFER {
            buf.resize((buf.len() * 4).min(BUFFER), 0);
        }
        writer
            .write_all(&buf[..n])
            .await
            .map_err(|_| Failed::Write)?;
        writer.flush().await.map_err(|_| Failed::Write)?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        let now = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_activity.store(now, Ordering::Relaxed);
    }
}

/// The error text of a [`WriteTimeout`] expiry, so callers can tell it apart.
pub(crate) const WRITE_TIMEOUT: &str = "client read nothing for timeouts.client";

/// A timer that measures one wait at a time: armed when a poll finds nothing
/// to do, disarmed when the next one makes progress. One allocation for the
/// life of its owner, a timer-wheel reset per wait.
#[derive(Debug)]
pub struct IdleTimer {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl IdleTimer {
    /// A disarmed timer whose waits may last `limit`.
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            sleep: None,
            armed: false,
        }
    }

    /// Called when a poll came back pending: starts the wait if none is
    /// running and tells whether it has lasted `limit` (registering `cx`
    /// to be woken when it will).
    pub fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = Instant::now() + self.limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            sleep.as_mut().reset(deadline);
            self.armed = true;
        }
        sleep.as_mut().poll(cx).is_ready()
    }

    /// Called when a poll made progress: the wait is over.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

/// A client connection whose writes may not wait longer than `timeouts.client`
/// (it lives here, below the HTTP layer, so [`upgraded`] can unwrap it):
/// a client that stops reading (a full socket buffer) is cut off, which drops
/// the response body and with it the node connection and its lease. Reads
/// are untouched (hyper's header-read timeout and the body timers cover them).
#[derive(Debug)]
pub struct WriteTimeout<IO> {
    io: IO,
    timer: IdleTimer,
}

impl<IO> WriteTimeout<IO> {
    /// Wraps `io`; a write pending for `limit` fails with `TimedOut`.
    pub fn new(io: IO, limit: Duration) -> Self {
        Self {
            io,
            timer: IdleTimer::new(limit),
        }
    }

    fn track<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending if self.timer.expired(cx) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, WRITE_TIMEOUT)))
            }
            Poll::Pending => Poll::Pending,
            done => {
                self.timer.disarm();
                done
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteTimeout<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.track(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.track(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.track(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.track(cx, polled)
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
