//! Preflight: the writes `run` needs, tried before anything runs, as the user who runs.
//!
//! `dropscan check --offline` (the unit's `ExecStartPre`), `dropscan run` and a SIGHUP reload
//! call [`check`] once the file is valid. Every problem a restart cannot fix comes back as a
//! [`ConfigError`] naming the key and its line, so that both commands exit 78 with the same
//! message and the unit does not restart in a loop (`RestartPreventExitStatus=`):
//! - a path that exists but is not a folder: `state.dir`, `watch.path`, a destination, a
//!   `staging_dir` outside the inbox; such a `staging_dir` on another filesystem than its inbox;
//! - a folder the running user cannot write. The state folder is created if missing, and a
//!   probe file is created, renamed and removed in it; the journal's files must be writable.
//!   Each destination is created if missing (with the modes `run` gives it: the same code) and
//!   probed the same way. The staging folder is probed when it exists; when it does not, only
//!   the inbox's write permission is asked (`access(W_OK)`), because `run` reads a staging
//!   folder that appears while files are in flight as "the share is mounted again", so the
//!   check must never create one;
//! - an inbox on a filesystem that can move a file neither with `RENAME_NOREPLACE` nor by a
//!   hard link (an SMB client mount, where a claim could replace another file): a probe file is
//!   created in the inbox, closed, moved and removed, also as root ([`FsError::NoSafeMove`]
//!   names the alternative: the agent on the file server);
//! - a read-only filesystem (EROFS) names the systemd drop-in that grants the write
//!   (`ReadWritePaths=`, see the README's "Running it as a service").
//!
//! Notes, not errors (returned for printing):
//! - an inbox that does not exist yet (a share not mounted: `run` waits for it); nothing of its
//!   watch is created then;
//! - an inbox whose filesystem does not answer within [`crate::answer::DEADLINE`] (a share whose
//!   server hangs): nothing of its watch is looked at further, the agent serves the other
//!   watches and waits for it;
//! - whatever an inbox user can plant below an inbox (a folder or file where a destination or
//!   the staging folder should be, one owned by someone else): that is hostile content the agent
//!   deals with at run time, never a reason to keep every watch from starting.
//!
//! Run as root, the check creates nothing (folders made by root would be refused by, or closed
//! to, the service user) and only asks for write permission (EROFS still shows); `check` says
//! so ([`AS_ROOT_NOTE`]).

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::Path;

use rustix::fs::Access;

use crate::answer::Answer;
use crate::config::{Config, ConfigError, WatchConfig};
use crate::fsops::roots::{RootDirs, Which};
use crate::fsops::{self, Dir, FsError};

/// The probe's name while it is created, and after its rename.
const PROBE: &str = ".dropscan-check.probe";
const PROBE_RENAMED: &str = ".dropscan-check.probe-renamed";

/// What `check` prints when run as root.
pub const AS_ROOT_NOTE: &str = "running as root: no folder is created and no write is tried, \
     only permissions asked; run the check as the service user (`sudo -u dropscan dropscan check`) \
     to try the writes the service needs";

/// Tries the writes `run` needs. `Err` for anything a restart cannot fix; `Ok` with notes for
/// what is worth saying but left to the agent.
pub fn check(config: &Config) -> Result<Vec<String>, ConfigError> {
    let mut notes = config.warnings();
    let as_root = rustix::process::geteuid().is_root();
    state_dir(config, as_root)?;
    let inboxes: Vec<_> = config.watches.iter().map(|w| w.path.clone()).collect();
    let answers = crate::answer::look(&inboxes, crate::answer::DEADLINE);
    for ((i, w), answer) in config.watches.iter().enumerate().zip(answers) {
        if answer == Answer::Silent {
            notes.push(format!(
                "watch[{i}]: {} does not answer within {} (a share whose server hangs?): the \
                 agent serves the other watches and waits for it; its folders are checked once it \
                 answers",
                fsops::shown(&w.path),
                humantime::format_duration(crate::answer::DEADLINE)
            ));
            continue;
        }
        watch(config, i, w, as_root, &mut notes)?;
    }
    Ok(notes)
}

/// `state.dir`: a folder, created if missing, where the running user creates and renames
/// files; the journal's own files, when they exist, writable.
fn state_dir(config: &Config, as_root: bool) -> Result<(), ConfigError> {
    let dir = &config.state.dir;
    let fail =
        |what: &str, p: &Path, e: &io::Error| config.error_at("state.dir", cannot(what, p, e));
    not_a_folder(config, "state.dir", dir)?;
    if as_root {
        return writable_or_parent(dir).map_err(|e| fail("write", dir, &e));
    }
    std::fs::create_dir_all(dir).map_err(|e| fail("create", dir, &e))?;
    let d = Dir::open_trusted(dir).map_err(|e| fs_error(config, "state.dir", dir, e))?;
    probe(&d).map_err(|e| fs_error(config, "state.dir", dir, e))?;
    let journal = config.journal_path();
    let mut files = vec![journal.clone(), dir.join(super::lock::LOCK_FILE)];
    for suffix in ["-wal", "-shm"] {
        let mut name = journal.clone().into_os_string();
        name.push(suffix);
        files.push(name.into());
    }
    for f in files.iter().filter(|f| f.exists()) {
        writable(f).map_err(|e| fail("write", f, &e))?;
    }
    Ok(())
}

