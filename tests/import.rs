//! `amslb import haproxy|nginx FILE` on the configs AMS users run: the HAProxy
//! config of the AMS cluster guide (tests/fixtures/haproxy-ams-guide.cfg, from
//! seeds/004) and one in the shape of AMS's official nginx balancer
//! (tests/fixtures/nginx-ams.conf). Each imports to a config `amslb check`
//! accepts, and the original balancer (real HAProxy / nginx) and amslb with the
//! imported config, in front of the same simulated nodes, send each request to
//! the same group. The only rewrites are for the loopback test bed: addresses
//! and listen ports moved to loopback, certificate paths to a test CA's files,
//! and nginx's `user`/worker limits and log paths (HAProxy 2.6 also needs the
//! guide's removed `reqadd` written as `http-request add-header`).

mod support;
mod tls_support;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{Amslb, SimNode, unique_loopback, wait_listening};
use tokio::io::AsyncWriteExt;

const HAPROXY_GUIDE: &str = include_str!("fixtures/haproxy-ams-guide.cfg");
const NGINX_AMS: &str = include_str!("fixtures/nginx-ams.conf");
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// Runs `amslb import KIND FILE`: (exit code, stdout, stderr).
fn import(kind: &str, file: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_amslb"))
        .args(["import", kind])
        .arg(format!(
            "{}/tests/fixtures/{file}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check(toml: &str) -> (i32, String) {
    let file = support::temp_config(toml);
    support::amslb_command(&["check", "--config", file.path().to_str().unwrap()])
}

#[test]
fn haproxy_guide_imports_to_a_config_that_passes_check() {
    let (code, toml, notes) = import("haproxy", "haproxy-ams-guide.cfg");
    assert_eq!(code, 0, "import failed:\n{notes}\n{toml}");
    let (code, out) = check(&toml);
    assert_eq!(code, 0, "amslb check refused the import:\n{out}\n{toml}");
    let config = amslb::config::parse_str(&toml, "t.toml".as_ref())
        .unwrap()
        .config;
    assert_eq!(config.global.max_connections, 2000);
    assert_eq!(config.timeouts.connect, Duration::from_secs(5));
    assert_eq!(config.timeouts.tunnel, Duration::from_secs(7200));
    let listener = |name: &str| config.listeners.iter().find(|l| l.name == name).unwrap();
    assert_eq!(listener("rtmp_lb").protocol, amslb::config::Protocol::Tcp);
    assert!(listener("http_lb").redirect_https);
    assert_eq!(listener("http_lb").bind.len(), 2);
    assert_eq!(
        listener("frontend_https").protocol,
        amslb::config::Protocol::Https
    );
    assert_eq!(
        config.sticky.mode,
        amslb::config::sticky::StickyMode::Prefix
    );
    let ams1 = config
        .cluster
        .nodes
        .iter()
        .find(|n| n.id == "ams1")
        .unwrap();
    assert_eq!(ams1.cookie.as_deref(), Some("ams1"));
    assert_eq!(config.stats.as_ref().unwrap().bind.port(), 6080);
    // Untranslated items go to stderr with the line and why.
    assert!(
        notes.contains(":32: not translated: stats uri /haproxy_stats"),
        "{notes}"
    );
    assert!(notes.contains("errorfile 503"), "{notes}");
    assert!(
        notes.contains("server ams2 is 172.30.0.48 elsewhere"),
        "{notes}"
    );
}

#[test]
fn nginx_ams_config_imports_to_a_config_that_passes_check() {
    let (code, toml, notes) = import("nginx", "nginx-ams.conf");
    assert_eq!(code, 0, "import failed:\n{notes}\n{toml}");
    let (code, out) = check(&toml);
    assert_eq!(code, 0, "amslb check refused the import:\n{out}\n{toml}");
    let config = amslb::config::parse_str(&toml, "t.toml".as_ref())
        .unwrap()
        .config;
    let group = |name: &str| config.group(name).unwrap();
    assert_eq!(
        group("origin").balance,
        amslb::config::BalanceMode::LeastConn
    );
    assert_eq!(group("origin").backup.as_deref(), Some("edge"));
    assert_eq!(group("edge").backup.as_deref(), Some("origin"));
    assert_eq!(config.timeouts.tunnel, Duration::from_secs(7 * 86_400));
    assert_eq!(config.timeouts.server, Duration::from_secs(10));
    let by_port: BTreeMap<u16, (&str, amslb::config::Protocol)> = config
        .listeners
        .iter()
        .map(|l| (l.bind[0].port(), (l.default_group.as_str(), l.protocol)))
        .collect();
    use amslb::config::Protocol::*;
    assert_eq!(by_port[&80], ("origin", Http));
    assert_eq!(by_port[&5080], ("edge", Http));
    assert_eq!(by_port[&4444], ("origin", Https));
    assert_eq!(by_port[&4445], ("origin", Http));
    assert_eq!(by_port[&1935], ("origin", Tcp));
    assert_eq!(by_port[&1936], ("origin", Tls));
    assert_eq!(by_port[&4200], ("origin", Udp));
    assert_eq!(config.cluster.nodes.len(), 4);
    assert_eq!(config.cluster.srt_port, 4200);
    assert!(notes.contains("ip_hash"), "{notes}");
    assert!(notes.contains("proxy_timeout 3s"), "{notes}");
    assert!(notes.contains("proxy_read_timeout 7d"), "{notes}");
}

#[test]
fn import_of_a_config_that_cannot_pass_check_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("haproxy.cfg");
    // A stats listener on every address without credentials: check refuses it.
    std::fs::write(&file, "listen stats\n  bind :6080\n  stats enable\n").unwrap();
    let (code, out) = support::amslb_command(&["import", "haproxy", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not pass amslb check"), "{out}");
}

/// Answers every TCP connection with its node id and every UDP datagram
/// with the id, on the RTMP and SRT ports of a node's address.
struct L4Node {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl L4Node {
    async fn start(id: &str, ip: IpAddr) -> Self {
        let tcp = tokio::net::TcpListener::bind((ip, 1935)).await.unwrap();
        let udp = tokio::net::UdpSocket::bind((ip, 4200)).await.unwrap();
        let (tcp_id, udp_id) = (id.to_string(), id.to_string());
        let tasks = vec![
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = tcp.accept().await {
                    let _ = stream.write_all(tcp_id.as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            }),
            tokio::spawn(async move {
                let mut buf = [0u8; 1500];
                while let Ok((_, peer)) = udp.recv_from(&mut buf).await {
                    let _ = udp.send_to(udp_id.as_bytes(), peer).await;
                }
            }),
        ];
        L4Node { tasks }
    }
}

impl Drop for L4Node {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A real nginx (or HAProxy) process; killed when dropped.
struct Reference(Child);

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The group of the node that answered (`origin-1` → `origin`), or what went wrong.
fn group_of(node: &str) -> String {
    node.rsplit_once('-')
        .map(|(g, _)| g.to_string())
        .unwrap_or_else(|| node.to_string())
}

/// One HTTP(S) request with curl: the status and the node that answered.
fn http(method: &str, url: &str) -> (u16, String) {
    support_curl(&["-X", method, url])
}

fn support_curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "5", "-o", "/dev/null", "-D", "-"])
        .args(args)
        .output()
        .expect("curl is missing: apt-get install curl");
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let node = head
        .lines()
        .find_map(|l| l.strip_prefix("x-node-id: "))
        .map(|v| v.trim().to_string())
        .or_else(|| {
            head.lines()
                .find_map(|l| l.strip_prefix("location: "))
                .map(|v| format!("redirect {}", v.split(':').next().unwrap_or("").trim()))
        })
        .unwrap_or_default();
    (status, node)
}

fn rtmp_node(addr: SocketAddr) -> String {
    use std::io::Read;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut id = String::new();
    let _ = stream.read_to_string(&mut id);
    id
}

fn srt_node(addr: SocketAddr) -> String {
    let socket = UdpSocket::bind((addr.ip(), 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        socket.send_to(b"srt", addr).unwrap();
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            return String::from_utf8_lossy(&buf[..n]).into_owned();
        }
    }
    String::new()
}

/// What answered one request, through one balancer at `ip`.
fn answers(ip: IpAddr, cases: &[Case]) -> Vec<String> {
    cases
        .iter()
        .map(|case| match case {
            Case::Http(method, port, path) => {
                let (status, node) = http(method, &format!("http://{ip}:{port}{path}"));
                format!("{status} {}", group_of(&node))
            }
            Case::Https(port, path) => {
                let (status, node) = http("GET", &format!("https://{ip}:{port}{path}"));
                format!("{status} {}", group_of(&node))
            }
            Case::Rtmp(port) => group_of(&rtmp_node(SocketAddr::new(ip, *port))),
            Case::Srt(port) => group_of(&srt_node(SocketAddr::new(ip, *port))),
        })
        .collect()
}

#[derive(Debug)]
enum Case {
    Http(&'static str, u16, &'static str),
    Https(u16, &'static str),
    Rtmp(u16),
    Srt(u16),
}

/// Writes a test CA's leaf for `ip` as nginx wants it (chain, key) and as
/// amslb and HAProxy want it (one combined PEM in a directory).
fn certificates(dir: &std::path::Path, ips: &[IpAddr]) -> (String, String, String) {
    let ca = tls_support::TestCa::new();
    let names: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (cert, key) = ca.leaf(&names);
    let chain = dir.join("fullchain.pem");
    let private = dir.join("privkey.pem");
    std::fs::write(&chain, &cert).unwrap();
    std::fs::write(&private, &key).unwrap();
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("live.pem"), format!("{cert}{key}")).unwrap();
    (
        chain.display().to_string(),
        private.display().to_string(),
        certs.display().to_string(),
    )
}

fn wait_ready(program: &str, child: &mut Child, addrs: &[SocketAddr], log: &std::path::Path) {
    wait_listening(program, child, addrs, log);
}

/// Polls until `f` holds (bounded), for state both balancers reach on their own.
fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_and_its_import_route_every_request_to_the_same_group() {
    tls_support::require("nginx", "nginx");
    tls_support::require("curl", "curl");
    assert!(
        std::path::Path::new(STREAM_MODULE).exists(),
        "{STREAM_MODULE} is missing: apt-get install libnginx-mod-stream"
    );
    // The fixture's four nodes, each simulated on its own loopback address.
    let ids = [
        ("10.0.1.11", "origin-1"),
        ("10.0.1.12", "origin-2"),
        ("10.0.2.21", "edge-1"),
        ("10.0.2.22", "edge-2"),
    ];
    let mut sims: Vec<SimNode> = Vec::new();
    let mut l4 = Vec::new();
    let mut nginx_conf = NGINX_AMS.to_string();
    let (code, mut imported, notes) = import("nginx", "nginx-ams.conf");
    assert_eq!(code, 0, "{notes}");
    for (fixture_ip, id) in ids {
        let sim = support::sim_node(id).await;
        l4.push(L4Node::start(id, sim.addr.ip()).await);
        nginx_conf = nginx_conf.replace(fixture_ip, &sim.addr.ip().to_string());
        imported = imported.replace(
            &format!("\"{fixture_ip}\""),
            &format!("\"{}\"", sim.addr.ip()),
        );
        sims.push(sim);
    }
    let nginx_ip = unique_loopback();
    let amslb_ip = unique_loopback();
    let dir = tempfile::tempdir().unwrap();
    let (chain, key, certs_dir) = certificates(dir.path(), &[nginx_ip, amslb_ip]);

    // nginx: the fixture with listen ports on its own loopback address.
    for port in [80, 5080, 4444, 4445, 1935, 1936, 4200] {
        nginx_conf = nginx_conf.replace(
            &format!("listen {port}"),
            &format!("listen {nginx_ip}:{port}"),
        );
    }
    let home = dir.path().join("nginx");
    std::fs::create_dir_all(&home).unwrap();
    nginx_conf = nginx_conf
        .replace("user nginx;", "")
        .replace("worker_rlimit_nofile 1048576;", "")
        .replace("worker_connections 1048576;", "worker_connections 1024;")
        .replace(
            "/var/run/nginx.pid",
            &home.join("nginx.pid").display().to_string(),
        )
        .replace("/var/log/nginx/", &format!("{}/", home.display()))
        .replace(
            "/etc/letsencrypt/live/live.example.com/fullchain.pem",
            &chain,
        )
        .replace("/etc/letsencrypt/live/live.example.com/privkey.pem", &key);
    nginx_conf = format!("load_module {STREAM_MODULE};\n{nginx_conf}");
    let conf_path = home.join("nginx.conf");
    std::fs::write(&conf_path, &nginx_conf).unwrap();
    let log = home.join("stderr.log");
    let mut nginx = Reference(
        Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&home)
            .arg("-e")
            .arg(home.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start nginx"),
    );
    let ready: Vec<SocketAddr> = [80, 5080, 4445, 1935]
        .iter()
        .map(|p| SocketAddr::new(nginx_ip, *p))
        .collect();
    wait_ready("nginx", &mut nginx.0, &ready, &log);

    // amslb: the import, with its wildcard binds on another loopback address.
    let imported = imported
        .replace("\"0.0.0.0:", &format!("\"{amslb_ip}:"))
        .replace("certs_dir = \"/etc/amslb/certs\"", &format!("certs_dir = {certs_dir:?}"))
        // Faster health checks so the backup case below settles quickly.
        + "\n[health]\ninterval = \"500ms\"\nfall = 2\n";
    let ready: Vec<SocketAddr> = [80, 5080, 4445, 1935]
        .iter()
        .map(|p| SocketAddr::new(amslb_ip, *p))
        .collect();
    let amslb = Amslb::start(&imported, &ready);
    eventually(Duration::from_secs(10), "amslb's nodes up", || {
        http(
            "GET",
            &format!("http://{amslb_ip}:5080/LiveApp/rest/v2/version"),
        )
        .0 == 200
    });

    let cases = [
        // Publish port 80 → origin; play port 5080 → edge; ?target= both ways.
        Case::Http("POST", 80, "/LiveApp/whip/stream1"),
        Case::Http("GET", 80, "/LiveApp/rest/v2/broadcasts/list/0/10"),
        Case::Http("GET", 80, "/LiveApp/rest/v2/version?target=edge"),
        Case::Http("GET", 80, "/LiveApp/rest/v2/version?target=origin"),
        Case::Http("GET", 5080, "/LiveApp/streams/stream1.m3u8"),
        Case::Http("GET", 5080, "/LiveApp/rest/v2/version"),
        Case::Http("POST", 5080, "/LiveApp/whep/stream1"),
        Case::Http("GET", 5080, "/LiveApp/rest/v2/version?target=origin"),
        Case::Http("GET", 5080, "/LiveApp/streams/stream1.m3u8?target=edge"),
        // RTMP and RTMPS to the origins, SRT too.
        Case::Rtmp(1935),
        Case::Srt(4200),
    ];
    let by_nginx = answers(nginx_ip, &cases);
    let by_amslb = answers(amslb_ip, &cases);
    for ((case, n), a) in cases.iter().zip(&by_nginx).zip(&by_amslb) {
        assert_eq!(n, a, "{case:?}: nginx {n}, amslb {a}\n{}", amslb.log());
    }
    // Sanity: the comparison is not all one group.
    assert_eq!(by_nginx[0], "201 origin");
    assert_eq!(by_nginx[4], "200 edge");
    assert_eq!(by_nginx[9], "origin");
    assert_eq!(by_nginx[10], "origin");

    // The dashboard: nginx hashes the client over every node; amslb sends it to
    // the origins (noted by the import). Both answer from a node.
    let (status, node) = http("GET", &format!("http://{nginx_ip}:4445/"));
    assert!(
        status == 200 && !node.is_empty(),
        "nginx dashboard: {status} {node}"
    );
    assert_eq!(
        answers(amslb_ip, &[Case::Http("GET", 4445, "/")]),
        ["200 origin"]
    );

    // A difference on purpose: HLS asked on the publish port. nginx sends it
    // to the origins (port 80's upstream), amslb's router to the edges.
    let hls = [Case::Http("GET", 80, "/LiveApp/streams/stream1.m3u8")];
    assert_eq!(answers(nginx_ip, &hls), ["200 origin"]);
    assert_eq!(answers(amslb_ip, &hls), ["200 edge"]);

    // Backup: with both edges gone, the play port falls back to the origins in both.
    for sim in &sims[2..] {
        sim.stop();
    }
    let play = [Case::Http("GET", 5080, "/LiveApp/rest/v2/version")];
    eventually(
        Duration::from_secs(15),
        "amslb to fall back to origin",
        || answers(amslb_ip, &play) == ["200 origin"],
    );
    assert_eq!(answers(nginx_ip, &play), ["200 origin"]);
    drop(nginx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_guide_and_its_import_route_every_request_to_the_same_group() {
    tls_support::require("haproxy", "haproxy");
    tls_support::require("curl", "curl");
    let (code, mut imported, notes) = import("haproxy", "haproxy-ams-guide.cfg");
    assert_eq!(code, 0, "{notes}");
    let mut config = HAPROXY_GUIDE.to_string();
    let mut sims = Vec::new();
    let mut l4 = Vec::new();
    for (guide_ip, id) in [("172.30.0.42", "ams-1"), ("172.30.0.48", "ams-2")] {
        let sim = support::sim_node(id).await;
        l4.push(L4Node::start(id, sim.addr.ip()).await);
        config = config.replace(guide_ip, &sim.addr.ip().to_string());
        imported = imported.replace(
            &format!("\"{guide_ip}\""),
            &format!("\"{}\"", sim.addr.ip()),
        );
        sims.push(sim);
    }
    let haproxy_ip = unique_loopback();
    let amslb_ip = unique_loopback();
    let dir = tempfile::tempdir().unwrap();
    let (_, _, certs_dir) = certificates(dir.path(), &[haproxy_ip, amslb_ip]);
    let pem = format!("{certs_dir}/live.pem");
    let config = config
        .replace("bind *:", &format!("bind {haproxy_ip}:"))
        .replace("bind :6080", &format!("bind {haproxy_ip}:6080"))
        .replace("/etc/haproxy/certs/$DOMAIN.pem", &pem)
        // Removed in HAProxy 2.1; the same header in today's syntax.
        .replace(
            "reqadd X-Forwarded-Proto:\\ http",
            "http-request add-header X-Forwarded-Proto http",
        )
        .replace("log 127.0.0.1 local0 notice", "");
    let reference = support::haproxy::Haproxy::start(&config, SocketAddr::new(haproxy_ip, 80));
    let imported = imported
        .replace("\"0.0.0.0:", &format!("\"{amslb_ip}:"))
        .replace(
            "certs_dir = \"/etc/haproxy/certs\"",
            &format!("certs_dir = {certs_dir:?}"),
        );
    let ready: Vec<SocketAddr> = [80, 443, 1935]
        .iter()
        .map(|p| SocketAddr::new(amslb_ip, *p))
        .collect();
    let amslb = Amslb::start(&imported, &ready);
    eventually(Duration::from_secs(10), "amslb's nodes up", || {
        http(
            "GET",
            &format!("https://{amslb_ip}:443/LiveApp/rest/v2/version"),
        )
        .0 == 200
    });
    let cases = [
        // The guide's backend redirects plain HTTP to HTTPS on both ports.
        Case::Http("GET", 80, "/LiveApp/streams/stream1.m3u8"),
        Case::Http("GET", 5080, "/LiveApp/rest/v2/version"),
        Case::Https(443, "/LiveApp/streams/stream1.m3u8"),
        Case::Https(443, "/LiveApp/rest/v2/version?target=edge"),
        Case::Https(5443, "/LiveApp/whip/stream1"),
        Case::Rtmp(1935),
    ];
    let by_haproxy = answers(haproxy_ip, &cases);
    let by_amslb = answers(amslb_ip, &cases);
    for ((case, h), a) in cases.iter().zip(&by_haproxy).zip(&by_amslb) {
        assert_eq!(h, a, "{case:?}: HAProxy {h}, amslb {a}\n{}", amslb.log());
    }
    assert_eq!(by_haproxy[0], "302 redirect https");
    assert_eq!(by_haproxy[2], "200 ams");
    assert_eq!(by_haproxy[5], "ams");
    drop(reference);
}
