//! TLS for the KATA client: loads the client certificate, key and optional CA bundle from PEM,
//! and builds the rustls `ClientConfig` (ring provider, TLS 1.2+, client authentication,
//! HTTP/1.1 ALPN) with our server verifier.
//!
//! Server trust, in order of configuration:
//! - a CA bundle: chain and name verification against it;
//! - a CA bundle and a pin: both, and the leaf's SHA-256 must equal the pin;
//! - a pin without CA: the pin alone authenticates the server (KATA nodes often present
//!   self-signed certificates); handshake signatures are still verified;
//! - neither: the system roots.
//!
//! There is deliberately no way to switch verification off. Key material is never logged.
//!
//! Loading also checks the client credentials: a key file readable by other users is refused
//! (group-readable only warns), checked on the opened file's `fstat`; a key that does not belong
//! to the certificate is refused naming both files. [`TlsOptions::client_cert_not_after`] gives
//! the certificate's expiry for `check`, the start-up warning and the metrics.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, InconsistentKeys, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

use super::error::{PinMismatchError, TlsError};

const WHAT_CERT: &str = "client certificate";
const WHAT_KEY: &str = "client key";
const WHAT_CA: &str = "CA certificate";

/// Everything needed to authenticate both ends of the TLS connection.
pub struct TlsOptions {
    /// The client certificate chain, leaf first.
    pub client_chain: Vec<CertificateDer<'static>>,
    /// The client private key.
    pub client_key: PrivateKeyDer<'static>,
    /// CA certificates that issue the server certificate; `None` means the system roots
    /// (or the pin alone when `server_pin` is set).
    pub ca_roots: Option<Vec<CertificateDer<'static>>>,
    /// SHA-256 of the server's leaf certificate (DER).
    pub server_pin: Option<[u8; 32]>,
    /// A problem found while loading that does not stop it (a group-readable key): logged
    /// then, and again by [`warn_at_start`] and `check`, since configuration loads before
    /// logging is set up.
    pub load_warning: Option<String>,
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("client_chain_len", &self.client_chain.len())
            .field("client_key", &"<redacted>")
            .field("ca_roots_len", &self.ca_roots.as_ref().map(Vec::len))
            .field("server_pin", &self.server_pin.map(hex::encode))
            .finish()
    }
}

impl Clone for TlsOptions {
    fn clone(&self) -> Self {
        TlsOptions {
            client_chain: self.client_chain.clone(),
            client_key: self.client_key.clone_key(),
            ca_roots: self.ca_roots.clone(),
            server_pin: self.server_pin,
            load_warning: self.load_warning.clone(),
        }
    }
}

impl TlsOptions {
    /// Reads PEM files: chain (>=1 cert), key (PKCS#8/PKCS#1/SEC1), optional CA bundle (>=1 cert);
    /// errors say which file and what is wrong.
    pub fn from_pem_files(
        client_cert: &Path,
        client_key: &Path,
        ca_cert: Option<&Path>,
        server_pin: Option<[u8; 32]>,
    ) -> Result<Self, TlsError> {
        let read = |what: &'static str, path: &Path| {
            fs::read(path).map_err(|source| TlsError::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(WHAT_CERT, client_cert)?;
        let (key_pem, load_warning) = read_private_file(client_key)?;
        let ca_pem = ca_cert.map(|p| read(WHAT_CA, p)).transpose()?;
        let opts = TlsOptions {
            client_chain: parse_certs(WHAT_CERT, client_cert, &cert_pem)?,
            client_key: parse_key(client_key, &key_pem)?,
            ca_roots: match (ca_cert, ca_pem) {
                (Some(path), Some(pem)) => Some(parse_certs(WHAT_CA, path, &pem)?),
                _ => None,
            },
            server_pin,
            load_warning,
        };
        opts.check_key_matches(client_cert, client_key)?;
        Ok(opts)
    }

    /// Refuses a key that does not belong to the leaf certificate (their public keys differ).
    /// A key whose public half rustls cannot derive is let through: the handshake decides.
    fn check_key_matches(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        let signing = rustls::crypto::ring::sign::any_supported_type(&self.client_key)
            .map_err(|e| invalid(WHAT_KEY, key, format!("unsupported key: {e}")))?;
        match CertifiedKey::new(self.client_chain.clone(), signing).keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(()),
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
                Err(TlsError::KeyMismatch {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                })
            }
            Err(e) => Err(invalid(WHAT_CERT, cert, e.to_string())),
        }
    }

    /// The leaf client certificate's notAfter, in Unix seconds; `None` when it cannot be
    /// parsed.
    pub fn client_cert_not_after(&self) -> Option<i64> {
        let leaf = self.client_chain.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        Some(cert.validity().not_after.timestamp())
    }

    /// Same as [`TlsOptions::from_pem_files`] from PEM text in memory (tests, generated
    /// certificates); errors name the file as `<memory>`.
    pub fn from_pem(
        client_cert: &[u8],
        client_key: &[u8],
        ca_cert: Option<&[u8]>,
        server_pin: Option<[u8; 32]>,
    ) -> Result<Self, TlsError> {
        let mem = Path::new("<memory>");
        let opts = TlsOptions {
            client_chain: parse_certs(WHAT_CERT, mem, client_cert)?,
            client_key: parse_key(mem, client_key)?,
            ca_roots: ca_cert
                .map(|pem| parse_certs(WHAT_CA, mem, pem))
                .transpose()?,
            server_pin,
            load_warning: None,
        };
        opts.check_key_matches(mem, mem)?;
        Ok(opts)
    }
}

