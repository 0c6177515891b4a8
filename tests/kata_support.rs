//! Test support for the KATA client: a throw-away PKI made with rcgen, client options built
//! from PEM strings, and a minimal raw HTTP/1.1-over-TLS server that records requests
//! byte-for-byte (to check the wire format) and answers from a script.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dropscan::kata::{ClientOptions, TlsOptions};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A sensorId in the documented form.
pub(super) const SENSOR_ID: &str = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";

/// A certificate authority that can issue server and client certificates.
pub(super) struct TestCa {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA certificate, DER.
    pub cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// An issued certificate with its key.
pub(super) struct Leaf {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Certificate DER.
    pub cert_der: CertificateDer<'static>,
    /// PKCS#8 key PEM.
    pub key_pem: String,
    /// PKCS#8 key DER.
    pub key_der: Vec<u8>,
}

impl Leaf {
    /// SHA-256 of the certificate DER, the value to pin.
    pub(super) fn fingerprint(&self) -> [u8; 32] {
        Sha256::digest(self.cert_der.as_ref()).into()
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl TestCa {
    /// A fresh CA named `name`.
    pub(super) fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub(super) fn server(&self) -> Leaf {
        self.leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate.
    pub(super) fn client(&self) -> Leaf {
        self.leaf(vec![], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, names: Vec<String>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "dropscan test");
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }
}

/// A self-signed server certificate for 127.0.0.1 (as KATA nodes often present).
pub(super) fn self_signed_server() -> Leaf {
    let mut params = CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "kata node");
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        cert_der: cert.der().clone(),
        key_pem: key.serialize_pem(),
        key_der: key.serialize_der(),
    }
}

/// Client options for `base` from PEM strings, with short test timeouts.
pub(super) fn client_options_from_pem(
    base: &str,
    client_cert_pem: &str,
    client_key_pem: &str,
    ca_pem: Option<&str>,
    pin: Option<[u8; 32]>,
) -> ClientOptions {
    let tls = TlsOptions::from_pem(
        client_cert_pem.as_bytes(),
        client_key_pem.as_bytes(),
        ca_pem.map(str::as_bytes),
        pin,
    )
    .unwrap();
    ClientOptions {
        base_url: base.parse().unwrap(),
        sensor_id: SENSOR_ID.into(),
        sensor_instance_id: Some("inst-1".into()),
        tls,
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        max_idle_per_host: 2,
    }
}

/// Which TLS versions the raw server offers.
#[derive(Clone, Copy, Debug)]
pub(super) enum ServerTls {
    /// TLS 1.2 and 1.3.
    Default,
    /// TLS 1.2 only: a refused client certificate fails the handshake itself.
    Tls12Only,
    /// TLS 1.3 only: a refused client certificate shows after the client's handshake ended.
    Tls13Only,
}

/// A server TLS configuration presenting `server` and requiring a client certificate from
/// `client_ca`.
pub(super) fn server_config(
    server: &Leaf,
    client_ca: &TestCa,
    versions: ServerTls,
) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(client_ca.cert_der.clone()).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let builder = ServerConfig::builder_with_provider(provider);
    let builder = match versions {
        ServerTls::Default => builder.with_safe_default_protocol_versions(),
        ServerTls::Tls12Only => builder.with_protocol_versions(&[&rustls::version::TLS12]),
        ServerTls::Tls13Only => builder.with_protocol_versions(&[&rustls::version::TLS13]),
    }
    .unwrap();
    let config = builder
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server.cert_der.clone()], server.key())
        .unwrap();
    Arc::new(config)
}

/// One request as received, byte for byte.
#[derive(Clone, Debug)]
pub(super) struct RawRequest {
    /// Request line and headers, up to (excluding) the blank line.
    pub head: String,
    /// The body, as many bytes as `Content-Length` said.
    pub body: Vec<u8>,
}

impl RawRequest {
    /// The request line, e.g. `GET /x HTTP/1.1`.
    pub(super) fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    /// The value of header `name` (case-insensitive), if present once or more (first wins).
    pub(super) fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Builds a complete HTTP/1.1 answer that closes the connection.
pub(super) fn answer(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Decides the answer to one request.
pub(super) type Responder = Arc<dyn Fn(&RawRequest) -> Vec<u8> + Send + Sync>;

/// A raw HTTP/1.1 server on 127.0.0.1; one request per connection.
pub(super) struct RawServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests received, in order.
    pub requests: mpsc::UnboundedReceiver<RawRequest>,
    task: tokio::task::JoinHandle<()>,
}

impl RawServer {
    /// Starts the server with `config`, answering with `responder`.
    pub(super) async fn start(config: Arc<ServerConfig>, responder: Responder) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (tx, requests) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let responder = responder.clone();
                tokio::spawn(async move {
                    let work = async {
                        let mut tls = acceptor.accept(tcp).await.ok()?;
                        let request = read_request(&mut tls).await?;
                        let reply = responder(&request);
                        tx.send(request).ok();
                        tls.write_all(&reply).await.ok()?;
                        tls.shutdown().await.ok()
                    };
                    tokio::time::timeout(Duration::from_secs(15), work)
                        .await
                        .ok();
                });
            }
        });
        RawServer {
            addr,
            requests,
            task,
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub(super) fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// The next recorded request (waits up to 5 s).
    pub(super) async fn next_request(&mut self) -> RawRequest {
        tokio::time::timeout(Duration::from_secs(5), self.requests.recv())
            .await
            .expect("no request within 5 s")
            .expect("server stopped")
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Option<RawRequest> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut body = buf[head_end + 4..].to_vec();
    let mut request = RawRequest {
        head,
        body: Vec::new(),
    };
    let len: usize = request
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if request.header("transfer-encoding").is_some() {
        // Recorded as is; the test fails on the header, the body is not de-chunked.
        request.body = body;
        return Some(request);
    }
    while body.len() < len {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    request.body = body;
    Some(request)
}
