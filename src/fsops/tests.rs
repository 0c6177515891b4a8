//! Unit tests of the filesystem layer: real files in temp dirs, each attack a test named after it.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::claim::{Claim, claim};
use super::names::{NAME_MAX, Temp, TempOf, copy_temp_name, numbered, sidecar_name};
use super::place::{
    Placed, Release, free_name, leftover_temps, place, remove_temp, return_to_inbox, take_back,
    write_sidecar,
};
use super::*;

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn dir(p: &Path) -> Dir {
    std::fs::create_dir_all(p).unwrap();
    Dir::open_trusted(p).unwrap()
}

/// Stages `content` as `name` in `staging` and returns the stamp it would be hashed with.
fn stage(staging: &Path, name: &str, content: &[u8]) -> Stamp {
    let p = staging.join(name);
    std::fs::write(&p, content).unwrap();
    FileStamp::of(&std::fs::symlink_metadata(&p).unwrap()).stamp()
}

fn release<'a>(
    staging: &'a Dir,
    name: &'a OsStr,
    hashed: Stamp,
    content: &[u8],
    dest: &'a Dir,
    target: &'a Path,
    temp: &'a OsStr,
) -> Release<'a> {
    Release {
        staging,
        staged_name: name,
        hashed: Some(hashed),
        sha256: Some(sha(content)),
        dest_root: dest,
        target,
        file_mode: 0o644,
        copy: true,
        clean: true,
        temp_name: temp,
        own_copy: None,
    }
}

#[test]
fn safe_relative_never_climbs() {
    assert_eq!(
        safe_relative(Path::new("../../etc/passwd")),
        PathBuf::from("_../_../etc/passwd")
    );
    assert_eq!(safe_relative(Path::new("/abs/x")), PathBuf::from("abs/x"));
    assert_eq!(safe_relative(Path::new("./a/./b")), PathBuf::from("a/b"));
    assert_eq!(safe_relative(Path::new("")), PathBuf::from("_"));
}

proptest::proptest! {
    /// Whatever the user's names, the joined path stays under the destination.
    #[test]
    fn safe_relative_always_stays_inside(parts in proptest::collection::vec(
        proptest::prop_oneof![
            proptest::strategy::Just(b"..".to_vec()),
            proptest::strategy::Just(b".".to_vec()),
            proptest::strategy::Just(b"/".to_vec()),
            proptest::strategy::Just(Vec::new()),
            proptest::collection::vec(1u8..=255, 1..12),
        ],
        0..8,
    )) {
        let mut raw = Vec::new();
        for p in &parts {
            raw.extend_from_slice(p);
            raw.push(b'/');
        }
        let rel = PathBuf::from(OsString::from_vec(raw));
        let dest = Path::new("/dest");
        let joined = dest.join(safe_relative(&rel));
        proptest::prop_assert!(joined.starts_with(dest));
        proptest::prop_assert!(joined != dest);
        proptest::prop_assert!(!joined.components().any(|c| matches!(c, Component::ParentDir)));
    }
}

#[test]
fn names_like_ours_are_neutralised() {
    assert_eq!(
        safe_relative(Path::new("a/x.dropscan-partial")),
        PathBuf::from("a/x.dropscan-partial_")
    );
    assert_eq!(
        safe_relative(Path::new("y.pdf.dropscan.json")),
        PathBuf::from("y.pdf.dropscan.json_")
    );
}

#[test]
fn a_legal_name_of_201_to_255_bytes_is_kept_exactly_and_only_the_sidecar_is_shortened() {
    for len in [201usize, 240, 255] {
        let name = format!("{}.pdf", "a".repeat(len - 4));
        assert_eq!(safe_relative(Path::new(&name)), PathBuf::from(&name));
        let side = sidecar_name(OsStr::new(&name));
        assert!(side.len() <= NAME_MAX, "{}", side.len());
        assert!(side.to_string_lossy().ends_with(".pdf.dropscan.json"));
        let n = numbered(OsStr::new(&name), 12);
        assert!(n.len() <= NAME_MAX);
        assert!(n.to_string_lossy().ends_with(" (12).pdf"));
    }
    // And through a real placement into a folder.
    let d = tempfile::tempdir().unwrap();
    let staging = dir(&d.path().join("s"));
    let dest = dir(&d.path().join("clean"));
    let name = format!("{}.txt", "ä".repeat(125)); // 254 bytes
    let hashed = stage(staging.path(), "f.staged", b"x");
    let target = free_name(&dest, Path::new(&name), 0o755).unwrap();
    assert_eq!(target, PathBuf::from(&name));
    let temp = temp_for("t", 1);
    place(&release(
        &staging,
        OsStr::new("f.staged"),
        hashed,
        b"x",
        &dest,
        &target,
        &temp,
    ))
    .unwrap();
    assert_eq!(
        std::fs::read(d.path().join("clean").join(&name)).unwrap(),
        b"x"
    );
}

#[test]
fn file_names_with_newline_cr_or_esc_are_escaped_in_logs() {
    let p = PathBuf::from(OsString::from_vec(
        b"a\nforged line\r\x1b[31mred\t\\ \xff.txt".to_vec(),
    ));
    let s = shown(&p).to_string();
    assert_eq!(s, "a\\nforged line\\r\\u{1b}[31mred\\t\\\\ \\xff.txt");
    assert!(!s.chars().any(char::is_control));
}

