//! Wire types of the KATA scanner API and the tolerant parsers of its answers.
//!
//! Exact in what we send ([`ScanId`], [`ScanState::as_wire`]), tolerant in what we accept: the
//! results body may be `{"scans":[...]}` or a top-level array, `scanId` a string or a number,
//! `state` a string or an array; unknown fields are ignored and garbage is an
//! [`ApiError::Protocol`], never a panic. These functions are pure and know nothing of HTTP.
//!
//! Several reports of one scan are folded fail-closed: a `state` array counts as final if any
//! entry is final and `detect` wins over every other entry; [`merge_duplicates`] does the same
//! for a scanId listed twice in one body and reports contradicting final states.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use tracing::debug;

use super::error::ApiError;

/// Longest scanId accepted by [`ScanId::parse`].
const SCAN_ID_MAX_LEN: usize = 128;

/// Object keys (lower-cased, `_`/`-` removed) that may hold the result list in an object body.
const LIST_KEYS: [&str; 5] = ["scans", "results", "items", "data", "objects"];

/// Why a text is not a scanId.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanIdError {
    /// Empty or longer than 128 characters.
    #[error("a scanId has 1 to {SCAN_ID_MAX_LEN} characters, got {0}")]
    Length(usize),
    /// A character outside `[A-Za-z0-9_-]`.
    #[error("a scanId holds only letters, digits, '_' and '-', found {0:?}")]
    Char(char),
}

/// The client-chosen identifier of one submitted object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScanId(String);

impl ScanId {
    /// A fresh random scanId: 32 lower-case hex characters (a UUID v4 without hyphens).
    pub fn generate() -> Self {
        ScanId(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Validates a scanId: 1 to 128 characters of `[A-Za-z0-9_-]`.
    pub fn parse(s: &str) -> Result<Self, ScanIdError> {
        if s.is_empty() || s.len() > SCAN_ID_MAX_LEN {
            return Err(ScanIdError::Length(s.len()));
        }
        if let Some(bad) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(ScanIdError::Char(bad));
        }
        Ok(ScanId(s.to_owned()))
    }

    /// The scanId as sent on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ScanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for ScanId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ScanId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        ScanId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The state of one scan as reported by `GET scans/state`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ScanState {
    /// `detect`: a threat was found.
    Detect,
    /// `not detected`: no threat was found.
    NotDetected,
    /// `processing`: still being scanned.
    Processing,
    /// `timeout`: the scan ended with a timeout error.
    Timeout,
    /// `error`: the scan ended with an error.
    Error,
    /// Anything else, as received; callers treat it as not finished.
    Unknown(String),
}

impl ScanState {
    /// The four known states plus processing, in the order sent by [`ScanState::ALL`].
    pub const ALL: [ScanState; 5] = [
        ScanState::Detect,
        ScanState::NotDetected,
        ScanState::Processing,
        ScanState::Timeout,
        ScanState::Error,
    ];

    /// The final states: the scan will not change any more.
    pub const FINAL: [ScanState; 4] = [
        ScanState::Detect,
        ScanState::NotDetected,
        ScanState::Timeout,
        ScanState::Error,
    ];

    /// True for `detect`, `not detected`, `timeout` and `error`.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ScanState::Detect | ScanState::NotDetected | ScanState::Timeout | ScanState::Error
        )
    }

    /// The exact wire string (`not detected` with a space); unknown states as received.
    pub fn as_wire(&self) -> &str {
        match self {
            ScanState::Detect => "detect",
            ScanState::NotDetected => "not detected",
            ScanState::Processing => "processing",
            ScanState::Timeout => "timeout",
            ScanState::Error => "error",
            ScanState::Unknown(s) => s,
        }
    }

    /// Tolerant parse: case-insensitive, surrounding blanks ignored, and `not detected` also
    /// accepted as `not_detected`, `not-detected` or `notdetected`.
    pub fn from_wire(s: &str) -> Self {
        let norm: String = s
            .trim()
            .chars()
            .filter(|c| !matches!(c, ' ' | '_' | '-'))
            .flat_map(char::to_lowercase)
            .collect();
        match norm.as_str() {
            "detect" | "detected" => ScanState::Detect,
            "notdetected" => ScanState::NotDetected,
            "processing" => ScanState::Processing,
            "timeout" => ScanState::Timeout,
            "error" => ScanState::Error,
            _ => ScanState::Unknown(s.to_owned()),
        }
    }
}

