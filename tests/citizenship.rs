//! A good citizen of the file server (issue 19), through a real Samba server: an inbox on an SMB
//! client mount is refused with the reason, Excel's save temps are not taken from under it,
//! desktop clutter is never uploaded and leftovers do not stay for ever, and a release keeps the
//! file's dates.
//!
//! A test whose server or client is missing prints "skipped: …" and returns (`.ci/run` installs
//! them).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use crate::shares_fixture::{Smbd, wait_bounded};
use crate::smb_mount::SmbMount;
use crate::util::{Outcome, World, bytes, wait_for};

const LIMIT: Duration = Duration::from_secs(90);

async fn smb_world(watch_extra: &str) -> Option<(World, Smbd)> {
    let mut w = World::quick().await;
    w.settle = "1s";
    w.watch_extra = watch_extra.to_string();
    match Smbd::start(&w.inbox) {
        Ok(s) => Some((w, s)),
        Err(skip) => {
            eprintln!("{skip}");
            None
        }
    }
}

fn uploads(w: &World) -> u64 {
    w.emulator().state().stats().submits_accepted
}

async fn client<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Every path below `dir` (files and folders), relative.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.insert(p.strip_prefix(base).unwrap().to_path_buf());
            if p.is_dir() && !p.is_symlink() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn set(paths: &[&str]) -> BTreeSet<PathBuf> {
    paths.iter().map(PathBuf::from).collect()
}

/// Runs the binary with `args` and `--config CONFIG`; its exit code and stderr.
fn run_dropscan(config: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_bounded(&mut child, Duration::from_secs(60));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

/// Finding 1: `check` passed on an inbox on an SMB client mount (so the unit's ExecStartPre
/// passed) and `run` then exited 69 in a restart loop (the owner marker renamed while open;
/// claims impossible: no RENAME_NOREPLACE, no hard links). Both must refuse it with the reason
/// and the alternative, with the exit code the unit does not restart on, and leave nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_on_an_smb_client_mount_is_refused_by_check_and_run_with_the_reason() {
    let Some((w, smbd)) = smb_world("").await else {
        return;
    };
    let mount = match SmbMount::mount(&smbd) {
        Ok(m) => m,
        Err(skip) => {
            eprintln!("{skip}");
            return;
        }
    };
    let config = w.write_config();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "path = \"inbox\"",
        &format!("path = \"{}\"", mount.share().display()),
    );
    std::fs::write(&config, text).unwrap();
    for args in [&["check", "--offline"][..], &["run"][..]] {
        let cfg = config.clone();
        let (code, err) = client(move || run_dropscan(&cfg, args)).await;
        assert_eq!(code, Some(78), "{args:?}: {err}");
        assert!(
            err.contains("cannot move a file without risking to replace another")
                && err.contains("run dropscan on the file server itself")
                && err.contains("watch[0].path"),
            "{args:?}: {err}"
        );
    }
    // Nothing left on the share: no probe, no staging folder.
    assert_eq!(tree(&w.inbox), BTreeSet::new());
    drop(mount);
}

/// Finding 3: Excel writes a workbook under an 8-hex-digit temp name and renames it over the
/// real name; a slow save to a share pauses between the two for longer than `settle`. The
/// temp was claimed: Excel's rename failed (NT_STATUS_OBJECT_NAME_NOT_FOUND) and clean got
/// `5A7C1E00`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_an_excel_save_paused_past_settle_is_not_taken_from_under_excel() {
    let Some((w, smbd)) = smb_world("").await else {
        return;
    };
    let agent = w.start_agent();
    let book = bytes(31, 300_000);
    let local = w.dir.path().join("save.tmp");
    std::fs::write(&local, &book).unwrap();
    let smbd = std::sync::Arc::new(smbd);
    let s = std::sync::Arc::clone(&smbd);
    let l = local.clone();
    client(move || s.put(&l, "5A7C1E00")).await;
    // The save's pause: four times `settle`, past which the temp used to be taken.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = std::sync::Arc::clone(&smbd);
    client(move || s.rename("5A7C1E00", "Book.xlsx")).await;
    let o = w.wait_placed(1, LIMIT).await;
    assert_eq!(
        o.get(Path::new("Book.xlsx")),
        Some(&Outcome::Clean),
        "{o:?}"
    );
    assert_eq!(std::fs::read(w.clean.join("Book.xlsx")).unwrap(), book);
    assert_eq!(uploads(&w), 1);
    agent.stop().await.0.unwrap();
}

