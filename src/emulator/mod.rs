//! The built-in KATA emulator: a stand-in for the scanner API, for demos, tests and users' own
//! integration tests (`dropscan emulate`).
//!
//! It speaks the five endpoints of `/kata/scanner/v1/sensors/{sensorId}/…` over HTTPS with a
//! mandatory client certificate, keeps an authorization table keyed by (sensorId, client
//! certificate SHA-256), enforces `maxObjectSize` (413) and the number of scans in `processing`
//! (429), and reports `detect` for the EICAR test string or a configured SHA-256, `not detected`
//! otherwise, after a configurable delay. For tests it injects faults (429/500 answers, dropped
//! connections, slow answers, `error`/`timeout` verdicts) and exposes its state through
//! [`SharedState`]. The behaviour where the docs are silent is the one of
//! `shared/kata-scanner-api.md` ("The built-in emulator").
//!
//! Layout: `certs.rs` (CA, server and client certificates), `state/` (settings and counters,
//! the authorization table, scans and verdicts), `server/` (TLS listener, routing, handlers,
//! multipart form), `cli.rs` (`dropscan emulate`).
//! It knows nothing of the dropscan pipeline or of the client in `kata/`.
//!
//! Choices the docs leave open: a sensorId that is not a UUID gets **400** (a malformed request,
//! permanent for the client) before any authorization; a path outside the API gets 404, a known
//! path with another method 405.
//!
//! Tolerance towards third-party clients and servers:
//! - `sensorInstanceId` is read from the query (the documented place) and, on POST only when
//!   the query lacks it, from a form field of that name, so a client that sends it in the form
//!   sees its scans in its own results;
//! - `DELETE …/scans/{scanId}` and `GET …/scans/filters` work with and without
//!   `?sensorInstanceId=` (it is ignored there);
//! - `DELETE …/scans` deletes every result of the sensor; with `?sensorInstanceId=` (not in the
//!   documented syntax) only that instance's, as a server scoping results per instance would
//!   read it, so that a client asking for "all" is seen to ask for all;
//! - a form with two `scanId`, `objectType`, `content` or `sensorInstanceId` parts is a
//!   **400 malformed form**: which part would be scanned is ambiguous, so none is;
//! - `no_filters_route` (`--no-filters-route`) answers 404 or 405 on `GET …/scans/filters`, as
//!   KATA versions without that route do.

mod certs;
mod cli;
mod server;
mod state;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub use certs::{
    CA_CERT_FILE, CA_KEY_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, CertBundle, SERVER_CERT_FILE,
    SERVER_KEY_FILE,
};
pub use cli::{EmulateArgs, run_cli};
pub use server::{Emulator, EmulatorHandle, RequestCounts};
pub use state::{Authorization, InjectedVerdict, ScanInfo, ScanState, SharedState, Stats};

/// Default `maxObjectSize` reported and enforced: 100 MiB.
pub const DEFAULT_MAX_OBJECT_SIZE: i64 = 100 * 1024 * 1024;

/// Body shape of `GET …/scans/state` answers; the client must accept both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ResultShape {
    /// `{"scans":[{"scanId":"..","state":"processing"}]}`, as seen in code (default).
    #[default]
    ScansObject,
    /// `[{"scanId":17,"state":["detect"]}]`, as the docs' pseudo-struct says: a scanId that is
    /// an integer (digits, no leading zero) is sent as a JSON number, any other as a string.
    DocArray,
}

/// Fault injection: each share is a probability in `0.0..=1.0`, rolled per request (or per scan
/// for the verdict shares). `Default` is no faults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Share of requests answered 500.
    pub http_500_share: f64,
    /// Share of POSTs answered 429.
    pub http_429_share: f64,
    /// Share of requests whose connection is closed without an answer.
    pub drop_share: f64,
    /// Share of requests delayed by `slow_delay` before being handled.
    pub slow_share: f64,
    /// The delay of a slow request.
    pub slow_delay: Duration,
    /// Share of scans that end with `error`.
    pub error_verdict_share: f64,
    /// Share of scans that end with `timeout`.
    pub timeout_verdict_share: f64,
    /// `Retry-After` header value sent with every 429 and 500 answer (seconds such as `30`, or
    /// an HTTP-date); `None` sends none.
    pub retry_after: Option<String>,
}

/// How an emulator instance behaves. Every field can also be changed at run time through
/// [`SharedState`].
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Address to listen on; `127.0.0.1:0` in tests.
    pub listen: SocketAddr,
    /// Accept new (sensorId, certificate) pairs without an administrator (default true).
    pub auto_accept: bool,
    /// Maximum object size in bytes; `<= 0` = no limit (reported as-is by `/scans/filters`).
    pub max_object_size: i64,
    /// Maximum number of scans in `processing` per sensor; 429 beyond. `None` (default): no limit.
    pub max_scans: Option<usize>,
    /// Time from the end of an upload to its verdict (default zero: the verdict is immediate).
    pub scan_delay: Duration,
    /// When set and longer than `scan_delay`, each scan takes a time drawn uniformly from
    /// `scan_delay..=scan_delay_max` instead (a realistic sandbox: e.g. 30 s to 120 s).
    pub scan_delay_max: Option<Duration>,
    /// Contents (by SHA-256) reported as `detect`, besides those holding the EICAR string.
    pub detect_sha256: HashSet<[u8; 32]>,
    /// Body shape of `GET …/scans/state` answers.
    pub shape: ResultShape,
    /// Fault injection.
    pub faults: Faults,
    /// Reported in `/scans/filters`.
    pub version: String,
    /// When set (404 or 405), `GET …/scans/filters` answers this status after authorization,
    /// as KATA versions without that route do.
    pub no_filters_route: Option<u16>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            auto_accept: true,
            max_object_size: DEFAULT_MAX_OBJECT_SIZE,
            max_scans: None,
            scan_delay: Duration::ZERO,
            scan_delay_max: None,
            detect_sha256: HashSet::new(),
            shape: ResultShape::default(),
            faults: Faults::default(),
            version: concat!("dropscan-emulator ", env!("CARGO_PKG_VERSION")).to_owned(),
            no_filters_route: None,
        }
    }
}

/// What can go wrong starting the emulator or handling its certificates.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// Generating or signing a certificate failed.
    #[error("cannot {about}: {source}")]
    Cert {
        /// What was being done.
        about: &'static str,
        /// The rcgen error.
        source: rcgen::Error,
    },
    /// A PEM text did not hold what it should.
    #[error("invalid PEM: {about}")]
    Pem {
        /// Which PEM (CA certificate, server key, …).
        about: &'static str,
    },
    /// Reading or writing a certificate file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}
