//! The `dropscan` binary.
fn main() {}
