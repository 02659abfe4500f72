//! RTMPS from amslb to nodes (`node_tls` on the `tcp`/`tls` listeners) and
//! the TLS server name (SNI) choosing the group on a `tls` listener, through
//! the real `amslb` binary. The node is nginx-rtmp behind nginx's `stream`
//! TLS terminator with a certificate from a private CA; ffmpeg publishes and
//! ffprobe counts what the node recorded.

mod l4_parts;
mod support;
mod tls_support;

use l4_parts::*;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// 3 s at 25 fps.
const FRAMES: u64 = 75;

const STATS_AUTH: (&str, &str) = ("admin", "rtmps-test-pw");

async fn publish_and_wait(url: String, secs: u32) {
    let (ok, err) =
        blocking(move || wait_child(publish(&url, secs, "flv"), Duration::from_secs(60))).await;
    assert!(ok, "ffmpeg publish failed: {err}");
}

fn assert_recorded(node: &RtmpNode, stream: &str) {
    let (codec, w, h, frames) = probe(&node.recording(stream));
    assert_eq!((codec.as_str(), w, h), ("h264", 320, 240), "{}", node.log());
    assert_eq!(frames, FRAMES, "every frame published must arrive");
}

/// Waits until amslb's log contains `text`.
async fn wait_log(amslb: &support::Amslb, text: &str) {
    let start = Instant::now();
    while !amslb.log().contains(text) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {text:?} in the log:\n{}",
            amslb.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain RTMP listener in front of two nodes whose group has `node_tls`:
/// "bad" presents a certificate of the CA for another name, "good" the
/// configured `server_name`. Every publish is carried over RTMPS to the good
/// node; the bad one is refused with a log line and the next node tried; the
/// second session resumes the first one's TLS session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmps_to_a_node_carries_an_ffmpeg_publish() {
    let ca = tls_support::TestCa::new();
    let dir = tls_support::tempdir("rtmps-ca");
    let ca_file = dir.path().join("nodes-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();

    let node = RtmpNode::start();
    // The default rtmps_port (AMS's 8443) on each node's address.
    let (cert, key) = ca.leaf(&["node.example.test"]);
    let good = TlsFront::start(
        SocketAddr::new(node.addr.ip(), 8443),
        node.addr,
        &cert,
        &key,
    );
    let bad_ip = support::unique_loopback();
    let (cert, key) = ca.leaf(&["other.example.test"]);
    // Behind it nothing listens: a session let through would fail.
    let bad = TlsFront::start(
        SocketAddr::new(bad_ip, 8443),
        SocketAddr::new(bad_ip, 1935),
        &cert,
        &key,
    );

    let listen = support::listener_addr(1935);
    let mut text = config_on(
        listen,
        "",
        "tcp",
        &[("bad", bad_ip, 1935), ("good", node.addr.ip(), 1935)],
    );
    text.push_str(&format!(
        "\n[cluster.node_tls]\nca_file = \"{}\"\nserver_name = \"node.example.test\"\n",
        ca_file.display()
    ));
    let stats = support::listener_addr(18490);
    text.push_str(&format!(
        "\n[stats]\nbind = \"{stats}\"\nuser = \"{}\"\npassword = \"{}\"\nallow = [\"127.0.0.0/8\"]\n",
        STATS_AUTH.0, STATS_AUTH.1
    ));
    let amslb = support::Amslb::start(&text, &[listen, stats]);

    // Round-robin over two nodes: in two sessions the bad node is tried first
    // at least once.
    for stream in ["s1", "s2"] {
        publish_and_wait(format!("rtmp://{listen}/live/{stream}"), 3).await;
        assert_recorded(&node, stream);
    }
    wait_log(&amslb, "trying another node").await;
    let log = amslb.log();
    let refused = format!("TLS handshake with node {bad_ip}:8443 refused");
    assert!(
        log.lines().any(|l| l.contains(&refused)
            && l.contains("certificate not valid for name")
            && l.contains("node.example.test")),
        "{log}"
    );
    let good_refused = format!("TLS handshake with node {}:8443 refused", node.addr.ip());
    assert!(
        !log.contains(&good_refused),
        "the good node is accepted: {log}"
    );
    // Each refusal is a connect failure of the bad node, none of the good one.
    let failures = |id: &str| {
        let series = format!("amslb_node_connect_failures_total{{group=\"origin\",node=\"{id}\"}}");
        async move { support::stats_metric(stats, STATS_AUTH, &series).await }
    };
    let refusals = log
        .lines()
        .filter(|l| l.contains(&refused) && l.contains("connect failed, trying another node"))
        .count() as f64;
    assert!(refusals >= 1.0);
    assert_eq!(failures("bad").await, refusals, "{log}");
    assert_eq!(failures("good").await, 0.0);
    // Both publishes went over TLS to the good node's RTMPS port. The second
    // resumed the session of an earlier connection to it, though the bad
    // node may have been tried in between (its tickets are kept apart). (The
    // first may resume the readiness check's session, if that short relay
    // read the node's tickets before it closed.)
    let sessions: Vec<String> = good
        .connections()
        .into_iter()
        .filter(|l| l.contains("sni=node.example.test"))
        .collect();
    let publishes: Vec<&String> = sessions
        .iter()
        .filter(|l| !l.ends_with("bytes=0"))
        .collect();
    assert_eq!(publishes.len(), 2, "{sessions:?}\n{}", good.log());
    assert!(publishes[1].contains("reused=r"), "{sessions:?}");
    assert!(bad.connections().iter().all(|l| l.ends_with("bytes=0")));
}

/// RTMPS in and RTMPS out: an ffmpeg `rtmps://` publish to a `tls` listener
/// that answers `connect` itself (`rtmp_affinity`) reaches the node over TLS,
/// the RTMP handshake with the node and the filtered replies included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmps_in_and_out_with_rtmp_affinity_carries_a_publish() {
    let ca = tls_support::TestCa::new();
    let dir = tls_support::tempdir("rtmps-both");
    let ca_file = dir.path().join("nodes-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let (cert, key) = ca.leaf(&["live.example.test"]);
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    let node = RtmpNode::start();
    let (node_cert, node_key) = ca.leaf(&["node.example.test"]);
    // A port of its own instead of the default, as `rtmps_port` allows.
    let front = TlsFront::start(
        SocketAddr::new(node.addr.ip(), 9443),
        node.addr,
        &node_cert,
        &node_key,
    );
    let listen = support::listener_addr(1936);
    let keys = format!(
        "rtmp_affinity = true\ncert = \"{}\"\nkey = \"{}\"",
        cert_path.display(),
        key_path.display()
    );
    let mut text = config_on(listen, &keys, "tls", &[("o1", node.addr.ip(), 1935)]);
    text.push_str(&format!(
        "\n[cluster.node_tls]\nca_file = \"{}\"\nserver_name = \"node.example.test\"\nrtmps_port = 9443\n",
        ca_file.display()
    ));
    let amslb = support::Amslb::start(&text, &[listen]);
    publish_and_wait(format!("rtmps://{listen}/live/a1"), 3).await;
    assert_recorded(&node, "a1");
    wait_log(&amslb, "session ended").await;
    assert!(
        front
            .connections()
            .iter()
            .any(|l| l.contains("sni=node.example.test") && !l.ends_with("bytes=0")),
        "{:?}",
        front.connections()
    );
}

/// A node that is only a TCP listener: records which connection sent what.
async fn raw_node() -> TcpListener {
    for _ in 0..20 {
        if let Ok(l) = TcpListener::bind(SocketAddr::new(support::unique_loopback(), 1935)).await {
            return l;
        }
    }
    panic!("no free loopback address for a node");
}

/// Reads the first line a connection to `node` sends, if one arrives soon.
async fn first_line(node: &TcpListener) -> Option<String> {
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(5), node.accept())
        .await
        .ok()?
        .ok()?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        conn.read_exact(&mut byte).await.ok()?;
        line.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&line).trim().to_string())
}

