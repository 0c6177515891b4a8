//! The journal is the state machine: every transition checks its source state, a verdict is
//! decided once (a contradicting answer is an anomaly resolved fail-closed: detect wins), the
//! group commit never reports work SQLite rolled back on its own, and the verdict cache fails
//! closed against wall-clock jumps. These drive the real journal on a real SQLite file.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use dropscan::journal::{
    Decision, FileId, FileState, HashedAs, Journal, JournalError, NewClaim, Outcome, ScanVerdict,
    Stamp, now_ms,
};
// Raw access to the connection, for what no operation does (a clock jump, a rollback by SQLite).
use dropscan::journal::testing::RawAccess as _;

const SHA: [u8; 32] = [9; 32];
const TTL: Duration = Duration::from_secs(3600);

fn stamp() -> Stamp {
    Stamp {
        size: 5,
        mtime_ns: 1,
        ctime_ns: 2,
        dev: 3,
        ino: 4,
    }
}

fn open() -> (tempfile::TempDir, Journal) {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("journal.sqlite")).unwrap();
    (dir, j)
}

async fn claim(j: &Journal, name: &str) -> FileId {
    j.claim(vec![NewClaim {
        root: "/in".into(),
        rel_path: name.into(),
        staged: format!("/in/.dropscan/{name}.staged").into(),
        dropped_at_ms: None,
        staging_folder: None,
    }])
    .await
    .unwrap()[0]
}

/// A record `submitted` under `scan`, with content `sha`.
async fn in_flight(j: &Journal, name: &str, sha: [u8; 32], scan: &str) -> FileId {
    let id = claim(j, name).await;
    assert_eq!(
        j.hashed(id, sha, stamp(), Duration::ZERO).await.unwrap(),
        HashedAs::Hashed
    );
    j.submitting(id, dropscan::scanner::ScanId::parse(scan).unwrap())
        .await
        .unwrap();
    j.submitted(id).await.unwrap();
    id
}

fn verdict(v: ScanVerdict) -> Decision {
    Decision::from_verdict(v, SHA)
}

async fn errors(j: &Journal) -> Vec<String> {
    j.summary()
        .await
        .unwrap()
        .last_errors
        .into_iter()
        .map(|(_, t)| t)
        .collect()
}

#[tokio::test]
async fn contradictory_verdicts_for_one_scan_end_in_quarantine() {
    let (_d, j) = open();
    let a = in_flight(&j, "a", SHA, "scan-a").await;
    // One results answer (or two polls) saying `not detected` and then `detect` for one scan.
    let decided = j
        .decide(vec![
            (a, verdict(ScanVerdict::NotDetected)),
            (a, verdict(ScanVerdict::Detect)),
        ])
        .await
        .unwrap();
    assert_eq!(decided, vec![a]);
    let r = j.get(a).await.unwrap();
    assert_eq!(r.state, FileState::Decided);
    assert_eq!(r.outcome, Some(Outcome::Quarantine));
    assert_eq!(r.scan_verdict(), Some(ScanVerdict::Detect));
    assert!(!r.is_clean_verdict_for_content());
    let errs = errors(&j).await;
    assert!(
        errs.iter().any(|e| e.contains("server anomaly")),
        "{errs:?}"
    );
    // The verdict cache says detect too: identical content is quarantined without a scan.
    let b = claim(&j, "b").await;
    assert_eq!(
        j.hashed(b, SHA, stamp(), TTL).await.unwrap(),
        HashedAs::Reused(Outcome::Quarantine)
    );
}

