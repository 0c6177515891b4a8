//! Destinations: the standard a clean, quarantine or failed folder is held to, the marker that
//! says a folder is (or was) one, and the checks that keep placements out of a folder somebody
//! else controls. [`super::roots`] opens destinations through [`open`] and checks
//! [`still_leads_to`] whenever it hands one out.
//!
//! A destination is held to the staging folder's standard, because a user who controls it
//! controls what "clean" means: they could swap a released file for another, delete sidecars,
//! or rename the folder away so that what dropscan places lands in an ordinary inbox folder
//! and is claimed, scanned and placed again, one level deeper each time.
//!
//! - **Owned by dropscan's user (or root), writable by nobody else.** A destination dropscan's
//!   user owns with write bits for group or others is tightened (`chmod go-w`, with a warning
//!   naming the key): it is ours, and nobody else may write there. One owned by anybody else
//!   is refused (someone made it before dropscan did, e.g. a user who can write the inbox),
//!   naming the key: that watch is held (at start-up and before every batch of claims: nothing
//!   is claimed, files stay in the inbox, every other watch goes on), and a placement into it
//!   is held too, the file staying in staging, with the same message. (Outside an inbox, where
//!   only the administrator could have made it so, `app::preflight` makes it a configuration
//!   error when it runs as the service user.)
//! - **Inside an inbox, only where nobody else can rename it away.** The inbox must belong to
//!   dropscan's user or root, and be either writable by nobody else or sticky (`chmod +t`:
//!   others may then rename only their own entries), and every folder between the inbox and
//!   the destination must pass the destination's own test. Otherwise it is refused in the same
//!   way, also when the inbox is made world-writable at run time.
//! - **The path still leads to the open folder**, checked on every use: a destination renamed
//!   or replaced meanwhile is opened again from its path and judged again, never placed into
//!   through the descriptor of the folder that was renamed away.
//! - **A folder that is or was a destination is never claimed from.** Each destination holds a
//!   marker, [`MARKER`], made by dropscan's user; it moves with the folder when the folder is
//!   renamed, and only dropscan's user (or root) can make or remove one there. The watcher does
//!   not list a folder holding a genuine marker ([`marked`]), and the claim refuses a file with
//!   such a folder among its parents ([`open_unless_marked`]). A marker somebody else made (or a hard
//!   link to ours) is no marker: it cannot hide a folder from scanning.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use super::{Dir, FsError};

/// The marker in every destination folder: a regular file of dropscan's user, one link.
pub const MARKER: &str = ".dropscan-destination";

const MARKER_TEXT: &str = "# dropscan: this folder is (or was) a destination of dropscan \
(clean, quarantine or failed).\n# Nothing in it is ever claimed from, even if it is moved into \
an inbox. Remove this file only if the folder is no destination any more.\n";

/// Which configuration key names the folder, and where it is (for messages).
#[derive(Debug, Clone, Copy)]
pub struct Named<'a> {
    /// `clean_dir`, `quarantine_dir` or `failed_dir`.
    pub key: &'static str,
    /// The configured path.
    pub path: &'a Path,
}

impl<'a> Named<'a> {
    /// The destination of `key` at `path`.
    pub fn new(key: &'static str, path: &'a Path) -> Self {
        Named { key, path }
    }
}

