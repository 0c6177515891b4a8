//! Review 7 (follow-up of review 6's fixes): an upgrade from the previous release (1d2ec6c:
//! numbered temps `.<instance>.<id>.dropscan-partial`, no `dest_root` column), run with that
//! release's own binary. Skipped with a printed reason where `strace`, /dev/shm or the older
//! binary is missing: build it with
//! `git worktree add --detach /work/wt-old7 1d2ec6c && cd /work/wt-old7 && cargo build --bin dropscan`
//! (or point `DROPSCAN_OLD_BIN` at it).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::quarantine_tools::{dropscan, text};
use crate::review6::{every_file, on_shm, temps};
use crate::shares_fixture::find_tool;
use crate::util::{EICAR, LONG, World, bytes, collect_stderr, line_after, wait_for};

/// The previous release's binary, if built.
fn old_bin() -> Option<PathBuf> {
    let p = std::env::var_os("DROPSCAN_OLD_BIN").map_or_else(
        || PathBuf::from("/work/wt-old7/target/debug/dropscan"),
        PathBuf::from,
    );
    p.is_file().then_some(p)
}

/// Runs the older release's agent until `done` holds (at most 60 s), then stops it (SIGTERM).
fn run_old_until(old: &Path, cfg: &Path, done: impl Fn() -> bool) {
    let mut child = Command::new(old)
        .args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .ok();
    child.wait().unwrap();
    assert!(done(), "the older release never got there");
}

