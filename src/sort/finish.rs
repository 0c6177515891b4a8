//! The end of a placement: the sidecar beside quarantined and failed files, `placed` journaled
//! with its notifications, the event and the log line; and placements started in a destination
//! folder the configuration no longer names.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{Retry, Sorter, Step};
use crate::fsops::{self, FsError, blocking};
use crate::journal::{FileRecord, FileState, Outcome, ScanVerdict, now_ms};
use crate::pipeline::Placement;
use crate::root::{Root, Which};
use crate::scanner::ScanId;

/// The sidecar written beside quarantined and failed files.
#[derive(Serialize)]
struct Sidecar<'a> {
    original_path: String,
    size: Option<u64>,
    sha256: Option<String>,
    outcome: &'a str,
    verdict: Option<&'a str>,
    reason: Option<&'a str>,
    scan_ids: &'a [ScanId],
    verdict_reused: bool,
    dropped_at: Option<String>,
    claimed_at: String,
    placed_at: String,
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

impl Sorter {
    pub(super) async fn finish_placement(
        &self,
        rec: FileRecord,
        outcome: Outcome,
        reason: Option<String>,
        which: Which,
        dest_root: &Path,
        rel: PathBuf,
    ) -> Step {
        let Some(src) = self.shared.root_of(&rec.root).cloned() else {
            return Step::Retry(Retry::RootGone {
                root: rec.root.clone(),
                staged: rec.staged.clone(),
            });
        };
        let dest = dest_root.join(&rel);
        if outcome != Outcome::Clean {
            // A reused verdict's record has no scan of its own: its sidecar names the scan
            // whose verdict it reused.
            let reused_scan: Vec<ScanId> = match (&rec.scan_ids[..], rec.reused, &rec.scan_id) {
                ([], true, Some(id)) => vec![id.clone()],
                _ => Vec::new(),
            };
            let scan_ids = if reused_scan.is_empty() {
                &rec.scan_ids
            } else {
                &reused_scan
            };
            let sidecar = Sidecar {
                original_path: rec.root.join(&rec.rel_path).display().to_string(),
                size: rec.stamp.map(|s| s.size),
                sha256: rec.sha256.map(|s| hex(&s)),
                outcome: outcome.as_str(),
                verdict: rec.verdict.map(ScanVerdict::as_str),
                reason: reason.as_deref(),
                scan_ids,
                verdict_reused: rec.reused,
                dropped_at: rec.dropped_at_ms.map(rfc3339),
                claimed_at: rfc3339(rec.claimed_at_ms),
                placed_at: rfc3339(now_ms()),
            };
            let bytes = serde_json::to_vec_pretty(&sidecar).unwrap_or_default();
            let mode = if outcome == Outcome::Quarantine {
                0o600
            } else {
                0o644
            };
            let (rel2, root) = (rel.clone(), dest_root.to_path_buf());
            let written = blocking(move || {
                let root = open_dest(&src, which, &root, false)?;
                fsops::place::write_sidecar(&root, &rel2, &bytes, mode, &src.instance)
            })
            .await;
            if let Err(e) = written {
                // The file is placed; a missing sidecar is retried, never a reason to move again.
                return Step::Retry(Retry::Sidecar {
                    rel: rec.rel_path.clone(),
                    dest,
                    source: e,
                });
            }
        }
        let events =
            crate::hooks::events_for(&self.shared.config, &rec, outcome, &dest, reason.as_deref());
        if let Err(e) = self.shared.journal.placed_with_events(rec.id, events).await {
            return Step::Retry(Retry::write(e));
        }
        self.announce(&rec, outcome, reason, dest);
        let mut rec = rec;
        rec.state = FileState::Placed;
        self.delete_result(&rec).await
    }

