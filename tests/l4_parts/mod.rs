//! Real parts for the L4 tests: nginx with the RTMP module as the node, ffmpeg
//! as publisher, ffprobe to check what arrived, and amslb's L4 listeners run
//! in-process on OS-chosen loopback ports.
#![allow(dead_code)] // each test file uses a different subset

use crate::support::unique_loopback;
use amslb::config::parse_str;
use amslb::runtime::Runtime;
use amslb::server::Server;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::sync::oneshot;

/// Fails the test with install advice when a program is missing.
pub fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(found, "{program} is missing: apt-get install {package}");
}

/// One nginx process (`master_process off`, so killing it closes every
/// connection at once, like a crashed node) running `body` with `module`
/// loaded, in its own directory; killed when dropped.
pub struct Nginx {
    pub dir: TempDir,
    child: Option<Child>,
}

impl Nginx {
    /// Starts nginx in `dir` and waits until it accepts on `addr`.
    fn start(module: &str, package: &str, dir: TempDir, body: &str, addr: SocketAddr) -> Self {
        require("nginx", "nginx");
        assert!(
            Path::new(module).exists(),
            "{module} is missing: apt-get install {package}"
        );
        let conf = format!(
            "load_module {module};\n\
             master_process off;\n\
             pid {dir}/nginx.pid;\n\
             error_log {dir}/error.log info;\n\
             events {{ worker_connections 128; }}\n\
             {body}",
            dir = dir.path().display(),
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-g")
            .arg("daemon off;")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let nginx = Self {
            dir,
            child: Some(child),
        };
        wait_tcp(addr, Duration::from_secs(10), || nginx.log());
        nginx
    }

    /// The error log, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Kills nginx abruptly (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An nginx-rtmp node on `addr:1935` that records every published stream to
/// `<dir>/rec/<name>.flv`.
pub struct RtmpNode {
    pub addr: SocketAddr,
    nginx: Nginx,
}

const RTMP_MODULE: &str = "/usr/lib/nginx/modules/ngx_rtmp_module.so";

impl RtmpNode {
    pub fn start() -> Self {
        let addr = SocketAddr::new(unique_loopback(), 1935);
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("rec");
        std::fs::create_dir_all(&rec).unwrap();
        // nginx workers may drop to an unprivileged user: let it write recordings.
        let _ = Command::new("chmod").arg("0777").arg(&rec).status();
        let body = format!(
            "rtmp {{ server {{ listen {addr}; chunk_size 4096;\n\
               application live {{ live on; record all; record_path {rec}; record_unique off; }} }} }}\n",
            rec = rec.display(),
        );
        let nginx = Nginx::start(RTMP_MODULE, "libnginx-mod-rtmp", dir, &body, addr);
        Self { addr, nginx }
    }

    /// The node's error log, for assertion messages.
    pub fn log(&self) -> String {
        self.nginx.log()
    }

    /// Where a stream published on app `live` is recorded.
    pub fn recording(&self, stream: &str) -> PathBuf {
        self.nginx
            .dir
            .path()
            .join("rec")
            .join(format!("{stream}.flv"))
    }

    /// Kills the node abruptly (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.nginx.kill();
    }
}

/// nginx's `stream` TLS terminator on `addr` in front of `upstream`, with a
/// given certificate: what an AMS node's RTMPS port is to amslb (RTMPS in,
/// RTMP to the node behind it). Logs one line per connection with whether
/// its TLS session was resumed.
pub struct TlsFront {
    pub addr: SocketAddr,
    nginx: Nginx,
}

const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

impl TlsFront {
    /// Starts the terminator with the PEM `cert` chain and `key`.
    pub fn start(addr: SocketAddr, upstream: SocketAddr, cert: &str, key: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        let body = format!(
            "stream {{\n\
               log_format tls \"$remote_addr reused=$ssl_session_reused sni=$ssl_server_name bytes=$bytes_received\";\n\
               access_log {dir}/access.log tls;\n\
               server {{ listen {addr} ssl; proxy_pass {upstream};\n\
                 ssl_certificate {cert}; ssl_certificate_key {key};\n\
                 ssl_protocols TLSv1.2 TLSv1.3; ssl_session_tickets on; }} }}\n",
            dir = dir.path().display(),
            cert = cert_path.display(),
            key = key_path.display(),
        );
        let nginx = Nginx::start(STREAM_MODULE, "libnginx-mod-stream", dir, &body, addr);
        Self { addr, nginx }
    }

    /// The terminator's error log, for assertion messages.
    pub fn log(&self) -> String {
        self.nginx.log()
    }

