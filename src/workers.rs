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
//!
//! Which thread the kernel wakes for a new connection is luck: 64 keep-alive
//! connections opened at once were split 48/16, 5/59, 63/1 and 64/0 in four
//! runs, and the busier thread then capped the throughput of all of them
//! wherever the other had cores to spare. So an accepted connection goes
//! to the thread with the fewest connections when the accepting thread has
//! more than one above it (HAProxy hands connections between its threads
//! the same way); it is served there for its whole life.

use prometheus::IntGauge;
use std::cell::Cell;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tracing::warn;

/// The serving threads: the one that runs [`crate::server::Server::run`]
/// (index 0) and the extra ones, each with its count of client connections.
#[derive(Debug)]
pub struct Workers {
    threads: Vec<ServingThread>,
}

#[derive(Debug)]
struct ServingThread {
    handle: Handle,
    /// Client connections served on this thread now (`amslb_worker_connections`).
    connections: IntGauge,
}

thread_local! {
    /// This thread's index in [`Workers`]: 0 unless it is an extra thread.
    static THIS_THREAD: Cell<usize> = const { Cell::new(0) };
}

/// Where an accepted connection is served: which thread, and its place in
/// that thread's count (given back when this is dropped).
#[derive(Debug)]
pub struct Seat {
    /// Index of the serving thread.
    thread: usize,
    connections: IntGauge,
}

impl Seat {
    /// The serving thread, when it is not the calling one (the connection
    /// must then move there).
    pub fn elsewhere(&self) -> Option<usize> {
        (self.thread != THIS_THREAD.get()).then_some(self.thread)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.connections.dec();
    }
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
    /// cancellation tokens of what runs on them). Called on the first
    /// serving thread; `gauge(index)` is the connection count of thread
    /// `index` (`amslb_worker_connections`). Every serving thread also hands
    /// its free memory back to the OS now and then
    /// ([`crate::allocator::trim_periodically`]).
    pub fn start(extra: usize, gauge: impl Fn(usize) -> IntGauge) -> Self {
        let mut handles = vec![Handle::current()];
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
                    THIS_THREAD.set(index);
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
        let threads = handles
            .into_iter()
            .enumerate()
            .map(|(index, handle)| ServingThread {
                handle,
                connections: gauge(index),
            })
            .collect();
        let workers = Self { threads };
        for thread in &workers.threads {
            thread.handle.spawn(crate::allocator::trim_periodically());
        }
        workers
    }

    /// Picks the thread for a connection accepted on this one: this thread,
    /// unless another has at least two connections fewer (then the one with
    /// fewest). The count is taken at once, so accepts racing on several
    /// threads see each other's choices.
    pub fn place(&self) -> Seat {
        let here = THIS_THREAD.get().min(self.threads.len() - 1);
        let load = |i: usize| self.threads[i].connections.get();
        let fewest = (0..self.threads.len())
            .min_by_key(|&i| load(i))
            .unwrap_or(here);
        let thread = if load(fewest) + 1 < load(here) {
            fewest
        } else {
            here
        };
        let connections = self.threads[thread].connections.clone();
        connections.inc();
        Seat {
            thread,
            connections,
        }
    }

    /// The event loop of thread `index` (from [`Seat::elsewhere`]).
    pub fn handle(&self, index: usize) -> &Handle {
        &self.threads[index].handle
    }

    /// Runs `serve` on every worker thread with that thread's own copy of
    /// `socket` (the same listening socket: the kernel hands each new
    /// connection to one of the threads waiting on it).
    pub fn serve_copies<F, Fut>(&self, socket: &TcpListener, serve: F)
    where
        F: Fn(TcpListener) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        for thread in &self.threads[1..] {
            let handle = &thread.handle;
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
