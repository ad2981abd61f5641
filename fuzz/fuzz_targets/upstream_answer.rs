//! Any bytes as an upstream's answer to a client's miss (see checks.rs).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::upstream_answer(data));
