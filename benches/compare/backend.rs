//! The neutral backend every balancer forwards to: nginx on two node addresses
//! (small fixed body, a 100 MB body, headers that show which node answered and
//! what X-Forwarded-For arrived), and a small WebSocket echo node in-process,
//! since nginx cannot accept WebSocket upgrades by itself.

use crate::net::NODE_PORT;
use crate::procs::{Daemon, StartError};
use futures_util::{SinkExt, StreamExt};
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Path of the small response.
pub const SMALL_PATH: &str = "/small";
/// The small response body.
pub const SMALL_BODY: &str = "amslb bench: a small fixed response body\n";
/// Path of the large response.
pub const LARGE_PATH: &str = "/100m";
/// Size of the large response.
pub const LARGE_BYTES: u64 = 100 * 1024 * 1024;
/// Scenario 9's live playlist, where AMS serves HLS.
pub const PLAYLIST_PATH: &str = "/LiveApp/streams/bench.m3u8";
/// Segments of the scenario 9 stream (the playlist's window).
pub const SEGMENTS: usize = 6;
/// Size of one segment: 1 MB, about 1 s of 8 Mbit/s video.
pub const SEGMENT_BYTES: u64 = 1_000_000;

/// Path of segment `n` of the scenario 9 stream, named the way AMS names them.
pub fn segment_path(n: usize) -> String {
    format!("/LiveApp/streams/bench{:09}.ts", n + 1)
}

/// AMS's liveness path, probed by amslb's (and HAProxy's) health checks.
pub const LIVENESS_PATH: &str = "/rest/v2/liveness";
/// What AMS answers there.
const LIVENESS_BODY: &str = r#"{"status":"ok"}"#;
/// Response header naming the node address that answered.
pub const NODE_HEADER: &str = "x-node";
/// Response header echoing the X-Forwarded-For the node received.
pub const XFF_HEADER: &str = "x-seen-xff";

/// The lines every nginx config of the bench starts with: pid, logs and temp
/// files inside the bench's directory (`-p DIR`), never in /var.
pub fn nginx_preamble(name: &str, workers: usize) -> String {
    // Started as root, nginx would switch its workers to `nobody`, who cannot
    // write the bench's temp directory.
    let user = if running_as_root() {
        "user root;\n"
    } else {
        ""
    };
    format!(
        "{user}worker_processes {workers};\n\
         pid {name}.pid;\nerror_log {name}-error.log warn;\n"
    )
}

/// The `http {}` settings shared by the backend and the nginx proxy.
pub fn nginx_http_common(name: &str) -> String {
    format!(
        "access_log off;\ndefault_type text/plain;\nkeepalive_requests 10000000;\n\
         client_body_temp_path {name}-body-tmp;\nproxy_temp_path {name}-proxy-tmp;\n\
         fastcgi_temp_path {name}-fastcgi-tmp;\nuwsgi_temp_path {name}-uwsgi-tmp;\n\
         scgi_temp_path {name}-scgi-tmp;\n"
    )
}

/// Runs nginx on `conf` (already written) with prefix `dir`, in the foreground.
pub fn start_nginx(
    name: &str,
    program: &Path,
    dir: &Path,
    conf: &Path,
) -> Result<Daemon, StartError> {
    Daemon::spawn(
        name,
        Command::new(program)
            .arg("-e")
            .arg(dir.join(format!("{name}-error.log")))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(conf)
            .args(["-g", "daemon off;"]),
        &dir.join(format!("{name}.log")),
    )
}

/// Starts the backend nginx on `nodes` (port 5080), serving from `dir`.
pub fn start_http_nodes(nginx: &Path, dir: &Path, nodes: &[IpAddr]) -> Result<Daemon, StartError> {
    let www = dir.join("www");
    fs::create_dir_all(&www).map_err(|e| StartError::Failed(e.to_string()))?;
    // Sparse: reads as zeros, costs no disk, and nginx sends it with sendfile.
    fs::File::create(www.join(&LARGE_PATH[1..]))
        .and_then(|f| f.set_len(LARGE_BYTES))
        .map_err(|e| StartError::Failed(e.to_string()))?;
    write_hls_stream(&www).map_err(|e| StartError::Failed(format!("HLS files: {e}")))?;
    let listens: String = nodes
        .iter()
        .map(|ip| format!("    listen {}:{NODE_PORT};\n", ip))
        .collect();
    let conf = format!(
        "{preamble}events {{ worker_connections 30000; }}\n\
         http {{\n{common}sendfile on;\ntcp_nopush on;\n\
         server {{\n{listens}    root {www};\n\
         add_header {NODE_HEADER} $server_addr always;\n\
         add_header {XFF_HEADER} $http_x_forwarded_for always;\n\
         location = {SMALL_PATH} {{ return 200 \"{body}\"; }}\n\
         location = {LIVENESS_PATH} {{ default_type application/json; return 200 '{LIVENESS_BODY}'; }}\n\
         location = {LARGE_PATH} {{ }}\n}}\n}}\n",
        preamble = nginx_preamble("backend", 1),
        common = nginx_http_common("backend"),
        www = www.display(),
        body = SMALL_BODY.escape_default(),
    );
    let path = dir.join("backend.conf");
    fs::write(&path, conf).map_err(|e| StartError::Failed(e.to_string()))?;
    serving(start_nginx("backend", nginx, dir, &path)?, nodes)
}

