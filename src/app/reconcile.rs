//! Start-up: the folders are opened as descriptors, every root is recognised, and the journal
//! is reconciled with the staging folders *before* any stage runs, so that every record is
//! handed to exactly one stage (see the rules in [`super`]'s docs).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::context::Shared;
use crate::error::FatalError;
use crate::fsops::roots::Which;
use crate::fsops::{self, Dir, FsError};
use crate::journal::{FileId, FileRecord, FileState};
use crate::pipeline::Claimed;
use crate::root::{Root, RootId, Roots};

use super::route::{Route, Stray, route, stray};

/// Opens every inbox and creates the destinations with their modes, each as a descriptor
/// ([`crate::fsops::roots::RootDirs`]); a destination inside an inbox is opened beneath it without following links.
/// Staging folders are left to [`reconcile`], which must first recognise each root.
pub(super) fn prepare_folders(config: &Config) -> Result<Roots, FatalError> {
    let mut all = Vec::with_capacity(config.watches.len());
    for (i, w) in config.watches.iter().enumerate() {
        let mut root = Root::new(RootId(i), w.clone(), false);
        let roots = root.dirs();
        let folder = |about| move |source| FatalError::Folder { about, source };
        let inbox = roots
            .get(Which::Inbox, false)
            .map_err(folder("watched folder"))?;
        for which in [Which::Clean, Which::Failed, Which::Quarantine] {
            match roots.get(which, true) {
                Ok(_) => {}
                // A destination others control (`fsops::dest`) is this watch's problem alone:
                // `recognise_root` holds the watch, every other watch goes on.
                Err(FsError::UnsafeDestination(_)) => {}
                Err(e) => return Err(folder("destination folder")(e)),
            }
        }
        if let Ok(quarantine) = roots.get(Which::Quarantine, false) {
            if let Ok(st) = rustix::fs::fstat(quarantine.fd()) {
                if st.st_mode & 0o077 != 0 {
                    tracing::warn!(
                        path = %fsops::shown(quarantine.path()),
                        mode = format!("{:o}", st.st_mode & 0o777),
                        "the quarantine folder is readable by others than its owner; consider chmod 0700"
                    );
                }
            }
        }
        let inbox_dev = inbox.identity().map_err(folder("watched folder"))?.0;
        // A held failed folder counts as another filesystem: hard links stay in the inbox.
        let failed_dev = match roots.get(Which::Failed, false) {
            Ok(d) => Some(d.identity().map_err(folder("failed folder"))?.0),
            Err(FsError::UnsafeDestination(_)) => None,
            Err(e) => return Err(folder("failed folder")(e)),
        };
        root.hard_links_ok = failed_dev == Some(inbox_dev);
        all.push(Arc::new(root));
    }
    Ok(Roots::new(all))
}

/// What became of a root at start-up.
enum Recognised {
    /// Its staging folder, locked for this agent and marked ours.
    Ready(Arc<Dir>),
    /// A problem of this watch alone (its staging folder is not dropscan's, or cannot be
    /// made; a destination others control): logged, shown on `/readyz` and in a metric; every
    /// other watch works.
    Held,
    /// Held until the folder given is back: its staging folder (a share not mounted yet) while
    /// files of it are in flight, or its inbox. Only when the agent can restart itself then
    /// ([`super::Agent::restart_into`]); otherwise start-up waits for the folder.
    Awaiting(PathBuf),
    /// Shutdown came while waiting for it.
    Shutdown,
}

