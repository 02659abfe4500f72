//! Test harness shared by the integration tests: simulated AMS nodes, unique
//! loopback addresses, the real `amslb` binary started with a config, and a
//! small HTTP client.
#![allow(dead_code, unused_imports)] // each test file uses a different part of the harness

pub mod haproxy;
pub mod l4_echo;
pub mod registry;
pub mod secantus;
pub mod sim;
pub mod tls_node;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

pub use sim::{Mode, SimNode};

/// A random address in 127.0.0.0/8 other than 127.0.0.1, so tests running in
/// parallel (even in separate processes) can all use the real AMS ports.
pub fn unique_loopback() -> IpAddr {
    let [a, b, c]: [u8; 3] = rand::random();
    IpAddr::V4(Ipv4Addr::new(127, a.clamp(10, 250), b, c.clamp(1, 254)))
}

/// Starts a simulated node on a fresh loopback address, port 5080.
pub async fn sim_node(id: &str) -> SimNode {
    for _ in 0..20 {
        if let Ok(node) = SimNode::start(id, SocketAddr::new(unique_loopback(), 5080)).await {
            return node;
        }
    }
    panic!("could not bind a simulated node on any loopback address");
}

/// Simulated nodes with the given ids, each on its own loopback address.
pub async fn sim_nodes(ids: &[&str]) -> Vec<SimNode> {
    let mut nodes = Vec::with_capacity(ids.len());
    for id in ids {
        nodes.push(sim_node(id).await);
    }
    nodes
}

/// A config with one HTTP listener on `listener` (default group `origin`),
/// groups `origin` and `edge` (backed by `origin`), round robin, short
/// timeouts, `extra` (e.g. `[sticky]`) and one `[[cluster.node]]` per
/// (node, group, more TOML keys for that node) in `nodes`.
pub fn one_listener_config(
    listener: SocketAddr,
    nodes: &[(&SimNode, &str, &str)],
    extra: &str,
) -> String {
    let mut text = format!(
        r#"
[timeouts]
connect = "1s"
server = "2s"

[[listener]]
name = "http"
bind = ["{listener}"]
protocol = "http"
default_group = "origin"

[[group]]
name = "origin"
balance = "round-robin"

[[group]]
name = "edge"
balance = "round-robin"
backup = "origin"

{extra}

[cluster]
"#
    );
    for (node, group, keys) in nodes {
        text.push_str(&format!(
            "\n[[cluster.node]]\nid = \"{}\"\naddress = \"{}\"\ngroup = \"{group}\"\nhttp_port = {}\n{keys}\n",
            node.id(),
            node.addr.ip(),
            node.addr.port()
        ));
    }
    text
}

/// [`one_listener_config`] with every node in `origin`.
pub fn origin_config(listener: SocketAddr, nodes: &[SimNode], extra: &str) -> String {
    let nodes: Vec<_> = nodes.iter().map(|n| (n, "origin", "")).collect();
    one_listener_config(listener, &nodes, extra)
}

/// The address block `net.0/24` as CIDR text, for `[[cluster.role]]` rules.
pub fn cidr(net: [u8; 3]) -> String {
    format!("{}.{}.{}.0/24", net[0], net[1], net[2])
}

/// A simulated node at `net.host`, port 5080: inside a block that a role rule maps.
pub async fn sim_node_in(net: [u8; 3], host: u8, id: &str) -> SimNode {
    let addr = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(net[0], net[1], net[2], host)),
        5080,
    );
    SimNode::start(id, addr).await.unwrap()
}

/// Node `id`'s entry in an `/api/v1/status` document, if the document lists it.
pub fn status_node_entry(doc: &serde_json::Value, id: &str) -> Option<serde_json::Value> {
    doc["groups"]
        .as_array()
        .expect("the status document lists groups")
        .iter()
        .flat_map(|g| {
            g["nodes"]
                .as_array()
                .expect("each group lists nodes")
                .iter()
        })
        .find(|n| n["id"] == id)
        .cloned()
}

