//! Review 13: an attack on yesterday's batched owning (one journal commit per claim batch), and
//! on today's `state.history` (how long finished records stay in the journal).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::kill_points::{Drops, every_kill_point_of};
use crate::util::{EICAR, LONG, Outcome, World, bytes, wait_for};

/// Names of a batch's small clean files.
const BATCH: [&str; 8] = [
    "batch/f0.bin",
    "batch/f1.bin",
    "batch/f2.bin",
    "batch/f3.bin",
    "batch/f4.bin",
    "batch/f5.bin",
    "batch/f6.bin",
    "batch/f7.bin",
];

/// One claim batch of small files: eight distinct clean ones, a ninth with the first one's bytes
/// (it waits for that one's verdict, decided in the same commit), and a detected one.
fn batch() -> Drops {
    let mut set: Drops = BATCH
        .iter()
        .zip(40u64..)
        .map(|(n, seed)| (*n, bytes(seed, 4096), Outcome::Clean))
        .collect();
    set.push(("batch/same.bin", bytes(40, 4096), Outcome::Clean));
    set.push(("batch/eicar.com", EICAR.to_vec(), Outcome::Quarantine));
    set
}

/// Killed after every rename while a batch is claimed, owned (each private copy renamed over its
/// staged name, the last one right before `hashed_many`'s one commit) and released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_rename_around_a_batch_s_one_hashed_commit_loses_nothing() {
    every_kill_point_of(&batch(), "rename,renameat,renameat2", "", 1).await;
}

/// Killed after every other fsync while a batch is claimed and owned: the copies' fsyncs, then
/// `hashed_many`'s commit (one WAL fsync for the whole batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_fsyncs_around_a_batch_s_one_hashed_commit_loses_nothing() {
    every_kill_point_of(&batch(), "fsync,fdatasync", "", 3).await;
}

/// Finding: a prune removed the record of a quarantined file whose release was interrupted
/// (custody `busy:release`, its only copy in the tool's temp at the top of clean): the custody
/// row was read as "it left", so the file was forgotten and the release could never be finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_the_record_of_a_kept_file_whose_release_was_interrupted() {
    let w = World::quick().await;
    let cfg = w.write_config();
    let body = [EICAR, b" interrupted, then pruned"].concat();
    let (journal, id) = crate::attacks::quarantined_entry(&w, "fp.com", &body).await;
    // What `quarantine release` leaves when killed -9 between removing the quarantined file and
    // renaming its verified copy into place.
    let temp = crate::attacks::killed_mid_release(&w, &cfg, &journal, id).await;

    // The agent's prune runs (history shorter than the time the tool has been gone).
    std::thread::sleep(Duration::from_millis(5));
    journal
        .prune(Duration::ZERO, Duration::from_secs(3600))
        .await
        .unwrap();
    let kept = journal
        .kept(dropscan::journal::Outcome::Quarantine, false)
        .await
        .unwrap();
    drop(journal);
    assert_eq!(
        kept.len(),
        1,
        "the interrupted release's file is no longer listed as kept"
    );

    // Once the dead tool's custody is stale, running the release again finishes it.
    crate::attacks::release_again_once_custody_is_stale(&w, &cfg, id, &body, &temp).await;
}

/// Finding: a file of a batch whose private copy found staging full (ENOSPC) waited for the
/// stuck-claim sweep (claimed for 10 minutes, looked at every minute) although the rest of its
/// batch freed the room within seconds. The inbox is a small tmpfs: five files of 100 KiB and one
/// of 200 KiB, about 144 KiB free, so only the big one's copy fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_file_whose_copy_found_staging_full_is_owned_once_its_batch_made_room() {
    use crate::durability::Tmpfs;
    let w = World::quick().await;
    let Some(fs) = Tmpfs::mount(&w.inbox, "1024k") else {
        eprintln!("cannot mount a tmpfs here: skipped");
        return;
    };
    let small: Vec<(String, Vec<u8>)> = (0..5u64)
        .map(|i| (format!("s{i}.bin"), bytes(60 + i, 100 << 10)))
        .collect();
    let big = bytes(70, 200 << 10);
    for (n, b) in &small {
        w.drop_file(n, b);
    }
    w.drop_file("big.bin", &big);
    // 256 pages: 175 taken by the drops, 44 by a filler beside the staging folder (where the
    // agent does not look for files).
    std::fs::create_dir_all(w.inbox.join(".dropscan")).unwrap();
    std::fs::write(w.inbox.join(".dropscan/filler"), vec![0u8; 176 << 10]).unwrap();
    let agent = w.start_agent();
    let o = w.wait_placed(6, Duration::from_secs(90)).await;
    agent.stop().await.0.unwrap();
    assert_eq!(o.len(), 6, "{o:?}");
    assert_eq!(std::fs::read(w.clean.join("big.bin")).unwrap(), big);
    for (n, b) in &small {
        assert_eq!(&std::fs::read(w.clean.join(n)).unwrap(), b, "{n}");
    }
    drop(fs);
}

