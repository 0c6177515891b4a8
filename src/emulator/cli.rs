//! `dropscan emulate`: runs the emulator in the foreground until Ctrl-C or SIGTERM, then prints
//! one line of request counters (`emulator requests: total=… post=… …`).
//!
//! Owns the subcommand's flags (clap derive; the doc comments are the help text) and the start-up
//! message with a ready-to-paste `[server]` section. It does not parse the dropscan config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::{
    CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, CertBundle, DEFAULT_MAX_OBJECT_SIZE, Emulator,
    EmulatorConfig, Faults, ResultShape,
};

/// Run a KATA scanner API emulator (mutual TLS) for demos and integration tests.
///
/// The sensorInstanceId of a submission is taken from the query (the documented place) or,
/// when the query lacks it, from a `sensorInstanceId` form field; DELETE of one result and GET
/// filters accept it in the query or not at all. A form with a repeated part (two `content` or
/// two `scanId` parts) is answered 400 malformed form.
#[derive(Clone, Debug, clap::Args)]
#[command(
    after_help = "sensorInstanceId: read from the query (the documented place) or, on POST when the query lacks it, from a `sensorInstanceId` form field, so a client sending it in the form sees its scans in its own results. DELETE of one result and GET filters work with or without it. A form with two `content` (or two `scanId`) parts is answered 400 malformed form."
)]
pub struct EmulateArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,

    /// Folder of the CA, server and client certificates (PEM); generated there when missing.
    /// `--init-certs DIR` is the same flag.
    #[arg(
        long = "certs",
        visible_alias = "init-certs",
        value_name = "DIR",
        default_value = "./kata-emulator-certs"
    )]
    pub certs: PathBuf,

    /// Extra name or IP address for the server certificate (repeatable); used only when the
    /// certificates are generated. "localhost", 127.0.0.1 and ::1 are always included.
    #[arg(long = "server-name", value_name = "NAME")]
    pub server_names: Vec<String>,

    /// Leave new integration requests pending (answer 401) instead of accepting them.
    #[arg(long)]
    pub no_auto_accept: bool,

    /// Maximum object size in bytes, reported by /scans/filters and enforced with 413; 0 or
    /// less means no limit.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_OBJECT_SIZE, allow_negative_numbers = true)]
    pub max_object_size: i64,

    /// Maximum number of scans in `processing` per sensor, enforced with 429; 0 means no limit.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub max_scans: usize,

    /// Time from the end of an upload to its verdict, e.g. 2s, 500ms; or a range MIN..MAX,
    /// e.g. 30s..120s, from which each scan draws its time uniformly (a realistic sandbox).
    #[arg(long, value_name = "DURATION|MIN..MAX", default_value = "2s", value_parser = parse_delay_range)]
    pub scan_delay: DelayRange,

    /// SHA-256 (64 hex characters) of a content to report as `detect` (repeatable). Content
    /// holding the EICAR test string is always detected.
    #[arg(long = "detect-sha256", value_name = "HEX", value_parser = parse_sha256)]
    pub detect_sha256: Vec<[u8; 32]>,

    /// Body shape of GET …/scans/state answers.
    #[arg(long, value_enum, default_value = "scans-object")]
    pub shape: ResultShape,

    /// Share (0 to 1) of requests answered 500.
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_share)]
    pub fail_500: f64,

    /// Share (0 to 1) of submissions answered 429.
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_share)]
    pub throttle_429: f64,

    /// Share (0 to 1) of requests whose connection is closed without an answer.
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_share)]
    pub drop: f64,

    /// Share (0 to 1) of requests delayed by --slow-delay.
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_share)]
    pub slow: f64,

    /// Delay of a slow request.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub slow_delay: Duration,

    /// Share (0 to 1) of scans that end with the verdict `error`.
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_share)]
    pub error_verdicts: f64,

    /// Share (0 to 1) of scans that end with the verdict `timeout`.
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_share)]
    pub timeout_verdicts: f64,

    /// `Retry-After` value sent with every 429 and 500 answer: seconds (e.g. 30) or an
    /// HTTP-date (e.g. "Wed, 21 Oct 2026 07:28:00 GMT").
    #[arg(long, value_name = "SECONDS|HTTP-DATE")]
    pub retry_after: Option<String>,

    /// Answer GET …/scans/filters with this status (404 or 405; 405 when given without a
    /// value), as KATA versions without that route do.
    #[arg(long, value_name = "STATUS", num_args = 0..=1, default_missing_value = "405", value_parser = parse_missing_route_status)]
    pub no_filters_route: Option<u16>,

    /// Version string reported by /scans/filters.
    #[arg(long, value_name = "TEXT")]
    pub version_string: Option<String>,
}

