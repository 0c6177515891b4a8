//! Errors of the KATA client: [`ApiError`] classifies every failure of one API call (HTTP status,
//! TLS trust, transport, protocol, local file) so callers decide by variant, never by message;
//! [`TlsError`] covers loading the certificates and building the TLS configuration.
//!
//! Classification of `reqwest` errors lives here too: it walks the `source()` chain looking for
//! our own upload-body error (a local read failure) and for `rustls::Error` (trust problems).

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use rustls::{AlertDescription, CertificateError};

/// Longest server body excerpt kept in [`ApiError::Rejected`], in characters.
const BODY_EXCERPT_CHARS: usize = 256;

/// A failure of one call to the KATA scanner API.
#[derive(thiserror::Error, Debug)]
pub enum ApiError {
    /// 401: the sensorId is not (yet) authorized for this client certificate.
    #[error(
        "KATA answered 401 Authorization required for sensorId {sensor_id}: an administrator must \
         accept the integration request for this sensorId in the KATA web UI (External systems); \
         a changed client certificate needs a new integration"
    )]
    Unauthorized {
        /// The sensorId that was refused.
        sensor_id: String,
    },
    /// 413: the object is larger than the server's maximum object size.
    #[error("KATA answered 413: the object is larger than the maximum object size")]
    TooLarge,
    /// 429: too many simultaneous scans; try again later.
    #[error("KATA answered 429: too many simultaneous scan requests, try again later{}", after(*retry_after))]
    Busy {
        /// The server's `Retry-After`, when it sent a usable one (capped).
        retry_after: Option<Duration>,
    },
    /// 5xx: a server-side failure; try again later.
    #[error("KATA answered {status}: server error, try again later{}", after(*retry_after))]
    Server {
        /// The HTTP status code.
        status: u16,
        /// The server's `Retry-After`, when it sent a usable one (capped).
        retry_after: Option<Duration>,
    },
    /// Any other 4xx: permanent for that request.
    #[error("KATA rejected the request with {status}: {body}")]
    Rejected {
        /// The HTTP status code.
        status: u16,
        /// The start of the answer body, printable characters only.
        body: String,
    },
    /// The server certificate does not verify against the configured roots or name.
    #[error("the KATA server certificate is not trusted: {detail}")]
    ServerNotTrusted {
        /// What the verifier said.
        detail: String,
        /// Found by a handshake of our own after a connection broke under a request: the
        /// server may have taken that request (an upload is then ambiguous).
        request_lost: bool,
    },
    /// The server certificate does not have the pinned SHA-256 fingerprint.
    #[error(
        "the KATA server certificate fingerprint is sha256:{got}, the pinned one is sha256:{expected}"
    )]
    PinMismatch {
        /// The configured fingerprint, lower-case hex.
        expected: String,
        /// The fingerprint of the certificate the server presented, lower-case hex.
        got: String,
        /// Found by a handshake of our own after a connection broke under a request: the
        /// server may have taken that request (an upload is then ambiguous).
        request_lost: bool,
    },
    /// The server refused our client certificate during or right after the handshake.
    #[error(
        "the KATA server refused the client certificate ({detail}): check that it is issued by a \
         CA the server trusts and is not expired"
    )]
    ClientCertRefused {
        /// The alert or error seen.
        detail: String,
        /// Found by a handshake of our own after a connection broke under a request: the
        /// server may have taken that request (an upload is then ambiguous).
        request_lost: bool,
    },
    /// The server on the KATA port does not speak TLS: a plain-HTTP server, another service, or
    /// garbage where a TLS record was expected.
    #[error(
        "the server does not speak TLS on this port ({detail}): is it a plain-HTTP server or \
         another service? Check the port and scheme of server.url"
    )]
    NotTls {
        /// What the TLS layer said.
        detail: String,
        /// Found by a handshake of our own after a connection broke under a request: the
        /// server may have taken that request (an upload is then ambiguous).
        request_lost: bool,
    },
    /// Connecting, sending or receiving failed (refused, reset, timed out, DNS...).
    #[error("transport error talking to KATA: {source}")]
    Transport {
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered something this client cannot understand.
    #[error("unexpected answer from KATA: {detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// The client could not be set up (TLS configuration, base URL, sensorId); fix the
    /// configuration.
    #[error("cannot set up the KATA client: {detail}")]
    Setup {
        /// What is wrong.
        detail: String,
    },
    /// Reading the local file failed, or it was shorter or longer than announced.
    #[error("reading the file to upload failed: {source}")]
    Local {
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
}

/// What a failed upload means for the file: the one retry policy of the uploader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadDisposition {
    /// Larger than the server takes (413): the file fails.
    TooLarge,
    /// Refused for good (another 4xx): the file fails.
    Rejected,
    /// Reading the staged file failed or it changed: hash it again.
    Rehash,
    /// The server or the way to it failed: the file waits and is submitted again. `ambiguous`:
    /// the server may have accepted the scan before the answer was lost, so its scanId is
    /// deleted before the file is sent again under a new one.
    RetryLater {
        /// The scan may exist on the server.
        ambiguous: bool,
    },
}

