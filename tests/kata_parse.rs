//! Property tests of the tolerant KATA answer parsers: arbitrary bytes and arbitrary JSON never
//! panic them, and a well-formed results list in either documented shape round-trips.

use dropscan::kata::{ScanResult, ScanState, parse_restrictions, parse_results};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Arbitrary JSON values, nested a few levels, biased towards the keys the parsers look at.
fn arb_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("scans".to_owned()),
        Just("scanId".to_owned()),
        Just("scan_id".to_owned()),
        Just("state".to_owned()),
        Just("maxObjectSize".to_owned()),
        Just("version".to_owned()),
        Just("results".to_owned()),
        "[a-zA-Z_]{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("detect"),
            Just("not detected"),
            Just("processing"),
            Just("timeout"),
            Just("error")
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn arb_state() -> impl Strategy<Value = ScanState> {
    prop_oneof![
        Just(ScanState::Detect),
        Just(ScanState::NotDetected),
        Just(ScanState::Processing),
        Just(ScanState::Timeout),
        Just(ScanState::Error),
        "[a-z]{1,10}".prop_map(|s| ScanState::from_wire(&s)),
    ]
}

fn arb_results() -> impl Strategy<Value = Vec<ScanResult>> {
    prop::collection::vec(
        ("[A-Za-z0-9_-]{1,40}", arb_state())
            .prop_map(|(scan_id, state)| ScanResult { scan_id, state }),
        0..20,
    )
}

proptest! {
    #[test]
    fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        parse_results(&body).ok();
        parse_restrictions(&body).ok();
    }

    #[test]
    fn random_json_never_panics(value in arb_json()) {
        let body = serde_json::to_vec(&value).unwrap();
        parse_results(&body).ok();
        parse_restrictions(&body).ok();
        if let Ok(r) = parse_restrictions(&body) {
            prop_assert!(r.max_object_size != Some(0));
        }
    }

    #[test]
    fn scans_object_round_trips(results in arb_results()) {
        let items: Vec<Value> = results
            .iter()
            .map(|r| json!({"scanId": r.scan_id, "state": r.state.as_wire(), "extra": [1, {"a": null}]}))
            .collect();
        let body = serde_json::to_vec(&json!({"scans": items})).unwrap();
        prop_assert_eq!(parse_results(&body).unwrap(), results);
    }

    #[test]
    fn doc_array_round_trips(results in arb_results(), numbers in prop::collection::vec(any::<u32>(), 0..5)) {
        let mut expected = results.clone();
        let mut items: Vec<Value> = results
            .iter()
            .map(|r| json!({"scanId": r.scan_id, "state": [r.state.as_wire()]}))
            .collect();
        for n in numbers {
            items.push(json!({"scanId": n, "state": ["timeout"]}));
            expected.push(ScanResult { scan_id: n.to_string(), state: ScanState::Timeout });
        }
        let body = serde_json::to_vec(&Value::Array(items)).unwrap();
        prop_assert_eq!(parse_results(&body).unwrap(), expected);
    }

    #[test]
    fn restrictions_round_trip(size in 1u64..(1 << 53), version in "[0-9.]{1,10}") {
        let body = serde_json::to_vec(&json!({"maxObjectSize": size, "version": version})).unwrap();
        let r = parse_restrictions(&body).unwrap();
        prop_assert_eq!(r.max_object_size, Some(size));
        prop_assert_eq!(r.version.as_deref(), Some(version.trim()));
    }
}
