//! Thread-per-core serving: extra threads, each with a single-threaded event
//! loop, accepting on a shared copy of every TCP listening socket.
//!
//! Why: a proxied request touches two hyper connection tasks (the client's
//! and the node's) that wake each other for every request. On a work-stealing
//! runtime those wakeups often cross threads (a futex and a context switch
//! each); profiling the keep-alive benchmark showed 2.5× HAProxy's context
//! switches per request. With one event loop per thread, a connection that a
//! thread accepts is served, and its node connections are made, on that same
//! thread, so the wakeups stay local.

use tokio::net::TcpListener;
use tracing::warn;

/// How many serving threads `workers` (from `[global] workers`) asks for.
pub fn count(workers: usize) -> usize {
    if workers > 0 {
        return workers;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Starts `extra` threads, each running `serve` on its own current-thread
/// runtime with its own copy of `sockets` (same listening sockets, so the
/// kernel spreads new connections over every thread accepting on them).
/// The threads live as long as the process: shutdown is driven by the
/// runtime's cancellation tokens, which `serve` obeys.
pub fn spawn<F, Fut>(extra: usize, sockets: &[&TcpListener], serve: F)
where
    F: Fn(Vec<TcpListener>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    for index in 1..=extra {
        let copies: Vec<std::net::TcpListener> = sockets
            .iter()
            .filter_map(|socket| match socket2::SockRef::from(*socket).try_clone() {
                Ok(copy) => Some(copy.into()),
                Err(e) => {
                    warn!(error = %e, "cannot share a listening socket with a worker thread");
                    None
                }
            })
            .collect();
        if copies.len() != sockets.len() {
            return;
        }
        let serve = serve.clone();
        let started = std::thread::Builder::new()
            .name(format!("amslb-worker-{index}"))
            .spawn(move || run_worker(copies, serve));
        if let Err(e) = started {
            warn!(error = %e, "cannot start worker thread; serving with fewer threads");
            return;
        }
    }
}

fn run_worker<F, Fut>(copies: Vec<std::net::TcpListener>, serve: F)
where
    F: Fn(Vec<TcpListener>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            warn!(error = %e, "cannot start a worker event loop");
            return;
        }
    };
    runtime.block_on(async move {
        let listeners: Result<Vec<TcpListener>, _> =
            copies.into_iter().map(TcpListener::from_std).collect();
        match listeners {
            Ok(listeners) => serve(listeners).await,
            Err(e) => {
                warn!(error = %e, "worker thread cannot use the listening sockets");
                return;
            }
        }
        // Keep driving the connections this thread serves until the process
        // exits; the main thread decides when that is.
        std::future::pending::<()>().await;
    });
}