impl ApiError {
    /// What a failed upload means for the file (see [`UploadDisposition`]).
    pub fn upload_disposition(&self) -> UploadDisposition {
        match self {
            ApiError::TooLarge => UploadDisposition::TooLarge,
            ApiError::Rejected { .. } => UploadDisposition::Rejected,
            ApiError::Local { .. } => UploadDisposition::Rehash,
            e => UploadDisposition::RetryLater {
                ambiguous: matches!(
                    e,
                    ApiError::Transport { .. }
                        | ApiError::Protocol { .. }
                        | ApiError::ServerNotTrusted {
                            request_lost: true,
                            ..
                        }
                        | ApiError::PinMismatch {
                            request_lost: true,
                            ..
                        }
                        | ApiError::ClientCertRefused {
                            request_lost: true,
                            ..
                        }
                        | ApiError::NotTls {
                            request_lost: true,
                            ..
                        }
                ),
            },
        }
    }

    /// The server's `Retry-After` (already capped) for 429 and 5xx answers that carried one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Busy { retry_after } | ApiError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::TooLarge => "too_large",
            ApiError::Busy { .. } => "busy",
            ApiError::Server { .. } => "server",
            ApiError::Rejected { .. } => "rejected",
            ApiError::ServerNotTrusted { .. } => "server_not_trusted",
            ApiError::PinMismatch { .. } => "pin_mismatch",
            ApiError::ClientCertRefused { .. } => "client_cert_refused",
            ApiError::NotTls { .. } => "not_tls",
            ApiError::Transport { .. } => "transport",
            ApiError::Protocol { .. } => "protocol",
            ApiError::Setup { .. } => "setup",
            ApiError::Local { .. } => "local",
        }
    }

    /// The cause in a few words, for "KATA unavailable" and "answers again" log lines: the HTTP
    /// status for an answer, the deepest error of the chain for a transport failure
    /// ("Connection refused (os error 111)"), the detail otherwise. Never empty.
    pub fn cause(&self) -> String {
        match self {
            ApiError::Unauthorized { .. } => "HTTP 401".into(),
            ApiError::TooLarge => "HTTP 413".into(),
            ApiError::Busy { .. } => "HTTP 429".into(),
            ApiError::Server { status, .. } | ApiError::Rejected { status, .. } => {
                format!("HTTP {status}")
            }
            ApiError::ServerNotTrusted { detail, .. }
            | ApiError::ClientCertRefused { detail, .. }
            | ApiError::NotTls { detail, .. }
            | ApiError::Protocol { detail }
            | ApiError::Setup { detail } => detail.clone(),
            ApiError::PinMismatch { .. } => "server certificate pin mismatch".into(),
            ApiError::Transport { source } => {
                let deepest = chain(source).last().map(ToString::to_string);
                match deepest {
                    Some(d) if !d.is_empty() => d,
                    _ => source.to_string(),
                }
            }
            ApiError::Local { source } => source.to_string(),
        }
    }

    /// This TLS failure, found by a handshake of our own after a connection broke under a
    /// request: the server may have taken that request before it ended (all its bytes sent, the
    /// answer lost), so an upload stays as ambiguous as the transport error it replaces
    /// ([`ApiError::upload_disposition`]: its scanId is deleted before the file is sent again).
    pub(crate) fn found_after_break(mut self) -> Self {
        if let ApiError::ServerNotTrusted { request_lost, .. }
        | ApiError::PinMismatch { request_lost, .. }
        | ApiError::ClientCertRefused { request_lost, .. }
        | ApiError::NotTls { request_lost, .. } = &mut self
        {
            *request_lost = true;
        }
        self
    }

    /// Builds [`ApiError::Protocol`].
    pub(crate) fn protocol(detail: impl Into<String>) -> Self {
        ApiError::Protocol {
            detail: detail.into(),
        }
    }

    /// Classifies a `reqwest` error: local read failure, TLS trust failure, or transport.
    pub(crate) fn from_reqwest(err: reqwest::Error) -> Self {
        if let Some(local) = find_in_chain::<LocalReadError>(&err) {
            return ApiError::Local {
                source: io::Error::new(local.kind, local.message.clone()),
            };
        }
        if let Some(tls) = classify_tls(&err) {
            return tls;
        }
        // TLS went through, then the peer sent something that is not HTTP (an SSH banner,
        // another protocol, random bytes): the server is not a KATA scanner API.
        if let Some(parse) = find_in_chain::<hyper::Error>(&err).filter(|h| h.is_parse()) {
            return ApiError::Protocol {
                detail: format!("the server's answer is not HTTP: {parse}"),
            };
        }
        ApiError::Transport { source: err }
    }
}

