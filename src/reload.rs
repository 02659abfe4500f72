//! Configuration lifecycle after start: the stats listener, the access log,
//! and hot reload on SIGHUP or the admin action.
//!
//! A reload prepares everything that can fail first (parse and validate the
//! file, read the stats password file, bind new sockets, open the access log,
//! load a changed `[tls]` store) and only then commits:
//! - the config snapshot is swapped (new connections and requests see it;
//!   open ones keep what they had), and `[sticky]` is rebuilt with it;
//! - `[health]` is applied in place: every node keeps its state, probe tasks
//!   whose settings changed restart;
//! - a changed `[tls]` points the certificates at the new store and restarts
//!   the directory watch and ACME tasks; open TLS connections keep their keys;
//! - a changed `[cluster]` stops the membership source and starts the one the
//!   new file names (nodes that stay keep their state);
//! - new accept loops start and removed ones stop. Listeners present in both
//!   configs keep their sockets, so nothing queued on them is lost.
//!
//! Any failure leaves the running config untouched. What a reload cannot
//! apply (the list is in [`crate::config::diff`]) is never dropped silently:
//! it is named in the log line, in the `/api/v1/reload` answer, in the
//! `amslb_config_reload_pending_restart` gauge and on the status page, for as
//! long as the file and the running process disagree.

use crate::access_log::AccessLog;
use crate::cluster::source;
use crate::config::diff::{self, Change};
use crate::config::{self, Config, ConfigError, Protocol};
use crate::listener::{Owner, bind_tcp};
use crate::listeners::{BoundListener, bind_listener, spawn_accept_loop};
use crate::runtime::Runtime;
use crate::stats::auth::{Access, AccessError};
use crate::stats::{Control, ReloadReport, StatsState};
use crate::tls::{CertError, Staged, TlsState};
use futures_util::future::BoxFuture;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Why a config could not be (re)loaded; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not parse or validate.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The stats credentials could not be read.
    #[error("{0}")]
    Stats(#[from] AccessError),
    /// A new listener address could not be bound.
    #[error("{0}")]
    Bind(String),
    /// The stats listener address could not be bound.
    #[error("stats.bind {addr}: {source}")]
    StatsBind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The access log file could not be opened.
    #[error("access_log.path {path}: {source}")]
    AccessLog {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The certificates of a changed `[tls]` could not be loaded.
    #[error("[tls]: {0}")]
    Tls(#[from] CertError),
}

/// A config that passed every check a reload makes before touching sockets.
#[derive(Debug)]
pub struct Prepared {
    /// The configuration.
    pub config: Config,
    /// Non-fatal findings worth logging.
    pub warnings: Vec<String>,
    /// The file's settings as written, for telling what a reload changes.
    pub settings: toml::Table,
    stats_access: Option<Access>,
}

/// Reads and checks the config file exactly as a reload does: parse,
/// validate, read the stats password file. `amslb check` runs this.
pub fn prepare(path: &Path) -> Result<Prepared, ReloadError> {
    let loaded = config::load(path)?;
    let stats_access = loaded
        .config
        .stats
        .as_ref()
        .map(Access::from_config)
        .transpose()?;
    Ok(Prepared {
        config: loaded.config,
        warnings: loaded.warnings,
        settings: loaded.settings,
        stats_access,
    })
}

/// Name of the stats listener among the listening sockets.
const STATS: &str = "stats";

type ReloadReply = oneshot::Sender<Result<ReloadReport, String>>;

/// What the stats listener calls for admin actions: a channel to the reload task.
#[derive(Debug, Clone)]
struct AdminHandle {
    runtime: Arc<Runtime>,
    requests: mpsc::Sender<ReloadReply>,
}

impl Control for AdminHandle {
    fn reload(&self) -> BoxFuture<'static, Result<ReloadReport, String>> {
        let requests = self.requests.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            requests
                .send(tx)
                .await
                .map_err(|_| "amslb is shutting down".to_string())?;
            rx.await.map_err(|_| "amslb is shutting down".to_string())?
        })
    }

    fn groups(&self) -> Vec<String> {
        self.runtime
            .config()
            .groups
            .iter()
            .map(|g| g.name.clone())
            .collect()
    }

    fn health_history(&self, node: &str) -> Vec<bool> {
        self.runtime
            .health
            .history(node)
            .iter()
            .map(|check| check.outcome.is_ok())
            .collect()
    }

    fn shared(&self) -> Option<Arc<crate::state::SharedState>> {
        Some(self.runtime.shared.clone())
    }
}