impl super::roots::RootDirs {
    /// Opens (making them if missing) and judges every destination of this root: `Err` while
    /// one is not safe to place into ([`FsError::UnsafeDestination`]), which holds this watch
    /// alone. One that is merely unusable (missing, full, read-only, not mounted) is no reason
    /// to stop claiming: a placement there keeps its file in staging and retries.
    pub fn destinations_ready(&self) -> Result<(), FsError> {
        use super::roots::Which;
        for which in [Which::Clean, Which::Quarantine, Which::Failed] {
            if let Err(e @ FsError::UnsafeDestination(_)) = self.get(which, true) {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Whether a folder of `uid` is trusted: dropscan's user or root.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

fn fstat(d: &Dir) -> Result<rustix::fs::Stat, FsError> {
    rustix::fs::fstat(d.fd()).map_err(|e| {
        FsError::io(
            d.path(),
            "stat folder",
            std::io::Error::from_raw_os_error(e.raw_os_error()),
        )
    })
}

/// A destination refused: which key, which folder is found wanting, and what to do.
#[derive(Debug, thiserror::Error)]
#[error(
    "{key} = {}: {} {problem}; refused: {advice}",
    super::shown(dest),
    super::shown(path)
)]
pub struct Refusal {
    /// The configuration key: `clean_dir`, `quarantine_dir` or `failed_dir`.
    pub key: &'static str,
    /// The configured destination.
    pub dest: PathBuf,
    /// The folder found wanting (the destination, a folder above it, or its inbox).
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: String,
    /// What to do.
    pub advice: &'static str,
}

fn refused(named: Named<'_>, path: &Path, problem: String, advice: &'static str) -> FsError {
    FsError::UnsafeDestination(Box::new(Refusal {
        key: named.key,
        dest: named.path.to_path_buf(),
        path: path.to_path_buf(),
        problem,
        advice,
    }))
}

/// The destination's own test (also applied to every folder between an inbox and a destination
/// inside it): owned by dropscan's user or root, writable by nobody else. A folder of dropscan's
/// user with write bits for others is tightened when `fix` (with a warning); otherwise refused.
pub fn check_folder(d: &Dir, named: Named<'_>, fix: bool) -> Result<(), FsError> {
    let st = fstat(d)?;
    let mode = st.st_mode & 0o7777;
    if !trusted_owner(st.st_uid) {
        return Err(refused(
            named,
            d.path(),
            format!(
                "belongs to uid {} (mode {mode:o}), neither the dropscan user (uid {}) nor root: \
                 someone else made it, and could change or remove what dropscan places there{}",
                st.st_uid,
                rustix::process::geteuid().as_raw(),
                if rustix::process::geteuid().is_root() {
                    " (run as root, only root's folders are trusted: run the quarantine and \
                     failed tools as the service user, `sudo -u dropscan …`)"
                } else {
                    ""
                }
            ),
            "remove it (dropscan then makes its own), or chown it to the dropscan user and chmod go-w it",
        ));
    }
    if mode & 0o022 == 0 {
        return Ok(());
    }
    if fix && st.st_uid == rustix::process::geteuid().as_raw() {
        let tight = mode & !0o022;
        rustix::fs::fchmod(d.fd(), rustix::fs::Mode::from_raw_mode(tight)).map_err(|e| {
            FsError::io(
                d.path(),
                "chmod folder",
                std::io::Error::from_raw_os_error(e.raw_os_error()),
            )
        })?;
        // Some filesystems (a CIFS mount without Unix extensions) accept the chmod and keep
        // the mode: look again rather than trust it.
        if fstat(d)?.st_mode & 0o022 == 0 {
            tracing::warn!(
                key = named.key,
                path = %super::shown(d.path()),
                was = format!("{mode:o}"),
                now = format!("{tight:o}"),
                "a destination must be writable by dropscan only: removed the write bits of group and others"
            );
            return Ok(());
        }
    }
    Err(refused(
        named,
        d.path(),
        format!(
            "is writable by group or others (mode {mode:o}, owner uid {}), who could change or \
             remove what dropscan places there",
            st.st_uid
        ),
        "chmod go-w it (on a network mount: mount it so that the mode holds)",
    ))
}

/// The inbox must not let anybody else rename a destination inside it away: it belongs to
/// dropscan's user or root and is writable by nobody else, or sticky.
pub fn check_inbox_holds(inbox: &Dir, named: Named<'_>) -> Result<(), FsError> {
    let st = fstat(inbox)?;
    let mode = st.st_mode & 0o7777;
    let sticky = mode & 0o1000 != 0;
    if trusted_owner(st.st_uid) && (mode & 0o022 == 0 || sticky) {
        return Ok(());
    }
    let who = if trusted_owner(st.st_uid) {
        "other users can write it"
    } else {
        "it belongs to another user"
    };
    Err(refused(
        named,
        inbox.path(),
        format!(
            "(the inbox it is in) lets others rename it away (owner uid {}, mode {mode:o}: \
             {who}{}), after which dropscan would place files into an ordinary inbox folder",
            st.st_uid,
            if sticky { "" } else { ", no sticky bit" }
        ),
        "move the destination out of the inbox, or chown the inbox to the dropscan user (or root) \
         and make it sticky (chmod +t) or writable by nobody else",
    ))
}

/// The full test of a destination `rel` inside `inbox`: the inbox holds it, and every folder
/// from the first below the inbox down to the destination itself passes [`check_folder`].
pub fn check_beneath(inbox: &Dir, rel: &Path, named: Named<'_>, fix: bool) -> Result<(), FsError> {
    check_inbox_holds(inbox, named)?;
    let mut cur = inbox.try_clone()?;
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(FsError::NotBeneath {
                path: rel.to_path_buf(),
            });
        };
        cur = cur.open_dir(Path::new(name))?;
        check_folder(&cur, named, fix)?;
    }
    Ok(())
}

