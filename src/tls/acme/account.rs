//! The ACME account: created once, stored in `certs_dir/.acme/account.json`
//! (0600: it holds the account key), or with `[state]` encrypted in shared
//! storage, and reused across restarts (and instances).

use super::AcmeError;
use super::storage::Storage;
use crate::config::tls::AcmeConfig;
use crate::tls::files::write_private;
use instant_acme::{Account, AccountBuilder, AccountCredentials, NewAccount};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What is stored: the credentials and the directory they belong to, so that
/// pointing the config at another CA creates a new account instead of
/// presenting a foreign key.
#[derive(Serialize, Deserialize)]
struct Stored {
    directory: String,
    credentials: AccountCredentials,
}

/// Where the account is kept.
pub enum Place<'a> {
    /// A file in `certs_dir` (one instance, or a shared directory).
    File(&'a Path),
    /// Shared storage, one account per ACME directory.
    Shared(&'a Storage),
}

impl Place<'_> {
    async fn read(&self, directory: &str) -> Result<Option<Vec<u8>>, AcmeError> {
        match self {
            Self::File(path) => Ok(std::fs::read(path).ok()),
            Self::Shared(storage) => storage
                .load_account(directory)
                .await
                .map_err(AcmeError::Storage),
        }
    }

    async fn write(&self, directory: &str, json: &[u8]) -> Result<(), AcmeError> {
        match self {
            Self::File(path) => Ok(write_private(path, json)?),
            Self::Shared(storage) => storage
                .store_account(directory, json)
                .await
                .map_err(AcmeError::Storage),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::Shared(_) => "shared storage".into(),
        }
    }
}

/// Loads the stored account for `config.directory`, or registers a new one and stores it.
pub async fn load_or_create(config: &AcmeConfig, place: Place<'_>) -> Result<Account, AcmeError> {
    if let Some(text) = place.read(&config.directory).await? {
        match serde_json::from_slice::<Stored>(&text) {
            Ok(stored) if stored.directory == config.directory => {
                return Ok(builder(config)?
                    .from_credentials(stored.credentials)
                    .await?);
            }
            Ok(_) => tracing::info!(
                at = place.describe(),
                "stored ACME account belongs to another directory; registering a new one"
            ),
            Err(e) => tracing::warn!(
                at = place.describe(),
                error = %e,
                "stored ACME account unreadable; registering a new one"
            ),
        }
    }
    let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder(config)?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory.clone(),
            None,
        )
        .await?;
    let stored = Stored {
        directory: config.directory.clone(),
        credentials,
    };
    let json = serde_json::to_vec_pretty(&stored)
        .map_err(|e| AcmeError::Order(format!("cannot encode account: {e}")))?;
    place.write(&config.directory, &json).await?;
    tracing::info!(id = account.id(), "registered ACME account");
    Ok(account)
}

fn builder(config: &AcmeConfig) -> Result<AccountBuilder, AcmeError> {
    Ok(match &config.ca_file {
        Some(ca) => Account::builder_with_root(ca)?,
        None => Account::builder()?,
    })
}
