//! RTMP and RTMPS ingest through amslb's L4 listeners with real parts: ffmpeg
//! publishes, nginx-rtmp nodes record, ffprobe checks what arrived.

mod l4_parts;
mod support;

use l4_parts::*;
use std::time::{Duration, Instant};

/// 3 s at 25 fps.
const FRAMES: u64 = 75;

fn assert_recorded(node: &RtmpNode, stream: &str) {
    let (codec, w, h, frames) = probe(&node.recording(stream));
    assert_eq!((codec.as_str(), w, h), ("h264", 320, 240), "{}", node.log());
    assert_eq!(frames, FRAMES, "every frame published must arrive");
}

async fn publish_and_wait(url: String, secs: u32, format: &'static str) {
    let (ok, err) =
        blocking(move || wait_child(publish(&url, secs, format), Duration::from_secs(30))).await;
    assert!(ok, "ffmpeg publish failed: {err}");
}

/// The real binary, configured as README's RTMP example (plus the node), carries
/// an ffmpeg publish to nginx-rtmp frame for frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_publish_through_the_amslb_binary_arrives_intact() {
    let node = RtmpNode::start();
    let listen = support::listener_addr(1935);
    let text = config_on(listen, "", "tcp", &[("o1", node.addr.ip(), 1935)]);
    let amslb = support::Amslb::start(&text, &[listen]);
    publish_and_wait(format!("rtmp://{listen}/live/s1"), 3, "flv").await;
    assert_recorded(&node, "s1");
    // The session's end is logged with what it moved.
    let start = Instant::now();
    while !amslb.log().contains("session ended") {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", amslb.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(amslb.log().contains("\"o1\""), "{}", amslb.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_inspecting_listener_learns_the_publish_and_relays_intact() {
    let node = RtmpNode::start();
    let lb = Lb::start(&config(
        "rtmp_inspect = true",
        "tcp",
        &[("o1", node.addr.ip(), 1935)],
    ))
    .await;
    let addr = lb.addr;
    publish_and_wait(format!("rtmp://{addr}/live/s2"), 3, "flv").await;
    assert_recorded(&node, "s2");
    let s = lb.stats();
    assert_eq!(
        (s.connections, s.rtmp_publishes, s.rejected),
        (1, 1, 0),
        "{s:?}"
    );
    assert!(s.bytes_in > 50_000, "{s:?}");
    assert!(
        s.bytes_out > 3073,
        "node's handshake and replies came back: {s:?}"
    );
    // The session ends with the publisher: nothing left open.
    let start = Instant::now();
    while lb.stats().active != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "session still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmps_publish_is_terminated_and_relayed_plain() {
    let node = RtmpNode::start();
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    let extra = format!(
        "cert = \"{}\"\nkey = \"{}\"\nrtmp_inspect = true",
        cert.display(),
        key.display()
    );
    let lb = Lb::start(&config(&extra, "tls", &[("o1", node.addr.ip(), 1935)])).await;
    let addr = lb.addr;
    // ffmpeg does not verify the certificate by default, so a self-signed one works.
    publish_and_wait(format!("rtmps://{addr}/live/s3"), 3, "flv").await;
    assert_recorded(&node, "s3");
    assert_eq!(lb.stats().rtmp_publishes, 1);

    // Plain RTMP sent to the RTMPS port fails the handshake and is counted.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain.write_all(&[3u8; 1537]).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a client that is not TLS is closed");
    // The TLS layer drops the socket before amslb counts the failure: the
    // count can trail the close by a moment.
    let failed = "amslb_tls_handshake_failures_total{listener=\"l4\",reason=\"error\"} 1";
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lb.metrics().contains(failed) {
        assert!(Instant::now() < deadline, "{}", lb.metrics());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An RTMPS listener without its own cert/key serves the `[tls]` store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmps_listener_can_use_the_shared_certificate_store() {
    let node = RtmpNode::start();
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["live.test".into()]).unwrap();
    // A combined PEM (chain, then key), as HAProxy keeps them.
    let combined = format!(
        "{}{}",
        generated.cert.pem(),
        generated.signing_key.serialize_pem()
    );
    std::fs::write(dir.path().join("live.pem"), combined).unwrap();
    let text = format!(
        "{}\n[tls]\ncerts_dir = \"{}\"\n",
        config("", "tls", &[("o1", node.addr.ip(), 1935)]),
        dir.path().display()
    );
    let lb = Lb::start(&text).await;
    publish_and_wait(format!("rtmps://{}/live/s4", lb.addr), 3, "flv").await;
    assert_recorded(&node, "s4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_closes_the_publisher_promptly_and_next_publish_lands_on_a_live_node() {
    let mut a = RtmpNode::start();
    let mut b = RtmpNode::start();
    let lb = Lb::start(&config(
        "",
        "tcp",
        &[("a", a.addr.ip(), 1935), ("b", b.addr.ip(), 1935)],
    ))
    .await;
    let addr = lb.addr;
    let long = publish(&format!("rtmp://{addr}/live/long"), 60, "flv");
    // Wait until the publish is recording on one of the nodes.
    let start = Instant::now();
    let victim_is_a = loop {
        let size = |n: &RtmpNode| {
            std::fs::metadata(n.recording("long"))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        if size(&a) > 10_000 {
            break true;
        }
        if size(&b) > 10_000 {
            break false;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "publish never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (victim, survivor) = if victim_is_a {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    victim.kill();
    let killed = Instant::now();
    let (ok, _) = blocking(move || wait_child(long, Duration::from_secs(10))).await;
    let closed_after = killed.elapsed();
    assert!(!ok, "publisher must see the failure");
    assert!(
        closed_after < Duration::from_secs(5),
        "publisher hung for {closed_after:?}"
    );
    // The dead node is still listed (no health check here): the connect to it
    // fails and the retry lands on the survivor, whichever the round-robin picks.
    for stream in ["after1", "after2"] {
        publish_and_wait(format!("rtmp://{addr}/live/{stream}"), 3, "flv").await;
        assert_recorded(survivor, stream);
    }
}

/// Stream-key affinity: amslb answers `connect` itself, learns the key, and
/// sends a key to the same node every time while that node lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_affinity_keeps_a_stream_key_on_its_node_until_the_node_dies() {
    let mut a = RtmpNode::start();
    let mut b = RtmpNode::start();
    let lb = Lb::start(&config(
        "rtmp_affinity = true",
        "tcp",
        &[("a", a.addr.ip(), 1935), ("b", b.addr.ip(), 1935)],
    ))
    .await;
    let addr = lb.addr;
    let has = |n: &RtmpNode, key: &str| n.recording(key).exists();
    // A full publish arrives intact through the locally answered handshake
    // and connect, and the node's own answers re-framed for the client.
    publish_and_wait(format!("rtmp://{addr}/live/k1"), 3, "flv").await;
    assert!(has(&a, "k1") != has(&b, "k1"), "exactly one node got k1");
    let home_is_a = has(&a, "k1");
    assert_recorded(if home_is_a { &a } else { &b }, "k1");
    assert_eq!(lb.stats().rtmp_publishes, 1);
    // Keys spread over both nodes, each publish landing where its key hashes.
    let keys = ["k2", "k3", "k4", "k5", "k6", "k7"];
    let publishers: Vec<_> = keys
        .iter()
        .map(|k| publish(&format!("rtmp://{addr}/live/{k}"), 1, "flv"))
        .collect();
    for p in publishers {
        let (ok, err) = blocking(move || wait_child(p, Duration::from_secs(30))).await;
        assert!(ok, "{err}");
    }
    let on_a = keys.iter().filter(|k| has(&a, k)).count();
    let on_b = keys.iter().filter(|k| has(&b, k)).count();
    assert_eq!(on_a + on_b, keys.len(), "each key on exactly one node");
    assert!(on_a > 0 && on_b > 0, "keys spread: a {on_a}, b {on_b}");
    // The same key again: the same node, and not the other.
    let (home, away) = if home_is_a { (&a, &b) } else { (&b, &a) };
    std::fs::remove_file(home.recording("k1")).unwrap();
    publish_and_wait(format!("rtmp://{addr}/live/k1"), 1, "flv").await;
    assert!(
        has(home, "k1") && !has(away, "k1"),
        "k1 went back to its node"
    );
    // Its node dies: the key moves to the survivor.
    if home_is_a {
        a.kill()
    } else {
        b.kill()
    }
    let survivor = if home_is_a { &b } else { &a };
    publish_and_wait(format!("rtmp://{addr}/live/k1"), 1, "flv").await;
    assert!(has(survivor, "k1"), "k1 moved to the live node");
}

/// An `rtmp-publish` limit counts sessions that send `publish`, on a listener
/// without `rtmp_inspect` too: connections that never publish (here bare
/// ones, and amslb's own readiness check) take nothing, two publishes pass,
/// the third is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_publish_limit_counts_only_sessions_that_publish() {
    let node = RtmpNode::start();
    let listen = support::listener_addr(1935);
    let mut text = config_on(listen, "", "tcp", &[("o1", node.addr.ip(), 1935)]);
    text.push_str(
        "\n[[limit]]\nname = \"rtmp-publishers\"\nroutes = [\"rtmp-publish\"]\nper_minute = 2\n",
    );
    let amslb = support::Amslb::start(&text, &[listen]);
    for _ in 0..5 {
        let bare = tokio::net::TcpStream::connect(listen).await.unwrap();
        drop(bare);
    }
    for stream in ["p1", "p2"] {
        publish_and_wait(format!("rtmp://{listen}/live/{stream}"), 3, "flv").await;
        assert_recorded(&node, stream);
    }
    let url = format!("rtmp://{listen}/live/p3");
    let (ok, _) =
        blocking(move || wait_child(publish(&url, 3, "flv"), Duration::from_secs(30))).await;
    assert!(!ok, "the third publish within the minute is refused");
    let log = amslb.log();
    assert!(log.contains("client over its limit, refused"), "{log}");
    let recorded = std::fs::metadata(node.recording("p3")).map_or(0, |m| m.len());
    assert!(recorded < 10_000, "p3 recorded {recorded} bytes");
}
