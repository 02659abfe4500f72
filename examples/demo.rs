//! The README's first command: a whole local cluster in one process.
//!
//! `cargo run --release --example demo` reads `conf/demo.toml` (or the file
//! given as the first argument) and starts, all on loopback:
//! - a simulated AMS node for every `[[cluster.node]]` on its own address,
//! - SecantusDB with the nodes registering themselves as AMS does, when
//!   `python3 -m secantus` is installed (else the static node list, said so),
//! - an RTMP sink on every origin's RTMP port (nginx with the RTMP module when
//!   installed, else a sink that accepts and counts bytes),
//! - amslb with the status page, a generated password for it, and the config's
//!   listeners;
//!
//! then prints what to try. Ctrl-C stops amslb and everything the demo started.

// The examples use only part of the test harness.
#[allow(dead_code)]
#[path = "../tests/support/registry.rs"]
mod registry;
#[allow(dead_code)]
#[path = "../tests/support/secantus.rs"]
mod secantus;
#[allow(dead_code)]
#[path = "../tests/support/sim.rs"]
mod sim;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use toml::{Table, Value};

const RTMP_MODULE: &str = "/usr/lib/nginx/modules/ngx_rtmp_module.so";

/// One node of the config, as the demo needs it.
struct DemoNode {
    id: String,
    group: String,
    http: SocketAddr,
    rtmp: SocketAddr,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Err(e) = demo().await {
        eprintln!("demo: {e}");
        std::process::exit(1);
    }
}

async fn demo() -> Result<(), String> {
    let source = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("conf/demo.toml"));
    // Checked as given first, so a mistake in it is reported against that file.
    let base = amslb::reload::prepare(&source).map_err(|e| e.to_string())?;
    let nodes: Vec<DemoNode> = base
        .config
        .cluster
        .nodes
        .iter()
        .map(|n| DemoNode {
            id: n.id.clone(),
            group: n.group.clone(),
            http: SocketAddr::new(
                n.address,
                n.http_port.unwrap_or(base.config.cluster.http_port),
            ),
            rtmp: SocketAddr::new(
                n.address,
                n.rtmp_port.unwrap_or(base.config.cluster.rtmp_port),
            ),
        })
        .collect();
    let text = std::fs::read_to_string(&source).map_err(|e| e.to_string())?;
    let mut table: Table = text.parse().map_err(|e| format!("{e}"))?;

    let dir = tempfile::Builder::new()
        .prefix("amslb-demo")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let password = generate_password();
    let password_file = dir.path().join("stats.pass");
    write_private(&password_file, &password)?;
    if let Some(Value::Table(stats)) = table.get_mut("stats") {
        stats
            .entry("user")
            .or_insert_with(|| Value::String("admin".into()));
        stats.remove("password");
        stats.insert(
            "password_file".into(),
            Value::String(password_file.display().to_string()),
        );
    }

    let mut sims = Vec::new();
    for node in &nodes {
        let sim = sim::SimNode::start(&node.id, node.http)
            .await
            .map_err(|e| {
                format!(
                    "cannot start simulated node {} on {}: {e}",
                    node.id, node.http
                )
            })?;
        sims.push(sim);
        say(&format!(
            "simulated AMS node {:<9} {:<7} http://{}",
            node.id, node.group, node.http
        ));
    }

    // Membership: SecantusDB when installed, else the static list.
    let mut _registrations = Vec::new();
    let mut _mongo = None;
    if secantus_installed() {
        let server = secantus::Secantus::start(&[]);
        let uri = server.uri(None);
        for sim in &sims {
            _registrations.push(sim.register(&uri, registry::AMS_REFRESH).await);
        }
        use_mongodb(&mut table, &uri, &nodes);
        say(&format!(
            "membership: SecantusDB on 127.0.0.1:{} (clusterdb.clusternode, heartbeats every 5 s)",
            server.port()
        ));
        _mongo = Some(server);
    } else {
        say("membership: the static [[cluster.node]] list (SecantusDB not installed:");
        say("            pip install secantusdb==0.7.0b3 for live membership)");
    }

    let origins: Vec<&DemoNode> = nodes.iter().filter(|n| n.group == "origin").collect();
    let (_rtmp_sinks, rtmp_real) = start_rtmp_sinks(&origins, dir.path()).await?;

    let config_path = dir.path().join("lb.toml");
    let written = toml::to_string(&table).map_err(|e| e.to_string())?;
    std::fs::write(&config_path, written).map_err(|e| e.to_string())?;
    let prepared = amslb::reload::prepare(&config_path).map_err(|e| e.to_string())?;
    print_guide(&prepared.config, &password, rtmp_real);

    let served = amslb::run(config_path, prepared).await;
    // Everything the demo started (nodes, SecantusDB, nginx) stops on drop here.
    say("stopped; simulated nodes, SecantusDB and RTMP sinks stopped too");
    served.map_err(|e| e.to_string())
}