/// One `[[watch]]`: its inbox, staging folder and destinations.
fn watch(
    config: &Config,
    i: usize,
    w: &WatchConfig,
    as_root: bool,
    notes: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("watch[{i}].{k}");
    let inbox = &w.path;
    not_a_folder(config, &key("path"), inbox)?;
    let beneath = |p: &Path| p.starts_with(inbox);
    for (k, p) in [
        ("clean_dir", &w.clean_dir),
        ("quarantine_dir", &w.quarantine_dir),
        ("failed_dir", &w.failed_dir),
        ("staging_dir", &w.staging_dir),
    ] {
        if !beneath(p) {
            not_a_folder(config, &key(k), p)?;
        }
    }
    if !beneath(&w.staging_dir) && inbox.is_dir() {
        // Claiming is a rename: staging must be on the inbox's filesystem.
        let dev = |p: &Path| std::fs::metadata(existing(p)).map(|m| m.dev()).ok();
        if dev(&w.staging_dir) != dev(inbox) {
            return Err(config.error_at(
                &key("staging_dir"),
                format!(
                    "{} is not on the filesystem of the inbox {}: files are claimed by a rename, which cannot cross filesystems; put it on the inbox's (or remove the key: the default is inside the inbox)",
                    fsops::shown(&w.staging_dir),
                    fsops::shown(inbox)
                ),
            ));
        }
    }
    if !inbox.is_dir() {
        notes.push(format!(
            "watch[{i}]: {} does not exist (yet): the agent waits for it (a share not mounted?); \
             its folders are checked once it exists",
            fsops::shown(inbox)
        ));
        return Ok(());
    }
    // The inbox: files are renamed out of it into staging.
    writable(inbox)
        .map_err(|e| config.error_at(&key("path"), cannot("move files out of it", inbox, &e)))?;
    let roots = RootDirs::new(w);
    // Claims are renames that must never replace a file: refused where the filesystem cannot
    // promise that (an SMB client mount). Tried even as root: the probe file is gone after.
    match roots.get(Which::Inbox, false).and_then(|d| probe(&d)) {
        Err(e @ FsError::NoSafeMove { .. }) => {
            return Err(fs_error(config, &key("path"), inbox, e));
        }
        Err(e) if as_root => notes.push(format!("watch[{i}].path: {e}")),
        Err(e) => return Err(fs_error(config, &key("path"), inbox, e)),
        Ok(()) => {}
    }
    for (k, which) in [
        ("clean_dir", Which::Clean),
        ("quarantine_dir", Which::Quarantine),
        ("failed_dir", Which::Failed),
    ] {
        let p = roots.path(which).to_path_buf();
        let tried = if as_root && beneath(&p) {
            // Only descriptors are used below an inbox (a path may be a user's symlink).
            Ok(())
        } else if as_root {
            writable_or_parent(&p).map_err(|e| FsError::io(&p, "write", e))
        } else {
            roots.get(which, true).and_then(|d| probe(&d))
        };
        match tried {
            Ok(()) => {}
            Err(e) if beneath(&p) && !is_read_only(&e) && !no_safe_move(&e) => notes.push(format!(
                "watch[{i}].{k}: {e} (inside the inbox: the agent deals with it when it starts)"
            )),
            Err(e) => return Err(fs_error(config, &key(k), &p, e)),
        }
    }
    // Staging: probed only where it exists (never created here; see the module docs).
    let staging = roots.path(Which::Staging).to_path_buf();
    let tried = match roots.staging_if_present() {
        Ok(Some(d)) if !as_root => probe(&d),
        Ok(Some(_)) if beneath(&staging) => Ok(()),
        Ok(Some(_)) => writable(&staging).map_err(|e| FsError::io(&staging, "write", e)),
        // Missing below the inbox: made there by `run`, and the inbox is writable (above).
        Ok(None) if beneath(&staging) => Ok(()),
        Ok(None) => {
            let parent = staging.parent().unwrap_or(inbox);
            writable_or_parent(parent)
                .map_err(|e| FsError::io(&staging, "create the staging folder", e))
        }
        Err(e) => Err(e),
    };
    match tried {
        Ok(()) => Ok(()),
        // Below the inbox, anything but a read-only filesystem may be an inbox user's doing
        // (a planted or foreign `.dropscan`): the agent holds that watch alone at run time.
        Err(e) if beneath(&staging) && !is_read_only(&e) && !no_safe_move(&e) => {
            notes.push(format!(
                "watch[{i}]: staging folder: {e} (the agent deals with it when it starts)"
            ));
            Ok(())
        }
        Err(e) => {
            let k = if beneath(&staging) {
                key("path")
            } else {
                key("staging_dir")
            };
            Err(fs_error(config, &k, &staging, e))
        }
    }
}

