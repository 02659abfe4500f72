//! One config lifetime, end to end with the real amslb binary: a reload that
//! changes `[health] interval`, `[sticky] mode`, the membership source
//! (static → MongoDB, a real SecantusDB) and the RTMP and SRT listeners'
//! group and its backup applies to new requests and sessions under HTTP,
//! RTMP and SRT load with none failed, keeps an open WebSocket tunnel, an open
//! RTMP session and the health state of nodes that stay, and names the
//! setting that needs a restart in the reload answer, the log, the metric and
//! the status API.

mod ops_support;
mod support;

use futures_util::{SinkExt, StreamExt};
use ops_support::{http, metric, wait_for};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::l4_echo::{self, tcp_round, tcp_session, udp_round};
use support::registry::Registration;
use support::secantus::{Secantus, cluster_toml};
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const CREDS: (&str, &str) = ("admin", "s3cret-reload");

/// Two /24 blocks of 127.0.0.0/8: origins and edges, so MongoDB roles can
/// tell them apart by address.
fn subnets() -> ([u8; 3], [u8; 3]) {
    let [a, b]: [u8; 2] = rand::random();
    let a = a.clamp(10, 250);
    ([127, a, b], [127, a, b.wrapping_add(1)])
}

/// `session_idle` of the SRT listener. Each SRT probe binds a new client
/// socket, and the kernel may hand it the port of an earlier probe whose
/// session amslb still holds: that datagram rightly belongs to the old
/// session and its node. A short idle time lets the test wait until every
/// session opened before a change has ended.
const SRT_IDLE_SECS: u64 = 1;

/// The RTMP (`tcp`) and SRT (`udp`) listeners of a config, and the group they
/// send sessions to.
struct L4<'a> {
    rtmp: SocketAddr,
    srt: SocketAddr,
    group: &'a str,
    /// Whether the origin group falls back to the edges when it has no usable node.
    origin_backup: bool,
}

/// Listener "play" (default group edge), stats on `stats`, the L4 listeners
/// when given, and `tail` (`[health]`, `[sticky]`, `[cluster]`, ...).
fn config(play: SocketAddr, stats: SocketAddr, l4: Option<&L4>, tail: &str) -> String {
    let (l4_listeners, origin_backup) = match l4 {
        Some(l4) => (
            format!(
                "[[listener]]\nname = \"rtmp\"\nbind = [\"{}\"]\nprotocol = \"tcp\"\ndefault_group = \"{}\"\n\n\
                 [[listener]]\nname = \"srt\"\nbind = [\"{}\"]\nprotocol = \"udp\"\ndefault_group = \"{}\"\n\
                 session_idle = \"{SRT_IDLE_SECS}s\"\n",
                l4.rtmp, l4.group, l4.srt, l4.group
            ),
            if l4.origin_backup {
                "backup = \"edge\""
            } else {
                ""
            },
        ),
        None => (String::new(), ""),
    };
    format!(
        r#"
[timeouts]
connect = "1s"
server = "2s"

[[listener]]
name = "play"
bind = ["{play}"]
protocol = "http"
default_group = "edge"

{l4_listeners}

[[group]]
name = "origin"
{origin_backup}

[[group]]
name = "edge"
balance = "round-robin"

[stats]
bind = "{stats}"
user = "{}"
password = "{}"
allow = ["127.0.0.0/8"]

{tail}
"#,
        CREDS.0, CREDS.1
    )
}

fn static_nodes(nodes: &[(&SimNode, &str)]) -> String {
    let mut text = String::from("[cluster]\n");
    for (node, group) in nodes {
        text.push_str(&format!(
            "[[cluster.node]]\nid = \"{}\"\naddress = \"{}\"\ngroup = \"{group}\"\n",
            node.id(),
            node.addr.ip()
        ));
    }
    text
}

