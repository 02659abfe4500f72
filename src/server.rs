//! Starting listeners, accepting connections, and shutting down gracefully.

use crate::cluster::{Cluster, mongodb, static_source};
use crate::config::rules::{RouteName, in_any};
use crate::config::{ClusterSource, Config, Protocol};
use crate::http::{self, headers::ClientInfo};
use crate::l4::{tcp::TcpProxy, tls::TlsLoadError, udp::UdpProxy};
use crate::listener::{Owner, bind_tcp, bind_udp, tune_stream};
use crate::metrics::ListenerMetrics;
use crate::proxy_protocol;
use crate::runtime::Runtime;
use crate::tls::server_config::tcp_server_config;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why amslb could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener address could not be bound (in use, not local, no permission).
    #[error("listener {listener:?}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        listener: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A certificate file in `[tls] certs_dir` is unusable (the error names it).
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::CertError),
    /// The stats listener, access log or reload handling could not start.
    #[error(transparent)]
    Ops(#[from] crate::reload::ReloadError),
    /// Signal handling or taking over from an upgrading process failed.
    #[error("{0}")]
    Upgrade(String),
    /// A `node_tls` table's CA file is unusable.
    #[error("TLS to nodes: {0}")]
    NodeTls(#[from] crate::node_tls::NodeTlsError),
    /// A `tls` listener's own `cert`/`key` could not be loaded.
    #[error("listener {listener:?}: {source}")]
    ListenerCert {
        /// Listener name.
        listener: String,
        /// What was wrong with the files (boxed: it is large and rare).
        source: Box<TlsLoadError>,
    },
}

/// A bound socket waiting for its accept loop.
#[derive(Debug)]
pub(crate) struct BoundListener {
    /// Listener name.
    pub(crate) name: Arc<str>,
    /// The address as configured (a `:0` port stays 0 here), the key reload diffs on.
    pub(crate) addr: SocketAddr,
    /// The listening socket.
    pub(crate) socket: TcpListener,
    /// The relay of a `tcp`/`tls` listener (RTMP, RTMPS).
    pub(crate) l4: Option<Arc<TcpProxy>>,
}

/// A bound UDP socket of a `udp` listener (SRT) and its session relay.
#[derive(Debug)]
struct BoundUdp {
    /// The address as configured.
    addr: SocketAddr,
    socket: tokio::net::UdpSocket,
    proxy: Arc<UdpProxy>,
}

/// A balancer whose sockets are bound, ready to run.
#[derive(Debug)]
pub struct Server {
    runtime: Arc<Runtime>,
    bound: Vec<BoundListener>,
    udp: Vec<BoundUdp>,
}

impl Server {
    /// Binds every listener of `config` and loads the static membership. All
    /// sockets are bound before any traffic is accepted, so a port conflict
    /// stops start-up instead of leaving a half-started balancer.
    pub fn bind(config: Config) -> Result<Self, StartError> {
        // A `tls` listener with its own cert builds a rustls config below.
        crate::tls::install_crypto_provider();
        let tls = crate::tls::TlsState::start(&config)?;
        let cluster = Arc::new(Cluster::new());
        cluster.update(static_source::specs(&config.cluster));
        let node_tls = crate::node_tls::NodeTlsSet::from_config(&config)?;
        let runtime = Runtime::new(config, cluster.clone(), tls, node_tls);
        let config = runtime.config();
        // RTMPS listeners without their own cert/key share the [tls] store.
        let shared_tls = match &runtime.tls {
            Some(state) => Some(tcp_server_config(state.certs.clone()).map_err(|e| {
                crate::tls::certs::CertError::new(
                    state.certs.dir(),
                    format!("TLS setup failed: {e}"),
                )
            })?),
            None => None,
        };
        let mut bound = Vec::new();
        let mut udp = Vec::new();
        for listener in &config.listeners {
            let name: Arc<str> = listener.name.as_str().into();
            let bind_error = |addr, source| StartError::Bind {
                listener: listener.name.clone(),
                addr,
                source,
            };
            if listener.protocol == Protocol::Udp {
                let proxy = Arc::new(UdpProxy::new(&runtime, listener));
                for &addr in &listener.bind {
                    let socket = bind_udp(addr).map_err(|e| bind_error(addr, e))?;
                    let proxy = proxy.clone();
                    udp.push(BoundUdp {
                        addr,
                        socket,
                        proxy,
                    });
                }
                continue;
            }
            let l4 = match listener.protocol {
                Protocol::Tcp | Protocol::Tls => Some(Arc::new(
                    TcpProxy::new(&runtime, listener, shared_tls.clone()).map_err(|source| {
                        StartError::ListenerCert {
                            listener: listener.name.clone(),
                            source: Box::new(source),
                        }
                    })?,
                )),
                _ => None,
            };
            for &addr in &listener.bind {
                let mut listener = bind_listener(name.clone(), addr, listener.backlog)?;
                listener.l4 = l4.clone();
                bound.push(listener);
            }
        }
        Ok(Self {
            runtime,
            bound,
            udp,
        })
    }

    /// The shared state, for callers that drive the balancer as a library.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Actual bound addresses by listener name (a `:0` bind gets its port here).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.bound
            .iter()
            .filter_map(|b| Some((b.name.to_string(), b.socket.local_addr().ok()?)))
            .chain(
                self.udp.iter().filter_map(|u| {
                    Some((u.proxy.name().to_string(), u.socket.local_addr().ok()?))
                }),
            )
            .collect()
    }

    /// Serves until `stop` resolves, then shuts down gracefully: stop accepting,
    /// give in-flight requests `global.shutdown_grace` to finish, then close
    /// whatever is still open (tunnels).
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let mut running = self.start();
        running.serve_udp();
        stop.await;
        let grace = running.runtime.config().global.shutdown_grace;
        running.shutdown(grace).await;
    }

    /// Starts membership, health checks, worker threads, TLS tasks and every
    /// TCP accept loop. UDP listeners wait for [`Running::serve_udp`], so a
    /// process taking over from an old one can adopt its sessions first.
    pub fn start(self) -> Running {
        let runtime = self.runtime;
        start_membership_source(&runtime);
        crate::state::spawn(
            &runtime.config(),
            runtime.shared.clone(),
            runtime.cluster.clone(),
            runtime.shutdown.clone(),
            runtime.hard_stop.clone(),
        );
        runtime.health.spawn(
            runtime.cluster.clone(),
            runtime.shutdown.clone(),
            runtime.metrics.clone(),
        );
        let extra = crate::workers::count(runtime.config().global.workers).saturating_sub(1);
        let _ = runtime.workers.set(crate::workers::Workers::start(extra));
        for bound in self.bound {
            spawn_accept_loop(&runtime, bound);
        }
        let udp = self
            .udp
            .into_iter()
            .map(|bound| {
                let socket = Arc::new(bound.socket);
                let name: Arc<str> = bound.proxy.name().into();
                runtime
                    .listening
                    .add(Owner::Listener, name, bound.addr, &socket);
                UdpListener {
                    proxy: bound.proxy,
                    socket,
                    receiving: None,
                }
            })
            .collect();
        if let Some(tls) = &runtime.tls {
            tls.spawn_tasks(runtime.shutdown.clone(), runtime.metrics.clone());
        }
        Running { runtime, udp }
    }
}

