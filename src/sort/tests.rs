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
    assert_eq!(
        (q.pop(), q.pop(), q.pop(), q.pop()),
        (Some(1), Some(2), Some(3), None)
    );
    q.push(1);
    assert_eq!(q.pop(), Some(1));
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
