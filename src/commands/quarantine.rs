//! `dropscan quarantine …`: list, show, release (a false positive, to the clean folder at its
//! original relative path), restore (out of quarantine to where an analyst wants it), purge.
//!
//! Release and restore place a **verified copy** (the sorter's machinery,
//! `crate::fsops::place::place`): the quarantined file is copied to a temp beside the target,
//! fsynced, and its SHA-256 compared with the one the file was quarantined with; only a match is
//! renamed into place (never replacing anything), and only then is the quarantined file (and its
//! sidecar) removed. Bytes that changed in quarantine are refused: nothing moves, the refusal is
//! audited, exit 2. Released copies are mode 0644 in folders made beneath the clean folder
//! without following links (a taken name gets `name (1)`); restored copies are mode 0600.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::json;

use super::tools::{self, blocking, finish, locate, take, watch_of};
use crate::cli::QuarantineAction;
use crate::config::WatchConfig;
use crate::fsops::names::{TempOf, copy_temp_name, sidecar_name};
use crate::fsops::place::{Release, free_name, place};
use crate::fsops::roots::{RootDirs, Which};
use crate::fsops::{Dir, FsError};
use crate::journal::{FileRecord, Outcome};

/// Runs one `quarantine` subcommand.
pub async fn run(action: QuarantineAction) -> ExitCode {
    match action {
        QuarantineAction::List { config, json, all } => {
            tools::list(&config.path, Outcome::Quarantine, json, all).await
        }
        QuarantineAction::Show { config, id, json } => {
            tools::show(&config.path, Outcome::Quarantine, id, json).await
        }
        QuarantineAction::Release { config, id, reason } => {
            relocate(&config.path, id, None, reason).await
        }
        QuarantineAction::Restore {
            config,
            id,
            to,
            reason,
        } => relocate(&config.path, id, Some(to), reason).await,
        QuarantineAction::Purge {
            config,
            older_than,
            yes,
            reason,
        } => tools::purge(&config.path, Outcome::Quarantine, older_than, yes, reason).await,
    }
}

/// Release (`to` = `None`: the clean folder) or restore (`to`: a path) entry `id`.
async fn relocate(config: &Path, id: i64, to: Option<PathBuf>, reason: String) -> ExitCode {
    let (config, journal) = match tools::open(config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let action = if to.is_some() { "restore" } else { "release" };
    let rec = match take(&journal, id, Outcome::Quarantine, action, Some(&reason)).await {
        Ok(r) => r,
        Err(code) => return code,
    };
    let from = rec.dest.clone();
    let sha = rec.sha256.map(hex::encode);
    let mut detail = json!({ "sha256": sha, "size": rec.stamp.map(|s| s.size) });
    tools::detail_path(&mut detail, "from", from.as_deref());
    let Some(w) = watch_of(&config, &rec).cloned() else {
        let e = FsError::NotBeneath {
            path: rec.root.clone(),
        };
        eprintln!(
            "its root {} is no longer a [[watch]] of this configuration",
            crate::fsops::shown(&rec.root)
        );
        return finish(&journal, id, action, "", Some(&reason), Err((e, detail))).await;
    };
    let to_abs = to.map(|t| std::env::current_dir().map_or(t.clone(), |cwd| cwd.join(&t)));
    let moved = blocking(move || copy_out(&w, &rec, to_abs.as_deref())).await;
    let status = if action == "release" {
        "released"
    } else {
        "restored"
    };
    let result = tools::moved(status, id, from.as_deref(), moved, detail);
    finish(&journal, id, action, status, Some(&reason), result).await
}

/// Copies the quarantined file of `rec` out (verified against its SHA-256), then removes it and
/// its sidecar from quarantine. Returns where it went.
fn copy_out(w: &WatchConfig, rec: &FileRecord, to: Option<&Path>) -> Result<PathBuf, FsError> {
    let roots = RootDirs::new(w);
    let (qdir, name) = locate(&roots, Which::Quarantine, rec)?;
    // Gone from quarantine: a release killed after removing it left the verified copy in its
    // temp, which `place` finishes (or says the file is gone).
    let now = match qdir.stamp(&name) {
        Ok(s) => Some(s.stamp()),
        Err(FsError::Vanished { .. }) => None,
        Err(e) => return Err(e),
    };
    let Some(sha256) = rec.sha256 else {
        return Err(FsError::Changed {
            path: qdir.path().join(&name),
            detail: "its record holds no SHA-256 to check it against".into(),
        });
    };
    let temp = copy_temp_name(
        &crate::context::instance_of(w),
        TempOf::Tool,
        &rec.staged,
        &rec.rel_path,
    );
    let (dest_root, fixed, mode): (Dir, Option<PathBuf>, u32) = match to {
        None => (roots.get(Which::Clean, true)?.try_clone()?, None, 0o644),
        Some(p) if p.is_dir() => (
            Dir::open_trusted(p)?,
            Some(PathBuf::from(
                rec.rel_path.file_name().unwrap_or(name.as_os_str()),
            )),
            0o600,
        ),
        Some(p) => {
            let parent = p.parent().unwrap_or(Path::new("/"));
            let file = p.file_name().ok_or_else(|| FsError::NotBeneath {
                path: p.to_path_buf(),
            })?;
            (Dir::open_trusted(parent)?, Some(PathBuf::from(file)), 0o600)
        }
    };
    // Gone, and no verified copy of ours to finish: nothing to release (an existing target is
    // never taken for a copy that was made).
    if now.is_none() && !dest_root.exists(&temp)? {
        return Err(FsError::Vanished {
            path: qdir.path().join(&name),
        });
    }
    for _ in 0..16 {
        let target = match &fixed {
            Some(t) => t.clone(),
            None => free_name(&dest_root, &rec.rel_path, 0o755)?,
        };
        let placed = place(&Release {
            staging: &qdir,
            staged_name: &name,
            hashed: now,
            sha256: Some(sha256),
            dest_root: &dest_root,
            target: &target,
            file_mode: mode,
            copy: true,
            clean: true,
            temp_name: &temp,
            own_copy: None,
        });
        match placed {
            Ok(_) => {
                // The verified copy is in place and the quarantined file gone: its sidecar too.
                match qdir.unlink(&sidecar_name(&name)) {
                    Ok(()) | Err(FsError::Vanished { .. }) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot remove the sidecar"),
                }
                qdir.fsync().ok();
                return Ok(dest_root.path().join(target));
            }
            Err(e) if e.is_already_exists() && fixed.is_none() => {}
            Err(e) => return Err(e),
        }
    }
    Err(FsError::AlreadyExists {
        path: dest_root.path().join(&rec.rel_path),
    })
}
