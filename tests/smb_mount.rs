//! An SMB client mount for tests: FUSE `smbnetfs` (Debian package `smbnetfs`) mounting the share
//! of a test [`Smbd`], so that a test can run dropscan on a client mount of a real Samba share,
//! as a user would who points the agent at a mounted NAS share. Kernel cifs cannot be mounted
//! here; smbnetfs goes through libsmbclient, and refuses what Windows share modes refuse (a
//! rename of a file held open), as a real SMB client mount does.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::shares_fixture::{Smbd, find_tool};

/// A mounted smbnetfs, unmounted on drop.
pub(crate) struct SmbMount {
    _home: tempfile::TempDir,
    mountpoint: PathBuf,
    share: PathBuf,
    child: Child,
}

impl SmbMount {
    /// Mounts `smbd`'s share; `Err` with a "skipped: …" line where smbnetfs or FUSE is missing.
    pub(crate) fn mount(smbd: &Smbd) -> Result<SmbMount, String> {
        let bin = find_tool("smbnetfs")
            .ok_or("skipped: smbnetfs not installed (Debian package smbnetfs)")?;
        if !Path::new("/dev/fuse").exists() {
            return Err("skipped: no /dev/fuse here".into());
        }
        let home = tempfile::Builder::new()
            .prefix("dropscan-smbnetfs-")
            .tempdir()
            .unwrap();
        let smb = home.path().join(".smb");
        std::fs::create_dir_all(&smb).unwrap();
        let conf = smb.join("smbnetfs.conf");
        std::fs::write(
            &conf,
            "auth \"guest\" \"\"\nhost 127.0.0.1 WORKGROUP visible=true\nsmb_query_browsers \"false\"\n",
        )
        .unwrap();
        std::fs::write(smb.join("smb.conf"), "[global]\n").unwrap();
        let mountpoint = home.path().join("mnt");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let child = Command::new(bin)
            .arg(&mountpoint)
            .arg("-f")
            .arg("-o")
            .arg(format!("config={}", conf.display()))
            .env("HOME", home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("skipped: cannot start smbnetfs: {e}"))?;
        // The share, as smbnetfs names it: host:port/share.
        let share = mountpoint
            .join(format!("127.0.0.1:{}", smbd.port()))
            .join("drop");
        let mut m = SmbMount {
            _home: home,
            mountpoint,
            share,
            child,
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if std::fs::read_dir(&m.share).is_ok() {
                return Ok(m);
            }
            if let Ok(Some(status)) = m.child.try_wait() {
                return Err(format!(
                    "skipped: smbnetfs exited ({status}); FUSE not usable here?"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err("skipped: the smbnetfs mount never showed the share".into())
    }

    /// The share's folder on the mount.
    pub(crate) fn share(&self) -> &Path {
        &self.share
    }
}

impl Drop for SmbMount {
    fn drop(&mut self) {
        for tool in ["fusermount", "fusermount3"] {
            if let Some(t) = find_tool(tool) {
                let ok = Command::new(t)
                    .arg("-u")
                    .arg(&self.mountpoint)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    break;
                }
            }
        }
        Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .stderr(Stdio::null())
            .status()
            .ok();
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
