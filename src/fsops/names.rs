//! Names: users' relative paths made safe to join under a folder, the names dropscan gives its
//! own files, file names made safe to print, and paths written losslessly into JSON.
//!
//! A legal user name is kept exactly in every destination: only our own additions (the ` (n)`
//! of a taken name, the `.dropscan.json` of a sidecar) may force a shortening, and the sidecar
//! then holds the full original path.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

/// Suffix of our temp files (a copy in progress, a sidecar being written).
pub const PARTIAL_SUFFIX: &str = ".dropscan-partial";
/// Suffix of a sidecar.
pub const SIDECAR_SUFFIX: &str = ".dropscan.json";
/// The longest file name Linux filesystems take.
pub const NAME_MAX: usize = 255;

/// Makes a relative path from a user's file names safe to join under a folder: root and prefix
/// components are dropped, `.` is dropped, `..` becomes `_..` (kept visible, never climbing),
/// and an empty result becomes `_`. A name ending like our own temp or sidecar files gets a `_`
/// so that nothing of ours can ever be mistaken for it. Names are otherwise kept exactly.
pub fn safe_relative(rel: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => out.push("_.."),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    if out.as_os_str().is_empty() {
        out.push("_");
    }
    if let Some(name) = out.file_name() {
        let b = name.as_bytes();
        if b.ends_with(PARTIAL_SUFFIX.as_bytes()) || b.ends_with(SIDECAR_SUFFIX.as_bytes()) {
            let mut name = b.to_vec();
            if name.len() >= NAME_MAX {
                name = shorten(&name, NAME_MAX - 1);
            }
            name.push(b'_');
            out.set_file_name(OsString::from_vec(name));
        }
    }
    out
}

/// Cuts a name to `max` bytes, keeping an extension of up to 16 bytes and never splitting a
/// UTF-8 character.
pub fn shorten(name: &[u8], max: usize) -> Vec<u8> {
    if name.len() <= max {
        return name.to_vec();
    }
    let ext_at = name
        .iter()
        .rposition(|b| *b == b'.')
        .filter(|i| *i > 0 && name.len() - i <= 16)
        .unwrap_or(name.len());
    let ext = &name[ext_at..];
    let mut keep = max.saturating_sub(ext.len()).min(ext_at);
    if let Ok(s) = std::str::from_utf8(&name[..ext_at]) {
        while keep > 0 && !s.is_char_boundary(keep) {
            keep -= 1;
        }
    }
    let mut out = name[..keep].to_vec();
    out.extend_from_slice(ext);
    out
}

/// `name (n).ext` for `name.ext` (n ≥ 1); the extension is the part after the last dot, unless
/// the name starts with its only dot. The stem is shortened when the result would not fit in
/// [`NAME_MAX`] bytes.
pub fn numbered(name: &OsStr, n: u32) -> OsString {
    let bytes = name.as_bytes();
    let dot = bytes.iter().rposition(|b| *b == b'.').filter(|i| *i > 0);
    let (stem, ext) = match dot {
        Some(i) => (&bytes[..i], &bytes[i..]),
        None => (bytes, &b""[..]),
    };
    let tag = format!(" ({n})");
    let room = NAME_MAX.saturating_sub(tag.len() + ext.len());
    let mut out = shorten(stem, room);
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(ext);
    OsString::from_vec(out)
}

/// The sidecar's name for a placed file `name`: `name.dropscan.json`, with `name` shortened
/// when the whole would not fit (the sidecar holds the full original path inside).
pub fn sidecar_name(name: &OsStr) -> OsString {
    let mut out = shorten(name.as_bytes(), NAME_MAX - SIDECAR_SUFFIX.len());
    out.extend_from_slice(SIDECAR_SUFFIX.as_bytes());
    OsString::from_vec(out)
}

/// `<placed>.dropscan.json`.
pub fn sidecar_path(placed: &Path) -> PathBuf {
    placed.with_file_name(sidecar_name(placed.file_name().unwrap_or_default()))
}

/// Only letters, digits, `-` and `_` of an instance id, for our temp names.
fn tag_of(instance: &str) -> String {
    instance
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect()
}

/// Whose copy a temp holds ([`copy_temp_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TempOf {
    /// The agent's placement of a staged file.
    Agent,
    /// A quarantine or failed tool's copy of a kept file.
    Tool,
}

/// The temp name of a copy, at the top of its destination root:
/// `.<tag>.<s|t><token>.<name>.dropscan-partial`. `tag` is the root's
/// ([`crate::root::instance_of`]); `token` says what the temp copies: for the agent the stem
/// of the record's staged name ([`staged_token`], a random id given at the claim: unique across
/// journals, so that a record of a new journal can never take an old temp for its own), for a
/// tool the content it must hold ([`content_token`]: a temp whose bytes do not hash to it is
/// partial). `name` is the user's file name (shortened to fit), so that a temp found without
/// its record still says what it holds. Deterministic for a record, so that a restart finds it;
/// `s` marks the agent's copies, `t` a tool's.
pub fn copy_temp_name(tag: &str, of: TempOf, token: &str, rel: &Path) -> OsString {
    let token: String = token
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(64)
        .collect();
    let kind = match of {
        TempOf::Agent => 's',
        TempOf::Tool => 't',
    };
    let head = format!(".{}.{kind}{token}.", tag_of(tag));
    let name = safe_relative(rel);
    let base = name.file_name().unwrap_or(OsStr::new("_")).as_bytes();
    let room = NAME_MAX.saturating_sub(head.len() + PARTIAL_SUFFIX.len());
    let mut out = head.into_bytes();
    out.extend_from_slice(&shorten(base, room));
    out.extend_from_slice(PARTIAL_SUFFIX.as_bytes());
    OsString::from_vec(out)
}

