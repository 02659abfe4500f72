//! Starting a balancer: bind every socket, start the membership source,
//! health checks, TLS tasks and accept loops, and shut down gracefully.

use crate::cluster::{Cluster, source, static_source};
use crate::config::{Config, Protocol};
use crate::l4::{tcp::TcpProxy, tls::TlsLoadError, udp::UdpProxy};
use crate::listener::{Owner, bind_udp};
use crate::listeners::{BindError, BoundListener, bind_listener, spawn_accept_loop};
use crate::runtime::Runtime;
use crate::tls::server_config::tcp_server_config;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why amslb could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener address could not be bound (in use, not local, no permission).
    #[error(transparent)]
    Bind(#[from] BindError),
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
        // The static nodes serve until a remote source first answers.
        cluster.update(static_source::specs(&config.cluster));
        let node_tls = crate::node_tls::NodeTlsSet::from_config(&config)?;
        let runtime = Runtime::new(config, cluster.clone(), tls, node_tls);
        let config = runtime.config();
        // RTMPS listeners without their own cert/key share the [tls] store.
        let shared_tls = match runtime.tls() {
            Some(state) => Some(tcp_server_config(state.certs.clone()).map_err(|e| {
                crate::tls::certs::CertError::new(
                    &state.certs.dir(),
                    format!("TLS setup failed: {e}"),
                )
            })?),
            None => None,
        };
        let mut bound = Vec::new();
        let mut udp = Vec::new();
        for listener in &config.listeners {
            let name: Arc<str> = listener.name.as_str().into();
            let bind_error = |addr, source| BindError {
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

    /// Starts from what an upgraded-from process knew, so that with MongoDB
    /// down during the upgrade the new process routes as the old one did
    /// until MongoDB answers: a remote membership source (MongoDB) starts
    /// from `nodes` instead of the config's seed nodes, and shared state
    /// (`[state]`) from `drains`. A static membership stays as the (possibly
    /// new) config says.
    pub fn start_from(
        &self,
        nodes: &[crate::cluster::NodeSpec],
        drains: &[(String, crate::state::Drain)],
    ) {
        let config = self.runtime.config();
        if config.state.is_some() && !drains.is_empty() {
            info!(
                drains = drains.len(),
                "upgrade: starting from the previous process's drains until MongoDB answers"
            );
            self.runtime.shared.start_from(drains.to_vec());
        }
        if config.cluster.source == crate::config::ClusterSource::Static || nodes.is_empty() {
            return;
        }
        info!(
            nodes = nodes.len(),
            "upgrade: starting from the previous process's membership until MongoDB answers"
        );
        self.runtime.cluster.update(nodes.to_vec());
    }

    /// Starts membership, shared state, health checks, worker threads, TLS
    /// tasks and every TCP accept loop. UDP listeners wait for
    /// [`Running::serve_udp`], so a process taking over from an old one can
    /// adopt its sessions first.
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
        let metrics = &runtime.metrics;
        let workers = crate::workers::Workers::start(extra, |i| metrics.worker_connections(i));
        let _ = runtime.workers.set(workers);
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
        if let Some(tls) = runtime.tls() {
            tls.spawn_tasks(
                &runtime.config().tls,
                &runtime.shutdown,
                runtime.metrics.clone(),
            );
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
        // Stop accepting first; a connection accepted an instant ago has not
        // sent its request yet, and a graceful close now would cut it (seen
        // across upgrades): let it be read before every connection is told
        // to finish.
        for stop in runtime
            .accept_loops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            stop.cancel();
        }
        runtime.listening.clear();
        tokio::time::sleep(Duration::from_millis(250)).await;
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

/// Starts the membership source `[cluster] source` names. Never waits for
/// a remote source: the static (or empty) membership serves until it answers.
fn start_membership_source(runtime: &Runtime) {
    let config = runtime.config();
    match source::start(&config.cluster, runtime.cluster.clone(), &runtime.shutdown) {
        Ok(source) => {
            let state = source.state();
            runtime
                .metrics
                .membership_status(source.name(), state.connected, state.last_success);
            *runtime.membership.lock().unwrap_or_else(|e| e.into_inner()) = Some(source);
        }
        Err(e) => warn!("membership source not started: {e}"),
    }
}
