//! The quarantine and failed tools killed at each durable step: `quarantine release`,
//! `quarantine restore` and `failed retry` run as the real binary under `strace`, and are killed
//! (SIGKILL) right after the N-th `rename`/`renameat`/`renameat2`/`fsync`/`fdatasync` of the whole
//! process (the journal's commits included), for every N the action reaches, with the
//! destination on the kept file's filesystem and on another one (/dev/shm, tmpfs). The same
//! command is then run again, unkilled, and must leave: the file in exactly one place with its
//! bytes, no temp anywhere, the audit trail with one row for the action (and none refused), and
//! `quarantine list` / `failed list` true.
//!
//! As in `kill_points.rs`, each traced call is held a moment on its way out and the harness
//! kills the tool once the log shows the N-th (strace's own `when=N` counts per thread). The
//! hold is short here (the tool is one sequential task; a late kill lands on a later point,
//! which is still a kill point): the log's count after the kill says which point was hit.
//!
//! Skipped with a printed reason where `strace` is missing (`.ci/run` installs it), and the
//! other-filesystem rounds where /dev/shm is missing or on the same filesystem.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dropscan::emulator::EmulatorConfig;

use crate::kill_points::{Group, kill_group};
use crate::quarantine_tools::{dropscan, text};
use crate::shares_fixture::find_tool;
use crate::util::{EICAR, World, bytes};

const LIMIT: Duration = Duration::from_secs(60);
/// The durable calls: every kill point is right after one of them.
pub(crate) const DURABLE: &str = "rename,renameat,renameat2,fsync,fdatasync";
/// How long each traced call is held on its way out (µs), for the harness to kill there.
const HOLD_US: u32 = 40_000;
/// More kill points than this for one action means the loop would not end (an action has
/// about a dozen: three journal commits, the copy's fsync, the folders' fsyncs, one rename).
const MAX_KILL_POINTS: usize = 30;

/// Kept entries made by a real agent run: quarantined and failed files, with the agent stopped.
pub(crate) struct KeptWorld {
    pub w: World,
    /// The config file the tools are run with.
    pub cfg: PathBuf,
    /// The other filesystem's folder (clean, failed and restores there), when cross-filesystem.
    pub other: Option<tempfile::TempDir>,
    /// (id, relative path, bytes) of each quarantined file.
    pub quarantined: Vec<(i64, String, Vec<u8>)>,
    /// (id, relative path, bytes) of each failed file.
    pub failed: Vec<(i64, String, Vec<u8>)>,
}

impl KeptWorld {
    /// Where restores go in this world (beside the kept files, or on the other filesystem).
    pub(crate) fn lab(&self) -> PathBuf {
        let lab = match &self.other {
            Some(o) => o.path().join("lab"),
            None => self.w.dir.path().join("lab"),
        };
        std::fs::create_dir_all(&lab).unwrap();
        lab
    }

    /// Every folder a kept file may be in, or move to.
    pub(crate) fn folders(&self) -> Vec<PathBuf> {
        let w = &self.w;
        vec![
            w.inbox.clone(),
            w.clean.clone(),
            w.quarantine.clone(),
            w.failed.clone(),
            self.lab(),
        ]
    }
}

