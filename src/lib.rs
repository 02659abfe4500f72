//! amslb: a load balancer for Ant Media Server clusters.
//!
//! # Module map
//!
//! Modules are layered; each uses only its own layer and the ones above it
//! in this list (`.ci/layers` checks it; no edge points up and no two
//! top-level modules use each other).
//!
//! 1. Plain settings and helpers: [`allocator`] (mimalloc, and the trim
//!    that hands a quiet thread's free memory back; the crate's one module
//!    with `unsafe`), [`config`] (the file, its validation, and
//!    [`config::diff`]: what a reload changes and what only a restart
//!    applies), [`route`] (classify a request line), [`header_list`]
//!    (comma-separated header lists), [`http1`] (HTTP/1.1 header lines, parsed and
//!    written, for both of amslb's own HTTP/1.1 connections), [`listener`] (socket options), [`proxy_protocol`], [`tunnel`] (byte relay), [`workers`],
//!    `fdlimit` (the binary's open-file limit), [`import`] (HAProxy/nginx configs to
//!    lb.toml).
//! 2. Cluster data: [`cluster`]: nodes, groups and the membership snapshot,
//!    and the membership sources behind [`cluster::MembershipSource`]
//!    (static list, MongoDB registry).
//! 3. [`metrics`]: the Prometheus families, fed by everything below.
//! 4. Pure decisions: [`balance`] (pick a node), [`sticky`] (cookie and
//!    WHIP/WHEP affinity), [`policy`] (rules, per-client limits, trusted
//!    proxies, host routing), [`streaming`] ([`streaming::select`], the one
//!    placement for every protocol; which command a signalling WebSocket
//!    starts with; the assign API's answer).
//! 5. Background state: [`health`] (probes, passive checks), [`access_log`],
//!    [`tls`] (certificates, ACME, the handshake), [`node_tls`] (TLS to
//!    nodes, HTTPS and RTMPS, and the one dial to a node shared by probes,
//!    pools and the L4 listeners), [`state`] (drains and session
//!    counts shared with other instances through MongoDB).
//! 6. [`transport`]: connections to nodes, pooled per node address.
//! 7. [`runtime`]: the state shared by every connection (config snapshot,
//!    membership, health, pools, TLS, affinity), one `Arc`.
//! 8. Proxies: [`http`] (h1/h2 serving for plain and HTTPS listeners, the
//!    request handler in named phases, the sniffed WebSocket session),
//!    [`l4`] (RTMP/RTMPS/SRT relays), [`failover`] (the connect and retry
//!    loop HTTP and L4 share).
//! 9. [`stats`]: `/metrics`, the status page and the admin API.
//! 10. [`listeners`]: the listener registry (accept loops by name and address).
//! 11. [`server`] (start and shut down) and [`reload`] (the config lifetime
//!     after start); [`run`] is the one place that wires them together.
//! 12. [`upgrade`]: handing every listener to a new process on SIGUSR2.
//!
//! Data flows one way: listener → connection ([`listeners`]) → classify
//! ([`route`]) → pick a node ([`streaming::select`] with [`balance`] over a
//! [`cluster`] snapshot) → connect with failover ([`failover`]) → forward
//! ([`http`], [`l4`]). Config and membership are snapshots read
//! without locks; a reload or a membership update builds a new one and swaps
//! it in, and nodes that stay keep their state.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log;
pub mod allocator;
pub mod balance;
pub mod cluster;
pub mod config;
pub mod failover;
pub mod header_list;
pub mod health;
pub mod http;
pub mod http1;
pub mod import;
pub mod l4;
pub mod listener;
pub mod listeners;
pub mod metrics;
pub mod node_tls;
pub mod policy;
pub mod proxy_protocol;
pub mod reload;
pub mod route;
pub mod runtime;
pub mod server;
pub mod state;
pub mod stats;
pub mod sticky;
pub mod streaming;
pub mod tls;
pub mod transport;
pub mod tunnel;
pub mod upgrade;
pub mod workers;

use server::{Server, StartError};
use std::path::PathBuf;
use tracing::{error, info};

/// Binds every listener of the config read from `path` (already checked into
/// `prepared`), starts the stats listener, access log and reload handling, and
/// serves until SIGTERM or SIGINT (then shuts down gracefully within
/// `shutdown_grace`) or until a SIGUSR2 upgrade hands everything to a new
/// process (then finishes the open sessions within `hard_stop_after`).
/// Installs the rustls crypto provider first, for embedders that do not start
/// through the `amslb` command.
pub async fn run(path: PathBuf, prepared: reload::Prepared) -> Result<(), StartError> {
    tls::install_crypto_provider();
    let mut signals = Signals::install()?;
    let takeover = upgrade::child::Takeover::connect_from_env()
        .await
        .map_err(|e| StartError::Upgrade(format!("taking over from the old process: {e}")))?;
    let server = Server::bind(prepared.config.clone())?;
    if let Some(takeover) = &takeover {
        server.start_from(takeover.membership(), takeover.drains());
    }
    reload::start(server.runtime(), path, prepared).await?;
    let mut running = server.start();
    match takeover {
        Some(takeover) => {
            if let Err(e) = takeover.adopt(&mut running).await {
                error!(error = %e, "upgrade: the old process failed during the hand-over; serving alone");
                upgrade::announce(&running.runtime.config());
            } else {
                upgrade::announce(&running.runtime.config());
                if let Err(e) = takeover.done().await {
                    error!(error = %e, "upgrade: cannot tell the old process it may stop");
                }
            }
        }
        None => {
            running.serve_udp();
            upgrade::announce(&running.runtime.config());
        }
    }
    let grace = loop {
        let stop = tokio::select! {
            _ = signals.term.recv() => true,
            _ = signals.int.recv() => true,
            _ = signals.usr2.recv() => false,
        };
        if stop {
            let config = running.runtime.config();
            upgrade::remove_pid_file(&config);
            break config.global.shutdown_grace;
        }
        info!("SIGUSR2: upgrading, starting the new process");
        match upgrade::parent::upgrade(&mut running).await {
            Ok(pid) => {
                let grace = running.runtime.config().global.hard_stop_after;
                info!(
                    pid,
                    ?grace,
                    "upgrade: the new process took over; this one finishes its open sessions, then exits"
                );
                break grace;
            }
            Err(e) => error!(error = %e, "upgrade failed, this process keeps serving"),
        }
    };
    running.shutdown(grace).await;
    Ok(())
}

/// The signals that end serving: SIGTERM/SIGINT (stop) and SIGUSR2
/// (upgrade). Installed first thing, since SIGUSR2's default action kills
/// the process.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, StartError> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind| {
            signal(kind)
                .map_err(|e| StartError::Upgrade(format!("cannot install a signal handler: {e}")))
        };
        Ok(Self {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            usr2: install(SignalKind::user_defined2())?,
        })
    }
}
