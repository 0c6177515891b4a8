//! `dropscan scan`: the agent run once over what the inboxes hold now, with a progress line
//! (`dropscan scan PATH…` is [`super::scan_paths`], which takes no lock and runs beside the
//! agent). This one holds the state folder's lock, as `run` does.
//!
//! It runs the same pipeline as `dropscan run` (same journal, same guarantees) and stops when
//! no eligible file is left in any inbox and the journal has nothing unfinished. The exit code
//! follows virus scanners' habit: 0 everything clean, 1 something was quarantined, 2 something
//! failed (and 69 when `--max-time` ran out, 75 when another agent holds the state folder, 78
//! for a config error).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::app::Agent;
use crate::config::{Config, WatchConfig};
use crate::error::{
    EXIT_CONFIG, EXIT_DETECTED, EXIT_FILES_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNAVAILABLE,
};
use crate::journal::{FileState, Outcome};

/// How often the progress line is refreshed on a terminal.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How often a progress line is written when stderr is not a terminal.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(10);

/// Eligible regular files in an inbox (what settle would take), without following symlinks.
fn eligible_files(w: &WatchConfig) -> usize {
    let mut n = 0;
    let mut stack = vec![w.path.clone()];
    let Ok(root) = crate::fsops::Dir::open_trusted(&w.path) else {
        return 0;
    };
    while let Some(dir) = stack.pop() {
        // Beneath the root, never through a link: the same view the watcher has.
        let rel = dir.strip_prefix(&w.path).unwrap_or(Path::new(""));
        let Ok(entries) = root.open_dir(rel).and_then(|d| d.entry_types()) else {
            continue;
        };
        for (name, t) in entries {
            let p = dir.join(name);
            if t == rustix::fs::FileType::Directory {
                if w.recursive && !crate::scope::is_out_of_scope(w, &p.join("x")) {
                    stack.push(p);
                }
            } else if t == rustix::fs::FileType::RegularFile && crate::scope::admit(w, &p).is_some()
            {
                n += 1;
            }
        }
    }
    n
}

#[derive(Default)]
struct Tally {
    clean: u64,
    quarantine: u64,
    failed: u64,
}

impl Tally {
    fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Clean => self.clean += 1,
            Outcome::Quarantine => self.quarantine += 1,
            // Vanished files are never placed; counted with failed if one were.
            Outcome::Failed | Outcome::Vanished => self.failed += 1,
        }
    }

    fn line(&self, in_progress: i64, waiting: usize) -> String {
        format!(
            "dropscan: {} placed (clean {}, quarantine {}, failed {}) · {in_progress} in progress · {waiting} waiting in the inbox",
            self.clean + self.quarantine + self.failed,
            self.clean,
            self.quarantine,
            self.failed
        )
    }
}

/// Runs the one-shot scan: of `paths` when given (nothing moved, no lock taken, see
/// [`super::scan_paths`]), else of the inboxes (holding the state folder's lock).
pub async fn run(
    path: &Path,
    max_time: Option<Duration>,
    paths: &[std::path::PathBuf],
    json: bool,
) -> ExitCode {
    use std::io::{IsTerminal, Write};
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("config error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if paths.is_empty() {
        // The inboxes are scanned and placed: the writes that needs, as `run` tries them.
        if let Err(e) = crate::app::preflight::check(&config) {
            eprintln!("config error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    crate::logging::init(config.log.format, "warn");
    if !paths.is_empty() {
        // No lock: `scan PATH` moves nothing and writes neither the journal nor a staging folder,
        // and the agent ignores results of scanIds it did not send, so it runs beside the agent.
        return super::scan_paths::run(&config, paths, json).await;
    }
    let _lock = match crate::app::lock::lock_state_dir(&config.state.dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("dropscan: {e}");
            return ExitCode::from(super::lock_exit_code(&e));
        }
    };
    let journal_path = config.journal_path();
    let watches = config.watches.clone();
    // Someone waits for this run: results are asked for soon after each upload, then less
    // often, as `scan PATH` does (not a whole poll_interval later).
    let mut config = config;
    config.server.poll_early = true;
    let agent = match Agent::new(config) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dropscan: {e}");
            return e.exit_code();
        }
    };
    let mut events = agent.subscribe();
    let token = match crate::signal::shutdown_token() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dropscan: cannot install signal handlers: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let task = tokio::spawn(agent.run(token.clone()));
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut last_log = Instant::now();
    let mut ended = Ended::Interrupted;
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            ev = events.recv() => {
                if let Ok(p) = ev {
                    tally.count(p.outcome);
                }
            }
            _ = tick.tick() => {
                let (waiting, unfinished) = progress(&watches, &journal_path).await;
                let line = tally.line(unfinished, waiting);
                if tty {
                    eprint!("\r{line}\x1b[K");
                    std::io::stderr().flush().ok();
                } else if last_log.elapsed() >= PROGRESS_LOG_EVERY {
                    eprintln!("{line}");
                    last_log = Instant::now();
                }
                if waiting == 0 && unfinished == 0 {
                    ended = Ended::Finished;
                    break;
                }
                if max_time.is_some_and(|m| started.elapsed() > m) {
                    ended = Ended::TimedOut;
                    break;
                }
            }
        }
    }
    token.cancel();
    let result = task.await;
    if tty {
        eprintln!();
    }
    conclude(result, ended, &tally, started)
}

