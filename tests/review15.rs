//! Review 15: an attack on the agent's own folders left without an inotify watch
//! (`scope::unwatched_dirs`, `watch/root.rs` `start_notify`). No bug found; this guards what
//! the attack tried: user folders named like the agent's own (one level down, or sharing a
//! prefix of the name), a staging folder configured outside `.dropscan`, and the agent's
//! folders removed and made again while it runs.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::Duration;

use dropscan::config::WatchMode;

use crate::watch_settle::{Inbox, START_MARKER, config, inotify_watched, kernel_id};

/// User folders whose names or paths look like the agent's own stay watched, and their files
/// are found live (the reconcile is a minute away), also after `.dropscan` and the staging
/// folder were removed and made again under the running watcher (which watches them again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_folders_named_like_the_agent_s_own_stay_watched() {
    let (tmp, root) = Inbox::tempdir();
    let mut cfg = config(&root, WatchMode::Notify, Duration::from_millis(200));
    cfg.clean_dir = root.join("out/clean");
    cfg.staging_dir = root.join("stage");
    // The agent's folders, and a `.dropscan` left by a former default staging.
    let own = [
        ".dropscan/default",
        "stage",
        "out/clean",
        "quarantine",
        "failed",
    ];
    let users = [
        "sub/quarantine",
        "sub/stage",
        "sub/out/clean",
        "quarantine2",
        "failed.d",
        "out/cleaner",
        "stage-not",
    ];
    for dir in own.iter().chain(&users) {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::write(root.join(START_MARKER), b"m").unwrap();
    let mut inbox = Inbox::start(tmp, cfg);
    inbox.wait_for_start_listing().await;
    let watched = inotify_watched();
    for dir in users {
        assert!(
            watched.contains(&kernel_id(&root.join(dir))),
            "{dir} is not watched"
        );
    }
    // (`.dropscan` is no own folder here: staging is `stage`.)
    for dir in ["stage", "out/clean", "quarantine", "failed"] {
        assert!(
            !watched.contains(&kernel_id(&root.join(dir))),
            "{dir} is watched"
        );
    }
    for (n, dir) in users.iter().enumerate() {
        let rel = format!("{dir}/live{n}.bin");
        inbox.write(&rel, b"live");
        inbox.wait_for(&rel).await;
    }
    // The agent's folders gone and made again: watched again (only their events cost), and
    // nothing in them is reported; the user's folders go on.
    fs::remove_dir_all(root.join(".dropscan")).unwrap();
    fs::remove_dir_all(root.join("stage")).unwrap();
    fs::create_dir_all(root.join(".dropscan/default")).unwrap();
    fs::create_dir(root.join("stage")).unwrap();
    inbox.write(".dropscan/default/staged.bin", b"ours");
    inbox.write("stage/staged.bin", b"ours");
    for (n, dir) in users.iter().enumerate() {
        let rel = format!("{dir}/again{n}.bin");
        inbox.write(&rel, b"again");
        inbox.wait_for(&rel).await;
    }
    inbox.write("new/after.bin", b"new");
    inbox.wait_for("new/after.bin").await;
    inbox.drain();
    inbox.assert_never(".dropscan/default/staged.bin");
    inbox.assert_never("stage/staged.bin");
    inbox.stop().await;
}
