//! [`KataClient`]: the five calls of the KATA scanner API over one pooled HTTPS (mutual TLS)
//! connection pool. It builds URLs, maps statuses to [`ApiError`] and reads answers with a size
//! cap; it does not retry, back off or decide what a verdict means — callers do.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use tracing::debug;

use super::error::{ApiError, body_excerpt};
use super::multipart::{Framing, UploadBody, UploadSource};
use super::probe::Probe;
use super::tls::{TlsOptions, client_config};
use super::wire::{Restrictions, ScanId, ScanResult, ScanState, parse_restrictions, parse_results};

/// Largest results answer read; beyond it the answer is a protocol error.
const MAX_RESULTS_BODY: usize = 16 * 1024 * 1024;
/// Largest answer read for every other call.
const MAX_SMALL_BODY: usize = 64 * 1024;
/// Slowest upload rate allowed before a submit times out: the submit timeout is
/// `request_timeout` plus the file size at this rate.
const MIN_UPLOAD_BYTES_PER_SEC: u64 = 64 * 1024;

/// Longest `Retry-After` honoured; a server asking for more gets this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(5 * 60);

/// Default total timeout of one non-upload request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default connect timeout (TCP and TLS handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of idle connections kept per host.
pub const DEFAULT_MAX_IDLE_PER_HOST: usize = 8;

/// Everything needed to build a [`KataClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `https://<central-node>[:port]`, with or without a trailing slash; a path prefix is kept.
    pub base_url: Url,
    /// The sensorId shown in KATA's "External systems".
    pub sensor_id: String,
    /// This agent's instance id, sent as the `sensorInstanceId` query parameter when set.
    pub sensor_instance_id: Option<String>,
    /// Client certificate, key and server trust.
    pub tls: TlsOptions,
    /// Total timeout of a non-upload request; uploads get this plus time for their size.
    pub request_timeout: Duration,
    /// Timeout of connecting (TCP and TLS handshake).
    pub connect_timeout: Duration,
    /// Idle connections kept per host.
    pub max_idle_per_host: usize,
}

/// The file an accepted submit sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// SHA-256 of the bytes actually sent; `None` for a tee ([`UploadSource::Tee`]), whose
    /// copying thread hashed every piece it handed over.
    pub sha256: Option<[u8; 32]>,
    /// How many file bytes were sent.
    pub bytes: u64,
}

/// The outcome of deleting one result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// 200: the result was deleted.
    Deleted,
    /// 404: there was no result for that scanId (already deleted).
    AlreadyGone,
}

/// The KATA scanner API client; cheap to clone, all clones share one connection pool.
#[derive(Clone, Debug)]
pub struct KataClient {
    inner: Arc<Inner>,
}

