//! Inactivity limits on client connections: a client that reads nothing
//! ([`WriteTimeout`]), an HTTP/2 connection without requests
//! ([`ConnActivity`]) and an HTTP/2 stream whose window the client never
//! opens ([`StreamWatch`]). All of them use `timeouts.client`, like HAProxy's
//! `timeout client`, which bounds client inactivity in both directions.

use bytes::Bytes;
use foldhash::HashMap;
use http::{Request, Response, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::{Service, service_fn};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::transport::BoxError;

use crate::tunnel::WRITE_TIMEOUT;
pub use crate::tunnel::{IdleTimer, WriteTimeout};

/// Whether `error` (or one of its sources) is a [`WriteTimeout`] expiring.
pub fn is_write_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<io::Error>().is_some_and(|io| {
            io.kind() == io::ErrorKind::TimedOut && io.to_string() == WRITE_TIMEOUT
        }) {
            return true;
        }
        next = e.source();
    }
    false
}

/// Requests in flight on one HTTP/2 connection and when the last one ended,
/// so the connection can be closed after `timeouts.client` without any
/// (hyper's HTTP/2 server has no idle timeout of its own); and the response
/// bodies its streams are sending, for [`ConnActivity::release_stalled_streams`].
#[derive(Debug)]
pub struct ConnActivity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` at which the connection last went idle.
    idle_since: AtomicU64,
    streams: Mutex<Streams>,
}

/// The watched response bodies of one connection, each under a key of its
/// own that its [`StreamWatch`] removes when the stream ends.
#[derive(Default)]
struct Streams {
    next_key: u64,
    live: HashMap<u64, Arc<dyn Releasable>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("live", &self.live.len())
            .finish()
    }
}

/// A watched body, whatever its type: when it was last polled, and how to
/// drop it.
trait Releasable: Send + Sync {
    fn last_poll(&self) -> Instant;
    fn release(&self);
}

impl Default for ConnActivity {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            streams: Mutex::default(),
        }
    }
}

impl ConnActivity {
    /// Counts a request as in flight until the guard (carried by its
    /// response body) is dropped.
    pub fn enter(self: &Arc<Self>) -> ActiveRequest {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let since =
                self.started + Duration::from_millis(self.idle_since.load(Ordering::Relaxed));
            let busy = self.in_flight.load(Ordering::Relaxed) > 0;
            if !busy && since + limit <= Instant::now() {
                return;
            }
            // Busy: look again after `limit`; a request ending restarts the wait.
            let next = if busy {
                Instant::now() + limit
            } else {
                since + limit
            };
            tokio::time::sleep_until(next).await;
        }
    }

    /// Drops the body of every stream not polled for `limit`, looking every
    /// quarter of it (so a stalled stream goes after 1 to 1.25 × `limit`);
    /// runs as long as the connection. One sweep per connection instead of a
    /// watchdog task spawned for every stream (1.5 % of the instructions of
    /// a small h2 request, callgrind), whose timer could outlive the stream
    /// by up to `limit`.
    pub async fn release_stalled_streams(&self, limit: Duration) {
        // At least 1 ms: a zero period would panic (config refuses a zero
        // limit; this keeps a tiny one from spinning).
        let mut sweeps = tokio::time::interval((limit / 4).max(Duration::from_millis(1)));
        sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            sweeps.tick().await;
            let now = Instant::now();
            let stalled: Vec<Arc<dyn Releasable>> = self
                .lock_streams()
                .live
                .values()
                .filter(|body| body.last_poll() + limit <= now)
                .cloned()
                .collect();
            // Outside the lock: dropping a body hands its node connection back.
            for body in stalled {
                body.release();
            }
        }
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn watch(&self, body: Arc<dyn Releasable>) -> u64 {
        let mut streams = self.lock_streams();
        let key = streams.next_key;
        streams.next_key += 1;
        streams.live.insert(key, body);
        key
    }
}

/// One request in flight on a [`ConnActivity`].
#[derive(Debug)]
pub struct ActiveRequest(Arc<ConnActivity>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let a = &self.0;
        let now = u64::try_from(a.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.idle_since.store(now, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body on an HTTP/2 stream. hyper polls it only while the
/// client's flow-control window has room, so a client that never opens the
/// window would hold the node connection behind it forever. The
/// connection's sweep ([`ConnActivity::release_stalled_streams`]) drops the
/// inner body (releasing the node connection and its lease) once it has not
/// been polled for `timeouts.client`; the stream is then reset when hyper
/// next polls it.
#[derive(Debug)]
pub struct StreamWatch<B> {
    slot: Arc<Slot<B>>,
    /// Where the sweep finds this body, when it is watched.
    key: Option<u64>,
    active: ActiveRequest,
}

#[derive(Debug)]
struct Slot<B> {
    body: Mutex<Option<B>>,
    started: Instant,
    /// Milliseconds after `started` of the last poll.
    last_poll: AtomicU64,
}

impl<B> Slot<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<B>> {
        self.body.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn last_poll(&self) -> Instant {
        self.started + Duration::from_millis(self.last_poll.load(Ordering::Relaxed))
    }
}

impl<B: Send> Releasable for Slot<B> {
    fn last_poll(&self) -> Instant {
        Slot::last_poll(self)
    }

    fn release(&self) {
        if self.lock().take().is_some() {
            tracing::info!("h2 stream not read by the client for timeouts.client, node released");
        }
    }
}

impl<B: Body + Send + 'static> StreamWatch<B> {
    /// Carries `body`; `active` keeps the connection counted busy meanwhile.
    /// With `watch` (HTTP/2 streams), the connection's sweep watches it too.
    pub fn new(body: B, active: ActiveRequest, watch: bool) -> Self {
        let done = body.is_end_stream();
        let slot = Arc::new(Slot {
            body: Mutex::new(Some(body)),
            started: Instant::now(),
            last_poll: AtomicU64::new(0),
        });
        let key = (watch && !done).then(|| active.0.watch(slot.clone()));
        Self { slot, key, active }
    }
}

impl<B> Drop for StreamWatch<B> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.active.0.lock_streams().live.remove(&key);
        }
    }
}

/// Wraps a request handler so every request counts on `activity` until its
/// response body is gone, and HTTP/2 response bodies are watched by its
/// sweep ([`ConnActivity::release_stalled_streams`]).
pub fn tracked<F, Fut, B, E>(
    activity: Arc<ConnActivity>,
    handle: F,
) -> impl Service<
    Request<Incoming>,
    Response = Response<StreamWatch<B>>,
    Error = E,
    Future: Send + 'static,
> + Send
+ 'static
where
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
    E: Into<BoxError>,
{
    service_fn(move |request: Request<Incoming>| {
        let active = activity.enter();
        let watch = request.version() == Version::HTTP_2;
        let answer = handle(request);
        async move {
            let response = answer.await?;
            Ok(response.map(|body| StreamWatch::new(body, active, watch)))
        }
    })
}

impl<B> Body for StreamWatch<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let slot = &self.slot;
        let now = u64::try_from(slot.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        slot.last_poll.store(now, Ordering::Relaxed);
        let mut body = slot.lock();
        match body.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            None => Poll::Ready(Some(Err(
                "client did not read the stream for timeouts.client".into(),
            ))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.slot.lock().as_ref().is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.slot
            .lock()
            .as_ref()
            .map_or_else(SizeHint::default, Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    /// A body that never ends; the count of what it holds tells whether it
    /// was dropped.
    struct Endless {
        _held: Arc<()>,
    }

    impl Body for Endless {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    fn alive_tasks() -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    #[tokio::test]
    async fn finished_h2_streams_leave_no_task_and_no_entry_behind() {
        let activity = Arc::new(ConnActivity::default());
        let tasks = alive_tasks();
        for _ in 0..100 {
            let body = Full::new(Bytes::from_static(b"segment"));
            let watched = StreamWatch::new(body, activity.enter(), true);
            assert_eq!(activity.lock_streams().live.len(), 1);
            let sent = watched.collect().await.unwrap().to_bytes();
            assert_eq!(sent, "segment");
        }
        assert_eq!(activity.lock_streams().live.len(), 0);
        assert_eq!(alive_tasks(), tasks, "a task per stream outlived it");
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_releases_a_stream_not_polled_for_the_limit() {
        let activity = Arc::new(ConnActivity::default());
        let limit = Duration::from_secs(30);
        let sweep = tokio::spawn({
            let activity = activity.clone();
            async move { activity.release_stalled_streams(limit).await }
        });
        let held = Arc::new(());
        let mut watched = StreamWatch::new(
            Endless {
                _held: held.clone(),
            },
            activity.enter(),
            true,
        );

        // Polled at 20 s (the client opened its window): the clock restarts.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let poll = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut watched).poll_frame(cx)));
        assert!(poll.await.is_pending());
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(Arc::strong_count(&held), 2, "released before the limit");

        // Not polled since: gone within a quarter of the limit after it.
        tokio::time::sleep(Duration::from_secs(1) + limit / 4).await;
        assert_eq!(Arc::strong_count(&held), 1, "still held after 1.25 x limit");
        let poll = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut watched).poll_frame(cx)));
        assert!(
            matches!(poll.await, Poll::Ready(Some(Err(_)))),
            "the stream is reset"
        );
        drop(watched);
        assert_eq!(activity.lock_streams().live.len(), 0);
        sweep.abort();
    }
}
