//! End to end: region preference and failover across two simulated
//! regions, with an amslb instance per region sharing one MongoDB (a real
//! SecantusDB). Simulated edges register themselves like AMS does; CIDR roles
//! give each region's address block its group and region.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::registry::Registration;
use support::secantus::Secantus;
use support::*;

/// Heartbeat period of the simulated nodes (AMS: 5 s against 20 s, scaled down).
const REFRESH: Duration = Duration::from_millis(300);
/// `stale_after` of both instances; amslb adds a clock-skew allowance of ¼.
const STALE_AFTER: Duration = Duration::from_secs(2);
/// What the failover may take beyond `stale_after` plus its allowance
/// (the last heartbeat, the change stream, the next pick).
const MARGIN: Duration = Duration::from_millis(2_000);

/// Three random /24 blocks of 127.0.0.0/8: the origins, region "eu"'s edges
/// and region "us"'s edges, so the roles are real subnet rules and parallel
/// tests do not collide.
struct Subnets {
    origin: [u8; 3],
    eu: [u8; 3],
    us: [u8; 3],
}

impl Subnets {
    fn new() -> Self {
        let [a, b]: [u8; 2] = rand::random();
        let (a, b) = (a.clamp(10, 250), b.min(252));
        Self {
            origin: [127, a, b],
            eu: [127, a, b + 1],
            us: [127, a, b + 2],
        }
    }
}

/// One instance's config: home region `home`, the same preference list
/// everywhere, a play listener on `play` (group "edge", backed by "origin"),
/// membership from MongoDB at `uri` with one role per address block.
fn config(home: &str, play: SocketAddr, uri: &str, nets: &Subnets) -> String {
    format!(
        r#"
[global]
region = "{home}"
region_preference = ["eu", "us"]

[timeouts]
connect = "1s"
server = "2s"

[[listener]]
name = "play"
bind = ["{play}"]
protocol = "http"
default_group = "edge"

[[group]]
name = "origin"

[[group]]
name = "edge"
balance = "round-robin"
backup = "origin"

[cluster]
source = "mongodb"
uri = "{uri}"
stale_after = "{}s"

[[cluster.role]]
cidr = "{}"
group = "origin"

[[cluster.role]]
cidr = "{}"
group = "edge"
region = "eu"

[[cluster.role]]
cidr = "{}"
group = "edge"
region = "us"
"#,
        STALE_AFTER.as_secs(),
        cidr(nets.origin),
        cidr(nets.eu),
        cidr(nets.us),
    )
}

/// The nodes that answer `n` HLS play requests (distinct streams) on `addr`;
/// a failed request counts as "".
async fn answers(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for stream in 0..n {
        let path = format!("/LiveApp/streams/s{stream}_adaptive.m3u8");
        let fetched = get(addr, &path).await;
        ids.push(if fetched.status == 200 {
            fetched.node()
        } else {
            String::new()
        });
    }
    ids
}

fn distinct(ids: &[String]) -> HashSet<&str> {
    ids.iter().map(String::as_str).collect()
}

