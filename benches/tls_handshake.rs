//! TLS handshake rate: amslb against HAProxy on the same certificate, one run.
//!
//! Both serve the same ECDSA P-256 combined PEM on loopback with 2 threads;
//! the client (this process) opens connections from `CLIENTS` tasks for
//! `DURATION` each, does one full TLS 1.3 handshake (X25519, no resumption)
//! and closes. It shares the 2 cores with the server, equally for both, so
//! the ratio means more than the absolute figures.
//!
//! Run: `cargo bench --bench tls_handshake` (needs `apt-get install haproxy`).

use rustls::pki_types::ServerName;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const CLIENTS: usize = 16;
const DURATION: Duration = Duration::from_secs(5);
const SNI: &str = "live.amslb.test";

/// Kills and reaps a server when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_amslb(dir: &std::path::Path, addr: SocketAddr) -> Server {
    let config = format!(
        r#"
[[listener]]
name = "https"
bind = ["{addr}"]
protocol = "https"

[[group]]
name = "origin"

[cluster]
source = "static"

[[cluster.node]]
id = "origin-1"
address = "127.0.0.1"
group = "origin"

[tls]
certs_dir = "{}"
"#,
        dir.join("certs").display()
    );
    let path = dir.join("lb.toml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_amslb"))
        .arg("--config")
        .arg(&path)
        .arg("--log-level")
        .arg("warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(addr, "amslb");
    Server(child)
}

fn start_haproxy(dir: &std::path::Path, addr: SocketAddr) -> Server {
    let config = format!(
        r#"
global
    maxconn 4000
    nbthread 2

defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s

frontend fe
    bind {addr} ssl crt {} alpn h2,http/1.1
    http-request return status 200
"#,
        dir.join("certs/live.pem").display()
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy not found: install it with `apt-get install haproxy`");
    wait_listening(addr, "haproxy");
    Server(child)
}

/// A client doing full TLS 1.3 handshakes with X25519 only (OpenSSL 3.0 in
/// HAProxy has no post-quantum hybrid; offering it would cost HAProxy a
/// HelloRetryRequest and skew the comparison) and no session resumption.
fn connector(root: rustls::pki_types::CertificateDer<'static>) -> TlsConnector {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

/// Handshakes per second against `addr` over `DURATION`.
async fn measure(addr: SocketAddr, connector: &TlsConnector) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (connector, done, failed) = (connector.clone(), done.clone(), failed.clone());
            tokio::spawn(async move {
                while start.elapsed() < DURATION {
                    let name = ServerName::try_from(SNI).unwrap();
                    let result = async {
                        let tcp = TcpStream::connect(addr).await?;
                        let mut tls = connector.connect(name, tcp).await?;
                        tls.shutdown().await
                    }
                    .await;
                    let counter = if result.is_ok() { &done } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    assert_eq!(failed, 0, "{failed} handshakes failed against {addr}");
    done.load(Ordering::Relaxed) as f64 / elapsed
}

fn main() {
    amslb::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![SNI.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let combined = format!("{}{}", cert.pem(), key.serialize_pem());
    std::fs::write(dir.path().join("certs/live.pem"), combined).unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let connector = connector(cert.der().clone());

    let amslb_addr = free_addr();
    let amslb = start_amslb(dir.path(), amslb_addr);
    let amslb_rate = runtime.block_on(measure(amslb_addr, &connector));
    drop(amslb);

    let haproxy_addr = free_addr();
    let haproxy = start_haproxy(dir.path(), haproxy_addr);
    let haproxy_rate = runtime.block_on(measure(haproxy_addr, &connector));
    drop(haproxy);

    println!(
        "TLS 1.3 full handshakes/s, ECDSA P-256, X25519, {CLIENTS} clients, {DURATION:?} each:"
    );
    println!("  amslb   {amslb_rate:>8.0}");
    println!("  haproxy {haproxy_rate:>8.0}");
    println!("  ratio amslb/haproxy {:.2}", amslb_rate / haproxy_rate);
}
