//! TLS termination without ACME: certificates from `certs_dir`, SNI, ALPN,
//! WebSocket over TLS, swapping changed files, and refusal of bad files: the
//! real amslb binary in front of a simulated node.

mod support;
mod tls_support;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use support::{Amslb, listener_addr, sim_node};
use tls_support::{TestCa, get, get_via, kept_request, lb_config, open_h1, tempdir};
use tokio::net::TcpStream;

fn leaf_der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// amslb in front of one simulated origin, serving the certificates in `dir`;
/// `extra` is added to the `[tls]` table.
async fn start(dir: &Path, extra: &str) -> (Amslb, SocketAddr, support::SimNode) {
    let node = sim_node("origin-1").await;
    let https = listener_addr(18443);
    let tls = format!("[tls]\ncerts_dir = \"{}\"\n{extra}", dir.display());
    let amslb = Amslb::start(&lb_config(https, None, node.addr, &tls), &[https]);
    (amslb, https, node)
}

/// amslb serving one `live.amslb.test` certificate of a fresh CA from a
/// new directory (named after `tag`), in front of one simulated origin.
struct Live {
    ca: TestCa,
    amslb: Amslb,
    https: SocketAddr,
    node: support::SimNode,
    _dir: tempfile::TempDir,
}

async fn start_live(tag: &str) -> Live {
    amslb::tls::install_crypto_provider();
    let ca = TestCa::new();
    let dir = tempdir(tag);
    let (cert, key) = ca.leaf(&["live.amslb.test"]);
    std::fs::write(dir.path().join("live.pem"), format!("{cert}{key}")).unwrap();
    let (amslb, https, node) = start(dir.path(), "").await;
    Live {
        ca,
        amslb,
        https,
        node,
        _dir: dir,
    }
}

#[tokio::test]
async fn sni_picks_the_right_certificate_among_three() {
    amslb::tls::install_crypto_provider();
    let ca = TestCa::new();
    let tmp = tempdir("sni");
    let dir = tmp.path();
    let (live, live_key) = ca.leaf(&["live.amslb.test"]);
    let (wild, wild_key) = ca.leaf(&["*.cdn.amslb.test"]);
    let (panel, panel_key) = ca.leaf(&["panel.amslb.test"]);
    std::fs::write(dir.join("live.pem"), format!("{live}{live_key}")).unwrap();
    std::fs::write(dir.join("cdn.crt"), &wild).unwrap();
    std::fs::write(dir.join("cdn.key"), wild_key).unwrap();
    std::fs::write(dir.join("panel.pem"), format!("{panel}{panel_key}")).unwrap();
    let (_amslb, https, _node) = start(dir, "default_cert = \"panel\"\n").await;
    let roots = [ca.der.clone()];

    for (sni, expected) in [
        ("live.amslb.test", &live),
        ("edge1.cdn.amslb.test", &wild),
        ("panel.amslb.test", &panel),
    ] {
        let seen = get(https, sni, &roots, &[b"http/1.1"], "/rest/v2/version")
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(seen.leaf, leaf_der(expected), "wrong certificate for {sni}");
        assert_eq!(seen.status, 200);
        assert_eq!(seen.headers["x-node-id"], "origin-1");
    }

    // An unknown name gets the configured default (panel), which the client
    // then rejects as not matching: the handshake carried panel's certificate.
    let err = get(https, "other.test", &roots, &[], "/")
        .await
        .err()
        .expect("default certificate must not validate for another name");
    assert!(err.contains("handshake"), "{err}");
}

#[tokio::test]
async fn h2_and_http11_are_both_proxied_with_forwarded_proto_https() {
    let Live {
        ca,
        amslb: _amslb,
        https,
        node,
        _dir,
    } = start_live("alpn").await;
    let roots = [ca.der.clone()];

    let h2 = get(
        https,
        "live.amslb.test",
        &roots,
        &[b"h2", b"http/1.1"],
        "/LiveApp/streams/s1.m3u8",
    )
    .await
    .unwrap();
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(h2.version, http::Version::HTTP_2);
    assert_eq!((h2.status.as_u16(), h2.body.as_str()), (200, "origin-1\n"));

    let h1 = get(
        https,
        "live.amslb.test",
        &roots,
        &[b"http/1.1"],
        "/rest/v2/version",
    )
    .await
    .unwrap();
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1.version, http::Version::HTTP_11);
    assert_eq!(h1.status, 200);

    // No ALPN at all (old clients, curl --no-alpn): HTTP/1.1 by sniffing.
    let none = get(https, "live.amslb.test", &roots, &[], "/")
        .await
        .unwrap();
    assert_eq!(none.alpn, None);
    assert_eq!(none.status, 200);

    let seen = node.seen();
    assert_eq!(seen.len(), 3);
    for request in &seen {
        assert_eq!(request.headers["x-forwarded-proto"], "https", "{request:?}");
        assert_eq!(request.headers["host"], "live.amslb.test", "{request:?}");
    }
    assert_eq!(
        seen[0].uri, "/LiveApp/streams/s1.m3u8",
        "h2 request reaches the node in origin form"
    );
}