/// An agent puts `quarantined` EICAR variants into quarantine and `failed` files too large for
/// the emulator into failed, and stops. With `cross_fs`, clean and failed are on /dev/shm (the
/// inbox and quarantine stay here), so that a release and a retry cross filesystems; `None`
/// (with a printed reason) where /dev/shm is missing or on this filesystem.
pub(crate) async fn kept_world(
    cross_fs: bool,
    quarantined: usize,
    failed: usize,
) -> Option<KeptWorld> {
    let mut w = World::new(EmulatorConfig {
        scan_delay: Duration::from_millis(50),
        max_object_size: 1000,
        ..EmulatorConfig::default()
    })
    .await;
    let mut cfg = w.write_config();
    let mut other = None;
    if cross_fs {
        let Ok(o) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("skipped: no /dev/shm, so no other filesystem");
            return None;
        };
        if std::fs::metadata(o.path()).unwrap().dev() == std::fs::metadata(&w.inbox).unwrap().dev()
        {
            eprintln!("skipped: /dev/shm is on the inbox's filesystem");
            return None;
        }
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            "clean_dir = \"out/clean\"\nquarantine_dir = \"out/quarantine\"\nfailed_dir = \"out/failed\"",
            &format!(
                "clean_dir = \"{0}/clean\"\nquarantine_dir = \"out/quarantine\"\nfailed_dir = \"{0}/failed\"",
                o.path().display()
            ),
        );
        assert!(text.contains("/dev/shm"));
        cfg = w.dir.path().join("cross.toml");
        std::fs::write(&cfg, text).unwrap();
        w.clean = o.path().join("clean");
        w.failed = o.path().join("failed");
        other = Some(o);
    }
    let q: Vec<(String, Vec<u8>)> = (0..quarantined)
        .map(|i| {
            (
                format!("q/{i:03}.com"),
                [EICAR, format!(" kept {i}").as_bytes()].concat(),
            )
        })
        .collect();
    let f: Vec<(String, Vec<u8>)> = (0..failed)
        .map(|i| (format!("f/{i:03}.bin"), bytes(700 + i as u64, 3000)))
        .collect();
    for (rel, body) in q.iter().chain(&f) {
        w.drop_file(rel, body);
    }
    let agent = dropscan::app::Agent::new(dropscan::config::Config::load(&cfg).unwrap()).unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(agent.run(token.clone()));
    w.wait_placed(q.len() + f.len(), LIMIT).await;
    token.cancel();
    task.await.unwrap().unwrap();
    let journal = dropscan::journal::Journal::open(&w.state_dir().join("journal.sqlite")).unwrap();
    let ids = |outcome, files: &[(String, Vec<u8>)]| {
        let journal = journal.clone();
        let files = files.to_vec();
        async move {
            let kept = journal.kept(outcome, false).await.unwrap();
            assert_eq!(kept.len(), files.len());
            files
                .into_iter()
                .map(|(rel, body)| {
                    let k = kept
                        .iter()
                        .find(|k| k.record.rel_path == Path::new(&rel))
                        .unwrap();
                    (k.record.id, rel, body)
                })
                .collect::<Vec<_>>()
        }
    };
    let quarantined = ids(dropscan::journal::Outcome::Quarantine, &q).await;
    let failed = ids(dropscan::journal::Outcome::Failed, &f).await;
    Some(KeptWorld {
        w,
        cfg,
        other,
        quarantined,
        failed,
    })
}

/// The PID of the tool that `strace` (`group`'s leader) runs; else a thread of it, from the
/// first line of `log` (a signal sent to any thread is the whole process's).
pub(crate) fn traced_pid(group: &Group, log: &Path) -> Option<i32> {
    let tracer = group.0.id();
    let children = std::fs::read_to_string(format!("/proc/{tracer}/task/{tracer}/children"))
        .unwrap_or_default();
    let from_log = std::fs::read_to_string(log).unwrap_or_default();
    children
        .split_whitespace()
        .next()
        .or_else(|| from_log.split_whitespace().next())?
        .parse()
        .ok()
}

