//! The scenarios of issue 9 (`small`, `big`, `many`, `mixed`) and issue 11 (`realistic`), the
//! agent configuration they use, and the baselines run next to them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::data::{self, Layout, Rng};
use crate::floor::{self, Floor};
use crate::procs::{self, Requests, Sink};
use crate::{Baseline, Options, Outcome, human};

/// The sink of the throughput scenarios: verdicts at once, no concurrency or size limit.
const ZERO_DELAY: [&str; 6] = [
    "--scan-delay",
    "0s",
    "--max-scans",
    "0",
    "--max-object-size",
    "0",
];

/// `requests_per_second` when the config leaves it out (config/mod.rs); `realistic` multiplies
/// it by the time scale so that the rate limit keeps its real-time weight.
pub(crate) const AGENT_DEFAULT_RPS: f64 = dropscan::config::DEFAULT_REQUESTS_PER_SECOND as f64;

const MIB: u64 = 1 << 20;

/// The agent's config: the keys a scenario sets, the rest left to the defaults.
pub(crate) struct AgentConfig {
    pub url: String,
    /// `[server]` keys beyond url, sensor and certificates, as `key = value` lines.
    pub server: Vec<String>,
    /// `[[watch]]` keys beyond the folders.
    pub watch: Vec<String>,
    /// `[state]` keys beyond its folder.
    pub state: Vec<String>,
}

impl AgentConfig {
    /// Issue 9's settings: settle and poll 200 ms, 2000 scans in flight, no rate limit to speak
    /// of (the default of 10 requests/s would measure the limiter, not the agent).
    fn throughput(url: &str) -> Self {
        AgentConfig {
            url: url.to_owned(),
            server: vec![
                "poll_interval = \"200ms\"".into(),
                "max_in_flight = 2000".into(),
                "requests_per_second = 100000".into(),
                "request_timeout = \"600s\"".into(),
            ],
            watch: vec!["settle = \"200ms\"".into()],
            state: Vec::new(),
        }
    }

