//! Operations end to end, with the real amslb binary in front of simulated AMS
//! nodes: metric values after known traffic (read directly, by promtool and by a
//! real Prometheus), hot reload under load, refused reloads, drain through the
//! admin API, and the access log.

mod ops_support;
mod support;

use futures_util::{SinkExt, StreamExt};
use ops_support::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::*;
use tokio_tungstenite::tungstenite::Message;

const CREDS: (&str, &str) = ("admin", "t0p-s3cret");

/// The shared one-listener config (listener "http", groups origin and edge)
/// with a stats listener on `stats` (basic auth, loopback allowed), the given
/// (node, group) pairs, and `extra` tables.
fn config(main: SocketAddr, stats: SocketAddr, nodes: &[(&SimNode, &str)], extra: &str) -> String {
    let nodes: Vec<_> = nodes.iter().map(|(n, g)| (*n, *g, "")).collect();
    let stats = format!(
        "[stats]\nbind = \"{stats}\"\nuser = \"{}\"\npassword = \"{}\"\nallow = [\"127.0.0.0/8\"]\n",
        CREDS.0, CREDS.1
    );
    one_listener_config(main, &nodes, &format!("{stats}\n{extra}"))
}

async fn scrape(stats: SocketAddr) -> String {
    let page = http("GET", &format!("http://{stats}/metrics"), Some(CREDS)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    page.body
}

async fn admin(stats: SocketAddr, path: &str) -> Answer {
    http("POST", &format!("http://{stats}{path}"), Some(CREDS)).await
}

#[tokio::test]
async fn known_traffic_shows_in_metrics_promtool_and_prometheus() {
    let origin = sim_node("origin-1").await;
    let edges = [sim_node("edge-1").await, sim_node("edge-2").await];
    let (main, stats) = (listener_addr(18080), listener_addr(6080));
    let nodes = [
        (&origin, "origin"),
        (&edges[0], "edge"),
        (&edges[1], "edge"),
    ];
    let _amslb = Amslb::start(&config(main, stats, &nodes, ""), &[main, stats]);

    // Probes need no credentials; everything else does.
    assert_eq!(
        http("GET", &format!("http://{stats}/healthz"), None)
            .await
            .status,
        200
    );
    assert_eq!(
        http("GET", &format!("http://{stats}/metrics"), None)
            .await
            .status,
        401
    );

    for _ in 0..6 {
        assert_eq!(get(main, "/live/streams/s1.m3u8").await.status, 200);
    }
    for _ in 0..4 {
        assert_eq!(get(main, "/rest/v2/version").await.status, 200);
    }
    let text = scrape(stats).await;
    let requests = |route: &str| {
        metric(
            &text,
            "amslb_requests_total",
            &[
                "listener=\"http\"",
                &format!("route=\"{route}\""),
                "code=\"2xx\"",
            ],
        )
    };
    assert_eq!(requests("hls"), Some(6.0), "{text}");
    assert_eq!(requests("rest"), Some(4.0), "{text}");
    let node = |id: &str| {
        metric(
            &text,
            "amslb_node_requests_total",
            &[&format!("node=\"{id}\""), "code=\"2xx\""],
        )
    };
    assert_eq!(node("origin-1"), Some(4.0));
    assert_eq!(node("edge-1").unwrap() + node("edge-2").unwrap(), 6.0);
    assert_eq!(node("edge-1"), Some(3.0), "round-robin splits evenly");
    assert!(metric(&text, "amslb_sent_bytes_total", &["http"]).unwrap() > 0.0);
    assert_eq!(
        metric(
            &text,
            "amslb_request_duration_seconds_count",
            &["route=\"hls\""]
        ),
        Some(6.0)
    );
    // Ten requests plus the harness's readiness probe.
    assert_eq!(
        metric(&text, "amslb_connections_total", &["http"]),
        Some(11.0)
    );
    assert_eq!(
        metric(&text, "amslb_node_state", &["edge-2", "state=\"up\""]),
        Some(1.0)
    );

    let (ok, output) = promtool_check(&text);
    assert!(ok, "promtool check metrics:\n{output}");

    let dir = TempDir::new("prometheus");
    let (_prometheus, prom) = start_prometheus(&dir, &stats.to_string(), CREDS);
    let per_group = promql(
        &prom,
        "sum by (group) (amslb_node_requests_total)",
        Duration::from_secs(30),
    )
    .await;
    let value = |g: &str| {
        per_group
            .iter()
            .find(|(l, _)| l["group"] == g)
            .map(|(_, v)| *v)
    };
    assert_eq!(value("edge"), Some(6.0), "{per_group:?}");
    assert_eq!(value("origin"), Some(4.0), "{per_group:?}");
    let hls = promql(
        &prom,
        "sum(amslb_requests_total{route=\"hls\",code=\"2xx\"})",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(hls[0].1, 6.0);
}

/// Sends requests until `stop`, on a fresh connection each time or on one
/// keep-alive connection; counts successes and failures.
async fn load(
    addr: SocketAddr,
    keep_alive: bool,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    use http_body_util::{BodyExt, Empty};
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sender = None;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        if sender.is_none() || !keep_alive {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (s, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender = Some(s);
        }
        let s = sender.as_mut().unwrap();
        let req = http::Request::get("/live/streams/s1.m3u8")
            .header("host", "live.test")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let good = match s.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                resp.into_body().collect().await.is_ok() && status == 200
            }
            Err(_) => false,
        };
        if good {
            ok.fetch_add(1, Ordering::Relaxed);
        } else {
            failed.fetch_add(1, Ordering::Relaxed);
            sender = None;
        }
    }
}

