//! The real `amslb` binary starts and serves with a minimal config per listener
//! protocol (http, https, tcp, tls, udp) on its own, and with every config file
//! shipped in `conf/` (addresses moved to free loopback ones). In-process tests
//! install the rustls provider themselves; only the binary shows whether amslb
//! does.

mod support;
mod tls_support;

use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use support::*;
use tls_support::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A config with one listener (`protocol`, `extra` keys) in front of one node at
/// `node`, whose HTTP, RTMP and SRT ports are all `node`'s port, plus `tail`.
fn single(
    protocol: &str,
    listener: SocketAddr,
    node: SocketAddr,
    extra: &str,
    tail: &str,
) -> String {
    format!(
        r#"
[timeouts]
connect = "1s"
client = "5s"
server = "5s"

[[listener]]
name = "only"
bind = ["{listener}"]
protocol = "{protocol}"
default_group = "origin"
{extra}

[[group]]
name = "origin"

[cluster]
source = "static"

[[cluster.node]]
id = "origin-1"
address = "{ip}"
group = "origin"
http_port = {port}
rtmp_port = {port}
srt_port = {port}

{tail}
"#,
        ip = node.ip(),
        port = node.port()
    )
}

/// Writes a leaf for `names` signed by `ca` as `dir/{stem}.crt` + `.key`.
fn write_pair(ca: &TestCa, dir: &Path, stem: &str, names: &[&str]) -> (String, String) {
    let (cert, key) = ca.leaf(names);
    let (cert_path, key_path) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    )
}

