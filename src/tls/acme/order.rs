//! One ACME order: prove control of the domains, then get the certificate.

use super::AcmeError;
use super::storage::{CHALLENGE_SETTLE, Challenge, Lease, Storage};
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

/// Shared storage for the answers of an order, and the lease it holds.
pub type Shared<'a> = (&'a Storage, &'a Lease);

/// Runs an order for `config.domains` and returns (chain PEM, private key PEM).
/// The challenge answers are published in `challenges` only while the order
/// runs, and with `shared` also in shared storage (fenced by the lease), so
/// that every instance answers the CA; the CA is asked to validate only once
/// they had time to reach every instance.
pub async fn obtain(
    account: &Account,
    config: &AcmeConfig,
    challenges: &ChallengeStore,
    shared: Option<Shared<'_>>,
) -> Result<(String, String), AcmeError> {
    let identifiers: Vec<Identifier> = config
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut published = Published {
        store: challenges,
        answers: Vec::new(),
    };
    let kind = match config.challenge {
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        ChallengeKind::Http01 => ChallengeType::Http01,
    };
    // First every answer is published, then the CA is told they are ready.
    let mut pending = Vec::new();
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
        let challenge = authz.challenge(kind.clone()).ok_or_else(|| {
            AcmeError::Order(format!("the CA offers no {kind:?} challenge for {domain}"))
        })?;
        let key_authorization = challenge.key_authorization();
        let answer = match config.challenge {
            ChallengeKind::Http01 => Challenge::Http01 {
                token: challenge.token.clone(),
                key_authorization: key_authorization.as_str().to_string(),
            },
            ChallengeKind::TlsAlpn01 => Challenge::TlsAlpn01 {
                domain: domain.clone(),
                digest: key_authorization.digest().as_ref().to_vec(),
            },
        };
        published.add(answer)?;
        pending.push(domain);
    }
    if let Some((storage, lease)) = shared
        && !pending.is_empty()
    {
        storage
            .publish(lease, &published.answers)
            .await
            .map_err(AcmeError::Storage)?;
        tokio::time::sleep(CHALLENGE_SETTLE).await;
    }
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        if !pending.contains(&authz.identifier().to_string()) {
            continue;
        }
        let domain = authz.identifier().to_string();
        let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
            AcmeError::Order(format!("the CA offers no {kind:?} challenge for {domain}"))
        })?;
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
    answers: Vec<Challenge>,
}

impl Published<'_> {
    fn add(&mut self, answer: Challenge) -> Result<(), AcmeError> {
        answer.add_to(self.store)?;
        self.answers.push(answer);
        Ok(())
    }
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for answer in &self.answers {
            answer.remove_from(self.store);
        }
    }
}
