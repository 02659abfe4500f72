//! Live cluster membership from AMS's node registry in MongoDB
//! (`[cluster] source = "mongodb"`).
//!
//! One background task owns everything: it reads the whole collection, then
//! follows a change stream (replica sets) or polls (standalone servers, or
//! while a broken stream cannot be reopened), and keeps the [`Cluster`]
//! snapshot in line through [`tracker::Tracker`]. The data path never waits on
//! MongoDB: it only reads the snapshot and the nodes' atomics.
//!
//! Failure handling:
//! - start-up never blocks: the driver gets short server-selection and connect
//!   timeouts, and amslb serves its static (or empty) membership until MongoDB
//!   first answers;
//! - every (re)connect does a full read, with the change stream opened before
//!   it, so no change falls in between;
//! - a change stream that breaks is reopened from its resume token, or the
//!   task polls every `poll_interval` and tries the stream again later;
//! - while MongoDB is unreachable the last membership stays, the freshness
//!   clock stops (see [`freshness`]), the outage is logged once and retried
//!   with capped exponential backoff, and [`SourceStatus`] says so.

mod document;
mod freshness;
mod resolve;
mod roles;
mod tracker;

use crate::cluster::Cluster;
use crate::config::ClusterConfig;
use crate::config::mongo::MongoUri;
use freshness::ConnectedClock;
use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{Document, doc};
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::options::{ClientOptions, FullDocumentType};
use mongodb::{Client, Collection};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;
use tokio::time::{MissedTickBehavior, interval_at, sleep};
use tokio_util::sync::CancellationToken;
use tracker::Tracker;

/// How long the driver may look for a server before an operation fails. The
/// driver's default (30 s) would stall start-up and every retry.
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// TCP (and TLS) connect timeout to MongoDB.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound on one full read, in case a server accepts and then hangs.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// First and largest pause between attempts while MongoDB is unreachable.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// While polling, how often to try opening a change stream again.
const STREAM_RETRY: Duration = Duration::from_secs(30);

/// The fields of a registry document the balancer reads (`_id` comes anyway).
fn projection() -> Document {
    doc! { "ip": 1, "lastUpdateTime": 1, "cpu": 1, "memory": 1 }
}

/// What the MongoDB source is doing, for metrics and the status page.
#[derive(Debug, Default)]
pub struct SourceStatus {
    connected: AtomicBool,
    change_stream: AtomicBool,
    /// Epoch milliseconds of the last successful read or change event; 0 = never.
    last_success_ms: AtomicU64,
}

impl SourceStatus {
    /// Whether the last operation on MongoDB succeeded.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Whether changes arrive through a change stream (else by polling).
    pub fn uses_change_stream(&self) -> bool {
        self.change_stream.load(Ordering::Relaxed)
    }

    /// When MongoDB last answered, if ever.
    pub fn last_success(&self) -> Option<SystemTime> {
        match self.last_success_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }
}

/// A driver client for `uri` with short timeouts, so a MongoDB that does
/// not answer fails an operation in seconds instead of the driver's 30.
/// Values the operator put in the URI win.
pub async fn client(uri: &MongoUri) -> mongodb::error::Result<Client> {
    let mut opts = ClientOptions::parse(uri.expose()).await?;
    opts.server_selection_timeout
        .get_or_insert(SERVER_SELECTION_TIMEOUT);
    opts.connect_timeout.get_or_insert(CONNECT_TIMEOUT);
    opts.app_name.get_or_insert_with(|| "amslb".into());
    Client::with_options(opts)
}

/// Why the source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// `[cluster] uri` is missing (validation normally catches this).
    #[error("[cluster] uri is required with source = \"mongodb\"")]
    NoUri,
}

/// A running MongoDB source.
#[derive(Debug)]
pub struct MongoSource {
    /// The background task; it ends when the shutdown token is cancelled.
    pub task: JoinHandle<()>,
    /// Live status, shared with the task.
    pub status: Arc<SourceStatus>,
}