#[test]
fn numbered_keeps_the_extension() {
    assert_eq!(
        numbered(OsStr::new("report.txt"), 1),
        OsString::from("report (1).txt")
    );
    assert_eq!(
        numbered(OsStr::new("archive.tar.gz"), 2),
        OsString::from("archive.tar (2).gz")
    );
    assert_eq!(
        numbered(OsStr::new("README"), 3),
        OsString::from("README (3)")
    );
    assert_eq!(
        numbered(OsStr::new(".bashrc"), 1),
        OsString::from(".bashrc (1)")
    );
}

#[test]
fn open_file_refuses_symlinks_fifos_and_dirs() {
    let d = tempfile::tempdir().unwrap();
    let root = dir(d.path());
    std::fs::write(d.path().join("f"), b"x").unwrap();
    assert!(root.open_file(OsStr::new("f")).is_ok());
    std::os::unix::fs::symlink(d.path().join("f"), d.path().join("l")).unwrap();
    assert!(matches!(
        root.open_file(OsStr::new("l")),
        Err(FsError::NotRegular {
            kind: "symlink",
            ..
        })
    ));
    std::fs::create_dir(d.path().join("sub")).unwrap();
    assert!(matches!(
        root.open_file(OsStr::new("sub")),
        Err(FsError::NotRegular {
            kind: "directory",
            ..
        })
    ));
    assert!(
        std::process::Command::new("mkfifo")
            .arg(d.path().join("p"))
            .status()
            .unwrap()
            .success()
    );
    assert!(matches!(
        root.open_file(OsStr::new("p")),
        Err(FsError::NotRegular { kind: "fifo", .. })
    ));
    assert!(
        root.open_file(OsStr::new("nope"))
            .unwrap_err()
            .is_vanished()
    );
    assert!(matches!(
        root.open_file(OsStr::new("../f")),
        Err(FsError::NotBeneath { .. })
    ));
}

#[test]
fn folders_beneath_a_root_are_never_reached_through_a_symlink_with_or_without_openat2() {
    let d = tempfile::tempdir().unwrap();
    let outside = d.path().join("outside");
    std::fs::create_dir_all(outside.join("deep")).unwrap();
    let root = dir(&d.path().join("root"));
    std::fs::create_dir_all(d.path().join("root/real")).unwrap();
    std::os::unix::fs::symlink(&outside, d.path().join("root/link")).unwrap();
    std::os::unix::fs::symlink(&outside, d.path().join("root/real/inner")).unwrap();
    for rel in ["link", "link/deep", "real/inner", "real/inner/deep"] {
        assert!(
            matches!(
                root.open_dir(Path::new(rel)),
                Err(FsError::NotRegular { .. })
            ),
            "{rel}"
        );
        assert!(root.walk_for_test(Path::new(rel)).is_err(), "walk: {rel}");
    }
    assert!(root.open_dir(Path::new("real")).is_ok());
    assert!(root.walk_for_test(Path::new("real")).is_ok());
    assert!(matches!(
        root.open_dir(Path::new("../outside")),
        Err(FsError::NotBeneath { .. })
    ));
    // create_dirs neither follows nor replaces.
    assert!(root.create_dirs(Path::new("link/new"), 0o700).is_err());
    assert!(!outside.join("new").exists());
}

#[test]
fn rename_never_replaces() {
    let d = tempfile::tempdir().unwrap();
    let root = dir(d.path());
    std::fs::write(d.path().join("a"), b"new").unwrap();
    std::fs::write(d.path().join("b"), b"old").unwrap();
    let e = rename_noreplace(&root, OsStr::new("a"), &root, OsStr::new("b")).unwrap_err();
    assert!(e.is_already_exists());
    assert_eq!(std::fs::read(d.path().join("b")).unwrap(), b"old");
    let e = rename_noreplace(&root, OsStr::new("gone"), &root, OsStr::new("c")).unwrap_err();
    assert!(e.is_vanished());
}

#[test]
fn a_subfolder_swapped_for_a_symlink_between_settle_and_claim_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let inbox = dir(&d.path().join("inbox"));
    let staging = dir(&d.path().join("inbox/.dropscan/t"));
    std::fs::create_dir_all(d.path().join("inbox/sub")).unwrap();
    std::fs::write(d.path().join("inbox/sub/f.txt"), b"user").unwrap();
    let settled =
        FileStamp::of(&std::fs::metadata(d.path().join("inbox/sub/f.txt")).unwrap()).stamp();
    // The user swaps `sub` for a symlink to a folder outside holding a same-named file.
    let outside = d.path().join("secret");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("f.txt"), b"secret").unwrap();
    #[allow(clippy::disallowed_methods)]
    std::fs::rename(d.path().join("inbox/sub"), d.path().join("inbox/sub-old")).unwrap();
    std::os::unix::fs::symlink(&outside, d.path().join("inbox/sub")).unwrap();
    let r = claim(
        &inbox,
        Path::new("sub/f.txt"),
        &settled,
        &staging,
        OsStr::new("x.staged"),
        true,
    );
    assert!(r.is_err(), "{r:?}");
    assert_eq!(std::fs::read(outside.join("f.txt")).unwrap(), b"secret");
    assert!(!d.path().join("inbox/.dropscan/t/x.staged").exists());
    // The real file claims normally from where it is.
    let r = claim(
        &inbox,
        Path::new("sub-old/f.txt"),
        &settled,
        &staging,
        OsStr::new("x.staged"),
        true,
    );
    assert_eq!(r.unwrap(), Claim::Claimed(Renamed::Durable));
}

