//! What the quarantine and failed tools share: opening the journal beside a running agent,
//! who is running the tool (for the audit), printing kept files, ending custody after an
//! action, and `purge`.
//!
//! Printing: names and journal texts are escaped on the terminal (`fsops::shown`: an inbox
//! writer chose them); `--json` keeps paths exact (`fsops::names::insert_json`).
//!
//! The tools never take the agent's single-instance lock: the journal (SQLite in WAL mode) is
//! the single source of truth, and every action takes custody of its entry before it touches
//! the file (an `flock` held for the tool's life, then the journal's custody; see
//! `commands::custody`), so two tools, or a tool and the agent, never work on one file at once,
//! and a tool that was interrupted is taken over by the next run at once. Run them as the
//! agent's user (e.g. `sudo -u dropscan dropscan quarantine list`): the journal and the folders
//! are its own.
//!
//! Exit codes of the tools: 0 done; 2 refused (no such entry, no longer kept, another tool is
//! working on it, the bytes changed since they were quarantined, the target exists, the file is
//! missing); 69 the journal or a folder failed; 64 usage error; 78 configuration error.
//! `purge` without `--yes` is a dry run (it lists what would go) and exits 0.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::custody::TakenOver;
use super::moves::Action;
use crate::cli::Age;
use crate::config::{Config, WatchConfig};
use crate::error::EXIT_UNAVAILABLE;
use crate::fsops::names::insert_json;
use crate::fsops::roots::{RootDirs, Which};
use crate::fsops::{Dir, FsError, shown, split_rel};
use crate::journal::{
    AuditEntry, FileId, FileRecord, Journal, JournalError, Kept, Outcome, ScanVerdict, now_ms,
};

/// Exit code of a refused action (see the module docs).
pub const EXIT_REFUSED: u8 = 2;

/// Loads the config and opens its journal (which must exist: the agent has run).
pub(super) fn open(path: &Path) -> Result<(Config, Journal), ExitCode> {
    let config = super::load(path)?;
    let journal_path = config.journal_path();
    if !journal_path.exists() {
        eprintln!(
            "no journal at {}: the agent has not run yet, so nothing is kept",
            journal_path.display()
        );
        return Err(ExitCode::from(EXIT_REFUSED));
    }
    match Journal::open(&journal_path) {
        Ok(j) => Ok((config, j)),
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(EXIT_UNAVAILABLE))
        }
    }
}

/// The Unix user running this process, as `name (uid N)`, with the user behind `sudo`.
pub fn unix_user() -> String {
    let uid = rustix::process::getuid().as_raw();
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|t| {
        t.lines().find_map(|l| {
            let mut f = l.split(':');
            let (name, _, id) = (f.next()?, f.next()?, f.next()?);
            (id == uid.to_string()).then(|| name.to_string())
        })
    });
    let mut who = match name {
        Some(n) => format!("{n} (uid {uid})"),
        None => format!("uid {uid}"),
    };
    if let Ok(by) = std::env::var("SUDO_USER") {
        if !by.is_empty() {
            who.push_str(&format!(" via sudo by {by}"));
        }
    }
    who
}

/// An audit record of `action` on `id`, by this process's user, now.
pub(super) fn entry(
    action: &str,
    id: FileId,
    reason: Option<&str>,
    detail: serde_json::Value,
) -> AuditEntry {
    AuditEntry {
        id: 0,
        at_ms: now_ms(),
        user: unix_user(),
        action: action.to_string(),
        file_id: Some(id),
        reason: reason.map(str::to_string),
        detail,
    }
}

