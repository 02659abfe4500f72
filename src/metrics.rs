//! Prometheus metrics: one registry holding every `amslb_*` family.
//!
//! The data path never formats a label or looks one up in the registry: a
//! listener gets a [`ListenerMetrics`] once (at bind) and a node's counters are
//! an `Arc<NodeMetrics>` found by [`Metrics::node`]; both hold resolved counter
//! handles, so recording a request is a handful of relaxed atomic adds. Values
//! that already live elsewhere (node state, open sessions) are read from the
//! cluster snapshot at scrape time instead of being pushed on every change.
//!
//! Labels are bounded: listener, route kind, group, node id, code class,
//! membership source, certificate name. Never a stream id or a client address.

use crate::cluster::{Cluster, Membership, Node};
use arc_swap::ArcSwap;
use foldhash::HashMap;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Status code classes used as the `code` label, indexed by [`code_class`].
pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Node states exported by `amslb_node_state`, one series each (1 = current).
pub const NODE_STATES: [&str; 4] = ["up", "down", "draining", "stale"];

/// Latency buckets in seconds: a proxied request takes from well under a
/// millisecond (HLS segment on loopback) to seconds (slow node).
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Distinct routes a listener caches handles for; more fall back to a slow lookup.
const ROUTE_SLOTS: usize = 16;

