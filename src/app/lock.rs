//! One agent per state folder: `run` and `scan` hold an exclusive `flock` on
//! `<state dir>/dropscan.lock` for the life of the process. The kernel releases it when the
//! process ends, crash included, so a stale lock file never blocks a restart. A second agent on
//! the same state folder refuses at once, naming the PID written in the file by the holder.
//!
//! The read-only and journal-editing tools (`status`, `quarantine`, `failed`) do not take it:
//! the journal serialises their writes with the agent's.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};

/// The lock file's name in the state folder.
pub const LOCK_FILE: &str = "dropscan.lock";

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "another dropscan{} already runs on the state folder {} (lock {}); stop it first, or give this one its own [state] dir",
        .pid.map(|p| format!(" (PID {p})")).unwrap_or_default(),
        .dir.display(),
        .lock.display()
    )]
    Held {
        /// The state folder.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// The holder's PID, when it wrote one.
        pid: Option<u32>,
    },
    /// The lock file cannot be created or locked.
    #[error("cannot lock {}: {source}", .lock.display())]
    Io {
        /// The lock file.
        lock: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or ending the process) releases it.
#[derive(Debug)]
pub struct InstanceLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl InstanceLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes the single-instance lock of `state_dir` (created if missing), without waiting.
pub fn lock_state_dir(state_dir: &Path) -> Result<InstanceLock, LockError> {
    let lock = state_dir.join(LOCK_FILE);
    let io = |source: std::io::Error| LockError::Io {
        lock: lock.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(io)?;
    // Never through a symlink planted at the lock's name.
    let fd = rustix::fs::open(
        &lock,
        OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .map_err(|e| io(e.into()))?;
    let mut file = std::fs::File::from(fd);
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut text = String::new();
            file.read_to_string(&mut text).ok();
            return Err(LockError::Held {
                dir: state_dir.to_path_buf(),
                lock,
                pid: text.trim().parse().ok(),
            });
        }
        Err(e) => return Err(io(e.into())),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(InstanceLock {
        _file: file,
        path: lock,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_state_folder_is_refused_naming_the_pid() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let first = lock_state_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let second = lock_state_dir(dir.path()).unwrap_err();
        let text = second.to_string();
        assert!(
            text.contains(&format!("PID {}", std::process::id())),
            "{text}"
        );
        drop(first);
        assert!(lock_state_dir(dir.path()).is_ok(), "released on drop");
    }
}
