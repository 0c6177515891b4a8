//! `dropscan quarantine …` and `dropscan failed …` as an operator runs them, beside a running
//! agent: files quarantined by the real agent and the emulator are listed, released to clean
//! with their content intact, restored, refused when tampered with, purged; a failed file is
//! retried once the server takes larger files. Every action leaves an audit record.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use dropscan::emulator::EmulatorConfig;
use dropscan::journal::Journal;

use crate::util::{EICAR, Outcome, World, bytes, wait_for};

/// Runs the real binary off the async runtime.
pub(crate) async fn dropscan(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| (*s).to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_dropscan"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `<kind> list --json [--all]` parsed.
async fn list(cfg: &Path, kind: &str, all: bool) -> Vec<serde_json::Value> {
    let c = cfg.to_str().unwrap();
    let mut args = vec![kind, "list", "--json", "--config", c];
    if all {
        args.push("--all");
    }
    let out = dropscan(&args).await;
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

fn id_of(entries: &[serde_json::Value], path: &str) -> String {
    entries
        .iter()
        .find(|e| e["path"] == path)
        .unwrap_or_else(|| panic!("{path} not listed: {entries:?}"))["id"]
        .to_string()
}

fn entry<'a>(entries: &'a [serde_json::Value], id: &str) -> &'a serde_json::Value {
    entries
        .iter()
        .find(|e| e["id"] == id.parse::<i64>().unwrap())
        .unwrap()
}

