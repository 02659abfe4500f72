//! rustls `ServerConfig`s for the TLS listeners.

use super::challenge::ACME_TLS_ALPN;
use super::resolver::Certificates;
use rustls::crypto::CryptoProvider;
use rustls::crypto::hash::HashAlgorithm;
use rustls::server::ServerSessionMemoryCache;
use rustls::{ServerConfig, SupportedCipherSuite};
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
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    // Our order, not the client's (most clients list AES-256 first).
    config.ignore_client_order = true;
    config.alpn_protocols = alpn;
    // Resumption both ways: stateless tickets (TLS 1.3 and 1.2 clients that ask)
    // and a server-side cache for 1.2 clients that only do session ids.
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// The installed provider (aws-lc-rs) with the cipher suites built on
/// SHA-256 first. A suite's hash runs the whole key schedule and transcript
/// of every handshake, and SHA-256 has CPU instructions on current x86 and
/// ARM servers where aws-lc's SHA-384 does not (on AMD EPYC it ran its
/// generic code: 12 % of amslb's CPU in a full-handshake benchmark).
/// AES-128-GCM is what browsers put first themselves.
fn provider() -> CryptoProvider {
    let mut provider = CryptoProvider::get_default()
        .map(|p| CryptoProvider::clone(p))
        .unwrap_or_else(rustls::crypto::aws_lc_rs::default_provider);
    provider
        .cipher_suites
        .sort_by_key(|suite| hash_of(suite) != HashAlgorithm::SHA256);
    provider
}

/// The hash a cipher suite's key schedule and transcript run on.
fn hash_of(suite: &SupportedCipherSuite) -> HashAlgorithm {
    match suite {
        SupportedCipherSuite::Tls12(suite) => suite.common.hash_provider.algorithm(),
        SupportedCipherSuite::Tls13(suite) => suite.common.hash_provider.algorithm(),
    }
}

/// Whether a finished handshake was an ACME tls-alpn-01 validation, which must
/// be closed right away instead of being served (RFC 8737 §3).
pub fn is_acme_validation(conn: &rustls::ServerConnection) -> bool {
    conn.alpn_protocol() == Some(ACME_TLS_ALPN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tls::TlsConfig;
    use rustls::pki_types::{CertificateDer, ServerName};

    /// Certificates for `a.test` in a fresh directory, and the leaf to trust.
    fn certs() -> (
        tempfile::TempDir,
        Arc<Certificates>,
        CertificateDer<'static>,
    ) {
        crate::tls::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());
        std::fs::write(tmp.path().join("a.pem"), pem).unwrap();
        let config = TlsConfig {
            certs_dir: tmp.path().to_path_buf(),
            ..TlsConfig::default()
        };
        let certs = Certificates::open(&config).unwrap();
        (tmp, certs, cert.der().clone())
    }

    /// Handshakes over an in-memory pipe with a client of the default
    /// provider; the ALPN protocol and the cipher suite the server chose.
    async fn handshake(
        server: Arc<ServerConfig>,
        leaf: CertificateDer<'static>,
        alpn: &[&[u8]],
    ) -> Result<(Option<Vec<u8>>, rustls::CipherSuite), std::io::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(leaf).unwrap();
        let mut client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = ServerName::try_from("a.test").unwrap();
        let (server, client) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
        let client = client?;
        server?;
        let session = client.get_ref().1;
        let suite = session.negotiated_cipher_suite().unwrap().suite();
        Ok((session.alpn_protocol().map(<[u8]>::to_vec), suite))
    }

    #[tokio::test]
    async fn the_server_picks_a_sha256_suite_over_the_clients_aes_256_first() {
        let (_tmp, certs, leaf) = certs();
        let client_first = rustls::crypto::aws_lc_rs::default_provider().cipher_suites[0].suite();
        assert_eq!(client_first, rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
        let https = https_server_config(certs).unwrap();
        let (_, suite) = handshake(https, leaf, &[b"h2"]).await.unwrap();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }

    #[tokio::test]
    async fn https_prefers_h2_and_tcp_ignores_foreign_alpn() {
        let (_tmp, certs, leaf) = certs();
        let https = https_server_config(certs.clone()).unwrap();
        let tcp = tcp_server_config(certs).unwrap();
        let chosen = handshake(https.clone(), leaf.clone(), &[b"http/1.1", b"h2"]).await;
        assert_eq!(chosen.unwrap().0.as_deref(), Some(&b"h2"[..]));
        // An RTMPS client offering a protocol of its own: the https config
        // refuses it (no common protocol), the tcp config ignores ALPN.
        assert!(handshake(https, leaf.clone(), &[b"rtmp"]).await.is_err());
        assert_eq!(handshake(tcp, leaf, &[b"rtmp"]).await.unwrap().0, None);
    }
}
