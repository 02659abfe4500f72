//! `tcp` and `tls` listeners: accept a client, optionally terminate TLS and
//! inspect the RTMP start, connect a node of the listener's group, relay.

use super::meter::{Metered, SessionMeter};
use super::rtmp::filter::{Filtered, NodeFilter};
use super::rtmp::{self, Inspector, front, handshake};
use super::tls::{TlsLoadError, server_config};
use crate::config::rules::RouteName;
use crate::config::{Config, ListenerConfig, Protocol};
use crate::failover::{Connected, Failover, Reporting};
use crate::metrics::L4Metrics;
use crate::node_tls::NodeStream;
use crate::policy::hosts;
use crate::policy::limits::Limits;
use crate::runtime::{ListenerView, Runtime};
use crate::streaming::select::Wanted;
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
use tokio_util::sync::CancellationToken;

/// Settings of one TCP-like listener for one session, read from the live
/// config snapshot when the session starts, so a reload applies to new
/// sessions (open ones keep what they started with).
#[derive(Debug, Clone)]
pub struct TcpSettings {
    /// Listener name, for logs.
    pub name: String,
    /// Time allowed per node connect attempt (`[timeouts] connect`).
    pub connect_timeout: Duration,
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
    /// A `per_minute` limit counts this listener's `rtmp-publish` sessions:
    /// the RTMP start is inspected to find them.
    pub publish_limited: bool,
}

impl TcpSettings {
    /// Reads a listener's settings out of the config.
    pub fn new(config: &Config, listener: &ListenerConfig) -> Self {
        Self {
            name: listener.name.clone(),
            connect_timeout: config.timeouts.connect,
            idle: config.timeouts.tunnel,
            handshake_timeout: listener.l4.handshake_timeout,
            splice: listener.l4.splice,
            rtmp_inspect: listener.l4.rtmp_inspect,
            rtmp_affinity: listener.l4.rtmp_affinity,
            publish_limited: Limits::counts_publishes(
                config,
                &listener.name,
                RouteName::RtmpPublish,
            ),
        }
    }

    /// Whether the client's bytes are read (C0+C1 checked, commands found)
    /// rather than passed on unread.
    fn inspects(&self) -> bool {
        self.rtmp_inspect || self.rtmp_affinity || self.publish_limited
    }
}

