//! The Grafana dashboard (deploy/grafana/amslb.json) and the alert rules
//! (deploy/prometheus/amslb-rules.yml): every PromQL expression of the
//! dashboard parses (`promtool check rules`) and returns data from a real
//! Prometheus that scraped amslb under load; the rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`).

mod support;
mod tls_support;

use futures_util::SinkExt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{Amslb, get, listener_addr, sim_nodes, unique_loopback, wait_listening};

/// Series the L4 listeners feed (names agreed in the team); they may be
/// absent until the L4 metrics land, so no data for them is reported, not failed.
const L4_FAMILIES: [&str; 4] = [
    "amslb_l4_sessions_total",
    "amslb_l4_open_sessions",
    "amslb_rtmp_publishes_total",
    "amslb_no_node_total",
];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool(args: &[&str], dir: &Path) -> String {
    tls_support::require("promtool", "prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every `expr` of the dashboard, with Grafana's `$__rate_interval` filled in.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo("deploy/grafana/amslb.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(expr)) = map.get("expr") {
                    out.push(expr.replace("$__rate_interval", "1m"));
                }
                map.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&json, &mut exprs);
    exprs
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo("deploy/prometheus");
    let out = promtool(&["check", "rules", "amslb-rules.yml"], &dir);
    assert!(out.contains("SUCCESS: 9 rules found"), "{out}");
    let out = promtool(&["test", "rules", "amslb-rules.test.yml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_dashboard_expression_parses() {
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 25, "only {} expressions", exprs.len());
    // As recording rules, so promtool parses each one (JSON is YAML).
    let rules: Vec<serde_json::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| serde_json::json!({"record": format!("dashboard:expr_{i}"), "expr": e}))
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), file.to_string()).unwrap();
    let out = promtool(&["check", "rules", "dashboard.yml"], dir.path());
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{out}"
    );
}

