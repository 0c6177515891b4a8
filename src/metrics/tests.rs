//! Unit tests of the exposition.

use std::num::{NonZeroU32, NonZeroUsize};

use super::*;

#[test]
fn client_cert_expiry_gauge_is_exported_when_known() {
    let known = Metrics::with_client_cert_expiry(Some(1_800_000_000)).render();
    assert!(
        known.contains("# TYPE dropscan_client_cert_expiry_timestamp_seconds gauge\ndropscan_client_cert_expiry_timestamp_seconds 1800000000"),
        "{known}"
    );
    let unknown = Metrics::with_client_cert_expiry(None).render();
    assert!(!unknown.contains("client_cert_expiry"), "{unknown}");
}

#[test]
fn placement_latency_is_a_seconds_histogram_with_a_count() {
    let m = Metrics::new();
    m.placed(Outcome::Clean, 1500);
    m.placed(Outcome::Quarantine, 500);
    let text = m.render();
    assert!(
        text.contains("# TYPE dropscan_drop_to_placed_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("dropscan_drop_to_placed_seconds_count 2"),
        "{text}"
    );
    assert!(
        text.contains("dropscan_drop_to_placed_seconds_sum 2.0"),
        "{text}"
    );
    assert!(
        text.contains("dropscan_files_placed_total{outcome=\"clean\"} 1"),
        "{text}"
    );
    assert!(!text.contains("latency_ms"), "{text}");
}

#[test]
fn a_gauge_is_one_line_and_the_same_series_on_a_second_call() {
    let m = Metrics::new();
    m.gauge("test_gauge", "A test gauge.").set(3);
    m.gauge("test_gauge", "A test gauge.").inc();
    let text = m.render();
    assert!(text.contains("dropscan_test_gauge 4"), "{text}");
    assert_eq!(text.matches("# TYPE dropscan_test_gauge gauge").count(), 1);
}

#[test]
fn cap_health_and_answers_are_exported_once_attached() {
    let m = Metrics::new();
    let limits = Limits::new(
        NonZeroUsize::new(7).unwrap_or(NonZeroUsize::MIN),
        NonZeroU32::MIN,
    );
    m.attach(limits, Path::new("/nonexistent/journal.sqlite"));
    m.answer("scans/state", Some(200));
    m.answer("scans", None);
    let text = m.render();
    assert!(text.contains("dropscan_in_flight_cap 7"), "{text}");
    assert!(
        text.contains("dropscan_kata_answers_total{endpoint=\"scans/state\",code=\"200\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("dropscan_kata_answers_total{endpoint=\"scans\",code=\"none\"} 1"),
        "{text}"
    );
}

#[test]
fn readyz_is_not_ready_while_an_inbox_is_missing() {
    let m = Metrics::new();
    m.attach(
        Limits::new(NonZeroUsize::MIN, NonZeroU32::MIN),
        Path::new("/nonexistent"),
    );
    assert_eq!(m.readiness(), Ok(()));
    m.set_missing_inboxes([PathBuf::from("/mnt/share/inbox")]);
    let why = m.readiness().unwrap_err().to_string();
    assert!(why.contains("/mnt/share/inbox"), "{why}");
    m.set_missing_inboxes([]);
    assert_eq!(m.readiness(), Ok(()));
}

#[test]
fn limits_gauges_are_exported() {
    let limits = Limits::auto(
        std::num::NonZeroUsize::new(100).unwrap(),
        std::num::NonZeroU32::MIN,
    );
    let m = Metrics::new();
    m.attach(limits, Path::new("/nonexistent/journal.sqlite"));
    let text = m.render();
    for line in [
        "dropscan_in_flight_cap 4",
        "dropscan_in_flight_learned_capacity 0",
        "dropscan_scan_mean_seconds 0.0",
        "dropscan_files_per_hour 0.0",
        "dropscan_submissions_throttled_since_start 0",
        "dropscan_binding_limit{limit=\"unknown\"} 1",
        "dropscan_binding_limit{limit=\"server_concurrency\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
}

/// A free port on 127.0.0.1 (bound and released).
fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Serves `Metrics::new()` on a free port until the returned token is cancelled.
async fn serving() -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
    let addr = free_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move { serve(addr, std::sync::Arc::new(Metrics::new()), s).await });
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (addr, stop)
}

/// Reads until the server closes the connection; false if it is still open after `limit`.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Review finding (issue 18, 3): a connection that never sends a request held its slot (and a
/// descriptor) for ever. It is closed after the header-read timeout.
#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_read_timeout() {
    let (addr, stop) = serving().await;
    let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    assert!(
        closed_within(&mut idle, HEADER_READ_TIMEOUT + Duration::from_secs(5)).await,
        "a silent connection is still open after {HEADER_READ_TIMEOUT:?}"
    );
    stop.cancel();
}

/// Review finding (issue 18, 3): beyond the cap, a new connection closes the oldest, so idle
/// connections cannot lock out a scrape.
#[tokio::test]
async fn beyond_the_cap_a_new_connection_closes_the_oldest() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, stop) = serving().await;
    let mut oldest = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut others = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        others.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    assert!(
        closed_within(&mut oldest, Duration::from_secs(3)).await,
        "the oldest connection was not closed for the newest"
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out))
        .await
        .expect("answered at once")
        .expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    drop(others);
    stop.cancel();
}