impl EmulateArgs {
    /// The emulator configuration these flags describe.
    pub fn to_config(&self) -> EmulatorConfig {
        let defaults = EmulatorConfig::default();
        EmulatorConfig {
            listen: self.listen,
            auto_accept: !self.no_auto_accept,
            max_object_size: self.max_object_size,
            max_scans: (self.max_scans > 0).then_some(self.max_scans),
            scan_delay: self.scan_delay.min(),
            scan_delay_max: (self.scan_delay.max() > self.scan_delay.min())
                .then_some(self.scan_delay.max()),
            detect_sha256: self.detect_sha256.iter().copied().collect(),
            shape: self.shape,
            faults: Faults {
                http_500_share: self.fail_500,
                http_429_share: self.throttle_429,
                drop_share: self.drop,
                slow_share: self.slow,
                slow_delay: self.slow_delay,
                error_verdict_share: self.error_verdicts,
                timeout_verdict_share: self.timeout_verdicts,
                retry_after: self.retry_after.clone(),
            },
            version: self.version_string.clone().unwrap_or(defaults.version),
            no_filters_route: self.no_filters_route,
        }
    }
}

/// The `dropscan emulate` subcommand: serves until Ctrl-C or SIGTERM, prints the request
/// counters, then stops cleanly.
pub async fn run_cli(args: EmulateArgs) -> anyhow::Result<()> {
    let certs = CertBundle::load_or_generate_for(&args.certs, &args.server_names)
        .with_context(|| format!("certificates in {}", args.certs.display()))?;
    let dir = std::fs::canonicalize(&args.certs)
        .with_context(|| format!("certificates in {}", args.certs.display()))?;
    let handle = Emulator::start(args.to_config(), &certs).await?;
    let url = handle.base_url();
    let sensor_id = uuid::Uuid::new_v4();
    println!("KATA emulator listening on {url}");
    println!("certificates in {}:", dir.display());
    println!("  {CA_CERT_FILE}      CA of the server and of client certificates");
    println!("  {CLIENT_CERT_FILE}  client certificate");
    println!("  {CLIENT_KEY_FILE}  client key");
    println!();
    println!("[server]");
    println!("url = {}", toml_string(&url));
    println!("sensor_id = {}", toml_string(&sensor_id.to_string()));
    println!("client_cert = {}", toml_path(&dir, CLIENT_CERT_FILE));
    println!("client_key = {}", toml_path(&dir, CLIENT_KEY_FILE));
    println!("ca_cert = {}", toml_path(&dir, CA_CERT_FILE));
    println!();
    println!("Ctrl-C stops.");
    wait_for_stop_signal().await?;
    // One line of request counters, for benchmarks (requests per file) and curious users.
    println!("{}", handle.request_counts());
    handle.stop().await;
    Ok(())
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM, the signal a supervisor or a benchmark harness sends.
async fn wait_for_stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// A TOML basic string. JSON's string escapes are a subset of TOML's.
fn toml_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn toml_path(dir: &Path, name: &str) -> String {
    toml_string(&dir.join(name).to_string_lossy())
}

/// `--scan-delay`: one duration (`min == max`) or a range `MIN..MAX`, to the millisecond (kept
/// as small as one `Duration`, so that the subcommand's arguments do not grow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DelayRange {
    min_ms: u64,
    max_ms: u64,
}

impl DelayRange {
    fn new(min: Duration, max: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        DelayRange {
            min_ms: ms(min),
            max_ms: ms(max),
        }
    }

    /// Shortest scan.
    pub fn min(&self) -> Duration {
        Duration::from_millis(self.min_ms)
    }

    /// Longest scan.
    pub fn max(&self) -> Duration {
        Duration::from_millis(self.max_ms)
    }
}