/// The stats listener currently running.
#[derive(Debug)]
struct RunningStats {
    bind: SocketAddr,
    stop: CancellationToken,
    state: Arc<StatsState>,
}

/// Owns everything a reload replaces; lives in the reload task.
#[derive(Debug)]
struct Lifecycle {
    path: PathBuf,
    runtime: Arc<Runtime>,
    admin: AdminHandle,
    stats: Option<RunningStats>,
    /// The settings of the file the process started with: what the
    /// restart-only settings still run with.
    started: toml::Table,
    /// The settings of the file last applied.
    applied: toml::Table,
}

/// What a reload does with `[tls]`, decided before anything changes.
#[derive(Debug)]
enum TlsPlan {
    /// Nothing to do.
    Keep,
    /// Serve a new store and restart the tasks with new settings.
    Apply(Box<Staged>),
    /// TLS was off and is needed now.
    Start(Arc<TlsState>),
    /// TLS was on and is needed no more.
    Stop,
}

/// Starts the stats listener and the access log of the initial config, and the
/// task that reloads on SIGHUP and on admin requests. Returns once the stats
/// socket is bound.
pub async fn start(
    runtime: &Arc<Runtime>,
    path: PathBuf,
    prepared: Prepared,
) -> Result<(), ReloadError> {
    // Installed before anything else: SIGHUP's default action kills the process.
    #[cfg(unix)]
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| ReloadError::Bind(format!("cannot install the SIGHUP handler: {e}")))?;
    let (tx, mut rx) = mpsc::channel::<ReloadReply>(8);
    let mut life = Lifecycle {
        path,
        runtime: runtime.clone(),
        admin: AdminHandle {
            runtime: runtime.clone(),
            requests: tx,
        },
        stats: None,
        started: prepared.settings.clone(),
        applied: prepared.settings.clone(),
    };
    let stats_socket = match &prepared.config.stats {
        Some(stats) => Some(bind_stats(stats.bind)?),
        None => None,
    };
    let access_log = open_access_log(runtime, &prepared.config).await?;
    runtime.access_log.store(Arc::new(access_log));
    runtime.metrics.set_pending_restart(&[]);
    life.swap_stats(&prepared, stats_socket);

    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hangup = hangup;
        // Membership sources keep their own status; copy it into the metrics.
        let mut membership_tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            #[cfg(unix)]
            let hup = hangup.recv();
            #[cfg(not(unix))]
            let hup = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = life.runtime.shutdown.cancelled() => break,
                _ = hup => {
                    info!(path = %life.path.display(), "SIGHUP: reloading the configuration");
                    let _ = life.reload().await;
                }
                Some(reply) = rx.recv() => {
                    let _ = reply.send(life.reload().await);
                }
                _ = membership_tick.tick() => {
                    let source = life
                        .runtime
                        .membership
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .map(|s| (s.name(), s.state()));
                    if let Some((name, state)) = source {
                        life.runtime.metrics.membership_status(
                            name,
                            state.connected,
                            state.last_success,
                        );
                    }
                    // Certificates change by file watch and ACME renewal; the
                    // gauge follows the served snapshot.
                    if let Some(tls) = life.runtime.tls() {
                        for entry in tls.certs.snapshot().entries() {
                            life.runtime.metrics.certificate_expiry(&entry.name, entry.not_after);
                        }
                    }
                }
            }
        }
        if let Some(stats) = life.stats.take() {
            stats.stop.cancel();
        }
    });
    Ok(())
}