fn hex_sha(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_release_restore_refusal_and_purge_round_trip_while_the_agent_runs() {
    let w = World::quick().await;
    let cfg = w.write_config();
    let c = cfg.to_str().unwrap().to_string();
    let agent = w.start_agent();
    let samples: Vec<(&str, Vec<u8>)> = vec![
        ("fp/report.doc", [EICAR, b" release me"].concat()),
        ("analysis.bin", [EICAR, b" restore me"].concat()),
        ("tampered.com", [EICAR, b" tamper"].concat()),
        ("old.com", [EICAR, b" purge me"].concat()),
    ];
    for (p, b) in &samples {
        w.drop_file(p, b);
    }
    let placed = w.wait_placed(4, Duration::from_secs(30)).await;
    assert!(
        placed.values().all(|o| *o == Outcome::Quarantine),
        "{placed:?}"
    );

    // The hourly prune never forgets a file still in quarantine, even with no history at all.
    let journal = Journal::open(&w.state_dir().join("journal.sqlite")).unwrap();
    wait_for(Duration::from_secs(20), || {
        let s = dropscan::journal::read_summary(&w.state_dir().join("journal.sqlite")).ok()?;
        s.per_state
            .iter()
            .any(|(st, n)| st == "done" && *n == 4)
            .then_some(())
    })
    .await
    .expect("records done");
    journal.prune(Duration::ZERO, Duration::ZERO).await.unwrap();

    let kept = list(&cfg, "quarantine", false).await;
    assert_eq!(kept.len(), 4, "{kept:?}");
    let fp = id_of(&kept, "fp/report.doc");
    let e = entry(&kept, &fp);
    assert_eq!(e["sha256"], hex_sha(&samples[0].1));
    assert_eq!(e["verdict"], "detect");
    assert_eq!(e["size"], samples[0].1.len());
    assert!(!e["scan_ids"].as_array().unwrap().is_empty(), "{e}");
    assert_eq!(e["status"], "kept");
    assert!(
        e["current"]
            .as_str()
            .unwrap()
            .starts_with(w.quarantine.to_str().unwrap())
    );

    // Release: to clean at the original relative path, content intact, mode 0644, audited.
    let out = dropscan(&[
        "quarantine",
        "release",
        &fp,
        "--reason",
        "false positive: our own test file",
        "--config",
        &c,
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let released = w.clean.join("fp/report.doc");
    assert_eq!(std::fs::read(&released).unwrap(), samples[0].1);
    assert_eq!(
        std::fs::metadata(&released).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert!(!w.quarantine.join("fp/report.doc").exists());
    assert!(!w.quarantine.join("fp/report.doc.dropscan.json").exists());
    // Released twice: refused.
    let again = dropscan(&[
        "quarantine",
        "release",
        &fp,
        "--reason",
        "again",
        "--config",
        &c,
    ])
    .await;
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));

    // Restore: where the analyst wants it.
    let restore_id = id_of(&kept, "analysis.bin");
    let lab = w.dir.path().join("lab");
    std::fs::create_dir_all(&lab).unwrap();
    let to = lab.join("sample.bin");
    let out = dropscan(&[
        "quarantine",
        "restore",
        &restore_id,
        "--to",
        to.to_str().unwrap(),
        "--reason",
        "analysis",
        "--config",
        &c,
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&to).unwrap(), samples[1].1);
    assert!(!w.quarantine.join("analysis.bin").exists());

    // Tampered with in quarantine: refused, nothing moves, the refusal is audited.
    let tampered_id = id_of(&kept, "tampered.com");
    let q = w.quarantine.join("tampered.com");
    std::fs::write(&q, b"something else entirely").unwrap();
    let out = dropscan(&[
        "quarantine",
        "release",
        &tampered_id,
        "--reason",
        "fp",
        "--config",
        &c,
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("SHA-256"), "{}", text(&out));
    assert!(q.exists());
    assert!(!w.clean.join("tampered.com").exists());
    assert!(
        World::files_in(&w.clean).len() == 1,
        "{:?}",
        World::files_in(&w.clean).keys()
    );

    // Purge: a dry run without --yes (nothing deleted, exit 0), then everything older than
    // 0 s goes.
    let out = dropscan(&["quarantine", "purge", "--older-than", "0s", "--config", &c]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(q.exists());
    let out = dropscan(&[
        "quarantine",
        "purge",
        "--older-than",
        "0s",
        "--yes",
        "--config",
        &c,
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        World::files_in(&w.quarantine).is_empty(),
        "{:?}",
        World::files_in(&w.quarantine).keys()
    );
    assert!(list(&cfg, "quarantine", false).await.is_empty());

    // The audit trail: every entry with what happened, by whom, why.
    let all = list(&cfg, "quarantine", true).await;
    assert_eq!(all.len(), 4);
    let actions = |id: &str| -> Vec<String> {
        entry(&all, id)["audit"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["action"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(entry(&all, &fp)["status"], "released");
    assert_eq!(actions(&fp), ["release", "release-refused"]);
    let rel = &entry(&all, &fp)["audit"][0];
    assert_eq!(rel["reason"], "false positive: our own test file");
    assert!(!rel["user"].as_str().unwrap().is_empty());
    assert_eq!(rel["detail"]["to"], released.display().to_string());
    assert_eq!(entry(&all, &restore_id)["status"], "restored");
    assert_eq!(actions(&tampered_id), ["release-refused", "purge"]);
    assert_eq!(entry(&all, &tampered_id)["status"], "purged");

    // The agent ran all along, and stops cleanly.
    let (r, _) = agent.stop().await;
    r.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_file_is_retried_into_the_pipeline_after_the_size_limit_is_raised() {
    let w = World::new(EmulatorConfig {
        scan_delay: Duration::from_millis(100),
        max_object_size: 1000,
        ..EmulatorConfig::default()
    })
    .await;
    let cfg = w.write_config();
    let c = cfg.to_str().unwrap().to_string();
    let agent = w.start_agent();
    let big = bytes(7, 5000);
    w.drop_file("large/upload.bin", &big);
    let placed = w.wait_placed(1, Duration::from_secs(30)).await;
    assert_eq!(placed[&PathBuf::from("large/upload.bin")], Outcome::Failed);

    let failed = list(&cfg, "failed", false).await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    let id = id_of(&failed, "large/upload.bin");
    assert!(
        failed[0]["reason"].as_str().unwrap().contains("too large"),
        "{failed:?}"
    );

    // The server takes larger files now; the restarted agent learns it at start-up.
    let (r, _) = agent.stop().await;
    r.unwrap();
    w.emulator().state().set_max_object_size(10_000_000);
    let agent = w.start_agent();
    let out = dropscan(&[
        "failed",
        "retry",
        &id,
        "--reason",
        "limit raised",
        "--config",
        &c,
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let clean = wait_for(Duration::from_secs(30), || {
        std::fs::read(w.clean.join("large/upload.bin")).ok()
    })
    .await
    .expect("the retried file reaches clean");
    assert_eq!(clean, big);
    assert!(World::files_in(&w.failed).is_empty());
    assert!(list(&cfg, "failed", false).await.is_empty());
    let all = list(&cfg, "failed", true).await;
    let e = entry(&all, &id);
    assert_eq!(e["status"], "retried");
    assert_eq!(e["audit"][0]["action"], "retry");
    assert_eq!(e["audit"][0]["reason"], "limit raised");
    let (r, _) = agent.stop().await;
    r.unwrap();
}

/// Runs `dropscan ARGS` under `strace`, killed (SIGKILL) on entry to the `n`-th call of
/// `syscalls` in one thread, before that call is made. Returns whether it was killed (`None`:
/// no strace). (strace 6.1 counts `when=N` wrongly with `--seccomp-bpf`: not used here.)
async fn killed_on_entry_to(syscalls: &str, n: usize, args: &[&str]) -> Option<bool> {
    let strace = crate::shares_fixture::find_tool("strace")?;
    let mut cmd = std::process::Command::new(strace);
    cmd.args(["-f", "-qq", "-o", "/dev/null", "-e"])
        .arg(format!("trace={syscalls}"))
        .arg("-e")
        .arg(format!("inject={syscalls}:signal=SIGKILL:when={n}"))
        .arg(env!("CARGO_BIN_EXE_dropscan"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    Some(!out.status.success())
}

/// The audit trail of entry `id` in `all`, as action names.
fn actions_of(all: &[serde_json::Value], id: &str) -> Vec<String> {
    entry(all, id)["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap().to_string())
        .collect()
}

/// Finding 3 of issue 17: a `failed retry` killed mid-copy (failed on another filesystem),
/// after the failed file was removed and before its verified copy was renamed into the inbox,
/// left the only copy as a hidden temp in the inbox, a re-run refused for 10 minutes and then
/// said "vanished", and `failed list` kept showing the file. The next run finishes the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_retry_killed_mid_copy_is_finished_by_the_next_run_not_stranded_in_the_inbox() {
    let Some(k) = crate::kill_points_tools::kept_world(true, 0, 1).await else {
        return;
    };
    let (id, rel, body) = k.failed[0].clone();
    let id = id.to_string();
    let c = k.cfg.to_str().unwrap();
    let args = [
        "failed",
        "retry",
        &id,
        "--reason",
        "limit raised",
        "--config",
        c,
    ];
    // Killed on entry to its second rename (the first one fails: another filesystem): the
    // failed file is gone, the copy in its temp.
    let Some(killed) = killed_on_entry_to("rename,renameat,renameat2", 2, &args).await else {
        eprintln!("skipped: strace not installed (Debian package strace)");
        return;
    };
    assert!(killed);
    let temps = crate::kill_points_tools::temps_in(&k.w.inbox);
    assert_eq!(temps.len(), 1, "the copy waits in its temp: {temps:?}");
    assert!(!k.w.failed.join(&rel).exists());

    let out = dropscan(&args).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("interrupted"), "{}", text(&out));
    assert_eq!(std::fs::read(k.w.inbox.join(&rel)).unwrap(), body);
    assert!(crate::kill_points_tools::temps_in(&k.w.inbox).is_empty());
    assert!(World::files_in(&k.w.failed).is_empty());
    assert!(list(&k.cfg, "failed", false).await.is_empty());
    let all = list(&k.cfg, "failed", true).await;
    assert_eq!(entry(&all, &id)["status"], "retried");
    assert_eq!(actions_of(&all, &id), ["retry"]);
    let done = &entry(&all, &id)["audit"][0];
    assert_eq!(
        done["detail"]["completed_after_interruption"], true,
        "{done}"
    );
    assert_eq!(done["reason"], "limit raised");
}

/// Finding 4 of issue 17: a `quarantine release` killed after its copy reached clean left the
/// detected file in clean with no `release` audit row, while `quarantine list` still showed it
/// kept. The target is recorded before the move; the next run completes the release (never a
/// second copy) and audits it as completed after an interruption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_release_killed_after_the_copy_reached_clean_is_completed_and_audited() {
    let Some(strace) = crate::shares_fixture::find_tool("strace") else {
        eprintln!("skipped: strace not installed (Debian package strace)");
        return;
    };
    let k = crate::kill_points_tools::kept_world(false, 1, 0)
        .await
        .unwrap();
    let (id, rel, body) = k.quarantined[0].clone();
    let id = id.to_string();
    let c = k.cfg.to_str().unwrap();
    let args = [
        "quarantine",
        "release",
        &id,
        "--reason",
        "fp",
        "--config",
        c,
    ];
    let log = k.w.dir.path().join("strace.log");
    // Killed right after its rename into clean (held there half a second).
    let killed = crate::kill_points_tools::run_killed_at(
        &strace,
        &log,
        "rename,renameat,renameat2",
        500_000,
        1,
        &args,
    )
    .await;
    assert_eq!(killed, Some(1));
    assert_eq!(std::fs::read(k.w.clean.join(&rel)).unwrap(), body);
    assert!(!k.w.quarantine.join(&rel).exists());
    // Until a run finishes it, the list says what happened rather than "kept". The killed tool
    // may outlive its tracer for a moment, still holding its custody lock (then the list says
    // "busy"): wait until it is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let kept = loop {
        let kept = list(&k.cfg, "quarantine", false).await;
        if entry(&kept, &id)["status"] != "busy:release" || std::time::Instant::now() >= deadline {
            break kept;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        entry(&kept, &id)["status"],
        "interrupted:release",
        "{kept:?}"
    );

    let out = dropscan(&args).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("interrupted"), "{}", text(&out));
    assert_eq!(World::files_in(&k.w.clean).len(), 1, "released once");
    assert_eq!(std::fs::read(k.w.clean.join(&rel)).unwrap(), body);
    assert!(World::files_in(&k.w.quarantine).is_empty());
    assert!(list(&k.cfg, "quarantine", false).await.is_empty());
    let all = list(&k.cfg, "quarantine", true).await;
    assert_eq!(entry(&all, &id)["status"], "released");
    assert_eq!(actions_of(&all, &id), ["release"]);
    let done = &entry(&all, &id)["audit"][0];
    assert_eq!(
        done["detail"]["completed_after_interruption"], true,
        "{done}"
    );
    assert_eq!(
        done["detail"]["to"],
        k.w.clean.join(&rel).display().to_string()
    );
}

/// Finding 5 of issue 17: a tool stopped by Ctrl-C (SIGINT) left its entry "busy" for 10
/// minutes. Custody is an `flock` held for the tool's life: while it runs, a second tool is
/// refused; once it is gone, the next run takes over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_stopped_by_ctrl_c_locks_nothing() {
    let Some(strace) = crate::shares_fixture::find_tool("strace") else {
        eprintln!("skipped: strace not installed (Debian package strace)");
        return;
    };
    let k = crate::kill_points_tools::kept_world(false, 1, 0)
        .await
        .unwrap();
    let (id, rel, body) = k.quarantined[0].clone();
    let id_s = id.to_string();
    let c = k.cfg.to_str().unwrap();
    let args = [
        "quarantine",
        "release",
        &id_s,
        "--reason",
        "fp",
        "--config",
        c,
    ];
    let log = k.w.dir.path().join("strace.log");
    // Every fsync held 2 s: the tool is still at work once its custody is in the journal.
    let group =
        crate::kill_points_tools::spawn_traced(&strace, &log, "fsync,fdatasync", 2_000_000, &args);
    let journal = k.w.state_dir().join("journal.sqlite");
    wait_for(Duration::from_secs(60), || {
        let conn = rusqlite::Connection::open(&journal).ok()?;
        conn.query_row("SELECT status FROM custody WHERE file_id = ?1", [id], |r| {
            r.get::<_, String>(0)
        })
        .ok()
        .filter(|s| s.starts_with("busy:"))
    })
    .await
    .expect("the first run takes custody");
    let second = dropscan(&args).await;
    assert_eq!(second.status.code(), Some(2), "{}", text(&second));
    assert!(text(&second).contains("another tool"), "{}", text(&second));
    // Ctrl-C: SIGINT to the tool, which dies of it (it installs no handler).
    let pid = crate::kill_points_tools::traced_pid(&group, &log).expect("the traced tool");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let mut group = group;
    let ended = wait_for(Duration::from_secs(30), || group.0.try_wait().unwrap()).await;
    assert!(ended.is_some(), "the tool ends on SIGINT");

    // At once, not in 10 minutes.
    let out = dropscan(&args).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(k.w.clean.join(&rel)).unwrap(), body);
    assert!(World::files_in(&k.w.quarantine).is_empty());
    let all = list(&k.cfg, "quarantine", true).await;
    assert_eq!(entry(&all, &id_s)["status"], "released");
    let actions = actions_of(&all, &id_s);
    assert_eq!(
        actions.iter().filter(|a| *a == "release").count(),
        1,
        "{actions:?}"
    );
}
