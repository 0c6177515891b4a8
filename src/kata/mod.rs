//! TEMPORARY STUB of the KATA client API (replaced on merge of branch `kata`).
#![allow(missing_docs, dead_code, clippy::unused_async)]
use std::path::Path;
use std::time::Duration;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub struct TlsOptions { pub client_chain: Vec<CertificateDer<'static>>, pub client_key: PrivateKeyDer<'static>, pub ca_roots: Option<Vec<CertificateDer<'static>>>, pub server_pin: Option<[u8; 32]> }
impl Clone for TlsOptions { fn clone(&self) -> Self { Self { client_chain: self.client_chain.clone(), client_key: self.client_key.clone_key(), ca_roots: self.ca_roots.clone(), server_pin: self.server_pin } } }
#[derive(Debug, thiserror::Error)] #[error("tls")] pub struct TlsError;
impl TlsOptions { pub fn from_pem_files(_a: &Path, _b: &Path, _c: Option<&Path>, _p: Option<[u8;32]>) -> Result<Self, TlsError> { Err(TlsError) } }
pub fn parse_fingerprint(_s: &str) -> Result<[u8;32], String> { Err(String::new()) }
pub struct ClientOptions { pub base_url: reqwest::Url, pub sensor_id: String, pub sensor_instance_id: Option<String>, pub tls: TlsOptions, pub request_timeout: Duration, pub connect_timeout: Duration, pub max_idle_per_host: usize }
#[derive(Clone)] pub struct KataClient;
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)] pub struct ScanId(String);
impl ScanId { pub fn generate() -> Self { ScanId(String::new()) } pub fn parse(s: &str) -> Result<Self, String> { Ok(ScanId(s.into())) } pub fn as_str(&self) -> &str { &self.0 } }
impl std::fmt::Display for ScanId { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(&self.0) } }
#[derive(Debug, Clone, PartialEq, Eq)] pub enum ScanState { Detect, NotDetected, Processing, Timeout, Error, Unknown(String) }
#[derive(Debug, Clone)] pub struct ScanResult { pub scan_id: String, pub state: ScanState }
pub struct Submitted { pub sha256: [u8; 32], pub bytes: u64 }
pub enum DeleteOutcome { Deleted, AlreadyGone }
#[derive(Debug, Clone, Default)] pub struct Restrictions { pub max_object_size: Option<u64>, pub version: Option<String> }
#[derive(Debug, thiserror::Error)] pub enum ApiError { #[error("unauthorized")] Unauthorized, #[error("too large")] TooLarge, #[error("busy")] Busy, #[error("server {status}")] Server { status: u16 }, #[error("rejected")] Rejected { status: u16, body: String }, #[error("not trusted")] ServerNotTrusted { detail: String }, #[error("pin")] PinMismatch { expected: String, got: String }, #[error("client cert")] ClientCertRefused { detail: String }, #[error("transport")] Transport { detail: String }, #[error("protocol")] Protocol { detail: String }, #[error("local")] Local { source: std::io::Error } }
impl ApiError { pub fn is_retryable(&self) -> bool { false } pub fn kind(&self) -> &'static str { "" } }
impl KataClient {
    pub fn new(_o: ClientOptions) -> Result<Self, ApiError> { Ok(KataClient) }
    pub async fn submit(&self, _s: &ScanId, _f: tokio::fs::File, _l: u64) -> Result<Submitted, ApiError> { Err(ApiError::Busy) }
    pub async fn results(&self, _s: &[ScanState]) -> Result<Vec<ScanResult>, ApiError> { Ok(vec![]) }
    pub async fn delete(&self, _s: &ScanId) -> Result<DeleteOutcome, ApiError> { Ok(DeleteOutcome::Deleted) }
    pub async fn delete_all(&self) -> Result<(), ApiError> { Ok(()) }
    pub async fn restrictions(&self) -> Result<Restrictions, ApiError> { Ok(Restrictions::default()) }
    pub fn sensor_id(&self) -> &str { "" }
    pub fn sensor_instance_id(&self) -> Option<&str> { None }
}
