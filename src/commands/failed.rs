//! `dropscan failed …`: list, show, retry (back into the pipeline), purge.
//!
//! A retry cannot race the running agent: the file is moved from the failed folder back into
//! its root's inbox at its original relative path (folders made beneath the inbox without
//! following links; a taken name gets `name (1)`) by a no-replace rename (on another
//! filesystem: a copy, then the failed file removed), its sidecar is removed, and the record is
//! marked `retried` with an audit record. The agent then sees a new drop and takes it through
//! the whole pipeline again, under a new record (after an outage, or once the server takes
//! larger files).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::json;

use super::tools::{self, blocking, finish, locate, take, watch_of};
use crate::cli::FailedAction;
use crate::config::WatchConfig;
use crate::fsops::FsError;
use crate::fsops::names::{TempOf, copy_temp_name, sidecar_name};
use crate::fsops::place::{Release, free_name, place};
use crate::fsops::roots::{RootDirs, Which};
use crate::journal::{FileId, FileRecord, Outcome};

/// Runs one `failed` subcommand.
pub async fn run(action: FailedAction) -> ExitCode {
    match action {
        FailedAction::List { config, json, all } => {
            tools::list(&config.path, Outcome::Failed, json, all).await
        }
        FailedAction::Show { config, id, json } => {
            tools::show(&config.path, Outcome::Failed, id, json).await
        }
        FailedAction::Retry {
            config,
            id,
            all,
            reason,
        } => retry(&config.path, id, all, reason).await,
        FailedAction::Purge {
            config,
            older_than,
            yes,
            reason,
        } => tools::purge(&config.path, Outcome::Failed, older_than, yes, reason).await,
    }
}

async fn retry(config: &Path, id: Option<FileId>, all: bool, reason: Option<String>) -> ExitCode {
    let (config, journal) = match tools::open(config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let ids: Vec<FileId> = match (id, all) {
        (Some(id), _) => vec![id],
        (None, true) => match journal.kept(Outcome::Failed, false).await {
            Ok(k) => k.iter().map(|k| k.record.id).collect(),
            Err(e) => return tools::journal_failed(&e),
        },
        (None, false) => {
            eprintln!("give an entry id, or --all");
            return ExitCode::from(crate::error::EXIT_CONFIG);
        }
    };
    let reason = reason.unwrap_or_else(|| "retry".into());
    let mut code = ExitCode::SUCCESS;
    for id in ids {
        let rec = match take(&journal, id, Outcome::Failed, "retry", Some(&reason)).await {
            Ok(r) => r,
            Err(c) => {
                code = c;
                continue;
            }
        };
        let from = rec.dest.clone();
        let mut detail = json!({ "failed_reason": rec.reason });
        tools::detail_path(&mut detail, "from", from.as_deref());
        let Some(w) = watch_of(&config, &rec).cloned() else {
            let e = FsError::NotBeneath {
                path: rec.root.clone(),
            };
            code = finish(&journal, id, "retry", "", Some(&reason), Err((e, detail))).await;
            continue;
        };
        let moved = blocking(move || back_to_inbox(&w, &rec)).await;
        let result = tools::moved("retried", id, from.as_deref(), moved, detail);
        let c = finish(&journal, id, "retry", "retried", Some(&reason), result).await;
        if c != ExitCode::SUCCESS {
            code = c;
        }
    }
    code
}

/// Moves the failed file of `rec` back into its inbox at its original relative path (or a free
/// name beside it), then removes its sidecar. Returns where it went.
fn back_to_inbox(w: &WatchConfig, rec: &FileRecord) -> Result<PathBuf, FsError> {
    let roots = RootDirs::new(w);
    let (fdir, name) = locate(&roots, Which::Failed, rec)?;
    fdir.stamp(&name)?;
    let inbox = roots.get(Which::Inbox, false)?;
    let temp = copy_temp_name(
        &crate::context::instance_of(w),
        TempOf::Tool,
        &rec.staged,
        &rec.rel_path,
    );
    for _ in 0..16 {
        let target = free_name(&inbox, &rec.rel_path, 0o755)?;
        let placed = place(&Release {
            staging: &fdir,
            staged_name: &name,
            hashed: None,
            sha256: None,
            dest_root: &inbox,
            target: &target,
            file_mode: 0o644,
            copy: false,
            clean: false,
            temp_name: &temp,
            own_copy: None,
        });
        match placed {
            Ok(_) => {
                match fdir.unlink(&sidecar_name(&name)) {
                    Ok(()) | Err(FsError::Vanished { .. }) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot remove the sidecar"),
                }
                fdir.fsync().ok();
                return Ok(inbox.path().join(target));
            }
            Err(e) if e.is_already_exists() => {}
            Err(e) => return Err(e),
        }
    }
    Err(FsError::AlreadyExists {
        path: inbox.path().join(&rec.rel_path),
    })
}
