//! The tee's side of the claim (issue 20): a big file just claimed is not owned here but by
//! the uploader, while it uploads it (`upload::tee`).

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ToOwn;
use crate::context::Shared;
use crate::pipeline::{Claimed, Content};

/// Sends the big files just claimed among `claimed` to the uploader, to be owned while they are
/// uploaded ([`tee_or_own`]); returns the others (`None`: the agent stops).
pub(super) async fn send_tees(
    shared: &Shared,
    claimed: Vec<ToOwn>,
    claimed_tx: &mpsc::Sender<Claimed>,
    shutdown: &CancellationToken,
) -> Option<Vec<ToOwn>> {
    let mut to_own = Vec::with_capacity(claimed.len());
    for job in claimed {
        match tee_or_own(shared, job).await {
            Ok(tee) => tokio::select! {
                biased;
                () = shutdown.cancelled() => return None,
                _ = claimed_tx.send(tee) => {}
            },
            Err(job) => to_own.push(job),
        }
    }
    Some(to_own)
}

/// A big file just claimed is owned by the uploader while it uploads it (the tee, issue 20,
/// `upload::tee`): its record becomes `submitting` under a scanId with no hash, and it goes to
/// the uploader not owned. Any other file (small, resumed, taken held open, over the server's
/// size limit), or a journal that refuses, is owned here (`Err`).
async fn tee_or_own(shared: &Shared, job: ToOwn) -> Result<Claimed, ToOwn> {
    let Some(stamp) = job.settled.filter(|_| !job.small && !job.held_open) else {
        return Err(job);
    };
    if shared
        .limits
        .max_object_size()
        .is_some_and(|max| stamp.size > max)
    {
        return Err(job);
    }
    let scan_id = crate::scanner::ScanId::generate();
    match shared.journal.teeing(job.id, scan_id.clone()).await {
        Ok(()) => Ok(Claimed {
            id: job.id,
            staged: job.staged,
            content: Content::Tee(scan_id),
            stamp,
        }),
        Err(e) => {
            tracing::debug!(id = job.id, error = %e, "not owned while uploaded: owned now");
            Err(job)
        }
    }
}
