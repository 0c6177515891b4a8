//! Validation of the `[server]` table: the address, the sensor's ids, the TLS material, the
//! limits and the timings. The checks that only look at a value (is this URL usable, is this
//! instance id well formed, is this timing too short) are pure functions with table tests; the
//! `Validator` methods read the files and name the key. Owns nothing of the other tables.

use std::path::PathBuf;
use std::time::Duration;

use super::raw::{RawCount, RawServer};
use super::validate::{Validator, to_nonzero_u32, to_nonzero_usize};
use super::{
    ConfigError, DEFAULT_HEALTH_PROBE, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_IN_FLIGHT_CEILING,
    DEFAULT_POLL_INTERVAL, DEFAULT_REQUEST_TIMEOUT, DEFAULT_REQUESTS_PER_SECOND,
    DEFAULT_RESTRICTIONS_REFRESH, DEFAULT_SCAN_TIMEOUT, MaxInFlight, ServerConfig,
};
use crate::kata::{self, TlsOptions};

/// What the example config (the `.deb`'s conffile) holds where only an administrator knows the
/// value: `check` and `run` refuse it until it is replaced.
const PLACEHOLDER: &str = "REPLACE-ME";

/// The five timings of `[server]`, each checked against its floor.
struct Timings {
    poll_interval: Duration,
    request_timeout: Duration,
    scan_timeout: Duration,
    restrictions_refresh: Duration,
    health_probe: Duration,
}

