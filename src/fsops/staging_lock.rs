//! One agent per staging folder: an exclusive `flock` on the folder's lock file, held for the
//! life of the agent that uses it.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex, PoisonError};

use super::{Dir, FsError};

/// Name of the lock file in a staging folder.
pub const STAGING_LOCK: &str = ".lock";

/// An exclusive `flock` on a staging folder's [`STAGING_LOCK`], held for the life of the agent
/// that uses the folder (the kernel drops it when the process ends, crash included). Two agents
/// on one host configured with one `sensor_instance_id` (a test configuration run beside the
/// service, with its own state folder) would take each other's staged files: the second one is
/// refused, naming the first. Shared within a process and kept across SIGHUP reloads (the new
/// agent generation takes the lock the previous one held, without a moment in between).
#[derive(Debug, Clone)]
pub struct StagingLock {
    _file: Arc<LockFile>,
    /// The staging folder's (dev, ino) when locked.
    pub(super) folder: (u64, u64),
}

/// A lock file's (dev, ino), its staging folder's, and the open lock.
type HeldLock = ((u64, u64), (u64, u64), Arc<LockFile>);

/// An open lock file that lets go of its `flock` when the last hold on it in this process goes,
/// not when the open file is closed for good: a child forked meanwhile by anything in the
/// process holds a copy of the descriptor until its `exec`, and the lock belongs to the open
/// file both share, so a restart at once in this process found its own staging folder "in use".
#[derive(Debug)]
struct LockFile(std::fs::File);

impl Drop for LockFile {
    fn drop(&mut self) {
        // Nothing to do if it fails: the close that follows lets go once no copy is left.
        rustix::fs::flock(&self.0, rustix::fs::FlockOperation::Unlock).ok();
    }
}

/// The staging locks this process holds: kept from one agent generation to the next (a SIGHUP
/// reload must never let go of a staging folder, even for a moment), until
/// [`release_staging_locks`].
static HELD: Mutex<Vec<HeldLock>> = Mutex::new(Vec::new());

/// Lets go of the locks of these staging folders (by their (dev, ino)): an agent that stops for
/// good (not replaced by a reload) releases its own.
pub fn release_staging_locks(folders: &[(u64, u64)]) {
    HELD.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|(_, folder, _)| !folders.contains(folder));
}

/// How long stopping waits for [`off_thread`]'s work.
const LET_GO_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `let_go` (work on the staging locks: a `stat` of each staging folder, a `close` of each
/// lock file) on a thread of its own, and waits for it at most `LET_GO_WAIT` (2 s). On a share whose
/// server hangs, both wait for the server, for ever on a hard NFS mount: done on the async
/// threads, they kept a stopping agent from ever exiting (SIGTERM then ends only in systemd's
/// SIGKILL). What is still waiting after that is left to finish on its own; the kernel lets go
/// of the locks when the process ends.
pub async fn off_thread(let_go: impl FnOnce() + Send + 'static) {
    let done_rx = match crate::runtime::on_own_thread("dropscan-unlock", let_go) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a thread to let go of the staging locks; they are let go when the process ends");
            return;
        }
    };
    if tokio::time::timeout(LET_GO_WAIT, done_rx).await.is_err() {
        tracing::warn!(
            "a staging folder does not answer (a share whose server hangs?): its lock is let go \
             when the process ends"
        );
    }
}

/// Lets go of every staging lock but those of these folders (the staging folders of the
/// configuration a reload is about to run): a watch removed, or given another staging folder,
/// is free for another agent at once.
pub fn keep_only_staging_locks(folders: &[(u64, u64)]) {
    HELD.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|(_, folder, _)| folders.contains(folder));
}

/// Takes the staging folder's lock; see [`StagingLock`].
pub fn lock_staging(staging: &Dir) -> Result<StagingLock, FsError> {
    use rustix::fs::{Mode, OFlags};
    let path = staging.path().join(STAGING_LOCK);
    let io = |about, e: rustix::io::Errno| {
        FsError::io(
            &path,
            about,
            std::io::Error::from_raw_os_error(e.raw_os_error()),
        )
    };
    let folder = staging.identity()?;
    let fd = rustix::fs::openat(
        staging.fd(),
        STAGING_LOCK,
        OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| io("open the lock", e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| io("stat the lock", e))?;
    if !rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() {
        return Err(FsError::NotRegular {
            path,
            kind: super::kind_of_mode(st.st_mode),
        });
    }
    let id = (st.st_dev, st.st_ino);
    let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, _, file)) = held.iter().find(|(k, _, _)| *k == id) {
        return Ok(StagingLock {
            _file: Arc::clone(file),
            folder,
        });
    }
    let mut file = std::fs::File::from(fd);
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut text = String::new();
            Read::by_ref(&mut file)
                .take(4096)
                .read_to_string(&mut text)
                .ok();
            return Err(FsError::StagingInUse {
                staging: staging.path().to_path_buf(),
                holder: text.lines().collect::<Vec<_>>().join(", "),
            });
        }
        Err(e) if super::place::no_flock_here(e) => {
            tracing::debug!(staging = %super::shown(staging.path()), "no flock on this filesystem: the staging folder's owner marker alone keeps agents apart");
        }
        Err(e) => return Err(io("lock", e)),
    }
    let me = format!(
        "pid={} host={} cwd={}\n",
        std::process::id(),
        rustix::system::uname().nodename().to_string_lossy(),
        std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    );
    if file.set_len(0).is_ok() {
        file.write_all(me.as_bytes()).ok();
    }
    let file = Arc::new(LockFile(file));
    held.push((id, folder, Arc::clone(&file)));
    Ok(StagingLock {
        _file: file,
        folder,
    })
}
