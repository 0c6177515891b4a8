//! The decisions of start-up reconciliation ([`super::reconcile`]), as pure functions: what
//! becomes of an unfinished record, given its state and whether its staged file is there, and
//! what an entry of a staging folder that no record names is. The caller does the I/O (journal
//! writes, renames, removals) each answer asks for.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use crate::fsops;
use crate::journal::FileState;

/// What start-up does with one unfinished record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// Claimed and staged: claim owns and hashes it again.
    Hash,
    /// Claimed, but the rename into staging never happened: the file is still in the inbox (and
    /// is seen again), or another agent or the user took it. Nothing of it was ours: the claim
    /// is dropped.
    Unclaim,
    /// Past its claim, and its staged file is gone: failed as vanished. `stale_scan`: a scan of
    /// it may be on the server, to be forgotten there.
    Vanished {
        /// A scan may be on the server.
        stale_scan: bool,
    },
    /// Hashed: queued for upload again.
    Upload,
    /// Sent, its acceptance unknown: the uploader asks the server.
    Unconfirmed,
    /// Accepted by the server: the poller asks for its verdict.
    Poll,
    /// Past its verdict: the sorter places it (or finishes placing it).
    Place,
    /// Nothing now: it waits for an identical file's verdict, or is done.
    Leave,
}

/// What start-up does with a record in `state` whose staged file `staged_exists`.
pub(super) fn route(state: FileState, staged_exists: bool) -> Route {
    match (state, staged_exists) {
        (FileState::Claimed, true) => Route::Hash,
        (FileState::Claimed, false) => Route::Unclaim,
        (FileState::Hashed | FileState::Waiting, false) => Route::Vanished { stale_scan: false },
        (FileState::Submitting | FileState::Submitted, false) => {
            Route::Vanished { stale_scan: true }
        }
        (FileState::Hashed, true) => Route::Upload,
        (FileState::Submitting, true) => Route::Unconfirmed,
        (FileState::Submitted, true) => Route::Poll,
        // Placement works from the journal: a missing staged file is the sorter's to judge (it
        // may have been moved already).
        (FileState::Decided | FileState::Placing | FileState::Placed, _) => Route::Place,
        (FileState::Waiting, true) | (FileState::Done, _) => Route::Leave,
    }
}

/// An entry of a staging folder that no unfinished record names and the journal does not keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Stray {
    /// Not ours to touch (not a regular file, or a name none of ours has).
    Skip,
    /// A partial copy: removed, with the reason for the log.
    Partial(&'static str),
    /// A user's file behind the staged name `staged`: it re-enters the pipeline as a new file.
    Orphan {
        /// The staged name its finished record, if any, would have.
        staged: OsString,
    },
    /// A kept original (`X.orig`) of the staged name `staged`: kept from now on if a record in
    /// flight names `staged`, else it re-enters like an orphan.
    Original {
        /// Its staged name.
        staged: OsString,
    },
}

/// What the entry `name` of a staging folder is; `regular`: it is a regular file; `siblings`:
/// every name in that folder.
pub(super) fn stray(name: &OsStr, regular: bool, siblings: &HashSet<OsString>) -> Stray {
    if !regular {
        return Stray::Skip;
    }
    let bytes = name.as_bytes();
    // A copy taken back from a destination, interrupted: the temp it came from is still there
    // (`fsops::place::take_back`).
    if bytes.ends_with(fsops::names::PARTIAL_SUFFIX.as_bytes()) {
        return Stray::Partial("a partial copy taken back into staging");
    }
    if bytes.ends_with(b".staged") {
        return Stray::Orphan {
            staged: name.to_os_string(),
        };
    }
    let Some(staged) = fsops::own::staged_name_of(name) else {
        return Stray::Skip;
    };
    if bytes.ends_with(b".copy") && siblings.contains(&staged) {
        return Stray::Partial("a partial private copy; its staged file is beside it");
    }
    if bytes.ends_with(b".orig") {
        return Stray::Original { staged };
    }
    Stray::Orphan { staged }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_with_and_without_its_staged_file() {
        use FileState as S;
        let table = [
            (S::Claimed, true, Route::Hash),
            (S::Claimed, false, Route::Unclaim),
            (S::Hashed, true, Route::Upload),
            (S::Hashed, false, Route::Vanished { stale_scan: false }),
            (S::Waiting, true, Route::Leave),
            (S::Waiting, false, Route::Vanished { stale_scan: false }),
            (S::Submitting, true, Route::Unconfirmed),
            (S::Submitting, false, Route::Vanished { stale_scan: true }),
            (S::Submitted, true, Route::Poll),
            (S::Submitted, false, Route::Vanished { stale_scan: true }),
            (S::Decided, true, Route::Place),
            (S::Decided, false, Route::Place),
            (S::Placing, false, Route::Place),
            (S::Placed, true, Route::Place),
            (S::Done, true, Route::Leave),
            (S::Done, false, Route::Leave),
        ];
        for (state, exists, want) in table {
            assert_eq!(route(state, exists), want, "{state:?}, staged {exists}");
        }
    }

    #[test]
    fn staging_entries_without_a_record() {
        let siblings: HashSet<OsString> = ["a.staged", "a.copy", "b.copy", "c.orig"]
            .into_iter()
            .map(OsString::from)
            .collect();
        let orphan = |s: &str| Stray::Orphan { staged: s.into() };
        let table = [
            ("a.staged", true, orphan("a.staged")),
            ("a.staged", false, Stray::Skip),
            (
                "a.copy",
                true,
                Stray::Partial("a partial private copy; its staged file is beside it"),
            ),
            ("b.copy", true, orphan("b.staged")),
            (
                "c.orig",
                true,
                Stray::Original {
                    staged: "c.staged".into(),
                },
            ),
            (
                "x.dropscan-partial",
                true,
                Stray::Partial("a partial copy taken back into staging"),
            ),
            (".owner", true, Stray::Skip),
            ("notes.txt", true, Stray::Skip),
        ];
        for (name, regular, want) in table {
            assert_eq!(stray(OsStr::new(name), regular, &siblings), want, "{name}");
        }
    }
}
