//! Regression tests for what got in the way of a new user (issue 10, item 6), each named after
//! the problem it fixes.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dropscan::emulator::{CLIENT_KEY_FILE, CertBundle};

use crate::util::{EICAR, World, collect_stderr, wait_for};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dropscan"));
    c.stdin(Stdio::null());
    c
}

async fn output(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// Waits for `child` to exit within `limit`, killing it (and failing) otherwise.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("the process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_exit_after_2_hangs_on_a_second_run() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    for run in 1..=2 {
        let demo = demo.clone();
        let status = tokio::task::spawn_blocking(move || {
            let mut child = bin()
                .args(["demo", "--exit-after", "2", "--settle", "300ms"])
                .args(["--poll-interval", "200ms", "--dir"])
                .arg(&demo)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            wait_exit(&mut child, Duration::from_secs(60))
        })
        .await
        .unwrap();
        assert!(status.success(), "run {run}: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60s_poll_interval_logs_nothing_after_submission() {
    let w = World::quick().await;
    let config = w.write_config();
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "poll_interval = \"100ms\"",
        "poll_interval = \"60s\"",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let mut child = bin()
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect_stderr(&mut child);
    w.drop_file("slow.txt", b"waits a minute for its verdict");
    let found = wait_for(Duration::from_secs(30), || {
        lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("next results request in 1m") && l.contains("slow.txt"))
            .cloned()
    })
    .await;
    child.kill().ok();
    child.wait().ok();
    assert!(found.is_some(), "{:?}", lines.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_inbox_makes_run_exit_69_printing_the_error_twice() {
    let mut w = World::quick().await;
    let port = free_port();
    w.more_watches = format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let config = w.write_config();
    std::fs::remove_dir(&w.inbox).unwrap();
    let mut child = bin()
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect_stderr(&mut child);
    // Not ready while the share is not mounted, and still running.
    let not_ready = wait_for(Duration::from_secs(20), || {
        http_get(port, "/readyz")
            .filter(|r| r.starts_with("HTTP/1.1 503") && r.contains("inbox missing"))
    })
    .await;
    assert!(not_ready.is_some(), "{:?}", http_get(port, "/readyz"));
    assert!(
        child.try_wait().unwrap().is_none(),
        "run exited: {:?}",
        lines.lock().unwrap()
    );
    // The share appears: the agent starts and becomes ready.
    std::fs::create_dir_all(&w.inbox).unwrap();
    let ready = wait_for(Duration::from_secs(30), || {
        http_get(port, "/readyz").filter(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
    assert!(ready.is_some(), "{:?}", http_get(port, "/readyz"));
    w.drop_file("late.txt", b"after the mount");
    w.wait_placed(1, Duration::from_secs(30)).await;
    child.kill().ok();
    child.wait().ok();
    let lines = lines.lock().unwrap();
    let waiting = lines.iter().filter(|l| l.contains("inbox missing")).count();
    assert_eq!(waiting, 1, "logged once: {lines:?}");
    assert!(!lines.iter().any(|l| l.contains("fatal")), "{lines:?}");
}

async fn check_offline(config: &Path) -> Output {
    let mut c = bin();
    c.args(["check", "--offline", "--config"]).arg(config);
    output(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_inbox_through_a_symlink_is_accepted() {
    let mut w = World::quick().await;
    std::os::unix::fs::symlink(&w.inbox, w.dir.path().join("inbox-link")).unwrap();
    w.more_watches = "\n[[watch]]\npath = \"inbox-link\"\nclean_dir = \"out2/clean\"\nquarantine_dir = \"out2/quarantine\"\nfailed_dir = \"out2/failed\"\n".into();
    let out = check_offline(&w.write_config()).await;
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("watch[1].path") && text.contains("watch[0].path"),
        "{text}"
    );
    assert!(text.contains("dropscan.toml"), "names the file: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_equal_to_another_watchs_clean_dir_is_accepted() {
    let mut w = World::quick().await;
    w.more_watches = "\n[[watch]]\npath = \"out/clean\"\nclean_dir = \"out2/clean\"\nquarantine_dir = \"out2/quarantine\"\nfailed_dir = \"out2/failed\"\n".into();
    let out = check_offline(&w.write_config()).await;
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("watch[1].path") && text.contains("watch[0].clean_dir"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_finished_by_outcome_with_no_rows() {
    let w = World::quick().await;
    let agent = w.start_agent();
    agent.stop().await.0.unwrap();
    let mut c = bin();
    c.args(["status", "--config"])
        .arg(w.dir.path().join("dropscan.toml"));
    let out = output(c).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("finished files by outcome:\n  (none)"),
        "{text}"
    );
    assert!(!text.contains("vanished"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_verdicts_sidecar_has_empty_scan_ids() {
    let w = World::quick().await;
    let agent = w.start_agent();
    w.drop_file("first.com", EICAR);
    w.wait_placed(1, Duration::from_secs(30)).await;
    w.drop_file("second.com", EICAR);
    w.wait_placed(2, Duration::from_secs(30)).await;
    agent.stop().await.0.unwrap();
    let read = |name: &str| -> serde_json::Value {
        let p = w.quarantine.join(format!("{name}.dropscan.json"));
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
    };
    let (first, second) = (read("first.com"), read("second.com"));
    assert_eq!(second["verdict_reused"], true, "{second:#}");
    assert_eq!(
        second["scan_ids"], first["scan_ids"],
        "{first:#} {second:#}"
    );
    assert_eq!(
        second["scan_ids"].as_array().unwrap().len(),
        1,
        "{second:#}"
    );
}

#[test]
fn the_untrusted_server_message_repeats_itself() {
    let e = dropscan::kata::ApiError::ServerNotTrusted {
        detail: "invalid peer certificate: UnknownIssuer".into(),
        request_lost: false,
    };
    let (line, code) = dropscan::commands::explain(&e, "s");
    assert_eq!(line.matches("not trusted").count(), 1, "{line}");
    assert!(line.contains("server.ca_cert"), "{line}");
    assert_eq!(code, dropscan::error::EXIT_PROTOCOL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_offline_passes_a_key_that_does_not_match_its_cert() {
    let w = World::quick().await;
    let other = w.dir.path().join("other-certs");
    CertBundle::load_or_generate(&other).unwrap();
    let config = w.write_config();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &w.certs_dir.join(CLIENT_KEY_FILE).display().to_string(),
        &other.join(CLIENT_KEY_FILE).display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    let out = check_offline(&config).await;
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("does not belong to the client certificate"),
        "{text}"
    );
}

/// Issue 11: the running agent (not only the decision function) logs one info line when the
/// limit that bounds throughput changes. An idle agent is bound by its input: after two
/// evaluations (5 s apart) it says so, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_agent_logs_the_binding_limit_once_when_it_changes() {
    let w = World::quick().await;
    let config = w.write_config();
    let mut child = bin()
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect_stderr(&mut child);
    let bound = |l: &String| l.contains("throughput is now bound by");
    let found = wait_for(Duration::from_secs(40), || {
        lines.lock().unwrap().iter().find(|l| bound(l)).cloned()
    })
    .await;
    // Another evaluation period with nothing changed: no second line.
    tokio::time::sleep(Duration::from_secs(6)).await;
    child.kill().ok();
    child.wait().ok();
    let found = found.unwrap_or_else(|| panic!("no binding line in {:?}", lines.lock().unwrap()));
    assert!(
        found.contains("binding=\"input\"") || found.contains("binding=input"),
        "{found}"
    );
    let count = lines.lock().unwrap().iter().filter(|l| bound(l)).count();
    assert_eq!(count, 1, "{:?}", lines.lock().unwrap());
}
