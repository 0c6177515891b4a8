//! Driving `scan PATH…`: the uploads (at most `server.max_in_flight` at once), the results
//! (a failed scan submitted again, up to `server.max_attempts`), the deletion of our results on
//! the server, the progress on stderr, and the report. Listing, reading and the report's shape
//! are the module root's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::{FileResult, Listed, PLAIN_EVERY, Report, ScanFileError, collect, submit};
use crate::config::{Config, MaxInFlight};
use crate::error::EXIT_CONFIG;
use crate::kata::{KataClient, ScanId, ScanState};

/// Runs `scan PATH…`.
pub async fn run(config: &Config, paths: &[PathBuf], json: bool) -> ExitCode {
    let client = match KataClient::new(config.server.client_options()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dropscan: cannot set up the client: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let listed = {
        let paths = paths.to_vec();
        tokio::task::spawn_blocking(move || collect(&paths))
            .await
            .unwrap_or_default()
    };
    let (files, mut results) = listed;
    let total: u64 = files.iter().map(|(_, n, _)| n).sum();
    let mut batch = Batch {
        client: &client,
        progress: Progress::new(files.len() as u64, total),
        pending: HashMap::new(),
        scanned: files
            .iter()
            .map(|(p, n, _)| FileResult {
                path: p.clone(),
                size: *n,
                ..FileResult::default()
            })
            .collect(),
        files: &files,
    };
    batch
        .upload_all(upload_limit(
            config.server.max_in_flight,
            config.server.max_in_flight_ceiling.get(),
        ))
        .await;
    let finished = batch.verdicts(config).await;
    // The results are ours: delete them on the server (best effort).
    for scan_id in finished {
        if let Ok(id) = ScanId::parse(&scan_id) {
            client.delete(&id).await.ok();
        }
    }
    batch.progress.plain_tick(true);
    batch.progress.finish();

    let mut scanned = batch.scanned;
    scanned.append(&mut results);
    let report = Report::new(scanned);
    print_report(&report, json);
    ExitCode::from(report.exit_code())
}

/// Uploads at once: `server.max_in_flight`; with "auto", a modest fixed number (a one-shot scan
/// has no time to learn the server's concurrency; 429s are retried by `submit`).
fn upload_limit(max_in_flight: MaxInFlight, ceiling: usize) -> usize {
    match max_in_flight {
        MaxInFlight::Fixed(n) => n.get(),
        MaxInFlight::Auto => ceiling.min(16),
    }
}

/// What a final state means for a file submitted `attempts` times: `true` when it is submitted
/// again. The rule `run` follows: `error`/`timeout` is submitted again under a new scanId, up
/// to `server.max_attempts` submissions in all.
fn submit_again(state: &ScanState, attempts: u32, max_attempts: u32) -> bool {
    matches!(state, ScanState::Error | ScanState::Timeout) && attempts < max_attempts
}

/// The files of one `scan PATH…` and where each stands.
struct Batch<'a> {
    client: &'a KataClient,
    files: &'a [Listed],
    scanned: Vec<FileResult>,
    /// scanId → (file index, submissions of that file so far).
    pending: HashMap<String, (usize, u32)>,
    progress: Progress,
}

impl Batch<'_> {
    /// Uploads every file, at most `limit` at once.
    async fn upload_all(&mut self, limit: usize) {
        let mut uploads = JoinSet::new();
        let mut next = 0;
        while next < self.files.len() || !uploads.is_empty() {
            while next < self.files.len() && uploads.len() < limit {
                let (c, p, g, i) = (
                    self.client.clone(),
                    self.files[next].0.clone(),
                    self.files[next].2.clone(),
                    next,
                );
                uploads.spawn(async move { (i, submit(&c, &p, &g).await) });
                next += 1;
            }
            let Some(Ok((i, outcome))) = uploads.join_next().await else {
                continue;
            };
            if let Some(bytes) = self.submitted(i, 1, outcome) {
                self.progress.uploaded(bytes);
            }
            self.progress.plain_tick(false);
        }
    }

    /// Records file `i`'s submission number `attempts`: its scan pending, and the bytes sent;
    /// or its error, which is its result.
    fn submitted(
        &mut self,
        i: usize,
        attempts: u32,
        outcome: Result<(ScanId, String, u64), ScanFileError>,
    ) -> Option<u64> {
        match outcome {
            Ok((scan_id, sha256, bytes)) => {
                let scanned = &mut self.scanned[i];
                scanned.sha256 = Some(sha256);
                scanned.size = bytes;
                scanned.scan_id = Some(scan_id.as_str().to_string());
                self.pending
                    .insert(scan_id.as_str().to_string(), (i, attempts));
                Some(bytes)
            }
            Err(e) => {
                self.scanned[i].error = Some(e.to_string());
                self.progress.verdict();
                None
            }
        }
    }

    /// Asks for results until every scan has one or `server.scan_timeout` passed: 1 s after the
    /// uploads, then 2 s, and every 2 s (or `server.poll_interval`, if shorter) after that. The
    /// scanIds that ended, whose results are to be deleted.
    async fn verdicts(&mut self, config: &Config) -> Vec<String> {
        let max_attempts = config.server.max_attempts.get();
        let deadline = Instant::now() + config.server.scan_timeout;
        let mut pace = crate::backoff::Pace::new(
            config.server.poll_interval.min(Duration::from_secs(2)),
            true,
        );
        pace.asked();
        let mut finished: Vec<String> = Vec::new();
        while !self.pending.is_empty() && Instant::now() < deadline {
            tokio::time::sleep_until(pace.due()).await;
            pace.asked();
            let list = match self.client.results(&ScanState::FINAL).await {
                Ok(list) => list,
                Err(e) => {
                    tracing::debug!(error = %e, "results request failed; retrying");
                    self.progress.plain_tick(false);
                    continue;
                }
            };
            for r in list {
                let Some((i, attempts)) = self.pending.remove(&r.scan_id) else {
                    continue;
                };
                finished.push(r.scan_id.clone());
                if submit_again(&r.state, attempts, max_attempts) {
                    let (path, given) = (&self.files[i].0, &self.files[i].2);
                    let outcome = submit(self.client, path, given).await;
                    if self.submitted(i, attempts + 1, outcome).is_some() {
                        pace.submitted();
                    }
                    continue;
                }
                if matches!(r.state, ScanState::Error | ScanState::Timeout) {
                    let what = r.state.as_wire();
                    self.scanned[i].error = Some(format!(
                        "the scan ended with {what} ({attempts} submissions, server.max_attempts)"
                    ));
                }
                self.scanned[i].verdict = Some(r.state);
                self.progress.verdict();
            }
            self.progress.plain_tick(false);
        }
        for (i, _) in self.pending.values() {
            self.scanned[*i].error = Some(format!(
                "no verdict within {} (server.scan_timeout)",
                humantime::format_duration(config.server.scan_timeout)
            ));
        }
        finished
    }
}

