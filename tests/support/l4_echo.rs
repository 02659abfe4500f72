//! Plain L4 stand-ins for a node's RTMP and SRT ports: each answer names the
//! node, so a test sees where amslb placed a session without a media stack.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Serves node `id`'s L4 ports on `ip`: RTMP port 1935 echoes TCP bytes
/// prefixed with `id:`, SRT port 4200 echoes datagrams prefixed with `id:`.
pub async fn serve(ip: IpAddr, id: &str) {
    let tcp = TcpListener::bind((ip, 1935)).await.unwrap();
    let prefix = format!("{id}:").into_bytes();
    let tcp_prefix = prefix.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            let prefix = tcp_prefix.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    let mut out = prefix.clone();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let udp = UdpSocket::bind((ip, 4200)).await.unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let mut out = prefix.clone();
            out.extend_from_slice(&buf[..n]);
            let _ = udp.send_to(&out, from).await;
        }
    });
}

/// Sends `message` on `s` and returns the answer (`node:message`).
pub async fn tcp_round(s: &mut TcpStream, message: &[u8]) -> std::io::Result<String> {
    s.write_all(message).await?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no answer in 5 s"))??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A new TCP session through `addr`: the node that echoes `message`.
pub async fn tcp_session(addr: SocketAddr, message: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    tcp_round(&mut s, message).await
}

/// One datagram from a fresh client address (a new session) and the answer.
pub async fn udp_round(addr: SocketAddr) -> std::io::Result<String> {
    let client = UdpSocket::bind((addr.ip(), 0)).await?;
    client.send_to(b"hello", addr).await?;
    let mut buf = [0u8; 1024];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no answer in 5 s"))??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
