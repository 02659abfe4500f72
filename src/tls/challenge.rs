//! Pending ACME challenge answers, shared between the ACME task that creates
//! them and the listeners that serve them.
//!
//! http-01 answers are read by the plain HTTP proxy before routing (see
//! [`ChallengeStore::http01_response`]); tls-alpn-01 certificates are served by
//! the SNI resolver to clients that offer only the `acme-tls/1` ALPN protocol.

use super::certs::{CertError, certified_key};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// ALPN protocol id of the tls-alpn-01 challenge (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Path prefix under which http-01 tokens are fetched (RFC 8555 §8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// Whether a request path is an ACME http-01 challenge: such requests must be
/// answered on plain HTTP, never redirected to https nor proxied.
pub fn is_http01_path(path: &str) -> bool {
    path.starts_with(HTTP01_PREFIX)
}

/// Answers for the challenges of orders in flight. Locks are only held to copy
/// a value in or out, never across I/O.
#[derive(Debug, Default)]
pub struct ChallengeStore {
    /// token → key authorization.
    http01: RwLock<HashMap<String, String>>,
    /// domain (lower case) → challenge certificate.
    tls_alpn01: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl ChallengeStore {
    /// The body to answer `GET {path}` with, if `path` is the http-01 URL of a
    /// pending challenge (`200 text/plain` with this body). `None` for any other
    /// path, including unknown tokens under the challenge prefix: the caller
    /// answers those with 404 rather than proxying them.
    pub fn http01_response(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(HTTP01_PREFIX)?;
        let map = self.http01.read().unwrap_or_else(|e| e.into_inner());
        map.get(token).cloned()
    }

    /// The tls-alpn-01 certificate for `domain`, if an order is validating it.
    pub fn tls_alpn01_cert(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        let map = self.tls_alpn01.read().unwrap_or_else(|e| e.into_inner());
        map.get(&domain.trim_end_matches('.').to_ascii_lowercase())
            .cloned()
    }

    pub(crate) fn add_http01(&self, token: &str, key_authorization: &str) {
        let mut map = self.http01.write().unwrap_or_else(|e| e.into_inner());
        map.insert(token.to_string(), key_authorization.to_string());
    }

    pub(crate) fn remove_http01(&self, token: &str) {
        let mut map = self.http01.write().unwrap_or_else(|e| e.into_inner());
        map.remove(token);
    }

    /// Builds and publishes the RFC 8737 certificate for `domain`: a self-signed
    /// certificate naming the domain and carrying the SHA-256 digest of the key
    /// authorization in the critical `acmeIdentifier` extension.
    pub(crate) fn add_tls_alpn01(&self, domain: &str, digest: &[u8]) -> Result<(), CertError> {
        let key = tls_alpn01_cert(domain, digest)?;
        let mut map = self.tls_alpn01.write().unwrap_or_else(|e| e.into_inner());
        map.insert(domain.to_ascii_lowercase(), Arc::new(key));
        Ok(())
    }

    pub(crate) fn remove_tls_alpn01(&self, domain: &str) {
        let mut map = self.tls_alpn01.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&domain.to_ascii_lowercase());
    }
}

fn tls_alpn01_cert(domain: &str, digest: &[u8]) -> Result<CertifiedKey, CertError> {
    let in_memory = Path::new("<tls-alpn-01 challenge certificate>");
    let fail = |e: rcgen::Error| CertError::new(in_memory, e.to_string());
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(fail)?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let cert = params.self_signed(&key).map_err(fail)?;
    // Through the provider's key loader: a DER shortcut gives a
    // key rustls cannot sign with for every scheme the validator offers.
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    certified_key(
        vec![CertificateDer::from(cert.der().to_vec())],
        key_der,
        in_memory,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http01_answers_only_known_tokens() {
        let store = ChallengeStore::default();
        store.add_http01("tok1", "tok1.thumb");
        assert_eq!(
            store
                .http01_response("/.well-known/acme-challenge/tok1")
                .as_deref(),
            Some("tok1.thumb")
        );
        assert_eq!(
            store.http01_response("/.well-known/acme-challenge/tok2"),
            None
        );
        assert_eq!(store.http01_response("/tok1"), None);
        assert!(is_http01_path("/.well-known/acme-challenge/anything"));
        assert!(!is_http01_path("/live/streams/a.m3u8"));
        store.remove_http01("tok1");
        assert_eq!(
            store.http01_response("/.well-known/acme-challenge/tok1"),
            None
        );
    }

    #[test]
    fn tls_alpn01_cert_carries_identifier_extension() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let store = ChallengeStore::default();
        store.add_tls_alpn01("Live.Test", &[7u8; 32]).unwrap();
        let key = store.tls_alpn01_cert("live.test").unwrap();
        let der = key.end_entity_cert().unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        assert!(ext.value.ends_with(&[7u8; 32]));
        store.remove_tls_alpn01("live.test");
        assert!(store.tls_alpn01_cert("live.test").is_none());
    }
}