/// What a TLS failure somewhere in `err`'s chain means: the server's certificate not trusted or
/// not the pinned one, our client certificate refused, or no TLS on the port. `None` when the
/// chain holds no such failure.
pub(crate) fn classify_tls(err: &(dyn StdError + 'static)) -> Option<ApiError> {
    if let Some(pin) = find_pin_mismatch(err) {
        return Some(ApiError::PinMismatch {
            expected: pin.expected.clone(),
            got: pin.got.clone(),
            request_lost: false,
        });
    }
    if let Some(tls) = find_rustls_error(err) {
        match tls {
            rustls::Error::InvalidCertificate(_) | rustls::Error::InvalidCertRevocationList(_) => {
                return Some(ApiError::ServerNotTrusted {
                    detail: tls.to_string(),
                    request_lost: false,
                });
            }
            rustls::Error::AlertReceived(alert) if is_client_cert_alert(*alert) => {
                return Some(ApiError::ClientCertRefused {
                    detail: format!("alert received: {alert:?}"),
                    request_lost: false,
                });
            }
            // Plain HTTP ("HTTP/1.1 200 OK" read as a TLS record) or random bytes.
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. } => {
                return Some(ApiError::NotTls {
                    detail: tls.to_string(),
                    request_lost: false,
                });
            }
            _ => {}
        }
    }
    None
}

/// `" (retry after 30s)"` when the server said when to come back.
fn after(retry_after: Option<Duration>) -> String {
    retry_after.map_or_else(String::new, |d| {
        format!(" (retry after {})", humantime::format_duration(d))
    })
}

/// Alerts a server sends when it does not accept the client certificate.
fn is_client_cert_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::DecryptError
            | AlertDescription::AccessDenied
    )
}

