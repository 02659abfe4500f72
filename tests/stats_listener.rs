//! The stats listener on a real socket: basic auth and the address allow list
//! over the wire (the binary-level tests live in tests/ops.rs).

mod ops_support;

use amslb::cluster::Cluster;
use amslb::metrics::Metrics;
use ops_support::*;
use std::sync::Arc;

async fn start(stats_toml: &str) -> (String, tokio_util::sync::DropGuard) {
    let cluster = Arc::new(Cluster::new());
    cluster.update(vec![node_spec("o1", "origin", 1)]);
    let metrics = Arc::new(Metrics::new(cluster.clone()).unwrap());
    let (addr, guard) = serve_stats(cluster, metrics, stats_toml, &["origin"]).await;
    (addr.to_string(), guard)
}

#[tokio::test]
async fn auth_over_the_wire_401_403_200() {
    let (addr, _guard) =
        start("user = \"admin\"\npassword = \"s3cret\"\nallow = [\"127.0.0.0/8\"]").await;
    let url = format!("http://{addr}/metrics");
    let a = http("GET", &url, None).await;
    assert_eq!(a.status, 401);
    let challenge = a.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with("Basic realm=\"amslb\""),
        "{challenge}"
    );
    assert_eq!(
        http("GET", &url, Some(("admin", "wrong"))).await.status,
        401
    );
    let ok = http("GET", &url, Some(("admin", "s3cret"))).await;
    assert_eq!(ok.status, 200);
    let content_type = ok.headers["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert!(ok.body.contains("amslb_build_info{version="));

    // Right credentials, but the client address is outside `allow`.
    let (addr, _guard) =
        start("user = \"admin\"\npassword = \"s3cret\"\nallow = [\"10.0.0.0/8\"]").await;
    let url = format!("http://{addr}/metrics");
    assert_eq!(
        http("GET", &url, Some(("admin", "s3cret"))).await.status,
        403
    );
    let health = http("GET", &format!("http://{addr}/healthz"), None).await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
}
