//! The status page rendered by a real headless Chromium: the DOM after the
//! page's script ran shows every node with its state, and a screenshot is taken.

mod ops_support;

use amslb::cluster::Cluster;
use amslb::metrics::Metrics;
use ops_support::*;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_nodes_and_states() {
    let cluster = Arc::new(Cluster::new());
    cluster.update(vec![
        node_spec("origin-1", "origin", 1),
        node_spec("edge-1", "edge", 2),
        node_spec("edge-2", "edge", 3),
    ]);
    let snap = cluster.snapshot();
    snap.node("edge-2").unwrap().set_draining(true);
    snap.node("origin-1").unwrap().set_healthy(false);
    let metrics = Arc::new(Metrics::new(cluster.clone()).unwrap());
    let edge1 = metrics.node(snap.node("edge-1").unwrap());
    edge1.health_check(true, Duration::from_millis(2));
    metrics.listener("play").request_done(
        "hls",
        Some(&edge1),
        200,
        Duration::from_millis(1),
        10,
        10,
    );

    // The page is opened from loopback, which `allow` admits without credentials.
    let (addr, _guard) = serve_stats(
        cluster.clone(),
        metrics,
        "allow = [\"127.0.0.0/8\"]",
        &["origin", "edge", "spare"],
    )
    .await;
    let url = format!("http://{addr}/");

    let dir = TempDir::new("chromium");
    let dom = chromium(&dir, &["--dump-dom".into()], &url).await;
    for (node, state) in [
        ("origin-1", "down"),
        ("edge-1", "up"),
        ("edge-2", "draining"),
    ] {
        let row = format!("data-node=\"{node}\" data-state=\"{state}\"");
        assert!(dom.contains(&row), "DOM lacks {row}:\n{dom}");
    }
    assert!(dom.contains("Group spare"), "empty group not shown");
    assert!(dom.contains("no node in this group"));
    assert!(dom.contains(">play<"), "listener row missing");
    // The error banner stays hidden: every fetch of the JSON succeeded.
    assert!(
        dom.contains("<div id=\"banner\" role=\"alert\"></div>"),
        "error banner shown:\n{dom}"
    );

    let shot = dir.path().join("status.png");
    chromium(
        &dir,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=412,915".into(),
        ],
        &url,
    )
    .await;
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(
        png.len() > 10_000,
        "screenshot suspiciously small: {} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("AMSLB_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}
