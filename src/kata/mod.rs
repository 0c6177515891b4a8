//! The KATA scanner API client: reqwest over rustls mutual TLS, the wire types and their
//! tolerant parsers. It knows nothing of the pipeline: no folders, no journal, no retries —
//! it sends exactly what the protocol asks (`/work/shared/kata-scanner-api.md`) and classifies
//! every failure into an [`ApiError`] for the callers to act on.
//!
//! - [`tls`]: certificates, keys, fingerprint pinning, the rustls configuration;
//! - [`wire`]: [`ScanId`], [`ScanState`], [`ScanResult`], [`Restrictions`] and their parsers,
//!   fail-closed ([`merge_duplicates`] folds a scanId reported twice, `detect` wins);
//! - [`multipart`]: the exact-length streaming upload body ([`multipart::encode_upload`] runs
//!   it in memory for fuzzing and property tests);
//! - [`client`]: [`KataClient`], URLs, status mapping, capped answers and `Retry-After`
//!   ([`parse_retry_after`]);
//! - [`error`]: [`ApiError`], [`TlsError`];
//! - `probe`: why a connection broke (a TLS refusal lost behind it), by a handshake of its own.

pub mod client;
pub mod error;
pub mod multipart;
mod probe;
pub mod tls;
pub mod wire;

pub use client::{
    AnswerObserver, ClientOptions, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_IDLE_PER_HOST,
    DEFAULT_REQUEST_TIMEOUT, DeleteOutcome, KataClient, MAX_RETRY_AFTER, Submitted,
    parse_retry_after,
};
pub use error::{ApiError, TlsError};
pub use tls::{FingerprintError, TlsOptions, parse_fingerprint};
pub use wire::{
    Contradiction, Restrictions, ScanId, ScanIdError, ScanResult, ScanState, merge_duplicates,
    parse_restrictions, parse_results,
};