/// Sends a raw HTTP/1.1 GET over `io` (a tunnel to the simulated node) and
/// returns the answer's head.
async fn raw_get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut io: S) -> String {
    io.write_all(b"GET /tunnelled HTTP/1.1\r\nhost: live.test\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tls_support::connector(roots, &[])
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .expect("TLS handshake with amslb")
}

#[tokio::test]
async fn http_listener_alone_serves() {
    let node = sim_node("origin-1").await;
    let listener = listener_addr(8080);
    let _amslb = Amslb::start(&single("http", listener, node.addr, "", ""), &[listener]);
    let fetched = get(listener, "/").await;
    assert_eq!((fetched.status, fetched.node()), (200, "origin-1".into()));
}

#[tokio::test]
async fn https_listener_alone_serves() {
    let node = sim_node("origin-1").await;
    let ca = TestCa::new();
    let certs = tempfile::tempdir().unwrap();
    write_pair(&ca, certs.path(), "live.test", &["live.test"]);
    let listener = listener_addr(8443);
    let tls = format!("[tls]\ncerts_dir = \"{}\"\n", certs.path().display());
    let _amslb = Amslb::start(&single("https", listener, node.addr, "", &tls), &[listener]);
    let seen = tls_support::get(
        listener,
        "live.test",
        std::slice::from_ref(&ca.der),
        &[b"http/1.1"],
        "/",
    )
    .await
    .unwrap();
    assert_eq!(seen.status, 200);
    assert_eq!(seen.headers["x-node-id"], "origin-1");
}

#[tokio::test]
async fn tcp_listener_alone_tunnels() {
    let node = sim_node("origin-1").await;
    let listener = listener_addr(1935);
    let _amslb = Amslb::start(&single("tcp", listener, node.addr, "", ""), &[listener]);
    let answer = raw_get(TcpStream::connect(listener).await.unwrap()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-node-id: origin-1"), "{answer}");
}

/// RTMPS alone: a `tls` listener with its own `cert`/`key`, no `[tls]` and no
/// `https` listener, so nothing but amslb's start installs the rustls provider.
#[tokio::test]
async fn tls_listener_alone_with_its_own_cert_tunnels() {
    let node = sim_node("origin-1").await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_pair(&ca, dir.path(), "rtmps", &["live.test"]);
    let listener = listener_addr(1936);
    let keys = format!("cert = \"{cert}\"\nkey = \"{key}\"");
    let _amslb = Amslb::start(&single("tls", listener, node.addr, &keys, ""), &[listener]);
    let answer =
        raw_get(tls_connect(listener, "live.test", std::slice::from_ref(&ca.der)).await).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn udp_listener_alone_relays() {
    let node_ip = unique_loopback();
    let echo = UdpSocket::bind(SocketAddr::new(node_ip, 4200))
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let listener = listener_addr(4200);
    let config = single("udp", listener, SocketAddr::new(node_ip, 4200), "", "");
    // A UDP listener accepts no TCP connection: start, then wait for the echo.
    let _amslb = Amslb::start(&config, &[]);
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 64];
    let mut answered = false;
    for _ in 0..50 {
        client.send_to(b"srt?", listener).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(100), client.recv_from(&mut buf)).await
        {
            assert_eq!(&buf[..n], b"srt?");
            answered = true;
            break;
        }
    }
    assert!(
        answered,
        "no datagram came back through amslb's udp listener"
    );
}

/// Rewrites a shipped config for a test run: every bind to its own fresh
/// loopback address (same port), the MongoDB URI to a loopback port nothing
/// listens on, `certs_dir` to `certs`, and the ACME directory to loopback, so
/// nothing leaves the machine. Also returns (protocol, new address) per bind.
fn localize(text: &str, certs: &Path) -> (String, Vec<(String, SocketAddr)>) {
    let mut doc: toml::Table = text.parse().expect("conf file is TOML");
    let mut moved = Vec::new();
    if let Some(toml::Value::Array(listeners)) = doc.get_mut("listener") {
        for listener in listeners.iter_mut().filter_map(toml::Value::as_table_mut) {
            let protocol = listener["protocol"].as_str().unwrap_or("http").to_string();
            let Some(toml::Value::Array(binds)) = listener.get_mut("bind") else {
                continue;
            };
            for bind in binds.iter_mut() {
                let port = bind
                    .as_str()
                    .and_then(|b| b.rsplit_once(':'))
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .expect("bind has a port");
                let addr = SocketAddr::new(unique_loopback(), port);
                *bind = toml::Value::String(addr.to_string());
                moved.push((protocol.clone(), addr));
            }
        }
    }
    if let Some(stats) = doc.get_mut("stats").and_then(toml::Value::as_table_mut) {
        stats.insert("bind".into(), format!("{}:6080", unique_loopback()).into());
    }
    if let Some(cluster) = doc.get_mut("cluster").and_then(toml::Value::as_table_mut)
        && cluster.contains_key("uri")
    {
        let uri = "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=300";
        cluster.insert("uri".into(), uri.into());
    }
    if let Some(tls) = doc.get_mut("tls").and_then(toml::Value::as_table_mut) {
        tls.insert("certs_dir".into(), certs.display().to_string().into());
        if let Some(acme) = tls.get_mut("acme").and_then(toml::Value::as_table_mut) {
            acme.insert("directory".into(), "https://127.0.0.1:9/dir".into());
        }
    }
    (doc.to_string(), moved)
}

/// Every `*.toml` in `conf/`, rewritten by [`localize`], starts the binary,
/// which then answers HTTP on its http listeners, TLS on https and tls, accepts
/// on tcp and holds its udp ports.
#[tokio::test]
async fn every_shipped_config_starts_and_serves() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut files: Vec<_> = std::fs::read_dir(&conf)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "conf/ has its configs: {files:?}");
    let ca = TestCa::new();
    for file in files {
        let certs = tempfile::tempdir().unwrap();
        write_pair(&ca, certs.path(), "live.example.com", &["live.example.com"]);
        let (text, moved) = localize(&std::fs::read_to_string(&file).unwrap(), certs.path());
        let tcp: Vec<SocketAddr> = moved
            .iter()
            .filter(|(p, _)| p != "udp")
            .map(|(_, a)| *a)
            .collect();
        let amslb = Amslb::start(&text, &tcp);
        let name = file.display();
        for (protocol, addr) in &moved {
            match protocol.as_str() {
                "http" => {
                    let status = get(*addr, "/").await.status;
                    // No node runs behind a shipped config: amslb itself answers.
                    assert!(
                        (200..600).contains(&status),
                        "{name}: {addr}: {status}\n{}",
                        amslb.log()
                    );
                }
                "https" | "tls" => {
                    tls_connect(*addr, "live.example.com", std::slice::from_ref(&ca.der)).await;
                }
                "tcp" => {
                    TcpStream::connect(addr).await.unwrap();
                }
                "udp" => {
                    let taken = std::net::UdpSocket::bind(addr).is_err();
                    assert!(taken, "{name}: amslb holds udp {addr}\n{}", amslb.log());
                }
                other => panic!("{name}: protocol {other} not covered by this test"),
            }
        }
        assert!(
            !amslb.log().contains("panicked"),
            "{name}:\n{}",
            amslb.log()
        );
    }
}