#[tokio::test]
async fn tls12_and_tls13_both_handshake_and_resume() {
    let Live {
        ca,
        amslb: _amslb,
        https,
        node: _node,
        _dir,
    } = start_live("resume").await;

    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_protocol_versions(&[version])
            .with_root_certificates(roots)
            .with_no_client_auth();
        // One connector, so one client session cache for both connections.
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let first = get_via(&connector, https, "live.amslb.test", "/")
            .await
            .unwrap();
        assert_eq!(first.tls_version, Some(version.version));
        assert!(!first.resumed);
        assert_eq!(first.status, 200);
        let second = get_via(&connector, https, "live.amslb.test", "/")
            .await
            .unwrap();
        assert!(second.resumed, "{:?} session not resumed", version.version);
        assert_eq!(second.status, 200);
    }
}

/// wrk and many scripts send the address they dial as SNI, which RFC 6066
/// forbids; rustls ignores it and warns. Those handshakes must work and must
/// not write a log line each (any client could fill the log that way).
#[tokio::test]
async fn ip_address_as_sni_handshakes_without_a_log_line_per_connection() {
    let Live {
        ca: _,
        amslb,
        https,
        node: _node,
        _dir,
    } = start_live("ipsni").await;

    let ip = https.ip().to_string();
    for _ in 0..3 {
        let out = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &https.to_string(),
                "-servername",
                &ip,
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl not found: apt-get install openssl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("BEGIN CERTIFICATE"),
            "no certificate from a handshake with SNI {ip}: {text}"
        );
    }
    let log = amslb.log();
    assert!(
        !log.contains("rustls") && !log.contains("SNI"),
        "a client-side quirk was logged per connection:\n{log}"
    );
}