#[test]
fn a_file_changed_since_it_settled_is_not_claimed() {
    let d = tempfile::tempdir().unwrap();
    let inbox = dir(&d.path().join("inbox"));
    let staging = dir(&d.path().join("staging"));
    std::fs::write(d.path().join("inbox/f"), b"one").unwrap();
    let settled = FileStamp::of(&std::fs::metadata(d.path().join("inbox/f")).unwrap()).stamp();
    // A chmod changes only the ctime: still "changed" (the settle check includes ctime).
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::set_permissions(
        d.path().join("inbox/f"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let r = claim(
        &inbox,
        Path::new("f"),
        &settled,
        &staging,
        OsStr::new("x.staged"),
        true,
    );
    assert_eq!(r.unwrap(), Claim::Changed);
    std::fs::hard_link(d.path().join("inbox/f"), d.path().join("inbox/g")).unwrap();
    let settled = FileStamp::of(&std::fs::metadata(d.path().join("inbox/f")).unwrap()).stamp();
    let r = claim(
        &inbox,
        Path::new("f"),
        &settled,
        &staging,
        OsStr::new("x.staged"),
        false,
    );
    assert_eq!(r.unwrap(), Claim::HardLinkedLeft);
    assert!(d.path().join("inbox/f").exists() && d.path().join("inbox/g").exists());
}

#[test]
fn a_planted_symlink_or_file_in_the_destination_is_walked_around() {
    let d = tempfile::tempdir().unwrap();
    let dest = dir(&d.path().join("clean"));
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, d.path().join("clean/sub")).unwrap();
    std::fs::write(d.path().join("clean/file-here"), b"x").unwrap();
    assert_eq!(
        free_name(&dest, Path::new("sub/a.txt"), 0o755).unwrap(),
        PathBuf::from("sub (1)/a.txt")
    );
    assert_eq!(
        free_name(&dest, Path::new("file-here/b.txt"), 0o755).unwrap(),
        PathBuf::from("file-here (1)/b.txt")
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn the_quarantine_chmod_never_follows_a_symlink() {
    let d = tempfile::tempdir().unwrap();
    let staging = dir(&d.path().join("s"));
    let q = dir(&d.path().join("q"));
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"v").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    // A symlink where the staged file should be: never opened, never chmodded.
    std::os::unix::fs::symlink(&victim, d.path().join("s/f.staged")).unwrap();
    let temp = temp_for("t", 1);
    let r = Release {
        staging: &staging,
        staged_name: OsStr::new("f.staged"),
        hashed: None,
        sha256: None,
        dest_root: &q,
        target: Path::new("f"),
        file_mode: 0o600,
        copy: true,
        clean: false,
        temp_name: &temp,
        own_copy: None,
    };
    assert!(matches!(place(&r), Err(FsError::NotRegular { .. })));
    assert_eq!(
        std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // A real staged file gets 0600 in 0700 folders.
    std::fs::remove_file(d.path().join("s/f.staged")).unwrap();
    stage(staging.path(), "f.staged", b"bad");
    let target = free_name(&q, Path::new("sub/f"), 0o700).unwrap();
    place(&Release {
        target: &target,
        ..r
    })
    .unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.path().join("q/sub/f")), 0o600);
    assert_eq!(mode(&d.path().join("q/sub")), 0o700);
}

#[test]
fn a_file_held_open_by_a_writer_is_released_as_a_verified_copy_the_writer_cannot_change() {
    let d = tempfile::tempdir().unwrap();
    let staging = dir(&d.path().join("s"));
    let clean = dir(&d.path().join("clean"));
    let hashed = stage(staging.path(), "f.staged", b"harmless report");
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path().join("s/f.staged"))
        .unwrap();
    let temp = temp_for("t", 7);
    let r = release(
        &staging,
        OsStr::new("f.staged"),
        hashed,
        b"harmless report",
        &clean,
        Path::new("report.txt"),
        &temp,
    );
    assert_eq!(place(&r).unwrap(), Placed::Copied);
    writer
        .write_all(b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR")
        .unwrap();
    writer.sync_all().unwrap();
    assert_eq!(
        std::fs::read(d.path().join("clean/report.txt")).unwrap(),
        b"harmless report"
    );
    assert!(!d.path().join("s/f.staged").exists());
    assert!(!d.path().join("clean").join(&temp).exists());
    // Without another opener too: always a new inode, owned by dropscan, mode 0644 (an `O_PATH`
    // handle escapes any check of openers, so the user's inode is never what clean holds).
    let hashed = stage(staging.path(), "g.staged", b"other");
    let ino = hashed.ino;
    let r = release(
        &staging,
        OsStr::new("g.staged"),
        hashed,
        b"other",
        &clean,
        Path::new("g.txt"),
        &temp,
    );
    assert_eq!(place(&r).unwrap(), Placed::Copied);
    assert_ne!(
        std::fs::metadata(d.path().join("clean/g.txt"))
            .unwrap()
            .ino(),
        ino
    );
}

#[test]
fn a_file_rewritten_after_hashing_is_never_placed_in_clean() {
    let d = tempfile::tempdir().unwrap();
    let staging = dir(&d.path().join("s"));
    let clean = dir(&d.path().join("clean"));
    let hashed = stage(staging.path(), "f.staged", b"clean bytes");
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(d.path().join("s/f.staged"), b"other bytes").unwrap();
    let temp = temp_for("t", 1);
    let r = release(
        &staging,
        OsStr::new("f.staged"),
        hashed,
        b"clean bytes",
        &clean,
        Path::new("f"),
        &temp,
    );
    assert!(matches!(place(&r), Err(FsError::Changed { .. })));
    assert!(!d.path().join("clean/f").exists());
}

#[test]
fn an_identical_twin_at_the_destination_is_never_taken_for_our_file() {
    let d = tempfile::tempdir().unwrap();
    let staging = dir(&d.path().join("s"));
    let clean = dir(&d.path().join("clean"));
    let hashed = stage(staging.path(), "f.staged", b"same");
    // Another drop of the same content already sits under the journaled target.
    std::fs::write(d.path().join("clean/f.txt"), b"same").unwrap();
    let temp = temp_for("t", 1);
    let r = release(
        &staging,
        OsStr::new("f.staged"),
        hashed,
        b"same",
        &clean,
        Path::new("f.txt"),
        &temp,
    );
    assert!(place(&r).unwrap_err().is_already_exists());
    assert!(
        d.path().join("s/f.staged").exists(),
        "our file is never unlinked"
    );
    let target = free_name(&clean, Path::new("f.txt"), 0o755).unwrap();
    assert_eq!(target, PathBuf::from("f (1).txt"));
    place(&Release {
        target: &target,
        ..r
    })
    .unwrap();
    assert_eq!(
        std::fs::read_dir(d.path().join("clean")).unwrap().count(),
        2
    );
}

#[test]
fn a_missing_destination_folder_is_not_taken_for_a_vanished_file() {
    let d = tempfile::tempdir().unwrap();
    let staging = dir(&d.path().join("s"));
    let clean = dir(&d.path().join("clean"));
    let hashed = stage(staging.path(), "f.staged", b"x");
    let target = free_name(&clean, Path::new("sub/f"), 0o755).unwrap();
    // Someone removes the empty subfolder between the choice and the move.
    std::fs::remove_dir(d.path().join("clean/sub")).unwrap();
    let temp = temp_for("t", 1);
    let r = release(
        &staging,
        OsStr::new("f.staged"),
        hashed,
        b"x",
        &clean,
        &target,
        &temp,
    );
    let e = place(&r).unwrap_err();
    assert!(!e.is_vanished(), "{e}");
    assert!(d.path().join("s/f.staged").exists());
    let target = free_name(&clean, Path::new("sub/f"), 0o755).unwrap();
    place(&Release {
        target: &target,
        ..r
    })
    .unwrap();
    assert_eq!(std::fs::read(d.path().join("clean/sub/f")).unwrap(), b"x");
}

#[test]
fn an_interrupted_copy_resumes_from_its_verified_temp_and_a_partial_is_redone() {
    let d = tempfile::tempdir().unwrap();
    let staging = dir(&d.path().join("s"));
    let clean = dir(&d.path().join("clean"));
    let temp = temp_for("t", 9);
    // A crash mid-copy: staged file present, partial temp → the temp is discarded, redone.
    let hashed = stage(staging.path(), "f.staged", b"whole content");
    std::fs::write(d.path().join("clean").join(&temp), b"whole").unwrap();
    let r = release(
        &staging,
        OsStr::new("f.staged"),
        hashed,
        b"whole content",
        &clean,
        Path::new("f"),
        &temp,
    );
    place(&r).unwrap();
    assert_eq!(
        std::fs::read(d.path().join("clean/f")).unwrap(),
        b"whole content"
    );
    assert!(!d.path().join("clean").join(&temp).exists());
    // A crash after the staged file was removed: the verified temp is the only copy → placed.
    std::fs::write(d.path().join("clean").join(&temp), b"second").unwrap();
    let r = release(
        &staging,
        OsStr::new("g.staged"),
        hashed,
        b"second",
        &clean,
        Path::new("g"),
        &temp,
    );
    assert_eq!(place(&r).unwrap(), Placed::Copied);
    assert_eq!(std::fs::read(d.path().join("clean/g")).unwrap(), b"second");
    // A temp whose bytes are wrong is kept, never deleted, and never released.
    std::fs::write(d.path().join("clean").join(&temp), b"tampered").unwrap();
    let r = release(
        &staging,
        OsStr::new("h.staged"),
        hashed,
        b"third",
        &clean,
        Path::new("h"),
        &temp,
    );
    assert!(matches!(place(&r), Err(FsError::Changed { .. })));
    assert!(d.path().join("clean").join(&temp).exists() && !d.path().join("clean/h").exists());
    // Nothing anywhere: vanished; the target alone: the move happened before the restart.
    std::fs::remove_file(d.path().join("clean").join(&temp)).unwrap();
    assert!(place(&r).unwrap_err().is_vanished());
    let r = release(
        &staging,
        OsStr::new("h.staged"),
        hashed,
        b"third",
        &clean,
        Path::new("g"),
        &temp,
    );
    assert_eq!(place(&r).unwrap(), Placed::AlreadyDone);
}

#[test]
fn two_same_named_files_copied_at_once_keep_their_own_bytes() {
    // Each record has its own temp name: two placements of `report.txt` never share one.
    assert_ne!(temp_for("fs01", 1), temp_for("fs01", 2));
    assert_ne!(temp_for("fs01", 1), temp_for("fs02", 1));
    let d = tempfile::tempdir().unwrap();
    let staging = dir(&d.path().join("s"));
    let clean = dir(&d.path().join("clean"));
    let (ta, tb) = (temp_for("t", 1), temp_for("t", 2));
    let ha = stage(staging.path(), "a.staged", b"first file");
    let hb = stage(staging.path(), "b.staged", b"second file");
    // Both copies are half-way (the writer of a holds it open, forcing copies).
    let _hold_a = std::fs::File::open(d.path().join("s/a.staged")).unwrap();
    let _hold_b = std::fs::File::open(d.path().join("s/b.staged")).unwrap();
    let ra = release(
        &staging,
        OsStr::new("a.staged"),
        ha,
        b"first file",
        &clean,
        Path::new("report.txt"),
        &ta,
    );
    let rb = release(
        &staging,
        OsStr::new("b.staged"),
        hb,
        b"second file",
        &clean,
        Path::new("report (1).txt"),
        &tb,
    );
    assert_eq!(place(&ra).unwrap(), Placed::Copied);
    assert_eq!(place(&rb).unwrap(), Placed::Copied);
    assert_eq!(
        std::fs::read(d.path().join("clean/report.txt")).unwrap(),
        b"first file"
    );
    assert_eq!(
        std::fs::read(d.path().join("clean/report (1).txt")).unwrap(),
        b"second file"
    );
}

/// The agent's temp name for a record whose staged file is `<id as 32 hex digits>.staged`.
fn temp_for(instance: &str, id: i64) -> std::ffi::OsString {
    copy_temp_name(
        instance,
        TempOf::Agent,
        &format!("{id:032x}"),
        Path::new("dir/report.pdf"),
    )
}

#[test]
fn temp_names_say_whose_copy_of_which_staged_file_and_name_they_hold() {
    let t = copy_temp_name(
        "fs01",
        TempOf::Agent,
        &super::names::staged_token(Path::new("/in/.dropscan/fs01/0123abcd.staged")),
        Path::new("a/b/report.pdf"),
    );
    assert_eq!(t, ".fs01.s0123abcd.report.pdf.dropscan-partial");
    assert_eq!(
        super::names::parse_temp_name(&t, "fs01"),
        Some(Temp::Copy {
            of: TempOf::Agent,
            token: "0123abcd".into(),
            name: "report.pdf".into()
        })
    );
    let tool = copy_temp_name("fs01", TempOf::Tool, "ff", Path::new("q"));
    assert!(matches!(
        super::names::parse_temp_name(&tool, "fs01"),
        Some(Temp::Copy {
            of: TempOf::Tool,
            ..
        })
    ));
    assert_eq!(super::names::parse_temp_name(&t, "fs02"), None);
    assert_eq!(
        super::names::parse_temp_name(OsStr::new(".fs01.7.dropscan-partial"), "fs01"),
        Some(Temp::Numbered(7))
    );
    // A long name still fits, cut to NAME_MAX.
    let long = "x".repeat(300);
    let t = copy_temp_name("fs01", TempOf::Agent, "ab", Path::new(&long));
    assert!(t.len() <= NAME_MAX);
}

#[test]
fn leftover_temps_never_lists_a_temp_a_running_placement_holds_locked() {
    // A `quarantine release` (another process) is writing its verified copy, under the lock
    // `place` holds, while the agent starts: removing the temp from under it would let the
    // tool remove the quarantined file and then find no copy to rename.
    let d = tempfile::tempdir().unwrap();
    let clean = dir(&d.path().join("clean"));
    let temp = d.path().join("clean").join(temp_for("me", 7));
    std::fs::write(&temp, b"copy in progress").unwrap();
    let held = std::fs::File::open(&temp).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    assert!(leftover_temps(&clean, "me").is_empty());
    assert!(!remove_temp(&clean, &temp_for("me", 7), "test"));
    assert!(temp.exists());
    drop(held);
    assert_eq!(leftover_temps(&clean, "me").len(), 1);
    assert!(remove_temp(&clean, &temp_for("me", 7), "test"));
    assert!(!temp.exists());
}

#[test]
fn leftover_temps_lists_copies_removes_sidecar_temps_and_keeps_other_files() {
    let d = tempfile::tempdir().unwrap();
    let clean = dir(&d.path().join("clean"));
    std::fs::create_dir_all(d.path().join("clean/sub")).unwrap();
    let w = |p: &std::ffi::OsStr| std::fs::write(d.path().join("clean").join(p), b"x").unwrap();
    w(OsStr::new("user.dropscan-partial"));
    w(OsStr::new(".other-agent.5.dropscan-partial"));
    w(OsStr::new(".me.5.dropscan-partial"));
    w(&temp_for("me", 6));
    w(&temp_for("other-agent", 6));
    w(OsStr::new("sub/.me.sidecar-abc.dropscan-partial"));
    w(&std::path::Path::new("sub")
        .join(temp_for("me", 8))
        .into_os_string());
    let mut found: Vec<_> = leftover_temps(&clean, "me")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    found.sort();
    // Copy temps at the top only (a placement never puts one lower); nothing is removed but the
    // sidecar temp.
    assert_eq!(
        found,
        vec![
            std::ffi::OsString::from(".me.5.dropscan-partial"),
            temp_for("me", 6)
        ]
    );
    assert!(
        !d.path()
            .join("clean/sub/.me.sidecar-abc.dropscan-partial")
            .exists()
    );
    for kept in [
        "user.dropscan-partial",
        ".other-agent.5.dropscan-partial",
        ".me.5.dropscan-partial",
    ] {
        assert!(d.path().join("clean").join(kept).exists(), "{kept}");
    }
}

#[test]
fn take_back_moves_a_whole_copy_into_staging_on_the_same_filesystem() {
    let d = tempfile::tempdir().unwrap();
    let clean = dir(&d.path().join("clean"));
    let staging = dir(&d.path().join("s"));
    let old = temp_for("me", 1);
    std::fs::write(d.path().join("clean").join(&old), b"the only copy").unwrap();
    let fresh_temp = temp_for("me", 2);
    take_back(
        &clean,
        &old,
        &fresh_temp,
        &staging,
        OsStr::new("new.staged"),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(d.path().join("s/new.staged")).unwrap(),
        b"the only copy"
    );
    assert!(!d.path().join("clean").join(&old).exists());
    assert!(!d.path().join("clean").join(&fresh_temp).exists());
}

#[test]
fn take_back_copies_a_whole_copy_across_filesystems_and_leaves_no_partial() {
    let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipped: no /dev/shm");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let clean = dir(&other.path().join("clean"));
    let staging = dir(&d.path().join("s"));
    let old = temp_for("me", 1);
    std::fs::write(other.path().join("clean").join(&old), b"the only copy").unwrap();
    take_back(
        &clean,
        &old,
        &temp_for("me", 2),
        &staging,
        OsStr::new("new.staged"),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(d.path().join("s/new.staged")).unwrap(),
        b"the only copy"
    );
    let left: Vec<_> = std::fs::read_dir(other.path().join("clean"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let left: Vec<_> = std::fs::read_dir(d.path().join("s"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("new.staged")]);
}

#[test]
fn an_unreadable_file_reads_not_readable_and_names_the_users_path() {
    let e = FsError::io(
        Path::new("/inbox/.dropscan/t/1.staged"),
        "open for reading",
        std::io::Error::from_raw_os_error(libc::EACCES),
    )
    .at(Path::new("/inbox/reports/q3.pdf"));
    let text = e.to_string();
    assert!(text.contains("/inbox/reports/q3.pdf"), "{text}");
    assert!(text.contains("not readable by the dropscan user"), "{text}");
    assert!(!text.contains("staged"), "{text}");
}

#[test]
fn sidecars_are_written_beside_and_sha256_matches() {
    let d = tempfile::tempdir().unwrap();
    let q = dir(&d.path().join("q"));
    std::fs::create_dir_all(d.path().join("q/sub")).unwrap();
    let p = write_sidecar(&q, Path::new("sub/x.bin"), b"{}", 0o600, "t").unwrap();
    assert_eq!(p, d.path().join("q/sub/x.bin.dropscan.json"));
    write_sidecar(&q, Path::new("sub/x.bin"), b"{1}", 0o600, "t").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"{1}");
    assert_eq!(
        std::fs::read_dir(d.path().join("q/sub")).unwrap().count(),
        1
    );
    for len in [0usize, 1, BUF + 1] {
        let path = d.path().join(format!("f{len}"));
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let root = Dir::open_trusted(d.path()).unwrap();
        let (mut f, _) = root.open_file(path.file_name().unwrap()).unwrap();
        let (h, n) = sha256_file(&mut f).unwrap();
        assert_eq!(n, len as u64);
        assert_eq!(h, sha(&data));
    }
}

#[test]
fn place_across_filesystems_copies_verifies_and_unlinks() {
    let src = tempfile::tempdir().unwrap();
    let Ok(dst) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("no /dev/shm here: cross-filesystem placement not exercised");
        return;
    };
    if std::fs::metadata(src.path()).unwrap().dev() == std::fs::metadata(dst.path()).unwrap().dev()
    {
        eprintln!("/dev/shm is on the same filesystem here: not exercised");
        return;
    }
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let staging = dir(src.path());
    let q = dir(&dst.path().join("q"));
    let hashed = stage(src.path(), "f.staged", &data);
    let temp = temp_for("t", 1);
    let mut r = release(
        &staging,
        OsStr::new("f.staged"),
        hashed,
        &data,
        &q,
        Path::new("a.bin"),
        &temp,
    );
    r.sha256 = Some([0; 32]);
    assert!(matches!(place(&r), Err(FsError::Changed { .. })));
    assert!(src.path().join("f.staged").exists() && !dst.path().join("q/a.bin").exists());
    assert!(!dst.path().join("q").join(&temp).exists());
    r.sha256 = Some(sha(&data));
    r.file_mode = 0o600;
    assert_eq!(place(&r).unwrap(), Placed::Copied);
    assert!(!src.path().join("f.staged").exists());
    assert_eq!(std::fs::read(dst.path().join("q/a.bin")).unwrap(), data);
    assert_eq!(
        std::fs::metadata(dst.path().join("q/a.bin"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}

const EICAR: &[u8] = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR";

/// Review finding: a handle opened with `O_PATH` takes no read or write access, so the write
/// lease probe does not see it; once the staged inode itself is renamed into clean, the holder
/// reopens it for writing through `/proc/self/fd` (or links it back into the inbox with
/// `linkat(AT_SYMLINK_FOLLOW)`) and rewrites the released file.
#[test]
fn an_o_path_handle_kept_past_release_never_rewrites_clean() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let d = tempfile::tempdir().unwrap();
    let staging = dir(&d.path().join("s"));
    let clean = dir(&d.path().join("clean"));
    let hashed = stage(staging.path(), "f.staged", b"harmless report");
    // Opened by the user while the file was still theirs (in the inbox): no access mode at all.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(d.path().join("s/f.staged"))
        .unwrap();
    let temp = temp_for("t", 7);
    let r = release(
        &staging,
        OsStr::new("f.staged"),
        hashed,
        b"harmless report",
        &clean,
        Path::new("report.txt"),
        &temp,
    );
    place(&r).unwrap();
    // Reopened for writing after the release.
    let proc_path = format!("/proc/self/fd/{}", handle.as_raw_fd());
    if let Ok(mut w) = std::fs::OpenOptions::new().write(true).open(&proc_path) {
        w.write_all(EICAR).unwrap();
        w.sync_all().unwrap();
    }
    assert_eq!(
        std::fs::read(d.path().join("clean/report.txt")).unwrap(),
        b"harmless report",
        "an earlier handle reached the released inode"
    );
}

/// Review finding: a released file keeps the mode the user gave it (renamed inode, or the copy
/// made with `now.mode & 0o777`), so a drop made 0666 lands world-writable in clean (and its
/// copy temp is world-writable at a predictable name in the clean root while it is verified):
/// any local user who can traverse clean rewrites it after the verdict.
#[test]
fn a_world_writable_drop_is_never_released_writable_by_others() {
    let d = tempfile::tempdir().unwrap();
    let staging = dir(&d.path().join("s"));
    let clean = dir(&d.path().join("clean"));
    let temp = temp_for("t", 7);
    // Renamed (no other opener) and copied (a writer holds it open).
    for (name, held) in [("a", false), ("b", true)] {
        let staged = format!("{name}.staged");
        let hashed = {
            let p = staging.path().join(&staged);
            std::fs::write(&p, b"harmless report").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
            FileStamp::of(&std::fs::symlink_metadata(&p).unwrap()).stamp()
        };
        let _writer = held.then(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(staging.path().join(&staged))
                .unwrap()
        });
        let target = PathBuf::from(format!("{name}.txt"));
        let r = release(
            &staging,
            OsStr::new(&staged),
            hashed,
            b"harmless report",
            &clean,
            &target,
            &temp,
        );
        place(&r).unwrap();
        let mode = std::fs::metadata(clean.path().join(&target))
            .unwrap()
            .mode();
        assert_eq!(
            mode & 0o022,
            0,
            "{name}: released into clean with mode {:o}",
            mode & 0o777
        );
    }
}

/// Review finding: two placements of one record can run at once (after a SIGHUP reload or a
/// stop whose grace ran out, the old agent's blocking placement goes on while the new agent
/// resumes the same `placing` record). Both use the record's deterministic temp name: the
/// second takes the first's live temp for "a partial from before a crash" and removes it, the
/// first then renames the second's half-written temp into clean and reports the file placed,
/// and the second finds the staged file gone and reports it vanished.
#[test]
fn a_second_placement_of_one_record_never_takes_the_live_temp_of_the_first() {
    let d = tempfile::tempdir().unwrap();
    let staging = dir(&d.path().join("s"));
    let clean = dir(&d.path().join("clean"));
    let content: Vec<u8> = (0..48u32 << 20).map(|i| (i % 251) as u8).collect();
    let hashed = stage(staging.path(), "f.staged", &content);
    // A reader keeps the lease refused: both placements release a verified copy.
    let _reader = std::fs::File::open(staging.path().join("f.staged")).unwrap();
    let temp = temp_for("t", 7);
    let r = release(
        &staging,
        OsStr::new("f.staged"),
        hashed,
        &content,
        &clean,
        Path::new("report.bin"),
        &temp,
    );
    let target = clean.path().join("report.bin");
    let expected = sha(&content);
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            let res = place(&r);
            let seen = std::fs::read(&target).ok().map(|b| sha(&b));
            (res, seen)
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !clean.path().join(&temp).exists() && !first.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "first copy never began"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let second = place(&r);
        let (first, seen) = first.join().unwrap();
        for (who, res) in [("first", &first), ("second", &second)] {
            assert!(
                !matches!(res, Err(e) if e.is_vanished()),
                "{who} placement reports the staged file vanished: {res:?}"
            );
        }
        if first.is_ok() {
            assert_eq!(
                seen,
                Some(expected),
                "the first placement reported success with other bytes in clean"
            );
        }
    });
    assert_eq!(sha(&std::fs::read(&target).unwrap()), expected);
}