/// Writes scenario 9's playlist and its (sparse) segments under `www`; nginx
/// serves them as static files.
fn write_hls_stream(www: &Path) -> std::io::Result<()> {
    let playlist = www.join(&PLAYLIST_PATH[1..]);
    let dir = playlist.parent().unwrap_or(www);
    fs::create_dir_all(dir)?;
    let mut text = String::from(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:1\n",
    );
    for n in 0..SEGMENTS {
        let path = segment_path(n);
        let name = path.rsplit('/').next().unwrap_or(&path);
        text += &format!("#EXTINF:1.000,\n{name}\n");
        fs::File::create(dir.join(name))?.set_len(SEGMENT_BYTES)?;
    }
    fs::write(playlist, text)
}

/// `daemon` once it listens on every node address (port 5080).
fn serving(mut daemon: Daemon, nodes: &[IpAddr]) -> Result<Daemon, StartError> {
    let addrs: Vec<SocketAddr> = nodes
        .iter()
        .map(|ip| SocketAddr::new(*ip, NODE_PORT))
        .collect();
    daemon.wait_listening(&addrs)?;
    Ok(daemon)
}

/// Environment variable that turns the bench binary into the WebSocket node
/// process: a comma-separated list of node addresses.
pub const WS_NODES_ENV: &str = "AMSLB_BENCH_WS_NODES";

/// Starts WebSocket echo nodes on `nodes` (port 5080) in a child process (this
/// binary again, see [`ws_node_main`]): the node side of every tunnel then
/// counts against the child's file descriptor limit, not the bench's.
pub fn spawn_ws_nodes(dir: &Path, nodes: &[IpAddr]) -> Result<Daemon, StartError> {
    let exe = std::env::current_exe().map_err(|e| StartError::Failed(e.to_string()))?;
    let list: Vec<String> = nodes.iter().map(|ip| ip.to_string()).collect();
    let daemon = Daemon::spawn(
        "websocket nodes",
        Command::new(exe).env(WS_NODES_ENV, list.join(",")),
        &dir.join("ws-nodes.log"),
    )?;
    serving(daemon, nodes)
}

/// Body of the WebSocket node process: serves until killed.
pub fn ws_node_main(list: &str) -> Result<(), String> {
    let nodes: Vec<IpAddr> = list
        .split(',')
        .map(|ip| ip.parse().map_err(|e| format!("{ip}: {e}")))
        .collect::<Result<_, _>>()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let tasks = start_ws_nodes(&nodes).await.map_err(|e| e.to_string())?;
        for task in tasks {
            task.await.map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

/// WebSocket echo nodes on `nodes` (port 5080), one accept task per address
/// owning its connections in a `JoinSet`.
async fn start_ws_nodes(nodes: &[IpAddr]) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for ip in nodes {
        let listener = TcpListener::bind(SocketAddr::new(*ip, NODE_PORT)).await?;
        tasks.push(tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            conns.spawn(echo(stream));
                        }
                    }
                    // Reap finished tunnels so the set does not grow without bound.
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }));
    }
    Ok(tasks)
}

/// Answers a health probe like AMS, or accepts the upgrade and echoes data
/// messages until the peer closes.
async fn echo(mut stream: tokio::net::TcpStream) {
    let probe = format!("GET {LIVENESS_PATH} ");
    let mut head = vec![0u8; probe.len()];
    if matches!(stream.peek(&mut head).await, Ok(n) if n == head.len() && head == probe.as_bytes())
    {
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{LIVENESS_BODY}",
            LIVENESS_BODY.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        return;
    }
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
