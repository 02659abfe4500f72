//! TCP relay throughput, in one run on the same loopback path: amslb (splice
//! and buffered copy), HAProxy `mode tcp` and nginx `stream {}`, each in front
//! of the same in-process sink. Prints Gbit/s, proxy CPU seconds per GB, and
//! the ratios to HAProxy.
//!
//! Run: `cargo bench --bench tcp_relay` (needs haproxy, nginx and
//! libnginx-mod-stream). Bounded: `ROUNDS` × `SECS` seconds per case, eight
//! cases (about a minute).
//!
//! What it measures: clients write 256 KiB buffers as fast as they can for
//! `SECS`, then half-close; the sink counts bytes until every stream's EOF.
//! Client→node is the direction that matters for RTMP/SRT ingest. The proxy's
//! CPU is read from /proc (user + system, all its threads or workers).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Seconds of load per case and round.
const SECS: u64 = 2;
/// Rounds; the proxies take turns in each, and the median round is reported,
/// because the machine is shared and its load changes while the bench runs.
const ROUNDS: usize = 3;
/// Parallel client connections per case.
const CONNS: &[usize] = &[1, 8];
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// A proxy under test: its listening port and the process ids whose CPU counts.
struct Proxy {
    name: &'static str,
    addr: SocketAddr,
    children: Vec<Child>,
    /// Pid whose threads do the work (nginx: the master, workers are found by ppid).
    pid: u32,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(addr: SocketAddr) {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{addr} never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn require(program: &str, package: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{program} missing: apt-get install {package}");
}

/// CPU seconds (user + system) used so far by `pid` and its direct children.
fn cpu_secs(pid: u32) -> f64 {
    let ticks = |stat: &str| -> (u64, u32) {
        // Fields after the ")" of the command name: state ppid ... utime(14) stime(15).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        let used = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        (used, ppid)
    };
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let (used, ppid) = ticks(&stat);
        if p == pid || ppid == pid {
            total += used;
        }
    }
    total as f64 / 100.0 // USER_HZ is 100 on Linux
}

/// Starts a proxy process with its output discarded.
fn spawn_quiet(command: &mut Command) -> Child {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn start_amslb(dir: &Path, backend: SocketAddr) -> Vec<Proxy> {
    let (splice_port, copy_port) = (free_port(), free_port());
    let config = format!(
        r#"
[global]
max_connections = 1000
[[listener]]
name = "splice"
bind = ["127.0.0.1:{splice_port}"]
protocol = "tcp"
[[listener]]
name = "copy"
bind = ["127.0.0.1:{copy_port}"]
protocol = "tcp"
splice = false
[[group]]
name = "origin"
[cluster]
[[cluster.node]]
id = "sink"
address = "127.0.0.1"
group = "origin"
rtmp_port = {}
"#,
        backend.port()
    );
    let path = dir.join("amslb.toml");
    std::fs::write(&path, config).unwrap();
    let child = spawn_quiet(
        Command::new(env!("CARGO_BIN_EXE_amslb"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn"),
    );
    let pid = child.id();
    let splice: SocketAddr = ([127, 0, 0, 1], splice_port).into();
    let copy: SocketAddr = ([127, 0, 0, 1], copy_port).into();
    wait_listening(splice);
    wait_listening(copy);
    vec![
        Proxy {
            name: "amslb splice",
            addr: splice,
            children: vec![child],
            pid,
        },
        // Same process: its CPU is read from the same pid.
        Proxy {
            name: "amslb copy",
            addr: copy,
            children: vec![],
            pid,
        },
    ]
}

fn start_haproxy(dir: &Path, backend: SocketAddr) -> Proxy {
    require("haproxy", "haproxy");
    let port = free_port();
    let config = format!(
        "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\nbackend b\n  server s1 {backend}\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = spawn_quiet(Command::new("haproxy").arg("-db").arg("-f").arg(&path));
    let addr = ([127, 0, 0, 1], port).into();
    wait_listening(addr);
    Proxy {
        name: "haproxy",
        addr,
        pid: child.id(),
        children: vec![child],
    }
}

fn start_nginx(dir: &Path, backend: SocketAddr) -> Proxy {
    require("nginx", "nginx");
    assert!(
        Path::new(STREAM_MODULE).exists(),
        "{STREAM_MODULE} missing: apt-get install libnginx-mod-stream"
    );
    let port = free_port();
    let d = dir.display();
    let config = format!(
        "load_module {STREAM_MODULE};\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\n\
         events {{ worker_connections 1024; }}\n\
         stream {{ server {{ listen 127.0.0.1:{port}; proxy_pass {backend}; }} }}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let child = spawn_quiet(
        Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("nginx.err"))
            .arg("-g")
            .arg("daemon off;"),
    );
    let addr = ([127, 0, 0, 1], port).into();
    wait_listening(addr);
    Proxy {
        name: "nginx stream",
        addr,
        pid: child.id(),
        children: vec![child],
    }
}

/// The sink: counts every byte it receives, closes each stream after its EOF.
async fn sink() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, received)
}

/// One case: `conns` clients writing through `proxy` for `SECS`; returns
/// (Gbit/s, proxy CPU seconds per GB).
async fn run_case(proxy: &Proxy, conns: usize, received: &AtomicU64) -> (f64, f64) {
    let before_bytes = received.load(Ordering::Relaxed);
    let before_cpu = cpu_secs(proxy.pid);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(SECS);
    let mut clients = Vec::new();
    for _ in 0..conns {
        let addr = proxy.addr;
        clients.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let buf = vec![0x5au8; 256 * 1024];
            while Instant::now() < deadline {
                if s.write_all(&buf).await.is_err() {
                    return;
                }
            }
            let _ = s.shutdown().await;
            // Wait for the sink's close to come back through the proxy.
            let mut end = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut end)).await;
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bytes = (received.load(Ordering::Relaxed) - before_bytes) as f64;
    let cpu = cpu_secs(proxy.pid) - before_cpu;
    (bytes * 8.0 / elapsed / 1e9, cpu / (bytes / 1e9))
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("amslb-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (backend, received) = sink().await;
        let mut proxies = start_amslb(&dir, backend);
        proxies.push(start_haproxy(&dir, backend));
        proxies.push(start_nginx(&dir, backend));
        println!(
            "TCP relay, client→node, median of {ROUNDS} rounds of {SECS} s, loopback, one machine"
        );
        println!(
            "{:<14} {:>5} {:>9} {:>13} {:>13} {:>13}",
            "proxy", "conns", "Gbit/s", "CPU s/GB", "vs haproxy", "CPU vs hap."
        );
        for &conns in CONNS {
            let mut rounds: Vec<Vec<(f64, f64)>> = vec![Vec::new(); proxies.len()];
            for _ in 0..ROUNDS {
                for (i, p) in proxies.iter().enumerate() {
                    rounds[i].push(run_case(p, conns, &received).await);
                }
            }
            let results: Vec<(&str, (f64, f64))> = proxies
                .iter()
                .zip(rounds)
                .map(|(p, r)| {
                    (
                        p.name,
                        (median(r.iter().map(|x| x.0)), median(r.iter().map(|x| x.1))),
                    )
                })
                .collect();
            let hap = results
                .iter()
                .find(|r| r.0 == "haproxy")
                .map(|r| r.1)
                .unwrap_or((1.0, 1.0));
            for (name, (gbps, cpu)) in results {
                println!(
                    "{name:<14} {conns:>5} {gbps:>9.2} {cpu:>13.3} {:>12.2}x {:>12.2}x",
                    gbps / hap.0,
                    cpu / hap.1
                );
            }
        }
        drop(proxies);
        let _ = std::fs::remove_dir_all(&dir);
    });
}
