//! State shared by every amslb instance of a deployment (`[state]`): node
//! drains, and instance heartbeats carrying each instance's session counts.
//!
//! A drain set through any instance's admin API is written to the
//! `drains` collection of the `[state]` database, with who set it, when, and
//! an optional deadline; every instance follows that collection (a change
//! stream, and a read every second anyway; polling every 100 ms where change
//! streams are not offered) and applies it to its nodes, so a drain reaches
//! every instance within a second. Without `[state]` the same drains live in
//! this process only.
//!
//! A drained node takes no new session; it is *out* (sticky clients leave it
//! too) once its deadline passes or it has no session left through any
//! instance (its [`Node::cluster_load`] is 0). Open tunnels are
//! never cut by a drain: they end on their own.
//!
//! Every ~2 s each instance writes a heartbeat to `instances` with its open
//! sessions per node and reads its peers': a node's [`Node::cluster_load`]
//! (what least-conn and the stream-hash load bound place by) adds the live
//! peers' counts to its own, and the status page lists the live peers.
//!
//! MongoDB being down never stops routing: the last known drains stay
//! applied, the outage is logged once and exported
//! (`amslb_shared_state_up`), and a change made meanwhile is refused with
//! the reason rather than applied to one instance only.

use crate::cluster::mongodb::client;
use crate::cluster::{Cluster, Node};
use crate::config::Config;
use crate::metrics::Metrics;
use futures_util::{StreamExt, TryStreamExt};
use mongodb::Collection;
use mongodb::bson::{Document, doc};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Collection of the drain documents, in the `[state]` database.
pub const DRAINS: &str = "drains";
/// How often drains are applied to the nodes (deadlines, sessions reaching 0).
const APPLY_EVERY: Duration = Duration::from_millis(200);
/// With a change stream, how often the whole collection is read anyway.
const RESYNC_EVERY: Duration = Duration::from_secs(1);
/// Without one, how often it is polled (a tiny collection: cheap).
const POLL_EVERY: Duration = Duration::from_millis(100);
/// Collection of the instance heartbeats.
pub const INSTANCES: &str = "instances";
/// How often an instance writes its heartbeat and reads its peers'.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// A peer whose heartbeat is older than this is gone.
const PEER_GONE_AFTER: Duration = Duration::from_secs(6);
/// Longest wait for one MongoDB operation.
const OP_TIMEOUT: Duration = Duration::from_secs(3);

/// One node's drain (serialisable so an upgrade can hand it on).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Drain {
    /// Who asked: user and address of the admin request.
    pub by: String,
    /// The instance that took the request.
    pub instance: String,
    /// When, in Unix milliseconds.
    pub at_ms: i64,
    /// When the node is out regardless of its sessions, in Unix milliseconds.
    pub deadline_ms: Option<i64>,
}

impl Drain {
    fn to_document(&self, node: &str) -> Document {
        doc! {
            "_id": node,
            "by": &self.by,
            "instance": &self.instance,
            "at_ms": self.at_ms,
            "deadline_ms": self.deadline_ms,
        }
    }

    fn from_document(doc: &Document) -> Option<(String, Self)> {
        let node = doc.get_str("_id").ok()?.to_string();
        Some((
            node,
            Self {
                by: doc.get_str("by").unwrap_or("?").to_string(),
                instance: doc.get_str("instance").unwrap_or("?").to_string(),
                at_ms: doc.get_i64("at_ms").unwrap_or(0),
                deadline_ms: doc.get_i64("deadline_ms").ok(),
            },
        ))
    }

    /// The drain as the status API shows it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "by": self.by,
            "instance": self.instance,
            "at_ms": self.at_ms,
            "deadline_ms": self.deadline_ms,
        })
    }
}

/// Another amslb instance, from its last heartbeat.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its name (`[state] instance`).
    pub instance: String,
    /// Its process id (two processes of one instance run during an upgrade).
    pub pid: u32,
    /// When it last wrote its heartbeat, in Unix milliseconds.
    pub at_ms: i64,
    /// Its open sessions by node id.
    pub sessions: HashMap<String, usize>,
}

