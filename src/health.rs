//! Node health: active probes, passive failure tracking, the rise/fall state
//! machine and slow start.
//!
//! Every node gets its own probe task, so a node that hangs only delays its own
//! next probe: one probe per node is ever in flight, each bounded by
//! `[health] timeout`, and the probes of other nodes run on their own clocks
//! (spread by jitter so a large group is not probed in lockstep). Verdicts land
//! in [`Node::set_healthy`], which the data path reads with one atomic load;
//! nothing here is on the request path except the passive reports, which cost
//! a map lookup and an atomic.

use crate::cluster::{Cluster, FULL_WEIGHT, Node};
use crate::config::health::{HealthCheck, HealthConfig};
use crate::config::{Config, Protocol};
use crate::metrics::{Metrics, NodeMetrics};
use crate::node_tls::{NodeTlsSet, dial};
use arc_swap::ArcSwap;
use foldhash::HashMap;
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Results kept per node for the status page.
pub const HISTORY_LEN: usize = 20;

/// How often the checker looks for nodes added to or removed from the cluster.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// Steps of the slow-start ramp.
const RAMP_STEPS: u32 = 20;

/// Largest probe answer read: the status line is all that matters.
const MAX_PROBE_READ: usize = 1024;

/// HAProxy-style up/down hysteresis: `fall` consecutive failures take an up
/// node down, `rise` consecutive successes bring a down node up, and any result
/// that agrees with the current state resets the count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    up: bool,
    streak: u32,
}

impl RiseFall {
    /// A tracker starting in state `up`.
    pub fn new(rise: u32, fall: u32, up: bool) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            up,
            streak: 0,
        }
    }

    /// Current verdict.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one result; returns the new state when this result changed it.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        Some(ok)
    }

    /// New thresholds (a reload); the current state and streak stay.
    pub fn set_thresholds(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
    }

    /// Goes down at once (passive failures); returns whether the node was up.
    pub fn force_down(&mut self) -> bool {
        let was_up = self.up;
        self.up = false;
        self.streak = 0;
        was_up
    }
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The expected answer (or, for TCP checks, a connection).
    Ok,
    /// An HTTP answer with another status.
    Status(u16),
    /// No answer within `[health] timeout`.
    Timeout,
    /// Connecting, writing or reading failed.
    Io(String),
    /// Something answered, but not HTTP.
    Garbled,
    /// Real traffic failed often enough to take the node down (passive check).
    Passive(String),
    /// Active checks are off: the node is assumed fine.
    Assumed,
}

impl Outcome {
    /// Whether the check passed.
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Assumed)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Ok => write!(f, "ok"),
            Outcome::Status(status) => write!(f, "status {status}"),
            Outcome::Timeout => write!(f, "timeout"),
            Outcome::Io(e) => write!(f, "{e}"),
            Outcome::Garbled => write!(f, "not an HTTP answer"),
            Outcome::Passive(reason) => write!(f, "passive: {reason}"),
            Outcome::Assumed => write!(f, "assumed up (active checks off)"),
        }
    }
}

/// One entry of a node's check history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// When the check finished.
    pub at: SystemTime,
    /// What it found.
    pub outcome: Outcome,
    /// How long it took.
    pub took: Duration,
    /// Whether the node counted as up after it.
    pub up: bool,
}

/// How a node is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// `GET [health] path` or `HEAD /{[health] app}` (`[health] check`) on
    /// the node's HTTP port.
    Http,
    /// A TCP connect to the node's RTMP port, for groups that only TCP
    /// listeners use (they may not speak HTTP at all).
    Tcp,
}

/// Health state of one node.
#[derive(Debug)]
pub struct NodeHealth {
    node: Arc<Node>,
    /// Consecutive failures seen on real traffic; an atomic so that the
    /// request path does not lock for the common, successful case.
    passive_streak: AtomicU32,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    rise_fall: RiseFall,
    history: VecDeque<Check>,
    /// After a passive mark-down, no probe before this instant.
    probe_after: Option<Instant>,
}

