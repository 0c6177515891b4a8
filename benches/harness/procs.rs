//! The processes the harness drives: `dropscan emulate` (the sink, read from its stdout), `dropscan
//! run` (the agent, measured through `/proc`), and small helpers to time external tools.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::process::{Pid, Signal, kill_process};

/// A running `dropscan emulate`.
pub(crate) struct Sink {
    child: Child,
    lines: Receiver<String>,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
}

/// The request counters `dropscan emulate` prints when it stops.
#[derive(Clone, Debug, Default)]
pub struct Requests {
    /// Every request.
    pub total: u64,
    /// Submissions (`POST …/scans`).
    pub post: u64,
    /// Results requests (`GET …/scans/state`).
    pub get_state: u64,
    /// Restrictions requests (`GET …/scans/filters`).
    pub get_filters: u64,
    /// `DELETE …/scans/{scanId}`.
    pub delete: u64,
    /// TLS connections.
    pub connections: u64,
    /// When the first submission arrived, ms since the Unix epoch.
    pub first_post_unix_ms: Option<u64>,
}

impl Requests {
    fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("emulator requests: ")?;
        let mut r = Requests::default();
        for pair in rest.split_whitespace() {
            let (key, value) = pair.split_once('=')?;
            let n = value.parse::<u64>().ok();
            match key {
                "total" => r.total = n?,
                "post" => r.post = n?,
                "get_state" => r.get_state = n?,
                "get_filters" => r.get_filters = n?,
                "delete" => r.delete = n?,
                "connections" => r.connections = n?,
                "first_post_unix_ms" => r.first_post_unix_ms = n,
                _ => {}
            }
        }
        Some(r)
    }
}

/// Starts `dropscan emulate` on a free loopback port with certificates in `certs` (generated
/// there by the first instance) and `extra` flags; waits for its address. `Err` holds its
/// standard error when it refuses the flags.
pub(crate) fn start_sink(
    bin: &Path,
    certs: &Path,
    log: &Path,
    extra: &[String],
) -> Result<Sink, String> {
    let stderr = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut child = Command::new(bin)
        .arg("emulate")
        .args(["--listen", "127.0.0.1:0", "--certs"])
        .arg(certs)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot start {} emulate: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("emulator stdout missing")?;
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some(url) = line.strip_prefix("KATA emulator listening on ") {
                    return Ok(Sink {
                        child,
                        lines,
                        url: url.trim().to_owned(),
                    });
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                child.wait().ok();
                let err = std::fs::read_to_string(log).unwrap_or_default();
                return Err(format!("the emulator exited: {}", err.trim()));
            }
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            return Err("the emulator did not print its address within 60 s".into());
        }
    }
}

impl Sink {
    /// SIGTERM, then the counters it prints on the way out.
    pub(crate) fn stop(mut self) -> Requests {
        kill_process(Pid::from_child(&self.child), Signal::TERM).ok();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut found = None;
        while found.is_none() && Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => found = Requests::parse(&line),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if found.is_none() {
            self.child.kill().ok();
        }
        self.child.wait().ok();
        found.unwrap_or_default()
    }
}

/// What the harness learned about the agent process.
#[derive(Clone, Debug, Default)]
pub struct AgentFigures {
    /// Start of the process to the last file placed.
    pub wall: Duration,
    /// User + system CPU of the process (all threads) until then.
    pub cpu: Duration,
    /// VmHWM: peak resident set, KiB.
    pub peak_rss_kib: u64,
    /// When the process was started, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// Files in clean, quarantine and failed at the end.
    pub placed: [usize; 3],
    /// The deadline passed before every file was placed.
    pub timed_out: bool,
}

/// Runs `dropscan run --config CONFIG` until `done(root)` reports `expected` files placed or
/// `limit` passes, then SIGTERM. The log goes to `log`.
pub(crate) fn run_agent(
    bin: &Path,
    config: &Path,
    log: &Path,
    root: &Path,
    expected: usize,
    limit: Duration,
) -> Result<AgentFigures, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let started_unix_ms = unix_ms();
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {} run: {e}", bin.display()))?;
    let pid = child.id();
    let mut placed;
    let mut timed_out = false;
    loop {
        let c0 = Instant::now();
        placed = crate::data::placed(root);
        if placed.iter().sum::<usize>() >= expected {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the agent exited with {status} after placing {placed:?} of {expected}; see {}",
                log.display()
            ));
        }
        if t0.elapsed() > limit {
            timed_out = true;
            break;
        }
        // Counting a big folder costs CPU the agent would use: poll less often then.
        std::thread::sleep(
            (c0.elapsed() * 4).clamp(Duration::from_millis(10), Duration::from_millis(500)),
        );
    }
    let wall = t0.elapsed();
    let cpu = proc_cpu(pid).unwrap_or_default();
    let peak_rss_kib = proc_hwm_kib(pid).unwrap_or(0);
    kill_process(Pid::from_child(&child), Signal::TERM).ok();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                child.kill().ok();
                child.wait().ok();
                break;
            }
        }
    }
    Ok(AgentFigures {
        wall,
        cpu,
        peak_rss_kib,
        started_unix_ms,
        placed,
        timed_out,
    })
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// utime + stime of a process (all its threads) from `/proc/PID/stat`.
pub(crate) fn proc_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold anything.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = clock_ticks();
    Some(Duration::from_micros((utime + stime) * 1_000_000 / ticks))
}

/// VmHWM (peak resident set) of a process, KiB.
pub(crate) fn proc_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Runs a command to completion; its wall time, or why it could not run or failed.
pub(crate) fn time_command(cmd: &mut Command) -> Result<(Duration, String), String> {
    let t0 = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let wall = t0.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((wall, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Whether `tool ARG` (e.g. `--version`) runs and succeeds.
pub(crate) fn have_tool(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The certificate files `dropscan emulate` writes.
pub(crate) fn cert_paths(certs: &Path) -> [PathBuf; 3] {
    [
        certs.join("client.crt"),
        certs.join("client.key"),
        certs.join("ca.crt"),
    ]
}
