//! Load generators: `wrk` for HTTP(S) figures, a client making full TLS
//! handshakes, a raw request for the
//! equivalence check, and a WebSocket client that holds many idle tunnels.

use crate::procs::{find_program, output, tail};
use futures_util::{SinkExt, StreamExt, stream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Prints one machine-readable line at the end of a wrk run: the latency
/// percentiles that plain `wrk --latency` rounds, and every error counter.
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK-RESULT %d %d %d %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

/// Runs `wrk` with the bench's result script.
pub struct Wrk {
    program: PathBuf,
    script: PathBuf,
}

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
pub struct WrkResult {
    /// Completed responses.
    pub requests: u64,
    /// Run length in seconds.
    pub secs: f64,
    /// Bytes read, headers included.
    pub bytes: u64,
    /// Connect, read, write and timeout errors.
    pub socket_errors: u64,
    /// Responses that were not 2xx/3xx.
    pub bad_status: u64,
    /// Median latency, microseconds.
    pub p50_us: u64,
    /// 99th percentile latency, microseconds.
    pub p99_us: u64,
}

impl WrkResult {
    /// Responses per second.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.secs
    }

    /// Megabytes (10^6) per second read by the client.
    pub fn mbytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }

    /// A warning when errors make the figures doubtful (more than 1% of
    /// requests, or nothing read at all). A run of 100 MB bodies may complete
    /// no response in a short run and still measure throughput from its bytes.
    pub fn doubt(&self) -> Option<String> {
        let errors = self.socket_errors + self.bad_status;
        (self.bytes == 0 || errors * 100 > self.requests.max(1)).then(|| {
            format!(
                "{} responses, {} socket errors, {} non-2xx/3xx",
                self.requests, self.socket_errors, self.bad_status
            )
        })
    }
}

impl Wrk {
    /// Finds wrk and writes its script into `dir`; `None` when wrk is missing.
    pub fn find(dir: &Path) -> Option<Self> {
        let program = find_program("wrk")?;
        let script = dir.join("result.lua");
        fs::write(&script, WRK_SCRIPT).ok()?;
        Some(Self { program, script })
    }

    /// `wrk` on `url` for `duration` with `conns` connections; `close` sends
    /// `Connection: close` so every request opens a new connection.
    pub fn run(
        &self,
        url: &str,
        conns: usize,
        duration: Duration,
        close: bool,
    ) -> Result<WrkResult, String> {
        let mut cmd = Command::new(&self.program);
        cmd.arg(format!("-t{}", conns.min(2)))
            .arg(format!("-c{conns}"))
            .arg(format!("-d{}s", duration.as_secs().max(1)))
            .arg("--timeout")
            .arg("10s")
            .arg("-s")
            .arg(&self.script);
        if close {
            cmd.args(["-H", "Connection: close"]);
        }
        let out = output(cmd.arg(url))?;
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("WRK-RESULT "))
            .ok_or_else(|| format!("no result from wrk: {}", tail(&out, 3)))?;
        let n: Vec<u64> = line
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let [
            requests,
            dur_us,
            bytes,
            connect,
            read,
            write,
            status,
            timeout,
            p50,
            p99,
        ] = n[..]
        else {
            return Err(format!("bad wrk result line: {line}"));
        };
        Ok(WrkResult {
            requests,
            secs: dur_us as f64 / 1e6,
            bytes,
            socket_errors: connect + read + write + timeout,
            bad_status: status,
            p50_us: p50,
            p99_us: p99,
        })
    }
}

/// Full TLS handshakes for scenario 5, each carrying one request: `clients`
/// tasks each connect, handshake as a new session, send a GET with
/// `Connection: close`, read the answer to its end and start over, for
/// `duration`. wrk cannot measure this: it reconnects with the session
/// ticket of its last connection, so its handshakes are resumptions.
/// TLS 1.3 with X25519 only: the OpenSSL 3.0 of Debian's HAProxy and nginx
/// has no post-quantum hybrid, and offering one would cost them a
/// HelloRetryRequest each.
pub struct FullHandshakes {
    connector: TlsConnector,
    name: ServerName<'static>,
}

/// What one [`FullHandshakes`] run measured.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeResult {
    /// Connections that completed the handshake and got a 200.
    pub done: u64,
    /// Connections that failed anywhere.
    pub failed: u64,
    /// Length of the run in seconds.
    pub secs: f64,
}

