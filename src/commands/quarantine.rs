//! `dropscan quarantine …`: list, show, release (a false positive, to the clean folder at its
//! original relative path), restore (out of quarantine to where an analyst wants it), purge.
//!
//! Release and restore place a **verified copy** (the sorter's machinery,
//! `crate::fsops::place::place`, driven by `commands::moves`): the target is chosen and
//! recorded in the journal, the quarantined file is copied to a temp beside the target,
//! fsynced, and its SHA-256 compared with the one the file was quarantined with; only then is
//! the quarantined file removed, the temp renamed into place (never replacing anything), and the
//! sidecar removed. Bytes that changed in quarantine are refused: nothing moves, the refusal is
//! audited, exit 2. Released copies are mode 0644 in folders made beneath the clean folder
//! without following links (a taken name gets `name (1)`); restored copies are mode 0600.
//!
//! A release or restore that was interrupted (killed, Ctrl-C, a power cut) is finished (the file
//! had left quarantine) or undone (it had not) by the next run on that entry, whatever that run
//! asks, before anything else: see `commands::custody`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use serde_json::json;

use super::custody::{self, TakenOver};
use super::moves::{self, Action, Move};
use super::tools::{self, finish, watch_of};
use crate::cli::QuarantineAction;
use crate::fsops::FsError;
use crate::fsops::roots::{RootDirs, Which};
use crate::journal::{Journal, Outcome};

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
        } => tools::purge(&config.path, Outcome::Quarantine, &older_than, yes, reason).await,
    }
}

/// Release (`to` = `None`: the clean folder) or restore (`to`: a path) entry `id`.
async fn relocate(config: &Path, id: i64, to: Option<PathBuf>, reason: String) -> ExitCode {
    let (config, journal) = match tools::open(config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let action = if to.is_some() {
        Action::Restore
    } else {
        Action::Release
    };
    let held = match custody::take(
        &journal,
        &config,
        id,
        Outcome::Quarantine,
        action,
        Some(&reason),
    )
    .await
    {
        Ok(h) => h,
        Err(code) => return code,
    };
    let rec = held.record.clone();
    let from = rec.dest.clone();
    let sha = rec.sha256.map(hex::encode);
    let mut detail = json!({ "sha256": sha, "size": rec.stamp.map(|s| s.size) });
    tools::detail_path(&mut detail, "from", from.as_deref());
    let Some(w) = watch_of(&config, &rec).cloned() else {
        return root_gone(&journal, &held, action, &reason, detail).await;
    };
    let roots = Arc::new(RootDirs::new(&w));
    // A `--to` that cannot be a target (`dir/` that is no folder) is refused below, once an
    // interrupted run on this entry was taken over.
    let mv = match to {
        None => Ok(Move::release(&roots)),
        Some(t) => {
            let abs = std::env::current_dir().map_or(t.clone(), |cwd| cwd.join(&t));
            Move::restore(&abs, &rec)
        }
    };
    let status = action.done_status();
    match custody::take_over(&journal, &roots, &w, &held, Which::Quarantine).await {
        TakenOver::GoAhead => {}
        TakenOver::Stopped(code) => return code,
        done @ TakenOver::Finished { .. } => {
            return custody::after_take_over(
                &journal,
                &done,
                mv.as_ref().ok(),
                id,
                from.as_deref(),
                action,
                Some(&reason),
            )
            .await;
        }
    }
    let mv = match mv {
        Ok(mv) => mv,
        Err(e) => {
            return finish(
                &journal,
                id,
                action.as_str(),
                "",
                Some(&reason),
                Err((e, detail)),
            )
            .await;
        }
    };
    let moved = moves::carry_out(
        &journal,
        &roots,
        &w,
        &rec,
        &mv,
        None,
        &tools::unix_user(),
        Some(&reason),
    )
    .await;
    let result = tools::moved(status, id, from.as_deref(), moved, detail);
    moves::conclude(
        &journal,
        &roots,
        &held.record,
        Which::Quarantine,
        action,
        Some(&reason),
        result,
    )
    .await
}

/// The entry's root is no longer a `[[watch]]` of this configuration: refused, custody kept
/// where an interrupted move may have left the only copy in its temp, else ended and audited.
async fn root_gone(
    journal: &Journal,
    held: &custody::Held,
    action: Action,
    reason: &str,
    detail: serde_json::Value,
) -> ExitCode {
    let (id, root) = (held.record.id, &held.record.root);
    eprintln!(
        "its root {} is no longer a [[watch]] of this configuration",
        crate::fsops::shown(root)
    );
    let e = FsError::NotBeneath { path: root.clone() };
    if held.interrupted.is_some() {
        eprintln!(
            "refused: entry {id}: {}",
            crate::fsops::names::shown_text(&e.to_string())
        );
        return ExitCode::from(tools::EXIT_REFUSED);
    }
    finish(
        journal,
        id,
        action.as_str(),
        "",
        Some(reason),
        Err((e, detail)),
    )
    .await
}
