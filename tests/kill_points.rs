//! Killed at each durable step: the real binary runs under `strace`, and is killed (SIGKILL) right
//! after the N-th `rename`/`renameat2`, or the N-th `fsync`/`fdatasync`, counted over the whole
//! process, for every N that the work reaches. (strace's own `inject=…:when=N` counts per thread:
//! with the work spread over the blocking pool's threads, most calls were never a kill point.
//! Each traced call is held for a moment on its way out instead, and the harness kills the agent
//! once the log shows the N-th.) Between them these are the claim's rename into staging (under its lease), the
//! private copy's fsync and its rename over the staged name (or the two renames that keep the
//! original), the journal's commits, and the release's rename into place. A second, unkilled run
//! must then finish every file: each in exactly one destination, byte for byte, nothing left in
//! staging or the inbox.
//!
//! Skipped with a printed reason where `strace` is missing (`.ci/run` installs it).

#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use crate::kill_points_tools::temps_in;
use crate::shares_fixture::find_tool;
use crate::util::{EICAR, Outcome, World, bytes, poll_every, wait_for};

const LIMIT: Duration = Duration::from_secs(60);
/// How long each traced call is held on its way out. Every call before the N-th is held too, so
/// a round costs N times this: it was 200 ms, which made a round of 50 fsyncs cost 10 s and the
/// fsync test alone 3 minutes of CI. A kill that still comes late (a loaded machine) lands on a
/// later call: [`killed_round`] notices and runs the round again with a longer hold.
const HOLD: Duration = Duration::from_millis(50);
/// The longest hold a round is run again with before the machine is declared too loaded.
const MAX_HOLD: Duration = Duration::from_millis(1600);
/// How often the strace log is read while waiting for the N-th call: well inside [`HOLD`].
const WATCH: Duration = Duration::from_millis(5);
/// Kill points per syscall set at most (the journal's commits make the fsyncs the most).
const MAX_KILL_POINTS: usize = 150;

