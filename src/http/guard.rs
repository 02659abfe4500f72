//! Telling a client's faults from a node's, and checking what a node sends
//! before a client sees it.
//!
//! Passive health counts failures on real traffic, so only the node's own
//! failures may reach it: a refused or timed-out connect, a connection lost
//! while the node owes bytes, a 5xx, no response head within
//! `timeouts.server` of the request having been sent, or a response body
//! that stalls for `timeouts.server`. A client that aborts its upload, sends
//! a malformed body or uploads slowly is the client's problem: it gets a
//! 4xx and the node is not blamed.

use super::body::RequestBody;
use super::idle::IdleTimer;
use crate::cluster::Node;
use crate::health::Health;
use crate::transport::{BoxError, NodeIncoming};
use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How a client spoiled its own request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientFault {
    /// The body ended early (the client closed) or was malformed (bad chunk).
    #[error("the client's request body was malformed or cut short")]
    BadBody,
    /// No body byte for `timeouts.client`.
    #[error("the client sent no request body bytes for timeouts.client")]
    Stalled,
}

impl ClientFault {
    /// The status the client gets (if it is still there to read it).
    pub fn status(self) -> StatusCode {
        match self {
            ClientFault::BadBody => StatusCode::BAD_REQUEST,
            ClientFault::Stalled => StatusCode::REQUEST_TIMEOUT,
        }
    }
}

/// What the forwarding code and the request body it streams share: whether
/// the whole request has been handed to the node, whether the client failed
/// it, and when the node last took body bytes.
#[derive(Debug)]
pub struct Upload {
    sent: AtomicBool,
    sent_notify: Notify,
    /// 0: no fault, else a [`ClientFault`] (1 + its index).
    fault: AtomicU8,
    started: Instant,
    /// Milliseconds after `started` at which the body was last polled.
    last_poll: AtomicU64,
    /// The last poll found no client bytes: the upload waits for the client.
    client_turn: AtomicBool,
}

impl Upload {
    /// Tracks a request whose body is `body`.
    pub fn new(body: &RequestBody) -> Arc<Self> {
        Arc::new(Self {
            sent: AtomicBool::new(body.is_end_stream()),
            sent_notify: Notify::new(),
            fault: AtomicU8::new(0),
            started: Instant::now(),
            last_poll: AtomicU64::new(0),
            client_turn: AtomicBool::new(false),
        })
    }

    fn mark_sent(&self) {
        if !self.sent.swap(true, Ordering::Relaxed) {
            self.sent_notify.notify_one();
        }
    }

    fn fail(&self, fault: ClientFault) {
        let code = match fault {
            ClientFault::BadBody => 1,
            ClientFault::Stalled => 2,
        };
        let _ = self
            .fault
            .compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The client's fault, if the request failed because of the client.
    pub fn fault(&self) -> Option<ClientFault> {
        match self.fault.load(Ordering::Relaxed) {
            1 => Some(ClientFault::BadBody),
            2 => Some(ClientFault::Stalled),
            _ => None,
        }
    }

    fn polled(&self, waiting_for_client: bool) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_poll.store(now, Ordering::Relaxed);
        self.client_turn
            .store(waiting_for_client, Ordering::Relaxed);
    }

    /// Whether the node has not taken body bytes for `limit` although the
    /// client had some ready (hyper polls the body only when the node's
    /// socket takes more).
    fn node_stalled(&self, limit: Duration) -> bool {
        !self.client_turn.load(Ordering::Relaxed) && self.last_poll() + limit <= Instant::now()
    }

    fn last_poll(&self) -> Instant {
        self.started + Duration::from_millis(self.last_poll.load(Ordering::Relaxed))
    }
}

/// The node gave no response head in time (see [`await_response`]).
#[derive(Debug)]
pub struct NoAnswer;

/// Waits for `send` (the request going out and the response head coming
/// back). `server_timeout` runs from the moment the whole request was sent,
/// so a long upload is not cut; while the upload runs, the node must keep
/// taking its bytes (a node that stops reading for `server_timeout` is
/// failing). A client that stops sending is caught by [`ClientBody`].
pub async fn await_response<F: Future>(
    upload: &Upload,
    server_timeout: Duration,
    send: F,
) -> Result<F::Output, NoAnswer> {
    tokio::pin!(send);
    while !upload.sent.load(Ordering::Relaxed) {
        let stalled_at = upload.last_poll() + server_timeout;
        tokio::select! {
            biased;
            out = &mut send => return Ok(out),
            () = upload.sent_notify.notified() => {}
            () = tokio::time::sleep_until(stalled_at) => {
                if upload.node_stalled(server_timeout) {
                    return Err(NoAnswer);
                }
            }
        }
    }
    tokio::time::timeout(server_timeout, send)
        .await
        .map_err(|_| NoAnswer)
}

/// A client's request body on its way to a node: marks the [`Upload`] sent
/// at its end, failed by the client on an error, and fails it itself when
/// the client sends nothing for `timeouts.client`.
#[derive(Debug)]
pub struct ClientBody {
    body: RequestBody,
    upload: Arc<Upload>,
    timer: IdleTimer,
}

