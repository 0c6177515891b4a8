//! The `multipart/form-data` body of `POST scans`, built by hand so that its exact length is
//! known before the first byte is sent (a `Content-Length` request, never chunked).
//!
//! Parts, in order, between `--dropscan-<32 random hex digits>` boundaries: `scanId` (text),
//! `objectType` = `file`, then `content` with `filename="<scanId>"` (never the real name) and
//! `application/octet-stream`. The file is streamed in reads of at most `CHUNK_SIZE` (512 KiB,
//! less for a smaller file or the last piece) and hashed on the way; memory use does not depend
//! on its size. After the announced length one more read must report end of file. If the file
//! yields fewer or more bytes than announced, the body fails with a `LocalReadError` (the
//! upload is aborted, and the client reports `ApiError::Local`) instead of sending a body of
//! the wrong length. Only a body read exactly reports its `FileDigest` (SHA-256 and length of
//! the bytes sent), once, before the epilogue.
//!
//! [`encode_upload`] runs the same body in memory, for fuzzing and property tests.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::oneshot;

use super::error::LocalReadError;
use super::wire::ScanId;

/// Size of one read from the file. Each read of a `tokio::fs::File` is a hop to the blocking
/// pool: 64 KiB reads made a 1 GiB upload 16,384 hops; 512 KiB keeps memory per upload small
/// (small files read only their size) and the hops few.
const CHUNK_SIZE: usize = 512 * 1024;

/// What an upload reads the file's bytes from: the file itself, streamed (each read a hop to the
/// blocking pool), or, for a small file, its bytes read beforehand in one blocking call
/// ([`UploadSource::read_small`]). Either way the body hashes exactly what it sends, and checks
/// the announced length against what the source yields.
#[derive(Debug)]
pub enum UploadSource {
    /// Streamed from the open file.
    File(tokio::fs::File),
    /// Read beforehand: the file's bytes, and at most one more (a file that grew after its
    /// stamp was taken is then refused by the body as longer than announced).
    Memory(io::Cursor<Vec<u8>>),
    /// Handed over piece by piece by the thread that copies the file into its private inode
    /// (the tee, `fsops::own::own_teeing`); the end of the file is the sender's drop. A copy
    /// that stops early (its owning failed) ends the stream early, and the body then fails as
    /// shorter than announced.
    Tee(Tee),
}

/// The receiving end of a tee ([`UploadSource::Tee`]): the pieces not yet read.
#[derive(Debug)]
pub struct Tee {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    piece: Bytes,
}

impl Tee {
    /// Pieces in flight between the copying thread and the body at most (each at most the copy
    /// buffer's 1 MiB): memory per tee is bounded whatever the file's size.
    pub const PIECES: usize = 4;

    /// A tee and the sender its copying thread feeds.
    pub fn new() -> (tokio::sync::mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel(Self::PIECES);
        (
            tx,
            Tee {
                rx,
                piece: Bytes::new(),
            },
        )
    }
}

