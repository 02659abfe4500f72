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
use tokio::runtime::Handle;
use tracing::warn;

/// The extra serving threads; the thread that runs [`crate::server::Server::run`]
/// is the first worker and is not counted here.
#[derive(Debug, Default)]
pub struct Workers {
    handles: Vec<Handle>,
}

/// How many serving threads `workers` (from `[global] workers`) asks for.
pub fn count(workers: usize) -> usize {
    if workers > 0 {
        return workers;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Workers {
    /// Starts `extra` threads, each driving its own current-thread runtime
    /// for as long as the process lives (shutdown is driven by the
    /// cancellation tokens of what runs on them).
    pub fn start(extra: usize) -> Self {
        let mut handles = Vec::new();
        for index in 1..=extra {
            let (sender, receiver) = std::sync::mpsc::channel();
            let started = std::thread::Builder::new()
                .name(format!("amslb-worker-{index}"))
                .spawn(move || {
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
                    let _ = sender.send(runtime.handle().clone());
                    runtime.block_on(std::future::pending::<()>());
                });
            if let Err(e) = started {
                warn!(error = %e, "cannot start worker thread; serving with fewer threads");
                break;
            }
            match receiver.recv() {
                Ok(handle) => handles.push(handle),
                Err(_) => break,
            }
        }
        Self { handles }
    }

    /// Runs `serve` on every worker thread with that thread's own copy of
    /// `socket` (the same listening socket: the kernel hands each new
    /// connection to one of the threads waiting on it).
    pub fn serve_copies<F, Fut>(&self, socket: &TcpListener, serve: F)
    where
        F: Fn(TcpListener) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        for handle in &self.handles {
            let copy: std::net::TcpListener = match socket2::SockRef::from(socket).try_clone() {
                Ok(copy) => copy.into(),
                Err(e) => {
                    warn!(error = %e, "cannot share a listening socket with a worker thread");
                    return;
                }
            };
            // Registering the socket must happen on the thread that polls it.
            let _guard = handle.enter();
            match TcpListener::from_std(copy) {
                Ok(listener) => {
                    handle.spawn(serve(listener));
                }
                Err(e) => warn!(error = %e, "worker thread cannot use a listening socket"),
            }
        }
    }
}