/// Finding: a SIGHUP whose configuration was still being checked when the internal restart that
/// serves a share back from a hang ended the generation was dropped: the watcher returned on the
/// cancellation without a word, and the next generation ran the old configuration (the file's new
/// one only on the next SIGHUP). The check is held here by the new configuration's quarantine
/// folder on a second share that hangs, so the restart always comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_checked_while_a_hung_share_comes_back_is_not_lost() {
    use crate::review10::{HangingShare, spawn_binary, terminate, with_second_watch};
    let (mut w, server, other) = with_second_watch().await;
    let Some(share) = HangingShare::mount(&server, &other) else {
        return;
    };
    let q_server = w.dir.path().join("q-server");
    let q_mount = w.dir.path().join("q-share");
    std::fs::create_dir_all(q_server.join("quarantine")).unwrap();
    std::fs::create_dir_all(&q_mount).unwrap();
    let Some(q_share) = HangingShare::mount(&q_server, &q_mount) else {
        return;
    };
    for sub in ["clean", "quarantine", "failed"] {
        std::fs::create_dir_all(w.dir.path().join("out2").join(sub)).unwrap();
    }
    let config = w.write_config();
    share.hang();
    let log = w.dir.path().join("agent.log");
    let mut agent = spawn_binary(&config, &log);
    w.drop_file("local.bin", &bytes(180, 1000));
    let served = wait_for(LONG, || w.clean.join("local.bin").is_file().then_some(())).await;
    assert!(served.is_some(), "the local watch is not served");
    let logged = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches(what)
            .count()
    };

    // The new configuration quarantines on the second share, which hangs: its check waits.
    let old_quarantine = w.quarantine.clone();
    w.quarantine = q_mount.join("quarantine");
    w.write_config();
    q_share.hang();
    crate::durability::sighup(&agent);
    std::thread::sleep(Duration::from_secs(1));
    // The first share answers again: the agent restarts to serve it.
    share.signal(rustix::process::Signal::CONT);
    let restarted = wait_for(LONG, || {
        (logged("restarting the agent to serve every watch") > 0).then_some(())
    })
    .await;
    q_share.signal(rustix::process::Signal::CONT);
    let reloaded = wait_for(Duration::from_secs(30), || {
        (logged("SIGHUP: configuration valid") > 0).then_some(())
    })
    .await;
    let eicar = if reloaded.is_some() {
        w.drop_file("eicar.com", EICAR);
        wait_for(LONG, || {
            [&w.quarantine, &old_quarantine]
                .into_iter()
                .find(|q| q.join("eicar.com").is_file())
                .cloned()
        })
        .await
    } else {
        None
    };
    let (_, _, tail) = terminate(&mut agent, &log, 10).await;
    drop(q_share);
    drop(share);
    assert!(
        restarted.is_some() && reloaded.is_some() && eicar.as_ref() == Some(&w.quarantine),
        "restarted to serve the share: {restarted:?}; the SIGHUP's configuration taken up: \
         {reloaded:?}; eicar.com quarantined in {eicar:?} (the new configuration's folder is {}); \
         last log lines (newest first): {tail:#?}",
        w.quarantine.display()
    );
}

