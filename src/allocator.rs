//! The process's allocator, mimalloc, and the one thing amslb asks of it
//! beyond allocating: give memory that is no longer used back to the OS
//! soon after a burst, also on a thread that then goes quiet.
//!
//! Why mimalloc: the keep-alive profile spent 6-10 % in glibc's
//! malloc/free, and glibc's per-thread arenas grew and shrank (mprotect
//! calls) under load.
//!
//! Why the trim: mimalloc returns a free page to the OS (`MADV_DONTNEED`)
//! only a second after it fell free (its purge delay, which batches the
//! calls under load), and only when that thread next enters the allocator.
//! A worker whose connections all became idle tunnels does not enter it
//! again, so the memory that opening them took (connection tasks, read
//! buffers, handshake state) stayed resident: 10,000 idle WebSockets held
//! about 2.4 KiB each where 1.6 KiB is what they keep (benches/compare,
//! scenario 4). [`trim_periodically`] runs on every serving thread and hands
//! such pages back every [`TRIM_PERIOD`].
//!
//! This is amslb's one module with `unsafe`: calls into mimalloc's C API.

#![allow(unsafe_code)]

use std::time::Duration;

/// mimalloc for every allocation of the process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often a serving thread hands its free pages back: short enough that
/// memory a burst took is back within a second of the burst, long enough to
/// cost nothing measurable under load (one call per period; under load the
/// pages it frees are soon asked for again, a page fault each).
pub const TRIM_PERIOD: Duration = Duration::from_millis(500);

/// Hands this thread's free allocator pages back to the OS every
/// [`TRIM_PERIOD`], for as long as the thread's event loop runs. Spawn it
/// once on each serving thread ([`crate::workers::Workers::start`]).
pub async fn trim_periodically() {
    let mut tick = tokio::time::interval(TRIM_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        trim_this_thread();
    }
}

/// Frees what this thread's heap holds without use and returns every free
/// page (of any thread) to the OS now, whatever the purge delay.
fn trim_this_thread() {
    // SAFETY: mi_collect takes no pointers and touches only mimalloc's own
    // state, under its own synchronisation; any thread may call it at any
    // time (mimalloc.h: "eagerly free memory").
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process, in bytes (`/proc/self/statm`).
    fn resident_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|field| field.parse().ok())
            .expect("resident pages in statm");
        pages * 4096
    }

    /// After a burst of small allocations is freed, the pages stay resident
    /// (mimalloc's purge delay) until a trim hands them back to the OS.
    #[test]
    fn trim_returns_the_pages_of_a_freed_burst() {
        const BURST: usize = 64 << 20;
        let blocks: Vec<Vec<u8>> = (0..BURST / 1024).map(|_| vec![1u8; 1024]).collect();
        let with_burst = resident_bytes();
        drop(blocks);
        let freed = resident_bytes();
        trim_this_thread();
        let trimmed = resident_bytes();
        assert!(
            freed > trimmed + BURST as u64 / 2,
            "resident with the burst {with_burst}, after freeing it {freed}, after the trim {trimmed}"
        );
    }
}