/// Sends GETs on fresh connections until `stop` (at most 90 s), counting
/// answers from a node (200) and everything else.
async fn load(addr: SocketAddr, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>, failed: Arc<AtomicU64>) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let answer = get(addr, "/live/streams/s1.m3u8").await;
        if answer.status == 200 && !answer.node().is_empty() {
            ok.fetch_add(1, Ordering::Relaxed);
        } else {
            failed.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Opens a new RTMP and a new SRT session every few milliseconds until `stop`
/// (at most 90 s), counting sessions a node answered and everything else.
async fn l4_load(
    l4: (SocketAddr, SocketAddr),
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        for answer in [
            tcp_session(l4.0, b"x").await.map(|a| a.ends_with(":x")),
            udp_round(l4.1).await.map(|a| a.ends_with(":hello")),
        ] {
            let counter = if matches!(answer, Ok(true)) {
                &ok
            } else {
                &failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The node a new RTMP session and a new SRT session land on.
async fn l4_nodes(rtmp: SocketAddr, srt: SocketAddr) -> (String, String) {
    let node = |answer: std::io::Result<String>| {
        answer
            .ok()
            .and_then(|a| a.split(':').next().map(str::to_string))
            .unwrap_or_default()
    };
    (
        node(tcp_session(rtmp, b"x").await),
        node(udp_round(srt).await),
    )
}

async fn scrape(stats: SocketAddr) -> String {
    let page = http("GET", &format!("http://{stats}/metrics"), Some(CREDS)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    page.body
}

async fn checks_of(stats: SocketAddr, node: &str) -> f64 {
    let text = scrape(stats).await;
    metric(
        &text,
        "amslb_health_check_duration_seconds_count",
        &[&format!("node=\"{node}\"")],
    )
    .unwrap_or(0.0)
}

async fn status(stats: SocketAddr) -> serde_json::Value {
    let page = http("GET", &format!("http://{stats}/api/v1/status"), Some(CREDS)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    serde_json::from_str(&page.body).unwrap()
}

/// Reloads through the admin API; the JSON answer.
async fn reload(stats: SocketAddr) -> serde_json::Value {
    let answer = http(
        "POST",
        &format!("http://{stats}/api/v1/reload"),
        Some(CREDS),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    serde_json::from_str(&answer.body).unwrap()
}

/// The status-page entry of node `id`.
fn node_entry(doc: &serde_json::Value, id: &str) -> serde_json::Value {
    status_node_entry(doc, id).unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_health_sticky_and_membership_source_under_load() {
    let db = Secantus::start(&[]);
    let uri = db.uri(None);
    let (origin_net, edge_net) = subnets();
    let origin = sim_node_in(origin_net, 1, "origin-1").await;
    let edge1 = sim_node_in(edge_net, 1, "edge-1").await;
    let edge2 = sim_node_in(edge_net, 2, "edge-2").await;
    let edge3 = sim_node_in(edge_net, 3, "edge-3").await;
    // MongoDB knows a node the static list does not: its traffic shows the switch.
    let _regs: Vec<Registration> = {
        let every = Duration::from_millis(500);
        let mut regs = Vec::new();
        for node in [&origin, &edge1, &edge2, &edge3] {
            regs.push(node.register(&uri, every).await);
        }
        regs
    };
    for node in [&origin, &edge1, &edge2, &edge3] {
        l4_echo::serve(node.addr.ip(), node.id()).await;
    }
    let (play, stats) = (listener_addr(18080), listener_addr(6080));
    let (rtmp, srt) = (listener_addr(1935), listener_addr(4200));
    let l4_before = L4 {
        rtmp,
        srt,
        group: "edge",
        origin_backup: false,
    };
    let l4_after = L4 {
        rtmp,
        srt,
        group: "origin",
        origin_backup: true,
    };
    let before = config(
        play,
        stats,
        Some(&l4_before),
        &format!(
            "[health]\ninterval = \"1s\"\nrise = 2\nfall = 2\n\n{}",
            static_nodes(&[(&origin, "origin"), (&edge1, "edge"), (&edge2, "edge")])
        ),
    );
    let after = config(
        play,
        stats,
        Some(&l4_after),
        &format!(
            "[global]\nmax_connections = 5000\n\n\
             [health]\ninterval = \"200ms\"\nrise = 2\nfall = 2\n\n\
             [sticky]\nmode = \"insert\"\n{}",
            cluster_toml(
                &uri,
                &cidr(origin_net),
                &cidr(edge_net),
                "stale_after = \"10s\""
            )
        ),
    );
    let amslb = Amslb::start(&before, &[play, stats, rtmp]);

    // edge-2 fails its checks and goes down before the reload.
    edge2.set_liveness(503);
    wait_for(Duration::from_secs(10), "edge-2 down", || async {
        (node_entry(&status(stats).await, "edge-2")["state"] == "down").then_some(())
    })
    .await;
    let history_before = node_entry(&status(stats).await, "edge-2")["health_history"]
        .as_array()
        .unwrap()
        .len();
    // Probes run at the old interval: about one per second.
    let (c0, t0) = (checks_of(stats, "edge-1").await, Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slow_rate = (checks_of(stats, "edge-1").await - c0) / t0.elapsed().as_secs_f64();

    // No cookie affinity yet.
    let plain = get(play, "/live/streams/s1.m3u8").await;
    assert!(
        plain.headers.get("set-cookie").is_none(),
        "{:?}",
        plain.headers
    );

    // An open WebSocket tunnel, and load on fresh connections.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{play}/live/websocket"))
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert!(ws.next().await.unwrap().unwrap().is_text());
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..3)
        .map(|_| tokio::spawn(load(play, stop.clone(), ok.clone(), failed.clone())))
        .collect();
    // An open RTMP session on an edge, and RTMP and SRT sessions opened all along.
    let mut rtmp_open = TcpStream::connect(rtmp).await.unwrap();
    let first = tcp_round(&mut rtmp_open, b"before").await.unwrap();
    let rtmp_node = first
        .strip_suffix(":before")
        .unwrap_or_default()
        .to_string();
    assert_eq!(rtmp_node, "edge-1", "the only usable edge: {first}");
    assert_eq!(
        l4_nodes(rtmp, srt).await,
        ("edge-1".into(), "edge-1".into())
    );
    let (l4_ok, l4_failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let l4_client = tokio::spawn(l4_load(
        (rtmp, srt),
        stop.clone(),
        l4_ok.clone(),
        l4_failed.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;

    std::fs::write(amslb.config_path(), &after).unwrap();
    let report = reload(stats).await;
    assert_eq!(report["reloaded"], true, "{report}");
    assert_eq!(
        report["pending_restart"],
        serde_json::json!(["global.max_connections"]),
        "{report}"
    );
    let changed: Vec<&str> = report["changed"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    for key in [
        "health.interval",
        "sticky.mode",
        "cluster.source",
        "cluster.uri",
        "listener.rtmp.default_group",
        "listener.srt.default_group",
        "group.origin.backup",
    ] {
        assert!(changed.contains(&key), "{key} missing from {changed:?}");
    }

    // The MongoDB source now decides: edge-3, known only there, gets traffic.
    wait_for(Duration::from_secs(10), "edge-3 served", || async {
        (get(play, "/live/streams/s1.m3u8").await.node() == "edge-3").then_some(())
    })
    .await;
    // edge-2 stayed (same id and endpoint in both sources): it is still down,
    // with the history it had, and gets no traffic.
    let entry = node_entry(&status(stats).await, "edge-2");
    assert_eq!(entry["state"], "down", "{entry}");
    let history_after = entry["health_history"].as_array().unwrap().len();
    assert!(
        history_after >= history_before,
        "edge-2's check history was reset: {history_before} → {history_after}"
    );
    let mut served = std::collections::HashSet::new();
    for _ in 0..12 {
        let answer = get(play, "/live/streams/s1.m3u8").await;
        // Insert mode: new answers carry amslb's cookie.
        let cookie = answer
            .headers
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            cookie.starts_with("AMSLB="),
            "no sticky cookie: {:?}",
            answer.headers
        );
        served.insert(answer.node());
    }
    assert!(!served.contains("edge-2"), "down node served: {served:?}");
    assert!(served.contains("edge-3"), "{served:?}");

    // Probes run at the new interval.
    let (c1, t1) = (checks_of(stats, "edge-1").await, Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fast_rate = (checks_of(stats, "edge-1").await - c1) / t1.elapsed().as_secs_f64();
    eprintln!("edge-1 probes: {slow_rate:.1}/s before the reload, {fast_rate:.1}/s after");
    assert!(
        fast_rate >= 3.0 && fast_rate > 2.0 * slow_rate,
        "probe rate {slow_rate:.1}/s before, {fast_rate:.1}/s after the reload"
    );

    // New RTMP and SRT sessions go to the listeners' new group; when it has no
    // usable node, to its new backup (the edges, without the down edge-2).
    wait_for(
        Duration::from_secs(10),
        "RTMP and SRT on the origin",
        || async {
            (l4_nodes(rtmp, srt).await == ("origin-1".into(), "origin-1".into())).then_some(())
        },
    )
    .await;
    origin.set_liveness(503);
    wait_for(
        Duration::from_secs(10),
        "RTMP and SRT on the backup",
        || async {
            let (a, b) = l4_nodes(rtmp, srt).await;
            (a.starts_with("edge-") && b.starts_with("edge-")).then_some(())
        },
    )
    .await;
    // Sessions opened while the origin was still up have ended by now.
    tokio::time::sleep(Duration::from_millis(SRT_IDLE_SECS * 1000 + 500)).await;
    for _ in 0..6 {
        let (a, b) = l4_nodes(rtmp, srt).await;
        assert!(["edge-1", "edge-3"].contains(&a.as_str()), "RTMP on {a}");
        assert!(["edge-1", "edge-3"].contains(&b.as_str()), "SRT on {b}");
    }
    // The RTMP session opened before the reload still flows to its node.
    assert_eq!(
        tcp_round(&mut rtmp_open, b"after").await.unwrap(),
        format!("{rtmp_node}:after")
    );

    // The tunnel opened before the reload still carries messages.
    ws.send(Message::text("after")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("tunnel answers after the reload")
        .unwrap()
        .unwrap();
    assert!(echoed.is_text());
    ws.close(None).await.unwrap();

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    l4_client.await.unwrap();
    let (l4_ok, l4_failed) = (
        l4_ok.load(Ordering::Relaxed),
        l4_failed.load(Ordering::Relaxed),
    );
    eprintln!("{l4_ok} RTMP/SRT sessions succeeded and {l4_failed} failed across the reload");
    assert_eq!(
        l4_failed,
        0,
        "{l4_failed} L4 sessions failed ({l4_ok} ok)\n{}",
        amslb.log()
    );
    assert!(
        l4_ok > 20,
        "too little L4 load to prove anything: {l4_ok} sessions"
    );
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{ok} requests succeeded and {failed} failed across the reload");
    assert_eq!(
        failed,
        0,
        "{failed} requests failed ({ok} ok)\n{}",
        amslb.log()
    );
    assert!(ok > 50, "too little load to prove anything: {ok} requests");

    // The restart-only setting is named everywhere, not silently dropped.
    let text = scrape(stats).await;
    assert_eq!(
        metric(
            &text,
            "amslb_config_reload_pending_restart",
            &["setting=\"global.max_connections\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "amslb_membership_source_up", &["source=\"mongodb\""]),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "amslb_membership_source_up", &["source=\"static\""]),
        None,
        "the replaced source's series stays"
    );
    let doc = status(stats).await;
    assert_eq!(
        doc["config"]["pending_restart"],
        serde_json::json!(["global.max_connections"])
    );
    let log = amslb.log();
    assert!(
        log.lines()
            .any(|l| l.contains("only apply on restart") && l.contains("global.max_connections")),
        "{log}"
    );

    // Back to the file it started with: nothing is pending any more.
    std::fs::write(amslb.config_path(), &before).unwrap();
    let report = reload(stats).await;
    assert_eq!(report["pending_restart"], serde_json::json!([]), "{report}");
    let text = scrape(stats).await;
    assert_eq!(
        metric(&text, "amslb_config_reload_pending_restart", &[]),
        None,
        "{text}"
    );
    // And the static list decides again at once: edge-3 is gone.
    for _ in 0..6 {
        assert_ne!(get(play, "/live/streams/s1.m3u8").await.node(), "edge-3");
    }
}

#[test]
fn check_against_prints_what_a_reload_would_change() {
    let (play, stats) = (listener_addr(18080), listener_addr(6080));
    let old = temp_config(&config(play, stats, None, "[cluster]\n"));
    let new = temp_config(&config(
        play,
        stats,
        None,
        "[global]\nworkers = 2\n[health]\ninterval = \"1s\"\n[cluster]\n",
    ));
    let new_path = new.path().to_str().unwrap().to_string();
    let old_path = old.path().to_str().unwrap().to_string();
    let (code, out) = amslb_command(&["check", "--config", &new_path, "--against", &old_path]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("would change 2 setting(s), 1 of them only on restart"),
        "{out}"
    );
    assert!(out.contains("  health.interval\n"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("  global.workers") && l.contains("needs a restart")),
        "{out}"
    );
    let (code, out) = amslb_command(&["check", "--config", &old_path, "--against", &old_path]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("would change nothing"), "{out}");
}
