//! Unit tests of the sorter's decisions.

use super::*;
use crate::root::Which;

#[test]
fn placement_plans_fail_closed_and_copy_what_is_released() {
    use crate::journal::Outcome::{Clean, Failed, Quarantine, Vanished};
    // (outcome, clean verdict bound to the content) → (where, copy, file mode, folder mode, note)
    let table = [
        (Some(Clean), true, Which::Clean, true, 0o644, 0o755, false),
        (Some(Clean), false, Which::Failed, false, 0o640, 0o750, true),
        (
            Some(Quarantine),
            false,
            Which::Quarantine,
            true,
            0o600,
            0o700,
            false,
        ),
        (
            Some(Quarantine),
            true,
            Which::Quarantine,
            true,
            0o600,
            0o700,
            false,
        ),
        (
            Some(Failed),
            true,
            Which::Failed,
            false,
            0o640,
            0o750,
            false,
        ),
        (
            Some(Vanished),
            false,
            Which::Failed,
            false,
            0o640,
            0o750,
            false,
        ),
        (None, true, Which::Failed, false, 0o640, 0o750, false),
    ];
    for (outcome, bound, which, copy, file_mode, dir_mode, note) in table {
        let p = plan(outcome, bound);
        assert_eq!(
            (p.which, p.copy, p.file_mode, p.dir_mode, p.note.is_some()),
            (which, copy, file_mode, dir_mode, note),
            "{outcome:?} bound={bound}"
        );
        assert_eq!(p.clean, p.which == Which::Clean, "{outcome:?}");
    }
}

#[test]
fn the_queue_holds_each_record_once() {
    let mut q = Queue::default();
    for id in [1, 2, 1, 3, 2] {
        q.push(id);
    }
    assert_eq!(q.len(), 3);
    let mut id = || q.pop(|_| false).map(|w| single(w).0);
    assert_eq!((id(), id(), id(), id()), (Some(1), Some(2), Some(3), None));
    q.push(1);
    assert_eq!(q.pop(|_| false).map(|w| single(w).0), Some(1));
}

/// The work popped: one record (a batch is a test failure).
fn single(w: Work) -> (FileId, Option<Box<FileRecord>>) {
    match w {
        Work::One(id, rec) => (id, rec),
        Work::Batch(recs) => panic!("a batch of {}", recs.len()),
    }
}

/// Decided clean records of one watch, carried by their announcements, are popped as one
/// batch, in order; anything else (another watch, quarantine, no record carried, a record busy
/// now) is left in the queue, in order, for work of its own.
#[tokio::test]
async fn decided_clean_records_of_one_watch_are_popped_as_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let j = crate::journal::Journal::open(&dir.path().join("j.sqlite")).unwrap();
    let claims = [
        ("/in", "a"),
        ("/in", "b"),
        ("/other", "c"),
        ("/in", "d"),
        ("/in", "e"),
        ("/in", "f"),
        ("/in", "g"),
    ]
    .map(|(root, n)| crate::journal::NewClaim {
        root: root.into(),
        rel_path: n.into(),
        staged: format!("{root}/.dropscan/{n}.staged").into(),
        dropped_at_ms: None,
        staging_folder: None,
    })
    .to_vec();
    let ids = j.claim(claims).await.unwrap();
    let mut q = Queue::default();
    for (i, id) in ids.iter().enumerate() {
        let mut r = j.get(*id).await.unwrap();
        r.state = FileState::Decided;
        r.sha256 = Some([7; 32]);
        r.verdict_sha256 = r.sha256;
        r.outcome = Some(crate::journal::Outcome::Clean);
        r.verdict = Some(crate::journal::ScanVerdict::NotDetected);
        if i == 3 {
            r.outcome = Some(crate::journal::Outcome::Quarantine);
        }
        if i == 4 {
            q.push(*id);
            continue;
        }
        q.push_decided(*id, Some(Box::new(r)));
    }
    let busy = ids[5];
    let Some(Work::Batch(batch)) = q.pop(|id| id == busy) else {
        panic!("no batch");
    };
    let got: Vec<FileId> = batch.iter().map(|r| r.id).collect();
    assert_eq!(got, vec![ids[0], ids[1], ids[6]]);
    // The other watch's record is a batch of its own; the quarantined one and the one queued by
    // id go alone; the busy one is dropped when its turn comes (the sweep finds it again).
    let left: Vec<(bool, Vec<FileId>)> = std::iter::from_fn(|| {
        q.pop(|id| id == busy).map(|w| match w {
            Work::One(id, _) => (false, vec![id]),
            Work::Batch(recs) => (true, recs.iter().map(|r| r.id).collect()),
        })
    })
    .collect();
    assert_eq!(
        left,
        vec![
            (true, vec![ids[2]]),
            (false, vec![ids[3]]),
            (false, vec![ids[4]])
        ]
    );
}

/// A record carried by its announcement is placed from it; queued again by id (a retry, the
/// sweep) before its turn, it is read from the journal instead.
#[tokio::test]
async fn a_carried_record_is_dropped_when_the_record_is_queued_again_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let j = crate::journal::Journal::open(&dir.path().join("j.sqlite")).unwrap();
    let claims = ["a", "b"]
        .map(|n| crate::journal::NewClaim {
            root: "/in".into(),
            rel_path: n.into(),
            staged: format!("/in/.dropscan/{n}.staged").into(),
            dropped_at_ms: None,
            staging_folder: None,
        })
        .to_vec();
    let ids = j.claim(claims).await.unwrap();
    let (one, two) = (ids[0], ids[1]);
    let rec = |r: crate::journal::FileRecord| Some(Box::new(r));
    let mut q = Queue::default();
    q.push_decided(one, rec(j.get(one).await.unwrap()));
    q.push_decided(two, rec(j.get(two).await.unwrap()));
    q.push(two);
    assert_eq!(q.len(), 2);
    let (a, b) = (
        single(q.pop(|_| false).unwrap()),
        single(q.pop(|_| false).unwrap()),
    );
    assert_eq!((a.0, a.1.map(|r| r.id)), (one, Some(one)));
    assert_eq!((b.0, b.1.is_some()), (two, false));
}