/// Starts following the registry described by `cfg` into `cluster`. Returns at
/// once; the membership changes only once MongoDB answers, so the caller may
/// seed `cluster` with the static nodes first. Must run inside a Tokio runtime.
pub fn spawn(
    cfg: &ClusterConfig,
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
) -> Result<MongoSource, SpawnError> {
    let uri = cfg.uri.clone().ok_or(SpawnError::NoUri)?;
    let status = Arc::new(SourceStatus::default());
    let runner = Runner {
        uri,
        database: cfg.database.clone(),
        collection: cfg.collection.clone(),
        poll_interval: cfg.poll_interval,
        // Staleness is re-judged on a timer, not only on events: often enough
        // that a dead node leaves close to `stale_after`, rarely enough to cost nothing.
        stale_tick: (cfg.stale_after / 10)
            .clamp(Duration::from_millis(100), Duration::from_secs(1)),
        // In stream mode a periodic full read also detects a silently dead
        // connection (no RST) before nodes could go stale behind our back.
        resync: cfg.stale_after / 2,
        cluster,
        shutdown,
        status: status.clone(),
        tracker: Tracker::new(cfg),
        clock: ConnectedClock::new(Instant::now()),
        resume: None,
        last_answer: Instant::now(),
        outage_logged: false,
        polling_logged: false,
    };
    Ok(MongoSource {
        task: tokio::spawn(runner.run()),
        status,
    })
}

/// Why the source failed one step.
#[derive(Debug, thiserror::Error)]
enum SourceError {
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the change stream ended")]
    StreamEnded,
}

/// How a follow or poll phase ended.
enum End {
    Shutdown,
    /// MongoDB stopped answering.
    Lost(SourceError),
    /// The change stream failed but MongoDB may be fine: re-read and reopen.
    StreamBroke(SourceError),
    /// Time to try a change stream again.
    RetryStream,
}

type Events = ChangeStream<ChangeStreamEvent<Document>>;

struct Runner {
    uri: MongoUri,
    database: String,
    collection: String,
    poll_interval: Duration,
    stale_tick: Duration,
    resync: Duration,
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
    status: Arc<SourceStatus>,
    tracker: Tracker,
    clock: ConnectedClock,
    resume: Option<ResumeToken>,
    /// When MongoDB last answered: an outage is counted from here.
    last_answer: Instant,
    outage_logged: bool,
    polling_logged: bool,
}

