//! The two severities of failure.
//!
//! A [`FatalError`] stops the daemon (bad config, journal cannot open, watcher cannot start) and
//! maps to an exit code a service manager can act on. A failure of one file is never fatal: the
//! stage that meets it journals a `failed` decision with the reason and goes on; such errors
//! never travel up through `?` out of a stage.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::ConfigError;
use crate::journal::JournalError;
use crate::kata::ApiError;

/// The exit-code table, in one place.
///
/// | code | meaning |
/// |---|---|
/// | 0 | ok (`scan`: everything clean) |
/// | 1 | `scan`: something was quarantined |
/// | 2 | `scan`: something failed; the quarantine and failed tools: the action was refused |
/// | 64 | usage error: the command line is wrong (clap's own errors included) |
/// | 69 | fatal runtime error, server unreachable |
/// | 75 | another agent holds the state folder's lock (`run`, `scan`): try again once it stopped |
/// | 76 | the server is not who it should be, or answers garbage |
/// | 77 | the server refuses our credentials |
/// | 78 | configuration error (systemd's `RestartPreventExitStatus=78`) |
/// | 130 | interrupted by a second signal |
pub const EXIT_OK: u8 = 0;
/// `dropscan scan`: something was quarantined.
pub const EXIT_DETECTED: u8 = 1;
/// `dropscan scan`: something failed.
pub const EXIT_FILES_FAILED: u8 = 2;
/// Usage error (sysexits EX_USAGE): an unknown option, a missing argument, a value that does
/// not parse. clap's own default for these is 2, which here means a refusal or a failed file.
pub const EXIT_USAGE: u8 = 64;
/// Interrupted (a second SIGINT/SIGTERM, or `scan` stopped by a signal).
pub const EXIT_INTERRUPTED: u8 = 130;
/// Exit code for a configuration error (sysexits EX_CONFIG); systemd's
/// `RestartPreventExitStatus=78` stops a restart loop on it.
pub const EXIT_CONFIG: u8 = 78;
/// Exit code for a fatal runtime error or an unreachable / failing server (sysexits
/// EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code: another `run` or `scan` holds the state folder's single-instance lock (sysexits
/// EX_TEMPFAIL: nothing is wrong with this one; it can run once the other stopped).
pub const EXIT_LOCKED: u8 = 75;
/// Exit code: the server refuses our credentials (401, client certificate refused).
pub const EXIT_NOPERM: u8 = 77;
/// Exit code: the server is not who it should be (untrusted certificate, pin mismatch) or
/// answers garbage (no TLS on the port, plain HTTP, unparsable answers).
pub const EXIT_PROTOCOL: u8 = 76;

/// The exit code a failed KATA call maps to: 77 refused credentials, 76 wrong server identity
/// or garbage (including a peer that does not speak TLS), 78 a client that cannot be set up,
/// 69 everything retryable (unreachable, 429, 5xx, transport).
pub fn api_exit_code(e: &ApiError) -> u8 {
    match e {
        ApiError::Unauthorized { .. } | ApiError::ClientCertRefused { .. } => EXIT_NOPERM,
        ApiError::ServerNotTrusted { .. }
        | ApiError::PinMismatch { .. }
        | ApiError::NotTls { .. }
        | ApiError::Protocol { .. }
        | ApiError::Rejected { .. } => EXIT_PROTOCOL,
        ApiError::Setup { .. } => EXIT_CONFIG,
        ApiError::TooLarge
        | ApiError::Busy { .. }
        | ApiError::Server { .. }
        | ApiError::Transport { .. }
        | ApiError::Local { .. } => EXIT_UNAVAILABLE,
    }
}

