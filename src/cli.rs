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
    /// detected; 2: something failed; 75: another agent holds the state folder.
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
    /// Delete every scan result of this sensor on the server (all instances!). An administrator's
    /// clean-up after decommissioning; never needed in normal operation.
    PurgeResults {
        /// `--config FILE`.
        #[command(flatten)]
        config: ConfigFile,
        /// Confirm: results of every agent sharing this sensorId are deleted.
        #[arg(long)]
        yes: bool,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
