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

/// Exit code for a configuration error (sysexits EX_CONFIG); systemd's
/// `RestartPreventExitStatus=78` stops a restart loop on it.
pub const EXIT_CONFIG: u8 = 78;
/// Exit code for a fatal runtime error or an unreachable / failing server (sysexits
/// EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
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
            // Two hosts configured with one instance id: only the configuration can fix it.
            FatalError::Folder {
                source: crate::fsops::FsError::Owner(_),
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
