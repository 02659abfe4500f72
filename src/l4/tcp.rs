//! `tcp` and `tls` listeners: accept a client, optionally terminate TLS and
//! inspect the RTMP start, connect a node of the listener's group, relay.

use super::meter::{Metered, SessionMeter};
use super::rtmp::{self, Inspector};
use super::stats::L4Stats;
use super::tls::{TlsLoadError, server_config};
use super::upstream::{self, ConnectPolicy, GroupRoute};
use crate::cluster::{Cluster, Node};
use crate::config::{Config, ListenerConfig, Protocol};
use crate::tunnel::{self, TunnelEnd};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Settings of one TCP-like listener, resolved from the config at start.
#[derive(Debug, Clone)]
pub struct TcpSettings {
    /// Listener name, for logs.
    pub name: String,
    /// Where sessions go.
    pub route: GroupRoute,
    /// Connect limits.
    pub connect: ConnectPolicy,
    /// Tunnel idle timeout (`[timeouts] tunnel`).
    pub idle: Duration,
    /// Time for a TLS handshake, and for an inspected client's C0+C1.
    pub handshake_timeout: Duration,
    /// Relay plain connections with splice (Linux).
    pub splice: bool,
    /// Inspect the RTMP start (handshake check, app and stream key).
    pub rtmp_inspect: bool,
}

impl TcpSettings {
    /// Reads a listener's settings out of the config.
    pub fn new(config: &Config, listener: &ListenerConfig) -> Self {
        Self {
            name: listener.name.clone(),
            route: GroupRoute::new(config, &listener.default_group),
            connect: ConnectPolicy {
                addr_of: Node::rtmp_addr,
                timeout: config.timeouts.connect,
                retries: config.global.retries,
            },
            idle: config.timeouts.tunnel,
            handshake_timeout: listener.l4.handshake_timeout,
            splice: listener.l4.splice,
            rtmp_inspect: listener.l4.rtmp_inspect,
        }
    }
}

/// A running `tcp` or `tls` listener's shared state.
#[derive(Debug)]
pub struct TcpProxy {
    settings: TcpSettings,
    tls: Option<Arc<rustls::ServerConfig>>,
    cluster: Arc<Cluster>,
    stats: Arc<L4Stats>,
}

/// A client connection, before or after TLS.
enum Client {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl TcpProxy {
    /// Builds the proxy of `listener`; a `tls` listener loads its certificate
    /// here, so a bad one stops start-up instead of failing every client.
    pub fn new(
        config: &Config,
        listener: &ListenerConfig,
        cluster: Arc<Cluster>,
    ) -> Result<Self, TlsLoadError> {
        let tls = match (&listener.protocol, &listener.l4.cert, &listener.l4.key) {
            (Protocol::Tls, Some(cert), Some(key)) => Some(server_config(cert, key)?),
            _ => None,
        };
        Ok(Self {
            settings: TcpSettings::new(config, listener),
            tls,
            cluster,
            stats: Arc::new(L4Stats::default()),
        })
    }

    /// The listener's counters.
    pub fn stats(&self) -> &Arc<L4Stats> {
        &self.stats
    }

