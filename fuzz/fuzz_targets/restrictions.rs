//! The restrictions parser never panics on arbitrary bytes and never reports a zero size.

#![no_main]

use dropscan::kata::parse_restrictions;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = parse_restrictions(data) {
        assert_ne!(r.max_object_size, Some(0));
    }
});
