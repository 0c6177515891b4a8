//! Review 10: attacks on the listing threads of their own (ad6b11f), on the staging folder each
//! record keeps (e1dcaf6), and on what issues 19 and 22 asked for. Each test is named after a
//! finding and failed before its fix (or is ignored with the reason, where the fix is not small).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::review8::records;
use crate::util::{LONG, Outcome, World, bytes, wait_for};

/// A bindfs mount of `server` over `at`, unmounted (lazily) when dropped.
struct Mount {
    at: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Mounts `server` over `at`; `None` (with the reason printed) where that cannot be done.
    fn bindfs(server: &Path, at: &Path) -> Option<Mount> {
        let bindfs = crate::review8::bindfs()?;
        std::fs::create_dir_all(server).unwrap();
        let ok = std::process::Command::new(bindfs)
            .args(["-o", "nonempty"])
            .arg(server)
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount over {}", at.display());
            return None;
        }
        Some(Mount {
            at: at.to_path_buf(),
            mounted: true,
        })
    }

    fn unmount(&mut self) {
        if self.mounted {
            let ok = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.at)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "cannot unmount {}", self.at.display());
            self.mounted = false;
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.at)
                .status()
                .ok();
        }
    }
}

/// The record of `rel` once `pred` holds for its state.
async fn wait_record(
    w: &World,
    rel: &str,
    pred: impl Fn(&str) -> bool,
) -> Option<(String, String, Option<String>, Option<String>)> {
    wait_for(LONG, || {
        records(w)
            .into_iter()
            .find(|(r, state, ..)| r == rel && pred(state))
    })
    .await
}

/// Asserts that no record of `rel` was closed `vanished`.
fn assert_not_vanished(w: &World, rel: &str) {
    for (r, state, outcome, reason) in records(w) {
        assert!(
            !(r == rel && outcome.as_deref() == Some("vanished")),
            "{rel} closed as vanished ({state}, {reason:?}) while its bytes sit in a staging \
             folder that a mount covers"
        );
    }
}

/// A world whose scans take `secs` (files stay `submitted` that long).
async fn slow_world(secs: u64) -> World {
    World::new(dropscan::emulator::EmulatorConfig {
        scan_delay: Duration::from_secs(secs),
        ..dropscan::emulator::EmulatorConfig::default()
    })
    .await
}

/// e1dcaf6 made each record keep the staging folder it was claimed into, and a running agent
/// waits for a covered folder. Start-up did not look: a restart while a share that has its own
/// staging folder (made when a file was claimed from it) covers the inbox found `a.bin`'s staged
/// file missing from the folder reached now and closed it "vanished from staging while the agent
/// was down", while its bytes sat in the covered folder, and its verdict was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_a_share_covers_the_inbox_closes_files_staged_beneath_it_as_vanished() {
    let w = slow_world(8).await;
    let agent = w.start_agent();
    let a = bytes(101, 10_000);
    w.drop_file("a.bin", &a);
    assert!(
        wait_record(&w, "a.bin", |s| s == "submitted")
            .await
            .is_some(),
        "a.bin never submitted"
    );
    let server = w.dir.path().join("server");
    let Some(mut share) = Mount::bindfs(&server, &w.inbox) else {
        agent.stop().await.0.unwrap();
        return;
    };
    // A file written onto the share is claimed there: the share gets a staging folder.
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(server.join("b.bin"), bytes(102, 1000)).unwrap();
    assert!(
        wait_record(&w, "b.bin", |_| true).await.is_some(),
        "b.bin on the share never claimed"
    );
    // Restarted while the share covers the inbox (a package upgrade, a reboot with the share in
    // fstab).
    agent.stop().await.0.unwrap();
    let agent = w.start_agent();
    // Start-up is done once a file dropped now is placed.
    std::fs::write(server.join("c.bin"), bytes(103, 1000)).unwrap();
    let c = wait_for(LONG, || w.clean.join("c.bin").is_file().then_some(())).await;
    assert_not_vanished(&w, "a.bin");
    assert!(
        c.is_some(),
        "c.bin on the share never placed after the restart"
    );
    // The share gone, a.bin's folder is reachable again: placed (here by a restart, which owns
    // every unfinished record again).
    share.unmount();
    agent.stop().await.0.unwrap();
    let agent = w.start_agent();
    let placed = wait_for(LONG, || w.clean.join("a.bin").is_file().then_some(())).await;
    assert_not_vanished(&w, "a.bin");
    assert!(placed.is_some(), "a.bin never placed after the unmount");
    assert_eq!(std::fs::read(w.clean.join("a.bin")).unwrap(), a);
    agent.stop().await.0.unwrap();
}

