//! Shared state across amslb instances (`[state]`): two real amslb binaries
//! on one SecantusDB, no shared directory. A drain set through one instance
//! is applied by the other within a second, with who set it; with a
//! deadline the node is out on both at the deadline while an open WebSocket
//! on it survives; a `wait` drain answers when the node is out; MongoDB down
//! keeps the last state, is logged once and exported, and resumes.
//! Heartbeats share each instance's session counts, so least-conn balances
//! over the whole deployment.

mod ops_support;
mod support;

use futures_util::{SinkExt, StreamExt};
use ops_support::http;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::secantus::Secantus;
use support::{Amslb, SimNode, get, listener_addr, sim_nodes};
use tokio_tungstenite::tungstenite::Message;

struct Instance {
    amslb: Amslb,
    http: SocketAddr,
    stats: SocketAddr,
}

fn start(name: &str, db: &Secantus, nodes: &[SimNode]) -> Instance {
    start_balancing(name, db, nodes, "round-robin")
}

fn start_balancing(name: &str, db: &Secantus, nodes: &[SimNode], balance: &str) -> Instance {
    let (http, stats) = (listener_addr(8080), listener_addr(6080));
    let mut text = format!(
        r#"
[health]
enabled = false

[stats]
bind = "{stats}"
allow = ["127.0.0.0/8"]

[state]
uri = "{uri}"
instance = "{name}"

[[listener]]
name = "http"
bind = ["{http}"]
protocol = "http"

[[group]]
name = "origin"
balance = "{balance}"

[cluster]
"#,
        uri = db.uri(None)
    );
    for node in nodes {
        text.push_str(&format!(
            "\n[[cluster.node]]\nid = \"{}\"\naddress = \"{}\"\ngroup = \"origin\"\nhttp_port = {}\n",
            node.id(),
            node.addr.ip(),
            node.addr.port()
        ));
    }
    let amslb = Amslb::start(&text, &[http, stats]);
    Instance { amslb, http, stats }
}

impl Instance {
    async fn status_node(&self, id: &str) -> Value {
        let answer = http("GET", &format!("http://{}/api/v1/status", self.stats), None).await;
        let doc: Value = serde_json::from_str(&answer.body).unwrap();
        support::status_node_entry(&doc, id)
            .unwrap_or_else(|| panic!("node {id} not on the status page: {doc}"))
    }

    /// Open sessions on n1 and n2 as this instance counts them cluster-wide.
    async fn cluster_sessions(&self) -> u64 {
        let mut total = 0;
        for id in ["n1", "n2"] {
            total += self.status_node(id).await["cluster_sessions"]
                .as_u64()
                .unwrap_or(0);
        }
        total
    }

