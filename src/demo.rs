//! `dropscan demo`: the whole product on one machine, in one command.
//!
//! Starts the built-in emulator on 127.0.0.1 with certificates generated into the demo folder,
//! creates `inbox/`, `clean/`, `quarantine/` and `failed/` there, writes a real config file
//! (`dropscan.toml`) pointing at the emulator, and runs the agent on it with a short poll
//! interval. Two sample files are dropped at each start (unless still in the inbox) so that
//! something happens at once, and `--exit-after 2` ends on every run, not only the first.
//! Every placed file is printed as it happens. Ctrl-C stops it cleanly.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::app::Agent;
use crate::config::Config;
use crate::emulator::{
    CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, CertBundle, Emulator, EmulatorConfig,
};
use crate::journal::Outcome;
use crate::pipeline::Placement;

/// The EICAR anti-virus test string: harmless, detected by every scanner (and by the emulator).
pub(crate) const EICAR: &str =
    r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// Runs the demo in `dir` until Ctrl-C, or until `exit_after` files were placed (if not zero).
pub(crate) async fn run(
    dir: &Path,
    poll_interval: Duration,
    settle: Duration,
    exit_after: u64,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir =
        std::fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let certs_dir = dir.join("certs");
    let certs = CertBundle::load_or_generate(&certs_dir)
        .with_context(|| format!("cannot prepare certificates in {}", certs_dir.display()))?;
    let emulator = Emulator::start(
        EmulatorConfig {
            scan_delay: Duration::from_millis(500),
            max_scans: Some(50),
            ..EmulatorConfig::default()
        },
        &certs,
    )
    .await
    .context("cannot start the built-in KATA emulator")?;
    let inbox = dir.join("inbox");
    // Only the inbox: the agent creates the destinations itself, quarantine owner-only.
    std::fs::create_dir_all(&inbox)?;
    let config_path = dir.join("dropscan.toml");
    std::fs::write(
        &config_path,
        demo_config(&emulator.base_url(), &certs_dir, poll_interval, settle),
    )
    .with_context(|| format!("cannot write {}", config_path.display()))?;
    let config = Config::load(&config_path)?;
    let agent = Agent::new(config)?;
    let events = agent.subscribe();
    let shutdown = crate::signal::shutdown_token()?;

    print_banner(&dir, &inbox, &config_path, &emulator.base_url());
    drop_samples(&inbox)?;
    let printer = tokio::spawn(print_placements(events, exit_after, shutdown.clone()));
    let result = agent.run(shutdown).await;
    printer.abort();
    emulator.stop().await;
    result?;
    println!("demo stopped.");
    Ok(())
}

/// `p` relative to the current folder where it lies beneath it, for shorter lines.
fn shown(p: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| p.to_path_buf())
        .display()
        .to_string()
}

fn print_banner(dir: &Path, inbox: &Path, config_path: &Path, base_url: &str) {
    println!("dropscan demo: the built-in KATA emulator listens on {base_url} (mutual TLS)");
    println!("  config:  {}", shown(config_path));
    println!("  drop files into {}/", shown(inbox));
    let dir = shown(dir);
    println!("  results: {dir}/clean  {dir}/quarantine  {dir}/failed");
    println!("  make a harmless EICAR test file to see quarantine work:");
    println!("    printf '%s' '{EICAR}' > {}/eicar.com", shown(inbox));
    println!("  Ctrl-C stops it.");
}

/// At every start: a second run with `--exit-after 2` must have something to place too. A
/// sample still in the inbox (from a run stopped early) is left as it is.
fn drop_samples(inbox: &Path) -> anyhow::Result<()> {
    let samples: [(&str, &[u8]); 2] = [
        ("hello.txt", b"Hello from dropscan: this file is clean.\n"),
        ("eicar-sample.com", EICAR.as_bytes()),
    ];
    for (name, bytes) in samples {
        let p = inbox.join(name);
        if std::fs::symlink_metadata(&p).is_err() {
            std::fs::write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))?;
        }
    }
    println!("  (dropped two samples: hello.txt and eicar-sample.com)");
    println!();
    Ok(())
}

/// Prints each placed file; after `exit_after` of them (if not zero) stops the demo.
async fn print_placements(
    mut events: broadcast::Receiver<Placement>,
    exit_after: u64,
    shutdown: CancellationToken,
) {
    let mut placed = 0u64;
    loop {
        match events.recv().await {
            Ok(p) => {
                placed += 1;
                let reason = p.reason.map(|r| format!("  ({r})")).unwrap_or_default();
                println!(
                    "{}  {}  →  {}{reason}",
                    outcome_label(p.outcome),
                    p.rel_path.display(),
                    p.dest.display()
                );
                if exit_after > 0 && placed >= exit_after {
                    shutdown.cancel();
                    break;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => println!("({n} events not shown)"),
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// The outcome column, padded to one width; quarantine shouts.
fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Clean => "clean     ",
        Outcome::Quarantine => "QUARANTINE",
        Outcome::Failed => "failed    ",
        Outcome::Vanished => "vanished  ",
    }
}

fn demo_config(url: &str, certs: &Path, poll_interval: Duration, settle: Duration) -> String {
    let sensor_id = uuid::Uuid::new_v4();
    let p = |name: &str| toml_str(&certs.join(name));
    format!(
        r#"# Written by `dropscan demo` at each start: the emulator's port changes every time.
[server]
url = "{url}"
sensor_id = "{sensor_id}"
sensor_instance_id = "demo"
client_cert = {cert}
client_key = {key}
ca_cert = {ca}
poll_interval = "{poll}"
request_timeout = "10s"
max_in_flight = 16
requests_per_second = 200
scan_timeout = "2m"

[state]
dir = "state"
verdict_ttl = "1h"
shutdown_grace = "3s"

[[watch]]
path = "inbox"
settle = "{settle}"
mode = "auto"
reconcile_interval = "30s"
clean_dir = "clean"
quarantine_dir = "quarantine"
failed_dir = "failed"

[log]
format = "text"
level = "warn"
"#,
        cert = p(CLIENT_CERT_FILE),
        key = p(CLIENT_KEY_FILE),
        ca = p(CA_CERT_FILE),
        poll = humantime::format_duration(poll_interval),
        settle = humantime::format_duration(settle),
    )
}

/// A path as a TOML basic string.
fn toml_str(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}