/// A real Prometheus scraping `target` every second with basic auth.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr, password: &str) -> Self {
        tls_support::require("prometheus", "prometheus");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pass"), password).unwrap();
        let config = format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             scrape_configs:\n  - job_name: amslb\n    basic_auth: {{ username: admin, password_file: {pass} }}\n    \
             static_configs: [ {{ targets: [\"{target}\"] }} ]\n",
            pass = dir.path().join("pass").display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = SocketAddr::new(unique_loopback(), 9090);
        let log = dir.path().join("prometheus.log");
        let mut child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prometheus is missing: apt-get install prometheus");
        wait_listening("prometheus", &mut child, &[addr], &log);
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The result vector of an instant query.
    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let q: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        let answer = get(self.addr, &format!("/api/v1/query?query={q}")).await;
        let json: serde_json::Value = serde_json::from_slice(&answer.body)
            .unwrap_or_else(|e| panic!("{expr}: {e}: {}", answer.text()));
        assert_eq!(json["status"], "success", "{expr}: {json}");
        json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_expression_returns_data_from_a_real_prometheus() {
    let nodes = sim_nodes(&["origin-1", "edge-1", "edge-2"]).await;
    let mongo = support::secantus::Secantus::start(&[]);
    let (http, https, stats) = (
        listener_addr(5080),
        listener_addr(5443),
        listener_addr(6080),
    );
    let certs = tls_support::tempdir("grafana");
    let ca = tls_support::TestCa::new();
    let (cert, key) = ca.leaf(&["live.example.com"]);
    std::fs::write(
        certs.path().join("live.example.com.pem"),
        format!("{cert}{key}"),
    )
    .unwrap();
    let mut config = format!(
        r#"
[[listener]]
name = "play"
bind = ["{http}"]
protocol = "http"
default_group = "edge"

[[listener]]
name = "secure"
bind = ["{https}"]
protocol = "https"

[[group]]
name = "origin"

[[group]]
name = "edge"
balance = "stream-hash"
backup = "origin"

[stats]
bind = "{stats}"
user = "admin"
password = "grafana-test"

[health]
interval = "500ms"
timeout = "400ms"

[tls]
certs_dir = "{}"

[cluster]
source = "mongodb"
uri = "{uri}"
poll_interval = "500ms"
"#,
        certs.path().display(),
        uri = mongo.uri(None),
    );
    // Membership (and cpu/memory) from AMS's registry, written as AMS writes it.
    let mut registrations = Vec::new();
    for (node, group) in nodes.iter().zip(["origin", "edge", "edge"]) {
        config.push_str(&format!(
            "[[cluster.role]]\ncidr = \"{}/32\"\ngroup = \"{group}\"\n",
            node.addr.ip()
        ));
        registrations.push(
            node.register(&mongo.uri(None), Duration::from_secs(1))
                .await,
        );
    }
    let amslb = Amslb::start(&config, &[http, https, stats]);
    let prometheus = Prometheus::start(stats, "grafana-test");

    // A WebSocket tunnel that stays open, so tunnel and session gauges exist.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/LiveApp/websocket"))
        .await
        .expect("WebSocket through amslb");
    ws.send("{\"command\":\"ping\"}".into()).await.unwrap();
    // A reload, so the reload series exist, and a drained node.
    amslb.signal("HUP");
    let drain = support::send(
        stats,
        http::Request::post("/api/v1/nodes/edge-2/drain")
            .header("authorization", "Basic YWRtaW46Z3JhZmFuYS10ZXN0")
            .body(http_body_util::Empty::new())
            .unwrap(),
    )
    .await;
    assert_eq!(drain.status, 200, "{}", drain.text());

    // Load: HLS, REST and WHEP for 8 s (at most 4000 requests), while
    // Prometheus scrapes every second.
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(8) && sent < 4000 {
        for path in [
            "/LiveApp/streams/stream1.m3u8",
            "/LiveApp/streams/stream2_adaptive.m3u8",
            "/LiveApp/rest/v2/broadcasts/list/0/10",
            "/rest/v2/version",
        ] {
            let answer = get(http, path).await;
            assert_eq!(answer.status, 200, "{path}");
            sent += 1;
        }
        // Plain HTTP to the TLS port, so handshake failures are counted.
        if sent % 400 == 0 {
            use tokio::io::AsyncWriteExt;
            let mut plain = tokio::net::TcpStream::connect(https).await.unwrap();
            let _ = plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
        }
        // A client that gives up mid-answer, so client aborts are counted.
        if sent % 200 == 0 {
            let stream = tokio::net::TcpStream::connect(http).await.unwrap();
            use tokio::io::AsyncWriteExt;
            let mut stream = stream;
            let _ = stream
                .write_all(b"GET /slow?ms=300 HTTP/1.1\r\nhost: x\r\n\r\n")
                .await;
            drop(stream);
        }
    }
    // Rates need two samples. Prometheus may start scraping a few seconds
    // after it listens (it applies new targets on a timer), and 4000
    // requests can take less than that: wait until the counters have two
    // samples and two scrapes came after the load (so a series born late in
    // it has two too), instead of a fixed time.
    let load_end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let value = |result: Vec<serde_json::Value>| {
            result
                .first()
                .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
        };
        let samples = value(
            prometheus
                .query("max(count_over_time(amslb_requests_total[1m]))")
                .await,
        );
        let last_scrape = value(prometheus.query("timestamp(up)").await);
        if samples >= Some(2.0) && last_scrape > Some(load_end + 1.5) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape twice in 20 s: {samples:?} samples, last at {last_scrape:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let mut empty = Vec::new();
    for expr in dashboard_exprs() {
        if prometheus.query(&expr).await.is_empty() {
            empty.push(expr);
        }
    }
    let (l4, others): (Vec<_>, Vec<_>) = empty
        .iter()
        .partition(|e| L4_FAMILIES.iter().any(|f| e.contains(f)));
    for expr in &l4 {
        println!("no data (this test opens no RTMP/SRT session; L4 series may be absent): {expr}");
    }
    assert!(
        others.is_empty(),
        "dashboard expressions with no data after {sent} requests:\n{}\n{}",
        others
            .iter()
            .map(|e| e.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        amslb.log()
    );
    drop(ws);
    drop(registrations);
}