async fn reload_count(stats: SocketAddr, result: &str) -> f64 {
    metric(
        &scrape(stats).await,
        "amslb_config_reloads_total",
        &[&format!("result=\"{result}\"")],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_drop_nothing() {
    let origin = sim_node("origin-1").await;
    let edges = [sim_node("edge-1").await, sim_node("edge-2").await];
    let (main, stats, extra) = (
        listener_addr(18080),
        listener_addr(6080),
        listener_addr(18090),
    );
    let all = [
        (&origin, "origin"),
        (&edges[0], "edge"),
        (&edges[1], "edge"),
    ];
    let base = config(main, stats, &all, "");
    // The alternate config adds a listener and removes a node.
    let alternate = config(
        main,
        stats,
        &all[..2],
        &format!(
            "\n[[listener]]\nname = \"extra\"\nbind = [\"{extra}\"]\nprotocol = \"http\"\ndefault_group = \"origin\"\n"
        ),
    );
    let amslb = Amslb::start(&base, &[main, stats]);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = [true, true, false, false]
        .into_iter()
        .map(|keep_alive| {
            tokio::spawn(load(
                main,
                keep_alive,
                stop.clone(),
                ok.clone(),
                failed.clone(),
            ))
        })
        .collect();

    for i in 0..20u32 {
        let text = if i % 2 == 0 { &alternate } else { &base };
        std::fs::write(amslb.config_path(), text).unwrap();
        if i % 4 < 2 {
            amslb.signal("HUP");
            let want = f64::from(i + 1);
            wait_for(Duration::from_secs(5), "SIGHUP reload", || async move {
                (reload_count(stats, "success").await >= want).then_some(())
            })
            .await;
        } else {
            let answer = admin(stats, "/api/v1/reload").await;
            assert_eq!(answer.status, 200, "{}", answer.body);
        }
        if i == 0 {
            // The added listener serves at once.
            assert_eq!(get(extra, "/rest/v2/version").await.node(), "origin-1");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{ok} requests succeeded and {failed} failed across 20 reloads");
    assert_eq!(
        failed,
        0,
        "{failed} requests failed during reloads ({ok} succeeded)\n{}",
        amslb.log()
    );
    assert!(ok > 100, "too little load to prove anything: {ok} requests");
    assert_eq!(reload_count(stats, "success").await, 20.0);
    assert_eq!(reload_count(stats, "failure").await, 0.0);
    // The last config is the base one: the extra listener is gone, edge-2 is back.
    assert!(
        tokio::net::TcpStream::connect(extra).await.is_err(),
        "removed listener still accepts"
    );
    let seen: std::collections::HashSet<String> = {
        let mut s = std::collections::HashSet::new();
        for _ in 0..4 {
            s.insert(get(main, "/live/streams/s1.m3u8").await.node());
        }
        s
    };
    assert!(seen.contains("edge-2"), "{seen:?}");
}

#[tokio::test]
async fn refused_reload_keeps_the_running_config() {
    let origin = sim_node("origin-1").await;
    let (main, stats) = (listener_addr(18080), listener_addr(6080));
    let good = config(main, stats, &[(&origin, "origin")], "");
    let amslb = Amslb::start(&good, &[main, stats]);

    // A typo: refused with the key named, through SIGHUP and the admin API alike.
    let typo = good.replace("connect = \"1s\"", "conect = \"1s\"");
    std::fs::write(amslb.config_path(), &typo).unwrap();
    amslb.signal("HUP");
    wait_for(Duration::from_secs(5), "refused reload", || async {
        (reload_count(stats, "failure").await >= 1.0).then_some(())
    })
    .await;
    let answer = admin(stats, "/api/v1/reload").await;
    assert_eq!(answer.status, 422);
    assert!(answer.body.contains("timeouts.conect"), "{}", answer.body);
    let (code, output) =
        amslb_command(&["check", "--config", amslb.config_path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(output.contains("timeouts.conect"), "{output}");
    assert!(amslb.log().contains("reload refused"), "{}", amslb.log());

    // Valid but unbindable (an address this host does not have), together with
    // a change that would be fine alone: nothing of it may apply.
    let unbindable = config(
        main,
        stats,
        &[],
        "\n[[listener]]\nname = \"far\"\nbind = [\"192.0.2.1:18099\"]\nprotocol = \"http\"\ndefault_group = \"origin\"\n",
    );
    std::fs::write(amslb.config_path(), &unbindable).unwrap();
    let answer = admin(stats, "/api/v1/reload").await;
    assert_eq!(answer.status, 422);
    assert!(answer.body.contains("192.0.2.1:18099"), "{}", answer.body);

    // The old config still runs: the node list was not emptied.
    assert_eq!(get(main, "/rest/v2/version").await.node(), "origin-1");
    let text = scrape(stats).await;
    assert_eq!(
        metric(&text, "amslb_config_last_reload_successful", &[]),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "amslb_config_reloads_total", &["failure"]),
        Some(3.0)
    );
    // Fixing the file and reloading recovers.
    std::fs::write(amslb.config_path(), &good).unwrap();
    assert_eq!(admin(stats, "/api/v1/reload").await.status, 200);
    let text = scrape(stats).await;
    assert_eq!(
        metric(&text, "amslb_config_last_reload_successful", &[]),
        Some(1.0)
    );
}

#[tokio::test]
async fn drain_through_the_admin_api_stops_new_requests() {
    let edges = [sim_node("edge-1").await, sim_node("edge-2").await];
    let (main, stats) = (listener_addr(18080), listener_addr(6080));
    let nodes = [(&edges[0], "edge"), (&edges[1], "edge")];
    let amslb = Amslb::start(&config(main, stats, &nodes, ""), &[main, stats]);

    let unauthenticated = http(
        "POST",
        &format!("http://{stats}/api/v1/nodes/edge-1/drain"),
        None,
    )
    .await;
    assert_eq!(unauthenticated.status, 401);
    let answer = admin(stats, "/api/v1/nodes/edge-1/drain").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    for _ in 0..10 {
        assert_eq!(get(main, "/live/streams/s1.m3u8").await.node(), "edge-2");
    }
    let text = scrape(stats).await;
    assert_eq!(
        metric(&text, "amslb_node_state", &["edge-1", "state=\"draining\""]),
        Some(1.0)
    );
    let status = http("GET", &format!("http://{stats}/api/v1/status"), Some(CREDS)).await;
    assert!(
        status.body.contains("\"state\":\"draining\""),
        "{}",
        status.body
    );
    assert!(
        amslb.log().contains("node drain state changed"),
        "{}",
        amslb.log()
    );

    assert_eq!(
        admin(stats, "/api/v1/nodes/edge-1/undrain").await.status,
        200
    );
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(get(main, "/live/streams/s1.m3u8").await.node());
    }
    assert!(
        seen.contains("edge-1"),
        "undrained node gets traffic again: {seen:?}"
    );
}

#[tokio::test]
async fn access_log_has_one_json_line_per_request_and_tunnel() {
    let origin = sim_node("origin-1").await;
    let (main, stats) = (listener_addr(18080), listener_addr(6080));
    let dir = TempDir::new("access-log");
    let path = dir.path().join("access.log");
    let extra = format!(
        "\n[access_log]\nformat = \"json\"\npath = {:?}\n",
        path.display().to_string()
    );
    let amslb = Amslb::start(
        &config(main, stats, &[(&origin, "origin")], &extra),
        &[main, stats],
    );

    assert_eq!(get(main, "/rest/v2/version").await.status, 200);
    assert_eq!(get(main, "/live/streams/s1.m3u8").await.status, 200); // no edge group member: backup origin
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{main}/live/websocket"))
        .await
        .unwrap();
    ws.send(Message::text("{\"command\":\"ping\"}"))
        .await
        .unwrap();
    assert!(ws.next().await.unwrap().unwrap().is_text());
    ws.close(None).await.unwrap();
    drop(ws);

    let lines = wait_for(Duration::from_secs(5), "three access log lines", || {
        let path = path.clone();
        async move {
            let text = std::fs::read_to_string(&path).ok()?;
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            (lines.len() >= 3).then_some(lines)
        }
    })
    .await;
    assert_eq!(lines.len(), 3, "{lines:?}\n{}", amslb.log());
    let rest = lines.iter().find(|l| l["route"] == "rest").unwrap();
    assert_eq!(rest["status"], 200);
    assert_eq!(rest["node"], "origin-1");
    assert_eq!(rest["group"], "origin");
    assert_eq!(rest["listener"], "http");
    assert!(rest["client"].as_str().unwrap().starts_with("127."));
    assert!(rest["bytes_out"].as_u64().unwrap() > 0);
    let tunnel = lines.iter().find(|l| l["route"] == "websocket").unwrap();
    assert_eq!(tunnel["status"], 101);
    assert!(tunnel["bytes_in"].as_u64().unwrap() > 0, "{tunnel}");
    let text = scrape(stats).await;
    assert_eq!(
        metric(&text, "amslb_tunnels_total", &["route=\"websocket\""]),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "amslb_open_tunnels", &["route=\"websocket\""]),
        Some(0.0)
    );
}

#[tokio::test]
async fn health_checks_show_in_metrics() {
    let good = sim_node("good").await;
    let bad = sim_node("bad").await;
    bad.set_liveness(503);
    let (main, stats) = (listener_addr(18080), listener_addr(6080));
    let health = "[health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\n";
    let text = config(main, stats, &[(&good, "origin"), (&bad, "origin")], health);
    let _amslb = Amslb::start(&text, &[main, stats]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(stats).await;
        let checks = |id: &str| {
            metric(
                &text,
                "amslb_health_check_duration_seconds_count",
                &[&format!("node=\"{id}\"")],
            )
            .unwrap_or(0.0)
        };
        let failures = |id: &str| {
            metric(
                &text,
                "amslb_health_check_failures_total",
                &[&format!("node=\"{id}\"")],
            )
            .unwrap_or(0.0)
        };
        if checks("good") >= 3.0 && checks("bad") >= 3.0 {
            assert_eq!(failures("good"), 0.0, "{text}");
            assert!(failures("bad") >= 3.0, "{text}");
            assert_eq!(
                metric(
                    &text,
                    "amslb_node_state",
                    &["node=\"bad\"", "state=\"down\""]
                ),
                Some(1.0)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no health check metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