impl fmt::Display for ScanState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_wire())
    }
}

/// One entry of the results list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanResult {
    /// The scanId as received (a number is rendered in decimal); not validated, since callers
    /// only look up the ones they know.
    pub scan_id: String,
    /// The reported state.
    pub state: ScanState,
}

/// What `GET scans/filters` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restrictions {
    /// The maximum object size in bytes; `None` when missing, unparsable or `<= 0`.
    pub max_object_size: Option<u64>,
    /// The server's version string, if given.
    pub version: Option<String>,
}

/// Normalizes an object key for tolerant lookups: lower case, without `_` and `-`.
fn norm_key(k: &str) -> String {
    k.chars()
        .filter(|c| !matches!(c, '_' | '-'))
        .flat_map(char::to_lowercase)
        .collect()
}

fn get_key<'a>(obj: &'a Map<String, Value>, wanted: &str) -> Option<&'a Value> {
    obj.get(wanted).or_else(|| {
        obj.iter()
            .find(|(k, _)| norm_key(k) == wanted)
            .map(|(_, v)| v)
    })
}

fn parse_json(body: &[u8]) -> Result<Option<Value>, ApiError> {
    // Tolerate a UTF-8 byte-order mark and blank bodies.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| ApiError::protocol(format!("the answer is not JSON: {e}")))
}

/// Parses the body of `GET scans/state` (200). An empty body is an empty list.
///
/// Accepted shapes: a top-level array of items; an object holding the array under `scans`
/// (or `results`, `items`, `data`, `objects`, any case); an object that is itself one item;
/// an empty object. Per item: `scanId` (also `scanID`, `scan_id`) as a string or an integer;
/// `state` as a string or an array of strings, folded fail-closed: `detect` anywhere in the
/// array wins, else any final state makes the item final (else the first string, as
/// [`ScanState::Unknown`]). Items without a usable scanId are
/// skipped; an item without a state is reported as `Unknown("")`.
pub fn parse_results(body: &[u8]) -> Result<Vec<ScanResult>, ApiError> {
    let Some(value) = parse_json(body)? else {
        return Ok(Vec::new());
    };
    let items = match &value {
        Value::Array(items) => items.as_slice(),
        Value::Object(obj) => match find_list(obj) {
            Some(Value::Array(items)) => items.as_slice(),
            Some(Value::Null) => &[],
            Some(other) => {
                return Err(ApiError::protocol(format!(
                    "the result list is a {}, not an array",
                    json_type(other)
                )));
            }
            None if obj.is_empty() => &[],
            None if get_key(obj, "scanid").is_some() => std::slice::from_ref(&value),
            None => {
                return Err(ApiError::protocol(
                    "the answer is an object without a list of scans",
                ));
            }
        },
        Value::Null => &[],
        other => {
            return Err(ApiError::protocol(format!(
                "the answer is a JSON {}, not a list of scans",
                json_type(other)
            )));
        }
    };
    Ok(items.iter().filter_map(parse_item).collect())
}

fn find_list(obj: &Map<String, Value>) -> Option<&Value> {
    LIST_KEYS.iter().find_map(|k| get_key(obj, k))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn parse_item(item: &Value) -> Option<ScanResult> {
    let Value::Object(obj) = item else {
        debug!(
            item_type = json_type(item),
            "skipping a result item that is not an object"
        );
        return None;
    };
    let scan_id = match get_key(obj, "scanid") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            debug!("skipping a result item without a usable scanId");
            return None;
        }
    };
    let state = match get_key(obj, "state") {
        Some(Value::String(s)) => ScanState::from_wire(s),
        Some(Value::Array(states)) => state_from_array(states),
        _ => {
            debug!(scan_id, "result item without a usable state");
            ScanState::Unknown(String::new())
        }
    };
    Some(ScanResult { scan_id, state })
}

