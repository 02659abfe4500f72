//! The TLS handshake of a client connection; what runs over it is the HTTP
//! layer's business (`http::serve`) or the L4 relay's.

use super::server_config::is_acme_validation;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

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
