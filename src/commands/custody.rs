//! Custody of one kept entry while a quarantine or failed tool works on it: a lock held for the
//! tool's life, and taking over from a run that was interrupted. The move itself is
//! [`super::moves`].
//!
//! **The lock.** `<state dir>/custody/<id>.lock` is held (`flock`, exclusive) from before
//! custody is taken in the journal until the tool ends. The kernel drops it however the tool
//! ends (kill -9, Ctrl-C, a power cut), so custody left `busy` in the journal with its lock free
//! *is* an interrupted run, known at once and with no clock involved; a lock that is held is a
//! tool at work (its PID is in the file), and a second run is refused. Lock files are never
//! removed: removing one would let two runs lock two inodes of one name. There is one per entry
//! ever acted on, holding a PID.
//!
//! **Taking over** an interrupted run, before this run's own action:
//! - the kept file is still in its folder: nothing has moved. A temp of the interrupted move is
//!   a partial (or spare) copy and is removed, the interruption is audited
//!   (`ACTION-interrupted`), and this run's action goes ahead;
//! - the kept file is gone and the journal holds the plan (the target is recorded before
//!   anything moves): the move had passed its point of no return, and is finished to the
//!   recorded target (a verified temp is renamed into place; no temp left means that rename was
//!   done). It is audited as the interrupted run's action, with its user and reason, marked
//!   `completed_after_interruption`. This run then succeeds if it asked for the same thing, and
//!   is refused otherwise (the entry has gone);
//! - gone without a plan: a `purge` killed after the unlink is finished; otherwise (a journal
//!   written by an older version) this run's action goes ahead, and `place` finishes a verified
//!   temp of its own.
//!
//! Until a run takes over, `list` and `show` say `interrupted:ACTION`, and the agent leaves the
//! entry's temp alone at start-up (`app::leftovers`: a tool's temp whose record the journal
//! knows is the tool's to finish): it may be the only copy.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, Mode, OFlags};
use serde_json::json;

use super::moves::{
    Action, Move, carry_out, fs_exit, linked_to_target, open_to_root, still_kept, temp_of,
};
use super::tools::{EXIT_REFUSED, blocking, detail_path, entry, journal_failed, locate, rfc3339};
use crate::config::{Config, WatchConfig};
use crate::error::EXIT_UNAVAILABLE;
use crate::fsops::names::{shown_text, sidecar_name};
use crate::fsops::place::remove_temp;
use crate::fsops::roots::{RootDirs, Which};
use crate::fsops::{Dir, FsError, shown};
use crate::journal::{
    AuditEntry, CustodyPlan, FileId, FileRecord, Interrupted, Journal, JournalError, Kept, Outcome,
    now_ms,
};

/// The folder of the custody locks, in the state folder.
const LOCK_DIR: &str = "custody";
/// How long a run waits for a lock that is held only for a moment (`list` looking whether a
/// tool is at work) before it says another tool is working on the entry.
const LOCK_PATIENCE: Duration = Duration::from_millis(300);

fn lock_path(config: &Config, id: FileId) -> PathBuf {
    config.state.dir.join(LOCK_DIR).join(format!("{id}.lock"))
}

enum Locked {
    Mine(File),
    /// Held by another process (the PID it wrote, if any).
    Held(Option<u32>),
}

