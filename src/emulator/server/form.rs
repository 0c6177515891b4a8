//! The multipart form of `POST …/scans`, streamed through multer and never buffered: the text
//! parts, the `content` part hashed (SHA-256) and searched for EICAR on the fly and cut off past
//! `maxObjectSize`, a repeated part refused as ambiguous.

use futures_util::TryStreamExt;
use http_body_util::BodyStream;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use super::DRAIN_LIMIT;
use crate::emulator::state::SharedState;

/// The EICAR anti-virus test string: content holding it anywhere is reported `detect`.
pub(crate) const EICAR: &[u8] =
    br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// Most bytes of a text part (`scanId`, `objectType`).
const MAX_TEXT_PART: usize = 1024;

/// What a POST's parts held, once read.
#[derive(Default)]
pub(super) struct Form {
    /// The `scanId` (or `scanID`) part.
    pub(super) scan_id: Option<String>,
    /// The `objectType` part.
    pub(super) object_type: Option<String>,
    /// The `sensorInstanceId` form field, used when the query lacks it.
    pub(super) sensor_instance_id: Option<String>,
    /// (SHA-256, size, EICAR found)
    pub(super) content: Option<([u8; 32], u64, bool)>,
}

/// Why reading a form stopped early.
pub(super) enum FormError {
    /// 400 with this reason.
    Malformed(&'static str),
    /// 413: the content is larger than `maxObjectSize`.
    TooLarge,
}

pub(super) async fn read_form(
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
