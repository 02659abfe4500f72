//! Hardening against hostile clients and broken nodes, through the real
//! amslb binary: client faults never count against a node, slow readers are
//! bounded and timed out, HTTP/2 connections and streams have idle limits,
//! `timeouts.server` covers the node and not the upload, Host confusion is
//! refused or resolved, and malformed node responses never reach a client
//! half-framed. (The smuggling, 4xx and stats-auth tests live in core.rs,
//! stats_listener.rs and ops.rs.)

mod support;
mod tls_support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One `http` listener in front of `nodes` (all in `origin`), with the given
/// client/server timeouts and `health` lines added to `[health]`.
fn config(
    listener: SocketAddr,
    nodes: &[(&str, SocketAddr)],
    client: &str,
    server: &str,
    health: &str,
) -> String {
    let mut text = format!(
        r#"
[timeouts]
connect = "1s"
client = "{client}"
server = "{server}"

[health]
{health}

[[listener]]
name = "http"
bind = ["{listener}"]
protocol = "http"
default_group = "origin"

[[group]]
name = "origin"

[cluster]
source = "static"
"#
    );
    for (id, addr) in nodes {
        text.push_str(&format!(
            "\n[[cluster.node]]\nid = \"{id}\"\naddress = \"{}\"\ngroup = \"origin\"\nhttp_port = {}\n",
            addr.ip(),
            addr.port()
        ));
    }
    text
}

