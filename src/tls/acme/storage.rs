//! ACME storage shared by every amslb instance of a deployment, in the
//! `[state]` MongoDB (its `amslb` database by default), so that one instance
//! orders, any instance answers the challenge, and every instance serves the
//! certificate, with no shared directory.
//!
//! `acme_certs` holds one document per managed certificate (`_id`: its
//! name), carrying together, so that one conditional update covers them:
//! - the **order lock**: `holder`, `lock_until_ms` (the lease) and `fence`,
//!   a counter raised by every acquisition. Every write an order makes is
//!   conditional on `fence` still being the one it acquired: a holder whose
//!   lease ran out and was taken over (paused process, partition) has its
//!   writes refused instead of overwriting the new holder's;
//! - the **challenge answers** of the order in flight (`challenges`: http-01
//!   key authorizations and tls-alpn-01 digests; every instance builds the
//!   challenge certificate from the digest, so no challenge key is stored);
//! - the **certificate**: `chain` (PEM) and `key` (the private key,
//!   encrypted with [`StorageKey`]).
//!
//! `acme_accounts` holds the account credentials per ACME directory, encrypted.
//!
//! Every instance follows `acme_certs` (see [`crate::state::follow`]),
//! publishing the challenge answers to its listeners and installing a new
//! certificate without a restart; it also writes that certificate to
//! `certs_dir` as its local cache, which is what it serves from after a
//! restart while MongoDB is down. MongoDB down never stops serving; it only
//! stops ordering (no instance orders without the shared lock, or all would).

use super::seal::StorageKey;
use crate::cluster::mongodb::client;
use crate::config::Config;
use crate::config::mongo::MongoUri;
use crate::metrics::Metrics;
use crate::state::{Outage, now_ms};
use crate::tls::certs::CertEntry;
use crate::tls::challenge::ChallengeStore;
use crate::tls::files::write_private;
use crate::tls::resolver::Certificates;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, Document, doc};
use mongodb::{Collection, Database};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// Collection of the certificate documents (lock, challenges, certificate).
pub const CERTS: &str = "acme_certs";
/// Collection of the ACME account credentials.
pub const ACCOUNTS: &str = "acme_accounts";
/// Longest wait for one MongoDB operation.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the ordering instance waits after storing the challenge answers
/// before telling the CA to validate: every instance reads them within a
/// second (change stream, or the 1 s re-read), so whichever one the CA's
/// connection reaches answers.
pub const CHALLENGE_SETTLE: Duration = Duration::from_secs(2);

/// Why a storage operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// MongoDB did not answer or failed: nothing is ordered meanwhile.
    #[error("ACME storage unavailable: {0}")]
    Unavailable(String),
    /// The write was refused (stale fencing token) or a stored value is unusable.
    #[error("ACME storage: {0}")]
    Refused(String),
}

/// Where the shared ACME state lives: `[state]`'s MongoDB and database.
#[derive(Debug, Clone)]
pub struct Target {
    uri: MongoUri,
    database: String,
    instance: String,
}

impl Target {
    /// The target `config` names: `Some` when `[state]` is configured.
    pub fn of(config: &Config) -> Option<Self> {
        let state = config.state.as_ref()?;
        Some(Self {
            uri: state.uri(&config.cluster)?.clone(),
            database: state.database.clone(),
            instance: state.instance_name(),
        })
    }
}

/// One answer of an order in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// http-01: `GET /.well-known/acme-challenge/{token}` answers `key_authorization`.
    Http01 {
        /// The challenge token.
        token: String,
        /// What to answer.
        key_authorization: String,
    },
    /// tls-alpn-01: a handshake for `domain` with ALPN `acme-tls/1` gets a
    /// certificate carrying `digest`.
    TlsAlpn01 {
        /// The domain being validated.
        domain: String,
        /// SHA-256 of the key authorization.
        digest: Vec<u8>,
    },
}

impl Challenge {
    fn to_document(&self) -> Document {
        match self {
            Self::Http01 {
                token,
                key_authorization,
            } => doc! { "kind": "http-01", "name": token, "value": key_authorization },
            Self::TlsAlpn01 { domain, digest } => {
                doc! { "kind": "tls-alpn-01", "name": domain, "value": hex(digest) }
            }
        }
    }

