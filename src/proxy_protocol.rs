//! Reading the PROXY protocol header (v1 text and v2 binary) that a fronting L4
//! balancer sends first, so the real client address reaches logs,
//! X-Forwarded-For and the nodes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 spec caps a header line at 107 bytes including CRLF.
const V1_MAX: usize = 107;
/// v2 address blocks we accept are small; refuse absurd lengths instead of allocating them.
const V2_MAX_BODY: usize = 512;

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The connection did not start with a PROXY header.
    #[error("connection does not start with a PROXY protocol header")]
    Missing,
    /// The header is there but malformed.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    /// Reading failed or the peer closed early.
    #[error("reading PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one PROXY header from the start of `stream`, consuming exactly its
/// bytes. Returns the client address it names, or `None` for `LOCAL` /
/// `UNKNOWN` headers (health checks of the fronting balancer), in which case
/// the socket peer is the client.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut start = [0u8; 12];
    stream.read_exact(&mut start).await?;
    if start == V2_SIGNATURE {
        let mut head = [0u8; 4];
        stream.read_exact(&mut head).await?;
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        if len > V2_MAX_BODY {
            return Err(ProxyHeaderError::Malformed("v2 address block too long"));
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        return parse_v2(head[0], head[1], &body);
    }
    if !start.starts_with(b"PROXY ") {
        return Err(ProxyHeaderError::Missing);
    }
    let mut line = start.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"));
        }
        line.push(stream.read_u8().await?);
    }
    parse_v1(&line)
}

/// Parses a complete v1 line, CRLF included.
fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let bad = ProxyHeaderError::Malformed;
    let text = std::str::from_utf8(&line[..line.len() - 2]).map_err(|_| bad("v1 not ASCII"))?;
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        [
            "PROXY",
            family @ ("TCP4" | "TCP6"),
            src,
            _dst,
            src_port,
            _dst_port,
        ] => {
            let ip: IpAddr = src.parse().map_err(|_| bad("v1 source address"))?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err(bad("v1 address does not match its family"));
            }
            let port: u16 = src_port.parse().map_err(|_| bad("v1 source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(bad("v1 fields")),
    }
}

fn parse_v2(ver_cmd: u8, family: u8, body: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let bad = ProxyHeaderError::Malformed;
    if ver_cmd >> 4 != 2 {
        return Err(bad("v2 version"));
    }
    match ver_cmd & 0x0f {
        0 => return Ok(None), // LOCAL
        1 => {}               // PROXY
        _ => return Err(bad("v2 command")),
    }
    match family {
        // TCP or UDP over IPv4: src(4) dst(4) sport(2) dport(2)
        0x11 | 0x12 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Ok(Some(SocketAddr::new(ip.into(), port)))
        }
        // TCP or UDP over IPv6: src(16) dst(16) sport(2) dport(2)
        0x21 | 0x22 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Ok(Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port)))
        }
        0x11 | 0x12 | 0x21 | 0x22 => Err(bad("v2 address block too short")),
        // AF_UNSPEC / unix sockets: no usable client address.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut cursor = std::io::Cursor::new(bytes.to_vec());
        let result = read_header(&mut cursor).await;
        let pos = cursor.position() as usize;
        (result, bytes[pos..].to_vec())
    }

    #[tokio::test]
    async fn v1_tcp4_and_rest_untouched() {
        let (r, rest) =
            read(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 80\r\nGET / HTTP/1.1\r\n").await;
        assert_eq!(r.unwrap(), Some("203.0.113.7:40000".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn v1_tcp6_and_unknown() {
        let (r, _) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 5 6\r\n").await;
        assert_eq!(r.unwrap(), Some("[2001:db8::1]:5".parse().unwrap()));
        let (r, _) = read(b"PROXY UNKNOWN\r\nxx").await;
        assert_eq!(r.unwrap(), None);
    }

    #[tokio::test]
    async fn v1_malformed() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            &[b'P', b'R', b'O', b'X', b'Y', b' '].repeat(30)[..],
        ] {
            assert!(
                read(bad).await.0.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\n\r\n").await.0,
            Err(ProxyHeaderError::Missing)
        ));
    }

    #[tokio::test]
    async fn v2_tcp4_proxy_and_local() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[
            0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0x1f, 0x90, 0, 80,
        ]);
        h.extend_from_slice(b"rest");
        let (r, rest) = read(&h).await;
        assert_eq!(r.unwrap(), Some("198.51.100.9:8080".parse().unwrap()));
        assert_eq!(rest, b"rest");

        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(read(&local).await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn v2_tcp6_and_truncated() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x21, 0, 36]);
        let mut src = [0u8; 16];
        src[15] = 1;
        h.extend_from_slice(&src);
        h.extend_from_slice(&[0u8; 16]);
        h.extend_from_slice(&[0, 7, 0, 80]);
        assert_eq!(read(&h).await.0.unwrap(), Some("[::1]:7".parse().unwrap()));
        h.truncate(20);
        assert!(read(&h).await.0.is_err());
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(read(&short).await.0.is_err());
    }
}