impl AsyncRead for Tee {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.piece.is_empty() {
            match ready!(this.rx.poll_recv(cx)) {
                Some(piece) => this.piece = piece,
                // The sender is gone: the end of the file (or of a copy that stopped).
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.piece.len().min(buf.remaining());
        buf.put_slice(&this.piece.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl UploadSource {
    /// Files up to this size are read beforehand rather than streamed.
    pub const SMALL: u64 = 64 * 1024;

    /// The source for an open file announced as `len` bytes: read now, in the calling (blocking)
    /// thread, when `len` is at most [`Self::SMALL`]; streamed otherwise.
    pub fn read_small(file: std::fs::File, len: u64) -> io::Result<Self> {
        use std::io::Read as _;
        if len > Self::SMALL {
            return Ok(UploadSource::File(tokio::fs::File::from_std(file)));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0) + 1);
        (&file).take(len + 1).read_to_end(&mut bytes)?;
        Ok(UploadSource::Memory(io::Cursor::new(bytes)))
    }
}

impl From<tokio::fs::File> for UploadSource {
    fn from(file: tokio::fs::File) -> Self {
        UploadSource::File(file)
    }
}

impl AsyncRead for UploadSource {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UploadSource::File(f) => Pin::new(f).poll_read(cx, buf),
            UploadSource::Memory(m) => Pin::new(m).poll_read(cx, buf),
            UploadSource::Tee(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

/// The framing around the file bytes of one upload.
#[derive(Clone, Debug)]
pub(crate) struct Framing {
    /// The random boundary, without the leading `--`.
    pub(crate) boundary: String,
    /// Everything before the file bytes.
    pub(crate) preamble: Bytes,
    /// Everything after the file bytes.
    pub(crate) epilogue: Bytes,
}

impl Framing {
    /// Frames an upload of `scan_id` with a fresh random boundary.
    pub(crate) fn new(scan_id: &ScanId) -> Self {
        let boundary = format!("dropscan-{:032x}", rand::random::<u128>());
        Self::with_boundary(scan_id, boundary)
    }

    /// Frames an upload of `scan_id` with the given boundary.
    pub(crate) fn with_boundary(scan_id: &ScanId, boundary: String) -> Self {
        // scanId is [A-Za-z0-9_-]+ (ScanId::parse), so it needs no quoting or escaping.
        let id = scan_id.as_str();
        let preamble = format!(
            "--{boundary}\r\n\
             Content-Disposition: form-data; name=\"scanId\"\r\n\r\n\
             {id}\r\n\
             --{boundary}\r\n\
             Content-Disposition: form-data; name=\"objectType\"\r\n\r\n\
             file\r\n\
             --{boundary}\r\n\
             Content-Disposition: form-data; name=\"content\"; filename=\"{id}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        );
        let epilogue = format!("\r\n--{boundary}--\r\n");
        Framing {
            boundary,
            preamble: Bytes::from(preamble),
            epilogue: Bytes::from(epilogue),
        }
    }

    /// The `Content-Type` header value.
    pub(crate) fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    /// The exact body length for a file of `file_len` bytes.
    pub(crate) fn total_len(&self, file_len: u64) -> u64 {
        self.preamble.len() as u64 + file_len + self.epilogue.len() as u64
    }
}

/// What the body reports once the file part has been read completely and exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileDigest {
    /// SHA-256 of the file bytes sent (`None`: not hashed here, [`UploadBody::unhashed`]).
    pub(crate) sha256: Option<[u8; 32]>,
    /// How many file bytes were sent.
    pub(crate) bytes: u64,
}

enum Stage {
    Preamble,
    File,
    /// The file gave its `len` bytes; one more read must report end of file, then the
    /// epilogue follows.
    CheckEof,
    Done,
}

/// The streaming upload body: preamble, file bytes, epilogue; exact `size_hint`.
pub(crate) struct UploadBody<R> {
    reader: R,
    framing: Framing,
    stage: Stage,
    file_len: u64,
    file_left: u64,
    /// Bytes of the whole body not yet yielded; drives `size_hint`.
    body_left: u64,
    buf: BytesMut,
    hasher: Option<Sha256>,
    digest_tx: Option<oneshot::Sender<FileDigest>>,
}

impl UploadBody<UploadSource> {
    /// The body of an upload from `source`. It hashes what it sends, unless the source hashes
    /// what it hands over itself (a tee: the copying thread hashes each piece it sends, and its
    /// digest is the one compared): one pass less over a big file's bytes, and a digest without
    /// SHA-256.
    pub(crate) fn of(
        source: UploadSource,
        file_len: u64,
        framing: Framing,
    ) -> (Self, oneshot::Receiver<FileDigest>) {
        let hashed_by_source = matches!(source, UploadSource::Tee(_));
        let (body, digest_rx) = Self::new(source, file_len, framing);
        if hashed_by_source {
            (body.unhashed(), digest_rx)
        } else {
            (body, digest_rx)
        }
    }
}

impl<R: AsyncRead + Unpin> UploadBody<R> {
    /// A body sending `reader`'s `file_len` bytes framed by `framing`; the receiver gets the
    /// digest once the file has been read exactly.
    pub(crate) fn new(
        reader: R,
        file_len: u64,
        framing: Framing,
    ) -> (Self, oneshot::Receiver<FileDigest>) {
        let (digest_tx, digest_rx) = oneshot::channel();
        let body = UploadBody {
            reader,
            body_left: framing.total_len(file_len),
            framing,
            stage: Stage::Preamble,
            file_len,
            file_left: file_len,
            buf: BytesMut::new(),
            hasher: Some(Sha256::new()),
            digest_tx: Some(digest_tx),
        };
        (body, digest_rx)
    }

    /// The same body without hashing what it sends. The digest then has no SHA-256.
    fn unhashed(mut self) -> Self {
        self.hasher = None;
        self
    }

    fn fail(&mut self, err: LocalReadError) -> Poll<Option<Result<Frame<Bytes>, LocalReadError>>> {
        self.stage = Stage::Done;
        // No digest for a failed upload: the receiver sees a closed channel.
        self.digest_tx = None;
        Poll::Ready(Some(Err(err)))
    }

    fn emit(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, LocalReadError>>> {
        self.body_left = self.body_left.saturating_sub(data.len() as u64);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn poll_file(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, LocalReadError>>> {
        let want = usize::try_from(self.file_left).map_or(CHUNK_SIZE, |left| left.min(CHUNK_SIZE));
        self.buf.reserve(want);
        // Read at most `want` bytes so the file part never exceeds the announced length.
        let mut limited = (&mut self.reader).take(want as u64);
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut limited),
            cx,
            &mut self.buf
        ));
        match read {
            Err(e) => self.fail(LocalReadError::new(e.kind(), format!("read error: {e}"))),
            Ok(0) => {
                let sent = self.file_len - self.file_left;
                self.fail(LocalReadError::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the file ended after {sent} bytes, {} were announced (it shrank)",
                        self.file_len
                    ),
                ))
            }
            Ok(n) => {
                let chunk = self.buf.split().freeze();
                if let Some(h) = self.hasher.as_mut() {
                    h.update(&chunk);
                }
                self.file_left -= n as u64;
                if self.file_left == 0 {
                    self.stage = Stage::CheckEof;
                }
                self.emit(chunk)
            }
        }
    }

    fn poll_check_eof(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, LocalReadError>>> {
        let mut probe = [0u8; 1];
        let mut probe_buf = tokio::io::ReadBuf::new(&mut probe);
        match ready!(Pin::new(&mut self.reader).poll_read(cx, &mut probe_buf)) {
            Err(e) => self.fail(LocalReadError::new(e.kind(), format!("read error: {e}"))),
            Ok(()) if !probe_buf.filled().is_empty() => self.fail(LocalReadError::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the file is longer than the {} bytes announced (it grew)",
                    self.file_len
                ),
            )),
            Ok(()) => {
                let sha256 = self.hasher.take().map(|h| <[u8; 32]>::from(h.finalize()));
                if let Some(tx) = self.digest_tx.take() {
                    // The receiver may be gone if the request was dropped; nothing to do then.
                    tx.send(FileDigest {
                        sha256,
                        bytes: self.file_len,
                    })
                    .ok();
                }
                let epilogue = self.framing.epilogue.clone();
                self.stage = Stage::Done;
                self.emit(epilogue)
            }
        }
    }
}

impl<R: AsyncRead + Unpin> Body for UploadBody<R> {
    type Data = Bytes;
    type Error = LocalReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match this.stage {
            Stage::Preamble => {
                this.stage = if this.file_left == 0 {
                    Stage::CheckEof
                } else {
                    Stage::File
                };
                let preamble = this.framing.preamble.clone();
                this.emit(preamble)
            }
            Stage::File => this.poll_file(cx),
            Stage::CheckEof => this.poll_check_eof(cx),
            Stage::Done => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.stage, Stage::Done)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.body_left)
    }
}

