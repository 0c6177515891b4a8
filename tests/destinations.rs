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

use crate::friction::{free_port, http_get};
use crate::util::{Lines, World, bytes, collect_stderr, count_lines, wait_for};

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

/// [`world_with_destinations_in_the_inbox`] with a second watch (`inbox2`, destinations in
/// `out2/`) and metrics on `port`: a held watch must be that watch's problem alone.
async fn two_watches_with_destinations_in_the_first_inbox(port: u16) -> World {
    let mut w = world_with_destinations_in_the_inbox().await;
    std::fs::create_dir_all(w.dir.path().join("inbox2")).unwrap();
    w.more_watches = format!(
        "\n[[watch]]\npath = \"inbox2\"\nsettle = \"300ms\"\nsettle_empty = \"2s\"\n\
         clean_dir = \"out2/clean\"\nquarantine_dir = \"out2/quarantine\"\nfailed_dir = \"out2/failed\"\n\
         \n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    w
}

/// Starts the agent on `w` (two watches, see above) and waits until the second watch released
/// `b.txt`: (what `/readyz` said, whether the agent still ran). The agent is stopped.
async fn second_watch_goes_on(w: &World, port: u16) -> (String, bool) {
    std::fs::write(w.dir.path().join("inbox2/b.txt"), b"second watch").unwrap();
    let agent = w.start_agent();
    let placed = wait_for(LIMIT, || {
        w.dir.path().join("out2/clean/b.txt").exists().then_some(())
    })
    .await;
    let ready = http_get(port, "/readyz").unwrap_or_default();
    let alive = agent.task.as_ref().is_some_and(|t| !t.is_finished());
    agent.stop().await.0.ok();
    assert!(placed.is_some(), "the other watch must keep working");
    (ready, alive)
}

/// Files (not folders, hidden ones excluded) anywhere below `dir`.
fn files_below(dir: &Path) -> usize {
    World::files_in(dir).len()
}

/// Issue 18, finding 1 (a): before the first start, a user who can write the inbox makes
/// `inbox/clean` and `inbox/quarantine` with `umask 000`. The agent took them (quarantine got a
/// permissions warning, clean nothing), and that user could then swap a released file in clean
/// for EICAR and delete quarantine sidecars. A destination must be dropscan's own: that watch is
/// held (nothing claimed; `/readyz` names the key and the owner), and, as for a planted staging
/// folder, every other watch goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_made_by_an_inbox_writer_is_refused() {
    let Some(other) = second_user("a_destination_made_by_an_inbox_writer_is_refused") else {
        return;
    };
    let port = free_port();
    let w = two_watches_with_destinations_in_the_first_inbox(port).await;
    as_user(
        other,
        &w.inbox,
        "umask 000 && mkdir clean quarantine && echo hello > a.txt",
    );
    let (ready, alive) = second_watch_goes_on(&w, port).await;
    assert!(alive, "the agent runs on");
    assert!(
        ready.contains("clean_dir"),
        "/readyz names the key: {ready}"
    );
    assert!(
        ready.contains(&format!("uid {other}")),
        "/readyz names the owner: {ready}"
    );
    assert!(
        w.inbox.join("a.txt").exists(),
        "nothing claimed into a watch whose clean another user controls"
    );
    assert_eq!(files_below(&w.clean), 0);
    assert_eq!(w.emulator().state().stats().submits_accepted, 1);
}

/// Issue 18, finding 1, the rule's second half: a destination inside an inbox that others can
/// rename folders in (world-writable, no sticky bit) is refused, naming the key and what to do,
/// and no destination is made there; that watch is held, the other goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_inside_an_inbox_others_can_rename_in_is_refused() {
    if second_user("a_destination_inside_an_inbox_others_can_rename_in_is_refused").is_none() {
        return;
    }
    let port = free_port();
    let w = two_watches_with_destinations_in_the_first_inbox(port).await;
    chmod(&w.inbox, 0o777);
    w.drop_file("a.txt", b"first watch");
    let (ready, alive) = second_watch_goes_on(&w, port).await;
    assert!(alive, "the agent runs on");
    assert!(ready.contains("_dir"), "/readyz names the key: {ready}");
    assert!(ready.contains("sticky"), "and says what to do: {ready}");
    assert!(w.inbox.join("a.txt").exists(), "nothing claimed");
    assert!(!w.clean.exists() && !w.quarantine.exists() && !w.failed.exists());
}

