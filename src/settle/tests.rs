//! Unit tests of settle: the completion gate, the filters and the settler's bookkeeping.

use super::*;
use crate::config::WatchMode;
use crate::root::Root;
use crate::scope::matches_filters;
use tokio_util::sync::CancellationToken;

const SETTLE: Duration = Duration::from_millis(400);
const EMPTY: Duration = Duration::from_secs(60);
const QUIET: Quiet = Quiet {
    settle: SETTLE,
    empty: EMPTY,
};

fn snap(size: u64, mtime_ns: i64, ctime_ns: i64) -> Stamp {
    Stamp {
        size,
        mtime_ns,
        ctime_ns,
        dev: 1,
        ino: 7,
    }
}

fn globs(list: &[&str]) -> Vec<crate::config::Pattern> {
    list.iter()
        .map(|g| crate::config::Pattern::new(g).unwrap())
        .collect()
}

pub(super) fn config() -> WatchConfig {
    WatchConfig {
        path: PathBuf::from("/in"),
        recursive: true,
        settle: SETTLE,
        settle_empty: Duration::from_secs(60),
        keep_original: Duration::from_secs(600),
        lease_check: crate::config::LeaseCheck::Auto,
        keep_originals: crate::config::KeepOriginals::Unleased,
        held_open_limit: Duration::from_secs(600),
        tidy_after: None,
        save_temp_settle: Duration::from_secs(3600),
        mode: WatchMode::Auto,
        include: globs(&["*"]),
        exclude: globs(&["*.log", "skip/*"]),
        clean_dir: PathBuf::from("/in/clean"),
        quarantine_dir: PathBuf::from("/in/q"),
        failed_dir: PathBuf::from("/failed"),
        staging_dir: PathBuf::from("/in/.dropscan/default"),
        reconcile_interval: Duration::from_secs(60),
        poll_interval: Duration::from_secs(2),
    }
}

#[test]
fn unchanged_for_settle_is_ready() {
    let t0 = Instant::now();
    let mut p = Pending::new(RootId(0), "a".into(), snap(10, 1, 1), t0, QUIET);
    assert_eq!(p.observe(snap(10, 1, 1), t0 + SETTLE / 2), Decision::Wait);
    assert_eq!(p.observe(snap(10, 1, 1), t0 + SETTLE), Decision::Ready);
}

#[test]
fn growth_resets_the_quiet_period() {
    let t0 = Instant::now();
    let mut p = Pending::new(RootId(0), "a".into(), snap(10, 1, 1), t0, QUIET);
    assert_eq!(p.observe(snap(20, 2, 2), t0 + SETTLE), Decision::Wait);
    assert_eq!(
        p.observe(snap(20, 2, 2), t0 + SETTLE * 3 / 2),
        Decision::Wait
    );
    assert_eq!(p.observe(snap(20, 2, 2), t0 + SETTLE * 2), Decision::Ready);
}

#[test]
fn ctime_change_with_old_mtime_restored_is_not_ready() {
    // `cp -p`: data written, then the old mtime put back. Only ctime tells.
    let t0 = Instant::now();
    let mut p = Pending::new(RootId(0), "a".into(), snap(10, 5, 100), t0, QUIET);
    assert_eq!(p.observe(snap(10, 5, 200), t0 + SETTLE), Decision::Wait);
    assert_eq!(
        p.observe(snap(10, 5, 200), t0 + SETTLE + SETTLE / 2),
        Decision::Wait
    );
    assert_eq!(
        p.observe(snap(10, 5, 200), t0 + SETTLE * 2),
        Decision::Ready
    );
}

#[test]
fn same_size_rewrite_or_replacement_is_a_change() {
    let t0 = Instant::now();
    let mut p = Pending::new(RootId(0), "a".into(), snap(10, 5, 5), t0, QUIET);
    // Replaced by another file of the same size and times (new inode).
    let mut other = snap(10, 5, 5);
    other.ino = 8;
    assert_eq!(p.observe(other, t0 + SETTLE), Decision::Wait);
    let mut moved = other;
    moved.dev = 2;
    assert_eq!(p.observe(moved, t0 + SETTLE * 2), Decision::Wait);
    assert_eq!(p.observe(moved, t0 + SETTLE * 3), Decision::Ready);
}