impl Peer {
    fn from_document(doc: &Document) -> Option<Self> {
        let sessions = doc
            .get_array("sessions")
            .ok()?
            .iter()
            .filter_map(|entry| {
                let entry = entry.as_document()?;
                let count = usize::try_from(entry.get_i64("count").ok()?).ok()?;
                Some((entry.get_str("node").ok()?.to_string(), count))
            })
            .collect();
        Some(Self {
            instance: doc.get_str("instance").ok()?.to_string(),
            pid: u32::try_from(doc.get_i64("pid").ok()?).ok()?,
            at_ms: doc.get_i64("at_ms").ok()?,
            sessions,
        })
    }
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The drains this instance knows and applies, and where they are shared.
#[derive(Debug)]
pub struct SharedState {
    known: Mutex<HashMap<String, Drain>>,
    /// The shared drains collection, once `[state]` is configured and a client exists.
    store: OnceLock<Collection<Document>>,
    /// Live peers from the last heartbeat read.
    peers: Mutex<Vec<Peer>>,
    shared: bool,
    instance: String,
    outage: Outage,
}

impl SharedState {
    /// The shared state for `config`: shared through MongoDB when `[state]` is set.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Arc<Self> {
        let instance = config
            .state
            .as_ref()
            .map_or_else(|| "local".into(), |s| s.instance_name());
        Arc::new(Self {
            known: Mutex::default(),
            store: OnceLock::new(),
            peers: Mutex::default(),
            shared: config.state.is_some(),
            instance,
            outage: Outage::new(
                metrics,
                "routing goes on with the last known drains",
                "shared drains resume",
            ),
        })
    }

    /// This instance's name in drain records.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The drain of `node`, if any.
    pub fn get(&self, node: &str) -> Option<Drain> {
        self.lock().get(node).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Drain>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets (`Some`) or ends (`None`) the drain of `node`: stored in MongoDB
    /// first when shared (every instance applies it from there), then
    /// applied here at once. `Err` says why nothing changed.
    pub async fn set(
        &self,
        cluster: &Cluster,
        node: &str,
        drain: Option<Drain>,
    ) -> Result<(), String> {
        if self.shared {
            let Some(store) = self.store.get() else {
                return Err("the [state] MongoDB was not reached yet; drain not changed".into());
            };
            let write = async {
                match &drain {
                    Some(d) => store
                        .replace_one(doc! { "_id": node }, d.to_document(node))
                        .upsert(true)
                        .await
                        .map(|_| ()),
                    None => store.delete_one(doc! { "_id": node }).await.map(|_| ()),
                }
            };
            let result = tokio::time::timeout(OP_TIMEOUT, write).await;
            match result {
                Ok(Ok(())) => self.answered(),
                Ok(Err(e)) => {
                    self.failed(&e.to_string());
                    return Err(format!("the [state] MongoDB refused the change: {e}"));
                }
                Err(_) => {
                    self.failed("no answer in time");
                    return Err("the [state] MongoDB did not answer; drain not changed".into());
                }
            }
        }
        {
            let mut known = self.lock();
            match drain {
                Some(d) => known.insert(node.to_string(), d),
                None => known.remove(node),
            };
        }
        self.apply(cluster, now_ms());
        Ok(())
    }

    /// Every drain this instance knows, by node id (what an upgrade hands on).
    pub fn known(&self) -> Vec<(String, Drain)> {
        self.lock()
            .iter()
            .map(|(node, drain)| (node.clone(), drain.clone()))
            .collect()
    }

    /// Starts from `drains`, the previous process's, until MongoDB answers
    /// (which replaces them by what it holds).
    pub fn start_from(&self, drains: Vec<(String, Drain)>) {
        self.lock().extend(drains);
    }

    /// Replaces the known drains by what MongoDB holds, logging each change.
    fn replace(&self, docs: &[Document]) {
        let fresh: HashMap<String, Drain> = docs.iter().filter_map(Drain::from_document).collect();
        let mut known = self.lock();
        for (node, drain) in &fresh {
            if known.get(node) != Some(drain) {
                info!(node, by = %drain.by, instance = %drain.instance, deadline_ms = ?drain.deadline_ms, "shared drain applied");
            }
        }
        for node in known.keys().filter(|n| !fresh.contains_key(*n)) {
            info!(node, "shared drain ended");
        }
        *known = fresh;
    }

    /// Brings every node in line with the drains at `now`: a drained node is
    /// draining; it is out once its deadline passed or no session is left on
    /// it through any instance.
    pub fn apply(&self, cluster: &Cluster, now: i64) {
        let known = self.lock();
        for node in cluster.snapshot().nodes() {
            let drain = known.get(node.id());
            node.set_draining(node.spec().drain || drain.is_some());
            // Sessions through every instance count (the peers' from their
            // heartbeats; only this one's while MongoDB is down).
            let out = drain.is_some_and(|d| {
                d.deadline_ms.is_some_and(|deadline| now >= deadline) || node.cluster_load() == 0
            });
            if node.set_out(out) != out && out {
                info!(
                    node = node.id(),
                    sessions = node.active_sessions(),
                    "drain complete: the node is out"
                );
            }
        }
    }

    /// The live peers, for the status page.
    pub fn peers_json(&self) -> serde_json::Value {
        let now = now_ms();
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        serde_json::Value::Array(
            peers
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "instance": p.instance,
                        "pid": p.pid,
                        "heartbeat_age_ms": now - p.at_ms,
                        "sessions": p.sessions.values().sum::<usize>(),
                    })
                })
                .collect(),
        )
    }

    /// This instance's heartbeat: its id, name and open sessions per node.
    fn heartbeat(&self, cluster: &Cluster, now: i64) -> Document {
        let sessions: Vec<Document> = cluster
            .snapshot()
            .nodes()
            .filter(|n| n.active_sessions() > 0)
            .map(|n| {
                doc! {
                    "node": n.id(),
                    "count": i64::try_from(n.active_sessions()).unwrap_or(i64::MAX),
                }
            })
            .collect();
        doc! {
            "_id": self.heartbeat_id(),
            "instance": &self.instance,
            "pid": i64::from(std::process::id()),
            "at_ms": now,
            "sessions": sessions,
        }
    }

    fn heartbeat_id(&self) -> String {
        format!("{}/{}", self.instance, std::process::id())
    }

    /// Takes the peers' heartbeats (this process's own excluded, stale ones
    /// dropped) and sets every node's remote session count from them.
    fn take_peers(&self, cluster: &Cluster, docs: &[Document], now: i64) {
        let own = self.heartbeat_id();
        let gone_before = now - i64::try_from(PEER_GONE_AFTER.as_millis()).unwrap_or(i64::MAX);
        let peers: Vec<Peer> = docs
            .iter()
            .filter(|d| d.get_str("_id").ok() != Some(own.as_str()))
            .filter_map(Peer::from_document)
            .filter(|p| p.at_ms >= gone_before)
            .collect();
        set_remote(cluster, |node| {
            peers.iter().filter_map(|p| p.sessions.get(node.id())).sum()
        });
        *self.peers.lock().unwrap_or_else(PoisonError::into_inner) = peers;
    }

    /// Without peers' figures (MongoDB down), nodes are placed by this
    /// instance's own counts.
    fn forget_peers(&self, cluster: &Cluster) {
        set_remote(cluster, |_| 0);
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn answered(&self) {
        self.outage.answered();
    }

    fn failed(&self, error: &str) {
        self.outage.failed(error);
    }
}

