//! The access log: one line per request or tunnel, written by a background task.
//!
//! The data path only moves an [`Entry`] into a bounded channel (`try_send`);
//! formatting and writing happen on the writer task. When the writer falls
//! behind (slow disk, blocked stdout) new lines are dropped and counted in
//! `amslb_access_log_dropped_total` rather than slowing requests down.

use crate::cluster::Node;
use crate::config::ops::{AccessLogConfig, AccessLogFormat};
use prometheus::IntCounter;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How a request related to session stickiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sticky {
    /// No affinity involved.
    None,
    /// The client's sticky node took the request.
    Hit,
    /// The client had a sticky node that was unusable; another one took it.
    Redispatch,
}

impl Sticky {
    fn as_str(self) -> &'static str {
        match self {
            Sticky::None => "-",
            Sticky::Hit => "hit",
            Sticky::Redispatch => "redispatch",
        }
    }
}

/// One request or tunnel, as logged.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When the request arrived.
    pub time: SystemTime,
    /// Client address (after PROXY protocol, when used).
    pub client: SocketAddr,
    /// Listener name.
    pub listener: Arc<str>,
    /// Route kind (`hls`, `websocket`, `rtmp`, ...).
    pub route: &'static str,
    /// Group the request was meant for.
    pub group: Arc<str>,
    /// Node that served it, if any.
    pub node: Option<Arc<Node>>,
    /// Status sent to the client (101 for upgrades; 0 for raw TCP/UDP, or when
    /// the client left before any answer).
    pub status: u16,
    /// Bytes received from the client.
    pub bytes_in: u64,
    /// Bytes sent to the client.
    pub bytes_out: u64,
    /// Request (or tunnel) duration.
    pub duration: Duration,
    /// Stickiness outcome.
    pub sticky: Sticky,
}

impl Entry {
    fn write_text(&self, out: &mut String) {
        let node = self.node.as_ref().map_or("-", |n| n.id());
        let _ = writeln!(
            out,
            "{} {} {} {} {} {} {} {} {} {:.3} {}",
            humantime::format_rfc3339_millis(self.time),
            self.client,
            self.listener,
            self.route,
            self.group,
            node,
            self.status,
            self.bytes_in,
            self.bytes_out,
            self.duration.as_secs_f64() * 1000.0,
            self.sticky.as_str(),
        );
    }

    fn write_json(&self, out: &mut String) {
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(self.time).to_string(),
            "client": self.client.to_string(),
            "listener": &*self.listener,
            "route": self.route,
            "group": &*self.group,
            "node": self.node.as_ref().map(|n| n.id()),
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": self.duration.as_secs_f64() * 1000.0,
            "sticky": self.sticky.as_str(),
        });
        let _ = writeln!(out, "{line}");
    }
}

/// The sending side of the access log; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Entry>,
    dropped: IntCounter,
}

impl AccessLog {
    /// Opens the log target (append) and starts the writer task. The task ends,
    /// after flushing, once every clone of the returned [`AccessLog`] is dropped,
    /// so a reload that opens a new log (e.g. after logrotate) retires the old one.
    pub async fn start(
        config: &AccessLogConfig,
        dropped: IntCounter,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let out: Box<dyn AsyncWrite + Send + Unpin> = match &config.path {
            Some(path) => Box::new(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await?,
            ),
            None => Box::new(tokio::io::stdout()),
        };
        let (tx, rx) = mpsc::channel(config.buffer);
        let task = tokio::spawn(write_loop(rx, out, config.format));
        Ok((Self { tx, dropped }, task))
    }

    /// Queues one line; never waits.
    pub fn log(&self, entry: Entry) {
        if self.tx.try_send(entry).is_err() {
            self.dropped.inc();
        }
    }
}

async fn write_loop(
    mut rx: mpsc::Receiver<Entry>,
    mut out: Box<dyn AsyncWrite + Send + Unpin>,
    format: AccessLogFormat,
) {
    let mut buf = String::with_capacity(64 * 1024);
    while let Some(entry) = rx.recv().await {
        // Batch whatever is already queued into one write.
        let mut next = Some(entry);
        while let Some(entry) = next {
            match format {
                AccessLogFormat::Text => entry.write_text(&mut buf),
                AccessLogFormat::Json => entry.write_json(&mut buf),
            }
            next = if buf.len() < 60 * 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if let Err(e) = out.write_all(buf.as_bytes()).await {
            tracing::warn!(error = %e, "access log write failed; lines lost");
        }
        buf.clear();
        let _ = out.flush().await;
    }
    let _ = out.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::fixtures::spec;

    fn entry(status: u16) -> Entry {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            client: "192.0.2.1:40000".parse().unwrap(),
            listener: "play".into(),
            route: "hls",
            group: "edge".into(),
            node: Some(Arc::new(Node::new(spec("e1", "edge", 1)))),
            status,
            bytes_in: 120,
            bytes_out: 4096,
            duration: Duration::from_micros(1500),
            sticky: Sticky::Hit,
        }
    }

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("amslb-{name}-{}", std::process::id()))
    }

    async fn write_and_read(format: &str, entries: Vec<Entry>) -> String {
        let path = temp_path(format);
        let _ = std::fs::remove_file(&path);
        let config: AccessLogConfig = toml::from_str(&format!(
            "format = \"{format}\"\npath = {:?}",
            path.display().to_string()
        ))
        .unwrap();
        let (log, task) = AccessLog::start(&config, IntCounter::new("d", "d").unwrap())
            .await
            .unwrap();
        for e in entries {
            log.log(e);
        }
        drop(log);
        task.await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        text
    }

    #[tokio::test]
    async fn text_lines_have_every_field() {
        let text = write_and_read("text", vec![entry(200), entry(503)]).await;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "2027-01-15T08:00:00.000Z 192.0.2.1:40000 play hls edge e1 200 120 4096 1.500 hit"
        );
        assert!(lines[1].contains(" 503 "));
        assert_eq!(lines.len(), 2);
    }

    #[tokio::test]
    async fn json_lines_parse() {
        let text = write_and_read("json", vec![entry(200)]).await;
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["node"], "e1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["sticky"], "hit");
        assert_eq!(v["client"], "192.0.2.1:40000");
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts() {
        let (tx, _rx) = mpsc::channel(1);
        let dropped = IntCounter::new("d", "d").unwrap();
        let log = AccessLog {
            tx,
            dropped: dropped.clone(),
        };
        for _ in 0..5 {
            log.log(entry(200));
        }
        assert_eq!(dropped.get(), 4);
    }
}