#[test]
fn an_empty_file_is_not_complete_after_settle_alone_only_after_settle_empty() {
    // smbd creates the file at the client's open and holds it empty while the client pauses:
    // after `settle` it must still wait (it was released as a 0-byte file, with no upload).
    let t0 = Instant::now();
    let mut p = Pending::new(RootId(0), "empty".into(), snap(0, 1, 1), t0, QUIET);
    assert_eq!(p.observe(snap(0, 1, 1), t0 + SETTLE), Decision::Wait);
    assert_eq!(
        p.observe(snap(0, 1, 1), t0 + EMPTY - SETTLE),
        Decision::Wait
    );
    assert_eq!(p.observe(snap(0, 1, 1), t0 + EMPTY), Decision::Ready);
    // Written at last: content settles on the ordinary time from its last change.
    let t1 = t0 + EMPTY + SETTLE;
    assert_eq!(p.observe(snap(5, 2, 2), t1), Decision::Wait);
    assert_eq!(p.observe(snap(5, 2, 2), t1 + SETTLE), Decision::Ready);
}

#[test]
fn filters_match_path_and_name() {
    let include = globs(&["*"]);
    let exclude = globs(&["*.tmp", "*.log", "skip/*"]);
    assert!(matches_filters(Path::new("a.bin"), &include, &exclude));
    assert!(matches_filters(Path::new("a/b/c.bin"), &include, &exclude));
    assert!(!matches_filters(Path::new("a/b/c.tmp"), &include, &exclude));
    assert!(!matches_filters(Path::new("x.log"), &include, &exclude));
    assert!(!matches_filters(
        Path::new("skip/q.bin"),
        &include,
        &exclude
    ));
    assert!(!matches_filters(
        Path::new("skip/deeper/q.bin"),
        &include,
        &exclude
    ));
    assert!(matches_filters(
        Path::new("noskip/q.bin"),
        &include,
        &exclude
    ));

    let only_pdf = globs(&["*.pdf"]);
    assert!(matches_filters(
        Path::new("Übergabe/年報.pdf"),
        &only_pdf,
        &[]
    ));
    assert!(!matches_filters(
        Path::new("Übergabe/年報.doc"),
        &only_pdf,
        &[]
    ));
    // By file name: `report*` takes a report anywhere.
    assert!(matches_filters(
        Path::new("x/y/report-1.pdf"),
        &globs(&["report*"]),
        &[]
    ));
    assert!(!matches_filters(Path::new("a.bin"), &[], &[]));
}

#[test]
fn filters_non_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let rel = Path::new(std::ffi::OsStr::from_bytes(b"d\xff/\xfe.bin"));
    assert!(matches_filters(rel, &globs(&["*"]), &[]));
    assert!(matches_filters(rel, &globs(&["*.bin"]), &[]));
    assert!(!matches_filters(rel, &globs(&["*"]), &globs(&["*.bin"])));
}

#[test]
fn admit_applies_every_filter() {
    let w = config();
    assert_eq!(
        admit(&w, Path::new("/in/a.bin")),
        Some(PathBuf::from("a.bin"))
    );
    assert_eq!(
        admit(&w, Path::new("/in/Übergabe/年報.pdf")),
        Some(PathBuf::from("Übergabe/年報.pdf"))
    );
    for refused in [
        "/in/a.part",
        "/in/sub/b.crdownload",
        "/in/.hidden",
        "/in/~$doc.docx",
        "/in/.~lock.a.odt#",
        "/in/x.log",
        "/in/skip/q.bin",
        "/in/clean/a.bin",
        "/in/q/a.bin",
        "/in/.dropscan/default/a.bin",
        "/in/.git/config",
        "/other/a.bin",
        "/in",
    ] {
        assert_eq!(admit(&w, Path::new(refused)), None, "{refused}");
    }
    let mut flat = config();
    flat.recursive = false;
    assert_eq!(admit(&flat, Path::new("/in/sub/a.bin")), None);
}

#[test]
fn tick_is_a_quarter_of_the_shortest_settle_bounded() {
    let mut a = config();
    a.settle = Duration::from_secs(5);
    let mut b = config();
    b.settle = Duration::from_millis(400);
    assert_eq!(
        tick_period(&[a.clone(), b.clone()]),
        Duration::from_millis(100)
    );
    assert_eq!(tick_period(&[a.clone()]), MAX_TICK);
    b.settle = Duration::ZERO;
    assert_eq!(tick_period(&[a, b]), MIN_TICK);
    assert_eq!(tick_period(&[]), MAX_TICK);
}

