//! ACME against a real Pebble that validates challenges by connecting back to
//! our listeners: tls-alpn-01, http-01, reuse across restarts, renewal with
//! hot swap, and the order lock between instances.

mod tls_support;

use amslb::config::tls::{AcmeConfig, ChallengeKind, TlsConfig};
use amslb::tls::Certificates;
use amslb::tls::acme::AcmeManager;
use http_body_util::{BodyExt, Empty};
use rustls::pki_types::ServerName;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tls_support::{Front, Pebble, get, mode, tempdir};
use tokio::net::TcpStream;

const DOMAIN: &str = "live.amslb.test";

fn tls_config(dir: &Path, pebble: &Pebble, challenge: ChallengeKind) -> TlsConfig {
    TlsConfig {
        certs_dir: dir.to_path_buf(),
        default_cert: None,
        acme: Some(AcmeConfig {
            directory: pebble.directory.clone(),
            contact: vec!["mailto:ops@example.com".into()],
            domains: vec![DOMAIN.into()],
            challenge,
            ca_file: Some(pebble.ca_file.clone()),
            renew_at: 2.0 / 3.0,
            renew_jitter: 0.05,
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(2),
            lock_lease: Duration::from_secs(60),
        }),
    }
}

fn manager(config: &TlsConfig, certs: &Arc<Certificates>) -> AcmeManager {
    AcmeManager::new(config.acme.clone().unwrap(), certs.clone())
}

/// Front listeners first (Pebble must know their ports), then Pebble.
async fn setup(validity: Option<u64>) -> (std::path::PathBuf, Arc<Certificates>, Front, Pebble) {
    amslb::tls::install_crypto_provider();
    let dir = tempdir("acme");
    let certs = Certificates::open(&TlsConfig {
        certs_dir: dir.clone(),
        default_cert: None,
        acme: None,
    })
    .unwrap();
    let front = Front::start(certs.clone()).await;
    let pebble = Pebble::start(front.http.port(), front.https.port(), validity).await;
    (dir, certs, front, pebble)
}

#[tokio::test]
async fn tls_alpn01_obtains_serves_and_restart_reuses_the_certificate() {
    let (dir, certs, front, pebble) = setup(None).await;
    let config = tls_config(&dir, &pebble, ChallengeKind::TlsAlpn01);
    let acme = manager(&config, &certs);
    assert!(acme.wait().is_zero(), "no certificate yet: renewal due now");
    assert!(acme.renew_once().await.unwrap(), "order must complete");

    let roots = [pebble.root_der()];
    let seen = get(
        front.https,
        DOMAIN,
        &roots,
        &[b"h2"],
        "/live/streams/s1.m3u8",
    )
    .await
    .expect("client trusting Pebble's root must connect");
    assert_eq!(seen.status, 200);
    assert_eq!(seen.version, http::Version::HTTP_2);

    let cert_file = dir.join(format!("{DOMAIN}.pem"));
    let account_file = dir.join(".acme/account.json");
    assert_eq!(
        mode(&cert_file),
        0o600,
        "certificate + key file must be 0600"
    );
    assert_eq!(mode(&account_file), 0o600, "account key file must be 0600");
    assert!(!dir.join(".acme/order.lock").exists(), "lock released");

    // Restart: a new process state over the same directory serves the stored
    // certificate at once and plans no order before two thirds of its life.
    let stored = std::fs::read(&cert_file).unwrap();
    let account = std::fs::read(&account_file).unwrap();
    drop(front);
    let certs = Certificates::open(&config).unwrap();
    let acme = manager(&config, &certs);
    assert!(
        acme.wait() > Duration::from_secs(86_400),
        "fresh stored certificate must not be renewed now: {:?}",
        acme.wait()
    );
    let front = Front::start(certs.clone()).await;
    let again = get(front.https, DOMAIN, &roots, &[], "/").await.unwrap();
    assert_eq!(
        again.leaf, seen.leaf,
        "restart serves the stored certificate"
    );
    assert_eq!(std::fs::read(&cert_file).unwrap(), stored);
    assert_eq!(std::fs::read(&account_file).unwrap(), account);
}

#[tokio::test]
async fn http01_obtains_and_serves() {
    let (dir, certs, front, pebble) = setup(None).await;
    let config = tls_config(&dir, &pebble, ChallengeKind::Http01);
    assert!(manager(&config, &certs).renew_once().await.unwrap());

    let seen = get(
        front.https,
        DOMAIN,
        &[pebble.root_der()],
        &[b"http/1.1"],
        "/rest/v2/x",
    )
    .await
    .unwrap();
    assert_eq!(seen.status, 200);
    assert_eq!(seen.body, "HTTP/1.1 /rest/v2/x");
    // Challenges are withdrawn once the order is done.
    assert_eq!(
        certs
            .challenges()
            .http01_response("/.well-known/acme-challenge/anything"),
        None
    );
}

#[tokio::test]
async fn second_instance_waits_for_the_order_lock() {
    let (dir, certs, _front, pebble) = setup(None).await;
    let config = tls_config(&dir, &pebble, ChallengeKind::TlsAlpn01);
    let (first, second) = (manager(&config, &certs), manager(&config, &certs));
    let (a, b) = tokio::join!(first.renew_once(), second.renew_once());
    let outcomes = [a.unwrap(), b.unwrap()];
    assert_eq!(
        outcomes.iter().filter(|done| **done).count(),
        1,
        "exactly one instance orders while the other sees the lock: {outcomes:?}"
    );
    // After the lock is free, the other instance finds the fresh certificate
    // on disk and does not order again (the stored file stays the same).
    let stored = std::fs::read(dir.join(format!("{DOMAIN}.pem"))).unwrap();
    assert!(second.renew_once().await.unwrap());
    assert_eq!(
        std::fs::read(dir.join(format!("{DOMAIN}.pem"))).unwrap(),
        stored
    );
}

#[tokio::test]
async fn short_lived_certificate_is_renewed_and_swapped_with_connection_open() {
    // Pebble issues certificates valid 9 s: renewal is due after about 6 s.
    let (dir, certs, front, pebble) = setup(Some(9)).await;
    let config = tls_config(&dir, &pebble, ChallengeKind::TlsAlpn01);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(manager(&config, &certs).run(shutdown.clone()));
    let roots = [pebble.root_der()];

    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Ok(seen) = get(front.https, DOMAIN, &roots, &[], "/").await {
            break seen.leaf;
        }
        assert!(Instant::now() < deadline, "no certificate obtained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // One connection stays open across the renewal.
    let tcp = TcpStream::connect(front.https).await.unwrap();
    let tls = tls_support::connector(&roots, &[b"http/1.1"])
        .connect(ServerName::try_from(DOMAIN).unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = || {
        http::Request::get("/kept")
            .header("host", DOMAIN)
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    assert_eq!(send.send_request(request()).await.unwrap().status(), 200);

    let renewed = loop {
        // Keep the open connection busy (an idle one would hit the client timeout).
        assert_eq!(send.send_request(request()).await.unwrap().status(), 200);
        // New connections: a failed handshake here (the old certificate
        // expiring a moment before the new one lands) just means "not yet".
        if let Ok(seen) = get(front.https, DOMAIN, &roots, &[], "/").await
            && seen.leaf != first
        {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "certificate was not renewed in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(renewed.status, 200);

    let response = send.send_request(request()).await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "open connection survives the renewal"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"HTTP/1.1 /kept");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("renewal task stops on shutdown")
        .unwrap();
}
