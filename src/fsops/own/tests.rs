//! Owning: the copy replaces the staged file, leases and writers, crash leftovers; the
//! decisions on the stamps after a copy and on the original, as tables.

use super::*;
use std::fs::OpenOptions;

#[test]
fn what_the_stamps_after_the_copy_say() {
    let before = FileStamp {
        dev: 1,
        ino: 2,
        size: 10,
        mtime_ns: 100,
        ctime_ns: 100,
        nlink: 1,
        mode: 0o100_644,
        uid: 0,
    };
    let grown = FileStamp { size: 12, ..before };
    let touched = FileStamp {
        mtime_ns: 200,
        ..before
    };
    let chmodded = FileStamp {
        ctime_ns: 200,
        mode: 0o100_600,
        ..before
    };
    let cases = [
        (before, 10, false, AfterCopy::Same),
        (before, 10, true, AfterCopy::Same),
        // Fewer bytes read than the size says: truncated and grown back meanwhile.
        (before, 8, false, AfterCopy::Retry),
        (before, 8, true, AfterCopy::StillWritten),
        (grown, 12, false, AfterCopy::StillWritten),
        (grown, 12, true, AfterCopy::StillWritten),
        (touched, 10, false, AfterCopy::StillWritten),
        (chmodded, 10, false, AfterCopy::Retry),
        (chmodded, 10, true, AfterCopy::StillWritten),
    ];
    for (after, bytes, leased, want) in cases {
        assert_eq!(
            after_copy(&before, &after, bytes, leased),
            want,
            "{after:?} {bytes} leased={leased}"
        );
    }
}

#[test]
fn what_becomes_of_the_original() {
    let cases = [
        (Some(true), false, Original::StillWritten),
        (Some(true), true, Original::StillWritten),
        (Some(false), false, Original::Drop),
        (Some(false), true, Original::Keep),
        (None, false, Original::Keep),
        (None, true, Original::Keep),
    ];
    for (breaking, keep_always, want) in cases {
        assert_eq!(
            original(breaking, keep_always),
            want,
            "{breaking:?} {keep_always}"
        );
    }
}

fn staging() -> (tempfile::TempDir, Dir) {
    let d = tempfile::tempdir().unwrap();
    let dir = Dir::open_trusted(d.path()).unwrap();
    (d, dir)
}

#[test]
fn the_staged_name_becomes_a_private_copy_with_the_same_bytes_and_the_original_goes() {
    let (d, dir) = staging();
    let p = d.path().join("a.staged");
    std::fs::write(&p, b"the user's bytes").unwrap();
    let before = std::fs::metadata(&p).unwrap();
    let owned = own(&dir, OsStr::new("a.staged"), true, false).unwrap();
    let after = std::fs::metadata(&p).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_ne!(before.ino(), after.ino(), "a new inode");
    assert_eq!(after.mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(&p).unwrap(), b"the user's bytes");
    assert_eq!(
        owned.sha256,
        <[u8; 32]>::from(sha2::Sha256::digest(b"the user's bytes"))
    );
    assert_eq!(owned.stamp.ino, after.ino());
    assert!(owned.kept.is_none() && owned.no_lease.is_none());
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![OsString::from("a.staged")],
        "no copy or original left"
    );
}

use sha2::Digest;

#[test]
fn a_writer_still_holding_the_staged_file_is_detected_and_nothing_changes() {
    let (d, dir) = staging();
    let p = d.path().join("a.staged");
    std::fs::write(&p, b"first half").unwrap();
    let mut writer = OpenOptions::new().append(true).open(&p).unwrap();
    assert!(matches!(
        own(&dir, OsStr::new("a.staged"), true, false),
        Err(Owning::StillWritten)
    ));
    // The writer's later bytes land in the file, which is still there under its name.
    writer.write_all(b", second half").unwrap();
    drop(writer);
    assert_eq!(std::fs::read(&p).unwrap(), b"first half, second half");
    assert!(!d.path().join("a.copy").exists());
}

/// Found by the kill-point test: the original was stamped before its rename to `X.orig`,
/// and a rename moves ctime, so the sweep took every kept original for changed by a late
/// writer and sent it back to the inbox (scanned again, kept again, for ever).
#[test]
fn a_kept_original_is_stamped_after_its_rename_so_an_unchanged_one_is_not_sent_back() {
    let (d, dir) = staging();
    std::fs::write(d.path().join("a.staged"), b"original").unwrap();
    let owned = own(&dir, OsStr::new("a.staged"), false, false).unwrap();
    let kept = owned.kept.expect("without leases the original is kept");
    assert_eq!(kept.name, "a.orig");
    let now = FileStamp::of(&std::fs::metadata(d.path().join("a.orig")).unwrap());
    assert!(
        super::super::same_file(&kept.stamp, &now.stamp()),
        "{kept:?} vs {now:?}"
    );
    assert_eq!(
        std::fs::read(d.path().join("a.staged")).unwrap(),
        b"original"
    );
}

