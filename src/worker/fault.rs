//! Fault injection for the tests of worker supervision, compiled into debug builds only (a
//! release build has none of it): with `RINGDNS_FAULT_PANIC_QNAME=crash.example.` in the
//! environment, a worker panics when it handles a query for that name, as a bug would. The
//! supervisor (control/supervise.rs) must then restart the worker in place.
//!
//! Runs on: worker threads.

use std::sync::OnceLock;

use super::stats::to_wire;

/// The environment variable naming the query name that makes a worker panic.
pub const VARIABLE: &str = "RINGDNS_FAULT_PANIC_QNAME";

/// Panics if `qname` (wire format) is the name in [`VARIABLE`], compared without letter case.
pub fn check(qname: &[u8]) {
    static NAME: OnceLock<Option<Box<[u8]>>> = OnceLock::new();
    let name = NAME.get_or_init(|| std::env::var(VARIABLE).ok().map(|text| to_wire(&text)));
    if let Some(name) = name {
        if name.eq_ignore_ascii_case(qname) {
            panic!("fault injection: the query's name is {VARIABLE}");
        }
    }
}
