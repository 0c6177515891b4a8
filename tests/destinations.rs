//! Regressions of issue 18, findings 1 and 2: destinations inside an inbox, which a user who can
//! write the inbox must not be able to take over, and files the service user cannot read, which
//! must reach failed with their reason. Each runs a second, unprivileged user (uid 65534,
//! `nobody`): as the attacker, or as the service user running the real binary. Without root
//! there is no second user to be: those tests print "skipped" and return.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dropscan::app::Agent;
use dropscan::config::Config;
use tokio_util::sync::CancellationToken;

use crate::util::{Running, World, bytes, wait_for};

const LIMIT: Duration = Duration::from_secs(60);
/// The second user: any uid other than the agent's (root's); `nobody` exists nearly everywhere
/// and needs no account for what the kernel checks.
const OTHER: u32 = 65534;

/// The second user's uid, or `None` (after saying so) when this process cannot act as one.
fn second_user(test: &str) -> Option<u32> {
    if rustix::process::geteuid().is_root() {
        Some(OTHER)
    } else {
        println!("skipped: {test} needs root to act as a second, unprivileged user");
        None
    }
}

/// Runs `script` with `sh` as `uid` in `dir` (no supplementary groups); it must succeed.
fn as_user(uid: u32, dir: &Path, script: &str) {
    use std::os::unix::process::CommandExt;
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "as uid {uid}: {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A world whose destinations sit inside the inbox (`inbox/clean`, …), the layout the example
/// config allowed ("may sit inside the inbox"), with the inbox writable by everybody and
/// sticky: the one safe way to share it.
async fn world_with_destinations_in_the_inbox() -> World {
    let mut w = World::quick().await;
    w.clean = w.inbox.join("clean");
    w.quarantine = w.inbox.join("quarantine");
    w.failed = w.inbox.join("failed");
    // The test's temp folder is private to root; the second user must reach the inbox.
    chmod(w.dir.path(), 0o755);
    chmod(&w.inbox, 0o1777);
    w
}

/// [`World::write_config`] with the destinations the world names (the harness writes
/// `out/…`).
fn write_config(w: &World) -> PathBuf {
    let path = w.write_config();
    let mut text = std::fs::read_to_string(&path).unwrap();
    for (key, dir) in [
        ("clean_dir", &w.clean),
        ("quarantine_dir", &w.quarantine),
        ("failed_dir", &w.failed),
    ] {
        let from = format!("{key} = \"out/{}\"", key.trim_end_matches("_dir"));
        let to = format!("{key} = \"{}\"", dir.display());
        assert!(text.contains(&from), "{from}");
        text = text.replace(&from, &to);
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the agent in-process on [`write_config`]'s file.
fn start(w: &World) -> Running {
    let config = Config::load(&write_config(w)).unwrap();
    let agent = Agent::new(config).unwrap();
    let events = agent.subscribe();
    let token = CancellationToken::new();
    let t = token.clone();
    let task = tokio::spawn(async move { agent.run(t).await.map_err(|e| e.to_string()) });
    Running {
        token,
        task: Some(task),
        events,
    }
}

/// Runs the real binary (as root) on `config` until it exits by itself: its exit code and
/// what it wrote to stderr, or `None` if it still runs after 20 s (it is then killed).
fn exits_by_itself(config: &Path) -> Option<(i32, String)> {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            child.kill().ok();
            child.wait().ok();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    Some((status.code().unwrap_or(-1), err))
}

/// Files (not folders, hidden ones excluded) anywhere below `dir`.
fn files_below(dir: &Path) -> usize {
    World::files_in(dir).len()
}

/// Issue 18, finding 1 (a): before the first start, a user who can write the inbox makes
/// `inbox/clean` and `inbox/quarantine` with `umask 000`. The agent took them (quarantine got a
/// permissions warning, clean nothing), and that user could then swap a released file in clean
/// for EICAR and delete quarantine sidecars. A destination must be dropscan's own: the agent
/// refuses to start, naming the key and the owner, and claims nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_made_by_an_inbox_writer_is_refused() {
    let Some(other) = second_user("a_destination_made_by_an_inbox_writer_is_refused") else {
        return;
    };
    let w = world_with_destinations_in_the_inbox().await;
    as_user(
        other,
        &w.inbox,
        "umask 000 && mkdir clean quarantine && echo hello > a.txt",
    );
    let (code, e) = exits_by_itself(&write_config(&w))
        .expect("the agent accepted a clean folder made by another user, and runs");
    assert_eq!(
        code, 78,
        "a configuration error, which a restart cannot fix: {e}"
    );
    assert!(e.contains("clean_dir"), "names the key: {e}");
    assert!(e.contains(&format!("uid {other}")), "names the owner: {e}");
    assert!(w.inbox.join("a.txt").exists(), "nothing claimed");
    assert_eq!(w.emulator().state().stats().submits_accepted, 0);
}

/// Issue 18, finding 1, the rule's second half: a destination inside an inbox that others can
/// rename folders in (world-writable, no sticky bit) is refused at start-up, naming the key, and
/// no destination is made there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_inside_an_inbox_others_can_rename_in_is_refused() {
    if second_user("a_destination_inside_an_inbox_others_can_rename_in_is_refused").is_none() {
        return;
    }
    let w = world_with_destinations_in_the_inbox().await;
    chmod(&w.inbox, 0o777);
    let (code, e) = exits_by_itself(&write_config(&w))
        .expect("the agent accepted destinations in an inbox where anybody can rename them away");
    assert_eq!(code, 78, "{e}");
    assert!(e.contains("_dir"), "names the key: {e}");
    assert!(e.contains("sticky"), "says what to do: {e}");
    assert!(!w.clean.exists() && !w.quarantine.exists() && !w.failed.exists());
}

/// Issue 18, finding 1 (b): at run time, in an inbox others can rename folders in, a user runs
/// `mv clean clean.old; mkdir clean`. The agent went on placing through its old descriptor into
/// `clean.old`, now an ordinary inbox folder: every placed file was claimed, scanned and placed
/// again one level deeper (4,496 placements from 3 files in 80 s). Now the path is checked on
/// every placement: the folder the user made is refused and placements are held (the files wait
/// in staging, scanned once); the renamed folder is never claimed from, also after a restart
/// (its marker moved with it); once the administrator repairs the inbox, placements resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_renamed_away_at_run_time_is_never_placed_into_nor_claimed_from() {
    let Some(other) =
        second_user("a_destination_renamed_away_at_run_time_is_never_placed_into_nor_claimed_from")
    else {
        return;
    };
    let w = world_with_destinations_in_the_inbox().await;
    let agent = start(&w);
    as_user(
        other,
        &w.inbox,
        "echo one > a1.txt && echo two > a2.txt && echo three > a3.txt",
    );
    wait_for(LIMIT, || (files_below(&w.clean) == 3).then_some(()))
        .await
        .expect("the first three files released");
    // An administrator's mistake (the sticky bit dropped), and the user takes clean over.
    chmod(&w.inbox, 0o777);
    as_user(
        other,
        &w.inbox,
        "mv clean clean.old && umask 000 && mkdir clean && echo four > b1.txt && echo five > b2.txt",
    );
    let old = w.inbox.join("clean.old");
    let submits = || w.emulator().state().stats().submits_accepted;
    wait_for(LIMIT, || (submits() >= 5).then_some(()))
        .await
        .expect("the two new files scanned");
    // Placements are held with a clear error, which `dropscan status` shows.
    let config = write_config(&w);
    let held = wait_for(LIMIT, || {
        let status = status(&config);
        status.contains("cannot place").then_some(status)
    })
    .await
    .unwrap_or_else(|| panic!("no held placement in: {}", status(&config)));
    assert!(
        held.contains("clean_dir") && held.contains("refused"),
        "the reason names the key: {held}"
    );
    // Nothing more to wait for but time: several reconcile scans (every 2 s) and retries.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        submits(),
        5,
        "files placed into the renamed-away folder were claimed and scanned again"
    );
    assert_eq!(files_below(&old), 3, "nothing more placed into clean.old");
    assert_eq!(
        files_below(&w.clean),
        0,
        "nothing placed into the user's clean"
    );
    assert_eq!(w.staged_files(), 2, "the new files are held in staging");
    agent.stop().await.0.unwrap();

    // The administrator repairs the inbox; the renamed folder stays where it is.
    std::fs::remove_dir(&w.clean).unwrap();
    chmod(&w.inbox, 0o1777);
    let agent = start(&w);
    wait_for(LIMIT, || (files_below(&w.clean) == 2).then_some(()))
        .await
        .expect("the held files placed once the inbox is repaired");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(submits(), 5, "clean.old claimed after the restart");
    assert_eq!(files_below(&old), 3);
    assert!(w.inbox.join("clean.old/a1.txt").exists());
    assert_eq!(w.staged_files(), 0);
    agent.stop().await.0.unwrap();
}