/// RFC 3339 of a journal time.
pub(super) fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A kept file as JSON (`list --json`, `show --json`). Paths are exact: a name that is not
/// UTF-8 gets a `<key>_hex` beside its text ([`crate::fsops::names::insert_json`]).
pub fn kept_json(k: &Kept) -> serde_json::Value {
    let r = &k.record;
    let mut v = json!({
        "id": r.id,
        "claimed_at": rfc3339(r.claimed_at_ms),
        "placed_at": rfc3339(r.updated_at_ms),
        "current": null,
        "size": r.stamp.map(|s| s.size),
        "sha256": r.sha256.map(hex::encode),
        "verdict": r.verdict,
        "reason": r.reason,
        "scan_ids": r.scan_ids,
        "status": k.status.clone().unwrap_or_else(|| "kept".into()),
        "audit": k.audit.iter().map(|a| json!({
            "id": a.id,
            "at": rfc3339(a.at_ms),
            "user": a.user,
            "action": a.action,
            "reason": a.reason,
            "detail": a.detail,
        })).collect::<Vec<_>>(),
    });
    if let Some(obj) = v.as_object_mut() {
        insert_json(obj, "root", &r.root);
        insert_json(obj, "path", &r.rel_path);
        if let Some(d) = &r.dest {
            insert_json(obj, "current", d);
        }
    }
    v
}

/// A path in a JSON audit detail (`from`, `to`), exact as in [`kept_json`].
pub(super) fn detail_path(detail: &mut serde_json::Value, key: &str, path: Option<&Path>) {
    if let (Some(obj), Some(p)) = (detail.as_object_mut(), path) {
        insert_json(obj, key, p);
    }
}

/// Text from the journal (a verdict, a reason, an analyst's note) as it is safe to print on a
/// terminal: control characters escaped, like names.
fn text(s: &str) -> String {
    crate::fsops::names::shown_text(s)
}

/// `list`: kept files of `outcome` (with `all`, also those that left), as text or JSON.
pub(super) async fn list(path: &Path, outcome: Outcome, json: bool, all: bool) -> ExitCode {
    let (config, journal) = match open(path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut kept = match journal.kept(outcome, all).await {
        Ok(k) => k,
        Err(e) => return journal_failed(&e),
    };
    super::custody::mark_interrupted(&config, &mut kept);
    if json {
        let v: Vec<_> = kept.iter().map(kept_json).collect();
        println!("{}", serde_json::Value::Array(v));
        return ExitCode::SUCCESS;
    }
    if kept.is_empty() {
        println!("nothing in {}", outcome.as_str());
    }
    for k in &kept {
        print_one(k, false);
        // `--all` is the audit view (the README points there): each entry's records follow it.
        if all {
            print_audit(k);
        }
    }
    ExitCode::SUCCESS
}

/// `show ID`: one kept file with its audit trail.
pub(super) async fn show(path: &Path, outcome: Outcome, id: FileId, json: bool) -> ExitCode {
    let (config, journal) = match open(path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let one = journal.kept_one(id, outcome).await.map(|k| {
        k.map(|mut k| {
            super::custody::mark_interrupted(&config, std::slice::from_mut(&mut k));
            k
        })
    });
    match one {
        Ok(Some(k)) if json => {
            println!("{}", kept_json(&k));
            ExitCode::SUCCESS
        }
        Ok(Some(k)) => {
            print_one(&k, true);
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("no entry {id} in {}", outcome.as_str());
            ExitCode::from(EXIT_REFUSED)
        }
        Err(e) => journal_failed(&e),
    }
}

fn print_one(k: &Kept, long: bool) {
    let r = &k.record;
    let status = k.status.as_deref().unwrap_or("kept");
    // Names are the inbox writer's: escaped, so that they can neither forge nor hide a line
    // of the list an analyst picks an ID from, nor send the terminal escapes.
    println!(
        "{:<6} {}  {}  {}  {}  {}  {}",
        r.id,
        rfc3339(r.updated_at_ms),
        text(status),
        shown(&r.root.join(&r.rel_path)),
        r.dest
            .as_deref()
            .map_or_else(String::new, |d| format!("→ {}", shown(d))),
        r.stamp
            .map_or_else(|| "-".into(), |s| indicatif::HumanBytes(s.size).to_string()),
        text(
            r.verdict
                .map(ScanVerdict::as_str)
                .or(r.reason.as_deref())
                .unwrap_or("-")
        ),
    );
    if long {
        println!(
            "  sha256:   {}",
            r.sha256.map(hex::encode).unwrap_or_else(|| "-".into())
        );
        let ids: Vec<&str> = r.scan_ids.iter().map(|s| s.as_str()).collect();
        println!("  scan_ids: {}", text(&ids.join(", ")));
        println!("  reason:   {}", text(r.reason.as_deref().unwrap_or("-")));
        print_audit(k);
    }
}

/// The audit records of a kept file, one line each (who, when, what, why, the detail).
fn print_audit(k: &Kept) {
    for a in &k.audit {
        println!(
            "  audit {} {} by {}: {} ({})",
            rfc3339(a.at_ms),
            text(&a.action),
            text(&a.user),
            text(a.reason.as_deref().unwrap_or("-")),
            a.detail
        );
    }
}

/// The result of a move out of quarantine or failed, as [`finish`] takes it: on success, one
/// line for the operator (`{status} {id}: from → dest`) and the destination added to the audit
/// detail.
pub(super) fn moved(
    status: &str,
    id: FileId,
    from: Option<&Path>,
    result: Result<PathBuf, FsError>,
    mut detail: serde_json::Value,
) -> Result<serde_json::Value, (FsError, serde_json::Value)> {
    match result {
        Ok(dest) => {
            println!(
                "{status} {id}: {} → {}",
                from.map_or_else(|| "?".to_owned(), |f| shown(f).to_string()),
                shown(&dest)
            );
            detail_path(&mut detail, "to", Some(&dest));
            Ok(detail)
        }
        Err(e) => Err((e, detail)),
    }
}

pub(super) fn journal_failed(e: &JournalError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_UNAVAILABLE)
}

/// The `[[watch]]` a record belongs to.
pub(super) fn watch_of<'a>(config: &'a Config, rec: &FileRecord) -> Option<&'a WatchConfig> {
    config.watches.iter().find(|w| w.path == rec.root)
}

