//! The sorter's queue: records waiting to be placed, each at most once, popped one at a time or
//! as a batch of decided clean records of one watch (see `batch`).

use std::collections::{HashMap, VecDeque};

use super::batch;
use crate::journal::{FileId, FileRecord};

/// Records queued at most; more wait in the channel.
pub(super) const QUEUED: usize = 2 * batch::BATCH;

/// What one placement task does.
pub(super) enum Work {
    /// One record, as carried or read from the journal.
    One(FileId, Option<Box<FileRecord>>),
    /// A batch of decided clean records of one watch, as their decisions carried them.
    Batch(Vec<FileRecord>),
}

/// The records waiting to be placed, each at most once, with the record as decided when the
/// announcement carried it.
#[derive(Default)]
pub(super) struct Queue {
    order: VecDeque<FileId>,
    queued: HashMap<FileId, Option<Box<FileRecord>>>,
}

impl Queue {
    /// Queues `id`, to be read from the journal when its turn comes (a retry, the sweep, a
    /// resumed record): a record carried by an earlier announcement is dropped.
    pub(super) fn push(&mut self, id: FileId) {
        self.push_decided(id, None);
    }

    /// Queues `id` with its record as decided, if the announcement carried it.
    pub(super) fn push_decided(&mut self, id: FileId, rec: Option<Box<FileRecord>>) {
        if self.queued.insert(id, rec).is_none() {
            self.order.push_back(id);
        }
    }

    /// The next work: the next record alone, or, if it is [`batch::batchable`], a batch of it
    /// and the next batchable records of the same watch (up to [`batch::BATCH`]). Records
    /// `busy` now are dropped, as before: the sweep finds them again.
    pub(super) fn pop(&mut self, busy: impl Fn(FileId) -> bool) -> Option<Work> {
        let (id, rec) = loop {
            let id = self.order.pop_front()?;
            let rec = self.queued.remove(&id).flatten();
            if !busy(id) {
                break (id, rec);
            }
        };
        let first = match rec {
            Some(first) if first.id == id && batch::batchable(&first) => first,
            rec => return Some(Work::One(id, rec)),
        };
        let root = first.root.clone();
        let mut recs = vec![*first];
        let mut rest = VecDeque::with_capacity(self.order.len());
        while let Some(other) = self.order.pop_front() {
            let fits = recs.len() < batch::BATCH
                && !busy(other)
                && self.queued.get(&other).is_some_and(|r| {
                    r.as_ref()
                        .is_some_and(|r| r.id == other && r.root == root && batch::batchable(r))
                });
            match self.queued.remove(&other).flatten() {
                Some(r) if fits => recs.push(*r),
                r => {
                    self.queued.insert(other, r);
                    rest.push_back(other);
                }
            }
        }
        self.order = rest;
        Some(Work::Batch(recs))
    }

    pub(super) fn len(&self) -> usize {
        self.order.len()
    }
}
