//! What travels between the stages: one type per edge, named for its content.
//!
//! The stages never import each other: they meet here (the records) and in [`crate::context`]
//! (what they share). Messages carry little more than a journal id: the journal is the durable
//! bus, and a message only says "this record moved on". Who reads what from the journal when a
//! message was lost (the sweeps) is written in the journal's module docs.
//!
//! ```text
//!  watch ──Candidate──▶ settle ──Settled──▶ claim ──Claimed──▶ upload ──Submitted──▶ poll
//!                                            │                  ▲  │                  │
//!                                            │                  └──┼── Resubmit ◀─────┤
//!                                            └───────Verdict───────┴──────────────────┴──▶ sort ──Placement──▶ observers
//! ```

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};

use crate::fsops::Stamp;
use crate::journal::{Decision, FileId, FileRecord, Journal, JournalError};
use crate::limits::InFlight;
use crate::root::RootId;
use crate::scanner::ScanId;

/// A hint that something at `path` may be new or changed (a file, or a folder to list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its root.
    pub root: RootId,
    /// Absolute path, below the root.
    pub path: PathBuf,
}

/// A file whose size, mtime and ctime have not changed for the root's `settle` time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Its root.
    pub root: RootId,
    /// Absolute path.
    pub path: PathBuf,
    /// Path relative to the root.
    pub rel_path: PathBuf,
    /// Its size, identity and change times when it settled.
    pub stamp: Stamp,
    /// Taken although a writer still holds it open: it stayed unchanged and held open for the
    /// root's `held_open_limit` (a server that keeps descriptors open long after its client is
    /// done). Its original is kept rather than dropped (see `fsops::own`).
    pub held_open: bool,
}

/// A staged, hashed file ready for upload.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Journal record.
    pub id: FileId,
    /// Path in staging.
    pub staged: PathBuf,
    /// What its upload sends.
    pub content: Content,
    /// Its size and stamp when hashed (when claimed, for a file not owned yet).
    pub stamp: Stamp,
}

/// What the upload of a claimed file sends.
#[derive(Debug, Clone)]
pub enum Content {
    /// Its private copy, owned and hashed with this SHA-256.
    Hashed([u8; 32]),
    /// Its staged file, not owned yet: a big file owned while it is uploaded under this scan
    /// (the tee, issue 20), its record `submitting` with no hash
    /// ([`crate::journal::Journal::teeing`]).
    Tee(crate::scanner::ScanId),
}

impl Claimed {
    /// The upload a hashed record stands for (resumed, resubmitted or swept up); `None` for a
    /// record not hashed yet.
    pub fn from_record(r: &FileRecord) -> Option<Claimed> {
        Some(Claimed {
            id: r.id,
            staged: r.staged.clone(),
            content: Content::Hashed(r.sha256?),
            stamp: r.stamp?,
        })
    }
}

/// Journals `decisions`, then tells the sorter about each record decided (durable before
/// announce). The ids announced; on a journal error nothing was decided and nothing announced.
pub(crate) async fn decide_then_announce(
    journal: &Journal,
    verdicts_tx: &mpsc::Sender<Verdict>,
    decisions: Vec<(FileId, Decision)>,
) -> Result<Vec<FileId>, JournalError> {
    let decided = journal.decide_records(decisions).await?;
    let ids = decided.iter().map(|r| r.id).collect();
    for rec in decided {
        // A closed channel means shutdown; the sorter's sweep finds the record at start-up.
        let v = Verdict {
            id: rec.id,
            rec: Some(Box::new(rec)),
        };
        verdicts_tx.send(v).await.ok();
    }
    Ok(ids)
}

/// What hashing a staged file came to.
#[derive(Debug)]
pub(crate) enum Hashed {
    /// Ready for upload.
    Ready(Claimed),
    /// Waits for an identical file's verdict.
    Waiting,
    /// Decided without a scan: to the sorter.
    Decided(Vec<FileId>),
    /// The staged file is gone (the record is closed).
    Gone,
}

