//! Unit tests of the watch rules: ignored names, scope, filesystem kinds, the notify callback and
//! the walk rules.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use notify::Event;
use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::hints::{Hints, RootSignal, is_watch_limit};
use super::walk::{Walked, WarnedFolders, walk_blocking};
use super::{Candidate, is_ignored_name, is_out_of_scope};
use crate::config::{WatchConfig, WatchMode};
use crate::fsops::fstype::{FsKind, detect_fs, fs_kind_from_magic};
use crate::root::{Root, RootId};

fn config(recursive: bool) -> WatchConfig {
    WatchConfig {
        path: PathBuf::from("/in"),
        recursive,
        settle: Duration::from_secs(1),
        settle_empty: Duration::from_secs(60),
        keep_original: Duration::from_secs(600),
        lease_check: crate::config::LeaseCheck::Auto,
        keep_originals: crate::config::KeepOriginals::Unleased,
        held_open_limit: Duration::from_secs(600),
        tidy_after: None,
        save_temp_settle: Duration::from_secs(3600),
        mode: WatchMode::Auto,
        include: vec![crate::config::Pattern::new("*").unwrap()],
        exclude: vec![],
        clean_dir: PathBuf::from("/in/out/clean"),
        quarantine_dir: PathBuf::from("/in/quarantine"),
        failed_dir: PathBuf::from("/failed"),
        staging_dir: PathBuf::from("/in/.dropscan/default"),
        reconcile_interval: Duration::from_secs(60),
        poll_interval: Duration::from_secs(2),
    }
}

#[test]
fn ignored_names() {
    for name in [
        "a.part",
        "a.PART",
        "a.partial",
        "video.mp4.crdownload",
        "a.filepart",
        "x.tmp",
        "~$report.docx",
        ".~lock.report.odt#",
        ".syncthing.a.bin.tmp",
        "~syncthing~a.bin.tmp",
        ".hidden",
        ".",
        "",
    ] {
        assert!(is_ignored_name(OsStr::new(name)), "{name}");
    }
    for name in [
        "a.bin",
        "part",
        ".tmp.pdf",
        "tmp",
        "a.tmp.pdf",
        "report~$.docx",
        "年報.pdf",
    ] {
        let ignored = is_ignored_name(OsStr::new(name));
        assert_eq!(ignored, name.starts_with('.'), "{name}");
    }
}

#[test]
fn ignored_names_non_utf8() {
    use std::os::unix::ffi::OsStrExt;
    assert!(!is_ignored_name(OsStr::from_bytes(b"\xff\xfe.bin")));
    assert!(is_ignored_name(OsStr::from_bytes(b"\xff\xfe.part")));
    assert!(is_ignored_name(OsStr::from_bytes(b".\xff")));
}

#[test]
fn scope_excludes_own_and_dot_folders() {
    let w = config(true);
    assert!(!is_out_of_scope(&w, Path::new("/in/a.bin")));
    assert!(!is_out_of_scope(&w, Path::new("/in/sub/deep/a.bin")));
    assert!(!is_out_of_scope(&w, Path::new("/in/out/a.bin")));
    assert!(!is_out_of_scope(&w, Path::new("/in/out/cleaner/a.bin")));
    assert!(is_out_of_scope(&w, Path::new("/in/out/clean")));
    assert!(is_out_of_scope(&w, Path::new("/in/out/clean/a.bin")));
    assert!(is_out_of_scope(&w, Path::new("/in/quarantine/x/a.bin")));
    assert!(is_out_of_scope(
        &w,
        Path::new("/in/.dropscan/default/a.bin")
    ));
    assert!(is_out_of_scope(&w, Path::new("/in/sub/.git/a.bin")));
    assert!(is_out_of_scope(&w, Path::new("/elsewhere/a.bin")));
    assert!(is_out_of_scope(&w, Path::new("/in/../etc/passwd")));
    // The name itself is judged by is_ignored_name, not here.
    assert!(!is_out_of_scope(&w, Path::new("/in/.hidden")));
}

#[test]
fn scope_non_recursive_is_flat() {
    let w = config(false);
    assert!(!is_out_of_scope(&w, Path::new("/in/a.bin")));
    assert!(!is_out_of_scope(&w, Path::new("/in/sub")));
    assert!(is_out_of_scope(&w, Path::new("/in/sub/a.bin")));
}

