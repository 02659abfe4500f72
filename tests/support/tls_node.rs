//! A simulated AMS node serving HTTPS (as a node's 5443 does) with a given
//! certificate: answers every request 200 with `x-node-id`, and records each
//! TLS handshake and whether it resumed an earlier session.

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running TLS node; stops when dropped.
pub struct TlsNode {
    /// Where it listens.
    pub addr: SocketAddr,
    /// One entry per completed handshake: whether it was resumed.
    pub handshakes: Arc<Mutex<Vec<bool>>>,
    /// Paths of the requests it answered.
    pub requests: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl TlsNode {
    /// Listens on `addr` with the PEM `cert` chain and `key`, answering as `id`.
    pub async fn start(id: &str, addr: SocketAddr, cert: &str, key: &str) -> TlsNode {
        amslb::tls::install_crypto_provider();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (seen, asked, id) = (handshakes.clone(), requests.clone(), id.to_string());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, seen, asked, id) =
                    (acceptor.clone(), seen.clone(), asked.clone(), id.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let resumed =
                        tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                    seen.lock().unwrap().push(resumed);
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        asked.lock().unwrap().push(req.uri().path().to_string());
                        let response = http::Response::builder()
                            .header("x-node-id", id.as_str())
                            .body(Full::new(Bytes::from_static(b"ok\n")))
                            .unwrap();
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TlsNode {
            addr,
            handshakes,
            requests,
            task,
        }
    }
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}