/// Starts `dropscan ARGS` under `strace`, each call of `syscalls` held `hold_us` on its way out
/// and logged to `log`; in its own process group (killed whole when dropped).
pub(crate) fn spawn_traced(
    strace: &Path,
    log: &Path,
    syscalls: &str,
    hold_us: u32,
    args: &[&str],
) -> Group {
    std::fs::remove_file(log).ok();
    // SIGINT as a terminal's Ctrl-C finds it: a test run started in the background of a
    // non-interactive shell (`cmd &`, nohup) inherits it ignored, and so did the tool, which
    // then outlived its Ctrl-C (`quarantine_tools::a_tool_stopped_by_ctrl_c_locks_nothing`
    // failed that way, and only that way).
    Group(
        Command::new("env")
            .arg("--default-signal=INT")
            .arg(strace)
            .args(["-f", "--seccomp-bpf", "-qq", "-o"])
            .arg(log)
            .arg("-e")
            .arg(format!("trace={syscalls}"))
            .arg("-e")
            .arg(format!("inject={syscalls}:delay_exit={hold_us}"))
            .arg(env!("CARGO_BIN_EXE_dropscan"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap(),
    )
}

/// How many traced calls have returned so far.
pub(crate) fn calls_done(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.matches("(DELAYED)").count())
        .unwrap_or(0)
}

/// Runs `dropscan ARGS` killed right after the `n`-th call of `syscalls`: `Some(calls)` the
/// calls done when it died (normally `n`), `None` if it finished first.
pub(crate) async fn run_killed_at(
    strace: &Path,
    log: &Path,
    syscalls: &str,
    hold_us: u32,
    n: usize,
    args: &[&str],
) -> Option<usize> {
    let mut group = spawn_traced(strace, log, syscalls, hold_us, args);
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        if calls_done(log) >= n {
            kill_group(&mut group.0);
            return Some(calls_done(log));
        }
        if group.0.try_wait().unwrap().is_some() {
            return None;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tool neither reached call {n} nor ended"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Every name below `dir` that ends like one of our temps.
pub(crate) fn temps_in(dir: &Path) -> Vec<PathBuf> {
    crate::util::entries_below(dir)
        .into_iter()
        .filter(|p| {
            !p.symlink_metadata().is_ok_and(|m| m.is_dir())
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(".dropscan-partial"))
        })
        .collect()
}

/// Every path below `dirs` whose content is `body` (hidden names included, sidecars not).
pub(crate) fn places_of(dirs: &[PathBuf], body: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = dirs.to_vec();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file()
                && !e.file_name().to_string_lossy().ends_with(".dropscan.json")
                && std::fs::read(e.path()).ok().as_deref() == Some(body)
            {
                out.push(e.path());
            }
        }
    }
    out
}

/// `<kind> list --json [--all]` parsed.
pub(crate) async fn listed(cfg: &Path, kind: &str, all: bool) -> Vec<serde_json::Value> {
    let c = cfg.to_str().unwrap();
    let mut args = vec![kind, "list", "--json", "--config", c];
    if all {
        args.push("--all");
    }
    let out = dropscan(&args).await;
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One of the tools' actions, as the kill-point rounds run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Release,
    Restore,
    Retry,
}

impl Action {
    fn kind(self) -> &'static str {
        if self == Action::Retry {
            "failed"
        } else {
            "quarantine"
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Release => "release",
            Action::Restore => "restore",
            Action::Retry => "retry",
        }
    }

    fn status(self) -> &'static str {
        match self {
            Action::Release => "released",
            Action::Restore => "restored",
            Action::Retry => "retried",
        }
    }
}

