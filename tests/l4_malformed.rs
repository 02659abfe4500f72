//! Malformed and hostile starts on the RTMP listeners: random bytes, a
//! truncated handshake, a silent client. None may hang, crash or, with
//! inspection on, reach a node.

mod l4_parts;
mod support;

use l4_parts::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::unique_loopback as loopback;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 32) as u8
        })
        .collect()
}

/// Reads until the connection closes (EOF or reset); returns the bytes read
/// and how long it took, failing after `limit`.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> (usize, Duration) {
    let start = Instant::now();
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), stream.read(&mut buf))
            .await
        {
            Err(_) => panic!("connection still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return (total, start.elapsed()),
            Ok(Ok(n)) => total += n,
        }
    }
}

/// A TCP "node" that only counts the connections it gets.
async fn counting_node() -> (std::net::IpAddr, u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((loopback(), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    (addr.ip(), addr.port(), count)
}

/// C0 + C1 of a plain RTMP handshake.
fn c0_c1() -> Vec<u8> {
    let mut hs = vec![3u8];
    hs.extend(noise(1536, 7));
    hs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_are_relayed_and_the_node_closes_them() {
    let node = RtmpNode::start();
    let lb = Lb::start(&config("", "tcp", &[("o1", node.addr.ip(), 1935)])).await;
    let addr = lb.addr;
    for seed in 1..=5u64 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let _ = c.write_all(&noise(5000, seed)).await;
        until_closed(&mut c, Duration::from_secs(5)).await;
    }
    // Still serving: a real handshake through amslb gets nginx's S0+S1+S2.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(&c0_c1()).await.unwrap();
    let mut reply = vec![0u8; 1 + 1536 * 2];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply[0], 3, "S0 from nginx-rtmp");
    assert_eq!(lb.stats().connections, 6);
}

#[tokio::test]
async fn inspecting_listener_closes_random_bytes_without_reaching_a_node() {
    let (ip, port, accepted) = counting_node().await;
    let lb = Lb::start(&config("rtmp_inspect = true", "tcp", &[("o1", ip, port)])).await;
    let addr = lb.addr;
    for seed in 1..=20u64 {
        let mut data = noise(3000, seed);
        if data[0] == 3 {
            data[0] = 0x47;
        }
        let mut c = TcpStream::connect(addr).await.unwrap();
        let _ = c.write_all(&data).await;
        let (got, _) = until_closed(&mut c, Duration::from_secs(3)).await;
        assert_eq!(got, 0, "nothing may come back");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    assert_eq!(lb.stats().rejected, 20);
}

#[tokio::test]
async fn truncated_handshake_is_closed_cleanly() {
    let (ip, port, accepted) = counting_node().await;
    let lb = Lb::start(&config("rtmp_inspect = true", "tcp", &[("o1", ip, port)])).await;
    let addr = lb.addr;
    for cut in [1usize, 100, 1536] {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&c0_c1()[..cut]).await.unwrap();
        c.shutdown().await.unwrap();
        until_closed(&mut c, Duration::from_secs(3)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    // The connection's slot is released right after the socket closes.
    let start = std::time::Instant::now();
    while lb.stats().active != 0 && start.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = lb.stats();
    assert_eq!((s.rejected, s.active), (3, 0), "{s:?}");
}

#[tokio::test]
async fn silent_client_is_closed_after_the_handshake_timeout() {
    let (ip, port, accepted) = counting_node().await;
    let lb = Lb::start(&config(
        "rtmp_inspect = true\nhandshake_timeout = \"400ms\"",
        "tcp",
        &[("o1", ip, port)],
    ))
    .await;
    let mut c = TcpStream::connect(lb.addr).await.unwrap();
    let (_, after) = until_closed(&mut c, Duration::from_secs(3)).await;
    assert!(
        after >= Duration::from_millis(350),
        "closed too early: {after:?}"
    );
    assert!(after < Duration::from_secs(2), "closed too late: {after:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn no_live_node_closes_the_client_and_counts_it() {
    // Bind then drop: a port with nothing listening.
    let gone = TcpListener::bind((loopback(), 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let lb = Lb::start(&config("", "tcp", &[("dead", gone.ip(), gone.port())])).await;
    let addr = lb.addr;
    let mut c = TcpStream::connect(addr).await.unwrap();
    until_closed(&mut c, Duration::from_secs(5)).await;
    assert_eq!(lb.stats().no_node, 1);
}
