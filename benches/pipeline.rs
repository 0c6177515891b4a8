//! Figures, not assertions: how fast and how lean the agent is next to the scan.
//!
//! `cargo bench --bench pipeline` (optionally `-- --files N --big-mib M`) prints:
//! - the emulator's raw capacity: small submissions per second through the real client (so the
//!   agent figures below measure the agent, not the stand-in);
//! - the agent end to end: N small files dropped at once → placed, files per second, and the
//!   number of results requests it needed (one per tick for all scans in flight). The cap on
//!   scans in flight is set high here: with a real server, throughput is bounded by
//!   `max_in_flight / (poll_interval + scan time)`, which is the server's business, not ours;
//! - memory: the peak resident set before and after one M MiB file goes through the pipeline
//!   (streamed hashing and upload: the growth should not depend on M).
//!
//! Everything runs on 127.0.0.1 with real mutual TLS, real files and the real journal.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dropscan::app::Agent;
use dropscan::config::Config;
use dropscan::emulator::{
    CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, CertBundle, Emulator, EmulatorConfig,
    EmulatorHandle,
};
use dropscan::kata::{ClientOptions, KataClient, ScanId, TlsOptions};
use tokio_util::sync::CancellationToken;

const SENSOR: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn config_text(addr: &str, certs: &Path, settle: &str) -> String {
    let p = |n: &str| certs.join(n).display().to_string();
    format!(
        r#"[server]
url = "https://{addr}"
sensor_id = "{SENSOR}"
client_cert = "{}"
client_key = "{}"
ca_cert = "{}"
poll_interval = "200ms"
request_timeout = "120s"
max_in_flight = 4096
requests_per_second = 100000
[state]
dir = "state"
verdict_ttl = "0s"
[[watch]]
path = "inbox"
settle = "{settle}"
clean_dir = "clean"
quarantine_dir = "quarantine"
failed_dir = "failed"
[log]
level = "error"
"#,
        p(CLIENT_CERT_FILE),
        p(CLIENT_KEY_FILE),
        p(CA_CERT_FILE)
    )
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| rd.flatten().count())
}

async fn emulator_capacity(certs: &CertBundle, n: u64) {
    let emu = Emulator::start(EmulatorConfig::default(), certs)
        .await
        .unwrap();
    let tls = TlsOptions::from_pem(
        certs.client_cert_pem.as_bytes(),
        certs.client_key_pem.as_bytes(),
        Some(certs.ca_cert_pem.as_bytes()),
        None,
    )
    .unwrap();
    let client = KataClient::new(ClientOptions {
        base_url: emu.base_url().parse().unwrap(),
        sensor_id: SENSOR.into(),
        sensor_instance_id: None,
        tls,
        request_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        max_idle_per_host: 32,
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::write(&small, vec![b'x'; 1024]).unwrap();
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let permit = Arc::clone(&sem).acquire_owned().await.unwrap();
        let (c, p) = (client.clone(), small.clone());
        set.spawn(async move {
            let f = tokio::fs::File::open(&p).await.unwrap();
            c.submit(&ScanId::generate(), f, 1024).await.unwrap();
            drop(permit);
        });
    }
    while set.join_next().await.is_some() {}
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "emulator: {n} submissions of 1 KiB, 32 at a time: {secs:.2} s = {:.0} submissions/s",
        n as f64 / secs
    );
    emu.stop().await;
}

/// An emulator and a folder with an inbox and a config pointing at it.
async fn world(
    certs: &CertBundle,
    certs_dir: &Path,
    emu: EmulatorConfig,
    settle: &str,
) -> (EmulatorHandle, tempfile::TempDir, PathBuf, PathBuf) {
    let emu = Emulator::start(emu, certs).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let cfg = dir.path().join("dropscan.toml");
    let text = config_text(&emu.local_addr().to_string(), certs_dir, settle);
    std::fs::write(&cfg, text).unwrap();
    (emu, dir, inbox, cfg)
}