/// A UDP listener of a running server and its receive loop, if running.
#[derive(Debug)]
pub struct UdpListener {
    /// The session relay.
    pub proxy: Arc<UdpProxy>,
    /// The listening socket.
    pub socket: Arc<tokio::net::UdpSocket>,
    receiving: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

/// A started server: TCP listeners accept, UDP listeners as told.
#[derive(Debug)]
pub struct Running {
    /// The shared state.
    pub runtime: Arc<Runtime>,
    /// The UDP listeners.
    pub udp: Vec<UdpListener>,
}

impl Running {
    /// Starts (or restarts) the receive loop of every UDP listener.
    pub fn serve_udp(&mut self) {
        for udp in &mut self.udp {
            if udp.receiving.is_some() {
                continue;
            }
            if let Ok(addr) = udp.socket.local_addr() {
                info!(listener = %udp.proxy.name(), %addr, "listening (udp)");
            }
            let stop = self.runtime.shutdown.child_token();
            let task = tokio::spawn(udp.proxy.clone().serve(
                udp.socket.clone(),
                stop.clone(),
                self.runtime.shutdown.clone(),
            ));
            udp.receiving = Some((stop, task));
        }
    }

    /// Stops the receive loop of every UDP listener and waits until each has
    /// finished the datagram it was relaying; sessions keep running.
    pub async fn pause_udp(&mut self) {
        for udp in &mut self.udp {
            if let Some((stop, task)) = udp.receiving.take() {
                stop.cancel();
                let _ = task.await;
            }
        }
    }