/// Iterates an error and its sources, also looking inside `io::Error` wrappers (whose `source()`
/// skips the wrapped error itself).
fn chain<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    let mut out: Vec<&'a (dyn StdError + 'static)> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        out.push(e);
        next = match e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            Some(inner) => {
                let inner: &'a (dyn StdError + 'static) = inner;
                Some(inner)
            }
            None => e.source(),
        };
        if out.len() > 64 {
            break;
        }
    }
    out.into_iter()
}

fn find_in_chain<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    chain(err).find_map(|e| e.downcast_ref::<T>())
}

fn find_rustls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    find_in_chain::<rustls::Error>(err)
}

fn find_pin_mismatch<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a PinMismatchError> {
    if let Some(found) = find_in_chain::<PinMismatchError>(err) {
        return Some(found);
    }
    match find_rustls_error(err)? {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<PinMismatchError>()
        }
        _ => None,
    }
}

/// The pin check's verdict, carried inside `rustls::Error` so the client can classify it.
#[derive(thiserror::Error, Debug, Clone)]
#[error("pin mismatch: server certificate sha256:{got}, pinned sha256:{expected}")]
pub(crate) struct PinMismatchError {
    pub(crate) expected: String,
    pub(crate) got: String,
}

/// The upload body's error: the local file could not be read as announced.
#[derive(thiserror::Error, Debug)]
#[error("{message}")]
pub(crate) struct LocalReadError {
    pub(crate) kind: io::ErrorKind,
    pub(crate) message: String,
}

impl LocalReadError {
    pub(crate) fn new(kind: io::ErrorKind, message: impl Into<String>) -> Self {
        LocalReadError {
            kind,
            message: message.into(),
        }
    }
}

/// Keeps the start of a server answer, printable characters only, for error messages.
pub(crate) fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .take(BODY_EXCERPT_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > BODY_EXCERPT_CHARS {
        out.push('…');
    }
    out.trim().to_owned()
}

