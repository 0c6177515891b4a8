//! Certificates for the emulator: a private CA, the server certificate and client certificates.
//!
//! Owns generation (rcgen, ring), the PEM files on disk (`ca.crt`, `ca.key`, `server.crt`,
//! `server.key`, `client.crt`, `client.key`) and the conversion into rustls types. It does not
//! decide who is authorized: that is the authorization table in `state.rs`.
//!
//! rcgen is built without `x509-parser`, so an issuer cannot be rebuilt from an arbitrary CA
//! certificate. Our CA always has the same subject and key-identifier method, so the issuer is
//! rebuilt from those fixed parameters plus `ca.key`: [`CertBundle::issue_client`] works for
//! bundles this module wrote, not for a foreign CA dropped into the folder.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::EmulatorError;

/// File name of the CA certificate inside a certificate folder.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the server certificate.
pub const SERVER_CERT_FILE: &str = "server.crt";
/// File name of the server private key.
pub const SERVER_KEY_FILE: &str = "server.key";
/// File name of the first client certificate.
pub const CLIENT_CERT_FILE: &str = "client.crt";
/// File name of the first client private key.
pub const CLIENT_KEY_FILE: &str = "client.key";

/// Common name of the emulator's CA; fixed so that the issuer can be rebuilt from `ca.key`.
const CA_COMMON_NAME: &str = "dropscan KATA emulator CA";
/// Common name of the first client certificate.
const DEFAULT_CLIENT_NAME: &str = "dropscan sensor";

/// A CA and the certificates it signed, all as PEM text.
#[derive(Clone)]
pub struct CertBundle {
    /// The CA certificate: the client's `ca_cert` and the server's client-certificate root.
    pub ca_cert_pem: String,
    /// The CA private key (PKCS#8).
    pub ca_key_pem: String,
    /// The server certificate, signed by the CA.
    pub server_cert_pem: String,
    /// The server private key (PKCS#8).
    pub server_key_pem: String,
    /// A client certificate, signed by the CA.
    pub client_cert_pem: String,
    /// The client private key (PKCS#8).
    pub client_key_pem: String,
}

impl std::fmt::Debug for CertBundle {
    // Keys never go to logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertBundle").finish_non_exhaustive()
    }
}

impl CertBundle {
    /// New CA, server cert (SANs: the given names + "localhost", 127.0.0.1, ::1), one client
    /// cert, all signed by the CA.
    pub fn generate(server_names: &[String]) -> Result<Self, EmulatorError> {
        let ca_key = KeyPair::generate().map_err(cert_error("generate the CA key"))?;
        let ca_cert = ca_params()
            .self_signed(&ca_key)
            .map_err(cert_error("sign the CA certificate"))?;
        let issuer = Issuer::new(ca_params(), ca_key);

        let mut names: Vec<String> = Vec::new();
        for name in server_names
            .iter()
            .map(String::as_str)
            .chain(["localhost", "127.0.0.1", "::1"])
        {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        let server_key = KeyPair::generate().map_err(cert_error("generate the server key"))?;
        let mut server_params =
            CertificateParams::new(names).map_err(cert_error("use the server names"))?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "dropscan KATA emulator");
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server_params.use_authority_key_identifier_extension = true;
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .map_err(cert_error("sign the server certificate"))?;

        let (client_cert_pem, client_key_pem) = issue_client_with(&issuer, DEFAULT_CLIENT_NAME)?;
        Ok(Self {
            ca_cert_pem: ca_cert.pem(),
            ca_key_pem: issuer.key().serialize_pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem,
            client_key_pem,
        })
    }

