//! Mount table changes: a share mounted over an inbox (or unmounted from under it) after the
//! agent started must be watched the way its new filesystem needs, within a second or two, not
//! at the next reconcile walk. The kernel signals every change of the mount table on
//! `/proc/self/mountinfo` (`POLLPRI`); one thread per process waits for it and bumps a counter
//! that every root task watches ([`subscribe`]). Where that file cannot be watched, the root
//! tasks still compare their root's identity on every poll and reconcile tick.

use std::io::{Read, Seek};
use std::sync::OnceLock;

use tokio::sync::watch;

/// The counter of mount table changes seen, and its thread (started on first use).
static CHANGES: OnceLock<watch::Sender<u64>> = OnceLock::new();

/// A receiver that wakes on every change of the mount table after this call.
pub(super) fn subscribe() -> watch::Receiver<u64> {
    CHANGES
        .get_or_init(|| {
            let (tx, _) = watch::channel(0);
            let bump = tx.clone();
            let started = std::thread::Builder::new()
                .name("dropscan-mounts".into())
                .spawn(move || wait_for_changes(&bump));
            if let Err(e) = started {
                tracing::warn!(error = %e, "cannot watch the mount table; mounts over an inbox are noticed at its next listing");
            }
            tx
        })
        .subscribe()
}

/// Waits on `/proc/self/mountinfo` for ever, bumping `tx` on each change.
fn wait_for_changes(tx: &watch::Sender<u64>) {
    let Ok(mut file) = std::fs::File::open("/proc/self/mountinfo") else {
        tracing::debug!("no /proc/self/mountinfo: mount changes are noticed at the next listing");
        return;
    };
    let mut sink = Vec::new();
    loop {
        // Reading the table to its end arms the next notification.
        sink.clear();
        if file
            .rewind()
            .and_then(|()| file.read_to_end(&mut sink))
            .is_err()
        {
            return;
        }
        let mut fds = [rustix::event::PollFd::new(
            &file,
            rustix::event::PollFlags::PRI | rustix::event::PollFlags::ERR,
        )];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {
                tx.send_modify(|n| *n += 1);
                // A mount is often several changes in a row: one wake-up for them.
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::debug!(error = %e, "cannot wait on the mount table");
                return;
            }
        }
    }
}
