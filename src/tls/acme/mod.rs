//! ACME: obtaining and renewing the `[tls.acme]` certificate.
//!
//! The certificate is stored as `certs_dir/{first domain}.pem` (chain then key,
//! 0600, written atomically), so it is an ordinary file of the certificate
//! store: a restart loads it and orders nothing while it is fresh. The renewal
//! task sleeps until [`schedule::renewal_time`], takes the order lock, re-reads
//! the file (another instance may have renewed it meanwhile), orders, and swaps
//! the new certificate in; failures back off while the old certificate serves.
//!
//! With `[state]`, the lock, account, challenge answers and certificate live
//! in shared storage instead ([`storage`]): one instance orders, every
//! instance answers the CA and serves the result, and `certs_dir` is each
//! instance's cache of it.

pub mod account;
pub mod lock;
pub mod order;
pub mod schedule;
pub mod seal;
pub mod storage;

use super::certs::{CertEntry, CertError};
use super::files::{create_private_dir, write_private};
use super::resolver::Certificates;
use crate::config::tls::AcmeConfig;
use crate::metrics::Metrics;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use storage::{Storage, StorageError};
use tokio_util::sync::CancellationToken;

/// Longest sleep before re-checking the stored certificate, so that a file
/// replaced by hand or by another instance is noticed.
const RECHECK: Duration = Duration::from_secs(3600);

/// Why an ACME attempt failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The CA or the HTTP client said no.
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    /// Storing or loading a file failed.
    #[error("{0}")]
    File(#[from] CertError),
    /// The order went somewhere it should not.
    #[error("ACME order: {0}")]
    Order(String),
    /// Shared storage (`[state]`) failed or refused a write.
    #[error("{0}")]
    Storage(#[from] StorageError),
}

/// What one renewal attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// A certificate was ordered, obtained and installed.
    Ordered,
    /// Another instance had stored a fresh certificate; it was installed.
    Reused,
    /// Another instance holds the order lock.
    Busy,
}

/// A certificate an order just obtained.
struct Issued {
    entry: CertEntry,
    /// The chain, PEM.
    chain: String,
    /// The private key, PEM.
    key: String,
    /// Chain then key, as stored in `certs_dir`.
    combined: String,
}

/// Keeps the `[tls.acme]` certificate present and fresh.
pub struct AcmeManager {
    config: AcmeConfig,
    certs: Arc<Certificates>,
    /// This process' jitter draw (see [`schedule::renewal_time`]).
    draw: f64,
    /// Shared storage (`[state]`); `None`: everything lives in `certs_dir`.
    storage: Option<Arc<Storage>>,
}

impl AcmeManager {
    /// A manager storing its files in `certs.dir()`.
    pub fn new(config: AcmeConfig, certs: Arc<Certificates>) -> Self {
        Self {
            config,
            certs,
            draw: rand::random::<f64>(),
            storage: None,
        }
    }

    /// A manager keeping lock, account, challenges and certificate in
    /// `storage`, with `certs.dir()` as the local cache.
    pub fn shared(config: AcmeConfig, certs: Arc<Certificates>, storage: Arc<Storage>) -> Self {
        Self {
            storage: Some(storage),
            ..Self::new(config, certs)
        }
    }

    /// File name (without extension) of the managed certificate.
    pub fn cert_name(&self) -> &str {
        self.config.domains.first().map_or("acme", String::as_str)
    }

    fn cert_path(&self) -> PathBuf {
        self.certs.dir().join(format!("{}.pem", self.cert_name()))
    }

    fn state_dir(&self) -> PathBuf {
        self.certs.dir().join(".acme")
    }

    /// When the stored certificate must be renewed; `None` if there is none
    /// or it does not cover every configured domain (then: now).
    fn renewal_due(&self, entry: Option<&CertEntry>) -> Option<SystemTime> {
        let entry = entry?;
        if !self.config.domains.iter().all(|d| entry.covers(d)) {
            return None;
        }
        Some(schedule::renewal_time(
            entry.not_before,
            entry.not_after,
            self.config.renew_at,
            self.config.renew_jitter,
            self.draw,
        ))
    }

    /// How long until the certificate in the served snapshot needs renewing
    /// (zero when there is none, or it lacks a configured domain).
    pub fn wait(&self) -> Duration {
        let snapshot = self.certs.snapshot();
        self.renewal_due(snapshot.entry(self.cert_name()))
            .and_then(|due| due.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::ZERO)
    }