#[test]
fn fs_magic_mapping() {
    assert_eq!(fs_kind_from_magic(0x6969), FsKind::Network("nfs"));
    assert_eq!(fs_kind_from_magic(0x517B), FsKind::Network("smb"));
    assert_eq!(fs_kind_from_magic(0xFF53_4D42), FsKind::Network("cifs"));
    assert_eq!(fs_kind_from_magic(0xFE53_4D42), FsKind::Network("smb2"));
    assert_eq!(fs_kind_from_magic(0x0102_1997), FsKind::Network("9p"));
    assert_eq!(fs_kind_from_magic(0x00C3_6400), FsKind::Network("ceph"));
    assert_eq!(fs_kind_from_magic(0x5346_414F), FsKind::Network("afs"));
    assert_eq!(fs_kind_from_magic(0x7375_7245), FsKind::Network("coda"));
    assert_eq!(fs_kind_from_magic(0x564C), FsKind::Network("ncp"));
    assert_eq!(fs_kind_from_magic(0x6573_5546), FsKind::Fuse);
    // ext4, xfs, btrfs, tmpfs, overlayfs
    for local in [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994, 0x794C_7630] {
        assert_eq!(fs_kind_from_magic(local), FsKind::Local, "{local:#x}");
    }
    assert!(FsKind::Network("nfs").needs_polling());
    assert!(FsKind::Fuse.needs_polling());
    assert!(FsKind::Unknown.needs_polling());
    assert!(!FsKind::Local.needs_polling());
}

#[test]
fn negative_f_type_maps_by_low_bits() {
    // On targets where f_type is a 32-bit signed long, CIFS's magic is negative.
    let as_i32 = 0xFF53_4D42_u32.cast_signed();
    assert_eq!(
        fs_kind_from_magic(as_i32.cast_unsigned()),
        FsKind::Network("cifs")
    );
}

#[test]
fn detect_fs_on_a_missing_path_is_unknown() {
    assert_eq!(
        detect_fs(Path::new("/nonexistent/dropscan/x")),
        FsKind::Unknown
    );
}

fn hints(
    w: WatchConfig,
    capacity: usize,
) -> (Hints, mpsc::Receiver<Candidate>, mpsc::Receiver<PathBuf>) {
    let (candidates_tx, candidates_rx) = mpsc::channel(capacity);
    let (folders_tx, folders_rx) = mpsc::channel(capacity);
    let hints = Hints {
        root: Arc::new(Root::new(RootId(0), w, false)),
        candidates_tx,
        folders_tx,
        signal: Arc::new(RootSignal::default()),
    };
    (hints, candidates_rx, folders_rx)
}

fn event(kind: EventKind, path: &str) -> notify::Result<Event> {
    Ok(Event::new(kind).add_path(PathBuf::from(path)))
}

#[test]
fn callback_forwards_files_and_folders() {
    let (h, mut candidates_rx, mut folders_rx) = hints(config(true), 8);
    h.handle(event(EventKind::Create(CreateKind::File), "/in/a.bin"));
    h.handle(event(
        EventKind::Access(AccessKind::Close(AccessMode::Write)),
        "/in/b.bin",
    ));
    h.handle(event(EventKind::Create(CreateKind::Folder), "/in/Übergabe"));
    // Ignored: temp names, own and dot folders, writes, removals.
    h.handle(event(EventKind::Create(CreateKind::File), "/in/a.part"));
    h.handle(event(
        EventKind::Create(CreateKind::File),
        "/in/quarantine/q.bin",
    ));
    h.handle(event(
        EventKind::Create(CreateKind::Folder),
        "/in/.dropscan/default/x",
    ));
    h.handle(event(EventKind::Create(CreateKind::Folder), "/in/.cache"));
    h.handle(event(
        EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any)),
        "/in/c.bin",
    ));
    h.handle(event(
        EventKind::Remove(notify::event::RemoveKind::File),
        "/in/d.bin",
    ));
    let mut got = Vec::new();
    while let Ok(c) = candidates_rx.try_recv() {
        got.push(c.path);
    }
    assert_eq!(
        got,
        vec![PathBuf::from("/in/a.bin"), PathBuf::from("/in/b.bin")]
    );
    assert_eq!(
        folders_rx.try_recv().unwrap(),
        PathBuf::from("/in/Übergabe")
    );
    assert!(folders_rx.try_recv().is_err());
    assert!(!h.signal.rescan.load(Ordering::Acquire));
}

#[test]
fn callback_full_channel_forces_rescan() {
    let (h, _candidates_rx, _folders_rx) = hints(config(true), 1);
    h.handle(event(EventKind::Create(CreateKind::File), "/in/a.bin"));
    assert!(!h.signal.rescan.load(Ordering::Acquire));
    h.handle(event(EventKind::Create(CreateKind::File), "/in/b.bin"));
    assert!(h.signal.rescan.load(Ordering::Acquire));
}

#[test]
fn callback_overflow_flag_forces_rescan() {
    let (h, _candidates_rx, _folders_rx) = hints(config(true), 8);
    h.handle(Ok(
        Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan)
    ));
    assert!(h.signal.rescan.load(Ordering::Acquire));
    assert!(!h.signal.degraded.load(Ordering::Acquire));
}

