//! End-to-end tests of the core proxy: the real amslb binary in front of
//! simulated AMS nodes on loopback.

mod support;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Empty};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// One origin and two edges behind a "publish" listener (default origin) and a
/// "play" listener (default edge), as in the core issue's example config.
struct Cluster {
    origin: SimNode,
    edges: [SimNode; 2],
    publish: SocketAddr,
    play: SocketAddr,
    amslb: Amslb,
}

fn config(
    publish: SocketAddr,
    play: SocketAddr,
    nodes: &[(&str, &str, SocketAddr)],
    extra: &str,
) -> String {
    let mut text = format!(
        r#"
[global]
max_connections = 20000
shutdown_grace = "10s"

[timeouts]
connect = "1s"
client = "5s"
server = "2s"
tunnel = "1h"

[[listener]]
name = "publish"
bind = ["{publish}"]
protocol = "http"
default_group = "origin"

[[listener]]
name = "play"
bind = ["{play}"]
protocol = "http"
default_group = "edge"

[[group]]
name = "origin"
balance = "least-conn"

[[group]]
name = "edge"
balance = "round-robin"
backup = "origin"

[cluster]
source = "static"
http_port = 5080
{extra}
"#
    );
    for (id, group, addr) in nodes {
        text.push_str(&format!(
            "\n[[cluster.node]]\nid = \"{id}\"\naddress = \"{}\"\ngroup = \"{group}\"\nhttp_port = {}\n",
            addr.ip(),
            addr.port()
        ));
    }
    text
}

async fn cluster() -> Cluster {
    let origin = sim_node("origin-1").await;
    let edges = [sim_node("edge-1").await, sim_node("edge-2").await];
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let text = config(
        publish,
        play,
        &[
            ("origin-1", "origin", origin.addr),
            ("edge-1", "edge", edges[0].addr),
            ("edge-2", "edge", edges[1].addr),
        ],
        "",
    );
    let amslb = Amslb::start(&text, &[publish, play]);
    Cluster {
        origin,
        edges,
        publish,
        play,
        amslb,
    }
}

fn is_edge(node: &str) -> bool {
    node == "edge-1" || node == "edge-2"
}

#[tokio::test]
async fn routing_table_rows_land_on_the_right_group() {
    let c = cluster().await;
    // (listener, path, expected group) — one row per HTTP line of README's routing table.
    let rows: &[(SocketAddr, &str, &str)] = &[
        (c.publish, "/LiveApp/streams/s1.m3u8", "edge"),
        (c.publish, "/LiveApp/streams/s1_adaptive.m3u8", "edge"),
        (c.publish, "/LiveApp/streams/s1000000001.ts", "edge"),
        (c.publish, "/LiveApp/streams/s1/s1.mpd", "edge"),
        (c.play, "/LiveApp/whip/s1", "origin"),
        (c.publish, "/LiveApp/whep/s1", "edge"),
        (c.play, "/rest/v2/version", "edge"),
        (c.publish, "/rest/v2/version", "origin"),
        (c.play, "/LiveApp/play.html", "edge"),
        (c.publish, "/", "origin"),
        (c.play, "/LiveApp/websocket?target=origin", "origin"),
        (c.publish, "/LiveApp/websocket?target=edge", "edge"),
        (
            c.publish,
            "/LiveApp/streams/s1.m3u8?target=origin",
            "origin",
        ),
    ];
    for &(listener, path, group) in rows {
        let method = if path.contains("/whip/") || path.contains("/whep/") {
            "POST"
        } else {
            "GET"
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "live.test")
            .body(Empty::new())
            .unwrap();
        let r = send(listener, request).await;
        // The simulated node answers a WHIP/WHEP POST like AMS: 201 Created.
        let expected = if method == "POST" { 201 } else { 200 };
        assert_eq!(r.status, expected, "{path}: {}", r.text());
        let node = r.node();
        let landed = if is_edge(&node) { "edge" } else { "origin" };
        assert_eq!(
            landed, group,
            "{method} {path} via {listener} landed on {node}"
        );
    }
    assert!(!c.origin.seen().is_empty());
}