/// Issue 18, finding 1 (b): at run time, in an inbox others can rename folders in, a user runs
/// `mv clean clean.old; mkdir clean`. The agent went on placing through its old descriptor into
/// `clean.old`, now an ordinary inbox folder: every placed file was claimed, scanned and placed
/// again one level deeper (4,496 placements from 3 files in 80 s). Now the destination is judged
/// on every use: that watch is held (`/readyz` names the key; new files wait in the inbox), the
/// renamed folder is never claimed from, also after a restart (its marker moved with it), and
/// once the administrator repairs the inbox the watch resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_renamed_away_at_run_time_is_never_placed_into_nor_claimed_from() {
    let Some(other) =
        second_user("a_destination_renamed_away_at_run_time_is_never_placed_into_nor_claimed_from")
    else {
        return;
    };
    let port = free_port();
    let w = two_watches_with_destinations_in_the_first_inbox(port).await;
    let agent = w.start_agent();
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
    let held = wait_for(LIMIT, || {
        http_get(port, "/readyz").filter(|r| r.contains("clean_dir"))
    })
    .await
    .expect("the watch is held, naming the key");
    assert!(held.contains("sticky"), "says what to do: {held}");
    // Two whole reconcile walks (every 2 s) offer the files again, and the held watch claims
    // nothing.
    w.wait_walks(3).await;
    assert_eq!(
        submits(),
        3,
        "nothing claimed from clean.old, nor the new files"
    );
    assert_eq!(files_below(&old), 3, "nothing placed into clean.old");
    assert_eq!(
        files_below(&w.clean),
        0,
        "nothing placed into the user's clean"
    );
    assert!(w.inbox.join("b1.txt").exists() && w.inbox.join("b2.txt").exists());
    assert_eq!(w.staged_files(), 0);
    agent.stop().await.0.unwrap();

    // The administrator repairs the inbox; the renamed folder stays where it is.
    std::fs::remove_dir(&w.clean).unwrap();
    chmod(&w.inbox, 0o1777);
    let agent = w.start_agent();
    wait_for(LIMIT, || (files_below(&w.clean) == 2).then_some(()))
        .await
        .expect("the new files released once the inbox is repaired");
    // Two whole reconcile walks later, clean.old is still not claimed from.
    w.wait_walks(3).await;
    assert_eq!(submits(), 5, "clean.old claimed after the restart");
    assert_eq!(files_below(&old), 3);
    assert!(old.join("a1.txt").exists());
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
    let agent = w.start_agent();
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
    // Two whole reconcile walks (every 2 s) later, nothing more was claimed or placed.
    w.wait_walks(3).await;
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

/// Outside an inbox, a destination others can write is the administrator's to fix (nobody
/// else could have made it so): `check --offline`, as the service user (as the unit's
/// `ExecStartPre` runs it), exits 78 naming the key, before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_outside_the_inbox_that_others_can_write_is_a_configuration_error() {
    use std::os::unix::process::CommandExt;
    let Some(service) = second_user(
        "a_destination_outside_the_inbox_that_others_can_write_is_a_configuration_error",
    ) else {
        return;
    };
    let w = World::quick().await;
    let config = w.write_config();
    std::fs::create_dir_all(&w.clean).unwrap();
    chown_tree(w.dir.path(), service);
    // Made by root for the service, but writable by everybody.
    std::os::unix::fs::chown(&w.clean, Some(0), Some(0)).unwrap();
    chmod(&w.clean, 0o777);
    let out = Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["check", "--offline", "--config", config.to_str().unwrap()])
        .uid(service)
        .gid(service)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("clean_dir") && text.contains("chmod go-w"),
        "{text}"
    );
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
/// The agent binary as `uid`; its stderr (warnings, and the watcher's walks) is collected.
fn run_binary_as(uid: u32, config: &Path) -> (Child, Lines) {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn,dropscan::watch=debug")
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect_stderr(&mut child);
    (child, lines)
}

