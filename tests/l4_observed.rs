//! RTMP and SRT are visible: after an ffmpeg RTMP publish and an ffmpeg SRT
//! publish through the real `amslb` binary, a real Prometheus scrape shows the
//! sessions, the bytes and the node in `amslb_*` series, and the status page in
//! headless Chromium shows the open RTMP session on its node while it runs.

mod l4_parts;
mod ops_support;
mod support;

use l4_parts::*;
use ops_support::{TempDir, chromium, promql, start_prometheus};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Amslb, unique_loopback};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_and_srt_publishes_show_in_prometheus_and_on_the_status_page() {
    let rtmp_node = RtmpNode::start();
    let ip = rtmp_node.addr.ip();
    // The SRT side of the same node: ffmpeg as an SRT listener.
    let dir = tempfile::tempdir().unwrap();
    let srt_node = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(["-i", &format!("srt://{ip}:4200?mode=listener")])
        .args(["-c", "copy", "-f", "mpegts"])
        .arg(dir.path().join("in.ts"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ffmpeg");
    let lb_ip = unique_loopback();
    let at = |port| SocketAddr::new(lb_ip, port);
    let (rtmp, srt, stats) = (at(1935), at(4200), at(5090));
    let config = format!(
        "[health]\nenabled = false\n\
         [stats]\nbind = \"{stats}\"\nallow = [\"127.0.0.0/8\"]\n\
         [[listener]]\nname = \"rtmp\"\nbind = [\"{rtmp}\"]\nprotocol = \"tcp\"\nrtmp_inspect = true\n\
         [[listener]]\nname = \"srt\"\nbind = [\"{srt}\"]\nprotocol = \"udp\"\n\
         [[group]]\nname = \"origin\"\n\
         [cluster]\n[[cluster.node]]\nid = \"o1\"\naddress = \"{ip}\"\ngroup = \"origin\"\n"
    );
    let _amslb = Amslb::start(&config, &[rtmp, stats]);

    // A publish long enough to look at while it runs.
    let publisher = publish(&format!("rtmp://{rtmp}/live/cam1"), 12, "flv");
    let page = TempDir::new("l4-page");
    let url = format!("http://{stats}/");
    let start = Instant::now();
    loop {
        let dom = chromium(&page, &["--dump-dom".into()], &url).await;
        let row = dom
            .split("<tr ")
            .find(|r| r.contains("data-node=\"o1\""))
            .unwrap_or_default();
        if row.contains("rtmp 1") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no open RTMP session on o1's row: {row}"
        );
    }
    let (ok, err) = blocking(move || wait_child(publisher, Duration::from_secs(40))).await;
    assert!(ok, "RTMP publish failed: {err}");
    assert!(rtmp_node.recording("cam1").exists(), "{}", rtmp_node.log());

    let url = format!("srt://{srt}?streamid=live/cam2");
    let (ok, err) =
        blocking(move || wait_child(publish(&url, 3, "mpegts"), Duration::from_secs(30))).await;
    assert!(ok, "SRT publish failed: {err}");
    let _ = blocking(move || wait_child(srt_node, Duration::from_secs(15))).await;

    let prom_dir = TempDir::new("l4-prometheus");
    let (_prometheus, prom) = start_prometheus(&prom_dir, &stats.to_string(), ("u", "p"));
    let limit = Duration::from_secs(30);
    let sessions = promql(&prom, "amslb_l4_sessions_total", limit).await;
    let of = |series: &[(serde_json::Value, f64)], key: &str, value: &str| {
        series
            .iter()
            .find(|(l, _)| l[key] == value)
            .map(|(_, v)| *v)
    };
    assert_eq!(of(&sessions, "protocol", "rtmp"), Some(1.0), "{sessions:?}");
    assert_eq!(of(&sessions, "protocol", "srt"), Some(1.0), "{sessions:?}");
    let publishes = promql(&prom, "amslb_rtmp_publishes_total", limit).await;
    assert_eq!(of(&publishes, "app", "live"), Some(1.0), "{publishes:?}");
    // Media went through, counted for each listener and for the node.
    let received = promql(&prom, "amslb_received_bytes_total", limit).await;
    for listener in ["rtmp", "srt"] {
        let bytes = of(&received, "listener", listener).unwrap_or(0.0);
        assert!(bytes > 50_000.0, "{listener}: {received:?}");
    }
    let node = promql(&prom, "amslb_node_sent_bytes_total{node=\"o1\"}", limit).await;
    assert!(node[0].1 > 100_000.0, "{node:?}");
    let connections = promql(&prom, "amslb_connections_total", limit).await;
    assert_eq!(
        of(&connections, "listener", "srt"),
        Some(1.0),
        "{connections:?}"
    );
}
