//! ACME against a real Pebble that validates challenges by connecting back to
//! amslb's listeners: tls-alpn-01, http-01, reuse across restarts, renewal with
//! hot swap (the real binary in front of a simulated node), and the order lock
//! between instances (two managers in one process sharing a directory).

mod support;
mod tls_support;

use amslb::config::tls::{AcmeConfig, ChallengeKind, TlsConfig};
use amslb::tls::Certificates;
use amslb::tls::acme::{AcmeManager, Renewal};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Amslb, sim_node};
use tls_support::{
    Front, Pebble, free_port, get, get_eventually, kept_request, lb_config, mode, open_h1, tempdir,
};

const DOMAIN: &str = "live.amslb.test";

fn tls_config(dir: &Path, pebble: &Pebble, challenge: ChallengeKind) -> TlsConfig {
    TlsConfig {
        certs_dir: dir.to_path_buf(),
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
            storage_key_file: None,
        }),
        ..TlsConfig::default()
    }
}

fn manager(config: &TlsConfig, certs: &Arc<Certificates>) -> AcmeManager {
    AcmeManager::new(config.acme.clone().unwrap(), certs.clone())
}

/// Library-level setup: the stand-in front (its ports go to Pebble) over a
/// fresh certificate directory, then Pebble.
async fn setup() -> (tempfile::TempDir, Arc<Certificates>, Front, Pebble) {
    amslb::tls::install_crypto_provider();
    let tmp = tempdir("acme");
    let certs = Certificates::open(&TlsConfig {
        certs_dir: tmp.path().to_path_buf(),
        ..TlsConfig::default()
    })
    .unwrap();
    let front = Front::start(certs.clone()).await;
    let pebble = Pebble::start(0, front.https.port(), None).await;
    (tmp, certs, front, pebble)
}

/// amslb with ACME against `pebble`: an https listener on `https` (and a
/// plain one with `redirect_https` on `http`), certificates in `dir`.
fn start_amslb(
    https: SocketAddr,
    http: Option<SocketAddr>,
    node: SocketAddr,
    dir: &Path,
    pebble: &Pebble,
    challenge: &str,
) -> Amslb {
    let tls = format!(
        r#"
[tls]
certs_dir = "{}"

[tls.acme]
directory = "{}"
contact = ["mailto:ops@example.com"]
domains = ["{DOMAIN}"]
challenge = "{challenge}"
ca_file = "{}"
retry_min = "500ms"
retry_max = "2s"
"#,
        dir.display(),
        pebble.directory,
        pebble.ca_file.display()
    );
    let ready: Vec<SocketAddr> = [Some(https), http].into_iter().flatten().collect();
    Amslb::start(&lb_config(https, http, node, &tls), &ready)
}

/// A loopback address Pebble can reach: its mock DNS answers 127.0.0.1.
fn pebble_reachable() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

#[tokio::test]
async fn tls_alpn01_obtains_serves_and_restart_reuses_the_certificate() {
    amslb::tls::install_crypto_provider();
    let node = sim_node("origin-1").await;
    let https = pebble_reachable();
    let pebble = Pebble::start(0, https.port(), None).await;
    let tmp = tempdir("acme-alpn");
    let dir = tmp.path();
    let amslb = start_amslb(https, None, node.addr, dir, &pebble, "tls-alpn-01");

    let roots = [pebble.root_der()];
    let first = get_eventually(https, DOMAIN, &roots, Duration::from_secs(30)).await;
    let seen = get(https, DOMAIN, &roots, &[b"h2"], "/LiveApp/streams/s1.m3u8")
        .await
        .expect("client trusting Pebble's root must connect");
    assert_eq!(seen.status, 200);
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert_eq!(seen.headers["x-node-id"], "origin-1");
    assert!(
        amslb.log().contains("certificate obtained"),
        "{}",
        amslb.log()
    );

    let cert_file = dir.join(format!("{DOMAIN}.pem"));
    let account_file = dir.join(".acme/account.json");
    assert_eq!(
        mode(&cert_file),
        0o600,
        "certificate + key file must be 0600"
    );
    assert_eq!(mode(&account_file), 0o600, "account key file must be 0600");
    assert_eq!(mode(&dir.join(".acme")), 0o700);
    assert!(!dir.join(".acme/order.lock").exists(), "lock released");

    // Restart: the stored certificate is served from the first handshake and
    // nothing is ordered (nor a new account registered).
    let stored = std::fs::read(&cert_file).unwrap();
    let account = std::fs::read(&account_file).unwrap();
    drop(amslb);
    let amslb = start_amslb(https, None, node.addr, dir, &pebble, "tls-alpn-01");
    let again = get(https, DOMAIN, &roots, &[], "/").await.unwrap();
    assert_eq!(
        again.leaf, first.leaf,
        "restart serves the stored certificate"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !amslb.log().contains("ordering certificate"),
        "{}",
        amslb.log()
    );
    assert_eq!(std::fs::read(&cert_file).unwrap(), stored);
    assert_eq!(std::fs::read(&account_file).unwrap(), account);
}

