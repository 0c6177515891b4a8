//! The command line (clap derive only; the work is done elsewhere).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Turns any folder into a malware checkpoint: files dropped into watched folders are scanned by
/// Kaspersky Anti Targeted Attack Platform (KATA) and moved into clean, quarantine or failed.
#[derive(Debug, Parser)]
#[command(name = "dropscan", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The text shown under `--help` of `quarantine`.
pub const QUARANTINE_EXIT_HELP: &str = "Exit codes: 0 done (a purge without --yes: a dry run); \
2 refused (no such entry, no longer kept, another tool is working on it, the bytes changed since \
they were quarantined, the target exists, the file is missing, --to names a folder that does not \
exist); 64 usage error; 69 the journal or a folder failed; 78 configuration error. Every action \
(and every refusal) is audited in the journal: Unix user, time, reason, what; `list --all` and \
`show ID` print the audit records. A run that was interrupted (Ctrl-C, kill) is finished, or \
undone, by the next run on its entry.";

/// The text shown under `--help` of `failed`.
pub const FAILED_EXIT_HELP: &str = "Exit codes: 0 done (a purge without --yes: a dry run); \
2 refused (no such entry, no longer kept, another tool is working on it, the file is missing \
from the failed folder); 64 usage error; 69 the journal or a folder failed; 78 configuration \
error. Every retry and purge (and every refusal) is audited in the journal: Unix user, time, \
reason, what; `list --all` and `show ID` print the audit records. A retry that was interrupted \
(Ctrl-C, kill) is finished, or undone, by the next run on its entry.";

/// The text shown under `--help` of `anomalies`.
pub const ANOMALIES_EXIT_HELP: &str = "Exit codes: 0 listed; 2 no journal yet (the agent has not \
run); 64 usage error; 69 the journal cannot be read; 78 configuration error. Read only: nothing \
is changed, nothing audited.";

/// A duration as the user wrote it (`90d`), kept for messages and audit records, and parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Age {
    /// The text given.
    pub text: String,
    /// Its value.
    pub duration: std::time::Duration,
}

impl Age {
    /// Parses `text` as a humantime duration (`30d`, `12h`, `0s`).
    pub fn parse(text: &str) -> Result<Age, humantime::DurationError> {
        Ok(Age {
            text: text.trim().to_string(),
            duration: humantime::parse_duration(text)?,
        })
    }
}