/// A path that exists and is not a folder (symlinks to folders are the administrator's choice).
fn not_a_folder(config: &Config, key: &str, p: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(p) {
        Ok(m) if !m.is_dir() => {
            let ft = m.file_type();
            let kind = if ft.is_file() {
                "a file"
            } else if ft.is_fifo() || ft.is_socket() || ft.is_block_device() || ft.is_char_device()
            {
                "a special file"
            } else {
                "not a folder"
            };
            Err(config.error_at(
                key,
                format!(
                    "{} is {kind}, not a folder: point the key at a folder (dropscan creates it if missing), or move the file away",
                    fsops::shown(p)
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// Creates a file in `dir`, renames it there and removes it: what claiming and placing do.
fn probe(dir: &Dir) -> Result<(), FsError> {
    let (name, renamed) = (OsStr::new(PROBE), OsStr::new(PROBE_RENAMED));
    // Left over by a check that was killed half-way.
    for n in [name, renamed] {
        dir.unlink(n).ok();
    }
    // Closed before it is renamed: SMB refuses to rename a file held open.
    drop(dir.create_file(name, 0o600)?);
    let moved = fsops::probe_safe_move(dir, name, renamed);
    let left = if moved.is_ok() { renamed } else { name };
    let removed = dir.unlink(left);
    moved.and(removed)
}

/// A filesystem that cannot move files safely: no run could work there.
fn no_safe_move(e: &FsError) -> bool {
    matches!(e, FsError::NoSafeMove { .. })
}

/// `access(W_OK | X_OK)` of an existing path (EROFS on a read-only mount, EACCES without the
/// permission).
fn writable(p: &Path) -> io::Result<()> {
    rustix::fs::access(p, Access::WRITE_OK | Access::EXEC_OK).map_err(io::Error::from)
}

/// [`writable`] of `p`, or of its nearest existing ancestor when it is missing (where it would
/// be created).
fn writable_or_parent(p: &Path) -> io::Result<()> {
    writable(existing(p))
}

/// `p`, or its nearest ancestor that exists.
fn existing(p: &Path) -> &Path {
    let mut cur = p;
    while !cur.exists() {
        match cur.parent() {
            Some(parent) => cur = parent,
            None => break,
        }
    }
    cur
}

fn os_error(e: &FsError) -> Option<i32> {
    match e {
        FsError::Io { source, .. } | FsError::NoSpace { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

fn is_read_only(e: &FsError) -> bool {
    os_error(e) == Some(libc::EROFS)
}

/// The error for `key` from a filesystem failure at `p`: with the drop-in on EROFS, the user
/// on EACCES.
fn fs_error(config: &Config, key: &str, p: &Path, e: FsError) -> ConfigError {
    let message = match &e {
        FsError::Io { source, about, .. } => cannot(about, p, source),
        FsError::NoSpace { source, .. } => cannot("write", p, source),
        other => other.to_string(),
    };
    config.error_at(key, message)
}

/// "`p`: cannot `what` as the user dropscan (uid 998): `e`", and what to do about it: the
/// drop-in on EROFS, the owner on EACCES, both for the folder that exists (where a missing
/// one would be created).
fn cannot(what: &str, p: &Path, e: &io::Error) -> String {
    let uid = rustix::process::geteuid().as_raw();
    let name = user_name(uid);
    let user = name
        .as_ref()
        .map_or_else(|| format!("uid {uid}"), |n| format!("{n} (uid {uid})"));
    let folder = existing(p);
    let advice = match e.raw_os_error() {
        Some(libc::EROFS) => format!(
            "; the filesystem is read-only to dropscan. Under systemd the unit's \
             ProtectSystem=strict makes everything read-only but its ReadWritePaths: add the \
             folder with a drop-in, `systemctl edit dropscan.service` → [Service] \
             ReadWritePaths={} (README, \"Running it as a service\", step 4); otherwise mount it \
             read-write",
            fsops::shown(folder)
        ),
        Some(libc::EACCES | libc::EPERM) => format!(
            "; give {} to that user or let it write there (e.g. `chown {} {}`)",
            fsops::shown(folder),
            name.unwrap_or_else(|| uid.to_string()),
            fsops::shown(folder)
        ),
        _ => String::new(),
    };
    format!(
        "{}: cannot {what} as the user {user}: {e}{advice}",
        fsops::shown(p)
    )
}

/// The name of `uid` in `/etc/passwd`, if any.
fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_filesystem_names_the_systemd_drop_in() {
        let e = io::Error::from_raw_os_error(libc::EROFS);
        let m = cannot("create folder", Path::new("/nonexistent/drop/clean"), &e);
        assert!(
            m.contains("ReadWritePaths=/ "),
            "the folder that exists: {m}"
        );
        assert!(m.contains("systemctl edit dropscan.service"), "{m}");
        let e = io::Error::from_raw_os_error(libc::EACCES);
        let m = cannot("create", Path::new("/srv/x"), &e);
        assert!(m.contains("chown"), "{m}");
        assert!(!m.contains("ReadWritePaths"), "{m}");
    }
}
