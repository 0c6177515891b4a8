//! The async runtime every command runs on: tokio's multi-threaded scheduler with a bounded
//! blocking pool. It owns no pipeline logic; `main.rs` builds it and hands it the command.
//!
//! Why the blocking pool is bounded: filesystem work (stat, hash, copy, fsync, rename) runs on
//! it, one task per call. tokio starts a thread whenever a task finds none idle, and keeps an idle
//! thread for 10 s; but idle threads are woken in turn (the one waiting longest first), so under a
//! steady trickle of calls each is reused before its 10 s run out and none ever ends. The pool
//! therefore only grows, to the highest concurrency a burst ever reached (a SIGHUP reload, a slow
//! fsync), up to tokio's default of 512, and each thread keeps its stack and a 1 MiB read buffer
//! (`fsops`). The soak scenario saw 24 -> 46 threads and 36 -> 72 MiB (issue 20).
//!
//! Why idle threads end after a fraction of a second ([`BLOCKING_KEEP_ALIVE`]): with the bound
//! alone the pool still grew within an agent's life to the largest burst it had seen (soak: 22 ->
//! 30 threads in one life), since the turn-taking above reuses each idle thread every
//! `threads / calls per second` seconds: at the soak's 60-80 calls a second, 30 threads are each
//! woken every half second, well within 10 s. With a keep-alive of 100 ms the pool shrinks back to
//! about `calls per second × 0.1` threads plus what is running, so a burst's threads end soon
//! after it, and the count follows the load instead of its record. Under a steady high load
//! (`many`: thousands of calls a second) every thread is reused well within it and none ends.

use std::time::Duration;

use tokio::runtime::{Builder, Runtime};

/// Threads for blocking work at most. Above the pipeline's own concurrency (sort 16, hash 8,
/// hooks 4 per hook, a settle stat and a claim batch), so that no stage waits on another's
/// queued calls for long; beyond it, calls queue (upload reads, metrics renders). Nothing that
/// waits on another stage may hold one of these threads: the inbox listings, which wait for room
/// in settle's channel, run on threads of their own (`watch::root`).
pub const MAX_BLOCKING_THREADS: usize = 64;

/// How long a blocking thread waits idle for more work before it ends (tokio's default: 10 s).
/// See the module docs; a thread costs about 50 µs to start again.
pub const BLOCKING_KEEP_ALIVE: Duration = Duration::from_millis(100);

/// The runtime `dropscan` runs on. Caps the allocator's arenas first (`cap_arenas`).
pub fn build() -> std::io::Result<Runtime> {
    cap_arenas();
    builder().build()
}

/// Caps glibc's malloc arenas at the number of cores (at least 2), unless the environment sets
/// it (`MALLOC_ARENA_MAX`, or `arena_max` in `GLIBC_TUNABLES`).
///
/// Why (issue 20, the hour-long soak): glibc gives a thread that finds the arenas busy a new one,
/// up to 8 per core, and the blocking pool's threads come and go ([`BLOCKING_KEEP_ALIVE`]), so
/// within minutes all 16 arenas of a 2-core machine exist, each keeping the free memory around
/// what is still in use (which [`trim_freed_memory`] cannot hand back when pages are only partly
/// free). Measured side by side on the same soak (same binary, same minutes): 16 arenas held
/// 19.2 MiB taken from the system, 13.7 MiB of it free around 5.4 MiB in use; 2 arenas held 8.6
/// MiB, 3.3 MiB free around 5.3 MiB in use. Each thread keeps a cache of its own in front of its
/// arena (glibc's tcache), so fewer arenas mostly cost nothing on small blocks.
fn cap_arenas() {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
    if set("MALLOC_ARENA_MAX") || tuned {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    set_arena_max(cores.clamp(2, 64));
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(n: usize) {
    let n = libc::c_int::try_from(n).unwrap_or(2);
    // SAFETY: mallopt takes two integers and only sets an allocator parameter under its lock;
    // it is safe to call from any thread at any time (arenas made before keep existing).
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, n);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_n: usize) {}

fn builder() -> Builder {
    let mut builder = Builder::new_multi_thread();
    builder
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE);
    builder
}

/// Runs `work` on a thread of its own named `name`; the receiver gets its result (closed
/// without one if it panicked). For blocking work that may wait on another stage or on a share
/// whose server hangs: on the bounded blocking pool it could hold every thread (listings
/// waiting for settle, which needs a pool thread), and on an async worker it would stall the
/// other watches and keep a shutdown from ending. The caller decides how long to wait.
pub fn on_own_thread<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<tokio::sync::oneshot::Receiver<T>> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            done_tx.send(work()).ok();
        })?;
    Ok(done_rx)
}