#[tokio::test]
async fn a_later_not_detected_never_overwrites_a_detect() {
    let (_d, j) = open();
    let a = in_flight(&j, "a", SHA, "scan-a").await;
    j.decide(vec![(a, verdict(ScanVerdict::Detect))])
        .await
        .unwrap();
    // A later poll contradicts it: nothing changes, nothing is announced, the anomaly is noted.
    let again = j
        .decide(vec![(a, verdict(ScanVerdict::NotDetected))])
        .await
        .unwrap();
    assert!(again.is_empty());
    let r = j.get(a).await.unwrap();
    assert_eq!(r.outcome, Some(Outcome::Quarantine));
    assert_eq!(r.scan_verdict(), Some(ScanVerdict::Detect));
    assert!(
        errors(&j)
            .await
            .iter()
            .any(|e| e.contains("server anomaly"))
    );
    // The same answer again is no anomaly and changes nothing.
    let before = errors(&j).await.len();
    assert!(
        j.decide(vec![(a, verdict(ScanVerdict::Detect))])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(errors(&j).await.len(), before);
    // A late local failure (a timeout, say) does not overwrite the verdict either.
    j.decide(vec![(
        a,
        Decision::failed(&std::io::Error::other("no verdict within 1m"), true),
    )])
    .await
    .unwrap();
    assert_eq!(j.get(a).await.unwrap().outcome, Some(Outcome::Quarantine));
}

#[tokio::test]
async fn a_contradicting_detect_flips_unplaced_clean_twins_and_only_records_placed_ones() {
    let (_d, j) = open();
    let a = in_flight(&j, "a", SHA, "scan-a").await;
    // b waits for a's verdict (same content); c is a clean file of the same content, placing.
    let b = claim(&j, "b").await;
    assert_eq!(
        j.hashed(b, SHA, stamp(), Duration::ZERO).await.unwrap(),
        HashedAs::Waiting
    );
    let decided = j
        .decide(vec![(a, verdict(ScanVerdict::NotDetected))])
        .await
        .unwrap();
    assert_eq!(decided, vec![a, b]);
    j.placing_checked(
        b,
        "/out/clean".into(),
        "/out/clean/b".into(),
        Some(Outcome::Clean),
        Some(SHA),
    )
    .await
    .unwrap();
    // Now the server says detect for a's scan: a (still decided) flips; b is placing and stays.
    let flipped = j
        .decide(vec![(a, verdict(ScanVerdict::Detect))])
        .await
        .unwrap();
    assert_eq!(flipped, vec![a]);
    assert_eq!(j.get(a).await.unwrap().outcome, Some(Outcome::Quarantine));
    let rb = j.get(b).await.unwrap();
    assert_eq!(
        (rb.state, rb.outcome),
        (FileState::Placing, Some(Outcome::Clean))
    );
    let errs = errors(&j).await;
    assert!(
        errs.iter()
            .any(|e| e.contains("server anomaly") && e.contains("already placed as clean")),
        "{errs:?}"
    );
    // A sorter that read a as clean before the flip cannot place it with that destination.
    let err = j
        .placing_checked(
            a,
            "/out/clean".into(),
            "/out/clean/a".into(),
            Some(Outcome::Clean),
            Some(SHA),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, JournalError::Conflict { .. }), "{err}");
    assert_eq!(j.get(a).await.unwrap().state, FileState::Decided);
}

/// The sorter places a record as its decision committed it (issue 20: no read back). If the
/// file was hashed again meanwhile (it changed, and was decided again with the same outcome),
/// the destination chosen from the old record is refused: only a verdict for the content the
/// record holds now may release it.
#[tokio::test]
async fn a_record_carried_from_its_decision_cannot_be_placed_once_hashed_again() {
    let (_d, j) = open();
    let a = in_flight(&j, "a", SHA, "scan-a").await;
    let carried = j
        .decide_records(vec![(a, verdict(ScanVerdict::NotDetected))])
        .await
        .unwrap();
    assert_eq!(carried.len(), 1);
    assert_eq!(
        (carried[0].id, carried[0].outcome, carried[0].sha256),
        (a, Some(Outcome::Clean), Some(SHA))
    );
    // The file changed: hashed again with other content, scanned, decided clean again.
    let other = [4u8; 32];
    j.rehash(a).await.unwrap();
    assert_eq!(
        j.hashed(a, other, stamp(), Duration::ZERO).await.unwrap(),
        HashedAs::Hashed
    );
    j.submitting(a, dropscan::scanner::ScanId::parse("scan-a2").unwrap())
        .await
        .unwrap();
    j.submitted(a).await.unwrap();
    j.decide(vec![(
        a,
        Decision::from_verdict(ScanVerdict::NotDetected, other),
    )])
    .await
    .unwrap();
    let err = j
        .placing_checked(
            a,
            "/out/clean".into(),
            "/out/clean/a".into(),
            carried[0].outcome,
            carried[0].sha256,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, JournalError::Conflict { .. }), "{err}");
    assert_eq!(j.get(a).await.unwrap().state, FileState::Decided);
}