impl ClientBody {
    /// Streams `body`, reporting to `upload`; `idle` is `timeouts.client`.
    pub fn new(body: RequestBody, upload: Arc<Upload>, idle: Duration) -> Self {
        Self {
            body,
            upload,
            timer: IdleTimer::new(idle),
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        this.upload.polled(polled.is_pending());
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.timer.disarm();
                if this.body.is_end_stream() {
                    this.upload.mark_sent();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.upload.mark_sent();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.upload.fail(ClientFault::BadBody);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending if this.timer.expired(cx) => {
                this.upload.fail(ClientFault::Stalled);
                Poll::Ready(Some(Err(ClientFault::Stalled.into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Why a node's answer was not passed on.
#[derive(Debug, thiserror::Error)]
pub enum BadResponse {
    /// 101 to a request that did not ask to upgrade.
    #[error("node {0} switched protocols unasked")]
    UnaskedUpgrade(String),
    /// The body failed before its first byte (bad chunk size, reset).
    #[error("node {0} sent a broken response body: {1}")]
    Body(String, BoxError),
    /// The body's first byte did not come within `timeouts.server`.
    #[error("node {0} sent no response body byte within {1:?}")]
    Stalled(String, Duration),
}

impl BadResponse {
    /// The status the client gets instead.
    pub fn status(&self) -> StatusCode {
        match self {
            BadResponse::Stalled(..) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// Checks a node's response before any of it is sent to the client:
/// a 101 that was not asked for is refused; `Content-Length` next to
/// `Transfer-Encoding` is dropped (the chunked framing is what was read, and
/// the client gets it re-framed); and the first body frame is read, so a body
/// that is broken or stalled from the start becomes a clean 502/504 (counted
/// against the node) instead of a connection closed with no status.
pub async fn vet_response(
    mut response: Response<NodeIncoming>,
    asked_upgrade: bool,
    health: &Arc<Health>,
    node: &Arc<Node>,
    server_timeout: Duration,
) -> Result<Response<Box<NodeBody>>, BadResponse> {
    let id = || node.id().to_string();
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching && !asked_upgrade {
        health.report_failure(node, "switched protocols unasked");
        return Err(BadResponse::UnaskedUpgrade(id()));
    }
    let headers = response.headers_mut();
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let mut first = None;
    if !switching && !response.body().is_end_stream() {
        // Most first frames came with the head: taken without a timer.
        let ready = response.body_mut().frame().now_or_never();
        let polled = match ready {
            Some(frame) => Ok(frame),
            None => tokio::time::timeout(server_timeout, response.body_mut().frame()).await,
        };
        match polled {
            Err(_) => {
                health.report_failure(node, "response body stalled");
                return Err(BadResponse::Stalled(id(), server_timeout));
            }
            Ok(Some(Err(e))) => {
                health.report_failure(node, &format!("broken response body: {e}"));
                return Err(BadResponse::Body(id(), e));
            }
            Ok(Some(Ok(frame))) => first = Some(frame),
            Ok(None) => {}
        }
    }
    let health = health.clone();
    let node = node.clone();
    // Boxed here, not when the response body is made: the phases after
    // this move the response by value, a pointer instead of ~300 bytes.
    Ok(response.map(|body| {
        Box::new(NodeBody {
            first,
            body,
            timer: IdleTimer::new(server_timeout),
            health,
            node,
        })
    }))
}

/// A node's response body with `timeouts.server` between its chunks: a
/// node that stalls mid-body (while the client is waiting for more) or
/// breaks the body is reported as failing and the client's response is cut.
#[derive(Debug)]
pub struct NodeBody {
    first: Option<Frame<Bytes>>,
    body: NodeIncoming,
    timer: IdleTimer,
    health: Arc<Health>,
    node: Arc<Node>,
}

impl Body for NodeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(frame) = this.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                let reason = format!("response body failed: {e}");
                this.health.report_failure(&this.node, &reason);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending if this.timer.expired(cx) => {
                this.health
                    .report_failure(&this.node, "response body stalled");
                Poll::Ready(Some(
                    Err("node stalled mid-body for timeouts.server".into()),
                ))
            }
            Poll::Pending => Poll::Pending,
            done => {
                this.timer.disarm();
                done
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.body.size_hint();
        let first = self
            .first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |d| d.len() as u64);
        if first == 0 {
            return hint;
        }
        let mut shifted = SizeHint::new();
        shifted.set_lower(hint.lower() + first);
        if let Some(upper) = hint.upper() {
            shifted.set_upper(upper + first);
        }
        shifted
    }
}

/// The host a request is for, made the only one the node will see: two
/// `Host` lines are refused (a node and amslb could each read another), and
/// a target with an authority (HTTP/2 `:authority`, an HTTP/1.1
/// absolute-form URI) wins over `Host` and replaces it (RFC 9113 §8.3.1,
/// RFC 9112 §3.2.2), so routing and the node agree on one name.
pub fn resolve_host<B>(
    request: &mut Request<B>,
) -> Result<Option<HeaderValue>, (StatusCode, String)> {
    let headers = request.headers();
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err((
            StatusCode::BAD_REQUEST,
            "more than one Host header".to_string(),
        ));
    }
    let Some(authority) = request.uri().authority() else {
        // The usual case: a clone of the value shares its bytes, no copy.
        return Ok(request.headers().get(header::HOST).cloned());
    };
    let value = HeaderValue::from_str(authority.as_str())
        .map_err(|_| (StatusCode::BAD_REQUEST, "invalid authority".to_string()))?;
    request.headers_mut().insert(header::HOST, value.clone());
    Ok(Some(value))
}