impl HandshakeResult {
    /// Full handshakes (with their request) per second.
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.secs
    }
}

/// Connections counted by [`FullHandshakes`] clients.
#[derive(Debug, Default)]
struct Tally {
    done: u64,
    failed: u64,
    first_error: Option<String>,
}

impl Tally {
    fn fail(&mut self, error: String) {
        self.failed += 1;
        self.first_error.get_or_insert(error);
    }

    fn add(mut self, other: Tally) -> Tally {
        self.done += other.done;
        self.failed += other.failed;
        self.first_error = self.first_error.or(other.first_error);
        self
    }
}

impl FullHandshakes {
    /// A client that trusts the PEM certificate `cert` for `name`.
    pub fn new(cert: &Path, name: &str) -> Result<Self, String> {
        let der = CertificateDer::from_pem_file(cert).map_err(|e| format!("{cert:?}: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).map_err(|e| e.to_string())?;
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            name: ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?,
        })
    }

    /// Runs `clients` tasks against `addr` fetching `path` for `duration`;
    /// fails when more than 1 % of the connections did, with the first error.
    pub async fn run(
        &self,
        addr: SocketAddr,
        path: &str,
        clients: usize,
        duration: Duration,
    ) -> Result<HandshakeResult, String> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.name.to_str()
        );
        let started = Instant::now();
        let until = started + duration;
        let tally = stream::iter(0..clients)
            .map(|_| self.client(addr, request.as_bytes(), until))
            .buffer_unordered(clients)
            .fold(Tally::default(), |a, b| async move { a.add(b) })
            .await;
        let result = HandshakeResult {
            done: tally.done,
            failed: tally.failed,
            secs: started.elapsed().as_secs_f64(),
        };
        if result.done == 0 || result.failed * 100 > result.done {
            return Err(format!(
                "{} handshakes, {} failed, first: {}",
                result.done,
                result.failed,
                tally.first_error.unwrap_or_default()
            ));
        }
        Ok(result)
    }

    /// One client's loop until `until`.
    async fn client(&self, addr: SocketAddr, request: &[u8], until: Instant) -> Tally {
        let mut tally = Tally::default();
        while Instant::now() < until {
            let one = tokio::time::timeout(Duration::from_secs(10), self.one(addr, request));
            match one.await {
                Ok(Ok(())) => tally.done += 1,
                Ok(Err(e)) => tally.fail(e.to_string()),
                Err(_) => tally.fail("no answer within 10 s".to_string()),
            }
        }
        tally
    }

    /// One connection: handshake, request, the whole answer, which must be a 200.
    async fn one(&self, addr: SocketAddr, request: &[u8]) -> std::io::Result<()> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut tls = self.connector.connect(self.name.clone(), tcp).await?;
        tls.write_all(request).await?;
        let mut answer = Vec::with_capacity(512);
        // A peer that closes TCP without close_notify after a complete
        // answer has still answered.
        match tls.read_to_end(&mut answer).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e),
        }
        if answer.starts_with(b"HTTP/1.1 200") {
            Ok(())
        } else {
            let head = String::from_utf8_lossy(&answer[..answer.len().min(40)]).into_owned();
            Err(std::io::Error::other(format!("not a 200: {head:?}")))
        }
    }
}

/// Runs `h2load` (nghttp2) for the HTTP/2 figures: many streams on few connections.
pub struct H2load {
    program: PathBuf,
    log: PathBuf,
}

/// What one h2load run measured.
#[derive(Debug, Clone, Copy)]
pub struct H2Result {
    /// Responses with a 2xx status.
    pub succeeded: u64,
    /// Requests that failed, errored, timed out or got another status.
    pub failed: u64,
    /// Length of the measured period in seconds.
    pub secs: f64,
    /// Median latency (request start to end of response), microseconds.
    pub p50_us: u64,
    /// 99th percentile latency, microseconds.
    pub p99_us: u64,
}

impl H2Result {
    /// 2xx responses per second.
    pub fn rate(&self) -> f64 {
        self.succeeded as f64 / self.secs
    }

    /// A warning when failures make the figures doubtful (more than 1%, or no response).
    pub fn doubt(&self) -> Option<String> {
        (self.succeeded == 0 || self.failed * 100 > self.succeeded).then(|| {
            format!(
                "h2load: {} succeeded, {} failed",
                self.succeeded, self.failed
            )
        })
    }
}

