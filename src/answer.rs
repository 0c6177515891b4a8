//! Whether a folder answers: a bounded look at a path that may be on a share whose server hangs.
//!
//! A `stat` of a path on a hard NFS mount, or on a FUSE or SMB share whose server stopped
//! answering, waits for as long as the server does: possibly for ever. Start-up and its checks
//! look at every watch's inbox, so one such share used to hold the whole agent before it logged a
//! line. [`look`] asks each path on a thread of its own and waits at most a deadline; a path that
//! has not answered by then is [`Answer::Silent`], and its thread is left waiting for the server.
//! At most one such thread waits per path: asking again while one still waits answers
//! [`Answer::Silent`] at once, so a share that hangs for hours costs one thread, not one per look.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a look waits for a folder's filesystem to answer.
pub const DEADLINE: Duration = Duration::from_secs(3);

/// What a look at one path found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A folder (followed through links, as the configuration names it).
    Folder,
    /// Nothing there, or not a folder.
    Missing,
    /// Its filesystem did not answer within the deadline.
    Silent,
}

/// Paths whose look still waits for an answer.
static WAITING: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

fn with_waiting<R>(f: impl FnOnce(&mut HashSet<PathBuf>) -> R) -> R {
    let mut guard = WAITING.lock().unwrap_or_else(PoisonError::into_inner);
    f(guard.get_or_insert_with(HashSet::new))
}

/// Looks at every path in `paths`, all at once, each waiting at most `deadline`; the answers are
/// in the order of `paths`.
pub fn look(paths: &[PathBuf], deadline: Duration) -> Vec<Answer> {
    ask(paths, deadline, |p| {
        if p.is_dir() {
            Answer::Folder
        } else {
            Answer::Missing
        }
    })
    .into_iter()
    .map(|a| a.unwrap_or(Answer::Silent))
    .collect()
}

/// Runs `f` on every path in `paths`, each on a thread of its own, and waits at most `deadline`
/// for all of them; `None` for a path whose call did not return in time (or that an earlier
/// call still waits on). In the order of `paths`.
pub fn ask<T: Send + 'static>(
    paths: &[PathBuf],
    deadline: Duration,
    f: fn(&Path) -> T,
) -> Vec<Option<T>> {
    let (tx, rx) = mpsc::channel::<(usize, T)>();
    let mut answers: Vec<Option<T>> = paths.iter().map(|_| None).collect();
    let mut asked = 0usize;
    for (i, path) in paths.iter().enumerate() {
        if !with_waiting(|w| w.insert(path.clone())) {
            continue; // an earlier call still waits on it
        }
        let (tx, owned) = (tx.clone(), path.clone());
        let spawned = std::thread::Builder::new()
            .name("dropscan-look".into())
            .spawn(move || {
                let answer = f(&owned);
                with_waiting(|w| w.remove(&owned));
                tx.send((i, answer)).ok();
            });
        match spawned {
            Ok(_) => asked += 1,
            Err(e) => {
                // No thread to spare: ask here, unbounded, rather than give no answer.
                tracing::debug!(error = %e, "cannot start a thread to look at a folder");
                with_waiting(|w| w.remove(path));
                if let Some(a) = answers.get_mut(i) {
                    *a = Some(f(path));
                }
            }
        }
    }
    drop(tx);
    let end = Instant::now() + deadline;
    for _ in 0..asked {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, answer)) => {
                if let Some(a) = answers.get_mut(i) {
                    *a = Some(answer);
                }
            }
            Err(_) => break,
        }
    }
    answers
}

/// [`look`] at one path.
pub fn look_one(path: &Path, deadline: Duration) -> Answer {
    look(&[path.to_path_buf()], deadline)
        .first()
        .copied()
        .unwrap_or(Answer::Silent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_a_file_and_nothing_answer_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let paths = [dir.path().to_path_buf(), file, dir.path().join("none")];
        assert_eq!(
            look(&paths, Duration::from_secs(30)),
            [Answer::Folder, Answer::Missing, Answer::Missing]
        );
    }

    #[test]
    fn a_path_still_looked_at_is_silent_without_a_second_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        with_waiting(|w| w.insert(path.clone()));
        assert_eq!(look_one(&path, Duration::from_secs(30)), Answer::Silent);
        with_waiting(|w| w.remove(&path));
        assert_eq!(look_one(&path, Duration::from_secs(30)), Answer::Folder);
    }
}
