//! Killed at each durable step: the real binary runs under `strace`, which kills it (SIGKILL) on
//! entry to the N-th `rename`/`renameat2`, or the N-th `fsync`/`fdatasync`, for every N that the
//! work reaches. Between them these are the claim's rename into staging (under its lease), the
//! private copy's fsync and its rename over the staged name (or the two renames that keep the
//! original), the journal's commits, and the release's rename into place. A second, unkilled run
//! must then finish every file: each in exactly one destination, byte for byte, nothing left in
//! staging or the inbox.
//!
//! Skipped with a printed reason where `strace` is missing (`.ci/run` installs it).

#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::shares_fixture::find_tool;
use crate::util::{EICAR, Outcome, World, bytes, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

/// The files of one round: (name, content, where it must end).
fn drops() -> Vec<(&'static str, Vec<u8>, Outcome)> {
    vec![
        ("a.bin", bytes(11, 300_000), Outcome::Clean),
        ("sub/b.txt", bytes(12, 4_000), Outcome::Clean),
        ("eicar.com", EICAR.to_vec(), Outcome::Quarantine),
    ]
}

/// Runs the agent under strace, killed on entry to the `n`-th call of `syscalls`. Returns whether
/// it was killed (false: the work never reached call `n`, and the agent was stopped by SIGTERM
/// once everything was placed).
async fn run_killed_at(w: &World, strace: &PathBuf, syscalls: &str, n: usize) -> bool {
    let mut child = Group(
        Command::new(strace)
            .args(["-f", "-qq", "-o", "/dev/null", "-e"])
            .arg(format!("trace={syscalls}"))
            .arg("-e")
            .arg(format!("inject={syscalls}:signal=SIGKILL:when={n}"))
            .arg(env!("CARGO_BIN_EXE_dropscan"))
            .args(["run", "--config"])
            .arg(w.write_config())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, killed whole at the end: killing strace alone would detach a
            // traced agent that was not killed, and leave it running.
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let n_files = drops().len();
    let ended = wait_for(LIMIT, || {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(Some(status));
        }
        (w.outcomes().len() == n_files).then_some(None)
    })
    .await
    .expect("the agent neither died nor finished");
    // Everything is placed: a kill point after that (a sidecar, a kept original's removal) may
    // still come.
    let ended = match ended {
        Some(status) => Some(status),
        None => wait_for(Duration::from_secs(3), || child.try_wait().unwrap()).await,
    };
    // strace exits with the status of the traced program: killed by the injected signal.
    ended.is_some()
}

/// A child running in its own process group, which is killed (SIGKILL) and reaped on drop.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = i32::try_from(self.0.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL).ok();
        }
        self.0.wait().ok();
    }
}

/// One round per kill point until a round is no longer killed.
async fn every_kill_point(syscalls: &str, watch_extra: &str) {
    let Some(strace) = find_tool("strace") else {
        eprintln!("skipped: strace not installed (Debian package strace)");
        return;
    };
    for n in 1..=40 {
        let mut w = World::quick().await;
        w.watch_extra = watch_extra.to_string();
        for (name, content, _) in drops() {
            w.drop_file(name, &content);
        }
        let killed = run_killed_at(&w, &strace, syscalls, n).await;
        eprintln!("{syscalls} #{n}: killed {killed}");
        // The next start finishes the work.
        let agent = w.start_agent();
        let o = w.wait_placed(drops().len(), LIMIT).await;
        for (name, content, outcome) in drops() {
            let rel = PathBuf::from(name);
            let why = std::fs::read_to_string(w.failed.join(format!("{name}.dropscan.json")));
            assert_eq!(
                o.get(&rel),
                Some(&outcome),
                "killed at {syscalls} #{n}: {o:?} {why:?}"
            );
            let dir = match outcome {
                Outcome::Clean => &w.clean,
                Outcome::Quarantine => &w.quarantine,
                Outcome::Failed => &w.failed,
            };
            assert!(
                std::fs::read(dir.join(&rel)).unwrap() == content,
                "killed at {syscalls} #{n}: {name} changed"
            );
        }
        assert!(
            w.inbox_files().is_empty(),
            "killed at {syscalls} #{n}: left in the inbox: {:?}",
            w.inbox_files().keys()
        );
        let staging = w.inbox.join(".dropscan/test");
        let emptied = wait_for(LIMIT, || {
            let left: Vec<_> = std::fs::read_dir(&staging)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".owner")
                .collect();
            left.is_empty().then_some(())
        })
        .await;
        assert!(
            emptied.is_some(),
            "killed at {syscalls} #{n}: staging not emptied"
        );
        agent.stop().await.0.unwrap();
        if !killed {
            return;
        }
    }
    panic!("more than 40 kill points for {syscalls}: the loop would not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_rename_of_claim_own_and_release_loses_nothing() {
    every_kill_point("rename,renameat,renameat2", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_rename_while_originals_are_kept_loses_nothing() {
    every_kill_point(
        "rename,renameat,renameat2",
        "lease_check = \"off\"\nkeep_original = \"1s\"",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_fsync_loses_nothing() {
    every_kill_point("fsync,fdatasync", "").await;
}
