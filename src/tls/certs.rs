//! Reading certificates and keys from PEM files into rustls `CertifiedKey`s.
//!
//! Two layouts are accepted, both found in the wild next to HAProxy and nginx:
//! a combined `name.pem` (chain first, then the key, as HAProxy's `crt` wants
//! it) and a `name.crt` + `name.key` pair. Every error names the file.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A certificate file that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct CertError {
    /// The file (or directory) to blame.
    pub path: PathBuf,
    /// What is wrong, in words an operator can act on.
    pub reason: String,
}

impl CertError {
    pub(crate) fn new(path: &Path, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// One usable certificate: its key material and what the store indexes it by.
#[derive(Debug, Clone)]
pub struct CertEntry {
    /// File name without extension; what `default_cert` refers to.
    pub name: String,
    /// DNS names from the leaf's subjectAltName, lower case (`*.example.com` kept as is).
    pub names: Vec<String>,
    /// Start of validity of the leaf.
    pub not_before: SystemTime,
    /// End of validity of the leaf.
    pub not_after: SystemTime,
    /// Chain and signing key, ready for rustls.
    pub key: Arc<CertifiedKey>,
}

impl CertEntry {
    /// Builds an entry from PEM text: certificates from `chain_pem` (leaf first) and
    /// the first private key in `key_pem`. The paths only serve error messages.
    pub fn from_pem(
        name: &str,
        chain_pem: &[u8],
        chain_path: &Path,
        key_pem: &[u8],
        key_path: &Path,
    ) -> Result<Self, CertError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::new(chain_path, format!("bad PEM: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(CertError::new(
                chain_path,
                "no CERTIFICATE block found (expected the chain, leaf first)",
            ));
        };
        let (names, not_before, not_after) = leaf_facts(leaf, chain_path)?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                CertError::new(key_path, "no PRIVATE KEY block found")
            }
            other => CertError::new(key_path, format!("bad PEM in private key: {other}")),
        })?;
        let key = certified_key(chain, key_der, key_path)?;
        Ok(Self {
            name: name.to_string(),
            names,
            not_before,
            not_after,
            key: Arc::new(key),
        })
    }

    /// Reads a combined PEM file (chain then key, HAProxy style).
    pub fn load_combined(path: &Path) -> Result<Self, CertError> {
        let text = read(path)?;
        Self::from_pem(&stem(path)?, &text, path, &text, path)
    }

    /// Reads a `name.crt` file and its `name.key` next to it.
    pub fn load_pair(crt: &Path) -> Result<Self, CertError> {
        let key_path = crt.with_extension("key");
        if !key_path.exists() {
            return Err(CertError::new(
                &key_path,
                format!("missing private key for {}", crt.display()),
            ));
        }
        Self::from_pem(&stem(crt)?, &read(crt)?, crt, &read(&key_path)?, &key_path)
    }

    /// Whether this certificate covers `host` (exact or one-label wildcard match).
    pub fn covers(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.names.iter().any(|n| {
            n == &host
                || n.strip_prefix("*.")
                    .is_some_and(|base| parent_domain(&host) == Some(base))
        })
    }
}

/// `a.b.c` → `b.c`; a single label has no parent a wildcard could match.
pub(crate) fn parent_domain(host: &str) -> Option<&str> {
    host.split_once('.')
        .map(|(_, rest)| rest)
        .filter(|r| !r.is_empty())
}

/// Turns a chain and a key into a `CertifiedKey` through the installed provider,
/// and checks that the key belongs to the leaf (a swapped key file would otherwise
/// only show up as failed handshakes).
pub(crate) fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    key_path: &Path,
) -> Result<CertifiedKey, CertError> {
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::new(key_path, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    // Only a proven mismatch is refused: `keys_match` also fails when it cannot
    // parse the leaf (e.g. the critical acmeIdentifier extension of a
    // tls-alpn-01 certificate), which says nothing about the key.
    match certified.keys_match() {
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(
            CertError::new(key_path, "private key does not match the certificate"),
        ),
        _ => Ok(certified),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| CertError::new(path, format!("cannot read: {e}")))
}

fn stem(path: &Path) -> Result<String, CertError> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_string)
        .ok_or_else(|| CertError::new(path, "file name is not UTF-8"))
}

/// SAN DNS names and validity of the leaf certificate.
fn leaf_facts(
    leaf: &CertificateDer<'_>,
    path: &Path,
) -> Result<(Vec<String>, SystemTime, SystemTime), CertError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| CertError::new(path, format!("cannot parse the leaf certificate: {e}")))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        // Old certificates without SAN: fall back to the subject CN, as clients once did.
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_ascii_lowercase());
            }
        }
    }
    let time = |t: ASN1Time| {
        let secs = t.timestamp();
        UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    };
    let validity = cert.validity();
    Ok((names, time(validity.not_before), time(validity.not_after)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed certificate for `names`, as (cert PEM, key PEM).
    pub(crate) fn self_signed(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[test]
    fn combined_pem_loads_names_and_validity() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (cert, key) = self_signed(&["live.example.com", "*.cdn.example.com"]);
        let path = dir.join("live.pem");
        std::fs::write(&path, format!("{cert}{key}")).unwrap();
        let entry = CertEntry::load_combined(&path).unwrap();
        assert_eq!(entry.name, "live");
        assert_eq!(entry.names, ["live.example.com", "*.cdn.example.com"]);
        assert!(entry.not_after > entry.not_before);
        assert!(entry.covers("LIVE.example.com"));
        assert!(entry.covers("a.cdn.example.com"));
        assert!(!entry.covers("a.b.cdn.example.com"));
        assert!(!entry.covers("cdn.example.com"));
    }

    #[test]
    fn combined_pem_without_key_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (cert, _) = self_signed(&["a.test"]);
        let path = dir.join("a.pem");
        std::fs::write(&path, cert).unwrap();
        let err = CertEntry::load_combined(&path).unwrap_err();
        assert_eq!(err.path, path);
        assert!(err.reason.contains("no PRIVATE KEY"), "{err}");
        assert!(err.to_string().starts_with(&path.display().to_string()));
    }

    #[test]
    fn bad_pem_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("broken.pem");
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\n@@@@\n").unwrap();
        let err = CertEntry::load_combined(&path).unwrap_err();
        assert_eq!(err.path, path);
        assert!(err.reason.contains("PEM"), "{err}");
    }

    #[test]
    fn pair_with_missing_key_names_the_key_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (cert, _) = self_signed(&["a.test"]);
        let crt = dir.join("a.crt");
        std::fs::write(&crt, cert).unwrap();
        let err = CertEntry::load_pair(&crt).unwrap_err();
        assert_eq!(err.path, dir.join("a.key"));
        assert!(err.reason.contains("missing private key"), "{err}");
    }

    #[test]
    fn mismatched_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (cert, _) = self_signed(&["a.test"]);
        let (_, other_key) = self_signed(&["b.test"]);
        std::fs::write(dir.join("a.crt"), cert).unwrap();
        std::fs::write(dir.join("a.key"), other_key).unwrap();
        let err = CertEntry::load_pair(&dir.join("a.crt")).unwrap_err();
        assert_eq!(err.path, dir.join("a.key"));
        assert!(err.reason.contains("does not match"), "{err}");
    }
}