/// Issue 21: a panic in a blocking task was turned into text (an I/O error in the sorter, a
/// "changed" file in hashing); the `JoinError` is kept as the error's source.
#[tokio::test]
async fn a_panicked_blocking_task_keeps_its_join_error() {
    let e = crate::fsops::blocking(|| -> Result<(), crate::fsops::FsError> { panic!("boom") })
        .await
        .unwrap_err();
    let source = std::error::Error::source(&e).expect("a source");
    let join = source
        .downcast_ref::<tokio::task::JoinError>()
        .expect("the JoinError itself");
    assert!(join.is_panic());
}

#[test]
fn a_placement_resumes_where_its_target_was_chosen() {
    use std::path::{Path, PathBuf};
    let now = Path::new("/srv/clean");
    let p = PathBuf::from;
    let cases = [
        // Not yet placing, or no target journaled: a fresh name.
        (FileState::Decided, None, None, Resume::Fresh),
        (
            FileState::Decided,
            Some("/srv/clean/a"),
            None,
            Resume::Fresh,
        ),
        (FileState::Placing, None, Some("/srv/clean"), Resume::Fresh),
        // Chosen in the folder configured now, journaled with it or found beneath it.
        (
            FileState::Placing,
            Some("/srv/clean/d/a (1)"),
            Some("/srv/clean"),
            Resume::Here {
                rel: Some(p("d/a (1)")),
            },
        ),
        (
            FileState::Placing,
            Some("/srv/clean/a"),
            None,
            Resume::Here { rel: Some(p("a")) },
        ),
        // Journaled with a folder that does not hold it: no target, a fresh name there.
        (
            FileState::Placing,
            Some("/elsewhere/a"),
            Some("/srv/clean"),
            Resume::Here { rel: None },
        ),
        // Chosen in a folder configured then.
        (
            FileState::Placing,
            Some("/old/clean/a"),
            Some("/old/clean"),
            Resume::Elsewhere {
                root: p("/old/clean"),
                dest: p("/old/clean/a"),
                rel: Some(p("a")),
            },
        ),
        // Neither journaled with a folder nor beneath the one configured now.
        (
            FileState::Placing,
            Some("/old/clean/a"),
            None,
            Resume::Outside {
                dest: p("/old/clean/a"),
            },
        ),
        // A path that only shares a prefix of characters is not beneath the folder.
        (
            FileState::Placing,
            Some("/srv/cleaner/a"),
            None,
            Resume::Outside {
                dest: p("/srv/cleaner/a"),
            },
        ),
    ];
    for (state, dest, dest_root, want) in cases {
        let got = resume(state, dest.map(Path::new), dest_root.map(Path::new), now);
        assert_eq!(got, want, "{state:?} {dest:?} {dest_root:?}");
    }
}

#[test]
fn a_failed_move_is_retried_rechosen_rescanned_or_sent_back_by_its_error() {
    use crate::fsops::FsError;
    use std::path::PathBuf;
    let path = || PathBuf::from("/srv/clean/a");
    let errno = |n| std::io::Error::from_raw_os_error(n);
    let busy = || FsError::Busy { path: path() };
    let linked = || FsError::HardLinked {
        path: path(),
        nlink: 2,
    };
    let unreadable = || FsError::Unreadable {
        path: path(),
        source: errno(libc::EACCES),
    };
    let exists = || FsError::io(&path(), "rename", errno(libc::EEXIST));
    let folder_gone = || FsError::Io {
        path: path(),
        about: "open",
        source: errno(libc::ENOENT),
    };
    let vanished = || FsError::io(&path(), "open", errno(libc::ENOENT));
    let changed = || FsError::Changed {
        path: path(),
        detail: String::new(),
    };
    let full = || FsError::io(&path(), "write", errno(libc::ENOSPC));
    let denied = || FsError::io(&path(), "write", errno(libc::EACCES));
    use AfterFailure::{BackToInbox, Busy, ChooseAgain, Move, Rescan, Vanished};
    // (error, copy, clean) → what it means
    let cases: [(FsError, bool, bool, AfterFailure); 16] = [
        (busy(), true, true, Busy),
        (busy(), false, false, Busy),
        // Only what is not copied goes back unread: a copy that cannot read is a failed move.
        (linked(), false, false, BackToInbox),
        (unreadable(), false, false, BackToInbox),
        (linked(), true, false, Move),
        (unreadable(), true, true, Move),
        (exists(), true, true, ChooseAgain),
        (exists(), false, false, ChooseAgain),
        (folder_gone(), true, false, ChooseAgain),
        (vanished(), true, true, Vanished),
        (vanished(), false, false, Vanished),
        // Only a release is scanned again; quarantine and failed keep what they have.
        (changed(), true, true, Rescan),
        (changed(), true, false, Move),
        (changed(), false, false, Move),
        (full(), true, true, Move),
        (denied(), false, false, Move),
    ];
    for (e, copy, clean, want) in cases {
        assert_eq!(
            after_failure(&e, copy, clean),
            want,
            "{e} copy={copy} clean={clean}"
        );
    }
}
