//! Notifications of placements (`[[hook]]`): at least once, surviving restarts, retried with
//! backoff, bounded concurrency, never stalling the pipeline.
//!
//! Besides placements, one more event: `anomaly`, a verdict contradicted after the file was
//! released as clean ([`anomaly_events`]). The journal records it with the decision; the poller
//! queues its events (`Journal::announce_anomalies`) and the same runner delivers them.
//!
//! - **Queued with the placement.** The sorter builds the events of a placement
//!   ([`events_for`]) and hands them to [`Journal::placed_with_events`](crate::journal::Journal::placed_with_events),
//!   which records `placed` and queues one row per hook in the same transaction. A crash after
//!   that commit loses no notification; a crash before it repeats the placement step, not the
//!   notification.
//! - **Delivered by a runner** ([`run`], spawned by the agent beside its housekeeping): it reads
//!   due rows from the journal, delivers at most [`PER_HOOK_CONCURRENCY`] events per hook at
//!   once (a hanging hook holds only its own slots, and is killed after its `timeout`), and
//!   deletes a row once delivered. A failed delivery is retried after an exponential backoff
//!   with jitter (1 s, 2 s, 4 s … at most 10 min); after `max_attempts` the row is given up on:
//!   an error is logged and kept in the journal's error history (shown by `dropscan status`),
//!   and the row stays in the journal's `hook_events` table (`gave_up = 1`,
//!   [`Journal::hook_counts`](crate::journal::Journal::hook_counts)) until pruned with the
//!   finished records.
//! - **At least once**: a delivery cut short by a shutdown or a crash is repeated after the
//!   restart; receivers may see an event twice (its `sha256`, `dest` and `time` identify it).
//!
//! Delivery (`deliver.rs`): a command gets the event's JSON on stdin (argv, never a shell; exit
//! 0 is success; it is killed with its process group on timeout); a URL gets it POSTed as
//! `application/json`, with `X-Dropscan-Signature: sha256=<hex HMAC-SHA256 of the body>` when
//! a secret is set (any 2xx is success).
//!
//! Paths in an event are exact: `root`, `path` and `dest` hold the text of a UTF-8 name; a name
//! that is not UTF-8 shows U+FFFD there and gets `root_hex` / `path_hex` / `dest_hex` beside it,
//! the hex of its bytes (two such names never look alike to a receiver).
//!
//! What this module does not do: decide or move anything.

use std::path::Path;

use serde::Serialize;

use crate::config::Config;
use crate::fsops::names::json_hex;
use crate::journal::{Anomaly, FileRecord, NewHookEvent, Outcome, ScanVerdict};

mod deliver;
mod runner;

pub(crate) use runner::run;

/// The event delivered for one placement.
#[derive(Debug, Serialize)]
pub(crate) struct Event<'a> {
    /// Always `placed`.
    pub event: &'static str,
    /// `clean`, `quarantine` or `failed`.
    pub outcome: &'static str,
    /// The server's verdict, if any.
    pub verdict: Option<&'a str>,
    /// The watched root (the inbox).
    pub root: String,
    /// For a root that is not UTF-8 only: the hex of its bytes (exact; `root` shows U+FFFD).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_hex: Option<String>,
    /// The original path, relative to the root.
    pub path: String,
    /// For a path that is not UTF-8 only: the hex of its bytes (exact; `path` shows U+FFFD).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    /// Where the file was placed.
    pub dest: String,
    /// For a `dest` that is not UTF-8 only: the hex of its bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest_hex: Option<String>,
    /// Bytes.
    pub size: Option<u64>,
    /// Lower-case hex SHA-256, if the file was hashed.
    pub sha256: Option<String>,
    /// The scanIds of its submissions.
    pub scan_ids: &'a [crate::scanner::ScanId],
    /// Why it failed (or a note), if any.
    pub reason: Option<&'a str>,
    /// When it was placed (RFC 3339).
    pub time: String,
    /// This host's name.
    pub host: String,
    /// `server.sensor_instance_id`, if set.
    pub sensor_instance_id: Option<&'a str>,
}

