//! A watch whose share already hangs when the agent starts (an NFS or SMB server down at boot):
//! the other watches are served, and SIGTERM ends the process.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use dropscan::emulator::Faults;

use crate::review8::records;
use crate::review10::{HangingShare, spawn_binary, terminate, with_second_watch};
use crate::util::{LONG, bytes, wait_for};

/// The agent (the binary) runs with the server refusing every submission while `data` is
/// written to `file`, and is killed once that file's record is `hashed`: it waits for its upload.
/// The configuration and the agent's log file.
async fn hashed_then_killed(
    w: &crate::util::World,
    file: &std::path::Path,
    data: &[u8],
) -> (std::path::PathBuf, std::path::PathBuf) {
    w.emulator().state().set_faults(Faults {
        http_429_share: 1.0,
        ..Faults::default()
    });
    let config = w.write_config();
    let log = w.dir.path().join("agent.log");
    let mut agent = spawn_binary(&config, &log);
    std::fs::write(file, data).unwrap();
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let hashed = wait_for(LONG, || {
        records(w)
            .into_iter()
            .find(|r| r.0 == name && r.1 == "hashed")
    })
    .await;
    agent.kill().ok();
    agent.wait().ok();
    assert!(hashed.is_some(), "{name} never hashed: {:?}", records(w));
    (config, log)
}

/// The binary started with a second watch on a share that hangs from before the start (its
/// own folders exist, as after an earlier run): the world, the share's server folder, the share,
/// the agent and its log. None where the share cannot be mounted (printed).
async fn started_beside_a_hung_share() -> Option<(
    crate::util::World,
    std::path::PathBuf,
    HangingShare,
    std::process::Child,
    std::path::PathBuf,
)> {
    let (w, server, other) = with_second_watch().await;
    let share = HangingShare::mount(&server, &other)?;
    let config = w.write_config();
    for sub in ["clean", "quarantine", "failed"] {
        std::fs::create_dir_all(w.dir.path().join("out2").join(sub)).unwrap();
    }
    share.hang();
    let log = w.dir.path().join("agent.log");
    let agent = spawn_binary(&config, &log);
    Some((w, server, share, agent, log))
}

/// Start-up resolves, stats and prepares every watch's folders; it did so on the main thread
/// (resolving symlinks while validating the configuration, then waiting for every inbox), so one
/// share whose server hangs held the whole agent before it logged a line (`local.bin placed:
/// None`, no log line, SIGTERM's default action ended it). Now the other watches are served, and
/// the hung one once its server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_hung_before_start_does_not_stop_the_other_watches() {
    let Some((w, server, share, mut agent, log)) = started_beside_a_hung_share().await else {
        return;
    };
    w.drop_file("local.bin", &bytes(150, 1000));
    let placed = wait_for(LONG, || w.clean.join("local.bin").is_file().then_some(())).await;
    // The share's server answers again: its watch is served too (the agent restarts on it).
    share.signal(rustix::process::Signal::CONT);
    std::fs::write(server.join("remote.bin"), bytes(151, 1000)).unwrap();
    let remote = w.dir.path().join("out2/clean/remote.bin");
    let served = wait_for(LONG, || remote.is_file().then_some(())).await;
    let (ended, threads, tail) = terminate(&mut agent, &log, 6).await;
    drop(share);
    assert!(
        placed.is_some() && served.is_some() && ended.is_some(),
        "with the other watch's share hung since before start: local.bin placed: {placed:?}; \
         remote.bin placed once the share answered: {served:?}; ended within 30 s of SIGTERM: {ended:?}; threads: {threads:?}; last log lines (newest \
         first): {tail:#?}"
    );
}

