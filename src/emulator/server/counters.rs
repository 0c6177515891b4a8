//! Request counters of one running emulator instance: every HTTP request by kind, the TLS
//! connections that carried them, and when the first submission arrived.
//!
//! They serve measurement (the benchmark harness divides them by the files it dropped) and are
//! printed as one `key=value` line by `dropscan emulate` when it stops. Counting never changes an
//! answer: the API seen by clients is exactly the one of `shared/kata-scanner-api.md`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::Method;

use super::routing::Endpoint;

/// Live counters, shared by the accept loop and every connection task.
#[derive(Debug, Default)]
pub(crate) struct RequestCounters {
    connections: AtomicU64,
    posts: AtomicU64,
    state_gets: AtomicU64,
    filters_gets: AtomicU64,
    deletes: AtomicU64,
    delete_alls: AtomicU64,
    other: AtomicU64,
    /// Milliseconds since the Unix epoch of the first POST; 0 until one arrives.
    first_post_unix_ms: AtomicU64,
}

impl RequestCounters {
    /// A TLS handshake succeeded.
    pub(crate) fn connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A request arrived for `endpoint` (`None`: a path outside the API) with `method`.
    pub(crate) fn request(&self, method: &Method, endpoint: Option<&Endpoint<'_>>) {
        let counter = match (endpoint, method) {
            (Some(Endpoint::Scans(_)), &Method::POST) => {
                if self.first_post_unix_ms.load(Ordering::Relaxed) == 0 {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                    // Only the first POST sets it; later ones find it non-zero.
                    let _first = self.first_post_unix_ms.compare_exchange(
                        0,
                        now.max(1),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                &self.posts
            }
            (Some(Endpoint::Scans(_)), &Method::DELETE) => &self.delete_alls,
            (Some(Endpoint::State(_)), &Method::GET) => &self.state_gets,
            (Some(Endpoint::Filters(_)), &Method::GET) => &self.filters_gets,
            (Some(Endpoint::Scan(..)), &Method::DELETE) => &self.deletes,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A consistent-enough snapshot (each counter read once).
    pub(crate) fn snapshot(&self) -> RequestCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RequestCounts {
            connections: get(&self.connections),
            posts: get(&self.posts),
            state_gets: get(&self.state_gets),
            filters_gets: get(&self.filters_gets),
            deletes: get(&self.deletes),
            delete_alls: get(&self.delete_alls),
            other: get(&self.other),
            first_post_unix_ms: Some(get(&self.first_post_unix_ms)).filter(|&ms| ms != 0),
        }
    }
}

/// HTTP requests an emulator instance received since it started, by kind, whatever the answer
/// (injected faults and error answers included; connections dropped before a request was read
/// are not requests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// TLS connections that completed their handshake.
    pub connections: u64,
    /// `POST …/scans` (submissions).
    pub posts: u64,
    /// `GET …/scans/state` (results).
    pub state_gets: u64,
    /// `GET …/scans/filters` (restrictions).
    pub filters_gets: u64,
    /// `DELETE …/scans/{scanId}`.
    pub deletes: u64,
    /// `DELETE …/scans` (all results of a sensor).
    pub delete_alls: u64,
    /// Anything else: unknown paths, wrong methods.
    pub other: u64,
    /// When the first POST arrived, in milliseconds since the Unix epoch.
    pub first_post_unix_ms: Option<u64>,
}

impl RequestCounts {
    /// Every request counted.
    pub fn total(&self) -> u64 {
        self.posts
            + self.state_gets
            + self.filters_gets
            + self.deletes
            + self.delete_alls
            + self.other
    }
}

/// The summary line `dropscan emulate` prints when it stops, e.g.
/// `emulator requests: total=9 post=3 get_state=2 get_filters=1 delete=3 delete_all=0 other=0
/// connections=1 first_post_unix_ms=1795000000000` (on one line; `first_post_unix_ms=-` when
/// nothing was submitted).
impl fmt::Display for RequestCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "emulator requests: total={} post={} get_state={} get_filters={} delete={} \
             delete_all={} other={} connections={} first_post_unix_ms=",
            self.total(),
            self.posts,
            self.state_gets,
            self.filters_gets,
            self.deletes,
            self.delete_alls,
            self.other,
            self.connections,
        )?;
        match self.first_post_unix_ms {
            Some(ms) => write!(f, "{ms}"),
            None => f.write_str("-"),
        }
    }
}
