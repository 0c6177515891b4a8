//! watch → settle on real folders: backlog, live files, slow writers, filters, odd file types.
//!
//! Real time with deadlines: every wait polls for a condition. A negative check ("never
//! settled") waits for a barrier file dropped after the ones that must not appear; "the listing
//! at start is over" waits for a marker file left before the start. The only fixed sleeps are
//! the slow writers' pauses, which are the scenario. Settle's timing alone is tested with the
//! clock paused, in `src/settle/tests.rs`.
#![allow(clippy::unwrap_used)] // test helpers, outside #[test] fns

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use dropscan::config::{Pattern, WatchConfig, WatchMode};
use dropscan::settle::{self, SETTLED_CAPACITY, Settled};
use dropscan::watch::{self, CANDIDATES_CAPACITY};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(5);

/// A file left in the inbox before the start, see `Inbox::wait_for_start_listing`.
pub(crate) const START_MARKER: &str = "listed-at-start.bin";

fn globs(list: &[&str]) -> Vec<Pattern> {
    list.iter().map(|g| Pattern::new(g).unwrap()).collect()
}

pub(crate) fn config(root: &Path, mode: WatchMode, settle: Duration) -> WatchConfig {
    WatchConfig {
        path: root.to_path_buf(),
        recursive: true,
        settle,
        // Longer than `settle`, short enough for the deadlines here.
        settle_empty: settle * 3,
        keep_original: Duration::from_secs(600),
        lease_check: dropscan::config::LeaseCheck::Auto,
        keep_originals: dropscan::config::KeepOriginals::Unleased,
        held_open_limit: Duration::from_secs(600),
        tidy_after: None,
        save_temp_settle: Duration::from_secs(3600),
        mode,
        include: globs(&["*"]),
        exclude: vec![],
        clean_dir: root.join("clean"),
        quarantine_dir: root.join("quarantine"),
        failed_dir: root.join("failed"),
        staging_dir: root.join(".dropscan/default"),
        // Long: live files must arrive through notify (or polling), not a reconcile.
        reconcile_interval: Duration::from_secs(60),
        poll_interval: Duration::from_millis(100),
    }
}

/// A running watch + settle pair on one temp inbox.
pub(crate) struct Inbox {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    settled_rx: mpsc::Receiver<Settled>,
    seen: Vec<Settled>,
    shutdown: CancellationToken,
    watch: JoinHandle<Result<(), watch::WatchError>>,
    settle: JoinHandle<()>,
}

