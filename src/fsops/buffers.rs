//! The read buffers of hashing and copying ([`BUF`] bytes each), shared by every thread and
//! kept for reuse up to a bound.
//!
//! Bounded by design (issue 20): at most [`KEPT`] idle buffers are kept, whatever the number of
//! threads. They used to be one per thread, kept for the thread's life: the blocking pool has
//! up to `runtime::MAX_BLOCKING_THREADS` (64) threads and any of them may hash a file, so up to
//! 64 MiB stayed resident for a handful of concurrent copies. In use at once there are as many
//! buffers as concurrent hashes and copies (claim hashes 8 at a time, sort places 16); one
//! taken beyond the kept ones is allocated for the call and freed after it. Reusing one spares
//! small files the allocation, which cost more than hashing them.

use std::sync::{Mutex, PoisonError};

/// Read buffer for hashing and copying.
pub(crate) const BUF: usize = 1 << 20;

/// Idle buffers kept for reuse at most: claim's 8 concurrent hashes and sort's 16 placements.
pub(crate) const KEPT: usize = 24;

static IDLE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn idle() -> std::sync::MutexGuard<'static, Vec<Vec<u8>>> {
    IDLE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `f` with a read buffer of [`BUF`] bytes: a kept one when there is one, else a new one;
/// afterwards it is kept if fewer than [`KEPT`] are (a call that panics drops it).
pub(crate) fn with_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    let taken = idle().pop();
    let mut buf = taken.unwrap_or_else(|| vec![0u8; BUF]);
    let out = f(&mut buf);
    let mut idle = idle();
    if idle.len() < KEPT {
        idle.push(buf);
    }
    out
}

/// Idle buffers kept now.
#[cfg(test)]
pub(crate) fn kept() -> usize {
    idle().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 20): every thread that ever hashed a file kept a megabyte for its
    /// whole life (64 blocking threads: 64 MiB).
    #[test]
    fn read_buffers_kept_are_bounded_whatever_the_number_of_threads() {
        let threads = 2 * KEPT;
        let barrier = std::sync::Barrier::new(threads);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    with_buffer(|buf| {
                        assert_eq!(buf.len(), BUF);
                        // Every thread holds its buffer at the same time.
                        barrier.wait();
                    });
                });
            }
        });
        assert!(kept() <= KEPT, "{} buffers kept (bound {KEPT})", kept());
    }
}