/// A scanner-style SMB writer (64 KiB with a flush every 2.5 s, the file held open throughout)
/// whose small file is claimed and owned in a batch with other small files dropped all along:
/// uploaded once, whole, and in clean with the client's bytes. (Whether it settles in the same
/// claim batch as others is up to timing; when it does not, the run says so and the promise is
/// still checked.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_a_paused_writer_s_small_file_owned_in_a_batch_is_uploaded_once_whole() {
    use crate::shares::{smb_world, uploads};
    use crate::shares_fixture::slow_writer_content;
    let Some((w, smbd)) = smb_world("").await else {
        return;
    };
    let agent = w.start_agent();
    let writer = tokio::task::spawn_blocking(move || {
        smbd.slow_writer("scan-0002.pdf", 64 << 10, 4, Duration::from_millis(2500))
    });
    // Other small files, 8 every 250 ms, until the writer is done and a little after (at most
    // 100 s: a writer that never ends fails below).
    let mut others = Vec::new();
    let mut round = 0u64;
    while (!writer.is_finished() || round < 24) && round < 400 {
        for i in 0..8u64 {
            let name = format!("other/{round}-{i}.bin");
            let body = bytes(1000 + round * 8 + i, 2000);
            w.drop_file(&name, &body);
            others.push((name, body));
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, out) = match writer.await.unwrap() {
        Ok(x) => x,
        Err(skip) => {
            eprintln!("{skip}");
            return;
        }
    };
    assert!(status.success(), "slow writer: {status:?} {out}");
    let o = w
        .wait_placed(others.len() + 1, Duration::from_secs(120))
        .await;
    agent.stop().await.0.unwrap();
    // Claimed with others (one claim transaction stamps its batch alike).
    let conn = rusqlite::Connection::open(w.state_dir().join("journal.sqlite")).unwrap();
    let batch: i64 = conn
        .query_row(
            "SELECT count(*) FROM files WHERE claimed_at = \
             (SELECT claimed_at FROM files WHERE rel_path = CAST('scan-0002.pdf' AS BLOB))",
            [],
            |r| r.get(0),
        )
        .unwrap();
    if batch <= 1 {
        // Whether the file settles in the same instant as others is up to timing (it failed
        // CI once as an assertion): the promise below is checked either way, and the run says
        // that this time it was not the batched path.
        eprintln!("scan-0002.pdf was claimed alone this time: the batched path was not taken");
    }
    assert_eq!(
        o.get(std::path::Path::new("scan-0002.pdf")),
        Some(&Outcome::Clean),
        "{:?}",
        o.iter()
            .filter(|(_, v)| **v != Outcome::Clean)
            .collect::<Vec<_>>()
    );
    assert!(
        std::fs::read(w.clean.join("scan-0002.pdf")).unwrap() == slow_writer_content(64 << 10, 4),
        "scan-0002.pdf in clean is not the client's bytes"
    );
    for (n, b) in &others {
        assert_eq!(&std::fs::read(w.clean.join(n)).unwrap(), b, "{n}");
    }
    assert_eq!(
        uploads(&w),
        others.len() as u64 + 1,
        "one upload per file, none of a half-written one"
    );
}

/// `state.history` changed by a SIGHUP is the one the next prune uses: a finished record two
/// hours old, kept under the default (7 days), is pruned once the history is one hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_shortening_state_history_prunes_by_the_new_one() {
    use crate::review10::{spawn_binary, terminate};
    let w = World::quick().await;
    let config = w.write_config();
    let log = w.dir.path().join("agent.log");
    let mut agent = spawn_binary(&config, &log);
    w.drop_file("old.bin", &bytes(190, 1000));
    let journal = w.state_dir().join("journal.sqlite");
    let done = wait_for(LONG, || {
        let s = dropscan::journal::read_summary(&journal).ok()?;
        s.per_state
            .iter()
            .any(|(st, n)| st == "done" && *n == 1)
            .then_some(())
    })
    .await;
    let conn = rusqlite::Connection::open(&journal).unwrap();
    conn.execute("UPDATE files SET updated_at = updated_at - 7200000", [])
        .unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[state]\n", "[state]\nhistory = \"1h\"\n"),
    )
    .unwrap();
    crate::durability::sighup(&agent);
    let count = || -> i64 {
        conn.query_row("SELECT count(*) FROM files", [], |r| r.get(0))
            .unwrap_or(-1)
    };
    let pruned = wait_for(LONG, || (count() == 0).then_some(())).await;
    let (_, _, tail) = terminate(&mut agent, &log, 8).await;
    assert!(
        done.is_some() && pruned.is_some(),
        "old.bin done: {done:?}; its record pruned under the new history: {pruned:?} ({} left); \
         last log lines (newest first): {tail:#?}",
        count()
    );
}

/// Finding: a share hung at start that answers, then hangs again just as the agent restarts to
/// serve it, stalled every watch until it answered again: the new generation's look found it
/// answering, and start-up then waited in `openat2` on it on the runtime's thread (reconcile
/// recognising each root's staging folder, `app/reconcile.rs` `recognise_all`), so nothing else
/// ran. A race: failed 3 runs of 8 here (two.bin placed 20 to 60 s late, once the share
/// answered). Not fixed: see the ignore reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "review13 finding 4, not fixed: start-up (reconcile's recognise_root, then the \
            stages) opens each served root on the async threads without a deadline; fix by \
            making recognise_root's first looks on a thread of its own with answer::DEADLINE \
            and, when they do not answer, holding the watch as Recognised::Awaiting(inbox), \
            which restart_when_staging_back then serves once it answers"]