/// Review finding: a user who kept a descriptor of their drop can link the inode back out of
/// the private staging folder after it was hashed (`linkat` of `/proc/self/fd/N`, allowed for
/// the file's owner). A detected file then has two links when it is placed: the quarantine copy
/// refused it as hard-linked, the sorter turned that into a retry, and the retry could never
/// succeed: the record stayed `placing` and the file in staging for ever. A copy for clean or
/// quarantine only follows a hash, which refused a hard link, so the inode is the one scanned.
#[test]
fn a_detected_file_linked_back_out_of_staging_after_hashing_still_reaches_quarantine() {
    let d = tempfile::tempdir().unwrap();
    let staging = dir(&d.path().join("s"));
    let q = dir(&d.path().join("q"));
    stage(staging.path(), "f.staged", EICAR);
    // The second name the user made from their descriptor.
    std::fs::hard_link(staging.path().join("f.staged"), d.path().join("mine")).unwrap();
    let temp = temp_for("t", 9);
    // What the sorter passes for quarantine (sort.rs: no stamp, no digest, a copy).
    let r = Release {
        staging: &staging,
        staged_name: OsStr::new("f.staged"),
        hashed: None,
        sha256: None,
        dest_root: &q,
        target: Path::new("f"),
        file_mode: 0o600,
        copy: true,
        clean: false,
        temp_name: &temp,
        own_copy: None,
    };
    let placed = place(&r);
    assert!(
        placed.is_ok(),
        "a detected file with a second link never reaches quarantine: {placed:?}"
    );
    let meta = std::fs::metadata(q.path().join("f")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.nlink(), 1, "quarantine holds the user's inode");
    assert_eq!(std::fs::read(q.path().join("f")).unwrap(), EICAR);
    assert!(!staging.path().join("f.staged").exists());
}

