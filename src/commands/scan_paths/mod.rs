//! `dropscan scan PATH… [--json]`: scans the given files and folders and reports, moving
//! nothing and writing no journal.
//!
//! It takes no lock, so it runs beside the agent (checking one suspicious file on a host where
//! the service runs is its most natural use): it touches neither the journal nor a staging
//! folder, its scanIds are fresh, it deletes only its own results, and the agent's poller
//! ignores results of scanIds it did not send.
//!
//! What is read: regular files only, folders recursively. Symbolic links are never followed
//! (a PATH that is a link, or a link met in a folder, is listed as skipped), nor are devices,
//! FIFOs or sockets. Each file is opened with `O_NOFOLLOW` and checked to be a regular file on
//! the open descriptor. Hard-linked files are read: nothing is moved, so a link cannot make
//! dropscan move or expose a file elsewhere; the verdict is for the bytes read.
//!
//! Exit codes: 0 every file clean; 1 something detected (wins over errors); 2 an error for some
//! file (unreadable, refused, no verdict within `server.scan_timeout`) and nothing detected;
//! 64 usage error; 78 configuration error.
//!
//! Progress on stderr: an indicatif bar (files, bytes, rate, ETA) on a terminal, a plain line
//! every [`PLAIN_EVERY`] otherwise. `--json` prints one document on stdout at the end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::error::{EXIT_DETECTED, EXIT_FILES_FAILED, EXIT_OK};
use crate::kata::{ApiError, KataClient, ScanId, ScanState};

mod drive;
pub use drive::run;

/// How often a plain progress line is written when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);
/// Upload attempts per file (429, 5xx and transport errors are retried).
const ATTEMPTS: u32 = 5;

/// One file's result, as printed in the JSON document.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FileResult {
    /// The path as found (the PATH given, or beneath it): its text, exact when it is UTF-8.
    #[serde(serialize_with = "lossy_path")]
    pub path: PathBuf,
    /// For a path that is not UTF-8 only: the hex of its bytes, exact
    /// ([`crate::fsops::names::insert_json`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 (hex) of the bytes uploaded; absent when not read.
    pub sha256: Option<String>,
    /// `detect`, `not detected`, `error`, `timeout` (as on the wire), or absent when no
    /// verdict came.
    #[serde(serialize_with = "wire_state")]
    pub verdict: Option<ScanState>,
    /// The scanId used.
    pub scan_id: Option<String>,
    /// Why there is no verdict, or why the entry was skipped.
    pub error: Option<String>,
    /// Not scanned on purpose (a symlink, a device, …): not an error.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// A path as JSON text (serde refuses a `PathBuf` that is not UTF-8; `path_hex` is exact).
fn wire_state<S: serde::Serializer>(v: &Option<ScanState>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(state) => s.serialize_str(state.as_wire()),
        None => s.serialize_none(),
    }
}

fn lossy_path<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

/// Totals of a run.
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct Totals {
    /// Files scanned (with or without a verdict).
    pub files: u64,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Files with `not detected`.
    pub clean: u64,
    /// Files with `detect`.
    pub detected: u64,
    /// Files without a verdict (or with `error`/`timeout`).
    pub errors: u64,
    /// Entries skipped on purpose.
    pub skipped: u64,
}

/// The JSON document.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Per-file results, in the order found.
    pub files: Vec<FileResult>,
    /// Totals.
    pub totals: Totals,
}

impl Report {
    /// Totals from the per-file results.
    pub fn new(mut files: Vec<FileResult>) -> Report {
        let mut t = Totals::default();
        for f in &mut files {
            f.path_hex = crate::fsops::names::json_hex(&f.path);
        }
        for f in &files {
            if f.skipped {
                t.skipped += 1;
                continue;
            }
            t.files += 1;
            if f.sha256.is_some() {
                t.bytes += f.size;
            }
            match f.verdict {
                Some(ScanState::NotDetected) => t.clean += 1,
                Some(ScanState::Detect) => t.detected += 1,
                _ => t.errors += 1,
            }
        }
        Report { files, totals: t }
    }

    /// 1 detected, else 2 errors, else 0.
    pub fn exit_code(&self) -> u8 {
        if self.totals.detected > 0 {
            EXIT_DETECTED
        } else if self.totals.errors > 0 {
            EXIT_FILES_FAILED
        } else {
            EXIT_OK
        }
    }
}

/// A regular file found: its path, its size when listed, and the PATH given it was found
/// beneath (the file itself when given by name).
pub type Listed = (PathBuf, u64, PathBuf);

