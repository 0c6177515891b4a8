//! A tool's move of a kept file (`quarantine release`, `quarantine restore`, `failed retry`):
//! the target chosen and recorded in the journal before anything moves, then
//! [`crate::fsops::place::place`], and the end of custody that says where the file went. The
//! entry's custody, and finishing a move that was interrupted, are [`super::custody`]'s.
//!
//! A quarantined file leaves as a copy verified against its SHA-256 (0644 in clean, 0600 where
//! an analyst restores it); a failed file, which may never have been hashed and may be
//! hard-linked, leaves by rename (a copy across filesystems), as it is. From the moment the
//! target is recorded a whole copy exists at every instant: the kept file, then the temp
//! `<destination>/.<instance>.<id>.dropscan-partial`, then the target. A move that fails past
//! its point of no return (the kept file gone) keeps custody `busy` with its plan.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use serde_json::json;

use super::tools::{EXIT_REFUSED, blocking, entry, finish, journal_failed, locate};
use crate::config::WatchConfig;
use crate::error::EXIT_UNAVAILABLE;
use crate::fsops::names::{TempOf, content_token, copy_temp_name, sidecar_name, staged_token};
use crate::fsops::place::{Release, free_name, place};
use crate::fsops::roots::{RootDirs, Which};
use crate::fsops::{Dir, FsError, split_rel};
use crate::journal::{CustodyPlan, FileRecord, Journal, now_ms};

/// Targets tried when a chosen name is taken meanwhile.
const MAX_TARGETS: usize = 16;

/// What a tool does to a kept entry: its name in the audit and the custody status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// `quarantine release`.
    Release,
    /// `quarantine restore`.
    Restore,
    /// `failed retry`.
    Retry,
    /// `quarantine purge`, `failed purge`.
    Purge,
}