/// Index into [`CODE_CLASSES`] for an HTTP status; anything out of range counts as 5xx.
pub fn code_class(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// What `amslb_node_state` reports for a node: operator intent first
/// (draining), then the membership source's verdict (stale heartbeat), then
/// the health checks.
pub fn node_state(node: &Node) -> &'static str {
    if node.is_draining() {
        "draining"
    } else if node.is_stale() {
        "stale"
    } else if node.is_healthy() {
        "up"
    } else {
        "down"
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Every family of the registry. Creating them cannot fail with the fixed
/// names and labels below; [`Metrics::new`] still returns the error instead of
/// panicking, so a typo shows up as a test failure, not a crash.
#[derive(Debug, Clone)]
struct Families {
    requests: IntCounterVec,
    duration: HistogramVec,
    received: IntCounterVec,
    sent: IntCounterVec,
    connections: IntCounterVec,
    open_connections: IntGaugeVec,
    tunnels: IntCounterVec,
    open_tunnels: IntGaugeVec,
    retries: IntCounterVec,
    redispatches: IntCounterVec,
    aborts: IntCounterVec,
    node_requests: IntCounterVec,
    node_connect_failures: IntCounterVec,
    node_received: IntCounterVec,
    node_sent: IntCounterVec,
    health_duration: HistogramVec,
    health_failures: IntCounterVec,
    membership_up: IntGaugeVec,
    membership_last_update: GaugeVec,
    shared_state_up: IntGauge,
    shared_state_errors: IntCounter,
    cert_expiry: GaugeVec,
    acme_orders: IntCounterVec,
    limited: IntCounterVec,
    reloads: IntCounterVec,
    pending_restart: IntGaugeVec,
    last_reload_success: Gauge,
    last_reload_ok: IntGauge,
    access_log_dropped: IntCounter,
    udp_dropped: IntCounterVec,
    no_node: IntCounterVec,
    tls_handshake_failures: IntCounterVec,
    worker_connections: IntGaugeVec,
    l4_sessions: IntCounterVec,
    l4_open_sessions: IntGaugeVec,
    l4_rejected: IntCounterVec,
    rtmp_publishes: IntCounterVec,
    build_info: IntGaugeVec,
    start_time: Gauge,
}

impl Families {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        fn reg<C: Collector + Clone + 'static>(r: &Registry, c: C) -> prometheus::Result<C> {
            r.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(registry, IntGaugeVec::new(Opts::new(name, help), labels)?)
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            reg(registry, HistogramVec::new(opts, labels)?)
        };
        let fgauge = |name: &str, help: &str, labels: &[&str]| {
            reg(registry, GaugeVec::new(Opts::new(name, help), labels)?)
        };
        const LR: &[&str] = &["listener", "route"];
        const NODE: &[&str] = &["group", "node"];
        const L4: &[&str] = &["listener", "protocol"];
        Ok(Self {
            requests: counter(
                "amslb_requests_total",
                "Requests answered to clients, by listener, route kind and status class.",
                &["listener", "route", "code"],
            )?,
            duration: histogram(
                "amslb_request_duration_seconds",
                "Time from the request to the end of the response body sent to the client (to the 101 for upgrades).",
                LR,
                DURATION_BUCKETS,
            )?,
            received: counter(
                "amslb_received_bytes_total",
                "Bytes received from clients.",
                &["listener"],
            )?,
            sent: counter(
                "amslb_sent_bytes_total",
                "Bytes sent to clients.",
                &["listener"],
            )?,
            connections: counter(
                "amslb_connections_total",
                "Client connections accepted.",
                &["listener"],
            )?,
            open_connections: gauge(
                "amslb_open_connections",
                "Client connections open now.",
                &["listener"],
            )?,
            tunnels: counter(
                "amslb_tunnels_total",
                "Tunnels opened (WebSocket upgrades, TCP and UDP sessions).",
                LR,
            )?,
            open_tunnels: gauge("amslb_open_tunnels", "Tunnels open now.", LR)?,
            retries: counter(
                "amslb_retries_total",
                "Attempts on another node after a connection to the chosen one failed.",
                &["listener"],
            )?,
            redispatches: counter(
                "amslb_redispatches_total",
                "Sticky sessions sent to another node because theirs was unusable.",
                &["listener"],
            )?,
            aborts: counter(
                "amslb_client_aborts_total",
                "Requests the client gave up on before any response was sent.",
                &["listener"],
            )?,
            node_requests: counter(
                "amslb_node_requests_total",
                "Requests forwarded to a node, by the status class the node answered.",
                &["group", "node", "code"],
            )?,
            node_connect_failures: counter(
                "amslb_node_connect_failures_total",
                "Failed attempts to connect to a node.",
                NODE,
            )?,
            node_received: counter(
                "amslb_node_received_bytes_total",
                "Bytes received from a node.",
                NODE,
            )?,
            node_sent: counter("amslb_node_sent_bytes_total", "Bytes sent to a node.", NODE)?,
            health_duration: histogram(
                "amslb_health_check_duration_seconds",
                "Duration of active health checks.",
                NODE,
                DURATION_BUCKETS,
            )?,
            health_failures: counter(
                "amslb_health_check_failures_total",
                "Failed active health checks.",
                NODE,
            )?,
            membership_up: gauge(
                "amslb_membership_source_up",
                "1 when the membership source (static, mongodb) answered its last query.",
                &["source"],
            )?,
            shared_state_up: {
                let g = IntGauge::new(
                    "amslb_shared_state_up",
                    "1 when the [state] MongoDB answered its last query; 0 while amslb runs on its last known shared state.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            shared_state_errors: {
                let c = IntCounter::new(
                    "amslb_shared_state_errors_total",
                    "Failed reads and writes of the [state] MongoDB.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            membership_last_update: fgauge(
                "amslb_membership_last_update_timestamp_seconds",
                "Unix time of the last successful membership update.",
                &["source"],
            )?,
            cert_expiry: fgauge(
                "amslb_certificate_expiry_timestamp_seconds",
                "Unix time at which a served certificate expires.",
                &["certificate"],
            )?,
            limited: counter(
                "amslb_limited_total",
                "Connections, requests and publish sessions refused by a [[limit]], by listener and limit name.",
                &["listener", "limit"],
            )?,
            acme_orders: counter(
                "amslb_acme_orders_total",
                "ACME certificate orders, by result.",
                &["result"],
            )?,
            reloads: counter(
                "amslb_config_reloads_total",
                "Configuration reloads, by result (success, failure).",
                &["result"],
            )?,
            pending_restart: gauge(
                "amslb_config_reload_pending_restart",
                "1 per setting the loaded config file changes but only a restart applies.",
                &["setting"],
            )?,
            last_reload_success: reg(
                registry,
                Gauge::new(
                    "amslb_config_last_reload_success_timestamp_seconds",
                    "Unix time the running configuration was loaded.",
                )?,
            )?,
            last_reload_ok: reg(
                registry,
                IntGauge::new(
                    "amslb_config_last_reload_successful",
                    "1 when the last reload attempt succeeded.",
                )?,
            )?,
            access_log_dropped: reg(
                registry,
                IntCounter::new(
                    "amslb_access_log_dropped_total",
                    "Access log lines dropped because the writer fell behind.",
                )?,
            )?,
            udp_dropped: counter(
                "amslb_udp_dropped_datagrams_total",
                "Datagrams a udp listener dropped, by reason (session_limit, no_node, session_failed, node_busy, client_busy).",
                &["listener", "reason"],
            )?,
            no_node: counter(
                "amslb_no_node_total",
                "Requests and L4 sessions refused because no node of the group (or its backup) was usable.",
                &["listener", "group"],
            )?,
            tls_handshake_failures: counter(
                "amslb_tls_handshake_failures_total",
                "Client TLS handshakes that failed, by reason: error (not TLS, no common version or cipher, a certificate the client refused), closed (the client left first, as TCP probes do) or timeout (no handshake within the listener's limit).",
                &["listener", "reason"],
            )?,
            worker_connections: gauge(
                "amslb_worker_connections",
                "Client connections each serving thread holds now (`[global] workers`; new ones go to the thread with fewest).",
                &["worker"],
            )?,
            l4_sessions: counter(
                "amslb_l4_sessions_total",
                "L4 sessions (RTMP, RTMPS, SRT) relayed to a node.",
                L4,
            )?,
            l4_open_sessions: gauge(
                "amslb_l4_open_sessions",
                "L4 sessions open now, by the node they are relayed to.",
                &["listener", "protocol", "node"],
            )?,
            l4_rejected: counter(
                "amslb_l4_rejected_total",
                "L4 clients closed before reaching a node: malformed or slow start, or over the session cap.",
                L4,
            )?,
            rtmp_publishes: counter(
                "amslb_rtmp_publishes_total",
                "RTMP publish commands seen, by application (apps past the first 64 count as \"other\").",
                &["listener", "app"],
            )?,
            build_info: gauge(
                "amslb_build_info",
                "Always 1; the labels carry the version.",
                &["version"],
            )?,
            start_time: reg(
                registry,
                Gauge::new("amslb_start_time_seconds", "Unix time the process started.")?,
            )?,
        })
    }
}

/// Dropped-datagram counters of one `udp` listener, by reason.
#[derive(Debug, Clone)]
pub struct UdpDrops {
    /// A new client over `max_sessions`.
    pub session_limit: IntCounter,
    /// A new client and no usable node.
    pub no_node: IntCounter,
    /// A new client whose socket towards the node could not be opened.
    pub session_failed: IntCounter,
    /// The socket towards the node stayed full (or failed).
    pub node_busy: IntCounter,
    /// The listener socket towards the client stayed full (or failed).
    pub client_busy: IntCounter,
}

/// The registry and the handles the rest of amslb records into.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    families: Families,
    listeners: Mutex<BTreeMap<String, Arc<ListenerMetrics>>>,
    l4: Mutex<BTreeMap<String, Arc<L4Metrics>>>,
    /// Node counters by node id; read lock-free on the data path, copied on write.
    nodes: ArcSwap<HashMap<String, Arc<NodeMetrics>>>,
    nodes_write: Mutex<()>,
}

impl Metrics {
    /// A registry with every family; `cluster` is read at scrape time for node
    /// state and open sessions.
    pub fn new(cluster: Arc<Cluster>) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let families = Families::new(&registry)?;
        registry.register(Box::new(ClusterCollector::new(cluster)?))?;
        families
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        families.start_time.set(unix_now());
        families.last_reload_ok.set(1);
        families.last_reload_success.set(unix_now());
        for result in ["success", "failure"] {
            families.reloads.with_label_values(&[result]);
        }
        Ok(Self {
            registry,
            families,
            listeners: Mutex::default(),
            l4: Mutex::default(),
            nodes: ArcSwap::default(),
            nodes_write: Mutex::new(()),
        })
    }

    /// Handles for listener `name`; the same object for the same name, so a
    /// listener that survives a reload keeps counting where it was.
    pub fn listener(&self, name: &str) -> Arc<ListenerMetrics> {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up on every client connection: no key copied when it exists.
        if let Some(found) = listeners.get(name) {
            return found.clone();
        }
        listeners
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(ListenerMetrics::new(name, &self.families)))
            .clone()
    }

    /// Handles for the L4 listener `name` speaking `protocol` (rtmp, rtmps,
    /// srt); the same object for the same name, like [`Metrics::listener`].
    pub fn l4(&self, name: &str, protocol: &'static str) -> Arc<L4Metrics> {
        let mut l4 = self.l4.lock().unwrap_or_else(|e| e.into_inner());
        match l4.get(name) {
            Some(found) if found.protocol == protocol => found.clone(),
            _ => {
                let created = Arc::new(L4Metrics::new(
                    self.listener(name),
                    protocol,
                    &self.families,
                ));
                l4.insert(name.to_string(), created.clone());
                created
            }
        }
    }

    /// Open L4 sessions by node id, then protocol (rtmp, rtmps, srt), summed
    /// over listeners: what the status page shows per node.
    pub fn l4_open_sessions(&self) -> BTreeMap<String, BTreeMap<String, i64>> {
        let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        for family in self.families.l4_open_sessions.collect() {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                let open = m.get_gauge().get_value() as i64;
                if open > 0 {
                    *out.entry(label("node"))
                        .or_default()
                        .entry(label("protocol"))
                        .or_default() += open;
                }
            }
        }
        out
    }

    /// Forgets listeners a reload removed, so the status page lists only live
    /// ones (their counters stay in `/metrics`: a counter must not go back).
    pub fn retain_listeners(&self, keep: impl Fn(&str) -> bool) {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.retain(|name, _| keep(name));
    }

    /// Handles of every listener, by name.
    pub fn listeners(&self) -> Vec<Arc<ListenerMetrics>> {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.values().cloned().collect()
    }

    /// Counters for `node`. Lock-free when the node was seen before (the usual
    /// case); the first request to a new node builds its handles once.
    pub fn node(&self, node: &Node) -> Arc<NodeMetrics> {
        if let Some(found) = self.nodes.load().get(node.id())
            && found.group == node.group()
        {
            return found.clone();
        }
        let _guard = self.nodes_write.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.nodes.load_full();
        if let Some(found) = current.get(node.id())
            && found.group == node.group()
        {
            return found.clone();
        }
        let created = Arc::new(NodeMetrics::new(node.group(), node.id(), &self.families));
        let mut next = HashMap::clone(&current);
        next.insert(node.id().to_string(), created.clone());
        self.nodes.store(Arc::new(next));
        created
    }

    /// Runs `f` with the counters of `node` without touching the `Arc`'s
    /// reference count: the per-request path (a lock-free map read).
    pub fn with_node<R>(&self, node: &Node, f: impl FnOnce(&NodeMetrics) -> R) -> R {
        let nodes = self.nodes.load();
        match nodes.get(node.id()) {
            Some(found) if found.group == node.group() => f(found),
            _ => {
                drop(nodes);
                f(&self.node(node))
            }
        }
    }

    /// Counters of a node already seen, without creating them.
    pub fn known_node(&self, id: &str) -> Option<Arc<NodeMetrics>> {
        self.nodes.load().get(id).cloned()
    }

    /// Drops the series of nodes that left the cluster, so autoscaling does not
    /// grow the label set forever.
    fn forget_nodes_not_in(&self, membership: &Membership) {
        let gone: Vec<Arc<NodeMetrics>> = self
            .nodes
            .load()
            .values()
            .filter(|m| membership.node(&m.id).is_none_or(|n| n.group() != m.group))
            .cloned()
            .collect();
        if gone.is_empty() {
            return;
        }
        let _guard = self.nodes_write.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::clone(&self.nodes.load_full());
        for m in &gone {
            next.remove(&m.id);
            m.remove_series(&self.families);
        }
        self.nodes.store(Arc::new(next));
    }

    /// Records a reload attempt.
    pub fn reload_done(&self, ok: bool) {
        let f = &self.families;
        f.reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
        f.last_reload_ok.set(i64::from(ok));
        if ok {
            f.last_reload_success.set(unix_now());
        }
    }

    /// Records the outcome of a membership source query (`source`: static, mongodb).
    pub fn membership_update(&self, source: &str, ok: bool) {
        self.membership_status(source, ok, ok.then(SystemTime::now));
    }

    /// Records whether the `[state]` MongoDB answered; a failure is counted.
    pub fn shared_state(&self, up: bool) {
        self.families.shared_state_up.set(i64::from(up));
        if !up {
            self.families.shared_state_errors.inc();
        }
    }

    /// Publishes a membership source's state: reachable or not, and when it
    /// last delivered a membership.
    pub fn membership_status(&self, source: &str, up: bool, last_success: Option<SystemTime>) {
        let f = &self.families;
        f.membership_up
            .with_label_values(&[source])
            .set(i64::from(up));
        if let Some(at) = last_success {
            let secs = at
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            f.membership_last_update
                .with_label_values(&[source])
                .set(secs);
        }
    }

    /// Drops the series of a membership source that a reload replaced.
    pub fn forget_membership_source(&self, source: &str) {
        let f = &self.families;
        let _ = f.membership_up.remove_label_values(&[source]);
        let _ = f.membership_last_update.remove_label_values(&[source]);
    }

    /// Publishes the settings that differ from the loaded file until a
    /// restart (empty: the process runs what the file says).
    pub fn set_pending_restart(&self, settings: &[String]) {
        let f = &self.families;
        f.pending_restart.reset();
        for setting in settings {
            f.pending_restart.with_label_values(&[setting]).set(1);
        }
    }

    /// Publishes when the certificate `name` (its main domain) expires.
    pub fn certificate_expiry(&self, name: &str, expires: SystemTime) {
        let secs = expires
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.families
            .cert_expiry
            .with_label_values(&[name])
            .set(secs);
    }

    /// Records an ACME order result (`issued`, `failed`, ...).
    pub fn acme_order(&self, result: &str) {
        self.families.acme_orders.with_label_values(&[result]).inc();
    }

    /// Counts one refusal by limit `limit` on `listener`.
    pub fn limited(&self, listener: &str, limit: &str) {
        self.families
            .limited
            .with_label_values(&[listener, limit])
            .inc();
    }

    /// Counters of datagrams dropped by `udp` listener `listener`, one per
    /// reason, all created (at 0) now so every series exists from the start.
    pub fn udp_drops(&self, listener: &str) -> UdpDrops {
        let c = |reason| {
            self.families
                .udp_dropped
                .with_label_values(&[listener, reason])
        };
        UdpDrops {
            session_limit: c("session_limit"),
            no_node: c("no_node"),
            session_failed: c("session_failed"),
            node_busy: c("node_busy"),
            client_busy: c("client_busy"),
        }
    }

    /// Gauge of the client connections serving thread `index` holds.
    pub fn worker_connections(&self, index: usize) -> IntGauge {
        self.families
            .worker_connections
            .with_label_values(&[&index.to_string()])
    }

    /// Counter of access log lines dropped under back-pressure.
    pub fn access_log_dropped(&self) -> IntCounter {
        self.families.access_log_dropped.clone()
    }

    /// Reads what the status page shows besides nodes: reload state,
    /// certificates, membership sources.
    pub fn overview(&self) -> Overview {
        let f = &self.families;
        Overview {
            reloads_ok: f.reloads.with_label_values(&["success"]).get(),
            reloads_failed: f.reloads.with_label_values(&["failure"]).get(),
            last_reload_ok: f.last_reload_ok.get() == 1,
            last_reload_success: f.last_reload_success.get(),
            start_time: f.start_time.get(),
            certificates: gauge_values(&f.cert_expiry.collect()),
            membership_up: gauge_values(&f.membership_up.collect()),
            membership_last_update: gauge_values(&f.membership_last_update.collect()),
            access_log_dropped: f.access_log_dropped.get(),
            pending_restart: gauge_values(&f.pending_restart.collect())
                .into_iter()
                .map(|(setting, _)| setting)
                .collect(),
        }
    }

    /// The whole registry in the Prometheus text format.
    pub fn render(&self, cluster: &Cluster) -> String {
        self.forget_nodes_not_in(&cluster.snapshot());
        let mut out = Vec::new();
        // Encoding into a Vec only fails on an invalid family, which the
        // registry refuses at registration; an empty page is the safe fallback.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            out.clear();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Snapshot of the non-node facts for the status page.
#[derive(Debug, Clone)]
pub struct Overview {
    /// Successful reloads since start.
    pub reloads_ok: u64,
    /// Refused reloads since start.
    pub reloads_failed: u64,
    /// Whether the last reload attempt succeeded.
    pub last_reload_ok: bool,
    /// Unix time the running config was loaded.
    pub last_reload_success: f64,
    /// Unix time the process started.
    pub start_time: f64,
    /// Certificate name → expiry (unix time).
    pub certificates: Vec<(String, f64)>,
    /// Membership source → 1 up / 0 down.
    pub membership_up: Vec<(String, f64)>,
    /// Membership source → unix time of last update.
    pub membership_last_update: Vec<(String, f64)>,
    /// Access log lines dropped.
    pub access_log_dropped: u64,
    /// Settings of the loaded file that wait for a restart.
    pub pending_restart: Vec<String>,
}

/// (only label value, value) of every series of a one-label gauge family.
fn gauge_values(families: &[MetricFamily]) -> Vec<(String, f64)> {
    families
        .iter()
        .flat_map(|f| f.get_metric())
        .filter_map(|m| {
            let label = m.get_label().first()?.value().to_string();
            Some((label, m.get_gauge().get_value()))
        })
        .collect()
}

/// Resolved handles of one route of one listener.
#[derive(Debug)]
struct RouteHandles {
    route: &'static str,
    requests: [IntCounter; 5],
    duration: Histogram,
    tunnels: IntCounter,
    open_tunnels: IntGauge,
}

impl RouteHandles {
    fn new(listener: &str, route: &'static str, f: &Families) -> Self {
        Self {
            route,
            requests: CODE_CLASSES.map(|c| f.requests.with_label_values(&[listener, route, c])),
            duration: f.duration.with_label_values(&[listener, route]),
            tunnels: f.tunnels.with_label_values(&[listener, route]),
            open_tunnels: f.open_tunnels.with_label_values(&[listener, route]),
        }
    }
}

/// Counters of one listener, resolved once.
#[derive(Debug)]
pub struct ListenerMetrics {
    name: Arc<str>,
    families: Families,
    routes: [OnceLock<RouteHandles>; ROUTE_SLOTS],
    received: IntCounter,
    sent: IntCounter,
    connections: IntCounter,
    open_connections: IntGauge,
    retries: IntCounter,
    redispatches: IntCounter,
    aborts: IntCounter,
}

impl ListenerMetrics {
    fn new(name: &str, f: &Families) -> Self {
        Self {
            name: name.into(),
            families: f.clone(),
            routes: std::array::from_fn(|_| OnceLock::new()),
            received: f.received.with_label_values(&[name]),
            sent: f.sent.with_label_values(&[name]),
            connections: f.connections.with_label_values(&[name]),
            open_connections: f.open_connections.with_label_values(&[name]),
            retries: f.retries.with_label_values(&[name]),
            redispatches: f.redispatches.with_label_values(&[name]),
            aborts: f.aborts.with_label_values(&[name]),
        }
    }

    /// The listener's name, shared (for access log lines).
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Runs `f` with the handles of `route`. Slots fill on first use and are
    /// never replaced, so a lookup is a short scan of initialised cells; route
    /// names are a small fixed set, the overflow path only guards against a bug.
    fn with_route<R>(&self, route: &'static str, f: impl FnOnce(&RouteHandles) -> R) -> R {
        for slot in &self.routes {
            let handles = slot.get_or_init(|| RouteHandles::new(&self.name, route, &self.families));
            if handles.route == route {
                return f(handles);
            }
        }
        f(&RouteHandles::new(&self.name, route, &self.families))
    }

    /// Records a finished request: what the client got (`status`, bytes, time)
    /// and, when a node answered, the node's share.
    pub fn request_done(
        &self,
        route: &'static str,
        node: Option<&NodeMetrics>,
        status: u16,
        elapsed: Duration,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let class = code_class(status);
        self.with_route(route, |h| {
            h.requests[class].inc();
            h.duration.observe(elapsed.as_secs_f64());
        });
        self.received.inc_by(bytes_in);
        self.sent.inc_by(bytes_out);
        if let Some(node) = node {
            node.requests[class].inc();
            node.sent.inc_by(bytes_in);
            node.received.inc_by(bytes_out);
        }
    }

    /// Counts an accepted connection until the guard drops.
    pub fn connection_opened(&self) -> OpenGuard {
        self.connections.inc();
        OpenGuard::new(self.open_connections.clone())
    }

    /// Counts a tunnel (upgrade, TCP or UDP session) until the guard drops.
    pub fn tunnel_opened(&self, route: &'static str) -> OpenGuard {
        self.with_route(route, |h| {
            h.tunnels.inc();
            OpenGuard::new(h.open_tunnels.clone())
        })
    }

    /// Counts bytes relayed through a tunnel, client side and node side.
    pub fn tunnel_bytes(&self, node: Option<&NodeMetrics>, from_client: u64, to_client: u64) {
        self.received.inc_by(from_client);
        self.sent.inc_by(to_client);
        if let Some(node) = node {
            node.sent.inc_by(from_client);
            node.received.inc_by(to_client);
        }
    }

    /// Counts a request the client abandoned before getting a response head
    /// (it has no status, so it is not in `amslb_requests_total`).
    pub fn client_aborted(&self) {
        self.aborts.inc();
    }

    /// Counts a request or session refused because `group` (and its backup)
    /// had no usable node.
    pub fn no_node(&self, group: &str) {
        self.families
            .no_node
            .with_label_values(&[&self.name, group])
            .inc();
    }

    /// Counts a retry on another node.
    pub fn retry(&self) {
        self.retries.inc();
    }

    /// Counts a client TLS handshake that failed with an error of `kind`:
    /// `timeout` (TimedOut), `closed` (UnexpectedEof: the client left before
    /// it finished, as TCP probes do) or `error` (anything else: not TLS, no
    /// common version or cipher, an alert). Resolved on use: plain listeners
    /// get no series, and a failure costs one label lookup.
    pub fn tls_handshake_failed(&self, kind: std::io::ErrorKind) {
        let reason = match kind {
            std::io::ErrorKind::TimedOut => "timeout",
            std::io::ErrorKind::UnexpectedEof => "closed",
            _ => "error",
        };
        self.families
            .tls_handshake_failures
            .with_label_values(&[&self.name, reason])
            .inc();
    }

    /// Counts a sticky session moved to another node.
    pub fn redispatch(&self) {
        self.redispatches.inc();
    }

    /// Requests answered so far, per code class.
    pub fn requests_by_class(&self) -> [u64; 5] {
        let mut out = [0; 5];
        for handles in self.routes.iter().filter_map(OnceLock::get) {
            for (sum, c) in out.iter_mut().zip(&handles.requests) {
                *sum += c.get();
            }
        }
        out
    }

    /// Connections open now.
    pub fn open_connections(&self) -> i64 {
        self.open_connections.get()
    }

    /// Tunnels open now, all routes.
    pub fn open_tunnels(&self) -> i64 {
        self.routes
            .iter()
            .filter_map(OnceLock::get)
            .map(|h| h.open_tunnels.get())
            .sum()
    }
}

/// Decrements a gauge when dropped: an open connection or tunnel.
#[derive(Debug)]
pub struct OpenGuard(IntGauge);

impl OpenGuard {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Most distinct `app` label values of `amslb_rtmp_publishes_total` per
/// listener: the app is chosen by clients, so the label set must be bounded.
const MAX_APPS: usize = 64;

/// Handles of one L4 listener (`tcp`, `tls`, `udp`): its sessions, the nodes
/// they are open on, refusals and RTMP publishes. Bytes and connections go to
/// the listener's [`ListenerMetrics`] and the node's [`NodeMetrics`], the
/// families HTTP uses too.
#[derive(Debug)]
pub struct L4Metrics {
    listener: Arc<ListenerMetrics>,
    protocol: &'static str,
    families: Families,
    sessions: IntCounter,
    rejected: IntCounter,
    /// App names given a label of their own so far (at most [`MAX_APPS`]).
    apps: Mutex<Vec<String>>,
}

impl L4Metrics {
    fn new(listener: Arc<ListenerMetrics>, protocol: &'static str, f: &Families) -> Self {
        let labels = [listener.name().as_ref(), protocol];
        Self {
            sessions: f.l4_sessions.with_label_values(&labels),
            rejected: f.l4_rejected.with_label_values(&labels),
            listener,
            protocol,
            families: f.clone(),
            apps: Mutex::default(),
        }
    }

    /// The listener's shared handles (bytes, connections, retries, no-node).
    pub fn listener(&self) -> &Arc<ListenerMetrics> {
        &self.listener
    }

    /// The protocol label (rtmp, rtmps, srt).
    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    /// Counts a session relayed to `node`, open until the guard drops.
    pub fn session_opened(&self, node: &str) -> OpenGuard {
        self.sessions.inc();
        OpenGuard::new(self.families.l4_open_sessions.with_label_values(&[
            self.listener.name(),
            self.protocol,
            node,
        ]))
    }

    /// Counts a client closed before reaching a node (bad or slow start, cap).
    pub fn rejected(&self) {
        self.rejected.inc();
    }

    /// Counts an RTMP publish on `app`.
    pub fn publish(&self, app: &str) {
        let label = {
            let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
            if apps.iter().any(|a| a == app) {
                app
            } else if apps.len() < MAX_APPS {
                apps.push(app.to_string());
                app
            } else {
                "other"
            }
        };
        self.families
            .rtmp_publishes
            .with_label_values(&[self.listener.name(), label])
            .inc();
    }
}

/// Counters of one node, resolved once.
#[derive(Debug)]
pub struct NodeMetrics {
    group: String,
    id: String,
    requests: [IntCounter; 5],
    connect_failures: IntCounter,
    received: IntCounter,
    sent: IntCounter,
    health_duration: Histogram,
    health_failures: IntCounter,
}

impl NodeMetrics {
    fn new(group: &str, id: &str, f: &Families) -> Self {
        let node = [group, id];
        Self {
            group: group.to_string(),
            id: id.to_string(),
            requests: CODE_CLASSES.map(|c| f.node_requests.with_label_values(&[group, id, c])),
            connect_failures: f.node_connect_failures.with_label_values(&node),
            received: f.node_received.with_label_values(&node),
            sent: f.node_sent.with_label_values(&node),
            health_duration: f.health_duration.with_label_values(&node),
            health_failures: f.health_failures.with_label_values(&node),
        }
    }

    fn remove_series(&self, f: &Families) {
        let node = [self.group.as_str(), self.id.as_str()];
        for c in CODE_CLASSES {
            let _ = f
                .node_requests
                .remove_label_values(&[&self.group, &self.id, c]);
        }
        let _ = f.node_connect_failures.remove_label_values(&node);
        let _ = f.node_received.remove_label_values(&node);
        let _ = f.node_sent.remove_label_values(&node);
        let _ = f.health_duration.remove_label_values(&node);
        let _ = f.health_failures.remove_label_values(&node);
    }

    /// Counts a failed connection attempt to the node.
    pub fn connect_failed(&self) {
        self.connect_failures.inc();
    }

    /// Records an active health check (the health checker calls this; the
    /// history itself is kept by [`crate::health::Health`]).
    pub fn health_check(&self, ok: bool, elapsed: Duration) {
        self.health_duration.observe(elapsed.as_secs_f64());
        if !ok {
            self.health_failures.inc();
        }
    }

    /// Requests forwarded so far, per code class.
    pub fn requests_by_class(&self) -> [u64; 5] {
        self.requests.each_ref().map(IntCounter::get)
    }

    /// Failed connection attempts so far.
    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.get()
    }
}

/// Reads node state and open sessions from the cluster snapshot at scrape time.
struct ClusterCollector {
    cluster: Arc<Cluster>,
    state: IntGaugeVec,
    sessions: IntGaugeVec,
    cpu: GaugeVec,
    memory: GaugeVec,
    /// Two scrapes at once must not interleave their reset-and-fill.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for ClusterCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterCollector")
    }
}