#[test]
fn settler_skips_fifos_and_warns_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = config();
    w.path = tmp.path().to_path_buf();
    let fifo = tmp.path().join("pipe");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let mut s = Settler::new(
        Roots::new(Root::all(&[w])),
        MAX_WAITING,
        MAX_SENT,
        MAX_REMEMBERED,
    );
    let now = Instant::now();
    for _ in 0..3 {
        s.offer(Candidate {
            root: RootId(0),
            path: fifo.clone(),
        });
        assert!(s.fresh.contains_key(&fifo));
        let meta = lstat(&fifo);
        assert!(s.observe(fifo.clone(), meta, now).is_none());
        assert!(s.fresh.is_empty() && s.pending.is_empty());
    }
    assert_eq!(s.warned.len(), 1);
}

#[test]
fn settler_does_not_resend_an_unchanged_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = config();
    w.path = tmp.path().to_path_buf();
    let file = tmp.path().join("a.bin");
    std::fs::write(&file, b"abc").unwrap();
    let mut s = Settler::new(
        Roots::new(Root::all(&[w])),
        MAX_WAITING,
        MAX_SENT,
        MAX_REMEMBERED,
    );
    let t0 = Instant::now();
    let offer = |s: &mut Settler| {
        s.offer(Candidate {
            root: RootId(0),
            path: file.clone(),
        });
    };
    offer(&mut s);
    assert!(s.observe(file.clone(), lstat(&file), t0).is_none());
    let settled = s.observe(file.clone(), lstat(&file), t0 + SETTLE).unwrap();
    assert_eq!(
        (settled.stamp.size, settled.rel_path.as_path()),
        (3, Path::new("a.bin"))
    );
    let snapshot = Stamp::of(&std::fs::symlink_metadata(&file).unwrap());
    s.sent.insert(
        file.clone(),
        snapshot,
        t0 + Duration::from_secs(60),
        RootId(0),
        PathBuf::from("a.bin"),
    );

    // Listed again while it waits for claim: not pending again.
    offer(&mut s);
    assert!(
        s.observe(file.clone(), lstat(&file), t0 + SETTLE * 2)
            .is_none()
    );
    assert!(s.pending.is_empty());

    // Rewritten: a new file as far as settle is concerned.
    std::fs::write(&file, b"abcd").unwrap();
    offer(&mut s);
    assert!(
        s.observe(file.clone(), lstat(&file), t0 + SETTLE * 3)
            .is_none()
    );
    assert!(s.pending.contains_key(&file));
}

/// Runs `settle::run` for one root; the test holds the candidate sender and the settled receiver.
fn start_settle(
    w: WatchConfig,
) -> (
    mpsc::Sender<Candidate>,
    mpsc::Receiver<Settled>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (candidates_tx, candidates_rx) = mpsc::channel(8);
    let (settled_tx, settled_rx) = mpsc::channel(8);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(
        Roots::new(Root::all(&[w])),
        vec![candidates_rx],
        settled_tx,
        tokio::sync::watch::channel(0).1,
        shutdown.clone(),
    ));
    (candidates_tx, settled_rx, shutdown, task)
}

// The two tests below run the real settle loop on a real file with the clock paused: the ticks
// and the waits are virtual (tokio does not advance the clock while a stat runs in
// `spawn_blocking`), so they take milliseconds and a loaded machine cannot make them late.

