//! The emulator's network side: the TLS accept loop, HTTP routing and the five handlers.
//!
//! One task per connection: a rustls handshake that requires a client certificate from the
//! bundle's CA, then hyper-util's `auto` builder (HTTP/1.1 and HTTP/2 by ALPN) with a service that
//! knows the SHA-256 of the client's leaf certificate. Request bodies are streamed through multer,
//! never buffered. Shutdown is a `CancellationToken` (tell) plus a `TaskTracker` (wait): `stop()`
//! closes the listener and drops every open connection.
//!
//! When answering early (401, 413, 429, 500) to a POST whose body is still on the wire, the body
//! is read and discarded up to [`DRAIN_LIMIT`] first: closing a socket with unread data makes the
//! kernel send a reset, which can destroy the answer before the client reads it.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, BodyStream, Full};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::state::{ScanState, SharedState, parse_sensor_id};
use super::{CertBundle, EmulatorConfig, EmulatorError, ResultShape};

/// The root of every API path.
const API_PREFIX: &str = "/kata/scanner/v1/sensors/";
/// The EICAR anti-virus test string: content holding it anywhere is reported `detect`.
pub(crate) const EICAR: &[u8] =
    br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
/// Multipart framing allowed on top of `maxObjectSize` before a `Content-Length` alone earns 413.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;
/// Most bytes read and discarded before an early answer; beyond, the connection just closes.
pub const DRAIN_LIMIT: u64 = 8 * 1024 * 1024;
/// Most bytes of a text part (`scanId`, `objectType`).
const MAX_TEXT_PART: usize = 1024;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts emulator instances.
#[derive(Debug)]
pub struct Emulator;

impl Emulator {
    /// Binds, spawns the server on the current tokio runtime, returns at once.
    pub async fn start(
        config: EmulatorConfig,
        certs: &CertBundle,
    ) -> Result<EmulatorHandle, EmulatorError> {
        let state = SharedState::new(&config);
        serve(config.listen, certs, state).await
    }

    /// Same, reusing the state (scans, authorizations, counters) of a previous instance: used to
    /// simulate an outage (stop, then restart on the same port). The settings of `config`
    /// replace those held by `state`.
    pub async fn start_with_state(
        config: EmulatorConfig,
        certs: &CertBundle,
        state: SharedState,
    ) -> Result<EmulatorHandle, EmulatorError> {
        state.apply(&config);
        serve(config.listen, certs, state).await
    }
}

/// A running emulator. Dropping it stops accepting and closes connections without waiting;
/// [`EmulatorHandle::stop`] also waits until every connection is gone.
#[derive(Debug)]
pub struct EmulatorHandle {
    addr: SocketAddr,
    state: SharedState,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl EmulatorHandle {
    /// The address the listener is bound to (the real port when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://IP:PORT`; an unspecified listen address is replaced by the loopback address,
    /// which the generated server certificate covers.
    pub fn base_url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("https://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The state: runtime control and observation.
    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// Stops accepting AND closes open connections; the port is free afterwards.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn serve(
    listen: SocketAddr,
    certs: &CertBundle,
    state: SharedState,
) -> Result<EmulatorHandle, EmulatorError> {
    let acceptor = TlsAcceptor::from(tls_config(certs)?);
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| EmulatorError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| EmulatorError::Bind {
            addr: listen,
            source,
        })?;
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(accept_loop(
        listener,
        acceptor,
        state.clone(),
        shutdown.clone(),
        tasks.clone(),
    ));
    debug!(%addr, "emulator listening");
    Ok(EmulatorHandle {
        addr,
        state,
        shutdown,
        tasks,
    })
}

fn tls_config(certs: &CertBundle) -> Result<Arc<ServerConfig>, EmulatorError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(certs.ca_cert_der()?)?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.server_chain()?, certs.server_key()?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: SharedState,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, _peer)) => {
                tasks.spawn(connection(
                    tcp,
                    acceptor.clone(),
                    state.clone(),
                    shutdown.clone(),
                ));
            }
            // Typically EMFILE: wait a little instead of spinning.
            Err(error) => {
                debug!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // The listener is dropped here: the port is free once `stop` returns.
}

