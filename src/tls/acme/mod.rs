//! ACME: obtaining and renewing the `[tls.acme]` certificate.
//!
//! The certificate is stored as `certs_dir/{first domain}.pem` (chain then key,
//! 0600, written atomically), so it is an ordinary file of the certificate
//! store: a restart loads it and orders nothing while it is fresh. The renewal
//! task sleeps until [`schedule::renewal_time`], takes the order lock, re-reads
//! the file (another instance may have renewed it meanwhile), orders, and swaps
//! the new certificate in; failures back off while the old certificate serves.

pub mod account;
pub mod lock;
pub mod order;
pub mod schedule;

use super::certs::{CertEntry, CertError};
use super::files::{create_private_dir, write_private};
use super::resolver::Certificates;
use crate::config::tls::AcmeConfig;
use crate::metrics::Metrics;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
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
}

/// Keeps the `[tls.acme]` certificate present and fresh.
pub struct AcmeManager {
    config: AcmeConfig,
    certs: Arc<Certificates>,
    /// This process' jitter draw (see [`schedule::renewal_time`]).
    draw: f64,
}

impl AcmeManager {
    /// A manager storing its files in `certs.dir()`.
    pub fn new(config: AcmeConfig, certs: Arc<Certificates>) -> Self {
        Self {
            config,
            certs,
            draw: rand::random::<f64>(),
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
                Ok(true) => {
                    metrics.acme_order("issued");
                    failures = 0;
                    continue;
                }
                // Another instance holds the lock: look again after a short while.
                Ok(false) => self.config.retry_min,
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

    /// One renewal under the order lock. `Ok(false)` if the lock is held elsewhere.
    pub async fn renew_once(&self) -> Result<bool, AcmeError> {
        let state = self.state_dir();
        create_private_dir(&state)?;
        let lock = state.join("order.lock");
        let lease = lock::Lease::try_acquire(&lock, self.config.lock_lease)
            .map_err(|e| CertError::new(&lock, format!("cannot take order lock: {e}")))?;
        let Some(_lease) = lease else {
            tracing::info!(lock = %lock.display(), "another instance is ordering; waiting");
            return Ok(false);
        };
        // Another instance may have renewed while we waited for the lock.
        let path = self.cert_path();
        if let Ok(stored) = CertEntry::load_combined(&path) {
            let fresh = self
                .renewal_due(Some(&stored))
                .is_some_and(|due| due > SystemTime::now());
            if fresh {
                self.certs.install(stored);
                return Ok(true);
            }
        }
        let account = account::load_or_create(&self.config, &state.join("account.json")).await?;
        tracing::info!(domains = ?self.config.domains, challenge = ?self.config.challenge, "ordering certificate");
        let (chain, key) = order::obtain(&account, &self.config, self.certs.challenges()).await?;
        let combined = format!("{}\n{}", chain.trim_end(), key);
        // Parse before storing: a certificate we cannot serve must not replace one we can.
        let entry = CertEntry::from_pem(
            self.cert_name(),
            combined.as_bytes(),
            &path,
            combined.as_bytes(),
            &path,
        )?;
        write_private(&path, combined.as_bytes())?;
        tracing::info!(file = %path.display(), not_after = ?entry.not_after, "certificate obtained");
        self.certs.install(entry);
        Ok(true)
    }
}