#[tokio::test(start_paused = true)]
async fn growing_file_settles_only_after_a_quiet_settle_time() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let mut w = config();
    w.path = tmp.path().to_path_buf();
    let path = tmp.path().join("slow.bin");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(b"x").unwrap();
    let (candidates_tx, mut settled_rx, shutdown, task) = start_settle(w);
    candidates_tx
        .send(Candidate {
            root: RootId(0),
            path: path.clone(),
        })
        .await
        .unwrap();
    // A writer that appends a byte every half settle time is never quiet for long enough.
    for writes in 2..=12 {
        tokio::time::sleep(SETTLE / 2).await;
        file.write_all(b"x").unwrap();
        assert!(
            settled_rx.try_recv().is_err(),
            "settled while still growing, after {writes} writes"
        );
    }
    drop(file);
    let last_write = Instant::now();
    let settled = tokio::time::timeout(SETTLE * 4, settled_rx.recv())
        .await
        .expect("settles once quiet")
        .unwrap();
    assert_eq!((settled.stamp.size, settled.path), (12, path));
    // Virtual time: exact, not a measurement.
    assert!(last_write.elapsed() >= SETTLE);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn settled_file_is_handed_on_again_only_after_the_reconcile_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = config();
    w.path = tmp.path().to_path_buf();
    let reconcile_interval = w.reconcile_interval;
    let path = tmp.path().join("a.bin");
    std::fs::write(&path, b"abc").unwrap();
    let (candidates_tx, mut settled_rx, shutdown, task) = start_settle(w);
    let offer = || {
        candidates_tx.send(Candidate {
            root: RootId(0),
            path: path.clone(),
        })
    };
    offer().await.unwrap();
    let first = tokio::time::timeout(SETTLE * 4, settled_rx.recv())
        .await
        .expect("settles")
        .unwrap();
    assert_eq!(first.rel_path, Path::new("a.bin"));

    // Listed again while claim may still hold it: not handed on twice.
    offer().await.unwrap();
    assert!(
        tokio::time::timeout(SETTLE * 4, settled_rx.recv())
            .await
            .is_err(),
        "handed on twice within the reconcile interval"
    );

    // Once the reconcile interval has passed, a file still there is settled again (claim judges
    // it by its journal).
    tokio::time::sleep(reconcile_interval).await;
    offer().await.unwrap();
    let again = tokio::time::timeout(SETTLE * 4, settled_rx.recv())
        .await
        .expect("settles again")
        .unwrap();
    assert_eq!(again, first);
    shutdown.cancel();
    task.await.unwrap();
}

#[test]
fn settling_files_are_counted_per_root_and_leave_the_count_by_every_route() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut wa, mut wb) = (config(), config());
    wa.path = a.path().to_path_buf();
    wb.path = b.path().to_path_buf();
    wb.staging_dir = b.path().join(".dropscan/default");
    let roots = Roots::new(Root::all(&[wa, wb]));
    let mut s = Settler::new(roots.clone(), MAX_WAITING, MAX_SENT, MAX_REMEMBERED);
    let counts = || -> Vec<u64> { roots.iter().map(|r| r.status.settling()).collect() };
    let (done, gone, fifo) = (
        a.path().join("done"),
        a.path().join("gone"),
        a.path().join("p"),
    );
    let other = b.path().join("other");
    for f in [&done, &gone, &other] {
        std::fs::write(f, b"abc").unwrap();
    }
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    for (root, path) in [(0, &done), (0, &gone), (0, &fifo), (1, &other)] {
        s.offer(Candidate {
            root: RootId(root),
            path: path.clone(),
        });
    }
    s.publish_counts();
    assert_eq!(
        counts(),
        [3, 1],
        "hinted files count before their first stat"
    );

    let t0 = Instant::now();
    for path in [&done, &gone, &fifo, &other] {
        assert!(s.observe(path.clone(), lstat(path), t0).is_none());
    }
    s.publish_counts();
    assert_eq!(counts(), [2, 1], "a FIFO is never waited on");

    std::fs::remove_file(&gone).unwrap();
    assert!(s.observe(gone.clone(), lstat(&gone), t0 + SETTLE).is_none());
    let settled = s.observe(done.clone(), lstat(&done), t0 + SETTLE);
    assert!(settled.is_some());
    s.publish_counts();
    assert_eq!(
        counts(),
        [0, 1],
        "vanished and settled files leave the count"
    );
}

#[tokio::test(start_paused = true)]
async fn the_settling_count_rises_while_a_file_settles_and_falls_once_it_is_handed_on() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = config();
    w.path = tmp.path().to_path_buf();
    let path = tmp.path().join("a.bin");
    std::fs::write(&path, b"abc").unwrap();
    let roots = Roots::new(Root::all(&[w]));
    let (candidates_tx, candidates_rx) = mpsc::channel(8);
    let (settled_tx, mut settled_rx) = mpsc::channel(8);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(
        roots.clone(),
        vec![candidates_rx],
        settled_tx,
        tokio::sync::watch::channel(0).1,
        shutdown.clone(),
    ));
    let status = &roots.get(RootId(0)).unwrap().status;
    assert_eq!(status.settling(), 0);
    candidates_tx
        .send(Candidate {
            root: RootId(0),
            path: path.clone(),
        })
        .await
        .unwrap();
    tokio::time::sleep(SETTLE / 2).await;
    assert_eq!(status.settling(), 1, "waiting for quiet");
    let settled = tokio::time::timeout(SETTLE * 4, settled_rx.recv())
        .await
        .expect("settles")
        .unwrap();
    assert_eq!(settled.path, path);
    assert_eq!(status.settling(), 0, "handed on: no longer settling");
    shutdown.cancel();
    task.await.unwrap();
}

