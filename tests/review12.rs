//! Review 12: attacks on the work merged for issue 20 (the claim batch owned in one call, the
//! POST cap, settle's shares, the blocking pool) and on the start-up fix for a share hung at
//! start (records of a watch not served are left alone). Each test is named after a finding
//! and failed before its fix (or is ignored with the reason, where the fix is not small).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use dropscan::emulator::Faults;

use crate::review8::records;
use crate::util::{LONG, World, bytes, wait_for};

/// The state of `name`'s journal record, if it has one.
fn state_of(w: &World, name: &str) -> Option<String> {
    records(w).into_iter().find(|r| r.0 == name).map(|r| r.1)
}

/// Journal records as `records` reads them.
type Records = Vec<(String, String, Option<String>, Option<String>)>;

/// Somebody moves the staging folder away and plants a symlink to it in its place: with a record
/// in flight, the watch is held (never followed, never moved aside). The agent runs `hold_for`
/// like that; then the administrator puts the folder back and the agent runs until `a.bin` is in
/// clean. The records while it was held, and whether `a.bin` was placed.
// The test moves the staging folder as an attacker or administrator would (a plain rename).
#[allow(clippy::disallowed_methods)]
async fn held_then_back(w: &World, hold_for: Duration) -> (Records, Option<()>) {
    let staging = w.inbox.join(".dropscan/test");
    let away = w.dir.path().join("staging-away");
    std::fs::rename(&staging, &away).unwrap();
    std::os::unix::fs::symlink(&away, &staging).unwrap();
    let agent = w.start_agent();
    tokio::time::sleep(hold_for).await;
    let meanwhile = records(w);
    agent.stop().await.0.unwrap();
    std::fs::remove_file(&staging).unwrap();
    std::fs::rename(&away, &staging).unwrap();
    let agent = w.start_agent();
    let placed = wait_for(LONG, || w.clean.join("a.bin").is_file().then_some(())).await;
    agent.stop().await.0.unwrap();
    (meanwhile, placed)
}

/// Finding 1: a watch held at start (here: an entry planted where its staging folder belongs
/// while one of its files waits for its upload) is left alone by start-up's reconcile, but the
/// upload sweep (uploads found waiting, every 10 s) still took up its `hashed` record: the
/// staged file could not be opened through the planted entry, the record was hashed again, and
/// owning it failed, so the file was decided `failed` while its watch was held. A held watch's
/// records must wait for the start that serves it, as a watch not served does
/// (`hung_at_start::a_file_waiting_on_a_share_gone_at_start_is_placed_once_it_is_back`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_watch_s_waiting_upload_is_not_failed_by_the_upload_sweep() {
    let w = World::quick().await;
    w.emulator().state().set_faults(Faults {
        http_429_share: 1.0,
        ..Faults::default()
    });
    let agent = w.start_agent();
    let data = bytes(170, 5000);
    w.drop_file("a.bin", &data);
    let hashed = wait_for(LONG, || state_of(&w, "a.bin").filter(|s| s == "hashed")).await;
    agent.stop().await.0.unwrap();
    assert!(hashed.is_some(), "a.bin never hashed: {:?}", records(&w));
    w.emulator().state().set_faults(Faults::default());
    // Two sweeps of the uploads found waiting (every 10 s) while the watch is held.
    let (meanwhile, placed) = held_then_back(&w, Duration::from_secs(25)).await;
    assert!(
        meanwhile.iter().any(|r| r.0 == "a.bin" && r.1 == "hashed") && placed.is_some(),
        "records while the watch was held: {meanwhile:?}; a.bin placed once it was back: \
         {placed:?}; now: {:?}",
        records(&w)
    );
    assert_eq!(std::fs::read(w.clean.join("a.bin")).unwrap(), data);
}

/// Review 12's open case, the sorter's side of finding 1: a watch held at start while one of its
/// files waits for its placement (verdict in; here its clean folder refused every entry). The
/// record must wait for the start that serves the watch, neither closed as vanished nor failed.
/// This passed before `Sorter::held` too (the sorter retried the placement through the planted
/// entry, with warnings, and the record stayed): it guards the sorter's side of `serves`, which
/// now leaves such a record alone as upload and hashing do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_watch_s_decided_file_is_not_closed_as_vanished_by_the_sorter() {
    let w = World::quick().await;
    let agent = w.start_agent();
    let ready = wait_for(LONG, || w.clean.is_dir().then_some(())).await;
    assert!(ready.is_some(), "the agent made no clean folder");
    // Immutable: not even root can add to it, so the verdict comes in and the placement cannot.
    let immutable = |flag: &str| {
        std::process::Command::new("chattr")
            .arg(flag)
            .arg(&w.clean)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !immutable("+i") {
        agent.stop().await.0.unwrap();
        eprintln!("skipped: chattr +i refused here (e2fsprogs and an ext4 temp folder needed)");
        return;
    }
    let data = bytes(171, 5000);
    w.drop_file("a.bin", &data);
    let waiting = |s: &String| s == "decided" || s == "placing";
    let decided = wait_for(LONG, || state_of(&w, "a.bin").filter(waiting)).await;
    agent.stop().await.0.unwrap();
    assert!(immutable("-i"), "chattr -i");
    assert!(decided.is_some(), "a.bin never decided: {:?}", records(&w));
    // Records left waiting are taken up by the second sorter sweep that sees them (5 s apart).
    let (meanwhile, placed) = held_then_back(&w, Duration::from_secs(20)).await;
    assert!(
        meanwhile.iter().any(|r| r.0 == "a.bin" && waiting(&r.1)) && placed.is_some(),
        "records while the watch was held: {meanwhile:?}; a.bin placed once it was back: \
         {placed:?}; now: {:?}",
        records(&w)
    );
    assert_eq!(std::fs::read(w.clean.join("a.bin")).unwrap(), data);
}
