//! amslb: a load balancer for Ant Media Server clusters.
//!
//! # Module map
//!
//! Modules are layered; each uses only its own layer and the ones above it
//! in this list (`.ci/layers` checks it and lists what still points up).
//!
//! 1. Plain settings and helpers: [`config`] (the file, its validation, and
//!    [`config::diff`]: what a reload changes and what only a restart
//!    applies), [`route`] (classify a request line), [`listener`] (socket
//!    options), [`proxy_protocol`], [`tunnel`] (byte relay), [`workers`].
//! 2. Cluster data: [`cluster`]: nodes, groups and the membership snapshot,
//!    and the membership sources behind [`cluster::MembershipSource`]
//!    (static list, MongoDB registry).
//! 3. [`metrics`]: the Prometheus families, fed by everything below.
//! 4. Pure decisions: [`balance`] (pick a node), [`sticky`] (cookie and
//!    WHIP/WHEP affinity).
//! 5. Background state: [`health`] (probes, passive checks), [`access_log`],
//!    [`tls`] (certificates, ACME, the handshake).
//! 6. [`transport`]: connections to nodes, pooled per node address.
//! 7. [`runtime`]: the state shared by every connection (config snapshot,
//!    membership, health, pools, TLS, affinity), one `Arc`.
//! 8. Proxies: [`http`] (h1/h2 serving for plain and HTTPS listeners, the
//!    request handler), [`l4`] (RTMP/RTMPS/SRT relays), [`streaming`]
//!    ([`streaming::select`], the one placement for every protocol;
//!    WebSocket sniffing; the assign API), [`failover`] (the connect and
//!    retry loop HTTP and L4 share).
//! 9. [`stats`]: `/metrics`, the status page and the admin API.
//! 10. [`listeners`]: the listener registry (accept loops by name and address).
//! 11. [`server`] (start and shut down) and [`reload`] (the config lifetime
//!     after start); [`run`] is the one place that wires them together.
//!
//! Data flows one way: listener → connection ([`listeners`]) → classify
//! ([`route`]) → pick a node ([`streaming::select`] with [`balance`] over a
//! [`cluster`] snapshot) → connect with failover ([`failover`]) → forward
//! ([`http`], [`l4`]). Config and membership are snapshots read
//! without locks; a reload or a membership update builds a new one and swaps
//! it in, and nodes that stay keep their state.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log;
pub mod balance;
pub mod cluster;
pub mod config;
pub mod failover;
pub mod health;
pub mod http;
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
pub mod stats;
pub mod sticky;
pub mod streaming;
pub mod tls;
pub mod transport;
pub mod tunnel;
pub mod workers;

use server::{Server, StartError};
use std::path::PathBuf;

/// Binds every listener of the config read from `path` (already checked into
/// `prepared`), starts the stats listener, access log and reload handling, and
/// serves until SIGTERM or SIGINT, then shuts down gracefully.
/// Installs the rustls crypto provider first, for embedders that do not start
/// through the `amslb` command.
pub async fn run(path: PathBuf, prepared: reload::Prepared) -> Result<(), StartError> {
    tls::install_crypto_provider();
    let server = Server::bind(prepared.config.clone())?;
    reload::start(server.runtime(), path, prepared).await?;
    server.run(shutdown_signal()).await;
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