/// Review finding (by reading flock(2) and the NFS client): over NFS an exclusive `flock` needs
/// a descriptor open for writing, and placements lock the staged file through a read-only one
/// (it is the user's file): every placement failed with "cannot lock: Bad file descriptor" and
/// was retried for ever, so nothing dropped into an inbox on NFS ever left staging. A filesystem
/// that cannot give the lock is treated like one without `flock`; a lock someone holds stays
/// `Busy`.
#[test]
fn an_exclusive_flock_refused_on_a_read_only_nfs_descriptor_never_stalls_placement() {
    use super::place::no_flock_here;
    use rustix::io::Errno;
    assert!(
        no_flock_here(Errno::BADF),
        "EBADF from NFS stalls every placement"
    );
    assert!(no_flock_here(Errno::NOLCK) && no_flock_here(Errno::OPNOTSUPP));
    assert!(!no_flock_here(Errno::WOULDBLOCK) && !no_flock_here(Errno::IO));
}

#[test]
fn a_hard_link_that_cannot_reach_failed_goes_back_to_the_inbox_unread_with_every_name_kept() {
    let d = tempfile::tempdir().unwrap();
    let inbox = dir(&d.path().join("in"));
    let staging = dir(&d.path().join("in/.dropscan/t"));
    std::fs::create_dir_all(d.path().join("in/sub")).unwrap();
    std::fs::write(d.path().join("in/sub/r.txt"), b"someone else's").unwrap();
    std::fs::write(d.path().join("in/.dropscan/t/1.staged"), b"mine").unwrap();
    let elsewhere = d.path().join("kept-by-user");
    std::fs::hard_link(d.path().join("in/.dropscan/t/1.staged"), &elsewhere).unwrap();
    let back = return_to_inbox(
        &staging,
        OsStr::new("1.staged"),
        &inbox,
        Path::new("sub/r.txt"),
    )
    .unwrap();
    assert_eq!(back, PathBuf::from("sub/r (1).txt"));
    assert_eq!(
        std::fs::read(d.path().join("in/sub/r (1).txt")).unwrap(),
        b"mine"
    );
    assert_eq!(
        std::fs::read(d.path().join("in/sub/r.txt")).unwrap(),
        b"someone else's"
    );
    assert_eq!(std::fs::read(&elsewhere).unwrap(), b"mine");
    assert!(!d.path().join("in/.dropscan/t/1.staged").exists());
}