/// One upload body built in memory, for fuzzing and property tests of the framing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedUpload {
    /// The `Content-Type` header value (with the boundary).
    pub content_type: String,
    /// The `Content-Length` the client would declare.
    pub declared_len: u64,
    /// The bytes the streaming body actually produced.
    pub body: Vec<u8>,
    /// The SHA-256 the body reported for the file bytes.
    pub sha256: [u8; 32],
}

/// Runs the real streaming body of `POST scans` over `content` (read in small pieces through
/// `chunk` bytes at a time, to exercise every seam) and collects what it sends. For fuzz targets
/// and property tests: the framing logic is the one used on the wire.
pub async fn encode_upload(
    scan_id: &ScanId,
    content: &[u8],
    chunk: usize,
) -> Result<EncodedUpload, io::Error> {
    use http_body_util::BodyExt as _;
    let framing = Framing::new(scan_id);
    let content_type = framing.content_type();
    let declared_len = framing.total_len(content.len() as u64);
    let reader = ChunkedReader {
        data: content,
        chunk: chunk.max(1),
    };
    let (body, digest_rx) = UploadBody::new(reader, content.len() as u64, framing);
    let collected = body
        .collect()
        .await
        .map_err(|e| io::Error::new(e.kind, e.message))?
        .to_bytes();
    let digest = digest_rx
        .await
        .map_err(|_| io::Error::other("the body reported no digest"))?;
    Ok(EncodedUpload {
        content_type,
        declared_len,
        body: collected.to_vec(),
        sha256: digest
            .sha256
            .ok_or_else(|| io::Error::other("the body reported no SHA-256"))?,
    })
}

