//! The TLS side: the server configuration (client certificate required, h2 and http/1.1 by
//! ALPN), the accept loop, and one task per connection that hands requests to `routing::handle`
//! with the client certificate's SHA-256. Knows nothing of the API's paths.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
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

use super::counters::RequestCounters;
use super::routing::handle;
use crate::emulator::state::SharedState;
use crate::emulator::{CertBundle, EmulatorError};

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn tls_config(certs: &CertBundle) -> Result<Arc<ServerConfig>, EmulatorError> {
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

pub(super) async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: SharedState,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    counters: Arc<RequestCounters>,
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
                    Arc::clone(&counters),
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
    counters: Arc<RequestCounters>,
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
    counters.connection();
    // Cancelled by the `drop` fault (this connection only) or by `stop` (all).
    let closing = shutdown.child_token();
    let service = service_fn({
        let closing = closing.clone();
        move |req| {
            handle(
                req,
                state.clone(),
                fingerprint,
                closing.clone(),
                Arc::clone(&counters),
            )
        }
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
