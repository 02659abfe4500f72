//! `protocol = "https"` listeners: the TLS handshake, then the same proxy
//! service as plain HTTP, over h2 or HTTP/1.1 as ALPN decided.

use super::acme::AcmeManager;
use super::certs::CertError;
use super::resolver::Certificates;
use super::serve::{HttpLimits, handshake, serve_http};
use super::server_config::https_server_config;
use super::watch::{Fingerprint, fingerprint, watch};
use crate::config::tls::AcmeConfig;
use crate::config::{Config, Protocol};
use crate::http::headers::ClientInfo;
use crate::http::idle::{self, ConnActivity, WriteTimeout};
use crate::http::proxy::{self, ConnContext};
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// TLS state of a running balancer: the certificates, the acceptor of the
/// `https` listeners, and the ACME settings.
pub struct TlsState {
    /// Certificates served (and reloaded on demand) by every TLS listener.
    pub certs: Arc<Certificates>,
    acceptor: TlsAcceptor,
    watch_interval: Duration,
    /// The directory as it was just before the first load.
    loaded: Fingerprint,
    acme: Option<AcmeConfig>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The acceptor holds only the rustls config; nothing worth printing.
        f.debug_struct("TlsState")
            .field("certs", &self.certs)
            .field("acme", &self.acme)
            .finish_non_exhaustive()
    }
}

impl TlsState {
    /// Loads `[tls] certs_dir` when some listener terminates TLS or ACME is
    /// configured; `None` otherwise (a plain-HTTP setup needs no certificate
    /// directory). A bad certificate file stops start-up, naming the file.
    pub fn start(config: &Config) -> Result<Option<Arc<Self>>, CertError> {
        let terminates_tls = config.listeners.iter().any(|l| match l.protocol {
            Protocol::Https => true,
            // An RTMPS listener with its own cert/key needs no store.
            Protocol::Tls => l.l4.cert.is_none(),
            _ => false,
        });
        if !terminates_tls && config.tls.acme.is_none() {
            return Ok(None);
        }
        super::install_crypto_provider();
        let loaded = fingerprint(&config.tls.certs_dir);
        let certs = Certificates::open(&config.tls)?;
        let count = certs.snapshot().entries().len();
        info!(dir = %certs.dir().display(), count, "certificates loaded");
        let server_config = https_server_config(certs.clone())
            .map_err(|e| CertError::new(certs.dir(), format!("TLS setup failed: {e}")))?;
        Ok(Some(Arc::new(Self {
            certs,
            acceptor: TlsAcceptor::from(server_config),
            watch_interval: config.tls.watch_interval,
            loaded,
            acme: config.tls.acme.clone(),
        })))
    }

    /// Starts the background tasks: watching `certs_dir` (unless
    /// `watch_interval` is 0) and ACME renewal (if `[tls.acme]` is set). Both
    /// end on `shutdown`; ACME order results are counted in `metrics`.
    pub fn spawn_tasks(&self, shutdown: CancellationToken, metrics: Arc<Metrics>) {
        if !self.watch_interval.is_zero() {
            tokio::spawn(watch(
                self.certs.clone(),
                self.loaded.clone(),
                self.watch_interval,
                shutdown.clone(),
            ));
        }
        if let Some(acme) = &self.acme {
            let manager = AcmeManager::new(acme.clone(), self.certs.clone());
            tokio::spawn(manager.run(shutdown, metrics));
        }
    }
}

/// Serves one `https` client connection: handshake (bounded by
/// `timeouts.client`), then the proxy with `X-Forwarded-Proto: https`.
pub async fn serve_connection(
    runtime: Arc<Runtime>,
    tls: Arc<TlsState>,
    listener: Arc<str>,
    stream: TcpStream,
    client: ClientInfo,
) {
    let config = runtime.config();
    let limits = HttpLimits {
        header_read_timeout: config.timeouts.client,
        max_header_bytes: config.global.max_header_bytes,
    };
    let stream = WriteTimeout::new(stream, config.timeouts.client);
    let stream = match handshake(&tls.acceptor, stream, limits.header_read_timeout).await {
        Ok(Some(stream)) => stream,
        Ok(None) => return,
        Err(e) => {
            // Scanners and clients that distrust the certificate: not worth more than debug.
            debug!(%listener, client = %client.addr, error = %e, "TLS handshake failed");
            return;
        }
    };
    let ctx = Arc::new(ConnContext {
        runtime: runtime.clone(),
        listener: listener.clone(),
        client: ClientInfo {
            tls: true,
            ..client
        },
        metrics: runtime.metrics.listener(&listener),
    });
    // hyper's HTTP/2 server has no idle timeout: close the connection
    // (GOAWAY, like a shutdown) after `timeouts.client` without a request.
    let activity = Arc::new(ConnActivity::default());
    let service = idle::tracked(activity.clone(), config.timeouts.client, move |request| {
        proxy::handle(ctx.clone(), request)
    });
    let stop = runtime.shutdown.child_token();
    let idle_stop = stop.clone();
    let close_when_idle = async {
        activity.idle_for(config.timeouts.client).await;
        idle_stop.cancel();
        std::future::pending::<()>().await
    };
    let result = tokio::select! {
        result = serve_http(stream, service, limits, stop) => result,
        () = close_when_idle => Ok(()),
    };
    if let Err(e) = result {
        debug!(%listener, client = %client.addr, error = %e, "client connection ended");
    }
}