/// On a `tls` (RTMPS) listener `host_groups` goes by the server name the
/// client sent: exact names, wildcards, and the default group for a name
/// that matches nothing.
#[tokio::test]
async fn rtmps_server_name_chooses_the_group() {
    let ca = tls_support::TestCa::new();
    let dir = tls_support::tempdir("rtmps-sni");
    let (cert, key) = ca.leaf(&[
        "origin.example.test",
        "edge.example.test",
        "*.edge.example.test",
        "other.example.test",
    ]);
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let origin = raw_node().await;
    let edge = raw_node().await;
    let listen = support::listener_addr(1936);
    let config = format!(
        r#"
[timeouts]
connect = "1s"

[health]
enabled = false

[[listener]]
name = "rtmps"
bind = ["{listen}"]
protocol = "tls"
cert = "{cert}"
key = "{key}"
default_group = "origin"
host_groups = {{ "origin.example.test" = "origin", "edge.example.test" = "edge", "*.edge.example.test" = "edge" }}

[[group]]
name = "origin"

[[group]]
name = "edge"

[cluster]
source = "static"

[[cluster.node]]
id = "origin-1"
address = "{origin_ip}"
group = "origin"
rtmp_port = 1935

[[cluster.node]]
id = "edge-1"
address = "{edge_ip}"
group = "edge"
rtmp_port = 1935
"#,
        cert = cert_path.display(),
        key = key_path.display(),
        origin_ip = origin.local_addr().unwrap().ip(),
        edge_ip = edge.local_addr().unwrap().ip(),
    );
    let amslb = support::Amslb::start(&config, &[listen]);
    let cases = [
        ("origin.example.test", "origin"),
        ("edge.example.test", "edge"),
        ("a.edge.example.test", "edge"),
        ("other.example.test", "origin"),
    ];
    for (name, group) in cases {
        let tcp = TcpStream::connect(listen).await.unwrap();
        let mut client = tls_support::connector(std::slice::from_ref(&ca.der), &[])
            .connect(ServerName::try_from(name).unwrap(), tcp)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", amslb.log()));
        client
            .write_all(format!("hello from {name}\n").as_bytes())
            .await
            .unwrap();
        let (wanted, other) = match group {
            "origin" => (&origin, &edge),
            _ => (&edge, &origin),
        };
        let line = first_line(wanted).await;
        assert_eq!(
            line.as_deref(),
            Some(format!("hello from {name}").as_str()),
            "{name} lands on the {group} group\n{}",
            amslb.log()
        );
        // Nothing reached the other group meanwhile.
        let stray = tokio::time::timeout(Duration::from_millis(100), other.accept()).await;
        assert!(
            stray.is_err(),
            "{name}: a connection reached the wrong group"
        );
        drop(client);
    }
}

