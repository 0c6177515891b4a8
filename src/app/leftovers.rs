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

use crate::context::Shared;
use crate::error::FatalError;
use crate::fsops::names::{Temp, TempOf, copy_temp_name, staged_token, token_matches};
use crate::fsops::{self, Dir};
use crate::journal::{FileId, FileRecord, FileState};
use crate::root::{Root, Which};

/// A whole copy to take back into staging.
struct Whole {
    /// The watch whose staging folder takes it.
    root: Arc<Root>,
    dest_root: Arc<Dir>,
    temp: OsString,
    /// The user's file name the temp holds.
    name: OsString,
    /// The staged paths a finished record may still name it by (one per watch).
    was: Vec<PathBuf>,
}

/// Sorts out every leftover copy temp of every destination root; see the module docs.
/// `records` are the records found unfinished before reconciling, `custody` those a tool holds
/// (or died holding); `claimed` receives the records made for copies taken back.
pub(super) async fn tidy(
    shared: &Shared,
    stagings: &[Option<Arc<Dir>>],
    records: &[FileRecord],
    custody: &HashSet<FileId>,
    claimed: &mut Vec<(FileId, PathBuf)>,
) -> Result<(), FatalError> {
    // The content a tool holds custody of: its temp is the tool's to finish.
    let mut tool_content = HashSet::new();
    for id in custody {
        if let Ok(rec) = shared.journal.get(*id).await {
            tool_content.extend(rec.sha256);
        }
    }
    let mut tidy = Tidy {
        shared,
        stagings,
        // Records whose verified copy may wait in a temp: those past their verdict. (One left
        // `claimed` or earlier whose staged file is gone was dropped or closed by reconciling.)
        live: records
            .iter()
            .filter(|r| {
                matches!(
                    r.state,
                    FileState::Decided | FileState::Placing | FileState::Placed
                )
            })
            .map(|r| r.staged.as_path())
            .collect(),
        by_id: records.iter().map(|r| (r.id, r)).collect(),
        custody,
        tool_content,
        whole: Vec::new(),
    };
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    for root in shared.roots.iter() {
        for which in [Which::Clean, Which::Quarantine, Which::Failed] {
            let Ok(d) = root.folder(which, false) else {
                continue;
            };
            // A folder shared by several watches (or roles) is looked at once.
            if !d.identity().is_ok_and(|id| seen.insert(id)) {
                continue;
            }
            tidy.folder(root, &d).await;
        }
    }
    take_back_all(shared, stagings, tidy.whole, claimed).await
}

/// What `tidy` knows while it goes through the destination folders.
struct Tidy<'a> {
    shared: &'a Shared,
    stagings: &'a [Option<Arc<Dir>>],
    /// The staged paths of records past their verdict.
    live: HashSet<&'a Path>,
    by_id: HashMap<FileId, &'a FileRecord>,
    custody: &'a HashSet<FileId>,
    /// The content of the records a tool holds.
    tool_content: HashSet<[u8; 32]>,
    /// The whole copies found, to take back.
    whole: Vec<Whole>,
}