/// An `AsyncRead` over a slice that yields at most `chunk` bytes per read.
struct ChunkedReader<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for ChunkedReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn id() -> ScanId {
        ScanId::parse("0123456789abcdef0123456789abcdef").unwrap()
    }

    async fn collect(
        data: Vec<u8>,
        len: u64,
    ) -> (Result<Vec<u8>, LocalReadError>, Option<FileDigest>, Framing) {
        let framing = Framing::new(&id());
        let (mut body, rx) = UploadBody::new(std::io::Cursor::new(data), len, framing.clone());
        assert_eq!(body.size_hint().exact(), Some(framing.total_len(len)));
        let mut out = Vec::new();
        let mut result = Ok(());
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    out.extend_from_slice(f.data_ref().unwrap());
                    // The hint always equals what is still to come.
                    assert_eq!(
                        body.size_hint().exact(),
                        Some(framing.total_len(len) - out.len() as u64)
                    );
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        drop(body);
        (result.map(|()| out), rx.await.ok(), framing)
    }

    #[tokio::test]
    async fn framing_exact_length_and_layout() {
        for size in [
            0usize,
            1,
            100,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            3 * CHUNK_SIZE + 7,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let (out, digest, framing) = collect(data.clone(), size as u64).await;
            let out = out.unwrap();
            assert_eq!(
                out.len() as u64,
                framing.total_len(size as u64),
                "size {size}"
            );
            let digest = digest.unwrap();
            assert_eq!(digest.bytes, size as u64);
            assert_eq!(digest.sha256, Some(<[u8; 32]>::from(Sha256::digest(&data))));
            let b = &framing.boundary;
            let expected_head = format!(
                "--{b}\r\nContent-Disposition: form-data; name=\"scanId\"\r\n\r\n{id}\r\n\
                 --{b}\r\nContent-Disposition: form-data; name=\"objectType\"\r\n\r\nfile\r\n\
                 --{b}\r\nContent-Disposition: form-data; name=\"content\"; filename=\"{id}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n",
                id = id()
            );
            assert!(out.starts_with(expected_head.as_bytes()));
            let tail = format!("\r\n--{b}--\r\n");
            assert!(out.ends_with(tail.as_bytes()));
            assert_eq!(&out[expected_head.len()..out.len() - tail.len()], &data[..]);
        }
    }

    /// A tee's body sends the pieces handed over and leaves hashing to the copying thread (its
    /// digest has no SHA-256); the body of a file read beforehand hashes what it sends.
    #[tokio::test]
    async fn only_a_tee_body_is_unhashed() {
        let data = b"piece one, piece two".to_vec();
        let len = data.len() as u64;
        let (tx, tee) = Tee::new();
        tx.send(Bytes::from_static(b"piece one, ")).await.unwrap();
        tx.send(Bytes::from_static(b"piece two")).await.unwrap();
        drop(tx);
        let memory = UploadSource::Memory(io::Cursor::new(data.clone()));
        for (source, hashed) in [(UploadSource::Tee(tee), false), (memory, true)] {
            let (body, rx) = UploadBody::of(source, len, Framing::new(&id()));
            let sent = body.collect().await.unwrap().to_bytes();
            assert!(sent.windows(data.len()).any(|w| w == &data[..]));
            let digest = rx.await.unwrap();
            assert_eq!(digest.bytes, len);
            let expected = hashed.then(|| <[u8; 32]>::from(Sha256::digest(&data)));
            assert_eq!(digest.sha256, expected);
        }
    }

    #[tokio::test]
    async fn multer_parses_our_body() {
        let data = b"hello\r\n--not-a-boundary\r\n".to_vec();
        let (out, _, framing) = collect(data.clone(), data.len() as u64).await;
        let stream = futures_util::stream::once(async move {
            Ok::<_, std::io::Error>(Bytes::from(out.unwrap()))
        });
        let mut mp = multer::Multipart::new(stream, framing.boundary.clone());
        let mut names = Vec::new();
        while let Some(field) = mp.next_field().await.unwrap() {
            let name = field.name().unwrap().to_owned();
            let file_name = field.file_name().map(str::to_owned);
            let bytes = field.bytes().await.unwrap();
            if name == "content" {
                assert_eq!(file_name.as_deref(), Some(id().as_str()));
                assert_eq!(&bytes[..], &data[..]);
            }
            names.push(name);
        }
        assert_eq!(names, ["scanId", "objectType", "content"]);
    }

    #[tokio::test]
    async fn shorter_file_fails() {
        let (out, digest, _) = collect(vec![1; 10], 11).await;
        assert_eq!(out.unwrap_err().kind, io::ErrorKind::UnexpectedEof);
        assert!(digest.is_none());
    }

    #[tokio::test]
    async fn longer_file_fails() {
        let (out, digest, _) = collect(vec![1; 12], 11).await;
        assert_eq!(out.unwrap_err().kind, io::ErrorKind::InvalidData);
        assert!(digest.is_none());
        let (out, _, _) = collect(vec![1; 1], 0).await;
        assert!(out.is_err());
    }

    /// The body over a small file read beforehand: the same checks as over the streamed file
    /// (what it yields is what is hashed and sent; shorter or longer than announced fails).
    #[tokio::test]
    async fn a_small_file_read_beforehand_is_sent_and_checked_like_a_streamed_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        for (announced, expect) in [
            (10, Ok(())),
            (9, Err(io::ErrorKind::InvalidData)),
            (11, Err(io::ErrorKind::UnexpectedEof)),
        ] {
            let source =
                UploadSource::read_small(std::fs::File::open(&path).unwrap(), announced).unwrap();
            assert!(matches!(source, UploadSource::Memory(_)));
            let (body, rx) = UploadBody::new(source, announced, Framing::new(&id()));
            let sent = body.collect().await.map(|b| b.to_bytes());
            match expect {
                Ok(()) => {
                    let sent = sent.unwrap();
                    assert!(sent.windows(10).any(|w| w == b"0123456789"));
                    let digest = rx.await.unwrap();
                    assert_eq!(digest.bytes, 10);
                    assert_eq!(
                        digest.sha256,
                        Some(<[u8; 32]>::from(Sha256::digest(b"0123456789")))
                    );
                }
                Err(kind) => {
                    assert_eq!(sent.unwrap_err().kind, kind);
                    assert!(rx.await.is_err());
                }
            }
        }
        let big = dir.path().join("big");
        std::fs::write(&big, vec![7u8; UploadSource::SMALL as usize + 1]).unwrap();
        let source =
            UploadSource::read_small(std::fs::File::open(&big).unwrap(), UploadSource::SMALL + 1)
                .unwrap();
        assert!(matches!(source, UploadSource::File(_)));
    }

    #[test]
    fn boundaries_differ() {
        assert_ne!(Framing::new(&id()).boundary, Framing::new(&id()).boundary);
    }
}
