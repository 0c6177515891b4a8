//! Start-up, after the journal is reconciled with the staging folders: the copy temps left in
//! the destination roots by placements that were interrupted.
//!
//! A temp is never removed unseen, and never because the journal does not know it (a journal
//! moved aside after a crash, a destination changed and changed back): its name says which
//! staged file it copies ([`crate::fsops::names::copy_temp_name`]), and that decides.
//! - **Staged file present**: the temp is a partial copy of it, removed (and logged): the file
//!   is placed again from staging.
//! - **Staged file gone, record unfinished**: the verified copy its record finishes (the
//!   sorter renames it into place).
//! - **Staged file gone, no record**: the only copy of a file. It is taken back into staging
//!   ([`crate::fsops::place::take_back`]) under a new record, scanned again and placed as
//!   `recovered/<name>` (or under its original path when a finished record still names it).
//! - **A tool's temp** (`quarantine release|restore`, `failed retry`) whose record the journal
//!   knows is left to the tool, which finishes it when run again; one the journal does not know
//!   is taken back like the agent's.
//! - **A numbered temp** (named by an older version after its record id): kept for its
//!   unfinished record (renamed to the name the sorter looks for) or its tool, else taken back.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::context::{Shared, instance_of};
use crate::error::FatalError;
use crate::fsops::names::{Temp, TempOf, copy_temp_name};
use crate::fsops::roots::Which;
use crate::fsops::{self, Dir};
use crate::journal::{FileId, FileRecord, NewClaim};

/// A whole copy to take back into staging.
struct Whole {
    /// The watch whose staging folder takes it.
    watch: usize,
    dest_root: Arc<Dir>,
    temp: OsString,
    /// The user's file name the temp holds.
    name: OsString,
    /// The staged paths a finished record may still name it by (one per watch).
    was: Vec<PathBuf>,
}

/// Sorts out every leftover copy temp of every destination root; see the module docs.
/// `unfinished` are the records found unfinished (`records`' ids plus those a tool holds);
/// `claimed` receives the records made for copies taken back.
pub(super) async fn tidy(
    shared: &Shared,
    stagings: &[Option<Arc<Dir>>],
    records: &[FileRecord],
    unfinished: &HashSet<FileId>,
    claimed: &mut Vec<(FileId, PathBuf)>,
) -> Result<(), FatalError> {
    let journal = &shared.journal;
    let watches = &shared.config.watches;
    let live: HashMap<&Path, &FileRecord> =
        records.iter().map(|r| (r.staged.as_path(), r)).collect();
    let by_id: HashMap<FileId, &FileRecord> = records.iter().map(|r| (r.id, r)).collect();
    // A staged name, in every watch's staging folder: a temp's token does not say which.
    let staged_everywhere = |name: &OsString| -> Vec<PathBuf> {
        watches.iter().map(|w| w.staging_dir.join(name)).collect()
    };
    // Whether a staged name is in some staging folder: `None` when a folder cannot be looked
    // into (a held watch, an I/O error): then nothing is decided about its temp.
    let in_staging = |name: &OsString| -> Option<bool> {
        let orig = fsops::own::orig_name(name);
        let mut unknown = false;
        for s in stagings {
            let Some(s) = s else {
                unknown = true;
                continue;
            };
            match (s.exists(name), s.exists(&orig)) {
                (Ok(true), _) | (_, Ok(true)) => return Some(true),
                (Ok(false), Ok(false)) => {}
                _ => unknown = true,
            }
        }
        (!unknown).then_some(false)
    };
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut whole = Vec::new();
    let mut tools = Vec::new();
    for (i, roots) in shared.roots.iter().enumerate() {
        let instance = instance_of(&watches[i]);
        for which in [Which::Clean, Which::Quarantine, Which::Failed] {
            let Ok(d) = roots.get(which, false) else {
                continue;
            };
            // A folder shared by several watches (or roles) is looked at once.
            if !d.identity().is_ok_and(|id| seen.insert(id)) {
                continue;
            }
            let found = tokio::task::spawn_blocking({
                let (d, instance) = (Arc::clone(&d), instance.clone());
                move || fsops::place::leftover_temps(&d, &instance)
            })
            .await
            .unwrap_or_default();
            for (temp, what) in found {
                match what {
                    Temp::Copy { of, token, name } => {
                        let staged = OsString::from(format!("{token}.staged"));
                        match in_staging(&staged) {
                            Some(true) => {
                                fsops::place::remove_temp(
                                    &d,
                                    &temp,
                                    "a partial copy: its file is still in staging",
                                );
                                continue;
                            }
                            None => continue,
                            Some(false) => {}
                        }
                        let was = staged_everywhere(&staged);
                        if of == TempOf::Agent && was.iter().any(|p| live.contains_key(p.as_path()))
                        {
                            // The verified copy of an unfinished record: the sorter finishes it.
                            continue;
                        }
                        let w = Whole {
                            watch: i,
                            dest_root: Arc::clone(&d),
                            temp,
                            name,
                            was,
                        };
                        if of == TempOf::Tool {
                            tools.push(w);
                        } else {
                            whole.push(w);
                        }
                    }
                    Temp::Numbered(id) => {
                        // An older version's verified copy, for its record in `placing`: given
                        // the name the sorter looks for.
                        let placing = by_id.get(&id).filter(|r| {
                            r.state == crate::journal::FileState::Placing
                                && in_staging(
                                    &r.staged.file_name().unwrap_or_default().to_os_string(),
                                ) == Some(false)
                        });
                        if let Some(rec) = placing {
                            let new = copy_temp_name(
                                &instance,
                                TempOf::Agent,
                                &rec.staged,
                                &rec.rel_path,
                            );
                            match fsops::rename_noreplace(&d, &temp, &d, &new) {
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::warn!(id, error = %e, "cannot rename an older version's copy temp; left as it is")
                                }
                            }
                            continue;
                        }
                        if unfinished.contains(&id) {
                            // A tool of an older version holds it.
                            continue;
                        }
                        whole.push(Whole {
                            watch: i,
                            dest_root: Arc::clone(&d),
                            name: temp.clone(),
                            temp,
                            was: Vec::new(),
                        });
                    }
                    Temp::Sidecar => {}
                }
            }
        }
    }
    // A tool's temp whose record the journal knows is the tool's to finish.
    if !tools.is_empty() {
        let names: Vec<Vec<PathBuf>> = tools.iter().map(|t| t.was.clone()).collect();
        let known = journal.closed_records_of(names.concat()).await?;
        let mut known = known.into_iter();
        for t in tools {
            // Every answer of this temp is consumed, whatever the first says.
            let answers: Vec<_> = (&mut known).take(t.was.len()).collect();
            let any = answers.iter().any(Option::is_some);
            if any {
                tracing::warn!(
                    temp = %fsops::shown(&t.dest_root.path().join(&t.temp)),
                    "a quarantine or failed tool was interrupted while copying this file: run the \
                     same command again to finish it (left as it is)"
                );
            } else {
                whole.push(t);
            }
        }
    }
    take_back_all(shared, stagings, whole, claimed).await
}