    fn from_document(doc: &Document) -> Option<Self> {
        let name = doc.get_str("name").ok()?.to_string();
        let value = doc.get_str("value").ok()?;
        match doc.get_str("kind").ok()? {
            "http-01" => Some(Self::Http01 {
                token: name,
                key_authorization: value.to_string(),
            }),
            "tls-alpn-01" => Some(Self::TlsAlpn01 {
                domain: name,
                digest: unhex(value)?,
            }),
            _ => None,
        }
    }

    /// Publishes this answer in `store` (this instance's listeners).
    pub fn add_to(&self, store: &ChallengeStore) -> Result<(), crate::tls::CertError> {
        match self {
            Self::Http01 {
                token,
                key_authorization,
            } => store.add_http01(token, key_authorization),
            Self::TlsAlpn01 { domain, digest } => store.add_tls_alpn01(domain, digest)?,
        }
        Ok(())
    }

    /// Withdraws this answer from `store`.
    pub fn remove_from(&self, store: &ChallengeStore) {
        match self {
            Self::Http01 { token, .. } => store.remove_http01(token),
            Self::TlsAlpn01 { domain, .. } => store.remove_tls_alpn01(domain),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A held order lock: the fencing token every write of the order carries.
#[derive(Debug)]
pub struct Lease {
    name: String,
    holder: String,
    fence: i64,
}

impl Lease {
    /// The fencing token (raised by every acquisition).
    pub fn fence(&self) -> i64 {
        self.fence
    }
}

/// The shared ACME storage of this instance.
#[derive(Debug)]
pub struct Storage {
    target: Target,
    key: StorageKey,
    database: OnceCell<Database>,
    outage: Outage,
}

impl Storage {
    /// Storage in `target`, encrypting keys with `key`. Connects on first use.
    pub fn new(target: Target, key: StorageKey, metrics: Arc<Metrics>) -> Self {
        Self {
            target,
            key,
            database: OnceCell::new(),
            outage: Outage::new(
                metrics,
                "ACME storage unavailable: the certificates cached in certs_dir keep serving, and no order is placed",
                "ACME storage resumes",
            ),
        }
    }

    /// This instance's name (`[state] instance`).
    pub fn instance(&self) -> &str {
        &self.target.instance
    }

    async fn database(&self) -> Result<&Database, StorageError> {
        self.database
            .get_or_try_init(|| async {
                let client = client(&self.target.uri)
                    .await
                    .map_err(|e| self.refused(e.to_string()))?;
                Ok(client.database(&self.target.database))
            })
            .await
    }

    async fn collection(&self, name: &str) -> Result<Collection<Document>, StorageError> {
        Ok(self.database().await?.collection(name))
    }

    /// Runs one MongoDB operation with a time bound, recording the outcome
    /// (the outage is logged once and exported).
    async fn op<T>(
        &self,
        what: impl std::future::IntoFuture<Output = mongodb::error::Result<T>>,
    ) -> Result<T, StorageError> {
        match tokio::time::timeout(OP_TIMEOUT, what).await {
            Ok(Ok(value)) => {
                self.outage.answered();
                Ok(value)
            }
            Ok(Err(e)) => Err(self.refused(e.to_string())),
            Err(_) => Err(self.refused("no answer in time".into())),
        }
    }

    /// Takes the order lock of certificate `name` for `lease`, unless another
    /// holder's lease is still running (`Ok(None)`).
    pub async fn acquire(
        &self,
        name: &str,
        lease: Duration,
    ) -> Result<Option<Lease>, StorageError> {
        let certs = self.collection(CERTS).await?;
        let holder = format!(
            "{}/{}/{:08x}",
            self.target.instance,
            std::process::id(),
            rand::random::<u32>()
        );
        let now = now_ms();
        let until = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let before = self.op(certs.find_one(doc! { "_id": name })).await?;
        let taken = match before {
            Some(doc) => {
                if doc.get_i64("lock_until_ms").unwrap_or(0) > now {
                    return Ok(None);
                }
                if doc.get_i64("lock_until_ms").unwrap_or(0) > 0 {
                    tracing::warn!(
                        cert = name,
                        stale_holder = doc.get_str("holder").unwrap_or("?"),
                        "taking over a stale ACME order lock"
                    );
                }
                let update = certs.update_one(
                    doc! { "_id": name, "lock_until_ms": { "$lte": now } },
                    doc! {
                        "$set": { "holder": &holder, "lock_until_ms": until },
                        "$inc": { "fence": 1_i64 },
                    },
                );
                self.op(update).await?.matched_count == 1
            }
            None => {
                let insert = certs.insert_one(doc! {
                    "_id": name, "holder": &holder, "lock_until_ms": until, "fence": 1_i64,
                });
                match tokio::time::timeout(OP_TIMEOUT, insert).await {
                    Ok(Ok(_)) => true,
                    // Another instance inserted it first: it holds the lock.
                    Ok(Err(e)) if is_duplicate_key(&e) => false,
                    Ok(Err(e)) => return Err(self.refused(e.to_string())),
                    Err(_) => return Err(self.refused("no answer in time".into())),
                }
            }
        };
        if !taken {
            return Ok(None);
        }
        let mine = self
            .op(certs.find_one(doc! { "_id": name, "holder": &holder }))
            .await?;
        Ok(mine.and_then(|doc| {
            Some(Lease {
                name: name.to_string(),
                holder,
                fence: doc.get_i64("fence").ok()?,
            })
        }))
    }

    /// Records a failed operation; the error to return.
    fn refused(&self, error: String) -> StorageError {
        self.outage.failed(&error);
        StorageError::Unavailable(error)
    }

    /// Updates the document of `lease` with `set` if its fence is still
    /// `lease`'s; an error says the lease was lost (or MongoDB failed).
    async fn fenced(&self, lease: &Lease, set: Document) -> Result<(), StorageError> {
        let certs = self.collection(CERTS).await?;
        let update = certs.update_one(
            doc! { "_id": &lease.name, "fence": lease.fence },
            doc! { "$set": set },
        );
        if self.op(update).await?.matched_count == 1 {
            Ok(())
        } else {
            Err(StorageError::Refused(format!(
                "the order lock of {} was taken over by another instance (fence {} is stale); write refused",
                lease.name, lease.fence
            )))
        }
    }

    /// Stores the answers of the order in flight, for every instance to serve.
    pub async fn publish(
        &self,
        lease: &Lease,
        challenges: &[Challenge],
    ) -> Result<(), StorageError> {
        let list: Vec<Document> = challenges.iter().map(Challenge::to_document).collect();
        self.fenced(lease, doc! { "challenges": list }).await
    }

    /// Stores the new certificate (`chain` PEM, `key` PEM encrypted) and
    /// clears the challenges.
    pub async fn store_certificate(
        &self,
        lease: &Lease,
        chain: &str,
        key: &str,
    ) -> Result<(), StorageError> {
        let sealed = self
            .key
            .seal(&key_purpose(&lease.name), key.as_bytes())
            .map_err(StorageError::Refused)?;
        let set = doc! {
            "chain": chain,
            "key": binary(sealed),
            "issued_ms": now_ms(),
            "issued_by": &self.target.instance,
            "challenges": [],
        };
        self.fenced(lease, set).await
    }

    /// Ends `lease`: the lock is free and the challenges are gone (unless
    /// another instance took over meanwhile; then nothing is touched).
    pub async fn release(&self, lease: &Lease) {
        let Ok(certs) = self.collection(CERTS).await else {
            return;
        };
        let update = certs.update_one(
            doc! { "_id": &lease.name, "fence": lease.fence, "holder": &lease.holder },
            doc! { "$set": { "lock_until_ms": 0_i64, "challenges": [] } },
        );
        // A lease not released in time simply runs out.
        let _ = self.op(update).await;
    }

    /// The stored certificate `name` as an entry (its chain + decrypted key
    /// also returned as the combined PEM for the local cache), if any.
    pub async fn load_certificate(
        &self,
        name: &str,
        cache: &Path,
    ) -> Result<Option<(CertEntry, String)>, StorageError> {
        let certs = self.collection(CERTS).await?;
        let Some(doc) = self.op(certs.find_one(doc! { "_id": name })).await? else {
            return Ok(None);
        };
        self.certificate_of(&doc, cache)
            .map_err(StorageError::Refused)
    }

    /// The certificate in `doc` (an `acme_certs` document), if it has one.
    fn certificate_of(
        &self,
        doc: &Document,
        cache: &Path,
    ) -> Result<Option<(CertEntry, String)>, String> {
        let (Ok(name), Ok(chain), Ok(sealed)) = (
            doc.get_str("_id"),
            doc.get_str("chain"),
            doc.get_binary_generic("key"),
        ) else {
            return Ok(None);
        };
        let key = self.key.open(&key_purpose(name), sealed)?;
        let key = String::from_utf8(key).map_err(|_| format!("stored key of {name} is not PEM"))?;
        let combined = format!("{}\n{}", chain.trim_end(), key);
        let entry =
            CertEntry::from_pem(name, combined.as_bytes(), cache, combined.as_bytes(), cache)
                .map_err(|e| format!("stored certificate of {name} is unusable: {}", e.reason))?;
        Ok(Some((entry, combined)))
    }

    /// The stored account credentials (JSON) for ACME `directory`, if any.
    pub async fn load_account(&self, directory: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let accounts = self.collection(ACCOUNTS).await?;
        let Some(doc) = self
            .op(accounts.find_one(doc! { "_id": directory }))
            .await?
        else {
            return Ok(None);
        };
        let sealed = doc.get_binary_generic("credentials").map_err(|_| {
            StorageError::Refused(format!(
                "stored ACME account for {directory} has no credentials"
            ))
        })?;
        self.key
            .open(&account_purpose(directory), sealed)
            .map(Some)
            .map_err(StorageError::Refused)
    }

    /// Stores the account credentials (JSON) for ACME `directory`, encrypted.
    /// Only the lock holder registers accounts, so this write is not fenced.
    pub async fn store_account(
        &self,
        directory: &str,
        credentials: &[u8],
    ) -> Result<(), StorageError> {
        let sealed = self
            .key
            .seal(&account_purpose(directory), credentials)
            .map_err(StorageError::Refused)?;
        let accounts = self.collection(ACCOUNTS).await?;
        let replace = accounts
            .replace_one(
                doc! { "_id": directory },
                doc! { "_id": directory, "credentials": binary(sealed), "by": &self.target.instance },
            )
            .upsert(true);
        self.op(replace).await.map(drop)
    }
}

fn key_purpose(name: &str) -> String {
    format!("amslb ACME certificate key for {name}")
}

fn account_purpose(directory: &str) -> String {
    format!("amslb ACME account for {directory}")
}

fn binary(bytes: Vec<u8>) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Generic,
        bytes,
    })
}

fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    matches!(
        error.kind.as_ref(),
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(e)) if e.code == 11000
    )
}

/// Follows the stored certificate `name` until `shutdown`: serves the
/// challenge answers stored for it on this instance's listeners, and
/// installs (and caches in `certs_dir`) a stored certificate that differs
/// from the one served.
pub async fn follow(
    storage: Arc<Storage>,
    certs: Arc<Certificates>,
    name: String,
    shutdown: CancellationToken,
) {
    let collection = loop {
        // A failure is logged once by the outage tracking.
        if let Ok(c) = storage.collection(CERTS).await {
            break c;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    // The answers this follower published, to withdraw them when they go.
    let mut published: HashMap<String, Challenge> = HashMap::new();
    // The stored leaf last looked at, so a certificate that cannot be used
    // (another storage key, older than the served one) is decrypted and
    // logged once, not on every read.
    let mut looked_at: Option<Vec<u8>> = None;
    let take = |read: Result<Vec<Document>, String>| {
        let docs = match read {
            Ok(docs) => docs,
            Err(e) => return storage.outage.failed(&e),
        };
        storage.outage.answered();
        let doc = docs
            .iter()
            .find(|d| d.get_str("_id").ok() == Some(name.as_str()));
        let stored: HashMap<String, Challenge> = doc
            .and_then(|d| d.get_array("challenges").ok())
            .into_iter()
            .flatten()
            .filter_map(|c| Challenge::from_document(c.as_document()?))
            .map(|c| (challenge_key(&c), c))
            .collect();
        sync_challenges(&mut published, stored, certs.challenges());
        if let Some(doc) = doc {
            take_certificate(&storage, &certs, doc, &mut looked_at);
        }
    };
    crate::state::follow(&collection, &shutdown, take).await;
}

fn challenge_key(challenge: &Challenge) -> String {
    match challenge {
        Challenge::Http01 { token, .. } => format!("http-01 {token}"),
        Challenge::TlsAlpn01 { domain, .. } => format!("tls-alpn-01 {domain}"),
    }
}

/// Publishes the stored answers not published yet, withdraws those gone.
fn sync_challenges(
    published: &mut HashMap<String, Challenge>,
    stored: HashMap<String, Challenge>,
    store: &ChallengeStore,
) {
    for (key, old) in published.iter() {
        if stored.get(key) != Some(old) {
            old.remove_from(store);
        }
    }
    published.retain(|key, old| stored.get(key) == Some(old));
    for (key, challenge) in stored {
        if published.contains_key(&key) {
            continue;
        }
        match challenge.add_to(store) {
            Ok(()) => {
                tracing::info!(challenge = %key, "serving an ACME challenge answer from shared storage");
                published.insert(key, challenge);
            }
            Err(e) => {
                tracing::warn!(challenge = %key, error = %e, "cannot serve a stored ACME challenge")
            }
        }
    }
}

/// Installs the certificate in `doc` if it differs from the one served,
/// writing it to `certs_dir` first (the cache a restart serves from).
fn take_certificate(
    storage: &Storage,
    certs: &Certificates,
    doc: &Document,
    looked_at: &mut Option<Vec<u8>>,
) {
    let Ok(name) = doc.get_str("_id") else {
        return;
    };
    let cache = certs.dir().join(format!("{name}.pem"));
    let served = certs.snapshot();
    let served_leaf = served
        .entry(name)
        .and_then(|e| e.key.end_entity_cert().ok())
        .map(|c| c.as_ref().to_vec());
    // Compare the leaf before decrypting: one cheap look per read.
    let stored_leaf = doc.get_str("chain").ok().and_then(|chain| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
            .next()?
            .ok()
            .map(|c| c.as_ref().to_vec())
    });
    if stored_leaf.is_none() || stored_leaf == served_leaf || stored_leaf == *looked_at {
        return;
    }
    looked_at.clone_from(&stored_leaf);
    match storage.certificate_of(doc, &cache) {
        Ok(Some((entry, combined))) => {
            // Never replace a served certificate by an older one.
            if served
                .entry(name)
                .is_some_and(|e| e.not_after > entry.not_after)
            {
                return;
            }
            if let Err(e) = write_private(&cache, combined.as_bytes()) {
                tracing::warn!(error = %e, "cannot cache the shared certificate; serving it anyway");
            }
            tracing::info!(
                cert = name,
                by = doc.get_str("issued_by").unwrap_or("?"),
                not_after = ?entry.not_after,
                "certificate from shared storage installed"
            );
            certs.install(entry);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(cert = name, error = %e, "stored certificate not installed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_round_trip_through_documents() {
        let both = [
            Challenge::Http01 {
                token: "tok".into(),
                key_authorization: "tok.thumb".into(),
            },
            Challenge::TlsAlpn01 {
                domain: "live.test".into(),
                digest: vec![0, 7, 255],
            },
        ];
        for c in both {
            assert_eq!(Challenge::from_document(&c.to_document()), Some(c));
        }
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
    }

    #[test]
    fn followed_answers_are_published_and_withdrawn() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let store = ChallengeStore::default();
        let mut published = HashMap::new();
        let http = Challenge::Http01 {
            token: "t1".into(),
            key_authorization: "t1.k".into(),
        };
        let alpn = Challenge::TlsAlpn01 {
            domain: "live.test".into(),
            digest: vec![1; 32],
        };
        let stored = |list: &[&Challenge]| {
            list.iter()
                .map(|c| (challenge_key(c), (*c).clone()))
                .collect::<HashMap<_, _>>()
        };
        sync_challenges(&mut published, stored(&[&http, &alpn]), &store);
        let path = "/.well-known/acme-challenge/t1";
        assert_eq!(store.http01_response(path).as_deref(), Some("t1.k"));
        assert!(store.tls_alpn01_cert("live.test").is_some());
        sync_challenges(&mut published, stored(&[&alpn]), &store);
        assert_eq!(store.http01_response(path), None);
        assert!(store.tls_alpn01_cert("live.test").is_some());
        sync_challenges(&mut published, stored(&[]), &store);
        assert!(store.tls_alpn01_cert("live.test").is_none());
        assert!(published.is_empty());
    }
}