/// The event delivered for a verdict contradicted after the file was released as clean.
#[derive(Debug, Serialize)]
pub(crate) struct AnomalyEvent<'a> {
    /// Always `anomaly`.
    pub event: &'static str,
    /// Where the file was released: `clean`.
    pub outcome: &'static str,
    /// The contradicting verdict (`detect`).
    pub verdict: &'a str,
    /// The verdict the file was released on (`not detected`).
    pub first_verdict: &'a str,
    /// The watched root (the inbox).
    pub root: String,
    /// For a root that is not UTF-8 only: the hex of its bytes (exact; `root` shows U+FFFD).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_hex: Option<String>,
    /// The original path, relative to the root.
    pub path: String,
    /// For a path that is not UTF-8 only: the hex of its bytes (exact; `path` shows U+FFFD).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    /// Where the file was placed in clean, if known.
    pub dest: Option<String>,
    /// For a `dest` that is not UTF-8 only: the hex of its bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest_hex: Option<String>,
    /// Lower-case hex SHA-256 the verdicts were given for.
    pub sha256: Option<String>,
    /// The scan whose answer changed.
    pub scan_ids: Vec<&'a str>,
    /// What happened, in a sentence.
    pub reason: String,
    /// The anomaly's id in `dropscan anomalies list`.
    pub anomaly_id: i64,
    /// When the contradicting answer came (RFC 3339).
    pub time: String,
    /// This host's name.
    pub host: String,
    /// `server.sensor_instance_id`, if set.
    pub sensor_instance_id: Option<&'a str>,
}

/// The events to queue for anomaly `a`: one per configured hook with `anomaly` in `on` (hooks
/// with the same target are told once).
pub(crate) fn anomaly_events(config: &Config, a: &Anomaly) -> Vec<NewHookEvent> {
    let out: Vec<NewHookEvent> = Vec::new();
    let wanting: Vec<_> = config.hooks.iter().filter(|h| h.wants("anomaly")).collect();
    if wanting.is_empty() {
        return out;
    }
    let at = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(a.at_ms).unwrap_or(0));
    let event = AnomalyEvent {
        event: "anomaly",
        outcome: Outcome::Clean.as_str(),
        verdict: &a.later,
        first_verdict: &a.first,
        root: a.root.to_string_lossy().into_owned(),
        root_hex: json_hex(&a.root),
        path: a.rel_path.to_string_lossy().into_owned(),
        path_hex: json_hex(&a.rel_path),
        dest: a.dest.as_ref().map(|d| d.to_string_lossy().into_owned()),
        dest_hex: a.dest.as_deref().and_then(json_hex),
        sha256: a.sha256.map(hex::encode),
        scan_ids: a.scan_id.as_deref().into_iter().collect(),
        reason: format!(
            "the server answered {} for a file released as clean on {}; the file was left in clean",
            a.later, a.first
        ),
        anomaly_id: a.id,
        time: humantime::format_rfc3339_millis(at).to_string(),
        host: host_name(),
        sensor_instance_id: config.server.sensor_instance_id.as_deref(),
    };
    let Ok(text) = serde_json::to_string(&event) else {
        return out;
    };
    one_per_target(&wanting, &text)
}

/// `text` queued once per hook target among `wanting` (hooks with the same target are told once).
fn one_per_target(wanting: &[&crate::config::HookConfig], text: &str) -> Vec<NewHookEvent> {
    let mut out: Vec<NewHookEvent> = Vec::new();
    for h in wanting {
        let hook = h.key();
        if !out.iter().any(|e| e.hook == hook) {
            out.push(NewHookEvent {
                hook,
                event: text.to_string(),
            });
        }
    }
    out
}

/// This host's name.
pub(crate) fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// The events to queue for the placement of `rec` as `outcome` at `dest`: one per configured
/// hook that wants this outcome (hooks with the same target are told once).
pub(crate) fn events_for(
    config: &Config,
    rec: &FileRecord,
    outcome: Outcome,
    dest: &Path,
    reason: Option<&str>,
) -> Vec<NewHookEvent> {
    let out: Vec<NewHookEvent> = Vec::new();
    let wanting: Vec<_> = config
        .hooks
        .iter()
        .filter(|h| h.wants(outcome.as_str()))
        .collect();
    if wanting.is_empty() {
        return out;
    }
    let event = Event {
        event: "placed",
        outcome: outcome.as_str(),
        verdict: rec.verdict.map(ScanVerdict::as_str),
        root: rec.root.to_string_lossy().into_owned(),
        root_hex: json_hex(&rec.root),
        path: rec.rel_path.to_string_lossy().into_owned(),
        path_hex: json_hex(&rec.rel_path),
        dest: dest.to_string_lossy().into_owned(),
        dest_hex: json_hex(dest),
        size: rec.stamp.map(|s| s.size),
        sha256: rec.sha256.map(hex::encode),
        scan_ids: &rec.scan_ids,
        reason,
        time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        host: host_name(),
        sensor_instance_id: config.server.sensor_instance_id.as_deref(),
    };
    let Ok(text) = serde_json::to_string(&event) else {
        return out;
    };
    one_per_target(&wanting, &text)
}
