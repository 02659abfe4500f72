//! A `tls` (RTMPS) listener's own certificate: one static PEM cert/key pair
//! named in the listener and read at start. Listeners without one use the
//! `[tls]` certificate store (SNI, ACME, reload) in `crate::tls`.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a listener's certificate could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsLoadError {
    /// The certificate file is missing, unreadable or holds no certificate.
    #[error("certificate {path}: {reason}")]
    Cert {
        /// File that was read.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The key file is missing, unreadable or holds no private key.
    #[error("private key {path}: {reason}")]
    Key {
        /// File that was read.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The listener has no `cert`/`key` and no `[tls]` store was loaded.
    #[error("no certificate: set `cert` and `key` on the listener, or use [tls] certs_dir")]
    NoCertificate,
    /// rustls refused the pair (key does not match, unsupported algorithm).
    #[error("certificate {cert} with key {key}: {source}")]
    Pair {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
}

/// Builds a TLS server config from a PEM certificate chain and a PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsLoadError> {
    let cert_err = |reason: String| TlsLoadError::Cert {
        path: cert.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM certificate in file".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsLoadError::Key {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|source| TlsLoadError::Pair {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_generated_pair_and_names_bad_files() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = std::env::temp_dir().join(format!("amslb-l4-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        assert!(server_config(&cert, &key).is_ok());
        let err = server_config(&dir.join("missing.pem"), &key).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let err = server_config(&key, &key).unwrap_err();
        assert!(matches!(err, TlsLoadError::Cert { .. }), "{err}");
        let err = server_config(&cert, &cert).unwrap_err();
        assert!(matches!(err, TlsLoadError::Key { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
