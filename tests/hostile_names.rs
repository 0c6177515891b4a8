//! Names an inbox writer chooses, as the administrator's tools show them (issue 18, finding 5):
//! a file name with terminal escapes and a newline is dropped by a second, unprivileged user;
//! every human output (`quarantine list|show|release`, `failed list|show`, `status`, `scan`)
//! shows it escaped, on one line, and JSON output (the tools' `--json`, `scan --json`, hook
//! events) keeps every name exact, so that two names that are not UTF-8 stay distinguishable.

#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::util::{EICAR, Outcome, World, wait_for};

/// An unprivileged uid (`nobody`): the inbox writer.
const NOBODY: u32 = 65534;

/// A name that sets the terminal's title, clears the screen and forges a list line.
const FORGED: &[u8] =
    b"invoice\x1b]0;pwned\x07\x1b[2J\n42     2026-01-01T00:00:00Z  kept  ok.pdf.com";
/// Two names that are not UTF-8 and print alike when made lossy.
const BAD_A: &[u8] = b"bad\xff.com";
const BAD_B: &[u8] = b"bad\xfe.com";
/// A hard-linked pair (goes to failed), one with escapes.
const LINKED: &[u8] = b"link\x1b[31mred\r.txt";
const LINKED_TOO: &[u8] = b"link-too.txt";

async fn dropscan(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_dropscan"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn args(list: &[&str], cfg: &Path) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
    v.push("--config".into());
    v.push(cfg.to_str().unwrap().into());
    v
}

/// Asserts that a human output carries no raw control character but newlines ending lines.
fn assert_escaped(what: &str, o: &Output) {
    for (stream, bytes) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
        let raw: Vec<u8> = bytes
            .iter()
            .copied()
            .filter(|b| b.is_ascii_control() && *b != b'\n')
            .collect();
        assert!(
            raw.is_empty(),
            "{what} writes raw control bytes {raw:?} to {stream}: {}",
            String::from_utf8_lossy(bytes)
        );
    }
}