/// `--config FILE`, shared by the commands that read the configuration.
#[derive(Debug, Args)]
pub struct ConfigFile {
    /// The configuration file.
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        env = "DROPSCAN_CONFIG",
        default_value = "/etc/dropscan/dropscan.toml"
    )]
    pub path: PathBuf,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent until SIGINT/SIGTERM.
    Run {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Scan the given files and folders and report, moving nothing; without PATH, scan what is
    /// in the inboxes now and sort it, then exit. Exit 0: everything clean; 1: something was
    /// detected; 2: something failed; 64: usage error; 75 (inboxes only; `scan PATH` takes no
    /// lock and runs beside the agent): another agent holds the state folder.
    Scan {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// Files or folders to scan (folders recursively; symbolic links are never followed).
        /// Nothing is moved.
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// With PATH: print one JSON document (per-file results and totals) on stdout.
        #[arg(long, requires = "paths")]
        json: bool,
        /// Give up after this long (exit 69), e.g. "30m"; default: wait as long as it takes.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_time: Option<std::time::Duration>,
    },
    /// Try dropscan end to end on this machine: the built-in emulator, fresh certificates, and
    /// ./dropscan-demo/{inbox,clean,quarantine,failed}.
    Demo {
        /// Folder for the demo (created if missing).
        #[arg(long, default_value = "dropscan-demo")]
        dir: PathBuf,
        /// Results polling period of the demo agent.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        poll_interval: std::time::Duration,
        /// Quiet time before a dropped file counts as complete.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        settle: std::time::Duration,
        /// Stop after this many files were placed (0: run until Ctrl-C).
        #[arg(long, default_value_t = 0)]
        exit_after: u64,
    },
    /// Run the built-in KATA emulator (for demos and integration tests).
    Emulate(crate::emulator::EmulateArgs),
    /// Validate the configuration, connect to KATA and print its restrictions.
    Check {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// Validate the file only; do not connect.
        #[arg(long)]
        offline: bool,
    },
    /// Delete every scan result of this sensor on the server (all instances!: the request names
    /// no sensorInstanceId). An administrator's clean-up after decommissioning; never needed in
    /// normal operation. Without --yes: exit 64, nothing deleted.
    PurgeResults {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// Confirm: results of every agent sharing this sensorId are deleted.
        #[arg(long)]
        yes: bool,
    },
    /// Files in quarantine: list, show, release a false positive, restore for analysis, purge.
    /// Reads the journal; works while the agent runs; every action is audited.
    #[command(after_help = QUARANTINE_EXIT_HELP)]
    Quarantine {
        /// What to do.
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// Files in failed: list, show, retry (back into the pipeline), purge.
    /// Reads the journal; works while the agent runs; every action is audited.
    #[command(after_help = FAILED_EXIT_HELP)]
    Failed {
        /// What to do.
        #[command(subcommand)]
        action: FailedAction,
    },
    /// Verdicts the server contradicted after the file was released as clean (`not detected`,
    /// later `detect`): which file, where it was placed, which scan. Reads the journal; works
    /// while the agent runs.
    #[command(after_help = ANOMALIES_EXIT_HELP)]
    Anomalies {
        /// What to do.
        #[command(subcommand)]
        action: AnomaliesAction,
    },
    /// Show what the journal holds: counts per state, the oldest pending file, the last errors.
    Status {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Write shell completions or man pages into a folder (for packagers; see
    /// `packaging/build-deb`).
    #[command(hide = true)]
    Generate {
        /// What to write.
        what: Generated,
        /// The folder to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// What `dropscan generate` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Generated {
    /// `dropscan.bash`, `_dropscan` (zsh) and `dropscan.fish`.
    Completions,
    /// `dropscan.1` and one `dropscan-COMMAND.1` per subcommand.
    Man,
}

/// `dropscan quarantine …`.
#[derive(Debug, Subcommand)]
pub enum QuarantineAction {
    /// The files in quarantine: id, when, original root and path, current path, size,
    /// SHA-256, verdict, scanIds.
    List {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// One JSON array.
        #[arg(long)]
        json: bool,
        /// Also released, restored and purged entries, with their audit records.
        #[arg(long)]
        all: bool,
    },
    /// One entry with its audit records.
    Show {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// The entry's id (from `list`).
        id: i64,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Release a false positive: a verified copy (the bytes must still have the quarantined
    /// SHA-256) goes to the clean folder at the original relative path; the quarantined file
    /// is removed.
    Release {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// The entry's id (from `list`).
        id: i64,
        /// Why (kept in the audit record).
        #[arg(long)]
        reason: String,
    },
    /// Move a file out of quarantine to where an analyst wants it (a verified copy, mode
    /// 0600; never replaces an existing file).
    Restore {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// The entry's id (from `list`).
        id: i64,
        /// Destination file, or an existing folder (the original name is kept).
        #[arg(long, value_name = "PATH")]
        to: PathBuf,
        /// Why (kept in the audit record).
        #[arg(long)]
        reason: String,
    },
    /// Delete quarantined files placed longer ago than DURATION (with their sidecars).
    Purge {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// e.g. "30d"; "0s" for everything.
        #[arg(long, value_name = "DURATION", value_parser = Age::parse)]
        older_than: Age,
        /// Confirm the deletion (without it: a dry run listing what would go).
        #[arg(long)]
        yes: bool,
        /// Why (kept in the audit records); default: "older than DURATION".
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `dropscan anomalies …`.
#[derive(Debug, Subcommand)]
pub enum AnomaliesAction {
    /// Every recorded anomaly: id, when, original root and path, where it was placed in clean,
    /// SHA-256, scanId, the verdict it was released on and the one contradicting it.
    List {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// `dropscan failed …`.
#[derive(Debug, Subcommand)]
pub enum FailedAction {
    /// The files in failed: id, when, original root and path, current path, size, reason.
    List {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// One JSON array.
        #[arg(long)]
        json: bool,
        /// Also retried and purged entries, with their audit records.
        #[arg(long)]
        all: bool,
    },
    /// One entry with its audit records.
    Show {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// The entry's id (from `list`).
        id: i64,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put failed files back into their inbox at their original path: the agent scans them
    /// again as new drops (after an outage, or a raised size limit).
    Retry {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// The entry's id (from `list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Every file in failed.
        #[arg(long)]
        all: bool,
        /// Why (kept in the audit records); default: "retry".
        #[arg(long)]
        reason: Option<String>,
    },
    /// Delete failed files placed longer ago than DURATION (with their sidecars).
    Purge {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// e.g. "30d"; "0s" for everything.
        #[arg(long, value_name = "DURATION", value_parser = Age::parse)]
        older_than: Age,
        /// Confirm the deletion (without it: a dry run listing what would go).
        #[arg(long)]
        yes: bool,
        /// Why (kept in the audit records); default: "older than DURATION".
        #[arg(long)]
        reason: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