/// Why one file failed. It is journaled as the file's reason and written in its sidecar; it
/// never stops the agent (a [`FatalError`] does that).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The filesystem refused (unreadable, not a regular file, hard-linked, changed, …).
    #[error(transparent)]
    Fs(#[from] crate::fsops::FsError),
    /// Larger than the server's `maxObjectSize`, known before the upload.
    #[error("too large: {size} bytes, the server takes at most {max} bytes")]
    TooLarge {
        /// The file's size.
        size: u64,
        /// The server's limit.
        max: u64,
    },
    /// The server answered 413 to the upload.
    #[error("too large: the server refused {size} bytes (413)")]
    RefusedTooLarge {
        /// The file's size.
        size: u64,
    },
    /// The server refused the upload for good (another 4xx).
    #[error("the server refused the file ({status}): {body}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The start of the server's answer.
        body: String,
    },
    /// Every attempt ended with `error` or `timeout`.
    #[error("scan ended with {what} on each of {attempts} attempts")]
    ScanFailed {
        /// `error` or `timeout`.
        what: &'static str,
        /// Attempts made.
        attempts: u32,
    },
    /// No final answer within `scan_timeout`.
    #[error("no verdict within {} (scan {scan_id})", humantime::format_duration(*timeout))]
    NoVerdict {
        /// The configured timeout.
        timeout: std::time::Duration,
        /// The last scan.
        scan_id: crate::scanner::ScanId,
    },
    /// The staged file disappeared (removed by hand).
    #[error("vanished from staging")]
    Vanished,
}

impl FileError {
    /// Its kind, a bounded set (the `reason` label of the failure counter).
    pub fn kind(&self) -> crate::journal::FailureKind {
        use crate::journal::FailureKind as K;
        match self {
            FileError::Fs(_) => K::Filesystem,
            FileError::TooLarge { .. } | FileError::RefusedTooLarge { .. } => K::TooLarge,
            FileError::Rejected { .. } => K::Rejected,
            FileError::ScanFailed { .. } => K::ScanFailed,
            FileError::NoVerdict { .. } => K::NoVerdict,
            FileError::Vanished => K::Vanished,
        }
    }

    /// The decision to journal: this file fails with this error as its reason (`propagate`:
    /// files waiting on the same content fail with it, see [`crate::journal::Decision`]).
    pub fn decision(&self, propagate: bool) -> crate::journal::Decision {
        crate::journal::Decision::failed_as(self.kind(), self, propagate)
    }
}

/// An error that ends the daemon.
#[derive(Debug, thiserror::Error)]
pub enum FatalError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The journal cannot be used.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The protocol client cannot be built.
    #[error("cannot set up the KATA client: {0}")]
    Client(#[from] ApiError),
    /// A folder dropscan needs cannot be prepared.
    #[error("{about} {path}: {source}")]
    Io {
        /// What was being done.
        about: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A folder dropscan needs is unsafe or unusable (a symlink where a folder must be, a
    /// staging folder owned by another host, …).
    #[error("{about}: {source}")]
    Folder {
        /// What was being done.
        about: &'static str,
        /// What the filesystem said.
        source: crate::fsops::FsError,
    },
    /// A pipeline stage stopped unexpectedly.
    #[error("stage {stage} stopped unexpectedly: {detail}")]
    Stage {
        /// Its name.
        stage: &'static str,
        /// What it said.
        detail: String,
    },
}

impl FatalError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            FatalError::Config(_) => ExitCode::from(EXIT_CONFIG),
            // Two hosts, or two agents of one host, configured with one instance id, or a
            // destination others control: only the administrator can fix it, and a restart would
            // meet it again.
            FatalError::Folder {
                source:
                    crate::fsops::FsError::Owner(_)
                    | crate::fsops::FsError::StagingInUse { .. }
                    | crate::fsops::FsError::UnsafeDestination(_),
                ..
            } => ExitCode::from(EXIT_CONFIG),
            FatalError::Client(e) => ExitCode::from(api_exit_code(e)),
            _ => ExitCode::from(EXIT_UNAVAILABLE),
        }
    }
}

/// `" (<deepest cause>)"` of an error chain (e.g. "Connection refused"), when the top message
/// does not already say it.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let deepest = cur.to_string();
    if e.to_string().contains(&deepest) {
        String::new()
    } else {
        format!(" ({deepest})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_not_speaking_tls_maps_to_exit_76_not_69() {
        let not_tls = ApiError::NotTls {
            detail: "received corrupt message of type InvalidContentType".into(),
            request_lost: false,
        };
        assert_eq!(api_exit_code(&not_tls), EXIT_PROTOCOL);
        assert_eq!(
            api_exit_code(&ApiError::Busy { retry_after: None }),
            EXIT_UNAVAILABLE
        );
        assert_eq!(
            api_exit_code(&ApiError::Unauthorized {
                sensor_id: "s".into()
            }),
            EXIT_NOPERM
        );
        assert_eq!(
            api_exit_code(&ApiError::Setup { detail: "x".into() }),
            EXIT_CONFIG
        );
    }
}
