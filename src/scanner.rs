//! The scanner seam: the four operations the pipeline asks of a scanning service, in front of
//! the concrete protocol client ([`kata`](crate::kata)). The stages, [`limits`](crate::limits)
//! and `context` name [`Scanner`] and the types re-exported here, never the
//! client (`tests/layout.rs` checks it).
//!
//! **The contract** a scanner must keep, because the journal's crash safety rests on it:
//!
//! - **A client-chosen scan id.** The pipeline makes the id ([`ScanId::generate`]) and journals
//!   it (`submitting`) *before* [`Scanner::submit`] sends a byte. A process killed mid-upload
//!   therefore knows, at the next start, which id to ask about and which to delete; a service
//!   that chose its ids itself could leave a scan nobody can name.
//! - **One list-by-state query.** [`Scanner::results`] returns every scan of this sensor in the
//!   given states in one request: the poller asks once per tick for all scans in flight,
//!   never once per file. A scan it does not list is unknown to the service.
//! - **The SHA-256 of the bytes sent.** [`Scanner::submit`] streams the file and returns the
//!   digest and length of the bytes that actually left ([`Sent`]). A verdict is used only when
//!   that digest equals the one journaled at claim time: the file cannot change under the scan.
//! - **Forget** ([`Scanner::forget`]) deletes a result once the file is placed or the scan is
//!   abandoned; "already gone" is success.
//! - **Restrictions** ([`Scanner::restrictions`]): the maximum object size, asked at start and
//!   after a "too large" refusal.
//! - **Errors are classified**, not stringified: every failure is an [`ApiError`] whose
//!   [`ApiError::upload_disposition`] and retry rule the stages act on.
//!
//! **A second scanner** would add one module beside `kata/` (its client, wire parsing and error
//! mapping into [`ApiError`]'s classes), one variant of `Backend` here with one arm in each of
//! the four operations, and its settings in `config` plus one line where `app` (and the
//! `check`/`scan` commands) build the [`Scanner`]. No stage, the journal or the limits change.
//! Its final states must map to [`ScanState`] (`detect` / `not detected` / `error` / `timeout`),
//! whose verdicts the journal stores as [`ScanVerdict`](crate::journal::ScanVerdict).

use crate::kata::KataClient;

pub use crate::kata::error::UploadDisposition;
pub use crate::kata::multipart::{Tee, UploadSource};
pub use crate::kata::{
    ApiError, DeleteOutcome, Restrictions, ScanId, ScanResult, ScanState, merge_duplicates,
};

/// What an accepted submission sent: the SHA-256 and the length of the bytes that left.
pub type Sent = crate::kata::Submitted;

/// The scanning service the pipeline talks to; cheap to clone (clones share connections).
#[derive(Clone, Debug)]
pub struct Scanner {
    backend: Backend,
}

/// The concrete services behind the seam.
#[derive(Clone, Debug)]
enum Backend {
    Kata(KataClient),
}

impl Scanner {
    /// The KATA scanner API behind the seam.
    pub fn kata(client: KataClient) -> Self {
        Scanner {
            backend: Backend::Kata(client),
        }
    }

    /// Streams `file` (exactly `len` bytes) as scan `scan_id`, an id the caller journaled
    /// before; returns the SHA-256 and length of the bytes actually sent.
    pub async fn submit(
        &self,
        scan_id: &ScanId,
        file: impl Into<UploadSource>,
        len: u64,
    ) -> Result<Sent, ApiError> {
        match &self.backend {
            Backend::Kata(c) => c.submit(scan_id, file, len).await,
        }
    }

    /// Every scan of this sensor in one of `states`, in one request.
    pub async fn results(&self, states: &[ScanState]) -> Result<Vec<ScanResult>, ApiError> {
        match &self.backend {
            Backend::Kata(c) => c.results(states).await,
        }
    }

    /// Deletes the result of `scan_id` on the service; one already gone is success.
    pub async fn forget(&self, scan_id: &ScanId) -> Result<DeleteOutcome, ApiError> {
        match &self.backend {
            Backend::Kata(c) => c.delete(scan_id).await,
        }
    }

    /// The service's restrictions (maximum object size).
    pub async fn restrictions(&self) -> Result<Restrictions, ApiError> {
        match &self.backend {
            Backend::Kata(c) => c.restrictions().await,
        }
    }

    /// The restrictions, asked as a health probe: given up after `timeout` (at most the
    /// request timeout), so that a server that never answers is found out within the probe's
    /// cadence.
    pub async fn probe(&self, timeout: std::time::Duration) -> Result<Restrictions, ApiError> {
        match &self.backend {
            Backend::Kata(c) => c.restrictions_within(timeout).await,
        }
    }
}
