//! The multipart upload body, driven by random scanIds, contents and read sizes: its length
//! equals the declared Content-Length and multer parses back exactly the three parts sent.

#![no_main]

use dropscan::kata::ScanId;
use dropscan::kata::multipart::encode_upload;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    // Layout: [id_len, chunk_lo, chunk_hi, id bytes..., content...]
    let [id_len, lo, hi, rest @ ..] = data else {
        return;
    };
    let id_len = usize::from(*id_len).min(rest.len());
    let (id_bytes, content) = rest.split_at(id_len);
    let Ok(id) = std::str::from_utf8(id_bytes) else {
        return;
    };
    let Ok(scan_id) = ScanId::parse(id) else {
        return;
    };
    let chunk = usize::from(u16::from_le_bytes([*lo, *hi])).max(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let encoded = rt
        .block_on(encode_upload(&scan_id, content, chunk))
        .expect("in-memory upload");
    assert_eq!(encoded.body.len() as u64, encoded.declared_len);
    assert_eq!(encoded.sha256, <[u8; 32]>::from(Sha256::digest(content)));
    let boundary = multer::parse_boundary(&encoded.content_type).expect("boundary");
    let body = bytes::Bytes::from(encoded.body);
    let parts = rt.block_on(async move {
        let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
        let mut form = multer::Multipart::new(stream, boundary);
        let mut parts = Vec::new();
        while let Some(field) = form.next_field().await.expect("multer parses") {
            let name = field.name().unwrap_or_default().to_owned();
            let filename = field.file_name().map(str::to_owned);
            parts.push((name, filename, field.bytes().await.expect("part").to_vec()));
        }
        parts
    });
    assert_eq!(parts.len(), 3);
    assert_eq!(
        parts[0],
        ("scanId".to_owned(), None, id.as_bytes().to_vec())
    );
    assert_eq!(parts[1], ("objectType".to_owned(), None, b"file".to_vec()));
    assert_eq!(
        parts[2],
        ("content".to_owned(), Some(id.to_owned()), content.to_vec())
    );
});
