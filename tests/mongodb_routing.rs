//! End to end: the real amslb binary with `source = "mongodb"`, simulated AMS
//! nodes that register themselves in a real SecantusDB like AMS does, and
//! traffic through amslb.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::registry::{AMS_REFRESH, Registration};
use support::secantus::{Secantus, cluster_toml, free_port};
use support::*;

/// Two random /24 blocks of 127.0.0.0/8, one for origins and one for edges, so
/// the CIDR roles are real subnet rules and parallel tests do not collide.
struct Subnets {
    origin: [u8; 3],
    edge: [u8; 3],
}

impl Subnets {
    fn new() -> Self {
        let [a, b]: [u8; 2] = rand::random();
        let a = a.clamp(10, 250);
        Self {
            origin: [127, a, b],
            edge: [127, a, b.wrapping_add(1)],
        }
    }
}

/// amslb config: "publish" → origin, "play" → edge (no backup, so a wrong role
/// shows), membership from MongoDB at `uri` with the two subnets as roles.
fn config(publish: SocketAddr, play: SocketAddr, uri: &str, nets: &Subnets, extra: &str) -> String {
    format!(
        "{}{}",
        front(publish, play),
        cluster_toml(uri, &cidr(nets.origin), &cidr(nets.edge), extra)
    )
}

/// The listeners and groups of [`config`], without `[cluster]`.
fn front(publish: SocketAddr, play: SocketAddr) -> String {
    format!(
        r#"
[timeouts]
connect = "1s"
server = "2s"

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

[[group]]
name = "edge"
"#
    )
}

/// The node ids that answer `n` requests on `addr` (503s count as "").
async fn answers(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(get(addr, "/LiveApp/rest/v2/version").await.node());
    }
    ids
}

