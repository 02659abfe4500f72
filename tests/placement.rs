//! One placement for every protocol, through the real binary: for 200 stream
//! keys, a WHIP publish, a sniffed WebSocket publish, an RTMP and an RTMPS
//! publish (rtmp_affinity) and an SRT publish (stream id) all land on the
//! origin `/amslb/v1/assign?role=publish` names; again with one origin
//! drained and one down.
//!
//! The origins are simulated: the HTTP side is the harness' `SimNode`, the
//! RTMP side a listener that shakes hands like a server and counts sessions,
//! the SRT side a socket that answers the induction and records the stream id
//! of each conclusion. Which node got a session is read from those counters.

mod support;

use amslb::l4::rtmp::amf0::{self, Value};
use amslb::l4::rtmp::chunk::{self, Message, TYPE_AMF0_COMMAND};
use amslb::l4::rtmp::handshake;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Empty;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const KEYS: usize = 200;
const PACKET: usize = 1536;

/// One simulated origin: HTTP (WHIP, WebSocket), RTMP and SRT on one address.
struct Origin {
    http: SimNode,
    rtmp_sessions: Arc<AtomicUsize>,
    srt_streams: Arc<Mutex<Vec<String>>>,
}

impl Origin {
    async fn start(id: &str) -> Origin {
        let http = sim_node(id).await;
        let ip = http.addr.ip();
        let rtmp = TcpListener::bind((ip, 1935)).await.unwrap();
        let rtmp_sessions = Arc::new(AtomicUsize::new(0));
        tokio::spawn(rtmp_node(rtmp, rtmp_sessions.clone()));
        let srt = UdpSocket::bind((ip, 4200)).await.unwrap();
        let srt_streams = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(srt_node(srt, srt_streams.clone()));
        Origin {
            http,
            rtmp_sessions,
            srt_streams,
        }
    }

    fn websockets(&self) -> usize {
        self.http
            .seen()
            .iter()
            .filter(|s| s.headers.contains_key("sec-websocket-key"))
            .count()
    }
}

/// An RTMP server's handshake on every connection; counts those completed.
async fn rtmp_node(listener: TcpListener, sessions: Arc<AtomicUsize>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let sessions = sessions.clone();
        tokio::spawn(async move {
            let mut c0c1 = vec![0u8; 1 + PACKET];
            s.read_exact(&mut c0c1).await.ok()?;
            s.write_all(&handshake::server_reply(&c0c1[1..]))
                .await
                .ok()?;
            let mut c2 = vec![0u8; PACKET];
            s.read_exact(&mut c2).await.ok()?;
            sessions.fetch_add(1, Ordering::SeqCst);
            // Keep reading what amslb replays until it closes.
            let mut sink = vec![0u8; 4096];
            while s.read(&mut sink).await.ok()? > 0 {}
            Some(())
        });
    }
}

/// An SRT listener's induction answer (cookie 0x0badcafe); records the stream
/// id of every conclusion carrying that cookie.
async fn srt_node(socket: UdpSocket, streams: Arc<Mutex<Vec<String>>>) {
    let mut buf = vec![0u8; 2048];
    const COOKIE: u32 = 0x0bad_cafe;
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            return;
        };
        let d = &buf[..n];
        if let Some(answer) = amslb::l4::srt::induction_answer(d, COOKIE) {
            let _ = socket.send_to(&answer, from).await;
        } else if let Some(c) = amslb::l4::srt::Conclusion::parse(d)
            && c.cookie == COOKIE
        {
            streams
                .lock()
                .unwrap()
                .push(c.stream_id.unwrap_or_default());
        }
    }
}

fn command(values: &[Value]) -> Vec<u8> {
    let mut body = Vec::new();
    for v in values {
        amf0::encode(&mut body, v);
    }
    let mut out = Vec::new();
    let message = Message {
        csid: 3,
        timestamp: 0,
        type_id: TYPE_AMF0_COMMAND,
        msid: 0,
        body,
    };
    chunk::write(&mut out, &message, 128);
    out
}

/// An RTMP publisher's start up to the stream key (what ffmpeg sends).
async fn rtmp_publish<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, stream: &str) {
    let mut c0c1 = vec![3u8];
    c0c1.extend(std::iter::repeat_n(7u8, PACKET));
    s.write_all(&c0c1).await.unwrap();
    let mut s0s1s2 = vec![0u8; 1 + 2 * PACKET];
    s.read_exact(&mut s0s1s2).await.unwrap();
    s.write_all(&s0s1s2[1..=PACKET]).await.unwrap();
    let text = |t: &str| Value::String(t.into());
    let connect = command(&[
        text("connect"),
        Value::Number(1.0),
        Value::Object(vec![
            ("app".into(), text("LiveApp")),
            ("tcUrl".into(), text("rtmp://lb/LiveApp")),
        ]),
    ]);
    s.write_all(&connect).await.unwrap();
    let release = command(&[
        text("releaseStream"),
        Value::Number(2.0),
        Value::Null,
        text(stream),
    ]);
    s.write_all(&release).await.unwrap();
}

