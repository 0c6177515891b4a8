//! The protocol client against the built-in emulator over real mutual TLS on 127.0.0.1: every
//! endpoint, every status code of the spec, both body shapes, and the TLS refusals.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::time::Duration;

use dropscan::emulator::{
    Authorization, CertBundle, Emulator, EmulatorConfig, EmulatorHandle, Faults, ResultShape,
};
use dropscan::kata::{
    ApiError, ClientOptions, DeleteOutcome, KataClient, ScanId, ScanState, TlsOptions,
};
use sha2::{Digest, Sha256};

use crate::util::EICAR;

const SENSOR: &str = "2b7e1516-28ae-4d2a-a6f7-15880904cf4f";

fn options(
    emu: &EmulatorHandle,
    cert: &str,
    key: &str,
    ca: Option<&str>,
    pin: Option<[u8; 32]>,
) -> ClientOptions {
    ClientOptions {
        base_url: emu.base_url().parse().unwrap(),
        sensor_id: SENSOR.into(),
        sensor_instance_id: Some("node-a".into()),
        tls: TlsOptions::from_pem(cert.as_bytes(), key.as_bytes(), ca.map(str::as_bytes), pin)
            .unwrap(),
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        max_idle_per_host: 4,
    }
}

fn client(emu: &EmulatorHandle, certs: &CertBundle) -> KataClient {
    KataClient::new(options(
        emu,
        &certs.client_cert_pem,
        &certs.client_key_pem,
        Some(&certs.ca_cert_pem),
        None,
    ))
    .unwrap()
}

fn temp_file(bytes: &[u8]) -> (tempfile::NamedTempFile, u64) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    (f, bytes.len() as u64)
}

async fn submit(c: &KataClient, bytes: &[u8]) -> (ScanId, Result<[u8; 32], ApiError>) {
    let (f, len) = temp_file(bytes);
    let file = tokio::fs::File::open(f.path()).await.unwrap();
    let id = ScanId::generate();
    let r = c
        .submit(&id, file, len)
        .await
        .map(|s| s.sha256.unwrap_or_default());
    (id, r)
}

async fn start(config: EmulatorConfig) -> (CertBundle, EmulatorHandle) {
    let certs = CertBundle::generate(&[]).unwrap();
    let emu = Emulator::start(config, &certs).await.unwrap();
    (certs, emu)
}

