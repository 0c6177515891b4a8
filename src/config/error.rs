//! The configuration error: which file, which key, which line, what is wrong.
//!
//! Owns only the error type and its rendering; where the line comes from is `spans`' business.

use std::path::PathBuf;

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is malformed, a key is unknown or missing.
    #[error("{path}: {message}")]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// The parser's message, with the line and the key.
        message: String,
    },
    /// A value is present but not acceptable (of the wrong type, or out of range).
    #[error("{path}{}: key `{key}`: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The line of the key, when it is written in the file.
        line: Option<usize>,
        /// The dotted key, e.g. `watch[0].settle`.
        key: String,
        /// What is wrong, and what would be right.
        message: String,
    },
}
