//! A watch whose share already hangs when the agent starts (an NFS or SMB server down at boot):
//! the other watches are served, and SIGTERM ends the process.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::review10::{HangingShare, spawn_binary, threads_of};
use crate::util::{LONG, World, bytes, wait_for};

/// Start-up resolves, stats and prepares every watch's folders; it did so on the main thread
/// (resolving symlinks while validating the configuration, then waiting for every inbox), so one
/// share whose server hangs held the whole agent before it logged a line (`local.bin placed:
/// None`, no log line, SIGTERM's default action ended it). Now the other watches are served, and
/// the hung one once its server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_hung_before_start_does_not_stop_the_other_watches() {
    let mut w = World::quick().await;
    let other = w.dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    w.more_watches = "\n[[watch]]\npath = \"other\"\nclean_dir = \"out2/clean\"\n\
                      quarantine_dir = \"out2/quarantine\"\nfailed_dir = \"out2/failed\"\n"
        .into();
    let server = w.dir.path().join("server");
    let Some(share) = HangingShare::mount(&server, &other) else {
        return;
    };
    let config = w.write_config();
    // The agent's own folders for that watch exist, as after an earlier run.
    for sub in ["clean", "quarantine", "failed"] {
        std::fs::create_dir_all(w.dir.path().join("out2").join(sub)).unwrap();
    }
    share.hang();
    let log = w.dir.path().join("agent.log");
    let mut agent = spawn_binary(&config, &log);
    w.drop_file("local.bin", &bytes(150, 1000));
    let placed = wait_for(LONG, || w.clean.join("local.bin").is_file().then_some(())).await;
    // The share's server answers again: its watch is served too (the agent restarts on it).
    share.signal(rustix::process::Signal::CONT);
    std::fs::write(server.join("remote.bin"), bytes(151, 1000)).unwrap();
    let remote = w.dir.path().join("out2/clean/remote.bin");
    let served = wait_for(LONG, || remote.is_file().then_some(())).await;
    let pid = rustix::process::Pid::from_raw(i32::try_from(agent.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let ended = wait_for(Duration::from_secs(30), || agent.try_wait().unwrap()).await;
    let threads = threads_of(agent.id());
    if ended.is_none() {
        agent.kill().ok();
        agent.wait().ok();
    }
    drop(share);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = logged.lines().rev().take(6).collect();
    assert!(
        placed.is_some() && served.is_some() && ended.is_some(),
        "with the other watch's share hung since before start: local.bin placed: {placed:?}; \
         remote.bin placed once the share answered: {served:?}; ended within 30 s of SIGTERM: {ended:?}; threads: {threads:?}; last log lines (newest \
         first): {tail:#?}"
    );
}
