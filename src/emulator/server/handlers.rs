//! The handlers with more than a line to them: `POST …/scans` (the 429 check before the body,
//! the 413 checks, the form's parts, registration) and the `GET …/scans/state` answer in either
//! result shape. The form itself is read by `form.rs`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use tracing::debug;

use super::answer::{Answer, drain, json, text, too_large, too_many};
use super::form::{FormError, read_form, valid_scan_id};
use crate::emulator::ResultShape;
use crate::emulator::state::{ScanState, SharedState};

/// Multipart framing allowed on top of `maxObjectSize` before a `Content-Length` alone earns 413.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;

pub(super) fn results_answer(found: &[(String, ScanState)], shape: ResultShape) -> Answer {
    if found.is_empty() {
        let mut answer = Response::new(Full::new(Bytes::new()));
        *answer.status_mut() = StatusCode::NO_CONTENT;
        return answer;
    }
    let body = match shape {
        ResultShape::ScansObject => serde_json::json!({
            "scans": found
                .iter()
                .map(|(id, st)| serde_json::json!({ "scanId": id, "state": st.as_str() }))
                .collect::<Vec<_>>()
        }),
        ResultShape::DocArray => serde_json::Value::Array(
            found
                .iter()
                .map(|(id, st)| serde_json::json!({ "scanId": doc_scan_id(id), "state": [st.as_str()] }))
                .collect(),
        ),
    };
    json(&body)
}

/// A scanId as the docs' pseudo-struct types it, an integer, whenever it is one (digits, no
/// leading zero, within u64): clients can then be tested against numeric ids. Any other id
/// (the usual random hex) stays a string, since as a number it would not survive.
fn doc_scan_id(id: &str) -> serde_json::Value {
    let canonical = id == "0" || !id.starts_with('0');
    match id.parse::<u64>() {
        Ok(n) if canonical && id.bytes().all(|b| b.is_ascii_digit()) => serde_json::json!(n),
        _ => serde_json::json!(id),
    }
}

pub(super) async fn submit(
    req: Request<Incoming>,
    state: &SharedState,
    sensor_id: &str,
    instance: Option<String>,
    max_object_size: i64,
) -> Answer {
    // Checked before reading the body: a throttled client should not spend its upload.
    let Some(slot) = state.try_reserve_upload(sensor_id) else {
        drain(req.into_body()).await;
        return too_many();
    };
    let limit = u64::try_from(max_object_size).ok().filter(|n| *n > 0);
    let content_length = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(limit), Some(length)) = (limit, content_length) {
        if length > limit.saturating_add(MULTIPART_OVERHEAD) {
            drain(req.into_body()).await;
            return too_large();
        }
    }
    let boundary = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| multer::parse_boundary(v).ok());
    let Some(boundary) = boundary else {
        drain(req.into_body()).await;
        return text(StatusCode::BAD_REQUEST, "multipart/form-data expected");
    };
    let form = match read_form(req.into_body(), boundary, limit, state).await {
        Ok(form) => form,
        Err(FormError::TooLarge) => return too_large(),
        Err(FormError::Malformed(why)) => return text(StatusCode::BAD_REQUEST, why),
    };
    let Some(scan_id) = form.scan_id else {
        return text(StatusCode::BAD_REQUEST, "missing part scanId");
    };
    if !valid_scan_id(&scan_id) {
        return text(StatusCode::BAD_REQUEST, "invalid scanId");
    }
    match form.object_type.as_deref() {
        Some("file") => {}
        Some(_) => return text(StatusCode::BAD_REQUEST, "objectType must be file"),
        None => return text(StatusCode::BAD_REQUEST, "missing part objectType"),
    }
    let Some((sha256, size, eicar)) = form.content else {
        return text(StatusCode::BAD_REQUEST, "missing part content");
    };
    // The query is the documented place; a form field is the fallback some clients use.
    let instance = instance.or(form.sensor_instance_id.filter(|s| !s.is_empty()));
    state.register_scan(slot, &scan_id, instance, sha256, size, eicar);
    debug!(scan_id, size, "scan submitted");
    text(StatusCode::OK, "OK")
}