impl Tidy<'_> {
    /// The leftover temps of `root`'s destination folder `d`, each sorted out.
    async fn folder(&mut self, root: &Arc<Root>, d: &Arc<Dir>) {
        let found = tokio::task::spawn_blocking({
            let (d, tag, legacy) = (
                Arc::clone(d),
                root.instance.clone(),
                root.legacy_instance.clone(),
            );
            move || {
                let mut found = fsops::place::leftover_temps(&d, &tag);
                // Only an older version's numbered copies carry the bare instance tag.
                found.extend(
                    fsops::place::leftover_temps(&d, &legacy)
                        .into_iter()
                        .filter(|(_, t)| matches!(t, Temp::Numbered(_))),
                );
                found
            }
        })
        .await
        .unwrap_or_default();
        for (temp, what) in found {
            let whole_copy = |name: OsString, was: Vec<PathBuf>| Whole {
                root: Arc::clone(root),
                dest_root: Arc::clone(d),
                temp: temp.clone(),
                name,
                was,
            };
            match what {
                Temp::Copy {
                    of: TempOf::Agent,
                    token,
                    name,
                } => {
                    let staged = OsString::from(format!("{token}.staged"));
                    match self.in_staging(&staged) {
                        Some(true) => {
                            fsops::place::remove_temp(
                                d,
                                &temp,
                                "a partial copy: its file is still in staging",
                            );
                        }
                        None => {}
                        Some(false) => {
                            let was = self.staged_everywhere(&staged);
                            // The verified copy of an unfinished record: the sorter finishes it.
                            if !was.iter().any(|p| self.live.contains(p.as_path())) {
                                self.whole.push(whole_copy(name, was));
                            }
                        }
                    }
                }
                Temp::Copy {
                    of: TempOf::Tool,
                    token,
                    name,
                } => match tool_copy(d, &temp, &token).await {
                    ToolCopy::Partial => {
                        fsops::place::remove_temp(
                            d,
                            &temp,
                            "a partial copy of a quarantine or failed tool (its bytes do not \
                             hash to the content it was to hold)",
                        );
                    }
                    ToolCopy::Whole(sha) if self.tool_content.contains(&sha) => {
                        tracing::warn!(
                            temp = %fsops::shown(&d.path().join(&temp)),
                            "a quarantine or failed tool was interrupted while moving this \
                             file: run the same command again to finish it (left as it is)"
                        );
                    }
                    ToolCopy::Whole(_) => self.whole.push(whole_copy(name, Vec::new())),
                    ToolCopy::Unknown => {}
                },
                Temp::Numbered(id) => {
                    if self.numbered(root, d, &temp, id).await {
                        self.whole.push(whole_copy(temp.clone(), Vec::new()));
                    }
                }
                Temp::Sidecar => {}
            }
        }
    }

    /// An older version's numbered temp `temp` for record `id`, sorted out; `true` when it is a
    /// whole copy to take back.
    async fn numbered(&self, root: &Root, d: &Arc<Dir>, temp: &OsString, id: FileId) -> bool {
        let rec = self.by_id.get(&id).copied();
        let staged_here = rec.and_then(|r| {
            self.in_staging(&r.staged.file_name().unwrap_or_default().to_os_string())
        });
        let fate = numbered_fate(
            rec.map(|r| r.state),
            staged_here,
            self.custody.contains(&id),
        );
        match (fate, rec) {
            (Numbered::Partial, _) => {
                fsops::place::remove_temp(
                    d,
                    temp,
                    "an older version's partial copy: its file is still in staging",
                );
            }
            (Numbered::ForTheSorter, Some(rec)) => {
                let new = copy_temp_name(
                    &root.instance,
                    TempOf::Agent,
                    &staged_token(&rec.staged),
                    &rec.rel_path,
                );
                if let Err(e) = fsops::rename_noreplace(d, temp, d, &new) {
                    tracing::warn!(id, error = %e, "cannot rename an older version's copy temp; left as it is");
                }
            }
            (Numbered::ForTheSorter | Numbered::Leave, _) => {}
            // A finished record: its copy (a tool's, or a placement closed since) is judged by
            // the content that record holds.
            (Numbered::Judge, _) => match numbered_copy(&self.shared.journal, d, temp, id).await {
                ToolCopy::Whole(_) => return true,
                ToolCopy::Partial => {
                    fsops::place::remove_temp(
                        d,
                        temp,
                        "an older version's partial copy of a finished record \
                         (shorter than its file, not its content)",
                    );
                }
                ToolCopy::Unknown => {
                    tracing::warn!(
                        temp = %fsops::shown(&d.path().join(temp)),
                        "an older version's copy temp that no record explains: \
                         left as it is (remove it once its file is known to be \
                         safe elsewhere)"
                    );
                }
            },
        }
        false
    }

    /// A staged name, in every watch's staging folder: a temp's token does not say which.
    fn staged_everywhere(&self, name: &OsString) -> Vec<PathBuf> {
        self.shared
            .config
            .watches
            .iter()
            .map(|w| w.staging_dir.join(name))
            .collect()
    }

    /// Whether a staged name is in some staging folder: `None` when a folder cannot be looked
    /// into (a held watch, an I/O error): then nothing is decided about its temp.
    fn in_staging(&self, name: &OsString) -> Option<bool> {
        let orig = fsops::own::orig_name(name);
        let mut unknown = false;
        for s in self.stagings {
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
    }
}

/// What becomes of an older version's numbered temp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbered {
    /// Its record's file is still in staging: a partial copy, removed.
    Partial,
    /// An older version's verified copy, for its record in `placing`: given the name the sorter
    /// looks for.
    ForTheSorter,
    /// Its record is unfinished otherwise, or a tool of an older version holds it, or the
    /// staging folders cannot all be looked into: left as it is.
    Leave,
    /// No unfinished record: judged by the content of the finished record its name gives.
    Judge,
}

/// `state`: its unfinished record's, if any; `staged_here`: whether that record's file is in
/// some staging folder (`None`: unknown); `in_custody`: a tool holds its record.
fn numbered_fate(
    state: Option<FileState>,
    staged_here: Option<bool>,
    in_custody: bool,
) -> Numbered {
    match (state, staged_here) {
        (Some(_), Some(true)) => Numbered::Partial,
        (Some(FileState::Placing), Some(false)) => Numbered::ForTheSorter,
        (Some(_), _) => Numbered::Leave,
        (None, _) if in_custody => Numbered::Leave,
        (None, _) => Numbered::Judge,
    }
}