    /// One client session from accept to close; `peer` is the client's
    /// address (from the PROXY header when there is one). An open relay ends
    /// when `stop` resolves. Every early exit closes the client by dropping it;
    /// nothing here can panic on client input.
    pub async fn handle(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let s = &self.settings;
        let _active = self.stats.open();
        let mut client = match &self.tls {
            None => Client::Plain(stream),
            Some(tls) => {
                match tokio::time::timeout(
                    s.handshake_timeout,
                    TlsAcceptor::from(tls.clone()).accept(stream),
                )
                .await
                {
                    Ok(Ok(tls)) => Client::Tls(Box::new(tls)),
                    Ok(Err(e)) => return self.reject(peer, &format!("TLS handshake: {e}")),
                    Err(_) => return self.reject(peer, "TLS handshake timed out"),
                }
            }
        };
        let mut inspector = None;
        let mut prelude = Vec::new();
        if s.rtmp_inspect {
            let head = match &mut client {
                Client::Plain(c) => read_c0_c1(c, s.handshake_timeout).await,
                Client::Tls(c) => read_c0_c1(c, s.handshake_timeout).await,
            };
            match head {
                Ok(head) => {
                    let mut found = Inspector::new(rtmp::INSPECT_CAP);
                    found.feed(&head);
                    prelude = head;
                    inspector = Some(found);
                }
                Err(reason) => return self.reject(peer, &reason),
            }
        }
        let (mut node, lease) = match upstream::connect(&self.cluster, &s.route, s.connect).await {
            Ok(found) => found,
            Err(e) => {
                self.stats.count_no_node();
                tracing::warn!(listener = %s.name, %peer, error = %e, "no node for session");
                return;
            }
        };
        let meter = SessionMeter::new(self.stats.clone());
        if !prelude.is_empty() {
            if let Err(e) = node.write_all(&prelude).await {
                tracing::warn!(listener = %s.name, %peer, node = lease.node().id(), error = %e, "write to node failed");
                return;
            }
            meter.add_in(prelude.len());
        }
        let stats = &self.stats;
        let tap = |data: &[u8]| {
            if let Some(inspector) = inspector.as_mut() {
                inspector.feed(data);
                for event in inspector.take_events() {
                    if matches!(event, rtmp::Event::Publish { .. }) {
                        stats.count_publish();
                    }
                    tracing::info!(listener = %s.name, %peer, node = lease.node().id(), "rtmp {event}");
                }
            }
        };
        let end = match client {
            #[cfg(target_os = "linux")]
            Client::Plain(c) if s.splice && !s.rtmp_inspect => {
                match super::splice::SplicePipes::new() {
                    Ok(pipes) => pipes.relay(&c, &node, &meter, s.idle, stop).await,
                    // Out of descriptors for pipes: the copy path still works.
                    Err(_) => buffered(c, node, &meter, s.idle, stop, tap).await,
                }
            }
            Client::Plain(c) => buffered(c, node, &meter, s.idle, stop, tap).await,
            Client::Tls(c) => buffered(*c, node, &meter, s.idle, stop, tap).await,
        };
        let (bytes_in, bytes_out) = meter.totals();
        tracing::info!(
            listener = %s.name, %peer, node = lease.node().id(), bytes_in, bytes_out,
            secs = meter.age().as_secs_f64(), end = ?end, "session ended"
        );
    }

    fn reject(&self, peer: SocketAddr, reason: &str) {
        self.stats.count_rejected();
        tracing::info!(listener = %self.settings.name, %peer, reason, "client closed before relaying");
    }
}

/// Reads an RTMP client's C0+C1 within `limit` and checks C0.
async fn read_c0_c1<S: AsyncRead + Unpin>(
    client: &mut S,
    limit: Duration,
) -> Result<Vec<u8>, String> {
    let mut head = vec![0u8; rtmp::C0_C1_LEN];
    match tokio::time::timeout(limit, client.read_exact(&mut head)).await {
        Err(_) => Err("RTMP handshake timed out".into()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err("RTMP handshake truncated".into())
        }
        Ok(Err(e)) => Err(format!("RTMP handshake: {e}")),
        Ok(Ok(_)) => rtmp::check_c0(head[0])
            .map(|()| head)
            .map_err(|e| e.to_string()),
    }
}

/// The portable relay: the shared tunnel with the client side metered.
async fn buffered<C>(
    client: C,
    node: TcpStream,
    meter: &SessionMeter,
    idle: Duration,
    stop: impl std::future::Future<Output = ()>,
    tap: impl FnMut(&[u8]) + Unpin,
) -> TunnelEnd
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tunnel::relay(Metered::new(client, meter, tap), node, idle, stop)
        .await
        .end
}