/// Runs `program args…` as the inbox writer.
fn as_writer(program: &str, args: &[&Path]) {
    let status = Command::new(program)
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY)
        .status()
        .unwrap();
    assert!(status.success(), "{program} {args:?} as uid {NOBODY}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacker_chosen_names_reach_no_terminal_raw_and_stay_exact_in_json() {
    if !rustix::process::geteuid().is_root() {
        println!("skipped: needs root to drop the files as a second, unprivileged user");
        return;
    }
    let mut w = World::quick().await;
    // A command hook that records each event.
    let events = w.dir.path().join("events");
    std::fs::create_dir_all(&events).unwrap();
    let recorder = w.dir.path().join("record.sh");
    std::fs::write(
        &recorder,
        "#!/bin/sh\ncat > \"$1/.event.$$\" && mv \"$1/.event.$$\" \"$1/event.$$.json\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&recorder, std::fs::Permissions::from_mode(0o755)).unwrap();
    w.more_watches = format!(
        "\n[[hook]]\non = [\"clean\", \"quarantine\", \"failed\"]\ncommand = [\"{}\", \"{}\"]\n",
        recorder.display(),
        events.display()
    );
    let cfg = w.write_config();

    // A shared inbox: world-writable with the sticky bit; the writer is `nobody`.
    std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&w.inbox, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let src = w.dir.path().join("eicar.src");
    std::fs::write(&src, EICAR).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).unwrap();
    let staging = w.dir.path().join("writer");
    std::fs::create_dir_all(&staging).unwrap();
    std::os::unix::fs::chown(&staging, Some(NOBODY), Some(NOBODY)).unwrap();
    let name = |n: &[u8]| OsStr::from_bytes(n).to_owned();
    // Linked first, outside the inbox, then moved in: both names arrive hard-linked.
    let (l1, l2) = (staging.join(name(LINKED)), staging.join(name(LINKED_TOO)));
    as_writer("/bin/cp", &[&src, &l1]);
    as_writer("/bin/ln", &[&l1, &l2]);
    for n in [FORGED, BAD_A, BAD_B] {
        as_writer("/bin/cp", &[&src, &w.inbox.join(name(n))]);
    }
    as_writer("/bin/mv", &[&l1, &w.inbox.join(name(LINKED))]);
    as_writer("/bin/mv", &[&l2, &w.inbox.join(name(LINKED_TOO))]);

    let agent = w.start_agent();
    let placed = w.wait_placed(5, Duration::from_secs(60)).await;
    assert_eq!(
        placed
            .values()
            .filter(|o| **o == Outcome::Quarantine)
            .count(),
        3,
        "{placed:?}"
    );
    assert_eq!(
        placed.values().filter(|o| **o == Outcome::Failed).count(),
        2,
        "{placed:?}"
    );

    // Human output: escaped, one line per entry.
    let list = dropscan(args(&["quarantine", "list"], &cfg)).await;
    assert!(list.status.success(), "{list:?}");
    assert_escaped("quarantine list", &list);
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert_eq!(listed.lines().count(), 3, "one line per entry: {listed}");
    assert!(
        listed.contains("\\n42"),
        "the newline shown as \\n: {listed}"
    );
    let failed = dropscan(args(&["failed", "list"], &cfg)).await;
    assert_escaped("failed list", &failed);
    assert_eq!(
        String::from_utf8_lossy(&failed.stdout).lines().count(),
        2,
        "{failed:?}"
    );

    // JSON: exact. The names that are not UTF-8 differ in `path_hex`.
    let json = dropscan(args(&["quarantine", "list", "--json"], &cfg)).await;
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&json.stdout).unwrap();
    let forged = entries
        .iter()
        .find(|e| e["path"] == String::from_utf8(FORGED.to_vec()).unwrap())
        .unwrap_or_else(|| panic!("the forged name exactly: {entries:?}"));
    assert!(forged.get("path_hex").is_none(), "{forged}");
    for bad in [BAD_A, BAD_B] {
        let found: Vec<_> = entries
            .iter()
            .filter(|e| e["path_hex"] == hex::encode(bad))
            .collect();
        assert_eq!(found.len(), 1, "{} in {entries:?}", hex::encode(bad));
        assert_eq!(found[0]["path"], "bad\u{fffd}.com");
    }
    let id = forged["id"].to_string();
    let failed_json = dropscan(args(&["failed", "list", "--json"], &cfg)).await;
    let failed_entries: Vec<serde_json::Value> =
        serde_json::from_slice(&failed_json.stdout).unwrap();
    let linked = failed_entries
        .iter()
        .find(|e| e["path"] == String::from_utf8(LINKED.to_vec()).unwrap())
        .unwrap_or_else(|| panic!("{failed_entries:?}"));
    let linked_id = linked["id"].to_string();

    // Hook events: exact too.
    let recorded = wait_for(Duration::from_secs(20), || {
        let got: Vec<serde_json::Value> = std::fs::read_dir(&events)
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
            .collect();
        (got.len() >= 5).then_some(got)
    })
    .await
    .expect("five events");
    for bad in [BAD_A, BAD_B] {
        let n = recorded
            .iter()
            .filter(|e| e["path_hex"] == hex::encode(bad))
            .count();
        assert_eq!(n, 1, "{} in {recorded:?}", hex::encode(bad));
    }

    for (what, a) in [
        ("quarantine show", args(&["quarantine", "show", &id], &cfg)),
        ("failed show", args(&["failed", "show", &linked_id], &cfg)),
        ("status", args(&["status"], &cfg)),
        (
            "quarantine release",
            args(&["quarantine", "release", &id, "--reason", "fp"], &cfg),
        ),
    ] {
        let o = dropscan(a).await;
        assert!(o.status.success(), "{what}: {o:?}");
        assert_escaped(what, &o);
    }
    let (r, _) = agent.stop().await;
    r.unwrap();

    // `scan PATH`: the same names in a folder of the writer's.
    let tree = w.dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    for n in [FORGED, BAD_A, BAD_B] {
        std::fs::copy(&src, tree.join(name(n))).unwrap();
    }
    let t = tree.to_str().unwrap();
    let scanned = dropscan(args(&["scan", t], &cfg)).await;
    assert_eq!(scanned.status.code(), Some(1), "{scanned:?}");
    assert_escaped("scan", &scanned);
    let scanned = dropscan(args(&["scan", "--json", t], &cfg)).await;
    let report: serde_json::Value = serde_json::from_slice(&scanned.stdout)
        .unwrap_or_else(|e| panic!("scan --json: {e}: {scanned:?}"));
    let files = report["files"].as_array().unwrap();
    for bad in [BAD_A, BAD_B] {
        let path = tree.join(name(bad));
        assert_eq!(
            files
                .iter()
                .filter(|f| f["path_hex"] == hex::encode(path.as_os_str().as_bytes()))
                .count(),
            1,
            "{files:?}"
        );
    }
}
