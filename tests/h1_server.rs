//! amslb's own HTTP/1.1 server loop (`http::h1`), through the real binary:
//! pipelined requests are answered one each and in order, a connection whose
//! request the loop does not take (a body, odd framing) moves to hyper with
//! every byte intact, `Connection: close` and `HEAD` are honoured, bodies of
//! unknown length are re-framed chunked, every answer has a `Date`, and a
//! head that never completes is cut at `timeouts.client`.
//! (The 4xx and smuggling cases of hyper's side are in core.rs.)

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// amslb on `listener` in front of one simulated node, `timeouts.client` 1 s.
async fn one_node_lb(port: u16) -> (SimNode, Amslb, SocketAddr) {
    let node = sim_node("origin-1").await;
    let listener = listener_addr(port);
    let extra = "[timeouts]\nclient = \"1s\"\n";
    let text =
        origin_config(listener, std::slice::from_ref(&node), "").replacen("[timeouts]\n", extra, 1);
    let amslb = Amslb::start(&text, &[listener]);
    (node, amslb, listener)
}

/// Writes `bytes` in one write and reads until amslb closes (at most 10 s).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("amslb closes the connection after the last answer")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The status lines of the answers in `text`, in order.
fn status_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .collect()
}

#[tokio::test]
async fn pipelined_requests_are_answered_one_each_in_order() {
    let (node, _amslb, lb) = one_node_lb(18080).await;
    let answer = exchange(
        lb,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_lines(&answer), ["HTTP/1.1 200 OK"; 3], "{answer}");
    let paths: Vec<String> = node.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(paths, ["/a", "/b", "/c"]);
    // Only the last answer says the connection ends.
    assert_eq!(answer.matches("connection: close").count(), 1, "{answer}");
    assert!(
        answer.trim_end().ends_with("origin-1"),
        "the third body is the last thing sent: {answer}"
    );
}

#[tokio::test]
async fn a_request_with_a_body_moves_the_connection_to_hyper_with_its_bytes() {
    let (node, _amslb, lb) = one_node_lb(18081).await;
    let answer = exchange(
        lb,
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          GET /third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_lines(&answer), ["HTTP/1.1 200 OK"; 3], "{answer}");
    let seen: Vec<(String, String)> = node
        .seen()
        .iter()
        .map(|s| (s.method.clone(), s.uri.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("GET".into(), "/first".into()),
            ("POST".into(), "/second".into()),
            ("GET".into(), "/third".into())
        ]
    );
}