/// Runs `settle::drive` for one root with bounds of the test's choosing; the candidates channel
/// holds `capacity`.
fn start_bounded(
    w: WatchConfig,
    max_waiting: usize,
    capacity: usize,
) -> (
    Roots,
    mpsc::Sender<Candidate>,
    mpsc::Receiver<Settled>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let roots = Roots::new(Root::all(&[w]));
    let (candidates_tx, candidates_rx) = mpsc::channel(capacity);
    let (settled_tx, settled_rx) = mpsc::channel(1024);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(drive(
        Settler::new(roots.clone(), max_waiting, MAX_SENT, MAX_REMEMBERED),
        vec![candidates_rx],
        settled_tx,
        tokio::sync::watch::channel(0).1,
        shutdown.clone(),
    ));
    (roots, candidates_tx, settled_rx, shutdown, task)
}

/// Offers every file of `files` in turn (waiting for room, as the listing does); counts those
/// taken into the channel.
fn offer_all(
    candidates_tx: mpsc::Sender<Candidate>,
    files: Vec<PathBuf>,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let offered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&offered);
    let task = tokio::spawn(async move {
        for path in files {
            let sent = candidates_tx.send(Candidate {
                root: RootId(0),
                path,
            });
            if sent.await.is_err() {
                return;
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (offered, task)
}

fn backlog(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("f{i:03}.bin"));
            std::fs::write(&path, b"x").unwrap();
            path
        })
        .collect()
}

/// Regression (issue 20): settle took every candidate the listing sent, so a backlog of
/// 100,000 files was held (and stat'ed on every tick) whole; `many` peaked near 300 MiB.
#[tokio::test(start_paused = true)]
async fn settle_holds_at_most_its_bound_and_the_rest_of_a_backlog_waits_in_the_inbox() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = config();
    w.path = tmp.path().to_path_buf();
    // Nothing gets quiet for long enough during the test.
    w.settle = Duration::from_secs(3600);
    let (max_waiting, capacity) = (16, 4);
    let files = backlog(tmp.path(), 40);
    let (roots, candidates_tx, _settled_rx, shutdown, task) =
        start_bounded(w, max_waiting, capacity);
    // Kept: settle stops when the watcher is gone.
    let (offered, offering) = offer_all(candidates_tx.clone(), files);
    // Many ticks of virtual time (a stat pass does not advance it).
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let status = &roots.get(RootId(0)).unwrap().status;
    assert_eq!(
        status.settling(),
        max_waiting as u64,
        "files held by settle"
    );
    assert_eq!(
        offered.load(std::sync::atomic::Ordering::SeqCst),
        max_waiting + capacity,
        "the listing waits for room once settle is full and the channel too"
    );
    shutdown.cancel();
    task.await.unwrap();
    offering.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_backlog_larger_than_the_bound_is_all_handed_on_each_file_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = config();
    w.path = tmp.path().to_path_buf();
    let files = backlog(tmp.path(), 40);
    let (_roots, candidates_tx, mut settled_rx, shutdown, task) = start_bounded(w, 16, 4);
    // Kept: settle stops when the watcher is gone.
    let (_offered, offering) = offer_all(candidates_tx.clone(), files.clone());
    let mut seen = Vec::new();
    while seen.len() < files.len() {
        let settled = tokio::time::timeout(SETTLE * 20, settled_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {} files handed on", seen.len(), files.len()))
            .unwrap();
        seen.push(settled.path);
    }
    seen.sort();
    assert_eq!(seen, files, "each file handed on once");
    offering.await.unwrap();
    shutdown.cancel();
    task.await.unwrap();
}

/// `lstat` as settle's stat pass reports it.
fn lstat(path: impl AsRef<std::path::Path>) -> std::io::Result<crate::fsops::FileStamp> {
    std::fs::symlink_metadata(path).map(|m| crate::fsops::FileStamp::of(&m))
}
