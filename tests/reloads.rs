//! SIGHUP reloads while files are in every stage: each reload stops one agent generation and
//! starts the next in the same process, while blocking work of the old one (a copy, a claim
//! batch, a placement, a listing) may still run. Nothing may be lost, placed twice, reported
//! vanished, or left behind.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::{LONG, Outcome, World, bytes, collect_stderr, count_lines, wait_for};

fn signal(child: &Child, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

/// The journal's records closed as vanished (relative path, reason).
fn vanished(w: &World) -> Vec<(String, Option<String>)> {
    let db = rusqlite::Connection::open_with_flags(
        w.state_dir().join("journal.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut q = db
        .prepare("SELECT rel_path, reason FROM files WHERE outcome = 'vanished'")
        .unwrap();
    q.query_map([], |r| {
        let rel: Vec<u8> = r.get(0)?;
        Ok((String::from_utf8_lossy(&rel).into_owned(), r.get(1)?))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Everything left in the staging folder, dropscan's own lock and owner files excepted.
fn staging_leftovers(w: &World) -> Vec<String> {
    std::fs::read_dir(w.inbox.join(".dropscan/test")).map_or(Vec::new(), |rd| {
        rd.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock" && n != ".owner")
            .collect()
    })
}

/// 160 files, ten of them 8 MiB (their private copies take long enough for reloads to come
/// during them), dropped while the agent is reloaded every 200 ms, 40 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_reloads_while_files_are_in_every_stage_loses_and_doubles_nothing() {
    storm(World::quick().await).await;
}

/// The same with the destinations on another filesystem: every release is a verified copy,
/// which reloads interrupt too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_reloads_during_verified_copies_to_another_filesystem_loses_and_doubles_nothing()
{
    let mut w = World::quick().await;
    let Some(_other) = crate::review6::on_shm(&mut w) else {
        eprintln!("skipped: no /dev/shm");
        return;
    };
    storm(w).await;
}

async fn storm(w: World) {
    let config = w.write_config();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect_stderr(&mut child);
    let mut dropped: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    for i in 0..160u64 {
        let len = if i % 16 == 0 {
            8 << 20
        } else {
            1000 + usize::try_from(i).unwrap() * 397
        };
        let rel = format!("d{}/f{i}.bin", i % 4);
        let data = bytes(100 + i, len);
        w.drop_file(&rel, &data);
        dropped.insert(PathBuf::from(rel), data);
        if i % 4 == 0 {
            signal(&child, rustix::process::Signal::HUP);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let o = w.wait_placed(dropped.len(), 2 * LONG).await;
    signal(&child, rustix::process::Signal::TERM);
    let status = wait_for(LONG, || child.try_wait().unwrap()).await;
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    // SIGHUPs that come during a restart are taken together.
    let reloads = count_lines(&lines, "SIGHUP: configuration valid, restarting");
    assert!(reloads >= 10, "only {reloads} reloads");
    assert!(
        o.values().all(|o| *o == Outcome::Clean),
        "not all clean: {o:?}"
    );
    assert_eq!(
        World::files_in(&w.clean),
        dropped,
        "clean differs from what was dropped"
    );
    assert_eq!(vanished(&w), Vec::new(), "records closed as vanished");
    assert_eq!(
        staging_leftovers(&w),
        Vec::<String>::new(),
        "left in staging"
    );
    assert_eq!(w.inbox_files(), BTreeMap::new(), "left in the inbox");
    assert_eq!(count_lines(&lines, "panicked"), 0, "a panic");
}