#[tokio::test]
async fn websocket_echoes_over_tls_through_the_balancer() {
    let Live {
        ca,
        amslb: _amslb,
        https,
        node,
        _dir,
    } = start_live("wss").await;

    let tcp = TcpStream::connect(https).await.unwrap();
    // Browsers open WebSockets on an HTTP/1.1 connection (amslb does not offer
    // RFC 8441 WebSocket over h2), so the client offers http/1.1 here.
    let tls = tls_support::connector(std::slice::from_ref(&ca.der), &[b"http/1.1"])
        .connect(ServerName::try_from("live.amslb.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut ws, response) =
        tokio_tungstenite::client_async("wss://live.amslb.test/LiveApp/websocket", tls)
            .await
            .unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["x-node-id"], "origin-1");
    for i in 0..3 {
        let text = format!("{{\"command\":\"play\",\"n\":{i}}}");
        ws.send(text.clone().into()).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    assert_eq!(node.seen()[0].headers["x-forwarded-proto"], "https");
}

/// Writes `text` to `dir/name` the way deployment tools do: a temporary file
/// renamed into place, so a reload never sees half a file.
fn install(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.new"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(name)).unwrap();
}

/// Polls new connections until one is served `expected` (or fails after 5 s).
async fn wait_for_leaf(https: SocketAddr, roots: &[CertificateDer<'static>], expected: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Ok(seen) = get(https, "live.amslb.test", roots, &[], "/").await
            && seen.leaf == leaf_der(expected)
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "certificate not picked up; last error: {:?}",
            get(https, "live.amslb.test", roots, &[], "/").await.err()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn without_certificate_handshake_is_refused_until_one_is_added() {
    amslb::tls::install_crypto_provider();
    let ca = TestCa::new();
    let tmp = tempdir("empty");
    let dir = tmp.path();
    let (amslb, https, _node) = start(dir, "watch_interval = \"100ms\"\n").await;
    let roots = [ca.der.clone()];

    let err = get(https, "live.amslb.test", &roots, &[], "/")
        .await
        .err()
        .expect("no certificate: handshake must fail");
    assert!(err.contains("handshake"), "{err}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        amslb
            .log()
            .contains("TLS handshake refused: no certificate loaded yet"),
        "{}",
        amslb.log()
    );

    let (cert, key) = ca.leaf(&["live.amslb.test"]);
    install(dir, "live.pem", &format!("{cert}{key}"));
    wait_for_leaf(https, &roots, &cert).await;
}

#[tokio::test]
async fn changed_file_is_swapped_in_and_open_connection_survives() {
    amslb::tls::install_crypto_provider();
    let ca = TestCa::new();
    let tmp = tempdir("swap");
    let dir = tmp.path();
    let (old, old_key) = ca.leaf(&["live.amslb.test"]);
    std::fs::write(dir.join("live.pem"), format!("{old}{old_key}")).unwrap();
    let (amslb, https, _node) = start(dir, "watch_interval = \"100ms\"\n").await;
    let roots = [ca.der.clone()];

    // Keep one HTTP/1.1 connection open across the swap.
    let (mut send, leaf) = open_h1(https, "live.amslb.test", &roots).await;
    assert_eq!(leaf, leaf_der(&old));
    let request = || kept_request("live.amslb.test");
    assert_eq!(send.send_request(request()).await.unwrap().status(), 200);

    let (new, new_key) = ca.leaf(&["live.amslb.test"]);
    install(dir, "live.pem", &format!("{new}{new_key}"));
    wait_for_leaf(https, &roots, &new).await;

    let response = send.send_request(request()).await.unwrap();
    assert_eq!(response.status(), 200, "open connection survives the swap");
    assert_eq!(response.headers()["x-node-id"], "origin-1");

    // A broken file is refused with a warning; the loaded certificate keeps serving.
    install(dir, "live.pem", "not a pem");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !amslb.log().contains("certificate reload failed") {
        assert!(std::time::Instant::now() < deadline, "{}", amslb.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        amslb
            .log()
            .contains(&dir.join("live.pem").display().to_string())
    );
    wait_for_leaf(https, &roots, &new).await;
}

/// Starts amslb over `dir` expecting it to refuse; returns its output.
fn refused_start(dir: &Path) -> String {
    let https = listener_addr(18443);
    let node: SocketAddr = "127.0.0.1:5080".parse().unwrap();
    let tls = format!("[tls]\ncerts_dir = \"{}\"\n", dir.display());
    let tmp = tempdir("refused");
    let config = tmp.path().join("lb.toml");
    std::fs::write(&config, lb_config(https, None, node, &tls)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amslb"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "amslb must refuse to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_pem_or_missing_key_is_refused_at_start_naming_the_file() {
    amslb::tls::install_crypto_provider();
    let ca = TestCa::new();
    let (cert, key) = ca.leaf(&["live.amslb.test"]);

    let tmp = tempdir("badpem");

    let dir = tmp.path();
    std::fs::write(dir.join("good.pem"), format!("{cert}{key}")).unwrap();
    std::fs::write(
        dir.join("broken.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let out = refused_start(dir);
    assert!(
        out.contains(&format!("{}: bad PEM", dir.join("broken.pem").display())),
        "{out}"
    );

    let tmp = tempdir("nokey");

    let dir = tmp.path();
    std::fs::write(dir.join("live.crt"), &cert).unwrap();
    let out = refused_start(dir);
    assert!(
        out.contains(&format!(
            "{}: missing private key",
            dir.join("live.key").display()
        )),
        "{out}"
    );

    let tmp = tempdir("keyless-pem");

    let dir = tmp.path();
    std::fs::write(dir.join("live.pem"), &cert).unwrap();
    let out = refused_start(dir);
    assert!(
        out.contains(&format!(
            "{}: no PRIVATE KEY",
            dir.join("live.pem").display()
        )),
        "{out}"
    );
}

#[tokio::test]
async fn certificate_expiry_is_exported_as_a_metric() {
    let ca = TestCa::new();
    let tmp = tempdir("expiry");
    let dir = tmp.path();
    let (live, live_key) = ca.leaf(&["live.amslb.test"]);
    std::fs::write(dir.join("live.pem"), format!("{live}{live_key}")).unwrap();
    let stats = listener_addr(6080);
    let extra = format!("[stats]\nbind = \"{stats}\"\nallow = [\"127.0.0.0/8\"]\n");
    let (_amslb, _https, _node) = start(dir, &extra).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = support::get(stats, "/metrics").await.text();
        let expiry = text
            .lines()
            .find(|l| {
                l.starts_with("amslb_certificate_expiry_timestamp_seconds{certificate=\"live\"}")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        if let Some(expiry) = expiry {
            assert!(
                expiry > now,
                "the test certificate is valid now: {expiry} <= {now}"
            );
            assert_eq!(expiry as i64, not_after(&live), "the leaf's notAfter");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no expiry metric:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn failed_handshakes_are_counted_by_reason() {
    use tokio::io::AsyncWriteExt;
    amslb::tls::install_crypto_provider();
    let ca = TestCa::new();
    let tmp = tempdir("handshake-failures");
    let (cert, key) = ca.leaf(&["live.amslb.test"]);
    std::fs::write(tmp.path().join("live.pem"), format!("{cert}{key}")).unwrap();
    let stats = listener_addr(6080);
    let extra = format!("[stats]\nbind = \"{stats}\"\nallow = [\"127.0.0.0/8\"]\n");
    let (amslb, https, _node) = start(tmp.path(), &extra).await;

    // Plain HTTP to the TLS port: not a ClientHello, an error at once.
    let mut plain = TcpStream::connect(https).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: live.amslb.test\r\n\r\n")
        .await
        .unwrap();
    // A client that says nothing: cut after `timeouts.client` (5 s here).
    let _silent = TcpStream::connect(https).await.unwrap();
    // A client that leaves at once, as a TCP probe does (so does the start-up
    // wait for the listener: "closed" counts those too).
    drop(TcpStream::connect(https).await.unwrap());

    let count = |text: &str, reason: &str| {
        let series = format!(
            "amslb_tls_handshake_failures_total{{listener=\"https\",reason=\"{reason}\"}} "
        );
        support::series_value(text, &series)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let text = support::get(stats, "/metrics").await.text();
        let [error, timeout, closed] = ["error", "timeout", "closed"].map(|r| count(&text, r));
        if timeout.is_some() {
            assert_eq!(error, Some(1.0), "the plain HTTP client only:\n{text}");
            assert!(closed >= Some(1.0), "the client that left:\n{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no timeout counted:\n{text}\nlog:\n{}",
            amslb.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    // A good handshake afterwards counts nothing.
    let seen = get(
        https,
        "live.amslb.test",
        std::slice::from_ref(&ca.der),
        &[],
        "/rest/v2/version",
    )
    .await
    .unwrap();
    assert_eq!(seen.status, 200);
    let text = support::get(stats, "/metrics").await.text();
    assert_eq!(count(&text, "error"), Some(1.0), "{text}");
    assert_eq!(count(&text, "timeout"), Some(1.0), "{text}");
}

/// The notAfter of a PEM certificate, in seconds since the epoch.
fn not_after(pem: &str) -> i64 {
    let der = leaf_der(pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.validity().not_after.timestamp()
}

#[tokio::test]
async fn reload_to_another_certs_dir_serves_its_store_and_open_connection_survives() {
    amslb::tls::install_crypto_provider();
    let ca = TestCa::new();
    let (tmp_a, tmp_b) = (tempdir("reload-a"), tempdir("reload-b"));
    let (a, b) = (tmp_a.path(), tmp_b.path());
    let (cert_a, key_a) = ca.leaf(&["live.amslb.test"]);
    let (cert_b, key_b) = ca.leaf(&["live.amslb.test"]);
    std::fs::write(a.join("live.pem"), format!("{cert_a}{key_a}")).unwrap();
    std::fs::write(b.join("live.pem"), format!("{cert_b}{key_b}")).unwrap();
    let node = sim_node("origin-1").await;
    let https = listener_addr(18443);
    let tls = |dir: &Path| {
        format!(
            "[tls]\ncerts_dir = \"{}\"\nwatch_interval = \"100ms\"\n",
            dir.display()
        )
    };
    let amslb = Amslb::start(&lb_config(https, None, node.addr, &tls(a)), &[https]);
    let roots = [ca.der.clone()];

    let (mut send, leaf) = open_h1(https, "live.amslb.test", &roots).await;
    assert_eq!(leaf, leaf_der(&cert_a));
    assert_eq!(
        send.send_request(kept_request("live.amslb.test"))
            .await
            .unwrap()
            .status(),
        200
    );

    std::fs::write(
        amslb.config_path(),
        lb_config(https, None, node.addr, &tls(b)),
    )
    .unwrap();
    amslb.signal("HUP");
    wait_for_leaf(https, &roots, &cert_b).await;
    let response = send
        .send_request(kept_request("live.amslb.test"))
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "open connection survives the reload"
    );

    // The directory watch follows the new directory.
    let (cert_b2, key_b2) = ca.leaf(&["live.amslb.test"]);
    install(b, "live.pem", &format!("{cert_b2}{key_b2}"));
    wait_for_leaf(https, &roots, &cert_b2).await;

    // A reload to a directory with a bad file is refused; the store stays.
    let tmp_c = tempdir("reload-c");
    std::fs::write(tmp_c.path().join("live.pem"), "not a pem").unwrap();
    std::fs::write(
        amslb.config_path(),
        lb_config(https, None, node.addr, &tls(tmp_c.path())),
    )
    .unwrap();
    amslb.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !amslb.log().contains("reload refused") {
        assert!(std::time::Instant::now() < deadline, "{}", amslb.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    wait_for_leaf(https, &roots, &cert_b2).await;
}
