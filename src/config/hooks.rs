//! `[[hook]]`: notifications of placements, as written ([`RawHook`]) and validated
//! ([`HookConfig`]). Each hook is either a command (an argv, never a shell; the event on its
//! stdin) or an HTTPS URL (the event POSTed as JSON, signed with HMAC-SHA256 when
//! `secret_file` is set). The secret file is checked like the client key: refused when other
//! users may read it, a warning when its group may.
//!
//! What this file does not do: deliver anything (`crate::hooks` does).

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;

use super::ConfigError;
use super::validate::Validator;

/// Built-in default for `hook.timeout`.
pub(crate) const DEFAULT_HOOK_TIMEOUT: &str = "10s";
/// Built-in default for `hook.max_attempts`.
pub(crate) const DEFAULT_HOOK_MAX_ATTEMPTS: u64 = 20;

/// An outcome a hook is told about (`hook.on`, written in lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookOn {
    /// Placed in clean.
    Clean,
    /// Placed in quarantine.
    Quarantine,
    /// Placed in failed.
    Failed,
    /// A verdict contradicted after the file was released as clean (not a placement).
    Anomaly,
}

impl HookOn {
    /// The outcome's name, as in the journal and the event.
    pub fn as_str(self) -> &'static str {
        match self {
            HookOn::Clean => "clean",
            HookOn::Quarantine => "quarantine",
            HookOn::Failed => "failed",
            HookOn::Anomaly => "anomaly",
        }
    }
}

/// `[[hook]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHook {
    /// Outcomes that trigger it.
    pub on: Vec<HookOn>,
    /// argv of a command (exclusive with `url`).
    pub command: Option<Vec<String>>,
    /// An https:// URL (exclusive with `command`).
    pub url: Option<String>,
    /// Longest one delivery may take.
    pub timeout: Option<String>,
    /// HMAC key file for `X-Dropscan-Signature` (url only).
    pub secret_file: Option<PathBuf>,
    /// CA bundle for the receiver's certificate (url only).
    pub ca_file: Option<PathBuf>,
    /// Deliveries tried before giving up.
    pub max_attempts: Option<i64>,
}

/// A secret that never reaches a log line.
#[derive(Clone)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a hook delivers.
#[derive(Debug, Clone)]
pub enum HookTarget {
    /// Run this argv (no shell), the event on stdin.
    Command(Vec<String>),
    /// POST the event to this URL.
    Url {
        /// The https:// URL.
        url: reqwest::Url,
        /// HMAC-SHA256 key for the signature header.
        secret: Option<Secret>,
        /// Trusted CAs for the receiver (default: the system's).
        ca: Option<Vec<CertificateDer<'static>>>,
    },
}

/// One `[[hook]]`, validated.
#[derive(Debug, Clone)]
pub struct HookConfig {
    /// Outcomes that trigger it.
    pub on: Vec<HookOn>,
    /// Where it delivers.
    pub target: HookTarget,
    /// Longest one delivery may take (a command is killed after it).
    pub timeout: Duration,
    /// Deliveries tried before giving up.
    pub max_attempts: u32,
}

impl HookConfig {
    /// The hook's identity in the journal's queue: its target (a command's argv as JSON, or
    /// the URL), so that a queued event finds its hook again after a restart or a reload.
    pub fn key(&self) -> String {
        match &self.target {
            HookTarget::Command(argv) => {
                format!(
                    "command:{}",
                    serde_json::to_string(argv).unwrap_or_default()
                )
            }
            HookTarget::Url { url, .. } => format!("url:{url}"),
        }
    }

    /// Whether placements with this outcome (`clean`, `quarantine`, `failed`), or anomalies
    /// (`anomaly`), trigger it.
    pub fn wants(&self, outcome: &str) -> bool {
        self.on.iter().any(|o| o.as_str() == outcome)
    }
}

