//! The stats listener on a real socket: auth over HTTP, a real Prometheus
//! scraping it (PromQL on known counts), and `promtool check metrics`.

mod ops_support;

use amslb::cluster::{Cluster, NodeSpec};
use amslb::config::ops::StatsConfig;
use amslb::metrics::Metrics;
use amslb::stats::{Control, StatsState, auth::Access, serve};
use futures_util::future::BoxFuture;
use ops_support::*;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct NoReload;

impl Control for NoReload {
    fn reload(&self) -> BoxFuture<'static, Result<String, String>> {
        Box::pin(async { Err("not wired in this test".into()) })
    }
    fn groups(&self) -> Vec<String> {
        vec!["origin".into(), "edge".into()]
    }
}

struct Stats {
    addr: String,
    metrics: Arc<Metrics>,
    cluster: Arc<Cluster>,
    _stop: tokio_util::sync::DropGuard,
}

async fn start_stats(config: &str) -> Stats {
    let cluster = Arc::new(Cluster::new());
    let spec = |id: &str, group: &str, octet: u8| NodeSpec {
        id: id.into(),
        group: group.into(),
        addr: [127, 0, 9, octet].into(),
        http_port: 5080,
        rtmp_port: 1935,
        drain: false,
    };
    cluster.update(vec![
        spec("o1", "origin", 1),
        spec("e1", "edge", 2),
        spec("e2", "edge", 3),
    ]);
    let metrics = Arc::new(Metrics::new(cluster.clone()).unwrap());
    let config: StatsConfig = toml::from_str(config).unwrap();
    let access = Access::from_config(&config).unwrap();
    let state = Arc::new(StatsState::new(
        metrics.clone(),
        cluster.clone(),
        access,
        Arc::new(NoReload),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, state, stop.clone()));
    Stats {
        addr,
        metrics,
        cluster,
        _stop: stop.drop_guard(),
    }
}

/// Sends known traffic through the metrics API: 3 requests on o1, 4 on e1, 2 on e2 (one 5xx).
fn known_traffic(s: &Stats) {
    let snap = s.cluster.snapshot();
    let l = s.metrics.listener("main");
    for (id, n, status) in [
        ("o1", 3, 200),
        ("e1", 4, 200),
        ("e2", 1, 200),
        ("e2", 1, 502),
    ] {
        let node = s.metrics.node(snap.node(id).unwrap());
        for _ in 0..n {
            l.request_done(
                "hls",
                Some(&node),
                status,
                Duration::from_millis(3),
                100,
                1000,
            );
        }
    }
}

const AUTH: &str = "user = \"admin\"\npassword = \"s3cret\"\nallow = [\"127.0.0.0/8\"]";

#[tokio::test]
async fn auth_over_the_wire_401_403_200() {
    let s = start_stats(AUTH).await;
    let url = format!("http://{}/metrics", s.addr);
    let a = http("GET", &url, None).await;
    assert_eq!(a.status, 401);
    assert!(
        a.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic realm=\"amslb\"")
    );
    assert_eq!(
        http("GET", &url, Some(("admin", "wrong"))).await.status,
        401
    );
    let ok = http("GET", &url, Some(("admin", "s3cret"))).await;
    assert_eq!(ok.status, 200);
    assert!(
        ok.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    assert!(ok.body.contains("amslb_build_info{version="));

    // Same credentials, but the client address is outside `allow`.
    let s = start_stats("user = \"admin\"\npassword = \"s3cret\"\nallow = [\"10.0.0.0/8\"]").await;
    let url = format!("http://{}/metrics", s.addr);
    assert_eq!(
        http("GET", &url, Some(("admin", "s3cret"))).await.status,
        403
    );
    let health = http("GET", &format!("http://{}/healthz", s.addr), None).await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
}

#[tokio::test]
async fn promtool_accepts_the_metrics_page() {
    let s = start_stats(AUTH).await;
    known_traffic(&s);
    s.metrics.membership_update("static", true);
    let page = http(
        "GET",
        &format!("http://{}/metrics", s.addr),
        Some(("admin", "s3cret")),
    )
    .await;
    let (ok, output) = promtool_check(&page.body);
    assert!(
        ok,
        "promtool check metrics failed:\n{output}\n--- page ---\n{}",
        page.body
    );
}

#[tokio::test]
async fn prometheus_scrapes_and_promql_counts_requests_per_group() {
    let s = start_stats(AUTH).await;
    known_traffic(&s);
    let dir = TempDir::new("prometheus");
    let (_prometheus, prom) = start_prometheus(&dir, &s.addr, ("admin", "s3cret"));
    let result = promql(
        &prom,
        "sum by (group) (amslb_node_requests_total)",
        Duration::from_secs(30),
    )
    .await;
    let per_group = |g: &str| {
        result
            .iter()
            .find(|(labels, _)| labels["group"] == g)
            .map(|(_, v)| *v)
    };
    assert_eq!(per_group("origin"), Some(3.0), "{result:?}");
    assert_eq!(per_group("edge"), Some(6.0), "{result:?}");
    let errors = promql(
        &prom,
        "sum by (node) (amslb_node_requests_total{code=\"5xx\"})",
        Duration::from_secs(10),
    )
    .await;
    let e2 = errors
        .iter()
        .find(|(l, _)| l["node"] == "e2")
        .map(|(_, v)| *v);
    assert_eq!(e2, Some(1.0), "{errors:?}");
    // The scrape itself is healthy (auth accepted).
    let up = promql(&prom, "up{job=\"amslb\"}", Duration::from_secs(10)).await;
    assert_eq!(up[0].1, 1.0);
}
