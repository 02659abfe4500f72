//! Accepting TLS connections and serving HTTP/1.1 or h2 over them.

use super::server_config::is_acme_validation;
use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::error::Error as StdError;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Boxed error as hyper-util returns it.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Runs the TLS handshake within `timeout`. `Ok(None)` means the connection
/// was an ACME tls-alpn-01 validation: it has seen the challenge certificate
/// and is closed here, as RFC 8737 wants.
pub async fn handshake<IO>(
    acceptor: &TlsAcceptor,
    io: IO,
    timeout: Duration,
) -> std::io::Result<Option<TlsStream<IO>>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let tls = tokio::time::timeout(timeout, acceptor.accept(io))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
        })??;
    if is_acme_validation(tls.get_ref().1) {
        tracing::info!(
            sni = tls.get_ref().1.server_name().unwrap_or("-"),
            "answered an ACME tls-alpn-01 validation"
        );
        return Ok(None);
    }
    Ok(Some(tls))
}

/// Limits applied to every HTTP connection served over TLS.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Bounds reading a request head, and how long an idle HTTP/1.1
    /// keep-alive connection is kept (`timeouts.client`).
    pub header_read_timeout: Duration,
    /// Largest request head (`global.max_header_bytes`).
    pub max_header_bytes: usize,
}

/// Serves HTTP over an established TLS stream with `service`: h2 when ALPN
/// chose it, HTTP/1.1 (with upgrades, so WebSocket works) when ALPN chose
/// `http/1.1`, and by sniffing the preface when the client sent no ALPN.
/// On `shutdown` the connection finishes its in-flight requests and closes.
pub async fn serve_http<IO, S, B>(
    tls: TlsStream<IO>,
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
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
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
    let builder = match alpn.as_deref() {
        Some(b"h2") => builder.http2_only(),
        Some(b"http/1.1") => builder.http1_only(),
        _ => builder,
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}