async fn a_share_that_flaps_while_it_is_served_back_loses_nothing() {
    use crate::review10::{HangingShare, spawn_binary, terminate, with_second_watch};
    let (w, server, other) = with_second_watch().await;
    let Some(share) = HangingShare::mount(&server, &other) else {
        return;
    };
    for sub in ["clean", "quarantine", "failed"] {
        std::fs::create_dir_all(w.dir.path().join("out2").join(sub)).unwrap();
    }
    let config = w.write_config();
    share.hang();
    let log = w.dir.path().join("agent.log");
    let mut agent = spawn_binary(&config, &log);
    let logged = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches(what)
            .count()
    };
    w.drop_file("one.bin", &bytes(200, 1000));
    let one = wait_for(LONG, || w.clean.join("one.bin").is_file().then_some(())).await;
    // Answers: the agent restarts to serve it, and it hangs again at once.
    share.signal(rustix::process::Signal::CONT);
    let restarted = wait_for(LONG, || {
        (logged("restarting the agent to serve every watch") > 0).then_some(())
    })
    .await;
    share.hang();
    w.drop_file("two.bin", &bytes(201, 1000));
    let two = wait_for(LONG, || w.clean.join("two.bin").is_file().then_some(())).await;
    let stalled = if two.is_none() {
        crate::review10::threads_of(agent.id())
    } else {
        Vec::new()
    };
    // Answers again, for good.
    share.signal(rustix::process::Signal::CONT);
    let body = bytes(202, 3000);
    std::fs::write(server.join("remote.bin"), &body).unwrap();
    let remote = w.dir.path().join("out2/clean/remote.bin");
    let served = wait_for(LONG, || remote.is_file().then_some(())).await;
    w.drop_file("three.bin", &bytes(203, 1000));
    let three = wait_for(LONG, || w.clean.join("three.bin").is_file().then_some(())).await;
    let (ended, threads, tail) = terminate(&mut agent, &log, 12).await;
    drop(share);
    assert!(
        one.is_some()
            && restarted.is_some()
            && two.is_some()
            && served.is_some()
            && three.is_some()
            && ended.is_some(),
        "one.bin placed while hung: {one:?}; restarted once it answered: {restarted:?}; \
         two.bin placed while it hung again: {two:?} (threads then: {stalled:#?}); remote.bin placed once it answered again: \
         {served:?}; three.bin after: {three:?}; ended on SIGTERM: {ended:?}; threads: \
         {threads:?}; last log lines (newest first): {tail:#?}"
    );
    assert_eq!(std::fs::read(&remote).unwrap(), body);
}

/// `state.history` shorter than an outage: a prune with no history at all, while every upload is
/// refused (429), keeps every record in flight, and the files are placed once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_with_no_history_during_an_outage_keeps_every_file_in_flight() {
    use dropscan::emulator::Faults;
    let w = World::quick().await;
    w.emulator().state().set_faults(Faults {
        http_429_share: 1.0,
        ..Faults::default()
    });
    let agent = w.start_agent();
    let files: Vec<(String, Vec<u8>)> = (0..3u64)
        .map(|i| (format!("out{i}.bin"), bytes(210 + i, 5000)))
        .collect();
    for (n, b) in &files {
        w.drop_file(n, b);
    }
    let waiting = wait_for(LONG, || {
        let r = crate::review8::records(&w);
        (r.len() == 3 && r.iter().all(|x| x.1 == "hashed")).then_some(())
    })
    .await;
    assert!(waiting.is_some(), "{:?}", crate::review8::records(&w));
    let journal = dropscan::journal::Journal::open(&w.state_dir().join("journal.sqlite")).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let pruned = journal.prune(Duration::ZERO, Duration::ZERO).await.unwrap();
    drop(journal);
    assert_eq!(pruned, 0, "records in flight pruned");
    w.emulator().state().set_faults(Faults::default());
    let o = w.wait_placed(3, LONG).await;
    agent.stop().await.0.unwrap();
    for (n, b) in &files {
        assert_eq!(
            o.get(std::path::Path::new(n)),
            Some(&Outcome::Clean),
            "{o:?}"
        );
        assert_eq!(&std::fs::read(w.clean.join(n)).unwrap(), b, "{n}");
    }
}
