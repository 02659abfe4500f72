//! The listener registry: bound sockets, their accept loops registered by
//! (listener name, address) in [`Runtime::accept_loops`], and handing each
//! accepted connection to the layer its listener's protocol names (HTTP,
//! HTTPS, the L4 relay). The server starts the loops of the initial config,
//! a reload starts and stops loops through the same functions.

use crate::config::Protocol;
use crate::config::rules::in_any;
use crate::http::{self, headers::ClientInfo};
use crate::l4::tcp::TcpProxy;
use crate::listener::{bind_tcp, tune_accepted};
use crate::metrics::ListenerMetrics;
use crate::proxy_protocol;
use crate::runtime::Runtime;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{info, warn};

/// An address that could not be bound (in use, not local, no permission).
#[derive(Debug, thiserror::Error)]
#[error("listener {listener:?}: cannot bind {addr}: {source}")]
pub struct BindError {
    /// Listener name.
    pub listener: String,
    /// The address.
    pub addr: SocketAddr,
    /// The OS error.
    pub source: std::io::Error,
}

/// A bound socket waiting for its accept loop.
#[derive(Debug)]
pub struct BoundListener {
    /// Listener name.
    pub name: Arc<str>,
    /// The address as configured (a `:0` port stays 0 here), the key reload diffs on.
    pub addr: SocketAddr,
    /// The listening socket.
    pub socket: TcpListener,
    /// The relay of a `tcp`/`tls` listener (RTMP, RTMPS).
    pub l4: Option<Arc<TcpProxy>>,
}

/// Binds one address of listener `name`.
pub fn bind_listener(
    name: Arc<str>,
    addr: SocketAddr,
    backlog: u32,
) -> Result<BoundListener, BindError> {
    let socket = bind_tcp(addr, backlog).map_err(|source| BindError {
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
pub fn spawn_accept_loop(runtime: &Arc<Runtime>, bound: BoundListener) {
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
        crate::listener::Owner::Listener,
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
    // One wait for the stop, kept across accepts: a new one per accept
    // would register with the token (a lock) and leave it again each time.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            () = &mut stopped => return,
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
        // The listener's handles, found once per accept loop: a lookup per
        // connection would take the registry's lock, shared by every thread.
        let listener = metrics.clone();
        let open = metrics.connection_opened();
        let l4 = bound.l4.clone();
        // Served on this thread unless another has fewer connections
        // (without workers, as in tests driving one accept loop, always here).
        let workers = runtime.workers.get();
        let seat = workers.map(crate::workers::Workers::place);
        let elsewhere = seat.as_ref().and_then(crate::workers::Seat::elsewhere);
        let (Some(workers), Some(thread)) = (workers, elsewhere) else {
            runtime.tasks.spawn(async move {
                let _held = (permit, open, seat);
                handle_stream(runtime2, listener, l4, stream, peer).await;
            });
            continue;
        };
        // Served on another thread: its event loop must own the socket, so
        // the socket leaves this one's (2 epoll_ctl calls, only on a move).
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                warn!(listener = %bound.name, client = %peer, error = %e, "cannot hand a connection to another thread");
                continue;
            }
        };
        let moved = runtime.tasks.track_future(async move {
            let _held = (permit, open, seat);
            match TcpStream::from_std(stream) {
                Ok(stream) => handle_stream(runtime2, listener, l4, stream, peer).await,
                Err(e) => {
                    warn!(client = %peer, error = %e, "cannot serve a handed-over connection")
                }
            }
        });
        workers.handle(thread).spawn(moved);
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
    metrics: Arc<ListenerMetrics>,
    l4: Option<Arc<TcpProxy>>,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    tune_accepted(&stream);
    let listener = metrics.name();
    let config = runtime.config();
    let Some(settings) = config.listeners.iter().find(|l| *l.name == **listener) else {
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
    // Each protocol's serving future is boxed: the task of every connection
    // would otherwise be sized for the largest (TLS, ~10 KB), and spawning
    // and ending a task copies its whole future.
    match settings.protocol {
        Protocol::Http => {
            Box::pin(http::serve_connection(
                runtime.clone(),
                metrics,
                stream,
                client,
            ))
            .await;
        }
        Protocol::Tcp | Protocol::Tls => {
            if let Some(l4) = l4 {
                // Relays survive the shutdown grace period (a publisher keeps
                // streaming while in-flight work drains), then are cut.
                Box::pin(l4.handle(stream, client.addr, runtime.hard_stop.cancelled())).await;
            }
        }
        Protocol::Https => {
            if let Some(tls) = runtime.tls() {
                let serve =
                    http::serve_tls_connection(runtime.clone(), tls, metrics, stream, client);
                Box::pin(serve).await;
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
