//! The sorter's placement plan: where a decided record goes, and how (pure).

use crate::journal::Outcome;
use crate::root::Which;

/// Where a decided record goes, and how it is placed there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    pub(super) outcome: Outcome,
    pub(super) which: Which,
    /// Mode of a placed copy.
    pub(super) file_mode: u32,
    /// Mode of folders made on the way.
    pub(super) dir_mode: u32,
    /// A verified copy owned by dropscan (clean, quarantine) rather than the staged inode.
    pub(super) copy: bool,
    /// A release: the staged file must be the one hashed, the copy the hashed bytes.
    pub(super) clean: bool,
    /// Replaces the record's reason.
    pub(super) note: Option<&'static str>,
}

/// The placement plan of a record with `outcome`. Fail closed: clean only when the verdict is
/// `not detected` for exactly the hashed bytes (`clean_bound`); anything else that claims clean
/// goes to failed. Clean and quarantine get a copy owned by dropscan with a fixed mode (see
/// `fsops::place`); failed keeps the staged file itself (a hard-linked file must not be read).
pub(super) fn plan(outcome: Option<Outcome>, clean_bound: bool) -> Plan {
    let (outcome, note) = match outcome {
        Some(Outcome::Clean) if clean_bound => (Outcome::Clean, None),
        Some(Outcome::Clean) => (
            Outcome::Failed,
            Some("internal: the clean verdict does not match the content"),
        ),
        Some(o) => (o, None),
        None => (Outcome::Failed, None),
    };
    let (which, file_mode, dir_mode, copy) = match outcome {
        Outcome::Clean => (Which::Clean, 0o644, 0o755, true),
        Outcome::Quarantine => (Which::Quarantine, 0o600, 0o700, true),
        Outcome::Failed | Outcome::Vanished => (Which::Failed, 0o640, 0o750, false),
    };
    Plan {
        outcome,
        which,
        file_mode,
        dir_mode,
        copy,
        clean: outcome == Outcome::Clean,
        note,
    }
}