/// A file of the share's watch waits for its upload (the server refuses every submission) when
/// the agent is killed; the share is then gone (unmounted, its mount point removed) when the
/// agent starts again, so only the local watch is served. That file's record must be left alone
/// until its watch is served again, and then be placed: the stages' sweeps (uploads found
/// waiting, claims found stuck) must not take up a record of a watch that is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_waiting_on_a_share_gone_at_start_is_placed_once_it_is_back() {
    let (w, server, other) = with_second_watch().await;
    let Some(share) = HangingShare::mount(&server, &other) else {
        return;
    };
    let (config, _) = hashed_then_killed(&w, &server.join("remote.bin"), &bytes(160, 5000)).await;
    drop(share);
    std::fs::remove_dir(&other).unwrap();
    w.emulator().state().set_faults(Faults::default());
    let log2 = w.dir.path().join("agent2.log");
    let mut agent = spawn_binary(&config, &log2);
    w.drop_file("local.bin", &bytes(161, 1000));
    let placed = wait_for(LONG, || w.clean.join("local.bin").is_file().then_some(())).await;
    // Two sweeps of the uploads found waiting (every 10 s) while the share is gone.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let meanwhile = records(&w);
    std::fs::create_dir_all(&other).unwrap();
    let Some(share) = HangingShare::mount(&server, &other) else {
        agent.kill().ok();
        agent.wait().ok();
        return;
    };
    let remote = w.dir.path().join("out2/clean/remote.bin");
    let served = wait_for(LONG, || remote.is_file().then_some(())).await;
    agent.kill().ok();
    agent.wait().ok();
    drop(share);
    let logged = std::fs::read_to_string(&log2).unwrap_or_default();
    let tail: Vec<&str> = logged.lines().rev().take(8).collect();
    assert!(
        placed.is_some() && served.is_some(),
        "local.bin placed: {placed:?}; remote.bin placed once the share was back: {served:?}; \
         records while it was gone: {meanwhile:?}; now: {:?}; last log lines (newest first): \
         {tail:#?}",
        records(&w)
    );
}

/// A watch whose staging folder is missing while files of it are in flight (its share is not
/// mounted yet at boot: the mount point is there, empty) made start-up wait for the folder, and
/// so held every other watch (`local.bin placed: None`). Now that watch alone waits, held
/// (`/readyz` says why), and the agent restarts on it once its staging folder is back.
// The test moves the agent's folder as a missing mount would hide it (a plain rename).
#[allow(clippy::disallowed_methods)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_waiting_for_its_staging_folder_at_start_does_not_hold_the_others() {
    let (w, _server, other) = with_second_watch().await;
    let data = bytes(170, 5000);
    let (config, log) = hashed_then_killed(&w, &other.join("remote.bin"), &data).await;
    w.emulator().state().set_faults(Faults::default());
    // The share is not mounted: what was on it (the agent's folder with the staged file) is
    // not there.
    let on_share = other.join(".dropscan");
    let away = w.dir.path().join("dropscan-away");
    std::fs::rename(&on_share, &away).unwrap();
    let mut agent = spawn_binary(&config, &log);
    w.drop_file("local.bin", &bytes(171, 1000));
    let placed = wait_for(LONG, || w.clean.join("local.bin").is_file().then_some(())).await;
    // The share is mounted: its watch is served, and the file that waited is placed.
    std::fs::rename(&away, &on_share).unwrap();
    let remote = w.dir.path().join("out2/clean/remote.bin");
    let served = wait_for(LONG, || remote.is_file().then_some(())).await;
    let (ended, threads, tail) = terminate(&mut agent, &log, 8).await;
    assert!(
        placed.is_some() && served.is_some() && ended.is_some(),
        "with the other watch's staging folder missing at start: local.bin placed: {placed:?}; \
         remote.bin placed once it was back: {served:?}; ended within 30 s of SIGTERM: \
         {ended:?}; threads: {threads:?}; last log lines (newest first): {tail:#?}"
    );
    assert_eq!(std::fs::read(&remote).unwrap(), data);
}

/// Finding (`.ci/run`'s soak bench, under load: "the agent exited with signal: 1 (SIGHUP)"): the
/// signal handlers were installed only after the configuration was loaded and every inbox looked
/// at, so a SIGHUP (a reload, a log rotation's signal) or a SIGTERM that came meanwhile ended the
/// process by the signal's default action. A share hung at start makes that look wait
/// `answer::DEADLINE` (3 s): the SIGHUP comes within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_start_up_waits_on_a_hung_share_does_not_end_the_agent() {
    let Some((w, _, share, mut agent, log)) = started_beside_a_hung_share().await else {
        return;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    crate::durability::sighup(&agent);
    w.drop_file("local.bin", &bytes(170, 1000));
    let placed = wait_for(LONG, || w.clean.join("local.bin").is_file().then_some(())).await;
    let early = agent.try_wait().unwrap();
    share.signal(rustix::process::Signal::CONT);
    assert!(
        early.is_none(),
        "a SIGHUP 1 s into a start-up waiting on a hung share ended the agent: {early:?}; \
         local.bin placed: {placed:?}; its log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let (ended, threads, tail) = terminate(&mut agent, &log, 6).await;
    drop(share);
    assert!(
        placed.is_some() && ended.is_some(),
        "a SIGHUP 1 s into a start-up waiting on a hung share: local.bin placed: {placed:?}; ended within 30 s of SIGTERM: {ended:?}; threads: \
         {threads:?}; last log lines (newest first): {tail:#?}"
    );
}