    /// One line per finished connection: `ADDR reused=r|. sni=NAME bytes=N`
    /// (N: bytes received from the client).
    pub fn connections(&self) -> Vec<String> {
        std::fs::read_to_string(self.nginx.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Waits until `addr` accepts TCP connections.
pub fn wait_tcp(addr: SocketAddr, limit: Duration, log: impl Fn() -> String) {
    let start = Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            start.elapsed() < limit,
            "{addr} did not start listening: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// amslb (the library's [`Server`], as the binary runs it) in this process, so
/// tests can read the L4 listener's series in its metrics registry.
pub struct Lb {
    /// Bound address of the first listener.
    pub addr: SocketAddr,
    runtime: Arc<Runtime>,
    stop: Option<oneshot::Sender<()>>,
}

/// The series of listener `l4` in the registry, as a test reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L4Counts {
    /// `amslb_connections_total`: TCP connections accepted, UDP sessions opened.
    pub connections: u64,
    /// `amslb_open_connections`: connections (TCP) or sessions (UDP) open now.
    pub active: u64,
    /// `amslb_received_bytes_total`: client to node.
    pub bytes_in: u64,
    /// `amslb_sent_bytes_total`: node to client.
    pub bytes_out: u64,
    /// `amslb_no_node_total`, all groups.
    pub no_node: u64,
    /// `amslb_l4_rejected_total`.
    pub rejected: u64,
    /// `amslb_rtmp_publishes_total`, all apps.
    pub rtmp_publishes: u64,
}

/// Sum of the series of `name` whose labels include `listener="l4"`.
pub fn series_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| l.contains("listener=\"l4\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

impl Lb {
    /// Starts a server for `config_text` (its one listener binds 127.0.0.1:0).
    pub async fn start(config_text: &str) -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let config = parse_str(config_text, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("config: {e}"))
            .config;
        let server = Server::bind(config).unwrap();
        let addr = server.local_addrs()[0].1;
        let runtime = server.runtime().clone();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Self {
            addr,
            runtime,
            stop: Some(tx),
        }
    }

    /// The whole metrics page, as `/metrics` serves it.
    pub fn metrics(&self) -> String {
        self.runtime.metrics.render(&self.runtime.cluster)
    }

    /// The listener's counters now, read from the metrics registry.
    pub fn stats(&self) -> L4Counts {
        let text = self.metrics();
        let get = |name| series_sum(&text, name);
        L4Counts {
            connections: get("amslb_connections_total"),
            active: get("amslb_open_connections"),
            bytes_in: get("amslb_received_bytes_total"),
            bytes_out: get("amslb_sent_bytes_total"),
            no_node: get("amslb_no_node_total"),
            rejected: get("amslb_l4_rejected_total"),
            rtmp_publishes: get("amslb_rtmp_publishes_total"),
        }
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Config text for a listener of `protocol` in front of `nodes` (id, address,
/// port). Active health checks are off: their probes would count as node
/// connections, and the tests show what the relay itself does.
pub fn config(listener_extra: &str, protocol: &str, nodes: &[(&str, IpAddr, u16)]) -> String {
    config_on(
        "127.0.0.1:0".parse().unwrap(),
        listener_extra,
        protocol,
        nodes,
    )
}

/// [`config`] with the listener bound to `bind`.
pub fn config_on(
    bind: SocketAddr,
    listener_extra: &str,
    protocol: &str,
    nodes: &[(&str, IpAddr, u16)],
) -> String {
    let mut text = format!(
        "[global]\nretries = 2\nshutdown_grace = \"1s\"\n\n[timeouts]\nconnect = \"1s\"\ntunnel = \"30s\"\n\n\
         [health]\nenabled = false\n\n\
         [[listener]]\nname = \"l4\"\nbind = [\"{bind}\"]\nprotocol = \"{protocol}\"\n{listener_extra}\n\n\
         [[group]]\nname = \"origin\"\nbalance = \"round-robin\"\n\n[cluster]\nsource = \"static\"\n"
    );
    for (id, addr, port) in nodes {
        text.push_str(&format!(
            "\n[[cluster.node]]\nid = \"{id}\"\naddress = \"{addr}\"\ngroup = \"origin\"\nrtmp_port = {port}\nsrt_port = {port}\n"
        ));
    }
    text
}

/// An SRT node: ffmpeg (built with libsrt) as an SRT listener on `addr`,
/// saving what it receives to `out` (MPEG-TS); ends when the caller does.
pub fn srt_node(addr: SocketAddr, out: &Path) -> Child {
    require("ffmpeg", "ffmpeg");
    let protocols = Command::new("ffmpeg")
        .args(["-hide_banner", "-protocols"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&protocols.stdout)
            .lines()
            .any(|l| l.trim() == "srt"),
        "this ffmpeg has no SRT support: install Debian's ffmpeg (built with libsrt)"
    );
    Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(["-i", &format!("srt://{addr}?mode=listener&latency=50000")])
        .args(["-c", "copy", "-f", "mpegts"])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs ffmpeg publishing a generated H.264 test pattern (320x240, 25 fps) for
/// `secs` seconds to `url` in real time; returns the process.
pub fn publish(url: &str, secs: u32, format: &str) -> Child {
    require("ffmpeg", "ffmpeg");
    Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc=size=320x240:rate=25"])
        .args(["-t", &secs.to_string()])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
            "-g",
            "25",
        ])
        .args(["-f", format, url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ffmpeg")
}

/// Waits for a child with a deadline; returns whether it exited successfully
/// and its stderr, or panics (after killing it) when it overruns.
pub fn wait_child(mut child: Child, limit: Duration) -> (bool, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            return (status.success(), err);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What ffprobe reads from a media file: codec, size and the decoded frame count.
pub fn probe(file: &Path) -> (String, u32, u32, u64) {
    require("ffprobe", "ffmpeg");
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-count_frames"])
        .args([
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames",
        ])
        .args(["-of", "csv=p=0"])
        .arg(file)
        .output()
        .expect("run ffprobe");
    // MPEG-TS prints the stream once per program and once alone: take the first.
    let text = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim()
        .to_string();
    let f: Vec<&str> = text.split(',').collect();
    assert_eq!(
        f.len(),
        4,
        "ffprobe {}: {text:?} {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        f[0].to_string(),
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
        f[3].parse().unwrap(),
    )
}

/// Runs blocking work (child processes) off the async runtime.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}
