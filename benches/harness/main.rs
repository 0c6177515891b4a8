//! The benchmark harness (issue 9): runs the REAL `dropscan` binary as a user does and prints
//! figures, never assertions.
//!
//! `cargo bench --bench harness -- [--scenario NAME]… [--tiny] [--time-scale K] [--binary PATH]
//! [--work-dir DIR] [--keep]`
//!
//! For each scenario it starts `dropscan emulate` as the sink (zero delay: `--scan-delay 0s
//! --max-scans 0 --max-object-size 0`, except `realistic`), writes the files, writes a config
//! (settle and poll 200 ms, `max_in_flight = 2000`), starts `dropscan run --config …`, waits
//! (bounded) until every file is placed, reads the agent's CPU and peak RSS from `/proc`, stops
//! it with SIGTERM, then stops the emulator, which prints its request counters. Baselines run
//! in the same invocation against an emulator started with the same flags: a Python keep-alive
//! POST loop (`benches/baseline_post.py`), `curl --http1.1 -F content=@file`, and `openssl dgst
//! -sha256`; a missing tool skips its baseline with the reason printed.
//!
//! Scenarios: `small`, `big`, `many`, `mixed`, `realistic` (see `scenarios.rs`), `soak` (see
//! `soak.rs`); all by default. `small` also runs the durable floor (`floor.rs`).
//! `--tiny` shrinks every scenario for CI. `--time-scale K` divides every duration of
//! `realistic` and `soak` (scan times, poll interval, settle; the soak's hour) by K. `--binary PATH` measures another build
//! (e.g. `target/debug/dropscan`, already built by `cargo test`) instead of the one cargo built
//! for this bench.
//!
//! Layout: `main.rs` options and the report; `scenarios.rs` the scenarios and baselines;
//! `procs.rs` the processes (emulator, agent, tools) and `/proc`; `data.rs` the test files.

// `clippy::too_many_lines` guards the agent's functions. The soak scenario and the durable
// floor's pass are each one timeline (start, drop, signal, sample, check) read top to bottom.
#![allow(clippy::too_many_lines)]
#![allow(missing_docs)]

mod data;
mod floor;
mod procs;
mod scenarios;
mod soak;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use procs::{AgentFigures, Requests};

/// What the command line asked for.
pub struct Options {
    /// Scenario names, in order.
    pub scenarios: Vec<String>,
    /// `--tiny`: the CI sizes.
    pub tiny: bool,
    /// `None`: the scenario's default (1, or 600 with `--tiny`).
    pub time_scale: Option<f64>,
    /// The `dropscan` binary measured.
    pub binary: PathBuf,
    /// Where scenarios write their files (deleted after each one unless `keep`).
    pub work: PathBuf,
    /// `--keep`: leave files and logs behind.
    pub keep: bool,
}

const ALL: [&str; 6] = ["small", "big", "many", "mixed", "realistic", "soak"];

const USAGE: &str = "usage: cargo bench --bench harness -- [--scenario NAME]... [--tiny] \
[--time-scale K] [--binary PATH] [--work-dir DIR] [--keep]
scenarios: small, big, many, mixed, realistic, soak (default: all; a comma-separated list works too)";

