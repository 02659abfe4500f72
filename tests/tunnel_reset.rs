//! A reset on one side of a tunnel reaches the other side at once, as a reset,
//! through the real `amslb` binary: WebSocket tunnels (HTTP upgrade), TCP
//! passthrough with splice and with the buffered copy, TLS-terminated TCP
//! (RTMPS), and RTMP carried over TLS to the node (`node_tls`). The node here
//! is a raw TCP (or TLS-over-TCP) server, so the test sees exactly what amslb
//! does to its side of the connection.

mod support;
mod tls_support;

use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;
use tls_support::TestCa;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How fast the other side must learn: directly, both sides learn in
/// milliseconds; the bound leaves room for a loaded machine.
const BOUND: Duration = Duration::from_millis(500);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The kinds of tunnel amslb makes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    WebSocket,
    TcpSplice,
    TcpBuffered,
    Tls,
    /// A plain `tcp` listener, RTMPS to the node.
    TlsToNode,
}

/// What a read on a dead tunnel returned.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Reset,
    Eof,
    Other(String),
}

async fn read_end(io: &mut (impl AsyncRead + Unpin)) -> (Seen, Duration) {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let seen = loop {
        match tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf)).await {
            Err(_) => break Seen::Other("still open after 5 s".into()),
            Ok(Ok(0)) => break Seen::Eof,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => break Seen::Reset,
            Ok(Err(e)) => break Seen::Other(e.to_string()),
        }
    };
    (seen, started.elapsed())
}

/// Makes the next close of `stream` a reset.
fn linger0(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// amslb with one listener of `kind` in front of a raw node; no health probes,
/// so the only connection the node sees is the tunnel's.
struct Setup {
    listener: SocketAddr,
    node: TcpListener,
    ca: TestCa,
    /// The node's TLS (Kind::TlsToNode), with the certificate for live.test.
    node_tls: tokio_rustls::TlsAcceptor,
    _dir: tempfile::TempDir,
    _amslb: Amslb,
}

async fn setup(kind: Kind) -> Setup {
    let node = TcpListener::bind(SocketAddr::new(unique_loopback(), 5080))
        .await
        .unwrap();
    let node_addr = node.local_addr().unwrap();
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["live.test"]);
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let (protocol, port, extra) = match kind {
        Kind::WebSocket => ("http", 18080, String::new()),
        Kind::TcpSplice => ("tcp", 1935, "splice = true".to_string()),
        Kind::TcpBuffered => ("tcp", 1935, "splice = false".to_string()),
        Kind::Tls => (
            "tls",
            1936,
            format!(
                "cert = \"{}\"\nkey = \"{}\"",
                cert_path.display(),
                key_path.display()
            ),
        ),
        Kind::TlsToNode => ("tcp", 1935, String::new()),
    };
    let node_tls = match kind {
        Kind::TlsToNode => {
            let ca_file = dir.path().join("ca.pem");
            std::fs::write(&ca_file, &ca.pem).unwrap();
            format!(
                "[cluster.node_tls]\nca_file = \"{}\"\nserver_name = \"live.test\"\nrtmps_port = {}\n",
                ca_file.display(),
                node_addr.port()
            )
        }
        _ => String::new(),
    };
    let listener = listener_addr(port);
    let config = format!(
        r#"
[timeouts]
connect = "1s"
tunnel = "1h"

[[listener]]
name = "in"
bind = ["{listener}"]
protocol = "{protocol}"
default_group = "origin"
{extra}

[[group]]
name = "origin"

[health]
enabled = false

[cluster]
source = "static"

[[cluster.node]]
id = "raw"
address = "{}"
group = "origin"
http_port = {port}
rtmp_port = {port}

{node_tls}
"#,
        node_addr.ip(),
        port = node_addr.port()
    );
    let amslb = Amslb::start(&config, &[listener]);
    Setup {
        listener,
        node,
        node_tls: acceptor(&cert_path, &key_path),
        ca,
        _dir: dir,
        _amslb: amslb,
    }
}

/// The TLS server side of a node, with the PEM files `cert` and `key`.
fn acceptor(cert: &std::path::Path, key: &std::path::Path) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    amslb::tls::install_crypto_provider();
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