impl H2load {
    /// Finds h2load; its per-request log goes to `dir`. `None` when h2load is missing.
    pub fn find(dir: &Path) -> Option<Self> {
        Some(Self {
            program: find_program("h2load")?,
            log: dir.join("h2load-requests.tsv"),
        })
    }

    /// `h2load` on `url` for `duration`: `conns` connections with `streams`
    /// concurrent streams each. Fails unless the balancer negotiated h2.
    pub fn run(
        &self,
        url: &str,
        conns: usize,
        streams: usize,
        duration: Duration,
    ) -> Result<H2Result, String> {
        let out = output(
            Command::new(&self.program)
                .arg(format!("-t{}", conns.min(2)))
                .arg(format!("-c{conns}"))
                .arg(format!("-m{streams}"))
                .arg(format!("-D{}", duration.as_secs().max(1)))
                .arg(format!("--log-file={}", self.log.display()))
                .arg(url),
        )?;
        let field = |line: &str, after: &str| -> Option<u64> {
            let rest = out.lines().find_map(|l| l.strip_prefix(line))?;
            let mut words = rest.split([' ', ',']).filter(|w| !w.is_empty());
            let mut previous = None;
            for word in words.by_ref() {
                if word == after {
                    return previous;
                }
                previous = word.parse().ok();
            }
            None
        };
        let need = |line: &str, after: &str| {
            field(line, after)
                .ok_or_else(|| format!("no `{after}` in h2load output: {}", tail(&out, 4)))
        };
        let protocol = out
            .lines()
            .find_map(|l| l.strip_prefix("Application protocol: "))
            .unwrap_or("none");
        if protocol.trim() != "h2" {
            return Err(format!("h2load negotiated {protocol}, not h2"));
        }
        let total = need("requests: ", "total")?;
        let ok = need("status codes: ", "2xx")?;
        let secs = out
            .lines()
            .find_map(|l| l.strip_prefix("finished in "))
            .and_then(|l| l.split('s').next())
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("no duration in h2load output: {}", tail(&out, 4)))?;
        let mut latencies: Vec<u64> = fs::read_to_string(&self.log)
            .map_err(|e| format!("h2load log {}: {e}", self.log.display()))?
            .lines()
            .filter_map(|l| l.split('\t').nth(2)?.parse().ok())
            .collect();
        latencies.sort_unstable();
        let at = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        Ok(H2Result {
            succeeded: ok,
            failed: total.saturating_sub(ok),
            secs,
            p50_us: at(0.5),
            p99_us: at(0.99),
        })
    }
}

/// A response read by [`http_get`]: status and lower-cased headers.
pub struct Response {
    /// Status code.
    pub status: u16,
    /// (name, value) pairs, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Response {
    /// First value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One plain `GET` over a fresh connection, read to the end.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<Response, String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP response from {addr}: {:?}", tail(&text, 1)))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Response { status, headers })
}

/// An open WebSocket client connection.
pub type Tunnel = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `count` WebSocket tunnels to `ws://{addr}{path}`, `parallel` handshakes
/// at a time; fails on the first tunnel that cannot be opened.
pub async fn open_tunnels(
    addr: SocketAddr,
    path: &str,
    count: usize,
    parallel: usize,
) -> Result<Vec<Tunnel>, String> {
    let url = format!("ws://{addr}{path}");
    let opened: Vec<Result<Tunnel, String>> = stream::iter(0..count)
        .map(|_| {
            let url = url.clone();
            async move {
                let connect = tokio_tungstenite::connect_async(url);
                match tokio::time::timeout(Duration::from_secs(10), connect).await {
                    Ok(Ok((ws, _))) => Ok(ws),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("handshake timed out".to_string()),
                }
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    opened.into_iter().collect()
}

/// Sends a message on each of `tunnels` and checks it comes back: the tunnels
/// really reach an echoing node.
pub async fn check_echo(tunnels: &mut [Tunnel]) -> Result<(), String> {
    for (i, ws) in tunnels.iter_mut().enumerate() {
        let text = format!("bench-{i}");
        ws.send(Message::text(text.clone()))
            .await
            .map_err(|e| e.to_string())?;
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .map_err(|_| "no echo within 5 s".to_string())?;
        match reply {
            Some(Ok(Message::Text(t))) if t.as_str() == text => {}
            other => return Err(format!("unexpected echo: {other:?}")),
        }
    }
    Ok(())
}