impl NodeHealth {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave Inner inconsistent
        // (every update is a single assignment), so keep using it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The last [`HISTORY_LEN`] checks, oldest first.
    pub fn history(&self) -> Vec<Check> {
        self.inner().history.iter().cloned().collect()
    }

    fn push(inner: &mut Inner, outcome: Outcome, took: Duration) {
        if inner.history.len() == HISTORY_LEN {
            inner.history.pop_front();
        }
        let up = inner.rise_fall.is_up();
        inner.history.push_back(Check {
            at: SystemTime::now(),
            outcome,
            took,
            up,
        });
    }
}

/// The health checker of a cluster: per-node state, the probe tasks, and the
/// passive reports from the proxy.
#[derive(Debug)]
pub struct Health {
    settings: ArcSwap<Settings>,
    /// Wakes the supervisor when a reload changed the settings.
    changed: Notify,
    nodes: RwLock<HashMap<String, Arc<NodeHealth>>>,
    /// Probes reach nodes the way the proxy does (HTTPS under `node_tls`).
    node_tls: Arc<NodeTlsSet>,
}

/// The `[health]` settings and the groups that get TCP checks, swapped whole on reload.
#[derive(Debug)]
struct Settings {
    config: HealthConfig,
    tcp_groups: HashSet<String>,
}

impl Settings {
    fn of(config: &Config) -> Self {
        Self {
            config: config.health.clone(),
            tcp_groups: tcp_only_groups(config),
        }
    }

    /// How `node` is probed under these settings; a probe task runs one plan
    /// and is restarted when its node's plan changes.
    fn plan(&self, node: &Node) -> Plan {
        let kind = if self.tcp_groups.contains(node.group()) {
            CheckKind::Tcp
        } else {
            CheckKind::Http
        };
        Plan {
            kind,
            config: self.config.clone(),
        }
    }
}

/// What one probe task does: the check kind and the settings it runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    kind: CheckKind,
    config: HealthConfig,
}

impl Health {
    /// A checker for `config` (its `[health]` and listeners); call [`Health::spawn`] to start probing.
    pub fn new(config: &Config) -> Arc<Self> {
        Self::with_node_tls(config, Default::default())
    }

    /// [`Health::new`], probing nodes with `node_tls` over TLS as the proxy reaches them.
    pub fn with_node_tls(config: &Config, node_tls: Arc<NodeTlsSet>) -> Arc<Self> {
        Arc::new(Self {
            settings: ArcSwap::from_pointee(Settings::of(config)),
            changed: Notify::new(),
            nodes: RwLock::default(),
            node_tls,
        })
    }

