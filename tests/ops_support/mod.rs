//! Helpers for the operations tests (stats listener, Prometheus, Chromium, reload).
#![allow(dead_code)] // each test binary uses a different subset

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Answer of [`http`].
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body as text.
    pub body: String,
}

/// One request with an optional basic-auth pair; a fresh connection each time.
pub async fn http(method: &str, url: &str, auth: Option<(&str, &str)>) -> Answer {
    use base64::Engine;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some((u, p)) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        req = req.header("authorization", format!("Basic {token}"));
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Empty::new()).unwrap()),
    )
    .await
    .expect("request timed out")
    .expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Fails the test with an install hint when `program` is missing.
pub fn require_program(program: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{program}` not found on PATH: install it with `apt-get install {package}`")
    })
}

/// A free loopback TCP port chosen by the OS.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A directory removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "amslb-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed when dropped.
#[derive(Debug)]
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `probe` every 100 ms until it returns `Some`, at most `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a real Prometheus scraping `target` (host:port) every second with
/// basic auth; returns the guard and Prometheus' own address.
pub fn start_prometheus(dir: &TempDir, target: &str, auth: (&str, &str)) -> (ChildGuard, String) {
    let prometheus = require_program("prometheus", "prometheus");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: amslb\n    scrape_interval: 1s\n    scrape_timeout: 1s\n\
             \x20   basic_auth:\n      username: {}\n      password: {}\n\
             \x20   static_configs:\n      - targets: [\"{target}\"]\n",
            auth.0, auth.1
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    (ChildGuard(child), listen)
}

/// Runs an instant PromQL query until it returns a non-empty vector; returns
/// (labels, value) pairs.
pub async fn promql(
    prometheus: &str,
    query: &str,
    limit: Duration,
) -> Vec<(serde_json::Value, f64)> {
    let url = format!(
        "http://{prometheus}/api/v1/query?query={}",
        url_escape(query)
    );
    wait_for(limit, &format!("PromQL {query}"), || async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let resp = client.get(url.parse().ok()?).await.ok()?;
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&body).ok()?;
        let result = doc["data"]["result"].as_array()?;
        if result.is_empty() {
            return None;
        }
        Some(
            result
                .iter()
                .map(|r| {
                    let v = r["value"][1].as_str().unwrap().parse().unwrap();
                    (r["metric"].clone(), v)
                })
                .collect(),
        )
    })
    .await
}

fn url_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs `promtool check metrics` on `text`; returns its verdict and output.
pub fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let promtool = require_program("promtool", "prometheus");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let mut all = String::from_utf8_lossy(&out.stdout).into_owned();
    all.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), all)
}

/// Group names for an in-process stats listener; reload is not wired there.
struct FixedGroups(Vec<String>);

impl amslb::stats::Control for FixedGroups {
    fn reload(&self) -> futures_util::future::BoxFuture<'static, Result<String, String>> {
        Box::pin(async { Err("reload is not wired in this test".into()) })
    }
    fn groups(&self) -> Vec<String> {
        self.0.clone()
    }
    fn health_history(&self, _node: &str) -> Vec<bool> {
        vec![true, true, false]
    }
}

/// Serves an in-process stats listener on 127.0.0.1:0 with the `[stats]`
/// table `stats_toml`; returns its address and a guard that stops it.
pub async fn serve_stats(
    cluster: std::sync::Arc<amslb::cluster::Cluster>,
    metrics: std::sync::Arc<amslb::metrics::Metrics>,
    stats_toml: &str,
    groups: &[&str],
) -> (std::net::SocketAddr, tokio_util::sync::DropGuard) {
    use std::sync::Arc;
    let config: amslb::config::ops::StatsConfig = toml::from_str(stats_toml).unwrap();
    let access = amslb::stats::auth::Access::from_config(&config).unwrap();
    let control = FixedGroups(groups.iter().map(|g| g.to_string()).collect());
    let state = Arc::new(amslb::stats::StatsState::new(
        metrics,
        cluster,
        access,
        Arc::new(control),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(amslb::stats::serve(listener, state, stop.clone()));
    (addr, stop.drop_guard())
}

/// A node spec on 127.0.9.`octet`, port 5080.
pub fn node_spec(id: &str, group: &str, octet: u8) -> amslb::cluster::NodeSpec {
    amslb::cluster::NodeSpec {
        id: id.into(),
        group: group.into(),
        addr: [127, 0, 9, octet].into(),
        http_port: 5080,
        rtmp_port: 1935,
        srt_port: 4200,
        drain: false,
        region: None,
    }
}

/// Runs headless Chromium with `args` + `url`; returns stdout.
pub async fn chromium(dir: &TempDir, args: &[String], url: &str) -> String {
    let chromium = require_program("chromium", "chromium");
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=3000",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("profile").display()
            ))
            .args(args)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium timed out")
    .expect("start chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