/// Folds the entries of a `state` array fail-closed: `detect` anywhere wins, then any other
/// final state (`error`, `timeout`, `not detected`, in that order), then `processing`; with no
/// known entry the first string is kept as [`ScanState::Unknown`].
fn state_from_array(states: &[Value]) -> ScanState {
    let mut best: Option<ScanState> = None;
    let mut first_unknown = None;
    for s in states.iter().filter_map(Value::as_str) {
        match ScanState::from_wire(s) {
            ScanState::Unknown(u) => {
                first_unknown.get_or_insert(u);
            }
            known => {
                if best.as_ref().is_none_or(|b| severity(&known) > severity(b)) {
                    best = Some(known);
                }
            }
        }
    }
    best.unwrap_or_else(|| ScanState::Unknown(first_unknown.unwrap_or_default()))
}

/// Rank used to fold several reports of one scan fail-closed: the higher wins.
fn severity(state: &ScanState) -> u8 {
    match state {
        ScanState::Detect => 5,
        ScanState::Error => 4,
        ScanState::Timeout => 3,
        ScanState::NotDetected => 2,
        ScanState::Processing => 1,
        ScanState::Unknown(_) => 0,
    }
}

/// Two different final states reported for one scanId in one results body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contradiction {
    /// The scanId as received.
    pub scan_id: String,
    /// Every distinct final state reported for it, in order of appearance.
    pub states: Vec<ScanState>,
}

/// Folds the entries of one results body that share a scanId into one entry each, fail-closed,
/// keeping the order of first appearance.
///
/// The folded state is the most severe one reported (`detect` > `error` > `timeout` >
/// `not detected` > `processing` > unknown): a scan reported both `not detected` and `detect`
/// is `detect`, and a scan reported final anywhere is final. Each scanId reported with two or
/// more *different final* states also yields a [`Contradiction`], for the caller to log as an
/// anomaly. Pure; results without duplicates come back unchanged.
pub fn merge_duplicates(results: Vec<ScanResult>) -> (Vec<ScanResult>, Vec<Contradiction>) {
    let mut merged: Vec<ScanResult> = Vec::with_capacity(results.len());
    let mut index: HashMap<String, usize> = HashMap::with_capacity(results.len());
    let mut finals: HashMap<String, Vec<ScanState>> = HashMap::new();
    for result in results {
        if result.state.is_final() {
            let seen = finals.entry(result.scan_id.clone()).or_default();
            if !seen.contains(&result.state) {
                seen.push(result.state.clone());
            }
        }
        match index.get(&result.scan_id) {
            Some(&i) => {
                if severity(&result.state) > severity(&merged[i].state) {
                    merged[i].state = result.state;
                }
            }
            None => {
                index.insert(result.scan_id.clone(), merged.len());
                merged.push(result);
            }
        }
    }
    let contradictions = merged
        .iter()
        .filter_map(|r| {
            let states = finals.remove(&r.scan_id)?;
            (states.len() > 1).then(|| Contradiction {
                scan_id: r.scan_id.clone(),
                states,
            })
        })
        .collect();
    (merged, contradictions)
}

/// Parses the body of `GET scans/filters` (200). `maxObjectSize` may be an integer, a float
/// or a numeric string; `<= 0`, missing or unparsable means no known limit. An empty body
/// means no restrictions.
pub fn parse_restrictions(body: &[u8]) -> Result<Restrictions, ApiError> {
    let Some(value) = parse_json(body)? else {
        return Ok(Restrictions::default());
    };
    let Value::Object(obj) = &value else {
        return Err(ApiError::protocol(format!(
            "the restrictions answer is a JSON {}, not an object",
            json_type(&value)
        )));
    };
    let max_object_size = get_key(obj, "maxobjectsize").and_then(positive_size);
    let version = match get_key(obj, "version") {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Ok(Restrictions {
        max_object_size,
        version,
    })
}

fn positive_size(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => number_to_size(n),
        Value::String(s) => {
            let s = s.trim();
            s.parse::<u64>().ok().filter(|n| *n > 0).or_else(|| {
                s.parse::<serde_json::Number>()
                    .ok()
                    .and_then(|n| number_to_size(&n))
            })
        }
        _ => None,
    }
}

fn number_to_size(n: &serde_json::Number) -> Option<u64> {
    if let Some(u) = n.as_u64() {
        return (u > 0).then_some(u);
    }
    let f = n.as_f64()?;
    // `as` truncates the fraction and saturates beyond u64::MAX, both fine for a size limit.
    (f.is_finite() && f >= 1.0).then_some(f as u64)
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