impl Validator {
    /// Validates `[[hook]]` number `i`.
    pub(super) fn hook(&self, i: usize, raw: RawHook) -> Result<HookConfig, ConfigError> {
        let key = |k: &str| format!("hook[{i}].{k}");
        if raw.on.is_empty() {
            return Err(self.invalid(
                &key("on"),
                "is empty; list any of \"clean\", \"quarantine\", \"failed\", \"anomaly\"",
            ));
        }
        let timeout = self.duration(
            raw.timeout.as_deref(),
            DEFAULT_HOOK_TIMEOUT,
            &key("timeout"),
        )?;
        if timeout.is_zero() {
            return Err(self.invalid(&key("timeout"), "must be more than 0s"));
        }
        let max_attempts = self.positive(
            raw.max_attempts,
            DEFAULT_HOOK_MAX_ATTEMPTS,
            &key("max_attempts"),
            1000,
        )?;
        let target = match (raw.command, raw.url) {
            (Some(argv), None) => {
                if argv.first().is_none_or(|a| a.trim().is_empty()) {
                    return Err(self.invalid(
                        &key("command"),
                        "is empty; give the program and its arguments, e.g. [\"/usr/local/bin/notify\", \"--dropscan\"]",
                    ));
                }
                self.program(&key("command"), &argv[0])?;
                for k in [
                    ("secret_file", raw.secret_file.is_some()),
                    ("ca_file", raw.ca_file.is_some()),
                ] {
                    if k.1 {
                        return Err(self.invalid(&key(k.0), "is for a url hook, not a command"));
                    }
                }
                HookTarget::Command(argv)
            }
            (None, Some(url)) => {
                let parsed = reqwest::Url::parse(url.trim()).map_err(|e| {
                    let url = redact_userinfo(&url);
                    self.invalid(&key("url"), &format!("`{url}` is not a URL ({e})"))
                })?;
                if !parsed.username().is_empty() || parsed.password().is_some() {
                    // Refused rather than redacted: a URL is the hook's identity in the journal,
                    // and it travels into error texts (reqwest's, the receiver's, ours); only a
                    // URL without a secret in it is sure never to be written down.
                    return Err(self.invalid(
                        &key("url"),
                        &format!(
                            "`{}` holds a user name or password: it would be written into logs and the journal; remove it and authenticate the events with `secret_file` (an HMAC signature in X-Dropscan-Signature)",
                            redact_userinfo(&url),
                        ),
                    ));
                }
                if parsed.scheme() != "https" || parsed.host_str().is_none_or(str::is_empty) {
                    return Err(self.invalid(
                        &key("url"),
                        "must be an https:// URL with a host (events are sent over HTTPS only)",
                    ));
                }
                let secret = match raw.secret_file {
                    Some(p) => {
                        let p = self.path(&p, &key("secret_file"))?;
                        Some(Secret(self.read_secret(&p, &key("secret_file"))?))
                    }
                    None => None,
                };
                let ca = match raw.ca_file {
                    Some(p) => {
                        let p = self.path(&p, &key("ca_file"))?;
                        Some(self.read_ca(&p, &key("ca_file"))?)
                    }
                    None => None,
                };
                HookTarget::Url {
                    url: parsed,
                    secret,
                    ca,
                }
            }
            (Some(_), Some(_)) => {
                return Err(self.invalid(&key("url"), "give either `command` or `url`, not both"));
            }
            (None, None) => {
                return Err(self.invalid(&key("command"), "is missing: give `command` or `url`"));
            }
        };
        Ok(HookConfig {
            on: raw.on,
            target,
            timeout,
            max_attempts: u32::try_from(max_attempts).unwrap_or(u32::MAX),
        })
    }

    /// Reads an HMAC key file: refused if other users may read it (like the client key), a
    /// warning if its group may; trailing whitespace is not part of the key.
    fn read_secret(&self, path: &Path, key: &str) -> Result<Vec<u8>, ConfigError> {
        use std::os::unix::fs::PermissionsExt as _;
        self.regular_file(key, path, "the file that holds the secret")?;
        let fail =
            |e: std::io::Error| self.invalid(key, &format!("cannot read {}: {e}", path.display()));
        let mut file = std::fs::File::open(path).map_err(fail)?;
        let mode = file.metadata().map_err(fail)?.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            return Err(self.invalid(
                key,
                &format!(
                    "{} is readable by other users (mode {mode:04o}): run `chmod 600 {}`",
                    path.display(),
                    path.display()
                ),
            ));
        }
        if mode & 0o070 != 0 {
            tracing::warn!(
                "the hook secret file {} is readable by its group (mode {mode:04o}): run `chmod 600 {}` unless that group needs it",
                path.display(),
                path.display()
            );
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(fail)?;
        while bytes.last().is_some_and(u8::is_ascii_whitespace) {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(self.invalid(key, &format!("{} is empty", path.display())));
        }
        Ok(bytes)
    }

    /// A hook's program: an absolute path to an executable file. A relative one would depend
    /// on the service's working folder and `PATH`, which are not the administrator's shell's.
    fn program(&self, key: &str, program: &str) -> Result<(), ConfigError> {
        use std::os::unix::fs::PermissionsExt as _;
        let p = Path::new(program);
        if !p.is_absolute() {
            return Err(self.invalid(
                key,
                &format!(
                    "`{program}` is not an absolute path: give the program's full path (e.g. `/usr/local/bin/{}`); the service's working folder and PATH are not your shell's",
                    p.file_name().map_or_else(|| program.into(), |n| n.to_string_lossy())
                ),
            ));
        }
        self.regular_file(key, p, "the program to run")?;
        let mode = std::fs::metadata(p).map_or(0, |m| m.permissions().mode());
        if mode & 0o111 == 0 {
            return Err(self.invalid(
                key,
                &format!("{program} is not executable (mode {:04o})", mode & 0o7777),
            ));
        }
        Ok(())
    }

    /// Reads a PEM bundle of CA certificates (at least one).
    fn read_ca(&self, path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        let pem = std::fs::read(path)
            .map_err(|e| self.invalid(key, &format!("cannot read {}: {e}", path.display())))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.invalid(key, &format!("{} is not PEM: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(self.invalid(
                key,
                &format!("{} holds no CERTIFICATE block", path.display()),
            ));
        }
        Ok(certs)
    }
}

/// `text` with the user name and password of every URL in it replaced by `***`
/// (`https://user:pw@host` → `https://***@host`): for texts that may hold a URL written before
/// such URLs were refused (the journal's error history).
pub fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(userinfo_end) => {
                out.push_str("***");
                rest = &tail[userinfo_end..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}