#[tokio::test]
async fn http01_obtains_and_serves_despite_redirect_https() {
    amslb::tls::install_crypto_provider();
    let node = sim_node("origin-1").await;
    let (https, http) = (pebble_reachable(), pebble_reachable());
    let pebble = Pebble::start(http.port(), https.port(), None).await;
    let tmp = tempdir("acme-http");
    let dir = tmp.path();
    let amslb = start_amslb(https, Some(http), node.addr, dir, &pebble, "http-01");

    let seen = get_eventually(https, DOMAIN, &[pebble.root_der()], Duration::from_secs(30)).await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.headers["x-node-id"], "origin-1");
    assert!(
        amslb.log().contains("certificate obtained"),
        "{}",
        amslb.log()
    );

    // Everything else on the plain listener is still redirected, and the
    // challenge prefix (no pending token now) is routed, not redirected.
    let r = support::get(http, "/LiveApp/play.html").await;
    assert_eq!(r.status, 302);
    let r = support::get(http, "/.well-known/acme-challenge/unknown").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.node(), "origin-1");
}

#[tokio::test]
async fn short_lived_certificate_is_renewed_and_swapped_with_connection_open() {
    amslb::tls::install_crypto_provider();
    let node = sim_node("origin-1").await;
    let https = pebble_reachable();
    // Pebble issues certificates valid 9 s: renewal is due after about 6 s.
    let pebble = Pebble::start(0, https.port(), Some(9)).await;
    let tmp = tempdir("acme-renew");
    let dir = tmp.path();
    let amslb = start_amslb(https, None, node.addr, dir, &pebble, "tls-alpn-01");
    let roots = [pebble.root_der()];
    let first = get_eventually(https, DOMAIN, &roots, Duration::from_secs(20))
        .await
        .leaf;

    // One connection stays open across the renewal.
    let (mut send, _) = open_h1(https, DOMAIN, &roots).await;
    let request = || kept_request(DOMAIN);
    send.ready().await.unwrap();
    let response = send.send_request(request()).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let renewed = loop {
        // Keep the open connection busy (an idle one would hit the client timeout).
        send.ready().await.unwrap();
        let response = send.send_request(request()).await.unwrap();
        assert_eq!(response.status(), 200);
        // Read the whole body: a client that drops an unread body cannot
        // reuse its connection.
        response.into_body().collect().await.unwrap();
        // New connections: a failed handshake here (the old certificate
        // expiring a moment before the new one lands) just means "not yet".
        if let Ok(seen) = get(https, DOMAIN, &roots, &[], "/").await
            && seen.leaf != first
        {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "not renewed in time:\n{}",
            amslb.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(renewed.status, 200);

    send.ready().await.unwrap();
    let response = send.send_request(request()).await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "open connection survives the renewal"
    );
    assert_eq!(response.headers()["x-node-id"], "origin-1");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"origin-1\n");
}

#[tokio::test]
async fn second_instance_waits_for_the_order_lock() {
    let (tmp, certs, _front, pebble) = setup().await;
    let dir = tmp.path();
    let config = tls_config(dir, &pebble, ChallengeKind::TlsAlpn01);
    let (first, second) = (manager(&config, &certs), manager(&config, &certs));
    let (a, b) = tokio::join!(first.renew_once(), second.renew_once());
    let outcomes = [a.unwrap(), b.unwrap()];
    assert_eq!(
        outcomes.iter().filter(|r| **r == Renewal::Ordered).count(),
        1,
        "exactly one instance orders while the other sees the lock: {outcomes:?}"
    );
    // After the lock is free, the other instance finds the fresh certificate
    // on disk and does not order again (the stored file stays the same).
    let stored = std::fs::read(dir.join(format!("{DOMAIN}.pem"))).unwrap();
    assert_eq!(second.renew_once().await.unwrap(), Renewal::Reused);
    assert_eq!(
        std::fs::read(dir.join(format!("{DOMAIN}.pem"))).unwrap(),
        stored
    );
}