fn say(line: &str) {
    eprintln!("demo: {line}");
}

fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzACDEFGHJKLMNPQRSTUVWXYZ23456789";
    (0..16)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn secantus_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import secantus"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Switches `[cluster]` to the registry at `uri`: the node list goes, and one
/// role per former node address keeps each node in its group.
fn use_mongodb(table: &mut Table, uri: &str, nodes: &[DemoNode]) {
    let Some(Value::Table(cluster)) = table.get_mut("cluster") else {
        return;
    };
    cluster.remove("node");
    cluster.insert("source".into(), Value::String("mongodb".into()));
    cluster.insert("uri".into(), Value::String(uri.into()));
    cluster.insert("poll_interval".into(), Value::String("1s".into()));
    let roles = nodes
        .iter()
        .map(|n| {
            let mut role = Table::new();
            role.insert("cidr".into(), Value::String(format!("{}/32", n.http.ip())));
            role.insert("group".into(), Value::String(n.group.clone()));
            Value::Table(role)
        })
        .collect();
    cluster.insert("role".into(), Value::Array(roles));
}

/// What receives RTMP on an origin's RTMP port.
enum RtmpSink {
    /// nginx with the RTMP module, single process; killed on drop.
    Nginx(Child),
    /// Accepts connections and counts their bytes.
    Counter(tokio::task::JoinHandle<()>),
}

impl Drop for RtmpSink {
    fn drop(&mut self) {
        match self {
            RtmpSink::Nginx(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            RtmpSink::Counter(task) => task.abort(),
        }
    }
}

/// Starts a sink on every origin's RTMP port; true when they are real RTMP servers.
async fn start_rtmp_sinks(
    origins: &[&DemoNode],
    dir: &Path,
) -> Result<(Vec<RtmpSink>, bool), String> {
    let nginx = Path::new(RTMP_MODULE).exists()
        && Command::new("nginx")
            .arg("-v")
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let mut sinks = Vec::new();
    for node in origins {
        if nginx {
            let home = dir.join(format!("nginx-{}", node.id));
            std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
            let conf = format!(
                "load_module {RTMP_MODULE};\nmaster_process off;\npid {home}/nginx.pid;\n\
                 error_log {home}/error.log info;\nevents {{ worker_connections 256; }}\n\
                 rtmp {{ server {{ listen {addr}; application LiveApp {{ live on; }} \
                 application live {{ live on; }} }} }}\n",
                home = home.display(),
                addr = node.rtmp,
            );
            let path = home.join("nginx.conf");
            std::fs::write(&path, conf).map_err(|e| e.to_string())?;
            let child = Command::new("nginx")
                .arg("-c")
                .arg(&path)
                .arg("-p")
                .arg(&home)
                .arg("-e")
                .arg(home.join("error.log"))
                .args(["-g", "daemon off;"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("starting nginx-rtmp: {e}"))?;
            sinks.push(RtmpSink::Nginx(child));
            say(&format!(
                "RTMP server (nginx-rtmp) for {:<9} rtmp://{}",
                node.id, node.rtmp
            ));
        } else {
            let listener = tokio::net::TcpListener::bind(node.rtmp)
                .await
                .map_err(|e| format!("RTMP sink on {}: {e}", node.rtmp))?;
            let id = node.id.clone();
            sinks.push(RtmpSink::Counter(tokio::spawn(count_bytes(listener, id))));
            say(&format!(
                "RTMP sink (counts bytes; apt-get install nginx libnginx-mod-rtmp for a real one) for {} on {}",
                node.id, node.rtmp
            ));
        }
    }
    // nginx needs a moment to bind; amslb's TCP checks find it either way.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok((sinks, nginx))
}

async fn count_bytes(listener: tokio::net::TcpListener, id: String) {
    use tokio::io::AsyncReadExt;
    while let Ok((mut stream, peer)) = listener.accept().await {
        let id = id.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0usize;
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n;
            }
            say(&format!("RTMP sink {id}: {total} bytes from {peer}"));
        });
    }
}

