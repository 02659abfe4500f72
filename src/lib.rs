//! amslb: a load balancer for Ant Media Server clusters.
//!
//! Data flows one way: [`listener`] → connection ([`server`]) → classify
//! ([`route`]) → pick a node ([`streaming::select`], the one placement for
//! every protocol, with [`balance`] over a [`cluster`] snapshot) → connect
//! with failover ([`failover`], shared by HTTP and L4) → forward ([`http`],
//! [`l4`]). [`run`] is the one place that wires them together.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod balance;
pub mod cluster;
pub mod config;
pub mod failover;
pub mod health;
pub mod http;
pub mod l4;
pub mod listener;
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
