//! Why a placement waits for another try: the typed reason a [`super::Step::Retry`] carries.
//! It is formatted only where it is logged and journaled (`Sorter::record`).
//!
//! What this file does not do: decide when to retry (the sorter's backoff does).

use std::path::PathBuf;

use crate::fsops::{FsError, shown};
use crate::journal::JournalError;
use crate::scanner::{ApiError, ScanId};

/// Why a record stays where it is until the next attempt.
#[derive(Debug, thiserror::Error)]
pub(super) enum Retry {
    /// The journal could not be read or written.
    #[error("journal {about} failed: {source}")]
    Journal {
        /// `read` or `write`.
        about: &'static str,
        /// The journal's error.
        source: JournalError,
    },
    /// The record's root is not in the configuration any more.
    #[error(
        "{} is no longer a watched root in the config; the file stays in staging at {}",
        shown(root),
        shown(staged)
    )]
    RootGone {
        /// The root the record was claimed in.
        root: PathBuf,
        /// Its staged file.
        staged: PathBuf,
    },
    /// A placement started in a folder the configuration no longer names, and nothing says
    /// which one.
    #[error(
        "{} was being placed at {}, outside the configured {}: restore the earlier folder \
         setting so that dropscan can finish it there (the file is in staging, or hidden as {} \
         in that folder)",
        shown(original),
        shown(dest),
        shown(configured),
        shown(temp)
    )]
    PlacedOutside {
        /// The file's path in the inbox.
        original: PathBuf,
        /// The journaled destination.
        dest: PathBuf,
        /// The destination folder configured now.
        configured: PathBuf,
        /// The temporary name a verified copy would have.
        temp: PathBuf,
    },
    /// No destination name could be chosen.
    #[error("cannot place {} into {}: {source}", shown(original), shown(dest_root))]
    ChooseName {
        /// The file's path in the inbox.
        original: PathBuf,
        /// The destination folder.
        dest_root: PathBuf,
        /// What the filesystem said.
        source: FsError,
    },
    /// Another placement of the same file holds its lock.
    #[error(transparent)]
    Busy(FsError),
    /// The move failed.
    #[error(
        "{} stays in staging: cannot place it into {}: {source}",
        shown(original),
        shown(dest_root)
    )]
    Move {
        /// The file's path in the inbox.
        original: PathBuf,
        /// The destination folder.
        dest_root: PathBuf,
        /// What the filesystem said (naming the user's path).
        source: FsError,
    },
    /// The staging folder reached through its path is on another filesystem than the one the
    /// file was staged on (a share mounted over the inbox covers it): kept until it is back.
    #[error(
        "{} stays in staging: the staging folder is on another filesystem now than when the \
         file was staged (a share mounted over the inbox?); it is placed once that folder is \
         reachable again: {source}",
        shown(original)
    )]
    StagingCovered {
        /// The file's path in the inbox.
        original: PathBuf,
        /// What looking for it said (naming the user's path).
        source: FsError,
    },
    /// Every free name found was taken before the move.
    #[error(
        "{} stays in staging: no free destination name after 16 tries",
        shown(original)
    )]
    NoFreeName {
        /// The file's path in the inbox.
        original: PathBuf,
    },
    /// A file that can go neither to failed nor back to the inbox.
    #[error(
        "{} stays in staging: {why}; and it cannot be returned to the inbox: {source}",
        shown(rel)
    )]
    CannotReturn {
        /// Its path relative to the inbox.
        rel: PathBuf,
        /// Why it cannot go to the failed folder.
        why: Box<FsError>,
        /// Why it cannot go back.
        source: FsError,
    },
    /// The server's result could not be deleted.
    #[error("cannot delete result {scan_id} on the server: {source}")]
    Forget {
        /// The scan.
        scan_id: ScanId,
        /// The server's answer.
        source: ApiError,
    },
    /// Placed, but the sidecar beside it is not written yet.
    #[error(
        "{} is placed at {}, but its sidecar is not written yet: {source}",
        shown(rel),
        shown(dest)
    )]
    Sidecar {
        /// Its path relative to the inbox.
        rel: PathBuf,
        /// Where it was placed.
        dest: PathBuf,
        /// What the filesystem said.
        source: FsError,
    },
    /// A placement into a folder an earlier configuration named is still running.
    #[error(
        "{} is being placed into {} by a placement started before the configuration changed; \
         waiting for it",
        shown(rel),
        shown(root)
    )]
    EarlierPlacement {
        /// Its path relative to the inbox.
        rel: PathBuf,
        /// The earlier destination folder.
        root: PathBuf,
    },
    /// The folder an earlier configuration named, where the placement must finish, cannot be
    /// opened.
    #[error(
        "{} was being placed at {} when the configuration changed; that folder cannot be opened \
         ({source}): the file is kept there (hidden as {}, or already at that path). Make the \
         folder reachable again so that dropscan can finish it",
        shown(rel),
        shown(dest),
        shown(temp)
    )]
    EarlierFolder {
        /// Its path relative to the inbox.
        rel: PathBuf,
        /// The journaled destination.
        dest: PathBuf,
        /// The temporary name a verified copy would have.
        temp: PathBuf,
        /// What the filesystem said.
        source: FsError,
    },
}

impl Retry {
    /// A failed journal read.
    pub(super) fn read(source: JournalError) -> Self {
        Retry::Journal {
            about: "read",
            source,
        }
    }

    /// A failed journal write.
    pub(super) fn write(source: JournalError) -> Self {
        Retry::Journal {
            about: "write",
            source,
        }
    }
}