/// A batch of placements (issue 20, branch `place`) is refused record by record by the rules of
/// `placing_checked`: the record hashed again since its decision is refused and left `decided`,
/// the others of the batch are `placing`; `placed_many` and `done_many` likewise move only the
/// records in the state they come from.
#[tokio::test]
async fn a_batch_of_placements_refuses_only_the_record_that_changed() {
    let (_d, j) = open();
    let mut ids = Vec::new();
    let contents = [[1u8; 32], [2; 32], [3; 32]];
    for ((n, scan), sha) in [("a", "scan-a"), ("b", "scan-b"), ("c", "scan-c")]
        .into_iter()
        .zip(contents)
    {
        ids.push(in_flight(&j, n, sha, scan).await);
    }
    let carried = j
        .decide_records(
            ids.iter()
                .zip(contents)
                .map(|(id, sha)| (*id, Decision::from_verdict(ScanVerdict::NotDetected, sha)))
                .collect(),
        )
        .await
        .unwrap();
    // b changed after its decision: sent back to be hashed again.
    j.rehash(ids[1]).await.unwrap();
    let rows = carried
        .iter()
        .map(|r| dropscan::journal::PlacingRow {
            id: r.id,
            dest_root: "/out/clean".into(),
            dest: PathBuf::from("/out/clean").join(&r.rel_path),
            seen: r.outcome,
            seen_sha256: r.sha256,
        })
        .collect();
    let answers = j.placing_many(rows).await.unwrap();
    let refused: Vec<bool> = answers.iter().map(Result::is_err).collect();
    assert_eq!(refused, vec![false, true, false]);
    let states = |j: &Journal, ids: Vec<FileId>| {
        let j = j.clone();
        async move {
            let mut out = Vec::new();
            for id in ids {
                out.push(j.get(id).await.unwrap().state);
            }
            out
        }
    };
    assert_eq!(
        states(&j, ids.clone()).await,
        vec![FileState::Placing, FileState::Claimed, FileState::Placing]
    );
    let placed = j
        .placed_many(ids.iter().map(|id| (*id, Vec::new())).collect())
        .await
        .unwrap();
    assert_eq!(
        placed.iter().map(Result::is_err).collect::<Vec<_>>(),
        vec![false, true, false]
    );
    let done = j.done_many(ids.clone()).await.unwrap();
    assert_eq!(
        done.iter().map(Result::is_err).collect::<Vec<_>>(),
        vec![false, true, false]
    );
    assert_eq!(
        states(&j, ids).await,
        vec![FileState::Done, FileState::Claimed, FileState::Done]
    );
}

/// A batch carries records as their decision left them (`decided`); one that another placement
/// attempt has taken up since (`placing`, its destination journaled: the file may already be
/// there, its `placed` row not written) is refused, and its journaled destination is kept. A
/// batch that wrote a new destination over it would send the one-record path to look for the
/// file at a name where it never was, and close a placed file as vanished.
#[tokio::test]
async fn a_batch_never_overwrites_the_destination_of_a_record_already_placing() {
    let (_d, j) = open();
    let a = in_flight(&j, "a", SHA, "scan-a").await;
    let carried = j
        .decide_records(vec![(a, verdict(ScanVerdict::NotDetected))])
        .await
        .unwrap();
    j.placing_checked(
        a,
        "/out/clean".into(),
        "/out/clean/a".into(),
        carried[0].outcome,
        carried[0].sha256,
    )
    .await
    .unwrap();
    let answers = j
        .placing_many(vec![dropscan::journal::PlacingRow {
            id: a,
            dest_root: "/out/clean".into(),
            dest: "/out/clean/a (1)".into(),
            seen: carried[0].outcome,
            seen_sha256: carried[0].sha256,
        }])
        .await
        .unwrap();
    assert!(
        answers[0].is_err(),
        "a record already placing was taken into a batch"
    );
    assert_eq!(
        j.get(a).await.unwrap().dest,
        Some(PathBuf::from("/out/clean/a"))
    );
}

#[tokio::test]
async fn the_verdict_cache_never_replaces_detect_by_not_detected() {
    let (_d, j) = open();
    let a = in_flight(&j, "a", SHA, "scan-a").await;
    j.decide(vec![(a, verdict(ScanVerdict::Detect))])
        .await
        .unwrap();
    // Scanned again (reuse off for it): the cached detect is not used here.
    let b = in_flight(&j, "b", SHA, "scan-b").await;
    // Another scan of the same bytes says `not detected`: that record goes where its own scan
    // says, but the cache keeps `detect` for the content.
    j.decide(vec![(b, verdict(ScanVerdict::NotDetected))])
        .await
        .unwrap();
    assert_eq!(j.get(b).await.unwrap().outcome, Some(Outcome::Clean));
    let c = claim(&j, "c").await;
    assert_eq!(
        j.hashed(c, SHA, stamp(), TTL).await.unwrap(),
        HashedAs::Reused(Outcome::Quarantine)
    );
}

