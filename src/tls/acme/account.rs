//! The ACME account: created once, stored in `certs_dir/.acme/account.json`
//! (0600: it holds the account key) and reused across restarts.

use super::AcmeError;
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

/// Loads the stored account for `config.directory`, or registers a new one and stores it.
pub async fn load_or_create(config: &AcmeConfig, path: &Path) -> Result<Account, AcmeError> {
    if let Ok(text) = std::fs::read(path) {
        match serde_json::from_slice::<Stored>(&text) {
            Ok(stored) if stored.directory == config.directory => {
                return Ok(builder(config)?
                    .from_credentials(stored.credentials)
                    .await?);
            }
            Ok(_) => tracing::info!(
                file = %path.display(),
                "stored ACME account belongs to another directory; registering a new one"
            ),
            Err(e) => tracing::warn!(
                file = %path.display(),
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
    write_private(path, &json)?;
    tracing::info!(id = account.id(), "registered ACME account");
    Ok(account)
}

fn builder(config: &AcmeConfig) -> Result<AccountBuilder, AcmeError> {
    Ok(match &config.ca_file {
        Some(ca) => Account::builder_with_root(ca)?,
        None => Account::builder()?,
    })
}