/// The line the agent logs (at debug) when a reconcile walk of `inbox` starts.
fn walk_line(inbox: &Path) -> String {
    format!("reconcile root={}", inbox.display())
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
    let (agent, _log) = run_binary_as(service, &config);
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

/// Finding 2 through a real share: an SMB client whose files the server creates with a
/// restrictive mask (`create mask = 0000`, as a share set up so that users cannot read each
/// other's drops), and the agent running as an unprivileged service user that cannot read them.
/// The file reaches failed, unread, with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_an_unreadable_drop_reaches_failed_with_its_reason() {
    let Some(service) = second_user("smb_an_unreadable_drop_reaches_failed_with_its_reason") else {
        return;
    };
    let mut w = World::quick().await;
    w.settle = "1s";
    let config = w.write_config();
    chown_tree(w.dir.path(), service);
    let smbd = match crate::shares_fixture::Smbd::start_with(
        &w.inbox,
        "    create mask = 0000\n    force create mode = 0000",
    ) {
        Ok(s) => s,
        Err(skip) => {
            println!("skipped: {skip}");
            return;
        }
    };
    let (agent, _log) = run_binary_as(service, &config);
    let local = w.dir.path().join("local.bin");
    std::fs::write(&local, bytes(9, 100_000)).unwrap();
    let l = local.clone();
    let smbd = std::sync::Arc::new(smbd);
    let s = std::sync::Arc::clone(&smbd);
    tokio::task::spawn_blocking(move || s.put(&l, "private.bin"))
        .await
        .unwrap();
    let failed = w.failed.join("private.bin");
    let mut side = failed.clone().into_os_string();
    side.push(".dropscan.json");
    let side = PathBuf::from(side);
    let reached = wait_for(LIMIT, || side.exists().then_some(())).await;
    let staged = w.staged_files();
    stop_binary(agent);
    assert!(
        reached.is_some(),
        "the unreadable SMB drop never reached failed ({staged} file(s) left in staging)"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&failed).unwrap().mode() & 0o777,
        0,
        "unread, as dropped"
    );
    assert_eq!(std::fs::read(&failed).unwrap(), bytes(9, 100_000));
    let sidecar = std::fs::read_to_string(&side).unwrap();
    assert!(sidecar.contains("not readable"), "{sidecar}");
    assert_eq!(w.staged_files(), 0);
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
    let config = w.write_config();
    chown_tree(w.dir.path(), service);
    chown_tree(elsewhere.path(), service);
    let (agent, log) = run_binary_as(service, &config);
    let secret = w.inbox.join("secret.bin");
    std::fs::write(&secret, b"private").unwrap();
    chmod(&secret, 0o000);
    w.drop_file("readable.txt", b"fine");
    let clean = wait_for(LIMIT, || {
        w.clean.join("readable.txt").exists().then_some(())
    })
    .await;
    // Two whole reconcile walks (every 2 s) after the readable file's release, each of which
    // offered the unreadable one again.
    let walks = count_lines(&log, &walk_line(&w.inbox));
    let walked = wait_for(LIMIT, || {
        (count_lines(&log, &walk_line(&w.inbox)) >= walks + 3).then_some(())
    })
    .await;
    let staged = w.staged_files();
    stop_binary(agent);
    assert!(clean.is_some(), "the readable file is released");
    assert!(
        walked.is_some(),
        "no reconcile walks logged: {:?}",
        log.lock().unwrap()
    );
    assert!(secret.exists(), "left in the inbox");
    assert_eq!(staged, 0, "never taken into staging");
    assert_eq!(std::fs::read(&secret).unwrap(), b"private");
    assert_eq!(w.emulator().state().stats().submits_accepted, 1);
}