impl ClusterCollector {
    fn new(cluster: Arc<Cluster>) -> prometheus::Result<Self> {
        Ok(Self {
            cluster,
            state: IntGaugeVec::new(
                Opts::new(
                    "amslb_node_state",
                    "1 for the node's current state (up, down, draining, stale), 0 for the others.",
                ),
                &["group", "node", "state"],
            )?,
            sessions: IntGaugeVec::new(
                Opts::new(
                    "amslb_node_active_sessions",
                    "Requests and tunnels this balancer has open on the node.",
                ),
                &["group", "node"],
            )?,
            cpu: GaugeVec::new(
                Opts::new(
                    "amslb_node_cpu_ratio",
                    "Cpu use the node last reported (0..1), when its membership source reports it.",
                ),
                &["group", "node"],
            )?,
            memory: GaugeVec::new(
                Opts::new(
                    "amslb_node_memory_ratio",
                    "Memory use the node last reported (0..1), when its membership source reports it.",
                ),
                &["group", "node"],
            )?,
            scrape: Mutex::new(()),
        })
    }
}

impl Collector for ClusterCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.state
            .desc()
            .into_iter()
            .chain(self.sessions.desc())
            .chain(self.cpu.desc())
            .chain(self.memory.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _guard = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.state.reset();
        self.sessions.reset();
        self.cpu.reset();
        self.memory.reset();
        for node in self.cluster.snapshot().nodes() {
            let current = node_state(node);
            for state in NODE_STATES {
                self.state
                    .with_label_values(&[node.group(), node.id(), state])
                    .set(i64::from(state == current));
            }
            self.sessions
                .with_label_values(&[node.group(), node.id()])
                .set(node.active_sessions() as i64);
            let load = node.reported_load();
            for (vec, value) in [(&self.cpu, load.cpu), (&self.memory, load.memory)] {
                if let Some(percent) = value {
                    vec.with_label_values(&[node.group(), node.id()])
                        .set(f64::from(percent) / 100.0);
                }
            }
        }
        let mut out = self.state.collect();
        out.extend(self.sessions.collect());
        out.extend(self.cpu.collect());
        out.extend(self.memory.collect());
        out
    }
}

