//! Review 16: an attack on today's early signal handlers (`commands::run` installs them before
//! the configuration is loaded and the inboxes are looked at). Each start-up here waits on a
//! share whose server hangs (`answer::DEADLINE` on the look at its inbox), and the signals come
//! within that wait.

#![allow(clippy::unwrap_used)]

use std::process::Child;
use std::time::Duration;

use rustix::process::Signal;

use crate::review10::{HangingShare, spawn_binary, terminate, with_second_watch};
use crate::util::{LONG, World, bytes, wait_for};

/// The agent (the binary) started on a world whose second watch's share hangs, 1 s into its
/// start-up: (world, share, agent, its log). None where the share cannot be mounted.
async fn one_second_into_a_hung_start_up()
-> Option<(World, HangingShare, Child, std::path::PathBuf)> {
    let (w, server, other) = with_second_watch().await;
    let share = HangingShare::mount(&server, &other)?;
    for sub in ["clean", "quarantine", "failed"] {
        std::fs::create_dir_all(w.dir.path().join("out2").join(sub)).unwrap();
    }
    share.hang();
    let log = w.dir.path().join("agent.log");
    let agent = spawn_binary(&w.write_config(), &log);
    tokio::time::sleep(Duration::from_secs(1)).await;
    Some((w, share, agent, log))
}

fn send(agent: &Child, sig: Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(agent.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

/// Waits up to 30 s for `agent` to end (killed after that); its status and its log.
async fn ended(
    agent: &mut Child,
    log: &std::path::Path,
) -> (Option<std::process::ExitStatus>, String) {
    let status = wait_for(Duration::from_secs(30), || agent.try_wait().unwrap()).await;
    if status.is_none() {
        agent.kill().ok();
        agent.wait().ok();
    }
    (status, std::fs::read_to_string(log).unwrap_or_default())
}

/// Finding: a SIGTERM during start-up was taken (the agent stopped once started), but its log
/// line was not: it came before logging was set up, so the log showed the agent start and stop
/// with no reason given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_start_up_ends_the_agent_and_its_log_says_why() {
    let Some((_w, share, mut agent, log)) = one_second_into_a_hung_start_up().await else {
        return;
    };
    send(&agent, Signal::TERM);
    let (status, text) = ended(&mut agent, &log).await;
    share.signal(Signal::CONT);
    assert!(
        status.is_some_and(|s| s.success()),
        "a SIGTERM during start-up: ended {status:?}; its log: {text}"
    );
    assert!(
        text.contains("signal received"),
        "a SIGTERM during start-up ended the agent without a word about it; its log: {text}"
    );
}

/// Finding: two SIGINTs during start-up exit at once (130), as documented, but with no line at
/// all: the second signal's message came before logging was set up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sigints_during_start_up_exit_at_once_and_say_so() {
    let Some((_w, share, mut agent, log)) = one_second_into_a_hung_start_up().await else {
        return;
    };
    send(&agent, Signal::INT);
    tokio::time::sleep(Duration::from_millis(200)).await;
    send(&agent, Signal::INT);
    let (status, text) = ended(&mut agent, &log).await;
    share.signal(Signal::CONT);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(130),
        "two SIGINTs during start-up: {status:?}; its log: {text}"
    );
    assert!(
        text.contains("second signal"),
        "two SIGINTs during start-up exited without a word about it; its log: {text}"
    );
}

/// A burst of SIGHUPs during start-up is one reload once started (the configuration may have
/// changed after it was read), and harmless: files are placed, SIGTERM ends the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sighups_during_start_up_is_one_reload_once_started() {
    let Some((w, share, mut agent, log)) = one_second_into_a_hung_start_up().await else {
        return;
    };
    for _ in 0..5 {
        send(&agent, Signal::HUP);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.drop_file("local.bin", &bytes(1601, 1000));
    let placed = wait_for(LONG, || w.clean.join("local.bin").is_file().then_some(())).await;
    let early = agent.try_wait().unwrap();
    share.signal(Signal::CONT);
    let (status, threads, _) = terminate(&mut agent, &log, 1).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let reloads = text.matches("SIGHUP: configuration valid").count();
    assert!(
        early.is_none() && placed.is_some() && status.is_some(),
        "SIGHUPs during start-up: ended early {early:?}; local.bin placed {placed:?}; ended on \
         SIGTERM {status:?} (threads {threads:?}); its log: {text}"
    );
    assert_eq!(reloads, 1, "five SIGHUPs during start-up; its log: {text}");
}

/// Another agent holds the state folder: the refusal (75, with its message) stands when a SIGHUP
/// and a SIGTERM come during the start-up before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_during_a_start_up_refused_by_the_lock_keep_its_exit_code_and_message() {
    let (w, server, other) = with_second_watch().await;
    let Some(share) = HangingShare::mount(&server, &other) else {
        return;
    };
    for sub in ["clean", "quarantine", "failed"] {
        std::fs::create_dir_all(w.dir.path().join("out2").join(sub)).unwrap();
    }
    std::fs::create_dir_all(w.state_dir()).unwrap();
    let held = std::fs::File::create(w.state_dir().join("dropscan.lock")).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    share.hang();
    let log = w.dir.path().join("agent.log");
    let mut agent = spawn_binary(&w.write_config(), &log);
    tokio::time::sleep(Duration::from_secs(1)).await;
    send(&agent, Signal::HUP);
    send(&agent, Signal::TERM);
    let (status, text) = ended(&mut agent, &log).await;
    share.signal(Signal::CONT);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(75),
        "signals during a start-up refused by the lock: {status:?}; its log: {text}"
    );
    assert!(
        text.contains("lock"),
        "the lock refusal's message is missing; its log: {text}"
    );
}

/// Finding (kill points under load, with each call held 50 ms instead of 200 ms): a loaded
/// machine read the strace log after the n-th call's hold had ended (5 of 175 rounds beside three
/// CPU hogs, 60 to 118 ms after the call returned; in one the same thread had already made the
/// next call), so the agent went on and the kill landed on whatever it did next: kill point n
/// went unchecked, silently. Now a late kill is noticed and
/// the round run again with twice the hold. Here every kill comes late at first: each call is
/// held 100 µs while the log is read every 5 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_that_comes_after_the_held_call_returned_is_noticed_and_the_round_run_again() {
    let Some(strace) = crate::shares_fixture::find_tool("strace") else {
        eprintln!("skipped: strace not installed (Debian package strace)");
        return;
    };
    let start = Duration::from_micros(100);
    let (_w, (), hold) = crate::kill_points::killed_round(
        &strace,
        "rename,renameat,renameat2",
        3,
        1,
        start,
        async || {
            let w = World::quick().await;
            w.drop_file("a.bin", &bytes(1602, 4000));
            (w, ())
        },
    )
    .await;
    assert!(
        hold.is_some_and(|h| h > start),
        "killed at the 3rd rename with each call held {start:?}: the kill, read from a log \
         polled every 5 ms, came after the call returned and was taken as kill point 3 \
         (killed with a hold of {hold:?})"
    );
}