#[tokio::test]
async fn round_robin_spreads_over_edges() {
    let c = cluster().await;
    let mut counts = std::collections::HashMap::new();
    for _ in 0..10 {
        *counts
            .entry(get(c.play, "/LiveApp/streams/a.m3u8").await.node())
            .or_insert(0) += 1;
    }
    assert_eq!(counts.get("edge-1"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("edge-2"), Some(&5), "{counts:?}");
}

#[tokio::test]
async fn websocket_echoes_through_the_balancer() {
    let c = cluster().await;
    let url = format!("ws://{}/LiveApp/websocket?target=origin", c.publish);
    let (mut ws, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade through amslb");
    assert_eq!(response.headers()["x-node-id"], "origin-1");
    for text in [
        r#"{"command":"publish","streamId":"s1"}"#,
        "second",
        "third",
    ] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_text().unwrap(), text);
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_data().as_ref(), &[0u8, 1, 2, 255]);
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn forwarding_headers_reach_the_node() {
    let c = cluster().await;
    let request = Request::get("/rest/v2/version")
        .header("host", "live.example.com")
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not pass")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = send(c.publish, request).await;
    assert_eq!(r.status, 200);
    let seen = c.origin.seen();
    let last = seen.last().unwrap();
    assert_eq!(
        last.headers["x-forwarded-for"],
        "203.0.113.9, 127.0.0.1".replace("127.0.0.1", &client_ip(c.publish))
    );
    assert_eq!(last.headers["x-forwarded-proto"], "http");
    assert_eq!(last.headers["x-forwarded-host"], "live.example.com");
    assert_eq!(last.headers["host"], "live.example.com");
    assert!(!last.headers.contains_key("x-hop"));
    assert!(
        !last.headers.contains_key("forwarded"),
        "Forwarded is off by default"
    );
}

/// The source address the kernel uses toward a loopback listener: the listener's own address.
fn client_ip(listener: SocketAddr) -> String {
    let probe = std::net::TcpListener::bind(SocketAddr::new(listener.ip(), 0)).unwrap();
    let addr = probe.local_addr().unwrap();
    let conn = std::net::TcpStream::connect(addr).unwrap();
    conn.local_addr().unwrap().ip().to_string()
}

/// Keep-alive to nodes: requests from many short client connections share a
/// few node connections, also after bodiless answers (HEAD, 304) and
/// streamed bodies, each given back to its pool when its answer is done.
#[tokio::test]
async fn connections_are_spread_evenly_over_the_worker_threads() {
    let origin = sim_node("origin-1").await;
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let stats = listener_addr(6080);
    let extra = format!("[stats]\nbind = \"{stats}\"\nallow = [\"127.0.0.0/8\"]\n");
    let text = config(
        publish,
        play,
        &[("origin-1", "origin", origin.addr)],
        &extra,
    )
    .replace(
        "max_connections = 20000\n",
        "max_connections = 20000\nworkers = 2\n",
    );
    let _amslb = Amslb::start(&text, &[publish, play, stats]);

    // 64 keep-alive clients connect at once, as a load generator does; each
    // gets an answer and stays open.
    let connects = (0..64).map(|_| TcpStream::connect(publish));
    let mut clients = Vec::new();
    for stream in futures_util::future::join_all(connects).await {
        let mut stream = stream.unwrap();
        stream
            .write_all(b"GET /rest/v2/version HTTP/1.1\r\nHost: live.test\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        clients.push(stream);
    }
    let text = get(stats, "/metrics").await.text();
    let held = |worker: &str| {
        let series = format!("amslb_worker_connections{{worker=\"{worker}\"}} ");
        series_value(&text, &series).unwrap_or_else(|| panic!("no {series}in:\n{text}"))
    };
    let (first, second) = (held("0"), held("1"));
    assert_eq!(first + second, 64.0, "{text}");
    assert!((first - second).abs() <= 2.0, "split {first}/{second}");
    drop(clients);
}

#[tokio::test]
async fn node_connections_are_reused_across_requests() {
    let origin = sim_node("origin-1").await;
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let text = config(
        publish,
        play,
        &[("origin-1", "origin", origin.addr)],
        "[health]\nenabled = false\n",
    );
    let _amslb = Amslb::start(&text, &[publish, play]);
    for i in 0..150 {
        let method = if i % 3 == 0 { "HEAD" } else { "GET" };
        let request = Request::builder()
            .method(method)
            .uri(format!("/LiveApp/streams/s{i}.m3u8"))
            .header("host", "live.test")
            .body(Empty::new())
            .unwrap();
        let answer = send(publish, request).await;
        assert_eq!(answer.status, 200, "request {i}");
        assert_eq!(answer.node(), "origin-1");
    }
    let opened = origin.connections();
    // One per event loop thread at most (each keeps its own idle connections),
    // with a little room for a connection closed while being given back.
    assert!(
        (1..=6).contains(&opened),
        "150 requests opened {opened} node connections"
    );
}

#[tokio::test]
async fn dead_node_is_retried_on_a_live_one() {
    let c = cluster().await;
    c.edges[0].stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..6 {
        let r = get(c.play, "/LiveApp/streams/s.m3u8").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.node(), "edge-2");
    }
    assert!(
        c.amslb
            .log()
            .contains("connect failed, trying another node")
    );
}

#[tokio::test]
async fn empty_group_and_backup_give_503_with_reason() {
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let text = config(publish, play, &[], "");
    let amslb = Amslb::start(&text, &[publish, play]);
    let r = get(play, "/LiveApp/streams/s.m3u8").await;
    assert_eq!(r.status, 503);
    assert!(
        r.text()
            .contains("no usable node in group \"edge\" or its backup \"origin\""),
        "{}",
        r.text()
    );
    assert!(amslb.log().contains("request failed"));
}

#[tokio::test]
async fn edge_group_falls_back_to_backup_origin() {
    let c = cluster().await;
    c.edges[0].stop();
    c.edges[1].stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = get(c.play, "/LiveApp/streams/s.m3u8").await;
    assert_eq!(
        (r.status, r.node().as_str()),
        (200, "origin-1"),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn every_node_dead_gives_502() {
    let c = cluster().await;
    c.origin.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = get(c.publish, "/rest/v2/version").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("no node answered"));
}

#[tokio::test]
async fn hung_node_gives_504_after_server_timeout() {
    let c = cluster().await;
    c.origin.set_mode(Mode::Hang);
    let started = Instant::now();
    let r = get(c.publish, "/rest/v2/version").await;
    assert_eq!(r.status, 504, "{}", r.text());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

#[tokio::test]
async fn large_response_streams_with_flat_memory() {
    let c = cluster().await;
    const SIZE: u64 = 200 * 1024 * 1024;
    let rss_before = rss_kib(c.amslb.pid());
    let response = send_head(
        c.publish,
        Request::get(format!("/big?bytes={SIZE}"))
            .header("host", "x")
            .body(Empty::new())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let (mut total, mut peak) = (0u64, 0u64);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len() as u64;
            if total % (16 * 1024 * 1024) < data.len() as u64 {
                peak = peak.max(rss_kib(c.amslb.pid()));
            }
        }
    }
    assert_eq!(total, SIZE);
    let growth = peak.saturating_sub(rss_before);
    // Buffering the body would grow RSS by ~200 MiB; streaming keeps it to buffers.
    assert!(
        growth < 32 * 1024,
        "amslb RSS grew by {growth} KiB while streaming 200 MiB"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn bad_config_is_refused_naming_the_key() {
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let text = config(publish, play, &[], "")
        .replace("default_group = \"edge\"", "default_group = \"edgy\"");
    let file = temp_config(&text);
    let path = file.path().to_str().unwrap();
    let (code, out) = amslb_command(&["check", "--config", path]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(path)
            && out.contains("listener[1].default_group")
            && out.contains("unknown group \"edgy\""),
        "{out}"
    );
    // Running with it fails the same way, before binding anything.
    let (code, out) = amslb_command(&["--config", path]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("listener[1].default_group"), "{out}");
    assert!(
        std::net::TcpStream::connect(publish).is_err(),
        "nothing may be bound"
    );

    let typo =
        temp_config(&config(publish, play, &[], "").replace("connect = \"1s\"", "conect = \"1s\""));
    let (code, out) = amslb_command(&["check", "--config", typo.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("timeouts.conect") && out.contains("unknown field"),
        "{out}"
    );

    let good = temp_config(&config(publish, play, &[], ""));
    let (code, out) = amslb_command(&["check", "--config", good.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("has no node yet"),
        "empty groups are warned about: {out}"
    );
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish() {
    let mut c = cluster().await;
    let publish = c.publish;
    let slow = tokio::spawn(async move { get(publish, "/slow?ms=1500").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.amslb.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // No new connections once shutdown started.
    assert!(
        TcpStream::connect(c.publish).await.is_err(),
        "listener must be closed"
    );
    let r = slow.await.unwrap();
    assert_eq!((r.status, r.node().as_str()), (200, "origin-1"));
    assert_eq!(
        c.amslb.wait_exit(Duration::from_secs(5)),
        Some(0),
        "{}",
        c.amslb.log()
    );
}

async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_4xx() {
    let c = cluster().await;
    let garbage = raw_exchange(
        c.publish,
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    )
    .await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = raw_exchange(c.publish, huge.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // Request smuggling: hyper lets Transfer-Encoding win and drops the
    // Content-Length (RFC 9112 §6.3), and amslb re-frames what it forwards, so
    // the node can never read the body differently from amslb.
    let smuggle = b"POST /rest/x HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let answer = raw_exchange(c.publish, smuggle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = c.origin.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].headers.contains_key("content-length"),
        "{:?}",
        seen[0].headers
    );
    let unknown_coding = b"POST /rest/y HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n";
    let answer = raw_exchange(c.publish, unknown_coding).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(
        c.origin.seen().len(),
        1,
        "nothing malformed may reach a node"
    );
    // Still serving afterwards.
    assert_eq!(get(c.publish, "/").await.status, 200);
    let log = c.amslb.log();
    assert!(log.contains("client connection refused"), "{log}");
}

#[tokio::test]
async fn redirect_https_and_proxy_protocol_listeners() {
    let origin = sim_node("origin-1").await;
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let (redirect, proxied) = (listener_addr(18082), listener_addr(18083));
    let extra = format!(
        r#"
[[listener]]
name = "redirect"
bind = ["{redirect}"]
protocol = "http"
redirect_https = true

[[listener]]
name = "behind-l4"
bind = ["{proxied}"]
protocol = "http"
accept_proxy = true
"#
    );
    // Listener tables must come before [cluster] in the file for TOML arrays to
    // stay top-level, so put them first.
    let text = format!(
        "{extra}\n{}",
        config(publish, play, &[("origin-1", "origin", origin.addr)], "")
    );
    let amslb = Amslb::start(&text, &[publish, redirect, proxied]);

    let r = send(
        redirect,
        Request::get("/LiveApp/play.html?id=1")
            .header("host", "live.test:80")
            .body(Empty::new())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.headers["location"],
        "https://live.test/LiveApp/play.html?id=1"
    );

    let answer = raw_exchange(
        proxied,
        b"PROXY TCP4 198.51.100.20 10.0.0.1 40000 80\r\nGET /rest/v2/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        origin.seen().last().unwrap().headers["x-forwarded-for"],
        "198.51.100.20"
    );

    let refused = raw_exchange(proxied, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        refused.is_empty(),
        "a connection without PROXY header must be closed: {refused}"
    );
    assert!(
        amslb
            .log()
            .contains("does not start with a PROXY protocol header")
    );
}

#[tokio::test]
async fn over_max_connections_new_connections_are_refused() {
    let origin = sim_node("origin-1").await;
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let text = config(publish, play, &[("origin-1", "origin", origin.addr)], "").replace(
        "max_connections = 20000",
        "max_connections = 2\nqueue_timeout = \"200ms\"",
    );
    let amslb = Amslb::start(&text, &[publish]);
    let held: Vec<TcpStream> =
        futures_util::future::join_all((0..2).map(|_| TcpStream::connect(publish)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = raw_exchange(
        publish,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        refused.is_empty(),
        "third connection must be refused: {refused}"
    );
    assert!(amslb.log().contains("max_connections reached"));
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(publish, "/").await.status, 200);
}

#[test]
fn shipped_configs_are_valid() {
    for file in ["conf/lb.toml", "conf/lb-mongodb.toml", "conf/demo.toml"] {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        let (code, out) = amslb_command(&["check", "--config", &path]);
        assert_eq!(code, 0, "{file}: {out}");
    }
}
