//! Regressions from the attack review: an inbox writer as attacker, power cuts and outages
//! between steps. Each test is named after the hole it closes.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::util::{EICAR, Outcome, World, bytes, wait_events, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_dropscan_symlink_is_moved_aside_never_followed_at_start_up() {
    let w = World::quick().await;
    // While the agent is stopped, a user replaces `.dropscan` with a symlink to a folder that
    // looks like staging and holds a file of someone else's.
    let elsewhere = w.dir.path().join("elsewhere");
    std::fs::create_dir_all(elsewhere.join("test")).unwrap();
    std::fs::write(elsewhere.join("test/0123.staged"), b"not yours").unwrap();
    std::os::unix::fs::symlink(&elsewhere, w.inbox.join(".dropscan")).unwrap();
    w.drop_file("a.txt", b"a");
    let agent = w.start_agent();
    let o = w.wait_placed(1, LIMIT).await;
    agent.stop().await.0.unwrap();
    assert_eq!(
        o.len(),
        1,
        "nothing recovered from behind the symlink: {o:?}"
    );
    assert_eq!(o[&PathBuf::from("a.txt")], Outcome::Clean);
    assert_eq!(
        std::fs::read(elsewhere.join("test/0123.staged")).unwrap(),
        b"not yours"
    );
    assert_eq!(
        std::fs::read_dir(elsewhere.join("test")).unwrap().count(),
        1
    );
    assert_eq!(w.emulator().state().stats().submits_accepted, 1);
}

/// Without leases (`lease_check = "off"`, as on a client mount), a writer that keeps its handle
/// past `settle` has its file taken; it then writes EICAR through the handle once the file is
/// clean. Clean keeps the scanned bytes, and what the writer added is not lost either: the kept
/// original changed, goes back to the inbox, and is scanned as a new version (quarantine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_through_an_open_handle_after_release_never_puts_eicar_in_clean() {
    let mut w = World::quick().await;
    w.watch_extra = "lease_check = \"off\"\nkeep_original = \"20s\"".into();
    let agent = w.start_agent();
    let mut handle = std::fs::File::create(w.inbox.join("report.txt")).unwrap();
    handle.write_all(b"quarterly figures").unwrap();
    handle.flush().unwrap();
    let clean = w.clean.join("report.txt");
    wait_for(LIMIT, || clean.exists().then_some(()))
        .await
        .expect("released to clean");
    handle.write_all(EICAR).unwrap();
    handle.sync_all().unwrap();
    drop(handle);
    // The same name in clean and in quarantine (the harness's `outcomes` refuses that).
    let quarantined = w.quarantine.join("report.txt.dropscan.json");
    wait_for(LIMIT, || quarantined.exists().then_some(()))
        .await
        .expect("the new version is scanned and quarantined");
    assert_eq!(std::fs::read(&clean).unwrap(), b"quarterly figures");
    assert_eq!(
        std::fs::read(w.quarantine.join("report.txt")).unwrap(),
        [b"quarterly figures".as_slice(), EICAR].concat()
    );
    wait_for(LIMIT, || (w.staged_files() == 0).then_some(()))
        .await
        .expect("staging empties");
    agent.stop().await.0.unwrap();
}

