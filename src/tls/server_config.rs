//! rustls `ServerConfig`s for the TLS listeners.

use super::challenge::ACME_TLS_ALPN;
use super::resolver::Certificates;
use rustls::ServerConfig;
use rustls::server::ServerSessionMemoryCache;
use std::sync::Arc;

/// Sessions kept for TLS 1.2 session-id resumption (about 100 bytes each).
const SESSION_CACHE_SIZE: usize = 16 * 1024;

/// Config for `https` listeners: ALPN `h2` preferred over `http/1.1`, plus
/// `acme-tls/1` so tls-alpn-01 validation can complete (the resolver hands out
/// challenge certificates only to such handshakes, and the caller closes them:
/// see [`is_acme_validation`]).
pub fn https_server_config(certs: Arc<Certificates>) -> Result<Arc<ServerConfig>, rustls::Error> {
    build(
        certs,
        vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()],
    )
}

/// Config for `tls` (TCP passthrough, RTMPS) listeners: no ALPN, because rustls
/// refuses clients whose offered protocols it does not list, and RTMP clients
/// may offer anything. tls-alpn-01 is validated on port 443 (`https`) only.
pub fn tcp_server_config(certs: Arc<Certificates>) -> Result<Arc<ServerConfig>, rustls::Error> {
    build(certs, Vec::new())
}

fn build(certs: Arc<Certificates>, alpn: Vec<Vec<u8>>) -> Result<Arc<ServerConfig>, rustls::Error> {
    // TLS 1.2 and 1.3 are rustls' defaults; older versions are not implemented at all.
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = alpn;
    // Resumption both ways: stateless tickets (TLS 1.3 and 1.2 clients that ask)
    // and a server-side cache for 1.2 clients that only do session ids.
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// Whether a finished handshake was an ACME tls-alpn-01 validation, which must
/// be closed right away instead of being served (RFC 8737 §3).
pub fn is_acme_validation(conn: &rustls::ServerConnection) -> bool {
    conn.alpn_protocol() == Some(ACME_TLS_ALPN)
}
