//! Group commit for folder fsyncs: callers that ask for a folder to be made durable while an
//! fsync of that folder is already running share the next one instead of each issuing their
//! own.
//!
//! Correctness: a caller returns only after an fsync that *started after its call* completed
//! (an fsync already running when it arrived may have missed its change). Each folder (by
//! device and inode) has one gate; at most one fsync runs per folder at a time, and everyone
//! who arrived during it is served by the single fsync that follows. Under load, N placements
//! into one folder cost about two fsyncs instead of N, and a lone caller pays exactly one.

use std::collections::HashMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};

/// Gates kept before unused ones are dropped.
const KEEP: usize = 256;

#[derive(Default)]
struct Gate {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// fsyncs started so far.
    started: u64,
    /// The last fsync finished (its number).
    completed: u64,
    /// The number of the last fsync that failed (0: none yet) and its error.
    last_failed: u64,
    failure: Option<io::ErrorKind>,
    running: bool,
}

impl State {
    /// What a caller waiting for fsync number `target` is told, once one that started after its
    /// call has completed: an error if any fsync numbered `target` or later failed. (Telling it
    /// only how the latest one ended would hide a failure of `target` followed by a success:
    /// Linux reports a writeback error once, and the entries may be lost.)
    fn answer(&self, target: u64) -> Option<io::Result<()>> {
        if self.completed < target {
            return None;
        }
        Some(match self.failure {
            Some(kind) if self.last_failed >= target => {
                Err(io::Error::new(kind, "folder fsync failed"))
            }
            _ => Ok(()),
        })
    }
}

/// One gate per folder, by (device, inode).
type Gates = Mutex<HashMap<(u64, u64), Arc<Gate>>>;

fn gates() -> &'static Gates {
    static GATES: OnceLock<Gates> = OnceLock::new();
    GATES.get_or_init(Mutex::default)
}

fn gate_for(key: (u64, u64)) -> Arc<Gate> {
    let mut map = gates().lock().unwrap_or_else(PoisonError::into_inner);
    if map.len() > KEEP {
        map.retain(|_, g| Arc::strong_count(g) > 1);
    }
    Arc::clone(map.entry(key).or_default())
}

/// Makes the folder behind `fd` durable, sharing an fsync with concurrent callers for the same
/// folder (`dev`, `ino`). `sync` is the fsync itself (a parameter so that tests can count).
pub(crate) fn sync_shared(
    fd: BorrowedFd<'_>,
    dev: u64,
    ino: u64,
    sync: impl Fn(BorrowedFd<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let gate = gate_for((dev, ino));
    let mut st = gate.state.lock().unwrap_or_else(PoisonError::into_inner);
    // The first fsync to start from now on covers this caller.
    let target = st.started + 1;
    loop {
        if let Some(answer) = st.answer(target) {
            return answer;
        }
        if !st.running {
            st.running = true;
            st.started += 1;
            let mine = st.started;
            drop(st);
            let outcome = sync(fd);
            st = gate.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.running = false;
            st.completed = mine;
            if let Err(e) = &outcome {
                st.last_failed = mine;
                st.failure = Some(e.kind());
            }
            gate.done.notify_all();
            // Our own fsync: hand back its exact error.
            return outcome;
        }
        st = gate.done.wait(st).unwrap_or_else(PoisonError::into_inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn concurrent_folder_fsyncs_share_one_and_none_returns_before_a_fresh_one() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::open(dir.path()).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let in_sync = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                let (calls, in_sync, f) = (Arc::clone(&calls), Arc::clone(&in_sync), &f);
                s.spawn(move || {
                    for _ in 0..20 {
                        let before = calls.load(Ordering::SeqCst);
                        sync_shared(f.as_fd(), 1, 2, |_| {
                            assert_eq!(in_sync.fetch_add(1, Ordering::SeqCst), 0, "one at a time");
                            calls.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            in_sync.fetch_sub(1, Ordering::SeqCst);
                            Ok(())
                        })
                        .unwrap();
                        // At least one fsync started after our call and finished.
                        assert!(calls.load(Ordering::SeqCst) > before);
                    }
                });
            }
        });
        assert!(calls.load(Ordering::SeqCst) <= 160);
    }

    #[test]
    fn a_waiter_is_told_of_a_failed_fsync_even_when_a_later_one_succeeded() {
        // Caller waits for fsync 2; fsync 2 failed, fsync 3 succeeded before it woke.
        let st = State {
            started: 3,
            completed: 3,
            last_failed: 2,
            failure: Some(io::ErrorKind::Other),
            running: false,
        };
        assert!(st.answer(2).is_some_and(|r| r.is_err()));
        // A failure before its target does not concern it.
        assert!(st.answer(3).is_some_and(|r| r.is_ok()));
        // Not served yet.
        assert!(st.answer(4).is_none());
    }

    #[test]
    fn a_failed_shared_fsync_is_an_error_for_everyone_it_served() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::open(dir.path()).unwrap();
        let r = sync_shared(f.as_fd(), 3, 4, |_| {
            Err(io::Error::from(io::ErrorKind::Other))
        });
        assert!(r.is_err());
        // The next caller gets a fresh fsync, not the old failure.
        assert!(sync_shared(f.as_fd(), 3, 4, |_| Ok(())).is_ok());
    }
}