/// Finding 4: `Thumbs.db` and `desktop.ini` were uploaded (a sandbox scan each) and released;
/// `._photo.jpg` stayed orphaned after `photo.jpg` left; `.DS_Store`, crashed `~$` owner files
/// and the folders clients made stayed for ever. Now: none of them is uploaded; orphaned
/// leftovers and the folder dropscan emptied go once `tidy_after` has passed; what is not a
/// leftover (a save temp, a system folder's content) stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_desktop_clutter_is_never_uploaded_and_leftovers_are_tidied() {
    let Some((w, smbd)) = smb_world("tidy_after = \"2s\"").await else {
        return;
    };
    let agent = w.start_agent();
    let src = w.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let files = [
        ("photo.jpg", 40),
        ("._photo.jpg", 41),
        ("Thumbs.db", 42),
        ("Report.docx", 43),
        ("~$port.docx", 44),
        ("5A7C1E00", 45),
        ("sub/doc.pdf", 46),
        ("sub/.DS_Store", 47),
        ("sub/desktop.ini", 48),
        ("sub/Thumbs.db", 49),
        ("$RECYCLE.BIN/old.bin", 50),
    ];
    let smbd = std::sync::Arc::new(smbd);
    for (i, (name, seed)) in files.iter().enumerate() {
        let local = src.join(format!("f{i}"));
        std::fs::write(&local, bytes(*seed, 5_000)).unwrap();
        let (s, n) = (std::sync::Arc::clone(&smbd), (*name).to_string());
        client(move || s.put(&local, &n)).await;
    }
    let o = w.wait_placed(3, LIMIT).await;
    for name in ["photo.jpg", "Report.docx", "sub/doc.pdf"] {
        assert_eq!(o.get(Path::new(name)), Some(&Outcome::Clean), "{o:?}");
    }
    // The inbox ends with what is not a leftover: the save temp (taken only after
    // `save_temp_settle`), the recycle bin, and the clutter beside that temp.
    let want = set(&[
        "5A7C1E00",
        "$RECYCLE.BIN",
        "$RECYCLE.BIN/old.bin",
        "Thumbs.db",
    ]);
    let left = wait_for(Duration::from_secs(60), || {
        let t = tree(&w.inbox);
        let t: BTreeSet<PathBuf> = t
            .into_iter()
            .filter(|p| !p.starts_with(".dropscan"))
            .collect();
        (t == want).then_some(t)
    })
    .await;
    assert!(left.is_some(), "inbox: {:?}", tree(&w.inbox));
    assert_eq!(uploads(&w), 3, "only the three documents were uploaded");
    let placed: BTreeSet<PathBuf> = tree(&w.clean)
        .into_iter()
        .filter(|p| p != Path::new(".dropscan-destination"))
        .collect();
    assert_eq!(
        placed,
        set(&["photo.jpg", "Report.docx", "sub", "sub/doc.pdf"])
    );
    agent.stop().await.0.unwrap();
}

/// Finding 5: a file written with an old mtime (as `rsync -a` or `cp -p` leave it) landed in
/// clean with the placement time. Through Samba (the client sets the write time), on the same
/// filesystem (a rename of dropscan's private copy) and on another one (a verified copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_a_release_keeps_the_files_modification_time() {
    for other_fs in [false, true] {
        let Some((mut w, smbd)) = smb_world("").await else {
            return;
        };
        let Ok(_shm) = crate::review6::on_shm_if(&mut w, other_fs) else {
            return;
        };
        let agent = w.start_agent();
        let local = w.dir.path().join("old.bin");
        std::fs::write(&local, bytes(60, 100_000)).unwrap();
        let smbd = std::sync::Arc::new(smbd);
        let s = std::sync::Arc::clone(&smbd);
        client(move || {
            s.client(&format!(
                "put {} old.bin; utimes old.bin -1 -1 2019:03:04-05:06:07 -1",
                local.display()
            ))
        })
        .await;
        let o = w.wait_placed(1, LIMIT).await;
        assert_eq!(o.get(Path::new("old.bin")), Some(&Outcome::Clean), "{o:?}");
        // 2019-03-04 05:06:07 in smbclient's time zone: within a day of it in any.
        let placed = std::fs::metadata(w.clean.join("old.bin")).unwrap();
        let set_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_551_675_967);
        let off = placed
            .modified()
            .unwrap()
            .duration_since(set_at)
            .unwrap_or_else(|e| e.duration());
        assert!(
            off < Duration::from_secs(86_400),
            "other filesystem: {other_fs}: mtime {:?}",
            placed.modified()
        );
        agent.stop().await.0.unwrap();
    }
}

/// Found by reading tidy: the inbox's own staging folder (`.dropscan`) counted as the root
/// folder's content, so a `.DS_Store` beside it stayed for ever even once every file was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ds_store_beside_only_dropscans_own_folders_is_tidied() {
    let mut w = World::quick().await;
    w.watch_extra = "tidy_after = \"1s\"".into();
    let agent = w.start_agent();
    w.drop_file("a.txt", b"a document");
    std::fs::write(w.inbox.join(".DS_Store"), b"finder state").unwrap();
    w.wait_placed(1, LIMIT).await;
    let tidied = wait_for(Duration::from_secs(60), || {
        (!w.inbox.join(".DS_Store").exists()).then_some(())
    })
    .await;
    let left = tree(&w.inbox);
    agent.stop().await.0.unwrap();
    assert!(tidied.is_some(), "inbox: {left:?}");
    assert!(left.iter().all(|p| p.starts_with(".dropscan")), "{left:?}");
}