/// Prints the summary and why the scan ended; its exit code.
fn conclude(
    result: Result<Result<(), crate::error::FatalError>, tokio::task::JoinError>,
    ended: Ended,
    tally: &Tally,
    started: Instant,
) -> ExitCode {
    println!(
        "{} in {:.1} s",
        tally
            .line(0, 0)
            .trim_end_matches(" · 0 in progress · 0 waiting in the inbox"),
        started.elapsed().as_secs_f64()
    );
    match result {
        Ok(Err(e)) => {
            eprintln!("dropscan: {e}");
            return e.exit_code();
        }
        Err(e) => {
            eprintln!("dropscan: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
        Ok(Ok(())) => {}
    }
    match ended {
        Ended::Interrupted => {
            eprintln!("dropscan: interrupted; what is unfinished resumes at the next run");
        }
        Ended::TimedOut => {
            eprintln!("dropscan: --max-time ran out; what is unfinished resumes at the next run")
        }
        Ended::Finished => {}
    }
    ExitCode::from(exit_code(ended, tally))
}

/// How a scan of the inboxes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Nothing waits in the inboxes and nothing is unfinished.
    Finished,
    /// `--max-time` ran out first.
    TimedOut,
    /// A signal stopped it.
    Interrupted,
}

/// The exit code of a scan that ended so, having placed `tally`: an unfinished scan says why;
/// a finished one says the worst outcome (a detection before a failed file).
fn exit_code(ended: Ended, tally: &Tally) -> u8 {
    match ended {
        Ended::Interrupted => EXIT_INTERRUPTED,
        Ended::TimedOut => EXIT_UNAVAILABLE,
        Ended::Finished if tally.quarantine > 0 => EXIT_DETECTED,
        Ended::Finished if tally.failed > 0 => EXIT_FILES_FAILED,
        Ended::Finished => EXIT_OK,
    }
}

/// (Files waiting in the inboxes, records unfinished in the journal); both counted as 1 when
/// they cannot be, so that the scan does not end on a guess.
async fn progress(watches: &[WatchConfig], journal_path: &Path) -> (usize, i64) {
    let (watches, jp) = (watches.to_vec(), journal_path.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let waiting: usize = watches.iter().map(eligible_files).sum();
        let unfinished: i64 = crate::journal::read_summary(&jp)
            .map(|s| {
                s.per_state
                    .iter()
                    .filter(|(st, _)| FileState::parse(st) != Some(FileState::Done))
                    .map(|(_, n)| *n)
                    .sum()
            })
            .unwrap_or(1);
        (waiting, unfinished)
    })
    .await
    .unwrap_or((1, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scans_exit_code_says_why_it_ended_then_the_worst_outcome() {
        let tally = |clean, quarantine, failed| Tally {
            clean,
            quarantine,
            failed,
        };
        let cases = [
            (Ended::Finished, tally(0, 0, 0), EXIT_OK),
            (Ended::Finished, tally(5, 0, 0), EXIT_OK),
            (Ended::Finished, tally(5, 0, 1), EXIT_FILES_FAILED),
            (Ended::Finished, tally(5, 1, 1), EXIT_DETECTED),
            (Ended::Finished, tally(0, 1, 0), EXIT_DETECTED),
            (Ended::TimedOut, tally(0, 1, 1), EXIT_UNAVAILABLE),
            (Ended::TimedOut, tally(0, 0, 0), EXIT_UNAVAILABLE),
            (Ended::Interrupted, tally(0, 1, 0), EXIT_INTERRUPTED),
            (Ended::Interrupted, tally(3, 0, 0), EXIT_INTERRUPTED),
        ];
        for (ended, t, want) in cases {
            assert_eq!(
                exit_code(ended, &t),
                want,
                "{ended:?} {} {} {}",
                t.clean,
                t.quarantine,
                t.failed
            );
        }
    }

    #[test]
    fn a_tally_counts_vanished_with_failed() {
        let mut t = Tally::default();
        for o in [
            Outcome::Clean,
            Outcome::Clean,
            Outcome::Quarantine,
            Outcome::Failed,
            Outcome::Vanished,
        ] {
            t.count(o);
        }
        assert_eq!((t.clean, t.quarantine, t.failed), (2, 1, 2));
    }
}
