//! The built-in KATA emulator.
