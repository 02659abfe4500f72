//! `tcp` and `tls` listeners: accept a client, optionally terminate TLS and
//! inspect the RTMP start, connect a node of the listener's group, relay.

use super::meter::{Metered, SessionMeter};
use super::rtmp::filter::{Filtered, NodeFilter};
use super::rtmp::{self, Inspector, front, handshake};
use super::stats::L4Stats;
use super::tls::{TlsLoadError, server_config};
use super::upstream::{self, ConnectPolicy, GroupRoute};
use crate::cluster::{Cluster, Node};
use crate::config::{Config, ListenerConfig, Protocol};
use crate::health::Health;
use crate::tunnel::{self, TunnelEnd};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

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
    /// Choose the node by stream key (answering `connect` here).
    pub rtmp_affinity: bool,
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
            rtmp_affinity: listener.l4.rtmp_affinity,
        }
    }
}

/// A running `tcp` or `tls` listener's shared state.
#[derive(Debug)]
pub struct TcpProxy {
    settings: TcpSettings,
    tls: Option<Arc<rustls::ServerConfig>>,
    cluster: Arc<Cluster>,
    /// Where failed node connects are reported (passive health checks).
    health: Arc<Health>,
    stats: Arc<L4Stats>,
}

/// A client connection, before or after TLS.
type ClientStream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// What the RTMP-aware start of a session produced.
struct Start {
    /// Client bytes already read, to send to the node first.
    prelude: Vec<u8>,
    /// The inspector, when the listener inspects.
    inspector: Option<Inspector>,
    /// The client's opening, when amslb answered `connect` itself.
    opening: Option<front::Opening>,
}