/// The files of one round: (name, content, where it must end).
pub(crate) type Drops = Vec<(&'static str, Vec<u8>, Outcome)>;

/// The files of one round.
fn drops() -> Drops {
    vec![
        ("a.bin", bytes(11, 300_000), Outcome::Clean),
        ("sub/b.txt", bytes(12, 4_000), Outcome::Clean),
        ("eicar.com", EICAR.to_vec(), Outcome::Quarantine),
    ]
}

/// One round at kill point `n`, made again (`make`: a new world, its files dropped) while the kill
/// came late, each time with twice the hold, from `hold` up to [`MAX_HOLD`]. A late kill (a loaded
/// machine reading the log after the `n`-th call's hold ended) lands on whatever the agent did
/// next: another kill point, and kill point `n` would go unchecked. Returns the world, what
/// `make` made with it, and the hold the agent was killed in time with (None: not killed, the
/// work never reached call `n`).
pub(crate) async fn killed_round<T>(
    strace: &PathBuf,
    syscalls: &str,
    n: usize,
    n_files: usize,
    mut hold: Duration,
    mut make: impl AsyncFnMut() -> (World, T),
) -> (World, T, Option<Duration>) {
    loop {
        let (w, t) = make().await;
        match run_killed_at(&w, strace, syscalls, n, n_files, hold).await {
            Some(late) if late + hold / 5 >= hold => {
                assert!(
                    hold < MAX_HOLD,
                    "{syscalls} #{n}: the kill still came {late:?} after the call returned with a \
                     hold of {hold:?}: the machine is too loaded for kill points"
                );
                eprintln!(
                    "{syscalls} #{n}: killed {late:?} after the call returned, past its hold of \
                     {hold:?}: again with a hold of {:?}",
                    hold * 2
                );
                wait_unlocked(&w).await;
                hold *= 2;
            }
            killed => return (w, t, killed.map(|_| hold)),
        }
    }
}

/// How long after the `n`-th held call returned the kill came (at `killed_at`), from strace's log
/// (`-ttt -T`: a line's time is the call's entry, or its return on a `<... resumed>` line; `<T>`
/// is the time in the call, the hold not included).
fn late_by(log: &str, n: usize, killed_at: SystemTime) -> Duration {
    let line = log
        .lines()
        .filter(|l| l.contains("(DELAYED)"))
        .nth(n - 1)
        .unwrap_or_else(|| panic!("no call #{n} in the strace log"));
    let at: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no time on strace's line {line:?}"));
    // Without its `<T>` (not written yet when strace was killed), the call is taken to have
    // returned at its entry: a kill can only look later than it was, and the round be run again.
    let took: f64 = if line.contains(" resumed>") {
        0.0
    } else {
        line.rsplit('<')
            .next()
            .and_then(|t| t.trim_end_matches('>').parse().ok())
            .unwrap_or(0.0)
    };
    let returned = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(at + took);
    killed_at.duration_since(returned).unwrap_or_default()
}

/// Runs the agent under strace, killed right after the `n`-th call of `syscalls` in the whole
/// process (each call is held `hold` on its way out, and the log is read every [`WATCH`], so
/// the kill lands before its thread goes on). Returns how long after that call returned the kill
/// came (None: not killed; the work never reached call `n`, and the agent was stopped once
/// everything was placed).
async fn run_killed_at(
    w: &World,
    strace: &PathBuf,
    syscalls: &str,
    n: usize,
    n_files: usize,
    hold: Duration,
) -> Option<Duration> {
    let log = w.dir.path().join("strace.log");
    let mut child = Group(
        Command::new(strace)
            .args(["-f", "--seccomp-bpf", "-qq", "-ttt", "-T", "-o"])
            .arg(&log)
            .arg("-e")
            .arg(format!("trace={syscalls}"))
            .arg("-e")
            .arg(format!("inject={syscalls}:delay_exit={}", hold.as_micros()))
            .arg(env!("CARGO_BIN_EXE_dropscan"))
            .args(["run", "--config"])
            .arg(w.write_config())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, killed whole at the end: killing strace alone would detach a
            // traced agent that was not killed, and leave it running.
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let calls = || {
        std::fs::read_to_string(&log)
            .map(|t| t.matches("(DELAYED)").count())
            .unwrap_or(0)
    };
    let killed_at = std::cell::Cell::new(None);
    let reached = |child: &mut Child| {
        if calls() >= n {
            killed_at.set(Some(SystemTime::now()));
            kill_group(child);
            return true;
        }
        false
    };
    // Every call before the n-th is held too.
    let limit = LIMIT + hold * u32::try_from(n).unwrap();
    let killed = poll_every(WATCH, limit, || {
        if reached(child) {
            return Some(true);
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the agent died by itself"
        );
        (w.outcomes().len() == n_files).then_some(false)
    })
    .await
    .expect("the agent was neither killed nor finished");
    // Everything is placed: a kill point after that (a sidecar, a kept original's removal) may
    // still come.
    let killed = killed
        || poll_every(WATCH, Duration::from_secs(3), || {
            reached(child).then_some(())
        })
        .await
        .is_some();
    killed.then(|| {
        late_by(
            &std::fs::read_to_string(&log).unwrap(),
            n,
            killed_at.get().unwrap(),
        )
    })
}

/// Kills (SIGKILL) and reaps the process group `child` leads.
pub(crate) fn kill_group(child: &mut Child) {
    if let Some(pgid) = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL).ok();
    }
    child.wait().ok();
}

/// Waits until no process holds the agent's lock on the state folder: a killed tracee may
/// outlive its tracer for a moment.
async fn wait_unlocked(w: &World) {
    let lock = w.state_dir().join("dropscan.lock");
    let free = wait_for(LIMIT, || {
        let Ok(f) = std::fs::File::open(&lock) else {
            return Some(());
        };
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()
    })
    .await;
    assert!(free.is_some(), "the killed agent never let go of its lock");
}

