//! dropscan: turns any folder into a malware checkpoint.
pub mod config;
pub mod emulator;
pub mod journal;
pub mod kata;
pub mod limits;