    pub(crate) fn write(&self, layout: &Layout, certs: &Path) -> Result<PathBuf, String> {
        let [cert, key, ca] = procs::cert_paths(certs);
        let mut rng = Rng::new(procs::unix_ms());
        let (a, b, c) = (rng.next_u64(), rng.next_u64(), rng.next_u64());
        let sensor = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            a & 0xffff,
            b & 0xfff,
            (b >> 16) & 0xfff,
            c & 0xffff_ffff_ffff
        );
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let root = &layout.root;
        let mut text = format!(
            "[server]\nurl = {:?}\nsensor_id = \"{sensor}\"\nclient_cert = {}\nclient_key = {}\nca_cert = {}\n",
            self.url,
            q(&cert),
            q(&key),
            q(&ca)
        );
        for line in &self.server {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(&format!("[state]\ndir = {}\n", q(&root.join("state"))));
        for line in &self.state {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(&format!(
            "[[watch]]\npath = {}\nclean_dir = {}\nquarantine_dir = {}\nfailed_dir = {}\n",
            q(&layout.inbox),
            q(&root.join("clean")),
            q(&root.join("quarantine")),
            q(&root.join("failed")),
        ));
        for line in &self.watch {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("[log]\nlevel = \"info\"\n");
        let path = root.join("dropscan.toml");
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    }
}

/// Runs one scenario by name.
pub(crate) fn run(name: &str, o: &Options) -> Result<Outcome, String> {
    let root = o.work.join(name);
    let layout = Layout::create(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let outcome = match name {
        "small" => small(o, &layout),
        "big" => big(o, &layout),
        "many" => many(o, &layout),
        "mixed" => mixed(o, &layout),
        "realistic" => realistic(o, &layout),
        "soak" => crate::soak::soak(o, &layout),
        other => Err(format!("unknown scenario {other}")),
    };
    if !o.keep {
        // Gigabytes otherwise stay behind; failing to clean up is not worth failing the run.
        std::fs::remove_dir_all(&root).ok();
    }
    outcome
}

pub(crate) fn certs(o: &Options) -> PathBuf {
    o.work.join("certs")
}

fn zero_delay_sink(o: &Options, layout: &Layout, label: &str) -> Result<Sink, String> {
    let flags: Vec<String> = ZERO_DELAY.iter().map(|s| (*s).to_owned()).collect();
    let log = layout.root.join(format!("emulator-{label}.log"));
    procs::start_sink(&o.binary, &certs(o), &log, &flags)
}

/// Starts the agent on `layout` with `config` against `sink`, waits for `files`, stops both.
fn measure(
    o: &Options,
    layout: &Layout,
    sink: Sink,
    config: &AgentConfig,
    files: usize,
    limit: Duration,
) -> Result<(procs::AgentFigures, Requests), String> {
    let path = config.write(layout, &certs(o))?;
    let log = layout.root.join("agent.log");
    let agent = procs::run_agent(&o.binary, &path, &log, &layout.root, files, limit);
    let requests = sink.stop();
    let agent = agent?;
    if o.keep {
        println!("   (agent log: {})", log.display());
    }
    Ok((agent, requests))
}

fn small(o: &Options, layout: &Layout) -> Result<Outcome, String> {
    let files = if o.tiny { 200 } else { 5000 };
    let bytes = data::write_many(&layout.inbox, files, 4096, 1).map_err(|e| e.to_string())?;
    let python = python_baseline(o, layout, files);
    let floors = [true, false].map(|copy| floor_baseline(layout, files, copy));
    let sink = zero_delay_sink(o, layout, "agent")?;
    let config = AgentConfig::throughput(&sink.url);
    let (agent, requests) = measure(o, layout, sink, &config, files, Duration::from_secs(900))?;
    let mut outcome = Outcome {
        name: "small",
        what: format!("{files} files of 4 KiB, present at start → clean"),
        files,
        bytes,
        agent,
        requests,
        baselines: Vec::new(),
        notes: Vec::new(),
    };
    outcome.baselines.push(match python {
        Ok((secs, cpu)) => {
            let rate = files as f64 / secs;
            let cpu_per_file = Duration::from_secs_f64(cpu / files as f64);
            Baseline {
                name: "python keep-alive POST loop".into(),
                figures: format!(
                    "{secs:.2} s, {rate:.0} files/s, {} CPU/file",
                    human(cpu_per_file)
                ),
                ratio: format!(
                    "→ agent at {:.2}x its rate, {:.1}x its CPU per file",
                    outcome.files as f64 / outcome.agent.wall.as_secs_f64() / rate,
                    outcome.agent.cpu.as_secs_f64() / cpu.max(1e-9)
                ),
            }
        }
        Err(why) => skipped("python keep-alive POST loop", &why),
    });
    let agent_cpu = outcome.cpu_per_file_s();
    for (floor, copy) in floors.iter().zip([true, false]) {
        let name = if copy {
            "durable floor (with the private copy)"
        } else {
            "durable floor (without the private copy)"
        };
        outcome.baselines.push(match floor {
            Ok(f) => Baseline {
                name: name.into(),
                figures: format!(
                    "{:.2} s, {} files/s, {} CPU/file",
                    f.wall.as_secs_f64(),
                    crate::rate(f.files_per_s()),
                    human(f.cpu_per_file())
                ),
                ratio: format!(
                    "→ agent CPU per file {:.1}x the floor's{}",
                    agent_cpu / f.cpu_per_file().as_secs_f64().max(1e-9),
                    if copy { " (target ≤ 3x)" } else { "" }
                ),
            },
            Err(why) => skipped(name, why),
        });
    }
    outcome.notes.push(format!(
        "targets (issue 20): agent CPU/file ≤ 3x the floor with the copy; rate ≥ 0.6x the Python loop; ≤ 2.1 HTTP requests/file (here {:.2})",
        outcome.requests.total as f64 / files.max(1) as f64
    ));
    Ok(outcome)
}

/// The durable floor (`floor.rs`) on a fresh copy of the same files (same seed), with or
/// without the private copy, in a folder of its own beside the scenario's.
fn floor_baseline(layout: &Layout, files: usize, copy: bool) -> Result<Floor, String> {
    let work = layout
        .root
        .join(if copy { "floor-copy" } else { "floor-nocopy" });
    let inbox = work.join("inbox");
    std::fs::create_dir_all(&inbox).map_err(|e| format!("{}: {e}", inbox.display()))?;
    data::write_many(&inbox, files, 4096, 1).map_err(|e| e.to_string())?;
    let floor = floor::run(&inbox, &work, copy);
    // Its files would otherwise sit beside the agent's for the rest of the scenario.
    std::fs::remove_dir_all(&work).ok();
    floor
}

fn skipped(name: &str, why: &str) -> Baseline {
    Baseline {
        name: name.into(),
        figures: format!("skipped: {why}"),
        ratio: String::new(),
    }
}

/// `(seconds, cpu_seconds)` of `baseline_post.py` over the inbox, on its own sink.
fn python_baseline(o: &Options, layout: &Layout, files: usize) -> Result<(f64, f64), String> {
    if !procs::have_tool("python3", "--version") {
        return Err("python3 not found".into());
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/baseline_post.py");
    let sink = zero_delay_sink(o, layout, "python")?;
    let [cert, key, ca] = procs::cert_paths(&certs(o));
    let run = procs::time_command(
        Command::new("python3")
            .arg(script)
            .arg(&sink.url)
            .arg("7c9e6679-7425-40de-944b-e07fc1f90ae7")
            .args([&cert, &key, &ca])
            .arg(&layout.inbox),
    );
    let requests = sink.stop();
    let (_, out) = run?;
    let field = |name: &str| {
        out.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or(format!("no {name} in {out:?}"))
    };
    let sent = field("files=")? as usize;
    if sent != files || requests.post != files as u64 {
        return Err(format!(
            "posted {sent} files ({} POSTs seen) of {files}",
            requests.post
        ));
    }
    Ok((field("seconds=")?, field("cpu_seconds=")?))
}

fn big(o: &Options, layout: &Layout) -> Result<Outcome, String> {
    let size = if o.tiny { 32 * MIB } else { 1024 * MIB };
    let file = layout.inbox.join("big.bin");
    data::write_file(&file, size, &mut Rng::new(2)).map_err(|e| e.to_string())?;
    let curl = curl_baseline(o, layout, &file);
    let sha = if procs::have_tool("openssl", "version") {
        procs::time_command(Command::new("openssl").args(["dgst", "-sha256"]).arg(&file))
            .map(|(wall, _)| wall.as_secs_f64())
    } else {
        Err("openssl not found".into())
    };
    let sink = zero_delay_sink(o, layout, "agent")?;
    let config = AgentConfig::throughput(&sink.url);
    let (agent, requests) = measure(o, layout, sink, &config, 1, Duration::from_secs(900))?;
    let secs = agent.wall.as_secs_f64();
    let mut baselines = Vec::new();
    for (name, result) in [
        ("curl --http1.1 -F content=@file", &curl),
        ("openssl dgst -sha256", &sha),
    ] {
        baselines.push(match result {
            Ok(t) => Baseline {
                name: name.into(),
                figures: format!("{t:.2} s, {:.0} MB/s", size as f64 / 1e6 / t),
                ratio: format!("→ agent takes {:.2}x its time", secs / t),
            },
            Err(why) => skipped(name, why),
        });
    }
    let mut notes = Vec::new();
    let limit = [&curl, &sha]
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .fold(0.0f64, |a, &b| a.max(b));
    if limit > 0.0 {
        notes.push(format!(
            "transport limit max(curl, sha256) = {limit:.2} s: agent at {:.0}% of it ({:.2}x; target ≤ 1.3x, issue 20)",
            100.0 * limit / secs,
            secs / limit
        ));
    }
    Ok(Outcome {
        name: "big",
        what: format!("one {} MiB file → clean", size / MIB),
        files: 1,
        bytes: size,
        agent,
        requests,
        baselines,
        notes,
    })
}

/// Wall seconds of one `curl --http1.1 -F` upload of `file`, on its own sink.
fn curl_baseline(o: &Options, layout: &Layout, file: &Path) -> Result<f64, String> {
    if !procs::have_tool("curl", "--version") {
        return Err("curl not found".into());
    }
    let sink = zero_delay_sink(o, layout, "curl")?;
    let [cert, key, ca] = procs::cert_paths(&certs(o));
    let url = format!(
        "{}/kata/scanner/v1/sensors/7c9e6679-7425-40de-944b-e07fc1f90ae7/scans?sensorInstanceId=baseline-curl",
        sink.url
    );
    let run = procs::time_command(
        Command::new("curl")
            .args(["--http1.1", "-sS", "--fail", "-o", "/dev/null", "--cert"])
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--cacert")
            .arg(&ca)
            .args([
                "-F",
                "scanId=0123456789abcdef0123456789abcdef",
                "-F",
                "objectType=file",
            ])
            .arg("-F")
            .arg(format!("content=@{}", file.display()))
            .arg(url),
    );
    let requests = sink.stop();
    let (wall, _) = run?;
    if requests.post != 1 {
        return Err(format!("the emulator saw {} POSTs, not 1", requests.post));
    }
    Ok(wall.as_secs_f64())
}

fn many(o: &Options, layout: &Layout) -> Result<Outcome, String> {
    let files = if o.tiny { 2000 } else { 100_000 };
    let bytes = data::write_many(&layout.inbox, files, 1024, 3).map_err(|e| e.to_string())?;
    let sink = zero_delay_sink(o, layout, "agent")?;
    let config = AgentConfig::throughput(&sink.url);
    let (agent, requests) = measure(o, layout, sink, &config, files, Duration::from_secs(3600))?;
    let first = requests
        .first_post_unix_ms
        .map(|ms| {
            format!(
                "{:.2} s",
                ms.saturating_sub(agent.started_unix_ms) as f64 / 1000.0
            )
        })
        .unwrap_or_else(|| "never".into());
    Ok(Outcome {
        name: "many",
        what: format!("{files} files of 1 KiB, present at start → clean"),
        files,
        bytes,
        notes: vec![format!(
            "first upload {first} after the agent started (target ≤ 1 s, issue 20); peak RSS {:.1} MiB (target ≤ 150 MiB)",
            agent.peak_rss_kib as f64 / 1024.0
        )],
        agent,
        requests,
        baselines: Vec::new(),
    })
}

fn mixed(o: &Options, layout: &Layout) -> Result<Outcome, String> {
    let (count, max, budget) = if o.tiny {
        (40, 8 * MIB, 48 * MIB)
    } else {
        (150, 200 * MIB, 2048 * MIB)
    };
    let (files, bytes) =
        data::write_mixed(&layout.inbox, count, max, budget, 4).map_err(|e| e.to_string())?;
    let sink = zero_delay_sink(o, layout, "agent")?;
    let config = AgentConfig::throughput(&sink.url);
    let (agent, requests) = measure(o, layout, sink, &config, files, Duration::from_secs(1800))?;
    Ok(Outcome {
        name: "mixed",
        what: format!(
            "{files} files of 1 KiB–{} MiB in nested folders, {:.0} MiB in all (seed 4) → clean",
            max / MIB,
            bytes as f64 / MIB as f64
        ),
        files,
        bytes,
        agent,
        requests,
        baselines: Vec::new(),
        notes: Vec::new(),
    })
}

/// Issue 11: a server allowing 50 scans at once, 30–120 s per scan, results fetched every 60 s,
/// the agent with its default config; every duration divided by the time scale.
fn realistic(o: &Options, layout: &Layout) -> Result<Outcome, String> {
    let k = o.time_scale.unwrap_or(if o.tiny { 600.0 } else { 1.0 });
    let files = if o.tiny { 200 } else { 2000 };
    let bytes = data::write_many(&layout.inbox, files, 4096, 5).map_err(|e| e.to_string())?;
    let limit = 50.0;
    let (lo, hi, poll, settle) = (30.0 / k, 120.0 / k, 60.0 / k, 5.0 / k);
    let ms = |s: f64| format!("{}ms", (s * 1000.0).round().max(1.0) as u64);
    let mut notes = Vec::new();
    let base = ["--max-scans".to_owned(), format!("{limit}")];
    let with_delay = |delay: String| {
        let mut flags = base.to_vec();
        flags.extend(["--scan-delay".to_owned(), delay]);
        flags
    };
    let log = layout.root.join("emulator-agent.log");
    // The range syntax of issue 11; an emulator without it gets the mean.
    let sink = match procs::start_sink(
        &o.binary,
        &certs(o),
        &log,
        &with_delay(format!("{}..{}", ms(lo), ms(hi))),
    ) {
        Ok(sink) => sink,
        Err(why) => {
            notes.push(format!(
                "the emulator refused a --scan-delay range ({}): every scan takes the mean, {}",
                why.lines().next().unwrap_or(""),
                ms((lo + hi) / 2.0)
            ));
            procs::start_sink(&o.binary, &certs(o), &log, &with_delay(ms((lo + hi) / 2.0)))?
        }
    };
    let mut config = AgentConfig {
        url: sink.url.clone(),
        server: vec![format!("poll_interval = \"{}\"", ms(poll))],
        watch: vec![format!("settle = \"{}\"", ms(settle))],
        state: Vec::new(),
    };
    if k != 1.0 {
        config.server.push(format!(
            "requests_per_second = {}",
            (AGENT_DEFAULT_RPS * k).round()
        ));
        config
            .watch
            .push(format!("poll_interval = \"{}\"", ms(2.0 / k)));
    }
    let ceiling = limit / ((lo + hi) / 2.0 + poll / 2.0);
    let ideal = files as f64 / ceiling;
    let deadline = Duration::from_secs_f64(ideal * 10.0 + 120.0);
    let (agent, requests) = measure(o, layout, sink, &config, files, deadline)?;
    let rate = files as f64 / agent.wall.as_secs_f64();
    notes.push(format!(
        "time scale {k}: scans {}..{}, poll {}, settle {}; server ceiling = {limit} / (mean scan + poll/2) = {ceiling:.2} files/s ({:.0} files/h unscaled), {ideal:.1} s for {files} files",
        ms(lo),
        ms(hi),
        ms(poll),
        ms(settle),
        ceiling / k * 3600.0
    ));
    notes.push(format!(
        "agent at {:.0}% of the server's ceiling (target ≥ 95%, issue 20); {} POSTs for {files} files (429s included)",
        100.0 * rate / ceiling,
        requests.post
    ));
    Ok(Outcome {
        name: "realistic",
        what: format!(
            "{files} files of 4 KiB, emulator limit 50, scans 30–120 s, poll 60 s, default agent config"
        ),
        files,
        bytes,
        agent,
        requests,
        baselines: Vec::new(),
        notes,
    })
}
