//! Test data: deterministic pseudo-random files (a seeded xorshift, never the EICAR string), the
//! folders of one scenario, and counting what the agent placed.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A small deterministic generator (xorshift64*): the same seed gives the same files on every
/// machine.
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced by 1).
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0.0..1.0`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The folders of one scenario under `root`.
pub(crate) struct Layout {
    /// The scenario's folder: inbox, clean, quarantine, failed, state, logs.
    pub root: PathBuf,
    /// The watched folder.
    pub inbox: PathBuf,
}

impl Layout {
    /// Creates `root` afresh with an empty inbox.
    pub(crate) fn create(root: &Path) -> io::Result<Self> {
        if root.exists() {
            std::fs::remove_dir_all(root)?;
        }
        let inbox = root.join("inbox");
        std::fs::create_dir_all(&inbox)?;
        Ok(Layout {
            root: root.to_owned(),
            inbox,
        })
    }
}

/// Writes `size` pseudo-random bytes to `path` (parents created), 1 MiB at a time.
pub(crate) fn write_file(path: &Path, size: u64, rng: &mut Rng) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = File::create(path)?;
    let mut buf = vec![0u8; size.min(1 << 20) as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// `count` files of `size` bytes directly in `dir`: `f000000.bin`, …
pub(crate) fn write_many(dir: &Path, count: usize, size: u64, seed: u64) -> io::Result<u64> {
    let mut rng = Rng::new(seed);
    for i in 0..count {
        write_file(&dir.join(format!("f{i:06}.bin")), size, &mut rng)?;
    }
    Ok(count as u64 * size)
}

/// The mixed set: sizes log-uniform between 1 KiB and `max` bytes, in folders up to three
/// levels deep, at most `count` files and `budget` bytes. Returns (files, bytes).
pub(crate) fn write_mixed(
    dir: &Path,
    count: usize,
    max: u64,
    budget: u64,
    seed: u64,
) -> io::Result<(usize, u64)> {
    let mut rng = Rng::new(seed);
    let (lo, hi) = ((1024f64).ln(), (max as f64).ln());
    let (mut files, mut bytes) = (0, 0);
    for i in 0..count {
        let size = (lo + rng.unit() * (hi - lo)).exp() as u64;
        if bytes + size > budget {
            continue;
        }
        let depth = (rng.next_u64() % 4) as usize;
        let mut path = dir.to_owned();
        for level in 0..depth {
            path.push(format!("d{level}-{}", rng.next_u64() % 3));
        }
        path.push(format!("m{i:04}.dat"));
        write_file(&path, size, &mut rng)?;
        files += 1;
        bytes += size;
    }
    Ok((files, bytes))
}

/// Regular files under `dir`, recursively (0 when it does not exist).
pub(crate) fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        // Hidden names are the agent's temps (a copy being made, `.<instance>.<id>.dropscan-
        // partial`): counting one as placed stopped the clock before the copy was done.
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        match entry.file_type() {
            Ok(t) if t.is_dir() => n += count_files(&entry.path()),
            Ok(t) if t.is_file() => n += 1,
            _ => {}
        }
    }
    n
}

/// Files in clean, and data files (not `*.dropscan.json` sidecars) in quarantine and failed.
pub(crate) fn placed(root: &Path) -> [usize; 3] {
    let without_sidecars =
        |dir: &Path| count_files(dir).saturating_sub(count_suffix(dir, ".dropscan.json"));
    [
        count_files(&root.join("clean")),
        without_sidecars(&root.join("quarantine")),
        without_sidecars(&root.join("failed")),
    ]
}

fn count_suffix(dir: &Path, suffix: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(t) if t.is_dir() => n += count_suffix(&entry.path(), suffix),
            Ok(t) if t.is_file() && entry.file_name().to_string_lossy().ends_with(suffix) => {
                n += 1;
            }
            _ => {}
        }
    }
    n
}
