//! `dropscan failed …`: list, show, retry (back into the pipeline), purge.
//!
//! A retry cannot race the running agent: the file is moved from the failed folder back into
//! its root's inbox at its original relative path (folders made beneath the inbox without
//! following links; a taken name gets `name (1)`) by a no-replace rename (on another
//! filesystem: a copy, then the failed file removed), its sidecar is removed, and the record is
//! marked `retried` with an audit record. The agent then sees a new drop and takes it through
//! the whole pipeline again, under a new record (after an outage, or once the server takes
//! larger files).
//!
//! The target is recorded in the journal before the move (`commands::moves`). A retry that
//! was interrupted (across filesystems, the copy may then be the only one, hidden in a temp at
//! the top of the inbox, which the agent never claims) is finished by the next run on that
//! entry (`commands::custody`).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use serde_json::json;

use super::custody::{self, TakenOver};
use super::moves::{self, Action, Move};
use super::tools::{self, finish, watch_of};
use crate::cli::FailedAction;
use crate::config::Config;
use crate::fsops::FsError;
use crate::fsops::roots::{RootDirs, Which};
use crate::journal::{FileId, Journal, Outcome};

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
        } => tools::purge(&config.path, Outcome::Failed, &older_than, yes, reason).await,
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
            return ExitCode::from(crate::error::EXIT_USAGE);
        }
    };
    let reason = reason.unwrap_or_else(|| "retry".into());
    let mut code = ExitCode::SUCCESS;
    for id in ids {
        let c = retry_one(&config, &journal, id, &reason).await;
        if c != ExitCode::SUCCESS {
            code = c;
        }
    }
    code
}

/// Moves failed entry `id` back into its inbox at its original relative path (or a free name
/// beside it), then removes its sidecar.
async fn retry_one(config: &Config, journal: &Journal, id: FileId, reason: &str) -> ExitCode {
    let held = match custody::take(
        journal,
        config,
        id,
        Outcome::Failed,
        Action::Retry,
        Some(reason),
    )
    .await
    {
        Ok(h) => h,
        Err(c) => return c,
    };
    let rec = held.record.clone();
    let from = rec.dest.clone();
    let mut detail = json!({ "failed_reason": rec.reason });
    tools::detail_path(&mut detail, "from", from.as_deref());
    let Some(w) = watch_of(config, &rec).cloned() else {
        let e = FsError::NotBeneath {
            path: rec.root.clone(),
        };
        if held.interrupted.is_some() {
            // An interrupted move may have left the only copy in its temp: custody stays.
            eprintln!(
                "refused: entry {id}: {}",
                crate::fsops::names::shown_text(&e.to_string())
            );
            return ExitCode::from(tools::EXIT_REFUSED);
        }
        return finish(journal, id, "retry", "", Some(reason), Err((e, detail))).await;
    };
    let roots = Arc::new(RootDirs::new(&w));
    let mv = Move::retry(&roots);
    match custody::take_over(journal, &roots, &w, &held, Which::Failed).await {
        TakenOver::GoAhead => {}
        TakenOver::Stopped(code) => return code,
        done @ TakenOver::Finished { .. } => {
            return custody::after_take_over(
                journal,
                &done,
                Some(&mv),
                id,
                from.as_deref(),
                Action::Retry,
                Some(reason),
            )
            .await;
        }
    }
    let moved = moves::carry_out(
        journal,
        &roots,
        &w,
        &rec,
        &mv,
        None,
        &tools::unix_user(),
        Some(reason),
    )
    .await;
    let result = tools::moved("retried", id, from.as_deref(), moved, detail);
    moves::conclude(
        journal,
        &roots,
        &held.record,
        Which::Failed,
        Action::Retry,
        Some(reason),
        result,
    )
    .await
}
