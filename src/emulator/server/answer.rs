//! Answer builders (plain text, JSON, 429, 413) and the bounded drain of a body answered early.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

use super::DRAIN_LIMIT;

pub(super) type Answer = Response<Full<Bytes>>;

/// Reads and discards up to [`DRAIN_LIMIT`] bytes of a body we answer early.
pub(super) async fn drain(mut body: Incoming) {
    let mut drained: u64 = 0;
    while drained < DRAIN_LIMIT {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    drained += data.len() as u64;
                }
            }
            _ => return,
        }
    }
}

pub(super) fn text(status: StatusCode, body: &'static str) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    answer
}

pub(super) fn json(value: &serde_json::Value) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(value.to_string())));
    answer
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    answer
}

pub(super) fn too_many() -> Answer {
    text(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many simultaneous scan requests",
    )
}

pub(super) fn too_large() -> Answer {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Object is larger than the maximum size",
    )
}