impl Inbox {
    pub(crate) fn tempdir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("inbox");
        fs::create_dir(&root).unwrap();
        (tmp, root)
    }

    pub(crate) fn start(tmp: tempfile::TempDir, config: WatchConfig) -> Self {
        // RUST_LOG=dropscan=debug shows what the stages did (captured unless the test fails).
        crate::util::init_tracing();
        let root = config.path.clone();
        let watches = dropscan::root::Roots::new(dropscan::root::Root::all(&[config]));
        let (candidates_tx, candidates_rx) = mpsc::channel(CANDIDATES_CAPACITY);
        let (settled_tx, settled_rx) = mpsc::channel(SETTLED_CAPACITY);
        let shutdown = CancellationToken::new();
        let watch = tokio::spawn(watch::run(
            watches.clone(),
            vec![candidates_tx],
            tokio::sync::watch::channel(0).1,
            shutdown.clone(),
        ));
        let settle = tokio::spawn(settle::run(
            watches,
            vec![candidates_rx],
            settled_tx,
            tokio::sync::watch::channel(0).1,
            shutdown.clone(),
        ));
        Inbox {
            _tmp: tmp,
            root,
            settled_rx,
            seen: Vec::new(),
            shutdown,
            watch,
            settle,
        }
    }

    pub(crate) fn write(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let path = self.root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, bytes).unwrap();
        path
    }

    /// Waits until `rel` has settled and returns it.
    pub(crate) async fn wait_for(&mut self, rel: &str) -> Settled {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.seen.iter().find(|s| s.rel_path == Path::new(rel)) {
                return s.clone();
            }
            match tokio::time::timeout_at(deadline, self.settled_rx.recv()).await {
                Ok(Some(s)) => self.seen.push(s),
                Ok(None) => panic!("settle stopped while waiting for {rel}"),
                Err(_) => panic!(
                    "{rel} did not settle within {DEADLINE:?}; seen: {:?}",
                    self.rels()
                ),
            }
        }
    }

    /// Waits until the listing at start is over: `START_MARKER`, put in the inbox before the
    /// start, has settled, so the root was listed; what is written from now on can only be found
    /// live (by notify, or by a later poll).
    pub(crate) async fn wait_for_start_listing(&mut self) {
        self.wait_for(START_MARKER).await;
    }

    /// Takes whatever has settled so far, without waiting.
    pub(crate) fn drain(&mut self) {
        while let Ok(s) = self.settled_rx.try_recv() {
            self.seen.push(s);
        }
    }

    fn rels(&self) -> Vec<PathBuf> {
        self.seen.iter().map(|s| s.rel_path.clone()).collect()
    }

    pub(crate) fn assert_never(&self, rel: &str) {
        assert!(
            !self.seen.iter().any(|s| s.rel_path == Path::new(rel)),
            "{rel} must not settle; seen: {:?}",
            self.rels()
        );
    }

    /// Stops both stages and checks that they stop promptly and cleanly.
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        let watch = tokio::time::timeout(DEADLINE, self.watch).await;
        let settle = tokio::time::timeout(DEADLINE, self.settle).await;
        watch.expect("watch stops").unwrap().unwrap();
        settle.expect("settle stops").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_present_at_start_is_settled() {
    use std::os::unix::ffi::OsStrExt;
    let (tmp, root) = Inbox::tempdir();
    fs::write(root.join("a.bin"), vec![1u8; 1000]).unwrap();
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    fs::write(root.join("sub/deeper/b.bin"), b"b").unwrap();
    fs::write(root.join("empty.bin"), b"").unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9.bin"); // Latin-1, not UTF-8
    fs::write(root.join(odd), b"odd").unwrap();
    let mut inbox = Inbox::start(
        tmp,
        config(&root, WatchMode::Notify, Duration::from_millis(200)),
    );

    let a = inbox.wait_for("a.bin").await;
    assert_eq!(
        (a.root, a.stamp.size, a.path.clone()),
        (dropscan::root::RootId(0), 1000, root.join("a.bin"))
    );
    assert_eq!(inbox.wait_for("sub/deeper/b.bin").await.stamp.size, 1);
    assert_eq!(inbox.wait_for("empty.bin").await.stamp.size, 0);
    let odd_path = root.join(odd);
    let deadline = Instant::now() + DEADLINE;
    while !inbox.seen.iter().any(|s| s.path == odd_path) {
        assert!(Instant::now() < deadline, "non-UTF-8 name not settled");
        if let Ok(Some(s)) =
            tokio::time::timeout(Duration::from_millis(100), inbox.settled_rx.recv()).await
        {
            inbox.seen.push(s);
        }
    }
    inbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_file_in_new_nested_non_ascii_folder_is_settled() {
    let (tmp, root) = Inbox::tempdir();
    fs::write(root.join(START_MARKER), b"m").unwrap();
    let mut inbox = Inbox::start(
        tmp,
        config(&root, WatchMode::Notify, Duration::from_millis(200)),
    );
    // The files below can only be found live.
    inbox.wait_for_start_listing().await;
    // Created together with its folders: no watch exists on them yet when the file appears.
    inbox.write("Übergabe/2024/年報.pdf", b"%PDF-1.7");
    let s = inbox.wait_for("Übergabe/2024/年報.pdf").await;
    assert_eq!(s.stamp.size, 8);
    assert_eq!(s.path, root.join("Übergabe/2024/年報.pdf"));
    // Once watched, a later file there arrives too.
    inbox.write("Übergabe/2024/später.txt", b"x");
    inbox.wait_for("Übergabe/2024/später.txt").await;
    inbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folder_moved_in_with_files_is_listed() {
    let (tmp, root) = Inbox::tempdir();
    let outside = tmp.path().join("prepared");
    fs::create_dir_all(outside.join("inner")).unwrap();
    fs::write(outside.join("one.bin"), b"1").unwrap();
    fs::write(outside.join("inner/two.bin"), b"22").unwrap();
    fs::write(root.join(START_MARKER), b"m").unwrap();
    let mut inbox = Inbox::start(
        tmp,
        config(&root, WatchMode::Notify, Duration::from_millis(200)),
    );
    inbox.wait_for_start_listing().await;
    #[allow(clippy::disallowed_methods)] // a test stands in for a user moving a folder in
    fs::rename(&outside, root.join("moved")).unwrap();
    assert_eq!(inbox.wait_for("moved/one.bin").await.stamp.size, 1);
    assert_eq!(inbox.wait_for("moved/inner/two.bin").await.stamp.size, 2);
    inbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowly_appended_file_settles_after_the_last_write() {
    use std::io::Write;
    let (tmp, root) = Inbox::tempdir();
    let mut inbox = Inbox::start(
        tmp,
        // Writes every 100 ms; a long settle keeps the margin on a loaded machine.
        config(&root, WatchMode::Notify, Duration::from_millis(1200)),
    );
    let path = root.join("slow.bin");
    let mut file = fs::File::create(&path).unwrap();
    for _ in 0..12 {
        file.write_all(&[7u8; 100]).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        inbox.drain();
        inbox.assert_never("slow.bin");
    }
    drop(file);
    let s = inbox.wait_for("slow.bin").await;
    assert_eq!(s.stamp.size, 1200);
    inbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_old_mtime_still_waits_for_ctime_quiet() {
    use std::os::unix::fs::FileExt;
    let (tmp, root) = Inbox::tempdir();
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    let path = root.join("copied.bin");
    let file = fs::File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.write_all_at(&[1u8; 500], 0).unwrap();
    file.set_modified(old).unwrap();
    let mut inbox = Inbox::start(
        tmp,
        config(&root, WatchMode::Notify, Duration::from_millis(1200)),
    );
    // Same size, same (old) mtime after every write, like `cp -p` rewriting: only ctime moves.
    for i in 0..12u8 {
        file.write_all_at(&[i; 500], 0).unwrap();
        file.set_modified(old).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        inbox.drain();
        inbox.assert_never("copied.bin");
    }
    drop(file);
    let s = inbox.wait_for("copied.bin").await;
    assert_eq!(s.stamp.size, 500);
    assert_eq!(s.stamp.mtime_ns, 1_500_000_000 * 1_000_000_000);
    inbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_names_and_excluded_globs_are_never_settled() {
    let (tmp, root) = Inbox::tempdir();
    let mut cfg = config(&root, WatchMode::Notify, Duration::from_millis(200));
    cfg.exclude = globs(&["*.log", "skip/*"]);
    let ignored = [
        "x.part",
        "y.tmp",
        "z.crdownload",
        "w.filepart",
        "v.partial",
        ".hidden",
        "~$report.docx",
        ".~lock.report.odt#",
        ".syncthing.a.bin.tmp",
        "~syncthing~b.bin.tmp",
        "a/b/c.tmp",
        "z.log",
        "skip/q.bin",
        "skip/deeper/r.bin",
        ".git/objects/o.bin",
    ];
    fs::write(root.join("early.part"), b"backlog").unwrap();
    let mut inbox = Inbox::start(tmp, cfg);
    for rel in ignored {
        inbox.write(rel, b"data");
    }
    // A temp name renamed to its final name is a new file.
    inbox.write("final.bin.part", b"renamed");
    #[allow(clippy::disallowed_methods)] // a test stands in for a browser finishing a download
    fs::rename(root.join("final.bin.part"), root.join("final.bin")).unwrap();
    inbox.write("barrier.bin", b"after the others");
    inbox.wait_for("final.bin").await;
    inbox.wait_for("barrier.bin").await;
    inbox.drain();
    for rel in ignored.iter().chain(&["early.part", "final.bin.part"]) {
        inbox.assert_never(rel);
    }
    inbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlink_and_fifo_are_skipped_without_stalling_others() {
    let (tmp, root) = Inbox::tempdir();
    let outside = tmp.path().join("outside.bin");
    fs::write(&outside, b"not in the inbox").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("link.bin")).unwrap();
    std::os::unix::fs::symlink(tmp.path(), root.join("dirlink")).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(root.join("pipe"))
        .status()
        .unwrap();
    assert!(status.success());
    fs::write(root.join("before.bin"), b"b").unwrap();
    let mut inbox = Inbox::start(
        tmp,
        config(&root, WatchMode::Notify, Duration::from_millis(200)),
    );
    inbox.wait_for("before.bin").await;
    // Live ones too.
    let status = std::process::Command::new("mkfifo")
        .arg(root.join("pipe2"))
        .status()
        .unwrap();
    assert!(status.success());
    std::os::unix::fs::symlink(&outside, root.join("link2.bin")).unwrap();
    inbox.write("after.bin", b"a");
    inbox.wait_for("after.bin").await;
    inbox.drain();
    for rel in [
        "link.bin",
        "dirlink",
        "pipe",
        "pipe2",
        "link2.bin",
        "dirlink/outside.bin",
    ] {
        inbox.assert_never(rel);
    }
    inbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_folders_nested_in_the_root_are_never_reported() {
    let (tmp, root) = Inbox::tempdir();
    let mut cfg = config(&root, WatchMode::Notify, Duration::from_millis(200));
    cfg.clean_dir = root.join("out/clean");
    let own = [
        "out/clean/c.bin",
        "quarantine/q.bin",
        "failed/f.bin",
        ".dropscan/default/s.bin",
    ];
    for rel in own {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"backlog").unwrap();
    }
    fs::write(root.join("out/kept.bin"), b"k").unwrap();
    let mut inbox = Inbox::start(tmp, cfg);
    inbox.wait_for("out/kept.bin").await;
    // What the later stages write while running.
    let live = [
        "out/clean/sub/c2.bin",
        "quarantine/q2.bin",
        "failed/f2.bin",
        ".dropscan/default/s2.bin",
    ];
    for rel in live {
        inbox.write(rel, b"live");
    }
    inbox.write("barrier.bin", b"after the others");
    inbox.wait_for("barrier.bin").await;
    inbox.drain();
    for rel in own.iter().chain(&live) {
        inbox.assert_never(rel);
    }
    inbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_finds_files_created_after_start() {
    let (tmp, root) = Inbox::tempdir();
    fs::write(root.join(START_MARKER), b"m").unwrap();
    let mut inbox = Inbox::start(
        tmp,
        config(&root, WatchMode::Poll, Duration::from_millis(200)),
    );
    inbox.wait_for_start_listing().await;
    inbox.write("polled.bin", b"p");
    inbox.write("nested/dir/polled2.bin", b"pp");
    assert_eq!(inbox.wait_for("polled.bin").await.stamp.size, 1);
    assert_eq!(inbox.wait_for("nested/dir/polled2.bin").await.stamp.size, 2);
    // Seen by every poll, but handed on once: by the time a later file settles, polled.bin
    // has been listed again several times.
    inbox.write("barrier.bin", b"after the others");
    inbox.wait_for("barrier.bin").await;
    inbox.drain();
    let times = inbox
        .seen
        .iter()
        .filter(|s| s.rel_path == Path::new("polled.bin"))
        .count();
    assert_eq!(times, 1, "{:?}", inbox.rels());
    inbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreated_root_is_still_watched() {
    let (tmp, root) = Inbox::tempdir();
    let mut inbox = Inbox::start(
        tmp,
        config(&root, WatchMode::Notify, Duration::from_millis(200)),
    );
    inbox.write("first.bin", b"1");
    inbox.wait_for("first.bin").await;
    fs::remove_dir_all(&root).unwrap();
    fs::create_dir(&root).unwrap();
    inbox.write("second.bin", b"2");
    assert_eq!(inbox.wait_for("second.bin").await.stamp.size, 1);
    inbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_root_is_a_fatal_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        &tmp.path().join("absent"),
        WatchMode::Auto,
        Duration::from_millis(200),
    );
    let (candidates_tx, _candidates_rx) = mpsc::channel(CANDIDATES_CAPACITY);
    let err = watch::run(
        dropscan::root::Roots::new(dropscan::root::Root::all(&[cfg])),
        vec![candidates_tx],
        tokio::sync::watch::channel(0).1,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("absent"), "{err}");
    assert!(err.to_string().contains("watch.path"), "{err}");
}

/// The inodes that some inotify instance of this process watches, as (device, inode) in the
/// kernel's numbering (`/proc/self/fdinfo`: `inotify wd:.. ino:HEX sdev:HEX ...`).
pub(crate) fn inotify_watched() -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for fd in fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
        let Ok(info) = fs::read_to_string(fd.path()) else {
            continue;
        };
        for line in info.lines().filter(|l| l.starts_with("inotify ")) {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .and_then(|v| u64::from_str_radix(v, 16).ok())
            };
            if let (Some(ino), Some(dev)) = (field("ino:"), field("sdev:")) {
                out.push((dev, ino));
            }
        }
    }
    out
}

/// `path`'s (device, inode) in the kernel's numbering, as `inotify_watched` gives them.
pub(crate) fn kernel_id(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    let m = fs::metadata(path).unwrap();
    let dev = rustix::fs::Dev::from(m.dev());
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    ((u64::from(major) << 20) | u64::from(minor), m.ino())
}

/// The agent's own folders beneath a recursive inbox (staging under `.dropscan`, destinations
/// placed inside it) get no inotify watch: every event there is out of scope, and the agent's
/// own renames, copies and removals in staging woke the watcher's thread for nothing (5% of the
/// agent's CPU on many small files, BENCHMARKS.md). The inbox's other subfolders are watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_s_own_folders_in_the_inbox_get_no_inotify_watch() {
    let (tmp, root) = Inbox::tempdir();
    let mut cfg = config(&root, WatchMode::Notify, Duration::from_millis(200));
    cfg.clean_dir = root.join("out/clean");
    for dir in [
        ".dropscan/default",
        "out/clean",
        "quarantine",
        "failed",
        "sub",
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::write(root.join(START_MARKER), b"m").unwrap();
    let mut inbox = Inbox::start(tmp, cfg);
    inbox.wait_for_start_listing().await;
    let watched = inotify_watched();
    for dir in ["", "sub", "out"] {
        assert!(
            watched.contains(&kernel_id(&root.join(dir))),
            "{dir:?} is not watched: {watched:?}"
        );
    }
    for dir in [
        ".dropscan",
        ".dropscan/default",
        "out/clean",
        "quarantine",
        "failed",
    ] {
        assert!(
            !watched.contains(&kernel_id(&root.join(dir))),
            "{dir} is watched"
        );
    }
    // Still found live: a file in a watched subfolder.
    inbox.write("sub/live.bin", b"live");
    inbox.wait_for("sub/live.bin").await;
    inbox.stop().await;
}
