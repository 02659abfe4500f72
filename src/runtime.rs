//! State shared by every listener and connection of a running amslb.

use crate::access_log::AccessLog;
use crate::cluster::{Cluster, MembershipSource};
use crate::config::{Config, ListenerConfig};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::sticky::Sticky;
use arc_swap::{ArcSwap, ArcSwapOption};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything a connection needs, shared behind one `Arc`.
///
/// The config is a snapshot swapped as a whole on reload: a request reads it
/// once and keeps that view, so it never sees half of an old config and half
/// of a new one.
#[derive(Debug)]
pub struct Runtime {
    config: ArcSwap<Config>,
    /// Live cluster membership.
    pub cluster: Arc<Cluster>,
    /// Cancelled when shutdown starts: stop accepting, finish in-flight requests.
    pub shutdown: CancellationToken,
    /// Cancelled when the shutdown grace period is over: close what is still open.
    pub hard_stop: CancellationToken,
    /// Every connection and tunnel task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Permits for client connections (`global.max_connections`).
    pub connection_slots: Arc<Semaphore>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The access log, when `[access_log]` is configured; replaced on reload.
    pub access_log: ArcSwap<Option<AccessLog>>,
    /// Running accept loops by (listener name, address); cancelling a token
    /// stops that loop only (reload removing a listener), its connections go on.
    pub accept_loops: Mutex<HashMap<(Arc<str>, SocketAddr), CancellationToken>>,
    /// Copies of the listening sockets, for a seamless upgrade to hand on.
    pub listening: crate::listener::Listening,
    /// Extra serving threads, started when the server runs.
    pub workers: OnceLock<crate::workers::Workers>,
    /// The running membership source (`[cluster] source`), once the server
    /// runs; a reload that changes `[cluster]` replaces it.
    pub membership: Mutex<Option<Box<dyn MembershipSource>>>,
    /// Certificates and ACME, when some listener terminates TLS or ACME is
    /// configured; a reload may start, retarget or stop it.
    pub tls: ArcSwapOption<crate::tls::TlsState>,
    /// Cookie and WHIP/WHEP affinity (`[sticky]`), rebuilt on reload.
    sticky: ArcSwap<Sticky>,
    /// Keep-alive connections to nodes, by node address.
    pub pools: crate::transport::Pools,
    /// Node health checks (`[health]`); the proxy reports passive failures
    /// here, and a reload reconfigures it in place.
    pub health: Arc<Health>,
    /// Node drains, shared with the other instances under `[state]`.
    pub shared: Arc<crate::state::SharedState>,
    /// TLS to nodes (`node_tls`), shared by the pools and the health checks.
    pub node_tls: Arc<crate::node_tls::NodeTlsSet>,
    /// Per-client-address limit tables (`[[limit]]`).
    pub limits: crate::policy::limits::Limits,
}

impl Runtime {
    /// Builds the shared state for `config`; `node_tls` is how nodes are reached.
    pub fn new(
        config: Config,
        cluster: Arc<Cluster>,
        tls: Option<Arc<crate::tls::TlsState>>,
        node_tls: crate::node_tls::NodeTlsSet,
    ) -> Arc<Self> {
        let node_tls = Arc::new(node_tls);
        let slots = Arc::new(Semaphore::new(config.global.max_connections));
        // The family names and labels are constants; `metrics_registry_builds`
        // in metrics.rs proves they register, so this cannot fail at run time.
        let metrics = Arc::new(Metrics::new(cluster.clone()).expect("metric families are valid"));
        Arc::new(Self {
            shared: crate::state::SharedState::new(&config, metrics.clone()),
            sticky: ArcSwap::from_pointee(Sticky::from_config(&config)),
            health: Health::with_node_tls(&config, node_tls.clone()),
            node_tls,
            config: ArcSwap::from_pointee(config),
            pools: crate::transport::Pools::new(cluster.clone()),
            cluster,
            shutdown: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            connection_slots: slots,
            metrics,
            access_log: ArcSwap::from_pointee(None),
            accept_loops: Mutex::default(),
            listening: Default::default(),
            workers: OnceLock::new(),
            membership: Mutex::default(),
            tls: ArcSwapOption::new(tls),
            limits: Default::default(),
        })
    }

    /// The current config snapshot.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Whether a new publish session of `kind` from `client` on `listener` may
    /// start under the `per_minute` limits; a refusal is counted and logged.
    pub fn admit_publish(
        &self,
        listener: &str,
        kind: crate::config::rules::RouteName,
        client: std::net::IpAddr,
    ) -> bool {
        let config = self.config();
        match self.limits.publish(&config, listener, client, kind) {
            Ok(()) => true,
            Err(over) => {
                (self.limits).refused(&self.metrics, listener, &over, client, "publish");
                false
            }
        }
    }

    /// Replaces the config for everything that starts from now on, with the
    /// affinity settings built from it (a request reads both once).
    pub fn set_config(&self, config: Config) {
        let sticky = Sticky::reloaded(&config, &self.sticky.load());
        self.sticky.store(Arc::new(sticky));
        self.config.store(Arc::new(config));
    }

    /// The affinity settings in effect.
    pub fn sticky(&self) -> Arc<Sticky> {
        self.sticky.load_full()
    }

    /// The TLS state, when TLS is in use.
    pub fn tls(&self) -> Option<Arc<crate::tls::TlsState>> {
        self.tls.load_full()
    }
}

/// A config snapshot plus the index of one listener in it: what a request reads.
#[derive(Debug, Clone)]
pub struct ListenerView {
    /// The config snapshot the request runs under.
    pub config: Arc<Config>,
    index: usize,
}

impl ListenerView {
    /// Looks up the listener called `name` in the runtime's current config.
    /// `None` once a reload has removed the listener.
    pub fn current(runtime: &Runtime, name: &str) -> Option<Self> {
        let config = runtime.config();
        let index = config.listeners.iter().position(|l| l.name == name)?;
        Some(Self { config, index })
    }

    /// The listener's settings.
    pub fn listener(&self) -> &ListenerConfig {
        &self.config.listeners[self.index]
    }
}