#[tokio::test]
async fn every_transition_checks_its_source_state() {
    let (_d, j) = open();
    let conflict = |r: Result<(), JournalError>| {
        assert!(matches!(r, Err(JournalError::Conflict { .. })), "{r:?}");
    };
    let a = claim(&j, "a").await;
    conflict(j.submitted(a).await);
    conflict(j.not_submitted(a).await);
    conflict(j.resend(a).await);
    conflict(j.rehash(a).await);
    conflict(j.placing(a, "/x".into()).await);
    conflict(j.placed(a).await);
    conflict(j.done(a).await);
    conflict(
        j.resubmit(
            a,
            dropscan::scanner::ScanId::parse("s").unwrap(),
            "n".into(),
        )
        .await,
    );
    assert_eq!(j.get(a).await.unwrap().state, FileState::Claimed);
    j.hashed(a, SHA, stamp(), Duration::ZERO).await.unwrap();
    conflict(j.hashed(a, SHA, stamp(), Duration::ZERO).await.map(|_| ()));
    j.submitting(a, dropscan::scanner::ScanId::parse("scan-1").unwrap())
        .await
        .unwrap();
    conflict(
        j.submitting(a, dropscan::scanner::ScanId::parse("scan-2").unwrap())
            .await,
    );
    j.submitted(a).await.unwrap();
    conflict(j.submitted(a).await);
    // A retry for a scan that is not the record's current one is refused.
    conflict(
        j.resubmit(
            a,
            dropscan::scanner::ScanId::parse("scan-0").unwrap(),
            "n".into(),
        )
        .await,
    );
    j.decide(vec![(a, verdict(ScanVerdict::Detect))])
        .await
        .unwrap();
    conflict(j.placed(a).await);
    conflict(j.not_submitted(a).await);
    j.placing(a, "/q/a".into()).await.unwrap();
    conflict(j.done(a).await);
    conflict(j.rehash(a).await);
    j.placed(a).await.unwrap();
    // A placed file never reads as vanished.
    conflict(j.close_vanished(a, "gone".into()).await);
    j.done(a).await.unwrap();
    conflict(j.done(a).await);
    let r = j.get(a).await.unwrap();
    assert_eq!(
        (r.state, r.outcome),
        (FileState::Done, Some(Outcome::Quarantine))
    );
    // The table itself: nothing leaves `done`, and nothing skips `decided` into placement.
    assert!(FileState::Done.next_states().is_empty());
    for s in FileState::ALL {
        if s != FileState::Decided && s != FileState::Placing {
            assert!(!s.can_become(FileState::Placing), "{s:?}");
        }
    }
}

#[tokio::test]
async fn a_vanished_record_reads_vanished_in_status() {
    let (d, j) = open();
    let a = claim(&j, "a").await;
    j.close_vanished(a, "vanished from staging before it was hashed".into())
        .await
        .unwrap();
    let r = j.get(a).await.unwrap();
    assert_eq!(
        (r.state, r.outcome),
        (FileState::Done, Some(Outcome::Vanished))
    );
    let s = dropscan::journal::read_summary(&d.path().join("journal.sqlite")).unwrap();
    assert_eq!(s.per_outcome, vec![("vanished".to_string(), 1)]);
    assert!(s.oldest_pending.is_none());
}

