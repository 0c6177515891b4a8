//! Routing: fault injection (slow, dropped, 500 and 429 answers, `Retry-After`), the API path
//! parser, the method, sensorId and authorization checks, then the dispatch to the handlers.

use std::collections::HashSet;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};
use tokio_util::sync::CancellationToken;

use super::answer::{Answer, drain, json, text, too_many};
use super::counters::RequestCounters;
use super::handlers::{results_answer, submit};
use crate::emulator::Authorization;
use crate::emulator::state::{ScanState, SharedState, parse_sensor_id};

/// The root of every API path.
pub(super) const API_PREFIX: &str = "/kata/scanner/v1/sensors/";

/// The error a service returns to make hyper close the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by fault injection")]
pub(super) struct Dropped;

fn roll(share: f64) -> bool {
    share > 0.0 && rand::random::<f64>() < share
}

pub(super) async fn handle(
    req: Request<Incoming>,
    state: SharedState,
    fingerprint: [u8; 32],
    closing: CancellationToken,
    counters: Arc<RequestCounters>,
) -> Result<Answer, Dropped> {
    counters.request(req.method(), parse_path(req.uri().path()).as_ref());
    let settings = state.request_settings();
    let faults = &settings.faults;
    if roll(faults.slow_share) {
        tokio::time::sleep(faults.slow_delay).await;
    }
    if roll(faults.drop_share) {
        state.record_dropped();
        closing.cancel();
        return Err(Dropped);
    }
    let path = req.uri().path().to_owned();
    let endpoint = parse_path(&path);
    let submit = req.method() == Method::POST && matches!(endpoint, Some(Endpoint::Scans(_)));
    let chunked = submit && !req.headers().contains_key(CONTENT_LENGTH);
    let mut answer = if roll(faults.http_500_share) {
        drain(req.into_body()).await;
        text(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error")
    } else if submit && roll(faults.http_429_share) {
        drain(req.into_body()).await;
        too_many()
    } else {
        route(req, endpoint, &state, fingerprint, settings.max_object_size).await
    };
    if matches!(
        answer.status(),
        StatusCode::TOO_MANY_REQUESTS | StatusCode::INTERNAL_SERVER_ERROR
    ) && let Some(value) = faults
        .retry_after
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        answer.headers_mut().insert(RETRY_AFTER, value);
    }
    if submit {
        state.record_post_status(answer.status().as_u16(), chunked);
    }
    Ok(answer)
}

/// An API path, with its sensorId still raw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Endpoint<'a> {
    /// `…/scans`: POST submits, DELETE deletes all.
    Scans(&'a str),
    /// `…/scans/state`: GET.
    State(&'a str),
    /// `…/scans/filters`: GET.
    Filters(&'a str),
    /// `…/scans/{scanId}`: DELETE.
    Scan(&'a str, &'a str),
}

impl Endpoint<'_> {
    fn sensor(&self) -> &str {
        match self {
            Self::Scans(s) | Self::State(s) | Self::Filters(s) | Self::Scan(s, _) => s,
        }
    }

    fn allowed(&self) -> &'static [Method] {
        match self {
            Self::Scans(_) => &[Method::POST, Method::DELETE],
            Self::State(_) | Self::Filters(_) => &[Method::GET],
            Self::Scan(..) => &[Method::DELETE],
        }
    }
}

pub(super) fn parse_path(path: &str) -> Option<Endpoint<'_>> {
    let mut parts = path.strip_prefix(API_PREFIX)?.split('/');
    let sensor = parts.next().filter(|s| !s.is_empty())?;
    if parts.next()? != "scans" {
        return None;
    }
    let endpoint = match parts.next() {
        None => Endpoint::Scans(sensor),
        Some("state") => Endpoint::State(sensor),
        Some("filters") => Endpoint::Filters(sensor),
        Some(scan_id) if !scan_id.is_empty() => Endpoint::Scan(sensor, scan_id),
        Some(_) => return None,
    };
    parts.next().is_none().then_some(endpoint)
}

async fn route(
    req: Request<Incoming>,
    endpoint: Option<Endpoint<'_>>,
    state: &SharedState,
    fingerprint: [u8; 32],
    max_object_size: i64,
) -> Answer {
    let Some(endpoint) = endpoint else {
        drain(req.into_body()).await;
        return text(StatusCode::NOT_FOUND, "Not found");
    };
    if !endpoint.allowed().contains(req.method()) {
        drain(req.into_body()).await;
        let mut answer = text(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
        let allow = endpoint
            .allowed()
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        if let Ok(allow) = HeaderValue::from_str(&allow) {
            answer.headers_mut().insert(ALLOW, allow);
        }
        return answer;
    }
    let Some(sensor_id) = parse_sensor_id(endpoint.sensor()) else {
        drain(req.into_body()).await;
        return text(StatusCode::BAD_REQUEST, "sensorId must be a UUID");
    };
    if state.authorize(&sensor_id, fingerprint) != Authorization::Accepted {
        drain(req.into_body()).await;
        return text(StatusCode::UNAUTHORIZED, "Authorization required");
    }
    let query = req.uri().query().map(str::to_owned);
    let instance = query_param(query.as_deref(), "sensorInstanceId");
    match (endpoint, req.method().clone()) {
        (Endpoint::Scans(_), Method::POST) => {
            submit(req, state, &sensor_id, instance, max_object_size).await
        }
        (Endpoint::Scans(_), _) => {
            state.delete_all(&sensor_id, instance.as_deref());
            text(StatusCode::OK, "OK")
        }
        (Endpoint::State(_), _) => {
            let wanted = query_param(query.as_deref(), "state").map(|list| {
                list.split(',')
                    .filter_map(|s| ScanState::parse(s.trim()))
                    .collect::<HashSet<_>>()
            });
            let (found, shape) = state.query(&sensor_id, instance.as_deref(), wanted.as_ref());
            results_answer(&found, shape)
        }
        (Endpoint::Filters(_), _) => match state.filters() {
            Ok((max, version)) => {
                json(&serde_json::json!({ "maxObjectSize": max, "version": version }))
            }
            Err(404) => text(StatusCode::NOT_FOUND, "Not found"),
            Err(_) => text(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
        },
        (Endpoint::Scan(_, scan_id), _) => {
            if state.delete(&sensor_id, scan_id) {
                text(StatusCode::OK, "OK")
            } else {
                text(
                    StatusCode::NOT_FOUND,
                    "No scan results found for the specified ID",
                )
            }
        }
    }
}

/// Parses one query parameter: `&`-separated, `+` and `%XX` decoded.
pub(super) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