    /// Stops accepting and receiving, gives in-flight requests and tunnels
    /// `grace` to finish, then closes whatever is still open.
    pub async fn shutdown(self, grace: Duration) {
        let runtime = self.runtime;
        info!(
            ?grace,
            "shutting down: no new connections, waiting for in-flight requests"
        );
        runtime.shutdown.cancel();
        runtime.tasks.close();
        if tokio::time::timeout(grace, runtime.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                open = runtime.tasks.len(),
                "grace period over, closing what is still open"
            );
            runtime.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), runtime.tasks.wait()).await;
        }
        info!("stopped");
    }
}

/// Starts following MongoDB when the config asks for it. Never waits for
/// MongoDB: the static (or empty) membership serves until it answers.
fn start_membership_source(runtime: &Runtime) {
    let config = runtime.config();
    if config.cluster.source != ClusterSource::Mongodb {
        return;
    }
    match mongodb::spawn(
        &config.cluster,
        runtime.cluster.clone(),
        runtime.shutdown.clone(),
    ) {
        Ok(source) => {
            let _ = runtime.membership.set(source.status);
        }
        Err(e) => warn!("membership source not started: {e}"),
    }
}

/// Binds one address of listener `name`.
pub(crate) fn bind_listener(
    name: Arc<str>,
    addr: SocketAddr,
    backlog: u32,
) -> Result<BoundListener, StartError> {
    let socket = bind_tcp(addr, backlog).map_err(|source| StartError::Bind {
        listener: name.to_string(),
        addr,
        source,
    })?;
    Ok(BoundListener {
        name,
        addr,
        socket,
        l4: None,
    })
}

/// Starts accepting on `bound`, registered in `runtime.accept_loops` under
/// (name, configured address) so a reload can stop this one loop alone.
pub(crate) fn spawn_accept_loop(runtime: &Arc<Runtime>, bound: BoundListener) {
    if let Ok(local) = bound.socket.local_addr() {
        info!(listener = %bound.name, addr = %local, "listening");
    }
    let stop = runtime.shutdown.child_token();
    let metrics = runtime.metrics.listener(&bound.name);
    runtime
        .accept_loops
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((bound.name.clone(), bound.addr), stop.clone());
    runtime.listening.add(
        Owner::Listener,
        bound.name.clone(),
        bound.addr,
        &bound.socket,
    );
    if let Some(workers) = runtime.workers.get() {
        workers.serve_copies(&bound.socket, |socket| {
            let copy = BoundListener {
                name: bound.name.clone(),
                addr: bound.addr,
                socket,
                l4: bound.l4.clone(),
            };
            accept_loop(runtime.clone(), copy, stop.clone(), metrics.clone())
        });
    }
    tokio::spawn(accept_loop(runtime.clone(), bound, stop, metrics));
}