#[test]
fn callback_watch_limit_switches_to_polling() {
    let (h, _candidates_rx, _folders_rx) = hints(config(true), 8);
    h.handle(Err(notify::Error::new(notify::ErrorKind::MaxFilesWatch)));
    assert!(h.signal.degraded.load(Ordering::Acquire));
    assert!(h.signal.rescan.load(Ordering::Acquire));
    assert!(is_watch_limit(&notify::Error::io(
        io::Error::from_raw_os_error(libc::ENOSPC)
    )));
    assert!(!is_watch_limit(&notify::Error::path_not_found()));
}

#[test]
fn callback_root_removed_switches_to_polling() {
    let (h, _candidates_rx, _folders_rx) = hints(config(true), 8);
    h.handle(event(
        EventKind::Remove(notify::event::RemoveKind::File),
        "/in/a.bin",
    ));
    assert!(!h.signal.degraded.load(Ordering::Acquire));
    h.handle(event(
        EventKind::Remove(notify::event::RemoveKind::Folder),
        "/in",
    ));
    assert!(h.signal.degraded.load(Ordering::Acquire));
}

#[test]
fn walk_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let mut w = config(true);
    w.path = root.clone();
    w.clean_dir = root.join("out/clean");
    w.quarantine_dir = root.join("quarantine");
    w.failed_dir = root.join("failed");
    w.staging_dir = root.join(".dropscan/default");
    for dir in [
        "out/clean",
        "quarantine",
        "failed",
        ".dropscan/default",
        ".git",
        "a/b/c",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for file in [
        "top.bin",
        "x.part",
        "out/clean/no.bin",
        "out/yes.bin",
        "quarantine/no.bin",
        "failed/no.bin",
        ".dropscan/default/no.bin",
        ".git/no.bin",
        "a/b/c/deep.bin",
    ] {
        std::fs::write(root.join(file), b"x").unwrap();
    }
    std::os::unix::fs::symlink(root.join("a"), root.join("link")).unwrap();

    let listed = |w: &WatchConfig, start: &Path| {
        let (tx, mut rx) = mpsc::channel(100);
        let walked = walk_blocking(
            &Root::new(RootId(0), w.clone(), false),
            start,
            &tx,
            &CancellationToken::new(),
            &mut WarnedFolders::default(),
        );
        assert_eq!(walked, Walked::Done);
        let mut rels = Vec::new();
        while let Ok(c) = rx.try_recv() {
            rels.push(c.path.strip_prefix(&w.path).unwrap().to_path_buf());
        }
        rels.sort();
        rels
    };
    let rels = listed(&w, &root);
    let expected: Vec<PathBuf> = ["a/b/c/deep.bin", "link", "out/yes.bin", "top.bin"]
        .iter()
        .map(PathBuf::from)
        .collect();
    assert_eq!(rels, expected);
    assert_eq!(
        listed(&w, &root.join("a")),
        vec![PathBuf::from("a/b/c/deep.bin")]
    );
    assert!(listed(&w, &root.join("out/clean")).is_empty());

    w.recursive = false;
    let rels = listed(&w, &root);
    assert_eq!(rels, vec![PathBuf::from("link"), PathBuf::from("top.bin")]);
}

/// Waits (real time, bounded) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_watch_that_falls_back_from_inotify_to_polling_is_marked_degraded_and_chosen_polling_is_not()
 {
    for mode in [WatchMode::Notify, WatchMode::Poll] {
        let tmp = tempfile::tempdir().unwrap();
        let inbox = tmp.path().join("in");
        std::fs::create_dir(&inbox).unwrap();
        std::fs::write(inbox.join("a.bin"), b"abc").unwrap();
        let mut w = config(true);
        w.mode = mode;
        w.path.clone_from(&inbox);
        w.clean_dir = tmp.path().join("clean");
        w.quarantine_dir = tmp.path().join("quarantine");
        w.failed_dir = tmp.path().join("failed");
        w.staging_dir = inbox.join(".dropscan/default");
        let root = Arc::new(Root::new(RootId(0), w, false));
        let (candidates_tx, mut candidates_rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let task = super::root::RootTask::new(Arc::clone(&root), candidates_tx, shutdown.clone());
        let running = tokio::spawn(task.run());
        // The backlog listing comes after the watcher started.
        let first = tokio::time::timeout(Duration::from_secs(20), candidates_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.path, inbox.join("a.bin"));
        assert!(!root.status.degraded(), "{mode:?}: degraded from the start");

        // The inbox folder removed: inotify's watch dies with it, and the watch polls. (A
        // watch polling by choice has nothing to fall back from: checked above, after the
        // watch started.)
        if mode == WatchMode::Notify {
            std::fs::remove_dir_all(&inbox).unwrap();
            eventually("the watch is marked degraded", || root.status.degraded()).await;
        }
        shutdown.cancel();
        running.await.unwrap();
    }
}
