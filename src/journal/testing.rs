//! A test hook, not part of the API: raw access to the journal's connection, for integration
//! tests that must simulate what no operation does (a wall clock that jumped back under a cached
//! verdict, SQLite rolling a transaction back on its own, a journal thread held busy).
//!
//! Production code never imports [`RawAccess`]: it uses the named operations of [`Journal`],
//! whose connection stays private to the journal module.

use std::future::Future;

use rusqlite::Connection;

use super::Journal;
use super::types::JournalError;

/// Runs a closure on the journal's connection inside its next group commit, like an operation.
/// For tests only (`use dropscan::journal::testing::RawAccess as _;`).
#[doc(hidden)]
pub trait RawAccess {
    /// Runs `f` in the journal's next transaction; answers once it is committed.
    fn run<T, F>(&self, f: F) -> impl Future<Output = Result<T, JournalError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static;
}

impl RawAccess for Journal {
    fn run<T, F>(&self, f: F) -> impl Future<Output = Result<T, JournalError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
    {
        Journal::run(self, f)
    }
}
