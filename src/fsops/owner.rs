//! The owner marker: which agent (host) a staging folder belongs to, refreshed by the running
//! agent and taken over only once its host is gone. See [`claim_owner`].

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Dir, FsError};

/// Name of the owner marker in a staging folder.
pub const OWNER_MARKER: &str = ".owner";
/// A marker not refreshed for this long belongs to an agent that is gone.
pub const OWNER_STALE_AFTER: Duration = Duration::from_secs(180);
/// How often a running agent refreshes its marker.
pub const OWNER_HEARTBEAT: Duration = Duration::from_secs(30);

/// Who runs an agent: the host's machine id (when readable) and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `/etc/machine-id`, if any.
    pub machine_id: String,
    /// The host name.
    pub host: String,
}

impl Owner {
    /// This host.
    pub fn this_host() -> Owner {
        let machine_id = std::fs::read_to_string("/etc/machine-id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        Owner { machine_id, host }
    }

    /// Both the machine id (when known on both sides) and the host name must match: cloned
    /// virtual machines often share a machine id.
    fn same_host(&self, other: &Owner) -> bool {
        let ids_agree = self.machine_id.is_empty()
            || other.machine_id.is_empty()
            || self.machine_id == other.machine_id;
        ids_agree && self.host == other.host
    }
}

/// The staging folder belongs to an agent on another host that is still alive.
#[derive(Debug, thiserror::Error)]
#[error(
    "the staging folder {shown} is in use by host {host} (marker refreshed {age_s} s ago): two hosts \
     must never share a sensor_instance_id / staging folder; give each host its own \
     [server].sensor_instance_id (if that host is retired, remove {shown}/{OWNER_MARKER})",
    shown = super::shown(staging)
)]
pub struct OwnerConflict {
    /// The staging folder.
    pub staging: PathBuf,
    /// The other host.
    pub host: String,
    /// Seconds since its last heartbeat.
    pub age_s: u64,
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads the marker: (owner, last heartbeat in unix seconds).
fn read_owner(staging: &Dir) -> Option<(Owner, u64)> {
    let (mut f, _) = staging.open_file(OsStr::new(OWNER_MARKER)).ok()?;
    let mut text = String::new();
    Read::by_ref(&mut f)
        .take(4096)
        .read_to_string(&mut text)
        .ok()?;
    let mut owner = Owner {
        machine_id: String::new(),
        host: String::new(),
    };
    let mut beat = 0;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("machine_id", v)) => owner.machine_id = v.to_string(),
            Some(("host", v)) => owner.host = v.to_string(),
            Some(("heartbeat", v)) => beat = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    Some((owner, beat))
}

/// Takes (or refreshes) the staging folder for `me`: refused while another host's marker is
/// fresh. A marker of another host older than [`OWNER_STALE_AFTER`] is taken over with a
/// warning. One whose heartbeat is ahead of this host's clock by more than that cannot be
/// judged by clocks (this clock may have stepped back): it is watched, by this host's
/// monotonic clock, for up to [`OWNER_STALE_AFTER`]; rewritten meanwhile, its host is alive and
/// the folder is refused. Blocks for that long in that case only: call it off the async threads.
pub fn claim_owner(staging: &Dir, me: &Owner) -> Result<(), FsError> {
    if let Some((other, beat)) = read_owner(staging) {
        if !other.same_host(me) {
            let now = unix_now();
            let conflict = |age_s| {
                FsError::Owner(Box::new(OwnerConflict {
                    staging: staging.path().to_path_buf(),
                    host: other.host.clone(),
                    age_s,
                }))
            };
            if now.abs_diff(beat) < OWNER_STALE_AFTER.as_secs() {
                return Err(conflict(now.saturating_sub(beat)));
            }
            if beat > now && refreshed_within(staging, beat, OWNER_STALE_AFTER) {
                return Err(conflict(0));
            }
            tracing::warn!(
                staging = %super::shown(staging.path()),
                host = %other.host,
                "taking over a staging folder whose previous owner stopped refreshing it"
            );
        }
    }
    // One writer of the marker per folder in this process: two agent generations (a stopped
    // one whose heartbeat still writes, the next one starting) share the one temp name.
    let writer = marker_writer(staging.identity()?);
    let _writing = writer.lock().unwrap_or_else(PoisonError::into_inner);
    let text = format!(
        "# dropscan: the agent that owns this staging folder\nmachine_id={}\nhost={}\npid={}\nheartbeat={}\n",
        me.machine_id,
        me.host,
        std::process::id(),
        unix_now()
    );
    let tmp = OsStr::new(".owner.tmp");
    staging.unlink(tmp).ok();
    let mut f = staging.create_file(tmp, 0o600)?;
    f.write_all(text.as_bytes())
        .map_err(|e| FsError::io(&staging.path().join(tmp), "write", e))?;
    f.sync_all()
        .map_err(|e| FsError::io(&staging.path().join(tmp), "fsync", e))?;
    // Never renamed while held open: SMB refuses it ("Device or resource busy").
    drop(f);
    rustix::fs::renameat(staging.fd(), tmp, staging.fd(), OWNER_MARKER).map_err(|e| {
        FsError::io(
            &staging.path().join(OWNER_MARKER),
            "rename",
            std::io::Error::from_raw_os_error(e.raw_os_error()),
        )
    })?;
    staging.fsync()
}