impl TcpProxy {
    /// Builds the proxy of `listener`. A `tls` listener with its own
    /// `cert`/`key` loads them here, so a bad file stops start-up instead of
    /// failing every client; one without serves `shared_tls` (the `[tls]`
    /// certificate store, by SNI).
    pub fn new(
        config: &Config,
        listener: &ListenerConfig,
        cluster: Arc<Cluster>,
        health: Arc<Health>,
        shared_tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self, TlsLoadError> {
        let tls = match (&listener.protocol, &listener.l4.cert, &listener.l4.key) {
            (Protocol::Tls, Some(cert), Some(key)) => Some(server_config(cert, key)?),
            (Protocol::Tls, _, _) => Some(shared_tls.ok_or(TlsLoadError::NoCertificate)?),
            _ => None,
        };
        Ok(Self {
            settings: TcpSettings::new(config, listener),
            tls,
            cluster,
            health,
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
            None => Either::Left(stream),
            Some(tls) => {
                let accept = TlsAcceptor::from(tls.clone()).accept(stream);
                match tokio::time::timeout(s.handshake_timeout, accept).await {
                    Ok(Ok(tls)) => Either::Right(Box::new(tls)),
                    Ok(Err(e)) => return self.reject(peer, &format!("TLS handshake: {e}")),
                    Err(_) => return self.reject(peer, "TLS handshake timed out"),
                }
            }
        };
        let start = match self.rtmp_start(&mut client).await {
            Ok(start) => start,
            Err(reason) => return self.reject(peer, &reason),
        };
        let key = start.opening.as_ref().and_then(|o| {
            let stream = o.stream.as_ref()?;
            Some(format!("{}/{stream}", o.app))
        });
        let connected = upstream::connect(
            &self.cluster,
            &s.route,
            s.connect,
            key.as_deref(),
            Some(&self.health),
        )
        .await;
        let (mut node, lease) = match connected {
            Ok(found) => found,
            Err(e) => {
                self.stats.count_no_node();
                tracing::warn!(listener = %s.name, %peer, error = %e, "no node for session");
                return;
            }
        };
        let node_id = lease.node().id();
        if start.opening.is_some() {
            let shake = tokio::time::timeout(s.connect.timeout, handshake::with_node(&mut node));
            if let Err(e) = shake
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            {
                tracing::warn!(listener = %s.name, %peer, node = node_id, error = %e, "RTMP handshake with node failed");
                return;
            }
            tracing::info!(listener = %s.name, %peer, node = node_id, key = key.as_deref().unwrap_or("-"), "rtmp node chosen by stream key");
        }
        let meter = SessionMeter::new(self.stats.clone());
        if !start.prelude.is_empty() {
            if let Err(e) = node.write_all(&start.prelude).await {
                tracing::warn!(listener = %s.name, %peer, node = node_id, error = %e, "write to node failed");
                return;
            }
            meter.add_in(start.prelude.len());
        }
        let mut inspector = start.inspector;
        let stats = &self.stats;
        let mut tap = |data: &[u8]| {
            if let Some(inspector) = inspector.as_mut() {
                inspector.feed(data);
                for event in inspector.take_events() {
                    if matches!(event, rtmp::Event::Publish { .. }) {
                        stats.count_publish();
                    }
                    tracing::info!(listener = %s.name, %peer, node = node_id, "rtmp {event}");
                }
            }
        };
        // Events found in the replayed bytes.
        tap(&[]);
        let end = match (client, start.opening) {
            (client, Some(opening)) => {
                let (from_node, to_node) = node.into_split();
                let from_node = Filtered::new(from_node, NodeFilter::new(opening.connect_txn));
                let node = tokio::io::join(from_node, to_node);
                buffered(client, node, &meter, s.idle, stop, tap).await
            }
            #[cfg(target_os = "linux")]
            (Either::Left(c), None) if s.splice && inspector_off(s) => {
                match super::splice::SplicePipes::new() {
                    Ok(pipes) => pipes.relay(&c, &node, &meter, s.idle, stop).await,
                    // Out of descriptors for pipes: the copy path still works.
                    Err(_) => buffered(c, node, &meter, s.idle, stop, tap).await,
                }
            }
            (client, None) => buffered(client, node, &meter, s.idle, stop, tap).await,
        };
        let (bytes_in, bytes_out) = meter.totals();
        tracing::info!(
            listener = %s.name, %peer, node = node_id, bytes_in, bytes_out,
            secs = meter.age().as_secs_f64(), end = ?end, "session ended"
        );
    }

    /// The RTMP-aware start of a session, per the listener's settings: nothing
    /// (plain passthrough), C0+C1 checked and inspected, or handshake and
    /// `connect` answered here to learn the stream key. Bounded by the
    /// handshake timeout; `Err` is the reason to close the client.
    async fn rtmp_start(&self, client: &mut ClientStream) -> Result<Start, String> {
        let s = &self.settings;
        let mut start = Start {
            prelude: Vec::new(),
            inspector: None,
            opening: None,
        };
        if !s.rtmp_inspect && !s.rtmp_affinity {
            return Ok(start);
        }
        let work = async {
            let head = read_c0_c1(client).await?;
            if !s.rtmp_affinity {
                let mut inspector = Inspector::new(rtmp::INSPECT_CAP);
                inspector.feed(&head);
                start.prelude = head;
                start.inspector = Some(inspector);
                return Ok(start);
            }
            let opening = front::open(client, &head, rtmp::INSPECT_CAP)
                .await
                .map_err(|e| format!("RTMP opening: {e}"))?;
            let mut inspector = Inspector::after_handshake(rtmp::INSPECT_CAP);
            inspector.feed(&opening.replay);
            start.prelude = opening.replay.clone();
            start.inspector = Some(inspector);
            start.opening = Some(opening);
            Ok(start)
        };
        tokio::time::timeout(s.handshake_timeout, work)
            .await
            .unwrap_or_else(|_| Err("RTMP handshake timed out".into()))
    }

    fn reject(&self, peer: SocketAddr, reason: &str) {
        self.stats.count_rejected();
        tracing::info!(listener = %self.settings.name, %peer, reason, "client closed before relaying");
    }
}

/// Reads an RTMP client's C0+C1 and checks C0.
async fn read_c0_c1<S: AsyncRead + Unpin>(client: &mut S) -> Result<Vec<u8>, String> {
    let mut head = vec![0u8; rtmp::C0_C1_LEN];
    match client.read_exact(&mut head).await {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err("RTMP handshake truncated".into())
        }
        Err(e) => Err(format!("RTMP handshake: {e}")),
        Ok(_) => rtmp::check_c0(head[0])
            .map(|()| head)
            .map_err(|e| e.to_string()),
    }
}

/// Whether the client's bytes go to the node untouched and unread, which is
/// what splice needs.
#[cfg(target_os = "linux")]
fn inspector_off(s: &TcpSettings) -> bool {
    !s.rtmp_inspect && !s.rtmp_affinity
}

/// The portable relay: the shared tunnel with the client side metered.
async fn buffered<C, N>(
    client: C,
    node: N,
    meter: &SessionMeter,
    idle: Duration,
    stop: impl std::future::Future<Output = ()>,
    tap: impl FnMut(&[u8]) + Unpin,
) -> TunnelEnd
where
    C: AsyncRead + AsyncWrite + Unpin + tunnel::Reset,
    N: AsyncRead + AsyncWrite + Unpin + tunnel::Reset,
{
    tunnel::relay(Metered::new(client, meter, tap), node, idle, stop)
        .await
        .end
}