/// Opens the destination `named` (made if missing, with `mode`, when `create`) and judges it:
/// beneath `inbox` (the inbox's descriptor and the destination's path in it) where it lies
/// inside one, else at its configured path. Its marker is made if missing.
pub fn open(
    inbox: Option<(&Dir, &Path)>,
    named: Named<'_>,
    mode: u32,
    create: bool,
) -> Result<Dir, FsError> {
    let dir = match inbox {
        Some((inbox, rel)) => {
            // Nothing is made in an inbox that could rename it away.
            check_inbox_holds(inbox, named)?;
            let dir = if create {
                inbox.create_dirs(rel, mode)?
            } else {
                inbox.open_dir(rel)?
            };
            check_beneath(inbox, rel, named, true)?;
            dir
        }
        None => {
            if create {
                super::roots::create_trusted(named.path, mode)?;
            }
            let dir = Dir::open_trusted(named.path)?;
            check_folder(&dir, named, true)?;
            dir
        }
    };
    ensure_marker(&dir)?;
    Ok(dir)
}

/// Whether the open destination `d` may still be placed into: its path still leads to it
/// (`false`, after a warning, when it was renamed, removed or replaced: the caller opens it
/// again), and it and its inbox still pass their tests (an error holds placements).
pub fn still_leads_to(
    d: &Dir,
    inbox: Option<(&Dir, &Path)>,
    named: Named<'_>,
) -> Result<bool, FsError> {
    let now = match inbox {
        Some((inbox, rel)) => {
            check_inbox_holds(inbox, named)?;
            match inbox.open_dir(rel) {
                Ok(found) => Some(found.identity()?),
                Err(FsError::Vanished { .. } | FsError::NotRegular { .. }) => None,
                Err(e) => return Err(e),
            }
        }
        None => rustix::fs::stat(named.path)
            .ok()
            .map(|st| (st.st_dev, st.st_ino)),
    };
    if now != Some(d.identity()?) {
        tracing::warn!(
            key = named.key,
            path = %super::shown(named.path),
            "the destination is another folder now (renamed, removed or replaced): it is opened \
             again and judged again; nothing more is placed into the old one, nor claimed from it"
        );
        return Ok(false);
    }
    check_folder(d, named, true)?;
    Ok(true)
}

/// Makes the marker in a destination folder that passed its test, unless a genuine one is
/// there already.
pub fn ensure_marker(d: &Dir) -> Result<(), FsError> {
    if is_marked(d) {
        return Ok(());
    }
    let name = OsStr::new(MARKER);
    // Something else under the name (a file of a user who could write here before the folder
    // was tightened): the folder passed its test, so it is ours to replace.
    if d.exists(name)? {
        d.unlink(name)?;
    }
    let mut f = d.create_file(name, 0o644)?;
    let path = d.path().join(MARKER);
    f.write_all(MARKER_TEXT.as_bytes())
        .map_err(|e| FsError::io(&path, "write", e))?;
    f.sync_all().map_err(|e| FsError::io(&path, "fsync", e))?;
    d.fsync()
}

/// Whether `d` holds a genuine marker: a regular file with one link, of dropscan's user or
/// root.
pub fn is_marked(d: &Dir) -> bool {
    d.stamp(OsStr::new(MARKER))
        .is_ok_and(|st| st.nlink == 1 && trusted_owner(st.uid))
}