/// A staging folder's (dev, ino) and the lock of its marker's writers.
type MarkerWriter = ((u64, u64), Arc<Mutex<()>>);

/// The lock that serialises writing the owner marker of the staging folder `folder` (dev, ino)
/// within this process: [`claim_owner`] writes a fixed temp name, then renames it over the
/// marker. Unused locks are dropped; a folder's (dev, ino) is not reused while a writer holds
/// it open.
fn marker_writer(folder: (u64, u64)) -> Arc<Mutex<()>> {
    static WRITERS: Mutex<Vec<MarkerWriter>> = Mutex::new(Vec::new());
    let mut writers = WRITERS.lock().unwrap_or_else(PoisonError::into_inner);
    writers.retain(|(_, w)| Arc::strong_count(w) > 1);
    if let Some((_, w)) = writers.iter().find(|(k, _)| *k == folder) {
        return Arc::clone(w);
    }
    let w = Arc::new(Mutex::new(()));
    writers.push((folder, Arc::clone(&w)));
    w
}

/// Whether the owner marker's heartbeat moves on from `beat` within `window` (this host's
/// monotonic clock), looked at every second.
fn refreshed_within(staging: &Dir, beat: u64, window: Duration) -> bool {
    tracing::warn!(
        staging = %super::shown(staging.path()),
        "the staging folder's owner marker is ahead of this host's clock: watching whether its \
         host still refreshes it (up to {} s; remove the marker to skip if that host is retired)",
        window.as_secs()
    );
    let start = std::time::Instant::now();
    while start.elapsed() < window {
        std::thread::sleep(Duration::from_secs(1));
        if read_owner(staging).is_some_and(|(_, b)| b != beat) {
            return true;
        }
    }
    false
}

/// [`claim_owner`] unless the marker already names this host.
pub fn claim_owner_if_missing(staging: &Dir, me: &Owner) -> Result<(), FsError> {
    match read_owner(staging) {
        Some((o, _)) if o.same_host(me) => Ok(()),
        _ => claim_owner(staging, me),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review14: an agent generation that stops while its owner heartbeat still writes the
    /// marker (a slow fsync; the stop waits for it only `shutdown_grace`), and the next
    /// generation in the same process claiming the folder at its start, both wrote and renamed
    /// the one `.owner.tmp`: one removed or renamed away the other's, whose `create` (EEXIST)
    /// or `rename` (ENOENT, "vanished") then failed. A start that fails there holds the watch
    /// ("its staging folder cannot be used", an ERROR line, /readyz not ready until its next
    /// claim) and leaves its records in flight for the next start.
    #[test]
    fn two_claims_of_one_staging_folder_at_once_in_one_process_both_succeed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let me = Owner::this_host();
        let failures: Vec<String> = std::thread::scope(|s| {
            let claims: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let staging =
                            Dir::open_trusted(dir.path()).unwrap_or_else(|e| panic!("{e}"));
                        (0..300)
                            .filter_map(|_| claim_owner(&staging, &me).err())
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            claims
                .into_iter()
                .flat_map(|c| c.join().unwrap_or_default())
                .collect()
        });
        assert!(
            failures.is_empty(),
            "{} of 600 claims failed, e.g. {:?}",
            failures.len(),
            failures.first()
        );
    }
}
