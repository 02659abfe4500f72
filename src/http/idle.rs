//! Inactivity limits on client connections: a client that reads nothing
//! ([`WriteTimeout`]), an HTTP/2 connection without requests
//! ([`ConnActivity`]) and an HTTP/2 stream whose window the client never
//! opens ([`StreamWatch`]). All of them use `timeouts.client`, like HAProxy's
//! `timeout client`, which bounds client inactivity in both directions.

use bytes::Bytes;
use http::{Request, Response, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::{Service, service_fn};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
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
/// (hyper's HTTP/2 server has no idle timeout of its own).
#[derive(Debug)]
pub struct ConnActivity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` at which the connection last went idle.
    idle_since: AtomicU64,
}

impl Default for ConnActivity {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
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
/// window would hold the node connection behind it forever. A watchdog task
/// drops the inner body (releasing the node connection and its lease) once
/// it has not been polled for `timeouts.client`; the stream is then reset
/// when hyper next polls it.
#[derive(Debug)]
pub struct StreamWatch<B> {
    slot: Arc<Slot<B>>,
    _active: ActiveRequest,
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

impl<B: Body + Send + 'static> StreamWatch<B> {
    /// Carries `body`; `active` keeps the connection counted busy meanwhile.
    /// With `limit` (HTTP/2 streams), the watchdog runs too.
    pub fn new(body: B, active: ActiveRequest, limit: Option<Duration>) -> Self {
        let done = body.is_end_stream();
        let slot = Arc::new(Slot {
            body: Mutex::new(Some(body)),
            started: Instant::now(),
            last_poll: AtomicU64::new(0),
        });
        if let (false, Some(limit)) = (done, limit) {
            tokio::spawn(watch(Arc::downgrade(&slot), limit));
        }
        Self {
            slot,
            _active: active,
        }
    }
}

/// Wraps a request handler so every request counts on `activity` until its
/// response body is gone, and HTTP/2 response bodies get a [`StreamWatch`]
/// with `limit` (`timeouts.client`).
pub fn tracked<F, Fut, B, E>(
    activity: Arc<ConnActivity>,
    limit: Duration,
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
        let watch = (request.version() == Version::HTTP_2).then_some(limit);
        let answer = handle(request);
        async move {
            let response = answer.await?;
            Ok(response.map(|body| StreamWatch::new(body, active, watch)))
        }
    })
}

async fn watch<B>(slot: Weak<Slot<B>>, limit: Duration) {
    loop {
        let Some(next) = slot.upgrade().map(|s| s.last_poll() + limit) else {
            return;
        };
        tokio::time::sleep_until(next).await;
        let Some(slot) = slot.upgrade() else { return };
        if slot.last_poll() + limit <= Instant::now() {
            if slot.lock().take().is_some() {
                tracing::info!(
                    "h2 stream not read by the client for timeouts.client, node released"
                );
            }
            return;
        }
    }
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
