//! `/metrics` scraped during and after an end-to-end run (real agent, emulator over mTLS): the
//! counters and histogram counts match what happened, the Content-Type is the one Prometheus
//! expects, and a SIGHUP reload keeps both the counters and the open port. `promtool check
//! metrics` runs on the exposition when promtool is on PATH.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use dropscan::config::Config;
use dropscan::metrics::Metrics;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::util::{EICAR, World, wait_for};

/// `GET path` on 127.0.0.1:port → (head, body); None when nothing listens.
fn get(port: u16, path: &str) -> Option<(String, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some((head.to_string(), body.to_string()))
}

/// The value of the sample line starting with `series ` in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Scrapes until `series` reaches `want` (the files are on disk a moment before counted).
async fn scrape_until(port: u16, series: &str, want: f64) -> String {
    let found = wait_for(Duration::from_secs(20), || {
        let (_, body) = get(port, "/metrics")?;
        (sample(&body, series) == Some(want)).then_some(body)
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "{series} never reached {want}: {:?}",
            get(port, "/metrics").map(|r| r.1)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_an_end_to_end_run_and_survive_a_sighup_reload() {
    let mut w = World::quick().await;
    let port = free_port();
    w.more_watches = format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let path = w.write_config();
    let config = Config::load(&path).unwrap();
    let metrics = Arc::new(Metrics::new());
    let (shutdown, reload) = (CancellationToken::new(), Arc::new(Notify::new()));
    let task = tokio::spawn(dropscan::app::run_reloading_with(
        config,
        &*Box::leak(path.clone().into_boxed_path()),
        shutdown.clone(),
        Arc::clone(&reload),
        Arc::clone(&metrics),
    ));

    // During the run: the endpoint answers with the right type before anything is dropped.
    let (head, _) = wait_for(Duration::from_secs(10), || get(port, "/metrics"))
        .await
        .expect("the metrics endpoint never answered");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );

    w.drop_file("a.txt", b"clean one");
    w.drop_file("b.txt", b"clean two");
    w.drop_file("c.com", EICAR);
    w.wait_placed(3, Duration::from_secs(30)).await;
    let body = scrape_until(
        port,
        "dropscan_files_placed_total{outcome=\"quarantine\"}",
        1.0,
    )
    .await;
    let body = if sample(&body, "dropscan_files_placed_total{outcome=\"clean\"}") == Some(2.0) {
        body
    } else {
        scrape_until(port, "dropscan_files_placed_total{outcome=\"clean\"}", 2.0).await
    };
    for (series, want) in [
        ("dropscan_files_claimed_total", 3.0),
        ("dropscan_files_hashed_total", 3.0),
        ("dropscan_scans_submitted_total", 3.0),
        ("dropscan_drop_to_submitted_seconds_count", 3.0),
        ("dropscan_submitted_to_verdict_seconds_count", 3.0),
        ("dropscan_drop_to_placed_seconds_count", 3.0),
        ("dropscan_files_placed_total{outcome=\"failed\"}", 0.0),
        (
            "dropscan_kata_answers_total{endpoint=\"POST scans\",code=\"200\"}",
            3.0,
        ),
        ("dropscan_in_flight_cap", 16.0),
        ("dropscan_server_up", 1.0),
    ] {
        assert_eq!(sample(&body, series), Some(want), "{series} in\n{body}");
    }
    assert!(
        sample(&body, "dropscan_last_successful_poll_timestamp_seconds").unwrap() > 1.7e9,
        "{body}"
    );
    assert!(
        sample(&body, "dropscan_client_cert_expiry_timestamp_seconds").unwrap() > 1.7e9,
        "{body}"
    );
    assert!(
        body.contains("dropscan_queue_files{state=\"submitted\"}"),
        "{body}"
    );
    assert!(!body.contains("latency_ms"), "{body}");
    promtool_check(&body);

    // SIGHUP with a valid file: a new agent, the same counters, the port never closed.
    reload.notify_one();
    w.drop_file("d.txt", b"after the reload");
    w.wait_placed(4, Duration::from_secs(30)).await;
    let body = scrape_until(port, "dropscan_files_placed_total{outcome=\"clean\"}", 3.0).await;
    assert_eq!(
        sample(&body, "dropscan_files_claimed_total"),
        Some(4.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "dropscan_drop_to_placed_seconds_count"),
        Some(4.0),
        "{body}"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        get(port, "/metrics").is_none(),
        "the endpoint stops with the agent"
    );
}

/// Files still being written count in their watch's `dropscan_inbox_settling_files` while they
/// settle (here two writers hold them open, so they stay incomplete for as long as the test
/// needs), and leave it once claimed: the gauge goes up with the drops and back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_settling_in_an_inbox_are_counted_per_watch_until_they_are_claimed() {
    let mut w = World::quick().await;
    let port = free_port();
    w.more_watches = format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let agent = w.start_agent();
    let watch = |name: &str| format!("{name}{{watch=\"{}\"}}", w.inbox.display());
    let settling = watch("dropscan_inbox_settling_files");
    let body = scrape_until(port, &settling, 0.0).await;
    assert_eq!(
        sample(&body, &watch("dropscan_watch_degraded")),
        Some(0.0),
        "{body}"
    );

    let mut writers = Vec::new();
    for name in ["a.txt", "b.txt"] {
        let mut f = std::fs::File::create(w.inbox.join(name)).unwrap();
        f.write_all(b"being written").unwrap();
        writers.push(f);
    }
    let body = scrape_until(port, &settling, 2.0).await;
    assert_eq!(
        sample(&body, "dropscan_files_claimed_total"),
        Some(0.0),
        "{body}"
    );

    drop(writers);
    w.wait_placed(2, Duration::from_secs(30)).await;
    let body = scrape_until(port, &settling, 0.0).await;
    assert_eq!(
        sample(&body, "dropscan_files_claimed_total"),
        Some(2.0),
        "{body}"
    );
    agent.stop().await.0.unwrap();
}

/// `promtool check metrics` on `body` when promtool is on PATH (skipped otherwise).
fn promtool_check(body: &str) {
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not on PATH: exposition lint skipped");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `GET path` with a 3 s connect/read/write timeout: Some(status line) or None.
fn get_within(port: u16, path: &str) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines().next().map(str::to_string)
}

/// Review finding (issue 18, 3): any local user could stall the agent through the metrics port.
/// 1,100 idle connections used up the process's 1,024 descriptors: the accept loop spun on
/// EMFILE, a new drop was skipped with "Too many open files" and `/healthz` stopped answering.
/// Here the real binary runs with 256 descriptors (soft and hard, so raising the soft limit at
/// start cannot help), 400 idle connections are opened and held, and still `/healthz` answers
/// and a new drop is placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_the_metrics_port_stall_neither_health_nor_drops() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let mut w = World::quick().await;
    let port = free_port();
    w.more_watches = format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let cfg = w.write_config();
    let child = std::process::Command::new("prlimit")
        .arg("--nofile=256:256")
        .arg(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
    let _agent = Kill(child);
    let up = wait_for(Duration::from_secs(20), || {
        get_within(port, "/healthz").filter(|l| l.contains(" 200"))
    })
    .await;
    assert!(up.is_some(), "the endpoint never answered");
    w.drop_file("before.txt", b"placed before the flood");
    w.wait_placed(1, Duration::from_secs(30)).await;

    // The flood: 400 connections that never send a byte, held open.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut idle = Vec::new();
    for _ in 0..400 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            idle.push(s);
        }
    }
    assert!(idle.len() >= 300, "only {} connections opened", idle.len());
    // No pause needed: connections are accepted in the order they were made, so the health
    // request below is reached only after every idle one was taken.

    let health = wait_for(Duration::from_secs(20), || {
        get_within(port, "/healthz").filter(|l| l.contains(" 200"))
    })
    .await;
    assert!(
        health.is_some(),
        "/healthz does not answer while idle connections are held"
    );
    w.drop_file("during.txt", b"dropped during the flood");
    let placed = wait_for(Duration::from_secs(30), || {
        w.clean.join("during.txt").exists().then_some(())
    })
    .await;
    assert!(
        placed.is_some(),
        "a drop is not placed while idle connections are held: {:?}",
        w.outcomes()
    );
    drop(idle);
}
