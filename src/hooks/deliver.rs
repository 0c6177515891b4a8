//! One delivery of one event to one hook: a command (argv, the event on stdin, killed with its
//! process group on timeout) or an HTTPS POST (signed when the hook has a secret).
//!
//! What this file does not do: retry or queue (the runner does).

use std::process::Stdio;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::AsyncWriteExt;

use crate::config::{HookConfig, HookTarget};

/// Why a hook's client could not be set up, or one delivery failed; the journal keeps its text.
#[derive(Debug, thiserror::Error)]
pub(super) enum DeliveryError {
    /// A certificate of the hook's `ca_file` was refused.
    #[error("ca_file: {0}")]
    CaFile(#[source] rustls::Error),
    /// The TLS configuration could not be built.
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    /// The HTTP client could not be built.
    #[error("{0}")]
    Client(#[source] reqwest::Error),
    /// A URL hook without a client (its set-up failed).
    #[error("no HTTP client for this hook")]
    NoClient,
    /// The POST failed before an answer (the text names every cause in the chain).
    #[error("{}", chain(.0))]
    Send(#[source] reqwest::Error),
    /// The receiver answered with a status other than 2xx.
    #[error("{url} answered {status}")]
    Status {
        /// The hook's URL.
        url: String,
        /// Its answer.
        status: reqwest::StatusCode,
    },
    /// A command hook without a program.
    #[error("empty command")]
    EmptyCommand,
    /// The program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Waiting for the program failed.
    #[error("{program}: {source}")]
    Wait {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The program exited unsuccessfully.
    #[error("{program} exited with {status}")]
    Exited {
        /// The program.
        program: String,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// The program ran past the hook's timeout and was killed with its process group.
    #[error("{program} did not finish within {}; killed", humantime::format_duration(*timeout))]
    TimedOut {
        /// The program.
        program: String,
        /// The hook's timeout.
        timeout: std::time::Duration,
    },
}

/// An error and its sources, `: `-separated (reqwest hides the cause in the chain).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The header that carries the body's signature: `sha256=<hex HMAC-SHA256>`.
pub(crate) const SIGNATURE_HEADER: &str = "X-Dropscan-Signature";

/// `sha256=<lower-case hex HMAC-SHA256 of body keyed with secret>`.
pub(crate) fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length; this cannot fail.
    match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(body);
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        }
        Err(_) => String::new(),
    }
}

/// The HTTP client of a URL hook: its own CA bundle (`ca_file`) or the system's roots, no
/// redirects, the hook's timeout.
pub(super) fn client_for(hook: &HookConfig) -> Result<Option<reqwest::Client>, DeliveryError> {
    let HookTarget::Url { ca, .. } = &hook.target else {
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(certs) => {
            for c in certs {
                roots.add(c.clone()).map_err(DeliveryError::CaFile)?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for c in native.certs {
                roots.add(c).ok();
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(hook.timeout)
        .build()
        .map(Some)
        .map_err(DeliveryError::Client)
}

/// Delivers `event` (JSON text) to `hook`; `Err` says why it failed.
pub(super) async fn deliver(
    hook: &HookConfig,
    client: Option<&reqwest::Client>,
    event: &str,
) -> Result<(), DeliveryError> {
    match &hook.target {
        HookTarget::Command(argv) => run_command(argv, hook.timeout, event).await,
        HookTarget::Url { url, secret, .. } => {
            let Some(client) = client else {
                return Err(DeliveryError::NoClient);
            };
            let mut req = client
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(event.to_string());
            if let Some(s) = secret {
                req = req.header(SIGNATURE_HEADER, sign(&s.0, event.as_bytes()));
            }
            let answer = req.send().await.map_err(DeliveryError::Send)?;
            let status = answer.status();
            if status.is_success() {
                Ok(())
            } else {
                Err(DeliveryError::Status {
                    url: url.to_string(),
                    status,
                })
            }
        }
    }
}

/// Runs `argv` (no shell) in its own process group with `event` on stdin; exit 0 is success.
/// On timeout the whole group is killed (a script's children too).
async fn run_command(
    argv: &[String],
    timeout: std::time::Duration,
    event: &str,
) -> Result<(), DeliveryError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(DeliveryError::EmptyCommand);
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true);
    // dropscan ignores SIGIO (see `fsops::lease`), and an ignored signal stays ignored across
    // exec: the hook gets the default disposition back.
    // SAFETY: runs in the forked child before exec; `signal` is async-signal-safe, and only
    // sets a disposition (no handler, no memory touched).
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGIO, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| DeliveryError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = child.id();
    let mut stdin = child.stdin.take();
    let work = async {
        if let Some(mut s) = stdin.take() {
            // A command that does not read its stdin may exit first: its exit status decides.
            s.write_all(event.as_bytes()).await.ok();
            s.shutdown().await.ok();
        }
        child.wait().await
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(DeliveryError::Exited {
            program: program.clone(),
            status,
        }),
        Ok(Err(source)) => Err(DeliveryError::Wait {
            program: program.clone(),
            source,
        }),
        Err(_) => {
            if let Some(pid) =
                pid.and_then(|p| rustix::process::Pid::from_raw(i32::try_from(p).unwrap_or(0)))
            {
                rustix::process::kill_process_group(pid, rustix::process::Signal::KILL).ok();
            }
            child.kill().await.ok();
            Err(DeliveryError::TimedOut {
                program: program.clone(),
                timeout,
            })
        }
    }
}
