//! TLS termination without ACME: certificates from `certs_dir`, SNI, ALPN,
//! WebSocket over TLS, reload, and refusal of bad files. The real amslb binary
//! in front of simulated nodes, except for reload (no reload trigger in the
//! binary yet), which drives `amslb::tls` directly.

#[allow(unused_imports)] // the shared harness re-exports more than this file uses
mod support;
mod tls_support;

use amslb::config::tls::TlsConfig;
use amslb::tls::Certificates;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use support::{Amslb, listener_addr, sim_node};
use tls_support::{Front, TestCa, get, lb_config, tempdir};
use tokio::net::TcpStream;

fn config(dir: &Path, default_cert: Option<&str>) -> TlsConfig {
    TlsConfig {
        certs_dir: dir.to_path_buf(),
        default_cert: default_cert.map(str::to_string),
        acme: None,
    }
}

fn leaf_der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// amslb in front of one simulated origin, serving the certificates in `dir`.
async fn start(dir: &Path, default_cert: Option<&str>) -> (Amslb, SocketAddr, support::SimNode) {
    let node = sim_node("origin-1").await;
    let https = listener_addr(18443);
    let default = default_cert.map_or(String::new(), |d| format!("default_cert = \"{d}\"\n"));
    let tls = format!("[tls]\ncerts_dir = \"{}\"\n{default}", dir.display());
    let amslb = Amslb::start(&lb_config(https, None, node.addr, &tls), &[https]);
    (amslb, https, node)
}

#[tokio::test]
async fn sni_picks_the_right_certificate_among_three() {
    amslb::tls::install_crypto_provider();
    let ca = TestCa::new();
    let dir = tempdir("sni");
    let (live, live_key) = ca.leaf(&["live.amslb.test"]);
    let (wild, wild_key) = ca.leaf(&["*.cdn.amslb.test"]);
    let (panel, panel_key) = ca.leaf(&["panel.amslb.test"]);
    std::fs::write(dir.join("live.pem"), format!("{live}{live_key}")).unwrap();
    std::fs::write(dir.join("cdn.crt"), &wild).unwrap();
    std::fs::write(dir.join("cdn.key"), wild_key).unwrap();
    std::fs::write(dir.join("panel.pem"), format!("{panel}{panel_key}")).unwrap();
    let (_amslb, https, _node) = start(&dir, Some("panel")).await;
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
    amslb::tls::install_crypto_provider();
    let ca = TestCa::new();
    let dir = tempdir("alpn");
    let (cert, key) = ca.leaf(&["live.amslb.test"]);
    std::fs::write(dir.join("live.pem"), format!("{cert}{key}")).unwrap();
    let (_amslb, https, node) = start(&dir, None).await;
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
async fn websocket_echoes_over_tls_through_the_balancer() {
    amslb::tls::install_crypto_provider();
    let ca = TestCa::new();
    let dir = tempdir("wss");
    let (cert, key) = ca.leaf(&["live.amslb.test"]);
    std::fs::write(dir.join("live.pem"), format!("{cert}{key}")).unwrap();
    let (_amslb, https, node) = start(&dir, None).await;

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

#[tokio::test]
async fn without_certificate_handshake_is_refused_until_one_is_added() {
    amslb::tls::install_crypto_provider();
    let ca = TestCa::new();
    let dir = tempdir("empty");
    let certs = Certificates::open(&config(&dir, None)).unwrap();
    let front = Front::start(certs.clone()).await;
    let roots = [ca.der.clone()];

    let err = get(front.https, "live.amslb.test", &roots, &[], "/")
        .await
        .err()
        .expect("no certificate: handshake must fail");
    assert!(err.contains("handshake"), "{err}");

    let (cert, key) = ca.leaf(&["live.amslb.test"]);
    std::fs::write(dir.join("live.pem"), format!("{cert}{key}")).unwrap();
    assert_eq!(certs.reload().unwrap(), 1);
    let seen = get(front.https, "live.amslb.test", &roots, &[], "/")
        .await
        .unwrap();
    assert_eq!(seen.status, 200);
}

#[tokio::test]
async fn reload_swaps_certificate_and_open_connection_survives() {
    use http_body_util::{BodyExt, Empty};
    amslb::tls::install_crypto_provider();
    let ca = TestCa::new();
    let dir = tempdir("swap");
    let (old, old_key) = ca.leaf(&["live.amslb.test"]);
    std::fs::write(dir.join("live.pem"), format!("{old}{old_key}")).unwrap();
    let certs = Certificates::open(&config(&dir, None)).unwrap();
    let front = Front::start(certs.clone()).await;
    let roots = [ca.der.clone()];

    // Keep one HTTP/1.1 connection open across the swap.
    let tcp = TcpStream::connect(front.https).await.unwrap();
    let tls = tls_support::connector(&roots, &[b"http/1.1"])
        .connect(ServerName::try_from("live.amslb.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = || {
        http::Request::get("/kept")
            .header("host", "live.amslb.test")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    assert_eq!(send.send_request(request()).await.unwrap().status(), 200);

    let (new, new_key) = ca.leaf(&["live.amslb.test"]);
    std::fs::write(dir.join("live.pem"), format!("{new}{new_key}")).unwrap();
    certs.reload().unwrap();
    let seen = get(front.https, "live.amslb.test", &roots, &[], "/")
        .await
        .unwrap();
    assert_eq!(
        seen.leaf,
        leaf_der(&new),
        "new connections get the new certificate"
    );

    let response = send.send_request(request()).await.unwrap();
    assert_eq!(response.status(), 200, "open connection survives the swap");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"HTTP/1.1 /kept");

    // A broken file on reload keeps the old snapshot serving.
    std::fs::write(dir.join("live.pem"), "not a pem").unwrap();
    let err = certs.reload().unwrap_err();
    assert_eq!(err.path, dir.join("live.pem"));
    let seen = get(front.https, "live.amslb.test", &roots, &[], "/")
        .await
        .unwrap();
    assert_eq!(seen.leaf, leaf_der(&new));
}

/// Starts amslb over `dir` expecting it to refuse; returns its output.
fn refused_start(dir: &Path) -> String {
    let https = listener_addr(18443);
    let node: SocketAddr = "127.0.0.1:5080".parse().unwrap();
    let tls = format!("[tls]\ncerts_dir = \"{}\"\n", dir.display());
    let config = tempdir("refused").join("lb.toml");
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

    let dir = tempdir("badpem");
    std::fs::write(dir.join("good.pem"), format!("{cert}{key}")).unwrap();
    std::fs::write(
        dir.join("broken.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let out = refused_start(&dir);
    assert!(
        out.contains(&format!("{}: bad PEM", dir.join("broken.pem").display())),
        "{out}"
    );

    let dir = tempdir("nokey");
    std::fs::write(dir.join("live.crt"), &cert).unwrap();
    let out = refused_start(&dir);
    assert!(
        out.contains(&format!(
            "{}: missing private key",
            dir.join("live.key").display()
        )),
        "{out}"
    );

    let dir = tempdir("keyless-pem");
    std::fs::write(dir.join("live.pem"), &cert).unwrap();
    let out = refused_start(&dir);
    assert!(
        out.contains(&format!(
            "{}: no PRIVATE KEY",
            dir.join("live.pem").display()
        )),
        "{out}"
    );
}