/// Why an emulator option's value does not parse; clap prints it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArgError {
    /// Not a duration.
    #[error("`{given}` is not a duration like 2s or 500ms ({source})")]
    Duration {
        /// The value as given.
        given: String,
        /// humantime's complaint.
        source: humantime::DurationError,
    },
    /// A range whose end comes before its start.
    #[error("the range {0} ends before it starts; write MIN..MAX, e.g. 30s..120s")]
    Backwards(String),
    /// Not a number.
    #[error(transparent)]
    Number(#[from] std::num::ParseFloatError),
    /// A share outside 0..=1.
    #[error("a share is between 0 and 1")]
    Share,
    /// A status other than 404 and 405.
    #[error("expected 404 or 405")]
    Status,
    /// Not a SHA-256 in hex.
    #[error("expected 64 hex characters")]
    Sha256,
}

fn parse_delay_range(s: &str) -> Result<DelayRange, ArgError> {
    let one = |t: &str| {
        humantime::parse_duration(t.trim()).map_err(|source| ArgError::Duration {
            given: t.trim().to_string(),
            source,
        })
    };
    match s.split_once("..") {
        None => {
            let d = one(s)?;
            Ok(DelayRange::new(d, d))
        }
        Some((lo, hi)) => {
            let (min, max) = (one(lo)?, one(hi)?);
            if min > max {
                return Err(ArgError::Backwards(s.to_string()));
            }
            Ok(DelayRange::new(min, max))
        }
    }
}

fn parse_share(s: &str) -> Result<f64, ArgError> {
    let share: f64 = s.parse()?;
    if (0.0..=1.0).contains(&share) {
        Ok(share)
    } else {
        Err(ArgError::Share)
    }
}

fn parse_missing_route_status(s: &str) -> Result<u16, ArgError> {
    match s.trim() {
        "404" => Ok(404),
        "405" => Ok(405),
        _ => Err(ArgError::Status),
    }
}

fn parse_sha256(s: &str) -> Result<[u8; 32], ArgError> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return Err(ArgError::Sha256);
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| ArgError::Sha256)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: EmulateArgs,
    }

    #[test]
    fn flags_parse() {
        Wrapper::command().debug_assert();
        let w = Wrapper::try_parse_from([
            "emulate",
            "--init-certs",
            "/tmp/x",
            "--scan-delay",
            "250ms",
            "--shape",
            "doc-array",
            "--drop",
            "0.1",
            "--max-scans",
            "0",
            "--detect-sha256",
            &"ab".repeat(32),
        ])
        .unwrap();
        assert_eq!(w.args.certs, PathBuf::from("/tmp/x"));
        let config = w.args.to_config();
        assert_eq!(config.scan_delay, Duration::from_millis(250));
        assert_eq!(config.shape, ResultShape::DocArray);
        assert_eq!(config.max_scans, None);
        assert!(config.detect_sha256.contains(&[0xab; 32]));
        assert!(Wrapper::try_parse_from(["emulate", "--fail-500", "1.5"]).is_err());
        let help = Wrapper::command().render_long_help().to_string();
        assert!(help.contains("`sensorInstanceId` form field"), "{help}");
        let w = Wrapper::try_parse_from(["emulate", "--no-filters-route"]).unwrap();
        assert_eq!(w.args.to_config().no_filters_route, Some(405));
        let w = Wrapper::try_parse_from(["emulate", "--no-filters-route", "404"]).unwrap();
        assert_eq!(w.args.to_config().no_filters_route, Some(404));
        assert!(Wrapper::try_parse_from(["emulate", "--no-filters-route", "500"]).is_err());
        let w = Wrapper::try_parse_from(["emulate", "--scan-delay", "30s..2m"]).unwrap();
        let config = w.args.to_config();
        assert_eq!(config.scan_delay, Duration::from_secs(30));
        assert_eq!(config.scan_delay_max, Some(Duration::from_secs(120)));
        let w = Wrapper::try_parse_from(["emulate", "--scan-delay", "3s..3s"]).unwrap();
        assert_eq!(w.args.to_config().scan_delay_max, None);
        for bad in ["2m..30s", "30s..", "..2m", "fast..slow"] {
            assert!(
                Wrapper::try_parse_from(["emulate", "--scan-delay", bad]).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            Wrapper::try_parse_from(["emulate"])
                .unwrap()
                .args
                .to_config()
                .scan_delay_max,
            None
        );
        let w = Wrapper::try_parse_from(["emulate", "--retry-after", "30"]).unwrap();
        assert_eq!(w.args.to_config().faults.retry_after.as_deref(), Some("30"));
    }
}