/// The report: one JSON document, or a line per file and the totals.
fn print_report(report: &Report, json: bool) {
    if json {
        match serde_json::to_string_pretty(report) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("dropscan: cannot write the report: {e}"),
        }
    } else {
        for f in &report.files {
            let what = match (&f.verdict, &f.error) {
                (_, Some(e)) => e.clone(),
                (Some(v), None) => v.as_wire().to_owned(),
                (None, None) => "no verdict".into(),
            };
            println!(
                "{}: {}",
                crate::fsops::shown(&f.path),
                crate::fsops::names::shown_text(&what)
            );
        }
        let t = &report.totals;
        println!(
            "{} files, {}: {} clean, {} detected, {} errors, {} skipped",
            t.files,
            indicatif::HumanBytes(t.bytes),
            t.clean,
            t.detected,
            t.errors,
            t.skipped
        );
    }
}

/// Progress on stderr: a bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    files: u64,
    done: u64,
    bytes: u64,
    started: Instant,
    last_plain: Instant,
}

impl Progress {
    fn new(files: u64, bytes: u64) -> Progress {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(bytes),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        let p = Progress {
            bar,
            files,
            done: 0,
            bytes: 0,
            started: Instant::now(),
            last_plain: Instant::now(),
        };
        p.show();
        p
    }

    fn uploaded(&mut self, bytes: u64) {
        self.bytes += bytes;
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
        self.show();
    }

    fn verdict(&mut self) {
        self.done += 1;
        self.show();
    }

    fn show(&self) {
        let msg = format!("{}/{} files", self.done, self.files);
        if let Some(bar) = &self.bar {
            bar.set_message(msg);
        }
    }

    fn plain_tick(&mut self, force: bool) {
        if self.bar.is_some() || (!force && self.last_plain.elapsed() < PLAIN_EVERY) {
            return;
        }
        self.last_plain = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        let rate = (self.bytes as f64 / secs) as u64;
        eprintln!(
            "dropscan scan: {}/{} files with a verdict, {} uploaded ({}/s)",
            self.done,
            self.files,
            indicatif::HumanBytes(self.bytes),
            indicatif::HumanBytes(rate)
        );
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_scan_is_submitted_again_up_to_max_attempts() {
        let cases = [
            (ScanState::Error, 1, 3, true),
            (ScanState::Timeout, 2, 3, true),
            (ScanState::Error, 3, 3, false),
            (ScanState::Timeout, 4, 3, false),
            (ScanState::Error, 1, 1, false),
            (ScanState::Detect, 1, 3, false),
            (ScanState::NotDetected, 1, 3, false),
        ];
        for (state, attempts, max, again) in cases {
            assert_eq!(
                submit_again(&state, attempts, max),
                again,
                "{state:?} {attempts}/{max}"
            );
        }
    }

    #[test]
    fn uploads_at_once_follow_a_fixed_max_in_flight_and_cap_auto() {
        let n = |v| MaxInFlight::Fixed(std::num::NonZeroUsize::new(v).unwrap());
        assert_eq!(upload_limit(n(40), 1000), 40);
        assert_eq!(upload_limit(n(1), 1000), 1);
        assert_eq!(upload_limit(MaxInFlight::Auto, 1000), 16);
        assert_eq!(upload_limit(MaxInFlight::Auto, 4), 4);
    }
}
