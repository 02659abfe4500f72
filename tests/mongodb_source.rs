//! The MongoDB membership source against a real SecantusDB server, with the
//! registry written through the official driver exactly as AMS writes it.

mod support;

use amslb::balance::pick;
use amslb::cluster::Cluster;
use amslb::cluster::mongodb::{MongoSource, spawn};
use amslb::config::{BalanceMode, ClusterConfig, parse_str};
use mongodb::bson::doc;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::secantus::{
    Secantus, ams_doc, client, cluster_toml, heartbeat, now_ms, registry, wait_until,
};
use tokio_util::sync::CancellationToken;

/// `[cluster]` for `uri` with README's example roles, plus `extra` keys.
fn cluster_config(uri: &str, extra: &str) -> ClusterConfig {
    let text = format!(
        "[[group]]\nname = \"origin\"\n[[group]]\nname = \"edge\"\nbackup = \"origin\"\n{}",
        cluster_toml(uri, "127.0.5.0/24", "127.0.6.0/24", extra)
    );
    parse_str(&text, Path::new("test.toml"))
        .unwrap()
        .config
        .cluster
}

/// A running source and what it feeds; stops the source on drop.
struct Harness {
    cluster: Arc<Cluster>,
    source: MongoSource,
    shutdown: CancellationToken,
}

impl Harness {
    fn start(cfg: &ClusterConfig) -> Self {
        let cluster = Arc::new(Cluster::new());
        let shutdown = CancellationToken::new();
        let source = spawn(cfg, cluster.clone(), shutdown.clone()).unwrap();
        Self {
            cluster,
            source,
            shutdown,
        }
    }

    fn ids(&self, group: &str) -> Vec<String> {
        self.cluster
            .snapshot()
            .group(group)
            .map(|g| g.nodes.iter().map(|n| n.id().to_string()).collect())
            .unwrap_or_default()
    }

    fn has(&self, id: &str) -> bool {
        self.cluster.snapshot().node(id).is_some()
    }

    fn usable(&self, id: &str) -> bool {
        self.cluster
            .snapshot()
            .node(id)
            .is_some_and(|n| n.is_usable())
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.source.task)
            .await
            .expect("source stops on shutdown")
            .unwrap();
    }
}