    /// Applies the `[health]` (and listener → group) settings of a reloaded
    /// `config`. Every node keeps its state and history; the probe tasks of
    /// nodes whose checks changed (interval, path, kind, ...) are restarted
    /// with the new settings right away, the others keep their clock.
    pub fn reconfigure(&self, config: &Config) {
        let settings = Settings::of(config);
        let (rise, fall) = (settings.config.rise, settings.config.fall);
        for entry in self
            .nodes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            entry.inner().rise_fall.set_thresholds(rise, fall);
        }
        self.settings.store(Arc::new(settings));
        self.changed.notify_one();
    }

    fn config(&self) -> HealthConfig {
        self.settings.load().config.clone()
    }

    /// Starts probing the nodes of `cluster`, following membership changes,
    /// until `shutdown` is cancelled.
    pub fn spawn(
        self: &Arc<Self>,
        cluster: Arc<Cluster>,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> JoinHandle<()> {
        tokio::spawn(self.clone().supervise(cluster, shutdown, metrics))
    }

    /// The health state of `node`, created on first use.
    pub fn entry(&self, node: &Arc<Node>) -> Arc<NodeHealth> {
        let read = self.nodes.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = read.get(node.id())
            && Arc::ptr_eq(&entry.node, node)
        {
            return entry.clone();
        }
        drop(read);
        let mut write = self.nodes.write().unwrap_or_else(PoisonError::into_inner);
        let entry = write
            .entry(node.id().to_string())
            .or_insert_with(|| self.fresh(node));
        if !Arc::ptr_eq(&entry.node, node) {
            // Same id, new endpoint: a new node with a fresh history.
            *entry = self.fresh(node);
        }
        entry.clone()
    }

    fn fresh(&self, node: &Arc<Node>) -> Arc<NodeHealth> {
        Arc::new(NodeHealth {
            node: node.clone(),
            passive_streak: AtomicU32::new(0),
            inner: Mutex::new(Inner {
                rise_fall: RiseFall::new(
                    self.settings.load().config.rise,
                    self.settings.load().config.fall,
                    node.is_healthy(),
                ),
                history: VecDeque::with_capacity(HISTORY_LEN),
                probe_after: None,
            }),
        })
    }

    /// The check history of the node with `id`, oldest first (empty if unknown).
    pub fn history(&self, id: &str) -> Vec<Check> {
        let nodes = self.nodes.read().unwrap_or_else(PoisonError::into_inner);
        nodes.get(id).map(|e| e.history()).unwrap_or_default()
    }

    /// Passive check: real traffic to `node` failed before an answer came
    /// (connect error, timeout, connection lost); `reason` says which.
    pub fn report_failure(&self, node: &Arc<Node>, reason: &str) {
        self.passive(node, Some(reason.to_string()));
    }

    /// Passive check: `node` answered real traffic with `status`. 5xx counts
    /// as a failure except 501 and 505, which say the request was odd, not the
    /// node (HAProxy's `observe layer7` makes the same exception).
    pub fn report_status(&self, node: &Arc<Node>, status: u16) {
        let failed = (500..600).contains(&status) && status != 501 && status != 505;
        self.passive(node, failed.then(|| format!("answered {status}")));
    }

    fn passive(&self, node: &Arc<Node>, failure: Option<String>) {
        let settings = self.settings.load();
        let threshold = settings.config.passive_failures;
        if threshold == 0 {
            return;
        }
        let entry = self.entry(node);
        let Some(reason) = failure else {
            if entry.passive_streak.load(Ordering::Relaxed) != 0 {
                entry.passive_streak.store(0, Ordering::Relaxed);
            }
            return;
        };
        if entry.passive_streak.fetch_add(1, Ordering::Relaxed) + 1 < threshold {
            return;
        }
        entry.passive_streak.store(0, Ordering::Relaxed);
        let mut inner = entry.inner();
        if !inner.rise_fall.force_down() {
            return;
        }
        inner.probe_after = Some(Instant::now() + settings.config.passive_backoff);
        let reason = format!("{threshold} consecutive failures on traffic, last: {reason}");
        NodeHealth::push(&mut inner, Outcome::Passive(reason.clone()), Duration::ZERO);
        drop(inner);
        self.transition(&entry, false, &reason);
    }

    /// Applies a state change to the node and logs it, once.
    fn transition(&self, entry: &NodeHealth, up: bool, reason: &str) {
        let node = &entry.node;
        node.set_healthy(up);
        if up {
            tracing::info!(node = node.id(), group = node.group(), reason, "node up");
            let slow_start = self.settings.load().config.slow_start;
            if !slow_start.is_zero() {
                node.set_weight(FULL_WEIGHT / RAMP_STEPS);
                tokio::spawn(ramp(node.clone(), slow_start));
            }
        } else {
            tracing::warn!(node = node.id(), group = node.group(), reason, "node down");
        }
    }

    /// Records an active check's result.
    fn record(&self, entry: &NodeHealth, outcome: Outcome, took: Duration) {
        let mut inner = entry.inner();
        let change = inner.rise_fall.record(outcome.is_ok());
        let reason = change.map(|up| {
            let config = self.config();
            let (count, word) = if up {
                (config.rise, "good")
            } else {
                (config.fall, "failed")
            };
            format!("{count} consecutive {word} checks, last: {outcome}")
        });
        NodeHealth::push(&mut inner, outcome, took);
        drop(inner);
        if let (Some(up), Some(reason)) = (change, reason) {
            self.transition(entry, up, &reason);
        }
    }

    async fn supervise(
        self: Arc<Self>,
        cluster: Arc<Cluster>,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
    ) {
        let mut watched: Vec<Watched> = Vec::new();
        loop {
            let snapshot = cluster.snapshot();
            let settings = self.settings.load_full();
            watched.retain(|w| {
                let kept = snapshot
                    .node(w.node.id())
                    .is_some_and(|n| Arc::ptr_eq(n, &w.node))
                    && settings.plan(&w.node) == w.plan;
                if !kept {
                    w.stop.cancel();
                }
                kept
            });
            for node in snapshot.nodes() {
                if !watched.iter().any(|w| Arc::ptr_eq(&w.node, node)) {
                    let stop = shutdown.child_token();
                    let plan = settings.plan(node);
                    let node_metrics = metrics.node(node);
                    let entry = self.entry(node);
                    tokio::spawn(self.clone().watch(
                        entry,
                        plan.clone(),
                        stop.clone(),
                        node_metrics,
                    ));
                    watched.push(Watched {
                        node: node.clone(),
                        plan,
                        stop,
                    });
                }
            }
            self.nodes
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, e| watched.iter().any(|w| Arc::ptr_eq(&w.node, &e.node)));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            }
        }
    }

    /// The probe loop of one node: one probe in flight at most, started every
    /// `interval` (±5 % jitter), first after a random part of an interval.
    async fn watch(
        self: Arc<Self>,
        entry: Arc<NodeHealth>,
        plan: Plan,
        stop: CancellationToken,
        metrics: Arc<NodeMetrics>,
    ) {
        let Plan { kind, config } = plan;
        let interval = config.interval;
        let mut delay = interval.mul_f64(rand::random_range(0.0..1.0));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            let backoff = entry
                .inner()
                .probe_after
                .map(|t| t.saturating_duration_since(Instant::now()));
            if let Some(wait) = backoff.filter(|w| !w.is_zero()) {
                delay = wait;
                continue;
            }
            let started = Instant::now();
            let outcome = if config.enabled {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    outcome = probe(kind, &entry.node, &config, &self.node_tls) => outcome,
                }
            } else {
                Outcome::Assumed
            };
            let took = started.elapsed();
            if config.enabled {
                metrics.health_check(outcome.is_ok(), took);
            }
            self.record(&entry, outcome, took);
            delay = interval
                .mul_f64(rand::random_range(0.95..1.05))
                .saturating_sub(took);
        }
    }
}

