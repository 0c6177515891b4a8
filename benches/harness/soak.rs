//! The soak scenario (issue 20): an hour (divided by the time scale) of steady drops against an
//! emulator with faults, a SIGHUP to the agent every minute (scaled), a restart (SIGTERM, start
//! again) halfway. Every few seconds it samples the agent's resident set, threads, open
//! descriptors and the journal's size, and prints the least-squares slope of each over the warm
//! part of each agent life, per soak hour. At the end every dropped file must sit in clean,
//! quarantine or failed exactly once, with its size.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

use crate::data::{self, Layout, Rng};
use crate::procs::{self, Requests};
use crate::scenarios::{AGENT_DEFAULT_RPS, AgentConfig, certs};
use crate::{Options, Outcome};

/// Files dropped per second of real time, whatever the time scale.
const RATE: f64 = 10.0;

/// One reading of the agent process.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Seconds since the soak began.
    t: f64,
    rss_kib: u64,
    threads: u64,
    fds: u64,
    journal_bytes: u64,
}

/// One agent process from its start to its SIGTERM.
struct Life {
    child: Child,
    started: f64,
    samples: Vec<Sample>,
    /// Thread names and counts, first sample after warm-up and last sample.
    threads_warm: Option<BTreeMap<String, usize>>,
    threads_last: BTreeMap<String, usize>,
    cpu: Duration,
}

fn start_agent(bin: &Path, config: &Path, log: &Path, started: f64) -> Result<Life, String> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {} run: {e}", bin.display()))?;
    Ok(Life {
        child,
        started,
        samples: Vec::new(),
        threads_warm: None,
        threads_last: BTreeMap::new(),
        cpu: Duration::ZERO,
    })
}

/// SIGTERM, then wait (60 s at most, then SIGKILL). Reads the CPU first.
fn stop_agent(life: &mut Life) -> Result<(), String> {
    let pid = life.child.id();
    life.cpu = procs::proc_cpu(pid).unwrap_or_default();
    kill_process(Pid::from_child(&life.child), Signal::TERM).ok();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match life.child.try_wait() {
            Ok(Some(_)) => return Ok(()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                life.child.kill().ok();
                life.child.wait().ok();
                return Err(format!("agent {pid} did not stop within 60 s of SIGTERM"));
            }
        }
    }
}

fn status_field(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn thread_names(pid: u32) -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
                *names.entry(comm.trim().to_owned()).or_insert(0) += 1;
            }
        }
    }
    names
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn sample(pid: u32, t: f64, state: &Path) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Sample {
        t,
        rss_kib: status_field(&status, "VmRSS:")?,
        threads: status_field(&status, "Threads:")?,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64,
        journal_bytes: dir_bytes(state),
    })
}

/// Least-squares slope of `y` over `t`, per second; `None` with fewer than 3 points.
pub(crate) fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let (mt, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (t, y)| (a + t / n, b + y / n));
    let (mut num, mut den) = (0.0, 0.0);
    for (t, y) in points {
        num += (t - mt) * (y - my);
        den += (t - mt) * (t - mt);
    }
    (den > 0.0).then(|| num / den)
}

/// Every name and size dropped, checked against what sits in the three folders: a line per
/// problem (missing, placed twice, unknown, wrong size), and the counts per folder.
fn check_placed(root: &Path, dropped: &HashMap<String, u64>) -> (Vec<String>, [usize; 3]) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut problems = Vec::new();
    let mut counts = [0; 3];
    for (i, dir) in ["clean", "quarantine", "failed"].iter().enumerate() {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() {
                    stack.push(e.path());
                    continue;
                }
                if name.starts_with('.') || name.ends_with(".dropscan.json") {
                    continue;
                }
                counts[i] += 1;
                *seen.entry(name.clone()).or_insert(0) += 1;
                match dropped.get(&name) {
                    None => problems.push(format!("{dir}/{name}: never dropped")),
                    Some(&size) if size != m.len() => {
                        problems.push(format!("{dir}/{name}: {} bytes, dropped {size}", m.len()))
                    }
                    Some(_) => {}
                }
            }
        }
    }
    for name in dropped.keys() {
        match seen.get(name) {
            None => problems.push(format!("{name}: not placed")),
            Some(1) => {}
            Some(n) => problems.push(format!("{name}: placed {n} times")),
        }
    }
    problems.sort();
    (problems, counts)
}