/// A failure loading the client certificate, key or CA bundle, or building the TLS configuration.
#[derive(thiserror::Error, Debug)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the {what} file {}: {source}", path.display())]
    Read {
        /// Which file: "client certificate", "client key" or "CA certificate".
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file was read but its content is unusable.
    #[error("the {what} file {} is unusable: {detail}", path.display())]
    Invalid {
        /// Which file: "client certificate", "client key" or "CA certificate".
        what: &'static str,
        /// Its path (or a label for in-memory PEM).
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The client key file can be read by users other than its owner and group.
    #[error(
        "the client key file {} is readable by other users (mode {mode:04o}): run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyReadableByOthers {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The private key does not belong to the client certificate.
    #[error(
        "the client key {} does not belong to the client certificate {}: configure the key that \
         was generated with this certificate",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// No CA was configured and the system trust store holds no usable certificate.
    #[error("no CA certificate configured and no system root certificates found: {detail}")]
    NoSystemRoots {
        /// What the loader reported.
        detail: String,
    },
    /// rustls refused the configuration (for example a key that does not match the certificate).
    #[error("cannot build the TLS configuration: {detail}")]
    Config {
        /// What rustls said.
        detail: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_dispositions_fail_only_what_the_server_refused_for_good() {
        use UploadDisposition::{Rehash, Rejected, RetryLater, TooLarge};
        let cases: Vec<(ApiError, UploadDisposition)> = vec![
            (ApiError::TooLarge, TooLarge),
            (
                ApiError::Rejected {
                    status: 400,
                    body: String::new(),
                },
                Rejected,
            ),
            (
                ApiError::Local {
                    source: io::Error::other("short read"),
                },
                Rehash,
            ),
            (
                ApiError::Busy { retry_after: None },
                RetryLater { ambiguous: false },
            ),
            (
                ApiError::Server {
                    status: 500,
                    retry_after: None,
                },
                RetryLater { ambiguous: false },
            ),
            (
                ApiError::Unauthorized {
                    sensor_id: "s".into(),
                },
                RetryLater { ambiguous: false },
            ),
            (
                ApiError::NotTls {
                    detail: "x".into(),
                    request_lost: false,
                },
                RetryLater { ambiguous: false },
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.upload_disposition(), want, "{}", e.kind());
        }
    }

    /// Issue 21: `is_retryable` (used by tests only) called 401, TLS and protocol failures
    /// final while the uploader retries them; the table now asserts the uploader's one rule for
    /// every class.
    #[test]
    fn every_error_class_has_the_uploaders_disposition() {
        use UploadDisposition::{Rehash, Rejected, RetryLater, TooLarge};
        let cases: Vec<(ApiError, UploadDisposition)> = vec![
            (
                ApiError::Unauthorized {
                    sensor_id: "s".into(),
                },
                RetryLater { ambiguous: false },
            ),
            (ApiError::TooLarge, TooLarge),
            (
                ApiError::Busy { retry_after: None },
                RetryLater { ambiguous: false },
            ),
            (
                ApiError::Server {
                    status: 500,
                    retry_after: None,
                },
                RetryLater { ambiguous: false },
            ),
            (
                ApiError::Server {
                    status: 503,
                    retry_after: Some(Duration::from_secs(3)),
                },
                RetryLater { ambiguous: false },
            ),
            (
                ApiError::NotTls {
                    detail: "x".into(),
                    request_lost: false,
                },
                RetryLater { ambiguous: false },
            ),
            (
                ApiError::Rejected {
                    status: 400,
                    body: String::new(),
                },
                Rejected,
            ),
            (
                ApiError::ServerNotTrusted {
                    detail: "x".into(),
                    request_lost: false,
                },
                RetryLater { ambiguous: false },
            ),
            (
                ApiError::PinMismatch {
                    expected: "a".into(),
                    got: "b".into(),
                    request_lost: false,
                },
                RetryLater { ambiguous: false },
            ),
            (
                ApiError::ClientCertRefused {
                    detail: "x".into(),
                    request_lost: false,
                },
                RetryLater { ambiguous: false },
            ),
            (
                ApiError::ClientCertRefused {
                    detail: "x".into(),
                    request_lost: false,
                }
                .found_after_break(),
                RetryLater { ambiguous: true },
            ),
            (ApiError::protocol("x"), RetryLater { ambiguous: true }),
            (
                ApiError::Setup { detail: "x".into() },
                RetryLater { ambiguous: false },
            ),
            (
                ApiError::Local {
                    source: io::Error::other("x"),
                },
                Rehash,
            ),
        ];
        for (err, want) in cases {
            assert_eq!(err.upload_disposition(), want, "{}", err.kind());
        }
    }

    #[test]
    fn unauthorized_message_gives_advice() {
        let msg = ApiError::Unauthorized {
            sensor_id: "abc".into(),
        }
        .to_string();
        assert!(msg.contains("abc"));
        assert!(msg.contains("External systems"));
    }

    #[test]
    fn excerpt_is_truncated_and_printable() {
        let body = format!("bad\r\n\x1b[31m{}", "x".repeat(1000));
        let ex = body_excerpt(body.as_bytes());
        assert!(!ex.chars().any(char::is_control));
        assert!(ex.chars().count() <= BODY_EXCERPT_CHARS + 1);
    }

    #[test]
    fn doubly_io_wrapped_rustls_error_is_found() {
        // As hyper-util reports a failed TLS connect: io::Error(Other, io::Error(InvalidData, ..)).
        let inner = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let outer = io::Error::other(inner);
        assert!(matches!(
            find_rustls_error(&outer),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ));
    }

    #[test]
    fn io_wrapped_rustls_error_is_found() {
        let io = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::UnknownCA),
        );
        let found = find_rustls_error(&io);
        assert!(matches!(
            found,
            Some(rustls::Error::AlertReceived(AlertDescription::UnknownCA))
        ));
    }
}
