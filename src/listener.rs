//! Binding listening sockets with the options a load balancer needs, via socket2.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::SocketAddr;

/// Binds a TCP listener with SO_REUSEADDR and SO_REUSEPORT (so a new process can
/// take over the port during an upgrade), IPV6_V6ONLY for IPv6 addresses (so
/// `[::]:80` and `0.0.0.0:80` can be bound side by side) and the given backlog.
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<tokio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
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

/// Binds a UDP socket with SO_REUSEADDR (and IPV6_V6ONLY for IPv6).
pub fn bind_udp(addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(addr))?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Per-connection socket options for an accepted or outgoing TCP stream:
/// TCP_NODELAY, because signalling and playlist requests are small and latency
/// matters more than packet count, and keepalive so dead peers of long tunnels
/// are noticed by the kernel.
pub fn tune_stream(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new().with_time(std::time::Duration::from_secs(60));
    let _ = sock.set_tcp_keepalive(&keepalive);
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
    async fn udp_binds() {
        let s = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(s.local_addr().unwrap().port(), 0);
    }
}
