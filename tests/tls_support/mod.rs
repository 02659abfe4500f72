//! Test helpers for TLS: a throw-away CA, a real Pebble ACME server (with
//! pebble-challtestsrv as its DNS), and a TLS client that reports what it saw.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A fresh temporary directory, removed when dropped.
pub fn tempdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("amslb-{tag}-"))
        .tempdir()
        .unwrap()
}

/// A port the OS had free a moment ago (for programs that cannot report theirs).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fails the test with install instructions when `program` is missing.
pub fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{program}` not found: install it with `apt-get install {package}`"
    );
}

/// A test certificate authority.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
    /// The CA certificate, DER.
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "amslb test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf for `names` (DNS names or IP literals), as (cert PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Kills and reaps a child process when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running Pebble with its mock DNS.
pub struct Pebble {
    /// ACME directory URL.
    pub directory: String,
    /// PEM of the CA that signed Pebble's own HTTPS certificate (`ca_file`).
    pub ca_file: PathBuf,
    /// Pebble's issuing root (from the management port's `/roots/0`), PEM.
    pub root_pem: String,
    _dns: Reaped,
    _pebble: Reaped,
    _dir: tempfile::TempDir,
}

impl Pebble {
    /// Starts pebble-challtestsrv (DNS: every name is 127.0.0.1) and pebble,
    /// validating http-01 on `http_port` and tls-alpn-01 on `tls_port`;
    /// certificates valid `validity_secs` when given.
    pub async fn start(http_port: u16, tls_port: u16, validity_secs: Option<u64>) -> Pebble {
        require("pebble", "pebble");
        require("pebble-challtestsrv", "pebble");
        let tmp = tempdir("pebble");
        let dir = tmp.path();
        let ca = TestCa::new();
        let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();

        let dns_port = free_port();
        let dns = Command::new("pebble-challtestsrv")
            .args([
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Reaped)
            .unwrap();

        let (listen, management) = (free_port(), free_port());
        let mut config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if let Some(secs) = validity_secs {
            config["pebble"]["certificateValidityPeriod"] = secs.into();
        }
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let log = std::fs::File::create(dir.join("pebble.log")).unwrap();
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map(Reaped)
            .unwrap();
        wait_port(listen).await;
        wait_port(management).await;

        let root_pem = https_get(
            SocketAddr::from(([127, 0, 0, 1], management)),
            &ca.der,
            "/roots/0",
        )
        .await;
        assert!(root_pem.contains("BEGIN CERTIFICATE"), "{root_pem}");
        Pebble {
            directory: format!("https://127.0.0.1:{listen}/dir"),
            ca_file,
            root_pem,
            _dns: dns,
            _pebble: pebble,
            _dir: tmp,
        }
    }

    /// Pebble's issuing root, DER.
    pub fn root_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.root_pem.as_bytes()).unwrap()
    }
}

async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET over HTTPS/1.1 with `Connection: close`, trusting `root`; returns the body.
async fn https_get(addr: SocketAddr, root: &CertificateDer<'static>, path: &str) -> String {
    let connector = connector(std::slice::from_ref(root), &[]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (_, body) = text.split_once("\r\n\r\n").unwrap_or(("", ""));
    body.to_string()
}

/// A TLS client trusting `roots`, offering `alpn`.
pub fn connector(roots: &[CertificateDer<'static>], alpn: &[&[u8]]) -> TlsConnector {
    amslb::tls::install_crypto_provider();
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// What a client saw on one TLS connection.
pub struct Seen {
    /// Negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// The server's leaf certificate.
    pub leaf: CertificateDer<'static>,
    /// HTTP version of the response.
    pub version: http::Version,
    /// Status of the response.
    pub status: http::StatusCode,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// Response body.
    pub body: String,
    /// TLS version negotiated.
    pub tls_version: Option<rustls::ProtocolVersion>,
    /// Whether the handshake resumed an earlier session.
    pub resumed: bool,
}

/// Connects to `addr` with SNI `sni`, trusting `roots` and offering `alpn`,
/// and sends one `GET path` over whatever HTTP version ALPN picked.
pub async fn get(
    addr: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
    path: &str,
) -> Result<Seen, String> {
    get_via(&connector(roots, alpn), addr, sni, path).await
}

/// Like [`get`], through a given client config (to control TLS versions, or
/// to reuse its session cache for resumption).
pub async fn get_via(
    connector: &TlsConnector,
    addr: SocketAddr,
    sni: &str,
    path: &str,
) -> Result<Seen, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = connector
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, conn) = tls.get_ref();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let leaf = conn.peer_certificates().unwrap()[0].clone().into_owned();
    let tls_version = conn.protocol_version();
    let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let request = http::Request::get(format!("https://{sni}{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let io = TokioIo::new(tls);
    let response = if alpn.as_deref() == Some(b"h2") {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(request).await
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut request = request;
        *request.uri_mut() = path.parse().unwrap();
        request
            .headers_mut()
            .insert(http::header::HOST, sni.parse().unwrap());
        send.send_request(request).await
    }
    .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Seen {
        alpn,
        leaf,
        version: parts.version,
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).to_string(),
        tls_version,
        resumed,
    })
}

/// Mode bits of a file.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// An `https` listener served through `amslb::tls` in the test process, for
/// tests that run two ACME managers side by side over one `Certificates`
/// (the binary runs one). Answers every request with 200 "ok".
pub struct Front {
    pub https: SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Front {
    pub async fn start(certs: Arc<amslb::tls::Certificates>) -> Front {
        amslb::tls::install_crypto_provider();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let acceptor =
            tokio_rustls::TlsAcceptor::from(amslb::tls::https_server_config(certs).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = Front {
            https: listener.local_addr().unwrap(),
            shutdown: shutdown.clone(),
        };
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    accepted = listener.accept() => accepted.unwrap(),
                    () = shutdown.cancelled() => return,
                };
                let (acceptor, stop) = (acceptor.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let Ok(Some(tls)) =
                        amslb::tls::serve::handshake(&acceptor, tcp, Duration::from_secs(5)).await
                    else {
                        return;
                    };
                    let service = hyper::service::service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from_static(b"ok")),
                        ))
                    });
                    let versions =
                        amslb::http::serve::Versions::from_alpn(tls.get_ref().1.alpn_protocol());
                    let limits = amslb::http::serve::HttpLimits {
                        header_read_timeout: Duration::from_secs(5),
                        max_header_bytes: 16 * 1024,
                    };
                    let _ =
                        amslb::http::serve::serve_http(tls, versions, service, limits, stop).await;
                });
            }
        });
        front
    }
}

/// An amslb config with an `https` listener (and optionally a plain `http`
/// one, with `redirect_https`) in front of one origin node, plus `tls` (the
/// `[tls]` section text).
pub fn lb_config(
    https: SocketAddr,
    http: Option<SocketAddr>,
    node: SocketAddr,
    tls: &str,
) -> String {
    let http = http.map_or(String::new(), |addr| {
        format!(
            "[[listener]]\nname = \"http\"\nbind = [\"{addr}\"]\nprotocol = \"http\"\nredirect_https = true\n"
        )
    });
    format!(
        r#"
[timeouts]
connect = "1s"
client = "5s"
server = "5s"

[[listener]]
name = "https"
bind = ["{https}"]
protocol = "https"
default_group = "origin"

{http}

[[group]]
name = "origin"

[cluster]
source = "static"

[[cluster.node]]
id = "origin-1"
address = "{}"
group = "origin"
http_port = {}

{tls}
"#,
        node.ip(),
        node.port()
    )
}

/// Retries `get` until it succeeds (a certificate is being obtained) or `limit` passes.
pub async fn get_eventually(
    addr: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
    limit: Duration,
) -> Seen {
    let deadline = Instant::now() + limit;
    loop {
        match get(addr, sni, roots, &[], "/").await {
            Ok(seen) => return seen,
            Err(e) => assert!(
                Instant::now() < deadline,
                "no usable certificate in time: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP/1.1 keep-alive connection over TLS to `addr` (SNI `sni`), kept
/// open by the caller across certificate swaps; also returns the leaf served.
pub async fn open_h1(
    addr: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    CertificateDer<'static>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector(roots, &[b"http/1.1"])
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    (send, leaf)
}

/// `GET /kept` for `host`, for requests over a connection from [`open_h1`].
pub fn kept_request(host: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get("/kept")
        .header("host", host)
        .body(Empty::new())
        .unwrap()
}