fn print_guide(config: &amslb::config::Config, password: &str, rtmp_real: bool) {
    use amslb::config::Protocol;
    let find = |name: &str| {
        config
            .listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.bind[0])
    };
    for listener in &config.listeners {
        let scheme = match listener.protocol {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Tcp => "rtmp",
            Protocol::Tls => "rtmps",
            Protocol::Udp => "srt",
        };
        for addr in &listener.bind {
            say(&format!(
                "listener {:<8} {scheme}://{addr}/  (default group {})",
                listener.name, listener.default_group
            ));
        }
    }
    if let Some(stats) = &config.stats {
        let user = stats.user.as_deref().unwrap_or("admin");
        say("");
        say(&format!("status page  http://{}/", stats.bind));
        say(&format!("credentials  user {user}  password {password}"));
        say(&format!("metrics      http://{}/metrics", stats.bind));
    }
    say("");
    say("try:");
    if let Some(play) = find("play") {
        say(&format!(
            "  curl -i http://{play}/LiveApp/streams/stream1.m3u8        # HLS → an edge (x-node-id), the same edge every time"
        ));
        say(&format!(
            "  curl -i http://{play}/LiveApp/streams/stream2.m3u8        # another stream may hash to the other edge"
        ));
        say(&format!(
            "  curl 'http://{play}/amslb/v1/assign?app=LiveApp&stream=stream1&role=play'   # where amslb would send that viewer"
        ));
    }
    if let Some(publish) = find("publish") {
        say(&format!(
            "  curl -i -X POST http://{publish}/LiveApp/whip/stream1     # WHIP publish → the origin"
        ));
        say(&format!(
            "  curl -i 'http://{publish}/LiveApp/rest/v2/broadcasts/list/0/10?target=edge'   # ?target= decides"
        ));
        say(&format!(
            "  one URL for WebRTC: ws://{publish}/LiveApp/websocket — a first message {{\"command\":\"play\",...}} goes to an edge, \"publish\" to the origin"
        ));
    }
    if let Some(rtmp) = find("rtmp") {
        if rtmp_real {
            say(&format!(
                "  ffmpeg -re -f lavfi -i testsrc=size=640x360:rate=25 -c:v libx264 -f flv rtmp://{rtmp}/LiveApp/stream1"
            ));
        } else {
            say(&format!(
                "  ffmpeg ... -f flv rtmp://{rtmp}/LiveApp/stream1   (the sink counts the bytes; its handshake needs nginx-rtmp)"
            ));
        }
    }
    if let Some(stats) = &config.stats {
        let user = stats.user.as_deref().unwrap_or("admin");
        say(&format!(
            "  curl -s -u {user}:{password} http://{}/metrics | grep amslb_requests_total",
            stats.bind
        ));
        say(&format!(
            "  curl -s -u {user}:{password} -X POST http://{}/api/v1/nodes/edge-1/drain   # then watch the status page",
            stats.bind
        ));
    }
    say("Ctrl-C stops everything.");
}
