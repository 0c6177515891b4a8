//! The emulator over real mutual TLS on loopback, driven with reqwest.

// Helpers outside `#[test]` fns are not covered by clippy.toml's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use dropscan::emulator::{
    Authorization, CertBundle, Emulator, EmulatorConfig, EmulatorHandle, Faults, InjectedVerdict,
    ResultShape, ScanState,
};
use reqwest::StatusCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

const SENSOR: &str = "0b6b7a52-6c1e-4c1f-9d55-3d7a1c2b9e01";
const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
const BOUNDARY: &str = "dropscan-test-boundary-7d1c";

/// One emulator plus a client holding the bundle's client certificate.
struct Fixture {
    certs: CertBundle,
    emulator: EmulatorHandle,
    client: reqwest::Client,
}

impl Fixture {
    async fn start(config: EmulatorConfig) -> Self {
        let certs = CertBundle::generate(&[]).unwrap();
        let emulator = Emulator::start(config, &certs).await.unwrap();
        let client = client_for(&certs, &certs.client_cert_pem, &certs.client_key_pem, false);
        Self {
            certs,
            emulator,
            client,
        }
    }

    fn url(&self, tail: &str) -> String {
        format!(
            "{}/kata/scanner/v1/sensors/{SENSOR}/scans{tail}",
            self.emulator.base_url()
        )
    }

    async fn submit(&self, scan_id: &str, content: &[u8]) -> StatusCode {
        self.submit_with(&self.client, scan_id, "node-1", content)
            .await
            .unwrap()
    }

    async fn submit_with(
        &self,
        client: &reqwest::Client,
        scan_id: &str,
        instance: &str,
        content: &[u8],
    ) -> reqwest::Result<StatusCode> {
        let url = format!("{}?sensorInstanceId={instance}", self.url(""));
        let answer = client
            .post(url)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(form(scan_id, content))
            .send()
            .await?;
        Ok(answer.status())
    }

    /// `(status, body)` of GET state.
    async fn state(&self, query: &str) -> (StatusCode, String) {
        let answer = self
            .client
            .get(format!("{}{query}", self.url("/state")))
            .send()
            .await
            .unwrap();
        (answer.status(), answer.text().await.unwrap())
    }

