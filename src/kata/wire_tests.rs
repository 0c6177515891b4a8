//! Unit tests of `kata::wire`.

use super::*;

fn r(id: &str, state: ScanState) -> ScanResult {
    ScanResult {
        scan_id: id.into(),
        state,
    }
}

#[test]
fn scan_id_generate_and_parse() {
    let id = ScanId::generate();
    assert_eq!(id.as_str().len(), 32);
    assert!(
        id.as_str()
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert_eq!(ScanId::parse(id.as_str()), Ok(id.clone()));
    assert!(ScanId::parse("abc-DEF_09").is_ok());
    assert!(ScanId::parse(&"a".repeat(128)).is_ok());
    for bad in ["", "a b", "a/b", "é", "a.b", &"a".repeat(129)] {
        assert!(ScanId::parse(bad).is_err(), "{bad:?}");
    }
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, format!("\"{id}\""));
    let back: ScanId = serde_json::from_str(&json).unwrap();
    assert_eq!(back, id);
    assert!(serde_json::from_str::<ScanId>("\"a b\"").is_err());
}

#[test]
fn states_round_trip_and_tolerance() {
    for s in ScanState::ALL {
        assert_eq!(ScanState::from_wire(s.as_wire()), s);
    }
    assert_eq!(ScanState::from_wire("Not_Detected"), ScanState::NotDetected);
    assert_eq!(ScanState::from_wire(" DETECT "), ScanState::Detect);
    assert_eq!(
        ScanState::from_wire("queued"),
        ScanState::Unknown("queued".into())
    );
    assert!(!ScanState::Unknown("x".into()).is_final());
    assert!(!ScanState::Processing.is_final());
    assert!(ScanState::FINAL.iter().all(ScanState::is_final));
}

#[test]
fn results_object_shape() {
    let body = br#"{"scans":[{"scanId":"a1","state":"processing"},
        {"scanId":"b2","state":"not detected","extra":{"x":1}}], "other": 5}"#;
    assert_eq!(
        parse_results(body).unwrap(),
        vec![
            r("a1", ScanState::Processing),
            r("b2", ScanState::NotDetected)
        ]
    );
}

#[test]
fn results_doc_array_shape() {
    let body = br#"[{"scanId": 17, "state": ["detect"]},
        {"scanID": "x", "state": ["weird", "timeout"]},
        {"scan_id": "y", "state": "brand new"},
        {"scanId": "z", "state": []},
        {"scanId": "w"}]"#;
    assert_eq!(
        parse_results(body).unwrap(),
        vec![
            r("17", ScanState::Detect),
            r("x", ScanState::Timeout),
            r("y", ScanState::Unknown("brand new".into())),
            r("z", ScanState::Unknown(String::new())),
            r("w", ScanState::Unknown(String::new())),
        ]
    );
}

#[test]
fn results_skip_bad_items() {
    let body = br#"{"results":[1, "x", null, {"state":"detect"}, {"scanId":null},
        {"scanId":"  "}, {"scanId":{"a":1}}, {"ScanId":"ok","State":"error"}]}"#;
    assert_eq!(
        parse_results(body).unwrap(),
        vec![r("ok", ScanState::Error)]
    );
}

#[test]
fn results_empty_forms() {
    for body in [
        &b""[..],
        b"  \n",
        b"[]",
        b"{}",
        b"null",
        b"{\"scans\":null}",
        b"{\"scans\":[]}",
    ] {
        assert_eq!(parse_results(body).unwrap(), vec![], "{body:?}");
    }
}

#[test]
fn results_garbage_is_protocol_error() {
    for body in [
        &b"<html>oops</html>"[..],
        b"{\"scans\":",
        b"42",
        b"\"str\"",
        b"{\"scans\":{}}",
        b"{\"foo\":1}",
        b"\xff\xfe",
    ] {
        let err = parse_results(body).unwrap_err();
        assert_eq!(err.kind(), "protocol", "{body:?}");
    }
}

#[test]
fn single_object_item_is_accepted() {
    assert_eq!(
        parse_results(br#"{"scanId":"a","state":"detect"}"#).unwrap(),
        vec![r("a", ScanState::Detect)]
    );
}

#[test]
fn restrictions_forms() {
    let cases: [(&[u8], Option<u64>, Option<&str>); 9] = [
        (
            br#"{"maxObjectSize": 1048576, "version": "7.1"}"#,
            Some(1_048_576),
            Some("7.1"),
        ),
        (br#"{"maxObjectSize": "2048"}"#, Some(2048), None),
        (br#"{"maxObjectSize": 4096.0, "x": []}"#, Some(4096), None),
        (br#"{"maxObjectSize": 0}"#, None, None),
        (br#"{"maxObjectSize": -5}"#, None, None),
        (br#"{"maxObjectSize": "lots"}"#, None, None),
        (
            br#"{"max_object_size": 10, "version": 3}"#,
            Some(10),
            Some("3"),
        ),
        (br#"{}"#, None, None),
        (b"", None, None),
    ];
    for (body, size, version) in cases {
        let got = parse_restrictions(body).unwrap();
        assert_eq!(
            got.max_object_size,
            size,
            "{}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(got.version.as_deref(), version);
    }
    assert!(parse_restrictions(b"[1]").is_err());
    assert!(parse_restrictions(b"nope").is_err());
}

#[test]
fn state_array_with_detect_anywhere_is_detect() {
    for body in [
        &br#"[{"scanId":"a","state":["not detected","detect"]}]"#[..],
        br#"[{"scanId":"a","state":["processing","weird","detect"]}]"#,
        br#"[{"scanId":"a","state":["error","detect","timeout"]}]"#,
    ] {
        assert_eq!(
            parse_results(body).unwrap(),
            vec![r("a", ScanState::Detect)],
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn state_array_with_a_final_entry_is_final() {
    let body = br#"[{"scanId":"a","state":["processing","not detected"]},
        {"scanId":"b","state":["not detected","error"]},
        {"scanId":"c","state":["processing","x"]}]"#;
    assert_eq!(
        parse_results(body).unwrap(),
        vec![
            r("a", ScanState::NotDetected),
            r("b", ScanState::Error),
            r("c", ScanState::Processing)
        ]
    );
}

#[test]
fn duplicate_scan_ids_fold_fail_closed_and_report_contradictions() {
    let (merged, contradictions) = merge_duplicates(vec![
        r("a", ScanState::NotDetected),
        r("b", ScanState::Processing),
        r("a", ScanState::Detect),
        r("b", ScanState::NotDetected),
        r("c", ScanState::Timeout),
        r("a", ScanState::NotDetected),
    ]);
    assert_eq!(
        merged,
        vec![
            r("a", ScanState::Detect),
            r("b", ScanState::NotDetected),
            r("c", ScanState::Timeout)
        ]
    );
    assert_eq!(
        contradictions,
        vec![Contradiction {
            scan_id: "a".into(),
            states: vec![ScanState::NotDetected, ScanState::Detect],
        }]
    );
    // No duplicates: unchanged, no contradiction.
    let plain = vec![r("x", ScanState::Detect), r("y", ScanState::Error)];
    assert_eq!(merge_duplicates(plain.clone()), (plain, vec![]));
    // The same final state twice is no contradiction.
    let (m, c) = merge_duplicates(vec![r("x", ScanState::Error), r("x", ScanState::Error)]);
    assert_eq!((m, c), (vec![r("x", ScanState::Error)], vec![]));
}