    /// Another client cert+key (PEM pair) signed by this bundle's CA.
    pub fn issue_client(&self, common_name: &str) -> Result<(String, String), EmulatorError> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem).map_err(cert_error("read the CA key"))?;
        let issuer = Issuer::new(ca_params(), ca_key);
        issue_client_with(&issuer, common_name)
    }

    /// Writes ca.crt, ca.key, server.crt, server.key, client.crt, client.key into dir (keys mode
    /// 0600, written to temp name then renamed).
    pub fn write_to_dir(&self, dir: &Path) -> Result<(), EmulatorError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        for (name, text, secret) in self.files() {
            write_atomically(&dir.join(name), text.as_bytes(), secret)?;
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(dir))
    }

    /// Reads the six PEM files written by [`CertBundle::write_to_dir`].
    pub fn load_from_dir(dir: &Path) -> Result<Self, EmulatorError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(io_error(&path))
        };
        let bundle = Self {
            ca_cert_pem: read(CA_CERT_FILE)?,
            ca_key_pem: read(CA_KEY_FILE)?,
            server_cert_pem: read(SERVER_CERT_FILE)?,
            server_key_pem: read(SERVER_KEY_FILE)?,
            client_cert_pem: read(CLIENT_CERT_FILE)?,
            client_key_pem: read(CLIENT_KEY_FILE)?,
        };
        // Fail now, with the folder named, rather than at the first handshake.
        bundle.ca_cert_der()?;
        bundle.server_chain()?;
        bundle.server_key()?;
        Ok(bundle)
    }

    /// load if all files exist, otherwise generate and write.
    pub fn load_or_generate(dir: &Path) -> Result<Self, EmulatorError> {
        Self::load_or_generate_for(dir, &[])
    }

    /// Like [`CertBundle::load_or_generate`], with extra server names used when generating.
    pub fn load_or_generate_for(
        dir: &Path,
        server_names: &[String],
    ) -> Result<Self, EmulatorError> {
        if Self::FILE_NAMES.iter().all(|name| dir.join(name).is_file()) {
            return Self::load_from_dir(dir);
        }
        let bundle = Self::generate(server_names)?;
        bundle.write_to_dir(dir)?;
        Ok(bundle)
    }

    /// The six file names, in the order they are written.
    pub const FILE_NAMES: [&'static str; 6] = [
        CA_CERT_FILE,
        CA_KEY_FILE,
        SERVER_CERT_FILE,
        SERVER_KEY_FILE,
        CLIENT_CERT_FILE,
        CLIENT_KEY_FILE,
    ];

    fn files(&self) -> [(&'static str, &str, bool); 6] {
        [
            (CA_CERT_FILE, &self.ca_cert_pem, false),
            (CA_KEY_FILE, &self.ca_key_pem, true),
            (SERVER_CERT_FILE, &self.server_cert_pem, false),
            (SERVER_KEY_FILE, &self.server_key_pem, true),
            (CLIENT_CERT_FILE, &self.client_cert_pem, false),
            (CLIENT_KEY_FILE, &self.client_key_pem, true),
        ]
    }

    /// The CA certificate in DER, the root the server verifies client certificates against.
    pub fn ca_cert_der(&self) -> Result<CertificateDer<'static>, EmulatorError> {
        CertificateDer::from_pem_slice(self.ca_cert_pem.as_bytes()).map_err(|_| {
            EmulatorError::Pem {
                about: "CA certificate",
            }
        })
    }

    /// The server certificate chain in DER.
    pub fn server_chain(&self) -> Result<Vec<CertificateDer<'static>>, EmulatorError> {
        let chain = CertificateDer::pem_slice_iter(self.server_cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| EmulatorError::Pem {
                about: "server certificate",
            })?;
        if chain.is_empty() {
            return Err(EmulatorError::Pem {
                about: "server certificate",
            });
        }
        Ok(chain)
    }

    /// The server private key in DER.
    pub fn server_key(&self) -> Result<PrivateKeyDer<'static>, EmulatorError> {
        PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes()).map_err(|_| {
            EmulatorError::Pem {
                about: "server key",
            }
        })
    }
}

/// The CA's parameters. Only the subject, key usages and key-identifier method reach an
/// [`Issuer`], and they are constant, which is what lets `issue_client` work after a reload.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn issue_client_with(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
) -> Result<(String, String), EmulatorError> {
    let key = KeyPair::generate().map_err(cert_error("generate a client key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(cert_error("sign a client certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Temp name, fsync, rename: a reader never sees half a key. Keys are created 0600 so they are
/// never readable by others, not even between create and chmod.
fn write_atomically(path: &Path, bytes: &[u8], secret: bool) -> Result<(), EmulatorError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_error(&tmp))?;
    // The certificate folder is the emulator's own, not a pipeline folder: no EXDEV case (temp
    // file and target share the folder), and the folder is fsynced by the caller.
    #[allow(clippy::disallowed_methods)]
    fs::rename(&tmp, path).map_err(io_error(path))
}

fn cert_error(about: &'static str) -> impl FnOnce(rcgen::Error) -> EmulatorError {
    move |source| EmulatorError::Cert { about, source }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> EmulatorError + '_ {
    move |source| EmulatorError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_load_round_trip_and_key_modes() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = CertBundle::generate(&["kata.example".to_owned()]).unwrap();
        bundle.write_to_dir(dir.path()).unwrap();
        let loaded = CertBundle::load_from_dir(dir.path()).unwrap();
        assert_eq!(loaded.ca_cert_pem, bundle.ca_cert_pem);
        assert_eq!(loaded.client_key_pem, bundle.client_key_pem);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = CertBundle::load_or_generate(dir.path()).unwrap();
        assert_eq!(again.server_cert_pem, bundle.server_cert_pem);
        // A reloaded CA can still issue.
        let (cert, key) = loaded.issue_client("second").unwrap();
        assert!(cert.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"));
    }
}
