//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use super::Metrics;

/// The `Content-Type` of `/metrics`: the Prometheus text format 0.0.4 (Prometheus 3 refuses a
/// target that sends none).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
    loop {
        let (stream, _) = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, std::convert::Infallible>(answer(req.uri().path(), metrics).await) }
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
                .ok();
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
