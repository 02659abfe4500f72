//! TLS from amslb to nodes (`[cluster.node_tls]`, `[[group]] node_tls`):
//! which nodes speak it, on which port (HTTPS and RTMPS), the rustls client
//! config to speak it, and [`dial`], the one way a connection to a node is
//! opened.
//!
//! Sits just above the cluster data (it reads a node's group) and below the
//! health checks, the HTTP connection pools and the L4 (RTMP) listeners,
//! which all connect through [`dial`]. One client config per `node_tls`
//! table, shared by every connection to those nodes, HTTP and RTMP alike: its
//! session cache is what makes new connections (pool growth, RTMP sessions,
//! health checks) resume instead of paying a full handshake.

use crate::cluster::Node;
use crate::config::Config;
use crate::config::rules::NodeTlsConfig;
use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

/// The system trust store, used when a `node_tls` table names no `ca_file`.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Sessions cached per node address (each holds a few TLS 1.3 tickets).
const SESSIONS_PER_NODE: usize = 8;
/// Node addresses with a session cache before all are dropped and rebuilt.
const MAX_NODE_CACHES: usize = 4096;

/// How to speak TLS to the nodes of one `node_tls` table.
pub struct NodeTls {
    /// The table's client config; each node address gets a copy with its
    /// own session cache ([`NodeTls::connector`]).
    config: Arc<ClientConfig>,
    connectors: Mutex<HashMap<SocketAddr, TlsConnector>>,
    server_name: Option<ServerName<'static>>,
    /// Node port for HTTPS.
    pub https_port: u16,
    /// Node port for RTMPS.
    pub rtmps_port: u16,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("server_name", &self.server_name)
            .field("https_port", &self.https_port)
            .field("rtmps_port", &self.rtmps_port)
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
            config: Arc::new(client),
            connectors: Mutex::default(),
            server_name,
            https_port: config.https_port,
            rtmps_port: config.rtmps_port,
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
        self.connector(addr).connect(name, stream).await
    }

    /// The connector for the node at `addr`. rustls keys its session cache by
    /// server name, and with a `server_name` every node shares one: a ticket
    /// one node issued would be offered to (and, unreadable there, burnt by)
    /// the next node round-robin picks. One cache per node address keeps each
    /// node's tickets for that node, so its next connection resumes.
    fn connector(&self, addr: SocketAddr) -> TlsConnector {
        let mut connectors = self.connectors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(connector) = connectors.get(&addr) {
            return connector.clone();
        }
        // Addresses of departed nodes are forgotten wholesale, rarely.
        if connectors.len() >= MAX_NODE_CACHES {
            connectors.clear();
        }
        let mut config = (*self.config).clone();
        config.resumption = Resumption::in_memory_sessions(SESSIONS_PER_NODE);
        let connector = TlsConnector::from(Arc::new(config));
        connectors.insert(addr, connector.clone());
        connector
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
        self.port_of(node, node.http_addr(), |tls| tls.https_port)
    }

    /// Where `node`'s RTMP is (its RTMPS port under TLS), and the TLS to speak.
    pub fn rtmp(&self, node: &Node) -> (SocketAddr, Option<&Arc<NodeTls>>) {
        self.port_of(node, node.rtmp_addr(), |tls| tls.rtmps_port)
    }

    /// Opens a connection to `node`'s RTMP: RTMPS on its `rtmps_port` when
    /// its group speaks TLS, else plain RTMP on its RTMP port.
    pub async fn dial_rtmp(&self, node: &Node, timeout: Duration) -> Result<NodeStream, DialError> {
        let (addr, tls) = self.rtmp(node);
        dial(addr, tls.map(|t| &**t), timeout).await
    }

    /// `plain`, or the node's address on the `node_tls` table's port.
    fn port_of(
        &self,
        node: &Node,
        plain: SocketAddr,
        port: impl Fn(&NodeTls) -> u16,
    ) -> (SocketAddr, Option<&Arc<NodeTls>>) {
        match self.for_node(node) {
            Some(tls) => (SocketAddr::new(plain.ip(), port(tls)), Some(tls)),
            None => (plain, None),
        }
    }
}

/// A connection to a node: plain TCP, or TLS over TCP under `node_tls`.
pub type NodeStream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// Why a connection to a node could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect failed (refused, unreachable).
    #[error("connect to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    /// TCP connect and TLS handshake together took longer than the timeout.
    #[error("connect to {0}: timed out")]
    Timeout(SocketAddr),
    /// The TLS handshake failed: e.g. a certificate not signed by `ca_file`,
    /// or not valid for the expected name.
    #[error("TLS handshake with node {0} refused: {1}")]
    Tls(SocketAddr, std::io::Error),
}

/// Opens a connection to `addr` within `timeout` (TCP connect and, with
/// `tls`, the TLS handshake together), tuned for proxying (no Nagle delay,
/// keepalive). Every connection amslb makes to a node comes from here.
pub async fn dial(
    addr: SocketAddr,
    tls: Option<&NodeTls>,
    timeout: Duration,
) -> Result<NodeStream, DialError> {
    let started = tokio::time::Instant::now();
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(DialError::Io(addr, e)),
        Err(_) => return Err(DialError::Timeout(addr)),
    };
    crate::listener::tune_stream(&stream);
    let Some(tls) = tls else {
        return Ok(Either::Left(stream));
    };
    let left = timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(left, tls.handshake(stream, addr)).await {
        Ok(Ok(stream)) => Ok(Either::Right(Box::new(stream))),
        Ok(Err(e)) => Err(DialError::Tls(addr, e)),
        Err(_) => Err(DialError::Timeout(addr)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::NodeSpec;

    /// A group's own table wins over the cluster's; its ports replace the
    /// node's plain ones, on the node's address; nodes without a table keep
    /// their plain ports.
    #[test]
    fn ports_come_from_the_nodes_table() {
        let text = "[[group]]\nname = \"origin\"\nnode_tls = { verify = false, rtmps_port = 9443 }\n\
                    [[group]]\nname = \"edge\"\n[[group]]\nname = \"plain\"\n\
                    [cluster]\nsource = \"static\"\n[cluster.node_tls]\nverify = false\n";
        let mut config = crate::config::parse_str(text, Path::new("t.toml"))
            .unwrap()
            .config;
        let set = NodeTlsSet::from_config(&config).unwrap();
        let node = |group: &str| {
            Node::new(NodeSpec::on_default_ports(
                "n",
                group,
                std::net::IpAddr::from([127, 0, 9, 1]),
            ))
        };
        let port = |set: &NodeTlsSet, group: &str| {
            let n = node(group);
            let ((http, http_tls), (rtmp, rtmp_tls)) = (set.http(&n), set.rtmp(&n));
            assert_eq!(
                (http.ip(), rtmp.ip()),
                (n.http_addr().ip(), n.rtmp_addr().ip())
            );
            (
                http.port(),
                http_tls.is_some(),
                rtmp.port(),
                rtmp_tls.is_some(),
            )
        };
        assert_eq!(port(&set, "origin"), (5443, true, 9443, true));
        assert_eq!(port(&set, "edge"), (5443, true, 8443, true));
        config.cluster.node_tls = None;
        let set = NodeTlsSet::from_config(&config).unwrap();
        assert_eq!(port(&set, "plain"), (5080, false, 1935, false));
    }
}