/// Recognises root `i` before anything under it is judged: its staging folder must exist
/// (opened beneath the inbox, never through a link), be on the inbox's filesystem and be ours.
/// A missing staging folder while records of the root are in flight means the inbox is not
/// what it was (a share not mounted yet): wait for it rather than call every file vanished.
/// An entry planted where the staging folder belongs (a symlink, a file) is moved aside, never
/// followed, and a fresh folder made ([`crate::fsops::roots::RootDirs::get`]); with records in flight the watch is
/// held instead. Another agent holding the folder's lock (two agents configured with one
/// instance id) stops the start: only the configuration can fix that.
async fn recognise_root(
    shared: &Arc<Shared>,
    root: &Arc<Root>,
    in_flight: usize,
    hold_missing: bool,
    shutdown: &CancellationToken,
) -> Result<Recognised, FatalError> {
    let roots = root.dirs();
    let mut waited = 0u64;
    let found = loop {
        if waited > 0 {
            roots.forget();
        }
        let inbox_ok = roots.get(Which::Inbox, false).is_ok();
        match roots.staging_if_present() {
            Ok(Some(d)) => break Ok(d),
            Ok(None) if in_flight == 0 && inbox_ok => break roots.get(Which::Staging, true),
            Err(FsError::NotRegular { .. }) if in_flight == 0 && inbox_ok => {
                break roots.get(Which::Staging, true);
            }
            Err(e) => break Err(e),
            Ok(None) if hold_missing => return Ok(awaiting(shared, root, in_flight, inbox_ok)),
            Ok(None) => {
                if waited % 60 == 0 {
                    tracing::warn!(
                        inbox = %fsops::shown(roots.path(Which::Inbox)),
                        staging = %fsops::shown(roots.path(Which::Staging)),
                        files = in_flight,
                        "the staging folder is missing while files are in flight: is the share \
                         mounted? waiting for it (nothing is judged missing until it is back; if \
                         the folder is really gone, create it empty to let dropscan close the records)"
                    );
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(Recognised::Shutdown),
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
                waited += 1;
            }
        }
    };
    // Off the async threads: a marker of another host may have to be watched for a while.
    let (sh, root2) = (Arc::clone(shared), Arc::clone(root));
    let checked = tokio::task::spawn_blocking(move || {
        let roots = root2.dirs();
        let staging = found?;
        let inbox = roots.get(Which::Inbox, false)?;
        if inbox.identity()?.0 != staging.identity()?.0 {
            return Err(FsError::io(
                roots.path(Which::Staging),
                "use the staging folder (it must be on the inbox's filesystem)",
                std::io::Error::from(std::io::ErrorKind::CrossesDevices),
            ));
        }
        roots.hold_staging(&staging)?;
        fsops::roots::claim_owner(&staging, &sh.owner)?;
        roots.destinations_ready()?;
        Ok(staging)
    })
    .await
    .unwrap_or_else(|e| {
        Err(FsError::io(
            roots.path(Which::Staging),
            "check the staging folder",
            std::io::Error::other(e.to_string()),
        ))
    });
    match checked {
        Ok(staging) => {
            shared
                .metrics
                .set_watch_held(roots.path(Which::Inbox), None);
            Ok(Recognised::Ready(staging))
        }
        Err(e @ (FsError::Owner(_) | FsError::StagingInUse { .. })) => Err(FatalError::Folder {
            about: "staging folder",
            source: e,
        }),
        Err(e) => {
            tracing::error!(
                inbox = %fsops::shown(roots.path(Which::Inbox)),
                files = in_flight,
                error = %e,
                "this watch is held: its staging folder or a destination cannot be used (every \
                 other watch goes on; fix the folder and restart, or reload, to resume it)"
            );
            shared
                .metrics
                .set_watch_held(roots.path(Which::Inbox), Some(e.to_string()));
            Ok(Recognised::Held)
        }
    }
}

/// A watch held at start until a folder is back (see [`Recognised::Awaiting`]): its staging
/// folder, missing while `in_flight` files of it are in flight, or else its inbox (gone since the
/// agent looked at it); logged, and shown on `/readyz`.
fn awaiting(shared: &Shared, root: &Root, in_flight: usize, inbox_ok: bool) -> Recognised {
    let roots = root.dirs();
    let (inbox, staging) = (roots.path(Which::Inbox), roots.path(Which::Staging));
    let why = if inbox_ok {
        tracing::warn!(
            inbox = %fsops::shown(inbox),
            staging = %fsops::shown(staging),
            files = in_flight,
            "the staging folder is missing while files are in flight: is the share mounted? this \
             watch is held until it is back (every other watch goes on; nothing is judged missing \
             meanwhile; if the folder is really gone, create it empty to let dropscan close the \
             records)"
        );
        format!(
            "its staging folder {} is missing while {in_flight} files are in flight (a share not \
             mounted?)",
            fsops::shown(staging)
        )
    } else {
        tracing::warn!(inbox = %fsops::shown(inbox), "the inbox is gone: this watch is held until it is back");
        "its inbox is gone".to_string()
    };
    shared.metrics.set_watch_held(inbox, Some(why));
    Recognised::Awaiting(if inbox_ok { staging } else { inbox }.to_path_buf())
}

/// What each stage resumes with.
pub(super) struct Resume {
    pub(super) claimed: Vec<(FileId, PathBuf)>,
    pub(super) hashed: Vec<Claimed>,
    pub(super) submitting: Vec<crate::journal::FileRecord>,
    pub(super) submitted: Vec<crate::journal::FileRecord>,
    pub(super) to_place: Vec<FileId>,
    /// The folders that watches held at start wait for ([`Recognised::Awaiting`]).
    pub(super) awaited: Vec<PathBuf>,
}

/// Reconciles the journal with the staging folders; see the module docs.
pub(super) async fn reconcile(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    hold_missing: bool,
) -> Result<Resume, FatalError> {
    let journal = &shared.journal;
    let records = journal.in_states(&FileState::UNFINISHED).await?;
    let mut resume = Resume {
        claimed: Vec::new(),
        hashed: Vec::new(),
        submitting: Vec::new(),
        submitted: Vec::new(),
        to_place: Vec::new(),
        awaited: Vec::new(),
    };
    // Every root is recognised first; records of a root no longer configured are left alone
    // (the sorter says so when it meets them).
    let recognised = recognise_all(shared, &records, hold_missing, shutdown).await?;
    let Some((stagings, awaited)) = recognised else {
        return Ok(resume);
    };
    // A tool's copy (release, restore): while the tool holds custody (or died holding it), its
    // temp may be the only copy of the file, which the tool's next run finishes.
    resume.awaited = awaited;
    let custody: HashSet<FileId> = journal.in_custody().await?.into_iter().collect();
    let known: HashMap<PathBuf, FileId> =
        records.iter().map(|r| (r.staged.clone(), r.id)).collect();
    for r in records.clone() {
        resume_record(shared, &stagings, r, &mut resume).await?;
    }
    let orphans = strays(shared, &stagings, &known).await?;
    // Copy temps are judged while the orphans still carry the staged names the temps are named
    // after: re-entered first (under fresh names), an orphan's partial copy looked like the only
    // copy of a file whose staged file was gone, and was taken back and released as a file.
    super::leftovers::tidy(shared, &stagings, &records, &custody, &mut resume.claimed).await?;
    reenter(shared, &stagings, orphans, &mut resume.claimed).await?;
    let n = resume.claimed.len()
        + resume.hashed.len()
        + resume.submitting.len()
        + resume.submitted.len()
        + resume.to_place.len();
    if n > 0 {
        tracing::info!(
            files = n,
            submitted = resume.submitted.len(),
            unconfirmed = resume.submitting.len(),
            "resuming work from the journal"
        );
    }
    Ok(resume)
}

/// The staging folder of each root (by [`RootId`]), `None` for a held watch, and the folders
/// that held watches wait for; `None` when shutdown came first.
async fn recognise_all(
    shared: &Arc<Shared>,
    records: &[FileRecord],
    hold_missing: bool,
    shutdown: &CancellationToken,
) -> Result<Option<(Vec<Option<Arc<Dir>>>, Vec<PathBuf>)>, FatalError> {
    let mut stagings = Vec::with_capacity(shared.roots.len());
    let mut awaited = Vec::new();
    for root in shared.roots.iter() {
        let in_flight = records
            .iter()
            .filter(|r| shared.root_of(&r.root).is_some_and(|x| x.id == root.id))
            .count();
        match recognise_root(shared, root, in_flight, hold_missing, shutdown).await? {
            Recognised::Ready(d) => stagings.push(Some(d)),
            Recognised::Held => stagings.push(None),
            Recognised::Awaiting(folder) => {
                stagings.push(None);
                awaited.push(folder);
            }
            Recognised::Shutdown => return Ok(None),
        }
    }
    Ok(Some((stagings, awaited)))
}

/// Hands one unfinished record to the stage that resumes it ([`route`]), or closes it.
async fn resume_record(
    shared: &Arc<Shared>,
    stagings: &[Option<Arc<Dir>>],
    r: FileRecord,
    resume: &mut Resume,
) -> Result<(), FatalError> {
    let journal = &shared.journal;
    let Some(root) = shared.root_of(&r.root) else {
        tracing::warn!(id = r.id, root = %fsops::shown(&r.root), "record of a root that is no longer configured: left as it is");
        return Ok(());
    };
    let Some(staging) = &stagings[root.id.0] else {
        // A held watch: its records wait for the next start; no sweep of this agent takes
        // them up (`Shared::serves`).
        root.status.hold_record(r.staged.clone());
        return Ok(());
    };
    let mut r = r;
    if r.state == FileState::Submitting && r.sha256.is_none() {
        // Stopped while it was owned and uploaded at once (`upload::tee`): back to `claimed`,
        // its scan queued for deletion, and owned again below as any claimed record.
        journal.untee(r.id).await?;
        r.state = FileState::Claimed;
    }
    let name = r.staged.file_name().unwrap_or_default();
    if r.state == FileState::Claimed {
        // A crash while the hash owned the file (`fsops::own`): the original goes back to
        // its staged name, a partial copy goes.
        // On the blocking pool: it waits for an owning of the same file still running here
        // (a tee abandoned by a reload, `fsops::own::Owner`), up to one fsync.
        let (dir, staged_name) = (Arc::clone(staging), name.to_os_string());
        match fsops::blocking(move || fsops::own::repair(&dir, &staged_name)).await {
            // The original took its staged name back: a row keeping it under `X.orig` is
            // stale (the sweep would find a new `X.orig`, made when it is owned again, and
            // take it for changed).
            Ok(true) => {
                let orig = r.staged.with_file_name(fsops::own::orig_name(name));
                journal.unretain(orig, None).await?;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(id = r.id, error = %e, "cannot tidy a staged file's copy");
            }
        }
    }
    let staged_exists = staging.exists(name).map_err(|source| FatalError::Folder {
        about: "staging folder",
        source,
    })?;
    let covered = !staged_exists && staged_on_another_filesystem(&r, staging);
    if covered {
        tracing::warn!(
            id = r.id,
            path = %fsops::shown(&r.rel_path),
            "staged on another filesystem than the staging folder reached now (a share mounted \
             over the inbox, or unmounted since): kept for when that folder is reachable again"
        );
    }
    // A covered file resumes as if present: each stage waits for its folder as a running
    // agent's does (hashing keeps it `claimed`, the sorter retries its placement).
    match route(r.state, staged_exists || covered) {
        Route::Hash => resume.claimed.push((r.id, r.staged)),
        Route::Unclaim => journal.unclaim(vec![r.id]).await?,
        Route::Vanished { stale_scan } => {
            tracing::warn!(id = r.id, path = %fsops::shown(&r.rel_path), "staged file vanished while the agent was down");
            if let (true, Some(scan_id)) = (stale_scan, r.scan_id.clone()) {
                journal.stale_scan(scan_id.as_str().to_owned()).await?;
            }
            let failed = crate::error::FileError::Vanished.decision(false);
            journal.decide(vec![(r.id, failed)]).await?;
            journal
                .close_vanished(
                    r.id,
                    "vanished from staging while the agent was down".into(),
                )
                .await?;
        }
        Route::Upload => {
            if let Some(c) = Claimed::from_record(&r) {
                resume.hashed.push(c);
            }
        }
        Route::Unconfirmed => resume.submitting.push(r),
        Route::Poll => resume.submitted.push(r),
        Route::Place => resume.to_place.push(r.id),
        Route::Leave => {}
    }
    Ok(())
}

/// Whether `r`'s file was claimed into a staging folder on another filesystem than `staging`,
/// the one its path leads to now: a share mounted over the inbox covers that folder, or the
/// share it was on is unmounted. Only the device is compared: a folder made anew on the same
/// filesystem (the start-up warning's advice when the folder is really gone) lets its records
/// close. A record of a version that kept no folder, or a folder that cannot be looked at: no.
fn staged_on_another_filesystem(r: &FileRecord, staging: &Dir) -> bool {
    match (r.staging_folder, staging.identity()) {
        (Some((dev, _)), Ok((now, _))) => dev != now,
        _ => false,
    }
}

/// Staged files without an unfinished record ([`stray`]): the ones to re-enter as new files,
/// as (root, name now, the staged path a finished record would name it by).
///
/// Beside them, the hash's own names (`fsops::own`): a kept original (`X.orig`) is the user's
/// inode; one the journal does not keep (a crash before it was journaled) re-enters like an
/// orphan, never removed unseen. A copy (`X.copy`) beside its `X.staged` is partial and goes;
/// one alone re-enters too.
async fn strays(
    shared: &Arc<Shared>,
    stagings: &[Option<Arc<Dir>>],
    known: &HashMap<PathBuf, FileId>,
) -> Result<Vec<(RootId, OsString, PathBuf)>, FatalError> {
    let journal = &shared.journal;
    let kept: HashSet<PathBuf> = journal
        .retained()
        .await?
        .into_iter()
        .map(|k| k.orig)
        .collect();
    let mut orphans = Vec::new();
    for (root, staging) in shared.roots.iter().zip(stagings) {
        let Some(staging) = staging else { continue };
        let entries = staging.entries().map_err(|source| FatalError::Folder {
            about: "staging folder",
            source,
        })?;
        let names: HashSet<OsString> = entries.iter().map(|(n, _)| n.clone()).collect();
        for (name, st) in entries {
            let p = staging.path().join(&name);
            if known.contains_key(&p) || kept.contains(&p) {
                continue;
            }
            let staged = match stray(&name, st.is_regular(), &names) {
                Stray::Skip => continue,
                Stray::Partial(why) => {
                    fsops::place::remove_temp(staging, &name, why);
                    continue;
                }
                Stray::Orphan { staged } => staged,
                Stray::Original { staged } => {
                    if let Some(&id) = known.get(&staging.path().join(&staged)) {
                        // Its copy is in flight: kept from now on, like any other.
                        if journal.retain(id, p.clone(), st.stamp()).await? {
                            continue;
                        }
                    }
                    staged
                }
            };
            orphans.push((root.id, name, staging.path().join(staged)));
        }
    }
    Ok(orphans)
}

/// Re-enters stray staged files as new files: under their original path when a finished record
/// still names them (a file must never sit in staging behind a closed record), else under
/// `recovered/`.
async fn reenter(
    shared: &Arc<Shared>,
    stagings: &[Option<Arc<Dir>>],
    orphans: Vec<(RootId, OsString, PathBuf)>,
    claimed: &mut Vec<(FileId, PathBuf)>,
) -> Result<(), FatalError> {
    if orphans.is_empty() {
        return Ok(());
    }
    let journal = &shared.journal;
    let staged: Vec<PathBuf> = orphans.iter().map(|(_, _, p)| p.clone()).collect();
    let previous = journal.closed_records_of(staged).await?;
    let mut claims = Vec::new();
    let mut moves = Vec::new();
    for ((id, name, p), prev) in orphans.into_iter().zip(previous) {
        let Some(root) = shared.roots.get(id) else {
            continue;
        };
        let rel_path = if let Some(rel) = prev {
            tracing::warn!(path = %fsops::shown(&rel), "file still in staging behind a finished record: scanning it again");
            rel
        } else {
            tracing::warn!(path = %fsops::shown(&p), "file in staging without a journal record: scanning it as new");
            Path::new("recovered").join(&name)
        };
        // A fresh staged name: the old one may still be on a finished record.
        let fresh = OsString::from(format!("{}.staged", uuid::Uuid::new_v4().simple()));
        let staged_in = stagings[id.0].as_ref().and_then(|s| s.identity().ok());
        claims.push(root.new_claim(rel_path, &fresh, None, staged_in));
        moves.push((id, name, fresh));
    }
    let staged: Vec<PathBuf> = claims.iter().map(|c| c.staged.clone()).collect();
    let ids = journal.claim(claims).await?;
    for ((id, to), (root, from, fresh)) in ids.into_iter().zip(staged).zip(moves) {
        let Some(staging) = &stagings[root.0] else {
            continue;
        };
        match fsops::rename_noreplace(staging, &from, staging, &fresh) {
            Ok(_) => claimed.push((id, to)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-enter a staged file; retried at the next start");
                journal.unclaim(vec![id]).await?;
            }
        }
    }
    Ok(())
}