/// Kills `action` on a new entry at every `stride`-th durable call until a round is no longer
/// killed; after each, runs it again and checks the promises. Prints the kill points hit.
async fn every_kill_point(action: Action, cross_fs: bool, stride: usize) {
    let Some(strace) = find_tool("strace") else {
        eprintln!("skipped: strace not installed (Debian package strace)");
        return;
    };
    let rounds = MAX_KILL_POINTS / stride + 1;
    let (q, f) = if action == Action::Retry {
        (0, rounds)
    } else {
        (rounds, 0)
    };
    let Some(k) = kept_world(cross_fs, q, f).await else {
        return;
    };
    let entries = if action == Action::Retry {
        &k.failed
    } else {
        &k.quarantined
    };
    let c = k.cfg.to_str().unwrap().to_string();
    let log = k.w.dir.path().join("strace.log");
    let lab = k.lab();
    let mut hit = BTreeSet::new();
    for (round, n) in (1..=MAX_KILL_POINTS).step_by(stride).enumerate() {
        let (id, rel, body) = &entries[round];
        let id_s = id.to_string();
        let to = lab.join(format!("{id}.bin"));
        let to_s = to.to_str().unwrap().to_string();
        let mut args = vec![action.kind(), action.verb(), id_s.as_str()];
        if action == Action::Restore {
            args.extend(["--to", to_s.as_str()]);
        }
        args.extend(["--reason", "kill points", "--config", c.as_str()]);
        let killed = run_killed_at(&strace, &log, DURABLE, HOLD_US, n, &args).await;
        let at = format!("{action:?} (cross-fs {cross_fs}) killed after call {n} ({killed:?})");
        if let Some(calls) = killed {
            hit.insert(calls);
        }
        let before = listed(&k.cfg, action.kind(), true).await;
        let finished_before = before
            .iter()
            .any(|e| e["id"] == *id && e["status"] == action.status());
        let out = dropscan(&args).await;
        if killed.is_some() && !finished_before {
            assert!(out.status.success(), "{at}: run again: {}", text(&out));
        } else if killed.is_some() {
            // Killed after its custody ended: the action is done, a second one refused.
            assert_eq!(out.status.code(), Some(2), "{at}: {}", text(&out));
            assert!(text(&out).contains("no longer in"), "{at}: {}", text(&out));
        }

        // The file: in exactly one place, the right one, whole.
        let expected = match action {
            Action::Release => k.w.clean.join(rel),
            Action::Restore => to.clone(),
            Action::Retry => k.w.inbox.join(rel),
        };
        let places = places_of(&k.folders(), body);
        assert_eq!(places, vec![expected.clone()], "{at}");
        let temps: Vec<_> = k.folders().iter().flat_map(|d| temps_in(d)).collect();
        assert!(temps.is_empty(), "{at}: temps left: {temps:?}");
        let from = if action == Action::Retry {
            &k.w.failed
        } else {
            &k.w.quarantine
        };
        let mut side = from.join(rel).into_os_string();
        side.push(".dropscan.json");
        assert!(!Path::new(&side).exists(), "{at}: sidecar left");

        // The journal: the listings and the audit trail say so.
        let kept = listed(&k.cfg, action.kind(), false).await;
        assert!(
            kept.iter().all(|e| e["id"] != *id),
            "{at}: still listed: {kept:?}"
        );
        let all = listed(&k.cfg, action.kind(), true).await;
        let e = all.iter().find(|e| e["id"] == *id).unwrap();
        assert_eq!(e["status"], action.status(), "{at}: {e}");
        let actions: Vec<&str> = e["audit"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions.iter().filter(|a| **a == action.verb()).count(),
            1,
            "{at}: {actions:?}"
        );
        // Refused only by the second run when the first had finished (and that is audited).
        let refused = actions.iter().filter(|a| a.ends_with("-refused")).count();
        assert_eq!(refused, usize::from(finished_before), "{at}: {actions:?}");
        let done = e["audit"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["action"] == action.verb())
            .unwrap();
        assert_eq!(
            done["detail"]["to"],
            expected.display().to_string(),
            "{at}: {done}"
        );
        if killed.is_none() && hit.is_empty() {
            eprintln!("skipped: strace traced nothing here (ptrace not permitted?)");
            return;
        }
        if killed.is_none() {
            // The unkilled run's durable calls, in order: what the kill points were.
            let calls: Vec<String> = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("(DELAYED)"))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
                .collect();
            eprintln!(
                "{action:?} (cross-fs {cross_fs}): {} kill points hit: {hit:?}; the calls: {calls:#?}",
                hit.len()
            );
            return;
        }
    }
    panic!("more than {MAX_KILL_POINTS} kill points for {action:?}: the loop would not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_release_killed_at_every_durable_step_is_finished_by_the_next_run() {
    every_kill_point(Action::Release, false, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_release_to_another_filesystem_killed_at_every_durable_step_is_finished_by_the_next_run()
 {
    every_kill_point(Action::Release, true, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_restore_killed_at_every_durable_step_is_finished_by_the_next_run() {
    every_kill_point(Action::Restore, false, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_restore_to_another_filesystem_killed_at_every_durable_step_is_finished_by_the_next_run()
 {
    every_kill_point(Action::Restore, true, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_retry_killed_at_every_durable_step_is_finished_by_the_next_run() {
    every_kill_point(Action::Retry, false, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_retry_from_another_filesystem_killed_at_every_durable_step_is_finished_by_the_next_run()
 {
    every_kill_point(Action::Retry, true, 1).await;
}
