//! The real AMS JavaScript SDK (`@antmedia/webrtc_adaptor`, installed into
//! tests/sdk by `scripts/test`) in headless Chromium, given amslb's
//! `/amslb/v1/endpoint` as its `httpEndpointUrl`: it fetches the endpoint,
//! checks the node's `http_url`, opens the `websocket_url` and sends its
//! signalling there, on the node amslb named.

mod ops_support;
mod support;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{Amslb, listener_addr, sim_nodes};

const SDK: &str = "tests/sdk/node_modules/@antmedia/webrtc_adaptor/dist/browser/webrtc_adaptor.js";
/// The SDK's browser build expects this dependency's global (its video effects).
const SEGMENTATION: &str =
    "tests/sdk/node_modules/@mediapipe/selfie_segmentation/selfie_segmentation.js";

/// The player page: the SDK in play mode, logging its callbacks into the DOM.
fn page(endpoint: &str) -> String {
    format!(
        r#"<!doctype html><html><body><pre id="log"></pre>
<script src="/selfie_segmentation.js"></script>
<script src="/webrtc_adaptor.js"></script>
<script>
const log = t => {{
  document.getElementById("log").textContent += t + "\n";
  fetch("/log?" + encodeURIComponent(t));
}};
const adaptor = new webrtc_adaptor.WebRTCAdaptor({{
  httpEndpointUrl: "{endpoint}",
  isPlayMode: true,
  mediaConstraints: {{ video: false, audio: false }},
  callback: (info, obj) => {{
    log("callback " + info);
    if (info == "initialized") {{
      log("connected " + adaptor.webSocketAdaptor.websocketURL);
      adaptor.play("stream1");
    }}
  }},
  callbackError: (error, message) => log("error " + error),
}});
</script></body></html>"#
    )
}

/// What the page logged (`/log?line`), in order.
type Logged = Arc<Mutex<Vec<String>>>;