/// A probe task the supervisor started: for which node, with which plan.
#[derive(Debug)]
struct Watched {
    node: Arc<Node>,
    plan: Plan,
    stop: CancellationToken,
}

/// Slow start: raises the node's weight from 1/[`RAMP_STEPS`] to full over
/// `duration`; gives up if the node goes down meanwhile (its next rise starts
/// a new ramp).
async fn ramp(node: Arc<Node>, duration: Duration) {
    let step = duration / RAMP_STEPS;
    for i in 2..=RAMP_STEPS {
        tokio::time::sleep(step).await;
        if !node.is_healthy() {
            return;
        }
        node.set_weight(FULL_WEIGHT * i / RAMP_STEPS);
    }
}

/// Runs one check of `node`, bounded by `config.timeout`.
pub async fn probe(
    kind: CheckKind,
    node: &Node,
    config: &HealthConfig,
    node_tls: &NodeTlsSet,
) -> Outcome {
    let check = async {
        match kind {
            // The RTMP port as the tcp/tls listeners reach it: under
            // `node_tls` a completed TLS handshake on the RTMPS port.
            CheckKind::Tcp => match node_tls.dial_rtmp(node, config.timeout).await {
                Ok(_) => Outcome::Ok,
                Err(e) => Outcome::Io(e.to_string()),
            },
            CheckKind::Http => {
                // What to ask ([health] check) and when the answer is good.
                let app_path = format!("/{}", config.app);
                let (method, path, good): (&str, &str, Box<dyn Fn(u16) -> bool + Send>) =
                    match config.check {
                        HealthCheck::Liveness => {
                            let expect = config.expect_status;
                            ("GET", &config.path, Box::new(move |s| s == expect))
                        }
                        HealthCheck::App => {
                            ("HEAD", &app_path, Box::new(|s| (200..400).contains(&s)))
                        }
                    };
                let (addr, tls) = node_tls.http(node);
                match dial(addr, tls.map(|t| &**t), config.timeout).await {
                    Ok(stream) => http_check(stream, addr, method, path, good).await,
                    Err(e) => Outcome::Io(e.to_string()),
                }
            }
        }
    };
    tokio::time::timeout(config.timeout, check)
        .await
        .unwrap_or(Outcome::Timeout)
}

