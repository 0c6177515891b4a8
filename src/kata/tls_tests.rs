//! Unit tests of `kata::tls`.

use super::*;

const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn expected() -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef][i % 8];
    }
    out
}

#[test]
fn fingerprint_forms() {
    let colons: String = HEX
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    for s in [
        HEX.to_owned(),
        HEX.to_uppercase(),
        format!("sha256:{HEX}"),
        format!("SHA256:{}", HEX.to_uppercase()),
        colons.clone(),
        format!("sha256:{colons}"),
        format!("  {HEX} "),
    ] {
        assert_eq!(parse_fingerprint(&s), Ok(expected()), "{s}");
    }
}

#[test]
fn fingerprint_errors() {
    assert!(parse_fingerprint("").is_err());
    assert!(parse_fingerprint(&HEX[..62]).is_err());
    assert!(parse_fingerprint(&format!("{HEX}00")).is_err());
    assert!(parse_fingerprint(&format!("{}zz", &HEX[..62])).is_err());
    assert!(parse_fingerprint("sha1:0123").is_err());
    // Multi-byte characters must not panic the prefix slicing.
    assert!(parse_fingerprint("ééééé").is_err());
}

#[test]
fn pem_errors_name_the_file() {
    let err = TlsOptions::from_pem(b"not pem", b"", None, None).unwrap_err();
    assert!(err.to_string().contains("client certificate"), "{err}");
    let missing = TlsOptions::from_pem_files(
        Path::new("/nonexistent/cert.pem"),
        Path::new("/nonexistent/key.pem"),
        None,
        None,
    )
    .unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/cert.pem"),
        "{missing}"
    );
}

#[test]
fn debug_redacts_the_key() {
    let opts = TlsOptions {
        client_chain: vec![],
        client_key: PrivateKeyDer::Pkcs8(vec![0x42; 16].into()),
        ca_roots: None,
        server_pin: None,
        load_warning: None,
    };
    let dbg = format!("{opts:?}");
    assert!(dbg.contains("redacted"));
    assert!(!dbg.contains("66"));
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn client_key_readable_by_others_is_refused_with_chmod_advice() {
    let dir = tempfile::tempdir().unwrap();
    let certs = crate::emulator::CertBundle::generate(&[]).unwrap();
    let cert = dir.path().join("client.crt");
    let key = dir.path().join("client.key");
    fs::write(&cert, &certs.client_cert_pem).unwrap();
    for mode in [0o644, 0o604, 0o601, 0o602, 0o666] {
        write_mode(&key, certs.client_key_pem.as_bytes(), mode);
        let err = TlsOptions::from_pem_files(&cert, &key, None, None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TlsError::KeyReadableByOthers { .. }), "{msg}");
        assert!(
            msg.contains(&format!("chmod 600 {}", key.display())),
            "{msg}"
        );
    }
    // Group-readable only warns; owner-only is fine.
    write_mode(&key, certs.client_key_pem.as_bytes(), 0o640);
    let opts = TlsOptions::from_pem_files(&cert, &key, None, None).unwrap();
    let warning = opts.load_warning.unwrap();
    assert!(warning.contains("readable by its group"), "{warning}");
    for mode in [0o600, 0o400] {
        write_mode(&key, certs.client_key_pem.as_bytes(), mode);
        let opts = TlsOptions::from_pem_files(&cert, &key, None, None).unwrap();
        assert_eq!(opts.load_warning, None);
    }
}

#[test]
fn client_key_of_another_certificate_is_refused_naming_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut certs = crate::emulator::CertBundle::generate(&[]).unwrap();
    let (other_cert, _other_key) = certs.issue_client("other").unwrap();
    certs.client_cert_pem = other_cert;
    let cert = dir.path().join("client.crt");
    let key = dir.path().join("client.key");
    fs::write(&cert, &certs.client_cert_pem).unwrap();
    write_mode(&key, certs.client_key_pem.as_bytes(), 0o600);
    let err = TlsOptions::from_pem_files(&cert, &key, None, None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{msg}");
    assert!(msg.contains(&cert.display().to_string()), "{msg}");
    assert!(msg.contains(&key.display().to_string()), "{msg}");
    let mem = TlsOptions::from_pem(
        certs.client_cert_pem.as_bytes(),
        certs.client_key_pem.as_bytes(),
        None,
        None,
    )
    .unwrap_err();
    assert!(matches!(mem, TlsError::KeyMismatch { .. }), "{mem}");
}

#[test]
fn client_cert_expiry_is_read_and_counted_in_days() {
    let certs = crate::emulator::CertBundle::generate(&[]).unwrap();
    let opts = TlsOptions::from_pem(
        certs.client_cert_pem.as_bytes(),
        certs.client_key_pem.as_bytes(),
        None,
        None,
    )
    .unwrap();
    let not_after = opts.client_cert_not_after().unwrap();
    assert!(not_after > 1_700_000_000, "{not_after}");
    let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
    assert_eq!(days_left(86_400 * 10, at(0)), 10);
    assert_eq!(days_left(86_400 * 10, at(86_400 * 10 - 1)), 0);
    assert_eq!(days_left(86_400 * 10, at(86_400 * 10 + 1)), -1);
    assert_eq!(format_unix(0), "1970-01-01T00:00:00Z");
    assert!(expiry_warning(-3).contains("expired 3 days ago"));
    assert!(expiry_warning(12).contains("expires in 12 days"));
}

#[test]
fn pem_sections_are_picked_by_kind_and_bad_pem_is_named() {
    let certs = crate::emulator::CertBundle::generate(&[]).unwrap();
    // Key and certificate in one file: each reader takes its own section.
    let both = format!("{}{}", certs.client_key_pem, certs.client_cert_pem);
    let opts = TlsOptions::from_pem(both.as_bytes(), both.as_bytes(), None, None).unwrap();
    assert_eq!(opts.client_chain.len(), 1);

    let no_key = TlsOptions::from_pem(
        certs.client_cert_pem.as_bytes(),
        certs.client_cert_pem.as_bytes(),
        None,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(no_key.contains("no private key block found"), "{no_key}");
    assert!(no_key.contains("<memory>"), "{no_key}");

    let truncated = b"-----BEGIN CERTIFICATE-----\nMIIB\n";
    let err = TlsOptions::from_pem(truncated, certs.client_key_pem.as_bytes(), None, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("client certificate") && err.contains("bad PEM"),
        "{err}"
    );

    let no_cert = TlsOptions::from_pem(b"", certs.client_key_pem.as_bytes(), None, None)
        .unwrap_err()
        .to_string();
    assert!(no_cert.contains("BEGIN CERTIFICATE"), "{no_cert}");
}

#[test]
fn debug_renders_the_pin_as_lower_case_hex() {
    let opts = TlsOptions {
        client_chain: vec![],
        client_key: PrivateKeyDer::Pkcs8(vec![0x42; 16].into()),
        ca_roots: None,
        server_pin: Some([0xab; 32]),
        load_warning: None,
    };
    assert!(format!("{opts:?}").contains(&"ab".repeat(32)));
}
