//! Binding listening sockets with the options a load balancer needs, via socket2.
//!
//! During a seamless upgrade (see `crate::upgrade`) the new process is handed
//! the old one's listening sockets before it binds anything: [`inherit`]
//! stores them, and [`bind_tcp`]/[`bind_udp`] take the one already bound to
//! the wanted address instead of binding a new socket, so the kernel's accept
//! queue and UDP buffer carry over and no connection is refused in between.
//! [`Listening`] is the other half: the sockets a running process would hand on.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

/// Listening sockets received from the previous process, not yet claimed.
static INHERITED: Mutex<Vec<Socket>> = Mutex::new(Vec::new());

/// Offers `sockets` (received from the previous process) to the binds that follow.
pub fn inherit(sockets: Vec<OwnedFd>) {
    let mut inherited = INHERITED.lock().unwrap_or_else(PoisonError::into_inner);
    inherited.extend(sockets.into_iter().map(Socket::from));
}

/// Closes the inherited sockets no listener of this config claimed (a
/// listener the new config dropped); returns how many.
pub fn release_unclaimed() -> usize {
    let mut inherited = INHERITED.lock().unwrap_or_else(PoisonError::into_inner);
    let count = inherited.len();
    inherited.clear();
    count
}

/// Takes the inherited socket of type `ty` bound to `addr`. A `:0` bind is
/// never matched: it asks for a fresh port.
fn take_inherited(addr: SocketAddr, ty: Type) -> Option<Socket> {
    if addr.port() == 0 {
        return None;
    }
    let mut inherited = INHERITED.lock().unwrap_or_else(PoisonError::into_inner);
    let index = inherited.iter().position(|s| {
        s.r#type().ok() == Some(ty) && s.local_addr().ok().and_then(|a| a.as_socket()) == Some(addr)
    })?;
    let socket = inherited.swap_remove(index);
    tracing::info!(%addr, "listening socket taken over from the previous process");
    Some(socket)
}

/// Which part of amslb owns a listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A `[[listener]]` (TCP or UDP).
    Listener,
    /// The `[stats]` listener.
    Stats,
}

/// Key of a listening socket: owner, name and the address as configured.
type ListenKey = (Owner, Arc<str>, SocketAddr);

/// Copies of every listening socket in use, so a seamless upgrade can hand
/// them to the new process. A socket must be removed when its listener
/// stops, or the copy would keep the port bound.
#[derive(Debug, Default)]
pub struct Listening {
    sockets: Mutex<HashMap<ListenKey, OwnedFd>>,
}

impl Listening {
    /// Records a copy of `socket`, the listener `name` bound at `addr`.
    pub fn add(&self, owner: Owner, name: Arc<str>, addr: SocketAddr, socket: &impl AsFd) {
        match socket.as_fd().try_clone_to_owned() {
            Ok(copy) => {
                self.lock().insert((owner, name, addr), copy);
            }
            Err(e) => {
                tracing::warn!(listener = %name, %addr, error = %e, "cannot keep a copy of a listening socket; an upgrade will bind it anew");
            }
        }
    }

    /// Forgets the socket of listener `name` at `addr` (the listener stopped).
    pub fn remove(&self, owner: Owner, name: &Arc<str>, addr: SocketAddr) {
        self.lock().remove(&(owner, name.clone(), addr));
    }

    /// Forgets every socket: the process is stopping (or has handed its
    /// listeners on), and a kept copy would leave the ports accepting.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Fresh copies of every recorded socket, to send to a new process.
    pub fn copies(&self) -> io::Result<Vec<OwnedFd>> {
        self.lock().values().map(|fd| fd.try_clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ListenKey, OwnedFd>> {
        self.sockets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Binds a TCP listener with SO_REUSEADDR and SO_REUSEPORT (so a new process can
/// take over the port during an upgrade), IPV6_V6ONLY for IPv6 addresses (so
/// `[::]:80` and `0.0.0.0:80` can be bound side by side), the given backlog
/// and the per-connection options of [`tune_stream`], which the connections
/// it accepts inherit (see [`tune_accepted`]).
///
/// An inherited socket bound to `addr` is used instead, as it is (its
/// backlog stays what the previous process set).
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<tokio::net::TcpListener> {
    if let Some(socket) = take_inherited(addr, Type::STREAM) {
        socket.set_nonblocking(true)?;
        // An older process may not have set them.
        tune(&socket);
        return tokio::net::TcpListener::from_std(socket.into());
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    tune(&socket);
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Binds a UDP socket with SO_REUSEADDR (and IPV6_V6ONLY for IPv6), or
/// takes the inherited one bound to `addr`.
pub fn bind_udp(addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    if let Some(socket) = take_inherited(addr, Type::DGRAM) {
        socket.set_nonblocking(true)?;
        return tokio::net::UdpSocket::from_std(socket.into());
    }
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(addr))?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Per-connection socket options for an outgoing TCP stream: TCP_NODELAY,
/// because signalling and playlist requests are small and latency matters
/// more than packet count, and keepalive so dead peers of long tunnels are
/// noticed by the kernel.
pub fn tune_stream(stream: &tokio::net::TcpStream) {
    tune(&socket2::SockRef::from(stream));
}

/// The options of [`tune_stream`] for an accepted stream. Linux copies a
/// listening socket's TCP options into every connection it accepts, and
/// [`bind_tcp`] has set them there, so nothing is left to do: three
/// setsockopt calls fewer per connection. Other systems get them here.
pub fn tune_accepted(stream: &tokio::net::TcpStream) {
    #[cfg(not(target_os = "linux"))]
    tune_stream(stream);
    #[cfg(target_os = "linux")]
    let _ = stream;
}

fn tune(socket: &Socket) {
    let _ = socket.set_tcp_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(std::time::Duration::from_secs(60));
    let _ = socket.set_tcp_keepalive(&keepalive);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_ipv4_and_ipv6_on_the_same_port() {
        let v4 = bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let port = v4.local_addr().unwrap().port();
        let v6 = bind_tcp(SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], port)), 16);
        // ::1 may be missing on some CI hosts; when it exists the bind must work.
        if let Err(e) = &v6 {
            assert_eq!(e.kind(), io::ErrorKind::AddrNotAvailable, "{e}");
        }
    }

    #[tokio::test]
    async fn inherited_socket_keeps_its_queued_connections() {
        let original = bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = original.local_addr().unwrap();
        // Queued in the kernel, not accepted by anyone yet.
        let client = std::net::TcpStream::connect(addr).unwrap();
        inherit(vec![OwnedFd::from(original.into_std().unwrap())]);
        let taken = bind_tcp(addr, 16).unwrap();
        let (_stream, peer) =
            tokio::time::timeout(std::time::Duration::from_secs(5), taken.accept())
                .await
                .unwrap()
                .unwrap();
        assert_eq!(peer, client.local_addr().unwrap(), "the same kernel socket");
        assert_eq!(release_unclaimed(), 0);
    }

    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_keepalive() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        tune_accepted(&accepted);
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().unwrap(), "TCP_NODELAY");
        assert!(sock.keepalive().unwrap(), "SO_KEEPALIVE");
        assert_eq!(
            sock.tcp_keepalive_time().unwrap(),
            std::time::Duration::from_secs(60)
        );
    }

    #[tokio::test]
    async fn udp_binds() {
        let s = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(s.local_addr().unwrap().port(), 0);
    }
}