#[tokio::test]
async fn a_verdict_decided_in_the_future_is_never_reused() {
    let (_d, j) = open();
    let a = in_flight(&j, "a", SHA, "scan-a").await;
    j.decide(vec![(a, verdict(ScanVerdict::NotDetected))])
        .await
        .unwrap();
    // The wall clock went back an hour since: the cached verdict reads as decided in the future.
    j.run(|conn| {
        conn.execute(
            "UPDATE verdicts SET decided_at = ?1",
            [now_ms() + 3_600_000],
        )
        .map_err(|source| JournalError::Sqlite {
            about: "test",
            source,
        })
    })
    .await
    .unwrap();
    let b = claim(&j, "b").await;
    assert_eq!(
        j.hashed(b, SHA, stamp(), TTL).await.unwrap(),
        HashedAs::Hashed
    );
    // And prune drops it.
    j.prune(Duration::from_secs(3600), TTL).await.unwrap();
    let left: i64 = j
        .run(|conn| {
            conn.query_row("SELECT COUNT(*) FROM verdicts", [], |r| r.get(0))
                .map_err(|source| JournalError::Sqlite {
                    about: "test",
                    source,
                })
        })
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn a_scan_sent_again_after_an_ambiguous_failure_has_its_old_scan_id_deleted() {
    let (_d, j) = open();
    let a = claim(&j, "a").await;
    j.hashed(a, SHA, stamp(), Duration::ZERO).await.unwrap();
    j.submitting(a, dropscan::scanner::ScanId::parse("scan-old").unwrap())
        .await
        .unwrap();
    // A `submitting` scan the server does not list (or a broken connection): sent again.
    j.resend(a).await.unwrap();
    assert_eq!(j.get(a).await.unwrap().state, FileState::Hashed);
    assert_eq!(j.stale_scans().await.unwrap(), vec!["scan-old".to_string()]);
    // A file that changed during upload: the scan is deleted with the rehash.
    j.submitting(a, dropscan::scanner::ScanId::parse("scan-2").unwrap())
        .await
        .unwrap();
    j.rehash(a).await.unwrap();
    let r = j.get(a).await.unwrap();
    assert_eq!(r.state, FileState::Claimed);
    assert!(r.scan_id.is_none() && r.sha256.is_none() && r.outcome.is_none());
    assert_eq!(
        r.scan_ids.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        vec!["scan-old", "scan-2"]
    );
    let mut stale = j.stale_scans().await.unwrap();
    stale.sort();
    assert_eq!(stale, vec!["scan-2".to_string(), "scan-old".to_string()]);
}

#[tokio::test]
async fn a_claim_whose_hash_write_failed_is_found_by_the_stuck_claimed_sweep() {
    let (_d, j) = open();
    let a = claim(&j, "a").await;
    let b = claim(&j, "b").await;
    j.hashed(b, SHA, stamp(), Duration::ZERO).await.unwrap();
    let stuck: Vec<(FileId, PathBuf)> = j
        .stuck_claimed(Duration::ZERO)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.staged))
        .collect();
    assert_eq!(stuck, vec![(a, PathBuf::from("/in/.dropscan/a.staged"))]);
    assert!(
        j.stuck_claimed(Duration::from_secs(3600))
            .await
            .unwrap()
            .is_empty()
    );
}

/// One group commit of [claim "before", ROLLBACK, claim "after"]: a blocking operation holds the
/// journal thread while they are queued, in order, on a current-thread runtime. SQLite rolling
/// the transaction back on its own (disk full, I/O error) is simulated by the ROLLBACK.
#[tokio::test]
async fn a_batch_after_sqlite_rolled_back_reports_what_is_on_disk() {
    let (_d, j) = open();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let blocker = {
        let j = j.clone();
        tokio::spawn(async move {
            j.run(move |_| {
                started_tx.send(()).ok();
                release_rx.recv().ok();
                Ok(())
            })
            .await
        })
    };
    // The journal thread is inside the blocker's batch: what is queued now is the next batch.
    started_rx.await.unwrap();
    let spawn_claim = |name: &'static str| {
        let j = j.clone();
        tokio::spawn(async move {
            j.claim(vec![NewClaim {
                root: "/in".into(),
                rel_path: name.into(),
                staged: format!("/in/.dropscan/{name}").into(),
                dropped_at_ms: None,
                staging_folder: None,
            }])
            .await
        })
    };
    let before = spawn_claim("before");
    tokio::task::yield_now().await;
    // What SQLite does on SQLITE_FULL / SQLITE_IOERR: the whole transaction is rolled back.
    let rollback = {
        let j = j.clone();
        tokio::spawn(async move {
            j.run(|conn| {
                conn.execute_batch("ROLLBACK")
                    .map_err(|source| JournalError::Sqlite {
                        about: "test",
                        source,
                    })
            })
            .await
        })
    };
    tokio::task::yield_now().await;
    let after = spawn_claim("after");
    tokio::task::yield_now().await;
    release_tx.send(()).unwrap();
    let told = [
        ("before", before.await.unwrap().is_ok()),
        ("after", after.await.unwrap().is_ok()),
    ];
    let rolled_back = rollback.await.unwrap();
    assert!(
        rolled_back.is_err(),
        "an op whose transaction vanished is told so"
    );
    blocker.await.unwrap().ok();
    let on_disk = j.in_states(&[FileState::Claimed]).await.unwrap();
    for (name, ok) in told {
        let there = on_disk
            .iter()
            .any(|r| r.rel_path == std::path::Path::new(name));
        assert_eq!(ok, there, "{name}: told ok={ok}, on disk={there}");
    }
    // The op queued after the rollback ran in a fresh transaction and landed.
    assert!(told[1].1, "{told:?}");
    assert!(!told[0].1, "{told:?}");
    // The journal goes on working.
    claim(&j, "later").await;
}
