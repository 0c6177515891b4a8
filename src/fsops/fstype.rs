//! Which kind of filesystem a folder is on, by `statfs` magic: local (inotify sees every change,
//! and a read lease sees every writer), or network and FUSE client mounts (changes made on other
//! machines raise no event, so the root is polled, and a lease there only sees this machine's
//! writers, so it is not asked). Only detects: the watcher chooses notify or polling
//! (`watch/root.rs`), and [`crate::fsops::lease::check_here`] whether leases can be trusted.

use std::path::Path;

use tracing::debug;

/// What kind of filesystem a root is on, as far as watching it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// A local filesystem (ext4, xfs, btrfs, tmpfs, overlay, …): inotify sees every change.
    Local,
    /// A network filesystem, by name: changes made by other hosts raise no inotify event.
    Network(&'static str),
    /// FUSE (sshfs, rclone, s3fs, glusterfs, virtiofs, …): events depend on the daemon behind it.
    Fuse,
    /// `statfs` failed, so the kind is not known.
    Unknown,
}

impl FsKind {
    /// True when inotify cannot be trusted there and the root must be polled.
    pub fn needs_polling(self) -> bool {
        !matches!(self, FsKind::Local)
    }
}

/// Network filesystems by `statfs` magic (linux/magic.h and the vendors' headers).
const NETWORK_MAGICS: &[(u32, &str)] = &[
    (0x6969, "nfs"),
    (0x517B, "smb"),
    (0xFF53_4D42, "cifs"),
    (0xFE53_4D42, "smb2"),
    (0x0102_1997, "9p"),
    (0x00C3_6400, "ceph"),
    (0x5346_414F, "afs"),
    (0x6B41_4653, "kafs"),
    (0x7375_7245, "coda"),
    (0x564C, "ncp"),
    (0x0116_1970, "gfs2"),
    (0x7461_636F, "ocfs2"),
    (0x0BD0_0BD0, "lustre"),
    (0x4750_4653, "gpfs"),
    (0xAAD7_AAEA, "panfs"),
    (0x2003_0528, "orangefs"),
    (0x1983_0326, "beegfs"),
    (0x786F_4256, "vboxsf"),
    (0xBACB_ACBC, "vmhgfs"),
];

/// FUSE's `statfs` magic.
const FUSE_MAGIC: u32 = 0x6573_5546;

/// Maps a `statfs` `f_type` to a kind.
pub fn fs_kind_from_magic(magic: u32) -> FsKind {
    if magic == FUSE_MAGIC {
        return FsKind::Fuse;
    }
    NETWORK_MAGICS
        .iter()
        .find(|(m, _)| *m == magic)
        .map_or(FsKind::Local, |(_, name)| FsKind::Network(name))
}

/// The kind of filesystem the open folder `dir` is on, by `fstatfs` magic.
pub fn kind_of_dir(dir: &super::Dir) -> FsKind {
    match rustix::fs::fstatfs(dir.fd()) {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::unnecessary_cast
        )]
        Ok(st) => fs_kind_from_magic(st.f_type as u32),
        Err(_) => FsKind::Unknown,
    }
}

/// The kind of filesystem `path` is on, by `statfs` magic.
pub fn detect_fs(path: &Path) -> FsKind {
    match rustix::fs::statfs(path) {
        // `f_type` is a signed long on most targets; the magic is its low 32 bits.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::unnecessary_cast
        )]
        Ok(st) => fs_kind_from_magic(st.f_type as u32),
        Err(e) => {
            debug!(path = %crate::fsops::shown(path), error = %e, "statfs failed");
            FsKind::Unknown
        }
    }
}