/// A fresh loopback address with the given port, for an amslb listener.
pub fn listener_addr(port: u16) -> SocketAddr {
    SocketAddr::new(unique_loopback(), port)
}

/// The real `amslb` binary, running with a config written to a temp dir;
/// killed when dropped.
pub struct Amslb {
    child: Child,
    /// Directory holding the config and the captured stderr.
    pub dir: tempfile::TempDir,
}

impl Amslb {
    /// Writes `config` to a file, starts amslb with it and waits until every
    /// address in `ready` accepts TCP connections.
    pub fn start(config: &str, ready: &[SocketAddr]) -> Amslb {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_amslb"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut amslb = Amslb { child, dir };
        let log = amslb.dir.path().join("stderr.log");
        wait_listening("amslb", &mut amslb.child, ready, &log);
        amslb
    }

    /// What amslb wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Path of the config file it runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("lb.toml")
    }

    /// Sends a signal (e.g. "TERM", "HUP") to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit; its exit code, or None.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Process id, e.g. to read its memory from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Amslb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to 10 s until every address in `ready` accepts TCP connections;
/// panics with the program's output (`log`) if it exits or never listens.
pub fn wait_listening(program: &str, child: &mut Child, ready: &[SocketAddr], log: &Path) {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    for addr in ready {
        while std::net::TcpStream::connect_timeout(addr, Duration::from_millis(100)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{program} exited with {status} before listening:\n{}",
                    log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not listen on {addr}:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `amslb` with arguments and returns (exit code, stdout + stderr).
pub fn amslb_command(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_amslb"))
        .args(args)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Writes `text` to a temp file and returns it (kept alive by the handle).
pub fn temp_config(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

/// A response with its whole body read.
pub struct Fetched {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// Body bytes.
    pub body: Bytes,
}

impl Fetched {
    /// The `x-node-id` the simulated node put on the response, or "".
    pub fn node(&self) -> String {
        self.headers
            .get("x-node-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one GET on a new connection and reads the whole answer.
pub async fn get(addr: SocketAddr, path_and_query: &str) -> Fetched {
    send(
        addr,
        Request::get(path_and_query)
            .header("host", "live.test")
            .body(Empty::new())
            .unwrap(),
    )
    .await
}

/// Sends `request` on a new HTTP/1.1 connection and reads the whole answer.
pub async fn send(addr: SocketAddr, request: Request<Empty<Bytes>>) -> Fetched {
    let response = send_head(addr, request).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Fetched {
        status,
        headers,
        body,
    }
}

/// Sends `request` on a new connection and returns the response with its body unread.
pub async fn send_head(
    addr: SocketAddr,
    request: Request<Empty<Bytes>>,
) -> Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender.send_request(request).await.unwrap()
}

/// A TCP connection to `addr` from the local address `local` (any address in
/// 127.0.0.0/8 works on Linux), so one test can be many clients.
pub async fn connect_from(local: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if local.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(local, 0))?;
    socket.connect(addr).await
}

/// [`send`] on a new connection from the local address `local`.
pub async fn send_from(local: IpAddr, addr: SocketAddr, request: Request<Empty<Bytes>>) -> Fetched {
    let stream = connect_from(local, addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Fetched {
        status,
        headers,
        body,
    }
}

/// Resident memory of process `pid` in KiB, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The value of the metric line starting with `series` on the stats listener
/// at `stats` (basic auth `auth`); 0 when there is no such line.
pub async fn stats_metric(stats: SocketAddr, auth: (&str, &str), series: &str) -> f64 {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", auth.0, auth.1));
    let page = send(
        stats,
        Request::get("/metrics")
            .header("host", "stats")
            .header("authorization", format!("Basic {auth}"))
            .body(Empty::new())
            .unwrap(),
    )
    .await
    .text();
    series_value(&page, series).unwrap_or(0.0)
}

/// The value on the line of the metrics page `text` that starts with
/// `series` (a name and, as rendered, its labels), if there is one.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}