    async fn post(&self, path: &str) -> ops_support::Answer {
        http("POST", &format!("http://{}{path}", self.stats), None).await
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = http("GET", &format!("http://{}/metrics", self.stats), None)
            .await
            .body;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

/// Polls `probe` every 25 ms until it holds; how long that took.
async fn within(limit: Duration, what: &str, mut probe: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if probe().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_through_one_instance_reaches_the_other_within_a_second() {
    let db = Secantus::start(&[]);
    let nodes = sim_nodes(&["n1", "n2"]).await;
    let a = start("A", &db, &nodes);
    let b = start("B", &db, &nodes);

    let (mut ws, drained) = open_ws(&a).await;
    echo(&mut ws, "hi").await;
    let other = nodes
        .iter()
        .find(|n| n.id() != drained)
        .unwrap()
        .id()
        .to_string();

    // Drain through A with a deadline; timed from A's answer (stored).
    let set = a
        .post(&format!("/api/v1/nodes/{drained}/drain?deadline=3s"))
        .await;
    assert_eq!(set.status, 200, "{}", set.body);
    let took = within(Duration::from_secs(3), "B applies A's drain", async || {
        b.status_node(&drained).await["draining"] == true
    })
    .await;
    eprintln!("drain set through A applied by B after {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "B applied the drain after {took:?}"
    );
    let seen_by_b = b.status_node(&drained).await;
    assert_eq!(seen_by_b["drain"]["instance"], "A", "{seen_by_b}");
    assert!(
        seen_by_b["drain"]["by"].as_str().unwrap().contains("@127."),
        "{seen_by_b}"
    );
    assert!(seen_by_b["drain"]["deadline_ms"].is_i64(), "{seen_by_b}");
    // No new session goes to the drained node through either instance.
    for lb in [&a, &b] {
        for _ in 0..6 {
            assert_eq!(get(lb.http, "/live/streams/x.m3u8").await.node(), other);
        }
    }
    // A still relays the WebSocket, so there the node is not out before the deadline.
    assert_eq!(a.status_node(&drained).await["out"], false);

    // A lifecycle hook's call: the same drain, answered once the node is out.
    let hook_started = Instant::now();
    let answer = a
        .post(&format!("/api/v1/nodes/{drained}/drain?deadline=3s&wait=1"))
        .await;
    let waited = hook_started.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(body["out"], true, "{body}");
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(6),
        "the hook answered after {waited:?}, the deadline is 3 s"
    );
    // Out on both at the deadline (B counts A's WebSocket too, so it was not out before).
    for lb in [&a, &b] {
        within(Duration::from_secs(1), "node out", async || {
            lb.status_node(&drained).await["out"] == true
        })
        .await;
    }
    // The open WebSocket survives the drain and its deadline.
    echo(&mut ws, "still here").await;

    // Undrain through B: A follows within a second.
    assert_eq!(
        b.post(&format!("/api/v1/nodes/{drained}/undrain"))
            .await
            .status,
        200
    );
    let took = within(
        Duration::from_secs(3),
        "A applies B's undrain",
        async || a.status_node(&drained).await["draining"] == false,
    )
    .await;
    assert!(
        took < Duration::from_secs(1),
        "A applied the undrain after {took:?}"
    );
    assert_eq!(a.status_node(&drained).await["out"], false);
    let _ = (&a.amslb, &b.amslb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_down_keeps_the_last_drains_and_resumes() {
    let mut db = Secantus::start(&[]);
    let nodes = sim_nodes(&["n1", "n2"]).await;
    let a = start("A", &db, &nodes);
    let b = start("B", &db, &nodes);
    assert_eq!(a.post("/api/v1/nodes/n1/drain").await.status, 200);
    within(Duration::from_secs(3), "B drains n1", async || {
        b.status_node("n1").await["draining"] == true
    })
    .await;
    assert_eq!(b.metric("amslb_shared_state_up").await, Some(1.0));

    db.kill();
    within(Duration::from_secs(15), "outage exported", async || {
        b.metric("amslb_shared_state_up").await == Some(0.0)
    })
    .await;
    // Routing goes on with the last known drains.
    for lb in [&a, &b] {
        for _ in 0..6 {
            assert_eq!(get(lb.http, "/live/streams/x.m3u8").await.node(), "n2");
        }
    }
    // A change now would reach one instance only: refused with the reason.
    let refused = b.post("/api/v1/nodes/n1/undrain").await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(b.status_node("n1").await["draining"], true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outage = "does not answer: routing goes on with the last known drains";
    assert_eq!(
        b.amslb.log().matches(outage).count(),
        1,
        "{}",
        b.amslb.log()
    );

    db.restart(&[]);
    within(Duration::from_secs(20), "state resumes", async || {
        b.metric("amslb_shared_state_up").await == Some(1.0)
    })
    .await;
    assert!(b.amslb.log().contains("answers again"), "{}", b.amslb.log());
    assert_eq!(b.post("/api/v1/nodes/n1/undrain").await.status, 200);
    within(
        Duration::from_secs(3),
        "A follows the undrain",
        async || a.status_node("n1").await["draining"] == false,
    )
    .await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends `text` and checks the node echoes it.
async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("socket open")
        .unwrap();
    assert_eq!(answer.into_text().unwrap().as_str(), text);
}

/// Opens a WebSocket through `lb`; returns it and the node that took it.
async fn open_ws(lb: &Instance) -> (Ws, String) {
    let (ws, response) =
        tokio_tungstenite::connect_async(format!("ws://{}/live/websocket", lb.http))
            .await
            .unwrap();
    let node = response.headers()["x-node-id"]
        .to_str()
        .unwrap()
        .to_string();
    (ws, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_balances_sessions_over_both_instances() {
    let mut db = Secantus::start(&[]);
    let nodes = sim_nodes(&["n1", "n2"]).await;
    let a = start_balancing("A", &db, &nodes, "least-conn");
    let b = start_balancing("B", &db, &nodes, "least-conn");

    // A takes half of the 100 sessions; then those on n2 end, leaving A
    // with 25 on n1: the skew B must see to balance.
    let mut open: Vec<(Ws, String)> = Vec::new();
    for _ in 0..50 {
        open.push(open_ws(&a).await);
    }
    let (on_n2, mut kept): (Vec<_>, Vec<_>) = open.into_iter().partition(|(_, n)| n == "n2");
    assert_eq!(
        (on_n2.len(), kept.len()),
        (25, 25),
        "A balances its own sessions"
    );
    for (mut ws, _) in on_n2 {
        ws.close(None).await.unwrap();
    }
    within(Duration::from_secs(10), "A's counts reach B", async || {
        let n1 = b.status_node("n1").await;
        let n2 = b.status_node("n2").await;
        n1["cluster_sessions"] == 25 && n2["cluster_sessions"] == 0
    })
    .await;
    let status: Value = serde_json::from_str(
        &http("GET", &format!("http://{}/api/v1/status", b.stats), None)
            .await
            .body,
    )
    .unwrap();
    assert_eq!(
        status["instances"][0]["instance"], "A",
        "B lists its live peer: {status}"
    );

    // B takes the other half, placing by the cluster-wide counts.
    let mut from_b = Vec::new();
    for _ in 0..50 {
        from_b.push(open_ws(&b).await);
    }
    let per_node = |id: &str| {
        kept.iter().filter(|(_, n)| n == id).count()
            + from_b.iter().filter(|(_, n)| n == id).count()
    };
    let (n1, n2) = (per_node("n1"), per_node("n2"));
    eprintln!(
        "cluster-wide open sessions: n1 {n1}, n2 {n2} (per-instance least-conn would give 50/25)"
    );
    // 75 open: 37.5 per node, ±10 %.
    for (id, count) in [("n1", n1), ("n2", n2)] {
        assert!(
            (34..=41).contains(&count),
            "{id} has {count} of 75 sessions (n1 {n1}, n2 {n2})"
        );
    }

    // MongoDB killed with all 75 sessions open: they go on, new sessions are
    // still placed through both instances, B falls back to its own counts,
    // the outage is logged once and exported; counts resume when it is back.
    db.kill();
    for lb in [&a, &b] {
        within(Duration::from_secs(20), "outage exported", async || {
            lb.metric("amslb_shared_state_up").await == Some(0.0)
        })
        .await;
    }
    for (ws, _) in kept.iter_mut().take(3).chain(from_b.iter_mut().take(3)) {
        echo(ws, "during the outage").await;
    }
    let mut during = vec![open_ws(&a).await, open_ws(&b).await];
    echo(&mut during[0].0, "new via A").await;
    echo(&mut during[1].0, "new via B").await;
    within(
        Duration::from_secs(10),
        "B places by its own counts",
        async || b.cluster_sessions().await == 51,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outage = "does not answer: routing goes on with the last known drains";
    for lb in [&a, &b] {
        assert_eq!(
            lb.amslb.log().matches(outage).count(),
            1,
            "{}",
            lb.amslb.log()
        );
    }
    db.restart(&[]);
    within(
        Duration::from_secs(30),
        "cluster-wide counts resume",
        async || b.cluster_sessions().await == 77,
    )
    .await;
    assert_eq!(b.metric("amslb_shared_state_up").await, Some(1.0));
    drop(kept);
    drop(from_b);
    drop(during);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_node_is_out_when_its_last_session_anywhere_ends() {
    let db = Secantus::start(&[]);
    let nodes = sim_nodes(&["n1", "n2"]).await;
    let a = start("A", &db, &nodes);
    let b = start("B", &db, &nodes);
    let (mut ws, drained) = open_ws(&a).await;
    echo(&mut ws, "hi").await;
    within(
        Duration::from_secs(10),
        "A's session reaches B",
        async || b.status_node(&drained).await["cluster_sessions"] == 1,
    )
    .await;

    // Drain without a deadline through A: B holds no session on the node,
    // but A does, so on neither instance is the node out.
    let set = a.post(&format!("/api/v1/nodes/{drained}/drain")).await;
    assert_eq!(set.status, 200, "{}", set.body);
    within(Duration::from_secs(3), "B applies the drain", async || {
        b.status_node(&drained).await["draining"] == true
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for lb in [&a, &b] {
        assert_eq!(lb.status_node(&drained).await["out"], false);
    }

    // The last session ends (on A): out on both, B after A's next heartbeat.
    ws.close(None).await.unwrap();
    drop(ws);
    for lb in [&a, &b] {
        within(Duration::from_secs(10), "node out", async || {
            lb.status_node(&drained).await["out"] == true
        })
        .await;
    }
}