/// Whether `change` is a setting of `[section]` (or the section as a whole).
fn in_section(change: &Change, section: &str) -> bool {
    change
        .key
        .strip_prefix(section)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

fn bind_stats(addr: SocketAddr) -> Result<tokio::net::TcpListener, ReloadError> {
    bind_tcp(addr, 128).map_err(|source| ReloadError::StatsBind { addr, source })
}

async fn open_access_log(
    runtime: &Runtime,
    config: &Config,
) -> Result<Option<AccessLog>, ReloadError> {
    let Some(log) = &config.access_log else {
        return Ok(None);
    };
    let dropped = runtime.metrics.access_log_dropped();
    let (log, _writer) =
        AccessLog::start(log, dropped)
            .await
            .map_err(|source| ReloadError::AccessLog {
                path: log
                    .path
                    .as_ref()
                    .map_or("stdout".into(), |p| p.display().to_string()),
                source,
            })?;
    Ok(Some(log))
}

impl Lifecycle {
    /// One reload attempt, logged and counted either way.
    async fn reload(&mut self) -> Result<ReloadReport, String> {
        match self.try_reload().await {
            Ok(report) => {
                self.runtime.metrics.reload_done(true);
                let summary = &report.summary;
                if report.pending_restart.is_empty() {
                    info!(path = %self.path.display(), %summary, "configuration reloaded");
                } else {
                    let pending_restart = report.pending_restart.join(", ");
                    warn!(path = %self.path.display(), %summary, %pending_restart, "configuration reloaded, but some settings only apply on restart");
                }
                Ok(report)
            }
            Err(e) => {
                self.runtime.metrics.reload_done(false);
                error!(path = %self.path.display(), error = %e, "reload refused, the running configuration stays");
                Err(e.to_string())
            }
        }
    }

    async fn try_reload(&mut self) -> Result<ReloadReport, ReloadError> {
        let prepared = prepare(&self.path)?;
        for warning in &prepared.warnings {
            warn!("{}: {warning}", self.path.display());
        }
        let new = &prepared.config;
        let changed = diff::changes(&self.applied, &prepared.settings);
        let pending: Vec<String> =
            diff::pending_restart(&diff::changes(&self.started, &prepared.settings))
                .into_iter()
                .map(|c| c.key.clone())
                .collect();
        let touches = |section: &str| changed.iter().any(|c| in_section(c, section));

        // Everything that can fail, before anything changes.
        // UDP listeners (SRT) are not accept loops; they stay as started.
        let wanted: HashSet<(Arc<str>, SocketAddr)> = new
            .listeners
            .iter()
            .filter(|l| l.protocol != Protocol::Udp)
            .flat_map(|l| {
                let name: Arc<str> = l.name.as_str().into();
                l.bind.iter().map(move |addr| (name.clone(), *addr))
            })
            .collect();
        let running: HashSet<(Arc<str>, SocketAddr)> = self
            .runtime
            .accept_loops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut fresh: Vec<BoundListener> = Vec::new();
        for listener in &new.listeners {
            for addr in &listener.bind {
                let key: (Arc<str>, SocketAddr) = (listener.name.as_str().into(), *addr);
                if running.contains(&key) || listener.protocol == Protocol::Udp {
                    continue;
                }
                if matches!(listener.protocol, Protocol::Tcp | Protocol::Tls) {
                    // Their relay is built at start from the whole config;
                    // `pending` names them.
                    continue;
                }
                // SO_REUSEPORT lets a renamed listener bind an address the
                // old name still holds; the old loop stops right after.
                let bound = bind_listener(key.0, *addr, listener.backlog)
                    .map_err(|e| ReloadError::Bind(e.to_string()))?;
                fresh.push(bound);
            }
        }
        let stats_socket = match (&new.stats, &self.stats) {
            (Some(want), Some(have)) if want.bind == have.bind => None,
            (Some(want), _) => Some(bind_stats(want.bind)?),
            (None, _) => None,
        };
        let access_log = open_access_log(&self.runtime, new).await?;
        let tls = match (self.runtime.tls(), TlsState::needed(new)) {
            (Some(_), true) if touches("tls") => TlsPlan::Apply(Box::new(Staged::load(&new.tls)?)),
            (None, true) => TlsState::start(new)?.map_or(TlsPlan::Keep, TlsPlan::Start),
            (Some(_), false) => TlsPlan::Stop,
            _ => TlsPlan::Keep,
        };

        // Commit.
        self.runtime.set_config(new.clone());
        self.runtime.health.reconfigure(new);
        self.apply_tls(tls, new);
        if touches("cluster") {
            self.replace_membership_source(new).await;
        }
        let added = fresh.len();
        for bound in fresh {
            spawn_accept_loop(&self.runtime, bound);
        }
        let mut removed = 0;
        {
            let mut loops = self
                .runtime
                .accept_loops
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            loops.retain(|key, stop| {
                let keep = wanted.contains(key);
                if !keep {
                    info!(listener = %key.0, addr = %key.1, "listener removed by reload");
                    self.runtime
                        .listening
                        .remove(Owner::Listener, &key.0, key.1);
                    stop.cancel();
                    removed += 1;
                }
                keep
            });
        }
        self.runtime
            .metrics
            .retain_listeners(|name| new.listeners.iter().any(|l| l.name == name));
        self.runtime.access_log.store(Arc::new(access_log));
        self.swap_stats(&prepared, stats_socket);
        self.runtime.metrics.set_pending_restart(&pending);
        self.applied = prepared.settings;
        let mut summary = format!(
            "{} setting(s) changed, {} listener address(es) added, {removed} removed, {} node(s) configured",
            changed.len(),
            added,
            new.cluster.nodes.len()
        );
        if !pending.is_empty() {
            summary.push_str(&format!("; restart needed for: {}", pending.join(", ")));
        }
        Ok(ReloadReport {
            summary,
            changed: changed.into_iter().map(|c| c.key).collect(),
            pending_restart: pending,
        })
    }

    /// Carries out what [`TlsPlan`] decided.
    fn apply_tls(&self, plan: TlsPlan, config: &Config) {
        let runtime = &self.runtime;
        match plan {
            TlsPlan::Keep => {}
            TlsPlan::Apply(staged) => {
                if let Some(tls) = runtime.tls() {
                    tls.apply(*staged, &runtime.shutdown, runtime.metrics.clone());
                }
            }
            TlsPlan::Start(tls) => {
                tls.spawn_tasks(&config.tls, &runtime.shutdown, runtime.metrics.clone());
                runtime.tls.store(Some(tls));
            }
            TlsPlan::Stop => {
                if let Some(tls) = runtime.tls.swap(None) {
                    tls.stop_tasks();
                }
            }
        }
    }

    /// Stops the running membership source and starts the one `config`
    /// names. The old one is stopped first, so it cannot overwrite the new
    /// one's membership; until the new one answers, the nodes stay as they are.
    async fn replace_membership_source(&self, config: &Config) {
        let runtime = &self.runtime;
        let old = runtime
            .membership
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(old) = old {
            let name = old.name();
            old.stop().await;
            runtime.metrics.forget_membership_source(name);
        }
        // Validation made sure the source has what it needs to start.
        let new = match source::start(&config.cluster, runtime.cluster.clone(), &runtime.shutdown) {
            Ok(new) => new,
            Err(e) => {
                error!("membership source not started: {e}");
                return;
            }
        };
        info!(
            source = new.name(),
            "membership source (re)started by reload"
        );
        let state = new.state();
        runtime
            .metrics
            .membership_status(new.name(), state.connected, state.last_success);
        *runtime.membership.lock().unwrap_or_else(|e| e.into_inner()) = Some(new);
    }

    /// Applies the `[stats]` of `prepared`: new rules for the running listener,
    /// or a listener on `socket` (a new or moved bind), or none.
    fn swap_stats(&mut self, prepared: &Prepared, socket: Option<tokio::net::TcpListener>) {
        let access = prepared.stats_access.clone();
        match (access, socket) {
            (None, _) => {
                if let Some(old) = self.stats.take() {
                    info!(addr = %old.bind, "stats listener removed");
                    self.forget_stats(&old);
                }
            }
            (Some(access), None) => {
                if let Some(running) = &self.stats {
                    running.state.set_access(access);
                }
            }
            (Some(access), Some(socket)) => {
                let Some(bind) = prepared.config.stats.as_ref().map(|s| s.bind) else {
                    return;
                };
                if let Some(old) = self.stats.take() {
                    self.forget_stats(&old);
                }
                self.runtime
                    .listening
                    .add(Owner::Stats, STATS.into(), bind, &socket);
                let state = Arc::new(StatsState::new(
                    self.runtime.metrics.clone(),
                    self.runtime.cluster.clone(),
                    access,
                    Arc::new(self.admin.clone()),
                ));
                let stop = self.runtime.shutdown.child_token();
                if let Ok(local) = socket.local_addr() {
                    info!(addr = %local, "stats listener (/metrics, status page, admin API)");
                }
                tokio::spawn(crate::stats::serve(socket, state.clone(), stop.clone()));
                self.stats = Some(RunningStats { bind, stop, state });
            }
        }
    }

    /// Stops a stats listener that a reload moved or removed.
    fn forget_stats(&self, old: &RunningStats) {
        self.runtime
            .listening
            .remove(Owner::Stats, &STATS.into(), old.bind);
        old.stop.cancel();
    }
}
