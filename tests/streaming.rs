//! End-to-end tests of the streaming features: WebSocket command sniffing,
//! stream-hash affinity, publish affinity, regions and the assignment API,
//! with the real amslb binary in front of simulated AMS nodes on loopback.

mod support;

use amslb::streaming::frame::{CONTINUATION, PING, TEXT, encode_client};
use amslb::streaming::hash;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Empty;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// (id, group, address, region)
type NodeDef<'a> = (&'a str, &'a str, SocketAddr, Option<&'a str>);

/// Edge group settings: stream-hash with the default load factor.
const STREAM_HASH: &str = "balance = \"stream-hash\"";
/// Edge group settings: round-robin.
const ROUND_ROBIN: &str = "balance = \"round-robin\"";

/// A config with the given `[global]` lines, one listener (extra lines
/// appended), a round-robin origin group and an edge group with `edge` settings.
fn config(
    global: &str,
    listener: SocketAddr,
    listener_extra: &str,
    edge: &str,
    nodes: &[NodeDef],
) -> String {
    let mut text = format!(
        r#"
[global]
{global}

[timeouts]
connect = "1s"
client = "5s"
server = "2s"
tunnel = "1h"

[[listener]]
name = "one-url"
bind = ["{listener}"]
protocol = "http"
default_group = "edge"
{listener_extra}

[[group]]
name = "origin"
balance = "round-robin"

[[group]]
name = "edge"
{edge}

[cluster]
source = "static"
"#
    );
    for (id, group, addr, region) in nodes {
        text.push_str(&format!(
            "\n[[cluster.node]]\nid = \"{id}\"\naddress = \"{}\"\ngroup = \"{group}\"\nhttp_port = {}\n",
            addr.ip(),
            addr.port()
        ));
        if let Some(region) = region {
            text.push_str(&format!("region = \"{region}\"\n"));
        }
    }
    text
}

/// WebSocket upgrade requests a simulated node received.
fn websockets(node: &SimNode) -> usize {
    node.seen()
        .iter()
        .filter(|s| s.headers.contains_key("sec-websocket-key"))
        .count()
}

async fn next_text(ws: &mut Ws) -> String {
    let message = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an answer within 5 s")
        .expect("the socket stays open")
        .expect("a valid message");
    message.into_text().unwrap().to_string()
}

/// Opens a WebSocket on `/LiveApp/websocket`, sends `messages` and checks the
/// node echoes each of them back, in order.
async fn session(addr: SocketAddr, messages: &[&str]) -> Ws {
    let url = format!("ws://{addr}/LiveApp/websocket");
    let (mut ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), 101);
    for m in messages {
        ws.send(Message::text(*m)).await.unwrap();
    }
    for m in messages {
        assert_eq!(next_text(&mut ws).await, *m);
    }
    ws
}

struct Sniffing {
    origins: Vec<SimNode>,
    edges: Vec<SimNode>,
    addr: SocketAddr,
    _amslb: Amslb,
}

async fn sniffing(origins: usize, edges: usize, extra: &str, edge: &str) -> Sniffing {
    let mut o = Vec::new();
    for i in 1..=origins {
        o.push(sim_node(&format!("origin-{i}")).await);
    }
    let mut e = Vec::new();
    for i in 1..=edges {
        e.push(sim_node(&format!("edge-{i}")).await);
    }
    let nodes: Vec<NodeDef> = o
        .iter()
        .map(|n| (n.id(), "origin", n.addr, None))
        .chain(e.iter().map(|n| (n.id(), "edge", n.addr, None)))
        .collect();
    let addr = listener_addr(18701);
    let text = config(
        "",
        addr,
        &format!("sniff_websocket = true\n{extra}"),
        edge,
        &nodes,
    );
    let amslb = Amslb::start(&text, &[addr]);
    Sniffing {
        origins: o,
        edges: e,
        addr,
        _amslb: amslb,
    }
}