/// Where a kept file is: its folder (opened beneath the configured root without following
/// links) and its name.
pub(super) fn locate(
    roots: &RootDirs,
    which: Which,
    rec: &FileRecord,
) -> Result<(Dir, std::ffi::OsString), FsError> {
    let dest = rec.dest.clone().unwrap_or_default();
    let root = roots.get(which, false)?;
    let rel = dest
        .strip_prefix(roots.path(which))
        .map_err(|_| FsError::NotBeneath { path: dest.clone() })?;
    let (parent, name) = split_rel(rel)?;
    Ok((root.open_dir(parent)?, name.to_os_string()))
}

pub(super) use crate::fsops::blocking;

/// Ends custody after an action: `Ok(detail)` → `done_status`, audited as `action`; `Err` →
/// kept, audited as `action-refused`, exit 2 (or 69 for an I/O failure).
pub(super) async fn finish(
    journal: &Journal,
    id: FileId,
    action: &str,
    done_status: &'static str,
    reason: Option<&str>,
    result: Result<serde_json::Value, (FsError, serde_json::Value)>,
) -> ExitCode {
    match result {
        Ok(detail) => {
            let e = entry(action, id, reason, detail);
            match journal.end_custody(id, Some(done_status), e).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => journal_failed(&e),
            }
        }
        Err((err, mut detail)) => {
            eprintln!("refused: entry {id}: {}", text(&err.to_string()));
            detail["error"] = json!(err.to_string());
            let e = entry(&format!("{action}-refused"), id, reason, detail);
            if let Err(e) = journal.end_custody(id, None, e).await {
                return journal_failed(&e);
            }
            let refused = matches!(
                err,
                FsError::Changed { .. }
                    | FsError::Vanished { .. }
                    | FsError::AlreadyExists { .. }
                    | FsError::NotBeneath { .. }
                    | FsError::NotAFolder { .. }
            );
            ExitCode::from(if refused {
                EXIT_REFUSED
            } else {
                EXIT_UNAVAILABLE
            })
        }
    }
}

