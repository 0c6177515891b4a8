//! The results parser never panics on arbitrary bytes, and what it returns is folded
//! fail-closed by `merge_duplicates`: one entry per scanId, `detect` wins.

#![no_main]

use dropscan::kata::{ScanState, merge_duplicates, parse_results};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(results) = parse_results(data) else {
        return;
    };
    let (merged, contradictions) = merge_duplicates(results.clone());
    let mut seen = std::collections::HashSet::new();
    for m in &merged {
        assert!(
            seen.insert(m.scan_id.clone()),
            "duplicate scanId after merging"
        );
        let any_detect = results
            .iter()
            .any(|r| r.scan_id == m.scan_id && r.state == ScanState::Detect);
        assert!(!any_detect || m.state == ScanState::Detect, "detect lost");
    }
    for c in &contradictions {
        assert!(c.states.len() >= 2);
    }
});