fn fmt_threads(names: &BTreeMap<String, usize>) -> String {
    names
        .iter()
        .map(|(n, c)| format!("{n}×{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the soak.
pub(crate) fn soak(o: &Options, layout: &Layout) -> Result<Outcome, String> {
    let k = o.time_scale.unwrap_or(if o.tiny { 120.0 } else { 1.0 });
    let span = 3600.0 / k;
    let reload_every = 60.0 / k;
    let restart_at = span / 2.0;
    let sample_every = (span / 200.0).clamp(0.25, 5.0);
    let warm = 0.25;
    let history = (600.0 / k).max(60.0);
    let ms = |s: f64| format!("{}ms", (s * 1000.0).round().max(1.0) as u64);

    // The emulator's scan slots: enough for twice the drop rate (a soak is steady, not a
    // backlog growing for an hour): 50 from time scale 3 up, more below (150 at 1, where 50
    // slots would take only 6.7 of the 10 files dropped each second).
    let max_scans = ((2.0 * RATE * (5.0 + 2.5) / k).ceil() as u64).max(50);
    let flags: Vec<String> = ["--max-scans".to_owned(), max_scans.to_string()]
        .into_iter()
        .chain(
            [
                "--fail-500",
                "0.02",
                "--throttle-429",
                "0.005",
                "--drop",
                "0.01",
                "--slow",
                "0.01",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        )
        .chain([
            "--scan-delay".to_owned(),
            format!("{}..{}", ms(2.0 / k), ms(8.0 / k)),
            "--slow-delay".to_owned(),
            ms(5.0 / k),
        ])
        .collect();
    let sink = procs::start_sink(
        &o.binary,
        &certs(o),
        &layout.root.join("emulator-agent.log"),
        &flags,
    )?;
    let mut config = AgentConfig {
        url: sink.url.clone(),
        server: vec![
            format!("poll_interval = \"{}\"", ms((5.0 / k).max(0.05))),
            format!("requests_per_second = {}", (AGENT_DEFAULT_RPS * k).round()),
        ],
        watch: vec![
            format!("settle = \"{}\"", ms((5.0 / k).max(0.05))),
            format!("poll_interval = \"{}\"", ms((2.0 / k).max(0.05))),
        ],
        // Finished records and verdicts kept 10 soak minutes (at least the 1 minute
        // `state.history` accepts), so that the journal's size levels off within the soak as it
        // does after `history` (7 days by default) in a real deployment.
        state: vec![
            format!("history = \"{}\"", ms(history)),
            format!("verdict_ttl = \"{}\"", ms(history)),
        ],
    };
    config.server.push("request_timeout = \"30s\"".into());
    let path = config.write(layout, &certs(o))?;
    let log = layout.root.join("agent.log");
    let state = layout.root.join("state");

    let mut rng = Rng::new(6);
    let mut dropped: HashMap<String, u64> = HashMap::new();
    let mut lives = vec![start_agent(&o.binary, &path, &log, 0.0)?];
    let t0 = Instant::now();
    let (mut next_drop, mut next_sample, mut next_reload) = (0.0, 0.0, reload_every);
    let (mut reloads, mut restarted) = (0u32, false);
    let mut result = Ok(());
    loop {
        let t = t0.elapsed().as_secs_f64();
        if t >= span {
            break;
        }
        while next_drop <= t {
            let name = format!("s{:06}.bin", dropped.len());
            let size = 1024 + rng.next_u64() % (15 * 1024);
            if let Err(e) = data::write_file(&layout.inbox.join(&name), size, &mut rng) {
                result = Err(format!("dropping {name}: {e}"));
                break;
            }
            dropped.insert(name, size);
            next_drop += 1.0 / RATE;
        }
        let life = lives.last_mut().ok_or("no agent")?;
        if let Ok(Some(status)) = life.child.try_wait() {
            result = Err(format!(
                "the agent exited with {status}; see {}",
                log.display()
            ));
            break;
        }
        let pid = life.child.id();
        if next_sample <= t {
            if let Some(s) = sample(pid, t, &state) {
                life.samples.push(s);
            }
            life.threads_last = thread_names(pid);
            if life.threads_warm.is_none() && t - life.started >= warm * (span / 2.0) {
                life.threads_warm = Some(life.threads_last.clone());
            }
            next_sample += sample_every;
        }
        if next_reload <= t {
            kill_process(Pid::from_child(&life.child), Signal::HUP).ok();
            reloads += 1;
            next_reload += reload_every;
        }
        if !restarted && t >= restart_at {
            restarted = true;
            stop_agent(life)?;
            lives.push(start_agent(&o.binary, &path, &log, t)?);
        }
        let next = next_drop.min(next_sample).min(next_reload);
        let wait = (next - t0.elapsed().as_secs_f64()).clamp(0.0, 0.05);
        std::thread::sleep(Duration::from_secs_f64(wait));
    }
    // Let the last files through (the faults add retries), bounded.
    let drain_started = Instant::now();
    let drain_deadline = drain_started + Duration::from_secs(300);
    let mut placed;
    loop {
        placed = data::placed(&layout.root);
        if placed.iter().sum::<usize>() >= dropped.len() || Instant::now() > drain_deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let wall = t0.elapsed();
    let drained = drain_started.elapsed();
    let last = lives.last_mut().ok_or("no agent")?;
    let peak_rss_kib = procs::proc_hwm_kib(last.child.id()).unwrap_or(0);
    stop_agent(last)?;
    let requests: Requests = sink.stop();
    result?;

    let (problems, counts) = check_placed(&layout.root, &dropped);
    let mut notes = vec![format!(
        "time scale {k}: {span:.0} s of drops at {RATE} files/s, {reloads} SIGHUPs (every {reload_every:.1} s), a restart at {restart_at:.0} s, samples every {sample_every:.2} s; state.history and verdict_ttl {history:.0} s; emulator {}",
        flags.join(" ")
    )];
    notes.push(format!(
        "server ceiling about {max_scans} / (mean scan + poll/2) = {:.1} files/s against {RATE} dropped; the last file placed {:.1} s after the last drop",
        max_scans as f64 / (5.0 / k + 2.5 / k),
        drained.as_secs_f64()
    ));
    if problems.is_empty() {
        notes.push(format!(
            "placement: all {} dropped files placed exactly once with their sizes (clean {}, quarantine {}, failed {})",
            dropped.len(),
            counts[0],
            counts[1],
            counts[2]
        ));
    } else {
        notes.push(format!(
            "PLACEMENT PROBLEMS: {} (first: {})",
            problems.len(),
            problems
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let per_hour = 3600.0 / k;
    for (i, life) in lives.iter().enumerate() {
        let end = life.samples.last().map_or(life.started, |s| s.t);
        let from = life.started + warm * (end - life.started);
        let warm_samples: Vec<&Sample> = life.samples.iter().filter(|s| s.t >= from).collect();
        let series = |f: &dyn Fn(&Sample) -> f64| -> String {
            let points: Vec<(f64, f64)> = warm_samples.iter().map(|s| (s.t, f(s))).collect();
            let (first, lastv) = (
                points.first().map_or(0.0, |p| p.1),
                points.last().map_or(0.0, |p| p.1),
            );
            match slope(&points) {
                Some(m) => format!(
                    "{first:.1} → {lastv:.1}, slope {:+.2}/soak-hour",
                    m * per_hour
                ),
                None => "too few samples".into(),
            }
        };
        notes.push(format!(
            "life {} ({:.0}–{:.0} s, warm from {:.0} s, {} samples): RSS MiB {}; threads {}; fds {}; journal MiB {}",
            i + 1,
            life.started,
            end,
            from,
            warm_samples.len(),
            series(&|s| s.rss_kib as f64 / 1024.0),
            series(&|s| s.threads as f64),
            series(&|s| s.fds as f64),
            series(&|s| s.journal_bytes as f64 / (1024.0 * 1024.0)),
        ));
        if let Some(w) = &life.threads_warm
            && *w != life.threads_last
        {
            notes.push(format!(
                "life {} threads when warm: {}; at the end: {}",
                i + 1,
                fmt_threads(w),
                fmt_threads(&life.threads_last)
            ));
        }
    }
    let cpu: Duration = lives.iter().map(|l| l.cpu).sum();
    let files = dropped.len();
    let bytes = dropped.values().sum();
    Ok(Outcome {
        name: "soak",
        what: format!(
            "{files} files of 1–16 KiB dropped at {RATE}/s, emulator faults, SIGHUP every minute, a restart halfway (time scale {k})"
        ),
        files,
        bytes,
        agent: procs::AgentFigures {
            wall,
            cpu,
            peak_rss_kib,
            started_unix_ms: 0,
            placed,
            timed_out: placed.iter().sum::<usize>() < files,
        },
        requests,
        baselines: Vec::new(),
        notes,
    })
}