/// The origin whose counter moves past `before` within 5 s.
async fn which(origins: &[Origin], before: &[usize], now: impl Fn(&Origin) -> usize) -> String {
    let start = Instant::now();
    loop {
        if let Some(o) = origins.iter().zip(before).find(|(o, b)| now(o) > **b) {
            return o.0.http.id().to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no origin got it");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// An SRT caller's conclusion for `stream_id`, after the induction `answer`.
fn srt_conclusion(answer: &[u8], stream_id: &str) -> Vec<u8> {
    let mut out = answer[..64].to_vec();
    out[12..16].fill(0);
    out[16..20].copy_from_slice(&5u32.to_be_bytes());
    out[20..24].copy_from_slice(&[0, 0, 0, 5]);
    out[36..40].copy_from_slice(&0xFFFF_FFFFu32.to_be_bytes());
    // HSREQ as libsrt sends it.
    out.extend([0, 1, 0, 3, 0, 1, 5, 1, 0, 0, 0, 0xbf, 0, 0x78, 0, 0]);
    let mut sid = stream_id.as_bytes().to_vec();
    while !sid.len().is_multiple_of(4) {
        sid.push(0);
    }
    out.extend([0, 5]);
    out.extend(((sid.len() / 4) as u16).to_be_bytes());
    for w in sid.chunks(4) {
        out.extend([w[3], w[2], w[1], w[0]]);
    }
    out
}

/// An SRT caller's induction with socket id `id`.
fn srt_induction(id: u32) -> Vec<u8> {
    let mut d = vec![0u8; 64];
    d[0] = 0x80;
    d[16..20].copy_from_slice(&4u32.to_be_bytes());
    d[22..24].copy_from_slice(&2u16.to_be_bytes());
    d[28..32].copy_from_slice(&1500u32.to_be_bytes());
    d[32..36].copy_from_slice(&8192u32.to_be_bytes());
    d[36..40].copy_from_slice(&1u32.to_be_bytes());
    d[40..44].copy_from_slice(&id.to_be_bytes());
    d
}

struct Setup {
    origins: Vec<Origin>,
    http: SocketAddr,
    rtmp: SocketAddr,
    rtmps: SocketAddr,
    srt: SocketAddr,
    stats: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    _amslb: Amslb,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let mut origins = Vec::new();
    for i in 1..=3 {
        origins.push(Origin::start(&format!("origin-{i}")).await);
    }
    let ip = unique_loopback();
    let at = |port| SocketAddr::new(ip, port);
    let (http, rtmp, rtmps, srt, stats) = (at(5080), at(1935), at(1936), at(4200), at(5090));
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    let mut config = format!(
        r#"
[global]
retries = 2
[timeouts]
connect = "1s"
[health]
interval = "200ms"
timeout = "500ms"
rise = 1
fall = 1
[stats]
bind = "{stats}"
[[listener]]
name = "http"
bind = ["{http}"]
protocol = "http"
default_group = "origin"
assign_api = true
sniff_websocket = true
[[listener]]
name = "rtmp"
bind = ["{rtmp}"]
protocol = "tcp"
default_group = "origin"
rtmp_affinity = true
[[listener]]
name = "rtmps"
bind = ["{rtmps}"]
protocol = "tls"
default_group = "origin"
rtmp_affinity = true
cert = "{cert}"
key = "{key}"
[[listener]]
name = "srt"
bind = ["{srt}"]
protocol = "udp"
default_group = "origin"
[[group]]
name = "origin"
balance = "least-conn"
[cluster]
"#,
        cert = cert.display(),
        key = key.display(),
    );
    for o in &origins {
        config.push_str(&format!(
            "[[cluster.node]]\nid = \"{}\"\naddress = \"{}\"\ngroup = \"origin\"\n",
            o.http.id(),
            o.http.addr.ip()
        ));
    }
    let amslb = Amslb::start(&config, &[http, rtmp, rtmps, stats]);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(generated.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Setup {
        origins,
        http,
        rtmp,
        rtmps,
        srt,
        stats,
        tls: tokio_rustls::TlsConnector::from(Arc::new(client)),
        _amslb: amslb,
        _dir: dir,
    }
}

impl Setup {
    async fn assigned(&self, stream: &str) -> String {
        let r = get(
            self.http,
            &format!("/amslb/v1/assign?app=LiveApp&stream={stream}&role=publish"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let doc: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
        doc["node"].as_str().unwrap().to_string()
    }

    async fn whip(&self, stream: &str) -> String {
        let request = Request::post(format!("/LiveApp/whip/{stream}"))
            .header("host", "lb")
            .body(Empty::new())
            .unwrap();
        let r = send(self.http, request).await;
        assert_eq!(r.status, 201);
        r.node()
    }

    async fn websocket(&self, stream: &str) -> String {
        let before: Vec<usize> = self.origins.iter().map(Origin::websockets).collect();
        let url = format!("ws://{}/LiveApp/websocket", self.http);
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let publish = format!(r#"{{"command":"publish","streamId":"{stream}"}}"#);
        ws.send(WsMessage::text(publish.clone())).await.unwrap();
        // The node echoes: the message went through.
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        assert!(matches!(echo, Ok(Some(Ok(_)))), "{echo:?}");
        which(&self.origins, &before, Origin::websockets).await
    }

    async fn rtmp(&self, stream: &str, tls: bool) -> String {
        let before: Vec<usize> = self
            .origins
            .iter()
            .map(|o| o.rtmp_sessions.load(Ordering::SeqCst))
            .collect();
        let count = |o: &Origin| o.rtmp_sessions.load(Ordering::SeqCst);
        if tls {
            let tcp = TcpStream::connect(self.rtmps).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut s = self.tls.connect(name, tcp).await.unwrap();
            rtmp_publish(&mut s, stream).await;
            which(&self.origins, &before, count).await
        } else {
            let mut s = TcpStream::connect(self.rtmp).await.unwrap();
            rtmp_publish(&mut s, stream).await;
            which(&self.origins, &before, count).await
        }
    }

    async fn srt(&self, stream_id: &str) -> String {
        let before: Vec<usize> = self
            .origins
            .iter()
            .map(|o| o.srt_streams.lock().unwrap().len())
            .collect();
        let caller = UdpSocket::bind((self.srt.ip(), 0)).await.unwrap();
        caller.connect(self.srt).await.unwrap();
        caller.send(&srt_induction(rand::random())).await.unwrap();
        let mut buf = vec![0u8; 2048];
        let n = tokio::time::timeout(Duration::from_secs(5), caller.recv(&mut buf))
            .await
            .expect("induction answered")
            .unwrap();
        caller
            .send(&srt_conclusion(&buf[..n], stream_id))
            .await
            .unwrap();
        let node = which(&self.origins, &before, |o| {
            o.srt_streams.lock().unwrap().len()
        })
        .await;
        let origin = self.origins.iter().find(|o| o.http.id() == node).unwrap();
        // The node got the caller's stream id, with its own cookie.
        assert_eq!(
            origin.srt_streams.lock().unwrap().last().unwrap(),
            stream_id
        );
        node
    }

    /// Every protocol, for every key: the node the assign API names.
    async fn check_all(&self, round: &str) -> std::collections::BTreeMap<String, usize> {
        let mut per_node = std::collections::BTreeMap::new();
        for i in 0..KEYS {
            let stream = format!("{round}{i}");
            let want = self.assigned(&stream).await;
            let got = [
                ("whip", self.whip(&stream).await),
                ("websocket", self.websocket(&stream).await),
                ("rtmp", self.rtmp(&stream, false).await),
                ("rtmps", self.rtmp(&stream, true).await),
                ("srt plain", self.srt(&format!("LiveApp/{stream}")).await),
                (
                    "srt access-control",
                    self.srt(&format!("#!::r=LiveApp/{stream},m=publish")).await,
                ),
            ];
            for (protocol, node) in got {
                if node != want {
                    let log = self._amslb.log();
                    let tail: Vec<&str> = log.lines().rev().take(12).collect();
                    panic!("{protocol} of LiveApp/{stream}: on {node}, assigned {want}\n{tail:#?}");
                }
            }
            *per_node.entry(want).or_insert(0) += 1;
        }
        per_node
    }

    async fn node_state(&self, id: &str) -> String {
        let r = get(self.stats, "/api/v1/status").await;
        let doc: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
        doc["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["nodes"].as_array().unwrap().iter())
            .find(|n| n["id"] == id)
            .map(|n| n["state"].as_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_lands_on_the_node_the_assign_api_names() {
    let s = setup().await;
    let spread = s.check_all("s").await;
    // Three origins share the keys: the check is not about one node.
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(spread.values().all(|&n| n > 30), "{spread:?}");

    // One origin drained, one down (its liveness fails the health check).
    let drained = s.origins[0].http.id().to_string();
    let down = s.origins[1].http.id().to_string();
    let r = send(
        s.stats,
        Request::post(format!("/api/v1/nodes/{drained}/drain"))
            .body(Empty::new())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    s.origins[1].http.set_liveness(503);
    let start = Instant::now();
    while s.node_state(&down).await != "down" {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{down} never went down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.node_state(&drained).await, "draining");
    let spread = s.check_all("t").await;
    let left = s.origins[2].http.id().to_string();
    assert_eq!(spread, [(left, KEYS)].into_iter().collect());
}
