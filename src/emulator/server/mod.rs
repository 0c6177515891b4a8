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
//!
//! Layout: this file starts and stops instances; `listener.rs` is the TLS accept loop and the
//! per-connection task; `routing.rs` the fault injection, the path parser and the dispatch;
//! `handlers.rs` the submit and results handlers; `form.rs` the multipart form reader with its
//! EICAR search; `answer.rs` the answer builders and the body drain; `counters.rs` the per-instance request
//! counters ([`RequestCounts`], printed by `dropscan emulate` when it stops). The scans and counters live
//! in the state (`super::state`), which knows nothing of HTTP.

mod answer;
mod counters;
mod form;
mod handlers;
mod listener;
mod routing;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::state::SharedState;
use super::{CertBundle, EmulatorConfig, EmulatorError};
use counters::RequestCounters;
pub use counters::RequestCounts;
use listener::{accept_loop, tls_config};

/// Most bytes read and discarded before an early answer; beyond, the connection just closes.
pub(crate) const DRAIN_LIMIT: u64 = 8 * 1024 * 1024;

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
    counters: Arc<RequestCounters>,
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

    /// The HTTP requests this instance received so far, by kind (see [`RequestCounts`]).
    pub fn request_counts(&self) -> RequestCounts {
        self.counters.snapshot()
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
    let counters = Arc::new(RequestCounters::default());
    tasks.spawn(accept_loop(
        listener,
        acceptor,
        state.clone(),
        shutdown.clone(),
        tasks.clone(),
        Arc::clone(&counters),
    ));
    debug!(%addr, "emulator listening");
    Ok(EmulatorHandle {
        addr,
        state,
        shutdown,
        tasks,
        counters,
    })
}
