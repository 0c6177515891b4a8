//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.
//!
//! Anyone who can reach the port can talk to it (any local user, when it listens on 127.0.0.1),
//! so it must never cost the pipeline its descriptors or its CPU:
//! - at most [`MAX_CONNECTIONS`] connections are open at once; a new one beyond that closes
//!   the *oldest* (so idle connections cannot lock out a scraper or a health check: a fresh
//!   request is answered in milliseconds, long before it is the oldest);
//! - a client gets [`HEADER_READ_TIMEOUT`] to send each request head and [`CONNECTION_LIFETIME`]
//!   in all (a scraper simply reconnects);
//! - a failed `accept` (EMFILE, ENFILE, ENOBUFS …) pauses the loop for [`ACCEPT_ERROR_PAUSE`]
//!   instead of spinning, and is logged once per burst.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Metrics;

/// The `Content-Type` of `/metrics`: the Prometheus text format 0.0.4 (Prometheus 3 refuses a
/// target that sends none).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Connections open at once; a new one beyond that closes the oldest.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client gets to send a request head (the first, and each one on a kept-alive
/// connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection, requests included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (typically EMFILE: out of descriptors).
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(250);

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until `shutdown`. Binding
/// happens before this returns its future's first poll result, so a bind error is reported at
/// once.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics and health endpoint listening");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // One token per connection, oldest first; a connection cancels its own when it ends.
    let mut open: VecDeque<CancellationToken> = VecDeque::new();
    // Whether the last accept failed: a burst of failures is logged once.
    let mut failing = false;
    loop {
        let stream = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    failing = false;
                    s
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(
                            %addr,
                            error = %e,
                            "metrics endpoint cannot accept a connection; pausing it (out of file descriptors? see LimitNOFILE)"
                        );
                    }
                    failing = true;
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    }
                    continue;
                }
            },
        };
        open.retain(|t| !t.is_cancelled());
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // Full: the oldest connection makes room (its task ends and frees its slot).
                if let Some(oldest) = open.pop_front() {
                    oldest.cancel();
                }
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return Ok(()),
                    s = Arc::clone(&slots).acquire_owned() => match s {
                        Ok(s) => s,
                        Err(_) => return Ok(()), // Never closed.
                    },
                }
            }
        };
        let done = shutdown.child_token();
        open.push_back(done.clone());
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let _slot = slot;
            let _done = done.clone().drop_guard();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, std::convert::Infallible>(answer(req.uri().path(), metrics).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                () = done.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {}
            }
        });
    }
}

async fn answer(path: &str, metrics: Arc<Metrics>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => {
            // The journal summary is a blocking SQLite read.
            let body = tokio::task::spawn_blocking(move || metrics.render())
                .await
                .unwrap_or_default();
            (StatusCode::OK, CONTENT_TYPE, body)
        }
        "/healthz" => (StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
        "/readyz" => match metrics.readiness() {
            Ok(()) => (
                StatusCode::OK,
                "text/plain; charset=utf-8",
                "ready\n".into(),
            ),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("{why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".into(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}
