//! The subcommands: each loads what it needs, runs, and turns the outcome into an exit code.
//!
//! Exit codes (sysexits, mapped in [`crate::error::api_exit_code`]): 0 ok; 64 usage error
//! (clap's own, and `purge-results` without `--yes`; never 2, which `scan` and the tools use for
//! failed files and refusals); 78 configuration
//! error (including a client key readable by others or not matching its certificate); 77 the
//! server refuses us (401, client certificate refused); 76 the server is not who it should be
//! (untrusted certificate, pin mismatch) or answers garbage (plain HTTP or no TLS on the port,
//! unparsable answers); 75 another `run`/`scan` holds the state folder's lock; 69 unavailable
//! (unreachable, 5xx, fatal runtime error).
//!
//! `check --offline`, `run` (and `scan` of the inboxes) first try the writes the agent needs
//! ([`app::preflight`]): what a restart cannot fix is a configuration error, printed alike
//! (`config error: FILE:LINE: key …`) and exiting 78 from each, never 69.
//!
//! Human output escapes every name (`fsops::shown`): a file name is the inbox writer's choice.
//!
//! `check` also prints the client certificate's expiry, and treats a 404/405 on
//! `GET …/scans/filters` as a warning: TLS and authorization succeeded, some KATA versions
//! just lack the route.

use std::path::Path;
use std::process::ExitCode;

use crate::cli::Command;
use crate::config::{Config, LogFormat};
use crate::error::{EXIT_CONFIG, EXIT_UNAVAILABLE, api_exit_code};
pub use crate::error::{EXIT_NOPERM, EXIT_PROTOCOL};
use crate::kata::{ApiError, KataClient};
use crate::{app, demo, logging, signal};

pub mod anomalies;
mod custody;
pub mod failed;
pub mod generate;
pub mod man;
mod moves;
pub mod quarantine;
pub mod scan;
pub mod scan_paths;
pub mod tools;