/// A child running in its own process group, which is killed (SIGKILL) and reaped on drop.
pub(crate) struct Group(pub(crate) Child);

impl Drop for Group {
    fn drop(&mut self) {
        kill_group(&mut self.0);
    }
}

/// One round per kill point (every `stride`-th) until a round is no longer killed, with the first
/// `files` of [`drops`].
async fn every_kill_point(syscalls: &str, watch_extra: &str, files: usize, stride: usize) {
    let set: Drops = drops().into_iter().take(files).collect();
    every_kill_point_of(&set, syscalls, watch_extra, stride).await;
}

/// One round per kill point (every `stride`-th) until a round is no longer killed, with `set`
/// dropped before the agent starts (so the small ones are claimed and owned as one batch).
pub(crate) async fn every_kill_point_of(
    set: &Drops,
    syscalls: &str,
    watch_extra: &str,
    stride: usize,
) {
    rounds(set, syscalls, watch_extra, stride, false).await;
}

/// [`every_kill_point_of`] with every file of `set` uploaded before the traced start (by an
/// agent stopped once all are uploaded, while their scans still run): the traced agent finds
/// every scan done at its first poll and decides them together, so that they are placed as one
/// batch, and its kill points are those of deciding and placing that batch.
pub(crate) async fn every_kill_point_decided_together(set: &Drops, syscalls: &str, stride: usize) {
    rounds(set, syscalls, "", stride, true).await;
}

/// How long each scan takes in [`every_kill_point_decided_together`]: longer than stopping the
/// agent that uploaded them.
pub(crate) const SCAN_TAKES: Duration = Duration::from_secs(2);

/// Starts an agent in-process, stops it once every file of `w`'s inbox is uploaded (`files`),
/// and waits out the scans: the next start decides them all at its first poll.
pub(crate) async fn upload_then_stop(w: &World, files: usize) {
    let agent = w.start_agent();
    let uploaded = wait_for(LIMIT, || {
        (w.emulator().state().stats().submits_accepted >= files as u64).then_some(())
    })
    .await;
    agent.stop().await.0.unwrap();
    assert!(uploaded.is_some(), "not every file was uploaded");
    tokio::time::sleep(SCAN_TAKES + Duration::from_millis(500)).await;
}

