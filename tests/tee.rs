//! The tee (issue 20): a big file just claimed is owned (leased, copied, hashed) while it is
//! uploaded, in one pass over its bytes. Its verdict releases it only when the server took
//! exactly the bytes owned; a tee that ends otherwise is untied (the scan deleted) and the file
//! goes the usual way. Killed at each of its durable steps, nothing is lost.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use dropscan::emulator::{EmulatorConfig, Faults};

use crate::kill_points::{Drops, every_kill_point_of};
use crate::util::{EICAR, LONG, Outcome, World, bytes, events, wait_for, wait_until};

/// Over the claim stage's small-file size (1 MiB): owned while it is uploaded.
const BIG: usize = 3 << 20;

/// A big file with the EICAR string at its start (detected by the emulator).
fn big_eicar() -> Vec<u8> {
    let mut b = EICAR.to_vec();
    b.extend(bytes(91, BIG));
    b
}

/// The staged files left in `w`'s staging folder (markers aside).
fn staging_left(w: &World) -> Vec<String> {
    std::fs::read_dir(w.inbox.join(".dropscan/test"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".owner" && n != ".lock")
                .collect()
        })
        .unwrap_or_default()
}

/// Every file of `set` in its destination, byte for byte, and nothing left in the inbox or in
/// staging.
async fn all_in_place(w: &World, set: &[(&str, Vec<u8>, Outcome)]) {
    let o = w.wait_placed(set.len(), LONG).await;
    for (name, content, outcome) in set {
        assert_eq!(o.get(&PathBuf::from(name)), Some(outcome), "{name}: {o:?}");
        let dir = match outcome {
            Outcome::Clean => &w.clean,
            Outcome::Quarantine => &w.quarantine,
            Outcome::Failed => &w.failed,
        };
        assert!(
            std::fs::read(dir.join(name)).unwrap() == *content,
            "{name} changed"
        );
    }
    assert!(w.inbox_files().is_empty(), "{:?}", w.inbox_files().keys());
    let emptied = wait_for(LONG, || staging_left(w).is_empty().then_some(())).await;
    assert!(
        emptied.is_some(),
        "staging not emptied: {:?}",
        staging_left(w)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_files_are_owned_while_uploaded_in_one_upload_each_and_sorted_byte_for_byte() {
    let w = World::quick().await;
    let set = vec![
        ("big.iso", bytes(90, BIG), Outcome::Clean),
        ("big-eicar.bin", big_eicar(), Outcome::Quarantine),
        ("small.txt", bytes(92, 5000), Outcome::Clean),
    ];
    let agent = w.start_agent();
    for (name, content, _) in &set {
        w.drop_file(name, content);
    }
    all_in_place(&w, &set).await;
    let s = w.emulator().state().stats();
    assert_eq!(s.submits_accepted, 3, "{s:?}");
    let sent: u64 = set.iter().map(|(_, c, _)| c.len() as u64).sum();
    assert_eq!(
        s.bytes_received, sent,
        "each file's bytes were sent once: {s:?}"
    );
    assert_eq!(
        events("owned while uploaded", Some(&w.inbox)),
        2,
        "the two big files were owned while they were uploaded"
    );
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tee_the_server_refuses_for_a_while_is_untied_and_the_file_uploaded_again_once_owned() {
    let w = World::new(EmulatorConfig {
        faults: Faults {
            http_429_share: 1.0,
            retry_after: Some("1".into()),
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let emu = w.emulator().state();
    let content = bytes(93, BIG);
    let agent = w.start_agent();
    w.drop_file("busy.iso", &content);
    wait_until(LONG, "a refused upload", || {
        (emu.stats()
            .submits_by_status
            .get(&429)
            .copied()
            .unwrap_or(0)
            >= 1)
            .then_some(())
    })
    .await;
    emu.set_faults(Faults::default());
    all_in_place(&w, &[("busy.iso", content, Outcome::Clean)]).await;
    let s = emu.stats();
    assert_eq!(s.submits_accepted, 1, "{s:?}");
    // The refused tee was untied: the file was owned on its own, then uploaded as any file.
    assert_eq!(events("owned while uploaded", Some(&w.inbox)), 0);
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tee_over_a_size_limit_the_server_lowered_is_untied_and_fails_as_too_large() {
    let w = World::quick().await;
    let content = bytes(94, BIG);
    let agent = w.start_agent();
    // Known to the agent as 1 GiB or more at its start; lowered behind its back.
    wait_until(LONG, "the limits asked", || {
        (w.emulator().state().stats().filters_requests >= 1).then_some(())
    })
    .await;
    w.emulator()
        .state()
        .set_max_object_size(i64::try_from(BIG / 2).unwrap());
    w.drop_file("huge.iso", &content);
    all_in_place(&w, &[("huge.iso", content, Outcome::Failed)]).await;
    let sidecar = std::fs::read_to_string(w.failed.join("huge.iso.dropscan.json")).unwrap();
    assert!(sidecar.contains("too large"), "{sidecar}");
    assert_eq!(w.emulator().state().stats().submits_accepted, 0);
    agent.stop().await.0.unwrap();
}

/// One big file (owned while uploaded) and one small one (owned at the claim).
fn tee_set() -> Drops {
    vec![
        ("tee.iso", bytes(95, 2 << 20), Outcome::Clean),
        ("small.bin", bytes(96, 4000), Outcome::Clean),
    ]
}

/// Killed after every rename of a tee: the claim's, the private copy's over the staged name,
/// the release's. A tee found at the start is untied and its file owned again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_rename_of_a_tee_loses_nothing() {
    every_kill_point_of(&tee_set(), "rename,renameat,renameat2", "", 1).await;
}

/// Killed after every other fsync of a tee: the journal's commits (`teeing`, `teed`), the
/// private copy's, the release's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_fsync_of_a_tee_loses_nothing() {
    let set: Drops = tee_set().into_iter().take(1).collect();
    every_kill_point_of(&set, "fsync,fdatasync", "", 2).await;
}

/// A tee record found at the start (the agent stopped between `teeing` and `teed`) is untied:
/// its scan deleted on the server, the file owned again and uploaded once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tee_stopped_mid_upload_is_untied_at_the_start_and_its_scan_deleted() {
    let w = World::new(EmulatorConfig {
        faults: Faults {
            // Every request waits: the stop comes while the tee's upload is on the wire.
            slow_share: 1.0,
            slow_delay: Duration::from_secs(3),
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let content = bytes(97, BIG);
    w.drop_file("stopped.iso", &content);
    let agent = w.start_agent();
    let journal = w.state_dir().join("journal.sqlite");
    wait_until(LONG, "a tee journaled", || {
        let conn = rusqlite::Connection::open(&journal).ok()?;
        conn.query_row(
            "SELECT COUNT(*) FROM files WHERE state = 'submitting' AND sha256 IS NULL",
            [],
            |r| r.get::<_, i64>(0),
        )
        .ok()
        .filter(|n| *n == 1)
    })
    .await;
    agent.stop().await.0.unwrap();
    w.emulator().state().set_faults(Faults::default());
    let agent = w.start_agent();
    all_in_place(&w, &[("stopped.iso", content, Outcome::Clean)]).await;
    let conn = rusqlite::Connection::open(&journal).unwrap();
    let tees: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM files WHERE sha256 IS NULL AND state != 'done'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tees, 0);
    agent.stop().await.0.unwrap();
}
