//! Why a connection broke: a TLS handshake of its own, without a request.
//!
//! With TLS 1.3 a server that refuses our client certificate says so in an alert *after* the
//! client has finished its handshake, and then closes. The HTTP layer may meet that close first:
//! while writing the request (a broken pipe or reset), or before the request could even be sent
//! (hyper's "connection was not ready", or "connection closed before message completed"). The
//! alert is then lost and the failure looks like a passing network problem, to be retried for
//! ever, when the administrator must fix a certificate. Seen here as 3 `dropscan check` runs of
//! 300 against the emulator under CPU load.
//!
//! [`classify`] tells the two apart without a race: it connects, shakes hands with the same
//! TLS configuration, writes nothing and listens for [`LISTEN`]. A refusal arrives as an alert,
//! nothing else can arrive (the server waits for a request), so no write of ours can turn the
//! server's close into a reset that would drop the alert.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

use super::error::{ApiError, classify_tls};

/// How long the probe listens after its handshake for a refusal; a server that accepted us
/// sends nothing (it waits for a request).
const LISTEN: Duration = Duration::from_secs(1);

/// Where and how the probe connects: the client's own TLS configuration and server.
#[derive(Clone)]
pub(crate) struct Probe {
    tls: Arc<ClientConfig>,
    url: Url,
    connect_timeout: Duration,
}

impl Probe {
    pub(crate) fn new(tls: Arc<ClientConfig>, url: Url, connect_timeout: Duration) -> Probe {
        Probe {
            tls,
            url,
            connect_timeout,
        }
    }

    /// The TLS failure behind a broken connection ([`ApiError::ClientCertRefused`],
    /// [`ApiError::ServerNotTrusted`], [`ApiError::PinMismatch`], [`ApiError::NotTls`]), found
    /// by a handshake of its own; `None` when the handshake goes through and no refusal
    /// follows, or when the server cannot be reached (the original error then stands). Bounded:
    /// the connect timeout for connecting and shaking hands, then [`LISTEN`].
    pub(crate) async fn classify(&self) -> Option<ApiError> {
        let port = self.url.port_or_known_default()?;
        // An IPv6 literal comes in brackets; the name is checked as the certificate's.
        let host = self
            .url
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).ok()?;
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls));
        let handshake = async {
            let tcp = TcpStream::connect((host, port)).await.ok()?;
            tcp.set_nodelay(true).ok();
            Some(connector.connect(name, tcp).await)
        };
        let mut tls = match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(Some(Ok(tls))) => tls,
            Ok(Some(Err(e))) => return classify_tls(&e),
            Ok(None) | Err(_) => return None,
        };
        let mut byte = [0u8; 1];
        match tokio::time::timeout(LISTEN, tls.read(&mut byte)).await {
            Ok(Err(e)) => classify_tls(&e),
            // Data, a close, or silence: no refusal.
            Ok(Ok(_)) | Err(_) => None,
        }
    }
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}