/// Lists the regular files under `paths` (never through a symlink); the rest as skipped or
/// errors.
pub fn collect(paths: &[PathBuf]) -> (Vec<Listed>, Vec<FileResult>) {
    let (mut files, mut other) = (Vec::new(), Vec::new());
    let mut stack: Vec<(PathBuf, PathBuf)> =
        paths.iter().rev().map(|p| (p.clone(), p.clone())).collect();
    let top: std::collections::HashSet<PathBuf> = paths.iter().cloned().collect();
    while let Some((p, given)) = stack.pop() {
        match std::fs::symlink_metadata(&p) {
            Err(e) => other.push(FileResult {
                path: p,
                error: Some(format!("cannot read: {e}")),
                ..FileResult::default()
            }),
            Ok(m) if m.file_type().is_file() => files.push((p, m.len(), given)),
            Ok(m) if m.file_type().is_dir() => match std::fs::read_dir(&p) {
                Ok(rd) => {
                    let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
                    names.sort();
                    stack.extend(names.into_iter().rev().map(|n| (n, given.clone())));
                }
                Err(e) => other.push(FileResult {
                    path: p,
                    error: Some(format!("cannot list the folder: {e}")),
                    ..FileResult::default()
                }),
            },
            Ok(m) => {
                let what = if m.file_type().is_symlink() {
                    "a symbolic link (never followed)"
                } else {
                    "not a regular file"
                };
                // A link or device given by name is an error; one met inside a folder is
                // skipped.
                let explicit = top.contains(&p);
                other.push(FileResult {
                    path: p,
                    error: Some(format!("skipped: {what}")),
                    skipped: !explicit,
                    ..FileResult::default()
                });
            }
        }
    }
    (files, other)
}

/// Opens `path`, found beneath the PATH `given`, for reading without following a symlink
/// anywhere beneath `given` (a folder swapped for a link after it was listed is refused, not
/// followed); it must be a regular file.
fn open_regular(path: &Path, given: &Path) -> Result<(std::fs::File, u64), ScanFileError> {
    use rustix::fs::{Mode, OFlags};
    if let Ok(rel) = path.strip_prefix(given) {
        if !rel.as_os_str().is_empty() {
            let (parent, name) = crate::fsops::split_rel(rel)?;
            let top = crate::fsops::Dir::open_trusted(given)?;
            let dir = top.open_dir(parent)?;
            let (file, stamp) = dir.open_file(name)?;
            return Ok((file, stamp.size));
        }
    }
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| ScanFileError::Open(e.into()))?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(ScanFileError::Stat)?;
    if !meta.file_type().is_file() {
        return Err(ScanFileError::NotRegular);
    }
    Ok((file, meta.len()))
}

/// Why one file of a run has no scan.
#[derive(Debug, thiserror::Error)]
enum ScanFileError {
    /// Not beneath the PATH given, a link, or unreadable there.
    #[error(transparent)]
    Fs(#[from] crate::fsops::FsError),
    /// Opening the file named itself failed.
    #[error("cannot open: {0}")]
    Open(std::io::Error),
    /// Its status could not be read.
    #[error("cannot stat: {0}")]
    Stat(std::io::Error),
    /// A folder, FIFO, device, …
    #[error("not a regular file")]
    NotRegular,
    /// The server refused it (or the way to it failed for good).
    #[error(transparent)]
    Refused(ApiError),
    /// Busy, failing or unreachable on every attempt.
    #[error("not accepted after {ATTEMPTS} attempts: {0}")]
    GaveUp(ApiError),
}

/// Uploads one file, retrying what is retryable; the scanId and SHA-256 of the bytes sent.
async fn submit(
    client: &KataClient,
    path: &Path,
    given: &Path,
) -> Result<(ScanId, String, u64), ScanFileError> {
    let mut attempt = 1;
    loop {
        let (file, len) = open_regular(path, given)?;
        let scan_id = ScanId::generate();
        match client
            .submit(&scan_id, tokio::fs::File::from_std(file), len)
            .await
        {
            Ok(sent) => {
                // A file's body hashes what it sends (only a tee's does not, and this sends none).
                let sha = sent.sha256.ok_or_else(|| {
                    ScanFileError::Refused(ApiError::protocol("the upload reported no SHA-256"))
                })?;
                return Ok((scan_id, hex::encode(sha), sent.bytes));
            }
            Err(
                e @ (ApiError::Busy { .. } | ApiError::Server { .. } | ApiError::Transport { .. }),
            ) => {
                if attempt >= ATTEMPTS {
                    return Err(ScanFileError::GaveUp(e));
                }
                tokio::time::sleep(crate::limits::backoff(attempt, rand::random::<f64>())).await;
                attempt += 1;
            }
            Err(e) => return Err(ScanFileError::Refused(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn scan_never_reads_through_a_folder_swapped_for_a_symlink_after_listing() {
        // Someone scans a tree another user can write to; after it is listed, that user swaps
        // a subfolder for a symlink to a folder of secrets with the same file name.
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("tree");
        std::fs::create_dir_all(top.join("sub")).unwrap();
        std::fs::write(top.join("sub/notes.txt"), b"harmless").unwrap();
        let secrets = d.path().join("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        std::fs::write(secrets.join("notes.txt"), b"private key material").unwrap();
        let (files, _) = collect(std::slice::from_ref(&top));
        assert_eq!(files.len(), 1);
        std::fs::remove_file(top.join("sub/notes.txt")).unwrap();
        std::fs::remove_dir(top.join("sub")).unwrap();
        std::os::unix::fs::symlink(&secrets, top.join("sub")).unwrap();
        let read = open_regular(&files[0].0, &files[0].2)
            .ok()
            .map(|(mut f, _)| {
                let mut s = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut s).unwrap();
                s
            });
        assert_ne!(read.as_deref(), Some(&b"private key material"[..]));
    }
}