/// The other way round: a file claimed from a share mounted over the inbox, in flight when the
/// share is unmounted and the agent restarted (the share's server down for maintenance). Its
/// record names the share's staging folder; start-up found the staged file missing from the
/// inbox's own and closed it vanished, although its bytes sit on the share. Expected: it waits
/// for the share and is placed once the share is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_share_is_unmounted_closes_files_staged_on_it_as_vanished() {
    let w = slow_world(8).await;
    let agent = w.start_agent();
    // The inbox's own staging folder exists (a file went through before the mount).
    w.drop_file("first.bin", &bytes(110, 1000));
    assert!(
        wait_for(LONG, || w.clean.join("first.bin").is_file().then_some(()))
            .await
            .is_some(),
        "first.bin never placed"
    );
    let server = w.dir.path().join("server");
    let Some(mut share) = Mount::bindfs(&server, &w.inbox) else {
        agent.stop().await.0.unwrap();
        return;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = bytes(111, 10_000);
    std::fs::write(server.join("b.bin"), &b).unwrap();
    assert!(
        wait_record(&w, "b.bin", |s| s == "submitted")
            .await
            .is_some(),
        "b.bin on the share never submitted"
    );
    share.unmount();
    agent.stop().await.0.unwrap();
    let agent = w.start_agent();
    // Start-up is done once a file dropped now is placed.
    w.drop_file("c.bin", &bytes(112, 1000));
    let c = wait_for(LONG, || w.clean.join("c.bin").is_file().then_some(())).await;
    assert_not_vanished(&w, "b.bin");
    assert!(c.is_some(), "c.bin never placed after the restart");
    agent.stop().await.0.unwrap();
    // The share back: b.bin placed.
    let Some(_share) = Mount::bindfs(&server, &w.inbox) else {
        panic!("cannot mount the share again");
    };
    let agent = w.start_agent();
    let placed = wait_for(LONG, || w.clean.join("b.bin").is_file().then_some(())).await;
    assert_not_vanished(&w, "b.bin");
    assert!(
        placed.is_some(),
        "b.bin never placed once the share was back"
    );
    assert_eq!(std::fs::read(w.clean.join("b.bin")).unwrap(), b);
    let o = w.outcomes();
    assert_eq!(o.get(Path::new("b.bin")), Some(&Outcome::Clean));
    agent.stop().await.0.unwrap();
}

/// A bindfs of `server` over `at` run in the foreground, so that the test can stop it (a share
/// whose server hangs: every access to the mount waits). Continued and unmounted on drop.
pub(crate) struct HangingShare {
    at: PathBuf,
    fuse: std::process::Child,
}

impl HangingShare {
    pub(crate) fn mount(server: &Path, at: &Path) -> Option<HangingShare> {
        use std::os::unix::fs::MetadataExt as _;
        let bindfs = crate::review8::bindfs()?;
        std::fs::create_dir_all(server).unwrap();
        let before = std::fs::metadata(at).unwrap().dev();
        let fuse = std::process::Command::new(bindfs)
            .args(["-f", "-o", "nonempty"])
            .arg(server)
            .arg(at)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let share = HangingShare {
            at: at.to_path_buf(),
            fuse,
        };
        for _ in 0..200 {
            if std::fs::metadata(at).is_ok_and(|m| m.dev() != before) {
                return Some(share);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        eprintln!("skipped: cannot mount over {}", at.display());
        None
    }

    pub(crate) fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.fuse.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// Every access to the mount waits from now on.
    pub(crate) fn hang(&self) {
        self.signal(rustix::process::Signal::STOP);
    }
}

impl Drop for HangingShare {
    fn drop(&mut self) {
        self.signal(rustix::process::Signal::CONT);
        std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.at)
            .status()
            .ok();
        self.fuse.kill().ok();
        self.fuse.wait().ok();
    }
}

/// The agent as a user runs it (the binary), on `config`, its log in `log`.
pub(crate) fn spawn_binary(config: &Path, log: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Each thread of process `pid` as "name: what it waits in".
pub(crate) fn threads_of(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        // The syscall's number first (x86_64: 4 stat, 21 access, 137 statfs, 257 openat,
        // 262 newfstatat, 332 statx).
        let call = read("syscall");
        let call = call.split_whitespace().next().unwrap_or("-");
        out.push(format!(
            "{}: {} (syscall {call})",
            read("comm").trim(),
            read("wchan").trim()
        ));
    }
    out.sort();
    out
}

/// The inbox is a share whose server hangs (every access waits): SIGTERM must still end the
/// process, within its `shutdown_grace` (2 s here) and a margin, not when systemd's
/// TimeoutStopSec runs out and it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_inbox_share_hangs_ends_the_process() {
    let w = World::quick().await;
    let server = w.dir.path().join("server");
    let Some(share) = HangingShare::mount(&server, &w.inbox) else {
        return;
    };
    let log = w.dir.path().join("agent.log");
    let mut agent = spawn_binary(&w.write_config(), &log);
    std::fs::write(server.join("first.bin"), bytes(120, 1000)).unwrap();
    let up = wait_for(LONG, || w.clean.join("first.bin").is_file().then_some(())).await;
    assert!(up.is_some(), "first.bin never placed");
    share.hang();
    // Listings, stats and claims of the share now wait; a few poll ticks pile them up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ended, threads, tail) = terminate(&mut agent, &log, 8).await;
    drop(share);
    assert!(
        ended.is_some(),
        "the agent did not exit within 30 s of SIGTERM (shutdown_grace 2 s) while its inbox \
         share hangs; its threads: {threads:?}; its last log lines (newest first): {tail:#?}"
    );
}

