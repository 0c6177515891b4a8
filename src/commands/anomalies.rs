//! `dropscan anomalies list`: the verdicts the server contradicted after a file was released as
//! clean (`not detected`, later `detect`), as the journal recorded them (`crate::journal::Anomaly`).
//!
//! The listing is read-only and works while the agent runs (the journal is SQLite in WAL mode).
//! dropscan leaves such a file in clean (see SECURITY.md); this list, the `anomaly` hook event
//! and the `dropscan_verdict_anomalies_total` counter are how a SOC learns of it. Human output
//! escapes names as the logs do; `--json` keeps them exact.

use std::process::ExitCode;

use serde_json::json;

use super::tools::{journal_failed, open, rfc3339};
use crate::cli::AnomaliesAction;
use crate::fsops::names::insert_json;
use crate::journal::Anomaly;

/// Runs one `anomalies` subcommand.
pub async fn run(action: AnomaliesAction) -> ExitCode {
    match action {
        AnomaliesAction::List { config, json } => {
            let (_, journal) = match open(&config.path) {
                Ok(x) => x,
                Err(code) => return code,
            };
            let found = match journal.anomalies().await {
                Ok(a) => a,
                Err(e) => return journal_failed(&e),
            };
            if json {
                let v: Vec<_> = found.iter().map(anomaly_json).collect();
                println!("{}", serde_json::Value::Array(v));
                return ExitCode::SUCCESS;
            }
            if found.is_empty() {
                println!("no anomalies");
            }
            for a in &found {
                println!(
                    "{:<6} {}  {}  {}  {}  released on {}, then {}  scan {}  sha256 {}",
                    a.id,
                    rfc3339(a.at_ms),
                    crate::fsops::shown(&a.root.join(&a.rel_path)),
                    a.dest
                        .as_deref()
                        .map_or_else(String::new, |d| format!("→ {}", crate::fsops::shown(d))),
                    if a.announced { "announced" } else { "pending" },
                    a.first,
                    a.later,
                    a.scan_id.as_deref().unwrap_or("-"),
                    a.sha256.map_or_else(|| "-".into(), hex::encode),
                );
            }
            ExitCode::SUCCESS
        }
    }
}

/// One anomaly as JSON (`list --json`). Paths are exact: a name that is not UTF-8 gets a
/// `<key>_hex` beside its text ([`insert_json`]).
pub fn anomaly_json(a: &Anomaly) -> serde_json::Value {
    let mut v = json!({
        "id": a.id,
        "time": rfc3339(a.at_ms),
        "file_id": a.file_id,
        "dest": null,
        "sha256": a.sha256.map(hex::encode),
        "scan_id": a.scan_id,
        "first_verdict": a.first,
        "verdict": a.later,
        "announced": a.announced,
    });
    if let Some(obj) = v.as_object_mut() {
        insert_json(obj, "root", &a.root);
        insert_json(obj, "path", &a.rel_path);
        if let Some(d) = &a.dest {
            insert_json(obj, "dest", d);
        }
    }
    v
}
