//! Property tests of the tolerant KATA answer parsers: arbitrary bytes and arbitrary JSON never
//! panic them, and a well-formed results list in either documented shape round-trips; a state
//! array or a repeated scanId is folded fail-closed (detect wins); the multipart upload body
//! has exactly its declared length and parses back with multer. The same properties run as
//! cargo-fuzz targets in `fuzz/`.

use dropscan::kata::multipart::encode_upload;
use dropscan::kata::{
    ScanId, ScanResult, ScanState, merge_duplicates, parse_restrictions, parse_results,
};
use proptest::prelude::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

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

/// Parses an upload body with multer; returns (name, filename, bytes) per part.
async fn multer_parts(
    content_type: &str,
    body: Vec<u8>,
) -> Result<Vec<(String, Option<String>, Vec<u8>)>, multer::Error> {
    let boundary = multer::parse_boundary(content_type)?;
    let stream =
        futures_util::stream::once(
            async move { Ok::<_, std::io::Error>(bytes::Bytes::from(body)) },
        );
    let mut form = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    while let Some(field) = form.next_field().await? {
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        let data = field.bytes().await?.to_vec();
        parts.push((name, filename, data));
    }
    Ok(parts)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
}

proptest! {
    #[test]
    fn state_array_with_detect_anywhere_is_detect(
        mut states in prop::collection::vec(arb_state(), 0..6),
        at in any::<prop::sample::Index>(),
    ) {
        let i = at.index(states.len() + 1);
        states.insert(i, ScanState::Detect);
        let wire: Vec<&str> = states.iter().map(ScanState::as_wire).collect();
        let body = serde_json::to_vec(&json!([{"scanId": "a", "state": wire}])).unwrap();
        let got = parse_results(&body).unwrap();
        prop_assert_eq!(got[0].state.clone(), ScanState::Detect);
    }

    #[test]
    fn state_array_with_a_final_entry_is_final(states in prop::collection::vec(arb_state(), 1..6)) {
        let wire: Vec<&str> = states.iter().map(ScanState::as_wire).collect();
        let body = serde_json::to_vec(&json!([{"scanId": "a", "state": wire}])).unwrap();
        let got = parse_results(&body).unwrap();
        prop_assert_eq!(got[0].state.is_final(), states.iter().any(ScanState::is_final));
    }

    #[test]
    fn merged_duplicates_are_unique_and_fail_closed(results in arb_results()) {
        let (merged, contradictions) = merge_duplicates(results.clone());
        let mut seen = std::collections::HashSet::new();
        for m in &merged {
            prop_assert!(seen.insert(m.scan_id.clone()), "duplicate {}", m.scan_id);
            let all: Vec<&ScanState> = results.iter().filter(|r| r.scan_id == m.scan_id).map(|r| &r.state).collect();
            if all.contains(&&ScanState::Detect) {
                prop_assert_eq!(&m.state, &ScanState::Detect);
            }
            prop_assert_eq!(m.state.is_final(), all.iter().any(|s| s.is_final()));
        }
        prop_assert_eq!(seen.len(), results.iter().map(|r| &r.scan_id).collect::<std::collections::HashSet<_>>().len());
        for c in &contradictions {
            prop_assert!(c.states.len() >= 2);
        }
    }

    #[test]
    fn multipart_body_has_its_declared_length_and_parses_back(
        id in "[A-Za-z0-9_-]{1,128}",
        content in prop::collection::vec(any::<u8>(), 0..4096),
        chunk in 1usize..5000,
    ) {
        let scan_id = ScanId::parse(&id).unwrap();
        let rt = runtime();
        let encoded = rt.block_on(encode_upload(&scan_id, &content, chunk)).unwrap();
        prop_assert_eq!(encoded.body.len() as u64, encoded.declared_len);
        prop_assert_eq!(encoded.sha256, <[u8; 32]>::from(Sha256::digest(&content)));
        let parts = rt.block_on(multer_parts(&encoded.content_type, encoded.body)).unwrap();
        prop_assert_eq!(parts.len(), 3);
        prop_assert_eq!(&parts[0], &("scanId".to_owned(), None, id.clone().into_bytes()));
        prop_assert_eq!(&parts[1], &("objectType".to_owned(), None, b"file".to_vec()));
        prop_assert_eq!(&parts[2], &("content".to_owned(), Some(id.clone()), content));
    }
}
