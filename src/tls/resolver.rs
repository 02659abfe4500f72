//! The shared certificate state and its rustls `ResolvesServerCert` impl.

use super::certs::{CertEntry, CertError};
use super::challenge::{ACME_TLS_ALPN, ChallengeStore};
use super::store::CertStore;
use crate::config::tls::TlsConfig;
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds between two "no certificate" warnings, so a scan cannot flood the log.
const NO_CERT_WARN_EVERY_SECS: u64 = 10;

/// Certificates served by the TLS listeners, and the ACME challenges in flight.
///
/// Until a certificate exists (first start with ACME, empty `certs_dir`) the
/// handshake is refused with an `unrecognized_name` alert and a rate-limited
/// warning naming the directory. We chose this over a self-signed fallback: a
/// fallback teaches people to click through browser warnings, and RTMPS
/// encoders that verify would fail anyway but with a misleading error; a refusal
/// says exactly what is missing while the listener stays up to answer
/// tls-alpn-01 validation.
#[derive(Debug)]
pub struct Certificates {
    /// Where the certificates come from; a reload may point it elsewhere.
    location: ArcSwap<Location>,
    store: ArcSwap<CertStore>,
    challenges: ChallengeStore,
    last_warning: AtomicU64,
}

/// `[tls] certs_dir` and `default_cert`: what a store is loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    dir: PathBuf,
    default_cert: Option<String>,
}

impl Location {
    /// The location `config` names.
    pub fn of(config: &TlsConfig) -> Self {
        Self {
            dir: config.certs_dir.clone(),
            default_cert: config.default_cert.clone(),
        }
    }

    /// Creates the directory (mode 0700) if it is missing and loads it. A bad
    /// file is an error naming it: refusing to serve beats serving the wrong site.
    pub fn load(&self) -> Result<CertStore, CertError> {
        super::files::create_private_dir(&self.dir)?;
        CertStore::load_dir(&self.dir, self.default_cert.as_deref())
    }
}

impl Certificates {
    /// Creates `certs_dir` (mode 0700) if it is missing and loads it. A bad file
    /// is an error naming it: refusing to start beats serving the wrong site.
    pub fn open(config: &TlsConfig) -> Result<Arc<Self>, CertError> {
        let location = Location::of(config);
        let store = location.load()?;
        Ok(Arc::new(Self {
            location: ArcSwap::from_pointee(location),
            store: ArcSwap::from_pointee(store),
            challenges: ChallengeStore::default(),
            last_warning: AtomicU64::new(0),
        }))
    }

    /// Re-reads `certs_dir` and swaps the new snapshot in; returns how many
    /// certificates are now served. On error the old snapshot keeps serving.
    pub fn reload(&self) -> Result<usize, CertError> {
        let location = self.location.load_full();
        let store = location.load()?;
        let count = store.entries().len();
        self.store.store(Arc::new(store));
        tracing::info!(dir = %location.dir.display(), count, "certificates loaded");
        Ok(count)
    }

    /// Serves `store`, loaded from `location`, from now on (a reload moved
    /// `certs_dir` or `default_cert`). Handshakes already done keep their key.
    pub fn switch_to(&self, location: Location, store: CertStore) {
        let count = store.entries().len();
        tracing::info!(dir = %location.dir.display(), count, "certificates loaded");
        self.store.store(Arc::new(store));
        self.location.store(Arc::new(location));
    }

    /// Where the certificates come from now.
    pub fn location(&self) -> Arc<Location> {
        self.location.load_full()
    }

    /// Serves `entry` from now on, replacing the certificate loaded from the
    /// same file name; the rest of the snapshot is kept as is (a bad unrelated
    /// file in the directory must not block a renewal from going live).
    pub fn install(&self, entry: CertEntry) {
        let location = self.location.load();
        let default = location.default_cert.as_deref();
        self.store.rcu(|old| {
            let mut entries: Vec<CertEntry> = old
                .entries()
                .iter()
                .filter(|e| e.name != entry.name)
                .cloned()
                .collect();
            entries.push(entry.clone());
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            match CertStore::from_entries(entries, default) {
                Ok(store) => Arc::new(store),
                // Only a missing default can fail, and it was present in `old`.
                Err(_) => Arc::clone(old),
            }
        });
    }

    /// The snapshot handshakes use right now.
    pub fn snapshot(&self) -> Arc<CertStore> {
        self.store.load_full()
    }

    /// The certificate directory.
    pub fn dir(&self) -> PathBuf {
        self.location.load().dir.clone()
    }

    /// Pending ACME challenge answers; the HTTP proxy asks
    /// [`ChallengeStore::http01_response`] before routing.
    pub fn challenges(&self) -> &ChallengeStore {
        &self.challenges
    }

    fn warn_no_certificate(&self, sni: Option<&str>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + NO_CERT_WARN_EVERY_SECS
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                sni = sni.unwrap_or("-"),
                dir = %self.dir().display(),
                "TLS handshake refused: no certificate loaded yet (add one to the directory, or wait for ACME)"
            );
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name();
        let acme = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if acme {
            // RFC 8737: a validation handshake gets the challenge certificate or nothing.
            return sni.and_then(|name| self.challenges.tls_alpn01_cert(name));
        }
        let key = self.store.load().lookup(sni).cloned();
        if key.is_none() {
            self.warn_no_certificate(sni);
        }
        key
    }
}