/// `tcp` health checks of a group with `node_tls` complete a TLS handshake
/// on the RTMPS port, verified like the sessions: the right name is up, a
/// certificate for another name is down with the reason.
#[tokio::test]
async fn tcp_health_checks_speak_tls_to_the_rtmps_port() {
    let ca = tls_support::TestCa::new();
    let dir = tls_support::tempdir("rtmps-health");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let (cert, key) = ca.leaf(&["node.example.test"]);
    let tls = support::tls_node::TlsNode::start(
        "rtmps",
        SocketAddr::new(support::unique_loopback(), 0),
        &cert,
        &key,
    )
    .await;
    let node = std::sync::Arc::new(amslb::cluster::Node::new(amslb::cluster::NodeSpec {
        id: "rtmps".into(),
        group: "ingest".into(),
        addr: tls.addr.ip(),
        http_port: 5080,
        rtmp_port: 1935,
        srt_port: 4200,
        drain: false,
        region: None,
    }));
    let probe = |name: &'static str| {
        let text = format!(
            "[[group]]\nname = \"ingest\"\n[cluster]\nsource = \"static\"\n\
             [cluster.node_tls]\nca_file = \"{}\"\nserver_name = \"{name}\"\nrtmps_port = {}\n",
            ca_file.display(),
            tls.addr.port()
        );
        let config = amslb::config::parse_str(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .config;
        let set = amslb::node_tls::NodeTlsSet::from_config(&config).unwrap();
        let node = node.clone();
        async move {
            let health = amslb::config::health::HealthConfig::default();
            amslb::health::probe(amslb::health::CheckKind::Tcp, &node, &health, &set).await
        }
    };
    assert_eq!(probe("node.example.test").await, amslb::health::Outcome::Ok);
    // The node records the handshake once it has read the client's Finished.
    let start = Instant::now();
    while tls.handshakes.lock().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5), "no TLS handshake");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let down = probe("other.example.test").await;
    assert!(
        matches!(down, amslb::health::Outcome::Io(ref e)
            if e.contains("TLS handshake with node") && e.contains("not valid for name")),
        "{down:?}"
    );
}
