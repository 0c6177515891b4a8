//! The KATA scanner API client.
