//! TLS from amslb to nodes' HTTP (`[cluster.node_tls]`, `[[group]] node_tls`):
//! which nodes speak it, on which port, and the rustls client config to speak it.
//!
//! Sits just above the cluster data (it reads a node's group) and below the
//! health checks and connection pools, which both handshake through
//! [`NodeTls::handshake`]. One client config per `node_tls` table, shared by
//! every connection to those nodes: its session cache is what makes new
//! connections (pool growth, health checks) resume instead of paying a full
//! handshake.

use crate::cluster::Node;
use crate::config::Config;
use crate::config::rules::NodeTlsConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The system trust store, used when a `node_tls` table names no `ca_file`.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How to speak TLS to the nodes of one `node_tls` table.
#[derive(Clone)]
pub struct NodeTls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
    /// Node port for HTTPS.
    pub https_port: u16,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("server_name", &self.server_name)
            .field("https_port", &self.https_port)
            .finish_non_exhaustive()
    }
}

/// Why a `node_tls` table could not be turned into a client config.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct NodeTlsError {
    /// The table (`cluster.node_tls`, `group[1].node_tls`).
    pub key: String,
    /// What went wrong (names the file).
    pub reason: String,
}

impl NodeTls {
    fn new(key: &str, config: &NodeTlsConfig) -> Result<Self, NodeTlsError> {
        crate::tls::install_crypto_provider();
        let error = |reason: String| NodeTlsError {
            key: key.to_string(),
            reason,
        };
        let client = if config.verify {
            let file = config.ca_file.as_deref().unwrap_or(Path::new(SYSTEM_CAS));
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(file)
                .map_err(|e| error(format!("cannot read {}: {e}", file.display())))?;
            for cert in certs {
                let cert = cert.map_err(|e| error(format!("{}: {e}", file.display())))?;
                roots.add(cert).map_err(|e| {
                    error(format!("{}: unusable CA certificate: {e}", file.display()))
                })?;
            }
            if roots.is_empty() {
                return Err(error(format!("{}: no certificate in it", file.display())));
            }
            ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        } else {
            ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify::new()))
                .with_no_client_auth()
        };
        let server_name = config
            .server_name
            .as_deref()
            .map(|n| ServerName::try_from(n.to_string()))
            .transpose()
            .map_err(|e| error(format!("server_name: {e}")))?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
            https_port: config.https_port,
        })
    }

    /// TLS handshake with the node at `addr` over `stream`, checking its
    /// certificate names `server_name` (or the node's address).
    pub async fn handshake(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        self.connector.connect(name, stream).await
    }
}

/// Every `node_tls` table of a config, by group.
#[derive(Debug, Clone, Default)]
pub struct NodeTlsSet {
    cluster: Option<Arc<NodeTls>>,
    groups: HashMap<String, Arc<NodeTls>>,
}

impl NodeTlsSet {
    /// Builds the client configs; reads the CA files.
    pub fn from_config(config: &Config) -> Result<Self, NodeTlsError> {
        let cluster = config
            .cluster
            .node_tls
            .as_ref()
            .map(|t| NodeTls::new("cluster.node_tls", t).map(Arc::new))
            .transpose()?;
        let mut groups = HashMap::new();
        for (i, group) in config.groups.iter().enumerate() {
            if let Some(table) = &group.node_tls {
                let tls = NodeTls::new(&format!("group[{i}].node_tls"), table)?;
                groups.insert(group.name.clone(), Arc::new(tls));
            }
        }
        Ok(Self { cluster, groups })
    }

    /// The TLS settings of `node`'s group, if its nodes speak TLS.
    pub fn for_node(&self, node: &Node) -> Option<&Arc<NodeTls>> {
        self.groups.get(node.group()).or(self.cluster.as_ref())
    }

    /// Where `node`'s HTTP is (its HTTPS port under TLS), and the TLS to speak.
    pub fn http(&self, node: &Node) -> (SocketAddr, Option<&Arc<NodeTls>>) {
        match self.for_node(node) {
            Some(tls) => (
                SocketAddr::new(node.http_addr().ip(), tls.https_port),
                Some(tls),
            ),
            None => (node.http_addr(), None),
        }
    }
}

/// `verify = false`: any certificate is accepted, but the handshake
/// signatures are still checked (the peer holds the key of what it sent).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl NoVerify {
    fn new() -> Self {
        Self(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
    }
}

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