#[tokio::test]
async fn every_endpoint_in_both_shapes() {
    for shape in [ResultShape::ScansObject, ResultShape::DocArray] {
        let (certs, emu) = start(EmulatorConfig {
            shape,
            scan_delay: Duration::from_millis(200),
            max_object_size: 1234567,
            ..EmulatorConfig::default()
        })
        .await;
        let c = client(&emu, &certs);
        // filters
        let r = c.restrictions().await.unwrap();
        assert_eq!(r.max_object_size, Some(1_234_567));
        assert!(r.version.is_some());
        // empty results (204) → empty list
        assert!(c.results(&ScanState::FINAL).await.unwrap().is_empty());
        // submit: the SHA-256 returned is the bytes sent; the emulator saw the same.
        let clean = b"just a document".to_vec();
        let (clean_id, sha) = submit(&c, &clean).await;
        assert_eq!(sha.unwrap(), <[u8; 32]>::from(Sha256::digest(&clean)));
        let (bad_id, _) = submit(&c, EICAR).await;
        let info = emu.state().scan(clean_id.as_str()).unwrap();
        assert_eq!(info.sensor_instance_id.as_deref(), Some("node-a"));
        assert_eq!(info.size, clean.len() as u64);
        // processing first …
        let all = c.results(&[ScanState::Processing]).await.unwrap();
        assert_eq!(all.len(), 2, "{shape:?}: {all:?}");
        // … then the verdicts.
        let mut got = Vec::new();
        for _ in 0..100 {
            got = c.results(&ScanState::FINAL).await.unwrap();
            if got.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let state_of = |id: &ScanId| {
            got.iter()
                .find(|r| r.scan_id == id.as_str())
                .map(|r| r.state.clone())
        };
        assert_eq!(
            state_of(&clean_id),
            Some(ScanState::NotDetected),
            "{shape:?}"
        );
        assert_eq!(state_of(&bad_id), Some(ScanState::Detect), "{shape:?}");
        // delete one: 200 then 404 (already gone)
        assert!(matches!(
            c.delete(&clean_id).await.unwrap(),
            DeleteOutcome::Deleted
        ));
        assert!(matches!(
            c.delete(&clean_id).await.unwrap(),
            DeleteOutcome::AlreadyGone
        ));
        // delete all
        c.delete_all().await.unwrap();
        assert!(c.results(&[]).await.unwrap().is_empty());
        let s = emu.state().stats();
        assert_eq!(s.delete_all, 1);
        assert_eq!(
            s.chunked_uploads, 0,
            "uploads carry an exact Content-Length"
        );
    }
}

#[tokio::test]
async fn status_codes_413_429_500_and_401() {
    let (certs, emu) = start(EmulatorConfig {
        max_object_size: 1000,
        max_scans: Some(1),
        scan_delay: Duration::from_secs(30),
        ..EmulatorConfig::default()
    })
    .await;
    let c = client(&emu, &certs);
    // 413: larger than maxObjectSize.
    let (_, r) = submit(&c, &vec![7u8; 5000]).await;
    assert!(matches!(r, Err(ApiError::TooLarge)), "{r:?}");
    // 429: one scan processing is the maximum.
    let (_, r) = submit(&c, b"first").await;
    r.unwrap();
    let (_, r) = submit(&c, b"second").await;
    let e = r.unwrap_err();
    assert!(matches!(e, ApiError::Busy { .. }), "{e:?}");
    assert_eq!(
        e.upload_disposition(),
        dropscan::kata::error::UploadDisposition::RetryLater { ambiguous: false },
        "{e:?}"
    );
    // 500 on every request.
    emu.state().set_faults(Faults {
        http_500_share: 1.0,
        ..Faults::default()
    });
    let e = c.restrictions().await.unwrap_err();
    assert!(matches!(e, ApiError::Server { status: 500, .. }), "{e:?}");
    assert_eq!(
        e.upload_disposition(),
        dropscan::kata::error::UploadDisposition::RetryLater { ambiguous: false },
        "{e:?}"
    );
    let e = c.results(&ScanState::FINAL).await.unwrap_err();
    assert!(matches!(e, ApiError::Server { .. }), "{e:?}");
    emu.state().set_faults(Faults::default());
    // 401: a second client certificate on an integrated sensorId waits for the administrator.
    let (cert2, key2) = certs.issue_client("second").unwrap();
    let c2 = KataClient::new(options(&emu, &cert2, &key2, Some(&certs.ca_cert_pem), None)).unwrap();
    let e = c2.restrictions().await.unwrap_err();
    assert!(matches!(e, ApiError::Unauthorized { .. }), "{e:?}");
    // The file waits (submissions pause until the administrator accepts), never fails.
    assert_eq!(
        e.upload_disposition(),
        dropscan::kata::error::UploadDisposition::RetryLater { ambiguous: false },
        "{e:?}"
    );
    assert!(e.to_string().contains("accept"), "{e}");
    // Accepted by the administrator: it works.
    let fp: [u8; 32] = {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(cert2.as_bytes()).unwrap();
        Sha256::digest(der.as_ref()).into()
    };
    emu.state()
        .set_authorization(SENSOR, fp, Authorization::Accepted);
    c2.restrictions().await.unwrap();
}

#[tokio::test]
async fn tls_refusals_untrusted_server_pin_mismatch_foreign_client() {
    let (certs, emu) = start(EmulatorConfig::default()).await;
    let other = CertBundle::generate(&[]).unwrap();
    // The server's certificate is not from the configured CA.
    let c = KataClient::new(options(
        &emu,
        &certs.client_cert_pem,
        &certs.client_key_pem,
        Some(&other.ca_cert_pem),
        None,
    ))
    .unwrap();
    let e = c.restrictions().await.unwrap_err();
    assert!(matches!(e, ApiError::ServerNotTrusted { .. }), "{e:?}");
    assert_eq!(
        e.upload_disposition(),
        dropscan::kata::error::UploadDisposition::RetryLater { ambiguous: false },
        "{e:?}"
    );
    // The right CA but a wrong pin.
    let c = KataClient::new(options(
        &emu,
        &certs.client_cert_pem,
        &certs.client_key_pem,
        Some(&certs.ca_cert_pem),
        Some([0xAB; 32]),
    ))
    .unwrap();
    let e = c.restrictions().await.unwrap_err();
    assert!(matches!(e, ApiError::PinMismatch { .. }), "{e:?}");
    // The right pin alone (no CA) authenticates the server.
    let server_fp: [u8; 32] = Sha256::digest(certs.server_chain().unwrap()[0].as_ref()).into();
    let c = KataClient::new(options(
        &emu,
        &certs.client_cert_pem,
        &certs.client_key_pem,
        None,
        Some(server_fp),
    ))
    .unwrap();
    c.restrictions().await.unwrap();
    // A client certificate from another CA is refused by the server.
    let c = KataClient::new(options(
        &emu,
        &other.client_cert_pem,
        &other.client_key_pem,
        Some(&certs.ca_cert_pem),
        None,
    ))
    .unwrap();
    let e = c.restrictions().await.unwrap_err();
    assert!(matches!(e, ApiError::ClientCertRefused { .. }), "{e:?}");
    let (_, r) = submit(&c, &vec![1u8; 2 << 20]).await;
    assert!(
        matches!(r, Err(ApiError::ClientCertRefused { .. })),
        "{r:?}"
    );
}

#[tokio::test]
async fn retry_after_of_429_and_500_reaches_the_caller_in_both_forms() {
    let (certs, emu) = start(EmulatorConfig::default()).await;
    let c = client(&emu, &certs);
    emu.state().set_faults(Faults {
        http_429_share: 1.0,
        retry_after: Some("7".into()),
        ..Faults::default()
    });
    let (_, r) = submit(&c, b"throttled").await;
    let e = r.unwrap_err();
    assert!(matches!(e, ApiError::Busy { .. }), "{e:?}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)), "{e:?}");
    // An HTTP-date two minutes ahead: a positive wait, at most two minutes.
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
    emu.state().set_faults(Faults {
        http_500_share: 1.0,
        retry_after: Some(date),
        ..Faults::default()
    });
    let e = c.restrictions().await.unwrap_err();
    assert!(matches!(e, ApiError::Server { status: 500, .. }), "{e:?}");
    let wait = e.retry_after().expect("Retry-After parsed");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(120),
        "{wait:?}"
    );
    // Far beyond the cap: capped.
    emu.state().set_faults(Faults {
        http_500_share: 1.0,
        retry_after: Some("86400".into()),
        ..Faults::default()
    });
    let e = c.restrictions().await.unwrap_err();
    assert_eq!(e.retry_after(), Some(dropscan::kata::MAX_RETRY_AFTER));
    // Without the header: none.
    emu.state().set_faults(Faults {
        http_500_share: 1.0,
        ..Faults::default()
    });
    let e = c.restrictions().await.unwrap_err();
    assert_eq!(e.retry_after(), None);
}

#[tokio::test]
async fn the_docs_shaped_emulator_answers_an_integer_scan_id_and_the_client_reads_it() {
    // The docs type scanId as an integer; a client submitting one gets it back as a JSON
    // number in the docs' shape, and our client reads numbers and strings alike.
    let (certs, emu) = start(EmulatorConfig {
        shape: ResultShape::DocArray,
        scan_delay: Duration::from_millis(50),
        ..EmulatorConfig::default()
    })
    .await;
    let c = client(&emu, &certs);
    let numeric = ScanId::parse("4711").unwrap();
    let (f, len) = temp_file(b"numbered by the caller");
    let file = tokio::fs::File::open(f.path()).await.unwrap();
    c.submit(&numeric, file, len).await.unwrap();
    let (hex, _) = submit(&c, EICAR).await;
    let mut got = Vec::new();
    for _ in 0..200 {
        got = c.results(&ScanState::FINAL).await.unwrap();
        if got.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let state_of = |id: &str| {
        got.iter()
            .find(|r| r.scan_id == id)
            .map(|r| r.state.clone())
    };
    assert_eq!(state_of("4711"), Some(ScanState::NotDetected), "{got:?}");
    assert_eq!(state_of(hex.as_str()), Some(ScanState::Detect), "{got:?}");
    assert!(matches!(
        c.delete(&numeric).await.unwrap(),
        DeleteOutcome::Deleted
    ));
}
