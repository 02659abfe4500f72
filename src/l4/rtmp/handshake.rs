//! The plain RTMP handshake (version 3, no digest), both sides: amslb answers
//! a client's C0/C1 itself when it must read the client's commands before a
//! node is chosen, and then shakes hands with the chosen node as a client.
//! After the handshake the two legs carry identical chunk streams: nothing in
//! RTMP binds the chunk stream to the handshake bytes.

use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of C1, C2, S1, S2.
pub const PACKET: usize = 1536;

/// A C1/S1 packet: time 0, version 0 (which tells peers "plain handshake, no
/// digest"), then random bytes.
fn hello_packet() -> Vec<u8> {
    let mut packet = vec![0u8; PACKET];
    rand::fill(&mut packet[8..]);
    packet
}

/// S0 + S1 + S2 answering a client's C1: S2 echoes C1, as the plain handshake
/// requires.
pub fn server_reply(c1: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 2 * PACKET);
    out.push(3);
    out.extend_from_slice(&hello_packet());
    out.extend_from_slice(c1);
    out
}

/// Shakes hands with a node as a client: C0+C1, wait for S0+S1+S2, send C2
/// (the echo of S1).
pub async fn with_node<S: AsyncRead + AsyncWrite + Unpin>(node: &mut S) -> io::Result<()> {
    let mut hello = vec![3u8];
    hello.extend_from_slice(&hello_packet());
    node.write_all(&hello).await?;
    let mut reply = vec![0u8; 1 + 2 * PACKET];
    node.read_exact(&mut reply).await?;
    if reply[0] != 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("node answered RTMP version {}", reply[0]),
        ));
    }
    node.write_all(&reply[1..=PACKET]).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn client_and_server_sides_fit_together() {
        let (mut lb, mut node) = duplex(8192);
        let server = async {
            let mut c0c1 = vec![0u8; 1 + PACKET];
            node.read_exact(&mut c0c1).await.unwrap();
            assert_eq!(c0c1[0], 3);
            node.write_all(&server_reply(&c0c1[1..])).await.unwrap();
            let mut c2 = vec![0u8; PACKET];
            node.read_exact(&mut c2).await.unwrap();
            c2
        };
        let (done, c2) = tokio::join!(with_node(&mut lb), server);
        done.unwrap();
        assert_eq!(c2.len(), PACKET);
        assert_eq!(&c2[4..8], &[0, 0, 0, 0], "C2 echoes S1, whose version is 0");
    }

    #[tokio::test]
    async fn wrong_version_from_node_is_an_error() {
        let (mut lb, mut node) = duplex(8192);
        let server = async {
            let mut c0c1 = vec![0u8; 1 + PACKET];
            node.read_exact(&mut c0c1).await.unwrap();
            let mut reply = server_reply(&c0c1[1..]);
            reply[0] = 6;
            node.write_all(&reply).await.unwrap();
        };
        let (done, ()) = tokio::join!(with_node(&mut lb), server);
        assert_eq!(done.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