/// Issue 18, finding 1, the path check alone: the inbox stays safe (sticky), and the folder is
/// renamed by someone allowed to (here root, an operator tidying up). The next placement opens
/// `clean` again from its path (made anew, dropscan's own) instead of going on through the
/// descriptor of `clean.old`, which is never claimed from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_renamed_by_its_owner_is_opened_again_not_placed_into_through_the_old_folder()
{
    let w = world_with_destinations_in_the_inbox().await;
    let agent = start(&w);
    w.drop_file("a.txt", b"one");
    wait_for(LIMIT, || w.clean.join("a.txt").exists().then_some(()))
        .await
        .expect("released");
    let old = w.inbox.join("clean.old");
    #[allow(clippy::disallowed_methods)]
    std::fs::rename(&w.clean, &old).unwrap();
    w.drop_file("b.txt", b"two");
    wait_for(LIMIT, || w.clean.join("b.txt").exists().then_some(()))
        .await
        .expect("placed into a new clean folder, not into clean.old");
    // Nothing to wait for but time: a few reconcile scans (every 2 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        World::files_in(&old).len(),
        1,
        "clean.old keeps a.txt alone"
    );
    assert!(old.join("a.txt").exists());
    assert_eq!(World::files_in(&w.clean).len(), 1);
    assert_eq!(w.emulator().state().stats().submits_accepted, 2);
    agent.stop().await.0.unwrap();
}

