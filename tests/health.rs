//! Health checks, draining and slow start end to end, against simulated AMS
//! nodes on loopback. Timing bounds come from the configured interval, rise
//! and fall; the slack covers scheduling on a busy 2-core machine.

mod support;

use amslb::cluster::Node;
use amslb::runtime::Runtime;
use amslb::server::Server;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Empty;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

/// Scheduling slack added to every timing bound.
const SLACK: Duration = Duration::from_millis(250);

/// amslb run in-process, so a test can look at node state and drain a node
/// the way the admin API will; stopped when dropped.
struct InProcess {
    runtime: Arc<Runtime>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl InProcess {
    fn start(text: &str) -> InProcess {
        let config = amslb::config::parse_str(text, Path::new("lb.toml"))
            .unwrap()
            .config;
        let server = Server::bind(config).unwrap();
        let runtime = server.runtime().clone();
        let addr = server.local_addrs()[0].1;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(server.run(async move { stopped.cancelled().await }));
        InProcess {
            runtime,
            addr,
            stop,
        }
    }

    fn node(&self, id: &str) -> Arc<Node> {
        self.runtime.cluster.snapshot().node(id).unwrap().clone()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn health(interval_ms: u64, timeout_ms: u64, rise: u32, fall: u32) -> String {
    format!(
        "[health]\ninterval = \"{interval_ms}ms\"\ntimeout = \"{timeout_ms}ms\"\nrise = {rise}\nfall = {fall}\n"
    )
}

async fn get_cookie(addr: SocketAddr, path: &str, cookie: Option<&str>) -> Fetched {
    let mut request = Request::get(path).header("host", "live.test");
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    send(addr, request.body(Empty::<Bytes>::new()).unwrap()).await
}

/// Sends a request every 20 ms until `until` holds for the node ids seen, or
/// `limit` passes; returns how long that took.
async fn poll_until(
    addr: SocketAddr,
    limit: Duration,
    until: impl Fn(&str) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if until(&get(addr, "/").await.node()) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// The last time within `window` that node `id` served a request, sending
/// one every 20 ms (round robin over two nodes reaches each every other one).
async fn last_seen(addr: SocketAddr, id: &str, window: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < window {
        if get(addr, "/").await.node() == id {
            last = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

#[tokio::test]
async fn failing_liveness_takes_a_node_out_within_fall_intervals_and_rise_brings_it_back() {
    let (interval, rise, fall) = (Duration::from_millis(300), 2u32, 2u32);
    let nodes = sim_nodes(&["node-a", "node-b"]).await;
    let lb = listener_addr(18080);
    let amslb = Amslb::start(
        &origin_config(lb, &nodes, &health(300, 200, rise, fall)),
        &[lb],
    );
    // Both nodes serve to begin with.
    assert!(
        poll_until(lb, Duration::from_secs(2), |n| n == "node-a")
            .await
            .is_some()
    );

    nodes[0].set_liveness(503);
    let bound = interval.mul_f64(f64::from(fall + 1) * 1.05) + SLACK;
    let last = last_seen(lb, "node-a", bound + Duration::from_millis(800)).await;
    eprintln!("node-a last served {last:?} after liveness 503 (bound {bound:?})");
    assert!(
        last.is_none_or(|t| t <= bound),
        "node-a still served {last:?} after its liveness turned 503 (bound {bound:?})"
    );
    assert!(get(lb, "/").await.node() == "node-b");

    nodes[0].set_liveness(200);
    let back = poll_until(lb, Duration::from_secs(5), |n| n == "node-a").await;
    let back = back.expect("node-a never came back");
    eprintln!("node-a back after {back:?}");
    let lower = interval.mul_f64(f64::from(rise - 1) * 0.95);
    let upper = interval.mul_f64(f64::from(rise + 1) * 1.05) + SLACK;
    assert!(
        (lower..=upper).contains(&back),
        "node-a came back after {back:?}, expected {lower:?}..={upper:?}"
    );

    // Each change is logged once, with its reason; probes in between are not.
    let log = amslb.log();
    let down: Vec<_> = log.lines().filter(|l| l.contains("node down")).collect();
    let up: Vec<_> = log.lines().filter(|l| l.contains("node up")).collect();
    assert_eq!(down.len(), 1, "{log}");
    assert_eq!(up.len(), 1, "{log}");
    assert!(
        down[0].contains("node-a") && down[0].contains("status 503"),
        "{}",
        down[0]
    );
    assert!(up[0].contains("2 consecutive good checks"), "{}", up[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_does_not_stall_the_checks_of_others() {
    let nodes = sim_nodes(&["hung", "flaky", "steady"]).await;
    let (hung, flaky) = (&nodes[0], &nodes[1]);
    hung.set_mode(Mode::Hang);
    // The timeout is longer than the interval: the worst case for pile-ups.
    let (interval, timeout, fall) = (
        Duration::from_millis(200),
        Duration::from_millis(1000),
        2u32,
    );
    let lb = InProcess::start(&origin_config(
        listener_addr(18080),
        &nodes,
        &health(200, 1000, 2, fall),
    ));
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    flaky.set_liveness(503);
    let flipped = Instant::now();
    let bound = interval.mul_f64(f64::from(fall + 1) * 1.05) + SLACK;
    while lb.node("flaky").is_healthy() {
        assert!(
            flipped.elapsed() <= bound,
            "flaky not marked down within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The hung node goes down after `fall` timeouts, one probe at a time.
    while lb.node("hung").is_healthy() {
        assert!(
            started.elapsed() <= timeout * (fall + 1) + interval + SLACK,
            "hung node not marked down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(lb.node("steady").is_healthy());
    let history = lb.runtime.health.history("hung");
    assert!(history.len() >= 2, "{history:?}");
    assert!(
        history
            .iter()
            .all(|c| c.outcome == amslb::health::Outcome::Timeout)
    );
    let elapsed = started.elapsed();
    assert!(
        history.len() as u32 <= (elapsed.as_millis() / timeout.as_millis()) as u32 + 1,
        "{} probes of the hung node in {elapsed:?}: they piled up",
        history.len()
    );
    for pair in history.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at).unwrap();
        assert!(gap >= timeout.mul_f64(0.9), "probes {gap:?} apart overlap");
    }
    // Meanwhile the steady node kept its own cadence.
    let steady_checks = lb.runtime.health.history("steady").len() as f64;
    let expected = elapsed.as_secs_f64() / interval.as_secs_f64();
    assert!(
        steady_checks >= expected * 0.6,
        "{steady_checks} checks in {elapsed:?}"
    );
    // And traffic only reaches the one node left.
    for _ in 0..6 {
        assert_eq!(get(lb.addr, "/").await.node(), "steady");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_keeps_its_tunnels_and_sticky_clients_but_gets_no_new_ones() {
    let nodes = sim_nodes(&["node-a", "node-b"]).await;
    let lb = InProcess::start(&origin_config(
        listener_addr(18080),
        &nodes,
        "[sticky]\nmode = \"insert\"\n",
    ));
    let first = get_cookie(lb.addr, "/", None).await;
    let drained = first.node();
    let set = first.headers["set-cookie"].to_str().unwrap();
    let cookie = set.split(';').next().unwrap().to_string();

    let mut request = format!("ws://{}/WebRTCAppEE/websocket", lb.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("cookie", cookie.parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["x-node-id"], drained.as_str());
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));

    lb.node(&drained).set_draining(true);

    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("after"),
        "the open tunnel survives the drain"
    );
    for _ in 0..20 {
        let sticky = get_cookie(lb.addr, "/", Some(&cookie)).await;
        assert_eq!(sticky.node(), drained, "sticky clients stay");
        assert!(sticky.headers.get("set-cookie").is_none());
        let fresh = get_cookie(lb.addr, "/", None).await;
        assert_ne!(fresh.node(), drained, "new clients go elsewhere");
    }
    let (_, response) =
        tokio_tungstenite::connect_async(format!("ws://{}/WebRTCAppEE/websocket", lb.addr))
            .await
            .unwrap();
    assert_ne!(
        response.headers()["x-node-id"],
        drained.as_str(),
        "no new tunnels"
    );
    assert_eq!(
        lb.runtime.sticky.redispatches(),
        0,
        "draining is not a redispatch"
    );
}

#[tokio::test]
async fn drain_in_config_keeps_new_sessions_off_the_node() {
    let nodes = sim_nodes(&["node-a", "node-b"]).await;
    let lb = listener_addr(18080);
    let text = one_listener_config(
        lb,
        &[
            (&nodes[0], "origin", "drain = true"),
            (&nodes[1], "origin", ""),
        ],
        "",
    );
    let _amslb = Amslb::start(&text, &[lb]);
    for _ in 0..10 {
        assert_eq!(get(lb, "/").await.node(), "node-b");
    }
    assert!(nodes[0].seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_coming_back_slow_starts() {
    let nodes = sim_nodes(&["node-a", "node-b"]).await;
    let lb = InProcess::start(&origin_config(
        listener_addr(18080),
        &nodes,
        &format!("{}slow_start = \"3s\"\n", health(100, 100, 1, 1)),
    ));
    let a = lb.node("node-a");
    nodes[0].set_liveness(503);
    while a.is_healthy() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nodes[0].set_liveness(200);
    while !a.is_healthy() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let share =
        |n: usize, ids: Vec<String>| ids.iter().filter(|i| *i == "node-a").count() * 100 / n;
    let mut early = Vec::new();
    for _ in 0..40 {
        early.push(get(lb.addr, "/").await.node());
    }
    assert!(share(40, early.clone()) <= 25, "ramp start: {early:?}");
    while a.weight() < amslb::cluster::FULL_WEIGHT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut late = Vec::new();
    for _ in 0..40 {
        late.push(get(lb.addr, "/").await.node());
    }
    assert!(
        (35..=65).contains(&share(40, late.clone())),
        "after the ramp: {late:?}"
    );
}

#[tokio::test]
async fn passive_failures_take_a_node_out_before_the_probes_and_backoff_delays_its_return() {
    let (interval, backoff) = (Duration::from_millis(500), Duration::from_millis(1500));
    let mut nodes = sim_nodes(&["node-a", "node-b"]).await;
    let lb = listener_addr(18080);
    let extra = format!(
        "{}passive_failures = 2\npassive_backoff = \"1500ms\"\n",
        health(500, 200, 1, 3)
    );
    let amslb = Amslb::start(&origin_config(lb, &nodes, &extra), &[lb]);
    let a_addr = nodes[0].addr;
    nodes[0].stop();
    let stopped = Instant::now();
    for _ in 0..4 {
        assert_eq!(
            get(lb, "/").await.node(),
            "node-b",
            "retried on the live node"
        );
    }
    // Three probe failures at 500 ms would take 1.5 s; traffic did it first.
    let mut log = amslb.log();
    while !log.contains("node down") {
        assert!(
            stopped.elapsed() < interval * 2,
            "no passive mark-down:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        log = amslb.log();
    }
    assert!(log.contains("consecutive failures on traffic"), "{log}");

    nodes[0] = SimNode::start("node-a", a_addr).await.unwrap();
    let back = poll_until(lb, Duration::from_secs(5), |n| n == "node-a").await;
    assert!(back.is_some(), "node-a never came back");
    let back = stopped.elapsed();
    eprintln!("node-a back {back:?} after the passive mark-down");
    let upper = backoff + interval.mul_f64(2.1) + SLACK;
    assert!(
        back >= backoff.mul_f64(0.9) && back <= upper,
        "back after {back:?}, expected {backoff:?}..={upper:?}"
    );
}

#[tokio::test]
async fn tcp_checks_connect_to_the_rtmp_port() {
    let open = tokio::net::TcpListener::bind((unique_loopback(), 0))
        .await
        .unwrap();
    let addr = open.local_addr().unwrap();
    let node = |port: u16| {
        Node::new(amslb::cluster::NodeSpec {
            id: "rtmp".into(),
            group: "ingest".into(),
            addr: addr.ip(),
            http_port: 5080,
            rtmp_port: port,
            srt_port: 4200,
            drain: false,
            region: None,
        })
    };
    let config = amslb::config::health::HealthConfig::default();
    let kind = amslb::health::CheckKind::Tcp;
    let up = amslb::health::probe(kind, &node(addr.port()), &config, &Default::default()).await;
    assert_eq!(up, amslb::health::Outcome::Ok);
    drop(open);
    let down = amslb::health::probe(kind, &node(addr.port()), &config, &Default::default()).await;
    assert!(
        matches!(down, amslb::health::Outcome::Io(ref e) if e.contains("connect")),
        "{down:?}"
    );
}
