//! The body types of a client's exchange: the request body the handler
//! gets, and what amslb answers with: a node's streamed body, or a short
//! body amslb wrote itself (errors, redirects).

use super::guard::NodeBody;
use super::record::Exchange;
use crate::cluster::NodeLease;
use crate::transport::BoxError;
use crate::transport::Lent;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A client's request body as the handler gets it.
#[derive(Debug)]
pub enum RequestBody {
    /// Read by hyper's server (h2, and HTTP/1.1 requests with a body or an
    /// upgrade).
    Hyper(Incoming),
    /// None: a request amslb's own HTTP/1.1 server read (`http::h1` takes
    /// only requests without a body).
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Hyper(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(body) => body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(body) => body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A response body sent to a client.
#[derive(Debug)]
pub enum ResponseBody {
    /// Streamed from a node, chunk by chunk as it arrives (never buffered
    /// whole: HLS segments and long polls pass through as they come). The
    /// lease keeps the session counted on the node until the body is done.
    Node {
        /// The node's body, with its idle timeout (boxed: it is much larger
        /// than a local body).
        body: Box<NodeBody>,
        /// Counts the session for least-conn until dropped.
        lease: Option<NodeLease>,
        /// The node connection, back to its pool once the body has ended.
        connection: Option<Lent>,
        /// Metrics and access log record, written when the body ends or is dropped.
        record: Option<Exchange>,
    },
    /// Written by amslb.
    Local(Full<Bytes>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Node {
                body,
                lease,
                connection,
                record,
            } => {
                let polled = Pin::new(body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(data), Some(record)) = (frame.data_ref(), record.as_mut()) {
                            record.add_bytes_out(data.len() as u64);
                        }
                    }
                    Poll::Ready(None) => {
                        // The body is complete: the session on the node is
                        // over and its connection free for another request.
                        lease.take();
                        connection.take();
                        record.take();
                    }
                    _ => {}
                }
                polled
            }
            ResponseBody::Local(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(|never| match never {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Node { body, .. } => body.is_end_stream(),
            ResponseBody::Local(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Node { body, .. } => body.size_hint(),
            ResponseBody::Local(full) => full.size_hint(),
        }
    }
}

/// A plain-text response written by amslb, e.g. `503` with the reason.
pub fn local_response(status: StatusCode, text: &str) -> Response<ResponseBody> {
    let body = format!(
        "{} {}\n{text}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    plain_text(status, body)
}

/// A response with `body` as plain text, not cacheable: every answer amslb
/// writes itself (errors, refusals, rule answers) goes out this way.
pub fn plain_text(status: StatusCode, body: String) -> Response<ResponseBody> {
    uncached(status, body, "text/plain; charset=utf-8")
}

/// A JSON answer of amslb's API on a proxy listener. Never cached (it changes
/// with load and health); readable by pages of any origin, since player pages
/// are served from elsewhere than the balancer and the answer holds nothing a
/// page of another origin must not read.
pub fn api_json(status: StatusCode, body: &serde_json::Value) -> Response<ResponseBody> {
    let mut response = uncached(status, body.to_string(), "application/json");
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

/// An answer amslb wrote itself: `body` as `content_type`, never cached.
fn uncached(
    status: StatusCode,
    body: String,
    content_type: &'static str,
) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::Local(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A redirect to `location` (HAProxy's `redirect scheme https` answers 302 too).
pub fn redirect(location: &str) -> Response<ResponseBody> {
    let mut response = local_response(StatusCode::FOUND, location);
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

pub use crate::transport::UpstreamBody;
