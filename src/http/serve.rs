//! Serving HTTP on one client connection, plain or over TLS: the one place
//! where hyper's server side is set up, so h1 and h2 get the same limits.

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::transport::BoxError;

/// Limits applied to every client connection.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Bounds reading a request head, and how long an idle HTTP/1.1
    /// keep-alive connection is kept (`timeouts.client`).
    pub header_read_timeout: Duration,
    /// Largest request head (`global.max_header_bytes`).
    pub max_header_bytes: usize,
}

/// Which HTTP versions a connection may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// HTTP/1.1 only (plain listeners; ALPN chose `http/1.1`).
    Http1,
    /// h2 only (ALPN chose `h2`).
    Http2,
    /// Either, told apart by the connection preface (TLS without ALPN).
    Sniff,
}

impl Versions {
    /// What a TLS connection may speak, given the protocol ALPN agreed on.
    pub fn from_alpn(alpn: Option<&[u8]>) -> Self {
        match alpn {
            Some(b"h2") => Versions::Http2,
            Some(b"http/1.1") => Versions::Http1,
            _ => Versions::Sniff,
        }
    }
}

/// Serves HTTP on `io` with `service` until the client closes; HTTP/1.1
/// connections keep upgrades working (WebSocket). On `shutdown` the
/// connection finishes its in-flight requests and closes.
pub async fn serve_http<IO, S, B>(
    io: IO,
    versions: Versions,
    service: S,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> Result<(), BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let io = TokioIo::new(io);
    if versions == Versions::Http1 {
        // hyper's own HTTP/1 server: the auto builder would read a preface
        // first, a cost every plain keep-alive connection would pay.
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .keep_alive(true);
        let conn = builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(conn);
        return tokio::select! {
            result = conn.as_mut() => result,
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
        .map_err(Into::into);
    }
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = match versions {
        Versions::Http2 => builder.http2_only(),
        _ => builder,
    };
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}