impl Validator {
    pub(super) fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        self.placeholders(&raw)?;
        let url = self.server_url(&raw.url)?;
        let sensor_id = normal_sensor_id(&raw.sensor_id).ok_or_else(|| {
            self.invalid(
                "server.sensor_id",
                &format!(
                    "`{}` is not a hyphenated UUID; generate one once per installation (e.g. `uuidgen`)",
                    raw.sensor_id
                ),
            )
        })?;
        let sensor_instance_id = match raw.sensor_instance_id.clone() {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) if !instance_id_ok(&s) => {
                return Err(self.invalid(
                    "server.sensor_instance_id",
                    "use 1 to 128 letters, digits, '-', '_' or '.'",
                ));
            }
            Some(s) => Some(s),
        };
        let (tls, client_cert_path) = self.tls(&raw)?;
        let max_in_flight = self.max_in_flight(raw.max_in_flight.as_ref())?;
        let ceiling = self.positive(
            raw.max_in_flight_ceiling,
            DEFAULT_MAX_IN_FLIGHT_CEILING as u64,
            "server.max_in_flight_ceiling",
            100_000,
        )?;
        let rps = self.positive(
            raw.requests_per_second,
            u64::from(DEFAULT_REQUESTS_PER_SECOND),
            "server.requests_per_second",
            1_000_000,
        )?;
        let attempts = self.positive(
            raw.max_attempts,
            u64::from(DEFAULT_MAX_ATTEMPTS),
            "server.max_attempts",
            100,
        )?;
        let t = self.timings(&raw)?;
        Ok(ServerConfig {
            url,
            sensor_id,
            sensor_instance_id,
            tls,
            client_cert_path,
            poll_interval: t.poll_interval,
            poll_early: false,
            request_timeout: t.request_timeout,
            max_in_flight,
            max_in_flight_ceiling: to_nonzero_usize(ceiling),
            requests_per_second: to_nonzero_u32(rps),
            max_attempts: to_nonzero_u32(attempts),
            scan_timeout: t.scan_timeout,
            restrictions_refresh: t.restrictions_refresh,
            health_probe: t.health_probe,
        })
    }

    /// The values only an administrator knows must not be the example's placeholder.
    fn placeholders(&self, raw: &RawServer) -> Result<(), ConfigError> {
        self.not_placeholder(
            "server.url",
            &raw.url,
            "the address of your KATA Central Node, e.g. \"https://kata.example.org\"",
        )?;
        self.not_placeholder(
            "server.sensor_id",
            &raw.sensor_id,
            "one UUID for the whole installation, generated once (e.g. with `uuidgen`) and shared by all its agents",
        )?;
        if let Some(id) = &raw.sensor_instance_id {
            self.not_placeholder(
                "server.sensor_instance_id",
                id,
                "a name unique to this host (letters, digits, - _ .), or remove the key to use the host name",
            )?;
        }
        Ok(())
    }

    /// Refuses a value still holding the example config's placeholder, saying what to put there.
    fn not_placeholder(&self, key: &str, value: &str, what: &str) -> Result<(), ConfigError> {
        if value.to_ascii_uppercase().contains(PLACEHOLDER) {
            return Err(self.invalid(
                key,
                &format!("still holds the example's placeholder `{value}`: set it to {what}"),
            ));
        }
        Ok(())
    }

    fn server_url(&self, raw: &str) -> Result<reqwest::Url, ConfigError> {
        let url = reqwest::Url::parse(raw.trim()).map_err(|e| {
            let shown = super::redact_userinfo(raw);
            self.invalid("server.url", &format!("`{shown}` is not a URL ({e})"))
        })?;
        match url_problem(&url) {
            Some(problem) => Err(self.invalid("server.url", problem)),
            None => Ok(url),
        }
    }

    /// The client certificate, its key and what the server is checked against, read and
    /// matched; with the certificate's path (for `check`'s expiry line).
    fn tls(&self, raw: &RawServer) -> Result<(TlsOptions, PathBuf), ConfigError> {
        let client_cert = self.path(&raw.client_cert, "server.client_cert")?;
        let client_key = self.path(&raw.client_key, "server.client_key")?;
        let ca_cert = raw
            .ca_cert
            .as_deref()
            .map(|p| self.path(p, "server.ca_cert"))
            .transpose()?;
        let pin = raw
            .server_fingerprint
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| {
                kata::parse_fingerprint(s)
                    .map_err(|e| self.invalid("server.server_fingerprint", &e.to_string()))
            })
            .transpose()?;
        for (key, p) in [
            ("server.client_cert", Some(&client_cert)),
            ("server.client_key", Some(&client_key)),
            ("server.ca_cert", ca_cert.as_ref()),
        ] {
            if let Some(p) = p {
                self.regular_file(key, p, "the PEM file")?;
            }
        }
        self.not_swapped(&client_cert, &client_key)?;
        let tls = TlsOptions::from_pem_files(&client_cert, &client_key, ca_cert.as_deref(), pin)
            .map_err(|e| self.invalid(tls_key(&e), &e.to_string()))?;
        Ok((tls, client_cert))
    }

    /// A client key file that holds a certificate and no key (or a certificate file that holds
    /// a key and no certificate): the two keys are swapped, which the permission check would
    /// otherwise report as "run chmod 600" on the certificate.
    fn not_swapped(
        &self,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<(), ConfigError> {
        let markers = |p: &std::path::Path| {
            let text = std::fs::read(p).unwrap_or_default();
            let has = |m: &[u8]| text.windows(m.len()).any(|w| w == m);
            (
                has(b"-----BEGIN CERTIFICATE-----"),
                has(b"PRIVATE KEY-----"),
            )
        };
        let (key_has_cert, key_has_key) = markers(key);
        if key_has_cert && !key_has_key {
            let (_, cert_has_key) = markers(cert);
            let hint = if cert_has_key {
                " and server.client_cert names a key: the two are swapped"
            } else {
                ""
            };
            return Err(self.invalid(
                "server.client_key",
                &format!(
                    "{} holds a certificate, not a private key{hint}; give the key file (PEM PKCS#8, PKCS#1 or SEC1)",
                    key.display()
                ),
            ));
        }
        Ok(())
    }

    fn max_in_flight(&self, raw: Option<&RawCount>) -> Result<MaxInFlight, ConfigError> {
        Ok(match raw {
            None => MaxInFlight::Auto,
            Some(RawCount::Word(w)) if w.trim().eq_ignore_ascii_case("auto") => MaxInFlight::Auto,
            Some(RawCount::Word(w)) => {
                return Err(self.invalid(
                    "server.max_in_flight",
                    &format!("`{w}` is neither a number (1 to 100000) nor \"auto\""),
                ));
            }
            Some(RawCount::Number(n)) => MaxInFlight::Fixed(to_nonzero_usize(self.positive(
                Some(*n),
                1,
                "server.max_in_flight",
                100_000,
            )?)),
        })
    }

    /// Each timing parsed and checked against its floor, in the order they are written.
    fn timings(&self, raw: &RawServer) -> Result<Timings, ConfigError> {
        let poll_interval = self.timing(
            raw.poll_interval.as_deref(),
            DEFAULT_POLL_INTERVAL,
            "server.poll_interval",
            Duration::ZERO,
        )?;
        let timing = |value: &Option<String>, default, key| {
            self.timing(value.as_deref(), default, key, poll_interval)
        };
        Ok(Timings {
            poll_interval,
            request_timeout: timing(
                &raw.request_timeout,
                DEFAULT_REQUEST_TIMEOUT,
                "server.request_timeout",
            )?,
            scan_timeout: timing(
                &raw.scan_timeout,
                DEFAULT_SCAN_TIMEOUT,
                "server.scan_timeout",
            )?,
            restrictions_refresh: timing(
                &raw.restrictions_refresh,
                DEFAULT_RESTRICTIONS_REFRESH,
                "server.restrictions_refresh",
            )?,
            health_probe: timing(
                &raw.health_probe,
                DEFAULT_HEALTH_PROBE,
                "server.health_probe",
            )?,
        })
    }

    fn timing(
        &self,
        value: Option<&str>,
        default: &str,
        key: &str,
        poll_interval: Duration,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(value, default, key)?;
        match too_short(key, d, poll_interval) {
            Some(floor) => Err(self.invalid(key, floor)),
            None => Ok(d),
        }
    }
}

