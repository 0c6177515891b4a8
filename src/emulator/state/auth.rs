//! The authorization table: which (sensorId, client certificate) pairs are pending, accepted or
//! rejected, as on KATA's "External systems" page, and the sensorId spelling it is keyed by.

use super::SharedState;

/// Where an integration request stands, as in KATA's "External systems" page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Authorization {
    /// Waiting for an administrator: requests get 401.
    Pending,
    /// Accepted: requests are served.
    Accepted,
    /// Rejected: requests get 401.
    Rejected,
}

/// Normalizes a sensorId: a UUID in any accepted spelling becomes lower-case hyphenated.
pub(crate) fn parse_sensor_id(raw: &str) -> Option<String> {
    uuid::Uuid::try_parse(raw)
        .ok()
        .map(|u| u.hyphenated().to_string())
}

impl SharedState {
    /// Sets the authorization of a (sensorId, client-certificate SHA-256) pair.
    pub fn set_authorization(
        &self,
        sensor_id: &str,
        client_cert_sha256: [u8; 32],
        a: Authorization,
    ) {
        let sensor_id = parse_sensor_id(sensor_id).unwrap_or_else(|| sensor_id.to_owned());
        self.lock()
            .authorizations
            .insert((sensor_id, client_cert_sha256), a);
    }

    /// The authorization table, sorted by sensorId then fingerprint.
    pub fn authorizations(&self) -> Vec<(String, [u8; 32], Authorization)> {
        let mut all: Vec<_> = self
            .lock()
            .authorizations
            .iter()
            .map(|((s, f), a)| (s.clone(), *f, *a))
            .collect();
        all.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        all
    }

    /// Looks up, and on first sight records, the (sensorId, certificate) pair.
    pub(crate) fn authorize(&self, sensor_id: &str, fingerprint: [u8; 32]) -> Authorization {
        let mut inner = self.lock();
        let key = (sensor_id.to_owned(), fingerprint);
        if let Some(a) = inner.authorizations.get(&key) {
            return *a;
        }
        // A new certificate on a sensorId that is already integrated is a new integration
        // request: it waits for an administrator even with auto_accept (the docs: changing the
        // certificate means integrating again).
        let integrated = inner
            .authorizations
            .iter()
            .any(|((s, _), a)| s == sensor_id && *a == Authorization::Accepted);
        let a = if inner.settings.auto_accept && !integrated {
            Authorization::Accepted
        } else {
            Authorization::Pending
        };
        inner.authorizations.insert(key, a);
        a
    }
}
