//! Unit tests of the server's pure parts: EICAR search, scanId rule, paths, query decoding.

use super::form::{EICAR, EicarSearch, valid_scan_id};
use super::routing::{API_PREFIX, Endpoint, parse_path, percent_decode, query_param};

#[test]
fn eicar_found_across_every_split() {
    let mut content = b"some prefix bytes ".to_vec();
    content.extend_from_slice(EICAR);
    content.extend_from_slice(b" and a suffix");
    for chunk_size in 1..=content.len() {
        let mut search = EicarSearch::default();
        for chunk in content.chunks(chunk_size) {
            search.feed(chunk);
        }
        assert!(search.found(), "chunk size {chunk_size}");
    }
    // Split in two at every position.
    for at in 0..=content.len() {
        let mut search = EicarSearch::default();
        search.feed(&content[..at]);
        search.feed(&content[at..]);
        assert!(search.found(), "split at {at}");
    }
}

#[test]
fn eicar_not_found_when_absent_or_broken() {
    let mut broken = EICAR.to_vec();
    broken[30] = b'x';
    for chunk_size in [1, 7, 68, 1000] {
        let mut search = EicarSearch::default();
        for chunk in broken.chunks(chunk_size) {
            search.feed(chunk);
        }
        assert!(!search.found());
    }
    let mut search = EicarSearch::default();
    search.feed(&EICAR[..40]);
    search.feed(b"gap");
    search.feed(&EICAR[40..]);
    assert!(!search.found());
}

#[test]
fn scan_id_validation() {
    assert!(valid_scan_id("3f2a9c0d4e5b6a7f8091a2b3c4d5e6f7"));
    assert!(valid_scan_id("A-b_9"));
    assert!(valid_scan_id(&"a".repeat(128)));
    assert!(!valid_scan_id(""));
    assert!(!valid_scan_id(&"a".repeat(129)));
    assert!(!valid_scan_id("has space"));
    assert!(!valid_scan_id("report.pdf"));
    assert!(!valid_scan_id("../x"));
}

#[test]
fn paths_route() {
    let s = "0b6b7a52-6c1e-4c1f-9d55-3d7a1c2b9e01";
    let p = |tail: &str| format!("{API_PREFIX}{s}{tail}");
    assert_eq!(parse_path(&p("/scans")), Some(Endpoint::Scans(s)));
    assert_eq!(parse_path(&p("/scans/state")), Some(Endpoint::State(s)));
    assert_eq!(parse_path(&p("/scans/filters")), Some(Endpoint::Filters(s)));
    assert_eq!(
        parse_path(&p("/scans/ab12")),
        Some(Endpoint::Scan(s, "ab12"))
    );
    assert_eq!(parse_path(&p("/scans/")), None);
    assert_eq!(parse_path(&p("/scans/a/b")), None);
    assert_eq!(parse_path(&p("/other")), None);
    assert_eq!(parse_path("/kata/scanner/v1/sensors//scans"), None);
}

#[test]
fn query_decoding() {
    let q = Some("sensorInstanceId=node%2D1&state=detect,not%20detected,not+detected");
    assert_eq!(
        query_param(q, "sensorInstanceId").as_deref(),
        Some("node-1")
    );
    assert_eq!(
        query_param(q, "state").as_deref(),
        Some("detect,not detected,not detected")
    );
    assert_eq!(query_param(q, "missing"), None);
    assert_eq!(percent_decode("100%"), "100%");
    assert_eq!(percent_decode("%zz%4"), "%zz%4");
}