/// Bug: the previous release's `quarantine release`, killed mid-copy, leaves a partial copy in
/// clean under its numbered temp name (`.test.<id>.dropscan-partial`, id of the kept file's
/// record). After the upgrade the analyst runs the release again, as the docs say; it copies
/// anew under the new temp name and finishes. The next start of the agent finds the numbered
/// temp, whose record is closed and no longer in custody, takes it for "the only copy of a
/// file", scans the truncated bytes (the EICAR tail cut off: "not detected") and places them
/// in clean. Review 6 fixed this for the new tool temps (hashed against their content), not for
/// the older release's. Expected: a numbered temp whose record is a kept file with a SHA-256
/// (still in quarantine, or released) is known for partial and removed, never released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_partial_release_copy_of_the_older_release_is_not_placed_in_clean() {
    let Some(strace) = find_tool("strace") else {
        eprintln!("skipped: strace not installed (Debian package strace)");
        return;
    };
    let Some(old) = old_bin() else {
        eprintln!("skipped: no older release binary (see the module docs)");
        return;
    };
    let mut w = World::quick().await;
    let Some(_other) = on_shm(&mut w) else {
        eprintln!("skipped: no /dev/shm");
        return;
    };
    let mut content = bytes(72, 12_000_000);
    content.extend_from_slice(EICAR);
    w.drop_file("big.bin", &content);
    let cfg = w.write_config();
    tokio::task::spawn_blocking({
        let (old, cfg, q) = (old.clone(), cfg.clone(), w.quarantine.clone());
        move || {
            run_old_until(&old, &cfg, || {
                q.join("big.bin").exists() && q.join("big.bin.dropscan.json").exists()
            });
        }
    })
    .await
    .unwrap();
    let listed = Command::new(&old)
        .args(["quarantine", "list", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap_or_default();
    let id = v
        .as_array()
        .and_then(|a| a.first())
        .and_then(|e| e["id"].as_i64())
        .unwrap_or_else(|| panic!("no quarantine entry: {}", text(&listed)));
    // The older release's `quarantine release`, killed by strace at its 5th write.
    let out = tokio::task::spawn_blocking({
        let (s, c, old) = (strace.clone(), cfg.clone(), old.clone());
        move || {
            Command::new(s)
                .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=write", "-e"])
                .arg("inject=write:signal=SIGKILL:when=5")
                .arg(old)
                .args(["quarantine", "release", "--reason", "fp", "--config"])
                .arg(c)
                .arg(id.to_string())
                .env("RUST_LOG", "warn")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        !out.status.success(),
        "the older release was not killed: {}",
        text(&out)
    );
    let partial = temps(&w.clean);
    assert_eq!(partial.len(), 1, "no partial temp in clean: {partial:?}");
    assert!(
        partial[0]
            .to_string_lossy()
            .ends_with(&format!(".test.{id}.dropscan-partial")),
        "not the older release's numbered temp: {partial:?}"
    );
    // The upgrade: the new agent starts (and stops), the analyst runs the release again.
    let walks = w.walks();
    let agent = w.start_agent();
    w.wait_idle(walks).await;
    agent.stop().await.0.unwrap();
    let again = dropscan(&[
        "quarantine",
        "release",
        "--reason",
        "fp",
        "--config",
        cfg.to_str().unwrap(),
        &id.to_string(),
    ])
    .await;
    assert!(again.status.success(), "release again: {}", text(&again));
    assert_eq!(
        std::fs::read(w.clean.join("big.bin")).ok().as_deref(),
        Some(&content[..]),
        "the release did not place the file"
    );
    // The next start.
    let walks = w.walks();
    let agent = w.start_agent();
    w.wait_idle(walks).await;
    agent.stop().await.0.unwrap();
    let truncated: Vec<_> = every_file(&w.clean)
        .into_iter()
        .filter(|(_, c)| c.len() < content.len() && content.starts_with(c))
        .map(|(p, c)| (p, c.len()))
        .collect();
    assert!(
        truncated.is_empty(),
        "a truncated copy of the quarantined file was placed in clean: {truncated:?}"
    );
}

/// The previous release's agent killed after its verified copy (staged file removed, record
/// `placing`, numbered temp in clean), then the new version started on its journal (no
/// `dest_root` column): the file must come out whole at its name, no temp left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_finishes_the_older_releases_verified_numbered_copy() {
    let Some(strace) = find_tool("strace") else {
        eprintln!("skipped: strace not installed (Debian package strace)");
        return;
    };
    let Some(old) = old_bin() else {
        eprintln!("skipped: no older release binary (see the module docs)");
        return;
    };
    for when in 1u32..=2 {
        let mut w = World::quick().await;
        let Some(_other) = on_shm(&mut w) else {
            eprintln!("skipped: no /dev/shm");
            return;
        };
        let content = bytes(73 + u64::from(when), 3_000_000);
        w.drop_file("doc.bin", &content);
        let cfg = w.write_config();
        std::fs::create_dir_all(&w.clean).unwrap();
        let status = tokio::task::spawn_blocking({
            let (s, c, d, old) = (strace.clone(), cfg.clone(), w.clean.clone(), old.clone());
            move || {
                Command::new(s)
                    .args(["-f", "-qq", "-o", "/dev/null", "-P"])
                    .arg(d)
                    .args(["-e", "trace=renameat2,unlinkat", "-e"])
                    .arg(format!(
                        "inject=renameat2,unlinkat:signal=SIGKILL:when={when}"
                    ))
                    .arg(old)
                    .args(["run", "--config"])
                    .arg(c)
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(!status.success(), "the older release was not killed");
        let left = temps(&w.clean);
        eprintln!(
            "kill point {when}: temps {left:?}, staging {:?}",
            std::fs::read_dir(w.inbox.join(".dropscan/test"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                .unwrap_or_default()
        );
        let walks = w.walks();
        let agent = w.start_agent();
        let placed = wait_for(Duration::from_secs(30), || {
            every_file(&w.clean)
                .into_iter()
                .find(|(_, c)| *c == content)
        })
        .await;
        w.wait_idle(walks).await;
        agent.stop().await.0.unwrap();
        assert!(
            placed.is_some(),
            "kill point {when}: the file never came out (temps after the kill {left:?}, now {:?}, \
             clean {:?})",
            temps(&w.clean),
            every_file(&w.clean)
                .iter()
                .map(|(p, c)| (p.clone(), c.len()))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            placed.unwrap().0,
            PathBuf::from("doc.bin"),
            "kill point {when}"
        );
        assert!(
            temps(&w.clean).is_empty(),
            "kill point {when}: temps left {:?}",
            temps(&w.clean)
        );
    }
}

/// A SIGHUP reload that removes a watch: the staging lock of the inbox no longer watched is
/// kept by the process (locks are kept across reloads, and released only when an agent stops
/// for good). Another agent configured for that inbox alone (same instance id, its own state
/// folder: the inbox handed over to another configuration) is refused while this process lives.
/// Expected: the reloaded process lets go of the staging folders it no longer watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_that_removes_a_watch_lets_go_of_its_staging_lock() {
    let mut w = World::quick().await;
    let second = w.dir.path().join("second");
    for d in ["inbox", "clean", "quarantine", "failed"] {
        std::fs::create_dir_all(second.join(d)).unwrap();
    }
    let watch2 = format!(
        "\n[[watch]]\npath = \"{s}/inbox\"\nsettle = \"200ms\"\nclean_dir = \"{s}/clean\"\n\
         quarantine_dir = \"{s}/quarantine\"\nfailed_dir = \"{s}/failed\"\n",
        s = second.display()
    );
    w.more_watches = watch2.clone();
    let cfg = w.write_config();
    let mut first = Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first_log = collect_stderr(&mut first);
    let lock2 = second.join("inbox/.dropscan/test/.lock");
    let up = wait_for(Duration::from_secs(15), || lock2.exists().then_some(())).await;
    // The reload without the second watch.
    w.more_watches.clear();
    let cfg_one = w.write_config();
    assert_eq!(cfg_one, cfg);
    let pid = rustix::process::Pid::from_raw(i32::try_from(first.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    // The reloaded pipeline watches the first inbox again.
    let inbox1 = w.inbox.display().to_string();
    let reloaded = wait_for(LONG, || {
        line_after(
            &first_log,
            "SIGHUP: configuration valid",
            &["watching inbox", &inbox1],
        )
        .then_some(())
    })
    .await;
    // The reload was taken: a file dropped in the second inbox stays there, while one dropped
    // after it in the first inbox goes through.
    std::fs::write(second.join("inbox/left.txt"), b"not watched").unwrap();
    w.drop_file("later.txt", b"watched");
    let later = wait_for(LONG, || w.clean.join("later.txt").exists().then_some(())).await;
    if reloaded.is_none() || later.is_none() {
        first.kill().ok();
        first.wait().ok();
        panic!(
            "the reloaded agent did not go on (reloaded {reloaded:?}, later.txt placed {later:?}): {:?}",
            first_log.lock().unwrap()
        );
    }
    assert!(
        second.join("inbox/left.txt").exists(),
        "the reload was not taken: the second inbox is still watched"
    );
    // The second inbox, now another configuration's.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let head = &text[..text.find("[[watch]]").unwrap()];
    let other = format!(
        "{}{}\n[log]\nlevel = \"warn\"\n",
        head.replace("dir = \"state\"", "dir = \"state2\""),
        watch2
    );
    let cfg2 = w.dir.path().join("other.toml");
    std::fs::write(&cfg2, other).unwrap();
    let mut agent2 = Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config"])
        .arg(&cfg2)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let agent2_log = collect_stderr(&mut agent2);
    // Either refused at start-up, or past it: watching the inbox (the lock is taken before).
    let inbox2 = second.join("inbox").display().to_string();
    let exited = wait_for(LONG, || match agent2.try_wait().unwrap() {
        Some(st) => Some(Some(st)),
        None => line_after(&agent2_log, "", &["watching inbox", &inbox2]).then_some(None),
    })
    .await
    .flatten();
    agent2.kill().ok();
    agent2.wait().ok();
    first.kill().ok();
    first.wait().ok();
    assert!(
        up.is_some(),
        "the first agent never locked the second staging folder"
    );
    assert!(
        exited.is_none(),
        "the agent for the inbox no longer watched was refused ({exited:?}): {:?}",
        agent2_log.lock().unwrap()
    );
}