async fn rounds(set: &Drops, syscalls: &str, watch_extra: &str, stride: usize, together: bool) {
    let files = set.len();
    let drops = || set.iter().map(|(n, c, o)| (*n, c.clone(), *o));
    let Some(strace) = find_tool("strace") else {
        eprintln!("skipped: strace not installed (Debian package strace)");
        return;
    };
    for n in (1..=MAX_KILL_POINTS).step_by(stride) {
        let (w, (), killed) = killed_round(&strace, syscalls, n, files, HOLD, async || {
            let mut w = if together {
                World::new(dropscan::emulator::EmulatorConfig {
                    scan_delay: SCAN_TAKES,
                    ..dropscan::emulator::EmulatorConfig::default()
                })
                .await
            } else {
                World::quick().await
            };
            w.watch_extra = watch_extra.to_string();
            for (name, content, _) in drops() {
                w.drop_file(name, &content);
            }
            if together {
                upload_then_stop(&w, files).await;
            }
            (w, ())
        })
        .await;
        eprintln!("{syscalls} #{n}: killed {}", killed.is_some());
        wait_unlocked(&w).await;
        // The next start finishes the work.
        let agent = w.start_agent();
        let o = w.wait_placed(files, LIMIT).await;
        for (name, content, outcome) in drops() {
            let rel = PathBuf::from(name);
            let why = std::fs::read_to_string(w.failed.join(format!("{name}.dropscan.json")));
            assert_eq!(
                o.get(&rel),
                Some(&outcome),
                "killed at {syscalls} #{n}: {o:?} {why:?}"
            );
            let dir = match outcome {
                Outcome::Clean => &w.clean,
                Outcome::Quarantine => &w.quarantine,
                Outcome::Failed => &w.failed,
            };
            assert!(
                std::fs::read(dir.join(&rel)).unwrap() == content,
                "killed at {syscalls} #{n}: {name} changed"
            );
        }
        assert!(
            w.inbox_files().is_empty(),
            "killed at {syscalls} #{n}: left in the inbox: {:?}",
            w.inbox_files().keys()
        );
        let staging = w.inbox.join(".dropscan/test");
        let emptied = wait_for(LIMIT, || {
            let left: Vec<_> = std::fs::read_dir(&staging)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".owner" && n != ".lock")
                .collect();
            left.is_empty().then_some(())
        })
        .await;
        assert!(
            emptied.is_some(),
            "killed at {syscalls} #{n}: staging not emptied"
        );
        agent.stop().await.0.unwrap();
        if killed.is_none() {
            return;
        }
    }
    panic!("more than {MAX_KILL_POINTS} kill points for {syscalls}: the loop would not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_rename_of_claim_own_and_release_loses_nothing() {
    every_kill_point("rename,renameat,renameat2", "", 3, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_rename_while_originals_are_kept_loses_nothing() {
    every_kill_point(
        "rename,renameat,renameat2",
        "lease_check = \"off\"\nkeep_original = \"1s\"",
        3,
        1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_fsync_loses_nothing() {
    // One file, every other fsync: the journal's commits make most of them (46 for one file),
    // and each round costs seconds; the renames above are every one.
    every_kill_point("fsync,fdatasync", "", 1, 2).await;
}

/// What is done to the agent's surroundings between the kill and the restart.
#[derive(Clone, Copy, Debug)]
enum Disturb {
    /// The journal is moved aside (the obvious step after a crash that left it unreadable): a
    /// new, empty one is made at the restart.
    JournalAside,
    /// `clean_dir` now names another folder.
    CleanMoved,
}

/// The contents under `dir`, recursively (sidecars and hidden files excluded), with their paths.
fn contents(dir: &std::path::Path) -> Vec<(PathBuf, Vec<u8>)> {
    World::files_in(dir).into_iter().collect()
}

/// Kills the agent at every call of `syscalls` while it places two files into destinations on
/// another filesystem (a verified copy, so a temp exists), disturbs its surroundings, restarts it
/// and checks: each file's bytes in exactly one destination (clean, perhaps the earlier clean
/// folder, or quarantine), nothing left in the inbox, in staging or as a temp, and no record closed
/// "vanished".
async fn killed_then(syscalls: &str, disturb: Disturb) {
    let Some(strace) = find_tool("strace") else {
        eprintln!("skipped: strace not installed (Debian package strace)");
        return;
    };
    let drops = || drops().into_iter().filter(|(n, _, _)| *n != "sub/b.txt");
    let n_files = drops().count();
    if tempfile::tempdir_in("/dev/shm").is_err() {
        eprintln!("skipped: no /dev/shm for destinations on another filesystem");
        return;
    }
    for n in 1..=MAX_KILL_POINTS {
        let (mut w, other, killed) =
            killed_round(&strace, syscalls, n, n_files, HOLD, async || {
                let mut w = World::quick().await;
                let other = tempfile::tempdir_in("/dev/shm").unwrap();
                w.clean = other.path().join("clean");
                w.quarantine = other.path().join("quarantine");
                w.failed = other.path().join("failed");
                for (name, content, _) in drops() {
                    w.drop_file(name, &content);
                }
                (w, other)
            })
            .await;
        eprintln!(
            "{syscalls} #{n} then {disturb:?}: killed {}",
            killed.is_some()
        );
        wait_unlocked(&w).await;
        let first_clean = w.clean.clone();
        match disturb {
            Disturb::JournalAside => {
                for f in ["journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm"] {
                    let from = w.state_dir().join(f);
                    if from.exists() {
                        #[allow(clippy::disallowed_methods)]
                        std::fs::rename(&from, w.state_dir().join(format!("{f}.broken"))).unwrap();
                    }
                }
            }
            Disturb::CleanMoved => w.clean = other.path().join("clean-new"),
        }
        let agent = w.start_agent();
        let at = format!("killed at {syscalls} #{n}, then {disturb:?}");
        let settled = wait_for(LIMIT, || {
            let staging = w.inbox.join(".dropscan/test");
            let staged = std::fs::read_dir(&staging)
                .map(|r| {
                    r.flatten()
                        .filter(|e| e.file_name() != ".owner" && e.file_name() != ".lock")
                        .count()
                })
                .unwrap_or(0);
            let placed = contents(&first_clean).len()
                + contents(&w.clean).len() * usize::from(w.clean != first_clean)
                + contents(&w.quarantine).len();
            (placed >= n_files && staged == 0 && w.inbox_files().is_empty()).then_some(())
        })
        .await;
        agent.stop().await.0.unwrap();
        let mut clean = contents(&first_clean);
        if w.clean != first_clean {
            clean.extend(contents(&w.clean));
        }
        let quarantine = contents(&w.quarantine);
        let failed = contents(&w.failed);
        assert!(
            settled.is_some(),
            "{at}: not settled: clean {:?} quarantine {:?} failed {:?} inbox {:?}",
            clean.iter().map(|c| &c.0).collect::<Vec<_>>(),
            quarantine.iter().map(|c| &c.0).collect::<Vec<_>>(),
            failed.iter().map(|c| &c.0).collect::<Vec<_>>(),
            w.inbox_files().keys().collect::<Vec<_>>()
        );
        for (name, content, outcome) in drops() {
            let here = match outcome {
                Outcome::Clean => &clean,
                Outcome::Quarantine => &quarantine,
                Outcome::Failed => &failed,
            };
            let found: Vec<_> = here.iter().filter(|(_, c)| *c == content).collect();
            assert_eq!(
                found.len(),
                1,
                "{at}: {name} must be placed exactly once with its bytes: {:?}",
                found.iter().map(|(p, _)| p).collect::<Vec<_>>()
            );
        }
        assert_eq!(
            clean.len() + quarantine.len() + failed.len(),
            n_files,
            "{at}: a file placed twice or a stranger placed: clean {:?} quarantine {:?} failed {:?}",
            clean.iter().map(|c| &c.0).collect::<Vec<_>>(),
            quarantine.iter().map(|c| &c.0).collect::<Vec<_>>(),
            failed.iter().map(|c| &c.0).collect::<Vec<_>>()
        );
        let left: Vec<_> = [&first_clean, &w.clean, &w.quarantine, &w.failed, &w.inbox]
            .into_iter()
            .flat_map(|d| temps_in(d))
            .collect();
        assert!(left.is_empty(), "{at}: temps left: {left:?}");
        let conn = rusqlite::Connection::open(w.state_dir().join("journal.sqlite")).unwrap();
        let vanished: i64 = conn
            .query_row(
                "SELECT count(*) FROM files WHERE reason LIKE '%vanished%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(vanished, 0, "{at}: a record was closed as vanished");
        if killed.is_none() {
            return;
        }
    }
    panic!("more than {MAX_KILL_POINTS} kill points for {syscalls}: the loop would not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_temp_is_never_deleted_when_the_journal_is_moved_aside_after_a_kill() {
    killed_then(
        "unlink,unlinkat,rename,renameat,renameat2",
        Disturb::JournalAside,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placing_record_is_finished_where_it_started_after_clean_dir_changes() {
    killed_then(
        "unlink,unlinkat,rename,renameat,renameat2",
        Disturb::CleanMoved,
    )
    .await;
}