/// Takes entry `id`'s lock without waiting, and writes our PID into it.
fn try_lock(config: &Config, id: FileId) -> std::io::Result<Locked> {
    let dir = config.state.dir.join(LOCK_DIR);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let fd = rustix::fs::open(
        lock_path(config, id),
        OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let mut file = File::from(fd);
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            file.set_len(0)?;
            file.write_all(format!("{}\n", std::process::id()).as_bytes())?;
            Ok(Locked::Mine(file))
        }
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut text = String::new();
            file.read_to_string(&mut text).ok();
            Ok(Locked::Held(text.trim().parse().ok()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether a tool holds entry `id`'s lock right now (looked at with a shared lock, let go at
/// once).
fn at_work(config: &Config, id: FileId) -> bool {
    let Ok(fd) = rustix::fs::open(
        lock_path(config, id),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    matches!(
        rustix::fs::flock(&fd, FlockOperation::NonBlockingLockShared),
        Err(rustix::io::Errno::WOULDBLOCK)
    )
}

/// Shows custody left `busy` by a tool that is gone as `interrupted:ACTION` (`list`, `show`).
pub(super) fn mark_interrupted(config: &Config, kept: &mut [Kept]) {
    for k in kept {
        if let Some(action) = k.status.as_deref().and_then(|s| s.strip_prefix("busy:")) {
            if !at_work(config, k.record.id) {
                k.status = Some(format!("interrupted:{action}"));
            }
        }
    }
}

/// This run's custody of one entry: its lock (let go when dropped, or when the process ends),
/// the record, and what an interrupted run left.
pub(super) struct Held {
    _lock: File,
    /// The record as custody was taken.
    pub record: FileRecord,
    /// Left by a run that is gone: see [`take_over`].
    pub interrupted: Option<Interrupted>,
}

/// Takes custody of entry `id` of `outcome` for `action`: its lock, then the journal's custody.
/// Refused (exit 2, audited when the entry exists) if it is no kept file or another tool holds
/// it.
pub(super) async fn take(
    journal: &Journal,
    config: &Config,
    id: FileId,
    outcome: Outcome,
    action: Action,
    reason: Option<&str>,
) -> Result<Held, ExitCode> {
    let refused = |detail: String| {
        eprintln!("refused: entry {id} {}", shown_text(&detail));
        entry(
            &format!("{action}-refused"),
            id,
            reason,
            json!({ "error": detail }),
        )
    };
    match journal.kept_one(id, outcome).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            eprintln!(
                "refused: entry {id} is not a file placed in {}",
                outcome.as_str()
            );
            return Err(ExitCode::from(EXIT_REFUSED));
        }
        Err(e) => return Err(journal_failed(&e)),
    }
    let patience = Instant::now() + LOCK_PATIENCE;
    let lock = loop {
        match try_lock(config, id) {
            Ok(Locked::Mine(f)) => break f,
            Ok(Locked::Held(pid)) if Instant::now() >= patience => {
                let by = pid.map(|p| format!(" (PID {p})")).unwrap_or_default();
                let e = refused(format!("another tool is working on it{by}"));
                journal.audit(e).await.ok();
                return Err(ExitCode::from(EXIT_REFUSED));
            }
            Ok(Locked::Held(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => {
                let advice = if e.kind() == std::io::ErrorKind::PermissionDenied {
                    " (run the tools as the agent's user, e.g. sudo -u dropscan)"
                } else {
                    ""
                };
                eprintln!(
                    "error: cannot lock {}: {e}{advice}",
                    shown(&lock_path(config, id))
                );
                return Err(ExitCode::from(EXIT_UNAVAILABLE));
            }
        }
    };
    match journal.take_custody(id, outcome, action.as_str()).await {
        Ok(c) => Ok(Held {
            _lock: lock,
            record: c.record,
            interrupted: c.interrupted,
        }),
        Err(JournalError::Conflict { detail, .. }) => {
            journal.audit(refused(detail)).await.ok();
            Err(ExitCode::from(EXIT_REFUSED))
        }
        Err(e) => Err(journal_failed(&e)),
    }
}

/// What taking over an interrupted run came to.
pub(super) enum TakenOver {
    /// Nothing to finish (nothing had moved, or nothing was interrupted): this run goes ahead.
    GoAhead,
    /// The interrupted run's move is finished now, and audited.
    Finished {
        /// Its action.
        action: Action,
        /// Its move (`None`: a purge).
        mv: Option<Move>,
        /// Where the file went.
        to: Option<PathBuf>,
    },
    /// It could not be finished (said why): this run ends so.
    Stopped(ExitCode),
}

impl TakenOver {
    /// Whether the interrupted run did what `mv` (or, with `None`, a purge) asks.
    pub(super) fn same_as(&self, mv: Option<&Move>) -> bool {
        let TakenOver::Finished {
            action, mv: done, ..
        } = self
        else {
            return false;
        };
        match (mv, done) {
            (None, None) => *action == Action::Purge,
            (Some(m), Some(d)) => {
                m.action == d.action
                    && (m.fixed.is_none() || (m.to_root == d.to_root && m.fixed == d.fixed))
            }
            _ => false,
        }
    }
}

/// Finishes or undoes what an interrupted run left on the held entry (see the module docs).
pub(super) async fn take_over(
    journal: &Journal,
    roots: &Arc<RootDirs>,
    w: &WatchConfig,
    held: &Held,
    from: Which,
) -> TakenOver {
    let Some(prev) = &held.interrupted else {
        return TakenOver::GoAhead;
    };
    let rec = &held.record;
    let id = rec.id;
    // The plan names the move under way (a run that took over and was interrupted in turn
    // left its own action in the custody status, and the plan it was finishing).
    let named = prev.plan.as_ref().map_or(&prev.action, |p| &p.action);
    let Some(action) = Action::parse(named) else {
        eprintln!(
            "refused: entry {id}: an interrupted run left an unknown action ({})",
            shown_text(named)
        );
        return TakenOver::Stopped(ExitCode::from(EXIT_REFUSED));
    };
    eprintln!(
        "entry {id}: a previous run was interrupted ({action} started {})",
        rfc3339(prev.since_ms)
    );
    let kept = {
        let (roots, rec, plan) = (roots.clone(), rec.clone(), prev.plan.clone());
        blocking(move || {
            Ok(still_kept(&roots, from, &rec)? && !linked_to_target(&roots, from, &rec, plan)?)
        })
        .await
    };
    let kept = match kept {
        Ok(k) => k,
        Err(e) => {
            eprintln!("refused: entry {id}: {}", shown_text(&e.to_string()));
            return TakenOver::Stopped(fs_exit(&e));
        }
    };
    if kept {
        return undo(journal, w, held, prev, action).await;
    }

    let (mv, to, user, reason) = match (&prev.plan, action) {
        (None, Action::Purge) => {
            if let Err(e) = purge_sidecar(roots, from, rec).await {
                eprintln!("refused: entry {id}: {}", shown_text(&e.to_string()));
                return TakenOver::Stopped(fs_exit(&e));
            }
            (None, None, super::tools::unix_user(), None)
        }
        (None, _) => return TakenOver::GoAhead,
        (Some(plan), _) => {
            let Some(mv) = Move::of_plan(plan) else {
                return TakenOver::GoAhead;
            };
            let to = match finish_plan(journal, roots, w, rec, plan, &mv, action).await {
                Ok(to) => to,
                Err(code) => return TakenOver::Stopped(code),
            };
            (Some(mv), Some(to), plan.user.clone(), plan.reason.clone())
        }
    };
    let audit = AuditEntry {
        id: 0,
        at_ms: now_ms(),
        user,
        action: action.as_str().to_string(),
        file_id: Some(id),
        reason,
        detail: json!({
            "sha256": rec.sha256.map(hex::encode),
            "completed_after_interruption": true,
            "completed_by": super::tools::unix_user(),
        }),
    };
    let mut audit = audit;
    detail_path(&mut audit.detail, "from", rec.dest.as_deref());
    detail_path(&mut audit.detail, "to", to.as_deref());
    if let Err(e) = journal
        .end_custody(id, Some(action.done_status()), audit)
        .await
    {
        return TakenOver::Stopped(journal_failed(&e));
    }
    eprintln!(
        "entry {id}: the interrupted {action} had moved the file; finished it{}",
        to.as_ref()
            .map(|t| format!(": → {}", shown(t)))
            .unwrap_or_default()
    );
    TakenOver::Finished { action, mv, to }
}

/// An interrupted purge had removed the file: its sidecar goes too.
async fn purge_sidecar(
    roots: &Arc<RootDirs>,
    from: Which,
    rec: &FileRecord,
) -> Result<(), FsError> {
    let (roots, rec) = (roots.clone(), rec.clone());
    blocking(move || {
        let (dir, name) = locate(&roots, from, &rec)?;
        match dir.unlink(&sidecar_name(&name)) {
            Ok(()) | Err(FsError::Vanished { .. }) => {}
            Err(e) => return Err(e),
        }
        dir.fsync()
    })
    .await
}

/// Carries out the interrupted run's `plan` (its move `mv`) to its journaled target; where the
/// file went, or the exit code once the refusal is printed and audited.
async fn finish_plan(
    journal: &Journal,
    roots: &Arc<RootDirs>,
    w: &WatchConfig,
    rec: &FileRecord,
    plan: &CustodyPlan,
    mv: &Move,
    action: Action,
) -> Result<PathBuf, ExitCode> {
    let target = plan.target.clone();
    let finished = carry_out(
        journal,
        roots,
        w,
        rec,
        mv,
        Some(target.clone()),
        &plan.user,
        plan.reason.as_deref(),
    )
    .await;
    let finished = match finished {
        Err(FsError::Vanished { path }) => {
            let (roots, to_root, temp) = (roots.clone(), mv.to_root.clone(), temp_of(w, rec));
            match blocking(move || open_to_root(&roots, &to_root)?.exists(&temp)).await {
                // Neither the kept file nor the temp is left: the temp's rename into place was
                // done, and the file has moved on since (the agent took a retried file, someone
                // moved a released one).
                Ok(false) => Ok(mv.to_root.join(&target)),
                Ok(true) => Err(FsError::Vanished { path }),
                Err(e) => Err(e),
            }
        }
        other => other,
    };
    let e = match finished {
        Ok(to) => return Ok(to),
        Err(e) => e,
    };
    eprintln!(
        "refused: entry {}: the interrupted {action} cannot be finished: {}\n  \
         the file waits in {}: run again once that is fixed",
        rec.id,
        shown_text(&e.to_string()),
        shown(&mv.to_root.join(temp_of(w, rec)))
    );
    let code = fs_exit(&e);
    let refusal = entry(
        &format!("{action}-refused"),
        rec.id,
        plan.reason.as_deref(),
        json!({ "error": e.to_string(), "unfinished": true }),
    );
    journal.audit(refusal).await.ok();
    Err(code)
}

/// The kept file is still in its folder: the interrupted move is undone (its temp removed) and
/// audited, and this run goes ahead.
async fn undo(
    journal: &Journal,
    w: &WatchConfig,
    held: &Held,
    prev: &Interrupted,
    action: Action,
) -> TakenOver {
    let id = held.record.id;
    let mut detail = json!({ "started": rfc3339(prev.since_ms), "moved": false });
    if let Some(plan) = &prev.plan {
        let to_root = plan.to_root.clone();
        let temp = temp_of(w, &held.record);
        // The kept file is whole: a temp of its move is a partial or spare copy.
        let removed = blocking(move || {
            let dir = Dir::open_trusted(&to_root)?;
            Ok(!dir.exists(&temp)?
                || remove_temp(
                    &dir,
                    &temp,
                    "a copy of an interrupted tool; the file is still kept",
                ))
        })
        .await;
        match removed {
            Ok(true) | Err(FsError::Vanished { .. }) => {}
            Ok(false) => {
                eprintln!(
                    "refused: entry {id}: cannot remove the copy an interrupted run left in {}",
                    shown(&plan.to_root)
                );
                return TakenOver::Stopped(ExitCode::from(EXIT_UNAVAILABLE));
            }
            Err(e) => {
                eprintln!(
                    "refused: entry {id}: cannot remove the interrupted copy: {}",
                    shown_text(&e.to_string())
                );
                return TakenOver::Stopped(fs_exit(&e));
            }
        }
        detail_path(&mut detail, "to", Some(&plan.to_root.join(&plan.target)));
        detail["started_by"] = json!(plan.user);
    }
    let e = entry(&format!("{action}-interrupted"), id, None, detail);
    if let Err(e) = journal.audit(e).await {
        return TakenOver::Stopped(journal_failed(&e));
    }
    eprintln!("entry {id}: nothing had moved yet; going ahead");
    TakenOver::GoAhead
}

/// Ends a run whose entry's interrupted move was just finished ([`take_over`]): done if the
/// interrupted run did what this one asks (`mv`; `None`: a purge), else refused, audited: the
/// entry has gone.
pub(super) async fn after_take_over(
    journal: &Journal,
    done: &TakenOver,
    mv: Option<&Move>,
    id: FileId,
    from: Option<&Path>,
    action: Action,
    reason: Option<&str>,
) -> ExitCode {
    let TakenOver::Finished {
        action: did, to, ..
    } = done
    else {
        return ExitCode::from(EXIT_UNAVAILABLE);
    };
    if done.same_as(mv) {
        println!(
            "{} {id}: {}{} (completed after an interruption)",
            did.done_status(),
            from.map_or_else(|| "?".to_owned(), |f| shown(f).to_string()),
            to.as_ref()
                .map(|t| format!(" → {}", shown(t)))
                .unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    let detail = format!("is no longer kept: the interrupted {did} was finished instead");
    eprintln!("refused: entry {id} {}", shown_text(&detail));
    let e = entry(
        &format!("{action}-refused"),
        id,
        reason,
        json!({ "error": detail }),
    );
    journal.audit(e).await.ok();
    ExitCode::from(EXIT_REFUSED)
}