impl Runner {
    async fn run(mut self) {
        let shutdown = self.shutdown.clone();
        let mut backoff = BACKOFF_MIN;
        let coll = loop {
            match self.connect().await {
                Ok(coll) => break coll,
                Err(e) => {
                    self.lost(&e);
                    if !self.pause(&mut backoff).await {
                        return;
                    }
                }
            }
        };
        let mut stream_due = Instant::now();
        loop {
            // Open the stream before the full read so nothing falls in between.
            let stream = if Instant::now() >= stream_due {
                let opened = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    opened = self.open_stream(&coll) => opened,
                };
                if let Err(e) = &opened
                    && is_unreachable(e)
                {
                    self.lost(&e.clone().into());
                    if !self.pause(&mut backoff).await {
                        return;
                    }
                    continue;
                }
                Some(opened)
            } else {
                None
            };
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                read = self.read_all(&coll) => read,
            };
            if let Err(e) = read {
                self.lost(&e);
                stream_due = Instant::now();
                if !self.pause(&mut backoff).await {
                    return;
                }
                continue;
            }
            backoff = BACKOFF_MIN;
            let end = match stream {
                Some(Ok(stream)) => {
                    self.polling_logged = false;
                    self.follow(&coll, stream).await
                }
                Some(Err(e)) => {
                    stream_due = Instant::now() + STREAM_RETRY;
                    if !self.polling_logged {
                        tracing::info!(
                            "MongoDB change streams unavailable ({e}); polling every {:?}",
                            self.poll_interval
                        );
                        self.polling_logged = true;
                    }
                    self.poll(&coll, stream_due).await
                }
                None => self.poll(&coll, stream_due).await,
            };
            match end {
                End::Shutdown => return,
                End::RetryStream => {}
                End::StreamBroke(e) => {
                    tracing::warn!("MongoDB change stream broke ({e}); re-reading and reopening");
                }
                End::Lost(e) => {
                    self.lost(&e);
                    stream_due = Instant::now();
                    if !self.pause(&mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// Builds the client. No network I/O for `mongodb://` URIs; `mongodb+srv://`
    /// resolves DNS here, which may fail and is retried like an outage.
    async fn connect(&self) -> Result<Collection<Document>, SourceError> {
        let client = client(&self.uri).await?;
        Ok(client.database(&self.database).collection(&self.collection))
    }

    /// Sleeps `backoff` (then doubles it, capped); false when shut down meanwhile.
    async fn pause(&self, backoff: &mut Duration) -> bool {
        let wait = *backoff;
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = sleep(wait) => true,
        }
    }

    /// Opens a change stream, resuming after the last event seen when possible.
    async fn open_stream(
        &mut self,
        coll: &Collection<Document>,
    ) -> Result<Events, mongodb::error::Error> {
        let watch = || coll.watch().full_document(FullDocumentType::UpdateLookup);
        if let Some(token) = self.resume.take() {
            match watch().resume_after(token).await {
                Ok(stream) => return Ok(stream),
                Err(e) if is_unreachable(&e) => return Err(e),
                // Token too old for the oplog, or invalidated: the full read covers the gap.
                Err(e) => {
                    tracing::debug!("cannot resume the change stream ({e}); opening a new one")
                }
            }
        }
        let stream = watch().await?;
        self.resume = stream.resume_token();
        Ok(stream)
    }

    /// Reads the whole collection and publishes it.
    async fn read_all(&mut self, coll: &Collection<Document>) -> Result<(), SourceError> {
        let read = async {
            let cursor = coll.find(doc! {}).projection(projection()).await?;
            cursor.try_collect::<Vec<Document>>().await
        };
        let docs = tokio::time::timeout(READ_TIMEOUT, read)
            .await
            .map_err(|_| SourceError::Timeout(READ_TIMEOUT))??;
        let now = self.answered();
        self.tracker.replace_all(&docs, now, wall_ms());
        self.tracker.publish(&self.cluster, now);
        Ok(())
    }

    /// Follows the change stream until it breaks, MongoDB is lost or shutdown.
    async fn follow(&mut self, coll: &Collection<Document>, mut stream: Events) -> End {
        self.status.change_stream.store(true, Ordering::Relaxed);
        let shutdown = self.shutdown.clone();
        let resolver = self.tracker.resolver();
        let mut stale_tick = ticker(self.stale_tick);
        let mut resync = ticker(self.resync);
        let end = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break End::Shutdown,
                _ = stale_tick.tick() => self.republish(),
                _ = resolver.changed() => self.republish(),
                _ = resync.tick() => {
                    if let Err(e) = self.read_all(coll).await {
                        break End::Lost(e);
                    }
                }
                event = stream.next() => match event {
                    Some(Ok(event)) => {
                        self.apply(event);
                        self.resume = stream.resume_token();
                    }
                    Some(Err(e)) if is_unreachable(&e) => break End::Lost(e.into()),
                    Some(Err(e)) => break End::StreamBroke(e.into()),
                    None => break End::StreamBroke(SourceError::StreamEnded),
                },
            }
        };
        self.status.change_stream.store(false, Ordering::Relaxed);
        end
    }