#[tokio::test]
async fn conflicting_lengths_after_a_served_request_are_refused_and_reach_no_node() {
    let (node, amslb, lb) = one_node_lb(18082).await;
    // The first request is the loop's; the second, with two lengths that
    // disagree, is hyper's to refuse; nothing after it may be read as a
    // request of its own.
    let answer = exchange(
        lb,
        b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\n\
          GET /hidden HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(
        status_lines(&answer),
        ["HTTP/1.1 200 OK", "HTTP/1.1 400 Bad Request"],
        "{answer}"
    );
    let paths: Vec<String> = node.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(paths, ["/ok"]);
    // The log line is written as the connection ends, just after the close.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !amslb.log().contains("client connection refused") {
        assert!(Instant::now() < deadline, "{}", amslb.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn head_answers_have_no_body_and_the_connection_goes_on() {
    let (_node, _amslb, lb) = one_node_lb(18083).await;
    let answer = exchange(
        lb,
        b"HEAD /live/x HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_lines(&answer), ["HTTP/1.1 200 OK"; 2], "{answer}");
    // The HEAD answer keeps the node's length of the body it does not
    // send, and its head is followed at once by the next answer.
    let first_head_end = answer.find("\r\n\r\n").expect(&answer) + 4;
    assert!(
        answer[..first_head_end].contains("content-length: 9\r\n"),
        "{answer}"
    );
    assert!(
        answer[first_head_end..].starts_with("HTTP/1.1 200 OK"),
        "{answer}"
    );
}

/// A node that answers every request with a chunked body of 40 chunks of
/// 5000 bytes, keeping the connection open.
async fn chunked_node() -> SocketAddr {
    let listener = loop {
        if let Ok(l) = TcpListener::bind(SocketAddr::new(unique_loopback(), 5080)).await {
            break l;
        }
    };
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                loop {
                    match stream.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                    if !head.ends_with(b"\r\n\r\n") {
                        continue;
                    }
                    head.clear();
                    let mut answer =
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                    for _ in 0..40 {
                        answer.extend_from_slice(b"1388\r\n");
                        answer.extend_from_slice(&[b'x'; 5000]);
                        answer.extend_from_slice(b"\r\n");
                    }
                    answer.extend_from_slice(b"0\r\n\r\n");
                    if stream.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn bodies_of_unknown_length_go_out_chunked_with_a_date() {
    let node = chunked_node().await;
    let lb = listener_addr(18084);
    let text = format!(
        "[[listener]]\nname = \"http\"\nbind = [\"{lb}\"]\nprotocol = \"http\"\n\
         default_group = \"origin\"\n\n[[group]]\nname = \"origin\"\n\n[cluster]\n\n\
         [[cluster.node]]\nid = \"chunked\"\naddress = \"{}\"\ngroup = \"origin\"\nhttp_port = {}\n",
        node.ip(),
        node.port()
    );
    let _amslb = Amslb::start(&text, &[lb]);
    // The node's answer has no length: amslb re-frames its chunks.
    let mut stream = TcpStream::connect(lb).await.unwrap();
    stream
        .write_all(b"GET /any HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
    assert!(head.contains("\r\ndate: "), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    // Decode the chunks: 200000 bytes, then the last chunk, then nothing.
    let mut body = &raw[split..];
    let mut total = 0;
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..line_end]).unwrap(), 16).unwrap();
        body = &body[line_end + 2..];
        if size == 0 {
            assert_eq!(body, b"\r\n", "nothing after the last chunk");
            break;
        }
        total += size;
        assert_eq!(&body[size..size + 2], b"\r\n");
        body = &body[size + 2..];
    }
    assert_eq!(total, 200_000);
}

#[tokio::test]
async fn a_head_that_never_completes_is_cut_at_the_client_timeout() {
    let (_node, amslb, lb) = one_node_lb(18085).await;
    let started = Instant::now();
    let answer = exchange(lb, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
    let waited = started.elapsed();
    assert_eq!(answer, "", "nothing is answered to half a head");
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&waited),
        "closed after {waited:?}, timeouts.client is 1 s"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while !amslb.log().contains("read header from client timeout") {
        assert!(Instant::now() < deadline, "{}", amslb.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(amslb.log().contains("client connection refused"));
    // An idle keep-alive connection ends at the same timeout, quietly.
    let mut idle = TcpStream::connect(lb).await.unwrap();
    idle.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut out))
        .await
        .expect("the idle connection is closed")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        status_lines(&String::from_utf8_lossy(&out)),
        ["HTTP/1.1 200 OK"]
    );
}

/// The node sessions amslb counts for `origin-1`, off its metrics page.
async fn sessions(stats: SocketAddr) -> f64 {
    let page = get(stats, "/metrics").await.text();
    page.lines()
        .find(|l| l.starts_with("amslb_node_active_sessions{") && l.contains("origin-1"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_client_that_leaves_before_its_answer_ends_the_node_session_at_once() {
    let node = sim_node("origin-1").await;
    let (lb, stats) = (listener_addr(18086), listener_addr(6086));
    // timeouts.server is long: only the client's leaving can end the wait.
    let text = origin_config(lb, std::slice::from_ref(&node), "").replacen(
        "server = \"2s\"",
        "server = \"30s\"",
        1,
    ) + &format!("\n[stats]\nbind = \"{stats}\"\nallow = [\"127.0.0.0/8\"]\n");
    let _amslb = Amslb::start(&text, &[lb, stats]);
    let mut client = TcpStream::connect(lb).await.unwrap();
    client
        .write_all(b"GET /slow?ms=20000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sessions(stats).await != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
    let left = Instant::now();
    while sessions(stats).await != 0.0 {
        assert!(
            left.elapsed() < Duration::from_secs(3),
            "the node session outlived its client by {:?}",
            left.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