#[tokio::test]
async fn inserted_node_appears_within_a_second_via_change_stream() {
    let db = Secantus::start(&[]);
    let coll = registry(&client(&db.uri(None)).await);
    let h = Harness::start(&cluster_config(&db.uri(None), ""));
    wait_until(Duration::from_secs(10), "change stream", || {
        h.source.status.uses_change_stream()
    })
    .await;
    assert!(h.source.status.is_connected());
    assert!(h.source.status.last_success().is_some());

    let inserted = std::time::Instant::now();
    coll.insert_one(ams_doc("edge-1", "127.0.6.1", now_ms(), "5", "20"))
        .await
        .unwrap();
    wait_until(Duration::from_secs(1), "edge-1 to join", || h.has("edge-1")).await;
    println!(
        "change stream: node visible {:?} after the insert began",
        inserted.elapsed()
    );
    assert!(inserted.elapsed() < Duration::from_secs(1));
    assert_eq!(h.ids("edge"), ["edge-1"]);

    // A deletion leaves just as fast.
    coll.delete_one(doc! { "_id": "edge-1" }).await.unwrap();
    wait_until(Duration::from_secs(1), "edge-1 to leave", || {
        !h.has("edge-1")
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn broken_change_stream_is_reopened_after_a_full_read() {
    let db = Secantus::start(&[]);
    let coll = registry(&client(&db.uri(None)).await);
    coll.insert_one(ams_doc("e1", "127.0.6.1", now_ms(), "5", "20"))
        .await
        .unwrap();
    let h = Harness::start(&cluster_config(&db.uri(None), ""));
    wait_until(Duration::from_secs(10), "e1", || h.has("e1")).await;

    // Dropping the collection invalidates the stream: it cannot resume, so the
    // source re-reads (the node is gone) and opens a new stream.
    coll.drop().await.unwrap();
    wait_until(Duration::from_secs(2), "e1 to leave", || !h.has("e1")).await;
    wait_until(Duration::from_secs(2), "a new change stream", || {
        h.source.status.uses_change_stream()
    })
    .await;
    let inserted = std::time::Instant::now();
    coll.insert_one(ams_doc("e2", "127.0.6.2", now_ms(), "5", "20"))
        .await
        .unwrap();
    wait_until(Duration::from_secs(1), "e2 via the new stream", || {
        h.has("e2")
    })
    .await;
    assert!(inserted.elapsed() < Duration::from_secs(1));
    h.stop().await;
}

#[tokio::test]
async fn standalone_server_is_polled_within_poll_interval() {
    let db = Secantus::start(&["--standalone"]);
    let coll = registry(&client(&db.uri(None)).await);
    let h = Harness::start(&cluster_config(&db.uri(None), "poll_interval = \"500ms\""));
    wait_until(Duration::from_secs(10), "first read", || {
        h.source.status.is_connected()
    })
    .await;
    let inserted = std::time::Instant::now();
    coll.insert_one(ams_doc("origin-1", "127.0.5.1", now_ms(), "5", "20"))
        .await
        .unwrap();
    wait_until(Duration::from_millis(1_500), "origin-1 to join", || {
        h.has("origin-1")
    })
    .await;
    println!(
        "polling: node visible {:?} after the insert began",
        inserted.elapsed()
    );
    // poll_interval + 1 s.
    assert!(inserted.elapsed() < Duration::from_millis(1_500));
    assert!(!h.source.status.uses_change_stream());
    assert_eq!(h.ids("origin"), ["origin-1"]);
    h.stop().await;
}

#[tokio::test]
async fn node_that_stops_refreshing_leaves_after_stale_after() {
    let db = Secantus::start(&[]);
    let coll = registry(&client(&db.uri(None)).await);
    // stale_after 2 s: the skew allowance is 0.5 s, so a silent node goes at 2.5 s.
    let h = Harness::start(&cluster_config(&db.uri(None), "stale_after = \"2s\""));
    heartbeat(&coll, "e1", "127.0.6.1", "5").await.unwrap();
    heartbeat(&coll, "e2", "127.0.6.2", "5").await.unwrap();
    wait_until(Duration::from_secs(10), "both nodes", || {
        h.has("e1") && h.has("e2")
    })
    .await;

    // e1 keeps refreshing (faster than AMS's 5 s, scaled to the short stale_after); e2 stops.
    let stopped = std::time::Instant::now();
    let mut silent_for = Duration::ZERO;
    while h.usable("e2") {
        heartbeat(&coll, "e1", "127.0.6.1", "5").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        silent_for = stopped.elapsed();
        assert!(silent_for < Duration::from_secs(5), "e2 never went stale");
    }
    println!("silent node unusable after {silent_for:?}");
    assert!(silent_for >= Duration::from_secs(2), "{silent_for:?}");
    assert!(h.usable("e1"), "a refreshing node stays");
    // The stale node stays a member (keeping its state) but takes nothing new.
    let snap = h.cluster.snapshot();
    let edge = snap.group("edge").unwrap();
    for _ in 0..10 {
        assert_eq!(pick(BalanceMode::RoundRobin, edge, &[]).unwrap().id(), "e1");
    }

    // When it refreshes again it is back.
    heartbeat(&coll, "e2", "127.0.6.2", "5").await.unwrap();
    wait_until(Duration::from_secs(1), "e2 back", || h.usable("e2")).await;
    h.stop().await;
}

#[tokio::test]
async fn cidr_roles_map_origin_and_edge_and_malformed_documents_are_skipped() {
    let db = Secantus::start(&[]);
    let coll = registry(&client(&db.uri(None)).await);
    let now = now_ms();
    coll.insert_many([
        ams_doc("o1", "127.0.5.1", now, "5", "20"),
        ams_doc("o2", "127.0.5.2", now, "5", "20"),
        ams_doc("e1", "127.0.6.1", now, "5", "20"),
        // Matches no role and there is no default_group: ignored.
        ams_doc("stray", "10.1.2.3", now, "5", "20"),
        // Malformed: no ip, ip not text, host name, garbage figures.
        doc! { "_id": "no-ip", "lastUpdateTime": now },
        doc! { "_id": "num-ip", "ip": 1234, "lastUpdateTime": now },
        doc! { "_id": "host", "ip": "ams-7.internal", "lastUpdateTime": now },
        doc! { "_id": "odd", "ip": "127.0.6.9", "lastUpdateTime": now, "cpu": "lots", "memory": [1] },
        // No heartbeat at all: never fresh, so never added.
        doc! { "_id": "silent", "ip": "127.0.6.8" },
    ])
    .await
    .unwrap();
    let h = Harness::start(&cluster_config(&db.uri(None), ""));
    wait_until(Duration::from_secs(10), "first read", || h.has("o1")).await;
    assert_eq!(h.ids("origin"), ["o1", "o2"]);
    assert_eq!(h.ids("edge"), ["e1", "odd"]);
    let odd = h.cluster.snapshot().node("odd").unwrap().clone();
    assert_eq!(
        odd.reported_load(),
        Default::default(),
        "bad figures are unknown"
    );
    assert!(odd.is_usable());
    assert_eq!(h.cluster.snapshot().nodes().count(), 4);

    // A document fixed later is picked up.
    coll.update_one(
        doc! { "_id": "host" },
        doc! { "$set": { "ip": "127.0.5.3" } },
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(1), "fixed document", || h.has("host")).await;
    assert_eq!(h.ids("origin"), ["host", "o1", "o2"]);
    h.stop().await;
}

#[tokio::test]
async fn high_cpu_node_gets_no_new_sessions_while_another_has_room() {
    let db = Secantus::start(&[]);
    let coll = registry(&client(&db.uri(None)).await);
    heartbeat(&coll, "busy", "127.0.6.1", "91.5").await.unwrap();
    heartbeat(&coll, "idle", "127.0.6.2", "12").await.unwrap();
    let h = Harness::start(&cluster_config(&db.uri(None), ""));
    wait_until(Duration::from_secs(10), "both nodes", || {
        h.has("busy") && h.has("idle")
    })
    .await;
    let snap = h.cluster.snapshot();
    let edge = snap.group("edge").unwrap();
    for mode in [BalanceMode::RoundRobin, BalanceMode::LeastConn] {
        for _ in 0..20 {
            assert_eq!(pick(mode, edge, &[]).unwrap().id(), "idle", "{mode:?}");
        }
    }
    // Once the idle node is busy too, both take work again rather than none.
    heartbeat(&coll, "idle", "127.0.6.2", "88").await.unwrap();
    let idle = snap.node("idle").unwrap().clone();
    wait_until(Duration::from_secs(1), "idle node overloaded", || {
        idle.is_overloaded()
    })
    .await;
    let picked: std::collections::HashSet<_> = (0..4)
        .map(|_| {
            pick(BalanceMode::RoundRobin, edge, &[])
                .unwrap()
                .id()
                .to_string()
        })
        .collect();
    assert_eq!(picked.len(), 2, "{picked:?}");
    h.stop().await;
}

#[tokio::test]
async fn mongodb_outage_keeps_known_nodes_and_recovers() {
    let mut db = Secantus::start(&[]);
    let uri = db.uri(None);
    let coll = registry(&client(&uri).await);
    heartbeat(&coll, "e1", "127.0.6.1", "5").await.unwrap();
    let h = Harness::start(&cluster_config(&uri, "stale_after = \"2s\""));
    wait_until(Duration::from_secs(10), "e1", || h.usable("e1")).await;

    db.kill();
    wait_until(Duration::from_secs(10), "outage noticed", || {
        !h.source.status.is_connected()
    })
    .await;
    // Well past stale_after: the node stays usable, its heartbeats just cannot be seen.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(h.usable("e1"), "known node dropped during the outage");

    db.restart(&[]);
    // AMS keeps heartbeating once MongoDB is back; a new node registers too.
    heartbeat(&coll, "e1", "127.0.6.1", "5").await.unwrap();
    heartbeat(&coll, "e2", "127.0.6.2", "5").await.unwrap();
    let took = wait_until(Duration::from_secs(15), "e2 after restart", || h.has("e2")).await;
    println!("after restart: new node visible after {took:?}");
    assert!(h.source.status.is_connected());
    assert!(h.usable("e1") && h.usable("e2"));
    h.stop().await;
}

#[tokio::test]
async fn starts_while_mongodb_is_down_then_picks_up_nodes() {
    let port = support::secantus::free_port();
    let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let started = std::time::Instant::now();
    let h = Harness::start(&cluster_config(&uri, ""));
    // spawn returned at once and the (static-seeded) membership is untouched.
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(!h.source.status.is_connected());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!h.source.status.is_connected());

    let db = Secantus::start_on(port, &[]);
    let coll = registry(&client(&db.uri(None)).await);
    heartbeat(&coll, "o1", "127.0.5.1", "5").await.unwrap();
    let took = wait_until(Duration::from_secs(15), "o1", || h.has("o1")).await;
    println!("MongoDB up: node visible after {took:?}");
    assert!(h.source.status.is_connected());
    h.stop().await;
}

#[tokio::test]
async fn scram_authentication_works() {
    let db = Secantus::start_with_users(&[
        ("amslb", "amslb-pw", "read"),
        ("ams", "ams-pw", "readWrite"),
    ])
    .await;
    let writer = client(&db.uri(Some(("ams", "ams-pw")))).await;
    heartbeat(&registry(&writer), "e1", "127.0.6.1", "5")
        .await
        .unwrap();

    // Wrong password: never connects.
    let wrong = db.uri(Some(("amslb", "nope")));
    let denied = Harness::start(&cluster_config(&wrong, ""));
    let good = db.uri(Some(("amslb", "amslb-pw")));
    let h = Harness::start(&cluster_config(&good, ""));
    wait_until(Duration::from_secs(10), "e1 with auth", || h.has("e1")).await;
    assert!(h.source.status.uses_change_stream() || h.source.status.is_connected());
    assert!(!denied.source.status.is_connected());
    assert!(!denied.has("e1"));
    denied.stop().await;
    h.stop().await;
}