async fn agent_throughput(certs: &CertBundle, certs_dir: &Path, n: u64) {
    let (emu, dir, inbox, cfg) = world(
        certs,
        certs_dir,
        EmulatorConfig {
            scan_delay: Duration::from_millis(50),
            ..EmulatorConfig::default()
        },
        "200ms",
    )
    .await;
    for i in 0..n {
        let mut f = std::fs::File::create(inbox.join(format!("f{i:06}.bin"))).unwrap();
        f.write_all(format!("file number {i} ").repeat(64).as_bytes())
            .unwrap();
    }
    let agent = Agent::new(Config::load(&cfg).unwrap()).unwrap();
    let token = CancellationToken::new();
    let t0 = Instant::now();
    let task = tokio::spawn(agent.run(token.clone()));
    let clean = dir.path().join("clean");
    while (count_files(&clean) as u64) < n {
        assert!(t0.elapsed() < Duration::from_secs(600), "too slow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    token.cancel();
    task.await.unwrap().unwrap();
    let s = emu.state().stats();
    println!(
        "agent:    {n} files of ~1 KiB dropped at once → placed in {secs:.2} s = {:.0} files/s \
         (settle 200 ms, poll 200 ms); {} uploads, {} results requests, {} deletes",
        n as f64 / secs,
        s.submits_accepted,
        s.state_requests,
        s.deletes
    );
    emu.stop().await;
}

async fn big_file_memory(certs: &CertBundle, certs_dir: &Path, mib: u64) {
    let (emu, dir, inbox, cfg) = world(
        certs,
        certs_dir,
        EmulatorConfig {
            max_object_size: 0,
            ..EmulatorConfig::default()
        },
        "300ms",
    )
    .await;
    let before = peak_rss_kib();
    let path = inbox.join("big.img");
    {
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0x5Au8; 1 << 20];
        for _ in 0..mib {
            f.write_all(&chunk).unwrap();
        }
    }
    let agent = Agent::new(Config::load(&cfg).unwrap()).unwrap();
    let token = CancellationToken::new();
    let t0 = Instant::now();
    let task = tokio::spawn(agent.run(token.clone()));
    let clean = dir.path().join("clean");
    while count_files(&clean) < 1 {
        assert!(t0.elapsed() < Duration::from_secs(900), "too slow");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    token.cancel();
    task.await.unwrap().unwrap();
    let after = peak_rss_kib();
    println!(
        "memory:   one {mib} MiB file hashed, uploaded and placed in {secs:.2} s ({:.0} MiB/s); \
         peak RSS {} MiB before, {} MiB after (+{} MiB)",
        mib as f64 / secs,
        before / 1024,
        after / 1024,
        after.saturating_sub(before) / 1024
    );
    emu.stop().await;
}

/// Streaming SHA-256 alone, as claim does it: sha2 picks the CPU's SHA extensions at run time.
fn hash_speed(mib: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.bin");
    {
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xA5u8; 1 << 20];
        for _ in 0..mib {
            f.write_all(&chunk).unwrap();
        }
    }
    let t0 = Instant::now();
    let dir = dropscan::fsops::Dir::open_trusted(path.parent().unwrap()).unwrap();
    let (mut f, _) = dir.open_file(path.file_name().unwrap()).unwrap();
    let (_, n) = dropscan::fsops::sha256_file(&mut f).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    let sha_ni = std::arch::is_x86_feature_detected!("sha");
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    let sha_ni = false;
    println!(
        "hash:     {} MiB streamed through SHA-256 in {secs:.2} s = {:.0} MiB/s (CPU SHA extensions: {})",
        n >> 20,
        (n >> 20) as f64 / secs,
        if sha_ni { "yes" } else { "no" }
    );
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench`-less args: do a tiny pass then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let files = arg("--files", if quick { 50 } else { 2000 });
    let mib = arg("--big-mib", if quick { 8 } else { 512 });
    let submissions = arg("--submissions", if quick { 200 } else { 5000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    hash_speed(mib);
    rt.block_on(async {
        let certs_dir = tempfile::tempdir().unwrap();
        let certs = CertBundle::load_or_generate(certs_dir.path()).unwrap();
        emulator_capacity(&certs, submissions).await;
        agent_throughput(&certs, certs_dir.path(), files).await;
        big_file_memory(&certs, certs_dir.path(), mib).await;
    });
}