/// A world with a second watch, on `other` (created), its destinations under `out2/`; and the
/// folder `server` for a share to mount there: (world, server, other).
pub(crate) async fn with_second_watch() -> (World, PathBuf, PathBuf) {
    let mut w = World::quick().await;
    let other = w.dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    w.more_watches = "\n[[watch]]\npath = \"other\"\nclean_dir = \"out2/clean\"\n\
                      quarantine_dir = \"out2/quarantine\"\nfailed_dir = \"out2/failed\"\n"
        .into();
    let server = w.dir.path().join("server");
    (w, server, other)
}

/// Sends SIGTERM to `agent` and waits up to 30 s for it to end (killed after that): whether it
/// ended, its threads if it did not, and the last `lines` lines of its `log` (newest first).
pub(crate) async fn terminate(
    agent: &mut std::process::Child,
    log: &Path,
    lines: usize,
) -> (Option<std::process::ExitStatus>, Vec<String>, Vec<String>) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(agent.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let ended = wait_for(Duration::from_secs(30), || agent.try_wait().unwrap()).await;
    let threads = if ended.is_none() {
        let threads = threads_of(agent.id());
        agent.kill().ok();
        agent.wait().ok();
        threads
    } else {
        Vec::new()
    };
    let logged = std::fs::read_to_string(log).unwrap_or_default();
    let tail = logged
        .lines()
        .rev()
        .take(lines)
        .map(str::to_string)
        .collect();
    (ended, threads, tail)
}

/// A local inbox and a second watch on a share, the agent (the binary, logging to the returned
/// file) running, a first file placed; then the share's server hangs.
async fn local_and_hanging_watch(
    seed: u64,
) -> Option<(World, HangingShare, std::process::Child, PathBuf)> {
    let (w, server, other) = with_second_watch().await;
    let share = HangingShare::mount(&server, &other)?;
    let log = w.dir.path().join("agent.log");
    let agent = spawn_binary(&w.write_config(), &log);
    w.drop_file("first.bin", &bytes(seed, 1000));
    let up = wait_for(LONG, || w.clean.join("first.bin").is_file().then_some(())).await;
    assert!(up.is_some(), "first.bin never placed");
    share.hang();
    Some((w, share, agent, log))
}

/// A second watch's inbox is a share whose server hangs, and the administrator sends SIGHUP
/// (`systemctl reload`). The reload read the configuration and tried its folders (preflight) on
/// an async worker thread, which then waited for the share's server: the reload never came, the
/// first watch (a local folder) stopped being served when both of the machine's two workers
/// were caught, and SIGTERM never ended the process (the reload loop waited for that task).
/// Expected: a file dropped in the local inbox after the SIGHUP is placed, and SIGTERM ends the
/// process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_a_watchs_share_hangs_wedges_the_agent() {
    let Some((w, share, mut agent, log)) = local_and_hanging_watch(130).await else {
        return;
    };
    let pid = rustix::process::Pid::from_raw(i32::try_from(agent.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    w.drop_file("second.bin", &bytes(131, 1000));
    let placed = wait_for(LONG, || w.clean.join("second.bin").is_file().then_some(())).await;
    let (ended, threads, tail) = terminate(&mut agent, &log, 4).await;
    drop(share);
    assert!(
        placed.is_some() && ended.is_some(),
        "after a SIGHUP while the other watch's share hangs: second.bin in the local inbox \
         placed: {placed:?}; ended within 30 s of SIGTERM: {ended:?}; threads: {threads:?}; \
         last log lines (newest first): {tail:#?}"
    );
}

/// Held (kept as a guard): without a reload, one watch's share hangs; the other watch, on a
/// local folder, goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_that_hangs_does_not_stop_the_other_watches() {
    let Some((w, share, mut agent, log)) = local_and_hanging_watch(140).await else {
        return;
    };
    // A few poll ticks of the hanging share.
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.drop_file("second.bin", &bytes(141, 1000));
    let placed = wait_for(LONG, || w.clean.join("second.bin").is_file().then_some(())).await;
    let threads = threads_of(agent.id());
    agent.kill().ok();
    agent.wait().ok();
    drop(share);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = logged.lines().rev().take(4).collect();
    assert!(
        placed.is_some(),
        "second.bin in the local inbox never placed while the other watch's share hangs; \
         threads: {threads:?}; last log lines (newest first): {tail:#?}"
    );
}