/// [`is_marked`] for a folder just listed: looked at only when `names` hold the marker's name.
pub fn marked<'a>(d: &Dir, mut names: impl Iterator<Item = &'a OsStr>) -> bool {
    names.any(|n| n == MARKER) && is_marked(d)
}

/// Opens the folder `rel` beneath `inbox` (the folder part of a file's path), one folder at a
/// time, unless one of them (the inbox itself excluded) holds a genuine marker: `None` then, the
/// file is in a folder that is or was a destination. Costs one stat per folder of `rel` more than
/// opening it, nothing for a file at the top.
pub fn open_unless_marked(inbox: &Dir, rel: &Path) -> Result<Option<Dir>, FsError> {
    let mut cur = inbox.try_clone()?;
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(FsError::NotBeneath {
                path: rel.to_path_buf(),
            });
        };
        cur = cur.open_dir(Path::new(name))?;
        if is_marked(&cur) {
            return Ok(None);
        }
    }
    Ok(Some(cur))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::{MARKER, Named, check_folder, ensure_marker, is_marked, open_unless_marked};
    use crate::fsops::{Dir, FsError};

    fn named() -> Named<'static> {
        Named {
            key: "clean_dir",
            path: Path::new("/srv/clean"),
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// Ours with write bits for others: tightened, not refused. Another user's: refused, naming
    /// the key and the owner (root can make one to test with).
    #[test]
    fn a_destination_of_ours_is_tightened_and_another_users_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let ours = d.path().join("ours");
        std::fs::create_dir(&ours).unwrap();
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o777)).unwrap();
        check_folder(&Dir::open_trusted(&ours).unwrap(), named(), true).unwrap();
        assert_eq!(mode(&ours), 0o755);
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = check_folder(&Dir::open_trusted(&ours).unwrap(), named(), false).unwrap_err();
        assert!(e.to_string().contains("chmod go-w"), "{e}");
        if !rustix::process::geteuid().is_root() {
            println!("skipped: a folder of another user needs root to make");
            return;
        }
        let theirs = d.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let e = check_folder(&Dir::open_trusted(&theirs).unwrap(), named(), true).unwrap_err();
        assert!(matches!(e, FsError::UnsafeDestination(_)), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("clean_dir") && text.contains("uid 65534"),
            "{text}"
        );
    }

    /// Only a marker of ours with one link counts: one planted by another user, or a hard link
    /// to ours, cannot hide a folder from scanning.
    #[test]
    fn only_a_genuine_marker_marks_a_folder() {
        let d = tempfile::tempdir().unwrap();
        let inbox = d.path().join("inbox");
        let dest = inbox.join("a/clean.old");
        std::fs::create_dir_all(dest.join("sub")).unwrap();
        let inbox_dir = Dir::open_trusted(&inbox).unwrap();
        assert!(
            open_unless_marked(&inbox_dir, Path::new("a/clean.old/sub"))
                .unwrap()
                .is_some()
        );
        let dest_dir = Dir::open_trusted(&dest).unwrap();
        ensure_marker(&dest_dir).unwrap();
        assert!(is_marked(&dest_dir));
        // The marker moved with its folder: everything below it is out of reach of the claim.
        assert!(
            open_unless_marked(&inbox_dir, Path::new("a/clean.old/sub"))
                .unwrap()
                .is_none()
        );
        assert!(
            open_unless_marked(&inbox_dir, Path::new("a"))
                .unwrap()
                .is_some()
        );
        // A hard link to our marker elsewhere marks nothing (and unmarks the original, whose
        // link count is 2 now: it is made again at the next open of the destination).
        let planted = inbox.join("a").join(MARKER);
        std::fs::hard_link(dest.join(MARKER), &planted).unwrap();
        assert!(!is_marked(&Dir::open_trusted(&inbox.join("a")).unwrap()));
        std::fs::remove_file(&planted).unwrap();
        if rustix::process::geteuid().is_root() {
            std::fs::write(&planted, b"").unwrap();
            std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
            assert!(!is_marked(&Dir::open_trusted(&inbox.join("a")).unwrap()));
        }
    }
}
