//! The integration tests: one binary (ripgrep-style), one module per area, a shared harness in
//! `util.rs`. Everything network-bound talks to the built-in emulator on 127.0.0.1 over real
//! mutual TLS; everything filesystem-bound uses real temp folders and the real journal.

// `clippy::too_many_lines` guards the crate's functions. Here ten tests run past 100 lines
// because each is one scenario (a table of hostile names or config mistakes, a kill at every
// step of a sequence) read top to bottom; cutting them would scatter the spec they state.
#![allow(clippy::too_many_lines)]

mod util;

mod attacks;
mod capacity;
mod citizenship;
mod cli;
mod config_errors;
mod destinations;
mod durability;
mod emulator_server;
mod first_hour;
mod fleet;
mod friction;
mod health;
mod hooks;
mod hostile_names;
mod hostile_server;
mod hung_at_start;
mod journal_guards;
mod kata_client;
mod kata_emulator;
mod kata_parse;
mod kill_points;
mod kill_points_tools;
mod late_mounts;
mod layout;
mod metrics;
mod model;
mod packaging;
mod pipeline;
mod place_batch;
mod quarantine_tools;
mod reloads;
mod review10;
mod review11;
mod review12;
mod review13;
mod review15;
mod review16;
mod review20;
mod review6;
mod review7;
mod review8;
mod scan_cli;
mod shares;
mod shares_fixture;
mod smb_mount;
mod staging_guard;
mod tee;
mod watch_settle;
