//! One ACME order: prove control of the domains, then get the certificate.

use super::AcmeError;
use crate::config::tls::{AcmeConfig, ChallengeKind};
use crate::tls::challenge::ChallengeStore;
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, OrderStatus, RetryPolicy,
};
use std::time::Duration;

/// How long the CA may take to validate, and to issue.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(120));

/// Runs an order for `config.domains` and returns (chain PEM, private key PEM).
/// The challenge answers are published in `challenges` only while the order runs.
pub async fn obtain(
    account: &Account,
    config: &AcmeConfig,
    challenges: &ChallengeStore,
) -> Result<(String, String), AcmeError> {
    let identifiers: Vec<Identifier> = config
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut published = Published {
        store: challenges,
        tokens: Vec::new(),
        domains: Vec::new(),
    };
    let kind = match config.challenge {
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        ChallengeKind::Http01 => ChallengeType::Http01,
    };
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            // Reused from an earlier order: nothing to prove.
            AuthorizationStatus::Valid => continue,
            status => {
                return Err(AcmeError::Order(format!(
                    "authorization for {} is {status:?}",
                    authz.identifier()
                )));
            }
        }
        let domain = authz.identifier().to_string();
        let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
            AcmeError::Order(format!("the CA offers no {kind:?} challenge for {domain}"))
        })?;
        let key_authorization = challenge.key_authorization();
        match config.challenge {
            ChallengeKind::Http01 => {
                published.add_http01(&challenge.token, key_authorization.as_str())
            }
            ChallengeKind::TlsAlpn01 => {
                published.add_tls_alpn01(&domain, key_authorization.digest().as_ref())?
            }
        }
        challenge.set_ready().await?;
    }
    let status = order.poll_ready(&POLL).await?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::Order(format!("order ended {status:?}")));
    }
    drop(published);

    let key = rcgen::KeyPair::generate().map_err(|e| AcmeError::Order(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(config.domains.clone())
        .map_err(|e| AcmeError::Order(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| AcmeError::Order(e.to_string()))?;
    order.finalize_csr(csr.der()).await?;
    let chain = order.poll_certificate(&POLL).await?;
    Ok((chain, key.serialize_pem()))
}

/// Challenge answers published for one order, withdrawn when it ends however it ends.
struct Published<'a> {
    store: &'a ChallengeStore,
    tokens: Vec<String>,
    domains: Vec<String>,
}

impl Published<'_> {
    fn add_http01(&mut self, token: &str, key_authorization: &str) {
        self.store.add_http01(token, key_authorization);
        self.tokens.push(token.to_string());
    }

    fn add_tls_alpn01(&mut self, domain: &str, digest: &[u8]) -> Result<(), AcmeError> {
        self.store.add_tls_alpn01(domain, digest)?;
        self.domains.push(domain.to_string());
        Ok(())
    }
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for token in &self.tokens {
            self.store.remove_http01(token);
        }
        for domain in &self.domains {
            self.store.remove_tls_alpn01(domain);
        }
    }
}