/// What `dropscan status` prints (it reads the journal while the agent runs).
fn status(config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["status", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Chowns `dir` and everything below it (never following a link) to `uid`.
fn chown_tree(dir: &Path, uid: u32) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(uid)).unwrap();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
}

/// The real binary, run as `uid` (the service user), on the world's config.
fn run_binary_as(uid: u32, config: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn stop_binary(mut child: Child) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).ok();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().ok();
    child.wait().ok();
}

/// Issue 18, finding 2: a file the service user cannot read (dropped with mode 000 by another
/// user, the common case of an SMB or NFS user with a restrictive umask or ACL) vanished from the
/// inbox and never reached failed: the hash failed it, but every placement opened the staged
/// file for reading (for its lock), even for the plain rename into failed, and was retried for
/// ever. It now reaches failed, unread, with the reason in its sidecar. The agent runs as an
/// unprivileged service user (root reads anything); the file is root's, mode 000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_file_reaches_failed_with_its_reason() {
    let Some(service) = second_user("an_unreadable_file_reaches_failed_with_its_reason") else {
        return;
    };
    let w = World::quick().await;
    let config = w.write_config();
    chown_tree(w.dir.path(), service);
    let agent = run_binary_as(service, &config);
    let secret = w.inbox.join("secret.bin");
    std::fs::write(&secret, bytes(7, 4096)).unwrap();
    chmod(&secret, 0o000);
    w.drop_file("readable.txt", b"fine");
    let failed = w.failed.join("secret.bin");
    let mut side = failed.clone().into_os_string();
    side.push(".dropscan.json");
    let side = PathBuf::from(side);
    let reached = wait_for(LIMIT, || side.exists().then_some(())).await;
    let clean = wait_for(LIMIT, || {
        w.clean.join("readable.txt").exists().then_some(())
    })
    .await;
    let staged = w.staged_files();
    stop_binary(agent);
    assert!(clean.is_some(), "the readable file is released");
    assert!(
        reached.is_some(),
        "the unreadable file never reached failed ({staged} file(s) left in staging)"
    );
    assert_eq!(
        std::fs::read(&failed).unwrap(),
        bytes(7, 4096),
        "moved whole"
    );
    let sidecar = std::fs::read_to_string(&side).unwrap();
    assert!(sidecar.contains("not readable"), "{sidecar}");
    assert_eq!(w.staged_files(), 0, "nothing stranded in staging");
    assert!(!secret.exists());
}

/// Finding 2 where the failed folder is on another filesystem (here tmpfs): an unreadable file
/// can be neither renamed there nor copied (that would read it). It is left in the inbox, unread
/// and logged, never taken into staging to be retried for ever; readable files still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_file_is_left_in_the_inbox_when_failed_is_on_another_filesystem() {
    let Some(service) =
        second_user("an_unreadable_file_is_left_in_the_inbox_when_failed_is_on_another_filesystem")
    else {
        return;
    };
    let shm = Path::new("/dev/shm");
    let here = std::fs::metadata(std::env::temp_dir()).unwrap();
    let other_fs = std::fs::metadata(shm).ok();
    use std::os::unix::fs::MetadataExt;
    if other_fs.is_none_or(|m| m.dev() == here.dev()) {
        println!("skipped: no /dev/shm on another filesystem than the temp folder");
        return;
    }
    let elsewhere = tempfile::tempdir_in(shm).unwrap();
    let mut w = World::quick().await;
    w.failed = elsewhere.path().join("failed");
    let config = write_config(&w);
    chown_tree(w.dir.path(), service);
    chown_tree(elsewhere.path(), service);
    let agent = run_binary_as(service, &config);
    let secret = w.inbox.join("secret.bin");
    std::fs::write(&secret, b"private").unwrap();
    chmod(&secret, 0o000);
    w.drop_file("readable.txt", b"fine");
    let clean = wait_for(LIMIT, || {
        w.clean.join("readable.txt").exists().then_some(())
    })
    .await;
    // Nothing to wait for but time: a few settle periods and reconcile scans.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let staged = w.staged_files();
    stop_binary(agent);
    assert!(clean.is_some(), "the readable file is released");
    assert!(secret.exists(), "left in the inbox");
    assert_eq!(staged, 0, "never taken into staging");
    assert_eq!(std::fs::read(&secret).unwrap(), b"private");
    assert_eq!(w.emulator().state().stats().submits_accepted, 1);
}