/// A scan the server accepted.
pub(crate) struct Submitted {
    /// Journal record.
    pub id: FileId,
    /// Its scanId.
    pub scan_id: ScanId,
    /// SHA-256 of the bytes sent.
    pub sha256: [u8; 32],
    /// Accepted scans of this file so far (this one included).
    pub attempts: u32,
    /// When the server accepted it (monotonic: the poller's `scan_timeout` counts from here).
    pub submitted_at: tokio::time::Instant,
    /// Its in-flight slot, freed when the verdict is final.
    pub slot: InFlight,
}

/// The backward edge into the uploader (from the poller after `error`/`timeout`, from the
/// sorter after a change, from the uploader's own sweep). It also knows which records are
/// being uploaded, so that the same record is never queued twice.
#[derive(Clone, Default)]
pub struct Resubmit {
    inner: Arc<(Mutex<Queue>, Notify)>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Claimed>,
    queued: HashSet<FileId>,
    uploading: HashSet<FileId>,
}

impl Resubmit {
    /// Queues a file for (re)submission, unless it is queued or being uploaded already.
    pub fn push(&self, c: Claimed) {
        let mut q = self.lock();
        if q.uploading.contains(&c.id) || !q.queued.insert(c.id) {
            return;
        }
        q.waiting.push_back(c);
        drop(q);
        self.inner.1.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.inner
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn pop(&self) -> Option<Claimed> {
        let mut q = self.lock();
        loop {
            let c = q.waiting.pop_front()?;
            q.queued.remove(&c.id);
            if q.uploading.insert(c.id) {
                return Some(c);
            }
        }
    }

    /// Marks a record as being uploaded; false if it already is.
    pub(crate) fn start(&self, id: FileId) -> bool {
        self.lock().uploading.insert(id)
    }

    pub(crate) fn finish(&self, id: FileId) {
        self.lock().uploading.remove(&id);
    }

    /// Waits until something is pushed.
    pub(crate) async fn notified(&self) {
        self.inner.1.notified().await;
    }

    /// Files waiting in the queue.
    pub fn len(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Whether the queue is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A record whose outcome is journaled and which is ready to be placed.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Journal record.
    pub id: FileId,
    /// The record as its decision committed it, when the sender has it: the sorter then places
    /// it without reading it back (issue 20). The journal refuses the destination if the
    /// record's outcome or content changed since ([`Journal::placing_checked`]).
    pub rec: Option<Box<FileRecord>>,
}

impl Verdict {
    /// A verdict announced by id alone: the sorter reads the record.
    pub fn of(id: FileId) -> Self {
        Verdict { id, rec: None }
    }
}

/// A file reached its destination.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Its watched root.
    pub root: PathBuf,
    /// Its path relative to the root.
    pub rel_path: PathBuf,
    /// Where it went.
    pub outcome: crate::journal::Outcome,
    /// Its final path.
    pub dest: PathBuf,
    /// The reason (failed) or a note.
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: FileId) -> Claimed {
        Claimed {
            id,
            staged: format!("/s/{id}").into(),
            content: Content::Hashed([0; 32]),
            stamp: Stamp {
                size: 1,
                mtime_ns: 0,
                ctime_ns: 0,
                dev: 0,
                ino: 0,
            },
        }
    }

    #[test]
    fn a_record_is_never_queued_or_uploaded_twice() {
        let q = Resubmit::default();
        q.push(item(1));
        q.push(item(1));
        q.push(item(2));
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop().map(|c| c.id), Some(1));
        // While 1 uploads, pushing it again is ignored, and the channel path refuses it.
        q.push(item(1));
        assert!(!q.start(1));
        assert_eq!(q.len(), 1);
        q.finish(1);
        q.push(item(1));
        assert!(q.start(3));
        q.push(item(3));
        assert_eq!(q.pop().map(|c| c.id), Some(2));
        assert_eq!(q.pop().map(|c| c.id), Some(1));
        assert!(q.pop().is_none());
    }
}
