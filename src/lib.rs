//! dropscan turns any folder into a malware checkpoint.
//!
//! Files dropped into watched folders are picked up once completely written, submitted over
//! HTTPS with mutual TLS to the scanner API of Kaspersky Anti Targeted Attack Platform (KATA),
//! and moved into a clean, quarantine or failed folder by verdict. The modules below are the
//! pipeline, in order; every step is journaled so that a restart resumes where it stopped:
//!
//! ```text
//! watch ─▶ settle ─▶ claim ─▶ upload ─▶ poll ─▶ sort
//!   inotify/poll   quiet size,   rename into    streamed      one GET      clean /
//!   + reconcile    mtime, ctime  staging,       multipart,    for all      quarantine /
//!                                SHA-256        fresh scanId  scans        failed
//!   (limits: maxObjectSize, in-flight cap, rate — consulted by upload, poll and sort)
//! └──────────── journal (SQLite WAL): what survives kill -9, and the bus between stages ──────┘
//! ```
//!
//! The stages never import each other or [`app`]: what crosses an edge is in `pipeline`,
//! what they share in `context`, and `hashing` and `scope` are the pieces two stages
//! need. Two seams: a stage reaches a watched root through [`root`] (the input source), never
//! through how its folders are kept, and the scanning service through [`scanner`] (submit,
//! results, forget, restrictions), never through the KATA client itself. A test
//! (`tests/layout.rs`) keeps the module graph acyclic and the stages behind both seams.
//!
//! Around the pipeline: [`config`] (validated once at start), [`kata`] (the protocol client,
//! knowing nothing of the pipeline), [`fsops`] (the only place that touches users' files,
//! every path beneath its root), [`app`] (wiring, start-up reconciliation, reload, shutdown),
//! [`emulator`] (the built-in KATA stand-in), `hooks` (notifications of placements),
//! [`metrics`], `service` (systemd notifications), and the [`commands`].

// The pipeline, in order: each stage is one module with one `run(ctx, inputs, outputs,
// shutdown)`. (Blank lines keep rustfmt from sorting them.)
pub mod watch;

pub mod settle;

pub mod claim;

pub(crate) mod upload;

pub(crate) mod poll;

pub mod sort;

// Below the stages: the records between them, their shared context, the journal, and the pieces
// two stages need.
pub(crate) mod backoff;
pub(crate) mod context;
pub(crate) mod hashing;
pub mod journal;
pub mod limits;
pub(crate) mod pipeline;
pub mod root;
pub mod scanner;
pub(crate) mod scope;

// Around it.
pub mod answer;
pub mod app;
pub mod cli;
pub mod commands;
pub mod config;
pub(crate) mod demo;
pub mod emulator;
pub mod error;
pub mod fsops;
pub(crate) mod hooks;
pub mod kata;
pub(crate) mod logging;
pub mod metrics;
pub mod runtime;
pub(crate) mod service;
pub(crate) mod signal;
pub(crate) mod tidy;
