//! Unit tests of the journal: the state machine, twins, group-commit rollback, the verdict TTL
//! and the transition table, the tools' custody.

use std::path::PathBuf;
use std::time::Duration;

use super::ops_claim::{REHASH_FROM, verdict_reusable};
use super::ops_decide::DECIDE_FROM;
use super::ops_place::VANISH_FROM;
use super::*;

fn stamp(size: u64) -> Stamp {
    Stamp {
        size,
        mtime_ns: 1,
        ctime_ns: 2,
        dev: 3,
        ino: 4,
    }
}

async fn claim_one(j: &Journal, name: &str) -> FileId {
    j.claim(vec![NewClaim {
        root: "/in".into(),
        rel_path: name.into(),
        staged: format!("/in/.dropscan/{name}").into(),
        dropped_at_ms: None,
        staging_folder: None,
    }])
    .await
    .unwrap()[0]
}

#[tokio::test]
async fn state_machine_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
    let a = claim_one(&j, "a").await;
    let b = claim_one(&j, "b").await;
    let sha = [7u8; 32];
    assert_eq!(
        j.hashed(a, sha, stamp(5), Duration::from_secs(60))
            .await
            .unwrap(),
        HashedAs::Hashed
    );
    assert_eq!(
        j.hashed(b, sha, stamp(5), Duration::from_secs(60))
            .await
            .unwrap(),
        HashedAs::Waiting
    );
    j.submitting(a, crate::scanner::ScanId::parse("s1").unwrap())
        .await
        .unwrap();
    j.submitted(a).await.unwrap();
    let decided = j
        .decide(vec![(
            a,
            Decision::from_verdict(ScanVerdict::NotDetected, sha),
        )])
        .await
        .unwrap();
    assert_eq!(decided, vec![a, b]);
    let rb = j.get(b).await.unwrap();
    assert_eq!(rb.outcome, Some(Outcome::Clean));
    assert!(rb.reused);
    // A third identical file reuses the cached verdict.
    let c = claim_one(&j, "c").await;
    assert_eq!(
        j.hashed(c, sha, stamp(5), Duration::from_secs(60))
            .await
            .unwrap(),
        HashedAs::Reused(Outcome::Clean)
    );
    // With reuse disabled it is uploaded.
    let d = claim_one(&j, "d").await;
    assert_eq!(
        j.hashed(d, sha, stamp(5), Duration::ZERO).await.unwrap(),
        HashedAs::Hashed
    );
}

#[tokio::test]
async fn a_waiting_twin_whose_primary_changed_is_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
    let a = claim_one(&j, "a").await;
    let b = claim_one(&j, "b").await;
    let c = claim_one(&j, "c").await;
    let sha = [3u8; 32];
    for id in [a, b, c] {
        j.hashed(id, sha, stamp(1), Duration::ZERO).await.unwrap();
    }
    assert_eq!(j.promote_orphaned_waiting().await.unwrap(), 0);
    // The primary's file changed: it is hashed again, the twins lose their primary.
    j.rehash(a).await.unwrap();
    assert_eq!(j.promote_orphaned_waiting().await.unwrap(), 1);
    assert_eq!(j.get(b).await.unwrap().state, FileState::Hashed);
    assert_eq!(j.get(c).await.unwrap().state, FileState::Waiting);
}

#[tokio::test]
async fn local_failure_hands_over_to_a_waiting_twin() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
    let a = claim_one(&j, "a").await;
    let b = claim_one(&j, "b").await;
    let sha = [1u8; 32];
    j.hashed(a, sha, stamp(1), Duration::ZERO).await.unwrap();
    j.hashed(b, sha, stamp(1), Duration::ZERO).await.unwrap();
    let decided = j
        .decide(vec![(
            a,
            Decision::failed(&std::io::Error::other("unreadable"), false),
        )])
        .await
        .unwrap();
    assert_eq!(decided, vec![a]);
    assert_eq!(j.get(b).await.unwrap().state, FileState::Hashed);
}