/// Review finding: a file taken after `held_open_limit` (its writer still holds it open, and
/// the lease says so) had its kept original dropped once `keep_original` had passed, although
/// the writer still held it: what the writer wrote next went into a deleted inode, silently
/// lost (SECURITY.md: "never into a deleted inode"). An original somebody holds open for
/// writing is kept until it is closed; what the writer adds comes back as a new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_still_holding_a_file_taken_after_held_open_limit_loses_what_it_writes_after_keep_original()
 {
    let mut w = World::quick().await;
    w.watch_extra = "held_open_limit = \"1s\"\nkeep_original = \"1s\"".into();
    let agent = w.start_agent();
    let mut handle = std::fs::File::create(w.inbox.join("log.txt")).unwrap();
    handle.write_all(b"first part").unwrap();
    handle.flush().unwrap();
    let clean = w.clean.join("log.txt");
    wait_for(LIMIT, || clean.exists().then_some(()))
        .await
        .expect("taken after held_open_limit and released to clean");
    // Well past `keep_original` (1 s) with the handle still open.
    tokio::time::sleep(Duration::from_secs(4)).await;
    handle.write_all(b", second part").unwrap();
    handle.sync_all().unwrap();
    drop(handle);
    let second = w.clean.join("log (1).txt");
    wait_for(LIMIT, || second.exists().then_some(()))
        .await
        .expect("what the writer added is scanned as a new version, not lost");
    assert_eq!(std::fs::read(&clean).unwrap(), b"first part");
    assert_eq!(std::fs::read(&second).unwrap(), b"first part, second part");
    wait_for(LIMIT, || (w.staged_files() == 0).then_some(()))
        .await
        .expect("staging empties once the writer is done");
    agent.stop().await.0.unwrap();
}