/// Waits (at most `limit`) until `n` requests on `addr` all land on nodes of
/// `region`; every answer on `other` meanwhile must stay in `other_region`.
/// Returns how long it took.
async fn wait_for_region(
    addr: SocketAddr,
    region: &str,
    other: SocketAddr,
    other_region: &str,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let seen = answers(addr, 4).await;
        if seen.iter().all(|id| id.starts_with(region)) {
            return start.elapsed();
        }
        let unaffected = answers(other, 2).await;
        assert!(
            unaffected.iter().all(|id| id.starts_with(other_region)),
            "the {other_region} instance strayed: {unaffected:?}"
        );
        assert!(
            start.elapsed() < limit,
            "still {seen:?} on the {region} side after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn each_instance_prefers_its_region_and_fails_over_to_the_other() {
    let started = Instant::now();
    let db = Secantus::start(&[]);
    let uri = db.uri(None);
    let nets = Subnets::new();
    let origin = sim_node_in(nets.origin, 1, "origin-1").await;
    let eu = [
        sim_node_in(nets.eu, 1, "eu-edge-1").await,
        sim_node_in(nets.eu, 2, "eu-edge-2").await,
    ];
    let us = [
        sim_node_in(nets.us, 1, "us-edge-1").await,
        sim_node_in(nets.us, 2, "us-edge-2").await,
    ];
    let _origin_reg = origin.register(&uri, REFRESH).await;
    let eu_regs: Vec<Registration> = vec![
        eu[0].register(&uri, REFRESH).await,
        eu[1].register(&uri, REFRESH).await,
    ];
    let _us_regs: Vec<Registration> = vec![
        us[0].register(&uri, REFRESH).await,
        us[1].register(&uri, REFRESH).await,
    ];

    // One amslb per region, same MongoDB, same config but the home region.
    let (eu_lb, us_lb) = (listener_addr(18090), listener_addr(18090));
    let launched = Instant::now();
    let _eu_amslb = Amslb::start(&config("eu", eu_lb, &uri, &nets), &[eu_lb]);
    let _us_amslb = Amslb::start(&config("us", us_lb, &uri, &nets), &[us_lb]);
    let limit = Duration::from_secs(5);
    wait_for_region(eu_lb, "eu-", us_lb, "", limit).await;
    wait_for_region(us_lb, "us-", eu_lb, "eu-", limit).await;
    println!(
        "both instances serve their region {:?} after launch",
        launched.elapsed()
    );

    // Each instance plays from its home region only, spread over its edges,
    // never from the other region nor the origin backup.
    let eu_edges = HashSet::from(["eu-edge-1", "eu-edge-2"]);
    let us_edges = HashSet::from(["us-edge-1", "us-edge-2"]);
    assert_eq!(distinct(&answers(eu_lb, 8).await), eu_edges);
    assert_eq!(distinct(&answers(us_lb, 8).await), us_edges);

    // The eu edges go silent (hung AMS: still listening, no more heartbeats).
    // Only their staleness in the shared registry can move the eu instance.
    for reg in &eu_regs {
        reg.stop_refreshing();
    }
    let silent = Instant::now();
    let allowance = STALE_AFTER + STALE_AFTER / 4;
    let took = wait_for_region(eu_lb, "us-", us_lb, "us-", allowance + MARGIN).await;
    println!("eu instance failed over to us {took:?} after the eu heartbeats stopped");
    assert!(
        silent.elapsed() >= STALE_AFTER - REFRESH,
        "failed over after {:?}, before the eu edges could be stale",
        silent.elapsed()
    );
    assert_eq!(distinct(&answers(eu_lb, 8).await), us_edges);
    assert_eq!(distinct(&answers(us_lb, 8).await), us_edges);

    // Heartbeats resume: the eu instance returns home.
    for reg in &eu_regs {
        reg.resume_refreshing();
    }
    let took = wait_for_region(eu_lb, "eu-", us_lb, "us-", Duration::from_secs(4)).await;
    println!("eu instance back on eu {took:?} after the heartbeats resumed");
    assert_eq!(distinct(&answers(eu_lb, 8).await), eu_edges);

    // The whole eu region dies: no heartbeats and nothing listening. Refused
    // connections are redispatched at once (`retries`), in region order, so
    // this takes far less than stale_after; after it the edges are stale too.
    for (reg, node) in eu_regs.iter().zip(&eu) {
        reg.stop_refreshing();
        node.stop();
    }
    let took = wait_for_region(eu_lb, "us-", us_lb, "us-", allowance + MARGIN).await;
    println!("eu instance on us {took:?} after the eu region died");
    // Past staleness too, every request succeeds on a us edge.
    tokio::time::sleep(allowance.saturating_sub(took)).await;
    assert_eq!(distinct(&answers(eu_lb, 8).await), us_edges);
    assert_eq!(distinct(&answers(us_lb, 8).await), us_edges);
    println!("whole test took {:?}", started.elapsed());
}