    /// Polls every `poll_interval` until MongoDB is lost, shutdown, or `stream_due`.
    async fn poll(&mut self, coll: &Collection<Document>, stream_due: Instant) -> End {
        let shutdown = self.shutdown.clone();
        let resolver = self.tracker.resolver();
        let mut stale_tick = ticker(self.stale_tick);
        let mut poll = ticker(self.poll_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return End::Shutdown,
                _ = stale_tick.tick() => self.republish(),
                _ = resolver.changed() => self.republish(),
                _ = poll.tick() => {
                    if let Err(e) = self.read_all(coll).await {
                        return End::Lost(e);
                    }
                    if Instant::now() >= stream_due {
                        return End::RetryStream;
                    }
                }
            }
        }
    }

    /// Takes one change event into the picture and publishes.
    fn apply(&mut self, event: ChangeStreamEvent<Document>) {
        let now = self.answered();
        let removed = || {
            event
                .document_key
                .as_ref()
                .and_then(|key| key.get("_id"))
                .map(document::id_text)
        };
        match event.operation_type {
            OperationType::Insert | OperationType::Update | OperationType::Replace => {
                match &event.full_document {
                    Some(doc) => self.tracker.upsert(doc, now, wall_ms()),
                    // Update looked up after a delete: the document is gone.
                    None => {
                        if let Some(id) = removed() {
                            self.tracker.remove(&id);
                        }
                    }
                }
            }
            OperationType::Delete => {
                if let Some(id) = removed() {
                    self.tracker.remove(&id);
                }
            }
            // The collection was dropped or renamed: this stream cannot resume;
            // it ends next, and the full read that follows sees what is left.
            OperationType::Invalidate => self.resume = None,
            _ => {}
        }
        self.tracker.publish(&self.cluster, now);
    }

    /// Re-judges staleness with no new data.
    fn republish(&mut self) {
        let now = self.clock.now_ms(Instant::now());
        self.tracker.publish(&self.cluster, now);
    }

    /// Records that MongoDB answered; returns the connected-clock time.
    fn answered(&mut self) -> i64 {
        let at = Instant::now();
        self.clock.resume(at);
        self.last_answer = at;
        if !self.status.connected.swap(true, Ordering::Relaxed) {
            tracing::info!("reading cluster membership from MongoDB");
        }
        self.outage_logged = false;
        self.status
            .last_success_ms
            .store(u64::try_from(wall_ms()).unwrap_or(0), Ordering::Relaxed);
        self.clock.now_ms(at)
    }

    /// Records an outage: the membership stays, only the first failure of an
    /// outage is logged as a warning, and the freshness clock stops as of the
    /// last answer. Noticing an outage takes a while (a server-selection
    /// timeout at least), and heartbeats written meanwhile could not be seen
    /// either, so that time does not count against nodes: stale flags set in
    /// it are undone at once.
    fn lost(&mut self, e: &SourceError) {
        self.clock.pause(self.last_answer);
        if self.status.connected.swap(false, Ordering::Relaxed) {
            self.republish();
        }
        if self.outage_logged {
            tracing::debug!("MongoDB still failing: {e}");
        } else {
            tracing::warn!(
                "cannot read cluster membership from MongoDB ({e}); keeping the last known membership and retrying"
            );
            self.outage_logged = true;
        }
    }
}

/// Whether `e` means no server could be reached (an outage, not a stream problem).
fn is_unreachable(e: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    matches!(
        *e.kind,
        ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::DnsResolve { .. }
    )
}

/// An interval whose first tick is one period from now, skipping missed ticks.
fn ticker(period: Duration) -> tokio::time::Interval {
    let mut t = interval_at(tokio::time::Instant::now() + period, period);
    t.set_missed_tick_behavior(MissedTickBehavior::Skip);
    t
}

/// Our wall clock in epoch milliseconds (0 if the clock is before 1970).
fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, freshness::millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_starts_disconnected_and_unknown() {
        let status = SourceStatus::default();
        assert!(!status.is_connected());
        assert!(!status.uses_change_stream());
        assert_eq!(status.last_success(), None);
        status.last_success_ms.store(1_500, Ordering::Relaxed);
        assert_eq!(
            status.last_success(),
            Some(UNIX_EPOCH + Duration::from_millis(1_500))
        );
    }
}
