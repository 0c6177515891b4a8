//! Review 11: attacks on the memory and CPU changes merged from `rss` and `cpu` (settle's bound,
//! the hashing permit held until upload takes the file, small uploads read in memory, the
//! buffer pool, malloc_trim). Each test is named after a finding and failed before its fix (or
//! is ignored with the reason, where the fix is not small).

#![allow(clippy::unwrap_used)]

use crate::friction::{free_port, http_get};
use crate::util::{LONG, World, wait_for};

/// The value of `series` in the agent's `/metrics` on `port`, if it answers and has it.
fn metric(port: u16, series: &str) -> Option<f64> {
    let body = http_get(port, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Finding 1: settle held at most `MAX_WAITING` (8,192) files for all watches together, and at
/// the bound took no candidate from any watch. A user who can write one inbox made 8,192 files
/// that do not settle soon (here Excel-shaped save temps, quiet for `save_temp_settle`, an hour
/// by default; files rewritten every second never settle at all) and every other watch stopped:
/// a clean file dropped into the second watch was never looked at. Now each watch has its share
/// of the bound (half of it each here) and its own channel, and a full share rotates
/// (`settle/share.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsettled_files_in_one_inbox_stall_every_other_watch() {
    let mut w = World::quick().await;
    let port = free_port();
    std::fs::create_dir_all(w.dir.path().join("inbox2")).unwrap();
    w.more_watches = format!(
        "\n[[watch]]\npath = \"inbox2\"\nsettle = \"300ms\"\nsettle_empty = \"2s\"\n\
         clean_dir = \"out2/clean\"\nquarantine_dir = \"out2/quarantine\"\nfailed_dir = \"out2/failed\"\n\
         \n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    // More save temps than settle held for all watches together before the fix.
    for i in 0..8192 + 64 {
        std::fs::write(w.inbox.join(format!("{i:08X}")), b"half a workbook").unwrap();
    }
    let agent = w.start_agent();
    let settling = format!(
        "dropscan_inbox_settling_files{{watch=\"{}\"}}",
        w.inbox.display()
    );
    // At least the first watch's share (half the bound, with two watches).
    let full = wait_for(LONG, || metric(port, &settling).filter(|n| *n >= 4096.0)).await;
    assert!(full.is_some(), "settle never held the save temps");

    std::fs::write(w.dir.path().join("inbox2/b.txt"), b"second watch").unwrap();
    let placed = wait_for(LONG, || {
        w.dir.path().join("out2/clean/b.txt").exists().then_some(())
    })
    .await;
    let inbox2 = format!(
        "dropscan_inbox_settling_files{{watch=\"{}\"}}",
        w.dir.path().join("inbox2").display()
    );
    let seen = metric(port, &inbox2);
    agent.stop().await.0.ok();
    assert!(
        placed.is_some(),
        "a clean file in the second watch was not released while the first inbox held \
         {full:?} unsettled save temps (second watch settling: {seen:?})"
    );
}
