//! Any text as a config file: a clear error or a round trip through `ringdns check`
//! (see config_checks.rs).
#![no_main]

#[path = "../config_checks.rs"]
mod config_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| config_checks::config(data));