/// An outage of the `[state]` MongoDB as one user of it sees it: logged once
/// when it starts and once when it ends, and exported as
/// `amslb_shared_state_up` / `amslb_shared_state_errors_total`.
#[derive(Debug)]
pub struct Outage {
    metrics: Arc<Metrics>,
    /// An outage was logged and not yet its end.
    logged: AtomicBool,
    /// What goes on meanwhile, for the log line at its start.
    meanwhile: &'static str,
    /// What resumes, for the log line at its end.
    resumes: &'static str,
}

impl Outage {
    /// Outage tracking for one user of the `[state]` MongoDB; `meanwhile`
    /// and `resumes` complete its two log lines.
    pub fn new(metrics: Arc<Metrics>, meanwhile: &'static str, resumes: &'static str) -> Self {
        Self {
            metrics,
            logged: AtomicBool::new(false),
            meanwhile,
            resumes,
        }
    }

    /// MongoDB answered: the outage (if any) is over.
    pub fn answered(&self) {
        self.metrics.shared_state(true);
        if self.logged.swap(false, Ordering::Relaxed) {
            info!("the [state] MongoDB answers again; {}", self.resumes);
        }
    }

    /// MongoDB failed with `error`: logged only at the start of an outage.
    pub fn failed(&self, error: &str) {
        self.metrics.shared_state(false);
        if !self.logged.swap(true, Ordering::Relaxed) {
            warn!(
                error,
                "the [state] MongoDB does not answer: {}", self.meanwhile
            );
        }
    }
}

fn set_remote(cluster: &Cluster, count: impl Fn(&Node) -> usize) {
    for node in cluster.snapshot().nodes() {
        node.set_remote_sessions(count(node));
    }
}

