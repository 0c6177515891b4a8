//! Integration tests.
mod emulator_server;