/// What makes a parsed `server.url` unusable, if anything.
fn url_problem(url: &reqwest::Url) -> Option<&'static str> {
    if !url.username().is_empty() || url.password().is_some() {
        return Some(
            "holds a user name or password, which would be written into logs; KATA authenticates this client by its certificate only: remove it",
        );
    }
    if url.scheme() != "https" {
        return Some("must start with https:// (the scanner API is HTTPS only)");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Some("has no host name");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Some("must not have a query or fragment");
    }
    None
}

/// `server.sensor_id` as sent (trimmed, lower case), if it is a hyphenated UUID.
fn normal_sensor_id(raw: &str) -> Option<String> {
    let id = raw.trim().to_ascii_lowercase();
    (uuid::Uuid::try_parse(&id).is_ok() && id.len() == 36).then_some(id)
}

/// `server.sensor_instance_id`: 1 to 128 letters, digits, `-`, `_` or `.`.
fn instance_id_ok(s: &str) -> bool {
    s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Why a timing is below its floor (the message for its key), if it is. `scan_timeout` must
/// leave room for at least one poll.
fn too_short(key: &str, d: Duration, poll_interval: Duration) -> Option<&'static str> {
    match key {
        "server.poll_interval" => {
            (d < Duration::from_millis(10)).then_some("must be at least 10ms")
        }
        "server.request_timeout" => d.is_zero().then_some("must be more than 0"),
        "server.scan_timeout" => {
            (d < poll_interval).then_some("must be at least server.poll_interval")
        }
        "server.restrictions_refresh" | "server.health_probe" => {
            (d < Duration::from_secs(1)).then_some("must be at least 1s")
        }
        _ => None,
    }
}

/// The key a TLS loading error is about: each names its own file's key (and so its line).
fn tls_key(e: &kata::TlsError) -> &'static str {
    use kata::TlsError;
    let by_what = |what: &str| match what {
        "client key" => "server.client_key",
        "CA certificate" => "server.ca_cert",
        _ => "server.client_cert",
    };
    match e {
        TlsError::Read { what, .. } | TlsError::Invalid { what, .. } => by_what(what),
        TlsError::KeyReadableByOthers { .. } | TlsError::KeyMismatch { .. } => "server.client_key",
        TlsError::NoSystemRoots { .. } => "server.ca_cert",
        TlsError::Config { .. } => "server.client_cert",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_problems() {
        let cases = [
            ("https://kata.example.org", None),
            ("https://kata.example.org:8443/", None),
            ("https://u:p@kata.example.org", Some("user name")),
            ("https://u@kata.example.org", Some("user name")),
            ("http://kata.example.org", Some("https://")),
            ("https://kata.example.org/?a=1", Some("query")),
            ("https://kata.example.org/#x", Some("fragment")),
        ];
        for (url, want) in cases {
            let got = url_problem(&reqwest::Url::parse(url).unwrap());
            match want {
                None => assert_eq!(got, None, "{url}"),
                Some(part) => assert!(got.is_some_and(|m| m.contains(part)), "{url}: {got:?}"),
            }
        }
    }

    #[test]
    fn sensor_ids() {
        let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
        assert_eq!(normal_sensor_id(id).as_deref(), Some(id));
        assert_eq!(
            normal_sensor_id(" 0F8FAD5B-D9CB-469F-A165-70867728950E\n").as_deref(),
            Some(id)
        );
        // Accepted by the uuid crate, but not the hyphenated form KATA expects.
        assert_eq!(normal_sensor_id("0f8fad5bd9cb469fa16570867728950e"), None);
        assert_eq!(normal_sensor_id("REPLACE-ME"), None);
        assert_eq!(normal_sensor_id(""), None);
    }

    #[test]
    fn instance_ids() {
        let cases = [
            ("fs01", true),
            ("fs-01_a.b", true),
            (&"a".repeat(128), true),
            (&"a".repeat(129), false),
            ("fs 01", false),
            ("fs/01", false),
            ("fs\n01", false),
            ("hôte", false),
        ];
        for (id, ok) in cases {
            assert_eq!(instance_id_ok(id), ok, "{id:?}");
        }
    }

    #[test]
    fn timing_floors() {
        let ms = Duration::from_millis;
        let poll = ms(60_000);
        let cases = [
            ("server.poll_interval", ms(9), true),
            ("server.poll_interval", ms(10), false),
            ("server.request_timeout", ms(0), true),
            ("server.request_timeout", ms(1), false),
            ("server.scan_timeout", ms(59_999), true),
            ("server.scan_timeout", ms(60_000), false),
            ("server.restrictions_refresh", ms(999), true),
            ("server.restrictions_refresh", ms(1000), false),
            ("server.health_probe", ms(999), true),
            ("server.health_probe", ms(1000), false),
        ];
        for (key, d, short) in cases {
            assert_eq!(too_short(key, d, poll).is_some(), short, "{key} {d:?}");
        }
    }
}