/// Serves the page and the SDK file on `addr`, and records what the page logs.
async fn serve_page(
    addr: SocketAddr,
    html: String,
    sdk: Vec<u8>,
    segmentation: Vec<u8>,
    logged: Logged,
) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (html, sdk, segmentation) = (
        Bytes::from(html),
        Bytes::from(sdk),
        Bytes::from(segmentation),
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (html, sdk, segmentation, logged) = (
                html.clone(),
                sdk.clone(),
                segmentation.clone(),
                logged.clone(),
            );
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    if req.uri().path() == "/log" {
                        let line = req.uri().query().unwrap_or("");
                        let line: String = form_urlencoded::parse(format!("l={line}").as_bytes())
                            .map(|(_, v)| v.into_owned())
                            .collect();
                        logged.lock().unwrap().push(line);
                    }
                    let (body, kind) = match req.uri().path() {
                        "/webrtc_adaptor.js" => (sdk.clone(), "text/javascript"),
                        "/selfie_segmentation.js" => (segmentation.clone(), "text/javascript"),
                        _ => (html.clone(), "text/html"),
                    };
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", kind)
                                .body(Full::new(body))
                                .unwrap(),
                        )
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_gets_its_endpoint_from_amslb_and_connects_there() {
    let read = |file: &str| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file);
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{} ({e}): install the SDK with `npm ci --prefix tests/sdk` (scripts/test does)",
                path.display()
            )
        })
    };
    let (sdk, segmentation) = (read(SDK), read(SEGMENTATION));
    let chromium = ops_support::require_program("chromium", "chromium");
    let nodes = sim_nodes(&["origin-1", "edge-1", "edge-2"]).await;
    let lb = listener_addr(5080);
    let mut config = format!(
        r#"
[[listener]]
name = "web"
bind = ["{lb}"]
protocol = "http"
assign_api = true

[[group]]
name = "origin"

[[group]]
name = "edge"
balance = "stream-hash"

[cluster]
"#
    );
    for (node, group) in nodes.iter().zip(["origin", "edge", "edge"]) {
        config.push_str(&format!(
            "[[cluster.node]]\nid = \"{}\"\naddress = \"{}\"\ngroup = \"{group}\"\n",
            node.id(),
            node.addr.ip()
        ));
    }
    let amslb = Amslb::start(&config, &[lb]);

    // What amslb says, asked the way the SDK asks (plus source=sdk).
    let endpoint = format!("http://{lb}/amslb/v1/endpoint?app=LiveApp&stream=stream1&role=play");
    let said = support::get(
        lb,
        "/amslb/v1/endpoint?app=LiveApp&stream=stream1&role=play&source=sdk",
    )
    .await;
    assert_eq!(said.status, 200, "{}", said.text());
    let said: serde_json::Value = serde_json::from_slice(&said.body).unwrap();
    let chosen = nodes
        .iter()
        .find(|n| said["node"] == n.id())
        .unwrap_or_else(|| panic!("endpoint named no simulated node: {said}"));
    assert_eq!(said["group"], "edge");
    assert_eq!(
        said["websocket_url"],
        format!("ws://{}/LiveApp/websocket", chosen.addr)
    );

    let page_addr = listener_addr(8080);
    let logged = Logged::default();
    let _page = serve_page(
        page_addr,
        page(&endpoint),
        sdk,
        segmentation,
        logged.clone(),
    )
    .await;
    let profile = tempfile::tempdir().unwrap();
    // A real (not virtual-time) browser session, stopped once the node got the
    // SDK's play command or after 60 s.
    let mut browser = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--remote-debugging-port=0",
            "--enable-logging=stderr",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("http://{page_addr}/"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(profile.path().join("console.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60)
        && !chosen
            .messages()
            .iter()
            .any(|m| m.contains("\"command\":\"play\""))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let a wrong second connection, if any, show up too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = browser.kill().await;
    let console = std::fs::read_to_string(profile.path().join("console.log")).unwrap_or_default();
    let console: String = console
        .lines()
        .filter(|l| l.contains("CONSOLE"))
        .collect::<Vec<_>>()
        .join("\n");
    let dom = format!(
        "{}\n--- browser console:\n{console}",
        logged.lock().unwrap().join("\n")
    );

    // The SDK says it connected to the node amslb named ...
    assert!(
        dom.contains("callback initialized"),
        "SDK did not connect:\n{dom}\n{}",
        amslb.log()
    );
    assert!(
        dom.contains(&format!(
            "connected ws://{}/LiveApp/websocket?target=edge",
            chosen.addr
        )),
        "SDK connected elsewhere than {}:\n{dom}",
        chosen.addr
    );
    // ... and that node, only that one, got its WebSocket and its play command.
    for node in &nodes {
        let got_play = node
            .messages()
            .iter()
            .any(|m| m.contains("\"command\":\"play\"") && m.contains("stream1"));
        let upgraded = node
            .seen()
            .iter()
            .any(|s| s.uri.starts_with("/LiveApp/websocket"));
        let expected = node.id() == chosen.id();
        assert_eq!(
            got_play,
            expected,
            "{}: play command {got_play}, messages {:?}",
            node.id(),
            node.messages()
        );
        assert_eq!(upgraded, expected, "{}: WebSocket {upgraded}", node.id());
    }
    // The SDK checked the node with a HEAD on http_url before connecting
    // (the browser follows the node's 302 `/LiveApp` → `/LiveApp/`, as AMS
    // answers a deployed app, so the node may see either).
    assert!(
        chosen
            .seen()
            .iter()
            .any(|s| s.method == "HEAD" && (s.uri == "/LiveApp" || s.uri == "/LiveApp/")),
        "no HEAD /LiveApp on {}: {:?}",
        chosen.id(),
        chosen
            .seen()
            .iter()
            .map(|s| format!("{} {}", s.method, s.uri))
            .collect::<Vec<_>>()
    );
}