/// Issue 21: the in-flight gauge was counted by hand in five places of upload and poll; it is
/// read from the limits' slots at scrape time, so it cannot drift from them.
#[test]
fn scans_in_flight_gauge_is_read_from_the_limits_slots() {
    let m = Metrics::new();
    let limits = Limits::new(
        NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN),
        NonZeroU32::MIN,
    );
    m.attach(limits.clone(), Path::new("/nonexistent/journal.sqlite"));
    assert!(m.render().contains("dropscan_scans_in_flight 0\n"));
    let a = limits.adopt();
    let b = limits.adopt();
    let text = m.render();
    assert!(text.contains("dropscan_scans_in_flight 2\n"), "{text}");
    drop(a);
    let text = m.render();
    assert!(text.contains("dropscan_scans_in_flight 1\n"), "{text}");
    drop(b);
    assert!(m.render().contains("dropscan_scans_in_flight 0\n"));
}

#[tokio::test]
async fn fleet_series_come_from_the_journal_and_stay_bounded() {
    use crate::error::FileError;
    use crate::journal::{Journal, NewClaim};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.sqlite");
    let j = Journal::open(&path).unwrap();
    let claim = |name: &str| NewClaim {
        root: "/srv/in".into(),
        rel_path: name.into(),
        staged: format!("/srv/in/.dropscan/{name}").into(),
        dropped_at_ms: None,
        staging_folder: None,
    };
    let ids = j.claim(vec![claim("a"), claim("b")]).await.unwrap();
    j.decide(vec![(ids[0], FileError::Vanished.decision(false))])
        .await
        .unwrap();
    let m = Metrics::new();
    m.attach(Limits::new(NonZeroUsize::MIN, NonZeroU32::MIN), &path);
    m.attach_tally(j.tally());
    m.set_watches([PathBuf::from("/srv/in"), PathBuf::from("/srv/idle")]);
    let text = m.render();
    for line in [
        // Claimed, decided and not placed yet: both still pending in their folder.
        "dropscan_pending_files{watch=\"/srv/in\"} 2",
        "dropscan_pending_files{watch=\"/srv/idle\"} 0",
        "dropscan_oldest_pending_age_seconds{watch=\"/srv/idle\"} 0",
        "dropscan_files_failed_total{reason=\"vanished\"} 1",
        "dropscan_files_failed_total{reason=\"too_large\"} 0",
        "dropscan_hook_deliveries_total{result=\"given_up\"} 0",
        "dropscan_journal_write_errors_total 0",
        "dropscan_server_refusing 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("dropscan_build_info{version=\"") && l.ends_with("} 1")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("process_start_time_seconds ")),
        "{text}"
    );
    // No file name in any label, whatever the journal holds.
    assert!(
        !text.contains("\"a\"") && !text.contains("/srv/in/a"),
        "{text}"
    );
}

#[test]
fn latency_buckets_have_round_bounds() {
    let m = Metrics::new();
    m.placed(Outcome::Clean, 12_000);
    let text = m.render();
    let bounds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("dropscan_drop_to_placed_seconds_bucket{le=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert_eq!(
        bounds,
        [
            "1.0", "5.0", "15.0", "30.0", "60.0", "120.0", "300.0", "600.0", "1800.0", "3600.0",
            "+Inf"
        ],
        "{text}"
    );
    assert!(
        text.contains("dropscan_drop_to_placed_seconds_bucket{le=\"15.0\"} 1"),
        "{text}"
    );
}

fn watch_config(path: &str) -> crate::config::WatchConfig {
    let p = PathBuf::from(path);
    crate::config::WatchConfig {
        recursive: true,
        settle: Duration::from_secs(1),
        settle_empty: Duration::from_secs(60),
        keep_original: Duration::from_secs(600),
        lease_check: crate::config::LeaseCheck::Auto,
        keep_originals: crate::config::KeepOriginals::Unleased,
        held_open_limit: Duration::from_secs(600),
        tidy_after: None,
        save_temp_settle: Duration::from_secs(3600),
        mode: crate::config::WatchMode::Auto,
        include: vec![crate::config::Pattern::new("*").unwrap()],
        exclude: vec![],
        clean_dir: p.join("clean"),
        quarantine_dir: p.join("quarantine"),
        failed_dir: p.join("failed"),
        staging_dir: p.join(".dropscan/default"),
        reconcile_interval: Duration::from_secs(60),
        poll_interval: Duration::from_secs(2),
        path: p,
    }
}

#[test]
fn each_watch_exports_its_settling_files_and_whether_it_is_degraded() {
    use crate::root::{Root, Roots};
    let m = Metrics::new();
    assert!(
        !m.render().contains("dropscan_inbox_settling_files{"),
        "no series before an agent attached its roots"
    );
    let roots = Roots::new(Root::all(&[watch_config("/srv/a"), watch_config("/srv/b")]));
    m.set_roots(&roots);
    roots.iter().next().unwrap().status.set_settling(3);
    roots.iter().nth(1).unwrap().status.set_degraded(true);
    let text = m.render();
    for line in [
        "dropscan_inbox_settling_files{watch=\"/srv/a\"} 3",
        "dropscan_inbox_settling_files{watch=\"/srv/b\"} 0",
        "dropscan_watch_degraded{watch=\"/srv/a\"} 0",
        "dropscan_watch_degraded{watch=\"/srv/b\"} 1",
        "# TYPE dropscan_inbox_settling_files gauge",
        "# TYPE dropscan_watch_degraded gauge",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }

    // A reload attaches the new generation's roots: the old ones are no longer read.
    let reloaded = Roots::new(Root::all(&[watch_config("/srv/a")]));
    m.set_roots(&reloaded);
    let text = m.render();
    assert!(
        text.lines()
            .any(|l| l == "dropscan_inbox_settling_files{watch=\"/srv/a\"} 0"),
        "{text}"
    );
    assert!(!text.contains("watch=\"/srv/b\""), "{text}");
}
