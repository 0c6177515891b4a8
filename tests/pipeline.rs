//! The pipeline end to end: real files, the real journal, the emulator over real mTLS.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use dropscan::emulator::{EmulatorConfig, Faults, InjectedVerdict, ScanState};
use sha2::{Digest, Sha256};

use crate::util::{EICAR, Outcome, World, bytes, events, wait_for, wait_until};

const LIMIT: Duration = Duration::from_secs(30);

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_and_live_drops_sorted_by_verdict_with_content_intact() {
    let w = World::quick().await;
    let mut expected = Vec::new();
    // Backlog: present before the agent starts.
    for i in 0..5 {
        let rel = format!("backlog/file-{i}.bin");
        let data = bytes(i, 1000 + i as usize * 777);
        w.drop_file(&rel, &data);
        expected.push((PathBuf::from(rel), data, Outcome::Clean));
    }
    w.drop_file("backlog/eicar.com", EICAR);
    expected.push((
        "backlog/eicar.com".into(),
        EICAR.to_vec(),
        Outcome::Quarantine,
    ));
    let agent = w.start_agent();
    // Live drops, nested, with non-ASCII names.
    let live: &[(&str, Vec<u8>, Outcome)] = &[
        ("Übergabe/年報 2026.pdf", bytes(42, 300_000), Outcome::Clean),
        (
            "Übergabe/tief/ещё/данные.csv",
            bytes(43, 10),
            Outcome::Clean,
        ),
        ("empty.txt", Vec::new(), Outcome::Clean),
        ("Übergabe/virus ñ.com", EICAR.to_vec(), Outcome::Quarantine),
    ];
    for (rel, data, o) in live {
        w.drop_file(rel, data);
        expected.push((PathBuf::from(rel), data.clone(), *o));
    }
    let outcomes = w.wait_placed(expected.len(), LIMIT).await;
    for (rel, data, o) in &expected {
        assert_eq!(outcomes.get(rel), Some(o), "{}", rel.display());
        let dir = match o {
            Outcome::Clean => &w.clean,
            Outcome::Quarantine => &w.quarantine,
            Outcome::Failed => &w.failed,
        };
        assert_eq!(
            &std::fs::read(dir.join(rel)).unwrap(),
            data,
            "{}",
            rel.display()
        );
    }
    // Quarantine: owner-only file, sidecar with the verdict.
    use std::os::unix::fs::PermissionsExt;
    let q = w.quarantine.join("backlog/eicar.com");
    assert_eq!(
        std::fs::metadata(&q).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let sidecar: serde_json::Value = serde_json::from_slice(
        &std::fs::read(w.quarantine.join("backlog/eicar.com.dropscan.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(sidecar["verdict"], "detect");
    assert_eq!(sidecar["sha256"], dropscan::sort::hex(&sha(EICAR)));
    assert!(
        w.inbox_files().is_empty(),
        "inbox not empty: {:?}",
        w.inbox_files().keys()
    );
    // Every result is deleted on the server after its file is placed: the last DELETEs follow
    // the last placements, so they are waited for.
    let emu = w.emulator().state();
    let all_deleted = wait_for(LIMIT, || {
        let s = emu.stats();
        (s.deletes >= s.submits_accepted).then_some(())
    })
    .await;
    let (r, _) = agent.stop().await;
    r.unwrap();
    assert_eq!(w.staged_files(), 0);
    assert!(all_deleted.is_some(), "{:?}", emu.stats());
    let s = emu.stats();
    assert!(s.submits_accepted >= 9, "{s:?}");
    assert_eq!(
        s.deletes, s.submits_accepted,
        "every scan's result deleted: {s:?}"
    );
    for scan_id in s.submissions_per_scan_id.keys() {
        assert!(emu.scan(scan_id).unwrap().deleted, "{scan_id} not deleted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_appender_is_never_uploaded_early() {
    let mut w = World::quick().await;
    // Writes every 100 ms; a long settle keeps the margin on a loaded machine.
    w.settle = "1200ms";
    let agent = w.start_agent();
    let path = w.inbox.join("growing.log");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut all = Vec::new();
    // Pauses (100 ms) shorter than settle (300 ms), for about 1.5 s.
    for i in 0..15u64 {
        let chunk = bytes(i, 4096);
        f.write_all(&chunk).unwrap();
        f.flush().unwrap();
        all.extend_from_slice(&chunk);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(w.outcomes().is_empty(), "placed while still being written");
        assert_eq!(
            w.emulator().state().stats().submits_accepted,
            0,
            "uploaded early"
        );
    }
    drop(f);
    w.wait_placed(1, LIMIT).await;
    assert_eq!(std::fs::read(w.clean.join("growing.log")).unwrap(), all);
    let s = w.emulator().state().stats();
    assert_eq!(
        s.bytes_received,
        all.len() as u64,
        "exactly one full upload"
    );
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_that_restores_old_mtime_waits_for_ctime_quiet() {
    let mut w = World::quick().await;
    w.settle = "1200ms";
    let agent = w.start_agent();
    let path = w.inbox.join("restored.bin");
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let mut f = std::fs::File::create(&path).unwrap();
    let mut all = Vec::new();
    // Like `cp -p` / rsync: each write is followed by restoring an old mtime, so only ctime moves.
    for i in 0..10u64 {
        let chunk = bytes(100 + i, 8192);
        f.write_all(&chunk).unwrap();
        all.extend_from_slice(&chunk);
        f.set_modified(old).unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(
            w.emulator().state().stats().submits_accepted,
            0,
            "uploaded early"
        );
    }
    drop(f);
    w.wait_placed(1, LIMIT).await;
    assert_eq!(std::fs::read(w.clean.join("restored.bin")).unwrap(), all);
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_goes_to_failed_without_upload() {
    let w = World::new(EmulatorConfig {
        max_object_size: 10_000,
        ..EmulatorConfig::default()
    })
    .await;
    let agent = w.start_agent();
    w.drop_file("big.iso", &bytes(1, 10_001));
    w.drop_file("small.txt", &bytes(2, 10_000));
    let o = w.wait_placed(2, LIMIT).await;
    assert_eq!(o[&PathBuf::from("big.iso")], Outcome::Failed);
    assert_eq!(o[&PathBuf::from("small.txt")], Outcome::Clean);
    let s = w.emulator().state().stats();
    assert_eq!(s.submits_accepted, 1);
    assert!(
        !s.submits_by_status.contains_key(&413),
        "oversize was uploaded: {s:?}"
    );
    let sidecar = std::fs::read_to_string(w.failed.join("big.iso.dropscan.json")).unwrap();
    assert!(sidecar.contains("too large"), "{sidecar}");
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_server_errors_and_dropped_connections_slow_but_lose_nothing() {
    let w = World::new(EmulatorConfig {
        scan_delay: Duration::from_millis(50),
        max_scans: Some(3),
        faults: Faults {
            http_429_share: 0.25,
            http_500_share: 0.1,
            drop_share: 0.03,
            slow_share: 0.05,
            slow_delay: Duration::from_millis(300),
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let n = 40;
    for i in 0..n {
        w.drop_file(&format!("f{i:03}.dat"), &bytes(1000 + i, 2000));
    }
    let agent = w.start_agent();
    let o = w.wait_placed(n as usize, Duration::from_secs(90)).await;
    assert!(o.values().all(|o| *o == Outcome::Clean), "{o:?}");
    let s = w.emulator().state().stats();
    assert!(
        s.submits_by_status.get(&429).copied().unwrap_or(0) > 0,
        "no 429 seen: {s:?}"
    );
    for i in 0..n {
        let rel = format!("f{i:03}.dat");
        assert_eq!(
            std::fs::read(w.clean.join(&rel)).unwrap(),
            bytes(1000 + i, 2000)
        );
    }
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_and_timeout_verdicts_are_resubmitted_then_fail() {
    let w = World::quick().await;
    let flaky = bytes(7, 5000);
    let hopeless = bytes(8, 5000);
    let emu = w.emulator().state();
    emu.inject_verdict(sha(&flaky), InjectedVerdict::once(ScanState::Error));
    emu.inject_verdict(sha(&flaky), InjectedVerdict::once(ScanState::Timeout));
    emu.inject_verdict(
        sha(&hopeless),
        InjectedVerdict {
            verdict: ScanState::Error,
            times: 10,
        },
    );
    let agent = w.start_agent();
    w.drop_file("flaky.bin", &flaky);
    w.drop_file("hopeless.bin", &hopeless);
    let o = w.wait_placed(2, LIMIT).await;
    assert_eq!(o[&PathBuf::from("flaky.bin")], Outcome::Clean);
    assert_eq!(o[&PathBuf::from("hopeless.bin")], Outcome::Failed);
    let s = emu.stats();
    // 3 scans of flaky (error, timeout, ok) + 3 of hopeless (max_attempts = 3).
    assert_eq!(s.submits_accepted, 6, "{s:?}");
    let sidecar = std::fs::read_to_string(w.failed.join("hopeless.bin.dropscan.json")).unwrap();
    assert!(sidecar.contains("3 attempts"), "{sidecar}");
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_collisions_never_overwrite() {
    let w = World::quick().await;
    std::fs::create_dir_all(w.clean.join("d")).unwrap();
    std::fs::write(w.clean.join("d/report.txt"), b"already here").unwrap();
    let agent = w.start_agent();
    w.drop_file("d/report.txt", b"first drop");
    w.wait_placed(2, LIMIT).await;
    w.drop_file("d/report.txt", b"second drop");
    w.wait_placed(3, LIMIT).await;
    assert_eq!(
        std::fs::read(w.clean.join("d/report.txt")).unwrap(),
        b"already here"
    );
    assert_eq!(
        std::fs::read(w.clean.join("d/report (1).txt")).unwrap(),
        b"first drop"
    );
    assert_eq!(
        std::fs::read(w.clean.join("d/report (2).txt")).unwrap(),
        b"second drop"
    );
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_roots_each_to_their_own_destinations() {
    let mut w = World::quick().await;
    let root2 = w.dir.path().join("inbox2");
    std::fs::create_dir_all(&root2).unwrap();
    w.more_watches = r#"
[[watch]]
path = "inbox2"
settle = "300ms"
clean_dir = "out2/clean"
quarantine_dir = "out2/quarantine"
failed_dir = "out2/failed"
"#
    .to_string();
    let agent = w.start_agent();
    w.drop_file("one.txt", b"one");
    std::fs::write(root2.join("two.txt"), b"two").unwrap();
    std::fs::write(root2.join("bad.com"), EICAR).unwrap();
    let out2 = w.dir.path().join("out2");
    wait_for(LIMIT, || {
        (out2.join("clean/two.txt").exists()
            && out2.join("quarantine/bad.com").exists()
            && w.clean.join("one.txt").exists())
        .then_some(())
    })
    .await
    .expect("both roots sorted");
    assert!(!w.clean.join("two.txt").exists());
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_mode_works_without_inotify() {
    let mut w = World::quick().await;
    w.watch_extra = "mode = \"poll\"".to_string();
    let agent = w.start_agent();
    // Watching (by polling) since before the files appear.
    wait_until(LIMIT, "the inbox watched", || {
        (events("watching inbox", Some(&w.inbox)) > 0).then_some(())
    })
    .await;
    w.drop_file("sub/polled.txt", b"seen by polling");
    w.drop_file("polled.com", EICAR);
    let o = w.wait_placed(2, LIMIT).await;
    assert_eq!(o[&PathBuf::from("sub/polled.txt")], Outcome::Clean);
    assert_eq!(o[&PathBuf::from("polled.com")], Outcome::Quarantine);
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_entries_are_skipped_without_stalling() {
    let w = World::quick().await;
    let outside = w.dir.path().join("secret.txt");
    std::fs::write(&outside, b"outside the inbox").unwrap();
    std::os::unix::fs::symlink(&outside, w.inbox.join("link.txt")).unwrap();
    let fifo = w.inbox.join("pipe");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // A hard link to a file outside the inbox: its content must never be sent.
    let linked = w.dir.path().join("linked-secret.txt");
    std::fs::write(&linked, b"another secret").unwrap();
    std::fs::hard_link(&linked, w.inbox.join("hardlink.txt")).unwrap();
    let agent = w.start_agent();
    w.drop_file("ok.txt", b"fine");
    w.drop_file("weird\nname\u{7}.txt", b"odd name");
    let o = w.wait_placed(3, LIMIT).await;
    assert_eq!(o.len(), 3, "{o:?}");
    assert_eq!(o[&PathBuf::from("ok.txt")], Outcome::Clean);
    assert_eq!(o[&PathBuf::from("weird\nname\u{7}.txt")], Outcome::Clean);
    assert_eq!(o[&PathBuf::from("hardlink.txt")], Outcome::Failed);
    let sidecar = std::fs::read_to_string(w.failed.join("hardlink.txt.dropscan.json")).unwrap();
    assert!(sidecar.contains("hard links"), "{sidecar}");
    assert_eq!(std::fs::read(&linked).unwrap(), b"another secret");
    // The symlink and the FIFO are still where they were; the outside file is untouched and was
    // never sent.
    assert!(w.inbox.join("link.txt").symlink_metadata().is_ok());
    assert!(fifo.symlink_metadata().is_ok());
    assert_eq!(std::fs::read(&outside).unwrap(), b"outside the inbox");
    assert_eq!(w.emulator().state().stats().submits_accepted, 2);
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_content_shares_one_scan_and_reuses_the_verdict() {
    let w = World::new(EmulatorConfig {
        scan_delay: Duration::from_millis(400),
        ..EmulatorConfig::default()
    })
    .await;
    let data = bytes(77, 12_345);
    for i in 0..4 {
        w.drop_file(&format!("copy{i}.bin"), &data);
    }
    let agent = w.start_agent();
    w.wait_placed(4, LIMIT).await;
    assert_eq!(
        w.emulator().state().stats().submits_accepted,
        1,
        "one scan for four copies"
    );
    // Later, the verdict is reused without an upload.
    w.drop_file("later.bin", &data);
    w.wait_placed(5, LIMIT).await;
    assert_eq!(w.emulator().state().stats().submits_accepted, 1);
    assert!(w.clean.join("later.bin").exists());
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_sharing_an_inbox_never_take_the_same_file() {
    let w = World::quick().await;
    let n = 120u64;
    // Agent A as configured; agent B: another instance with its own journal, same folders.
    let watching = events("watching inbox", Some(&w.inbox));
    let a = w.start_agent();
    let text = std::fs::read_to_string(w.write_config())
        .unwrap()
        .replace(
            "sensor_instance_id = \"test\"",
            "sensor_instance_id = \"test-b\"",
        )
        .replace("dir = \"state\"", "dir = \"state-b\"");
    let cfg_b = w.dir.path().join("b.toml");
    std::fs::write(&cfg_b, text).unwrap();
    let agent_b =
        dropscan::app::Agent::new(dropscan::config::Config::load(&cfg_b).unwrap()).unwrap();
    let token_b = tokio_util::sync::CancellationToken::new();
    let b = tokio::spawn(agent_b.run(token_b.clone()));
    // Both watch; the files appear while they do, so both race for every one of them.
    wait_until(LIMIT, "both agents watching the inbox", || {
        (events("watching inbox", Some(&w.inbox)) >= watching + 2).then_some(())
    })
    .await;
    for i in 0..n {
        w.drop_file(&format!("shared/{i:03}.bin"), &bytes(5000 + i, 3000));
    }
    let o = w.wait_placed(n as usize, LIMIT).await;
    // Nothing placed twice (World::outcomes panics on a file in two places; numbered copies
    // would show up as extra names).
    assert_eq!(
        o.len(),
        n as usize,
        "{:?}",
        o.keys()
            .filter(|p| p.to_string_lossy().contains('('))
            .collect::<Vec<_>>()
    );
    assert!(o.values().all(|o| *o == Outcome::Clean));
    for i in 0..n {
        let rel = format!("shared/{i:03}.bin");
        assert_eq!(
            std::fs::read(w.clean.join(&rel)).unwrap(),
            bytes(5000 + i, 3000)
        );
    }
    let s = w.emulator().state().stats();
    assert_eq!(
        s.submits_accepted, n,
        "each file scanned once, by one agent: {s:?}"
    );
    token_b.cancel();
    b.await.unwrap().unwrap();
    a.stop().await.0.unwrap();
    // Between them, the two journals hold each file exactly once.
    let placed = |state: &str| {
        let s = dropscan::journal::read_summary(&w.dir.path().join(state).join("journal.sqlite"))
            .unwrap();
        s.per_outcome.iter().map(|(_, n)| *n).sum::<i64>()
    };
    let (pa, pb) = (placed("state"), placed("state-b"));
    println!("agent A placed {pa}, agent B placed {pb}");
    assert_eq!(pa + pb, n as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_on_another_filesystem_are_copied_and_verified_and_a_hard_linked_pair_keeps_both_names()
 {
    use std::os::unix::fs::MetadataExt;
    let w = World::quick().await;
    let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("no /dev/shm: cross-filesystem placement not exercised");
        return;
    };
    if std::fs::metadata(other.path()).unwrap().dev() == std::fs::metadata(&w.inbox).unwrap().dev()
    {
        eprintln!(
            "/dev/shm is on the inbox's filesystem: cross-filesystem placement not exercised"
        );
        return;
    }
    let text = std::fs::read_to_string(w.write_config()).unwrap().replace(
        "clean_dir = \"out/clean\"\nquarantine_dir = \"out/quarantine\"\nfailed_dir = \"out/failed\"",
        &format!(
            "clean_dir = \"{0}/clean\"\nquarantine_dir = \"{0}/quarantine\"\nfailed_dir = \"{0}/failed\"",
            other.path().display()
        ),
    );
    assert!(text.contains("/dev/shm"));
    let cfg = w.dir.path().join("xfs.toml");
    std::fs::write(&cfg, text).unwrap();
    let outside = w.dir.path().join("outside.txt");
    std::fs::write(&outside, b"not to be read").unwrap();
    std::fs::hard_link(&outside, w.inbox.join("linked.txt")).unwrap();
    // A hard-linked pair inside the inbox: neither name may ever be unlinked.
    std::fs::write(w.inbox.join("pair-a.txt"), b"the user's only data").unwrap();
    std::fs::hard_link(w.inbox.join("pair-a.txt"), w.inbox.join("pair-b.txt")).unwrap();
    w.drop_file("big.bin", &bytes(9, 3 << 20));
    w.drop_file("bad.com", EICAR);
    crate::util::init_tracing();
    let agent = dropscan::app::Agent::new(dropscan::config::Config::load(&cfg).unwrap()).unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(agent.run(token.clone()));
    let dest = other.path().to_path_buf();
    wait_for(LIMIT, || {
        (dest.join("clean/big.bin").exists() && dest.join("quarantine/bad.com").exists())
            .then_some(())
    })
    .await
    .expect("both placed across filesystems");
    assert_eq!(
        std::fs::read(dest.join("clean/big.bin")).unwrap(),
        bytes(9, 3 << 20)
    );
    assert_eq!(
        std::fs::read(dest.join("quarantine/bad.com")).unwrap(),
        EICAR
    );
    // Hard-linked files cannot reach failed there without being read: they stay where they
    // are, unread, every name intact (regression: the pair used to lose both names), through
    // two whole reconcile walks that offered them again.
    w.wait_walks(3).await;
    assert!(!dest.join("failed/linked.txt").exists());
    assert_eq!(std::fs::read(&outside).unwrap(), b"not to be read");
    assert_eq!(std::fs::metadata(&outside).unwrap().nlink(), 2);
    for name in ["pair-a.txt", "pair-b.txt"] {
        assert_eq!(
            std::fs::read(w.inbox.join(name)).unwrap(),
            b"the user's only data"
        );
    }
    assert_eq!(w.emulator().state().stats().submits_accepted, 2);
    // Across filesystems a staged file is unlinked after its copy is in place.
    let empty = wait_for(LIMIT, || (w.staged_files() == 0).then_some(())).await;
    assert!(empty.is_some(), "staging empty");
    token.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_folder_removed_by_hand_is_made_again() {
    let w = World::quick().await;
    let agent = w.start_agent();
    w.drop_file("one.txt", b"1");
    w.wait_placed(1, LIMIT).await;
    std::fs::remove_dir_all(w.inbox.join(".dropscan")).unwrap();
    w.drop_file("two.txt", b"2");
    let o = w.wait_placed(2, LIMIT).await;
    assert_eq!(o[&PathBuf::from("two.txt")], Outcome::Clean);
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_planted_in_a_destination_is_never_followed() {
    let w = World::quick().await;
    let elsewhere = w.dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::create_dir_all(&w.clean).unwrap();
    std::os::unix::fs::symlink(&elsewhere, w.clean.join("reports")).unwrap();
    let agent = w.start_agent();
    w.drop_file("reports/q3.txt", b"quarterly");
    wait_for(LIMIT, || {
        w.clean.join("reports (1)/q3.txt").exists().then_some(())
    })
    .await
    .expect("placed beside the planted symlink");
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing written through the symlink"
    );
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_folder_swapped_for_a_symlink_is_moved_aside_never_followed() {
    let w = World::quick().await;
    let agent = w.start_agent();
    w.drop_file("one.txt", b"1");
    w.wait_placed(1, LIMIT).await;
    // A user with write access to the inbox swaps `.dropscan` for a symlink.
    let elsewhere = w.dir.path().join("elsewhere");
    std::fs::create_dir_all(elsewhere.join("test")).unwrap();
    std::fs::remove_dir_all(w.inbox.join(".dropscan")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, w.inbox.join(".dropscan")).unwrap();
    w.drop_file("two.txt", b"2");
    // The symlink is moved aside, never followed; a fresh staging folder takes the file.
    let o = w.wait_placed(2, LIMIT).await;
    assert_eq!(o[&PathBuf::from("two.txt")], Outcome::Clean);
    assert_eq!(
        std::fs::read_dir(elsewhere.join("test")).unwrap().count(),
        0,
        "nothing moved through the symlink"
    );
    let aside: Vec<_> = std::fs::read_dir(&w.inbox)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".dropscan.planted-")
        })
        .map(|e| e.file_type().unwrap().is_symlink())
        .collect();
    assert_eq!(aside, vec![true], "the symlink itself was moved aside");
    agent.stop().await.0.unwrap();
}