/// Told of every answer: the method and endpoint (`POST scans`, `GET scans/state`, …)
/// and the HTTP code, `None` when no answer came (a transport error). Used for metrics.
pub type AnswerObserver = Arc<dyn Fn(&'static str, Option<u16>) + Send + Sync>;

struct Inner {
    http: reqwest::Client,
    /// Finds the TLS refusal behind a broken connection ([`KataClient::diagnose_broken`]).
    probe: Probe,
    endpoints: Endpoints,
    request_timeout: Duration,
    observer: std::sync::OnceLock<AnswerObserver>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("endpoints", &self.endpoints)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl KataClient {
    /// Builds the client (TLS configuration, connection pool); no request is made.
    pub fn new(opts: ClientOptions) -> Result<Self, ApiError> {
        let endpoints = Endpoints::new(
            &opts.base_url,
            &opts.sensor_id,
            opts.sensor_instance_id.as_deref(),
        )?;
        let tls = client_config(&opts.tls).map_err(|e| ApiError::Setup {
            detail: e.to_string(),
        })?;
        let probe = Probe::new(
            Arc::new(tls.clone()),
            endpoints.base.clone(),
            opts.connect_timeout,
        );
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .http1_only()
            .https_only(true)
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.request_timeout)
            .pool_max_idle_per_host(opts.max_idle_per_host)
            .user_agent(concat!("dropscan/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiError::Setup {
                detail: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(KataClient {
            inner: Arc::new(Inner {
                http,
                probe,
                endpoints,
                request_timeout: opts.request_timeout,
                observer: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Installs the observer told of every answer (once; a second call is ignored).
    pub fn observe(&self, observer: AnswerObserver) {
        self.inner.observer.set(observer).ok();
    }

    /// The sensorId in every path.
    pub fn sensor_id(&self) -> &str {
        &self.inner.endpoints.sensor_id
    }

    /// The server base URL as configured.
    pub fn base_url(&self) -> &Url {
        &self.inner.endpoints.base
    }

    /// POST scans: streams `file` (exactly `len` bytes) as multipart part `content`; returns the
    /// SHA-256 of the bytes actually sent.
    pub async fn submit(
        &self,
        scan_id: &ScanId,
        file: impl Into<UploadSource>,
        len: u64,
    ) -> Result<Submitted, ApiError> {
        let framing = Framing::new(scan_id);
        let total = framing.total_len(len);
        let content_type = framing.content_type();
        let (body, digest_rx) = UploadBody::of(file.into(), len, framing);
        let timeout =
            self.inner.request_timeout + Duration::from_secs(len / MIN_UPLOAD_BYTES_PER_SEC);
        let request = self
            .inner
            .http
            .post(self.inner.endpoints.submit())
            .header(CONTENT_TYPE, content_type)
            .header(CONTENT_LENGTH, total)
            .timeout(timeout)
            .body(reqwest::Body::wrap(body));
        let answer = self.send("POST scans", request, MAX_SMALL_BODY).await?;
        let status = answer.status;
        match status.as_u16() {
            200..=299 => {}
            _ => return Err(self.status_error(&answer)),
        }
        // The body reports its digest only after reading the file exactly; an early answer
        // (before the upload completed) does not prove what the server received.
        let digest = digest_rx.await.map_err(|_| {
            ApiError::protocol(format!(
                "KATA answered {status} before the upload of {len} bytes completed"
            ))
        })?;
        debug!(scan_id = %scan_id, bytes = digest.bytes, sha256 = %digest.sha256.map(hex::encode).unwrap_or_default(), "submitted");
        Ok(Submitted {
            sha256: digest.sha256,
            bytes: digest.bytes,
        })
    }

    /// GET scans/state with the given states (always sends `state=`); 204, 404 and an empty
    /// body are an empty list.
    pub async fn results(&self, states: &[ScanState]) -> Result<Vec<ScanResult>, ApiError> {
        let url = self.inner.endpoints.state(states);
        let request = self.inner.http.get(url).timeout(self.inner.request_timeout);
        let answer = self
            .send("GET scans/state", request, MAX_RESULTS_BODY)
            .await?;
        match answer.status.as_u16() {
            200 => parse_results(&answer.body),
            204 | 404 => Ok(Vec::new()),
            201..=299 => parse_results(&answer.body),
            _ => Err(self.status_error(&answer)),
        }
    }

    /// DELETE scans/{scanId}: 200 → `Deleted`, 404 → `AlreadyGone`.
    pub async fn delete(&self, scan_id: &ScanId) -> Result<DeleteOutcome, ApiError> {
        let url = self.inner.endpoints.scan(scan_id);
        let request = self
            .inner
            .http
            .request(Method::DELETE, url)
            .timeout(self.inner.request_timeout);
        let answer = self
            .send("DELETE scans/{scanId}", request, MAX_SMALL_BODY)
            .await?;
        match answer.status.as_u16() {
            200..=299 => Ok(DeleteOutcome::Deleted),
            404 => Ok(DeleteOutcome::AlreadyGone),
            _ => Err(self.status_error(&answer)),
        }
    }

    /// DELETE scans: deletes every result of the sensor, other instances' too (admin use only).
    /// 404 (nothing to delete) counts as success.
    pub async fn delete_all(&self) -> Result<(), ApiError> {
        let url = self.inner.endpoints.scans_collection();
        let request = self
            .inner
            .http
            .request(Method::DELETE, url)
            .timeout(self.inner.request_timeout);
        let answer = self.send("DELETE scans", request, MAX_SMALL_BODY).await?;
        match answer.status.as_u16() {
            200..=299 | 404 => Ok(()),
            _ => Err(self.status_error(&answer)),
        }
    }

    /// GET scans/filters: the server's restrictions.
    pub async fn restrictions(&self) -> Result<Restrictions, ApiError> {
        self.restrictions_within(self.inner.request_timeout).await
    }

    /// GET scans/filters, given up after `timeout` (a transport error that says it timed out).
    pub async fn restrictions_within(&self, timeout: Duration) -> Result<Restrictions, ApiError> {
        let url = self.inner.endpoints.filters();
        let request = self
            .inner
            .http
            .get(url)
            .timeout(timeout.min(self.inner.request_timeout));
        // Why a connection broke is asked only within `timeout` (a health probe's cadence).
        let deadline = tokio::time::Instant::now() + timeout;
        let answer = self
            .send_until("GET scans/filters", request, MAX_SMALL_BODY, Some(deadline))
            .await?;
        match answer.status.as_u16() {
            204 => Ok(Restrictions::default()),
            200..=299 => parse_restrictions(&answer.body),
            _ => Err(self.status_error(&answer)),
        }
    }

    /// With TLS 1.3 a server refusing our client certificate says so in an alert after the
    /// handshake; the HTTP layer may see only the connection's end (a broken pipe or reset of
    /// the request's write, or a connection closed before the request could be sent), which
    /// would look retryable. On such an error a handshake of its own ([`Probe`]) tells the two
    /// apart: a TLS classification from it replaces the error.
    /// Past `deadline`, the error stands as it is.
    async fn diagnose_broken(
        &self,
        err: ApiError,
        deadline: Option<tokio::time::Instant>,
    ) -> ApiError {
        let ApiError::Transport { source } = &err else {
            return err;
        };
        if !is_broken_connection(source) {
            return err;
        }
        let probe = self.inner.probe.classify();
        let found = match deadline {
            Some(at) => tokio::time::timeout_at(at, probe).await.ok().flatten(),
            None => probe.await,
        };
        match found {
            Some(found) => {
                debug!(request_error = %err, "a connection broke; a TLS probe shows why");
                found.found_after_break()
            }
            None => err,
        }
    }

    /// Sends a request and reads the answer up to `cap` bytes: an answer announcing more, or
    /// streaming more, is a protocol error as soon as the cap is crossed (never buffered
    /// beyond it); an endless slow answer ends at the request's timeout.
    async fn send(
        &self,
        endpoint: &'static str,
        request: reqwest::RequestBuilder,
        cap: usize,
    ) -> Result<Answer, ApiError> {
        self.send_until(endpoint, request, cap, None).await
    }

    /// [`KataClient::send`], asking why a broken connection broke only until `deadline`.
    async fn send_until(
        &self,
        endpoint: &'static str,
        request: reqwest::RequestBuilder,
        cap: usize,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Answer, ApiError> {
        let observed = request.send().await;
        if let Some(observer) = self.inner.observer.get() {
            observer(
                endpoint,
                observed.as_ref().ok().map(|r| r.status().as_u16()),
            );
        }
        let mut response = match observed {
            Ok(response) => response,
            Err(e) => {
                return Err(self
                    .diagnose_broken(ApiError::from_reqwest(e), deadline)
                    .await);
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        if let Some(announced) = response.content_length()
            && announced > cap as u64
        {
            return Err(ApiError::protocol(format!(
                "the answer ({status}) announces {announced} bytes, more than the {cap} accepted"
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(ApiError::from_reqwest)? {
            if body.len() + chunk.len() > cap {
                return Err(ApiError::protocol(format!(
                    "the answer ({status}) is larger than the {cap} bytes accepted"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            body,
            retry_after,
        })
    }

    /// Maps a non-success answer to its error.
    fn status_error(&self, answer: &Answer) -> ApiError {
        status_error(
            answer.status,
            &answer.body,
            answer.retry_after,
            self.sensor_id(),
        )
    }
}

/// One answer, read within its cap.
struct Answer {
    status: StatusCode,
    body: Vec<u8>,
    /// `Retry-After`, parsed and capped.
    retry_after: Option<Duration>,
}

/// Parses a `Retry-After` value: delay-seconds (`120`) or an HTTP-date (`Wed, 21 Oct 2015
/// 07:28:00 GMT`, relative to `now`; a past date is zero). The result is capped at
/// [`MAX_RETRY_AFTER`]. Garbage, negative or fractional numbers and empty values are `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let wait = if value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a very long time": capped below.
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// True when the error chain says the connection ended under the request: a broken pipe, a
/// reset, an early end of stream, or hyper's "connection was not ready" (canceled) and
/// "connection closed before message completed".
fn is_broken_connection(err: &reqwest::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut depth = 0;
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && (h.is_canceled() || h.is_incomplete_message())
        {
            return true;
        }
        depth += 1;
        if depth > 32 {
            break;
        }
        next = e.source();
    }
    false
}

/// Maps a non-success status to its error (401, 413, 429, 5xx, other 4xx, anything else);
/// 429 and 5xx carry the answer's `Retry-After`.
fn status_error(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
    sensor_id: &str,
) -> ApiError {
    match status.as_u16() {
        401 => ApiError::Unauthorized {
            sensor_id: sensor_id.to_owned(),
        },
        413 => ApiError::TooLarge,
        429 => ApiError::Busy { retry_after },
        500..=599 => ApiError::Server {
            status: status.as_u16(),
            retry_after,
        },
        400..=499 => ApiError::Rejected {
            status: status.as_u16(),
            body: body_excerpt(body),
        },
        _ => ApiError::protocol(format!("unexpected status {status}")),
    }
}

/// The URLs of one sensor.
#[derive(Clone, Debug)]
struct Endpoints {
    base: Url,
    /// `{base}/kata/scanner/v1/sensors/{sensorId}/scans`, no query.
    scans: Url,
    sensor_id: String,
    sensor_instance_id: Option<String>,
}

impl Endpoints {
    fn new(
        base: &Url,
        sensor_id: &str,
        sensor_instance_id: Option<&str>,
    ) -> Result<Self, ApiError> {
        if base.scheme() != "https" {
            return Err(ApiError::Setup {
                detail: format!("the KATA base URL must be https://, got {base}"),
            });
        }
        if sensor_id.is_empty() {
            return Err(ApiError::Setup {
                detail: "the sensorId is empty".into(),
            });
        }
        let mut scans = base.clone();
        scans.set_query(None);
        scans.set_fragment(None);
        {
            let mut segments = scans.path_segments_mut().map_err(|()| ApiError::Setup {
                detail: format!("{base} cannot be a base URL"),
            })?;
            segments
                .pop_if_empty()
                .extend(["kata", "scanner", "v1", "sensors", sensor_id, "scans"]);
        }
        Ok(Endpoints {
            base: base.clone(),
            scans,
            sensor_id: sensor_id.to_owned(),
            sensor_instance_id: sensor_instance_id.map(str::to_owned),
        })
    }

    /// `scans` extended by `tail` segments, with `query` pairs (already encoded) after
    /// `sensorInstanceId`.
    fn build(&self, tail: &[&str], extra_query: Option<String>) -> Url {
        let mut url = self.scans.clone();
        if !tail.is_empty()
            && let Ok(mut segments) = url.path_segments_mut()
        {
            segments.extend(tail);
        }
        let mut query: Vec<String> = Vec::new();
        // Sent on every call, also on DELETE of one result and GET filters where the documented
        // syntax has no query: a client used against real servers sends it there, a server that
        // scopes results per instance needs it to find the scan, and the others ignore it.
        if let Some(id) = &self.sensor_instance_id {
            query.push(format!("sensorInstanceId={}", encode_query_value(id)));
        }
        query.extend(extra_query);
        if !query.is_empty() {
            url.set_query(Some(&query.join("&")));
        }
        url
    }

    /// POST target: `.../scans?sensorInstanceId=..`.
    fn submit(&self) -> Url {
        self.build(&[], None)
    }

    /// `.../scans/state?sensorInstanceId=..&state=detect,not%20detected,...`.
    fn state(&self, states: &[ScanState]) -> Url {
        let list = if states.is_empty() {
            &ScanState::ALL[..]
        } else {
            states
        };
        let value = list
            .iter()
            .map(|s| encode_query_value(s.as_wire()))
            .collect::<Vec<_>>()
            .join(",");
        self.build(&["state"], Some(format!("state={value}")))
    }

    /// `.../scans/{scanId}`.
    fn scan(&self, scan_id: &ScanId) -> Url {
        self.build(&[scan_id.as_str()], None)
    }

    /// `.../scans` for DELETE all, without `sensorInstanceId`: it deletes the results of every
    /// instance of the sensor (`purge-results` says so), and the documented syntax has no query;
    /// a server scoping results per instance would otherwise delete only this one's.
    fn scans_collection(&self) -> Url {
        let mut url = self.build(&[], None);
        url.set_query(None);
        url
    }

    /// `.../scans/filters`.
    fn filters(&self) -> Url {
        self.build(&["filters"], None)
    }
}

/// Percent-encodes a query value: everything but RFC 3986 unreserved characters, so a space
/// is `%20` (never `+`).
fn encode_query_value(s: &str) -> String {
    /// Everything but ALPHA / DIGIT / "-" / "." / "_" / "~" (RFC 3986, 2.3).
    const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    utf8_percent_encode(s, NOT_UNRESERVED).to_string()
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