/// Takes each whole copy back into its watch's staging folder under a new record (journaled
/// first, so that a crash leaves either the temp or the new staged file, and never both as two
/// files to place).
async fn take_back_all(
    shared: &Shared,
    stagings: &[Option<Arc<Dir>>],
    whole: Vec<Whole>,
    claimed: &mut Vec<(FileId, PathBuf)>,
) -> Result<(), FatalError> {
    if whole.is_empty() {
        return Ok(());
    }
    let journal = &shared.journal;
    let previous = journal
        .closed_records_of(whole.iter().flat_map(|w| w.was.clone()).collect())
        .await?;
    let mut previous = previous.into_iter();
    let mut claims = Vec::with_capacity(whole.len());
    for w in &whole {
        let prev = (&mut previous).take(w.was.len()).flatten().last();
        let rel_path = prev.unwrap_or_else(|| Path::new("recovered").join(&w.name));
        let watch = &shared.config.watches[w.watch];
        let fresh = OsString::from(format!("{}.staged", uuid::Uuid::new_v4().simple()));
        tracing::warn!(
            temp = %fsops::shown(&w.dest_root.path().join(&w.temp)),
            path = %fsops::shown(&rel_path),
            "a verified copy left by an interrupted placement is the only copy of its file: \
             scanning it again"
        );
        claims.push(NewClaim {
            root: watch.path.clone(),
            rel_path,
            staged: watch.staging_dir.join(fresh),
            dropped_at_ms: None,
        });
    }
    let ids = journal.claim(claims.clone()).await?;
    for ((id, claim), w) in ids.into_iter().zip(claims).zip(whole) {
        let instance = instance_of(&shared.config.watches[w.watch]);
        let fresh_temp = copy_temp_name(&instance, TempOf::Agent, &claim.staged, &claim.rel_path);
        let fresh = claim.staged.file_name().unwrap_or_default().to_os_string();
        let Some(staging) = stagings[w.watch].as_ref().map(Arc::clone) else {
            journal.unclaim(vec![id]).await?;
            continue;
        };
        let taken = tokio::task::spawn_blocking(move || {
            fsops::place::take_back(&w.dest_root, &w.temp, &fresh_temp, &staging, &fresh)
        })
        .await;
        match taken {
            Ok(Ok(())) => claimed.push((id, claim.staged)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot take a verified copy back into staging; retried at the next start");
                journal.unclaim(vec![id]).await?;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot take a verified copy back into staging; retried at the next start");
                journal.unclaim(vec![id]).await?;
            }
        }
    }
    Ok(())
}