/// Writes `bytes` on a new connection and reads the answer until the server
/// closes or `wait` passes.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A node that answers each request with fixed bytes chosen by its path and
/// never closes first (so a stall is a stall, not a close).
/// `GET /rest/v2/liveness` (the probe) gets a plain 200.
async fn raw_node(answers: &'static [(&'static str, &'static [u8])]) -> SocketAddr {
    let mut bound = None;
    for _ in 0..20 {
        if let Ok(l) = TcpListener::bind(SocketAddr::new(unique_loopback(), 5080)).await {
            bound = Some(l);
            break;
        }
    }
    let listener = bound.expect("a loopback address for the raw node");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Keep-alive: amslb may send the next request on this
                // connection once an answer is complete.
                loop {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let answer = answers.iter().find(|(p, _)| *p == path).map_or(
                        &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"[..],
                        |a| a.1,
                    );
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn node_went_down(amslb: &Amslb) -> bool {
    amslb.log().contains("node down")
}

#[tokio::test]
async fn client_faults_never_take_the_node_down() {
    let node = sim_node("origin-1").await;
    let lb = listener_addr(18080);
    let text = config(lb, &[("origin-1", node.addr)], "2s", "1s", "");
    let amslb = Amslb::start(&text, &[lb]);

    // Aborted uploads: the client promises 1000 bytes, sends 10 and leaves.
    for _ in 0..4 {
        let mut s = TcpStream::connect(lb).await.unwrap();
        s.write_all(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nonly-ten-b")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s);
    }
    // A malformed chunked body is the client's error: 400, not 502.
    for _ in 0..3 {
        let answer = raw_exchange(
            lb,
            b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    // An upload that stops half-way gets 408 after timeouts.client.
    for _ in 0..3 {
        let started = Instant::now();
        let answer = raw_exchange(
            lb,
            b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nonly-ten-b",
            Duration::from_secs(6),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(1900));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Other clients are unaffected.
    for _ in 0..5 {
        let r = get(lb, "/rest/v2/version").await;
        assert_eq!(
            (r.status, r.node().as_str()),
            (200, "origin-1"),
            "{}",
            r.text()
        );
    }
    assert!(!node_went_down(&amslb), "{}", amslb.log());
}

/// Sends a `size`-byte upload in `pieces` parts spaced by `gap`, then reads the answer.
async fn slow_upload(addr: SocketAddr, pieces: usize, gap: Duration) -> String {
    let size = pieces * 100;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..pieces {
        tokio::time::sleep(gap).await;
        s.write_all(&[b'u'; 100]).await.unwrap();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn server_timeout_starts_when_the_request_was_sent() {
    let node = sim_node("origin-1").await;
    let lb = listener_addr(18080);
    let text = config(lb, &[("origin-1", node.addr)], "5s", "1s", "");
    let amslb = Amslb::start(&text, &[lb]);
    // Three uploads of ~2.5 s each, much longer than timeouts.server (1 s),
    // but never idle for timeouts.client: all succeed, the node stays up.
    for _ in 0..3 {
        let answer = slow_upload(lb, 10, Duration::from_millis(250)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert!(!node_went_down(&amslb), "{}", amslb.log());
    // The timeout still applies to the wait for the head once the request is in.
    node.set_mode(Mode::Hang);
    let started = Instant::now();
    let r = get(lb, "/rest/v2/version").await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(3));
}

const STALL_BODY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nten bytes.";
const STALL_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
const BOTH_LENGTHS: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
const UNASKED_101: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
const BAD_CHUNK: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n";
const TWO_LENGTHS: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nok\n";
/// An answer with a second, unasked answer behind it: were the connection
/// reused, the next client would get "bogus".
const EXTRA_ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nfirst\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nbogus\n";
/// No length and no chunking: the body runs to the close, which never comes
/// here, so the client gets what there is and the connection is not reused.
const NO_FRAMING: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nunframed\n";

static ANSWERS: &[(&str, &[u8])] = &[
    ("/stall-body", STALL_BODY),
    ("/stall-head", STALL_HEAD),
    ("/both", BOTH_LENGTHS),
    ("/switch", UNASKED_101),
    ("/bad-chunk", BAD_CHUNK),
    ("/two-lengths", TWO_LENGTHS),
    ("/extra", EXTRA_ANSWER),
    ("/no-framing", NO_FRAMING),
];

#[tokio::test]
async fn a_node_stalling_mid_body_is_cut_at_the_server_timeout_and_counted() {
    let node = raw_node(ANSWERS).await;
    let lb = listener_addr(18080);
    let text = config(
        lb,
        &[("raw", node)],
        "10s",
        "1s",
        "enabled = false\npassive_failures = 1",
    );
    let amslb = Amslb::start(&text, &[lb]);
    let started = Instant::now();
    let answer = raw_exchange(
        lb,
        b"GET /stall-body HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(8),
    )
    .await;
    let waited = started.elapsed();
    // The head and the ten bytes came through; then amslb cut the stalled
    // body after timeouts.server instead of waiting for the node (60 s).
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ten bytes."), "{answer}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = amslb.log();
    assert!(
        log.contains("node down") && log.contains("response body stalled"),
        "{log}"
    );
}

#[tokio::test]
async fn bad_node_responses_are_refused_or_reframed() {
    let node = raw_node(ANSWERS).await;
    let lb = listener_addr(18080);
    let text = config(
        lb,
        &[("raw", node)],
        "10s",
        "1s",
        "enabled = false\npassive_failures = 0",
    );
    let _amslb = Amslb::start(&text, &[lb]);
    let wait = Duration::from_secs(4);

    // Content-Length next to Transfer-Encoding: the chunked body is what was
    // read, and the client gets it with framing that matches.
    let r = get(lb, "/both").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello");
    assert_ne!(
        r.headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"60"[..]),
        "{:?}",
        r.headers
    );

    // Answers refused with a 502 before any of them reaches the client.
    for (path, why) in [
        ("/switch", "a 101 to a plain GET"),
        (
            "/bad-chunk",
            "a bad chunk size before any body byte went out",
        ),
        (
            "/two-lengths",
            "two different Content-Lengths: which one frames the body is unknowable",
        ),
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(lb, request.as_bytes(), wait).await;
        assert!(answer.starts_with("HTTP/1.1 502"), "{why}: {answer}");
    }

    // Bytes after a complete answer: that connection never serves another
    // request, so no client gets an answer meant for nobody.
    for _ in 0..3 {
        assert_eq!(get(lb, "/extra").await.text(), "first\n");
        for _ in 0..3 {
            let r = get(lb, "/next").await;
            assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
        }
    }

    // A body framed by the close: streamed as it comes, its connection dropped.
    let answer = raw_exchange(
        lb,
        b"GET /no-framing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("unframed"), "{answer}");
    let r = get(lb, "/next").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));

    // A head and then nothing: 504 after timeouts.server.
    let started = Instant::now();
    let answer = raw_exchange(
        lb,
        b"GET /stall-head HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        wait,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn host_confusion_is_refused_or_resolved() {
    let node = sim_node("origin-1").await;
    let lb = listener_addr(18080);
    let text = config(lb, &[("origin-1", node.addr)], "5s", "2s", "");
    let _amslb = Amslb::start(&text, &[lb]);
    let wait = Duration::from_secs(3);

    let answer = raw_exchange(
        lb,
        b"GET /two HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        wait,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(node.seen().iter().all(|s| s.uri != "/two"));

    // Connection may not list Host away.
    let answer = raw_exchange(
        lb,
        b"GET /listed HTTP/1.1\r\nHost: a.test\r\nConnection: host, close\r\n\r\n",
        wait,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = node.seen();
    let listed = seen.iter().find(|s| s.uri == "/listed").expect("forwarded");
    assert_eq!(
        listed.headers.get("host").map(|h| h.as_bytes()),
        Some(&b"a.test"[..])
    );

    // An absolute-form target's authority wins over Host (RFC 9112 §3.2.2).
    let answer = raw_exchange(
        lb,
        b"GET http://good.test/abs HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
        wait,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = node.seen();
    let abs = seen.iter().find(|s| s.uri == "/abs").expect("forwarded");
    assert_eq!(
        abs.headers.get("host").map(|h| h.as_bytes()),
        Some(&b"good.test"[..])
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Value of the first series of `name` whose labels contain all of `labels`.
async fn metric(stats: SocketAddr, name: &str, labels: &[&str]) -> Option<f64> {
    let text = get(stats, "/metrics").await.text();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Opens a connection with a 4 KiB receive buffer that asks for a 1 GiB body
/// and never reads it.
async fn slow_reader(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(b"GET /big?bytes=1073741824 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_cost_little_memory_and_are_released_at_the_client_timeout() {
    rlimit::increase_nofile_limit(8192).unwrap();
    let node = sim_node("origin-1").await;
    let (lb, stats) = (listener_addr(18080), listener_addr(6080));
    let mut text = config(
        lb,
        &[("origin-1", node.addr)],
        "8s",
        "30s",
        "enabled = false",
    );
    text.push_str(&format!(
        "\n[global]\nmax_connections = 5000\n\n[stats]\nbind = \"{stats}\"\nallow = [\"127.0.0.0/8\"]\n"
    ));
    let amslb = Amslb::start(&text, &[lb, stats]);
    assert_eq!(get(lb, "/").await.status, 200);
    let before = rss_kib(amslb.pid());

    const READERS: usize = 300;
    let mut readers = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        readers.push(slow_reader(lb).await);
    }
    let opened = Instant::now();
    // Every reader is being served (a loaded machine may take a while) ...
    let sessions = || metric(stats, "amslb_node_active_sessions", &["origin-1"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sessions().await != Some(READERS as f64) {
        assert!(
            Instant::now() < deadline,
            "not all readers served: {:?}",
            sessions().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and every buffer on the way has filled up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = rss_kib(amslb.pid());
    let growth = peak.saturating_sub(before);
    eprintln!("{READERS} slow readers: amslb RSS {before} KiB -> {peak} KiB (+{growth} KiB)");
    assert!(
        growth < 64 * 1024,
        "{READERS} slow readers grew amslb's RSS by {growth} KiB"
    );

    // Nothing read for timeouts.client (8 s): each is closed and its node
    // connection released.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let open = sessions().await;
        if open == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still open: {open:?}\n{}",
            amslb.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("released {:?} after opening", opened.elapsed());
    assert!(
        opened.elapsed() >= Duration::from_secs(6),
        "closed before the timeout"
    );
    let open = metric(stats, "amslb_open_connections", &["listener=\"http\""]).await;
    assert_eq!(open, Some(0.0));
    drop(readers);
}

/// amslb with an `https` listener (certificate for `live.amslb.test`) and a
/// stats listener in front of `node`, `timeouts.client = "2s"`.
struct Https {
    amslb: Amslb,
    addr: SocketAddr,
    stats: SocketAddr,
    roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    _certs: tempfile::TempDir,
}

fn https(node: SocketAddr) -> Https {
    let ca = tls_support::TestCa::new();
    let certs = tls_support::tempdir("harden");
    let (cert, key) = ca.leaf(&["live.amslb.test"]);
    std::fs::write(certs.path().join("live.pem"), format!("{cert}{key}")).unwrap();
    let (addr, stats) = (listener_addr(18443), listener_addr(6080));
    let text = format!(
        r#"
[timeouts]
connect = "1s"
client = "2s"
server = "5s"

[health]
enabled = false

[[listener]]
name = "https"
bind = ["{addr}"]
protocol = "https"
default_group = "origin"

[[group]]
name = "origin"

[cluster]
source = "static"

[[cluster.node]]
id = "origin-1"
address = "{}"
group = "origin"
http_port = {}

[tls]
certs_dir = "{}"

[stats]
bind = "{stats}"
allow = ["127.0.0.0/8"]
"#,
        node.ip(),
        node.port(),
        certs.path().display()
    );
    let amslb = Amslb::start(&text, &[addr, stats]);
    Https {
        amslb,
        addr,
        stats,
        roots: vec![ca.der.clone()],
        _certs: certs,
    }
}

type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// An h2 connection to `lb`; the returned task ends when the connection closes.
async fn h2_connect(lb: &Https) -> (H2Sender, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(lb.addr).await.unwrap();
    let tls = tls_support::connector(&lb.roots, &[b"h2"])
        .connect(
            rustls::pki_types::ServerName::try_from("live.amslb.test").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

fn h2_get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("https://live.amslb.test{path}"))
        .body(Empty::new())
        .unwrap()
}

#[tokio::test]
async fn idle_h2_connections_are_closed_after_the_client_timeout() {
    let node = sim_node("origin-1").await;
    let lb = https(node.addr);
    let (mut send, conn) = h2_connect(&lb).await;
    let r = send.send_request(h2_get("/rest/v2/version")).await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.into_body().collect().await.unwrap();
    let started = Instant::now();
    // Idle: amslb says GOAWAY and closes after timeouts.client (2 s).
    tokio::time::timeout(Duration::from_secs(8), conn)
        .await
        .expect("idle h2 connection still open after 8 s")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // A connection that never sends a request at all is closed too.
    let (_send, conn) = h2_connect(&lb).await;
    tokio::time::timeout(Duration::from_secs(8), conn)
        .await
        .expect("h2 connection without a request still open after 8 s")
        .unwrap();
    drop(lb.amslb);
}

#[tokio::test]
async fn a_stalled_h2_stream_releases_its_node_after_the_client_timeout() {
    let node = sim_node("origin-1").await;
    let lb = https(node.addr);
    let (mut send, _conn) = h2_connect(&lb).await;
    // The client never reads the body, so the stream window (64 KiB) stays shut.
    let r = send
        .send_request(h2_get("/big?bytes=67108864"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sessions = || metric(lb.stats, "amslb_node_active_sessions", &["origin-1"]);
    assert_eq!(sessions().await, Some(1.0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    while sessions().await != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "node still held:\n{}",
            lb.amslb.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    // The connection itself still serves other streams.
    let other = send.send_request(h2_get("/rest/v2/version")).await.unwrap();
    assert_eq!(other.status(), 200);
    drop(r);
}

#[tokio::test]
async fn h2_authority_wins_over_a_differing_host_header() {
    let node = sim_node("origin-1").await;
    let lb = https(node.addr);
    let (mut send, _conn) = h2_connect(&lb).await;
    let request = Request::get("https://good.test/authority")
        .header("host", "evil.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = send.send_request(request).await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = node.seen();
    let got = seen
        .iter()
        .find(|s| s.uri == "/authority")
        .expect("forwarded");
    assert_eq!(
        got.headers.get_all("host").iter().collect::<Vec<_>>(),
        ["good.test"],
        "{:?}",
        got.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_sessions_own_no_datagram_buffer_and_drops_are_counted() {
    rlimit::increase_nofile_limit(8192).unwrap();
    // The node echoes every datagram, so both directions carry traffic.
    let node = tokio::net::UdpSocket::bind((unique_loopback(), 0))
        .await
        .unwrap();
    let node_addr = node.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = node.recv_from(&mut buf).await {
            let _ = node.send_to(&buf[..n], from).await;
        }
    });
    let (srt, stats) = (listener_addr(4200), listener_addr(6080));
    let text = format!(
        r#"
[health]
enabled = false

[[listener]]
name = "srt"
bind = ["{srt}"]
protocol = "udp"
default_group = "origin"
max_sessions = 1000
session_idle = "60s"

[[group]]
name = "origin"

[cluster]
source = "static"

[[cluster.node]]
id = "o1"
address = "{}"
group = "origin"
srt_port = {}

[stats]
bind = "{stats}"
allow = ["127.0.0.0/8"]
"#,
        node_addr.ip(),
        node_addr.port()
    );
    let amslb = Amslb::start(&text, &[stats]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(amslb.pid());

    // 2,000 source ports, 50 SRT-sized datagrams each: 100,000 datagrams.
    const PORTS: usize = 2000;
    let mut clients = Vec::with_capacity(PORTS);
    for _ in 0..PORTS {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(srt).await.unwrap();
        clients.push(socket);
    }
    let datagram = [0x80u8; 1316];
    for round in 0..50 {
        for client in &clients {
            let _ = client.send(&datagram).await;
        }
        if round % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(amslb.pid());
    let growth = after.saturating_sub(before);
    eprintln!("udp flood: amslb RSS {before} KiB -> {after} KiB (+{growth} KiB)");
    let open = metric(
        stats,
        "amslb_udp_dropped_datagrams_total",
        &["listener=\"srt\"", "reason=\"session_limit\""],
    )
    .await;
    assert!(
        open.is_some_and(|n| n >= 1000.0),
        "session_limit drops: {open:?}"
    );
    // 1,000 sessions at 64 KiB each were ~65 MiB; without a buffer per session
    // they cost their socket and a few hundred bytes.
    assert!(
        growth < 16 * 1024,
        "1000 udp sessions grew amslb's RSS by {growth} KiB"
    );
}