/// Issue 19, finding 5, as the README states it: "the modification and access times of the
/// scanned file" survive a release, on the same filesystem and across filesystems. (Samba's
/// test checks the modification time only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_keeps_the_access_time_as_the_readme_says() {
    use std::time::{SystemTime, UNIX_EPOCH};
    for other_fs in [false, true] {
        let mut w = World::quick().await;
        let Ok(_shm) = crate::review6::on_shm_if(&mut w, other_fs) else {
            return;
        };
        let agent = w.start_agent();
        let accessed = UNIX_EPOCH + Duration::from_secs(1_520_000_000); // 2018
        let modified = UNIX_EPOCH + Duration::from_secs(1_551_675_967); // 2019
        let staged = w.inbox.join("old.bin");
        std::fs::write(&staged, bytes(150, 10_000)).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&staged)
            .unwrap()
            .set_times(
                std::fs::FileTimes::new()
                    .set_accessed(accessed)
                    .set_modified(modified),
            )
            .unwrap();
        // Waited for without reading it (a read would move its access time).
        let target = w.clean.join("old.bin");
        let placed = wait_for(LONG, || target.is_file().then_some(())).await;
        assert!(placed.is_some(), "old.bin never placed");
        let placed = std::fs::metadata(&target).unwrap();
        let (m, a): (SystemTime, SystemTime) =
            (placed.modified().unwrap(), placed.accessed().unwrap());
        assert_eq!(m, modified, "other filesystem: {other_fs}: mtime");
        assert_eq!(a, accessed, "other filesystem: {other_fs}: atime");
        agent.stop().await.0.unwrap();
    }
}

/// Found by a kill-point run (`kill_points::verified_temp_is_never_deleted_when_the_journal_is_moved_aside_after_a_kill`,
/// killed at #22): a copy temp whose staged file is still in staging is a partial copy, to be
/// removed. But start-up re-entered the staged files no record names (a journal moved aside)
/// under fresh staged names *before* it judged the temps, so the temp's token (its staged
/// file's name) matched nothing any more: the partial copy was taken back as "the only copy of
/// its file", scanned and released. Truncated EICAR bytes landed in clean as
/// `recovered/eicar.com`, beside the whole file in quarantine. Expected: the partial copy goes;
/// the staged file is scanned once, into quarantine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_copy_temp_beside_an_orphan_staged_file_is_released_as_a_file() {
    let w = World::quick().await;
    // A first run makes the staging folder and the destinations.
    let agent = w.start_agent();
    w.drop_file("first.bin", &bytes(160, 1000));
    assert!(
        wait_for(LONG, || w.clean.join("first.bin").is_file().then_some(()))
            .await
            .is_some()
    );
    agent.stop().await.0.unwrap();
    // What a kill mid-copy leaves once the journal is moved aside: the staged file, which no
    // record names, and the placement's partial copy in quarantine.
    let config = dropscan::config::Config::load(&w.write_config()).unwrap();
    let watch = &config.watches[0];
    let stem = "0123456789abcdef0123456789abcdef";
    std::fs::write(
        watch.staging_dir.join(format!("{stem}.staged")),
        crate::util::EICAR,
    )
    .unwrap();
    let temp = dropscan::fsops::names::copy_temp_name(
        &dropscan::root::instance_of(watch),
        dropscan::fsops::names::TempOf::Agent,
        stem,
        Path::new("eicar.com"),
    );
    let partial = &crate::util::EICAR[..30];
    std::fs::write(w.quarantine.join(&temp), partial).unwrap();
    let before = w.walks();
    let agent = w.start_agent();
    // Start-up done and nothing unfinished: the staged file and whatever the temp became are
    // placed.
    w.wait_idle(before).await;
    agent.stop().await.0.unwrap();
    let placed: Vec<(PathBuf, Vec<u8>)> = World::files_in(&w.clean)
        .into_iter()
        .chain(World::files_in(&w.quarantine))
        .filter(|(p, _)| p != Path::new("first.bin"))
        .collect();
    let partials: Vec<&PathBuf> = placed
        .iter()
        .filter(|(_, c)| c.as_slice() == partial)
        .map(|(p, _)| p)
        .collect();
    assert!(
        partials.is_empty(),
        "a partial copy of a file was released as a file of its own: {partials:?} (all placed: {:?})",
        placed.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    assert_eq!(
        placed.len(),
        1,
        "{:?}",
        placed.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
}