/// How often the allocator is asked to hand freed memory back to the system.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Asks glibc's allocator every 10 s (`TRIM_EVERY`) to hand the memory it holds free back to the
/// system, until `shutdown`.
///
/// Why (issue 20): glibc gives threads up to 8 arenas per core, and a thread's arena keeps what
/// it freed unless the free part is at its top. With up to 64 blocking threads and the tokio
/// workers, `many` measured 32 MB in use against 169 MB taken from the system, three arenas each
/// holding 29 MB free around a few KB in use. `malloc_trim` releases those free pages in every
/// arena; it takes each arena's lock for the walk (milliseconds), off the async threads.
pub async fn trim_freed_memory(shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                tokio::task::spawn_blocking(trim).await.ok();
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim takes no pointer and only rearranges the allocator's own free lists
    // under its locks; it is safe to call from any thread at any time.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Condvar, Mutex};

    use super::*;

    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
    }

    type Gate = Arc<(Mutex<bool>, Condvar)>;

    /// `n` blocking calls on `rt`, each waiting until [`open`] opens the returned gate.
    fn blocked_calls(rt: &Runtime, n: usize) -> (Gate, Vec<tokio::task::JoinHandle<()>>) {
        let gate: Gate = Arc::new((Mutex::new(false), Condvar::new()));
        let tasks = (0..n)
            .map(|_| {
                let gate = Arc::clone(&gate);
                rt.spawn_blocking(move || {
                    let (open, cv) = &*gate;
                    let mut open = open.lock().expect("gate");
                    while !*open {
                        open = cv.wait(open).expect("gate");
                    }
                })
            })
            .collect();
        (gate, tasks)
    }

    /// Lets every call of [`blocked_calls`] end.
    fn open(gate: &Gate) {
        let (open, cv) = &**gate;
        *open.lock().expect("gate") = true;
        cv.notify_all();
    }

    /// Regression (issue 20): the soak's thread count grew with every burst of blocking calls.
    #[test]
    fn a_burst_of_blocking_calls_does_not_grow_the_pool_past_its_bound() {
        let rt = build().expect("runtime");
        let before = threads();
        let burst = 4 * MAX_BLOCKING_THREADS;
        let (gate, tasks) = blocked_calls(&rt, burst);
        // tokio starts a blocking thread inside `spawn_blocking`, so they all exist by now
        // (other tests may start a few threads of their own meanwhile: hence the margin).
        let grown = threads().saturating_sub(before);
        open(&gate);
        rt.block_on(async {
            for t in tasks {
                t.await.expect("task");
            }
        });
        assert!(
            grown < 2 * MAX_BLOCKING_THREADS,
            "{burst} blocked calls started {grown} threads (bound {MAX_BLOCKING_THREADS})"
        );
    }

    /// The runtime's threads named `name`.
    fn named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task").map_or(0, |tasks| {
            tasks
                .filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
                })
                .count()
        })
    }

    /// Regression (issue 20): the soak's thread count grew within an agent's life to the
    /// largest burst of blocking calls seen, because a steady trickle of calls woke every idle
    /// thread in turn before its keep-alive ran out. After a burst, under a trickle, the pool
    /// must shrink back. (No timing is asserted: a slower trickle only lets threads end sooner.)
    #[test]
    fn the_blocking_pool_shrinks_back_after_a_burst_under_a_steady_trickle() {
        const NAME: &str = "ds-shrink-test";
        let rt = builder().thread_name(NAME).build().expect("runtime");
        let burst = 32;
        let (gate, tasks) = blocked_calls(&rt, burst);
        // A new thread names itself once it runs: give them a moment.
        let mut peak = named(NAME);
        for _ in 0..1000 {
            if peak >= burst {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            peak = named(NAME);
        }
        open(&gate);
        let left = rt.block_on(async {
            for t in tasks {
                t.await.expect("task");
            }
            // One call every 50 ms for up to 30 s: with tokio's 10 s keep-alive each of the 32
            // idle threads is woken every 1.6 s and none ever ends.
            let mut left = named(NAME);
            for _ in 0..600 {
                tokio::task::spawn_blocking(|| ()).await.expect("call");
                tokio::time::sleep(Duration::from_millis(50)).await;
                left = named(NAME);
                if left <= 8 {
                    break;
                }
            }
            left
        });
        assert!(peak >= burst, "the burst started {peak} threads");
        assert!(
            left <= 8,
            "{left} of the burst's {peak} threads still there under a trickle of calls"
        );
    }
}