#[test]
fn repair_puts_a_kept_original_back_and_removes_a_partial_copy() {
    let (d, dir) = staging();
    std::fs::write(d.path().join("a.orig"), b"orig").unwrap();
    std::fs::write(d.path().join("a.copy"), b"or").unwrap();
    assert!(repair(&dir, OsStr::new("a.staged")).unwrap());
    assert_eq!(std::fs::read(d.path().join("a.staged")).unwrap(), b"orig");
    assert!(!d.path().join("a.copy").exists());
    assert!(!d.path().join("a.orig").exists());
}

/// Found by the kill-point test (lease off, killed after the hash's renames but before its
/// result was journaled): the record was owned again, and renaming our copy `X.staged` to
/// `X.orig` met the kept original there: "exists already", and the file went to failed.
#[test]
fn an_original_kept_before_a_crash_takes_its_staged_name_back_from_our_copy() {
    let (d, dir) = staging();
    std::fs::write(d.path().join("a.orig"), b"the user's inode").unwrap();
    std::fs::write(d.path().join("a.staged"), b"our copy").unwrap();
    assert!(repair(&dir, OsStr::new("a.staged")).unwrap());
    assert_eq!(
        std::fs::read(d.path().join("a.staged")).unwrap(),
        b"the user's inode"
    );
    assert!(!d.path().join("a.orig").exists());
    let owned = own(&dir, OsStr::new("a.staged"), false, false).unwrap();
    assert_eq!(owned.kept.unwrap().name, "a.orig");
}

/// Review finding: without a lease (a client mount, `lease_check = "off"`, a file taken
/// after `held_open_limit`), a writer that paused longer than `settle` and resumes while the
/// hash copies its file made every copy "changed": after three tries the file was *failed*.
/// It went to the failed folder with the writer still at it (and where that folder is on
/// another filesystem, the staged inode is copied and unlinked: what the writer wrote next
/// went into a deleted inode). A writer at work is what the inbox is for: it is given back.
#[test]
fn a_writer_resuming_during_a_copy_without_a_lease_is_given_back_not_failed() {
    let (d, dir) = staging();
    let p = d.path().join("a.staged");
    std::fs::write(&p, vec![7u8; 8 << 20]).unwrap();
    let mut writer = OpenOptions::new().append(true).open(&p).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = std::sync::Arc::clone(&stop);
    let t = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            writer.write_all(&[1u8; 512]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    });
    let r = own(&dir, OsStr::new("a.staged"), false, false);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    t.join().unwrap();
    assert!(matches!(r, Err(Owning::StillWritten)), "{r:?}");
    assert!(p.exists(), "the user's inode keeps its staged name");
    assert!(!d.path().join("a.copy").exists());
    assert!(!d.path().join("a.orig").exists());
}

/// Review finding: a record owned again while its kept original is still there (the
/// stuck-claim sweep after the journal refused the hash's result, or a rescan) met `X.orig`
/// on the rename and failed "exists already": the file went to failed unscanned. The
/// staged file is then our copy already, and the kept original stays as it was journaled.
#[test]
fn owning_again_beside_a_kept_original_keeps_it_and_does_not_fail() {
    let (d, dir) = staging();
    std::fs::write(d.path().join("a.staged"), b"the user's bytes").unwrap();
    let first = own(&dir, OsStr::new("a.staged"), false, false).unwrap();
    assert!(first.kept.is_some());
    let again = own(&dir, OsStr::new("a.staged"), false, false);
    let again = again.unwrap_or_else(|e| panic!("owned again: {e:?}"));
    assert_eq!(again.sha256, first.sha256);
    assert_eq!(
        std::fs::read(d.path().join("a.orig")).unwrap(),
        b"the user's bytes",
        "the kept original is untouched"
    );
    assert!(!d.path().join("a.copy").exists());
}

#[test]
fn names_of_copies_and_originals() {
    assert_eq!(copy_name(OsStr::new("u.staged")), "u.copy");
    assert_eq!(orig_name(OsStr::new("u.staged")), "u.orig");
    assert_eq!(
        staged_name_of(OsStr::new("u.orig")),
        Some(OsString::from("u.staged"))
    );
    assert_eq!(staged_name_of(OsStr::new("u.staged")), None);
}