/// Below this many days left, the client certificate's expiry is warned about.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Whole days from `now` to `not_after` (Unix seconds), rounded down; negative once expired.
pub fn days_left(not_after: i64, now: SystemTime) -> i64 {
    let now = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    not_after.saturating_sub(now).div_euclid(86_400)
}

/// Unix seconds as RFC 3339 (`2027-01-01T00:00:00Z`); dates before 1970 print as the epoch.
pub fn format_unix(secs: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// The advice for a certificate with `days` left (negative: expired).
pub fn expiry_warning(days: i64) -> String {
    if days < 0 {
        format!(
            "the client certificate expired {} days ago: issue a new one (the server will refuse this one; a new certificate needs a new integration in KATA)",
            -days
        )
    } else {
        format!(
            "the client certificate expires in {days} days: issue a new one before then (a new certificate needs a new integration in KATA)"
        )
    }
}

/// At agent start (logging is set up by then): repeats the load warning (a group-readable key),
/// logs a warning when the client certificate expires within [`EXPIRY_WARNING_DAYS`] (or has
/// expired), and returns its notAfter (Unix seconds) for the metrics.
pub fn warn_at_start(opts: &TlsOptions) -> Option<i64> {
    if let Some(warning) = &opts.load_warning {
        tracing::warn!("{warning}");
    }
    let not_after = opts.client_cert_not_after()?;
    let days = days_left(not_after, SystemTime::now());
    if days < EXPIRY_WARNING_DAYS {
        tracing::warn!(
            not_after = %format_unix(not_after),
            days_left = days,
            "{}",
            expiry_warning(days)
        );
    }
    Some(not_after)
}

/// Reads the client key after checking, on the opened file's `fstat` (no window between check
/// and read), that other users cannot read it; group-readable only warns (logged and returned).
fn read_private_file(path: &Path) -> Result<(Vec<u8>, Option<String>), TlsError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let read_err = |source| TlsError::Read {
        what: WHAT_KEY,
        path: path.to_owned(),
        source,
    };
    let mut file = fs::File::open(path).map_err(read_err)?;
    let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(TlsError::KeyReadableByOthers {
            path: path.to_owned(),
            mode,
        });
    }
    let warning = (mode & 0o070 != 0).then(|| {
        format!(
            "the client key file {} is readable by its group (mode {mode:04o}): run `chmod 600 {}` unless that group needs it",
            path.display(),
            path.display()
        )
    });
    if let Some(w) = &warning {
        tracing::warn!("{w}");
    }
    let mut pem = Vec::new();
    file.read_to_end(&mut pem).map_err(read_err)?;
    Ok((pem, warning))
}

