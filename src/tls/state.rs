//! TLS state of a running balancer: the certificates, the acceptor of the
//! `https` listeners, and the background tasks that keep the certificates
//! current (directory watch, ACME renewal). A reload that changes `[tls]`
//! points the same [`Certificates`] at the new settings and restarts those
//! tasks, so every listener (HTTPS and RTMPS alike) serves from the new
//! store while open connections keep the key they handshook with.

use super::acme::AcmeManager;
use super::acme::seal::StorageKey;
use super::acme::storage::{self, Storage, Target};
use super::certs::CertError;
use super::resolver::{Certificates, Location};
use super::server_config::https_server_config;
use super::store::CertStore;
use super::watch::{Fingerprint, fingerprint, watch};
use crate::config::tls::TlsConfig;
use crate::config::{Config, Protocol};
use crate::metrics::Metrics;
use std::sync::{Arc, Mutex, PoisonError};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Certificates, acceptor and the tasks that keep them current.
pub struct TlsState {
    /// Certificates served (and reloaded on demand) by every TLS listener.
    pub certs: Arc<Certificates>,
    acceptor: TlsAcceptor,
    /// The directory as it was just before the first load.
    loaded: Fingerprint,
    /// Stops the watch and ACME tasks of the settings in effect.
    tasks: Mutex<Option<CancellationToken>>,
    /// Where ACME state is shared (`[state]`, which needs a restart to change).
    shared: Option<Target>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The acceptor holds only the rustls config; nothing worth printing.
        f.debug_struct("TlsState")
            .field("certs", &self.certs)
            .finish_non_exhaustive()
    }
}

/// New `[tls]` settings loaded and checked, ready for [`TlsState::apply`].
#[derive(Debug)]
pub struct Staged {
    config: TlsConfig,
    location: Location,
    loaded: Fingerprint,
    store: CertStore,
}

impl Staged {
    /// Loads the certificate store `config` names, before anything changes:
    /// a bad file refuses the reload, naming the file.
    pub fn load(config: &TlsConfig) -> Result<Self, CertError> {
        let location = Location::of(config);
        let loaded = fingerprint(&config.certs_dir);
        let store = location.load()?;
        Ok(Self {
            config: config.clone(),
            location,
            loaded,
            store,
        })
    }
}

impl TlsState {
    /// Whether `config` needs certificates: some listener terminates TLS
    /// with the shared store, or ACME is configured.
    pub fn needed(config: &Config) -> bool {
        let terminates_tls = config.listeners.iter().any(|l| match l.protocol {
            Protocol::Https => true,
            // An RTMPS listener with its own cert/key needs no store.
            Protocol::Tls => l.l4.cert.is_none(),
            _ => false,
        });
        terminates_tls || config.tls.acme.is_some()
    }

    /// Loads `[tls] certs_dir` when [`TlsState::needed`]; `None` otherwise (a
    /// plain-HTTP setup needs no certificate directory). A bad certificate
    /// file is an error naming the file.
    pub fn start(config: &Config) -> Result<Option<Arc<Self>>, CertError> {
        if !Self::needed(config) {
            return Ok(None);
        }
        super::install_crypto_provider();
        let loaded = fingerprint(&config.tls.certs_dir);
        let certs = Certificates::open(&config.tls)?;
        let count = certs.snapshot().entries().len();
        info!(dir = %certs.dir().display(), count, "certificates loaded");
        let server_config = https_server_config(certs.clone())
            .map_err(|e| CertError::new(&certs.dir(), format!("TLS setup failed: {e}")))?;
        Ok(Some(Arc::new(Self {
            certs,
            acceptor: TlsAcceptor::from(server_config),
            loaded,
            tasks: Mutex::default(),
            shared: Target::of(config),
        })))
    }

    /// The acceptor of the `https` listeners.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Starts the background tasks of `config`: watching `certs_dir` (unless
    /// `watch_interval` is 0) and ACME renewal (if `[tls.acme]` is set). They
    /// end on `shutdown` or when other settings replace them; ACME order
    /// results are counted in `metrics`.
    pub fn spawn_tasks(
        &self,
        config: &TlsConfig,
        shutdown: &CancellationToken,
        metrics: Arc<Metrics>,
    ) {
        self.spawn(config, self.loaded.clone(), shutdown, metrics);
    }

    /// Serves the store in `staged` and restarts the background tasks with
    /// its settings (a reload changed `[tls]`).
    pub fn apply(&self, staged: Staged, shutdown: &CancellationToken, metrics: Arc<Metrics>) {
        let Staged {
            config,
            location,
            loaded,
            store,
        } = staged;
        self.certs.switch_to(location, store);
        self.spawn(&config, loaded, shutdown, metrics);
    }

    /// Stops the background tasks (TLS is no longer configured).
    pub fn stop_tasks(&self) {
        if let Some(old) = self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            old.cancel();
        }
    }

    fn spawn(
        &self,
        config: &TlsConfig,
        loaded: Fingerprint,
        shutdown: &CancellationToken,
        metrics: Arc<Metrics>,
    ) {
        let stop = shutdown.child_token();
        if let Some(old) = self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(stop.clone())
        {
            old.cancel();
        }
        if !config.watch_interval.is_zero() {
            tokio::spawn(watch(
                self.certs.clone(),
                loaded,
                config.watch_interval,
                stop.clone(),
            ));
        }
        let Some(acme) = &config.acme else {
            return;
        };
        let manager = match (&self.shared, &acme.storage_key_file) {
            (Some(target), Some(key_file)) => {
                // Checked when the config was loaded; the file may have gone since.
                let key = match crate::config::tls::read_storage_key(key_file) {
                    Ok(key) => StorageKey::new(&key),
                    Err(reason) => {
                        tracing::error!(
                            key = "tls.acme.storage_key_file",
                            reason,
                            "ACME stays off: the shared storage key cannot be read"
                        );
                        return;
                    }
                };
                let shared = Arc::new(Storage::new(target.clone(), key, metrics.clone()));
                let manager = AcmeManager::shared(acme.clone(), self.certs.clone(), shared.clone());
                tokio::spawn(storage::follow(
                    shared,
                    self.certs.clone(),
                    manager.cert_name().to_string(),
                    stop.clone(),
                ));
                manager
            }
            _ => AcmeManager::new(acme.clone(), self.certs.clone()),
        };
        tokio::spawn(manager.run(stop, metrics));
    }
}