#[tokio::test]
async fn sniffing_routes_publish_to_origin_and_play_to_edge_from_one_url() {
    let c = sniffing(1, 2, "", STREAM_HASH).await;
    let ice = r#"{"command":"getIceServerConfig"}"#;
    let publish = r#"{"command":"publish","streamId":"s1","token":""}"#;
    // The held getIceServerConfig and the publish reach the origin in order.
    let mut publisher = session(c.addr, &[ice, publish, "after"]).await;
    assert_eq!(websockets(&c.origins[0]), 1);
    assert_eq!(websockets(&c.edges[0]) + websockets(&c.edges[1]), 0);
    let seen = &c.origins[0].seen()[0];
    assert_eq!(seen.uri, "/LiveApp/websocket");
    assert!(seen.headers.contains_key("x-forwarded-for"));

    let play = r#"{"command":"play","streamId":"s1"}"#;
    let mut player = session(c.addr, &[r#"{"command":"ping"}"#, play]).await;
    assert_eq!(websockets(&c.origins[0]), 1);
    assert_eq!(websockets(&c.edges[0]) + websockets(&c.edges[1]), 1);
    // Both directions keep relaying after the replay.
    publisher.send(Message::text("more")).await.unwrap();
    assert_eq!(next_text(&mut publisher).await, "more");
    player.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let echoed = player.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_data().as_ref(), &[1u8, 2, 3]);
}

/// Upgrades a raw TCP connection by hand and checks amslb's own 101.
async fn raw_upgrade(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"GET /LiveApp/websocket HTTP/1.1\r\nHost: live.test\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    // Compression was not granted: frames stay readable.
    assert!(!head.contains("permessage-deflate"), "{head}");
    tcp
}

/// Reads one unmasked server frame: (opcode, payload).
async fn read_server_frame(tcp: &mut TcpStream) -> (u8, Vec<u8>) {
    let read = async {
        let mut h = [0u8; 2];
        tcp.read_exact(&mut h).await.unwrap();
        let len = match h[1] & 0x7F {
            126 => {
                let mut l = [0u8; 2];
                tcp.read_exact(&mut l).await.unwrap();
                usize::from(u16::from_be_bytes(l))
            }
            n => usize::from(n),
        };
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.unwrap();
        (h[0] & 0x0F, payload)
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a frame within 5 s")
}

#[tokio::test]
async fn fragmented_first_frame_is_understood_and_replayed() {
    let c = sniffing(1, 2, "", ROUND_ROBIN).await;
    let mut tcp = raw_upgrade(c.addr).await;
    let message = br#"{"command":"publish","streamId":"frag1"}"#;
    let mask = [9, 8, 7, 6];
    let parts = [
        encode_client(false, TEXT, &message[..7], mask),
        encode_client(true, PING, b"hi", mask),
        encode_client(false, CONTINUATION, &message[7..25], mask),
        encode_client(true, CONTINUATION, &message[25..], mask),
    ];
    // Sent in small TCP writes that cut frames in the middle.
    let bytes = parts.concat();
    for chunk in bytes.chunks(5) {
        tcp.write_all(chunk).await.unwrap();
        tcp.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // amslb answered the ping (pong) and the node the whole message (echo).
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(read_server_frame(&mut tcp).await);
    }
    assert!(got.contains(&(0x1, message.to_vec())), "{got:?}");
    assert!(got.contains(&(0xA, b"hi".to_vec())), "{got:?}");
    assert_eq!(websockets(&c.origins[0]), 1);
    let seen = &c.origins[0].seen()[0];
    assert!(!seen.headers.contains_key("sec-websocket-extensions"));
}

/// A ping before the first command gets its pong from amslb at once, not
/// after `sniff_timeout`, and is not replayed to the node (which would answer a
/// second pong the client never asked for).
#[tokio::test]
async fn a_ping_while_sniffing_is_answered_at_once_and_not_replayed() {
    let c = sniffing(1, 1, "sniff_timeout = \"5s\"", ROUND_ROBIN).await;
    let mut tcp = raw_upgrade(c.addr).await;
    let mask = [3, 1, 4, 1];
    let started = Instant::now();
    tcp.write_all(&encode_client(true, PING, b"k1", mask))
        .await
        .unwrap();
    let pong = read_server_frame(&mut tcp).await;
    let took = started.elapsed();
    eprintln!("pong while sniffing after {took:?}");
    assert_eq!(pong, (0xA, b"k1".to_vec()));
    assert!(took < Duration::from_millis(500), "pong after {took:?}");
    assert_eq!(websockets(&c.edges[0]) + websockets(&c.origins[0]), 0);

    let play = br#"{"command":"play","streamId":"p1"}"#;
    tcp.write_all(&encode_client(true, TEXT, play, mask))
        .await
        .unwrap();
    // The first frame from the node is the echo: no pong for a replayed ping.
    assert_eq!(read_server_frame(&mut tcp).await, (0x1, play.to_vec()));
    assert_eq!(websockets(&c.edges[0]), 1);
    // After the decision pings go to the node, which answers them itself.
    tcp.write_all(&encode_client(true, PING, b"k2", mask))
        .await
        .unwrap();
    assert_eq!(read_server_frame(&mut tcp).await, (0xA, b"k2".to_vec()));
}

#[tokio::test]
async fn client_without_a_command_goes_to_the_default_group_after_the_wait() {
    let c = sniffing(1, 1, "sniff_timeout = \"400ms\"", ROUND_ROBIN).await;
    let url = format!("ws://{}/LiveApp/websocket", c.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let started = Instant::now();
    let ice = r#"{"command":"getIceServerConfig"}"#;
    ws.send(Message::text(ice)).await.unwrap();
    // Held until the wait is over, then replayed to the default group (edge).
    assert_eq!(next_text(&mut ws).await, ice);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(350), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert_eq!(websockets(&c.edges[0]), 1);
    assert_eq!(websockets(&c.origins[0]), 0);

    // A client that sends nothing at all is connected after the wait too.
    let url = format!("ws://{}/LiveApp/websocket", c.addr);
    let (mut silent, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(websockets(&c.edges[0]), 2);
    silent.send(Message::text("late")).await.unwrap();
    assert_eq!(next_text(&mut silent).await, "late");
}

#[tokio::test]
async fn binary_or_unknown_first_message_goes_to_the_default_group_at_once() {
    let c = sniffing(1, 1, "sniff_timeout = \"10s\"", ROUND_ROBIN).await;
    let url = format!("ws://{}/LiveApp/websocket", c.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let started = Instant::now();
    ws.send(Message::binary(vec![0u8, 159, 146, 150]))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.into_data().as_ref(), &[0u8, 159, 146, 150]);
    let mut ws = session(c.addr, &[r#"{"command":"joinRoom","room":"r1"}"#]).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(websockets(&c.edges[0]), 2);
    ws.close(None).await.unwrap();
}

/// The node that served a GET through amslb.
async fn served_by(addr: SocketAddr, path: &str, region: Option<&str>) -> String {
    let mut request = Request::get(path).header("host", "live.test");
    if let Some(region) = region {
        request = request.header("x-region", region);
    }
    let fetched = send(addr, request.body(Empty::new()).unwrap()).await;
    assert_eq!(fetched.status, 200, "{path}: {}", fetched.text());
    fetched.node()
}

/// The node that answered a WHIP POST for `stream` through amslb.
async fn whip(addr: SocketAddr, stream: &str) -> String {
    let request = Request::post(format!("/LiveApp/whip/{stream}")).header("host", "live.test");
    let fetched = send(addr, request.body(Empty::new()).unwrap()).await;
    assert!((200..300).contains(&fetched.status), "{}", fetched.text());
    fetched.node()
}

fn hls(stream: usize) -> String {
    format!("/LiveApp/streams/s{stream}_adaptive.m3u8")
}

#[tokio::test]
async fn stream_hash_keeps_streams_on_one_edge_and_moves_only_a_departed_edges_streams() {
    let c = sniffing(1, 3, "", STREAM_HASH).await;
    let mut placement: HashMap<usize, String> = HashMap::new();
    for stream in 0..24 {
        let node = served_by(c.addr, &hls(stream), None).await;
        // Playlists and segments of one stream: always the same edge.
        for path in [
            format!("/LiveApp/streams/s{stream}000000001.ts"),
            format!("/LiveApp/streams/s{stream}_720p2500kbps.m3u8"),
            format!("/LiveApp/whep/s{stream}"),
        ] {
            assert_eq!(served_by(c.addr, &path, None).await, node, "{path}");
        }
        // ...the edge rendezvous hashing ranks first, so any instance agrees.
        let ranked = hash::ranked(
            &format!("LiveApp/s{stream}"),
            &c.edges
                .iter()
                .map(|e| Id(e.id().to_string()))
                .collect::<Vec<_>>(),
        )[0]
        .0
        .clone();
        assert_eq!(node, ranked);
        placement.insert(stream, node);
    }
    let used: std::collections::HashSet<_> = placement.values().collect();
    assert_eq!(
        used.len(),
        3,
        "24 streams spread over the 3 edges: {placement:?}"
    );

    // edge-2 goes away: its streams move, every other stream stays.
    c.edges[1].stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for stream in 0..24 {
        let node = served_by(c.addr, &hls(stream), None).await;
        if placement[&stream] == "edge-2" {
            assert_ne!(node, "edge-2");
        } else {
            assert_eq!(node, placement[&stream], "s{stream} moved");
        }
    }
}

#[tokio::test]
async fn stream_hash_places_streams_of_one_subfolder_by_stream() {
    // AMS writes `/{app}/streams/{subFolder}/{id}.m3u8`; the stream is `{id}`, so
    // the streams of one subfolder spread over the edges like any others.
    let c = sniffing(0, 3, "", STREAM_HASH).await;
    let mut used = std::collections::HashSet::new();
    for stream in 0..12 {
        let node = served_by(
            c.addr,
            &format!("/LiveApp/streams/cams/s{stream}.m3u8"),
            None,
        )
        .await;
        for path in [
            format!("/LiveApp/streams/cams/s{stream}_720p2500kbps.m3u8"),
            format!("/LiveApp/streams/cams/s{stream}_300kbps000000001.ts"),
            format!("/LiveApp/streams/s{stream}.m3u8"),
        ] {
            assert_eq!(served_by(c.addr, &path, None).await, node, "{path}");
        }
        used.insert(node);
    }
    assert!(
        used.len() >= 2,
        "12 streams of one subfolder all on {used:?}"
    );
}

/// A node id, to ask the hash module for a ranking like amslb computes it.
#[derive(Debug)]
struct Id(String);

impl hash::Candidate for Id {
    fn id(&self) -> &str {
        &self.0
    }
    fn load(&self) -> usize {
        0
    }
}

#[tokio::test]
async fn stream_hash_spills_a_stream_to_its_second_edge_past_the_load_bound() {
    // c = 2 over 3 edges: bound = ceil(2 · (sessions + 1) / 3).
    let c = sniffing(0, 3, "", "balance = \"stream-hash\"\nload_factor = 2.0").await;
    let ids: Vec<Id> = c.edges.iter().map(|e| Id(e.id().to_string())).collect();
    let ranked = hash::ranked("LiveApp/hot", &ids);
    let play = r#"{"command":"play","streamId":"hot"}"#;
    let mut open = Vec::new();
    let mut counts = Vec::new();
    for _ in 0..4 {
        open.push(session(c.addr, &[play]).await);
        counts.push(c.edges.iter().map(websockets).collect::<Vec<_>>());
    }
    let index = |id: &str| c.edges.iter().position(|e| e.id() == id).unwrap();
    let (first, second) = (index(&ranked[0].0), index(&ranked[1].0));
    let on = |n: usize| counts[n][first] * 10 + counts[n][second];
    // Sessions 1-2 fit under the bound on the first edge (bounds 1, 2), the
    // 3rd spills to the stream's second edge (bound 2), the 4th fits again (bound 3).
    assert_eq!([on(0), on(1), on(2), on(3)], [10, 20, 21, 31], "{counts:?}");
    drop(open);
}

#[tokio::test]
async fn reconnecting_publisher_returns_to_its_origin() {
    let c = sniffing(3, 1, "", ROUND_ROBIN).await;
    let mut origin_of: HashMap<String, usize> = HashMap::new();
    for round in 0..3 {
        for stream in ["cam1", "cam2", "cam3", "cam4"] {
            let before: Vec<usize> = c.origins.iter().map(websockets).collect();
            let publish = format!(r#"{{"command":"publish","streamId":"{stream}"}}"#);
            let mut ws = session(c.addr, &[&publish]).await;
            ws.close(None).await.unwrap();
            let after: Vec<usize> = c.origins.iter().map(websockets).collect();
            let used = (0..3).find(|&i| after[i] > before[i]).unwrap();
            let first = *origin_of.entry(stream.to_string()).or_insert(used);
            assert_eq!(used, first, "{stream} round {round}");
        }
    }
    // WHIP for the same stream goes to the same origin as the WebSocket publish.
    for (stream, &i) in &origin_of {
        assert_eq!(whip(c.addr, stream).await, c.origins[i].id(), "{stream}");
    }
}

#[tokio::test]
async fn two_instances_place_streams_alike() {
    let edges = [
        sim_node("edge-a").await,
        sim_node("edge-b").await,
        sim_node("edge-c").await,
    ];
    let nodes: Vec<NodeDef> = edges
        .iter()
        .map(|n| (n.id(), "edge", n.addr, None))
        .collect();
    let (a, b) = (listener_addr(18701), listener_addr(18701));
    let _one = Amslb::start(&config("", a, "", STREAM_HASH, &nodes), &[a]);
    // The second instance lists the nodes in another order.
    let reversed: Vec<NodeDef> = nodes.iter().rev().cloned().collect();
    let _two = Amslb::start(&config("", b, "", STREAM_HASH, &reversed), &[b]);
    for stream in 0..12 {
        assert_eq!(
            served_by(a, &hls(stream), None).await,
            served_by(b, &hls(stream), None).await
        );
    }
}

#[tokio::test]
async fn home_region_first_client_hint_and_failover_to_the_next_region() {
    let eu = [sim_node("eu-edge-1").await, sim_node("eu-edge-2").await];
    let us = sim_node("us-edge-1").await;
    let ap = sim_node("ap-edge-1").await;
    let nodes: Vec<NodeDef> = vec![
        (eu[0].id(), "edge", eu[0].addr, Some("eu")),
        (eu[1].id(), "edge", eu[1].addr, Some("eu")),
        (us.id(), "edge", us.addr, Some("us")),
        (ap.id(), "edge", ap.addr, Some("ap")),
    ];
    let addr = listener_addr(18701);
    let global = "region = \"eu\"\nregion_preference = [\"eu\", \"us\", \"ap\"]\nregion_header = \"X-Region\"";
    let _amslb = Amslb::start(&config(global, addr, "", STREAM_HASH, &nodes), &[addr]);
    for stream in 0..10 {
        let node = served_by(addr, &hls(stream), None).await;
        assert!(node.starts_with("eu-"), "{node}");
        assert_eq!(served_by(addr, &hls(stream), Some("ap")).await, "ap-edge-1");
    }
    // The home region dies: the next region in the preference list takes over.
    eu[0].stop();
    eu[1].stop();
    for stream in 0..10 {
        assert_eq!(served_by(addr, &hls(stream), None).await, "us-edge-1");
    }
    us.stop();
    assert_eq!(served_by(addr, &hls(0), None).await, "ap-edge-1");
}

#[tokio::test]
async fn assign_api_names_the_node_the_proxy_uses() {
    let c = sniffing(2, 3, "assign_api = true", STREAM_HASH).await;
    for stream in 0..6 {
        let fetched = get(
            c.addr,
            &format!("/amslb/v1/assign?app=LiveApp&stream=s{stream}&role=play"),
        )
        .await;
        assert_eq!(fetched.status, 200);
        assert_eq!(fetched.headers["content-type"], "application/json");
        let body: serde_json::Value = serde_json::from_slice(&fetched.body).unwrap();
        let node = body["node"].as_str().unwrap().to_string();
        assert_eq!(body["group"], "edge");
        assert_eq!(body["http_port"], 5080);
        let edge = c.edges.iter().find(|e| e.id() == node).unwrap();
        assert_eq!(body["address"], edge.addr.ip().to_string());
        assert_eq!(served_by(c.addr, &hls(stream), None).await, node);

        let fetched = get(
            c.addr,
            &format!("/amslb/v1/assign?app=LiveApp&stream=s{stream}&role=publish"),
        )
        .await;
        let body: serde_json::Value = serde_json::from_slice(&fetched.body).unwrap();
        assert_eq!(body["group"], "origin");
        let whip = whip(c.addr, &format!("s{stream}")).await;
        assert_eq!(whip, body["node"].as_str().unwrap());
    }
    let fetched = get(c.addr, "/amslb/v1/assign?app=LiveApp&role=play").await;
    assert_eq!(fetched.status, 400);
}

#[tokio::test]
async fn node_refusing_the_upgrade_closes_the_client_with_an_error() {
    let c = sniffing(0, 1, "", ROUND_ROBIN).await;
    c.edges[0].set_mode(Mode::Status(503));
    let url = format!("ws://{}/LiveApp/websocket", c.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::text(r#"{"command":"play","streamId":"s1"}"#))
        .await
        .unwrap();
    let closing = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Message::Close(Some(frame)) = closing else {
        panic!("expected a close frame, got {closing:?}")
    };
    assert_eq!(u16::from(frame.code), 1011);
}

#[tokio::test]
async fn client_leaving_before_any_message_bothers_no_node() {
    let c = sniffing(1, 1, "sniff_timeout = \"10s\"", ROUND_ROBIN).await;
    let tcp = raw_upgrade(c.addr).await;
    drop(tcp);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(websockets(&c.edges[0]) + websockets(&c.origins[0]), 0);
    // A client that sent a message and then half-closed still gets it delivered.
    let mut tcp = raw_upgrade(c.addr).await;
    let hello = encode_client(true, TEXT, br#"{"command":"ping"}"#, [1, 2, 3, 4]);
    tcp.write_all(&hello).await.unwrap();
    tcp.shutdown().await.unwrap();
    assert_eq!(
        read_server_frame(&mut tcp).await,
        (0x1, br#"{"command":"ping"}"#.to_vec())
    );
    assert_eq!(websockets(&c.edges[0]), 1);
}