fn invalid(what: &'static str, path: &Path, detail: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        what,
        path: PathBuf::from(path),
        detail: detail.into(),
    }
}

fn parse_certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            what,
            path,
            "no \"BEGIN CERTIFICATE\" block found (expected PEM)",
        ));
    }
    Ok(certs)
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The error text of the PEM reader never contains key bytes (markers and base64 errors
    // only).
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(key) => Ok(key),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(invalid(
            WHAT_KEY,
            path,
            "no private key block found (expected PEM PKCS#8, PKCS#1 or SEC1; encrypted keys are not supported)",
        )),
        Err(e) => Err(invalid(WHAT_KEY, path, format!("bad PEM: {e}"))),
    }
}

/// Why a configured fingerprint does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    /// Not 64 hex digits once the prefix and separators are taken away.
    #[error("a SHA-256 fingerprint has 64 hex digits, found {found} in {given:?}")]
    Length {
        /// Digits found.
        found: usize,
        /// The value as given.
        given: String,
    },
    /// 64 characters, but not all hex digits.
    #[error("not a hex digit in fingerprint {given:?}")]
    NotHex {
        /// The value as given.
        given: String,
    },
}

/// Parses a SHA-256 fingerprint: `sha256:HEX`, bare `HEX`, or hex with `:` (or space)
/// separators, in any case.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], FingerprintError> {
    let trimmed = s.trim();
    let body = match trimmed.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &trimmed[7..],
        _ => trimmed,
    };
    let digits: Vec<u8> = body.bytes().filter(|b| !matches!(b, b':' | b' ')).collect();
    if digits.len() != 64 {
        return Err(FingerprintError::Length {
            found: digits.len(),
            given: s.to_string(),
        });
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(&digits, &mut out).map_err(|_| FingerprintError::NotHex {
        given: s.to_string(),
    })?;
    Ok(out)
}

/// The ring provider, the only one this crate uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client configuration for `opts` (HTTP/1.1 ALPN).
pub(crate) fn client_config(opts: &TlsOptions) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = KataServerVerifier::new(opts, provider.clone())?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| TlsError::Config {
            detail: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(opts.client_chain.clone(), opts.client_key.clone_key())
        .map_err(|e| TlsError::Config {
            detail: format!("client certificate and key: {e}"),
        })?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn roots_from(certs: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert.clone()).map_err(|e| TlsError::Invalid {
            what: WHAT_CA,
            path: PathBuf::from("<CA bundle>"),
            detail: format!("a certificate is not a usable trust anchor: {e}"),
        })?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        let detail = loaded
            .errors
            .first()
            .map_or_else(|| "the store is empty".to_owned(), ToString::to_string);
        return Err(TlsError::NoSystemRoots { detail });
    }
    Ok(roots)
}

/// Chain verification (when roots apply) plus the optional leaf pin.
#[derive(Debug)]
struct KataServerVerifier {
    /// `None` in pin-only mode.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    pin: Option<[u8; 32]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl KataServerVerifier {
    fn new(opts: &TlsOptions, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let algorithms = provider.signature_verification_algorithms;
        let roots = match (&opts.ca_roots, opts.server_pin) {
            (Some(ca), _) => Some(roots_from(ca)?),
            (None, Some(_)) => None,
            (None, None) => Some(system_roots()?),
        };
        let webpki = roots
            .map(|roots| {
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| TlsError::Config {
                        detail: e.to_string(),
                    })
            })
            .transpose()?;
        Ok(KataServerVerifier {
            webpki,
            pin: opts.server_pin,
            algorithms,
        })
    }
}

impl ServerCertVerifier for KataServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The pin is checked first: a mismatch names the fingerprint the user may want to pin.
        if let Some(pin) = self.pin {
            let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
            if got != pin {
                let mismatch = PinMismatchError {
                    expected: hex::encode(pin),
                    got: hex::encode(got),
                };
                return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    rustls::OtherError(Arc::new(mismatch)),
                )));
            }
        }
        match &self.webpki {
            Some(webpki) => webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            // Pin-only mode: the pin matched above, and `new` guarantees a pin without roots.
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