/// A running `tcp` or `tls` listener's shared state.
#[derive(Debug)]
pub struct TcpProxy {
    runtime: Arc<Runtime>,
    name: Arc<str>,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics: Arc<L4Metrics>,
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
    /// certificate store, by SNI). Everything else is read from the live
    /// config per session.
    pub fn new(
        runtime: &Arc<Runtime>,
        listener: &ListenerConfig,
        shared_tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self, TlsLoadError> {
        let tls = match (&listener.protocol, &listener.l4.cert, &listener.l4.key) {
            (Protocol::Tls, Some(cert), Some(key)) => Some(server_config(cert, key)?),
            (Protocol::Tls, _, _) => Some(shared_tls.ok_or(TlsLoadError::NoCertificate)?),
            _ => None,
        };
        let protocol = if tls.is_some() { "rtmps" } else { "rtmp" };
        Ok(Self {
            runtime: runtime.clone(),
            name: listener.name.as_str().into(),
            tls,
            metrics: runtime.metrics.l4(&listener.name, protocol),
        })
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
        let Some(view) = ListenerView::current(&self.runtime, &self.name) else {
            // A reload removed the listener; its accept loop is stopping.
            return self.reject(peer, "listener is gone");
        };
        let s = &TcpSettings::new(&view.config, view.listener());
        let mut client = match &self.tls {
            None => Either::Left(stream),
            Some(tls) => {
                let accept = TlsAcceptor::from(tls.clone()).accept(stream);
                match tokio::time::timeout(s.handshake_timeout, accept).await {
                    Ok(Ok(tls)) => Either::Right(Box::new(tls)),
                    Ok(Err(e)) => {
                        self.metrics.listener().tls_handshake_failed(e.kind());
                        return self.reject(peer, &format!("TLS handshake: {e}"));
                    }
                    Err(_) => {
                        let timed_out = std::io::ErrorKind::TimedOut;
                        self.metrics.listener().tls_handshake_failed(timed_out);
                        return self.reject(peer, "TLS handshake timed out");
                    }
                }
            }
        };
        let start = match self.rtmp_start(s, &mut client).await {
            Ok(start) => start,
            Err(reason) => return self.reject(peer, &reason),
        };
        // A stream key is only learnt from releaseStream/FCPublish/publish:
        // placed as a publish, exactly like a WHIP publish of that stream.
        let key = start.opening.as_ref().and_then(|o| {
            let stream = o.stream.as_ref()?;
            Some(format!("{}/{stream}", o.app))
        });
        let publish = key.is_some();
        let mut wanted = Wanted::for_session(&view.config, view.listener(), key, publish);
        // RTMPS: the server name the client asked for picks the group, as
        // Host does on the HTTP listeners.
        if let Some(sni) = server_name(&client)
            && let Some(group) = hosts::group_for_host(&view.listener().host_groups, &sni)
        {
            wanted.group = group.to_string();
        }
        let Some((mut node, lease)) = self.connect(&view.config, &wanted, peer).await else {
            return;
        };
        let node_id = lease.node().id();
        let _open = self.metrics.session_opened(node_id);
        let key = wanted.key.as_deref().unwrap_or("-");
        if start.opening.is_some() {
            let shake = tokio::time::timeout(s.connect_timeout, handshake::with_node(&mut node));
            if let Err(e) = shake
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            {
                tracing::warn!(listener = %s.name, %peer, node = node_id, error = %e, "RTMP handshake with node failed");
                return;
            }
        }
        tracing::info!(listener = %s.name, %peer, node = node_id, group = wanted.group, key, "l4 session relayed");
        let node_metrics = self.runtime.metrics.node(lease.node());
        let meter = SessionMeter::new(self.metrics.listener().clone(), node_metrics);
        if !start.prelude.is_empty() {
            if let Err(e) = node.write_all(&start.prelude).await {
                tracing::warn!(listener = %s.name, %peer, node = node_id, error = %e, "write to node failed");
                return;
            }
            meter.add_in(start.prelude.len());
        }
        let mut inspector = start.inspector;
        let metrics = &self.metrics;
        // A `publish` over the client's rtmp-publish limit ends the session.
        let refused = CancellationToken::new();
        let mut tap = |data: &[u8]| {
            if let Some(inspector) = inspector.as_mut() {
                inspector.feed(data);
                for event in inspector.take_events() {
                    tracing::info!(listener = %s.name, %peer, node = node_id, "rtmp {event}");
                    if let rtmp::Event::Publish { app, .. } = &event {
                        if !self
                            .runtime
                            .admit_publish(&s.name, RouteName::RtmpPublish, peer.ip())
                        {
                            refused.cancel();
                            return;
                        }
                        metrics.publish(app);
                    }
                }
            }
        };
        let stop = async {
            tokio::select! {
                () = stop => {}
                () = refused.cancelled() => {}
            }
        };
        // Events found in the replayed bytes.
        tap(&[]);
        let end = match (client, start.opening, node) {
            (client, Some(opening), node) => {
                let node = Filtered::new(node, NodeFilter::new(opening.connect_txn));
                buffered(client, node, &meter, s.idle, stop, tap).await
            }
            // Splice needs plain sockets on both sides (no TLS to undo).
            #[cfg(target_os = "linux")]
            (Either::Left(c), None, Either::Left(n)) if s.splice && inspector_off(s) => {
                match super::splice::SplicePipes::new() {
                    Ok(pipes) => pipes.relay(&c, &n, &meter, s.idle, stop).await,
                    // Out of descriptors for pipes: the copy path still works.
                    Err(_) => buffered(c, n, &meter, s.idle, stop, tap).await,
                }
            }
            (client, None, node) => buffered(client, node, &meter, s.idle, stop, tap).await,
        };
        let (bytes_in, bytes_out) = meter.totals();
        tracing::info!(
            listener = %s.name, %peer, node = node_id, key, bytes_in, bytes_out,
            secs = meter.age().as_secs_f64(), end = ?end,
            over_publish_limit = refused.is_cancelled(), "session ended"
        );
    }

    /// Connects a node for `wanted` through the shared failover loop; `None`
    /// (logged and counted) when no node could be reached.
    async fn connect(
        &self,
        config: &Config,
        wanted: &Wanted,
        peer: SocketAddr,
    ) -> Option<(NodeStream, crate::cluster::NodeLease)> {
        let snapshot = self.runtime.cluster.snapshot();
        let report = Reporting {
            health: &self.runtime.health,
            metrics: &self.runtime.metrics,
            listener: self.metrics.listener(),
        };
        let timeout = config.timeouts.connect;
        // RTMPS to nodes whose group has `node_tls`: a refused certificate
        // is a failed connect, so the next node is tried.
        let node_tls = &*self.runtime.node_tls;
        let connected = Failover::new(config, &snapshot, wanted, report)
            .connect(|node| async move { node_tls.dial_rtmp(&node, timeout).await })
            .await;
        match connected {
            Ok(Connected { conn, lease }) => Some((conn, lease)),
            Err(e) => {
                self.metrics.listener().no_node(&wanted.group);
                tracing::warn!(listener = %self.name, %peer, group = wanted.group, error = %e, "no node for session");
                None
            }
        }
    }

    /// The RTMP-aware start of a session, per the listener's settings: nothing
    /// (plain passthrough), C0+C1 checked and inspected, or handshake and
    /// `connect` answered here to learn the stream key. Bounded by the
    /// handshake timeout; `Err` is the reason to close the client.
    async fn rtmp_start(
        &self,
        s: &TcpSettings,
        client: &mut ClientStream,
    ) -> Result<Start, String> {
        let mut start = Start {
            prelude: Vec::new(),
            inspector: None,
            opening: None,
        };
        if !s.inspects() {
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
        self.metrics.rejected();
        tracing::info!(listener = %self.name, %peer, reason, "client closed before relaying");
    }
}

/// The TLS server name (SNI) an RTMPS client sent, lower case.
fn server_name(client: &ClientStream) -> Option<String> {
    let Either::Right(tls) = client else {
        return None;
    };
    Some(tls.get_ref().1.server_name()?.to_ascii_lowercase())
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
    !s.inspects()
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