/// What a tool's temp holds, told by hashing it against the content its name gives.
enum ToolCopy {
    /// Exactly that content (SHA-256): a whole copy.
    Whole([u8; 32]),
    /// Something else: an interrupted copy.
    Partial,
    /// It could not be read (or its name gives no content): left alone.
    Unknown,
}

/// An older version's numbered temp, for record `id` of this journal: whole when it holds that
/// record's content, partial when it is shorter than that file and not its content, unknown
/// otherwise. The record counts only if it is older than the temp (a journal replaced since
/// would give the id to another file).
async fn numbered_copy(
    journal: &crate::journal::Journal,
    d: &Arc<Dir>,
    temp: &OsString,
    id: FileId,
) -> ToolCopy {
    let Ok(rec) = journal.get(id).await else {
        return ToolCopy::Unknown;
    };
    let (Some(sha), Some(size)) = (rec.sha256, rec.stamp.map(|s| s.size)) else {
        return ToolCopy::Unknown;
    };
    let (d, temp) = (Arc::clone(d), temp.clone());
    tokio::task::spawn_blocking(move || {
        let Ok((mut f, st)) = d.open_file(&temp) else {
            return ToolCopy::Unknown;
        };
        let made_ms = st.mtime_ns / 1_000_000;
        if made_ms < rec.claimed_at_ms {
            return ToolCopy::Unknown;
        }
        match fsops::sha256_file(&mut f) {
            Ok((got, _)) if got == sha => ToolCopy::Whole(got),
            Ok(_) if st.size < size => ToolCopy::Partial,
            _ => ToolCopy::Unknown,
        }
    })
    .await
    .unwrap_or(ToolCopy::Unknown)
}

async fn tool_copy(d: &Arc<Dir>, temp: &OsString, token: &str) -> ToolCopy {
    let (d, temp, token) = (Arc::clone(d), temp.clone(), token.to_string());
    if token.len() != 32 {
        return ToolCopy::Unknown;
    }
    tokio::task::spawn_blocking(move || {
        let hashed = d
            .open_file(&temp)
            .and_then(|(mut f, _)| fsops::sha256_file(&mut f));
        match hashed {
            Ok((sha, _)) if token_matches(&token, &sha) => ToolCopy::Whole(sha),
            Ok(_) => ToolCopy::Partial,
            Err(_) => ToolCopy::Unknown,
        }
    })
    .await
    .unwrap_or(ToolCopy::Unknown)
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
        let fresh = OsString::from(format!("{}.staged", uuid::Uuid::new_v4().simple()));
        tracing::warn!(
            temp = %fsops::shown(&w.dest_root.path().join(&w.temp)),
            path = %fsops::shown(&rel_path),
            "a verified copy left by an interrupted placement is the only copy of its file: \
             scanning it again"
        );
        let staged_in = stagings[w.root.id.0]
            .as_ref()
            .and_then(|s| s.identity().ok());
        claims.push(w.root.new_claim(rel_path, &fresh, None, staged_in));
    }
    let ids = journal.claim(claims.clone()).await?;
    for ((id, claim), w) in ids.into_iter().zip(claims).zip(whole) {
        let fresh_temp = copy_temp_name(
            &w.root.instance,
            TempOf::Agent,
            &staged_token(&claim.staged),
            &claim.rel_path,
        );
        let fresh = claim.staged.file_name().unwrap_or_default().to_os_string();
        let Some(staging) = stagings[w.root.id.0].as_ref().map(Arc::clone) else {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_versions_numbered_temp_is_removed_renamed_left_or_judged() {
        use FileState::{Claimed, Decided, Placed, Placing};
        let cases = [
            // Its record's file still in staging: partial, whatever the record's state.
            (Some(Placing), Some(true), false, Numbered::Partial),
            (Some(Decided), Some(true), true, Numbered::Partial),
            // Gone from staging, its record placing: the sorter's verified copy.
            (Some(Placing), Some(false), false, Numbered::ForTheSorter),
            // An unfinished record otherwise, or staging not all readable: left.
            (Some(Decided), Some(false), false, Numbered::Leave),
            (Some(Placed), Some(false), false, Numbered::Leave),
            (Some(Claimed), None, false, Numbered::Leave),
            (Some(Placing), None, false, Numbered::Leave),
            // No unfinished record: a tool's (left) or judged by its content.
            (None, None, true, Numbered::Leave),
            (None, None, false, Numbered::Judge),
        ];
        for (state, staged_here, custody, want) in cases {
            assert_eq!(
                numbered_fate(state, staged_here, custody),
                want,
                "{state:?} {staged_here:?} custody={custody}"
            );
        }
    }
}
