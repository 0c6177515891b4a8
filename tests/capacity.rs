//! The in-flight cap learned from the server (issue 11): with the default config
//! (`max_in_flight = "auto"`), an emulator that takes only a few scans at once answers 429 past
//! them, the agent finds that limit, sorts every file, loses none, and leaves the learned
//! capacity and its limits snapshot in the journal for `dropscan status` and the next start.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use dropscan::app::Agent;
use dropscan::config::Config;
use dropscan::emulator::EmulatorConfig;
use dropscan::limits::LimitsSnapshot;
use tokio_util::sync::CancellationToken;

use crate::util::{Outcome, World, bytes};

/// The emulator's concurrency limit.
const SERVER_LIMIT: usize = 6;
const FILES: usize = 60;

/// The harness's config with the `[server]` limits left at their defaults.
fn default_limits_config(w: &World) -> Config {
    let path = w.write_config();
    let text = std::fs::read_to_string(&path).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("max_in_flight") && !l.starts_with("requests_per_second"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_config_finds_the_server_concurrency_and_loses_nothing() {
    let w = World::new(EmulatorConfig {
        max_scans: Some(SERVER_LIMIT),
        scan_delay: Duration::from_millis(200),
        ..EmulatorConfig::default()
    })
    .await;
    let config = default_limits_config(&w);
    assert_eq!(
        config.server.max_in_flight,
        dropscan::config::MaxInFlight::Auto
    );
    for i in 0..FILES {
        w.drop_file(&format!("f{i:03}.bin"), &bytes(i as u64, 2048));
    }
    let agent = Agent::new(config).unwrap();
    let token = CancellationToken::new();
    let t = token.clone();
    let task = tokio::spawn(async move { agent.run(t).await.map_err(|e| e.to_string()) });
    let placed = w.wait_placed(FILES, Duration::from_secs(90)).await;
    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("agent stops")
        .unwrap()
        .unwrap();

    assert_eq!(placed.len(), FILES, "every file sorted");
    assert!(placed.values().all(|o| *o == Outcome::Clean), "{placed:?}");
    assert!(w.inbox_files().is_empty());
    assert_eq!(w.staged_files(), 0, "nothing left in staging");

    let stats = w.emulator().state().stats();
    let refused = stats.submits_by_status.get(&429).copied().unwrap_or(0);
    assert!(
        refused > 0,
        "the agent probed past the server's limit: {stats:?}"
    );

    // The journal keeps what was learned: near the server's limit (the agent also counts scans
    // finished on the server and not yet polled, so a little above it).
    let snapshot = dropscan::journal::read_capacity_snapshot(&w.state_dir().join("journal.sqlite"))
        .unwrap()
        .expect("a limits snapshot saved at shutdown");
    let snap = LimitsSnapshot::from_json(&snapshot).unwrap();
    assert_eq!(snap.mode, "auto");
    assert!(snap.throttled > 0, "{snap:?}");
    assert!(
        (SERVER_LIMIT..=3 * SERVER_LIMIT).contains(&snap.learned),
        "learned {} for a server limit of {SERVER_LIMIT}: {snap:?}",
        snap.learned
    );
    assert!(
        snap.cap <= 3 * SERVER_LIMIT + 1,
        "the cap converged near the limit: {snap:?}"
    );
}

/// The harness's config with `max_in_flight` (and optionally the ceiling) written as `value`.
fn config_with(w: &World, lines: &str) -> Result<Config, String> {
    let path = w.write_config();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("max_in_flight = 16\n", &format!("{lines}\n"));
    std::fs::write(&path, text).unwrap();
    Config::load(&path).map_err(|e| e.to_string())
}

#[tokio::test]
async fn max_in_flight_takes_a_number_or_auto_and_errors_name_key_and_file() {
    use dropscan::config::MaxInFlight;
    let w = World::quick().await;
    let c = config_with(&w, "max_in_flight = \"auto\"\nmax_in_flight_ceiling = 50").unwrap();
    assert_eq!(c.server.max_in_flight, MaxInFlight::Auto);
    assert_eq!(c.server.max_in_flight_ceiling.get(), 50);
    let c = config_with(&w, "max_in_flight = 40").unwrap();
    assert_eq!(
        c.server.max_in_flight,
        MaxInFlight::Fixed(std::num::NonZeroUsize::new(40).unwrap())
    );
    assert_eq!(c.server.max_in_flight_ceiling.get(), 1000);
    for (bad, what) in [
        ("max_in_flight = \"lots\"", "server.max_in_flight"),
        ("max_in_flight = 0", "server.max_in_flight"),
        ("max_in_flight = true", "max_in_flight"),
        ("max_in_flight_ceiling = 0", "server.max_in_flight_ceiling"),
    ] {
        let err = config_with(&w, bad).unwrap_err();
        assert!(err.contains(what), "{bad}: {err}");
        assert!(err.contains("dropscan.toml"), "{bad}: {err}");
    }
}

/// Bug: the runtime's blocking pool is bounded (64 threads, `dropscan::runtime`), and each
/// inbox listing ran on it, waiting there for room in settle's channel. Settle drains that
/// channel between stats, which need a pool thread too. With more watches than pool threads,
/// each with a backlog at start-up, every thread waited for settle and settle for a thread: the
/// agent placed nothing, for ever. Expected: every file of every watch is placed.
#[test]
fn seventy_watches_with_a_backlog_each_start_on_the_bounded_runtime_and_place_everything() {
    const WATCHES: usize = 70;
    const EACH: usize = 60; // 4,200 in all: more than the listing channel holds (4,096)
    let setup = tokio::runtime::Runtime::new().unwrap();
    let mut w = setup.block_on(World::quick());
    for i in 0..WATCHES {
        w.more_watches.push_str(&format!(
            "\n[[watch]]\npath = \"in{i}\"\nmode = \"poll\"\npoll_interval = \"1s\"\n\
             settle = \"200ms\"\nsettle_empty = \"1s\"\nclean_dir = \"out{i}/clean\"\n\
             quarantine_dir = \"out{i}/quarantine\"\nfailed_dir = \"out{i}/failed\"\n"
        ));
        let inbox = w.dir.path().join(format!("in{i}"));
        std::fs::create_dir_all(&inbox).unwrap();
        for j in 0..EACH {
            std::fs::write(
                inbox.join(format!("f{j}.txt")),
                format!("watch {i} file {j}"),
            )
            .unwrap();
        }
    }
    w.write_config();
    let config = Config::load(&w.write_config()).unwrap();
    let agent = Agent::new(config).unwrap();
    let token = CancellationToken::new();
    let runner = std::thread::spawn({
        let token = token.clone();
        move || {
            let rt = dropscan::runtime::build().unwrap();
            rt.block_on(agent.run(token)).map_err(|e| e.to_string())
        }
    });
    let placed = |w: &World| -> usize {
        (0..WATCHES)
            .map(|i| World::files_in(&w.dir.path().join(format!("out{i}/clean"))).len())
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while placed(&w) < WATCHES * EACH
        && std::time::Instant::now() < deadline
        && !runner.is_finished()
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let n = placed(&w);
    token.cancel();
    let ended = runner.join().unwrap();
    assert_eq!(
        n,
        WATCHES * EACH,
        "files placed of {} (agent: {ended:?})",
        WATCHES * EACH
    );
    assert!(ended.is_ok(), "{ended:?}");
    drop(setup);
}