/// Opens a tunnel of `kind` through amslb; returns the client's end and the
/// node's end. With `client_resets`, the client's close will be a reset; with
/// `node_resets`, the node's.
async fn open(
    s: &Setup,
    kind: Kind,
    client_resets: bool,
    node_resets: bool,
) -> (Box<dyn Io>, Box<dyn Io>) {
    let tcp = TcpStream::connect(s.listener).await.unwrap();
    if client_resets {
        linger0(&tcp);
    }
    let mut client: Box<dyn Io> = match kind {
        Kind::Tls => Box::new(
            tls_support::connector(std::slice::from_ref(&s.ca.der), &[])
                .connect(ServerName::try_from("live.test").unwrap(), tcp)
                .await
                .unwrap(),
        ),
        _ => Box::new(tcp),
    };
    if let Kind::WebSocket = kind {
        client
            .write_all(
                b"GET /LiveApp/websocket HTTP/1.1\r\nhost: live.test\r\nconnection: upgrade\r\n\
                  upgrade: websocket\r\nsec-websocket-version: 13\r\n\
                  sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            )
            .await
            .unwrap();
    } else {
        client.write_all(b"hello").await.unwrap();
    }
    let mut byte = [0u8; 1];
    let wanted: &[u8] = if let Kind::WebSocket = kind {
        b"\r\n\r\n"
    } else {
        b"hello"
    };
    // Connections that close before sending anything (a TCP connect check of
    // the node, amslb's readiness check relayed) are not the tunnel.
    let mut node = loop {
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(5), s.node.accept())
            .await
            .expect("amslb connects to the node")
            .unwrap();
        if node_resets {
            linger0(&tcp);
        }
        let mut node: Box<dyn Io> = match kind {
            Kind::TlsToNode => match s.node_tls.accept(tcp).await {
                Ok(tls) => Box::new(tls),
                Err(_) => continue,
            },
            _ => Box::new(tcp),
        };
        let mut head = Vec::new();
        while !head.ends_with(wanted) {
            if node.read_exact(&mut byte).await.is_err() {
                break;
            }
            head.push(byte[0]);
        }
        if head.ends_with(wanted) {
            break node;
        }
    };
    if let Kind::WebSocket = kind {
        node.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
              sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n\r\n") {
            client.read_exact(&mut byte).await.unwrap();
            answer.push(byte[0]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 101"), "{answer:?}");
    }
    // One byte each way: the tunnel is up.
    client.write_all(b"x").await.unwrap();
    node.read_exact(&mut byte).await.unwrap();
    node.write_all(b"y").await.unwrap();
    client.read_exact(&mut byte).await.unwrap();
    (client, node)
}

async fn client_reset_reaches_the_node(kind: Kind) {
    let s = setup(kind).await;
    let (client, mut node) = open(&s, kind, true, false).await;
    drop(client);
    let (seen, took) = read_end(&mut node).await;
    eprintln!("{kind:?}: client reset, node saw {seen:?} after {took:?}");
    assert_eq!(seen, Seen::Reset, "{kind:?}: the node's side is reset");
    assert!(took < BOUND, "{kind:?}: the node learnt after {took:?}");
}

async fn node_reset_reaches_the_client(kind: Kind) {
    let s = setup(kind).await;
    let (mut client, node) = open(&s, kind, false, true).await;
    drop(node);
    // The client is idle (it does not write): it must learn from amslb.
    let (seen, took) = read_end(&mut client).await;
    eprintln!("{kind:?}: node reset, client saw {seen:?} after {took:?}");
    assert_eq!(seen, Seen::Reset, "{kind:?}: the client's side is reset");
    assert!(took < BOUND, "{kind:?}: the client learnt after {took:?}");
}

/// A FIN stays a FIN: the node's half-close reaches the client as an EOF.
async fn node_fin_reaches_the_client_as_eof(kind: Kind) {
    let s = setup(kind).await;
    let (mut client, mut node) = open(&s, kind, false, false).await;
    node.shutdown().await.unwrap();
    let (seen, took) = read_end(&mut client).await;
    assert_eq!(seen, Seen::Eof, "{kind:?}");
    assert!(took < BOUND, "{kind:?}: EOF after {took:?}");
}

#[tokio::test]
async fn websocket_client_reset_resets_the_node_side() {
    client_reset_reaches_the_node(Kind::WebSocket).await;
}

#[tokio::test]
async fn websocket_node_reset_resets_the_idle_client() {
    node_reset_reaches_the_client(Kind::WebSocket).await;
}

#[tokio::test]
async fn tcp_splice_resets_pass_both_ways() {
    client_reset_reaches_the_node(Kind::TcpSplice).await;
    node_reset_reaches_the_client(Kind::TcpSplice).await;
}

#[tokio::test]
async fn tcp_buffered_resets_pass_both_ways() {
    client_reset_reaches_the_node(Kind::TcpBuffered).await;
    node_reset_reaches_the_client(Kind::TcpBuffered).await;
}

#[tokio::test]
async fn tls_resets_pass_both_ways() {
    client_reset_reaches_the_node(Kind::Tls).await;
    node_reset_reaches_the_client(Kind::Tls).await;
}

/// RTMP carried over TLS to the node: a reset on either side still reaches
/// the other as a reset.
#[tokio::test]
async fn tls_to_node_resets_pass_both_ways() {
    client_reset_reaches_the_node(Kind::TlsToNode).await;
    node_reset_reaches_the_client(Kind::TlsToNode).await;
}

#[tokio::test]
async fn fins_stay_fins() {
    // Over TLS to the node the FIN comes after the node's close_notify.
    for kind in [
        Kind::WebSocket,
        Kind::TcpSplice,
        Kind::TcpBuffered,
        Kind::TlsToNode,
    ] {
        node_fin_reaches_the_client_as_eof(kind).await;
    }
}
