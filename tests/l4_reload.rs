//! L4 listeners read the live config per session: a SIGHUP reload that moves
//! the RTMP (`tcp`) and SRT (`udp`) listeners to another group sends new
//! sessions there, while a session opened before the reload keeps flowing
//! to its node. Through the real binary.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use support::l4_echo::{self, tcp_round, udp_round};
use support::*;
use tokio::net::TcpStream;

/// A node with L4 echo ports on a fresh loopback address.
async fn node(id: &'static str) -> IpAddr {
    let ip = unique_loopback();
    l4_echo::serve(ip, id).await;
    ip
}

fn config(
    rtmp: SocketAddr,
    srt: SocketAddr,
    stats: SocketAddr,
    group: &str,
    a: IpAddr,
    b: IpAddr,
) -> String {
    format!(
        "[health]\nenabled = false\n[stats]\nbind = \"{stats}\"\n\
         [[listener]]\nname = \"rtmp\"\nbind = [\"{rtmp}\"]\nprotocol = \"tcp\"\ndefault_group = \"{group}\"\n\
         [[listener]]\nname = \"srt\"\nbind = [\"{srt}\"]\nprotocol = \"udp\"\ndefault_group = \"{group}\"\n\
         [[group]]\nname = \"a\"\n[[group]]\nname = \"b\"\n[cluster]\n\
         [[cluster.node]]\nid = \"a1\"\naddress = \"{a}\"\ngroup = \"a\"\n\
         [[cluster.node]]\nid = \"b1\"\naddress = \"{b}\"\ngroup = \"b\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moving_the_group_applies_to_new_l4_sessions_only() {
    let (a, b) = (node("a1").await, node("b1").await);
    let ip = unique_loopback();
    let (rtmp, srt, stats) = (
        SocketAddr::new(ip, 1935),
        SocketAddr::new(ip, 4200),
        SocketAddr::new(ip, 5090),
    );
    let amslb = Amslb::start(&config(rtmp, srt, stats, "a", a, b), &[rtmp, stats]);
    let mut before = TcpStream::connect(rtmp).await.unwrap();
    assert_eq!(tcp_round(&mut before, b"x").await.unwrap(), "a1:x");
    assert_eq!(udp_round(srt).await.unwrap(), "a1:hello");

    std::fs::write(amslb.config_path(), config(rtmp, srt, stats, "b", a, b)).unwrap();
    amslb.signal("HUP");
    let start = Instant::now();
    loop {
        let page = get(stats, "/metrics").await.text();
        if page.contains("amslb_config_reloads_total{result=\"success\"} 1") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no reload: {}",
            amslb.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut after = TcpStream::connect(rtmp).await.unwrap();
    assert_eq!(tcp_round(&mut after, b"y").await.unwrap(), "b1:y");
    assert_eq!(udp_round(srt).await.unwrap(), "b1:hello");
    // The session opened before the reload is still relayed to its node.
    assert_eq!(tcp_round(&mut before, b"z").await.unwrap(), "a1:z");
}
