//! One agent per staging folder, and a staging folder that is each watch's own problem:
//! review findings "two agents on one host with the same sensor_instance_id take each other's
//! staged files" and "a planted `.dropscan` stops the whole agent".

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::friction::{free_port, http_get};
use crate::util::{World, events, wait_for};

const LIMIT: Duration = Duration::from_secs(30);
/// `nobody`: a user who can write the inbox and nothing else.
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs `cmd` as `nobody` (the test runs as root).
fn as_nobody(program: &str, args: &[&std::ffi::OsStr]) {
    let st = Command::new(program)
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY)
        .status()
        .unwrap();
    assert!(st.success(), "{program} {args:?} as nobody");
}

/// A world whose inbox `nobody` can write (the tempdir above it traversable), with a second
/// watch (`inbox2`) and a metrics endpoint on `port`.
async fn shared_world(port: u16) -> World {
    let mut w = World::quick().await;
    std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&w.inbox, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::create_dir_all(w.dir.path().join("inbox2")).unwrap();
    w.more_watches = format!(
        "\n[[watch]]\npath = \"inbox2\"\nsettle = \"300ms\"\nsettle_empty = \"2s\"\n\
         reconcile_interval = \"1s\"\n\
         clean_dir = \"out2/clean\"\nquarantine_dir = \"out2/quarantine\"\nfailed_dir = \"out2/failed\"\n\
         \n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_dropscan_symlink_file_or_fifo_is_moved_aside_and_no_watch_stops() {
    if !is_root() {
        eprintln!("skipped: needs root to plant as a second user (nobody)");
        return;
    }
    for (kind, plant) in [
        ("symlink", vec!["ln", "-s", "/etc"]),
        ("file", vec!["touch"]),
        ("fifo", vec!["mkfifo"]),
    ] {
        let port = free_port();
        let w = shared_world(port).await;
        let planted = w.inbox.join(".dropscan");
        let mut args: Vec<&std::ffi::OsStr> = plant[1..].iter().map(std::ffi::OsStr::new).collect();
        args.push(planted.as_os_str());
        as_nobody(plant[0], &args);
        w.drop_file("a.txt", b"first watch");
        std::fs::write(w.dir.path().join("inbox2/b.txt"), b"second watch").unwrap();
        let agent = w.start_agent();
        let placed = wait_for(LIMIT, || {
            (w.clean.join("a.txt").exists() && w.dir.path().join("out2/clean/b.txt").exists())
                .then_some(())
        })
        .await;
        let task_alive = agent.task.as_ref().is_some_and(|t| !t.is_finished());
        agent.stop().await.0.unwrap();
        assert!(
            placed.is_some() && task_alive,
            "planted {kind}: both watches must keep working (inbox {:?})",
            w.inbox_files().keys()
        );
        let aside: Vec<_> = std::fs::read_dir(&w.inbox)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".dropscan.planted-")
            })
            .collect();
        assert_eq!(aside.len(), 1, "planted {kind}: moved aside once");
        let ft = aside[0].file_type().unwrap();
        assert!(
            !ft.is_dir(),
            "planted {kind}: the planted entry itself was moved, never followed"
        );
        assert!(std::fs::symlink_metadata(&planted).unwrap().is_dir());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_folder_owned_by_another_user_holds_only_its_watch() {
    if !is_root() {
        eprintln!("skipped: needs root to plant as a second user (nobody)");
        return;
    }
    for attacker_owns_parent in [false, true] {
        let port = free_port();
        let w = shared_world(port).await;
        let (dropscan_dir, staging) = (w.inbox.join(".dropscan"), w.inbox.join(".dropscan/test"));
        if attacker_owns_parent {
            as_nobody("mkdir", &[dropscan_dir.as_os_str()]);
            as_nobody("mkdir", &[staging.as_os_str()]);
        } else {
            std::fs::create_dir_all(&dropscan_dir).unwrap();
            std::fs::set_permissions(&dropscan_dir, std::fs::Permissions::from_mode(0o700))
                .unwrap();
            std::fs::create_dir(&staging).unwrap();
            std::os::unix::fs::chown(&staging, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        w.drop_file("a.txt", b"first watch");
        std::fs::write(w.dir.path().join("inbox2/b.txt"), b"second watch").unwrap();
        let agent = w.start_agent();
        let placed = wait_for(LIMIT, || {
            w.dir.path().join("out2/clean/b.txt").exists().then_some(())
        })
        .await;
        let ready = http_get(port, "/readyz").unwrap_or_default();
        let metrics = http_get(port, "/metrics").unwrap_or_default();
        // A whole reconcile walk of the other inbox later, the agent still runs.
        let inbox2 = w.dir.path().join("inbox2");
        let walks = events("reconcile", Some(&inbox2));
        let walked = wait_for(LIMIT, || {
            (events("reconcile", Some(&inbox2)) >= walks + 2).then_some(())
        })
        .await;
        assert!(
            walked.is_some(),
            "no whole reconcile walk of inbox2 within {LIMIT:?}"
        );
        let task_alive = agent.task.as_ref().is_some_and(|t| !t.is_finished());
        agent.stop().await.0.unwrap();
        let case = format!("attacker owns .dropscan: {attacker_owns_parent}");
        assert!(
            placed.is_some() && task_alive,
            "{case}: the other watch must keep working"
        );
        assert!(
            w.inbox.join("a.txt").exists(),
            "{case}: the held watch claims nothing into a folder another user owns"
        );
        assert_eq!(w.staged_files(), 0, "{case}");
        assert!(
            ready.starts_with("HTTP/1.1 503") && ready.contains("watch held"),
            "{case}: {ready}"
        );
        assert!(metrics.contains("dropscan_watches_held 1"), "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_one_instance_id_on_one_host_refuse_the_second_naming_the_first() {
    let w = World::quick().await;
    let first = w.start_agent();
    // The first agent holds the staging folder once it has started.
    let started = wait_for(LIMIT, || {
        w.inbox.join(".dropscan/test/.owner").exists().then_some(())
    })
    .await;
    assert!(started.is_some());
    // A test configuration run beside the service: same inbox, same instance id, its own state
    // folder.
    let text = std::fs::read_to_string(w.write_config())
        .unwrap()
        .replace("dir = \"state\"", "dir = \"state-b\"");
    let cfg = w.dir.path().join("second.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut second = Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    w.drop_file("a.txt", b"for the first agent");
    let exited = wait_for(LIMIT, || second.try_wait().unwrap()).await;
    if exited.is_none() {
        second.kill().ok();
    }
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let placed = wait_for(LIMIT, || w.clean.join("a.txt").exists().then_some(())).await;
    first.stop().await.0.unwrap();
    assert!(exited.is_some(), "the second agent ran beside the first");
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("in use by another dropscan")
            && stderr.contains(&format!("pid={}", std::process::id())),
        "{stderr}"
    );
    assert!(placed.is_some(), "the first agent works on");
}

/// Bug: a stopped agent let go of its staging folder's lock only when the last task holding its
/// root was dropped, which the runtime does a moment after the agent's `run` returned (aborted
/// watcher tasks). An agent started at once in the same process (the `review6` restart tests;
/// a one-shot `scan` after another) found the folder "in use by another dropscan on this host"
/// and stopped. Expected: the lock is let go when `run` returns; each restart runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_at_once_in_the_same_process_is_not_refused_its_own_staging_folder() {
    let w = World::quick().await;
    for i in 0..12 {
        let mark = crate::util::logged_mark();
        w.drop_file(&format!("f{i}.txt"), format!("restart {i}").as_bytes());
        let mut agent = w.start_agent();
        let placed = wait_for(LIMIT, || {
            (World::files_in(&w.clean).len() > i).then_some(())
        });
        let metrics = std::sync::Arc::clone(&agent.metrics);
        tokio::select! {
            placed = placed => assert!(
                placed.is_some(),
                "restart {i}: the file was not placed within {LIMIT:?}\n{}",
                restart_report(&w, &metrics, mark)
            ),
            ended = agent.ended() => panic!(
                "restart {i}: the agent stopped by itself: {ended:?}\n{}",
                restart_report(&w, &metrics, mark)
            ),
        }
        agent.token.cancel();
        let task = agent.task.take().unwrap();
        let t0 = std::time::Instant::now();
        match tokio::time::timeout(Duration::from_secs(20), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!(
                "restart {i}: the agent's stop ended in an error after {:?}: {e}\n{}",
                t0.elapsed(),
                restart_report(&w, &metrics, mark)
            ),
            Ok(Err(join)) => panic!(
                "restart {i}: the agent's task failed: {join}\n{}",
                restart_report(&w, &metrics, mark)
            ),
            Err(_) => panic!(
                "restart {i}: the agent did not stop within 20 s\n{}",
                restart_report(&w, &metrics, mark)
            ),
        }
    }
}

/// Review14, a cause of the flake of the test above: a child process forked by anything else in
/// the process (another test spawning a server or the binary: `fork` copies every descriptor,
/// and close-on-exec closes them only at the child's `exec`) shares the open lock file of the
/// staging folder. The stopped agent closing its own descriptor did not let go of the `flock`,
/// which belongs to the shared open file, until the child's `exec`; a restart in that window
/// found the folder "in use by another dropscan on this host" (this very process) and stopped.
/// Here a second descriptor of that open file (`pidfd_getfd`, what the forked child holds) is
/// kept across the stop and the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_a_child_forked_before_the_stop_has_not_yet_run_its_program_is_not_refused()
{
    let w = World::quick().await;
    w.drop_file("a.txt", b"first");
    let agent = w.start_agent();
    wait_for(LIMIT, || {
        (!World::files_in(&w.clean).is_empty()).then_some(())
    })
    .await
    .unwrap();
    let lock = std::fs::canonicalize(w.inbox.join(".dropscan/test/.lock")).unwrap();
    let fd: i32 = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == lock))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
        .expect("the agent holds its staging folder's lock file open");
    let me = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    let forked_copy =
        rustix::process::pidfd_getfd(&me, fd, rustix::process::PidfdGetfdFlags::empty()).unwrap();
    agent.stop().await.0.unwrap();
    w.drop_file("b.txt", b"second");
    let mut agent = w.start_agent();
    let placed = wait_for(LIMIT, || {
        (World::files_in(&w.clean).len() > 1).then_some(())
    });
    tokio::select! {
        placed = placed => assert!(placed.is_some(), "the file was not placed"),
        ended = agent.ended() => panic!("the restarted agent stopped by itself: {ended:?}"),
    }
    agent.stop().await.0.unwrap();
    drop(forked_copy);
}

/// What a failing restart of the test above shows: the agent's log lines about this world since
/// `mark` (info and above), the watches it held and why, its readiness, the journal's records,
/// and the names in the inbox (its staging folder, lock and owner marker included) and clean.
fn restart_report(w: &World, metrics: &dropscan::metrics::Metrics, mark: u64) -> String {
    let about = [
        w.dir.path().display().to_string(),
        std::fs::canonicalize(w.dir.path())
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        w.addr.to_string(),
    ];
    let about: Vec<String> = about.into_iter().filter(|a| !a.is_empty()).collect();
    let names = |dir: &std::path::Path| -> Vec<String> {
        crate::util::entries_below(dir)
            .into_iter()
            .map(|p| {
                let rel = p.strip_prefix(dir).unwrap_or(&p).display().to_string();
                let len = std::fs::symlink_metadata(&p).map_or(0, |m| m.len());
                format!("{rel} ({len} B)")
            })
            .collect()
    };
    format!(
        "agent log (info and above, this world's lines):\n  {}\nheld watches: {:?}\nready: {:?}\n\
         placed (this agent): {}\njournal (rel_path, state, outcome, reason): {:?}\n\
         inbox: {:?}\nclean: {:?}",
        crate::util::logged_since(mark, &about).join("\n  "),
        metrics.held_watches(),
        metrics.readiness().map_err(|e| e.to_string()),
        metrics.placed_total(),
        crate::review8::records(w),
        names(&w.inbox),
        names(&w.clean),
    )
}