#[tokio::test]
async fn a_failing_operation_rolls_back_alone() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
    let a = claim_one(&j, "a").await;
    // submitting on a claimed record is refused; the record is unchanged.
    let err = j
        .submitting(a, crate::scanner::ScanId::parse("x").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, JournalError::Conflict { .. }), "{err}");
    assert_eq!(j.get(a).await.unwrap().state, FileState::Claimed);
    // Concurrent operations in one group commit all land.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200 {
        let j = j.clone();
        set.spawn(async move { claim_one(&j, &format!("f{i}")).await });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let s = j.summary().await.unwrap();
    assert_eq!(s.per_state, vec![("claimed".to_string(), 201)]);
}

#[test]
fn a_verdict_ttl_fails_closed_against_clock_jumps() {
    let ttl = Duration::from_secs(60);
    assert!(verdict_reusable(1_000, 1_000, ttl));
    assert!(verdict_reusable(1_000, 61_000, ttl));
    assert!(!verdict_reusable(1_000, 61_001, ttl));
    // Decided "in the future": the clock went back; never reused.
    assert!(!verdict_reusable(2_000, 1_000, ttl));
    assert!(!verdict_reusable(1_000, 1_000, Duration::ZERO));
}

#[test]
fn the_transition_table_matches_every_operation() {
    for (from, to) in [
        (&DECIDE_FROM[..], FileState::Decided),
        (&REHASH_FROM[..], FileState::Claimed),
        (&VANISH_FROM[..], FileState::Done),
    ] {
        for s in from {
            assert!(s.can_become(to), "{s:?} -> {to:?}");
        }
    }
    for s in FileState::ALL {
        assert!(!s.can_become(FileState::Claimed) || REHASH_FROM.contains(&s));
    }
}

#[tokio::test]
async fn survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.sqlite");
    let a;
    {
        let j = Journal::open(&path).unwrap();
        a = claim_one(&j, "ä/b c").await;
        j.hashed(a, [2; 32], stamp(9), Duration::ZERO)
            .await
            .unwrap();
        j.submitting(a, crate::scanner::ScanId::parse("scan1").unwrap())
            .await
            .unwrap();
    }
    let j = Journal::open(&path).unwrap();
    let r = j.get(a).await.unwrap();
    assert_eq!(r.state, FileState::Submitting);
    assert_eq!(r.scan_id.as_ref().map(|s| s.as_str()), Some("scan1"));
    assert_eq!(r.rel_path, PathBuf::from("ä/b c"));
    assert_eq!(r.stamp, Some(stamp(9)));
    let summary = read_summary(&path).unwrap();
    assert_eq!(summary.oldest_pending.unwrap().0, PathBuf::from("ä/b c"));
}

/// Review finding (by reading): hook retry times are wall-clock milliseconds, so a clock stepped
/// back by hours delayed every queued notification by that much. A retry time further ahead
/// than any backoff is ever scheduled is due now.
#[tokio::test]
async fn hook_retries_are_due_after_the_wall_clock_stepped_back_by_hours() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
    let hours_ahead = now_ms() + 5 * 3600 * 1000;
    let soon = now_ms() + 60 * 1000;
    j.run(move |conn| {
        for (event, at) in [("stepped", hours_ahead), ("backing-off", soon)] {
            schema::execute(
                conn,
                "INSERT INTO hook_events (hook, file_id, event, next_at, created_at) \
                 VALUES ('h', NULL, ?1, ?2, ?2)",
                rusqlite::params![event, at],
                "test",
            )?;
        }
        Ok(())
    })
    .await
    .unwrap();
    let due = j.hook_due(10, vec!["h".into()]).await.unwrap();
    let events: Vec<&str> = due.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events, vec!["stepped"], "a retry in a minute still waits");
}