/// `purge --older-than D --yes`: removes kept files of `outcome` placed longer than `older`
/// ago, with their sidecars, each audited. Without `yes`, a dry run: lists them, exits 0.
pub(super) async fn purge(
    path: &Path,
    outcome: Outcome,
    older: &Age,
    yes: bool,
    reason: Option<String>,
) -> ExitCode {
    let (config, journal) = match open(path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let kept = match journal.kept(outcome, false).await {
        Ok(k) => k,
        Err(e) => return journal_failed(&e),
    };
    let cutoff =
        now_ms().saturating_sub(i64::try_from(older.duration.as_millis()).unwrap_or(i64::MAX));
    let old: Vec<_> = kept
        .into_iter()
        .filter(|k| k.record.updated_at_ms <= cutoff)
        .collect();
    if !yes {
        for k in &old {
            print_one(k, false);
        }
        println!(
            "dry run: {} files in {} are older than {}; run again with --yes to delete them",
            old.len(),
            outcome.as_str(),
            older.text
        );
        return ExitCode::SUCCESS;
    }
    let reason = reason.unwrap_or_else(|| format!("older than {}", older.text));
    let mut code = ExitCode::SUCCESS;
    for k in old {
        let c = purge_one(&config, &journal, k.record.id, outcome, &reason).await;
        if c != ExitCode::SUCCESS {
            code = c;
        }
    }
    code
}

/// Purges kept entry `id` of `outcome`: the file and its sidecar go, audited.
async fn purge_one(
    config: &Config,
    journal: &Journal,
    id: FileId,
    outcome: Outcome,
    reason: &str,
) -> ExitCode {
    let which = if outcome == Outcome::Quarantine {
        Which::Quarantine
    } else {
        Which::Failed
    };
    let held = match super::custody::take(journal, config, id, outcome, Action::Purge, Some(reason))
        .await
    {
        Ok(h) => h,
        Err(c) => return c,
    };
    let rec = held.record.clone();
    let Some(w) = watch_of(config, &rec).cloned() else {
        eprintln!(
            "refused: entry {id}: its root {} is no longer configured",
            shown(&rec.root)
        );
        let e = entry(
            "purge-refused",
            id,
            Some(reason),
            json!({ "error": "root not configured" }),
        );
        if held.interrupted.is_some() {
            // An interrupted move may have left the only copy in its temp: custody stays.
            journal.audit(e).await.ok();
        } else {
            journal.end_custody(id, None, e).await.ok();
        }
        return ExitCode::from(EXIT_REFUSED);
    };
    let roots = Arc::new(RootDirs::new(&w));
    let from = rec.dest.clone();
    let mut from_json = json!({});
    detail_path(&mut from_json, "from", from.as_deref());
    match super::custody::take_over(journal, &roots, &w, &held, which).await {
        TakenOver::GoAhead => {}
        TakenOver::Stopped(code) => return code,
        done @ TakenOver::Finished { .. } => {
            return super::custody::after_take_over(
                journal,
                &done,
                None,
                id,
                from.as_deref(),
                Action::Purge,
                Some(reason),
            )
            .await;
        }
    }
    let removed = {
        let roots = roots.clone();
        blocking(move || match locate(&roots, which, &rec) {
            Ok((dir, name)) => {
                let gone = |r: Result<(), FsError>| match r {
                    Err(FsError::Vanished { .. }) => Ok(()),
                    other => other,
                };
                gone(dir.unlink(&name))?;
                gone(dir.unlink(&crate::fsops::names::sidecar_name(&name)))?;
                dir.fsync()
            }
            // Its folder is gone already: so is the file.
            Err(FsError::Vanished { .. }) => Ok(()),
            Err(e) => Err(e),
        })
        .await
    };
    let result = removed
        .map(|()| from_json.clone())
        .map_err(|e| (e, from_json));
    let c = super::moves::conclude(
        journal,
        &roots,
        &held.record,
        which,
        Action::Purge,
        Some(reason),
        result,
    )
    .await;
    if c == ExitCode::SUCCESS {
        println!(
            "purged {id}: {}",
            from.as_deref()
                .map(shown)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
    }
    c
}