async fn connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    state: SharedState,
    shutdown: CancellationToken,
) {
    tcp.set_nodelay(true).ok();
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
    let tls = tokio::select! {
        biased;
        () = shutdown.cancelled() => return,
        tls = handshake => match tls {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                debug!(%error, "TLS handshake failed");
                return;
            }
            Err(_elapsed) => return,
        },
    };
    // The verifier required a certificate, so there is one; be defensive anyway.
    let Some(fingerprint) = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| <[u8; 32]>::from(Sha256::digest(leaf)))
    else {
        return;
    };
    // Cancelled by the `drop` fault (this connection only) or by `stop` (all).
    let closing = shutdown.child_token();
    let service = service_fn({
        let closing = closing.clone();
        move |req| handle(req, state.clone(), fingerprint, closing.clone())
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::select! {
        biased;
        () = closing.cancelled() => {}
        served = conn => if let Err(error) = served {
            debug!(%error, "connection ended with an error");
        },
    }
}

type Answer = Response<Full<Bytes>>;

/// The error a service returns to make hyper close the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by fault injection")]
struct Dropped;

fn roll(share: f64) -> bool {
    share > 0.0 && rand::random::<f64>() < share
}

async fn handle(
    req: Request<Incoming>,
    state: SharedState,
    fingerprint: [u8; 32],
    closing: CancellationToken,
) -> Result<Answer, Dropped> {
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
enum Endpoint<'a> {
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

fn parse_path(path: &str) -> Option<Endpoint<'_>> {
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
    if state.authorize(&sensor_id, fingerprint) != super::Authorization::Accepted {
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
            state.delete_all(&sensor_id);
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

fn results_answer(found: &[(String, ScanState)], shape: ResultShape) -> Answer {
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
                .map(|(id, st)| serde_json::json!({ "scanId": id, "state": [st.as_str()] }))
                .collect(),
        ),
    };
    json(&body)
}

/// What a POST's parts held, once read.
#[derive(Default)]
struct Form {
    scan_id: Option<String>,
    object_type: Option<String>,
    /// The `sensorInstanceId` form field, used when the query lacks it.
    sensor_instance_id: Option<String>,
    /// (SHA-256, size, EICAR found)
    content: Option<([u8; 32], u64, bool)>,
}

/// Why reading a form stopped early.
enum FormError {
    Malformed(&'static str),
    TooLarge,
}

async fn submit(
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

async fn read_form(
    body: Incoming,
    boundary: String,
    limit: Option<u64>,
    state: &SharedState,
) -> Result<Form, FormError> {
    let stream =
        BodyStream::new(body).try_filter_map(|frame| async move { Ok(frame.into_data().ok()) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut form = Form::default();
    let malformed = |_| FormError::Malformed("malformed multipart body");
    while let Some(mut field) = multipart.next_field().await.map_err(malformed)? {
        // A second part of the same name makes the form ambiguous (which content is scanned?).
        let duplicate = match field.name() {
            Some("scanId" | "scanID") => form.scan_id.is_some(),
            Some("objectType") => form.object_type.is_some(),
            Some("sensorInstanceId") => form.sensor_instance_id.is_some(),
            Some("content") => form.content.is_some(),
            _ => false,
        };
        if duplicate {
            return Err(FormError::Malformed("malformed form: a part is repeated"));
        }
        match field.name() {
            Some("scanId" | "scanID") => form.scan_id = Some(read_text(&mut field).await?),
            Some("objectType") => form.object_type = Some(read_text(&mut field).await?),
            Some("sensorInstanceId") => {
                form.sensor_instance_id = Some(read_text(&mut field).await?);
            }
            Some("content") => {
                let mut hasher = Sha256::new();
                let mut eicar = EicarSearch::default();
                let mut size: u64 = 0;
                while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                    let n = chunk.len() as u64;
                    size += n;
                    state.record_bytes(n);
                    if limit.is_some_and(|limit| size > limit) {
                        // Stop scanning; discard what follows (bounded) so the 413 reaches the
                        // client.
                        let mut drained: u64 = 0;
                        while drained < DRAIN_LIMIT {
                            match field.chunk().await {
                                Ok(Some(chunk)) => drained += chunk.len() as u64,
                                _ => break,
                            }
                        }
                        return Err(FormError::TooLarge);
                    }
                    hasher.update(&chunk);
                    eicar.feed(&chunk);
                }
                form.content = Some((hasher.finalize().into(), size, eicar.found()));
            }
            // Unknown parts are read and ignored (multer skips them on `next_field`).
            _ => {}
        }
    }
    Ok(form)
}

async fn read_text(field: &mut multer::Field<'_>) -> Result<String, FormError> {
    let mut text = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|_| FormError::Malformed("malformed multipart body"))?
    {
        text.extend_from_slice(&chunk);
        if text.len() > MAX_TEXT_PART {
            return Err(FormError::Malformed("text part too long"));
        }
    }
    String::from_utf8(text).map_err(|_| FormError::Malformed("text part is not UTF-8"))
}

/// `[A-Za-z0-9_-]{1,128}`: what the emulator accepts as a scanId.
pub(crate) fn valid_scan_id(scan_id: &str) -> bool {
    (1..=128).contains(&scan_id.len())
        && scan_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Finds [`EICAR`] anywhere in a stream of chunks, across chunk boundaries, keeping only the
/// last `EICAR.len() - 1` bytes between chunks.
#[derive(Debug, Default)]
pub(crate) struct EicarSearch {
    carry: Vec<u8>,
    found: bool,
}

impl EicarSearch {
    /// Looks at the next chunk.
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        if self.found || chunk.is_empty() {
            return;
        }
        let keep = EICAR.len() - 1;
        if !self.carry.is_empty() {
            let mut seam = self.carry.clone();
            seam.extend_from_slice(&chunk[..chunk.len().min(keep)]);
            if contains(&seam, EICAR) {
                self.found = true;
                return;
            }
        }
        if contains(chunk, EICAR) {
            self.found = true;
            return;
        }
        if chunk.len() >= keep {
            self.carry.clear();
            self.carry.extend_from_slice(&chunk[chunk.len() - keep..]);
        } else {
            self.carry.extend_from_slice(chunk);
            let excess = self.carry.len().saturating_sub(keep);
            self.carry.drain(..excess);
        }
    }

    /// Whether the string was seen.
    pub(crate) fn found(&self) -> bool {
        self.found
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, _)) = needle.split_first() else {
        return true;
    };
    let mut from = 0;
    while let Some(pos) = haystack[from..].iter().position(|&b| b == first) {
        let start = from + pos;
        if haystack.len() - start < needle.len() {
            return false;
        }
        if &haystack[start..start + needle.len()] == needle {
            return true;
        }
        from = start + 1;
    }
    false
}

/// Reads and discards up to [`DRAIN_LIMIT`] bytes of a body we answer early.
async fn drain(mut body: Incoming) {
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

/// Parses one query parameter: `&`-separated, `+` and `%XX` decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

fn percent_decode(s: &str) -> String {
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

fn text(status: StatusCode, body: &'static str) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    answer
}

fn json(value: &serde_json::Value) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(value.to_string())));
    answer
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    answer
}

fn too_many() -> Answer {
    text(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many simultaneous scan requests",
    )
}

fn too_large() -> Answer {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Object is larger than the maximum size",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eicar_found_across_every_split() {
        let mut content = b"some prefix bytes ".to_vec();
        content.extend_from_slice(EICAR);
        content.extend_from_slice(b" and a suffix");
        for chunk_size in 1..=content.len() {
            let mut search = EicarSearch::default();
            for chunk in content.chunks(chunk_size) {
                search.feed(chunk);
            }
            assert!(search.found(), "chunk size {chunk_size}");
        }
        // Split in two at every position.
        for at in 0..=content.len() {
            let mut search = EicarSearch::default();
            search.feed(&content[..at]);
            search.feed(&content[at..]);
            assert!(search.found(), "split at {at}");
        }
    }

    #[test]
    fn eicar_not_found_when_absent_or_broken() {
        let mut broken = EICAR.to_vec();
        broken[30] = b'x';
        for chunk_size in [1, 7, 68, 1000] {
            let mut search = EicarSearch::default();
            for chunk in broken.chunks(chunk_size) {
                search.feed(chunk);
            }
            assert!(!search.found());
        }
        let mut search = EicarSearch::default();
        search.feed(&EICAR[..40]);
        search.feed(b"gap");
        search.feed(&EICAR[40..]);
        assert!(!search.found());
    }

    #[test]
    fn scan_id_validation() {
        assert!(valid_scan_id("3f2a9c0d4e5b6a7f8091a2b3c4d5e6f7"));
        assert!(valid_scan_id("A-b_9"));
        assert!(valid_scan_id(&"a".repeat(128)));
        assert!(!valid_scan_id(""));
        assert!(!valid_scan_id(&"a".repeat(129)));
        assert!(!valid_scan_id("has space"));
        assert!(!valid_scan_id("report.pdf"));
        assert!(!valid_scan_id("../x"));
    }

    #[test]
    fn paths_route() {
        let s = "0b6b7a52-6c1e-4c1f-9d55-3d7a1c2b9e01";
        let p = |tail: &str| format!("{API_PREFIX}{s}{tail}");
        assert_eq!(parse_path(&p("/scans")), Some(Endpoint::Scans(s)));
        assert_eq!(parse_path(&p("/scans/state")), Some(Endpoint::State(s)));
        assert_eq!(parse_path(&p("/scans/filters")), Some(Endpoint::Filters(s)));
        assert_eq!(
            parse_path(&p("/scans/ab12")),
            Some(Endpoint::Scan(s, "ab12"))
        );
        assert_eq!(parse_path(&p("/scans/")), None);
        assert_eq!(parse_path(&p("/scans/a/b")), None);
        assert_eq!(parse_path(&p("/other")), None);
        assert_eq!(parse_path("/kata/scanner/v1/sensors//scans"), None);
    }

    #[test]
    fn query_decoding() {
        let q = Some("sensorInstanceId=node%2D1&state=detect,not%20detected,not+detected");
        assert_eq!(
            query_param(q, "sensorInstanceId").as_deref(),
            Some("node-1")
        );
        assert_eq!(
            query_param(q, "state").as_deref(),
            Some("detect,not detected,not detected")
        );
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
