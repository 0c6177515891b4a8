//! Unit tests of the emulator's state: authorization, injected verdicts, the 429 bookkeeping.

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
