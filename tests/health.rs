//! Honest health: an idle agent (nothing dropped, nothing in flight) asks the server every
//! `health_probe`, so `/readyz` and `dropscan_server_up` follow a server that refuses the sensor
//! (401) or is gone, and come back when it does. The waits count the agent's own probes (its
//! `kata_answers` counter), never seconds: "within two probe intervals" is "by the third probe".

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use dropscan::app::Agent;
use dropscan::config::Config;
use dropscan::emulator::{Authorization, Emulator, EmulatorConfig};
use dropscan::metrics::Metrics;
use tokio_util::sync::CancellationToken;

use crate::util::{Running, World, wait_for};

/// The probe's endpoint, as the answers counter names it.
const FILTERS: &str = "GET scans/filters";

/// The value of `series` in the exposition of `m` (0 when absent).
fn sample(m: &Metrics, series: &str) -> f64 {
    m.render()
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Restrictions requests the agent has seen end with `code` ("none": no answer).
fn probes(m: &Metrics, code: &str) -> f64 {
    sample(
        m,
        &format!("dropscan_kata_answers_total{{endpoint=\"{FILTERS}\",code=\"{code}\"}}"),
    )
}

/// Waits (bounded, generously) until `n` restrictions requests ended with `code`.
async fn wait_probes(m: &Metrics, code: &str, n: f64) {
    let seen = wait_for(Duration::from_secs(30), || {
        (probes(m, code) >= n).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "the idle agent asked the server {} time(s) (code {code}), not {n}: it does not probe",
        probes(m, code)
    );
}

/// Starts the agent of `w`, probing every second, with nothing to scan; returns its metrics.
fn start_probing(w: &mut World) -> (Running, Arc<Metrics>) {
    start_probing_with(w, "health_probe = \"1s\"")
}

/// [`start_probing`] with these `[server]` lines.
fn start_probing_with(w: &mut World, server: &str) -> (Running, Arc<Metrics>) {
    w.server_extra = server.into();
    let agent = Agent::new(Config::load(&w.write_config()).unwrap()).unwrap();
    let metrics = agent.metrics();
    let events = agent.subscribe();
    let token = CancellationToken::new();
    let t = token.clone();
    let task = tokio::spawn(async move { agent.run(t).await.map_err(|e| e.to_string()) });
    let running = Running {
        token,
        task: Some(task),
        events,
        metrics: Arc::clone(&metrics),
    };
    (running, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_is_not_ready_while_the_server_refuses_it() {
    let mut w = World::new(EmulatorConfig {
        auto_accept: false,
        ..EmulatorConfig::default()
    })
    .await;
    let (agent, m) = start_probing(&mut w);
    // The start-up request and two probes after it, all refused: not ready, server down.
    wait_probes(&m, "401", 3.0).await;
    let why = m
        .readiness()
        .expect_err("ready while the server answers 401");
    assert!(why.to_string().contains("401"), "{why}");
    assert_eq!(sample(&m, "dropscan_server_up"), 0.0);

    // The administrator accepts the integration: ready again at a later probe.
    for (sensor, fp, _) in w.emulator().state().authorizations() {
        w.emulator()
            .state()
            .set_authorization(&sensor, fp, Authorization::Accepted);
    }
    let ready = wait_for(Duration::from_secs(30), || m.readiness().ok()).await;
    assert!(ready.is_some(), "never ready: {:?}", m.readiness());
    assert_eq!(sample(&m, "dropscan_server_up"), 1.0);
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_is_not_ready_while_the_server_is_dead() {
    let mut w = World::quick().await;
    let (agent, m) = start_probing(&mut w);
    // Up first (the start-up request and one probe answered).
    wait_probes(&m, "200", 2.0).await;
    assert_eq!(m.readiness(), Ok(()));

    let state = w.emulator().state();
    w.emulator.take().unwrap().stop().await;
    let before = probes(&m, "none");
    // Two probes find nobody; by the third, the agent says so.
    wait_probes(&m, "none", before + 3.0).await;
    let why = m.readiness().expect_err("ready while the server is dead");
    assert!(why.to_string().contains("unavailable"), "{why}");
    assert_eq!(sample(&m, "dropscan_server_up"), 0.0);

    // The server is back on the same address: ready again.
    let emu = Emulator::start_with_state(
        EmulatorConfig {
            listen: w.addr,
            ..EmulatorConfig::default()
        },
        &w.certs,
        state,
    )
    .await
    .unwrap();
    w.emulator = Some(emu);
    let ready = wait_for(Duration::from_secs(30), || m.readiness().ok()).await;
    assert!(ready.is_some(), "never ready again: {:?}", m.readiness());
    assert_eq!(sample(&m, "dropscan_server_up"), 1.0);
    agent.stop().await.0.unwrap();
}

/// A server that hangs (TLS and HTTP accepted, no answer: a stuck server, or a proxy waiting on
/// one): each probe waited for the whole request timeout (default 30 s; with the default
/// `health_probe` of 60 s the second failed probe came about 180 s after the last answer, three
/// intervals). A probe now waits a quarter of `health_probe` and a failed one is confirmed a
/// quarter later, so the agent says so within two intervals. Here the request timeout is 5
/// minutes, which the old probe waited out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_is_not_ready_soon_after_the_server_hangs() {
    let mut w = World::quick().await;
    let (agent, m) = start_probing_with(&mut w, "health_probe = \"2s\"\nrequest_timeout = \"5m\"");
    wait_probes(&m, "200", 2.0).await;
    assert_eq!(m.readiness(), Ok(()));
    w.emulator().state().set_faults(dropscan::emulator::Faults {
        slow_share: 1.0,
        slow_delay: Duration::from_secs(600),
        ..dropscan::emulator::Faults::default()
    });
    let down = wait_for(Duration::from_secs(60), || m.readiness().err()).await;
    let why = down.expect("still ready 60 s after the server stopped answering");
    assert!(why.to_string().contains("unavailable"), "{why}");
    assert_eq!(sample(&m, "dropscan_server_up"), 0.0);
    agent.stop().await.0.unwrap();
}

/// Kills (by its own PID) and reaps a child this test started.
fn end(mut child: std::process::Child) {
    child.kill().ok();
    child.wait().ok();
}

/// Datagrams received on `socket` until one holds a line for which `want` holds (bounded).
async fn receive_until(
    socket: &tokio::net::UnixDatagram,
    seen: &mut Vec<String>,
    want: impl Fn(&str) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = m.lines().any(&want);
                seen.push(m);
                if found {
                    return true;
                }
            }
            Ok(Err(e)) => panic!("notify socket: {e}"),
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemctl_status_shows_what_the_agent_does_and_a_reload_says_reloading_then_ready() {
    let w = World::quick().await;
    let cfg = w.write_config();
    let sock_path = w.dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    let mut seen = Vec::new();
    let ready = receive_until(&socket, &mut seen, |l| l == "READY=1").await;
    // The periodic line: scans in flight, files waiting, the binding limit, the server.
    let status = ready
        && receive_until(&socket, &mut seen, |l| {
            l.starts_with("STATUS=running: ")
                && l.contains("in flight (cap ")
                && l.contains("waiting; bound by ")
                && l.ends_with("KATA up")
        })
        .await;
    let before = seen.len();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).ok();
    let reloading = status && receive_until(&socket, &mut seen, |l| l == "RELOADING=1").await;
    let ready_again = reloading && receive_until(&socket, &mut seen, |l| l == "READY=1").await;
    end(child);
    assert!(ready, "no READY=1: {seen:?}");
    assert!(
        status,
        "no STATUS line with in flight, waiting, bound by: {seen:?}"
    );
    assert!(
        reloading,
        "no RELOADING=1 after SIGHUP: {:?}",
        &seen[before..]
    );
    // systemd refuses RELOADING=1 without the monotonic time in the same message.
    let message = seen[before..]
        .iter()
        .find(|m| m.lines().any(|l| l == "RELOADING=1"))
        .unwrap();
    let usec = message
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {message:?}"));
    assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{message:?}");
    assert!(
        ready_again,
        "no READY=1 after the reload: {:?}",
        &seen[before..]
    );
}

/// Runs the agent against `w` with stderr into `log`, `JOURNAL_STREAM` naming `stream` (when
/// set), until a line of `log` satisfies `want` (bounded); returns the log.
async fn run_logging(w: &World, log: &std::path::Path, stream: Option<String>) -> String {
    let cfg = w.write_config();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dropscan"));
    cmd.args(["run", "--config", cfg.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    match stream {
        Some(s) => cmd.env("JOURNAL_STREAM", s),
        None => cmd.env_remove("JOURNAL_STREAM"),
    };
    let child = cmd.spawn().unwrap();
    let text = wait_for(Duration::from_secs(30), || {
        let t = std::fs::read_to_string(log).ok()?;
        t.contains("refuses this sensor").then_some(t)
    })
    .await;
    end(child);
    text.unwrap_or_else(|| {
        panic!(
            "no refusal logged: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_journald_error_lines_carry_priority_3() {
    // A server that refuses the sensor: the agent logs an ERROR at start.
    let w = World::new(EmulatorConfig {
        auto_accept: false,
        ..EmulatorConfig::default()
    })
    .await;
    let log = w.dir.path().join("stderr.log");
    std::fs::write(&log, b"").unwrap();
    let st = rustix::fs::stat(&log).unwrap();
    let text = run_logging(&w, &log, Some(format!("{}:{}", st.st_dev, st.st_ino))).await;
    let refusal = text
        .lines()
        .find(|l| l.contains("refuses this sensor"))
        .unwrap();
    assert!(refusal.starts_with("<3>"), "{text}");
    assert!(
        text.lines()
            .all(|l| l.starts_with('<') || l.starts_with(' ')),
        "every line has its priority: {text}"
    );

    // Not the journal (no JOURNAL_STREAM, or one naming another file): plain lines.
    let plain = w.dir.path().join("plain.log");
    let text = run_logging(&w, &plain, None).await;
    assert!(!text.lines().any(|l| l.starts_with('<')), "{text}");
    let text = run_logging(&w, &plain, Some(format!("{}:{}", st.st_dev, st.st_ino))).await;
    assert!(!text.lines().any(|l| l.starts_with('<')), "{text}");
}
