//! How many files settle waits on, per root: counted from its own maps after each look and
//! stored into each root's [`RootStatus`](crate::root::RootStatus), where the metrics read it
//! (`dropscan_inbox_settling_files`). Stored whole rather than bumped up and down, so a path
//! that leaves by any route (settled, vanished, not a file) can never leave the count off.

use crate::root::{RootId, Roots};

/// Counts `waiting` (the root of every file settle waits on) per root and publishes the counts;
/// a root with none gets 0. Returns the counts, in the roots' order.
pub(super) fn publish(roots: &Roots, waiting: impl Iterator<Item = RootId>) -> Vec<usize> {
    let mut counts = vec![0usize; roots.len()];
    for root in waiting {
        if let Some(n) = counts.get_mut(root.0) {
            *n += 1;
        }
    }
    for (root, n) in roots.iter().zip(&counts) {
        root.status
            .set_settling(u64::try_from(*n).unwrap_or(u64::MAX));
    }
    counts
}
