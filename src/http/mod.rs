//! The HTTP side: serving client connections with hyper and proxying their
//! requests to nodes.

pub mod body;
mod edge;
pub mod headers;
pub mod pool;
pub mod proxy;
pub mod record;

use crate::runtime::Runtime;
use headers::ClientInfo;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use proxy::ConnContext;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

/// Serves one client connection until it closes, or until shutdown lets its
/// in-flight requests finish.
///
/// The header-read timeout (`timeouts.client`) bounds both a slow request
/// head (slowloris) and how long an idle keep-alive connection is kept;
/// hyper answers malformed heads with 400 and oversized ones with 431 itself,
/// and the error is logged here.
pub async fn serve_connection<I>(
    runtime: Arc<Runtime>,
    listener: Arc<str>,
    io: I,
    client: ClientInfo,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = runtime.config();
    let ctx = Arc::new(ConnContext {
        runtime: runtime.clone(),
        listener: listener.clone(),
        client,
        metrics: runtime.metrics.listener(&listener),
    });
    let service = service_fn(move |request| proxy::handle(ctx.clone(), request));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.timeouts.client)
        .max_buf_size(config.global.max_header_bytes.max(8192))
        .keep_alive(true);
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = runtime.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        if e.is_parse() || e.is_parse_too_large() || e.is_timeout() {
            info!(%listener, client = %client.addr, error = %e, "client connection refused");
        } else {
            debug!(%listener, client = %client.addr, error = %e, "client connection ended");
        }
    }
}
