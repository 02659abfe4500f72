//! Edge policy through the real amslb binary: `[[rule]]` access rules (also
//! added by reload), per-client `[[limit]]`s for connections, requests and
//! publish sessions, a flood of source addresses against the fixed limit
//! tables, `host_groups` over HTTP and HTTPS (SNI), and `trusted_proxies`.
//! Clients are told apart by binding their sockets to different loopback
//! addresses (127.0.5.x allowed, 127.0.7.x not, 127.0.9.x a trusted proxy).

mod support;
mod tls_support;

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use support::tls_node;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STATS_AUTH: (&str, &str) = ("admin", "edge-test-pw");

fn ip(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

/// A config with listener "web" (plain HTTP, default group origin, `keys`
/// added to its table), groups origin and edge, one node each, a stats
/// listener when `stats` is given, and `extra` tables.
fn edge_config(
    web: SocketAddr,
    keys: &str,
    origin: &SimNode,
    edge: &SimNode,
    stats: Option<SocketAddr>,
    extra: &str,
) -> String {
    let stats = stats.map_or(String::new(), |s| {
        format!(
            "[stats]\nbind = \"{s}\"\nuser = \"{}\"\npassword = \"{}\"\nallow = [\"127.0.0.0/8\"]\n",
            STATS_AUTH.0, STATS_AUTH.1
        )
    });
    format!(
        r#"
[timeouts]
connect = "1s"
server = "3s"

[[listener]]
name = "web"
bind = ["{web}"]
protocol = "http"
default_group = "origin"
{keys}

[[group]]
name = "origin"

[[group]]
name = "edge"

{stats}
{extra}

[cluster]
[[cluster.node]]
id = "{}"
address = "{}"
group = "origin"
http_port = {}

[[cluster.node]]
id = "{}"
address = "{}"
group = "edge"
http_port = {}
"#,
        origin.id(),
        origin.addr.ip(),
        origin.addr.port(),
        edge.id(),
        edge.addr.ip(),
        edge.addr.port(),
    )
}

const LOCK_REST: &str = r#"
[[rule]]
name = "lock-rest"
path_prefix = ["/rest/", "/LiveApp/rest/"]
client_not_in = ["127.0.5.0/24"]
action = "deny"
status = 403
"#;

fn get_req(path: &str, host: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", host)
        .body(Empty::new())
        .unwrap()
}

/// The value of the metric line starting with `series` on the stats listener.
async fn metric(stats: SocketAddr, series: &str) -> f64 {
    support::stats_metric(stats, STATS_AUTH, series).await
}

#[tokio::test]
async fn rest_is_locked_down_but_playback_is_not() {
    let (origin, edge) = (sim_node("origin-1").await, sim_node("edge-1").await);
    let web = listener_addr(18480);
    let _lb = Amslb::start(
        &edge_config(web, "", &origin, &edge, None, LOCK_REST),
        &[web],
    );

    let outsider = ip(0, 7, 1);
    for path in ["/rest/v2/version", "/LiveApp/rest/v2/broadcasts/list/0/10"] {
        let answer = send_from(outsider, web, get_req(path, "live.test")).await;
        assert_eq!(answer.status, 403, "{path}: {}", answer.text());
        assert_eq!(answer.node(), "", "a denied request must not reach a node");
    }
    let play = send_from(
        outsider,
        web,
        get_req("/LiveApp/streams/s1.m3u8", "live.test"),
    )
    .await;
    assert_eq!((play.status, play.node().as_str()), (200, "edge-1"));
    let page = send_from(outsider, web, get_req("/LiveApp/play.html", "live.test")).await;
    assert_eq!((page.status, page.node().as_str()), (200, "origin-1"));

    let office = ip(0, 5, 1);
    let rest = send_from(office, web, get_req("/rest/v2/version", "live.test")).await;
    assert_eq!((rest.status, rest.node().as_str()), (200, "origin-1"));
    assert!(
        origin
            .seen()
            .iter()
            .all(|s| !s.uri.starts_with("/rest/") || {
                s.headers["x-forwarded-for"] == "127.0.5.1"
            }),
        "only the allowed client's REST call reached the origin"
    );
}

#[tokio::test]
async fn a_rule_added_by_reload_applies_without_restart() {
    let (origin, edge) = (sim_node("origin-1").await, sim_node("edge-1").await);
    let web = listener_addr(18480);
    let lb = Amslb::start(&edge_config(web, "", &origin, &edge, None, ""), &[web]);
    let client = ip(0, 7, 2);
    let before = send_from(client, web, get_req("/", "live.test")).await;
    assert_eq!(before.status, 200);

    let panel = r#"
[[rule]]
name = "lock-panel"
routes = ["panel", "rest"]
client_not_in = ["127.0.5.0/24"]
action = "deny"
body = "panel is internal\n"

[[rule]]
name = "hsts"
action = "set-header"
on = "response"
header = "strict-transport-security"
value = "max-age=63072000"
"#;
    std::fs::write(
        lb.config_path(),
        edge_config(web, "", &origin, &edge, None, panel),
    )
    .unwrap();
    lb.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    let denied = loop {
        let answer = send_from(client, web, get_req("/", "live.test")).await;
        if answer.status == 403 {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "reloaded rule never applied:\n{}",
            lb.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(denied.text(), "panel is internal\n");
    let play = send_from(
        client,
        web,
        get_req("/LiveApp/streams/s1.m3u8", "live.test"),
    )
    .await;
    assert_eq!(play.status, 200);
    assert_eq!(
        play.headers["strict-transport-security"],
        "max-age=63072000"
    );
    assert!(lb.log().contains("request denied by rule"), "{}", lb.log());
}

/// Sends one keep-alive GET on `stream` and returns the status of the answer
/// (0 when the connection closed first), leaving the connection open.
async fn status_on(stream: &mut tokio::net::TcpStream) -> u16 {
    let _ = stream
        .write_all(b"GET /LiveApp/play.html HTTP/1.1\r\nhost: live.test\r\n\r\n")
        .await;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn one_client_with_500_connections_is_held_at_its_limit() {
    let (origin, edge) = (sim_node("origin-1").await, sim_node("edge-1").await);
    let (web, stats) = (listener_addr(18480), listener_addr(18490));
    let limit = "[[limit]]\nname = \"conns-per-client\"\nmax_connections = 50\n";
    let _lb = Amslb::start(
        &edge_config(web, "", &origin, &edge, Some(stats), limit),
        &[web, stats],
    );
    let greedy = ip(0, 7, 3);
    let mut open = Vec::new();
    let (mut served, mut refused) = (0, 0);
    for _ in 0..500 {
        let mut stream = connect_from(greedy, web).await.unwrap();
        match status_on(&mut stream).await {
            200 => {
                served += 1;
                open.push(stream);
            }
            429 => refused += 1,
            other => panic!("unexpected answer {other}"),
        }
    }
    assert_eq!((served, refused), (50, 450));
    // Another client is served normally meanwhile.
    for _ in 0..5 {
        let answer = send_from(ip(0, 7, 4), web, get_req("/LiveApp/play.html", "live.test")).await;
        assert_eq!(answer.status, 200);
    }
    // The greedy client's open connections still work, and closing some frees places.
    assert_eq!(status_on(&mut open[0]).await, 200);
    open.truncate(40);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from(greedy, web).await.unwrap();
    assert_eq!(status_on(&mut again).await, 200);
    let series = "amslb_limited_total{limit=\"conns-per-client\",listener=\"web\"}";
    assert_eq!(metric(stats, series).await, 450.0);
}

#[tokio::test]
async fn whip_flood_from_one_address_is_held_at_the_publish_limit() {
    let (origin, edge) = (sim_node("origin-1").await, sim_node("edge-1").await);
    let (web, stats) = (listener_addr(18480), listener_addr(18490));
    let limit = r#"
[[limit]]
name = "publish-rate"
routes = ["whip", "websocket-publish", "rtmp-publish", "srt-publish"]
per_minute = 60
"#;
    let lb = Amslb::start(
        &edge_config(web, "", &origin, &edge, Some(stats), limit),
        &[web, stats],
    );
    let post = |stream: usize| {
        Request::post(format!("/LiveApp/whip/flood{stream}"))
            .header("host", "live.test")
            .header("content-type", "application/sdp")
            .body(Empty::new())
            .unwrap()
    };
    let flooder = ip(0, 7, 5);
    let started = Instant::now();
    let (mut created, mut limited) = (0, 0);
    for i in 0..100 {
        // 100 per second: one every 10 ms.
        let due = started + Duration::from_millis(10 * i as u64);
        tokio::time::sleep_until(due.into()).await;
        match send_from(flooder, web, post(i)).await.status {
            201 => created += 1,
            429 => limited += 1,
            other => panic!("unexpected answer {other}"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // A bucket of 60 refilled at one a second over the flood's duration.
    let most = 60 + secs.ceil() as i32;
    assert!(
        (60..=most).contains(&created),
        "{created} created in {secs:.1}s"
    );
    assert_eq!(created + limited, 100);
    // Another address publishes meanwhile.
    let other = send_from(ip(0, 7, 6), web, post(1000)).await;
    assert_eq!((other.status, other.node().as_str()), (201, "origin-1"));
    let series = "amslb_limited_total{limit=\"publish-rate\",listener=\"web\"}";
    assert_eq!(metric(stats, series).await, f64::from(limited));
    // The log says so, but not once per refusal.
    let lines = lb.log().matches("client over its limit").count();
    assert!(
        (1..=(secs.ceil() as usize + 1)).contains(&lines),
        "{lines} log lines"
    );
}

#[tokio::test]
async fn a_flood_of_50000_source_addresses_keeps_memory_bounded() {
    let (origin, edge) = (sim_node("origin-1").await, sim_node("edge-1").await);
    let web = listener_addr(18480);
    let limits = r#"
[[limit]]
name = "conns"
max_connections = 20

[[limit]]
name = "rate"
requests_per_second = 5
burst = 10
"#;
    let lb = Amslb::start(&edge_config(web, "", &origin, &edge, None, limits), &[web]);
    // 127.251.b.c: distinct from the nodes' addresses (second octet 10..=250).
    let source = |i: u32| ip(251, (i / 250) as u8 + 1, (i % 250) as u8 + 1);
    let flood = |range: std::ops::Range<u32>| async move {
        let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        let mut tasks = tokio::task::JoinSet::new();
        let mut ok = 0u32;
        for i in range {
            let permit = semaphore.clone().acquire_owned().await.unwrap();
            tasks.spawn(async move {
                let _permit = permit;
                let mut stream = connect_from(source(i), web).await.ok()?;
                stream
                    .write_all(b"GET /LiveApp/streams/s1.m3u8 HTTP/1.1\r\nhost: live.test\r\nconnection: close\r\n\r\n")
                    .await
                    .ok()?;
                let mut answer = Vec::new();
                tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
                    .await
                    .ok()?
                    .ok()?;
                answer.starts_with(b"HTTP/1.1 200").then_some(())
            });
            while let Some(done) = tasks.try_join_next() {
                ok += u32::from(done.unwrap().is_some());
            }
        }
        while let Some(done) = tasks.join_next().await {
            ok += u32::from(done.unwrap().is_some());
        }
        ok
    };
    // Warm up (allocator, pools, tables touched), then measure.
    assert_eq!(flood(0..2_000).await, 2_000);
    let before = rss_kib(lb.pid());
    let started = Instant::now();
    let served = flood(2_000..50_000).await;
    let after = rss_kib(lb.pid());
    eprintln!(
        "flood of 48000 more source addresses in {:.1}s: RSS {before} KiB -> {after} KiB",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        served, 48_000,
        "every new address gets a fresh bucket and is served"
    );
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

const HOSTS: &str = r#"host_groups = { "origin.example.test" = "origin", "edge.example.test" = "edge", "*.edge.example.test" = "edge" }"#;

#[tokio::test]
async fn host_names_choose_the_group_on_one_listener() {
    let (origin, edge) = (sim_node("origin-1").await, sim_node("edge-1").await);
    let web = listener_addr(18480);
    let _lb = Amslb::start(&edge_config(web, HOSTS, &origin, &edge, None, ""), &[web]);
    let cases = [
        ("origin.example.test", "/LiveApp/play.html", "origin-1"),
        ("edge.example.test", "/LiveApp/play.html", "edge-1"),
        ("Cdn7.Edge.Example.Test:80", "/LiveApp/play.html", "edge-1"),
        // The host decides over the path router (which sends HLS to edge).
        (
            "origin.example.test",
            "/LiveApp/streams/s1.m3u8",
            "origin-1",
        ),
        // No host entry: the router as usual.
        ("live.test", "/LiveApp/streams/s1.m3u8", "edge-1"),
        ("live.test", "/LiveApp/play.html", "origin-1"),
    ];
    for (host, path, node) in cases {
        let answer = send(web, get_req(path, host)).await;
        assert_eq!(
            (answer.status, answer.node()),
            (200, node.to_string()),
            "{host}{path}"
        );
    }
}

#[tokio::test]
async fn host_names_choose_the_group_over_tls_with_sni() {
    let (origin, edge) = (sim_node("origin-1").await, sim_node("edge-1").await);
    let (web, secure) = (listener_addr(18480), listener_addr(18443));
    let ca = tls_support::TestCa::new();
    let dir = tls_support::tempdir("edge-sni");
    let names = [
        "origin.example.test",
        "edge.example.test",
        "*.edge.example.test",
    ];
    let (cert, key) = ca.leaf(&names);
    std::fs::write(dir.path().join("example.pem"), format!("{cert}{key}")).unwrap();
    let https = format!(
        "[[listener]]\nname = \"secure\"\nbind = [\"{secure}\"]\nprotocol = \"https\"\ndefault_group = \"origin\"\n{HOSTS}\n\n[tls]\ncerts_dir = \"{}\"\n",
        dir.path().display()
    );
    let _lb = Amslb::start(
        &edge_config(web, "", &origin, &edge, None, &https),
        &[secure],
    );
    let roots = [ca.der.clone()];
    for (sni, node) in [
        ("origin.example.test", "origin-1"),
        ("edge.example.test", "edge-1"),
        ("eu1.edge.example.test", "edge-1"),
    ] {
        for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
            let seen = tls_support::get(secure, sni, &roots, &[alpn], "/LiveApp/play.html")
                .await
                .unwrap();
            let got = seen.headers.get("x-node-id").and_then(|v| v.to_str().ok());
            assert_eq!(
                (seen.status.as_u16(), got),
                (200, Some(node)),
                "{sni} over {alpn:?}"
            );
        }
    }
}

#[tokio::test]
async fn limits_and_rules_see_the_client_behind_a_trusted_proxy_only() {
    let (origin, edge) = (sim_node("origin-1").await, sim_node("edge-1").await);
    let web = listener_addr(18480);
    let keys = r#"trusted_proxies = ["127.0.9.0/24"]"#;
    let limit = r#"
[[limit]]
name = "page-rate"
routes = ["other"]
requests_per_second = 0.1
burst = 3
"#;
    let _lb = Amslb::start(
        &edge_config(
            web,
            keys,
            &origin,
            &edge,
            None,
            &format!("{LOCK_REST}{limit}"),
        ),
        &[web],
    );
    let with_xff = |path: &str, xff: &str| {
        Request::get(path)
            .header("host", "live.test")
            .header("x-forwarded-for", xff)
            .body(Empty::new())
            .unwrap()
    };
    let proxy = ip(0, 9, 1);
    // Through the trusted proxy, the rule sees the client named in XFF.
    let allowed = send_from(
        proxy,
        web,
        with_xff("/rest/v2/version", "203.0.113.50, 127.0.5.7"),
    )
    .await;
    assert_eq!(allowed.status, 200);
    let seen = origin.seen();
    assert_eq!(
        seen.last().unwrap().headers["x-forwarded-for"],
        "203.0.113.50, 127.0.5.7",
        "the node sees the chain up to the real client"
    );
    let denied = send_from(proxy, web, with_xff("/rest/v2/version", "127.0.7.7")).await;
    assert_eq!(denied.status, 403);
    // A trusted hop in the chain is skipped too.
    let skipped = send_from(
        proxy,
        web,
        with_xff("/rest/v2/version", "127.0.5.8, 127.0.9.2"),
    )
    .await;
    assert_eq!(skipped.status, 200);

    // From an untrusted peer, a forged XFF changes nothing: still denied, still appended to.
    let forger = ip(0, 7, 8);
    let forged = send_from(forger, web, with_xff("/rest/v2/version", "127.0.5.7")).await;
    assert_eq!(forged.status, 403);
    let page = send_from(forger, web, with_xff("/LiveApp/play.html", "127.0.5.7")).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        origin.seen().last().unwrap().headers["x-forwarded-for"],
        "127.0.5.7, 127.0.7.8"
    );

    // Limits count per client named by the proxy, not per proxy; the forger
    // already spent one token above.
    for (client, passes) in [("198.51.100.1", 3), ("198.51.100.2", 3)] {
        for i in 0..4 {
            let answer = send_from(proxy, web, with_xff("/LiveApp/play.html", client)).await;
            let want = if i < passes { 200 } else { 429 };
            assert_eq!(answer.status, want, "{client} request {i}");
        }
    }
    for i in 0..3 {
        let answer = send_from(forger, web, with_xff("/LiveApp/play.html", "198.51.100.3")).await;
        let want = if i < 2 { 200 } else { 429 };
        assert_eq!(
            answer.status, want,
            "forger request {i}: XFF must not give it a new bucket"
        );
    }
}

/// A config whose only node (group origin) is reached over TLS with `node_tls`.
fn tls_node_config(web: SocketAddr, node: SocketAddr, node_tls: &str) -> String {
    format!(
        r#"
[timeouts]
connect = "2s"
server = "3s"

[health]
interval = "200ms"

[[listener]]
name = "web"
bind = ["{web}"]
protocol = "http"
default_group = "origin"

[[group]]
name = "origin"

[cluster]
[cluster.node_tls]
{node_tls}
https_port = {}

[[cluster.node]]
id = "tls-node"
address = "{}"
group = "origin"
"#,
        node.port(),
        node.ip()
    )
}

#[tokio::test]
async fn https_to_a_node_with_a_private_ca_is_verified() {
    let ca = tls_support::TestCa::new();
    let dir = tls_support::tempdir("node-ca");
    let ca_file = dir.path().join("nodes-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let (cert, key) = ca.leaf(&["node.example.test"]);
    let node = tls_node::TlsNode::start(
        "tls-node",
        SocketAddr::new(unique_loopback(), 5443),
        &cert,
        &key,
    )
    .await;
    let web = listener_addr(18480);
    let good = format!(
        "ca_file = \"{}\"\nserver_name = \"node.example.test\"",
        ca_file.display()
    );
    let lb = Amslb::start(&tls_node_config(web, node.addr, &good), &[web]);
    let answer = send(web, get_req("/LiveApp/play.html", "live.test")).await;
    assert_eq!(
        (answer.status, answer.node().as_str()),
        (200, "tls-node"),
        "{}",
        lb.log()
    );
    assert!(
        node.requests
            .lock()
            .unwrap()
            .contains(&"/LiveApp/play.html".to_string())
    );
    // Health checks go over TLS too, each on a new connection that resumes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (checks, resumed) = {
            let asked = node.requests.lock().unwrap();
            let shakes = node.handshakes.lock().unwrap();
            (
                asked
                    .iter()
                    .filter(|p| p.as_str() == "/rest/v2/liveness")
                    .count(),
                shakes.iter().filter(|&&r| r).count(),
            )
        };
        if checks >= 2 && resumed >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{checks} health checks, {resumed} resumed handshakes:\n{}",
            lb.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(lb);

    // A certificate that does not carry the expected name is refused, and the log says why.
    let web = listener_addr(18480);
    let wrong = format!(
        "ca_file = \"{}\"\nserver_name = \"other.example.test\"",
        ca_file.display()
    );
    let lb = Amslb::start(&tls_node_config(web, node.addr, &wrong), &[web]);
    let before = node.requests.lock().unwrap().len();
    let answer = send(web, get_req("/LiveApp/play.html", "live.test")).await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(
        node.requests.lock().unwrap().len(),
        before,
        "nothing sent to an unverified node"
    );
    let log = lb.log();
    assert!(
        log.contains("TLS handshake with node") && log.contains("certificate not valid for name"),
        "{log}"
    );
}

/// On a listener without `sniff_websocket`, a WebSocket publish is still
/// counted by `websocket-publish` (its first command read as it passes),
/// players are not: three players and two publishers are relayed, the third
/// publisher's `publish` never reaches the node and its tunnel is closed.
#[tokio::test]
async fn websocket_publish_limit_applies_without_sniffing() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (origin, edge) = (sim_node("origin-1").await, sim_node("edge-1").await);
    let (web, stats) = (listener_addr(18480), listener_addr(18490));
    let limit =
        "[[limit]]\nname = \"ws-publishers\"\nroutes = [\"websocket-publish\"]\nper_minute = 2\n";
    let lb = Amslb::start(
        &edge_config(web, "", &origin, &edge, Some(stats), limit),
        &[web, stats],
    );
    let url = format!("ws://{web}/LiveApp/websocket");
    // Sends `command` on a new session; the echoed text if the node got it.
    let session = |command: String| {
        let url = url.clone();
        async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            ws.send(Message::text(command)).await.unwrap();
            let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("an answer or a close in time");
            match echoed {
                Some(Ok(Message::Text(text))) => Some(text.to_string()),
                _ => None,
            }
        }
    };
    for i in 0..3 {
        let play = format!(r#"{{"command":"play","streamId":"v{i}"}}"#);
        assert_eq!(session(play.clone()).await, Some(play), "{}", lb.log());
    }
    for i in 0..2 {
        let publish = format!(r#"{{"command":"publish","streamId":"p{i}"}}"#);
        assert_eq!(
            session(publish.clone()).await,
            Some(publish),
            "{}",
            lb.log()
        );
    }
    let third = r#"{"command":"publish","streamId":"p2"}"#.to_string();
    assert_eq!(session(third).await, None, "the third publish is refused");
    assert!(
        !origin.messages().iter().any(|m| m.contains("\"p2\"")),
        "{:?}",
        origin.messages()
    );
    assert_eq!(
        metric(
            stats,
            "amslb_limited_total{limit=\"ws-publishers\",listener=\"web\"}"
        )
        .await,
        1.0,
        "{}",
        lb.log()
    );
    assert!(lb.log().contains("client over its limit, refused"));
}