async fn accept_loop(
    runtime: Arc<Runtime>,
    bound: BoundListener,
    stop: tokio_util::sync::CancellationToken,
    metrics: Arc<ListenerMetrics>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = bound.socket.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                warn!(listener = %bound.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = connection_slot(&runtime).await else {
            warn!(listener = %bound.name, client = %peer, "max_connections reached, connection refused");
            continue;
        };
        let runtime2 = runtime.clone();
        let name = bound.name.clone();
        let open = metrics.connection_opened();
        let l4 = bound.l4.clone();
        runtime.tasks.spawn(async move {
            let _permit = permit;
            let _open = open;
            handle_stream(runtime2, name, l4, stream, peer).await;
        });
    }
}

/// A connection slot, waiting at most `global.queue_timeout` when all are taken.
async fn connection_slot(runtime: &Runtime) -> Option<OwnedSemaphorePermit> {
    let slots = runtime.connection_slots.clone();
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    let wait = runtime.config().global.queue_timeout;
    tokio::time::timeout(wait, slots.acquire_owned())
        .await
        .ok()?
        .ok()
}

async fn handle_stream(
    runtime: Arc<Runtime>,
    listener: Arc<str>,
    l4: Option<Arc<TcpProxy>>,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    tune_stream(&stream);
    let config = runtime.config();
    let Some(settings) = config.listeners.iter().find(|l| *l.name == *listener) else {
        return;
    };
    let mut client = ClientInfo {
        addr: peer,
        tls: false,
    };
    if settings.accept_proxy {
        let header = proxy_protocol::read_header(&mut stream);
        match tokio::time::timeout(config.timeouts.client, header).await {
            Ok(Ok(Some(addr))) => client.addr = addr,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                warn!(%listener, client = %peer, error = %e, "connection refused");
                return;
            }
            Err(_) => {
                warn!(%listener, client = %peer, "connection refused: no PROXY header in time");
                return;
            }
        }
    }
    let Some(_held) = hold_connection(&runtime, settings, &mut stream, client.addr).await else {
        return;
    };
    match settings.protocol {
        Protocol::Http => http::serve_connection(runtime.clone(), listener, stream, client).await,
        Protocol::Tcp | Protocol::Tls => {
            if !runtime.admit_publish(&listener, RouteName::RtmpPublish, client.addr.ip()) {
                return;
            }
            if let Some(l4) = l4 {
                // Relays survive the shutdown grace period (a publisher keeps
                // streaming while in-flight work drains), then are cut.
                l4.handle(stream, client.addr, runtime.hard_stop.cancelled())
                    .await;
            }
        }
        Protocol::Https => {
            if let Some(tls) = runtime.tls.clone() {
                crate::tls::https::serve_connection(runtime.clone(), tls, listener, stream, client)
                    .await;
            }
        }
        // UDP listeners accept no streams; see `BoundUdp`.
        Protocol::Udp => {}
    }
}

/// Counts the connection against the `max_connections` limits of its client
/// (a trusted proxy's connections carry many clients and are not counted;
/// their requests are limited by the client each names). Over a limit, a
/// plain HTTP client gets a 429 before the close, others just the close.
async fn hold_connection(
    runtime: &Runtime,
    settings: &crate::config::ListenerConfig,
    stream: &mut TcpStream,
    client: SocketAddr,
) -> Option<crate::policy::limits::ConnectionHold> {
    if in_any(&settings.trusted_proxies, client.ip()) {
        return Some(Default::default());
    }
    let config = runtime.config();
    match runtime
        .limits
        .open_connection(&config, &settings.name, client.ip())
    {
        Ok(hold) => Some(hold),
        Err(over) => {
            (runtime.limits).refused(
                &runtime.metrics,
                &settings.name,
                &over,
                client.ip(),
                "connection",
            );
            if settings.protocol == Protocol::Http {
                use tokio::io::AsyncWriteExt;
                const TOO_MANY: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                let write = stream.write_all(TOO_MANY);
                let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
            }
            None
        }
    }
}