/// The hash's private copy (ours, 0600, one link, unchanged) is released by a rename: the same
/// inode lands in clean with its mode set to 0644, and no temp is made. A staged file that is not
/// such a copy, or no longer has the stamp it was hashed with, gets the verified copy instead.
#[test]
fn the_hashs_own_unchanged_copy_is_renamed_into_place_anything_else_is_copied_and_verified() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let d = tempfile::tempdir().unwrap();
    let (staging, clean) = (dir(&d.path().join("s")), dir(&d.path().join("clean")));
    let temp = temp_for("t", 1);
    let own = |name: &str, content: &[u8]| {
        let p = d.path().join("s").join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        (
            std::fs::metadata(&p).unwrap().ino(),
            FileStamp::of(&std::fs::metadata(&p).unwrap()).stamp(),
        )
    };
    let (ino, stamp) = own("a.staged", b"copy");
    let target = PathBuf::from("a.txt");
    let r = Release {
        own_copy: Some(stamp),
        ..release(
            &staging,
            OsStr::new("a.staged"),
            stamp,
            b"copy",
            &clean,
            &target,
            &temp,
        )
    };
    assert_eq!(place(&r).unwrap(), Placed::Renamed);
    let placed = std::fs::metadata(d.path().join("clean/a.txt")).unwrap();
    assert_eq!(placed.ino(), ino, "the same inode, renamed");
    assert_eq!(placed.permissions().mode() & 0o777, 0o644);
    // Its stamp moved since it was hashed (a write, say): verified copy, which refuses it here
    // because the bytes no longer match.
    let (_, old) = own("b.staged", b"copy");
    std::fs::write(d.path().join("s/b.staged"), b"changed!").unwrap();
    let now = FileStamp::of(&std::fs::metadata(d.path().join("s/b.staged")).unwrap()).stamp();
    let target = PathBuf::from("b.txt");
    let r = Release {
        own_copy: Some(old),
        ..release(
            &staging,
            OsStr::new("b.staged"),
            now,
            b"copy",
            &clean,
            &target,
            &temp,
        )
    };
    assert!(matches!(place(&r), Err(FsError::Changed { .. })));
    assert!(!d.path().join("clean/b.txt").exists());
    // Readable by others (not a copy of ours): a new inode.
    let (ino, _) = own("c.staged", b"other");
    std::fs::set_permissions(
        d.path().join("s/c.staged"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let stamp2 = FileStamp::of(&std::fs::metadata(d.path().join("s/c.staged")).unwrap()).stamp();
    let target = PathBuf::from("c.txt");
    let r = Release {
        own_copy: Some(stamp2),
        ..release(
            &staging,
            OsStr::new("c.staged"),
            stamp2,
            b"other",
            &clean,
            &target,
            &temp,
        )
    };
    assert_eq!(place(&r).unwrap(), Placed::Copied);
    assert_ne!(
        std::fs::metadata(d.path().join("clean/c.txt"))
            .unwrap()
            .ino(),
        ino
    );
}
