//! Integration tests.

mod kata_client;
mod kata_parse;