fn parse_options() -> Result<Options, String> {
    let mut o = Options {
        scenarios: Vec::new(),
        tiny: false,
        time_scale: None,
        binary: PathBuf::from(env!("CARGO_BIN_EXE_dropscan")),
        work: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-harness"),
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            // cargo bench passes `--bench`; libtest-style filters are not used.
            "--bench" => {}
            "--tiny" => o.tiny = true,
            "--keep" => o.keep = true,
            "--scenario" => {
                for name in value("--scenario")?.split(',') {
                    if !ALL.contains(&name) {
                        return Err(format!("unknown scenario {name:?}"));
                    }
                    o.scenarios.push(name.to_owned());
                }
            }
            "--time-scale" => {
                let k: f64 = value("--time-scale")?
                    .parse()
                    .map_err(|e| format!("--time-scale: {e}"))?;
                if !(k >= 1.0 && k.is_finite()) {
                    return Err("--time-scale must be at least 1".into());
                }
                o.time_scale = Some(k);
            }
            "--binary" => o.binary = PathBuf::from(value("--binary")?),
            "--work-dir" => o.work = PathBuf::from(value("--work-dir")?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.scenarios.is_empty() {
        o.scenarios = ALL.iter().map(|s| (*s).to_owned()).collect();
    }
    Ok(o)
}

/// One measured baseline and how the agent compares with it.
pub struct Baseline {
    /// What was run.
    pub name: String,
    /// The baseline's own figures, or why it was skipped.
    pub figures: String,
    /// The agent next to it, e.g. "agent at 0.31x its rate".
    pub ratio: String,
}

/// Everything a scenario measured.
pub struct Outcome {
    /// The scenario's name.
    pub name: &'static str,
    /// One line on what it moves.
    pub what: String,
    /// Files dropped.
    pub files: usize,
    /// Bytes dropped.
    pub bytes: u64,
    /// The agent process.
    pub agent: AgentFigures,
    /// What the agent's emulator saw.
    pub requests: Requests,
    /// The baselines run next to it.
    pub baselines: Vec<Baseline>,
    /// Scenario-specific lines (first upload, share of the server's ceiling, …).
    pub notes: Vec<String>,
}

impl Outcome {
    fn files_per_s(&self) -> f64 {
        self.files as f64 / self.agent.wall.as_secs_f64().max(1e-9)
    }
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.agent.wall.as_secs_f64().max(1e-9)
    }
    /// Agent CPU per file, seconds.
    pub fn cpu_per_file_s(&self) -> f64 {
        self.agent.cpu.as_secs_f64() / self.files.max(1) as f64
    }
    fn cpu_per_file(&self) -> Duration {
        self.agent.cpu / self.files.max(1) as u32
    }
    fn requests_per_file(&self) -> f64 {
        self.requests.total as f64 / self.files.max(1) as f64
    }

    fn print(&self) {
        println!("== {}: {}", self.name, self.what);
        let a = &self.agent;
        println!(
            "   agent: {:.2} s wall, {} files/s, {:.1} MB/s, {} CPU/file ({:.2} s in all), \
             peak RSS {:.1} MiB, {:.2} HTTP requests/file (post {}, state {}, delete {}, \
             filters {}; {} TLS connections)",
            a.wall.as_secs_f64(),
            rate(self.files_per_s()),
            self.mb_per_s(),
            human(self.cpu_per_file()),
            a.cpu.as_secs_f64(),
            a.peak_rss_kib as f64 / 1024.0,
            self.requests_per_file(),
            self.requests.post,
            self.requests.get_state,
            self.requests.delete,
            self.requests.get_filters,
            self.requests.connections,
        );
        let [clean, quarantine, failed] = a.placed;
        if a.timed_out || quarantine + failed > 0 || clean < self.files {
            println!(
                "   WARNING: {clean} clean, {quarantine} quarantined, {failed} failed of {}{}",
                self.files,
                if a.timed_out {
                    " (deadline passed)"
                } else {
                    ""
                }
            );
        }
        for note in &self.notes {
            println!("   {note}");
        }
        for b in &self.baselines {
            println!("   baseline {}: {} {}", b.name, b.figures, b.ratio);
        }
    }

    fn table_row(&self) -> String {
        let ratios: Vec<String> = self
            .baselines
            .iter()
            .filter(|b| !b.ratio.is_empty())
            .map(|b| format!("{}: {}", b.name, b.ratio.trim_start_matches("→ ")))
            .collect();
        format!(
            "| {} | {} | {:.2} s | {} | {:.1} | {} | {:.1} MiB | {:.2} | {} |",
            self.name,
            self.files,
            self.agent.wall.as_secs_f64(),
            rate(self.files_per_s()),
            self.mb_per_s(),
            human(self.cpu_per_file()),
            self.agent.peak_rss_kib as f64 / 1024.0,
            self.requests_per_file(),
            if ratios.is_empty() {
                "—".to_owned()
            } else {
                ratios.join("; ")
            }
        )
    }
}

/// A rate with as many decimals as it deserves: 515, 8.3, 0.12.
pub fn rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 1.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.2}")
    }
}

/// A duration the way the report writes CPU per file: µs below 10 ms.
pub fn human(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 10_000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {kernel}")
}

fn filesystem(path: &std::path::Path) -> String {
    std::process::Command::new("df")
        .arg("--output=fstype")
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .map(|l| l.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&options.work) {
        eprintln!("{}: {e}", options.work.display());
        return ExitCode::FAILURE;
    }
    println!(
        "dropscan benchmark harness{}",
        if options.tiny { " (tiny)" } else { "" }
    );
    println!("machine: {}", machine());
    println!(
        "binary: {}; work dir: {} ({})",
        options.binary.display(),
        options.work.display(),
        filesystem(&options.work)
    );
    let mut outcomes = Vec::new();
    let mut failed = false;
    for name in &options.scenarios {
        match scenarios::run(name, &options) {
            Ok(outcome) => {
                outcome.print();
                outcomes.push(outcome);
            }
            Err(e) => {
                println!("== {name}: FAILED: {e}");
                failed = true;
            }
        }
    }
    println!();
    println!(
        "| scenario | files | wall | files/s | MB/s | agent CPU/file | peak RSS | HTTP req/file | vs baselines |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for o in &outcomes {
        println!("{}", o.table_row());
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
