//! Issue 19, finding 2: a share mounted over an inbox after the agent started. The root used to
//! be reopened at the next reconcile walk while inotify stayed on the covered folder and the
//! mode (notify or poll) stayed as chosen at start, so a late share was never polled and its
//! files waited for each reconcile walk (up to 3 min by default). Now a change of the mount
//! table (seen on `/proc/self/mountinfo`) rebuilds the root's watcher at once, and a late SMB
//! client mount, where files cannot be claimed safely, holds the watch with the reason.
//!
//! Both need root (to mount); FUSE `bindfs` and `smbnetfs` stand in for the share, with Samba's
//! smbd behind the second. Each prints "skipped: …" where something is missing.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::friction::{free_port, http_get};
use crate::shares_fixture::{Smbd, find_tool};
use crate::smb_mount::SmbMount;
use crate::util::{Outcome, World, bytes, wait_for};

/// Far longer than any bound below: a file found before it was found by the rebuilt watcher,
/// not by a reconcile walk.
const RECONCILE: &str = "10m";
const LIMIT: Duration = Duration::from_secs(60);

/// A mount over `target`, lazily unmounted on drop (also when an assertion fails).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status()
            .ok();
    }
}

fn mount(cmd: &mut Command, target: &Path) -> Option<Mounted> {
    let ok = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Some(Mounted(target.to_path_buf()))
    } else {
        eprintln!("skipped: cannot mount over {} here", target.display());
        None
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_mounted_over_the_inbox_after_start_is_polled_and_its_files_taken() {
    if !is_root() {
        eprintln!("skipped: needs root to mount");
        return;
    }
    let Some(bindfs) = find_tool("bindfs") else {
        eprintln!("skipped: bindfs not installed (Debian package bindfs)");
        return;
    };
    let mut w = World::quick().await;
    w.settle = "1s";
    w.reconcile = RECONCILE;
    let agent = w.start_agent();
    // The agent watches the local inbox with inotify.
    w.drop_file("before.txt", b"local, before the mount");
    w.wait_placed(1, LIMIT).await;
    // A FUSE share over the inbox; written beside the mount, as the server's other clients
    // would, so that no inotify event can reach the mount point.
    let server = w.dir.path().join("server");
    std::fs::create_dir_all(&server).unwrap();
    let mut cmd = Command::new(bindfs);
    cmd.args(["-o", "nonempty"]).arg(&server).arg(&w.inbox);
    let Some(mounted) = mount(&mut cmd, &w.inbox) else {
        agent.stop().await.0.unwrap();
        return;
    };
    // Users write into the share a while after it was mounted (the mount itself touches the
    // covered folder, which inotify reports: a file written at once was found by that alone).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late = bytes(70, 50_000);
    std::fs::write(server.join("late.bin"), &late).unwrap();
    let o = w.wait_placed(2, LIMIT).await;
    assert_eq!(o.get(Path::new("late.bin")), Some(&Outcome::Clean), "{o:?}");
    assert_eq!(std::fs::read(w.clean.join("late.bin")).unwrap(), late);
    // Unmounted again: the local folder is the inbox again, watched as before.
    drop(mounted);
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.drop_file("after.txt", b"local, after the unmount");
    let o = w.wait_placed(3, LIMIT).await;
    assert_eq!(
        o.get(Path::new("after.txt")),
        Some(&Outcome::Clean),
        "{o:?}"
    );
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_smb_client_mount_over_the_inbox_holds_the_watch_with_the_reason() {
    if !is_root() {
        eprintln!("skipped: needs root to mount");
        return;
    }
    let port = free_port();
    let mut w = World::quick().await;
    w.settle = "1s";
    w.reconcile = RECONCILE;
    w.more_watches = format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let server = w.dir.path().join("server");
    std::fs::create_dir_all(&server).unwrap();
    let smbd = match Smbd::start(&server) {
        Ok(s) => s,
        Err(skip) => {
            eprintln!("{skip}");
            return;
        }
    };
    let smb = match SmbMount::mount(&smbd) {
        Ok(m) => m,
        Err(skip) => {
            eprintln!("{skip}");
            return;
        }
    };
    let agent = w.start_agent();
    let ready = wait_for(LIMIT, || {
        http_get(port, "/readyz").filter(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
    assert!(ready.is_some(), "the agent never became ready");
    let mut bind = Command::new("mount");
    bind.arg("--bind").arg(smb.share()).arg(&w.inbox);
    let Some(mounted) = mount(&mut bind, &w.inbox) else {
        agent.stop().await.0.unwrap();
        return;
    };
    let local = w.dir.path().join("late.pdf");
    std::fs::write(&local, bytes(71, 20_000)).unwrap();
    let s = std::sync::Arc::new(smbd);
    let c = std::sync::Arc::clone(&s);
    tokio::task::spawn_blocking(move || c.put(&local, "late.pdf"))
        .await
        .unwrap();
    let held = wait_for(LIMIT, || {
        let r = http_get(port, "/readyz")?;
        let m = http_get(port, "/metrics")?;
        (r.starts_with("HTTP/1.1 503")
            && r.contains("watch held")
            && r.contains("cannot move a file without risking to replace another")
            && m.contains("dropscan_watches_held 1"))
        .then_some(r)
    })
    .await;
    let readyz = http_get(port, "/readyz").unwrap_or_default();
    drop(mounted);
    agent.stop().await.0.unwrap();
    assert!(held.is_some(), "watch not held with the reason: {readyz}");
    // Nothing taken, nothing lost: the file is still on the share, and was never uploaded.
    assert!(server.join("late.pdf").is_file());
    assert_eq!(w.emulator().state().stats().submits_accepted, 0);
    drop(smb);
}
