//! Any bytes as a script of events for a worker's UDP exchanges with its upstreams (see
//! exchanges.rs).
#![no_main]

#[path = "../checks.rs"]
mod checks;
#[path = "../exchanges.rs"]
mod exchanges;

libfuzzer_sys::fuzz_target!(|data: &[u8]| exchanges::exchanges(data));
