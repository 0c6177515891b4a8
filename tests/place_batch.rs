//! Placement in batches (issue 20, branch `place`): decided clean files of one watch are placed
//! a batch at a time (one `placing` commit, the renames, one fsync per folder, one `placed`
//! commit, one `done` commit). Killed at every durable step of such a batch, nothing is lost;
//! a name chosen twice within one batch never overwrites.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use dropscan::emulator::EmulatorConfig;

use crate::kill_points::{Drops, every_kill_point_of};
use crate::util::{Outcome, World, bytes, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

/// Four small clean files in two folders, dropped before the agent starts: claimed, owned,
/// scanned and decided together, so that they are placed as one batch.
fn four_clean() -> Drops {
    ["p/one.bin", "p/two.bin", "q/three.bin", "q/four.bin"]
        .into_iter()
        .zip(60u64..)
        .map(|(n, seed)| (n, bytes(seed, 4096), Outcome::Clean))
        .collect()
}

/// Killed after every other fsync (the batch's `placing` commit, the folder fsyncs after its
/// renames, its `placed` and `done` commits among them): every file ends in clean once, whole.
/// Two files of the four, every other fsync: each round costs seconds, and every fsync of all
/// 59 was 6 minutes (they all passed, 2026-12-03).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_fsync_of_a_batch_of_placements_loses_nothing() {
    let two: Drops = four_clean().into_iter().take(2).collect();
    every_kill_point_of(&two, "fsync,fdatasync", "", 2).await;
}

/// Killed after every rename (the claim's, the private copies', the batch's renames into place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_rename_of_a_batch_of_placements_loses_nothing() {
    every_kill_point_of(&four_clean(), "rename,renameat,renameat2", "", 1).await;
}

/// Two drops of one name, decided in the same poll (the agent is stopped while both scans run
/// and started once both are done, so that one poll decides both) with the name already taken
/// in clean: the batch chooses `report (1).txt` for both, the second goes the one-record way
/// and gets `report (2).txt`. Nothing is overwritten, nothing is placed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_chosen_twice_in_one_batch_never_overwrites() {
    let w = World::new(EmulatorConfig {
        scan_delay: Duration::from_secs(3),
        ..EmulatorConfig::default()
    })
    .await;
    std::fs::create_dir_all(w.clean.join("d")).unwrap();
    std::fs::write(w.clean.join("d/report.txt"), b"already here").unwrap();
    let agent = w.start_agent();
    for (n, content) in [(1u64, &b"first drop"[..]), (2, b"second drop")] {
        w.drop_file("d/report.txt", content);
        let submitted = wait_for(LIMIT, || {
            (w.emulator().state().stats().submits_accepted >= n).then_some(())
        })
        .await;
        assert!(submitted.is_some(), "drop {n} never uploaded");
    }
    agent.stop().await.0.unwrap();
    // Both scans are done by now; the next start polls them together.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let agent = w.start_agent();
    let o = w.wait_placed(3, LIMIT).await;
    assert_eq!(o.len(), 3, "{o:?}");
    let read = |n: &str| std::fs::read(w.clean.join(n)).unwrap();
    assert_eq!(read("d/report.txt"), b"already here");
    let mut placed = vec![read("d/report (1).txt"), read("d/report (2).txt")];
    placed.sort();
    assert_eq!(
        placed,
        vec![b"first drop".to_vec(), b"second drop".to_vec()]
    );
    assert!(w.inbox_files().is_empty());
    assert!(!o.contains_key(&PathBuf::from("d/report (3).txt")));
    agent.stop().await.0.unwrap();
}
