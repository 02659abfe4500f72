//! L4 listeners read the live config per session: a SIGHUP reload that moves
//! the RTMP (`tcp`) and SRT (`udp`) listeners to another group sends new
//! sessions there, while a session opened before the reload keeps flowing
//! to its node. Through the real binary.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A node on `ip`: RTMP port 1935 echoes TCP bytes prefixed with its id, SRT
/// port 4200 echoes datagrams prefixed with its id.
async fn node(id: &'static str) -> IpAddr {
    let ip = unique_loopback();
    let tcp = TcpListener::bind((ip, 1935)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    let mut out = format!("{id}:").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let udp = UdpSocket::bind((ip, 4200)).await.unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let mut out = format!("{id}:").into_bytes();
            out.extend_from_slice(&buf[..n]);
            let _ = udp.send_to(&out, from).await;
        }
    });
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

/// Sends `message` on `s` and returns the answer.
async fn tcp_round(s: &mut TcpStream, message: &[u8]) -> String {
    s.write_all(message).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer in 5 s")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// One datagram from a fresh client address and the answer.
async fn udp_round(srt: SocketAddr) -> String {
    let client = UdpSocket::bind((srt.ip(), 0)).await.unwrap();
    client.send_to(b"hello", srt).await.unwrap();
    let mut buf = [0u8; 1024];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
        .await
        .expect("an answer in 5 s")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
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
    assert_eq!(tcp_round(&mut before, b"x").await, "a1:x");
    assert_eq!(udp_round(srt).await, "a1:hello");

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
    assert_eq!(tcp_round(&mut after, b"y").await, "b1:y");
    assert_eq!(udp_round(srt).await, "b1:hello");
    // The session opened before the reload is still relayed to its node.
    assert_eq!(tcp_round(&mut before, b"z").await, "a1:z");
}