    /// Polls GET state until `body` contains `needle`; panics after 5 s.
    async fn wait_for_state(&self, query: &str, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, body) = self.state(query).await;
            if body.contains(needle) {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {needle:?} in time, last answer {body:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn client_for(certs: &CertBundle, cert_pem: &str, key_pem: &str, h2: bool) -> reqwest::Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(certs.ca_cert_pem.as_bytes()).unwrap())
        .unwrap();
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    if h2 {
        config.alpn_protocols = vec![b"h2".to_vec()];
    }
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn form(scan_id: &str, content: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in [("scanId", scan_id), ("objectType", "file")] {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"content\"; filename=\"{scan_id}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn fingerprint(cert_pem: &str) -> [u8; 32] {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    Sha256::digest(&der).into()
}

#[tokio::test]
async fn emulator_refuses_client_cert_from_another_ca() {
    let fx = Fixture::start(EmulatorConfig::default()).await;
    let foreign = CertBundle::generate(&[]).unwrap();
    // Trusts the emulator's CA, but presents a certificate from another CA.
    let client = client_for(
        &fx.certs,
        &foreign.client_cert_pem,
        &foreign.client_key_pem,
        false,
    );
    let result = fx.submit_with(&client, "a1", "node-1", b"x").await;
    assert!(result.is_err(), "expected a TLS failure, got {result:?}");
    assert_eq!(fx.emulator.state().stats().submits_by_status.len(), 0);
    assert!(fx.emulator.state().authorizations().is_empty());
    fx.emulator.stop().await;
}

#[tokio::test]
async fn emulator_pending_until_accepted() {
    let fx = Fixture::start(EmulatorConfig {
        auto_accept: false,
        ..EmulatorConfig::default()
    })
    .await;
    assert_eq!(fx.submit("a1", b"hello").await, StatusCode::UNAUTHORIZED);
    let fp = fingerprint(&fx.certs.client_cert_pem);
    let state = fx.emulator.state();
    assert_eq!(
        state.authorizations(),
        vec![(SENSOR.to_owned(), fp, Authorization::Pending)]
    );
    state.set_authorization(SENSOR, fp, Authorization::Accepted);
    assert_eq!(fx.submit("a1", b"hello").await, StatusCode::OK);

    // Another certificate on the integrated sensorId waits, even with auto_accept.
    state.set_auto_accept(true);
    let (cert, key) = fx.certs.issue_client("second").unwrap();
    let other = client_for(&fx.certs, &cert, &key, false);
    let status = fx.submit_with(&other, "a2", "node-1", b"x").await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A sensorId that is not a UUID is a malformed request.
    let url = format!(
        "{}/kata/scanner/v1/sensors/nope/scans/filters",
        fx.emulator.base_url()
    );
    let status = fx.client.get(url).send().await.unwrap().status();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    fx.emulator.stop().await;
}

#[tokio::test]
async fn emulator_processing_then_not_detected() {
    let fx = Fixture::start(EmulatorConfig {
        scan_delay: Duration::from_millis(300),
        ..EmulatorConfig::default()
    })
    .await;
    assert_eq!(fx.submit("clean1", b"harmless bytes").await, StatusCode::OK);
    let (status, body) = fx.state("?sensorInstanceId=node-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        r#"{"scans":[{"scanId":"clean1","state":"processing"}]}"#
    );
    let body = fx
        .wait_for_state(
            "?sensorInstanceId=node-1&state=detect,not%20detected",
            "clean1",
        )
        .await;
    assert_eq!(
        body,
        r#"{"scans":[{"scanId":"clean1","state":"not detected"}]}"#
    );
    // Another instance sees nothing; `+` spelling accepted.
    let (status, body) = fx.state("?sensorInstanceId=node-2").await;
    assert_eq!((status, body.as_str()), (StatusCode::NO_CONTENT, ""));
    let (status, _) = fx.state("?state=not+detected").await;
    assert_eq!(status, StatusCode::OK);
    let info = fx.emulator.state().scan("clean1").unwrap();
    assert_eq!(info.sensor_instance_id.as_deref(), Some("node-1"));
    assert_eq!(info.size, 14);
    assert_eq!(
        info.sha256,
        <[u8; 32]>::from(Sha256::digest(b"harmless bytes"))
    );
    fx.emulator.stop().await;
}

#[tokio::test]
async fn emulator_detects_eicar_and_listed_hashes_in_doc_array_shape() {
    let listed = b"listed content".to_vec();
    let fx = Fixture::start(EmulatorConfig {
        shape: ResultShape::DocArray,
        detect_sha256: [<[u8; 32]>::from(Sha256::digest(&listed))].into(),
        ..EmulatorConfig::default()
    })
    .await;
    let mut eicar = vec![b'z'; 100_000];
    eicar.extend_from_slice(EICAR);
    assert_eq!(fx.submit("e1", &eicar).await, StatusCode::OK);
    assert_eq!(fx.submit("e2", &listed).await, StatusCode::OK);
    let body = fx.wait_for_state("", "e2").await;
    assert_eq!(
        body,
        r#"[{"scanId":"e1","state":["detect"]},{"scanId":"e2","state":["detect"]}]"#
    );
    // Switch shape at run time; an injected error is consumed once.
    let state = fx.emulator.state();
    state.set_shape(ResultShape::ScansObject);
    let hash = <[u8; 32]>::from(Sha256::digest(b"flaky"));
    state.inject_verdict(hash, InjectedVerdict::once(ScanState::Error));
    assert_eq!(fx.submit("f1", b"flaky").await, StatusCode::OK);
    assert_eq!(fx.submit("f2", b"flaky").await, StatusCode::OK);
    let (_, body) = fx.state("?state=error,not%20detected").await;
    assert_eq!(
        body,
        r#"{"scans":[{"scanId":"f1","state":"error"},{"scanId":"f2","state":"not detected"}]}"#
    );
    fx.emulator.stop().await;
}

#[tokio::test]
async fn emulator_enforces_max_object_size_and_max_scans() {
    let fx = Fixture::start(EmulatorConfig {
        max_object_size: 1000,
        max_scans: Some(1),
        scan_delay: Duration::from_secs(60),
        ..EmulatorConfig::default()
    })
    .await;
    // Over the limit but within the multipart allowance: rejected while streaming.
    assert_eq!(
        fx.submit("big", &[0u8; 1001]).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // Far over: rejected from Content-Length alone.
    assert_eq!(
        fx.submit("huge", &vec![0u8; 200_000]).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(fx.submit("ok1", &[0u8; 1000]).await, StatusCode::OK);
    assert_eq!(fx.submit("ok2", b"x").await, StatusCode::TOO_MANY_REQUESTS);
    let state = fx.emulator.state();
    let stats = state.stats();
    assert_eq!(stats.submits_accepted, 1);
    assert_eq!(stats.submits_by_status.get(&413), Some(&2));
    assert_eq!(stats.submits_by_status.get(&429), Some(&1));
    // The limit can be raised at run time.
    state.set_max_scans(Some(2));
    assert_eq!(fx.submit("ok2", b"x").await, StatusCode::OK);
    fx.emulator.stop().await;
}

#[tokio::test]
async fn emulator_delete_filters_and_empty_results() {
    let fx = Fixture::start(EmulatorConfig {
        max_object_size: 4096,
        version: "7.1-test".to_owned(),
        ..EmulatorConfig::default()
    })
    .await;
    let filters = fx.client.get(fx.url("/filters")).send().await.unwrap();
    assert_eq!(filters.status(), StatusCode::OK);
    let filters: serde_json::Value = serde_json::from_str(&filters.text().await.unwrap()).unwrap();
    assert_eq!(
        filters,
        serde_json::json!({"maxObjectSize": 4096, "version": "7.1-test"})
    );

    assert_eq!(fx.state("").await.0, StatusCode::NO_CONTENT);
    assert_eq!(fx.submit("d1", b"one").await, StatusCode::OK);
    assert_eq!(fx.submit("d2", b"two").await, StatusCode::OK);
    let delete = |tail: &str| fx.client.delete(fx.url(tail)).send();
    assert_eq!(delete("/d1").await.unwrap().status(), StatusCode::OK);
    assert_eq!(delete("/d1").await.unwrap().status(), StatusCode::NOT_FOUND);
    assert!(fx.emulator.state().scan("d1").unwrap().deleted);
    assert_eq!(delete("").await.unwrap().status(), StatusCode::OK);
    assert_eq!(fx.state("").await.0, StatusCode::NO_CONTENT);

    let wrong = fx.client.get(fx.url("")).send().await.unwrap();
    assert_eq!(wrong.status(), StatusCode::METHOD_NOT_ALLOWED);
    let unknown = fx
        .client
        .get(format!("{}/kata/other", fx.emulator.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let stats = fx.emulator.state().stats();
    assert_eq!(
        (stats.deletes, stats.delete_all, stats.filters_requests),
        (2, 1, 1)
    );
    fx.emulator.stop().await;
}

#[tokio::test]
async fn emulator_chunked_h2_restart_and_drop_fault() {
    let fx = Fixture::start(EmulatorConfig::default()).await;
    // A chunked body (no Content-Length) over HTTP/2.
    let h2 = client_for(
        &fx.certs,
        &fx.certs.client_cert_pem,
        &fx.certs.client_key_pem,
        true,
    );
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = form("c1", b"streamed")
        .chunks(7)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let answer = h2
        .post(format!("{}?sensorInstanceId=n", fx.url("")))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.version(), reqwest::Version::HTTP_2);
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(fx.submit("c1", b"again").await, StatusCode::OK);
    let stats = fx.emulator.state().stats();
    assert_eq!(stats.chunked_uploads, 1);
    assert_eq!(stats.submissions_per_scan_id.get("c1"), Some(&2));

    // Outage: stop, then restart on the same port with the same state.
    let addr = fx.emulator.local_addr();
    let state = fx.emulator.state();
    fx.emulator.stop().await;
    let config = EmulatorConfig {
        listen: addr,
        ..EmulatorConfig::default()
    };
    let emulator = Emulator::start_with_state(config, &fx.certs, state)
        .await
        .unwrap();
    let fx = Fixture { emulator, ..fx };
    assert!(fx.state("").await.1.contains("c1"));

    fx.emulator.state().set_faults(Faults {
        drop_share: 1.0,
        ..Faults::default()
    });
    assert!(fx.submit_with(&fx.client, "x", "n", b"x").await.is_err());
    assert_eq!(fx.emulator.state().stats().dropped_connections, 1);
    fx.emulator.state().set_faults(Faults::default());
    assert_eq!(fx.submit("x", b"x").await, StatusCode::OK);
    fx.emulator.stop().await;
}

#[tokio::test]
async fn emulator_fault_answers() {
    let fx = Fixture::start(EmulatorConfig::default()).await;
    let state = fx.emulator.state();
    state.set_faults(Faults {
        http_429_share: 1.0,
        ..Faults::default()
    });
    assert_eq!(fx.submit("t1", b"x").await, StatusCode::TOO_MANY_REQUESTS);
    // 429 faults are for submissions only.
    assert_eq!(fx.state("").await.0, StatusCode::NO_CONTENT);
    state.set_faults(Faults {
        http_500_share: 1.0,
        ..Faults::default()
    });
    assert_eq!(
        fx.submit("t1", b"x").await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(fx.state("").await.0, StatusCode::INTERNAL_SERVER_ERROR);
    state.set_faults(Faults {
        slow_share: 1.0,
        slow_delay: Duration::from_millis(100),
        ..Faults::default()
    });
    let started = tokio::time::Instant::now();
    assert_eq!(fx.submit("t1", b"x").await, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(100));
    let stats = state.stats();
    assert_eq!(stats.submits_by_status.get(&429), Some(&1));
    assert_eq!(stats.submits_by_status.get(&500), Some(&1));
    assert_eq!(stats.submits_accepted, 1);
    fx.emulator.stop().await;
}

/// A form part: `name`, optional filename, value.
fn part(name: &str, filename: Option<&str>, value: &[u8]) -> Vec<u8> {
    let mut body = match filename {
        Some(f) => format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        ),
        None => format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"),
    }
    .into_bytes();
    body.extend_from_slice(value);
    body.extend_from_slice(b"\r\n");
    body
}

impl Fixture {
    /// POSTs `parts` as they are (plus the closing boundary) to `…/scans{query}`.
    async fn post_parts(&self, query: &str, parts: &[Vec<u8>]) -> (StatusCode, String) {
        let mut body: Vec<u8> = parts.concat();
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        let answer = self
            .client
            .post(format!("{}{query}", self.url("")))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        (answer.status(), answer.text().await.unwrap())
    }
}

#[tokio::test]
async fn eicar_upload_followed_by_a_second_text_content_part_is_400_malformed_form() {
    let fx = Fixture::start(EmulatorConfig::default()).await;
    // The exact shape seen from a third-party client: the file part, then a text `content`.
    let (status, body) = fx
        .post_parts(
            "?sensorInstanceId=node-1",
            &[
                part("scanId", None, b"twice1"),
                part("objectType", None, b"file"),
                part("content", Some("eicar.com"), EICAR),
                part("content", None, b"hello, just text"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("malformed form"), "{body}");
    assert!(fx.emulator.state().scan("twice1").is_none());
    // Two scanId parts: same answer.
    let (status, body) = fx
        .post_parts(
            "?sensorInstanceId=node-1",
            &[
                part("scanId", None, b"twice2"),
                part("scanId", None, b"twice3"),
                part("objectType", None, b"file"),
                part("content", Some("x"), b"data"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("malformed form"), "{body}");
    // The single-part EICAR upload is still detected.
    assert_eq!(fx.submit("once", EICAR).await, StatusCode::OK);
    fx.wait_for_state("?sensorInstanceId=node-1&state=detect", "once")
        .await;
    fx.emulator.stop().await;
}

#[tokio::test]
async fn sensor_instance_id_as_form_field_scopes_the_scan_when_the_query_lacks_it() {
    let fx = Fixture::start(EmulatorConfig::default()).await;
    let (status, body) = fx
        .post_parts(
            "",
            &[
                part("scanId", None, b"fromform"),
                part("objectType", None, b"file"),
                part("sensorInstanceId", None, b"form-node"),
                part("content", Some("x"), b"harmless"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        fx.emulator
            .state()
            .scan("fromform")
            .unwrap()
            .sensor_instance_id
            .as_deref(),
        Some("form-node")
    );
    fx.wait_for_state("?sensorInstanceId=form-node", "fromform")
        .await;
    // The query stays the documented place and wins over the form field.
    let (status, _) = fx
        .post_parts(
            "?sensorInstanceId=query-node",
            &[
                part("scanId", None, b"both"),
                part("objectType", None, b"file"),
                part("sensorInstanceId", None, b"form-node"),
                part("content", Some("x"), b"harmless too"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        fx.emulator
            .state()
            .scan("both")
            .unwrap()
            .sensor_instance_id
            .as_deref(),
        Some("query-node")
    );
    fx.emulator.stop().await;
}

#[tokio::test]
async fn delete_and_filters_accept_sensor_instance_id_or_not() {
    let fx = Fixture::start(EmulatorConfig::default()).await;
    for query in ["", "?sensorInstanceId=node-1"] {
        let filters = fx
            .client
            .get(format!("{}{query}", fx.url("/filters")))
            .send()
            .await
            .unwrap();
        assert_eq!(filters.status(), StatusCode::OK, "{query}");
        let id = format!("del{}", query.len());
        assert_eq!(fx.submit(&id, b"x").await, StatusCode::OK);
        let deleted = fx
            .client
            .delete(format!("{}{query}", fx.url(&format!("/{id}"))))
            .send()
            .await
            .unwrap();
        assert_eq!(deleted.status(), StatusCode::OK, "{query}");
        assert!(fx.emulator.state().scan(&id).unwrap().deleted);
    }
    fx.emulator.stop().await;
}

#[tokio::test]
async fn no_filters_route_mode_answers_405_or_404_after_authorization() {
    let fx = Fixture::start(EmulatorConfig {
        no_filters_route: Some(405),
        ..EmulatorConfig::default()
    })
    .await;
    let get = || fx.client.get(fx.url("/filters")).send();
    assert_eq!(
        get().await.unwrap().status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    fx.emulator.state().set_no_filters_route(Some(404));
    assert_eq!(get().await.unwrap().status(), StatusCode::NOT_FOUND);
    fx.emulator.state().set_no_filters_route(None);
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);
    fx.emulator.stop().await;
}

#[tokio::test]
async fn emulator_counts_every_request_by_kind() {
    let fx = Fixture::start(EmulatorConfig::default()).await;
    let before = fx.emulator.request_counts();
    assert_eq!(before.total(), 0);
    assert_eq!(before.first_post_unix_ms, None);
    assert_eq!(fx.submit("c1", b"one").await, StatusCode::OK);
    assert_eq!(fx.submit("c2", b"two").await, StatusCode::OK);
    fx.wait_for_state("?sensorInstanceId=node-1", "c2").await;
    let answer = fx
        .client
        .delete(fx.url("/c1?sensorInstanceId=node-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let filters = fx.client.get(fx.url("/filters")).send().await.unwrap();
    assert_eq!(filters.status(), StatusCode::OK);
    let outside = format!("{}/elsewhere", fx.emulator.base_url());
    let answer = fx.client.get(outside).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::NOT_FOUND);

    let counts = fx.emulator.request_counts();
    assert_eq!(counts.posts, 2);
    assert!(counts.state_gets >= 1, "{counts:?}");
    assert_eq!(counts.deletes, 1);
    assert_eq!(counts.filters_gets, 1);
    assert_eq!(counts.other, 1);
    assert_eq!(counts.delete_alls, 0);
    assert_eq!(counts.total(), 5 + counts.state_gets);
    // One keep-alive client: every request rode the connections it opened.
    assert!(counts.connections >= 1 && counts.connections <= counts.total());
    assert!(counts.first_post_unix_ms.is_some());
    let line = counts.to_string();
    assert!(
        line.starts_with("emulator requests: total=") && line.contains(" post=2 "),
        "{line}"
    );
    fx.emulator.stop().await;
}

#[tokio::test]
async fn the_docs_shape_types_an_integer_scan_id_as_a_number_and_keeps_other_ids_strings() {
    let fx = Fixture::start(EmulatorConfig {
        shape: ResultShape::DocArray,
        scan_delay: Duration::ZERO,
        ..EmulatorConfig::default()
    })
    .await;
    for id in ["17", "007", "e1", "18446744073709551616"] {
        assert_eq!(fx.submit(id, b"harmless").await, StatusCode::OK, "{id}");
    }
    let body = fx.wait_for_state("", "e1").await;
    let items: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let id_of = |n: usize| items[n]["scanId"].clone();
    let ids: Vec<serde_json::Value> = (0..items.len()).map(id_of).collect();
    assert!(ids.contains(&serde_json::json!(17)), "{body}");
    // A leading zero or a value past u64 would not survive as a number: strings.
    assert!(ids.contains(&serde_json::json!("007")), "{body}");
    assert!(ids.contains(&serde_json::json!("e1")), "{body}");
    assert!(
        ids.contains(&serde_json::json!("18446744073709551616")),
        "{body}"
    );
    fx.emulator.stop().await;
}

#[tokio::test]
async fn delete_all_with_an_instance_deletes_only_that_instances_results() {
    let fx = Fixture::start(EmulatorConfig {
        scan_delay: Duration::ZERO,
        ..EmulatorConfig::default()
    })
    .await;
    let client = fx.client.clone();
    fx.submit_with(&client, "a1", "node-a", b"one")
        .await
        .unwrap();
    fx.submit_with(&client, "b1", "node-b", b"two")
        .await
        .unwrap();
    let scoped = client
        .delete(format!("{}?sensorInstanceId=node-a", fx.url("")))
        .send()
        .await
        .unwrap();
    assert_eq!(scoped.status(), StatusCode::OK);
    let state = fx.emulator.state();
    assert!(state.scan("a1").unwrap().deleted);
    assert!(!state.scan("b1").unwrap().deleted);
    let all = client.delete(fx.url("")).send().await.unwrap();
    assert_eq!(all.status(), StatusCode::OK);
    assert!(state.scan("b1").unwrap().deleted);
    fx.emulator.stop().await;
}