/// Starts applying drains to the nodes and, with `[state]`, following the
/// shared collection. Returns at once; never waits for MongoDB.
///
/// Drains are followed until `shutdown`; heartbeats go on until `hard_stop`,
/// since a process finishing its sessions after an upgrade still counts them.
pub fn spawn(
    config: &Config,
    drains: Arc<SharedState>,
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    let ticker = (drains.clone(), cluster.clone(), shutdown.clone());
    tokio::spawn(async move {
        let (drains, cluster, shutdown) = ticker;
        let mut tick = tokio::time::interval(APPLY_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => drains.apply(&cluster, now_ms()),
            }
        }
    });
    let Some(state) = &config.state else {
        return;
    };
    let Some(uri) = state.uri(&config.cluster).cloned() else {
        return;
    };
    let database = state.database.clone();
    tokio::spawn(async move {
        let database = loop {
            match client(&uri).await {
                Ok(client) => break client.database(&database),
                Err(e) => drains.failed(&e.to_string()),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
        let collection = database.collection::<Document>(DRAINS);
        let _ = drains.store.set(collection.clone());
        let instances = database.collection::<Document>(INSTANCES);
        let take = |read: Result<Vec<Document>, String>| match read {
            Ok(docs) => {
                drains.answered();
                drains.replace(&docs);
                drains.apply(&cluster, now_ms());
            }
            Err(e) => drains.failed(&e),
        };
        tokio::join!(
            follow(&collection, &shutdown, take),
            heartbeats(&drains, &cluster, &instances, &hard_stop),
        );
    });
}

/// Writes this instance's heartbeat and reads the peers' every
/// [`HEARTBEAT_EVERY`] until shutdown; the heartbeat is removed at the end.
async fn heartbeats(
    shared: &SharedState,
    cluster: &Cluster,
    instances: &Collection<Document>,
    shutdown: &CancellationToken,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let beat = shared.heartbeat(cluster, now);
        let exchange = async {
            instances
                .replace_one(doc! { "_id": shared.heartbeat_id() }, beat)
                .upsert(true)
                .await?;
            instances.find(doc! {}).await?.try_collect::<Vec<_>>().await
        };
        match tokio::time::timeout(OP_TIMEOUT, exchange).await {
            Ok(Ok(docs)) => shared.take_peers(cluster, &docs, now),
            Ok(Err(e)) => {
                shared.failed(&e.to_string());
                shared.forget_peers(cluster);
            }
            Err(_) => {
                shared.failed("no answer in time");
                shared.forget_peers(cluster);
            }
        }
    }
    let remove = instances.delete_one(doc! { "_id": shared.heartbeat_id() });
    let _ = tokio::time::timeout(Duration::from_secs(1), remove).await;
}

/// Reads `collection` whole whenever it changes (change stream), every
/// [`RESYNC_EVERY`] anyway, or every [`POLL_EVERY`] where change streams are
/// not offered, until `shutdown`; hands each read (or why it failed) to
/// `take`. The one follower of shared collections: drains here, ACME
/// certificates and challenges in `tls::acme::storage`.
pub async fn follow(
    collection: &Collection<Document>,
    shutdown: &CancellationToken,
    mut take: impl FnMut(Result<Vec<Document>, String>),
) {
    let mut stream = None;
    let mut stream_tried = None::<tokio::time::Instant>;
    loop {
        if stream.is_none() && stream_tried.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            stream_tried = Some(tokio::time::Instant::now());
            stream = tokio::time::timeout(OP_TIMEOUT, collection.watch())
                .await
                .ok()
                .and_then(Result::ok);
        }
        let read = async {
            collection
                .find(doc! {})
                .await?
                .try_collect::<Vec<_>>()
                .await
        };
        match tokio::time::timeout(OP_TIMEOUT, read).await {
            Ok(Ok(docs)) => take(Ok(docs)),
            Ok(Err(e)) => take(Err(e.to_string())),
            Err(_) => take(Err("no answer in time".into())),
        }
        match stream.as_mut() {
            Some(events) => tokio::select! {
                () = shutdown.cancelled() => return,
                event = events.next() => {
                    if !matches!(event, Some(Ok(_))) {
                        stream = None;
                    }
                }
                () = tokio::time::sleep(RESYNC_EVERY) => {}
            },
            None => tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(POLL_EVERY) => {}
            },
        }
    }
}