impl Action {
    /// Its name (`release`, …), as audited.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Action::Release => "release",
            Action::Restore => "restore",
            Action::Retry => "retry",
            Action::Purge => "purge",
        }
    }

    /// The action named `s` in the journal.
    pub(super) fn parse(s: &str) -> Option<Action> {
        [
            Action::Release,
            Action::Restore,
            Action::Retry,
            Action::Purge,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }

    /// The custody status once it is done (where the file went).
    pub(super) fn done_status(self) -> &'static str {
        match self {
            Action::Release => "released",
            Action::Restore => "restored",
            Action::Retry => "retried",
            Action::Purge => "purged",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A move of a kept file (see the module docs): which action, and where to.
#[derive(Debug, Clone)]
pub(super) struct Move {
    /// Release, restore or retry.
    pub action: Action,
    /// The folder the file goes to (absolute; a copy's temp is made at its top).
    pub to_root: PathBuf,
    /// The target the analyst gave (`restore --to`), relative to `to_root`; `None`: a free name
    /// at the file's original relative path.
    pub fixed: Option<PathBuf>,
}

impl Move {
    /// A release: to the clean folder at the original relative path.
    pub(super) fn release(roots: &RootDirs) -> Move {
        Move {
            action: Action::Release,
            to_root: roots.path(Which::Clean).to_path_buf(),
            fixed: None,
        }
    }

    /// A restore to `to` (absolute): into it if it is a folder (under the file's name), else
    /// as that file. A `to` ending in `/` names a folder, as it does for `cp`: one that is not
    /// an existing folder is refused, never taken as a file name.
    pub(super) fn restore(to: &Path, rec: &FileRecord) -> Result<Move, FsError> {
        use std::os::unix::ffi::OsStrExt as _;
        let name = |p: &Path| PathBuf::from(p.file_name().unwrap_or_default());
        let (to_root, fixed) = if to.is_dir() {
            (to.to_path_buf(), name(&rec.rel_path))
        } else if to.as_os_str().as_bytes().ends_with(b"/") {
            return Err(FsError::NotAFolder {
                path: to.to_path_buf(),
            });
        } else {
            (
                to.parent().unwrap_or(Path::new("/")).to_path_buf(),
                name(to),
            )
        };
        Ok(Move {
            action: Action::Restore,
            to_root,
            fixed: Some(fixed),
        })
    }

    /// A retry: back into the inbox at the original relative path.
    pub(super) fn retry(roots: &RootDirs) -> Move {
        Move {
            action: Action::Retry,
            to_root: roots.path(Which::Inbox).to_path_buf(),
            fixed: None,
        }
    }

    /// The move a recorded plan describes.
    pub(super) fn of_plan(plan: &CustodyPlan) -> Option<Move> {
        let action = Action::parse(&plan.action)?;
        let fixed = match action {
            Action::Release | Action::Retry => None,
            Action::Restore => Some(plan.target.clone()),
            Action::Purge => return None,
        };
        Some(Move {
            action,
            to_root: plan.to_root.clone(),
            fixed,
        })
    }

    /// Where the file is kept.
    fn from(&self) -> Which {
        if self.action == Action::Retry {
            Which::Failed
        } else {
            Which::Quarantine
        }
    }

    /// A quarantined file leaves as a copy verified against its SHA-256 (0644 in clean, 0600
    /// where an analyst restores it); a failed file, which may never have been hashed and may
    /// be hard-linked, leaves by rename (a copy across filesystems), as it is.
    fn verified(&self) -> bool {
        self.from() == Which::Quarantine
    }

    fn file_mode(&self) -> u32 {
        if self.action == Action::Restore {
            0o600
        } else {
            0o644
        }
    }
}

/// The temp name of a tool's copy of `rec`'s file, at the top of the folder it goes to: named
/// after the content it must hold, so that one found without its journal is known for whole or
/// partial by hashing it (a file with no SHA-256 is only ever moved by rename into the inbox).
pub(super) fn temp_of(w: &WatchConfig, rec: &FileRecord) -> std::ffi::OsString {
    let token = rec
        .sha256
        .as_ref()
        .map_or_else(|| staged_token(&rec.staged), content_token);
    copy_temp_name(
        &crate::root::instance_of(w),
        TempOf::Tool,
        &token,
        &rec.rel_path,
    )
}

/// The folder a move goes to: the configured clean folder or inbox as the agent opens it, or
/// (a restore, or a folder the configuration named before) the path as given.
pub(super) fn open_to_root(roots: &RootDirs, to_root: &Path) -> Result<Dir, FsError> {
    for (which, create) in [(Which::Clean, true), (Which::Inbox, false)] {
        if roots.path(which) == to_root {
            return roots.get(which, create)?.try_clone();
        }
    }
    Dir::open_trusted(to_root)
}

/// Whether the kept file of `rec` is still in its folder (a folder that is gone holds nothing).
pub(super) fn still_kept(roots: &RootDirs, from: Which, rec: &FileRecord) -> Result<bool, FsError> {
    match locate(roots, from, rec) {
        Ok((dir, name)) => dir.exists(&name),
        Err(FsError::Vanished { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the kept file is also the planned target (the same inode): a move by link and
/// unlink, where the filesystem has no no-replace rename, interrupted between the two. It has
/// moved then, and finishing the move drops the kept name.
pub(super) fn linked_to_target(
    roots: &RootDirs,
    from: Which,
    rec: &FileRecord,
    plan: Option<CustodyPlan>,
) -> Result<bool, FsError> {
    let Some(plan) = plan else {
        return Ok(false);
    };
    let (dir, name) = locate(roots, from, rec)?;
    let kept = dir.stamp(&name)?;
    let Ok((parent, tname)) = split_rel(&plan.target) else {
        return Ok(false);
    };
    let Ok(tdir) = Dir::open_trusted(&plan.to_root).and_then(|d| d.open_dir(parent)) else {
        return Ok(false);
    };
    Ok(matches!(tdir.stamp(tname), Ok(t) if (t.dev, t.ino) == (kept.dev, kept.ino)))
}

/// Chooses the target of one attempt: `recorded` (taking over) while its folder is there,
/// else the fixed one, else a free name. A new move of a file that is gone (and left no temp of
/// ours to finish) is refused here, before anything is recorded.
fn choose(
    roots: &RootDirs,
    w: &WatchConfig,
    rec: &FileRecord,
    mv: &Move,
    recorded: Option<PathBuf>,
) -> Result<(Dir, PathBuf), FsError> {
    let (src, name) = locate(roots, mv.from(), rec)?;
    let dest = open_to_root(roots, &mv.to_root)?;
    if recorded.is_none() && !src.exists(&name)? && !dest.exists(&temp_of(w, rec))? {
        return Err(FsError::Vanished {
            path: src.path().join(&name),
        });
    }
    if mv.verified() && rec.sha256.is_none() {
        return Err(FsError::Changed {
            path: src.path().join(&name),
            detail: "its record holds no SHA-256 to check it against".into(),
        });
    }
    let folder_there = |t: &Path| t.parent().is_none_or(|p| dest.open_dir(p).is_ok());
    let target = match (recorded, &mv.fixed) {
        (Some(t), _) if folder_there(&t) => t,
        (_, Some(fixed)) => fixed.clone(),
        _ => free_name(&dest, &rec.rel_path, 0o755)?,
    };
    Ok((dest, target))
}

/// One attempt of the move to `target`; then the kept file's sidecar goes. Returns where the
/// file went.
fn carry(
    roots: &RootDirs,
    w: &WatchConfig,
    rec: &FileRecord,
    mv: &Move,
    dest: &Dir,
    target: &Path,
) -> Result<PathBuf, FsError> {
    let (src, name) = locate(roots, mv.from(), rec)?;
    // A copy is checked against the SHA-256 alone: the kept file may be any inode that holds
    // those bytes.
    let now = match src.stamp(&name) {
        Ok(s) => Some(s.stamp()),
        Err(FsError::Vanished { .. }) => None,
        Err(e) => return Err(e),
    };
    let verified = mv.verified();
    place(&Release {
        staging: &src,
        staged_name: &name,
        hashed: now.filter(|_| verified),
        sha256: rec.sha256.filter(|_| verified),
        dest_root: dest,
        target,
        file_mode: mv.file_mode(),
        copy: verified,
        clean: verified,
        temp_name: &temp_of(w, rec),
        own_copy: None,
    })?;
    match src.unlink(&sidecar_name(&name)) {
        Ok(()) | Err(FsError::Vanished { .. }) => {}
        Err(e) => tracing::warn!(error = %e, "cannot remove the sidecar"),
    }
    src.fsync().ok();
    Ok(dest.path().join(target))
}

/// Runs `mv` on the held entry: chooses the target (`recorded` first, when finishing an
/// interrupted move), records it in the journal, then moves; a name taken meanwhile is chosen
/// again (never the analyst's). Returns where the file went.
#[allow(clippy::too_many_arguments)]
pub(super) async fn carry_out(
    journal: &Journal,
    roots: &Arc<RootDirs>,
    w: &WatchConfig,
    rec: &FileRecord,
    mv: &Move,
    mut recorded: Option<PathBuf>,
    user: &str,
    reason: Option<&str>,
) -> Result<PathBuf, FsError> {
    for _ in 0..MAX_TARGETS {
        let (dest, target) = {
            let (roots, w, rec, mv) = (roots.clone(), w.clone(), rec.clone(), mv.clone());
            let recorded = recorded.take();
            blocking(move || choose(&roots, &w, &rec, &mv, recorded)).await?
        };
        let plan = CustodyPlan {
            action: mv.action.as_str().to_string(),
            to_root: mv.to_root.clone(),
            target: target.clone(),
            user: user.to_string(),
            reason: reason.map(str::to_string),
            at_ms: now_ms(),
        };
        // Durable before the move: a run that takes over finishes this one.
        if let Err(e) = journal.plan_custody(rec.id, plan).await {
            return Err(FsError::Io {
                path: journal.path().to_path_buf(),
                about: "record the move in the journal",
                source: std::io::Error::other(e.to_string()),
            });
        }
        let moved = {
            let (roots, w, rec, mv) = (roots.clone(), w.clone(), rec.clone(), mv.clone());
            blocking(move || carry(&roots, &w, &rec, &mv, &dest, &target)).await
        };
        match moved {
            Err(e) if (e.is_already_exists() || e.is_folder_gone()) && mv.fixed.is_none() => {}
            other => return other,
        }
    }
    Err(FsError::AlreadyExists {
        path: mv.to_root.join(&rec.rel_path),
    })
}

/// Ends a move: done → custody ends with `done_status`, audited as `action`; refused with the
/// kept file still in its folder → custody ends, the file kept, audited as `action-refused`;
/// refused past the point of no return → custody stays (the temp may be the only copy: the
/// agent leaves it alone, and the next run finishes the move), audited as `action-refused`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn conclude(
    journal: &Journal,
    roots: &Arc<RootDirs>,
    rec: &FileRecord,
    from: Which,
    action: Action,
    reason: Option<&str>,
    result: Result<serde_json::Value, (FsError, serde_json::Value)>,
) -> ExitCode {
    let id = rec.id;
    let (done, action) = (action.done_status(), action.as_str());
    let Err((err, mut detail)) = result else {
        return finish(journal, id, action, done, reason, result).await;
    };
    let kept = {
        let (roots, rec) = (roots.clone(), rec.clone());
        blocking(move || still_kept(&roots, from, &rec)).await
    };
    if matches!(kept, Ok(true)) {
        return finish(journal, id, action, done, reason, Err((err, detail))).await;
    }
    eprintln!(
        "refused: entry {id}: {}\n  the file has left its folder and waits in a temp copy \
         beside its target: run the same command again to finish",
        crate::fsops::names::shown_text(&err.to_string())
    );
    detail["error"] = json!(err.to_string());
    detail["unfinished"] = json!(true);
    let e = entry(&format!("{action}-refused"), id, reason, detail);
    if let Err(e) = journal.audit(e).await {
        return journal_failed(&e);
    }
    ExitCode::from(match err {
        FsError::Io { .. } | FsError::NoSpace { .. } => EXIT_UNAVAILABLE,
        _ => EXIT_REFUSED,
    })
}

pub(super) fn fs_exit(e: &FsError) -> ExitCode {
    ExitCode::from(match e {
        FsError::Io { .. } | FsError::NoSpace { .. } => EXIT_UNAVAILABLE,
        _ => EXIT_REFUSED,
    })
}