/// Runs one subcommand.
pub async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Run { config } => run(&config.path).await,
        Command::Scan {
            config,
            max_time,
            paths,
            json,
        } => scan::run(&config.path, max_time, &paths, json).await,
        Command::Demo {
            dir,
            poll_interval,
            settle,
            exit_after,
        } => {
            logging::init(LogFormat::Text, "warn");
            match demo::run(&dir, poll_interval, settle, exit_after).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dropscan demo: {e:#}");
                    ExitCode::from(EXIT_UNAVAILABLE)
                }
            }
        }
        Command::Emulate(args) => {
            logging::init(LogFormat::Text, "info");
            match crate::emulator::run_cli(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dropscan emulate: {e:#}");
                    ExitCode::from(EXIT_UNAVAILABLE)
                }
            }
        }
        Command::Check { config, offline } => check(&config.path, offline).await,
        Command::Status { config } => status(&config.path),
        Command::PurgeResults { config, yes } => purge_results(&config.path, yes).await,
        Command::Generate { what, out } => generate::run(what, &out),
        Command::Quarantine { action } => quarantine::run(action).await,
        Command::Failed { action } => failed::run(action).await,
        Command::Anomalies { action } => anomalies::run(action).await,
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("config error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// [`load`], then the writes `run` needs ([`app::preflight`]): what a restart cannot fix is a
/// configuration error (78), printed the same way by `check` and `run`.
fn load_and_preflight(path: &Path) -> Result<(Config, Vec<String>), ExitCode> {
    let config = load(path)?;
    match app::preflight::check(&config) {
        Ok(notes) => Ok((config, notes)),
        Err(e) => {
            eprintln!("config error: {e}");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

async fn run(path: &Path) -> ExitCode {
    // First, before anything that can take time (the look at each inbox waits up to
    // `answer::DEADLINE` on a share whose server hangs): until then a SIGHUP (a reload, a log
    // rotation's signal) or a SIGTERM would end the process by the signal's default action.
    let (shutdown, reload) = match (signal::shutdown_token(), signal::reload_notify()) {
        (Ok(t), Ok(r)) => (t, r),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("dropscan: cannot install signal handlers: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let (config, notes) = match load_and_preflight(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging::init(config.log.format, &config.log.level);
    crate::service::raise_nofile_limit();
    for note in &notes {
        tracing::warn!("{note}");
    }
    // Held until the process ends: one agent per state folder.
    let _lock = match app::lock::lock_state_dir(&config.state.dir) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(lock_exit_code(&e));
        }
    };
    crate::service::stopping_on(shutdown.clone());
    match app::run_reloading(config, path, shutdown, reload).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Logged once, on stderr (the log's destination); not printed a second time.
            tracing::error!(error = %e, "fatal");
            e.exit_code()
        }
    }
}

/// The exit code of a refused lock: 75 when another agent holds it, 69 when it cannot be
/// taken at all.
pub fn lock_exit_code(e: &app::lock::LockError) -> u8 {
    match e {
        app::lock::LockError::Held { .. } => crate::error::EXIT_LOCKED,
        app::lock::LockError::Io { .. } => EXIT_UNAVAILABLE,
    }
}

/// What a failed connection means for the user, and the exit code
/// ([`crate::error::api_exit_code`]). The error's own text already names the problem; only
/// what to do about it is added (never the same statement twice).
pub fn explain(e: &ApiError, sensor_id: &str) -> (String, u8) {
    let line = match e {
        ApiError::Unauthorized { .. } => format!(
            "the server answered 401: accept the integration request for sensorId {sensor_id} in the KATA web UI (Settings → External systems), or check that this client certificate is the one integrated"
        ),
        ApiError::ClientCertRefused { .. } => {
            format!("the server refused our client certificate: {e}")
        }
        ApiError::NotTls { .. } => format!("the server is not a KATA scanner API: {e}"),
        ApiError::ServerNotTrusted { .. } => format!(
            "{e} (set server.ca_cert to the CA that issued it, or pin it with server.server_fingerprint)"
        ),
        ApiError::PinMismatch { .. } => {
            format!("{e} (server.server_fingerprint)")
        }
        ApiError::Protocol { .. } | ApiError::Rejected { .. } => {
            format!("the server's answer makes no sense: {e}")
        }
        _ => format!(
            "the server is unreachable or failing: {e}{}",
            crate::error::root_cause(e)
        ),
    };
    (line, api_exit_code(e))
}

async fn check(path: &Path, offline: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("config:      {} (valid)", config.path.display());
    println!("server:      {}", config.server.url);
    println!("sensor:      {}", config.server.sensor_id);
    // Unset, the id is not sent (results are not split per host), but staging folders are
    // still named after the host: say both, so that `.dropscan/<host>` is no surprise.
    match config.server.sensor_instance_id.as_deref() {
        Some(id) => println!("instance:    {id}"),
        None => println!(
            "instance:    not set (no sensorInstanceId is sent; staging folders use the host name: .dropscan/{})",
            crate::config::host_name()
        ),
    }
    let inboxes: Vec<_> = config.watches.iter().map(|w| w.path.clone()).collect();
    let answers = crate::answer::look(&inboxes, crate::answer::DEADLINE);
    for ((i, w), answer) in config.watches.iter().enumerate().zip(answers) {
        println!(
            "watch[{i}]:    {} → clean {} | quarantine {} | failed {}",
            w.path.display(),
            w.clean_dir.display(),
            w.quarantine_dir.display(),
            w.failed_dir.display()
        );
        if answer == crate::answer::Answer::Silent {
            println!("  open writers: not known (the inbox does not answer)");
            continue;
        }
        println!(
            "  open writers: {}",
            crate::fsops::lease::describe_for(
                &w.path,
                w.lease_check == crate::config::LeaseCheck::Auto
            )
        );
    }
    if rustix::process::geteuid().is_root() {
        println!("note: {}", app::preflight::AS_ROOT_NOTE);
    }
    match app::preflight::check(&config) {
        Ok(notes) => {
            for note in notes {
                println!("warning: {note}");
            }
        }
        Err(e) => {
            eprintln!("config error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    if let Some(warning) = &config.server.tls.load_warning {
        println!("warning: {warning}");
    }
    print_client_cert_expiry(&config.server.tls);
    if offline {
        return ExitCode::SUCCESS;
    }
    let client = match KataClient::new(config.server.client_options()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot set up the client: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match client.restrictions().await {
        Ok(r) => {
            match r.max_object_size {
                Some(n) => println!("maxObjectSize: {n} bytes ({})", indicatif::HumanBytes(n)),
                None => println!("maxObjectSize: no limit reported"),
            }
            println!(
                "version:     {}",
                r.version.as_deref().unwrap_or("(not reported)")
            );
            println!("ok: connected over mutual TLS and authorized");
            ExitCode::SUCCESS
        }
        Err(ApiError::Rejected { status, .. }) if matches!(status, 404 | 405) => {
            // TLS and authorization succeeded (a refusal would be 401 or a TLS alert); some
            // KATA versions lack the filters route.
            println!(
                "warning: connected and authorized; restrictions unavailable ({status}): the server has no GET …/scans/filters route, so no maxObjectSize is known"
            );
            println!("ok: connected over mutual TLS and authorized");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let (line, code) = explain(&e, &config.server.sensor_id);
            eprintln!("error: {line}");
            ExitCode::from(code)
        }
    }
}

/// `client cert: expires 2027-01-01T00:00:00Z (402 days left)`, with a warning line when
/// fewer than [`crate::kata::tls::EXPIRY_WARNING_DAYS`] days are left.
fn print_client_cert_expiry(tls: &crate::kata::TlsOptions) {
    let Some(not_after) = tls.client_cert_not_after() else {
        println!("client cert: expiry unknown (the certificate could not be parsed)");
        return;
    };
    let days = crate::kata::tls::days_left(not_after, std::time::SystemTime::now());
    println!(
        "client cert: notAfter {} ({days} days left)",
        crate::kata::tls::format_unix(not_after)
    );
    if days < crate::kata::tls::EXPIRY_WARNING_DAYS {
        println!("  warning: {}", crate::kata::tls::expiry_warning(days));
    }
}

async fn purge_results(path: &Path, yes: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !yes {
        eprintln!(
            "this deletes every scan result of sensor {} on {}, including those other agents sharing the sensorId still wait for; run again with --yes to confirm",
            config.server.sensor_id, config.server.url
        );
        // A confirmation missing from the command line: a usage error, not the config's.
        return ExitCode::from(crate::error::EXIT_USAGE);
    }
    let client = match KataClient::new(config.server.client_options()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot set up the client: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match client.delete_all().await {
        Ok(()) => {
            println!(
                "deleted all scan results of sensor {}",
                config.server.sensor_id
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let (line, code) = explain(&e, &config.server.sensor_id);
            eprintln!("error: {line}");
            ExitCode::from(code)
        }
    }
}

fn status(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let journal = config.journal_path();
    if !journal.exists() {
        println!(
            "no journal at {} yet: the agent has not run",
            journal.display()
        );
        return ExitCode::SUCCESS;
    }
    let summary = match crate::journal::read_summary(&journal) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    println!("journal: {}", journal.display());
    println!("files by state:");
    if summary.per_state.is_empty() {
        println!("  (none)");
    }
    for (state, n) in &summary.per_state {
        println!("  {state:<12} {n}");
    }
    println!("finished files by outcome:");
    if summary.per_outcome.is_empty() {
        println!("  (none)");
    }
    for (outcome, n) in &summary.per_outcome {
        let note = if outcome == "vanished" {
            "  (removed from staging by hand)"
        } else {
            ""
        };
        println!("  {outcome:<12} {n}{note}");
    }
    match &summary.oldest_pending {
        Some((p, at)) => {
            let age = crate::journal::now_ms().saturating_sub(*at) / 1000;
            println!(
                "oldest pending: {} (claimed {} ago)",
                crate::fsops::shown(p),
                humantime::format_duration(std::time::Duration::from_secs(
                    u64::try_from(age).unwrap_or(0)
                ))
            );
        }
        None => println!("oldest pending: none"),
    }
    print_limits(&journal);
    if !summary.last_errors.is_empty() {
        println!("last errors:");
        for (at, text) in &summary.last_errors {
            let t = std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(u64::try_from(*at).unwrap_or(0));
            // Errors name users' files (escaped, like every name on a terminal) and, if
            // written before such URLs were refused, a hook URL with a password (redacted).
            let text = crate::config::redact_userinfo(text);
            println!(
                "  {} {}",
                humantime::format_rfc3339_seconds(t),
                crate::fsops::names::shown_text(&text)
            );
        }
    }
    ExitCode::SUCCESS
}

/// The limits as the daemon last saved them: cap, learned capacity, scan time, throughput and
/// the limit that binds.
fn print_limits(journal: &Path) {
    let snap = match crate::journal::read_capacity_snapshot(journal) {
        Ok(Some(text)) => crate::limits::LimitsSnapshot::from_json(&text),
        Ok(None) => None,
        Err(e) => {
            println!("limits: unreadable ({e})");
            return;
        }
    };
    let Some(s) = snap else {
        println!("limits: none saved yet");
        return;
    };
    let age = crate::journal::now_ms().saturating_sub(s.updated_at) / 1000;
    let age = humantime::format_duration(std::time::Duration::from_secs(
        u64::try_from(age).unwrap_or(0),
    ));
    println!("limits (saved {age} ago):");
    println!("  bound by:      {}", s.binding);
    match s.mode.as_str() {
        "auto" => println!(
            "  scans in flight: {} of cap {} (auto; learned server capacity {}, ceiling {})",
            s.in_flight,
            s.cap,
            if s.learned == 0 {
                "not yet known".to_owned()
            } else {
                s.learned.to_string()
            },
            s.ceiling
        ),
        _ => println!(
            "  scans in flight: {} of cap {} (pinned by server.max_in_flight)",
            s.in_flight, s.cap
        ),
    }
    match s.mean_scan_secs {
        Some(m) => println!("  mean scan time: {m:.1} s (accepted to verdict)"),
        None => println!("  mean scan time: none finished yet"),
    }
    println!("  files per hour: {:.0}", s.files_per_hour);
    println!("  429 answers:   {}", s.throttled);
}
