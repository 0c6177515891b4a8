//! Placement in batches (issue 20, branch `place`): decided clean files of one watch are placed
//! a batch at a time (one `placing` commit, the renames, one fsync per folder, one `placed`
//! commit, one `done` commit). Killed at every durable step of such a batch, nothing is lost;
//! a name chosen twice within one batch never overwrites.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use dropscan::emulator::EmulatorConfig;

use crate::kill_points::{Drops, SCAN_TAKES, every_kill_point_decided_together, upload_then_stop};
use crate::util::{Outcome, World, bytes, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

/// Four small clean files in two folders, uploaded before the traced start and decided together
/// by its first poll, so that they are placed as one batch.
fn four_clean() -> Drops {
    ["p/one.bin", "p/two.bin", "q/three.bin", "q/four.bin"]
        .into_iter()
        .zip(60u64..)
        .map(|(n, seed)| (n, bytes(seed, 4096), Outcome::Clean))
        .collect()
}

/// Killed after every other fsync (the batch's `placing` commit, the folder fsyncs after its
/// renames, its `placed` and `done` commits among them): every file ends in clean once, whole.
/// Two files of the four, every other fsync: each round costs seconds. (Until review17 the files
/// were dropped before the traced start: every fsync of all 59 was 6 minutes, but under load
/// the two were decided at different polls and placed one at a time, never as a batch.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_fsync_of_a_batch_of_placements_loses_nothing() {
    let two: Drops = four_clean().into_iter().take(2).collect();
    every_kill_point_decided_together(&two, "fsync,fdatasync", 2).await;
}

/// Killed after every rename of deciding and placing the batch (the claim's and the private
/// copies' are the kill-point tests' own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_rename_of_a_batch_of_placements_loses_nothing() {
    every_kill_point_decided_together(&four_clean(), "rename,renameat,renameat2", 1).await;
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

/// Runs the agent as the kill-point rounds do (under strace, each traced call held 50 ms) but
/// without a kill, with the sorter's debug lines, and returns the largest batch it placed.
async fn largest_batch_under_strace(set: &Drops, syscalls: &str) -> Option<usize> {
    use std::os::unix::process::CommandExt as _;
    use std::process::{Command, Stdio};
    let strace = crate::shares_fixture::find_tool("strace")?;
    let w = World::new(EmulatorConfig {
        scan_delay: SCAN_TAKES,
        ..EmulatorConfig::default()
    })
    .await;
    for (name, content, _) in set {
        w.drop_file(name, content);
    }
    upload_then_stop(&w, set.len()).await;
    let err = w.dir.path().join("agent.err");
    let mut child = crate::kill_points::Group(
        Command::new(strace)
            .args(["-f", "--seccomp-bpf", "-qq", "-o"])
            .arg(w.dir.path().join("strace.log"))
            .arg("-e")
            .arg(format!("trace={syscalls}"))
            .arg("-e")
            .arg(format!("inject={syscalls}:delay_exit=50000"))
            .arg(env!("CARGO_BIN_EXE_dropscan"))
            .args(["run", "--config"])
            .arg(w.write_config())
            .env("RUST_LOG", "warn,dropscan::sort=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let all = wait_for(LIMIT, || (w.outcomes().len() == set.len()).then_some(())).await;
    crate::kill_points::kill_group(&mut child.0);
    assert!(all.is_some(), "not all placed: {:?}", w.outcomes());
    let log = std::fs::read_to_string(&err).unwrap();
    log.lines()
        .filter(|l| l.contains("placing a batch"))
        .filter_map(|l| {
            let n = l.split("records=").nth(1)?;
            n.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .max()
        .or(Some(0))
}

/// The kill-point rounds above kill inside a batch of several placements, not a batch of one:
/// run as they run them (checked with the sorter's debug line "placing a batch"), all of the
/// files are placed in one batch. (Dropped before a traced start, as the rounds first did, two
/// files were placed one at a time under load: the scans ended at different polls.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kill_point_rounds_place_several_files_in_one_batch() {
    let two: Drops = four_clean().into_iter().take(2).collect();
    for (set, calls) in [
        (two, "fsync,fdatasync"),
        (four_clean(), "rename,renameat,renameat2"),
    ] {
        let Some(largest) = largest_batch_under_strace(&set, calls).await else {
            eprintln!("skipped: strace not installed (Debian package strace)");
            return;
        };
        assert_eq!(
            largest,
            set.len(),
            "tracing {calls}: largest batch {largest}"
        );
    }
}
