//! Unit tests of `kata::client`.

use super::*;

const SENSOR: &str = "2b1a8a37-8bd8-4f1c-9d53-1f4a9a2b9c11";

fn endpoints(base: &str, instance: Option<&str>) -> Endpoints {
    Endpoints::new(&Url::parse(base).unwrap(), SENSOR, instance).unwrap()
}

#[test]
fn urls_without_instance() {
    for base in ["https://kata.example", "https://kata.example/"] {
        let e = endpoints(base, None);
        let p = format!("https://kata.example/kata/scanner/v1/sensors/{SENSOR}/scans");
        assert_eq!(e.submit().as_str(), p);
        assert_eq!(e.scans_collection().as_str(), p);
        assert_eq!(e.filters().as_str(), format!("{p}/filters"));
        let id = ScanId::parse("abc123").unwrap();
        assert_eq!(e.scan(&id).as_str(), format!("{p}/abc123"));
        assert_eq!(
            e.state(&[ScanState::Detect, ScanState::NotDetected])
                .as_str(),
            format!("{p}/state?state=detect,not%20detected")
        );
    }
}

#[test]
fn urls_with_instance_port_and_prefix() {
    let e = endpoints("https://10.0.0.5:8443/proxy/", Some("agent 1&x"));
    let p = format!("https://10.0.0.5:8443/proxy/kata/scanner/v1/sensors/{SENSOR}/scans");
    let q = "sensorInstanceId=agent%201%26x";
    assert_eq!(e.submit().as_str(), format!("{p}?{q}"));
    assert_eq!(e.filters().as_str(), format!("{p}/filters?{q}"));
    assert_eq!(
        e.state(&ScanState::ALL).as_str(),
        format!("{p}/state?{q}&state=detect,not%20detected,processing,timeout,error")
    );
    // An empty list still sends every state explicitly.
    assert_eq!(e.state(&[]).as_str(), e.state(&ScanState::ALL).as_str());
}

#[test]
fn default_port_is_443() {
    let e = endpoints("https://kata.example", None);
    assert_eq!(e.submit().port_or_known_default(), Some(443));
}

#[test]
fn rejects_plain_http_and_empty_sensor() {
    let url = Url::parse("http://kata.example").unwrap();
    assert!(Endpoints::new(&url, SENSOR, None).is_err());
    let url = Url::parse("https://kata.example").unwrap();
    assert!(Endpoints::new(&url, "", None).is_err());
}

#[test]
fn status_table() {
    let kinds =
        |code: u16| status_error(StatusCode::from_u16(code).unwrap(), b"nope", None, SENSOR).kind();
    assert_eq!(kinds(401), "unauthorized");
    assert_eq!(kinds(413), "too_large");
    assert_eq!(kinds(429), "busy");
    assert_eq!(kinds(500), "server");
    assert_eq!(kinds(503), "server");
    assert_eq!(kinds(400), "rejected");
    assert_eq!(kinds(403), "rejected");
    assert_eq!(kinds(302), "protocol");
    match status_error(StatusCode::BAD_REQUEST, b"bad form\n", None, SENSOR) {
        ApiError::Rejected { status, body } => {
            assert_eq!(status, 400);
            assert_eq!(body, "bad form");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn retry_after_seconds_dates_garbage_and_caps() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00
    let p = |v: &str| parse_retry_after(v, now);
    assert_eq!(p("0"), Some(Duration::ZERO));
    assert_eq!(p(" 120 "), Some(Duration::from_secs(120)));
    assert_eq!(p("300"), Some(MAX_RETRY_AFTER));
    assert_eq!(p("301"), Some(MAX_RETRY_AFTER));
    assert_eq!(p("99999999999999999999999999"), Some(MAX_RETRY_AFTER));
    assert_eq!(
        p("Wed, 21 Oct 2015 07:28:30 GMT"),
        Some(Duration::from_secs(30))
    );
    // A date in the past: retry now.
    assert_eq!(p("Wed, 21 Oct 2015 07:00:00 GMT"), Some(Duration::ZERO));
    // Far future date: capped.
    assert_eq!(p("Fri, 31 Dec 2100 23:59:59 GMT"), Some(MAX_RETRY_AFTER));
    for garbage in [
        "",
        "  ",
        "-5",
        "+5",
        "1.5",
        "soon",
        "12abc",
        "Wed, 99 Oct 2015",
        "\u{e9}",
    ] {
        assert_eq!(p(garbage), None, "{garbage:?}");
    }
}

#[test]
fn busy_and_server_errors_carry_retry_after() {
    let wait = Some(Duration::from_secs(7));
    let busy = status_error(StatusCode::TOO_MANY_REQUESTS, b"", wait, SENSOR);
    assert_eq!(busy.retry_after(), wait);
    assert!(busy.to_string().contains("retry after 7s"), "{busy}");
    let server = status_error(StatusCode::SERVICE_UNAVAILABLE, b"", wait, SENSOR);
    assert_eq!(server.retry_after(), wait);
    let other = status_error(StatusCode::BAD_REQUEST, b"", wait, SENSOR);
    assert_eq!(other.retry_after(), None);
}

#[test]
fn query_values_are_percent_encoded_per_rfc3986() {
    assert_eq!(encode_query_value("not detected"), "not%20detected");
    assert_eq!(encode_query_value("a-b.c_d~e"), "a-b.c_d~e");
    assert_eq!(encode_query_value("a+b/c&d=é"), "a%2Bb%2Fc%26d%3D%C3%A9");
}