/// The token of the agent's copy of a staged file: its staged name's stem.
pub fn staged_token(staged: &Path) -> String {
    staged
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The token of a copy that must hold exactly the bytes of SHA-256 `sha`: its first 16 bytes,
/// in hex ([`token_matches`] tells whether a temp holds them).
pub fn content_token(sha: &[u8; 32]) -> String {
    hex::encode(&sha[..16])
}

/// Whether `sha` is the content a [`content_token`] names.
pub fn token_matches(token: &str, sha: &[u8; 32]) -> bool {
    token.len() == 32 && token.eq_ignore_ascii_case(&content_token(sha))
}

/// The temp name of a sidecar being written: `.<instance>.sidecar-<random>.dropscan-partial`.
pub fn sidecar_temp_name(instance: &str) -> OsString {
    OsString::from(format!(
        ".{}.sidecar-{}{PARTIAL_SUFFIX}",
        tag_of(instance),
        uuid::Uuid::new_v4().simple()
    ))
}

/// What one of this instance's temp names says ([`parse_temp_name`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Temp {
    /// A sidecar being written: never the only copy of anything.
    Sidecar,
    /// A copy ([`copy_temp_name`]): whose, the stem of its record's staged name, and the
    /// user's file name it holds.
    Copy {
        /// Whose copy it is.
        of: TempOf,
        /// The stem of the staged name of the record it copies.
        token: String,
        /// The user's file name it holds (perhaps shortened).
        name: OsString,
    },
    /// A copy named by an older version after its journal record id (`.<instance>.<id>.…`).
    Numbered(i64),
}

/// What one of our temp names says; `None`: not a temp of this instance (another agent's, or a
/// user's file).
pub fn parse_temp_name(name: &OsStr, instance: &str) -> Option<Temp> {
    let b = name.as_bytes();
    let head = format!(".{}.", tag_of(instance));
    let rest = b
        .strip_prefix(head.as_bytes())?
        .strip_suffix(PARTIAL_SUFFIX.as_bytes())?;
    if rest.starts_with(b"sidecar-") {
        return Some(Temp::Sidecar);
    }
    if let Some(id) = std::str::from_utf8(rest).ok().and_then(|s| s.parse().ok()) {
        return Some(Temp::Numbered(id));
    }
    let of = match rest.first()? {
        b's' => TempOf::Agent,
        b't' => TempOf::Tool,
        _ => return None,
    };
    let dot = rest.iter().position(|c| *c == b'.')?;
    let token = std::str::from_utf8(&rest[1..dot]).ok()?;
    if token.is_empty() || !token.bytes().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some(Temp::Copy {
        of,
        token: token.to_string(),
        name: OsString::from_vec(rest[dot + 1..].to_vec()),
    })
}

/// A path as it is safe to print in a text log or on a terminal: control characters (newline,
/// CR, ESC, tab, DEL …) and bytes that are not UTF-8 are escaped, so that a file name can
/// neither forge log lines nor send terminal escapes.
pub struct Shown<'a>(&'a Path);

/// Wraps `path` for printing; see [`Shown`].
pub fn shown(path: &Path) -> Shown<'_> {
    Shown(path)
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.as_os_str().as_bytes().utf8_chunks() {
            for c in chunk.valid().chars() {
                if c.is_control() {
                    match c {
                        '\n' => f.write_str("\\n")?,
                        '\r' => f.write_str("\\r")?,
                        '\t' => f.write_str("\\t")?,
                        c => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                    }
                } else if c == '\\' {
                    f.write_str("\\\\")?;
                } else {
                    fmt::Write::write_char(f, c)?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// A path in JSON output (tools' `--json`, hook events), lossless: `key` holds its text, exact
/// when the name is UTF-8; a name that is not UTF-8 has its invalid bytes shown as U+FFFD there
/// and, only then, `<key>_hex` beside it: the lower-case hex of its bytes, which is exact (two
/// such names that print alike still differ there).
pub fn insert_json(obj: &mut serde_json::Map<String, serde_json::Value>, key: &str, path: &Path) {
    obj.insert(key.to_owned(), path.to_string_lossy().into_owned().into());
    if let Some(hex) = json_hex(path) {
        obj.insert(format!("{key}_hex"), hex.into());
    }
}

/// The `<key>_hex` of [`insert_json`]: `None` for a UTF-8 name.
pub fn json_hex(path: &Path) -> Option<String> {
    path.to_str()
        .is_none()
        .then(|| hex::encode(path.as_os_str().as_bytes()))
}

/// Free text that may quote names (a journaled reason, an error, a server's verdict) as it is
/// safe to print on a terminal: control characters escaped as [`shown`] does; backslashes are
/// kept (the names inside were escaped when the text was made).
pub fn shown_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod json_and_text_tests {
    use super::*;

    #[test]
    fn free_text_is_shown_without_control_characters_and_paths_are_exact_in_json() {
        assert_eq!(
            shown_text("a\u{1b}]0;x\u{7}\nb\\c"),
            "a\\u{1b}]0;x\\u{7}\\nb\\c"
        );
        let bad = Path::new(OsStr::from_bytes(b"d/bad\xff.com"));
        assert_eq!(json_hex(bad).as_deref(), Some("642f626164ff2e636f6d"));
        assert_eq!(json_hex(Path::new("d/ok.com")), None);
        let mut obj = serde_json::Map::new();
        insert_json(&mut obj, "path", bad);
        assert_eq!(obj["path"], "d/bad\u{fffd}.com");
        assert_eq!(obj["path_hex"], "642f626164ff2e636f6d");
    }
}