    /// Runs until `shutdown`: sleeps until renewal is due, then renews.
    /// Each order's result is counted in `metrics` (`amslb_acme_orders_total`).
    pub async fn run(self, shutdown: CancellationToken, metrics: Arc<Metrics>) {
        let mut failures = 0u32;
        loop {
            let wait = self.wait();
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait.min(RECHECK)) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
            let pause = match self.renew_once().await {
                Ok(Renewal::Ordered) => {
                    metrics.acme_order("issued");
                    failures = 0;
                    continue;
                }
                Ok(Renewal::Reused) => {
                    failures = 0;
                    continue;
                }
                // Another instance holds the lock: look again after a short while.
                Ok(Renewal::Busy) => self.config.retry_min,
                // Shared storage is down (logged once): nobody orders meanwhile.
                Err(AcmeError::Storage(StorageError::Unavailable(_))) => self.config.retry_min,
                Err(e) => {
                    metrics.acme_order("failed");
                    failures += 1;
                    let pause =
                        schedule::backoff(failures, self.config.retry_min, self.config.retry_max);
                    tracing::warn!(
                        error = %e,
                        failures,
                        retry_in = ?pause,
                        "ACME renewal failed; the current certificate (if any) keeps serving"
                    );
                    pause
                }
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Whether `entry` needs no renewal yet.
    fn fresh(&self, entry: &CertEntry) -> bool {
        self.renewal_due(Some(entry))
            .is_some_and(|due| due > SystemTime::now())
    }

    /// One renewal under the order lock.
    pub async fn renew_once(&self) -> Result<Renewal, AcmeError> {
        if let Some(storage) = &self.storage {
            let Some(lease) = storage
                .acquire(self.cert_name(), self.config.lock_lease)
                .await?
            else {
                tracing::info!(
                    cert = self.cert_name(),
                    "another instance is ordering (shared lock); waiting"
                );
                return Ok(Renewal::Busy);
            };
            let result = self.renew_shared(storage, &lease).await;
            storage.release(&lease).await;
            return result;
        }
        let state = self.state_dir();
        create_private_dir(&state)?;
        let lock = state.join("order.lock");
        let lease = lock::Lease::try_acquire(&lock, self.config.lock_lease)
            .map_err(|e| CertError::new(&lock, format!("cannot take order lock: {e}")))?;
        let Some(_lease) = lease else {
            tracing::info!(lock = %lock.display(), "another instance is ordering; waiting");
            return Ok(Renewal::Busy);
        };
        // Another instance may have renewed while we waited for the lock.
        let path = self.cert_path();
        if let Ok(stored) = CertEntry::load_combined(&path)
            && self.fresh(&stored)
        {
            self.certs.install(stored);
            return Ok(Renewal::Reused);
        }
        let account = account::load_or_create(
            &self.config,
            account::Place::File(&state.join("account.json")),
        )
        .await?;
        let issued = self.order(&account, None).await?;
        let (entry, combined) = (issued.entry, issued.combined);
        write_private(&path, combined.as_bytes())?;
        tracing::info!(file = %path.display(), not_after = ?entry.not_after, "certificate obtained");
        self.certs.install(entry);
        Ok(Renewal::Ordered)
    }

    /// The renewal of [`AcmeManager::renew_once`] with shared storage, under `lease`.
    async fn renew_shared(
        &self,
        storage: &Storage,
        lease: &storage::Lease,
    ) -> Result<Renewal, AcmeError> {
        let path = self.cert_path();
        // Another instance may have stored a fresh one while we waited.
        if let Some((stored, combined)) = storage.load_certificate(self.cert_name(), &path).await?
            && self.fresh(&stored)
        {
            self.cache(&path, &combined);
            self.certs.install(stored);
            return Ok(Renewal::Reused);
        }
        let account =
            account::load_or_create(&self.config, account::Place::Shared(storage)).await?;
        let Issued {
            entry,
            chain,
            key,
            combined,
        } = self.order(&account, Some((storage, lease))).await?;
        // Fenced: refused if our lease ran out and another instance took over.
        storage.store_certificate(lease, &chain, &key).await?;
        tracing::info!(
            cert = self.cert_name(),
            fence = lease.fence(),
            not_after = ?entry.not_after,
            "certificate obtained and stored for every instance"
        );
        self.cache(&path, &combined);
        self.certs.install(entry);
        Ok(Renewal::Ordered)
    }

    /// Places an order and returns the new certificate.
    async fn order(
        &self,
        account: &instant_acme::Account,
        shared: Option<order::Shared<'_>>,
    ) -> Result<Issued, AcmeError> {
        tracing::info!(domains = ?self.config.domains, challenge = ?self.config.challenge, "ordering certificate");
        let (chain, key) =
            order::obtain(account, &self.config, self.certs.challenges(), shared).await?;
        let combined = format!("{}\n{}", chain.trim_end(), key);
        let path = self.cert_path();
        // Parse before storing: a certificate we cannot serve must not replace one we can.
        let entry = CertEntry::from_pem(
            self.cert_name(),
            combined.as_bytes(),
            &path,
            combined.as_bytes(),
            &path,
        )?;
        Ok(Issued {
            entry,
            chain,
            key,
            combined,
        })
    }

    /// Writes the certificate to the local cache; a failure only costs the
    /// cache (the certificate is served and stored anyway).
    fn cache(&self, path: &std::path::Path, combined: &str) {
        if let Err(e) = create_private_dir(&self.certs.dir())
            .and_then(|()| write_private(path, combined.as_bytes()))
        {
            tracing::warn!(error = %e, "cannot cache the certificate in certs_dir; serving it anyway");
        }
    }
}
