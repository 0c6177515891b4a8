//! Read leases: the kernel's answer to "does anyone hold this file open for writing?".
//!
//! `fcntl(F_SETLEASE, F_RDLCK)` on a descriptor opened read-only is refused with `EAGAIN` while
//! any process (smbd for an SMB client, Ganesha or knfsd for an NFS client, rsync, a local
//! program) holds the file open for writing or has it mapped writable. Once granted, the lease
//! is *broken* by the next open for writing or truncate: the opener blocks until the holder lets
//! go, for at most `/proc/sys/fs/lease-break-time` (45 s by default). So dropscan never keeps a
//! lease while it waits for anything: it takes one around a rename or a copy, asks
//! [`ReadLease::breaking`] between steps (`F_GETLEASE` answers `F_UNLCK` as soon as a break is
//! pending), and lets go at once when it is; the writer then goes on within one step.
//!
//! The kernel tells a lease holder of a break with `SIGIO`, whose default action ends the
//! process. dropscan polls instead, so [`ReadLease::take`] sets `SIGIO` to be ignored (once,
//! process-wide; nothing else in dropscan uses it, and hook commands get the default back).
//!
//! A lease needs `CAP_LEASE` on files the service user does not own (the systemd unit grants
//! it), a local filesystem that supports leases, and `fs.leases-enable = 1`. Where any of that
//! is missing the answer is [`LeaseRefused::Unsupported`], and the callers fall back to rules
//! that do not need it (see `settle` and `hashing`).
//!
//! The `unsafe` here: two `fcntl` calls with integer arguments on a descriptor borrowed for
//! the call, and one `signal` disposition. Neither rustix nor std offers leases. An ignored
//! signal stays ignored across `exec`, so hook commands put `SIGIO` back to its default in the
//! child (`hooks::deliver`). The crate's only other `unsafe` are `malloc_trim` and `mallopt` (`runtime`).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Once;

/// Why a read lease was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseRefused {
    /// Someone holds the file open for writing (or mapped writable): it is not complete.
    HeldOpen,
    /// Leases cannot be had here (no `CAP_LEASE` on another user's file, a filesystem without
    /// leases, `fs.leases-enable = 0`): the OS error number, for the message.
    Unsupported(i32),
    /// Leases are not asked here: a client mount (a lease would only see this machine's
    /// writers), or `lease_check = "off"` in the config.
    NotAsked(&'static str),
}

impl LeaseRefused {
    /// Words for a log line.
    pub fn describe(self) -> String {
        match self {
            LeaseRefused::HeldOpen => "held open for writing".into(),
            LeaseRefused::Unsupported(errno) => {
                let why = match errno {
                    libc::EACCES | libc::EPERM => {
                        "not permitted (the service needs CAP_LEASE for files of other users)"
                    }
                    libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP => {
                        "not supported by this filesystem"
                    }
                    libc::ENOLCK => "no lock table space",
                    _ => "refused",
                };
                format!("{why}: {}", std::io::Error::from_raw_os_error(errno))
            }
            LeaseRefused::NotAsked(why) => why.to_string(),
        }
    }
}

/// A read lease held on an open file; given back when dropped.
#[derive(Debug)]
pub struct ReadLease<'f> {
    fd: BorrowedFd<'f>,
}

static IGNORE_SIGIO: Once = Once::new();

impl<'f> ReadLease<'f> {
    /// Takes a read lease on `file`, which must be open read-only.
    pub fn take(file: &'f impl AsFd) -> Result<ReadLease<'f>, LeaseRefused> {
        IGNORE_SIGIO.call_once(|| {
            // SAFETY: setting a signal's disposition to SIG_IGN installs no handler and touches
            // no memory; SIGIO is used by nothing else in this process.
            #[allow(unsafe_code)]
            unsafe {
                libc::signal(libc::SIGIO, libc::SIG_IGN);
            }
        });
        let fd = file.as_fd();
        match fcntl_int(fd, libc::F_SETLEASE, libc::F_RDLCK) {
            Ok(_) => Ok(ReadLease { fd }),
            Err(libc::EAGAIN) => Err(LeaseRefused::HeldOpen),
            Err(errno) => Err(LeaseRefused::Unsupported(errno)),
        }
    }

    /// Whether someone has asked for the file since (an open for writing, a truncate): the
    /// caller stops what it is doing and drops the lease, so that the writer is not kept
    /// waiting. A lease the kernel already took back counts as broken too.
    pub fn breaking(&self) -> bool {
        !matches!(fcntl_int(self.fd, libc::F_GETLEASE, 0), Ok(l) if l == libc::F_RDLCK)
    }
}

impl Drop for ReadLease<'_> {
    fn drop(&mut self) {
        // Failure means the lease is gone already (taken back after the break time).
        fcntl_int(self.fd, libc::F_SETLEASE, libc::F_UNLCK).ok();
    }
}