/// With leases (the default on a local filesystem): a writer that keeps its handle open longer
/// than `settle` is waited for. Nothing is taken, uploaded or released while it holds the file;
/// once it closes, the whole file is uploaded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_holding_its_file_open_past_settle_is_waited_for_and_scanned_once_whole() {
    let w = World::quick().await;
    let agent = w.start_agent();
    let mut handle = std::fs::File::create(w.inbox.join("report.txt")).unwrap();
    handle.write_all(b"quarterly figures").unwrap();
    handle.flush().unwrap();
    // Quiet for `settle` (300 ms) with the handle open and nothing written: found held open, and
    // again at the next check.
    wait_events(
        "quiet but held open for writing; waiting",
        Some(&w.inbox.join("report.txt")),
        2,
    )
    .await;
    assert_eq!(w.emulator().state().stats().submits_accepted, 0);
    assert!(w.inbox.join("report.txt").exists(), "left in the inbox");
    assert_eq!(w.staged_files(), 0);
    handle.write_all(EICAR).unwrap();
    drop(handle);
    let o = w.wait_placed(1, LIMIT).await;
    assert_eq!(o[&PathBuf::from("report.txt")], Outcome::Quarantine);
    assert_eq!(
        std::fs::read(w.quarantine.join("report.txt")).unwrap(),
        [b"quarterly figures".as_slice(), EICAR].concat()
    );
    assert_eq!(w.emulator().state().stats().submits_accepted, 1);
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_with_the_share_not_mounted_waits_and_strands_nothing() {
    let mut w = World::new(dropscan::emulator::EmulatorConfig {
        scan_delay: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    w.settle = "200ms";
    let agent = w.start_agent();
    w.drop_file("in-flight.bin", &bytes(1, 10_000));
    wait_for(LIMIT, || (w.staged_files() == 1).then_some(()))
        .await
        .expect("claimed");
    agent.stop().await.0.unwrap();
    // The share is not mounted at the next start: the inbox is an empty mount point.
    let share = w.dir.path().join("share");
    #[allow(clippy::disallowed_methods)]
    std::fs::rename(&w.inbox, &share).unwrap();
    std::fs::create_dir(&w.inbox).unwrap();
    let agent = w.start_agent();
    // The agent waits for the share before it starts its stages.
    wait_events(
        "the staging folder is missing while files are in flight",
        Some(&w.inbox),
        1,
    )
    .await;
    let s = dropscan::journal::read_summary(&w.state_dir().join("journal.sqlite")).unwrap();
    assert!(
        s.per_outcome.is_empty(),
        "nothing judged while the root is not recognised: {:?}",
        s.per_outcome
    );
    // The share is mounted: the file goes on to clean.
    std::fs::remove_dir(&w.inbox).unwrap();
    #[allow(clippy::disallowed_methods)]
    std::fs::rename(&share, &w.inbox).unwrap();
    let o = w.wait_placed(1, LIMIT).await;
    assert_eq!(o[&PathBuf::from("in-flight.bin")], Outcome::Clean);
    assert_eq!(
        std::fs::read(w.clean.join("in-flight.bin")).unwrap(),
        bytes(1, 10_000)
    );
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_with_one_instance_id_are_refused_and_a_stale_owner_is_taken_over() {
    let w = World::quick().await;
    let staging = w.inbox.join(".dropscan/test");
    std::fs::create_dir_all(&staging).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let marker =
        |beat: u64| format!("machine_id=0000other0000\nhost=fs02\npid=1\nheartbeat={beat}\n");
    std::fs::write(staging.join(".owner"), marker(now)).unwrap();
    let mut agent = w.start_agent();
    let r = tokio::time::timeout(Duration::from_secs(20), agent.task.take().unwrap())
        .await
        .expect("refused at once")
        .unwrap();
    let e = r.expect_err("another live host owns the staging folder");
    assert!(e.contains("in use by host fs02"), "{e}");
    // The other host stopped refreshing its marker long ago: taken over.
    std::fs::write(staging.join(".owner"), marker(now - 3600)).unwrap();
    let agent = w.start_agent();
    w.drop_file("x.txt", b"x");
    w.wait_placed(1, LIMIT).await;
    let text = std::fs::read_to_string(staging.join(".owner")).unwrap();
    assert!(!text.contains("fs02"), "{text}");
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_clean_subfolders_removed_while_files_are_placed_strand_nothing() {
    let w = World::quick().await;
    let agent = w.start_agent();
    let n = 200u64;
    for i in 0..n {
        w.drop_file(&format!("d{}/f{i}.bin", i % 20), &bytes(i, 500));
    }
    // Someone tidies up empty folders in clean, every millisecond for 4 s.
    let clean = w.clean.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = std::sync::Arc::clone(&stop);
    let tidy = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        while !s2.load(std::sync::atomic::Ordering::Relaxed)
            && t0.elapsed() < Duration::from_secs(4)
        {
            for i in 0..20 {
                std::fs::remove_dir(clean.join(format!("d{i}"))).ok();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let o = w.wait_placed(n as usize, LIMIT).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tidy.join().unwrap();
    assert_eq!(o.len(), n as usize);
    for i in 0..n {
        let rel = format!("d{}/f{i}.bin", i % 20);
        let found = crate::util::World::files_in(&w.clean)
            .into_iter()
            .find(|(p, _)| p.file_name() == PathBuf::from(&rel).file_name())
            .map(|(_, c)| c);
        assert_eq!(found, Some(bytes(i, 500)), "{rel}");
    }
    assert_eq!(w.staged_files(), 0, "nothing stranded in staging");
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropscan_symlink_planted_before_a_sighup_reload_is_moved_aside_never_followed() {
    let w = World::quick().await;
    let cfg = w.write_config();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    w.drop_file("first.txt", b"1");
    let placed = wait_for(LIMIT, || w.clean.join("first.txt").exists().then_some(())).await;
    if placed.is_none() {
        child.kill().ok();
        panic!("the agent did not place the first file");
    }
    // While it runs, `.dropscan` becomes a symlink to a look-alike staging folder; then reload.
    let elsewhere = w.dir.path().join("elsewhere");
    std::fs::create_dir_all(elsewhere.join("test")).unwrap();
    std::fs::write(elsewhere.join("test/0123.staged"), b"not yours").unwrap();
    std::fs::remove_dir_all(w.inbox.join(".dropscan")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, w.inbox.join(".dropscan")).unwrap();
    w.drop_file("second.txt", b"2");
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    // The symlink is moved aside, never followed, and a fresh staging folder takes the file.
    let second = wait_for(LIMIT, || w.clean.join("second.txt").exists().then_some(())).await;
    // Stopped before anything is asserted: a failing assertion must not leave the agent running.
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).ok();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().ok();
    child.wait().ok();
    assert_eq!(
        std::fs::read(elsewhere.join("test/0123.staged")).unwrap(),
        b"not yours",
        "the file behind the symlink is untouched"
    );
    assert_eq!(
        std::fs::read_dir(elsewhere.join("test")).unwrap().count(),
        1
    );
    assert!(!w.clean.join("recovered").exists(), "nothing recovered");
    assert!(
        second.is_some(),
        "the new file is placed through a fresh staging folder"
    );
}

// The staging folder owned by another user: `staging_guard.rs` (that watch alone is held).

/// Review finding: a clean placement journals `placing` before it opens the staged file; when
/// the file changed since it was hashed (a writer kept its handle), `rescan` asks the journal to
/// `rehash`, whose guard accepts only hashed/submitting/submitted/decided. The record stays
/// `placing` and every retry meets the same refusal: the file is stranded in staging forever.
///
/// Since the hash owns the bytes (a private copy), a kept handle reaches the user's original,
/// never the staged copy; and with leases such a writer is waited for (test above). Without
/// leases the original is kept, and the writer's change comes back as a new version: scanned
/// again (`notes (1).txt`), nothing stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_after_its_verdict_is_scanned_again_not_stranded_in_placing() {
    let mut w = World::new(dropscan::emulator::EmulatorConfig {
        scan_delay: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    w.watch_extra = "lease_check = \"off\"\nkeep_original = \"20s\"".into();
    let agent = w.start_agent();
    let mut handle = std::fs::File::create(w.inbox.join("notes.txt")).unwrap();
    handle.write_all(b"first draft").unwrap();
    handle.flush().unwrap();
    wait_for(LIMIT, || {
        (w.emulator().state().stats().submits_accepted > 0).then_some(())
    })
    .await
    .expect("uploaded");
    // Written through the kept handle while the scan runs: the verdict is for the old bytes.
    handle.write_all(b", second draft").unwrap();
    handle.sync_all().unwrap();
    drop(handle);
    let o = w.wait_placed(2, Duration::from_secs(90)).await;
    assert_eq!(o[&PathBuf::from("notes.txt")], Outcome::Clean);
    assert_eq!(o[&PathBuf::from("notes (1).txt")], Outcome::Clean);
    assert_eq!(
        std::fs::read(w.clean.join("notes.txt")).unwrap(),
        b"first draft"
    );
    assert_eq!(
        std::fs::read(w.clean.join("notes (1).txt")).unwrap(),
        b"first draft, second draft"
    );
    wait_for(LIMIT, || (w.staged_files() == 0).then_some(()))
        .await
        .expect("nothing stranded in staging");
    agent.stop().await.0.unwrap();
}

/// Review finding: the inbox descriptor is cached and reopened only when its folder is removed.
/// An agent started while the share was not mounted yet (nothing in flight, so the root counts
/// as recognised) makes its staging folder on the empty mount point and keeps claiming through
/// the covered folder once the share is mounted over it: every file on the share is found by
/// path, settles, and is then "gone" at the claim, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_mounted_after_start_up_is_claimed_from() {
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status()
                .ok();
        }
    }
    let w = World::quick().await;
    let share = w.dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let agent = w.start_agent();
    wait_for(LIMIT, || {
        w.inbox.join(".dropscan/test/.owner").exists().then_some(())
    })
    .await
    .expect("started on the empty mount point");
    let mounted = std::process::Command::new("mount")
        .arg("--bind")
        .arg(&share)
        .arg(&w.inbox)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("cannot bind-mount here (needs CAP_SYS_ADMIN): skipped");
        return;
    }
    let _unmount = Unmount(w.inbox.clone());
    w.drop_file("late.txt", b"arrived after the mount");
    let o = w.wait_placed(1, LIMIT).await;
    assert_eq!(o[&PathBuf::from("late.txt")], Outcome::Clean);
    agent.stop().await.0.unwrap();
}

/// Review finding: `OWNER_HEARTBEAT` is never used: a running agent writes its owner marker
/// once, at start-up, and never refreshes it. Three minutes later the marker looks stale, and a
/// second host configured with the same `sensor_instance_id` takes the staging folder over at
/// its start (re-entering the first agent's in-flight files as its own orphans).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_keeps_its_owner_marker_fresh() {
    let w = World::quick().await;
    let agent = w.start_agent();
    let marker = w.inbox.join(".dropscan/test/.owner");
    let text = wait_for(LIMIT, || std::fs::read_to_string(&marker).ok())
        .await
        .expect("marker written at start-up");
    let beat = |t: &str| -> u64 {
        t.lines()
            .find_map(|l| l.strip_prefix("heartbeat="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // Make the marker look an hour old (same host): as it would after an hour of running.
    let old = beat(&text).saturating_sub(3600);
    std::fs::write(
        &marker,
        text.replace(
            &format!("heartbeat={}", beat(&text)),
            &format!("heartbeat={old}"),
        ),
    )
    .unwrap();
    let refreshed = wait_for(Duration::from_secs(75), || {
        let t = std::fs::read_to_string(&marker).ok()?;
        (beat(&t) > old + 3000).then_some(())
    })
    .await;
    assert!(
        refreshed.is_some(),
        "the owner marker was not refreshed within 75 s (heartbeat every 30 s)"
    );
    agent.stop().await.0.unwrap();
}

/// The quarantined file of entry `id` after the agent placed it, and the agent stopped.
#[allow(clippy::unwrap_used)]
pub(crate) async fn quarantined_entry(
    w: &World,
    rel: &str,
    body: &[u8],
) -> (dropscan::journal::Journal, i64) {
    let agent = w.start_agent();
    w.drop_file(rel, body);
    let placed = w.wait_placed(1, LIMIT).await;
    assert_eq!(placed[&PathBuf::from(rel)], Outcome::Quarantine);
    let journal_path = w.state_dir().join("journal.sqlite");
    wait_for(LIMIT, || {
        let s = dropscan::journal::read_summary(&journal_path).ok()?;
        s.per_state
            .iter()
            .any(|(st, n)| st == "done" && *n == 1)
            .then_some(())
    })
    .await
    .expect("record done");
    agent.stop().await.0.unwrap();
    let journal = dropscan::journal::Journal::open(&journal_path).unwrap();
    let kept = journal
        .kept(dropscan::journal::Outcome::Quarantine, false)
        .await
        .unwrap();
    assert_eq!(kept.len(), 1);
    let id = kept[0].record.id;
    (journal, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_killed_after_the_quarantined_file_went_loses_nothing() {
    let w = World::quick().await;
    let cfg = w.write_config();
    let body = [EICAR, b" a false positive"].concat();
    let (journal, id) = quarantined_entry(&w, "fp.com", &body).await;
    // What `quarantine release` leaves when killed -9 between removing the quarantined file
    // and renaming its verified copy into place: custody busy, the only copy in the temp at the
    // top of clean.
    let temp = killed_mid_release(&w, &cfg, &journal, id).await;
    drop(journal);

    // The agent restarts meanwhile: its start-up clean-up must not take the only copy.
    let agent = w.start_agent();
    w.drop_file("later.txt", b"later");
    wait_for(LIMIT, || w.clean.join("later.txt").exists().then_some(()))
        .await
        .expect("the restarted agent works");
    agent.stop().await.0.unwrap();
    assert!(
        std::fs::read(&temp).ok().as_deref() == Some(&body[..]),
        "the verified copy of a release in progress was removed at start-up"
    );

    // Once the dead tool's custody is stale, running the release again finishes it.
    crate::attacks::release_again_once_custody_is_stale(&w, &cfg, id, &body, &temp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_of_a_vanished_quarantined_file_onto_an_existing_path_is_refused() {
    use crate::quarantine_tools::{dropscan, text};
    let w = World::quick().await;
    let cfg = w.write_config();
    let (journal, id) = quarantined_entry(&w, "gone.com", &[EICAR, b" gone"].concat()).await;
    drop(journal);
    std::fs::remove_file(w.quarantine.join("gone.com")).unwrap();
    let to = w.dir.path().join("lab.bin");
    std::fs::write(&to, b"the analyst's own file").unwrap();
    let id_s = id.to_string();
    let out = dropscan(&[
        "quarantine",
        "restore",
        &id_s,
        "--to",
        to.to_str().unwrap(),
        "--reason",
        "analysis",
        "--config",
        cfg.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(std::fs::read(&to).unwrap(), b"the analyst's own file");
}

/// Review finding: without leases (`lease_check = "off"`, a client mount, no `CAP_LEASE`), a
/// writer that paused longer than `settle` and resumes while the hash copies its file made each
/// of the three copies "changed while copied", and the file was **failed**: moved to the failed
/// folder with the writer still at it (everything it wrote next landed there, or, with failed on
/// another filesystem, in an unlinked inode). It is given back to the inbox instead, waited for,
/// and scanned whole once the writer is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_resuming_during_the_copy_without_leases_is_given_back_not_failed() {
    let mut w = World::quick().await;
    w.watch_extra = "lease_check = \"off\"\nkeep_original = \"2s\"".into();
    let agent = w.start_agent();
    let first = bytes(21, 64 << 20);
    let mut handle = std::fs::File::create(w.inbox.join("scan.bin")).unwrap();
    handle.write_all(&first).unwrap();
    handle.flush().unwrap();
    // Paused past `settle`; it resumes as soon as the hash's private copy appears.
    let staging = w.inbox.join(".dropscan/test");
    let writer = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let copying = || {
            std::fs::read_dir(&staging).is_ok_and(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".copy"))
            })
        };
        while !copying() {
            assert!(t0.elapsed() < LIMIT, "the hash never started copying");
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut added = Vec::new();
        let t1 = std::time::Instant::now();
        while t1.elapsed() < Duration::from_secs(6) {
            let chunk = [b'x'; 4096];
            handle.write_all(&chunk).unwrap();
            added.extend_from_slice(&chunk);
            std::thread::sleep(Duration::from_millis(2));
        }
        handle.sync_all().unwrap();
        added
    });
    let added = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    let o = w.wait_placed(1, Duration::from_secs(120)).await;
    assert_eq!(
        o.get(&PathBuf::from("scan.bin")),
        Some(&Outcome::Clean),
        "{o:?}"
    );
    let clean = std::fs::read(w.clean.join("scan.bin")).unwrap();
    assert_eq!(clean.len(), first.len() + added.len(), "scanned whole");
    assert!(clean == [first, added].concat());
    agent.stop().await.0.unwrap();
}

/// Review finding (by reading): the owner marker of another host was judged by comparing its
/// heartbeat with this host's wall clock. With this clock stepped back by an hour, a live
/// host's marker looks an hour ahead, and was taken over as stale. A marker from the future is
/// watched instead: rewritten meanwhile, its host is alive and the staging folder is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_owner_marker_ahead_of_this_hosts_clock_is_not_taken_over() {
    let w = World::quick().await;
    let staging = w.inbox.join(".dropscan/test");
    std::fs::create_dir_all(&staging).unwrap();
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let marker = staging.join(".owner");
    let write = move |beat: u64| {
        std::fs::write(
            &marker,
            format!("machine_id=0000other0000\nhost=fs02\npid=1\nheartbeat={beat}\n"),
        )
        .unwrap();
    };
    write(ahead);
    // The other host keeps refreshing its marker (by its own clock, an hour ahead of ours).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beating = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut beat = ahead;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(300));
                beat += 1;
                write(beat);
            }
        })
    };
    let mut agent = w.start_agent();
    let r = tokio::time::timeout(Duration::from_secs(30), agent.task.take().unwrap()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    beating.join().unwrap();
    let r = r.expect("refused within the observation").unwrap();
    let e = r.expect_err("a live host owns the staging folder");
    assert!(e.contains("in use by host fs02"), "{e}");
}

/// Review finding: an older release's partial copy of a finished record (a `quarantine release`
/// killed mid-copy, then released again by the new version) was taken back at the next start as
/// "the only copy" and its truncated, EICAR-less bytes placed in clean. Hashed against the record
/// it names, it is a partial copy and is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_versions_partial_copy_of_a_finished_record_is_removed_not_released() {
    let w = World::quick().await;
    let mut content = bytes(63, 3_000_000);
    content.extend_from_slice(EICAR);
    w.drop_file("big.bin", &content);
    let agent = w.start_agent();
    let o = w.wait_placed(1, LIMIT).await;
    agent.stop().await.0.unwrap();
    assert_eq!(o[&PathBuf::from("big.bin")], Outcome::Quarantine);
    let id: i64 = rusqlite::Connection::open(w.state_dir().join("journal.sqlite"))
        .unwrap()
        .query_row(
            "SELECT id FROM files WHERE outcome = 'quarantine'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // What the older release's `quarantine release`, killed mid-copy, left in clean.
    let temp = w.clean.join(format!(".test.{id}.dropscan-partial"));
    std::fs::write(&temp, &content[..1_048_576]).unwrap();
    let walks = w.walks();
    let agent = w.start_agent();
    let gone = wait_for(LIMIT, || (!temp.exists()).then_some(())).await;
    // Whatever the start-up took back is scanned and placed before anything is looked at.
    w.wait_idle(walks).await;
    agent.stop().await.0.unwrap();
    assert!(gone.is_some(), "the partial copy was left hidden in clean");
    // Every file in clean, hidden ones included (a temp taken back keeps its own name), but the
    // destination's marker.
    let mut released = Vec::new();
    let mut stack = vec![w.clean.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name() != ".dropscan-destination" {
                released.push(e.path());
            }
        }
    }
    assert!(
        released.is_empty(),
        "a truncated copy of a quarantined file reached clean: {released:?}"
    );
    assert_eq!(
        std::fs::read(w.quarantine.join("big.bin")).unwrap(),
        content
    );
}

/// Makes the dead tool's custody of quarantine entry `id` (`fp.com`) stale, runs the release
/// again, and checks that it finished: `body` in clean, the tool's `temp` gone.
#[allow(clippy::unwrap_used)]
pub(crate) async fn release_again_once_custody_is_stale(
    w: &World,
    cfg: &std::path::Path,
    id: i64,
    body: &[u8],
    temp: &std::path::Path,
) {
    use crate::quarantine_tools::{dropscan, text};
    let conn = rusqlite::Connection::open(w.state_dir().join("journal.sqlite")).unwrap();
    conn.execute("UPDATE custody SET at = 0", []).unwrap();
    drop(conn);
    let id_s = id.to_string();
    let c = cfg.to_str().unwrap();
    let out = dropscan(&[
        "quarantine",
        "release",
        &id_s,
        "--reason",
        "fp",
        "--config",
        c,
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(w.clean.join("fp.com")).unwrap(), body);
    assert!(!temp.exists());
}

/// A release tool of quarantine entry `id` (`fp.com`) killed right after renaming its verified
/// copy into place: custody taken, the file moved from quarantine to the tool's temp in clean.
/// The temp's path.
#[allow(clippy::unwrap_used)]
pub(crate) async fn killed_mid_release(
    w: &World,
    cfg: &std::path::Path,
    journal: &dropscan::journal::Journal,
    id: i64,
) -> std::path::PathBuf {
    journal
        .take_custody(id, dropscan::journal::Outcome::Quarantine, "release")
        .await
        .unwrap();
    let rec = journal.get(id).await.unwrap();
    let config = dropscan::config::Config::load(cfg).unwrap();
    let temp = w.clean.join(dropscan::fsops::names::copy_temp_name(
        &dropscan::root::instance_of(&config.watches[0]),
        dropscan::fsops::names::TempOf::Tool,
        &dropscan::fsops::names::content_token(&rec.sha256.unwrap()),
        &rec.rel_path,
    ));
    std::fs::create_dir_all(&w.clean).unwrap();
    #[allow(clippy::disallowed_methods)]
    std::fs::rename(w.quarantine.join("fp.com"), &temp).unwrap();
    temp
}