/// Waits until a request on `addr` lands on `id`.
async fn wait_for_node(addr: SocketAddr, id: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if get(addr, "/LiveApp/rest/v2/version").await.node() == id {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{id} got no traffic within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn distinct(ids: &[String]) -> HashSet<&str> {
    ids.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn cidr_roles_route_origin_and_edge() {
    let db = Secantus::start(&[]);
    let nets = Subnets::new();
    let origin = sim_node_in(nets.origin, 1, "origin-1").await;
    let edges = [
        sim_node_in(nets.edge, 1, "edge-1").await,
        sim_node_in(nets.edge, 2, "edge-2").await,
    ];
    let uri = db.uri(None);
    let _regs: Vec<Registration> = vec![
        origin.register(&uri, AMS_REFRESH).await,
        edges[0].register(&uri, AMS_REFRESH).await,
        edges[1].register(&uri, AMS_REFRESH).await,
    ];
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let _amslb = Amslb::start(&config(publish, play, &uri, &nets, ""), &[publish, play]);
    wait_for_node(publish, "origin-1", Duration::from_secs(5)).await;

    assert_eq!(
        distinct(&answers(publish, 6).await),
        HashSet::from(["origin-1"])
    );
    assert_eq!(
        distinct(&answers(play, 6).await),
        HashSet::from(["edge-1", "edge-2"])
    );
}

#[tokio::test]
async fn silent_or_busy_node_gets_no_new_sessions() {
    let db = Secantus::start(&[]);
    let nets = Subnets::new();
    let edges = [
        sim_node_in(nets.edge, 1, "edge-1").await,
        sim_node_in(nets.edge, 2, "edge-2").await,
        sim_node_in(nets.edge, 3, "edge-3").await,
    ];
    let uri = db.uri(None);
    // AMS refreshes every 5 s against a 20 s limit; scaled down here to 300 ms and 2 s.
    let every = Duration::from_millis(300);
    let mut regs = Vec::new();
    for edge in &edges {
        regs.push(edge.register(&uri, every).await);
    }
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let extra = "stale_after = \"2s\"";
    let _amslb = Amslb::start(&config(publish, play, &uri, &nets, extra), &[publish, play]);
    for id in ["edge-1", "edge-2", "edge-3"] {
        wait_for_node(play, id, Duration::from_secs(5)).await;
    }

    // edge-2 reports 90 % cpu: it gets nothing while the others have room.
    regs[1].set_cpu("90");
    let start = Instant::now();
    while answers(play, 6).await.contains(&"edge-2".to_string()) {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "busy edge-2 still served"
        );
    }
    let seen = answers(play, 12).await;
    assert_eq!(
        distinct(&seen),
        HashSet::from(["edge-1", "edge-3"]),
        "{seen:?}"
    );

    // edge-3 stops refreshing: after stale_after it gets nothing either.
    regs[2].stop_refreshing();
    let stopped = Instant::now();
    while answers(play, 3).await.contains(&"edge-3".to_string()) {
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "silent edge-3 still served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("silent node out of rotation after {:?}", stopped.elapsed());
    assert!(stopped.elapsed() >= Duration::from_millis(1_700));
    assert_eq!(distinct(&answers(play, 6).await), HashSet::from(["edge-1"]));

    // It comes back when it refreshes again.
    regs[2].resume_refreshing();
    wait_for_node(play, "edge-3", Duration::from_secs(3)).await;
}

#[tokio::test]
async fn mongodb_outage_keeps_traffic_flowing_and_recovers() {
    let mut db = Secantus::start(&[]);
    let nets = Subnets::new();
    let edges = [
        sim_node_in(nets.edge, 1, "edge-1").await,
        sim_node_in(nets.edge, 2, "edge-2").await,
    ];
    let uri = db.uri(None);
    let every = Duration::from_millis(300);
    let _first = edges[0].register(&uri, every).await;
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let extra = "stale_after = \"2s\"";
    let amslb = Amslb::start(&config(publish, play, &uri, &nets, extra), &[publish, play]);
    wait_for_node(play, "edge-1", Duration::from_secs(5)).await;

    db.kill();
    // Well past stale_after: traffic keeps going to the known node.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        assert_eq!(answers(play, 1).await, ["edge-1"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = amslb.log();
    assert_eq!(
        log.matches("cannot read cluster membership").count(),
        1,
        "{log}"
    );

    db.restart(&[]);
    let _second = edges[1].register(&uri, every).await;
    let took = wait_for_node(play, "edge-2", Duration::from_secs(15)).await;
    println!("new node served {took:?} after MongoDB came back");
    assert_eq!(
        distinct(&answers(play, 6).await),
        HashSet::from(["edge-1", "edge-2"])
    );
}

#[tokio::test]
async fn starts_while_mongodb_is_down_and_picks_up_nodes() {
    let nets = Subnets::new();
    let origin = sim_node_in(nets.origin, 1, "seed").await;
    let edge = sim_node_in(nets.edge, 1, "edge-1").await;
    let port = free_port();
    let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    // The origin is also listed by hand: it serves before MongoDB answers, and
    // its entry pins id and group once MongoDB reports its address.
    let extra = format!(
        "[[cluster.node]]\nid = \"seed\"\naddress = \"{}\"\ngroup = \"origin\"",
        origin.addr.ip()
    );
    let started = Instant::now();
    let _amslb = Amslb::start(
        &config(publish, play, &uri, &nets, &extra),
        &[publish, play],
    );
    println!(
        "listening {:?} after start with MongoDB down",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(answers(publish, 3).await, ["seed"; 3]);
    assert_eq!(get(play, "/LiveApp/streams/s1.m3u8").await.status, 503);

    let db = Secantus::start_on(port, &[]);
    let _regs = [
        origin.register(&uri, AMS_REFRESH).await,
        edge.register(&uri, AMS_REFRESH).await,
    ];
    let took = wait_for_node(play, "edge-1", Duration::from_secs(15)).await;
    println!("registered node served {took:?} after MongoDB started");
    assert_eq!(answers(publish, 3).await, ["seed"; 3]);
    drop(db);
}

#[tokio::test]
async fn scram_credentials_work_and_never_reach_the_log() {
    let db = Secantus::start_with_users(&[
        ("amslb", "s3cret-amslb", "read"),
        ("ams", "s3cret-ams", "readWrite"),
    ])
    .await;
    let nets = Subnets::new();
    let edge = sim_node_in(nets.edge, 1, "edge-1").await;
    let _reg = edge
        .register(&db.uri(Some(("ams", "s3cret-ams"))), AMS_REFRESH)
        .await;

    // Wrong password: amslb serves, logs the failure once, and no password.
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let wrong = db.uri(Some(("amslb", "s3cret-wrong")));
    let denied = Amslb::start(&config(publish, play, &wrong, &nets, ""), &[publish, play]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(get(play, "/LiveApp/streams/s1.m3u8").await.status, 503);
    let log = denied.log();
    assert_eq!(
        log.matches("cannot read cluster membership").count(),
        1,
        "{log}"
    );
    assert!(log.contains("uthentication"), "{log}");
    assert!(!log.contains("s3cret"), "{log}");

    // Right password: the registered node serves.
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let good = db.uri(Some(("amslb", "s3cret-amslb")));
    let amslb = Amslb::start(&config(publish, play, &good, &nets, ""), &[publish, play]);
    wait_for_node(play, "edge-1", Duration::from_secs(5)).await;
    assert!(!amslb.log().contains("s3cret"));
}

/// AMS writes `AMS_HOST_ADDRESS` into `clusternode.ip`, often a host name:
/// amslb resolves it (`localhost` here, answered without DNS) and maps roles by
/// host-name pattern and by document id, with no CIDR rule at all.
#[tokio::test]
async fn host_name_addresses_resolve_and_roles_match_by_host_and_id() {
    let db = Secantus::start(&[]);
    let uri = db.uri(None);
    // The edge registers as `localhost`, on a port of its own on 127.0.0.1;
    // every node of the cluster uses that port, as in AMS.
    let edge = SimNode::start("edge-by-name", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let port = edge.addr.port();
    let origin = SimNode::start("origin-7", SocketAddr::new(unique_loopback(), port))
        .await
        .unwrap();
    let _regs = [
        edge.register_as(&uri, AMS_REFRESH, "localhost").await,
        origin.register(&uri, AMS_REFRESH).await,
    ];
    let (publish, play) = (listener_addr(18080), listener_addr(18081));
    let config = format!(
        r#"{}
[cluster]
source = "mongodb"
uri = "{uri}"
http_port = {port}

[[cluster.role]]
host = "local*"
group = "edge"

[[cluster.role]]
id = "origin-*"
group = "origin"
"#,
        front(publish, play)
    );
    let amslb = Amslb::start(&config, &[publish, play]);
    wait_for_node(play, "edge-by-name", Duration::from_secs(5)).await;
    wait_for_node(publish, "origin-7", Duration::from_secs(5)).await;
    assert_eq!(
        distinct(&answers(play, 4).await),
        HashSet::from(["edge-by-name"])
    );
    assert_eq!(
        distinct(&answers(publish, 4).await),
        HashSet::from(["origin-7"])
    );
    let log = amslb.log();
    assert!(
        log.contains("node host name resolved") && log.contains("localhost"),
        "{log}"
    );
}