/// Whether leases on files in `dir` are to be asked at all: not when `enabled` is off, and not on
/// a client mount (NFS, SMB, FUSE …), where the kernel grants them on behalf of this machine's
/// writers only and a writer on another machine would pass unseen.
pub fn check_here(dir: &super::Dir, enabled: bool) -> Result<(), LeaseRefused> {
    use super::fstype::{FsKind, kind_of_dir};
    if !enabled {
        return Err(LeaseRefused::NotAsked(
            "lease_check = \"off\" in the config",
        ));
    }
    match kind_of_dir(dir) {
        FsKind::Local => Ok(()),
        FsKind::Network(_) | FsKind::Fuse => Err(LeaseRefused::NotAsked(
            "the inbox is a client mount (a lease would not see writers on other machines)",
        )),
        FsKind::Unknown => Err(LeaseRefused::NotAsked(
            "the inbox's filesystem type is unknown (statfs failed)",
        )),
    }
}

/// One line for `dropscan check`: how open writers will be detected in the inbox `path`.
pub fn describe_for(path: &std::path::Path, enabled: bool) -> String {
    let dir = match super::Dir::open_trusted(path) {
        Ok(d) => d,
        Err(_) => return "not known until the inbox exists".into(),
    };
    match check_here(&dir, enabled) {
        Ok(()) if has_cap_lease() => "asked with a read lease (local filesystem, CAP_LEASE)".into(),
        Ok(()) => "asked with a read lease for files the service user owns; other users' files \
                   need CAP_LEASE (the packaged unit grants it), else completion rests on `settle`"
            .into(),
        Err(refused) => format!(
            "not asked: {}; completion rests on `settle` (make it longer than your writers' \
             longest pause) and originals are kept for `keep_original`",
            refused.describe()
        ),
    }
}

/// Whether this process may take leases on files of other users (`CAP_LEASE`, bit 28 of the
/// effective set in `/proc/self/status`).
fn has_cap_lease() -> bool {
    const CAP_LEASE: u32 = 28;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_LEASE) != 0)
}

/// Takes and gives back a read lease at once: whether anyone holds `file` open for writing now.
pub fn probe(file: &impl AsFd) -> Result<(), LeaseRefused> {
    ReadLease::take(file).map(drop)
}

/// `fcntl(fd, cmd, arg)` for the integer-argument commands used here.
fn fcntl_int(fd: BorrowedFd<'_>, cmd: libc::c_int, arg: libc::c_int) -> Result<i32, i32> {
    // SAFETY: `fd` is a live descriptor borrowed for the duration of the call, and F_SETLEASE /
    // F_GETLEASE take an integer argument (no pointer is passed).
    #[allow(unsafe_code)]
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL))
    } else {
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::time::{Duration, Instant};

    #[test]
    fn a_writer_holding_the_file_open_refuses_the_lease_and_closing_grants_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let writer = OpenOptions::new().append(true).open(&p).unwrap();
        let reader = File::open(&p).unwrap();
        assert_eq!(probe(&reader), Err(LeaseRefused::HeldOpen));
        drop(writer);
        assert_eq!(probe(&reader), Ok(()));
    }

    #[test]
    fn an_open_for_writing_marks_the_lease_breaking_and_waits_only_until_it_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let reader = File::open(&p).unwrap();
        let lease = ReadLease::take(&reader).unwrap();
        assert!(!lease.breaking());
        let p2 = p.clone();
        let t0 = Instant::now();
        let writer = std::thread::spawn(move || {
            OpenOptions::new().append(true).open(&p2).unwrap();
            t0.elapsed()
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lease.breaking() {
            assert!(
                Instant::now() < deadline,
                "the writer's open never broke the lease"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        drop(lease);
        let waited = writer.join().unwrap();
        // The writer waited for the lease (not the 45 s break time) and went on once it went.
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(40), "{waited:?}");
    }
}
