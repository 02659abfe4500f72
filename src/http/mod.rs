//! The HTTP side: serving client connections (plain and HTTPS, h1 and h2)
//! with hyper and proxying their requests to nodes.

pub mod body;
mod edge;
pub mod guard;
pub mod h1;
pub mod headers;
pub mod http01;
pub mod idle;
pub mod proxy;
pub mod record;
pub mod serve;
mod sniffed;
mod ws_publish;

use crate::metrics::ListenerMetrics;
use crate::runtime::Runtime;
use crate::tls::TlsState;
use crate::tls::serve::handshake;
use crate::tunnel::Prefixed;
use bytes::Bytes;
use headers::ClientInfo;
use idle::{ConnActivity, WriteTimeout};
use proxy::ConnContext;
use serve::{HttpLimits, Versions, serve_http};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, info};

/// Serves one plain HTTP client connection until it closes, or until
/// shutdown lets its in-flight requests finish.
///
/// The header-read timeout (`timeouts.client`) bounds both a slow request
/// head (slowloris) and how long an idle keep-alive connection is kept;
/// hyper answers malformed heads with 400 and oversized ones with 431 itself,
/// and the error is logged here. `listener` holds the counters of the
/// listener that accepted the connection, and its name.
pub async fn serve_connection<I>(
    runtime: Arc<Runtime>,
    listener: Arc<ListenerMetrics>,
    io: I,
    client: ClientInfo,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve(runtime, listener, io, Versions::Http1, client).await;
}

/// Serves one `https` client connection: handshake (bounded by
/// `timeouts.client`), then the proxy with `X-Forwarded-Proto: https`, over
/// h2 or HTTP/1.1 as ALPN decided.
pub async fn serve_tls_connection(
    runtime: Arc<Runtime>,
    tls: Arc<TlsState>,
    listener: Arc<ListenerMetrics>,
    stream: TcpStream,
    client: ClientInfo,
) {
    let timeout = runtime.config().timeouts.client;
    let stream = match handshake(tls.acceptor(), stream, timeout).await {
        Ok(Some(stream)) => stream,
        Ok(None) => return,
        Err(e) => {
            // Scanners and clients that distrust the certificate: not worth
            // more than debug in the log, but counted.
            listener.tls_handshake_failed(e.kind());
            debug!(listener = %listener.name(), client = %client.addr, error = %e, "TLS handshake failed");
            return;
        }
    };
    let versions = Versions::from_alpn(stream.get_ref().1.alpn_protocol());
    let client = ClientInfo {
        tls: true,
        ..client
    };
    serve(runtime, listener, stream, versions, client).await;
}

async fn serve<I>(
    runtime: Arc<Runtime>,
    metrics: Arc<ListenerMetrics>,
    io: I,
    versions: Versions,
    client: ClientInfo,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = runtime.config();
    let limits = HttpLimits {
        header_read_timeout: config.timeouts.client,
        max_header_bytes: config.global.max_header_bytes,
    };
    let listener = metrics.name().clone();
    let ctx = Arc::new(ConnContext {
        runtime: runtime.clone(),
        client,
        client_ip: headers::ip_header(client.addr.ip()),
        metrics,
    });
    let idle_limit = config.timeouts.client;
    // A client that reads nothing for `timeouts.client` is closed (HTTP/1,
    // h2 and tunnels after an upgrade alike).
    let io = WriteTimeout::new(io, idle_limit);
    let stop = runtime.shutdown.child_token();
    let result = if versions == Versions::Http1 {
        // The loop's header-read timeout ends idle HTTP/1 keep-alive, and it
        // polls a response body whenever the socket takes more: neither the
        // activity count nor the stream watch of h2 is needed.
        h1::serve(io, ctx, limits, stop).await
    } else {
        let handle = move |request| proxy::handle_hyper(ctx.clone(), request);
        let activity = Arc::new(ConnActivity::default());
        // hyper spawns a task per h2 stream and moves the request future
        // into it by value several times (spawn, task cell, stage changes);
        // boxed, each move copies a pointer instead of the ~4 KB future.
        let boxed = move |request| Box::pin(handle(request));
        let service = idle::tracked(activity.clone(), boxed);
        // hyper's HTTP/2 server has no idle timeout: close the connection
        // (GOAWAY, like a shutdown) after `timeouts.client` without a
        // request. Meanwhile, release the nodes of streams the client stopped
        // reading.
        let idle_stop = stop.clone();
        let close_when_idle = async {
            tokio::select! {
                () = activity.idle_for(idle_limit) => {}
                () = activity.release_stalled_streams(idle_limit) => {}
            }
            idle_stop.cancel();
            std::future::pending::<()>().await
        };
        tokio::select! {
            // Wrapped like the connections `h1` hands over, so an upgrade
            // finds one client connection type (`tunnel::upgraded`).
            result = serve_http(Prefixed::new(Bytes::new(), io), versions, service, limits, stop) => result,
            () = close_when_idle => Ok(()),
        }
    };
    if let Err(e) = result {
        let refused = h1::is_refusal(&*e)
            || e.downcast_ref::<hyper::Error>()
                .is_some_and(|e| e.is_parse() || e.is_parse_too_large() || e.is_timeout());
        if refused {
            info!(%listener, client = %client.addr, error = %e, "client connection refused");
        } else if idle::is_write_timeout(&*e) {
            info!(%listener, client = %client.addr, "client connection closed: it read nothing for timeouts.client");
        } else {
            debug!(%listener, client = %client.addr, error = %e, "client connection ended");
        }
    }
}
