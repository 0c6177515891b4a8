//! The durable floor (issue 20): what the promises cost per file with nothing else, no network,
//! no threads, no async. The `small` scenario runs it on the same files as the agent and reports
//! the agent's CPU per file as a multiple of it.
//!
//! Per batch of [`BATCH`] files, in this order (each step one the README's crash section needs):
//! 1. the claim: rename each file from the inbox into a staging folder;
//! 2. read it and hash it (SHA-256); with the private copy, write the bytes read into a new file
//!    of our own in the same pass (create, write);
//! 3. one SQLite transaction recording the batch (`claimed` rows: name, size, digest), WAL,
//!    `synchronous = NORMAL`, cached statements, as the agent's journal uses rusqlite;
//! 4. one `syncfs`: the copies, the journal and the renames so far are durable before release;
//! 5. the release: rename each copy (or, without the copy, the staged file) into clean; with the
//!    copy, unlink the staged original;
//! 6. one transaction marking the batch `done` (made durable by the next batch's `syncfs`, and a
//!    last one at the end).
//!
//! CPU is `getrusage(RUSAGE_THREAD)` of the one thread that does the work, user + system.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use sha2::{Digest, Sha256};

/// Files per transaction and per `syncfs`.
pub(crate) const BATCH: usize = 64;

/// What one pass of the floor measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Floor {
    /// Files moved.
    pub files: usize,
    /// Wall time of the pass.
    pub wall: Duration,
    /// User + system CPU of the working thread.
    pub cpu: Duration,
}

impl Floor {
    /// CPU per file.
    pub(crate) fn cpu_per_file(&self) -> Duration {
        self.cpu / self.files.max(1) as u32
    }
    /// Files per second of wall time.
    pub(crate) fn files_per_s(&self) -> f64 {
        self.files as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// User + system CPU time of the calling thread.
fn thread_cpu() -> Result<Duration, String> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given, which points to
    // one we own; RUSAGE_THREAD is valid on Linux.
    #[allow(unsafe_code)]
    let (rc, usage) = unsafe {
        let rc = libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr());
        (rc, usage.assume_init())
    };
    if rc != 0 {
        return Err(format!("getrusage: {}", std::io::Error::last_os_error()));
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// Runs the floor over every file directly in `inbox`, with folders made under `work` (staging,
/// clean, the journal), on a thread of its own so that its CPU is its own.
pub(crate) fn run(inbox: &Path, work: &Path, private_copy: bool) -> Result<Floor, String> {
    let (inbox, work) = (inbox.to_owned(), work.to_owned());
    std::thread::Builder::new()
        .name("floor".into())
        .spawn(move || pass(&inbox, &work, private_copy))
        .map_err(|e| format!("floor thread: {e}"))?
        .join()
        .map_err(|_| "the floor thread panicked".to_owned())?
}

fn pass(inbox: &Path, work: &Path, private_copy: bool) -> Result<Floor, String> {
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| format!("{what}: {e}")
    };
    let (staging, clean) = (work.join("staging"), work.join("clean"));
    for dir in [&staging, &clean] {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(inbox)
        .map_err(io(inbox))?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| PathBuf::from(e.file_name()))
        .collect();
    names.sort();
    let db = journal(&work.join("floor.db")).map_err(|e| format!("floor journal: {e}"))?;
    let fs = File::open(work).map_err(io(work))?;
    let mut buf = vec![0u8; 1 << 20];

    let t0 = Instant::now();
    let c0 = thread_cpu()?;
    for batch in names.chunks(BATCH) {
        let mut rows = Vec::with_capacity(batch.len());
        for name in batch {
            let (from, staged) = (inbox.join(name), staging.join(name));
            // The claim rename (std's rename: the floor has no inbox to defend).
            #[allow(clippy::disallowed_methods)]
            std::fs::rename(&from, &staged).map_err(io(&from))?;
            let mut src = File::open(&staged).map_err(io(&staged))?;
            let copy_path = staging.join(format!(".{}.copy", name.display()));
            let mut copy = if private_copy {
                Some(File::create_new(&copy_path).map_err(io(&copy_path))?)
            } else {
                None
            };
            let (mut hasher, mut size) = (Sha256::new(), 0u64);
            loop {
                let n = src.read(&mut buf).map_err(io(&staged))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                if let Some(copy) = copy.as_mut() {
                    copy.write_all(&buf[..n]).map_err(io(&copy_path))?;
                }
                size += n as u64;
            }
            rows.push((name, size, hasher.finalize()));
        }
        let tx = db.unchecked_transaction().map_err(|e| e.to_string())?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO files (name, state, size, sha256) VALUES (?1, 'claimed', ?2, ?3)",
                )
                .map_err(|e| e.to_string())?;
            for (name, size, digest) in &rows {
                insert
                    .execute(params![
                        name.as_os_str().as_encoded_bytes(),
                        *size as i64,
                        digest.as_slice()
                    ])
                    .map_err(|e| e.to_string())?;
            }
        }
        tx.commit().map_err(|e| e.to_string())?;
        rustix::fs::syncfs(&fs).map_err(|e| format!("syncfs: {e}"))?;
        for name in batch {
            let staged = staging.join(name);
            let released = if private_copy {
                staging.join(format!(".{}.copy", name.display()))
            } else {
                staged.clone()
            };
            #[allow(clippy::disallowed_methods)]
            std::fs::rename(&released, clean.join(name)).map_err(io(&released))?;
            if private_copy {
                std::fs::remove_file(&staged).map_err(io(&staged))?;
            }
        }
        let tx = db.unchecked_transaction().map_err(|e| e.to_string())?;
        {
            let mut done = tx
                .prepare_cached("UPDATE files SET state = 'done' WHERE name = ?1")
                .map_err(|e| e.to_string())?;
            for name in batch {
                done.execute(params![name.as_os_str().as_encoded_bytes()])
                    .map_err(|e| e.to_string())?;
            }
        }
        tx.commit().map_err(|e| e.to_string())?;
    }
    rustix::fs::syncfs(&fs).map_err(|e| format!("syncfs: {e}"))?;
    let cpu = thread_cpu()? - c0;
    let wall = t0.elapsed();
    let placed = std::fs::read_dir(&clean).map_err(io(&clean))?.count();
    if placed != names.len() {
        return Err(format!("the floor placed {placed} of {}", names.len()));
    }
    Ok(Floor {
        files: names.len(),
        wall,
        cpu,
    })
}

fn journal(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS files (
             id INTEGER PRIMARY KEY,
             name BLOB NOT NULL UNIQUE,
             state TEXT NOT NULL,
             size INTEGER,
             sha256 BLOB
         );",
    )?;
    Ok(conn)
}
