//! Unit tests of settle's shares and rotation (`share.rs`, review 11).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::share::{Memory, Remembered};
use super::tests::config;
use super::*;
use crate::root::Root;

/// Runs `settle::drive` over `watches` with bound `max_waiting`; each root's candidates channel
/// holds 4.
fn start(
    watches: &[WatchConfig],
    max_waiting: usize,
) -> (
    Vec<mpsc::Sender<Candidate>>,
    mpsc::Receiver<Settled>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let roots = Roots::new(Root::all(watches));
    let (candidates_tx, candidates_rx) = crate::watch::candidate_channels(watches.len(), 4);
    let (settled_tx, settled_rx) = mpsc::channel(1024);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(drive(
        Settler::new(roots, max_waiting, MAX_SENT, MAX_REMEMBERED),
        candidates_rx,
        settled_tx,
        tokio::sync::watch::channel(0).1,
        shutdown.clone(),
    ));
    (candidates_tx, settled_rx, shutdown, task)
}

/// Offers `files` of root `root` in turn, waiting for room as a listing does.
fn offer(
    tx: &mpsc::Sender<Candidate>,
    root: usize,
    files: Vec<PathBuf>,
) -> tokio::task::JoinHandle<()> {
    let tx = tx.clone();
    tokio::spawn(async move {
        for path in files {
            let candidate = Candidate {
                root: RootId(root),
                path,
            };
            if tx.send(candidate).await.is_err() {
                return;
            }
        }
    })
}

/// `n` files named like Excel's save temps (quiet for `save_temp_settle`) in `dir`.
fn save_temps(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{i:08X}"));
            std::fs::write(&path, b"half a workbook").unwrap();
            path
        })
        .collect()
}

fn watch_of(dir: &Path) -> WatchConfig {
    let mut w = config();
    w.path = dir.to_path_buf();
    w
}

/// Review 11, finding 1: one root's share full of files that do not settle soon must not stop
/// another root (the bound and the candidates channel were shared by every root).
#[tokio::test(start_paused = true)]
async fn unsettled_files_of_one_root_do_not_stall_another_root() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let stuck = save_temps(one.path(), 40);
    let clean = two.path().join("b.txt");
    std::fs::write(&clean, b"second watch").unwrap();
    let (tx, mut settled_rx, shutdown, task) =
        start(&[watch_of(one.path()), watch_of(two.path())], 16);
    let flood = offer(&tx[0], 0, stuck);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let second = offer(&tx[1], 1, vec![clean.clone()]);
    let settled = tokio::time::timeout(Duration::from_secs(60), settled_rx.recv())
        .await
        .expect("the second root's file is handed on")
        .unwrap();
    assert_eq!(settled.path, clean);
    second.await.unwrap();
    shutdown.cancel();
    task.await.unwrap();
    flood.abort();
}

/// Offers `files` of one watch on `dir` (share 16) followed by a settled `report.pdf`, and
/// asserts that `report.pdf` is handed on, first, while the others still wait (`why`).
async fn newer_file_is_handed_on_first(dir: &Path, mut files: Vec<PathBuf>, why: &str) {
    let newer = dir.join("report.pdf");
    std::fs::write(&newer, b"done").unwrap();
    files.push(newer.clone());
    let (tx, mut settled_rx, shutdown, task) = start(&[watch_of(dir)], 16);
    let listing = offer(&tx[0], 0, files);
    let settled = tokio::time::timeout(Duration::from_secs(120), settled_rx.recv())
        .await
        .unwrap_or_else(|_| panic!("the newer file is handed on while {why}"))
        .unwrap();
    assert_eq!(settled.path, newer, "only the newer file is ready");
    listing.await.unwrap();
    shutdown.cancel();
    task.await.unwrap();
}

/// Review 11, finding 1 (the same root): a share full of files that do not settle soon rotates,
/// so a newer file of that root, behind them in its listing, is still looked at and handed on.
#[tokio::test(start_paused = true)]
async fn a_share_full_of_unsettled_files_rotates_so_a_newer_file_of_that_root_settles() {
    let tmp = tempfile::tempdir().unwrap();
    let files = save_temps(tmp.path(), 40);
    newer_file_is_handed_on_first(tmp.path(), files, "the save temps wait").await;
}

/// A file rotated out keeps its times: offered again unchanged once its quiet time has passed
/// since it was first seen, it is handed on at once; offered again changed, it starts again.
#[tokio::test(start_paused = true)]
async fn a_rotated_file_keeps_its_quiet_time_unless_it_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = watch_of(tmp.path());
    w.save_temp_settle = Duration::from_secs(30);
    let files = save_temps(tmp.path(), 40);
    let (tx, mut settled_rx, shutdown, task) = start(&[w], 16);
    offer(&tx[0], 0, files.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    // The first offered waited longest: rotated out by now. Rewritten, it starts again.
    std::fs::write(&files[0], b"saved again, longer").unwrap();
    tokio::time::sleep(Duration::from_secs(15)).await;
    // The next listing offers them all again, 35 s after they were first seen.
    let again = offer(&tx[0], 0, files.clone());
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(Some(s)) = tokio::time::timeout_at(deadline, settled_rx.recv()).await {
        seen.push(s.path);
    }
    seen.sort();
    assert_eq!(seen, files[1..], "unchanged ones at once, not 30 s after");
    again.await.unwrap();
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn files_rotated_out_are_remembered_up_to_the_bound_until_their_time_is_up() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("a");
    std::fs::write(&path, b"a").unwrap();
    let stamp = crate::fsops::Stamp::of(&std::fs::symlink_metadata(&path).unwrap());
    let now = Instant::now();
    let quiet = Quiet {
        settle: Duration::from_secs(1),
        empty: Duration::from_secs(1),
    };
    let pending = Pending::new(RootId(0), PathBuf::from("a"), stamp, now, quiet);
    let r = Remembered::of(&pending, None, now + Duration::from_secs(60));
    let mut memory = Memory::new(4);
    let kept = (0..10)
        .filter(|i| memory.remember(&tmp.path().join(i.to_string()), r, now))
        .count();
    assert_eq!((kept, memory.len()), (4, 4), "remembered at most the bound");
    let later = now + Duration::from_secs(61);
    assert!(memory.remember(&path, r, later), "expired ones make room");
    assert_eq!(memory.len(), 1);
    assert!(
        memory
            .recall(&path, later + Duration::from_secs(60))
            .is_none(),
        "time up"
    );
    assert!(
        std::mem::size_of::<(u64, Remembered)>() <= 128,
        "an entry is {} bytes",
        std::mem::size_of::<(u64, Remembered)>()
    );
}

/// A share full of files held open for writing rotates too: found held, a file waits for its
/// writer, not for quiet, so it must not look new to the rotation each time it is found held.
#[tokio::test(start_paused = true)]
async fn a_share_full_of_files_held_open_rotates_so_a_newer_file_of_that_root_settles() {
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (0..24)
        .map(|i| tmp.path().join(format!("open{i:02}.bin")))
        .collect();
    let writers: Vec<std::fs::File> = files
        .iter()
        .map(|p| {
            std::fs::write(p, b"partial").unwrap();
            std::fs::OpenOptions::new().append(true).open(p).unwrap()
        })
        .collect();
    newer_file_is_handed_on_first(tmp.path(), files, "the others are held open").await;
    drop(writers);
}