/// Fixtures shared by the unit tests of the operations modules.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::cluster::NodeSpec;

    /// A node on 127.0.1.`octet`, AMS ports.
    pub(crate) fn spec(id: &str, group: &str, octet: u8) -> NodeSpec {
        NodeSpec::on_default_ports(id, group, [127, 0, 1, octet].into())
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::spec;
    use super::*;

    fn cluster() -> Arc<Cluster> {
        let cluster = Arc::new(Cluster::new());
        cluster.update(vec![spec("e1", "edge", 1), spec("o1", "origin", 2)]);
        cluster
    }

    /// Value of the series of `name` whose labels contain all of `labels`.
    fn value(text: &str, name: &str, labels: &[&str]) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .find(|l| labels.iter().all(|want| l.contains(want)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    }

    #[test]
    fn request_counts_land_in_listener_and_node_series() {
        let cluster = cluster();
        let m = Metrics::new(cluster.clone()).unwrap();
        let l = m.listener("play");
        let snap = cluster.snapshot();
        let node = m.node(snap.node("e1").unwrap());
        for _ in 0..3 {
            l.request_done("hls", Some(&node), 200, Duration::from_millis(2), 100, 1000);
        }
        l.request_done("rest", None, 503, Duration::from_millis(1), 50, 20);
        let text = m.render(&cluster);
        assert_eq!(
            value(
                &text,
                "amslb_requests_total",
                &["listener=\"play\"", "route=\"hls\"", "code=\"2xx\""]
            ),
            3.0
        );
        assert_eq!(
            value(
                &text,
                "amslb_requests_total",
                &["route=\"rest\"", "code=\"5xx\""]
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "amslb_node_requests_total",
                &["node=\"e1\"", "code=\"2xx\""]
            ),
            3.0
        );
        assert_eq!(value(&text, "amslb_sent_bytes_total", &["play"]), 3020.0);
        assert_eq!(
            value(&text, "amslb_node_received_bytes_total", &["e1"]),
            3000.0
        );
        assert_eq!(
            value(
                &text,
                "amslb_request_duration_seconds_count",
                &["route=\"hls\""]
            ),
            3.0
        );
        assert_eq!(l.requests_by_class(), [0, 3, 0, 0, 1]);
        // The same listener name gives the same counters (reload keeps them).
        assert_eq!(m.listener("play").requests_by_class(), [0, 3, 0, 0, 1]);
        m.retain_listeners(|name| name != "play");
        assert!(m.listeners().is_empty());
        assert!(Arc::ptr_eq(&node, &m.node(snap.node("e1").unwrap())));
    }

    #[test]
    fn node_state_and_sessions_are_read_at_scrape_time() {
        let cluster = cluster();
        let m = Metrics::new(cluster.clone()).unwrap();
        let snap = cluster.snapshot();
        let e1 = snap.node("e1").unwrap();
        e1.set_draining(true);
        let _lease = e1.lease();
        snap.node("o1").unwrap().set_healthy(false);
        snap.node("o1").unwrap().set_reported_load(
            crate::cluster::ReportedLoad {
                cpu: Some(42.0),
                memory: None,
            },
            75.0,
        );
        let text = m.render(&cluster);
        assert!((value(&text, "amslb_node_cpu_ratio", &["o1"]) - 0.42).abs() < 1e-6);
        assert!(
            !text.contains("amslb_node_memory_ratio{"),
            "unknown memory is not exported"
        );
        assert_eq!(
            value(&text, "amslb_node_state", &["e1", "state=\"draining\""]),
            1.0
        );
        assert_eq!(
            value(&text, "amslb_node_state", &["e1", "state=\"up\""]),
            0.0
        );
        assert_eq!(
            value(&text, "amslb_node_state", &["o1", "state=\"down\""]),
            1.0
        );
        assert_eq!(value(&text, "amslb_node_active_sessions", &["e1"]), 1.0);
    }

    #[test]
    fn departed_nodes_lose_their_series() {
        let cluster = cluster();
        let m = Metrics::new(cluster.clone()).unwrap();
        let node = m.node(cluster.snapshot().node("o1").unwrap());
        m.listener("x")
            .request_done("rest", Some(&node), 200, Duration::ZERO, 0, 0);
        assert!(m.render(&cluster).contains("node=\"o1\""));
        cluster.update(vec![]);
        let text = m.render(&cluster);
        assert!(!text.contains("node=\"o1\""), "{text}");
        assert!(m.known_node("o1").is_none());
    }

    #[test]
    fn tunnels_and_connections_are_gauges_released_on_drop() {
        let m = Metrics::new(cluster()).unwrap();
        let l = m.listener("ws");
        let conn = l.connection_opened();
        let tunnel = l.tunnel_opened("websocket");
        assert_eq!((l.open_connections(), l.open_tunnels()), (1, 1));
        drop(tunnel);
        drop(conn);
        assert_eq!((l.open_connections(), l.open_tunnels()), (0, 0));
    }

    #[test]
    fn route_slots_overflow_still_counts() {
        let m = Metrics::new(cluster()).unwrap();
        let l = m.listener("x");
        const ROUTES: [&str; ROUTE_SLOTS + 2] = [
            "r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9", "r10", "r11", "r12", "r13",
            "r14", "r15", "r16", "r17",
        ];
        for route in ROUTES {
            l.request_done(route, None, 200, Duration::ZERO, 0, 0);
        }
        let text = m.render(&Cluster::new());
        assert_eq!(
            value(&text, "amslb_requests_total", &["route=\"r17\"", "2xx"]),
            1.0
        );
    }

    #[test]
    fn health_checks_feed_duration_and_failures() {
        let cluster = cluster();
        let m = Metrics::new(cluster.clone()).unwrap();
        let node = m.node(cluster.snapshot().node("e1").unwrap());
        node.health_check(true, Duration::from_millis(1));
        node.health_check(false, Duration::from_millis(1));
        let text = m.render(&cluster);
        assert_eq!(
            value(&text, "amslb_health_check_failures_total", &["e1"]),
            1.0
        );
        assert_eq!(
            value(&text, "amslb_health_check_duration_seconds_count", &["e1"]),
            2.0
        );
    }

    #[test]
    fn metrics_registry_builds() {
        // Runtime::new relies on this never failing.
        assert!(Metrics::new(Arc::new(Cluster::new())).is_ok());
    }

    #[test]
    fn with_node_creates_then_reuses() {
        let cluster = cluster();
        let m = Metrics::new(cluster.clone()).unwrap();
        let snap = cluster.snapshot();
        let e1 = snap.node("e1").unwrap();
        m.with_node(e1, |n| n.connect_failed());
        m.with_node(e1, |n| n.connect_failed());
        assert_eq!(m.known_node("e1").unwrap().connect_failures(), 2);
    }

    #[test]
    fn code_classes() {
        assert_eq!(CODE_CLASSES[code_class(101)], "1xx");
        assert_eq!(CODE_CLASSES[code_class(204)], "2xx");
        assert_eq!(CODE_CLASSES[code_class(302)], "3xx");
        assert_eq!(CODE_CLASSES[code_class(404)], "4xx");
        assert_eq!(CODE_CLASSES[code_class(503)], "5xx");
        assert_eq!(CODE_CLASSES[code_class(999)], "5xx");
    }

    #[test]
    fn reloads_and_sources_are_recorded() {
        let cluster = cluster();
        let m = Metrics::new(cluster.clone()).unwrap();
        m.reload_done(false);
        m.membership_update("mongodb", true);
        m.certificate_expiry(
            "live.example.com",
            UNIX_EPOCH + Duration::from_secs(2_000_000_000),
        );
        let text = m.render(&cluster);
        assert_eq!(
            value(&text, "amslb_config_reloads_total", &["failure"]),
            1.0
        );
        assert_eq!(
            value(&text, "amslb_config_last_reload_successful", &[]),
            0.0
        );
        assert_eq!(
            value(&text, "amslb_membership_source_up", &["mongodb"]),
            1.0
        );
        let o = m.overview();
        assert_eq!(o.certificates, [("live.example.com".to_string(), 2e9)]);
        assert_eq!((o.reloads_ok, o.reloads_failed), (0, 1));
    }
}
