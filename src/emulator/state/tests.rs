//! Unit tests of the emulator's state: authorization, injected verdicts, the 429 bookkeeping,
//! the scan delay range.

use super::*;

const SENSOR: &str = "0b6b7a52-6c1e-4c1f-9d55-3d7a1c2b9e01";

#[test]
fn sensor_id_is_normalized() {
    assert_eq!(
        parse_sensor_id(&SENSOR.to_uppercase()).as_deref(),
        Some(SENSOR)
    );
    assert_eq!(parse_sensor_id("not-a-uuid"), None);
}

#[test]
fn new_certificate_on_integrated_sensor_waits() {
    let state = SharedState::default();
    assert_eq!(state.authorize(SENSOR, [1; 32]), Authorization::Accepted);
    assert_eq!(state.authorize(SENSOR, [2; 32]), Authorization::Pending);
    state.set_authorization(SENSOR, [2; 32], Authorization::Accepted);
    assert_eq!(state.authorize(SENSOR, [2; 32]), Authorization::Accepted);
}

#[test]
fn injected_verdicts_are_consumed_in_order() {
    let state = SharedState::default();
    state.inject_verdict(
        [7; 32],
        InjectedVerdict {
            verdict: ScanState::Error,
            times: 2,
        },
    );
    state.inject_verdict([7; 32], InjectedVerdict::once(ScanState::Timeout));
    let mut seen = Vec::new();
    for n in 0..4 {
        let slot = state.try_reserve_upload(SENSOR).unwrap();
        let id = format!("s{n}");
        state.register_scan(slot, &id, None, [7; 32], 1, false);
        seen.push(state.scan(&id).unwrap());
    }
    let verdicts: Vec<_> = seen.iter().map(|s| s.state).collect();
    // scan_delay is zero by default: states are final at once.
    assert_eq!(
        verdicts,
        [
            ScanState::Error,
            ScanState::Error,
            ScanState::Timeout,
            ScanState::NotDetected
        ]
    );
}

#[test]
fn stuck_scan_holds_a_slot_until_deleted() {
    let state = SharedState::default();
    state.set_max_scans(Some(1));
    state.inject_verdict([3; 32], InjectedVerdict::once(ScanState::Processing));
    let slot = state.try_reserve_upload(SENSOR).unwrap();
    state.register_scan(slot, "stuck", None, [3; 32], 1, false);
    assert!(state.try_reserve_upload(SENSOR).is_none());
    assert!(state.delete(SENSOR, "stuck"));
    assert!(state.try_reserve_upload(SENSOR).is_some());
}

#[test]
fn upload_slots_count_toward_max_scans() {
    let state = SharedState::default();
    state.set_max_scans(Some(1));
    let slot = state.try_reserve_upload(SENSOR).unwrap();
    assert!(state.try_reserve_upload(SENSOR).is_none());
    drop(slot);
    assert!(state.try_reserve_upload(SENSOR).is_some());
}

#[test]
fn scan_delay_is_drawn_within_its_range() {
    let (lo, hi) = (Duration::from_secs(30), Duration::from_secs(120));
    assert_eq!(scans::scan_delay(lo, None, 0.7), lo);
    assert_eq!(scans::scan_delay(lo, Some(lo), 0.7), lo);
    assert_eq!(scans::scan_delay(hi, Some(lo), 0.7), hi);
    assert_eq!(scans::scan_delay(lo, Some(hi), 0.0), lo);
    assert_eq!(
        scans::scan_delay(lo, Some(hi), 0.5),
        Duration::from_secs(75)
    );
    for _ in 0..1000 {
        let d = scans::scan_delay(lo, Some(hi), rand::random::<f64>());
        assert!((lo..=hi).contains(&d), "{d:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn scans_with_a_delay_range_finish_within_it() {
    let state = SharedState::default();
    state.set_scan_delay_range(Duration::from_secs(1), Duration::from_secs(3));
    let ids: Vec<String> = (0..50).map(|n| format!("r{n}")).collect();
    for (n, id) in ids.iter().enumerate() {
        let slot = state.try_reserve_upload(SENSOR).unwrap();
        let sha = [u8::try_from(n).unwrap(); 32];
        state.register_scan(slot, id, None, sha, 1, false);
    }
    let final_count = |state: &SharedState| {
        ids.iter()
            .filter(|id| state.scan(id).unwrap().state != ScanState::Processing)
            .count()
    };
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(final_count(&state), 0, "none before the range starts");
    tokio::time::advance(Duration::from_millis(1002)).await;
    let middle = final_count(&state);
    assert!(
        0 < middle && middle < ids.len(),
        "spread over the range: {middle}"
    );
    tokio::time::advance(Duration::from_millis(1000)).await;
    assert_eq!(
        final_count(&state),
        ids.len(),
        "all by the end of the range"
    );
}
