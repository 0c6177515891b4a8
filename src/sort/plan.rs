//! The sorter's decisions, pure: where a decided record goes and how (`plan`), where a
//! placement interrupted in `placing` resumes (`resume`), and what a failed move means
//! (`after_failure`).

use std::path::{Path, PathBuf};

use crate::fsops::FsError;
use crate::journal::{FileState, Outcome};
use crate::root::Which;

/// Where a decided record goes, and how it is placed there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    pub(super) outcome: Outcome,
    pub(super) which: Which,
    /// Mode of a placed copy.
    pub(super) file_mode: u32,
    /// Mode of folders made on the way.
    pub(super) dir_mode: u32,
    /// A verified copy owned by dropscan (clean, quarantine) rather than the staged inode.
    pub(super) copy: bool,
    /// A release: the staged file must be the one hashed, the copy the hashed bytes.
    pub(super) clean: bool,
    /// Replaces the record's reason.
    pub(super) note: Option<&'static str>,
}

/// The placement plan of a record with `outcome`. Fail closed: clean only when the verdict is
/// `not detected` for exactly the hashed bytes (`clean_bound`); anything else that claims clean
/// goes to failed. Clean and quarantine get a copy owned by dropscan with a fixed mode (see
/// `fsops::place`); failed keeps the staged file itself (a hard-linked file must not be read).
pub(super) fn plan(outcome: Option<Outcome>, clean_bound: bool) -> Plan {
    let (outcome, note) = match outcome {
        Some(Outcome::Clean) if clean_bound => (Outcome::Clean, None),
        Some(Outcome::Clean) => (
            Outcome::Failed,
            Some("internal: the clean verdict does not match the content"),
        ),
        Some(o) => (o, None),
        None => (Outcome::Failed, None),
    };
    let (which, file_mode, dir_mode, copy) = match outcome {
        Outcome::Clean => (Which::Clean, 0o644, 0o755, true),
        Outcome::Quarantine => (Which::Quarantine, 0o600, 0o700, true),
        Outcome::Failed | Outcome::Vanished => (Which::Failed, 0o640, 0o750, false),
    };
    Plan {
        outcome,
        which,
        file_mode,
        dir_mode,
        copy,
        clean: outcome == Outcome::Clean,
        note,
    }
}

/// Where a placement resumes, by what its record journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Resume {
    /// No target journaled: a free name is chosen in the folder configured now.
    Fresh,
    /// The target was chosen in the folder configured now: tried again (`None`: it is not
    /// beneath that folder's path, and a free name is chosen).
    Here { rel: Option<PathBuf> },
    /// The target was chosen in another folder, configured then: it is looked at there first.
    Elsewhere {
        root: PathBuf,
        dest: PathBuf,
        rel: Option<PathBuf>,
    },
    /// The target lies outside the folder configured now, and no folder was journaled with it
    /// (a record from before folders were journaled): nothing is moved until someone looks.
    Outside { dest: PathBuf },
}

/// Where a record in `state` with the journaled `dest` (chosen in `dest_root`, when journaled)
/// resumes, the destination folder being `current_root` now.
pub(super) fn resume(
    state: FileState,
    dest: Option<&Path>,
    dest_root: Option<&Path>,
    current_root: &Path,
) -> Resume {
    let (FileState::Placing, Some(dest)) = (state, dest) else {
        return Resume::Fresh;
    };
    let chosen_in = dest_root.or_else(|| dest.starts_with(current_root).then_some(current_root));
    let Some(root) = chosen_in else {
        return Resume::Outside {
            dest: dest.to_path_buf(),
        };
    };
    let rel = dest.strip_prefix(root).map(Path::to_path_buf).ok();
    if root == current_root {
        Resume::Here { rel }
    } else {
        Resume::Elsewhere {
            root: root.to_path_buf(),
            dest: dest.to_path_buf(),
            rel,
        }
    }
}

/// What a failed move means, for a placement that copies (`copy`) and releases (`clean`) or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterFailure {
    /// Another placement of this file is in progress: later.
    Busy,
    /// A hard link (made after the claim) bound for a failed folder on another filesystem: it
    /// can be neither renamed there nor copied (that would read what it points to). It goes
    /// back where it was dropped, unread, every name kept; the claim leaves hard links there
    /// alone. The same for a file dropscan's user cannot read.
    BackToInbox,
    /// The name was taken meanwhile, or its folder removed meanwhile: choose again.
    ChooseAgain,
    /// The staged file is not there: covered by a mount, or gone.
    Vanished,
    /// The file changed since it was hashed: scanned again, never released on the old verdict
    /// (one predicate, checked on every attempt).
    Rescan,
    /// Anything else: the move is retried with backoff.
    Move,
}

pub(super) fn after_failure(e: &FsError, copy: bool, clean: bool) -> AfterFailure {
    match e {
        FsError::Busy { .. } => AfterFailure::Busy,
        FsError::HardLinked { .. } | FsError::Unreadable { .. } if !copy => {
            AfterFailure::BackToInbox
        }
        e if e.is_already_exists() || e.is_folder_gone() => AfterFailure::ChooseAgain,
        FsError::Vanished { .. } => AfterFailure::Vanished,
        FsError::Changed { .. } if clean => AfterFailure::Rescan,
        _ => AfterFailure::Move,
    }
}