    /// What follows a committed `placed`: the metrics, the log line and the event.
    pub(super) fn announce(
        &self,
        rec: &FileRecord,
        outcome: Outcome,
        reason: Option<String>,
        dest: PathBuf,
    ) {
        // From the moment the drop was complete (its last change in the inbox) to placement.
        let since = rec
            .dropped_at_ms
            .unwrap_or(rec.claimed_at_ms)
            .min(rec.claimed_at_ms);
        let latency = u64::try_from(now_ms().saturating_sub(since)).unwrap_or(0);
        self.shared.metrics.placed(outcome, latency);
        tracing::info!(
            path = %fsops::shown(&rec.rel_path),
            size = rec.stamp.map_or(0, |s| s.size),
            sha256 = %rec.sha256.map(|s| hex(&s)).unwrap_or_default(),
            outcome = outcome.as_str(),
            verdict = rec.verdict.map_or("-", ScanVerdict::as_str),
            reason = reason.as_deref().unwrap_or("-"),
            reused = rec.reused,
            since_drop_ms = latency,
            dest = %fsops::shown(&dest),
            "placed"
        );
        self.shared
            .events
            .send(Placement {
                root: rec.root.clone(),
                rel_path: rec.rel_path.clone(),
                outcome,
                dest,
                reason,
            })
            .ok();
    }

    /// A record in `placing` whose destination was chosen in `root`, which the configuration no
    /// longer names (changed, then a restart or a reload). While the staged file is there,
    /// nothing was released: a partial copy in the old folder is removed and the file goes
    /// where the configuration says now (`Ok(false)`). Once it is gone, the verified copy or
    /// the placed file is in the old folder: the placement is finished there (`Ok(true)`), or
    /// kept open with the reason while that folder cannot be opened (`Err`): never "vanished"
    /// for having been looked for in the wrong place.
    pub(super) async fn root_changed(
        &self,
        rec: &FileRecord,
        root: &Path,
        dest: &Path,
        temp: &std::ffi::OsStr,
    ) -> Result<bool, Retry> {
        let (sh, staged, old, temp2) = (
            Arc::clone(&self.shared),
            rec.staged.clone(),
            root.to_path_buf(),
            temp.to_os_string(),
        );
        let found = blocking(move || {
            let (staging, name) = sh.staging_of(&staged)?;
            let staged_here = staging.exists(&name)?;
            // A placement into the old folder still running (started before a reload): it
            // finishes there; this one waits for it rather than choose again.
            if staged_here && fsops::place::placement_in_progress(&staging, &name) {
                return Err(FsError::Busy {
                    path: staging.path().join(&name),
                });
            }
            let old_dir = fsops::Dir::open_trusted(&old);
            if staged_here {
                if let Ok(d) = &old_dir {
                    if d.exists(&temp2).unwrap_or(false) {
                        fsops::place::remove_temp(
                            d,
                            &temp2,
                            "a partial copy; its file is still in staging and goes to the folder now configured",
                        );
                    }
                }
                return Ok(None);
            }
            old_dir.map(|_| Some(()))
        })
        .await;
        match found {
            Ok(None) => {
                tracing::warn!(
                    path = %fsops::shown(&rec.rel_path),
                    was = %fsops::shown(root),
                    "the destination folder changed before this file was placed: placing it into the folder now configured"
                );
                Ok(false)
            }
            Ok(Some(())) => {
                tracing::warn!(
                    path = %fsops::shown(&rec.rel_path),
                    root = %fsops::shown(root),
                    "finishing a placement in the folder it was started in (the configuration names another one now)"
                );
                Ok(true)
            }
            Err(FsError::Busy { .. }) => Err(Retry::EarlierPlacement {
                rel: rec.rel_path.clone(),
                root: root.to_path_buf(),
            }),
            Err(source) => Err(Retry::EarlierFolder {
                rel: rec.rel_path.clone(),
                dest: dest.to_path_buf(),
                temp: PathBuf::from(temp),
                source,
            }),
        }
    }
}

/// Opens the destination root `root` of the watched root `src`: the configured folder through
/// its descriptor, or a folder an earlier configuration named (a placement finished where it
/// was started).
pub(super) fn open_dest(
    src: &Root,
    which: Which,
    root: &Path,
    create: bool,
) -> Result<Arc<fsops::Dir>, FsError> {
    if src.folder_path(which) == root {
        src.folder(which, create)
    } else {
        fsops::Dir::open_trusted(root).map(Arc::new)
    }
}