#[tokio::test]
async fn custody_left_busy_comes_back_interrupted_with_its_plan_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
    let a = claim_one(&j, "a").await;
    j.decide(vec![(
        a,
        Decision::failed(&crate::error::FileError::RefusedTooLarge { size: 9 }, false),
    )])
    .await
    .unwrap();
    j.placing(a, "/out/failed/a".into()).await.unwrap();
    j.placed(a).await.unwrap();
    let c = j.take_custody(a, Outcome::Failed, "retry").await.unwrap();
    assert!(c.interrupted.is_none());
    let plan = CustodyPlan {
        action: "retry".into(),
        to_root: "/in".into(),
        target: PathBuf::from("sub/a"),
        user: "someone".into(),
        reason: Some("limit raised".into()),
        at_ms: 1,
    };
    j.plan_custody(a, plan.clone()).await.unwrap();
    // That run is gone (the caller holds the entry's lock): the next one is told at once,
    // whatever the age of the custody, and gets the plan.
    let c = j.take_custody(a, Outcome::Failed, "purge").await.unwrap();
    let i = c.interrupted.unwrap();
    assert_eq!(i.action, "retry");
    assert_eq!(i.plan, Some(plan));
    let done = AuditEntry {
        id: 0,
        at_ms: 2,
        user: "someone".into(),
        action: "retry".into(),
        file_id: Some(a),
        reason: None,
        detail: serde_json::json!({}),
    };
    j.end_custody(a, Some("retried"), done).await.unwrap();
    assert!(j.kept(Outcome::Failed, false).await.unwrap().is_empty());
    let refused = j.take_custody(a, Outcome::Failed, "retry").await;
    assert!(
        matches!(refused, Err(JournalError::Conflict { ref detail, .. }) if detail.contains("retried")),
        "{refused:?}"
    );
}

/// A journal written before the `dest_root` and staging-folder columns opens, its records read
/// back without them, and new claims keep the staging folder's (dev, ino), the largest values
/// included (stored as SQLite's signed integers).
#[tokio::test]
async fn an_older_journal_gains_the_new_columns_and_keeps_the_staging_folder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.sqlite");
    drop(Journal::open(&path).unwrap());
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        for column in ["dest_root", "staging_dev", "staging_ino"] {
            conn.execute_batch(&format!("ALTER TABLE files DROP COLUMN {column}"))
                .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO files (root, rel_path, staged, state, claimed_at, updated_at) \
             VALUES (x'2f696e', x'6f6c64', x'2f696e2f2e64726f707363616e2f6f6c64', 'claimed', 1, 1)",
        )
        .unwrap();
    }
    let j = Journal::open(&path).unwrap();
    let old = j.stuck_claimed(Duration::ZERO).await.unwrap();
    assert_eq!(old.len(), 1);
    assert_eq!(old[0].staging_folder, None);
    assert_eq!(old[0].dest_root, None);
    let id = j
        .claim(vec![NewClaim {
            root: "/in".into(),
            rel_path: "new".into(),
            staged: "/in/.dropscan/new".into(),
            dropped_at_ms: None,
            staging_folder: Some((u64::MAX, 42)),
        }])
        .await
        .unwrap()[0];
    assert_eq!(
        j.get(id).await.unwrap().staging_folder,
        Some((u64::MAX, 42))
    );
}

/// `hashed_many` answers each file as `hashed` would, in order, twins within the batch
/// included; a record it refuses (not `claimed`) is answered alone and changes nothing.
#[tokio::test]
async fn hashes_of_a_batch_are_one_operation_each_answered_alone() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
    let (a, b, c) = (
        claim_one(&j, "a").await,
        claim_one(&j, "b").await,
        claim_one(&j, "c").await,
    );
    j.hashed(c, [1; 32], stamp(1), Duration::ZERO)
        .await
        .unwrap();
    let answers = j
        .hashed_many(
            vec![
                (a, [7; 32], stamp(5)),
                (c, [9; 32], stamp(9)),
                (b, [7; 32], stamp(5)),
            ],
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert!(matches!(answers[0], Ok(HashedAs::Hashed)), "{answers:?}");
    assert!(
        matches!(answers[1], Err(JournalError::Conflict { .. })),
        "{answers:?}"
    );
    assert!(matches!(answers[2], Ok(HashedAs::Waiting)), "{answers:?}");
    let rc = j.get(c).await.unwrap();
    assert_eq!((rc.state, rc.sha256), (FileState::Hashed, Some([1; 32])));
    assert_eq!(j.get(b).await.unwrap().state, FileState::Waiting);
}
