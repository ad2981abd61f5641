//! Fault injection for the tests of worker supervision, compiled into debug builds only (a
//! release build has none of it): with `RINGDNS_FAULT_PANIC_QNAME=crash.example.` in the
//! environment, a worker panics when it handles a query for that name, as a bug would. The
//! supervisor (control/supervise.rs) must then restart the worker in place.
//!
//! Runs on: worker threads.

use std::sync::OnceLock;

/// The environment variable naming the query name that makes a worker panic.
pub const VARIABLE: &str = "RINGDNS_FAULT_PANIC_QNAME";

/// Panics if `qname` (wire format) is the name in [`VARIABLE`], compared without letter case.
pub fn check(qname: &[u8]) {
    static NAME: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    let name = NAME.get_or_init(|| std::env::var(VARIABLE).ok().map(|text| to_wire(&text)));
    if let Some(name) = name {
        if name.eq_ignore_ascii_case(qname) {
            panic!("fault injection: the query's name is {VARIABLE}");
        }
    }
}

/// `a.b.` → `\x01a\x01b\x00` (labels longer than 63 bytes are cut: a test name never has one).
fn to_wire(text: &str) -> Vec<u8> {
    let mut wire = Vec::new();
    for label in text.split('.').filter(|label| !label.is_empty()) {
        let label = &label.as_bytes()[..label.len().min(63)];
        wire.push(u8::try_from(label.len()).expect("cut to 63 bytes above"));
        wire.extend_from_slice(label);
    }
    wire.push(0);
    wire
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_wire_format() {
        assert_eq!(to_wire("crash.test."), b"\x05crash\x04test\x00");
        assert_eq!(to_wire("crash.test"), b"\x05crash\x04test\x00");
        assert_eq!(to_wire("."), b"\x00");
    }
}