/// One `method path` over `stream` (a fresh connection); only the status
/// line is read, and `good` judges its status.
async fn http_check<S>(
    mut stream: S,
    addr: SocketAddr,
    method: &str,
    path: &str,
    good: impl Fn(u16) -> bool,
) -> Outcome
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: amslb-health\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return Outcome::Io(format!("write: {e}"));
    }
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < MAX_PROBE_READ {
        match stream.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Outcome::Io(format!("read: {e}")),
        }
    }
    match parse_status_line(&buf) {
        Some(status) if good(status) => Outcome::Ok,
        Some(status) => Outcome::Status(status),
        None => Outcome::Garbled,
    }
}

/// The status of an `HTTP/1.x NNN ...` status line at the start of `head`.
fn parse_status_line(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split(' ');
    if !words.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = words.next()?.trim_end_matches('\r');
    (status.len() == 3).then(|| status.parse().ok()).flatten()
}

/// Groups that only TCP passthrough listeners send traffic to: their nodes
/// get TCP connect checks on the RTMP port instead of HTTP probes, because
/// the HTTP router never uses them and they may not speak HTTP at all.
pub fn tcp_only_groups(config: &Config) -> HashSet<String> {
    let http = |p: Protocol| matches!(p, Protocol::Http | Protocol::Https);
    let mut http_reachable: Vec<String> = Vec::new();
    if config.listeners.iter().any(|l| http(l.protocol)) {
        // The router sends publish traffic to `origin` and play traffic to `edge`.
        http_reachable.extend(["origin".to_string(), "edge".to_string()]);
    }
    let reached_by = |pred: &dyn Fn(Protocol) -> bool| -> Vec<String> {
        config
            .listeners
            .iter()
            .filter(|l| pred(l.protocol))
            .map(|l| l.default_group.clone())
            .collect()
    };
    http_reachable.extend(reached_by(&|p| http(p) || p == Protocol::Udp));
    let mut tcp = reached_by(&|p| matches!(p, Protocol::Tcp | Protocol::Tls));
    // A group's backup takes its traffic when it is empty.
    for set in [&mut http_reachable, &mut tcp] {
        let mut i = 0;
        while i < set.len() {
            if let Some(backup) = config.group(&set[i]).and_then(|g| g.backup.clone())
                && !set.contains(&backup)
            {
                set.push(backup);
            }
            i += 1;
        }
    }
    tcp.retain(|g| !http_reachable.contains(g));
    tcp.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::NodeSpec;
    use std::net::IpAddr;

    #[test]
    fn rise_fall_needs_consecutive_results() {
        let mut rf = RiseFall::new(2, 3, true);
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(true), None, "a good result resets the count");
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(false), Some(false));
        assert!(!rf.is_up());
        assert_eq!(rf.record(false), None);
        assert_eq!(rf.record(true), None);
        assert_eq!(rf.record(false), None, "a failure resets the rise count");
        assert_eq!(rf.record(true), None);
        assert_eq!(rf.record(true), Some(true));
        assert!(rf.is_up());
        assert_eq!(rf.record(true), None);
    }

    #[test]
    fn rise_fall_of_one_flips_at_once_and_force_down() {
        let mut rf = RiseFall::new(1, 1, false);
        assert_eq!(rf.record(true), Some(true));
        assert_eq!(rf.record(false), Some(false));
        let mut rf = RiseFall::new(0, 0, true);
        assert_eq!(rf.record(false), Some(false), "zero is treated as one");
        let mut rf = RiseFall::new(2, 3, true);
        rf.record(false);
        assert!(rf.force_down());
        assert!(!rf.force_down());
        assert_eq!(rf.record(true), None);
        assert_eq!(rf.record(true), Some(true));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Service Unavailable\r\nx: y"),
            Some(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 20"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"
[[listener]]
name = "http"
bind = ["127.0.0.1:18080"]
protocol = "http"
default_group = "panel"

[[listener]]
name = "rtmp"
bind = ["127.0.0.1:19350"]
protocol = "tcp"
default_group = "ingest"

[[listener]]
name = "rtmp-shared"
bind = ["127.0.0.1:19351"]
protocol = "tcp"
default_group = "origin"

[[group]]
name = "origin"
[[group]]
name = "edge"
backup = "spare"
[[group]]
name = "spare"
[[group]]
name = "panel"
[[group]]
name = "ingest"
backup = "ingest-backup"
[[group]]
name = "ingest-backup"

[cluster]
{extra}
"#
        );
        // Deserialized without validation: TCP listeners are not served by
        // every build yet, but the checker must already treat them right.
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn only_groups_behind_tcp_listeners_alone_get_tcp_checks() {
        let mut groups: Vec<_> = tcp_only_groups(&config("")).into_iter().collect();
        groups.sort();
        assert_eq!(groups, ["ingest", "ingest-backup"]);
    }

    fn node(id: &str) -> Arc<Node> {
        Arc::new(Node::new(NodeSpec::on_default_ports(
            id,
            "origin",
            IpAddr::from([127, 0, 0, 1]),
        )))
    }

    #[test]
    fn passive_failures_take_a_node_down_and_successes_reset() {
        let health = Health::new(&config("")); // passive_failures = 3
        let n = node("a");
        health.report_status(&n, 502);
        health.report_status(&n, 502);
        health.report_status(&n, 200);
        health.report_status(&n, 502);
        health.report_status(&n, 502);
        health.report_status(&n, 501);
        assert!(
            n.is_healthy(),
            "200 and 501 (a live node's answer) reset the streak"
        );
        health.report_failure(&n, "connect failed: refused");
        health.report_status(&n, 503);
        health.report_failure(&n, "connect failed: refused");
        assert!(!n.is_healthy());
        let history = health.history("a");
        assert_eq!(history.len(), 1);
        assert!(
            matches!(&history[0].outcome, Outcome::Passive(r) if r.contains("connect failed: refused")),
            "{history:?}"
        );
        let entry = health.entry(&n);
        assert!(
            entry.inner().probe_after.is_some(),
            "backoff before probing back"
        );
    }

    #[test]
    fn records_keep_a_bounded_history_and_flip_state() {
        let health = Health::new(&config(""));
        let n = node("a");
        let entry = health.entry(&n);
        for _ in 0..3 {
            health.record(&entry, Outcome::Status(503), Duration::from_millis(1));
        }
        assert!(!n.is_healthy());
        for _ in 0..(HISTORY_LEN + 5) {
            health.record(&entry, Outcome::Ok, Duration::from_millis(1));
        }
        assert!(n.is_healthy());
        let history = entry.history();
        assert_eq!(history.len(), HISTORY_LEN);
        assert!(history.iter().all(|c| c.outcome == Outcome::Ok && c.up));
    }

    #[test]
    fn replaced_node_gets_a_fresh_entry() {
        let health = Health::new(&config(""));
        let first = node("a");
        let entry = health.entry(&first);
        assert!(Arc::ptr_eq(&entry, &health.entry(&first)));
        let second = node("a");
        assert!(Arc::ptr_eq(health.entry(&second).node(), &second));
    }
}
