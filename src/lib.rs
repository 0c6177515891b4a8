//! dropscan turns any folder into a malware checkpoint.
//!
//! Files dropped into watched folders are picked up once completely written, submitted over
//! HTTPS with mutual TLS to the scanner API of Kaspersky Anti Targeted Attack Platform (KATA),
//! and moved into a clean, quarantine or failed folder by verdict. The modules below are the
//! pipeline, in order; every step is journaled so that a restart resumes where it stopped:
//!
//! ```text
//! watch ─▶ settle ─▶ claim (+hash) ─▶ limits ─▶ upload ─▶ poll ─▶ sort
//!   inotify/poll   quiet size,      rename into   maxObjectSize,  streamed     one GET      clean /
//!   + reconcile    mtime, ctime     staging,      in-flight cap,  multipart,   for all      quarantine /
//!                                   SHA-256       rate limit      fresh scanId scans        failed
//!                              └──────────── journal (SQLite WAL): what survives kill -9 ─────────┘
//! ```
//!
//! Around the pipeline: [`config`] (validated once at start), [`kata`] (the protocol client,
//! knowing nothing of the pipeline), [`fsops`] (the only place that renames and opens users'
//! files), [`app`] (wiring, start-up reconciliation, shutdown), [`emulator`] (the built-in KATA
//! stand-in), [`metrics`], and the commands.

// The pipeline, in order: each stage is one module with one `run`.
pub mod claim;
pub mod limits;
pub mod poll;
pub mod settle;
pub mod sort;
pub mod upload;
pub mod watch;

// What the stages share, below them (stages never import each other or `app`).
pub mod context;
pub mod hashing;
pub mod journal;
pub mod pipeline;

// Around it.
pub mod app;
pub mod cli;
pub mod commands;
pub mod config;
pub mod demo;
pub mod emulator;
pub mod error;
pub mod fsops;
pub mod kata;
pub mod logging;
pub mod metrics;
pub mod signal;
