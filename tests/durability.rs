//! Never lose a file: kill -9 at random moments, server outages, unwritable destinations.
//! These run the real binary where a process must die.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dropscan::emulator::{Emulator, EmulatorConfig};

use crate::util::{
    EICAR, LONG, Outcome, World, bytes, collect_stderr, events, wait_for, wait_lines, wait_until,
};

fn spawn_agent(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn sigterm(child: &Child) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
}

/// Waits for the child to exit, at most `limit`.
async fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    wait_for(limit, || child.try_wait().unwrap()).await
}

/// Deterministic "random" delays for the kills.
fn delays(seed: u64, n: usize) -> Vec<Duration> {
    bytes(seed, n)
        .into_iter()
        .map(|b| Duration::from_millis(150 + u64::from(b) * 4))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_never_resubmits_an_accepted_scan() {
    let w = World::new(EmulatorConfig {
        scan_delay: Duration::from_millis(400),
        max_scans: Some(20),
        ..EmulatorConfig::default()
    })
    .await;
    let config = w.write_config();
    let mut expected: Vec<(PathBuf, Vec<u8>, Outcome)> = Vec::new();
    let mut drop_batch = |w: &World, from: usize, n: usize| {
        for i in from..from + n {
            let (rel, data, o) = if i % 17 == 0 {
                (
                    format!("batch/{}/eicar-{i}.com", i % 5),
                    EICAR.to_vec(),
                    Outcome::Quarantine,
                )
            } else {
                (
                    format!("batch/{}/file-{i}.bin", i % 5),
                    bytes(i as u64, 500 + (i * 131) % 40_000),
                    Outcome::Clean,
                )
            };
            w.drop_file(&rel, &data);
            expected.push((rel.into(), data, o));
        }
    };
    drop_batch(&w, 0, 200);
    let mut placed_before_kill = Vec::new();
    for (round, delay) in delays(99, 6).into_iter().enumerate() {
        let mut child = spawn_agent(&config);
        tokio::time::sleep(delay).await;
        child.kill().unwrap(); // SIGKILL, wherever it is
        child.wait().unwrap();
        placed_before_kill.push(w.outcomes().len());
        drop_batch(&w, 200 + round * 20, 20);
    }
    // Figures for the log: how far each run got before its kill.
    println!("placed after each kill: {placed_before_kill:?}");
    let total = expected.len();
    let mut child = spawn_agent(&config);
    let outcomes = wait_for(Duration::from_secs(120), || {
        let o = w.outcomes();
        (o.len() >= total).then_some(o)
    })
    .await;
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(20))
        .await
        .expect("agent stops");
    assert!(status.success(), "exit status {status:?}");
    let outcomes =
        outcomes.unwrap_or_else(|| panic!("only {} of {total} placed", w.outcomes().len()));
    assert_eq!(outcomes.len(), total, "no duplicates, nothing extra");
    for (rel, data, o) in &expected {
        assert_eq!(outcomes.get(rel), Some(o), "{}", rel.display());
        let dir = if *o == Outcome::Clean {
            &w.clean
        } else {
            &w.quarantine
        };
        assert_eq!(
            &std::fs::read(dir.join(rel)).unwrap(),
            data,
            "{} intact",
            rel.display()
        );
    }
    assert!(
        w.inbox_files().is_empty(),
        "inbox: {:?}",
        w.inbox_files().keys()
    );
    assert_eq!(w.staged_files(), 0, "leftovers in staging");
    let stats = w.emulator().state().stats();
    let twice: Vec<_> = stats
        .submissions_per_scan_id
        .iter()
        .filter(|(_, n)| **n > 1)
        .collect();
    assert!(twice.is_empty(), "scanIds submitted twice: {twice:?}");
    // No content was scanned twice either: an accepted scan is polled after a restart, never
    // sent again under a new scanId (identical EICAR copies share one scan or reuse its verdict).
    let mut per_content: std::collections::HashMap<[u8; 32], u32> = Default::default();
    for scan_id in stats.submissions_per_scan_id.keys() {
        let info = w.emulator().state().scan(scan_id).unwrap();
        *per_content.entry(info.sha256).or_default() += 1;
    }
    let rescanned: Vec<_> = per_content.values().filter(|n| **n > 1).collect();
    assert!(
        rescanned.is_empty(),
        "contents accepted more than once: {rescanned:?}"
    );
    // Identical EICAR copies share scans and verdicts: far fewer uploads than files.
    assert!(stats.submits_accepted as usize <= total, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_outage_files_wait_and_the_agent_recovers_by_itself() {
    let mut w = World::quick().await;
    // Shorter than the outage below: the scan clock must stop while the server is away.
    w.server_extra = "scan_timeout = \"2s\"".into();
    let agent = w.start_agent();
    w.drop_file("before.txt", b"before the outage");
    w.wait_placed(1, Duration::from_secs(30)).await;
    // Scans in flight when the server goes away.
    w.emulator().state().set_scan_delay(Duration::from_secs(2));
    w.drop_file("in-flight.txt", b"submitted just before the outage");
    wait_for(Duration::from_secs(20), || {
        (w.emulator().state().stats().submits_accepted == 2).then_some(())
    })
    .await
    .expect("second scan submitted");
    // The server goes away.
    let emulator = w.emulator.take().unwrap();
    let state = emulator.state();
    emulator.stop().await;
    for i in 0..10 {
        w.drop_file(&format!("during-{i}.txt"), format!("during {i}").as_bytes());
    }
    w.drop_file("during.com", EICAR);
    // `dropscan status` shows why nothing moves, once requests have failed for DOWN_AFTER (5 s,
    // longer than `scan_timeout`): only then is "nothing decided" worth checking.
    let journal = w.state_dir().join("journal.sqlite");
    let noted = wait_for(Duration::from_secs(20), || {
        let summary = dropscan::journal::read_summary(&journal).ok()?;
        summary
            .last_errors
            .iter()
            .any(|(_, t)| t.contains("KATA"))
            .then_some(())
    })
    .await;
    assert!(
        noted.is_some(),
        "{:?}",
        dropscan::journal::read_summary(&journal).map(|s| s.last_errors)
    );
    assert_eq!(
        w.outcomes().len(),
        1,
        "nothing may be decided while the server is down"
    );
    assert!(w.inbox_files().is_empty() || w.staged_files() > 0);
    // It comes back on the same port, with its state.
    let config = EmulatorConfig {
        listen: w.addr,
        scan_delay: Duration::from_millis(100),
        ..EmulatorConfig::default()
    };
    let emulator = Emulator::start_with_state(config, &w.certs, state)
        .await
        .unwrap();
    w.emulator = Some(emulator);
    let o = w.wait_placed(13, Duration::from_secs(90)).await;
    assert_eq!(o[&PathBuf::from("during.com")], Outcome::Quarantine);
    assert_eq!(
        o[&PathBuf::from("in-flight.txt")],
        Outcome::Clean,
        "a scan in flight is not failed by the outage"
    );
    assert_eq!(o.values().filter(|o| **o == Outcome::Clean).count(), 12);
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_destination_keeps_the_file_in_staging_and_retries() {
    let w = World::quick().await;
    let agent = w.start_agent();
    // The destination folder is gone and a regular file stands in its place: every move into
    // it fails, as with a read-only or unmounted share (and unlike permissions, also for root).
    wait_for(Duration::from_secs(10), || w.clean.is_dir().then_some(()))
        .await
        .unwrap();
    std::fs::remove_dir_all(&w.clean).unwrap();
    std::fs::write(&w.clean, b"blocker").unwrap();
    w.drop_file("sub/precious.bin", &bytes(5, 50_000));
    // The verdict arrives, the move fails, the file waits in staging.
    let staged = wait_for(Duration::from_secs(20), || {
        (w.staged_files() == 1 && w.inbox_files().is_empty()).then_some(())
    })
    .await;
    assert!(staged.is_some());
    // The move failed and the sorter noted it (it retries with backoff).
    let journal = w.state_dir().join("journal.sqlite");
    wait_until(LONG, "the failed placement noted", || {
        let s = dropscan::journal::read_summary(&journal).ok()?;
        s.last_errors
            .iter()
            .any(|(_, t)| t.contains("precious.bin"))
            .then_some(())
    })
    .await;
    assert_eq!(w.staged_files(), 1, "file kept in staging");
    assert!(w.clean.is_file(), "nothing replaced the blocker");
    // The admin fixes the destination: the retry places it.
    std::fs::remove_file(&w.clean).unwrap();
    let o = w.wait_placed(1, Duration::from_secs(60)).await;
    assert_eq!(o[&PathBuf::from("sub/precious.bin")], Outcome::Clean);
    assert_eq!(
        std::fs::read(w.clean.join("sub/precious.bin")).unwrap(),
        bytes(5, 50_000)
    );
    assert_eq!(w.staged_files(), 0);
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_uploads_exits_zero_quickly_and_resumes() {
    let w = World::new(EmulatorConfig {
        scan_delay: Duration::from_secs(2),
        faults: dropscan::emulator::Faults {
            slow_share: 1.0,
            slow_delay: Duration::from_millis(700),
            ..Default::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let config = w.write_config();
    for i in 0..30 {
        w.drop_file(&format!("f{i}.bin"), &bytes(300 + i, 200_000));
    }
    let mut child = spawn_agent(&config);
    // Wait until uploads are under way.
    wait_for(Duration::from_secs(20), || {
        (w.staged_files() > 0).then_some(())
    })
    .await
    .unwrap();
    // An upload has reached the server (each takes 700 ms there).
    wait_until(LONG, "a submission at the server", || {
        (w.requests().posts > 0).then_some(())
    })
    .await;
    let t0 = std::time::Instant::now();
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(15))
        .await
        .expect("stops");
    assert!(status.success(), "{status:?}");
    // shutdown_grace is 2 s in the harness; well under 10 s on a loaded machine.
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    // Everything is finished by the next run, each file once.
    w.emulator()
        .state()
        .set_faults(dropscan::emulator::Faults::default());
    w.emulator()
        .state()
        .set_scan_delay(Duration::from_millis(50));
    let mut child = spawn_agent(&config);
    let o = wait_for(Duration::from_secs(60), || {
        let o = w.outcomes();
        (o.len() >= 30).then_some(o)
    })
    .await;
    sigterm(&child);
    wait_exit(&mut child, Duration::from_secs(15)).await;
    let o = o.expect("all placed after restart");
    assert!(o.values().all(|o| *o == Outcome::Clean));
    let stats = w.emulator().state().stats();
    assert!(
        stats.submissions_per_scan_id.values().all(|n| *n == 1),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_pauses_submissions_until_the_integration_is_accepted() {
    let w = World::quick().await;
    w.emulator().state().set_auto_accept(false);
    let agent = w.start_agent();
    w.drop_file("waiting.txt", b"waits for the administrator");
    // The integration request is pending: 401, the file waits in staging.
    let pending = wait_for(Duration::from_secs(20), || {
        let auths = w.emulator().state().authorizations();
        (!auths.is_empty() && w.staged_files() == 1).then_some(auths)
    })
    .await
    .expect("integration request seen and file staged");
    // The agent has asked again since, and was refused again.
    let asked = w.requests().total();
    wait_until(LONG, "two more requests", || {
        (w.requests().total() >= asked + 2).then_some(())
    })
    .await;
    assert!(
        w.outcomes().is_empty(),
        "nothing decided while unauthorized"
    );
    assert_eq!(w.emulator().state().stats().submits_accepted, 0);
    // The administrator accepts it in the web UI.
    let (sensor, fp, _) = pending[0].clone();
    w.emulator().state().set_authorization(
        &sensor,
        fp,
        dropscan::emulator::Authorization::Accepted,
    );
    let o = w.wait_placed(1, Duration::from_secs(90)).await;
    assert_eq!(o[&PathBuf::from("waiting.txt")], Outcome::Clean);
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints_answer() {
    use std::io::{Read, Write};
    let mut w = World::quick().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    w.server_extra = String::new();
    w.more_watches = format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let agent = w.start_agent();
    w.drop_file("m.txt", b"counted");
    w.drop_file("m.com", EICAR);
    w.wait_placed(2, Duration::from_secs(30)).await;
    let get = move |path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    // The files are on disk a moment before their placement is journaled and counted.
    let body = tokio::task::spawn_blocking(move || {
        let t0 = std::time::Instant::now();
        let metrics = loop {
            let m = get("/metrics");
            if m.contains("outcome=\"quarantine\"} 1") || t0.elapsed() > Duration::from_secs(10) {
                break m;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (metrics, get("/healthz"), get("/readyz"))
    })
    .await
    .unwrap();
    assert!(
        body.0
            .contains("dropscan_files_placed_total{outcome=\"clean\"} 1"),
        "{}",
        body.0
    );
    assert!(
        body.0
            .contains("dropscan_files_placed_total{outcome=\"quarantine\"} 1"),
        "{}",
        body.0
    );
    assert!(body.0.contains("dropscan_server_up 1"), "{}", body.0);
    assert!(body.1.starts_with("HTTP/1.1 200"), "{}", body.1);
    assert!(body.2.starts_with("HTTP/1.1 200"), "{}", body.2);
    agent.stop().await.0.unwrap();
}

pub(crate) fn sighup(child: &Child) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_valid_config_and_refuses_a_bad_one() {
    let mut w = World::quick().await;
    let config = w.write_config();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect_stderr(&mut child);
    w.drop_file("first.txt", b"before any reload");
    w.wait_placed(1, Duration::from_secs(30)).await;
    // A broken file: refused, the agent goes on with the old one.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("[state]", "[state]\nbogus = 1")).unwrap();
    sighup(&child);
    wait_lines(&lines, "SIGHUP: configuration refused", 1).await;
    w.drop_file("second.txt", b"still running");
    w.wait_placed(2, Duration::from_secs(30)).await;
    assert!(child.try_wait().unwrap().is_none(), "still running");
    // A valid file with a second inbox: taken.
    let inbox2 = w.dir.path().join("inbox2");
    std::fs::create_dir_all(&inbox2).unwrap();
    w.more_watches = "[[watch]]\npath = \"inbox2\"\nsettle = \"300ms\"\nclean_dir = \"out2/clean\"\nquarantine_dir = \"out2/quarantine\"\nfailed_dir = \"out2/failed\"\n".into();
    w.write_config();
    sighup(&child);
    std::fs::write(inbox2.join("third.txt"), b"new inbox").unwrap();
    let out2 = w.dir.path().join("out2/clean/third.txt");
    wait_for(Duration::from_secs(30), || out2.exists().then_some(()))
        .await
        .expect("the reloaded config's new inbox is served");
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(20))
        .await
        .expect("stops");
    assert!(status.success(), "{status:?}");
}

/// A small tmpfs, unmounted on drop. None where mounting is not allowed (not root, a sandbox).
pub(crate) struct Tmpfs(PathBuf);

impl Tmpfs {
    pub(crate) fn mount(at: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .ok()?
            .success();
        ok.then(|| Tmpfs(at.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        Command::new("umount").arg("-l").arg(&self.0).status().ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_destination_keeps_the_file_until_there_is_room() {
    let w = World::quick().await;
    let Some(fs) = Tmpfs::mount(&w.clean, "256k") else {
        eprintln!(
            "cannot mount a tmpfs here: the full-disk test is skipped (the unwritable-destination test still runs)"
        );
        return;
    };
    let agent = w.start_agent();
    let big = bytes(77, 1 << 20);
    w.drop_file("big.iso", &big);
    // Verdict clean, destination full: the copy fails with ENOSPC, the file waits in staging.
    let waiting = wait_for(Duration::from_secs(30), || {
        let s = dropscan::journal::read_summary(&w.state_dir().join("journal.sqlite")).ok()?;
        s.last_errors
            .iter()
            .any(|(_, t)| t.contains("full") || t.contains("space"))
            .then_some(())
    })
    .await;
    assert!(waiting.is_some(), "the full destination is reported");
    assert_eq!(w.staged_files(), 1, "kept in staging");
    assert!(!w.clean.join("big.iso").exists());
    // Room is made: the retry places it, whole, with no partial copy left.
    fs.resize("8m");
    let o = w.wait_placed(1, Duration::from_secs(90)).await;
    assert_eq!(o[&PathBuf::from("big.iso")], Outcome::Clean);
    assert_eq!(std::fs::read(w.clean.join("big.iso")).unwrap(), big);
    // Across filesystems the staged file is unlinked after the copy is in place.
    wait_until(LONG, "staging empty", || {
        (w.staged_files() == 0).then_some(())
    })
    .await;
    let leftovers: Vec<_> = std::fs::read_dir(&w.clean)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with(".dropscan-partial")
        })
        .collect();
    assert!(leftovers.is_empty());
    agent.stop().await.0.unwrap();
    drop(fs);
}

/// A record left `submitting` by a crash whose scanId the server does not list is sent again
/// under a new scanId, and the old scanId is DELETEd on the server (it may still arrive there),
/// never left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitting_scan_the_server_does_not_list_is_deleted_before_it_is_sent_again() {
    use dropscan::journal::{FileState, Journal, NewClaim, Stamp};
    let w = World::quick().await;
    let staging = w.inbox.join(".dropscan/test");
    std::fs::create_dir_all(&staging).unwrap();
    let data = bytes(77, 3000);
    let staged = staging.join("crashed.staged");
    std::fs::write(&staged, &data).unwrap();
    let old_scan = "0b6f5c3e-1d2a-4c8e-9f00-aa11bb22cc33".to_string();
    {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&staged).unwrap();
        let j = Journal::open(&w.state_dir().join("journal.sqlite")).unwrap();
        let id = j
            .claim(vec![NewClaim {
                root: std::fs::canonicalize(&w.inbox).unwrap(),
                rel_path: "crashed.bin".into(),
                staged: std::fs::canonicalize(&staged).unwrap(),
                dropped_at_ms: None,
                staging_folder: None,
            }])
            .await
            .unwrap()[0];
        let stamp = Stamp {
            size: md.len(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            dev: md.dev(),
            ino: md.ino(),
        };
        let sha: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(&data).into()
        };
        j.hashed(id, sha, stamp, Duration::ZERO).await.unwrap();
        j.submitting(id, dropscan::scanner::ScanId::parse(&old_scan).unwrap())
            .await
            .unwrap();
        assert_eq!(j.get(id).await.unwrap().state, FileState::Submitting);
    }
    let agent = w.start_agent();
    let placed = w.wait_placed(1, Duration::from_secs(30)).await;
    assert_eq!(
        placed.get(std::path::Path::new("crashed.bin")),
        Some(&Outcome::Clean),
        "{placed:?}"
    );
    // The old scanId was queued for deletion in the same write that sent the file back, and
    // the poller DELETEd it on the server.
    let j = Journal::open(&w.state_dir().join("journal.sqlite")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stale = j.stale_scans().await.unwrap();
        if !stale.contains(&old_scan) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old scanId is still queued: {stale:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The file is on disk a moment before `placed` is journaled: wait for the record.
    let deadline = tokio::time::Instant::now() + LONG;
    let rec = loop {
        let placed = j
            .in_states(&[FileState::Placed, FileState::Done])
            .await
            .unwrap();
        if let Some(rec) = placed.into_iter().next() {
            break rec;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the record never reached placed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        rec.scan_ids.first().map(|s| s.as_str()),
        Some(old_scan.as_str())
    );
    assert_eq!(rec.scan_ids.len(), 2, "{:?}", rec.scan_ids);
    // One DELETE for the old scan, one for the result of the new one: the sorter sends that
    // one after the placement journaled above, so it is waited for, not assumed.
    wait_until(
        LONG,
        "two DELETEs (the old scan, the placed file's result)",
        || (w.emulator().state().stats().deletes >= 2).then_some(()),
    )
    .await;
    agent.stop().await.0.unwrap();
}

/// Review finding: after the journal's disk was full and space returned, files waited in the
/// inbox for two reconcile walks, and records left `claimed` for the 10-minute sweep. The first
/// write that succeeds again (a probe every few seconds while writes fail) offers them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_waiting_for_a_full_journal_disk_are_offered_again_as_soon_as_space_returns() {
    use dropscan::journal::JournalError;
    use dropscan::journal::testing::RawAccess as _;
    crate::util::init_tracing();
    let w = World::quick().await;
    // Reconcile walks far apart: only the recovery itself can bring the files in quickly.
    let text = std::fs::read_to_string(w.write_config()).unwrap().replace(
        "reconcile_interval = \"2s\"",
        "reconcile_interval = \"10m\"",
    );
    let cfg = w.dir.path().join("slow-walks.toml");
    std::fs::write(&cfg, text).unwrap();
    let agent = dropscan::app::Agent::new(dropscan::config::Config::load(&cfg).unwrap()).unwrap();
    let journal = agent.journal();
    let token = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(agent.run(token.clone()));
    w.drop_file("first.txt", b"before the disk filled");
    let limit = Duration::from_secs(30);
    wait_for(limit, || w.clean.join("first.txt").exists().then_some(()))
        .await
        .expect("placed while the disk has space");
    let sql = |source| JournalError::Sqlite {
        about: "test",
        source,
    };
    // The disk is full: the journal cannot grow by one page.
    journal
        .run(move |c| {
            let pages: i64 = c
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .map_err(sql)?;
            c.pragma_update(None, "max_page_count", pages).map_err(sql)
        })
        .await
        .unwrap();
    let long = "n".repeat(200);
    let n = 30;
    let left = "journal write failed; files left in the inbox";
    let refusals = events(left, None);
    for i in 0..n {
        w.drop_file(&format!("{long}-{i}.txt"), format!("file {i}").as_bytes());
    }
    let refused = wait_for(limit, || journal.writes_failing().then_some(())).await;
    assert!(refused.is_some(), "the journal never refused a write");
    // The claim that was refused says it left the files in the inbox.
    wait_until(LONG, left, || (events(left, None) > refusals).then_some(())).await;
    assert!(
        !w.inbox_files().is_empty(),
        "the files were taken although the journal could not record them"
    );
    // Space returns.
    journal
        .run(move |c| {
            c.pragma_update(None, "max_page_count", 1_073_741_823_i64)
                .map_err(sql)
        })
        .await
        .unwrap();
    let all = wait_for(limit, || {
        (0..n)
            .all(|i| w.clean.join(format!("{long}-{i}.txt")).exists())
            .then_some(())
    })
    .await;
    token.cancel();
    task.await.unwrap().unwrap();
    assert!(
        all.is_some(),
        "files still waiting {limit:?} after space returned: inbox {:?}",
        w.inbox_files().len()
    );
}
